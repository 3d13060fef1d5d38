//! The raft log on redb, written by one thread, off the async runtime.
//!
//! Every write (append, vote, truncate, purge) goes through one FIFO queue to one thread, so they
//! keep their order; the thread drains whatever is queued into one durable redb commit and then
//! completes openraft's [`LogFlushed`] callbacks. The committed log id rides along with the next
//! durable commit instead of paying its own. openraft 0.9 waits for each append's flush before
//! the next, so group commit of client writes happens before raft, in [`crate::Log`]'s batcher.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, Entry, LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use crate::db::ClosingDb;
use crate::metrics::Metrics;
use crate::types::TypeConfig;

/// Log entries by index, as JSON of `openraft::Entry`.
pub(crate) const LOG_TABLE: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// `vote`, `committed`, `last_purged`, as JSON.
pub(crate) const RAFT_META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

type SErr = StorageError<u64>;

pub(crate) fn read_err(e: impl std::fmt::Display) -> SErr {
    StorageIOError::read_logs(AnyError::error(e.to_string())).into()
}

fn write_err(e: impl std::fmt::Display) -> SErr {
    StorageIOError::write_logs(AnyError::error(e.to_string())).into()
}

enum Op {
    Append {
        entries: Vec<(u64, Vec<u8>)>,
        done: LogFlushed<TypeConfig>,
    },
    Meta {
        key: &'static str,
        value: Option<Vec<u8>>,
        durable: bool,
        done: Option<oneshot::Sender<Result<(), String>>>,
    },
    Truncate {
        from: u64,
        done: oneshot::Sender<Result<(), String>>,
    },
    Purge {
        upto: u64,
        last_purged: Vec<u8>,
        done: oneshot::Sender<Result<(), String>>,
    },
}

/// The log store handed to openraft; cheap to clone, reads go straight to redb.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<ClosingDb>,
    tx: mpsc::Sender<Op>,
    /// The latest committed log id, written with the next durable batch rather than on its own.
    committed: Arc<Mutex<Option<Vec<u8>>>>,
}

impl LogStore {
    /// Opens (or creates) the log at `path` and starts its writer thread. The returned receiver
    /// resolves when the database file is released.
    pub fn open(path: &Path, metrics: Metrics) -> Result<(Self, oneshot::Receiver<()>), redb::DatabaseError> {
        let (db, closed_rx) = ClosingDb::new(Database::create(path)?);
        let db = Arc::new(db);
        // Create the tables so that readers never see them missing.
        if let Ok(txn) = db.begin_write() {
            let ok = txn.open_table(LOG_TABLE).is_ok() && txn.open_table(RAFT_META).is_ok();
            if ok {
                let _ = txn.commit();
            }
        }
        let (tx, rx) = mpsc::channel();
        let writer_db = db.clone();
        let committed: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
        let writer_committed = committed.clone();
        std::thread::Builder::new()
            .name("rune-log-writer".into())
            .spawn(move || writer(writer_db, rx, writer_committed, metrics))
            .map_err(|e| redb::DatabaseError::Storage(redb::StorageError::Io(e)))?;
        Ok((Self { db, tx, committed }, closed_rx))
    }

    fn send(&self, op: Op) -> Result<(), SErr> {
        self.tx
            .send(op)
            .map_err(|_| write_err("log writer thread has stopped"))
    }

    async fn send_wait(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), String>>) -> Op,
    ) -> Result<(), SErr> {
        let (done, rx) = oneshot::channel();
        self.send(make(done))?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(write_err(e)),
            Err(_) => Err(write_err("log writer thread has stopped")),
        }
    }

    fn read_meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, SErr> {
        read_meta(&**self.db, key).map_err(read_err)
    }
}

/// Reads one meta value from a log database (also used offline by replay).
pub(crate) fn read_meta<T: serde::de::DeserializeOwned>(
    db: &impl ReadableDatabase,
    key: &str,
) -> Result<Option<T>, String> {
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    let t = match txn.open_table(RAFT_META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    match t.get(key).map_err(|e| e.to_string())? {
        Some(v) => serde_json::from_slice(v.value())
            .map(Some)
            .map_err(|e| format!("meta {key}: {e}")),
        None => Ok(None),
    }
}

fn writer(
    db: Arc<ClosingDb>,
    rx: mpsc::Receiver<Op>,
    committed: Arc<Mutex<Option<Vec<u8>>>>,
    metrics: Metrics,
) {
    while let Ok(first) = rx.recv() {
        let mut ops = vec![first];
        while ops.len() < 4096 {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        if let Some(c) = committed.lock().ok().and_then(|mut c| c.take()) {
            ops.push(Op::Meta {
                key: "committed",
                value: Some(c),
                durable: false,
                done: None,
            });
        }
        let durable = ops
            .iter()
            .any(|op| !matches!(op, Op::Meta { durable: false, .. }));
        let appended: usize = ops
            .iter()
            .map(|op| {
                if let Op::Append { entries, .. } = op {
                    entries.len()
                } else {
                    0
                }
            })
            .sum();
        let started = Instant::now();
        let result = write_batch(&db, &ops, durable);
        if durable {
            metrics.fsync_seconds.record(started.elapsed().as_secs_f64(), &[]);
            metrics.log_flushes.add(1, &[]);
        }
        if appended > 0 {
            metrics.flush_batch_entries.record(appended as u64, &[]);
        }
        for op in ops {
            let r = result.clone();
            match op {
                Op::Append { done, .. } => done.log_io_completed(r.map_err(std::io::Error::other)),
                Op::Meta { done: Some(done), .. } | Op::Truncate { done, .. } | Op::Purge { done, .. } => {
                    let _ = done.send(r);
                }
                Op::Meta { done: None, .. } => {}
            }
        }
    }
}

fn write_batch(db: &Database, ops: &[Op], durable: bool) -> Result<(), String> {
    let mut txn = db.begin_write().map_err(|e| e.to_string())?;
    txn.set_durability(if durable {
        Durability::Immediate
    } else {
        Durability::None
    })
    .map_err(|e| e.to_string())?;
    {
        let mut log = txn.open_table(LOG_TABLE).map_err(|e| e.to_string())?;
        let mut meta = txn.open_table(RAFT_META).map_err(|e| e.to_string())?;
        for op in ops {
            match op {
                Op::Append { entries, .. } => {
                    for (i, bytes) in entries {
                        log.insert(*i, bytes.as_slice()).map_err(|e| e.to_string())?;
                    }
                }
                Op::Meta { key, value, .. } => match value {
                    Some(v) => {
                        meta.insert(*key, v.as_slice()).map_err(|e| e.to_string())?;
                    }
                    None => {
                        meta.remove(*key).map_err(|e| e.to_string())?;
                    }
                },
                Op::Truncate { from, .. } => {
                    log.retain_in(*from.., |_, _| false).map_err(|e| e.to_string())?;
                }
                Op::Purge {
                    upto, last_purged, ..
                } => {
                    meta.insert("last_purged", last_purged.as_slice())
                        .map_err(|e| e.to_string())?;
                    log.retain_in(..=*upto, |_, _| false).map_err(|e| e.to_string())?;
                }
            }
        }
    }
    txn.commit().map_err(|e| e.to_string())
}

/// Decodes the entries of a range from a log database (also used offline by replay).
pub(crate) fn read_entries(
    db: &impl ReadableDatabase,
    range: (Bound<u64>, Bound<u64>),
) -> Result<Vec<Entry<TypeConfig>>, String> {
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    let t = match txn.open_table(LOG_TABLE) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e.to_string()),
    };
    let mut out = Vec::new();
    for item in t.range::<u64>(range).map_err(|e| e.to_string())? {
        let (k, v) = item.map_err(|e| e.to_string())?;
        let e: Entry<TypeConfig> =
            serde_json::from_slice(v.value()).map_err(|e| format!("log entry {}: {e}", k.value()))?;
        out.push(e);
    }
    Ok(out)
}

/// The last entry's id, if any.
pub(crate) fn last_entry(db: &impl ReadableDatabase) -> Result<Option<Entry<TypeConfig>>, String> {
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    let t = match txn.open_table(LOG_TABLE) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let last = t.last().map_err(|e| e.to_string())?;
    match last {
        Some((_, v)) => serde_json::from_slice(v.value())
            .map(Some)
            .map_err(|e| e.to_string()),
        None => Ok(None),
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        let r = (range.start_bound().cloned(), range.end_bound().cloned());
        // A read of committed entries: no fsync, short enough to run on the runtime.
        read_entries(&**self.db, r).map_err(read_err)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let last_purged: Option<LogId<u64>> = self.read_meta("last_purged")?;
        let last = last_entry(&**self.db).map_err(read_err)?.map(|e| e.log_id);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last.or(last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), SErr> {
        let value = serde_json::to_vec(vote).map_err(write_err)?;
        self.send_wait(|done| Op::Meta {
            key: "vote",
            value: Some(value),
            durable: true,
            done: Some(done),
        })
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, SErr> {
        self.read_meta("vote")
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> Result<(), SErr> {
        // Rides on the next durable batch instead of costing a commit of its own. Losing it only
        // means a restart re-applies from the state machine's last durable point, once elected.
        if let Some(c) = committed {
            let v = serde_json::to_vec(&c).map_err(write_err)?;
            if let Ok(mut slot) = self.committed.lock() {
                *slot = Some(v);
            }
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, SErr> {
        self.read_meta("committed")
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        for e in entries {
            encoded.push((e.log_id.index, serde_json::to_vec(&e).map_err(write_err)?));
        }
        self.send(Op::Append {
            entries: encoded,
            done: callback,
        })
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), SErr> {
        self.send_wait(|done| Op::Truncate {
            from: log_id.index,
            done,
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), SErr> {
        let last_purged = serde_json::to_vec(&log_id).map_err(write_err)?;
        self.send_wait(|done| Op::Purge {
            upto: log_id.index,
            last_purged,
            done,
        })
        .await
    }
}
