//! A database handle that reports when its file is released.

use redb::Database;

/// A redb database that says when it is closed: redb releases its file lock in `Drop`, which may
/// still be running on another thread after the last `Arc` is gone, so counting handles is not
/// enough to know that another process may open the file.
pub struct ClosingDb {
    db: Option<Database>,
    closed: Option<tokio::sync::oneshot::Sender<()>>,
}

impl ClosingDb {
    pub fn new(db: Database) -> (Self, tokio::sync::oneshot::Receiver<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (
            Self {
                db: Some(db),
                closed: Some(tx),
            },
            rx,
        )
    }
}

impl std::ops::Deref for ClosingDb {
    type Target = Database;
    fn deref(&self) -> &Database {
        // Only `Drop` takes the database out.
        self.db.as_ref().expect("database is open until dropped")
    }
}

impl Drop for ClosingDb {
    fn drop(&mut self) {
        drop(self.db.take());
        if let Some(tx) = self.closed.take() {
            let _ = tx.send(());
        }
    }
}

/// Applied entries after which an apply commits at once rather than waiting: bounds what an open
/// transaction holds in memory.
const MAX_PENDING: usize = 4096;

/// How long a commit waits after the apply that scheduled it, gathering the applies that follow
/// into the same commit; a read commits at once. Measured with `--bench writes` against
/// committing at once: 5 ms took CPU per write from 452–482 to 399–414 µs at 1 client and from
/// 157–160 to 145–147 µs at 16; 20 ms bought nothing more.
const COMMIT_AFTER: std::time::Duration = std::time::Duration::from_millis(5);

/// The state database, whose applies are committed after their proposers hear OK.
///
/// A redb commit, even without fsync, is about half of what applying a command costs; nothing
/// about it needs to happen before the reply, because the log was fsynced first and is what a
/// crash recovers from (see [`crate::state_machine`]). So applies write into one open
/// transaction, and a commit follows [`COMMIT_AFTER`] later, off the reply's path, or before
/// anyone reads (every read view comes from [`StateDb::read`], which commits first, so a read
/// sees everything applied before it was asked for), whichever comes first. The applies of those
/// few milliseconds share one commit. A short read before each write (the cast's prediction)
/// goes through [`StateDb::latest`] instead, inside the open transaction, so it forces none.
pub(crate) struct StateDb {
    // Declared before `db`: an open transaction must end before its database does.
    pending: std::sync::Mutex<Pending>,
    /// A deferred commit is on its way.
    scheduled: std::sync::atomic::AtomicBool,
    /// Signalled whenever `pending` is let go of: what applies, deferred commits and
    /// [`StateDb::latest`] wait on instead of blocking a runtime thread behind each other (an
    /// apply holds the state up to a few hundred µs under load; measured: 3–4 % of a cast's
    /// reads found it held).
    released: tokio::sync::Notify,
    /// Time of each commit of the state: what applies wait on while it runs.
    commit_seconds: opentelemetry::metrics::Histogram<f64>,
    db: ClosingDb,
}

/// The open transaction and what it holds.
#[derive(Default)]
struct Pending {
    txn: Option<redb::WriteTransaction>,
    /// Entries applied into `txn`.
    entries: usize,
    /// Applied entries were lost with a transaction that failed: the state here is behind what
    /// was applied (the log still holds it), so no read may be served until a restart replays it.
    failed: Option<String>,
}

/// The state's lock as held; letting go of it wakes whoever waits for it in
/// [`StateDb::lock_async`].
struct Held<'a> {
    /// `None` only while being dropped.
    guard: Option<std::sync::MutexGuard<'a, Pending>>,
    released: &'a tokio::sync::Notify,
}

impl std::ops::Deref for Held<'_> {
    type Target = Pending;
    fn deref(&self) -> &Pending {
        match &self.guard {
            Some(g) => g,
            None => unreachable!("the guard is taken only when dropped"),
        }
    }
}

impl std::ops::DerefMut for Held<'_> {
    fn deref_mut(&mut self) -> &mut Pending {
        match &mut self.guard {
            Some(g) => g,
            None => unreachable!("the guard is taken only when dropped"),
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        // The lock first, then the wake-up: a woken reader must find it free.
        drop(self.guard.take());
        self.released.notify_waiters();
    }
}

/// Why the state cannot be locked after an apply panicked while holding it.
fn poisoned() -> String {
    "an apply of the state panicked".to_string()
}

/// Whether [`tokio::task::block_in_place`] may be called here: anywhere in a multi-threaded
/// runtime (outside a worker it just runs the closure), never in a current-thread one, where it
/// panics.
fn on_multi_thread_runtime() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

impl StateDb {
    /// The state database over `db`, timing its commits into `commit_seconds`; the receiver
    /// resolves once its file is released.
    pub(crate) fn new(
        db: Database,
        commit_seconds: opentelemetry::metrics::Histogram<f64>,
    ) -> (Self, tokio::sync::oneshot::Receiver<()>) {
        let (db, closed) = ClosingDb::new(db);
        (
            Self {
                pending: std::sync::Mutex::new(Pending::default()),
                scheduled: std::sync::atomic::AtomicBool::new(false),
                released: tokio::sync::Notify::new(),
                commit_seconds,
                db,
            },
            closed,
        )
    }

    /// The lock, for the synchronous readers and writers ([`StateDb::read`], snapshots, restores).
    /// While an apply or a commit holds it, a caller on a worker of the multi-threaded runtime
    /// waits inside [`tokio::task::block_in_place`], which hands the worker's other tasks to
    /// another thread first: a get or a list that arrives during an apply must not stall the
    /// writes and answers queued behind it on one of the runtime's two threads.
    fn lock(&self) -> Result<Held<'_>, String> {
        if let Some(p) = self.try_lock()? {
            return Ok(p);
        }
        let wait = || self.pending.lock().map_err(|_| poisoned());
        let p = if on_multi_thread_runtime() {
            tokio::task::block_in_place(wait)?
        } else {
            wait()?
        };
        self.held(p)
    }

    /// The lock if it is free (`None` while someone holds it).
    fn try_lock(&self) -> Result<Option<Held<'_>>, String> {
        match self.pending.try_lock() {
            Ok(p) => self.held(p).map(Some),
            Err(std::sync::TryLockError::WouldBlock) => Ok(None),
            Err(std::sync::TryLockError::Poisoned(_)) => Err(poisoned()),
        }
    }

    /// The lock, waited for on [`StateDb::released`] rather than by blocking a runtime thread:
    /// how applies, deferred commits and [`StateDb::latest`] take it, so that none of them
    /// holds up the tasks of the thread it runs on while another one holds the state.
    async fn lock_async(&self) -> Result<Held<'_>, String> {
        loop {
            // Registered before trying, so a release between the try and the wait still wakes.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Some(p) = self.try_lock()? {
                return Ok(p);
            }
            released.await;
        }
    }

    /// The lock as taken: refused when an earlier transaction lost applied entries.
    fn held<'a>(&'a self, p: std::sync::MutexGuard<'a, Pending>) -> Result<Held<'a>, String> {
        let p = Held {
            guard: Some(p),
            released: &self.released,
        };
        match &p.failed {
            Some(e) => Err(format!(
                "the state lost applied entries ({e}); restart to replay them"
            )),
            None => Ok(p),
        }
    }

    /// Runs `f`, which applies `entries` log entries, in the open transaction (beginning one),
    /// and leaves it uncommitted: call [`StateDb::schedule_commit`] after.
    pub(crate) async fn apply<T>(
        &self,
        entries: usize,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, String>,
    ) -> Result<T, String> {
        let mut p = self.lock_async().await?;
        let txn = match p.txn.take() {
            Some(t) => t,
            None => {
                let mut t = self.db.begin_write().map_err(|e| e.to_string())?;
                t.set_durability(redb::Durability::None)
                    .map_err(|e| e.to_string())?;
                t
            }
        };
        match f(&txn) {
            Ok(v) => {
                p.txn = Some(txn);
                p.entries += entries;
                if p.entries >= MAX_PENDING {
                    self.commit_locked(&mut p, redb::Durability::None)?;
                }
                Ok(v)
            }
            Err(e) => {
                // Dropping the transaction aborts it, and with it what earlier applies wrote.
                drop(txn);
                if p.entries > 0 {
                    p.failed = Some(e.clone());
                }
                Err(e)
            }
        }
    }

    /// Commits the open transaction on a task of its own, unless a commit is already on its
    /// way: the caller's reply goes out meanwhile.
    pub(crate) fn schedule_commit(self: &std::sync::Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = std::sync::Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(COMMIT_AFTER).await;
            let Some(db) = weak.upgrade() else { return };
            // Cleared first: an apply while this commits schedules the next one.
            db.scheduled.store(false, Ordering::Release);
            let committed = db.lock_async().await;
            if let Err(e) = committed.and_then(|mut p| db.commit_locked(&mut p, redb::Durability::None)) {
                tracing::error!(error = %e, "committing the applied state failed");
            }
        });
    }

    /// Commits what was applied; with [`redb::Durability::Immediate`] every earlier commit is
    /// made durable too, even when nothing is open.
    pub(crate) fn commit(&self, durability: redb::Durability) -> Result<(), String> {
        let mut p = self.lock()?;
        self.commit_locked(&mut p, durability)
    }

    /// Commits the open transaction (with `Immediate`, a durable commit even when nothing is
    /// open), timed; a read with nothing open commits nothing and records no time. A failed
    /// commit that lost applied entries marks the state failed.
    fn commit_locked(&self, p: &mut Pending, durability: redb::Durability) -> Result<(), String> {
        let entries = std::mem::take(&mut p.entries);
        let started = std::time::Instant::now();
        let mut txn = match p.txn.take() {
            Some(t) => t,
            None if matches!(durability, redb::Durability::Immediate) => {
                self.db.begin_write().map_err(|e| e.to_string())?
            }
            None => return Ok(()),
        };
        let done = txn
            .set_durability(durability)
            .map_err(|e| e.to_string())
            .and_then(|()| txn.commit().map_err(|e| e.to_string()));
        self.commit_seconds.record(started.elapsed().as_secs_f64(), &[]);
        if let Err(e) = &done {
            if entries > 0 {
                p.failed = Some(e.clone());
            }
        }
        done
    }

    /// Runs `f` over the state table as applied so far, read inside the open transaction when
    /// there is one: unlike [`StateDb::read`] this commits nothing, so a request that reads
    /// before each write (the cast's prediction) does not force a commit per write. While an
    /// apply or a commit holds the state this waits without holding a runtime thread; applies
    /// wait while `f` runs: keep it short, and read only through the table it is given (any
    /// other read of the state from inside `f` waits on this same lock forever).
    pub(crate) async fn latest<T>(
        &self,
        table: redb::TableDefinition<'static, &'static str, &'static [u8]>,
        f: impl FnOnce(StateTable<'_>) -> T,
    ) -> Result<T, String> {
        use redb::ReadableDatabase;
        let p = self.lock_async().await?;
        match &p.txn {
            Some(txn) => {
                let t = txn.open_table(table).map_err(|e| e.to_string())?;
                Ok(f(StateTable::Open(t)))
            }
            None => {
                let txn = self.db.begin_read().map_err(|e| e.to_string())?;
                // Nothing is open, so nothing can be applied meanwhile: the lock can go.
                drop(p);
                let t = txn.open_table(table).map_err(|e| e.to_string())?;
                Ok(f(StateTable::Committed(t)))
            }
        }
    }

    /// A read view of everything applied so far.
    pub(crate) fn read(&self) -> Result<redb::ReadTransaction, String> {
        self.read_after(redb::Durability::None)
    }

    /// A read view of everything applied so far, all of it durable: what a snapshot (after which
    /// the log is purged) must be taken from. No apply comes between the commit and the view.
    pub(crate) fn durable_read(&self) -> Result<redb::ReadTransaction, String> {
        self.read_after(redb::Durability::Immediate)
    }

    fn read_after(&self, durability: redb::Durability) -> Result<redb::ReadTransaction, String> {
        use redb::ReadableDatabase;
        let mut p = self.lock()?;
        self.commit_locked(&mut p, durability)?;
        self.db.begin_read().map_err(|e| e.to_string())
    }

    /// Runs `f` in a transaction of its own, committed durably, after what was applied.
    pub(crate) fn write<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, String>,
    ) -> Result<T, String> {
        let mut p = self.lock()?;
        self.commit_locked(&mut p, redb::Durability::None)?;
        let txn = self.db.begin_write().map_err(|e| e.to_string())?;
        let v = f(&txn)?;
        txn.commit().map_err(|e| e.to_string())?;
        Ok(v)
    }
}

/// A table of the state as applied so far: in the open transaction, or in the last commit when
/// nothing is open. Both are [`redb::ReadableTable`]s; [`StateTable::with`] hands over either.
pub enum StateTable<'a> {
    /// Inside the transaction applies are writing into.
    Open(redb::Table<'a, &'static str, &'static [u8]>),
    /// Read from the last commit.
    Committed(redb::ReadOnlyTable<&'static str, &'static [u8]>),
}

/// A function of any readable state table: [`StateTable::with`] calls it with whichever the
/// table is (a closure cannot be generic over the table type).
pub trait StateReader {
    /// What the read gives.
    type Out;
    /// Reads `t`.
    fn read<R: redb::ReadableTable<&'static str, &'static [u8]>>(self, t: &R) -> Self::Out;
}

impl StateTable<'_> {
    /// Runs `r` over the table.
    pub fn with<F: StateReader>(&self, r: F) -> F::Out {
        match self {
            StateTable::Open(t) => r.read(t),
            StateTable::Committed(t) => r.read(t),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{ReadableDatabase, TableDefinition};

    const T: TableDefinition<&str, u64> = TableDefinition::new("t");

    fn put(db: &StateDb, k: &'static str, v: u64) -> Result<(), String> {
        futures::executor::block_on(db.apply(1, |txn| {
            let mut t = txn.open_table(T).map_err(|e| e.to_string())?;
            t.insert(k, v).map_err(|e| e.to_string())?;
            Ok(())
        }))
    }

    fn fail(db: &StateDb) -> Result<(), String> {
        futures::executor::block_on(db.apply(1, |_| Err::<(), _>("bad entry".into())))
    }

    fn get(txn: &redb::ReadTransaction, k: &str) -> Option<u64> {
        let t = txn.open_table(T).ok()?;
        t.get(k).ok()?.map(|v| v.value())
    }

    fn open(dir: &std::path::Path) -> StateDb {
        let meter = opentelemetry::global::meter("test");
        StateDb::new(
            Database::create(dir.join("s.redb")).unwrap(),
            meter.f64_histogram("commit").build(),
        )
        .0
    }

    #[test]
    fn a_read_sees_every_apply_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path());
        put(&db, "a", 1).unwrap();
        put(&db, "b", 2).unwrap();
        // Nothing committed yet: the file's own readers do not see the applies...
        assert_eq!(get(&db.db.begin_read().unwrap(), "a"), None);
        // ...a read view does, because it commits first.
        let r = db.read().unwrap();
        assert_eq!((get(&r, "a"), get(&r, "b")), (Some(1), Some(2)));
    }

    /// Where [`a_crash_keeps_the_last_durable_commit`] has its child crash.
    const CRASH_DIR: &str = "RUNE_STATE_DB_CRASH_DIR";

    /// The crashing half of [`a_crash_keeps_the_last_durable_commit`], run in a child process:
    /// a clean drop would make every commit durable, so only a process that dies shows what a
    /// crash keeps.
    #[test]
    #[ignore = "run by a_crash_keeps_the_last_durable_commit in a child process"]
    fn crash_child() {
        let dir = std::path::PathBuf::from(std::env::var(CRASH_DIR).unwrap());
        let db = open(&dir);
        put(&db, "a", 1).unwrap();
        drop(db.durable_read().unwrap());
        put(&db, "b", 2).unwrap();
        drop(db.read().unwrap());
        put(&db, "c", 3).unwrap();
        std::process::abort();
    }

    #[test]
    fn a_crash_keeps_the_last_durable_commit() {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "db::tests::crash_child", "--ignored", "--nocapture"])
            .env(CRASH_DIR, dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(!status.success(), "the child was to die by abort");
        let db = Database::create(dir.path().join("s.redb")).unwrap();
        let r = db.begin_read().unwrap();
        // "a" was read durably; "b" only committed, "c" only applied: the log brings those back.
        assert_eq!((get(&r, "a"), get(&r, "b"), get(&r, "c")), (Some(1), None, None));
    }

    #[test]
    fn an_apply_that_fails_over_uncommitted_applies_stops_every_read() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path());
        // Failing with nothing uncommitted loses nothing: reads go on.
        assert!(fail(&db).is_err());
        assert!(db.read().is_ok());
        put(&db, "a", 1).unwrap();
        assert!(fail(&db).is_err());
        // "a" went with the aborted transaction: a read now would be behind what was applied.
        let e = db.read().err().unwrap();
        assert!(e.contains("bad entry") && e.contains("restart"), "{e}");
        assert!(put(&db, "b", 2).is_err());
    }

    /// Reads one key through [`StateDb::latest`], whichever table it hands over.
    struct Get(&'static str);

    impl StateReader for Get {
        type Out = Option<Vec<u8>>;
        fn read<R: redb::ReadableTable<&'static str, &'static [u8]>>(self, t: &R) -> Self::Out {
            t.get(self.0).ok()?.map(|v| v.value().to_vec())
        }
    }

    const S: TableDefinition<&str, &[u8]> = TableDefinition::new("s");

    #[tokio::test]
    async fn latest_reads_open_applies_without_committing_them() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path());
        // Nothing applied or committed yet: the table does not exist, and saying so is an error.
        assert!(db.latest(S, |t| t.with(Get("a"))).await.is_err());
        db.write(|txn| {
            txn.open_table(S).map_err(|e| e.to_string())?;
            Ok(())
        })
        .unwrap();
        // From the last commit when nothing is open.
        assert_eq!(db.latest(S, |t| t.with(Get("a"))).await.unwrap(), None);
        db.apply(1, |txn| {
            let mut t = txn.open_table(S).map_err(|e| e.to_string())?;
            t.insert("a", b"1".as_slice()).map_err(|e| e.to_string())?;
            Ok(())
        })
        .await
        .unwrap();
        // Inside the open transaction: the apply is seen...
        let open = db
            .latest(S, |t| (matches!(t, StateTable::Open(_)), t.with(Get("a"))))
            .await;
        assert_eq!(open.unwrap(), (true, Some(b"1".to_vec())));
        // ...and still not committed: the file's own readers do not see it.
        let committed = db.db.begin_read().unwrap();
        let t = committed.open_table(S).unwrap();
        assert!(t.get("a").unwrap().is_none());
        // The read left the open transaction intact: it commits as usual, and the apply is in it.
        drop((t, committed));
        db.commit(redb::Durability::None).unwrap();
        assert_eq!(
            db.latest(S, |t| t.with(Get("a"))).await.unwrap(),
            Some(b"1".to_vec())
        );
    }

    #[tokio::test]
    async fn a_read_waiting_for_an_apply_goes_on_once_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let db = std::sync::Arc::new(open(dir.path()));
        db.write(|txn| {
            txn.open_table(S).map_err(|e| e.to_string())?;
            Ok(())
        })
        .unwrap();
        let held = db.lock().unwrap();
        let reader = tokio::spawn({
            let db = db.clone();
            async move { db.latest(S, |t| t.with(Get("a"))).await }
        });
        // The reader cannot finish while the lock is held (this thread holds it, and the
        // reader runs on this same single-threaded runtime only when we yield).
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!reader.is_finished(), "the read went ahead of the holder");
        drop(held);
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), reader)
            .await
            .expect("the waiting read was woken")
            .unwrap();
        assert_eq!(got.unwrap(), None);
    }

    #[test]
    fn a_read_waiting_for_an_apply_leaves_its_worker_to_other_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let db = std::sync::Arc::new(open(dir.path()));
        put(&db, "a", 1).unwrap();
        // One worker: a read that blocked it outright would starve every other task.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        // An apply (here: another thread) holds the state until told to let go.
        let (locked_tx, locked_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn({
            let db = db.clone();
            move || {
                let held = db.lock().unwrap();
                locked_tx.send(()).unwrap();
                let _ = release_rx.recv();
                drop(held);
            }
        });
        locked_rx.recv().unwrap();
        let ten_s = std::time::Duration::from_secs(10);
        let (reading_tx, reading_rx) = std::sync::mpsc::channel();
        let reader = rt.spawn({
            let db = db.clone();
            async move {
                let _ = reading_tx.send(());
                db.read().map(|txn| get(&txn, "a"))
            }
        });
        reading_rx.recv_timeout(ten_s).expect("the reader started");
        // Spawned after the reader took the worker: it runs only if the reader gave it up.
        // Waited for on this thread, so a blocked worker fails the test instead of hanging it.
        let (ran_tx, ran_rx) = std::sync::mpsc::channel();
        rt.spawn(async move {
            let _ = ran_tx.send(());
        });
        let ran = ran_rx.recv_timeout(ten_s);
        let read_early = reader.is_finished();
        release_tx.send(()).unwrap();
        ran.expect("another task ran while the read waited");
        assert!(!read_early, "the read went ahead of the holder");
        let got = rt
            .block_on(async { tokio::time::timeout(ten_s, reader).await })
            .expect("the read went on once the holder let go")
            .unwrap();
        assert_eq!(got.unwrap(), Some(1));
        holder.join().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_scheduled_commit_lands_without_a_reader() {
        let dir = tempfile::tempdir().unwrap();
        let db = std::sync::Arc::new(open(dir.path()));
        put(&db, "a", 1).unwrap();
        db.schedule_commit();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while get(&db.db.begin_read().unwrap(), "a").is_none() {
            assert!(std::time::Instant::now() < deadline, "the commit never came");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }
}
