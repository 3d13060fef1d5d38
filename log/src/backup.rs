//! Online backup and offline restore.
//!
//! A backup is the whole state at one applied index, read through one redb read transaction (a
//! consistent snapshot that writes do not disturb), streamed as it is read. It holds what the
//! state holds: sealed secrets, never the KEK. [`restore`] builds a data dir from one: the
//! state, a snapshot at the backup's index, and a log that starts after it, so the restored
//! runed starts as if it had compacted its log at that index, and `replay --verify` passes.
//!
//! File layout:
//! ```text
//! {"format":"rune-backup","version":1,...header...}\n
//! [u32 key len][key][u32 value len][value]...    (records in key order, as snapshots)
//! \n{"records":N,"sha256":"<hex of everything before this line>"}\n
//! ```
//! A truncated or altered file is refused whole: the record count and the digest must match.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use openraft::{BasicNode, LogId, SnapshotMeta, StoredMembership, Vote};
use redb::{Database, ReadTransaction, ReadableTable, ReadableTableMetadata};
use rune_statemachine::STATE_TABLE;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::node::{LEGACY_LOG_FILE, LOG_DIR, SNAPSHOT_DIR, STATE_FILE};
use crate::snapshot;
use crate::state_machine::{install, SM_META};
use crate::types::NODE_ID;
use crate::wal::{self, MetaKey};

/// The `format` of every backup file.
pub const MAGIC: &str = "rune-backup";
/// The layout version this build writes and reads.
pub const VERSION: u32 = 1;

/// What a backup is of, on its first line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// Always [`MAGIC`].
    pub format: String,
    /// The layout version.
    pub version: u32,
    /// The applied log index the state is at: every write acknowledged at or before it is in.
    pub index: u64,
    /// The term of that index.
    pub term: u64,
    /// The records that follow.
    pub records: u64,
    /// About their size in bytes (the state file's size, an upper bound), for progress.
    pub bytes: u64,
    /// When the backup was taken (Unix ms, the server's clock).
    pub created_at_ms: i64,
    /// The snapshot meta the restored node starts from.
    pub meta: SnapshotMeta<u64, BasicNode>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Trailer {
    records: u64,
    sha256: String,
}

/// Why a backup could not be read or restored.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Reading the state or the file failed.
    #[error("{0}")]
    Io(String),
    /// The file is not a complete, intact backup.
    #[error("{path}: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The target already holds a data dir.
    #[error("{0} already holds a rune data dir ({1} exists): restore into an empty or new directory")]
    NotEmpty(PathBuf, &'static str),
    /// The caller's check of the records refused them (the KEK does not open the secrets).
    #[error("{0}")]
    Refused(String),
}

fn io(e: impl std::fmt::Display) -> BackupError {
    BackupError::Io(e.to_string())
}

/// A consistent view of the state for one backup, taken by [`crate::Log::backup`].
pub struct Source {
    txn: ReadTransaction,
    header: Header,
}

/// Reads the applied state's position and size inside one read transaction.
pub(crate) fn open_source(
    txn: ReadTransaction,
    created_at_ms: i64,
    bytes: u64,
) -> Result<Source, BackupError> {
    let (last, membership): (Option<LogId<u64>>, StoredMembership<u64, BasicNode>) = {
        let meta = txn.open_table(SM_META).map_err(io)?;
        let get = |k: &str| -> Result<Option<Vec<u8>>, BackupError> {
            Ok(meta.get(k).map_err(io)?.map(|v| v.value().to_vec()))
        };
        let last = match get("last_applied")? {
            Some(v) => serde_json::from_slice(&v).map_err(io)?,
            None => None,
        };
        let membership = match get("membership")? {
            Some(v) => serde_json::from_slice(&v).map_err(io)?,
            None => StoredMembership::default(),
        };
        (last, membership)
    };
    let records = txn.open_table(STATE_TABLE).map_err(io)?.len().map_err(io)?;
    let id = last.map_or("0-0".to_string(), |l| format!("{}-{}", l.leader_id.term, l.index));
    let header = Header {
        format: MAGIC.into(),
        version: VERSION,
        index: last.map_or(0, |l| l.index),
        term: last.map_or(0, |l| l.leader_id.term),
        records,
        bytes,
        created_at_ms,
        meta: SnapshotMeta {
            last_log_id: last,
            last_membership: membership,
            snapshot_id: format!("backup-{id}"),
        },
    };
    Ok(Source { txn, header })
}

impl Source {
    /// What the backup is of.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Writes the whole backup to `out` in chunks of about `chunk` bytes, calling `out` once per
    /// chunk; stops at the first error `out` returns. Runs in the caller's thread (blocking).
    pub fn write_chunks(
        self,
        chunk: usize,
        mut out: impl FnMut(Vec<u8>) -> Result<(), String>,
    ) -> Result<(), BackupError> {
        let mut hash = Sha256::new();
        let mut buf = serde_json::to_vec(&self.header).map_err(io)?;
        buf.push(b'\n');
        let t = self.txn.open_table(STATE_TABLE).map_err(io)?;
        let mut n = 0u64;
        for item in t.iter().map_err(io)? {
            let (k, v) = item.map_err(io)?;
            let (k, v) = (k.value().as_bytes(), v.value());
            buf.extend_from_slice(&(k.len() as u32).to_le_bytes());
            buf.extend_from_slice(k);
            buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
            buf.extend_from_slice(v);
            n += 1;
            if buf.len() >= chunk {
                hash.update(&buf);
                out(std::mem::take(&mut buf)).map_err(BackupError::Io)?;
            }
        }
        if n != self.header.records {
            return Err(io(format!(
                "the state changed under the backup's read ({} records counted, {n} read)",
                self.header.records
            )));
        }
        hash.update(&buf);
        let trailer = Trailer {
            records: n,
            sha256: hex::encode(hash.finalize()),
        };
        buf.push(b'\n');
        buf.extend_from_slice(&serde_json::to_vec(&trailer).map_err(io)?);
        buf.push(b'\n');
        out(buf).map_err(BackupError::Io)
    }
}

/// A backup file read whole and checked: its header and records.
pub struct Backup {
    /// What it is of.
    pub header: Header,
    /// Every state record, in key order.
    pub records: Vec<(String, Vec<u8>)>,
}

/// Longest key or value a backup may hold: far above any record runed writes, and a bound on
/// what a damaged length field can make a reader allocate.
const MAX_FIELD_BYTES: usize = 64 << 20;

/// Reads a backup file record by record, checking the header, the count and the digest;
/// `each` sees every record. A damaged or cut file is an error, whatever `each` was given.
fn read_with(path: &Path, mut each: impl FnMut(String, Vec<u8>)) -> Result<Header, BackupError> {
    let bad = |why: String| BackupError::Invalid {
        path: path.to_path_buf(),
        why,
    };
    let f = std::fs::File::open(path).map_err(|e| BackupError::Io(format!("{}: {e}", path.display())))?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut hash = Sha256::new();
    let mut line = Vec::new();
    r.by_ref()
        .take(1 << 20)
        .read_until(b'\n', &mut line)
        .map_err(io)?;
    let header: Header = serde_json::from_slice(line.strip_suffix(b"\n").unwrap_or(&line)).map_err(|e| {
        bad(format!(
            "not a rune backup (its first line is not a backup header: {e})"
        ))
    })?;
    if header.format != MAGIC {
        return Err(bad(format!("not a rune backup (format '{}')", header.format)));
    }
    if header.version != VERSION {
        return Err(bad(format!(
            "backup layout version {} is not one this runed reads ({VERSION})",
            header.version
        )));
    }
    hash.update(&line);
    let take =
        |r: &mut BufReader<std::fs::File>, n: usize, hash: &mut Sha256| -> Result<Vec<u8>, BackupError> {
            if n > MAX_FIELD_BYTES {
                return Err(bad(format!("the backup is damaged: a record claims {n} bytes")));
            }
            let mut b = vec![0u8; n];
            r.read_exact(&mut b)
                .map_err(|_| bad("the backup is truncated: records are missing".to_string()))?;
            hash.update(&b);
            Ok(b)
        };
    let len = |b: Vec<u8>| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
    for _ in 0..header.records {
        let kl = len(take(&mut r, 4, &mut hash)?);
        let k =
            String::from_utf8(take(&mut r, kl, &mut hash)?).map_err(|_| bad("a key is not UTF-8".into()))?;
        let vl = len(take(&mut r, 4, &mut hash)?);
        each(k, take(&mut r, vl, &mut hash)?);
    }
    let mut rest = Vec::new();
    r.take(1 << 20).read_to_end(&mut rest).map_err(io)?;
    let text = std::str::from_utf8(&rest).map_err(|_| bad("the end of the backup is garbled".into()))?;
    let trailer: Trailer = serde_json::from_str(text.trim())
        .map_err(|_| bad("the backup is truncated: its closing line is missing".into()))?;
    let digest = hex::encode(hash.finalize());
    if trailer.records != header.records || trailer.sha256 != digest {
        return Err(bad(format!(
            "the backup is damaged: its digest {} does not match its content {digest}",
            trailer.sha256
        )));
    }
    Ok(header)
}

/// Reads and checks a backup file: header, every record, the count and the digest.
pub fn read(path: &Path) -> Result<Backup, BackupError> {
    let mut records = Vec::new();
    let header = read_with(path, |k, v| records.push((k, v)))?;
    Ok(Backup { header, records })
}

/// Checks a backup file whole without keeping its records in memory.
pub fn verify(path: &Path) -> Result<Header, BackupError> {
    read_with(path, |_, _| {})
}

/// Present while a restore is writing a data dir: `Log::open` refuses to start on it, and the
/// next restore clears what the interrupted one left.
pub const RESTORING: &str = "RESTORE-IN-PROGRESS";
const STAGING: &str = ".restore-staging";

/// Removes what an interrupted restore left in `dir` (only names a restore writes).
fn clear_interrupted(dir: &Path) -> Result<(), BackupError> {
    let rm = |p: PathBuf| match std::fs::remove_file(&p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(format!("{}: {e}", p.display()))),
        _ => Ok(()),
    };
    for f in [LEGACY_LOG_FILE, STATE_FILE] {
        rm(dir.join(f))?;
    }
    for d in [SNAPSHOT_DIR, STAGING, LOG_DIR] {
        match std::fs::remove_dir_all(dir.join(d)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
    }
    rm(dir.join(RESTORING))
}

fn sync_dir(dir: &Path) -> Result<(), BackupError> {
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(io)
}

/// Builds a new data dir at `dir` from a backup file. `check` sees every record first and may
/// refuse (runed checks that its KEK opens the sealed secrets); nothing is written before it
/// agrees. `finish(staging)` runs once the data is written and synced, before it is moved into
/// place (runed installs the KEK there). `dir` must not hold a data dir already.
///
/// Crash-safe: the files are written under `dir/.restore-staging` while `dir/RESTORE-IN-PROGRESS`
/// exists, moved into `dir` (the log last), and the marker removed last. A runed refuses to
/// start while the marker is there; the next restore clears what the interrupted one left.
pub fn restore(
    path: &Path,
    dir: &Path,
    check: impl FnOnce(&Backup) -> Result<(), String>,
    finish: impl FnOnce(&Path) -> Result<Vec<PathBuf>, String>,
) -> Result<Header, BackupError> {
    if dir.join(RESTORING).exists() {
        clear_interrupted(dir)?;
    }
    for f in [LOG_DIR, LEGACY_LOG_FILE, STATE_FILE] {
        if dir.join(f).exists() {
            return Err(BackupError::NotEmpty(dir.to_path_buf(), f));
        }
    }
    let backup = read(path)?;
    check(&backup).map_err(BackupError::Refused)?;
    private_dir(dir).map_err(|e| BackupError::Io(format!("{}: {e}", dir.display())))?;
    std::fs::write(dir.join(RESTORING), format!("restoring {}\n", path.display())).map_err(io)?;
    sync_dir(dir)?;
    let staging = dir.join(STAGING);
    let done = (|| {
        std::fs::create_dir_all(&staging).map_err(io)?;
        write_data_dir(&staging, &backup)?;
        let extra = finish(&staging).map_err(BackupError::Refused)?;
        sync_dir(&staging)?;
        // The log last: without it no runed starts from a half-moved dir.
        for name in extra.iter().map(PathBuf::as_path).chain([
            Path::new(SNAPSHOT_DIR),
            Path::new(STATE_FILE),
            Path::new(LOG_DIR),
        ]) {
            std::fs::rename(staging.join(name), dir.join(name)).map_err(io)?;
        }
        std::fs::remove_dir(&staging).map_err(io)?;
        sync_dir(dir)?;
        std::fs::remove_file(dir.join(RESTORING)).map_err(io)?;
        sync_dir(dir)
    })();
    if let Err(e) = done {
        // Nothing half-written is left behind for a runed to start from.
        let _ = clear_interrupted(dir);
        return Err(e);
    }
    Ok(backup.header)
}

fn write_data_dir(dir: &Path, b: &Backup) -> Result<(), BackupError> {
    // A backup of any member restores into a single voter, as `etcdutl snapshot restore`
    // rewrites the membership: the cluster's members are not there to form a quorum with.
    let meta = &SnapshotMeta {
        last_membership: StoredMembership::new(
            *b.header.meta.last_membership.log_id(),
            openraft::Membership::new(
                vec![std::collections::BTreeSet::from([NODE_ID])],
                std::collections::BTreeMap::from([(NODE_ID, BasicNode::new("local"))]),
            ),
        ),
        ..b.header.meta.clone()
    };
    {
        let db = Database::create(dir.join(STATE_FILE)).map_err(io)?;
        install(&db, meta, &b.records).map_err(io)?;
    }
    snapshot::write(&dir.join(SNAPSHOT_DIR), meta, &snapshot::encode_body(&b.records)).map_err(io)?;
    // The log starts after the backup's index, as after a compaction: purged up to it, with
    // the vote of its term, so the restored node elects itself in a later term.
    let mut m = wal::Meta::default();
    if let Some(last) = meta.last_log_id {
        let vote = Vote::new(last.leader_id.term, NODE_ID);
        m.set(MetaKey::Vote, Some(serde_json::to_vec(&vote).map_err(io)?));
        m.set(MetaKey::Committed, Some(serde_json::to_vec(&last).map_err(io)?));
        m.set(MetaKey::LastPurged, Some(serde_json::to_vec(&last).map_err(io)?));
    }
    wal::create(&dir.join(LOG_DIR), &m).map_err(io)
}

/// Creates a data dir (and missing parents) readable by its owner only; an existing one is left
/// as it is.
pub(crate) fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}
