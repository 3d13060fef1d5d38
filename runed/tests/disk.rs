//! A full disk, for real: the data dir on a small tmpfs (mounted and removed by the test).
//! Writes are refused before the disk is full and resume once it is grown, with no restart;
//! a disk filled by someone else makes runed exit (for systemd to restart it) and nothing
//! acknowledged is lost.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use rune_chaos_tests::{http_get, stderr, stdout, wait_until, Daemon};
use rune_proto::v1 as pb;

const LONG: Duration = Duration::from_secs(60);

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, mib: u64) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount (util-linux)");
        assert!(
            st.success(),
            "mounting a tmpfs needs root (CI runs the tests as root)"
        );
        Tmpfs(dir.to_path_buf())
    }

    fn resize(&self, mib: u64) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,size={mib}m")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(st.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn services(prefix: &str, n: usize) -> Vec<pb::Resource> {
    (0..n)
        .map(|i| pb::Resource {
            kind: Some(pb::resource::Kind::ServiceJson(
                serde_json::json!({
                    "name": format!("{prefix}-{i}"),
                    "image": "busybox",
                    "scale": 0,
                    "env": {"PAD": "x".repeat(3000)},
                })
                .to_string(),
            )),
        })
        .collect()
}

async fn client(
    d: &Daemon,
) -> pb::service_api_client::ServiceApiClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, rune_chaos_tests::Bearer>,
> {
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", d.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    pb::service_api_client::ServiceApiClient::with_interceptor(ch, d.bearer())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_stop_at_the_reserve_and_resume_when_space_returns() {
    let mut d = Daemon::new(&bins());
    // Little room above the reserve, so it fills in a few dozen writes.
    let fs = Tmpfs::mount(&d.scratch().join("disk"), 24);
    d.data_dir = fs.0.join("data");
    d.extra = vec!["--storage-reserve".into(), "16MiB".into()];
    d.restart();
    let pid = d.pid();
    let mut c = client(&d).await;
    let mut refused = None;
    for batch in 0..1000 {
        match c
            .apply(pb::ApplyRequest {
                resources: services(&format!("b{batch}"), 50),
                ..Default::default()
            })
            .await
        {
            Ok(_) => {}
            Err(s) => {
                refused = Some(s);
                break;
            }
        }
    }
    let s = refused.expect("writes were never refused");
    assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
    assert!(
        s.message().contains(&d.data_dir.display().to_string()) && s.message().contains("free"),
        "{}",
        s.message()
    );
    // The CLI says the same and fails; reads, health and deletes carry on.
    let f = write(
        &d,
        "one.yaml",
        "service:\n  name: one-more\n  image: x\n  scale: 0\n",
    );
    let o = d.rune(&["cast", "--detach", &f]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("below the reserve"), "{}", stderr(&o));
    assert!(run_ok(&d, &["get", "services"]).contains("b0-0"));
    assert_eq!(http_get(d.http, "/healthz").map(|r| r.0), Some(200));
    run_ok(&d, &["delete", "service", "b0-0"]);
    let (_, metrics) = http_get(d.metrics, "/metrics").unwrap();
    assert!(
        metrics.lines().any(
            |l| l.starts_with("rune_storage_writes_refused_total{command=\"apply\"}") && !l.ends_with(" 0")
        ),
        "{metrics}"
    );

    // More room: writes resume, same process.
    fs.resize(256);
    wait_until(LONG, "writes to resume", || {
        code(&d.rune(&["cast", "--detach", &f])) == 0
    });
    assert_eq!(d.pid(), pid, "no restart");
    assert!(run_ok(&d, &["get", "services"]).contains("one-more"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_filled_by_another_process_makes_runed_exit_and_loses_nothing() {
    let mut d = Daemon::new(&bins());
    let fs = Tmpfs::mount(&d.scratch().join("disk"), 32);
    d.data_dir = fs.0.join("data");
    d.extra = vec!["--storage-reserve".into(), "0".into()];
    d.restart();
    let mut c = client(&d).await;
    let mut acked = Vec::new();
    for batch in 0..3 {
        let r = c
            .apply(pb::ApplyRequest {
                resources: services(&format!("early{batch}"), 5),
                ..Default::default()
            })
            .await
            .unwrap();
        acked.push((format!("early{batch}"), r.into_inner().index));
    }
    // Another process takes every free byte.
    let _ = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", fs.0.join("filler").display()))
        .args(["bs=1M", "status=none"])
        .status();
    // The log has up to 4 MiB allocated ahead (its appends never grow the file), so the first
    // refusal may come a few thousand writes after the disk is full.
    let mut failed = None;
    for batch in 0..20_000 {
        match c
            .apply(pb::ApplyRequest {
                resources: services(&format!("late{batch}"), 5),
                ..Default::default()
            })
            .await
        {
            Ok(r) => acked.push((format!("late{batch}"), r.into_inner().index)),
            Err(s) => {
                failed = Some(s);
                break;
            }
        }
    }
    let s = failed.expect("a write on a full disk failed");
    assert_ne!(s.code(), tonic::Code::Ok);
    let st = d.wait_exit(LONG);
    assert_eq!(
        st.code(),
        Some(74),
        "runed exits (EX_IOERR) for its supervisor to restart it:\n{}",
        d.logs()
    );
    assert!(d.logs().contains("the log stopped"), "{}", d.logs());

    // Space again, a restart (as systemd would), and every acknowledged write is there.
    std::fs::remove_file(fs.0.join("filler")).unwrap();
    d.restart();
    let names = run_ok(&d, &["get", "services", "-o", "json"]);
    for (prefix, index) in &acked {
        for i in 0..5 {
            let name = format!("\"{prefix}-{i}\"");
            assert!(names.contains(&name), "{name} (index {index}) lost");
        }
    }
    assert_eq!(d.sigterm().code(), Some(0));
    let v = run_ok(
        &d,
        &[
            "admin",
            "replay",
            "--data-dir",
            d.data_dir.to_str().unwrap(),
            "--verify",
        ],
    );
    assert!(v.contains("matches the live state"), "{v}");
    let _ = stdout;
}
