//! The edge ingress against Debian's nginx terminating TLS in front of the same backend.
//!
//! `cargo bench -p runed --bench ingress` (Debian's nginx-light and wrk) serves one host with
//! the same certificate through runed's ingress (manual TLS secret) and through nginx (proxy_pass
//! with upstream keep-alive), and prints wrk's requests/s and p50/p99 for keep-alive
//! connections and for a new connection per request, with the ratios. nginx runs twice: with
//! TLS 1.2 and 1.3 (what runed offers, and nginx's own default since 1.23.4), the peer of the
//! headline figures; and with Debian's 1.22 defaults, which stop at TLS 1.2, so that wrk
//! resumes without a key exchange there (cheaper, and without forward secrecy).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::Duration;

use rune_chaos_tests::{free_port, wait_until, Bins, Daemon};

/// A keep-alive HTTP/1.1 backend answering `ok`.
fn backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut w = s;
                loop {
                    let mut close = false;
                    let mut any = false;
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        any = true;
                        close |= line.to_ascii_lowercase().starts_with("connection: close");
                    }
                    if !any {
                        return;
                    }
                    let conn = if close { "close" } else { "keep-alive" };
                    let resp =
                        format!("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: {conn}\r\n\r\nok");
                    if w.write_all(resp.as_bytes()).is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// wrk for 5 s: (requests/s, p50 ms, p99 ms).
fn wrk(url: &str, close: bool) -> (f64, f64, f64) {
    let mut c = Command::new("wrk");
    c.args(["-t2", "-c32", "-d5s", "--latency", "-H", "Host: bench.test"]);
    if close {
        c.args(["-H", "Connection: close"]);
    }
    let o = c.arg(url).output().expect("wrk (Debian's wrk)");
    let out = String::from_utf8_lossy(&o.stdout);
    let rate = out
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    let pct = |p: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(p))
            .and_then(|l| l.split_whitespace().nth(1))
            .map(ms)
            .unwrap_or(0.0)
    };
    (rate, pct("50%"), pct("99%"))
}

fn ms(v: &str) -> f64 {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
    let n: f64 = num.parse().unwrap_or(0.0);
    match unit {
        "us" => n / 1000.0,
        "s" => n * 1000.0,
        _ => n,
    }
}

/// nginx in front of `back` with the same certificate, `protocols` in its server block.
fn nginx(
    dir: &std::path::Path,
    back: SocketAddr,
    cert: &std::path::Path,
    key: &std::path::Path,
    protocols: &str,
) -> (std::process::Child, String) {
    let np = free_port();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes 2;\npid {p}/nginx.pid;\nerror_log {p}/nginx.err;\nevents {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {p}/cb; proxy_temp_path {p}/pt; fastcgi_temp_path {p}/ft; uwsgi_temp_path {p}/ut; scgi_temp_path {p}/st;\n\
             upstream b {{ server {back}; keepalive 64; }}\n\
             server {{\n    listen 127.0.0.1:{np} ssl http2;\n    ssl_certificate {c};\n    ssl_certificate_key {k};\n    {protocols}\n\
             location / {{ proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header Host $host;\n\
             proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; proxy_set_header X-Forwarded-Proto $scheme; }}\n  }}\n}}\n",
            p = dir.display(),
            c = cert.display(),
            k = key.display()
        ),
    )
    .unwrap();
    let child = Command::new("nginx")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx (Debian's nginx-light)");
    let url = format!("https://127.0.0.1:{np}/");
    wait_until(Duration::from_secs(10), "nginx to serve", || {
        Command::new("curl")
            .args(["-skf", "-H", "Host: bench.test", &url])
            .output()
            .is_ok_and(|o| o.stdout == b"ok")
    });
    (child, url)
}

fn main() {
    let bins = Bins::locate();
    let back = backend();
    let mut d = Daemon::new(&bins);
    d.extra.push("--dev-mode".into());
    d.restart();
    let ck = rcgen::generate_simple_self_signed(vec!["bench.test".into()]).unwrap();
    let dir = d.scratch().to_path_buf();
    let (cert, key) = (dir.join("bench.crt"), dir.join("bench.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let indent = |pem: String| pem.lines().map(|l| format!("        {l}\n")).collect::<String>();
    let spec = dir.join("bench.yaml");
    std::fs::write(
        &spec,
        format!(
            "secrets:\n  - name: bench-tls\n    stringData:\n      tls.crt: |\n{}      tls.key: |\n{}services:\n  - name: bench\n    process:\n      command: sleep\n      args: [\"100000\"]\n    scale: 1\n    ports:\n      - name: http\n        port: 80\n        targetPort: {}\n    expose:\n      port: http\n      host: bench.test\n      tls:\n        mode: manual\n        secretName: bench-tls\n",
            indent(ck.cert.pem()),
            indent(ck.signing_key.serialize_pem()),
            back.port()
        ),
    )
    .unwrap();
    let o = d.rune(&["cast", spec.to_str().unwrap(), "--timeout", "60s"]);
    assert!(o.status.success(), "cast: {}", String::from_utf8_lossy(&o.stderr));
    let runed_url = format!("https://127.0.0.1:{}/", d.ingress.1.port());
    wait_until(Duration::from_secs(30), "the ingress to serve", || {
        Command::new("curl")
            .args(["-skf", "-H", "Host: bench.test", &runed_url])
            .output()
            .is_ok_and(|o| o.stdout == b"ok")
    });

    let mut rows = vec![(
        "runed ingress (TLS 1.2 and 1.3)",
        wrk(&runed_url, false),
        wrk(&runed_url, true),
    )];
    // nginx 1.22 (Debian's) enables TLS 1.3 only when told; 1.23.4 and later do by default.
    // Its defaults make a resumed connection a TLS 1.2 one, which skips the key exchange that
    // TLS 1.3 resumption keeps for forward secrecy (X25519 on both ends), so the like-for-like
    // peer offers what runed offers; the defaults are measured beside it.
    for (name, protocols) in [
        ("nginx 1.22 (TLS 1.2 and 1.3)", "ssl_protocols TLSv1.2 TLSv1.3;"),
        ("nginx 1.22 defaults (TLS 1.2 at most)", ""),
    ] {
        let (mut nginx, url) = nginx(&dir, back, &cert, &key, protocols);
        rows.push((name, wrk(&url, false), wrk(&url, true)));
        // SIGTERM, not SIGKILL: nginx's master then stops its workers too.
        if let Ok(pid) = i32::try_from(nginx.id()) {
            // SAFETY: kill(2) has no memory effects; the pid is our child's.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let _ = nginx.wait();
    }
    println!("\n| proxy (HTTPS) | keep-alive req/s | p50 ms | p99 ms | new conn req/s | p50 ms | p99 ms |");
    println!("|---|---|---|---|---|---|---|");
    for (name, k, n) in &rows {
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} |",
            k.0, k.1, k.2, n.0, n.1, n.2
        );
    }
    println!(
        "\nratios runed/nginx (TLS 1.2 and 1.3): keep-alive {:.2}, new connection {:.2}; against nginx's defaults (TLS 1.2): {:.2}, {:.2}",
        rows[0].1 .0 / rows[1].1 .0,
        rows[0].2 .0 / rows[1].2 .0,
        rows[0].1 .0 / rows[2].1 .0,
        rows[0].2 .0 / rows[2].2 .0
    );
    common::summary(
        "ingress HTTPS keep-alive",
        "req/s",
        rows[0].1 .0,
        Some(("nginx", rows[1].1 .0)),
        true,
    );
    common::summary(
        "ingress HTTPS new connections",
        "req/s",
        rows[0].2 .0,
        Some(("nginx", rows[1].2 .0)),
        true,
    );
    common::summary(
        "ingress HTTPS new connections, nginx 1.22 defaults (TLS 1.2 only)",
        "req/s",
        rows[0].2 .0,
        Some(("nginx", rows[2].2 .0)),
        true,
    );
}
