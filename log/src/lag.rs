//! How far a projection (DNS, data plane, ...) is behind the applied log, so that it can fail
//! closed once it has lagged for longer than its stale budget.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::Log;

#[derive(Debug)]
struct Inner {
    applied: AtomicU64,
    /// The projection lost its thread and has not rebuilt yet: behind whatever the index says.
    lost: AtomicBool,
    behind_since: Mutex<Option<Instant>>,
    /// `applied`, for those waiting until the view reflects an entry ([`Lag::reached`]).
    reached: watch::Sender<u64>,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            applied: AtomicU64::new(0),
            lost: AtomicBool::new(false),
            behind_since: Mutex::new(None),
            reached: watch::channel(0).0,
        }
    }
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
        self.0.reached.send_if_modified(|at| {
            let moved = index > *at;
            if moved {
                *at = index;
            }
            moved
        });
    }

    /// Returns once the projection has applied log index `index` (at once if it has).
    pub async fn reached(&self, index: u64) {
        let mut rx = self.0.reached.subscribe();
        // The sender lives as long as `self`: the wait ends only by reaching the index.
        let _ = rx.wait_for(|at| *at >= index).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reached_waits_for_the_index_and_never_for_a_past_one() {
        let lag = Lag::new();
        lag.advance(5);
        lag.reached(3).await;
        lag.reached(5).await;
        let waiter = tokio::spawn({
            let lag = lag.clone();
            async move { lag.reached(7).await }
        });
        lag.advance(6);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "returned before index 7 was applied");
        lag.advance(9);
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("reached(7) returns once 9 is applied")
            .expect("no panic");
        // The index never moves back.
        lag.advance(2);
        assert_eq!(lag.applied(), 9);
    }
}
