//! Durable writes through the gRPC API at 1, 16 and 64 concurrent clients, side by side with
//! Debian's etcd (`etcd-server`) on the same machine, same value size, fsync durability.
//!
//! `cargo bench -p runed --bench writes` prints a table. `BENCH_SECONDS` (default 5) sets the
//! length of each run; `ETCD` the etcd binary (default `etcd` on PATH; skipped if absent);
//! `BENCH_CLIENTS` (e.g. `16`), `BENCH_PREFILL` (`0` or `5000`) and `BENCH_KIND` (`service` or
//! `configmap`) run only those rows, for profiling one of them. Each runed write casts a new
//! service at scale 0; a second table casts configmaps of one key instead, the closest runed
//! has to etcd's put, so the cost of a service's own semantics can be told from the write
//! path's. Each row is `BENCH_ROUNDS` (default 3) pairs of runs on fresh servers, runed first
//! in even rounds and etcd first in odd ones (this machine drifts by tens of percent within
//! minutes): the table shows each figure's median and every round's ratio. A last table gives
//! each server's scheduling per write (CPU slices, µs runnable but waiting for a CPU), which
//! shows whether wake-ups cost a machine latency.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::start_etcd;
use rune_chaos_tests::{http_get, Bearer, Bins, Daemon};
use rune_proto::v1 as pb;
use tonic::transport::Channel;

/// Bytes of each written value: a small service spec, padded to this size for both systems.
const VALUE_BYTES: usize = 256;

struct Run {
    writes_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Writes acknowledged during the run.
    writes: usize,
    /// The server's CPU time (user and system) per write, µs: steadier than throughput on a
    /// shared machine, and what a change to the write path moves.
    cpu_us: f64,
    /// Times the server's threads were put on a CPU, per write: its wake-ups.
    slices: f64,
    /// Time the server's threads spent runnable but waiting for a CPU, µs per write: what
    /// its wake-ups cost in latency (waking an idle vCPU is slow on some VMs).
    waited_us: f64,
}

fn summarize(mut lat: Vec<Duration>, elapsed: Duration) -> Run {
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Run {
        writes_per_s: lat.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: pct(0.50).as_secs_f64() * 1e3,
        p99_ms: pct(0.99).as_secs_f64() * 1e3,
        writes: lat.len(),
        cpu_us: 0.0,
        slices: 0.0,
        waited_us: 0.0,
    }
}

fn spec(name: &str) -> String {
    let base =
        serde_json::json!({"name": name, "image": "busybox", "scale": 0, "env": {"V": ""}}).to_string();
    let pad = "x".repeat(VALUE_BYTES.saturating_sub(base.len()));
    serde_json::json!({"name": name, "image": "busybox", "scale": 0, "env": {"V": pad}}).to_string()
}

/// A configmap of one key, padded like [`spec`]: the like-for-like counterpart of an etcd put
/// (a key and a value, no VIP, endpoints, placement or projections to feed).
fn configmap(name: &str) -> String {
    let base = serde_json::json!({"name": name, "data": {"v": ""}}).to_string();
    let pad = "x".repeat(VALUE_BYTES.saturating_sub(base.len()));
    serde_json::json!({"name": name, "data": {"v": pad}}).to_string()
}

/// What each runed write casts.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// A service at scale 0: what the issues' figures are about.
    Service,
    /// A configmap: the closest runed has to etcd's put.
    Configmap,
}

impl Kind {
    /// As `BENCH_KIND` names it.
    fn name(self) -> &'static str {
        match self {
            Kind::Service => "service",
            Kind::Configmap => "configmap",
        }
    }

    fn resource(self, name: &str) -> pb::resource::Kind {
        match self {
            Kind::Service => pb::resource::Kind::ServiceJson(spec(name)),
            Kind::Configmap => pb::resource::Kind::ConfigmapJson(configmap(name)),
        }
    }
}

/// [`drive`], with the CPU that process `pid` spent during it.
async fn drive_cpu<F, Fut>(pid: Option<u32>, clients: usize, seconds: u64, op: F) -> Run
where
    F: Fn(usize, u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let ticks = || pid.map_or(0, common::cpu_ticks);
    let sched = || pid.map(common::sched).unwrap_or_default();
    let (before, sched_before) = (ticks(), sched());
    let mut r = drive(clients, seconds, op).await;
    let (after, sched_after) = (ticks(), sched());
    let writes = r.writes.max(1) as f64;
    // USER_HZ is 100 on Linux.
    r.cpu_us = after.saturating_sub(before) as f64 * 10_000.0 / writes;
    r.slices = sched_after.slices.saturating_sub(sched_before.slices) as f64 / writes;
    r.waited_us = sched_after.waited_ns.saturating_sub(sched_before.waited_ns) as f64 / 1e3 / writes;
    r
}

async fn drive<F, Fut>(clients: usize, seconds: u64, op: F) -> Run
where
    F: Fn(usize, u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let stop = Instant::now() + Duration::from_secs(seconds);
    let failures = Arc::new(AtomicU64::new(0));
    // The first failure's reason, for the assertion below (not one line per failed write).
    let first_failure: Arc<std::sync::OnceLock<String>> = Arc::default();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let op = op.clone();
        let failures = failures.clone();
        let first_failure = first_failure.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0;
            while Instant::now() < stop {
                let t = Instant::now();
                match op(c, i).await {
                    Ok(()) => lat.push(t.elapsed()),
                    Err(e) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                        let _ = first_failure.set(e);
                    }
                }
                i += 1;
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    let elapsed = started.elapsed();
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "writes failed during the run, the first: {}",
        first_failure.get().map_or("", String::as_str)
    );
    summarize(all, elapsed)
}

async fn channels(addr: String, n: usize) -> Vec<Channel> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(
            Channel::from_shared(addr.clone())
                .unwrap()
                .connect()
                .await
                .expect("connect"),
        );
    }
    v
}

async fn bench_runed(
    kind: Kind,
    addr: String,
    bearer: Bearer,
    pid: Option<u32>,
    clients: usize,
    seconds: u64,
    round: usize,
) -> Run {
    let chans = Arc::new(channels(addr, clients).await);
    drive_cpu(pid, clients, seconds, move |c, i| {
        let ch = chans[c].clone();
        let bearer = bearer.clone();
        async move {
            let mut client = pb::service_api_client::ServiceApiClient::with_interceptor(ch, bearer);
            let req = pb::ApplyRequest {
                resources: vec![pb::Resource {
                    kind: Some(kind.resource(&format!("b{round}-c{c}-{i}"))),
                }],
                ..Default::default()
            };
            client
                .apply(req)
                .await
                .map(|_| ())
                .map_err(|e| format!("runed: {}", e.message()))
        }
    })
    .await
}

async fn bench_etcd(addr: String, pid: u32, clients: usize, seconds: u64, round: usize) -> Run {
    let chans = Arc::new(channels(addr, clients).await);
    drive_cpu(Some(pid), clients, seconds, move |c, i| {
        let ch = chans[c].clone();
        let value = spec(&format!("b{round}-c{c}-{i}")).into_bytes();
        let put = common::etcd_put(ch, format!("/bench/b{round}-c{c}-{i}").into_bytes(), value);
        async move {
            put.await
                .then_some(())
                .ok_or_else(|| "etcd: a put failed".to_string())
        }
    })
    .await
}

/// Services (runed) or keys (etcd) already there when a run starts.
const PREFILL: [usize; 2] = [0, 5000];

async fn fill_runed(addr: String, bearer: Bearer, n: usize) {
    let ch = Channel::from_shared(addr)
        .unwrap()
        .connect()
        .await
        .expect("connect");
    let mut client = pb::service_api_client::ServiceApiClient::with_interceptor(ch, bearer);
    let names: Vec<usize> = (0..n).collect();
    for chunk in names.chunks(100) {
        let resources = chunk
            .iter()
            .map(|i| pb::Resource {
                kind: Some(pb::resource::Kind::ServiceJson(spec(&format!("fill-{i}")))),
            })
            .collect();
        client
            .apply(pb::ApplyRequest {
                resources,
                ..Default::default()
            })
            .await
            .expect("fill");
    }
}

async fn fill_etcd(addr: String, n: usize) {
    let chans = Arc::new(channels(addr, 16).await);
    let mut tasks = Vec::new();
    for c in 0..16 {
        let ch = chans[c].clone();
        tasks.push(tokio::spawn(async move {
            for i in (c..n).step_by(16) {
                let key = format!("/bench/fill-{i}").into_bytes();
                assert!(common::etcd_put(ch.clone(), key, spec(&format!("fill-{i}")).into_bytes()).await);
            }
        }));
    }
    for t in tasks {
        t.await.expect("fill");
    }
}

/// Each figure's median over the rounds (so the row may mix rounds).
fn median_run(runs: &[Run]) -> Run {
    let med = |f: &dyn Fn(&Run) -> f64| common::median(runs.iter().map(f).collect());
    Run {
        writes_per_s: med(&|r| r.writes_per_s),
        p50_ms: med(&|r| r.p50_ms),
        p99_ms: med(&|r| r.p99_ms),
        writes: runs.iter().map(|r| r.writes).sum(),
        cpu_us: med(&|r| r.cpu_us),
        slices: med(&|r| r.slices),
        waited_us: med(&|r| r.waited_us),
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: run only when benching.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let bins = Bins::locate();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "durable writes through the gRPC API, {VALUE_BYTES}-byte values, {seconds} s per run, fsync on;"
    );
    println!("each run on a fresh runed and a fresh etcd holding that many services (keys) already");
    // The build profile moves these figures by 10-20 %: say which binary was measured.
    println!(
        "runed: {} (scripts/bench.sh measures the dist profile)",
        bins.runed.display()
    );
    println!();
    let rounds = common::rounds();
    let header = || {
        println!("| already there | clients | runed writes/s | runed p50 ms | runed p99 ms | runed CPU µs/write | etcd writes/s | etcd p50 ms | etcd p99 ms | etcd CPU µs/write | runed/etcd | by round |");
        println!("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--|");
    };
    let mut runed_rates: Vec<(usize, usize, f64)> = Vec::new();
    // Per row: what the scheduler did for each server (see `Run::slices`).
    let mut sched_rows: Vec<String> = Vec::new();
    let mut last = None;
    let only = |var: &str, v: &str| std::env::var(var).map_or(true, |s| s == v);
    let mut headed = None;
    // Services on an empty store and with 5,000 there, then configmaps on an empty store.
    let cases = PREFILL
        .map(|p| (Kind::Service, p))
        .into_iter()
        .chain([(Kind::Configmap, 0)]);
    for (kind, prefill) in cases {
        for (round, clients) in [1usize, 16, 64].into_iter().enumerate() {
            if !only("BENCH_CLIENTS", &clients.to_string())
                || !only("BENCH_PREFILL", &prefill.to_string())
                || !only("BENCH_KIND", kind.name())
            {
                continue;
            }
            if headed != Some(kind) {
                if kind == Kind::Configmap {
                    if headed.is_some() {
                        println!();
                    }
                    println!(
                        "like for like: each runed write casts a configmap of one key (no VIP, endpoints,"
                    );
                    println!("placement or projections to feed); etcd's puts as above");
                    println!();
                }
                header();
                headed = Some(kind);
            }
            let (mut runs, mut etcd_runs) = (Vec::new(), Vec::new());
            for r in 0..rounds {
                // Every write creates a service, and each takes a VIP: 5,000 plus five seconds
                // at 64 clients outgrow the default /16, so the runs get a /8.
                let mut d = Daemon::new(&bins);
                d.extra = vec!["--cluster-cidr".into(), "10.0.0.0/8".into()];
                d.restart();
                let etcd = start_etcd();
                if etcd.is_none() && round == 0 && prefill == 0 && r == 0 {
                    eprintln!(
                        "etcd not found: `apt-get install etcd-server` (or set ETCD) for the side-by-side column"
                    );
                }
                rt.block_on(fill_runed(format!("http://{}", d.grpc), d.bearer(), prefill));
                if let Some(e) = &etcd {
                    rt.block_on(fill_etcd(e.url.clone(), prefill));
                }
                let runed_run = || {
                    rt.block_on(bench_runed(
                        kind,
                        format!("http://{}", d.grpc),
                        d.bearer(),
                        d.pid(),
                        clients,
                        seconds,
                        round,
                    ))
                };
                let etcd_run = || {
                    etcd.as_ref()
                        .map(|e| rt.block_on(bench_etcd(e.url.clone(), e.pid(), clients, seconds, round)))
                };
                let (a, b) = common::in_turn(r, runed_run, etcd_run);
                runs.push(a);
                etcd_runs.extend(b);
                last = Some(d);
            }
            let by_round: Vec<String> = runs
                .iter()
                .zip(&etcd_runs)
                .map(|(r, e)| format!("{:.2}", r.writes_per_s / e.writes_per_s))
                .collect();
            let r = median_run(&runs);
            let e = (!etcd_runs.is_empty()).then(|| median_run(&etcd_runs));
            let (ew, ep50, ep99, ecpu, ratio) = match &e {
                Some(e) => (
                    format!("{:.0}", e.writes_per_s),
                    format!("{:.2}", e.p50_ms),
                    format!("{:.2}", e.p99_ms),
                    format!("{:.0}", e.cpu_us),
                    format!("{:.2}", r.writes_per_s / e.writes_per_s),
                ),
                None => (
                    "n/a".into(),
                    "n/a".into(),
                    "n/a".into(),
                    "n/a".into(),
                    "n/a".into(),
                ),
            };
            println!(
                "| {prefill} | {clients} | {:.0} | {:.2} | {:.2} | {:.0} | {ew} | {ep50} | {ep99} | {ecpu} | {ratio} | {} |",
                r.writes_per_s,
                r.p50_ms,
                r.p99_ms,
                r.cpu_us,
                by_round.join(", ")
            );
            let sched_of = |r: &Run| format!("{:.1} | {:.0}", r.slices, r.waited_us);
            sched_rows.push(format!(
                "| {} | {prefill} | {clients} | {} | {} |",
                kind.name(),
                sched_of(&r),
                e.as_ref().map_or("n/a | n/a".into(), sched_of)
            ));
            let figure = match kind {
                Kind::Service => format!("durable writes, {clients} client(s), {prefill} services there"),
                Kind::Configmap => {
                    format!("durable writes of a configmap (like an etcd put), {clients} client(s)")
                }
            };
            common::summary(
                &figure,
                "writes/s",
                r.writes_per_s,
                e.as_ref().map(|e| ("etcd", e.writes_per_s)),
                true,
            );
            if kind == Kind::Service {
                runed_rates.push((prefill, clients, r.writes_per_s));
            }
        }
    }
    if !sched_rows.is_empty() {
        println!();
        println!("the servers' scheduling per write (medians of the rounds; /proc/<pid>/task/*/schedstat): times put on a CPU,");
        println!("and µs spent runnable but waiting for one, which is where slow wake-ups show");
        println!();
        println!("| writes | already there | clients | runed CPU slices | runed waited µs | etcd CPU slices | etcd waited µs |");
        println!("|---|--:|--:|--:|--:|--:|--:|");
        for row in &sched_rows {
            println!("{row}");
        }
    }
    println!();
    for clients in [1usize, 16, 64] {
        let rate = |p: usize| {
            runed_rates
                .iter()
                .find(|(pp, c, _)| *pp == p && *c == clients)
                .map(|(_, _, r)| *r)
        };
        if let (Some(empty), Some(full)) = (rate(PREFILL[0]), rate(PREFILL[1])) {
            println!(
                "runed at {clients} client(s): {:.2} of the empty-store rate with {} services there",
                full / empty,
                PREFILL[1]
            );
        }
    }
    let Some(d) = last else { return };
    if let Some((_, body)) = http_get(d.metrics, "/metrics") {
        let get = |name: &str| {
            body.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        };
        let avg = |m: &str| Some(get(&format!("{m}_sum"))? / get(&format!("{m}_count"))?.max(1.0));
        println!();
        if let (Some(b), Some(n)) = (
            avg("rune_log_batch_proposals"),
            get("rune_log_batch_proposals_count"),
        ) {
            println!("runed group commit: {b:.1} proposals per log entry on average, over {n:.0} entries");
        }
        if let Some(f) = avg("rune_log_fsync_duration_seconds") {
            println!("runed log commit (fsync included): {:.3} ms on average", f * 1e3);
        }
        if let Some(p) = avg("rune_log_propose_duration_seconds") {
            println!("runed propose to applied outcome: {:.3} ms on average", p * 1e3);
        }
        if let (Some(a), Some(n)) = (
            avg("rune_state_apply_duration_seconds"),
            get("rune_state_apply_duration_seconds_count"),
        ) {
            println!(
                "runed apply to the state: {:.3} ms on average, over {n:.0} applies",
                a * 1e3
            );
        }
        if let (Some(c), Some(n)) = (
            avg("rune_state_commit_duration_seconds"),
            get("rune_state_commit_duration_seconds_count"),
        ) {
            println!(
                "runed state commit: {:.3} ms on average, over {n:.0} commits",
                c * 1e3
            );
        }
    }
}
