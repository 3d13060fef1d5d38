//! Host processes as instances.
//!
//! Each instance gets a folder `<root>/<namespace>/<id>/` holding `output.log` (stdout and stderr,
//! written by the process itself, so it keeps running and logging when runed is killed) and
//! `state.json` (pid, start time, template), which is how a restarted runed finds it again. Every
//! instance leads its own process group, so stopping it reaches the children it spawned too.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{
    signal_group, ExecInput, ExecOutput, ExecSpec, Exit, Found, Launch, LogQuery, LogStream, Run, RunError,
    RunHandle,
};

/// What a restarted runed needs to find a process again.
#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    namespace: String,
    service: String,
    id: String,
    template: String,
    pid: i32,
    start_time: u64,
    /// The spec's grace period at start, for a stop after the service is gone (absent in
    /// files of older builds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    grace_secs: Option<u64>,
}

/// Runs instances as host processes under a folder of runed's data dir.
#[derive(Debug, Clone)]
pub struct ProcessRunner {
    root: PathBuf,
    writer: Option<PathBuf>,
    volumes: super::host_volumes::HostVolumes,
    cgroups: super::cgroup::Cgroups,
}

/// The PATH given to processes, which inherit nothing else from runed's environment.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl ProcessRunner {
    /// A runner keeping its files under `root`; `writer` is the runed binary that timestamps
    /// output (see [`crate::logfile`]); `volumes` and `cgroups` give processes their storage
    /// and limits.
    pub fn new(
        root: impl Into<PathBuf>,
        writer: Option<PathBuf>,
        volumes: super::host_volumes::HostVolumes,
        cgroups: super::cgroup::Cgroups,
    ) -> Self {
        Self {
            root: root.into(),
            writer,
            volumes,
            cgroups,
        }
    }

    /// How resource limits reach processes on this host.
    pub fn cgroups(&self) -> &super::cgroup::Cgroups {
        &self.cgroups
    }

    /// The process services' volumes.
    pub fn volumes(&self) -> &super::host_volumes::HostVolumes {
        &self.volumes
    }

    /// Where the process's stdout and stderr go: the pipe of a log writer, or the file itself.
    fn output(&self, dir: &Path) -> Result<(Stdio, Stdio), RunError> {
        let path = dir.join("output.log");
        if let Some(w) = &self.writer {
            let mut cmd = std::process::Command::new(w);
            cmd.arg(crate::logfile::WRITER_ARG)
                .arg(&path)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                // Its own group: stopping the instance must not take the writer with it.
                .process_group(0);
            let mut child = tokio::process::Command::from(cmd).spawn().map_err(|e| {
                RunError::Runtime(format!("cannot start the log writer {}: {e}", w.display()))
            })?;
            let pipe = child
                .stdin
                .take()
                .ok_or_else(|| RunError::Runtime("the log writer has no input".into()))?
                .into_owned_fd()
                .map_err(|e| RunError::Runtime(format!("log writer pipe: {e}")))?;
            let pipe2 = pipe
                .try_clone()
                .map_err(|e| RunError::Runtime(format!("log writer pipe: {e}")))?;
            // Reap it when it ends (at the instance's end of output).
            tokio::spawn(async move {
                let _ = child.wait().await;
            });
            return Ok((Stdio::from(pipe), Stdio::from(pipe2)));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| RunError::Runtime(format!("cannot open the log file: {e}")))?;
        let log2 = log
            .try_clone()
            .map_err(|e| RunError::Runtime(format!("cannot open the log file: {e}")))?;
        Ok((Stdio::from(log), Stdio::from(log2)))
    }

    fn dir(&self, ns: &str, id: &str) -> PathBuf {
        self.root.join(ns).join(id)
    }

    /// The file an instance's output goes to.
    pub fn log_path(&self, ns: &str, id: &str) -> PathBuf {
        self.dir(ns, id).join("output.log")
    }

    /// Starts the process of an instance.
    pub async fn start(&self, l: &Launch) -> Result<Run, RunError> {
        let Some(p) = &l.spec.process else {
            return Err(RunError::Launch("service has no process block".into()));
        };
        let dir = self.dir(&l.namespace, &l.id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| RunError::Runtime(format!("cannot create {}: {e}", dir.display())))?;
        let (uid, gid) = identity(p.security_context.as_ref())?;
        let workdir = match &p.workdir {
            Some(w) => PathBuf::from(w),
            None => dir.clone(),
        };
        if !workdir.is_dir() {
            return Err(RunError::Launch(format!(
                "process.workdir {}: not a directory",
                workdir.display()
            )));
        }
        let mut mounts = l.mounts.clone();
        mounts.extend(self.volumes.prepare(l, uid, gid)?);
        // SAFETY: geteuid has no preconditions.
        if !mounts.is_empty() && unsafe { libc::geteuid() } != 0 {
            return Err(RunError::Launch(
                "secret, configmap and volume mounts of a process service need runed to run as root (they are bound in the process's own mount namespace)".into(),
            ));
        }
        let l = &Launch { mounts, ..l.clone() };
        for m in &l.mounts {
            // The mount point must exist on the host; the files are visible only inside the
            // process's own mount namespace.
            std::fs::create_dir_all(&m.target)
                .map_err(|e| RunError::Launch(format!("mount path {}: {e}", m.target.display())))?;
            // Volumes were handed over when made; what the workload put in them (links to
            // anywhere) is never walked by root.
            if !m.writable && (uid.is_some() || gid.is_some()) {
                chown_tree(&m.host, uid, gid).map_err(|e| {
                    RunError::Runtime(format!("cannot hand the mount files to the process user: {e}"))
                })?;
            }
        }
        let join = self
            .cgroups
            .create(&l.namespace, &l.id, &super::docker::resources(&l.spec))?;
        self.run_init_steps(l, &workdir, (uid, gid), join.as_ref())
            .await?;
        let (stdout, stderr) = self.output(&dir)?;
        if let Some(uid) = uid {
            // Without a writer the process appends to its log itself, so it must be allowed to.
            let _ = std::os::unix::fs::chown(dir.join("output.log"), Some(uid), gid);
        }
        let mut cmd = command(
            &p.command,
            p.args.iter().map(|a| a.0.as_str()),
            &workdir,
            l,
            (uid, gid),
            join.as_ref(),
        );
        cmd.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
        let spawned = tokio::process::Command::from(cmd).spawn();
        // The child holds its own copies of the group files until exec; runed needs none.
        drop(join);
        let child = spawned.map_err(|e| {
            let what = match e.kind() {
                std::io::ErrorKind::NotFound => "not found".to_string(),
                std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
                _ => e.to_string(),
            };
            RunError::Launch(format!("process.command {}: {what}", p.command))
        })?;
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| RunError::Runtime("the process ended before it could be tracked".into()))?;
        let state = StateFile {
            namespace: l.namespace.clone(),
            service: l.service.clone(),
            id: l.id.clone(),
            template: l.template.clone(),
            pid,
            start_time: start_time(pid).unwrap_or(0),
            grace_secs: Some(super::grace(&l.spec).as_secs()),
        };
        if let Err(e) = write_atomic(
            &dir.join("state.json"),
            &serde_json::to_vec(&state).unwrap_or_default(),
        ) {
            // Unrecorded, it would run on where no later runed can find it: it ends here.
            signal_group(pid, libc::SIGKILL);
            let mut child = child;
            let _ = child.wait().await;
            return Err(RunError::Runtime(format!("cannot record the process: {e}")));
        }
        Ok(Run {
            handle: RunHandle::Child { child, pid },
            address: "127.0.0.1".into(),
        })
    }

    /// Runs a process service's init steps on the host, in order, each to exit 0, with the
    /// instance's environment, mounts, volumes and limits. Each step's output goes to
    /// `init-<step>.log` in the instance's folder, replaced by its next run; what a step leaves
    /// running in its process group is killed when it ends, as a step container's would be.
    async fn run_init_steps(
        &self,
        l: &Launch,
        workdir: &Path,
        ids: (Option<u32>, Option<u32>),
        join: Option<&super::cgroup::Join>,
    ) -> Result<(), RunError> {
        for step in &l.spec.init_steps {
            let failed = |m: String| RunError::Launch(format!("init step '{}': {m}", step.name));
            let mut argv = step
                .command
                .as_ref()
                .map(super::docker::command_vec)
                .unwrap_or_default();
            argv.extend(step.args.iter().flatten().map(|a| a.0.clone()));
            let Some((prog, args)) = argv.split_first() else {
                return Err(failed("a process service's step needs a command".into()));
            };
            let path = self.init_log_path(&l.namespace, &l.id, &step.name);
            let out = std::fs::File::create(&path).map_err(|e| failed(format!("{}: {e}", path.display())))?;
            if ids.0.is_some() || ids.1.is_some() {
                let _ = std::os::unix::fs::chown(&path, ids.0, ids.1);
            }
            let err = out.try_clone().map_err(|e| failed(e.to_string()))?;
            let mut sl = l.clone();
            sl.env
                .extend(step.env.iter().map(|(k, v)| (k.clone(), v.0.clone())));
            let mut cmd = command(prog, args, workdir, &sl, ids, join);
            cmd.stdin(Stdio::null()).stdout(out).stderr(err);
            let mut child = tokio::process::Command::from(cmd)
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| failed(format!("{prog}: {e}")))?;
            let pid = child.id().and_then(|p| i32::try_from(p).ok());
            tracing::info!(instance = %l.id, step = %step.name, "init step started");
            let st = child.wait().await.map_err(|e| failed(e.to_string()))?;
            if let Some(pid) = pid {
                signal_group(pid, libc::SIGKILL);
            }
            let exit = exit_of(st);
            if exit.code != Some(0) {
                let why = if exit.code == Some(128 + i64::from(libc::SIGKILL))
                    && self.cgroups.oom_killed(&l.namespace, &l.id)
                {
                    "OOM-killed (memory limit reached)".to_string()
                } else {
                    exit.reason
                };
                return Err(RunError::Launch(format!(
                    "init step '{}' failed: {why}",
                    step.name
                )));
            }
            tracing::info!(instance = %l.id, step = %step.name, "init step done");
        }
        Ok(())
    }

    fn init_log_path(&self, ns: &str, id: &str, step: &str) -> PathBuf {
        self.dir(ns, id).join(format!("init-{step}.log"))
    }

    /// The output of an init step's last run; `None` when it has not run.
    pub fn init_step_logs(&self, ns: &str, id: &str, step: &str, q: &LogQuery) -> Option<LogStream> {
        let path = self.init_log_path(ns, id, step);
        path.exists().then(|| stream_file(path, q))
    }

    /// Waits until the run ends; a kill by the kernel's OOM killer in the instance's group is
    /// said as such, and the group goes.
    pub async fn wait(&self, ns: &str, id: &str, h: &mut RunHandle) -> Exit {
        let mut exit = self.wait_run(h).await;
        if exit.code == Some(128 + i64::from(libc::SIGKILL)) && self.cgroups.oom_killed(ns, id) {
            exit.reason = "OOM-killed (memory limit reached)".into();
        }
        self.cgroups.remove(ns, id);
        exit
    }

    async fn wait_run(&self, h: &mut RunHandle) -> Exit {
        match h {
            RunHandle::Child { child, .. } => match child.wait().await {
                Ok(st) => exit_of(st),
                Err(e) => Exit {
                    code: None,
                    reason: format!("lost track of the process: {e}"),
                },
            },
            RunHandle::Adopted { pid, start_time } => {
                while alive(*pid, *start_time) {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Exit {
                    code: None,
                    reason: "exited (code unknown: adopted after a restart of runed)".into(),
                }
            }
            RunHandle::Container { .. } => Exit {
                code: None,
                reason: "not a process".into(),
            },
        }
    }

    /// SIGTERM to the process group, SIGKILL after `grace`; returns how it ended.
    pub async fn stop(&self, ns: &str, id: &str, h: &mut RunHandle, grace: Duration) -> Exit {
        let pid = match h {
            RunHandle::Child { pid, .. } | RunHandle::Adopted { pid, .. } => *pid,
            RunHandle::Container { .. } => return self.wait(ns, id, h).await,
        };
        signal_group(pid, libc::SIGTERM);
        let exit = match tokio::time::timeout(grace, self.wait(ns, id, h)).await {
            Ok(e) => e,
            Err(_) => {
                signal_group(pid, libc::SIGKILL);
                let mut e = self.wait(ns, id, h).await;
                e.reason = format!("killed after the {}s grace period", grace.as_secs());
                e
            }
        };
        // Children that ignored SIGTERM after their leader exited go too.
        signal_group(pid, libc::SIGKILL);
        let _ = std::fs::remove_file(self.dir(ns, id).join("state.json"));
        exit
    }

    /// SIGKILL to what is left of a run's process group (children of an instance that exited).
    pub fn kill_group(&self, h: &RunHandle) {
        if let RunHandle::Child { pid, .. } | RunHandle::Adopted { pid, .. } = h {
            signal_group(*pid, libc::SIGKILL);
        }
    }

    /// Forgets a run that has ended (its `state.json`), so nothing takes it for one to adopt
    /// and the instance's folder can be collected once the instance is no longer wanted. Only
    /// for a run known to have ended: a live one would be lost track of.
    pub fn forget_run(&self, ns: &str, id: &str) {
        let _ = std::fs::remove_file(self.dir(ns, id).join("state.json"));
    }

    /// Forgets an instance's files once it is removed for good.
    pub fn remove(&self, ns: &str, id: &str) {
        let _ = std::fs::remove_dir_all(self.dir(ns, id));
    }

    /// Removes the folders of instances `keep` does not want and that run nothing.
    pub fn collect_garbage(&self, keep: impl Fn(&str, &str) -> bool) {
        for ns_dir in read_dirs(&self.root) {
            let ns = ns_dir
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            for inst in read_dirs(&ns_dir) {
                let id = inst.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                if !keep(&ns, id) && !inst.join("state.json").exists() {
                    let _ = std::fs::remove_dir_all(&inst);
                }
            }
            let _ = std::fs::remove_dir(&ns_dir);
        }
    }

    /// Processes recorded by an earlier runed, running or not.
    pub fn list(&self) -> Vec<Found> {
        let mut out = Vec::new();
        for ns in read_dirs(&self.root) {
            for inst in read_dirs(&ns) {
                let Ok(bytes) = std::fs::read(inst.join("state.json")) else {
                    continue;
                };
                let Ok(st) = serde_json::from_slice::<StateFile>(&bytes) else {
                    tracing::warn!(path = %inst.display(), "unreadable process state file; ignoring it");
                    continue;
                };
                out.push(Found {
                    running: alive(st.pid, st.start_time),
                    namespace: st.namespace,
                    service: st.service,
                    id: st.id,
                    template: st.template,
                    run: Run {
                        handle: RunHandle::Adopted {
                            pid: st.pid,
                            start_time: st.start_time,
                        },
                        address: "127.0.0.1".into(),
                    },
                    grace: st.grace_secs.map(Duration::from_secs),
                });
            }
        }
        out
    }

    /// The output of an instance: whole lines, filtered by time when asked.
    pub fn logs(&self, ns: &str, id: &str, q: &LogQuery) -> LogStream {
        stream_file(self.log_path(ns, id), q)
    }

    /// Runs a command beside an instance: same user, working directory and environment.
    pub fn exec(
        &self,
        l: &Launch,
        spec: &ExecSpec,
    ) -> Result<(mpsc::Sender<ExecInput>, mpsc::Receiver<ExecOutput>), RunError> {
        let Some(p) = &l.spec.process else {
            return Err(RunError::Launch("service has no process block".into()));
        };
        let Some((prog, args)) = spec.command.split_first() else {
            return Err(RunError::Launch("command: is empty".into()));
        };
        let (uid, gid) = identity(p.security_context.as_ref())?;
        let workdir = p
            .workdir
            .clone()
            .map(PathBuf::from)
            .unwrap_or_else(|| self.dir(&l.namespace, &l.id));
        if spec.tty {
            return super::pty::spawn(prog, args, &workdir, &l.env, uid, gid, spec.cols, spec.rows);
        }
        // Beside the instance: its volumes bound as it has them, inside its resource groups.
        let mut l = l.clone();
        l.mounts.extend(self.volumes.prepare(&l, uid, gid)?);
        let join = self.cgroups.existing(&l.namespace, &l.id);
        let mut cmd = command(prog, args, &workdir, &l, (uid, gid), join.as_ref());
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| RunError::Launch(format!("{prog}: {e}")))?;
        drop(join);
        let (in_tx, mut in_rx) = mpsc::channel::<ExecInput>(16);
        let (out_tx, out_rx) = mpsc::channel::<ExecOutput>(16);
        let mut stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        tokio::spawn(async move {
            while let Some(i) = in_rx.recv().await {
                match i {
                    ExecInput::Stdin(b) => {
                        if let Some(s) = stdin.as_mut() {
                            if s.write_all(&b).await.is_err() {
                                stdin = None;
                            }
                        }
                    }
                    ExecInput::Eof => stdin = None,
                    ExecInput::Resize { .. } => {}
                }
            }
        });
        let pump = |r: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>,
                    tx: mpsc::Sender<ExecOutput>,
                    err: bool| async move {
            let Some(mut r) = r else { return };
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = r.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let b = bytes::Bytes::copy_from_slice(&buf[..n]);
                let o = if err {
                    ExecOutput::Stderr(b)
                } else {
                    ExecOutput::Stdout(b)
                };
                if tx.send(o).await.is_err() {
                    break;
                }
            }
        };
        let a = pump(stdout.map(|s| Box::new(s) as _), out_tx.clone(), false);
        let b = pump(stderr.map(|s| Box::new(s) as _), out_tx.clone(), true);
        let pid = child.id().and_then(|p| i32::try_from(p).ok());
        tokio::spawn(async move {
            tokio::select! {
                _ = async { tokio::join!(a, b) } => {}
                // Nobody reads any more (a probe timed out, the client went away): the command
                // and whatever it started end now, rather than run on unseen.
                _ = out_tx.closed() => {
                    if let Some(pid) = pid {
                        signal_group(pid, libc::SIGKILL);
                    }
                }
            }
            let code = match child.wait().await {
                Ok(st) => exit_of(st).code.unwrap_or(-1),
                Err(_) => -1,
            };
            let _ = out_tx.send(ExecOutput::Exit(code)).await;
        });
        Ok((in_tx, out_rx))
    }
}

/// A log file's lines as `rune logs` asks for them (tail, since, follow, timestamps).
fn stream_file(path: PathBuf, q: &LogQuery) -> LogStream {
    let q = q.clone();
    let (tx, rx) = mpsc::channel::<Result<bytes::Bytes, RunError>>(16);
    tokio::task::spawn_blocking(move || {
        let f = loop {
            match std::fs::File::open(&path) {
                Ok(f) => break f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && q.follow => {
                    if tx.is_closed() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(e) => {
                    let _ = tx.blocking_send(Err(RunError::Runtime(format!("cannot read the log: {e}"))));
                    return;
                }
            }
        };
        let mut f = f;
        let start = if q.tail > 0 {
            tail_offset(&mut f, q.tail).unwrap_or(0)
        } else {
            0
        };
        if f.seek(SeekFrom::Start(start)).is_err() {
            return;
        }
        let mut r = std::io::BufReader::new(f);
        let mut line = Vec::new();
        loop {
            // A line without its newline yet is kept until the rest arrives.
            match std::io::BufRead::read_until(&mut r, b'\n', &mut line) {
                Ok(_) if line.last() == Some(&b'\n') => {
                    let (ts, text) = crate::logfile::split(&line);
                    let keep = q.since_s == 0 || ts.is_none_or(|t| t >= q.since_s);
                    if keep {
                        let out = if q.timestamps { line.clone() } else { text.to_vec() };
                        if tx.blocking_send(Ok(bytes::Bytes::from(out))).is_err() {
                            return;
                        }
                    }
                    line.clear();
                }
                Ok(_) => {
                    if !q.follow || tx.is_closed() {
                        if !line.is_empty() {
                            let _ = tx.blocking_send(Ok(bytes::Bytes::from(std::mem::take(&mut line))));
                        }
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(RunError::Runtime(format!("cannot read the log: {e}"))));
                    return;
                }
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// A command as an instance runs: its own process group, its user, its working directory, and
/// only its environment (plus PATH and HOME), nothing inherited from runed.
fn command<I, S>(
    prog: &str,
    args: I,
    workdir: &Path,
    l: &Launch,
    (uid, gid): (Option<u32>, Option<u32>),
    join: Option<&super::cgroup::Join>,
) -> std::process::Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = std::process::Command::new(prog);
    cmd.args(args)
        .current_dir(workdir)
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", workdir)
        .envs(&l.env)
        .process_group(0);
    if l.mounts.is_empty() && join.is_none() {
        if let Some(gid) = gid {
            cmd.gid(gid);
        }
        if let Some(uid) = uid {
            cmd.uid(uid);
        }
    } else {
        // std drops privileges before pre_exec runs, and joining a group and mounting need
        // them: the child does both first and drops privileges itself.
        let fds: Vec<std::os::fd::RawFd> = join
            .map(|j| j.procs.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect())
            .unwrap_or_default();
        prepare_child(&mut cmd, &l.mounts, fds, uid, gid);
    }
    cmd
}

/// Hands runed's own mount files to the process user; links are changed, never followed.
fn chown_tree(p: &Path, uid: Option<u32>, gid: Option<u32>) -> std::io::Result<()> {
    std::os::unix::fs::lchown(p, uid, gid)?;
    if std::fs::symlink_metadata(p)?.is_dir() {
        for e in std::fs::read_dir(p)? {
            chown_tree(&e?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// In the child, before exec: its resource groups joined, a private mount namespace (when it
/// has mounts), each mount bound (read-only unless it is a writable volume), then the
/// group and user dropped. Everything the child touches is prepared here, before fork, because
/// between fork and exec only async-signal-safe calls are allowed.
fn prepare_child(
    cmd: &mut std::process::Command,
    mounts: &[super::MountDir],
    cgroup_fds: Vec<std::os::fd::RawFd>,
    uid: Option<u32>,
    gid: Option<u32>,
) {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    let binds: Vec<(CString, CString, bool)> = mounts
        .iter()
        .filter_map(|m| {
            Some((
                CString::new(m.host.as_os_str().as_bytes()).ok()?,
                CString::new(m.target.as_os_str().as_bytes()).ok()?,
                m.writable,
            ))
        })
        .collect();
    let root = c"/";
    let none = c"none";
    // SAFETY: the closure only makes raw syscalls (unshare, mount, setgroups, setgid, setuid) on
    // data owned by the closure; it allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            super::cgroup::join_in_child(&cgroup_fds)?;
            if !binds.is_empty() && libc::unshare(libc::CLONE_NEWNS) != 0 {
                return fail();
            }
            if !binds.is_empty()
                && libc::mount(
                    none.as_ptr(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
            {
                return fail();
            }
            for (src, dst, writable) in &binds {
                if libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ) != 0
                {
                    return fail();
                }
                if *writable {
                    continue;
                }
                let ro = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
                if libc::mount(
                    none.as_ptr(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    ro,
                    std::ptr::null(),
                ) != 0
                {
                    return fail();
                }
            }
            // As std does when it drops privileges: no supplementary groups of root's survive.
            if (uid.is_some() || gid.is_some()) && libc::setgroups(0, std::ptr::null()) != 0 {
                return fail();
            }
            if let Some(g) = gid {
                if libc::setgid(g) != 0 {
                    return fail();
                }
            }
            if let Some(u) = uid {
                if libc::setuid(u) != 0 {
                    return fail();
                }
            }
            Ok(())
        });
    }
}

fn exit_of(st: std::process::ExitStatus) -> Exit {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => Exit {
            code: Some(i64::from(c)),
            reason: format!("exited with code {c}"),
        },
        (None, Some(s)) => Exit {
            code: Some(128 + i64::from(s)),
            reason: format!("killed by signal {s}"),
        },
        _ => Exit {
            code: None,
            reason: "ended".into(),
        },
    }
}

/// The directories in `p` (none when it cannot be read).
pub(super) fn read_dirs(p: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(p) else {
        return vec![];
    };
    rd.filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect()
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, path)
}

/// Offset of the start of the last `n` lines.
fn tail_offset(f: &mut std::fs::File, n: u64) -> std::io::Result<u64> {
    let len = f.seek(SeekFrom::End(0))?;
    let mut pos = len;
    let mut newlines = 0u64;
    let mut buf = vec![0u8; 8192];
    // A trailing newline ends the last line; it does not start a new one.
    let mut skip_last = true;
    while pos > 0 {
        let step = buf.len().min(pos as usize);
        pos -= step as u64;
        f.seek(SeekFrom::Start(pos))?;
        f.read_exact(&mut buf[..step])?;
        for i in (0..step).rev() {
            if buf[i] == b'\n' {
                if skip_last && pos + i as u64 == len - 1 {
                    skip_last = false;
                    continue;
                }
                newlines += 1;
                if newlines == n {
                    return Ok(pos + i as u64 + 1);
                }
            }
        }
        skip_last = false;
    }
    Ok(0)
}

/// Field 22 of /proc/<pid>/stat: start time in clock ticks after boot.
fn start_time(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; fields after it are plain.
    let rest = &s[s.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` still is the process that started at `start` (and not a zombie).
fn alive(pid: i32, start: u64) -> bool {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = s.rfind(')').and_then(|i| s.get(i + 2..i + 3)).unwrap_or("X");
    state != "Z" && state != "X" && (start == 0 || start_time(pid) == Some(start))
}

/// Resolves `securityContext.user/group` (names or numbers) through /etc/passwd and /etc/group.
fn identity(
    sc: Option<&rune_statemachine::spec::SecurityContext>,
) -> Result<(Option<u32>, Option<u32>), RunError> {
    let Some(sc) = sc else { return Ok((None, None)) };
    let mut uid = None;
    let mut gid = None;
    if let Some(u) = &sc.user {
        let (id, primary) = lookup("/etc/passwd", u.as_str())
            .ok_or_else(|| RunError::Launch(format!("securityContext.user: unknown user '{}'", u.0)))?;
        uid = Some(id);
        gid = primary;
    }
    if let Some(g) = &sc.group {
        let (id, _) = lookup("/etc/group", g.as_str())
            .ok_or_else(|| RunError::Launch(format!("securityContext.group: unknown group '{}'", g.0)))?;
        gid = Some(id);
    }
    Ok((uid, gid))
}

/// `(id, primary gid)` of a name or number in a passwd-style file.
fn lookup(file: &str, name: &str) -> Option<(u32, Option<u32>)> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    for line in text.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 3 {
            continue;
        }
        if f[0] == name || f[2] == name {
            return Some((f[2].parse().ok()?, f.get(3).and_then(|g| g.parse().ok())));
        }
    }
    // A bare number is accepted even without an entry, as chown and docker do.
    name.parse().ok().map(|n| (n, None))
}

/// The environment as `K=V` strings (for runtimes that take that form).
pub fn env_list(env: &BTreeMap<String, String>) -> Vec<String> {
    env.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_finds_the_last_lines() {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, b"a\nb\nc\nd\n").unwrap();
        let off = tail_offset(&mut f, 2).unwrap();
        f.seek(SeekFrom::Start(off)).unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "c\nd\n");
        assert_eq!(tail_offset(&mut f, 10).unwrap(), 0);
    }

    #[test]
    fn users_resolve_by_name_and_number() {
        assert_eq!(lookup("/etc/passwd", "root").map(|x| x.0), Some(0));
        assert_eq!(lookup("/etc/passwd", "4242").map(|x| x.0), Some(4242));
        assert!(lookup("/etc/passwd", "no-such-user-xyz").is_none());
        let sc = rune_statemachine::spec::SecurityContext {
            user: Some(rune_statemachine::spec::Text("no-such-user-xyz".into())),
            group: None,
        };
        let e = identity(Some(&sc)).unwrap_err();
        assert!(e.to_string().contains("unknown user 'no-such-user-xyz'"), "{e}");
    }

    #[test]
    fn own_process_is_alive_and_a_wrong_start_time_is_not() {
        let me = std::process::id() as i32;
        let st = start_time(me).unwrap();
        assert!(alive(me, st));
        assert!(!alive(me, st + 1));
    }
}
