//! Raft across three members: what replication costs a write, and how long a leader's loss
//! stops writes.
//!
//! `cargo bench -p runed --bench cluster` runs the log's members in this process, each with its
//! own data dir and raft port on loopback, over mutual TLS from a cluster CA, and prints:
//! - durable writes/s and p50 at 1, 16 and 64 clients proposing straight to the leader's log
//!   (no API in front), with one member and with three; beside them Debian's etcd with one
//!   member and with three (three processes), driven through its gRPC API. The columns to
//!   compare are each system's three-member rate against its own one-member rate (what
//!   replication costs it); across systems the paths differ (runed's has no API here);
//! - leader failover: from stopping the leader (its raft and its port, as a crash looks to the
//!   others) to the first write acknowledged by a new leader, p50/p99 over 20 kills, the old
//!   leader restarted as a follower between kills.
//!
//! Then the same through three runed processes, as an operator runs them (formed with a join
//! token, raft over mutual TLS on loopback): casts through the gRPC API of the first node
//! against etcd's three members through theirs, and failover as a client sees it, from
//! SIGKILL of the leading runed to the first cast a surviving node acknowledges.
//!
//! `BENCH_SECONDS` (default 5) sets the length of each write run; `BENCH_KILLS` (default 20) the
//! number of kills; `ETCD` the etcd binary (skipped if absent).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rune_log::network::RaftPort;
use rune_log::pki::{ClusterCa, NodeTls};
use rune_log::{Log, LogConfig};
use rune_statemachine::spec::ServiceSpec;
use rune_statemachine::{Command, Resource};
use tokio::net::TcpListener;

fn svc(name: &str) -> Command {
    Command::Apply {
        resources: vec![Resource::Service(ServiceSpec {
            name: name.into(),
            image: Some("busybox".into()),
            scale: Some(0),
            ..Default::default()
        })],
        create_namespace: false,
        force: false,
        history_limit: 3,
        release: None,
    }
}

fn init() -> Command {
    Command::Init {
        cluster_cidr: None,
        cluster_id: None,
        claim_hosts: false,
        policies: rune_statemachine::identity::builtin_policies(),
        namespaces: vec!["system".into(), "default".into()],
    }
}

/// One member: its data dir, address and certificates, and while it runs its log and port.
struct Member {
    id: u64,
    dir: PathBuf,
    addr: SocketAddr,
    tls: NodeTls,
    running: Option<(Arc<Log>, RaftPort)>,
}

impl Member {
    fn log(&self) -> Option<&Arc<Log>> {
        self.running.as_ref().map(|(l, _)| l)
    }

    async fn start(&mut self, listener: TcpListener, join: bool) {
        let cfg = LogConfig {
            node_id: self.id,
            address: self.addr.to_string(),
            join,
            tls: Some(self.tls.clone()),
            ..LogConfig::new(&self.dir)
        };
        let log = Log::open(cfg).await.expect("open a member's log");
        let port = log.serve_raft(listener, None).expect("serve the raft port");
        self.running = Some((Arc::new(log), port));
    }

    /// Stops raft and closes the port, as a crash looks to the other members.
    async fn kill(&mut self) {
        let Some((log, port)) = self.running.take() else {
            return;
        };
        let _ = port.stop().await;
        match Arc::try_unwrap(log) {
            Ok(log) => {
                let _ = log.close().await;
            }
            Err(log) => {
                let _ = log.shutdown().await;
            }
        }
    }
}

async fn cluster(root: &Path, n: u64, ca: &ClusterCa) -> Vec<Member> {
    let mut members = Vec::new();
    for id in 1..=n {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut m = Member {
            id,
            dir: root.join(format!("n{n}-{id}")),
            addr: listener.local_addr().expect("addr"),
            tls: ca.issue(id).expect("issue a certificate"),
            running: None,
        };
        m.start(listener, id != 1).await;
        members.push(m);
    }
    let first = members[0].log().expect("running").clone();
    first.propose(init()).await.expect("init");
    for m in &members[1..] {
        first
            .add_voter(m.id, &m.addr.to_string(), Duration::from_secs(30))
            .await
            .expect("add a voter");
    }
    members
}

/// The member that leads, once exactly one does.
async fn leader(members: &[Member]) -> usize {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let leading: Vec<usize> = (0..members.len())
            .filter(|i| {
                members[*i].log().is_some_and(|l| {
                    let s = l.cluster_status();
                    s.role == "leader" && s.leader == Some(members[*i].id)
                })
            })
            .collect();
        if let [one] = leading[..] {
            return one;
        }
        assert!(Instant::now() < until, "no single leader");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

struct Rate {
    per_s: f64,
    p50_ms: f64,
}

fn rate(mut lat: Vec<Duration>, elapsed: Duration) -> Rate {
    lat.sort();
    let p50 = lat.get(lat.len() / 2).copied().unwrap_or_default();
    Rate {
        per_s: lat.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: p50.as_secs_f64() * 1e3,
    }
}

/// `clients` writers calling `op` for `seconds`; every write must succeed.
async fn drive<F, Fut>(clients: usize, seconds: u64, op: F) -> Rate
where
    F: Fn(usize, u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let started = Instant::now();
    let stop = started + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0;
            while Instant::now() < stop {
                let t = Instant::now();
                assert!(op(c, i).await, "a write failed");
                lat.push(t.elapsed());
                i += 1;
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("a writer panicked"));
    }
    rate(all, started.elapsed())
}

async fn runed_writes(
    root: &Path,
    n: u64,
    ca: &ClusterCa,
    clients: usize,
    seconds: u64,
    round: usize,
) -> Rate {
    let mut members = cluster(&root.join(format!("w{round}")), n, ca).await;
    let l = leader(&members).await;
    let log = members[l].log().expect("running").clone();
    let r = drive(clients, seconds, move |c, i| {
        let log = log.clone();
        async move { log.propose(svc(&format!("c{c}-{i}"))).await.is_ok() }
    })
    .await;
    for m in &mut members {
        m.kill().await;
    }
    r
}

async fn etcd_writes(n: usize, clients: usize, seconds: u64) -> Option<Rate> {
    let members = common::start_etcd_cluster(n)?;
    // Writes go to the first member, as a client without a leader-aware balancer sends them.
    let mut chans = Vec::new();
    for _ in 0..clients {
        chans.push(
            tonic::transport::Channel::from_shared(members[0].url.clone())
                .ok()?
                .connect()
                .await
                .ok()?,
        );
    }
    let chans = Arc::new(chans);
    let value = vec![b'x'; 256];
    Some(
        drive(clients, seconds, move |c, i| {
            common::etcd_put(
                chans[c].clone(),
                format!("/bench/c{c}-{i}").into_bytes(),
                value.clone(),
            )
        })
        .await,
    )
}

/// Kill → first write acknowledged by a new leader, `kills` times.
async fn failover(root: &Path, ca: &ClusterCa, kills: usize) -> Vec<Duration> {
    let mut members = cluster(&root.join("failover"), 3, ca).await;
    let mut took = Vec::new();
    for k in 0..kills {
        let l = leader(&members).await;
        let started = Instant::now();
        members[l].kill().await;
        let index = 'written: loop {
            for m in members.iter().filter(|m| m.running.is_some()) {
                if let Some(log) = m.log() {
                    if let Ok(Ok(p)) =
                        tokio::time::timeout(Duration::from_millis(500), log.propose(svc(&format!("k{k}"))))
                            .await
                    {
                        break 'written p.index;
                    }
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no new leader took a write"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        took.push(started.elapsed());
        // The old leader comes back as a follower and catches up before the next kill.
        let listener = TcpListener::bind(members[l].addr).await.expect("rebind");
        members[l].start(listener, false).await;
        let log = members[l].log().expect("running").clone();
        let mut applied = log.applied();
        tokio::time::timeout(Duration::from_secs(30), applied.wait_for(|a| *a >= index))
            .await
            .expect("the old leader caught up")
            .expect("applied index");
    }
    for m in &mut members {
        m.kill().await;
    }
    took
}

/// Three runed processes formed into one cluster, as the README's "Three nodes" forms them.
fn runed_cluster(bins: &rune_chaos_tests::Bins) -> Vec<rune_chaos_tests::Daemon> {
    let node = |join: Option<(&str, &str)>| {
        let mut d = rune_chaos_tests::Daemon::new(bins);
        let raft = format!("127.0.0.1:{}", rune_chaos_tests::free_port());
        d.extra = vec![
            "--raft-listen".into(),
            raft.clone(),
            "--gateway-listen".into(),
            "127.0.0.1:0".into(),
            // Every cast takes a VIP: a /8 holds what the runs write.
            "--cluster-cidr".into(),
            "10.0.0.0/8".into(),
        ];
        if let Some((member, token)) = join {
            d.extra.extend([
                "--join".into(),
                member.into(),
                "--join-token-file".into(),
                token.into(),
            ]);
            d.auto_bootstrap = false;
        }
        (d, raft)
    };
    let (mut a, raft) = node(None);
    a.restart();
    let token = a.scratch().join("join").display().to_string();
    let o = a.rune(&["admin", "cluster", "join-token", "--out-file", &token]);
    assert!(o.status.success(), "join-token: {}", rune_chaos_tests::stderr(&o));
    let mut nodes = vec![a];
    for _ in 0..2 {
        let (mut d, _) = node(Some((&raft, &token)));
        d.token = nodes[0].token.clone();
        d.restart();
        nodes.push(d);
    }
    rune_chaos_tests::wait_until(Duration::from_secs(120), "three voters", || {
        nodes.iter().all(|d| {
            rune_chaos_tests::http_get(d.metrics, "/metrics")
                .is_some_and(|(_, m)| m.lines().any(|l| l == "rune_log_has_leader 1"))
        }) && leader_of(&nodes).is_some()
    });
    nodes
}

/// The node whose metrics say it leads.
fn leader_of(nodes: &[rune_chaos_tests::Daemon]) -> Option<usize> {
    nodes.iter().position(|d| {
        d.pid().is_some()
            && rune_chaos_tests::http_get(d.metrics, "/metrics")
                .is_some_and(|(_, m)| m.lines().any(|l| l == "rune_log_is_leader 1"))
    })
}

/// One cast through `d`'s API, bounded by `limit`.
async fn cast(
    ch: tonic::transport::Channel,
    bearer: rune_chaos_tests::Bearer,
    name: String,
    limit: Duration,
) -> bool {
    use rune_proto::v1 as pb;
    let mut client = pb::service_api_client::ServiceApiClient::with_interceptor(ch, bearer);
    let mut req = tonic::Request::new(pb::ApplyRequest {
        resources: vec![pb::Resource {
            kind: Some(pb::resource::Kind::ServiceJson(format!(
                r#"{{"name":"{name}","image":"busybox","scale":0}}"#
            ))),
        }],
        ..Default::default()
    });
    req.set_timeout(limit);
    matches!(tokio::time::timeout(limit, client.apply(req)).await, Ok(Ok(_)))
}

async fn channel(d: &rune_chaos_tests::Daemon) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://{}", d.grpc))
        .expect("address")
        .connect()
        .await
        .expect("connect")
}

/// Casts through the first node's API, `clients` at a time.
async fn api_writes(nodes: &[rune_chaos_tests::Daemon], clients: usize, seconds: u64, round: usize) -> Rate {
    let mut chans = Vec::new();
    for _ in 0..clients {
        chans.push(channel(&nodes[0]).await);
    }
    let (chans, bearer) = (Arc::new(chans), nodes[0].bearer());
    drive(clients, seconds, move |c, i| {
        cast(
            chans[c].clone(),
            bearer.clone(),
            format!("r{round}-c{c}-{i}"),
            Duration::from_secs(30),
        )
    })
    .await
}

/// SIGKILL of the leading runed → the first cast a surviving node acknowledges, `kills`
/// times; the killed runed restarts as a follower between kills.
async fn api_failover(nodes: &mut [rune_chaos_tests::Daemon], kills: usize) -> Vec<Duration> {
    let mut took = Vec::new();
    for k in 0..kills {
        let l = loop {
            if let Some(l) = leader_of(nodes) {
                break l;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let mut others = Vec::new();
        for (i, d) in nodes.iter().enumerate().filter(|(i, _)| *i != l) {
            others.push((channel(d).await, d.bearer(), i));
        }
        let started = Instant::now();
        nodes[l].sigkill();
        let mut n = 0;
        'written: loop {
            for (ch, bearer, _) in &others {
                n += 1;
                if cast(
                    ch.clone(),
                    bearer.clone(),
                    format!("k{k}-{n}"),
                    Duration::from_millis(500),
                )
                .await
                {
                    break 'written;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no surviving node took a cast"
            );
        }
        took.push(started.elapsed());
        nodes[l].restart();
    }
    took
}

fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let kills: usize = std::env::var("BENCH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let root = tempfile::tempdir().expect("tempdir");
    let ca = ClusterCa::generate().expect("CA");

    println!(
        "raft across members on loopback, one machine ({} cores), {seconds} s per run",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!("| clients | runed 1 member w/s | p50 ms | runed 3 members w/s | p50 ms | 3/1 | etcd 1 member w/s | p50 ms | etcd 3 members w/s | p50 ms | 3/1 |");
    println!("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    let mut round = 0;
    for clients in [1, 16, 64] {
        round += 1;
        let r1 = rt.block_on(runed_writes(root.path(), 1, &ca, clients, seconds, round));
        round += 1;
        let r3 = rt.block_on(runed_writes(root.path(), 3, &ca, clients, seconds, round));
        let e1 = rt.block_on(etcd_writes(1, clients, seconds));
        let e3 = rt.block_on(etcd_writes(3, clients, seconds));
        let cell = |r: &Option<Rate>| {
            r.as_ref().map_or("–| –".to_string(), |r| {
                format!("{:.0} | {:.2}", r.per_s, r.p50_ms)
            })
        };
        let ratio = match (&e1, &e3) {
            (Some(a), Some(b)) => format!("{:.2}", b.per_s / a.per_s.max(1.0)),
            _ => "–".into(),
        };
        println!(
            "| {clients} | {:.0} | {:.2} | {:.0} | {:.2} | {:.2} | {} | {} | {ratio} |",
            r1.per_s,
            r1.p50_ms,
            r3.per_s,
            r3.p50_ms,
            r3.per_s / r1.per_s.max(1.0),
            cell(&e1),
            cell(&e3),
        );
        common::summary(
            &format!("replicated writes (3 members), {clients} client(s), log only"),
            "writes/s",
            r3.per_s,
            e3.as_ref().map(|e| ("etcd (3 members)", e.per_s)),
            true,
        );
    }

    let mut took = rt.block_on(failover(root.path(), &ca, kills));
    took.sort();
    let pct = |p: f64| took[((took.len() as f64 * p) as usize).min(took.len() - 1)].as_secs_f64() * 1e3;
    println!();
    println!(
        "leader failover, kill → first write acknowledged by a new leader, {} kills: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        took.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    common::summary(
        "leader failover, kill → first acknowledged write, p99",
        "ms",
        pct(0.99),
        None,
        false,
    );

    // The same through runed processes and the API.
    let bins = rune_chaos_tests::Bins::locate();
    let mut nodes = runed_cluster(&bins);
    println!();
    println!("three runed processes, casts through the first node's gRPC API; etcd's three members through the first one's");
    println!();
    println!("| clients | runed 3 nodes casts/s | p50 ms | etcd 3 members puts/s | p50 ms | runed/etcd |");
    println!("|--:|--:|--:|--:|--:|--:|");
    for (round, clients) in [1usize, 16, 64].into_iter().enumerate() {
        let r = rt.block_on(api_writes(&nodes, clients, seconds, round));
        // A fresh etcd cluster per row (none when etcd is not installed).
        let e = rt.block_on(etcd_writes(3, clients, seconds));
        let (ew, ep50, ratio) = match &e {
            Some(e) => (
                format!("{:.0}", e.per_s),
                format!("{:.2}", e.p50_ms),
                format!("{:.2}", r.per_s / e.per_s.max(1.0)),
            ),
            None => ("n/a".into(), "n/a".into(), "n/a".into()),
        };
        println!(
            "| {clients} | {:.0} | {:.2} | {ew} | {ep50} | {ratio} |",
            r.per_s, r.p50_ms
        );
        common::summary(
            &format!("replicated casts through the API (3 runed), {clients} client(s)"),
            "writes/s",
            r.per_s,
            e.as_ref().map(|e| ("etcd (3 members)", e.per_s)),
            true,
        );
    }
    let mut took = rt.block_on(api_failover(&mut nodes, kills));
    took.sort();
    let pct = |p: f64| took[((took.len() as f64 * p) as usize).min(took.len() - 1)].as_secs_f64() * 1e3;
    println!();
    println!(
        "failover through the API, SIGKILL of the leading runed → first cast acknowledged, {} kills: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        took.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    common::summary(
        "failover through the API (runed processes), SIGKILL → first acknowledged cast, p99",
        "ms",
        pct(0.99),
        None,
        false,
    );
}
