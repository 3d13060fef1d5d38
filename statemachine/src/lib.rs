//! Rune's desired state, independent of how it is stored in order or served.
//!
//! - [`spec`]: the resource specs users cast, in the original Rune's YAML shapes.
//! - [`decode`] and [`validate`]: strict decoding and offline validation, shared by lint and the API.
//! - [`command`]: the versioned log payload and what applying it did.
//! - [`store`]: the redb state table and [`store::apply`], the only code that writes it.
//! - [`delta`]: typed records of what an entry wrote, and the same records read from the state,
//!   which projections start from and follow.
//!
//! Architecture invariant: `apply` reads nothing but the table and the entry (no clock, no
//! randomness, no environment), so replaying the log from empty gives byte-identical state.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod command;
pub mod decode;
pub mod delta;
pub mod deps;
pub mod identity;
pub mod instance;
pub mod meta;
pub mod network;
pub mod secret;
pub mod spec;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod uses;
pub mod validate;

/// The namespace a spec without one lands in.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Previous specs kept per service unless the proposer says otherwise.
pub const DEFAULT_HISTORY_LIMIT: u32 = 10;

/// Largest accepted spec, as canonical JSON: a spec is configuration, not a payload store.
pub const MAX_SPEC_BYTES: usize = 1024 * 1024;

pub use command::{Action, Change, Command, Envelope, Kind, Outcome, Rejection, Resource, FORMAT_VERSION};
pub use store::{StoreError, STATE_TABLE};
