//! Apply's decisions for scale, restart, dependencies and instance events.

mod common;

use common::State;
use rune_statemachine::instance::{
    instance_key, template_hash, InstanceChange, InstanceEvent, InstanceRecord, Phase,
};
use rune_statemachine::network::{endpoints_key, EndpointPort, EndpointSet};
use rune_statemachine::store::{service_key, ServiceRecord};
use rune_statemachine::{Action, Command, Kind, Rejection, Resource};

fn svc(name: &str, scale: i64, deps: serde_json::Value) -> Command {
    cast(serde_json::json!({
        "name": name, "image": "busybox", "scale": scale, "dependencies": deps
    }))
}

/// A cast of one service spec, written as JSON.
fn cast(spec: serde_json::Value) -> Command {
    let spec = serde_json::from_value(spec).unwrap();
    Command::Apply {
        resources: vec![Resource::Service(spec)],
        create_namespace: false,
        force: false,
        history_limit: 10,
        release: None,
    }
}

fn ev(id: &str, change: InstanceChange) -> InstanceEvent {
    InstanceEvent {
        namespace: "default".into(),
        service: id.rsplit_once('-').unwrap().0.into(),
        id: id.into(),
        change,
    }
}

#[test]
fn scale_keeps_the_template_and_restart_changes_it() {
    let mut s = State::new();
    s.run(svc("api", 2, serde_json::json!([]))).unwrap();
    let before: ServiceRecord = s.get(&service_key("default", "api")).unwrap();
    let t0 = template_hash(&before.spec, &before.meta);

    let c = s
        .run(Command::Scale {
            namespace: "default".into(),
            name: "api".into(),
            scale: 0,
        })
        .unwrap();
    assert_eq!(c[0].summary, "scale 2→0");
    let stopped: ServiceRecord = s.get(&service_key("default", "api")).unwrap();
    assert_eq!(stopped.spec.scale, Some(0));
    assert_eq!(
        stopped.meta.last_non_zero_scale, 2,
        "stop remembers the last scale"
    );
    assert_eq!(
        template_hash(&stopped.spec, &stopped.meta),
        t0,
        "scaling replaces nothing"
    );

    let same = s.run(Command::Scale {
        namespace: "default".into(),
        name: "api".into(),
        scale: 0,
    });
    assert_eq!(same.unwrap()[0].action, Action::Unchanged);

    let c = s
        .run(Command::Restart {
            namespace: "default".into(),
            name: "api".into(),
        })
        .unwrap();
    assert_eq!(c[0].summary, "started again at scale 2");
    let back: ServiceRecord = s.get(&service_key("default", "api")).unwrap();
    assert_eq!(back.spec.scale, Some(2));
    assert_ne!(
        template_hash(&back.spec, &back.meta),
        t0,
        "restart replaces every instance"
    );

    let missing = s.run(Command::Scale {
        namespace: "default".into(),
        name: "nope".into(),
        scale: 1,
    });
    assert!(matches!(missing, Err(Rejection::NotFound(_))));
    let too_many = s.run(Command::Scale {
        namespace: "default".into(),
        name: "api".into(),
        scale: 5000,
    });
    assert!(matches!(too_many, Err(Rejection::Invalid(m)) if m.contains("scale")));
}

#[test]
fn cycles_are_refused_naming_the_cycle_and_dependents_block_delete() {
    let mut s = State::new();
    s.run(svc("db", 1, serde_json::json!([]))).unwrap();
    s.run(svc("api", 1, serde_json::json!(["db"]))).unwrap();
    s.run(svc(
        "web",
        1,
        serde_json::json!([{"service": "api", "readyWhen": "running"}]),
    ))
    .unwrap();
    let cyc = s.run(svc("db", 1, serde_json::json!(["web"])));
    match cyc {
        Err(Rejection::Invalid(m)) => assert!(
            m.contains("default/db -> default/web -> default/api -> default/db"),
            "{m}"
        ),
        other => panic!("cycle accepted: {other:?}"),
    }
    let db: ServiceRecord = s.get(&service_key("default", "db")).unwrap();
    assert!(db.spec.dependencies.is_empty(), "a refused cast changes nothing");

    let refused = s.run(Command::DeleteService {
        namespace: "default".into(),
        name: "db".into(),
        force: false,
    });
    assert!(matches!(refused, Err(Rejection::FailedPrecondition(m)) if m.contains("default/api")));
    s.run(Command::DeleteService {
        namespace: "default".into(),
        name: "db".into(),
        force: true,
    })
    .unwrap();
    assert!(s.get::<ServiceRecord>(&service_key("default", "db")).is_none());
}

#[test]
fn instance_events_fold_into_one_record() {
    let mut s = State::new();
    s.run(svc("api", 1, serde_json::json!([]))).unwrap();
    let key = instance_key("default", "api", "api-0");
    let c = s
        .run(Command::InstanceEvents {
            node: None,
            events: vec![
                ev(
                    "api-0",
                    InstanceChange::Scheduled {
                        node: "n1".into(),
                        runtime: "process".into(),
                        template: "t1".into(),
                        generation: 1,
                    },
                ),
                ev(
                    "api-0",
                    InstanceChange::Started {
                        address: "127.0.0.1".into(),
                        runtime_id: "4242".into(),
                        adopted: false,
                        readiness_probe: false,
                        ports: None,
                    },
                ),
            ],
        })
        .unwrap();
    assert_eq!(
        c.iter().map(|c| (c.kind, c.action)).collect::<Vec<_>>(),
        [
            (Kind::Instance, Action::Created),
            (Kind::Instance, Action::Configured),
            // The instance is ready: the service's endpoints change with it, in the same entry.
            (Kind::Endpoints, Action::Created),
        ]
    );
    let r: InstanceRecord = s.get(&key).unwrap();
    assert_eq!(
        (r.phase, r.ready, r.address.as_str()),
        (Phase::Running, true, "127.0.0.1")
    );

    s.run(Command::InstanceEvents {
        node: None,
        events: vec![
            ev(
                "api-0",
                InstanceChange::Exited {
                    code: Some(3),
                    reason: "exited with code 3".into(),
                },
            ),
            ev(
                "api-0",
                InstanceChange::Backoff {
                    restarts: 1,
                    delay_ms: 1000,
                    reason: "exited with code 3".into(),
                },
            ),
        ],
    })
    .unwrap();
    let r: InstanceRecord = s.get(&key).unwrap();
    assert_eq!((r.phase, r.restarts, r.exit_code), (Phase::Backoff, 1, Some(3)));

    s.run(Command::InstanceEvents {
        node: None,
        events: vec![ev("api-0", InstanceChange::Removed)],
    })
    .unwrap();
    assert!(s.get::<InstanceRecord>(&key).is_none());
    // Removing again is a no-op, not an error: the orchestrator may retry after a crash.
    let again = s
        .run(Command::InstanceEvents {
            node: None,
            events: vec![ev("api-0", InstanceChange::Removed)],
        })
        .unwrap();
    assert!(again.is_empty());
}

/// A rollout that moves a `targetPort` publishes each ready instance where its own run
/// listens: the instances not yet replaced on the old port, the new ones on the new. Before,
/// every endpoint took the current spec's port, and a rollout that stalled on a new instance
/// left the old ones published on a port nothing listened on.
#[test]
fn a_rollout_publishes_each_instance_on_the_port_its_run_listens_on() {
    let spec = |target: u16, image: &str| {
        cast(serde_json::json!({
            "name": "web", "image": image, "scale": 2,
            "ports": [{"name": "http", "port": 80, "targetPort": target}, {"name": "admin", "port": 81, "targetPort": target + 1}]
        }))
    };
    let run = |id: &str, address: &str, ports: Option<Vec<EndpointPort>>, adopted: bool| {
        let mut evs = Vec::new();
        if !adopted {
            evs.push(ev(
                id,
                InstanceChange::Scheduled {
                    node: "n1".into(),
                    runtime: "container".into(),
                    template: "t".into(),
                    generation: 1,
                },
            ));
        }
        evs.push(ev(
            id,
            InstanceChange::Started {
                address: address.into(),
                runtime_id: "c".into(),
                adopted,
                readiness_probe: false,
                ports,
            },
        ));
        Command::InstanceEvents {
            node: None,
            events: evs,
        }
    };
    let targets = |s: &State| -> Vec<(String, Vec<(u16, u16)>)> {
        let set: EndpointSet = s.get(&endpoints_key("default", "web")).unwrap();
        set.endpoints
            .iter()
            .map(|e| {
                (
                    e.instance.clone(),
                    e.ports.iter().map(|p| (p.port, p.target_port)).collect(),
                )
            })
            .collect()
    };
    let ports = |s: &State| -> Vec<EndpointPort> {
        let r: ServiceRecord = s.get(&service_key("default", "web")).unwrap();
        EndpointPort::of_spec(&r.spec.ports)
    };

    let mut s = State::new();
    s.run(spec(8080, "v1")).unwrap();
    let v1 = ports(&s);
    s.run(run("web-0", "10.0.0.1", Some(v1.clone()), false)).unwrap();
    s.run(run("web-1", "10.0.0.2", Some(v1.clone()), false)).unwrap();

    // The new spec moves both target ports; nothing was replaced yet.
    s.run(spec(9090, "v2")).unwrap();
    let old = vec![(80, 8080), (81, 8081)];
    let new = vec![(80, 9090), (81, 9091)];
    assert_eq!(
        targets(&s),
        [("web-0".into(), old.clone()), ("web-1".into(), old.clone())]
    );

    // web-0 is replaced by a run of the new spec; web-1 is adopted by a restarted runed
    // whose history no longer holds the spec it was started from: it sends none and keeps
    // its own.
    s.run(run("web-0", "10.0.0.3", Some(ports(&s)), false)).unwrap();
    s.run(run("web-1", "10.0.0.2", None, true)).unwrap();
    assert_eq!(
        targets(&s),
        [("web-0".into(), new.clone()), ("web-1".into(), old.clone())]
    );
    let r: InstanceRecord = s.get(&instance_key("default", "web", "web-1")).unwrap();
    assert_eq!(r.ports, v1);

    // A run reported before runs said where they listen takes the current spec's ports.
    s.run(run("web-1", "10.0.0.4", None, false)).unwrap();
    assert_eq!(
        targets(&s),
        [("web-0".into(), new.clone()), ("web-1".into(), new)]
    );
}
