//! A state table on a temporary redb file, driven by `apply` as the log would drive it.

#![allow(dead_code)]

use redb::ReadableDatabase;
use rune_statemachine::store::{apply, get_record};
use rune_statemachine::{Command, Envelope, Outcome, STATE_TABLE};

pub struct State {
    _f: tempfile::NamedTempFile,
    db: redb::Database,
    index: u64,
    /// The proposer's clock for the next entry.
    pub now_ms: i64,
}

impl State {
    pub fn new() -> Self {
        let f = tempfile::NamedTempFile::new().unwrap();
        let db = redb::Database::create(f.path()).unwrap();
        let mut s = State {
            _f: f,
            db,
            index: 0,
            now_ms: 1000,
        };
        s.run(Command::Init {
            cluster_cidr: None,
            cluster_id: None,
            policies: rune_statemachine::identity::builtin_policies(),
            namespaces: vec!["default".into()],
            claim_hosts: false,
        })
        .expect("init");
        s
    }

    /// A state whose cluster network is `cidr`.
    pub fn with_network(cidr: &str) -> Self {
        let mut s = Self::new();
        s.run(Command::Init {
            cluster_cidr: Some(cidr.into()),
            cluster_id: None,
            policies: vec![],
            namespaces: vec![],
            claim_hosts: false,
        })
        .expect("network");
        s
    }

    pub fn run(&mut self, c: Command) -> Outcome {
        self.run_version(rune_statemachine::FORMAT_VERSION, c)
    }

    /// Applies `c` as an entry of format `version` (an older build's).
    pub fn run_version(&mut self, version: u32, c: Command) -> Outcome {
        self.index += 1;
        let txn = self.db.begin_write().unwrap();
        let out = {
            let mut t = txn.open_table(STATE_TABLE).unwrap();
            apply(
                &mut t,
                self.index,
                &Envelope {
                    version,
                    ..Envelope::new(self.now_ms + self.index as i64, c)
                },
            )
            .unwrap()
        };
        txn.commit().unwrap();
        out
    }

    pub fn get<T: serde::de::DeserializeOwned>(&self, key: &str) -> Option<T> {
        let r = self.db.begin_read().unwrap();
        let t = r.open_table(STATE_TABLE).unwrap();
        get_record(&t, key).unwrap()
    }
}

impl State {
    /// Runs `f` on a read-only view of the state table.
    pub fn read<T>(&self, f: impl FnOnce(&redb::ReadOnlyTable<&'static str, &'static [u8]>) -> T) -> T {
        let r = self.db.begin_read().unwrap();
        let t = r.open_table(STATE_TABLE).unwrap();
        f(&t)
    }
}
