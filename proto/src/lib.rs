//! The `rune.v1` API as generated Rust. Only this crate and the gRPC edge in `runed` know these
//! types; the rest of the workspace speaks the domain types of `rune-statemachine`. Beside it,
//! `rune.raft.v1`, the raft peers' protocol, which only `rune-log` speaks.

#![forbid(unsafe_code)]

/// Generated messages and services of package `rune.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("rune.v1");

    /// The encoded descriptors of `rune.v1`, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("rune_descriptor");
}

/// Generated messages and service of package `rune.raft.v1`: openraft's RPCs between nodes.
#[allow(clippy::all, missing_docs)]
pub mod raft {
    tonic::include_proto!("rune.raft.v1");
}
