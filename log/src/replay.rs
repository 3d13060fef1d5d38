//! Offline replay of a data dir: what each entry did, the state as of any index, and a check that
//! the log alone rebuilds the live state byte for byte.
//!
//! Replay never touches the data dir it is given: it reads the log's segments as they are (a torn
//! tail is ignored, not cut off) and copies the state database to a temporary directory first,
//! refusing while a running `runed` holds them, so a crashed node's files, or a copy of them, can
//! be read as they are.

use std::path::Path;

use openraft::{BasicNode, Entry, EntryPayload, SnapshotMeta};
use redb::{Database, Durability, ReadableDatabase};
use rune_statemachine::store::{digest, first_difference};
use rune_statemachine::{Command, Outcome, Resource, STATE_TABLE};
use serde::Serialize;

use crate::log_store::{meta_value, migrate_redb, read_entries};
use crate::node::{LEGACY_LOG_FILE, LOG_DIR, SNAPSHOT_DIR, STATE_FILE};
use crate::snapshot;
use crate::state_machine::{all_records, applied_state, apply_entries, install};
use crate::types::TypeConfig;
use crate::wal::{self, MetaKey};

/// Why replay could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The data dir has no log.
    #[error("{0} holds no rune log ({LOG_DIR} is missing)")]
    NoLog(String),
    /// A running runed holds the files.
    #[error("{0} is in use by a running runed: stop it, or replay a copy of its data dir")]
    InUse(String),
    /// Reading or decoding failed.
    #[error("{0}")]
    Read(String),
    /// The requested index cannot be rebuilt.
    #[error("{0}")]
    Range(String),
}

fn rd(e: impl std::fmt::Display) -> ReplayError {
    ReplayError::Read(e.to_string())
}

/// One entry as replay tells it.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayLine {
    /// Log index.
    pub index: u64,
    /// Position (from 1) of the proposal within the entry's batch; 0 when the entry holds one.
    pub position: usize,
    /// Raft term.
    pub term: u64,
    /// When it was proposed, Unix ms (none for raft's own entries).
    pub proposed_at_ms: Option<i64>,
    /// Command kind, or `blank` / `membership` for raft's own entries.
    pub kind: String,
    /// Resources the entry names or changed, as `service/<ns>/<name>`.
    pub resources: Vec<String>,
    /// What it did, in a line.
    pub summary: String,
    /// `applied`, `rejected`, `unchanged` or `compacted` (inside the snapshot, not re-applied).
    pub result: String,
    /// The command itself, for `-o json`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<Command>,
}

/// A data dir opened for replay.
pub struct Replay {
    _tmp: tempfile::TempDir,
    work: std::path::PathBuf,
    log: wal::ReadOnly,
    live: Database,
    snapshot: Option<(SnapshotMeta<u64, BasicNode>, Vec<u8>)>,
    runs: std::sync::atomic::AtomicU64,
}

/// The state rebuilt up to an index.
pub struct Rebuilt {
    /// The temporary database holding it.
    pub db: Database,
    /// The last index applied.
    pub index: u64,
}

/// The result of `--verify`.
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    /// The live state's applied index, up to which the log was replayed.
    pub index: u64,
    /// Digest of the live state tables.
    pub live_digest: String,
    /// Digest of the state rebuilt from the log.
    pub rebuilt_digest: String,
    /// The first key that differs, if any.
    pub first_difference: Option<String>,
    /// Entries in the log, all of which decoded.
    pub entries_decoded: usize,
}

impl Replay {
    /// Copies the data dir's databases aside and opens the copies.
    pub fn open(data_dir: &Path) -> Result<Self, ReplayError> {
        let (log_dir, legacy) = (data_dir.join(LOG_DIR), data_dir.join(LEGACY_LOG_FILE));
        if !log_dir.exists() && !legacy.exists() {
            return Err(ReplayError::NoLog(data_dir.display().to_string()));
        }
        if log_dir.exists() && wal::in_use(&log_dir) {
            return Err(ReplayError::InUse(log_dir.display().to_string()));
        }
        for p in [legacy.clone(), data_dir.join(STATE_FILE)] {
            if p.exists() {
                if let Err(redb::DatabaseError::DatabaseAlreadyOpen) = redb::ReadOnlyDatabase::open(&p) {
                    return Err(ReplayError::InUse(p.display().to_string()));
                }
            }
        }
        let tmp = tempfile::tempdir().map_err(rd)?;
        let work = tmp.path().to_path_buf();
        let log = if log_dir.exists() {
            wal::ReadOnly::read(&log_dir).map_err(rd)?
        } else {
            // A data dir from before the WAL: move a copy of its log into one, aside.
            let copy = work.join(LEGACY_LOG_FILE);
            std::fs::copy(&legacy, &copy).map_err(rd)?;
            migrate_redb(&copy, &work.join(LOG_DIR)).map_err(rd)?;
            wal::ReadOnly::read(&work.join(LOG_DIR)).map_err(rd)?
        };
        let state_path = data_dir.join(STATE_FILE);
        if state_path.exists() {
            std::fs::copy(&state_path, work.join(STATE_FILE)).map_err(rd)?;
        }
        let live = Database::create(work.join(STATE_FILE)).map_err(rd)?;
        let snapshot = snapshot::read(&data_dir.join(SNAPSHOT_DIR)).map_err(rd)?;
        Ok(Self {
            _tmp: tmp,
            work,
            log,
            live,
            snapshot,
            runs: Default::default(),
        })
    }

    /// The snapshot's last index, if the log was ever compacted into one.
    pub fn snapshot_index(&self) -> Option<u64> {
        self.snapshot
            .as_ref()
            .and_then(|(m, _)| m.last_log_id.map(|l| l.index))
    }

    /// Every entry in the log, decoded.
    pub fn entries(&self) -> Result<Vec<Entry<TypeConfig>>, ReplayError> {
        read_entries(self.log.reader(), ..).map_err(rd)
    }

    /// Applies the log up to `upto` (all of it when `None`) into a fresh temporary state,
    /// calling `each` with every entry's story.
    pub fn run(&self, upto: Option<u64>, mut each: impl FnMut(ReplayLine)) -> Result<Rebuilt, ReplayError> {
        let entries = self.entries()?;
        let purged: Option<openraft::LogId<u64>> =
            meta_value(self.log.reader(), MetaKey::LastPurged).map_err(rd)?;
        let n = self.runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let db = Database::create(self.work.join(format!("rebuilt-{n}.redb"))).map_err(rd)?;
        let mut applied = 0;
        let mut start_after: Option<u64> = None;
        if let Some(p) = purged {
            let Some((meta, body)) = &self.snapshot else {
                return Err(ReplayError::Range(format!(
                    "the log was purged up to {} but no snapshot exists",
                    p.index
                )));
            };
            let s = meta.last_log_id.map(|l| l.index).unwrap_or(0);
            if upto.is_some_and(|u| u < s) {
                return Err(ReplayError::Range(format!(
                    "entries up to {s} were compacted into a snapshot; the earliest state replay can rebuild is at {s}"
                )));
            }
            let records = snapshot::decode_body(body).map_err(rd)?;
            install(&db, meta, &records).map_err(rd)?;
            applied = s;
            start_after = Some(s);
        }
        for chunk in entries.chunks(256) {
            let mut todo = Vec::new();
            for e in chunk {
                let i = e.log_id.index;
                if upto.is_some_and(|u| i > u) {
                    break;
                }
                if start_after.is_some_and(|s| i <= s) {
                    describe(e, None).into_iter().for_each(&mut each);
                } else {
                    todo.push(e.clone());
                }
            }
            if todo.is_empty() {
                continue;
            }
            let replies = apply_entries(&db, &todo, Durability::None).map_err(rd)?.replies;
            for (e, r) in todo.iter().zip(replies) {
                describe(e, Some(&r.0)).into_iter().for_each(&mut each);
                applied = e.log_id.index;
            }
        }
        Ok(Rebuilt { db, index: applied })
    }

    /// Rebuilds from the log up to the live state's applied index and compares the two.
    pub fn verify(&self) -> Result<Verification, ReplayError> {
        let entries = self.entries()?.len();
        let (live_applied, _) = applied_state(&self.live).map_err(rd)?;
        let index = live_applied.map(|l| l.index).unwrap_or(0);
        let rebuilt = self.run(Some(index), |_| {})?;
        if rebuilt.index < index {
            return Err(ReplayError::Range(format!(
                "the live state is at index {index} but the log ends at {}",
                rebuilt.index
            )));
        }
        let (ra, rb) = (
            self.live.begin_read().map_err(rd)?,
            rebuilt.db.begin_read().map_err(rd)?,
        );
        let (ta, tb) = match (ra.open_table(STATE_TABLE), rb.open_table(STATE_TABLE)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return Err(rd(e)),
        };
        Ok(Verification {
            index,
            live_digest: digest(&ta).map_err(rd)?,
            rebuilt_digest: digest(&tb).map_err(rd)?,
            first_difference: first_difference(&ta, &tb).map_err(rd)?,
            entries_decoded: entries,
        })
    }
}

/// Every record of a rebuilt state, values decoded as JSON.
pub fn dump(db: &Database) -> Result<Vec<(String, serde_json::Value)>, ReplayError> {
    all_records(db)
        .map_err(rd)?
        .into_iter()
        .map(|(k, v)| Ok((k, serde_json::from_slice(&v).map_err(rd)?)))
        .collect()
}

fn targets(cmd: &Command) -> Vec<String> {
    match cmd {
        Command::Init {
            namespaces, policies, ..
        } => namespaces
            .iter()
            .map(|n| format!("namespace/{n}"))
            .chain(policies.iter().map(|p| format!("policy/{}", p.name)))
            .collect(),
        Command::Apply {
            resources, release, ..
        } => resources
            .iter()
            .map(|r| match r {
                Resource::Service(s) => format!("service/{}/{}", s.namespace(), s.name),
                Resource::Namespace(n) => format!("namespace/{}", n.name),
                Resource::Secret(s) => format!("secret/{}/{}", s.namespace, s.name),
                Resource::Configmap(c) => format!("configmap/{}/{}", c.namespace, c.name),
            })
            .chain(
                release
                    .iter()
                    .map(|r| format!("release/{}/{}", r.namespace, r.name)),
            )
            .collect(),
        Command::DeleteRelease { namespace, name, .. } => vec![format!("release/{namespace}/{name}")],
        Command::DeleteService { namespace, name, .. }
        | Command::RollbackService { namespace, name, .. }
        | Command::Scale { namespace, name, .. }
        | Command::Restart { namespace, name } => vec![format!("service/{namespace}/{name}")],
        Command::InstanceEvents { events, .. } => {
            let mut v: Vec<String> = Vec::new();
            for e in events {
                for r in [
                    format!("service/{}/{}", e.namespace, e.service),
                    format!("instance/{}/{}", e.namespace, e.id),
                ] {
                    if !v.contains(&r) {
                        v.push(r);
                    }
                }
            }
            v
        }
        Command::DeleteNamespace { name } => vec![format!("namespace/{name}")],
        Command::RegisterNode { name, .. }
        | Command::SetNodeReady { name, .. }
        | Command::ForgetNode { name } => {
            vec![format!("node/{name}")]
        }
        Command::DeleteSecret { namespace, name, .. } => vec![format!("secret/{namespace}/{name}")],
        Command::DeleteConfigmap { namespace, name, .. } => vec![format!("configmap/{namespace}/{name}")],
        Command::RewrapSecrets { items } => {
            let mut v: Vec<String> = items
                .iter()
                .map(|i| format!("secret/{}/{}", i.namespace, i.name))
                .collect();
            v.dedup();
            v
        }
        Command::PutUser { name, .. } | Command::DeleteUser { name } => vec![format!("user/{name}")],
        Command::PutPolicy { spec } => vec![format!("policy/{}", spec.name)],
        Command::DeletePolicy { name } => vec![format!("policy/{name}")],
        Command::SetUserPolicy { user, policy, .. } => {
            vec![format!("user/{user}"), format!("policy/{policy}")]
        }
        Command::CreateToken { token, .. } => {
            vec![format!("token/{}", token.id), format!("user/{}", token.subject)]
        }
        Command::RevokeToken { id } => vec![format!("token/{id}")],
    }
}

/// One line per proposal of the entry (one for raft's own entries). `outcomes` is `None` for
/// entries inside the snapshot, which replay does not re-apply.
fn describe(e: &Entry<TypeConfig>, outcomes: Option<&[Outcome]>) -> Vec<ReplayLine> {
    let (index, term) = (e.log_id.index, e.log_id.leader_id.term);
    let line = |position: usize| ReplayLine {
        index,
        position,
        term,
        proposed_at_ms: None,
        kind: String::new(),
        resources: vec![],
        summary: String::new(),
        result: if outcomes.is_some() {
            "applied".into()
        } else {
            "compacted".into()
        },
        command: None,
    };
    match &e.payload {
        EntryPayload::Blank => {
            let mut l = line(0);
            l.kind = "blank".into();
            l.summary = format!("leader elected in term {term}");
            vec![l]
        }
        EntryPayload::Membership(m) => {
            let mut l = line(0);
            l.kind = "membership".into();
            let voters: Vec<String> = m.voter_ids().map(|v| v.to_string()).collect();
            l.summary = format!("voters {{{}}}", voters.join(","));
            vec![l]
        }
        EntryPayload::Normal(batch) => batch
            .envelopes
            .iter()
            .enumerate()
            .map(|(i, env)| {
                let mut l = line(if batch.envelopes.len() > 1 { i + 1 } else { 0 });
                l.kind = env.command.kind().into();
                l.proposed_at_ms = Some(env.proposed_at_ms);
                l.resources = targets(&env.command);
                l.command = Some(env.command.clone());
                match outcomes.map(|o| o.get(i)) {
                    None => l.summary = "(in snapshot)".into(),
                    Some(None) => {
                        l.result = "unknown".into();
                        l.summary = "apply gave no outcome for this proposal".into();
                    }
                    Some(Some(outcome)) => tell(&mut l, outcome),
                }
                l
            })
            .collect(),
    }
}

fn tell(l: &mut ReplayLine, outcome: &Outcome) {
    match outcome {
        Err(rej) => {
            l.result = "rejected".into();
            l.summary = rej.to_string();
        }
        Ok(changes) => {
            for c in changes {
                let r = c.resource();
                if !l.resources.contains(&r) {
                    l.resources.push(r);
                }
            }
            if changes
                .iter()
                .all(|c| c.action == rune_statemachine::Action::Unchanged)
            {
                l.result = "unchanged".into();
            }
            let parts: Vec<String> = changes
                .iter()
                .map(|c| {
                    let head = format!(
                        "{} {} (gen {})",
                        c.resource(),
                        action_word(c.action),
                        c.generation
                    );
                    if c.summary.is_empty() {
                        head
                    } else {
                        format!("{head}: {}", c.summary)
                    }
                })
                .collect();
            l.summary = if parts.is_empty() {
                "no change".into()
            } else {
                parts.join("; ")
            };
        }
    }
}

fn action_word(a: rune_statemachine::Action) -> &'static str {
    match a {
        rune_statemachine::Action::Created => "created",
        rune_statemachine::Action::Configured => "configured",
        rune_statemachine::Action::Unchanged => "unchanged",
        rune_statemachine::Action::Deleted => "deleted",
    }
}
