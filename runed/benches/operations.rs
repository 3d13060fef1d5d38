//! Operating figures, side by side where a peer exists.
//!
//! `cargo bench -p runed --bench operations` prints two tables:
//! - an online backup (`rune admin backup`) of a data dir with 500 services and 100,000 log
//!   entries, and its restore (`runed restore`), beside `etcdctl snapshot save` and
//!   `etcdctl snapshot restore` on Debian's etcd holding as many keys and bytes (ETCD and
//!   ETCDCTL name the binaries; `apt-get install etcd-server etcd-client`);
//! - runed's sizing with 20, 100 and 500 process services running: resident memory, data dir
//!   size, and CPU while idle, beside the original Rune's documented sizing.
//!
//! `BENCH_ENTRIES` (default 100000) and `BENCH_SERVICES` (default 500) size the first.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rune_chaos_tests::{Bearer, Bins, Daemon};
use rune_proto::v1 as pb;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Ch = InterceptedService<Channel, Bearer>;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn du_bytes(p: &Path) -> u64 {
    let o = Command::new("du").arg("-sb").arg(p).output().expect("du");
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

/// Runs a command, asserting success, and returns how long it took.
fn timed(mut c: Command, what: &str) -> Duration {
    let t = Instant::now();
    let o = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let took = t.elapsed();
    assert!(
        o.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    took
}

async fn connect(d: &Daemon) -> Ch {
    let c = Channel::from_shared(format!("http://{}", d.grpc))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    InterceptedService::new(c, d.bearer())
}

fn service(name: &str, value: usize) -> pb::Resource {
    pb::Resource {
        kind: Some(pb::resource::Kind::ServiceJson(
            serde_json::json!({"name": name, "image": "busybox", "scale": 0, "env": {"V": value.to_string()}})
                .to_string(),
        )),
    }
}

/// 500 services, then re-cast one at a time (one log entry each) until `entries` were written.
async fn fill(ch: &Ch, services: usize, entries: usize) {
    let mut c = pb::service_api_client::ServiceApiClient::new(ch.clone());
    let all: Vec<_> = (0..services).map(|i| service(&format!("svc-{i}"), 0)).collect();
    c.apply(pb::ApplyRequest {
        resources: all,
        ..Default::default()
    })
    .await
    .expect("apply");
    let started = Instant::now();
    for i in 1..entries {
        c.apply(pb::ApplyRequest {
            resources: vec![service(&format!("svc-{}", i % services), i)],
            ..Default::default()
        })
        .await
        .expect("apply");
        if i % 20000 == 0 {
            eprintln!(
                "  {i} entries written ({:.0}/s)",
                i as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
}

/// `(records, bytes of keys and values, index)` of a backup file, read through the same reader
/// as `runed restore`.
fn backup_contents(p: &Path) -> (u64, u64, u64) {
    let b = rune_log::backup::read(p).expect("backup");
    let bytes = b.records.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum();
    (b.header.records, bytes, b.header.index)
}

struct Row {
    records: u64,
    state_mib: f64,
    save: Duration,
    file_mib: f64,
    restore: Duration,
}

fn backup_vs_etcd(rt: &tokio::runtime::Runtime, bins: &Bins) {
    let services = env_usize("BENCH_SERVICES", 500);
    let entries = env_usize("BENCH_ENTRIES", 100_000);
    let d = Daemon::start(bins);
    eprintln!("writing {services} services and {entries} entries...");
    rt.block_on(async {
        let ch = connect(&d).await;
        fill(&ch, services, entries).await;
    });
    let out = d.scratch().join("bench.backup");
    let mut cmd = d.rune_cmd();
    cmd.args(["admin", "backup", "--out"]).arg(&out);
    let save = timed(cmd, "rune admin backup");
    let (records, bytes, index) = backup_contents(&out);
    let file = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    let target = d.scratch().join("restored");
    let mut cmd = Command::new(&bins.runed);
    cmd.args(["restore", "--from"])
        .arg(&out)
        .arg("--data-dir")
        .arg(&target)
        .arg("--kek-file")
        .arg(d.data_dir.join("kek.b64"));
    let restore = timed(cmd, "runed restore");
    let data_dir = du_bytes(&d.data_dir);
    let runed = Row {
        records,
        state_mib: mib(bytes),
        save,
        file_mib: mib(file),
        restore,
    };
    drop(d);

    let etcd = common::start_etcd();
    let etcdctl = std::env::var_os("ETCDCTL")
        .map(PathBuf::from)
        .unwrap_or_else(|| "etcdctl".into());
    let peer = etcd.map(|e| {
        // As many keys, each of runed's average key and value size together.
        let value_bytes = (bytes / records.max(1)).saturating_sub(20) as usize;
        rt.block_on(async {
            let ch = Channel::from_shared(e.url.clone())
                .unwrap()
                .connect()
                .await
                .expect("etcd");
            let mut tasks = Vec::new();
            for w in 0..16u64 {
                let ch = ch.clone();
                tasks.push(tokio::spawn(async move {
                    for k in (w..records).step_by(16) {
                        let ok = common::etcd_put(
                            ch.clone(),
                            format!("/rune/state/{k:08}").into_bytes(),
                            vec![b'x'; value_bytes],
                        )
                        .await;
                        assert!(ok, "etcd put");
                    }
                }));
            }
            for t in tasks {
                t.await.expect("put task");
            }
        });
        let snap = e.dir.path().join("bench.snap");
        let mut cmd = Command::new(&etcdctl);
        cmd.env("ETCDCTL_API", "3")
            .args(["--endpoints", &e.url, "snapshot", "save"])
            .arg(&snap);
        let save = timed(cmd, "etcdctl snapshot save");
        let file = std::fs::metadata(&snap).map(|m| m.len()).unwrap_or(0);
        let mut cmd = Command::new(&etcdctl);
        cmd.env("ETCDCTL_API", "3")
            .args(["snapshot", "restore"])
            .arg(&snap)
            .arg("--data-dir")
            .arg(e.dir.path().join("restored"));
        let restore = timed(cmd, "etcdctl snapshot restore");
        Row {
            records,
            state_mib: mib(records * (value_bytes as u64 + 20)),
            save,
            file_mib: mib(file),
            restore,
        }
    });

    println!("online backup of {services} services after {entries} entries (runed's log at index {index}, data dir {:.1} MiB)", mib(data_dir));
    println!();
    println!("| | records | state MiB | backup ms | file MiB | MiB/s | restore ms |");
    println!("|--|--:|--:|--:|--:|--:|--:|");
    let line = |name: &str, r: &Row| {
        println!(
            "| {name} | {} | {:.2} | {:.0} | {:.2} | {:.1} | {:.0} |",
            r.records,
            r.state_mib,
            r.save.as_secs_f64() * 1e3,
            r.file_mib,
            r.file_mib / r.save.as_secs_f64(),
            r.restore.as_secs_f64() * 1e3
        )
    };
    line("runed (rune admin backup, runed restore)", &runed);
    match &peer {
        Some(e) => {
            line("etcd 3.4 (etcdctl snapshot save, restore)", e);
            println!();
            println!(
                "ratio runed/etcd: backup time {:.2}, restore time {:.2}",
                runed.save.as_secs_f64() / e.save.as_secs_f64(),
                runed.restore.as_secs_f64() / e.restore.as_secs_f64()
            );
            common::summary(
                "online backup",
                "ms",
                runed.save.as_secs_f64() * 1e3,
                Some(("etcdctl snapshot save", e.save.as_secs_f64() * 1e3)),
                false,
            );
            common::summary(
                "restore",
                "ms",
                runed.restore.as_secs_f64() * 1e3,
                Some(("etcdctl snapshot restore", e.restore.as_secs_f64() * 1e3)),
                false,
            );
        }
        None => {
            eprintln!("etcd not found: `apt-get install etcd-server etcd-client` for the side-by-side row")
        }
    }
}

/// Waits until `n` instances are ready.
async fn all_ready(ch: &Ch, n: usize) {
    let mut c = pb::instance_api_client::InstanceApiClient::new(ch.clone());
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let mut ready = 0;
        let mut token = String::new();
        loop {
            let r = c
                .list_instances(pb::ListInstancesRequest {
                    namespace: "default".into(),
                    limit: 500,
                    continue_token: token,
                    ..Default::default()
                })
                .await
                .expect("list")
                .into_inner();
            ready += r.instances.iter().filter(|i| i.ready).count();
            if r.continue_token.is_empty() {
                break;
            }
            token = r.continue_token;
        }
        if ready >= n {
            return;
        }
        assert!(Instant::now() < deadline, "only {ready} of {n} instances ready");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn sizing(rt: &tokio::runtime::Runtime, bins: &Bins) {
    let d = Daemon::start(bins);
    let pid = d.pid().expect("pid");
    let ch = rt.block_on(connect(&d));
    let tick = 100.0; // USER_HZ on Linux
    println!();
    println!("runed's sizing with N process services running (scale 1 each), idle");
    println!();
    println!("| services | RSS MiB | data dir MiB | CPU idle, % of a core | original Rune documents |");
    println!("|--:|--:|--:|--:|--|");
    let mut cast = 0;
    for (n, documented) in [
        (20usize, "256 MiB, 1 GiB, 0.25 core"),
        (100, "512 MiB, 5 GiB, 0.5 core"),
        (500, "1 GiB, 20 GiB, 1 core"),
    ] {
        rt.block_on(async {
            let mut c = pb::service_api_client::ServiceApiClient::new(ch.clone());
            let names: Vec<usize> = (cast..n).collect();
            for chunk in names.chunks(100) {
                let resources = chunk
                    .iter()
                    .map(|i| pb::Resource {
                        kind: Some(pb::resource::Kind::ServiceJson(
                            serde_json::json!({"name": format!("size-{i}"), "scale": 1,
                                "process": {"command": "/bin/sleep", "args": ["100000"]}})
                            .to_string(),
                        )),
                    })
                    .collect();
                c.apply(pb::ApplyRequest {
                    resources,
                    ..Default::default()
                })
                .await
                .expect("apply");
            }
            all_ready(&ch, n).await;
        });
        cast = n;
        // Settle, then measure CPU over a window of idleness.
        std::thread::sleep(Duration::from_secs(5));
        let (t0, c0) = (Instant::now(), common::cpu_ticks(pid));
        std::thread::sleep(Duration::from_secs(20));
        let cpu = (common::cpu_ticks(pid) - c0) as f64 / tick / t0.elapsed().as_secs_f64() * 100.0;
        println!(
            "| {n} | {:.1} | {:.1} | {cpu:.1} | {documented} |",
            common::rss_kib(pid) as f64 / 1024.0,
            mib(du_bytes(&d.data_dir))
        );
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let bins = Bins::locate();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    backup_vs_etcd(&rt, &bins);
    sizing(&rt, &bins);
}
