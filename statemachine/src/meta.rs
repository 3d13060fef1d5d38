//! Bookkeeping every stored object carries, and the spec hash it is keyed on. A leaf module:
//! the store, instances and identities all use it, and it uses none of them.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bookkeeping kept with every object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ObjectMeta {
    /// When the object was created (proposer's clock).
    pub created_at_ms: i64,
    /// When the spec last changed.
    pub updated_at_ms: i64,
    /// 1 at creation, +1 on each change of spec or forced re-cast.
    pub generation: u64,
    /// Hex SHA-256 of the canonical spec JSON.
    pub spec_hash: String,
    /// Log index of the last change.
    pub resource_version: u64,
    /// The last scale above zero, so `rune restart` of a stopped service knows what to go back to.
    #[serde(default)]
    pub last_non_zero_scale: u32,
    /// Bumped by `rune restart`; part of the instance template, so a bump replaces every instance.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub restart_count: u64,
}

impl ObjectMeta {
    /// The bookkeeping of the next generation: a changed spec (or a forced re-cast) at `index`.
    pub(crate) fn next(&self, now: i64, index: u64, spec_hash: String) -> ObjectMeta {
        ObjectMeta {
            updated_at_ms: now,
            generation: self.generation + 1,
            spec_hash,
            resource_version: index,
            ..self.clone()
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Canonical JSON of a spec and its hash: equal specs give equal bytes.
pub fn spec_hash<T: Serialize>(spec: &T) -> String {
    // Serialised straight into the hasher: the same bytes as `to_vec`, without growing a buffer
    // for them on every cast. Our plain data types cannot fail to serialise.
    let mut h = Sha256::new();
    let _ = serde_json::to_writer(&mut h, spec);
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_that_of_the_canonical_json() {
        // Stored hashes were taken over `to_vec`'s bytes: they must stay what they were, or
        // every re-cast would look like a change.
        let spec = serde_json::json!({"name": "web", "image": "nginx", "env": {"A": "1", "B": "2"}});
        let bytes = serde_json::to_vec(&spec).unwrap();
        assert_eq!(spec_hash(&spec), hex::encode(Sha256::digest(&bytes)));
        assert_eq!(
            spec_hash(&serde_json::json!({})),
            "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
    }
}
