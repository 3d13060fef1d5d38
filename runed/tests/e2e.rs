//! End to end: the real `runed` and `rune` binaries on loopback ports.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use rune_chaos_tests::{http_get, stderr, stdout, wait_until, Daemon};

fn peer(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/peer-specs")
        .join(name);
    assert!(p.exists(), "{} is missing", p.display());
    p
}

fn services_json(d: &Daemon) -> serde_json::Value {
    let o = d.rune(&["get", "svc", "-A", "-o", "json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    serde_json::from_str(&stdout(&o)).unwrap()
}

fn generation(d: &Daemon, name: &str) -> u64 {
    let o = d.rune(&["get", "svc", name, "-o", "json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    v["metadata"]["generation"].as_u64().unwrap()
}

#[test]
fn peer_specs_lint_and_cast_as_they_are() {
    let d = Daemon::start(&bins());
    for f in [
        "simple-service--echo.yaml",
        "logging--log-generator--service.yaml",
        "multi-service--services.yaml",
        "test-errors.yaml",
        "simple-service--app.yaml",
        "config--runefile.yaml",
    ] {
        let o = d.rune(&["lint", peer(f).to_str().unwrap()]);
        assert_eq!(code(&o), 0, "lint {f}: {}{}", stdout(&o), stderr(&o));
    }
    // Their egress to 0.0.0.0/0 by port name is valid, and lint says what the name opens.
    let o = d.rune(&["lint", peer("multi-service--services.yaml").to_str().unwrap()]);
    assert!(
        stdout(&o).contains(
            "note: service db: networkPolicy.egress[0].ports[0] 'postgres' toward 0.0.0.0/0 \
             opens the port named 'postgres' of each service inside it"
        ),
        "{}",
        stdout(&o)
    );
    // The original's full server example: what runed has no use for is named, not dropped.
    let o = d.rune(&["lint", peer("config--runefile.yaml").to_str().unwrap()]);
    assert!(stdout(&o).contains("plugins: ignored"), "{}", stdout(&o));
    // Its ECR entry cannot work here: refused with the key, line and what to do instead.
    let o = d.rune(&["lint", peer("runefile.yaml").to_str().unwrap()]);
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("runefile.yaml:30: docker.registries[0].auth.type: not supported: ecr"),
        "{}",
        stderr(&o)
    );
    let invalid = peer("rune-hello-world--service-invalid.yaml");
    let o = d.rune(&["lint", invalid.to_str().unwrap()]);
    assert_eq!(code(&o), 6);
    let err = stderr(&o);
    for (line, field) in [
        (34, "invalidField"),
        (38, "invalidHealthField"),
        (52, "invalidProbeField"),
    ] {
        assert!(
            err.contains(&format!(":{line}: ")) && err.contains(field),
            "line {line} {field} in:\n{err}"
        );
    }
    let o = d.rune(&["cast", "--detach", invalid.to_str().unwrap()]);
    assert_eq!(code(&o), 6, "{}", stderr(&o));

    for f in [
        "simple-service--echo.yaml",
        "logging--log-generator--service.yaml",
        "multi-service--services.yaml",
        "test-errors.yaml",
    ] {
        let o = d.rune(&["cast", "--detach", peer(f).to_str().unwrap()]);
        assert_eq!(code(&o), 0, "cast {f}: {}", stderr(&o));
        assert!(stdout(&o).contains("created"), "{}", stdout(&o));
    }
    // Its services are skipped; its secrets (list form, repeated key) and configmap are cast.
    let o = d.rune(&[
        "cast",
        "--detach",
        peer("simple-service--app.yaml").to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    for made in [
        "secret/default/db-credentials created",
        "secret/default/keypairs-secret created",
        "configmap/default/app-settings created",
        "service/hello-world skipped",
    ] {
        assert!(stdout(&o).contains(made), "{made} in {}", stdout(&o));
    }
    // The peer copy of the runeset lacks a file its frontend includes: refused, named, nothing cast.
    let runeset = peer("runeset-example-app");
    for cmd in ["lint", "cast"] {
        let o = d.rune(&[cmd, runeset.to_str().unwrap()]);
        assert_eq!(code(&o), 6, "{}", stdout(&o));
        assert!(
            stderr(&o)
                .contains("casts/frontend.service.yaml:15: 'templates/app.env': no such file in the runeset"),
            "{}",
            stderr(&o)
        );
    }
    let o = d.rune(&["cast", "--detach", peer("runefile.yaml").to_str().unwrap()]);
    assert_eq!(code(&o), 6);
    assert!(stderr(&o).contains("runefile"), "{}", stderr(&o));

    let names: Vec<String> = services_json(&d)
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        ["api", "db", "echo", "frontend", "log-generator", "test-service"]
    );
}

/// The peer runeset with the one file its copy lost put back (see fixtures/upstream/README.md).
fn example_app(d: &Daemon) -> PathBuf {
    let dir = d.scratch().join("example-app");
    let st = std::process::Command::new("cp")
        .args([
            "-r",
            peer("runeset-example-app").to_str().unwrap(),
            dir.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let env =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/upstream/example-app--templates--app.env");
    std::fs::copy(env, dir.join("templates/app.env")).unwrap();
    dir
}

fn cast_lines(o: &std::process::Output) -> Vec<String> {
    let mut v: Vec<String> = stdout(o).lines().map(str::to_string).collect();
    v.sort();
    v
}

#[test]
fn runeset_renders_lints_casts_and_packs() {
    let d = Daemon::start(&bins());
    let dir = example_app(&d);
    let dir = dir.to_str().unwrap();
    let o = d.rune(&["lint", dir]);
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("OK: 5 resource(s) valid"), "{}", stdout(&o));

    let o = d.rune(&["cast", "--detach", dir]);
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    assert_eq!(
        cast_lines(&o),
        [
            "configmap/demo/app-settings created (generation 1)",
            "configmap/demo/example-app-configmap created (generation 1)",
            "namespace/demo created (generation 1)",
            "release/demo/example-app created (generation 1)",
            "secret/demo/db-credentials created (generation 1)",
            "service/demo/webapp-api created (generation 1)",
            "service/demo/webapp-frontend created (generation 1)",
            "vip/demo/webapp-api created (generation 1)",
            "vip/demo/webapp-frontend created (generation 1)",
        ]
    );
    let api: serde_json::Value = serde_json::from_str(&run_ok(
        &d,
        &["get", "svc", "webapp-api", "-n", "demo", "-o", "json"],
    ))
    .unwrap();
    assert_eq!(api["spec"]["scale"], 2, "{api}");
    assert_eq!(api["spec"]["image"], "rune-hello-world:latest", "{api}");
    assert_eq!(api["spec"]["expose"]["host"], "api.example.local", "{api}");
    assert_eq!(
        api["spec"]["env"]["DB_PASSWORD"], "{{ secret: db-credentials/password }}",
        "{api}"
    );
    let front: serde_json::Value = serde_json::from_str(&run_ok(
        &d,
        &["get", "svc", "webapp-frontend", "-n", "demo", "-o", "json"],
    ))
    .unwrap();
    let app_env = front["spec"]["env"]["APP_ENV"].as_str().unwrap();
    assert_eq!(
        app_env,
        "APP_NAME=webapp\nLOG_LEVEL=info\nFEATURE_FLAGS=beta-search,new-dashboard"
    );

    // Unchanged values: nothing changes. The rendered text casts to the same result.
    let o = d.rune(&["cast", "--detach", dir]);
    assert!(
        cast_lines(&o).iter().all(|l| l.ends_with("unchanged")),
        "{}",
        stdout(&o)
    );
    let rendered = run_ok(&d, &["cast", dir, "--render"]);
    let file = write(&d, "rendered.yaml", &rendered);
    let o = d.rune(&["cast", "--detach", &file]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        cast_lines(&o).iter().all(|l| l.ends_with("unchanged")),
        "{}",
        stdout(&o)
    );

    // --values then --set, later wins.
    let values = write(&d, "more.yaml", "app:\n  replicas: 3\n  tag: v2\n");
    let o = d.rune(&["cast", "--detach", dir, "-f", &values, "--set", "app.replicas=4"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).contains("service/demo/webapp-api configured (generation 2)"),
        "{}",
        stdout(&o)
    );
    let api: serde_json::Value = serde_json::from_str(&run_ok(
        &d,
        &["get", "svc", "webapp-api", "-n", "demo", "-o", "json"],
    ))
    .unwrap();
    assert_eq!(api["spec"]["scale"], 4, "{api}");
    assert_eq!(api["spec"]["image"], "rune-hello-world:v2", "{api}");

    // A placeholder without a value names itself and casts nothing.
    let broken = d.scratch().join("broken");
    std::fs::create_dir_all(broken.join("casts")).unwrap();
    std::fs::write(broken.join("runeset.yaml"), "name: broken\nversion: 1.0.0\n").unwrap();
    std::fs::write(
        broken.join("casts/a.yaml"),
        "service:\n  name: x\n  image: {{ values:image }}\n",
    )
    .unwrap();
    let o = d.rune(&["cast", "--detach", broken.to_str().unwrap()]);
    assert_eq!(code(&o), 6);
    assert!(
        stderr(&o).contains("casts/a.yaml:3: values:image has no value"),
        "{}",
        stderr(&o)
    );
    assert!(run_ok(&d, &["get", "svc", "-A"])
        .lines()
        .all(|l| !l.contains(" x ")));

    // Packed, the archive casts to the same result.
    let out = d.scratch().join("app.runeset.tgz");
    let o = d.rune(&["pack", dir, "--out", out.to_str().unwrap(), "--sha256"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let sum = std::fs::read_to_string(format!("{}.sha256", out.display())).unwrap();
    assert!(sum.ends_with("  app.runeset.tgz\n"), "{sum}");
    let o = d.rune(&[
        "cast",
        "--detach",
        out.to_str().unwrap(),
        "-f",
        &values,
        "--set",
        "app.replicas=4",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        cast_lines(&o).iter().all(|l| l.ends_with("unchanged")),
        "{}",
        stdout(&o)
    );
}

#[test]
fn recast_is_a_noop_unless_forced_and_history_is_kept() {
    let d = Daemon::start(&bins());
    let echo = peer("simple-service--echo.yaml");
    let echo = echo.to_str().unwrap();
    assert!(stdout(&d.rune(&["cast", "--detach", echo])).contains("created (generation 1)"));
    assert!(stdout(&d.rune(&["cast", "--detach", echo])).contains("unchanged"));
    assert_eq!(generation(&d, "echo"), 1);

    // `get -o yaml` is a castfile that casts to the same spec.
    let o = d.rune(&["get", "service", "echo", "-o", "yaml"]);
    assert_eq!(code(&o), 0);
    let exported = write(&d, "exported.yaml", &stdout(&o));
    let o = d.rune(&["cast", "--detach", &exported]);
    assert!(stdout(&o).contains("unchanged"), "{}{}", stdout(&o), stderr(&o));
    assert_eq!(generation(&d, "echo"), 1);

    let scaled = write(
        &d,
        "scaled.yaml",
        &stdout(&d.rune(&["get", "service", "echo", "-o", "yaml"])).replace("scale: 1", "scale: 3"),
    );
    assert!(stdout(&d.rune(&["cast", "--detach", &scaled])).contains("configured (generation 2)"));
    assert!(stdout(&d.rune(&["cast", "--detach", &scaled, "--force"])).contains("configured (generation 3)"));
    let dry = d.rune(&["cast", "--detach", echo, "--dry-run"]);
    assert!(stdout(&dry).contains("(dry run)"), "{}", stdout(&dry));
    assert_eq!(generation(&d, "echo"), 3);

    let o = d.rune(&["get", "service", "echo", "--history", "-o", "json"]);
    let h: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let gens: Vec<u64> = h
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["generation"].as_u64().unwrap())
        .collect();
    assert_eq!(gens, [3, 2, 1]);
    assert_eq!(h[2]["spec"]["scale"], 1);
    assert_eq!(h[0]["spec"]["scale"], 3);
}

#[test]
fn bad_input_is_refused_with_the_field_and_line_and_changes_nothing() {
    let d = Daemon::start(&bins());
    let cases = [
        ("malformed.yaml", "service:\n  name: a\n  image: [x\n", "invalid YAML"),
        ("unknown.yaml", "service:\n  name: a\n  image: x\n  imagee: y\n", ":4: service \"a\": imagee: unknown field"),
        ("name.yaml", "service:\n  name: Bad_Name\n  image: x\n", ":2: service \"Bad_Name\": name: service name"),
        ("ports.yaml", "service:\n  name: a\n  image: x\n  ports:\n    - {name: http, port: 80}\n    - {name: web, port: 80}\n", ":6: service \"a\": ports[1].port: duplicate port 80"),
        ("scale.yaml", "service:\n  name: a\n  image: x\n  scale: -2\n", ":4: service \"a\": scale: scale must be 0 or more, got -2"),
        ("both.yaml", "service:\n  name: a\n  image: x\n  process: {command: /bin/true}\n", "either 'image' or 'process'"),
        ("toplevel.yaml", "servce:\n  name: a\n", ":1: unknown top-level key 'servce'"),
        ("multi.yaml", "service:\n  name: ok\n  image: x\n---\nservice:\n  name: bad\n  image: x\n  scale: -1\n", ":8: service \"bad\""),
    ];
    for (name, text, expect) in cases {
        let f = write(&d, name, text);
        for cmd in ["lint", "cast"] {
            let o = d.rune(&[cmd, &f]);
            assert_eq!(code(&o), 6, "{cmd} {name}: {}", stderr(&o));
            assert!(
                stderr(&o).contains(expect),
                "{cmd} {name}: expected {expect:?} in:\n{}",
                stderr(&o)
            );
        }
    }
    let big = d.scratch().join("big.yaml");
    let mut text = String::from("service:\n  name: big\n  image: x\n  env:\n");
    while text.len() < 10 * 1024 * 1024 {
        text.push_str(&format!("    K{}: \"{}\"\n", text.len(), "x".repeat(200)));
    }
    std::fs::write(&big, text).unwrap();
    let o = d.rune(&["cast", "--detach", big.to_str().unwrap()]);
    assert_eq!(code(&o), 6);
    assert!(stderr(&o).contains("limited to 4 MiB"), "{}", stderr(&o));
    // Nothing was written: the only entries are raft's own and the seeding.
    let o = d.rune(&["get", "svc", "-A", "-o", "json"]);
    assert_eq!(stdout(&o).trim(), "[]");
}

#[test]
fn cli_exit_codes() {
    let d = Daemon::start(&bins());
    assert_eq!(code(&d.rune(&["get", "svc", "nope"])), 4);
    assert_eq!(code(&d.rune(&["delete", "service", "nope"])), 4);
    assert_eq!(code(&d.rune(&["get"])), 2);
    assert_eq!(code(&d.rune(&["get", "widgets"])), 2);
    assert_eq!(code(&d.rune(&["delete", "namespace", "default"])), 5);
    let f = write(
        &d,
        "ns.yaml",
        "service:\n  name: a\n  namespace: team\n  image: x\n",
    );
    let o = d.rune(&["cast", "--detach", &f]);
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(stderr(&o).contains("--create-namespace"));
    let o = d.rune(&["cast", "--detach", &f, "--create-namespace", "--dry-run"]);
    assert!(
        stdout(&o).contains("namespace/team created (generation 1) (dry run)"),
        "{}",
        stdout(&o)
    );
    let o = d.rune(&["cast", "--detach", &f, "--create-namespace"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("namespace/team created"), "{}", stdout(&o));
    assert_eq!(code(&d.rune(&["delete", "namespace", "team"])), 5);
    assert_eq!(code(&d.rune(&["-n", "team", "delete", "service", "a"])), 0);
    assert_eq!(code(&d.rune(&["delete", "namespace", "team"])), 0);
    // -n overrides the spec's namespace, as in the original.
    let f = write(
        &d,
        "ns2.yaml",
        "namespace:\n  name: other\n---\nservice:\n  name: b\n  image: x\n",
    );
    assert_eq!(code(&d.rune(&["cast", "--detach", &f])), 0);
    assert_eq!(code(&d.rune(&["cast", "--detach", &f, "-n", "other"])), 0);
    assert_eq!(code(&d.rune(&["get", "svc", "b", "-n", "other"])), 0);
    let o = d.rune(&["get", "svc", "-l", "nope"]);
    assert_eq!(code(&o), 6, "{}", stderr(&o));

    let mut unreachable = d.rune_cmd();
    unreachable.env(
        "RUNE_API_SERVER",
        format!("127.0.0.1:{}", rune_chaos_tests::free_port()),
    );
    let o = unreachable.args(["get", "svc"]).output().unwrap();
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("cannot reach runed"), "{}", stderr(&o));
}

#[test]
fn api_answers_bad_requests_with_the_right_status() {
    use rune_proto::v1 as pb;
    let d = Daemon::start(&bins());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ch = tonic::transport::Channel::from_shared(format!("http://{}", d.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut c = pb::service_api_client::ServiceApiClient::with_interceptor(ch, d.bearer())
            .max_encoding_message_size(64 << 20);
        let apply = |json: String| pb::ApplyRequest {
            resources: vec![pb::Resource {
                kind: Some(pb::resource::Kind::ServiceJson(json)),
            }],
            ..Default::default()
        };
        let huge =
            serde_json::json!({"name": "huge", "image": "x", "env": {"A": "x".repeat(10 << 20)}}).to_string();
        let e = c.apply(apply(huge)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("limit"), "{}", e.message());
        let e = c
            .apply(apply(
                r#"{"name":"a","image":"x","ports":[{"name":"h","port":0}]}"#.into(),
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("ports[0].port"), "{}", e.message());
        let e = c
            .apply(apply(r#"{"name":"a","image":"x","colour":"red"}"#.into()))
            .await
            .unwrap_err();
        assert!(e.message().contains("colour"), "{}", e.message());
        let e = c.apply(apply("{not json".into())).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let e = c
            .apply(apply(r#"{"name":"a","image":"x","namespace":"missing"}"#.into()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        let e = c
            .delete_service(pb::DeleteServiceRequest {
                namespace: String::new(),
                name: "a".into(),
                force: false,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        let e = c.apply(pb::ApplyRequest::default()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let l = c
            .list_services(pb::ListServicesRequest {
                namespace: "*".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(
            l.into_inner().services.is_empty(),
            "a refused request changed nothing"
        );
    });
}

#[test]
fn runed_refuses_bad_config_and_unusable_data_dir() {
    let b = bins();
    let tmp = tempfile::tempdir().unwrap();
    let rf = tmp.path().join("runefile.yaml");
    std::fs::write(&rf, "server:\n  grpc-addr: \":7863\"\n  htp-addr: \":1\"\n").unwrap();
    let o = std::process::Command::new(&b.runed)
        .arg("--config")
        .arg(&rf)
        .output()
        .unwrap();
    // EX_CONFIG: the unit's RestartPreventExitStatus=78 keeps systemd from looping on it.
    assert_eq!(o.status.code(), Some(78));
    assert!(
        stderr(&o).contains(":3:") && stderr(&o).contains("htp-addr"),
        "{}",
        stderr(&o)
    );

    let o = std::process::Command::new(&b.runed)
        .args(["--log-format", "xml"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(78));

    // An argument that is not UTF-8 is a bad command line like any other, not a panic.
    use std::os::unix::ffi::OsStrExt;
    let o = std::process::Command::new(&b.runed)
        .arg("--no-such-flag")
        .arg(std::ffi::OsStr::from_bytes(b"/srv/d\xe5ta"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));

    // A data dir below a regular file cannot be created, even by root.
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let mut d = Daemon::new(&b);
    d.data_dir = file.join("data");
    d.spawn();
    let st = d.wait_exit(Duration::from_secs(30));
    assert_eq!(st.code(), Some(1));
    assert!(d.logs().contains("data dir"), "{}", d.logs());

    // A second runed on the same data dir is refused while the first holds it.
    let first = Daemon::start(&b);
    let mut second = Daemon::new(&b);
    second.data_dir = first.data_dir.clone();
    second.spawn();
    assert_eq!(second.wait_exit(Duration::from_secs(30)).code(), Some(1));
    assert!(second.logs().contains("in use"), "{}", second.logs());
}

#[test]
fn signals_health_and_drain() {
    let mut d = Daemon::new(&bins());
    let rf = d.scratch().join("runefile.yaml");
    std::fs::write(&rf, "server:\n  drain_seconds: 3\nlog:\n  format: json\n").unwrap();
    d.extra = vec!["--config".into(), rf.display().to_string()];
    d.restart();
    assert_eq!(http_get(d.http, "/healthz").map(|r| r.0), Some(200));

    d.send("-HUP");
    wait_until(Duration::from_secs(10), "SIGHUP to be logged", || {
        d.logs().contains("SIGHUP")
    });
    assert!(d.running(), "SIGHUP must not stop runed");
    assert_eq!(http_get(d.http, "/healthz").map(|r| r.0), Some(200));
    let line = d
        .logs()
        .lines()
        .find(|l| l.contains("SIGHUP"))
        .unwrap()
        .to_string();
    assert!(
        serde_json::from_str::<serde_json::Value>(&line).is_ok(),
        "JSON logs: {line}"
    );

    // An open watch is an in-flight RPC: shutdown drains it (bounded) while /healthz says 503.
    let mut watch = d
        .rune_cmd()
        .args(["get", "svc", "--watch"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(watch.stdout.take().unwrap());
    let mut header = String::new();
    out.read_line(&mut header).unwrap();
    assert!(header.starts_with("EVENT"), "{header}");
    d.send("-TERM");
    wait_until(
        Duration::from_secs(10),
        "/healthz to answer 503 while draining",
        || http_get(d.http, "/healthz").is_some_and(|(c, _)| c == 503),
    );
    let st = d.wait_exit(Duration::from_secs(30));
    assert_eq!(st.code(), Some(0), "{}", d.logs());
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(d.logs().contains("runed stopped"));
}

/// Runs the watch `rune <args>`, then `act`, and gathers the events `parse` keeps from its
/// lines until one ends with `last`. The watch is killed after a minute, so an event that never
/// comes fails the test instead of hanging it.
fn watched(
    d: &Daemon,
    args: &[&str],
    act: impl FnOnce(),
    parse: impl Fn(&str) -> Option<String>,
    last: &str,
) -> Vec<String> {
    watched_after(d, args, None, act, parse, last)
}

/// [`watched`], but `act` runs only once the watch has shown an event ending with `ready`
/// (from its list of what is already there), so that what `act` changes comes after the list
/// rather than racing it.
fn watched_after(
    d: &Daemon,
    args: &[&str],
    ready: Option<&str>,
    act: impl FnOnce(),
    parse: impl Fn(&str) -> Option<String>,
    last: &str,
) -> Vec<String> {
    let mut w = d.rune_cmd().args(args).stdout(Stdio::piped()).spawn().unwrap();
    let lines = BufReader::new(w.stdout.take().unwrap()).lines();
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let reaper = std::thread::spawn(move || {
        let _ = finished.recv_timeout(Duration::from_secs(60));
        let _ = w.kill();
        let _ = w.wait();
    });
    let mut act = Some(act);
    if ready.is_none() {
        if let Some(a) = act.take() {
            a();
        }
    }
    let mut seen = Vec::new();
    for l in lines.map_while(Result::ok) {
        if let Some(event) = parse(&l) {
            let (is_ready, is_last) = (ready.is_some_and(|r| event.ends_with(r)), event.ends_with(last));
            seen.push(event);
            if is_ready {
                if let Some(a) = act.take() {
                    a();
                }
            } else if is_last && act.is_none() {
                break;
            }
        }
    }
    let _ = done.send(());
    reaper.join().unwrap();
    seen
}

#[test]
fn watch_streams_changes() {
    let d = Daemon::start(&bins());
    let f = write(&d, "w.yaml", "service:\n  name: watched\n  image: x\n");
    let seen = watched(
        &d,
        &["get", "svc", "--watch", "-o", "json"],
        // The watch subscribes before it lists; casting right away must still be seen.
        || {
            assert_eq!(code(&d.rune(&["cast", "--detach", &f])), 0);
            assert_eq!(code(&d.rune(&["delete", "service", "watched"])), 0);
        },
        |l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some(format!("{} {}", v["type"].as_str()?, v["name"].as_str()?))
        },
        "DELETED watched",
    );
    assert_eq!(seen, ["ADDED watched", "DELETED watched"]);
}

/// A watch with a label selector follows the selection, as kubectl's does: a service leaving
/// it is DELETED to the watcher, one entering it ADDED, and a service it never showed is
/// never mentioned, not even when deleted.
#[test]
fn a_selector_watch_follows_services_in_and_out() {
    let d = Daemon::start(&bins());
    let spec = |name: &str, tier: &str, v: &str| {
        format!("service:\n  name: {name}\n  image: x\n  labels:\n    tier: {tier}\n  env:\n    V: \"{v}\"\n")
    };
    let cast = |name: &str, tier: &str, v: &str| {
        let f = write(&d, &format!("{name}-{tier}-{v}.yaml"), &spec(name, tier, v));
        assert_eq!(code(&d.rune(&["cast", "--detach", &f])), 0);
    };
    let seen = watched(
        &d,
        &["get", "svc", "-l", "tier=web", "--watch", "-o", "json"],
        || {
            cast("sel", "web", "1");
            cast("sel", "db", "1");
            cast("other", "db", "1");
            assert_eq!(code(&d.rune(&["delete", "service", "other"])), 0);
            cast("sel", "web", "1");
            cast("sel", "web", "2");
        },
        |l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some(format!("{} {}", v["type"].as_str()?, v["name"].as_str()?))
        },
        "MODIFIED sel",
    );
    assert_eq!(seen, ["ADDED sel", "DELETED sel", "ADDED sel", "MODIFIED sel"]);
}

/// The same for namespaces, whose watch prints `TYPE NAME` lines. Each event is the record
/// its entry wrote: a namespace changed and deleted right away is still seen at each step.
#[test]
fn namespace_watch_streams_changes() {
    let d = Daemon::start(&bins());
    let f = write(&d, "ns.yaml", "namespace:\n  name: watched\n");
    let g = write(
        &d,
        "ns2.yaml",
        "namespace:\n  name: watched\n  description: changed\n",
    );
    let seen = watched(
        &d,
        &["get", "namespaces", "--watch"],
        || {
            assert_eq!(code(&d.rune(&["cast", "--detach", &f])), 0);
            assert_eq!(code(&d.rune(&["cast", "--detach", &g])), 0);
            assert_eq!(code(&d.rune(&["delete", "namespace", "watched"])), 0);
        },
        |l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            (words.get(1) == Some(&"watched")).then(|| words.join(" "))
        },
        "DELETED watched",
    );
    assert_eq!(seen, ["ADDED watched", "MODIFIED watched", "DELETED watched"]);
}

/// An instance watch shows each instance as its entry wrote it, not as the state is when the
/// watcher gets to it: scaled to zero, an instance is seen stopping before it is gone, and the
/// events' indices never go back. The instance ignores SIGTERM and is killed after its grace
/// second: one that died at once could be reported stopping and gone in one entry, whose
/// writes leave it gone (seen once, in a loaded run of the suite).
#[test]
fn an_instance_watch_shows_each_step() {
    let d = Daemon::start(&bins());
    let f = write(
        &d,
        "iw.yaml",
        "service:\n  name: iw\n  scale: 1\n  stopGracePeriodSeconds: 1\n  process:\n    command: /bin/sh\n    args: [\"-c\", \"trap '' TERM; while true; do sleep 0.2; done\"]\n",
    );
    run_ok(&d, &["cast", &f, "--timeout", "60s"]);
    // Scaled only once the watch has listed the running instance.
    let seen = watched_after(
        &d,
        &["get", "instances", "iw", "--watch", "-o", "json"],
        Some("ADDED iw-0 Running"),
        || assert_eq!(code(&d.rune(&["scale", "iw", "0"])), 0),
        |l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            let i = &v["instance"];
            Some(format!(
                "{} {} {} {}",
                v["index"].as_u64()?,
                v["type"].as_str()?,
                i["id"].as_str()?,
                i["status"].as_str()?
            ))
        },
        "DELETED iw-0 Removed",
    );
    let steps: Vec<&str> = seen
        .iter()
        .map(|e| e.split_once(' ').map_or("", |(_, s)| s))
        .collect();
    assert_eq!(steps.first(), Some(&"ADDED iw-0 Running"), "{seen:?}");
    assert!(steps.contains(&"MODIFIED iw-0 Stopping"), "{seen:?}");
    assert_eq!(steps.last(), Some(&"DELETED iw-0 Removed"), "{seen:?}");
    let indices: Vec<u64> = seen
        .iter()
        .filter_map(|e| e.split(' ').next()?.parse().ok())
        .collect();
    assert!(indices.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
}

#[test]
fn metrics_pass_promtool() {
    let d = Daemon::start(&bins());
    let f = write(&d, "m.yaml", "service:\n  name: m\n  image: x\n");
    assert_eq!(code(&d.rune(&["cast", "--detach", &f])), 0);
    let (c, body) = http_get(d.metrics, "/metrics").unwrap();
    assert_eq!(c, 200);
    for m in [
        "rune_log_proposals_total",
        "rune_log_commits_total",
        "rune_log_fsync_duration_seconds_bucket",
        "rune_log_apply_lag_entries",
        "rune_log_flush_batch_entries",
        "rune_state_apply_duration_seconds_bucket",
        "rune_state_commit_duration_seconds_bucket",
    ] {
        assert!(body.contains(m), "{m} missing from:\n{body}");
    }
    promtool_ok(&body);
}

#[test]
fn contexts_version_and_completion() {
    let d = Daemon::start(&bins());
    let server = d.grpc.to_string();
    let o = d.rune(&[
        "config",
        "set-context",
        "dev",
        "--server",
        &server,
        "--token",
        "secret-token-123",
        "-n",
        "team",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        code(&d.rune(&["config", "set-context", "other", "--server", "127.0.0.1:1"])),
        0
    );
    assert_eq!(code(&d.rune(&["config", "use-context", "dev"])), 0);
    assert_eq!(code(&d.rune(&["config", "use-context", "missing"])), 4);
    let view = stdout(&d.rune(&["config", "view"]));
    assert!(
        view.contains("secr****") && !view.contains("secret-token-123"),
        "{view}"
    );
    let list = stdout(&d.rune(&["config", "list-contexts"]));
    assert!(
        list.lines().any(|l| l.starts_with('*') && l.contains("dev")),
        "{list}"
    );
    // With no RUNE_API_SERVER the context's server and namespace are used.
    let o = d
        .rune_cmd()
        .env_remove("RUNE_API_SERVER")
        .args(["get", "svc"])
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stderr(&o).contains("namespace team"), "{}", stderr(&o));
    let v = stdout(&d.rune(&["version"]));
    assert!(v.contains("rune 0.") && v.contains("runed 0."), "{v}");
    for sh in ["bash", "zsh", "fish"] {
        let o = d.rune(&["completion", sh]);
        assert_eq!(code(&o), 0);
        assert!(stdout(&o).contains("rune"));
    }
}

#[test]
fn replay_tells_the_story_and_verifies() {
    let mut d = Daemon::start(&bins());
    let f = write(&d, "api.yaml", "service:\n  name: api\n  image: x\n  scale: 1\n");
    let f2 = write(&d, "api2.yaml", "service:\n  name: api\n  image: x\n  scale: 4\n");
    let other = write(&d, "other.yaml", "service:\n  name: other\n  image: x\n");
    for file in [&f, &other, &f2] {
        assert_eq!(code(&d.rune(&["cast", "--detach", file])), 0);
    }
    assert_eq!(code(&d.rune(&["delete", "service", "api"])), 0);
    let data = d.data_dir.display().to_string();
    let o = d.rune(&["admin", "replay", "--data-dir", &data]);
    assert_eq!(code(&o), 1, "replay of a running daemon's data dir is refused");
    assert!(stderr(&o).contains("in use"), "{}", stderr(&o));
    assert_eq!(d.sigterm().code(), Some(0));

    let o = d.rune(&[
        "admin",
        "replay",
        "--data-dir",
        &data,
        "--resource",
        "service/default/api",
        "-o",
        "json",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // The service's instances (image x cannot be pulled) have their own entries in its story;
    // here only the writes of the desired state matter.
    let story: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["kind"] != "instance_events")
        .collect();
    let kinds: Vec<&str> = story.iter().map(|l| l["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["apply", "apply", "delete_service"]);
    assert!(
        story[1]["summary"].as_str().unwrap().contains("scale 1→4"),
        "{}",
        story[1]
    );
    let from = story[1]["index"].as_u64().unwrap().to_string();
    let o = d.rune(&[
        "admin",
        "replay",
        "--data-dir",
        &data,
        "--from",
        &from,
        "--to",
        &from,
        "-o",
        "json",
    ]);
    let window: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // One entry (it may carry instance reports batched with the cast).
    assert!(!window.is_empty(), "{}", stdout(&o));
    assert!(
        window.iter().all(|l| l["index"] == story[1]["index"]),
        "{}",
        stdout(&o)
    );
    assert!(window.iter().any(|l| l["kind"] == "apply"), "{}", stdout(&o));
    let table = stdout(&d.rune(&["admin", "replay", "--data-dir", &data]));
    assert!(
        table.starts_with("INDEX") && table.contains("membership") && table.contains("init"),
        "{table}"
    );

    let o = d.rune(&["admin", "replay", "--data-dir", &data, "--verify"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("matches"));
    // The state as of the first cast has api at scale 1 and no `other`.
    let first_cast = story[0]["index"].as_u64().unwrap().to_string();
    let o = d.rune(&["admin", "replay", "--data-dir", &data, "--state-at", &first_cast]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["state"]["services/default/api"]["spec"]["scale"], 1);
    assert!(v["state"].get("services/default/other").is_none());
    let o = d.rune(&["admin", "replay", "--data-dir", "/nonexistent"]);
    assert_eq!(code(&o), 1);
}

#[test]
fn cast_takes_directories_recursively_and_globs() {
    let mut d = Daemon::start(&bins());
    let root = d.scratch().join("casts");
    std::fs::create_dir_all(root.join("nested")).unwrap();
    std::fs::write(root.join("a.yaml"), "service:\n  name: a\n  image: x\n").unwrap();
    std::fs::write(root.join("notes.txt"), "not a castfile").unwrap();
    std::fs::write(root.join("nested/b.yml"), "service:\n  name: b\n  image: x\n").unwrap();
    let dir = root.display().to_string();
    let o = d.rune(&["cast", "--detach", &dir]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).contains("service/default/a created") && !stdout(&o).contains("/b "),
        "{}",
        stdout(&o)
    );
    let o = d.rune(&["cast", "--detach", "-r", &dir]);
    assert!(
        stdout(&o).contains("service/default/a unchanged")
            && stdout(&o).contains("service/default/b created"),
        "{}",
        stdout(&o)
    );
    std::fs::write(root.join("c.yaml"), "service:\n  name: c\n  image: x\n").unwrap();
    let o = d.rune(&["cast", "--detach", &format!("{dir}/c*.yaml")]);
    assert!(
        stdout(&o).contains("service/default/c created"),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
    assert_eq!(
        code(&d.rune(&["cast", "--detach", &format!("{dir}/zz*.yaml")])),
        2
    );
    assert_eq!(code(&d.rune(&["cast", "--detach", "/no/such/file.yaml"])), 2);
    // SIGINT stops runed as cleanly as SIGTERM.
    d.send("-INT");
    assert_eq!(d.wait_exit(Duration::from_secs(30)).code(), Some(0));
}

#[test]
fn vips_are_stable_across_sigkill_and_recast() {
    let mut d = Daemon::new(&bins());
    d.extra = vec!["--cluster-cidr".into(), "172.30.0.0/24".into()];
    d.restart();
    let f = write(
        &d,
        "svc.yaml",
        "services:\n  - {name: a, image: busybox}\n  - {name: b, image: busybox}\n",
    );
    let o = d.rune(&["cast", "--detach", &f]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let vips = |d: &Daemon| -> Vec<String> {
        services_json(d)
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["vip"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let before = vips(&d);
    assert_eq!(before, ["172.30.0.2", "172.30.0.3"]);
    let o = d.rune(&["get", "services"]);
    assert!(
        stdout(&o).contains("VIP") && stdout(&o).contains("172.30.0.2"),
        "{}",
        stdout(&o)
    );
    d.sigkill();
    d.restart();
    let f2 = write(
        &d,
        "svc2.yaml",
        "services:\n  - {name: a, image: busybox, scale: 0, labels: {x: y}}\n  - {name: b, image: busybox}\n",
    );
    assert_eq!(code(&d.rune(&["cast", "--detach", &f2])), 0);
    assert_eq!(vips(&d), before);

    // A public range is refused at start, naming the setting.
    let mut bad = Daemon::new(&bins());
    bad.extra = vec!["--cluster-cidr".into(), "8.8.0.0/16".into()];
    let out = bad.refused_at_start();
    assert!(
        out.contains("networking.cluster-cidr") && out.contains("not private"),
        "{out}"
    );
}

#[test]
fn help_lists_every_kind_and_runed_shows_defaults() {
    let b = bins();
    let o = std::process::Command::new(&b.rune)
        .args(["get", "--help"])
        .output()
        .unwrap();
    for kind in [
        "services",
        "instances",
        "endpoints",
        "ingresses",
        "namespaces",
        "secrets",
        "configmaps",
    ] {
        assert!(
            stdout(&o).contains(kind),
            "{kind} missing from rune get --help:\n{}",
            stdout(&o)
        );
    }
    let o = std::process::Command::new(&b.runed)
        .arg("--help")
        .output()
        .unwrap();
    assert_eq!(code(&o), 0);
    for default in [
        ":7863",
        ":7861",
        "127.0.0.1:9100",
        "/var/lib/rune",
        "128MiB",
        "30s",
    ] {
        assert!(
            stdout(&o).contains(default),
            "{default} missing from runed --help"
        );
    }
    // A bad flag is a configuration error (78), not a restart loop under systemd.
    let o = std::process::Command::new(&b.runed)
        .args(["--stale-budget", "soon"])
        .output()
        .unwrap();
    assert_eq!(code(&o), 78, "{}", stderr(&o));
}

/// The local addresses of the TCP sockets `pid` listens on.
fn listening(pid: u32) -> Vec<std::net::IpAddr> {
    let inodes: std::collections::BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            l.to_string_lossy()
                .strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .map(String::from)
        })
        .collect();
    let mut out = Vec::new();
    for (file, v6) in [("tcp", false), ("tcp6", true)] {
        let table = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")).unwrap_or_default();
        for row in table.lines().skip(1) {
            let f: Vec<&str> = row.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" || !inodes.contains(f[9]) {
                continue;
            }
            let hex = f[1].split(':').next().unwrap();
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            out.push(if v6 {
                let mut b = [0u8; 16];
                for (i, w) in bytes.chunks(4).enumerate() {
                    b[i * 4..i * 4 + 4].copy_from_slice(&[w[3], w[2], w[1], w[0]]);
                }
                std::net::IpAddr::from(b)
            } else {
                std::net::IpAddr::from([bytes[3], bytes[2], bytes[1], bytes[0]])
            });
        }
    }
    out
}

#[test]
fn a_dev_runed_listens_on_loopback_only() {
    // Everything at its dev default but the ports other tests may hold: gRPC and HTTP included.
    let mut d = Daemon::new(&bins());
    d.extra = vec!["--dev-mode".into()];
    let mut c = d.command();
    let args: Vec<String> = c.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
    // The harness names gRPC and HTTP addresses; this runed must choose its own.
    let mut kept = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--grpc-addr" || a == "--http-addr" {
            it.next();
        } else {
            kept.push(a.clone());
        }
    }
    c = std::process::Command::new(&d.bins.runed);
    c.args(&kept);
    let log = std::fs::File::create(d.scratch().join("dev.log")).unwrap();
    let child = c.stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap();
    let mut child = Killed(child);
    let pid = child.0.id();
    let log = || std::fs::read_to_string(d.scratch().join("dev.log")).unwrap_or_default();
    wait_until(Duration::from_secs(60), "the dev runed to be ready", || {
        if let Ok(Some(st)) = child.0.try_wait() {
            panic!(
                "the dev runed exited ({st}); is port 7863 or 7861 taken?\n{}",
                log()
            );
        }
        log().contains("runed is ready")
    });
    let addrs = listening(pid);
    assert!(
        addrs.len() >= 5,
        "gRPC, HTTP, metrics, DNS and the ingress: {addrs:?}"
    );
    assert!(
        addrs.iter().all(|a| a.is_loopback()),
        "a dev runed listens beyond loopback: {addrs:?}"
    );
}

#[test]
fn lint_decides_what_the_files_decide() {
    let d = Daemon::new(&bins());
    let a = write(
        &d,
        "a.yaml",
        "services:\n  - {name: api, image: x, dependencies: [db], ports: [{name: http, port: 80}],\n     networkPolicy: {egress: [{to: [{service: db}], ports: [sql]}]}}\n  - {name: db, image: x, dependencies: [api], ports: [{name: pg, port: 5432}],\n     networkPolicy: {ingress: [{from: [{service: api}], ports: [pg]}]}}\n",
    );
    let b = write(&d, "b.yaml", "service:\n  name: api\n  image: y\n");
    let c = write(
        &d,
        "c.yaml",
        "service:\n  name: cache\n  image: x\n  ports: [{name: redis, port: 6379}]\n  networkPolicy: {ingress: [{from: [{service: api}], ports: [postgres]}]}\n",
    );
    let o = d.rune(&["lint", &a, &b, &c]);
    assert_eq!(code(&o), 6, "{}", stdout(&o));
    let err = stderr(&o);
    for want in [
        "dependency cycle: default/api -> default/db -> default/api",
        "b.yaml:2: service default/api is declared twice (first at",
        "'postgres' names no port of this service (its ports: redis)",
        "'sql' names no port of service default/db (its ports: pg)",
    ] {
        assert!(err.contains(want), "{want} missing from:\n{err}");
    }
    // One cycle is said once, not once per member.
    assert_eq!(err.matches("dependency cycle").count(), 1, "{err}");
}
