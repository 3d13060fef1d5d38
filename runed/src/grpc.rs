//! How runed's gRPC services speak, shared by all of them: the status for each kind of failure
//! and the small helpers every handler uses. A leaf: it imports no other service module.

use rune_log::ProposeError;
use rune_statemachine::{Rejection, Resource};
use tonic::Status;

/// A failure of runed itself (storage, a poisoned lock): INTERNAL, with the cause.
pub(crate) fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// Why a write did not reach the log: a full data dir is RESOURCE_EXHAUSTED (retry after
/// freeing space), anything else UNAVAILABLE (retry later).
pub(crate) fn not_proposed(e: ProposeError) -> Status {
    match e {
        ProposeError::NoSpace(n) => Status::resource_exhausted(n.to_string()),
        e => Status::unavailable(e.to_string()),
    }
}

/// A command apply refused: the status its reason stands for.
pub(crate) fn rejection(r: Rejection) -> Status {
    match r {
        Rejection::Invalid(m) => Status::invalid_argument(m),
        Rejection::NotFound(m) => Status::not_found(m),
        Rejection::FailedPrecondition(m) => Status::failed_precondition(m),
        Rejection::AlreadyExists(m) => Status::already_exists(m),
        Rejection::UnsupportedFormat(_) => Status::internal(r.to_string()),
    }
}

/// An empty namespace means the default one, as in kubectl.
pub(crate) fn namespace_or_default(ns: &str) -> &str {
    if ns.is_empty() {
        rune_statemachine::DEFAULT_NAMESPACE
    } else {
        ns
    }
}

/// The namespace a list or watch covers: `*` is all of them, empty is the default one.
pub(crate) fn scope(ns: &str) -> Option<String> {
    (ns != "*").then(|| namespace_or_default(ns).to_string())
}

/// One decoded resource of a cast. Secrets stay plaintext here, in memory, until sealed.
// Short-lived, a handful per cast: boxing the service would buy nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Decoded {
    /// Ready to propose.
    Resource(Resource),
    /// A secret to seal (or to skip when unchanged).
    Secret {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Values.
        data: rune_statemachine::secret::SecretData,
    },
}
