//! Apply for runeset releases: `releases/<ns>/<name>`.
//!
//! A release is recorded by the same entry as the cast that installs or upgrades it, so it never
//! names a resource that was not written, and removed with everything it cast by one entry.
//! Resources stay in a release once cast (an upgrade that drops one does not delete it), so
//! `rune release delete` never leaves an orphan behind; one that was deleted by hand is skipped.

use std::collections::BTreeSet;

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::{
    change, configmap_key, new_meta, secret_key, service_key, spec_hash, ObjectMeta, Overlay, StoreError,
};
use crate::command::{Action, Change, Kind, Rejection, ReleaseSpec, Resource};

/// A stored release.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseRecord {
    /// What the last cast of it said.
    pub spec: ReleaseSpec,
    /// Everything any cast of it wrote, sorted.
    pub resources: Vec<ResourceRef>,
    /// Bookkeeping; `generation` is the release's revision.
    pub meta: ObjectMeta,
}

/// One resource a release cast.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ResourceRef {
    /// `service`, `configmap` or `secret`.
    pub kind: String,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl ResourceRef {
    /// Its key in the state table.
    pub fn key(&self) -> String {
        match self.kind.as_str() {
            "service" => service_key(&self.namespace, &self.name),
            "configmap" => configmap_key(&self.namespace, &self.name),
            _ => secret_key(&self.namespace, &self.name),
        }
    }
}

impl std::fmt::Display for ResourceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// Key of a release.
pub fn release_key(ns: &str, name: &str) -> String {
    format!("releases/{ns}/{name}")
}

/// Key prefix of the releases of a namespace, or of all of them.
pub fn releases_prefix(ns: Option<&str>) -> String {
    match ns {
        Some(ns) => format!("releases/{ns}/"),
        None => "releases/".to_string(),
    }
}

/// The resources of a cast a release owns (namespaces are shared, never owned).
pub fn owned_refs(resources: &[Resource]) -> BTreeSet<ResourceRef> {
    resources
        .iter()
        .filter_map(|r| {
            let (kind, ns, name) = match r {
                Resource::Service(s) => ("service", s.namespace().to_string(), s.name.clone()),
                Resource::Configmap(c) => ("configmap", c.namespace.clone(), c.name.clone()),
                Resource::Secret(s) => ("secret", s.namespace.clone(), s.name.clone()),
                Resource::Namespace(_) => return None,
            };
            Some(ResourceRef {
                kind: kind.to_string(),
                namespace: ns,
                name,
            })
        })
        .collect()
}

/// What a release's record would be after a cast of `resources` (and the unchanged ones the
/// spec names in `also`): its resources, its stored spec, and its hash. The API tells an
/// unchanged re-cast with it; apply decides with it.
pub fn merged(
    prev: Option<&ReleaseRecord>,
    spec: &ReleaseSpec,
    resources: &[Resource],
) -> (Vec<ResourceRef>, ReleaseSpec, String) {
    let mut all: BTreeSet<ResourceRef> = prev
        .map(|p| p.resources.iter().cloned().collect())
        .unwrap_or_default();
    all.extend(cast_refs(spec, resources));
    let all: Vec<ResourceRef> = all.into_iter().collect();
    let stored = ReleaseSpec {
        also: Vec::new(),
        adopt: false,
        ..spec.clone()
    };
    let hash = spec_hash(&(&stored, &all));
    (all, stored, hash)
}

/// Everything a release cast brings: its resources and the unchanged ones it names.
fn cast_refs(spec: &ReleaseSpec, resources: &[Resource]) -> BTreeSet<ResourceRef> {
    let mut refs = owned_refs(resources);
    refs.extend(spec.also.iter().cloned());
    refs
}

/// Which of a release cast's resources exist before it is applied (read before any write).
pub(super) fn existing<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &Overlay<'_, R>,
    spec: &ReleaseSpec,
    resources: &[Resource],
) -> Result<BTreeSet<ResourceRef>, StoreError> {
    let mut out = BTreeSet::new();
    for r in cast_refs(spec, resources) {
        if o.contains(&r.key())? {
            out.insert(r);
        }
    }
    Ok(out)
}

pub(super) fn put_release<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &mut Overlay<'_, R>,
    index: u64,
    now: i64,
    spec: &ReleaseSpec,
    resources: &[Resource],
    before: &BTreeSet<ResourceRef>,
) -> Result<Result<Change, Rejection>, StoreError> {
    for (field, v) in [("release", &spec.name), ("namespace", &spec.namespace)] {
        if let Err(e) = crate::validate::dns1123_label(v) {
            return Ok(Err(Rejection::Invalid(format!(
                "release {}: {field}: {e}",
                spec.name
            ))));
        }
    }
    let refs = cast_refs(spec, resources);
    for k in o.keys_with_prefix(&releases_prefix(None))? {
        let Some(other) = o.get::<ReleaseRecord>(&k)? else {
            continue;
        };
        if other.spec.namespace == spec.namespace && other.spec.name == spec.name {
            continue;
        }
        if let Some(r) = other.resources.iter().find(|r| refs.contains(*r)) {
            return Ok(Err(Rejection::FailedPrecondition(format!(
                "{r} belongs to release {}/{}; cast with --release {} to upgrade it, or delete that release first",
                other.spec.namespace, other.spec.name, other.spec.name
            ))));
        }
    }
    let key = release_key(&spec.namespace, &spec.name);
    let prev = o.get::<ReleaseRecord>(&key)?;
    // What existed before this cast and is not the release's is not taken over: deleting the
    // release would delete it.
    for r in &refs {
        let held = prev.as_ref().is_some_and(|p| p.resources.contains(r));
        if !held && !spec.adopt && before.contains(r) {
            return Ok(Err(Rejection::FailedPrecondition(format!(
                "{r} exists outside release {}/{}; a release only takes what it creates: cast with --adopt to take it over (deleting the release will delete it), or delete it first",
                spec.namespace, spec.name
            ))));
        }
    }
    let (all, stored, hash) = merged(prev.as_ref(), spec, resources);
    let summary = format!(
        "runeset {} {}, {} resource(s)",
        spec.runeset,
        spec.version,
        all.len()
    );
    let (action, meta) = match prev {
        Some(p) if p.meta.spec_hash == hash => {
            return Ok(Ok(change(
                Kind::Release,
                &spec.namespace,
                &spec.name,
                Action::Unchanged,
                p.meta.generation,
                "",
            )))
        }
        Some(p) => (Action::Configured, p.meta.next(now, index, hash)),
        None => (Action::Created, new_meta(now, index, hash, 0)),
    };
    let c = change(
        Kind::Release,
        &spec.namespace,
        &spec.name,
        action,
        meta.generation,
        &summary,
    );
    o.put(
        key,
        ReleaseRecord {
            spec: stored,
            resources: all,
            meta,
        },
    );
    Ok(Ok(c))
}
