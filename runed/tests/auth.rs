//! Authentication and authorisation through the real `runed` and `rune`: bootstrap, tokens,
//! the built-in policies and a namespace-scoped one, expiry and revocation.

mod common;

use std::process::Output;
use std::time::Duration;

use common::*;
use rune_chaos_tests::{stderr, stdout, wait_until, Daemon};

fn as_token(d: &Daemon, token: &str, args: &[&str]) -> Output {
    d.rune_cmd().env("RUNE_TOKEN", token).args(args).output().unwrap()
}

/// A token for a new user with `policies`, minted by root.
fn token_for(d: &Daemon, user: &str, policies: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "admin",
        "token",
        "create",
        user,
        "--subject-name",
        user,
        "--policies",
        policies,
    ];
    args.extend_from_slice(extra);
    let o = d.rune(&args);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    stdout(&o).trim().to_string()
}

#[test]
fn every_rpc_needs_a_token_and_bootstrap_is_one_time_and_local() {
    let mut d = Daemon::new(&bins());
    d.auto_bootstrap = false;
    // Listen on every interface, so that a non-loopback client can be tried.
    let port = d.grpc.port();
    d.grpc = std::net::SocketAddr::from(([0, 0, 0, 0], port));
    d.restart();

    let o = d.rune(&["get", "svc"]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("missing bearer token")
            && stderr(&o).contains("rune admin bootstrap")
            && stderr(&o).contains("rune login"),
        "{}",
        stderr(&o)
    );
    let o = as_token(&d, "rune_0000", &["get", "svc"]);
    assert_eq!(code(&o), 3);
    assert!(stderr(&o).contains("invalid bearer token"), "{}", stderr(&o));

    // The Docker bridge alone gives every test machine one.
    let ip = outside_address().expect("a non-loopback IPv4 address (ip -4 addr)");
    {
        // Over TCP from a non-loopback address (the admin socket, which `rune admin` would
        // use on this host, is left out here).
        let o = d
            .rune_cmd()
            .env("RUNE_API_SERVER", format!("{ip}:{port}"))
            .env("RUNE_ADMIN_SOCKET", d.scratch().join("no-such.sock"))
            .args(["admin", "bootstrap"])
            .output()
            .unwrap();
        assert_eq!(code(&o), 3, "bootstrap from {ip}: {}{}", stdout(&o), stderr(&o));
        assert!(stderr(&o).contains("admin socket"), "{}", stderr(&o));
        // Nor over loopback TCP: any local user could, before root does.
        let o = d
            .rune_cmd()
            .env("RUNE_API_SERVER", format!("127.0.0.1:{port}"))
            .env("RUNE_ADMIN_SOCKET", d.scratch().join("no-such.sock"))
            .args(["admin", "bootstrap"])
            .output()
            .unwrap();
        assert_eq!(
            code(&o),
            3,
            "bootstrap over loopback TCP: {}{}",
            stdout(&o),
            stderr(&o)
        );
    }

    // An out-file that cannot be written fails before the token is minted: bootstrap stays
    // possible.
    let blocker = d.scratch().join("a-file");
    std::fs::write(&blocker, "").unwrap();
    let o = d.rune(&[
        "admin",
        "bootstrap",
        "--out-file",
        blocker.join("root.token").to_str().unwrap(),
    ]);
    assert_ne!(code(&o), 0);
    assert!(stderr(&o).contains("cannot write"), "{}", stderr(&o));
    let file = d.scratch().join("tokens/root.token");
    let o = d.rune(&["admin", "bootstrap", "--out-file", file.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let token = std::fs::read_to_string(&file).unwrap().trim().to_string();
    assert!(token.starts_with("rune_"), "{token}");
    // Only the hash is stored: the secret is nowhere in the data dir.
    assert!(
        grep_dir(&d.data_dir, token.as_bytes()).is_empty(),
        "the token secret is in the data dir"
    );

    let o = d.rune(&["admin", "bootstrap"]);
    assert_eq!(code(&o), 5, "{}", stderr(&o));
    assert!(stderr(&o).contains("live token"), "{}", stderr(&o));

    // login saves a context that later commands use without --token.
    let o = d.rune(&[
        "login",
        "local",
        "--server",
        &format!("127.0.0.1:{port}"),
        "--token-file",
        file.to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = d
        .rune_cmd()
        .env_remove("RUNE_API_SERVER")
        .args(["whoami"])
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).contains("User:      root") && stdout(&o).contains("root"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn builtin_and_namespace_scoped_policies_allow_and_deny() {
    let d = Daemon::start(&bins());
    let svc = |ns: &str, name: &str| {
        format!("service:\n  name: {name}\n  namespace: {ns}\n  image: busybox\n  scale: 0\n")
    };
    let dev = write(&d, "dev.yaml", &svc("dev", "a"));
    let prod = write(&d, "prod.yaml", &svc("prod", "b"));
    let secret = write(
        &d,
        "s.yaml",
        "secret:\n  name: s\n  namespace: dev\n  stringData:\n    k: hidden-value-1\n",
    );
    for f in [&dev, &prod, &secret] {
        let o = d.rune(&["cast", "--detach", "--create-namespace", f]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
    }
    let policy = write(
        &d,
        "dev-only.yaml",
        "name: dev-only\nrules:\n  - resource: service\n    verbs: [get, list, create, update, delete, scale]\n    namespace: dev\n  - resource: secrets\n    verbs: [get, list]\n    namespace: dev\n",
    );
    let o = d.rune(&["admin", "policy", "create", "-f", &policy]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));

    let ro = token_for(&d, "ro", "readonly", &[]);
    let rw = token_for(&d, "rw", "readwrite", &[]);
    let adm = token_for(&d, "adm", "admin", &[]);
    let devu = token_for(&d, "devu", "dev-only", &[]);

    // (what, args, [readonly, readwrite, admin, dev-only]) with 0 = allowed, 3 = denied.
    let list_dev: &[&str] = &["get", "svc", "-n", "dev"];
    let list_prod: &[&str] = &["get", "svc", "-n", "prod"];
    let cast_dev: &[&str] = &["cast", "--detach", "--force", &dev];
    let cast_prod: &[&str] = &["cast", "--detach", "--force", &prod];
    let keys: &[&str] = &["get", "secret", "s", "-n", "dev"];
    let reveal: &[&str] = &["get", "secret", "s", "-n", "dev", "--show-values", "-o", "json"];
    let users: &[&str] = &["admin", "user", "list"];
    let mint: &[&str] = &["admin", "token", "create", "sneaky", "--subject-name", "root"];
    let scale: &[&str] = &["scale", "a", "0", "-n", "dev", "--no-wait"];
    let cases: [(&str, &[&str], [i32; 4]); 9] = [
        ("list dev", list_dev, [0, 0, 0, 0]),
        ("list prod", list_prod, [0, 0, 0, 3]),
        ("cast dev", cast_dev, [3, 0, 0, 0]),
        ("cast prod", cast_prod, [3, 0, 0, 3]),
        ("secret keys", keys, [0, 0, 0, 0]),
        ("secret values", reveal, [3, 0, 0, 3]),
        ("users", users, [3, 3, 0, 3]),
        ("mint a root token", mint, [3, 3, 0, 3]),
        ("scale dev", scale, [3, 0, 0, 0]),
    ];
    for (what, args, want) in cases {
        for (tok, who, w) in [
            (&ro, "ro", want[0]),
            (&rw, "rw", want[1]),
            (&adm, "adm", want[2]),
            (&devu, "devu", want[3]),
        ] {
            let o = as_token(&d, tok, args);
            assert_eq!(code(&o), w, "{what} as {who}: {}{}", stdout(&o), stderr(&o));
            if w == 3 {
                assert!(
                    stderr(&o).contains(&format!("user {who} may not")),
                    "{what} as {who}: {}",
                    stderr(&o)
                );
            }
            if what == "secret values" && w == 0 {
                assert!(stdout(&o).contains("hidden-value-1"), "{}", stdout(&o));
            }
            if what == "secret keys" {
                assert!(
                    !stdout(&o).contains("hidden-value-1"),
                    "values leak without --show-values"
                );
            }
        }
    }
    // The denial names the resource, the verbs and the namespace acted on.
    let o = as_token(&d, &devu, cast_prod);
    assert!(
        stderr(&o).contains("may not create or update services in namespace prod"),
        "{}",
        stderr(&o)
    );
    // Who depends on a service is told only for namespaces the caller may read.
    let x = write(
        &d,
        "x.yaml",
        "service:\n  name: x\n  namespace: prod\n  image: busybox\n  scale: 0\n  dependencies: [a.dev]\n",
    );
    assert_eq!(code(&d.rune(&["cast", "--detach", &x])), 0);
    assert!(stdout(&d.rune(&["deps", "a", "-n", "dev"])).contains("depended on by: prod/x"));
    let o = as_token(&d, &devu, &["deps", "a", "-n", "dev"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(!stdout(&o).contains("prod/x"), "{}", stdout(&o));
    // Nor whether what another namespace holds exists.
    let o = as_token(&d, &devu, &["deps", "x", "-n", "prod"]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));

    // An address is named as its service's only where the caller may read: a container of
    // prod/box is not told to a dev-only token, as the service it is or its policy.
    let boxed = write(
        &d,
        "box.yaml",
        "service:\n  name: box\n  namespace: prod\n  image: busybox\n  command: [\"sleep\", \"1000\"]\n  scale: 1\n",
    );
    assert_eq!(code(&d.rune(&["cast", "--timeout", "60s", &boxed])), 0);
    let target = write(
        &d,
        "target.yaml",
        "service:\n  name: t\n  namespace: dev\n  image: busybox\n  scale: 0\n  ports:\n    - {name: http, port: 80}\n",
    );
    assert_eq!(code(&d.rune(&["cast", "--detach", &target])), 0);
    let v: serde_json::Value = serde_json::from_str(&stdout(&d.rune(&[
        "get",
        "instances",
        "box",
        "-n",
        "prod",
        "-o",
        "json",
    ])))
    .unwrap();
    let ip = v[0]["address"].as_str().unwrap_or_default().to_string();
    assert!(!ip.is_empty(), "{v}");
    let explain: &[&str] = &["policy", "explain", &ip, "t", "-n", "dev"];
    wait_until(Duration::from_secs(60), "root to see the box's address", || {
        stdout(&d.rune(explain)).contains("prod/box")
    });
    let o = as_token(&d, &devu, explain);
    assert_eq!(code(&o), 3, "{}{}", stdout(&o), stderr(&o));
    assert!(!stdout(&o).contains("prod/box"), "{}", stdout(&o));

    // Where it may not write, a cast tells nothing of what is there: a namespace that does
    // not exist is denied like one that does, not reported missing.
    let ghost = write(&d, "ghost.yaml", &svc("ghost", "g"));
    let o = as_token(&d, &devu, &["cast", "--dry-run", &ghost]);
    assert_eq!(code(&o), 3, "{}{}", stdout(&o), stderr(&o));
    assert!(
        stderr(&o).contains("may not create or update services in namespace ghost"),
        "{}",
        stderr(&o)
    );

    // Built-ins are protected; a policy in use cannot be deleted.
    let fake = write(
        &d,
        "ro.yaml",
        "name: readonly\nrules:\n  - {resource: '*', verbs: ['*']}\n",
    );
    let o = d.rune(&["admin", "policy", "create", "-f", &fake]);
    assert_eq!(code(&o), 5, "{}", stderr(&o));
    assert!(stderr(&o).contains("built in"), "{}", stderr(&o));
    let o = d.rune(&["admin", "policy", "delete", "dev-only"]);
    assert_eq!(code(&o), 5);
    assert!(stderr(&o).contains("attached to devu"), "{}", stderr(&o));
    let bad = write(
        &d,
        "bad.yaml",
        "name: bad\nrules:\n  - {resource: servics, verbs: [get]}\n",
    );
    let o = d.rune(&["admin", "policy", "create", "-f", &bad]);
    assert_eq!(code(&o), 6);
    assert!(
        stderr(&o).contains("rules[0].resource") && stderr(&o).contains("servics"),
        "{}",
        stderr(&o)
    );

    // Managing users and tokens does not make anyone root: nobody grants more than they hold.
    let ua = write(&d, "ua.yaml", "name: user-admin\nrules:\n  - {resource: users, verbs: ['*']}\n  - {resource: tokens, verbs: ['*']}\n  - {resource: policies, verbs: [get, list]}\n");
    assert_eq!(code(&d.rune(&["admin", "policy", "create", "-f", &ua])), 0);
    let uat = token_for(&d, "ua", "user-admin", &[]);
    for args in [
        &["admin", "token", "create", "x", "--subject-name", "root"][..],
        &[
            "admin",
            "token",
            "create",
            "y",
            "--subject-name",
            "newbie",
            "--policies",
            "admin",
        ],
        &["admin", "policy", "attach", "root", "--to-user", "ua"],
        &["admin", "user", "create", "z", "--policy", "readwrite"],
    ] {
        let o = as_token(&d, &uat, args);
        assert_eq!(code(&o), 3, "{args:?}: {}{}", stdout(&o), stderr(&o));
        assert!(stderr(&o).contains("cannot grant"), "{args:?}: {}", stderr(&o));
    }
    let o = as_token(
        &d,
        &uat,
        &["admin", "token", "create", "mine", "--subject-name", "ua"],
    );
    assert_eq!(code(&o), 0, "a token for oneself: {}", stderr(&o));
    // A token narrowed to some of its user's policies mints no wider token, even for its own
    // user: one with none named gets the maker's, and naming another is refused.
    let o = d.rune(&[
        "admin",
        "user",
        "create",
        "ci",
        "--policy",
        "readwrite,user-admin",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let narrow = stdout(&d.rune(&[
        "admin",
        "token",
        "create",
        "ci-tokens",
        "--subject-name",
        "ci",
        "--policies",
        "user-admin",
    ]))
    .trim()
    .to_string();
    let o = as_token(
        &d,
        &narrow,
        &[
            "admin",
            "token",
            "create",
            "wide",
            "--subject-name",
            "ci",
            "--policies",
            "readwrite",
        ],
    );
    assert_eq!(code(&o), 3, "{}{}", stdout(&o), stderr(&o));
    assert!(stderr(&o).contains("cannot grant readwrite"), "{}", stderr(&o));
    let o = as_token(
        &d,
        &narrow,
        &["admin", "token", "create", "same", "--subject-name", "ci"],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let same = stdout(&o).trim().to_string();
    let o = as_token(&d, &same, &["get", "services"]);
    assert_eq!(
        code(&o),
        3,
        "as narrow as its maker: {}{}",
        stdout(&o),
        stderr(&o)
    );

    // Detaching takes effect on the next call, with the same token.
    let o = d.rune(&["admin", "policy", "detach", "dev-only", "--from-user", "devu"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = as_token(&d, &devu, list_dev);
    assert_eq!(code(&o), 3);
}

#[test]
fn tokens_expire_and_revoke_at_once() {
    let d = Daemon::start(&bins());
    let short = token_for(&d, "shorty", "readonly", &["--ttl", "2s"]);
    let o = as_token(&d, &short, &["get", "svc"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    wait_until(Duration::from_secs(20), "the 2 s token to expire", || {
        let o = as_token(&d, &short, &["get", "svc"]);
        code(&o) == 3 && stderr(&o).contains("expired")
    });

    let long = token_for(&d, "longy", "readonly", &[]);
    assert_eq!(code(&as_token(&d, &long, &["get", "svc"])), 0);
    let o = d.rune(&["admin", "token", "revoke", "longy"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = as_token(&d, &long, &["get", "svc"]);
    assert_eq!(code(&o), 3);
    assert!(stderr(&o).contains("revoked"), "{}", stderr(&o));
    let o = d.rune(&["admin", "token", "list", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(v
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["name"] == "longy" && t["revokedAtMs"].as_i64() > Some(0)));
    // A token cannot be wider than its user.
    let o = d.rune(&[
        "admin",
        "token",
        "create",
        "x",
        "--subject-name",
        "longy",
        "--policies",
        "admin",
    ]);
    assert_eq!(code(&o), 5, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("does not have policy admin"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn tls_serves_grpc_and_http_and_the_cli_verifies_it() {
    let mut d = Daemon::new(&bins());
    d.extra = vec!["--dev-mode".into(), "--tls".into()];
    let ca = d.data_dir.join("tls/cert.pem");
    d.tls_ca = Some(ca.clone());
    d.restart();
    let o = d.rune(&["get", "svc"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(rune_chaos_tests::https_status(d.http, "/healthz", &ca), Some(200));
    // Plaintext and an unknown CA are refused; plaintext is told what to do.
    let o = d
        .rune_cmd()
        .env_remove("RUNE_TLS_CA")
        .args(["get", "svc"])
        .output()
        .unwrap();
    assert_ne!(code(&o), 0);
    assert!(stderr(&o).contains("speaks TLS: pass --tls-ca"), "{}", stderr(&o));
    assert!(rune_chaos_tests::http_get(d.http, "/healthz").is_none_or(|(c, _)| c != 200));
    let other = write(
        &d,
        "other-ca.pem",
        &std::fs::read_to_string(&ca).unwrap().replace('A', "B"),
    );
    let o = d
        .rune_cmd()
        .env("RUNE_TLS_CA", &other)
        .args(["get", "svc"])
        .output()
        .unwrap();
    assert_ne!(code(&o), 0);

    // TLS towards a plaintext runed says so too.
    let plain = Daemon::start(&bins());
    let o = plain
        .rune_cmd()
        .env("RUNE_TLS_CA", &ca)
        .args(["get", "svc"])
        .output()
        .unwrap();
    assert_ne!(code(&o), 0);
    assert!(stderr(&o).contains("does not speak TLS"), "{}", stderr(&o));

    // Outside dev mode, TLS without files is a configuration error naming the settings.
    let mut p = Daemon::new(&bins());
    p.extra = vec!["--tls".into()];
    let out = p.refused_at_start();
    assert!(out.contains("auth.tls.cert-file"), "{out}");
}
