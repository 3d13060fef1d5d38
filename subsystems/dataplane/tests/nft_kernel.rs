//! The kernel program against a real nft in a network namespace this test makes: every change
//! applied as a delta leaves exactly the table a full load of the same view gives, and a delta
//! for one service touches only that service's entries. Needs root and Debian's nftables.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::process::Command;

use rune_dataplane::nft::{self, Model};
use rune_dataplane::policy::SvcKey;
use rune_dataplane::testing::{change_one, synthetic};
use serde_json::Value;

const TABLE: &str = "runetest";
const RANGE: (u16, u16) = (20_000, 21_999);

/// A namespace this thread lives in until dropped; deleted with everything in it.
struct Netns(String);

impl Netns {
    fn enter() -> Self {
        let name = format!("rune-nft-test-{}", std::process::id());
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip(8)");
        assert!(st.success(), "ip netns add (this test needs root)");
        // Made first, so the namespace is deleted even if entering it fails.
        let ns = Netns(name);
        let f = std::fs::File::open(format!("/var/run/netns/{}", ns.0)).expect("netns file");
        // SAFETY: setns(2) on a namespace descriptor we own; it moves only this thread, and
        // the runtime below runs on it.
        assert_eq!(
            unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns"
        );
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The table as nft lists it, without what differs between equal tables: handles, counter
/// values, the order of set elements and of objects (rules keep their order in a chain).
fn listed() -> Vec<Value> {
    let out = Command::new("nft")
        .args(["-j", "list", "table", "inet", TABLE])
        .output()
        .expect("nft(8) (Debian's nftables)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("nft -j output");
    let mut objects: Vec<Value> = v["nftables"]
        .as_array()
        .expect("nftables array")
        .iter()
        .filter(|o| o.get("metainfo").is_none())
        .cloned()
        .map(|mut o| {
            scrub(&mut o);
            o
        })
        .collect();
    let key = |o: &Value| -> String {
        let (kind, body) = o.as_object().and_then(|m| m.iter().next()).expect("one key");
        let name = body
            .get("name")
            .or_else(|| body.get("chain"))
            .cloned()
            .unwrap_or_default();
        format!("{kind} {name}")
    };
    objects.sort_by_key(key);
    objects
}

fn scrub(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("handle");
            m.remove("packets");
            m.remove("bytes");
            for (k, x) in m.iter_mut() {
                scrub(x);
                if k == "elem" {
                    if let Value::Array(items) = x {
                        items.sort_by_key(|i| i.to_string());
                    }
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(scrub),
        _ => {}
    }
}

/// `t` with service `i`'s ingress allowing networks inside one another, with ports and
/// without, and an egress policy: the kernel refuses overlapping intervals in one set.
fn with_nested_networks(t: &rune_dataplane::table::Table, i: usize) -> rune_dataplane::table::Table {
    use rune_statemachine::spec::{EgressRule, IngressRule, NetworkPolicy, Peer, PortRef};
    let mut t = t.clone();
    let key = SvcKey::new("bench", &format!("s{i}"));
    let peer = |cidr: &str| Peer {
        cidr: Some(cidr.into()),
        ..Default::default()
    };
    let np = NetworkPolicy {
        ingress: vec![
            IngressRule {
                from: vec![peer("10.0.0.0/8"), peer("10.1.0.0/16"), peer("10.1.2.3/32")],
                ports: vec![PortRef::Name("http".into())],
            },
            IngressRule {
                from: vec![peer("172.16.0.0/12"), peer("172.16.5.0/24"), peer("10.9.0.0/16")],
                ports: vec![],
            },
        ],
        egress: vec![EgressRule {
            to: vec![
                Peer {
                    service: Some("s1".into()),
                    ..Default::default()
                },
                peer("192.168.0.0/16"),
                peer("192.168.1.0/24"),
            ],
            ports: vec![],
        }],
    };
    let svc = std::sync::Arc::make_mut(t.services.get_mut(&key).expect("service"));
    svc.policy = rune_dataplane::policy::compile("bench", Some(&np));
    t
}

#[test]
fn deltas_leave_the_table_a_full_load_gives() {
    let _ns = Netns::enter();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (t, ports) = synthetic(30);
    let base = Model::of(&t, &ports, RANGE);
    let changed = change_one(&t, 3, 0);
    let mut fewer = changed.clone();
    fewer.services.remove(&SvcKey::new("bench", "s5"));
    let mut fewer_ports = ports.clone();
    fewer_ports.remove(&(SvcKey::new("bench", "s5"), 80));
    let (more, more_ports) = synthetic(40);
    let nested = with_nested_networks(&changed, 4);
    let steps = [
        (
            "nested and overlapping networks, every port",
            Model::of(&nested, &ports, RANGE),
        ),
        ("one service changed", Model::of(&changed, &ports, RANGE)),
        ("one service gone", Model::of(&fewer, &fewer_ports, RANGE)),
        ("ten services added", Model::of(&more, &more_ports, RANGE)),
        (
            "the port range moved",
            Model::of(&more, &more_ports, (22_000, 23_999)),
        ),
        (
            "every service gone",
            Model::of(&rune_dataplane::table::Table::default(), &BTreeMap::new(), RANGE),
        ),
        ("all back", base.clone()),
    ];
    // Opened after entering the namespace: its socket lives there.
    let n = nft::Nft::open().expect("libnftables (Debian's nftables)");
    rt.block_on(nft::apply(&n, nft::full(TABLE, &base)))
        .expect("full load");
    // The maps and sets, with 30 services' elements, and the chains with their rules.
    let loaded = listed();
    assert!(loaded.len() > 30, "{}", loaded.len());
    let mut current = base.clone();
    for (what, next) in steps {
        rt.block_on(nft::apply(&n, nft::delta(TABLE, &current, &next)))
            .unwrap_or_else(|e| panic!("{what}: delta refused: {e}"));
        let by_delta = listed();
        rt.block_on(nft::apply(&n, nft::full(TABLE, &next)))
            .expect("full load");
        assert_eq!(
            by_delta,
            listed(),
            "{what}: the delta's table differs from a full load's"
        );
        current = next;
    }
    assert!(
        nft::delta(TABLE, &current, &current).is_empty(),
        "no change, no command"
    );
}

#[test]
fn one_services_change_touches_only_its_entries() {
    let (t, ports) = synthetic(1000);
    let base = Model::of(&t, &ports, RANGE);
    let next = Model::of(&change_one(&t, 7, 0), &ports, RANGE);
    let cmds = nft::encode(nft::delta(TABLE, &base, &next)).expect("encode");
    // Its VIP port moves from the redirect map to the refused set, and its ingress policy's
    // elements change: nothing of the other 999 services is in the batch (s6 and s8 are the
    // services next to it; s6 allows s7, whose addresses do not change).
    let v: Value = serde_json::from_str(&cmds).expect("json");
    let text = v.to_string();
    let vip = |i: u32| std::net::Ipv4Addr::from(0x0a60_0002 + i).to_string();
    assert!(text.contains(&format!("\"{}\"", vip(7))), "{text}");
    for other in [vip(6), vip(8)] {
        assert!(!text.contains(&format!("\"{other}\"")), "{other} in {text}");
    }
    // Its elements, plus the ingress chain's rules once over: its new network is the first of
    // its prefix length (/12), which gets its pair of sets.
    assert!(v["nftables"].as_array().is_some_and(|a| a.len() <= 16), "{text}");
}
