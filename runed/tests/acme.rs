//! Automatic and manual certificates on the edge ingress, with Debian's pebble as the ACME
//! server: a certificate is issued over HTTP-01 answered by the ingress, verifies against
//! pebble's root, is renewed and hot-swapped while requests keep succeeding, and a manual TLS
//! secret is served (and a bad pair refused at cast time); orders for several hosts run side by
//! side, and the certificate of a host no longer exposed is deleted.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{bins, code, run_ok, write, Killed};
use rune_chaos_tests::{free_port, stderr, stdout, wait_until, Daemon};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(90);

fn backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                }
                let mut s = s;
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\nhello-web\n",
                );
            });
        }
    });
    addr
}

/// pebble on loopback with a certificate made here, resolving every `.test` name to 127.0.0.1
/// (and every `.hang` name to 127.0.0.2) through dnsmasq, validating HTTP-01 on `http_port`. Returns the guards, the directory URL,
/// the file of pebble's own TLS certificate and its issuing root (PEM).
fn pebble(dir: &Path, http_port: u16) -> (Vec<Killed>, String, String, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (cert, key) = (dir.join("pebble.pem"), dir.join("pebble.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let (resolver, dns) = common::dnsmasq_with(&[
        "--address=/test/127.0.0.1".to_string(),
        "--address=/hang/127.0.0.2".to_string(),
    ]);
    let (api, mgmt) = (free_port(), free_port());
    let cfg = dir.join("pebble.json");
    std::fs::write(
        &cfg,
        serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{api}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt}"),
            "certificate": cert, "privateKey": key,
            "httpPort": http_port, "tlsPort": free_port(),
            "ocspResponderURL": "", "externalAccountBindingRequired": false,
        }})
        .to_string(),
    )
    .unwrap();
    let pebble = Command::new("pebble")
        .arg("-config")
        .arg(&cfg)
        .args(["-dnsserver", &dns.to_string()])
        .env("PEBBLE_VA_NOSLEEP", "1")
        .env("PEBBLE_WFE_NONCEREJECT", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pebble (Debian's pebble)");
    let guards = vec![resolver, Killed(pebble)];
    let root = dir.join("pebble-root.pem");
    wait_until(LONG, "pebble to hand out its root", || {
        Command::new("curl")
            .args(["-sfk", "-o"])
            .arg(&root)
            .arg(format!("https://127.0.0.1:{mgmt}/roots/0"))
            .status()
            .is_ok_and(|s| s.success())
    });
    (
        guards,
        format!("https://127.0.0.1:{api}/dir"),
        cert.display().to_string(),
        root.display().to_string(),
    )
}

/// runed's flags for a dev-mode edge ordering from pebble, and `more`.
fn acme_flags(directory: String, pebble_cert: String, more: &[&str]) -> Vec<String> {
    let mut v = vec![
        "--dev-mode".to_string(),
        "--acme-directory-url".to_string(),
        directory,
        "--acme-ca-file".to_string(),
        pebble_cert,
    ];
    v.extend(more.iter().map(|s| s.to_string()));
    v
}

fn https_get(port: u16, host: &str, ca: &str) -> Result<String, String> {
    let o = Command::new("curl")
        .args(["-sS", "-m", "10", "--cacert", ca, "--resolve"])
        .arg(format!("{host}:{port}:127.0.0.1"))
        .arg(format!("https://{host}:{port}/"))
        .output()
        .unwrap();
    if o.status.success() {
        Ok(stdout(&o))
    } else {
        Err(stderr(&o))
    }
}

fn secret_version(d: &Daemon, name: &str) -> u64 {
    let o = d.rune(&["get", "secret", name, "-n", "system", "-o", "json"]);
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap_or(Value::Null);
    v["version"].as_u64().unwrap_or(0)
}

#[test]
fn acme_issues_renews_and_hot_swaps_and_manual_pairs_are_checked() {
    let back = backend();
    let mut d = Daemon::new(&bins());
    let (http, https) = d.ingress;
    let (guards, directory, pebble_cert, root) = pebble(d.scratch(), http.port());
    // Longer than pebble's certificates live: every certificate is due at once, so the test
    // sees renewals (and their hot swap) within seconds.
    d.extra = acme_flags(directory, pebble_cert, &["--acme-renew-before", "100000h"]);
    d.restart();
    let f = write(
        &d,
        "web.yaml",
        &format!(
            "service:\n  name: web\n  process:\n    command: sleep\n    args: [\"100000\"]\n  scale: 1\n  ports:\n    - name: http\n      port: 80\n      targetPort: {}\n  expose:\n    port: http\n    host: web.test\n    tls:\n      auto: true\n",
            back.port()
        ),
    );
    run_ok(&d, &["cast", &f, "--timeout", "60s"]);
    wait_until(LONG, "a certificate from pebble", || {
        https_get(https.port(), "web.test", &root).is_ok_and(|b| b == "hello-web\n")
    });
    let secret = rune_ingress::acme::cert_secret_name("web.test");
    let first = secret_version(&d, &secret);
    assert!(first >= 1, "the certificate is kept as a sealed secret");
    // Renewals replace it while requests keep verifying.
    let mut failures = Vec::new();
    wait_until(LONG, "two renewals", || {
        if let Err(e) = https_get(https.port(), "web.test", &root) {
            failures.push(e);
        }
        secret_version(&d, &secret) >= first + 2
    });
    assert!(
        failures.is_empty(),
        "requests failed during renewal: {failures:?}"
    );
    let metrics = rune_chaos_tests::http_get(d.metrics, "/metrics").unwrap().1;
    assert!(
        metrics.contains("rune_acme_certificates{state=\"ready\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("rune_acme_certificate_expiry_timestamp_seconds{host=\"web.test\"}"),
        "{metrics}"
    );
    // The ACME server gone, renewals fail: the valid certificate keeps serving, and the
    // failure is said before it expires, not after.
    drop(guards);
    wait_until(LONG, "the failed renewal to be said", || {
        stdout(&d.rune(&["get", "ingresses", "-o", "json"])).contains("renewal failed, retrying")
    });
    assert_eq!(
        https_get(https.port(), "web.test", &root).as_deref(),
        Ok("hello-web\n")
    );

    // Manual mode: the cast pair is served; a pair that does not match is refused at cast.
    let ck = rcgen::generate_simple_self_signed(vec!["manual.test".into()]).unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["x.test".into()]).unwrap();
    let indent = |pem: String| pem.lines().map(|l| format!("      {l}\n")).collect::<String>();
    let secret_yaml = |key: String| {
        format!(
            "secret:\n  name: mtls\n  stringData:\n    tls.crt: |\n{}    tls.key: |\n{}",
            indent(ck.cert.pem()),
            indent(key)
        )
    };
    let bad = write(&d, "bad.yaml", &secret_yaml(other.signing_key.serialize_pem()));
    let o = d.rune(&["cast", &bad]);
    assert_ne!(code(&o), 0);
    assert!(stderr(&o).contains("do not belong together"), "{}", stderr(&o));
    let good = write(&d, "good.yaml", &secret_yaml(ck.signing_key.serialize_pem()));
    run_ok(&d, &["cast", &good]);
    let ca = d.scratch().join("manual.pem");
    std::fs::write(&ca, ck.cert.pem()).unwrap();
    let f = write(
        &d,
        "manual.yaml",
        &format!(
            "service:\n  name: manual\n  process:\n    command: sleep\n    args: [\"100000\"]\n  scale: 1\n  ports:\n    - name: http\n      port: 80\n      targetPort: {}\n  expose:\n    port: http\n    host: manual.test\n    tls:\n      mode: manual\n      secretName: mtls\n",
            back.port()
        ),
    );
    run_ok(&d, &["cast", &f, "--timeout", "60s"]);
    wait_until(LONG, "the manual certificate to be served", || {
        https_get(https.port(), "manual.test", ca.to_str().unwrap()).is_ok_and(|b| b == "hello-web\n")
    });
    // Taken away and put back at once (between two passes of the certificate loop): the
    // manual pair is served again, not a self-signed stand-in.
    let bare = write(
        &d,
        "bare.yaml",
        &format!(
            "service:\n  name: manual\n  process:\n    command: sleep\n    args: [\"100000\"]\n  scale: 1\n  ports:\n    - name: http\n      port: 80\n      targetPort: {}\n",
            back.port()
        ),
    );
    run_ok(&d, &["cast", &bare, "--detach"]);
    run_ok(&d, &["cast", &f, "--detach"]);
    wait_until(LONG, "the manual certificate to be served again", || {
        https_get(https.port(), "manual.test", ca.to_str().unwrap()).is_ok_and(|b| b == "hello-web\n")
    });
    // As the original prints them: NAMESPACE SERVICE HOST TLS CERT EXPIRES.
    let web = ingress_row(&d, "web.test");
    assert_eq!(
        web[..5],
        ["default", "web", "web.test", "acme", "ready"],
        "{web:?}"
    );
    assert!(web[5].ends_with('d'), "{web:?}");
    let manual = ingress_row(&d, "manual.test");
    assert_eq!(manual[3..5], ["manual", "ready"], "{manual:?}");
    // rcgen's default validity runs to the year 4096.
    assert!(
        manual[5]
            .trim_end_matches('d')
            .parse::<u64>()
            .is_ok_and(|d| d > 365_000),
        "{manual:?}"
    );
}

fn acme_service(name: &str, host: &str, port: u16) -> String {
    format!(
        "service:\n  name: {name}\n  process:\n    command: sleep\n    args: [\"100000\"]\n  scale: 1\n  ports:\n    - name: http\n      port: 80\n      targetPort: {port}\n  expose:\n    port: http\n    host: {host}\n    tls:\n      auto: true\n"
    )
}

/// The cells of `rune get ingresses` for `host`.
fn ingress_row(d: &Daemon, host: &str) -> Vec<String> {
    let out = stdout(&d.rune(&["get", "ingresses"]));
    out.lines()
        .find(|l| l.split_whitespace().nth(2) == Some(host))
        .map(|l| l.split_whitespace().map(String::from).collect())
        .unwrap_or_default()
}

#[test]
fn orders_run_side_by_side_and_unexposed_certificates_are_deleted() {
    let back = backend();
    let mut d = Daemon::new(&bins());
    let (http, https) = d.ingress;
    // Where `.hang` names resolve: connections are accepted and never answered, so pebble's
    // check of such a host hangs until its own timeout (15 s).
    let tarpit = TcpListener::bind(("127.0.0.2", http.port())).unwrap();
    let held = Arc::new(AtomicUsize::new(0));
    let h = held.clone();
    std::thread::spawn(move || {
        let mut streams = Vec::new();
        for s in tarpit.incoming().flatten() {
            streams.push(s);
            h.fetch_add(1, Ordering::SeqCst);
        }
    });
    let (_guards, directory, pebble_cert, root) = pebble(d.scratch(), http.port());
    d.extra = acme_flags(directory, pebble_cert, &["--acme-keep-unexposed", "0s"]);
    d.restart();
    let slow = write(&d, "slow.yaml", &acme_service("slow", "slow.hang", back.port()));
    run_ok(&d, &["cast", &slow, "--timeout", "60s"]);
    wait_until(LONG, "pebble to be checking slow.hang", || {
        held.load(Ordering::SeqCst) > 0
    });
    // While that order hangs, another host's order goes through.
    let fast = write(&d, "fast.yaml", &acme_service("fast", "fast.test", back.port()));
    run_ok(&d, &["cast", &fast, "--timeout", "60s"]);
    wait_until(LONG, "a certificate for fast.test", || {
        https_get(https.port(), "fast.test", &root).is_ok_and(|b| b == "hello-web\n")
    });
    let row = ingress_row(&d, "slow.hang");
    assert_eq!(row.get(4).map(String::as_str), Some("pending"), "{row:?}");
    let row = ingress_row(&d, "fast.test");
    assert_eq!(
        row.get(3..5),
        Some(&["acme".to_string(), "ready".to_string()][..]),
        "{row:?}"
    );
    assert!(
        row.get(5)
            .is_some_and(|e| e.ends_with('d') && e[..e.len() - 1].parse::<u32>().is_ok()),
        "{row:?}"
    );

    // Not exposed any more: no longer served, and its stored certificate is deleted.
    let secret = rune_ingress::acme::cert_secret_name("fast.test");
    assert!(secret_version(&d, &secret) >= 1);
    let plain = write(
        &d,
        "fast.yaml",
        &format!(
            "service:\n  name: fast\n  process:\n    command: sleep\n    args: [\"100000\"]\n  scale: 1\n  ports:\n    - name: http\n      port: 80\n      targetPort: {}\n",
            back.port()
        ),
    );
    run_ok(&d, &["cast", &plain, "--detach"]);
    wait_until(LONG, "the certificate of fast.test to be deleted", || {
        secret_version(&d, &secret) == 0
    });
    let e = https_get(https.port(), "fast.test", &root).unwrap_err();
    assert!(e.contains("certificate"), "{e}");
}
