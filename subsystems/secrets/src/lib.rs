//! Envelope encryption of secret values.
//!
//! Each secret version gets a fresh 32-byte data key (DEK). The values are sealed with the DEK
//! (AES-256-GCM, associated data `"<ns>|<name>|<version>"`), and the DEK is sealed with the
//! key-encryption key (KEK, associated data `"<ns>|<name>|<version>|dek"`), as the original Rune
//! does. Binding namespace, name and version into the associated data means a ciphertext copied to
//! another secret or version does not open. Rotating the KEK re-seals only the small DEKs.
//!
//! Invariant: plaintext leaves this crate only as the return value of [`open`]; nothing here logs.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rune_statemachine::secret::{SealedSecret, SecretData};
use sha2::{Digest, Sha256};

const NONCE_LEN: usize = 12;

/// `n` bytes from the operating system's CSPRNG.
pub fn random_bytes(n: usize) -> Result<Vec<u8>, RandomError> {
    let mut v = vec![0u8; n];
    fill_random(&mut v)?;
    Ok(v)
}

/// Every key, nonce and token of this crate is drawn here: `try_`, so a refused getrandom is
/// an error for the caller, not a panic.
fn fill_random(buf: &mut [u8]) -> Result<(), RandomError> {
    OsRng.try_fill_bytes(buf).map_err(|e| RandomError(e.to_string()))
}

/// The operating system refused randomness (getrandom denied, as by a seccomp filter): keys and
/// tokens are then not made at all, rather than made weak or the process stopped by a panic.
#[derive(Debug, thiserror::Error)]
#[error("the operating system's random source failed: {0}")]
pub struct RandomError(String);

/// A key-encryption key. Its id is derived from the key, so a stored secret names the KEK that
/// opens it without revealing anything about it.
#[derive(Clone)]
pub struct Kek {
    key: [u8; 32],
    id: String,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kek({})", self.id)
    }
}

impl Kek {
    /// A KEK from its 32 bytes.
    pub fn from_bytes(key: [u8; 32]) -> Self {
        let mut h = Sha256::new();
        h.update(b"rune-kek-id\0");
        h.update(key);
        let id = hex::encode(&h.finalize()[..8]);
        Self { key, id }
    }

    /// A new random KEK.
    pub fn generate() -> Result<Self, RandomError> {
        let mut key = [0u8; 32];
        fill_random(&mut key)?;
        Ok(Self::from_bytes(key))
    }

    /// Parses the base64 text of a KEK file or variable (whitespace around it is ignored).
    pub fn parse(text: &str) -> Result<Self, KekError> {
        let bytes = B64
            .decode(text.trim())
            .map_err(|_| KekError::Malformed("it is not base64".into()))?;
        let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
            KekError::Malformed(format!("decodes to {} bytes; a KEK is 32 bytes", bytes.len()))
        })?;
        Ok(Self::from_bytes(key))
    }

    /// The id stored with every data key this KEK wraps.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The base64 text written to a KEK file.
    pub fn to_base64(&self) -> String {
        B64.encode(self.key)
    }
}

/// The KEKs that can open stored secrets: the primary, which seals everything new, and during a
/// rotation the previous one.
#[derive(Debug, Clone)]
pub struct Keyring {
    primary: Kek,
    others: Vec<Kek>,
}

impl Keyring {
    /// A ring of one KEK.
    pub fn new(primary: Kek) -> Self {
        Self {
            primary,
            others: Vec::new(),
        }
    }

    /// This ring with `new` as primary and the current primary kept for opening.
    pub fn rotated_to(&self, new: Kek) -> Self {
        let mut others = vec![self.primary.clone()];
        others.extend(self.others.iter().cloned());
        others.retain(|k| k.id != new.id);
        Self { primary: new, others }
    }

    /// Whether a previous KEK is still kept (a rotation is under way or unfinished).
    pub fn has_previous(&self) -> bool {
        !self.others.is_empty()
    }

    /// The KEK that seals new data keys.
    pub fn primary(&self) -> &Kek {
        &self.primary
    }

    /// The KEK with this id.
    pub fn get(&self, id: &str) -> Option<&Kek> {
        std::iter::once(&self.primary)
            .chain(self.others.iter())
            .find(|k| k.id == id)
    }
}

/// Failures to load a KEK.
#[derive(Debug, thiserror::Error)]
pub enum KekError {
    /// The file does not exist.
    #[error("KEK file {0} does not exist")]
    Missing(PathBuf),
    /// The file or variable could not be read.
    #[error("cannot read the KEK from {0}: {1}")]
    Unreadable(String, std::io::Error),
    /// The variable is not set.
    #[error("environment variable {0} is not set or empty")]
    EnvMissing(String),
    /// The text is not a KEK.
    #[error("the KEK is malformed: {0}")]
    Malformed(String),
    /// A new KEK file could not be written.
    #[error("cannot write the KEK file {0}: {1}")]
    Write(PathBuf, std::io::Error),
    /// A new KEK could not be drawn.
    #[error(transparent)]
    Random(#[from] RandomError),
}

/// Failures to seal or open.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// No loaded KEK has this id.
    #[error("secret {0} is sealed under KEK {1}, which is not loaded")]
    UnknownKek(String, String),
    /// Authentication failed: wrong key, or the record was altered or moved.
    #[error("secret {0} does not open: {1}")]
    Open(String, &'static str),
    /// Encryption failed (cannot happen with valid key sizes).
    #[error("sealing failed")]
    Seal,
    /// No nonce or data key could be drawn.
    #[error(transparent)]
    Random(#[from] RandomError),
}

fn aad(ns: &str, name: &str, version: u64) -> String {
    format!("{ns}|{name}|{version}")
}

fn seal_bytes(key: &[u8; 32], plaintext: &[u8], aad: &[u8]) -> Result<String, CryptoError> {
    let cipher = Aes256Gcm::new(key.into());
    let mut nonce = [0u8; NONCE_LEN];
    fill_random(&mut nonce)?;
    let ct = cipher
        .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad })
        .map_err(|_| CryptoError::Seal)?;
    let mut out = nonce.to_vec();
    out.extend(ct);
    Ok(B64.encode(out))
}

fn open_bytes(key: &[u8; 32], sealed: &str, aad: &[u8], what: &str) -> Result<Vec<u8>, CryptoError> {
    let raw = B64
        .decode(sealed)
        .map_err(|_| CryptoError::Open(what.into(), "not base64"))?;
    if raw.len() < NONCE_LEN + 16 {
        return Err(CryptoError::Open(what.into(), "too short"));
    }
    let (nonce, ct) = raw.split_at(NONCE_LEN);
    Aes256Gcm::new(key.into())
        .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
        .map_err(|_| CryptoError::Open(what.into(), "authentication failed (wrong KEK, or altered data)"))
}

/// Seals one version of a secret under the keyring's primary KEK.
pub fn seal(
    ring: &Keyring,
    namespace: &str,
    name: &str,
    version: u64,
    data: &SecretData,
) -> Result<SealedSecret, CryptoError> {
    let mut dek = [0u8; 32];
    fill_random(&mut dek)?;
    let a = aad(namespace, name, version);
    let plain: BTreeMap<&String, String> = data.iter().map(|(k, v)| (k, B64.encode(v))).collect();
    let json = serde_json::to_vec(&plain).map_err(|_| CryptoError::Seal)?;
    let ciphertext = seal_bytes(&dek, &json, a.as_bytes())?;
    let kek = ring.primary();
    let wrapped_dek = seal_bytes(&kek.key, &dek, format!("{a}|dek").as_bytes())?;
    Ok(SealedSecret {
        namespace: namespace.into(),
        name: name.into(),
        type_: "static".into(),
        version,
        keys: data.keys().cloned().collect(),
        kek_id: kek.id.clone(),
        wrapped_dek,
        ciphertext,
    })
}

fn unwrap_dek(ring: &Keyring, s: &SealedSecret) -> Result<[u8; 32], CryptoError> {
    let what = format!("{}/{} v{}", s.namespace, s.name, s.version);
    let kek = ring
        .get(&s.kek_id)
        .ok_or_else(|| CryptoError::UnknownKek(what.clone(), s.kek_id.clone()))?;
    let a = format!("{}|dek", aad(&s.namespace, &s.name, s.version));
    let dek = open_bytes(&kek.key, &s.wrapped_dek, a.as_bytes(), &what)?;
    dek.as_slice()
        .try_into()
        .map_err(|_| CryptoError::Open(what, "the data key is not 32 bytes"))
}

/// Opens a sealed secret version.
pub fn open(ring: &Keyring, s: &SealedSecret) -> Result<SecretData, CryptoError> {
    let what = format!("{}/{} v{}", s.namespace, s.name, s.version);
    let dek = unwrap_dek(ring, s)?;
    let json = open_bytes(
        &dek,
        &s.ciphertext,
        aad(&s.namespace, &s.name, s.version).as_bytes(),
        &what,
    )?;
    let plain: BTreeMap<String, String> = serde_json::from_slice(&json)
        .map_err(|_| CryptoError::Open(what.clone(), "not a secret document"))?;
    plain
        .into_iter()
        .map(|(k, v)| {
            B64.decode(v)
                .map(|b| (k, b))
                .map_err(|_| CryptoError::Open(what.clone(), "a value is not base64"))
        })
        .collect()
}

/// Checks that the keyring opens a version's data key, without touching the values.
pub fn check(ring: &Keyring, s: &SealedSecret) -> Result<(), CryptoError> {
    unwrap_dek(ring, s).map(|_| ())
}

/// The version's data key wrapped under `new` instead of the KEK it is wrapped by now.
pub fn rewrap(ring: &Keyring, new: &Kek, s: &SealedSecret) -> Result<String, CryptoError> {
    let dek = unwrap_dek(ring, s)?;
    let a = format!("{}|dek", aad(&s.namespace, &s.name, s.version));
    seal_bytes(&new.key, &dek, a.as_bytes())
}

/// Where the KEK comes from (`crypto.kek.source`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KekSource {
    /// A file holding the base64 of 32 bytes.
    File {
        /// The file.
        path: PathBuf,
        /// Create it (mode 0600) when missing.
        generate_if_missing: bool,
    },
    /// An environment variable holding the base64 of 32 bytes.
    Env {
        /// The variable.
        var: String,
    },
    /// A random KEK per process: secrets do not survive a restart. For throwaway setups only.
    Generated,
}

/// A KEK loaded from its source, with what happened on the way.
#[derive(Debug)]
pub struct Loaded {
    /// The KEK.
    pub kek: Kek,
    /// It was created just now (a new file, or a per-process key).
    pub created: bool,
    /// A KEK a rotation wrote beside the file (`<file>.new`) but did not finish installing.
    pub pending: Option<Kek>,
    /// The KEK an env source's rotation left (`<VAR>_PREVIOUS`): it still opens what that
    /// rotation had not re-wrapped when it stopped, until a rotation to `kek` finishes.
    pub previous: Option<Kek>,
}

/// The variable holding the KEK an env source rotated from, for a rotation that stopped
/// midway (its re-wraps span several log entries).
pub fn previous_var(var: &str) -> String {
    format!("{var}_PREVIOUS")
}

/// The file a rotation writes the new KEK to before it re-wraps anything.
pub fn pending_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".new");
    PathBuf::from(p)
}

/// Loads the KEK. `may_generate` is false when secrets exist, so that a lost file is reported
/// instead of silently replaced by a key that opens nothing.
pub fn load(source: &KekSource, may_generate: bool) -> Result<Loaded, KekError> {
    match source {
        KekSource::Generated => Ok(Loaded {
            kek: Kek::generate()?,
            created: true,
            pending: None,
            previous: None,
        }),
        KekSource::Env { var } => {
            let text = std::env::var(var).unwrap_or_default();
            if text.trim().is_empty() {
                return Err(KekError::EnvMissing(var.clone()));
            }
            let previous = std::env::var(previous_var(var))
                .ok()
                .filter(|t| !t.trim().is_empty())
                .map(|t| Kek::parse(&t))
                .transpose()?;
            Ok(Loaded {
                kek: Kek::parse(&text)?,
                created: false,
                pending: None,
                previous,
            })
        }
        KekSource::File {
            path,
            generate_if_missing,
        } => {
            let pending = match std::fs::read_to_string(pending_path(path)) {
                Ok(t) => Kek::parse(&t).ok(),
                Err(_) => None,
            };
            match std::fs::read_to_string(path) {
                Ok(t) => Ok(Loaded {
                    kek: Kek::parse(&t)?,
                    created: false,
                    pending,
                    previous: None,
                }),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if !(*generate_if_missing && may_generate) {
                        return Err(KekError::Missing(path.clone()));
                    }
                    let kek = Kek::generate()?;
                    write_kek_file(path, &kek)?;
                    Ok(Loaded {
                        kek,
                        created: true,
                        pending: None,
                        previous: None,
                    })
                }
                Err(e) => Err(KekError::Unreadable(path.display().to_string(), e)),
            }
        }
    }
}

/// Writes a KEK file atomically, mode 0600, its directory created 0700.
pub fn write_kek_file(path: &Path, kek: &Kek) -> Result<(), KekError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let fail = |e| KekError::Write(path.to_path_buf(), e);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(fail)?;
    }
    let tmp = pending_tmp(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(fail)?;
    f.write_all(format!("{}\n", kek.to_base64()).as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

fn pending_tmp(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".tmp");
    PathBuf::from(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> SecretData {
        [
            ("password".to_string(), b"hunter2".to_vec()),
            ("bin".into(), vec![0, 255, 7]),
        ]
        .into_iter()
        .collect()
    }

    #[test]
    fn round_trip_and_binding() {
        let ring = Keyring::new(Kek::generate().unwrap());
        let s = seal(&ring, "default", "db", 1, &data()).unwrap();
        assert!(!s.ciphertext.contains("hunter2"));
        assert_eq!(open(&ring, &s).unwrap(), data());
        // Moving the ciphertext to another name or version must not open.
        for moved in [
            SealedSecret {
                name: "other".into(),
                ..s.clone()
            },
            SealedSecret {
                version: 2,
                ..s.clone()
            },
            SealedSecret {
                namespace: "prod".into(),
                ..s.clone()
            },
        ] {
            assert!(matches!(open(&ring, &moved), Err(CryptoError::Open(..))));
        }
    }

    #[test]
    fn wrong_kek_and_rotation() {
        let old = Keyring::new(Kek::generate().unwrap());
        let s = seal(&old, "default", "db", 3, &data()).unwrap();
        let stranger = Keyring::new(Kek::generate().unwrap());
        assert!(matches!(open(&stranger, &s), Err(CryptoError::UnknownKek(..))));
        // Same id (forged) but another key: authentication fails rather than garbage out.
        let mut forged = s.clone();
        forged.kek_id = stranger.primary().id().to_string();
        assert!(matches!(open(&stranger, &forged), Err(CryptoError::Open(..))));

        let new = Kek::generate().unwrap();
        let ring = old.rotated_to(new.clone());
        let wrapped = rewrap(&ring, &new, &s).unwrap();
        let moved = SealedSecret {
            kek_id: new.id().to_string(),
            wrapped_dek: wrapped,
            ..s.clone()
        };
        assert_eq!(open(&Keyring::new(new), &moved).unwrap(), data());
    }

    #[test]
    fn kek_parsing_and_files() {
        assert!(matches!(Kek::parse("not base64!"), Err(KekError::Malformed(_))));
        assert!(matches!(
            Kek::parse(&B64.encode([1u8; 16])),
            Err(KekError::Malformed(_))
        ));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/kek.b64");
        let src = KekSource::File {
            path: path.clone(),
            generate_if_missing: true,
        };
        assert!(matches!(load(&src, false), Err(KekError::Missing(_))));
        let first = load(&src, true).unwrap();
        assert!(first.created);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = load(&src, true).unwrap();
        assert!(!again.created);
        assert_eq!(again.kek.id(), first.kek.id());
    }
}
