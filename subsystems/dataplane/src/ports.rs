//! Stable local ports of the proxy: one per service port, remembered in a file of this node so
//! that `127.0.0.1:<port>` stays the same across restarts (what dev mode users and scripts hold
//! on to). The port is node-local, like a NodePort, so it lives beside the state, not in it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The remembered ports.
#[derive(Debug)]
pub struct PortBook {
    path: PathBuf,
    range: (u16, u16),
    ports: BTreeMap<String, u16>,
}

/// The book's key of a service port.
pub fn book_key(ns: &str, svc: &str, port: u16) -> String {
    format!("{ns}/{svc}/{port}")
}

impl PortBook {
    /// Loads the book (an unreadable one starts empty, with a warning).
    pub fn load(path: &Path, range: (u16, u16)) -> PortBook {
        let ports = match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "proxy port book unreadable; ports are assigned afresh");
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        };
        PortBook {
            path: path.to_path_buf(),
            range,
            ports,
        }
    }

    /// The remembered port of `key`.
    pub fn get(&self, key: &str) -> Option<u16> {
        self.ports.get(key).copied()
    }

    /// Gives `key` a port not in `taken` and not remembered for another key (an existing one
    /// is kept unless it is in `taken`, which holds ports that failed to bind).
    pub fn assign(&mut self, key: &str, taken: &[u16]) -> Option<u16> {
        if let Some(p) = self.get(key) {
            if !taken.contains(&p) {
                return Some(p);
            }
        }
        let used: std::collections::HashSet<u16> = self.ports.values().copied().collect();
        let p = (self.range.0..=self.range.1).find(|p| !used.contains(p) && !taken.contains(p))?;
        self.ports.insert(key.to_string(), p);
        Some(p)
    }

    /// How many ports are remembered.
    pub fn len(&self) -> usize {
        self.ports.len()
    }

    /// Whether no port is remembered.
    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
    }

    /// Forgets one key's port; returns whether it had one.
    pub fn remove(&mut self, key: &str) -> bool {
        self.ports.remove(key).is_some()
    }

    /// Forgets keys not in `keep`.
    pub fn retain(&mut self, keep: &std::collections::HashSet<String>) {
        self.ports.retain(|k, _| keep.contains(k));
    }

    /// Writes the book atomically.
    pub fn save(&self) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.ports).unwrap_or_default())?;
        std::fs::rename(&tmp, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_stable_and_distinct() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ports.json");
        let mut b = PortBook::load(&path, (30000, 30002));
        assert_eq!(b.assign("a", &[]), Some(30000));
        assert_eq!(b.assign("b", &[30001]), Some(30002));
        assert_eq!(b.assign("a", &[]), Some(30000));
        assert_eq!(b.assign("c", &[30001]), None, "range exhausted");
        b.save().unwrap();
        let mut again = PortBook::load(&path, (30000, 30002));
        assert_eq!(again.get("b"), Some(30002));
        again.retain(&["b".to_string()].into());
        assert_eq!(again.assign("c", &[]), Some(30000));
    }
}
