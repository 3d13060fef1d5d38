//! What an operator relies on, through the real binaries: health in every form (HTTP, verbose,
//! gRPC health checking with a client from another gRPC implementation, server reflection),
//! the local admin socket, chunked lists at scale, streams that end with their token, TLS
//! handshakes that do not wait on each other, and metrics present from the start.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use rune_chaos_tests::{http_get, stderr, stdout, wait_until, Daemon};
use rune_proto::v1 as pb;

const LONG: Duration = Duration::from_secs(60);

/// The Python gRPC client (Debian's python3-grpcio): a second, independent implementation.
const PY_GRPC: &str = r#"
import sys, grpc
ch = grpc.insecure_channel(sys.argv[1])
raw = lambda b: b
check = ch.unary_unary('/grpc.health.v1.Health/Check', request_serializer=raw, response_deserializer=raw)
print('health', check(b'', timeout=5).hex())
refl = ch.stream_stream('/grpc.reflection.v1.ServerReflection/ServerReflectionInfo',
                        request_serializer=raw, response_deserializer=raw)
for r in refl(iter([b'\x3a\x00']), timeout=5):
    print('services', r)
    break
"#;

fn python_grpc(d: &Daemon) -> String {
    let o = std::process::Command::new("/usr/bin/python3")
        .args(["-c", PY_GRPC, &d.grpc.to_string()])
        .output()
        .expect("/usr/bin/python3 (with Debian's python3-grpcio; scripts/test.sh installs it)");
    assert!(o.status.success(), "python grpc client: {}", stderr(&o));
    stdout(&o)
}

#[test]
fn health_answers_plainly_verbosely_and_over_grpc() {
    let mut d = Daemon::new(&bins());
    d.extra = vec!["--enable-failpoints".into(), "--stale-budget".into(), "1s".into()];
    d.restart();
    let (code_, body) = http_get(d.http, "/healthz").unwrap();
    assert_eq!((code_, body.as_str()), (200, "ok\n"));
    let (_, verbose) = http_get(d.http, "/healthz?verbose").unwrap();
    for c in [
        "[+]log applied",
        "[+]orchestrator reconciled",
        "[+]dns applied",
        "[+]dataplane applied",
    ] {
        assert!(verbose.contains(c), "{c} missing:\n{verbose}");
    }
    // gRPC health checking and reflection, asked by another implementation.
    let py = python_grpc(&d);
    assert!(py.contains("health 0801"), "SERVING expected: {py}");
    for svc in ["rune.v1.ServiceApi", "rune.v1.AdminApi", "grpc.health.v1.Health"] {
        assert!(py.contains(svc), "{svc} not listed by reflection: {py}");
    }

    // A projection that stops applying turns runed unhealthy past its stale budget, with
    // the reason on one line, on every surface; and healthy again once it catches up.
    let fp = |state: &str| {
        let o = std::process::Command::new("curl")
            .args(["-s", "-X", "POST"])
            .arg(format!(
                "http://{}/debug/failpoints/dns-tail-pause/{state}",
                d.http
            ))
            .output()
            .unwrap();
        assert!(o.status.success());
    };
    fp("on");
    let f = write(&d, "s.yaml", "service:\n  name: s\n  image: x\n  scale: 0\n");
    run_ok(&d, &["cast", "--detach", &f]);
    wait_until(LONG, "/healthz to fail on the stale DNS", || {
        http_get(d.http, "/healthz").is_some_and(|(c, b)| c == 503 && b.starts_with("unhealthy: dns"))
    });
    let (_, verbose) = http_get(d.http, "/healthz?verbose").unwrap();
    assert!(
        verbose.contains("[-]dns") && verbose.contains("[+]log"),
        "{verbose}"
    );
    assert_eq!(
        verbose.lines().last(),
        http_get(d.http, "/healthz").unwrap().1.lines().last()
    );
    wait_until(LONG, "gRPC health to say NOT_SERVING", || {
        python_grpc(&d).contains("health 0802")
    });
    fp("off");
    wait_until(LONG, "health to recover", || {
        http_get(d.http, "/healthz").is_some_and(|(c, _)| c == 200) && python_grpc(&d).contains("health 0801")
    });
}

#[test]
fn cluster_status_shows_the_one_voter_and_follows_the_log() {
    let mut d = Daemon::new(&bins());
    d.restart();
    let status = |d: &Daemon| -> serde_json::Value {
        serde_json::from_str(&run_ok(d, &["admin", "cluster", "status", "-o", "json"])).unwrap()
    };
    let before = status(&d);
    let node = before["node"].as_u64().unwrap();
    assert_eq!(before["role"], "leader", "{before}");
    assert_eq!(before["leader"].as_u64(), Some(node), "{before}");
    assert!(before["term"].as_u64().unwrap() >= 1, "{before}");
    assert!(!before["clusterId"].as_str().unwrap().is_empty(), "{before}");
    let members = before["members"].as_array().unwrap();
    assert_eq!(members.len(), 1, "{before}");
    assert_eq!(members[0]["id"].as_u64(), Some(node));
    assert_eq!(members[0]["voter"], true);

    // A cast is acknowledged once applied: the status has seen it written, committed and
    // applied (and nothing applied is beyond what is committed).
    let f = write(&d, "s.yaml", "service:\n  name: s\n  image: x\n  scale: 0\n");
    run_ok(&d, &["cast", "--detach", &f]);
    // Raft publishes its metrics after it answers the proposer: wait for them, briefly.
    let before_applied = before["appliedIndex"].as_u64().unwrap();
    let mut after = serde_json::Value::Null;
    wait_until(LONG, "the status to show the cast applied", || {
        after = status(&d);
        after["appliedIndex"].as_u64().unwrap() > before_applied
    });
    let (applied, committed, last) = (
        after["appliedIndex"].as_u64().unwrap(),
        after["committedIndex"].as_u64().unwrap(),
        after["lastIndex"].as_u64().unwrap(),
    );
    assert!(applied <= committed && committed <= last, "{after}");
    assert_eq!(
        after["members"][0]["matchedIndex"].as_u64(),
        Some(committed),
        "{after}"
    );

    // The same, per node, for Prometheus: this node leads, saw one leader, and its one member
    // is not behind.
    let (_, body) = http_get(d.metrics, "/metrics").unwrap();
    for line in [
        "rune_log_has_leader 1",
        "rune_log_is_leader 1",
        "rune_log_leader_changes_seen_total 1",
        &format!("rune_log_replication_lag_entries{{member=\"{node}\"}} 0"),
    ] {
        assert!(body.lines().any(|l| l == line), "{line} missing:\n{body}");
    }

    // The table: the node's line, then the members'.
    let table = run_ok(&d, &["admin", "cluster", "status"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("CLUSTER") && lines[0].contains("COMMITTED"),
        "{table}"
    );
    assert!(lines[1].split_whitespace().nth(2) == Some("leader"), "{table}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("{node} ")) && l.contains("local") && l.contains("yes")),
        "{table}"
    );
}

#[test]
fn admin_socket_serves_local_root_when_grpc_is_on_a_private_interface() {
    let ip = outside_address().expect("a non-loopback IPv4 address (ip -4 addr)");
    let mut d = Daemon::new(&bins());
    d.auto_bootstrap = false;
    d.grpc = format!("{ip}:{}", d.grpc.port()).parse().unwrap();
    d.restart();
    use std::os::unix::fs::PermissionsExt;
    let sock = d.admin_socket();
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Over TCP the gRPC address is not loopback: admin is refused there...
    let tcp_only = |args: &[&str]| {
        d.rune_cmd()
            .env("RUNE_ADMIN_SOCKET", d.scratch().join("none.sock"))
            .args(args)
            .output()
            .unwrap()
    };
    let o = tcp_only(&["admin", "bootstrap"]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(stderr(&o).contains("admin socket"), "{}", stderr(&o));
    // ...and on this host `rune admin` goes through the socket: bootstrap works.
    let token = run_ok(&d, &["admin", "bootstrap"]).trim().to_string();
    assert!(token.starts_with("rune_"));
    // The socket is used only for the runed the address names: another port is another runed.
    let o = d
        .rune_cmd()
        .env(
            "RUNE_API_SERVER",
            format!("127.0.0.1:{}", rune_chaos_tests::free_port()),
        )
        .args(["admin", "token", "list"])
        .output()
        .unwrap();
    assert_ne!(
        code(&o),
        0,
        "went through the socket of another runed: {}",
        stdout(&o)
    );
    // A lost token is no dead end: root on the socket needs none to mint another.
    let o = d
        .rune_cmd()
        .env_remove("RUNE_TOKEN")
        .args(["admin", "token", "create", "recovered", "--subject-name", "root"])
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let recovered = stdout(&o).trim().to_string();
    let o = d
        .rune_cmd()
        .env("RUNE_TOKEN", &recovered)
        .args(["whoami"])
        .output()
        .unwrap();
    assert!(stdout(&o).contains("root"), "{}{}", stdout(&o), stderr(&o));
    // A token sent over the socket is still that token's identity: RBAC applies.
    let viewer = run_ok(
        &d,
        &[
            "admin",
            "token",
            "create",
            "viewer",
            "--subject-name",
            "viewer",
            "--policies",
            "readonly",
        ],
    )
    .trim()
    .to_string();
    let o = d
        .rune_cmd()
        .env("RUNE_TOKEN", &viewer)
        .args(["admin", "user", "create", "mallory", "--policy", "admin"])
        .output()
        .unwrap();
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    // Peer credentials are checked: another user gets nothing, even with the file opened up
    // (asked by Python's grpcio, which goes where it is told).
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let py = r#"
import sys, grpc
ch = grpc.insecure_channel('unix:' + sys.argv[1])
version = ch.unary_unary('/rune.v1.SystemApi/Version', request_serializer=lambda b: b, response_deserializer=lambda b: b)
try:
    version(b'', timeout=5)
    print('answered')
except grpc.RpcError as e:
    print(e.code().name, e.details())
"#;
    let o = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            py,
        ])
        .arg(&sock)
        .output()
        .unwrap();
    let out = stdout(&o);
    assert!(
        out.starts_with("PERMISSION_DENIED") && out.contains("serves root"),
        "{out}{}",
        stderr(&o)
    );
    // Root's own call over the same socket is answered.
    let o = std::process::Command::new("/usr/bin/python3")
        .args(["-c", py])
        .arg(&sock)
        .output()
        .unwrap();
    assert_eq!(stdout(&o).trim(), "answered", "{}", stderr(&o));
}

/// A service spec of about 3 KiB.
fn big_service(i: usize) -> String {
    serde_json::json!({
        "name": format!("svc-{i:05}"),
        "image": "busybox",
        "scale": 0,
        "env": {"PAD": "x".repeat(3000)},
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_services_of_three_kib_list_and_watch() {
    let d = Daemon::start(&bins());
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", d.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = pb::service_api_client::ServiceApiClient::with_interceptor(ch, d.bearer());
    for batch in 0..50 {
        let resources = (0..100)
            .map(|j| pb::Resource {
                kind: Some(pb::resource::Kind::ServiceJson(big_service(batch * 100 + j))),
            })
            .collect();
        c.apply(pb::ApplyRequest {
            resources,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    // All at once is more than a gRPC client takes by default (4 MiB): that is why lists page.
    let all = c
        .list_services(pb::ListServicesRequest {
            namespace: "*".into(),
            ..Default::default()
        })
        .await;
    assert!(
        all.is_err(),
        "15 MiB in one message should exceed the client's limit"
    );
    // Pages of 500 cover every service once, each page well under the limit.
    let mut names = std::collections::BTreeSet::new();
    let mut token = String::new();
    let mut pages = 0;
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
        pages += 1;
        assert!(r.services.len() <= 500);
        for s in r.services {
            assert!(names.insert(s.name.clone()), "{} listed twice", s.name);
        }
        if r.continue_token.is_empty() {
            break;
        }
        token = r.continue_token;
    }
    assert_eq!((names.len(), pages), (5000, 10));
    let bad = c
        .list_services(pb::ListServicesRequest {
            namespace: "*".into(),
            limit: 500,
            continue_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);

    // The CLI pages for the user.
    let out = run_ok(&d, &["get", "services", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(5000));
    let table = run_ok(&d, &["get", "services"]);
    assert_eq!(table.lines().count(), 5001, "a header and a line per service");
    // A watch starts with every service.
    let mut w = d
        .rune_cmd()
        .args(["get", "services", "--watch", "-o", "json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(w.stdout.take().unwrap()).lines();
    let mut added = 0;
    for l in lines {
        let v: serde_json::Value = serde_json::from_str(&l.unwrap()).unwrap();
        assert_eq!(v["type"], "ADDED");
        added += 1;
        if added == 5000 {
            break;
        }
    }
    let _ = w.kill();
    let _ = w.wait();
    assert_eq!(added, 5000);
}

#[test]
fn streams_end_when_their_token_is_revoked_or_expires() {
    let d = Daemon::start(&bins());
    let watch_with = |token: &str| {
        let mut w = d
            .rune_cmd()
            .env("RUNE_TOKEN", token)
            .args(["get", "services", "--watch"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(w.stdout.take().unwrap());
        let mut header = String::new();
        out.read_line(&mut header).unwrap();
        assert!(header.starts_with("EVENT"), "{header}");
        (w, out)
    };
    let revoked = run_ok(
        &d,
        &[
            "admin",
            "token",
            "create",
            "w1",
            "--subject-name",
            "watcher",
            "--policies",
            "readonly",
        ],
    )
    .trim()
    .to_string();
    let (w, _out) = watch_with(&revoked);
    run_ok(&d, &["admin", "token", "revoke", "w1"]);
    let o = w.wait_with_output().unwrap();
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(stderr(&o).contains("revoked"), "{}", stderr(&o));

    let short = run_ok(
        &d,
        &[
            "admin",
            "token",
            "create",
            "w2",
            "--subject-name",
            "watcher",
            "--ttl",
            "3s",
        ],
    )
    .trim()
    .to_string();
    let (w, _out) = watch_with(&short);
    let o = w.wait_with_output().unwrap();
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(stderr(&o).contains("expired"), "{}", stderr(&o));
}

#[test]
fn tls_handshakes_do_not_wait_for_each_other() {
    let mut d = Daemon::new(&bins());
    d.extra = vec!["--dev-mode".into(), "--tls".into()];
    let ca = d.data_dir.join("tls/cert.pem");
    d.tls_ca = Some(ca.clone());
    d.restart();
    // Clients that connect and say nothing (each would have held the listener for 5 s).
    let silent: Vec<_> = (0..4)
        .map(|_| std::net::TcpStream::connect(d.http).unwrap())
        .collect();
    let o = std::process::Command::new("curl")
        .args(["-s", "--max-time", "3", "--cacert"])
        .arg(&ca)
        .arg(format!("https://localhost:{}/healthz", d.http.port()))
        .output()
        .unwrap();
    assert_eq!(stdout(&o), "ok\n", "curl: {}", stderr(&o));
    drop(silent);
}

fn metric_names(body: &str) -> std::collections::BTreeSet<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}

#[test]
fn seed_metrics_are_there_from_the_start_and_after_a_restart() {
    let mut d = Daemon::new(&bins());
    d.extra = vec!["--dev-mode".into()];
    d.restart();
    let unlabelled = [
        "rune_vip_allocations_total",
        "rune_dataplane_stale_seconds",
        "rune_policy_local_instances",
        "rune_policy_rules",
        "rune_acme_certificates",
        "rune_ingress_requests_total",
        "rune_ingress_connections",
        "rune_ingress_connections_limit",
        "rune_storage_free_bytes",
        "rune_storage_reserve_bytes",
        "rune_log_has_leader",
        "rune_log_is_leader",
        "rune_log_committed_index",
        "rune_log_leader_changes_seen_total",
    ];
    for round in ["fresh", "restarted"] {
        let (_, body) = http_get(d.metrics, "/metrics").unwrap();
        let names = metric_names(&body);
        for m in unlabelled {
            assert!(names.contains(m), "{round}: {m} missing:\n{body}");
        }
        assert!(body.contains("rune_vip_allocations_total 0"), "{round}: {body}");
        promtool_ok(&body);
        if round == "fresh" {
            d.sigterm();
            d.restart();
        }
    }
    // A service with a policy and a host: its labelled series start at zero.
    let f = write(
        &d,
        "web.yaml",
        "service:\n  name: web\n  image: busybox\n  scale: 0\n  ports: [{name: http, port: 80}]\n  expose: {port: http, host: web.test}\n  networkPolicy:\n    ingress: [{from: [{namespace: default}]}]\n",
    );
    run_ok(&d, &["cast", "--detach", &f]);
    wait_until(LONG, "the new service's series", || {
        let (_, body) = http_get(d.metrics, "/metrics").unwrap();
        body.contains("rune_endpoints_published_total{namespace=\"default\",service=\"web\"}")
            && body.contains(
                "rune_policy_drops_total{namespace=\"default\",policy=\"ingress\",reason=\"proxy\",service=\"web\"} 0",
            )
            && body.contains("rune_ingress_requests_total{host=\"web.test\",status=\"200\"} 0")
            && body.contains("rune_policy_rules 1")
    });
}
