//! Backups as an operator takes them: online under concurrent writers (`rune admin backup`),
//! restored offline (`runed restore`) with and without the right KEK, and the seed's offline
//! procedure (stop, tar, start).

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rune_chaos_tests::{stderr, stdout, wait_until, Daemon};
use rune_proto::v1 as pb;

const LONG: Duration = Duration::from_secs(60);

fn service_json(name: &str) -> String {
    serde_json::json!({"name": name, "image": "busybox", "scale": 0}).to_string()
}

/// Every service name, page by page, over gRPC.
async fn service_names(d: &Daemon) -> std::collections::BTreeSet<String> {
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", d.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = pb::service_api_client::ServiceApiClient::with_interceptor(ch, d.bearer());
    let mut names = std::collections::BTreeSet::new();
    let mut token = String::new();
    loop {
        let r = c
            .list_services(pb::ListServicesRequest {
                namespace: "*".into(),
                limit: 500,
                continue_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        names.extend(r.services.into_iter().map(|s| s.name));
        if r.continue_token.is_empty() {
            return names;
        }
        token = r.continue_token;
    }
}

fn restore(d: &Daemon, from: &Path, dir: &Path, kek: Option<&Path>) -> std::process::Output {
    let mut c = Command::new(&d.bins.runed);
    c.args(["restore", "--from"]).arg(from).arg("--data-dir").arg(dir);
    if let Some(k) = kek {
        c.arg("--kek-file").arg(k);
    }
    c.output().unwrap()
}

/// A daemon on an existing data dir, with the token of the one it came from.
fn daemon_on(from: &Daemon, dir: &Path) -> Daemon {
    let mut d = Daemon::new(&from.bins);
    d.data_dir = dir.to_path_buf();
    d.auto_bootstrap = false;
    d.token = from.token.clone();
    d.restart();
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_backup_under_writers_restores_with_its_kek_only() {
    let d = Daemon::start(&bins());
    let s = write(
        &d,
        "s.yaml",
        "secret:\n  name: db\n  stringData: {password: s3cret}\n",
    );
    run_ok(&d, &["cast", &s]);

    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let last = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..8 {
        let ch = tonic::transport::Channel::from_shared(format!("http://{}", d.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut c = pb::service_api_client::ServiceApiClient::with_interceptor(ch, d.bearer());
        let (stop, acked, last) = (stop.clone(), acked.clone(), last.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("w{w}-{i}");
                let r = c
                    .apply(pb::ApplyRequest {
                        resources: vec![pb::Resource {
                            kind: Some(pb::resource::Kind::ServiceJson(service_json(&name))),
                        }],
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                last.fetch_max(r.index, Ordering::Relaxed);
                acked.lock().unwrap().push((name, r.index));
                i += 1;
            }
        }));
    }
    let start = last.load(Ordering::Relaxed);
    wait_until(LONG, "writers to get going", || {
        last.load(Ordering::Relaxed) > start + 50
    });

    let file = d.scratch().join("online.backup");
    let cmd = d.rune_cmd();
    let f = file.clone();
    let o = tokio::task::spawn_blocking(move || {
        let mut cmd = cmd;
        cmd.args(["admin", "backup", "--out"]).arg(&f).output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let index: u64 = stdout(&o)
        .split_whitespace()
        .nth(3)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no index in {}", stdout(&o)));
    wait_until(LONG, "writes to go on after the backup", || {
        last.load(Ordering::Relaxed) > index + 50
    });
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.iter().any(|(_, i)| *i > index) && acked.iter().any(|(_, i)| *i <= index));
    // The backup holds no KEK and no secret in clear.
    let bytes = std::fs::read(&file).unwrap();
    let kek = std::fs::read_to_string(d.data_dir.join("kek.b64")).unwrap();
    for needle in [kek.trim().as_bytes(), b"s3cret".as_slice()] {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "the backup holds a plaintext"
        );
    }

    // Without the KEK, or with another one, nothing is restored (exit 78).
    let wrong = d.scratch().join("wrong.kek");
    std::fs::write(&wrong, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n").unwrap();
    let target = d.scratch().join("restored");
    for (kek, says) in [
        (None, "never holds the KEK"),
        (Some(wrong.as_path()), "does not open"),
    ] {
        let o = restore(&d, &file, &target, kek);
        assert_eq!(code(&o), 78, "{}", stderr(&o));
        assert!(stderr(&o).contains(says), "{}", stderr(&o));
        assert!(!target.join("state.redb").exists(), "nothing written");
    }
    let o = restore(&d, &file, &target, Some(&d.data_dir.join("kek.b64")));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).contains(&format!("at index {index}")),
        "{}",
        stdout(&o)
    );

    let mut r = daemon_on(&d, &target);
    let names = service_names(&r).await;
    for (name, i) in &acked {
        assert_eq!(
            names.contains(name),
            *i <= index,
            "{name} acknowledged at index {i}, backup at {index}"
        );
    }
    let shown = run_ok(&r, &["get", "secret", "db", "--show-values"]);
    assert!(shown.contains("s3cret"), "{shown}");
    let f = write(
        &r,
        "after.yaml",
        "service:\n  name: after-restore\n  image: x\n  scale: 0\n",
    );
    run_ok(&r, &["cast", "--detach", &f]);
    assert_eq!(r.sigterm().code(), Some(0));
    let v = run_ok(
        &r,
        &[
            "admin",
            "replay",
            "--data-dir",
            target.to_str().unwrap(),
            "--verify",
        ],
    );
    assert!(v.contains("matches the live state"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_offline_procedure_stop_tar_start() {
    let mut d = Daemon::start(&bins());
    let s = write(
        &d,
        "s.yaml",
        "secret:\n  name: db\n  stringData: {password: s3cret}\nservice:\n  name: api\n  image: x\n  scale: 0\n",
    );
    run_ok(&d, &["cast", &s]);
    assert_eq!(d.sigterm().code(), Some(0));
    let tgz = d.scratch().join("rune-backup.tgz");
    let st = Command::new("tar")
        .arg("-czf")
        .arg(&tgz)
        .arg("-C")
        .arg(&d.data_dir)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let target = d.scratch().join("from-tar");
    std::fs::create_dir_all(&target).unwrap();
    let st = Command::new("tar")
        .arg("-xzf")
        .arg(&tgz)
        .arg("-C")
        .arg(&target)
        .status()
        .unwrap();
    assert!(st.success());
    // The KEK lives in the data dir, so the tarball carries it: secrets open.
    let r = daemon_on(&d, &target);
    assert!(service_names(&r).await.contains("api"));
    assert!(run_ok(&r, &["get", "secret", "db", "--show-values"]).contains("s3cret"));
}
