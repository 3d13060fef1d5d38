//! `runed`'s life: open the log, seed it, serve gRPC, `/healthz` and `/metrics`, and on
//! SIGTERM/SIGINT drain, stop and flush.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::http::StatusCode;
use axum::routing::get;
use opentelemetry::metrics::MeterProvider;
use rune_log::{Log, LogConfig};
use rune_proto::v1 as pb;
use rune_statemachine::identity::{builtin_policies, normalize_policy, PolicyRecord};
use rune_statemachine::store::{get_record, namespace_key, policy_key, NamespaceRecord, RESERVED_NAMESPACES};
use rune_statemachine::{Command, STATE_TABLE};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::api::Api;
use crate::config::{LogFormat, Settings};

/// Largest gRPC message accepted; larger casts get a transport-level ResourceExhausted, while
/// anything up to this gets a spec-level InvalidArgument naming the resource.
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Installs the tracing subscriber: stdout, text or JSON.
pub fn init_logging(s: &Settings) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!(
            "{},openraft=warn,opentelemetry=warn,opentelemetry_sdk=warn",
            s.log_level
        ))
    });
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .with_ansi(ansi);
    match s.log_format {
        LogFormat::Json => b.json().flatten_event(true).init(),
        LogFormat::Text => b.init(),
    }
}

/// Sets up the OpenTelemetry meter provider exporting into a Prometheus registry.
fn init_metrics() -> anyhow::Result<(prometheus::Registry, opentelemetry_sdk::metrics::SdkMeterProvider)> {
    let registry = prometheus::Registry::new();
    let exporter = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .without_target_info()
        .scope_info_enabled(false)
        .build()
        .context("building the Prometheus exporter")?;
    let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
        .with_reader(exporter)
        .build();
    opentelemetry::global::set_meter_provider(provider.clone());
    Ok((registry, provider))
}

fn register_log_gauges(provider: &opentelemetry_sdk::metrics::SdkMeterProvider, log: &Arc<Log>) {
    let meter = provider.meter("rune");
    type Gauge = (&'static str, &'static str, fn((u64, u64, u64)) -> u64);
    let gauges: [Gauge; 4] = [
        (
            "rune_log_applied_index",
            "Last log index applied to the state machine",
            |p| p.2,
        ),
        ("rune_log_last_index", "Last log index written", |p| p.1),
        (
            "rune_log_apply_lag_entries",
            "Entries written but not yet applied",
            |p| p.1.saturating_sub(p.2),
        ),
        ("rune_log_term", "Current raft term", |p| p.0),
    ];
    for (name, help, f) in gauges {
        let log = Arc::downgrade(log);
        meter
            .u64_observable_gauge(name)
            .with_description(help)
            .with_callback(move |o| {
                if let Some(log) = log.upgrade() {
                    o.observe(f(log.positions()), &[]);
                }
            })
            .build();
    }
}

/// Test hooks: `POST /debug/failpoints/dns-tail-pause/on|off` and `dataplane-tail-pause/on|off`
/// stop a projection from applying the log; `dns-data-path-ready/on|off` overrides what the
/// data plane told the DNS.
async fn failpoint(
    axum::extract::State((dns, dp)): axum::extract::State<(
        Arc<rune_dns::Dns>,
        Arc<rune_dataplane::DataPlane>,
    )>,
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
    match name.as_str() {
        "dns-tail-pause" => dns.pause_tail(on),
        "dns-data-path-ready" => dns.set_data_path_ready(on),
        "dataplane-tail-pause" => dp.pause_tail(on),
        other => return (StatusCode::NOT_FOUND, format!("no failpoint {other}\n")),
    }
    tracing::warn!(failpoint = %name, on, "failpoint set");
    (StatusCode::OK, format!("{name} {state}\n"))
}

/// The data plane's and the projections' gauges and counters, read at scrape time.
fn register_dataplane_metrics(
    provider: &opentelemetry_sdk::metrics::SdkMeterProvider,
    dns: &Arc<rune_dns::Dns>,
    dp: &Arc<rune_dataplane::DataPlane>,
) {
    use opentelemetry::KeyValue;
    let meter = provider.meter("rune");
    let svc_labels = |k: &rune_dataplane::policy::SvcKey| {
        vec![
            KeyValue::new("namespace", k.ns.clone()),
            KeyValue::new("service", k.name.clone()),
        ]
    };
    {
        let (dns, dp) = (Arc::downgrade(dns), Arc::downgrade(dp));
        meter
            .f64_observable_gauge("rune_dataplane_stale_seconds")
            .with_description("How long a projection (dns, dataplane) has lagged the applied log; past the stale budget it fails closed")
            .with_callback(move |o| {
                if let Some(d) = dns.upgrade() {
                    o.observe(d.stale_seconds(), &[KeyValue::new("projection", "dns")]);
                }
                if let Some(d) = dp.upgrade() {
                    o.observe(d.stale_seconds(), &[KeyValue::new("projection", "dataplane")]);
                }
            })
            .build();
    }
    let weak = Arc::downgrade(dp);
    meter
        .u64_observable_counter("rune_policy_drops")
        .with_description(
            "Connections denied by network policy, by the proxy or dropped by the kernel (reason)",
        )
        .with_callback(move |o| {
            if let Some(d) = weak.upgrade() {
                for (k, policy, reason, n) in d.drops() {
                    let mut l = svc_labels(&k);
                    l.push(KeyValue::new("policy", policy));
                    l.push(KeyValue::new("reason", reason));
                    o.observe(n, &l);
                }
            }
        })
        .build();
    let weak = Arc::downgrade(dp);
    meter
        .u64_observable_gauge("rune_policy_local_instances")
        .with_description("Instances on this node that a service's network policy applies to")
        .with_callback(move |o| {
            if let Some(d) = weak.upgrade() {
                for (k, n) in d.local_instances() {
                    o.observe(n as u64, &svc_labels(&k));
                }
            }
        })
        .build();
    let weak = Arc::downgrade(dp);
    meter
        .u64_observable_counter("rune_dataplane_connections")
        .with_description("Connections to service VIPs by result: forwarded, denied, no_endpoint, stale")
        .with_callback(move |o| {
            if let Some(d) = weak.upgrade() {
                for (k, result, n) in d.stats.connections() {
                    let mut l = svc_labels(&k);
                    l.push(KeyValue::new("result", result));
                    o.observe(n, &l);
                }
            }
        })
        .build();
    let weak = Arc::downgrade(dp);
    meter
        .u64_observable_counter("rune_dataplane_bytes")
        .with_description("Bytes carried by finished proxied connections, by direction")
        .with_callback(move |o| {
            if let Some(d) = weak.upgrade() {
                for (k, direction, n) in d.stats.byte_counts() {
                    let mut l = svc_labels(&k);
                    l.push(KeyValue::new("direction", direction));
                    o.observe(n, &l);
                }
            }
        })
        .build();
    let weak = Arc::downgrade(dp);
    meter
        .i64_observable_gauge("rune_dataplane_active_connections")
        .with_description("Connections open through the proxy")
        .with_callback(move |o| {
            if let Some(d) = weak.upgrade() {
                o.observe(d.stats.active.load(Ordering::Relaxed), &[]);
            }
        })
        .build();
    let weak = Arc::downgrade(dp);
    meter
        .u64_observable_gauge("rune_dataplane_kernel_enforcement")
        .with_description("1 when runed's nftables table enforces policy, 0 when only the proxy does")
        .with_callback(move |o| {
            if let Some(d) = weak.upgrade() {
                o.observe(u64::from(d.kernel_status().enforcing), &[]);
            }
        })
        .build();
}

/// `rune_vip_allocations_total` and `rune_endpoints_published_total{service,namespace}`, counted
/// from the applied entries' changes, so they count what the log decided, once.
fn count_network_changes(provider: &opentelemetry_sdk::metrics::SdkMeterProvider, log: &Arc<Log>) {
    use rune_statemachine::{Action, Kind};
    let meter = provider.meter("rune");
    let vips = meter
        .u64_counter("rune_vip_allocations")
        .with_description("Service VIPs allocated")
        .build();
    let endpoints = meter
        .u64_counter("rune_endpoints_published")
        .with_description("Changes of a service's endpoints published through the log")
        .build();
    let mut rx = log.subscribe();
    tokio::spawn(async move {
        loop {
            let entry = match rx.recv().await {
                Ok(e) => e,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "network metrics fell behind the log; counts are low");
                    continue;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            for c in &entry.changes {
                match (c.kind, c.action) {
                    (Kind::Vip, Action::Created) => vips.add(1, &[]),
                    (Kind::Endpoints, _) => endpoints.add(
                        1,
                        &[
                            opentelemetry::KeyValue::new("service", c.name.clone()),
                            opentelemetry::KeyValue::new("namespace", c.namespace.clone()),
                        ],
                    ),
                    _ => {}
                }
            }
        }
    });
}

async fn bind(what: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for {what} on {addr}"))
}

/// Runs the daemon until a signal; returns the process exit code.
pub async fn run(s: Settings) -> anyhow::Result<()> {
    let (registry, provider) = init_metrics()?;
    tracing::info!(data_dir = %s.data_dir.display(), grpc = %s.grpc_addr, http = %s.http_addr, dev_mode = s.dev_mode, roles = ?s.node_roles, "starting runed");
    // Bind before opening the log, so a taken port fails fast and changes nothing.
    let grpc_listener = bind("gRPC", s.grpc_addr).await?;
    let http_listener = bind("HTTP", s.http_addr).await?;
    let metrics_listener = match s.metrics_addr {
        Some(a) => Some(bind("metrics", a).await?),
        None => None,
    };
    // TLS material is read (or, in dev mode, generated) before anything else changes.
    let tls = match &s.tls {
        crate::config::TlsSetting::Off => None,
        crate::config::TlsSetting::Files(f) => Some(f.clone()),
        crate::config::TlsSetting::DevSelfSigned => Some(crate::tls::dev_pair(&s.data_dir.join("tls"))?),
    };
    let tls = match tls {
        Some(f) => {
            let (cert, key) = crate::tls::read_pem(&f)?;
            tracing::info!(cert = %f.cert.display(), "serving gRPC and HTTP over TLS");
            Some((f, cert, key))
        }
        None => None,
    };
    let cfg = LogConfig {
        snapshot_every: s.snapshot_every,
        keep_after_snapshot: s.keep_after_snapshot,
        ..LogConfig::new(&s.data_dir)
    };
    let log = Arc::new(Log::open(cfg).await.context("opening the log")?);
    seed(&log, &s.cluster_cidr).await?;
    let secrets = match crate::secrets_api::Secrets::load(&log, s.kek_source.clone(), s.secret_limits) {
        Ok(x) => Arc::new(x),
        Err(e) => {
            // Close the log cleanly before refusing: nothing was changed.
            let _ = log.shutdown().await;
            return Err(anyhow::Error::new(e));
        }
    };
    if let Err(e) = secrets.finish_pending_rotation(&log).await {
        let _ = log.shutdown().await;
        return Err(anyhow::Error::new(e));
    }
    register_log_gauges(&provider, &log);
    count_network_changes(&provider, &log);
    let dns_cfg = rune_dns::DnsConfig {
        addr: s.dns_addr,
        upstreams: s.dns_upstreams.clone(),
        dev_mode: s.dev_mode,
        stale_budget: s.stale_budget,
        forward_timeout: Duration::from_secs(2),
    };
    let dns = match rune_dns::Dns::start(log.clone(), dns_cfg.clone()).await {
        // Port 53 needs root; a developer's runed on the default address moves to 5353.
        Err(rune_dns::DnsError::Bind(_, e))
            if s.dns_addr_default && e.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            let addr = SocketAddr::new(s.dns_addr.ip(), 5353);
            tracing::warn!(%addr, "no privilege for port 53; the DNS listens on 5353 (set networking.dns-addr)");
            rune_dns::Dns::start(log.clone(), rune_dns::DnsConfig { addr, ..dns_cfg })
                .await
                .context("networking.dns-addr")?
        }
        other => other.context("networking.dns-addr")?,
    };
    let dataplane = rune_dataplane::DataPlane::start(
        log.clone(),
        rune_dataplane::DataPlaneConfig {
            node: s.node_name.clone(),
            listen: if s.nftables {
                std::net::Ipv4Addr::UNSPECIFIED.into()
            } else {
                std::net::Ipv4Addr::LOCALHOST.into()
            },
            port_range: s.proxy_ports,
            ports_file: s.data_dir.join("dataplane").join("proxy-ports.json"),
            kernel: s.nftables,
            nft_table: s.nft_table.clone(),
            stale_budget: s.stale_budget,
            connect_timeout: Duration::from_secs(3),
        },
    )
    .await
    .context("data plane")?;
    let kernel = dataplane.kernel_status();
    if s.nftables && !kernel.enforcing {
        tracing::warn!(status = %kernel.detail, "kernel policy enforcement is off");
    }
    // VIP names resolve only once VIP traffic can reach endpoints.
    dns.set_data_path_ready(true);
    let ingress = match s.ingress {
        Some((http, https)) => Some(
            rune_ingress::Ingress::start(
                log.clone(),
                rune_ingress::IngressConfig {
                    http,
                    https,
                    acme: s.acme.clone(),
                    vault: Arc::new(crate::secrets_api::CertVault {
                        log: log.clone(),
                        secrets: secrets.clone(),
                    }),
                },
            )
            .await
            .context(
                "ingress (--ingress-http-addr, --ingress-https-addr; --node-role='' turns the edge role off)",
            )?,
        ),
        None => None,
    };
    if let Some(ing) = &ingress {
        let weak = Arc::downgrade(ing);
        provider
            .meter("rune")
            .u64_observable_gauge("rune_acme_certificates")
            .with_description("TLS hosts by certificate state: pending, ready, error")
            .with_callback(move |o| {
                if let Some(i) = weak.upgrade() {
                    let states = i.certificate_states();
                    for st in ["pending", "ready", "error"] {
                        let n = states.values().filter(|c| c.state == st).count() as u64;
                        o.observe(n, &[opentelemetry::KeyValue::new("state", st)]);
                    }
                }
            })
            .build();
        let weak = Arc::downgrade(ing);
        provider
            .meter("rune")
            .u64_observable_counter("rune_ingress_requests")
            .with_description("Requests answered by the edge ingress, by host and status")
            .with_callback(move |o| {
                if let Some(i) = weak.upgrade() {
                    for (host, status, n) in i.requests() {
                        o.observe(
                            n,
                            &[
                                opentelemetry::KeyValue::new("host", host),
                                opentelemetry::KeyValue::new("status", i64::from(status)),
                            ],
                        );
                    }
                }
            })
            .build();
    }
    register_dataplane_metrics(&provider, &dns, &dataplane);
    let orchestrator = rune_orchestrator::Orchestrator::start(log.clone(), {
        let mut c = rune_orchestrator::OrchestratorConfig::new(&s.node_name, &s.data_dir);
        c.docker_socket = s.docker_socket.clone();
        c.run_dir = s.run_dir.clone();
        c.secrets = Some(Arc::new(crate::secrets_api::SecretOpener(secrets.clone())));
        // The small writer installed beside runed, else runed itself (`runed __log-writer`).
        c.log_writer = std::env::current_exe().ok().map(|exe| {
            let small = exe.with_file_name("rune-log-writer");
            if small.is_file() {
                small
            } else {
                exe
            }
        });
        c
    });
    {
        // Containers reach the DNS on their network's gateway, once the network exists.
        let (dns, mut gw) = (dns.clone(), orchestrator.container_gateway());
        tokio::spawn(async move {
            let mut served = None;
            loop {
                let now = gw.borrow_and_update().clone();
                if let Some(ip) = now.filter(|g| Some(g) != served.as_ref()) {
                    match ip.parse::<std::net::IpAddr>() {
                        Ok(addr) => match dns.listen_also(SocketAddr::new(addr, 53)).await {
                            Ok(()) => served = Some(ip),
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

    let shutting_down = Arc::new(AtomicBool::new(false));
    // gRPC stops first and drains; HTTP keeps answering /healthz (503) until the log is closed.
    let (stop_grpc, stop_rx) = watch::channel(false);
    let (stop_http, stop_http_rx) = watch::channel(false);
    let api = Api {
        log: log.clone(),
        history_limit: s.history_limit,
        orchestrator: orchestrator.clone(),
        secrets,
        allow_remote_admin: s.allow_remote_admin,
        dataplane: dataplane.clone(),
        ingress: ingress.clone(),
    };
    let auth = crate::auth::Authenticator::new(log.clone());
    let grpc = {
        let mut stop = stop_rx.clone();
        // Small request/response frames: do not let Nagle hold them back.
        let incoming = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::TcpListenerStream::new(grpc_listener),
            |conn| {
                conn.inspect(|s| {
                    let _ = s.set_nodelay(true);
                })
            },
        );
        use tonic::service::interceptor::InterceptedService as Authed;
        // Every service but bootstrap sits behind the authenticator.
        let mut builder = tonic::transport::Server::builder();
        if let Some((_, cert, key)) = &tls {
            builder = builder
                .tls_config(
                    tonic::transport::ServerTlsConfig::new()
                        .identity(tonic::transport::Identity::from_pem(cert, key)),
                )
                .context("configuring TLS for gRPC")?;
        }
        let router = builder
            .add_service(Authed::new(
                pb::service_api_server::ServiceApiServer::new(api.clone())
                    .max_decoding_message_size(MAX_MESSAGE_BYTES),
                auth.clone(),
            ))
            .add_service(Authed::new(
                pb::namespace_api_server::NamespaceApiServer::new(api.clone()),
                auth.clone(),
            ))
            .add_service(Authed::new(
                pb::instance_api_server::InstanceApiServer::new(api.clone()),
                auth.clone(),
            ))
            .add_service(Authed::new(
                pb::secret_api_server::SecretApiServer::new(api.clone()),
                auth.clone(),
            ))
            .add_service(Authed::new(
                pb::admin_api_server::AdminApiServer::new(api.clone()),
                auth.clone(),
            ))
            .add_service(Authed::new(
                pb::network_api_server::NetworkApiServer::new(api.clone()),
                auth.clone(),
            ))
            .add_service(Authed::new(
                pb::system_api_server::SystemApiServer::new(api.clone()),
                auth,
            ))
            .add_service(pb::bootstrap_api_server::BootstrapApiServer::new(api));
        tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        })
    };
    let http = {
        let log = log.clone();
        let down = shutting_down.clone();
        let mut app = axum::Router::new().route(
            "/healthz",
            get(move || {
                let ok = !down.load(Ordering::Relaxed) && log.healthy();
                async move {
                    if ok {
                        (StatusCode::OK, "ok\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "unavailable\n")
                    }
                }
            }),
        );
        if s.enable_failpoints {
            tracing::warn!("failpoints are enabled: /debug/failpoints/* can break this runed on purpose");
            app = app.route(
                "/debug/failpoints/{name}/{state}",
                axum::routing::post(failpoint).with_state((dns.clone(), dataplane.clone())),
            );
        }
        let mut stop = stop_http_rx.clone();
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        match &tls {
            Some((files, cert, key)) => {
                let l = crate::tls::TlsListener::new(http_listener, files, cert, key)?;
                tokio::spawn(async move { axum::serve(l, app).with_graceful_shutdown(stopped).await })
            }
            None => tokio::spawn(async move {
                axum::serve(http_listener, app)
                    .with_graceful_shutdown(stopped)
                    .await
            }),
        }
    };
    let metrics = metrics_listener.map(|l| {
        let app = axum::Router::new().route(
            "/metrics",
            get(move || {
                let families = registry.gather();
                async move {
                    let mut buf = String::new();
                    match prometheus::TextEncoder::new().encode_utf8(&families, &mut buf) {
                        Ok(()) => (StatusCode::OK, buf),
                        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                    }
                }
            }),
        );
        let mut stop = stop_http_rx.clone();
        tokio::spawn(async move {
            axum::serve(l, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        })
    });
    tracing::info!(grpc = %s.grpc_addr, http = %s.http_addr, metrics = ?s.metrics_addr, "runed is ready");

    wait_for_stop_signal().await?;
    shutting_down.store(true, Ordering::Relaxed);
    let _ = stop_grpc.send(true);
    let drain = Duration::from_secs(s.drain_seconds);
    let abort = grpc.abort_handle();
    if tokio::time::timeout(drain, grpc).await.is_err() {
        tracing::warn!(
            seconds = s.drain_seconds,
            "in-flight RPCs did not finish in time; closing them"
        );
        abort.abort();
    }
    // Instances keep running; the next runed adopts them.
    orchestrator.shutdown().await;
    log.shutdown().await.context("closing the log")?;
    let _ = stop_http.send(true);
    let _ = tokio::time::timeout(drain, http).await;
    if let Some(m) = metrics {
        let _ = tokio::time::timeout(drain, m).await;
    }
    let _ = provider.shutdown();
    tracing::info!("runed stopped");
    Ok(())
}

/// Waits for SIGTERM or SIGINT; SIGHUP is logged and ignored.
async fn wait_for_stop_signal() -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!(signal = "SIGTERM", "shutting down"); return Ok(()) }
            _ = int.recv() => { tracing::info!(signal = "SIGINT", "shutting down"); return Ok(()) }
            _ = hup.recv() => tracing::info!(signal = "SIGHUP", "ignored: runed has nothing to reload"),
        }
    }
}

/// Seeds the reserved namespaces on a new cluster, through the log like every write.
async fn seed(log: &Log, cluster_cidr: &str) -> anyhow::Result<()> {
    let (missing, policies, cluster_cidr) = {
        let txn = log.read()?;
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
        let cidr = (stored.map(|c| c.cluster_cidr).as_deref() != Some(cluster_cidr))
            .then(|| cluster_cidr.to_string());
        (v, p, cidr)
    };
    if !missing.is_empty() || !policies.is_empty() || cluster_cidr.is_some() {
        log.propose(Command::Init {
            namespaces: missing,
            policies,
            cluster_cidr,
        })
        .await?
        .outcome?;
    }
    Ok(())
}
