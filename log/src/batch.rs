//! Group commit: proposals that arrive while an entry is being made durable and applied queue
//! up, and the next entry carries all of them, so they share one fsync (openraft 0.9 waits for
//! each append's flush before the next, so batching must happen before raft).
//!
//! No task sits between a proposer and raft: when nothing is in flight the proposer submits its
//! own entry, and the entry's responder ([`Answer`], which openraft calls once the entry is
//! applied) answers each proposer and submits whatever queued meanwhile. A lone writer's
//! proposal so costs two fewer task wake-ups than going through a batching task would.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use openraft::error::ClientWriteError;
use openraft::raft::responder::Responder;
use openraft::raft::ClientWriteResult;
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
/// throughput lower at 16 and 64 clients).
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
            let entry = self.entry(batch);
            // On failure raft dropped the entry, and with it the answer, which said why.
            let _ = self.raft.client_write_ff(entry).await;
        }
        rx.await.map_err(|_| shut_down())?
    }

    /// One entry for `batch`, carrying its [`Answer`]. Made without an await, so that from
    /// here on whatever happens to the entry (answered, refused, dropped) answers its
    /// proposers and moves the gate on: a queued proposal is never left waiting.
    fn entry(self: &Arc<Self>, batch: Vec<Pending>) -> Batch {
        self.metrics.batch_envelopes.record(batch.len() as u64, &[]);
        let (envelopes, replies): (Vec<Envelope>, Vec<ReplyTx>) =
            batch.into_iter().map(|p| (p.envelope, p.reply)).unzip();
        let answer = Answer {
            replies,
            batcher: Some(self.clone()),
        };
        Batch {
            envelopes: envelopes.into(),
            answer: Carried(Some(answer)),
        }
    }

    /// The entry in flight is done: the next one carries what queued meanwhile.
    fn next(self: Arc<Self>) {
        let rt = tokio::runtime::Handle::try_current().ok();
        let batch = {
            let mut g = self.gate();
            if g.queue.is_empty() {
                g.in_flight = false;
                return;
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
        match rt {
            Some(rt) => {
                let entry = self.entry(batch);
                let raft = self.raft.clone();
                rt.spawn(async move {
                    let _ = raft.client_write_ff(entry).await;
                });
            }
            None => {
                for p in batch {
                    let _ = p.reply.send(Err(shut_down()));
                }
            }
        }
    }
}

fn shut_down() -> ProposeError {
    ProposeError::Unavailable("the log is shut down".into())
}

/// Travels inside a [`Batch`] into raft, where it becomes the entry's [`Answer`]: neither
/// encoded nor cloned (a clone carries nothing).
#[derive(Default)]
pub struct Carried(Option<Answer>);

impl Clone for Carried {
    fn clone(&self) -> Self {
        Self(None)
    }
}

impl PartialEq for Carried {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for Carried {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Carried")
    }
}

/// The responder of one entry: answers the proposals it carries, each with its own outcome,
/// and starts the next entry.
pub struct Answer {
    replies: Vec<ReplyTx>,
    batcher: Option<Arc<Batcher>>,
}

impl Answer {
    fn answer(&mut self, result: ClientWriteResult<TypeConfig>) {
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
                let msg = match e {
                    ClientWriteError::ForwardToLeader(f) => {
                        format!("not the leader (leader: {:?})", f.leader_id)
                    }
                    e => e.to_string(),
                };
                for reply in replies {
                    let _ = reply.send(Err(ProposeError::Unavailable(msg.clone())));
                }
            }
        }
    }
}

impl Responder<TypeConfig> for Answer {
    type Receiver = ();

    fn from_app_data(mut batch: Batch) -> (Batch, Self, ())
    where
        Self: Sized,
    {
        // Entries made outside the batcher (none today) carry no answer: an empty one.
        let answer = batch.answer.0.take().unwrap_or(Answer {
            replies: Vec::new(),
            batcher: None,
        });
        (batch, answer, ())
    }

    fn send(mut self, result: ClientWriteResult<TypeConfig>) {
        // The next entry first: its append can start while these proposers wake.
        if let Some(b) = self.batcher.take() {
            b.next();
        }
        self.answer(result);
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        // Dropped unanswered: raft refused or lost the entry (shut down, failed storage).
        for reply in self.replies.drain(..) {
            let _ = reply.send(Err(ProposeError::Unavailable(
                "the log is shut down or failed before applying this write".into(),
            )));
        }
        if let Some(b) = self.batcher.take() {
            b.next();
        }
    }
}
