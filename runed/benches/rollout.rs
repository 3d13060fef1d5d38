//! Time from cast to ready, and runed's memory with many services.
//!
//! `cargo bench -p runed --bench rollout` prints two tables:
//! - per service, the time from the Apply call to its instance running and ready (as the
//!   instance watch reports it), p50 and p99, for 1, 20 and 100 process services cast at once and
//!   for 10 container services (the busybox test image; scripts/test-images.sh builds it);
//! - runed's resident memory once 20, 100 and 500 process services run and it has been idle for
//!   a few seconds, beside the original Rune's documented figures. Each process instance also
//!   has a log writer process (`rune-log-writer`); its proportional memory is reported apart.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rune_chaos_tests::{Bearer, Bins, Daemon};
use rune_proto::v1 as pb;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A channel that carries the daemon's token.
type Ch = InterceptedService<Channel, Bearer>;

fn process_spec(name: &str) -> String {
    serde_json::json!({"name": name, "scale": 1, "process": {"command": "/bin/sleep", "args": ["100000"]}})
        .to_string()
}

fn container_spec(name: &str) -> String {
    serde_json::json!({"name": name, "scale": 1, "image": "busybox", "command": ["sleep", "100000"]})
        .to_string()
}

fn pct(v: &[Duration], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort();
    let i = ((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1));
    v.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// Casts `names` in one Apply and returns, per service, the time until its instance was ready.
async fn cast_and_time(ch: &Ch, names: &[String], spec: fn(&str) -> String) -> Vec<Duration> {
    let mut watch = pb::instance_api_client::InstanceApiClient::new(ch.clone())
        .watch_instances(pb::WatchInstancesRequest {
            namespace: "default".into(),
            service: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    let resources = names
        .iter()
        .map(|n| pb::Resource {
            kind: Some(pb::resource::Kind::ServiceJson(spec(n))),
        })
        .collect();
    let t0 = Instant::now();
    pb::service_api_client::ServiceApiClient::new(ch.clone())
        .apply(pb::ApplyRequest {
            resources,
            ..Default::default()
        })
        .await
        .expect("apply");
    let mut ready: HashMap<String, Duration> = HashMap::new();
    let deadline = t0 + Duration::from_secs(300);
    while ready.len() < names.len() && Instant::now() < deadline {
        let Ok(Ok(Some(ev))) = tokio::time::timeout(Duration::from_secs(10), watch.message()).await else {
            continue;
        };
        if let Some(i) = ev.instance {
            if i.status == "Running" && i.ready && names.contains(&i.service) {
                ready.entry(i.service).or_insert_with(|| t0.elapsed());
            }
        }
    }
    assert_eq!(ready.len(), names.len(), "not every service became ready");
    ready.into_values().collect()
}

async fn delete_all(ch: &Ch, names: &[String]) {
    let mut c = pb::service_api_client::ServiceApiClient::new(ch.clone());
    for n in names {
        let _ = c
            .delete_service(pb::DeleteServiceRequest {
                namespace: "default".into(),
                name: n.clone(),
                force: true,
            })
            .await;
    }
    let mut ic = pb::instance_api_client::InstanceApiClient::new(ch.clone());
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let l = ic
            .list_instances(pb::ListInstancesRequest {
                namespace: "default".into(),
                limit: 1,
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        if l.instances.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Proportional set size: shared pages split among the processes that map them, which is what
/// one more writer really costs.
fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// (count, average PSS in KiB) of the log writer processes.
fn writers() -> (usize, u64) {
    let mut n = 0;
    let mut total = 0;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains("__log-writer") {
            n += 1;
            total += pss_kib(pid);
        }
    }
    (n, if n == 0 { 0 } else { total / n as u64 })
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let bins = Bins::locate();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/test-images.sh");
    let built = std::process::Command::new("bash").arg(script).status();
    assert!(
        built.is_ok_and(|s| s.success()),
        "building the busybox test image failed"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");

    let d = Daemon::start(&bins);
    let ch = rt.block_on(async {
        let c = Channel::from_shared(format!("http://{}", d.grpc))
            .unwrap()
            .connect()
            .await
            .expect("connect");
        InterceptedService::new(c, d.bearer())
    });
    println!("time from cast (Apply) to each service's instance running and ready");
    println!();
    println!("| services cast at once | kind | samples | p50 ms | p99 ms |");
    println!("|--:|--|--:|--:|--:|");
    // (services cast at once, kind, spec, rounds)
    type Case = (usize, &'static str, fn(&str) -> String, usize);
    let cases: [Case; 4] = [
        (1, "process", process_spec, 20),
        (20, "process", process_spec, 3),
        (100, "process", process_spec, 2),
        (10, "container", container_spec, 3),
    ];
    for (n, kind, spec, rounds) in cases {
        let mut samples = Vec::new();
        for r in 0..rounds {
            let names: Vec<String> = (0..n).map(|i| format!("{kind}-{n}-{r}-{i}")).collect();
            samples.extend(rt.block_on(cast_and_time(&ch, &names, spec)));
            rt.block_on(delete_all(&ch, &names));
        }
        common::summary(
            &format!("cast → ready, {n} {kind} service(s) at once, p50"),
            "ms",
            pct(&samples, 0.5),
            None,
            false,
        );
        println!(
            "| {n} | {kind} | {} | {:.1} | {:.1} |",
            samples.len(),
            pct(&samples, 0.5),
            pct(&samples, 0.99)
        );
    }
    drop(d);

    let d = Daemon::start(&bins);
    let ch = rt.block_on(async {
        let c = Channel::from_shared(format!("http://{}", d.grpc))
            .unwrap()
            .connect()
            .await
            .expect("connect");
        InterceptedService::new(c, d.bearer())
    });
    let pid = d.pid().expect("runed pid");
    println!();
    println!("runed resident memory, idle, with N process services running (scale 1 each)");
    println!();
    println!(
        "| services | runed RSS MiB | original Rune documents | ratio | log writers | writer PSS KiB each |"
    );
    println!("|--:|--:|--:|--:|--:|--:|");
    let mut cast = 0;
    for (n, original_mib) in [(20usize, 256.0), (100, 512.0), (500, 1024.0)] {
        let names: Vec<String> = (cast..n).map(|i| format!("mem-{i}")).collect();
        for chunk in names.chunks(100) {
            rt.block_on(cast_and_time(&ch, chunk, process_spec));
        }
        cast = n;
        std::thread::sleep(Duration::from_secs(5));
        let mib = common::rss_kib(pid) as f64 / 1024.0;
        let (nw, w) = writers();
        common::summary(
            &format!("runed RSS, {n} process services"),
            "MiB",
            mib,
            Some(("original Rune (documented)", original_mib)),
            false,
        );
        println!(
            "| {n} | {mib:.1} | {original_mib:.0} MiB | {:.3} | {nw} | {w} |",
            mib / original_mib
        );
    }
}
