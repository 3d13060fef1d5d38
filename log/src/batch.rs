//! Group commit: proposals that arrive while an entry is being made durable and applied queue
//! up, and the next entry carries all of them, so they share one fsync (openraft 0.9 waits for
//! each append's flush before the next, so batching must happen before raft).
//!
//! No task sits between a lone proposer and raft: when nothing is in flight the proposer submits
//! its own entry and waits on raft's answer itself ([`Flight`]), so a lone writer's proposal
//! costs no wake-up beyond raft's own. When the answer comes, the next entry carries whatever
//! queued meanwhile, flown by a task, which answers each of its proposers. A submitter that
//! goes away (its caller gave up) starts the next entry as it goes, so nothing queued is left
//! waiting.
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use openraft::error::ClientWriteError;
use openraft::raft::ClientWriteResponse;
use openraft::Raft;
use rune_statemachine::Envelope;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::metrics::Metrics;
use crate::node::{ProposeError, Proposed};
use crate::types::{Batch, TypeConfig};

/// Proposals waiting for an entry; proposers wait (back-pressure) beyond this.
const MAX_QUEUED_PROPOSALS: usize = 4096;
/// Largest batch in one entry: bounds entry size and the work one apply does.
const MAX_BATCH: usize = 512;

type ReplyTx = oneshot::Sender<Result<Proposed, ProposeError>>;

/// A proposal and where its outcome goes.
struct Pending {
    envelope: Envelope,
    reply: ReplyTx,
    /// Its place in the queue, given back when it joins an entry.
    _room: OwnedSemaphorePermit,
}

/// One entry in flight at a time (measured with `cargo bench --bench writes`: two or four,
/// overlapping one entry's apply with the next one's append, made batches smaller and
/// throughput lower at 16 and 64 clients; so did submitting the next entry as soon as the
/// last was durable, as etcd does: 4.4 instead of 5.5 proposals per entry at 16 clients, 12.9
/// instead of 18.9 at 64, and more CPU per write on 2 cores).
#[derive(Default)]
struct Gate {
    in_flight: bool,
    queue: VecDeque<Pending>,
}

impl Gate {
    fn take(&mut self) -> Vec<Pending> {
        let n = self.queue.len().min(MAX_BATCH);
        self.queue.drain(..n).collect()
    }
}

/// The proposers' side of group commit, shared by every [`crate::Log::propose`].
pub(crate) struct Batcher {
    raft: Raft<TypeConfig>,
    gate: Mutex<Gate>,
    room: Arc<Semaphore>,
    metrics: Metrics,
}

impl Batcher {
    pub(crate) fn new(raft: Raft<TypeConfig>, metrics: Metrics) -> Arc<Self> {
        Arc::new(Self {
            raft,
            gate: Mutex::default(),
            room: Arc::new(Semaphore::new(MAX_QUEUED_PROPOSALS)),
            metrics,
        })
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, Gate> {
        // Every change under the lock is a few queue operations that do not panic midway.
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `envelope` and waits until the entry carrying it is applied.
    pub(crate) async fn propose(self: &Arc<Self>, envelope: Envelope) -> Result<Proposed, ProposeError> {
        let room = self.room.clone().acquire_owned().await.map_err(|_| shut_down())?;
        let (reply, rx) = oneshot::channel();
        let mine = {
            let mut g = self.gate();
            g.queue.push_back(Pending {
                envelope,
                reply,
                _room: room,
            });
            if g.in_flight {
                None
            } else {
                g.in_flight = true;
                Some(g.take())
            }
        };
        if let Some(batch) = mine {
            // Whatever queued while this entry flew goes on in a task of its own.
            if let Some(next) = self.flight(batch).fly().await {
                tokio::spawn(next.fly_on());
            }
        }
        rx.await.map_err(|_| shut_down())?
    }

    /// The entry for `batch` and its [`Flight`]. Made without an await, so that from here on
    /// whatever happens to the entry (answered, refused, dropped) answers its proposers and
    /// moves the gate on: a queued proposal is never left waiting.
    fn flight(self: &Arc<Self>, batch: Vec<Pending>) -> Flight {
        self.metrics.batch_envelopes.record(batch.len() as u64, &[]);
        let (envelopes, replies): (Vec<Envelope>, Vec<ReplyTx>) =
            batch.into_iter().map(|p| (p.envelope, p.reply)).unzip();
        Flight {
            entry: Some(Batch {
                envelopes: envelopes.into(),
            }),
            replies,
            batcher: Some(self.clone()),
        }
    }

    /// The entry in flight is done: the next one carries what queued meanwhile (none when
    /// nothing did, or when no runtime is left to fly it).
    fn next(self: Arc<Self>) -> Option<Flight> {
        let rt = tokio::runtime::Handle::try_current().ok();
        let batch = {
            let mut g = self.gate();
            if g.queue.is_empty() {
                g.in_flight = false;
                return None;
            }
            match rt {
                Some(_) => g.take(),
                // No runtime left: nothing can be proposed any more. Everything queued is
                // refused and the gate opened under one lock, so no later proposal waits on
                // an entry that will never come.
                None => {
                    g.in_flight = false;
                    g.queue.drain(..).collect()
                }
            }
        };
        if rt.is_some() {
            return Some(self.flight(batch));
        }
        for p in batch {
            let _ = p.reply.send(Err(shut_down()));
        }
        None
    }
}

fn shut_down() -> ProposeError {
    ProposeError::Unavailable("the log is shut down".into())
}

/// One entry on its way through raft: its proposers' replies, and the batcher whose next
/// entry waits for it. Answered, refused or dropped, it moves the gate on.
struct Flight {
    entry: Option<Batch>,
    replies: Vec<ReplyTx>,
    batcher: Option<Arc<Batcher>>,
}

impl Flight {
    /// Flies this entry and every one after it, until the queue is empty: the task that
    /// raft's answer wakes submits the next entry itself, with no task in between.
    async fn fly_on(self) {
        let mut flight = Some(self);
        while let Some(f) = flight {
            flight = f.fly().await;
        }
    }

    /// Submits the entry and waits for raft's answer, then makes the next entry and answers
    /// this one's proposers; returns the next entry, for the caller to fly.
    async fn fly(mut self) -> Option<Flight> {
        let (Some(batcher), Some(entry)) = (self.batcher.clone(), self.entry.take()) else {
            return None;
        };
        let result = match batcher.raft.client_write_ff(entry).await {
            Ok(answer) => match answer.await {
                Ok(Ok(resp)) => Ok(resp),
                Ok(Err(e)) => Err(refused(e)),
                // Raft dropped the entry unanswered: shut down or its storage failed.
                Err(_) => Err(dropped()),
            },
            Err(fatal) => Err(ProposeError::Unavailable(fatal.to_string())),
        };
        self.finish(result)
    }

    /// The entry is done: the next one is made first (so that it is submitted as soon as
    /// these proposers are told), then each proposer gets its own outcome.
    fn finish(&mut self, result: Result<ClientWriteResponse<TypeConfig>, ProposeError>) -> Option<Flight> {
        let next = self.batcher.take().and_then(Batcher::next);
        let replies = std::mem::take(&mut self.replies);
        match result {
            Ok(resp) => {
                let index = resp.log_id.index;
                let mut outcomes = resp.data.0.into_iter();
                for reply in replies {
                    let r = match outcomes.next() {
                        Some(outcome) => Ok(Proposed { index, outcome }),
                        None => Err(ProposeError::Unavailable(
                            "apply answered fewer outcomes than proposals".into(),
                        )),
                    };
                    let _ = reply.send(r);
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
        next
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        // Dropped before raft answered: the submitter's caller gave up, or there is no runtime
        // left. Only a submitter's own proposal rides in an entry it submits (the gate was
        // idle, so nothing else had queued), so no one else waits on this answer; what queued
        // since goes in the next entry now.
        if self.batcher.is_some() {
            if let Some(next) = self.finish(Err(dropped())) {
                // `next` holds a runtime's handle: there is one to spawn on.
                tokio::spawn(next.fly_on());
            }
        }
    }
}

/// Why raft refused an entry, naming the leader when this node is not it.
fn refused(e: ClientWriteError<u64, openraft::BasicNode>) -> ProposeError {
    match e {
        ClientWriteError::ForwardToLeader(f) => ProposeError::NotLeader(format!(
            "not the leader (leader: {})",
            match (f.leader_id, f.leader_node) {
                (Some(id), Some(n)) => format!("node {id} at {}", n.addr),
                (Some(id), None) => format!("node {id}"),
                _ => "none known".into(),
            }
        )),
        e => ProposeError::Unavailable(e.to_string()),
    }
}

fn dropped() -> ProposeError {
    ProposeError::Unavailable("the log is shut down or failed before applying this write".into())
}
