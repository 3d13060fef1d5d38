//! The kernel half of the data plane: one nftables table of runed's own (`inet rune` unless
//! configured otherwise), built as the `nftables` crate's typed schema and loaded as its JSON
//! through libnftables, kept open ([`Nft`]). Nothing else in the ruleset is read or touched.
//!
//! The table's contents are a [`Model`] of set and map elements over a fixed set of chains, so
//! that every change is elements added and deleted in one transaction, the kernel never holds
//! half a policy, and the table's objects do not grow with the number of services
//! (libnftables reads every chain and object of a table before each change; one chain and
//! counter per policy made a change cost ~4 ms at 1,000 services, and a full load with a
//! rule per peer and port 330 ms). [`full`] loads a model whole (at start, and to recover
//! from a failed change); [`delta`] turns one model into the next.
//!
//! - `nat_prerouting`/`nat_output` first look `VIP:port` up in the verdict maps `fast_pre` /
//!   `fast_out`: a port whose endpoints all run on this node is forwarded by the kernel itself,
//!   DNAT to one of them picked at random (`lb_N` → `ep_i`, see [`Model::fast_pre`]), and
//!   `nat_postrouting` masquerades what was forwarded so the answer comes back through here.
//!   Every other port is redirected to the proxy's port for it (from containers and other
//!   hosts, and from this host), through the map `vip_ports`, keyed by VIP and port as
//!   kube-proxy's nftables mode keys it.
//! - `filter_prerouting` (before NAT) rejects VIP ports without ready endpoints (set `refused`)
//!   with a TCP reset, then sends traffic from an address an egress policy holds (set
//!   `eg_guarded`) through chain `egress`, and traffic to an address an ingress policy guards
//!   (its VIP or containers, `in_guarded`) through chain `ingress`. Established flows pass
//!   first, so a policy change never cuts a connection it allowed.
//! - A policy is elements of sets per direction, keyed by the guarded address and the peer
//!   (the other end): `in_allow` (`guarded . peer . TCP port`), `in_any` (every port), and
//!   per prefix length L of peer networks `in_netL` / `in_netL_any`, looked up with the peer
//!   masked (`ip saddr & mask`). Ingress that matches is accepted; egress that matches
//!   returns, so ingress still follows.
//! - What matches nothing goes to `in_deny` / `eg_deny`, which count the packet in the dynamic
//!   sets `in_drops` (by destination) / `eg_drops` (by source) and drop it: these are the
//!   kernel drops, told apart by policy through the address. A full set stops only the
//!   counting (its rule breaks; the `drop` is a rule of its own).
//!   Host processes share the host's address and cannot be told apart here; their flows reach
//!   the proxy, which names them by socket and applies the same decision.
//! - `input` drops packets to the proxy ports that did not come through the redirect, so the
//!   VIP stays the only way in from outside.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr};

use nftables::expr::{
    BinaryOperation, CTDir, Expression, Fib, FibFlag, FibResult, Map as MapExpr, Meta, MetaKey,
    NamedExpression, NgMode, Numgen, Payload, PayloadField, Range, SetItem, Verdict, CT,
};
use nftables::schema::{
    Chain, Element, FlushObject, Map, NfCmd, NfListObject, NfObject, Rule, Set, SetType, SetTypeValue,
    Table as NfTable,
};
use nftables::stmt::{
    JumpTarget, Match, NATFamily, Operator, Reject, RejectType, Set as SetStmt, SetOp, Statement, VerdictMap,
    NAT,
};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use rune_statemachine::spec::PortSpec;

pub use crate::libnft::Nft;

use crate::live::Patch;
use crate::policy::SvcKey;
use crate::table::{Mode, Svc, Table};

/// Why the kernel cannot be programmed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// libnftables (Debian's nftables) is not installed.
    #[error("nftables is missing (install Debian's nftables); policy is enforced in the proxy only")]
    Missing,
    /// No CAP_NET_ADMIN, or the table is another program's (`flags owner`): the kernel says
    /// EPERM for both.
    #[error(
        "no permission to program nftables (runed needs CAP_NET_ADMIN, and its table must not be owned by another program); policy is enforced in the proxy only"
    )]
    Privilege,
    /// nft refused the program.
    #[error("nft refused the program: {0}")]
    Refused(String),
    /// Starting or talking to libnftables failed.
    #[error("cannot run nftables: {0}")]
    Io(#[from] std::io::Error),
}

/// A service's policy in one direction; its drops are counted under its name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct CounterKey {
    /// The service.
    pub service: SvcKey,
    /// `ingress` or `egress`.
    pub direction: &'static str,
}

/// The name a service's policy direction is counted under. Namespaces and names are DNS
/// labels, which cannot hold `_`, so the name is unambiguous.
pub fn counter_name(k: &SvcKey, direction: &str) -> String {
    let d = if direction == "ingress" { "in" } else { "eg" };
    format!("{d}_{}_{}", k.ns, k.name)
}

/// A peer network: its address (masked) and prefix length, shorter than 32.
pub type PeerNet = (Ipv4Addr, u8);

/// The flows one direction allows, as the elements of its sets. The guarded address is the
/// one the policy belongs to (the destination of ingress, the source of egress); the peer is
/// the other end. Ports are TCP ports; a rule without ports allows every protocol. Peer
/// networks go in one exact set per prefix length, looked up with the peer address masked:
/// an interval set costs libnftables a listing of all its elements on every change (10 ms at
/// 6,000), and the kernel refuses overlapping intervals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowed {
    /// `guarded . peer . port`.
    pub port: BTreeSet<(Ipv4Addr, Ipv4Addr, u16)>,
    /// `guarded . peer`, every port.
    pub any: BTreeSet<(Ipv4Addr, Ipv4Addr)>,
    /// `guarded . peer network . port`.
    pub net_port: BTreeSet<(Ipv4Addr, PeerNet, u16)>,
    /// `guarded . peer network`, every port.
    pub net_any: BTreeSet<(Ipv4Addr, PeerNet)>,
}

impl Allowed {
    /// Allows `peers` (addresses or networks) to or from `guarded` on `ports` (`None`: every
    /// port; empty: none). IPv6 peers are left out: the table sees IPv4 traffic only.
    pub(crate) fn allow(&mut self, guarded: Ipv4Addr, peers: &[String], ports: &Option<Vec<u16>>) {
        if ports.as_ref().is_some_and(Vec::is_empty) {
            return;
        }
        for peer in peers {
            let (addr, len) = match peer.split_once('/') {
                Some((a, l)) => (a, l.parse::<u8>().ok()),
                None => (peer.as_str(), Some(32)),
            };
            let (Ok(addr), Some(len @ 0..=32)) = (addr.parse::<Ipv4Addr>(), len) else {
                continue;
            };
            if len == 32 {
                match ports {
                    None => {
                        self.any.insert((guarded, addr));
                    }
                    Some(ps) => self.port.extend(ps.iter().map(|p| (guarded, addr, *p))),
                }
                continue;
            }
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            let net = (Ipv4Addr::from(u32::from(addr) & mask), len);
            match ports {
                None => {
                    self.net_any.insert((guarded, net));
                }
                Some(ps) => self.net_port.extend(ps.iter().map(|p| (guarded, net, *p))),
            }
        }
    }

    /// The prefix lengths of the peer networks allowed: one pair of sets (and rules) each.
    fn lengths(&self) -> BTreeSet<u8> {
        self.net_port
            .iter()
            .map(|(_, n, _)| n.1)
            .chain(self.net_any.iter().map(|(_, n)| n.1))
            .collect()
    }

    /// The elements of this direction's sets, by set: `d` is the direction's short name.
    fn elements(&self, d: &str) -> BTreeMap<String, Vec<Expression<'static>>> {
        self.minus(&Allowed::default(), d)
    }

    /// The elements in `self` and not in `other`, by set.
    fn minus(&self, other: &Allowed, d: &str) -> BTreeMap<String, Vec<Expression<'static>>> {
        let mut out: BTreeMap<String, Vec<Expression<'static>>> = BTreeMap::new();
        for e in self.port.difference(&other.port) {
            out.entry(format!("{d}_allow")).or_default().push(port_elem(e));
        }
        for e in self.any.difference(&other.any) {
            out.entry(format!("{d}_any")).or_default().push(any_elem(e));
        }
        for e in self.net_port.difference(&other.net_port) {
            out.entry(net_set(d, e.1 .1, true))
                .or_default()
                .push(net_port_elem(e));
        }
        for e in self.net_any.difference(&other.net_any) {
            out.entry(net_set(d, e.1 .1, false))
                .or_default()
                .push(net_any_elem(e));
        }
        out
    }
}

/// Whether `set` is one of the peer-network sets of prefix length `len`.
fn set_is_of(set: &str, d: &str, len: u8) -> bool {
    set == net_set(d, len, true) || set == net_set(d, len, false)
}

/// The set of peer networks of prefix length `len`, with a TCP port or without.
fn net_set(d: &str, len: u8, port: bool) -> String {
    if port {
        format!("{d}_net{len}")
    } else {
        format!("{d}_net{len}_any")
    }
}

fn ip_elem(a: &Ipv4Addr) -> Expression<'static> {
    s(&a.to_string())
}

fn port_elem((g, p, n): &(Ipv4Addr, Ipv4Addr, u16)) -> Expression<'static> {
    concat(vec![ip_elem(g), ip_elem(p), Expression::Number(u32::from(*n))])
}

fn any_elem((g, p): &(Ipv4Addr, Ipv4Addr)) -> Expression<'static> {
    concat(vec![ip_elem(g), ip_elem(p)])
}

fn net_port_elem((g, n, p): &(Ipv4Addr, PeerNet, u16)) -> Expression<'static> {
    concat(vec![ip_elem(g), ip_elem(&n.0), Expression::Number(u32::from(*p))])
}

fn net_any_elem((g, n): &(Ipv4Addr, PeerNet)) -> Expression<'static> {
    concat(vec![ip_elem(g), ip_elem(&n.0)])
}

/// What runed's table should hold, keyed so that two models can be diffed element by element.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    /// `VIP . port → proxy port`, for service ports with ready endpoints.
    pub vip_ports: BTreeMap<(Ipv4Addr, u16), u16>,
    /// `VIP . port` with nothing behind it: reset at once.
    pub refused: BTreeSet<(Ipv4Addr, u16)>,
    /// A local container's address → the egress policy it is held to (set `eg_guarded`).
    pub egress_from: BTreeMap<Ipv4Addr, String>,
    /// A VIP or local container address → the ingress policy it is guarded by (`in_guarded`).
    pub ingress_to: BTreeMap<Ipv4Addr, String>,
    /// Policies by the name their drops are counted under.
    pub policies: BTreeMap<String, CounterKey>,
    /// What ingress policies allow.
    pub ingress: Allowed,
    /// What egress policies allow (besides the node's DNS).
    pub egress: Allowed,
    /// The proxy's port range, shielded by `input`.
    pub range: (u16, u16),
    /// `VIP . port` the kernel forwards itself for traffic from this node's containers (DNAT
    /// to an endpoint; the bytes cross the TCP stack once instead of twice) → how many
    /// endpoints it spreads over (chain `lb_N`).
    pub fast_pre: BTreeMap<(Ipv4Addr, u16), usize>,
    /// The same for this host's own traffic.
    pub fast_out: BTreeMap<(Ipv4Addr, u16), usize>,
    /// The endpoints of each kernel-forwarded `VIP . port`: the `i`-th is element `VIP . port`
    /// of the maps `ep_i_addr` and `ep_i_port`.
    pub backends: BTreeMap<(Ipv4Addr, u16), Vec<(Ipv4Addr, u16)>>,
    /// This node's containers (set `fast_sources`), whenever `fast_pre` holds anything: only
    /// their connections are forwarded by `fast_pre`. Traffic from other hosts keeps going
    /// through the proxy: a container engine's own forward rules (Docker's drop what enters
    /// its bridge from elsewhere) may refuse it on its way to a container.
    pub fast_sources: BTreeSet<Ipv4Addr>,
}

/// The most endpoints the kernel spreads a `VIP . port` over; beyond, the proxy carries it.
/// The `lb_N` and `ep_i` chains and maps are made for all of them at every full load, so that
/// a change is only ever elements (a few dozen objects, whatever the number of services).
pub const FAST_MAX: usize = 16;

/// Where the kernel can send `svc`'s port `port` itself: every ready endpoint runs on this
/// node (another node's address means something only there), balanced round robin (the
/// kernel picks at random; fewest-connections needs the proxy's counts), at most
/// [`FAST_MAX`] of them. Sorted, so equal views give equal models.
pub(crate) fn kernel_backends(svc: &crate::table::Svc, port: u16) -> Option<Vec<(Ipv4Addr, u16)>> {
    if svc.mode != Mode::RoundRobin || svc.endpoints.len() > FAST_MAX {
        return None;
    }
    let mut out = Vec::new();
    for e in &svc.endpoints {
        if !e.here || e.via.is_some() {
            return None;
        }
        if let Some(target) = e.target(port) {
            out.push((v4(&e.ip)?, target));
        }
    }
    out.sort_unstable();
    out.dedup();
    (!out.is_empty()).then_some(out)
}

impl Model {
    /// What the table should hold for this view and these proxy ports.
    pub fn of(t: &Table, proxy_ports: &BTreeMap<(SvcKey, u16), u16>, range: (u16, u16)) -> Model {
        // One way to build it: the same shares the data plane keeps per change.
        crate::live::Live::build(t, proxy_ports, range).into_model()
    }

    /// This model with every `VIP . port` left to the proxy: while the view is stale the
    /// proxy refuses new connections, and the kernel must not carry them on its own.
    pub fn proxied(mut self) -> Model {
        self.fast_pre.clear();
        self.fast_out.clear();
        self.backends.clear();
        self.fast_sources.clear();
        self
    }

    /// The VIPs whose forwarded connections the kernel masquerades (`fast_vips`): an
    /// endpoint must answer through this node, where the NAT is undone, not straight to a
    /// neighbour on its bridge, or to itself.
    fn fast_vips(&self) -> BTreeSet<Ipv4Addr> {
        self.fast_pre.keys().map(|(vip, _)| *vip).collect()
    }

    /// The policies the model holds, for reporting the kernel's drops.
    pub fn counters(&self) -> Vec<CounterKey> {
        self.policies.values().cloned().collect()
    }

    /// The policy whose drops a counted address belongs to: by destination for ingress, by
    /// source for egress.
    pub fn policy_of(&self, direction: &str, ip: Ipv4Addr) -> Option<&String> {
        match direction {
            "ingress" => self.ingress_to.get(&ip),
            _ => self.egress_from.get(&ip),
        }
    }

    /// Drops read by address, summed by policy.
    pub fn tally(&self, read: &Drops) -> BTreeMap<String, u64> {
        let mut out: BTreeMap<String, u64> = BTreeMap::new();
        for ((direction, ip), n) in read {
            if let Some(policy) = self.policy_of(direction, *ip) {
                *out.entry(policy.clone()).or_default() += n;
            }
        }
        out
    }

    /// Addresses whose drop count `new` no longer keeps under the same policy: `delta` deletes
    /// their entries, so what they counted must be carried by whoever reports it.
    pub fn leaving(&self, new: &Model) -> Vec<(&'static str, Ipv4Addr, String)> {
        let mut out = Vec::new();
        for (direction, old, now) in [
            ("ingress", &self.ingress_to, &new.ingress_to),
            ("egress", &self.egress_from, &new.egress_from),
        ] {
            for (ip, policy) in old {
                if now.get(ip) != Some(policy) {
                    out.push((direction, *ip, policy.clone()));
                }
            }
        }
        out
    }
}

/// Kernel drops by direction (`ingress`/`egress`) and counted address.
pub type Drops = BTreeMap<(&'static str, Ipv4Addr), u64>;

/// A direction's short name: its chain, sets and deny chain are named after it.
fn short(direction: &str) -> &'static str {
    if direction == "ingress" {
        "in"
    } else {
        "eg"
    }
}

/// The set a direction's drops are counted in, by address.
fn drop_set(direction: &str) -> &'static str {
    if direction == "ingress" {
        "in_drops"
    } else {
        "eg_drops"
    }
}

/// How many addresses each drop set counts; past it, drops are still dropped but not counted.
const DROP_SET_SIZE: u32 = 65_536;

/// Where a service's instances listen for these of its TCP ports (their `targetPort`); a
/// number that names none of them stands for itself. A rule's ports are the service ports at
/// the VIP, where the kernel meets a flow before NAT, and these at the instances' addresses.
pub(crate) fn instance_ports(ports: &[PortSpec], at_vip: &[u16]) -> Vec<u16> {
    resolve_targets(at_vip, |x| {
        ports
            .iter()
            .filter(|p| p.is_tcp() && p.port == i64::from(x))
            .map(|p| p.target_port.and_then(|t| u16::try_from(t).ok()).unwrap_or(x))
            .collect()
    })
}

/// Where instance `ip` of `svc` listens for the service ports `at_vip` (`None`: all), if its
/// run's spec put one elsewhere than the spec does now ([`Svc::moved`]); `None` when it
/// listens where the spec says ([`instance_ports`] then holds for it).
pub(crate) fn moved_ports(svc: &Svc, ip: Ipv4Addr, at_vip: &Option<Vec<u16>>) -> Option<Option<Vec<u16>>> {
    let (_, targets) = svc.moved.iter().find(|(a, _)| *a == IpAddr::V4(ip))?;
    Some(at_vip.as_ref().map(|v| {
        resolve_targets(v, |x| {
            targets.iter().filter(|(p, _)| *p == x).map(|(_, t)| *t).collect()
        })
    }))
}

/// `at_vip`'s ports, each as the ports `targets` gives for it (itself when none), sorted.
fn resolve_targets(at_vip: &[u16], targets: impl Fn(u16) -> Vec<u16>) -> Vec<u16> {
    let mut out: Vec<u16> = at_vip
        .iter()
        .flat_map(|x| {
            let named = targets(*x);
            if named.is_empty() {
                vec![*x]
            } else {
                named
            }
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

pub(crate) fn v4(ip: &IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(v) => Some(*v),
        IpAddr::V6(_) => None,
    }
}

fn s(text: &str) -> Expression<'static> {
    Expression::String(Cow::Owned(text.to_string()))
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
        protocol: protocol.into(),
        field: field.into(),
    })))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn ct(key: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: key.into(),
        family: None,
        dir: None,
    }))
}

fn set(items: Vec<Expression<'static>>) -> Expression<'static> {
    Expression::Named(NamedExpression::Set(
        items.into_iter().map(SetItem::Element).collect(),
    ))
}

fn eq(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

fn concat(items: Vec<Expression<'static>>) -> Expression<'static> {
    Expression::Named(NamedExpression::Concat(items))
}

/// Commands that make the kernel's table exactly `m`, replacing whatever it held.
pub fn full(table: &str, m: &Model) -> Vec<NfObject<'static>> {
    let b = Build::new(table);
    let mut cmds = vec![
        // `add` then `delete` makes the delete safe when the table does not exist yet; the
        // whole batch is one transaction.
        add(NfListObject::Table(b.table())),
        NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(b.table()))),
        add(NfListObject::Table(b.table())),
        add(NfListObject::Map(Box::new(b.map(
            "vip_ports",
            concat_type(),
            SetType::InetService,
        )))),
        add(NfListObject::Set(Box::new(b.set("refused", concat_type())))),
    ];
    for direction in ["ingress", "egress"] {
        let d = short(direction);
        cmds.push(add(NfListObject::Set(Box::new(b.set(
            &format!("{d}_guarded"),
            SetTypeValue::Single(SetType::Ipv4Addr),
        )))));
        let allowed = if direction == "ingress" {
            &m.ingress
        } else {
            &m.egress
        };
        cmds.extend(b.allow_sets(d, None, Some(&allowed.lengths())));
        // The deny chain and its counting set (its counter is added in `encode`).
        let field = if direction == "ingress" { "daddr" } else { "saddr" };
        let set = drop_set(direction);
        cmds.push(add(NfListObject::Set(Box::new(Set {
            size: Some(DROP_SET_SIZE),
            ..b.set(set, SetTypeValue::Single(SetType::Ipv4Addr))
        }))));
        let deny = format!("{d}_deny");
        cmds.push(add(NfListObject::Chain(b.chain(&deny))));
        cmds.push(add(NfListObject::Rule(b.rule(
            &deny,
            vec![Statement::Set(SetStmt {
                op: SetOp::Update,
                elem: payload("ip", field),
                set: Cow::Owned(format!("@{set}")),
            })],
        ))));
        cmds.push(add(NfListObject::Rule(
            b.rule(&deny, vec![Statement::Drop(None)]),
        )));
        cmds.push(add(NfListObject::Chain(b.chain(direction))));
        for r in b.policy_rules(direction, &allowed.lengths()) {
            cmds.push(add(NfListObject::Rule(b.rule(direction, r))));
        }
    }
    cmds.extend(b.fast_objects());
    cmds.extend(b.base_chains(m.range));
    cmds.extend(b.elements(m, None));
    cmds
}

/// Commands that turn the kernel's table from `old` into `new`, touching only the elements
/// that differ, or nothing when they are equal: every removal first, then every addition. The
/// drop counts of addresses that
/// leave their policy ([`Model::leaving`]) are deleted, so a reused address starts from zero.
pub fn delta(table: &str, old: &Model, new: &Model) -> Vec<NfObject<'static>> {
    let lengths = [
        (old.ingress.lengths(), new.ingress.lengths()),
        (old.egress.lengths(), new.egress.lengths()),
    ];
    delta_in(table, old, new, &lengths)
}

/// Commands that carry out a [`Patch`] of the loaded table: [`delta`] over the touched
/// elements alone, with the prefix lengths of the whole table, so a change costs what it
/// touched, whatever the number of services.
pub fn delta_patch(table: &str, p: &Patch) -> Vec<NfObject<'static>> {
    delta_in(table, &p.before, &p.after, &p.lengths)
}

/// [`delta`], told each direction's prefix lengths (ingress, egress) before and after: the
/// models may hold only the elements that changed.
fn delta_in(
    table: &str,
    old: &Model,
    new: &Model,
    lengths: &[(BTreeSet<u8>, BTreeSet<u8>); 2],
) -> Vec<NfObject<'static>> {
    let b = Build::new(table);
    let mut cmds = Vec::new();
    let del = |o: NfListObject<'static>| NfObject::CmdObject(NfCmd::Delete(o));
    let gone_ports: Vec<_> = old
        .vip_ports
        .iter()
        .filter(|(k, v)| new.vip_ports.get(k) != Some(v))
        .map(|((vip, port), _)| vip_port(*vip, *port))
        .collect();
    if !gone_ports.is_empty() {
        cmds.push(del(b.element("vip_ports", gone_ports)));
    }
    let gone_refused: Vec<_> = old
        .refused
        .difference(&new.refused)
        .map(|(vip, port)| vip_port(*vip, *port))
        .collect();
    if !gone_refused.is_empty() {
        cmds.push(del(b.element("refused", gone_refused)));
    }
    for (name, o, n) in [
        ("fast_pre", &old.fast_pre, &new.fast_pre),
        ("fast_out", &old.fast_out, &new.fast_out),
    ] {
        let gone: Vec<_> = o
            .iter()
            .filter(|(k, v)| n.get(k) != Some(v))
            .map(|((vip, port), _)| vip_port(*vip, *port))
            .collect();
        if !gone.is_empty() {
            cmds.push(del(b.element(name, gone)));
        }
    }
    let mut gone_eps: BTreeMap<usize, Vec<Expression<'static>>> = BTreeMap::new();
    for ((vip, port), eps) in &old.backends {
        let now = new.backends.get(&(*vip, *port));
        for (i, ep) in eps.iter().enumerate() {
            if now.and_then(|n| n.get(i)) != Some(ep) {
                gone_eps.entry(i).or_default().push(vip_port(*vip, *port));
            }
        }
    }
    for (i, keys) in gone_eps {
        cmds.push(del(b.element(&format!("ep_{i}_addr"), keys.clone())));
        cmds.push(del(b.element(&format!("ep_{i}_port"), keys)));
    }
    for (set, gone) in [
        (
            "fast_vips",
            old.fast_vips()
                .difference(&new.fast_vips())
                .map(ip_elem)
                .collect::<Vec<_>>(),
        ),
        (
            "fast_sources",
            old.fast_sources
                .difference(&new.fast_sources)
                .map(ip_elem)
                .collect(),
        ),
    ] {
        if !gone.is_empty() {
            cmds.push(del(b.element(set, gone)));
        }
    }
    for (direction, o, n) in [
        ("ingress", &old.ingress_to, &new.ingress_to),
        ("egress", &old.egress_from, &new.egress_from),
    ] {
        let gone: Vec<_> = o
            .keys()
            .filter(|k| !n.contains_key(*k))
            .map(|ip| s(&ip.to_string()))
            .collect();
        if !gone.is_empty() {
            cmds.push(del(b.element(&format!("{}_guarded", short(direction)), gone)));
        }
    }
    let mut new_lengths = Vec::new();
    for (i, (direction, o, n)) in [
        ("ingress", &old.ingress, &new.ingress),
        ("egress", &old.egress, &new.egress),
    ]
    .into_iter()
    .enumerate()
    {
        let (was, now) = &lengths[i];
        if o == n && was == now {
            continue;
        }
        let d = short(direction);
        for (set, gone) in o.minus(n, d) {
            // The sets of a length no longer used are deleted whole below.
            if !set.starts_with(&format!("{d}_net")) || now.iter().any(|l| set_is_of(&set, d, *l)) {
                cmds.push(del(b.element(&set, gone)));
            }
        }
        if was != now {
            // The chain looks up one pair of sets per prefix length: emptied here, then the
            // sets of lengths no longer used are deleted and new ones made, and its rules
            // added again after.
            cmds.push(NfObject::CmdObject(NfCmd::Flush(FlushObject::Chain(
                b.chain(direction),
            ))));
            cmds.extend(b.allow_sets(d, Some(was), Some(now)));
            new_lengths.push((direction, now));
        }
    }
    for (direction, lengths) in new_lengths {
        for r in b.policy_rules(direction, lengths) {
            cmds.push(add(NfListObject::Rule(b.rule(direction, r))));
        }
    }
    if old.range != new.range {
        cmds.push(NfObject::CmdObject(NfCmd::Flush(FlushObject::Chain(
            b.chain("input"),
        ))));
        cmds.push(add(NfListObject::Rule(b.input_rule(new.range))));
    }
    let leaving = old.leaving(new);
    for direction in ["ingress", "egress"] {
        let ips: Vec<_> = leaving
            .iter()
            .filter(|(d, _, _)| *d == direction)
            .map(|(_, ip, _)| s(&ip.to_string()))
            .collect();
        if !ips.is_empty() {
            // Only addresses that dropped something are in the set, and deleting one that is
            // not fails the transaction: add first (a no-op when present), then delete.
            cmds.push(add(b.element(drop_set(direction), ips.clone())));
            cmds.push(del(b.element(drop_set(direction), ips)));
        }
    }
    cmds.extend(b.elements(new, Some(old)));
    cmds
}

fn concat_type() -> SetTypeValue<'static> {
    SetTypeValue::Concatenated(Cow::Owned(vec![SetType::Ipv4Addr, SetType::InetService]))
}

/// `ip daddr . tcp dport`: what the NAT maps are keyed by.
fn vip_port_key() -> Expression<'static> {
    concat(vec![payload("ip", "daddr"), payload("tcp", "dport")])
}

fn vip_port(vip: Ipv4Addr, port: u16) -> Expression<'static> {
    concat(vec![s(&vip.to_string()), Expression::Number(u32::from(port))])
}

fn add(o: NfListObject<'static>) -> NfObject<'static> {
    NfObject::CmdObject(NfCmd::Add(o))
}

/// Builds the objects of one table.
struct Build {
    table: String,
}

impl Build {
    fn new(table: &str) -> Self {
        Build {
            table: table.to_string(),
        }
    }

    fn t(&self) -> Cow<'static, str> {
        Cow::Owned(self.table.clone())
    }

    fn table(&self) -> NfTable<'static> {
        NfTable {
            family: NfFamily::INet,
            name: self.t(),
            handle: None,
        }
    }

    fn chain(&self, name: &str) -> Chain<'static> {
        Chain {
            family: NfFamily::INet,
            table: self.t(),
            name: Cow::Owned(name.to_string()),
            ..Chain::default()
        }
    }

    fn base_chain(&self, name: &str, kind: NfChainType, hook: NfHook, prio: i32) -> Chain<'static> {
        Chain {
            _type: Some(kind),
            hook: Some(hook),
            prio: Some(prio),
            policy: Some(NfChainPolicy::Accept),
            ..self.chain(name)
        }
    }

    fn set(&self, name: &str, key: SetTypeValue<'static>) -> Set<'static> {
        Set {
            family: NfFamily::INet,
            table: self.t(),
            name: Cow::Owned(name.to_string()),
            set_type: key,
            ..Set::default()
        }
    }

    fn map(&self, name: &str, key: SetTypeValue<'static>, value: SetType) -> Map<'static> {
        Map {
            family: NfFamily::INet,
            table: self.t(),
            name: Cow::Owned(name.to_string()),
            set_type: key,
            map: SetTypeValue::Single(value),
            ..Map::default()
        }
    }

    fn element(&self, set: &str, elem: Vec<Expression<'static>>) -> NfListObject<'static> {
        NfListObject::Element(Element {
            family: NfFamily::INet,
            table: self.t(),
            name: Cow::Owned(set.to_string()),
            elem: Cow::Owned(elem),
        })
    }

    fn rule(&self, chain: &str, expr: Vec<Statement<'static>>) -> Rule<'static> {
        Rule {
            family: NfFamily::INet,
            table: self.t(),
            chain: Cow::Owned(chain.to_string()),
            expr: Cow::Owned(expr),
            ..Rule::default()
        }
    }

    /// The rules of the `ingress` (or `egress`) chain: a flow in one of the direction's allow
    /// sets passes (ingress: accepted; egress: returns, so the ingress check still follows),
    /// and so does egress to the node's own DNS; anything else goes to the deny chain.
    fn policy_rules(&self, direction: &str, lengths: &BTreeSet<u8>) -> Vec<Vec<Statement<'static>>> {
        let d = short(direction);
        let (guarded, peer, verdict) = if direction == "ingress" {
            ("daddr", "saddr", Statement::Accept(None))
        } else {
            ("saddr", "daddr", Statement::Return(None))
        };
        let tcp = || eq(meta(MetaKey::L4proto), s("tcp"));
        let pair = || vec![payload("ip", guarded), payload("ip", peer)];
        let with_port = || {
            let mut k = pair();
            k.push(payload("tcp", "dport"));
            concat(k)
        };
        let mut out = vec![
            vec![tcp(), eq(with_port(), s(&format!("@{d}_allow"))), verdict.clone()],
            vec![eq(concat(pair()), s(&format!("@{d}_any"))), verdict.clone()],
        ];
        for len in lengths {
            let mask = Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(*len)).unwrap_or(0));
            let masked = || {
                vec![
                    payload("ip", guarded),
                    Expression::BinaryOperation(Box::new(BinaryOperation::AND(
                        payload("ip", peer),
                        s(&mask.to_string()),
                    ))),
                ]
            };
            let mut with_port = masked();
            with_port.push(payload("tcp", "dport"));
            out.push(vec![
                tcp(),
                eq(concat(with_port), s(&format!("@{}", net_set(d, *len, true)))),
                verdict.clone(),
            ]);
            out.push(vec![
                eq(concat(masked()), s(&format!("@{}", net_set(d, *len, false)))),
                verdict.clone(),
            ]);
        }
        if direction == "egress" {
            // The node's own DNS stays reachable: a default-deny egress must not break names.
            out.push(vec![
                eq(
                    Expression::Named(NamedExpression::Fib(Fib {
                        result: FibResult::Type,
                        flags: HashSet::from([FibFlag::Daddr]),
                    })),
                    s("local"),
                ),
                eq(meta(MetaKey::L4proto), set(vec![s("tcp"), s("udp")])),
                eq(payload("th", "dport"), Expression::Number(53)),
                verdict,
            ]);
        }
        out.push(vec![Statement::Goto(JumpTarget {
            target: Cow::Owned(format!("{d}_deny")),
        })]);
        out
    }

    /// Declares a direction's allow sets: the exact ones when `was` is `None` (a full load),
    /// and the peer-network pairs of the lengths in `now` and not in `was`; deletes those of
    /// the lengths in `was` and not in `now` (their rules must be gone already).
    fn allow_sets(
        &self,
        d: &str,
        was: Option<&BTreeSet<u8>>,
        now: Option<&BTreeSet<u8>>,
    ) -> Vec<NfObject<'static>> {
        let key = |port: bool| {
            let mut k = vec![SetType::Ipv4Addr, SetType::Ipv4Addr];
            if port {
                k.push(SetType::InetService);
            }
            SetTypeValue::Concatenated(Cow::Owned(k))
        };
        let empty = BTreeSet::new();
        let (was_l, now_l) = (was.unwrap_or(&empty), now.unwrap_or(&empty));
        let mut out = Vec::new();
        if was.is_none() {
            out.push(add(NfListObject::Set(Box::new(
                self.set(&format!("{d}_allow"), key(true)),
            ))));
            out.push(add(NfListObject::Set(Box::new(
                self.set(&format!("{d}_any"), key(false)),
            ))));
        }
        for len in was_l.difference(now_l) {
            for port in [true, false] {
                out.push(NfObject::CmdObject(NfCmd::Delete(NfListObject::Set(Box::new(
                    self.set(&net_set(d, *len, port), key(port)),
                )))));
            }
        }
        for len in now_l.difference(was_l) {
            for port in [true, false] {
                out.push(add(NfListObject::Set(Box::new(
                    self.set(&net_set(d, *len, port), key(port)),
                ))));
            }
        }
        out
    }

    fn input_rule(&self, range: (u16, u16)) -> Rule<'static> {
        let port_range = Expression::Range(Box::new(Range {
            range: [
                Expression::Number(u32::from(range.0)),
                Expression::Number(u32::from(range.1)),
            ],
        }));
        self.rule(
            "input",
            vec![
                eq(payload("tcp", "dport"), port_range),
                Statement::Match(Match {
                    left: meta(MetaKey::Iif),
                    right: s("lo"),
                    op: Operator::NEQ,
                }),
                // `ct status ! dnat`: not redirected here by the VIP's NAT rule.
                eq(
                    Expression::BinaryOperation(Box::new(BinaryOperation::AND(ct("status"), s("dnat")))),
                    Expression::Number(0),
                ),
                Statement::Drop(None),
            ],
        )
    }

    /// The kernel's own forwarding, declared whole at every full load (a change is then
    /// only elements): per endpoint position `i` the maps `ep_i_addr` / `ep_i_port`
    /// (`VIP . port` → that endpoint's address and port) and a chain `ep_i` that DNATs to
    /// them; per endpoint count `N` a chain `lb_N` that picks one of `ep_0..ep_N-1` at random;
    /// the verdict maps `fast_pre` / `fast_out` (`VIP . port` → `goto lb_N`) the NAT chains
    /// look up before the redirect to the proxy; and the set `fast_vips` of VIPs whose
    /// forwarded connections are masqueraded. nftables 1.0.6's JSON cannot declare a map with
    /// concatenated data or a `numgen` in a key, hence the two maps and the chains.
    fn fast_objects(&self) -> Vec<NfObject<'static>> {
        let mut out = Vec::new();
        let lookup = |map: String| {
            Expression::Named(NamedExpression::Map(Box::new(MapExpr {
                key: vip_port_key(),
                data: s(&format!("@{map}")),
            })))
        };
        for i in 0..FAST_MAX {
            let (addr, port) = (format!("ep_{i}_addr"), format!("ep_{i}_port"));
            out.push(add(NfListObject::Map(Box::new(self.map(
                &addr,
                concat_type(),
                SetType::Ipv4Addr,
            )))));
            out.push(add(NfListObject::Map(Box::new(self.map(
                &port,
                concat_type(),
                SetType::InetService,
            )))));
            let chain = format!("ep_{i}");
            out.push(add(NfListObject::Chain(self.chain(&chain))));
            out.push(add(NfListObject::Rule(self.rule(
                &chain,
                vec![Statement::DNAT(Some(NAT {
                    addr: Some(lookup(addr)),
                    family: Some(NATFamily::IP),
                    port: Some(lookup(port)),
                    flags: None,
                }))],
            ))));
        }
        let goto = |i: usize| JumpTarget {
            target: Cow::Owned(format!("ep_{i}")),
        };
        for n in 1..=FAST_MAX {
            let chain = format!("lb_{n}");
            out.push(add(NfListObject::Chain(self.chain(&chain))));
            let pick = if n == 1 {
                Statement::Goto(goto(0))
            } else {
                Statement::VerdictMap(VerdictMap {
                    key: Expression::Named(NamedExpression::Numgen(Numgen {
                        mode: NgMode::Random,
                        ng_mod: n as u32,
                        offset: None,
                    })),
                    data: Expression::Named(NamedExpression::Set(
                        (0..n)
                            .map(|i| {
                                SetItem::Mapping(
                                    Expression::Number(i as u32),
                                    Expression::Verdict(Verdict::Goto(goto(i))),
                                )
                            })
                            .collect(),
                    )),
                })
            };
            out.push(add(NfListObject::Rule(self.rule(&chain, vec![pick]))));
        }
        for name in ["fast_pre", "fast_out"] {
            // Declared as `mark` here; `encode` makes it the verdict map the crate cannot say.
            out.push(add(NfListObject::Map(Box::new(self.map(
                name,
                concat_type(),
                SetType::Mark,
            )))));
        }
        for set in ["fast_vips", "fast_sources"] {
            out.push(add(NfListObject::Set(Box::new(
                self.set(set, SetTypeValue::Single(SetType::Ipv4Addr)),
            ))));
        }
        out
    }

    fn base_chains(&self, range: (u16, u16)) -> Vec<NfObject<'static>> {
        let refused = || {
            vec![
                eq(vip_port_key(), s("@refused")),
                Statement::Reject(Some(Reject {
                    _type: Some(RejectType::TCPReset),
                    expr: None,
                })),
            ]
        };
        let guarded = |field, direction: &str| {
            vec![
                eq(payload("ip", field), s(&format!("@{}_guarded", short(direction)))),
                Statement::Jump(JumpTarget {
                    target: Cow::Owned(direction.to_string()),
                }),
            ]
        };
        let redirect = || {
            vec![
                eq(meta(MetaKey::L4proto), s("tcp")),
                Statement::Redirect(Some(NAT {
                    addr: None,
                    family: None,
                    port: Some(Expression::Named(NamedExpression::Map(Box::new(MapExpr {
                        key: vip_port_key(),
                        data: s("@vip_ports"),
                    })))),
                    flags: None,
                })),
            ]
        };
        // What the kernel forwards itself goes before the redirect (a DNAT ends the chain);
        // from outside this host, only this node's containers' connections.
        let fast = |map: &str| {
            let mut r = vec![eq(meta(MetaKey::L4proto), s("tcp"))];
            if map == "fast_pre" {
                r.push(eq(payload("ip", "saddr"), s("@fast_sources")));
            }
            r.push(Statement::VerdictMap(VerdictMap {
                key: vip_port_key(),
                data: s(&format!("@{map}")),
            }));
            r
        };
        // The hooks: filter before NAT (-150) so policy sees the VIP, NAT at -100.
        let mut out: Vec<NfObject<'static>> = [
            ("filter_prerouting", NfChainType::Filter, NfHook::Prerouting, -150),
            ("filter_output", NfChainType::Filter, NfHook::Output, -150),
            ("nat_prerouting", NfChainType::NAT, NfHook::Prerouting, -100),
            ("nat_output", NfChainType::NAT, NfHook::Output, -100),
            ("nat_postrouting", NfChainType::NAT, NfHook::Postrouting, 100),
            ("input", NfChainType::Filter, NfHook::Input, 0),
        ]
        .into_iter()
        .map(|(name, kind, hook, prio)| add(NfListObject::Chain(self.base_chain(name, kind, hook, prio))))
        .collect();
        let prerouting = vec![
            vec![
                Statement::Match(Match {
                    left: ct("state"),
                    right: Expression::List(vec![s("established"), s("related")]),
                    op: Operator::IN,
                }),
                Statement::Accept(None),
            ],
            vec![eq(meta(MetaKey::Iif), s("lo")), Statement::Accept(None)],
            refused(),
            guarded("saddr", "egress"),
            guarded("daddr", "ingress"),
        ];
        for r in prerouting {
            out.push(add(NfListObject::Rule(self.rule("filter_prerouting", r))));
        }
        out.push(add(NfListObject::Rule(self.rule("filter_output", refused()))));
        out.push(add(NfListObject::Rule(
            self.rule("nat_prerouting", fast("fast_pre")),
        )));
        out.push(add(NfListObject::Rule(self.rule("nat_prerouting", redirect()))));
        out.push(add(NfListObject::Rule(self.rule("nat_output", fast("fast_out")))));
        out.push(add(NfListObject::Rule(self.rule("nat_output", redirect()))));
        // A forwarded connection the kernel sent to an endpoint leaves from this node's
        // address, as the proxy's do: the endpoint's answer comes back here to be un-NATed
        // (a neighbour on the same bridge, or the client itself, would otherwise get it
        // straight from the endpoint's address). Not on loopback: that is the proxy's
        // redirect, and the proxy names a host process by its socket's address.
        out.push(add(NfListObject::Rule(self.rule(
            "nat_postrouting",
            vec![
                Statement::Match(Match {
                    left: meta(MetaKey::Oif),
                    right: s("lo"),
                    op: Operator::NEQ,
                }),
                eq(
                    // `ct original ip daddr`: libnftables 1.0.6 reads the family from
                    // the key, not from `family`.
                    Expression::Named(NamedExpression::CT(CT {
                        key: "ip daddr".into(),
                        family: None,
                        dir: Some(CTDir::Original),
                    })),
                    s("@fast_vips"),
                ),
                Statement::Masquerade(None),
            ],
        ))));
        out.push(add(NfListObject::Rule(self.input_rule(range))));
        out
    }

    /// `add element` commands for what `m` holds and `old` (if given) did not.
    fn elements(&self, m: &Model, old: Option<&Model>) -> Vec<NfObject<'static>> {
        let mut out = Vec::new();
        let ports: Vec<_> = m
            .vip_ports
            .iter()
            .filter(|(k, v)| old.is_none_or(|o| o.vip_ports.get(k) != Some(v)))
            .map(|((vip, port), pp)| {
                Expression::List(vec![vip_port(*vip, *port), Expression::Number(u32::from(*pp))])
            })
            .collect();
        if !ports.is_empty() {
            out.push(add(self.element("vip_ports", ports)));
        }
        let refused: Vec<_> = m
            .refused
            .iter()
            .filter(|k| old.is_none_or(|o| !o.refused.contains(k)))
            .map(|(vip, port)| vip_port(*vip, *port))
            .collect();
        if !refused.is_empty() {
            out.push(add(self.element("refused", refused)));
        }
        for (name, n, o) in [
            ("fast_pre", &m.fast_pre, old.map(|o| &o.fast_pre)),
            ("fast_out", &m.fast_out, old.map(|o| &o.fast_out)),
        ] {
            let elems: Vec<_> = n
                .iter()
                .filter(|(k, v)| o.is_none_or(|o| o.get(k) != Some(v)))
                .map(|((vip, port), count)| {
                    Expression::List(vec![
                        vip_port(*vip, *port),
                        Expression::Verdict(Verdict::Goto(JumpTarget {
                            target: Cow::Owned(format!("lb_{count}")),
                        })),
                    ])
                })
                .collect();
            if !elems.is_empty() {
                out.push(add(self.element(name, elems)));
            }
        }
        let mut eps: BTreeMap<usize, (Vec<Expression<'static>>, Vec<Expression<'static>>)> = BTreeMap::new();
        for ((vip, port), list) in &m.backends {
            let before = old.and_then(|o| o.backends.get(&(*vip, *port)));
            for (i, (addr, target)) in list.iter().enumerate() {
                if before.and_then(|b| b.get(i)) == Some(&(*addr, *target)) {
                    continue;
                }
                let (a, p) = eps.entry(i).or_default();
                a.push(Expression::List(vec![vip_port(*vip, *port), ip_elem(addr)]));
                p.push(Expression::List(vec![
                    vip_port(*vip, *port),
                    Expression::Number(u32::from(*target)),
                ]));
            }
        }
        for (i, (a, p)) in eps {
            out.push(add(self.element(&format!("ep_{i}_addr"), a)));
            out.push(add(self.element(&format!("ep_{i}_port"), p)));
        }
        let old_vips = old.map(Model::fast_vips).unwrap_or_default();
        let none = BTreeSet::new();
        let old_sources = old.map_or(&none, |o| &o.fast_sources);
        for (set, new) in [
            (
                "fast_vips",
                m.fast_vips()
                    .difference(&old_vips)
                    .map(ip_elem)
                    .collect::<Vec<_>>(),
            ),
            (
                "fast_sources",
                m.fast_sources.difference(old_sources).map(ip_elem).collect(),
            ),
        ] {
            if !new.is_empty() {
                out.push(add(self.element(set, new)));
            }
        }
        for (direction, n, o) in [
            ("ingress", &m.ingress_to, old.map(|o| &o.ingress_to)),
            ("egress", &m.egress_from, old.map(|o| &o.egress_from)),
        ] {
            let elems: Vec<_> = n
                .keys()
                .filter(|k| o.is_none_or(|o| !o.contains_key(*k)))
                .map(|ip| s(&ip.to_string()))
                .collect();
            if !elems.is_empty() {
                out.push(add(self.element(&format!("{}_guarded", short(direction)), elems)));
            }
        }
        for (direction, n, o) in [
            ("ingress", &m.ingress, old.map(|o| &o.ingress)),
            ("egress", &m.egress, old.map(|o| &o.egress)),
        ] {
            if o == Some(n) {
                continue;
            }
            let d = short(direction);
            let new = match o {
                Some(o) => n.minus(o, d),
                None => n.elements(d),
            };
            for (set, elems) in new {
                out.push(add(self.element(&set, elems)));
            }
        }
        out
    }
}

/// The JSON libnftables takes for these commands. Two things the crate (0.6) cannot say are
/// patched in here: the per-element counter of the drop sets (its `Set` has no `stmt`), and
/// the verdict maps `fast_pre` / `fast_out` (its map types have no `verdict`).
pub fn encode(cmds: Vec<NfObject<'static>>) -> Result<String, NftError> {
    let failed = |e: serde_json::Error| NftError::Refused(format!("cannot encode the program: {e}"));
    // Written object by object: only the few declarations patched below go through a
    // `Value` (a whole-document `Value` was a tenth of a 1,000-service load).
    let mut out = Vec::with_capacity(cmds.len() * 160);
    out.extend_from_slice(b"{\"nftables\":[");
    for (i, o) in cmds.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let drop_set = matches!(
            o,
            NfObject::CmdObject(NfCmd::Add(NfListObject::Set(s))) if matches!(&*s.name, "in_drops" | "eg_drops")
        );
        let verdict_map = matches!(
            o,
            NfObject::CmdObject(NfCmd::Add(NfListObject::Map(m))) if matches!(&*m.name, "fast_pre" | "fast_out")
        );
        if !drop_set && !verdict_map {
            serde_json::to_writer(&mut out, o).map_err(failed)?;
            continue;
        }
        let mut v = serde_json::to_value(o).map_err(failed)?;
        if let Some(set) = v.get_mut("add").and_then(|a| a.get_mut("set")) {
            if set.get("size").is_some() {
                set["stmt"] = serde_json::json!([{ "counter": null }]);
            }
        }
        if let Some(map) = v.get_mut("add").and_then(|a| a.get_mut("map")) {
            map["map"] = serde_json::json!("verdict");
        }
        serde_json::to_writer(&mut out, &v).map_err(failed)?;
    }
    out.extend_from_slice(b"]}");
    String::from_utf8(out).map_err(|e| NftError::Refused(format!("cannot encode the program: {e}")))
}

/// Loads commands as one transaction: all or nothing.
pub async fn apply(nft: &Nft, cmds: Vec<NfObject<'static>>) -> Result<(), NftError> {
    if cmds.is_empty() {
        return Ok(());
    }
    nft.run(encode(cmds)?).await.map(|_| ())
}

/// Reads the drops counted so far, by direction and address. Only addresses that dropped
/// something are listed, so this costs what was dropped, not the table's size.
pub async fn drops(nft: &Nft, table_name: &str) -> Result<Drops, NftError> {
    let mut out = Drops::new();
    for direction in ["ingress", "egress"] {
        let set = drop_set(direction);
        let text = nft.run(format!("list set inet {table_name} {set}")).await?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| NftError::Refused(format!("unreadable nftables listing of {set}: {e}")))?;
        let elems = v
            .get("nftables")
            .and_then(|x| x.as_array())
            .into_iter()
            .flatten()
            .filter_map(|item| item.get("set")?.get("elem")?.as_array())
            .flatten();
        for e in elems {
            let e = e.get("elem").unwrap_or(e);
            let ip = e.get("val").and_then(|x| x.as_str()).and_then(|x| x.parse().ok());
            let packets = e
                .get("counter")
                .and_then(|c| c.get("packets"))
                .and_then(|x| x.as_u64());
            if let (Some(ip), Some(p)) = (ip, packets) {
                out.insert((direction, ip), p);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    /// One service `s` with a VIP, port 80 and these endpoints (address, target port, here),
    /// no policy; its proxy port 20000.
    fn one(eps: &[(&str, u16, bool)]) -> (Table, BTreeMap<(SvcKey, u16), u16>) {
        use crate::table::{Ep, Svc};
        use rune_statemachine::spec::PortSpec;
        let key = SvcKey::new("default", "s");
        let mut t = Table::default();
        t.services.insert(
            key.clone(),
            std::sync::Arc::new(Svc {
                key: key.clone(),
                vip: Some(ip("10.96.0.9")),
                mode: Mode::RoundRobin,
                ports: vec![PortSpec {
                    name: "http".into(),
                    port: 80,
                    target_port: Some(8080),
                    protocol: None,
                    host_port: None,
                }],
                policy: crate::policy::compile("default", None),
                endpoints: eps
                    .iter()
                    .enumerate()
                    .map(|(i, (a, p, here))| Ep {
                        instance: format!("s-{i}"),
                        ip: a.parse().unwrap(),
                        targets: vec![(80, *p)],
                        via: (!here).then(|| "192.0.2.7:7864".parse().unwrap()),
                        here: *here,
                    })
                    .collect(),
                local_ips: Vec::new(),
                local_instances: eps.len(),
                moved: Vec::new(),
            }),
        );
        (t, BTreeMap::from([((key, 80), 20_000)]))
    }

    #[test]
    fn the_kernel_forwards_what_needs_no_proxy() {
        let range = (20_000, 21_999);
        let k = (ip("10.96.0.9"), 80);
        // Containers here, no policy: forwarded from everywhere, endpoints sorted.
        let (mut t, ports) = one(&[("172.17.0.3", 8080, true), ("172.17.0.2", 8080, true)]);
        for svc in t.services.values_mut() {
            std::sync::Arc::make_mut(svc).local_ips = vec!["172.17.0.2".parse().unwrap()];
        }
        let m = Model::of(&t, &ports, range);
        // Only this node's containers are forwarded from outside this host.
        assert_eq!(m.fast_sources, BTreeSet::from([ip("172.17.0.2")]));
        assert_eq!(m.fast_pre.get(&k), Some(&2));
        assert_eq!(m.fast_out.get(&k), Some(&2));
        assert_eq!(
            m.backends[&k],
            vec![(ip("172.17.0.2"), 8080), (ip("172.17.0.3"), 8080)]
        );
        assert_eq!(m.vip_ports.get(&k), Some(&20_000), "the redirect stays behind it");
        assert!(m.fast_vips().contains(&k.0));
        // Stale: everything back to the proxy.
        let p = m.clone().proxied();
        assert!(p.fast_pre.is_empty() && p.fast_out.is_empty() && p.backends.is_empty());
        assert!(p.fast_sources.is_empty());
        assert_eq!(p.vip_ports, m.vip_ports);

        // A process on loopback: this host's traffic only.
        let (t, ports) = one(&[("127.0.0.1", 9000, true)]);
        let m = Model::of(&t, &ports, range);
        assert!(m.fast_pre.is_empty());
        assert_eq!(m.fast_out.get(&k), Some(&1));
        assert!(m.fast_vips().is_empty(), "nothing forwarded to masquerade");

        // An endpoint on another node, fewest-connections balancing, too many endpoints: the
        // proxy.
        let (t, ports) = one(&[("172.17.0.2", 8080, true), ("172.18.0.2", 8080, false)]);
        assert_eq!(Model::of(&t, &ports, range).backends, BTreeMap::new());
        let (mut t, ports) = one(&[("172.17.0.2", 8080, true)]);
        for svc in t.services.values_mut() {
            std::sync::Arc::make_mut(svc).mode = Mode::LeastConnections;
        }
        assert_eq!(Model::of(&t, &ports, range).backends, BTreeMap::new());
        let many: Vec<String> = (0..=FAST_MAX).map(|i| format!("172.17.1.{i}")).collect();
        let eps: Vec<(&str, u16, bool)> = many.iter().map(|a| (a.as_str(), 8080, true)).collect();
        let (t, ports) = one(&eps);
        assert_eq!(Model::of(&t, &ports, range).backends, BTreeMap::new());

        // An ingress policy: containers' traffic met it in the kernel, this host's needs the
        // proxy to name its source.
        let (mut t, ports) = one(&[("172.17.0.2", 8080, true)]);
        let np = rune_statemachine::spec::NetworkPolicy {
            ingress: vec![rune_statemachine::spec::IngressRule {
                from: vec![rune_statemachine::spec::Peer {
                    cidr: Some("10.0.0.0/8".into()),
                    ..Default::default()
                }],
                ports: vec![],
            }],
            egress: vec![],
        };
        for svc in t.services.values_mut() {
            std::sync::Arc::make_mut(svc).policy = crate::policy::compile("default", Some(&np));
        }
        let m = Model::of(&t, &ports, range);
        assert_eq!(m.fast_pre.get(&k), Some(&1));
        assert!(m.fast_out.is_empty());

        // A host process held to an egress policy: this host's traffic to every VIP goes
        // through the proxy.
        let (mut t, ports) = one(&[("172.17.0.2", 8080, true)]);
        let np = rune_statemachine::spec::NetworkPolicy {
            ingress: vec![],
            egress: vec![rune_statemachine::spec::EgressRule {
                to: vec![],
                ports: vec![],
            }],
        };
        for svc in t.services.values_mut() {
            std::sync::Arc::make_mut(svc).policy = crate::policy::compile("default", Some(&np));
        }
        t.by_pgid.insert(4242, SvcKey::new("default", "s"));
        t.any_egress = true;
        let m = Model::of(&t, &ports, range);
        assert_eq!(m.fast_pre.get(&k), Some(&1));
        assert!(m.fast_out.is_empty());
    }

    #[test]
    fn an_ingress_port_is_open_at_the_vip_and_its_target_at_the_instances() {
        use rune_statemachine::spec::{IngressRule, NetworkPolicy, Peer, PortRef};
        let (mut t, ports) = one(&[("172.17.0.2", 8080, true)]);
        let np = NetworkPolicy {
            ingress: vec![IngressRule {
                from: vec![Peer {
                    cidr: Some("10.0.0.5/32".into()),
                    ..Default::default()
                }],
                // `http` is 80 → 8080; 9000 names no service port.
                ports: vec![PortRef::Name("http".into()), PortRef::Number(9000)],
            }],
            egress: vec![],
        };
        for svc in t.services.values_mut() {
            let svc = std::sync::Arc::make_mut(svc);
            svc.policy = crate::policy::compile("default", Some(&np));
            svc.local_ips = vec!["172.17.0.2".parse().unwrap()];
        }
        let m = Model::of(&t, &ports, (20_000, 20_999));
        let (vip, pod, peer) = (ip("10.96.0.9"), ip("172.17.0.2"), ip("10.0.0.5"));
        assert_eq!(
            m.ingress.port,
            BTreeSet::from([
                (vip, peer, 80),
                (vip, peer, 9000),
                (pod, peer, 8080),
                (pod, peer, 9000),
            ]),
            "the service port at the VIP only, where the instance listens for it at the instance"
        );
    }

    #[test]
    fn an_egress_port_is_the_service_port_at_the_vip_and_its_target_at_the_instances() {
        use rune_statemachine::spec::{EgressRule, NetworkPolicy, Peer, PortRef};
        let (mut t, ports) = one(&[("172.17.0.2", 8080, true)]);
        let web = SvcKey::new("default", "s");
        let app = SvcKey::new("default", "app");
        let mut a = (*t.services[&web]).clone();
        a.key = app.clone();
        a.vip = Some(ip("10.96.0.10"));
        a.endpoints.clear();
        a.local_ips = vec!["172.17.0.5".parse().unwrap()];
        for (peer, names) in [
            (
                Peer {
                    service: Some("s".into()),
                    ..Default::default()
                },
                true,
            ),
            // A namespace: names resolve against each of its services' ports.
            (
                Peer {
                    namespace: Some("default".into()),
                    ..Default::default()
                },
                false,
            ),
        ] {
            let np = NetworkPolicy {
                ingress: vec![],
                egress: vec![EgressRule {
                    to: vec![peer],
                    ports: vec![PortRef::Name("http".into())],
                }],
            };
            a.policy = crate::policy::compile("default", Some(&np));
            t.services.insert(app.clone(), std::sync::Arc::new(a.clone()));
            if let Some(w) = t.services.get_mut(&web) {
                std::sync::Arc::make_mut(w).local_ips = vec!["172.17.0.2".parse().unwrap()];
            }
            let m = Model::of(&t, &ports, (20_000, 20_999));
            let src = ip("172.17.0.5");
            let mut want = BTreeSet::from([(src, ip("10.96.0.9"), 80), (src, ip("172.17.0.2"), 8080)]);
            if !names {
                // app's own VIP and container are in the namespace too.
                want.extend([(src, ip("10.96.0.10"), 80), (src, src, 8080)]);
            }
            assert_eq!(m.egress.port, want, "named service: {names}");
        }
    }

    #[test]
    fn allowed_flows_by_kind_and_prefix_length() {
        let g = ip("10.96.0.2");
        let mut a = Allowed::default();
        let peers: Vec<String> = [
            "10.128.0.4",
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.1.2.3/32",
            "fd00::/8",
            "10.2.0.9/16",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.allow(g, &peers, &Some(vec![80, 8080]));
        a.allow(g, &["172.16.0.0/12".into(), "172.16.5.0/24".into()], &None);
        a.allow(g, &["192.0.2.1".into()], &Some(vec![]));
        // Addresses (and /32s) are exact; a network is masked; IPv6 is not the table's.
        assert_eq!(
            a.port,
            BTreeSet::from([
                (g, ip("10.1.2.3"), 80),
                (g, ip("10.1.2.3"), 8080),
                (g, ip("10.128.0.4"), 80),
                (g, ip("10.128.0.4"), 8080),
            ])
        );
        // Networks are masked, each under its own length.
        let nets: BTreeSet<_> = a.net_port.iter().map(|(_, n, _)| *n).collect();
        assert_eq!(
            nets,
            BTreeSet::from([(ip("10.0.0.0"), 8), (ip("10.1.0.0"), 16), (ip("10.2.0.0"), 16)])
        );
        assert_eq!(a.net_port.len(), 6);
        assert_eq!(
            a.net_any,
            BTreeSet::from([(g, (ip("172.16.0.0"), 12)), (g, (ip("172.16.5.0"), 24))])
        );
        assert_eq!(a.lengths(), BTreeSet::from([8, 12, 16, 24]));
        // An empty port list allows nothing.
        assert!(a.any.is_empty());
    }
}
