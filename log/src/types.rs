//! The openraft type configuration: what an entry carries and what applying it answers.

use std::io::Cursor;

use rune_statemachine::{Envelope, Outcome};
use serde::{Deserialize, Serialize};

/// What applying one entry answered; blank and membership entries answer `Ok(vec![])`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply(pub Outcome);

openraft::declare_raft_types!(
    /// Rune's raft types: entries carry an [`Envelope`], node ids are `u64`.
    pub TypeConfig:
        D = Envelope,
        R = Reply,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The id of this node; release 1 is a single voter.
pub const NODE_ID: u64 = 1;
