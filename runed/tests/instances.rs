//! Running services end to end: real `runed` and `rune`, real host processes and a real Docker
//! Engine (with the local `busybox` image built FROM scratch by scripts/test-images.sh).

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rune_chaos_tests::{http_get, stderr, stdout, wait_until, Daemon};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(90);

fn ids(list: &[Value], field: &str) -> BTreeSet<String> {
    list.iter()
        .map(|i| i[field].as_str().unwrap_or_default().to_string())
        .collect()
}

fn all_ready(d: &Daemon, svc: &str, n: usize) -> bool {
    let l = instances(d, svc);
    l.len() == n && l.iter().all(|i| i["status"] == "Running" && i["ready"] == true)
}

fn pid_alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        let state = s.rfind(')').and_then(|i| s.get(i + 2..i + 3)).unwrap_or("X");
        state != "Z" && state != "X"
    })
}

fn containers_of(d: &Daemon) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label=rune.node={}", d.node)])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect()
}

const TICKER: &str = "service:
  name: ticker
  scale: 2
  env:
    GREETING: hello
  process:
    command: /bin/sh
    args: [\"-c\", \"echo started $RUNE_INSTANCE_ID $GREETING; trap 'echo bye; exit 0' TERM; while true; do sleep 0.2; done\"]
  health:
    readiness:
      type: exec
      command: [\"/bin/sh\", \"-c\", \"test -n \\\"$RUNE_INSTANCE_ID\\\"\"]
      intervalSeconds: 1
";

#[test]
fn process_service_cast_scale_restart_stop_delete() {
    let d = Daemon::start(&bins());
    let f = write(&d, "ticker.yaml", TICKER);
    let out = run_ok(&d, &["cast", &f]);
    assert!(out.contains("ready: 2/2"), "{out}");
    let first = instances(&d, "ticker");
    assert_eq!(
        ids(&first, "id"),
        BTreeSet::from(["ticker-0".into(), "ticker-1".into()])
    );
    for i in &first {
        assert_eq!(
            (i["runtime"].as_str(), i["address"].as_str()),
            (Some("process"), Some("127.0.0.1"))
        );
        assert!(pid_alive(i["runtimeId"].as_str().unwrap()), "{i}");
    }
    let pids = ids(&first, "runtimeId");

    // An unchanged re-cast restarts nothing.
    assert!(run_ok(&d, &["cast", &f]).contains("unchanged"));
    assert_eq!(ids(&instances(&d, "ticker"), "runtimeId"), pids);

    // Logs from every instance, with timestamps on request, or from one.
    let logs = run_ok(&d, &["logs", "ticker"]);
    assert!(logs.contains("[ticker-0] started ticker-0 hello"), "{logs}");
    assert!(logs.contains("[ticker-1] started ticker-1 hello"), "{logs}");
    let ts = run_ok(&d, &["logs", "ticker", "--instance", "ticker-1", "--timestamps"]);
    assert!(!ts.contains("ticker-0"), "{ts}");
    assert!(ts.lines().all(|l| l.starts_with("20")), "{ts}");

    // Scale up keeps the running instances; scale is not part of the template.
    assert!(run_ok(&d, &["scale", "ticker", "3"]).contains("ready: 3/3"));
    let scaled = instances(&d, "ticker");
    assert!(
        pids.is_subset(&ids(&scaled, "runtimeId")),
        "scaling replaced instances"
    );

    // Restart replaces every instance.
    run_ok(&d, &["restart", "ticker"]);
    let restarted = ids(&instances(&d, "ticker"), "runtimeId");
    assert!(
        restarted.is_disjoint(&ids(&scaled, "runtimeId")),
        "restart kept an instance"
    );
    for p in &ids(&scaled, "runtimeId") {
        wait_until(LONG, "old processes to end", || !pid_alive(p));
    }
    // SIGTERM reached the process (its trap ran) before it ended.
    assert!(run_ok(&d, &["logs", "ticker", "--instance", "ticker-0"]).contains("bye"));

    // Stop keeps the spec and the last scale; restart brings it back. Its progress is said
    // in instances left, never as counts out of zero.
    let o = d.rune(&["stop", "ticker"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("stopped: no instances"), "{}", stdout(&o));
    assert!(!stderr(&o).contains("/0 "), "{}", stderr(&o));
    assert!(instances(&d, "ticker").is_empty());
    for p in &restarted {
        assert!(!pid_alive(p), "pid {p} outlived stop");
    }
    let svc: Value = serde_json::from_str(&run_ok(&d, &["get", "svc", "ticker", "-o", "json"])).unwrap();
    assert_eq!(svc["metadata"]["lastNonZeroScale"], 3, "{svc}");
    assert!(run_ok(&d, &["restart", "ticker"]).contains("ready: 3/3"));

    // Delete stops and removes every instance and its files.
    let last = ids(&instances(&d, "ticker"), "runtimeId");
    run_ok(&d, &["delete", "service", "ticker"]);
    wait_until(LONG, "instances removed", || {
        instances_all(&d).is_empty() && last.iter().all(|p| !pid_alive(p))
    });
    wait_until(LONG, "instance folders removed", || {
        std::fs::read_dir(d.data_dir.join("instances/default")).map_or(true, |r| r.count() == 0)
    });
    assert!(d.process_pids().is_empty());
}

fn instances_all(d: &Daemon) -> Vec<Value> {
    let out = run_ok(d, &["get", "instances", "-o", "json"]);
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn container_service_probes_exec_logs() {
    image();
    let d = Daemon::start(&bins());
    // The original's example, as it is.
    let echo =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peer-specs/simple-service--echo.yaml");
    let out = run_ok(&d, &["cast", echo.to_str().unwrap()]);
    assert!(out.contains("ready: 1/1"), "{out}");
    wait_until(LONG, "echo to print", || {
        run_ok(&d, &["logs", "echo"]).contains("Hello from Rune!")
    });

    let web = write(
        &d,
        "web.yaml",
        "service:
  name: web
  image: busybox
  scale: 1
  command: [\"/bin/httpd\"]
  args: [\"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]
  stopGracePeriodSeconds: 1
  resources:
    cpu: {limit: \"500m\"}
    memory: {limit: \"64Mi\"}
  ports:
    - {name: http, port: 8080}
  health:
    readiness: {type: http, path: /index.html, port: http, intervalSeconds: 1}
    liveness:
      type: exec
      command: [\"/bin/sh\", \"-c\", \"test ! -f /tmp/sick\"]
      intervalSeconds: 1
      failureThreshold: 2
",
    );
    assert!(run_ok(&d, &["cast", &web]).contains("ready: 1/1"));
    let inst = &instances(&d, "web")[0];
    let addr = inst["address"].as_str().unwrap().to_string();
    assert!(addr.starts_with("172.") || addr.contains('.'), "{inst}");
    let (status, body) =
        http_get(format!("{addr}:8080").parse().unwrap(), "/index.html").expect("reach the container");
    assert_eq!((status, body.trim()), (200, "ok"));
    let health = run_ok(&d, &["health", "web"]);
    assert!(
        health.contains("readiness") && health.contains("passing") && health.contains("HTTP 200"),
        "{health}"
    );

    // The container got its limits.
    let cid = inst["runtimeId"].as_str().unwrap();
    let limits = Command::new("docker")
        .args([
            "inspect",
            "-f",
            "{{.HostConfig.NanoCpus}} {{.HostConfig.Memory}}",
            cid,
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&limits.stdout).trim(),
        "500000000 67108864"
    );

    // exec: output, stderr and the exit code pass through; stdin with -i.
    let o = d.rune(&["exec", "web", "--", "sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert_eq!((stdout(&o).trim(), stderr(&o).trim()), ("out", "err"));
    let mut child = d
        .rune_cmd()
        .args(["exec", "web", "-i", "--", "sh", "-c", "read x; echo got $x"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!((code(&o), stdout(&o).trim()), (0, "got hello"));

    // A failing liveness probe restarts the container.
    run_ok(&d, &["exec", "web", "--", "touch", "/tmp/sick"]);
    wait_until(LONG, "the liveness probe to restart web-0", || {
        let i = &instances(&d, "web")[0];
        i["restarts"].as_u64() >= Some(1) && i["status"] == "Running" && i["ready"] == true
    });
    assert_ne!(instances(&d, "web")[0]["runtimeId"].as_str(), Some(cid));

    run_ok(&d, &["delete", "web"]);
    run_ok(&d, &["delete", "echo"]);
    wait_until(LONG, "containers removed", || containers_of(&d).is_empty());
}

#[test]
fn crash_loops_back_off_and_replay_tells_the_story() {
    let mut d = Daemon::start(&bins());
    let f = write(
        &d,
        "crash.yaml",
        "service:\n  name: crash\n  scale: 1\n  process:\n    command: /bin/sh\n    args: [\"-c\", \"echo boom; exit 3\"]\n",
    );
    let o = d.rune(&["cast", &f, "--progress-deadline", "3s"]);
    assert_eq!(
        code(&o),
        7,
        "a rollout that stops progressing gives up: {}",
        stderr(&o)
    );
    // While it waits, and when it gives up, the instance is named with its state and with
    // what it last said.
    let err = stderr(&o);
    assert!(err.contains("made no progress for 3s"), "{err}");
    assert!(err.contains("\n  crash-0 "), "named while waiting: {err}");
    assert!(err.contains("exited with code 3: boom"), "{err}");
    wait_until(LONG, "three restarts", || {
        let i = &instances(&d, "crash")[0];
        i["restarts"].as_u64() >= Some(3) && i["status"] == "CrashLoopBackOff"
    });
    let logs = run_ok(&d, &["logs", "crash"]);
    assert!(
        logs.contains("[rune] crash-0 CrashLoopBackOff: exited with code 3"),
        "{logs}"
    );
    assert!(logs.matches("boom").count() >= 3, "{logs}");

    // Bad inputs fail the instance with the reason, and keep runed up.
    let bad = write(
        &d,
        "bad.yaml",
        "services:
  - name: nouser
    scale: 1
    process: {command: /bin/sleep, args: [\"100\"], securityContext: {user: no-such-user-here}}
  - name: nocmd
    scale: 1
    process: {command: /no/such/binary}
",
    );
    run_ok(&d, &["cast", "--detach", &bad]);
    wait_until(LONG, "reasons", || {
        let a = instances(&d, "nouser");
        let b = instances(&d, "nocmd");
        a.first().is_some_and(|i| {
            i["status"] == "Failed"
                && i["reason"]
                    .as_str()
                    .unwrap_or("")
                    .contains("unknown user 'no-such-user-here'")
        }) && b.first().is_some_and(|i| {
            i["status"] == "Failed"
                && i["reason"]
                    .as_str()
                    .unwrap_or("")
                    .contains("/no/such/binary: not found")
        })
    });
    assert!(run_ok(&d, &["logs", "nocmd"]).contains("/no/such/binary: not found"));

    // Stopped, the log tells what happened to the service, entry by entry.
    assert!(d.sigterm().success());
    let o = d.rune(&[
        "admin",
        "replay",
        "--data-dir",
        d.data_dir.to_str().unwrap(),
        "--resource",
        "service/default/crash",
    ]);
    let story = stdout(&o);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    for expect in [
        "scheduled on",
        "started",
        "exited with code 3",
        "restart #1",
        "restart #2",
        "restart #3",
    ] {
        assert!(story.contains(expect), "replay lacks {expect:?}:\n{story}");
    }
}

#[test]
fn dependencies_hold_instances_back_and_guard_deletes() {
    let d = Daemon::start(&bins());
    let f = write(
        &d,
        "deps.yaml",
        "services:
  - name: db
    scale: 0
    process: {command: /bin/sleep, args: [\"1000\"]}
  - name: api
    scale: 1
    process: {command: /bin/sleep, args: [\"1000\"]}
    dependencies:
      - db
",
    );
    run_ok(&d, &["cast", "--detach", &f]);
    wait_until(LONG, "api to wait for db", || {
        instances(&d, "api").first().is_some_and(|i| {
            i["status"] == "Waiting" && i["reason"].as_str().unwrap_or("").contains("default/db")
        })
    });
    let deps = run_ok(&d, &["deps", "api"]);
    assert!(
        deps.contains("-> default/db") && deps.contains("not ready"),
        "{deps}"
    );
    run_ok(&d, &["scale", "db", "1"]);
    wait_until(LONG, "api to start once db is ready", || all_ready(&d, "api", 1));
    assert!(run_ok(&d, &["deps", "db"]).contains("depended on by: default/api"));

    // An optional dependency that does not exist holds nothing back; a secret is ready once
    // it exists.
    let f = write(
        &d,
        "side.yaml",
        "service:\n  name: side\n  scale: 1\n  process: {command: /bin/sleep, args: [\"1000\"]}\n  dependencies: [{service: ghost, optional: true, timeoutSeconds: 3600}, \"secret:creds\"]\n",
    );
    run_ok(&d, &["cast", "--detach", &f]);
    wait_until(LONG, "side to wait for the secret only", || {
        instances(&d, "side").first().is_some_and(|i| {
            let r = i["reason"].as_str().unwrap_or("");
            i["status"] == "Waiting" && r.contains("creds (it does not exist)") && !r.contains("ghost")
        })
    });
    let f = write(&d, "creds.yaml", "secret:\n  name: creds\n  stringData: {k: v}\n");
    run_ok(&d, &["cast", &f]);
    wait_until(LONG, "side to start once the secret exists", || {
        all_ready(&d, "side", 1)
    });
    let deps = run_ok(&d, &["deps", "side"]);
    assert!(
        deps.contains("-> secret:default/creds (readyWhen healthy) ready"),
        "{deps}"
    );
    run_ok(&d, &["delete", "side"]);

    // A cycle is refused at cast time, naming it.
    let cyc = write(
        &d,
        "cyc.yaml",
        "service:\n  name: db\n  scale: 1\n  process: {command: /bin/sleep, args: [\"1000\"]}\n  dependencies: [api]\n",
    );
    let o = d.rune(&["cast", &cyc]);
    assert_eq!(code(&o), 6);
    assert!(
        stderr(&o).contains("dependency cycle: default/db -> default/api -> default/db"),
        "{}",
        stderr(&o)
    );

    // Deleting what others depend on needs --force.
    let o = d.rune(&["delete", "db"]);
    assert_eq!(code(&o), 5);
    assert!(stderr(&o).contains("default/api depends on it"), "{}", stderr(&o));
    run_ok(&d, &["delete", "db", "--force"]);
}

#[test]
fn rollouts_replace_one_instance_at_a_time() {
    let d = Daemon::start(&bins());
    let f = write(&d, "ticker.yaml", &TICKER.replace("scale: 2", "scale: 3"));
    run_ok(&d, &["cast", &f]);
    let before = ids(&instances(&d, "ticker"), "runtimeId");
    let mut watch = d
        .rune_cmd()
        .args(["get", "instances", "ticker", "--watch", "-o", "json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let changed = write(
        &d,
        "ticker2.yaml",
        &TICKER.replace("scale: 2", "scale: 3").replace("hello", "bonjour"),
    );
    assert!(run_ok(&d, &["cast", &changed]).contains("ready: 3/3"));
    let _ = watch.kill();
    let mut text = String::new();
    watch.stdout.take().unwrap().read_to_string(&mut text).unwrap();
    let _ = watch.wait();
    let after = instances(&d, "ticker");
    assert!(ids(&after, "runtimeId").is_disjoint(&before));
    assert!(after.iter().all(|i| i["current"] == true));
    assert!(run_ok(&d, &["logs", "ticker"]).contains("bonjour"));

    // Replay the watch: once the rollout began, at least two of three were ready at every step.
    // The watch may connect after the rollout began: its opening listing then arrives one
    // instance at a time, so capacity is counted once all three have been seen.
    let mut ready: std::collections::BTreeMap<String, bool> = Default::default();
    let mut min_ready = usize::MAX;
    let mut began = false;
    for line in text.lines() {
        let ev: Value = serde_json::from_str(line).unwrap();
        let i = &ev["instance"];
        let id = i["id"].as_str().unwrap().to_string();
        let up = ev["type"] != "DELETED" && i["status"] == "Running" && i["ready"] == true;
        if i["status"] == "Stopping" {
            began = true;
        }
        ready.insert(id, up);
        if began && ready.len() >= 3 {
            min_ready = min_ready.min(ready.values().filter(|r| **r).count());
        }
    }
    assert!(began, "no instance was replaced:\n{text}");
    assert!(
        min_ready >= 2,
        "capacity fell to {min_ready} during the rollout:\n{text}"
    );
}

#[test]
fn adopts_after_sigkill_and_removes_strays() {
    image();
    let mut d = Daemon::start(&bins());
    cast_ticker_and_web(&d);
    let procs = ids(&instances(&d, "ticker"), "runtimeId");
    let ctr = ids(&instances(&d, "web"), "runtimeId");

    d.sigkill();
    // Strays a crashed runed could leave: a container of a service that no longer exists, and a
    // process whose service is gone.
    let stray = Command::new("docker")
        .args([
            "run",
            "-d",
            "--label",
            "rune.managed=true",
            "--label",
            &format!("rune.node={}", d.node),
            "--label",
            "rune.namespace=default",
            "--label",
            "rune.service=gone",
            "--label",
            "rune.instance=gone-0",
            "--label",
            "rune.template=x",
            "busybox",
            "sleep",
            "1000",
        ])
        .output()
        .unwrap();
    assert!(
        stray.status.success(),
        "{}",
        String::from_utf8_lossy(&stray.stderr)
    );
    let stray_id = String::from_utf8_lossy(&stray.stdout).trim().to_string();
    let stray_proc = spawn_stray_process(&d.data_dir);

    d.restart();
    wait_until(LONG, "the strays to be removed", || {
        !pid_alive(&stray_proc.to_string())
            && Command::new("docker")
                .args(["inspect", &stray_id])
                .output()
                .is_ok_and(|o| !o.status.success())
    });
    wait_until(LONG, "instances to be adopted", || {
        all_ready(&d, "ticker", 2) && all_ready(&d, "web", 1)
    });
    assert_eq!(
        ids(&instances(&d, "ticker"), "runtimeId"),
        procs,
        "processes were replaced, not adopted"
    );
    assert_eq!(
        ids(&instances(&d, "web"), "runtimeId"),
        ctr,
        "the container was replaced, not adopted"
    );
    // Exactly one of each: nothing started twice, and the strays' records are gone too.
    wait_until(LONG, "one container and two processes", || {
        containers_of(&d).len() == 1 && d.process_pids().len() == 2
    });

    // Adopted instances are still stopped properly.
    run_ok(&d, &["stop", "ticker"]);
    for p in &procs {
        assert!(!pid_alive(p), "adopted pid {p} survived stop");
    }
}

/// Casts two process instances (`ticker`) and one container (`web`, busybox httpd).
fn cast_ticker_and_web(d: &Daemon) {
    let f = write(d, "ticker.yaml", TICKER);
    run_ok(d, &["cast", &f]);
    let web = write(
        d,
        "web.yaml",
        "service:\n  name: web\n  image: busybox\n  scale: 1\n  command: [\"/bin/httpd\"]\n  args: [\"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
    );
    run_ok(d, &["cast", &web]);
}

/// A sleeping process recorded as an instance of a service that does not exist.
fn spawn_stray_process(data_dir: &Path) -> u32 {
    spawn_stray(data_dir, &["sleep", "1000"], serde_json::json!({}))
}

/// `argv` running in a process group of its own, recorded as instance `gone-0` of a service
/// that does not exist; `extra` is merged into its `state.json`.
fn spawn_stray(data_dir: &Path, argv: &[&str], extra: Value) -> u32 {
    use std::os::unix::process::CommandExt;
    let dir = data_dir.join("instances/default/gone-0");
    std::fs::create_dir_all(&dir).unwrap();
    let child = Command::new(argv[0])
        .args(&argv[1..])
        .process_group(0)
        .spawn()
        .unwrap();
    let pid = child.id();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let start: u64 = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap();
    let mut state = serde_json::json!({
        "namespace": "default", "service": "gone", "id": "gone-0", "template": "x", "pid": pid, "start_time": start
    });
    if let (Some(s), Some(e)) = (state.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    std::fs::write(dir.join("state.json"), state.to_string()).unwrap();
    // Reap it when it dies so it does not linger as a zombie of the test.
    std::thread::spawn(move || {
        let mut c = child;
        let _ = c.wait();
    });
    pid
}

/// A unix socket in front of the Docker Engine that the test can cut and restore.
struct Proxy {
    path: PathBuf,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<UnixStream>>>,
}

impl Proxy {
    fn start(path: PathBuf) -> Self {
        let p = Proxy {
            path,
            up: Arc::new(AtomicBool::new(false)),
            conns: Arc::new(Mutex::new(Vec::new())),
        };
        p.restore();
        p
    }

    fn restore(&self) {
        let _ = std::fs::remove_file(&self.path);
        let l = UnixListener::bind(&self.path).unwrap();
        self.up.store(true, Ordering::SeqCst);
        let (up, conns) = (self.up.clone(), self.conns.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { continue };
                if !up.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(engine) = UnixStream::connect("/var/run/docker.sock") else {
                    continue;
                };
                conns.lock().unwrap().push(c.try_clone().unwrap());
                conns.lock().unwrap().push(engine.try_clone().unwrap());
                let (mut a, mut b) = (c.try_clone().unwrap(), engine.try_clone().unwrap());
                let (mut c2, mut e2) = (c, engine);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut a, &mut b);
                    let _ = b.shutdown(std::net::Shutdown::Write);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut e2, &mut c2);
                    let _ = c2.shutdown(std::net::Shutdown::Write);
                });
            }
        });
    }

    /// The socket disappears and every open connection breaks.
    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        let _ = std::fs::remove_file(&self.path);
        // Wake the accept loop so it sees the flag and ends.
        let _ = UnixStream::connect(&self.path);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[test]
fn docker_socket_cut_and_restored() {
    image();
    let mut d = Daemon::new(&bins());
    let sock = d.scratch().join("docker.sock");
    let proxy = Proxy::start(sock.clone());
    d.extra = vec!["--docker-socket".into(), sock.display().to_string()];
    d.restart();
    cast_ticker_and_web(&d);

    proxy.cut();
    let late = write(
        &d,
        "late.yaml",
        "service:\n  name: late\n  image: busybox\n  scale: 1\n  command: [\"sleep\", \"1000\"]\n",
    );
    run_ok(&d, &["cast", "--detach", &late]);
    wait_until(LONG, "the container to fail with the engine named", || {
        instances(&d, "late").first().is_some_and(|i| {
            i["status"] == "Failed"
                && i["reason"]
                    .as_str()
                    .unwrap_or("")
                    .contains("docker engine unreachable")
        })
    });
    // runed and the process service carry on.
    assert!(http_get(d.http, "/healthz").is_some_and(|(c, _)| c == 200));
    assert!(all_ready(&d, "ticker", 2));

    proxy.restore();
    wait_until(LONG, "the container to start once the engine is back", || {
        all_ready(&d, "late", 1)
    });
    assert!(all_ready(&d, "web", 1));
    assert_eq!(containers_of(&d).len(), 2);

    // runed starting while the engine is away: it says so, and adopts once the engine is back.
    let web_id = instances(&d, "web")[0]["runtimeId"].clone();
    assert!(d.sigterm().success());
    proxy.cut();
    d.restart();
    wait_until(LONG, "container instances to report the engine", || {
        instances(&d, "web").first().is_some_and(|i| {
            i["status"] == "Failed"
                && i["reason"]
                    .as_str()
                    .unwrap_or("")
                    .contains("docker engine unreachable")
        })
    });
    assert!(
        all_ready(&d, "ticker", 2),
        "process instances are adopted without the engine"
    );
    proxy.restore();
    wait_until(LONG, "the container to be adopted", || all_ready(&d, "web", 1));
    assert_eq!(
        instances(&d, "web")[0]["runtimeId"],
        web_id,
        "adopted, not replaced"
    );
    assert_eq!(containers_of(&d).len(), 2);
    assert!(d.sigterm().success());
}

#[test]
fn stop_escalates_to_sigkill_after_the_grace_period() {
    let d = Daemon::start(&bins());
    let f = write(
        &d,
        "stubborn.yaml",
        "service:
  name: stubborn
  scale: 1
  stopGracePeriodSeconds: 1
  process:
    command: /bin/sh
    args: [\"-c\", \"trap '' TERM; echo up; while true; do sleep 0.2; done\"]
",
    );
    run_ok(&d, &["cast", &f]);
    let pid = instances(&d, "stubborn")[0]["runtimeId"]
        .as_str()
        .unwrap()
        .to_string();
    run_ok(&d, &["stop", "stubborn"]);
    assert!(!pid_alive(&pid), "a process ignoring SIGTERM survived stop");
    assert!(instances(&d, "stubborn").is_empty());
}

/// `rune delete --wait` returns once the service's instances are gone (a process ignoring
/// SIGTERM is killed after its grace period), and gives up with exit 7, naming what is left,
/// when they outlast `--timeout`.
#[test]
fn delete_with_wait_returns_once_the_instances_are_gone() {
    let d = Daemon::start(&bins());
    let spec = |name: &str, grace: u32| {
        format!(
            "service:\n  name: {name}\n  scale: 2\n  stopGracePeriodSeconds: {grace}\n  process:\n    command: /bin/sh\n    args: [\"-c\", \"trap '' TERM; echo up; while true; do sleep 0.2; done\"]\n"
        )
    };
    let f = write(&d, "stubborn.yaml", &spec("stubborn", 1));
    run_ok(&d, &["cast", &f]);
    let pids: Vec<String> = instances(&d, "stubborn")
        .iter()
        .filter_map(|i| i["runtimeId"].as_str().map(String::from))
        .collect();
    assert_eq!(pids.len(), 2);
    let out = run_ok(
        &d,
        &["delete", "service", "stubborn", "--wait", "--timeout", "60s"],
    );
    assert!(
        out.contains("service/default/stubborn stopped: no instances"),
        "{out}"
    );
    for pid in &pids {
        assert!(!pid_alive(pid), "{pid} outlived the wait");
    }
    assert!(instances_all(&d).iter().all(|i| i["service"] != "stubborn"));

    let f = write(&d, "slow.yaml", &spec("slow", 60));
    run_ok(&d, &["cast", &f]);
    let o = d.rune(&["delete", "service", "slow", "--wait", "--timeout", "1s"]);
    assert_eq!(code(&o), 7, "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("service/default/slow deleted"),
        "{}",
        stdout(&o)
    );
    let e = stderr(&o);
    assert!(
        e.contains("timed out after 1s waiting for service/default/slow"),
        "{e}"
    );
    assert!(
        e.contains("slow-0") && e.contains("slow-1"),
        "what is left is named: {e}"
    );

    // A limit without the wait it limits, and nothing to wait for: refused before anything
    // is deleted.
    let o = d.rune(&["delete", "service", "slow", "--timeout", "5s"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("--timeout limits --wait"), "{}", stderr(&o));
    let o = d.rune(&["delete", "secret", "nothing", "--wait"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--wait waits for a service's instances"),
        "{}",
        stderr(&o)
    );
}

/// `rune exec -it` through a real terminal: python's pty module gives rune one.
fn tty_session(d: &Daemon, target: &str) {
    let script = r#"
import os, pty, sys, time, struct, fcntl, termios, select, signal
args = sys.argv[1:]
pid, fd = pty.fork()
if pid == 0:
    fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    os.execvp(args[0], args)
out = b""
def read_until(token, limit=30):
    global out
    end = time.time() + limit
    while token not in out and time.time() < end:
        r, _, _ = select.select([fd], [], [], 0.5)
        if r:
            try:
                out += os.read(fd, 4096)
            except OSError:
                break
    return token in out
fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
time.sleep(0.2)
os.write(fd, b"tty >/dev/null && echo TTY-$((6*7)); stty size | sed 's/ /x/'\n")
ok1 = read_until(b"TTY-42") and read_until(b"30x100")
fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
os.kill(pid, signal.SIGWINCH)
time.sleep(0.5)
os.write(fd, b"stty size | sed 's/ /x/'\n")
ok2 = read_until(b"40x120")
os.write(fd, b"exit 7\n")
_, status = os.waitpid(pid, 0)
code = os.waitstatus_to_exitcode(status)
print("RESULT", ok1, ok2, code)
if not (ok1 and ok2 and code == 7):
    sys.stderr.write(out.decode(errors="replace"))
"#;
    let mut cmd = Command::new("python3");
    cmd.arg("-c")
        .arg(script)
        .arg(&d.bins.rune)
        .args(["exec", target, "-it", "--", "/bin/sh"]);
    cmd.env("RUNE_API_SERVER", d.grpc.to_string())
        .env("RUNE_TOKEN", d.token.as_deref().unwrap_or_default())
        .env("RUNE_CLI_CONFIG", d.scratch().join("cli-config.yaml"));
    let o = cmd.output().unwrap();
    assert!(
        stdout(&o).contains("RESULT True True 7"),
        "{target}: {}\n{}",
        stdout(&o),
        stderr(&o)
    );
}

#[test]
fn exec_with_a_terminal_resizes_and_passes_the_exit_code() {
    image();
    let d = Daemon::start(&bins());
    let f = write(&d, "ticker.yaml", &TICKER.replace("scale: 2", "scale: 1"));
    run_ok(&d, &["cast", &f]);
    let web = write(
        &d,
        "box.yaml",
        "service:\n  name: box\n  image: busybox\n  scale: 1\n  command: [\"sleep\", \"100000\"]\n",
    );
    run_ok(&d, &["cast", &web]);
    tty_session(&d, "ticker");
    tty_session(&d, "box");
}

#[test]
fn endpoints_follow_ready_instances_through_the_log() {
    let d = Daemon::start(&bins());
    let f = write(
        &d,
        "web.yaml",
        "service:\n  name: web\n  scale: 2\n  ports: [{name: http, port: 80, targetPort: 8080}]\n  process:\n    command: /bin/sleep\n    args: ['3600']\n",
    );
    run_ok(&d, &["cast", "--timeout", "60s", &f]);
    let endpoints = |d: &Daemon| -> Vec<Value> {
        let v: Value = serde_json::from_str(&run_ok(d, &["get", "endpoints", "web", "-o", "json"])).unwrap();
        v["endpoints"].as_array().cloned().unwrap_or_default()
    };
    wait_until(LONG, "two endpoints", || endpoints(&d).len() == 2);
    let e = &endpoints(&d)[0];
    assert_eq!(e["address"], "127.0.0.1");
    assert_eq!(e["ports"][0]["port"], 80);
    assert_eq!(e["ports"][0]["targetPort"], 8080);
    let table = run_ok(&d, &["get", "endpoints"]);
    assert!(
        table.contains("127.0.0.1:8080,127.0.0.1:8080") && table.contains("10.96.0.2"),
        "{table}"
    );
    run_ok(&d, &["scale", "web", "1", "--timeout", "60s"]);
    wait_until(LONG, "one endpoint after scaling down", || {
        endpoints(&d).len() == 1
    });
    run_ok(&d, &["stop", "web", "--timeout", "60s"]);
    wait_until(LONG, "no endpoint once stopped", || endpoints(&d).is_empty());
    let (_, metrics) = http_get(d.metrics, "/metrics").expect("metrics");
    assert!(metrics.contains("rune_vip_allocations_total 1"), "{metrics}");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("rune_endpoints_published_total{")
                && l.contains("service=\"web\"")
                && l.contains("namespace=\"default\"")),
        "{metrics}"
    );
}

/// Reads lines of a child's stdout on a thread, so a test can wait for one with a deadline.
fn line_reader(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

#[test]
fn logs_follow_the_service_through_scale_and_replacement() {
    image();
    let d = Daemon::start(&bins());
    // Each run of the container says a token of its own.
    let f = write(
        &d,
        "talk.yaml",
        "service:\n  name: talk\n  image: busybox\n  scale: 1\n  command: [\"sh\", \"-c\", \"t=$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \\\\n'); while true; do echo run-$t; sleep 0.3; done\"]\n",
    );
    run_ok(&d, &["cast", &f]);
    let mut child = d
        .rune_cmd()
        .args(["logs", "talk", "-f"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let rx = line_reader(&mut child);
    let mut child = Killed(child);
    // Runs seen, by instance: `[talk-0] run-3fa2...`.
    type Runs = std::collections::BTreeMap<String, std::collections::BTreeSet<String>>;
    let mut runs: Runs = Default::default();
    let mut see_until = |what: &str, done: &dyn Fn(&Runs) -> bool| {
        let deadline = std::time::Instant::now() + LONG;
        while !done(&runs) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let l = rx
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("{what}: {e}; seen {runs:?}"));
            if let Some((inst, rest)) = l.strip_prefix('[').and_then(|r| r.split_once("] run-")) {
                runs.entry(inst.to_string()).or_default().insert(rest.to_string());
            }
        }
        runs.clone()
    };
    see_until("talk-0's output", &|r| r.contains_key("talk-0"));
    // An instance added by scale joins the stream.
    run_ok(&d, &["scale", "talk", "2"]);
    let before = see_until("talk-1's output", &|r| r.contains_key("talk-1"));
    // A restart replaces both containers: their new runs are followed too.
    run_ok(&d, &["restart", "talk"]);
    see_until("the replaced instances' output", &|r| {
        ["talk-0", "talk-1"]
            .iter()
            .all(|i| r.get(*i).map_or(0, |s| s.len()) > before.get(*i).map_or(0, |s| s.len()))
    });
    assert!(child.0.try_wait().unwrap().is_none(), "logs -f still follows");
}

#[test]
fn two_runeds_on_one_engine_never_touch_each_others_containers() {
    image();
    // Same node name (the host's, by default), different data dirs.
    let mut a = Daemon::new(&bins());
    let mut b = Daemon::new(&bins());
    b.node = a.node.clone();
    a.restart();
    b.restart();
    let spec = "service:\n  name: same\n  image: busybox\n  scale: 1\n  command: [\"sleep\", \"100000\"]\n";
    for d in [&a, &b] {
        let f = write(d, "same.yaml", spec);
        assert!(run_ok(d, &["cast", &f]).contains("ready: 1/1"));
    }
    let container = |d: &Daemon| {
        instances(d, "same")[0]["runtimeId"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    let (ca, cb) = (container(&a), container(&b));
    assert!(!ca.is_empty() && ca != cb, "two containers: {ca} {cb}");
    // Each keeps its own across a restart of the other (adoption and stray removal look at
    // their own cluster's containers only).
    b.sigterm();
    b.restart();
    assert!(all_ready(&a, "same", 1) && container(&a) == ca);
    wait_until(LONG, "b to adopt its container", || all_ready(&b, "same", 1));
    assert_eq!(container(&b), cb, "b adopted its own container");
    // Deleting a's service removes a's container only, and a's network once nothing uses it.
    run_ok(&a, &["delete", "service", "same"]);
    let running = |id: &str| {
        let o = std::process::Command::new("docker")
            .args(["inspect", "-f", "{{.State.Running}}", id])
            .output()
            .unwrap();
        stdout(&o).trim() == "true"
    };
    wait_until(LONG, "a's container to go", || !running(&ca));
    assert!(running(&cb), "b's container survived a's delete");
    let networks = || {
        let o = std::process::Command::new("docker")
            .args([
                "network",
                "ls",
                "--format",
                "{{.Name}}",
                "--filter",
                &format!("label=rune.node={}", a.node),
            ])
            .output()
            .unwrap();
        stdout(&o).lines().map(String::from).collect::<Vec<_>>()
    };
    wait_until(LONG, "a's network to be removed", || networks().len() == 1);
    run_ok(&b, &["delete", "service", "same"]);
    wait_until(LONG, "b's network to be removed", || networks().is_empty());
}

/// A metric's value (the first series whose line starts with `series`).
fn metric(d: &Daemon, series: &str) -> f64 {
    http_get(d.metrics, "/metrics")
        .and_then(|(_, body)| {
            body.lines()
                .find(|l| l.starts_with(series))
                .and_then(|l| l.split_whitespace().last()?.parse().ok())
        })
        .unwrap_or(0.0)
}

/// A service record that cannot be read (damage at rest, injected through a failpoint) stops
/// nothing: the orchestrator keeps its last picture and goes on reconciling, the error names
/// the key and is counted, and health says the picture is behind.
#[test]
fn an_unreadable_service_record_stops_nothing() {
    let mut d = Daemon::new(&bins());
    d.extra = vec!["--enable-failpoints".into(), "--stale-budget".into(), "1s".into()];
    d.restart();
    let f = write(
        &d,
        "keep.yaml",
        "service:\n  name: keep\n  scale: 1\n  process:\n    command: sleep\n    args: [\"100000\"]\n",
    );
    run_ok(&d, &["cast", &f, "--timeout", "60s"]);
    wait_until(LONG, "keep to run", || all_ready(&d, "keep", 1));
    let pid = instances(&d, "keep")[0]["runtimeId"]
        .as_str()
        .unwrap()
        .to_string();
    common::corrupt_service(&d, "default", "keep");
    let errors = "rune_projection_errors_total{projection=\"orchestrator\"}";
    wait_until(LONG, "the unreadable record to be counted", || {
        metric(&d, errors) >= 1.0
    });
    // Reconcile passes go on over the last good picture, and leave the instance alone.
    let passes = "rune_orchestrator_reconciles_total";
    let before = metric(&d, passes);
    wait_until(LONG, "reconcile passes after the damage", || {
        metric(&d, passes) >= before + 3.0
    });
    assert!(pid_alive(&pid), "the instance was stopped");
    assert!(
        d.logs().contains("services/default/keep"),
        "the error names the key:\n{}",
        d.logs()
    );
    wait_until(LONG, "health to say the picture is behind", || {
        http_get(d.http, "/healthz?verbose")
            .is_some_and(|(_, b)| b.contains("[-]orchestrator") && b.contains("read errors"))
    });
    assert!(pid_alive(&pid), "the instance was stopped");
}

/// Pids written, one per line, by commands that record themselves in `file`.
fn pids_in(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// A command nobody waits for any more ends: an exec probe past its timeout, and `rune exec`
/// whose client went away. Neither lingers behind the instance.
#[test]
fn abandoned_probes_and_execs_end() {
    let d = Daemon::start(&bins());
    let probes = d.scratch().join("probe-pids");
    let f = write(
        &d,
        "slow.yaml",
        &format!(
            "service:\n  name: slow\n  scale: 1\n  process:\n    command: sleep\n    args: [\"100000\"]\n  health:\n    liveness:\n      type: exec\n      command: [\"/bin/sh\", \"-c\", \"echo $$ >> {}; exec sleep 1000\"]\n      timeoutSeconds: 1\n      intervalSeconds: 1\n      failureThreshold: 1000\n",
            probes.display()
        ),
    );
    run_ok(&d, &["cast", "--detach", &f]);
    wait_until(LONG, "two probes to have started", || pids_in(&probes).len() >= 2);
    let first = pids_in(&probes)[0].clone();
    wait_until(LONG, "the timed-out probe to be killed", || !pid_alive(&first));

    let execs = d.scratch().join("exec-pid");
    let mut client = d
        .rune_cmd()
        .args(["exec", "slow", "--", "/bin/sh", "-c"])
        .arg(format!("echo $$ > {}; exec sleep 1000", execs.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(LONG, "the exec to start", || pids_in(&execs).len() == 1);
    let pid = pids_in(&execs)[0].clone();
    assert!(pid_alive(&pid));
    client.kill().unwrap();
    client.wait().unwrap();
    wait_until(LONG, "the abandoned exec to be killed", || !pid_alive(&pid));
}

/// Processes whose command line holds `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|pid| pid_alive(pid))
        .collect()
}

/// A process that starts but cannot be recorded (its state file cannot be written) is ended
/// at once and the start fails with the reason: nothing runs that a later runed could not find.
#[test]
fn a_process_that_cannot_be_recorded_does_not_run_on() {
    let d = Daemon::start(&bins());
    // A directory where the state file goes: writing it fails, whatever the user.
    std::fs::create_dir_all(d.data_dir.join("instances/default/lost-0/state.json/x")).unwrap();
    let f = write(
        &d,
        "lost.yaml",
        "service:\n  name: lost\n  scale: 1\n  process:\n    command: sleep\n    args: [\"77777\"]\n",
    );
    run_ok(&d, &["cast", "--detach", &f]);
    wait_until(LONG, "the start to fail with the reason", || {
        instances(&d, "lost").iter().any(|i| {
            i["reason"]
                .as_str()
                .is_some_and(|r| r.contains("cannot record the process"))
        })
    });
    wait_until(LONG, "no unrecorded process to run", || {
        processes_with("77777").is_empty()
    });
    run_ok(&d, &["delete", "lost"]);
}

/// An adopted instance scaled away and straight back: the old run is stopped before its id
/// starts again, so its stop cannot take the new run's state file or record with it.
#[test]
fn an_adopted_instance_scaled_away_and_back_is_replaced_cleanly() {
    let mut d = Daemon::start(&bins());
    let terms = d.scratch().join("terms");
    let f = write(
        &d,
        "sticky.yaml",
        &format!(
            "service:\n  name: sticky\n  scale: 2\n  stopGracePeriodSeconds: 3\n  process:\n    command: /bin/sh\n    args: [\"-c\", \"trap 'echo $RUNE_INSTANCE_ID >> {}' TERM; while true; do sleep 0.2; done\"]\n",
            terms.display()
        ),
    );
    run_ok(&d, &["cast", &f, "--timeout", "60s"]);
    wait_until(LONG, "two instances", || all_ready(&d, "sticky", 2));
    let pid_of = |d: &Daemon| {
        instances(d, "sticky")
            .iter()
            .find(|i| i["id"] == "sticky-1")
            .and_then(|i| i["runtimeId"].as_str().map(String::from))
    };
    let old = pid_of(&d).unwrap();
    assert!(d.sigterm().success());
    d.restart();
    wait_until(LONG, "both adopted", || {
        all_ready(&d, "sticky", 2) && pid_of(&d).as_deref() == Some(old.as_str())
    });
    run_ok(&d, &["scale", "sticky", "1", "--no-wait"]);
    wait_until(LONG, "the adopted sticky-1 to be asked to stop", || {
        std::fs::read_to_string(&terms).is_ok_and(|t| t.contains("sticky-1"))
    });
    run_ok(&d, &["scale", "sticky", "2", "--no-wait"]);
    wait_until(LONG, "the old sticky-1 to be gone", || !pid_alive(&old));
    wait_until(LONG, "a new sticky-1 to run", || {
        all_ready(&d, "sticky", 2) && pid_of(&d).is_some_and(|p| p != old)
    });
    let new = pid_of(&d).unwrap();
    assert!(pid_alive(&new));
    let state = std::fs::read_to_string(d.data_dir.join("instances/default/sticky-1/state.json"))
        .expect("the new run's state file");
    assert!(state.contains(&format!("\"pid\":{new}")), "{state}");
    run_ok(&d, &["delete", "sticky"]);
}

/// An instance killed for failing its liveness probe is restarted under `restartPolicy:
/// OnFailure` even though it exits 0 on SIGTERM, as most servers do: it hung, it did not
/// finish.
#[test]
fn a_liveness_kill_restarts_under_on_failure() {
    let d = Daemon::start(&bins());
    // Nothing listens there: the probe fails from the first try.
    let port = rune_chaos_tests::free_port();
    let f = write(
        &d,
        "hung.yaml",
        &format!(
            "service:\n  name: hung\n  scale: 1\n  restartPolicy: OnFailure\n  process:\n    command: /bin/sh\n    args: [\"-c\", \"trap 'exit 0' TERM; while true; do sleep 0.2; done\"]\n  health:\n    liveness:\n      type: tcp\n      port: {port}\n      intervalSeconds: 1\n      failureThreshold: 1\n"
        ),
    );
    run_ok(&d, &["cast", "--detach", &f]);
    wait_until(LONG, "the hung instance to be restarted", || {
        instances(&d, "hung")
            .first()
            .is_some_and(|i| i["restarts"].as_u64() >= Some(1))
    });
    run_ok(&d, &["delete", "hung"]);
}

/// Any directory named `name` under `dir`, at any depth.
fn dirs_named(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            if e.file_name() == name {
                found.push(p.clone());
            }
            found.extend(dirs_named(&p, name));
        }
    }
    found
}

/// A run found at start that nobody wants any more (its service went while runed was away)
/// is stopped with the grace period it started with, not a fixed ten seconds, and leaves
/// nothing behind: the plain-text files its secrets were written to go with it.
#[test]
fn unwanted_adopted_runs_keep_their_grace_and_leave_no_secret_files() {
    let mut d = Daemon::start(&bins());
    // A service with a secret mount shows where this runed writes them.
    let f = write(
        &d,
        "keep.yaml",
        &format!(
            "secrets:\n  - name: db\n    data:\n      - key: password\n        value: hunter2\nservices:\n  - name: keep\n    scale: 1\n    process:\n      command: /bin/sleep\n      args: [\"1000\"]\n    secretMounts:\n      - name: creds\n        mountPath: {}\n        secretName: db\n",
            d.scratch().join("creds").display()
        ),
    );
    run_ok(&d, &["cast", &f, "--timeout", "60s"]);
    let mounts = d.scratch().join("run").join("mounts");
    let keep = dirs_named(&mounts, "keep-0");
    assert_eq!(keep.len(), 1, "its secret files under {}", mounts.display());
    assert!(d.sigterm().success());
    // What a runed that went away leaves of an instance whose service is gone since: its run,
    // which takes 11 s to finish on SIGTERM (more than the old fixed 10 s, within its own
    // 30 s), and its secret files.
    let gone = keep[0].with_file_name("gone-0");
    std::fs::create_dir_all(gone.join("creds")).unwrap();
    std::fs::write(gone.join("creds").join("password"), "hunter2").unwrap();
    let done = d.scratch().join("done");
    let script = format!(
        "trap 'sleep 11; echo done > {}; exit 0' TERM; while true; do sleep 0.2; done",
        done.display()
    );
    let pid = spawn_stray(
        &d.data_dir,
        &["/bin/sh", "-c", &script],
        serde_json::json!({"grace_secs": 30}),
    );
    d.restart();
    wait_until(LONG, "the unwanted run to end", || !pid_alive(&pid.to_string()));
    assert_eq!(
        std::fs::read_to_string(&done).unwrap_or_default(),
        "done\n",
        "killed before its grace period was out"
    );
    wait_until(LONG, "its secret files to go", || !gone.exists());
    assert!(keep[0].exists(), "a wanted instance's files stay");
}

/// A process instance that is removed while it is not running (crash-looping here) leaves no
/// folder behind once runed next collects: its ended run is not taken for one to keep.
#[test]
fn a_removed_crash_looping_process_leaves_no_folder() {
    let mut d = Daemon::start(&bins());
    let f = write(
        &d,
        "crash.yaml",
        "service:\n  name: crashy\n  scale: 1\n  process:\n    command: /bin/sh\n    args: [\"-c\", \"echo boom; exit 3\"]\n",
    );
    run_ok(&d, &["cast", "--detach", &f]);
    wait_until(LONG, "a restart", || {
        instances(&d, "crashy")
            .first()
            .is_some_and(|i| i["restarts"].as_u64() >= Some(1))
    });
    let folder = d.data_dir.join("instances/default/crashy-0");
    assert!(folder.is_dir());
    run_ok(&d, &["delete", "crashy"]);
    // A restart's first pass collects the folders of instances nobody wants.
    assert!(d.sigterm().success());
    d.restart();
    wait_until(LONG, "its folder to be collected", || !folder.exists());
}

/// A rollout goes on past up-to-date instances that finished and whose restart policy leaves
/// them so (job-like workers, never ready here): they are done, not broken.
#[test]
fn a_rollout_passes_instances_that_finished() {
    let d = Daemon::start(&bins());
    let spec = |greeting: &str| {
        format!(
            "service:\n  name: worker\n  scale: 2\n  restartPolicy: OnFailure\n  env:\n    GREETING: {greeting}\n  process:\n    command: /bin/sh\n    args: [\"-c\", \"echo $GREETING; sleep 1; exit 0\"]\n  health:\n    readiness:\n      type: exec\n      command: [\"/bin/false\"]\n      intervalSeconds: 1\n"
        )
    };
    let finished = |d: &Daemon| {
        let l = instances(d, "worker");
        l.len() == 2 && l.iter().all(|i| i["status"] == "Exited" && i["current"] == true)
    };
    let f = write(&d, "worker.yaml", &spec("one"));
    run_ok(&d, &["cast", "--detach", &f]);
    wait_until(LONG, "both to finish", || finished(&d));
    let f = write(&d, "worker.yaml", &spec("two"));
    run_ok(&d, &["cast", "--detach", &f]);
    wait_until(LONG, "both to be replaced and finish again", || {
        finished(&d) && run_ok(&d, &["logs", "worker"]).matches("two").count() >= 2
    });
}

/// What a killed test daemon's engine created after its cleanup looked is swept by the next
/// test process: containers of nodes whose test process is gone go, those of a live one stay.
#[test]
fn leftovers_of_dead_test_processes_are_swept() {
    image();
    let mut gone = Command::new("true").spawn().expect("spawn true");
    let dead = gone.id();
    gone.wait().expect("wait true");
    let create = |node: &str| -> String {
        let o = Command::new("docker")
            .args([
                "create",
                "--label",
                &format!("rune.node={node}"),
                "busybox",
                "true",
            ])
            .output()
            .expect("docker create");
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o).trim().to_string()
    };
    let exists = |id: &str| {
        Command::new("docker")
            .args(["inspect", id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let left = create(&format!("test-{dead}-0"));
    let live = create(&format!("test-{}-999999", std::process::id()));
    let removed = rune_chaos_tests::sweep_dead_test_nodes();
    let (left_gone, live_kept) = (!exists(&left), exists(&live));
    let _ = Command::new("docker").args(["rm", "-f", &live, &left]).output();
    assert!(left_gone, "{removed:?}");
    assert!(live_kept, "{removed:?}");
}

/// An instance being stopped leaves its service's endpoints, and every router (DNS, data
/// plane, ingress) acts on that, before it is signalled; then it keeps running for the
/// service's `drainSeconds` as the service has it now. Before, SIGTERM went out as the
/// `Stopping` report was queued: new connections still reached an instance shutting down.
#[test]
fn stopping_instances_leave_the_routers_first_then_drain() {
    let mut d = Daemon::new(&bins());
    d.extra = vec![
        "--enable-failpoints".into(),
        "--stale-budget".into(),
        "120s".into(),
    ];
    d.restart();
    let spec = |drain: &str| {
        format!("service:\n  name: web\n  scale: 2\n{drain}  ports: [{{name: http, port: 80, targetPort: 8080}}]\n  process:\n    command: /bin/sleep\n    args: ['3600']\n")
    };
    let f = write(&d, "web.yaml", &spec(""));
    run_ok(&d, &["cast", "--timeout", "60s", &f]);
    let endpoints = |d: &Daemon| -> usize {
        let v: Value = serde_json::from_str(&run_ok(d, &["get", "endpoints", "web", "-o", "json"])).unwrap();
        v["endpoints"].as_array().map_or(0, Vec::len)
    };
    let pid_of = |d: &Daemon, id: &str| -> String {
        instances(d, "web")
            .iter()
            .find(|i| i["id"] == id)
            .and_then(|i| i["runtimeId"].as_str().map(String::from))
            .unwrap()
    };
    let stopping = |d: &Daemon, id: &str| {
        instances(d, "web")
            .iter()
            .any(|i| i["id"] == id && i["status"] == "Stopping")
    };
    // Time passes without a sleep: a service cast and waited for.
    let other = write(
        &d,
        "other.yaml",
        "service:\n  name: other\n  process:\n    command: /bin/sleep\n    args: ['3600']\n",
    );
    wait_until(LONG, "two endpoints", || endpoints(&d) == 2);

    // The data plane stops following the log: web-1 is out of the endpoints in the state, but
    // the data plane would still send it connections, so it runs on.
    let pid = pid_of(&d, "web-1");
    failpoint(&d, "dataplane-tail-pause", true);
    run_ok(&d, &["scale", "web", "1", "--no-wait"]);
    wait_until(LONG, "web-1 to be stopping", || stopping(&d, "web-1"));
    assert_eq!(endpoints(&d), 1);
    run_ok(&d, &["cast", "--timeout", "60s", &other]);
    assert!(pid_alive(&pid), "web-1 was signalled before the data plane acted");
    assert!(stopping(&d, "web-1"));
    failpoint(&d, "dataplane-tail-pause", false);
    wait_until(LONG, "web-1 to stop once the data plane acted", || {
        !pid_alive(&pid) && instances(&d, "web").len() == 1
    });

    // drainSeconds holds it longer, as the service says now: lowering it ends the drain.
    let f = write(&d, "web.yaml", &spec("  drainSeconds: 300\n"));
    run_ok(&d, &["cast", "--timeout", "60s", &f]);
    wait_until(LONG, "two endpoints again", || endpoints(&d) == 2);
    let pid = pid_of(&d, "web-1");
    let first = pid_of(&d, "web-0");
    run_ok(&d, &["scale", "web", "1", "--no-wait"]);
    wait_until(LONG, "web-1 to be stopping", || stopping(&d, "web-1"));
    let reason = instances(&d, "web")
        .iter()
        .find(|i| i["id"] == "web-1")
        .map(|i| i["reason"].clone());
    assert_eq!(reason, Some(Value::from("scaled down; draining for 300s")));
    run_ok(&d, &["delete", "other"]);
    run_ok(&d, &["cast", "--timeout", "60s", &other]);
    assert!(pid_alive(&pid), "web-1 did not drain");
    assert_eq!(endpoints(&d), 1);
    let f = write(
        &d,
        "web.yaml",
        &spec("  scale: 1\n  drainSeconds: 0\n").replace("  scale: 2\n", ""),
    );
    run_ok(&d, &["cast", "--detach", &f]);
    wait_until(LONG, "web-1 to stop once the drain is lowered", || {
        !pid_alive(&pid) && instances(&d, "web").len() == 1
    });
    // Changing the drain replaced nothing.
    assert!(all_ready(&d, "web", 1));
    assert_eq!(pid_of(&d, "web-0"), first);
}
