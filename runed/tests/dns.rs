//! The embedded DNS through real `dig`, with a real upstream (dnsmasq) on loopback.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use common::*;
use rune_chaos_tests::{http_get, stdout, wait_until, Daemon};

const LONG: Duration = Duration::from_secs(30);

/// `(status, answers)` of `dig @dns name type`.
fn dig(dns: SocketAddr, name: &str, qtype: &str, tcp: bool) -> (String, Vec<String>) {
    let mut c = Command::new("dig");
    c.arg(format!("@{}", dns.ip())).args([
        "-p",
        &dns.port().to_string(),
        name,
        qtype,
        "+time=2",
        "+tries=1",
        "+noall",
        "+comments",
        "+answer",
    ]);
    if tcp {
        c.arg("+tcp");
    }
    let out = stdout(&c.output().expect("run dig"));
    let status = out
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("NO ANSWER")
        .to_string();
    let answers = out
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    (status, answers)
}

/// dnsmasq on loopback answering `upstream.test` and nothing else.
fn upstream() -> (common::Killed, SocketAddr) {
    let (u, addr) = common::dnsmasq("/upstream.test/192.0.2.7");
    wait_until(LONG, "dnsmasq to answer", || {
        dig(addr, "upstream.test", "A", false).0 == "NOERROR"
    });
    (u, addr)
}

fn vip_of(d: &Daemon, name: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(&run_ok(d, &["get", "svc", name, "-o", "json"])).unwrap();
    v["vip"].as_str().unwrap().to_string()
}

#[test]
fn answers_rune_names_forwards_the_rest_and_fails_closed() {
    let (_up, up) = upstream();
    let mut d = Daemon::new(&bins());
    d.extra = vec![
        "--dns-upstream".into(),
        up.to_string(),
        "--enable-failpoints".into(),
        "--stale-budget".into(),
        "1s".into(),
    ];
    d.restart();
    let f = write(&d, "web.yaml", "service:\n  name: web\n  image: busybox\n");
    run_ok(&d, &["cast", "--detach", &f]);
    let vip = vip_of(&d, "web");

    // The data plane opened the data path at start; while it is closed, .rune names fail
    // closed and other names are still forwarded.
    assert_eq!(dig(d.dns, "web.default.rune", "A", false).0, "NOERROR");
    failpoint(&d, "dns-data-path-ready", false);
    assert_eq!(dig(d.dns, "web.default.rune", "A", false).0, "SERVFAIL");
    let (status, answers) = dig(d.dns, "upstream.test", "A", false);
    assert_eq!(status, "NOERROR");
    assert!(answers.iter().any(|a| a.ends_with("A 192.0.2.7")), "{answers:?}");

    failpoint(&d, "dns-data-path-ready", true);
    for tcp in [false, true] {
        let (status, answers) = dig(d.dns, "WEB.default.rune", "A", tcp);
        assert_eq!(status, "NOERROR", "tcp {tcp}");
        assert_eq!(answers, [format!("WEB.default.rune. 5 IN A {vip}")], "tcp {tcp}");
    }
    let (status, answers) = dig(d.dns, "web.default.rune", "AAAA", false);
    assert_eq!((status.as_str(), answers.len()), ("NOERROR", 0));
    assert_eq!(dig(d.dns, "nope.default.rune", "A", false).0, "NXDOMAIN");
    assert_eq!(dig(d.dns, "web.other.rune", "A", false).0, "NXDOMAIN");
    assert_eq!(dig(d.dns, "upstream.test", "A", true).0, "NOERROR");

    // A new service answers as soon as its entry is applied.
    let f = write(&d, "api.yaml", "service:\n  name: api\n  image: busybox\n");
    run_ok(&d, &["cast", "--detach", &f]);
    let api = vip_of(&d, "api");
    wait_until(LONG, "api to answer", || {
        dig(d.dns, "api.default.rune", "A", false).1.len() == 1
    });
    assert!(dig(d.dns, "api.default.rune", "A", false).1[0].ends_with(&api));

    // A projection that lags past its budget fails closed, and recovers when it catches up.
    failpoint(&d, "dns-tail-pause", true);
    let f = write(&d, "late.yaml", "service:\n  name: late\n  image: busybox\n");
    run_ok(&d, &["cast", "--detach", &f]);
    wait_until(LONG, "DNS to fail closed while stale", || {
        dig(d.dns, "web.default.rune", "A", false).0 == "SERVFAIL"
    });
    let (_, metrics) = http_get(d.metrics, "/metrics").expect("metrics");
    let stale: f64 = metrics
        .lines()
        .find(|l| l.starts_with("rune_dataplane_stale_seconds{") && l.contains("projection=\"dns\""))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .expect("rune_dataplane_stale_seconds");
    assert!(stale > 1.0, "{stale}");
    failpoint(&d, "dns-tail-pause", false);
    wait_until(LONG, "DNS to catch up", || {
        dig(d.dns, "late.default.rune", "A", false).1.len() == 1
    });
    assert_eq!(dig(d.dns, "web.default.rune", "A", false).0, "NOERROR");

    // Deleting the service removes its name.
    run_ok(&d, &["delete", "service", "api"]);
    wait_until(LONG, "api to be gone", || {
        dig(d.dns, "api.default.rune", "A", false).0 == "NXDOMAIN"
    });
}

#[test]
fn garbage_and_truncated_packets_do_no_harm() {
    let mut d = Daemon::new(&bins());
    // Noise that parses as a query for another name is forwarded: to a port nobody answers on,
    // not to this machine's resolver.
    d.extra = vec![
        "--enable-failpoints".into(),
        "--dns-upstream".into(),
        "127.0.0.1:9".into(),
    ];
    d.restart();
    failpoint(&d, "dns-data-path-ready", true);
    let f = write(&d, "web.yaml", "service:\n  name: web\n  image: busybox\n");
    run_ok(&d, &["cast", "--detach", &f]);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    // A valid query for web.default.rune, then every truncation of it and some noise.
    let mut q = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for l in ["web", "default", "rune"] {
        q.push(l.len() as u8);
        q.extend_from_slice(l.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let mut formerr = 0;
    for cut in 0..q.len() {
        sock.send_to(&q[..cut], d.dns).unwrap();
        let mut buf = [0u8; 512];
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            assert!(
                n >= 12 && buf[..2] == [0xab, 0xcd],
                "reply to a {cut}-byte packet"
            );
            assert_eq!(buf[3] & 0x0f, 1, "FORMERR for a {cut}-byte packet");
            formerr += 1;
        }
    }
    assert!(formerr > 0, "truncated queries with a header get FORMERR");
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for _ in 0..300 {
        let len = (seed % 600) as usize;
        let pkt: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        sock.send_to(&pkt, d.dns).unwrap();
    }
    // Still answering, and right (on a fresh socket: replies to the noise may still arrive).
    let fresh = UdpSocket::bind("127.0.0.1:0").unwrap();
    fresh.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    wait_until(LONG, "an answer after the noise", || {
        fresh.send_to(&q, d.dns).unwrap();
        let mut buf = [0u8; 512];
        matches!(fresh.recv_from(&mut buf), Ok((n, _)) if n > 12 && buf[..2] == [0xab, 0xcd] && buf[3] & 0x0f == 0)
    });
    assert_eq!(dig(d.dns, "web.default.rune", "A", false).0, "NOERROR");
}

#[test]
fn containers_resolve_services_through_the_injected_dns() {
    image();
    let mut d = Daemon::new(&bins());
    d.extra = vec![
        "--enable-failpoints".into(),
        "--dns-upstream".into(),
        "127.0.0.1:9".into(),
    ];
    d.restart();
    failpoint(&d, "dns-data-path-ready", true);
    let f = write(
        &d,
        "svc.yaml",
        "services:\n  - name: web\n    image: busybox\n  - name: client\n    image: busybox\n    scale: 1\n    command: [sh, -c, 'exec sleep 3600']\n",
    );
    run_ok(&d, &["cast", "--timeout", "60s", &f]);
    let vip = vip_of(&d, "web");
    let resolv = run_ok(&d, &["exec", "client", "--", "cat", "/etc/resolv.conf"]);
    assert!(resolv.contains("search default.rune"), "{resolv}");
    wait_until(LONG, "the container to resolve web through runed", || {
        let o = d.rune(&["exec", "client", "--", "nslookup", "web.default.rune"]);
        stdout(&o).contains(&vip)
    });
    let o = d.rune(&["exec", "client", "--", "nslookup", "nope.default.rune"]);
    assert!(!stdout(&o).contains("Address: 10."), "{}", stdout(&o));
}
