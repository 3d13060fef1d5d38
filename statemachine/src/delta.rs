//! Typed records of what an entry wrote, for projections.
//!
//! A projection (the DNS, the data plane, the ingress, the orchestrator) starts from
//! [`snapshot`] of the state at an index and then applies the [`Delta`]s of every later entry.
//! Both come from the same keys read the same way ([`Delta::from_written`] over
//! [`crate::store::apply_traced`]'s writes, [`Delta::from_write`] over the stored records; a
//! written record is the value its stored bytes were encoded from), so "built from the state at
//! N" and "fed entry by entry up to N" cannot disagree: the projection tests hold them to it. A delta carries the whole new record (or its absence), never a summary to parse.

use std::sync::Arc;

use redb::ReadableTable;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::instance::{instances_prefix, InstanceRecord};
use crate::network::{endpoints_prefix, EndpointSet};
use crate::store::{decode, scan_prefix, services_prefix, ServiceRecord, StoreError, Written};

/// One object an entry created, replaced or removed (`None`: removed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Delta {
    /// A service's spec, VIP or bookkeeping (its network policy and exposure included).
    Service {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The record now, or `None` once deleted.
        record: Option<Arc<ServiceRecord>>,
    },
    /// What the state knows of one instance.
    Instance {
        /// Namespace.
        namespace: String,
        /// Its service.
        service: String,
        /// Instance id (`<service>-<i>`).
        id: String,
        /// The record now, or `None` once removed.
        record: Option<Arc<InstanceRecord>>,
    },
    /// The node one instance is placed on, in a cluster.
    Placement {
        /// Namespace.
        namespace: String,
        /// Its service.
        service: String,
        /// Instance id (`<service>-<i>`).
        id: String,
        /// The node, or `None` once it has none.
        node: Option<String>,
    },
    /// A service's ready endpoints, replaced whole.
    Endpoints {
        /// Namespace.
        namespace: String,
        /// The service.
        service: String,
        /// The set now, or `None` once the service is gone.
        set: Option<Arc<EndpointSet>>,
    },
    /// A node of the cluster: whether it takes instances and where its gateway is.
    Node {
        /// Its name.
        name: String,
        /// The record now, or `None` once forgotten.
        record: Option<Arc<crate::store::nodes::NodeRecord>>,
    },
    /// A namespace: what a namespace watch shows as of its entry (no projection follows it).
    Namespace {
        /// Its name.
        name: String,
        /// The record now, or `None` once deleted.
        record: Option<Arc<crate::store::NamespaceRecord>>,
    },
}

impl Delta {
    /// The service this delta concerns: what a keyed work queue enqueues (none for a node or
    /// a namespace).
    pub fn service(&self) -> Option<(&str, &str)> {
        Some(match self {
            Delta::Node { .. } | Delta::Namespace { .. } => return None,
            Delta::Service { namespace, name, .. } => (namespace, name),
            Delta::Instance {
                namespace, service, ..
            }
            | Delta::Endpoints {
                namespace, service, ..
            }
            | Delta::Placement {
                namespace, service, ..
            } => (namespace, service),
        })
    }

    /// The delta a write of `key` stands for, if projections follow that key. A value that does
    /// not decode is an error naming the key: the caller must not guess.
    pub fn from_write(key: &str, value: Option<&[u8]>) -> Result<Option<Delta>, StoreError> {
        Self::from_source(key, value)
    }

    /// [`Delta::from_write`] for what an apply just wrote: the records it was encoded from,
    /// not decoded again.
    pub fn from_written(key: &str, value: Option<&Written>) -> Result<Option<Delta>, StoreError> {
        Self::from_source(key, value)
    }

    fn from_source(key: &str, value: Option<impl Source>) -> Result<Option<Delta>, StoreError> {
        let mut parts = key.split('/');
        let delta = match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("services"), Some(ns), Some(name), None, None) => Delta::Service {
                namespace: ns.into(),
                name: name.into(),
                record: value.map(|v| v.record(key)).transpose()?,
            },
            (Some("instances"), Some(ns), Some(service), Some(id), None) => Delta::Instance {
                namespace: ns.into(),
                service: service.into(),
                id: id.into(),
                record: value.map(|v| v.record(key)).transpose()?,
            },
            (Some("placements"), Some(ns), Some(service), Some(id), None) => Delta::Placement {
                namespace: ns.into(),
                service: service.into(),
                id: id.into(),
                node: value
                    .map(|v| {
                        v.record::<crate::store::nodes::PlacementRecord>(key)
                            .map(|p| p.node.clone())
                    })
                    .transpose()?,
            },
            (Some("endpoints"), Some(ns), Some(service), None, None) => Delta::Endpoints {
                namespace: ns.into(),
                service: service.into(),
                set: value.map(|v| v.record(key)).transpose()?,
            },
            (Some("nodes"), Some(name), None, None, None) => Delta::Node {
                name: name.into(),
                record: value.map(|v| v.record(key)).transpose()?,
            },
            (Some("namespaces"), Some(name), None, None, None) => Delta::Namespace {
                name: name.into(),
                record: value.map(|v| v.record(key)).transpose()?,
            },
            _ => return Ok(None),
        };
        Ok(Some(delta))
    }
}

/// Where a delta's record comes from: stored bytes, or a value apply just wrote.
trait Source {
    fn record<T: DeserializeOwned + Send + Sync + 'static>(&self, key: &str) -> Result<Arc<T>, StoreError>;
}

impl Source for &[u8] {
    fn record<T: DeserializeOwned + Send + Sync + 'static>(&self, key: &str) -> Result<Arc<T>, StoreError> {
        decode(key, self).map(Arc::new)
    }
}

impl Source for &Written {
    fn record<T: DeserializeOwned + Send + Sync + 'static>(&self, key: &str) -> Result<Arc<T>, StoreError> {
        self.value(key)
    }
}

/// The prefixes whose keys become deltas.
pub const FOLLOWED_PREFIXES: [&str; 6] = [
    "services/",
    "instances/",
    "endpoints/",
    "placements/",
    "nodes/",
    "namespaces/",
];

/// Every followed object in the state, as upserts in key order: where a projection starts.
/// A record that does not decode fails the whole read, so a projection never mistakes a
/// damaged record for a missing one.
pub fn snapshot<R: ReadableTable<&'static str, &'static [u8]>>(table: &R) -> Result<Vec<Delta>, StoreError> {
    debug_assert_eq!(FOLLOWED_PREFIXES[0], services_prefix(None));
    debug_assert_eq!(FOLLOWED_PREFIXES[1], instances_prefix(None, None));
    debug_assert_eq!(FOLLOWED_PREFIXES[2], endpoints_prefix(None));
    debug_assert_eq!(FOLLOWED_PREFIXES[3], crate::store::nodes::PLACEMENTS_PREFIX);
    debug_assert_eq!(FOLLOWED_PREFIXES[4], crate::store::nodes::NODES_PREFIX);
    debug_assert_eq!(FOLLOWED_PREFIXES[5], crate::store::namespace_key(""));
    let mut out = Vec::new();
    for prefix in FOLLOWED_PREFIXES {
        for (k, v) in scan_prefix(table, prefix)? {
            if let Some(d) = Delta::from_write(&k, Some(&v))? {
                out.push(d);
            }
        }
    }
    Ok(out)
}
