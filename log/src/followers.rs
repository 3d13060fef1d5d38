//! One task for everything that follows the applied entries.
//!
//! Each applied entry is broadcast to the projections (DNS, data plane, ingress, orchestrator)
//! and to the metrics that count changes. As tasks of their own, each entry woke five of them:
//! five trips through the scheduler, and often a second worker thread woken to steal, for what
//! is a few microseconds of work in each. Here they are futures of one task (a
//! `FuturesUnordered`): an entry wakes that task once and it polls every follower the entry
//! woke. A follower that waits (a paused projection, a backoff, a program being loaded) waits
//! alone, as before; only their CPU work is now taken in turn, so what could hold a thread
//! (a projection's read of the whole state) goes to the blocking pool instead.
//!
//! The task runs on the runtime of the first follower to join: runed has one. (Watches and
//! token checks also subscribe, per client; they stay tasks of their own.)

use std::panic::AssertUnwindSafe;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;

/// The handle through which followers join the one task; the task starts with the first.
#[derive(Debug, Default)]
pub(crate) struct Followers {
    tx: std::sync::OnceLock<mpsc::UnboundedSender<(&'static str, BoxFuture<'static, ()>)>>,
}

impl Followers {
    /// Runs `follower` on the followers' task (started on the current runtime with the first).
    pub(crate) fn run(&self, name: &'static str, follower: BoxFuture<'static, ()>) {
        let tx = self.tx.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(drive(rx));
            tx
        });
        if let Err(mpsc::error::SendError((name, _))) = tx.send((name, follower)) {
            // Only when the task is gone: its runtime is shutting down.
            tracing::warn!(follower = name, "the followers' task has ended; not following");
        }
    }
}

async fn drive(mut rx: mpsc::UnboundedReceiver<(&'static str, BoxFuture<'static, ()>)>) {
    let mut running = FuturesUnordered::new();
    // A follower that panics ends alone, as its own task would have, and says so.
    let guarded = |name: &'static str, f: BoxFuture<'static, ()>| {
        AssertUnwindSafe(f).catch_unwind().map(move |r| {
            if r.is_err() {
                tracing::error!(follower = name, "a follower of the log panicked and stopped");
            }
        })
    };
    loop {
        tokio::select! {
            joined = rx.recv() => match joined {
                Some((name, f)) => running.push(guarded(name, f)),
                None => break,
            },
            Some(()) = running.next(), if !running.is_empty() => {}
        }
    }
    while running.next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::*;

    const DEADLINE: Duration = Duration::from_secs(10);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn followers_share_one_task() {
        let f = Followers::default();
        let (a_tx, a_rx) = oneshot::channel();
        let (b_tx, b_rx) = oneshot::channel();
        f.run(
            "a",
            Box::pin(async move { a_tx.send(tokio::task::id()).expect("the test waits") }),
        );
        f.run(
            "b",
            Box::pin(async move { b_tx.send(tokio::task::id()).expect("the test waits") }),
        );
        let a = tokio::time::timeout(DEADLINE, a_rx)
            .await
            .expect("a ran")
            .expect("a answered");
        let b = tokio::time::timeout(DEADLINE, b_rx)
            .await
            .expect("b ran")
            .expect("b answered");
        assert_eq!(a, b, "both followers ran on one task");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_follower_that_panics_stops_alone() {
        let f = Followers::default();
        let (polled_tx, polled_rx) = oneshot::channel::<()>();
        f.run(
            "panics",
            Box::pin(async move {
                drop(polled_tx);
                panic!("a follower's bug");
            }),
        );
        // Dropped once the panicking follower runs: it has panicked by the time the next joins.
        let _ = tokio::time::timeout(DEADLINE, polled_rx)
            .await
            .expect("the follower ran");
        let (tx, rx) = oneshot::channel();
        f.run(
            "goes on",
            Box::pin(async move { tx.send(()).expect("the test waits") }),
        );
        tokio::time::timeout(DEADLINE, rx)
            .await
            .expect("a follower joining after the panic runs")
            .expect("it answered");
    }
}
