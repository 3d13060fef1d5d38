//! `runed`'s life, as a sequence of steps: bind, open the log and seed it, check the KEK, start
//! the projections and the orchestrator, serve, tell systemd it is ready and keep its watchdog
//! fed while the loops that matter make progress; on SIGTERM/SIGINT drain, stop and flush; when
//! the log fails for good (a full disk), exit so that the service manager restarts it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::http::StatusCode;
use rune_log::{Log, LogConfig};
use rune_statemachine::identity::{builtin_policies, normalize_policy, PolicyRecord};
use rune_statemachine::store::{get_record, namespace_key, policy_key, NamespaceRecord, RESERVED_NAMESPACES};
use rune_statemachine::{Command, STATE_TABLE};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

use crate::api::Api;
use crate::config::{LogFormat, Settings};
use crate::health::Health;
use crate::sealing::Secrets;
use crate::serve::{Listeners, Servers};
use crate::systemd;

/// Exit code for a configuration runed cannot run with (runefile, flags, TLS files, KEK):
/// EX_CONFIG. The unit's `RestartPreventExitStatus=` keeps systemd from restarting into it.
pub const EXIT_CONFIG: u8 = 78;
/// Exit code when the log stopped for good (a storage failure such as a full disk): EX_IOERR.
/// systemd restarts runed, and the restart recovers everything acknowledged from the log.
pub const EXIT_STORAGE: u8 = 74;

/// The log stopped on its own: runed cannot write any more and exits.
#[derive(Debug, thiserror::Error)]
#[error("the log stopped ({0}); runed exits so that its service manager restarts it")]
pub struct LogFailed(pub String);

/// The process exit code for an error of [`run`].
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<crate::sealing::KekProblem>().is_some()
        || e.downcast_ref::<crate::config::ConfigError>().is_some()
        || e.downcast_ref::<crate::tls::TlsError>().is_some()
    {
        EXIT_CONFIG
    } else if e.downcast_ref::<LogFailed>().is_some() {
        EXIT_STORAGE
    } else {
        1
    }
}

/// Installs the tracing subscriber: text or JSON on stdout; under systemd, when stdout is the
/// journal, text goes to the journal natively (priorities and `RUNE_*` fields) and JSON lines get
/// sd-daemon priority prefixes, so `journalctl -p err` shows exactly the errors.
pub fn init_logging(s: &Settings) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!(
            // hickory logs every query at info and every odd packet at warn: per-packet
            // lines would cost more than the answers and let anyone flood the journal.
            "{},openraft=warn,opentelemetry=warn,opentelemetry_sdk=warn,hickory_server=error,hickory_proto=error,hickory_net=error,hickory_resolver=error",
            s.log_level
        ))
    });
    let journal = crate::systemd::stdout_is_journal();
    let ansi = !journal && std::io::IsTerminal::is_terminal(&std::io::stdout());
    match (s.log_format, journal) {
        (LogFormat::Text, true) => tracing_subscriber::registry()
            .with(filter)
            .with(crate::systemd::JournalLayer)
            .init(),
        (LogFormat::Json, true) => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(crate::systemd::PrefixedStdout)
            .with_ansi(false)
            .json()
            .flatten_event(true)
            .init(),
        (LogFormat::Json, false) => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stdout)
            .with_ansi(ansi)
            .json()
            .flatten_event(true)
            .init(),
        (LogFormat::Text, false) => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stdout)
            .with_ansi(ansi)
            .init(),
    }
}

/// What the failpoints reach.
#[derive(Clone)]
struct Failpoints {
    log: Arc<Log>,
    dns: Arc<rune_dns::Dns>,
    data_path: Arc<dyn rune_dns::DataPath>,
    projections: Vec<Arc<rune_log::projection::Projection>>,
}

/// Test hooks: `POST /debug/failpoints/<projection>-tail-pause/on|off` (dns, dataplane,
/// ingress, orchestrator) and `dns-data-path-ready/on|off`. Only with `--enable-failpoints`.
async fn failpoint(
    axum::extract::State(fp): axum::extract::State<Failpoints>,
    axum::extract::Path((name, state)): axum::extract::Path<(String, String)>,
) -> (StatusCode, String) {
    let on = match state.as_str() {
        "on" => true,
        "off" => false,
        other => {
            return (
                StatusCode::BAD_REQUEST,
                format!("state '{other}' is not on or off\n"),
            )
        }
    };
    if name == "dns-data-path-ready" {
        fp.dns.set_data_path(on.then(|| fp.data_path.clone()));
    } else if let Some(p) = name
        .strip_suffix("-tail-pause")
        .and_then(|n| fp.projections.iter().find(|p| p.name() == n))
    {
        p.pause(on);
    } else {
        return (StatusCode::NOT_FOUND, format!("no failpoint {name}\n"));
    }
    tracing::warn!(failpoint = %name, on, "failpoint set");
    (StatusCode::OK, format!("{name} {state}\n"))
}

/// Test hook: `POST /debug/failpoints/corrupt-service/<ns>/<name>` makes that service's stored
/// record unreadable, as damage at rest would, and has the projections read the state again.
async fn corrupt_service(
    axum::extract::State(fp): axum::extract::State<Failpoints>,
    axum::extract::Path((ns, name)): axum::extract::Path<(String, String)>,
) -> (StatusCode, String) {
    let key = rune_statemachine::store::service_key(&ns, &name);
    match fp.log.corrupt_record_for_tests(&key) {
        Ok(()) => {
            tracing::warn!(failpoint = "corrupt-service", %key, "failpoint set: record corrupted");
            (StatusCode::OK, format!("{key} corrupted\n"))
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

async fn bind(what: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for {what} on {addr}"))
}

/// A clustered node's own ports: raft, and the gateway other nodes reach its instances by.
struct ClusterPorts {
    raft: TcpListener,
    gateway: TcpListener,
}

/// Binds every listener before anything changes, so a taken port fails fast (the raft port
/// and the gateway, in a cluster, beside the others).
async fn bind_all(s: &Settings) -> anyhow::Result<(Listeners, Option<ClusterPorts>)> {
    let cluster = match &s.cluster {
        Some(c) => Some(ClusterPorts {
            raft: bind("raft (cluster.raft-listen)", c.listen).await?,
            gateway: bind("the node gateway (cluster.gateway-listen)", c.gateway_listen).await?,
        }),
        None => None,
    };
    let grpc = bind("gRPC", s.grpc_addr).await?;
    let http = bind("HTTP", s.http_addr).await?;
    let metrics = match s.metrics_addr {
        Some(a) => Some(bind("metrics", a).await?),
        None => None,
    };
    let admin = match &s.admin_socket {
        Some(p) => crate::serve::bind_admin_socket(p)?.map(|l| (l, p.clone())),
        None => None,
    };
    let listeners = Listeners {
        grpc,
        http,
        metrics,
        admin,
    };
    Ok((listeners, cluster))
}

/// TLS material, read (or, in dev mode, generated) before anything else changes.
fn load_tls(s: &Settings) -> anyhow::Result<Option<crate::tls::TlsMaterial>> {
    let files = match &s.tls {
        crate::config::TlsSetting::Off => return Ok(None),
        crate::config::TlsSetting::Files(f) => f.clone(),
        crate::config::TlsSetting::DevSelfSigned => crate::tls::dev_pair(&s.data_dir.join("tls"))?,
    };
    let (cert, key) = crate::tls::read_pem(&files)?;
    tracing::info!(cert = %files.cert.display(), "serving gRPC and HTTP over TLS");
    Ok(Some(crate::tls::TlsMaterial { files, cert, key }))
}

async fn start_dns(s: &Settings, log: &Arc<Log>) -> anyhow::Result<Arc<rune_dns::Dns>> {
    let mut cfg = s.dns();
    cfg.cluster_cidr = {
        let txn = log.read()?;
        let t = txn.open_table(STATE_TABLE).context("opening the state table")?;
        rune_statemachine::store::cluster_network(&t)?.map(|c| (std::net::Ipv4Addr::from(c.base), c.prefix))
    };
    match rune_dns::Dns::start(log.clone(), cfg.clone()).await {
        // Port 53 needs root; a developer's runed on the default address moves to 5353.
        Err(rune_dns::DnsError::Bind(_, e))
            if s.dns_addr_default && e.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            let addr = SocketAddr::new(s.dns_addr.ip(), 5353);
            tracing::warn!(%addr, "no privilege for port 53; the DNS listens on 5353 (set networking.dns-addr)");
            rune_dns::Dns::start(log.clone(), rune_dns::DnsConfig { addr, ..cfg })
                .await
                .context("networking.dns-addr")
        }
        other => other.context("networking.dns-addr"),
    }
}

async fn start_dataplane(s: &Settings, log: &Arc<Log>) -> anyhow::Result<Arc<rune_dataplane::DataPlane>> {
    let dp = rune_dataplane::DataPlane::start(log.clone(), s.dataplane())
        .await
        .context("data plane")?;
    let kernel = dp.kernel_status();
    if s.nftables && !kernel.enforcing {
        tracing::warn!(status = %kernel.detail, "kernel policy enforcement is off");
    }
    Ok(dp)
}

async fn start_ingress(
    s: &Settings,
    log: &Arc<Log>,
    secrets: &Arc<crate::sealing::Secrets>,
    dataplane: &Arc<rune_dataplane::DataPlane>,
) -> anyhow::Result<Option<Arc<rune_ingress::Ingress>>> {
    let Some((http, https)) = s.ingress else {
        return Ok(None);
    };
    let cfg = rune_ingress::IngressConfig {
        http,
        https,
        acme: s.acme.clone(),
        vault: Arc::new(crate::sealing::CertVault {
            log: log.clone(),
            secrets: secrets.clone(),
        }),
        stale_budget: s.stale_budget,
        workers: 0,
        remote: s.cluster.as_ref().map(|_| {
            let through: Arc<dyn rune_ingress::Remote> = Arc::new(ThroughGateways(dataplane.clone()));
            (s.node_name.clone(), through)
        }),
        timeouts: s.ingress_timeouts,
        max_connections: s.ingress_max_connections,
    };
    rune_ingress::Ingress::start(log.clone(), cfg)
        .await
        .map(Some)
        .context(
            "ingress (--ingress-http-addr, --ingress-https-addr; --node-role='' turns the edge role off)",
        )
}

async fn start_orchestrator(
    s: &Settings,
    log: &Arc<Log>,
    secrets: &Arc<crate::sealing::Secrets>,
    cluster: &str,
    follows_placement: bool,
    routers: Vec<Arc<rune_log::projection::Projection>>,
) -> Arc<rune_orchestrator::Orchestrator> {
    let mut c = s.orchestrator(cluster);
    c.follows_placement = follows_placement;
    c.routers = routers;
    c.secrets = Some(Arc::new(crate::sealing::SecretOpener(secrets.clone())));
    // The small writer installed beside runed, else runed itself (`runed __log-writer`).
    c.log_writer = std::env::current_exe().ok().map(|exe| {
        let small = exe.with_file_name("rune-log-writer");
        if small.is_file() {
            small
        } else {
            exe
        }
    });
    rune_orchestrator::Orchestrator::start(log.clone(), c, s.stale_budget).await
}

/// Containers reach the DNS on their network's gateway, once the network exists; in dev mode
/// the data plane serves service ports there too.
fn serve_containers(
    dns: &Arc<rune_dns::Dns>,
    dataplane: &Arc<rune_dataplane::DataPlane>,
    orchestrator: &rune_orchestrator::Orchestrator,
) {
    let (dns, dataplane, mut gw) = (dns.clone(), dataplane.clone(), orchestrator.container_gateway());
    tokio::spawn(async move {
        let mut served = None;
        loop {
            let now = gw.borrow_and_update().clone();
            if let Some(ip) = now.filter(|g| Some(g) != served.as_ref()) {
                match ip.parse::<std::net::IpAddr>() {
                    Ok(addr) => match dns.listen_also(SocketAddr::new(addr, 53)).await {
                        Ok(()) => {
                            dataplane.serve_containers_at(addr).await;
                            served = Some(ip);
                        }
                        Err(e) => tracing::warn!(error = %e, "containers cannot reach the DNS"),
                    },
                    Err(_) => {
                        tracing::warn!(gateway = %ip, "the container network's gateway is not an address")
                    }
                }
            }
            if gw.changed().await.is_err() {
                return;
            }
        }
    });
}

/// Feeds systemd's watchdog (`WatchdogSec=`) while the log applies and the orchestrator
/// reconciles; withholds it otherwise, so a wedged runed is restarted. A stopped process
/// (SIGSTOP) sends nothing at all and is restarted the same way.
fn feed_watchdog(health: Arc<Health>) {
    let Some(timeout) = systemd::watchdog_interval() else {
        return;
    };
    tracing::info!(timeout_s = timeout.as_secs_f64(), "systemd watchdog on");
    tokio::spawn(async move {
        let mut withheld = false;
        loop {
            match health.alive() {
                Ok(()) => {
                    systemd::watchdog_ping();
                    if std::mem::take(&mut withheld) {
                        tracing::warn!("watchdog fed again");
                        if !health.shutting_down() {
                            systemd::status("serving");
                        }
                    }
                }
                Err(why) if !withheld => {
                    tracing::error!(reason = %why, "not feeding the watchdog: systemd restarts runed unless this recovers");
                    systemd::status(&format!("watchdog withheld: {why}"));
                    withheld = true;
                }
                Err(_) => {}
            }
            tokio::time::sleep(timeout / 3).await;
        }
    });
}

/// Keeps `systemctl status`'s status line current while runed serves.
fn report_status(log: Arc<Log>, health: Arc<Health>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            if health.shutting_down() {
                return;
            }
            let (term, last, applied) = log.positions();
            systemd::status(&format!(
                "serving: applied index {applied} of {last} (term {term}), {} free on the data dir",
                rune_log::space::human(log.space().free())
            ));
        }
    });
}

/// The log as runed started it: in a cluster with its raft port and the admission of joining
/// nodes; with the room its data dir has for writes at this start.
struct Started {
    log: Arc<Log>,
    room: bool,
    raft: Option<Raft>,
}

/// This node's part in a cluster.
struct Raft {
    port: rune_log::network::RaftPort,
    admission: Arc<crate::cluster::JoinAdmission>,
    /// The CA's certificate, for join tokens.
    ca_pem: String,
    /// This node's raft id.
    node: u64,
    /// The key of the cluster's node gateways: derived from the CA's key, which every
    /// member holds and nothing else does.
    gateway_key: rune_dataplane::gateway::GatewayKey,
}

/// The log, seeded; in a cluster (`cluster.raft-listen`), with this node's raft identity
/// (founded, joined, or kept from an earlier start) and its raft port served.
async fn start_log(s: &Settings, raft_listener: Option<TcpListener>) -> anyhow::Result<Started> {
    systemd::status("opening the log");
    let member = match &s.cluster {
        Some(c) => Some(crate::cluster::member(s, c).await?),
        None => {
            crate::cluster::refuse_member_dir(&s.data_dir)?;
            None
        }
    };
    let mut cfg = LogConfig {
        snapshot_every: s.snapshot_every,
        keep_after_snapshot: s.keep_after_snapshot,
        reserve_bytes: s.storage_reserve,
        ..LogConfig::new(&s.data_dir)
    };
    if let (Some(c), Some(m)) = (&s.cluster, &member) {
        cfg.node_id = m.tls.node;
        cfg.address = c.advertise.clone();
        // Node 1 founds; any other id was granted by a cluster, and must never found one of its
        // own (a restart without --join before it received the log would fork the cluster).
        cfg.join = c.join.is_some() || m.tls.node != rune_log::types::NODE_ID;
        cfg.tls = Some(m.tls.clone());
    }
    let log = Arc::new(Log::open(cfg).await.context("opening the log")?);
    let raft = match (member, raft_listener, &s.cluster) {
        (Some(m), Some(listener), Some(c)) => {
            let admission = Arc::new(crate::cluster::JoinAdmission::new(log.clone()));
            let ca_pem = m.ca.cert_pem().to_string();
            let gateway_key = {
                use sha2::Digest;
                let mut h = sha2::Sha256::new();
                h.update(b"rune node gateway v1\n");
                h.update(m.ca.key_pem().as_bytes());
                h.finalize().into()
            };
            let joins = rune_log::join::Joins::new(admission.clone(), m.ca);
            let port = log
                .serve_raft(listener, Some(joins))
                .context("cluster.raft-listen")?;
            tracing::info!(node = m.tls.node, listen = %c.listen, advertise = %c.advertise, "serving the raft port");
            Some(Raft {
                port,
                admission,
                ca_pem,
                node: m.tls.node,
                gateway_key,
            })
        }
        _ => None,
    };
    // Below the reserve, writes at start would fail: runed starts anyway (reads, running
    // services and deletes work) and does them at its next start.
    let room = log.space().check(log.space().need(true));
    match &room {
        Ok(()) => {
            let founder = raft.as_ref().is_none_or(|r| r.node == rune_log::types::NODE_ID);
            seed(&log, &s.cluster_cidr, raft.is_some(), founder).await?
        }
        Err(e) => {
            tracing::warn!(error = %e, "not seeding the reserved namespaces and policies at this start")
        }
    }
    Ok(Started {
        log,
        room: room.is_ok(),
        raft,
    })
}

/// The KEKs, checked against every sealed secret, and a rotation an earlier runed left
/// half-done finished. A problem closes the log cleanly (nothing was changed) and refuses.
async fn start_secrets(s: &Settings, log: &Arc<Log>, room: bool) -> anyhow::Result<Arc<Secrets>> {
    systemd::status("checking the KEK");
    let secrets = match Secrets::load(log, s.kek_source.clone(), s.secret_limits) {
        Ok(x) => Arc::new(x),
        Err(e) => {
            let _ = log.shutdown().await;
            return Err(anyhow::Error::new(e));
        }
    };
    if room {
        if let Err(e) = secrets.finish_pending_rotation(log).await {
            let _ = log.shutdown().await;
            return Err(anyhow::Error::new(e));
        }
    }
    Ok(secrets)
}

/// The DNS's question to the data plane: is this VIP carried?
struct Carried(Arc<rune_dataplane::DataPlane>);

/// The ingress reaches instances on other nodes through the data plane's node gateways.
struct ThroughGateways(Arc<rune_dataplane::DataPlane>);

impl rune_ingress::Remote for ThroughGateways {
    fn dial(
        &self,
        namespace: &str,
        service: &str,
        instance: &str,
        port: u16,
    ) -> rune_ingress::BoxFuture<std::io::Result<tokio::net::TcpStream>> {
        let dp = self.0.clone();
        let (ns, svc, id) = (namespace.to_string(), service.to_string(), instance.to_string());
        Box::pin(async move { dp.dial_instance(&ns, &svc, &id, port).await })
    }
}

impl rune_dns::DataPath for Carried {
    fn carries(&self, vip: std::net::Ipv4Addr) -> bool {
        self.0.carries(vip)
    }
}

/// The subsystems that follow the log, and the projections they follow it with.
struct Subsystems {
    dns: Arc<rune_dns::Dns>,
    data_path: Arc<dyn rune_dns::DataPath>,
    dataplane: Arc<rune_dataplane::DataPlane>,
    ingress: Option<Arc<rune_ingress::Ingress>>,
    orchestrator: Arc<rune_orchestrator::Orchestrator>,
    projections: Vec<Arc<rune_log::projection::Projection>>,
}

/// Starts the DNS, the data plane, the ingress (edge nodes) and the orchestrator, in the
/// order the data path needs, and their metrics.
async fn start_subsystems(
    s: &Settings,
    log: &Arc<Log>,
    secrets: &Arc<Secrets>,
    provider: &opentelemetry_sdk::metrics::SdkMeterProvider,
    follows_placement: bool,
) -> anyhow::Result<Subsystems> {
    systemd::status("starting the DNS, the data plane and the ingress");
    let dns = start_dns(s, log).await?;
    let dataplane = start_dataplane(s, log).await?;
    // A name resolves only once traffic to its VIP can reach endpoints.
    let data_path: Arc<dyn rune_dns::DataPath> = Arc::new(Carried(dataplane.clone()));
    dns.set_data_path(Some(data_path.clone()));
    let ingress = start_ingress(s, log, secrets, &dataplane).await?;
    if let Some(ing) = &ingress {
        crate::metrics::ingress(provider, ing);
    }
    crate::metrics::dataplane(provider, &dataplane);

    systemd::status("starting the orchestrator");
    // Everything that sends traffic to instances: a stopping one leaves them all first.
    let routers: Vec<_> = [
        Some(dns.projection().clone()),
        dataplane.projection().cloned(),
        ingress.as_ref().map(|i| i.projection().clone()),
    ]
    .into_iter()
    .flatten()
    .collect();
    let orchestrator = start_orchestrator(
        s,
        log,
        secrets,
        &cluster_id(log)?,
        follows_placement,
        routers.clone(),
    )
    .await;
    serve_containers(&dns, &dataplane, &orchestrator);
    let mut projections = routers;
    projections.extend(orchestrator.projection().cloned());
    crate::metrics::projections(provider, &projections, &orchestrator);
    Ok(Subsystems {
        dns,
        data_path,
        dataplane,
        ingress,
        orchestrator,
        projections,
    })
}

/// `/debug/failpoints/*`, only with `--enable-failpoints`.
fn failpoint_routes(s: &Settings, log: &Arc<Log>, sub: &Subsystems) -> Option<axum::Router> {
    s.enable_failpoints.then(|| {
        tracing::warn!("failpoints are enabled: /debug/failpoints/* can break this runed on purpose");
        let fp = Failpoints {
            log: log.clone(),
            dns: sub.dns.clone(),
            data_path: sub.data_path.clone(),
            projections: sub.projections.clone(),
        };
        axum::Router::new()
            .route("/debug/failpoints/{name}/{state}", axum::routing::post(failpoint))
            .route(
                "/debug/failpoints/corrupt-service/{ns}/{name}",
                axum::routing::post(corrupt_service),
            )
            .with_state(fp)
    })
}

/// Runs the daemon until a signal (`Ok`) or until the log fails for good ([`LogFailed`]).
pub async fn run(s: Settings) -> anyhow::Result<()> {
    let stopped = stop_signals()?;
    let (registry, provider) = crate::metrics::init()?;
    tracing::info!(data_dir = %s.data_dir.display(), grpc = %s.grpc_addr, http = %s.http_addr, dev_mode = s.dev_mode, roles = ?s.node_roles, "starting runed");
    for line in &s.ignored {
        tracing::warn!("runefile {line}");
    }
    systemd::status("binding listeners");
    let (listeners, cluster_ports) = bind_all(&s).await?;
    let (raft_listener, gateway) = match cluster_ports {
        Some(p) => (Some(p.raft), Some(p.gateway)),
        None => (None, None),
    };
    let tls = load_tls(&s)?;
    let Started { log, room, raft } = start_log(&s, raft_listener).await?;
    let secrets = start_secrets(&s, &log, room).await?;
    if let Some(r) = &raft {
        r.admission.ready(secrets.clone());
    }
    crate::metrics::log_gauges(&provider, &log);
    crate::metrics::network_changes(&provider, &log);
    if let (Some(r), Some(c), Some(g)) = (&raft, &s.cluster, &gateway) {
        if room {
            let at = crate::cluster::gateway_address(c, g.local_addr()?).await?;
            crate::cluster::register(log.clone(), &s.node_name, r.node, at).await?;
        }
        crate::cluster::watch_nodes(log.clone(), r.node, c.node_grace);
    }
    let sub = start_subsystems(&s, &log, &secrets, &provider, raft.is_some()).await?;
    if let (Some(g), Some(r)) = (gateway, &raft) {
        sub.dataplane.serve_gateway(g, r.gateway_key);
    }
    let health = Arc::new(Health::new(
        log.clone(),
        sub.orchestrator.clone(),
        sub.projections.clone(),
        s.stale_budget,
    ));
    let api = Api {
        log: log.clone(),
        history_limit: s.history_limit,
        orchestrator: sub.orchestrator.clone(),
        secrets,
        allow_remote_admin: s.allow_remote_admin,
        dataplane: sub.dataplane.clone(),
        ingress: sub.ingress.clone(),
        admin_socket: listeners.admin.is_some(),
        grpc_port: listeners
            .grpc
            .local_addr()
            .map_or(s.grpc_addr.port(), |a| a.port()),
        cluster_ca: raft.as_ref().map(|r| r.ca_pem.clone()),
    };
    let auth = crate::auth::Authenticator::new(log.clone());
    let failpoints = failpoint_routes(&s, &log, &sub);
    let servers = Servers::start(
        listeners,
        api,
        auth,
        health.clone(),
        tls.as_ref(),
        registry,
        failpoints,
    )?;
    let applied = log.positions().2;
    systemd::ready(&format!("serving: applied index {applied}"));
    tracing::info!(grpc = %s.grpc_addr, http = %s.http_addr, metrics = ?s.metrics_addr, admin_socket = ?s.admin_socket, applied, "runed is ready");
    feed_watchdog(health.clone());
    report_status(log.clone(), health.clone());

    let failed = tokio::select! {
        () = stopped => None,
        why = log.failed() => Some(why),
    };
    let stopped = stop(&s, log, sub, servers, health, failed, raft.map(|r| r.port)).await;
    let _ = provider.shutdown();
    stopped
}

/// Drains gRPC, stops the orchestrator (instances keep running for the next runed to adopt),
/// closes the log, then HTTP; the log's failure, if that is why runed stops, is the error.
async fn stop(
    s: &Settings,
    log: Arc<Log>,
    sub: Subsystems,
    mut servers: Servers,
    health: Arc<Health>,
    failed: Option<String>,
    raft_port: Option<rune_log::network::RaftPort>,
) -> anyhow::Result<()> {
    health.set_shutting_down();
    if let Some(why) = &failed {
        tracing::error!(error = %why, "the log stopped; shutting down to be restarted");
    }
    systemd::stopping("draining in-flight requests");
    let drain = Duration::from_secs(s.drain_seconds);
    servers.stop_grpc(drain).await;
    systemd::stopping("stopping the orchestrator");
    sub.orchestrator.shutdown().await;
    systemd::stopping("closing the log");
    let closed = log.shutdown().await;
    if let Some(port) = raft_port {
        if let Err(e) = port.stop().await {
            tracing::warn!(error = %e, "the raft port did not close cleanly");
        }
    }
    servers.stop_http(drain).await;
    if let Some(why) = failed {
        return Err(LogFailed(why).into());
    }
    closed.context("closing the log")?;
    tracing::info!("runed stopped");
    Ok(())
}

/// Installs the handlers for SIGTERM, SIGINT and SIGHUP (at the start, so a stop asked for
/// while runed starts is not lost) and returns what waits for the first stop: SIGHUP is logged
/// and ignored.
fn stop_signals() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    Ok(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!(signal = "SIGTERM", "shutting down"); return }
                _ = int.recv() => { tracing::info!(signal = "SIGINT", "shutting down"); return }
                _ = hup.recv() => tracing::info!(signal = "SIGHUP", "ignored: runed has nothing to reload"),
            }
        }
    })
}

/// Seeds the reserved namespaces, the built-in policies, the cluster CIDR and the cluster's
/// identity on a new cluster, and the host claims of a state older than them, through the log
/// like every write. In a cluster it reads what every member acknowledged (a joining node
/// waits until it has caught up), and only the `founder` sets the cluster CIDR once there is
/// one: the others' defaults must not undo it. A member whose own state already holds it all
/// writes nothing and waits for no one, so it starts even while cut off from its quorum.
async fn seed(log: &Log, cluster_cidr: &str, clustered: bool, founder: bool) -> anyhow::Result<()> {
    // A node that just joined has no state yet (not even its table): it catches up below.
    if clustered && matches!(seeding(&log.read()?, cluster_cidr, founder), Ok(None)) {
        return Ok(());
    }
    let txn = if clustered {
        caught_up(log).await?
    } else {
        log.read()?
    };
    if let Some(init) = seeding(&txn, cluster_cidr, founder)? {
        log.propose(init).await?.outcome?;
    }
    Ok(())
}

/// What the state read by `txn` lacks of the seed, as the one `Init` entry that adds it.
fn seeding(
    txn: &redb::ReadTransaction,
    cluster_cidr: &str,
    founder: bool,
) -> anyhow::Result<Option<Command>> {
    let (missing, policies, cluster_cidr, cluster_id, claim_hosts) = {
        let t = txn.open_table(STATE_TABLE).context("opening the state table")?;
        let mut v = Vec::new();
        for ns in RESERVED_NAMESPACES {
            if get_record::<NamespaceRecord, _>(&t, &namespace_key(ns))?.is_none() {
                v.push(ns.to_string());
            }
        }
        // Built-in policies are created at first start and restored if an older build's differ.
        let mut p = Vec::new();
        for spec in builtin_policies() {
            let stored = get_record::<PolicyRecord, _>(&t, &policy_key(&spec.name))?;
            let want = normalize_policy(spec.clone()).ok();
            if stored.is_none_or(|r| !r.builtin || Some(&r.spec) != want.as_ref()) {
                p.push(spec);
            }
        }
        let stored = get_record::<rune_statemachine::network::NetworkConfig, _>(
            &t,
            rune_statemachine::network::CONFIG_KEY,
        )?;
        let cidr = match stored.map(|c| c.cluster_cidr) {
            Some(c) if c == cluster_cidr => None,
            Some(c) if !founder => {
                tracing::info!(cluster_cidr = %c, "using the cluster's network");
                None
            }
            _ => Some(cluster_cidr.to_string()),
        };
        // Chosen here, carried in the entry: apply stays deterministic.
        let id = match rune_statemachine::store::cluster_id(&t)? {
            Some(_) => None,
            None => Some(hex::encode(rune_secrets::random_bytes(8)?)),
        };
        // A state written before host claims (v3) gets them once, in one entry.
        let claim = rune_statemachine::store::unclaimed_hosts(&t)?;
        (v, p, cidr, id, claim)
    };
    let needed = !missing.is_empty()
        || !policies.is_empty()
        || cluster_cidr.is_some()
        || cluster_id.is_some()
        || claim_hosts;
    Ok(needed.then_some(Command::Init {
        namespaces: missing,
        policies,
        cluster_cidr,
        cluster_id,
        claim_hosts,
    }))
}

/// How long a node that starts in a cluster may take to catch up with it before it gives up.
const CATCH_UP: Duration = rune_log::join::CATCH_UP;

/// A read of everything the cluster acknowledged, once this node has applied that far: a
/// node that just joined waits until the leader has reached it and sent it the state.
async fn caught_up(log: &Log) -> anyhow::Result<redb::ReadTransaction> {
    let deadline = tokio::time::Instant::now() + CATCH_UP;
    loop {
        match log.read_linearizable().await {
            Ok(txn) => return Ok(txn),
            Err(e) if tokio::time::Instant::now() < deadline => {
                systemd::status("catching up with the cluster");
                tracing::info!(error = %e, "waiting to catch up with the cluster");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(anyhow::Error::new(e).context("catching up with the cluster")),
        }
    }
}

/// The cluster's identity (empty before the first seed: what runed makes then carries none).
fn cluster_id(log: &Log) -> anyhow::Result<String> {
    let txn = log.read()?;
    let t = txn.open_table(STATE_TABLE).context("opening the state table")?;
    Ok(rune_statemachine::store::cluster_id(&t)?.unwrap_or_default())
}
