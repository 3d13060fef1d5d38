//! Resource limits of process services: one cgroup per instance, with the same figures the
//! Docker Engine is given for containers (`resources.cpu|memory.request|limit`).
//!
//! cgroup v2 (`memory.max`, `memory.low`, `cpu.max`, `cpu.weight`) where the unified hierarchy
//! carries the memory and cpu controllers; cgroup v1 (`memory.limit_in_bytes`,
//! `memory.soft_limit_in_bytes`, `cpu.cfs_quota_us`, `cpu.shares`) on hosts still on the
//! legacy or hybrid layout. Instance groups live under runed's own group (`rune-<owner>/`), so
//! what runed's unit is limited to bounds them too. A child joins its group between fork and
//! exec, before it drops privileges, so no instruction of it runs unlimited. Where neither
//! layout is writable, a process service that asks for a limit is refused with the reason
//! rather than run unbounded.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::docker::EngineResources;
use super::RunError;

/// CPU time accounting period for quotas, as Docker uses.
const PERIOD_US: i64 = 100_000;

/// How this host lets runed limit processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cgroups {
    /// The unified hierarchy: instance groups under `base`.
    V2 {
        /// `<runed's group>/rune-<owner>`.
        base: PathBuf,
    },
    /// The legacy hierarchies of the memory and cpu controllers.
    V1 {
        /// `<memory mount><runed's group>/rune-<owner>`.
        memory: PathBuf,
        /// `<cpu mount><runed's group>/rune-<owner>`.
        cpu: PathBuf,
    },
    /// Neither: why not.
    Unavailable(String),
}

/// The group files a child writes itself into before exec.
#[derive(Debug)]
pub struct Join {
    /// `cgroup.procs` of each group the instance is in, opened by runed.
    pub procs: Vec<std::fs::File>,
}

impl Cgroups {
    /// Finds what this host offers under `sysfs` (`/sys/fs/cgroup`), for runed's own groups as
    /// `/proc/self/cgroup` lists them, and prepares `rune-<owner>` there.
    pub fn detect(sysfs: &Path, proc_self_cgroup: &str, owner: &str) -> Self {
        let dir = format!("rune-{owner}");
        let own = |pred: &dyn Fn(&str) -> bool| -> Option<String> {
            proc_self_cgroup.lines().find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
                pred(ctrls).then(|| path.trim_start_matches('/').to_string())
            })
        };
        let controllers = std::fs::read_to_string(sysfs.join("cgroup.controllers")).unwrap_or_default();
        if controllers.split_whitespace().any(|c| c == "memory")
            && controllers.split_whitespace().any(|c| c == "cpu")
        {
            let Some(path) = own(&|c| c.is_empty()) else {
                return Cgroups::Unavailable(
                    "cgroup v2 is mounted but /proc/self/cgroup has no 0:: line".into(),
                );
            };
            let own = sysfs.join(path);
            return match v2_prepare(&own, &dir) {
                Ok(base) => Cgroups::V2 { base },
                Err(e) => Cgroups::Unavailable(format!("cgroup v2: {e}")),
            };
        }
        let v1 = |name: &str| -> Option<PathBuf> {
            let mount = sysfs.join(name);
            let path = own(&|c| c.split(',').any(|x| x == name))?;
            mount.join("tasks").exists().then(|| mount.join(path).join(&dir))
        };
        // Made when the first limited instance starts; tried (and left empty) here.
        let writable = |d: &Path| -> std::io::Result<()> {
            if d.is_dir() {
                return Ok(());
            }
            std::fs::create_dir_all(d)?;
            std::fs::remove_dir(d)
        };
        match (v1("memory"), v1("cpu")) {
            (Some(memory), Some(cpu)) => match (writable(&memory), writable(&cpu)) {
                (Ok(()), Ok(())) => Cgroups::V1 { memory, cpu },
                (Err(e), _) | (_, Err(e)) => Cgroups::Unavailable(format!("cgroup v1: cannot create rune-{owner}: {e}")),
            },
            _ => Cgroups::Unavailable(format!(
                "no cgroup v2 with the memory and cpu controllers, and no cgroup v1 memory and cpu hierarchies under {}",
                sysfs.display()
            )),
        }
    }

    /// One line for logs and status.
    pub fn describe(&self) -> String {
        match self {
            Cgroups::V2 { base } => format!("cgroup v2 under {}", base.display()),
            Cgroups::V1 { memory, cpu } => {
                format!("cgroup v1 under {} and {}", memory.display(), cpu.display())
            }
            Cgroups::Unavailable(why) => format!("unavailable: {why}"),
        }
    }

    fn dirs(&self, ns: &str, id: &str) -> Vec<PathBuf> {
        let leaf = format!("{ns}.{id}");
        match self {
            Cgroups::V2 { base } => vec![base.join(leaf)],
            Cgroups::V1 { memory, cpu } => vec![memory.join(&leaf), cpu.join(leaf)],
            Cgroups::Unavailable(_) => Vec::new(),
        }
    }

    /// A fresh group for a start of instance `ns/id` with `r`'s limits, or `None` when `r`
    /// asks for nothing. Refused when limits are asked for and cannot be enforced.
    pub fn create(&self, ns: &str, id: &str, r: &EngineResources) -> Result<Option<Join>, RunError> {
        if *r == EngineResources::default() {
            return Ok(None);
        }
        if let Cgroups::Unavailable(why) = self {
            if r.memory.is_some() || r.nano_cpus.is_some() {
                return Err(RunError::Launch(format!(
                    "resources: this node cannot enforce process limits ({why}); remove the limits or run the service as a container"
                )));
            }
            return Ok(None);
        }
        let io = |p: &Path, e: std::io::Error| RunError::Runtime(format!("cgroup {}: {e}", p.display()));
        let mut procs = Vec::new();
        for dir in self.dirs(ns, id) {
            // A group left by an earlier run (its processes are gone) would keep its counters.
            let _ = std::fs::remove_dir(&dir);
            std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
            let set = |file: &str, v: String| -> Result<(), RunError> {
                let p = dir.join(file);
                std::fs::write(&p, v).map_err(|e| io(&p, e))
            };
            match self {
                Cgroups::V2 { .. } => {
                    if let Some(m) = r.memory {
                        set("memory.max", m.to_string())?;
                        // An OOM kill takes the whole instance, as the engine's does.
                        let _ = set("memory.oom.group", "1".into());
                    }
                    if let Some(m) = r.memory_reservation {
                        set("memory.low", m.to_string())?;
                    }
                    if let Some(n) = r.nano_cpus {
                        set("cpu.max", format!("{} {PERIOD_US}", quota_us(n)))?;
                    }
                    if let Some(s) = r.cpu_shares {
                        set("cpu.weight", weight(s).to_string())?;
                    }
                }
                Cgroups::V1 { memory, .. } if dir.starts_with(memory) => {
                    if let Some(m) = r.memory {
                        set("memory.limit_in_bytes", m.to_string())?;
                    }
                    if let Some(m) = r.memory_reservation {
                        set("memory.soft_limit_in_bytes", m.to_string())?;
                    }
                }
                Cgroups::V1 { .. } => {
                    if let Some(n) = r.nano_cpus {
                        set("cpu.cfs_period_us", PERIOD_US.to_string())?;
                        set("cpu.cfs_quota_us", quota_us(n).to_string())?;
                    }
                    if let Some(s) = r.cpu_shares {
                        set("cpu.shares", s.to_string())?;
                    }
                }
                Cgroups::Unavailable(_) => {}
            }
            let p = dir.join("cgroup.procs");
            procs.push(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .map_err(|e| io(&p, e))?,
            );
        }
        Ok(Some(Join { procs }))
    }

    /// The groups of a running instance, to put a command run beside it (`rune exec`) in
    /// them; `None` when it has none.
    pub fn existing(&self, ns: &str, id: &str) -> Option<Join> {
        let procs: Vec<std::fs::File> = self
            .dirs(ns, id)
            .iter()
            .filter_map(|d| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("cgroup.procs"))
                    .ok()
            })
            .collect();
        (!procs.is_empty()).then_some(Join { procs })
    }

    /// Whether the kernel's OOM killer killed something in the instance's group.
    pub fn oom_killed(&self, ns: &str, id: &str) -> bool {
        let file = match self {
            Cgroups::V2 { .. } => "memory.events",
            Cgroups::V1 { .. } => "memory.oom_control",
            Cgroups::Unavailable(_) => return false,
        };
        self.dirs(ns, id).iter().any(|d| {
            std::fs::read_to_string(d.join(file)).is_ok_and(|t| {
                t.lines().any(|l| {
                    l.strip_prefix("oom_kill ")
                        .and_then(|n| n.trim().parse::<u64>().ok())
                        .is_some_and(|n| n > 0)
                })
            })
        })
    }

    /// Removes the instance's groups once nothing runs in them.
    pub fn remove(&self, ns: &str, id: &str) {
        for d in self.dirs(ns, id) {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// In the child between fork and exec: joins the groups. Only `write(2)` on descriptors
/// opened before the fork (async-signal-safe).
pub fn join_in_child(fds: &[std::os::fd::RawFd]) -> std::io::Result<()> {
    for fd in fds {
        // SAFETY: `fd` is an open descriptor owned by the parent's `Join`, alive until exec.
        if unsafe { libc::write(*fd, b"0".as_ptr().cast(), 1) } != 1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn quota_us(nano_cpus: i64) -> i64 {
    (nano_cpus.saturating_mul(PERIOD_US) / 1_000_000_000).max(1000)
}

/// cgroup v2's cpu.weight (1–10000, 100 default) for Docker's shares (2–262144, 1024 default).
fn weight(shares: i64) -> i64 {
    (1 + (shares.clamp(2, 262_144) - 2) * 9999 / 262_142).clamp(1, 10_000)
}

/// Creates `<parent>/<dir>` with the memory and cpu controllers for its children. The
/// no-internal-process rule forbids handing controllers down from a group runed itself is in,
/// and runed does not move itself: under systemd the unit's group must take the next runed's
/// main process at a restart. With `DelegateSubgroup=` (systemd 254+) runed runs in a leaf of
/// its unit's group, and the groups are made beside it.
fn v2_prepare(own: &Path, dir: &str) -> std::io::Result<PathBuf> {
    let enable = |p: &Path| -> std::io::Result<()> {
        std::fs::OpenOptions::new()
            .write(true)
            .open(p.join("cgroup.subtree_control"))?
            .write_all(b"+memory +cpu")
    };
    let delegated_leaf = own.file_name().is_some_and(|n| n == "supervisor" || n == "runed");
    let parent = match own.parent() {
        Some(p) if delegated_leaf => p.to_path_buf(),
        _ => own.to_path_buf(),
    };
    enable(&parent).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot hand the memory and cpu controllers down from {} ({e}); run runed in a delegated subgroup (systemd: Delegate=yes with DelegateSubgroup=supervisor)",
                parent.display()
            ),
        )
    })?;
    let base = parent.join(dir);
    std::fs::create_dir_all(&base)?;
    enable(&base)?;
    Ok(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_translate_as_the_engine_translates_them() {
        assert_eq!(quota_us(500_000_000), 50_000, "half a CPU");
        assert_eq!(quota_us(2_000_000_000), 200_000);
        assert_eq!(quota_us(1), 1000, "the kernel's floor");
        assert_eq!(weight(1024), 39);
        assert_eq!(weight(2), 1);
        assert_eq!(weight(262_144), 10_000);
    }

    #[test]
    fn nothing_usable_is_said_and_limits_are_refused_not_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let cg = Cgroups::detect(dir.path(), "0::/\n", "n1-abc");
        assert!(matches!(cg, Cgroups::Unavailable(_)), "{cg:?}");
        let limit = EngineResources {
            memory: Some(64 << 20),
            ..Default::default()
        };
        match cg.create("default", "api-0", &limit) {
            Err(RunError::Launch(m)) => assert!(m.contains("cannot enforce process limits"), "{m}"),
            other => panic!("{other:?}"),
        }
        // A request alone is a hint: the process starts without a group.
        let request = EngineResources {
            cpu_shares: Some(256),
            ..Default::default()
        };
        assert!(cg.create("default", "api-0", &request).unwrap().is_none());
        assert!(cg
            .create("default", "api-0", &EngineResources::default())
            .unwrap()
            .is_none());
    }

    #[test]
    fn v1_groups_get_the_limits_in_their_files() {
        // A fake v1 tree: the kernel's files are plain files here, which is enough to check
        // which figure lands where (the real hierarchy is exercised by runed's tests).
        let sys = tempfile::tempdir().unwrap();
        for c in ["memory", "cpu"] {
            std::fs::create_dir_all(sys.path().join(c).join("svc")).unwrap();
            std::fs::write(sys.path().join(c).join("tasks"), "").unwrap();
        }
        let cg = Cgroups::detect(sys.path(), "4:memory:/svc\n1:cpu,cpuacct:/svc\n0::/\n", "n1");
        let Cgroups::V1 { memory, cpu } = &cg else {
            panic!("{cg:?}")
        };
        assert_eq!(memory, &sys.path().join("memory/svc/rune-n1"));
        assert_eq!(cpu, &sys.path().join("cpu/svc/rune-n1"));
        // The kernel makes cgroup.procs in a new group; here it is made beforehand (which also
        // keeps create() from removing the non-empty directory).
        for d in [memory, cpu] {
            std::fs::create_dir_all(d.join("default.api-0")).unwrap();
            std::fs::write(d.join("default.api-0/cgroup.procs"), "").unwrap();
        }
        let r = EngineResources {
            nano_cpus: Some(500_000_000),
            cpu_shares: Some(256),
            memory: Some(64 << 20),
            memory_reservation: Some(32 << 20),
        };
        let join = cg.create("default", "api-0", &r).unwrap().unwrap();
        assert_eq!(join.procs.len(), 2);
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
        assert_eq!(
            read(memory.join("default.api-0/memory.limit_in_bytes")),
            "67108864"
        );
        assert_eq!(
            read(memory.join("default.api-0/memory.soft_limit_in_bytes")),
            "33554432"
        );
        assert_eq!(read(cpu.join("default.api-0/cpu.cfs_quota_us")), "50000");
        assert_eq!(read(cpu.join("default.api-0/cpu.shares")), "256");
        std::fs::write(
            memory.join("default.api-0/memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
        )
        .unwrap();
        assert!(cg.oom_killed("default", "api-0"));
        assert!(!cg.oom_killed("default", "web-0"));
    }
}
