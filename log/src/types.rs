//! The openraft type configuration: what an entry carries and what applying it answers.

use std::io::Cursor;
use std::sync::Arc;

use rune_statemachine::{Envelope, Outcome};
use serde::{Deserialize, Serialize};

/// One log entry's payload: the proposals that arrived while the previous entry was being
/// made durable. Batching them into one entry is what makes them share one fsync (openraft 0.9
/// waits for each append's flush before the next). Applied in order, each on its own. Shared
/// (`Arc`), so the copy of an entry that the log keeps for the state machine costs no deep clone;
/// it is encoded as the list it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Batch {
    /// The proposals, in the order they are applied.
    pub envelopes: Arc<[Envelope]>,
}

impl std::fmt::Display for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "batch of {}", self.envelopes.len())
    }
}

/// What applying one entry answered: one outcome per envelope of its batch (none for blank and
/// membership entries).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply(pub Vec<Outcome>);

openraft::declare_raft_types!(
    /// Rune's raft types: entries carry a [`Batch`] of envelopes, node ids are `u64`.
    pub TypeConfig:
        D = Batch,
        R = Reply,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The id of this node; release 1 is a single voter.
pub const NODE_ID: u64 = 1;
