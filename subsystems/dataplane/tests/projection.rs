//! The data plane's view obeys the projection contract: built from the state at one point and
//! fed every later delta, it answers exactly as a view built from the state at the end.

use std::sync::Arc;

use proptest::prelude::*;
use rune_dataplane::table::Table;
use rune_statemachine::delta::Delta;
use rune_statemachine::network::{Endpoint, EndpointSet};
use rune_statemachine::testing::{delta, fold};

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn fed_equals_built(ds in prop::collection::vec(delta(), 0..60), cut in 0usize..60) {
        let cut = cut.min(ds.len());
        let mut fed = Table::build("n1", &fold(&ds[..cut]));
        for d in &ds[cut..] {
            fed.apply(d, &mut std::collections::BTreeSet::new());
        }
        let built = Table::build("n1", &fold(&ds));
        prop_assert_eq!(fed.digest(), built.digest());
    }
}

/// The deltas that cast service `name` of `default` from `spec` with `vip`, and give it
/// `endpoints`.
fn service(name: &str, spec: serde_json::Value, vip: &str, endpoints: Vec<Endpoint>) -> [Delta; 2] {
    let record = rune_statemachine::store::ServiceRecord {
        spec: serde_json::from_value(spec).unwrap(),
        meta: Default::default(),
        vip: Some(vip.into()),
    };
    [
        Delta::Service {
            namespace: "default".into(),
            name: name.into(),
            record: Some(Arc::new(record)),
        },
        Delta::Endpoints {
            namespace: "default".into(),
            service: name.into(),
            set: Some(Arc::new(EndpointSet {
                namespace: "default".into(),
                service: name.into(),
                endpoints,
            })),
        },
    ]
}

/// In a cluster, a process instance's loopback address is reachable only on its own node: the
/// data plane of another node leaves it out rather than proxy to its own loopback.
#[test]
fn loopback_endpoints_count_only_on_their_own_node() {
    let spec = serde_json::json!({
        "name": "api", "process": {"command": "/bin/true"}, "scale": 2,
        "ports": [{"name": "http", "port": 80}]
    });
    let ep = |id: &str, address: &str, node: &str| Endpoint {
        instance: id.into(),
        address: address.into(),
        node: node.into(),
        ports: vec![],
    };
    let deltas = service(
        "api",
        spec,
        "10.96.0.5",
        vec![
            ep("api-0", "127.0.0.1", "a"),
            ep("api-1", "127.0.0.1", "b"),
            ep("api-2", "172.17.0.4", "b"),
        ],
    );
    let on_a = Table::build("a", &deltas);
    let ids: Vec<&str> = on_a
        .get("default", "api")
        .unwrap()
        .endpoints
        .iter()
        .map(|e| e.instance.as_str())
        .collect();
    assert_eq!(ids, ["api-0", "api-2"]);

    // Once b says where its gateway is, a reaches both of b's instances through it, whatever
    // the order the deltas come in.
    let gw: std::net::SocketAddr = "10.0.0.2:7864".parse().unwrap();
    let node_b = rune_statemachine::testing::node("b", Some(&gw.to_string()));
    let mut fed = on_a.clone();
    let mut changed = std::collections::BTreeSet::new();
    fed.apply(&node_b, &mut changed);
    assert_eq!(
        changed.into_iter().map(|k| k.to_string()).collect::<Vec<_>>(),
        ["default/api"]
    );
    let routes = |t: &Table| -> Vec<(String, Option<std::net::SocketAddr>)> {
        t.get("default", "api")
            .unwrap()
            .endpoints
            .iter()
            .map(|e| (e.instance.clone(), e.via))
            .collect()
    };
    assert_eq!(
        routes(&fed),
        [
            ("api-0".into(), None),
            ("api-1".into(), Some(gw)),
            ("api-2".into(), Some(gw))
        ]
    );
    let first = [node_b.clone(), deltas[0].clone(), deltas[1].clone()];
    assert_eq!(Table::build("a", &first).digest(), fed.digest());
    assert!(fed.is_node(gw.ip()) && !fed.is_node("10.0.0.1".parse().unwrap()));
    // On b itself its own instances are dialled directly; a has no gateway, so a's process
    // instance is left out there.
    assert_eq!(
        routes(&Table::build("b", &first)),
        [("api-1".into(), None), ("api-2".into(), None)]
    );
    // b gone from the state: a falls back to what it had.
    fed.apply(
        &Delta::Node {
            name: "b".into(),
            record: None,
        },
        &mut std::collections::BTreeSet::new(),
    );
    assert_eq!(routes(&fed), [("api-0".into(), None), ("api-2".into(), None)]);
}

/// A service with TCP and UDP ports of one number: its endpoints serve the TCP port at the
/// TCP port's target, whichever the endpoint lists first.
#[test]
fn an_endpoint_serves_a_tcp_port_at_its_tcp_target() {
    use rune_statemachine::network::EndpointPort;
    let spec = serde_json::json!({
        "name": "dns", "process": {"command": "/bin/true"}, "scale": 1,
        "ports": [
            {"name": "dns-udp", "port": 53, "targetPort": 5354, "protocol": "udp"},
            {"name": "dns", "port": 53, "targetPort": 5353}
        ]
    });
    let port = |name: &str, target_port: u16, protocol: &str| EndpointPort {
        name: name.into(),
        port: 53,
        target_port,
        protocol: protocol.into(),
    };
    let deltas = service(
        "dns",
        spec,
        "10.96.0.6",
        vec![Endpoint {
            instance: "dns-0".into(),
            address: "172.17.0.4".into(),
            node: "a".into(),
            ports: vec![port("dns-udp", 5354, "udp"), port("dns", 5353, "tcp")],
        }],
    );
    let t = Table::build("a", &deltas);
    let svc = t.get("default", "dns").unwrap();
    assert_eq!(svc.endpoints[0].target(53), Some(5353));
}
