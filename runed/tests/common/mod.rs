//! Helpers shared by the end-to-end tests: the binaries under test, running `rune`, files.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;

use rune_chaos_tests::{free_port, stderr, stdout, Bins, Daemon};
use serde_json::Value;

/// The `runed` and `rune` this test crate was built with.
pub fn bins() -> Bins {
    Bins {
        runed: env!("CARGO_BIN_EXE_runed").into(),
        rune: env!("CARGO_BIN_EXE_rune").into(),
    }
}

/// The exit code, -1 for a signal.
pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// Writes a file in the daemon's scratch directory and returns its path.
pub fn write(d: &Daemon, name: &str, text: &str) -> String {
    let p = d.scratch().join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// Builds the busybox test image once per test binary.
pub fn image() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/test-images.sh");
        let st = Command::new("bash")
            .arg(script)
            .status()
            .expect("run test-images.sh");
        assert!(st.success(), "building the busybox test image failed");
    });
}

/// Runs `rune` and asserts it succeeded; returns its stdout.
pub fn run_ok(d: &Daemon, args: &[&str]) -> String {
    let o = d.rune(args);
    assert_eq!(code(&o), 0, "rune {args:?}: {}{}", stdout(&o), stderr(&o));
    stdout(&o)
}

/// Waits (90 s at most) until the first instance of `svc` reports a reason containing `needle`.
pub fn wait_for_reason(d: &Daemon, svc: &str, needle: &str) {
    rune_chaos_tests::wait_until(
        std::time::Duration::from_secs(90),
        &format!("{svc}'s instance to report '{needle}'"),
        || {
            instances(d, svc)
                .first()
                .is_some_and(|i| i["reason"].as_str().is_some_and(|r| r.contains(needle)))
        },
    );
}

/// `rune get instances SVC -o json`.
pub fn instances(d: &Daemon, svc: &str) -> Vec<Value> {
    serde_json::from_str::<Value>(&run_ok(d, &["get", "instances", svc, "-o", "json"]))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// Every file under `dir` whose bytes contain `needle`.
pub fn grep_dir(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                hits.extend(grep_dir(&p, needle));
            } else if std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)) {
                hits.push(p.display().to_string());
            }
        }
    }
    hits
}

/// A child process killed (and reaped) when the test lets go of it.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Debian's dnsmasq on a free loopback port, answering only its `--address` rule
/// (`/upstream.test/192.0.2.7`, `/test/127.0.0.1`).
pub fn dnsmasq(rule: &str) -> (Killed, SocketAddr) {
    dnsmasq_with(&[format!("--address={rule}")])
}

/// dnsmasq on loopback with these extra options (records to serve).
pub fn dnsmasq_with(options: &[String]) -> (Killed, SocketAddr) {
    let port = free_port();
    let child = Command::new("dnsmasq")
        .args([
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
        ])
        .arg(format!("--port={port}"))
        .args(options)
        .args(["--user=root", "--pid-file="])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq (Debian's dnsmasq-base)");
    (Killed(child), ([127, 0, 0, 1], port).into())
}

/// A non-loopback IPv4 address of this machine, if it has one.
pub fn outside_address() -> Option<String> {
    let o = std::process::Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .ok()?;
    stdout(&o)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|cidr| cidr.split('/').next())
        .find(|ip| !ip.starts_with("127."))
        .map(String::from)
}

/// Asserts that `promtool check metrics` (Debian's prometheus package) accepts an exposition.
pub fn promtool_ok(body: &str) {
    use std::io::Write;
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/test.sh installs it)");
    if let Some(mut stdin) = p.stdin.take() {
        stdin.write_all(body.as_bytes()).unwrap();
    }
    let o = p.wait_with_output().unwrap();
    assert!(o.status.success(), "promtool: {}{}", stdout(&o), stderr(&o));
}

/// Turns a failpoint of a runed started with `--enable-failpoints` on or off.
pub fn failpoint(d: &Daemon, name: &str, on: bool) {
    post_failpoint(d, &format!("{name}/{}", if on { "on" } else { "off" }));
}

/// Failpoint: the stored record of service `namespace/name` no longer decodes.
pub fn corrupt_service(d: &Daemon, namespace: &str, name: &str) {
    post_failpoint(d, &format!("corrupt-service/{namespace}/{name}"));
}

fn post_failpoint(d: &Daemon, path: &str) {
    let o = Command::new("curl")
        .args(["-sf", "-X", "POST"])
        .arg(format!("http://{}/debug/failpoints/{path}", d.http))
        .output()
        .unwrap();
    assert!(o.status.success(), "failpoint {path}: {}", stderr(&o));
}

/// Makes projection `name` (`dns`, `dataplane`, `ingress`) fall behind the log: its tail is
/// paused (`<name>-tail-pause`) and a service `late` is cast without waiting, so an entry it
/// has not applied exists. Past the stale budget it fails closed; turning the failpoint off
/// lets it catch up (and learn `late`).
pub fn fall_behind(d: &Daemon, name: &str) {
    failpoint(d, &format!("{name}-tail-pause"), true);
    let f = write(
        d,
        "late.yaml",
        "service:\n  name: late\n  process:\n    command: sleep\n    args: [\"1000\"]\n",
    );
    run_ok(d, &["cast", "--detach", &f]);
}
