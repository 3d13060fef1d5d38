//! The `rune.v1` API as generated Rust. Only this crate and the gRPC edge in `runed` know these
//! types; the rest of the workspace speaks the domain types of `rune-statemachine`.

#![forbid(unsafe_code)]

/// Generated messages and services of package `rune.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("rune.v1");

    /// The encoded descriptors of `rune.v1`, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("rune_descriptor");
}
