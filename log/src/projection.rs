//! The one way a subsystem follows the log: a projection.
//!
//! A [`View`] (the DNS zone, the data plane's table, the ingress routes, the orchestrator's
//! picture of services and instances) starts from a consistent read of the state at index N
//! ([`View::reset`] with every followed object as a [`Delta`]) and then gets, in order, the
//! deltas of every entry after N ([`View::apply`]). [`Projection`] owns everything around that,
//! so the four subsystems do it one way:
//!
//! - **coalescing**: entries already waiting are applied together (at most [`MAX_BATCH`]
//!   events, one per write: a batch can end inside an entry, whose index then counts as
//!   applied only once its last event, [`AppliedEntry::ends_entry`], is);
//! - **lag**: the index applied so far, and since when the view has been behind the log, which
//!   each subsystem compares with its stale budget to fail closed ([`Projection::stale`]);
//! - **losing the thread**: a lagged subscription, an installed snapshot or a failed apply
//!   rebuilds from the state; a failed rebuild is retried with backoff (100 ms doubling to 5 s)
//!   and leaves the view behind, never half-applied and never empty;
//! - **the pause failpoint**, which holds entries unapplied as a slow projection would.
//!
//! The loops of every projection run on the log's one followers' task ([`Log::follow`]): an
//! entry wakes it once for all of them. So a view's `apply` and `reset` must not block the
//! thread: what they wait for (a program being loaded) they await, and the other views go on
//! meanwhile; the rebuild's read of the state runs on the blocking pool.
//!
//! Cost per entry is what the entry changed: nothing here reads the whole state except a
//! rebuild.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rune_statemachine::delta::{self, Delta};
use rune_statemachine::STATE_TABLE;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{broadcast, watch};

use crate::lag::Lag;
use crate::state_machine::AppliedEntry;
use crate::Log;

/// Most events (writes) applied in one go: bounds the latency a burst adds to the next entry.
pub const MAX_BATCH: usize = 1024;

/// Why a view could not take a change or a rebuild.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// The state could not be read (or a record in it does not decode).
    #[error("cannot read the state: {0}")]
    State(String),
    /// The view refused or failed to apply.
    #[error("{0}")]
    View(String),
}

/// What a subsystem keeps of the state, fed by a [`Projection`].
pub trait View: Send + Sync + 'static {
    /// Replaces the whole view with the state at one index: every followed object, as upserts.
    fn reset(&self, state: Vec<Delta>) -> impl Future<Output = Result<(), ProjectionError>> + Send;

    /// Applies, in order, the deltas of entries after the view's index. On error the
    /// projection rebuilds: a view need not undo a half-applied batch.
    fn apply(&self, deltas: &[&Delta]) -> impl Future<Output = Result<(), ProjectionError>> + Send;

    /// Whether a delta can change this view; others are skipped without a call.
    fn wants(&self, _delta: &Delta) -> bool {
        true
    }
}

/// A running projection: its lag, counters and failpoint. The view itself is the subsystem's.
#[derive(Debug)]
pub struct Projection {
    name: &'static str,
    lag: Lag,
    stale_budget: Duration,
    paused: watch::Sender<bool>,
    rebuilds: AtomicU64,
    errors: AtomicU64,
    applied_deltas: AtomicU64,
}

impl Projection {
    /// Subscribes, builds `view` from the state and follows the log. A first build that fails
    /// is logged, counted and retried in the background: the view stays behind (stale) until
    /// one succeeds, rather than keep runed from starting.
    pub async fn start<V: View>(
        log: Arc<Log>,
        name: &'static str,
        view: Arc<V>,
        stale_budget: Duration,
    ) -> Arc<Projection> {
        let p = Arc::new(Projection {
            name,
            lag: Lag::new(),
            stale_budget,
            paused: watch::channel(false).0,
            rebuilds: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            applied_deltas: AtomicU64::new(0),
        });
        // Subscribe first: entries applied while the state is read are then waiting, and the
        // ones the read already holds are skipped by index.
        let rx = log.subscribe();
        let lost = match p.rebuild(&log, &*view).await {
            Ok(()) => false,
            Err(e) => {
                p.failed(&e, "cannot build the view; retrying");
                p.lag.set_lost(true);
                true
            }
        };
        p.lag.watch(log.clone());
        log.follow(name, follow(p.clone(), log.clone(), view, rx, lost));
        p
    }

    /// The name in logs and metrics (`dns`, `dataplane`, `ingress`, `orchestrator`).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The last log index the view reflects.
    pub fn applied_index(&self) -> u64 {
        self.lag.applied()
    }

    /// Returns once the view reflects log index `index`: a caller that changed something
    /// through the log waits here until this subsystem acts on it.
    pub async fn reached(&self, index: u64) {
        self.lag.reached(index).await
    }

    /// How long the view has been behind the log (0 when caught up).
    pub fn stale_seconds(&self) -> f64 {
        self.lag.stale_seconds()
    }

    /// Behind for longer than the stale budget, or never built (its first read of the state
    /// failed, so the view is empty rather than old): the subsystem must fail closed. An empty
    /// view would otherwise answer for the budget's length as if nothing existed (NXDOMAIN
    /// for every name, 404 for every host).
    pub fn stale(&self) -> bool {
        self.rebuilds() == 0 || self.lag.stale(self.stale_budget)
    }

    /// Full rebuilds so far (the first build included).
    pub fn rebuilds(&self) -> u64 {
        self.rebuilds.load(Ordering::Relaxed)
    }

    /// Failed reads, rebuilds and applies so far.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Deltas applied one by one so far (rebuilds not counted).
    pub fn applied_deltas(&self) -> u64 {
        self.applied_deltas.load(Ordering::Relaxed)
    }

    /// Failpoint: holds entries unapplied, as a slow projection would.
    pub fn pause(&self, paused: bool) {
        self.paused.send_replace(paused);
    }

    async fn unpaused(&self) {
        let mut rx = self.paused.subscribe();
        let _ = rx.wait_for(|p| !*p).await;
    }

    fn failed(&self, e: &ProjectionError, what: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!(projection = self.name, error = %e, "{what}");
    }

    async fn rebuild<V: View>(&self, log: &Arc<Log>, view: &V) -> Result<(), ProjectionError> {
        // Off the followers' task: the read may wait for the state's lock, commits what was
        // applied, and decodes every followed record, while the other views go on.
        let reader = log.clone();
        let (index, state) = tokio::task::spawn_blocking(move || read_state(&reader))
            .await
            .map_err(|e| ProjectionError::State(format!("the state read stopped: {e}")))??;
        view.reset(state).await?;
        self.rebuilds.fetch_add(1, Ordering::Relaxed);
        self.lag.advance(index);
        Ok(())
    }
}

/// Every followed object in the state and the index it is the state at, in one read.
pub fn read_state(log: &Log) -> Result<(u64, Vec<Delta>), ProjectionError> {
    let state = |e: &dyn std::fmt::Display| ProjectionError::State(e.to_string());
    let (txn, index) = log.read_indexed().map_err(|e| state(&e))?;
    let table = match txn.open_table(STATE_TABLE) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok((index, Vec::new())),
        Err(e) => return Err(state(&e)),
    };
    let deltas = delta::snapshot(&table).map_err(|e| state(&e))?;
    Ok((index, deltas))
}

async fn follow<V: View>(
    p: Arc<Projection>,
    log: Arc<Log>,
    view: Arc<V>,
    mut rx: broadcast::Receiver<Arc<AppliedEntry>>,
    mut lost: bool,
) {
    let mut delay = Duration::from_millis(100);
    loop {
        let mut batch: Vec<Arc<AppliedEntry>> = Vec::new();
        if !lost {
            match rx.recv().await {
                Ok(e) => batch.push(e),
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(
                        projection = p.name,
                        missed = n,
                        "fell behind the log; rebuilding from the state"
                    );
                    lost = true;
                }
                Err(RecvError::Closed) => return,
            }
            while !lost && batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(e) => batch.push(e),
                    Err(TryRecvError::Lagged(n)) => {
                        tracing::warn!(
                            projection = p.name,
                            missed = n,
                            "fell behind the log; rebuilding from the state"
                        );
                        lost = true;
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Closed) => break,
                }
            }
        }
        p.unpaused().await;
        if lost || batch.iter().any(|e| e.reset) {
            p.lag.set_lost(true);
            match p.rebuild(&log, &*view).await {
                Ok(()) => {
                    p.lag.set_lost(false);
                    lost = false;
                    delay = Duration::from_millis(100);
                }
                Err(e) => {
                    // Behind until a rebuild works: the stale budget runs, nothing is guessed.
                    p.failed(&e, "rebuild failed; keeping the previous view and retrying");
                    lost = true;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
        }
        // Entries the view already holds (a rebuild read them) or applied in part before:
        // `applied` only counts an entry once its last event is in, so the rest of one that an
        // earlier batch ended inside still passes.
        let applied = p.lag.applied();
        let done = batch.iter().filter(|e| e.ends_entry).map(|e| e.index).max();
        let deltas: Vec<&Delta> = batch
            .iter()
            .filter(|e| e.index > applied && !e.reset)
            .flat_map(|e| e.deltas.iter())
            .filter(|d| view.wants(d))
            .collect();
        if !deltas.is_empty() {
            if let Err(e) = view.apply(&deltas).await {
                p.failed(&e, "cannot apply an entry; rebuilding from the state");
                lost = true;
                continue;
            }
            p.applied_deltas.fetch_add(deltas.len() as u64, Ordering::Relaxed);
        }
        if let Some(done) = done {
            p.lag.advance(done);
        }
    }
}
