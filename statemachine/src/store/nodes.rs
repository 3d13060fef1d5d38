//! The cluster's nodes and where each instance runs, decided in apply so that a replay places
//! every instance where the live cluster did.
//!
//! - `nodes/<name>` ([`NodeRecord`]): a node that registered ([`Command::RegisterNode`], at
//!   its start) with its raft id, whether it takes instances, and how many are placed on it.
//! - `placements/<ns>/<service>/<instance id>` ([`PlacementRecord`]): the node an instance
//!   runs on; `node-placements/<node>/<ns>/<service>/<id>` is the same, by node, so a node that
//!   goes away moves exactly its own.
//!
//! A service's placements follow its scale whenever an entry touches it: instances past the
//! scale lose theirs; an instance without one, or on a node no longer ready, goes to the ready
//! node with the fewest placed instances (by name on a tie), or to its pinned node
//! (`placement.node`) when that one is ready. A node that is not ready keeps nothing; one that
//! comes back gets new instances only (nothing is moved back). With no node registered (a
//! single runed) nothing is placed and every instance runs on the one node.
//!
//! [`Command::RegisterNode`]: crate::Command::RegisterNode

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::{change, service_key, services_prefix, Overlay, ServiceRecord, StoreError};
use crate::command::{Action, Change, Kind, Rejection};

/// Where node records live.
pub const NODES_PREFIX: &str = "nodes/";
/// Where placements live.
pub const PLACEMENTS_PREFIX: &str = "placements/";
const BY_NODE_PREFIX: &str = "node-placements/";
/// The highest raft id any node registered with: a node that joins gets a higher one, so an
/// id (and a certificate naming it) is never given to two nodes.
pub const HIGHEST_RAFT_ID_KEY: &str = "cluster/highest-raft-id";

/// A node of the cluster, as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Its `--node-name`.
    pub name: String,
    /// Its raft id.
    pub raft_id: u64,
    /// Whether it takes instances (false once the leader found it gone past its grace).
    pub ready: bool,
    /// When `ready` last changed (proposer's clock).
    pub since_ms: i64,
    /// Instances placed on it now.
    pub placed: u64,
    /// Where the other nodes' data planes reach its instances (host:port), as it said at its
    /// last start; None for a node registered by an older build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

/// The node an instance runs on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementRecord {
    /// The node's name.
    pub node: String,
}

/// `nodes/<name>`.
pub fn node_key(name: &str) -> String {
    format!("{NODES_PREFIX}{name}")
}

/// `placements/<ns>/<service>/<id>`.
pub fn placement_key(ns: &str, service: &str, id: &str) -> String {
    format!("{PLACEMENTS_PREFIX}{ns}/{service}/{id}")
}

/// The placements of one service.
pub fn placements_prefix(ns: &str, service: &str) -> String {
    format!("{PLACEMENTS_PREFIX}{ns}/{service}/")
}

fn by_node_key(node: &str, ns: &str, service: &str, id: &str) -> String {
    format!("{BY_NODE_PREFIX}{node}/{ns}/{service}/{id}")
}

fn nodes<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &Overlay<'_, R>,
) -> Result<Vec<NodeRecord>, StoreError> {
    let mut out = Vec::new();
    for k in o.keys_with_prefix(NODES_PREFIX)? {
        if let Some(n) = o.get::<NodeRecord>(&k)? {
            out.push(n);
        }
    }
    Ok(out)
}

/// Registers node `name` with raft id `raft_id` (again: marks it ready), then places what
/// waits for a node. Names and raft ids are one to one.
pub(super) fn register<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &mut Overlay<'_, R>,
    now: i64,
    name: &str,
    raft_id: u64,
    gateway: Option<&str>,
) -> Result<Result<Vec<Change>, Rejection>, StoreError> {
    if let Err(m) = crate::validate::node_name(name) {
        return Ok(Err(Rejection::Invalid(format!("node name {m}"))));
    }
    if let Some(g) = gateway {
        if g.parse::<std::net::SocketAddr>().is_err() {
            return Ok(Err(Rejection::Invalid(format!(
                "node gateway '{g}' is not an address and port (such as 10.0.0.5:7864)"
            ))));
        }
    }
    let gateway = gateway.map(str::to_string);
    let all = nodes(o)?;
    if let Some(other) = all.iter().find(|n| n.raft_id == raft_id && n.name != name) {
        return Ok(Err(Rejection::AlreadyExists(format!(
            "raft node {raft_id} is registered as node {}; start it with --node-name {} (a node keeps its name)",
            other.name, other.name
        ))));
    }
    let (record, action) = match all.into_iter().find(|n| n.name == name) {
        Some(n) if n.raft_id != raft_id => {
            return Ok(Err(Rejection::AlreadyExists(format!(
                "node name {name} is taken by raft node {}; give this node another --node-name",
                n.raft_id
            ))))
        }
        Some(n) if n.ready && n.gateway == gateway => return Ok(Ok(Vec::new())),
        Some(n) if n.ready => (NodeRecord { gateway, ..n }, Action::Configured),
        Some(n) => (
            NodeRecord {
                ready: true,
                since_ms: now,
                gateway,
                ..n
            },
            Action::Configured,
        ),
        None => (
            NodeRecord {
                name: name.to_string(),
                raft_id,
                ready: true,
                since_ms: now,
                placed: 0,
                gateway,
            },
            Action::Created,
        ),
    };
    o.put(node_key(name), record);
    if o.get::<u64>(HIGHEST_RAFT_ID_KEY)?.is_none_or(|h| h < raft_id) {
        o.put(HIGHEST_RAFT_ID_KEY.to_string(), raft_id);
    }
    let mut changes = vec![change(Kind::Node, "", name, action, raft_id, "ready")];
    changes.extend(place_waiting(o)?);
    Ok(Ok(changes))
}

/// Marks node `name` ready or not; a node no longer ready gives up its instances, which are
/// placed on the others.
pub(super) fn set_ready<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &mut Overlay<'_, R>,
    now: i64,
    name: &str,
    ready: bool,
) -> Result<Result<Vec<Change>, Rejection>, StoreError> {
    let Some(mut rec) = o.get::<NodeRecord>(&node_key(name))? else {
        return Ok(Err(Rejection::NotFound(format!("node {name} is not registered"))));
    };
    if rec.ready == ready {
        return Ok(Ok(Vec::new()));
    }
    rec.ready = ready;
    rec.since_ms = now;
    o.put(node_key(name), rec.clone());
    let summary = if ready {
        "ready"
    } else {
        "gone: its instances move"
    };
    let mut changes = vec![change(
        Kind::Node,
        "",
        name,
        Action::Configured,
        rec.raft_id,
        summary,
    )];
    if ready {
        changes.extend(place_waiting(o)?);
    } else {
        let mut services = std::collections::BTreeSet::new();
        for k in o.keys_with_prefix(&format!("{BY_NODE_PREFIX}{name}/"))? {
            let mut parts = k[BY_NODE_PREFIX.len() + name.len() + 1..].splitn(3, '/');
            if let (Some(ns), Some(svc), Some(_)) = (parts.next(), parts.next(), parts.next()) {
                services.insert((ns.to_string(), svc.to_string()));
            }
        }
        for (ns, svc) in services {
            place(o, &ns, &svc)?;
        }
    }
    Ok(Ok(changes))
}

/// Forgets node `name`: its instances are placed elsewhere and its record goes (its raft id
/// stays counted in [`HIGHEST_RAFT_ID_KEY`]).
pub(super) fn forget<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &mut Overlay<'_, R>,
    now: i64,
    name: &str,
) -> Result<Result<Vec<Change>, Rejection>, StoreError> {
    let raft_id = match o.get::<NodeRecord>(&node_key(name))? {
        Some(n) => n.raft_id,
        None => return Ok(Err(Rejection::NotFound(format!("node {name} is not registered")))),
    };
    let mut changes = match set_ready(o, now, name, false)? {
        Ok(c) => c,
        Err(r) => return Ok(Err(r)),
    };
    o.delete(node_key(name));
    changes.push(change(
        Kind::Node,
        "",
        name,
        Action::Deleted,
        raft_id,
        "removed from the cluster",
    ));
    Ok(Ok(changes))
}

/// Places the instances of every service that lacks some: once a node is there to take them.
fn place_waiting<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &mut Overlay<'_, R>,
) -> Result<Vec<Change>, StoreError> {
    for k in o.keys_with_prefix(&services_prefix(None))? {
        if let Some(rec) = o.get::<ServiceRecord>(&k)? {
            let (ns, name) = (rec.spec.namespace().to_string(), rec.spec.name.clone());
            place(o, &ns, &name)?;
        }
    }
    Ok(Vec::new())
}

/// Brings one service's placements in line with its scale, its pin and the ready nodes.
pub(super) fn place<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &mut Overlay<'_, R>,
    ns: &str,
    service: &str,
) -> Result<(), StoreError> {
    let mut nodes = nodes(o)?;
    let existing = o.keys_with_prefix(&placements_prefix(ns, service))?;
    if nodes.is_empty() && existing.is_empty() {
        return Ok(());
    }
    let rec = o.get_shared::<ServiceRecord>(&service_key(ns, service))?;
    let wanted = rec
        .as_ref()
        .filter(|r| r.spec.skip != Some(true))
        .map_or(0, |r| r.spec.scale().max(0) as u64);
    let pin = rec
        .as_ref()
        .and_then(|r| r.spec.placement.as_ref())
        .and_then(|p| p.node.clone());
    let ids: std::collections::BTreeSet<String> = (0..wanted).map(|i| format!("{service}-{i}")).collect();
    let mut placed = std::collections::BTreeSet::new();
    // Take back what is past the scale, on a node no longer ready, or off its pin.
    for key in existing {
        let id = &key[placements_prefix(ns, service).len()..];
        let Some(p) = o.get::<PlacementRecord>(&key)? else {
            continue;
        };
        let keep = ids.contains(id)
            && nodes.iter().any(|n| n.name == p.node && n.ready)
            && pin.as_ref().is_none_or(|pin| *pin == p.node);
        if keep {
            placed.insert(id.to_string());
            continue;
        }
        o.delete(key.clone());
        o.delete(by_node_key(&p.node, ns, service, id));
        if let Some(n) = nodes.iter_mut().find(|n| n.name == p.node) {
            n.placed = n.placed.saturating_sub(1);
            o.put(node_key(&n.name), n.clone());
        }
    }
    // Place what has no node.
    for id in ids.iter().filter(|id| !placed.contains(*id)) {
        let chosen = nodes
            .iter_mut()
            .filter(|n| n.ready && pin.as_ref().is_none_or(|pin| *pin == n.name))
            .min_by(|a, b| (a.placed, &a.name).cmp(&(b.placed, &b.name)));
        let Some(n) = chosen else {
            // No ready node (or the pinned one is not): it waits for one.
            break;
        };
        n.placed += 1;
        o.put(node_key(&n.name), n.clone());
        o.put(
            placement_key(ns, service, id),
            PlacementRecord { node: n.name.clone() },
        );
        o.put(by_node_key(&n.name, ns, service, id), ());
    }
    Ok(())
}

/// Whether `reporter`'s event about instance `id` comes from a node it no longer runs on (it
/// was placed elsewhere while that node was away): such events are ignored.
pub(super) fn from_elsewhere<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &Overlay<'_, R>,
    ns: &str,
    service: &str,
    id: &str,
    recorded_node: Option<&str>,
    reporter: &str,
) -> Result<bool, StoreError> {
    Ok(match o.get::<PlacementRecord>(&placement_key(ns, service, id))? {
        Some(p) => p.node != reporter,
        // Not placed (scaled down, deleted): only the node the record names may end it.
        None => recorded_node.is_some_and(|n| !n.is_empty() && n != reporter),
    })
}
