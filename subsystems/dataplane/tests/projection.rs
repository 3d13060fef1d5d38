//! The data plane's view obeys the projection contract: built from the state at one point and
//! fed every later delta, it answers exactly as a view built from the state at the end.

use proptest::prelude::*;
use rune_dataplane::table::Table;
use rune_statemachine::testing::{delta, fold};

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn fed_equals_built(ds in prop::collection::vec(delta(), 0..60), cut in 0usize..60) {
        let cut = cut.min(ds.len());
        let mut fed = Table::build("n1", &fold(&ds[..cut]));
        for d in &ds[cut..] {
            fed.apply(d);
        }
        let built = Table::build("n1", &fold(&ds));
        prop_assert_eq!(fed.digest(), built.digest());
    }
}

/// In a cluster, a process instance's loopback address is reachable only on its own node: the
/// data plane of another node leaves it out rather than proxy to its own loopback.
#[test]
fn loopback_endpoints_count_only_on_their_own_node() {
    use rune_statemachine::delta::Delta;
    use rune_statemachine::network::{Endpoint, EndpointSet};
    use std::sync::Arc;
    let spec = serde_json::json!({
        "name": "api", "process": {"command": "/bin/true"}, "scale": 2,
        "ports": [{"name": "http", "port": 80}]
    });
    let record = rune_statemachine::store::ServiceRecord {
        spec: serde_json::from_value(spec).unwrap(),
        meta: Default::default(),
        vip: Some("10.96.0.5".into()),
    };
    let ep = |id: &str, address: &str, node: &str| Endpoint {
        instance: id.into(),
        address: address.into(),
        node: node.into(),
        ports: vec![],
    };
    let deltas = [
        Delta::Service {
            namespace: "default".into(),
            name: "api".into(),
            record: Some(Arc::new(record)),
        },
        Delta::Endpoints {
            namespace: "default".into(),
            service: "api".into(),
            set: Some(Arc::new(EndpointSet {
                namespace: "default".into(),
                service: "api".into(),
                endpoints: vec![
                    ep("api-0", "127.0.0.1", "a"),
                    ep("api-1", "127.0.0.1", "b"),
                    ep("api-2", "172.17.0.4", "b"),
                ],
            })),
        },
    ];
    let on_a = Table::build("a", &deltas);
    let ids: Vec<&str> = on_a
        .get("default", "api")
        .unwrap()
        .endpoints
        .iter()
        .map(|e| e.instance.as_str())
        .collect();
    assert_eq!(ids, ["api-0", "api-2"]);
}
