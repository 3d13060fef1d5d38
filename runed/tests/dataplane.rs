//! The user-space data plane end to end (the dev-mode path): VIP ports served by the proxy on
//! stable local ports, policy allow/deny between real process instances, a policy change
//! without restart that keeps an allowed connection flowing, instant refusal without endpoints,
//! balancing across real containers, port-forward, explain and the metrics.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Stdio;
use std::time::Duration;

use common::{bins, code, failpoint, fall_behind, image, run_ok, write};
use rune_chaos_tests::{free_port, http_get, stderr, stdout, wait_until, Daemon};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(60);

fn dev_daemon() -> Daemon {
    let mut d = Daemon::new(&bins());
    d.extra.push("--dev-mode".into());
    d.restart();
    d
}

/// The proxy address of a service's first port, from `rune get services NAME -o json`.
fn proxy_addr(d: &Daemon, svc: &str) -> Option<SocketAddr> {
    let v: Value = serde_json::from_str(&run_ok(d, &["get", "services", svc, "-o", "json"])).ok()?;
    v["proxyPorts"][0]["address"].as_str()?.parse().ok()
}

fn tail(d: &Daemon, svc: &str) -> String {
    stdout(&d.rune(&["logs", svc, "--tail", "1"]))
}

/// A directory serving `hello-web`, in the daemon's scratch space.
fn www(d: &Daemon) -> String {
    let www = d.scratch().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "hello-web\n").unwrap();
    www.display().to_string()
}

/// `web`: busybox httpd serving `www` on `port`; with `from`, an ingress policy that admits
/// only those services on `http`.
fn web_spec(www: &str, port: u16, from: &[&str]) -> String {
    let mut spec = format!(
        "service:\n  name: web\n  process:\n    command: busybox\n    args: [\"httpd\", \"-f\", \"-p\", \"127.0.0.1:{port}\", \"-h\", \"{www}\"]\n  scale: 1\n  ports:\n    - name: http\n      port: 80\n      targetPort: {port}\n"
    );
    if !from.is_empty() {
        let peers: String = from
            .iter()
            .map(|p| format!("            - service: {p}\n"))
            .collect();
        spec.push_str(&format!(
            "  networkPolicy:\n    ingress:\n      - from:\n{peers}        ports: [http]\n"
        ));
    }
    spec
}

fn looping_client(name: &str, target: SocketAddr) -> String {
    format!(
        "service:\n  name: {name}\n  process:\n    command: /bin/sh\n    args: [\"-c\", \"while true; do busybox wget -q -O - http://{target}/ 2>&1 | head -1; sleep 0.2; done\"]\n  scale: 1\n"
    )
}

#[test]
fn proxy_enforces_policy_between_processes_and_changes_without_restart() {
    let mut d = dev_daemon();
    let www = www(&d);
    let port = free_port();
    let f = write(&d, "web.yaml", &web_spec(&www, port, &["client"]));
    run_ok(&d, &["cast", &f, "--timeout", "60s"]);
    let web = proxy_addr(&d, "web").expect("web has a proxy port");
    assert_eq!(web.ip().to_string(), "127.0.0.1", "dev mode serves on loopback");
    let wide = run_ok(&d, &["get", "services", "-o", "wide"]);
    assert!(wide.contains(&format!("80→{web}")), "{wide}");

    let f = write(&d, "client.yaml", &looping_client("client", web));
    run_ok(&d, &["cast", &f, "--timeout", "60s"]);
    let f = write(&d, "other.yaml", &looping_client("other", web));
    run_ok(&d, &["cast", &f, "--timeout", "60s"]);
    wait_until(LONG, "client to be served", || {
        tail(&d, "client").contains("hello-web")
    });
    wait_until(LONG, "other to be refused", || {
        tail(&d, "other").contains("reset")
    });
    // The test itself is no instance: refused too, at once.
    assert_eq!(http_get(web, "/"), None);

    let o = d.rune(&["policy", "explain", "other", "web"]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    assert!(
        stdout(&o).contains("no ingress rule matches (default deny)"),
        "{}",
        stdout(&o)
    );
    let o = d.rune(&["policy", "explain", "client", "web", "80"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).contains("networkPolicy.ingress[0].from[0] (service default/client)"),
        "{}",
        stdout(&o)
    );
    let o = d.rune(&["policy", "explain", "client", "nosuch"]);
    assert_ne!(code(&o), 0);
    assert!(
        stderr(&o).contains("service default/nosuch not found"),
        "{}",
        stderr(&o)
    );

    // One log write changes the policy: no restart, and `other` gets through.
    let pid = d.pid();
    let f = write(&d, "web.yaml", &web_spec(&www, port, &["client", "other"]));
    run_ok(&d, &["cast", &f, "--timeout", "60s"]);
    wait_until(LONG, "other to be served after the change", || {
        tail(&d, "other").contains("hello-web")
    });
    assert!(d.running() && d.pid() == pid, "runed kept running");
    assert_eq!(proxy_addr(&d, "web"), Some(web), "the proxy port did not move");

    let metrics = http_get(d.metrics, "/metrics").expect("metrics").1;
    let drops = metrics
        .lines()
        .find(|l| {
            l.starts_with("rune_policy_drops_total{")
                && l.contains("policy=\"ingress\"")
                && l.contains("reason=\"proxy\"")
                && l.contains("service=\"web\"")
        })
        .unwrap_or_else(|| panic!("no proxy drops in\n{metrics}"));
    let n: f64 = drops.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 1.0, "{drops}");
    assert!(metrics.contains(
        "rune_dataplane_connections_total{namespace=\"default\",result=\"forwarded\",service=\"web\"}"
    ));
    // The seed's local-instances rows are container addresses; web runs as a host process.
    assert!(
        metrics.contains("rune_policy_local_instances_by_service{namespace=\"default\",service=\"web\"} 0"),
        "{metrics}"
    );

    // The port survives a restart of runed (the instances keep running meanwhile).
    assert!(d.sigterm().success());
    d.restart();
    assert_eq!(proxy_addr(&d, "web"), Some(web));
    wait_until(LONG, "client to be served after the restart", || {
        tail(&d, "client").contains("hello-web")
    });
}

#[test]
fn established_connection_survives_a_policy_change_and_no_endpoint_is_refused_at_once() {
    let d = dev_daemon();
    let port = free_port();
    let spec = |extra: &str| {
        format!(
            "service:\n  name: echo\n  process:\n    command: busybox\n    args: [\"nc\", \"-ll\", \"-p\", \"{port}\", \"-e\", \"/bin/cat\"]\n  scale: 1\n  ports:\n    - name: tcp\n      port: 7\n      targetPort: {port}\n  networkPolicy:\n    ingress:\n      - from:\n          - cidr: 127.0.0.0/8\n{extra}"
        )
    };
    let f = write(&d, "echo.yaml", &spec(""));
    run_ok(&d, &["cast", &f, "--timeout", "60s"]);
    let echo = proxy_addr(&d, "echo").unwrap();
    let mut line = String::new();
    let mut conn = None;
    wait_until(LONG, "echo to answer through the proxy", || {
        let Ok(mut s) = TcpStream::connect(echo) else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        if s.write_all(b"one\n").is_err() {
            return false;
        }
        let mut r = BufReader::new(s.try_clone().unwrap());
        line.clear();
        if r.read_line(&mut line).is_ok() && line == "one\n" {
            conn = Some((s, r));
            return true;
        }
        false
    });
    let (mut s, mut r) = conn.unwrap();
    let f = write(
        &d,
        "echo.yaml",
        &spec("      - from:\n          - service: nobody\n        ports: [\"7/tcp\"]\n"),
    );
    run_ok(&d, &["cast", &f, "--timeout", "60s"]);
    wait_until(LONG, "the new rule to be in force", || {
        stdout(&d.rune(&["policy", "explain", "-o", "json", "127.0.0.1", "echo"]))
            .contains("ingress[0].from[0]")
            && run_ok(&d, &["get", "services", "echo", "-o", "json"]).contains("nobody")
    });
    s.write_all(b"two\n").unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "two\n", "the established connection kept flowing");

    // Scale 0: the proxy port stays, and a connection is reset at once instead of hanging.
    run_ok(&d, &["scale", "echo", "0", "--timeout", "60s"]);
    wait_until(LONG, "the endpoints to empty", || {
        let v: Value =
            serde_json::from_str(&run_ok(&d, &["get", "endpoints", "echo", "-o", "json"])).unwrap();
        v.to_string().contains("\"endpoints\":[]") || !v.to_string().contains("echo-0")
    });
    let mut c = TcpStream::connect(echo).expect("the proxy accepts");
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 8];
    let e = c.read(&mut buf).expect_err("a reset, not data");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");

    // discovery.mode none: no VIP traffic, so no proxy port.
    let f = write(
        &d,
        "quiet.yaml",
        "service:\n  name: quiet\n  process:\n    command: sleep\n    args: [\"1000\"]\n  ports:\n    - name: p\n      port: 9\n  discovery:\n    mode: none\n",
    );
    run_ok(&d, &["cast", &f, "--detach"]);
    assert_eq!(proxy_addr(&d, "quiet"), None);
}

#[test]
fn port_forward_reaches_a_service_past_its_policy() {
    let d = dev_daemon();
    let www = www(&d);
    let f = write(&d, "web.yaml", &web_spec(&www, free_port(), &["client"]));
    run_ok(&d, &["cast", &f, "--timeout", "60s"]);
    let o = d.rune(&["port-forward", "web", "0:nosuch"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("service web has no port 'nosuch'"),
        "{}",
        stderr(&o)
    );

    let mut child = d
        .rune_cmd()
        .args(["port-forward", "web", "0:http"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let at: SocketAddr = first
        .strip_prefix("Forwarding from ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unexpected: {first}"));
    // An operator's tunnel, like kubectl's: the policy that keeps strangers out does not apply.
    let got = http_get(at, "/");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        got.map(|(c, b)| (c, b.trim().to_string())),
        Some((200, "hello-web".into()))
    );
}

#[test]
fn connections_spread_across_container_endpoints() {
    image();
    let d = dev_daemon();
    let spec = |mode: &str| {
        format!(
            "service:\n  name: web\n  image: busybox\n  command: [\"sh\", \"-c\", \"echo $RUNE_INSTANCE_ID > /tmp/index.html; exec httpd -f -p 8080 -h /tmp\"]\n  scale: 3\n  ports:\n    - name: http\n      port: 80\n      targetPort: 8080\n  health:\n    readiness:\n      type: tcp\n      port: 8080\n      intervalSeconds: 1\n  discovery:\n    mode: {mode}\n"
        )
    };
    let f = write(&d, "web.yaml", &spec("round-robin"));
    run_ok(&d, &["cast", &f, "--timeout", "120s"]);
    let web = proxy_addr(&d, "web").unwrap();
    let mut seen = std::collections::BTreeSet::new();
    wait_until(LONG, "every endpoint to answer through the VIP port", || {
        if let Some((200, body)) = http_get(web, "/") {
            seen.insert(body.trim().to_string());
        }
        seen.len() == 3
    });
    // Round robin: three requests in a row reach three different instances.
    let three: std::collections::BTreeSet<String> = (0..3)
        .filter_map(|_| http_get(web, "/"))
        .map(|(_, b)| b.trim().to_string())
        .collect();
    assert_eq!(three.len(), 3, "{three:?}");

    // Least connections: three held connections land on three instances.
    let f = write(&d, "web.yaml", &spec("load-balanced"));
    run_ok(&d, &["cast", &f, "--timeout", "120s"]);
    let active = |d: &Daemon| {
        http_get(d.metrics, "/metrics")
            .and_then(|(_, m)| {
                m.lines().find_map(|l| {
                    l.strip_prefix("rune_dataplane_active_connections ")
                        .map(String::from)
                })
            })
            .and_then(|n| n.trim().parse::<i64>().ok())
            .unwrap_or(-1)
    };
    let mut held = Vec::new();
    for i in 1..=3 {
        held.push(TcpStream::connect(web).unwrap());
        // Each connection is open at its endpoint before the next is balanced.
        wait_until(LONG, "the proxy to open the connection", || active(&d) == i);
    }
    let mut ids = std::collections::BTreeSet::new();
    for mut s in held {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        ids.insert(body.rsplit("\r\n\r\n").next().unwrap_or("").trim().to_string());
    }
    assert_eq!(ids.len(), 3, "{ids:?}");
}

/// A rollout that moves the `targetPort` and stalls on a new version that never gets ready
/// keeps serving from the instances not yet replaced, on the port they listen on. Before, every
/// endpoint was published on the new spec's port: the old instance refused each connection.
#[test]
fn a_stalled_rollout_that_moves_the_target_port_still_serves_from_the_old_instances() {
    image();
    let mut d = dev_daemon();
    let spec = |version: &str, port: u16, ready_path: &str| {
        format!(
            "service:\n  name: web\n  image: busybox\n  command: [\"sh\", \"-c\", \"echo {version} > /tmp/index.html; exec httpd -f -p {port} -h /tmp\"]\n  scale: 2\n  ports:\n    - name: http\n      port: 80\n      targetPort: {port}\n  health:\n    readiness:\n      type: http\n      port: {port}\n      path: {ready_path}\n      intervalSeconds: 1\n"
        )
    };
    let f = write(&d, "web.yaml", &spec("v1", 8080, "/"));
    run_ok(&d, &["cast", &f, "--timeout", "120s"]);
    let web = proxy_addr(&d, "web").unwrap();
    assert_eq!(
        http_get(web, "/").map(|(c, b)| (c, b.trim().to_string())),
        Some((200, "v1".into()))
    );

    // v2 listens on 9090 and fails its readiness check (404): the rollout replaces one
    // instance and waits for it, for ever.
    let f = write(&d, "web.yaml", &spec("v2", 9090, "/nope"));
    run_ok(&d, &["cast", &f, "--detach"]);
    let stalled = |d: &Daemon| {
        let list = common::instances(d, "web");
        let new = list.iter().filter(|i| i["current"] == true).count();
        let old_ready = list
            .iter()
            .filter(|i| i["current"] == false && i["ready"] == true)
            .count();
        new == 1 && old_ready == 1 && list.len() == 2
    };
    wait_until(LONG, "the rollout to stall with one old instance ready", || {
        stalled(&d)
    });
    let targets = |d: &Daemon| -> Vec<Value> {
        let v: Value = serde_json::from_str(&run_ok(d, &["get", "endpoints", "web", "-o", "json"])).unwrap();
        v["endpoints"]
            .as_array()
            .map(|e| e.iter().map(|e| e["ports"][0]["targetPort"].clone()).collect())
            .unwrap_or_default()
    };
    let served_by_v1 = |d: &Daemon| {
        let web = proxy_addr(d, "web").unwrap();
        for _ in 0..5 {
            assert_eq!(
                http_get(web, "/").map(|(c, b)| (c, b.trim().to_string())),
                Some((200, "v1".into()))
            );
        }
        assert!(
            stalled(d),
            "the rollout moved on: {:?}",
            common::instances(d, "web")
        );
    };
    assert_eq!(targets(&d), [Value::from(8080)]);
    served_by_v1(&d);

    // A restarted runed adopts both runs: the old one goes on as v1 says, probed and
    // published on 8080, not as v2 (whose probe it would fail).
    let old = |d: &Daemon| {
        common::instances(d, "web")
            .into_iter()
            .find(|i| i["current"] == false)
            .unwrap_or_default()
    };
    let before = old(&d)["updatedAtMs"].as_i64().unwrap();
    assert!(d.sigterm().success());
    d.restart();
    wait_until(LONG, "the adopted old instance to be ready again", || {
        let i = old(&d);
        i["updatedAtMs"].as_i64().is_some_and(|t| t > before) && i["ready"] == true
    });
    assert_eq!(targets(&d), [Value::from(8080)]);
    served_by_v1(&d);
}

#[test]
fn a_stale_data_plane_refuses_new_connections_until_it_catches_up() {
    let mut d = Daemon::new(&bins());
    d.extra = vec![
        "--dev-mode".into(),
        "--enable-failpoints".into(),
        "--stale-budget".into(),
        "1s".into(),
    ];
    d.restart();
    let www = www(&d);
    let f = write(&d, "web.yaml", &web_spec(&www, free_port(), &[]));
    run_ok(&d, &["cast", &f, "--timeout", "60s"]);
    let web = proxy_addr(&d, "web").unwrap();
    wait_until(LONG, "web to answer", || {
        http_get(web, "/").is_some_and(|(c, _)| c == 200)
    });

    fall_behind(&d, "dataplane");
    wait_until(LONG, "new connections to be refused while stale", || {
        http_get(web, "/").is_none()
    });
    let metrics = http_get(d.metrics, "/metrics").unwrap().1;
    assert!(
        metrics.contains(
            "rune_dataplane_connections_total{namespace=\"default\",result=\"stale\",service=\"web\"}"
        ),
        "{metrics}"
    );
    failpoint(&d, "dataplane-tail-pause", false);
    wait_until(LONG, "the data plane to catch up and serve", || {
        http_get(web, "/").is_some_and(|(c, _)| c == 200)
    });
}

#[test]
fn containers_reach_services_by_name_in_dev_mode() {
    image();
    let d = dev_daemon();
    let api = "service:\n  name: api\n  image: busybox\n  command: [\"/bin/httpd\"]\n  args: [\"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n  scale: 2\n  ports:\n    - name: http\n      port: 80\n      targetPort: 8080\n  health:\n    readiness: {type: tcp, port: 8080, intervalSeconds: 1}\n";
    let f = write(&d, "api.yaml", api);
    run_ok(&d, &["cast", &f, "--timeout", "120s"]);
    // The full name and the short one (the namespace is the container's search domain), on the
    // service's own port, through the data plane like any other client.
    let client = "service:\n  name: client\n  image: busybox\n  command: [\"sh\", \"-c\", \"while true; do echo full:$(wget -q -O - http://api.default.rune/index.html 2>&1); echo short:$(wget -q -O - http://api/index.html 2>&1); sleep 0.3; done\"]\n  scale: 1\n";
    let f = write(&d, "client.yaml", client);
    run_ok(&d, &["cast", &f, "--timeout", "120s"]);
    wait_until(LONG, "the client container to reach api by name", || {
        let logs = stdout(&d.rune(&["logs", "client", "--tail", "20"]));
        logs.contains("full:ok") && logs.contains("short:ok")
    });
    // The host still gets loopback for the same name (its proxy ports live there).
    let (status, answers) = {
        let o = std::process::Command::new("dig")
            .args([
                &format!("@{}", d.dns.ip()),
                "-p",
                &d.dns.port().to_string(),
                "+short",
                "api.default.rune",
            ])
            .output()
            .unwrap();
        (o.status.success(), stdout(&o))
    };
    assert!(status && answers.trim() == "127.0.0.1", "{answers}");
}
