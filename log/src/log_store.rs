//! openraft's log storage over [`crate::wal`].
//!
//! Every write (append, vote, truncate, purge) goes through one FIFO queue, so they keep their
//! order; whoever writes drains whatever is queued into one write and one `fdatasync`, and then
//! completes openraft's [`LogFlushed`] callbacks. Who writes depends on the membership: while
//! this node is the only voter ([`LogStore::solo_switch`]), raft's own task writes as it appends,
//! since nothing else waits on it and a hand-off to a thread and back costs two wake-ups
//! (measured with `--bench writes` on three 2-core VMs: at 16 and 64 clients every fsync on the
//! thread cost 8-13 %; at 1 client inline wrote 0.69-0.71 vs 0.60-0.64 of etcd on the first,
//! 1,651-1,877 vs 1,541-1,618 writes/s and 15 % less CPU per write on the third, while the
//! second measured the thread 9 % ahead); with others to replicate to, a writer thread takes
//! the fsync off raft's task so that replication overlaps it. The committed log id rides along
//! with the next synced write instead of paying its own. openraft 0.9 waits for each append's
//! flush before the next, so group commit of client writes happens before raft (`batch.rs`).
//! The last entries appended are also kept decoded, so the state machine's read of a
//! just-committed entry is a clone, not a JSON decode.
//!
//! Data dirs written before the WAL kept the log in `raft-log.redb`; [`migrate_redb`] moves such
//! a log into the WAL once, at open.

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, Entry, LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote};
use redb::{ReadableDatabase, TableDefinition};
use tokio::sync::oneshot;

use crate::metrics::Metrics;
use crate::types::TypeConfig;
use crate::wal::{self, MetaKey, Record, WalError};

/// The log of data dirs from before the WAL: entries by index, as JSON of `openraft::Entry`.
const LEGACY_LOG_TABLE: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// Their `vote`, `committed`, `last_purged`, as JSON.
const LEGACY_RAFT_META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

type SErr = StorageError<u64>;

pub(crate) fn read_err(e: impl std::fmt::Display) -> SErr {
    StorageIOError::read_logs(AnyError::error(e.to_string())).into()
}

fn write_err(e: impl std::fmt::Display) -> SErr {
    StorageIOError::write_logs(AnyError::error(e.to_string())).into()
}

enum Op {
    Append {
        entries: Vec<(u64, Arc<[u8]>)>,
        done: LogFlushed<TypeConfig>,
    },
    Meta {
        key: MetaKey,
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

/// How many of the last appended entries [`Recent`] keeps decoded.
const RECENT_ENTRIES: usize = 256;

/// The last entries appended, as openraft handed them over: the state machine reads each entry
/// just after it commits, and a clone (the batch inside is shared) costs far less than decoding
/// its JSON again. Holds an entry only while the WAL holds the same one: appends add, truncate,
/// purge and a failed write remove.
#[derive(Clone, Default)]
struct Recent(Arc<Mutex<BTreeMap<u64, Entry<TypeConfig>>>>);

impl Recent {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry<TypeConfig>>> {
        // Every change is a few map operations that do not panic midway.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self, entries: &[Entry<TypeConfig>]) {
        let mut m = self.lock();
        for e in entries {
            m.insert(e.log_id.index, e.clone());
        }
        while m.len() > RECENT_ENTRIES {
            m.pop_first();
        }
    }

    /// Every entry of `start..=end`, if all of them are here.
    fn get(&self, start: u64, end: u64) -> Option<Vec<Entry<TypeConfig>>> {
        let m = self.lock();
        let want = usize::try_from(end.checked_sub(start)?.checked_add(1)?).ok()?;
        let got: Vec<_> = m.range(start..=end).map(|(_, e)| e.clone()).collect();
        (got.len() == want).then_some(got)
    }

    fn remove_from(&self, from: u64) {
        self.lock().split_off(&from);
    }

    fn remove_upto(&self, upto: u64) {
        let mut m = self.lock();
        *m = m.split_off(&upto.saturating_add(1));
    }

    fn remove(&self, indexes: &[u64]) {
        let mut m = self.lock();
        for i in indexes {
            m.remove(i);
        }
    }
}

/// Writes waiting for whoever writes next, and whether someone is writing.
#[derive(Default)]
struct Pending {
    ops: VecDeque<Op>,
    /// Someone (raft's task or the thread) has taken ops and is writing them: ops are taken
    /// by one writer at a time, whole, so they reach the WAL in queue order.
    writing: bool,
    /// Every [`LogStore`] is gone: the thread writes what is left and stops.
    closed: bool,
}

/// The queue between [`LogStore`] and whoever writes.
struct Queue {
    pending: Mutex<Pending>,
    /// Wakes the thread: something was queued for it, or the queue closed.
    ready: Condvar,
    /// Only a writer (`Pending::writing`) locks it, so it is never contended.
    writer: Mutex<Option<WriterState>>,
    /// Raft's task writes its own ops (see the module doc).
    solo: Arc<AtomicBool>,
}

impl Queue {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        // Every change under the lock is a few queue operations that do not panic midway.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `ops`; only the holder of `Pending::writing` calls it.
    fn write(&self, ops: Vec<Op>) {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        match w.as_mut() {
            Some(w) => w.process(ops),
            // The thread has stopped (every store is gone): no one is left to answer.
            None => drop(ops),
        }
    }
}

/// Closes the queue when the last [`LogStore`] clone goes.
struct Closer(Arc<Queue>);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.pending().closed = true;
        self.0.ready.notify_one();
    }
}

/// The log store handed to openraft; cheap to clone, reads go straight to the WAL's index.
#[derive(Clone)]
pub struct LogStore {
    reader: wal::Reader,
    queue: Arc<Queue>,
    _closer: Arc<Closer>,
    /// The latest committed log id, written with the next synced batch rather than on its own.
    committed: Arc<Mutex<Option<Vec<u8>>>>,
    recent: Recent,
}

impl LogStore {
    /// Opens (or creates) the log in the directory `dir` and starts its writer thread. The
    /// returned receiver resolves when the log's lock is released.
    pub fn open(dir: &Path, metrics: Metrics) -> Result<(Self, oneshot::Receiver<()>), WalError> {
        let (wal, reader) = wal::Writer::open(dir)?;
        let (closed_tx, closed_rx) = oneshot::channel();
        let committed: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
        let recent = Recent::default();
        let queue = Arc::new(Queue {
            pending: Mutex::default(),
            ready: Condvar::new(),
            writer: Mutex::new(Some(WriterState {
                wal,
                committed: committed.clone(),
                recent: recent.clone(),
                metrics,
            })),
            solo: Arc::new(AtomicBool::new(false)),
        });
        let q = queue.clone();
        std::thread::Builder::new()
            .name("rune-log-writer".into())
            .spawn(move || {
                writer(&q);
                // Releases the WAL's lock.
                drop(q.writer.lock().unwrap_or_else(|p| p.into_inner()).take());
                let _ = closed_tx.send(());
            })
            .map_err(|source| WalError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        Ok((
            Self {
                reader,
                _closer: Arc::new(Closer(queue.clone())),
                queue,
                committed,
                recent,
            },
            closed_rx,
        ))
    }

    /// Set while this node is the only voter: then raft's own task writes (module doc).
    /// A switch rather than a store clone, which would keep the writer thread alive.
    pub fn solo_switch(&self) -> Arc<AtomicBool> {
        self.queue.solo.clone()
    }

    /// Queues `op`; alone, and with no one else writing, writes it (and whatever queued
    /// meanwhile) before returning.
    fn send(&self, op: Op) -> Result<(), SErr> {
        let q = &self.queue;
        let mut p = q.pending();
        if p.closed {
            return Err(write_err("log writer thread has stopped"));
        }
        p.ops.push_back(op);
        if p.writing || !q.solo.load(Ordering::Relaxed) {
            drop(p);
            q.ready.notify_one();
            return Ok(());
        }
        p.writing = true;
        loop {
            let ops: Vec<Op> = p.ops.drain(..).collect();
            drop(p);
            q.write(ops);
            p = q.pending();
            if p.ops.is_empty() {
                p.writing = false;
                return Ok(());
            }
        }
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

    fn read_meta<T: serde::de::DeserializeOwned>(&self, key: MetaKey) -> Result<Option<T>, SErr> {
        meta_value(&self.reader, key).map_err(read_err)
    }
}

/// Decodes one meta value (also used offline by replay).
pub(crate) fn meta_value<T: serde::de::DeserializeOwned>(
    reader: &wal::Reader,
    key: MetaKey,
) -> Result<Option<T>, String> {
    match reader.lock().meta().get(key) {
        Some(v) => serde_json::from_slice(v)
            .map(Some)
            .map_err(|e| format!("log meta {key:?}: {e}")),
        None => Ok(None),
    }
}

/// Decodes the entries of a range (also used offline by replay).
pub(crate) fn read_entries(
    reader: &wal::Reader,
    range: impl RangeBounds<u64>,
) -> Result<Vec<Entry<TypeConfig>>, String> {
    reader
        .read(range)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(i, b)| serde_json::from_slice(&b).map_err(|e| format!("log entry {i}: {e}")))
        .collect()
}

/// The writer thread: writes what is queued while no one else does, until the queue closes.
fn writer(q: &Queue) {
    let mut p = q.pending();
    loop {
        if p.ops.is_empty() || p.writing {
            if p.closed && p.ops.is_empty() && !p.writing {
                return;
            }
            p = q.ready.wait(p).unwrap_or_else(|e| e.into_inner());
            continue;
        }
        p.writing = true;
        let ops: Vec<Op> = p.ops.drain(..).collect();
        drop(p);
        q.write(ops);
        p = q.pending();
        p.writing = false;
    }
}

/// What writing needs: the WAL and what rides along with or follows each write.
struct WriterState {
    wal: wal::Writer,
    /// The latest committed log id, written with the next synced batch.
    committed: Arc<Mutex<Option<Vec<u8>>>>,
    recent: Recent,
    metrics: Metrics,
}

impl WriterState {
    /// One write and (unless only non-durable metadata is in it) one `fdatasync` for `ops`,
    /// then each op's completion.
    fn process(&mut self, mut ops: Vec<Op>) {
        let (wal, committed, recent, metrics) = (&mut self.wal, &self.committed, &self.recent, &self.metrics);
        if let Some(c) = committed.lock().ok().and_then(|mut c| c.take()) {
            ops.push(Op::Meta {
                key: MetaKey::Committed,
                value: Some(c),
                durable: false,
                done: None,
            });
        }
        let durable = ops
            .iter()
            .any(|op| !matches!(op, Op::Meta { durable: false, .. }));
        let mut records = Vec::new();
        for op in &ops {
            match op {
                Op::Append { entries, .. } => {
                    records.extend(entries.iter().map(|(i, b)| Record::Entry { index: *i, bytes: b }))
                }
                Op::Meta { key, value, .. } => records.push(Record::Meta {
                    key: *key,
                    value: value.as_deref(),
                }),
                Op::Truncate { from, .. } => records.push(Record::Truncate { from: *from }),
                Op::Purge {
                    upto, last_purged, ..
                } => {
                    records.push(Record::Meta {
                        key: MetaKey::LastPurged,
                        value: Some(last_purged),
                    });
                    records.push(Record::Purge { upto: *upto });
                }
            }
        }
        let appended = records
            .iter()
            .filter(|r| matches!(r, Record::Entry { .. }))
            .count();
        let started = Instant::now();
        let result = wal.write(&records, durable);
        drop(records);
        if durable {
            metrics.fsync_seconds.record(started.elapsed().as_secs_f64(), &[]);
            metrics.log_flushes.add(1, &[]);
        }
        if appended > 0 {
            metrics.flush_batch_entries.record(appended as u64, &[]);
        }
        if let Err(e) = &result {
            tracing::error!(error = %e, "raft log write failed");
            let failed: Vec<u64> = ops
                .iter()
                .flat_map(|op| match op {
                    Op::Append { entries, .. } => entries.iter().map(|(i, _)| *i).collect(),
                    _ => Vec::new(),
                })
                .collect();
            recent.remove(&failed);
            wal.forget_pending(failed);
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

/// Moves a log kept in redb (`legacy`, from before the WAL) into a new WAL at `dir`, then removes
/// the redb file. Crash-safe: the WAL is written aside and renamed into place whole, and a WAL
/// already in place means an earlier migration finished. Returns how many entries moved.
pub(crate) fn migrate_redb(legacy: &Path, dir: &Path) -> Result<Option<usize>, WalError> {
    if !legacy.exists() {
        return Ok(None);
    }
    let io = |source: std::io::Error| WalError::Io {
        path: legacy.to_path_buf(),
        source,
    };
    if dir.exists() {
        // Renamed into place before the crash that kept the old file: it is already moved.
        std::fs::remove_file(legacy).map_err(io)?;
        return Ok(Some(0));
    }
    let (entries, meta) = read_legacy(legacy)?;
    let staging = dir.with_extension("migrating");
    match std::fs::remove_dir_all(&staging) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        _ => {}
    }
    wal::create(&staging, &meta)?;
    {
        let (mut w, _) = wal::Writer::open(&staging)?;
        for chunk in entries.chunks(1024) {
            let recs: Vec<Record> = chunk
                .iter()
                .map(|(i, b)| Record::Entry { index: *i, bytes: b })
                .collect();
            w.write(&recs, true).map_err(|e| io(std::io::Error::other(e)))?;
        }
    }
    std::fs::rename(&staging, dir).map_err(io)?;
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::File::open(parent)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    std::fs::remove_file(legacy).map_err(io)?;
    Ok(Some(entries.len()))
}

/// Entries by index with their encoded bytes.
type Encoded = Vec<(u64, Vec<u8>)>;

/// Reads every entry and meta value of a redb log (a data dir from before the WAL).
fn read_legacy(path: &Path) -> Result<(Encoded, wal::Meta), WalError> {
    let err = |e: String| WalError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    };
    let db = match redb::ReadOnlyDatabase::open(path) {
        Ok(db) => db,
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(WalError::Locked(path.to_path_buf())),
        Err(e) => return Err(err(e.to_string())),
    };
    let txn = db.begin_read().map_err(|e| err(e.to_string()))?;
    let mut entries = Vec::new();
    match txn.open_table(LEGACY_LOG_TABLE) {
        Ok(t) => {
            for item in t.range::<u64>(..).map_err(|e| err(e.to_string()))? {
                let (k, v) = item.map_err(|e| err(e.to_string()))?;
                entries.push((k.value(), v.value().to_vec()));
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(err(e.to_string())),
    }
    let mut meta = wal::Meta::default();
    match txn.open_table(LEGACY_RAFT_META) {
        Ok(t) => {
            for (name, key) in [
                ("vote", MetaKey::Vote),
                ("committed", MetaKey::Committed),
                ("last_purged", MetaKey::LastPurged),
            ] {
                if let Some(v) = t.get(name).map_err(|e| err(e.to_string()))? {
                    meta.set(key, Some(v.value().to_vec()));
                }
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(err(e.to_string())),
    }
    Ok((entries, meta))
}

/// Writes a redb log as runed wrote them before the WAL, for tests of the migration.
#[doc(hidden)]
pub fn write_legacy(
    path: &Path,
    entries: &[Entry<TypeConfig>],
    meta: &[(&str, Vec<u8>)],
) -> Result<(), String> {
    let db = redb::Database::create(path).map_err(|e| e.to_string())?;
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    {
        let mut log = txn.open_table(LEGACY_LOG_TABLE).map_err(|e| e.to_string())?;
        for e in entries {
            let v = serde_json::to_vec(e).map_err(|e| e.to_string())?;
            log.insert(e.log_id.index, v.as_slice())
                .map_err(|e| e.to_string())?;
        }
        let mut m = txn.open_table(LEGACY_RAFT_META).map_err(|e| e.to_string())?;
        for (k, v) in meta {
            m.insert(*k, v.as_slice()).map_err(|e| e.to_string())?;
        }
    }
    txn.commit().map_err(|e| e.to_string())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        let r: (Bound<u64>, Bound<u64>) = (range.start_bound().cloned(), range.end_bound().cloned());
        let start = match r.0 {
            Bound::Included(i) => Some(i),
            Bound::Excluded(i) => i.checked_add(1),
            Bound::Unbounded => Some(0),
        };
        let end = match r.1 {
            Bound::Included(i) => Some(i),
            Bound::Excluded(i) => i.checked_sub(1),
            Bound::Unbounded => self.reader.lock().last_index(),
        };
        if let Some(hit) = start.zip(end).and_then(|(s, e)| self.recent.get(s, e)) {
            return Ok(hit);
        }
        // Reads from the page cache: short enough to run on the runtime.
        read_entries(&self.reader, r).map_err(read_err)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let last_purged: Option<LogId<u64>> = self.read_meta(MetaKey::LastPurged)?;
        let last_index = self.reader.lock().last_index();
        let last = match last_index {
            Some(i) => read_entries(&self.reader, i..=i)
                .map_err(read_err)?
                .pop()
                .map(|e| e.log_id),
            None => None,
        };
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
            key: MetaKey::Vote,
            value: Some(value),
            durable: true,
            done: Some(done),
        })
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, SErr> {
        self.read_meta(MetaKey::Vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> Result<(), SErr> {
        // Rides on the next synced write instead of costing a sync of its own. Losing it only
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
        self.read_meta(MetaKey::Committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let mut encoded = Vec::with_capacity(entries.len());
        for e in &entries {
            let bytes: Arc<[u8]> = serde_json::to_vec(e).map_err(write_err)?.into();
            encoded.push((e.log_id.index, bytes));
        }
        // Readable from now on, as openraft expects; durable once the callback fires.
        self.reader.lock().add_pending(&encoded);
        self.recent.add(&entries);
        self.send(Op::Append {
            entries: encoded,
            done: callback,
        })
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), SErr> {
        self.recent.remove_from(log_id.index);
        self.send_wait(|done| Op::Truncate {
            from: log_id.index,
            done,
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), SErr> {
        let last_purged = serde_json::to_vec(&log_id).map_err(write_err)?;
        self.recent.remove_upto(log_id.index);
        self.send_wait(|done| Op::Purge {
            upto: log_id.index,
            last_purged,
            done,
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vote(store: &LogStore, term: u64) -> oneshot::Receiver<Result<(), String>> {
        let (done, rx) = oneshot::channel();
        let value = serde_json::to_vec(&Vote::new(term, 1)).expect("vote");
        store
            .send(Op::Meta {
                key: MetaKey::Vote,
                value: Some(value),
                durable: true,
                done: Some(done),
            })
            .expect("queued");
        rx
    }

    #[test]
    fn writes_keep_their_order_while_the_writer_changes_hands() {
        let dir = tempfile::tempdir().expect("temp dir");
        let metrics = Metrics::new(&opentelemetry::global::meter("test"));
        let (store, closed) = LogStore::open(dir.path(), metrics).expect("open");
        let solo = store.solo_switch();
        let mut answers = Vec::new();
        // Queued for the thread, then written by the sender while the thread may still be
        // busy with the earlier ones, back and forth, ending with the sender.
        for term in 1..=399u64 {
            solo.store(term % 50 >= 25, Ordering::Relaxed);
            answers.push(vote(&store, term));
        }
        for a in answers {
            assert_eq!(a.blocking_recv().expect("answered"), Ok(()));
        }
        let got: Option<Vote<u64>> = meta_value(&store.reader, MetaKey::Vote).expect("read");
        assert_eq!(
            got,
            Some(Vote::new(399, 1)),
            "the last vote written is the last one sent"
        );
        drop(store);
        closed.blocking_recv().expect("the writer let go of the log");
        let (_, reader) = wal::Writer::open(dir.path()).expect("reopen");
        let got: Option<Vote<u64>> = meta_value(&reader, MetaKey::Vote).expect("read");
        assert_eq!(got, Some(Vote::new(399, 1)), "and it is what a reopen finds");
    }

    #[test]
    fn a_write_of_the_sole_voter_queues_behind_what_the_thread_is_writing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let metrics = Metrics::new(&opentelemetry::global::meter("test"));
        let (store, _closed) = LogStore::open(dir.path(), metrics).expect("open");
        // Holding the WAL stalls the thread inside its write of the first vote.
        let held = store.queue.writer.lock().expect("writer");
        let first = vote(&store, 1);
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while !store.queue.pending().writing {
            assert!(Instant::now() < deadline, "the thread took the first vote");
            std::thread::yield_now();
        }
        store.solo_switch().store(true, Ordering::Relaxed);
        let mut second = vote(&store, 2);
        assert_eq!(
            store.queue.pending().ops.len(),
            1,
            "the second vote waits in the queue"
        );
        assert!(second.try_recv().is_err(), "and is not answered yet");
        drop(held);
        assert_eq!(first.blocking_recv().expect("answered"), Ok(()));
        assert_eq!(second.blocking_recv().expect("answered"), Ok(()));
        let got: Option<Vote<u64>> = meta_value(&store.reader, MetaKey::Vote).expect("read");
        assert_eq!(got, Some(Vote::new(2, 1)), "the thread wrote it after the first");
    }
}
