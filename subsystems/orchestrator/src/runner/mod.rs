//! The two ways an instance runs: a Docker container or a host process.
//!
//! Both runners answer the same questions (start, wait, stop, logs, exec, what is already
//! running) so the supervisor above them never asks which one it has.

pub mod cgroup;
pub mod docker;
pub mod host_volumes;

/// `node-cluster8`: what names this runed's objects outside its data dir (containers, their
/// network, mount directories), so that runeds sharing a host (same node name, other data
/// dirs) never meet. Just the node before the cluster has an identity.
pub fn owner_name(node: &str, cluster: &str) -> String {
    if cluster.is_empty() {
        node.to_string()
    } else {
        format!("{node}-{}", cluster.chars().take(8).collect::<String>())
    }
}
pub mod process;
mod pty;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use rune_statemachine::spec::ServiceSpec;

/// Everything needed to start one instance.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Namespace of the service.
    pub namespace: String,
    /// Name of the service.
    pub service: String,
    /// `<service>-<index>`.
    pub id: String,
    /// Template hash, recorded on the container or process so adoption can compare.
    pub template: String,
    /// The service spec.
    pub spec: Arc<ServiceSpec>,
    /// The environment, built-ins included.
    pub env: BTreeMap<String, String>,
    /// Secret and configmap files to mount read-only (filled at start).
    pub mounts: Vec<MountDir>,
    /// Pull credentials by registry host, for the images of this start (filled at start).
    pub pull_auth: BTreeMap<String, Result<crate::registry::PullAuth, RunError>>,
}

/// A directory of files on the host, mounted read-only into an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountDir {
    /// Where the files are on the host (under the runtime directory).
    pub host: std::path::PathBuf,
    /// Where the instance sees them.
    pub target: std::path::PathBuf,
    /// Bound read-write (a volume); secret and configmap files are always read-only.
    pub writable: bool,
}

/// Failures of a runner, worded for `rune get instances`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RunError {
    /// The Docker Engine cannot be reached; retried with backoff.
    #[error("docker engine unreachable at {socket}: {message}")]
    EngineDown {
        /// Socket path.
        socket: String,
        /// What failed.
        message: String,
    },
    /// The image is not present and cannot be pulled.
    #[error("image {image}: {message}")]
    Image {
        /// Image reference.
        image: String,
        /// What failed.
        message: String,
    },
    /// The command, user, or working directory is unusable.
    #[error("{0}")]
    Launch(String),
    /// Anything else the runtime reported.
    #[error("{0}")]
    Runtime(String),
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, when known; signals are 128+n as shells report them.
    pub code: Option<i64>,
    /// `exited with code 1`, `killed by signal 9`, `OOM-killed`.
    pub reason: String,
}

/// Identifies a started run, enough to wait for it, stop it and adopt it again.
#[derive(Debug)]
pub enum RunHandle {
    /// A process started by this runed, whose exit status it can collect.
    Child {
        /// The child.
        child: tokio::process::Child,
        /// Its pid, also its process group.
        pid: i32,
    },
    /// A process adopted after a restart of runed; only its liveness can be watched.
    Adopted {
        /// Its pid, also its process group.
        pid: i32,
        /// Its start time in clock ticks since boot, so a reused pid is not mistaken for it.
        start_time: u64,
    },
    /// A container.
    Container {
        /// Container id.
        id: String,
    },
}

impl RunHandle {
    /// The id shown as the instance's runtime id.
    pub fn runtime_id(&self) -> String {
        match self {
            RunHandle::Child { pid, .. } | RunHandle::Adopted { pid, .. } => pid.to_string(),
            RunHandle::Container { id } => id.clone(),
        }
    }
}

/// A run in progress.
#[derive(Debug)]
pub struct Run {
    /// What runs.
    pub handle: RunHandle,
    /// Where its ports listen.
    pub address: String,
}

/// Something already running when runed started, found by its labels or state file.
#[derive(Debug)]
pub struct Found {
    /// Namespace.
    pub namespace: String,
    /// Service.
    pub service: String,
    /// Instance id.
    pub id: String,
    /// Template it was started with.
    pub template: String,
    /// Whether it still runs.
    pub running: bool,
    /// The run, to adopt.
    pub run: Run,
    /// Its grace period between SIGTERM and SIGKILL, as its spec said at start (a process's
    /// `state.json`; a container's engine keeps its own, `StopTimeout`): what a stop of a run
    /// whose service is gone gives it.
    pub grace: Option<std::time::Duration>,
}

/// What `rune logs` asks for.
#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    /// Keep streaming new output.
    pub follow: bool,
    /// Only the last N lines (0 = all).
    pub tail: u64,
    /// Only output since this Unix time in seconds (0 = all).
    pub since_s: i64,
    /// Prefix each line with its time.
    pub timestamps: bool,
}

/// A stream of log bytes.
pub type LogStream = Pin<Box<dyn Stream<Item = Result<bytes::Bytes, RunError>> + Send>>;

/// A command to run inside an instance (`rune exec`).
#[derive(Debug, Clone)]
pub struct ExecSpec {
    /// argv.
    pub command: Vec<String>,
    /// Allocate a terminal.
    pub tty: bool,
    /// Terminal size.
    pub cols: u16,
    /// Terminal size.
    pub rows: u16,
}

/// Input to a running exec.
#[derive(Debug)]
pub enum ExecInput {
    /// Bytes for its stdin.
    Stdin(bytes::Bytes),
    /// The client's terminal changed size.
    Resize {
        /// Columns.
        cols: u16,
        /// Rows.
        rows: u16,
    },
    /// No more stdin.
    Eof,
}

/// Output of a running exec.
#[derive(Debug)]
pub enum ExecOutput {
    /// Bytes from stdout (or the terminal).
    Stdout(bytes::Bytes),
    /// Bytes from stderr.
    Stderr(bytes::Bytes),
    /// The command ended.
    Exit(i64),
}

/// Splits a command given as a string (run by `sh -c`) or a list (run as is).
pub fn argv(c: &rune_statemachine::spec::StringOrList) -> Vec<String> {
    match c {
        rune_statemachine::spec::StringOrList::One(s) => {
            vec!["/bin/sh".into(), "-c".into(), s.clone()]
        }
        rune_statemachine::spec::StringOrList::Many(v) => v.clone(),
    }
}

/// Grace period between SIGTERM and SIGKILL.
pub fn grace(spec: &ServiceSpec) -> std::time::Duration {
    let s = spec.stop_grace_period_seconds.unwrap_or(10).clamp(0, 3600);
    std::time::Duration::from_secs(s as u64)
}

/// Sends `sig` to the process group `pid` leads (instances and exec'd commands start their
/// own). Never to pid 0 or 1, which would address runed's own group or every process.
pub(crate) fn signal_group(pid: i32, sig: i32) {
    if pid <= 1 {
        return;
    }
    // SAFETY: kill(2) has no memory effects; a negative pid addresses the process group the
    // instance leads (it was started with process_group(0) or setsid()).
    unsafe {
        libc::kill(-pid, sig);
    }
}
