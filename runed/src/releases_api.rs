//! Releases and rollback on the service API: what a runeset cast recorded, its removal, and
//! casting an earlier spec of a service again. Every write is one log entry.

use std::collections::BTreeSet;

use rune_proto::v1 as pb;
use rune_statemachine::command::ReleaseSpec;
use rune_statemachine::instance::{instances_prefix, InstanceRecord};
use rune_statemachine::store::{
    get_record, list_records, release_key, release_merged, releases_prefix, services_prefix, ReleaseRecord,
    ServiceRecord,
};
use rune_statemachine::{Command, Resource, STATE_TABLE};
use tonic::{Request, Response, Status};

use crate::api::{meta, Api};
use crate::auth::authorize;
use crate::grpc::{internal, namespace_or_default, not_proposed, rejection, scope};

/// The release a cast names, checked field by field.
pub(crate) fn release_spec(r: &pb::ReleaseSpec) -> Result<ReleaseSpec, Status> {
    for (field, v) in [
        ("release.name", &r.name),
        ("release.namespace", &r.namespace),
        ("release.runeset", &r.runeset),
        ("release.version", &r.version),
    ] {
        if v.trim().is_empty() {
            return Err(Status::invalid_argument(format!("{field}: is required")));
        }
    }
    for (field, v) in [("release.name", &r.name), ("release.namespace", &r.namespace)] {
        rune_statemachine::validate::dns1123_label(v)
            .map_err(|e| Status::invalid_argument(format!("{field}: {e}")))?;
    }
    if !r.values_digest.starts_with("sha256:") {
        return Err(Status::invalid_argument(
            "release.values_digest: must be sha256:<hex> of the merged values",
        ));
    }
    Ok(ReleaseSpec {
        name: r.name.clone(),
        namespace: r.namespace.clone(),
        runeset: r.runeset.clone(),
        version: r.version.clone(),
        description: r.description.clone(),
        values_digest: r.values_digest.clone(),
        also: Vec::new(),
        adopt: r.adopt,
    })
}

/// What a cast would do to its release (apply decides again, in log order): an unchanged
/// runeset cast again with the same version and values writes nothing.
pub(crate) fn predict<R: redb::ReadableTable<&'static str, &'static [u8]>>(
    t: &R,
    rel: &ReleaseSpec,
    resources: &[Resource],
) -> Result<pb::ApplyResult, Status> {
    let prev: Option<ReleaseRecord> =
        get_record(t, &release_key(&rel.namespace, &rel.name)).map_err(internal)?;
    let (_, _, hash) = release_merged(prev.as_ref(), rel, resources);
    let (action, generation) = match &prev {
        None => (pb::ApplyAction::Created, 1),
        Some(p) if p.meta.spec_hash == hash => (pb::ApplyAction::Unchanged, p.meta.generation),
        Some(p) => (pb::ApplyAction::Configured, p.meta.generation + 1),
    };
    Ok(pb::ApplyResult {
        kind: "release".into(),
        namespace: rel.namespace.clone(),
        name: rel.name.clone(),
        action: action as i32,
        generation,
    })
}

fn spec_pb(s: &ReleaseSpec) -> pb::ReleaseSpec {
    pb::ReleaseSpec {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        runeset: s.runeset.clone(),
        version: s.version.clone(),
        description: s.description.clone(),
        values_digest: s.values_digest.clone(),
        adopt: false,
    }
}

/// A release with each resource's presence, and for services `ready/desired`.
fn release_pb<R>(t: &R, r: &ReleaseRecord) -> Result<pb::Release, Status>
where
    R: redb::ReadableTable<&'static str, &'static [u8]>,
{
    #[derive(serde::Deserialize)]
    struct Stored {}
    let mut resources = Vec::with_capacity(r.resources.len());
    for x in &r.resources {
        let (present, status) = if x.kind == "service" {
            match get_record::<ServiceRecord, _>(t, &x.key()).map_err(internal)? {
                Some(s) => {
                    let inst: Vec<InstanceRecord> =
                        list_records(t, &instances_prefix(Some(&x.namespace), Some(&x.name)))
                            .map_err(internal)?;
                    let ready = inst.iter().filter(|i| i.ready).count();
                    (true, format!("{ready}/{} ready", s.spec.scale()))
                }
                None => (false, String::new()),
            }
        } else {
            let present = get_record::<Stored, _>(t, &x.key()).map_err(internal)?.is_some();
            (present, String::new())
        };
        resources.push(pb::ReleaseResource {
            kind: x.kind.clone(),
            namespace: x.namespace.clone(),
            name: x.name.clone(),
            present,
            status,
        });
    }
    Ok(pb::Release {
        spec: Some(spec_pb(&r.spec)),
        revision: r.meta.generation,
        resources,
        meta: Some(meta(&r.meta)),
    })
}

impl Api {
    /// `rune release list`.
    pub(crate) async fn list_releases_(
        &self,
        req: Request<pb::ListReleasesRequest>,
    ) -> Result<Response<pb::ListReleasesResponse>, Status> {
        let ns = scope(&req.get_ref().namespace);
        authorize(&req, "releases", "list", ns.as_deref())?;
        let txn = self.log.read().map_err(internal)?;
        let t = txn.open_table(STATE_TABLE).map_err(internal)?;
        let recs: Vec<ReleaseRecord> = list_records(&t, &releases_prefix(ns.as_deref())).map_err(internal)?;
        let releases = recs
            .iter()
            .map(|r| release_pb(&t, r))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Response::new(pb::ListReleasesResponse { releases }))
    }

    /// `rune release status NAME`.
    pub(crate) async fn get_release_(
        &self,
        req: Request<pb::ReleaseRef>,
    ) -> Result<Response<pb::Release>, Status> {
        let ns = namespace_or_default(&req.get_ref().namespace).to_string();
        authorize(&req, "releases", "get", Some(&ns))?;
        let name = &req.get_ref().name;
        let txn = self.log.read().map_err(internal)?;
        let t = txn.open_table(STATE_TABLE).map_err(internal)?;
        let Some(r) = get_record::<ReleaseRecord, _>(&t, &release_key(&ns, name)).map_err(internal)? else {
            return Err(Status::not_found(format!("release {ns}/{name} not found")));
        };
        Ok(Response::new(release_pb(&t, &r)?))
    }

    /// `rune release delete NAME`: one entry removes the release and what it cast. Needs
    /// `delete` on releases and on every kind of resource the release holds.
    pub(crate) async fn delete_release_(
        &self,
        req: Request<pb::DeleteReleaseRequest>,
    ) -> Result<Response<pb::DeleteReleaseResponse>, Status> {
        let caller = crate::auth::caller(&req)?;
        let req = req.into_inner();
        let ns = namespace_or_default(&req.namespace).to_string();
        crate::auth::check(&caller, "releases", "delete", Some(&ns))?;
        if req.name.is_empty() {
            return Err(Status::invalid_argument("name: is required"));
        }
        let (services, claims, revision) = {
            let txn = self.log.read().map_err(internal)?;
            let t = txn.open_table(STATE_TABLE).map_err(internal)?;
            let Some(r) =
                get_record::<ReleaseRecord, _>(&t, &release_key(&ns, &req.name)).map_err(internal)?
            else {
                return Err(Status::not_found(format!("release {ns}/{} not found", req.name)));
            };
            let mut services = Vec::new();
            let mut claims = BTreeSet::new();
            for x in &r.resources {
                let resource = rune_statemachine::identity::canonical_resource(&x.kind).unwrap_or("*");
                crate::auth::check(&caller, resource, "delete", Some(&x.namespace))?;
                if x.kind != "service" {
                    continue;
                }
                if let Some(s) = get_record::<ServiceRecord, _>(&t, &x.key()).map_err(internal)? {
                    claims.extend(s.spec.volumes.iter().filter_map(|v| v.claim.clone()));
                    services.push(x.name.clone());
                }
            }
            // A shared claim another service (outside the release) names is not the release's
            // to delete.
            let all: Vec<ServiceRecord> = list_records(&t, &services_prefix(Some(&ns))).map_err(internal)?;
            for s in all.iter().filter(|s| !services.contains(&s.spec.name)) {
                for v in &s.spec.volumes {
                    if let Some(c) = &v.claim {
                        claims.remove(c);
                    }
                }
            }
            (services, claims, r.meta.generation)
        };
        let p = self
            .log
            .propose(Command::DeleteRelease {
                namespace: ns,
                name: req.name,
                force: req.force,
                revision: Some(revision),
            })
            .await
            .map_err(not_proposed)?;
        let changes = p.outcome.map_err(rejection)?;
        let deleted = changes
            .iter()
            .filter(|c| matches!(c.kind.as_str(), "service" | "configmap" | "secret" | "release"))
            .map(|c| format!("{} {}/{}", c.kind.as_str(), c.namespace, c.name))
            .collect();
        Ok(Response::new(pb::DeleteReleaseResponse {
            index: p.index,
            deleted,
            services,
            claims: claims.into_iter().collect(),
        }))
    }

    /// `rune rollback SERVICE [--to-generation N]`.
    pub(crate) async fn rollback_(
        &self,
        req: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::ServiceChangeResponse>, Status> {
        let ns = namespace_or_default(&req.get_ref().namespace).to_string();
        authorize(&req, "services", "update", Some(&ns))?;
        let req = req.into_inner();
        if req.name.is_empty() {
            return Err(Status::invalid_argument("name: is required"));
        }
        let p = self
            .log
            .propose(Command::RollbackService {
                namespace: ns,
                name: req.name,
                to_generation: (req.to_generation > 0).then_some(req.to_generation),
                history_limit: self.history_limit,
            })
            .await
            .map_err(not_proposed)?;
        let changes = p.outcome.map_err(rejection)?;
        let c = changes
            .into_iter()
            .next()
            .ok_or_else(|| Status::internal("the rollback reported nothing"))?;
        Ok(Response::new(pb::ServiceChangeResponse {
            index: p.index,
            generation: c.generation,
            changed: c.action != rune_statemachine::Action::Unchanged,
            summary: c.summary,
        }))
    }
}
