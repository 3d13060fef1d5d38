//! The kernel program against a real nft in a network namespace this test makes: every change
//! applied as a delta leaves exactly the table a full load of the same view gives, and a delta
//! for one service touches only that service's entries. Needs root and Debian's nftables.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsRawFd;
use std::process::Command;

use rune_dataplane::live::Live;
use rune_dataplane::nft::{self, Model};
use rune_dataplane::policy::SvcKey;
use rune_dataplane::table::Table;
use rune_dataplane::testing::{change_one, synthetic};
use serde_json::Value;

const TABLE: &str = "runetest";
const RANGE: (u16, u16) = (20_000, 21_999);

/// A namespace this thread lives in until dropped; deleted with everything in it.
struct Netns(String);

impl Netns {
    fn enter() -> Self {
        // Tests run in parallel in this process: each its own namespace.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("rune-nft-test-{}-{n}", std::process::id());
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

    /// A namespace `rune-<tag>-<pid>` to be made by the caller, deleted when dropped (so
    /// also if making it, or anything after, fails).
    fn named(tag: &str) -> Netns {
        Netns(format!("rune-{tag}-{}", std::process::id()))
    }
}

/// Makes namespaces `c` and `p` and joins each to the calling thread's namespace (the node)
/// by a veth pair: `<net>.1.0/24` for `c`, `<net>.2.0/24` for `p`, the node `.1` on both and
/// their default route.
fn link_pair(c: &str, p: &str, net: &str) {
    ip(&["netns", "add", c]);
    ip(&["netns", "add", p]);
    for (ns, h, n, sub) in [
        (c, "hc0", "c0", format!("{net}.1")),
        (p, "hp0", "p0", format!("{net}.2")),
    ] {
        ip(&["link", "add", h, "type", "veth", "peer", "name", n, "netns", ns]);
        ip(&["addr", "add", &format!("{sub}.1/24"), "dev", h]);
        ip(&["link", "set", h, "up"]);
        ip(&["-n", ns, "addr", "add", &format!("{sub}.2/24"), "dev", n]);
        ip(&["-n", ns, "link", "set", n, "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        ip(&["-n", ns, "route", "add", "default", "via", &format!("{sub}.1")]);
    }
    ip(&["link", "set", "lo", "up"]);
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
/// without, and an egress policy: each length gets its own exact sets, looked up masked.
fn with_nested_networks(t: &Table, i: usize) -> Table {
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
                peer("0.0.0.0/0"),
            ],
            ports: vec![],
        }],
    };
    let svc = std::sync::Arc::make_mut(t.services.get_mut(&key).expect("service"));
    svc.policy = rune_dataplane::policy::compile("bench", Some(&np));
    t
}

type Ports = BTreeMap<(SvcKey, u16), u16>;

/// A view and its proxy ports.
type View = (Table, Ports);

/// The views both kernel tests walk through after 30 services (the first): one changed, then
/// nested and overlapping networks, one gone, ten more.
fn views() -> (View, Vec<(&'static str, View)>) {
    let (t, ports) = synthetic(30);
    let changed = change_one(&t, 3, 0);
    let mut fewer = changed.clone();
    fewer.services.remove(&SvcKey::new("bench", "s5"));
    let mut fewer_ports = ports.clone();
    fewer_ports.remove(&(SvcKey::new("bench", "s5"), 80));
    let nested = with_nested_networks(&changed, 4);
    let steps = vec![
        (
            "nested and overlapping networks, every port",
            (nested, ports.clone()),
        ),
        ("one service changed", (changed, ports.clone())),
        ("one service gone", (fewer, fewer_ports)),
        ("ten services added", synthetic(40)),
    ];
    ((t, ports), steps)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn deltas_leave_the_table_a_full_load_gives() {
    let _ns = Netns::enter();
    let rt = runtime();
    let ((t, ports), views) = views();
    let base = Model::of(&t, &ports, RANGE);
    let (more, more_ports) = &views[views.len() - 1].1;
    let mut steps: Vec<(&str, Model)> = views
        .iter()
        .map(|(what, (v, p))| (*what, Model::of(v, p, RANGE)))
        .collect();
    steps.extend([
        (
            "the port range moved",
            Model::of(more, more_ports, (22_000, 23_999)),
        ),
        (
            "every service gone",
            Model::of(&Table::default(), &BTreeMap::new(), RANGE),
        ),
        (
            "stale: every VIP back to the proxy",
            Model::of(more, more_ports, RANGE).proxied(),
        ),
        ("all back", base.clone()),
    ]);
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

/// The data plane's way: a model kept per change, each change loaded as its patch (the
/// touched elements alone), leaves the table a full load of the same view gives.
#[test]
fn patches_leave_the_table_a_full_load_gives() {
    let _ns = Netns::enter();
    let rt = runtime();
    let ((t, ports), mut views) = views();
    views.push(("every service gone", (Table::default(), BTreeMap::new())));
    views.push(("all back", (t.clone(), ports.clone())));
    let n = nft::Nft::open().expect("libnftables (Debian's nftables)");
    let mut live = Live::build(&t, &ports, RANGE);
    rt.block_on(nft::apply(&n, nft::full(TABLE, live.model())))
        .expect("full load");
    let mut before: BTreeSet<SvcKey> = t.services.keys().cloned().collect();
    for (what, (view, ports)) in &views {
        // Every service of both views is named changed: each share is computed again, and
        // the patch holds only what differs.
        let now: BTreeSet<SvcKey> = view.services.keys().cloned().collect();
        let changed: BTreeSet<SvcKey> = before.union(&now).cloned().collect();
        let patch = live.update(view, Some(&changed), ports);
        assert_eq!(live.model(), &Model::of(view, ports, RANGE), "{what}");
        rt.block_on(nft::apply(&n, nft::delta_patch(TABLE, &patch)))
            .unwrap_or_else(|e| panic!("{what}: patch refused: {e}"));
        let by_patch = listed();
        rt.block_on(nft::apply(&n, nft::full(TABLE, live.model())))
            .expect("full load");
        assert_eq!(
            by_patch,
            listed(),
            "{what}: the patch's table differs from a full load's"
        );
        before = now;
    }
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
    // its prefix length (/12), which gets its pair of sets; and its kernel forwarding gone
    // (its verdict, its two endpoints' addresses and ports, its VIP's masquerade).
    assert!(v["nftables"].as_array().is_some_and(|a| a.len() <= 22), "{text}");
}

/// Runs `ip` with these arguments, asserting it worked.
fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().expect("ip(8)");
    assert!(
        o.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Moves the calling thread into namespace `name`.
fn enter(name: &str) {
    let f = std::fs::File::open(format!("/var/run/netns/{name}")).expect("netns file");
    // SAFETY: setns(2) on a namespace descriptor we own; it moves only this thread.
    assert_eq!(
        unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) },
        0,
        "setns"
    );
}

/// Real packets through the loaded table, routed by the namespace the table lives in: a
/// "container" whose egress policy allows one network on port 80 reaches it there, is
/// dropped (and counted) on port 81, and the node's DNS port stays open to it. A second rule
/// is the published specs' `to: [cidr: 0.0.0.0/0], ports: [http]`: the name opens, at a
/// service inside the network, that service's `http` (on its instance, the target port).
#[test]
fn egress_policy_on_real_packets() {
    use rune_dataplane::table::{Mode, Svc, Table};
    use rune_statemachine::spec::{EgressRule, NetworkPolicy, Peer, PortRef, PortSpec};
    use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
    use std::time::Duration;

    let host = Netns::enter();
    // Made before anything can fail, so both are deleted with their veths.
    let (_c, _p) = (Netns::named("nft-c"), Netns::named("nft-p"));
    let (c, p) = (_c.0.clone(), _p.0.clone());
    link_pair(&c, &p, "10.200");
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("ip_forward in the namespace");

    let key = SvcKey::new("default", "client");
    let np = NetworkPolicy {
        ingress: vec![],
        egress: vec![
            EgressRule {
                to: vec![Peer {
                    cidr: Some("10.200.2.0/24".into()),
                    ..Default::default()
                }],
                ports: vec![PortRef::Number(80)],
            },
            EgressRule {
                to: vec![Peer {
                    cidr: Some("0.0.0.0/0".into()),
                    ..Default::default()
                }],
                ports: vec![PortRef::Name("http".into())],
            },
        ],
    };
    let mut t = Table::default();
    t.services.insert(
        key.clone(),
        std::sync::Arc::new(Svc {
            key: key.clone(),
            vip: None,
            mode: Mode::RoundRobin,
            ports: vec![],
            policy: rune_dataplane::policy::compile("default", Some(&np)),
            endpoints: vec![],
            local_ips: vec![IpAddr::from([10, 200, 1, 2])],
            local_instances: 1,
            moved: Vec::new(),
        }),
    );
    // A service whose instance, in the peer's namespace, listens for `http` on 82.
    let web = SvcKey::new("default", "web");
    t.services.insert(
        web.clone(),
        std::sync::Arc::new(Svc {
            key: web,
            vip: None,
            mode: Mode::RoundRobin,
            ports: vec![PortSpec {
                name: "http".into(),
                port: 80,
                target_port: Some(82),
                protocol: None,
                host_port: None,
            }],
            policy: rune_dataplane::policy::compile("default", None),
            endpoints: vec![],
            local_ips: vec![IpAddr::from([10, 200, 2, 2])],
            local_instances: 1,
            moved: Vec::new(),
        }),
    );
    let n = nft::Nft::open().expect("libnftables (Debian's nftables)");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(nft::apply(
        &n,
        nft::full(TABLE, &Model::of(&t, &BTreeMap::new(), RANGE)),
    ))
    .expect("full load");

    // Listeners in the peer's namespace on 80, 81 and 82, and in the host's on 53.
    // Bound in their namespace, kept here: the kernel completes a handshake into the backlog,
    // no accept is needed, and they close when the test ends (no thread left in a namespace).
    let _listeners: Vec<TcpListener> = [
        (p.clone(), 80u16),
        (p.clone(), 81),
        (p.clone(), 82),
        (host.0.clone(), 53),
    ]
    .into_iter()
    .map(|(ns, port)| {
        std::thread::spawn(move || {
            enter(&ns);
            TcpListener::bind(("0.0.0.0", port)).expect("bind")
        })
        .join()
        .expect("listener thread")
    })
    .collect();
    let connect = |to: &str| -> bool {
        let to: SocketAddr = to.parse().unwrap();
        let c = c.clone();
        std::thread::spawn(move || {
            enter(&c);
            TcpStream::connect_timeout(&to, Duration::from_millis(1500)).is_ok()
        })
        .join()
        .unwrap()
    };
    assert!(connect("10.200.2.2:80"), "the allowed network and port");
    assert!(!connect("10.200.2.2:81"), "another port is dropped");
    assert!(
        connect("10.200.2.2:82"),
        "the port `http` names at the service inside 0.0.0.0/0"
    );
    assert!(connect("10.200.1.1:53"), "the node's DNS stays reachable");
    let drops = rt.block_on(nft::drops(&n, TABLE)).expect("drops");
    assert!(
        drops
            .get(&("egress", "10.200.1.2".parse().unwrap()))
            .is_some_and(|n| *n >= 1),
        "{drops:?}"
    );
}

/// A TCP server in namespace `ns` on `addr` that answers each connection with
/// `"<tag> <peer address>\n"` and closes it, until [`Server::stop`].
struct Server {
    addr: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    ns: String,
}

impl Server {
    fn start(ns: &str, addr: &str, tag: &'static str) -> Server {
        use std::io::Write;
        let addr: std::net::SocketAddr = addr.parse().expect("address");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let (n, flag) = (ns.to_string(), stop.clone());
        let thread = std::thread::spawn(move || {
            enter(&n);
            let l = std::net::TcpListener::bind(addr).expect("bind");
            tx.send(()).expect("started");
            for s in l.incoming() {
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                let Ok(mut s) = s else { continue };
                let peer = s.peer_addr().map(|p| p.ip().to_string()).unwrap_or_default();
                let _ = writeln!(s, "{tag} {peer}");
            }
        });
        rx.recv().expect("server bound");
        Server {
            addr,
            stop,
            thread: Some(thread),
            ns: ns.to_string(),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // One more connection wakes its accept.
        let (ns, addr) = (self.ns.clone(), self.addr);
        let _ = std::thread::spawn(move || {
            enter(&ns);
            let _ = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(1));
        })
        .join();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a connection from namespace `ns` to `to` is answered with (`None`: no answer).
fn answer(ns: &str, to: &str) -> Option<String> {
    use std::io::Read;
    let (ns, to) = (
        ns.to_string(),
        to.parse::<std::net::SocketAddr>().expect("address"),
    );
    std::thread::spawn(move || {
        enter(&ns);
        let mut s = std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(2))).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out.trim().to_string())
    })
    .join()
    .expect("client thread")
}

/// The kernel's own forwarding with real packets. A "container" namespace reaches a VIP
/// whose two endpoints run in another namespace on this node: the kernel spreads its
/// connections over both and masquerades them (the endpoint sees this node's address); this
/// host's own connections are forwarded too, to a loopback endpoint as well; what the kernel
/// does not forward (a loopback endpoint for a container, everything once the view is
/// stale) meets the proxy's port; and a delta to one endpoint leaves only that one.
#[test]
fn the_kernel_forwards_to_local_endpoints_with_real_packets() {
    use rune_dataplane::table::{Ep, Mode, Svc, Table};
    use rune_statemachine::spec::PortSpec;
    use std::collections::BTreeSet;
    use std::net::IpAddr;

    let host = Netns::enter();
    let (_c, _p) = (Netns::named("fwd-c"), Netns::named("fwd-p"));
    let (c, p) = (_c.0.clone(), _p.0.clone());
    link_pair(&c, &p, "10.201");
    // This host's traffic to a VIP needs a route, as on any host with a default route.
    ip(&["route", "add", "default", "via", "10.201.2.2"]);
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("ip_forward in the namespace");

    let svc = |name: &str, vip: &str, eps: &[(&str, u16)]| {
        let key = SvcKey::new("default", name);
        let s = Svc {
            key: key.clone(),
            vip: Some(vip.parse().unwrap()),
            mode: Mode::RoundRobin,
            ports: vec![PortSpec {
                name: "http".into(),
                port: 80,
                target_port: None,
                protocol: None,
                host_port: None,
            }],
            policy: rune_dataplane::policy::compile("default", None),
            endpoints: eps
                .iter()
                .enumerate()
                .map(|(i, (a, port))| Ep {
                    instance: format!("{name}-{i}"),
                    ip: a.parse::<IpAddr>().unwrap(),
                    targets: vec![(80, *port)],
                    via: None,
                    here: true,
                })
                .collect(),
            local_ips: Vec::new(),
            local_instances: eps.len(),
            moved: Vec::new(),
        };
        (key, std::sync::Arc::new(s))
    };
    let view = |web: &[(&str, u16)]| {
        let mut t = Table::default();
        for (k, s) in [
            svc("web", "10.96.0.10", web),
            svc("proc", "10.96.0.11", &[("127.0.0.1", 9090)]),
        ] {
            t.services.insert(k, s);
        }
        // The "container": a service's instance on this node, by its address.
        let (k, mut client) = svc("client", "10.96.0.12", &[]);
        std::sync::Arc::make_mut(&mut client).local_ips = vec![IpAddr::from([10, 201, 1, 2])];
        t.services.insert(k, client);
        t
    };
    let ports = BTreeMap::from([
        ((SvcKey::new("default", "web"), 80), 20_001),
        ((SvcKey::new("default", "proc"), 80), 20_002),
    ]);
    let two = Model::of(
        &view(&[("10.201.2.2", 8080), ("10.201.2.2", 8081)]),
        &ports,
        RANGE,
    );
    assert_eq!(two.fast_pre.len(), 1, "{two:?}");
    assert_eq!(two.fast_out.len(), 2, "{two:?}");

    let _servers = [
        Server::start(&p, "10.201.2.2:8080", "a"),
        Server::start(&p, "10.201.2.2:8081", "b"),
        Server::start(&host.0, "127.0.0.1:9090", "proc"),
        Server::start(&host.0, "0.0.0.0:20001", "proxy-web"),
        Server::start(&host.0, "0.0.0.0:20002", "proxy-proc"),
    ];
    let n = nft::Nft::open().expect("libnftables (Debian's nftables)");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(nft::apply(&n, nft::full(TABLE, &two)))
        .expect("full load");

    let tags = |ns: &str, to: &str, times: usize| -> BTreeSet<String> {
        (0..times)
            .map(|_| answer(ns, to).unwrap_or_else(|| format!("no answer from {to}")))
            .collect()
    };
    // From the container: both endpoints, each seeing this node's address, not the client's.
    assert_eq!(
        tags(&c, "10.96.0.10:80", 40),
        BTreeSet::from(["a 10.201.2.1".to_string(), "b 10.201.2.1".to_string()])
    );
    // From this host: both endpoints again, and the loopback one.
    let from_host: BTreeSet<String> = tags(&host.0, "10.96.0.10:80", 40)
        .into_iter()
        .map(|t| t.split(' ').next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(from_host, BTreeSet::from(["a".to_string(), "b".to_string()]));
    assert_eq!(
        answer(&host.0, "10.96.0.11:80")
            .as_deref()
            .map(|t| t.split(' ').next()),
        Some(Some("proc"))
    );
    // Another host (here the endpoints' own namespace, not a container of this node): the
    // proxy's port, as before.
    assert!(
        answer(&p, "10.96.0.10:80").is_some_and(|t| t.starts_with("proxy-web ")),
        "{:?}",
        answer(&p, "10.96.0.10:80")
    );
    // A container cannot be sent to this host's loopback: the proxy's port takes it.
    assert!(
        answer(&c, "10.96.0.11:80").is_some_and(|t| t.starts_with("proxy-proc ")),
        "{:?}",
        answer(&c, "10.96.0.11:80")
    );

    // One endpoint left: only it answers.
    let one = Model::of(&view(&[("10.201.2.2", 8081)]), &ports, RANGE);
    rt.block_on(nft::apply(&n, nft::delta(TABLE, &two, &one)))
        .expect("delta");
    assert_eq!(
        tags(&c, "10.96.0.10:80", 10),
        BTreeSet::from(["b 10.201.2.1".to_string()])
    );

    // Stale: the proxy's ports take everything.
    let stale = one.clone().proxied();
    rt.block_on(nft::apply(&n, nft::delta(TABLE, &one, &stale)))
        .expect("delta");
    assert!(answer(&c, "10.96.0.10:80").is_some_and(|t| t.starts_with("proxy-web ")));
    assert!(answer(&host.0, "10.96.0.10:80").is_some_and(|t| t.starts_with("proxy-web ")));
    assert!(answer(&host.0, "10.96.0.11:80").is_some_and(|t| t.starts_with("proxy-proc ")));

    // And back, to both.
    rt.block_on(nft::apply(&n, nft::delta(TABLE, &stale, &two)))
        .expect("delta");
    assert_eq!(tags(&c, "10.96.0.10:80", 40).len(), 2);
}
