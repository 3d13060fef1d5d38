//! `runed` settings: defaults, then the runefile, then flags (and their environment variables).
//!
//! The runefile is read in both spellings users have: the documented kebab-case
//! (`server.grpc-addr`) and the original implementation's snake_case (`server.grpc_address`,
//! top-level `data_dir`). An unknown key is an error that names the key and its line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use rune_statemachine::decode::decode;
use serde::Deserialize;

use crate::yaml::{self, Node, NodeKind};

/// Command-line flags of `runed`; each overrides the runefile.
#[derive(Debug, Clone, Default, clap::Parser)]
#[command(name = "runed", version, about = "The Rune orchestrator daemon")]
pub struct Flags {
    /// Runefile to read (YAML).
    #[arg(long, env = "RUNE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory for the log, the state and snapshots.
    #[arg(long, env = "RUNE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// gRPC API address.
    #[arg(long, env = "RUNE_GRPC_ADDR")]
    pub grpc_addr: Option<String>,
    /// HTTP address (/healthz).
    #[arg(long, env = "RUNE_HTTP_ADDR")]
    pub http_addr: Option<String>,
    /// Prometheus /metrics address; empty disables it.
    #[arg(long, env = "RUNE_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// trace, debug, info, warn or error.
    #[arg(long, env = "RUNE_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// text or json.
    #[arg(long, env = "RUNE_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Same as --log-level debug.
    #[arg(long)]
    pub debug: bool,
    /// Same as --log-format text.
    #[arg(long)]
    pub pretty: bool,
    /// Development mode: data under ./.rune-dev unless --data-dir, edge role implied.
    #[arg(long, env = "RUNE_DEV_MODE")]
    pub dev_mode: bool,
    /// Comma-separated node roles (edge).
    #[arg(long, env = "RUNE_NODE_ROLE")]
    pub node_role: Option<String>,
    /// This node's name, recorded on instances (default: the host name).
    #[arg(long, env = "RUNE_NODE_NAME")]
    pub node_name: Option<String>,
    /// The Docker Engine's unix socket (default /var/run/docker.sock, or DOCKER_HOST=unix://...).
    #[arg(long, env = "RUNE_DOCKER_SOCKET")]
    pub docker_socket: Option<String>,
    /// The KEK file (base64 of 32 bytes); sets crypto.kek.source to file.
    #[arg(long, env = "RUNE_KEK_FILE")]
    pub kek_file: Option<PathBuf>,
    /// Directory for runtime files that must not persist, such as secret mounts (a tmpfs).
    #[arg(long, env = "RUNE_RUN_DIR")]
    pub run_dir: Option<PathBuf>,
    /// Serve gRPC and HTTP over TLS (in --dev-mode without files: a generated self-signed pair).
    #[arg(long, env = "RUNE_TLS")]
    pub tls: bool,
    /// TLS certificate (chain), PEM; turns TLS on.
    #[arg(long, env = "RUNE_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// TLS private key, PEM.
    #[arg(long, env = "RUNE_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// The network service VIPs come from (RFC 1918 or 100.64.0.0/10; default 10.96.0.0/16).
    #[arg(long, env = "RUNE_CLUSTER_CIDR")]
    pub cluster_cidr: Option<String>,
    /// Where the embedded DNS listens, UDP and TCP (default 127.0.0.123:53).
    #[arg(long, env = "RUNE_DNS_ADDR")]
    pub dns_addr: Option<String>,
    /// Upstream resolver for names outside .rune (repeatable; default: /etc/resolv.conf).
    #[arg(long = "dns-upstream")]
    pub dns_upstreams: Vec<String>,
    /// How long a projection may lag the log before it fails closed (e.g. 30s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub stale_budget: Option<std::time::Duration>,
    /// Kernel policy and VIP redirects in runed's own nftables table: `auto` (default, off in
    /// --dev-mode) or `off`.
    #[arg(long, env = "RUNE_NFTABLES")]
    pub nftables: Option<String>,
    /// The nftables table runed owns (family inet; default `rune`).
    #[arg(long, env = "RUNE_NFT_TABLE")]
    pub nft_table: Option<String>,
    /// Range of the proxy's local ports, one per service port (default 30000-32767).
    #[arg(long, env = "RUNE_PROXY_PORTS")]
    pub proxy_ports: Option<String>,
    /// The edge ingress's HTTP listener (default :80, in --dev-mode 127.0.0.1:8080).
    #[arg(long, env = "RUNE_INGRESS_HTTP_ADDR")]
    pub ingress_http_addr: Option<String>,
    /// The edge ingress's HTTPS listener (default :443, in --dev-mode 127.0.0.1:8443).
    #[arg(long, env = "RUNE_INGRESS_HTTPS_ADDR")]
    pub ingress_https_addr: Option<String>,
    /// The ACME directory (default Let's Encrypt production; `acme.staging: true` for staging).
    #[arg(long, env = "RUNE_ACME_DIRECTORY_URL")]
    pub acme_directory_url: Option<String>,
    /// Contact e-mail of the ACME account.
    #[arg(long, env = "RUNE_ACME_EMAIL")]
    pub acme_email: Option<String>,
    /// A CA (PEM) to trust for the ACME directory's own TLS (a private ACME server).
    #[arg(long, env = "RUNE_ACME_CA_FILE")]
    pub acme_ca_file: Option<PathBuf>,
    /// Renew certificates this long before expiry instead of the default rule (tests).
    #[arg(long, value_parser = humantime::parse_duration, hide = true)]
    pub acme_renew_before: Option<std::time::Duration>,
    /// Test hooks under /debug/failpoints on the HTTP address. Never in production.
    #[arg(long, env = "RUNE_FAILPOINTS", hide = true)]
    pub enable_failpoints: bool,
}

/// How the API is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSetting {
    /// Plaintext.
    Off,
    /// TLS with these files.
    Files(crate::tls::TlsFiles),
    /// TLS with a self-signed pair generated under the data dir (dev mode only).
    DevSelfSigned,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The resolved settings `runed` runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// gRPC listen address.
    pub grpc_addr: SocketAddr,
    /// HTTP listen address.
    pub http_addr: SocketAddr,
    /// Metrics listen address, if enabled.
    pub metrics_addr: Option<SocketAddr>,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Log filter.
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
    /// Development mode.
    pub dev_mode: bool,
    /// Node roles.
    pub node_roles: Vec<String>,
    /// Snapshot after this many entries.
    pub snapshot_every: u64,
    /// Entries kept behind a snapshot.
    pub keep_after_snapshot: u64,
    /// Previous specs kept per service.
    pub history_limit: u32,
    /// Bound on draining in-flight RPCs at shutdown.
    pub drain_seconds: u64,
    /// This node's name.
    pub node_name: String,
    /// The Docker Engine's unix socket path.
    pub docker_socket: String,
    /// Where the KEK comes from.
    pub kek_source: rune_secrets::KekSource,
    /// `storage.secret-limits`.
    pub secret_limits: rune_statemachine::secret::SecretLimits,
    /// `auth.allow-remote-admin`.
    pub allow_remote_admin: bool,
    /// Runtime directory (secret mounts), never under the data dir.
    pub run_dir: PathBuf,
    /// TLS for gRPC and HTTP.
    pub tls: TlsSetting,
    /// `networking.cluster-cidr`, validated.
    pub cluster_cidr: String,
    /// `networking.dns-addr`.
    pub dns_addr: SocketAddr,
    /// Whether `dns_addr` is the default (then a non-root runed may fall back to port 5353).
    pub dns_addr_default: bool,
    /// `networking.dns-upstreams`; empty means /etc/resolv.conf.
    pub dns_upstreams: Vec<SocketAddr>,
    /// `networking.stale-budget`.
    pub stale_budget: std::time::Duration,
    /// `networking.nftables`: program the kernel (production mode).
    pub nftables: bool,
    /// `networking.nft-table`.
    pub nft_table: String,
    /// `networking.proxy-ports`.
    pub proxy_ports: (u16, u16),
    /// The ingress listeners (HTTP, HTTPS), when this node has the edge role.
    pub ingress: Option<(SocketAddr, SocketAddr)>,
    /// `acme.*`.
    pub acme: rune_ingress::acme::AcmeConfig,
    /// Test hooks on.
    pub enable_failpoints: bool,
}

/// A configuration problem; `runed` exits with it before touching anything.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Runefile {
    server: Option<ServerSection>,
    data_dir: Option<String>,
    log: Option<LogSection>,
    storage: Option<StorageSection>,
    telemetry: Option<TelemetrySection>,
    node: Option<NodeSection>,
    namespace: Option<String>,
    auth: Option<AuthSection>,
    client: Option<ClientSection>,
    docker: Option<DockerSection>,
    resources: Option<serde_json::Value>,
    secret: Option<serde_json::Value>,
    crypto: Option<serde_json::Value>,
    plugins: Option<PluginsSection>,
    networking: Option<serde_json::Value>,
    ingress: Option<serde_json::Value>,
    acme: Option<serde_json::Value>,
    runner: Option<serde_json::Value>,
    registries: Option<serde_json::Value>,
}

// Keys that later capabilities (TLS, secret limits) read are accepted now, so runefiles written
// for them load today.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)]
struct ServerSection {
    #[serde(alias = "grpc-address")]
    grpc_addr: Option<String>,
    #[serde(alias = "http-address")]
    http_addr: Option<String>,
    #[serde(alias = "metrics-address")]
    metrics_addr: Option<String>,
    data_dir: Option<String>,
    log_level: Option<String>,
    log_format: Option<String>,
    tls: Option<TlsSection>,
    drain_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)]
struct TlsSection {
    enabled: Option<bool>,
    cert_file: Option<String>,
    key_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct LogSection {
    level: Option<String>,
    format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)]
struct StorageSection {
    snapshot_every: Option<u64>,
    keep_after_snapshot: Option<u64>,
    history_limit: Option<u32>,
    secret_limits: Option<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct TelemetrySection {
    #[serde(alias = "metrics-address")]
    metrics_addr: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct NodeSection {
    role: Option<String>,
    name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)]
struct AuthSection {
    api_keys: Option<serde_json::Value>,
    provider: Option<String>,
    token: Option<String>,
    allow_remote_admin: Option<bool>,
    enabled: Option<bool>,
    tls: Option<TlsSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)]
struct ClientSection {
    timeout: Option<serde_json::Value>,
    retries: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)]
struct DockerSection {
    api_version: Option<String>,
    fallback_api_version: Option<String>,
    negotiation_timeout_seconds: Option<u64>,
    secret_dir_mode: Option<serde_json::Value>,
    secret_file_mode: Option<serde_json::Value>,
    config_dir_mode: Option<serde_json::Value>,
    config_file_mode: Option<serde_json::Value>,
    socket: Option<String>,
    registries: Option<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)]
struct PluginsSection {
    dir: Option<String>,
    enabled: Option<Vec<String>>,
}

/// Rewrites `snake_case` keys as `kebab-case`, so one schema reads both spellings.
fn kebab_keys(node: &mut Node) {
    match &mut node.kind {
        NodeKind::Map(pairs) => {
            for (k, v) in pairs {
                if let NodeKind::Scalar { value, .. } = &mut k.kind {
                    *value = value.replace('_', "-");
                }
                kebab_keys(v);
            }
        }
        NodeKind::Seq(items) => items.iter_mut().for_each(kebab_keys),
        NodeKind::Scalar { .. } => {}
    }
}

fn load_runefile(path: &Path) -> Result<Runefile, ConfigError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read runefile {name}: {e}")))?;
    let docs = yaml::parse(&text)
        .map_err(|e| ConfigError(format!("{name}:{}: invalid YAML: {}", e.line, e.message)))?;
    let Some(mut doc) = docs.into_iter().find(|d| !d.is_null()) else {
        return Ok(Runefile::default());
    };
    kebab_keys(&mut doc);
    decode::<Runefile>(&doc.to_json()).map_err(|errs| {
        let msgs: Vec<String> = errs
            .iter()
            .map(|e| {
                let msg = e.message.replace("unknown field", "unknown key");
                format!("{name}:{}: {}: {msg}", doc.line_of(&e.path), e.path)
            })
            .collect();
        ConfigError(msgs.join("\n"))
    })
}

/// Checks a runefile without starting anything (for `rune lint`).
pub fn check_runefile(path: &Path) -> Result<(), ConfigError> {
    load_runefile(path).map(|_| ())
}

/// Parses `:7863`, `0.0.0.0:7863`, `localhost:7863` or `[::1]:7863`.
pub fn parse_addr(what: &str, v: &str) -> Result<SocketAddr, ConfigError> {
    let v = v.trim();
    let full = if v.starts_with(':') {
        format!("0.0.0.0{v}")
    } else {
        v.replace("localhost:", "127.0.0.1:")
    };
    full.parse().map_err(|_| {
        ConfigError(format!(
            "{what}: '{v}' is not an address such as :7863 or 127.0.0.1:7863"
        ))
    })
}

impl Settings {
    /// Resolves defaults, the runefile and the flags.
    pub fn resolve(flags: &Flags) -> Result<Self, ConfigError> {
        let file = match &flags.config {
            Some(p) => load_runefile(p)?,
            None => Runefile::default(),
        };
        let server = file.server.unwrap_or_default();
        let log = file.log.unwrap_or_default();
        let storage = file.storage.unwrap_or_default();
        let _ = (
            &file.namespace,
            &file.auth,
            &file.client,
            &file.resources,
            &file.secret,
        );
        let _ = (
            &file.crypto,
            &file.plugins,
            &file.networking,
            &file.ingress,
            &file.acme,
            &file.runner,
            &file.registries,
        );

        let grpc = flags
            .grpc_addr
            .clone()
            .or(server.grpc_addr)
            .unwrap_or_else(|| ":7863".into());
        let http = flags
            .http_addr
            .clone()
            .or(server.http_addr)
            .unwrap_or_else(|| ":7861".into());
        let metrics = flags
            .metrics_addr
            .clone()
            .or(server.metrics_addr)
            .or(file.telemetry.and_then(|t| t.metrics_addr))
            .unwrap_or_else(|| "127.0.0.1:9100".into());
        let default_dir = if flags.dev_mode {
            PathBuf::from(".rune-dev")
        } else {
            PathBuf::from("/var/lib/rune")
        };
        let data_dir = flags
            .data_dir
            .clone()
            .or(server.data_dir.map(PathBuf::from))
            .or(file.data_dir.map(PathBuf::from))
            .unwrap_or(default_dir);
        let level = if flags.debug {
            "debug".to_string()
        } else {
            flags
                .log_level
                .clone()
                .or(server.log_level)
                .or(log.level)
                .unwrap_or_else(|| "info".into())
        };
        if !matches!(level.as_str(), "trace" | "debug" | "info" | "warn" | "error") {
            return Err(ConfigError(format!(
                "log level '{level}' is not one of trace, debug, info, warn, error"
            )));
        }
        let format = if flags.pretty {
            "text".to_string()
        } else {
            flags
                .log_format
                .clone()
                .or(server.log_format)
                .or(log.format)
                .unwrap_or_else(|| "text".into())
        };
        let log_format = match format.as_str() {
            "text" | "pretty" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return Err(ConfigError(format!("log format '{other}' is not text or json"))),
        };
        let node = file.node.unwrap_or_default();
        let node_name = flags
            .node_name
            .clone()
            .or(node.name)
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
            })
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "local".into());
        let docker_socket = flags
            .docker_socket
            .clone()
            .or(file.docker.and_then(|d| d.socket))
            .or_else(|| {
                std::env::var("DOCKER_HOST")
                    .ok()
                    .and_then(|h| h.strip_prefix("unix://").map(String::from))
            })
            .unwrap_or_else(|| "/var/run/docker.sock".into());
        let docker_socket = docker_socket
            .strip_prefix("unix://")
            .map(String::from)
            .unwrap_or(docker_socket);
        let cluster_cidr = flags
            .cluster_cidr
            .clone()
            .or_else(|| {
                file.networking
                    .as_ref()
                    .and_then(|n| n.get("cluster-cidr"))
                    .and_then(|v| v.as_str())
                    .map(String::from)
            })
            .unwrap_or_else(|| rune_statemachine::network::DEFAULT_CLUSTER_CIDR.into());
        rune_statemachine::network::Cidr::parse(&cluster_cidr)
            .map_err(|m| ConfigError(format!("networking.cluster-cidr (--cluster-cidr): {m}")))?;
        let net = |key: &str| file.networking.as_ref().and_then(|n| n.get(key)).cloned();
        let dns_addr = flags
            .dns_addr
            .clone()
            .or_else(|| net("dns-addr").and_then(|v| v.as_str().map(String::from)));
        let dns_addr_default = dns_addr.is_none();
        let dns_addr = dns_addr.unwrap_or_else(|| "127.0.0.123:53".into());
        let dns_addr: SocketAddr = dns_addr.parse().map_err(|_| {
            ConfigError(format!(
                "networking.dns-addr: '{dns_addr}' is not an address such as 127.0.0.123:53"
            ))
        })?;
        let upstream_text: Vec<String> = if flags.dns_upstreams.is_empty() {
            net("dns-upstreams")
                .and_then(|v| v.as_array().cloned())
                .unwrap_or_default()
                .iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        } else {
            flags.dns_upstreams.clone()
        };
        let dns_upstreams = upstream_text
            .iter()
            .map(|u| {
                u.parse::<SocketAddr>()
                    .or_else(|_| u.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                    .map_err(|_| ConfigError(format!("networking.dns-upstreams: '{u}' is not an address")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let stale_budget = match (flags.stale_budget, net("stale-budget")) {
            (Some(d), _) => d,
            (None, Some(serde_json::Value::String(t))) => humantime::parse_duration(&t)
                .map_err(|e| ConfigError(format!("networking.stale-budget: '{t}': {e}")))?,
            (None, Some(other)) => {
                return Err(ConfigError(format!(
                    "networking.stale-budget: expected a duration such as 30s, got {other}"
                )))
            }
            (None, None) => std::time::Duration::from_secs(30),
        };
        let text = |flag: &Option<String>, key: &str| -> Result<Option<String>, ConfigError> {
            match (flag, net(key)) {
                (Some(v), _) => Ok(Some(v.clone())),
                (None, Some(serde_json::Value::String(t))) => Ok(Some(t)),
                (None, Some(serde_json::Value::Bool(b))) => Ok(Some(if b { "auto" } else { "off" }.into())),
                (None, Some(other)) => Err(ConfigError(format!(
                    "networking.{key}: expected a string, got {other}"
                ))),
                (None, None) => Ok(None),
            }
        };
        let nftables = match text(&flags.nftables, "nftables")?.as_deref() {
            None | Some("auto") | Some("on") => !flags.dev_mode,
            Some("off") => false,
            Some(other) => {
                return Err(ConfigError(format!(
                    "networking.nftables (--nftables): expected auto or off, got '{other}'"
                )))
            }
        };
        let nft_table = text(&flags.nft_table, "nft-table")?.unwrap_or_else(|| "rune".into());
        // runed replaces its table whole (delete, then define): a name that could be another
        // program's table (`filter`, `nat`) would wipe it, so only `rune` and `rune_*` are taken.
        if nft_table.len() > 32
            || !(nft_table == "rune" || nft_table.starts_with("rune_"))
            || !nft_table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(ConfigError(format!(
                "networking.nft-table (--nft-table): '{nft_table}' must be `rune` or `rune_` then letters, digits or '_' (at most 32), so it can never be another program's table"
            )));
        }
        let range_text = text(&flags.proxy_ports, "proxy-ports")?.unwrap_or_else(|| "30000-32767".into());
        let proxy_ports = range_text
            .split_once('-')
            .and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)))
            .filter(|(a, b)| *a > 0 && a <= b)
            .ok_or_else(|| {
                ConfigError(format!(
                    "networking.proxy-ports (--proxy-ports): '{range_text}' is not a port range such as 30000-32767"
                ))
            })?;
        for (section, value, known) in [
            ("ingress", &file.ingress, &["http-addr", "https-addr"][..]),
            (
                "acme",
                &file.acme,
                &["directory-url", "email", "staging", "ca-file", "renew-before"][..],
            ),
        ] {
            match value {
                None => {}
                Some(serde_json::Value::Object(m)) => {
                    if let Some(k) = m.keys().find(|k| !known.contains(&k.as_str())) {
                        return Err(ConfigError(format!(
                            "{section}.{k}: unknown key (known: {})",
                            known.join(", ")
                        )));
                    }
                }
                Some(other) => {
                    return Err(ConfigError(format!("{section}: expected a mapping, got {other}")))
                }
            }
        }
        let ingress_key = |key: &str| -> Result<Option<String>, ConfigError> {
            match file.ingress.as_ref().and_then(|i| i.get(key)) {
                None => Ok(None),
                Some(serde_json::Value::String(t)) => Ok(Some(t.clone())),
                Some(other) => Err(ConfigError(format!(
                    "ingress.{key}: expected an address such as :80, got {other}"
                ))),
            }
        };
        let ingress_addr =
            |flag: &Option<String>, key: &str, prod: &str, dev: &str| -> Result<SocketAddr, ConfigError> {
                let text = match flag {
                    Some(v) => v.clone(),
                    None => {
                        ingress_key(key)?.unwrap_or_else(|| if flags.dev_mode { dev } else { prod }.into())
                    }
                };
                parse_addr(&format!("ingress.{key}"), &text)
            };
        let ingress_http = ingress_addr(&flags.ingress_http_addr, "http-addr", ":80", "127.0.0.1:8080")?;
        let ingress_https = ingress_addr(&flags.ingress_https_addr, "https-addr", ":443", "127.0.0.1:8443")?;
        let acme_key = |key: &str| file.acme.as_ref().and_then(|a| a.get(key)).cloned();
        let acme_text = |key: &str| -> Result<Option<String>, ConfigError> {
            match acme_key(key) {
                None => Ok(None),
                Some(serde_json::Value::String(t)) => Ok(Some(t)),
                Some(other) => Err(ConfigError(format!("acme.{key}: expected a string, got {other}"))),
            }
        };
        let staging = match acme_key("staging") {
            None => false,
            Some(serde_json::Value::Bool(b)) => b,
            Some(other) => {
                return Err(ConfigError(format!(
                    "acme.staging: expected true or false, got {other}"
                )))
            }
        };
        let directory = match (flags.acme_directory_url.clone(), acme_text("directory-url")?) {
            (Some(u), _) | (None, Some(u)) => u,
            (None, None) if staging => "https://acme-staging-v02.api.letsencrypt.org/directory".into(),
            (None, None) => "https://acme-v02.api.letsencrypt.org/directory".into(),
        };
        if !directory.starts_with("https://") {
            return Err(ConfigError(format!(
                "acme.directory-url: '{directory}' must be an https:// URL"
            )));
        }
        let acme = rune_ingress::acme::AcmeConfig {
            directory,
            email: flags.acme_email.clone().or(acme_text("email")?),
            ca_file: flags
                .acme_ca_file
                .clone()
                .or(acme_text("ca-file")?.map(PathBuf::from)),
            renew_before: match (flags.acme_renew_before, acme_text("renew-before")?) {
                (Some(d), _) => Some(d),
                (None, Some(t)) => Some(
                    humantime::parse_duration(&t)
                        .map_err(|e| ConfigError(format!("acme.renew-before: '{t}': {e}")))?,
                ),
                (None, None) => None,
            },
        };
        let tls = tls_setting(
            flags,
            file.auth
                .as_ref()
                .and_then(|a| a.tls.as_ref())
                .or(server.tls.as_ref()),
        )?;
        let kek_source = kek_source(flags, file.crypto.as_ref(), file.secret.as_ref(), &data_dir)?;
        let secret_limits = secret_limits(storage.secret_limits.as_ref())?;
        let allow_remote_admin = file
            .auth
            .as_ref()
            .and_then(|a| a.allow_remote_admin)
            .unwrap_or(false);
        let run_dir = flags.run_dir.clone().unwrap_or_else(|| {
            // The owner of /proc/self is this process's uid.
            let uid = std::fs::metadata("/proc/self")
                .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
                .unwrap_or(0);
            if uid == 0 {
                PathBuf::from("/run/rune")
            } else {
                std::env::temp_dir().join(format!("rune-{uid}"))
            }
        });
        let roles = match &flags.node_role {
            Some(r) => r.clone(),
            None => node.role.unwrap_or_else(|| {
                if flags.dev_mode {
                    "edge".into()
                } else {
                    String::new()
                }
            }),
        };
        Ok(Settings {
            grpc_addr: parse_addr("grpc address", &grpc)?,
            http_addr: parse_addr("http address", &http)?,
            metrics_addr: if metrics.trim().is_empty() {
                None
            } else {
                Some(parse_addr("metrics address", &metrics)?)
            },
            data_dir,
            log_level: level,
            log_format,
            dev_mode: flags.dev_mode,
            node_roles: roles
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            snapshot_every: storage.snapshot_every.unwrap_or(10_000).max(1),
            keep_after_snapshot: storage.keep_after_snapshot.unwrap_or(1_000),
            history_limit: storage
                .history_limit
                .unwrap_or(rune_statemachine::DEFAULT_HISTORY_LIMIT),
            drain_seconds: server.drain_seconds.unwrap_or(10),
            node_name,
            docker_socket,
            kek_source,
            secret_limits,
            allow_remote_admin,
            run_dir,
            tls,
            cluster_cidr,
            dns_addr,
            dns_addr_default,
            dns_upstreams,
            stale_budget,
            nftables,
            nft_table,
            proxy_ports,
            ingress: roles
                .split(',')
                .any(|r| r.trim() == "edge")
                .then_some((ingress_http, ingress_https)),
            acme,
            enable_failpoints: flags.enable_failpoints,
        })
    }
}

/// `crypto.kek` (or the original's `secret.encryption.kek`), and `--kek-file`.
fn kek_source(
    flags: &Flags,
    crypto: Option<&serde_json::Value>,
    secret: Option<&serde_json::Value>,
    data_dir: &Path,
) -> Result<rune_secrets::KekSource, ConfigError> {
    use rune_secrets::KekSource;
    let (kek, at) = match (
        crypto.and_then(|c| c.get("kek")),
        secret
            .and_then(|s| s.get("encryption"))
            .and_then(|e| e.get("kek")),
    ) {
        (Some(k), _) => (Some(k), "crypto.kek"),
        (None, Some(k)) => (Some(k), "secret.encryption.kek"),
        (None, None) => (None, "crypto.kek"),
    };
    let text = |key: &str| -> Result<Option<String>, ConfigError> {
        match kek.and_then(|k| k.get(key)) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(ConfigError(format!("{at}.{key}: expected a string, got {other}"))),
        }
    };
    let generate = match kek.and_then(|k| k.get("generate-if-missing")) {
        None | Some(serde_json::Value::Null) => true,
        Some(serde_json::Value::Bool(b)) => *b,
        Some(other) => {
            return Err(ConfigError(format!(
                "{at}.generate-if-missing: expected true or false, got {other}"
            )))
        }
    };
    let file = text("file-path")?.or(text("file")?).map(PathBuf::from);
    if let Some(path) = &flags.kek_file {
        return Ok(KekSource::File {
            path: path.clone(),
            generate_if_missing: generate,
        });
    }
    match text("source")?.as_deref().unwrap_or("file") {
        "file" => Ok(KekSource::File {
            path: file.unwrap_or_else(|| crate::secrets_api::default_kek_path(data_dir)),
            generate_if_missing: generate,
        }),
        "env" => Ok(KekSource::Env {
            var: text("env-var")?
                .or(text("env")?)
                .unwrap_or_else(|| "RUNE_MASTER_KEY".into()),
        }),
        "generated" => Ok(KekSource::Generated),
        other => Err(ConfigError(format!(
            "{at}.source: '{other}' is not one of file, env, generated"
        ))),
    }
}

/// `auth.tls` (or the original's `server.tls`) and the `--tls*` flags.
fn tls_setting(flags: &Flags, section: Option<&TlsSection>) -> Result<TlsSetting, ConfigError> {
    let cert = flags
        .tls_cert_file
        .clone()
        .or(section.and_then(|t| t.cert_file.clone()).map(PathBuf::from));
    let key = flags
        .tls_key_file
        .clone()
        .or(section.and_then(|t| t.key_file.clone()).map(PathBuf::from));
    let enabled =
        flags.tls || flags.tls_cert_file.is_some() || section.and_then(|t| t.enabled).unwrap_or(false);
    if !enabled {
        return Ok(TlsSetting::Off);
    }
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(TlsSetting::Files(crate::tls::TlsFiles { cert, key })),
        (None, None) if flags.dev_mode => Ok(TlsSetting::DevSelfSigned),
        (None, None) => Err(ConfigError(
            "TLS is enabled but auth.tls.cert-file and auth.tls.key-file are not set (only --dev-mode generates a self-signed pair)".into(),
        )),
        (Some(_), None) => Err(ConfigError("TLS: auth.tls.key-file (--tls-key-file) is missing".into())),
        (None, Some(_)) => Err(ConfigError("TLS: auth.tls.cert-file (--tls-cert-file) is missing".into())),
    }
}

/// `storage.secret-limits`.
fn secret_limits(
    v: Option<&serde_json::Value>,
) -> Result<rune_statemachine::secret::SecretLimits, ConfigError> {
    let mut l = rune_statemachine::secret::SecretLimits::default();
    let Some(v) = v else { return Ok(l) };
    let Some(m) = v.as_object() else {
        return Err(ConfigError("storage.secret-limits: expected a mapping".into()));
    };
    for (k, val) in m {
        let n = val.as_u64().filter(|n| *n > 0).ok_or_else(|| {
            ConfigError(format!(
                "storage.secret-limits.{k}: expected a positive whole number, got {val}"
            ))
        })?;
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        match k.as_str() {
            "max-keys-per-secret" => l.max_keys = n,
            "max-value-size" => l.max_value_size = n,
            other => {
                return Err(ConfigError(format!(
                    "storage.secret-limits.{other}: unknown key (max-keys-per-secret, max-value-size)"
                )))
            }
        }
    }
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn both_spellings_and_flag_precedence() {
        let f = write("server:\n  grpc_address: \":9999\"\ndata_dir: /tmp/x\nlog:\n  level: warn\n");
        let mut flags = Flags {
            config: Some(f.path().into()),
            ..Default::default()
        };
        let s = Settings::resolve(&flags).unwrap();
        assert_eq!(s.grpc_addr.port(), 9999);
        assert_eq!(s.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(s.log_level, "warn");
        flags.grpc_addr = Some("127.0.0.1:1".into());
        assert_eq!(Settings::resolve(&flags).unwrap().grpc_addr.port(), 1);
        let f = write("server:\n  grpc-addr: \":8888\"\n  data-dir: /d\n");
        let s = Settings::resolve(&Flags {
            config: Some(f.path().into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!((s.grpc_addr.port(), s.data_dir), (8888, PathBuf::from("/d")));
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let f = write("server:\n  grpc-addr: \":1\"\n  grcp-addr: \":2\"\n");
        let e = Settings::resolve(&Flags {
            config: Some(f.path().into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.0.contains(":3:") && e.0.contains("grcp-addr"), "{e}");
    }

    #[test]
    fn ingress_and_acme_settings() {
        let f = write("acme:\n  emial: x@example.com\n");
        let e = Settings::resolve(&Flags {
            config: Some(f.path().into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.0.contains("acme.emial: unknown key"), "{e}");
        let f = write("acme:\n  directory-url: http://insecure.example/dir\n");
        let e = Settings::resolve(&Flags {
            config: Some(f.path().into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.0.contains("must be an https:// URL"), "{e}");
        let f = write("acme:\n  staging: true\n");
        let s = Settings::resolve(&Flags {
            config: Some(f.path().into()),
            dev_mode: true,
            ..Default::default()
        })
        .unwrap();
        assert!(s.acme.directory.contains("staging"));
        assert_eq!(
            s.ingress.map(|(h, t)| (h.to_string(), t.to_string())),
            Some(("127.0.0.1:8080".into(), "127.0.0.1:8443".into())),
            "dev mode is an edge node on loopback"
        );
        let none = Settings::resolve(&Flags {
            dev_mode: true,
            node_role: Some(String::new()),
            ..Default::default()
        })
        .unwrap();
        assert!(none.ingress.is_none(), "--node-role='' turns the edge role off");
    }

    #[test]
    fn data_plane_settings() {
        let f = write("networking:\n  nftables: maybe\n");
        let e = Settings::resolve(&Flags {
            config: Some(f.path().into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            e.0.contains("networking.nftables") && e.0.contains("'maybe'"),
            "{e}"
        );
        let f = write("networking:\n  proxy-ports: 40000-30000\n");
        let e = Settings::resolve(&Flags {
            config: Some(f.path().into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.0.contains("networking.proxy-ports"), "{e}");
        for bad in ["filter; flush ruleset", "filter", "nat"] {
            let e = Settings::resolve(&Flags {
                nft_table: Some(bad.into()),
                ..Default::default()
            })
            .unwrap_err();
            assert!(e.0.contains("networking.nft-table"), "{e}");
        }
        assert!(Settings::resolve(&Flags {
            nft_table: Some("rune_test".into()),
            ..Default::default()
        })
        .is_ok());
        let dev = Settings::resolve(&Flags {
            dev_mode: true,
            ..Default::default()
        })
        .unwrap();
        assert!(!dev.nftables, "dev mode leaves nftables alone");
        let prod = Settings::resolve(&Flags::default()).unwrap();
        assert!(prod.nftables);
        assert_eq!(
            (prod.nft_table.as_str(), prod.proxy_ports),
            ("rune", (30000, 32767))
        );
    }

    #[test]
    fn example_runefile_loads_with_its_values() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/runefile.yaml");
        let s = Settings::resolve(&Flags {
            config: Some(p),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (s.grpc_addr.port(), s.history_limit, s.drain_seconds),
            (7863, 10, 10)
        );
        assert_eq!(s.data_dir, PathBuf::from("/var/lib/rune"));
    }

    #[test]
    fn peer_runefiles_load() {
        for f in ["config--runefile.yaml", "runefile.yaml"] {
            let p = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../shared/peer-specs")
                .join(f);
            assert!(
                p.exists(),
                "{} is missing: shared/ must sit beside the checkout",
                p.display()
            );
            let s = Settings::resolve(&Flags {
                config: Some(p),
                ..Default::default()
            });
            assert!(s.is_ok(), "{f}: {:?}", s.err());
        }
    }
}
