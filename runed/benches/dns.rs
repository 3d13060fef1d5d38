//! The embedded DNS against unbound, side by side on this machine, and the time from a cast to
//! its name answering.
//!
//! `cargo bench -p runed --bench dns` (needs Debian's dnsperf and unbound) prints:
//! - dnsperf queries/s and average latency for 100 `.rune` names, against runed and against
//!   unbound serving the same names as local-data, and their ratio; the average latency both at
//!   full speed and at one fixed load (half of unbound's rate), where it is the servers' own;
//! - one client's per-query latency p50/p99 against each (sequential, so it is the latency of a
//!   query, not of a queue);
//! - the time from the Apply call to the new name answering, p50/p99 over 50 casts.
//!
//! dnsperf queries from 8 sockets; `BENCH_DNS_SOCKETS=64` stands for many clients, each
//! querying from its own port (a node's containers), which changes how both servers fare.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rune_chaos_tests::{free_port, wait_until, Bins, Daemon};
use rune_proto::v1 as pb;

const NAMES: usize = 100;

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1));
    v.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

/// dnsperf for 10 s, as fast as it can or at `rate` queries/s: (queries/s, average latency in
/// µs).
fn dnsperf(server: SocketAddr, file: &std::path::Path, rate: Option<f64>) -> (f64, f64) {
    let mut cmd = Command::new("dnsperf");
    cmd.args(["-s", &server.ip().to_string(), "-p", &server.port().to_string()])
        .arg("-d")
        .arg(file)
        .args(["-l", "10", "-q", "200", "-c"])
        .arg(sockets().to_string());
    if let Some(r) = rate {
        cmd.args(["-Q", &format!("{r:.0}")]);
    }
    let o = cmd.output().expect("dnsperf (Debian's dnsperf)");
    let out = String::from_utf8_lossy(&o.stdout);
    let field = |label: &str| -> f64 {
        out.lines()
            .find(|l| l.trim_start().starts_with(label))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    (field("Queries per second"), field("Average Latency (s)") * 1e6)
}

/// dnsperf's client sockets: `BENCH_DNS_SOCKETS` (1-256), 8 unless set.
fn sockets() -> u32 {
    std::env::var("BENCH_DNS_SOCKETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| (1..=256).contains(n))
        .unwrap_or(8)
}

/// Each field's median over the rounds.
fn medians(v: &[(f64, f64, f64)]) -> (f64, f64, f64) {
    (
        common::median(v.iter().map(|r| r.0).collect()),
        common::median(v.iter().map(|r| r.1).collect()),
        common::median(v.iter().map(|r| r.2).collect()),
    )
}

/// One client, one query at a time: per-query latencies.
fn sequential(server: SocketAddr, names: &[String], n: usize) -> Vec<Duration> {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut out = Vec::with_capacity(n);
    let mut buf = [0u8; 512];
    for i in 0..n {
        let q = common::dns_query(i as u16, &names[i % names.len()]);
        let t = Instant::now();
        sock.send_to(&q, server).unwrap();
        if sock.recv_from(&mut buf).is_ok() {
            out.push(t.elapsed());
        }
    }
    out
}

fn main() {
    let bins = Bins::locate();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut d = Daemon::new(&bins);
    d.extra = vec![
        "--enable-failpoints".into(),
        "--dns-upstream".into(),
        "127.0.0.1:9".into(),
    ];
    d.restart();
    let st = Command::new("curl")
        .args(["-sf", "-X", "POST"])
        .arg(format!(
            "http://{}/debug/failpoints/dns-data-path-ready/on",
            d.http
        ))
        .stdout(Stdio::null())
        .status()
        .expect("curl");
    assert!(st.success());
    let ch = rt.block_on(async {
        let c = tonic::transport::Channel::from_shared(format!("http://{}", d.grpc))
            .unwrap()
            .connect()
            .await
            .expect("connect");
        tonic::service::interceptor::InterceptedService::new(c, d.bearer())
    });
    let cast = |name: &str| {
        let json = serde_json::json!({"name": name, "image": "busybox"}).to_string();
        rt.block_on(async {
            pb::service_api_client::ServiceApiClient::new(ch.clone())
                .apply(pb::ApplyRequest {
                    resources: vec![pb::Resource {
                        kind: Some(pb::resource::Kind::ServiceJson(json)),
                    }],
                    ..Default::default()
                })
                .await
                .expect("cast")
        })
    };

    // Cast to answer.
    let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
    probe.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut to_answer = Vec::new();
    for i in 0..50 {
        let name = format!("fresh-{i}");
        let t = Instant::now();
        cast(&name);
        let fqdn = format!("{name}.default.rune");
        while !common::dns_answers(&probe, d.dns, &fqdn) {
            assert!(t.elapsed() < Duration::from_secs(10), "{fqdn} never answered");
        }
        to_answer.push(t.elapsed());
    }

    // The zone both servers serve.
    let mut names = Vec::new();
    let mut local_data = String::new();
    for i in 0..NAMES {
        let name = format!("svc-{i}");
        cast(&name);
        let vip = rt.block_on(async {
            pb::service_api_client::ServiceApiClient::new(ch.clone())
                .get_service(pb::GetServiceRequest {
                    namespace: "default".into(),
                    name: name.clone(),
                })
                .await
                .expect("get")
                .into_inner()
                .vip
        });
        let fqdn = format!("{name}.default.rune");
        local_data.push_str(&format!("    local-data: \"{fqdn}. 5 IN A {vip}\"\n"));
        names.push(fqdn);
    }
    let dir = d.scratch().to_path_buf();
    let file = dir.join("queries.txt");
    std::fs::write(
        &file,
        names.iter().map(|n| format!("{n} A\n")).collect::<String>(),
    )
    .unwrap();
    let uport = free_port();
    let conf = dir.join("unbound.conf");
    std::fs::write(
        &conf,
        format!(
            "server:\n    interface: 127.0.0.1\n    port: {uport}\n    do-daemonize: no\n    username: \"\"\n    chroot: \"\"\n    \
             directory: \"{}\"\n    pidfile: \"\"\n    logfile: \"\"\n    use-syslog: no\n    num-threads: 2\n    \
             access-control: 127.0.0.0/8 allow\n    do-ip6: no\n    local-zone: \"rune.\" static\n{local_data}",
            dir.display()
        ),
    )
    .unwrap();
    let mut unbound = Command::new("unbound")
        .arg("-c")
        .arg(&conf)
        .arg("-d")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("unbound (Debian's unbound)");
    let ub: SocketAddr = ([127, 0, 0, 1], uport).into();
    wait_until(Duration::from_secs(20), "unbound to answer", || {
        common::dns_answers(&probe, ub, &names[0])
    });
    wait_until(Duration::from_secs(20), "runed to answer", || {
        common::dns_answers(&probe, d.dns, &names[NAMES - 1])
    });

    // The servers' own CPU per answered query: steadier than queries/s, which on two cores
    // also counts how much CPU each server leaves to dnsperf.
    let cpu_per_query = |pid: u32, run: &dyn Fn() -> (f64, f64)| {
        let before = common::cpu_ticks(pid);
        let (q, l) = run();
        let us = (common::cpu_ticks(pid) - before) as f64 * 10_000.0 / (q * 10.0).max(1.0);
        (q, l, us)
    };
    let runed_pid = d.pid().expect("runed's pid");
    let unbound_pid = unbound.id();
    // This machine drifts by tens of percent within minutes: the two servers take turns,
    // `BENCH_ROUNDS` times, the first of each pair alternating, and the medians are compared.
    let n = common::rounds();
    let r = || cpu_per_query(runed_pid, &|| dnsperf(d.dns, &file, None));
    let u = || cpu_per_query(unbound_pid, &|| dnsperf(ub, &file, None));
    let (runed_full, unbound_full): (Vec<_>, Vec<_>) =
        (0..n).map(|round| common::in_turn(round, r, u)).unzip();
    let q_ratios = common::ratios(runed_full.iter().map(|r| r.0), unbound_full.iter().map(|u| u.0));
    let full_l_ratios = common::ratios(runed_full.iter().map(|r| r.1), unbound_full.iter().map(|u| u.1));
    let (rq, rl, rcpu) = medians(&runed_full);
    let (uq, ul, ucpu) = medians(&unbound_full);
    // At full speed the client, the server and the kernel share two cores, so the average
    // latency there is mostly how long answers wait for the client to read them (Little's law:
    // queries outstanding ÷ rate). The latency of the servers themselves is compared at loads
    // both carry: half of what unbound carried, and nine tenths of it (unbound near its
    // limit; what a server's headroom buys).
    let at_rate = |rate: f64| {
        let r = || dnsperf(d.dns, &file, Some(rate)).1;
        let u = || dnsperf(ub, &file, Some(rate)).1;
        let (runed, unbound): (Vec<_>, Vec<_>) = (0..n).map(|round| common::in_turn(round, r, u)).unzip();
        let ratios = common::ratios(runed.iter().copied(), unbound.iter().copied());
        (common::median(runed), common::median(unbound), ratios)
    };
    let fixed = (uq / 2.0).max(1000.0);
    let (rfl, ufl, l_ratios) = at_rate(fixed);
    let high = (uq * 0.9).max(1000.0);
    let (rhl, uhl, h_ratios) = at_rate(high);
    let mut rs = sequential(d.dns, &names, 20_000);
    let mut us = sequential(ub, &names, 20_000);
    let _ = unbound.kill();
    let _ = unbound.wait();

    println!(
        "embedded DNS vs unbound (local-data), {NAMES} names, dnsperf from {} sockets, same machine, medians of {n} alternating rounds",
        sockets()
    );
    println!();
    println!(
        "| server | dnsperf q/s | server CPU µs/query | avg latency µs at full speed | avg latency µs at {fixed:.0} q/s | at {high:.0} q/s | sequential p50 µs | p99 µs |"
    );
    println!("|--|--:|--:|--:|--:|--:|--:|--:|");
    println!(
        "| runed | {rq:.0} | {rcpu:.1} | {rl:.0} | {rfl:.0} | {rhl:.0} | {:.0} | {:.0} |",
        pct(&mut rs, 0.5),
        pct(&mut rs, 0.99)
    );
    println!(
        "| unbound | {uq:.0} | {ucpu:.1} | {ul:.0} | {ufl:.0} | {uhl:.0} | {:.0} | {:.0} |",
        pct(&mut us, 0.5),
        pct(&mut us, 0.99)
    );
    println!(
        "| ratio runed/unbound | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | | |",
        rq / uq.max(1.0),
        rcpu / ucpu.max(0.001),
        rl / ul.max(1.0),
        rfl / ufl.max(1.0),
        rhl / uhl.max(1.0)
    );
    let list = |v: &[f64]| v.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(", ");
    println!();
    println!(
        "runed/unbound by round: q/s {}; latency at full speed {}; latency at {fixed:.0} q/s {}; at {high:.0} q/s {}",
        list(&q_ratios),
        list(&full_l_ratios),
        list(&l_ratios),
        list(&h_ratios)
    );
    println!();
    println!(
        "cast → name answering (50 casts): p50 {:.1} ms, p99 {:.1} ms",
        pct(&mut to_answer, 0.5) / 1e3,
        pct(&mut to_answer, 0.99) / 1e3
    );
    common::summary("DNS queries/s (dnsperf)", "q/s", rq, Some(("unbound", uq)), true);
    common::summary(
        "DNS server CPU per query",
        "µs",
        rcpu,
        Some(("unbound", ucpu)),
        false,
    );
    common::summary(
        "DNS average latency at full speed",
        "µs",
        rl,
        Some(("unbound", ul)),
        false,
    );
    common::summary(
        &format!("DNS average latency at {fixed:.0} q/s"),
        "µs",
        rfl,
        Some(("unbound", ufl)),
        false,
    );
    common::summary(
        "DNS average latency at 9/10 of unbound's rate",
        "µs",
        rhl,
        Some(("unbound", uhl)),
        false,
    );
    common::summary(
        "cast → DNS answer, 50 casts without load, p99",
        "ms",
        pct(&mut to_answer, 0.99) / 1e3,
        None,
        false,
    );
}
