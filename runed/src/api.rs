//! The gRPC API: decode and validate requests, decide, propose, and map outcomes to statuses.
//! With the other `*_api.rs` modules, `serve.rs` and `sealing.rs`, the only part of the daemon
//! that knows protobuf types.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use rune_log::{AppliedEntry, Log};
use rune_proto::v1 as pb;
use rune_statemachine::command::parse_resource;
use rune_statemachine::delta::Delta;
use rune_statemachine::store::{
    configmap_key, get_record, list_records, namespace_key, secret_key, service_history, service_key,
    services_prefix, spec_hash, NamespaceRecord, ObjectMeta, ServiceRecord,
};
use rune_statemachine::{Action, Command, Kind, Resource, MAX_SPEC_BYTES, STATE_TABLE};
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status};

use crate::auth::authorize;
use crate::grpc::{internal, namespace_or_default, not_proposed, rejection, scope, Decoded};
use crate::paging::PageQuery;

/// Shared by every service of the API.
#[derive(Clone)]
pub struct Api {
    /// The log every write goes through.
    pub log: Arc<Log>,
    /// Previous specs kept per service, carried in each Apply command.
    pub history_limit: u32,
    /// Runs the instances; asked for live health, logs and exec.
    pub orchestrator: Arc<rune_orchestrator::Orchestrator>,
    /// The KEKs, secret limits and rotation.
    pub secrets: Arc<crate::sealing::Secrets>,
    /// Admin RPCs from non-loopback clients (`auth.allow-remote-admin`).
    pub allow_remote_admin: bool,
    /// The data plane: proxy ports, policy explanations, port-forward.
    pub dataplane: Arc<rune_dataplane::DataPlane>,
    /// The edge ingress, on edge nodes.
    pub ingress: Option<Arc<rune_ingress::Ingress>>,
    /// Whether a local admin socket is served: then bootstrap is for root on it only.
    pub admin_socket: bool,
    /// The port the gRPC API listens on.
    pub grpc_port: u16,
    /// The cluster CA's certificate (PEM) when this node serves a raft port: what a join
    /// token carries.
    pub cluster_ca: Option<String>,
}

impl Api {
    /// A service as sent, with where this node's proxy serves it.
    fn service_with_ports(&self, r: &ServiceRecord) -> pb::Service {
        let mut s = service_pb(r);
        s.proxy_ports = self
            .dataplane
            .proxy_ports(&s.namespace, &s.name)
            .into_iter()
            .map(|(port, addr)| pb::ProxyPort {
                port: u32::from(port),
                address: addr.to_string(),
            })
            .collect();
        s
    }
}

pub(crate) type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Bookkeeping as the API sends it.
pub(crate) fn meta(m: &ObjectMeta) -> pb::ObjectMeta {
    pb::ObjectMeta {
        created_at_ms: m.created_at_ms,
        updated_at_ms: m.updated_at_ms,
        generation: m.generation,
        spec_hash: m.spec_hash.clone(),
        resource_version: m.resource_version,
        last_non_zero_scale: m.last_non_zero_scale,
    }
}

fn service_pb(r: &ServiceRecord) -> pb::Service {
    pb::Service {
        namespace: r.spec.namespace().to_string(),
        name: r.spec.name.clone(),
        spec_json: serde_json::to_string(&r.spec).unwrap_or_default(),
        meta: Some(meta(&r.meta)),
        vip: r.vip.clone().unwrap_or_default(),
        proxy_ports: Vec::new(),
    }
}

fn namespace_pb(r: &NamespaceRecord) -> pb::Namespace {
    pb::Namespace {
        name: r.spec.name.clone(),
        labels: r
            .spec
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.0.clone()))
            .collect(),
        description: r.spec.description.clone().unwrap_or_default(),
        meta: Some(meta(&r.meta)),
    }
}

/// The next applied entry after `after` for a watch; `None` ends the watch (the log closed, or
/// the watcher fell behind and was told to start again).
pub(crate) async fn next_entry<T>(
    rx: &mut tokio::sync::broadcast::Receiver<Arc<AppliedEntry>>,
    tx: &tokio::sync::mpsc::Sender<Result<T, Status>>,
    after: u64,
) -> Option<Arc<AppliedEntry>> {
    loop {
        match rx.recv().await {
            Ok(e) if e.index <= after => continue,
            Ok(e) if e.reset => {
                // A snapshot replaced the state: what this watcher holds no longer follows.
                let _ = tx
                    .send(Err(Status::aborted(
                        "the state was replaced by a snapshot; start the watch again",
                    )))
                    .await;
                return None;
            }
            Ok(e) => return Some(e),
            Err(RecvError::Lagged(_)) => {
                let _ = tx
                    .send(Err(Status::aborted("watch fell behind the log; start it again")))
                    .await;
                return None;
            }
            Err(RecvError::Closed) => return None,
        }
    }
}

/// Parses `k=v,k2=v2`.
fn parse_selector(s: &str) -> Result<Vec<(String, String)>, Status> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
            _ => Err(Status::invalid_argument(format!(
                "label_selector: '{p}' is not k=v"
            ))),
        })
        .collect()
}

fn matches(r: &ServiceRecord, sel: &[(String, String)]) -> bool {
    sel.iter()
        .all(|(k, v)| r.spec.labels.get(k).is_some_and(|x| &x.0 == v))
}

fn spec_problem(kind: &str, name: &str, errs: &[rune_statemachine::decode::FieldError]) -> Status {
    let list: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
    Status::invalid_argument(format!("{kind} {name}: {}", list.join("; ")))
}

/// Decodes and validates one resource of a cast, naming what is wrong.
fn decode_resource(
    r: &pb::Resource,
    i: usize,
    limits: rune_statemachine::secret::SecretLimits,
) -> Result<Decoded, Status> {
    use pb::resource::Kind as K;
    let (kind, json) = match &r.kind {
        Some(K::ServiceJson(j)) => ("service", j),
        Some(K::NamespaceJson(j)) => ("namespace", j),
        Some(K::SecretJson(j)) => ("secret", j),
        Some(K::ConfigmapJson(j)) => ("configmap", j),
        None => {
            return Err(Status::invalid_argument(format!(
                "resources[{i}]: no resource given"
            )))
        }
    };
    if json.len() > MAX_SPEC_BYTES {
        return Err(Status::invalid_argument(format!(
            "resources[{i}]: {kind} spec is {:.1} MiB; the limit is {} MiB",
            json.len() as f64 / 1048576.0,
            MAX_SPEC_BYTES / 1048576
        )));
    }
    // Never echo a secret's JSON back: serde's message could quote a value.
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| {
        if kind == "secret" {
            Status::invalid_argument(format!(
                "resources[{i}]: secret spec is not JSON (line {})",
                e.line()
            ))
        } else {
            Status::invalid_argument(format!("resources[{i}]: {kind} spec is not JSON: {e}"))
        }
    })?;
    let name = value.get("name").and_then(|n| n.as_str()).unwrap_or("<unnamed>");
    match kind {
        "secret" => {
            // Decoder messages quote what they could not take (`invalid type: integer `42``):
            // for a secret that is a value, so quotes are cut out.
            let redacted = |errs: Vec<rune_statemachine::decode::FieldError>| {
                let errs: Vec<_> = errs
                    .into_iter()
                    .map(|mut e| {
                        e.message = redact_quoted(&e.message);
                        e
                    })
                    .collect();
                spec_problem(kind, name, &errs)
            };
            let spec: rune_statemachine::secret::SecretSpec =
                rune_statemachine::decode::decode(&value).map_err(redacted)?;
            let data = spec.to_data(limits).map_err(redacted)?;
            Ok(Decoded::Secret {
                namespace: spec.namespace().to_string(),
                name: spec.name.clone(),
                data,
            })
        }
        "configmap" => {
            let spec: rune_statemachine::secret::ConfigmapSpec =
                rune_statemachine::decode::decode(&value).map_err(|errs| spec_problem(kind, name, &errs))?;
            let c = spec
                .to_configmap(limits)
                .map_err(|errs| spec_problem(kind, name, &errs))?;
            Ok(Decoded::Resource(Resource::Configmap(c)))
        }
        _ => parse_resource(kind, &value)
            .map(Decoded::Resource)
            .map_err(|errs| spec_problem(kind, name, &errs)),
    }
}

/// `a `b` c` → `a <redacted> c`.
fn redact_quoted(m: &str) -> String {
    let mut out = String::new();
    for (i, part) in m.split('`').enumerate() {
        out.push_str(if i % 2 == 1 { "<redacted>" } else { part });
    }
    out
}

/// The resource (as policies name it) and namespace a decoded cast resource is written in.
fn scope_of(d: &Decoded) -> (&'static str, &str) {
    match d {
        Decoded::Secret { namespace, .. } => ("secrets", namespace),
        Decoded::Resource(Resource::Secret(s)) => ("secrets", &s.namespace),
        Decoded::Resource(Resource::Configmap(c)) => ("configmaps", &c.namespace),
        Decoded::Resource(Resource::Service(s)) => ("services", s.namespace()),
        Decoded::Resource(Resource::Namespace(n)) => ("namespaces", &n.name),
    }
}

/// Order of a cast: namespaces, then configmaps and secrets, then the services that use them.
fn cast_rank(r: &Resource) -> u8 {
    match r {
        Resource::Namespace(_) => 0,
        Resource::Configmap(_) => 1,
        Resource::Secret(_) => 2,
        Resource::Service(_) => 3,
    }
}

impl Api {
    /// What a cast would do to each resource, from the current state: for dry runs, to skip
    /// proposing a cast that changes nothing, and to refuse a missing namespace before it costs
    /// a log entry. Apply decides again, for real, in log order.
    fn predict<R: redb::ReadableTable<&'static str, &'static [u8]>>(
        t: &R,
        resources: &[Resource],
        force: bool,
        create_namespace: bool,
    ) -> Result<Vec<pb::ApplyResult>, Status> {
        #[derive(serde::Deserialize)]
        struct Stored {
            meta: ObjectMeta,
        }
        let mut out = Vec::new();
        let mut new_namespaces = std::collections::BTreeSet::new();
        refuse_taken_hosts(t, resources)?;
        for r in resources {
            let (kind, ns, name, key) = match r {
                Resource::Service(_) | Resource::Secret(_) | Resource::Configmap(_) => {
                    let ns = match r {
                        Resource::Service(s) => s.namespace().to_string(),
                        Resource::Secret(s) => s.namespace.clone(),
                        Resource::Configmap(c) => c.namespace.clone(),
                        Resource::Namespace(_) => String::new(),
                    };
                    // Existence only: the record itself is not decoded.
                    let exists = new_namespaces.contains(&ns)
                        || t.get(namespace_key(&ns).as_str()).map_err(internal)?.is_some();
                    if !exists {
                        if !create_namespace {
                            return Err(Status::not_found(format!(
                                "namespace {ns} does not exist (use --create-namespace to create it)"
                            )));
                        }
                        new_namespaces.insert(ns.clone());
                        out.push(result(
                            "namespace",
                            String::new(),
                            ns.clone(),
                            pb::ApplyAction::Created,
                            1,
                        ));
                    }
                    match r {
                        Resource::Service(s) => {
                            ("service", ns, s.name.clone(), service_key(s.namespace(), &s.name))
                        }
                        // Sealed secrets reaching here changed: unchanged ones were left out before.
                        Resource::Secret(s) => {
                            ("secret", ns, s.name.clone(), secret_key(&s.namespace, &s.name))
                        }
                        Resource::Configmap(c) => (
                            "configmap",
                            ns,
                            c.name.clone(),
                            configmap_key(&c.namespace, &c.name),
                        ),
                        Resource::Namespace(_) => continue,
                    }
                }
                Resource::Namespace(n) => {
                    new_namespaces.insert(n.name.clone());
                    ("namespace", String::new(), n.name.clone(), namespace_key(&n.name))
                }
            };
            // The spec's hash only matters against a stored one: a create never computes it.
            let unchanged = |old: &Stored| !force && recast_hash(r).is_some_and(|h| old.meta.spec_hash == h);
            let (action, generation) = match get_record::<Stored, _>(t, &key).map_err(internal)? {
                None => (pb::ApplyAction::Created, 1),
                Some(old) if unchanged(&old) => (pb::ApplyAction::Unchanged, old.meta.generation),
                Some(old) => (pb::ApplyAction::Configured, old.meta.generation + 1),
            };
            out.push(result(kind, ns, name, action, generation));
        }
        Ok(out)
    }
}

/// The hash that tells a re-cast changes nothing; none for a sealed secret, which reaches the
/// prediction only when it changed (unchanged ones were left out before).
fn recast_hash(r: &Resource) -> Option<String> {
    match r {
        Resource::Service(s) => Some(spec_hash(s)),
        Resource::Configmap(c) => Some(spec_hash(c)),
        Resource::Namespace(n) => Some(spec_hash(n)),
        Resource::Secret(_) => None,
    }
}

/// A cast's predicted results (its release's last), read from the state as applied so far.
struct Prediction<'a> {
    resources: &'a [Resource],
    release: Option<&'a rune_statemachine::command::ReleaseSpec>,
    force: bool,
    create_namespace: bool,
}

impl rune_log::StateReader for Prediction<'_> {
    type Out = Result<Vec<pb::ApplyResult>, Status>;
    fn read<R: redb::ReadableTable<&'static str, &'static [u8]>>(self, t: &R) -> Self::Out {
        let mut predicted = Api::predict(t, self.resources, self.force, self.create_namespace)?;
        if let Some(rel) = self.release {
            predicted.push(crate::releases_api::predict(t, rel, self.resources)?);
        }
        Ok(predicted)
    }
}

/// Refuses, before anything is proposed, what apply would: a host held by a service outside
/// this cast, or claimed by two services of it. A holder inside the cast may be moving away, so
/// that case is left to apply, which decides in cast order.
fn refuse_taken_hosts(
    t: &impl redb::ReadableTable<&'static str, &'static [u8]>,
    resources: &[Resource],
) -> Result<(), Status> {
    use rune_statemachine::network::VipHolder;
    let services: Vec<&rune_statemachine::spec::ServiceSpec> = resources
        .iter()
        .filter_map(|r| match r {
            Resource::Service(s) => Some(s),
            _ => None,
        })
        .collect();
    let in_cast = |h: &VipHolder| {
        services
            .iter()
            .any(|s| s.namespace() == h.namespace && s.name == h.service)
    };
    let mut claimed: std::collections::BTreeMap<String, VipHolder> = std::collections::BTreeMap::new();
    for s in &services {
        let refused = |host: &str, h: &VipHolder| {
            Status::already_exists(rune_statemachine::store::host_taken(
                s.namespace(),
                &s.name,
                host,
                h,
            ))
        };
        if let Some((host, h)) = rune_statemachine::store::host_claimed_by_other(t, s).map_err(internal)? {
            if !in_cast(&h) {
                return Err(refused(&host, &h));
            }
        }
        if let Some(host) = s.expose.as_ref().and_then(|e| e.host()) {
            let me = VipHolder {
                namespace: s.namespace().to_string(),
                service: s.name.clone(),
            };
            if let Some(first) = claimed.get(&host).filter(|first| **first != me) {
                return Err(refused(&host, first));
            }
            claimed.insert(host, me);
        }
    }
    Ok(())
}

fn result(
    kind: &str,
    namespace: String,
    name: String,
    action: pb::ApplyAction,
    generation: u64,
) -> pb::ApplyResult {
    pb::ApplyResult {
        kind: kind.into(),
        namespace,
        name,
        action: action as i32,
        generation,
    }
}

#[tonic::async_trait]
impl pb::service_api_server::ServiceApi for Api {
    async fn apply(&self, req: Request<pb::ApplyRequest>) -> Result<Response<pb::ApplyResponse>, Status> {
        // Each resource is checked below, with the verb its predicted action needs.
        let caller = crate::auth::caller(&req)?;
        let req = req.into_inner();
        if req.resources.is_empty() {
            return Err(Status::invalid_argument("resources: nothing to apply"));
        }
        let release = req
            .release
            .as_ref()
            .map(crate::releases_api::release_spec)
            .transpose()?;
        let mut decoded = Vec::with_capacity(req.resources.len());
        for (i, r) in req.resources.iter().enumerate() {
            decoded.push(decode_resource(r, i, self.secrets.limits)?);
        }
        // Before anything is read from the state, a caller must be able to write each kind
        // where it casts it: else the prediction's answers (a namespace that does not exist,
        // the service holding a host) would tell it what it may not read. The verb the
        // predicted action needs is checked below.
        for d in &decoded {
            let (resource, ns) = scope_of(d);
            let may = |verb| crate::auth::check(&caller, resource, verb, Some(ns)).is_ok();
            if !may("create") && !may("update") {
                let action = format!("create or update {resource}");
                return Err(crate::auth::denied(&caller, &action, Some(ns)));
            }
        }
        // Secrets are sealed before anything is proposed; an unchanged one is left out. A KEK
        // rotation waits until this cast's entry is applied.
        let _no_rotation = self.secrets.cast_guard().await;
        let (mut resources, unchanged_secrets) = self.secrets.seal_cast(&self.log, &caller, decoded)?;
        // Unchanged secrets are left out of the write, but a release owns them all the same.
        let release = release.map(|mut r| {
            r.also = unchanged_secrets
                .iter()
                .map(|u| rune_statemachine::store::ResourceRef {
                    kind: u.kind.clone(),
                    namespace: u.namespace.clone(),
                    name: u.name.clone(),
                })
                .collect();
            r
        });
        resources.sort_by_key(cast_rank);
        // The applied state already holds every acknowledged write (apply runs before the reply),
        // so a plain read is enough to tell a no-op re-cast; apply decides for real anyway. It
        // reads what is applied but not yet committed as well, so it forces no commit.
        let mut predicted = self
            .log
            .with_state(|t| {
                t.with(Prediction {
                    resources: &resources,
                    release: release.as_ref(),
                    force: req.force,
                    create_namespace: req.create_namespace,
                })
            })
            .await
            .map_err(internal)??;
        predicted.extend(unchanged_secrets);
        for p in &predicted {
            let verb = if p.action == pb::ApplyAction::Created as i32 {
                "create"
            } else {
                "update"
            };
            let (resource, ns) = if p.kind == "namespace" {
                ("namespaces", p.name.as_str())
            } else {
                (p.kind.as_str(), p.namespace.as_str())
            };
            let resource = rune_statemachine::identity::canonical_resource(resource).unwrap_or("*");
            crate::auth::check(&caller, resource, verb, Some(ns))?;
        }
        let unchanged = predicted
            .iter()
            .all(|p| p.action == pb::ApplyAction::Unchanged as i32);
        // A release cast whose resources are all unchanged secrets still records the release.
        let release_changes = predicted
            .iter()
            .any(|p| p.kind == "release" && p.action != pb::ApplyAction::Unchanged as i32);
        if req.dry_run || unchanged || (resources.is_empty() && !release_changes) {
            return Ok(Response::new(pb::ApplyResponse {
                results: predicted,
                index: 0,
            }));
        }
        let cmd = Command::Apply {
            resources,
            create_namespace: req.create_namespace,
            force: req.force,
            history_limit: self.history_limit,
            release,
        };
        let p = self.log.propose(cmd).await.map_err(not_proposed)?;
        let changes = p.outcome.map_err(rejection)?;
        let unchanged_secrets = predicted
            .into_iter()
            .filter(|r| r.kind == "secret" && r.action == pb::ApplyAction::Unchanged as i32);
        let results = changes
            .into_iter()
            .map(|c| pb::ApplyResult {
                kind: c.kind.as_str().into(),
                namespace: c.namespace,
                name: c.name,
                action: match c.action {
                    Action::Created => pb::ApplyAction::Created,
                    Action::Configured => pb::ApplyAction::Configured,
                    Action::Unchanged | Action::Deleted => pb::ApplyAction::Unchanged,
                } as i32,
                generation: c.generation,
            })
            .chain(unchanged_secrets)
            .collect();
        Ok(Response::new(pb::ApplyResponse {
            results,
            index: p.index,
        }))
    }

    async fn get_service(
        &self,
        req: Request<pb::GetServiceRequest>,
    ) -> Result<Response<pb::Service>, Status> {
        authorize(
            &req,
            "services",
            "get",
            Some(namespace_or_default(&req.get_ref().namespace)),
        )?;
        let req = req.into_inner();
        let ns = namespace_or_default(&req.namespace);
        let txn = self.log.read().map_err(internal)?;
        let t = txn.open_table(STATE_TABLE).map_err(internal)?;
        match get_record::<ServiceRecord, _>(&t, &service_key(ns, &req.name)).map_err(internal)? {
            Some(r) => Ok(Response::new(self.service_with_ports(&r))),
            None => Err(Status::not_found(format!("service {ns}/{} not found", req.name))),
        }
    }

    async fn list_services(
        &self,
        req: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        authorize(
            &req,
            "services",
            "list",
            scope(&req.get_ref().namespace).as_deref(),
        )?;
        let req = req.into_inner();
        let sel = parse_selector(&req.label_selector)?;
        let ns = scope(&req.namespace);
        let q = PageQuery::new(
            "services",
            services_prefix(ns.as_deref()),
            req.limit,
            &req.continue_token,
        )?;
        let (txn, index) = self.log.read_indexed().map_err(internal)?;
        let t = txn.open_table(STATE_TABLE).map_err(internal)?;
        let (recs, continue_token) = q.read(&t, |r: &ServiceRecord| matches(r, &sel))?;
        let services = recs.iter().map(|r| self.service_with_ports(r)).collect();
        Ok(Response::new(pb::ListServicesResponse {
            services,
            index,
            continue_token,
        }))
    }

    type WatchServicesStream = Stream_<pb::ServiceEvent>;

    async fn watch_services(
        &self,
        req: Request<pb::WatchServicesRequest>,
    ) -> Result<Response<Self::WatchServicesStream>, Status> {
        let caller = authorize(
            &req,
            "services",
            "watch",
            scope(&req.get_ref().namespace).as_deref(),
        )?;
        let req = req.into_inner();
        let sel = parse_selector(&req.label_selector)?;
        let ns = scope(&req.namespace);
        // Subscribe before listing, so nothing applied in between is missed.
        let mut rx = self.log.subscribe();
        let (initial, index): (Vec<ServiceRecord>, u64) = {
            let (txn, index) = self.log.read_indexed().map_err(internal)?;
            let t = txn.open_table(STATE_TABLE).map_err(internal)?;
            (
                list_records(&t, &services_prefix(ns.as_deref())).map_err(internal)?,
                index,
            )
        };
        let (tx, out) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            // What this watcher was shown, so a service leaving the selection (or deleted)
            // is a DELETED to it, one entering it an ADDED, and one it never saw nothing.
            let mut shown: HashSet<(String, String)> = HashSet::new();
            for r in initial.iter().filter(|r| matches(r, &sel)) {
                shown.insert((r.spec.namespace().to_string(), r.spec.name.clone()));
                let ev = pb::ServiceEvent {
                    r#type: pb::EventType::Added as i32,
                    service: Some(service_pb(r)),
                    index,
                };
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            loop {
                let Some(entry) = next_entry(&mut rx, &tx, index).await else {
                    return;
                };
                // Each delta carries the record as this entry wrote it: the service as of this
                // index, not as of whenever the watcher reads.
                for d in &entry.deltas {
                    let Delta::Service {
                        namespace,
                        name,
                        record,
                    } = d
                    else {
                        continue;
                    };
                    if ns.as_deref().is_some_and(|n| n != namespace) {
                        continue;
                    }
                    let key = (namespace.clone(), name.clone());
                    let selected = record.as_deref().filter(|r| matches(r, &sel));
                    let (ty, svc) = match (selected, shown.contains(&key)) {
                        (Some(r), true) => (pb::EventType::Modified, service_pb(r)),
                        (Some(r), false) => {
                            shown.insert(key);
                            (pb::EventType::Added, service_pb(r))
                        }
                        (None, true) => {
                            shown.remove(&key);
                            // Out of the selection, the last state it had; deleted, its name.
                            let svc = match record.as_deref() {
                                Some(r) => service_pb(r),
                                None => pb::Service {
                                    namespace: namespace.clone(),
                                    name: name.clone(),
                                    ..Default::default()
                                },
                            };
                            (pb::EventType::Deleted, svc)
                        }
                        (None, false) => continue,
                    };
                    let ev = pb::ServiceEvent {
                        r#type: ty as i32,
                        service: Some(svc),
                        index: entry.index,
                    };
                    if tx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(crate::auth::until_token_ends(
            self.log.clone(),
            &caller,
            Box::pin(tokio_stream::wrappers::ReceiverStream::new(out)),
            Vec::new(),
        )))
    }

    async fn delete_service(
        &self,
        req: Request<pb::DeleteServiceRequest>,
    ) -> Result<Response<pb::DeleteServiceResponse>, Status> {
        authorize(
            &req,
            "services",
            "delete",
            Some(namespace_or_default(&req.get_ref().namespace)),
        )?;
        let req = req.into_inner();
        if req.name.is_empty() {
            return Err(Status::invalid_argument("name: is required"));
        }
        let ns = namespace_or_default(&req.namespace).to_string();
        let p = self
            .log
            .propose(Command::DeleteService {
                namespace: ns,
                name: req.name,
                force: req.force,
            })
            .await
            .map_err(not_proposed)?;
        p.outcome.map_err(rejection)?;
        Ok(Response::new(pb::DeleteServiceResponse { index: p.index }))
    }

    async fn list_endpoints(
        &self,
        req: Request<pb::ListEndpointsRequest>,
    ) -> Result<Response<pb::ListEndpointsResponse>, Status> {
        let ns = scope(&req.get_ref().namespace);
        authorize(&req, "endpoints", "list", ns.as_deref())?;
        let req = req.into_inner();
        let service = req.service;
        let q = PageQuery::new(
            "endpoints",
            services_prefix(ns.as_deref()),
            req.limit,
            &req.continue_token,
        )?;
        let txn = self.log.read().map_err(internal)?;
        let t = txn.open_table(STATE_TABLE).map_err(internal)?;
        let (services, continue_token): (Vec<ServiceRecord>, String) = match (&ns, service.is_empty()) {
            (Some(n), false) => (
                vec![get_record::<ServiceRecord, _>(&t, &service_key(n, &service))
                    .map_err(internal)?
                    .ok_or_else(|| Status::not_found(format!("service {n}/{service} not found")))?],
                String::new(),
            ),
            _ => q.read(&t, |s: &ServiceRecord| {
                service.is_empty() || s.spec.name == service
            })?,
        };
        let mut out = Vec::new();
        for svc in &services {
            let (sns, name) = (svc.spec.namespace().to_string(), svc.spec.name.clone());
            let set: rune_statemachine::network::EndpointSet =
                get_record(&t, &rune_statemachine::network::endpoints_key(&sns, &name))
                    .map_err(internal)?
                    .unwrap_or_default();
            out.push(pb::EndpointSet {
                namespace: sns,
                service: name,
                vip: svc.vip.clone().unwrap_or_default(),
                endpoints: set
                    .endpoints
                    .into_iter()
                    .map(|e| pb::Endpoint {
                        instance: e.instance,
                        address: e.address,
                        node: e.node,
                        ports: e
                            .ports
                            .into_iter()
                            .map(|p| pb::EndpointPort {
                                name: p.name,
                                port: u32::from(p.port),
                                target_port: u32::from(p.target_port),
                                protocol: p.protocol,
                            })
                            .collect(),
                    })
                    .collect(),
            });
        }
        Ok(Response::new(pb::ListEndpointsResponse {
            endpoints: out,
            continue_token,
        }))
    }

    async fn service_history(
        &self,
        req: Request<pb::ServiceHistoryRequest>,
    ) -> Result<Response<pb::ServiceHistoryResponse>, Status> {
        authorize(
            &req,
            "services",
            "get",
            Some(namespace_or_default(&req.get_ref().namespace)),
        )?;
        let req = req.into_inner();
        let ns = namespace_or_default(&req.namespace);
        let txn = self.log.read().map_err(internal)?;
        let t = txn.open_table(STATE_TABLE).map_err(internal)?;
        let Some(cur) = get_record::<ServiceRecord, _>(&t, &service_key(ns, &req.name)).map_err(internal)?
        else {
            return Err(Status::not_found(format!("service {ns}/{} not found", req.name)));
        };
        let mut revisions = vec![pb::ServiceRevision {
            generation: cur.meta.generation,
            spec_json: serde_json::to_string(&cur.spec).map_err(internal)?,
            replaced_at_ms: 0,
            spec_hash: cur.meta.spec_hash.clone(),
        }];
        for r in service_history(&t, ns, &req.name).map_err(internal)? {
            revisions.push(pb::ServiceRevision {
                generation: r.generation,
                spec_json: serde_json::to_string(&r.spec).map_err(internal)?,
                replaced_at_ms: r.replaced_at_ms,
                spec_hash: r.spec_hash,
            });
        }
        Ok(Response::new(pb::ServiceHistoryResponse { revisions }))
    }

    async fn rollback(
        &self,
        req: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::ServiceChangeResponse>, Status> {
        self.rollback_(req).await
    }

    async fn list_releases(
        &self,
        req: Request<pb::ListReleasesRequest>,
    ) -> Result<Response<pb::ListReleasesResponse>, Status> {
        self.list_releases_(req).await
    }

    async fn get_release(&self, req: Request<pb::ReleaseRef>) -> Result<Response<pb::Release>, Status> {
        self.get_release_(req).await
    }

    async fn delete_release(
        &self,
        req: Request<pb::DeleteReleaseRequest>,
    ) -> Result<Response<pb::DeleteReleaseResponse>, Status> {
        self.delete_release_(req).await
    }
}

#[tonic::async_trait]
impl pb::namespace_api_server::NamespaceApi for Api {
    async fn list_namespaces(
        &self,
        req: Request<pb::ListNamespacesRequest>,
    ) -> Result<Response<pb::ListNamespacesResponse>, Status> {
        authorize(&req, "namespaces", "list", None)?;
        let req = req.into_inner();
        let q = PageQuery::new("namespaces", "namespaces/", req.limit, &req.continue_token)?;
        let txn = self.log.read().map_err(internal)?;
        let t = txn.open_table(STATE_TABLE).map_err(internal)?;
        let (recs, continue_token) = q.read(&t, |_: &NamespaceRecord| true)?;
        Ok(Response::new(pb::ListNamespacesResponse {
            namespaces: recs.iter().map(namespace_pb).collect(),
            continue_token,
        }))
    }

    async fn get_namespace(
        &self,
        req: Request<pb::GetNamespaceRequest>,
    ) -> Result<Response<pb::Namespace>, Status> {
        authorize(&req, "namespaces", "get", Some(&req.get_ref().name))?;
        let name = req.into_inner().name;
        let txn = self.log.read().map_err(internal)?;
        let t = txn.open_table(STATE_TABLE).map_err(internal)?;
        match get_record::<NamespaceRecord, _>(&t, &namespace_key(&name)).map_err(internal)? {
            Some(r) => Ok(Response::new(namespace_pb(&r))),
            None => Err(Status::not_found(format!("namespace {name} not found"))),
        }
    }

    async fn delete_namespace(
        &self,
        req: Request<pb::DeleteNamespaceRequest>,
    ) -> Result<Response<pb::DeleteNamespaceResponse>, Status> {
        authorize(&req, "namespaces", "delete", Some(&req.get_ref().name))?;
        let name = req.into_inner().name;
        if name.is_empty() {
            return Err(Status::invalid_argument("name: is required"));
        }
        let p = self
            .log
            .propose(Command::DeleteNamespace { name })
            .await
            .map_err(not_proposed)?;
        p.outcome.map_err(rejection)?;
        Ok(Response::new(pb::DeleteNamespaceResponse { index: p.index }))
    }

    type WatchNamespacesStream = Stream_<pb::NamespaceEvent>;

    async fn watch_namespaces(
        &self,
        req: Request<pb::WatchNamespacesRequest>,
    ) -> Result<Response<Self::WatchNamespacesStream>, Status> {
        let caller = authorize(&req, "namespaces", "watch", None)?;
        let mut rx = self.log.subscribe();
        let (initial, index): (Vec<NamespaceRecord>, u64) = {
            let (txn, index) = self.log.read_indexed().map_err(internal)?;
            let t = txn.open_table(STATE_TABLE).map_err(internal)?;
            (list_records(&t, "namespaces/").map_err(internal)?, index)
        };
        let (tx, out) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            for r in &initial {
                let ev = pb::NamespaceEvent {
                    r#type: pb::EventType::Added as i32,
                    namespace: Some(namespace_pb(r)),
                    index,
                };
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            // Entries the list already holds are skipped, and one that falls behind is told so,
            // as every other watch does.
            while let Some(entry) = next_entry(&mut rx, &tx, index).await {
                for c in entry
                    .changes
                    .iter()
                    .filter(|c| c.kind == Kind::Namespace && c.action != Action::Unchanged)
                {
                    // The record as this entry wrote it, not as the state is by now: a
                    // namespace created and deleted at once is still seen ADDED first.
                    let written = entry.deltas.iter().find_map(|d| match d {
                        Delta::Namespace { name, record } if *name == c.name => Some(record),
                        _ => None,
                    });
                    let ns = match written {
                        Some(Some(r)) => namespace_pb(r),
                        _ if c.action == Action::Deleted => pb::Namespace {
                            name: c.name.clone(),
                            ..Default::default()
                        },
                        _ => continue,
                    };
                    let ty = match c.action {
                        Action::Created => pb::EventType::Added,
                        Action::Deleted => pb::EventType::Deleted,
                        _ => pb::EventType::Modified,
                    };
                    if tx
                        .send(Ok(pb::NamespaceEvent {
                            r#type: ty as i32,
                            namespace: Some(ns),
                            index: entry.index,
                        }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(crate::auth::until_token_ends(
            self.log.clone(),
            &caller,
            Box::pin(tokio_stream::wrappers::ReceiverStream::new(out)),
            Vec::new(),
        )))
    }
}

#[tonic::async_trait]
impl pb::system_api_server::SystemApi for Api {
    async fn version(
        &self,
        req: Request<pb::VersionRequest>,
    ) -> Result<Response<pb::VersionResponse>, Status> {
        crate::auth::caller(&req)?;
        let (term, _, applied) = self.log.positions();
        Ok(Response::new(pb::VersionResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            commit: option_env!("RUNE_GIT_COMMIT").unwrap_or("unknown").into(),
            applied_index: applied,
            term,
            grpc_port: u32::from(self.grpc_port),
        }))
    }
}
