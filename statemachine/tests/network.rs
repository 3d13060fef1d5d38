//! Apply's VIP decisions: stable, unique, held back after release, exhaustion refused.

mod common;

use common::State;
use rune_statemachine::network::{host_key, VipHolder};
use rune_statemachine::store::{service_key, ServiceRecord};
use rune_statemachine::{Command, Rejection, Resource};

fn cast(s: &mut State, name: &str, scale: i64) -> Result<(), Rejection> {
    let spec = serde_json::from_value(serde_json::json!({"name": name, "image": "busybox", "scale": scale}))
        .unwrap();
    s.run(Command::Apply {
        resources: vec![Resource::Service(spec)],
        create_namespace: false,
        force: false,
        history_limit: 10,
        release: None,
    })
    .map(|_| ())
}

fn vip(s: &State, name: &str) -> Option<String> {
    s.get::<ServiceRecord>(&service_key("default", name))
        .and_then(|r| r.vip)
}

#[test]
fn vips_are_stable_unique_and_cool_down() {
    let mut s = State::with_network("10.96.0.0/29");
    cast(&mut s, "a", 1).unwrap();
    cast(&mut s, "b", 1).unwrap();
    assert_eq!(vip(&s, "a").as_deref(), Some("10.96.0.2"));
    assert_eq!(vip(&s, "b").as_deref(), Some("10.96.0.3"));
    // Re-cast, scale 0 and restart keep it.
    cast(&mut s, "a", 3).unwrap();
    s.run(Command::Scale {
        namespace: "default".into(),
        name: "a".into(),
        scale: 0,
    })
    .unwrap();
    s.run(Command::Restart {
        namespace: "default".into(),
        name: "a".into(),
    })
    .unwrap();
    assert_eq!(vip(&s, "a").as_deref(), Some("10.96.0.2"));

    // The range holds .2 to .6: three more fit, then casting is refused, naming the cause.
    for n in ["c", "d", "e"] {
        cast(&mut s, n, 1).unwrap();
    }
    match cast(&mut s, "f", 1) {
        Err(Rejection::FailedPrecondition(m)) => {
            assert!(m.contains("no free VIP") && m.contains("5 in use"), "{m}")
        }
        other => panic!("expected exhaustion, got {other:?}"),
    }
    // A released VIP is not handed out again during its cooldown, and then it is.
    s.run(Command::DeleteService {
        namespace: "default".into(),
        name: "b".into(),
        force: false,
    })
    .unwrap();
    match cast(&mut s, "f", 1) {
        Err(Rejection::FailedPrecondition(m)) => assert!(m.contains("1 released"), "{m}"),
        other => panic!("expected cooldown, got {other:?}"),
    }
    s.now_ms += 61_000;
    cast(&mut s, "f", 1).unwrap();
    assert_eq!(vip(&s, "f").as_deref(), Some("10.96.0.3"));
}

#[test]
fn services_cast_before_the_network_get_a_vip_when_it_is_set() {
    let mut s = State::new();
    cast(&mut s, "old", 1).unwrap();
    assert_eq!(vip(&s, "old"), None);
    s.run(Command::Init {
        cluster_cidr: Some("100.64.0.0/24".into()),
        cluster_id: None,
        policies: vec![],
        namespaces: vec![],
        claim_hosts: false,
    })
    .unwrap();
    assert_eq!(vip(&s, "old").as_deref(), Some("100.64.0.2"));
    // A public range is refused in apply too, naming the setting.
    match s.run(Command::Init {
        cluster_cidr: Some("8.8.8.0/24".into()),
        cluster_id: None,
        policies: vec![],
        namespaces: vec![],
        claim_hosts: false,
    }) {
        Err(Rejection::Invalid(m)) => assert!(m.contains("networking.cluster-cidr"), "{m}"),
        other => panic!("{other:?}"),
    }
}

fn exposed(name: &str, host: Option<&str>) -> Command {
    let mut spec = serde_json::json!({"name": name, "image": "busybox", "scale": 1,
        "ports": [{"name": "http", "port": 80}]});
    if let Some(h) = host {
        spec["expose"] = serde_json::json!({"port": "http", "host": h});
    }
    Command::Apply {
        resources: vec![Resource::Service(serde_json::from_value(spec).unwrap())],
        create_namespace: false,
        force: false,
        history_limit: 10,
        release: None,
    }
}

fn holder(s: &State, host: &str) -> Option<String> {
    s.get::<VipHolder>(&host_key(host))
        .map(|h| format!("{}/{}", h.namespace, h.service))
}

#[test]
fn one_host_routes_to_one_service() {
    let mut s = State::with_network("10.96.0.0/24");
    s.run(exposed("a", Some("Web.Example.com"))).unwrap();
    assert_eq!(holder(&s, "web.example.com").as_deref(), Some("default/a"));
    // A second service claiming it (in any case) is refused, naming the field and the holder,
    // and nothing of that cast is written.
    match s.run(exposed("b", Some("web.example.com "))) {
        Err(Rejection::AlreadyExists(m)) => assert!(
            m.contains("expose.host") && m.contains("web.example.com") && m.contains("default/a"),
            "{m}"
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(s.get::<ServiceRecord>(&service_key("default", "b")).is_none());
    // Re-casting the holder is fine; moving it to another host frees the first.
    s.run(exposed("a", Some("web.example.com"))).unwrap();
    s.run(exposed("a", Some("api.example.com"))).unwrap();
    assert_eq!(holder(&s, "web.example.com"), None);
    s.run(exposed("b", Some("web.example.com"))).unwrap();
    assert_eq!(holder(&s, "web.example.com").as_deref(), Some("default/b"));
    // Dropping the expose block, or deleting the service, frees its host.
    s.run(exposed("b", None)).unwrap();
    assert_eq!(holder(&s, "web.example.com"), None);
    s.run(Command::DeleteService {
        namespace: "default".into(),
        name: "a".into(),
        force: false,
    })
    .unwrap();
    assert_eq!(holder(&s, "api.example.com"), None);
    s.run(exposed("c", Some("api.example.com"))).unwrap();
}

#[test]
fn v2_casts_keep_their_semantics_and_init_claims_their_hosts() {
    let mut s = State::with_network("10.96.0.0/24");
    // Entries written before claims: both accepted, no claim, as that build did.
    s.run_version(2, exposed("b", Some("web.example.com"))).unwrap();
    s.run_version(2, exposed("a", Some("web.example.com"))).unwrap();
    assert_eq!(holder(&s, "web.example.com"), None);
    // The seed's backfill gives the host to the first by name (the one the ingress serves).
    s.run(Command::Init {
        namespaces: vec![],
        policies: vec![],
        cluster_cidr: None,
        cluster_id: None,
        claim_hosts: true,
    })
    .unwrap();
    assert_eq!(holder(&s, "web.example.com").as_deref(), Some("default/a"));
    assert!(!s.read(|t| rune_statemachine::store::unclaimed_hosts(t).unwrap()));
    assert!(matches!(
        s.run(exposed("c", Some("web.example.com"))),
        Err(Rejection::AlreadyExists(_))
    ));
    // Host syntax, too, is judged as the entry's build did.
    s.run_version(2, exposed("d", Some("d.example.com:8080")))
        .unwrap();
    match s.run(exposed("e", Some("e.example.com:8080"))) {
        Err(Rejection::Invalid(m)) => assert!(m.contains("expose.host"), "{m}"),
        other => panic!("expected the host refused, got {other:?}"),
    }
}
