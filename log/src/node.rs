//! [`Log`]: the one door through which every write passes, and the views the readers get.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openraft::{BasicNode, Config, Raft, ServerState, SnapshotPolicy};
use redb::{Database, ReadTransaction};
use rune_statemachine::{Command, Envelope, Outcome, STATE_TABLE};
use tokio::sync::{broadcast, watch};

use crate::batch::Batcher;
use crate::db::StateDb;
use crate::log_store::{migrate_redb, LogStore};
use crate::metrics::Metrics;
use crate::network::{Forward, Forwarder, Network, RaftPort, RaftService, SNAPSHOT_CHUNK};
use crate::space::{NoSpace, Space};
use crate::state_machine::{AppliedEntry, Notifier, StateMachine};
use crate::types::{TypeConfig, NODE_ID};

/// The raft log's directory under the data dir (see [`crate::wal`]).
pub const LOG_DIR: &str = "raft-log";
/// Where data dirs from before the WAL kept the raft log; moved into [`LOG_DIR`] at open.
pub const LEGACY_LOG_FILE: &str = "raft-log.redb";
/// The state machine's database.
pub const STATE_FILE: &str = "state.redb";
/// Where snapshots are written.
pub const SNAPSHOT_DIR: &str = "snapshots";

/// How the log is kept.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Directory holding the log, the state and snapshots.
    pub data_dir: PathBuf,
    /// Take a snapshot after this many entries since the last one, then purge the log before it.
    pub snapshot_every: u64,
    /// Entries kept in the log behind a snapshot, for `rune admin replay`.
    pub keep_after_snapshot: u64,
    /// Bytes kept free on the data dir's file system: writes are refused below it (0: off).
    pub reserve_bytes: u64,
    /// This node's raft id, unique in its cluster ([`NODE_ID`] for a single node).
    pub node_id: u64,
    /// Where the other members reach this node's raft port (`host:port`); `local` for a
    /// single node, which has no one to talk to.
    pub address: String,
    /// A new data dir waits to be added to an existing cluster instead of founding its own.
    pub join: bool,
    /// This member's certificates for the raft port's mutual TLS ([`crate::pki`]); without,
    /// peers are dialled in plain text (a single node dials no one).
    pub tls: Option<crate::pki::NodeTls>,
}

impl LogConfig {
    /// Defaults for `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            snapshot_every: 10_000,
            keep_after_snapshot: 1_000,
            reserve_bytes: 0,
            node_id: NODE_ID,
            address: "local".into(),
            join: false,
            tls: None,
        }
    }
}

/// Failures to open or run the log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The data dir cannot be created or written.
    #[error("data dir {path}: {source}")]
    DataDir {
        /// The data dir.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another process holds the database.
    #[error("data dir {0} is in use by another process (is another runed running on it?)")]
    Locked(PathBuf),
    /// redb could not open a database file.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// What redb said.
        source: Box<redb::DatabaseError>,
    },
    /// openraft failed to start or elect itself.
    #[error("raft: {0}")]
    Raft(String),
    /// A membership change was refused or did not finish.
    #[error("cluster membership: {0}")]
    Membership(String),
    /// Reading the state failed.
    #[error("state storage: {0}")]
    Storage(String),
    /// The raft log's files cannot be opened, read or moved.
    #[error("raft log: {0}")]
    Wal(crate::wal::WalError),
    /// A restore into the data dir was interrupted.
    #[error("{0} holds an interrupted restore (RESTORE-IN-PROGRESS): run `runed restore` again")]
    Restoring(PathBuf),
}

/// Failures to propose.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProposeError {
    /// This member does not lead (raft refused the entry before appending it): the write did
    /// not happen, and the leader, when one is known, is named.
    #[error("the log is not accepting writes here: {0}")]
    NotLeader(String),
    /// The node is shutting down or its storage failed, or the leader was lost after it took
    /// the write: it may or may not have happened.
    #[error("the log is not accepting writes: {0}")]
    Unavailable(String),
    /// The data dir's file system is below its reserve; the write did not happen.
    #[error(transparent)]
    NoSpace(#[from] NoSpace),
}

/// How long a proposal on a member that knows no leader waits for an election to end: longer
/// than one election takes (a lease of 900 ms, then 600–900 ms).
pub const LEADER_WAIT: Duration = Duration::from_secs(3);

/// How long a leader may go without a quorum's acknowledgement and still call itself healthy:
/// twice the longest election timeout, by when the others will have chosen another.
const QUORUM_SILENCE_MS: u64 = 1_800;

/// How long a write forwarded to the leader may take to be applied on the member that
/// forwarded it, once the leader applied it.
pub const APPLY_WAIT: Duration = Duration::from_secs(10);

/// A proposal that was committed and applied.
#[derive(Debug, Clone)]
pub struct Proposed {
    /// Its log index.
    pub index: u64,
    /// What applying it decided.
    pub outcome: Outcome,
}

/// A running single-voter raft log with its state machine.
pub struct Log {
    raft: Raft<TypeConfig>,
    batcher: Arc<Batcher>,
    state: Arc<StateDb>,
    state_closed: tokio::sync::oneshot::Receiver<()>,
    notifier: Arc<Notifier>,
    metrics: Metrics,
    log_closed: tokio::sync::oneshot::Receiver<()>,
    space: Arc<Space>,
    /// Times this node saw the leader change (or a leader appear): a count an operator alerts
    /// on, as on etcd's `leader_changes_seen`.
    leader_changes: Arc<std::sync::atomic::AtomicU64>,
    /// Hands proposals made here to the leader when this node follows.
    forwarder: Forwarder,
    /// This member's certificates for the raft port (shared with its peers' clients and the
    /// forwarder).
    tls: Option<Arc<crate::pki::NodeTls>>,
    /// When each peer last answered this node's raft RPCs.
    contacts: Arc<crate::network::Contacts>,
    /// The one task the projections and other followers of the applied entries run on.
    followers: crate::followers::Followers,
}

fn open_db(
    path: &Path,
    open: impl FnOnce(&Path) -> Result<Database, redb::DatabaseError>,
) -> Result<Database, LogError> {
    open(path).map_err(|e| match e {
        redb::DatabaseError::DatabaseAlreadyOpen => {
            LogError::Locked(path.parent().unwrap_or(path).to_path_buf())
        }
        redb::DatabaseError::Storage(redb::StorageError::Io(io)) => LogError::DataDir {
            path: path.to_path_buf(),
            source: io,
        },
        other => LogError::Open {
            path: path.to_path_buf(),
            source: Box::new(other),
        },
    })
}

/// Milliseconds since the Unix epoch, chosen by proposers (never by apply).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Log {
    /// Opens the log under `cfg.data_dir` and initialises a new single-voter cluster on first
    /// start (unless `cfg.join`). A node that is the only voter returns once it leads and has
    /// applied everything committed before; a member of a larger cluster returns at once and
    /// follows (serve [`Log::serve_raft`] so that the leader reaches it).
    pub async fn open(cfg: LogConfig) -> Result<Self, LogError> {
        let dir = &cfg.data_dir;
        // Owner only, as etcd's: the log holds every spec and sealed secret.
        crate::backup::private_dir(dir).map_err(|source| LogError::DataDir {
            path: dir.clone(),
            source,
        })?;
        if dir.join(crate::backup::RESTORING).exists() {
            return Err(LogError::Restoring(dir.clone()));
        }
        let probe = dir.join(".write-probe");
        std::fs::write(&probe, b"")
            .and_then(|_| std::fs::remove_file(&probe))
            .map_err(|source| LogError::DataDir {
                path: dir.clone(),
                source,
            })?;

        let metrics = Metrics::new(&opentelemetry::global::meter("rune"));
        let log_dir = dir.join(LOG_DIR);
        let wal_err = |e: crate::wal::WalError| match e {
            crate::wal::WalError::Locked(_) => LogError::Locked(dir.clone()),
            e => LogError::Wal(e),
        };
        if let Some(moved) = migrate_redb(&dir.join(LEGACY_LOG_FILE), &log_dir).map_err(wal_err)? {
            tracing::info!(
                entries = moved,
                "moved the raft log from redb into its write-ahead log"
            );
        }
        let (log_store, log_closed) = LogStore::open(&log_dir, metrics.clone()).map_err(wal_err)?;
        let db = open_db(&dir.join(STATE_FILE), |p| Database::create(p))?;
        let (sm, state_closed) = StateMachine::new(db, dir.join(SNAPSHOT_DIR), metrics.clone());
        let (state, notifier) = (sm.db.clone(), sm.notifier.clone());
        let config = Config {
            cluster_name: "rune".into(),
            // A follower that heard a leader waits out the leader's lease (openraft: the
            // maximum election timeout) and then an election timeout before it stands:
            // 900 + 600..900 ms, so a new leader is elected under 2 s after the old one died
            // (`--bench cluster`). Heartbeats at a fraction of that keep a loaded follower from
            // standing while its leader lives. openraft also gives each AppendEntries the
            // heartbeat interval to answer, so one carries at most `max_payload_entries`.
            heartbeat_interval: 200,
            election_timeout_min: 600,
            election_timeout_max: 900,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_every.max(1)),
            max_in_snapshot_log_to_keep: cfg.keep_after_snapshot,
            purge_batch_size: 1024,
            // Entries hold up to `MAX_BATCH` proposals each: 64 of them stay well inside the
            // heartbeat a follower has to answer, and a follower catching up takes 64 per round
            // trip.
            max_payload_entries: 64,
            snapshot_max_chunk_size: SNAPSHOT_CHUNK,
            install_snapshot_timeout: 5_000,
            ..Default::default()
        }
        .validate()
        .map_err(|e| LogError::Raft(e.to_string()))?;
        let id = cfg.node_id;
        let tls = cfg.tls.clone().map(Arc::new);
        let network = Network::new(tls.clone());
        let contacts = network.contacts();
        let solo = log_store.solo_switch();
        let raft = Raft::new(id, Arc::new(config), network, log_store, sm)
            .await
            .map_err(|e| LogError::Raft(e.to_string()))?;
        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| LogError::Raft(e.to_string()))?;
        if !initialized && !cfg.join {
            let members = BTreeMap::from([(id, BasicNode::new(&cfg.address))]);
            raft.initialize(members)
                .await
                .map_err(|e| LogError::Raft(e.to_string()))?;
            tracing::info!(node = id, "initialised a new single-voter cluster");
        }
        // Alone, this node is its own quorum: open returns once it leads and has applied what
        // was committed. A member of a larger cluster (or one waiting to join) cannot decide
        // that alone; it starts following and catches up from the leader.
        // Asked of raft's core, not its metrics, which may not show the membership yet.
        let alone = raft
            .with_raft_state(move |st| st.membership_state.effective().membership().voter_ids().eq([id]))
            .await
            .map_err(|e| LogError::Raft(e.to_string()))?;
        follow_solo(&raft, id, solo);
        let log = Self {
            contacts,
            followers: Default::default(),
            forwarder: Forwarder::new(tls.clone()),
            tls,
            batcher: Batcher::new(raft.clone(), metrics.clone()),
            state_closed,
            leader_changes: count_leader_changes(&raft),
            raft,
            state,
            notifier,
            metrics,
            log_closed,
            space: Arc::new(Space::new(dir, cfg.reserve_bytes)),
        };
        if !alone {
            tracing::info!(
                node = id,
                joining = !initialized,
                "raft started as a member of a cluster"
            );
            return Ok(log);
        }
        log.raft
            .wait(Some(Duration::from_secs(30)))
            .state(ServerState::Leader, "become leader")
            .await
            .map_err(|e| LogError::Raft(format!("did not become leader: {e}")))?;
        // Leadership commits a blank entry; wait until it, and all before it, is applied.
        let last = log.raft.metrics().borrow().last_log_index.unwrap_or(0);
        log.raft
            .wait(Some(Duration::from_secs(30)))
            .applied_index_at_least(Some(last), "apply committed entries")
            .await
            .map_err(|e| LogError::Raft(format!("did not catch up: {e}")))?;
        // A data dir founded before it had a raft port knows itself as `local`: the address
        // the others will dial is recorded once it has one.
        let recorded = {
            let m = log.raft.metrics();
            let m = m.borrow();
            m.membership_config
                .membership()
                .get_node(&id)
                .map(|n| n.addr.clone())
        };
        if recorded.as_deref().is_some_and(|a| a != cfg.address) {
            let nodes = BTreeMap::from([(id, BasicNode::new(&cfg.address))]);
            log.raft
                .change_membership(openraft::ChangeMembers::SetNodes(nodes), true)
                .await
                .map_err(|e| LogError::Membership(format!("recording this node's address: {e}")))?;
            tracing::info!(node = id, address = %cfg.address, "recorded this node's raft address");
        }
        tracing::info!(applied = last, "log open");
        Ok(log)
    }

    /// Proposes a command and waits until it is durable, committed and applied.
    ///
    /// `Ok` means the write survives any crash from now on. The outcome may still be a rejection
    /// decided by apply, which changed nothing. On a follower the proposal goes to the leader
    /// (while an election runs, it waits up to [`LEADER_WAIT`] for one) and `Ok` comes once
    /// this member has applied it too. [`ProposeError::Unavailable`] may follow a write that
    /// did happen (a leader lost after it took the write): the caller reads before it retries
    /// anything that is not idempotent.
    pub async fn propose(&self, command: Command) -> Result<Proposed, ProposeError> {
        if let Err(e) = self.space.check(self.space.need(command.uses_reserve())) {
            self.metrics
                .refused_no_space
                .add(1, &[opentelemetry::KeyValue::new("command", command.kind())]);
            return Err(e.into());
        }
        let started = Instant::now();
        self.metrics
            .proposals
            .add(1, &[opentelemetry::KeyValue::new("command", command.kind())]);
        let envelope = Envelope::new(now_ms(), command);
        let r = self.route(envelope).await;
        self.metrics
            .propose_seconds
            .record(started.elapsed().as_secs_f64(), &[]);
        r
    }

    /// Proposes `envelope` here when this node leads (or knows no leader: raft answers), else
    /// through the leader. A leader that could not be reached at all, or no longer leads, did
    /// not take it: the next one is asked, until [`LEADER_WAIT`] has passed.
    async fn route(&self, envelope: Envelope) -> Result<Proposed, ProposeError> {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        loop {
            let Some((leader, addr)) = self.leader_elsewhere(deadline).await else {
                return self.batcher.propose(envelope).await;
            };
            let why = match self.forwarder.propose(leader, &addr, &envelope).await {
                // As on the leader, the write is applied here before its proposer hears OK, so
                // that a read (or a token check) after it sees it.
                Ok(p) => return self.applied_here(p).await,
                Err(Forward::Failed(e)) => return Err(e),
                Err(Forward::Retry(why)) => why,
            };
            if !self.leader_changed(leader, deadline).await {
                return Err(ProposeError::Unavailable(why));
            }
        }
    }

    /// Waits until this member sees the leader change from `leader` (or an election start);
    /// false when `deadline` passed first.
    async fn leader_changed(&self, leader: u64, deadline: tokio::time::Instant) -> bool {
        let mut m = self.raft.metrics();
        let changed =
            tokio::time::timeout_at(deadline, m.wait_for(|m| m.current_leader != Some(leader))).await;
        matches!(changed, Ok(Ok(_)))
    }

    /// Waits up to [`APPLY_WAIT`] until this member has applied `index`.
    async fn applied_up_to(&self, index: u64) -> bool {
        let mut applied = self.applied();
        tokio::time::timeout(APPLY_WAIT, applied.wait_for(|a| *a >= index))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Waits until this member has applied `p`'s entry, then hands `p` back.
    async fn applied_here(&self, p: Proposed) -> Result<Proposed, ProposeError> {
        if self.applied_up_to(p.index).await {
            return Ok(p);
        }
        Err(ProposeError::Unavailable(format!(
            "written at index {} by the leader, but not applied here within {APPLY_WAIT:?}",
            p.index
        )))
    }

    /// The leader and its raft address when another member leads. While no leader is known
    /// (an election), waits until `deadline` for one; none (or this node) means propose here,
    /// where raft answers for itself.
    async fn leader_elsewhere(&self, deadline: tokio::time::Instant) -> Option<(u64, String)> {
        let mut m = self.raft.metrics();
        let (stopped, electing) = {
            let now = m.borrow();
            let stopped = now.running_state.is_err() || now.state == ServerState::Shutdown;
            (stopped, now.current_leader.is_none())
        };
        // A stopped raft keeps its last leader in its metrics: its own batcher says it stopped.
        if stopped {
            return None;
        }
        if electing {
            let _ = tokio::time::timeout_at(deadline, m.wait_for(|m| m.current_leader.is_some())).await;
        }
        let m = m.borrow();
        let leader = m.current_leader.filter(|l| *l != m.id)?;
        let node = m.membership_config.membership().get_node(&leader)?;
        Some((leader, node.addr.clone()))
    }

    /// A read view of the applied state. Reads see a consistent state at some applied index.
    pub fn read(&self) -> Result<ReadTransaction, LogError> {
        self.state.read().map_err(LogError::Storage)
    }

    /// A read view and the applied index it is the state at, read from inside the view (the
    /// applied watch can trail the state by an entry): what a watch lists from, so that it
    /// streams exactly the entries after what it listed.
    pub fn read_indexed(&self) -> Result<(ReadTransaction, u64), LogError> {
        let txn = self.read()?;
        let (last, _) = crate::state_machine::applied_state_in(&txn).map_err(LogError::Storage)?;
        Ok((txn, last.map_or(0, |l| l.index)))
    }

    /// Runs `f` over the state table as applied so far, without committing what applies left
    /// open (see [`crate::db::StateDb::latest`]): for a short read before each write. Waits
    /// for a running apply without holding a thread; applies wait while `f` runs, and `f` must
    /// not read the state any other way (it would deadlock).
    pub async fn with_state<T>(&self, f: impl FnOnce(crate::db::StateTable<'_>) -> T) -> Result<T, LogError> {
        self.state.latest(STATE_TABLE, f).await.map_err(LogError::Storage)
    }

    /// A read view that includes every write acknowledged before this call, on any member: a
    /// follower asks the leader for its read index (confirmed with a quorum, raft's ReadIndex)
    /// and reads once it has applied that far.
    pub async fn read_linearizable(&self) -> Result<ReadTransaction, LogError> {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        loop {
            let Some((leader, addr)) = self.leader_elsewhere(deadline).await else {
                self.raft
                    .ensure_linearizable()
                    .await
                    .map_err(|e| LogError::Raft(e.to_string()))?;
                return self.read();
            };
            let why = match self.forwarder.read_index(leader, &addr).await {
                Ok(index) if self.applied_up_to(index).await => return self.read(),
                Ok(index) => {
                    format!("did not apply up to the leader's read index {index} within {APPLY_WAIT:?}")
                }
                Err(Forward::Failed(e)) => return Err(LogError::Raft(e.to_string())),
                Err(Forward::Retry(why)) => why,
            };
            if !self.leader_changed(leader, deadline).await {
                return Err(LogError::Raft(why));
            }
        }
    }

    /// Changes after every applied entry that wrote a user, policy or token (and when the state
    /// is replaced), before that entry's proposer hears OK: a cache of what those records decide
    /// is current while this stays what it was when the cache was filled (read it before
    /// reading the state).
    pub fn identity_epoch(&self) -> u64 {
        self.notifier
            .identity_epoch
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// The applied index, watchable: projections wait on it.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.notifier.applied.subscribe()
    }

    /// Failpoint (`runed --enable-failpoints` only): overwrites one state record with bytes
    /// that do not decode, outside the log, and tells the projections the state was replaced,
    /// as damage found at rest would. Tests use it to show that a record nobody can read stops
    /// nothing; nothing else may call it.
    pub fn corrupt_record_for_tests(&self, key: &str) -> Result<(), LogError> {
        self.state
            .write(|txn| {
                let mut t = txn.open_table(STATE_TABLE).map_err(|e| e.to_string())?;
                t.insert(key, b"{ not a record".as_slice())
                    .map_err(|e| e.to_string())?;
                Ok(())
            })
            .map_err(LogError::Storage)?;
        self.notifier.identity_changed();
        let index = *self.notifier.applied.borrow();
        let _ = self.notifier.events.send(Arc::new(AppliedEntry {
            index,
            term: 0,
            proposed_at_ms: 0,
            command: "corrupt_record_for_tests".into(),
            changes: vec![],
            deltas: vec![],
            reset: true,
            ends_entry: true,
        }));
        Ok(())
    }

    /// Applied entries from now on. A receiver that lags must re-read the state and resubscribe.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<AppliedEntry>> {
        self.notifier.events.subscribe()
    }

    /// Runs `follower` (a loop over [`Log::subscribe`]: a projection, a metric) on the one task
    /// that every follower shares, so that an applied entry wakes one task, not one per
    /// follower. It must not block: its waits are its own, its CPU work is taken in turn.
    pub fn follow(
        &self,
        name: &'static str,
        follower: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        self.followers.run(name, Box::pin(follower));
    }

    /// True while raft runs, this node knows a leader (itself, when alone) and its state can be
    /// read: the `/healthz` condition. A follower that hears its leader is healthy; a leader
    /// that no quorum has acknowledged for [`QUORUM_SILENCE_MS`] is not, nor a follower once
    /// its election timeout has passed without a leader.
    pub fn healthy(&self) -> bool {
        let ok = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let leads = m.current_leader == Some(m.id);
            let voters = m.membership_config.membership().voter_ids().count();
            // openraft's leader does not step down when it loses its quorum: it is cut off
            // when no quorum has acknowledged it for longer than an election takes.
            let heard = !leads
                || voters <= 1
                || m.millis_since_quorum_ack
                    .is_some_and(|ms| ms <= QUORUM_SILENCE_MS);
            m.running_state.is_ok() && m.current_leader.is_some() && heard
        };
        ok && self.read().is_ok()
    }

    /// Whether raft runs and the state reads: what a watchdog asks. A member cut off from its
    /// quorum is alive (it serves what it has applied and rejoins when the network heals)
    /// though not [`Log::healthy`]; restarting it would not bring the others back.
    pub fn alive(&self) -> bool {
        self.raft.metrics().borrow().running_state.is_ok() && self.read().is_ok()
    }

    /// Serves this node's raft port on `listener`, where the other members reach
    /// [`LogConfig::address`], over mutual TLS with [`LogConfig::tls`] (see
    /// [`crate::network::RaftPort`]). Without certificates only a loopback address is served:
    /// the port takes writes and log entries, so plain text is for tests on one machine.
    /// With `joins`, new nodes may ask to join here ([`crate::join`]).
    pub fn serve_raft(
        &self,
        listener: tokio::net::TcpListener,
        joins: Option<crate::join::Joins>,
    ) -> Result<RaftPort, LogError> {
        if self.tls.is_none() && !listener.local_addr().is_ok_and(|a| a.ip().is_loopback()) {
            return Err(LogError::Raft(
                "the raft port serves other hosts only over mutual TLS: this node has no cluster certificate"
                    .into(),
            ));
        }
        let service = RaftService::server(
            self.raft.clone(),
            self.batcher.clone(),
            self.space.clone(),
            joins.map(Arc::new),
        );
        let gate = crate::network::Gate::new(self.raft.clone(), self.tls.is_some(), self.state.clone());
        RaftPort::start(service, gate, listener, self.tls.as_deref())
            .map_err(|e| LogError::Raft(format!("raft port: {e}")))
    }

    /// Adds node `id`, reached at `address`, as a voter: first as a learner, which receives the
    /// log (or a snapshot) until it has caught up, then into the voters in one joint-consensus
    /// change. Only the leader can. A learner that does not catch up within `catch_up` (down,
    /// a wrong address, a certificate the port refuses) is taken out again and the call fails.
    pub async fn add_voter(&self, id: u64, address: &str, catch_up: Duration) -> Result<(), LogError> {
        let at = add_learner(&self.raft, id, address).await?;
        promote(&self.raft, id, address, at, catch_up).await
    }

    /// Takes node `id` out of the cluster (voter or learner), never the last voter. The leader
    /// makes the change: asked of a follower, it hands the request to the leader over the raft
    /// port. A leader that removes itself steps down once the change is committed.
    pub async fn remove_member(&self, id: u64) -> Result<(), LogError> {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        loop {
            let Some((leader, addr)) = self.leader_elsewhere(deadline).await else {
                return remove_member(&self.raft, id).await;
            };
            let why = match self.forwarder.remove(leader, &addr, id).await {
                Ok(done) => return done.map_err(LogError::Membership),
                Err(Forward::Failed(e)) => return Err(LogError::Membership(e.to_string())),
                Err(Forward::Retry(why)) => why,
            };
            if !self.leader_changed(leader, deadline).await {
                return Err(LogError::Membership(why));
            }
        }
    }

    /// A consistent view of the applied state for an online backup: one read transaction, so
    /// writes go on while it is read. See [`crate::backup`].
    pub fn backup(&self) -> Result<crate::backup::Source, LogError> {
        let txn = self.read()?;
        let size = std::fs::metadata(self.space.dir().join(STATE_FILE)).map_or(0, |m| m.len());
        crate::backup::open_source(txn, now_ms(), size).map_err(|e| LogError::Storage(e.to_string()))
    }

    /// The data dir's free-space reserve, for health and metrics.
    pub fn space(&self) -> &Space {
        &self.space
    }

    /// Resolves when raft has stopped for good on its own (a storage failure such as a full
    /// disk), with why. Nothing can be written afterwards: runed exits so that its supervisor
    /// restarts it, and the restart recovers from the log.
    pub async fn failed(&self) -> String {
        // Waits on the server metrics: they change with the role or the leader, not with every
        // write as the full metrics do (which woke this task once per write), and their sender
        // goes away when raft's core stops, after it has recorded why.
        let mut server = self.raft.server_metrics();
        loop {
            if let Err(e) = &self.raft.metrics().borrow().running_state {
                return e.to_string();
            }
            if server.changed().await.is_err() {
                return match &self.raft.metrics().borrow().running_state {
                    Err(e) => e.to_string(),
                    Ok(()) => "raft stopped".into(),
                };
            }
        }
    }

    /// (term, last log index, applied index) for status and metrics.
    pub fn positions(&self) -> (u64, u64, u64) {
        let m = self.raft.metrics().borrow().clone();
        (
            m.current_term,
            m.last_log_index.unwrap_or(0),
            m.last_applied.map(|l| l.index).unwrap_or(0),
        )
    }

    /// How many times this node has seen the leader change since it opened the log (the
    /// leader it found at open counts as one).
    pub fn leader_changes(&self) -> u64 {
        self.leader_changes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every member's own view, asked over the raft port (this node's from its metrics); a
    /// member that does not answer within a second has its error instead.
    pub async fn member_views(&self) -> Vec<(u64, Result<MemberView, String>)> {
        let status = self.cluster_status();
        let mine = MemberView::from(&status);
        let (me, mine) = (status.node, &mine);
        let asks = status.members.iter().map(|m| async move {
            if m.id == me || m.address == "local" {
                return (m.id, Ok(mine.clone()));
            }
            let asked =
                tokio::time::timeout(Duration::from_secs(1), self.forwarder.status(m.id, &m.address)).await;
            let view = match asked {
                Ok(v) => v,
                Err(_) => Err("no answer within 1s".to_string()),
            };
            (m.id, view)
        });
        futures::future::join_all(asks).await
    }

    /// On the leader: makes a voter of every learner that holds the log to within one
    /// AppendEntries of its end, and returns their ids. A join's promotion runs in the leader
    /// that admitted it; after a leader change this finishes it.
    pub async fn promote_learners(&self) -> Vec<u64> {
        let ready: Vec<u64> = {
            let m = self.raft.metrics();
            let m = m.borrow();
            if m.current_leader != Some(m.id) {
                return Vec::new();
            }
            let last = m.last_log_index.unwrap_or(0);
            let membership = m.membership_config.membership();
            let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
            membership
                .nodes()
                .map(|(id, _)| *id)
                .filter(|id| !voters.contains(id))
                .filter(|id| {
                    m.replication
                        .as_ref()
                        .and_then(|r| r.get(id).copied().flatten())
                        .is_some_and(|l| l.index + 64 >= last)
                })
                .collect()
        };
        let mut promoted = Vec::new();
        for id in ready {
            let ids = std::collections::BTreeSet::from([id]);
            match self
                .raft
                .change_membership(openraft::ChangeMembers::AddVoterIds(ids), false)
                .await
            {
                Ok(_) => promoted.push(id),
                Err(e) => tracing::debug!(node = id, error = %e, "learner not promoted yet"),
            }
        }
        promoted
    }

    /// When member `id` last answered this node's raft RPCs (a leader hears each member every
    /// heartbeat; a follower sends nothing): none if it never did.
    pub fn last_contact(&self, id: u64) -> Option<std::time::Instant> {
        self.contacts.last(id)
    }

    /// This node's view of the raft cluster, as `rune admin cluster status` shows it: read
    /// from raft's metrics, so it costs no log entry and answers while writes are refused.
    pub fn cluster_status(&self) -> ClusterStatus {
        ClusterStatus::from_metrics(&self.raft.metrics().borrow())
    }

    /// Takes a snapshot of everything applied so far (and purges the log behind it), and waits
    /// until it is written.
    pub async fn snapshot(&self) -> Result<(), LogError> {
        let applied = self.positions().2;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.raft
                .trigger()
                .snapshot()
                .await
                .map_err(|e| LogError::Raft(e.to_string()))?;
            // Raft ignores the trigger while it builds another snapshot (one of its own, taken
            // every `snapshot_every` entries): if that one ends short of `applied`, ask again.
            let waited = self
                .raft
                .wait(Some(Duration::from_secs(2)))
                .metrics(
                    |m| m.snapshot.is_some_and(|s| s.index >= applied),
                    "snapshot written",
                )
                .await;
            match waited {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(LogError::Raft(e.to_string())),
                Err(openraft::metrics::WaitError::Timeout(..)) => continue,
                Err(e) => return Err(LogError::Raft(e.to_string())),
            }
        }
    }

    /// Stops raft and makes the applied state durable, so the next start replays nothing.
    /// Later proposals fail with [`ProposeError::Unavailable`]; reads still work.
    pub async fn shutdown(&self) -> Result<(), LogError> {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft did not shut down cleanly");
        }
        tokio::task::block_in_place(|| self.state.commit(redb::Durability::Immediate))
            .map_err(LogError::Storage)
    }

    /// [`Log::shutdown`], then closes both databases, so that another process (or another
    /// `Log::open` in this one) may open them when this returns.
    pub async fn close(self) -> Result<(), LogError> {
        let durable = self.shutdown().await;
        let Log {
            raft,
            state,
            log_closed,
            state_closed,
            ..
        } = self;
        drop(raft);
        drop(state);
        // openraft's workers release their handles on the databases as they wind down.
        for (name, closed) in [(LOG_DIR, log_closed), (STATE_FILE, state_closed)] {
            if tokio::time::timeout(Duration::from_secs(10), closed)
                .await
                .is_err()
            {
                tracing::warn!(file = name, "database still in use 10 s after shutdown");
            }
        }
        durable
    }
}

/// Counts changes of the leader raft reports, on a task that ends with raft. Follows the
/// server metrics, which change with the role and the leader only, not with every write.
fn count_leader_changes(raft: &Raft<TypeConfig>) -> Arc<std::sync::atomic::AtomicU64> {
    let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut server = raft.server_metrics();
    let c = count.clone();
    tokio::spawn(async move {
        let mut seen = None;
        loop {
            let (leader, term) = {
                let m = server.borrow_and_update();
                (m.current_leader, m.vote.leader_id().term)
            };
            // As etcd counts: a leader after none (a new election) or another leader.
            if let Some(l) = leader.filter(|_| leader != seen) {
                c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // One line per change, with its term: an operator (or a test) can check that
                // no term ever had two leaders.
                tracing::info!(leader = l, term, "raft leader changed");
            }
            seen = leader;
            if server.changed().await.is_err() {
                return;
            }
        }
    });
    count
}

/// Keeps the log's solo switch ([`LogStore::solo_switch`]) on while this node is the only
/// voter, on a task that ends with raft.
fn follow_solo(raft: &Raft<TypeConfig>, id: u64, solo: Arc<std::sync::atomic::AtomicBool>) {
    let mut server = raft.server_metrics();
    tokio::spawn(async move {
        loop {
            let alone = server
                .borrow_and_update()
                .membership_config
                .membership()
                .voter_ids()
                .eq([id]);
            solo.store(alone, std::sync::atomic::Ordering::Relaxed);
            if server.changed().await.is_err() {
                return;
            }
        }
    });
}

/// One member of the raft cluster, as this node knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterMember {
    /// Raft's node id.
    pub id: u64,
    /// Where its raft traffic goes (`local` for the single-voter cluster).
    pub address: String,
    /// A voter counts towards the quorum; a learner only receives the log.
    pub voter: bool,
    /// The last log index known to be on its disk; only the leader tracks it.
    pub matched: Option<u64>,
}

/// This node's view of the cluster: its role, the term, who leads, how far the log reached
/// and who the members are. The same fields `etcdctl endpoint status` shows, so an operator
/// can tell a stuck apply (applied behind committed) from a lost quorum (no leader).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterStatus {
    /// This node's raft id.
    pub node: u64,
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub role: &'static str,
    /// The current term.
    pub term: u64,
    /// The leader this node follows (itself when it leads), if it knows one.
    pub leader: Option<u64>,
    /// The last index in this node's log.
    pub last_index: u64,
    /// The highest index a quorum of voters holds: known to the leader only.
    pub committed: Option<u64>,
    /// The last index applied to the state.
    pub applied: u64,
    /// The last index the latest snapshot covers.
    pub snapshot: Option<u64>,
    /// The log was purged up to and including this index (it lives on in the snapshot).
    pub purged: Option<u64>,
    /// Milliseconds since a quorum last acknowledged this leader; none when not leading.
    pub millis_since_quorum_ack: Option<u64>,
    /// The members, voters first, by id.
    pub members: Vec<ClusterMember>,
}

/// What a majority of voters holds, given each voter's matched index: the quorum-th highest.
fn quorum_index(mut held: Vec<u64>) -> Option<u64> {
    held.sort_unstable_by(|a, b| b.cmp(a));
    held.get(held.len() / 2).copied()
}

/// One member's own view, as it answers a peer that asks ([`Log::member_views`]): what an
/// operator compares across members (who leads in which term, how far each applied).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemberView {
    /// Its raft id.
    pub node: u64,
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub role: String,
    /// Its current term.
    pub term: u64,
    /// The leader it follows.
    pub leader: Option<u64>,
    /// The last index in its log.
    pub last_index: u64,
    /// The last index it applied.
    pub applied: u64,
}

impl From<&ClusterStatus> for MemberView {
    fn from(s: &ClusterStatus) -> Self {
        Self {
            node: s.node,
            role: s.role.to_string(),
            term: s.term,
            leader: s.leader,
            last_index: s.last_index,
            applied: s.applied,
        }
    }
}

impl ClusterStatus {
    pub(crate) fn from_metrics(m: &openraft::RaftMetrics<u64, BasicNode>) -> Self {
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        let matched = |id: &u64| -> Option<u64> {
            m.replication
                .as_ref()
                .and_then(|r| r.get(id).copied().flatten())
                .map(|l| l.index)
        };
        let mut members: Vec<ClusterMember> = membership
            .nodes()
            .map(|(id, node)| ClusterMember {
                id: *id,
                address: node.addr.clone(),
                voter: voters.contains(id),
                matched: matched(id),
            })
            .collect();
        members.sort_by_key(|x| (!x.voter, x.id));
        let committed = m
            .replication
            .as_ref()
            .and_then(|_| quorum_index(voters.iter().map(|id| matched(id).unwrap_or(0)).collect()));
        Self {
            node: m.id,
            role: match m.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            },
            term: m.current_term,
            leader: m.current_leader,
            last_index: m.last_log_index.unwrap_or(0),
            committed,
            applied: m.last_applied.map_or(0, |l| l.index),
            snapshot: m.snapshot.map(|l| l.index),
            purged: m.purged.map(|l| l.index),
            millis_since_quorum_ack: m.millis_since_quorum_ack,
            members,
        }
    }
}

/// Adds node `id` at `address` as a learner (the leader starts sending it the log) and returns
/// the index of that membership change, once committed.
pub(crate) async fn add_learner(raft: &Raft<TypeConfig>, id: u64, address: &str) -> Result<u64, LogError> {
    let added = raft
        .add_learner(id, BasicNode::new(address), false)
        .await
        .map_err(|e| LogError::Membership(e.to_string()))?;
    Ok(added.log_id.index)
}

/// Makes learner `id` a voter once it holds the log up to `at`; one that does not within
/// `catch_up` is taken out again.
pub(crate) async fn promote(
    raft: &Raft<TypeConfig>,
    id: u64,
    address: &str,
    at: u64,
    catch_up: Duration,
) -> Result<(), LogError> {
    let caught_up = raft
        .wait(Some(catch_up))
        .metrics(
            |m| {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(&id).copied().flatten())
                    .is_some_and(|l| l.index >= at)
            },
            "the new learner caught up",
        )
        .await;
    let ids = std::collections::BTreeSet::from([id]);
    if let Err(e) = caught_up {
        if let Err(undo) = raft
            .change_membership(openraft::ChangeMembers::RemoveNodes(ids), false)
            .await
        {
            tracing::warn!(node = id, error = %undo, "could not take out a learner that did not catch up");
        }
        return Err(LogError::Membership(format!(
            "node {id} at {address} did not catch up: {e}"
        )));
    }
    // Only this id is added to the voters: a concurrent change is not undone.
    raft.change_membership(openraft::ChangeMembers::AddVoterIds(ids), false)
        .await
        .map_err(|e| LogError::Membership(e.to_string()))?;
    tracing::info!(node = id, address, "added a voter");
    Ok(())
}

/// Takes node `id` out of the cluster, on the leader (see [`Log::remove_member`]).
pub(crate) async fn remove_member(raft: &Raft<TypeConfig>, id: u64) -> Result<(), LogError> {
    let refused = |e: &dyn std::fmt::Display| LogError::Membership(e.to_string());
    let (voters, known) = {
        let m = raft.metrics();
        let m = m.borrow();
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        let known = membership.nodes().any(|(n, _)| *n == id);
        (voters, known)
    };
    if !known {
        return Err(LogError::Membership(format!("node {id} is not a member")));
    }
    let ids = std::collections::BTreeSet::from([id]);
    if voters.contains(&id) {
        if voters.len() == 1 {
            return Err(LogError::Membership(format!(
                "node {id} is the last voter; removing it would leave no cluster"
            )));
        }
        // With retain = false the voter leaves the membership altogether, not as a learner.
        raft.change_membership(openraft::ChangeMembers::RemoveVoters(ids), false)
            .await
            .map_err(|e| refused(&e))?;
    } else {
        raft.change_membership(openraft::ChangeMembers::RemoveNodes(ids), false)
            .await
            .map_err(|e| refused(&e))?;
    }
    tracing::info!(node = id, "removed a member");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::quorum_index;

    #[test]
    fn committed_is_what_a_majority_of_voters_holds() {
        assert_eq!(quorum_index(vec![]), None);
        assert_eq!(quorum_index(vec![7]), Some(7));
        // Two voters: both must hold it.
        assert_eq!(quorum_index(vec![9, 4]), Some(4));
        // Three: any two.
        assert_eq!(quorum_index(vec![3, 10, 8]), Some(8));
        // Four: any three.
        assert_eq!(quorum_index(vec![10, 9, 8, 1]), Some(8));
        assert_eq!(quorum_index(vec![5, 0, 0, 5, 5]), Some(5));
    }
}
