//! `runed` settings: defaults, then the runefile, then flags (and their environment variables).
//!
//! The runefile is read in both spellings users have: the documented kebab-case
//! (`server.grpc-addr`) and the original implementation's snake_case (`server.grpc_address`,
//! top-level `data_dir`). An unknown key is an error that names the key and its line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use rune_statemachine::decode::{decode, FieldPath, Seg};
use serde::Deserialize;

use crate::yaml::{self, Node, NodeKind};

mod registries;

/// Command-line flags of `runed`; each overrides the runefile.
#[derive(Debug, Clone, Default, clap::Parser)]
#[command(
    name = "runed",
    version,
    about = "The Rune orchestrator daemon",
    args_override_self = true
)]
pub struct Flags {
    /// Runefile to read (YAML).
    #[arg(long, env = "RUNE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory for the log, the state and snapshots (default /var/lib/rune, in --dev-mode
    /// ./.rune-dev).
    #[arg(long, env = "RUNE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// gRPC API address (default :7863, in --dev-mode 127.0.0.1:7863).
    #[arg(long, env = "RUNE_GRPC_ADDR")]
    pub grpc_addr: Option<String>,
    /// HTTP address of /healthz (default :7861, in --dev-mode 127.0.0.1:7861).
    #[arg(long, env = "RUNE_HTTP_ADDR")]
    pub http_addr: Option<String>,
    /// Prometheus /metrics address (default 127.0.0.1:9100); empty disables it.
    #[arg(long, env = "RUNE_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// trace, debug, info (default), warn or error.
    #[arg(long, env = "RUNE_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// text (default) or json.
    #[arg(long, env = "RUNE_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Same as --log-level debug.
    #[arg(long)]
    pub debug: bool,
    /// Same as --log-format text.
    #[arg(long)]
    pub pretty: bool,
    /// Development mode (or `networking.dev-mode`): data under ./.rune-dev unless --data-dir,
    /// edge role implied, nftables left alone.
    #[arg(long, env = "RUNE_DEV_MODE")]
    pub dev_mode: bool,
    /// Comma-separated node roles: edge serves the ingress (default none, in --dev-mode edge).
    #[arg(long, env = "RUNE_NODE_ROLE")]
    pub node_role: Option<String>,
    /// This node's name, recorded on instances (default: the host name).
    #[arg(long, env = "RUNE_NODE_NAME")]
    pub node_name: Option<String>,
    /// The Docker Engine's unix socket (default /var/run/docker.sock, or DOCKER_HOST=unix://...).
    #[arg(long, env = "RUNE_DOCKER_SOCKET")]
    pub docker_socket: Option<String>,
    /// Where process services' volumes live (default: beside the data dir, DATA_DIR-volumes;
    /// never inside it, so a restore or a wiped data dir leaves the data alone).
    #[arg(long, env = "RUNE_VOLUMES_ROOT")]
    pub volumes_root: Option<PathBuf>,
    /// The KEK file (base64 of 32 bytes); sets crypto.kek.source to file.
    #[arg(long, env = "RUNE_KEK_FILE")]
    pub kek_file: Option<PathBuf>,
    /// Directory for runtime files that must not persist, such as secret mounts and the admin
    /// socket (default /run/rune for root, else $TMPDIR/rune-<uid>).
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
    /// How long a projection may lag the log before it fails closed (default 30s).
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
    /// How long a client may take to send a request's head; also an idle HTTP/1.1 keep-alive
    /// connection's limit and the HTTP/2 ping interval (default 30s).
    #[arg(long, env = "RUNE_INGRESS_HEADER_TIMEOUT", value_parser = humantime::parse_duration)]
    pub ingress_header_timeout: Option<std::time::Duration>,
    /// How long an HTTP/2 connection with no request open is kept (default 75s; no shorter
    /// than the header timeout).
    #[arg(long, env = "RUNE_INGRESS_IDLE_TIMEOUT", value_parser = humantime::parse_duration)]
    pub ingress_idle_timeout: Option<std::time::Duration>,
    /// How long an upgraded connection (a websocket) that carries nothing either way is kept
    /// (default 1h).
    #[arg(long, env = "RUNE_INGRESS_TUNNEL_TIMEOUT", value_parser = humantime::parse_duration)]
    pub ingress_tunnel_timeout: Option<std::time::Duration>,
    /// Client connections the ingress serves at once, websockets included; more wait in the
    /// listen backlog (default a quarter of the open-files limit, 64 to 65536).
    #[arg(long, env = "RUNE_INGRESS_MAX_CONNECTIONS")]
    pub ingress_max_connections: Option<u64>,
    /// The ACME directory (default Let's Encrypt production; `acme.staging: true` for staging).
    #[arg(long, env = "RUNE_ACME_DIRECTORY_URL")]
    pub acme_directory_url: Option<String>,
    /// Contact e-mail of the ACME account (default none).
    #[arg(long, env = "RUNE_ACME_EMAIL")]
    pub acme_email: Option<String>,
    /// A CA (PEM) to trust for the ACME directory's own TLS (a private ACME server).
    #[arg(long, env = "RUNE_ACME_CA_FILE")]
    pub acme_ca_file: Option<PathBuf>,
    /// Renew certificates this long before expiry instead of the default rule (tests).
    #[arg(long, value_parser = humantime::parse_duration, hide = true)]
    pub acme_renew_before: Option<std::time::Duration>,
    /// How long the certificate of a host no longer exposed is kept before it is deleted
    /// (default 24h; re-exposing the host within that time needs no new order).
    #[arg(long, env = "RUNE_ACME_KEEP_UNEXPOSED", value_parser = humantime::parse_duration)]
    pub acme_keep_unexposed: Option<std::time::Duration>,
    /// Unix socket serving every RPC to local root (admin recovery when gRPC is bound to a
    /// private interface); empty turns it off. Default: <run-dir>/admin.sock.
    #[arg(long, env = "RUNE_ADMIN_SOCKET")]
    pub admin_socket: Option<String>,
    /// Free space kept on the data dir's file system; writes are refused below it (default
    /// 128MiB; 0 turns it off).
    #[arg(long, env = "RUNE_STORAGE_RESERVE")]
    pub storage_reserve: Option<String>,
    /// Test hooks under /debug/failpoints on the HTTP address. Never in production.
    #[arg(long, env = "RUNE_FAILPOINTS", hide = true)]
    pub enable_failpoints: bool,
    /// This node's raft port (e.g. :7862), mutual TLS from the cluster's CA: turns clustering
    /// on. Default: none, a single node.
    #[arg(long, env = "RUNE_RAFT_LISTEN")]
    pub raft_listen: Option<String>,
    /// Where the other members reach this node's raft port (host:port; default the listen
    /// address, which must then name an interface).
    #[arg(long, env = "RUNE_RAFT_ADVERTISE")]
    pub raft_advertise: Option<String>,
    /// Join the cluster of the member whose raft port is at this address (host:port), on the
    /// first start of an empty data dir. Needs --join-token-file.
    #[arg(long, env = "RUNE_JOIN")]
    pub join: Option<String>,
    /// A file holding the token of `rune admin cluster join-token`.
    #[arg(long, env = "RUNE_JOIN_TOKEN_FILE")]
    pub join_token_file: Option<PathBuf>,
    /// How long a node may be silent before its instances are placed on other nodes
    /// (default 60s).
    #[arg(long, env = "RUNE_NODE_GRACE", value_parser = humantime::parse_duration)]
    pub node_grace: Option<std::time::Duration>,
    /// Where the other nodes' data planes reach this node's instances (default: the raft
    /// listen address's host, port 7864; port 0 takes a free one).
    #[arg(long, env = "RUNE_GATEWAY_LISTEN")]
    pub gateway_listen: Option<String>,
}

/// `cluster.*`: this node's raft port and, on a node that joins, whom it joins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// `cluster.raft-listen`.
    pub listen: SocketAddr,
    /// `cluster.raft-advertise`: the address recorded in the membership.
    pub advertise: String,
    /// `cluster.join` and `cluster.join-token-file`.
    pub join: Option<(String, PathBuf)>,
    /// `cluster.node-grace`.
    pub node_grace: std::time::Duration,
    /// `cluster.gateway-listen`: where the other nodes' data planes reach this node's
    /// instances.
    pub gateway_listen: SocketAddr,
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
    /// `storage.reserve`: bytes kept free on the data dir's file system.
    pub storage_reserve: u64,
    /// Bound on draining in-flight RPCs at shutdown.
    pub drain_seconds: u64,
    /// This node's name.
    pub node_name: String,
    /// The Docker Engine's unix socket path.
    pub docker_socket: String,
    /// `docker.api-version`, `fallback-api-version`, `negotiation-timeout-seconds`.
    pub docker_client: rune_orchestrator::runner::docker::DockerClientConfig,
    /// `docker.registries`: pull credentials, checked.
    pub registries: Vec<rune_orchestrator::registry::Registry>,
    /// `runner.process.volumes-root`: process services' volumes, outside the data dir.
    pub volumes_root: PathBuf,
    /// Where the KEK comes from.
    pub kek_source: rune_secrets::KekSource,
    /// `storage.secret-limits`.
    pub secret_limits: rune_statemachine::secret::SecretLimits,
    /// `auth.allow-remote-admin`.
    pub allow_remote_admin: bool,
    /// `server.admin-socket`: every RPC for local root, over a Unix socket.
    pub admin_socket: Option<PathBuf>,
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
    /// `ingress.header-timeout`, `idle-timeout`, `tunnel-timeout`.
    pub ingress_timeouts: rune_ingress::Timeouts,
    /// `ingress.max-connections`; none: from the open-files limit.
    pub ingress_max_connections: Option<usize>,
    /// `acme.*`.
    pub acme: rune_ingress::acme::AcmeConfig,
    /// Test hooks on.
    pub enable_failpoints: bool,
    /// `cluster.*`; none for a single node without a raft port.
    pub cluster: Option<ClusterSettings>,
    /// Runefile keys accepted but ignored, each as `file:line: key: ignored: why`.
    pub ignored: Vec<String>,
}

impl Settings {
    /// The DNS's section: where it listens, where other names go, how long it may lag.
    pub fn dns(&self) -> rune_dns::DnsConfig {
        rune_dns::DnsConfig {
            addr: self.dns_addr,
            upstreams: self.dns_upstreams.clone(),
            dev_mode: self.dev_mode,
            stale_budget: self.stale_budget,
            forward_timeout: std::time::Duration::from_secs(2),
            // Read from the state at start (it is fixed at the first start).
            cluster_cidr: None,
            udp_threads: 0,
        }
    }

    /// The data plane's section. Without nftables nothing redirects VIP traffic from elsewhere
    /// to the proxy, so it listens on loopback only.
    pub fn dataplane(&self) -> rune_dataplane::DataPlaneConfig {
        rune_dataplane::DataPlaneConfig {
            node: self.node_name.clone(),
            listen: if self.nftables {
                std::net::Ipv4Addr::UNSPECIFIED.into()
            } else {
                std::net::Ipv4Addr::LOCALHOST.into()
            },
            port_range: self.proxy_ports,
            ports_file: self.data_dir.join("dataplane").join("proxy-ports.json"),
            kernel: self.nftables,
            nft_table: self.nft_table.clone(),
            stale_budget: self.stale_budget,
            connect_timeout: std::time::Duration::from_secs(3),
        }
    }

    /// The orchestrator's section, for the cluster `cluster` (its id lives in the state). What
    /// only exists at run time (the secret opener, the log writer) is the caller's to add.
    pub fn orchestrator(&self, cluster: &str) -> rune_orchestrator::OrchestratorConfig {
        let mut c = rune_orchestrator::OrchestratorConfig::new(&self.node_name, &self.data_dir);
        c.cluster = cluster.to_string();
        c.docker_socket = self.docker_socket.clone();
        c.docker_client = self.docker_client;
        c.run_dir = self.run_dir.clone();
        c.registries = self.registries.clone();
        c.volumes_root = self.volumes_root.clone();
        c
    }
}

/// A configuration problem; `runed` exits with it (code 78, EX_CONFIG) before touching anything.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// `true`/`false` or a word (`networking.nftables: auto|off|true|false`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Switch {
    Bool(bool),
    Text(String),
}

/// A leaf value the original format allows as a number or a string (`timeout: 30s`, `retries: 3`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Scalar {
    Number(serde_json::Number),
    Text(String),
}

/// The runefile as written, in either spelling (keys are rewritten to kebab-case first). Every
/// section is typed, so an unknown key anywhere is refused with its line.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Runefile {
    server: Option<ServerSection>,
    data_dir: Option<String>,
    log: Option<LogSection>,
    debug: Option<bool>,
    pretty: Option<bool>,
    storage: Option<StorageSection>,
    telemetry: Option<TelemetrySection>,
    node: Option<NodeSection>,
    auth: Option<AuthSection>,
    docker: Option<DockerSection>,
    runner: Option<RunnerSection>,
    secret: Option<SecretSection>,
    crypto: Option<CryptoSection>,
    networking: Option<NetworkingSection>,
    ingress: Option<IngressSection>,
    acme: Option<AcmeSection>,
    /// The docs' top-level spelling of `docker.registries`.
    registries: Option<Vec<registries::RegistryEntry>>,
    // Keys of the original format that mean nothing to runed: accepted, and said to be ignored.
    namespace: Option<String>,
    client: Option<ClientSection>,
    resources: Option<ResourcesSection>,
    plugins: Option<PluginsSection>,
    cluster: Option<ClusterSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct ClusterSection {
    raft_listen: Option<String>,
    raft_advertise: Option<String>,
    join: Option<String>,
    join_token_file: Option<String>,
    node_grace: Option<String>,
    gateway_listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
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
    admin_socket: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
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
struct StorageSection {
    snapshot_every: Option<u64>,
    keep_after_snapshot: Option<u64>,
    history_limit: Option<u32>,
    secret_limits: Option<SecretLimitsSection>,
    reserve: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct SecretLimitsSection {
    max_keys_per_secret: Option<u64>,
    max_value_size: Option<u64>,
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
struct AuthSection {
    /// The original's API keys; only the empty value (none) is meaningful here.
    api_keys: Option<serde_json::Value>,
    provider: Option<String>,
    token: Option<String>,
    allow_remote_admin: Option<bool>,
    enabled: Option<bool>,
    tls: Option<TlsSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct DockerSection {
    api_version: Option<String>,
    fallback_api_version: Option<String>,
    negotiation_timeout_seconds: Option<u64>,
    secret_dir_mode: Option<Scalar>,
    secret_file_mode: Option<Scalar>,
    config_dir_mode: Option<Scalar>,
    config_file_mode: Option<Scalar>,
    socket: Option<String>,
    registries: Option<Vec<registries::RegistryEntry>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RunnerSection {
    docker: Option<RunnerSwitch>,
    process: Option<RunnerSwitch>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RunnerSwitch {
    enabled: Option<bool>,
    socket: Option<String>,
    volumes_root: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct SecretSection {
    encryption: Option<EncryptionSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct EncryptionSection {
    enabled: Option<bool>,
    kek: Option<KekSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct CryptoSection {
    kek: Option<KekSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct KekSection {
    source: Option<String>,
    #[serde(alias = "file")]
    file_path: Option<String>,
    #[serde(alias = "env")]
    env_var: Option<String>,
    generate_if_missing: Option<bool>,
    passphrase: Option<PassphraseSection>,
}

// Decoded only so that unknown keys inside are refused; the values are not used.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)]
struct PassphraseSection {
    enabled: Option<bool>,
    env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct NetworkingSection {
    dev_mode: Option<bool>,
    cluster_cidr: Option<String>,
    dns_addr: Option<String>,
    dns_upstreams: Option<Vec<String>>,
    stale_budget: Option<String>,
    nftables: Option<Switch>,
    nft_table: Option<String>,
    proxy_ports: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct IngressSection {
    http_addr: Option<String>,
    https_addr: Option<String>,
    header_timeout: Option<String>,
    idle_timeout: Option<String>,
    tunnel_timeout: Option<String>,
    max_connections: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct AcmeSection {
    #[serde(alias = "directory")]
    directory_url: Option<String>,
    email: Option<String>,
    staging: Option<bool>,
    ca_file: Option<String>,
    renew_before: Option<String>,
    keep_unexposed: Option<String>,
}

// Decoded only so that unknown keys inside are refused; the values are not used.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)]
struct ClientSection {
    timeout: Option<Scalar>,
    retries: Option<u32>,
}

// Decoded only so that unknown keys inside are refused; the values are not used.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)]
struct ResourcesSection {
    cpu: Option<ResourceDefaults>,
    memory: Option<ResourceDefaults>,
}

// Decoded only so that unknown keys inside are refused; the values are not used.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)]
struct ResourceDefaults {
    default_request: Option<Scalar>,
    default_limit: Option<Scalar>,
}

// Decoded only so that unknown keys inside are refused; the values are not used.
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

/// Where settings came from, so that a problem found after decoding still names its line.
#[derive(Default)]
struct Source {
    name: String,
    doc: Option<Node>,
}

impl Source {
    /// `file:line: key` for a dotted key of the runefile, or just the key without a file.
    fn at(&self, key: &str) -> String {
        match &self.doc {
            Some(doc) => {
                // `a.b[2].c`: keys and list indices.
                let mut segs = Vec::new();
                for part in key.split('.') {
                    let (k, idx) = part.split_once('[').unwrap_or((part, ""));
                    segs.push(Seg::Key(k.to_string()));
                    segs.extend(
                        idx.split('[')
                            .filter_map(|i| i.trim_end_matches(']').parse().ok())
                            .map(Seg::Index),
                    );
                }
                let path = FieldPath(segs);
                format!("{}:{}: {key}", self.name, doc.line_of(&path))
            }
            None => key.to_string(),
        }
    }

    fn err(&self, key: &str, msg: impl std::fmt::Display) -> ConfigError {
        ConfigError(format!("{}: {msg}", self.at(key)))
    }
}

fn load_runefile(path: &Path) -> Result<(Runefile, Source), ConfigError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read runefile {name}: {e}")))?;
    let docs = yaml::parse(&text)
        .map_err(|e| ConfigError(format!("{name}:{}: invalid YAML: {}", e.line, e.message)))?;
    let Some(mut doc) = docs.into_iter().find(|d| !d.is_null()) else {
        return Ok((Runefile::default(), Source { name, doc: None }));
    };
    kebab_keys(&mut doc);
    let file = decode::<Runefile>(&doc.to_json()).map_err(|errs| {
        let msgs: Vec<String> = errs
            .iter()
            .map(|e| {
                let msg = e.message.replace("unknown field", "unknown key");
                format!("{name}:{}: {}: {msg}", doc.line_of(&e.path), e.path)
            })
            .collect();
        ConfigError(msgs.join("\n"))
    })?;
    Ok((file, Source { name, doc: Some(doc) }))
}

/// Checks a runefile without starting anything (for `rune lint`); returns what runed would say
/// it ignores.
pub fn check_runefile(path: &Path) -> Result<Vec<String>, ConfigError> {
    Settings::resolve(&Flags {
        config: Some(path.to_path_buf()),
        ..Default::default()
    })
    .map(|s| s.ignored)
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

/// Parses a size: `134217728`, `128MiB`, `1GiB`, `500MB`, `64k`.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "ki" | "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mi" | "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gi" | "gib" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// A Docker API version such as `1.43`.
fn parse_api_version(src: &Source, key: &str, v: &str) -> Result<(usize, usize), ConfigError> {
    v.trim()
        .split_once('.')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        .ok_or_else(|| src.err(key, format!("'{v}' is not a Docker API version such as 1.43")))
}

/// The default room kept free on the data dir's file system (`storage.reserve`).
pub const DEFAULT_STORAGE_RESERVE: u64 = 128 << 20;

impl Settings {
    /// Resolves defaults, the runefile and the flags.
    pub fn resolve(flags: &Flags) -> Result<Self, ConfigError> {
        let (file, src) = match &flags.config {
            Some(p) => load_runefile(p)?,
            None => (Runefile::default(), Source::default()),
        };
        let mut ignored = Vec::new();
        let server = file.server.unwrap_or_default();
        let log = file.log.unwrap_or_default();
        let storage = file.storage.unwrap_or_default();
        let net = file.networking.unwrap_or_default();
        let auth = file.auth.unwrap_or_default();
        let docker = file.docker.unwrap_or_default();
        let runner = file.runner.unwrap_or_default();
        let dev_mode = flags.dev_mode || net.dev_mode.unwrap_or(false);

        // Keys of the original format that runed has no use for: said, not silently dropped.
        for (present, key, why) in [
            (
                file.namespace.is_some(),
                "namespace",
                "the CLI chooses the namespace (-n, contexts)",
            ),
            (
                file.client.is_some(),
                "client",
                "client settings belong to the CLI's config (~/.rune/config.yaml)",
            ),
            (
                file.resources.is_some(),
                "resources",
                "default resource requests and limits are not applied by this runed; set them per service",
            ),
            (file.plugins.is_some(), "plugins", "runed has no plugins"),
        ] {
            if present {
                ignored.push(format!("{}: ignored: {why}", src.at(key)));
            }
        }
        // Keys that would change what runed does in ways it cannot: refused, never ignored.
        let refuse = |key: &str, why: &str| Err(src.err(key, format!("not supported: {why}")));
        let registries = match (&docker.registries, &file.registries) {
            (Some(d), Some(t)) if !d.is_empty() && !t.is_empty() => {
                return Err(src.err(
                    "registries",
                    "given twice: here and as docker.registries; keep one list",
                ))
            }
            (Some(d), _) if !d.is_empty() => registries::check(d, "docker.registries", &src, &mut ignored)?,
            (_, Some(t)) => registries::check(t, "registries", &src, &mut ignored)?,
            _ => Vec::new(),
        };
        for (value, key) in [
            (&docker.secret_dir_mode, "docker.secret-dir-mode"),
            (&docker.secret_file_mode, "docker.secret-file-mode"),
            (&docker.config_dir_mode, "docker.config-dir-mode"),
            (&docker.config_file_mode, "docker.config-file-mode"),
        ] {
            if value.is_some() {
                return refuse(
                    key,
                    "mounted secret files are 0400 and configmap files 0444, owned by the instance's user, under the runtime directory (--run-dir)",
                );
            }
        }
        if auth.enabled == Some(false) {
            return refuse(
                "auth.enabled",
                "every request needs a token; there is no switch to turn authentication off",
            );
        }
        if auth.provider.as_deref().is_some_and(|p| p != "token") {
            return refuse(
                "auth.provider",
                "the only provider is token (rune admin token create)",
            );
        }
        let nonempty = |v: &Option<serde_json::Value>| match v {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::String(s)) => !s.trim().is_empty(),
            Some(serde_json::Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        if nonempty(&auth.api_keys) {
            return refuse(
                "auth.api-keys",
                "static API keys are not accepted; create tokens with rune admin token create",
            );
        }
        if auth.token.as_deref().is_some_and(|t| !t.trim().is_empty()) {
            return refuse(
                "auth.token",
                "a static token in the runefile is not accepted; create tokens with rune admin token create",
            );
        }
        if let Some(enc) = &file.secret.as_ref().and_then(|s| s.encryption.as_ref()) {
            if enc.enabled == Some(false) {
                return refuse(
                    "secret.encryption.enabled",
                    "secrets are always sealed under the KEK",
                );
            }
        }
        for (r, key) in [
            (&runner.docker, "runner.docker"),
            (&runner.process, "runner.process"),
        ] {
            if r.as_ref().and_then(|r| r.enabled) == Some(false) {
                return refuse(
                    &format!("{key}.enabled"),
                    "both runners are always on; a service chooses its runtime",
                );
            }
        }
        if runner.process.as_ref().is_some_and(|p| p.socket.is_some()) {
            return Err(src.err(
                "runner.process.socket",
                "unknown key (runner.process has enabled and volumes-root)",
            ));
        }
        if runner.docker.as_ref().is_some_and(|p| p.volumes_root.is_some()) {
            return Err(src.err(
                "runner.docker.volumes-root",
                "unknown key (the Docker Engine keeps container volumes; runner.process.volumes-root is for process services)",
            ));
        }

        // A developer's runed stays on loopback unless told otherwise.
        let (grpc_default, http_default) = if dev_mode {
            ("127.0.0.1:7863", "127.0.0.1:7861")
        } else {
            (":7863", ":7861")
        };
        let grpc = flags
            .grpc_addr
            .clone()
            .or(server.grpc_addr)
            .unwrap_or_else(|| grpc_default.into());
        let http = flags
            .http_addr
            .clone()
            .or(server.http_addr)
            .unwrap_or_else(|| http_default.into());
        let metrics = flags
            .metrics_addr
            .clone()
            .or(server.metrics_addr)
            .or(file.telemetry.and_then(|t| t.metrics_addr))
            .unwrap_or_else(|| "127.0.0.1:9100".into());
        let default_dir = if dev_mode {
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
        let volumes_root = flags
            .volumes_root
            .clone()
            .or(runner
                .process
                .as_ref()
                .and_then(|p| p.volumes_root.clone())
                .map(PathBuf::from))
            .unwrap_or_else(|| {
                let mut name = data_dir.file_name().unwrap_or_default().to_os_string();
                name.push("-volumes");
                data_dir.with_file_name(name)
            });
        if volumes_root.starts_with(&data_dir) {
            return Err(src.err(
                "runner.process.volumes-root",
                format!(
                    "{} is inside the data dir {}; volumes must outlive what happens to it (a restore replaces it)",
                    volumes_root.display(),
                    data_dir.display()
                ),
            ));
        }
        let level = if flags.debug || file.debug == Some(true) {
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
            return Err(src.err(
                "log.level",
                format!("'{level}' is not one of trace, debug, info, warn, error"),
            ));
        }
        let format = if flags.pretty || file.pretty == Some(true) {
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
            other => return Err(src.err("log.format", format!("'{other}' is not text or json"))),
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
            .or(runner.docker.as_ref().and_then(|d| d.socket.clone()))
            .or(docker.socket)
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
        let docker_client = rune_orchestrator::runner::docker::DockerClientConfig {
            api_version: match &docker.api_version {
                Some(v) if !v.trim().is_empty() => Some(parse_api_version(&src, "docker.api-version", v)?),
                _ => None,
            },
            fallback_api_version: match &docker.fallback_api_version {
                Some(v) if !v.trim().is_empty() => {
                    Some(parse_api_version(&src, "docker.fallback-api-version", v)?)
                }
                _ => None,
            },
            negotiation_timeout: std::time::Duration::from_secs(
                docker.negotiation_timeout_seconds.unwrap_or(10).max(1),
            ),
            ..Default::default()
        };
        let cluster_cidr = flags
            .cluster_cidr
            .clone()
            .or(net.cluster_cidr)
            .unwrap_or_else(|| rune_statemachine::network::DEFAULT_CLUSTER_CIDR.into());
        rune_statemachine::network::Cidr::parse(&cluster_cidr)
            .map_err(|m| src.err("networking.cluster-cidr", format!("(--cluster-cidr) {m}")))?;
        let dns_addr = flags.dns_addr.clone().or(net.dns_addr);
        let dns_addr_default = dns_addr.is_none();
        let dns_addr = dns_addr.unwrap_or_else(|| "127.0.0.123:53".into());
        let dns_addr: SocketAddr = dns_addr.parse().map_err(|_| {
            src.err(
                "networking.dns-addr",
                format!("'{dns_addr}' is not an address such as 127.0.0.123:53"),
            )
        })?;
        let upstream_text: Vec<String> = if flags.dns_upstreams.is_empty() {
            net.dns_upstreams.unwrap_or_default()
        } else {
            flags.dns_upstreams.clone()
        };
        let dns_upstreams = upstream_text
            .iter()
            .map(|u| {
                u.parse::<SocketAddr>()
                    .or_else(|_| u.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                    .map_err(|_| src.err("networking.dns-upstreams", format!("'{u}' is not an address")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let stale_budget = match (flags.stale_budget, net.stale_budget) {
            (Some(d), _) => d,
            (None, Some(t)) => humantime::parse_duration(&t)
                .map_err(|e| src.err("networking.stale-budget", format!("'{t}': {e}")))?,
            (None, None) => std::time::Duration::from_secs(30),
        };
        let nft_text = flags.nftables.clone().or(match net.nftables {
            Some(Switch::Bool(b)) => Some(if b { "auto" } else { "off" }.to_string()),
            Some(Switch::Text(t)) => Some(t),
            None => None,
        });
        let nftables = match nft_text.as_deref() {
            None | Some("auto") | Some("on") => !dev_mode,
            Some("off") => false,
            Some(other) => {
                return Err(src.err(
                    "networking.nftables",
                    format!("(--nftables) expected auto or off, got '{other}'"),
                ))
            }
        };
        let nft_table = flags
            .nft_table
            .clone()
            .or(net.nft_table)
            .unwrap_or_else(|| "rune".into());
        // runed replaces its table whole (delete, then define): a name that could be another
        // program's table (`filter`, `nat`) would wipe it, so only `rune` and `rune_*` are taken.
        if nft_table.len() > 32
            || !(nft_table == "rune" || nft_table.starts_with("rune_"))
            || !nft_table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(src.err(
                "networking.nft-table",
                format!("(--nft-table) '{nft_table}' must be `rune` or `rune_` then letters, digits or '_' (at most 32), so it can never be another program's table"),
            ));
        }
        let range_text = flags
            .proxy_ports
            .clone()
            .or(net.proxy_ports)
            .unwrap_or_else(|| "30000-32767".into());
        let proxy_ports = range_text
            .split_once('-')
            .and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)))
            .filter(|(a, b)| *a > 0 && a <= b)
            .ok_or_else(|| {
                src.err(
                    "networking.proxy-ports",
                    format!("(--proxy-ports) '{range_text}' is not a port range such as 30000-32767"),
                )
            })?;
        let ingress = file.ingress.unwrap_or_default();
        let ingress_addr = |flag: &Option<String>,
                            value: Option<String>,
                            key: &str,
                            prod: &str,
                            dev: &str|
         -> Result<SocketAddr, ConfigError> {
            let text = flag
                .clone()
                .or(value)
                .unwrap_or_else(|| if dev_mode { dev } else { prod }.into());
            parse_addr(&src.at(&format!("ingress.{key}")), &text)
        };
        let ingress_http = ingress_addr(
            &flags.ingress_http_addr,
            ingress.http_addr,
            "http-addr",
            ":80",
            "127.0.0.1:8080",
        )?;
        let ingress_https = ingress_addr(
            &flags.ingress_https_addr,
            ingress.https_addr,
            "https-addr",
            ":443",
            "127.0.0.1:8443",
        )?;
        let ingress_timeouts = ingress_timeouts(
            &src,
            flags,
            ingress.header_timeout,
            ingress.idle_timeout,
            ingress.tunnel_timeout,
        )?;
        let ingress_max_connections = match flags.ingress_max_connections.or(ingress.max_connections) {
            None => None,
            Some(n) => Some(usize::try_from(n).ok().filter(|n| *n > 0).ok_or_else(|| {
                src.err(
                    "ingress.max-connections",
                    format!("(--ingress-max-connections) {n} must be at least 1"),
                )
            })?),
        };
        let acme_file = file.acme.unwrap_or_default();
        let staging = acme_file.staging.unwrap_or(false);
        let directory = match (flags.acme_directory_url.clone(), acme_file.directory_url) {
            (Some(u), _) | (None, Some(u)) => u,
            (None, None) if staging => "https://acme-staging-v02.api.letsencrypt.org/directory".into(),
            (None, None) => "https://acme-v02.api.letsencrypt.org/directory".into(),
        };
        if !directory.starts_with("https://") {
            return Err(src.err(
                "acme.directory-url",
                format!("'{directory}' must be an https:// URL"),
            ));
        }
        let acme = rune_ingress::acme::AcmeConfig {
            directory,
            email: flags.acme_email.clone().or(acme_file.email),
            ca_file: flags
                .acme_ca_file
                .clone()
                .or(acme_file.ca_file.map(PathBuf::from)),
            renew_before: flag_or_file_duration(
                &src,
                "acme.renew-before",
                flags.acme_renew_before,
                acme_file.renew_before,
            )?,
            keep_unexposed: flag_or_file_duration(
                &src,
                "acme.keep-unexposed",
                flags.acme_keep_unexposed,
                acme_file.keep_unexposed,
            )?
            .unwrap_or(rune_ingress::acme::DEFAULT_KEEP_UNEXPOSED),
        };
        let tls = tls_setting(flags, dev_mode, auth.tls.as_ref().or(server.tls.as_ref()))?;
        let kek_source = kek_source(
            flags,
            &src,
            file.crypto.and_then(|c| c.kek),
            file.secret.and_then(|s| s.encryption).and_then(|e| e.kek),
            &data_dir,
        )?;
        let secret_limits = secret_limits(storage.secret_limits.as_ref(), &src)?;
        let storage_reserve = match (&flags.storage_reserve, &storage.reserve) {
            (Some(t), _) => parse_size(t).ok_or_else(|| {
                ConfigError(format!("--storage-reserve: '{t}' is not a size such as 128MiB"))
            })?,
            (None, Some(Scalar::Text(t))) => parse_size(t).ok_or_else(|| {
                src.err(
                    "storage.reserve",
                    format!("'{t}' is not a size such as 128MiB or 1GiB"),
                )
            })?,
            (None, Some(Scalar::Number(n))) => n
                .as_u64()
                .ok_or_else(|| src.err("storage.reserve", format!("'{n}' is not a whole number of bytes")))?,
            (None, None) => DEFAULT_STORAGE_RESERVE,
        };
        let run_dir = flags.run_dir.clone().unwrap_or_else(default_run_dir);
        let admin_socket = match flags.admin_socket.clone().or(server.admin_socket) {
            Some(p) if p.trim().is_empty() => None,
            Some(p) => Some(PathBuf::from(p)),
            None => Some(run_dir.join("admin.sock")),
        };
        let roles = match &flags.node_role {
            Some(r) => r.clone(),
            None => node
                .role
                .unwrap_or_else(|| if dev_mode { "edge".into() } else { String::new() }),
        };
        Ok(Settings {
            grpc_addr: parse_addr(&src.at("server.grpc-addr"), &grpc)?,
            http_addr: parse_addr(&src.at("server.http-addr"), &http)?,
            metrics_addr: if metrics.trim().is_empty() {
                None
            } else {
                Some(parse_addr(&src.at("server.metrics-addr"), &metrics)?)
            },
            data_dir,
            log_level: level,
            log_format,
            dev_mode,
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
            storage_reserve,
            drain_seconds: server.drain_seconds.unwrap_or(10),
            node_name,
            docker_socket,
            docker_client,
            registries,
            volumes_root,
            kek_source,
            secret_limits,
            allow_remote_admin: auth.allow_remote_admin.unwrap_or(false),
            admin_socket,
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
            ingress_timeouts,
            ingress_max_connections,
            acme,
            enable_failpoints: flags.enable_failpoints,
            cluster: cluster_settings(flags, file.cluster.unwrap_or_default(), &src)?,
            ignored,
        })
    }
}

/// `cluster.*` and the flags over it, checked: an address that is one, a join with its token.
fn cluster_settings(
    flags: &Flags,
    c: ClusterSection,
    src: &Source,
) -> Result<Option<ClusterSettings>, ConfigError> {
    let pick =
        |flag: &Option<String>, file: Option<String>| flag.clone().or(file).filter(|v| !v.trim().is_empty());
    let listen = pick(&flags.raft_listen, c.raft_listen);
    let advertise = pick(&flags.raft_advertise, c.raft_advertise);
    let join = pick(&flags.join, c.join);
    let gateway = pick(&flags.gateway_listen, c.gateway_listen);
    let token_file = flags
        .join_token_file
        .clone()
        .or(c.join_token_file.map(PathBuf::from))
        .filter(|p| !p.as_os_str().is_empty());
    let Some(listen) = listen else {
        for (set, key) in [
            (advertise.is_some(), "cluster.raft-advertise"),
            (join.is_some(), "cluster.join"),
            (token_file.is_some(), "cluster.join-token-file"),
            (gateway.is_some(), "cluster.gateway-listen"),
        ] {
            if set {
                return Err(src.err(
                    key,
                    "needs cluster.raft-listen (--raft-listen): the port raft uses",
                ));
            }
        }
        return Ok(None);
    };
    let listen = parse_addr(&src.at("cluster.raft-listen"), &listen)?;
    let gateway_listen = match gateway {
        Some(g) => parse_addr(&src.at("cluster.gateway-listen"), &g)?,
        None => SocketAddr::new(listen.ip(), DEFAULT_GATEWAY_PORT),
    };
    if gateway_listen == listen {
        return Err(src.err(
            "cluster.gateway-listen",
            format!("{gateway_listen} is the raft port's address; give the gateway a port of its own"),
        ));
    }
    let node_grace = match (flags.node_grace, c.node_grace) {
        (Some(d), _) => d,
        (None, Some(text)) => humantime::parse_duration(text.trim())
            .map_err(|e| src.err("cluster.node-grace", format!("'{text}': {e}")))?,
        (None, None) => std::time::Duration::from_secs(60),
    };
    if node_grace < std::time::Duration::from_secs(1) {
        return Err(src.err(
            "cluster.node-grace",
            "must be at least 1s: a new leader has heard no one yet, and a shorter grace would move every instance at each election",
        ));
    }
    let advertise = match advertise {
        Some(a) => {
            rune_log::join::raft_address(&a).map_err(|why| src.err("cluster.raft-advertise", format!("'{a}': {why}")))?;
            a.trim().to_string()
        }
        None if listen.ip().is_unspecified() => {
            return Err(src.err(
                "cluster.raft-advertise",
                format!("is required when cluster.raft-listen ({listen}) names no one interface: the address the other members dial, such as 10.0.0.5:{}", listen.port()),
            ))
        }
        None => listen.to_string(),
    };
    let join =
        match (join, token_file) {
            (None, None) => None,
            (Some(_), None) => return Err(src.err(
                "cluster.join-token-file",
                "is required with cluster.join: a file holding the token of `rune admin cluster join-token`",
            )),
            (None, Some(_)) => {
                return Err(src.err(
                    "cluster.join",
                    "is required with cluster.join-token-file: the raft address (host:port) of a member",
                ))
            }
            (Some(j), Some(f)) => {
                rune_log::join::raft_address(&j)
                    .map_err(|why| src.err("cluster.join", format!("'{j}': {why}")))?;
                Some((j.trim().to_string(), f))
            }
        };
    Ok(Some(ClusterSettings {
        listen,
        advertise,
        join,
        node_grace,
        gateway_listen,
    }))
}

/// The node gateway's port unless `cluster.gateway-listen` says otherwise (beside the API's
/// 7863 and raft's customary 7862).
pub const DEFAULT_GATEWAY_PORT: u16 = 7864;

/// This process's effective uid.
pub fn current_uid() -> u32 {
    static UID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UID.get_or_init(|| rustix::process::geteuid().as_raw())
}

/// Where runtime files (secret mounts, the admin socket) live by default: `/run/rune` for
/// root, else a directory of this user's under the temporary directory. The CLI finds the
/// admin socket of a runed of the same user there too.
pub fn default_run_dir() -> PathBuf {
    if current_uid() == 0 {
        PathBuf::from("/run/rune")
    } else {
        std::env::temp_dir().join(format!("rune-{}", current_uid()))
    }
}

/// `crypto.kek` (or the original's `secret.encryption.kek`), and `--kek-file`. A relative file
/// path is relative to the data dir, as in the original.
fn kek_source(
    flags: &Flags,
    src: &Source,
    crypto: Option<KekSection>,
    original: Option<KekSection>,
    data_dir: &Path,
) -> Result<rune_secrets::KekSource, ConfigError> {
    use rune_secrets::KekSource;
    let (kek, at) = match (crypto, original) {
        (Some(k), _) => (k, "crypto.kek"),
        (None, Some(k)) => (k, "secret.encryption.kek"),
        (None, None) => (KekSection::default(), "crypto.kek"),
    };
    if kek.passphrase.as_ref().and_then(|p| p.enabled) == Some(true) {
        return Err(src.err(
            &format!("{at}.passphrase.enabled"),
            "not supported: a passphrase-protected KEK file; use source: env to load the key from a secret manager",
        ));
    }
    let generate = kek.generate_if_missing.unwrap_or(true);
    let file = kek.file_path.filter(|f| !f.trim().is_empty()).map(|f| {
        let p = PathBuf::from(f);
        if p.is_relative() {
            data_dir.join(p)
        } else {
            p
        }
    });
    if let Some(path) = &flags.kek_file {
        return Ok(KekSource::File {
            path: path.clone(),
            generate_if_missing: generate,
        });
    }
    match kek.source.as_deref().unwrap_or("file") {
        "file" => Ok(KekSource::File {
            path: file.unwrap_or_else(|| crate::sealing::default_kek_path(data_dir)),
            generate_if_missing: generate,
        }),
        "env" => Ok(KekSource::Env {
            var: kek.env_var.unwrap_or_else(|| "RUNE_MASTER_KEY".into()),
        }),
        "generated" => Ok(KekSource::Generated),
        other => Err(src.err(
            &format!("{at}.source"),
            format!("'{other}' is not one of file, env, generated"),
        )),
    }
}

/// The ingress's timeouts from their flags or `ingress.*` keys, each above zero (a zero one
/// would close every connection at once), the idle one no shorter than the header one: the
/// idle timer also ends HTTP/1.1 keep-alive connections, and would cut off a next request
/// whose head is still on its way within the header timeout.
fn ingress_timeouts(
    src: &Source,
    flags: &Flags,
    header: Option<String>,
    idle: Option<String>,
    tunnel: Option<String>,
) -> Result<rune_ingress::Timeouts, ConfigError> {
    let default = rune_ingress::Timeouts::default();
    let one = |key: &str, flag, file, default| -> Result<std::time::Duration, ConfigError> {
        let key = format!("ingress.{key}");
        let d = flag_or_file_duration(src, &key, flag, file)?.unwrap_or(default);
        if d.is_zero() {
            return Err(src.err(
                &key,
                format!("(--{}) must be longer than zero", key.replace('.', "-")),
            ));
        }
        Ok(d)
    };
    let t = rune_ingress::Timeouts {
        header: one(
            "header-timeout",
            flags.ingress_header_timeout,
            header,
            default.header,
        )?,
        idle: one("idle-timeout", flags.ingress_idle_timeout, idle, default.idle)?,
        tunnel: one(
            "tunnel-timeout",
            flags.ingress_tunnel_timeout,
            tunnel,
            default.tunnel,
        )?,
    };
    if t.idle < t.header {
        return Err(src.err(
            "ingress.idle-timeout",
            format!(
                "(--ingress-idle-timeout) {} must not be shorter than ingress.header-timeout ({})",
                humantime::format_duration(t.idle),
                humantime::format_duration(t.header)
            ),
        ));
    }
    Ok(t)
}

/// A duration given by flag (which wins) or by the runefile's `key`; a bad value names the key.
fn flag_or_file_duration(
    src: &Source,
    key: &str,
    flag: Option<std::time::Duration>,
    file: Option<String>,
) -> Result<Option<std::time::Duration>, ConfigError> {
    match (flag, file) {
        (Some(d), _) => Ok(Some(d)),
        (None, Some(t)) => humantime::parse_duration(&t)
            .map(Some)
            .map_err(|e| src.err(key, format!("'{t}': {e}"))),
        (None, None) => Ok(None),
    }
}

/// `auth.tls` (or the original's `server.tls`) and the `--tls*` flags.
fn tls_setting(
    flags: &Flags,
    dev_mode: bool,
    section: Option<&TlsSection>,
) -> Result<TlsSetting, ConfigError> {
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
        (None, None) if dev_mode => Ok(TlsSetting::DevSelfSigned),
        (None, None) => Err(ConfigError(
            "TLS is enabled but auth.tls.cert-file and auth.tls.key-file are not set (only --dev-mode generates a self-signed pair)".into(),
        )),
        (Some(_), None) => Err(ConfigError("TLS: auth.tls.key-file (--tls-key-file) is missing".into())),
        (None, Some(_)) => Err(ConfigError("TLS: auth.tls.cert-file (--tls-cert-file) is missing".into())),
    }
}

/// `storage.secret-limits`.
fn secret_limits(
    v: Option<&SecretLimitsSection>,
    src: &Source,
) -> Result<rune_statemachine::secret::SecretLimits, ConfigError> {
    let mut l = rune_statemachine::secret::SecretLimits::default();
    let Some(v) = v else { return Ok(l) };
    for (value, key, slot) in [
        (v.max_keys_per_secret, "max-keys-per-secret", &mut l.max_keys),
        (v.max_value_size, "max-value-size", &mut l.max_value_size),
    ] {
        match value {
            None => {}
            Some(0) => {
                return Err(src.err(
                    &format!("storage.secret-limits.{key}"),
                    "expected a positive whole number, got 0",
                ))
            }
            Some(n) => *slot = usize::try_from(n).unwrap_or(usize::MAX),
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

    /// Why a runefile holding `text` is refused.
    fn refusal(text: &str) -> String {
        let f = write(text);
        Settings::resolve(&Flags {
            config: Some(f.path().into()),
            ..Default::default()
        })
        .unwrap_err()
        .0
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
    fn each_subsystem_gets_its_section() {
        let f = write(
            "networking:\n  stale-budget: 7s\n  nftables: off\n  proxy-ports: 31000-31010\n  dns-addr: 127.0.0.1:5399\n",
        );
        let s = Settings::resolve(&Flags {
            config: Some(f.path().into()),
            data_dir: Some("/d".into()),
            ..Default::default()
        })
        .unwrap();
        let dp = s.dataplane();
        assert_eq!(dp.port_range, (31000, 31010));
        assert!(
            !dp.kernel && dp.listen.is_loopback(),
            "no nftables: the proxy stays on loopback"
        );
        assert_eq!(dp.stale_budget, std::time::Duration::from_secs(7));
        assert_eq!(dp.ports_file, PathBuf::from("/d/dataplane/proxy-ports.json"));
        let dns = s.dns();
        assert_eq!(dns.addr, "127.0.0.1:5399".parse().unwrap());
        assert_eq!(dns.stale_budget, std::time::Duration::from_secs(7));
        let o = s.orchestrator("abc");
        assert_eq!(
            (o.cluster.as_str(), o.data_dir.clone()),
            ("abc", PathBuf::from("/d"))
        );
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
        assert_eq!(none.ingress_timeouts, rune_ingress::Timeouts::default());

        let f = write("ingress:\n  idle-timeout: 2m\n  tunnel-timeout: 10m\n");
        let s = Settings::resolve(&Flags {
            config: Some(f.path().into()),
            ingress_header_timeout: Some(std::time::Duration::from_secs(5)),
            ..Default::default()
        })
        .unwrap();
        let secs = |d: std::time::Duration| d.as_secs();
        let t = s.ingress_timeouts;
        assert_eq!((secs(t.header), secs(t.idle), secs(t.tunnel)), (5, 120, 600));
        assert_eq!(s.ingress_max_connections, None, "from the open-files limit");
        let f = write("ingress:\n  max-connections: 500\n");
        let s = Settings::resolve(&Flags {
            config: Some(f.path().into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.ingress_max_connections, Some(500));
        for bad in [
            "idle-timeout: 0s",
            "header-timeout: soon",
            "idle-timeout: 10s",
            "max-connections: 0",
            "max-connections: lots",
        ] {
            let f = write(&format!("ingress:\n  {bad}\n"));
            let e = Settings::resolve(&Flags {
                config: Some(f.path().into()),
                ..Default::default()
            })
            .unwrap_err();
            let key = bad.split(':').next().unwrap_or_default();
            assert!(e.0.contains(&format!("ingress.{key}")), "{e}");
        }
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

    fn peer_runefile(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/peer-specs")
            .join(name)
    }

    #[test]
    fn peer_runefiles_load_or_say_why_not() {
        // The original's full example loads: what runed cannot use is named as ignored.
        let s = Settings::resolve(&Flags {
            config: Some(peer_runefile("config--runefile.yaml")),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.docker_client.fallback_api_version, Some((1, 43)));
        assert_eq!(s.docker_client.negotiation_timeout.as_secs(), 3);
        for key in ["client", "namespace", "resources", "plugins"] {
            assert!(
                s.ignored.iter().any(|i| i.contains(&format!(": {key}: ignored"))),
                "{key} not reported: {:?}",
                s.ignored
            );
        }
        assert!(
            s.ignored.iter().all(|i| i.contains("config--runefile.yaml:")),
            "{:?}",
            s.ignored
        );
        // The registry example's ECR entry is refused with a reason, not silently ignored.
        let e = Settings::resolve(&Flags {
            config: Some(peer_runefile("runefile.yaml")),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            e.0.contains(
                "runefile.yaml:30: docker.registries[0].auth.type: not supported: ecr needs the AWS API"
            ),
            "{e}"
        );
    }

    #[test]
    fn registries_load_by_kind_and_refuse_what_cannot_work_with_lines() {
        use rune_orchestrator::registry::RegistryAuth;
        let f = write(
            "docker:
  registries:
    - name: local
      registry: 127.0.0.1:5000
      auth: {type: basic, username: ci, password: \"${HOME}\"}
    - name: ghcr
      registry: GHCR.io
      auth: {type: token, token: t0k}
    - name: corp
      registry: \"*.corp.example\"
      auth:
        type: dockerconfigjson
        fromSecret: {name: regcred}
    - name: open
      registry: localhost:5000
      auth: {type: basic, username: \"\", password: \"\", insecure: true}
",
        );
        let s = Settings::resolve(&Flags {
            config: Some(f.path().into()),
            ..Default::default()
        })
        .unwrap();
        let home = std::env::var("HOME").unwrap_or_default();
        assert_eq!(s.registries.len(), 4);
        assert_eq!(
            s.registries[0].auth,
            RegistryAuth::Basic {
                username: "ci".into(),
                password: home
            }
        );
        assert_eq!(s.registries[1].registry, "ghcr.io");
        assert_eq!(s.registries[1].auth, RegistryAuth::Token { token: "t0k".into() });
        assert_eq!(
            s.registries[2].auth,
            RegistryAuth::DockerConfigJson {
                namespace: "system".into(),
                name: "regcred".into()
            }
        );
        assert_eq!(s.registries[3].auth, RegistryAuth::None);
        assert!(
            s.ignored
                .iter()
                .any(|i| i.contains(":16: docker.registries[3].auth.insecure: ignored")),
            "{:?}",
            s.ignored
        );
        assert_eq!(s.orchestrator("c").registries, s.registries);

        for (text, want) in [
            ("docker:\n  registries:\n    - {name: a, registry: r.io, auth: {type: ecr, region: x}}\n", ":3: docker.registries[0].auth.type: not supported: ecr"),
            ("docker:\n  registries:\n    - {name: a, registry: r.io, auth: {type: basic, username: u}}\n", "docker.registries[0].auth.password: is required for type basic"),
            ("docker:\n  registries:\n    - {name: a, registry: r.io, auth: {type: token}}\n", "auth.token: is required for type token"),
            ("docker:\n  registries:\n    - {name: a, registry: r.io, auth: {type: dockerconfigjson}}\n", "auth.from-secret: is required"),
            ("docker:\n  registries:\n    - {name: a, registry: r.io, auth: {type: magic}}\n", "auth.type: 'magic' is not one of basic, token, dockerconfigjson"),
            ("docker:\n  registries:\n    - {name: a, registry: \"https://r.io/v2\"}\n", "docker.registries[0].registry: 'https://r.io/v2' is not a host[:port]"),
            ("docker:\n  registries:\n    - {name: a, registry: r.io}\n    - {name: a, registry: s.io}\n", ":4: docker.registries[1].name: 'a' is used by an earlier entry"),
            ("docker:\n  registries:\n    - {name: a, registry: r.io, auth: {type: token, token: \"${RUNE_TEST_SURELY_UNSET}\"}}\n", "environment variable RUNE_TEST_SURELY_UNSET is not set"),
            ("docker:\n  registries:\n    - {name: a, registry: r.io, auth: {type: token, token: x, tokn: y}}\n", "auth.tokn: unknown key"),
        ] {
            let e = refusal(text);
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn every_section_refuses_unknown_keys_with_lines() {
        for (text, want) in [
            (
                "networking:\n  dev_mod: true\n",
                ":2: networking.dev-mod: unknown key",
            ),
            (
                "crypto:\n  kek:\n    sorce: env\n",
                ":3: crypto.kek.sorce: unknown key",
            ),
            ("docker:\n  registry: x\n", ":2: docker.registry: unknown key"),
            (
                "storage:\n  secret-limits:\n    max-keys: 3\n",
                ":3: storage.secret-limits.max-keys: unknown key",
            ),
            ("ui:\n  enabled: true\n", ":1: ui: unknown key"),
            (
                "resources:\n  gpu: {default_limit: 1}\n",
                ":2: resources.gpu: unknown key",
            ),
        ] {
            let e = refusal(text);
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn accepted_keys_do_what_they_say() {
        // The original's spelling of dev mode turns dev mode on.
        let f = write("networking:\n  dev_mode: true\n");
        let s = Settings::resolve(&Flags {
            config: Some(f.path().into()),
            ..Default::default()
        })
        .unwrap();
        assert!(s.dev_mode && !s.nftables && s.ingress.is_some());
        assert_eq!(s.data_dir, PathBuf::from(".rune-dev"));
        assert!(s.grpc_addr.ip().is_loopback() && s.http_addr.ip().is_loopback());
        // A relative KEK file is relative to the data dir, as in the original.
        let f = write("data_dir: /srv/rune\nsecret:\n  encryption:\n    kek:\n      source: file\n      file: kek.b64\n");
        let s = Settings::resolve(&Flags {
            config: Some(f.path().into()),
            ..Default::default()
        })
        .unwrap();
        assert!(
            matches!(&s.kek_source, rune_secrets::KekSource::File { path, .. } if path == Path::new("/srv/rune/kek.b64")),
            "{:?}",
            s.kek_source
        );
        // Values that would change behaviour runed does not have are refused, naming the key.
        for (text, want) in [
            ("auth:\n  enabled: false\n", ":2: auth.enabled: not supported"),
            ("auth:\n  provider: oidc\n", ":2: auth.provider: not supported"),
            (
                "auth:\n  api_keys: \"k1,k2\"\n",
                ":2: auth.api-keys: not supported",
            ),
            (
                "runner:\n  process:\n    enabled: false\n",
                ":3: runner.process.enabled: not supported",
            ),
            (
                "registries:\n  - name: x\n",
                ":2: registries[0].registry: is required",
            ),
            (
                "storage:\n  reserve: lots\n",
                ":2: storage.reserve: 'lots' is not a size",
            ),
            (
                "docker:\n  api_version: latest\n",
                ":2: docker.api-version: 'latest'",
            ),
        ] {
            let e = refusal(text);
            assert!(e.contains(want), "{text:?}: {e}");
        }
        // Empty values of the original format mean "none" and load.
        let f = write("auth:\n  api_keys: \"\"\n  provider: token\n  token: \"\"\ndocker:\n  registries: []\nstorage:\n  reserve: 64MiB\n");
        let s = Settings::resolve(&Flags {
            config: Some(f.path().into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.storage_reserve, 64 << 20);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("128MiB"), Some(128 << 20));
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("500MB"), Some(500_000_000));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("0"), Some(0));
        assert_eq!(parse_size("12 parsecs"), None);
        assert_eq!(parse_size(""), None);
    }

    #[test]
    fn cluster_settings_are_checked_and_named() {
        // None: a single node without a raft port.
        assert_eq!(Settings::resolve(&Flags::default()).unwrap().cluster, None);
        let f = write("cluster:\n  raft-listen: 127.0.0.1:7862\n");
        let s = Settings::resolve(&Flags {
            config: Some(f.path().into()),
            ..Default::default()
        })
        .unwrap();
        let c = s.cluster.unwrap();
        assert_eq!((c.advertise.as_str(), c.join), ("127.0.0.1:7862", None));
        // The gateway beside raft by default, or where it is told.
        assert_eq!(c.gateway_listen, "127.0.0.1:7864".parse().unwrap());
        let f = write(
            "cluster:
  raft-listen: 127.0.0.1:7862
  gateway-listen: :7000
",
        );
        let s = Settings::resolve(&Flags {
            config: Some(f.path().into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.cluster.unwrap().gateway_listen, "0.0.0.0:7000".parse().unwrap());
        // Flags win; a join comes with its token file.
        let s = Settings::resolve(&Flags {
            config: Some(f.path().into()),
            raft_listen: Some(":7999".into()),
            raft_advertise: Some("node-b:7999".into()),
            join: Some("10.0.0.1:7862".into()),
            join_token_file: Some("/etc/rune/join".into()),
            ..Default::default()
        })
        .unwrap();
        let c = s.cluster.unwrap();
        assert_eq!(c.listen.port(), 7999);
        assert_eq!(c.advertise, "node-b:7999");
        assert_eq!(
            c.join,
            Some(("10.0.0.1:7862".into(), PathBuf::from("/etc/rune/join")))
        );
        for (text, want) in [
            (
                "cluster:\n  raft-listen: :7862\n",
                ":1: cluster.raft-advertise: is required",
            ),
            ("cluster:\n  raft-listen: nowhere\n", "cluster.raft-listen"),
            (
                "cluster:\n  join: 10.0.0.1:7862\n",
                ":2: cluster.join: needs cluster.raft-listen",
            ),
            (
                "cluster:\n  raft-listen: 127.0.0.1:7862\n  join: 10.0.0.1:7862\n",
                "cluster.join-token-file: is required",
            ),
            (
                "cluster:\n  raft-listen: 127.0.0.1:7862\n  join: 10.0.0.1\n  join-token-file: /t\n",
                ":3: cluster.join: '10.0.0.1': expected host:port",
            ),
            (
                "cluster:\n  raft-listen: 127.0.0.1:7862\n  raft-advertise: b:0\n",
                ":3: cluster.raft-advertise: 'b:0': the port",
            ),
            ("cluster:\n  raft-port: 1\n", "raft-port"),
            (
                "cluster:\n  raft-listen: 127.0.0.1:7862\n  gateway-listen: 127.0.0.1:7862\n",
                ":3: cluster.gateway-listen: 127.0.0.1:7862 is the raft port's address",
            ),
            (
                "cluster:\n  raft-listen: 127.0.0.1:7862\n  gateway-listen: here\n",
                "cluster.gateway-listen: 'here' is not an address",
            ),
            (
                "cluster:\n  gateway-listen: :7864\n",
                ":2: cluster.gateway-listen: needs cluster.raft-listen",
            ),
            (
                "cluster:\n  raft-listen: 127.0.0.1:7862\n  node-grace: soon\n",
                ":3: cluster.node-grace: 'soon'",
            ),
        ] {
            let e = refusal(text);
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
