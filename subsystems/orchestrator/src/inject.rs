//! Secrets and configmaps into instances: `envFrom`, `{{secret:name/key}}` and
//! `{{configmap:name/key}}` in env values, and `secretMounts`/`configMounts` as files.
//!
//! Resolved at each start, from the applied state, so a new version reaches the next instance.
//! Plaintext lives in the instance's environment and in mount files under the runtime directory
//! (a tmpfs such as /run), never under the data directory, and is never logged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rune_statemachine::secret::{SealedSecret, SecretData};
use rune_statemachine::spec::Mount;
use rune_statemachine::store::{configmap_key, get_record, secret_key, ConfigmapRecord, SecretRecord};
use rune_statemachine::uses::{env_sources, split_object_ref as split_ref, template_ref, templates};
use rune_statemachine::STATE_TABLE;

use crate::runner::{Launch, MountDir, RunError};

/// Opens sealed secrets; runed implements it with the KEK, which this crate never sees.
pub trait SecretSource: Send + Sync {
    /// The plaintext of one sealed version.
    fn open(&self, sealed: &SealedSecret) -> Result<SecretData, String>;
}

fn env_name_ok(k: &str) -> bool {
    let mut b = k.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// Reads secrets and configmaps for one start, each at most once.
struct Reader<'a> {
    table: redb::ReadOnlyTable<&'static str, &'static [u8]>,
    /// The service's namespace: the only one it may read from.
    own: String,
    secrets: Option<&'a dyn SecretSource>,
    cache: BTreeMap<(bool, String, String), BTreeMap<String, Vec<u8>>>,
}

impl Reader<'_> {
    fn get(&mut self, secret: bool, ns: &str, name: &str) -> Result<&BTreeMap<String, Vec<u8>>, RunError> {
        let k = (secret, ns.to_string(), name.to_string());
        let what = if secret { "secret" } else { "configmap" };
        if ns != self.own {
            // Casting a service in one namespace must not become a way to read another's secrets.
            return Err(RunError::Launch(format!(
                "{what} {ns}/{name} is in another namespace; a service in {} may only use its own namespace's",
                self.own
            )));
        }
        if !self.cache.contains_key(&k) {
            let missing = || RunError::Launch(format!("{what} {ns}/{name} not found"));
            let data = if secret {
                open_secret(&self.table, self.secrets, ns, name)?
            } else {
                let rec: ConfigmapRecord = get_record(&self.table, &configmap_key(ns, name))
                    .map_err(|e| RunError::Runtime(e.to_string()))?
                    .ok_or_else(missing)?;
                rec.configmap
                    .data
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect()
            };
            self.cache.insert(k.clone(), data);
        }
        Ok(&self.cache[&k])
    }

    fn value(&mut self, secret: bool, ns: &str, name: &str, key: &str) -> Result<String, RunError> {
        let what = if secret { "secret" } else { "configmap" };
        let data = self.get(secret, ns, name)?;
        let v = data
            .get(key)
            .ok_or_else(|| RunError::Launch(format!("{what} {ns}/{name} has no key {key}")))?;
        String::from_utf8(v.clone()).map_err(|_| {
            RunError::Launch(format!(
                "{what} {ns}/{name} key {key} is not text, so it cannot be an environment value"
            ))
        })
    }
}

/// The plaintext of a stored secret, by namespace and name (no namespace rule here: callers
/// decide whose secrets may be read).
pub(crate) fn open_secret<R>(
    table: &R,
    secrets: Option<&dyn SecretSource>,
    ns: &str,
    name: &str,
) -> Result<SecretData, RunError>
where
    R: redb::ReadableTable<&'static str, &'static [u8]>,
{
    let rec: SecretRecord = get_record(table, &secret_key(ns, name))
        .map_err(|e| RunError::Runtime(e.to_string()))?
        .ok_or_else(|| RunError::Launch(format!("secret {ns}/{name} not found")))?;
    let src = secrets.ok_or_else(|| RunError::Launch(format!("secret {ns}/{name}: no KEK is loaded")))?;
    src.open(&rec.sealed)
        .map_err(|e| RunError::Launch(format!("secret {ns}/{name}: {e}")))
}

/// Replaces every `{{secret:name/key}}` and `{{configmap:name/key}}` in `v`.
fn expand(v: &str, ns: &str, r: &mut Reader<'_>) -> Result<String, RunError> {
    let mut out = String::new();
    let mut done = 0;
    for (at, inner) in templates(v) {
        if let Some((secret, obj, key)) = template_ref(inner) {
            let (ons, name) = split_ref(obj, ns);
            out.push_str(&v[done..at.start]);
            out.push_str(&r.value(secret, &ons, &name, key)?);
            done = at.end;
        }
    }
    out.push_str(&v[done..]);
    Ok(out)
}

/// The directory under `run_dir` holding one instance's mount files.
pub fn mounts_dir(run_dir: &Path, node: &str, ns: &str, id: &str) -> PathBuf {
    run_dir.join("mounts").join(node).join(ns).join(id)
}

/// Resolves env and, with `write_mounts`, the mount files for a start (written fresh: secrets 0400,
/// configmaps 0444). An exec beside a running instance resolves env only: rewriting the files
/// would pull them from under the bind mounts of the instance.
pub fn resolve(
    log: &rune_log::Log,
    secrets: Option<&dyn SecretSource>,
    l: &Launch,
    run_dir: &Path,
    node: &str,
    write_mounts: bool,
) -> Result<Launch, RunError> {
    let spec = &l.spec;
    let needs = spec.env_from.is_some()
        || !spec.secret_mounts.is_empty()
        || !spec.config_mounts.is_empty()
        || !spec.configmap_mounts.is_empty()
        || spec.env.values().any(|v| v.0.contains("{{"));
    if !needs {
        return Ok(l.clone());
    }
    let txn = log.read().map_err(|e| RunError::Runtime(e.to_string()))?;
    let table = txn
        .open_table(STATE_TABLE)
        .map_err(|e| RunError::Runtime(e.to_string()))?;
    let mut r = Reader {
        table,
        own: l.namespace.clone(),
        secrets,
        cache: BTreeMap::new(),
    };
    let ns = l.namespace.as_str();
    let mut env = BTreeMap::new();
    for src in env_sources(spec) {
        let (secret, ons, name, prefix) = (src.secret, src.namespace, src.name, src.prefix);
        let what = if secret { "secret" } else { "configmap" };
        for (k, v) in r.get(secret, &ons, &name)?.clone() {
            let var = format!("{prefix}{k}");
            if !env_name_ok(&var) {
                return Err(RunError::Launch(format!(
                    "invalid environment variable name from envFrom {what} {ons}/{name}: {var}"
                )));
            }
            let text = String::from_utf8(v).map_err(|_| {
                RunError::Launch(format!(
                    "{what} {ons}/{name} key {k} is not text, so it cannot be an environment value"
                ))
            })?;
            env.insert(var, text);
        }
    }
    // Explicit env wins over envFrom; built-ins win over both.
    for (k, v) in &spec.env {
        env.insert(k.clone(), expand(v.as_str(), ns, &mut r)?);
    }
    for (k, v) in &l.env {
        if k.starts_with("RUNE_") {
            env.insert(k.clone(), v.clone());
        }
    }
    let mut mounts = Vec::new();
    let base = mounts_dir(run_dir, node, ns, &l.id);
    if !write_mounts {
        // The files the instance already has, so an exec beside it sees them too.
        let existing = spec
            .secret_mounts
            .iter()
            .chain(&spec.config_mounts)
            .chain(&spec.configmap_mounts)
            .map(|m| MountDir {
                host: base.join(&m.name),
                target: PathBuf::from(&m.mount_path),
                writable: false,
            })
            .filter(|m| m.host.is_dir())
            .collect();
        return Ok(Launch {
            env,
            mounts: existing,
            ..l.clone()
        });
    }
    let _ = std::fs::remove_dir_all(&base);
    let all = spec.secret_mounts.iter().map(|m| (true, m)).chain(
        spec.config_mounts
            .iter()
            .chain(&spec.configmap_mounts)
            .map(|m| (false, m)),
    );
    for (secret, m) in all {
        mounts.push(write_mount(&mut r, secret, m, ns, &base)?);
    }
    Ok(Launch {
        env,
        mounts,
        ..l.clone()
    })
}

fn write_mount(
    r: &mut Reader<'_>,
    secret: bool,
    m: &Mount,
    ns: &str,
    base: &Path,
) -> Result<MountDir, RunError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let (ons, name) = split_ref(m.source(secret), ns);
    let data = r.get(secret, &ons, &name)?.clone();
    let what = if secret { "secret" } else { "configmap" };
    let files: Vec<(String, Vec<u8>)> = if m.items.is_empty() {
        data.into_iter().collect()
    } else {
        m.items
            .iter()
            .map(|it| {
                data.get(&it.key)
                    .map(|v| (it.path.clone(), v.clone()))
                    .ok_or_else(|| RunError::Launch(format!("{what} {ons}/{name} has no key {}", it.key)))
            })
            .collect::<Result<_, _>>()?
    };
    if rune_statemachine::validate::dns1123_label(&m.name).is_err() {
        return Err(RunError::Launch(format!(
            "mount name '{}' is not a DNS label",
            m.name
        )));
    }
    let dir = base.join(&m.name);
    let io = |e: std::io::Error| RunError::Runtime(format!("cannot write the {what} mount {}: {e}", m.name));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&dir)
        .map_err(io)?;
    let mode = if secret { 0o400 } else { 0o444 };
    for (file, bytes) in files {
        if file.contains('/') || file == ".." || file == "." || file.is_empty() {
            return Err(RunError::Launch(format!(
                "mount {}: '{file}' is not a file name",
                m.name
            )));
        }
        let p = dir.join(&file);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&p)
            .map_err(io)?;
        std::io::Write::write_all(&mut f, &bytes).map_err(io)?;
    }
    Ok(MountDir {
        host: dir,
        target: PathBuf::from(&m.mount_path),
        writable: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        assert_eq!(split_ref("db", "default"), ("default".into(), "db".into()));
        assert_eq!(split_ref("db.prod", "default"), ("prod".into(), "db".into()));
        assert_eq!(split_ref("db.prod.rune", "default"), ("prod".into(), "db".into()));
        assert!(env_name_ok("DB_PASSWORD") && env_name_ok("_x1"));
        assert!(!env_name_ok("1X") && !env_name_ok("a-b") && !env_name_ok(""));
    }
}
