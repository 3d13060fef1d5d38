//! CLI contexts in `~/.rune/config.yaml` (or `$RUNE_CLI_CONFIG`): named servers with their
//! token and default namespace, as kubectl keeps clusters.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rune_statemachine::decode::decode;
use serde::{Deserialize, Serialize};

use super::CliError;
use crate::yaml;

/// The file.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CliConfig {
    /// The context used when none is named.
    #[serde(default, alias = "currentContext", skip_serializing_if = "Option::is_none")]
    pub current_context: Option<String>,
    /// Contexts by name.
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

/// One context.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Context {
    /// `host:port` of runed's gRPC API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// Bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// File holding the bearer token.
    #[serde(default, alias = "tokenFile", skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
    /// Default namespace.
    #[serde(default, alias = "defaultNamespace", skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// CA certificate (PEM) that signs runed's TLS certificate; set means the server speaks TLS.
    #[serde(default, alias = "tlsCa", skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<String>,
}

/// Where the file lives.
pub fn path() -> PathBuf {
    if let Some(p) = std::env::var_os("RUNE_CLI_CONFIG") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".rune").join("config.yaml")
}

/// Reads the file; a missing file is an empty config.
pub fn load() -> Result<CliConfig, CliError> {
    let p = path();
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(CliConfig::default()),
        Err(e) => return Err(CliError::generic(format!("cannot read {}: {e}", p.display()))),
    };
    let docs = yaml::parse(&text)
        .map_err(|e| CliError::validation(format!("{}:{}: {}", p.display(), e.line, e.message)))?;
    let Some(doc) = docs.into_iter().find(|d| !d.is_null()) else {
        return Ok(CliConfig::default());
    };
    decode(&doc.to_json()).map_err(|errs| {
        let m: Vec<String> = errs
            .iter()
            .map(|e| format!("{}:{}: {}", p.display(), doc.line_of(&e.path), e))
            .collect();
        CliError::validation(m.join("\n"))
    })
}

/// Writes the file, readable only by its owner (it may hold tokens).
pub fn save(cfg: &CliConfig) -> Result<(), CliError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let p = path();
    let fail = |e: std::io::Error| CliError::generic(format!("cannot write {}: {e}", p.display()));
    if let Some(dir) = p.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(fail)?;
    }
    let text = yaml::emit(&serde_json::to_value(cfg).map_err(|e| CliError::generic(e.to_string()))?);
    let tmp = p.with_extension("yaml.tmp");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(fail)?;
        f.write_all(text.as_bytes()).map_err(fail)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(fail)?;
    }
    std::fs::rename(&tmp, &p).map_err(fail)
}

impl CliConfig {
    /// The current context, if one is set and exists.
    pub fn current(&self) -> Option<&Context> {
        self.current_context.as_ref().and_then(|c| self.contexts.get(c))
    }
}
