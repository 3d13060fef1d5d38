//! Replay determinism: random command sequences through the real log, then the state rebuilt
//! from the log alone must be byte-identical to the live state, every time.

use proptest::prelude::*;
use rune_log::replay::Replay;
use rune_log::{Log, LogConfig};
use rune_statemachine::command::Rewrap;
use rune_statemachine::identity::{PolicyRule, PolicySpec, TokenRecord};
use rune_statemachine::instance::{InstanceChange, InstanceEvent};
use rune_statemachine::secret::{Configmap, SealedSecret};
use rune_statemachine::spec::{NamespaceSpec, PortSpec, ServiceSpec, Text};
use rune_statemachine::{Command, Resource};

fn service() -> impl Strategy<Value = Resource> {
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

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        4 => (prop::collection::vec(service(), 1..3), any::<bool>(), any::<bool>(), 1..4u32).prop_map(
            |(resources, create_namespace, force, history_limit)| Command::Apply { resources, create_namespace, force, history_limit }
        ),
        1 => (0..3usize).prop_map(|n| Command::Apply {
            resources: vec![Resource::Namespace(NamespaceSpec { name: ["team", "ops", "x"][n].into(), ..Default::default() })],
            create_namespace: false,
            force: false,
            history_limit: 10,
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
        2 => prop::collection::vec((0..3usize, 0..3usize, 0..8usize), 1..4).prop_map(|evs| Command::InstanceEvents {
            events: evs.into_iter().map(|(svc, i, e)| {
                let service = ["api", "db", "web"][svc].to_string();
                InstanceEvent {
                    namespace: "default".into(),
                    id: format!("{service}-{i}"),
                    service,
                    change: match e {
                        0 => InstanceChange::Scheduled { node: "n1".into(), runtime: "process".into(), template: "t".into(), generation: 1 },
                        1 => InstanceChange::Started { address: "127.0.0.1".into(), runtime_id: "42".into(), adopted: false, readiness_probe: true },
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
        }),
        1 => (0..2usize, 0..2usize).prop_map(|(n, v)| Command::Apply {
            resources: vec![Resource::Configmap(Configmap {
                namespace: "default".into(),
                name: ["cfg", "other"][n].into(),
                data: [("mode".to_string(), ["a", "b"][v].to_string())].into_iter().collect(),
            })],
            create_namespace: false,
            force: false,
            history_limit: 10,
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
        1 => (0..2usize).prop_map(|n| Command::DeleteSecret { namespace: "default".into(), name: ["db", "tls"][n].into() }),
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn rebuilding_from_the_log_gives_identical_state(cmds in prop::collection::vec(command(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let cfg = LogConfig { snapshot_every: 15, keep_after_snapshot: 3, ..LogConfig::new(dir.path()) };
            let log = Log::open(cfg).await.unwrap();
            log.propose(Command::Init { policies: rune_statemachine::identity::builtin_policies(), namespaces: vec!["system".into(), "default".into()], cluster_cidr: Some("10.96.0.0/29".into()), cluster_id: Some("determinism".into()) }).await.unwrap();
            for c in cmds {
                log.propose(c).await.unwrap();
            }
            log.close().await.unwrap();
        });
        let replay = Replay::open(dir.path()).unwrap();
        let v = replay.verify().unwrap();
        prop_assert_eq!(v.first_difference.clone(), None, "{:?}", v);
        prop_assert_eq!(&v.live_digest, &v.rebuilt_digest);
        // And again: apply is a function of the entries alone.
        let again = replay.verify().unwrap();
        prop_assert_eq!(&again.rebuilt_digest, &v.rebuilt_digest);
    }
}
