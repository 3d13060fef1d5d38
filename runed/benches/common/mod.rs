//! Pieces the benchmarks share: Debian's etcd started on free loopback ports and its Put, a
//! DNS question on the wire, a process's CPU time.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rune_chaos_tests::{free_port, http_get, wait_until};

/// One row of `scripts/bench.sh`'s table, printed as a tab-separated `summary` line: what was
/// measured, runed's figure and unit, and the peer's (name and figure) when there is one. The
/// ratio is runed against the peer, turned so that above 1 always means runed is ahead
/// (`higher_is_better` false for times and memory).
pub fn summary(figure: &str, unit: &str, runed: f64, peer: Option<(&str, f64)>, higher_is_better: bool) {
    let fmt = |v: f64| {
        if v >= 100.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.2}")
        }
    };
    let (name, value, ratio) = match peer {
        Some((name, v)) if v > 0.0 && runed > 0.0 => {
            let r = if higher_is_better { runed / v } else { v / runed };
            (name.to_string(), fmt(v), format!("{r:.2}"))
        }
        Some((name, v)) if v > 0.0 => (name.to_string(), fmt(v), "n/a".into()),
        Some((name, _)) => (name.to_string(), "n/a".into(), "n/a".into()),
        None => (String::new(), String::new(), String::new()),
    };
    println!(
        "summary\t{figure}\t{}\t{unit}\t{name}\t{value}\t{ratio}",
        fmt(runed)
    );
}

/// etcd's `PutRequest` (the fields a put needs).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

/// etcd's `PutResponse` (nothing we read).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PutResponse {}

/// Puts one key through etcd's gRPC API on `ch`.
pub async fn etcd_put(ch: tonic::transport::Channel, key: Vec<u8>, value: Vec<u8>) -> bool {
    let mut g = tonic::client::Grpc::new(ch);
    if g.ready().await.is_err() {
        return false;
    }
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/etcdserverpb.KV/Put");
    let codec = tonic_prost::ProstCodec::<PutRequest, PutResponse>::default();
    g.unary(tonic::Request::new(PutRequest { key, value }), path, codec)
        .await
        .is_ok()
}

/// A one-member etcd on a temporary data dir, killed when dropped.
pub struct Etcd {
    child: Child,
    /// Its data dir.
    pub dir: tempfile::TempDir,
    /// Its client URL.
    pub url: String,
}

impl Etcd {
    /// Its process id, for CPU and memory figures.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `$ETCD` (default `etcd` on PATH); `None` when it is not installed.
pub fn start_etcd() -> Option<Etcd> {
    start_etcd_cluster(1).and_then(|mut c| c.pop())
}

/// `n` etcd members forming one cluster on loopback, each with its own data dir; `None` when
/// etcd is not installed. Returns once every member reports healthy.
pub fn start_etcd_cluster(n: usize) -> Option<Vec<Etcd>> {
    let bin = std::env::var_os("ETCD")
        .map(PathBuf::from)
        .unwrap_or_else(|| "etcd".into());
    let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
    let initial = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut members = Vec::new();
    for (i, (client, peer)) in ports.iter().enumerate() {
        let dir = tempfile::tempdir().ok()?;
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new(&bin)
            .args(["--name", &format!("m{i}")])
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &initial])
            .args(["--initial-cluster-state", "new"])
            .args(["--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        members.push(Etcd { child, dir, url });
    }
    for (client, _) in &ports {
        let addr = format!("127.0.0.1:{client}").parse().ok()?;
        wait_until(Duration::from_secs(30), "etcd /health", || {
            http_get(addr, "/health").is_some_and(|(c, _)| c == 200)
        });
    }
    Some(members)
}

/// Resident memory of a process, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

pub use rune_chaos_tests::dns_query;

/// Whether `server` answers `name` with at least one record.
pub fn dns_answers(sock: &std::net::UdpSocket, server: std::net::SocketAddr, name: &str) -> bool {
    let _ = sock.send_to(&dns_query(7, name), server);
    let mut buf = [0u8; 512];
    matches!(sock.recv_from(&mut buf), Ok((n, _)) if n > 12 && buf[3] & 0x0f == 0 && buf[7] > 0)
}

/// A process's user and system CPU time so far, in clock ticks (USER_HZ, 100 on Linux).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

/// What the scheduler did for a process so far, summed over its threads
/// (`/proc/<pid>/task/*/schedstat`): time spent runnable but waiting for a CPU, and the times
/// it was given one (its CPU time is [`cpu_ticks`]). Threads that ended meanwhile are not
/// counted, which suits a server whose threads live as long as it does.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sched {
    /// Nanoseconds runnable but waiting for a CPU: what wake-ups cost in latency.
    pub waited_ns: u64,
    /// Times a thread was put on a CPU (one per wake-up or preemption).
    pub slices: u64,
}

/// [`Sched`] of process `pid` now; zeros where the kernel keeps no schedstat.
pub fn sched(pid: u32) -> Sched {
    let mut total = Sched::default();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return total;
    };
    for t in tasks.flatten() {
        let Ok(line) = std::fs::read_to_string(t.path().join("schedstat")) else {
            continue;
        };
        let f: Vec<u64> = line.split_whitespace().filter_map(|v| v.parse().ok()).collect();
        if let [_ran, waited, slices] = f[..] {
            total.waited_ns += waited;
            total.slices += slices;
        }
    }
    total
}

/// Creates network namespace `name` (loopback up) and moves this thread into it, so what it
/// starts (nft, runed) sees only that namespace. False without root or ip(8).
pub fn enter_netns(name: &str) -> bool {
    use std::os::fd::AsRawFd;
    if !Command::new("ip")
        .args(["netns", "add", name])
        .status()
        .is_ok_and(|s| s.success())
    {
        return false;
    }
    let _ = Command::new("ip")
        .args(["-n", name, "link", "set", "lo", "up"])
        .status();
    let Ok(f) = std::fs::File::open(format!("/var/run/netns/{name}")) else {
        return false;
    };
    // SAFETY: setns(2) on a namespace descriptor we own; it moves only this thread.
    unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) == 0 }
}

/// Deletes a network namespace of [`enter_netns`] (and what was made in it, an nftables table
/// among them) when dropped.
pub struct DeleteNetns(pub String);

impl Drop for DeleteNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// How many rounds a bench measures each pair of servers (`BENCH_ROUNDS`, default 3): this
/// machine drifts by tens of percent within minutes, so one run of each is a coin toss.
pub fn rounds() -> usize {
    std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(3)
}

/// Runs `ours` and `peer` once each, `ours` first in even rounds and `peer` first in odd ones,
/// and hands back (ours, peer): alternating cancels a drift between the two.
pub fn in_turn<A, B>(round: usize, ours: impl FnOnce() -> A, peer: impl FnOnce() -> B) -> (A, B) {
    if round.is_multiple_of(2) {
        let a = ours();
        (a, peer())
    } else {
        let b = peer();
        (ours(), b)
    }
}

/// Each round's ours ÷ peer's (a peer's 0 counted as 1, so a failed run reads as a large
/// ratio rather than infinity).
pub fn ratios(ours: impl IntoIterator<Item = f64>, peer: impl IntoIterator<Item = f64>) -> Vec<f64> {
    ours.into_iter().zip(peer).map(|(o, p)| o / p.max(1.0)).collect()
}

/// The middle value (the upper one of an even count); 0 for none.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}
