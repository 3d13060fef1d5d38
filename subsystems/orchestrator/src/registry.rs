//! Pull credentials for private registries (`docker.registries` in the runefile).
//!
//! An image's registry is the host part of its reference (`127.0.0.1:5000/team/app:v1` →
//! `127.0.0.1:5000`; no host means Docker Hub). The entry a service names with `imageRegistry`
//! is used for its images; otherwise the first entry whose `registry` is that host, then the
//! first whose `*.domain` pattern covers it. Credentials from a `dockerconfigjson` secret are
//! read at each start, so a rotated secret reaches the next pull; they are never logged.

use std::collections::BTreeMap;

use base64::Engine;
use rune_statemachine::STATE_TABLE;

use crate::inject::SecretSource;
use crate::runner::RunError;

/// Where Docker Hub images come from when their reference names no host.
pub const DOCKER_HUB: &str = "docker.io";

/// One `docker.registries` entry, checked at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    /// The entry's name (what `imageRegistry` names).
    pub name: String,
    /// A host (`registry.example.com`, `127.0.0.1:5000`) or a `*.example.com` pattern.
    pub registry: String,
    /// How to authenticate.
    pub auth: RegistryAuth,
}

/// The kinds of credentials runed can hand the engine.
#[derive(Clone, PartialEq, Eq)]
pub enum RegistryAuth {
    /// No credentials (an entry that only names a registry).
    None,
    /// User name and password (or an access token used as one).
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: String,
    },
    /// A bearer token the engine passes to the registry as it is.
    Token {
        /// The token.
        token: String,
    },
    /// The `.dockerconfigjson` key of a secret, as `kubectl create secret docker-registry`
    /// writes it.
    DockerConfigJson {
        /// The secret's namespace (`system` unless the entry says otherwise).
        namespace: String,
        /// The secret's name.
        name: String,
    },
}

impl std::fmt::Debug for RegistryAuth {
    // Never print a password or token, even in a debug log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistryAuth::None => write!(f, "None"),
            RegistryAuth::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            RegistryAuth::Token { .. } => write!(f, "Token(<redacted>)"),
            RegistryAuth::DockerConfigJson { namespace, name } => {
                write!(f, "DockerConfigJson({namespace}/{name})")
            }
        }
    }
}

/// Credentials for one pull, as the engine takes them.
#[derive(Clone, PartialEq, Eq)]
pub struct PullAuth {
    /// The `docker.registries` entry they came from, for messages.
    pub entry: String,
    /// The registry host.
    pub server: String,
    /// User name (basic).
    pub username: Option<String>,
    /// Password (basic).
    pub password: Option<String>,
    /// Bearer token (token).
    pub registry_token: Option<String>,
}

impl std::fmt::Debug for PullAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PullAuth({} for {})", self.entry, self.server)
    }
}

/// The registry host of an image reference, as the Docker CLI tells it: the part before the
/// first `/` when it has a `.` or `:` or is `localhost`; Docker Hub otherwise.
pub fn image_host(image: &str) -> String {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first.to_ascii_lowercase()
        }
        _ => DOCKER_HUB.to_string(),
    }
}

/// Whether a `registry` value covers `host`: equal, or `*.d` for any subdomain of `d`.
pub fn covers(pattern: &str, host: &str) -> bool {
    let pattern = pattern.trim().to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(domain) => host
            .strip_suffix(domain)
            .is_some_and(|rest| rest.ends_with('.') && rest.len() > 1),
        None => pattern == host || (pattern == "index.docker.io" && host == DOCKER_HUB),
    }
}

/// The entry that serves `host`: the one named by `image_registry`, else an exact match, else
/// a wildcard. A named entry that does not exist is the instance's error.
pub fn entry_for<'a>(
    registries: &'a [Registry],
    host: &str,
    image_registry: Option<&str>,
) -> Result<Option<&'a Registry>, RunError> {
    if let Some(name) = image_registry.filter(|n| !n.is_empty()) {
        return match registries.iter().find(|r| r.name == name) {
            // An entry's credentials only ever go to the registry it names.
            Some(r) if covers(&r.registry, host) => Ok(Some(r)),
            Some(r) => Err(RunError::Launch(format!(
                "imageRegistry '{name}' is for {}, not {host} (the image's registry): its credentials go nowhere else",
                r.registry
            ))),
            None => Err(RunError::Launch(format!(
                "imageRegistry '{name}' is not in this runed's docker.registries ({})",
                if registries.is_empty() {
                    "it has none".to_string()
                } else {
                    registries
                        .iter()
                        .map(|r| r.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ))),
        };
    }
    let exact = registries
        .iter()
        .find(|r| !r.registry.starts_with("*.") && covers(&r.registry, host));
    Ok(exact.or_else(|| registries.iter().find(|r| covers(&r.registry, host))))
}

/// Credentials for every image of a start (the service's first, then its init steps'), by
/// registry host; a host whose credentials could not be read has the reason instead, raised
/// only if that image has to be pulled. `read` opens a secret for `dockerconfigjson` entries.
pub fn pull_auth(
    registries: &[Registry],
    images: &[&str],
    image_registry: Option<&str>,
    mut read: impl FnMut(&str, &str) -> Result<BTreeMap<String, Vec<u8>>, RunError>,
) -> Result<BTreeMap<String, Result<PullAuth, RunError>>, RunError> {
    let mut out = BTreeMap::new();
    for (i, image) in images.iter().enumerate() {
        let host = image_host(image);
        if out.contains_key(&host) {
            continue;
        }
        // `imageRegistry` is the service image's; a step's image from elsewhere (busybox from
        // Docker Hub) is matched by its own host.
        let named = image_registry.filter(|n| {
            i == 0
                || registries
                    .iter()
                    .any(|r| r.name == *n && covers(&r.registry, &host))
        });
        let Some(entry) = entry_for(registries, &host, named)? else {
            continue;
        };
        let mut auth = PullAuth {
            entry: entry.name.clone(),
            server: host.clone(),
            username: None,
            password: None,
            registry_token: None,
        };
        match &entry.auth {
            RegistryAuth::None => continue,
            RegistryAuth::Basic { username, password } => {
                auth.username = Some(username.clone());
                auth.password = Some(password.clone());
            }
            RegistryAuth::Token { token } => auth.registry_token = Some(token.clone()),
            RegistryAuth::DockerConfigJson { namespace, name } => {
                // Kept as the host's answer, not raised: it matters only if a pull is needed,
                // and a node that has the image must still start it.
                let creds = read(namespace, name).and_then(|data| {
                    from_docker_config(&data, &host).map_err(|m| {
                        RunError::Launch(format!(
                            "docker.registries entry '{}': secret {namespace}/{name}: {m}",
                            entry.name
                        ))
                    })
                });
                match creds {
                    Ok((u, p)) => {
                        auth.username = Some(u);
                        auth.password = Some(p);
                    }
                    Err(e) => {
                        out.insert(host, Err(e));
                        continue;
                    }
                }
            }
        }
        out.insert(host, Ok(auth));
    }
    Ok(out)
}

/// User and password for `host` from a secret's `.dockerconfigjson` (or `config.json`) key:
/// `{"auths": {"host": {"auth": base64("user:pass")}}}` or with `username`/`password`.
fn from_docker_config(data: &BTreeMap<String, Vec<u8>>, host: &str) -> Result<(String, String), String> {
    let raw = data
        .get(".dockerconfigjson")
        .or_else(|| data.get("config.json"))
        .ok_or("has no .dockerconfigjson key")?;
    let v: serde_json::Value = serde_json::from_slice(raw)
        .map_err(|e| format!(".dockerconfigjson is not JSON (line {})", e.line()))?;
    let auths = v
        .get("auths")
        .and_then(|a| a.as_object())
        .ok_or(".dockerconfigjson has no auths")?;
    // Keys are hosts, sometimes written as URLs (`https://index.docker.io/v1/`).
    let entry = auths
        .iter()
        .find(|(k, _)| {
            let k = k.trim_start_matches("https://").trim_start_matches("http://");
            let k = k.split('/').next().unwrap_or(k).to_ascii_lowercase();
            k == host || (host == DOCKER_HUB && k == "index.docker.io")
        })
        .map(|(_, e)| e)
        .ok_or_else(|| format!(".dockerconfigjson has no credentials for {host}"))?;
    let field = |k: &str| entry.get(k).and_then(|x| x.as_str()).filter(|s| !s.is_empty());
    if let (Some(u), Some(p)) = (field("username"), field("password")) {
        return Ok((u.to_string(), p.to_string()));
    }
    let auth = field("auth")
        .ok_or_else(|| format!("the {host} entry has neither auth nor username and password"))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth)
        .map_err(|_| format!("the {host} entry's auth is not base64"))?;
    let text = String::from_utf8(decoded).map_err(|_| format!("the {host} entry's auth is not text"))?;
    let (u, p) = text
        .split_once(':')
        .ok_or_else(|| format!("the {host} entry's auth is not user:password"))?;
    Ok((u.to_string(), p.to_string()))
}

/// Opens a secret of any namespace: the runefile that names it is the operator's, unlike a
/// service spec, which may only read its own namespace's.
pub fn read_secret(
    log: &rune_log::Log,
    secrets: Option<&dyn SecretSource>,
    ns: &str,
    name: &str,
) -> Result<BTreeMap<String, Vec<u8>>, RunError> {
    let txn = log.read().map_err(|e| RunError::Runtime(e.to_string()))?;
    let t = txn
        .open_table(STATE_TABLE)
        .map_err(|e| RunError::Runtime(e.to_string()))?;
    crate::inject::open_secret(&t, secrets, ns, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(name: &str, registry: &str, auth: RegistryAuth) -> Registry {
        Registry {
            name: name.into(),
            registry: registry.into(),
            auth,
        }
    }

    #[test]
    fn hosts_are_read_as_docker_reads_them() {
        for (image, host) in [
            ("busybox", "docker.io"),
            ("library/busybox:1", "docker.io"),
            ("team/app", "docker.io"),
            ("127.0.0.1:5000/team/app:v1", "127.0.0.1:5000"),
            ("localhost/app", "localhost"),
            ("GHCR.io/org/app@sha256:abc", "ghcr.io"),
            ("registry.example.com/app", "registry.example.com"),
        ] {
            assert_eq!(image_host(image), host, "{image}");
        }
    }

    #[test]
    fn exact_entries_win_over_wildcards_and_named_entries_over_both() {
        let basic = |u: &str| RegistryAuth::Basic {
            username: u.into(),
            password: "p".into(),
        };
        let regs = vec![
            reg("wild", "*.example.com", basic("w")),
            reg("exact", "registry.example.com", basic("e")),
            reg("hub", "index.docker.io", basic("h")),
        ];
        let name =
            |host: &str, named: Option<&str>| entry_for(&regs, host, named).unwrap().map(|r| r.name.clone());
        assert_eq!(name("registry.example.com", None).as_deref(), Some("exact"));
        assert_eq!(name("other.example.com", None).as_deref(), Some("wild"));
        assert_eq!(name("example.com", None), None, "*.d covers subdomains only");
        assert_eq!(name("badexample.com", None), None);
        assert_eq!(name("docker.io", None).as_deref(), Some("hub"));
        assert_eq!(name("quay.io", None), None);
        assert_eq!(
            name("registry.example.com", Some("wild")).as_deref(),
            Some("wild")
        );
        match entry_for(&regs, "attacker.example", Some("exact")) {
            Err(RunError::Launch(m)) => assert!(m.contains("its credentials go nowhere else"), "{m}"),
            other => panic!("{other:?}"),
        }
        match entry_for(&regs, "quay.io", Some("nope")) {
            Err(RunError::Launch(m)) => assert!(m.contains("imageRegistry 'nope' is not in"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn dockerconfigjson_gives_credentials_for_its_hosts_only() {
        let cfg = |json: &str| -> BTreeMap<String, Vec<u8>> {
            [(".dockerconfigjson".to_string(), json.as_bytes().to_vec())]
                .into_iter()
                .collect()
        };
        let b64 = base64::engine::general_purpose::STANDARD.encode("robot:s3cret");
        let regs = vec![reg(
            "corp",
            "*.corp.example",
            RegistryAuth::DockerConfigJson {
                namespace: "system".into(),
                name: "regcred".into(),
            },
        )];
        let json = format!(r#"{{"auths": {{"https://reg.corp.example/v1/": {{"auth": "{b64}"}}}}}}"#);
        let got = pull_auth(&regs, &["reg.corp.example/app:1", "busybox"], None, |ns, n| {
            assert_eq!((ns, n), ("system", "regcred"));
            Ok(cfg(&json))
        })
        .unwrap();
        assert_eq!(got.len(), 1, "Docker Hub has no entry: {got:?}");
        let a = got["reg.corp.example"].as_ref().unwrap();
        assert_eq!(
            (a.username.as_deref(), a.password.as_deref(), a.entry.as_str()),
            (Some("robot"), Some("s3cret"), "corp")
        );
        for (bad, want) in [
            ("{}", "has no auths"),
            (
                r#"{"auths": {"other.example": {"auth": "x"}}}"#,
                "no credentials for reg.corp.example",
            ),
            (
                r#"{"auths": {"reg.corp.example": {"auth": "!!"}}}"#,
                "auth is not base64",
            ),
            ("not json", "is not JSON"),
        ] {
            let got = pull_auth(&regs, &["reg.corp.example/app"], None, |_, _| Ok(cfg(bad))).unwrap();
            match &got["reg.corp.example"] {
                Err(RunError::Launch(m)) => {
                    assert!(
                        m.contains("entry 'corp': secret system/regcred") && m.contains(want),
                        "{m}"
                    )
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn secrets_never_reach_debug_output() {
        let a = RegistryAuth::Basic {
            username: "u".into(),
            password: "hunter2".into(),
        };
        let t = RegistryAuth::Token {
            token: "tok123".into(),
        };
        let s = format!("{a:?} {t:?}");
        assert!(!s.contains("hunter2") && !s.contains("tok123"), "{s}");
    }
}
