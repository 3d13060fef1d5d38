//! The data plane against a direct connection and Debian's haproxy, side by side on this
//! machine, and the time to program nftables.
//!
//! `cargo bench -p runed --bench dataplane` (root, Debian's haproxy and nftables) runs everything
//! inside a network namespace of its own, with runed in production mode, so "through the VIP" is
//! the real path: the endpoint runs on this node and the service has no policy, so nftables
//! forwards `VIP:80` to it itself (DNAT). The proxy's own path (redirect → proxy → endpoint) is
//! measured through its port. The endpoint is a server in this process that a process
//! service's port points at; haproxy (mode tcp, one server) fronts the same server. This host
//! reaches the VIP by its default route, a veth of MTU 1500 as a host's NIC would be: the
//! client's MSS follows that route's MTU, while "direct" (127.0.0.1) uses loopback's. So the
//! VIP's long streams are measured once more with that route's MTU raised to loopback's, to
//! tell the data plane's cost from the route's. It prints:
//! - short connections (connect, 64 B request, 64 B answer, close) from 8 clients for 5 s:
//!   connections/s and p50/p99 of each connection;
//! - long connections: 4 streams downloading for 5 s (MiB/s), and one connection's 64 B
//!   round trips (p50/p99);
//!
//! The time to program nftables is `--bench nft`.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rune_chaos_tests::{free_port, stdout, wait_until, Bins, Daemon};

const RUN: Duration = Duration::from_secs(5);

/// The endpoint: `E` then echo 64 B messages; `D` then an endless download.
fn backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || serve(s));
        }
    });
    addr
}

fn serve(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut mode = [0u8; 1];
    if s.read_exact(&mut mode).is_err() {
        return;
    }
    if mode[0] == b'D' {
        let chunk = vec![7u8; 64 * 1024];
        while s.write_all(&chunk).is_ok() {}
        return;
    }
    let mut buf = [0u8; 64];
    while s.read_exact(&mut buf).is_ok() {
        if s.write_all(&buf).is_err() {
            return;
        }
    }
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1));
    v.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

/// 8 clients, one exchange per connection: (connections/s, p50 µs, p99 µs).
fn short(target: SocketAddr) -> (f64, f64, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                let msg = [1u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let Ok(mut s) = TcpStream::connect(target) else {
                        continue;
                    };
                    let _ = s.set_nodelay(true);
                    let mut buf = [0u8; 64];
                    if s.write_all(b"E").is_ok()
                        && s.write_all(&msg).is_ok()
                        && s.read_exact(&mut buf).is_ok()
                    {
                        lat.push(t.elapsed());
                    }
                }
                lat
            })
        })
        .collect();
    std::thread::sleep(RUN);
    stop.store(true, Ordering::Relaxed);
    let mut all: Vec<Duration> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let rate = all.len() as f64 / RUN.as_secs_f64();
    (rate, pct(&mut all, 0.5), pct(&mut all, 0.99))
}

/// 4 downloading streams: MiB/s.
fn download(target: SocketAddr) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (stop, total) = (stop.clone(), total.clone());
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(target).unwrap();
                s.write_all(b"D").unwrap();
                let mut buf = vec![0u8; 256 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            total.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let start = total.load(Ordering::Relaxed);
    std::thread::sleep(RUN);
    let bytes = total.load(Ordering::Relaxed) - start;
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    bytes as f64 / RUN.as_secs_f64() / (1024.0 * 1024.0)
}

/// One connection, 64 B round trips: (p50 µs, p99 µs).
fn round_trips(target: SocketAddr) -> (f64, f64) {
    let mut s = TcpStream::connect(target).unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(b"E").unwrap();
    let msg = [2u8; 64];
    let mut buf = [0u8; 64];
    let mut lat = Vec::new();
    for _ in 0..20_000 {
        let t = Instant::now();
        s.write_all(&msg).unwrap();
        s.read_exact(&mut buf).unwrap();
        lat.push(t.elapsed());
    }
    (pct(&mut lat, 0.5), pct(&mut lat, 0.99))
}

fn haproxy(dir: &std::path::Path, backend: SocketAddr) -> (std::process::Child, SocketAddr) {
    let port = free_port();
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
             frontend f\n  bind 127.0.0.1:{port}\n  default_backend b\nbackend b\n  balance roundrobin\n  server s1 {backend}\n"
        ),
    )
    .unwrap();
    let child = Command::new("haproxy")
        .arg("-f")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("haproxy (Debian's haproxy)");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_until(Duration::from_secs(10), "haproxy to listen", || {
        TcpStream::connect(addr).is_ok()
    });
    (child, addr)
}

fn enter_new_netns(name: &str) -> bool {
    // Host-originated VIP traffic needs a route, as on any host with a default route: a veth
    // pair inside the namespace provides one.
    if !common::enter_netns(name) {
        return false;
    }
    for args in [
        vec!["link", "add", "v0", "type", "veth", "peer", "name", "v1"],
        vec!["addr", "add", "10.251.0.1/24", "dev", "v0"],
        vec!["addr", "add", "10.251.0.2/24", "dev", "v1"],
        vec!["link", "set", "v0", "up"],
        vec!["link", "set", "v1", "up"],
        vec!["route", "add", "default", "via", "10.251.0.2", "dev", "v0"],
    ] {
        let _ = Command::new("ip").args(["-n", name]).args(&args).status();
    }
    // Tens of thousands of short connections from one address: let every path reuse TIME_WAIT
    // ports (Linux does so by default only for loopback destinations, which a VIP is not).
    let _ = Command::new("ip")
        .args(["netns", "exec", name, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])
        .status();
    true
}

fn main() {
    let bins = Bins::locate();
    let ns = format!("rune-bench-{}", std::process::id());
    let in_ns = enter_new_netns(&ns);
    if !in_ns {
        eprintln!("not root or no iproute2: measuring the dev-mode proxy port instead of the VIP path");
    }
    let back = backend();
    let mut d = Daemon::new(&bins);
    d.nftables = in_ns;
    d.restart();
    let spec = d.scratch().join("svc.yaml");
    std::fs::write(
        &spec,
        format!(
            "service:\n  name: bench\n  process:\n    command: sleep\n    args: [\"100000\"]\n  scale: 1\n  ports:\n    - name: p\n      port: 80\n      targetPort: {}\n",
            back.port()
        ),
    )
    .unwrap();
    let o = d.rune(&["cast", spec.to_str().unwrap(), "--timeout", "60s"]);
    assert!(o.status.success(), "cast: {}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_str(&stdout(&d.rune(&["get", "services", "bench", "-o", "json"]))).unwrap();
    let through: SocketAddr = if in_ns {
        format!("{}:80", v["vip"].as_str().unwrap()).parse().unwrap()
    } else {
        v["proxyPorts"][0]["address"].as_str().unwrap().parse().unwrap()
    };
    wait_until(Duration::from_secs(30), "the VIP to serve", || {
        TcpStream::connect(through)
            .and_then(|mut s| s.write_all(b"E"))
            .is_ok()
    });
    let (mut hap, hap_addr) = haproxy(d.scratch(), back);

    let label = if in_ns {
        "runed (VIP → nftables DNAT)"
    } else {
        "runed (proxy port)"
    };
    let proxy_port: u16 = v["proxyPorts"][0]["address"]
        .as_str()
        .and_then(|a| a.rsplit(':').next()?.parse().ok())
        .unwrap();
    let mut paths = vec![
        ("direct", back),
        (label, through),
        ("haproxy 2.6 (mode tcp)", hap_addr),
    ];
    if in_ns {
        paths.push((
            "runed proxy port, no NAT",
            (Ipv4Addr::LOCALHOST, proxy_port).into(),
        ));
    }
    let mut rows = Vec::new();
    for (name, addr) in paths {
        let s = short(addr);
        let dl = download(addr);
        let rt = round_trips(addr);
        rows.push((name, s, dl, rt));
    }
    // The VIP's route with loopback's MTU: the same long stream, the route's MSS out of it.
    let like_loopback = in_ns.then(|| {
        for dev in ["v0", "v1"] {
            let _ = Command::new("ip")
                .args(["-n", &ns, "link", "set", dev, "mtu", "65535"])
                .status();
        }
        download(through)
    });
    let _ = hap.kill();
    let _ = hap.wait();
    println!("\n| path | short conns/s | short p50 µs | short p99 µs | long MiB/s | long RTT p50 µs | long RTT p99 µs |");
    println!("|---|---|---|---|---|---|---|");
    for (name, s, dl, rt) in &rows {
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} |",
            s.0, s.1, s.2, dl, rt.0, rt.1
        );
    }
    let (direct, runed, hp) = (&rows[0], &rows[1], &rows[2]);
    println!(
        "\nratios: runed/direct short {:.2}, long {:.2}; runed/haproxy short {:.2}, long {:.2}",
        runed.1 .0 / direct.1 .0,
        runed.2 / direct.2,
        runed.1 .0 / hp.1 .0,
        runed.2 / hp.2
    );

    common::summary(
        "data plane short connections/s",
        "conn/s",
        runed.1 .0,
        Some(("haproxy", hp.1 .0)),
        true,
    );
    common::summary(
        "data plane long stream",
        "MiB/s",
        runed.2,
        Some(("direct", direct.2)),
        true,
    );
    if let Some(proxy) = rows.get(3) {
        // What the proxy alone carries (endpoints on other nodes, policies naming host
        // processes), beside haproxy: both reached without NAT.
        common::summary(
            "data plane proxy short connections/s (no NAT)",
            "conn/s",
            proxy.1 .0,
            Some(("haproxy", hp.1 .0)),
            true,
        );
        common::summary(
            "data plane proxy long stream (no NAT)",
            "MiB/s",
            proxy.2,
            Some(("haproxy", hp.2)),
            true,
        );
    }
    if let Some(dl) = like_loopback {
        println!(
            "long stream through the VIP with its route's MTU as loopback's: {dl:.0} MiB/s, {:.2} of direct",
            dl / direct.2
        );
        common::summary(
            "data plane long stream, VIP route MTU as loopback's",
            "MiB/s",
            dl,
            Some(("direct", direct.2)),
            true,
        );
    }

    drop(d);
    if in_ns {
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    }
}
