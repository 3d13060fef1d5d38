//! Instances: what the orchestrator observed of each running copy of a service, as log entries.
//!
//! The orchestrator never writes tables: every state change of an instance (scheduled, started,
//! ready, unhealthy, exited, restarted, removed) is an [`InstanceEvent`] it proposes, and apply
//! folds the events into one [`InstanceRecord`] per instance. Replaying the log therefore tells
//! the story of a crash loop, and rebuilds the same records.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::meta::ObjectMeta;
use crate::network::EndpointPort;
use crate::spec::ServiceSpec;

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Chosen to exist, not yet started.
    #[default]
    Pending,
    /// Held back until its dependencies are ready.
    Waiting,
    /// Its process or container runs.
    Running,
    /// Running, but its liveness probe fails.
    Unhealthy,
    /// Ended by itself; restarted or not per the restart policy.
    Exited,
    /// Could not be started or ended with an error; the reason says why.
    Failed,
    /// Waiting out the crash-loop backoff before the next start.
    Backoff,
    /// Being stopped (SIGTERM sent, SIGKILL after the grace period).
    Stopping,
}

impl Phase {
    /// The word the CLI shows.
    pub fn as_str(&self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Waiting => "Waiting",
            Phase::Running => "Running",
            Phase::Unhealthy => "Unhealthy",
            Phase::Exited => "Exited",
            Phase::Failed => "Failed",
            Phase::Backoff => "CrashLoopBackOff",
            Phase::Stopping => "Stopping",
        }
    }
}

/// The state of one probe as of its last transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ProbeState {
    /// Whether the probe passes (after its success/failure thresholds).
    pub ok: bool,
    /// The last result that changed the state, such as `HTTP 500` or `connection refused`.
    pub message: String,
    /// When the state last changed (proposer's clock).
    pub since_ms: i64,
}

/// One instance of a service, as last reported by the node that runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct InstanceRecord {
    /// `<service>-<index>`.
    pub id: String,
    /// Namespace of the service.
    pub namespace: String,
    /// Name of the service.
    pub service: String,
    /// Node that runs it.
    pub node: String,
    /// `container` or `process`.
    pub runtime: String,
    /// [`template_hash`] of the spec it runs, so a rollout knows what is outdated.
    pub template: String,
    /// Service generation it was scheduled at.
    pub generation: u64,
    /// Where it is in its life.
    pub phase: Phase,
    /// Whether it passes readiness (always true without a readiness probe once running).
    pub ready: bool,
    /// Why it is in this phase, for Failed, Waiting, Unhealthy and Backoff.
    pub reason: String,
    /// Exit code of the last run, when it ended and the code is known.
    pub exit_code: Option<i64>,
    /// Restarts so far (crashes, liveness failures).
    pub restarts: u32,
    /// Address its ports listen on: the container's IP, or the loopback for processes.
    pub address: String,
    /// Container id or process id.
    pub runtime_id: String,
    /// When it was scheduled.
    pub created_at_ms: i64,
    /// When its current run started; 0 when not running.
    pub started_at_ms: i64,
    /// When it last changed.
    pub updated_at_ms: i64,
    /// `liveness` and `readiness`, as of their last transition.
    #[serde(default)]
    pub probes: BTreeMap<String, ProbeState>,
    /// The ports of the spec its current run was started from: while a rollout changes a
    /// `targetPort`, the instances not yet replaced still listen on the old one. Empty for a
    /// run reported before runs recorded them (the service's current ports then apply).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<EndpointPort>,
}

/// An observed change of one instance, proposed by the node that runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceEvent {
    /// Namespace of the service.
    pub namespace: String,
    /// Name of the service.
    pub service: String,
    /// Instance id.
    pub id: String,
    /// What happened.
    pub change: InstanceChange,
}

/// What happened to an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum InstanceChange {
    /// The instance will run this template on this node.
    Scheduled {
        /// Node.
        node: String,
        /// `container` or `process`.
        runtime: String,
        /// Template hash.
        template: String,
        /// Service generation.
        generation: u64,
    },
    /// Held back, for example by a dependency.
    Waiting {
        /// Why.
        reason: String,
    },
    /// A run began.
    Started {
        /// Address.
        address: String,
        /// Container or process id.
        runtime_id: String,
        /// True when an existing run was adopted after a restart of runed.
        #[serde(default)]
        adopted: bool,
        /// The instance has a readiness probe: it starts not ready, in the same entry.
        #[serde(default)]
        readiness_probe: bool,
        /// The ports of the spec this run was started from (entry format v5). `None` for an
        /// adopted run whose spec is no longer known (its record keeps the ports it has), and
        /// in earlier entries.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ports: Option<Vec<EndpointPort>>,
    },
    /// A probe changed state.
    Probe {
        /// `liveness` or `readiness`.
        probe: String,
        /// Passing or not.
        ok: bool,
        /// The result that changed it.
        message: String,
    },
    /// The run ended.
    Exited {
        /// Exit code when known (unknown for adopted processes).
        code: Option<i64>,
        /// How it ended, e.g. `exited with code 1` or `killed by liveness probe`.
        reason: String,
    },
    /// The instance could not be started.
    Failed {
        /// Why.
        reason: String,
    },
    /// Restarting after a backoff.
    Backoff {
        /// Restarts so far, including this one.
        restarts: u32,
        /// How long until the next start.
        delay_ms: u64,
        /// Why it restarts.
        reason: String,
    },
    /// Being stopped.
    Stopping {
        /// Why, e.g. `scaled down` or `replaced by generation 3`.
        reason: String,
    },
    /// Stopped and removed; the record goes away.
    Removed,
}

impl InstanceChange {
    /// A short word for summaries.
    pub fn word(&self) -> &'static str {
        match self {
            InstanceChange::Scheduled { .. } => "scheduled",
            InstanceChange::Waiting { .. } => "waiting",
            InstanceChange::Started { .. } => "started",
            InstanceChange::Probe { .. } => "probe",
            InstanceChange::Exited { .. } => "exited",
            InstanceChange::Failed { .. } => "failed",
            InstanceChange::Backoff { .. } => "backoff",
            InstanceChange::Stopping { .. } => "stopping",
            InstanceChange::Removed => "removed",
        }
    }
}

/// Key of an instance.
pub fn instance_key(ns: &str, service: &str, id: &str) -> String {
    format!("instances/{ns}/{service}/{id}")
}

/// Key prefix of the instances of a service, of a namespace, or of all.
pub fn instances_prefix(ns: Option<&str>, service: Option<&str>) -> String {
    match (ns, service) {
        (Some(ns), Some(s)) => format!("instances/{ns}/{s}/"),
        (Some(ns), None) => format!("instances/{ns}/"),
        _ => "instances/".to_string(),
    }
}

/// The hash of what an instance runs: the spec without its scale, plus the restart counter, so
/// scaling replaces nothing and `rune restart` replaces everything. What only the network acts
/// on (policy, balancing, ingress exposure) is left out too: the data plane swaps those in place,
/// so changing them never restarts an instance or cuts its connections.
pub fn template_hash(spec: &ServiceSpec, meta: &ObjectMeta) -> String {
    let mut s = spec.clone();
    s.scale = None;
    s.autoscale = None;
    s.network_policy = None;
    s.discovery = None;
    s.expose = None;
    // Where instances run is not what they run: moving one is not a rollout.
    s.placement = None;
    // How an instance is taken out of service is read when it is.
    s.drain_seconds = None;
    let h = crate::meta::spec_hash(&s);
    format!("{}-{}", &h[..16], meta.restart_count)
}

/// Folds one event into the record (`None` when the instance is new). Returns the new record, or
/// `None` when it is removed, and a one-line summary.
pub fn fold(prev: Option<InstanceRecord>, ev: &InstanceEvent, now: i64) -> (Option<InstanceRecord>, String) {
    let mut r = prev.unwrap_or_else(|| InstanceRecord {
        id: ev.id.clone(),
        namespace: ev.namespace.clone(),
        service: ev.service.clone(),
        created_at_ms: now,
        ..Default::default()
    });
    r.updated_at_ms = now;
    let summary = match &ev.change {
        InstanceChange::Scheduled {
            node,
            runtime,
            template,
            generation,
        } => {
            r.node = node.clone();
            r.runtime = runtime.clone();
            r.template = template.clone();
            r.generation = *generation;
            r.phase = Phase::Pending;
            r.ready = false;
            r.reason.clear();
            r.exit_code = None;
            r.restarts = 0;
            r.address.clear();
            r.runtime_id.clear();
            r.started_at_ms = 0;
            r.probes.clear();
            r.ports.clear();
            r.created_at_ms = now;
            format!("scheduled on {node} ({runtime}, generation {generation})")
        }
        InstanceChange::Waiting { reason } => {
            r.phase = Phase::Waiting;
            r.reason = reason.clone();
            format!("waiting: {reason}")
        }
        InstanceChange::Started {
            address,
            runtime_id,
            adopted,
            readiness_probe,
            ports,
        } => {
            if let Some(ports) = ports {
                r.ports = ports.clone();
            }
            r.phase = Phase::Running;
            r.address = address.clone();
            r.runtime_id = runtime_id.clone();
            r.reason.clear();
            r.exit_code = None;
            r.probes.clear();
            if !adopted {
                r.started_at_ms = now;
            }
            // Without a readiness probe a running instance is ready; with one, not until it
            // passes.
            r.ready = !readiness_probe;
            if *readiness_probe {
                r.probes.insert(
                    "readiness".into(),
                    ProbeState {
                        ok: false,
                        message: "waiting for the first check".into(),
                        since_ms: now,
                    },
                );
            }
            let how = if *adopted { "adopted" } else { "started" };
            format!("{how} {} at {address}", short_id(runtime_id))
        }
        InstanceChange::Probe { probe, ok, message } => {
            r.probes.insert(
                probe.clone(),
                ProbeState {
                    ok: *ok,
                    message: message.clone(),
                    since_ms: now,
                },
            );
            match (probe.as_str(), ok) {
                ("readiness", ok) => r.ready = *ok,
                ("liveness", false) => {
                    r.phase = Phase::Unhealthy;
                    r.reason = message.clone();
                }
                ("liveness", true) if r.phase == Phase::Unhealthy => {
                    r.phase = Phase::Running;
                    r.reason.clear();
                }
                _ => {}
            }
            let state = if *ok { "passing" } else { "failing" };
            format!("{probe} {state}: {message}")
        }
        InstanceChange::Exited { code, reason } => {
            r.phase = if *code == Some(0) {
                Phase::Exited
            } else {
                Phase::Failed
            };
            r.exit_code = *code;
            r.reason = reason.clone();
            r.ready = false;
            r.started_at_ms = 0;
            reason.clone()
        }
        InstanceChange::Failed { reason } => {
            r.phase = Phase::Failed;
            r.reason = reason.clone();
            r.ready = false;
            r.started_at_ms = 0;
            format!("failed: {reason}")
        }
        InstanceChange::Backoff {
            restarts,
            delay_ms,
            reason,
        } => {
            // An instance that could not even start stays Failed, so the reason reads as what
            // it is (no image, bad command, unknown user); a crash loop shows its backoff.
            if !(r.phase == Phase::Failed && r.exit_code.is_none()) {
                r.phase = Phase::Backoff;
            }
            r.restarts = *restarts;
            r.ready = false;
            r.reason = reason.clone();
            format!(
                "restart #{restarts} in {:.1}s: {reason}",
                *delay_ms as f64 / 1000.0
            )
        }
        InstanceChange::Stopping { reason } => {
            r.phase = Phase::Stopping;
            r.ready = false;
            r.reason = reason.clone();
            format!("stopping: {reason}")
        }
        InstanceChange::Removed => return (None, "removed".into()),
    };
    (Some(r), summary)
}

fn short_id(id: &str) -> &str {
    if id.len() > 12 && id.chars().all(|c| c.is_ascii_hexdigit()) {
        &id[..12]
    } else {
        id
    }
}
