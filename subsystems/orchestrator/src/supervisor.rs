//! One task per instance: wait for dependencies, start, probe, restart with backoff, stop.
//!
//! A supervisor never writes state: each change it observes is reported as an
//! [`InstanceChange`], which the reporter proposes to the log in order.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rune_statemachine::deps::{resolve, DepKind, DepRef, ReadyWhen};
use rune_statemachine::instance::{instances_prefix, InstanceChange, InstanceRecord, Phase};
use rune_statemachine::network::EndpointPort;
use rune_statemachine::spec::{Probe, ServiceSpec};
use rune_statemachine::store::{configmap_key, list_records, secret_key, service_key};
use rune_statemachine::STATE_TABLE;
use tokio::sync::oneshot;

use crate::probe::{self, Timing, Tracker};
use crate::runner::{grace, Exit, Launch, Run};
use crate::{Inner, Key, ProbeLive};

/// How a run ended, from the supervisor's point of view.
enum Ended {
    /// The process or container ended by itself.
    Exited(Exit),
    /// The liveness probe failed past its threshold; the instance was killed.
    Unhealthy(Exit),
    /// runed asked it to stop.
    Stop(String),
}

/// Restart policies of the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    Always,
    OnFailure,
    Never,
}

/// How the reason of a run killed for failing its liveness probe begins: its record says
/// `Exited` (with the code it exited with) until the restart's `Backoff` follows.
pub(crate) const LIVENESS_KILLED: &str = "killed: liveness probe failed";

/// Whether a run that ended with `code` is started again: `killed` for failing its liveness
/// probe, which restarts it unless the policy says never, whatever its exit code (a server
/// that exits 0 on SIGTERM is not done), as Kubernetes does.
pub(crate) fn restarts(spec: &ServiceSpec, code: Option<i64>, killed: bool) -> bool {
    match policy(spec) {
        Policy::Always => true,
        Policy::OnFailure => killed || code != Some(0),
        Policy::Never => false,
    }
}

fn policy(spec: &ServiceSpec) -> Policy {
    match spec
        .restart_policy
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("never") => Policy::Never,
        Some("onfailure") | Some("on-failure") => Policy::OnFailure,
        _ => Policy::Always,
    }
}

/// The supervisor of one instance.
pub(crate) struct Supervisor {
    pub inner: Arc<Inner>,
    pub key: Key,
    pub launch: Launch,
    /// The service's generation when this supervisor was started, for its `Scheduled`.
    pub generation: u64,
    pub adopt: Option<Run>,
    /// `launch` holds the spec the adopted run was started from (else the current one, when
    /// the service's history no longer has it: the run's ports are then left as recorded).
    pub spec_known: bool,
    pub restarts: u32,
    pub stop: oneshot::Receiver<String>,
}

impl Supervisor {
    fn has_readiness(&self) -> bool {
        self.launch
            .spec
            .health
            .as_ref()
            .and_then(|h| h.readiness.as_ref())
            .is_some()
    }

    async fn report(&self, change: InstanceChange) {
        self.inner.report(&self.key, change).await;
    }

    pub async fn run(mut self) {
        if self.adopt.is_none() {
            self.report(InstanceChange::Scheduled {
                node: self.inner.cfg.node.clone(),
                runtime: self.launch.spec.runtime().to_string(),
                template: self.launch.template.clone(),
                generation: self.generation,
            })
            .await;
        }
        let mut streak: u32 = 0;
        loop {
            let mut run = match self.adopt.take() {
                Some(run) => {
                    self.report(InstanceChange::Started {
                        address: run.address.clone(),
                        runtime_id: run.handle.runtime_id(),
                        adopted: true,
                        readiness_probe: self.has_readiness(),
                        // Unless its own spec is known, what it listens on stays as its
                        // record has it.
                        ports: self
                            .spec_known
                            .then(|| EndpointPort::of_spec(&self.launch.spec.ports)),
                    })
                    .await;
                    run
                }
                None => {
                    if let Err(reason) = self.wait_dependencies().await {
                        return self.finish(None, &reason).await;
                    }
                    match self.inner.start(&self.launch).await {
                        Ok(run) => {
                            self.report(InstanceChange::Started {
                                address: run.address.clone(),
                                runtime_id: run.handle.runtime_id(),
                                adopted: false,
                                readiness_probe: self.has_readiness(),
                                ports: Some(EndpointPort::of_spec(&self.launch.spec.ports)),
                            })
                            .await;
                            run
                        }
                        Err(e) => {
                            tracing::warn!(instance = %self.key.2, error = %e, "start failed");
                            self.report(InstanceChange::Failed {
                                reason: e.to_string(),
                            })
                            .await;
                            match self.backoff(&mut streak, None, e.to_string()).await {
                                Some(()) => continue,
                                None => return,
                            }
                        }
                    }
                }
            };
            self.inner.set_live(&self.key, &run);
            let started = Instant::now();
            let ended = {
                let inner = self.inner.clone();
                let key = self.key.clone();
                let launch = self.launch.clone();
                let address = run.address.clone();
                let runtime_id = run.handle.runtime_id();
                tokio::select! {
                    e = self.inner.wait(&self.launch.namespace, &self.launch.id, &mut run) => Ended::Exited(e),
                    m = probes(inner, key, launch, address, runtime_id) => {
                        let e = self.inner.stop(&self.launch, &mut run).await;
                        Ended::Unhealthy(Exit { code: e.code, reason: format!("{LIVENESS_KILLED}: {m}") })
                    }
                    r = &mut self.stop => Ended::Stop(r.unwrap_or_else(|_| "runed is shutting down".into())),
                }
            };
            let killed = matches!(ended, Ended::Unhealthy(_));
            let (exit, why) = match ended {
                Ended::Stop(reason) => {
                    if !self.inner.drain(&self.key, reason.clone()).await {
                        return;
                    }
                    let e = self.inner.stop(&self.launch, &mut run).await;
                    return self.finish(Some(e), &reason).await;
                }
                Ended::Exited(e) => {
                    // A failure says what the instance last said, where a crash loop shows it.
                    let why = match e.code {
                        Some(0) => e.reason.clone(),
                        _ => match self.inner.last_words(&self.key, &run.handle).await {
                            Some(line) => format!("{}: {line}", e.reason),
                            None => e.reason.clone(),
                        },
                    };
                    (e, why)
                }
                Ended::Unhealthy(e) => (e.clone(), e.reason),
            };
            self.inner.clear_live(&self.key);
            // Whatever the instance left behind in its process group goes with it.
            self.inner.process.kill_group(&run.handle);
            self.report(InstanceChange::Exited {
                code: exit.code,
                reason: why.clone(),
            })
            .await;
            let restart = restarts(&self.launch.spec, exit.code, killed);
            if !restart {
                let reason = (&mut self.stop)
                    .await
                    .unwrap_or_else(|_| "runed is shutting down".into());
                return self.finish(None, &reason).await;
            }
            // A run that lasted is not part of a crash loop: start the backoff over.
            if started.elapsed() > self.inner.cfg.backoff_reset {
                streak = 0;
            }
            if self.backoff(&mut streak, Some(started), why).await.is_none() {
                return;
            }
        }
    }

    /// Waits out the crash-loop delay. `None` when asked to stop meanwhile (already finished).
    async fn backoff(&mut self, streak: &mut u32, _started: Option<Instant>, reason: String) -> Option<()> {
        *streak += 1;
        self.restarts += 1;
        let cfg = &self.inner.cfg;
        let factor = 2u32.saturating_pow(streak.saturating_sub(1).min(20));
        let delay = cfg.backoff_base.saturating_mul(factor).min(cfg.backoff_max);
        self.report(InstanceChange::Backoff {
            restarts: self.restarts,
            delay_ms: delay.as_millis() as u64,
            reason,
        })
        .await;
        tokio::select! {
            _ = tokio::time::sleep(delay) => Some(()),
            r = &mut self.stop => {
                let reason = r.unwrap_or_else(|_| "runed is shutting down".into());
                self.finish(None, &reason).await;
                None
            }
        }
    }

    /// Removes what is left of the instance and reports it gone.
    async fn finish(&self, _exit: Option<Exit>, reason: &str) {
        self.inner.clear_live(&self.key);
        if self.inner.is_shutting_down() {
            // runed is stopping, not the instance: leave everything for the next runed to adopt.
            return;
        }
        self.inner.cleanup(&self.launch).await;
        tracing::info!(instance = %self.key.2, namespace = %self.key.0, reason, "instance removed");
        self.report(InstanceChange::Removed).await;
    }

    /// Holds the start back until every dependency is ready. `Err` carries a stop reason.
    async fn wait_dependencies(&mut self) -> Result<(), String> {
        let deps = resolve(&self.launch.spec);
        if deps.is_empty() {
            return Ok(());
        }
        let began = Instant::now();
        let mut said = String::new();
        let mut applied = self.inner.log.applied();
        loop {
            let waiting: Vec<String> = {
                let (records, exist) = self.inner.read_dependencies(&deps);
                deps.iter()
                    .zip(exist)
                    .filter(|(d, exists)| !ready(d, *exists, &records))
                    .filter(|(d, exists)| {
                        let timed_out = d
                            .timeout_seconds
                            .is_some_and(|t| began.elapsed() > Duration::from_secs(t.max(0) as u64));
                        // Optional: start anyway when it is missing or not ready in time.
                        !(d.optional && (!exists || timed_out))
                    })
                    .map(|(d, exists)| {
                        let mut s = d.display();
                        if !exists {
                            s.push_str(" (it does not exist)");
                        } else if let Some(t) = d.timeout_seconds {
                            if began.elapsed() > Duration::from_secs(t.max(0) as u64) {
                                s.push_str(&format!(" (not ready after {t}s)"));
                            }
                        }
                        s
                    })
                    .collect()
            };
            if waiting.is_empty() {
                return Ok(());
            }
            let reason = format!("waiting for {}", waiting.join(", "));
            if reason != said {
                self.report(InstanceChange::Waiting {
                    reason: reason.clone(),
                })
                .await;
                said = reason;
            }
            tokio::select! {
                _ = applied.changed() => {}
                // Timeouts of optional dependencies pass without any write.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                r = &mut self.stop => return Err(r.unwrap_or_else(|_| "runed is shutting down".into())),
            }
        }
    }
}

/// Secrets and configmaps are ready when they exist; services when an instance reaches
/// `ready_when`.
fn ready(d: &DepRef, exists: bool, records: &[InstanceRecord]) -> bool {
    if d.kind != DepKind::Service || !exists {
        return exists;
    }
    records
        .iter()
        .filter(|r| r.namespace == d.namespace && r.service == d.name)
        .any(|r| match d.ready_when {
            ReadyWhen::Started => {
                matches!(
                    r.phase,
                    Phase::Running | Phase::Unhealthy | Phase::Exited | Phase::Backoff
                ) || r.started_at_ms > 0
            }
            ReadyWhen::Running => matches!(r.phase, Phase::Running | Phase::Unhealthy),
            ReadyWhen::Healthy => r.phase == Phase::Running && r.ready,
        })
}

/// Runs both probes; returns only when liveness fails past its threshold.
async fn probes(inner: Arc<Inner>, key: Key, launch: Launch, address: String, runtime_id: String) -> String {
    let health = launch.spec.health.clone().unwrap_or_default();
    let readiness = async {
        match &health.readiness {
            Some(p) => {
                probe_loop(&inner, &key, &launch, &address, &runtime_id, "readiness", p).await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    let liveness = async {
        match &health.liveness {
            Some(p) => probe_loop(&inner, &key, &launch, &address, &runtime_id, "liveness", p).await,
            None => std::future::pending::<String>().await,
        }
    };
    tokio::select! {
        m = liveness => m,
        _ = readiness => std::future::pending::<String>().await,
    }
}

/// Checks one probe forever; for liveness, returns the message of the failure that crossed the
/// threshold. Only transitions are reported to the log; every result is kept for `rune health`.
async fn probe_loop(
    inner: &Arc<Inner>,
    key: &Key,
    launch: &Launch,
    address: &str,
    runtime_id: &str,
    name: &str,
    p: &Probe,
) -> String {
    let timing = Timing::of(p);
    let is_liveness = name == "liveness";
    let mut tracker = Tracker::new(timing);
    tokio::time::sleep(timing.initial_delay).await;
    let mut tick = tokio::time::interval(timing.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = check(inner, launch, address, runtime_id, p, timing.timeout).await;
        let (ok, message) = match result {
            Ok(m) => (true, m),
            Err(m) => (false, m),
        };
        let changed = tracker.record(ok, &message, is_liveness);
        inner.set_probe(
            key,
            name,
            ProbeLive {
                ok: tracker.state(),
                last_ok: ok,
                last_message: message.clone(),
                last_at_ms: rune_log::now_ms(),
            },
        );
        if let Some(state) = changed {
            inner
                .report(
                    key,
                    InstanceChange::Probe {
                        probe: name.into(),
                        ok: state,
                        message: message.clone(),
                    },
                )
                .await;
            if is_liveness && !state {
                return message;
            }
        }
    }
}

async fn check(
    inner: &Arc<Inner>,
    launch: &Launch,
    address: &str,
    runtime_id: &str,
    p: &Probe,
    timeout: Duration,
) -> Result<String, String> {
    let host = p.host.clone().unwrap_or_else(|| {
        if address.is_empty() {
            "127.0.0.1".into()
        } else {
            address.into()
        }
    });
    match p.kind.as_str() {
        "http" | "tcp" => {
            let Some(port) = probe::resolve_port(&p.port, &launch.spec) else {
                return Err("the probe's port is not a port of the service".into());
            };
            if p.kind == "http" {
                probe::http(&host, port, p, timeout).await
            } else {
                probe::tcp(&host, port, timeout).await
            }
        }
        "exec" => {
            let Some(c) = &p.command else {
                return Err("exec probe without a command".into());
            };
            inner
                .exec_probe(launch, runtime_id, crate::runner::argv(c), timeout)
                .await
        }
        other => Err(format!("unknown probe type {other}")),
    }
}

/// Reads of the state for dependency checks.
impl Inner {
    /// Every instance record, and whether each dependency's object exists, from one read.
    fn read_dependencies(&self, deps: &[DepRef]) -> (Vec<InstanceRecord>, Vec<bool>) {
        let Ok(txn) = self.log.read() else {
            return (vec![], vec![false; deps.len()]);
        };
        let Ok(t) = txn.open_table(STATE_TABLE) else {
            return (vec![], vec![false; deps.len()]);
        };
        let exist = deps
            .iter()
            .map(|d| {
                let key = match d.kind {
                    DepKind::Service => service_key(&d.namespace, &d.name),
                    DepKind::Secret => secret_key(&d.namespace, &d.name),
                    DepKind::Configmap => configmap_key(&d.namespace, &d.name),
                };
                t.get(key.as_str()).ok().flatten().is_some()
            })
            .collect();
        let records = list_records(&t, &instances_prefix(None, None)).unwrap_or_default();
        (records, exist)
    }
}

/// The grace period of a launch.
pub(crate) fn grace_of(l: &Launch) -> Duration {
    grace(&l.spec)
}
