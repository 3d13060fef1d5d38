//! The data plane's view of the state: services with their VIPs, ports, balancing mode, compiled
//! policy and ready endpoints, and the instances of this node by address and process group, so
//! that a connection's source can be named. Built from the state's deltas and changed by each
//! later one, a service at a time.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use rune_statemachine::delta::Delta;
use rune_statemachine::instance::{InstanceRecord, Phase};
use rune_statemachine::network::{EndpointPort, EndpointSet};
use rune_statemachine::spec::PortSpec;
use rune_statemachine::store::ServiceRecord;

use crate::policy::{compile, Compiled, SvcKey};

/// How connections to a VIP are spread (`discovery.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Each new connection goes to the next endpoint (the default; also `headless`, whose VIP
    /// still works).
    RoundRobin,
    /// Each new connection goes to the endpoint with the fewest open ones (`load-balanced`).
    LeastConnections,
    /// No VIP traffic.
    None,
}

impl Mode {
    fn of(s: Option<&str>) -> Mode {
        match s {
            Some("load-balanced") => Mode::LeastConnections,
            Some("none") => Mode::None,
            _ => Mode::RoundRobin,
        }
    }
}

/// A ready endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ep {
    /// Instance id.
    pub instance: String,
    /// Its address (on its own node: a container's bridge address or loopback).
    pub ip: IpAddr,
    /// Service port number → the port the instance listens on.
    pub targets: Vec<(u16, u16)>,
    /// The gateway of the node it runs on, when that is another node: its address is
    /// reachable only there, so connections go through that node's data plane.
    pub via: Option<SocketAddr>,
    /// Whether it runs on this node: only then can the kernel forward to its address.
    pub here: bool,
}

impl Ep {
    /// Where this endpoint serves the service port `port`.
    pub fn target(&self, port: u16) -> Option<u16> {
        self.targets.iter().find(|(p, _)| *p == port).map(|(_, t)| *t)
    }
}

/// A service as the data plane sees it.
#[derive(Debug, Clone)]
pub struct Svc {
    /// Namespace and name.
    pub key: SvcKey,
    /// Its VIP.
    pub vip: Option<Ipv4Addr>,
    /// Balancing.
    pub mode: Mode,
    /// Its ports as declared.
    pub ports: Vec<PortSpec>,
    /// Its compiled network policy.
    pub policy: Compiled,
    /// Ready endpoints.
    pub endpoints: Vec<Ep>,
    /// Addresses of its instances on this node that are not the host's (containers).
    pub local_ips: Vec<IpAddr>,
    /// How many of its instances run on this node.
    pub local_instances: usize,
    /// Of `local_ips`, those whose run listens elsewhere than the spec now says (a rollout
    /// that moves a `targetPort` has not replaced them yet): service port → where it listens.
    /// Policy opens those at their addresses. Empty but during such a rollout.
    pub moved: Vec<(IpAddr, Vec<(u16, u16)>)>,
}

impl Svc {
    /// Its TCP ports that the proxy serves: (name, number).
    pub fn tcp_ports(&self) -> Vec<(String, u16)> {
        self.ports
            .iter()
            .filter(|p| p.is_tcp())
            .filter_map(|p| Some((p.name.clone(), u16::try_from(p.port).ok()?)))
            .collect()
    }
}

/// One of this node's running instances, as far as naming a connection's source, and
/// policing what reaches its address, needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Local {
    /// A container's address (not the host's).
    ip: Option<IpAddr>,
    /// A process instance's process group.
    pgid: Option<i32>,
    /// The ports of the spec its run was started from (empty: not recorded).
    ports: Arc<[EndpointPort]>,
}

/// The whole view. The projection changes it in place, one service at a time; readers take an
/// `Arc` of it, and a change made while one is held copies the map of `Arc<Svc>`s, not the
/// services.
#[derive(Debug, Clone, Default)]
pub struct Table {
    /// Every service. Hashed, not ordered: every cast inserts here, and at tens of thousands
    /// of services an ordered insert's key comparisons were a few percent of a write's CPU.
    /// Where the order decides something, [`Table::sorted`] gives it (or a key comparison).
    pub services: HashMap<SvcKey, Arc<Svc>, foldhash::fast::RandomState>,
    /// Local instance addresses (not the host's) → their service.
    pub by_ip: HashMap<IpAddr, SvcKey>,
    /// Local process instances' process groups → their service.
    pub by_pgid: HashMap<i32, SvcKey>,
    /// Whether any service has an egress policy (then every source must be named).
    pub any_egress: bool,
    node: String,
    /// Ready endpoints by service, kept apart from `services` since they may arrive first.
    endpoints: HashMap<SvcKey, Vec<Ep>>,
    /// The endpoint sets as the state holds them: a node's gateway that changes changes the
    /// endpoints of every service with instances there.
    sets: HashMap<SvcKey, Arc<EndpointSet>>,
    /// The gateways of the other nodes, by name.
    gateways: BTreeMap<String, SocketAddr>,
    /// This node's running instances by service and id.
    locals: HashMap<SvcKey, BTreeMap<String, Local>>,
    /// Services with an egress policy.
    egress: usize,
    /// Every local instance holding an address or process group: a stale record may name one
    /// a live instance holds too, and removing it must not unname the live one.
    ip_owners: HashMap<IpAddr, BTreeSet<(SvcKey, String)>>,
    pgid_owners: HashMap<i32, BTreeSet<(SvcKey, String)>>,
}

/// Adds or removes `who` as an owner of `k`, and points `by[k]` at the last owner (the one a
/// build in key order would leave), or nowhere.
fn own<K: std::hash::Hash + Eq + Copy>(
    owners: &mut HashMap<K, BTreeSet<(SvcKey, String)>>,
    by: &mut HashMap<K, SvcKey>,
    k: K,
    who: &(SvcKey, String),
    add: bool,
) {
    let set = owners.entry(k).or_default();
    if add {
        set.insert(who.clone());
    } else {
        set.remove(who);
    }
    match set.last() {
        Some((svc, _)) => {
            by.insert(k, svc.clone());
        }
        None => {
            owners.remove(&k);
            by.remove(&k);
        }
    }
}

impl Table {
    /// An empty view for `node`: only its instances are local.
    pub fn new(node: &str) -> Table {
        Table {
            node: node.to_string(),
            ..Table::default()
        }
    }

    /// The view of a state given as deltas (see [`rune_statemachine::delta::snapshot`]).
    pub fn build<'a>(node: &str, state: impl IntoIterator<Item = &'a Delta>) -> Table {
        let mut t = Table::new(node);
        let mut changed = BTreeSet::new();
        for d in state {
            t.apply(d, &mut changed);
        }
        t
    }

    /// Applies one delta; adds the services whose view changed to `changed`.
    pub fn apply(&mut self, d: &Delta, changed: &mut BTreeSet<SvcKey>) {
        if let Delta::Node { name, record } = d {
            let gateway = record
                .as_ref()
                .and_then(|r| r.gateway.as_deref())
                .and_then(|g| g.parse().ok());
            changed.extend(self.node(name, gateway));
            return;
        }
        changed.extend(self.apply_one(d));
    }

    /// A node's gateway: the endpoints of every service with instances there follow it.
    fn node(&mut self, name: &str, gateway: Option<SocketAddr>) -> Vec<SvcKey> {
        let before = match gateway.filter(|_| name != self.node) {
            Some(g) => self.gateways.insert(name.to_string(), g),
            None => self.gateways.remove(name),
        };
        if before == gateway {
            return Vec::new();
        }
        let keys: Vec<SvcKey> = self
            .sets
            .iter()
            .filter(|(_, set)| set.endpoints.iter().any(|e| e.node == name))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &keys {
            let set = self.sets.get(k).cloned();
            self.set_endpoints(k, set.as_deref());
        }
        keys
    }

    fn set_endpoints(&mut self, key: &SvcKey, set: Option<&EndpointSet>) {
        let list = set
            .map(|s| endpoints_of(s, &self.node, &self.gateways))
            .unwrap_or_default();
        if let Some(svc) = self.services.get_mut(key) {
            Arc::make_mut(svc).endpoints = list.clone();
        }
        if list.is_empty() {
            self.endpoints.remove(key);
        } else {
            self.endpoints.insert(key.clone(), list);
        }
    }

    fn apply_one(&mut self, d: &Delta) -> Option<SvcKey> {
        match d {
            // Where an instance runs reaches the data plane through its endpoints.
            Delta::Placement { .. } => None,
            // Handled by `apply`: it may change several services.
            Delta::Node { .. } => None,
            Delta::Namespace { .. } => None,
            Delta::Service {
                namespace,
                name,
                record,
            } => {
                let key = SvcKey::new(namespace, name);
                // One walk of the tree either way (`svc` reads the other maps only): with
                // thousands of services a second walk per cast showed in the profile.
                let old = match record {
                    Some(r) => {
                        let svc = self.svc(key.clone(), r);
                        self.egress += usize::from(svc.policy.egress.is_some());
                        self.services.insert(key.clone(), Arc::new(svc))
                    }
                    None => self.services.remove(&key),
                };
                if let Some(old) = old {
                    self.egress -= usize::from(old.policy.egress.is_some());
                }
                self.any_egress = self.egress > 0;
                Some(key)
            }
            Delta::Endpoints {
                namespace,
                service,
                set,
            } => {
                let key = SvcKey::new(namespace, service);
                match set {
                    Some(s) => self.sets.insert(key.clone(), s.clone()),
                    None => self.sets.remove(&key),
                };
                self.set_endpoints(&key, set.as_deref());
                Some(key)
            }
            Delta::Instance {
                namespace,
                service,
                id,
                record,
            } => {
                let key = SvcKey::new(namespace, service);
                let now = record.as_deref().and_then(|i| self.local(i));
                let locals = self.locals.entry(key.clone()).or_default();
                let before = match &now {
                    Some(l) => locals.insert(id.clone(), l.clone()),
                    None => locals.remove(id),
                };
                if locals.is_empty() {
                    self.locals.remove(&key);
                }
                if before == now {
                    return None;
                }
                let who = (key.clone(), id.clone());
                for (l, add) in [(&before, false), (&now, true)] {
                    let Some(l) = l else { continue };
                    if let Some(ip) = l.ip {
                        own(&mut self.ip_owners, &mut self.by_ip, ip, &who, add);
                    }
                    if let Some(pgid) = l.pgid {
                        own(&mut self.pgid_owners, &mut self.by_pgid, pgid, &who, add);
                    }
                }
                let (count, ips) = self.locals_of(&key);
                let moved = self
                    .services
                    .get(&key)
                    .map(|s| self.moved_of(&key, &s.ports))
                    .unwrap_or_default();
                if let Some(svc) = self.services.get_mut(&key) {
                    let svc = Arc::make_mut(svc);
                    svc.local_instances = count;
                    svc.local_ips = ips;
                    svc.moved = moved;
                }
                Some(key)
            }
        }
    }

    fn local(&self, i: &InstanceRecord) -> Option<Local> {
        if i.node != self.node || i.phase != Phase::Running {
            return None;
        }
        if i.runtime == "process" {
            return Some(Local {
                ip: None,
                pgid: i.runtime_id.parse().ok(),
                ports: Arc::from([]),
            });
        }
        Some(Local {
            ip: i.address.parse::<IpAddr>().ok().filter(|ip| !ip.is_loopback()),
            pgid: None,
            ports: i.ports.as_slice().into(),
        })
    }

    /// [`Svc::moved`] of service `key`, whose spec declares `ports` now.
    fn moved_of(&self, key: &SvcKey, ports: &[PortSpec]) -> Vec<(IpAddr, Vec<(u16, u16)>)> {
        let Some(m) = self.locals.get(key) else {
            return Vec::new();
        };
        let mut current: Option<Vec<EndpointPort>> = None;
        let mut out = Vec::new();
        for l in m.values() {
            let Some(ip) = l.ip.filter(|_| !l.ports.is_empty()) else {
                continue;
            };
            let current = current.get_or_insert_with(|| EndpointPort::of_spec(ports));
            let serving = EndpointPort::serving(current, &l.ports);
            if serving != *current {
                let targets = serving
                    .iter()
                    .filter(|p| p.is_tcp())
                    .map(|p| (p.port, p.target_port));
                out.push((ip, targets.collect()));
            }
        }
        out
    }

    fn locals_of(&self, key: &SvcKey) -> (usize, Vec<IpAddr>) {
        self.locals.get(key).map_or((0, Vec::new()), |m| {
            (m.len(), m.values().filter_map(|l| l.ip).collect())
        })
    }

    fn svc(&self, key: SvcKey, r: &ServiceRecord) -> Svc {
        let (local_instances, local_ips) = self.locals_of(&key);
        let moved = self.moved_of(&key, &r.spec.ports);
        Svc {
            vip: r.vip.as_deref().and_then(|v| v.parse().ok()),
            mode: Mode::of(r.spec.discovery.as_ref().and_then(|d| d.mode.as_deref())),
            ports: r.spec.ports.clone(),
            policy: compile(&key.ns, r.spec.network_policy.as_ref()),
            endpoints: self.endpoints.get(&key).cloned().unwrap_or_default(),
            local_ips,
            local_instances,
            moved,
            key,
        }
    }

    /// Finds a service by `name` in `ns`.
    pub fn get(&self, ns: &str, name: &str) -> Option<&Svc> {
        self.services.get(&SvcKey::new(ns, name)).map(|s| &**s)
    }

    /// Every service in key order: for what the order decides (which proxy port a listener is
    /// given first when the whole view is taken in), so that a rebuilt view decides as the fed
    /// one did.
    pub fn sorted(&self) -> Vec<&Arc<Svc>> {
        let mut v: Vec<&Arc<Svc>> = self.services.values().collect();
        v.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        v
    }

    /// Everything the view holds, in a stable order: two tables that answer every question
    /// alike have the same digest (the property test compares built and fed views so).
    pub fn digest(&self) -> String {
        let services: BTreeMap<_, _> = self.services.iter().collect();
        let by_ip: BTreeMap<_, _> = self.by_ip.iter().collect();
        let by_pgid: BTreeMap<_, _> = self.by_pgid.iter().collect();
        format!(
            "{:?}|{by_ip:?}|{by_pgid:?}|{}|{:?}",
            services, self.any_egress, self.gateways
        )
    }

    /// Whether `ip` is the gateway address of another node: the only peers this node's
    /// gateway serves.
    pub fn is_node(&self, ip: IpAddr) -> bool {
        self.gateways.values().any(|g| g.ip() == ip)
    }
}

/// The endpoints this node can reach, and how. An instance of another node is reached through
/// that node's gateway (its address, a container's on that node's bridge or that node's
/// loopback, means something only there); a node without a gateway (an older build) keeps
/// what it had: its containers are dialled directly, where the operator routes them, and its
/// process instances are left out (their loopback address would be this node's own).
fn endpoints_of(set: &EndpointSet, node: &str, gateways: &BTreeMap<String, SocketAddr>) -> Vec<Ep> {
    set.endpoints
        .iter()
        .filter_map(|e| {
            let ip: std::net::IpAddr = e.address.parse().ok()?;
            let remote = !e.node.is_empty() && e.node != node;
            let via = if remote {
                gateways.get(&e.node).copied()
            } else {
                None
            };
            if remote && via.is_none() && ip.is_loopback() {
                return None;
            }
            Some(Ep {
                instance: e.instance.clone(),
                ip,
                // Only TCP is proxied or forwarded: a UDP port of the same number must not
                // lend its target.
                targets: e
                    .ports
                    .iter()
                    .filter(|p| p.is_tcp())
                    .map(|p| (p.port, p.target_port))
                    .collect(),
                via,
                here: !remote,
            })
        })
        .collect()
}
