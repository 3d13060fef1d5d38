//! What the projections cost as services accumulate: with 0, 500 and 5,000 services at scale 0,
//! the time from a cast to its name answering in the DNS and to the data plane serving its port
//! (p50/p99), runed's idle CPU, and its resident memory.
//!
//! `cargo bench -p runed --bench projections` prints a table. `BENCH_CASTS` (default 50) sets
//! how many casts are timed per row; `BENCH_FILL_PORTS=1` gives the services already there a
//! port each. `BENCH_KERNEL=1` (root, Debian's nftables) runs runed as production does, its
//! nftables table programmed (in a network namespace of the bench's own), and gives each
//! service already there a port and an ingress policy (from the next one and a network):
//! a name answers only once the kernel redirects its VIP, so cast → DNS includes the table's
//! change.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use rune_chaos_tests::{Bins, Daemon};
use rune_proto::v1 as pb;
use tonic::transport::Channel;

type Ch = tonic::service::interceptor::InterceptedService<Channel, rune_chaos_tests::Bearer>;
type Api = pb::service_api_client::ServiceApiClient<Ch>;

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1));
    v.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// Casts services `from..to` at scale 0, 100 per request, as the writes bench's spec; with
/// `ports` each has a port, as real services do (then dev mode's proxy holds a listener and a
/// port book entry for each), and with `policy` an ingress policy too.
async fn fill(ch: &Ch, from: usize, to: usize, ports: bool, policy: bool) {
    let mut c = pb::service_api_client::ServiceApiClient::new(ch.clone());
    let names: Vec<usize> = (from..to).collect();
    for chunk in names.chunks(100) {
        let resources = chunk
            .iter()
            .map(|i| {
                let mut spec =
                    serde_json::json!({"name": format!("fill-{i}"), "image": "busybox", "scale": 0});
                if ports {
                    spec["ports"] = serde_json::json!([{"name": "http", "port": 8080}]);
                }
                if policy {
                    spec["networkPolicy"] = serde_json::json!({"ingress": [{"from": [
                        {"service": format!("fill-{}", i + 1)}, {"cidr": "192.168.0.0/16"}],
                        "ports": ["http"]}]});
                }
                pb::Resource {
                    kind: Some(pb::resource::Kind::ServiceJson(spec.to_string())),
                }
            })
            .collect();
        c.apply(pb::ApplyRequest {
            resources,
            ..Default::default()
        })
        .await
        .expect("apply");
    }
}

/// Whether the data plane serves `name`'s port (its proxy port is shown).
async fn serves_port(c: &mut Api, name: &str) -> bool {
    c.get_service(pb::GetServiceRequest {
        namespace: "default".into(),
        name: name.into(),
    })
    .await
    .is_ok_and(|r| !r.into_inner().proxy_ports.is_empty())
}

/// Waits until the data plane serves the last filled service's port (the fill's services are
/// all applied by then, but a proxy listener each may still be opening): the casts are timed
/// against a settled runed. Returns how long that took after the fill's last write.
async fn settle(ch: &Ch, last: usize) -> Duration {
    let mut c = pb::service_api_client::ServiceApiClient::new(ch.clone());
    let (t0, name) = (Instant::now(), format!("fill-{last}"));
    let deadline = t0 + Duration::from_secs(300);
    while Instant::now() < deadline {
        if serves_port(&mut c, &name).await {
            return t0.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the data plane never served the filled services' ports");
}

/// Times `casts` casts of a service with a port: to its DNS answer, and to its proxy listener.
async fn cast_latency(
    ch: &Ch,
    dns: SocketAddr,
    round: usize,
    casts: usize,
) -> (Vec<Duration>, Vec<Duration>) {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("udp");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut c = pb::service_api_client::ServiceApiClient::new(ch.clone());
    let (mut to_dns, mut to_dp) = (Vec::new(), Vec::new());
    for i in 0..casts {
        let name = format!("lat-{round}-{i}");
        let json = serde_json::json!({"name": name, "image": "busybox", "scale": 0,
            "ports": [{"name": "http", "port": 8080}]})
        .to_string();
        let t0 = Instant::now();
        c.apply(pb::ApplyRequest {
            resources: vec![pb::Resource {
                kind: Some(pb::resource::Kind::ServiceJson(json)),
            }],
            ..Default::default()
        })
        .await
        .expect("apply");
        let deadline = t0 + Duration::from_secs(10);
        let fqdn = format!("{name}.default.rune");
        let (mut dns_at, mut dp_at) = (None, None);
        while (dns_at.is_none() || dp_at.is_none()) && Instant::now() < deadline {
            if dns_at.is_none() && common::dns_answers(&sock, dns, &fqdn) {
                dns_at = Some(t0.elapsed());
            }
            if dp_at.is_none() && serves_port(&mut c, &name).await {
                dp_at = Some(t0.elapsed());
            }
        }
        to_dns.push(dns_at.expect("the DNS never answered the new name"));
        to_dp.push(dp_at.expect("the data plane never served the new port"));
        // Keep the port range for the next rounds.
        c.delete_service(pb::DeleteServiceRequest {
            namespace: "default".into(),
            name,
            ..Default::default()
        })
        .await
        .expect("delete");
    }
    (to_dns, to_dp)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let casts: usize = std::env::var("BENCH_CASTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let bins = Bins::locate();
    let kernel = std::env::var("BENCH_KERNEL").is_ok_and(|v| v == "1");
    // Before the runtime, whose threads inherit the namespace, as runed does.
    let ns = format!("rune-proj-bench-{}", std::process::id());
    let _gone = kernel.then(|| common::DeleteNetns(ns.clone()));
    if kernel && !common::enter_netns(&ns) {
        println!("skipped: BENCH_KERNEL=1 needs root, ip(8) and nft(8)");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut d = Daemon::new(&bins);
    // Room for a proxy port per service port when the services already there have one.
    d.extra = vec!["--proxy-ports".into(), "20000-32767".into()];
    d.nftables = kernel;
    d.restart();
    let pid = d.pid().expect("pid");
    let ch: Ch = rt.block_on(async {
        let c = Channel::from_shared(format!("http://{}", d.grpc))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        tonic::service::interceptor::InterceptedService::new(c, d.bearer())
    });
    println!(
        "projections as services accumulate (scale 0), {casts} casts per row, one runed{}",
        if kernel {
            ", nftables programmed; each service there has a port and an ingress policy"
        } else {
            ""
        }
    );
    println!();
    println!("| services | cast→DNS p50 ms | p99 ms | cast→data plane p50 ms | p99 ms | idle CPU % of a core | RSS MiB |");
    println!("|--:|--:|--:|--:|--:|--:|--:|");
    let mut have = 0;
    let mut settled = Vec::new();
    let ports = kernel || std::env::var("BENCH_FILL_PORTS").is_ok_and(|v| v == "1");
    for (round, n) in [0usize, 500, 5000].into_iter().enumerate() {
        rt.block_on(fill(&ch, have, n, ports, kernel));
        // `BENCH_SETTLE=0` times the casts at once instead: a cast while the data plane is
        // still opening the fill's listeners.
        if ports && n > have && std::env::var("BENCH_SETTLE").map_or(true, |v| v != "0") {
            settled.push((n, rt.block_on(settle(&ch, n - 1))));
        }
        have = n;
        let (mut dns, mut dp) = rt.block_on(cast_latency(&ch, d.dns, round, casts));
        // Settle, then measure CPU over a window where nothing is written.
        std::thread::sleep(Duration::from_secs(3));
        let (t0, c0) = (Instant::now(), common::cpu_ticks(pid));
        std::thread::sleep(Duration::from_secs(20));
        let cpu = (common::cpu_ticks(pid) - c0) as f64 / 100.0 / t0.elapsed().as_secs_f64() * 100.0;
        if n == 5000 {
            common::summary(
                "cast → DNS answer, 5,000 services, p99",
                "ms",
                pct(&mut dns, 0.99),
                None,
                false,
            );
            common::summary(
                "cast → data plane ready, 5,000 services, p99",
                "ms",
                pct(&mut dp, 0.99),
                None,
                false,
            );
            common::summary(
                "idle CPU, 5,000 services at scale 0",
                "% of a core",
                cpu,
                None,
                false,
            );
        }
        println!(
            "| {n} | {:.2} | {:.2} | {:.2} | {:.2} | {cpu:.2} | {:.1} |",
            pct(&mut dns, 0.5),
            pct(&mut dns, 0.99),
            pct(&mut dp, 0.5),
            pct(&mut dp, 0.99),
            common::rss_kib(pid) as f64 / 1024.0
        );
    }
    for (n, t) in settled {
        println!(
            "data plane serving all {n} services' ports {:.0} ms after the fill's last write",
            t.as_secs_f64() * 1e3
        );
    }
}
