//! The orchestrator: keeps each service's instances running as declared, as a projection of the log.
//!
//! - [`Orchestrator`] owns the reconcile loop, a keyed work queue as Kubernetes controllers
//!   have: a projection of the log ([`rune_log::projection`]) keeps the desired state
//!   (services) and the observed state (instance records) and enqueues each service an entry
//!   touched; the loop reconciles only those (plus a slice of all services per resync tick),
//!   comparing them with the supervisors it runs, and starts, stops or replaces instances (one
//!   at a time for rollouts). A view that cannot be read is kept as it was: nothing is stopped
//!   because a read failed.
//! - [`supervisor`] runs one instance: dependencies, start, probes, restart policy and backoff.
//! - [`runner`] talks to Docker (bollard) or starts host processes.
//!
//! Invariant: the orchestrator never writes the state tables. Everything it observes goes to the
//! log as `InstanceEvents`, in the order it happened, through one reporter task.

pub mod inject;
pub mod logfile;
pub mod probe;
pub mod registry;
pub mod runner;
mod supervisor;

pub use inject::SecretSource;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};

use rune_log::projection::{Projection, ProjectionError, View};
use rune_log::Log;
use rune_statemachine::delta::Delta;
use rune_statemachine::instance::{template_hash, InstanceChange, InstanceEvent, InstanceRecord, Phase};
use rune_statemachine::spec::ServiceSpec;
use rune_statemachine::store::ServiceRecord;
use rune_statemachine::{Command, STATE_TABLE};
use tokio::sync::{mpsc, oneshot, Notify};

use runner::{docker::DockerRunner, process::ProcessRunner, Exit, Found, Launch, Run, RunHandle};
pub use runner::{ExecInput, ExecOutput, ExecSpec, LogQuery, LogStream, RunError};

/// `(namespace, service, instance id)`.
pub type Key = (String, String, String);

/// `(namespace, service)`: what the work queue holds.
pub type SvcId = (String, String);

/// Reports waiting to be proposed, at most: supervisors wait (in order) beyond it.
const REPORT_QUEUE: usize = 4096;
/// The grace period of a run whose spec is gone and that recorded none (a process started by
/// an older build): the spec's own default.
const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// How often the resync tick runs; each reconciles the next slice of services, so that every
/// service is looked at within [`RESYNC_ROUND`] even if nothing enqueues it.
const RESYNC_TICK: Duration = Duration::from_secs(2);
/// See [`RESYNC_TICK`].
const RESYNC_ROUND: Duration = Duration::from_secs(60);

/// Settings of the orchestrator.
#[derive(Clone)]
pub struct OrchestratorConfig {
    /// This node's name, recorded on instances and container labels.
    pub node: String,
    /// The cluster's identity: with the node, it names what this runed makes outside its data
    /// dir (containers, their network, mount files), so runeds sharing a host never meet.
    pub cluster: String,
    /// Where process instances keep their state files and logs.
    pub data_dir: PathBuf,
    /// The Docker Engine's unix socket.
    pub docker_socket: String,
    /// API version pinning and negotiation.
    pub docker_client: runner::docker::DockerClientConfig,
    /// First crash-loop delay; doubles per consecutive crash.
    pub backoff_base: Duration,
    /// Longest crash-loop delay.
    pub backoff_max: Duration,
    /// A run lasting this long resets the crash-loop delay.
    pub backoff_reset: Duration,
    /// The log writer binary (`rune-log-writer`, or runed itself), started as
    /// `<it> __log-writer FILE` to timestamp process output; without it processes write their
    /// log file directly, with no times.
    pub log_writer: Option<PathBuf>,
    /// Runtime directory for secret and configmap mount files: a tmpfs, never the data dir.
    pub run_dir: PathBuf,
    /// Opens secrets for env and mounts; without it, instances that use secrets fail to start.
    pub secrets: Option<Arc<dyn inject::SecretSource>>,
    /// `docker.registries`: pull credentials for private registries.
    pub registries: Vec<registry::Registry>,
    /// Where process services' volumes live (this runed's under `<root>/<owner>`).
    pub volumes_root: PathBuf,
    /// In a cluster: run only the instances placed on this node (`placements/` in the state,
    /// decided in apply), and sign reports with the node's name so that apply can ignore a
    /// node that reports on an instance since placed elsewhere. Off on a single node, which
    /// runs every instance.
    pub follows_placement: bool,
    /// The projections that send traffic to instances (DNS, data plane, ingress). An
    /// instance being stopped leaves the endpoints first; it is signalled only once each of
    /// these acts on that (or the stale budget passes: a router that far behind refuses
    /// connections on its own), so that no new connection is sent to it as it shuts down.
    pub routers: Vec<Arc<Projection>>,
}

impl OrchestratorConfig {
    /// `node` and the cluster's first 8 characters: the directory and name this runed's
    /// objects outside its data dir live under.
    pub fn owner(&self) -> String {
        runner::owner_name(&self.node, &self.cluster)
    }

    /// Defaults for a node named `node` with data under `data_dir`.
    pub fn new(node: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            node: node.into(),
            cluster: String::new(),
            data_dir: data_dir.into(),
            docker_socket: "/var/run/docker.sock".into(),
            docker_client: Default::default(),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            backoff_reset: Duration::from_secs(600),
            log_writer: None,
            run_dir: std::env::temp_dir().join("rune-run"),
            secrets: None,
            registries: Vec::new(),
            volumes_root: std::env::temp_dir().join("rune-volumes"),
            follows_placement: false,
            routers: Vec::new(),
        }
    }
}

/// A probe's live state, for `rune health`: every result, not only the transitions in the log.
#[derive(Debug, Clone, Default)]
pub struct ProbeLive {
    /// The state after thresholds (`None` before the first check).
    pub ok: Option<bool>,
    /// The last check's result.
    pub last_ok: bool,
    /// The last check's message.
    pub last_message: String,
    /// When the last check ran (Unix ms).
    pub last_at_ms: i64,
}

#[derive(Debug, Clone, Default)]
struct Live {
    probes: BTreeMap<String, ProbeLive>,
}

/// The health of one instance as the node sees it now.
#[derive(Debug, Clone)]
pub struct InstanceHealth {
    /// Instance id.
    pub id: String,
    /// Probe name → live state.
    pub probes: BTreeMap<String, ProbeLive>,
}

/// Failures of the orchestrator's user-facing operations.
#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    /// No such service or instance.
    #[error("{0}")]
    NotFound(String),
    /// The instance cannot do that now.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The runtime failed.
    #[error(transparent)]
    Run(#[from] RunError),
}

struct Sup {
    template: String,
    stopping: bool,
    stop: Option<oneshot::Sender<String>>,
    task: tokio::task::JoinHandle<()>,
}

/// The orchestrator's picture of the state: services and instance records by service, kept by
/// its projection.
#[derive(Debug, Default, PartialEq)]
struct Picture {
    /// Hashed, not ordered: every cast inserts here, and at tens of thousands of services an
    /// ordered insert's key comparisons were a few percent of a write's CPU.
    services: HashMap<SvcId, Arc<ServiceRecord>, foldhash::fast::RandomState>,
    records: BTreeMap<SvcId, BTreeMap<String, InstanceRecord>>,
    /// Instance id → node, per service (in a cluster).
    placements: BTreeMap<SvcId, BTreeMap<String, String>>,
}

impl Picture {
    /// Takes one delta; returns the service it concerns, if it can change what runs.
    fn apply(&mut self, d: &Delta) -> Option<SvcId> {
        match d {
            Delta::Service {
                namespace,
                name,
                record,
            } => {
                let id = (namespace.clone(), name.clone());
                match record {
                    Some(r) => self.services.insert(id.clone(), r.clone()),
                    None => self.services.remove(&id),
                };
                Some(id)
            }
            Delta::Instance {
                namespace,
                service,
                id,
                record,
            } => {
                let sid = (namespace.clone(), service.clone());
                let recs = self.records.entry(sid.clone()).or_default();
                match record {
                    Some(r) => recs.insert(id.clone(), (**r).clone()),
                    None => recs.remove(id),
                };
                if recs.is_empty() {
                    self.records.remove(&sid);
                }
                Some(sid)
            }
            Delta::Placement {
                namespace,
                service,
                id,
                node,
            } => {
                let sid = (namespace.clone(), service.clone());
                let placed = self.placements.entry(sid.clone()).or_default();
                match node {
                    Some(n) => placed.insert(id.clone(), n.clone()),
                    None => placed.remove(id),
                };
                if placed.is_empty() {
                    self.placements.remove(&sid);
                }
                Some(sid)
            }
            Delta::Endpoints { .. } | Delta::Node { .. } | Delta::Namespace { .. } => None,
        }
    }
}

/// Services waiting to be reconciled: a set, so a service touched by many entries is
/// reconciled once, and the queue is bounded by the number of services.
#[derive(Default)]
struct WorkQueue {
    dirty: BTreeSet<SvcId>,
    /// Everything must be looked at (a rebuilt picture, the engine became reachable).
    all: bool,
}

/// Counters of the reconcile loop, for metrics.
#[derive(Debug, Default)]
struct Counters {
    reconciles: AtomicU64,
    reconcile_micros: AtomicU64,
    last_pass_micros: AtomicU64,
}

/// What the reconcile loop has done, for metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoopStats {
    /// Services reconciled so far.
    pub reconciles: u64,
    /// Time spent reconciling them.
    pub reconcile_seconds: f64,
    /// How long the last pass took.
    pub last_pass_seconds: f64,
    /// Services waiting to be reconciled.
    pub queue_depth: u64,
}

pub(crate) struct Inner {
    cfg: OrchestratorConfig,
    log: Arc<Log>,
    process: ProcessRunner,
    docker: DockerRunner,
    events: mpsc::Sender<Report>,
    stale_budget: Duration,
    picture: RwLock<Picture>,
    /// Set once the picture was built from the state: until then nothing is reconciled.
    built: AtomicBool,
    queue: Mutex<WorkQueue>,
    projection: OnceLock<Arc<Projection>>,
    counters: Counters,
    live: Mutex<HashMap<Key, Live>>,
    wake: Notify,
    shutting_down: AtomicBool,
    /// When the last reconcile pass finished (or the loop started): health and the watchdog
    /// read it.
    reconciled_at: Mutex<Instant>,
}

/// Runs the instances of every service on this node.
pub struct Orchestrator {
    inner: Arc<Inner>,
    shutdown: Arc<Notify>,
    reporter_stop: Arc<Notify>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Orchestrator {
    /// The gateway of this node's container network once it exists: where the embedded DNS
    /// must also listen for containers to reach it.
    pub fn container_gateway(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.inner.docker.gateway()
    }

    /// The `docker.registries` entry of this node's runefile that pulls with secret
    /// `namespace/name` (`auth.fromSecret`), if one does: deleting that secret would break
    /// every later pull from the registry, and the state cannot know (the runefile is not in it).
    pub fn registry_using(&self, namespace: &str, name: &str) -> Option<&str> {
        self.inner.cfg.registries.iter().find_map(|r| match &r.auth {
            registry::RegistryAuth::DockerConfigJson {
                namespace: ns,
                name: n,
            } if ns == namespace && n == name => Some(r.name.as_str()),
            _ => None,
        })
    }

    /// Starts the projection, the reconcile loop and the reporter.
    pub async fn start(log: Arc<Log>, cfg: OrchestratorConfig, stale_budget: Duration) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(REPORT_QUEUE);
        let cgroups = runner::cgroup::Cgroups::detect(
            std::path::Path::new("/sys/fs/cgroup"),
            &std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default(),
            &cfg.owner(),
        );
        match &cgroups {
            runner::cgroup::Cgroups::Unavailable(_) => tracing::warn!(
                cgroups = %cgroups.describe(),
                "process services cannot be given resource limits here; those that ask are refused"
            ),
            _ => tracing::info!(cgroups = %cgroups.describe(), "process resource limits"),
        }
        let inner = Arc::new(Inner {
            process: ProcessRunner::new(
                cfg.data_dir.join("instances"),
                cfg.log_writer.clone(),
                runner::host_volumes::HostVolumes::new(cfg.volumes_root.join(cfg.owner())),
                cgroups,
            ),
            docker: DockerRunner::new(
                cfg.docker_socket.clone(),
                cfg.node.clone(),
                cfg.cluster.clone(),
                cfg.docker_client,
            ),
            cfg,
            log: log.clone(),
            events: tx,
            stale_budget,
            picture: RwLock::new(Picture::default()),
            built: AtomicBool::new(false),
            queue: Mutex::new(WorkQueue::default()),
            projection: OnceLock::new(),
            counters: Counters::default(),
            live: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            shutting_down: AtomicBool::new(false),
            reconciled_at: Mutex::new(Instant::now()),
        });
        let view = Arc::new(PictureView(Arc::downgrade(&inner)));
        let projection = Projection::start(log.clone(), "orchestrator", view, stale_budget).await;
        let _ = inner.projection.set(projection);
        let shutdown = Arc::new(Notify::new());
        let reporter_stop = Arc::new(Notify::new());
        let signed_by = inner.cfg.follows_placement.then(|| inner.cfg.node.clone());
        let reporter = tokio::spawn(report_loop(log, rx, reporter_stop.clone(), signed_by));
        let reconciler = tokio::spawn(reconcile_loop(inner.clone(), shutdown.clone()));
        Arc::new(Self {
            inner,
            shutdown,
            reporter_stop,
            tasks: Mutex::new(vec![reconciler, reporter]),
        })
    }

    /// Stops reconciling and flushes the reports, leaving instances running for the next runed
    /// to adopt.
    pub async fn shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        self.shutdown.notify_one();
        let tasks: Vec<_> = self
            .tasks
            .lock()
            .map(|mut t| t.drain(..).collect())
            .unwrap_or_default();
        let mut it = tasks.into_iter();
        if let Some(reconciler) = it.next() {
            let _ = reconciler.await;
        }
        if let Some(reporter) = it.next() {
            // Supervisors are gone: what they reported is queued; write it and stop.
            self.reporter_stop.notify_one();
            if tokio::time::timeout(Duration::from_secs(5), reporter)
                .await
                .is_err()
            {
                tracing::warn!("instance reports still pending at shutdown; the next runed re-observes them");
            }
        }
    }

    /// The picture's projection: lag, counters and the pause failpoint.
    pub fn projection(&self) -> Option<&Arc<Projection>> {
        self.inner.projection.get()
    }

    /// What the reconcile loop has done.
    pub fn stats(&self) -> LoopStats {
        let c = &self.inner.counters;
        LoopStats {
            reconciles: c.reconciles.load(Ordering::Relaxed),
            reconcile_seconds: c.reconcile_micros.load(Ordering::Relaxed) as f64 / 1e6,
            last_pass_seconds: c.last_pass_micros.load(Ordering::Relaxed) as f64 / 1e6,
            queue_depth: self.inner.queue.lock().map_or(0, |q| q.dirty.len() as u64),
        }
    }

    /// How long the reconcile loop has gone without finishing a pass over the state (since it
    /// started, before the first). A loop that stops finishing passes is wedged: `/healthz`
    /// and the watchdog say so.
    pub fn since_reconcile(&self) -> Duration {
        self.inner
            .reconciled_at
            .lock()
            .map(|at| at.elapsed())
            .unwrap_or(Duration::MAX)
    }

    /// Live probe results of one instance on this node, if it runs here.
    pub fn health(&self, ns: &str, service: &str, id: &str) -> Option<InstanceHealth> {
        let live = self.inner.live.lock().ok()?;
        let l = live.get(&(ns.to_string(), service.to_string(), id.to_string()))?;
        Some(InstanceHealth {
            id: id.to_string(),
            probes: l.probes.clone(),
        })
    }

    /// Live probe results of every instance on this node, by (namespace, instance id).
    pub fn health_all(&self) -> HashMap<(String, String), InstanceHealth> {
        let live = self.inner.live.lock().map(|l| l.clone()).unwrap_or_default();
        live.into_iter()
            .map(|(k, l)| {
                let h = InstanceHealth {
                    id: k.2.clone(),
                    probes: l.probes,
                };
                ((k.0, k.2), h)
            })
            .collect()
    }

    /// The output of one instance.
    pub async fn logs(&self, rec: &InstanceRecord, q: &LogQuery) -> Result<LogStream, OrchestratorError> {
        if rec.runtime == "process" {
            return Ok(self.inner.process.logs(&rec.namespace, &rec.id, q));
        }
        if rec.runtime_id.is_empty() {
            return Ok(Box::pin(futures::stream::empty()));
        }
        Ok(self.inner.docker.logs(&rec.runtime_id, q).await?)
    }

    /// The volumes on this node: container services' (the engine's) and process services'
    /// (directories under the volumes root).
    pub async fn volumes(&self) -> Result<Vec<runner::docker::VolumeInfo>, OrchestratorError> {
        let mut all = self.inner.docker.list_volumes(true).await?;
        let procs = self.inner.process.volumes().clone();
        let mut host = tokio::task::spawn_blocking(move || procs.list(true))
            .await
            .unwrap_or_default();
        self.inner.fill_process_users(&mut host)?;
        all.extend(host);
        all.sort_by(|a, b| (&a.namespace, a.name()).cmp(&(&b.namespace, b.name())));
        Ok(all)
    }

    /// Deletes a volume of namespace `ns` by its user-facing name; refused while a container or
    /// process uses it.
    pub async fn delete_volume(&self, ns: &str, name: &str) -> Result<(), OrchestratorError> {
        let mut host = self.inner.process.volumes().list(false);
        self.inner.fill_process_users(&mut host)?;
        if let Some(v) = host.iter().find(|v| v.namespace == ns && v.name() == name) {
            if !v.users.is_empty() {
                return Err(OrchestratorError::FailedPrecondition(format!(
                    "volume {ns}/{name} is in use by {}; stop or delete its service first",
                    v.users.join(", ")
                )));
            }
            return Ok(self.inner.process.volumes().delete(v)?);
        }
        let all = self.inner.docker.list_volumes(false).await?;
        let Some(v) = all.iter().find(|v| v.namespace == ns && v.name() == name) else {
            return Err(OrchestratorError::NotFound(format!(
                "volume {ns}/{name} not found"
            )));
        };
        match self.inner.docker.delete_volume(&v.engine_name).await {
            Ok(()) => Ok(()),
            Err(RunError::Launch(m)) => Err(OrchestratorError::FailedPrecondition(format!(
                "volume {ns}/{name} is {m}; stop or delete its service first"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// The output of the last run of an instance's init step; `None` when it has not run.
    pub async fn init_step_logs(
        &self,
        rec: &InstanceRecord,
        step: &str,
        q: &LogQuery,
    ) -> Result<Option<LogStream>, OrchestratorError> {
        if rec.runtime == "process" {
            return Ok(self
                .inner
                .process
                .init_step_logs(&rec.namespace, &rec.id, step, q));
        }
        Ok(self
            .inner
            .docker
            .init_step_logs(&rec.namespace, &rec.id, step, q)
            .await?)
    }

    /// Runs a command in a running instance.
    pub async fn exec(
        &self,
        rec: &InstanceRecord,
        spec: &ExecSpec,
    ) -> Result<(mpsc::Sender<ExecInput>, mpsc::Receiver<ExecOutput>), OrchestratorError> {
        if !matches!(
            rec.phase,
            rune_statemachine::instance::Phase::Running | rune_statemachine::instance::Phase::Unhealthy
        ) {
            return Err(OrchestratorError::FailedPrecondition(format!(
                "instance {} is not running (status {})",
                rec.id,
                rec.phase.as_str()
            )));
        }
        if rec.runtime == "process" {
            // The same environment the instance got, secrets included.
            let launch = self.inner.resolved(&self.inner.launch_of(rec)?, false)?;
            return Ok(self.inner.process.exec(&launch, spec)?);
        }
        Ok(self.inner.docker.exec(&rec.runtime_id, spec).await?)
    }
}

impl Inner {
    /// Queues a report for the log; waits while the queue is full, so reports keep their order.
    async fn report(&self, key: &Key, change: InstanceChange) {
        self.send_report(key, change, None).await;
    }

    /// Reports, and returns the log index of the entry once it is applied (`None` when it
    /// could not be written, as when runed stops first).
    async fn report_applied(&self, key: &Key, change: InstanceChange) -> Option<u64> {
        let (tx, rx) = oneshot::channel();
        self.send_report(key, change, Some(tx)).await;
        rx.await.ok()
    }

    async fn send_report(&self, key: &Key, change: InstanceChange, applied: Option<oneshot::Sender<u64>>) {
        let event = InstanceEvent {
            namespace: key.0.clone(),
            service: key.1.clone(),
            id: key.2.clone(),
            change,
        };
        let _ = self.events.send(Report { event, applied }).await;
    }

    /// Takes a run out of service before it is signalled: reports it `Stopping` (which takes
    /// it out of its service's endpoints in the same entry) and waits until every router acts
    /// on that entry. Both waits together last at most the stale budget (and a second): past
    /// it a router refuses connections on its own, and a log that takes no writes must not
    /// keep an instance running for ever. Then, if it was published (ready), it keeps
    /// running for the service's `drainSeconds`, for what reaches it past this node's routers
    /// (a client that kept its address). The drain is the service's as it is now, looked at
    /// each second: lowering it, or deleting the service, ends it sooner. `false` when runed
    /// is stopping meanwhile: the run is then left for the next runed to adopt.
    async fn drain(&self, key: &Key, reason: String) -> bool {
        let svc = (key.0.clone(), key.1.clone());
        let drain_of = |p: &Picture| {
            let s = p.services.get(&svc)?.spec.drain_seconds?;
            Some(Duration::from_secs(s.unsigned_abs()))
        };
        let (published, drain) = self.picture.read().map_or((false, None), |p| {
            let published = p
                .records
                .get(&svc)
                .and_then(|r| r.get(&key.2))
                .is_some_and(|r| r.phase == Phase::Running && r.ready);
            (published, drain_of(&p).filter(|d| published && !d.is_zero()))
        });
        // `rune get instances` says why a stopping instance still runs.
        let reason = match drain {
            Some(d) => format!("{reason}; draining for {}s", d.as_secs()),
            None => reason,
        };
        let out_of_routers = async {
            let at = self
                .report_applied(key, InstanceChange::Stopping { reason })
                .await?;
            for r in &self.cfg.routers {
                r.reached(at).await;
            }
            Some(at)
        };
        match tokio::time::timeout(self.stale_budget + Duration::from_secs(1), out_of_routers).await {
            Ok(Some(_)) => {}
            Ok(None) if self.is_shutting_down() => return false,
            Ok(None) => {}
            Err(_) => tracing::warn!(instance = %key.2, namespace = %key.0,
                "the routers did not act on the instance's stop within the stale budget; stopping it anyway"),
        }
        if !published {
            return true;
        }
        let since = Instant::now();
        loop {
            let drain = self
                .picture
                .read()
                .ok()
                .and_then(|p| drain_of(&p))
                .unwrap_or_default();
            let Some(left) = drain.checked_sub(since.elapsed()).filter(|d| !d.is_zero()) else {
                return true;
            };
            tokio::time::sleep(left.min(Duration::from_secs(1))).await;
        }
    }

    /// The spec a run of `template` was started from: the current one when only the restart
    /// counter differs, else the newest in the service's history with the same hash. `None`
    /// when the history no longer holds it. An adopted run not yet replaced by a rollout is
    /// probed, restarted and published as its own spec says, not as the new one.
    fn spec_of(&self, svc: &ServiceRecord, template: &str) -> Option<ServiceSpec> {
        let hash = |t: &str| t.split_once('-').map(|(h, _)| h.to_string());
        let want = hash(template)?;
        let same =
            |spec: &ServiceSpec| hash(&template_hash(spec, &svc.meta)).as_deref() == Some(want.as_str());
        if same(&svc.spec) {
            return Some(svc.spec.clone());
        }
        let txn = self.log.read().ok()?;
        let t = txn.open_table(STATE_TABLE).ok()?;
        rune_statemachine::store::service_history(&t, svc.spec.namespace(), &svc.spec.name)
            .ok()?
            .into_iter()
            .find(|r| same(&r.spec))
            .map(|r| r.spec)
    }

    /// Queues services for the reconcile loop and wakes it.
    fn enqueue(&self, ids: impl IntoIterator<Item = SvcId>) {
        if let Ok(mut q) = self.queue.lock() {
            q.dirty.extend(ids);
        }
        self.wake.notify_one();
    }

    fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    fn set_live(&self, key: &Key, _run: &Run) {
        if let Ok(mut l) = self.live.lock() {
            l.insert(key.clone(), Live::default());
        }
    }

    fn clear_live(&self, key: &Key) {
        if let Ok(mut l) = self.live.lock() {
            l.remove(key);
        }
    }

    fn set_probe(&self, key: &Key, name: &str, p: ProbeLive) {
        if let Ok(mut l) = self.live.lock() {
            l.entry(key.clone()).or_default().probes.insert(name.into(), p);
        }
    }

    /// The live process instances using each process volume: the instance itself for a
    /// per-instance one, every instance whose service names the claim for a shared one. A
    /// failed read of the state is an error, never "unused" (a delete would follow it).
    fn fill_process_users(&self, vols: &mut [runner::docker::VolumeInfo]) -> Result<(), RunError> {
        let runtime = |e: &dyn std::fmt::Display| RunError::Runtime(e.to_string());
        let txn = self.log.read().map_err(|e| runtime(&e))?;
        let t = txn.open_table(STATE_TABLE).map_err(|e| runtime(&e))?;
        let mut live: Vec<(runner::Found, Vec<String>)> = Vec::new();
        for f in self.process.list().into_iter().filter(|f| f.running) {
            let svc: Option<ServiceRecord> = rune_statemachine::store::get_record(
                &t,
                &rune_statemachine::store::service_key(&f.namespace, &f.service),
            )
            .map_err(|e| runtime(&e))?;
            let claims = svc
                .map(|r| r.spec.volumes.iter().filter_map(|v| v.claim.clone()).collect())
                .unwrap_or_default();
            live.push((f, claims));
        }
        for v in vols.iter_mut() {
            v.users = live
                .iter()
                .filter(|(f, claims)| {
                    f.namespace == v.namespace
                        && if v.claim.is_empty() {
                            f.id == v.instance
                        } else {
                            claims.contains(&v.claim)
                        }
                })
                .map(|(f, _)| f.id.clone())
                .collect();
        }
        Ok(())
    }

    fn launch_of(&self, rec: &InstanceRecord) -> Result<Launch, OrchestratorError> {
        let txn = self.log.read().map_err(|e| RunError::Runtime(e.to_string()))?;
        let t = txn
            .open_table(STATE_TABLE)
            .map_err(|e| RunError::Runtime(e.to_string()))?;
        let svc: Option<ServiceRecord> = rune_statemachine::store::get_record(
            &t,
            &rune_statemachine::store::service_key(&rec.namespace, &rec.service),
        )
        .map_err(|e| RunError::Runtime(e.to_string()))?;
        let svc = svc.ok_or_else(|| {
            OrchestratorError::NotFound(format!("service {}/{} not found", rec.namespace, rec.service))
        })?;
        Ok(launch(&svc.spec, &rec.id, rec.template.clone()))
    }

    /// The launch with its secrets and configmaps resolved (and, for a start, its mount files).
    fn resolved(&self, l: &Launch, write_mounts: bool) -> Result<Launch, RunError> {
        inject::resolve(
            &self.log,
            self.cfg.secrets.as_deref(),
            l,
            &self.cfg.run_dir,
            &self.cfg.owner(),
            write_mounts,
        )
    }

    async fn start(&self, l: &Launch) -> Result<Run, RunError> {
        let mut l = self.resolved(l, true)?;
        if l.spec.process.is_some() {
            return self.process.start(&l).await;
        }
        let images: Vec<&str> = l
            .spec
            .image
            .iter()
            .map(String::as_str)
            .chain(l.spec.init_steps.iter().filter_map(|s| s.image.as_deref()))
            .collect();
        l.pull_auth = registry::pull_auth(
            &self.cfg.registries,
            &images,
            l.spec.image_registry.as_deref(),
            |ns, name| registry::read_secret(&self.log, self.cfg.secrets.as_deref(), ns, name),
        )?;
        self.docker.start(&l).await
    }

    /// The last line an instance wrote (stdout or stderr), to tell why it exited: "exited with
    /// code 1: Address already in use". Bounded in time and size; `None` when it said nothing.
    async fn last_words(&self, key: &Key, handle: &RunHandle) -> Option<String> {
        use futures::StreamExt;
        let q = LogQuery {
            follow: false,
            tail: 1,
            since_s: 0,
            timestamps: false,
        };
        for attempt in 0..2 {
            if attempt > 0 {
                // A process's log writer may still be draining the pipe of a process that just ended.
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            let stream = match handle {
                RunHandle::Container { id } => self.docker.logs(id, &q).await.ok()?,
                _ => self.process.logs(&key.0, &key.2, &q),
            };
            let mut bytes = Vec::new();
            let collect = async {
                let mut stream = stream;
                while let Some(Ok(chunk)) = stream.next().await {
                    bytes.extend_from_slice(&chunk);
                    if bytes.len() > 4096 {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), collect).await;
            let text = String::from_utf8_lossy(&bytes);
            if let Some(line) = text.lines().rev().map(str::trim).find(|l| !l.is_empty()) {
                return Some(line.chars().take(200).collect());
            }
        }
        None
    }

    async fn wait(&self, ns: &str, id: &str, run: &mut Run) -> Exit {
        match &run.handle {
            RunHandle::Container { id } => {
                let id = id.clone();
                self.docker.wait(&id).await
            }
            _ => self.process.wait(ns, id, &mut run.handle).await,
        }
    }

    /// Stops a run: SIGTERM, then SIGKILL after the grace period.
    async fn stop(&self, l: &Launch, run: &mut Run) -> Exit {
        let grace = supervisor::grace_of(l);
        match &run.handle {
            RunHandle::Container { id } => {
                let id = id.clone();
                self.until_done(&id, "stop", || self.docker.stop(&id, grace))
                    .await;
                Exit {
                    code: None,
                    reason: "stopped".into(),
                }
            }
            _ => {
                self.process
                    .stop(&l.namespace, &l.id, &mut run.handle, grace)
                    .await
            }
        }
    }

    /// Removes the files an instance's secrets and configmaps were written to.
    fn remove_mounts(&self, ns: &str, id: &str) {
        let _ = std::fs::remove_dir_all(inject::mounts_dir(&self.cfg.run_dir, &self.cfg.owner(), ns, id));
    }

    /// Removes an instance's leftovers (its exited container, its process folder). Called
    /// once its run has ended or been stopped.
    async fn cleanup(&self, l: &Launch) {
        self.remove_mounts(&l.namespace, &l.id);
        // A process instance's folder (its log) stays until the instance is no longer wanted:
        // a replacement under the same id appends to it. The reconciler collects the rest,
        // which it does only once no run is recorded there.
        if l.spec.process.is_some() {
            self.process.forget_run(&l.namespace, &l.id);
        } else {
            let name = self.docker.container_name(&l.namespace, &l.id);
            self.until_done(&name, "remove", || self.docker.remove(&name))
                .await;
            if let Err(e) = self.docker.remove_network_if_unused().await {
                tracing::debug!(error = %e, "could not remove the container network");
            }
        }
    }

    /// Retries a container operation with backoff until it succeeds (the engine may be away, and
    /// the container must still go) or runed shuts down.
    async fn until_done<F, Fut>(&self, container: &str, what: &str, op: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(), RunError>>,
    {
        let mut delay = Duration::from_millis(500);
        while let Err(e) = op().await {
            if self.is_shutting_down() {
                return;
            }
            tracing::warn!(container, error = %e, "cannot {what} the container yet; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }

    async fn exec_probe(
        &self,
        l: &Launch,
        runtime_id: &str,
        command: Vec<String>,
        timeout: Duration,
    ) -> Result<String, String> {
        let spec = ExecSpec {
            command,
            tty: false,
            cols: 0,
            rows: 0,
        };
        let started = if l.spec.process.is_some() {
            self.process.exec(l, &spec)
        } else {
            self.docker.exec(runtime_id, &spec).await
        };
        let (tx, mut rx) = started.map_err(|e| e.to_string())?;
        drop(tx);
        let run = async {
            let mut out = Vec::new();
            while let Some(o) = rx.recv().await {
                match o {
                    ExecOutput::Stdout(b) | ExecOutput::Stderr(b) => {
                        if out.len() < 512 {
                            out.extend_from_slice(&b);
                        }
                    }
                    ExecOutput::Exit(code) => {
                        let text: String = String::from_utf8_lossy(&out).trim().chars().take(200).collect();
                        let detail = if text.is_empty() {
                            String::new()
                        } else {
                            format!(": {text}")
                        };
                        let msg = format!("exit {code}{detail}");
                        return if code == 0 { Ok(msg) } else { Err(msg) };
                    }
                }
            }
            Err("the command ended without a status".to_string())
        };
        tokio::time::timeout(timeout, run)
            .await
            .unwrap_or_else(|_| Err(format!("timed out after {}s", timeout.as_secs())))
    }
}

/// What one instance of a service runs, as `spec` says.
fn launch(spec: &ServiceSpec, id: &str, template: String) -> Launch {
    let ns = spec.namespace().to_string();
    let mut env: BTreeMap<String, String> = spec.env.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect();
    env.insert("RUNE_SERVICE_NAME".into(), spec.name.clone());
    env.insert("RUNE_SERVICE_NAMESPACE".into(), ns.clone());
    env.insert("RUNE_INSTANCE_ID".into(), id.to_string());
    Launch {
        namespace: ns,
        service: spec.name.clone(),
        id: id.to_string(),
        template,
        spec: Arc::new(spec.clone()),
        env,
        mounts: Vec::new(),
        pull_auth: BTreeMap::new(),
    }
}

/// One report on its way to the log; `applied` is told the entry's index once it is applied.
struct Report {
    event: InstanceEvent,
    applied: Option<oneshot::Sender<u64>>,
}

/// Proposes reports in order, batching whatever queued up while the previous write was in flight.
/// On `stop`, writes what is queued and returns.
async fn report_loop(log: Arc<Log>, mut rx: mpsc::Receiver<Report>, stop: Arc<Notify>, node: Option<String>) {
    let mut stopping = false;
    loop {
        let first = if stopping {
            match rx.try_recv() {
                Ok(e) => e,
                Err(_) => return,
            }
        } else {
            tokio::select! {
                e = rx.recv() => match e {
                    Some(e) => e,
                    None => return,
                },
                _ = stop.notified() => {
                    stopping = true;
                    continue;
                }
            }
        };
        let mut reports = vec![first];
        while reports.len() < 256 {
            match rx.try_recv() {
                Ok(e) => reports.push(e),
                Err(_) => break,
            }
        }
        let (events, waiting): (Vec<InstanceEvent>, Vec<_>) =
            reports.into_iter().map(|r| (r.event, r.applied)).unzip();
        let mut delay = Duration::from_millis(100);
        loop {
            match log
                .propose(Command::InstanceEvents {
                    events: events.clone(),
                    node: node.clone(),
                })
                .await
            {
                Ok(p) => {
                    if let Err(rej) = p.outcome {
                        tracing::warn!(error = %rej, "instance report rejected");
                    }
                    for tx in waiting.into_iter().flatten() {
                        let _ = tx.send(p.index);
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, events = events.len(), "cannot record instance reports; retrying");
                    if stopping {
                        return;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Longest the reconciler waits for the Docker Engine to list containers in one try.
const DOCKER_LIST_TIMEOUT: Duration = Duration::from_secs(10);

/// How often process folders of instances nobody wants are collected.
const GC_EVERY: Duration = Duration::from_secs(60);

/// What the reconciler found already running when it started, and the engine's state.
#[derive(Default)]
struct Adoptable {
    runs: HashMap<Key, Found>,
    containers_listed: bool,
    /// A listing under way: off the loop, so a hung engine stalls no service.
    listing: Option<tokio::task::JoinHandle<Result<Vec<Found>, RunError>>>,
    next_docker_try: Option<Instant>,
    docker_delay: Duration,
    /// Why the engine cannot be used, said on each container instance until it can.
    engine_error: Option<String>,
}

/// The reconcile loop's state between passes.
struct Loop {
    inner: Arc<Inner>,
    sups: BTreeMap<Key, Sup>,
    adopt: Adoptable,
    /// Adopted runs being stopped: their id is not started again until the old run is gone
    /// and its removal reported, so the stop cannot remove the new run's files or record.
    draining: Arc<Mutex<HashSet<Key>>>,
    /// The services this resync round has still to look at, taken from the picture when the
    /// round starts (one created since is enqueued by its own entry), and how many a tick takes.
    round: std::collections::VecDeque<SvcId>,
    per_tick: usize,
    last_gc: Instant,
}

async fn reconcile_loop(inner: Arc<Inner>, shutdown: Arc<Notify>) {
    let mut l = Loop {
        inner: inner.clone(),
        sups: BTreeMap::new(),
        adopt: Adoptable {
            docker_delay: Duration::from_secs(1),
            ..Default::default()
        },
        round: std::collections::VecDeque::new(),
        per_tick: 0,
        last_gc: Instant::now(),
        draining: Arc::new(Mutex::new(HashSet::new())),
    };
    for f in inner.process.list() {
        adopt_or_discard(&inner, &mut l.adopt, f);
    }
    let mut tick = tokio::time::interval(RESYNC_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let resync = tokio::select! {
            _ = inner.wake.notified() => false,
            _ = tick.tick() => true,
            _ = shutdown.notified() => break,
        };
        l.pass(resync).await;
    }
    // Leave instances running; stop supervising them.
    for (_, s) in std::mem::take(&mut l.sups) {
        s.task.abort();
        let _ = s.task.await;
    }
    if let Some(h) = l.adopt.listing.take() {
        h.abort();
    }
}

impl Loop {
    /// Reconciles what the queue holds, and on a resync tick the next slice of all services.
    async fn pass(&mut self, resync: bool) {
        let inner = self.inner.clone();
        if !inner.built.load(Ordering::SeqCst) {
            // No picture of the state yet (its first read failed): acting on none would stop
            // everything adopted. The projection retries; health shows the loop idle.
            return;
        }
        let started = Instant::now();
        self.poll_docker().await;
        let (all, mut keys) = match inner.queue.lock() {
            Ok(mut q) => {
                let all = std::mem::take(&mut q.all);
                (all, std::mem::take(&mut q.dirty))
            }
            Err(_) => return,
        };
        if all {
            keys.extend(self.every_service());
        } else if resync {
            keys.extend(self.resync_slice());
        }
        let n = keys.len() as u64;
        for id in &keys {
            self.reconcile(id).await;
        }
        if all || (resync && self.last_gc.elapsed() >= GC_EVERY) {
            self.collect_garbage();
        }
        if let Ok(mut at) = inner.reconciled_at.lock() {
            *at = Instant::now();
        }
        let took = started.elapsed().as_micros() as u64;
        let c = &inner.counters;
        c.reconciles.fetch_add(n, Ordering::Relaxed);
        c.reconcile_micros.fetch_add(took, Ordering::Relaxed);
        c.last_pass_micros.store(took, Ordering::Relaxed);
    }

    /// Every service the picture, the supervisors or the adopted runs know of.
    fn every_service(&self) -> BTreeSet<SvcId> {
        let mut all: BTreeSet<SvcId> = self
            .inner
            .picture
            .read()
            .map(|p| p.services.keys().chain(p.records.keys()).cloned().collect())
            .unwrap_or_default();
        all.extend(self.sups.keys().map(|k| (k.0.clone(), k.1.clone())));
        all.extend(self.adopt.runs.keys().map(|k| (k.0.clone(), k.1.clone())));
        all
    }

    /// The next services of this resync round: enough that a round of ticks covers them all.
    fn resync_slice(&mut self) -> Vec<SvcId> {
        if self.round.is_empty() {
            let Ok(p) = self.inner.picture.read() else {
                return Vec::new();
            };
            self.round = p.services.keys().cloned().collect();
            let ticks = (RESYNC_ROUND.as_secs() / RESYNC_TICK.as_secs()).max(1) as usize;
            self.per_tick = self.round.len().div_ceil(ticks);
        }
        let n = self.per_tick.min(self.round.len());
        self.round.drain(..n).collect()
    }

    /// Lists containers off the loop until the engine answers once; then adopts them and
    /// looks at everything again.
    async fn poll_docker(&mut self) {
        let inner = self.inner.clone();
        let a = &mut self.adopt;
        if a.containers_listed {
            return;
        }
        if a.listing.as_ref().is_some_and(|h| h.is_finished()) {
            let Some(h) = a.listing.take() else { return };
            let listed = match h.await {
                Ok(r) => r,
                Err(e) => Err(RunError::Runtime(format!("container listing failed: {e}"))),
            };
            match listed {
                Ok(found) => {
                    a.containers_listed = true;
                    a.engine_error = None;
                    for f in found {
                        adopt_or_discard(&inner, a, f);
                    }
                    tracing::info!("docker engine reachable; containers reconciled");
                    if let Ok(mut q) = inner.queue.lock() {
                        q.all = true;
                    }
                }
                Err(e) => {
                    a.next_docker_try = Some(Instant::now() + a.docker_delay);
                    a.docker_delay = (a.docker_delay * 2).min(Duration::from_secs(30));
                    let reason = e.to_string();
                    let news = a.engine_error.as_deref() != Some(reason.as_str());
                    a.engine_error = Some(reason);
                    // Until the engine answers, container instances cannot be adopted or
                    // started: each says so (once), rather than show what the last runed saw.
                    let (waiting, wants_containers) = match inner.picture.read() {
                        Ok(p) => {
                            let w: Vec<(SvcId, bool)> = p
                                .services
                                .iter()
                                .filter(|(_, s)| s.spec.process.is_none() && s.spec.skip != Some(true))
                                .map(|(k, s)| (k.clone(), s.spec.scale() > 0))
                                .collect();
                            let wants = w.iter().any(|(_, running)| *running);
                            (w.into_iter().map(|(k, _)| k).collect::<Vec<_>>(), wants)
                        }
                        Err(_) => (Vec::new(), false),
                    };
                    if news && wants_containers {
                        tracing::warn!(error = %e, retry_in = ?a.docker_delay, "cannot list containers");
                    }
                    inner.enqueue(waiting);
                }
            }
        }
        if a.listing.is_none() && a.next_docker_try.is_none_or(|t| Instant::now() >= t) {
            let docker = inner.clone();
            a.listing = Some(tokio::spawn(async move {
                let r = tokio::time::timeout(DOCKER_LIST_TIMEOUT, docker.docker.list()).await;
                let r = r.unwrap_or_else(|_| {
                    Err(RunError::EngineDown {
                        socket: docker.docker.socket().to_string(),
                        message: format!("no answer within {DOCKER_LIST_TIMEOUT:?}"),
                    })
                });
                // The loop looks again once the answer is in.
                docker.wake.notify_one();
                r
            }));
        }
    }

    /// One service: start what is missing, stop what is not wanted, roll outdated instances
    /// one at a time, and clear records nobody stands behind. Costs the service's instances.
    async fn reconcile(&mut self, id: &SvcId) {
        let inner = self.inner.clone();
        let (svc, records, placed) = match inner.picture.read() {
            Ok(p) => (
                p.services.get(id).cloned(),
                p.records.get(id).cloned().unwrap_or_default(),
                p.placements.get(id).cloned().unwrap_or_default(),
            ),
            Err(_) => return,
        };
        let from = (id.0.clone(), id.1.clone(), String::new());
        let mine = |sups: &BTreeMap<Key, Sup>| -> Vec<Key> {
            sups.range(from.clone()..)
                .take_while(|(k, _)| k.0 == id.0 && k.1 == id.1)
                .map(|(k, _)| k.clone())
                .collect()
        };
        for k in mine(&self.sups) {
            if self.sups.get(&k).is_some_and(|s| s.task.is_finished()) {
                self.sups.remove(&k);
            }
        }

        // Desired instances.
        let mut desired: BTreeMap<Key, String> = BTreeMap::new();
        // The template (a hash of the spec) matters only to instances wanted or running: a
        // service at scale 0 with nothing left skips it.
        let wanted = svc
            .as_ref()
            .filter(|s| s.spec.skip != Some(true))
            .map_or(0, |s| s.spec.scale().max(0));
        let running = self
            .sups
            .range(from.clone()..)
            .next()
            .is_some_and(|(k, _)| k.0 == id.0 && k.1 == id.1);
        let current = svc
            .as_ref()
            .filter(|_| wanted > 0 || running)
            .map(|s| template_hash(&s.spec, &s.meta));
        if let (Some(s), Some(template)) = (&svc, &current) {
            for i in 0..wanted {
                let iid = format!("{}-{i}", s.spec.name);
                // In a cluster, only what apply placed on this node.
                if inner.cfg.follows_placement && placed.get(&iid) != Some(&inner.cfg.node) {
                    continue;
                }
                desired.insert((id.0.clone(), id.1.clone(), iid), template.clone());
            }
        }
        let is_container = svc.as_ref().is_some_and(|s| s.spec.process.is_none());
        if is_container && !self.adopt.containers_listed {
            if let Some(reason) = &self.adopt.engine_error {
                for k in desired.keys() {
                    if records.get(&k.2).is_none_or(|r| &r.reason != reason) {
                        inner
                            .report(
                                k,
                                InstanceChange::Failed {
                                    reason: reason.clone(),
                                },
                            )
                            .await;
                    }
                }
            }
        }

        // Instances no longer wanted.
        let reason = if svc.is_some() {
            "scaled down"
        } else {
            "service deleted"
        };
        for k in mine(&self.sups) {
            if let Some(s) = self.sups.get_mut(&k) {
                if !desired.contains_key(&k) && !s.stopping {
                    stop_sup(s, reason.into());
                }
            }
        }
        // Adopted runs nobody wants any more.
        let unwanted: Vec<Key> = self
            .adopt
            .runs
            .keys()
            .filter(|k| k.0 == id.0 && k.1 == id.1 && !desired.contains_key(*k))
            .cloned()
            .collect();
        for k in unwanted {
            if let Some(f) = self.adopt.runs.remove(&k) {
                let record_exists = records.contains_key(&k.2);
                let inner2 = inner.clone();
                if let Ok(mut d) = self.draining.lock() {
                    d.insert(k.clone());
                }
                let draining = self.draining.clone();
                let sid = id.clone();
                // The grace its spec gives now (scaled down), else the one it started with
                // (the service is gone).
                let grace = svc.as_ref().map(|s| runner::grace(&s.spec)).or(f.grace);
                tokio::spawn(async move {
                    if record_exists && !inner2.drain(&k, reason.into()).await {
                        if let Ok(mut d) = draining.lock() {
                            d.remove(&k);
                        }
                        return;
                    }
                    let mut h = f.run.handle;
                    match &h {
                        RunHandle::Container { id } => {
                            let grace = match grace {
                                Some(g) => g,
                                None => inner2.docker.stop_timeout(id).await.unwrap_or(DEFAULT_GRACE),
                            };
                            // The container must go even if the engine is away for a while.
                            inner2
                                .until_done(id, "stop", || inner2.docker.stop(id, grace))
                                .await;
                            if let Err(e) = inner2.docker.remove_network_if_unused().await {
                                tracing::debug!(error = %e, "could not remove the container network");
                            }
                        }
                        _ => {
                            inner2
                                .process
                                .stop(&k.0, &k.2, &mut h, grace.unwrap_or(DEFAULT_GRACE))
                                .await;
                            inner2.process.remove(&k.0, &k.2);
                        }
                    }
                    // The secrets and configmaps written for it, in plain text.
                    inner2.remove_mounts(&k.0, &k.2);
                    if record_exists {
                        inner2.report(&k, InstanceChange::Removed).await;
                    }
                    if let Ok(mut d) = draining.lock() {
                        d.remove(&k);
                    }
                    inner2.enqueue([sid]);
                });
            }
        }

        // Rolling replacement: one outdated instance at a time, and only while every
        // up-to-date instance is settled. Settled means: the record describes this
        // supervisor's run (same template) and it is ready, or it ended and its restart policy
        // leaves it so (a job-like worker that finished); a record of the run it replaced,
        // not yet updated, does not count.
        let ready = |k: &Key, template: &str| {
            records.get(&k.2).is_some_and(|r| {
                r.template == template
                    && match r.phase {
                        Phase::Running => r.ready,
                        Phase::Exited => svc.as_ref().is_some_and(|s| {
                            let killed = r.reason.starts_with(supervisor::LIVENESS_KILLED);
                            !supervisor::restarts(&s.spec, r.exit_code, killed)
                        }),
                        _ => false,
                    }
            })
        };
        if let (Some(s), Some(current)) = (&svc, &current) {
            let keys = mine(&self.sups);
            let busy = keys.iter().any(|k| {
                let sup = &self.sups[k];
                sup.stopping || (&sup.template == current && !ready(k, &sup.template))
            }) || desired.keys().any(|k| !self.sups.contains_key(k));
            if !busy {
                let mut outdated: Vec<&Key> = keys
                    .iter()
                    .filter(|k| &self.sups[*k].template != current)
                    .collect();
                // Replace broken instances first: they serve nothing anyway.
                outdated.sort_by_key(|k| (ready(k, &self.sups[*k].template), k.2.clone()));
                if let Some(k) = outdated.first() {
                    let generation = s.meta.generation;
                    if let Some(sup) = self.sups.get_mut(*k) {
                        stop_sup(sup, format!("replaced by generation {generation}"));
                    }
                }
            }
        }

        // Start what is missing.
        if let Some(s) = &svc {
            for (k, template) in &desired {
                let draining = self.draining.lock().is_ok_and(|d| d.contains(k));
                if draining || self.sups.contains_key(k) || (is_container && !self.adopt.containers_listed) {
                    continue;
                }
                let found = self.adopt.runs.remove(k);
                let restarts = records.get(&k.2).map_or(0, |r| r.restarts);
                let (run, template) = match found {
                    Some(f) => {
                        tracing::info!(instance = %k.2, namespace = %k.0, "adopted a running instance");
                        (Some(f.run), f.template)
                    }
                    None => (None, template.clone()),
                };
                // A run adopted before a rollout reached it goes on as its own spec says.
                let own = match &run {
                    Some(_) => inner.spec_of(s, &template),
                    None => Some(s.spec.clone()),
                };
                let (stop_tx, stop_rx) = oneshot::channel();
                let sup = supervisor::Supervisor {
                    inner: inner.clone(),
                    key: k.clone(),
                    launch: launch(own.as_ref().unwrap_or(&s.spec), &k.2, template.clone()),
                    spec_known: own.is_some(),
                    generation: s.meta.generation,
                    adopt: run,
                    restarts: if Some(&template) == current.as_ref() {
                        restarts
                    } else {
                        0
                    },
                    stop: stop_rx,
                };
                let done = inner.clone();
                let sid = id.clone();
                let task = tokio::spawn(async move {
                    sup.run().await;
                    done.enqueue([sid]);
                });
                self.sups.insert(
                    k.clone(),
                    Sup {
                        template,
                        stopping: false,
                        stop: Some(stop_tx),
                        task,
                    },
                );
            }
        }

        // Records of this node with nobody behind them (runed died while removing them).
        for r in records.values() {
            let k = (r.namespace.clone(), r.service.clone(), r.id.clone());
            let moved =
                inner.cfg.follows_placement && placed.get(&r.id).is_some_and(|n| *n != inner.cfg.node);
            let ours = (r.node.is_empty() || r.node == inner.cfg.node) && !moved;
            // A run being stopped off the loop (an adopted one nobody wants) reports its own
            // removal once it is gone.
            let stopping = self.draining.lock().is_ok_and(|d| d.contains(&k));
            if ours
                && !stopping
                && !self.sups.contains_key(&k)
                && !desired.contains_key(&k)
                && !self.adopt.runs.contains_key(&k)
            {
                let container_unknown = r.runtime != "process" && !self.adopt.containers_listed;
                if !container_unknown {
                    inner.report(&k, InstanceChange::Removed).await;
                }
            }
        }
    }

    /// Removes the folders of process instances nobody wants.
    fn collect_garbage(&mut self) {
        self.last_gc = Instant::now();
        let mut keep: HashSet<(String, String)> = self
            .sups
            .keys()
            .chain(self.adopt.runs.keys())
            .map(|k| (k.0.clone(), k.2.clone()))
            .collect();
        if let Ok(p) = self.inner.picture.read() {
            for ((ns, _), s) in &p.services {
                for i in 0..s.spec.scale().max(0) {
                    keep.insert((ns.clone(), format!("{}-{i}", s.spec.name)));
                }
            }
        }
        self.inner
            .process
            .collect_garbage(|ns, id| keep.contains(&(ns.to_string(), id.to_string())));
    }
}

fn adopt_or_discard(inner: &Arc<Inner>, adopt: &mut Adoptable, f: Found) {
    let key = (f.namespace.clone(), f.service.clone(), f.id.clone());
    if f.running && !adopt.runs.contains_key(&key) {
        adopt.runs.insert(key, f);
        return;
    }
    // Ended while runed was away, or a duplicate: clear it away. An ended process's record
    // goes now, before any supervisor of the instance can start a run and record it.
    if !f.running && !matches!(f.run.handle, RunHandle::Container { .. }) {
        inner.process.forget_run(&f.namespace, &f.id);
        return;
    }
    let inner = inner.clone();
    tokio::spawn(async move {
        match &f.run.handle {
            RunHandle::Container { id } => {
                let _ = inner.docker.remove(id).await;
            }
            _ => {
                let mut h = f.run.handle;
                if f.running {
                    let _ = inner
                        .process
                        .stop(&f.namespace, &f.id, &mut h, f.grace.unwrap_or(DEFAULT_GRACE))
                        .await;
                }
            }
        }
    });
}

/// The orchestrator's picture as its projection sees it; weak, so a stopped orchestrator is
/// not kept alive by the projection.
struct PictureView(Weak<Inner>);

impl PictureView {
    fn inner(&self) -> Result<Arc<Inner>, ProjectionError> {
        self.0
            .upgrade()
            .ok_or_else(|| ProjectionError::View("the orchestrator is gone".into()))
    }
}

impl View for PictureView {
    async fn reset(&self, state: Vec<Delta>) -> Result<(), ProjectionError> {
        let inner = self.inner()?;
        let mut fresh = Picture::default();
        for d in &state {
            fresh.apply(d);
        }
        *inner
            .picture
            .write()
            .map_err(|e| ProjectionError::View(e.to_string()))? = fresh;
        inner.built.store(true, Ordering::SeqCst);
        if let Ok(mut q) = inner.queue.lock() {
            q.all = true;
        }
        inner.wake.notify_one();
        Ok(())
    }

    async fn apply(&self, deltas: &[&Delta]) -> Result<(), ProjectionError> {
        let inner = self.inner()?;
        let touched: BTreeSet<SvcId> = {
            let mut p = inner
                .picture
                .write()
                .map_err(|e| ProjectionError::View(e.to_string()))?;
            deltas.iter().filter_map(|d| p.apply(d)).collect()
        };
        inner.enqueue(touched);
        Ok(())
    }

    fn wants(&self, d: &Delta) -> bool {
        !matches!(
            d,
            Delta::Endpoints { .. } | Delta::Node { .. } | Delta::Namespace { .. }
        )
    }
}

fn stop_sup(s: &mut Sup, reason: String) {
    s.stopping = true;
    if let Some(tx) = s.stop.take() {
        let _ = tx.send(reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rune_statemachine::testing::{delta, fold};

    fn build<'a>(state: impl IntoIterator<Item = &'a Delta>) -> Picture {
        let mut p = Picture::default();
        for d in state {
            p.apply(d);
        }
        p
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// The projection contract: built from the state at one point and fed every later
        /// delta, the picture equals one built from the state at the end.
        #[test]
        fn fed_equals_built(ds in prop::collection::vec(delta(), 0..60), cut in 0usize..60) {
            let cut = cut.min(ds.len());
            let mut fed = build(&fold(&ds[..cut]));
            for d in &ds[cut..] {
                fed.apply(d);
            }
            prop_assert_eq!(fed, build(&fold(&ds)));
        }
    }
}
