//! Placement in apply: instances spread over the ready nodes by count, pinned ones go to their
//! node, scale and deletion take placements back, a node found gone gives its instances to
//! the others, and a node's reports about an instance placed elsewhere are ignored.

mod common;

use std::collections::BTreeMap;

use common::State;
use rune_statemachine::instance::{instance_key, InstanceChange, InstanceEvent, InstanceRecord};
use rune_statemachine::store::nodes::{
    node_key, placement_key, NodeRecord, PlacementRecord, HIGHEST_RAFT_ID_KEY,
};
use rune_statemachine::{Command, Rejection, Resource};

fn svc(name: &str, scale: i64, pin: Option<&str>) -> Command {
    let mut spec = serde_json::json!({ "name": name, "image": "busybox", "scale": scale });
    if let Some(n) = pin {
        spec["placement"] = serde_json::json!({ "node": n });
    }
    Command::Apply {
        resources: vec![Resource::Service(serde_json::from_value(spec).unwrap())],
        create_namespace: false,
        force: false,
        history_limit: 10,
        release: None,
    }
}

fn register(s: &mut State, name: &str, raft_id: u64) {
    s.run(Command::RegisterNode {
        name: name.into(),
        raft_id,
        gateway: None,
    })
    .unwrap();
}

/// Instance id → node, for one service.
fn placed(s: &State, name: &str, scale: usize) -> BTreeMap<String, String> {
    (0..scale + 2)
        .filter_map(|i| {
            let id = format!("{name}-{i}");
            s.get::<PlacementRecord>(&placement_key("default", name, &id))
                .map(|p| (id, p.node))
        })
        .collect()
}

fn count(s: &State, node: &str) -> u64 {
    s.get::<NodeRecord>(&node_key(node)).unwrap().placed
}

#[test]
fn instances_spread_by_count_follow_the_scale_and_leave_a_node_that_is_gone() {
    let mut s = State::new();
    // A single node registers nothing: nothing is placed, everything runs where it is.
    s.run(svc("early", 2, None)).unwrap();
    assert!(placed(&s, "early", 2).is_empty());

    register(&mut s, "a", 1);
    // The first node takes what waited for one.
    assert_eq!(placed(&s, "early", 2).values().collect::<Vec<_>>(), ["a", "a"]);
    register(&mut s, "b", 2);
    register(&mut s, "c", 3);
    s.run(svc("api", 3, None)).unwrap();
    let api = placed(&s, "api", 3);
    // b and c had none, a had two: api goes to b, c, then the least loaded by name.
    assert_eq!(api.values().collect::<Vec<_>>(), ["b", "c", "b"]);
    assert_eq!((count(&s, "a"), count(&s, "b"), count(&s, "c")), (2, 2, 1));

    // Scaling down takes back the highest instances; up places the new ones.
    s.run(Command::Scale {
        namespace: "default".into(),
        name: "api".into(),
        scale: 1,
    })
    .unwrap();
    assert_eq!(placed(&s, "api", 3).len(), 1);
    assert_eq!((count(&s, "a"), count(&s, "b"), count(&s, "c")), (2, 1, 0));
    s.run(Command::Scale {
        namespace: "default".into(),
        name: "api".into(),
        scale: 4,
    })
    .unwrap();
    assert_eq!(placed(&s, "api", 4).len(), 4);
    assert_eq!(count(&s, "a") + count(&s, "b") + count(&s, "c"), 6);

    // b is found gone: its instances move to the others, none to b.
    let on_b: Vec<String> = placed(&s, "api", 4)
        .into_iter()
        .filter(|(_, n)| n == "b")
        .map(|(id, _)| id)
        .collect();
    assert!(!on_b.is_empty());
    s.run(Command::SetNodeReady {
        name: "b".into(),
        ready: false,
    })
    .unwrap();
    let after = placed(&s, "api", 4);
    assert_eq!(after.len(), 4);
    assert!(after.values().all(|n| n != "b"), "{after:?}");
    assert_eq!(count(&s, "b"), 0);
    // Back, it takes new instances only: nothing moves back.
    s.run(Command::SetNodeReady {
        name: "b".into(),
        ready: true,
    })
    .unwrap();
    assert_eq!(placed(&s, "api", 4), after);
    s.run(svc("web", 1, None)).unwrap();
    assert_eq!(placed(&s, "web", 1)["web-0"], "b");

    // Deleting a service frees its placements.
    s.run(Command::DeleteService {
        namespace: "default".into(),
        name: "api".into(),
        force: false,
    })
    .unwrap();
    assert!(placed(&s, "api", 4).is_empty());
    assert_eq!(count(&s, "a") + count(&s, "b") + count(&s, "c"), 3);
}

#[test]
fn a_pinned_service_runs_on_its_node_or_waits_for_it() {
    let mut s = State::new();
    register(&mut s, "a", 1);
    register(&mut s, "b", 2);
    s.run(svc("db", 2, Some("b"))).unwrap();
    assert_eq!(placed(&s, "db", 2).values().collect::<Vec<_>>(), ["b", "b"]);
    s.run(Command::SetNodeReady {
        name: "b".into(),
        ready: false,
    })
    .unwrap();
    assert!(placed(&s, "db", 2).is_empty(), "a pinned instance does not move");
    s.run(Command::SetNodeReady {
        name: "b".into(),
        ready: true,
    })
    .unwrap();
    assert_eq!(placed(&s, "db", 2).len(), 2);
    // Re-pinned to a: moved there.
    s.run(svc("db", 2, Some("a"))).unwrap();
    assert_eq!(placed(&s, "db", 2).values().collect::<Vec<_>>(), ["a", "a"]);
    // A pin that is no node name is refused at cast.
    let bad = s.run(svc("db", 2, Some("no/such")));
    assert!(
        matches!(&bad, Err(Rejection::Invalid(m)) if m.contains("placement.node")),
        "{bad:?}"
    );
}

#[test]
fn names_and_raft_ids_are_one_to_one() {
    let mut s = State::new();
    register(&mut s, "a", 1);
    let taken = s.run(Command::RegisterNode {
        name: "a".into(),
        raft_id: 2,
        gateway: None,
    });
    assert!(
        matches!(&taken, Err(Rejection::AlreadyExists(m)) if m.contains("taken by raft node 1")),
        "{taken:?}"
    );
    let renamed = s.run(Command::RegisterNode {
        name: "a2".into(),
        raft_id: 1,
        gateway: None,
    });
    assert!(
        matches!(&renamed, Err(Rejection::AlreadyExists(m)) if m.contains("--node-name a")),
        "{renamed:?}"
    );
    let unknown = s.run(Command::SetNodeReady {
        name: "zz".into(),
        ready: false,
    });
    assert!(matches!(unknown, Err(Rejection::NotFound(_))));

    // A node taken out of the cluster frees its name and gives its instances away; its raft id
    // stays counted, so a node that joins later never gets it.
    register(&mut s, "b", 5);
    s.run(svc("api", 2, None)).unwrap();
    s.run(Command::ForgetNode { name: "b".into() }).unwrap();
    assert!(s.get::<NodeRecord>(&node_key("b")).is_none());
    assert_eq!(placed(&s, "api", 2).values().collect::<Vec<_>>(), ["a", "a"]);
    assert_eq!(s.get::<u64>(HIGHEST_RAFT_ID_KEY), Some(5));
    register(&mut s, "b", 6);
}

#[test]
fn a_node_reporting_on_an_instance_placed_elsewhere_is_ignored() {
    let mut s = State::new();
    register(&mut s, "a", 1);
    register(&mut s, "b", 2);
    s.run(svc("api", 1, Some("a"))).unwrap();
    let ev = |change: InstanceChange| InstanceEvent {
        namespace: "default".into(),
        service: "api".into(),
        id: "api-0".into(),
        change,
    };
    let scheduled = |node: &str| {
        ev(InstanceChange::Scheduled {
            node: node.into(),
            runtime: "container".into(),
            template: "t".into(),
            generation: 1,
        })
    };
    let report = |s: &mut State, node: &str, e: InstanceEvent| {
        s.run(Command::InstanceEvents {
            events: vec![e],
            node: Some(node.into()),
        })
        .unwrap();
    };
    let record = |s: &State| s.get::<InstanceRecord>(&instance_key("default", "api", "api-0"));
    report(&mut s, "b", scheduled("b"));
    assert!(record(&s).is_none(), "b is not where api-0 is placed");
    report(&mut s, "a", scheduled("a"));
    assert_eq!(record(&s).unwrap().node, "a");
    // Moved to b (re-pinned); a's late report changes nothing, b takes the record over.
    s.run(svc("api", 1, Some("b"))).unwrap();
    report(&mut s, "a", ev(InstanceChange::Removed));
    assert_eq!(record(&s).unwrap().node, "a");
    report(&mut s, "b", scheduled("b"));
    assert_eq!(record(&s).unwrap().node, "b");
    // Unsigned reports (a single node, older entries) apply as before.
    s.run(Command::InstanceEvents {
        events: vec![ev(InstanceChange::Removed)],
        node: None,
    })
    .unwrap();
    assert!(record(&s).is_none());
}

/// A node says where its gateway is at each start; a new address replaces the old one, the
/// same one again writes nothing, and one that is no address is refused naming it.
#[test]
fn a_node_records_its_gateway() {
    let mut s = State::new();
    let at = |s: &State| s.get::<NodeRecord>(&node_key("a")).and_then(|n| n.gateway);
    let reg = |s: &mut State, gateway: Option<&str>| {
        s.run(Command::RegisterNode {
            name: "a".into(),
            raft_id: 1,
            gateway: gateway.map(String::from),
        })
    };
    reg(&mut s, Some("10.0.0.1:7864")).unwrap();
    assert_eq!(at(&s).as_deref(), Some("10.0.0.1:7864"));
    assert!(
        reg(&mut s, Some("10.0.0.1:7864")).unwrap().is_empty(),
        "nothing changed"
    );
    assert!(!reg(&mut s, Some("10.0.0.9:7000")).unwrap().is_empty());
    assert_eq!(at(&s).as_deref(), Some("10.0.0.9:7000"));
    let bad = reg(&mut s, Some("node-a:7864"));
    assert!(
        matches!(&bad, Err(Rejection::Invalid(m)) if m.contains("gateway 'node-a:7864'")),
        "{bad:?}"
    );
    assert_eq!(
        at(&s).as_deref(),
        Some("10.0.0.9:7000"),
        "a refusal writes nothing"
    );
}
