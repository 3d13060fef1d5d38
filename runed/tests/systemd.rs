//! runed under a real systemd: a Debian 12 root (scripts/systemd-image.sh, debootstrap) booted
//! with systemd as PID 1 in a container, where `deploy/install.sh` installs the binaries this
//! test was built with. Install, readiness, bootstrap and cast; restart keeps the state; a
//! SIGKILL is restarted; a stopped process is restarted by the watchdog; the journal holds
//! errors and warnings at their priorities; a bad runefile fails once, without a loop.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use rune_chaos_tests::{stderr, stdout, wait_until};

const IMAGE: &str = "rune-systemd-test:bookworm-2";
const LONG: Duration = Duration::from_secs(90);

fn image() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/systemd-image.sh");
        let st = Command::new("bash")
            .arg(script)
            .status()
            .expect("run systemd-image.sh");
        assert!(
            st.success(),
            "building {IMAGE} failed (debootstrap needs Debian's mirror)"
        );
    });
}

/// A container booting systemd, removed when dropped.
struct Host(String);

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Host {
    fn boot() -> Self {
        image();
        let name = format!(
            "rune-systemd-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let bin_dir = Path::new(env!("CARGO_BIN_EXE_runed"))
            .parent()
            .unwrap()
            .to_path_buf();
        let o = Command::new("docker")
            .args(["run", "-d", "--name", &name, "--hostname", "rune-host"])
            .args([
                "--cap-add",
                "SYS_ADMIN",
                // nftables in the container's own network namespace: the production data path.
                "--cap-add",
                "NET_ADMIN",
                "--tmpfs",
                "/run",
                "--tmpfs",
                "/run/lock",
            ])
            .args(["--cgroupns=host", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw"])
            .arg("-v")
            .arg(format!("{}:/src:ro", repo.canonicalize().unwrap().display()))
            .arg("-v")
            .arg(format!("{}:/bin-src:ro", bin_dir.display()))
            .args([IMAGE, "/lib/systemd/systemd"])
            .output()
            .unwrap();
        assert!(o.status.success(), "docker run: {}", stderr(&o));
        let host = Host(name);
        wait_until(LONG, "systemd to boot", || {
            let s = stdout(&host.sh("systemctl is-system-running"));
            s.starts_with("running") || s.starts_with("degraded")
        });
        host
    }

    fn sh(&self, script: &str) -> Output {
        Command::new("docker")
            .args(["exec", &self.0, "sh", "-c", script])
            .output()
            .unwrap()
    }

    fn ok(&self, script: &str) -> String {
        let o = self.sh(script);
        assert!(o.status.success(), "{script}:\n{}{}", stdout(&o), stderr(&o));
        stdout(&o)
    }

    fn prop(&self, p: &str) -> String {
        self.ok(&format!("systemctl show -p {p} --value runed"))
            .trim()
            .to_string()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
    }
}

#[test]
fn install_live_with_and_recover_under_systemd() {
    let h = Host::boot();
    // Install: enable --now returns once runed said READY=1.
    h.ok("/src/deploy/install.sh --bin-dir /bin-src");
    assert_eq!(h.ok("systemctl is-active runed").trim(), "active");
    assert_eq!(h.ok("curl -s localhost:7861/healthz"), "ok\n");
    assert!(
        h.prop("StatusText").starts_with("serving"),
        "{}",
        h.prop("StatusText")
    );
    // The KEK went to the data dir (writable under ProtectSystem), not /etc.
    h.ok("test -s /var/lib/rune/kek.b64 && test ! -e /etc/rune/kek.b64");
    // Bootstrap over the admin socket, into a directory that does not exist yet.
    h.ok("rune admin bootstrap --out-file /root/.rune/root.token");
    h.ok("rune login local --server localhost:7863 --token-file /root/.rune/root.token");
    h.ok("printf 'service:\\n  name: sleeper\\n  scale: 1\\n  process:\\n    command: /bin/sleep\\n    args: [\"3600\"]\\n' > /root/s.yaml && rune cast /root/s.yaml --timeout 60s");
    let instances = || h.ok("rune get instances -o json");
    assert!(instances().contains("\"ready\": true"), "{}", instances());

    // The host resolves service names: install.sh gave systemd-resolved a `~rune` routing
    // domain to runed's DNS, which answers once the VIP's kernel redirect is loaded.
    let svc: serde_json::Value =
        serde_json::from_str(&h.ok("rune get svc sleeper -o json")).expect("service JSON");
    let vip = svc["vip"].as_str().expect("a VIP").to_string();
    h.ok("echo 'nameserver 127.0.0.53' > /etc/resolv.conf");
    wait_until(LONG, "the host to resolve sleeper.default.rune", || {
        stdout(&h.sh("dig +short +time=2 +tries=1 sleeper.default.rune")).trim() == vip
    });
    assert!(h.ok("resolvectl query sleeper.default.rune").contains(&vip));
    assert!(h.ok("rune policy status").contains("kernel enforcement: on"));

    // systemctl restart keeps the state, and the instance is adopted, not restarted.
    let pid = h.prop("MainPID");
    h.ok("systemctl restart runed");
    assert_ne!(h.prop("MainPID"), pid);
    assert!(h.ok("rune get services").contains("sleeper"));
    wait_until(LONG, "the instance to be adopted", || {
        let v = instances();
        v.contains("\"ready\": true") && v.contains("\"restarts\": 0")
    });

    // SIGKILL: systemd restarts it.
    let pid = h.prop("MainPID");
    h.ok(&format!("kill -9 {pid}"));
    wait_until(LONG, "systemd to restart runed after SIGKILL", || {
        let now = h.prop("MainPID");
        now != pid && now != "0" && h.sh("curl -sf localhost:7861/healthz").status.success()
    });

    // The watchdog: a stopped runed feeds nothing and is restarted.
    h.ok("mkdir -p /etc/systemd/system/runed.service.d && printf '[Service]\\nWatchdogSec=4s\\nTimeoutAbortSec=4s\\n' > /etc/systemd/system/runed.service.d/watchdog.conf && systemctl daemon-reload && systemctl restart runed");
    let pid = h.prop("MainPID");
    h.ok(&format!("kill -STOP {pid}"));
    wait_until(LONG, "the watchdog to restart a stopped runed", || {
        let now = h.prop("MainPID");
        now != pid && now != "0" && h.sh("curl -sf localhost:7861/healthz").status.success()
    });
    assert!(
        h.ok("journalctl -u runed --no-pager")
            .contains("Watchdog timeout"),
        "{}",
        h.ok("journalctl -u runed --no-pager | tail -30")
    );

    // The journal: warnings at warning, never at err; fields queryable.
    let warnings = h.ok("journalctl -u runed -p warning --no-pager");
    assert!(warnings.contains("generated a new KEK"), "{warnings}");
    let errors = h.ok("journalctl -u runed -p err --no-pager");
    assert!(
        !errors.contains("generated a new KEK") && !errors.contains("runed is ready"),
        "{errors}"
    );
    assert!(!h.ok("journalctl -u runed -F RUNE_KEK_ID").trim().is_empty());

    // A bad runefile: failed once, the reason shown, no restart loop.
    h.ok("cp /etc/rune/runefile.yaml /root/good.yaml && printf 'serverr:\\n  grpc-addr: \":7863\"\\n' >> /etc/rune/runefile.yaml");
    let _ = h.sh("systemctl restart runed");
    wait_until(LONG, "runed to fail on its runefile", || {
        h.sh("systemctl is-failed runed").status.success()
    });
    let status = stdout(&h.sh("systemctl status runed --no-pager"));
    assert!(status.contains("status=78"), "{status}");
    assert!(
        status.contains("configuration error") || status.contains("serverr"),
        "{status}"
    );
    let errors = h.ok("journalctl -u runed -p err --no-pager");
    assert!(errors.contains("serverr: unknown key"), "{errors}");
    // For several RestartSec (2 s), it stays failed and is not restarted (NRestarts counts
    // automatic restarts since the manual one).
    let since = std::time::Instant::now();
    while since.elapsed() < Duration::from_secs(6) {
        assert_eq!(h.prop("NRestarts"), "0", "no restart loop");
        assert_eq!(h.ok("systemctl is-active runed || true").trim(), "failed");
    }

    // Fixed, it starts again with everything it had.
    h.ok(
        "cp /root/good.yaml /etc/rune/runefile.yaml && systemctl reset-failed runed && systemctl start runed",
    );
    assert!(h.ok("rune get services").contains("sleeper"));
}
