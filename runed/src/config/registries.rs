//! `docker.registries`: pull credentials for private registries, checked at start so that a
//! runefile runed cannot honour fails with its line instead of at the first pull.

use std::collections::BTreeMap;

use rune_orchestrator::registry::{Registry, RegistryAuth};
use serde::Deserialize;

use super::{ConfigError, Source};

/// One entry as written (the original's keys; `fromSecret` in either spelling).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(super) struct RegistryEntry {
    name: Option<String>,
    registry: Option<String>,
    auth: Option<AuthSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct AuthSection {
    #[serde(rename = "type")]
    kind: Option<String>,
    username: Option<String>,
    password: Option<String>,
    token: Option<String>,
    // Only ecr's, which is refused: decoded so that the key is known.
    #[allow(dead_code)]
    region: Option<String>,
    #[serde(alias = "fromSecret")]
    from_secret: Option<FromSecret>,
    // Managed by the original's `rune admin registries`, which runed does not offer.
    bootstrap: Option<bool>,
    manage: Option<String>,
    immutable: Option<bool>,
    data: Option<BTreeMap<String, String>>,
    // Docker, not runed, decides which registries may be plain HTTP.
    insecure: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum FromSecret {
    /// `name`, `ns/name`.
    Ref(String),
    /// `{name, namespace}`.
    Object { name: String, namespace: Option<String> },
}

/// `${VAR}` from the environment, as the original expands them; a missing variable is an error
/// (an empty password would only fail later, at a pull, with a vaguer message).
fn expand(v: &str, at: &str) -> Result<String, ConfigError> {
    let mut out = String::new();
    let mut rest = v;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let Some(end) = rest[i..].find('}') else {
            return Err(ConfigError(format!("{at}: '${{' without a closing '}}'")));
        };
        let var = &rest[i + 2..i + end];
        let val = std::env::var(var)
            .map_err(|_| ConfigError(format!("{at}: environment variable {var} is not set")))?;
        out.push_str(&val);
        rest = &rest[i + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn valid_pattern(r: &str) -> bool {
    let host = r.strip_prefix("*.").unwrap_or(r);
    !host.is_empty()
        && !host.contains('/')
        && !host.contains("://")
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
}

/// Checks the entries under `key` and turns them into what the orchestrator pulls with.
pub(super) fn check(
    entries: &[RegistryEntry],
    key: &str,
    src: &Source,
    ignored: &mut Vec<String>,
) -> Result<Vec<Registry>, ConfigError> {
    let mut out: Vec<Registry> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let at = |field: &str| format!("{key}[{i}]{}{field}", if field.is_empty() { "" } else { "." });
        let err = |field: &str, msg: &str| src.err(&at(field), msg);
        let name = e
            .name
            .clone()
            .filter(|n| !n.trim().is_empty())
            .ok_or_else(|| err("name", "is required"))?;
        if out.iter().any(|r| r.name == name) {
            return Err(err("name", &format!("'{name}' is used by an earlier entry")));
        }
        let registry = e
            .registry
            .clone()
            .map(|r| r.trim().to_ascii_lowercase())
            .filter(|r| !r.is_empty())
            .ok_or_else(|| {
                err(
                    "registry",
                    "is required (a host such as registry.example.com:5000, or *.example.com)",
                )
            })?;
        if !valid_pattern(&registry) {
            return Err(err(
                "registry",
                &format!("'{registry}' is not a host[:port] or *.domain (no scheme, no path)"),
            ));
        }
        let Some(a) = &e.auth else {
            out.push(Registry {
                name,
                registry,
                auth: RegistryAuth::None,
            });
            continue;
        };
        for (present, field) in [
            (a.bootstrap.is_some(), "bootstrap"),
            (a.manage.is_some(), "manage"),
            (a.immutable.is_some(), "immutable"),
            (a.data.is_some(), "data"),
        ] {
            if present {
                ignored.push(format!(
                    "{}: ignored: managed by `rune admin registries` in the original, which runed does not offer",
                    src.at(&at(&format!("auth.{field}")))
                ));
            }
        }
        if a.insecure.is_some() {
            ignored.push(format!(
                "{}: ignored: the Docker Engine decides which registries may use plain HTTP (insecure-registries in daemon.json; 127.0.0.0/8 always may)",
                src.at(&at("auth.insecure"))
            ));
        }
        let blank = |v: &Option<String>| v.as_deref().is_none_or(str::is_empty);
        if a.kind.as_deref() == Some("basic") && blank(&a.username) && blank(&a.password) {
            // The original's "local registry" example: basic with nothing in it pulls anonymously.
            ignored.push(format!(
                "{}: username and password are empty: pulls from {registry} go without credentials",
                src.at(&at("auth"))
            ));
            out.push(Registry {
                name,
                registry,
                auth: RegistryAuth::None,
            });
            continue;
        }
        let kind = a.kind.clone().unwrap_or_default();
        let need = |v: &Option<String>, field: &str| -> Result<String, ConfigError> {
            let v = v
                .clone()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| err(&format!("auth.{field}"), &format!("is required for type {kind}")))?;
            expand(&v, &src.at(&at(&format!("auth.{field}"))))
        };
        let auth = match kind.as_str() {
            "basic" => RegistryAuth::Basic {
                username: need(&a.username, "username")?,
                password: need(&a.password, "password")?,
            },
            "token" => RegistryAuth::Token {
                token: need(&a.token, "token")?,
            },
            "dockerconfigjson" => {
                let (namespace, secret) = match &a.from_secret {
                    Some(FromSecret::Ref(r)) => match r.split_once('/') {
                        Some((ns, n)) => (ns.to_string(), n.to_string()),
                        None => ("system".to_string(), r.clone()),
                    },
                    Some(FromSecret::Object { name, namespace }) => {
                        (namespace.clone().unwrap_or_else(|| "system".into()), name.clone())
                    }
                    None => {
                        return Err(err(
                            "auth.from-secret",
                            "is required for type dockerconfigjson (a secret with a .dockerconfigjson key; namespace system unless given)",
                        ))
                    }
                };
                for v in [&namespace, &secret] {
                    rune_statemachine::validate::dns1123_label(v)
                        .map_err(|m| err("auth.from-secret", &format!("'{v}': {m}")))?;
                }
                RegistryAuth::DockerConfigJson {
                    namespace,
                    name: secret,
                }
            }
            "ecr" => {
                return Err(err(
                    "auth.type",
                    "not supported: ecr needs the AWS API to mint pull tokens, which this runed does not call; use type basic with user AWS and the output of `aws ecr get-login-password` as the password, or a dockerconfigjson secret",
                ));
            }
            "" => return Err(err("auth.type", "is required: basic, token or dockerconfigjson")),
            other => {
                return Err(err(
                    "auth.type",
                    &format!("'{other}' is not one of basic, token, dockerconfigjson"),
                ))
            }
        };
        out.push(Registry { name, registry, auth });
    }
    Ok(out)
}
