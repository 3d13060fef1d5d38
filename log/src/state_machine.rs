//! The openraft state machine over `state.redb`: applies committed entries with
//! `rune_statemachine::store::apply` and tells the projections what changed.
//!
//! Applies commit without fsync (`Durability::None`), and after their replies (see
//! [`crate::db::StateDb`]): after a crash redb reopens at its last durable commit and openraft
//! re-applies the committed entries after it from the log, which was fsynced before any client
//! heard OK. A snapshot first makes the state durable, so the state is never behind a purged part
//! of the log.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use rune_statemachine::delta::Delta;
use rune_statemachine::store::{self, scan_prefix};
use rune_statemachine::{Change, STATE_TABLE};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use crate::db::StateDb;
use crate::metrics::Metrics;
use crate::snapshot;
use crate::types::{Reply, TypeConfig};

/// `last_applied` and `membership`, as JSON; written in the same transaction as the state.
pub(crate) const SM_META: TableDefinition<&str, &[u8]> = TableDefinition::new("sm_meta");
/// The highest raft id any membership applied here held: ids are never given twice, so a
/// certificate naming a lower id that the membership lacks is a removed node's.
pub(crate) const HIGHEST_MEMBER: &str = "highest_member";

type SErr = StorageError<u64>;

fn sm_err(e: impl std::fmt::Display) -> SErr {
    StorageIOError::write_state_machine(AnyError::error(e.to_string())).into()
}

/// What one applied entry changed: the event the projections tail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppliedEntry {
    /// Log index of the entry.
    pub index: u64,
    /// Raft term of the entry.
    pub term: u64,
    /// When it was proposed (proposer's clock).
    pub proposed_at_ms: i64,
    /// The command's kind.
    pub command: String,
    /// What changed; empty when the command was rejected or changed nothing.
    pub changes: Vec<Change>,
    /// The typed records of what it wrote, which projections apply (see
    /// [`crate::projection`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deltas: Vec<Delta>,
    /// The whole state was replaced (a snapshot was installed): a projection must rebuild.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reset: bool,
    /// The last event of its log entry. An entry carries many writes, sent as an event each,
    /// so a reader can hold the first ones of an entry before the rest arrive: it has applied
    /// `index` once it has applied this one. Every entry ends with one, raft's own (a blank
    /// entry, a membership change) too, as an event of no changes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ends_entry: bool,
}

/// The applied-index watch and the event stream, shared by the state machine and [`crate::Log`].
pub(crate) struct Notifier {
    pub applied: watch::Sender<u64>,
    pub events: broadcast::Sender<Arc<AppliedEntry>>,
    /// Bumped after each commit that wrote under [`store::IDENTITY_PREFIXES`] (and when the
    /// whole state is replaced), before anyone hears OK for it.
    pub identity_epoch: AtomicU64,
}

impl Notifier {
    pub(crate) fn identity_changed(&self) {
        self.identity_epoch.fetch_add(1, Ordering::Release);
    }
}

/// The state machine handed to openraft.
pub struct StateMachine {
    pub(crate) db: Arc<StateDb>,
    pub(crate) snapshot_dir: PathBuf,
    pub(crate) notifier: Arc<Notifier>,
    pub(crate) metrics: Metrics,
}

/// What [`apply_entries`] did.
pub(crate) struct Applied {
    /// One reply per entry.
    pub replies: Vec<Reply>,
    /// One event per envelope.
    pub events: Vec<AppliedEntry>,
    /// Whether a record under [`store::IDENTITY_PREFIXES`] was written.
    pub identity: bool,
}

/// Applies entries to `db` in one transaction; shared by the live node and offline replay.
pub(crate) fn apply_entries(
    db: &Database,
    entries: &[Entry<TypeConfig>],
    durability: Durability,
) -> Result<Applied, String> {
    let mut txn = db.begin_write().map_err(|e| e.to_string())?;
    txn.set_durability(durability).map_err(|e| e.to_string())?;
    let applied = apply_in(&txn, entries)?;
    txn.commit().map_err(|e| e.to_string())?;
    Ok(applied)
}

/// Applies entries inside `txn`, leaving it to the caller to commit.
fn apply_in(txn: &WriteTransaction, entries: &[Entry<TypeConfig>]) -> Result<Applied, String> {
    let mut replies = Vec::with_capacity(entries.len());
    let mut events = Vec::new();
    let mut identity = false;
    {
        let mut table = txn.open_table(STATE_TABLE).map_err(|e| e.to_string())?;
        let mut meta = txn.open_table(SM_META).map_err(|e| e.to_string())?;
        for e in entries {
            let first = events.len();
            let reply = match &e.payload {
                EntryPayload::Blank => Reply(vec![]),
                EntryPayload::Membership(m) => {
                    let sm = StoredMembership::new(Some(e.log_id), m.clone());
                    let v = serde_json::to_vec(&sm).map_err(|e| e.to_string())?;
                    meta.insert("membership", v.as_slice())
                        .map_err(|e| e.to_string())?;
                    let highest = m.nodes().map(|(id, _)| *id).max().unwrap_or(0);
                    let before = meta
                        .get(HIGHEST_MEMBER)
                        .map_err(|e| e.to_string())?
                        .and_then(|v| serde_json::from_slice::<u64>(v.value()).ok())
                        .unwrap_or(0);
                    if highest > before {
                        let v = serde_json::to_vec(&highest).map_err(|e| e.to_string())?;
                        meta.insert(HIGHEST_MEMBER, v.as_slice())
                            .map_err(|e| e.to_string())?;
                    }
                    Reply(vec![])
                }
                EntryPayload::Normal(batch) => {
                    let mut outcomes = Vec::with_capacity(batch.envelopes.len());
                    for env in batch.envelopes.iter() {
                        let (outcome, writes) = store::apply_traced(&mut table, e.log_id.index, env)
                            .map_err(|e| e.to_string())?;
                        identity |= writes
                            .iter()
                            .any(|(k, _)| store::IDENTITY_PREFIXES.iter().any(|p| k.starts_with(p)));
                        // The typed values this apply wrote; one of another type than the delta
                        // wants is decoded, and failing to is a bug.
                        let deltas = writes
                            .iter()
                            .filter_map(|(k, v)| Delta::from_written(k, v.as_ref()).transpose())
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(|e| e.to_string())?;
                        events.push(AppliedEntry {
                            index: e.log_id.index,
                            term: e.log_id.leader_id.term,
                            proposed_at_ms: env.proposed_at_ms,
                            command: env.command.kind().to_string(),
                            changes: outcome.clone().unwrap_or_default(),
                            deltas,
                            reset: false,
                            ends_entry: false,
                        });
                        outcomes.push(outcome);
                    }
                    Reply(outcomes)
                }
            };
            match events.get_mut(first..).and_then(<[AppliedEntry]>::last_mut) {
                Some(last) => last.ends_entry = true,
                None => events.push(AppliedEntry {
                    index: e.log_id.index,
                    term: e.log_id.leader_id.term,
                    proposed_at_ms: 0,
                    command: match &e.payload {
                        EntryPayload::Blank => "blank",
                        EntryPayload::Membership(_) => "membership",
                        EntryPayload::Normal(_) => "empty",
                    }
                    .into(),
                    changes: vec![],
                    deltas: vec![],
                    reset: false,
                    ends_entry: true,
                }),
            }
            replies.push(reply);
        }
        if let Some(last) = entries.last() {
            let v = serde_json::to_vec(&last.log_id).map_err(|e| e.to_string())?;
            meta.insert("last_applied", v.as_slice())
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(Applied {
        replies,
        events,
        identity,
    })
}

/// The last applied log id and the membership it left.
pub(crate) type AppliedState = (Option<LogId<u64>>, StoredMembership<u64, BasicNode>);

/// Reads `last_applied` and the membership from a state database.
pub(crate) fn applied_state(db: &impl ReadableDatabase) -> Result<AppliedState, String> {
    applied_state_in(&db.begin_read().map_err(|e| e.to_string())?)
}

/// [`applied_state`] inside one read view.
pub(crate) fn applied_state_in(txn: &ReadTransaction) -> Result<AppliedState, String> {
    let t = match txn.open_table(SM_META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok((None, StoredMembership::default())),
        Err(e) => return Err(e.to_string()),
    };
    let get = |k: &str| -> Result<Option<Vec<u8>>, String> {
        Ok(t.get(k).map_err(|e| e.to_string())?.map(|v| v.value().to_vec()))
    };
    let last = match get("last_applied")? {
        Some(v) => Some(serde_json::from_slice(&v).map_err(|e| e.to_string())?),
        None => None,
    };
    let membership = match get("membership")? {
        Some(v) => serde_json::from_slice(&v).map_err(|e| e.to_string())?,
        None => StoredMembership::default(),
    };
    Ok((last, membership))
}

/// Replaces the whole state with a snapshot's records, durably.
pub(crate) fn install(
    db: &Database,
    meta: &SnapshotMeta<u64, BasicNode>,
    records: &[(String, Vec<u8>)],
) -> Result<(), String> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    install_in(&txn, meta, records)?;
    txn.commit().map_err(|e| e.to_string())
}

/// [`install`] inside `txn`.
fn install_in(
    txn: &WriteTransaction,
    meta: &SnapshotMeta<u64, BasicNode>,
    records: &[(String, Vec<u8>)],
) -> Result<(), String> {
    {
        let mut table = txn.open_table(STATE_TABLE).map_err(|e| e.to_string())?;
        table.retain(|_, _| false).map_err(|e| e.to_string())?;
        for (k, v) in records {
            table
                .insert(k.as_str(), v.as_slice())
                .map_err(|e| e.to_string())?;
        }
        let mut m = txn.open_table(SM_META).map_err(|e| e.to_string())?;
        let last = serde_json::to_vec(&meta.last_log_id).map_err(|e| e.to_string())?;
        m.insert("last_applied", last.as_slice())
            .map_err(|e| e.to_string())?;
        let mem = serde_json::to_vec(&meta.last_membership).map_err(|e| e.to_string())?;
        m.insert("membership", mem.as_slice())
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Every record of the state table.
pub(crate) fn all_records(db: &impl ReadableDatabase) -> Result<Vec<(String, Vec<u8>)>, String> {
    all_records_in(&db.begin_read().map_err(|e| e.to_string())?)
}

/// [`all_records`] inside one read view.
fn all_records_in(txn: &ReadTransaction) -> Result<Vec<(String, Vec<u8>)>, String> {
    match txn.open_table(STATE_TABLE) {
        Ok(t) => scan_prefix(&t, "").map_err(|e| e.to_string()),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(Vec::new()),
        Err(e) => Err(e.to_string()),
    }
}

impl StateMachine {
    /// A state machine over an open state database, writing snapshots to `snapshot_dir`.
    /// The receiver resolves once the database file is released.
    pub fn new(
        db: Database,
        snapshot_dir: PathBuf,
        metrics: Metrics,
    ) -> (Self, tokio::sync::oneshot::Receiver<()>) {
        let (db, closed) = StateDb::new(db, metrics.state_commit_seconds.clone());
        let (applied, _) = watch::channel(0);
        let (events, _) = broadcast::channel(4096);
        let notifier = Arc::new(Notifier {
            applied,
            events,
            identity_epoch: AtomicU64::new(0),
        });
        (
            Self {
                db: Arc::new(db),
                snapshot_dir,
                notifier,
                metrics,
            },
            closed,
        )
    }

    fn build(&self) -> Result<Snapshot<TypeConfig>, String> {
        let txn = self.db.durable_read()?;
        let (last, membership) = applied_state_in(&txn)?;
        let records = all_records_in(&txn)?;
        drop(txn);
        let body = snapshot::encode_body(&records);
        let id = match &last {
            Some(l) => format!("{}-{}", l.leader_id.term, l.index),
            None => "0-0".to_string(),
        };
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: membership,
            snapshot_id: id,
        };
        snapshot::write(&self.snapshot_dir, &meta, &body).map_err(|e| e.to_string())?;
        tracing::info!(snapshot = %meta.snapshot_id, records = records.len(), bytes = body.len(), "snapshot written");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(std::io::Cursor::new(body)),
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SErr> {
        tokio::task::block_in_place(|| self.build())
            .map_err(|e| StorageIOError::write_snapshot(None, AnyError::error(e)).into())
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>), SErr> {
        self.db
            .read()
            .and_then(|txn| applied_state_in(&txn))
            .map_err(|e| StorageIOError::read_state_machine(AnyError::error(e)).into())
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Reply>, SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        let Some(last) = entries.last().map(|e| e.log_id.index) else {
            return Ok(vec![]);
        };
        let started = std::time::Instant::now();
        // Short enough to run on the runtime: no fsync, and the commit comes after the replies.
        let Applied {
            replies,
            events,
            identity,
        } = self
            .db
            .apply(entries.len(), |txn| apply_in(txn, &entries))
            .await
            .map_err(sm_err)?;
        self.db.schedule_commit();
        if identity {
            self.notifier.identity_changed();
        }
        self.metrics.commits.add(entries.len() as u64, &[]);
        let rejected = replies.iter().flat_map(|r| &r.0).filter(|o| o.is_err()).count();
        if rejected > 0 {
            self.metrics.rejections.add(rejected as u64, &[]);
        }
        for ev in events {
            // No subscriber is fine: projections that start later read the state first.
            let _ = self.notifier.events.send(Arc::new(ev));
        }
        self.notifier.applied.send_replace(last);
        self.metrics
            .apply_seconds
            .record(started.elapsed().as_secs_f64(), &[]);
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        StateMachine {
            db: self.db.clone(),
            snapshot_dir: self.snapshot_dir.clone(),
            notifier: self.notifier.clone(),
            metrics: self.metrics.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<std::io::Cursor<Vec<u8>>>, SErr> {
        Ok(Box::new(std::io::Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<std::io::Cursor<Vec<u8>>>,
    ) -> Result<(), SErr> {
        let body = snapshot.into_inner();
        let records = snapshot::decode_body(&body).map_err(sm_err)?;
        tokio::task::block_in_place(|| {
            self.db.write(|txn| install_in(txn, meta, &records))?;
            snapshot::write(&self.snapshot_dir, meta, &body).map_err(|e| e.to_string())
        })
        .map_err(sm_err)?;
        self.notifier.identity_changed();
        if let Some(l) = &meta.last_log_id {
            // Nothing was applied entry by entry: followers of the log start over.
            let _ = self.notifier.events.send(Arc::new(AppliedEntry {
                index: l.index,
                term: l.leader_id.term,
                proposed_at_ms: 0,
                command: "install_snapshot".into(),
                changes: vec![],
                deltas: vec![],
                reset: true,
                ends_entry: true,
            }));
            self.notifier.applied.send_replace(l.index);
        }
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        match snapshot::read(&self.snapshot_dir) {
            Ok(Some((meta, body))) => Ok(Some(Snapshot {
                meta,
                snapshot: Box::new(std::io::Cursor::new(body)),
            })),
            Ok(None) => Ok(None),
            Err(e) => Err(StorageIOError::read_snapshot(None, AnyError::error(e.to_string())).into()),
        }
    }
}
