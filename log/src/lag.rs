//! How far a projection (DNS, data plane, ...) is behind the applied log, so that it can fail
//! closed once it has lagged for longer than its stale budget.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::Log;

#[derive(Debug, Default)]
struct Inner {
    applied: AtomicU64,
    /// The projection lost its thread and has not rebuilt yet: behind whatever the index says.
    lost: AtomicBool,
    behind_since: Mutex<Option<Instant>>,
}

/// A projection's applied index and since when it has been behind the log. Cheap to clone;
/// the watcher started by [`Lag::watch`] ends when every clone is gone.
#[derive(Debug, Clone, Default)]
pub struct Lag(Arc<Inner>);

impl Lag {
    /// A projection that has applied nothing yet.
    pub fn new() -> Lag {
        Lag::default()
    }

    /// The last log index the projection applied.
    pub fn applied(&self) -> u64 {
        self.0.applied.load(Ordering::Relaxed)
    }

    /// Marks the view as lost (it must rebuild before it is current again) or found.
    pub fn set_lost(&self, lost: bool) {
        self.0.lost.store(lost, Ordering::Relaxed);
    }

    /// Records that everything up to `index` is applied (never moves back).
    pub fn advance(&self, index: u64) {
        self.0.applied.fetch_max(index, Ordering::Relaxed);
    }

    /// How long the projection has been behind the log (0 when caught up).
    pub fn stale_seconds(&self) -> f64 {
        self.0
            .behind_since
            .lock()
            .ok()
            .and_then(|b| *b)
            .map_or(0.0, |t| t.elapsed().as_secs_f64())
    }

    /// Whether it has been behind for longer than `budget`.
    pub fn stale(&self, budget: Duration) -> bool {
        self.stale_seconds() > budget.as_secs_f64()
    }

    /// Compares the projection with the log's applied index every 100 ms.
    pub fn watch(&self, log: Arc<Log>) {
        let weak: Weak<Inner> = Arc::downgrade(&self.0);
        tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let tail = *log.applied().borrow();
                let behind =
                    inner.applied.load(Ordering::Relaxed) < tail || inner.lost.load(Ordering::Relaxed);
                if let Ok(mut b) = inner.behind_since.lock() {
                    match (behind, *b) {
                        (false, _) => *b = None,
                        (true, None) => *b = Some(Instant::now()),
                        (true, Some(_)) => {}
                    }
                }
                drop(inner);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
}
