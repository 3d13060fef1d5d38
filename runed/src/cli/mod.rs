//! The `rune` command line: kubectl's conventions over runed's gRPC API.

mod cluster;
pub mod context;
mod identity;
mod instances;
mod network;
mod output;
mod releases;
mod replay;
mod tty;

use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use rune_proto::v1 as pb;
use rune_statemachine::Resource;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::castfile::{self, Parsed};
use crate::runeset;

/// Exit codes scripts can branch on.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Anything else: network, server error.
    pub const GENERIC: u8 = 1;
    /// Bad flags or arguments.
    pub const USAGE: u8 = 2;
    /// Not authenticated or not allowed.
    pub const AUTH: u8 = 3;
    /// The named object does not exist.
    pub const NOT_FOUND: u8 = 4;
    /// The object exists already or the state forbids the change.
    pub const CONFLICT: u8 = 5;
    /// The input is invalid.
    pub const VALIDATION: u8 = 6;
    /// A wait ran out of time.
    pub const TIMEOUT: u8 = 7;
}

/// A failure with the exit code it maps to.
#[derive(Debug)]
pub struct CliError {
    /// Process exit code.
    pub code: u8,
    /// What to tell the user.
    pub message: String,
}

impl CliError {
    /// Exit code 1.
    pub fn generic(m: impl Into<String>) -> Self {
        Self {
            code: exit::GENERIC,
            message: m.into(),
        }
    }
    /// Exit code 2.
    pub fn usage(m: impl Into<String>) -> Self {
        Self {
            code: exit::USAGE,
            message: m.into(),
        }
    }
    /// Exit code 6.
    pub fn validation(m: impl Into<String>) -> Self {
        Self {
            code: exit::VALIDATION,
            message: m.into(),
        }
    }
    fn from_status(s: tonic::Status, server: &str) -> Self {
        use tonic::Code::*;
        let m = s.message().to_string();
        let (code, message) = match s.code() {
            Unauthenticated if m.starts_with("missing bearer token") => (
                exit::AUTH,
                format!(
                    "{m}: the first token comes from `rune admin bootstrap` on runed's host, others from an admin (`rune admin token create`); then `rune login NAME --server {server} --token-file FILE`"
                ),
            ),
            Unauthenticated => (exit::AUTH, format!("{m} (`rune login` with a valid token)")),
            PermissionDenied => (exit::AUTH, m),
            NotFound => (exit::NOT_FOUND, m),
            AlreadyExists | FailedPrecondition | Aborted => (exit::CONFLICT, m),
            InvalidArgument | OutOfRange => (exit::VALIDATION, m),
            // Too large a request (the transport's limit), or the data dir below its reserve.
            ResourceExhausted => (exit::GENERIC, m),
            DeadlineExceeded => (exit::TIMEOUT, m),
            Unavailable => (exit::GENERIC, format!("runed at {server} is unavailable: {m}")),
            _ => (exit::GENERIC, m),
        };
        Self { code, message }
    }
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Format {
    /// Aligned columns.
    #[default]
    Table,
    /// Aligned columns with more of them (services: their proxy addresses).
    Wide,
    /// JSON.
    Json,
    /// YAML, re-castable with `rune cast`.
    Yaml,
}

impl Format {
    /// Columns (`table` or `wide`), as opposed to a document.
    pub fn is_table(self) -> bool {
        matches!(self, Format::Table | Format::Wide)
    }
}

/// `rune`: cast, inspect and debug Rune.
#[derive(Debug, Parser)]
#[command(
    name = "rune",
    version,
    about = "The Rune orchestrator CLI",
    propagate_version = true
)]
pub struct Cli {
    /// runed's gRPC address (host:port).
    #[arg(long, global = true, env = "RUNE_API_SERVER")]
    pub api_server: Option<String>,
    /// Bearer token.
    #[arg(long, global = true, env = "RUNE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the bearer token.
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
    /// Namespace to act in.
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// CA certificate (PEM) to verify runed's TLS certificate; implies TLS.
    #[arg(long, global = true, env = "RUNE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// runed's local admin socket, which `rune admin` uses for the runed on this host that
    /// serves --api-server (root needs no token there). Default: /run/rune/admin.sock for root,
    /// $TMPDIR/rune-<uid>/admin.sock for others.
    #[arg(long, global = true, env = "RUNE_ADMIN_SOCKET")]
    pub admin_socket: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum)]
    pub output: Option<Format>,
    /// What to do.
    #[command(subcommand)]
    pub command: Cmd,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Apply castfiles (files, directories, globs): all resources or none.
    #[command(alias = "apply")]
    Cast {
        /// Files, directories or globs.
        #[arg(required = true)]
        paths: Vec<String>,
        /// Recurse into directories.
        #[arg(short, long)]
        recursive: bool,
        /// Create namespaces that do not exist.
        #[arg(long)]
        create_namespace: bool,
        /// Validate and show what would change; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Bump generations even for unchanged specs.
        #[arg(long)]
        force: bool,
        /// Return once the cast is written, without waiting for rollouts.
        #[arg(long)]
        detach: bool,
        /// How long to wait for the rollouts.
        #[command(flatten)]
        wait: instances::WaitArgs,
        /// Runeset values.
        #[command(flatten)]
        values: RunesetArgs,
        /// Print a runeset's rendered casts; cast nothing.
        #[arg(long)]
        render: bool,
    },
    /// List or show resources.
    Get {
        /// services (svc), instances (inst), endpoints (ep), ingresses (ing), namespaces (ns),
        /// secrets or configmaps (cm).
        kind: String,
        /// A name, to show one.
        name: Option<String>,
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// Keep printing changes.
        #[arg(short, long)]
        watch: bool,
        /// Label selector, k=v[,k=v].
        #[arg(short = 'l', long)]
        selector: Option<String>,
        /// Previous specs of a service, or versions of a configmap.
        #[arg(long)]
        history: bool,
        /// Show secret values (needs the reveal verb on secrets).
        #[arg(long)]
        show_values: bool,
    },
    /// Delete a resource: `rune delete [service|secret|configmap|namespace] NAME`.
    #[command(alias = "rm")]
    Delete {
        /// `[KIND] NAME`; the kind defaults to service.
        #[arg(required = true, num_args = 1..=2)]
        args: Vec<String>,
        /// Delete a service even when others depend on it, or a secret or configmap even when
        /// services use it.
        #[arg(short, long)]
        force: bool,
        /// Wait until the service's instances have stopped (each within its grace period), as
        /// `rune stop` does: for a script that casts the service again right after.
        #[arg(long)]
        wait: bool,
        /// How long to wait (with --wait).
        #[command(flatten)]
        wait_args: instances::WaitArgs,
    },
    /// Set a service's number of instances.
    Scale {
        /// Service name.
        name: String,
        /// Number of instances.
        replicas: u32,
        /// Return without waiting for the instances.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait.
        #[command(flatten)]
        wait: instances::WaitArgs,
    },
    /// Replace every instance of a service, one at a time (starts a stopped service again).
    Restart {
        /// Service name.
        name: String,
        /// Return without waiting for the instances.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait.
        #[command(flatten)]
        wait: instances::WaitArgs,
    },
    /// Cast an earlier spec of a service again, as a new generation (the scale is kept).
    Rollback {
        /// Service name.
        name: String,
        /// The generation to go back to (`rune get svc NAME --history`); default: the one
        /// before the current.
        #[arg(long)]
        to_generation: Option<u64>,
        /// Return without waiting for the rollout.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait.
        #[command(flatten)]
        wait: instances::WaitArgs,
    },
    /// Runeset releases: `list`, `status NAME`, `delete NAME [--delete-volumes]`.
    Release {
        /// What to do.
        #[command(subcommand)]
        action: ReleaseCmd,
    },
    /// Stop a service: scale 0, remembering the scale for `rune restart`.
    Stop {
        /// Service name.
        name: String,
        /// Return without waiting for the instances to stop.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait.
        #[command(flatten)]
        wait: instances::WaitArgs,
    },
    /// Probe states of a service's instances.
    Health {
        /// Service name.
        name: String,
    },
    /// A service's dependencies and dependents.
    Deps {
        /// Service name.
        name: String,
        /// Graphviz output.
        #[arg(long)]
        dot: bool,
    },
    /// Print (and follow) the output of a service's instances.
    #[command(alias = "log")]
    Logs {
        /// Service name, `service/NAME` or `instance/ID`.
        name: String,
        /// Keep streaming.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines of each instance (0: all).
        #[arg(long, default_value_t = 0)]
        tail: u64,
        /// Only output newer than this (e.g. 10m); containers only.
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<Duration>,
        /// One instance of the service.
        #[arg(long)]
        instance: Option<String>,
        /// Prefix lines with their time; containers only.
        #[arg(long)]
        timestamps: bool,
        /// The output of this init step's last run instead.
        #[arg(long)]
        init_step: Option<String>,
    },
    /// Run a command in an instance: `rune exec NAME [-it] -- CMD ARGS...`.
    Exec {
        /// Service name.
        name: String,
        /// The instance (default: the first running one).
        #[arg(long)]
        instance: Option<String>,
        /// Pass stdin to the command.
        #[arg(short, long)]
        interactive: bool,
        /// Allocate a terminal.
        #[arg(short, long)]
        tty: bool,
        /// The command and its arguments.
        #[arg(required = true, last = true)]
        command: Vec<String>,
    },
    /// Check castfiles or a runeset offline.
    Lint {
        /// Files, directories or globs, or one runeset.
        #[arg(required = true)]
        paths: Vec<String>,
        /// Recurse into directories.
        #[arg(short, long)]
        recursive: bool,
        /// Runeset values.
        #[command(flatten)]
        values: RunesetArgs,
    },
    /// Pack a runeset directory into NAME-VERSION.runeset.tgz, which `rune cast` takes.
    Pack {
        /// The runeset directory.
        dir: PathBuf,
        /// Where to write the archive (`-o` is the output format everywhere, so long only).
        #[arg(long = "out")]
        out: Option<PathBuf>,
        /// Also write ARCHIVE.sha256.
        #[arg(long)]
        sha256: bool,
    },
    /// Client and server versions.
    Version {
        /// Only the client's.
        #[arg(long)]
        client: bool,
    },
    /// Shell completion script.
    Completion {
        /// bash, zsh or fish.
        shell: clap_complete::Shell,
    },
    /// Check a token and save it as a context: `rune login CONTEXT --server ADDR --token-file F`.
    Login {
        /// Context name.
        #[arg(default_value = "default")]
        name: String,
        /// runed's gRPC address (host:port).
        #[arg(long)]
        server: Option<String>,
        /// Default namespace of the context.
        #[arg(long = "default-namespace")]
        default_namespace: Option<String>,
    },
    /// Who the current token acts as, and its policies.
    Whoami,
    /// Manage contexts in ~/.rune/config.yaml.
    Config {
        /// What to do.
        #[command(subcommand)]
        action: ConfigCmd,
    },
    /// Forward a local port to a service port through runed: `rune port-forward SERVICE [LOCAL:]PORT`.
    #[command(name = "port-forward")]
    PortForward {
        /// Service name.
        service: String,
        /// `PORT` or `LOCAL:PORT`; PORT is a service port by number or name, LOCAL 0 picks one.
        #[arg(required = true)]
        ports: Vec<String>,
        /// Local address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        address: String,
    },
    /// Volumes of container services: `list`, `delete NAME`. They outlive their services.
    Volume {
        /// What to do.
        #[command(subcommand)]
        action: VolumeCmd,
    },
    /// Network policy: `explain FROM TO [PORT]` and the data plane's `status`.
    Policy {
        /// What to do.
        #[command(subcommand)]
        action: PolicyCmd,
    },
    /// Operator tools.
    Admin {
        /// What to do.
        #[command(subcommand)]
        action: AdminCmd,
    },
}

/// `rune release ...`.
#[derive(Debug, Subcommand)]
pub enum ReleaseCmd {
    /// Releases, their runeset version and revision.
    #[command(alias = "ls")]
    List {
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// What a release cast and how it is doing.
    Status {
        /// Release name.
        name: String,
    },
    /// Delete a release and every service, configmap and secret it cast; volumes are kept
    /// unless asked.
    #[command(alias = "rm")]
    Delete {
        /// Release name.
        name: String,
        /// Also delete the volumes of its services once their containers are gone.
        #[arg(long)]
        delete_volumes: bool,
        /// Delete even when services outside the release depend on its services.
        #[arg(short, long)]
        force: bool,
        /// How long to wait for the containers to let go of the volumes.
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

/// `rune volume ...`.
#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// Volumes, what asked for them, their size and use.
    #[command(alias = "ls")]
    List {
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// Delete a volume and its data; refused while a container uses it.
    #[command(alias = "rm")]
    Delete {
        /// As `rune volume list` names it.
        name: String,
    },
}

/// How a runeset's values are chosen (ignored for plain castfiles).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunesetArgs {
    /// A values file; repeatable, later files win.
    #[arg(short = 'f', long = "values")]
    pub values: Vec<PathBuf>,
    /// A value, `a.b=v`; repeatable, wins over files.
    #[arg(long = "set")]
    pub set: Vec<String>,
    /// The release name (default: the runeset's name).
    #[arg(long)]
    pub release: Option<String>,
    /// Let the release take over resources that exist outside any release (cast before
    /// releases were recorded, or by hand); deleting the release then deletes them.
    #[arg(long)]
    pub adopt: bool,
}

/// `rune policy ...`.
#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Whether a flow is allowed, and by which rule (or the default).
    Explain {
        /// A service (`name`, `ns/name`, `name.ns`) or an address.
        from: String,
        /// A service.
        to: String,
        /// A service port, as reached through the VIP (straight to an instance, a rule opens
        /// its `targetPort` instead); default: each of its TCP ports.
        port: Option<u16>,
    },
    /// Whether the kernel enforces policy, and the data plane's lag.
    Status,
}

/// `rune config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Create or update a context; `--token`, `--token-file` and `-n` set its token and namespace.
    SetContext {
        /// Context name.
        name: String,
        /// Server address (host:port).
        #[arg(long)]
        server: Option<String>,
    },
    /// Make a context current.
    UseContext {
        /// Context name.
        name: String,
    },
    /// Show the config, tokens masked.
    View,
    /// List contexts.
    ListContexts,
    /// Remove a context.
    DeleteContext {
        /// Context name.
        name: String,
    },
}

/// `rune admin ...`.
#[derive(Debug, Subcommand)]
pub enum AdminCmd {
    /// Read the log of a stopped runed (or a copy of its data dir), entry by entry.
    Replay(replay::ReplayArgs),
    /// Mint the first (root) token; from loopback, on a server without live tokens.
    Bootstrap {
        /// Write the token to this file (mode 0600) instead of printing it.
        #[arg(long)]
        out_file: Option<PathBuf>,
    },
    /// Users.
    User {
        /// What to do.
        #[command(subcommand)]
        action: identity::UserCmd,
    },
    /// Policies.
    Policy {
        /// What to do.
        #[command(subcommand)]
        action: identity::PolicyCmd,
    },
    /// Tokens.
    Token {
        /// What to do.
        #[command(subcommand)]
        action: identity::TokenCmd,
    },
    /// Write a consistent backup of the state while runed keeps serving (`runed restore`
    /// builds a data dir from it). It holds secrets sealed, never the KEK: keep that apart.
    Backup {
        /// The file to write (written whole or not at all).
        #[arg(long)]
        out: PathBuf,
    },
    /// Re-wrap every secret's data key under a new KEK, without downtime.
    RotateKek {
        /// File holding the new KEK (base64 of 32 bytes).
        #[arg(long)]
        new_kek_file: PathBuf,
    },
    /// The raft cluster behind the log.
    Cluster {
        /// What to do.
        #[command(subcommand)]
        action: ClusterCmd,
    },
}

/// `rune admin cluster ...`.
#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// This node's role, term and leader, how far its log is written, committed and applied,
    /// and the members (`-o json` for scripts).
    Status,
    /// A token that lets a new node join: `runed --join <member's raft address>
    /// --join-token-file <file> --raft-listen ...` on it. It carries the cluster CA's
    /// certificate and an API token of yours (revoke it with `rune admin token revoke`).
    JoinToken {
        /// How long it admits nodes (default 24h).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
        /// Write it to this file (mode 0600, must not exist) instead of printing it.
        #[arg(long)]
        out_file: Option<PathBuf>,
    },
    /// Takes a node out of the cluster (its raft id, from `status`); the leader makes the
    /// change, whichever member is asked. The last voter cannot be removed.
    Remove {
        /// The node's raft id.
        node: u64,
    },
}

/// Attaches the bearer token to every call.
#[derive(Clone)]
pub struct Auth(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("authorization", t.clone());
        }
        Ok(req)
    }
}

pub(crate) type Chan = InterceptedService<Channel, Auth>;

/// Connection settings resolved from flags, environment and context.
pub struct Conn {
    server: String,
    /// The local admin socket to use instead of `server` (admin commands, same host).
    socket: Option<PathBuf>,
    token: Option<String>,
    tls_ca: Option<PathBuf>,
    /// The namespace the command acts in.
    pub namespace: String,
    /// Whether the user named a namespace.
    pub namespace_given: bool,
}

impl Conn {
    fn resolve(cli: &Cli) -> Result<Self, CliError> {
        let cfg = context::load()?;
        let ctx = cfg.current().cloned().unwrap_or_default();
        let raw = cli
            .api_server
            .clone()
            .or(ctx.server)
            .unwrap_or_else(|| "localhost:7863".into());
        let mut server = raw
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_string();
        if !server.contains(':') {
            server.push_str(":7863");
        }
        let token = match (&cli.token, &cli.token_file, ctx.token, ctx.token_file) {
            (Some(t), _, _, _) => Some(t.clone()),
            (None, Some(f), _, _) => Some(read_token(f)?),
            (None, None, Some(t), _) => Some(t),
            (None, None, None, Some(f)) => Some(read_token(&PathBuf::from(f))?),
            _ => None,
        };
        let tls_ca = cli.tls_ca.clone().or(ctx.tls_ca.map(PathBuf::from));
        let namespace_given = cli.namespace.is_some();
        let namespace = cli
            .namespace
            .clone()
            .or(ctx.namespace)
            .unwrap_or_else(|| "default".into());
        Ok(Self {
            server,
            socket: None,
            token,
            tls_ca,
            namespace,
            namespace_given,
        })
    }

    /// [`Conn::resolve`] for `rune admin`: through the local admin socket when the runed
    /// behind it is the one the server address names (this host, the same port), so admin
    /// works when gRPC listens on a private interface only, and root recovers without a token.
    async fn resolve_admin(cli: &Cli) -> Result<Self, CliError> {
        let mut c = Self::resolve(cli)?;
        let path = cli
            .admin_socket
            .clone()
            .unwrap_or_else(|| crate::config::default_run_dir().join("admin.sock"));
        let port = c.server.rsplit_once(':').and_then(|(_, p)| p.parse::<u32>().ok());
        if is_this_host(&c.server) && std::os::unix::net::UnixStream::connect(&path).is_ok() {
            let mut probe = Conn::direct(&c.server, c.token.clone(), None);
            probe.socket = Some(path.clone());
            let serves = async {
                let mut sys = pb::system_api_client::SystemApiClient::new(probe.channel().await.ok()?);
                let v = sys.version(pb::VersionRequest {}).await.ok()?.into_inner();
                Some(Some(v.grpc_port) == port)
            };
            if tokio::time::timeout(Duration::from_secs(3), serves).await == Ok(Some(true)) {
                c.socket = Some(path);
            }
        }
        Ok(c)
    }

    async fn channel(&self) -> Result<Chan, CliError> {
        let token = match &self.token {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| CliError::usage("the token contains characters that cannot be sent"))?,
            ),
            None => None,
        };
        if let Some(path) = &self.socket {
            let path = path.clone();
            let ch = tonic::transport::Endpoint::from_static("http://admin.sock")
                .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                    let path = path.clone();
                    async move {
                        let s = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                    }
                }))
                .await
                .map_err(|e| CliError::generic(format!("cannot reach runed's admin socket: {e}")))?;
            return Ok(InterceptedService::new(ch, Auth(token)));
        }
        let scheme = if self.tls_ca.is_some() { "https" } else { "http" };
        let mut endpoint = Channel::from_shared(format!("{scheme}://{}", self.server))
            .map_err(|e| CliError::usage(format!("--api-server {}: {e}", self.server)))?
            .connect_timeout(Duration::from_secs(5));
        if let Some(ca) = &self.tls_ca {
            let pem =
                std::fs::read(ca).map_err(|e| CliError::usage(format!("--tls-ca {}: {e}", ca.display())))?;
            let host = self
                .server
                .rsplit_once(':')
                .map_or(self.server.as_str(), |(h, _)| h);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(pem))
                .domain_name(host.to_string());
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| CliError::usage(format!("--tls-ca {}: {e}", ca.display())))?;
        }
        let ch = endpoint.connect().await.map_err(|e| {
            let chain = error_chain(&e);
            if self.tls_ca.is_some() && chain.contains("InvalidContentType") {
                CliError::generic(format!(
                    "runed at {} does not speak TLS: drop --tls-ca (and RUNE_TLS_CA)",
                    self.server
                ))
            } else {
                CliError::generic(format!("cannot reach runed at {}: {chain}", self.server))
            }
        })?;
        Ok(InterceptedService::new(ch, Auth(token)))
    }

    fn status(&self, s: tonic::Status) -> CliError {
        // A plaintext client at a TLS listener sees only a transport failure: say what it is.
        let transport = matches!(
            s.code(),
            tonic::Code::Unknown | tonic::Code::Internal | tonic::Code::Unavailable
        );
        if transport && self.tls_ca.is_none() && self.socket.is_none() && speaks_tls(&self.server) {
            return CliError::generic(format!(
                "runed at {} speaks TLS: pass --tls-ca FILE (or RUNE_TLS_CA, or `rune login --tls-ca`) with the CA that signed its certificate",
                self.server
            ));
        }
        CliError::from_status(s, &self.server)
    }

    /// The server address, as `host:port`.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// A connection to a given server with a given token, ignoring contexts (for `rune login`).
    fn direct(server: &str, token: Option<String>, tls_ca: Option<PathBuf>) -> Self {
        Self {
            server: server.to_string(),
            socket: None,
            token,
            tls_ca,
            namespace: "default".into(),
            namespace_given: false,
        }
    }
}

/// An error and its causes, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(&format!(": {c}"));
        cause = c.source();
    }
    out
}

/// Whether `server` answers a plaintext HTTP/2 preface with a TLS alert: then the client should
/// have used TLS. Only asked after a transport error, to say so.
fn speaks_tls(server: &str) -> bool {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let Some(addr) = server.to_socket_addrs().ok().and_then(|mut a| a.next()) else {
        return false;
    };
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut first = [0u8; 1];
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").is_ok()
        && s.read_exact(&mut first).is_ok()
        && first[0] == 0x15
}

/// Items per page of a chunked list (kubectl's default chunk size).
pub(crate) const PAGE: u32 = 500;

/// Every item of a chunked list: `page(token)` fetches one page and returns its items and the
/// next token; pages are read until the server says none follow.
pub(crate) async fn paged<T, Fut>(mut page: impl FnMut(String) -> Fut) -> Result<Vec<T>, tonic::Status>
where
    Fut: std::future::Future<Output = Result<(Vec<T>, String), tonic::Status>>,
{
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let (items, next) = page(token).await?;
        out.extend(items);
        if next.is_empty() {
            return Ok(out);
        }
        token = next;
    }
}

/// Whether `host:port` names this machine: `localhost`, a loopback address, or an address one
/// of its interfaces holds (binding to it succeeds only then).
fn is_this_host(server: &str) -> bool {
    use std::net::ToSocketAddrs;
    let host = server.rsplit_once(':').map_or(server, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match (host, 0).to_socket_addrs() {
        Ok(addrs) => addrs
            .into_iter()
            .any(|a| a.ip().is_loopback() || std::net::UdpSocket::bind((a.ip(), 0)).is_ok()),
        Err(_) => false,
    }
}

fn read_token(p: &PathBuf) -> Result<String, CliError> {
    std::fs::read_to_string(p)
        .map(|t| t.trim().to_string())
        .map_err(|e| CliError::usage(format!("--token-file {}: {e}", p.display())))
}

/// Runs the CLI; returns the exit code.
pub async fn run(cli: Cli) -> u8 {
    match dispatch(cli).await {
        Ok(()) => exit::OK,
        Err(e) => {
            if !e.message.is_empty() {
                eprintln!("Error: {}", e.message);
            }
            e.code
        }
    }
}

async fn dispatch(cli: Cli) -> Result<(), CliError> {
    let format = cli.output.unwrap_or_default();
    match &cli.command {
        Cmd::Cast {
            paths,
            recursive,
            create_namespace,
            dry_run,
            force,
            detach,
            wait,
            values,
            render,
        } => {
            let mode = if *render {
                "render"
            } else if *dry_run {
                "dry-run"
            } else {
                "apply"
            };
            let read = read_castfiles(paths, *recursive, values, cli.namespace.as_deref(), mode)?;
            if *render {
                let Some(r) = &read.runeset else {
                    return Err(CliError::usage(
                        "--render applies to a runeset (a directory with runeset.yaml, or a .runeset.tgz)",
                    ));
                };
                for c in &r.casts {
                    print!("{}", c.text);
                    if !c.text.ends_with('\n') {
                        println!();
                    }
                    println!("---");
                }
                return Ok(());
            }
            let conn = Conn::resolve(&cli)?;
            let opts = CastOpts {
                create_namespace: *create_namespace,
                adopt: values.adopt,
                dry_run: *dry_run,
                force: *force,
                detach: *detach,
                wait: wait.clone(),
            };
            cast(&conn, read, opts).await
        }
        Cmd::Get {
            kind,
            name,
            all_namespaces,
            watch,
            selector,
            history,
            show_values,
        } => {
            let conn = Conn::resolve(&cli)?;
            match kind.as_str() {
                "secrets" | "secret" => {
                    return identity::get(
                        &conn,
                        "secret",
                        name.as_deref(),
                        *all_namespaces,
                        *show_values,
                        *history,
                        format,
                    )
                    .await
                }
                "configmaps" | "configmap" | "configs" | "config" | "cm" => {
                    return identity::get(
                        &conn,
                        "configmap",
                        name.as_deref(),
                        *all_namespaces,
                        false,
                        *history,
                        format,
                    )
                    .await
                }
                _ => {}
            }
            let q = output::Query {
                kind: kind.clone(),
                name: name.clone(),
                all: *all_namespaces,
                watch: *watch,
                selector: selector.clone().unwrap_or_default(),
                history: *history,
                format,
            };
            get(&conn, q).await
        }
        Cmd::Delete {
            args,
            force,
            wait,
            wait_args,
        } => {
            if !wait && wait_args.timeout.is_some() {
                return Err(CliError::usage("--timeout limits --wait; add --wait"));
            }
            let conn = Conn::resolve(&cli)?;
            delete(&conn, args, *force, wait.then_some(wait_args)).await
        }
        Cmd::Scale {
            name,
            replicas,
            no_wait,
            wait,
        } => {
            let conn = Conn::resolve(&cli)?;
            instances::scale(&conn, name, *replicas, (!no_wait).then_some(wait)).await
        }
        Cmd::Stop { name, no_wait, wait } => {
            let conn = Conn::resolve(&cli)?;
            instances::scale(&conn, name, 0, (!no_wait).then_some(wait)).await
        }
        Cmd::Restart { name, no_wait, wait } => {
            let conn = Conn::resolve(&cli)?;
            instances::restart(&conn, name, (!no_wait).then_some(wait)).await
        }
        Cmd::Health { name } => instances::health(&Conn::resolve(&cli)?, name, format).await,
        Cmd::Deps { name, dot } => instances::deps(&Conn::resolve(&cli)?, name, *dot).await,
        Cmd::Logs {
            name,
            follow,
            tail,
            since,
            instance,
            timestamps,
            init_step,
        } => {
            let o = instances::LogsOpts {
                init_step: init_step.clone(),
                follow: *follow,
                tail: *tail,
                since: *since,
                instance: instance.clone(),
                timestamps: *timestamps,
            };
            instances::logs(&Conn::resolve(&cli)?, name, o).await
        }
        Cmd::Exec {
            name,
            instance,
            interactive,
            tty,
            command,
        } => {
            let conn = Conn::resolve(&cli)?;
            let code =
                instances::exec(&conn, name, instance.clone(), *interactive, *tty, command.clone()).await?;
            if code == 0 {
                Ok(())
            } else {
                // The command's own exit code, with nothing more to say.
                Err(CliError {
                    code,
                    message: String::new(),
                })
            }
        }
        Cmd::Lint {
            paths,
            recursive,
            values,
        } => lint(read_castfiles(
            paths,
            *recursive,
            values,
            cli.namespace.as_deref(),
            "dry-run",
        )?),
        Cmd::Pack { dir, out, sha256 } => pack(dir, out.as_deref(), *sha256),
        Cmd::Version { client } => version(&cli, *client).await,
        Cmd::Completion { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "rune", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Config { action } => config(&cli, action),
        Cmd::Admin {
            action: AdminCmd::Replay(args),
        } => replay::run(args, format),
        Cmd::Admin {
            action: AdminCmd::Bootstrap { out_file },
        } => identity::bootstrap(&Conn::resolve_admin(&cli).await?, out_file.as_deref()).await,
        Cmd::Admin {
            action: AdminCmd::User { action },
        } => identity::user(&Conn::resolve_admin(&cli).await?, action, format).await,
        Cmd::Admin {
            action: AdminCmd::Policy { action },
        } => identity::policy(&Conn::resolve_admin(&cli).await?, action, format).await,
        Cmd::Admin {
            action: AdminCmd::Token { action },
        } => identity::token(&Conn::resolve_admin(&cli).await?, action, format).await,
        Cmd::Admin {
            action: AdminCmd::RotateKek { new_kek_file },
        } => identity::rotate_kek(&Conn::resolve_admin(&cli).await?, new_kek_file).await,
        Cmd::Admin {
            action: AdminCmd::Backup { out },
        } => backup(&Conn::resolve_admin(&cli).await?, out).await,
        Cmd::Admin {
            action: AdminCmd::Cluster {
                action: ClusterCmd::Status,
            },
        } => cluster::status(&Conn::resolve_admin(&cli).await?, format).await,
        Cmd::Admin {
            action:
                AdminCmd::Cluster {
                    action: ClusterCmd::JoinToken { ttl, out_file },
                },
        } => cluster::join_token(&Conn::resolve_admin(&cli).await?, *ttl, out_file.as_deref()).await,
        Cmd::Admin {
            action: AdminCmd::Cluster {
                action: ClusterCmd::Remove { node },
            },
        } => cluster::remove(&Conn::resolve_admin(&cli).await?, *node, format).await,
        Cmd::PortForward {
            service,
            ports,
            address,
        } => network::port_forward(&Conn::resolve(&cli)?, service, ports, address).await,
        Cmd::Rollback {
            name,
            to_generation,
            no_wait,
            wait,
        } => {
            releases::rollback(
                &Conn::resolve(&cli)?,
                name,
                *to_generation,
                (!no_wait).then_some(wait),
            )
            .await
        }
        Cmd::Release {
            action: ReleaseCmd::List { all_namespaces },
        } => releases::list(&Conn::resolve(&cli)?, *all_namespaces, format).await,
        Cmd::Release {
            action: ReleaseCmd::Status { name },
        } => releases::status(&Conn::resolve(&cli)?, name, format).await,
        Cmd::Release {
            action:
                ReleaseCmd::Delete {
                    name,
                    delete_volumes,
                    force,
                    timeout,
                },
        } => releases::delete(&Conn::resolve(&cli)?, name, *force, *delete_volumes, *timeout).await,
        Cmd::Volume {
            action: VolumeCmd::List { all_namespaces },
        } => instances::volume_list(&Conn::resolve(&cli)?, *all_namespaces, format).await,
        Cmd::Volume {
            action: VolumeCmd::Delete { name },
        } => instances::volume_delete(&Conn::resolve(&cli)?, name).await,
        Cmd::Policy {
            action: PolicyCmd::Explain { from, to, port },
        } => network::explain(&Conn::resolve(&cli)?, from, to, *port, format).await,
        Cmd::Policy {
            action: PolicyCmd::Status,
        } => network::status(&Conn::resolve(&cli)?, format).await,
        Cmd::Whoami => identity::whoami(&Conn::resolve(&cli)?, format).await,
        Cmd::Login {
            name,
            server,
            default_namespace,
        } => {
            let current = Conn::resolve(&cli)?;
            let server = server.clone().unwrap_or_else(|| current.server().to_string());
            let token = match (&cli.token, &cli.token_file) {
                (Some(t), _) => t.clone(),
                (None, Some(f)) => read_token(f)?,
                (None, None) => return Err(CliError::usage("rune login needs --token-file F (or --token)")),
            };
            let ns = default_namespace.clone().or(cli.namespace.clone());
            let ca = cli.tls_ca.clone().or(current.tls_ca.clone());
            identity::login(name, &server, token, cli.token_file.as_deref(), ns, ca).await
        }
    }
}

/// Castfiles as read, and the runeset they were rendered from, if any.
struct Read {
    parsed: Parsed,
    runeset: Option<runeset::Rendered>,
}

fn read_castfiles(
    paths: &[String],
    recursive: bool,
    values: &RunesetArgs,
    namespace: Option<&str>,
    mode: &'static str,
) -> Result<Read, CliError> {
    if let Some(r) = paths.iter().find(|p| runeset::is_runeset(p)) {
        if paths.len() > 1 {
            return Err(CliError::usage(format!(
                "{r} is a runeset; a runeset is cast (or linted) on its own, without other paths"
            )));
        }
        let src = runeset::Source::open(r).map_err(|p| CliError::validation(p.to_string()))?;
        let opts = runeset::Options {
            values_files: values.values.clone(),
            set: values.set.clone(),
            namespace: namespace.map(str::to_string),
            release: values.release.clone(),
            mode,
        };
        let rendered = runeset::render(&src, &opts).map_err(|p| CliError::validation(p.to_string()))?;
        for k in &rendered.manifest.unknown {
            eprintln!("{r}/{}: warning: unknown key '{k}' ignored", runeset::MANIFEST);
        }
        let mut parsed = Parsed {
            default_namespace: Some(rendered.namespace.clone()),
            ..Parsed::default()
        };
        for c in &rendered.casts {
            let file = if c.lines_moved {
                format!("{} (rendered; lines as in --render)", c.file)
            } else {
                c.file.clone()
            };
            castfile::parse_text(&file, &c.text, &mut parsed);
        }
        castfile::finish(&mut parsed);
        return Ok(Read {
            parsed,
            runeset: Some(rendered),
        });
    }
    if !values.values.is_empty() || !values.set.is_empty() || values.release.is_some() || values.adopt {
        return Err(CliError::usage(
            "--values, --set, --release and --adopt apply to a runeset (a directory with runeset.yaml, or a .runeset.tgz)",
        ));
    }
    let files = castfile::expand_paths(paths, recursive).map_err(|p| CliError::usage(p.to_string()))?;
    if files.is_empty() {
        return Err(CliError::usage("no .yaml or .yml files found"));
    }
    Ok(Read {
        parsed: castfile::parse_files(&files),
        runeset: None,
    })
}

fn pack(dir: &std::path::Path, out: Option<&std::path::Path>, sha256: bool) -> Result<(), CliError> {
    let written = runeset::pack(dir, out).map_err(|p| CliError::validation(p.to_string()))?;
    println!("packed {}", written.display());
    if sha256 {
        let line = runeset::sha256_line(&written).map_err(|e| CliError::generic(e.to_string()))?;
        let sum = std::path::PathBuf::from(format!("{}.sha256", written.display()));
        std::fs::write(&sum, &line).map_err(|e| CliError::generic(format!("{}: {e}", sum.display())))?;
        println!("wrote {}", sum.display());
    }
    Ok(())
}

/// What a service's policy does that its author may not expect, one line each: a port name
/// toward a CIDR (see `rune_dataplane::policy::cidr_port_names`).
fn policy_notes(parsed: &Parsed) -> Vec<String> {
    let mut out = Vec::new();
    for l in &parsed.resources {
        let Resource::Service(s) = &l.resource else {
            continue;
        };
        let Some(np) = &s.network_policy else {
            continue;
        };
        for (field, name, cidr) in rune_dataplane::policy::cidr_port_names(np) {
            out.push(format!(
                "{}:{}: note: service {}: {field} '{name}' toward {cidr} opens the port named \
                 '{name}' of each service inside it; an address outside Rune's services is reached \
                 by port number only",
                l.file, l.line, s.name
            ));
        }
    }
    out
}

fn lint(read: Read) -> Result<(), CliError> {
    let Read { mut parsed, runeset } = read;
    if let Some(r) = &runeset {
        println!(
            "runeset {} {} renders: {} cast(s), release {}, namespace {}",
            r.manifest.name,
            r.manifest.version,
            r.casts.len(),
            r.release,
            r.namespace
        );
    }
    for f in &parsed.runefiles {
        match crate::config::check_runefile(std::path::Path::new(f)) {
            Ok(ignored) => {
                println!("{f}: valid runefile (server configuration)");
                for i in ignored {
                    println!("  warning: {i}");
                }
            }
            Err(e) => {
                for line in e.0.lines() {
                    parsed.problems.push(castfile::Problem {
                        file: String::new(),
                        line: 0,
                        message: line.to_string(),
                    });
                }
            }
        }
    }
    for n in policy_notes(&parsed) {
        println!("{n}");
    }
    for u in &parsed.unsupported {
        println!(
            "{}:{}: note: {} \"{}\" is valid castfile syntax, but this release cannot cast {}s yet",
            u.file, u.line, u.kind, u.name, u.kind
        );
    }
    if !parsed.problems.is_empty() {
        for p in &parsed.problems {
            eprintln!("{p}");
        }
        return Err(CliError::validation(format!(
            "{} problem(s) found",
            parsed.problems.len()
        )));
    }
    let n = parsed.resources.len() + parsed.secrets.len() + parsed.unsupported.len();
    if n > 0 || !parsed.skipped.is_empty() {
        println!(
            "OK: {n} resource(s) valid{}",
            if parsed.skipped.is_empty() {
                String::new()
            } else {
                format!(", {} skipped", parsed.skipped.len())
            }
        );
    }
    Ok(())
}

struct CastOpts {
    create_namespace: bool,
    adopt: bool,
    dry_run: bool,
    force: bool,
    detach: bool,
    wait: instances::WaitArgs,
}

async fn cast(conn: &Conn, read: Read, mut o: CastOpts) -> Result<(), CliError> {
    let Read { mut parsed, runeset } = read;
    // A runeset brings its namespace with it, as a chart installs into its own.
    o.create_namespace |= runeset.is_some();
    if !parsed.problems.is_empty() {
        for p in &parsed.problems {
            eprintln!("{p}");
        }
        return Err(CliError::validation(format!(
            "{} problem(s) found; nothing was cast",
            parsed.problems.len()
        )));
    }
    if let Some(f) = parsed.runefiles.first() {
        return Err(CliError::validation(format!(
            "{f} is a runefile (server configuration), not a castfile: pass it to `runed --config`"
        )));
    }
    if let Some(u) = parsed.unsupported.first() {
        return Err(CliError::validation(format!(
            "{}:{}: kind '{}' (\"{}\") cannot be cast by this release yet; nothing was cast",
            u.file, u.line, u.kind, u.name
        )));
    }
    for n in policy_notes(&parsed) {
        eprintln!("{n}");
    }
    for s in &parsed.skipped {
        println!("{s} skipped (skip: true)");
    }
    if parsed.resources.is_empty() && parsed.secrets.is_empty() {
        println!("nothing to cast");
        return Ok(());
    }
    let mut resources = Vec::new();
    for s in &mut parsed.secrets {
        if conn.namespace_given {
            s.spec.namespace = Some(conn.namespace.clone());
        }
        let json = serde_json::to_string(&s.spec).map_err(|e| CliError::generic(e.to_string()))?;
        resources.push(pb::Resource {
            kind: Some(pb::resource::Kind::SecretJson(json)),
        });
    }
    for r in &mut parsed.resources {
        let json = match &mut r.resource {
            Resource::Service(s) => {
                if conn.namespace_given {
                    s.namespace = Some(conn.namespace.clone());
                }
                pb::resource::Kind::ServiceJson(
                    serde_json::to_string(s).map_err(|e| CliError::generic(e.to_string()))?,
                )
            }
            Resource::Namespace(n) => pb::resource::Kind::NamespaceJson(
                serde_json::to_string(n).map_err(|e| CliError::generic(e.to_string()))?,
            ),
            Resource::Configmap(c) => {
                if conn.namespace_given {
                    c.namespace = conn.namespace.clone();
                }
                pb::resource::Kind::ConfigmapJson(
                    serde_json::to_string(&rune_statemachine::secret::ConfigmapSpec {
                        name: c.name.clone(),
                        namespace: Some(c.namespace.clone()),
                        data: Some(rune_statemachine::secret::DataForm::Map(
                            c.data
                                .iter()
                                .map(|(k, v)| (k.clone(), rune_statemachine::spec::Text(v.clone())))
                                .collect(),
                        )),
                        skip: None,
                    })
                    .map_err(|e| CliError::generic(e.to_string()))?,
                )
            }
            Resource::Secret(_) => continue,
        };
        resources.push(pb::Resource { kind: Some(json) });
    }
    let mut client = pb::service_api_client::ServiceApiClient::new(conn.channel().await?);
    let mut req = tonic::Request::new(pb::ApplyRequest {
        resources,
        create_namespace: o.create_namespace,
        force: o.force,
        dry_run: o.dry_run,
        release: runeset.as_ref().map(|r| pb::ReleaseSpec {
            name: r.release.clone(),
            namespace: r.namespace.clone(),
            runeset: r.manifest.name.clone(),
            version: r.manifest.version.clone(),
            description: r.manifest.description.clone(),
            values_digest: r.values_digest.clone(),
            adopt: o.adopt,
        }),
    });
    // The write itself is quick; only the rollouts after it are waited for at length.
    req.set_timeout(o.wait.timeout.unwrap_or(Duration::from_secs(300)));
    let resp = client.apply(req).await.map_err(|s| conn.status(s))?.into_inner();
    let suffix = if o.dry_run { " (dry run)" } else { "" };
    for r in &resp.results {
        let what = if r.namespace.is_empty() {
            format!("{}/{}", r.kind, r.name)
        } else {
            format!("{}/{}/{}", r.kind, r.namespace, r.name)
        };
        let action = match pb::ApplyAction::try_from(r.action).unwrap_or(pb::ApplyAction::Unspecified) {
            pb::ApplyAction::Created => format!("created (generation {})", r.generation),
            pb::ApplyAction::Configured => format!("configured (generation {})", r.generation),
            _ => "unchanged".to_string(),
        };
        println!("{what} {action}{suffix}");
    }
    if o.detach || o.dry_run {
        return Ok(());
    }
    let started = std::time::Instant::now();
    for r in resp.results.iter().filter(|r| r.kind == "service") {
        instances::wait_rollout(conn, &r.namespace, &r.name, &o.wait, started).await?;
    }
    Ok(())
}

async fn get(conn: &Conn, q: output::Query) -> Result<(), CliError> {
    output::get(conn, q).await
}

async fn delete(
    conn: &Conn,
    args: &[String],
    force: bool,
    wait: Option<&instances::WaitArgs>,
) -> Result<(), CliError> {
    let started = std::time::Instant::now();
    let (kind, name) = match args {
        [name] => ("service", name.as_str()),
        [kind, name] => (kind.as_str(), name.as_str()),
        _ => return Err(CliError::usage("usage: rune delete [service|namespace] NAME")),
    };
    if wait.is_some() && !matches!(kind, "service" | "services" | "svc") {
        return Err(CliError::usage(format!(
            "--wait waits for a service's instances; a {kind} has none"
        )));
    }
    let ch = conn.channel().await?;
    match kind {
        "service" | "services" | "svc" => {
            let mut c = pb::service_api_client::ServiceApiClient::new(ch);
            c.delete_service(pb::DeleteServiceRequest {
                namespace: conn.namespace.clone(),
                name: name.into(),
                force,
            })
            .await
            .map_err(|s| conn.status(s))?;
            println!("service/{}/{name} deleted", conn.namespace);
            if let Some(w) = wait {
                instances::wait_gone(conn, &conn.namespace, name, w, started).await?;
            }
        }
        "secret" | "secrets" => return identity::delete(conn, "secret", name, force).await,
        "configmap" | "configmaps" | "config" | "cm" => {
            return identity::delete(conn, "configmap", name, force).await
        }
        "namespace" | "namespaces" | "ns" => {
            let mut c = pb::namespace_api_client::NamespaceApiClient::new(ch);
            c.delete_namespace(pb::DeleteNamespaceRequest { name: name.into() })
                .await
                .map_err(|s| conn.status(s))?;
            println!("namespace/{name} deleted");
        }
        other => {
            return Err(CliError::usage(format!(
                "cannot delete '{other}': use service, secret, configmap or namespace"
            )))
        }
    }
    Ok(())
}

async fn version(cli: &Cli, client_only: bool) -> Result<(), CliError> {
    println!("rune {}", env!("CARGO_PKG_VERSION"));
    if client_only {
        return Ok(());
    }
    let conn = Conn::resolve(cli)?;
    let mut c = pb::system_api_client::SystemApiClient::new(conn.channel().await?);
    let v = c
        .version(pb::VersionRequest {})
        .await
        .map_err(|s| conn.status(s))?
        .into_inner();
    println!(
        "runed {} at {} (term {}, applied index {})",
        v.version, conn.server, v.term, v.applied_index
    );
    Ok(())
}

fn mask(t: &str) -> String {
    if t.chars().count() <= 8 {
        "****".into()
    } else {
        format!("{}****", t.chars().take(4).collect::<String>())
    }
}

fn config(cli: &Cli, action: &ConfigCmd) -> Result<(), CliError> {
    let mut cfg = context::load()?;
    match action {
        ConfigCmd::SetContext { name, server } => {
            let c = cfg.contexts.entry(name.clone()).or_default();
            if let Some(s) = server.clone().or(cli.api_server.clone()) {
                c.server = Some(s);
            }
            if cli.token.is_some() {
                c.token = cli.token.clone();
            }
            if let Some(f) = &cli.token_file {
                c.token_file = Some(f.display().to_string());
            }
            if cli.namespace.is_some() {
                c.namespace = cli.namespace.clone();
            }
            if cfg.current_context.is_none() {
                cfg.current_context = Some(name.clone());
            }
            context::save(&cfg)?;
            println!("context {name} saved to {}", context::path().display());
        }
        ConfigCmd::UseContext { name } => {
            if !cfg.contexts.contains_key(name) {
                return Err(CliError {
                    code: exit::NOT_FOUND,
                    message: format!("context {name} not found"),
                });
            }
            cfg.current_context = Some(name.clone());
            context::save(&cfg)?;
            println!("switched to context {name}");
        }
        ConfigCmd::View => {
            for c in cfg.contexts.values_mut() {
                if let Some(t) = &c.token {
                    c.token = Some(mask(t));
                }
            }
            print!(
                "{}",
                crate::yaml::emit(&serde_json::to_value(&cfg).map_err(|e| CliError::generic(e.to_string()))?)
            );
        }
        ConfigCmd::ListContexts => {
            let mut rows = vec![vec![
                "CURRENT".to_string(),
                "NAME".into(),
                "SERVER".into(),
                "NAMESPACE".into(),
            ]];
            for (n, c) in &cfg.contexts {
                let cur = if cfg.current_context.as_deref() == Some(n) {
                    "*"
                } else {
                    ""
                };
                rows.push(vec![
                    cur.into(),
                    n.clone(),
                    c.server.clone().unwrap_or_default(),
                    c.namespace.clone().unwrap_or_default(),
                ]);
            }
            output::print_table(&rows);
        }
        ConfigCmd::DeleteContext { name } => {
            if cfg.contexts.remove(name).is_none() {
                return Err(CliError {
                    code: exit::NOT_FOUND,
                    message: format!("context {name} not found"),
                });
            }
            if cfg.current_context.as_deref() == Some(name) {
                cfg.current_context = None;
            }
            context::save(&cfg)?;
            println!("context {name} deleted");
        }
    }
    Ok(())
}

/// `rune admin backup --out FILE`: streams the backup into `FILE.partial`, checks it whole
/// (count and digest), then renames it into place; progress on a terminal.
async fn backup(conn: &Conn, out: &std::path::Path) -> Result<(), CliError> {
    use std::io::Write;
    let started = std::time::Instant::now();
    let mut c = pb::admin_api_client::AdminApiClient::new(conn.channel().await?);
    let mut stream = c
        .backup(pb::BackupRequest {})
        .await
        .map_err(|s| conn.status(s))?
        .into_inner();
    let tmp = out.with_extension("partial");
    let fail = |e: std::io::Error| CliError::generic(format!("{}: {e}", tmp.display()));
    // It holds every object (secrets sealed): readable by its owner only.
    let _ = std::fs::remove_file(&tmp);
    let mut f = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(fail)?
    };
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (mut index, mut total, mut written) = (0u64, 0u64, 0u64);
    let received = async {
        while let Some(chunk) = stream.message().await.map_err(|s| conn.status(s))? {
            if index == 0 {
                (index, total) = (chunk.index, chunk.total_bytes);
            }
            f.write_all(&chunk.data).map_err(fail)?;
            written += chunk.data.len() as u64;
            if tty {
                let pct = (written * 100).checked_div(total).unwrap_or(0).min(100);
                eprint!(
                    "\rbackup of index {index}: {} of about {} ({pct}%)   ",
                    rune_log::space::human(written),
                    rune_log::space::human(total)
                );
            }
        }
        f.sync_all().map_err(fail)
    }
    .await;
    if tty {
        eprintln!();
    }
    let checked = received.and_then(|()| {
        rune_log::backup::verify(&tmp)
            .map_err(|e| CliError::generic(format!("the backup did not arrive whole: {e}")))
    });
    let header = match checked {
        Ok(h) => h,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, out).map_err(|e| CliError::generic(format!("{}: {e}", out.display())))?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "backup of index {} ({} records, {}) written to {} in {secs:.1} s; it holds secrets sealed, never the KEK",
        header.index,
        header.records,
        rune_log::space::human(written),
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn masked_tokens_keep_four_characters_whatever_their_bytes() {
        assert_eq!(super::mask("short"), "****");
        assert_eq!(super::mask("rune_0123456789"), "rune****");
        // A multi-byte character across byte 4 is kept whole, not split.
        assert_eq!(super::mask("abcé12345"), "abcé****");
    }
}
