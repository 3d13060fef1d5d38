//! The edge ingress end to end (dev mode has the edge role): routing by host over HTTP and
//! HTTPS (HTTP/1.1 and HTTP/2), the forwarded headers, 404 and 503, an upgraded connection,
//! the opt-in redirect to HTTPS, and one service per host (a second claim refused at cast).
//! The backend is a server in this test that a process service's port points at, so the test
//! can see exactly what the ingress sent.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{bins, code, failpoint, fall_behind, run_ok, write};
use rune_chaos_tests::{stderr, stdout, wait_until, Daemon};

const LONG: Duration = Duration::from_secs(60);

/// Answers `hello-web` (or switches to an echo protocol on `Upgrade: echo`) and keeps every
/// request head it saw.
fn backend() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let heads = seen.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let heads = heads.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push_str(&line.to_ascii_lowercase());
                }
                heads.lock().unwrap().push(head.clone());
                let mut s = s;
                if head.contains("upgrade: echo") {
                    let _ = s.write_all(
                        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
                    );
                    let mut buf = [0u8; 64];
                    while let Ok(n) = r.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                } else {
                    let _ = s.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\nhello-web\n",
                    );
                }
            });
        }
    });
    (addr, seen)
}

/// A runed in dev mode (which has the edge role).
fn dev_daemon() -> Daemon {
    dev_daemon_with(&[])
}

/// A runed in dev mode with more flags.
fn dev_daemon_with(flags: &[&str]) -> Daemon {
    let mut d = Daemon::new(&bins());
    d.extra.push("--dev-mode".into());
    d.extra.extend(flags.iter().map(|f| f.to_string()));
    d.restart();
    d
}

/// Upgrades a connection to web.test's `path` to the backend's echo protocol through the
/// ingress at `http`, checks that a line comes back, and hands the connection over (reads
/// time out after 30 s).
fn upgraded_echo(http: SocketAddr, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let ask =
        format!("GET {path} HTTP/1.1\r\nHost: web.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n");
    s.write_all(ask.as_bytes()).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        assert!(
            r.read_line(&mut head).unwrap() > 0,
            "closed before the switch: {head}"
        );
    }
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(b"ping\n").unwrap();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "ping\n");
    s
}

/// Reads from `s` until the server closes it (true) or `s`'s read timeout passes (false).
fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(e) => break e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

/// Holds an HTTP/2 connection (prior knowledge, no TLS) open without a request, answering the
/// server's pings and settings as a live client does, until the server closes it or `within`
/// passes: (closed, GOAWAY received, pings answered).
fn idle_http2_client(addr: SocketAddr, within: Duration) -> (bool, bool, usize) {
    let deadline = std::time::Instant::now() + within;
    let mut s = TcpStream::connect(addr).unwrap();
    // Short reads, so that the pings the server sends do not carry it past the deadline.
    s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    // An empty SETTINGS frame.
    s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).unwrap();
    let (mut goaway, mut pings) = (false, 0);
    loop {
        if std::time::Instant::now() > deadline {
            return (false, goaway, pings);
        }
        let mut head = [0u8; 9];
        match s.read(&mut head[..1]) {
            Ok(0) => return (true, goaway, pings),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => return (true, goaway, pings),
        }
        // The rest of a frame follows its first byte at once; a failure now is the close.
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        if s.read_exact(&mut head[1..]).is_err() {
            return (true, goaway, pings);
        }
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        if s.read_exact(&mut payload).is_err() {
            return (true, goaway, pings);
        }
        s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let (kind, flags) = (head[3], head[4]);
        let ack = flags & 1 == 1;
        match kind {
            4 if !ack => s.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).unwrap(),
            // Pings after the GOAWAY are the graceful shutdown's own, not keep-alives.
            6 if !ack && !goaway => {
                let mut pong = vec![0, 0, 8, 6, 1, 0, 0, 0, 0];
                pong.extend_from_slice(&payload);
                if s.write_all(&pong).is_ok() {
                    pings += 1;
                }
            }
            6 if !ack => {
                let mut pong = vec![0, 0, 8, 6, 1, 0, 0, 0, 0];
                pong.extend_from_slice(&payload);
                let _ = s.write_all(&pong);
            }
            7 => goaway = true,
            _ => {}
        }
    }
}

fn curl(args: &[&str]) -> (String, String) {
    let o = Command::new("curl")
        .args(["-sS", "-m", "10"])
        .args(args)
        .output()
        .unwrap();
    (stdout(&o), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn routes_by_host_over_http_and_https() {
    let (back, seen) = backend();
    let d = dev_daemon();
    let (http, https) = d.ingress;
    let f = write(
        &d,
        "web.yaml",
        &format!(
            "service:\n  name: web\n  process:\n    command: sleep\n    args: [\"100000\"]\n  scale: 1\n  ports:\n    - name: http\n      port: 80\n      targetPort: {}\n  expose:\n    port: http\n    host: web.test\n",
            back.port()
        ),
    );
    run_ok(&d, &["cast", &f, "--timeout", "60s"]);
    let url = format!("http://{http}/");
    wait_until(LONG, "the ingress to route web.test", || {
        curl(&["-H", "Host: web.test", &url]).0 == "hello-web\n"
    });
    let head = seen.lock().unwrap().last().cloned().unwrap();
    for h in [
        "x-forwarded-for: 127.0.0.1",
        "x-forwarded-proto: http",
        "x-forwarded-host: web.test",
        "host: web.test",
    ] {
        assert!(head.contains(h), "{h} missing in\n{head}");
    }
    // Hop-by-hop headers stay on the client's hop.
    let (body, _) = curl(&[
        "-H",
        "Host: web.test",
        "-H",
        "Connection: close, x-hop",
        "-H",
        "x-hop: 1",
        &url,
    ]);
    assert_eq!(body, "hello-web\n");
    let head = seen.lock().unwrap().last().cloned().unwrap();
    assert!(
        !head.contains("x-hop") && !head.contains("connection: close"),
        "{head}"
    );

    // Unknown host: 404 with a short plain body.
    let (body, _) = curl(&["-H", "Host: nope.test", "-w", " %{http_code}", &url]);
    assert_eq!(body, "no service is exposed as nope.test\n 404");

    // HTTPS by SNI, HTTP/1.1 and HTTP/2; a host without a certificate of its own gets a
    // self-signed one (hence -k).
    let resolve = format!("web.test:{}:127.0.0.1", https.port());
    let surl = format!("https://web.test:{}/", https.port());
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let (out, err) = curl(&["-k", flag, "--resolve", &resolve, "-w", " %{http_version}", &surl]);
        assert_eq!(out, format!("hello-web\n {version}"), "{err}");
    }
    let head = seen.lock().unwrap().last().cloned().unwrap();
    assert!(head.contains("x-forwarded-proto: https"), "{head}");
    // The server's suite order decides: AES-128-GCM even for a client that lists AES-256 first;
    // a client that offers only ChaCha20 is still served.
    for (offer, chosen) in [
        (
            "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256",
            "TLS_AES_128_GCM_SHA256",
        ),
        ("TLS_CHACHA20_POLY1305_SHA256", "TLS_CHACHA20_POLY1305_SHA256"),
    ] {
        let (out, err) = curl(&["-kv", "--tls13-ciphers", offer, "--resolve", &resolve, &surl]);
        assert_eq!(out, "hello-web\n", "{err}");
        let line = err
            .lines()
            .find(|l| l.contains("SSL connection using"))
            .unwrap_or_default();
        assert!(line.contains(chosen), "offered {offer}, expected {chosen}: {err}");
    }
    // A name nobody exposes still gets a handshake (one shared fallback certificate) and a 404.
    let other = format!("other.test:{}:127.0.0.1", https.port());
    let (out, err) = curl(&[
        "-k",
        "--resolve",
        &other,
        "-w",
        " %{http_code}",
        &format!("https://other.test:{}/", https.port()),
    ]);
    assert_eq!(out, "no service is exposed as other.test\n 404", "{err}");

    // An upgraded connection is spliced both ways.
    upgraded_echo(http, "/ws");

    // No ready backend: 503.
    run_ok(&d, &["scale", "web", "0", "--timeout", "60s"]);
    wait_until(LONG, "503 without a backend", || {
        curl(&[
            "-H",
            "Host: web.test",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url,
        ])
        .0 == "503"
    });
    let metrics = rune_chaos_tests::http_get(d.metrics, "/metrics").unwrap().1;
    assert!(
        metrics.contains("rune_ingress_requests_total{host=\"web.test\",status=\"200\"}"),
        "{metrics}"
    );
    // Client-chosen hosts do not become labels.
    assert!(
        metrics.contains("rune_ingress_requests_total{host=\"unknown\",status=\"404\"} 2"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("nope.test") && !metrics.contains("other.test"),
        "{metrics}"
    );
}

/// The ingress is a projection like the others: while its routes lag the log past the stale
/// budget, requests get 503 with the reason; once it catches up, they are routed again.
#[test]
fn stale_routes_fail_closed_and_recover() {
    let (back, _) = backend();
    let mut d = Daemon::new(&bins());
    d.extra = vec![
        "--dev-mode".into(),
        "--enable-failpoints".into(),
        "--stale-budget".into(),
        "1s".into(),
    ];
    d.restart();
    let (http, _) = d.ingress;
    let f = write(
        &d,
        "web.yaml",
        &format!(
            "service:\n  name: web\n  process:\n    command: sleep\n    args: [\"100000\"]\n  scale: 1\n  ports:\n    - name: http\n      port: 80\n      targetPort: {}\n  expose:\n    port: http\n    host: web.test\n",
            back.port()
        ),
    );
    run_ok(&d, &["cast", &f, "--timeout", "60s"]);
    let url = format!("http://{http}/");
    let get = || curl(&["-H", "Host: web.test", "-w", " %{http_code}", &url]).0;
    wait_until(LONG, "the ingress to route web.test", || {
        get() == "hello-web\n 200"
    });
    fall_behind(&d, "ingress");
    wait_until(LONG, "requests to be refused while the routes are stale", || {
        get() == "the ingress's routes are behind the state; try again shortly\n 503"
    });
    let (_, verbose) = rune_chaos_tests::http_get(d.http, "/healthz?verbose").unwrap();
    assert!(verbose.contains("[-]ingress"), "{verbose}");
    // Hosts come from clients: while stale, one nobody exposed is counted under the shared
    // label, not under a label of its own (which any client could multiply).
    let (code, _) = curl(&[
        "-H",
        "Host: nobody-exposed-this.test",
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        &url,
    ]);
    assert_eq!(code, "503");
    let (_, metrics) = rune_chaos_tests::http_get(d.metrics, "/metrics").unwrap();
    assert!(!metrics.contains("nobody-exposed-this.test"), "{metrics}");
    assert!(
        metrics.contains("rune_ingress_requests_total{host=\"web.test\",status=\"503\"}"),
        "{metrics}"
    );
    failpoint(&d, "ingress-tail-pause", false);
    wait_until(LONG, "the ingress to catch up and route again", || {
        get() == "hello-web\n 200"
    });
}

/// One TLS 1.3 handshake by openssl's client: `New` or `Reused`, and how many session tickets
/// it was sent. The session it ends with is kept in `file` (read back first when `resume`).
fn tls_session(port: u16, host: &str, file: &std::path::Path, resume: bool) -> (String, usize) {
    let _ = std::fs::remove_file(file.with_extension("new"));
    let mut c = Command::new("openssl");
    c.args([
        "s_client",
        "-tls1_3",
        "-connect",
        &format!("127.0.0.1:{port}"),
        "-servername",
        host,
    ])
    .arg("-msg")
    .arg("-sess_out")
    .arg(file.with_extension("new"));
    if resume {
        c.arg("-sess_in").arg(file);
    }
    let mut child = c
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl (Debian's openssl)");
    // The tickets come after the handshake: wait until the session holding one is written.
    wait_until(LONG, "openssl to keep a session", || {
        std::fs::metadata(file.with_extension("new")).is_ok_and(|m| m.len() > 0)
    });
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    std::fs::rename(file.with_extension("new"), file).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let kind = text
        .lines()
        .find_map(|l| l.split(',').next().filter(|w| *w == "New" || *w == "Reused"))
        .unwrap_or("no handshake")
        .to_string();
    let tickets = text
        .lines()
        .filter(|l| l.starts_with("<<<") && l.ends_with("NewSessionTicket"))
        .count();
    (kind, tickets)
}

fn exposed(name: &str, port: u16, expose: &str) -> String {
    format!(
        "service:\n  name: {name}\n  process:\n    command: sleep\n    args: [\"100000\"]\n  scale: 1\n  ports:\n    - name: http\n      port: 80\n      targetPort: {port}\n  expose: {expose}\n"
    )
}

/// `expose.tls.redirect` sends plain HTTP to HTTPS (ACME's HTTP-01 path excepted); a second
/// service claiming a host is refused at cast, naming the field and the holder, and may take
/// the host once the holder lets it go; `rune get ingresses` prints the original's columns.
#[test]
fn redirects_to_https_and_one_host_routes_to_one_service() {
    let (back, _) = backend();
    let d = dev_daemon();
    let (http, https) = d.ingress;
    let f = write(
        &d,
        "web.yaml",
        &exposed(
            "web",
            back.port(),
            "{port: http, host: web.test, tls: {redirect: true}}",
        ),
    );
    run_ok(&d, &["cast", &f, "--timeout", "60s"]);
    let url = format!("http://{http}/a/b?c=1");
    let head = || {
        curl(&[
            "-H",
            "Host: web.test",
            "-w",
            "%{http_code} %{redirect_url}",
            "-o",
            "/dev/null",
            &url,
        ])
        .0
    };
    let want = format!("308 https://web.test:{}/a/b?c=1", https.port());
    wait_until(LONG, "plain HTTP to be redirected", || head() == want);
    // HTTP-01 challenges are answered over HTTP whatever the host asks.
    let (body, _) = curl(&[
        "-H",
        "Host: web.test",
        &format!("http://{http}/.well-known/acme-challenge/nope"),
    ]);
    assert_eq!(body, "no such challenge\n");
    // Following the redirect reaches the backend over HTTPS.
    let (out, err) = curl(&[
        "-kL",
        "--resolve",
        &format!("web.test:{}:127.0.0.1", https.port()),
        "--resolve",
        &format!("web.test:{}:127.0.0.1", http.port()),
        &format!("http://web.test:{}/", http.port()),
    ]);
    assert_eq!(out, "hello-web\n", "{err}");
    // A returning client resumes its TLS 1.3 session from a ticket: no full handshake. One
    // ticket per handshake, as Go's server sends.
    assert_eq!(
        tls_session(https.port(), "web.test", &d.scratch().join("sess.pem"), false),
        ("New".to_string(), 1)
    );
    assert_eq!(
        tls_session(https.port(), "web.test", &d.scratch().join("sess.pem"), true),
        ("Reused".to_string(), 1)
    );
    let table = run_ok(&d, &["get", "ingresses"]);
    let row: Vec<&str> = table
        .lines()
        .find(|l| l.contains("web.test"))
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        row,
        ["default", "web", "web.test", "self-signed", "self-signed", "-"],
        "{table}"
    );

    // A second service claiming the host (in another case) is refused whole.
    let g = write(
        &d,
        "other.yaml",
        &exposed("other", back.port(), "{port: http, host: WEB.test}"),
    );
    for dry in [false, true] {
        let mut args = vec!["cast", g.as_str(), "--detach"];
        if dry {
            args.push("--dry-run");
        }
        let o = d.rune(&args);
        assert_eq!(code(&o), 5, "a conflict (dry run: {dry}): {}", stderr(&o));
        let e = stderr(&o);
        assert!(
            e.contains("expose.host") && e.contains("web.test") && e.contains("default/web"),
            "{e}"
        );
    }
    let o = d.rune(&["get", "service", "other"]);
    assert_ne!(code(&o), 0, "nothing of the refused cast is kept: {}", stdout(&o));
    // A host that can never match a request is refused at cast, naming the field.
    let bad = write(
        &d,
        "bad.yaml",
        &exposed("bad", back.port(), "{port: http, host: \"https://bad.test\"}"),
    );
    let o = d.rune(&["cast", &bad, "--detach"]);
    assert_ne!(code(&o), 0);
    assert!(
        stderr(&o).contains("expose.host") && stderr(&o).contains("is a URL"),
        "{}",
        stderr(&o)
    );
    // Two services of one cast claiming one host: the second is refused, naming the first.
    let two = write(
        &d,
        "two.yaml",
        &format!(
            "{}---\n{}",
            exposed("two-a", back.port(), "{port: http, host: dup.test}"),
            exposed("two-b", back.port(), "{port: http, host: dup.test}")
        ),
    );
    let o = d.rune(&["cast", &two, "--detach"]);
    assert_eq!(code(&o), 5, "{}", stderr(&o));
    assert!(
        stderr(&o)
            .contains("default/two-b: expose.host: dup.test is already exposed by service default/two-a"),
        "{}",
        stderr(&o)
    );
    // In one cast, web moves to another host and other takes this one (in that order, as
    // apply sees them); redirects stay per host.
    let both = write(
        &d,
        "both.yaml",
        &format!(
            "{}---\n{}",
            exposed("web", back.port(), "{port: http, host: www.test}"),
            exposed("other", back.port(), "{port: http, host: WEB.test}")
        ),
    );
    run_ok(&d, &["cast", &both, "--timeout", "60s"]);
    wait_until(LONG, "web.test to be served over HTTP by other", || {
        curl(&[
            "-H",
            "Host: web.test",
            "-w",
            " %{http_code}",
            &format!("http://{http}/"),
        ])
        .0 == "hello-web\n 200"
    });
}

/// An endpoint whose server stopped while its instance runs on (no readiness probe here to
/// take it out) refuses connections: a request without a body goes on to the next endpoint
/// instead of answering 502, as nginx's `proxy_next_upstream error` does.
#[test]
fn a_request_steps_over_an_endpoint_that_refuses_the_connection() {
    common::image();
    let d = dev_daemon();
    let (http, _) = d.ingress;
    // httpd without -f goes to the background; the instance lives on in `sleep`.
    let f = write(
        &d,
        "web.yaml",
        "service:\n  name: web\n  image: busybox\n  command: [\"sh\", \"-c\", \"echo $RUNE_INSTANCE_ID > /tmp/index.html; httpd -p 8080 -h /tmp; exec sleep 100000\"]\n  scale: 2\n  ports:\n    - name: http\n      port: 80\n      targetPort: 8080\n  expose:\n    port: http\n    host: web.test\n",
    );
    run_ok(&d, &["cast", &f, "--timeout", "120s"]);
    let url = format!("http://{http}/");
    let get = || curl(&["-H", "Host: web.test", "-w", " %{http_code}", &url]).0;
    let mut seen = std::collections::BTreeSet::new();
    wait_until(LONG, "both instances to answer through the ingress", || {
        let got = get();
        if let Some(id) = got.strip_suffix("\n 200") {
            seen.insert(id.to_string());
        }
        seen.len() == 2
    });
    let containers = Command::new("docker")
        .args(["ps", "-q", "--filter", &format!("label=rune.node={}", d.node)])
        .output()
        .unwrap();
    let containers = stdout(&containers);
    let victim = containers.split_whitespace().next().expect("a container of web");
    let killed = Command::new("docker")
        .args(["exec", victim, "killall", "httpd"])
        .output()
        .unwrap();
    assert!(killed.status.success(), "{}", stderr(&killed));
    let ip = Command::new("docker")
        .args([
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            victim,
        ])
        .output()
        .unwrap();
    let at: SocketAddr = format!("{}:8080", stdout(&ip).trim()).parse().unwrap();
    wait_until(LONG, "the stopped server to refuse connections", || {
        TcpStream::connect_timeout(&at, Duration::from_secs(1)).is_err()
    });
    let endpoints = || -> usize {
        let v: serde_json::Value =
            serde_json::from_str(&run_ok(&d, &["get", "endpoints", "web", "-o", "json"])).unwrap();
        v["endpoints"].as_array().map_or(0, Vec::len)
    };
    // Every request lands on the instance still serving, though both stay endpoints.
    let answers: Vec<String> = (0..20).map(|_| get()).collect();
    assert_eq!(
        endpoints(),
        2,
        "the stopped server's instance is still an endpoint"
    );
    let survivors: std::collections::BTreeSet<&String> = answers.iter().collect();
    assert_eq!(survivors.len(), 1, "{answers:?}");
    assert!(answers[0].ends_with("\n 200"), "{answers:?}");
}

/// What clients send is taken as a web server would: a host with the root's trailing dot is
/// the host, a route's path prefix holds whole segments, dot segments are refused rather than
/// passed to a backend that would resolve them out of the route, an HTTP/2 client's separate
/// cookie fields reach the HTTP/1.1 backend as one line, and a client that never finishes its
/// request head, holds an HTTP/2 connection with no request (however it answers pings) or an
/// upgraded connection that carries nothing is closed instead of holding it for ever (the
/// timeouts set short here, each in its own flag).
#[test]
fn requests_are_read_as_web_servers_do() {
    let (back, seen) = backend();
    let d = dev_daemon_with(&[
        "--ingress-header-timeout",
        "1s",
        "--ingress-idle-timeout",
        "6s",
        "--ingress-tunnel-timeout",
        "2s",
    ]);
    let (http, https) = d.ingress;
    let f = write(
        &d,
        "web.yaml",
        &exposed("web", back.port(), "{port: http, host: web.test, path: /api}"),
    );
    run_ok(&d, &["cast", &f, "--timeout", "60s"]);
    let url = |path: &str| format!("http://{http}{path}");
    wait_until(LONG, "the ingress to route web.test", || {
        curl(&["-H", "Host: web.test", &url("/api")]).0 == "hello-web\n"
    });
    let status = |host: &str, path: &str| {
        curl(&[
            "--path-as-is",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &format!("Host: {host}"),
            &url(path),
        ])
        .0
    };
    assert_eq!(status("web.test.", "/api/x"), "200");
    assert_eq!(status("web.test", "/apiary"), "404");
    assert_eq!(status("web.test", "/api/../admin"), "400");
    assert_eq!(status("web.test", "/api/%2e%2e/admin"), "400");

    let resolve = format!("web.test:{}:127.0.0.1", https.port());
    let (out, err) = curl(&[
        "-k",
        "--http2",
        "--resolve",
        &resolve,
        "-H",
        "cookie: a=1",
        "-H",
        "cookie: b=2",
        &format!("https://web.test:{}/api", https.port()),
    ]);
    assert_eq!(out, "hello-web\n", "{err}");
    let head = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(head.matches("cookie:").count(), 1, "{head}");
    assert!(head.contains("cookie: a=1; b=2"), "{head}");

    // Nothing at all, or half a request head, then nothing: closed once the header timeout
    // (1 s here) is out, both waited out side by side. Given up on before the idle timeout
    // (6 s), which would close them too.
    let silent = [&b""[..], b"GET /api HTTP/1.1\r\nHost: web.test\r\n"].map(|sent| {
        let mut s = std::net::TcpStream::connect(http).unwrap();
        s.write_all(sent).unwrap();
        std::thread::spawn(move || {
            s.set_read_timeout(Some(Duration::from_secs(4))).unwrap();
            closed_by_server(&mut s)
        })
    });
    for (what, t) in ["nothing", "half a head"].iter().zip(silent) {
        assert!(t.join().unwrap(), "a client that sent {what} was kept");
    }

    // An HTTP/2 client that sends no request but answers every ping (one a second here) is
    // told GOAWAY and closed once the idle timeout (6 s) is out.
    let (closed, goaway, pings) = idle_http2_client(http, Duration::from_secs(30));
    assert!(
        closed,
        "an idle HTTP/2 connection was kept ({pings} pings answered)"
    );
    assert!(goaway, "closed without a GOAWAY");
    assert!(
        pings > 0,
        "the server never pinged: the idle timeout was not put to the test"
    );

    // An upgraded connection that carries a line every half second outlives the tunnel
    // timeout (2 s) twice over; once it carries nothing, it is closed.
    let mut s = upgraded_echo(http, "/api/ws");
    let mut r = BufReader::new(s.try_clone().unwrap());
    for i in 0..8 {
        // The pace of a chatty client, not a wait for the server.
        std::thread::sleep(Duration::from_millis(500));
        s.write_all(format!("line {i}\n").as_bytes()).unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert_eq!(line, format!("line {i}\n"), "a busy upgraded connection was cut");
    }
    assert!(closed_by_server(&mut s), "an idle upgraded connection was kept");
}

/// A websocket counts under `--ingress-max-connections` for as long as it is open, though
/// hyper hands it over and ends its own connection task at the switch.
#[test]
fn upgraded_connections_keep_their_place_under_the_connection_cap() {
    let (back, _) = backend();
    let d = dev_daemon_with(&["--ingress-max-connections", "2"]);
    let (http, _) = d.ingress;
    let f = write(
        &d,
        "web.yaml",
        &exposed("web", back.port(), "{port: http, host: web.test}"),
    );
    run_ok(&d, &["cast", &f, "--timeout", "60s"]);
    wait_until(LONG, "the ingress to route web.test", || {
        curl(&["-H", "Host: web.test", &format!("http://{http}/")]).0 == "hello-web\n"
    });
    // Two websockets fill a cap of two: hyper is done with their connections, the tunnels
    // are not.
    let first = upgraded_echo(http, "/ws");
    let _second = upgraded_echo(http, "/ws");
    let mut third = TcpStream::connect(http).unwrap();
    third
        .write_all(b"GET / HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n")
        .unwrap();
    let metric = |name: &str| {
        let (_, body) = rune_chaos_tests::http_get(d.metrics, "/metrics").unwrap();
        body.lines()
            .filter(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with([' ', '{'])))
            .find_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
    };
    // The two tunnels are what the metrics count (the third waits for a place).
    assert_eq!(metric("rune_ingress_connections_limit"), Some(2));
    assert_eq!(metric("rune_ingress_connections"), Some(2));
    third.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut byte = [0u8; 1];
    let early = third.read(&mut byte);
    assert!(
        matches!(&early, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "a third connection was served while two websockets held a cap of two: {early:?}"
    );
    // Closing one tunnel lets the waiting connection in.
    drop(first);
    third.set_read_timeout(Some(LONG)).unwrap();
    let mut answer = String::new();
    third.read_to_string(&mut answer).unwrap();
    assert!(answer.contains("hello-web"), "{answer}");
}
