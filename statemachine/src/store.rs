//! The state tables and the one function that writes them: [`apply`].
//!
//! `apply` is deterministic: it reads only the table and the entry, decides every write first
//! (through an [`Overlay`]) and performs them only when the whole command is accepted, so a
//! rejected command leaves no trace but its place in the log.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;

use redb::{ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use crate::meta::{spec_hash, ObjectMeta};

use crate::command::{Action, Change, Command, Envelope, Kind, Outcome, Rejection, Resource, FORMAT_VERSION};
use crate::deps::{find_cycle, resolve, DepKind, ServiceId};
use crate::instance::{fold, instance_key, InstanceRecord};
use crate::spec::{NamespaceSpec, ServiceSpec};
use crate::validate::{validate_namespace, validate_service_at};

mod endpoints;
mod hosts;
pub mod nodes;
mod objects;
mod releases;
mod vips;
pub use hosts::{
    claimed_by_other as host_claimed_by_other, taken as host_taken, unclaimed as unclaimed_hosts,
};
pub use objects::{
    configmap_history, configmap_key, configmaps_prefix, policy_key, secret_history_prefix, secret_key,
    secrets_prefix, token_hash_key, token_key, user_key, ConfigmapRecord, ConfigmapVersion, SecretRecord,
    IDENTITY_PREFIXES, SECRET_HISTORY_ALL,
};
pub use releases::{
    merged as release_merged, owned_refs, release_key, releases_prefix, ReleaseRecord, ResourceRef,
};

/// The desired state: `namespaces/<ns>`, `services/<ns>/<name>`, `history/services/<ns>/<name>/<gen>`.
/// Only `apply` (through the log's state machine) may open it for writing.
pub const STATE_TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");

/// Failures of the storage under the state machine; unlike a [`Rejection`] they are not decisions.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// redb failed.
    #[error("state storage: {0}")]
    Storage(#[from] redb::StorageError),
    /// A stored record does not decode: the tables are corrupt or from an unknown build.
    #[error("corrupt record {key}: {source}")]
    Corrupt {
        /// The key of the record.
        key: String,
        /// Why it did not decode.
        source: serde_json::Error,
    },
}

/// A stored service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// The spec as cast, with its namespace filled in.
    pub spec: ServiceSpec,
    /// Bookkeeping.
    pub meta: ObjectMeta,
    /// The service's virtual IP, given at its first cast and kept until it is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<String>,
}

/// A stored namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NamespaceRecord {
    /// The spec.
    pub spec: NamespaceSpec,
    /// Bookkeeping.
    pub meta: ObjectMeta,
}

/// A previous spec of a service, kept for `rune get service NAME --history`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Revision {
    /// The generation this spec had.
    pub generation: u64,
    /// The spec.
    pub spec: ServiceSpec,
    /// Its hash.
    pub spec_hash: String,
    /// When a newer spec replaced it.
    pub replaced_at_ms: i64,
}

/// Namespaces that always exist.
pub const RESERVED_NAMESPACES: [&str; 2] = ["system", crate::DEFAULT_NAMESPACE];

/// Key of a namespace.
pub fn namespace_key(name: &str) -> String {
    format!("namespaces/{name}")
}

/// Key of a service.
pub fn service_key(ns: &str, name: &str) -> String {
    format!("services/{ns}/{name}")
}

/// Key prefix of all services of a namespace, or of all services.
pub fn services_prefix(ns: Option<&str>) -> String {
    match ns {
        Some(ns) => format!("services/{ns}/"),
        None => "services/".to_string(),
    }
}

fn history_prefix(ns: &str, name: &str) -> String {
    format!("history/services/{ns}/{name}/")
}

fn history_key(ns: &str, name: &str, generation: u64) -> String {
    history_key_for(&history_prefix(ns, name), generation)
}

/// A versioned key under `prefix` that sorts by version.
fn history_key_for(prefix: &str, version: u64) -> String {
    format!("{prefix}{version:020}")
}

pub(crate) fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        key: key.to_string(),
        source,
    })
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serialising our own plain data types cannot fail: no maps with non-string keys, no floats.
    serde_json::to_vec(v).unwrap_or_default()
}

/// Reads a typed record.
pub fn get_record<T, R>(table: &R, key: &str) -> Result<Option<T>, StoreError>
where
    T: DeserializeOwned,
    R: ReadableTable<&'static str, &'static [u8]>,
{
    match table.get(key)? {
        Some(v) => Ok(Some(decode(key, v.value())?)),
        None => Ok(None),
    }
}

/// Calls `f` with every key starting with `prefix` and its value, in key order, borrowed from
/// the table: a caller that wants only keys copies no values.
fn each_under<R>(table: &R, prefix: &str, mut f: impl FnMut(&str, &[u8])) -> Result<(), StoreError>
where
    R: ReadableTable<&'static str, &'static [u8]>,
{
    for item in table.range::<&str>(prefix..)? {
        let (k, v) = item?;
        if !k.value().starts_with(prefix) {
            break;
        }
        f(k.value(), v.value());
    }
    Ok(())
}

/// Every (key, value) whose key starts with `prefix`, in key order.
pub fn scan_prefix<R>(table: &R, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>
where
    R: ReadableTable<&'static str, &'static [u8]>,
{
    let mut out = Vec::new();
    each_under(table, prefix, |k, v| out.push((k.to_string(), v.to_vec())))?;
    Ok(out)
}

/// Typed records under a prefix.
pub fn list_records<T, R>(table: &R, prefix: &str) -> Result<Vec<T>, StoreError>
where
    T: DeserializeOwned,
    R: ReadableTable<&'static str, &'static [u8]>,
{
    scan_prefix(table, prefix)?
        .iter()
        .map(|(k, v)| decode(k, v))
        .collect()
}

/// One page of a list: records in key order, and whether more keys follow under the prefix.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    /// The records kept.
    pub items: Vec<T>,
    /// The key of the last record read, where the next page starts after.
    pub last_key: Option<String>,
    /// Whether keys remain under the prefix after `last_key`.
    pub more: bool,
}

/// Reads typed records under `prefix` in key order, starting after the key `after`, until
/// `limit` records are kept (0: no limit) or `max_bytes` of values were read, whichever comes
/// first; `keep` filters (records it drops still advance the page).
pub fn list_page<T, R>(
    table: &R,
    prefix: &str,
    after: Option<&str>,
    limit: usize,
    max_bytes: usize,
    mut keep: impl FnMut(&T) -> bool,
) -> Result<Page<T>, StoreError>
where
    T: DeserializeOwned,
    R: ReadableTable<&'static str, &'static [u8]>,
{
    use std::ops::Bound;
    let start = match after {
        Some(k) => Bound::Excluded(k),
        None => Bound::Included(prefix),
    };
    let mut page = Page {
        items: Vec::new(),
        last_key: None,
        more: false,
    };
    let mut bytes = 0usize;
    for item in table.range::<&str>((start, Bound::Unbounded))? {
        let (k, v) = item?;
        let key = k.value();
        if !key.starts_with(prefix) {
            break;
        }
        let full = (limit > 0 && page.items.len() >= limit) || (max_bytes > 0 && bytes >= max_bytes);
        if full {
            page.more = true;
            break;
        }
        bytes += v.value().len();
        let rec: T = decode(key, v.value())?;
        if keep(&rec) {
            page.items.push(rec);
        }
        page.last_key = Some(key.to_string());
    }
    Ok(page)
}

/// Where the cluster's identity is kept (see `Command::Init`).
pub const CLUSTER_ID_KEY: &str = "cluster/id";

/// The cluster's identity, once the first runed chose it.
pub fn cluster_id<R>(table: &R) -> Result<Option<String>, StoreError>
where
    R: ReadableTable<&'static str, &'static [u8]>,
{
    get_record(table, CLUSTER_ID_KEY)
}

/// The cluster network VIPs come from, once the first runed set it: the DNS serves its
/// reverse zone.
pub fn cluster_network<R>(table: &R) -> Result<Option<crate::network::Cidr>, StoreError>
where
    R: ReadableTable<&'static str, &'static [u8]>,
{
    let c: Option<crate::network::NetworkConfig> = get_record(table, crate::network::CONFIG_KEY)?;
    Ok(c.and_then(|c| crate::network::Cidr::parse(&c.cluster_cidr).ok()))
}

/// Previous specs of a service, newest first.
pub fn service_history<R>(table: &R, ns: &str, name: &str) -> Result<Vec<Revision>, StoreError>
where
    R: ReadableTable<&'static str, &'static [u8]>,
{
    let mut v: Vec<Revision> = list_records(table, &history_prefix(ns, name))?;
    v.reverse();
    Ok(v)
}

/// SHA-256 over every key and value of the state, for `replay --verify`.
pub fn digest<R>(table: &R) -> Result<String, StoreError>
where
    R: ReadableTable<&'static str, &'static [u8]>,
{
    let mut h = Sha256::new();
    for item in table.iter()? {
        let (k, v) = item?;
        for part in [k.value().as_bytes(), v.value()] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// The first key at which two states differ, or `None` when they are identical.
pub fn first_difference<A, B>(a: &A, b: &B) -> Result<Option<String>, StoreError>
where
    A: ReadableTable<&'static str, &'static [u8]>,
    B: ReadableTable<&'static str, &'static [u8]>,
{
    let mut ia = a.iter()?;
    let mut ib = b.iter()?;
    loop {
        match (ia.next().transpose()?, ib.next().transpose()?) {
            (None, None) => return Ok(None),
            (Some((k, _)), None) | (None, Some((k, _))) => return Ok(Some(k.value().to_string())),
            (Some((ka, va)), Some((kb, vb))) => {
                if ka.value() != kb.value() {
                    return Ok(Some(ka.value().min(kb.value()).to_string()));
                }
                if va.value() != vb.value() {
                    return Ok(Some(ka.value().to_string()));
                }
            }
        }
    }
}

/// A value an entry wrote: its encoding, which the table gets, and the typed value it was
/// encoded from. Reads later in the same entry and the projections' deltas take the typed value
/// instead of decoding what was just encoded (5-6 % of a cast's CPU went to such decodes).
pub struct Written {
    /// What the table holds under the key.
    pub bytes: Vec<u8>,
    typed: Arc<dyn Any + Send + Sync>,
}

impl Written {
    fn new<T: Serialize + Send + Sync + 'static>(v: T) -> Self {
        Written {
            bytes: encode(&v),
            typed: Arc::new(v),
        }
    }

    /// The typed value when it was written as a `T`; otherwise `bytes` decoded as one.
    pub(crate) fn value<T: DeserializeOwned + Send + Sync + 'static>(
        &self,
        key: &str,
    ) -> Result<Arc<T>, StoreError> {
        match self.typed.clone().downcast::<T>() {
            Ok(t) => Ok(t),
            Err(_) => decode(key, &self.bytes).map(Arc::new),
        }
    }
}

/// Pending writes over a readable table, so that a command is decided whole before any write.
struct Overlay<'t, R> {
    base: &'t R,
    pending: BTreeMap<String, Option<Written>>,
}

impl<'t, R: ReadableTable<&'static str, &'static [u8]>> Overlay<'t, R> {
    fn get<T: DeserializeOwned + Clone + Send + Sync + 'static>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        // A value written in this entry is shared with it, so it is copied; one read from the
        // table is decoded straight into the caller's, with no `Arc` on the way.
        match self.pending.get(key) {
            Some(w) => w
                .as_ref()
                .map(|w| w.value(key).map(Arc::unwrap_or_clone))
                .transpose(),
            None => get_record(self.base, key),
        }
    }

    /// [`Overlay::get`] for a reader that only looks: a value written earlier in this entry is
    /// shared, not deep-copied (a service record's spec is maps and lists).
    fn get_shared<T: DeserializeOwned + Send + Sync + 'static>(
        &self,
        key: &str,
    ) -> Result<Option<Arc<T>>, StoreError> {
        match self.pending.get(key) {
            Some(w) => w.as_ref().map(|w| w.value(key)).transpose(),
            None => Ok(get_record(self.base, key)?.map(Arc::new)),
        }
    }

    /// Whether `key` holds a value, without decoding it.
    fn contains(&self, key: &str) -> Result<bool, StoreError> {
        match self.pending.get(key) {
            Some(v) => Ok(v.is_some()),
            None => Ok(self.base.get(key)?.is_some()),
        }
    }

    fn put<T: Serialize + Send + Sync + 'static>(&mut self, key: String, v: T) {
        self.pending.insert(key, Some(Written::new(v)));
    }

    fn delete(&mut self, key: String) {
        self.pending.insert(key, None);
    }

    fn keys_with_prefix(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut keys = std::collections::BTreeSet::new();
        each_under(self.base, prefix, |k, _| {
            keys.insert(k.to_string());
        })?;
        for (k, v) in self.pending.range(prefix.to_string()..) {
            if !k.starts_with(prefix) {
                break;
            }
            match v {
                Some(_) => keys.insert(k.clone()),
                None => keys.remove(k),
            };
        }
        Ok(keys.into_iter().collect())
    }
}

/// Applies one entry at log index `index`. Returns the decision; storage failures are errors.
pub fn apply(
    table: &mut redb::Table<&'static str, &'static [u8]>,
    index: u64,
    entry: &Envelope,
) -> Result<Outcome, StoreError> {
    apply_traced(table, index, entry).map(|(outcome, _)| outcome)
}

/// What an entry wrote, in key order: each key with its new value, or `None` when removed.
/// [`crate::delta::Delta::from_written`] turns the ones projections follow into typed records.
pub type Writes = Vec<(String, Option<Written>)>;

/// [`apply`], also returning what it wrote, for the projections. A rejected entry wrote
/// nothing.
pub fn apply_traced(
    table: &mut redb::Table<&'static str, &'static [u8]>,
    index: u64,
    entry: &Envelope,
) -> Result<(Outcome, Writes), StoreError> {
    let (outcome, pending) = {
        let mut o = Overlay {
            base: &*table,
            pending: BTreeMap::new(),
        };
        let outcome = decide(&mut o, index, entry)?;
        (outcome, o.pending)
    };
    let mut writes = Vec::new();
    if outcome.is_ok() {
        for (k, v) in pending {
            match &v {
                Some(v) => {
                    table.insert(k.as_str(), v.bytes.as_slice())?;
                }
                None => {
                    table.remove(k.as_str())?;
                }
            }
            writes.push((k, v));
        }
    }
    Ok((outcome, writes))
}

fn decide<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &mut Overlay<'_, R>,
    index: u64,
    e: &Envelope,
) -> Result<Outcome, StoreError> {
    if e.version > FORMAT_VERSION {
        return Ok(Err(Rejection::UnsupportedFormat(e.version)));
    }
    let now = e.proposed_at_ms;
    let mut changes = Vec::new();
    // Services whose endpoints may have changed, recomputed once at the end.
    let mut touched: std::collections::BTreeSet<(String, String)> = std::collections::BTreeSet::new();
    // Services whose scale changed without touching their endpoints: placed again at the end
    // with the touched ones.
    let mut rescaled: std::collections::BTreeSet<(String, String)> = std::collections::BTreeSet::new();
    match &e.command {
        Command::Init {
            namespaces,
            policies,
            cluster_cidr,
            cluster_id,
            claim_hosts,
        } => {
            if *claim_hosts {
                hosts::backfill(o)?;
            }
            if let Some(id) = cluster_id {
                if !o.contains(CLUSTER_ID_KEY)? {
                    o.put(CLUSTER_ID_KEY.to_string(), id.clone());
                }
            }
            changes.extend(objects::seed_policies(o, index, now, policies)?);
            if let Some(cidr) = cluster_cidr {
                if let Err(r) = vips::set_network(o, now, cidr)? {
                    return Ok(Err(r));
                }
            }
            for name in namespaces {
                let spec = NamespaceSpec {
                    name: name.clone(),
                    ..Default::default()
                };
                if let Some(c) = put_namespace(o, index, now, spec, false, true)? {
                    changes.push(c);
                }
            }
        }
        Command::Apply {
            resources,
            create_namespace,
            force,
            history_limit,
            release,
        } => {
            let before = match release {
                Some(rel) => releases::existing(o, rel, resources)?,
                None => Default::default(),
            };
            for r in resources {
                let res = match r {
                    Resource::Namespace(ns) => {
                        let errs = validate_namespace(ns);
                        if !errs.is_empty() {
                            return Ok(Err(invalid("namespace", &ns.name, &errs)));
                        }
                        put_namespace(o, index, now, ns.clone(), *force, false)?
                    }
                    Resource::Service(_) | Resource::Secret(_) | Resource::Configmap(_) => {
                        let ns = match r {
                            Resource::Service(s) => s.namespace().to_string(),
                            Resource::Secret(s) => s.namespace.clone(),
                            Resource::Configmap(c) => c.namespace.clone(),
                            Resource::Namespace(_) => String::new(),
                        };
                        if !o.contains(&namespace_key(&ns))? {
                            if !create_namespace {
                                return Ok(Err(Rejection::NotFound(format!(
                                    "namespace {ns} does not exist (use --create-namespace to create it)"
                                ))));
                            }
                            let spec = NamespaceSpec {
                                name: ns.clone(),
                                ..Default::default()
                            };
                            changes.extend(put_namespace(o, index, now, spec, false, true)?);
                        }
                        let put = match r {
                            Resource::Service(s) => {
                                let put = put_service(o, index, now, s, *force, *history_limit, e.version)?;
                                if let Ok(c) = &put {
                                    if c.action != Action::Unchanged {
                                        touched.insert((c.namespace.clone(), c.name.clone()));
                                    }
                                    if c.action == Action::Created {
                                        let rec =
                                            o.get::<ServiceRecord>(&service_key(&c.namespace, &c.name))?;
                                        if let Some(vip) = rec.and_then(|r| r.vip) {
                                            changes.push(change(
                                                Kind::Vip,
                                                &c.namespace,
                                                &c.name,
                                                Action::Created,
                                                1,
                                                &vip,
                                            ));
                                        }
                                    }
                                }
                                put
                            }
                            Resource::Secret(s) => objects::put_secret(o, index, now, s, *history_limit)?,
                            Resource::Configmap(c) => {
                                // v1 entries kept no configmap versions; replaying them must not.
                                let keep = (e.version >= 2).then_some(*history_limit);
                                objects::put_configmap(o, index, now, c, *force, keep)?
                            }
                            Resource::Namespace(_) => continue,
                        };
                        match put {
                            Ok(c) => Some(c),
                            Err(rej) => return Ok(Err(rej)),
                        }
                    }
                };
                changes.extend(res);
            }
            if let Some(rel) = release {
                match releases::put_release(o, index, now, rel, resources, &before)? {
                    Ok(c) => changes.push(c),
                    Err(r) => return Ok(Err(r)),
                }
            }
        }
        Command::DeleteService {
            namespace,
            name,
            force,
        } => {
            let Some(rec) = o.get::<ServiceRecord>(&service_key(namespace, name))? else {
                return Ok(Err(service_not_found(namespace, name)));
            };
            if !force {
                if let Err(r) = refuse_dependents(o, namespace, name, &[])? {
                    return Ok(Err(r));
                }
            }
            changes.extend(remove_service(o, now, rec)?);
            touched.insert((namespace.clone(), name.clone()));
        }
        Command::RollbackService {
            namespace,
            name,
            to_generation,
            history_limit,
        } => {
            let Some(rec) = o.get::<ServiceRecord>(&service_key(namespace, name))? else {
                return Ok(Err(service_not_found(namespace, name)));
            };
            let mut kept = Vec::new();
            for k in o.keys_with_prefix(&history_prefix(namespace, name))? {
                kept.extend(o.get::<Revision>(&k)?);
            }
            let target = match to_generation {
                Some(g) if *g == rec.meta.generation => {
                    changes.push(change(
                        Kind::Service,
                        namespace,
                        name,
                        Action::Unchanged,
                        rec.meta.generation,
                        &format!("generation {g} is the current one"),
                    ));
                    return Ok(Ok(changes));
                }
                Some(g) => kept.iter().find(|r| r.generation == *g),
                None => kept.last(),
            };
            let Some(target) = target else {
                let list: Vec<String> = kept.iter().map(|r| r.generation.to_string()).collect();
                return Ok(Err(match to_generation {
                    Some(g) => Rejection::NotFound(format!(
                        "service {namespace}/{name}: generation {g} is not kept (kept: {}; current: {})",
                        if list.is_empty() { "none".to_string() } else { list.join(", ") },
                        rec.meta.generation
                    )),
                    None => Rejection::FailedPrecondition(format!(
                        "service {namespace}/{name} has no earlier spec to roll back to (generation {} is its first kept)",
                        rec.meta.generation
                    )),
                }));
            };
            let mut spec = target.spec.clone();
            spec.scale = rec.spec.scale;
            let from = target.generation;
            match put_service(o, index, now, &spec, false, *history_limit, e.version)? {
                Ok(mut c) => {
                    if c.action == Action::Unchanged {
                        c.summary = format!("the current spec is generation {from}'s already");
                    } else {
                        c.summary = format!("rolled back to generation {from}: {}", c.summary);
                        touched.insert((namespace.clone(), name.clone()));
                    }
                    changes.push(c);
                }
                Err(r) => return Ok(Err(r)),
            }
        }
        Command::DeleteRelease {
            namespace,
            name,
            force,
            revision,
        } => {
            let Some(rel) = o.get::<ReleaseRecord>(&release_key(namespace, name))? else {
                return Ok(Err(Rejection::NotFound(format!(
                    "release {namespace}/{name} not found"
                ))));
            };
            if revision.is_some_and(|r| r != rel.meta.generation) {
                return Ok(Err(Rejection::FailedPrecondition(format!(
                    "release {namespace}/{name} changed while it was being deleted (now revision {}); delete it again",
                    rel.meta.generation
                ))));
            }
            if !force {
                let objects: Vec<(bool, &str, &str)> = rel
                    .resources
                    .iter()
                    .filter(|r| r.kind == "secret" || r.kind == "configmap")
                    .map(|r| (r.kind == "secret", r.namespace.as_str(), r.name.as_str()))
                    .collect();
                let inside = |ns: &str, svc: &str| {
                    rel.resources
                        .iter()
                        .any(|r| r.kind == "service" && r.namespace == ns && r.name == svc)
                };
                if let Err(rej) = refuse_object_users(o, &objects, inside, e.version)? {
                    return Ok(Err(rej));
                }
            }
            let own: Vec<(String, String)> = rel
                .resources
                .iter()
                .filter(|r| r.kind == "service")
                .map(|r| (r.namespace.clone(), r.name.clone()))
                .collect();
            for r in &rel.resources {
                match r.kind.as_str() {
                    "service" => {
                        let Some(rec) = o.get::<ServiceRecord>(&service_key(&r.namespace, &r.name))? else {
                            continue;
                        };
                        if !force {
                            if let Err(rej) = refuse_dependents(o, &r.namespace, &r.name, &own)? {
                                return Ok(Err(rej));
                            }
                        }
                        changes.extend(remove_service(o, now, rec)?);
                        touched.insert((r.namespace.clone(), r.name.clone()));
                    }
                    "configmap" => {
                        if let Ok(c) = objects::delete_configmap(o, &r.namespace, &r.name)? {
                            changes.extend(c);
                        }
                    }
                    "secret" => {
                        if let Ok(c) = objects::delete_secret(o, &r.namespace, &r.name)? {
                            changes.extend(c);
                        }
                    }
                    _ => {}
                }
            }
            o.delete(release_key(namespace, name));
            changes.push(change(
                Kind::Release,
                namespace,
                name,
                Action::Deleted,
                rel.meta.generation,
                "",
            ));
        }
        Command::Scale {
            namespace,
            name,
            scale,
        } => {
            let key = service_key(namespace, name);
            let Some(mut rec) = o.get::<ServiceRecord>(&key)? else {
                return Ok(Err(service_not_found(namespace, name)));
            };
            if i64::from(*scale) > crate::validate::MAX_SCALE {
                return Ok(Err(Rejection::Invalid(format!(
                    "scale: {scale} is above the limit of {}",
                    crate::validate::MAX_SCALE
                ))));
            }
            let old = rec.spec.scale();
            if old == i64::from(*scale) {
                changes.push(change(
                    Kind::Service,
                    namespace,
                    name,
                    Action::Unchanged,
                    rec.meta.generation,
                    &format!("already at scale {scale}"),
                ));
            } else {
                rec.spec.scale = Some(i64::from(*scale));
                let summary = format!("scale {old}→{scale}");
                changes.push(put_rescaled(o, key, rec, index, now, &summary));
                rescaled.insert((namespace.clone(), name.clone()));
            }
        }
        Command::Restart { namespace, name } => {
            let key = service_key(namespace, name);
            let Some(mut rec) = o.get::<ServiceRecord>(&key)? else {
                return Ok(Err(service_not_found(namespace, name)));
            };
            rec.meta.restart_count += 1;
            let mut summary = format!("rolling restart #{}", rec.meta.restart_count);
            if rec.spec.scale() == 0 && rec.meta.last_non_zero_scale > 0 {
                let back = rec.meta.last_non_zero_scale;
                rec.spec.scale = Some(i64::from(back));
                summary = format!("started again at scale {back}");
            }
            changes.push(put_rescaled(o, key, rec, index, now, &summary));
            rescaled.insert((namespace.clone(), name.clone()));
        }
        Command::RegisterNode {
            name,
            raft_id,
            gateway,
        } => return nodes::register(o, now, name, *raft_id, gateway.as_deref()),
        Command::SetNodeReady { name, ready } => return nodes::set_ready(o, now, name, *ready),
        Command::ForgetNode { name } => return nodes::forget(o, now, name),
        Command::InstanceEvents { events, node } => {
            for ev in events {
                touched.insert((ev.namespace.clone(), ev.service.clone()));
                let key = instance_key(&ev.namespace, &ev.service, &ev.id);
                let prev = o.get::<InstanceRecord>(&key)?;
                if let Some(reporter) = node {
                    let recorded = prev.as_ref().map(|r| r.node.as_str());
                    if nodes::from_elsewhere(o, &ev.namespace, &ev.service, &ev.id, recorded, reporter)? {
                        continue;
                    }
                }
                let existed = prev.is_some();
                let (next, summary) = fold(prev, ev, now);
                let (action, generation) = match &next {
                    None if !existed => continue,
                    None => (Action::Deleted, 0),
                    Some(r) if existed => (Action::Configured, r.generation),
                    Some(r) => (Action::Created, r.generation),
                };
                match next {
                    Some(r) => o.put(key, r),
                    None => o.delete(key),
                }
                changes.push(change(
                    Kind::Instance,
                    &ev.namespace,
                    &ev.id,
                    action,
                    generation,
                    &summary,
                ));
            }
        }
        Command::DeleteSecret {
            namespace,
            name,
            force,
        }
        | Command::DeleteConfigmap {
            namespace,
            name,
            force,
        } => {
            let secret = matches!(e.command, Command::DeleteSecret { .. });
            let key = if secret {
                secret_key(namespace, name)
            } else {
                configmap_key(namespace, name)
            };
            if !force && e.version >= 4 && o.contains(&key)? {
                let objects = [(secret, namespace.as_str(), name.as_str())];
                if let Err(r) = refuse_object_users(o, &objects, |_, _| false, e.version)? {
                    return Ok(Err(r));
                }
            }
            return if secret {
                objects::delete_secret(o, namespace, name)
            } else {
                objects::delete_configmap(o, namespace, name)
            };
        }
        Command::RewrapSecrets { items } => return objects::rewrap(o, index, items),
        Command::PutUser {
            name,
            email,
            policies,
            create,
        } => return objects::put_user(o, index, now, name, email, policies, *create),
        Command::DeleteUser { name } => return objects::delete_user(o, now, name),
        Command::PutPolicy { spec } => return objects::put_policy(o, index, now, spec),
        Command::DeletePolicy { name } => return objects::delete_policy(o, name),
        Command::SetUserPolicy { user, policy, attach } => {
            return objects::set_user_policy(o, index, now, user, policy, *attach)
        }
        Command::CreateToken {
            token,
            create_user,
            bootstrap,
        } => return objects::create_token(o, index, now, token, *create_user, *bootstrap),
        Command::RevokeToken { id } => return objects::revoke_token(o, now, id),
        Command::DeleteNamespace { name } => {
            if RESERVED_NAMESPACES.contains(&name.as_str()) {
                return Ok(Err(Rejection::FailedPrecondition(format!(
                    "namespace {name} is reserved"
                ))));
            }
            let key = namespace_key(name);
            let Some(rec) = o.get::<NamespaceRecord>(&key)? else {
                return Ok(Err(Rejection::NotFound(format!("namespace {name} not found"))));
            };
            for (prefix, what) in [
                (releases_prefix(Some(name)), "release"),
                (services_prefix(Some(name)), "service"),
                (secrets_prefix(Some(name)), "secret"),
                (configmaps_prefix(Some(name)), "configmap"),
            ] {
                let n = o.keys_with_prefix(&prefix)?.len();
                if n > 0 {
                    return Ok(Err(Rejection::FailedPrecondition(format!(
                        "namespace {name} still has {n} {what}(s); delete them first"
                    ))));
                }
            }
            o.delete(key);
            changes.push(Change {
                kind: Kind::Namespace,
                namespace: String::new(),
                name: name.clone(),
                action: Action::Deleted,
                generation: rec.meta.generation,
                summary: String::new(),
            });
        }
    }
    // Placements follow a service's spec, scale and presence, never an instance report: the
    // entries orchestrators write most often cost no placement reads.
    if !matches!(e.command, Command::InstanceEvents { .. }) {
        for (ns, svc) in touched.iter().chain(&rescaled) {
            nodes::place(o, ns, svc)?;
        }
    }
    for (ns, svc) in touched {
        changes.extend(endpoints::recompute(o, &ns, &svc)?);
    }
    Ok(Ok(changes))
}

/// Deletes the oldest versions under `prefix` beyond the newest `keep`.
fn prune_history<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &mut Overlay<'_, R>,
    prefix: &str,
    keep: usize,
) -> Result<(), StoreError> {
    let keys = o.keys_with_prefix(prefix)?;
    if keys.len() > keep {
        for k in &keys[..keys.len() - keep] {
            o.delete(k.clone());
        }
    }
    Ok(())
}

/// Deletes a service, its history and its VIP (released to cool down); what it changed.
fn remove_service<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &mut Overlay<'_, R>,
    now: i64,
    rec: ServiceRecord,
) -> Result<Vec<Change>, StoreError> {
    let (ns, name) = (rec.spec.namespace().to_string(), rec.spec.name.clone());
    let mut changes = Vec::new();
    o.delete(service_key(&ns, &name));
    if let Some(host) = hosts::host_of(&rec.spec) {
        hosts::release(o, &ns, &name, &host)?;
    }
    for k in o.keys_with_prefix(&history_prefix(&ns, &name))? {
        o.delete(k);
    }
    if let Some(vip) = &rec.vip {
        vips::release(o, now, vip);
        changes.push(change(Kind::Vip, &ns, &name, Action::Deleted, 1, vip));
    }
    changes.push(change(
        Kind::Service,
        &ns,
        &name,
        Action::Deleted,
        rec.meta.generation,
        "",
    ));
    Ok(changes)
}

/// Refuses deleting secrets and configmaps (`(secret, namespace, name)`) while a service that
/// `skip` does not exempt needs one ([`crate::uses::objects_used`]): its next start would
/// fail. The message names up to five users and the field of each that names the object.
/// Entries before v4 see only what the release delete of v3 checked ([`uses_v3`]).
fn refuse_object_users<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &Overlay<'_, R>,
    objects: &[(bool, &str, &str)],
    skip: impl Fn(&str, &str) -> bool,
    version: u32,
) -> Result<Result<(), Rejection>, StoreError> {
    const SHOWN: usize = 5;
    let mut users: Vec<(usize, String)> = Vec::new();
    for k in services_naming(o, objects)? {
        let Some(s) = o.get_shared::<ServiceRecord>(&k)? else {
            continue;
        };
        let ns = s.spec.namespace();
        if skip(ns, &s.spec.name) {
            continue;
        }
        let uses = if version >= 4 {
            crate::uses::objects_used(&s.spec)
        } else {
            uses_v3(&s.spec)
        };
        // One field per service and object is enough to say why.
        let mut seen = vec![false; objects.len()];
        for u in uses {
            let hit = objects.iter().position(|(secret, ons, oname)| {
                u.secret == *secret && u.namespace == *ons && u.name == *oname
            });
            if let Some(i) = hit.filter(|i| !seen[*i]) {
                seen[i] = true;
                users.push((i, format!("{ns}/{} ({})", s.spec.name, u.field)));
            }
        }
    }
    let Some(&(first, _)) = users.first() else {
        return Ok(Ok(()));
    };
    let (secret, ons, oname) = objects[first];
    let kind = if secret { "secret" } else { "configmap" };
    let named: Vec<&str> = users
        .iter()
        .filter(|(i, _)| *i == first)
        .map(|(_, u)| u.as_str())
        .collect();
    let more = match named.len().saturating_sub(SHOWN) {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    Ok(Err(Rejection::FailedPrecondition(format!(
        "cannot delete {kind} {ons}/{oname}: {}{more} {} it (use --force to delete anyway)",
        named.iter().take(SHOWN).copied().collect::<Vec<_>>().join(", "),
        if named.len() == 1 { "uses" } else { "use" },
    ))))
}

/// The keys of the services whose records may name one of `objects`, in key order: those
/// written earlier in this entry, and those in the table whose stored bytes hold one of the
/// names. A reference names its object verbatim (object names are DNS names, which JSON does
/// not escape), so a record without any of the names needs none of them and is not decoded:
/// at 5,000 services, decoding every record made one delete take 16 ms of the apply loop.
fn services_naming<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &Overlay<'_, R>,
    objects: &[(bool, &str, &str)],
) -> Result<Vec<String>, StoreError> {
    let prefix = services_prefix(None);
    let names: Vec<memchr::memmem::Finder<'_>> = objects
        .iter()
        .map(|(_, _, name)| {
            // A name JSON would escape (none passes validation) matches every record.
            let verbatim = !name.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20);
            memchr::memmem::Finder::new(if verbatim { name.as_bytes() } else { b"" })
        })
        .collect();
    let mut keys = std::collections::BTreeSet::new();
    each_under(o.base, &prefix, |k, v| {
        if !o.pending.contains_key(k) && names.iter().any(|n| n.find(v).is_some()) {
            keys.insert(k.to_string());
        }
    })?;
    for (k, v) in o.pending.range(prefix.clone()..) {
        if !k.starts_with(&prefix) {
            break;
        }
        if v.is_some() {
            keys.insert(k.clone());
        }
    }
    Ok(keys.into_iter().collect())
}

/// What a v3 release delete counted as a use: dependencies that are not optional, and mounts by
/// their name as written, in the service's own namespace.
fn uses_v3(spec: &ServiceSpec) -> Vec<crate::uses::ObjectUse> {
    let ns = spec.namespace();
    let deps = resolve(spec)
        .into_iter()
        .filter(|d| !d.optional && d.kind != DepKind::Service)
        .map(|d| (d.kind == DepKind::Secret, d.namespace, d.name));
    let mounts = spec
        .secret_mounts
        .iter()
        .map(|m| (true, ns.to_string(), m.source(true).to_string()))
        .chain(
            spec.config_mounts
                .iter()
                .chain(&spec.configmap_mounts)
                .map(|m| (false, ns.to_string(), m.source(false).to_string())),
        );
    deps.chain(mounts)
        .map(|(secret, namespace, name)| crate::uses::ObjectUse {
            secret,
            namespace,
            name,
            field: "dependencies or mounts".into(),
        })
        .collect()
}

/// Refuses the deletion of `ns/name` while services other than `also_going` depend on it.
fn refuse_dependents<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &Overlay<'_, R>,
    ns: &str,
    name: &str,
    also_going: &[(String, String)],
) -> Result<Result<(), Rejection>, StoreError> {
    let dependents: Vec<String> = dependents_of(o, ns, name)?
        .into_iter()
        .filter(|d| !also_going.iter().any(|(n, s)| *d == format!("{n}/{s}")))
        .collect();
    if dependents.is_empty() {
        return Ok(Ok(()));
    }
    Ok(Err(Rejection::FailedPrecondition(format!(
        "cannot delete {ns}/{name}: {} {} on it (use --force to delete anyway)",
        dependents.join(", "),
        if dependents.len() == 1 {
            "depends"
        } else {
            "depend"
        }
    ))))
}

fn service_not_found(ns: &str, name: &str) -> Rejection {
    Rejection::NotFound(format!("service {ns}/{name} not found"))
}

fn invalid(kind: &str, name: &str, errs: &[crate::decode::FieldError]) -> Rejection {
    let list: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
    Rejection::Invalid(format!("{kind} {name}: {}", list.join("; ")))
}

fn put_namespace<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &mut Overlay<'_, R>,
    index: u64,
    now: i64,
    spec: NamespaceSpec,
    force: bool,
    only_if_missing: bool,
) -> Result<Option<Change>, StoreError> {
    let key = namespace_key(&spec.name);
    let hash = spec_hash(&spec);
    let existing = o.get::<NamespaceRecord>(&key)?;
    let (action, meta) = match existing {
        Some(_) if only_if_missing => return Ok(None),
        Some(rec) if rec.meta.spec_hash == hash && !force => {
            return Ok(Some(change(
                Kind::Namespace,
                "",
                &spec.name,
                Action::Unchanged,
                rec.meta.generation,
                "",
            )));
        }
        Some(rec) => (Action::Configured, rec.meta.next(now, index, hash)),
        None => (Action::Created, new_meta(now, index, hash, 0)),
    };
    let c = change(
        Kind::Namespace,
        "",
        &spec.name,
        action,
        meta.generation,
        if action == Action::Created {
            ""
        } else {
            "labels or description changed"
        },
    );
    o.put(key, NamespaceRecord { spec, meta });
    Ok(Some(c))
}

fn new_meta(now: i64, index: u64, spec_hash: String, scale: u32) -> ObjectMeta {
    ObjectMeta {
        created_at_ms: now,
        updated_at_ms: now,
        generation: 1,
        spec_hash,
        resource_version: index,
        last_non_zero_scale: scale,
        restart_count: 0,
    }
}

fn change(kind: Kind, ns: &str, name: &str, action: Action, generation: u64, summary: &str) -> Change {
    Change {
        kind,
        namespace: ns.to_string(),
        name: name.to_string(),
        action,
        generation,
        summary: summary.to_string(),
    }
}

fn put_service<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &mut Overlay<'_, R>,
    index: u64,
    now: i64,
    spec: &ServiceSpec,
    force: bool,
    history_limit: u32,
    version: u32,
) -> Result<Result<Change, Rejection>, StoreError> {
    let mut spec = spec.clone();
    let ns = spec.namespace().to_string();
    spec.namespace = Some(ns.clone());
    // An entry is judged as the build that wrote it did: host syntax and claims came with v3.
    let errs = validate_service_at(&spec, version);
    if !errs.is_empty() {
        return Ok(Err(invalid("service", &spec.name, &errs)));
    }
    let key = service_key(&ns, &spec.name);
    let hash = spec_hash(&spec);
    let scale = u32::try_from(spec.scale()).unwrap_or(0);
    let existing = o.get::<ServiceRecord>(&key)?;
    let name = spec.name.clone();
    let vip = match existing.as_ref().and_then(|r| r.vip.clone()) {
        Some(v) => Some(v),
        None => match vips::allocate(o, now, &ns, &name)? {
            Ok(v) => v,
            Err(r) => return Ok(Err(r)),
        },
    };
    let old_host = existing.as_ref().and_then(|r| hosts::host_of(&r.spec));
    let (action, meta, summary) = match existing {
        None => {
            let summary = format!(
                "{} {}, scale {}",
                spec.runtime(),
                spec_target(&spec),
                spec.scale()
            );
            (Action::Created, new_meta(now, index, hash, scale), summary)
        }
        Some(rec) if rec.meta.spec_hash == hash && !force => {
            return Ok(Ok(change(
                Kind::Service,
                &ns,
                &name,
                Action::Unchanged,
                rec.meta.generation,
                "",
            )));
        }
        Some(rec) => {
            let summary = if rec.meta.spec_hash == hash {
                "forced re-cast".to_string()
            } else {
                diff_summary(&rec.spec, &spec)
            };
            o.put(
                history_key(&ns, &name, rec.meta.generation),
                Revision {
                    generation: rec.meta.generation,
                    spec: rec.spec,
                    spec_hash: rec.meta.spec_hash.clone(),
                    replaced_at_ms: now,
                },
            );
            prune_history(o, &history_prefix(&ns, &name), history_limit as usize)?;
            let meta = ObjectMeta {
                updated_at_ms: now,
                generation: rec.meta.generation + 1,
                spec_hash: hash,
                resource_version: index,
                last_non_zero_scale: if scale > 0 {
                    scale
                } else {
                    rec.meta.last_non_zero_scale
                },
                ..rec.meta
            };
            (Action::Configured, meta, summary)
        }
    };
    if version >= 3 {
        if let Err(r) = hosts::claim(o, old_host, &spec)? {
            return Ok(Err(r));
        }
    }
    let c = change(Kind::Service, &ns, &name, action, meta.generation, &summary);
    let has_deps = !spec.dependencies.is_empty();
    o.put(key, ServiceRecord { spec, meta, vip });
    if has_deps {
        if let Some(cycle) = find_cycle(&dependency_graph(o)?, &(ns.clone(), name.clone())) {
            return Ok(Err(Rejection::Invalid(format!(
                "service {name}: dependencies: dependency cycle: {cycle}"
            ))));
        }
    }
    Ok(Ok(c))
}

/// Stores a service whose scale or restart counter changed: a new generation, no history entry
/// (the template either did not change or is the same spec run again).
fn put_rescaled<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &mut Overlay<'_, R>,
    key: String,
    mut rec: ServiceRecord,
    index: u64,
    now: i64,
    summary: &str,
) -> Change {
    rec.meta.generation += 1;
    rec.meta.updated_at_ms = now;
    rec.meta.resource_version = index;
    rec.meta.spec_hash = spec_hash(&rec.spec);
    let scale = u32::try_from(rec.spec.scale()).unwrap_or(0);
    if scale > 0 {
        rec.meta.last_non_zero_scale = scale;
    }
    let c = change(
        Kind::Service,
        rec.spec.namespace(),
        &rec.spec.name,
        Action::Configured,
        rec.meta.generation,
        summary,
    );
    o.put(key, rec);
    c
}

/// Every service's service dependencies, for the cycle check.
fn dependency_graph<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &Overlay<'_, R>,
) -> Result<BTreeMap<ServiceId, Vec<ServiceId>>, StoreError> {
    let mut g = BTreeMap::new();
    for k in o.keys_with_prefix(&services_prefix(None))? {
        if let Some(r) = o.get::<ServiceRecord>(&k)? {
            let deps = resolve(&r.spec)
                .into_iter()
                .filter(|d| d.kind == DepKind::Service)
                .map(|d| (d.namespace, d.name))
                .collect();
            g.insert((r.spec.namespace().to_string(), r.spec.name.clone()), deps);
        }
    }
    Ok(g)
}

/// `ns/name` of every other service with a required dependency on this one.
fn dependents_of<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &Overlay<'_, R>,
    ns: &str,
    name: &str,
) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    // Only records whose bytes hold the name can depend on it: the others are not decoded.
    for k in services_naming(o, &[(false, ns, name)])? {
        if let Some(r) = o.get::<ServiceRecord>(&k)? {
            let depends = resolve(&r.spec)
                .iter()
                .any(|d| d.kind == DepKind::Service && !d.optional && d.namespace == ns && d.name == name);
            let is_self = r.spec.namespace() == ns && r.spec.name == name;
            if depends && !is_self {
                out.push(format!("{}/{}", r.spec.namespace(), r.spec.name));
            }
        }
    }
    Ok(out)
}

fn spec_target(s: &ServiceSpec) -> String {
    match (&s.image, &s.process) {
        (Some(i), _) => format!("image {i}"),
        (None, Some(p)) => format!("command {}", p.command),
        _ => String::new(),
    }
}

/// `scale 1→3, image a→b, env changed`: which top-level fields differ.
fn diff_summary(old: &ServiceSpec, new: &ServiceSpec) -> String {
    let (a, b) = (
        serde_json::to_value(old).unwrap_or_default(),
        serde_json::to_value(new).unwrap_or_default(),
    );
    let empty = serde_json::Map::new();
    let (ma, mb) = (a.as_object().unwrap_or(&empty), b.as_object().unwrap_or(&empty));
    let keys: std::collections::BTreeSet<&String> = ma.keys().chain(mb.keys()).collect();
    let mut parts = Vec::new();
    for k in keys {
        let (va, vb) = (ma.get(k), mb.get(k));
        if va == vb {
            continue;
        }
        let short = |v: Option<&serde_json::Value>| match v {
            None => "∅".to_string(),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => v.to_string(),
            Some(_) => String::new(),
        };
        let (sa, sb) = (short(va), short(vb));
        if sa.is_empty() || sb.is_empty() || sa.len() + sb.len() > 80 {
            parts.push(format!("{k} changed"));
        } else {
            parts.push(format!("{k} {sa}→{sb}"));
        }
    }
    if parts.is_empty() {
        "changed".into()
    } else {
        parts.join(", ")
    }
}
