//! Stable local ports of the proxy: one per service port, remembered in a file of this node so
//! that `127.0.0.1:<port>` stays the same across restarts (what dev mode users and scripts hold
//! on to). The port is node-local, like a NodePort, so it lives beside the state, not in it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The remembered ports.
#[derive(Debug)]
pub struct PortBook {
    path: PathBuf,
    range: (u16, u16),
    /// Shared with a save on its way to disk, so taking one copies nothing (a change made
    /// while one is written copies the map then).
    ports: Arc<BTreeMap<String, u16>>,
    /// How many keys hold each port (one, unless the file was edited by hand): a free port is
    /// found by walking these in order, not by collecting every port on each assignment.
    used: BTreeMap<u16, u32>,
    /// Every port of the range below this one is in use, so the walk starts here: thousands
    /// of services cast at once take ports one after another, and each would otherwise walk
    /// every port the others took.
    low: u32,
}

/// The book as it was when [`PortBook::to_save`] was called, to be written off the caller's
/// thread.
#[derive(Debug)]
pub struct BookSave {
    path: PathBuf,
    ports: Arc<BTreeMap<String, u16>>,
}

impl BookSave {
    /// Writes the book atomically (a file beside it, then a rename).
    pub fn write(self) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&*self.ports).unwrap_or_default())?;
        std::fs::rename(&tmp, &self.path)
    }
}

/// The book's key of a service port.
pub fn book_key(ns: &str, svc: &str, port: u16) -> String {
    format!("{ns}/{svc}/{port}")
}

fn count(ports: &BTreeMap<String, u16>) -> BTreeMap<u16, u32> {
    let mut used = BTreeMap::new();
    for p in ports.values() {
        *used.entry(*p).or_default() += 1;
    }
    used
}

impl PortBook {
    /// Loads the book (an unreadable one starts empty, with a warning).
    pub fn load(path: &Path, range: (u16, u16)) -> PortBook {
        let ports: BTreeMap<String, u16> = match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "proxy port book unreadable; ports are assigned afresh");
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        };
        let mut b = PortBook {
            path: path.to_path_buf(),
            range,
            used: count(&ports),
            ports: Arc::new(ports),
            low: u32::from(range.0),
        };
        b.raise_low();
        b
    }

    /// Moves `low` past the ports in use right above it.
    fn raise_low(&mut self) {
        while u16::try_from(self.low).is_ok_and(|p| self.used.contains_key(&p)) {
            self.low += 1;
        }
    }

    /// The remembered port of `key`.
    pub fn get(&self, key: &str) -> Option<u16> {
        self.ports.get(key).copied()
    }

    /// Gives `key` a port not in `taken` and not remembered for another key (an existing one
    /// is kept unless it is in `taken`, which holds ports that failed to bind). The lowest
    /// free port in the range, found in the ports in use below it.
    pub fn assign(&mut self, key: &str, taken: &[u16]) -> Option<u16> {
        if let Some(p) = self.get(key) {
            if !taken.contains(&p) {
                return Some(p);
            }
        }
        let p = self.lowest_free(taken)?;
        if let Some(old) = Arc::make_mut(&mut self.ports).insert(key.to_string(), p) {
            self.release(old);
        }
        *self.used.entry(p).or_default() += 1;
        self.raise_low();
        Some(p)
    }

    fn lowest_free(&self, taken: &[u16]) -> Option<u16> {
        let (first, last) = (u32::from(self.range.0), u32::from(self.range.1));
        let free = |c: u32| u16::try_from(c).ok().filter(|c| !taken.contains(c));
        let mut candidate = first.max(self.low);
        if candidate > last {
            return None;
        }
        let from = u16::try_from(candidate).ok()?;
        for p in self.used.range(from..=self.range.1).map(|(p, _)| u32::from(*p)) {
            while candidate < p {
                if let Some(c) = free(candidate) {
                    return Some(c);
                }
                candidate += 1;
            }
            candidate = p + 1;
        }
        (candidate..=last).find_map(free)
    }

    fn release(&mut self, port: u16) {
        if let Some(n) = self.used.get_mut(&port) {
            *n -= 1;
            if *n == 0 {
                self.used.remove(&port);
                self.low = self.low.min(u32::from(port));
            }
        }
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
        if !self.ports.contains_key(key) {
            return false;
        }
        if let Some(p) = Arc::make_mut(&mut self.ports).remove(key) {
            self.release(p);
        }
        true
    }

    /// Forgets keys not in `keep`.
    pub fn retain(&mut self, keep: &std::collections::HashSet<String>) {
        if self.ports.keys().all(|k| keep.contains(k)) {
            return;
        }
        Arc::make_mut(&mut self.ports).retain(|k, _| keep.contains(k));
        self.used = count(&self.ports);
        self.low = u32::from(self.range.0);
        self.raise_low();
    }

    /// The book as it is now, to write where a blocking write does no harm.
    pub fn to_save(&self) -> BookSave {
        BookSave {
            path: self.path.clone(),
            ports: self.ports.clone(),
        }
    }

    /// Writes the book atomically, here and now.
    pub fn save(&self) -> std::io::Result<()> {
        self.to_save().write()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever was assigned, freed or refused before, a new key gets the lowest port
        /// no key holds and no bind refused, and a key keeps its port unless it was refused.
        #[test]
        fn the_lowest_free_port_is_given_whatever_came_before(
            ops in prop::collection::vec((0u8..3, 0u8..12, prop::collection::vec(30000u16..30010, 0..3)), 1..80)
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut b = PortBook::load(&dir.path().join("ports.json"), (30000, 30009));
            let mut want: BTreeMap<String, u16> = BTreeMap::new();
            for (op, k, taken) in ops {
                let key = format!("k{k}");
                if op == 2 {
                    prop_assert_eq!(b.remove(&key), want.remove(&key).is_some());
                    continue;
                }
                let expected = match want.get(&key) {
                    Some(p) if !taken.contains(p) => Some(*p),
                    _ => (30000..=30009).find(|c| !taken.contains(c) && !want.values().any(|p| p == c)),
                };
                prop_assert_eq!(b.assign(&key, &taken), expected);
                if let Some(p) = expected {
                    want.insert(key, p);
                }
            }
        }
    }

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

    #[test]
    fn a_freed_port_is_given_again_lowest_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = PortBook::load(&dir.path().join("ports.json"), (30000, 30009));
        for k in ["a", "b", "c", "d"] {
            b.assign(k, &[]);
        }
        assert_eq!(b.get("d"), Some(30003));
        assert!(b.remove("b"));
        assert!(!b.remove("b"), "already forgotten");
        assert_eq!(b.assign("e", &[]), Some(30001), "the gap below the others");
        assert_eq!(b.assign("f", &[]), Some(30004), "no gap left: after the highest");
        // A key moved off a port that failed to bind gives that port back.
        assert_eq!(b.assign("a", &[30000, 30005]), Some(30006));
        assert_eq!(b.assign("g", &[]), Some(30000));
        assert_eq!(
            b.assign("h", &[30005]),
            Some(30007),
            "30005 is taken, 30006 is a's"
        );
    }

    #[test]
    fn a_hand_edited_book_with_a_shared_port_keeps_it_taken_until_both_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ports.json");
        std::fs::write(&path, r#"{"a": 30000, "b": 30000, "c": 30002}"#).unwrap();
        let mut b = PortBook::load(&path, (30000, 30003));
        assert_eq!(b.assign("d", &[]), Some(30001));
        b.remove("a");
        assert_eq!(b.assign("e", &[]), Some(30003), "b still holds 30000");
        b.remove("b");
        assert_eq!(b.assign("f", &[]), Some(30000));
        assert_eq!(b.assign("g", &[]), None, "range exhausted");
    }

    #[test]
    fn a_save_taken_before_a_change_writes_the_book_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ports.json");
        let mut b = PortBook::load(&path, (30000, 30003));
        b.assign("a", &[]);
        let save = b.to_save();
        b.assign("b", &[]);
        save.write().unwrap();
        let read = PortBook::load(&path, (30000, 30003));
        assert_eq!((read.get("a"), read.get("b")), (Some(30000), None));
        b.save().unwrap();
        assert_eq!(PortBook::load(&path, (30000, 30003)).get("b"), Some(30001));
    }
}
