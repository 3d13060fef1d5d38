//! Volumes of process services: directories under the volumes root (outside the data dir),
//! bound at `mountPath` in the process's private mount namespace, as the engine binds a named
//! volume into a container.
//!
//! Layout under `<root>/<owner>/<ns>/`: `instances/<instance>/<volume>/` for a `claimTemplate`
//! (one per instance, kept across restarts and rollouts) and `claims/<claim>/` for a shared
//! claim, each with a `<dir>.json` beside it saying what asked for it. Nothing here deletes a
//! volume except [`HostVolumes::delete`].

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::docker::{dir_usage, VolumeInfo};
use super::process::read_dirs;
use super::{Launch, MountDir, RunError};

/// The storage class process volumes are given (the only one, as for containers).
const CLASS: &str = "local";

/// What asked for a volume, kept beside its directory.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Meta {
    service: String,
    instance: String,
    volume: String,
    claim: String,
    requested_size: String,
}

/// This runed's process volumes.
#[derive(Debug, Clone)]
pub struct HostVolumes {
    root: PathBuf,
}

impl HostVolumes {
    /// Volumes under `root` (the configured root joined with this runed's owner name).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn path_of(&self, ns: &str, claim: Option<&str>, volume: &str, instance: &str) -> PathBuf {
        match claim {
            Some(c) => self.root.join(ns).join("claims").join(c),
            // By instance, then volume: `<volume>-<instance>` alone could be two services'.
            None => self.root.join(ns).join("instances").join(instance).join(volume),
        }
    }

    /// Creates what a start needs (owned by the process's user when it has one) and returns the
    /// binds, writable unless the spec says `readOnly`.
    pub fn prepare(&self, l: &Launch, uid: Option<u32>, gid: Option<u32>) -> Result<Vec<MountDir>, RunError> {
        let mut out = Vec::new();
        for v in &l.spec.volumes {
            let dir = self.path_of(&l.namespace, v.claim.as_deref(), &v.name, &l.id);
            if !dir.is_dir() {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| RunError::Runtime(format!("cannot create volume {}: {e}", dir.display())))?;
                if uid.is_some() || gid.is_some() {
                    std::os::unix::fs::chown(&dir, uid, gid).map_err(|e| {
                        RunError::Runtime(format!(
                            "cannot hand volume {} to the process user: {e}",
                            dir.display()
                        ))
                    })?;
                }
                let meta = Meta {
                    service: if v.claim.is_some() {
                        String::new()
                    } else {
                        l.service.clone()
                    },
                    instance: if v.claim.is_some() {
                        String::new()
                    } else {
                        l.id.clone()
                    },
                    volume: v.name.clone(),
                    claim: v.claim.clone().unwrap_or_default(),
                    requested_size: v
                        .claim_template
                        .as_ref()
                        .and_then(|t| t.size.as_ref())
                        .map(|t| t.0.clone())
                        .unwrap_or_default(),
                };
                let _ = std::fs::write(meta_path(&dir), serde_json::to_vec(&meta).unwrap_or_default());
            }
            out.push(MountDir {
                host: dir,
                target: PathBuf::from(&v.mount_path),
                writable: v.read_only != Some(true),
            });
        }
        Ok(out)
    }

    /// Every process volume, with its usage when `measure` (users are the caller's to fill: it
    /// knows which instances run).
    pub fn list(&self, measure: bool) -> Vec<VolumeInfo> {
        let mut out = Vec::new();
        for ns_dir in read_dirs(&self.root) {
            let ns = name(&ns_dir);
            let per_instance = read_dirs(&ns_dir.join("instances"))
                .into_iter()
                .flat_map(|i| read_dirs(&i));
            let claims = read_dirs(&ns_dir.join("claims"));
            for (shared, dir) in per_instance
                .map(|d| (false, d))
                .chain(claims.into_iter().map(|d| (true, d)))
            {
                let meta: Meta = std::fs::read(meta_path(&dir))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .unwrap_or_default();
                out.push(VolumeInfo {
                    engine_name: dir.display().to_string(),
                    namespace: ns.clone(),
                    service: meta.service,
                    instance: meta.instance,
                    volume: meta.volume,
                    claim: if shared { name(&dir) } else { meta.claim },
                    requested_size: meta.requested_size,
                    storage_class: CLASS.into(),
                    usage_bytes: if measure { dir_usage(&dir) } else { None },
                    users: Vec::new(),
                });
            }
        }
        out
    }

    /// Deletes a volume's directory and what it holds.
    pub fn delete(&self, v: &VolumeInfo) -> Result<(), RunError> {
        let dir = PathBuf::from(&v.engine_name);
        if !dir.starts_with(&self.root) {
            return Err(RunError::Launch(format!(
                "{} is not a process volume",
                dir.display()
            )));
        }
        std::fs::remove_dir_all(&dir)
            .map_err(|e| RunError::Runtime(format!("cannot delete {}: {e}", dir.display())))?;
        let _ = std::fs::remove_file(meta_path(&dir));
        // An instance's folder goes with its last volume.
        if let Some(parent) = dir
            .parent()
            .filter(|p| p.parent().is_some_and(|g| g.ends_with("instances")))
        {
            let _ = std::fs::remove_dir(parent);
        }
        Ok(())
    }
}

fn meta_path(dir: &Path) -> PathBuf {
    let mut n = dir.file_name().unwrap_or_default().to_os_string();
    n.push(".json");
    dir.with_file_name(n)
}

fn name(p: &Path) -> String {
    p.file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string()
}
