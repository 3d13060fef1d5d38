//! The records runed is authoritative for, kept as a projection view: `<svc>.<ns>.rune A`,
//! `_<port>._<proto>.<svc>.<ns>.rune SRV` for each named port, and `PTR` for each VIP in the
//! reverse zone of the cluster network. A service delta replaces exactly the names that service
//! owns; nothing is rebuilt.
//!
//! The maps are keyed by names in wire form ([`Key`]) and hold what the records are made of
//! (a VIP, ports, target names); a name's records are made at the first query that needs them
//! and kept until the name changes. So a cast pays for a few short byte strings, not for
//! hickory names and record sets most of which are never asked for.
//!
//! [`ZoneAt`] serves one zone (`rune.` or a reverse zone) to hickory's `Catalog`: answers,
//! NODATA for names that exist without the asked type (empty non-terminals included, RFC 8020),
//! NXDOMAIN for the rest, and the zone's SOA so resolvers can cache negative answers.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, OnceLock, RwLock};

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

/// A name as the maps hold it: its labels in wire form (each after its length byte),
/// lowercase, ending with the root's empty label: `\x03api\x07default\x04rune\x00`. A name's
/// ancestors are its suffixes at label boundaries ([`parent`]), so walking up to a zone's apex
/// makes no new name, and a key hashes in one pass.
type Key = Box<[u8]>;

/// The longest name in wire form (RFC 1035 §2.3.4).
const MAX_NAME: usize = 255;

/// Appends one label, `prefix` then `label` (`_` and `http` for `_http`), lowercase. False when
/// it cannot be a label (empty, or over 63 bytes) or the name would grow past [`MAX_NAME`]
/// with its root: such a name cannot be asked for.
fn push_label(key: &mut Vec<u8>, prefix: &[u8], label: &[u8]) -> bool {
    let len = prefix.len() + label.len();
    if len == 0 || len > 63 || key.len() + 1 + len + 1 > MAX_NAME {
        return false;
    }
    key.push(len as u8);
    key.extend(prefix.iter().chain(label).map(u8::to_ascii_lowercase));
    true
}

/// The key of the name made of `labels`, most specific first.
fn key_of<'a>(labels: impl IntoIterator<Item = &'a [u8]>) -> Option<Key> {
    let mut key = Vec::with_capacity(48);
    for label in labels {
        if !push_label(&mut key, b"", label) {
            return None;
        }
    }
    key.push(0);
    Some(key.into())
}

/// A VIP's reverse name (`4.3.2.1.in-addr.arpa.` for 1.2.3.4).
fn reverse_key(vip: Ipv4Addr) -> Option<Key> {
    let octets = vip.octets().map(|o| o.to_string());
    let labels = octets.iter().rev().map(String::as_bytes);
    key_of(labels.chain([&b"in-addr"[..], b"arpa"]))
}

/// `key`'s parent: the suffix after its first label; `None` for the root.
fn parent(key: &[u8]) -> Option<&[u8]> {
    let first = usize::from(*key.first()?);
    (first > 0).then(|| key.get(1 + first..)).flatten()
}

/// The name a key holds, for the records made from it.
fn name_of(key: &[u8]) -> Option<Name> {
    let mut labels = Vec::with_capacity(8);
    let mut at = key;
    while let Some(up) = parent(at) {
        labels.push(&at[1..at.len() - up.len()]);
        at = up;
    }
    Name::from_labels(labels).ok()
}

/// What a name holds. Its records are made from this at the first query that needs them.
enum Node {
    /// A service: its VIP.
    Service { vip: Ipv4Addr, a: Lazy },
    /// Named ports of a service (two of one name and protocol share the name); `target` is
    /// the service's name, whose A goes along.
    Srv { ports: Vec<u16>, target: Key, srv: Lazy },
    /// A VIP's reverse name: the services holding it (two, should they ever share one).
    Ptr { targets: Vec<Key>, ptr: Lazy },
}

/// A name's records, made once when first asked for: a node whose records change is
/// replaced, so what is made is never stale.
type Lazy = OnceLock<Arc<RecordSet>>;

impl Node {
    /// The records at `key`; `None` only if a name stored here cannot be made into hickory's
    /// (not for names from validated labels).
    fn records(&self, key: &[u8]) -> Option<Arc<RecordSet>> {
        let (cell, rtype) = match self {
            Node::Service { a, .. } => (a, RecordType::A),
            Node::Srv { srv, .. } => (srv, RecordType::SRV),
            Node::Ptr { ptr, .. } => (ptr, RecordType::PTR),
        };
        if let Some(set) = cell.get() {
            return Some(set.clone());
        }
        let owner = name_of(key)?;
        let mut set = RecordSet::with_ttl(owner.clone(), rtype, TTL);
        let rdata: Vec<RData> = match self {
            Node::Service { vip, .. } => vec![RData::A(A(*vip))],
            Node::Srv { ports, target, .. } => {
                let target = name_of(target)?;
                ports
                    .iter()
                    .map(|p| RData::SRV(SRV::new(0, 0, *p, target.clone())))
                    .collect()
            }
            Node::Ptr { targets, .. } => targets
                .iter()
                .map(|t| name_of(t).map(|n| RData::PTR(PTR(n))))
                .collect::<Option<_>>()?,
        };
        for r in rdata {
            set.insert(Record::from_rdata(owner.clone(), TTL, r), 0);
        }
        Some(cell.get_or_init(|| Arc::new(set)).clone())
    }
}

#[derive(Default)]
struct Names {
    nodes: Map<Key, Node>,
    /// Names with nothing of their own but names below them (`default.rune.`,
    /// `_tcp.web.default.rune.`), with how many services put names below them: they answer
    /// NODATA, not NXDOMAIN.
    ents: Map<Key, u32>,
    /// The names each service put in, so its next delta removes exactly those.
    owned: Map<(String, String), Put>,
}

/// What a service's names are made of: its VIP and named ports. A delta that leaves them as
/// they were (a scale, an image, a restart) leaves the names alone.
type Shape = (Ipv4Addr, Vec<(String, String, u16)>);

/// A service's names, and the shape they were made from.
struct Put {
    shape: Shape,
    /// The names that are this service's alone: its own first, then its SRV names.
    names: Vec<Key>,
    /// Its VIP's reverse name, if the VIP lies in a reverse zone: shared should another
    /// service hold the same VIP.
    ptr: Option<Key>,
    /// The empty non-terminals it counted, each once.
    ents: Vec<Key>,
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
    apexes: HashSet<Key, foldhash::fast::RandomState>,
}

impl Records {
    /// Empty records for `rune.` and the given reverse zones.
    pub fn new(reverse: &[Name]) -> Self {
        let apexes = std::iter::once(rune_origin())
            .chain(reverse.iter().cloned())
            .filter_map(|z| key_of(z.iter()))
            .collect();
        Records {
            names: RwLock::new(Names::default()),
            apexes,
        }
    }

    /// The VIP behind a name the data path must carry (a service or one of its SRV names):
    /// what the DNS checks before it hands an answer out.
    pub fn vip_behind(&self, name: &LowerName) -> Option<Ipv4Addr> {
        let key = key_of(name.iter())?;
        let names = self.names.read().ok()?;
        match names.nodes.get(&key)? {
            Node::Service { vip, .. } => Some(*vip),
            Node::Srv { target, .. } => match names.nodes.get(target)? {
                Node::Service { vip, .. } => Some(*vip),
                _ => None,
            },
            Node::Ptr { .. } => None,
        }
    }

    /// Whether the records can be read: a writer that panicked leaves them unknown.
    pub fn readable(&self) -> bool {
        !self.names.is_poisoned()
    }

    /// The length of the innermost zone apex that `key` lies in (the apex itself included).
    fn apex_len(&self, key: &[u8]) -> Option<usize> {
        let mut at = Some(key);
        while let Some(k) = at {
            if self.apexes.contains(k) {
                return Some(k.len());
            }
            at = parent(k);
        }
        None
    }

    fn put(&self, n: &mut Names, namespace: &str, name: &str, record: Option<&ServiceRecord>) {
        let key = (namespace.to_string(), name.to_string());
        let shape = record.and_then(shape_of);
        if shape.is_some() && n.owned.get(&key).map(|p| &p.shape) == shape.as_ref() {
            return;
        }
        if let Some(old) = n.owned.remove(&key) {
            Self::take_out(n, old);
        }
        let Some((vip, ports)) = shape else { return };
        // Names come from validated DNS labels; one that still cannot be a name is left out.
        let Some(owner) = key_of([name.as_bytes(), namespace.as_bytes(), b"rune"]) else {
            return;
        };
        let mut srvs: Vec<(Key, Vec<u16>)> = Vec::new();
        for (port_name, proto, port) in &ports {
            let mut k = Vec::with_capacity(owner.len() + port_name.len() + proto.len() + 4);
            if !push_label(&mut k, b"_", port_name.as_bytes())
                || !push_label(&mut k, b"_", proto.as_bytes())
                || k.len() + owner.len() > MAX_NAME
            {
                continue;
            }
            k.extend_from_slice(&owner);
            // Two ports of one name and protocol (tcp and udp differ) share one name.
            match srvs.iter_mut().find(|(s, _)| **s == *k) {
                Some((_, ps)) => ps.push(*port),
                None => srvs.push((k.into(), vec![*port])),
            }
        }
        let mut names = Vec::with_capacity(1 + srvs.len());
        n.nodes
            .insert(owner.clone(), Node::Service { vip, a: Lazy::new() });
        names.push(owner.clone());
        for (k, ports) in srvs {
            n.nodes.insert(
                k.clone(),
                Node::Srv {
                    ports,
                    target: owner.clone(),
                    srv: Lazy::new(),
                },
            );
            names.push(k);
        }
        // Its VIP's reverse name, if the VIP lies in one of the reverse zones.
        let ptr = reverse_key(vip).filter(|r| self.apex_len(r).is_some());
        if let Some(reverse) = &ptr {
            match n.nodes.get_mut(reverse) {
                Some(Node::Ptr { targets, ptr }) => {
                    targets.push(owner.clone());
                    *ptr = Lazy::new();
                }
                _ => {
                    n.nodes.insert(
                        reverse.clone(),
                        Node::Ptr {
                            targets: vec![owner.clone()],
                            ptr: Lazy::new(),
                        },
                    );
                }
            }
        }
        // Every ancestor below its zone's apex, once, that is not one of this service's names.
        let mut ents: Vec<Key> = Vec::new();
        for k in names.iter().chain(ptr.iter()) {
            let Some(apex) = self.apex_len(k) else { continue };
            let mut at = parent(k);
            while let Some(up) = at.filter(|up| up.len() > apex) {
                if !names.iter().chain(&ents).any(|m| **m == *up) {
                    ents.push(up.into());
                }
                at = parent(up);
            }
        }
        for e in &ents {
            match n.ents.get_mut(e) {
                Some(c) => *c += 1,
                None => {
                    n.ents.insert(e.clone(), 1);
                }
            }
        }
        n.owned.insert(
            key,
            Put {
                shape: (vip, ports),
                names,
                ptr,
                ents,
            },
        );
    }

    /// Removes what a service put in.
    fn take_out(n: &mut Names, old: Put) {
        for k in &old.names {
            n.nodes.remove(k);
        }
        if let (Some(rev), Some(owner)) = (&old.ptr, old.names.first()) {
            if let Some(Node::Ptr { targets, ptr }) = n.nodes.get_mut(rev) {
                targets.retain(|t| t != owner);
                *ptr = Lazy::new();
                if targets.is_empty() {
                    n.nodes.remove(rev);
                }
            }
        }
        for e in &old.ents {
            if let Some(c) = n.ents.get_mut(e) {
                *c -= 1;
                if *c == 0 {
                    n.ents.remove(e);
                }
            }
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
        let show = |k: &[u8]| name_of(k).map_or_else(|| format!("{k:?}"), |n| n.to_string());
        let mut v: Vec<String> = n
            .nodes
            .iter()
            .flat_map(|(k, node)| {
                let set = node.records(k).expect("a name of validated labels");
                set.records_without_rrsigs()
                    .map(|r| format!("{} {}", show(k), r.data))
                    .collect::<Vec<_>>()
            })
            .chain(n.ents.iter().map(|(k, c)| format!("{} ent {c}", show(k))))
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
        let nxdomain = || LookupControlFlow::Break(Err(LookupError::ResponseCode(ResponseCode::NXDomain)));
        let servfail = || LookupControlFlow::Break(Err(LookupError::ResponseCode(ResponseCode::ServFail)));
        // A name that cannot be a key (a label over 63 bytes) names nothing here.
        let Some(key) = key_of(name.iter()) else {
            return nxdomain();
        };
        let Ok(names) = self.records.names.read() else {
            return servfail();
        };
        let Some(node) = names.nodes.get(&key) else {
            if names.ents.contains_key(&key) || *name == self.origin {
                return nodata();
            }
            return nxdomain();
        };
        let wanted = match node {
            Node::Service { .. } => RecordType::A,
            Node::Srv { .. } => RecordType::SRV,
            Node::Ptr { .. } => RecordType::PTR,
        };
        if !any && rtype != wanted {
            return nodata();
        }
        let Some(set) = node.records(&key) else {
            return servfail();
        };
        match node {
            Node::Service { .. } => Self::answer(self.a_of(&set), None),
            Node::Srv { target, .. } => {
                let extra = match names.nodes.get(target) {
                    Some(a @ Node::Service { .. }) => a.records(target).map(|a| self.a_of(&a)),
                    _ => None,
                };
                Self::answer(set, extra)
            }
            Node::Ptr { .. } => Self::answer(set, None),
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
            // The answers, then the additionals.
            LookupControlFlow::Break(Ok(a)) => Ok(a
                .iter()
                .chain(a.additionals().into_iter().flatten())
                .map(|r| r.data.to_string())
                .collect()),
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

    fn service_at(name: &str, vip: &str, ports: &[(&str, &str, i64)]) -> Delta {
        let mut spec = rune_statemachine::spec::ServiceSpec::default();
        spec.ports = ports
            .iter()
            .map(|(n, proto, port)| rune_statemachine::spec::PortSpec {
                name: n.to_string(),
                port: *port,
                target_port: None,
                protocol: Some(proto.to_string()),
                host_port: None,
            })
            .collect();
        Delta::Service {
            namespace: "default".into(),
            name: name.into(),
            record: Some(Arc::new(ServiceRecord {
                spec,
                meta: Default::default(),
                vip: Some(vip.into()),
            })),
        }
    }

    fn gone(name: &str) -> Delta {
        Delta::Service {
            namespace: "default".into(),
            name: name.into(),
            record: None,
        }
    }

    /// Lines in the order `dump` gives them.
    fn sorted(lines: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    }

    /// A service's names, the empty non-terminals above them counted once per service, a VIP
    /// two services share, and nothing left once both are gone.
    #[test]
    fn a_service_puts_its_names_and_takes_them_all_out() {
        let records = Records::new(&reverse_zones(Ipv4Addr::new(10, 96, 0, 0), 16));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let ports = [
            ("http", "TCP", 80),
            ("dns", "udp", 53),
            ("dns", "tcp", 53),
            ("alt", "tcp", 8080),
        ];
        let (api, db) = (
            service_at("api", "10.96.1.2", &ports),
            service_at("db", "10.96.1.2", &[]),
        );
        rt.block_on(records.apply(&[&api, &db])).expect("apply");
        assert_eq!(
            records.dump(),
            sorted(&[
                "2.1.96.10.in-addr.arpa. api.default.rune.",
                "2.1.96.10.in-addr.arpa. db.default.rune.",
                "_alt._tcp.api.default.rune. 0 0 8080 api.default.rune.",
                "_dns._tcp.api.default.rune. 0 0 53 api.default.rune.",
                "_dns._udp.api.default.rune. 0 0 53 api.default.rune.",
                "_http._tcp.api.default.rune. 0 0 80 api.default.rune.",
                "_tcp.api.default.rune. ent 1",
                "_udp.api.default.rune. ent 1",
                "api.default.rune. 10.96.1.2",
                "db.default.rune. 10.96.1.2",
                "default.rune. ent 2",
                "1.96.10.in-addr.arpa. ent 2",
            ])
        );
        let zone = ZoneAt::new(Arc::new(records), rune_origin(), None, Arc::new(|| 1));
        let ask = |n: &str, t| zone.find(&LowerName::new(&Name::from_ascii(n).expect("name")), t, true);
        assert_eq!(
            answers(ask("API.Default.rune.", RecordType::A)),
            Ok(vec!["10.96.1.2".into()])
        );
        assert_eq!(
            answers(ask("api.default.rune.", RecordType::AAAA)),
            Err(false),
            "NODATA"
        );
        assert_eq!(
            answers(ask("_tcp.api.default.rune.", RecordType::SRV)),
            Err(false),
            "NODATA"
        );
        assert_eq!(
            answers(ask("x.api.default.rune.", RecordType::A)),
            Err(true),
            "NXDOMAIN"
        );
        assert_eq!(
            answers(ask("_dns._udp.api.default.rune.", RecordType::SRV)),
            Ok(vec!["0 0 53 api.default.rune.".into(), "10.96.1.2".into()]),
            "the SRV, and its target's A as an additional"
        );
        let records = zone.records.clone();
        let reverse = ZoneAt::new(
            records.clone(),
            Name::from_ascii("96.10.in-addr.arpa.").expect("name"),
            None,
            Arc::new(|| 1),
        );
        let ptr = || {
            let name = Name::from_ascii("2.1.96.10.in-addr.arpa.").expect("name");
            answers(reverse.find(&LowerName::new(&name), RecordType::PTR, true))
        };
        assert_eq!(
            ptr(),
            Ok(vec!["api.default.rune.".into(), "db.default.rune.".into()])
        );
        // The shared reverse name loses one target; its records are made anew.
        rt.block_on(records.apply(&[&gone("db")])).expect("apply");
        assert_eq!(ptr(), Ok(vec!["api.default.rune.".into()]));
        // A changed port set replaces the names; the A's records are made anew.
        let fewer = service_at("api", "10.96.1.3", &[("http", "tcp", 80)]);
        rt.block_on(records.apply(&[&fewer])).expect("apply");
        assert_eq!(
            answers(ask("api.default.rune.", RecordType::A)),
            Ok(vec!["10.96.1.3".into()])
        );
        assert_eq!(
            records.dump(),
            sorted(&[
                "3.1.96.10.in-addr.arpa. api.default.rune.",
                "_http._tcp.api.default.rune. 0 0 80 api.default.rune.",
                "_tcp.api.default.rune. ent 1",
                "api.default.rune. 10.96.1.3",
                "default.rune. ent 1",
                "1.96.10.in-addr.arpa. ent 1",
            ])
        );
        rt.block_on(records.apply(&[&gone("api")])).expect("apply");
        assert_eq!(records.dump(), Vec::<String>::new());
        assert_eq!(
            answers(ask("default.rune.", RecordType::A)),
            Err(true),
            "NXDOMAIN"
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
