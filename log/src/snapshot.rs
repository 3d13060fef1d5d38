//! Snapshot files: the whole state table at one log index, written atomically beside the log.
//!
//! Layout: one JSON header line (format, openraft meta), then `[u32 key len][key][u32 value len][value]`
//! records in key order. The file is written to a temporary name, fsynced, renamed over
//! `current.snap` and the directory fsynced, so a crash leaves the old or the new snapshot whole.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use openraft::{BasicNode, SnapshotMeta};
use serde::{Deserialize, Serialize};

/// Snapshot metadata as openraft keeps it.
pub type Meta = SnapshotMeta<u64, BasicNode>;

const FILE: &str = "current.snap";
const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Header {
    format: u32,
    meta: SnapshotMeta<u64, BasicNode>,
}

/// Encodes state records as a snapshot body.
pub fn encode_body(records: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(records.iter().map(|(k, v)| k.len() + v.len() + 8).sum());
    for (k, v) in records {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(v);
    }
    out
}

/// Decodes a snapshot body; a truncated or garbled body is an error, never a partial state.
pub fn decode_body(mut b: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if b.len() < n {
            return Err("snapshot body is truncated".into());
        }
        let (h, t) = b.split_at(n);
        *b = t;
        Ok(h)
    }
    fn len(b: &mut &[u8]) -> Result<usize, String> {
        let h = take(b, 4)?;
        Ok(u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize)
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let kl = len(&mut b)?;
        let k = String::from_utf8(take(&mut b, kl)?.to_vec())
            .map_err(|_| "snapshot key is not UTF-8".to_string())?;
        let vl = len(&mut b)?;
        out.push((k, take(&mut b, vl)?.to_vec()));
    }
    Ok(out)
}

/// Writes the snapshot atomically and durably.
pub fn write(dir: &Path, meta: &SnapshotMeta<u64, BasicNode>, body: &[u8]) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{FILE}.tmp"));
    {
        let mut f = fs::File::create(&tmp)?;
        let header = serde_json::to_vec(&Header {
            format: FORMAT,
            meta: meta.clone(),
        })
        .map_err(io::Error::other)?;
        f.write_all(&header)?;
        f.write_all(b"\n")?;
        f.write_all(body)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(FILE))?;
    fs::File::open(dir)?.sync_all()
}

/// Reads the current snapshot, if one was written.
pub fn read(dir: &Path) -> io::Result<Option<(Meta, Vec<u8>)>> {
    let bytes = match fs::read(dir.join(FILE)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let nl = bytes
        .iter()
        .position(|&c| c == b'\n')
        .ok_or_else(|| io::Error::other("snapshot header is missing"))?;
    let header: Header = serde_json::from_slice(&bytes[..nl]).map_err(io::Error::other)?;
    if header.format != FORMAT {
        return Err(io::Error::other(format!(
            "snapshot format {} is not understood",
            header.format
        )));
    }
    Ok(Some((header.meta, bytes[nl + 1..].to_vec())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_round_trips_and_rejects_truncation() {
        let recs = vec![
            ("a".to_string(), b"1".to_vec()),
            ("b/c".to_string(), vec![0, 1, 2]),
        ];
        let body = encode_body(&recs);
        assert_eq!(decode_body(&body).unwrap(), recs);
        assert!(decode_body(&body[..body.len() - 1]).is_err());
    }
}
