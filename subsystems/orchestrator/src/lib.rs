//! The orchestrator: keeps each service's instances running as declared, as a projection of the log.
//!
//! - [`Orchestrator`] owns the reconcile loop. It reads the desired state (services) and the
//!   observed state (instance records) from the state machine, compares them with the
//!   supervisors it runs, and starts, stops or replaces instances (one at a time for rollouts).
//! - [`supervisor`] runs one instance: dependencies, start, probes, restart policy and backoff.
//! - [`runner`] talks to Docker (bollard) or starts host processes.
//!
//! Invariant: the orchestrator never writes the state tables. Everything it observes goes to the
//! log as `InstanceEvents`, in the order it happened, through one reporter task.

pub mod inject;
pub mod logfile;
pub mod probe;
pub mod runner;
mod supervisor;

pub use inject::SecretSource;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rune_log::Log;
use rune_statemachine::instance::{
    instances_prefix, template_hash, InstanceChange, InstanceEvent, InstanceRecord,
};
use rune_statemachine::store::{list_records, services_prefix, ServiceRecord};
use rune_statemachine::{Command, STATE_TABLE};
use tokio::sync::{mpsc, oneshot, Notify};

use runner::{docker::DockerRunner, process::ProcessRunner, Exit, Found, Launch, Run, RunHandle};
pub use runner::{ExecInput, ExecOutput, ExecSpec, LogQuery, LogStream, RunError};

/// `(namespace, service, instance id)`.
pub type Key = (String, String, String);

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

pub(crate) struct Inner {
    cfg: OrchestratorConfig,
    log: Arc<Log>,
    process: ProcessRunner,
    docker: DockerRunner,
    events: mpsc::UnboundedSender<InstanceEvent>,
    live: Mutex<HashMap<Key, Live>>,
    generations: Mutex<HashMap<Key, u64>>,
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

    /// Starts the reconcile loop and the reporter.
    pub fn start(log: Arc<Log>, cfg: OrchestratorConfig) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            process: ProcessRunner::new(cfg.data_dir.join("instances"), cfg.log_writer.clone()),
            docker: DockerRunner::new(
                cfg.docker_socket.clone(),
                cfg.node.clone(),
                cfg.cluster.clone(),
                cfg.docker_client,
            ),
            cfg,
            log: log.clone(),
            events: tx,
            live: Mutex::new(HashMap::new()),
            generations: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            shutting_down: AtomicBool::new(false),
            reconciled_at: Mutex::new(Instant::now()),
        });
        let shutdown = Arc::new(Notify::new());
        let reporter_stop = Arc::new(Notify::new());
        let reporter = tokio::spawn(report_loop(log, rx, reporter_stop.clone()));
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
    fn report(&self, key: &Key, change: InstanceChange) {
        let _ = self.events.send(InstanceEvent {
            namespace: key.0.clone(),
            service: key.1.clone(),
            id: key.2.clone(),
            change,
        });
    }

    fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    fn generation_of(&self, key: &Key) -> u64 {
        self.generations
            .lock()
            .ok()
            .and_then(|g| g.get(key).copied())
            .unwrap_or(0)
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
        Ok(launch(&svc, &rec.id, rec.template.clone()))
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
        let l = &self.resolved(l, true)?;
        if l.spec.process.is_some() {
            self.process.start(l).await
        } else {
            self.docker.start(l).await
        }
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

    async fn wait(&self, run: &mut Run) -> Exit {
        match &run.handle {
            RunHandle::Container { id } => {
                let id = id.clone();
                self.docker.wait(&id).await
            }
            _ => self.process.wait(&mut run.handle).await,
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

    /// Removes an instance's leftovers (its exited container, its process folder).
    async fn cleanup(&self, l: &Launch) {
        let _ = std::fs::remove_dir_all(inject::mounts_dir(
            &self.cfg.run_dir,
            &self.cfg.owner(),
            &l.namespace,
            &l.id,
        ));
        // A process instance's folder (its log) stays until the instance is no longer wanted:
        // a replacement under the same id appends to it. The reconciler collects the rest.
        if l.spec.process.is_none() {
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

/// What one instance of a service runs.
fn launch(svc: &ServiceRecord, id: &str, template: String) -> Launch {
    let ns = svc.spec.namespace().to_string();
    let mut env: BTreeMap<String, String> = svc
        .spec
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    env.insert("RUNE_SERVICE_NAME".into(), svc.spec.name.clone());
    env.insert("RUNE_SERVICE_NAMESPACE".into(), ns.clone());
    env.insert("RUNE_INSTANCE_ID".into(), id.to_string());
    Launch {
        namespace: ns,
        service: svc.spec.name.clone(),
        id: id.to_string(),
        template,
        spec: Arc::new(svc.spec.clone()),
        env,
        mounts: Vec::new(),
    }
}

/// Proposes reports in order, batching whatever queued up while the previous write was in flight.
/// On `stop`, writes what is queued and returns.
async fn report_loop(log: Arc<Log>, mut rx: mpsc::UnboundedReceiver<InstanceEvent>, stop: Arc<Notify>) {
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
        let mut events = vec![first];
        while events.len() < 256 {
            match rx.try_recv() {
                Ok(e) => events.push(e),
                Err(_) => break,
            }
        }
        let mut delay = Duration::from_millis(100);
        loop {
            match log
                .propose(Command::InstanceEvents {
                    events: events.clone(),
                })
                .await
            {
                Ok(p) => {
                    if let Err(rej) = p.outcome {
                        tracing::warn!(error = %rej, "instance report rejected");
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

/// Longest the reconciler waits for the Docker Engine to list containers in one pass.
const DOCKER_LIST_TIMEOUT: Duration = Duration::from_secs(10);

/// What the reconciler found already running when it started.
#[derive(Default)]
struct Adoptable {
    runs: HashMap<Key, Found>,
    containers_listed: bool,
    next_docker_try: Option<Instant>,
    docker_delay: Duration,
}

async fn reconcile_loop(inner: Arc<Inner>, shutdown: Arc<Notify>) {
    let mut sups: HashMap<Key, Sup> = HashMap::new();
    let mut adopt = Adoptable {
        docker_delay: Duration::from_secs(1),
        ..Default::default()
    };
    for f in inner.process.list() {
        adopt_or_discard(&inner, &mut adopt, f);
    }
    let mut applied = inner.log.applied();
    loop {
        if reconcile(&inner, &mut sups, &mut adopt).await {
            if let Ok(mut at) = inner.reconciled_at.lock() {
                *at = Instant::now();
            }
        }
        tokio::select! {
            r = applied.changed() => if r.is_err() { break },
            _ = inner.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = shutdown.notified() => break,
        }
    }
    // Leave instances running; stop supervising them.
    for (_, s) in sups.drain() {
        s.task.abort();
        let _ = s.task.await;
    }
}

fn adopt_or_discard(inner: &Arc<Inner>, adopt: &mut Adoptable, f: Found) {
    let key = (f.namespace.clone(), f.service.clone(), f.id.clone());
    if f.running && !adopt.runs.contains_key(&key) {
        adopt.runs.insert(key, f);
        return;
    }
    // Ended while runed was away, or a duplicate: clear it away.
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
                        .stop(&f.namespace, &f.id, &mut h, Duration::from_secs(10))
                        .await;
                }
            }
        }
    });
}

/// One pass: returns whether it read the state and acted on it.
async fn reconcile(inner: &Arc<Inner>, sups: &mut HashMap<Key, Sup>, adopt: &mut Adoptable) -> bool {
    let (services, records) = {
        let txn = match inner.log.read() {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the state; skipping this reconcile");
                return false;
            }
        };
        let t = match txn.open_table(STATE_TABLE) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the state; skipping this reconcile");
                return false;
            }
        };
        // A failed read skips this round: read as "no services", it would stop every instance.
        let services: Vec<ServiceRecord> = match list_records(&t, &services_prefix(None)) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the services; skipping this reconcile");
                return false;
            }
        };
        let records: Vec<InstanceRecord> = match list_records(&t, &instances_prefix(None, None)) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the instance records; skipping this reconcile");
                return false;
            }
        };
        (services, records)
    };
    // Containers are adopted once the engine answers; until then container services wait.
    if !adopt.containers_listed && adopt.next_docker_try.is_none_or(|t| Instant::now() >= t) {
        // Bounded: a hung engine must not stall every other service's reconcile.
        let listed = match tokio::time::timeout(DOCKER_LIST_TIMEOUT, inner.docker.list()).await {
            Ok(r) => r,
            Err(_) => Err(RunError::EngineDown {
                socket: inner.docker.socket().to_string(),
                message: format!("no answer within {DOCKER_LIST_TIMEOUT:?}"),
            }),
        };
        match listed {
            Ok(found) => {
                adopt.containers_listed = true;
                for f in found {
                    adopt_or_discard(inner, adopt, f);
                }
                tracing::info!("docker engine reachable; containers reconciled");
            }
            Err(e) => {
                adopt.next_docker_try = Some(Instant::now() + adopt.docker_delay);
                adopt.docker_delay = (adopt.docker_delay * 2).min(Duration::from_secs(30));
                let wants_containers = services
                    .iter()
                    .any(|s| s.spec.process.is_none() && s.spec.scale() > 0);
                if wants_containers {
                    tracing::warn!(error = %e, retry_in = ?adopt.docker_delay, "cannot list containers");
                }
                // Until the engine answers, container instances cannot be adopted or started:
                // say so on each (once), rather than leave what the last runed saw.
                let reason = e.to_string();
                for s in services
                    .iter()
                    .filter(|s| s.spec.process.is_none() && s.spec.skip != Some(true))
                {
                    let ns = s.spec.namespace();
                    for i in 0..s.spec.scale().max(0) {
                        let id = format!("{}-{i}", s.spec.name);
                        let said = records
                            .iter()
                            .any(|r| r.namespace == ns && r.id == id && r.reason == reason);
                        if !said {
                            let key = (ns.to_string(), s.spec.name.clone(), id);
                            inner.report(
                                &key,
                                InstanceChange::Failed {
                                    reason: reason.clone(),
                                },
                            );
                        }
                    }
                }
            }
        }
    }
    sups.retain(|_, s| !s.task.is_finished());

    // Desired instances.
    let mut desired: BTreeMap<Key, (&ServiceRecord, String)> = BTreeMap::new();
    for s in &services {
        if s.spec.skip == Some(true) {
            continue;
        }
        let template = template_hash(&s.spec, &s.meta);
        let ns = s.spec.namespace().to_string();
        for i in 0..s.spec.scale().max(0) {
            let id = format!("{}-{i}", s.spec.name);
            desired.insert((ns.clone(), s.spec.name.clone(), id), (s, template.clone()));
        }
    }
    let service_exists = |k: &Key| {
        services
            .iter()
            .any(|s| s.spec.namespace() == k.0 && s.spec.name == k.1)
    };

    // Instances no longer wanted.
    for (k, s) in sups.iter_mut() {
        if !desired.contains_key(k) && !s.stopping {
            let reason = if service_exists(k) {
                "scaled down"
            } else {
                "service deleted"
            };
            stop_sup(s, reason.into());
        }
    }
    // Adopted runs nobody wants any more.
    let unwanted: Vec<Key> = adopt
        .runs
        .keys()
        .filter(|k| !desired.contains_key(*k))
        .cloned()
        .collect();
    for k in unwanted {
        if let Some(f) = adopt.runs.remove(&k) {
            let record_exists = records
                .iter()
                .any(|r| r.namespace == k.0 && r.service == k.1 && r.id == k.2);
            let inner2 = inner.clone();
            let key = k.clone();
            tokio::spawn(async move {
                let mut h = f.run.handle;
                match &h {
                    RunHandle::Container { id } => {
                        let _ = inner2.docker.stop(id, Duration::from_secs(10)).await;
                    }
                    _ => {
                        inner2
                            .process
                            .stop(&key.0, &key.2, &mut h, Duration::from_secs(10))
                            .await;
                        inner2.process.remove(&key.0, &key.2);
                    }
                }
                if record_exists {
                    inner2.report(&key, InstanceChange::Removed);
                }
            });
        }
    }

    // Rolling replacement: one outdated instance per service at a time, and only while every
    // up-to-date instance is ready.
    // Ready means: the record describes this supervisor's run (same template) and it is ready;
    // a record of the run it replaced, not yet updated, does not count.
    let ready = |k: &Key, template: &str| {
        records.iter().any(|r| {
            r.namespace == k.0
                && r.service == k.1
                && r.id == k.2
                && r.template == template
                && r.phase == rune_statemachine::instance::Phase::Running
                && r.ready
        })
    };
    let mut by_service: BTreeMap<(String, String), Vec<Key>> = BTreeMap::new();
    for k in sups.keys() {
        by_service
            .entry((k.0.clone(), k.1.clone()))
            .or_default()
            .push(k.clone());
    }
    for ((ns, name), keys) in by_service {
        let Some(s) = services
            .iter()
            .find(|s| s.spec.namespace() == ns && s.spec.name == name)
        else {
            continue;
        };
        let current = template_hash(&s.spec, &s.meta);
        let busy = keys.iter().any(|k| {
            let sup = &sups[k];
            sup.stopping || (sup.template == current && !ready(k, &sup.template))
        }) || desired
            .keys()
            .any(|k| k.0 == ns && k.1 == name && !sups.contains_key(k));
        if busy {
            continue;
        }
        let mut outdated: Vec<&Key> = keys.iter().filter(|k| sups[*k].template != current).collect();
        // Replace broken instances first: they serve nothing anyway.
        outdated.sort_by_key(|k| (ready(k, &sups[*k].template), k.2.clone()));
        if let Some(k) = outdated.first() {
            let generation = s.meta.generation;
            if let Some(sup) = sups.get_mut(*k) {
                stop_sup(sup, format!("replaced by generation {generation}"));
            }
        }
    }

    // Start what is missing.
    for (k, (svc, template)) in &desired {
        if sups.contains_key(k) {
            continue;
        }
        let is_container = svc.spec.process.is_none();
        if is_container && !adopt.containers_listed {
            continue;
        }
        if let Ok(mut g) = inner.generations.lock() {
            g.insert(k.clone(), svc.meta.generation);
        }
        let found = adopt.runs.remove(k);
        let restarts = records
            .iter()
            .find(|r| r.namespace == k.0 && r.service == k.1 && r.id == k.2)
            .map(|r| r.restarts)
            .unwrap_or(0);
        let (run, template) = match found {
            Some(f) => {
                tracing::info!(instance = %k.2, namespace = %k.0, "adopted a running instance");
                (Some(f.run), f.template)
            }
            None => (None, template.clone()),
        };
        let (stop_tx, stop_rx) = oneshot::channel();
        let sup = supervisor::Supervisor {
            inner: inner.clone(),
            key: k.clone(),
            launch: launch(svc, &k.2, template.clone()),
            adopt: run,
            restarts: if template == template_hash(&svc.spec, &svc.meta) {
                restarts
            } else {
                0
            },
            stop: stop_rx,
        };
        let wake = inner.clone();
        let task = tokio::spawn(async move {
            sup.run().await;
            wake.wake.notify_one();
        });
        sups.insert(
            k.clone(),
            Sup {
                template,
                stopping: false,
                stop: Some(stop_tx),
                task,
            },
        );
    }

    // Folders of process instances that are no longer wanted.
    let keep: std::collections::HashSet<(String, String)> = desired
        .keys()
        .chain(sups.keys())
        .chain(adopt.runs.keys())
        .map(|k| (k.0.clone(), k.2.clone()))
        .collect();
    inner
        .process
        .collect_garbage(|ns, id| keep.contains(&(ns.to_string(), id.to_string())));

    // Records of this node with nobody behind them (runed died while removing them).
    for r in &records {
        let k = (r.namespace.clone(), r.service.clone(), r.id.clone());
        let ours = r.node.is_empty() || r.node == inner.cfg.node;
        if ours && !sups.contains_key(&k) && !desired.contains_key(&k) && !adopt.runs.contains_key(&k) {
            let container_unknown = r.runtime != "process" && !adopt.containers_listed;
            if !container_unknown {
                inner.report(&k, InstanceChange::Removed);
            }
        }
    }
    true
}

fn stop_sup(s: &mut Sup, reason: String) {
    s.stopping = true;
    if let Some(tx) = s.stop.take() {
        let _ = tx.send(reason);
    }
}
