//! The embedded DNS through real `dig`, with a real upstream (dnsmasq) on loopback.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use common::*;
use rune_chaos_tests::{dns_query, http_get, stdout, wait_until, Daemon};

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
        // Names are matched without case; the answer's owner is the zone's spelling.
        assert_eq!(answers, [format!("web.default.rune. 5 IN A {vip}")], "tcp {tcp}");
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
    fall_behind(&d, "dns");
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

/// `(id, rcode, answers)` of the reply to a raw query.
fn ask_raw(dns: SocketAddr, q: &[u8]) -> (u16, u8, u16) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    sock.send_to(q, dns).unwrap();
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("a DNS reply");
    assert!(n >= 12, "short reply");
    (
        u16::from_be_bytes([buf[0], buf[1]]),
        buf[3] & 0x0f,
        u16::from_be_bytes([buf[6], buf[7]]),
    )
}

#[test]
fn repeated_queries_get_kept_answers_that_follow_the_state_and_the_gate() {
    let mut d = Daemon::new(&bins());
    d.extra = vec!["--enable-failpoints".into()];
    d.restart();
    let f = write(&d, "web.yaml", "service:\n  name: web\n  image: busybox\n");
    run_ok(&d, &["cast", "--detach", &f]);
    // The same bytes again, under other IDs: each reply carries its own query's ID.
    for id in [1, 2, 3] {
        assert_eq!(ask_raw(d.dns, &dns_query(id, "web.default.rune")), (id, 0, 1));
    }
    // A burst read in batches (kept and fresh answers mixed in one sendmmsg): every query gets
    // exactly one reply, under its own ID.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let ids: Vec<u16> = (100..164).collect();
    for id in &ids {
        let name = if id % 8 == 0 {
            "nope.default.rune"
        } else {
            "web.default.rune"
        };
        sock.send_to(&dns_query(*id, name), d.dns).unwrap();
    }
    let mut replies = std::collections::BTreeMap::new();
    let mut buf = [0u8; 512];
    while replies.len() < ids.len() {
        let n = sock.recv(&mut buf).expect("a reply to every query of the burst");
        let id = u16::from_be_bytes([buf[0], buf[1]]);
        let rcode = buf[3] & 0x0f;
        assert!(
            n >= 12 && replies.insert(id, rcode).is_none(),
            "one reply per query, id {id}"
        );
    }
    for id in &ids {
        assert_eq!(replies[id], if id % 8 == 0 { 3 } else { 0 }, "id {id}");
    }
    // A kept answer never passes a closed gate.
    failpoint(&d, "dns-data-path-ready", false);
    assert_eq!(ask_raw(d.dns, &dns_query(4, "web.default.rune")).1, 2, "SERVFAIL");
    failpoint(&d, "dns-data-path-ready", true);
    assert_eq!(ask_raw(d.dns, &dns_query(5, "web.default.rune")), (5, 0, 1));
    // Nor outlives the entry that changes the name.
    assert_eq!(
        ask_raw(d.dns, &dns_query(6, "nope.default.rune")).1,
        3,
        "NXDOMAIN"
    );
    run_ok(&d, &["delete", "service", "web"]);
    wait_until(LONG, "web's name to be gone", || {
        ask_raw(d.dns, &dns_query(7, "web.default.rune")).1 == 3
    });
    let f = write(&d, "nope.yaml", "service:\n  name: nope\n  image: busybox\n");
    run_ok(&d, &["cast", "--detach", &f]);
    wait_until(LONG, "a name kept as NXDOMAIN to answer once cast", || {
        ask_raw(d.dns, &dns_query(8, "nope.default.rune")) == (8, 0, 1)
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
    for _ in 0..10_000 {
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
    // The client's container address is a local-instances row, whatever its policy.
    wait_until(LONG, "the client's container row", || {
        http_get(d.metrics, "/metrics").is_some_and(|(_, m)| {
            m.contains("rune_policy_local_instances_by_service{namespace=\"default\",service=\"client\"} 1")
        })
    });
}

/// `dig`'s whole output for these arguments against `dns`.
fn dig_out(dns: SocketAddr, args: &[&str]) -> String {
    let o = Command::new("dig")
        .arg(format!("@{}", dns.ip()))
        .args(["-p", &dns.port().to_string(), "+time=2", "+tries=1"])
        .args(args)
        .output()
        .expect("run dig");
    stdout(&o)
}

/// The records of one section of dig's output (`ANSWER`, `AUTHORITY`, `ADDITIONAL`), each
/// with its whitespace collapsed.
fn section(out: &str, name: &str) -> Vec<String> {
    out.split(&format!(";; {name} SECTION:\n"))
        .nth(1)
        .map(|rest| {
            rest.lines()
                .take_while(|l| !l.trim().is_empty())
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn srv_ptr_negative_answers_edns_and_truncation() {
    // Five 200-byte TXT records: more than a 512-byte UDP answer holds.
    let mut up = vec!["--address=/upstream.test/192.0.2.7".to_string()];
    up.extend((0..5).map(|i| format!("--txt-record=big.test,{}", format!("{i}").repeat(200))));
    let (_up, up) = common::dnsmasq_with(&up);
    wait_until(LONG, "dnsmasq to answer", || {
        dig(up, "upstream.test", "A", false).0 == "NOERROR"
    });
    let mut d = Daemon::new(&bins());
    d.extra = vec!["--dns-upstream".into(), up.to_string()];
    d.restart();
    let f = write(
        &d,
        "api.yaml",
        "service:\n  name: api\n  image: busybox\n  ports:\n    - name: http\n      port: 80\n    - name: dns\n      port: 53\n      protocol: udp\n",
    );
    run_ok(&d, &["cast", "--detach", &f]);
    let vip = vip_of(&d, "api");
    wait_until(LONG, "api to answer", || {
        dig(d.dns, "api.default.rune", "A", false).1.len() == 1
    });

    // SRV per named port, the target's address alongside.
    let out = dig_out(d.dns, &["_http._tcp.api.default.rune", "SRV"]);
    assert_eq!(
        section(&out, "ANSWER"),
        ["_http._tcp.api.default.rune. 5 IN SRV 0 0 80 api.default.rune."],
        "{out}"
    );
    assert!(
        section(&out, "ADDITIONAL").contains(&format!("api.default.rune. 5 IN A {vip}")),
        "{out}"
    );
    let out = dig_out(d.dns, &["_dns._udp.api.default.rune", "SRV"]);
    assert_eq!(
        section(&out, "ANSWER"),
        ["_dns._udp.api.default.rune. 5 IN SRV 0 0 53 api.default.rune."],
        "{out}"
    );

    // PTR for the VIP in the cluster network's reverse zone; other addresses there do not exist.
    let out = dig_out(d.dns, &["-x", &vip]);
    let reverse: Vec<&str> = vip.split('.').rev().collect();
    assert_eq!(
        section(&out, "ANSWER"),
        [format!(
            "{}.in-addr.arpa. 5 IN PTR api.default.rune.",
            reverse.join(".")
        )],
        "{out}"
    );
    let out = dig_out(d.dns, &["-x", "10.96.250.250"]);
    assert!(out.contains("status: NXDOMAIN"), "{out}");
    assert!(
        section(&out, "AUTHORITY")[0].starts_with("96.10.in-addr.arpa. 5 IN SOA "),
        "{out}"
    );

    // Negative answers carry the zone's SOA (5 s negative TTL); an existing name without the
    // type, or with names below it only, is NODATA.
    let soa = |out: &str| section(out, "AUTHORITY").first().cloned().unwrap_or_default();
    let out = dig_out(d.dns, &["nope.default.rune", "A"]);
    assert!(out.contains("status: NXDOMAIN"), "{out}");
    assert!(
        soa(&out).starts_with("rune. 5 IN SOA dns.rune. hostmaster.rune. "),
        "{out}"
    );
    assert!(soa(&out).ends_with(" 60 30 600 5"), "{out}");
    for (name, qtype) in [
        ("api.default.rune", "AAAA"),
        ("default.rune", "A"),
        ("_tcp.api.default.rune", "A"),
    ] {
        let out = dig_out(d.dns, &[name, qtype]);
        assert!(out.contains("status: NOERROR"), "{name} {qtype}: {out}");
        assert!(section(&out, "ANSWER").is_empty(), "{name} {qtype}: {out}");
        assert!(soa(&out).starts_with("rune. 5 IN SOA "), "{name} {qtype}: {out}");
    }

    // EDNS is answered with EDNS, and its absence without.
    assert!(dig_out(d.dns, &["+edns=0", "api.default.rune"]).contains("; EDNS: version: 0"));
    assert!(!dig_out(d.dns, &["+noedns", "api.default.rune"]).contains("; EDNS:"));

    // An answer too big for 512 bytes of UDP is truncated (TC); over TCP it comes whole, the
    // forwarder having fetched it from the upstream over TCP as well.
    let out = dig_out(d.dns, &["+noedns", "+ignore", "big.test", "TXT"]);
    let flags = out
        .split("flags:")
        .nth(1)
        .and_then(|f| f.split(';').next())
        .unwrap_or_default();
    assert!(flags.contains("tc"), "{out}");
    let out = dig_out(d.dns, &["+tcp", "big.test", "TXT"]);
    assert_eq!(section(&out, "ANSWER").len(), 5, "{out}");
}

/// unbound in front of runed, as a host's caching resolver would be.
fn unbound(dir: &std::path::Path, runed_dns: SocketAddr) -> (common::Killed, SocketAddr) {
    let port = rune_chaos_tests::free_port();
    let conf = dir.join("unbound.conf");
    std::fs::write(
        &conf,
        format!(
            "server:\n  interface: 127.0.0.1\n  port: {port}\n  username: \"\"\n  chroot: \"\"\n  directory: \"{d}\"\n  pidfile: \"\"\n  do-daemonize: no\n  use-syslog: no\n  do-ip6: no\n  do-not-query-localhost: no\n  module-config: \"iterator\"\n  qname-minimisation: no\nremote-control:\n  control-enable: yes\n  control-use-cert: no\n  control-interface: {d}/unbound.ctl\nstub-zone:\n  name: \"rune.\"\n  stub-addr: {ip}@{p}\n",
            d = dir.display(),
            ip = runed_dns.ip(),
            p = runed_dns.port(),
        ),
    )
    .expect("write unbound.conf");
    let child = Command::new("unbound")
        .args(["-d", "-c"])
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("unbound (Debian's unbound)");
    (common::Killed(child), ([127, 0, 0, 1], port).into())
}

/// A counter from `unbound-control stats_noreset`.
fn unbound_stat(dir: &std::path::Path, key: &str) -> u64 {
    let o = Command::new("unbound-control")
        .arg("-c")
        .arg(dir.join("unbound.conf"))
        .arg("stats_noreset")
        .output()
        .expect("unbound-control");
    stdout(&o)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_caching_resolver_in_front_caches_negative_answers() {
    let mut d = Daemon::new(&bins());
    d.extra = vec!["--dns-upstream".into(), "127.0.0.1:9".into()];
    d.restart();
    let f = write(&d, "web.yaml", "service:\n  name: web\n  image: busybox\n");
    run_ok(&d, &["cast", "--detach", &f]);
    let dir = tempfile::tempdir().expect("tempdir");
    let (_u, u) = unbound(dir.path(), d.dns);
    wait_until(LONG, "unbound to answer through runed", || {
        dig(u, "web.default.rune", "A", false).1.len() == 1
    });
    let hits = unbound_stat(dir.path(), "total.num.cachehits");
    // The second NXDOMAIN comes from unbound's cache: runed's SOA made it cacheable.
    assert_eq!(dig(u, "nope.default.rune", "A", false).0, "NXDOMAIN");
    assert_eq!(dig(u, "nope.default.rune", "A", false).0, "NXDOMAIN");
    assert_eq!(unbound_stat(dir.path(), "total.num.cachehits"), hits + 1);
}

/// An upstream that tells its transports apart: any A question is answered 192.0.2.1 over UDP
/// and 192.0.2.2 over TCP (python3, TTL 0 so no cache hides which was asked).
fn two_faced_upstream() -> (common::Killed, SocketAddr) {
    let port = rune_chaos_tests::free_port();
    let script = r#"
import socket, struct, sys, threading
port = int(sys.argv[1])
def answer(q, ip):
    end = 12
    while q[end] != 0:
        end += q[end] + 1
    end += 5
    head = q[:2] + b"\x81\x80" + b"\x00\x01\x00\x01\x00\x00\x00\x00"
    rr = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x00\x00\x04" + socket.inet_aton(ip)
    return head + q[12:end] + rr
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", port))
    while True:
        q, peer = s.recvfrom(4096)
        s.sendto(answer(q, "192.0.2.1"), peer)
def serve(c):
    while True:
        n = c.recv(2)
        if len(n) < 2:
            return
        q = b""
        want = struct.unpack("!H", n)[0]
        while len(q) < want:
            q += c.recv(want - len(q))
        a = answer(q, "192.0.2.2")
        c.sendall(struct.pack("!H", len(a)) + a)
t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("127.0.0.1", port))
t.listen(16)
threading.Thread(target=udp, daemon=True).start()
while True:
    c, _ = t.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;
    let child = Command::new("python3")
        .args(["-c", script, &port.to_string()])
        .spawn()
        .expect("python3");
    (common::Killed(child), ([127, 0, 0, 1], port).into())
}

#[test]
fn a_query_over_tcp_is_forwarded_over_tcp() {
    let (_up, up) = two_faced_upstream();
    wait_until(LONG, "the upstream to answer", || {
        dig(up, "x.test", "A", true).1.len() == 1
    });
    let mut d = Daemon::new(&bins());
    d.extra = vec!["--dns-upstream".into(), up.to_string()];
    d.restart();
    let (status, answers) = dig(d.dns, "x.test", "A", true);
    assert_eq!(status, "NOERROR");
    assert!(
        answers.iter().all(|a| a.ends_with("A 192.0.2.2")) && !answers.is_empty(),
        "{answers:?}"
    );
    let (_, answers) = dig(d.dns, "y.test", "A", false);
    assert!(
        answers.iter().all(|a| a.ends_with("A 192.0.2.1")) && !answers.is_empty(),
        "{answers:?}"
    );
}

/// Records that were never built (the state's first read failed: here a service record that
/// no longer decodes when runed starts) fail closed at once: SERVFAIL, which resolvers retry,
/// not an NXDOMAIN for a name that exists, which they would cache; health says why.
#[test]
fn records_never_built_fail_closed() {
    let mut d = Daemon::new(&bins());
    d.extra = vec![
        "--enable-failpoints".into(),
        "--stale-budget".into(),
        "300s".into(),
    ];
    d.restart();
    let f = write(&d, "web.yaml", "service:\n  name: web\n  image: busybox\n");
    run_ok(&d, &["cast", "--detach", &f]);
    wait_until(LONG, "web to answer", || {
        dig(d.dns, "web.default.rune", "A", false).0 == "NOERROR"
    });
    corrupt_service(&d, "default", "web");
    d.sigterm();
    // Not `restart`: it waits for a healthy runed, which this one is not.
    d.spawn();
    wait_until(LONG, "the DNS to answer again", || {
        let status = dig(d.dns, "web.default.rune", "A", false).0;
        assert_ne!(status, "NXDOMAIN", "a name that exists was denied");
        status == "SERVFAIL"
    });
    assert_eq!(dig(d.dns, "nope.default.rune", "A", false).0, "SERVFAIL");
    let (code, health) = http_get(d.http, "/healthz?verbose").expect("healthz");
    assert_eq!(code, 503, "{health}");
    assert!(health.contains("[-]dns never built from the state"), "{health}");
}

/// Listening on every address with itself named as upstream (resolv.conf's `nameserver
/// 127.0.0.1` on a host whose runed serves port 53 there): runed leaves itself out, says so,
/// and answers other names at once instead of forwarding them round in a loop.
#[test]
fn a_server_never_forwards_to_itself() {
    let mut d = Daemon::new(&bins());
    let port = rune_chaos_tests::free_port();
    d.dns = SocketAddr::from(([127, 0, 0, 1], port));
    d.extra = vec![
        "--dns-addr".into(),
        format!("0.0.0.0:{port}"),
        "--dns-upstream".into(),
        format!("127.0.0.1:{port}"),
    ];
    d.restart();
    assert!(
        d.logs().contains("an upstream is this server itself"),
        "{}",
        d.logs()
    );
    let (status, _) = dig(d.dns, "example.org", "A", false);
    assert_ne!(status, "NO ANSWER", "the query was forwarded round");
}
