//! Three logs in one process, each serving its raft port on loopback over the real gRPC
//! transport with mutual TLS from a cluster CA: they form one cluster, replicate every write to
//! every member (state digests equal), take writes on followers through the leader, elect a
//! new leader when the leader stops, and take the old leader back as a follower that catches
//! up. A learner added
//! after the log was purged catches up from a snapshot. The raft port refuses a client without
//! a certificate from the cluster's CA.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rune_log::join::{Admission, JoinError, JoinToken, Joins};
use rune_log::network::RaftPort;
use rune_log::pki::{node_name, ClusterCa, NodeTls};
use rune_log::{Log, LogConfig};
use rune_statemachine::store::{digest, get_record, service_key, ServiceRecord};
use rune_statemachine::STATE_TABLE;
use tokio::net::TcpListener;
use tonic::transport::{ClientTlsConfig, Identity};

const DEADLINE: Duration = Duration::from_secs(20);

/// One member: its log and its raft port.
struct Node {
    id: u64,
    log: Log,
    addr: SocketAddr,
    port: RaftPort,
}

/// Opens the log in `dir` as node `id` and serves its raft port on `listener`, with `tls`.
async fn start(id: u64, dir: &Path, listener: TcpListener, join: bool, tls: Option<NodeTls>) -> Node {
    start_with(id, dir, listener, join, tls, None).await
}

/// [`start`], admitting new nodes with `joins`.
async fn start_with(
    id: u64,
    dir: &Path,
    listener: TcpListener,
    join: bool,
    tls: Option<NodeTls>,
    joins: Option<Joins>,
) -> Node {
    let addr = listener.local_addr().unwrap();
    let cfg = LogConfig {
        node_id: id,
        address: addr.to_string(),
        join,
        tls: tls.clone(),
        snapshot_every: 50,
        keep_after_snapshot: 5,
        ..LogConfig::new(dir)
    };
    let log = Log::open(cfg).await.unwrap();
    let port = log.serve_raft(listener, joins).unwrap();
    Node { id, log, addr, port }
}

/// Stops the node's raft and closes its port, its connections with it, as a crash would
/// (the data dir stays).
async fn kill(n: Node) -> SocketAddr {
    n.log.close().await.unwrap();
    tokio::time::timeout(DEADLINE, n.port.stop())
        .await
        .expect("the raft port closes")
        .unwrap();
    n.addr
}

async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// Waits until `log` has applied at least `index`.
async fn applied(log: &Log, index: u64) {
    let mut w = log.applied();
    let reached = tokio::time::timeout(DEADLINE, w.wait_for(|a| *a >= index)).await;
    assert!(
        reached.is_ok_and(|r| r.is_ok()),
        "applied {} never reached {index}",
        *log.applied().borrow()
    );
}

/// `n` casts named `<prefix><i>` through `log`; the index of the last.
async fn writes(log: &Log, prefix: &str, n: usize) -> u64 {
    let mut last = 0;
    for i in 0..n {
        last = log
            .propose(common::svc(&format!("{prefix}{i}"), 1))
            .await
            .unwrap()
            .index;
    }
    last
}

fn state_digest(log: &Log) -> String {
    let txn = log.read().unwrap();
    digest(&txn.open_table(STATE_TABLE).unwrap()).unwrap()
}

/// Waits until one of `nodes` leads, and returns its position.
async fn leader_of(nodes: &[&Node]) -> usize {
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let leaders: Vec<usize> = (0..nodes.len())
            .filter(|i| {
                let s = nodes[*i].log.cluster_status();
                s.role == "leader" && s.leader == Some(nodes[*i].id)
            })
            .collect();
        if let [one] = leaders[..] {
            return one;
        }
        assert!(leaders.len() <= 1, "two leaders at once: {leaders:?}");
        assert!(tokio::time::Instant::now() < until, "no leader elected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn dirs() -> (tempfile::TempDir, [PathBuf; 3]) {
    let root = tempfile::tempdir().unwrap();
    let d = [1, 2, 3].map(|i| root.path().join(format!("node{i}")));
    (root, d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_voters_replicate_fail_over_and_take_the_old_leader_back() {
    let (_root, dirs) = dirs();
    let ca = ClusterCa::generate().unwrap();
    let tls = |id| Some(ca.issue(id).unwrap());
    let n1 = start(1, &dirs[0], listener().await, false, tls(1)).await;
    let n2 = start(2, &dirs[1], listener().await, true, tls(2)).await;
    let n3 = start(3, &dirs[2], listener().await, true, tls(3)).await;
    assert!(!n2.log.healthy(), "a node waiting to join knows no leader");

    n1.log.propose(common::init()).await.unwrap();
    n1.log.add_voter(2, &n2.addr.to_string(), DEADLINE).await.unwrap();
    n1.log.add_voter(3, &n3.addr.to_string(), DEADLINE).await.unwrap();
    let status = n1.log.cluster_status();
    let voters: Vec<u64> = status.members.iter().filter(|m| m.voter).map(|m| m.id).collect();
    assert_eq!(voters, vec![1, 2, 3], "{status:?}");

    let mut last = writes(&n1.log, "s", 20).await;
    for n in [&n1, &n2, &n3] {
        applied(&n.log, last).await;
        assert!(n.log.healthy(), "node {} follows a leader", n.id);
        assert_eq!(n.log.cluster_status().leader, Some(1));
    }
    let d = state_digest(&n1.log);
    assert_eq!(state_digest(&n2.log), d);
    assert_eq!(state_digest(&n3.log), d);

    // A write made on a follower goes through the leader, and every member has it.
    let on_follower = n2.log.propose(common::svc("on-follower", 1)).await.unwrap();
    assert!(
        on_follower.index > last && on_follower.outcome.is_ok(),
        "{on_follower:?}"
    );
    last = on_follower.index;
    for n in [&n1, &n2, &n3] {
        applied(&n.log, last).await;
    }
    let d = state_digest(&n1.log);
    assert_eq!(state_digest(&n2.log), d);
    assert_eq!(state_digest(&n3.log), d);

    // A linearizable read on a follower sees a write acknowledged by the leader just before.
    n1.log.propose(common::svc("read-after", 1)).await.unwrap();
    let txn = n3.log.read_linearizable().await.unwrap();
    let t = txn.open_table(STATE_TABLE).unwrap();
    let found: Option<ServiceRecord> = get_record(&t, &service_key("default", "read-after")).unwrap();
    assert!(
        found.is_some(),
        "a linearizable read on a follower missed an acknowledged write"
    );
    drop(t);
    drop(txn);

    // The leader stops: the other two elect one of themselves and go on writing. A write made
    // during the election waits for its outcome and goes to whoever wins.
    let addr1 = kill(n1).await;
    let during = n3.log.propose(common::svc("during-election", 1)).await.unwrap();
    assert!(during.index > last);
    let rest = [&n2, &n3];
    let l = leader_of(&rest).await;
    let leader = rest[l];
    let after = writes(&leader.log, "after", 10).await;
    assert!(after > last);
    applied(&rest[1 - l].log, after).await;
    assert_eq!(state_digest(&n2.log), state_digest(&n3.log));

    // The old leader comes back on its old address as a follower and catches up.
    let back = TcpListener::bind(addr1).await.unwrap();
    let n1 = start(1, &dirs[0], back, false, tls(1)).await;
    applied(&n1.log, after).await;
    let s = n1.log.cluster_status();
    assert_ne!(s.role, "leader", "{s:?}");
    assert_eq!(s.leader, Some(leader.id));
    let d = state_digest(&n2.log);
    assert_eq!(state_digest(&n1.log), d);
    assert_eq!(state_digest(&n3.log), d);

    for n in [n1, n2, n3] {
        kill(n).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_added_after_the_log_was_purged_catches_up_from_a_snapshot() {
    // Plain text here (no certificates), the way a test may run it.
    let (_root, dirs) = dirs();
    let n1 = start(1, &dirs[0], listener().await, false, None).await;
    n1.log.propose(common::init()).await.unwrap();
    // Raft purges in batches of 1,024 entries.
    let last = writes(&n1.log, "s", 1100).await;
    n1.log.snapshot().await.unwrap();
    // Raft purges behind the snapshot on its own time.
    let until = tokio::time::Instant::now() + DEADLINE;
    while n1.log.cluster_status().purged.is_none_or(|p| p <= 1) {
        assert!(tokio::time::Instant::now() < until, "the log was never purged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let n2 = start(2, &dirs[1], listener().await, true, None).await;
    n1.log.add_voter(2, &n2.addr.to_string(), DEADLINE).await.unwrap();
    applied(&n2.log, last).await;
    let s2 = n2.log.cluster_status();
    assert!(s2.snapshot.is_some(), "it was sent a snapshot: {s2:?}");
    assert_eq!(state_digest(&n2.log), state_digest(&n1.log));

    // Two voters: both must hold a write for it to commit, and both do.
    let w = n1.log.propose(common::svc("two", 1)).await.unwrap().index;
    applied(&n2.log, w).await;

    // Removing the second voter leaves node 1 alone, writing as before.
    n1.log.remove_member(2).await.unwrap();
    kill(n2).await;
    let members: Vec<u64> = n1.log.cluster_status().members.iter().map(|m| m.id).collect();
    assert_eq!(members, vec![1]);
    n1.log.propose(common::svc("alone-again", 1)).await.unwrap();
    assert!(
        n1.log.remove_member(1).await.is_err(),
        "the last voter cannot be removed"
    );
    assert!(
        n1.log.remove_member(9).await.is_err(),
        "a stranger cannot be removed"
    );

    kill(n1).await;
}

/// Asks `addr` for a vote as member 2 would, over `tls` (none: plain text).
async fn ask_vote(addr: SocketAddr, tls: Option<ClientTlsConfig>) -> Result<(), String> {
    use rune_proto::raft::raft_client::RaftClient;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    if let Some(t) = tls {
        endpoint = endpoint.tls_config(t).unwrap();
    }
    let channel = endpoint.connect().await.map_err(|e| format!("connect: {e:?}"))?;
    let vote = openraft::raft::VoteRequest::<u64>::new(openraft::Vote::new(1, 2), None);
    let message = rune_proto::raft::Message {
        json: serde_json::to_vec(&vote).unwrap(),
        data: Vec::new(),
    };
    RaftClient::new(channel)
        .vote(message)
        .await
        .map(|_| ())
        .map_err(|e| format!("vote: {e:?}"))
}

/// Sends `json` as a join request to `addr` over `tls`, as a node without a certificate does.
async fn ask_to_join(addr: SocketAddr, tls: ClientTlsConfig, json: Vec<u8>) -> Result<(), String> {
    use rune_proto::raft::raft_client::RaftClient;
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    RaftClient::new(channel)
        .max_encoding_message_size(8 << 20)
        .join(rune_proto::raft::Message {
            json,
            data: Vec::new(),
        })
        .await
        .map(|_| ())
        .map_err(|e| format!("join: {e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_raft_port_refuses_peers_without_the_clusters_certificate() {
    let (_root, dirs) = dirs();
    let ca = ClusterCa::generate().unwrap();
    let n1 = start(1, &dirs[0], listener().await, false, Some(ca.issue(1).unwrap())).await;
    let term = n1.log.cluster_status().term;

    // A member's certificate from this CA is let in, and raft answers; so is one for an id
    // above every id this node has seen (a node admitted while it was away: ids only rise).
    // A removed node's is refused (below, after a removal).
    let member = ca.issue(1).unwrap();
    ask_vote(n1.addr, Some(member.client(1))).await.unwrap();
    ask_vote(n1.addr, Some(ca.issue(2).unwrap().client(1)))
        .await
        .unwrap();
    // The client trusts this cluster's CA and checks node 1's name in every case below, so
    // what is refused is the client: plain text, no certificate, another CA's certificate.
    let stranger = ClusterCa::generate().unwrap().issue(2).unwrap();
    let trusting = || {
        ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca.cert_pem()))
            .domain_name(node_name(1))
    };
    let refused = [
        ("plain text", ask_vote(n1.addr, None).await),
        ("no certificate", ask_vote(n1.addr, Some(trusting())).await),
        (
            "another CA's certificate",
            ask_vote(
                n1.addr,
                Some(trusting().identity(Identity::from_pem(&stranger.cert_pem, &stranger.key_pem))),
            )
            .await,
        ),
    ];
    for (who, r) in refused {
        assert!(r.is_err(), "{who} was let in");
    }
    // Without a certificate only Join is served, and only a small one is read: a megabyte is
    // refused unread, while a small request gets its answer (this member admits no one).
    let trusting_any = || {
        ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca.cert_pem()))
            .domain_name(rune_log::pki::ANY_MEMBER)
    };
    let big = ask_to_join(n1.addr, trusting_any(), vec![b' '; 1 << 20])
        .await
        .unwrap_err();
    assert!(big.contains("length limit"), "{big}");
    let small = ask_to_join(n1.addr, trusting_any(), b"{}".to_vec())
        .await
        .unwrap_err();
    assert!(small.contains("does not admit new nodes"), "{small}");
    // And a member checks whom it dialled: node 1's certificate does not pass for node 3.
    let other_name = ask_vote(n1.addr, Some(member.client(3))).await;
    assert!(other_name.is_err(), "node 1 passed for node 3");
    assert_eq!(
        n1.log.cluster_status().term,
        term,
        "a refused peer moved raft's term"
    );

    // Certificates kept on disk come back as they were.
    let tls = ca.issue(1).unwrap();
    tls.save(&dirs[1]).unwrap();
    let back = NodeTls::load(&dirs[1]).unwrap().unwrap();
    assert_eq!(
        (back.node, back.ca_pem, back.cert_pem, back.key_pem),
        (1, tls.ca_pem, tls.cert_pem, tls.key_pem)
    );
    ca.save(&dirs[1]).unwrap();
    let ca_back = ClusterCa::load(&dirs[1]).unwrap().unwrap();
    assert_eq!(ca_back.cert_pem(), ca.cert_pem());
    // What the reloaded CA signs is let in too.
    ask_vote(n1.addr, Some(ca_back.issue(1).unwrap().client(1)))
        .await
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dirs[1].join("cluster/node.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    kill(n1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_founded_alone_records_its_raft_address_and_takes_members() {
    // A data dir made before it had a raft port knows itself as `local`; the others must be
    // able to dial it once it has one.
    let (_root, dirs) = dirs();
    let alone = Log::open(LogConfig::new(&dirs[0])).await.unwrap();
    alone.propose(common::init()).await.unwrap();
    assert_eq!(alone.cluster_status().members[0].address, "local");
    alone.close().await.unwrap();

    let ca = ClusterCa::generate().unwrap();
    let n1 = start(1, &dirs[0], listener().await, false, Some(ca.issue(1).unwrap())).await;
    assert_eq!(n1.log.cluster_status().members[0].address, n1.addr.to_string());
    let n2 = start(2, &dirs[1], listener().await, true, Some(ca.issue(2).unwrap())).await;
    n1.log.add_voter(2, &n2.addr.to_string(), DEADLINE).await.unwrap();
    let w = n2.log.propose(common::svc("via-follower", 1)).await.unwrap();
    applied(&n1.log, w.index).await;
    assert_eq!(state_digest(&n1.log), state_digest(&n2.log));

    // A learner that never answers is taken out again, and the call says so.
    let silent = listener().await;
    let gone = n1
        .log
        .add_voter(
            3,
            &silent.local_addr().unwrap().to_string(),
            Duration::from_secs(2),
        )
        .await;
    assert!(gone.is_err(), "a learner that never caught up became a voter");
    let members: Vec<u64> = n1.log.cluster_status().members.iter().map(|m| m.id).collect();
    assert_eq!(members, vec![1, 2]);

    kill(n2).await;
    kill(n1).await;
}

/// Admits the secret `let-me-in`, handing over `extra`.
struct Door;

#[tonic::async_trait]
impl Admission for Door {
    async fn admit(&self, secret: &str) -> Result<String, tonic::Status> {
        if secret == "let-me-in" {
            Ok("extra".into())
        } else {
            Err(tonic::Status::unauthenticated("not that secret"))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_with_a_join_token_joins_through_any_member_and_becomes_a_voter() {
    let (_root, dirs) = dirs();
    let ca = ClusterCa::generate().unwrap();
    let door = || {
        Some(Joins::new(
            std::sync::Arc::new(Door),
            ClusterCa::load(&dirs[0]).unwrap().unwrap(),
        ))
    };
    ca.save(&dirs[0]).unwrap();
    let n1 = start_with(
        1,
        &dirs[0],
        listener().await,
        false,
        Some(ca.issue(1).unwrap()),
        door(),
    )
    .await;
    n1.log.propose(common::init()).await.unwrap();
    let token = |secret: &str| JoinToken {
        ca_pem: ca.cert_pem().to_string(),
        secret: secret.into(),
    };

    // Refused: a wrong secret (nothing joins), an address nobody can dial, a token of
    // another CA (the member is not trusted: the secret is never sent).
    let l2 = listener().await;
    let a2 = l2.local_addr().unwrap().to_string();
    let n1_addr = n1.addr.to_string();
    match rune_log::join::request(&n1_addr, &token("guess"), &a2).await {
        Err(JoinError::Refused { code, .. }) => assert_eq!(code, tonic::Code::Unauthenticated),
        other => panic!("a wrong secret: {other:?}"),
    }
    match rune_log::join::request(&n1_addr, &token("let-me-in"), "nowhere").await {
        Err(JoinError::Refused { code, message, .. }) => {
            assert_eq!(code, tonic::Code::InvalidArgument);
            assert!(message.contains("nowhere"), "{message}");
        }
        other => panic!("a bad address: {other:?}"),
    }
    let stranger = JoinToken {
        ca_pem: ClusterCa::generate().unwrap().cert_pem().to_string(),
        secret: "let-me-in".into(),
    };
    assert!(rune_log::join::request(&n1_addr, &stranger, &a2).await.is_err());
    assert_eq!(
        n1.log.cluster_status().members.len(),
        1,
        "a refused node became a member"
    );

    // Admitted: node 2 gets id 2, the CA and what the admission adds; it starts with the
    // grant and becomes a voter holding the state.
    let grant = rune_log::join::request(&n1_addr, &token("let-me-in"), &a2)
        .await
        .unwrap();
    assert_eq!((grant.node, grant.extra.as_str()), (2, "extra"));
    grant.tls().save(&dirs[1]).unwrap();
    grant.ca().unwrap().save(&dirs[1]).unwrap();
    let joins2 = Joins::new(
        std::sync::Arc::new(Door),
        ClusterCa::load(&dirs[1]).unwrap().unwrap(),
    );
    let n2 = start_with(
        2,
        &dirs[1],
        l2,
        true,
        NodeTls::load(&dirs[1]).unwrap(),
        Some(joins2),
    )
    .await;
    let until = tokio::time::Instant::now() + DEADLINE;
    while !n1
        .log
        .cluster_status()
        .members
        .iter()
        .any(|m| m.id == 2 && m.voter)
    {
        assert!(tokio::time::Instant::now() < until, "node 2 never became a voter");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Node 3 asks node 2, a follower: it is sent on to the leader and gets the next id; the
    // CA node 2 was handed signs for node 3 as node 1's does.
    let l3 = listener().await;
    let a3 = l3.local_addr().unwrap().to_string();
    let grant3 = rune_log::join::request(&n2.addr.to_string(), &token("let-me-in"), &a3)
        .await
        .unwrap();
    assert_eq!(grant3.node, 3);
    let n3_tls = grant3.tls();
    let n3 = start(3, &dirs[2], l3, true, Some(grant3.tls())).await;
    let w = writes(&n3.log, "via-3-", 3).await;
    for n in [&n1, &n2, &n3] {
        applied(&n.log, w).await;
    }
    assert_eq!(state_digest(&n3.log), state_digest(&n1.log));
    // A voter asking again (a lost data dir, or someone at its address) is refused: it would
    // come back without its vote and log.
    match rune_log::join::request(&n1_addr, &token("let-me-in"), &a3).await {
        Err(JoinError::Refused { code, message, .. }) => {
            assert_eq!(code, tonic::Code::AlreadyExists);
            assert!(message.contains("rune admin cluster remove 3"), "{message}");
        }
        other => panic!("a voter joining again: {other:?}"),
    }

    // A removal asked of a follower is made by the leader; a stranger's is refused once.
    n2.log.remove_member(3).await.unwrap();
    assert!(!n1.log.cluster_status().members.iter().any(|m| m.id == 3));
    // Its certificate is still the CA's, but the members no longer take its calls.
    let gone = ask_vote(n1.addr, Some(n3_tls.client(1))).await.unwrap_err();
    assert!(
        gone.contains("PermissionDenied") && gone.contains("node 3 is not a member"),
        "{gone}"
    );
    let e = n2.log.remove_member(9).await.unwrap_err().to_string();
    assert_eq!(e, "cluster membership: node 9 is not a member");
    for n in [n3, n2, n1] {
        kill(n).await;
    }
}
