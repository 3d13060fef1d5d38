//! The kernel table's [`Model`] kept service by service, so that a change costs what it
//! touches: each service's share of the model (its `VIP . port` elements, its policies' set
//! elements for networks, its containers' addresses) is computed from the service alone, and
//! each of its links (what its policy allows between it and one service its rules name, by
//! name, namespace, or a network with port names) from the two services alone. The model is
//! the union of shares and links (elements several add are counted). A change recomputes the
//! shares and links of the services it touched, and the links to them from services whose
//! rules name them: one link each, however many services a namespace peer names.
//! What changed comes out as a [`Patch`]: the elements before and after, which
//! [`crate::nft::delta_patch`] turns into one transaction, as kube-proxy's nftables mode
//! updates its maps element by element.
//!
//! [`Model::of`] is built the same way, from every share at once, so the two cannot drift;
//! the tests check that a model kept through random changes equals one built afresh.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use crate::nft::{
    counter_name, instance_ports, kernel_backends, moved_ports, v4, Allowed, CounterKey, Model, PeerNet,
};
use crate::policy::{has_port_names, named_ports_of, ports_of, Net, PeerMatch, SvcKey};
use crate::table::{Mode, Svc, Table};

type VipPort = (Ipv4Addr, u16);
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type HashSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;
/// A service's key, shared by every index that names it (thousands of services, several
/// indexes each: a clone is a count, not two strings).
type Key = Arc<SvcKey>;

/// Where the proxy listens for a service port, if it does.
pub trait ProxyPorts {
    /// The proxy port serving `port` of `svc`.
    fn proxy_port(&self, svc: &SvcKey, port: u16) -> Option<u16>;
}

impl ProxyPorts for BTreeMap<(SvcKey, u16), u16> {
    fn proxy_port(&self, svc: &SvcKey, port: u16) -> Option<u16> {
        self.get(&(svc.clone(), port)).copied()
    }
}

/// What one service adds to the model.
#[derive(Debug, Clone, Default)]
struct Share {
    /// Its `VIP . port` keys, and what the maps keyed by them hold for it.
    keys: Vec<VipPort>,
    vip_ports: Vec<(VipPort, u16)>,
    refused: Vec<VipPort>,
    fast_pre: Vec<(VipPort, usize)>,
    fast_out: Vec<(VipPort, usize)>,
    backends: Vec<(VipPort, Vec<(Ipv4Addr, u16)>)>,
    /// Its local containers (`fast_sources`, while anything is kernel-forwarded).
    sources: Vec<Ipv4Addr>,
    /// By direction (0 ingress, 1 egress): what its policy allows, the addresses it guards
    /// or holds, and whether it has a policy there (its drops count under its name).
    allowed: [Elements; 2],
    guarded: [Vec<Ipv4Addr>; 2],
    policies: [bool; 2],
    /// What its rules name: a change to a service these name changes its link to this one.
    names: Vec<SvcKey>,
    namespaces: Vec<String>,
    /// Networks its egress rules name with port names (which resolve at each service inside).
    cidrs: Vec<Net>,
}

const DIRECTIONS: [&str; 2] = ["ingress", "egress"];

/// What one share's policy allows in one direction: [`Allowed`]'s elements, in vectors of
/// their size (a share is kept for every service; the model holds the ordered sets).
#[derive(Debug, Clone, Default, PartialEq)]
struct Elements {
    port: Vec<(Ipv4Addr, Ipv4Addr, u16)>,
    any: Vec<(Ipv4Addr, Ipv4Addr)>,
    net_port: Vec<(Ipv4Addr, PeerNet, u16)>,
    net_any: Vec<(Ipv4Addr, PeerNet)>,
}

impl Elements {
    fn is_empty(&self) -> bool {
        self.port.is_empty() && self.any.is_empty() && self.net_port.is_empty() && self.net_any.is_empty()
    }

    /// [`Allowed::allow`] for single addresses, without the text round trip: links hold
    /// only VIPs and instance addresses, and a namespace peer makes thousands of them.
    fn allow(&mut self, guarded: Ipv4Addr, peers: &[Ipv4Addr], ports: &Option<Vec<u16>>) {
        match ports {
            None => self.any.extend(peers.iter().map(|p| (guarded, *p))),
            Some(ps) => {
                for p in peers {
                    self.port.extend(ps.iter().map(|port| (guarded, *p, *port)));
                }
            }
        }
    }

    fn dedup(&mut self) {
        self.port.sort_unstable();
        self.port.dedup();
        self.any.sort_unstable();
        self.any.dedup();
    }
}

impl From<Allowed> for Elements {
    fn from(a: Allowed) -> Self {
        Elements {
            port: a.port.into_iter().collect(),
            any: a.any.into_iter().collect(),
            net_port: a.net_port.into_iter().collect(),
            net_any: a.net_any.into_iter().collect(),
        }
    }
}

/// Only the proxy can tell this host's processes apart (by their sockets), so this host's
/// own traffic goes through it while any of them is held to an egress policy.
fn host_egress(t: &Table) -> bool {
    t.any_egress
        && t.by_pgid
            .values()
            .any(|k| t.services.get(k).is_some_and(|s| s.policy.egress.is_some()))
}

/// `svc`'s share of the model of view `t`.
fn share_of(svc: &Svc, ports: &dyn ProxyPorts, host_egress: bool) -> Share {
    let mut s = Share::default();
    if let Some(vip) = svc.vip {
        for (_, port) in svc.tcp_ports() {
            let key = (vip, port);
            s.keys.push(key);
            match ports.proxy_port(&svc.key, port) {
                Some(pp) if svc.mode != Mode::None && !svc.endpoints.is_empty() => {
                    s.vip_ports.push((key, pp));
                    let Some(eps) = kernel_backends(svc, port) else {
                        continue;
                    };
                    // Containers' traffic met its policy in the kernel before NAT; a loopback
                    // address is no place to send it.
                    let pre = eps.iter().all(|(ip, _)| !ip.is_loopback());
                    // This host's traffic: only where no policy needs its source named.
                    let out = svc.policy.ingress.is_none() && !host_egress;
                    if pre {
                        s.fast_pre.push((key, eps.len()));
                    }
                    if out {
                        s.fast_out.push((key, eps.len()));
                    }
                    if pre || out {
                        s.backends.push((key, eps));
                    }
                }
                _ => s.refused.push(key),
            }
        }
    }
    s.sources = svc.local_ips.iter().filter_map(v4).collect();
    // Peers that are services are the links' (`link_of`); here, addresses, and what the
    // rules name, so that a change to a named service reaches this one's links.
    let egress = svc.policy.egress.iter().flatten().map(|r| (r, true));
    let ingress = svc.policy.ingress.iter().flatten().map(|r| (r, false));
    for (r, out) in egress.chain(ingress) {
        for (_, peer) in &r.peers {
            match peer {
                PeerMatch::Service(k) => s.names.push(k.clone()),
                PeerMatch::Namespace(ns) => s.namespaces.push(ns.clone()),
                PeerMatch::Cidr(n) if out && has_port_names(r) => s.cidrs.push(*n),
                _ => {}
            }
        }
    }
    if let Some(rules) = &svc.policy.egress {
        if !s.sources.is_empty() {
            let mut allowed = Allowed::default();
            for r in rules {
                // A CIDR's numbers stand for themselves at every address in it.
                let ports = ports_of(r, &[]);
                for (_, peer) in &r.peers {
                    if let PeerMatch::Cidr(n) = peer {
                        let peers = vec![n.to_string()];
                        for g in &s.sources {
                            allowed.allow(*g, &peers, &ports);
                        }
                    }
                }
            }
            s.allowed[1] = allowed.into();
            s.guarded[1] = s.sources.clone();
            s.policies[1] = true;
        }
    }
    if let Some(rules) = &svc.policy.ingress {
        let guarded: Vec<Ipv4Addr> = s.sources.iter().copied().chain(svc.vip).collect();
        if !guarded.is_empty() {
            let mut allowed = Allowed::default();
            for r in rules {
                let at_vip = ports_of(r, &svc.ports);
                let at_instances = at_vip.as_ref().map(|v| instance_ports(&svc.ports, v));
                for (_, peer) in &r.peers {
                    if let PeerMatch::Cidr(n) = peer {
                        let peers = vec![n.to_string()];
                        for g in &s.sources {
                            match moved_ports(svc, *g, &at_vip) {
                                Some(at) => allowed.allow(*g, &peers, &at),
                                None => allowed.allow(*g, &peers, &at_instances),
                            }
                        }
                        if let Some(vip) = svc.vip {
                            allowed.allow(vip, &peers, &at_vip);
                        }
                    }
                }
            }
            s.allowed[0] = allowed.into();
            s.guarded[0] = guarded;
            s.policies[0] = true;
        }
    }
    s.names.sort();
    s.names.dedup();
    s.namespaces.sort();
    s.namespaces.dedup();
    s.cidrs.sort_by_key(|n| (n.addr, n.prefix));
    s.cidrs.dedup();
    s
}

/// What `w`'s rules allow between it and service `d`, by direction, where they name `d`: by
/// name, by its namespace, or (egress, by port name) by a CIDR holding its VIP or
/// instances. Kept apart from `w`'s share, so that a change to `d` costs the links that
/// name it, not the whole share of every service whose rules reach it (a namespace peer
/// names every service of the namespace). `sources`: `w`'s containers.
fn link_of(w: &Svc, sources: &[Ipv4Addr], d: &Svc) -> [Elements; 2] {
    let mut out: [Elements; 2] = Default::default();
    let instances: Vec<Ipv4Addr> = d.local_ips.iter().filter_map(v4).collect();
    if let Some(rules) = w.policy.egress.as_ref().filter(|_| !sources.is_empty()) {
        for r in rules {
            for (_, peer) in &r.peers {
                // Port names resolve against the destination's ports, as the proxy's
                // `decide` does; its VIP is met before NAT (the service ports), its
                // instances on their own addresses (their target ports).
                let (at_vip, within) = match peer {
                    PeerMatch::Service(k) if *k == d.key => (ports_of(r, &d.ports), None),
                    PeerMatch::Namespace(ns) if *ns == d.key.ns => (ports_of(r, &d.ports), None),
                    // A CIDR's numbers are in its own share; here, what its names stand for.
                    PeerMatch::Cidr(n) if has_port_names(r) => (Some(named_ports_of(r, &d.ports)), Some(n)),
                    _ => continue,
                };
                let inside = |ip: &Ipv4Addr| within.is_none_or(|n| n.contains(IpAddr::V4(*ip)));
                let vip: Vec<Ipv4Addr> = d.vip.into_iter().filter(inside).collect();
                let instances: Vec<Ipv4Addr> = instances.iter().copied().filter(inside).collect();
                let at_instances = at_vip.as_ref().map(|v| instance_ports(&d.ports, v));
                // An instance still running an earlier spec is reached where that spec said.
                let moved: Vec<(Ipv4Addr, Option<Vec<u16>>)> = instances
                    .iter()
                    .filter_map(|ip| Some((*ip, moved_ports(d, *ip, &at_vip)?)))
                    .collect();
                let plain: Vec<Ipv4Addr> = match moved.is_empty() {
                    true => instances,
                    false => instances
                        .into_iter()
                        .filter(|ip| moved.iter().all(|(m, _)| m != ip))
                        .collect(),
                };
                for g in sources {
                    out[1].allow(*g, &vip, &at_vip);
                    out[1].allow(*g, &plain, &at_instances);
                    for (ip, at) in &moved {
                        out[1].allow(*g, &[*ip], at);
                    }
                }
            }
        }
    }
    if let Some(rules) = w.policy.ingress.as_ref().filter(|_| !instances.is_empty()) {
        for r in rules {
            let named = r.peers.iter().any(|(_, peer)| match peer {
                PeerMatch::Service(k) => *k == d.key,
                PeerMatch::Namespace(ns) => *ns == d.key.ns,
                _ => false,
            });
            if !named {
                continue;
            }
            let at_vip = ports_of(r, &w.ports);
            let at_instances = at_vip.as_ref().map(|v| instance_ports(&w.ports, v));
            for g in sources {
                match moved_ports(w, *g, &at_vip) {
                    Some(at) => out[0].allow(*g, &instances, &at),
                    None => out[0].allow(*g, &instances, &at_instances),
                }
            }
            if let Some(vip) = w.vip {
                out[0].allow(vip, &instances, &at_vip);
            }
        }
    }
    for e in &mut out {
        e.dedup();
    }
    out
}

/// `w`'s links in view `t` (share `s`): to each service its rules name, by name, by
/// namespace (`by_ns`, which holds every service's key) or by a CIDR.
fn links_of(
    t: &Table,
    w: &Svc,
    s: &Share,
    by_ns: &HashMap<String, HashSet<Key>>,
) -> HashMap<Key, [Elements; 2]> {
    let key = |k: &SvcKey| by_ns.get(&k.ns).and_then(|m| m.get(k));
    let mut named: HashSet<&Key> = HashSet::default();
    named.extend(s.names.iter().filter_map(key));
    for ns in &s.namespaces {
        named.extend(by_ns.get(ns).into_iter().flatten());
    }
    if !s.cidrs.is_empty() {
        // Every service is looked at: a CIDR may hold any VIP or container address.
        let inside = |ip: IpAddr| s.cidrs.iter().any(|n| n.contains(ip));
        for (k, d) in &t.services {
            if d.vip.is_some_and(|v| inside(IpAddr::V4(v))) || d.local_ips.iter().any(|ip| inside(*ip)) {
                named.extend(key(k));
            }
        }
    }
    let mut out = HashMap::default();
    for k in named {
        let Some(d) = t.services.get(&**k) else { continue };
        let link = link_of(w, &s.sources, d);
        if !link.iter().all(Elements::is_empty) {
            out.insert(k.clone(), link);
        }
    }
    out
}

/// Elements counted by how many shares add them; the model holds those counted at least once.
/// The first change to an element in an update remembers whether the model held it before.
struct Counted<T> {
    n: HashMap<T, u32>,
    touched: HashMap<T, bool>,
}

impl<T> Default for Counted<T> {
    fn default() -> Self {
        Counted {
            n: HashMap::default(),
            touched: HashMap::default(),
        }
    }
}

impl<T: Hash + Eq + Clone> Counted<T> {
    /// Counts `t` once more (`add`) or once less; true when it came or went. `record`: note
    /// it for [`Counted::settle`] (not in a whole build).
    fn count(&mut self, t: &T, add: bool, record: bool) -> bool {
        let flips = if add {
            let n = self.n.entry(t.clone()).or_insert(0);
            *n += 1;
            *n == 1
        } else {
            match self.n.get_mut(t) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    self.n.remove(t);
                    true
                }
                // Every share and link takes away what it added: an element taken away that
                // was never added is a bug the tests should see, not a count to skip.
                None => {
                    debug_assert!(false, "an element taken away that was never counted");
                    false
                }
            }
        };
        if flips && record {
            // Held before unless this update already changed it.
            self.touched.entry(t.clone()).or_insert(!add);
        }
        flips
    }

    /// The elements this update added and removed; forgets what it touched.
    fn settle(&mut self) -> (Vec<T>, Vec<T>) {
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        // Taken, not drained: a drain walks the map's capacity, which a large update leaves.
        for (t, was) in std::mem::take(&mut self.touched) {
            match (was, self.n.contains_key(&t)) {
                (false, true) => added.push(t),
                (true, false) => removed.push(t),
                _ => {}
            }
        }
        (added, removed)
    }
}

/// One direction's allowed flows, counted.
#[derive(Default)]
struct CountedAllowed {
    port: Counted<(Ipv4Addr, Ipv4Addr, u16)>,
    any: Counted<(Ipv4Addr, Ipv4Addr)>,
    net_port: Counted<(Ipv4Addr, PeerNet, u16)>,
    net_any: Counted<(Ipv4Addr, PeerNet)>,
    /// Peer networks in the model by prefix length: one pair of sets each.
    lengths: BTreeMap<u8, u32>,
}

impl CountedAllowed {
    fn count(&mut self, a: &Elements, add: bool, record: bool) {
        for e in &a.port {
            self.port.count(e, add, record);
        }
        for e in &a.any {
            self.any.count(e, add, record);
        }
        for e in &a.net_port {
            if self.net_port.count(e, add, record) {
                count_length(&mut self.lengths, e.1 .1, add);
            }
        }
        for e in &a.net_any {
            if self.net_any.count(e, add, record) {
                count_length(&mut self.lengths, e.1 .1, add);
            }
        }
    }

    /// The model's sets: every element counted.
    fn materialize(&self) -> Allowed {
        Allowed {
            port: self.port.n.keys().copied().collect(),
            any: self.any.n.keys().copied().collect(),
            net_port: self.net_port.n.keys().copied().collect(),
            net_any: self.net_any.n.keys().copied().collect(),
        }
    }

    fn lengths(&self) -> BTreeSet<u8> {
        self.lengths.keys().copied().collect()
    }

    /// Into the model `m` and the patch's two sides.
    fn settle(&mut self, m: &mut Allowed, before: &mut Allowed, after: &mut Allowed) {
        fn apply<T: Ord + Clone>(
            (added, removed): (Vec<T>, Vec<T>),
            m: &mut BTreeSet<T>,
            before: &mut BTreeSet<T>,
            after: &mut BTreeSet<T>,
        ) {
            for t in removed {
                m.remove(&t);
                before.insert(t);
            }
            for t in added {
                m.insert(t.clone());
                after.insert(t);
            }
        }
        apply(self.port.settle(), &mut m.port, &mut before.port, &mut after.port);
        apply(self.any.settle(), &mut m.any, &mut before.any, &mut after.any);
        apply(
            self.net_port.settle(),
            &mut m.net_port,
            &mut before.net_port,
            &mut after.net_port,
        );
        apply(
            self.net_any.settle(),
            &mut m.net_any,
            &mut before.net_any,
            &mut after.net_any,
        );
    }
}

fn count_length(lengths: &mut BTreeMap<u8, u32>, len: u8, add: bool) {
    if add {
        *lengths.entry(len).or_default() += 1;
    } else if let Some(n) = lengths.get_mut(&len) {
        *n -= 1;
        if *n == 0 {
            lengths.remove(&len);
        }
    }
}

/// What one update changed: the touched elements as the model held them before and holds
/// them after (an element in neither side did not change), and each direction's prefix
/// lengths before and after.
#[derive(Debug, Clone, Default)]
pub struct Patch {
    /// The touched elements before.
    pub before: Model,
    /// The touched elements after.
    pub after: Model,
    /// By direction (ingress, egress): the peer networks' prefix lengths before and after.
    pub lengths: [(BTreeSet<u8>, BTreeSet<u8>); 2],
    /// VIPs that left the view and VIPs that came.
    pub vips: (Vec<Ipv4Addr>, Vec<Ipv4Addr>),
}

impl Patch {
    /// Whether the kernel's table needs no change (the policies' names are not in it).
    pub fn is_empty(&self) -> bool {
        let table = |m: &Model| Model {
            policies: BTreeMap::new(),
            ..m.clone()
        };
        table(&self.before) == table(&self.after) && self.lengths.iter().all(|(a, b)| a == b)
    }

    /// The model before this patch, from `now`, the one after it: what the kernel held, for
    /// a change that cannot be made as this patch (the view went stale), and to attribute
    /// drops counted under it.
    pub fn undo(&self, now: &Model) -> Model {
        fn swap<K: Ord + Clone, V: Clone>(
            m: &mut BTreeMap<K, V>,
            after: &BTreeMap<K, V>,
            before: &BTreeMap<K, V>,
        ) {
            for k in after.keys() {
                m.remove(k);
            }
            m.extend(before.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        fn swap_set<T: Ord + Clone>(m: &mut BTreeSet<T>, after: &BTreeSet<T>, before: &BTreeSet<T>) {
            for t in after {
                m.remove(t);
            }
            m.extend(before.iter().cloned());
        }
        fn swap_allowed(m: &mut Allowed, after: &Allowed, before: &Allowed) {
            swap_set(&mut m.port, &after.port, &before.port);
            swap_set(&mut m.any, &after.any, &before.any);
            swap_set(&mut m.net_port, &after.net_port, &before.net_port);
            swap_set(&mut m.net_any, &after.net_any, &before.net_any);
        }
        let (a, b) = (&self.after, &self.before);
        let mut m = now.clone();
        swap(&mut m.vip_ports, &a.vip_ports, &b.vip_ports);
        swap_set(&mut m.refused, &a.refused, &b.refused);
        swap(&mut m.fast_pre, &a.fast_pre, &b.fast_pre);
        swap(&mut m.fast_out, &a.fast_out, &b.fast_out);
        swap(&mut m.backends, &a.backends, &b.backends);
        swap_set(&mut m.fast_sources, &a.fast_sources, &b.fast_sources);
        swap(&mut m.ingress_to, &a.ingress_to, &b.ingress_to);
        swap(&mut m.egress_from, &a.egress_from, &b.egress_from);
        swap_allowed(&mut m.ingress, &a.ingress, &b.ingress);
        swap_allowed(&mut m.egress, &a.egress, &b.egress);
        swap(&mut m.policies, &a.policies, &b.policies);
        m
    }
}

/// The model of a view, kept per change.
pub struct Live {
    model: Model,
    shares: HashMap<Key, Share>,
    /// The services holding a `VIP . port` (one, unless two records share a VIP: then the
    /// greatest key's share is the one in the model).
    owners: HashMap<VipPort, Vec<Key>>,
    sources: Counted<Ipv4Addr>,
    allowed: [CountedAllowed; 2],
    /// By direction: the services guarding or holding each address; the greatest key names
    /// the policy its drops count under.
    guards: [HashMap<Ipv4Addr, Vec<Key>>; 2],
    /// By service: what its rules allow between it and each service they name.
    links: HashMap<Key, HashMap<Key, [Elements; 2]>>,
    /// Who names a service, a namespace, or a network (with port names), in its rules.
    named_by: HashMap<SvcKey, HashSet<Key>>,
    namespace_named_by: HashMap<String, HashSet<Key>>,
    cidr_named_by: HashMap<Net, HashSet<Key>>,
    /// The services of each namespace.
    by_ns: HashMap<String, HashSet<Key>>,
    host_egress: bool,
    vips: HashMap<Key, Ipv4Addr>,
    /// How many services hold each VIP (one, unless two records share it).
    vip_holders: Counted<Ipv4Addr>,
}

impl Live {
    /// The model of an empty view, for the proxy's port range `range` (which the table
    /// shields from outside).
    pub fn new(range: (u16, u16)) -> Live {
        Live {
            model: Model {
                range,
                ..Model::default()
            },
            shares: HashMap::default(),
            owners: HashMap::default(),
            sources: Counted::default(),
            allowed: Default::default(),
            guards: Default::default(),
            links: HashMap::default(),
            named_by: HashMap::default(),
            namespace_named_by: HashMap::default(),
            cidr_named_by: HashMap::default(),
            by_ns: HashMap::default(),
            host_egress: false,
            vips: HashMap::default(),
            vip_holders: Counted::default(),
        }
    }

    /// The model of view `t` built whole.
    pub fn build(t: &Table, ports: &dyn ProxyPorts, range: (u16, u16)) -> Live {
        let mut l = Live {
            host_egress: host_egress(t),
            ..Live::new(range)
        };
        for k in t.services.keys() {
            let k = Arc::new(k.clone());
            l.by_ns.entry(k.ns.clone()).or_default().insert(k);
        }
        for (k, svc) in &t.services {
            let s = share_of(svc, ports, l.host_egress);
            let k = match l.by_ns.get(&k.ns).and_then(|m| m.get(k)) {
                Some(k) => k.clone(),
                None => Arc::new(k.clone()),
            };
            l.count(&k, &s, true, None);
            l.link(&k, links_of(t, svc, &s, &l.by_ns), false);
            if let Some(v) = svc.vip {
                l.vips.insert(k.clone(), v);
                l.vip_holders.count(&v, true, false);
            }
            l.shares.insert(k, s);
        }
        // The model from the counts, each map and set built at once from its elements.
        let mut m = Model {
            range,
            ..Model::default()
        };
        for (key, owners) in &l.owners {
            let Some(s) = owners.last().and_then(|k| l.shares.get(k)) else {
                continue;
            };
            m.vip_ports.extend(find(&s.vip_ports, *key).map(|v| (*key, v)));
            if s.refused.contains(key) {
                m.refused.insert(*key);
            }
            m.fast_pre.extend(find(&s.fast_pre, *key).map(|v| (*key, v)));
            m.fast_out.extend(find(&s.fast_out, *key).map(|v| (*key, v)));
            m.backends.extend(find(&s.backends, *key).map(|v| (*key, v)));
        }
        let names = |d: usize| -> BTreeMap<Ipv4Addr, String> {
            l.guards[d]
                .iter()
                .filter_map(|(ip, o)| Some((*ip, counter_name(o.last()?, DIRECTIONS[d]))))
                .collect()
        };
        m.ingress_to = names(0);
        m.egress_from = names(1);
        m.ingress = l.allowed[0].materialize();
        m.egress = l.allowed[1].materialize();
        if !m.fast_pre.is_empty() {
            m.fast_sources = l.sources.n.keys().copied().collect();
        }
        m.policies = std::mem::take(&mut l.model.policies);
        l.model = m;
        l
    }

    /// The model as it is now.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The model, for one built whole.
    pub fn into_model(self) -> Model {
        self.model
    }

    /// Brings the model to view `t`, of which the services `changed` (all when `None`)
    /// changed since the last update, and says what changed. Costs the touched services'
    /// shares, plus those of services whose rules name them.
    pub fn update(&mut self, t: &Table, changed: Option<&BTreeSet<SvcKey>>, ports: &dyn ProxyPorts) -> Patch {
        let host_egress = host_egress(t);
        let changed = match changed {
            Some(c) if host_egress == self.host_egress => c,
            // Every share changes: built again, the patch is the two whole models.
            _ => return self.rebuild(t, ports),
        };
        let mut todo: BTreeSet<Key> = BTreeSet::new();
        for k in changed {
            let key = match self.shares.get_key_value(k) {
                Some((key, _)) => key.clone(),
                None => Arc::new(k.clone()),
            };
            match (t.services.contains_key(k), self.by_ns.get_mut(&k.ns)) {
                (true, Some(members)) => {
                    members.insert(key.clone());
                }
                (true, None) => {
                    self.by_ns.insert(k.ns.clone(), HashSet::from_iter([key.clone()]));
                }
                (false, Some(members)) => {
                    members.remove(k);
                    if members.is_empty() {
                        self.by_ns.remove(&k.ns);
                    }
                }
                (false, None) => {}
            }
            todo.insert(key);
        }
        // The links to a changed service from services that did not change: those whose
        // rules name it, its namespace, or a network holding its addresses, before or now.
        let mut relink: Vec<(Key, Key)> = Vec::new();
        for k in &todo {
            let mut by: HashSet<&Key> = HashSet::default();
            by.extend(self.named_by.get(&**k).into_iter().flatten());
            by.extend(self.namespace_named_by.get(&k.ns).into_iter().flatten());
            if !self.cidr_named_by.is_empty() {
                let now = t.services.get(&**k);
                let old = self.shares.get(&**k);
                let addrs: Vec<IpAddr> = (self.vips.get(&**k).copied().into_iter())
                    .chain(now.and_then(|s| s.vip))
                    .map(IpAddr::V4)
                    .chain(now.into_iter().flat_map(|s| s.local_ips.iter().copied()))
                    .chain(
                        old.into_iter()
                            .flat_map(|s| s.sources.iter().copied().map(IpAddr::V4)),
                    )
                    .collect();
                for (n, named) in &self.cidr_named_by {
                    if addrs.iter().any(|ip| n.contains(*ip)) {
                        by.extend(named);
                    }
                }
            }
            relink.extend(
                by.into_iter()
                    .filter(|w| !todo.contains(*w))
                    .map(|w| (w.clone(), k.clone())),
            );
        }
        let lengths_before = [self.allowed[0].lengths(), self.allowed[1].lengths()];
        let was_fast = !self.model.fast_pre.is_empty();
        let mut keys: BTreeMap<VipPort, Before> = BTreeMap::new();
        let mut guards: [BTreeMap<Ipv4Addr, Option<String>>; 2] = Default::default();
        let mut policies: BTreeMap<String, Option<CounterKey>> = BTreeMap::new();
        let mut patch = Patch::default();
        for k in &todo {
            let svc = t.services.get(&**k);
            let new = svc.map(|svc| share_of(svc, ports, host_egress));
            if let Some(old) = self.shares.remove(&**k) {
                self.count(k, &old, false, Some((&mut keys, &mut guards, &mut policies)));
            }
            if let Some(old) = self.links.remove(&**k) {
                for link in old.values() {
                    self.count_link(link, false, true);
                }
            }
            match (self.vips.get(&**k).copied(), svc.and_then(|s| s.vip)) {
                (a, b) if a == b => {}
                (a, b) => {
                    // A VIP comes or goes with the first or the last service holding it.
                    if let Some(a) = a.filter(|a| self.vip_holders.count(a, false, false)) {
                        patch.vips.0.push(a);
                    }
                    if let Some(b) = b.filter(|b| self.vip_holders.count(b, true, false)) {
                        patch.vips.1.push(b);
                    }
                    match b {
                        Some(v) => self.vips.insert(k.clone(), v),
                        None => self.vips.remove(&**k),
                    };
                }
            }
            if let (Some(new), Some(svc)) = (new, svc) {
                self.count(k, &new, true, Some((&mut keys, &mut guards, &mut policies)));
                self.link(k, links_of(t, svc, &new, &self.by_ns), true);
                self.shares.insert(k.clone(), new);
            }
        }
        for (w, d) in relink {
            let Some(wsvc) = t.services.get(&*w) else { continue };
            if let Some(old) = self.links.get_mut(&w).and_then(|mine| mine.remove(&d)) {
                self.count_link(&old, false, true);
            }
            let sources: Vec<Ipv4Addr> = wsvc.local_ips.iter().filter_map(v4).collect();
            let new = t.services.get(&*d).map(|dsvc| link_of(wsvc, &sources, dsvc));
            match new.filter(|l| !l.iter().all(Elements::is_empty)) {
                Some(new) => {
                    self.count_link(&new, true, true);
                    self.links.entry(w).or_default().insert(d, new);
                }
                None => {
                    if self.links.get(&w).is_some_and(HashMap::is_empty) {
                        self.links.remove(&w);
                    }
                }
            }
        }
        // The `VIP . port` keys: each from its greatest owner's share.
        let touched: BTreeSet<VipPort> = keys.keys().copied().collect();
        for (key, before) in keys {
            let owner = self
                .owners
                .get(&key)
                .and_then(|o| o.last())
                .and_then(|k| self.shares.get(k));
            let m = &mut self.model;
            set(&mut m.vip_ports, key, owner.and_then(|s| find(&s.vip_ports, key)));
            set_in(
                &mut m.refused,
                key,
                owner.is_some_and(|s| s.refused.contains(&key)),
            );
            set(&mut m.fast_pre, key, owner.and_then(|s| find(&s.fast_pre, key)));
            set(&mut m.fast_out, key, owner.and_then(|s| find(&s.fast_out, key)));
            set(&mut m.backends, key, owner.and_then(|s| find(&s.backends, key)));
            before.record(key, &mut patch.before);
            Before::of(m, key).record(key, &mut patch.after);
        }
        // A VIP is masqueraded while any of its ports is kernel-forwarded (`fast_vips`, which
        // the commands derive from `fast_pre`): the patch carries its other ports as they are.
        let vips: BTreeSet<Ipv4Addr> = touched.iter().map(|(v, _)| *v).collect();
        for v in vips {
            for (key, n) in self.model.fast_pre.range((v, 0)..=(v, u16::MAX)) {
                if !touched.contains(key) {
                    patch.before.fast_pre.insert(*key, *n);
                    patch.after.fast_pre.insert(*key, *n);
                }
            }
        }
        for (name, was) in policies {
            let now = self.model.policies.get(&name).cloned();
            if was != now {
                patch.before.policies.extend(was.map(|c| (name.clone(), c)));
                patch.after.policies.extend(now.map(|c| (name, c)));
            }
        }
        // The addresses a policy guards or holds.
        for (d, touched) in guards.into_iter().enumerate() {
            for (ip, was) in touched {
                let now = self.guards[d]
                    .get(&ip)
                    .and_then(|o| o.last())
                    .map(|k| counter_name(k, DIRECTIONS[d]));
                let (m, b, a) = match d {
                    0 => (
                        &mut self.model.ingress_to,
                        &mut patch.before.ingress_to,
                        &mut patch.after.ingress_to,
                    ),
                    _ => (
                        &mut self.model.egress_from,
                        &mut patch.before.egress_from,
                        &mut patch.after.egress_from,
                    ),
                };
                if was == now {
                    continue;
                }
                match &now {
                    Some(n) => m.insert(ip, n.clone()),
                    None => m.remove(&ip),
                };
                b.extend(was.map(|n| (ip, n)));
                a.extend(now.map(|n| (ip, n)));
            }
        }
        self.allowed[0].settle(
            &mut self.model.ingress,
            &mut patch.before.ingress,
            &mut patch.after.ingress,
        );
        self.allowed[1].settle(
            &mut self.model.egress,
            &mut patch.before.egress,
            &mut patch.after.egress,
        );
        patch.lengths = [
            (lengths_before[0].clone(), self.allowed[0].lengths()),
            (lengths_before[1].clone(), self.allowed[1].lengths()),
        ];
        // Containers' addresses are a set of the table only while something is forwarded.
        let (came, went) = self.sources.settle();
        let is_fast = !self.model.fast_pre.is_empty();
        if was_fast && is_fast {
            for ip in went {
                self.model.fast_sources.remove(&ip);
                patch.before.fast_sources.insert(ip);
            }
            for ip in came {
                self.model.fast_sources.insert(ip);
                patch.after.fast_sources.insert(ip);
            }
        } else if was_fast {
            patch.before.fast_sources = std::mem::take(&mut self.model.fast_sources);
        } else if is_fast {
            self.model.fast_sources = self.sources.n.keys().copied().collect();
            patch.after.fast_sources = self.model.fast_sources.clone();
        }
        patch.before.range = self.model.range;
        patch.after.range = self.model.range;
        patch
    }

    /// Everything built again from view `t`: the patch holds the two whole models.
    fn rebuild(&mut self, t: &Table, ports: &dyn ProxyPorts) -> Patch {
        let old = std::mem::replace(self, Live::build(t, ports, self.model.range));
        let (was, now): (HashSet<Ipv4Addr>, HashSet<Ipv4Addr>) = (
            old.vips.values().copied().collect(),
            self.vips.values().copied().collect(),
        );
        Patch {
            lengths: [
                (old.allowed[0].lengths(), self.allowed[0].lengths()),
                (old.allowed[1].lengths(), self.allowed[1].lengths()),
            ],
            vips: (
                was.difference(&now).copied().collect(),
                now.difference(&was).copied().collect(),
            ),
            before: old.model,
            after: self.model.clone(),
        }
    }

    /// Adds (`add`) or takes away service `k`'s share; in an update (`touched`), notes the
    /// keys and addresses it touched, with what the model held for them before.
    fn count(&mut self, k: &Key, s: &Share, add: bool, mut touched: Option<Touched<'_>>) {
        let record = touched.is_some();
        for key in &s.keys {
            if let Some((keys, _, _)) = &mut touched {
                keys.entry(*key).or_insert_with(|| Before::of(&self.model, *key));
            }
            member(&mut self.owners, *key, k, add);
        }
        for ip in &s.sources {
            self.sources.count(ip, add, record);
        }
        for d in 0..2 {
            self.allowed[d].count(&s.allowed[d], add, record);
            let model = if d == 0 {
                &self.model.ingress_to
            } else {
                &self.model.egress_from
            };
            for ip in &s.guarded[d] {
                if let Some((_, guards, _)) = &mut touched {
                    guards[d].entry(*ip).or_insert_with(|| model.get(ip).cloned());
                }
                member(&mut self.guards[d], *ip, k, add);
            }
        }
        for (d, direction) in DIRECTIONS.into_iter().enumerate() {
            if !s.policies[d] {
                continue;
            }
            let name = counter_name(k, direction);
            if let Some((_, _, policies)) = &mut touched {
                policies
                    .entry(name.clone())
                    .or_insert_with(|| self.model.policies.get(&name).cloned());
            }
            if add {
                let c = CounterKey {
                    service: SvcKey::clone(k),
                    direction,
                };
                self.model.policies.insert(name, c);
            } else {
                self.model.policies.remove(&name);
            }
        }
        edges(&mut self.named_by, k, &s.names, add);
        edges(&mut self.namespace_named_by, k, &s.namespaces, add);
        edges(&mut self.cidr_named_by, k, &s.cidrs, add);
    }

    /// Counts `k`'s links (in an update: `record`, noting what they touched) and keeps them.
    fn link(&mut self, k: &Key, links: HashMap<Key, [Elements; 2]>, record: bool) {
        for l in links.values() {
            self.count_link(l, true, record);
        }
        if !links.is_empty() {
            self.links.insert(k.clone(), links);
        }
    }

    /// Adds (`add`) or takes away one link's elements (`record`: in an update).
    fn count_link(&mut self, l: &[Elements; 2], add: bool, record: bool) {
        for (counted, e) in self.allowed.iter_mut().zip(l) {
            counted.count(e, add, record);
        }
    }
}

/// What an update touched: the `VIP . port` keys and, by direction, the guarded addresses,
/// each with what the model held before.
type Touched<'a> = (
    &'a mut BTreeMap<VipPort, Before>,
    &'a mut [BTreeMap<Ipv4Addr, Option<String>>; 2],
    &'a mut BTreeMap<String, Option<CounterKey>>,
);

/// Adds (`add`) or takes away `k` among the holders of `at`, kept in key order.
fn member<A: Hash + Eq + Copy>(m: &mut HashMap<A, Vec<Key>>, at: A, k: &Key, add: bool) {
    let holders = m.entry(at).or_default();
    match (holders.binary_search(k), add) {
        (Err(i), true) => holders.insert(i, k.clone()),
        (Ok(i), false) => {
            holders.remove(i);
        }
        _ => {}
    }
    if holders.is_empty() {
        m.remove(&at);
    }
}

/// Records (`add`) or forgets that `k` names each of `to`.
fn edges<N: Hash + Eq + Clone>(m: &mut HashMap<N, HashSet<Key>>, k: &Key, to: &[N], add: bool) {
    for n in to {
        if add {
            m.entry(n.clone()).or_default().insert(k.clone());
        } else if let Some(set) = m.get_mut(n) {
            set.remove(k);
            if set.is_empty() {
                m.remove(n);
            }
        }
    }
}

/// What the maps keyed by one `VIP . port` held.
#[derive(Default)]
struct Before {
    vip_port: Option<u16>,
    refused: bool,
    fast_pre: Option<usize>,
    fast_out: Option<usize>,
    backends: Option<Vec<(Ipv4Addr, u16)>>,
}

impl Before {
    fn of(m: &Model, key: VipPort) -> Before {
        Before {
            vip_port: m.vip_ports.get(&key).copied(),
            refused: m.refused.contains(&key),
            fast_pre: m.fast_pre.get(&key).copied(),
            fast_out: m.fast_out.get(&key).copied(),
            backends: m.backends.get(&key).cloned(),
        }
    }

    fn record(self, key: VipPort, side: &mut Model) {
        set(&mut side.vip_ports, key, self.vip_port);
        set_in(&mut side.refused, key, self.refused);
        set(&mut side.fast_pre, key, self.fast_pre);
        set(&mut side.fast_out, key, self.fast_out);
        set(&mut side.backends, key, self.backends);
    }
}

fn find<V: Clone>(list: &[(VipPort, V)], key: VipPort) -> Option<V> {
    list.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone())
}

fn set<V>(m: &mut BTreeMap<VipPort, V>, key: VipPort, v: Option<V>) {
    match v {
        Some(v) => {
            m.insert(key, v);
        }
        None => {
            m.remove(&key);
        }
    }
}

fn set_in(m: &mut BTreeSet<VipPort>, key: VipPort, present: bool) {
    if present {
        m.insert(key);
    } else {
        m.remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::sync::Arc;

    use proptest::prelude::*;
    use rune_statemachine::spec::{EgressRule, IngressRule, NetworkPolicy, Peer, PortRef, PortSpec};

    use super::*;
    use crate::nft::{delta, delta_patch, encode};
    use crate::policy::compile;
    use crate::table::Ep;

    const RANGE: (u16, u16) = (20_000, 21_999);

    /// A service of namespace `ns` numbered `i`, as a random view holds it.
    #[derive(Debug, Clone)]
    struct Gen {
        ns: u8,
        ports: u8,
        mode: u8,
        endpoints: Vec<(u8, bool)>,
        ingress: Option<Vec<(u8, u8)>>,
        egress: Option<Vec<(u8, u8)>>,
        served: bool,
        /// Whether it has its VIP (a VIP coming and going moves in and out of networks).
        vip: bool,
    }

    fn peer(kind: u8, n: u8) -> Peer {
        match kind % 4 {
            0 => Peer {
                service: Some(format!("s{}", n % 12)),
                ..Default::default()
            },
            1 => Peer {
                namespace: Some(format!("n{}", n % 2)),
                ..Default::default()
            },
            2 => Peer {
                cidr: Some(format!("192.168.{}.0/{}", n % 4, 16 + n % 9)),
                ..Default::default()
            },
            // Networks holding VIPs or containers, where egress port names resolve.
            _ => Peer {
                cidr: Some(match n % 3 {
                    0 => format!("10.96.0.{}/32", 2 + n % 10),
                    1 => "0.0.0.0/0".into(),
                    _ => format!("172.17.0.{}/30", 4 * (n % 6)),
                }),
                ..Default::default()
            },
        }
    }

    fn svc(i: usize, g: &Gen) -> (SvcKey, Arc<Svc>, Vec<u16>) {
        let ns = format!("n{}", g.ns % 2);
        let key = SvcKey::new(&ns, &format!("s{i}"));
        let ports: Vec<PortSpec> = (0..g.ports % 3)
            .map(|p| PortSpec {
                name: if p == 0 { "http".into() } else { format!("p{p}") },
                // The two sharing a VIP serve different ports of it.
                port: 80 + 5 * (i / 10) as i64 + i64::from(p),
                // `p1` has no target: its instances listen on the service port.
                target_port: (p != 1).then(|| 8080 + i64::from(p)),
                protocol: None,
                host_port: None,
            })
            .collect();
        // Two services may list one container address (a stale record beside a live one).
        let addr = |e: u8| IpAddr::V4(Ipv4Addr::new(172, 17, 0, 2 + (e % 20)));
        let rules = |list: &Option<Vec<(u8, u8)>>| {
            list.as_ref()
                .map(|l| l.iter().map(|(k, n)| peer(*k, *n)).collect::<Vec<_>>())
        };
        let np = NetworkPolicy {
            ingress: rules(&g.ingress)
                .map(|from| {
                    vec![IngressRule {
                        from,
                        ports: vec![PortRef::Name("http".into())],
                    }]
                })
                .unwrap_or_default(),
            // Egress ports: none, a name resolved against each destination's ports, or a
            // number (81: some services' `p1`, without a target).
            egress: rules(&g.egress)
                .map(|to| {
                    let ports = match (g.ports + g.mode) % 4 {
                        0 => vec![],
                        1 => vec![PortRef::Name("http".into())],
                        2 => vec![PortRef::Number(81)],
                        _ => vec![PortRef::Name("http".into()), PortRef::Number(81)],
                    };
                    vec![EgressRule { to, ports }]
                })
                .unwrap_or_default(),
        };
        let s = Svc {
            key: key.clone(),
            // Services 0 and 10, and 1 and 11, share a VIP (two records naming one).
            vip: g.vip.then(|| Ipv4Addr::new(10, 96, 0, 2 + (i % 10) as u8)),
            mode: [Mode::RoundRobin, Mode::LeastConnections, Mode::None][usize::from(g.mode % 3)],
            ports: ports.clone(),
            policy: compile(&ns, Some(&np)),
            endpoints: g
                .endpoints
                .iter()
                .enumerate()
                .map(|(n, (e, here))| Ep {
                    instance: format!("s{i}-{n}"),
                    ip: addr(*e),
                    targets: ports
                        .iter()
                        .map(|p| (p.port as u16, p.target_port.unwrap_or(p.port) as u16))
                        .collect(),
                    via: None,
                    here: *here,
                })
                .collect(),
            local_ips: g
                .endpoints
                .iter()
                .filter(|(_, here)| *here)
                .map(|(e, _)| addr(*e))
                .collect(),
            local_instances: g.endpoints.len(),
            // Now and then its first container still runs a spec whose `http` listened
            // elsewhere (a rollout moving the target port).
            moved: g
                .endpoints
                .iter()
                .find(|(_, here)| *here && g.mode == 2)
                .zip(ports.first())
                .map(|((e, _), p)| vec![(addr(*e), vec![(p.port as u16, 9080)])])
                .unwrap_or_default(),
        };
        let served = if g.served {
            ports.iter().map(|p| p.port as u16).collect()
        } else {
            Vec::new()
        };
        (key, Arc::new(s), served)
    }

    fn gen() -> impl Strategy<Value = Gen> {
        let rules = prop::option::of(prop::collection::vec((0u8..4, 0u8..24), 0..3));
        (
            0u8..2,
            0u8..3,
            0u8..3,
            prop::collection::vec((0u8..24, prop::bool::weighted(0.8)), 0..3),
            rules.clone(),
            rules,
            prop::bool::weighted(0.8),
            prop::bool::weighted(0.9),
        )
            .prop_map(|(ns, ports, mode, endpoints, ingress, egress, served, vip)| Gen {
                ns,
                ports,
                mode,
                endpoints,
                ingress,
                egress,
                served,
                vip,
            })
    }

    /// A view, its proxy ports, and a process of service 0 when `pgid` (then an egress
    /// policy of service 0 keeps this host's traffic in the proxy).
    fn view(services: &[Option<Gen>], pgid: bool) -> (Table, BTreeMap<(SvcKey, u16), u16>) {
        let mut t = Table::default();
        let mut ports = BTreeMap::new();
        for (i, g) in services.iter().enumerate() {
            let Some(g) = g else { continue };
            let (k, s, served) = svc(i, g);
            for (n, p) in served.into_iter().enumerate() {
                ports.insert((k.clone(), p), 20_000 + (i * 4 + n) as u16);
            }
            t.services.insert(k, s);
        }
        t.any_egress = t.services.values().any(|s| s.policy.egress.is_some());
        if pgid {
            if let Some(k) = t.services.keys().find(|k| k.name == "s0") {
                t.by_pgid.insert(4242, k.clone());
            }
        }
        (t, ports)
    }

    /// While a rollout moves a `targetPort`, policy opens each local instance where its own
    /// run listens: an instance not yet replaced on the old port, a new one on the new. Fed
    /// from the records as the projection feeds it, and kept per change.
    #[test]
    fn policy_opens_each_instance_where_its_run_listens() {
        use rune_statemachine::delta::Delta;
        use rune_statemachine::instance::{InstanceRecord, Phase};
        use rune_statemachine::network::EndpointPort;
        use rune_statemachine::store::ServiceRecord;

        let service = |name: &str, vip: &str, spec: serde_json::Value| Delta::Service {
            namespace: "default".into(),
            name: name.into(),
            record: Some(Arc::new(ServiceRecord {
                spec: serde_json::from_value(spec).unwrap(),
                meta: Default::default(),
                vip: Some(vip.into()),
            })),
        };
        let instance = |svc: &str, id: &str, address: &str, target: Option<u16>| Delta::Instance {
            namespace: "default".into(),
            service: svc.into(),
            id: id.into(),
            record: Some(Arc::new(InstanceRecord {
                id: id.into(),
                namespace: "default".into(),
                service: svc.into(),
                node: "n1".into(),
                runtime: "container".into(),
                phase: Phase::Running,
                ready: true,
                address: address.into(),
                ports: target
                    .map(|t| {
                        vec![EndpointPort {
                            name: "http".into(),
                            port: 80,
                            target_port: t,
                            protocol: "tcp".into(),
                        }]
                    })
                    .unwrap_or_default(),
                ..Default::default()
            })),
        };
        let web = service(
            "web",
            "10.96.0.2",
            serde_json::json!({"name": "web", "image": "web:2",
                "ports": [{"name": "http", "port": 80, "targetPort": 9090}],
                "networkPolicy": {"ingress": [{"from": [{"service": "client"}, {"cidr": "192.168.0.0/16"}], "ports": ["http"]}]}}),
        );
        let client = service(
            "client",
            "10.96.0.3",
            serde_json::json!({"name": "client", "image": "client",
                "networkPolicy": {"egress": [{"to": [{"service": "web"}], "ports": ["http"]}]}}),
        );
        let (old, new, c) = (
            Ipv4Addr::new(172, 17, 0, 2),
            Ipv4Addr::new(172, 17, 0, 3),
            Ipv4Addr::new(172, 17, 0, 9),
        );
        let mut state = vec![
            web,
            client,
            instance("web", "web-0", "172.17.0.2", Some(8080)),
            instance("web", "web-1", "172.17.0.3", Some(9090)),
            // A run reported before runs recorded their ports: the spec's.
            instance("client", "client-0", "172.17.0.9", None),
        ];
        let ports = BTreeMap::new();
        let t = Table::build("n1", &state);
        let mut live = Live::build(&t, &ports, RANGE);
        let m = live.model();
        let net = |ip: Ipv4Addr, port| m.ingress.net_port.iter().any(|(g, _, p)| *g == ip && *p == port);
        for (ip, port, open) in [
            (old, 8080, true),
            (old, 9090, false),
            (new, 9090, true),
            (new, 8080, false),
        ] {
            assert_eq!(
                m.ingress.port.contains(&(ip, c, port)),
                open,
                "ingress {ip}:{port} from the client"
            );
            assert_eq!(
                m.egress.port.contains(&(c, ip, port)),
                open,
                "egress to {ip}:{port}"
            );
            assert_eq!(net(ip, port), open, "ingress {ip}:{port} from 192.168.0.0/16");
        }

        // web-0 replaced: a run of the new spec at the same address.
        state[2] = instance("web", "web-0", "172.17.0.2", Some(9090));
        let t = Table::build("n1", &state);
        let changed = BTreeSet::from([SvcKey::new("default", "web")]);
        live.update(&t, Some(&changed), &ports);
        let m = live.model();
        assert!(m.ingress.port.contains(&(old, c, 9090)) && !m.ingress.port.contains(&(old, c, 8080)));
        assert!(m.egress.port.contains(&(c, old, 9090)) && !m.egress.port.contains(&(c, old, 8080)));
        assert_eq!(m, &Model::of(&t, &ports, RANGE));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Kept change by change, the model is the one built afresh from the same view, and
        /// the patch's commands are the ones the whole models' difference gives.
        #[test]
        fn a_model_kept_per_change_equals_one_built_whole(
            first in prop::collection::vec(prop::option::of(gen()), 12),
            changes in prop::collection::vec((0usize..12, prop::option::of(gen()), prop::bool::ANY, prop::bool::weighted(0.1)), 1..12),
            second in prop::collection::vec(prop::option::of((0usize..12, prop::option::of(gen()))), 12),
        ) {
            let mut services = first;
            let (t, ports) = view(&services, false);
            let mut live = Live::build(&t, &ports, RANGE);
            prop_assert_eq!(live.model(), &Model::of(&t, &ports, RANGE));
            let mut old = live.model().clone();
            let vips_of = |t: &Table| -> BTreeSet<Ipv4Addr> { t.services.values().filter_map(|s| s.vip).collect() };
            // What the data plane tells the DNS it carries, kept by the patches.
            let mut carried = vips_of(&t);
            let mut pgid = false;
            for ((i, g, flip, all), also) in changes.into_iter().zip(second) {
                services[i] = g;
                let mut changed = BTreeSet::new();
                // Now and then two services change in one update (one naming the other).
                for i in std::iter::once(i).chain(also.as_ref().map(|(j, _)| *j)) {
                    changed.insert(SvcKey::new("n0", &format!("s{i}")));
                    changed.insert(SvcKey::new("n1", &format!("s{i}")));
                }
                if let Some((j, g)) = also {
                    services[j] = g;
                }
                pgid ^= flip && i % 3 == 0;
                let (t, ports) = view(&services, pgid);
                // Now and then the view is rebuilt whole, as after a lagged log.
                let patch = live.update(&t, (!all).then_some(&changed), &ports);
                let whole = Model::of(&t, &ports, RANGE);
                prop_assert_eq!(live.model(), &whole);
                // The counts behind the model too: a count left behind on an element another
                // share also adds would show in the model only once that one goes.
                let fresh = Live::build(&t, &ports, RANGE);
                for d in 0..2 {
                    let (a, b) = (&live.allowed[d], &fresh.allowed[d]);
                    prop_assert_eq!(&a.port.n, &b.port.n);
                    prop_assert_eq!(&a.any.n, &b.any.n);
                    prop_assert_eq!(&a.net_port.n, &b.net_port.n);
                    prop_assert_eq!(&a.net_any.n, &b.net_any.n);
                }
                prop_assert_eq!(&live.links, &fresh.links);
                agree(&t, live.model())?;
                prop_assert_eq!(
                    encode(delta_patch("t", &patch)).ok(),
                    encode(delta("t", &old, &whole)).ok()
                );
                prop_assert_eq!(patch.is_empty(), delta("t", &old, &whole).is_empty());
                prop_assert_eq!(&patch.undo(&whole), &old);
                for v in &patch.vips.0 {
                    carried.remove(v);
                }
                carried.extend(&patch.vips.1);
                prop_assert_eq!(&carried, &vips_of(&t));
                old = whole;
            }
        }
    }

    /// Whether the kernel's sets let `peer` reach `guarded` on `port` (ingress), or
    /// `guarded` reach `peer` (egress).
    fn allows(a: &Allowed, guarded: Ipv4Addr, peer: Ipv4Addr, port: u16) -> bool {
        let within = |(net, len): PeerNet| {
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(peer) & m == u32::from(net)
        };
        a.port.contains(&(guarded, peer, port))
            || a.any.contains(&(guarded, peer))
            || a.net_port
                .iter()
                .any(|(g, n, p)| *g == guarded && *p == port && within(*n))
            || a.net_any.iter().any(|(g, n)| *g == guarded && within(*n))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// For every flow from a local container to a VIP's port, the kernel's policy sets
        /// decide as the proxy's `decide` does, in both directions: a flow the kernel meets
        /// first (before NAT) cannot be refused there and allowed by `rune policy explain`.
        #[test]
        fn the_kernel_and_the_proxy_decide_a_vip_flow_alike(
            services in prop::collection::vec(prop::option::of(gen()), 12),
        ) {
            let (t, ports) = view(&services, false);
            agree(&t, &Model::of(&t, &ports, RANGE))?;
        }
    }

    /// Whether model `m` of view `t` lets every flow from a local container to a VIP's port
    /// pass as `decide` does (see the test below).
    fn agree(t: &Table, m: &Model) -> Result<(), TestCaseError> {
        {
            // Addresses two records share (a stale record beside a live one) are the
            // kernel's union of both, which `decide` does not speak of.
            let mut vips: HashMap<Ipv4Addr, usize> = HashMap::default();
            let mut ips: HashMap<Ipv4Addr, usize> = HashMap::default();
            for s in t.services.values() {
                if let Some(v) = s.vip {
                    *vips.entry(v).or_default() += 1;
                }
                for ip in s.local_ips.iter().filter_map(v4) {
                    *ips.entry(ip).or_default() += 1;
                }
            }
            for src in t.services.values() {
                for g in src.local_ips.iter().filter_map(v4).filter(|ip| ips[ip] == 1) {
                    for to in t.services.values() {
                        let Some(vip) = to.vip.filter(|v| vips[v] == 1) else {
                            continue;
                        };
                        let target = crate::policy::Target {
                            key: &to.key,
                            vip: to.vip,
                            ports: &to.ports,
                            policy: &to.policy,
                        };
                        let from = crate::policy::Source {
                            service: Some(src.key.clone()),
                            ip: IpAddr::V4(g),
                        };
                        for (_, port) in to.tcp_ports() {
                            let d = crate::policy::decide(&from, Some(&src.policy), &target, port);
                            // By direction, where a policy holds: the kernel's sets, and the verdict.
                            let sides = [
                                (
                                    src.policy.egress.is_some(),
                                    allows(&m.egress, g, vip, port),
                                    &d.egress,
                                ),
                                (
                                    to.policy.ingress.is_some(),
                                    allows(&m.ingress, vip, g, port),
                                    &d.ingress,
                                ),
                            ];
                            for (direction, (held, kernel, v)) in DIRECTIONS.iter().rev().zip(sides) {
                                if held {
                                    prop_assert_eq!(
                                        kernel,
                                        v.allowed,
                                        "{} {} -> {} port {}: {}",
                                        direction,
                                        src.key,
                                        to.key,
                                        port,
                                        v.because
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Two services listing one container address: whichever came first, the greatest key
    /// names its drops, so the name does not flip with the order of changes (which would
    /// reset its counter for nothing); when it goes, the other one does.
    #[test]
    fn a_shared_container_address_is_named_by_the_greatest_key_in_any_order() {
        let g = Gen {
            ns: 0,
            ports: 1,
            mode: 0,
            endpoints: vec![(3, true)],
            ingress: None,
            egress: Some(vec![(2, 0)]),
            served: true,
            vip: true,
        };
        let at = Ipv4Addr::new(172, 17, 0, 5);
        let (a, b) = (SvcKey::new("n0", "s0"), SvcKey::new("n0", "s1"));
        for order in [[0, 1], [1, 0]] {
            let mut services = vec![None, None];
            let (t, ports) = view(&services, false);
            let mut live = Live::build(&t, &ports, RANGE);
            for i in order {
                services[i] = Some(g.clone());
                let (t, ports) = view(&services, false);
                live.update(&t, Some(&BTreeSet::from([a.clone(), b.clone()])), &ports);
            }
            assert_eq!(
                live.model().egress_from.get(&at),
                Some(&counter_name(&b, "egress"))
            );
            services[1] = None;
            let (t, ports) = view(&services, false);
            let p = live.update(&t, Some(&BTreeSet::from([b.clone()])), &ports);
            assert_eq!(
                live.model().egress_from.get(&at),
                Some(&counter_name(&a, "egress"))
            );
            assert_eq!(p.before.egress_from.get(&at), Some(&counter_name(&b, "egress")));
            assert_eq!(p.after.egress_from.get(&at), Some(&counter_name(&a, "egress")));
        }
    }
}
