//! The free-space reserve of the data dir: writes are refused while the file system holding it
//! has less than `storage.reserve` free (like etcd's NOSPACE alarm), before a full disk can stop
//! the log; once space is freed they are accepted again, with no restart.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a reading of the free space is trusted; a write costs no statvfs of its own.
const FRESH: Duration = Duration::from_millis(250);

/// The data dir's free space, read at most every [`FRESH`].
#[derive(Debug)]
pub struct Space {
    dir: PathBuf,
    reserve: u64,
    free: AtomicU64,
    read_at_us: AtomicU64,
    origin: Instant,
}

/// Why a write was refused: too little room left on the data dir's file system.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[error(
    "the data dir {} has {} free, below the reserve of {} (storage.reserve): writes are refused until space is freed; deletes still work",
    dir.display(), human(*free), human(*reserve)
)]
pub struct NoSpace {
    /// The data dir.
    pub dir: PathBuf,
    /// Bytes free when the write was refused.
    pub free: u64,
    /// The configured reserve.
    pub reserve: u64,
}

/// `12.3 MiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

impl Space {
    /// Watches the file system of `dir`, keeping `reserve` bytes free (0 turns the check off).
    pub fn new(dir: &Path, reserve: u64) -> Self {
        Self {
            dir: dir.to_path_buf(),
            reserve,
            free: AtomicU64::new(u64::MAX),
            read_at_us: AtomicU64::new(0),
            origin: Instant::now(),
        }
    }

    /// The data dir watched.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The configured reserve in bytes.
    pub fn reserve(&self) -> u64 {
        self.reserve
    }

    /// Bytes available to runed on the data dir's file system (a recent reading).
    pub fn free(&self) -> u64 {
        let now_us = self.origin.elapsed().as_micros() as u64 + 1;
        let at = self.read_at_us.load(Ordering::Relaxed);
        if at == 0 || now_us.saturating_sub(at) > FRESH.as_micros() as u64 {
            match rustix::fs::statvfs(&self.dir) {
                Ok(st) => {
                    let free = st.f_bavail.saturating_mul(st.f_frsize);
                    self.free.store(free, Ordering::Relaxed);
                }
                // Unknown free space never blocks a write: the log itself reports a full disk.
                Err(e) => {
                    tracing::debug!(error = %e, dir = %self.dir.display(), "statvfs failed");
                    self.free.store(u64::MAX, Ordering::Relaxed);
                }
            }
            self.read_at_us.store(now_us, Ordering::Relaxed);
        }
        self.free.load(Ordering::Relaxed)
    }

    /// Refuses when less than `need` bytes are free.
    pub fn check(&self, need: u64) -> Result<(), NoSpace> {
        if need == 0 {
            return Ok(());
        }
        let free = self.free();
        if free < need {
            return Err(NoSpace {
                dir: self.dir.clone(),
                free,
                reserve: self.reserve,
            });
        }
        Ok(())
    }

    /// What a command needs free: the whole reserve for new or changed objects, half of it
    /// for writes that free space or keep the record of running instances true (deletes,
    /// revocations, instance reports, seeding, KEK rotation).
    pub fn need(&self, uses_reserve: bool) -> u64 {
        if uses_reserve {
            self.reserve / 2
        } else {
            self.reserve
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_checks_and_halves() {
        let dir = tempfile::tempdir().unwrap();
        let off = Space::new(dir.path(), 0);
        assert!(off.check(off.need(false)).is_ok());
        let huge = Space::new(dir.path(), u64::MAX);
        let e = huge.check(huge.need(false)).unwrap_err();
        assert!(e.to_string().contains("below the reserve"), "{e}");
        assert_eq!(huge.need(true), u64::MAX / 2);
        assert!(Space::new(dir.path(), 1).check(1).is_ok());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(6 << 20), "6.0 MiB");
        assert_eq!(human(1536), "1.5 KiB");
    }
}
