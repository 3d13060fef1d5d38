//! Secrets and configmaps end to end: sealed at rest, delivered to a real container and a real
//! process (env and mounted files), the KEK checked at start, and rotated while services run.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use rune_chaos_tests::{stderr, stdout, wait_until, Daemon};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(90);

fn running(d: &Daemon, svc: &str) -> bool {
    let l = instances(d, svc);
    l.len() == 1 && l[0]["status"] == "Running"
}

/// A random value that appears nowhere by chance.
fn random_hex() -> String {
    let mut b = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn sha256(text: &str) -> String {
    let o = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            std::io::Write::write_all(c.stdin.as_mut().unwrap(), text.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    stdout(&o).split_whitespace().next().unwrap().to_string()
}

/// Runs `sh -c script` in the service's instance and returns its output; the script never
/// carries the secret, only names it (`$DB_PASSWORD`), so no log line sees the value.
fn exec_sh(d: &Daemon, svc: &str, script: &str) -> String {
    run_ok(d, &["exec", svc, "--", "sh", "-c", script])
        .trim()
        .to_string()
}

fn cast_secret(d: &Daemon, value: &str) {
    let f = write(
        d,
        "secret.yaml",
        &format!(
            "secrets:\n  - name: db\n    data:\n      - key: password\n        value: {value}\n      - key: user\n        value: admin\nconfigmap:\n  name: cfg\n  data:\n    MODE: fast\n"
        ),
    );
    run_ok(d, &["cast", &f]);
}

fn cast_services(d: &Daemon) -> String {
    let pmount = d.scratch().join("p-secrets");
    let f = write(
        d,
        "svc.yaml",
        &format!(
            r#"services:
  - name: p
    scale: 1
    process:
      command: /bin/sh
      args: ["-c", "exec sleep 3600"]
    env:
      DB_PASSWORD: "{{{{secret:db/password}}}}"
    envFrom:
      - configmap: cfg
    secretMounts:
      - name: creds
        mountPath: {}
        secretName: db
  - name: c
    scale: 1
    image: busybox
    command: ["sh", "-c", "exec sleep 3600"]
    env:
      DB_PASSWORD: "{{{{ secret:db/password }}}}"
    envFrom:
      - secret: db
        prefix: DB_
    secretMounts:
      - name: creds
        mountPath: /etc/secrets/db
        secretName: db
    configMounts:
      - name: conf
        mountPath: /etc/conf
        configName: cfg
"#,
            pmount.display()
        ),
    );
    run_ok(d, &["cast", "--timeout", "60s", &f]);
    pmount.display().to_string()
}

#[test]
fn values_never_rest_in_plaintext_and_reach_containers_and_processes() {
    image();
    let d = Daemon::start(&bins());
    let value = random_hex();
    cast_secret(&d, &value);
    let pmount = cast_services(&d);
    let want = sha256(&value);

    // The container: env from the template and from envFrom (with prefix), the mounted file
    // (mode 0400), and the configmap mount.
    assert_eq!(
        exec_sh(&d, "c", "printf %s \"$DB_PASSWORD\" | sha256sum | cut -d' ' -f1"),
        want
    );
    assert_eq!(
        exec_sh(&d, "c", "printf %s \"$DB_password\" | sha256sum | cut -d' ' -f1"),
        want
    );
    assert_eq!(exec_sh(&d, "c", "echo $DB_user"), "admin");
    assert_eq!(
        exec_sh(&d, "c", "sha256sum /etc/secrets/db/password | cut -d' ' -f1"),
        want
    );
    assert_eq!(exec_sh(&d, "c", "stat -c %a /etc/secrets/db/password"), "400");
    assert_eq!(exec_sh(&d, "c", "cat /etc/conf/MODE"), "fast");
    // The process: the same, in its own mount namespace; the host's directory stays empty.
    assert_eq!(
        exec_sh(&d, "p", "printf %s \"$DB_PASSWORD\" | sha256sum | cut -d' ' -f1"),
        want
    );
    assert_eq!(exec_sh(&d, "p", "echo $MODE"), "fast");
    assert_eq!(
        exec_sh(&d, "p", &format!("sha256sum {pmount}/password | cut -d' ' -f1")),
        want
    );
    assert_eq!(
        std::fs::read_dir(&pmount).unwrap().count(),
        0,
        "the mount leaked to the host"
    );

    // Reading: keys only, unless asked and allowed.
    let shown = run_ok(&d, &["get", "secret", "db", "-o", "yaml"]);
    assert!(shown.contains("<redacted>") && !shown.contains(&value), "{shown}");
    let revealed = run_ok(&d, &["get", "secret", "db", "--show-values", "-o", "json"]);
    assert!(revealed.contains(&value), "{revealed}");
    // Re-casting the same values writes nothing; a change makes version 2.
    cast_secret(&d, &value);
    let v: Value = serde_json::from_str(&run_ok(&d, &["get", "secret", "db", "-o", "json"])).unwrap();
    assert_eq!(v["version"], 1);

    // Nowhere at rest or in runed's output: not in the log, the state, nor a line runed printed.
    let hits = grep_dir(&d.data_dir, value.as_bytes());
    assert!(hits.is_empty(), "plaintext found in {hits:?}");
    assert!(!d.logs().contains(&value), "plaintext in runed's output");
    let replay = d.rune(&[
        "admin",
        "replay",
        "--data-dir",
        d.data_dir.to_str().unwrap(),
        "-o",
        "json",
    ]);
    assert!(!stdout(&replay).contains(&value));
}

#[test]
fn a_missing_secret_fails_the_instance_until_it_exists() {
    let d = Daemon::start(&bins());
    let f = write(
        &d,
        "svc.yaml",
        "service:\n  name: needy\n  scale: 1\n  process:\n    command: /bin/sleep\n    args: ['3600']\n  env:\n    PW: '{{secret:later/password}}'\n",
    );
    run_ok(&d, &["cast", "--detach", &f]);
    wait_for_reason(&d, "needy", "secret default/later not found");
    let s = write(
        &d,
        "s.yaml",
        "secret:\n  name: later\n  stringData:\n    password: x\n",
    );
    run_ok(&d, &["cast", &s]);
    wait_until(LONG, "the instance to start once the secret exists", || {
        running(&d, "needy")
    });
    // A secret a service needs is deleted only with --force: its next start would fail.
    let o = d.rune(&["delete", "secret", "later"]);
    assert_eq!(code(&o), 5, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("secret default/later: default/needy (env.PW) uses it")
            && stderr(&o).contains("--force"),
        "{}",
        stderr(&o)
    );
    run_ok(&d, &["get", "secret", "later"]);
    run_ok(&d, &["delete", "secret", "later", "--force"]);
    let o = d.rune(&["get", "secret", "later"]);
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    run_ok(&d, &["cast", &s]);

    // Another namespace's secret is out of reach, named or by FQDN.
    let prod = write(
        &d,
        "prod.yaml",
        "secret:\n  name: db\n  namespace: prod\n  stringData:\n    password: y\n",
    );
    run_ok(&d, &["cast", "--create-namespace", &prod]);
    let f = write(
        &d,
        "nosy.yaml",
        "service:\n  name: nosy\n  scale: 1\n  process:\n    command: /bin/sleep\n    args: ['3600']\n  env:\n    PW: '{{secret:db.prod.rune/password}}'\n",
    );
    run_ok(&d, &["cast", "--detach", &f]);
    wait_for_reason(&d, "nosy", "secret prod/db is in another namespace");
    // Mount names and paths that would escape runed's directories are refused at cast.
    let f = write(
        &d,
        "escape.yaml",
        "service:\n  name: esc\n  image: busybox\n  secretMounts:\n    - name: ../../etc\n      mountPath: /x/../y\n      secretName: later\n",
    );
    let o = d.rune(&["cast", &f]);
    assert_eq!(code(&o), 6);
    assert!(
        stderr(&o).contains("secretMounts[0].name") && stderr(&o).contains("secretMounts[0].mountPath"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn kek_missing_malformed_or_wrong_refuses_to_start() {
    let mut d = Daemon::start(&bins());
    let value = random_hex();
    cast_secret(&d, &value);
    assert_eq!(d.sigterm().code(), Some(0));
    let kek = d.data_dir.join("kek.b64");
    let good = std::fs::read_to_string(&kek).unwrap();

    std::fs::remove_file(&kek).unwrap();
    let out = d.refused_at_start();
    assert!(
        out.contains("is missing") && out.contains("restore the KEK file"),
        "{out}"
    );
    assert!(!kek.exists(), "a new KEK was generated over sealed secrets");

    std::fs::write(&kek, "not base64 at all!\n").unwrap();
    let out = d.refused_at_start();
    assert!(out.contains("malformed"), "{out}");

    std::fs::write(&kek, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n").unwrap();
    let out = d.refused_at_start();
    assert!(out.contains("does not open the stored secrets"), "{out}");

    std::fs::write(&kek, good).unwrap();
    d.restart();
    assert!(run_ok(&d, &["get", "secret", "db", "--show-values", "-o", "json"]).contains(&value));

    // An env source with the variable unset is refused too.
    let mut e = Daemon::new(&bins());
    let rf = write(
        &e,
        "runefile.yaml",
        "crypto:\n  kek:\n    source: env\n    env-var: RUNE_TEST_UNSET_KEK\n",
    );
    e.extra = vec!["--config".into(), rf];
    let out = e.refused_at_start();
    assert!(out.contains("RUNE_TEST_UNSET_KEK is not set"), "{out}");
}

#[test]
fn rotating_the_kek_keeps_services_running_and_retires_the_old_key() {
    image();
    let mut d = Daemon::start(&bins());
    let value = random_hex();
    cast_secret(&d, &value);
    cast_services(&d);
    let want = sha256(&value);
    let before: Vec<String> = ["p", "c"]
        .iter()
        .map(|s| {
            instances(&d, s)[0]["runtimeId"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    let kek = d.data_dir.join("kek.b64");
    let old = std::fs::read_to_string(&kek).unwrap();

    let new_file = write(&d, "new.kek", "ZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmY=\n");
    let out = run_ok(&d, &["admin", "rotate-kek", "--new-kek-file", &new_file]);
    assert!(out.contains("re-wrapped"), "{out}");
    // Both versions kept for db (the cast made one; nothing else): every data key re-wrapped.
    assert_ne!(std::fs::read_to_string(&kek).unwrap(), old);

    // The services never stopped and still read the secret.
    for (svc, id) in ["p", "c"].iter().zip(&before) {
        let i = &instances(&d, svc)[0];
        assert_eq!(
            i["runtimeId"].as_str().unwrap_or_default(),
            id,
            "{svc} was restarted"
        );
        assert_eq!(i["status"], "Running");
    }
    assert_eq!(
        exec_sh(&d, "c", "sha256sum /etc/secrets/db/password | cut -d' ' -f1"),
        want
    );

    // The old KEK opens nothing any more; the new one is all runed needs.
    assert_eq!(d.sigterm().code(), Some(0));
    std::fs::write(&kek, &old).unwrap();
    d.refused_at_start();
    std::fs::copy(&new_file, &kek).unwrap();
    d.restart();
    assert!(run_ok(&d, &["get", "secret", "db", "--show-values", "-o", "json"]).contains(&value));
    run_ok(&d, &["restart", "p", "--timeout", "60s"]);
    assert_eq!(
        exec_sh(&d, "p", "printf %s \"$DB_PASSWORD\" | sha256sum | cut -d' ' -f1"),
        want
    );
    assert!(grep_dir(&d.data_dir, value.as_bytes()).is_empty());
}

/// A rotation that wrote the new KEK beside the old one (`kek.b64.new`) and stopped there, by
/// a crash or a failed proposal, is finished by the next start: runed comes up, the new KEK is
/// installed, and the secrets still open.
#[test]
fn an_interrupted_kek_rotation_finishes_at_the_next_start() {
    let mut d = Daemon::start(&bins());
    let value = random_hex();
    cast_secret(&d, &value);
    assert_eq!(d.sigterm().code(), Some(0));
    let kek = d.data_dir.join("kek.b64");
    let pending = d.data_dir.join("kek.b64.new");
    let new = "ZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmY=\n";
    std::fs::write(&pending, new).unwrap();
    d.restart();
    assert!(d.logs().contains("finishing a KEK rotation that was interrupted"));
    assert_eq!(std::fs::read_to_string(&kek).unwrap(), new);
    assert!(!pending.exists(), "the pending KEK was installed");
    assert!(run_ok(&d, &["get", "secret", "db", "--show-values", "-o", "json"]).contains(&value));
    // And the new KEK alone opens them at the start after.
    assert_eq!(d.sigterm().code(), Some(0));
    d.restart();
    assert!(run_ok(&d, &["get", "secret", "db", "--show-values", "-o", "json"]).contains(&value));
}

/// An env-sourced KEK's rotation re-wraps in several log entries; one that stopped midway
/// leaves secrets under two KEKs, which no single variable opens. With the KEK it rotated
/// from in `<VAR>_PREVIOUS` runed starts, and `rotate-kek` to the new one finishes the job.
#[test]
fn an_env_kek_rotation_that_stopped_midway_can_be_finished() {
    let (a, b) = (
        "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        "ZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmY=",
    );
    let mut d = Daemon::new(&bins());
    let rf = write(
        &d,
        "runefile.yaml",
        "crypto:\n  kek:\n    source: env\n    env-var: RUNE_TEST_KEK\n",
    );
    d.extra = vec!["--config".into(), rf];
    let keys = |d: &mut Daemon, kek: &str, previous: Option<&str>| {
        d.env.retain(|(k, _)| !k.starts_with("RUNE_TEST_KEK"));
        d.env.push(("RUNE_TEST_KEK".into(), kek.into()));
        if let Some(p) = previous {
            d.env.push(("RUNE_TEST_KEK_PREVIOUS".into(), p.into()));
        }
    };
    keys(&mut d, a, None);
    d.restart();
    let first = random_hex();
    cast_secret(&d, &first);
    assert_eq!(d.sigterm().code(), Some(0));
    // What a stopped rotation from a to b leaves: some secrets under a, newer ones under b.
    keys(&mut d, b, Some(a));
    d.restart();
    let f = write(
        &d,
        "later.yaml",
        "secret:\n  name: later\n  stringData: {k: under-b}\n",
    );
    run_ok(&d, &["cast", &f]);
    assert_eq!(d.sigterm().code(), Some(0));
    keys(&mut d, b, None);
    let out = d.refused_at_start();
    assert!(out.contains("set RUNE_TEST_KEK_PREVIOUS"), "{out}");
    // Finished: b alone opens everything.
    keys(&mut d, b, Some(a));
    d.restart();
    let new_file = write(&d, "b.kek", &format!("{b}\n"));
    let out = run_ok(&d, &["admin", "rotate-kek", "--new-kek-file", &new_file]);
    assert!(out.contains("unset RUNE_TEST_KEK_PREVIOUS"), "{out}");
    assert_eq!(d.sigterm().code(), Some(0));
    keys(&mut d, b, None);
    d.restart();
    assert!(run_ok(&d, &["get", "secret", "db", "--show-values", "-o", "json"]).contains(&first));
    assert!(run_ok(&d, &["get", "secret", "later", "--show-values", "-o", "json"]).contains("under-b"));
}

#[test]
fn the_servers_secret_limits_name_the_setting() {
    let mut d = Daemon::new(&bins());
    let rf = write(
        &d,
        "runefile.yaml",
        "storage:\n  secret-limits:\n    max-keys-per-secret: 2\n    max-value-size: 8\n",
    );
    d.extra = vec!["--config".into(), rf];
    d.restart();
    let keys = write(
        &d,
        "keys.yaml",
        "secret:\n  name: many\n  stringData: {a: '1', b: '2', c: '3'}\n",
    );
    let o = d.rune(&["cast", &keys]);
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    assert!(stderr(&o).contains("max-keys-per-secret is 2"), "{}", stderr(&o));
    let big = write(
        &d,
        "big.yaml",
        "secret:\n  name: big\n  stringData: {a: '123456789'}\n",
    );
    let o = d.rune(&["cast", &big]);
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("data.a: value is 9 bytes; storage.secret-limits.max-value-size is 8"),
        "{}",
        stderr(&o)
    );
    // Nothing of a refused cast is written.
    let o = d.rune(&["get", "secrets", "-o", "json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(!stdout(&o).contains("many") && !stdout(&o).contains("big"));
    // A bad spec never echoes its values back.
    let bad = write(
        &d,
        "bad.yaml",
        "secret:\n  name: Bad_Name\n  stringData: {a: topsecretvalue}\n",
    );
    let o = d.rune(&["cast", &bad]);
    assert_eq!(code(&o), 6);
    assert!(
        stderr(&o).contains("secret name") && !stderr(&o).contains("topsecretvalue"),
        "{}",
        stderr(&o)
    );
}
