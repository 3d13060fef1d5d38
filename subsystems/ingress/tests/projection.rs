//! The ingress's view obeys the projection contract: built from the state at one point and fed
//! every later delta, it routes exactly as a view built from the state at the end.

use proptest::prelude::*;
use rune_ingress::routes::Exposed;
use rune_statemachine::testing::{delta, fold};

fn build<'a>(state: impl IntoIterator<Item = &'a rune_statemachine::delta::Delta>) -> Exposed {
    let mut e = Exposed::default();
    for d in state {
        e.apply(d);
    }
    e
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn fed_equals_built(ds in prop::collection::vec(delta(), 0..60), cut in 0usize..60) {
        let cut = cut.min(ds.len());
        let mut fed = build(&fold(&ds[..cut]));
        for d in &ds[cut..] {
            fed.apply(d);
        }
        let built = build(&fold(&ds));
        prop_assert_eq!(fed.routes().by_host, built.routes().by_host);
        // A cluster's node, which reaches other nodes' endpoints through their gateways.
        let on_n1 = |state: &[rune_statemachine::delta::Delta]| {
            let mut e = Exposed::on_node("n1");
            for d in state {
                e.apply(d);
            }
            e
        };
        let mut fed = on_n1(&fold(&ds[..cut]));
        for d in &ds[cut..] {
            fed.apply(d);
        }
        prop_assert_eq!(fed.routes().by_host, on_n1(&fold(&ds)).routes().by_host);
    }
}

/// On a cluster's node, an endpoint of another node is reached through that node (by
/// instance id), never at its address, which means something only there, and only once that
/// node's gateway is known; one runed (no node) dials every endpoint where it is.
#[test]
fn endpoints_of_other_nodes_are_reached_through_them() {
    use rune_ingress::routes::Backend;
    use rune_statemachine::delta::Delta;
    use rune_statemachine::network::{Endpoint, EndpointPort, EndpointSet};
    use std::sync::Arc;
    let spec = serde_json::json!({
        "name": "web", "process": {"command": "/bin/true"}, "scale": 2,
        "ports": [{"name": "http", "port": 80}],
        "expose": {"port": "http", "host": "web.test"}
    });
    let ep = |id: &str, node: &str| Endpoint {
        instance: id.into(),
        address: "127.0.0.1".into(),
        node: node.into(),
        ports: vec![EndpointPort {
            name: "http".into(),
            port: 80,
            target_port: 8080,
            protocol: "tcp".into(),
        }],
    };
    let state = [
        Delta::Service {
            namespace: "default".into(),
            name: "web".into(),
            record: Some(Arc::new(rune_statemachine::store::ServiceRecord {
                spec: serde_json::from_value(spec).unwrap(),
                meta: Default::default(),
                vip: None,
            })),
        },
        Delta::Endpoints {
            namespace: "default".into(),
            service: "web".into(),
            set: Some(Arc::new(EndpointSet {
                namespace: "default".into(),
                service: "web".into(),
                endpoints: vec![ep("web-0", "a"), ep("web-1", "b")],
            })),
        },
    ];
    let here = |e: &Exposed| e.routes().by_host["web.test"].endpoints.clone();
    let mut on_a = Exposed::on_node("a");
    for d in &state {
        on_a.apply(d);
    }
    let local = Backend::Here("127.0.0.1:8080".parse().unwrap());
    // Node b has not said where its gateway listens: its endpoint cannot be reached yet.
    assert_eq!(here(&on_a), std::slice::from_ref(&local));
    let node_b = |gateway: Option<&str>| rune_statemachine::testing::node("b", gateway);
    assert!(
        on_a.apply(&node_b(Some("10.0.0.2:7000"))),
        "a gateway known changes the routes"
    );
    assert_eq!(here(&on_a), [local.clone(), Backend::Elsewhere("web-1".into())]);
    assert!(on_a.apply(&node_b(None)));
    assert_eq!(here(&on_a), std::slice::from_ref(&local));
    assert_eq!(here(&build(&state)), [local.clone(), local]);
}
