//! Sealing: the KEKs, sealing a cast's secrets before they are proposed, the start-up KEK check,
//! rotation, and opening for the orchestrator and the ingress. Plaintext exists only in memory
//! here and in the runners; nothing logs a value. The gRPC face is `secrets_api.rs`.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use rune_log::Log;
use rune_proto::v1 as pb;
use rune_secrets::{check, open, rewrap, seal, Kek, KekError, KekSource, Keyring};
use rune_statemachine::command::Rewrap;
use rune_statemachine::secret::{SealedSecret, SecretData, SecretLimits};
use rune_statemachine::store::{
    get_record, list_records, secret_key, secrets_prefix, SecretRecord, SECRET_HISTORY_ALL,
};
use rune_statemachine::{Command, Resource, STATE_TABLE};
use tonic::Status;

use crate::grpc::{internal, not_proposed, rejection, Decoded};

/// Why the KEK cannot be used; `runed` refuses to start with this message and exit code 78
/// ([`crate::daemon::EXIT_CONFIG`]): restarting cannot help, restoring the key does.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct KekProblem(pub String);

/// The KEKs and what secret handling needs besides.
pub struct Secrets {
    ring: RwLock<Keyring>,
    /// `storage.secret-limits`.
    pub limits: SecretLimits,
    source: KekSource,
    /// Casts that seal hold it shared from sealing until their entry is applied; a rotation
    /// holds it exclusively, so no secret can be sealed under a KEK that is being retired.
    rotation: tokio::sync::RwLock<()>,
}

fn all_sealed(log: &Log) -> Result<Vec<SealedSecret>, String> {
    let txn = log.read().map_err(|e| e.to_string())?;
    let t = txn.open_table(STATE_TABLE).map_err(|e| e.to_string())?;
    let mut out: Vec<SealedSecret> = list_records::<SecretRecord, _>(&t, &secrets_prefix(None))
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|r| r.sealed)
        .collect();
    out.extend(list_records::<SealedSecret, _>(&t, SECRET_HISTORY_ALL).map_err(|e| e.to_string())?);
    // The newest version is both the record and its history entry: once is enough.
    let mut seen = std::collections::BTreeSet::new();
    out.retain(|s| seen.insert((s.namespace.clone(), s.name.clone(), s.version)));
    Ok(out)
}

fn restore_hint(source: &KekSource) -> String {
    match source {
        KekSource::File { path, .. } => format!(
            "restore the KEK file {} (base64 of the 32-byte key, mode 0600) from your backup, or point crypto.kek.file-path at it",
            path.display()
        ),
        KekSource::Env { var } => format!("set {var} to the base64 of the 32-byte KEK the secrets were sealed with"),
        KekSource::Generated => {
            "crypto.kek.source is generated, which makes a new KEK at every start: use source file or env".into()
        }
    }
}

impl Secrets {
    /// Loads the KEK and proves it opens every stored secret, finishing a rotation that a crash
    /// interrupted. Refuses (with what is wrong and how to restore it) rather than start with a key
    /// that would leave secrets unreadable.
    pub fn load(log: &Log, source: KekSource, limits: SecretLimits) -> Result<Self, KekProblem> {
        let sealed =
            all_sealed(log).map_err(|e| KekProblem(format!("cannot read the stored secrets: {e}")))?;
        let problem = |what: String| KekProblem(format!("{what}; {}", restore_hint(&source)));
        let loaded = match rune_secrets::load(&source, sealed.is_empty()) {
            Ok(l) => l,
            Err(KekError::Missing(p)) if !sealed.is_empty() => {
                return Err(problem(format!(
                    "the KEK file {} is missing, and {} stored secret version(s) are sealed under KEK {}",
                    p.display(),
                    sealed.len(),
                    sealed[0].kek_id
                )))
            }
            Err(KekError::Write(p, e)) if e.kind() == std::io::ErrorKind::ReadOnlyFilesystem => {
                let dir = p.parent().unwrap_or(&p).display().to_string();
                return Err(KekProblem(format!(
                    "cannot write the KEK file {}: the file system is read-only for runed (under systemd, the unit's ProtectSystem= makes /usr and /etc read-only): keep the KEK in the data dir (leave crypto.kek.file-path unset), or let the unit write {dir} (`systemctl edit runed`, then [Service] ReadWritePaths={dir})",
                    p.display()
                )));
            }
            Err(e) => return Err(problem(e.to_string())),
        };
        let mut ring = match &loaded.previous {
            // An env source's rotation that stopped midway: the new KEK seals, the previous
            // one opens what is not re-wrapped yet; `rotate-kek` to the new KEK finishes it.
            Some(prev) => Keyring::new(prev.clone()).rotated_to(loaded.kek.clone()),
            None => Keyring::new(loaded.kek.clone()),
        };
        if let Some(p) = &loaded.pending {
            // As the interrupted rotation left it: the new KEK primary, the old one kept to
            // open what is not re-wrapped yet. `finish_pending_rotation` goes on from there.
            ring = ring.rotated_to(p.clone());
        }
        for s in &sealed {
            if let Err(e) = check(&ring, s) {
                let hint = match &source {
                    KekSource::Env { var } => format!(
                        "; if a rotation stopped midway, set {} to the KEK it rotated from and run rotate-kek to this one again",
                        rune_secrets::previous_var(var)
                    ),
                    _ => String::new(),
                };
                return Err(problem(format!(
                    "the KEK {} does not open the stored secrets ({e}){hint}",
                    loaded.kek.id()
                )));
            }
        }
        if loaded.created {
            tracing::warn!(
                kek_id = loaded.kek.id(),
                "generated a new KEK: back it up, secrets cannot be read without it"
            );
        }
        let secrets = Self {
            ring: RwLock::new(ring),
            limits,
            source,
            rotation: tokio::sync::RwLock::new(()),
        };
        Ok(secrets)
    }

    /// Finishes a rotation that wrote `<file>.new` but stopped before installing it.
    pub async fn finish_pending_rotation(&self, log: &Log) -> Result<(), KekProblem> {
        let KekSource::File { path, .. } = &self.source else {
            return Ok(());
        };
        let pending = rune_secrets::pending_path(path);
        let Ok(text) = std::fs::read_to_string(&pending) else {
            return Ok(());
        };
        let new = Kek::parse(&text).map_err(|e| KekProblem(format!("{}: {e}", pending.display())))?;
        tracing::warn!(
            new_kek_id = new.id(),
            "finishing a KEK rotation that was interrupted"
        );
        self.rotate(log, new)
            .await
            .map(|_| ())
            .map_err(|s| KekProblem(s.message().to_string()))
    }

    fn ring(&self) -> Keyring {
        match self.ring.read() {
            Ok(r) => r.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The KEK a node that joins the cluster is handed (base64, as in a KEK file). Refused
    /// while a rotation is half-done: the new member would keep a KEK about to be retired.
    pub fn kek_for_member(&self) -> Result<String, Status> {
        let ring = self.ring();
        if ring.has_previous() {
            return Err(Status::failed_precondition(
                "a KEK rotation is in progress on this member; join once it has finished",
            ));
        }
        Ok(ring.primary().to_base64())
    }

    /// Opens a sealed version with the loaded KEKs.
    pub fn open(&self, s: &SealedSecret) -> Result<SecretData, String> {
        open(&self.ring(), s).map_err(|e| e.to_string())
    }

    /// Whether secrets may be sealed under two KEKs: a rotation was started (or runed was
    /// given a previous KEK) and has not finished.
    pub(crate) fn rotation_unfinished(&self) -> bool {
        self.ring().has_previous()
    }

    /// Held by a cast from sealing until its entry is applied (see `rotation`).
    pub(crate) async fn cast_guard(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.rotation.read().await
    }

    /// Seals the cast's secrets: each changed one at the next version, unchanged ones reported
    /// and left out, so a re-cast writes nothing. Only a caller who may write secrets gets this
    /// far, and only one who may also reveal them learns "unchanged": for anyone else every
    /// cast is a new version, so a dry run cannot be used to guess a value.
    pub(crate) fn seal_cast(
        &self,
        log: &Log,
        caller: &crate::auth::Caller,
        decoded: Vec<Decoded>,
    ) -> Result<(Vec<Resource>, Vec<pb::ApplyResult>), Status> {
        // Most casts hold no secret: no key ring and no read of the state for them.
        if decoded.iter().all(|d| matches!(d, Decoded::Resource(_))) {
            let out = decoded
                .into_iter()
                .filter_map(|d| match d {
                    Decoded::Resource(r) => Some(r),
                    Decoded::Secret { .. } => None,
                })
                .collect();
            return Ok((out, Vec::new()));
        }
        let ring = self.ring();
        let txn = log.read().map_err(internal)?;
        let t = txn.open_table(STATE_TABLE).map_err(internal)?;
        let mut out = Vec::new();
        let mut unchanged = Vec::new();
        for d in decoded {
            match d {
                Decoded::Resource(r) => out.push(r),
                Decoded::Secret {
                    namespace,
                    name,
                    data,
                } => {
                    let prev = get_record::<SecretRecord, _>(&t, &secret_key(&namespace, &name))
                        .map_err(internal)?;
                    let verb = if prev.is_some() { "update" } else { "create" };
                    crate::auth::check(caller, "secrets", verb, Some(&namespace))?;
                    let may_compare =
                        crate::auth::check(caller, "secrets", "reveal", Some(&namespace)).is_ok();
                    let version = match &prev {
                        Some(p) if !may_compare => p.sealed.version + 1,
                        Some(p) => {
                            let current = open(&ring, &p.sealed)
                                .map_err(|e| Status::failed_precondition(e.to_string()))?;
                            if current == data {
                                unchanged.push(pb::ApplyResult {
                                    kind: "secret".into(),
                                    namespace,
                                    name,
                                    action: pb::ApplyAction::Unchanged as i32,
                                    generation: p.sealed.version,
                                });
                                continue;
                            }
                            p.sealed.version + 1
                        }
                        None => 1,
                    };
                    if let (Some(crt), Some(key)) = (data.get("tls.crt"), data.get("tls.key")) {
                        // A TLS secret that cannot serve is refused now, not at the first handshake.
                        rune_ingress::acme::load_pair(crt, key).map_err(|e| {
                            Status::invalid_argument(format!("secret {namespace}/{name}: {e}"))
                        })?;
                    }
                    let sealed = seal(&ring, &namespace, &name, version, &data).map_err(internal)?;
                    out.push(Resource::Secret(sealed));
                }
            }
        }
        Ok((out, unchanged))
    }

    /// Re-wraps every stored data key under `new` through the log, then installs `new` as the
    /// only KEK. Crash-safe for a file source: the new KEK is written beside the old one first,
    /// and a start that finds it finishes the job.
    pub async fn rotate(&self, log: &Log, new: Kek) -> Result<pb::RotateKekResponse, Status> {
        let _only = self.rotation.write().await;
        let old_id = self.ring().primary().id().to_string();
        // An unfinished rotation to another key must finish first: starting a second one would
        // drop the key the first one already sealed with.
        if self.ring().has_previous() && old_id != new.id() {
            return Err(Status::failed_precondition(format!(
                "a rotation to KEK {old_id} is unfinished; run rotate-kek again with that key first"
            )));
        }
        if let KekSource::File { path, .. } = &self.source {
            if let Ok(text) = std::fs::read_to_string(rune_secrets::pending_path(path)) {
                if Kek::parse(&text).map(|k| k.id() != new.id()).unwrap_or(false) {
                    return Err(Status::failed_precondition(format!(
                        "{} holds an unfinished rotation to another KEK; restart runed to finish it first",
                        rune_secrets::pending_path(path).display()
                    )));
                }
            }
            rune_secrets::write_kek_file(&rune_secrets::pending_path(path), &new)
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        // New secrets are sealed under the new KEK from now on; the old one still opens.
        {
            let mut w = self
                .ring
                .write()
                .map_err(|_| Status::internal("KEK lock poisoned"))?;
            *w = w.rotated_to(new.clone());
        }
        let mut rewrapped = 0u32;
        let mut done = false;
        // No cast can seal meanwhile (the write guard), so one pass re-wraps everything; the
        // second finds nothing left and proves it.
        for _ in 0..3 {
            let ring = self.ring();
            let items: Vec<Rewrap> = all_sealed(log)
                .map_err(Status::internal)?
                .iter()
                .filter(|s| s.kek_id != new.id())
                .map(|s| {
                    Ok(Rewrap {
                        namespace: s.namespace.clone(),
                        name: s.name.clone(),
                        version: s.version,
                        from_kek_id: s.kek_id.clone(),
                        kek_id: new.id().to_string(),
                        wrapped_dek: rewrap(&ring, &new, s)
                            .map_err(|e| Status::failed_precondition(e.to_string()))?,
                    })
                })
                .collect::<Result<_, Status>>()?;
            if items.is_empty() {
                done = true;
                break;
            }
            for chunk in items.chunks(256) {
                let p = log
                    .propose(Command::RewrapSecrets {
                        items: chunk.to_vec(),
                    })
                    .await
                    .map_err(not_proposed)?;
                p.outcome.map_err(rejection)?;
                rewrapped += u32::try_from(chunk.len()).unwrap_or(u32::MAX);
            }
        }
        if !done {
            return Err(Status::internal(
                "secrets are still sealed under the old KEK after re-wrapping; the rotation stays unfinished (both keys kept)",
            ));
        }
        let note = match &self.source {
            KekSource::File { path, .. } => {
                std::fs::rename(rune_secrets::pending_path(path), path)
                    .map_err(|e| Status::internal(format!("installing the new KEK file: {e}")))?;
                format!(
                    "{} now holds the new KEK; runed no longer needs the old one, but backups taken before now do: keep it with them",
                    path.display()
                )
            }
            KekSource::Env { var } => {
                format!(
                    "set {var} to the new KEK (and unset {}) before runed next starts; runed no longer needs the old one, but backups taken before now do: keep it with them",
                    rune_secrets::previous_var(var)
                )
            }
            KekSource::Generated => "the KEK is per-process (source generated)".into(),
        };
        {
            let mut w = self
                .ring
                .write()
                .map_err(|_| Status::internal("KEK lock poisoned"))?;
            *w = Keyring::new(new.clone());
        }
        tracing::info!(old_kek_id = %old_id, new_kek_id = new.id(), rewrapped, "KEK rotated");
        Ok(pb::RotateKekResponse {
            rewrapped,
            old_kek_id: old_id,
            new_kek_id: new.id().to_string(),
            note,
        })
    }
}

/// Lets the orchestrator open secrets without knowing the KEK.
pub struct SecretOpener(pub Arc<Secrets>);

/// The ingress's certificate store: secrets sealed here and written through the log, so issued
/// certificates and the ACME account survive restarts and follow KEK rotations.
pub struct CertVault {
    /// The log.
    pub log: Arc<Log>,
    /// The keys.
    pub secrets: Arc<Secrets>,
}

impl rune_ingress::acme::Vault for CertVault {
    fn get(&self, namespace: &str, name: &str) -> Result<Option<SecretData>, String> {
        let txn = self.log.read().map_err(|e| e.to_string())?;
        let t = txn.open_table(STATE_TABLE).map_err(|e| e.to_string())?;
        match get_record::<SecretRecord, _>(&t, &secret_key(namespace, name)).map_err(|e| e.to_string())? {
            Some(r) => self.secrets.open(&r.sealed).map(Some),
            None => Ok(None),
        }
    }

    fn put<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        data: SecretData,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move {
            // Sealed and applied under the rotation lock, like a cast.
            let _cast = self.secrets.cast_guard().await;
            let version = {
                let txn = self.log.read().map_err(|e| e.to_string())?;
                let t = txn.open_table(STATE_TABLE).map_err(|e| e.to_string())?;
                get_record::<SecretRecord, _>(&t, &secret_key(namespace, name))
                    .map_err(|e| e.to_string())?
                    .map_or(1, |r| r.sealed.version + 1)
            };
            let sealed =
                seal(&self.secrets.ring(), namespace, name, version, &data).map_err(|e| e.to_string())?;
            let p = self
                .log
                .propose(Command::Apply {
                    resources: vec![Resource::Secret(sealed)],
                    create_namespace: false,
                    force: false,
                    history_limit: rune_statemachine::DEFAULT_HISTORY_LIMIT,
                    release: None,
                })
                .await
                .map_err(|e| e.to_string())?;
            p.outcome.map(|_| ()).map_err(|r| format!("{r:?}"))
        })
    }

    fn names(&self, namespace: &str, prefix: &str) -> Result<Vec<String>, String> {
        let txn = self.log.read().map_err(|e| e.to_string())?;
        let t = txn.open_table(STATE_TABLE).map_err(|e| e.to_string())?;
        let under = secrets_prefix(Some(namespace));
        let from = format!("{under}{prefix}");
        // Keys only: the values (sealed certificates) are not copied to be thrown away.
        let mut names = Vec::new();
        for item in t.range::<&str>(from.as_str()..).map_err(|e| e.to_string())? {
            let (k, _) = item.map_err(|e| e.to_string())?;
            let Some(name) = k
                .value()
                .strip_prefix(from.as_str())
                .map(|rest| format!("{prefix}{rest}"))
            else {
                break;
            };
            names.push(name);
        }
        Ok(names)
    }

    fn delete<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move {
            let p = self
                .log
                .propose(Command::DeleteSecret {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                    // The ingress's own certificate, for a host no longer exposed.
                    force: true,
                })
                .await
                .map_err(|e| e.to_string())?;
            match p.outcome {
                Ok(_) | Err(rune_statemachine::Rejection::NotFound(_)) => Ok(()),
                Err(r) => Err(r.to_string()),
            }
        })
    }
}

impl rune_orchestrator::SecretSource for SecretOpener {
    fn open(&self, s: &SealedSecret) -> Result<SecretData, String> {
        self.0.open(s)
    }
}

/// Where a new KEK file would be written for the default source.
pub fn default_kek_path(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("kek.b64")
}
