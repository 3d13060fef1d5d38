//! The ordered log: every write to Rune's state is an entry here before it is anything else.
//!
//! - [`Log`] opens openraft (one voter) over a write-ahead log ([`log_store`], [`wal`]) and a
//!   redb state machine ([`state_machine`]), proposes commands, and hands out read views, the
//!   applied-index watch and the stream of applied entries that projections tail.
//! - [`projection`] is how subsystems follow the log: a view built from the state at an index,
//!   then fed the typed deltas of every later entry.
//! - [`replay`] reads a data dir offline for `rune admin replay`.
//!
//! Architecture invariants: a proposal is answered only after its entry is fsynced (through
//! openraft's `LogFlushed` callback); concurrent proposals share fsyncs; only this crate and
//! `rune-statemachine` open write transactions on the state database.

#![forbid(unsafe_code)]
#![warn(missing_docs)]
// openraft's storage traits return its own `StorageError`, which is large by design.
#![allow(clippy::result_large_err)]

pub mod backup;
mod batch;
mod db;
mod followers;
pub mod join;
pub mod lag;
pub mod log_store;
pub mod metrics;
pub mod network;
mod node;
pub mod pki;
pub mod projection;
pub mod replay;
pub mod snapshot;
pub mod space;
pub mod state_machine;
pub mod types;
pub mod wal;

pub use db::{StateReader, StateTable};
pub use node::{
    now_ms, ClusterMember, ClusterStatus, Log, LogConfig, LogError, MemberView, ProposeError, Proposed,
    LEGACY_LOG_FILE, LOG_DIR, SNAPSHOT_DIR, STATE_FILE,
};
pub use state_machine::AppliedEntry;
