//! The records runed is authoritative for, kept as a projection view: `<svc>.<ns>.rune A`,
//! `_<port>._<proto>.<svc>.<ns>.rune SRV` for each named port, and `PTR` for each VIP in the
//! reverse zone of the cluster network. A service delta replaces exactly the names that service
//! owns; nothing is rebuilt.
//!
//! [`ZoneAt`] serves one zone (`rune.` or a reverse zone) to hickory's `Catalog`: answers,
//! NODATA for names that exist without the asked type (empty non-terminals included, RFC 8020),
//! NXDOMAIN for the rest, and the zone's SOA so resolvers can cache negative answers.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, RwLock};

use hickory_server::proto::op::ResponseCode;
use hickory_server::proto::rr::rdata::{A, PTR, SOA, SRV};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordSet, RecordType};
use hickory_server::server::{Request, RequestInfo};
use hickory_server::zone_handler::{
    AuthLookup, AxfrPolicy, LookupControlFlow, LookupError, LookupOptions, LookupRecords, ZoneHandler,
    ZoneType,
};
use rune_log::projection::{ProjectionError, View};
use rune_statemachine::delta::Delta;
use rune_statemachine::store::ServiceRecord;

/// Seconds a `.rune` answer may be cached: short, so a changed VIP is seen soon. Also the SOA's
/// minimum, so a name that does not exist yet is not remembered for longer.
pub const TTL: u32 = 5;

/// The maps behind the records: keyed by names from the state (a query only looks one up), so
/// a fast hasher is safe, and hashing names is much of what a lookup and an update cost.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// What a name holds.
enum Node {
    /// A service: its VIP and the A record set for it.
    Service { vip: Ipv4Addr, a: Arc<RecordSet> },
    /// One named port of a service; `target` is the service's name, whose A goes along.
    Srv { srv: Arc<RecordSet>, target: LowerName },
    /// A VIP's reverse name.
    Ptr(Arc<RecordSet>),
}

/// A name a service put in, with its own record when the name may be shared (a PTR).
type Owned = (LowerName, Option<Record>);

#[derive(Default)]
struct Names {
    nodes: Map<LowerName, Node>,
    /// Names with nothing of their own but names below them (`default.rune.`,
    /// `_tcp.web.default.rune.`), with how many: they answer NODATA, not NXDOMAIN.
    ents: Map<LowerName, u32>,
    /// The names each service put in, so its next delta removes exactly those; with the
    /// record for a shared name (a PTR, should two services ever hold one VIP).
    owned: Map<(String, String), Put>,
}

/// What a service's names are made of: its VIP and named ports. A delta that leaves them as
/// they were (a scale, an image, a restart) leaves the names alone.
type Shape = (Ipv4Addr, Vec<(String, String, u16)>);

/// A service's names, and the shape they were made from.
struct Put {
    shape: Shape,
    names: Vec<Owned>,
}

fn shape_of(r: &ServiceRecord) -> Option<Shape> {
    let vip = r.vip.as_deref()?.parse::<Ipv4Addr>().ok()?;
    let ports = r
        .spec
        .ports
        .iter()
        .filter(|p| !p.name.is_empty())
        .filter_map(|p| {
            let port = u16::try_from(p.port).ok()?;
            let proto = p.protocol.as_deref().unwrap_or("tcp").to_ascii_lowercase();
            Some((p.name.clone(), proto, port))
        })
        .collect();
    Some((vip, ports))
}

/// The authoritative records: a projection view, read by every listener's zone handlers.
pub struct Records {
    names: RwLock<Names>,
    /// The zones' apexes (`rune.` and the reverse zones): where empty non-terminals stop.
    apexes: Vec<LowerName>,
}

impl Records {
    /// Empty records for `rune.` and the given reverse zones.
    pub fn new(reverse: &[Name]) -> Self {
        let mut apexes = vec![LowerName::new(&rune_origin())];
        apexes.extend(reverse.iter().map(LowerName::new));
        Records {
            names: RwLock::new(Names::default()),
            apexes,
        }
    }

    /// The VIP behind a name the data path must carry (a service or one of its SRV names):
    /// what the DNS checks before it hands an answer out.
    pub fn vip_behind(&self, name: &LowerName) -> Option<Ipv4Addr> {
        let names = self.names.read().ok()?;
        match names.nodes.get(name)? {
            Node::Service { vip, .. } => Some(*vip),
            Node::Srv { target, .. } => match names.nodes.get(target)? {
                Node::Service { vip, .. } => Some(*vip),
                _ => None,
            },
            Node::Ptr(_) => None,
        }
    }

    /// Whether the records can be read: a writer that panicked leaves them unknown.
    pub fn readable(&self) -> bool {
        !self.names.is_poisoned()
    }

    fn put(&self, n: &mut Names, namespace: &str, name: &str, record: Option<&ServiceRecord>) {
        let key = (namespace.to_string(), name.to_string());
        let shape = record.and_then(shape_of);
        if shape.is_some() && n.owned.get(&key).map(|p| &p.shape) == shape.as_ref() {
            return;
        }
        let old = n.owned.remove(&key).map(|p| p.names).unwrap_or_default();
        for (old, shared) in old {
            let gone = match (n.nodes.get_mut(&old), shared) {
                (Some(Node::Ptr(set)), Some(rec)) => {
                    let set = Arc::make_mut(set);
                    set.remove(&rec, 0);
                    set.is_empty()
                }
                _ => true,
            };
            if gone {
                n.nodes.remove(&old);
            }
            self.walk_ents(&mut n.ents, &old, false);
        }
        let Some((vip, ports)) = shape else { return };
        // Names come from validated DNS labels; one that still does not parse is left out.
        let Ok(owner) = Name::from_ascii(format!("{name}.{namespace}.rune.")) else {
            return;
        };
        let mut put = Vec::new();
        let a = Record::from_rdata(owner.clone(), TTL, RData::A(A(vip)));
        put.push((
            LowerName::new(&owner),
            Node::Service {
                vip,
                a: Arc::new(RecordSet::from(a)),
            },
        ));
        let target = LowerName::new(&owner);
        for (port_name, proto, port) in &ports {
            let Ok(srv_name) = Name::from_ascii(format!("_{port_name}._{proto}.{name}.{namespace}.rune."))
            else {
                continue;
            };
            let rec = Record::from_rdata(
                srv_name.clone(),
                TTL,
                RData::SRV(SRV::new(0, 0, *port, owner.clone())),
            );
            // Two ports of one name and protocol (tcp and udp differ) share one set.
            let lower = LowerName::new(&srv_name);
            match put.iter_mut().find(|(n, _)| *n == lower) {
                Some((_, Node::Srv { srv, .. })) => {
                    Arc::make_mut(srv).insert(rec, 0);
                }
                _ => put.push((
                    lower,
                    Node::Srv {
                        srv: Arc::new(RecordSet::from(rec)),
                        target: target.clone(),
                    },
                )),
            }
        }
        let mut owned = Vec::with_capacity(put.len() + 1);
        for (lower, node) in put {
            self.walk_ents(&mut n.ents, &lower, true);
            n.nodes.insert(lower.clone(), node);
            owned.push((lower, None));
        }
        let reverse = Name::from(vip);
        let lower = LowerName::new(&reverse);
        if self.apexes.iter().any(|z| z.zone_of(&lower)) {
            let rec = Record::from_rdata(reverse, TTL, RData::PTR(PTR(owner)));
            match n.nodes.get_mut(&lower) {
                Some(Node::Ptr(set)) => {
                    Arc::make_mut(set).insert(rec.clone(), 0);
                }
                _ => {
                    n.nodes
                        .insert(lower.clone(), Node::Ptr(Arc::new(RecordSet::from(rec.clone()))));
                }
            }
            self.walk_ents(&mut n.ents, &lower, true);
            owned.push((lower, Some(rec)));
        }
        n.owned.insert(
            key,
            Put {
                shape: (vip, ports),
                names: owned,
            },
        );
    }

    /// Counts `name`'s ancestors below its zone's apex up (`add`) or down.
    fn walk_ents(&self, ents: &mut Map<LowerName, u32>, name: &LowerName, add: bool) {
        // The innermost zone holding the name decides how many ancestors lie below its apex; a
        // name that is itself an apex (a one-address reverse zone) has none inside a zone.
        let Some(apex_labels) = self
            .apexes
            .iter()
            .filter(|z| z.zone_of(name))
            .map(|z| z.num_labels())
            .max()
        else {
            return;
        };
        let mut at = name.base_name();
        for _ in apex_labels..at.num_labels() {
            if add {
                *ents.entry(at.clone()).or_default() += 1;
            } else if let Some(c) = ents.get_mut(&at) {
                *c -= 1;
                if *c == 0 {
                    ents.remove(&at);
                }
            }
            at = at.base_name();
        }
    }

    fn apply_one(&self, n: &mut Names, d: &Delta) {
        if let Delta::Service {
            namespace,
            name,
            record,
        } = d
        {
            self.put(n, namespace, name, record.as_deref());
        }
    }

    #[cfg(test)]
    pub(crate) fn dump(&self) -> Vec<String> {
        let n = self.names.read().expect("records lock");
        let mut v: Vec<String> = n
            .nodes
            .iter()
            .flat_map(|(k, node)| {
                let set = match node {
                    Node::Service { a, .. } => a,
                    Node::Srv { srv, .. } => srv,
                    Node::Ptr(p) => p,
                };
                set.records_without_rrsigs()
                    .map(|r| format!("{k} {}", r.data))
                    .collect::<Vec<_>>()
            })
            .chain(n.ents.iter().map(|(k, c)| format!("{k} ent {c}")))
            .collect();
        v.sort();
        v
    }
}

impl View for Records {
    async fn reset(&self, state: Vec<Delta>) -> Result<(), ProjectionError> {
        let mut fresh = Names::default();
        for d in &state {
            self.apply_one(&mut fresh, d);
        }
        *self
            .names
            .write()
            .map_err(|e| ProjectionError::View(e.to_string()))? = fresh;
        Ok(())
    }

    async fn apply(&self, deltas: &[&Delta]) -> Result<(), ProjectionError> {
        let mut n = self
            .names
            .write()
            .map_err(|e| ProjectionError::View(e.to_string()))?;
        for d in deltas {
            self.apply_one(&mut n, d);
        }
        Ok(())
    }

    fn wants(&self, d: &Delta) -> bool {
        matches!(d, Delta::Service { .. })
    }
}

/// `rune.`
pub fn rune_origin() -> Name {
    Name::from_labels(["rune"]).unwrap_or_else(|_| Name::root())
}

/// The reverse zones covering a cluster network: its prefix rounded out to whole octets, one
/// zone per value of the octets the prefix only partly fixes (at most 256).
pub fn reverse_zones(network: Ipv4Addr, prefix: u8) -> Vec<Name> {
    let prefix = prefix.min(32);
    let whole = prefix / 8;
    let o = network.octets();
    let fixed: Vec<String> = o[..usize::from(whole)].iter().map(u8::to_string).collect();
    let arpa = |octets: &[String]| {
        let mut labels: Vec<String> = octets.iter().rev().cloned().collect();
        labels.push("in-addr".into());
        labels.push("arpa".into());
        Name::from_labels(labels.iter().map(String::as_bytes)).ok()
    };
    if prefix.is_multiple_of(8) {
        return arpa(&fixed).into_iter().collect();
    }
    // A /12 spans 16 values of its second octet: one zone each.
    let bits = prefix % 8;
    let span = 1u16 << (8 - bits);
    let first = u16::from(o[usize::from(whole)]) & !(span - 1) & 0xff;
    (first..first + span)
        .filter_map(|v| {
            let mut octets = fixed.clone();
            octets.push(v.to_string());
            arpa(&octets)
        })
        .collect()
}

/// One zone as hickory's `Catalog` sees it. `here`, in dev mode, is the address of the listener
/// that owns this catalog: service names answer with it, since the data path serves that
/// listener's clients there.
pub struct ZoneAt {
    records: Arc<Records>,
    origin: LowerName,
    soa: Name,
    /// The SOA's primary server and mailbox names, made once rather than per negative answer.
    mname: Name,
    rname: Name,
    here: Option<Ipv4Addr>,
    applied: AppliedIndex,
}

/// Where the SOA serial comes from: the applied index the records are at (the projection's).
pub type AppliedIndex = Arc<dyn Fn() -> u64 + Send + Sync>;

impl ZoneAt {
    /// The zone `origin` of `records`, whose SOA serial is `applied()`.
    pub fn new(records: Arc<Records>, origin: Name, here: Option<Ipv4Addr>, applied: AppliedIndex) -> Self {
        ZoneAt {
            records,
            origin: LowerName::new(&origin),
            soa: origin,
            mname: Name::from_labels(["dns", "rune"]).unwrap_or_else(|_| Name::root()),
            rname: Name::from_labels(["hostmaster", "rune"]).unwrap_or_else(|_| Name::root()),
            here,
            applied,
        }
    }

    fn soa_set(&self) -> Arc<RecordSet> {
        // RFC 1982 serials wrap; the low 32 bits of the applied index move forward with it.
        let serial = ((self.applied)() & 0xffff_ffff) as u32;
        let soa = SOA::new(self.mname.clone(), self.rname.clone(), serial, 60, 30, 600, TTL);
        Arc::new(RecordSet::from(Record::from_rdata(
            self.soa.clone(),
            TTL,
            RData::SOA(soa),
        )))
    }

    fn answer(set: Arc<RecordSet>, additionals: Option<Arc<RecordSet>>) -> LookupControlFlow<AuthLookup> {
        let opts = LookupOptions::default();
        LookupControlFlow::Break(Ok(AuthLookup::answers(
            LookupRecords::new(opts, set),
            additionals.map(|a| LookupRecords::new(opts, a)),
        )))
    }

    /// The A set of a service: its VIP, or in dev mode the listener's address.
    fn a_of(&self, a: &Arc<RecordSet>) -> Arc<RecordSet> {
        match self.here {
            None => a.clone(),
            Some(here) => Arc::new(RecordSet::from(Record::from_rdata(
                a.name().clone(),
                TTL,
                RData::A(A(here)),
            ))),
        }
    }

    fn find(&self, name: &LowerName, rtype: RecordType, client: bool) -> LookupControlFlow<AuthLookup> {
        let nodata = || LookupControlFlow::Break(Err(LookupError::NameExists));
        let any = rtype == RecordType::ANY;
        if *name == self.origin {
            match rtype {
                RecordType::SOA => return Self::answer(self.soa_set(), None),
                // The catalog asks for NS along with every SOA answer; there is no NS to give.
                RecordType::NS if !client => return LookupControlFlow::Break(Ok(AuthLookup::default())),
                RecordType::NS => return nodata(),
                // Below a /24 each VIP's reverse name is a zone of its own: its PTR lives at
                // the apex, so other types go on to the names.
                _ => {}
            }
        }
        let Ok(names) = self.records.names.read() else {
            return LookupControlFlow::Break(Err(LookupError::ResponseCode(ResponseCode::ServFail)));
        };
        match names.nodes.get(name) {
            Some(Node::Service { a, .. }) if any || rtype == RecordType::A => {
                Self::answer(self.a_of(a), None)
            }
            Some(Node::Srv { srv, target }) if any || rtype == RecordType::SRV => {
                let extra = match names.nodes.get(target) {
                    Some(Node::Service { a, .. }) => Some(self.a_of(a)),
                    _ => None,
                };
                Self::answer(srv.clone(), extra)
            }
            Some(Node::Ptr(p)) if any || rtype == RecordType::PTR => Self::answer(p.clone(), None),
            Some(_) => nodata(),
            None if names.ents.contains_key(name) || *name == self.origin => nodata(),
            None => LookupControlFlow::Break(Err(LookupError::ResponseCode(ResponseCode::NXDomain))),
        }
    }
}

#[async_trait::async_trait]
impl ZoneHandler for ZoneAt {
    fn zone_type(&self) -> ZoneType {
        ZoneType::Primary
    }

    fn axfr_policy(&self) -> AxfrPolicy {
        AxfrPolicy::Deny
    }

    fn origin(&self) -> &LowerName {
        &self.origin
    }

    async fn lookup(
        &self,
        name: &LowerName,
        rtype: RecordType,
        _request_info: Option<&RequestInfo<'_>>,
        _lookup_options: LookupOptions,
    ) -> LookupControlFlow<AuthLookup> {
        self.find(name, rtype, false)
    }

    async fn search(
        &self,
        request: &Request,
        _lookup_options: LookupOptions,
    ) -> (
        LookupControlFlow<AuthLookup>,
        Option<hickory_server::proto::rr::TSigResponseContext>,
    ) {
        let info = match request.request_info() {
            Ok(i) => i,
            Err(e) => return (LookupControlFlow::Break(Err(e)), None),
        };
        (self.find(info.query.name(), info.query.query_type(), true), None)
    }

    async fn nsec_records(
        &self,
        _name: &LowerName,
        _lookup_options: LookupOptions,
    ) -> LookupControlFlow<AuthLookup> {
        LookupControlFlow::Break(Ok(AuthLookup::default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rune_statemachine::store::ServiceRecord;

    fn service(vip: &str) -> Delta {
        Delta::Service {
            namespace: "default".into(),
            name: "api".into(),
            record: Some(Arc::new(ServiceRecord {
                spec: Default::default(),
                meta: Default::default(),
                vip: Some(vip.into()),
            })),
        }
    }

    fn answers(flow: LookupControlFlow<AuthLookup>) -> Result<Vec<String>, bool> {
        match flow {
            LookupControlFlow::Break(Ok(a)) => Ok(a.iter().map(|r| r.data.to_string()).collect()),
            LookupControlFlow::Break(Err(e)) => Err(e.is_nx_domain()),
            _ => Err(false),
        }
    }

    #[test]
    fn a_small_networks_ptr_lives_at_its_own_zone_apex() {
        // A /29: each address is a reverse zone of its own.
        let zones = reverse_zones(Ipv4Addr::new(10, 96, 0, 8), 29);
        let records = Arc::new(Records::new(&zones));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(records.reset(vec![service("10.96.0.10")]))
            .expect("reset");
        let apex = Name::from_ascii("10.0.96.10.in-addr.arpa.").expect("name");
        let zone = ZoneAt::new(records.clone(), apex.clone(), None, Arc::new(|| 1));
        let at = LowerName::new(&apex);
        assert_eq!(
            answers(zone.find(&at, RecordType::PTR, true)),
            Ok(vec!["api.default.rune.".to_string()])
        );
        assert_eq!(answers(zone.find(&at, RecordType::A, true)), Err(false), "NODATA");
        assert!(answers(zone.find(&at, RecordType::SOA, true)).is_ok_and(|a| a.len() == 1));
        // An address of the network no VIP holds: its zone exists, empty.
        let other = Name::from_ascii("11.0.96.10.in-addr.arpa.").expect("name");
        let zone = ZoneAt::new(records.clone(), other.clone(), None, Arc::new(|| 1));
        assert_eq!(
            answers(zone.find(&LowerName::new(&other), RecordType::PTR, true)),
            Err(false)
        );
        // Nothing was counted as an empty non-terminal outside the zones.
        let dump = records.dump();
        assert!(
            dump.iter().all(|l| !(l.contains(" ent ") && l.contains("arpa"))),
            "{dump:?}"
        );
    }

    #[test]
    fn the_rune_apex_has_an_soa_and_nothing_else() {
        let records = Arc::new(Records::new(&[]));
        let zone = ZoneAt::new(records, rune_origin(), None, Arc::new(|| 1));
        let apex = LowerName::new(&rune_origin());
        assert!(answers(zone.find(&apex, RecordType::SOA, true)).is_ok_and(|a| a.len() == 1));
        assert_eq!(
            answers(zone.find(&apex, RecordType::A, true)),
            Err(false),
            "NODATA"
        );
        assert_eq!(
            answers(zone.find(&apex, RecordType::NS, true)),
            Err(false),
            "NODATA"
        );
    }
}
