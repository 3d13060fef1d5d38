//! Strategies for property tests (feature `testing`): the commands a cluster sees and the
//! deltas projections get, shared by the determinism test of the log and the projection tests
//! of each subsystem, so that every one of them is tried on the same kinds of input.

use std::collections::BTreeMap;

use proptest::prelude::*;

use crate::command::Rewrap;
use crate::delta::Delta;
use crate::identity::{PolicyRule, PolicySpec, TokenRecord};
use crate::instance::{InstanceChange, InstanceEvent, InstanceRecord, Phase};
use crate::network::{Endpoint, EndpointPort, EndpointSet};
use crate::secret::{Configmap, SealedSecret};
use crate::spec::{NamespaceSpec, PortSpec, ServiceSpec, Text};
use crate::store::nodes::NodeRecord;
use crate::store::{NamespaceRecord, ObjectMeta, ServiceRecord};
use crate::{Command, Resource};

/// A service cast: four names (one invalid), three namespaces, scales from -1 (invalid).
pub fn service() -> impl Strategy<Value = Resource> {
    (0..4usize, 0..3usize, -1i64..4, any::<bool>(), 0..3u16).prop_map(|(n, ns, scale, label, port)| {
        let mut s = ServiceSpec {
            name: ["api", "db", "web", "Bad"][n].into(),
            namespace: Some(["default", "team", "ops"][ns].into()),
            image: Some("busybox".into()),
            scale: Some(scale),
            ..Default::default()
        };
        if label {
            s.labels.insert("tier".into(), Text("a".into()));
        }
        if port > 0 {
            s.ports = vec![PortSpec {
                name: "http".into(),
                port: 8000 + i64::from(port),
                ..Default::default()
            }];
        }
        Resource::Service(s)
    })
}

/// No release (`n` 0 or 3+), or one of two releases in two versions: enough for upgrades,
/// unchanged re-casts and ownership conflicts.
fn release(n: usize) -> Option<crate::command::ReleaseSpec> {
    let (name, version) = match n {
        1 => ("app", "1.0.0"),
        2 => ("other", "1.0.0"),
        3 => ("app", "1.1.0"),
        _ => return None,
    };
    Some(crate::command::ReleaseSpec {
        name: name.into(),
        namespace: "default".into(),
        runeset: name.into(),
        version: version.into(),
        description: String::new(),
        values_digest: format!("sha256:{n}"),
        also: Vec::new(),
        adopt: n == 3,
    })
}

/// Any command, with the mix of kinds a busy cluster sees, rejections included.
pub fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        4 => (prop::collection::vec(service(), 1..3), any::<bool>(), any::<bool>(), 1..4u32, 0..4usize).prop_map(
            |(resources, create_namespace, force, history_limit, rel)| Command::Apply {
                resources, create_namespace, force, history_limit, release: release(rel),
            }
        ),
        1 => (0..4usize, prop::option::of(1..5u64)).prop_map(|(n, to_generation)| Command::RollbackService {
            namespace: "default".into(),
            name: ["api", "db", "web", "nope"][n].into(),
            to_generation,
            history_limit: 3,
        }),
        1 => (0..3usize, any::<bool>()).prop_map(|(n, force)| Command::DeleteRelease {
            namespace: "default".into(),
            name: ["app", "other", "nope"][n].into(),
            force,
            revision: None,
        }),
        1 => (0..3usize).prop_map(|n| Command::Apply {
            resources: vec![Resource::Namespace(NamespaceSpec { name: ["team", "ops", "x"][n].into(), ..Default::default() })],
            create_namespace: false,
            force: false,
            history_limit: 10,
            release: None,
        }),
        1 => (0..4usize, 0..3usize, any::<bool>()).prop_map(|(n, ns, force)| Command::DeleteService {
            namespace: ["default", "team", "ops"][ns].into(),
            name: ["api", "db", "web", "nope"][n].into(),
            force,
        }),
        1 => (0..4usize, 0..4u32).prop_map(|(n, scale)| Command::Scale {
            namespace: "default".into(),
            name: ["api", "db", "web", "nope"][n].into(),
            scale,
        }),
        1 => (0..4usize).prop_map(|n| Command::Restart {
            namespace: "default".into(),
            name: ["api", "db", "web", "nope"][n].into(),
        }),
        1 => (0..3usize, 1..4u64, prop::option::of(0..2u8)).prop_map(|(n, raft_id, g)| Command::RegisterNode {
            name: ["n1", "n2", "n3"][n].into(),
            raft_id,
            gateway: g.map(|g| format!("10.0.0.{}:7864", g + 1)),
        }),
        1 => (0..3usize, any::<bool>()).prop_map(|(n, ready)| Command::SetNodeReady {
            name: ["n1", "n2", "n3"][n].into(),
            ready,
        }),
        1 => (0..3usize).prop_map(|n| Command::ForgetNode { name: ["n1", "n2", "n3"][n].into() }),
        2 => (prop::collection::vec((0..3usize, 0..3usize, 0..8usize), 1..4), 0..4usize).prop_map(|(evs, node)| Command::InstanceEvents {
            node: [None, Some("n1"), Some("n2"), Some("n3")][node].map(String::from),
            events: evs.into_iter().map(|(svc, i, e)| {
                let service = ["api", "db", "web"][svc].to_string();
                InstanceEvent {
                    namespace: "default".into(),
                    id: format!("{service}-{i}"),
                    service,
                    change: match e {
                        0 => InstanceChange::Scheduled { node: "n1".into(), runtime: "process".into(), template: "t".into(), generation: 1 },
                        // Half the runs say where they listen, as a run of an earlier spec does.
                        1 => InstanceChange::Started { address: "127.0.0.1".into(), runtime_id: "42".into(), adopted: false, readiness_probe: true,
                            ports: (i == 1).then(|| vec![EndpointPort { name: "http".into(), port: 80, target_port: 8081, protocol: "tcp".into() }]) },
                        2 => InstanceChange::Probe { probe: "readiness".into(), ok: true, message: "HTTP 200".into() },
                        3 => InstanceChange::Exited { code: Some(1), reason: "exited with code 1".into() },
                        4 => InstanceChange::Backoff { restarts: 2, delay_ms: 2000, reason: "crashed".into() },
                        5 => InstanceChange::Failed { reason: "no such image".into() },
                        6 => InstanceChange::Stopping { reason: "scaled down".into() },
                        _ => InstanceChange::Removed,
                    },
                }
            }).collect(),
        }),
        1 => (0..3usize).prop_map(|n| Command::DeleteNamespace { name: ["team", "ops", "default"][n].into() }),
        2 => (0..2usize, 1..4u64, 0..2usize).prop_map(|(n, version, kek)| Command::Apply {
            resources: vec![Resource::Secret(SealedSecret {
                namespace: "default".into(),
                name: ["db", "tls"][n].into(),
                type_: "static".into(),
                version,
                keys: vec!["password".into()],
                kek_id: ["k1", "k2"][kek].into(),
                wrapped_dek: format!("dek-{version}"),
                ciphertext: format!("ct-{version}"),
            })],
            create_namespace: false,
            force: false,
            history_limit: 2,
            release: release(n + 1),
        }),
        1 => (0..2usize, 0..2usize).prop_map(|(n, v)| Command::Apply {
            resources: vec![Resource::Configmap(Configmap {
                namespace: "default".into(),
                name: ["cfg", "other"][n].into(),
                data: [("mode".to_string(), ["a", "b"][v].to_string())].into_iter().collect(),
            })],
            create_namespace: false,
            force: false,
            history_limit: 2,
            release: release(3 * v),
        }),
        1 => (0..2usize, 1..4u64).prop_map(|(n, version)| Command::RewrapSecrets {
            items: vec![Rewrap {
                namespace: "default".into(),
                name: ["db", "tls"][n].into(),
                version,
                from_kek_id: "k1".into(),
                kek_id: "k2".into(),
                wrapped_dek: "rewrapped".into(),
            }],
        }),
        1 => (0..2usize).prop_map(|n| Command::DeleteSecret { namespace: "default".into(), name: ["db", "tls"][n].into(), force: n == 0 }),
        1 => (0..3usize, 0..3usize).prop_map(|(u, p)| Command::PutUser {
            name: ["alice", "bob", "Bad"][u].into(),
            email: None,
            policies: vec![["readonly", "dev", "nope"][p].into()],
            create: u == 0,
        }),
        1 => (0..2usize).prop_map(|n| Command::PutPolicy {
            spec: PolicySpec {
                name: ["dev", "readonly"][n].into(),
                description: None,
                rules: vec![PolicyRule { resource: "service".into(), verbs: vec!["get".into()], namespace: "team".into() }],
            },
        }),
        1 => (0..3usize, any::<bool>()).prop_map(|(n, bootstrap)| Command::CreateToken {
            token: TokenRecord {
                id: format!("t{n}"),
                name: format!("tok{n}"),
                subject: ["alice", "root", "carol"][n].into(),
                issued_at_ms: 1,
                expires_at_ms: (n == 2).then_some(5),
                secret_hash: format!("{n:064}"),
                purpose: None,
                ..Default::default()
            },
            create_user: n == 2,
            bootstrap,
        }),
        1 => (0..3usize).prop_map(|n| Command::RevokeToken { id: format!("t{n}") }),
        1 => (0..2usize).prop_map(|n| Command::DeleteUser { name: ["alice", "bob"][n].into() }),
        1 => (0..2usize, any::<bool>()).prop_map(|(n, attach)| Command::SetUserPolicy {
            user: "alice".into(),
            policy: ["dev", "admin"][n].into(),
            attach,
        }),
        1 => (0..2usize).prop_map(|n| Command::DeletePolicy { name: ["dev", "root"][n].into() }),
    ]
}

const NAMESPACES: [&str; 2] = ["default", "team"];
const SERVICES: [&str; 3] = ["api", "db", "web"];

/// A stored service as a projection sees it: ports, VIP, policy, exposure and balancing vary.
pub fn service_record(ns: &'static str, name: &'static str) -> impl Strategy<Value = ServiceRecord> {
    (0..3u16, any::<bool>(), 0..3usize, 0..3usize, 0..3usize, 1..4u64).prop_map(
        move |(ports, vip, policy, expose, mode, generation)| {
            let spec: ServiceSpec = serde_json::from_value(serde_json::json!({
                "name": name,
                "namespace": ns,
                "image": "busybox",
                "ports": (0..ports).map(|i| serde_json::json!({"name": format!("p{i}"), "port": 8000 + i})).collect::<Vec<_>>(),
                "networkPolicy": match policy {
                    0 => serde_json::Value::Null,
                    1 => serde_json::json!({"ingress": [{"from": [{"service": "web"}]}]}),
                    _ => serde_json::json!({"egress": [{"to": [{"service": "db"}]}]}),
                },
                "expose": match expose {
                    0 => serde_json::Value::Null,
                    1 => serde_json::json!({"port": "p0", "host": format!("{name}.example")}),
                    _ => serde_json::json!({"port": 8001, "host": "shared.example", "path": "/x"}),
                },
                "discovery": match mode {
                    0 => serde_json::Value::Null,
                    1 => serde_json::json!({"mode": "load-balanced"}),
                    _ => serde_json::json!({"mode": "none"}),
                },
            }))
            .unwrap_or_default();
            ServiceRecord {
                spec,
                meta: ObjectMeta {
                    generation,
                    ..Default::default()
                },
                vip: vip.then(|| format!("10.96.0.{}", 10 + name.len())),
            }
        },
    )
}

/// What a node reports of an instance: node, phase, readiness, address and runtime vary.
pub fn instance_record(
    ns: &'static str,
    service: &'static str,
    id: String,
) -> impl Strategy<Value = InstanceRecord> {
    (0..2usize, 0..3usize, any::<bool>(), 0..3usize, any::<bool>()).prop_map(
        move |(node, phase, ready, addr, process)| InstanceRecord {
            id: id.clone(),
            namespace: ns.into(),
            service: service.into(),
            node: ["n1", "n2"][node].into(),
            runtime: if process { "process" } else { "docker" }.into(),
            phase: [Phase::Running, Phase::Exited, Phase::Pending][phase],
            ready,
            address: ["172.20.0.2", "172.20.0.3", "127.0.0.1"][addr].into(),
            runtime_id: if process {
                format!("{}", 100 + addr)
            } else {
                format!("c{addr}")
            },
            ..Default::default()
        },
    )
}

/// A service's ready endpoints.
pub fn endpoint_set(ns: &'static str, service: &'static str) -> impl Strategy<Value = EndpointSet> {
    prop::collection::vec((0..3usize, 0..2u16, 0..4usize), 0..3).prop_map(move |eps| EndpointSet {
        namespace: ns.into(),
        service: service.into(),
        endpoints: eps
            .into_iter()
            .map(|(i, p, n)| Endpoint {
                instance: format!("{service}-{i}"),
                // Containers and processes, on this node, another or none named (one node).
                address: if n == 3 {
                    "127.0.0.1".into()
                } else {
                    format!("172.20.0.{}", 2 + i)
                },
                node: ["n1", "n2", "", "n2"][n].into(),
                ports: vec![EndpointPort {
                    name: format!("p{p}"),
                    port: 8000 + p,
                    target_port: 9000 + p,
                    protocol: "tcp".into(),
                }],
            })
            .collect(),
    })
}

/// One delta over a small key space, so that objects are created, replaced and removed again.
pub fn delta() -> impl Strategy<Value = Delta> {
    (0..2usize, 0..3usize, 0..3usize).prop_flat_map(|(n, s, i)| {
        let (ns, svc) = (NAMESPACES[n], SERVICES[s]);
        prop_oneof![
            2 => prop::option::weighted(0.8, service_record(ns, svc)).prop_map(move |r| Delta::Service {
                namespace: ns.into(),
                name: svc.into(),
                record: r.map(std::sync::Arc::new),
            }),
            3 => prop::option::weighted(0.8, instance_record(ns, svc, format!("{svc}-{i}"))).prop_map(move |r| Delta::Instance {
                namespace: ns.into(),
                service: svc.into(),
                id: format!("{svc}-{i}"),
                record: r.map(std::sync::Arc::new),
            }),
            2 => prop::option::weighted(0.8, endpoint_set(ns, svc)).prop_map(move |set| Delta::Endpoints {
                namespace: ns.into(),
                service: svc.into(),
                set: set.map(std::sync::Arc::new),
            }),
            1 => prop::option::weighted(0.8, 0..3usize).prop_map(move |n| Delta::Placement {
                namespace: ns.into(),
                service: svc.into(),
                id: format!("{svc}-{i}"),
                node: n.map(|n| ["n1", "n2", "n3"][n].to_string()),
            }),
            1 => prop::option::weighted(0.8, (any::<bool>(), prop::option::of(0..2u8))).prop_map(move |r| Delta::Node {
                name: ["n1", "n2", "n3"][i].into(),
                record: r.map(|(ready, g)| std::sync::Arc::new(NodeRecord {
                    name: ["n1", "n2", "n3"][i].into(),
                    raft_id: i as u64 + 1,
                    ready,
                    since_ms: 0,
                    placed: 0,
                    gateway: g.map(|g| format!("10.0.0.{}:7864", g + 1)),
                })),
            }),
            1 => prop::option::weighted(0.8, prop::option::of("[a-z]{1,3}")).prop_map(move |r| Delta::Namespace {
                name: ns.into(),
                record: r.map(|description| std::sync::Arc::new(NamespaceRecord {
                    spec: NamespaceSpec { name: ns.into(), description, ..Default::default() },
                    meta: ObjectMeta::default(),
                })),
            }),
        ]
    })
}

/// Where a delta's object lives: the same key a later delta of that object has.
fn slot(d: &Delta) -> (u8, String, String, String) {
    match d {
        Delta::Service { namespace, name, .. } => (0, namespace.clone(), name.clone(), String::new()),
        Delta::Instance {
            namespace,
            service,
            id,
            ..
        } => (1, namespace.clone(), service.clone(), id.clone()),
        Delta::Endpoints {
            namespace, service, ..
        } => (2, namespace.clone(), service.clone(), String::new()),
        Delta::Placement {
            namespace,
            service,
            id,
            ..
        } => (3, namespace.clone(), service.clone(), id.clone()),
        Delta::Node { name, .. } => (4, name.clone(), String::new(), String::new()),
        Delta::Namespace { name, .. } => (5, name.clone(), String::new(), String::new()),
    }
}

/// The state a sequence of deltas leaves, as [`crate::delta::snapshot`] would read it: the last
/// delta of each object that still exists, services first, then instances, endpoints,
/// placements, nodes and namespaces.
pub fn fold<'a>(deltas: impl IntoIterator<Item = &'a Delta>) -> Vec<Delta> {
    let mut state: BTreeMap<(u8, String, String, String), Delta> = BTreeMap::new();
    for d in deltas {
        let exists = match d {
            Delta::Service { record, .. } => record.is_some(),
            Delta::Instance { record, .. } => record.is_some(),
            Delta::Endpoints { set, .. } => set.is_some(),
            Delta::Placement { node, .. } => node.is_some(),
            Delta::Node { record, .. } => record.is_some(),
            Delta::Namespace { record, .. } => record.is_some(),
        };
        if exists {
            state.insert(slot(d), d.clone());
        } else {
            state.remove(&slot(d));
        }
    }
    state.into_values().collect()
}

/// A node's record as a delta: ready, with `gateway` where the other nodes reach its
/// instances (none for a node that has not said yet).
pub fn node(name: &str, gateway: Option<&str>) -> Delta {
    Delta::Node {
        name: name.into(),
        record: Some(std::sync::Arc::new(NodeRecord {
            name: name.into(),
            raft_id: 2,
            ready: true,
            since_ms: 0,
            placed: 0,
            gateway: gateway.map(String::from),
        })),
    }
}
