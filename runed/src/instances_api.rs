//! The instance API: list and watch instances, scale, restart, rollout status, dependencies,
//! logs and exec. Writes go through the log; logs, exec and live probe results come from the
//! orchestrator on this node.

use crate::auth::authorize;
use crate::paging::PageQuery;
use std::collections::{HashMap, HashSet};

use futures::StreamExt;
use rune_orchestrator::{ExecInput, ExecOutput, ExecSpec, LogQuery, OrchestratorError};
use rune_proto::v1 as pb;
use rune_statemachine::delta::Delta;
use rune_statemachine::deps::{resolve, DepKind, ReadyWhen};
use rune_statemachine::instance::{instance_key, instances_prefix, template_hash, InstanceRecord, Phase};
use rune_statemachine::store::{
    configmap_key, get_record, list_records, secret_key, service_key, services_prefix, ServiceRecord,
};
use rune_statemachine::{Action, Command, Kind, STATE_TABLE};
use tonic::{Request, Response, Status, Streaming};

use crate::api::{Api, Stream_};
use crate::grpc::{internal, namespace_or_default, not_proposed, rejection, scope};

/// How long an instance without a readiness probe must run before a rollout counts it.
const MIN_READY_MS: i64 = 1000;

/// Each service's template hash by (namespace, name); none once it is gone.
type Templates = HashMap<(String, String), Option<String>>;

fn orch_status(e: OrchestratorError) -> Status {
    match e {
        OrchestratorError::NotFound(m) => Status::not_found(m),
        OrchestratorError::FailedPrecondition(m) => Status::failed_precondition(m),
        OrchestratorError::Run(e) => Status::unavailable(e.to_string()),
    }
}

fn probe_pb(r: &InstanceRecord, live: Option<&rune_orchestrator::InstanceHealth>) -> Vec<pb::ProbeState> {
    let mut names: Vec<String> = r.probes.keys().cloned().collect();
    if let Some(l) = live {
        for k in l.probes.keys() {
            if !names.contains(k) {
                names.push(k.clone());
            }
        }
    }
    names
        .into_iter()
        .map(|n| {
            let rec = r.probes.get(&n);
            let l = live.and_then(|l| l.probes.get(&n));
            let state = match (l.and_then(|l| l.ok), rec.map(|p| p.ok)) {
                (Some(true), _) | (None, Some(true)) => "passing",
                (Some(false), _) | (None, Some(false)) => "failing",
                (None, None) => "unknown",
            };
            pb::ProbeState {
                name: n.clone(),
                state: state.into(),
                message: rec.map(|p| p.message.clone()).unwrap_or_default(),
                since_ms: rec.map(|p| p.since_ms).unwrap_or_default(),
                last_result: l
                    .map(|l| format!("{}: {}", if l.last_ok { "ok" } else { "failed" }, l.last_message))
                    .unwrap_or_default(),
                last_at_ms: l.map(|l| l.last_at_ms).unwrap_or_default(),
            }
        })
        .collect()
}

fn instance_pb(
    r: &InstanceRecord,
    current: bool,
    live: Option<&rune_orchestrator::InstanceHealth>,
) -> pb::Instance {
    pb::Instance {
        namespace: r.namespace.clone(),
        service: r.service.clone(),
        id: r.id.clone(),
        node: r.node.clone(),
        runtime: r.runtime.clone(),
        status: r.phase.as_str().into(),
        ready: r.ready,
        reason: r.reason.clone(),
        exit_code: r.exit_code,
        restarts: r.restarts,
        address: r.address.clone(),
        runtime_id: r.runtime_id.clone(),
        generation: r.generation,
        template: r.template.clone(),
        created_at_ms: r.created_at_ms,
        started_at_ms: r.started_at_ms,
        updated_at_ms: r.updated_at_ms,
        probes: probe_pb(r, live),
        current,
    }
}

/// The service an instance id belongs to: `api-0` → `api`.
fn service_of(id: &str) -> &str {
    id.rsplit_once('-').map_or(id, |(s, _)| s)
}

/// `[rune] api-0 CrashLoopBackOff: exited with code 1: ...` for an instance that is not running
/// as it should, told in its log stream; `None` for one that is fine.
fn story_line(r: &InstanceRecord) -> Option<pb::LogChunk> {
    let bad = matches!(
        r.phase,
        Phase::Failed | Phase::Backoff | Phase::Waiting | Phase::Unhealthy
    );
    (bad && !r.reason.is_empty()).then(|| pb::LogChunk {
        instance: r.id.clone(),
        data: format!("[rune] {} {}: {}\n", r.id, r.phase.as_str(), r.reason).into_bytes(),
    })
}

/// An instance's log bytes as the chunks the API streams.
fn chunks(id: String, s: rune_orchestrator::LogStream) -> Stream_<pb::LogChunk> {
    s.map(move |b| match b {
        Ok(data) => Ok(pb::LogChunk {
            instance: id.clone(),
            data: data.to_vec(),
        }),
        Err(e) => Err(Status::unavailable(e.to_string())),
    })
    .boxed()
}

impl Api {
    /// Follows every instance of a service, and each one that starts later (scaled up, or
    /// replaced by a rollout or a restart) from its start, until the client leaves.
    fn follow_service(
        &self,
        ns: String,
        service: String,
        q: LogQuery,
        initial: Vec<InstanceRecord>,
    ) -> Stream_<pb::LogChunk> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::LogChunk, Status>>(64);
        let (log, orch) = (self.log.clone(), self.orchestrator.clone());
        let mut events = log.subscribe();
        tokio::spawn(async move {
            // Per instance: the run being followed (its runtime id), the task following it, and
            // the last story told.
            let mut followed: std::collections::HashMap<String, (String, tokio::task::JoinHandle<()>)> =
                Default::default();
            let mut told: std::collections::HashMap<String, String> = Default::default();
            let follow = |r: &InstanceRecord, q: LogQuery| {
                let (tx, orch, r) = (tx.clone(), orch.clone(), r.clone());
                tokio::spawn(async move {
                    let Ok(mut s) = orch.logs(&r, &q).await else {
                        return;
                    };
                    while let Some(Ok(data)) = s.next().await {
                        let chunk = pb::LogChunk {
                            instance: r.id.clone(),
                            data: data.to_vec(),
                        };
                        if tx.send(Ok(chunk)).await.is_err() {
                            return;
                        }
                    }
                })
            };
            let mut recs = initial;
            let mut first = true;
            loop {
                for r in &recs {
                    if let Some(line) = story_line(r) {
                        let said = String::from_utf8_lossy(&line.data).into_owned();
                        if told.get(&r.id) != Some(&said) {
                            told.insert(r.id.clone(), said);
                            if tx.send(Ok(line)).await.is_err() {
                                return;
                            }
                        }
                    }
                    if r.runtime_id.is_empty() {
                        continue;
                    }
                    // A process keeps its log file across restarts (the follow goes on); a new
                    // container is a new log.
                    let same = followed.get(&r.id).is_some_and(|(rid, h)| {
                        !h.is_finished() && (r.runtime == "process" || *rid == r.runtime_id)
                    });
                    if !same {
                        let q = if first {
                            q.clone()
                        } else {
                            LogQuery {
                                follow: true,
                                tail: 0,
                                since_s: (r.started_at_ms / 1000 - 1).max(0),
                                timestamps: q.timestamps,
                            }
                        };
                        if let Some((_, old)) =
                            followed.insert(r.id.clone(), (r.runtime_id.clone(), follow(r, q)))
                        {
                            old.abort();
                        }
                    }
                }
                first = false;
                // Wait for a change of this service's instances (or the client to leave).
                let changed = loop {
                    tokio::select! {
                        e = events.recv() => match e {
                            Ok(entry) => {
                                if entry.changes.iter().any(|c| {
                                    c.kind == Kind::Instance && c.namespace == ns && service_of(&c.name) == service
                                }) {
                                    break true;
                                }
                            }
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break true,
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => break false,
                        },
                        () = tx.closed() => break false,
                    }
                };
                if !changed {
                    break;
                }
                recs = match log.read().map_err(|e| e.to_string()).and_then(|txn| {
                    let t = txn.open_table(STATE_TABLE).map_err(|e| e.to_string())?;
                    list_records(&t, &instances_prefix(Some(&ns), Some(&service))).map_err(|e| e.to_string())
                }) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(e))).await;
                        break;
                    }
                };
                // Instances that are gone (scaled down, deleted) stop being followed.
                followed.retain(|id, (_, h)| {
                    let keep = recs.iter().any(|r| &r.id == id);
                    if !keep {
                        h.abort();
                    }
                    keep
                });
            }
            for (_, (_, h)) in followed {
                h.abort();
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    fn read_service(&self, ns: &str, name: &str) -> Result<ServiceRecord, Status> {
        let txn = self.log.read().map_err(internal)?;
        let t = txn.open_table(STATE_TABLE).map_err(internal)?;
        get_record::<ServiceRecord, _>(&t, &service_key(ns, name))
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("service {ns}/{name} not found")))
    }

    fn read_instances(&self, ns: Option<&str>, service: Option<&str>) -> Result<Vec<InstanceRecord>, Status> {
        let txn = self.log.read().map_err(internal)?;
        let t = txn.open_table(STATE_TABLE).map_err(internal)?;
        list_records(&t, &instances_prefix(ns, service)).map_err(internal)
    }

    /// The instances of `ns` (every namespace when none), each with whether it runs its
    /// service's current template, those services' templates, and the applied index all of it
    /// is the state at.
    fn instances_pb(&self, ns: Option<&str>) -> Result<(Vec<pb::Instance>, Templates, u64), Status> {
        let (txn, index) = self.log.read_indexed().map_err(internal)?;
        let t = txn.open_table(STATE_TABLE).map_err(internal)?;
        let recs: Vec<InstanceRecord> = list_records(&t, &instances_prefix(ns, None)).map_err(internal)?;
        let mut templates = Templates::new();
        let list = self.with_templates_in(&t, &recs, &mut templates)?;
        Ok((list, templates, index))
    }

    /// The template of `ns/svc` in the latest state.
    fn template_now(&self, ns: &str, svc: &str) -> Option<String> {
        let txn = self.log.read().ok()?;
        let t = txn.open_table(STATE_TABLE).ok()?;
        let rec = get_record::<ServiceRecord, _>(&t, &service_key(ns, svc)).ok()??;
        Some(template_hash(&rec.spec, &rec.meta))
    }

    /// Instances as sent, with whether each runs its service's current template (each service
    /// is read once, so the cost follows the records asked for, not the whole state).
    fn with_templates(
        &self,
        t: &redb::ReadOnlyTable<&'static str, &'static [u8]>,
        recs: &[InstanceRecord],
    ) -> Result<Vec<pb::Instance>, Status> {
        self.with_templates_in(t, recs, &mut Templates::new())
    }

    /// [`Self::with_templates`], keeping the services' templates it read in `templates`.
    fn with_templates_in(
        &self,
        t: &redb::ReadOnlyTable<&'static str, &'static [u8]>,
        recs: &[InstanceRecord],
        templates: &mut Templates,
    ) -> Result<Vec<pb::Instance>, Status> {
        let live = self.orchestrator.health_all();
        let mut out = Vec::with_capacity(recs.len());
        for r in recs {
            let key = (r.namespace.clone(), r.service.clone());
            if !templates.contains_key(&key) {
                let svc = get_record::<ServiceRecord, _>(t, &service_key(&r.namespace, &r.service))
                    .map_err(internal)?;
                templates.insert(key.clone(), svc.map(|s| template_hash(&s.spec, &s.meta)));
            }
            let current = templates
                .get(&key)
                .and_then(|t| t.as_ref())
                .is_some_and(|t| *t == r.template);
            let l = live.get(&(r.namespace.clone(), r.id.clone()));
            out.push(instance_pb(r, current, l));
        }
        Ok(out)
    }

    async fn change(&self, cmd: Command) -> Result<pb::ServiceChangeResponse, Status> {
        let p = self.log.propose(cmd).await.map_err(not_proposed)?;
        let changes = p.outcome.map_err(rejection)?;
        let c = changes
            .into_iter()
            .next()
            .ok_or_else(|| Status::internal("the change reported nothing"))?;
        Ok(pb::ServiceChangeResponse {
            index: p.index,
            generation: c.generation,
            changed: c.action != Action::Unchanged,
            summary: c.summary,
        })
    }

    /// The output of an init step's last run in each instance picked.
    async fn init_step_logs(
        &self,
        caller: &crate::auth::Caller,
        step: &str,
        recs: &[InstanceRecord],
        q: &LogQuery,
    ) -> Result<Response<Stream_<pb::LogChunk>>, Status> {
        let mut streams = Vec::new();
        for r in recs {
            let Some(s) = self
                .orchestrator
                .init_step_logs(r, step, q)
                .await
                .map_err(orch_status)?
            else {
                continue;
            };
            streams.push(chunks(r.id.clone(), s));
        }
        if streams.is_empty() {
            return Err(Status::not_found(format!(
                "init step '{step}' has not run in any of these instances (is it named in initSteps?)"
            )));
        }
        Ok(Response::new(crate::auth::until_token_ends(
            self.log.clone(),
            caller,
            Box::pin(futures::stream::select_all(streams)),
            Vec::new(),
        )))
    }

    /// The instance a logs or exec request names, or all of the service's.
    fn pick(&self, ns: &str, service: &str, instance: &str) -> Result<Vec<InstanceRecord>, Status> {
        if !instance.is_empty() {
            let svc = if service.is_empty() {
                service_of(instance)
            } else {
                service
            };
            let txn = self.log.read().map_err(internal)?;
            let t = txn.open_table(STATE_TABLE).map_err(internal)?;
            return match get_record::<InstanceRecord, _>(&t, &instance_key(ns, svc, instance))
                .map_err(internal)?
            {
                Some(r) => Ok(vec![r]),
                None => Err(Status::not_found(format!("instance {ns}/{instance} not found"))),
            };
        }
        self.read_service(ns, service)?;
        self.read_instances(Some(ns), Some(service))
    }
}

#[tonic::async_trait]
impl pb::instance_api_server::InstanceApi for Api {
    async fn list_instances(
        &self,
        req: Request<pb::ListInstancesRequest>,
    ) -> Result<Response<pb::ListInstancesResponse>, Status> {
        authorize(
            &req,
            "instances",
            "list",
            scope(&req.get_ref().namespace).as_deref(),
        )?;
        let req = req.into_inner();
        let ns = scope(&req.namespace);
        let svc = (!req.service.is_empty()).then_some(req.service.as_str());
        if let (Some(ns), Some(s)) = (ns.as_deref(), svc) {
            self.read_service(ns, s)?;
        }
        let q = PageQuery::new(
            "instances",
            instances_prefix(ns.as_deref(), svc.filter(|_| ns.is_some())),
            req.limit,
            &req.continue_token,
        )?;
        let (txn, index) = self.log.read_indexed().map_err(internal)?;
        let t = txn.open_table(STATE_TABLE).map_err(internal)?;
        let (recs, continue_token) = q.read(&t, |r: &InstanceRecord| svc.is_none_or(|s| r.service == s))?;
        let instances = self.with_templates(&t, &recs)?;
        Ok(Response::new(pb::ListInstancesResponse {
            instances,
            index,
            continue_token,
        }))
    }

    type WatchInstancesStream = Stream_<pb::InstanceWatchEvent>;

    async fn watch_instances(
        &self,
        req: Request<pb::WatchInstancesRequest>,
    ) -> Result<Response<Self::WatchInstancesStream>, Status> {
        let caller = authorize(
            &req,
            "instances",
            "watch",
            scope(&req.get_ref().namespace).as_deref(),
        )?;
        let req = req.into_inner();
        let ns = scope(&req.namespace);
        let svc = req.service.clone();
        // Subscribe before listing, so nothing applied in between is missed.
        let mut rx = self.log.subscribe();
        let (initial, mut templates, index) = self.instances_pb(ns.as_deref())?;
        let api = self.clone();
        let (tx, out) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            let wanted =
                |n: &str, s: &str| ns.as_deref().is_none_or(|x| x == n) && (svc.is_empty() || s == svc);
            // What this watcher was shown: a record it never saw is ADDED, one it saw MODIFIED.
            let mut shown: HashSet<(String, String)> = HashSet::new();
            for i in initial.into_iter().filter(|i| wanted(&i.namespace, &i.service)) {
                shown.insert((i.namespace.clone(), i.id.clone()));
                let ev = pb::InstanceWatchEvent {
                    r#type: pb::EventType::Added as i32,
                    instance: Some(i),
                    index,
                };
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            loop {
                let Some(entry) = crate::api::next_entry(&mut rx, &tx, index).await else {
                    return;
                };
                // Each delta holds the record as this entry wrote it: the instance as of this
                // index, at the cost of what changed (not a read of its service's instances).
                // Services first, so an instance started on a template this entry cast is
                // shown as current.
                for d in &entry.deltas {
                    if let Delta::Service {
                        namespace,
                        name,
                        record,
                    } = d
                    {
                        if wanted(namespace, name) {
                            let t = record.as_ref().map(|r| template_hash(&r.spec, &r.meta));
                            templates.insert((namespace.clone(), name.clone()), t);
                        }
                    }
                }
                for d in &entry.deltas {
                    let Delta::Instance {
                        namespace,
                        service,
                        id,
                        record,
                    } = d
                    else {
                        continue;
                    };
                    if !wanted(namespace, service) {
                        continue;
                    }
                    let key = (namespace.clone(), id.clone());
                    let (ty, instance) = match record {
                        None => {
                            if !shown.remove(&key) {
                                continue;
                            }
                            let gone = pb::Instance {
                                namespace: namespace.clone(),
                                service: service.clone(),
                                id: id.clone(),
                                status: "Removed".into(),
                                ..Default::default()
                            };
                            (pb::EventType::Deleted, gone)
                        }
                        Some(r) => {
                            // A service this watcher has not met is read as it is now, once.
                            let template = templates
                                .entry((namespace.clone(), service.clone()))
                                .or_insert_with(|| api.template_now(namespace, service));
                            let current = template.as_ref().is_some_and(|t| *t == r.template);
                            let live = api.orchestrator.health(namespace, service, id);
                            let ty = if shown.insert(key) {
                                pb::EventType::Added
                            } else {
                                pb::EventType::Modified
                            };
                            (ty, instance_pb(r, current, live.as_ref()))
                        }
                    };
                    let ev = pb::InstanceWatchEvent {
                        r#type: ty as i32,
                        instance: Some(instance),
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

    async fn scale(
        &self,
        req: Request<pb::ScaleRequest>,
    ) -> Result<Response<pb::ServiceChangeResponse>, Status> {
        authorize(
            &req,
            "services",
            "scale",
            Some(namespace_or_default(&req.get_ref().namespace)),
        )?;
        let req = req.into_inner();
        if req.name.is_empty() {
            return Err(Status::invalid_argument("name: is required"));
        }
        let max = rune_statemachine::validate::MAX_SCALE;
        if i64::from(req.scale) > max {
            return Err(Status::invalid_argument(format!(
                "scale: {} is above the limit of {max}",
                req.scale
            )));
        }
        let ns = namespace_or_default(&req.namespace).to_string();
        let r = self
            .change(Command::Scale {
                namespace: ns,
                name: req.name,
                scale: req.scale,
            })
            .await?;
        Ok(Response::new(r))
    }

    async fn restart(
        &self,
        req: Request<pb::RestartRequest>,
    ) -> Result<Response<pb::ServiceChangeResponse>, Status> {
        authorize(
            &req,
            "services",
            "scale",
            Some(namespace_or_default(&req.get_ref().namespace)),
        )?;
        let req = req.into_inner();
        if req.name.is_empty() {
            return Err(Status::invalid_argument("name: is required"));
        }
        let ns = namespace_or_default(&req.namespace).to_string();
        let r = self
            .change(Command::Restart {
                namespace: ns,
                name: req.name,
            })
            .await?;
        Ok(Response::new(r))
    }

    async fn rollout(&self, req: Request<pb::RolloutRequest>) -> Result<Response<pb::RolloutStatus>, Status> {
        authorize(
            &req,
            "services",
            "get",
            Some(namespace_or_default(&req.get_ref().namespace)),
        )?;
        let req = req.into_inner();
        let ns = namespace_or_default(&req.namespace);
        let svc = self.read_service(ns, &req.name)?;
        let current = template_hash(&svc.spec, &svc.meta);
        let recs = self.read_instances(Some(ns), Some(&req.name))?;
        let desired = u32::try_from(svc.spec.scale().max(0)).unwrap_or(0);
        let updated: Vec<&InstanceRecord> = recs.iter().filter(|r| r.template == current).collect();
        // Without a readiness probe, "ready" only means "started": an instance counts once it
        // has stayed up for MIN_READY, so a command that crashes at once never passes.
        let now = rune_log::now_ms();
        let ready = updated
            .iter()
            .filter(|r| {
                r.phase == Phase::Running
                    && r.ready
                    && (r.probes.contains_key("readiness") || now - r.started_at_ms >= MIN_READY_MS)
            })
            .count() as u32;
        let problems = recs
            .iter()
            .filter(|r| {
                matches!(
                    r.phase,
                    Phase::Failed | Phase::Backoff | Phase::Waiting | Phase::Unhealthy
                )
            })
            .map(|r| format!("{} {}: {}", r.id, r.phase.as_str(), r.reason))
            .collect();
        let skip = svc.spec.skip == Some(true);
        Ok(Response::new(pb::RolloutStatus {
            desired,
            updated: updated.len() as u32,
            ready,
            problems,
            done: skip || (ready == desired && recs.len() as u32 == desired),
            generation: svc.meta.generation,
            instances: recs.len() as u32,
        }))
    }

    async fn dependencies(
        &self,
        req: Request<pb::DependenciesRequest>,
    ) -> Result<Response<pb::DependenciesResponse>, Status> {
        let caller = authorize(
            &req,
            "services",
            "get",
            Some(namespace_or_default(&req.get_ref().namespace)),
        )?;
        let req = req.into_inner();
        let ns = namespace_or_default(&req.namespace);
        let svc = self.read_service(ns, &req.name)?;
        // What another namespace holds (or a secret the caller may not get) is told only to a
        // caller who may read it there.
        let may_get =
            |resource: &str, ns: &str| crate::auth::check(&caller, resource, "get", Some(ns)).is_ok();
        let txn = self.log.read().map_err(internal)?;
        let t = txn.open_table(STATE_TABLE).map_err(internal)?;
        let all: Vec<ServiceRecord> = list_records(&t, &services_prefix(None)).map_err(internal)?;
        let records: Vec<InstanceRecord> =
            list_records(&t, &instances_prefix(None, None)).map_err(internal)?;
        let mut deps = Vec::new();
        for d in resolve(&svc.spec) {
            let (resource, key) = match d.kind {
                DepKind::Service => ("services", None),
                DepKind::Secret => ("secrets", Some(secret_key(&d.namespace, &d.name))),
                DepKind::Configmap => ("configmaps", Some(configmap_key(&d.namespace, &d.name))),
            };
            let hidden = !may_get(resource, &d.namespace);
            let exists = !hidden
                && match &key {
                    None => all
                        .iter()
                        .any(|s| s.spec.namespace() == d.namespace && s.spec.name == d.name),
                    Some(k) => t.get(k.as_str()).map_err(internal)?.is_some(),
                };
            // A secret or configmap is ready once it exists.
            let ready = key.is_some()
                || records
                    .iter()
                    .filter(|r| r.namespace == d.namespace && r.service == d.name)
                    .any(|r| match d.ready_when {
                        ReadyWhen::Started => r.started_at_ms > 0 || r.phase == Phase::Running,
                        ReadyWhen::Running => matches!(r.phase, Phase::Running | Phase::Unhealthy),
                        ReadyWhen::Healthy => r.phase == Phase::Running && r.ready,
                    });
            deps.push(pb::DependencyEdge {
                kind: match d.kind {
                    DepKind::Service => "service",
                    DepKind::Secret => "secret",
                    DepKind::Configmap => "configmap",
                }
                .into(),
                namespace: d.namespace.clone(),
                name: d.name.clone(),
                ready_when: match d.ready_when {
                    ReadyWhen::Started => "started",
                    ReadyWhen::Running => "running",
                    ReadyWhen::Healthy => "healthy",
                }
                .into(),
                optional: d.optional,
                exists,
                ready: exists && ready,
                hidden,
            });
        }
        let dependents = all
            .iter()
            .filter(|s| may_get("services", s.spec.namespace()))
            .filter(|s| {
                resolve(&s.spec)
                    .iter()
                    .any(|d| d.kind == DepKind::Service && d.namespace == ns && d.name == req.name)
            })
            .map(|s| format!("{}/{}", s.spec.namespace(), s.spec.name))
            .collect();
        Ok(Response::new(pb::DependenciesResponse {
            dependencies: deps,
            dependents,
        }))
    }

    type LogsStream = Stream_<pb::LogChunk>;

    async fn logs(&self, req: Request<pb::LogsRequest>) -> Result<Response<Self::LogsStream>, Status> {
        let caller = authorize(
            &req,
            "logs",
            "get",
            Some(namespace_or_default(&req.get_ref().namespace)),
        )?;
        let req = req.into_inner();
        if req.service.is_empty() && req.instance.is_empty() {
            return Err(Status::invalid_argument("service: name a service or an instance"));
        }
        let ns = namespace_or_default(&req.namespace).to_string();
        let recs = self.pick(&ns, &req.service, &req.instance)?;
        let q = LogQuery {
            follow: req.follow,
            tail: req.tail,
            since_s: if req.since_seconds > 0 {
                rune_log::now_ms() / 1000 - req.since_seconds
            } else {
                0
            },
            timestamps: req.timestamps,
        };
        if !req.init_step.is_empty() {
            // A step's name becomes part of a file and a container name: only a name a spec
            // can give a step (a DNS label) gets that far.
            if let Err(e) = rune_statemachine::validate::dns1123_label(&req.init_step) {
                return Err(Status::invalid_argument(format!("init_step: {e}")));
            }
            return self.init_step_logs(&caller, &req.init_step, &recs, &q).await;
        }
        if req.follow && req.instance.is_empty() {
            // Following a service follows the service: replaced and added instances join.
            let stream = self.follow_service(ns, req.service.clone(), q, recs);
            return Ok(Response::new(crate::auth::until_token_ends(
                self.log.clone(),
                &caller,
                stream,
                Vec::new(),
            )));
        }
        let mut streams = Vec::new();
        for r in &recs {
            // Why an instance is not running is part of its story: say it first.
            if let Some(chunk) = story_line(r) {
                streams.push(futures::stream::once(async move { Ok(chunk) }).boxed());
            }
            let s = self.orchestrator.logs(r, &q).await.map_err(orch_status)?;
            streams.push(chunks(r.id.clone(), s));
        }
        let merged = futures::stream::select_all(streams);
        Ok(Response::new(crate::auth::until_token_ends(
            self.log.clone(),
            &caller,
            Box::pin(merged),
            Vec::new(),
        )))
    }

    async fn list_volumes(
        &self,
        req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let all = req.get_ref().all_namespaces;
        let ns = namespace_or_default(&req.get_ref().namespace).to_string();
        authorize(
            &req,
            "volumes",
            "list",
            if all { None } else { Some(ns.as_str()) },
        )?;
        let volumes = self
            .orchestrator
            .volumes()
            .await
            .map_err(orch_status)?
            .into_iter()
            .filter(|v| all || v.namespace == ns)
            .map(|v| pb::Volume {
                name: v.name(),
                namespace: v.namespace,
                service: v.service,
                instance: v.instance,
                claim: v.claim,
                requested_size: v.requested_size,
                usage_bytes: v.usage_bytes.and_then(|b| i64::try_from(b).ok()).unwrap_or(-1),
                in_use: !v.users.is_empty(),
                storage_class: v.storage_class,
                engine_name: v.engine_name,
            })
            .collect();
        Ok(Response::new(pb::ListVolumesResponse { volumes }))
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let ns = namespace_or_default(&req.get_ref().namespace).to_string();
        authorize(&req, "volumes", "delete", Some(&ns))?;
        let name = &req.get_ref().name;
        if name.is_empty() {
            return Err(Status::invalid_argument(
                "name: which volume (see rune volume list)",
            ));
        }
        self.orchestrator
            .delete_volume(&ns, name)
            .await
            .map_err(orch_status)?;
        tracing::info!(namespace = %ns, volume = %name, "volume deleted");
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    type ExecStream = Stream_<pb::ExecResponse>;

    async fn exec(
        &self,
        req: Request<Streaming<pb::ExecRequest>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let caller = crate::auth::caller(&req)?;
        let mut input = req.into_inner();
        let first = input
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("exec: no start message"))?;
        let Some(pb::exec_request::Msg::Start(start)) = first.msg else {
            return Err(Status::invalid_argument("exec: the first message must be start"));
        };
        if start.command.is_empty() {
            return Err(Status::invalid_argument("command: is required"));
        }
        let ns = namespace_or_default(&start.namespace).to_string();
        crate::auth::check(&caller, "exec", "exec", Some(&ns))?;
        let recs = self.pick(&ns, &start.service, &start.instance)?;
        let rec = recs
            .iter()
            .find(|r| matches!(r.phase, Phase::Running | Phase::Unhealthy))
            .or(recs.first())
            .cloned()
            .ok_or_else(|| {
                Status::failed_precondition(format!("service {ns}/{} has no instances", start.service))
            })?;
        let spec = ExecSpec {
            command: start.command.clone(),
            tty: start.tty,
            cols: u16::try_from(start.cols).unwrap_or(80),
            rows: u16::try_from(start.rows).unwrap_or(24),
        };
        let (in_tx, mut out_rx) = self.orchestrator.exec(&rec, &spec).await.map_err(orch_status)?;
        tracing::info!(instance = %rec.id, namespace = %ns, command = ?start.command, tty = start.tty, "exec");
        let reader = tokio::spawn(async move {
            while let Ok(Some(m)) = input.message().await {
                let i = match m.msg {
                    Some(pb::exec_request::Msg::Stdin(b)) => ExecInput::Stdin(b.into()),
                    Some(pb::exec_request::Msg::Resize(r)) => ExecInput::Resize {
                        cols: u16::try_from(r.cols).unwrap_or(80),
                        rows: u16::try_from(r.rows).unwrap_or(24),
                    },
                    Some(pb::exec_request::Msg::StdinEof(_)) => ExecInput::Eof,
                    _ => continue,
                };
                if in_tx.send(i).await.is_err() {
                    return;
                }
            }
            let _ = in_tx.send(ExecInput::Eof).await;
        });
        let (tx, out) = tokio::sync::mpsc::channel(64);
        let id = rec.id.clone();
        let writer = tokio::spawn(async move {
            let hello = pb::ExecResponse {
                msg: Some(pb::exec_response::Msg::Instance(id)),
            };
            if tx.send(Ok(hello)).await.is_err() {
                return;
            }
            while let Some(o) = out_rx.recv().await {
                let msg = match o {
                    ExecOutput::Stdout(b) => pb::exec_response::Msg::Stdout(b.to_vec()),
                    ExecOutput::Stderr(b) => pb::exec_response::Msg::Stderr(b.to_vec()),
                    ExecOutput::Exit(c) => pb::exec_response::Msg::ExitCode(c),
                };
                if tx.send(Ok(pb::ExecResponse { msg: Some(msg) })).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(crate::auth::until_token_ends(
            self.log.clone(),
            &caller,
            Box::pin(tokio_stream::wrappers::ReceiverStream::new(out)),
            vec![reader.abort_handle(), writer.abort_handle()],
        )))
    }
}
