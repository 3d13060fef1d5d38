//! runed's listeners: the gRPC API on TCP (with TLS when configured) and on the local admin
//! socket, gRPC health checking and server reflection, `/healthz` on the HTTP address, and
//! `/metrics`.

use std::future::IntoFuture;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::http::StatusCode;
use axum::routing::get;
use rune_proto::v1 as pb;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::server::NamedService;
use tonic::service::interceptor::InterceptedService as Authed;

use crate::api::Api;
use crate::auth::Authenticator;
use crate::health::Health;

/// Largest gRPC message accepted; larger casts get a transport-level ResourceExhausted, while
/// anything up to this gets a spec-level InvalidArgument naming the resource.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// The names gRPC health checking answers for, besides the whole server ("").
const SERVICE_NAMES: [&str; 8] = [
    <pb::service_api_server::ServiceApiServer<Api> as NamedService>::NAME,
    <pb::namespace_api_server::NamespaceApiServer<Api> as NamedService>::NAME,
    <pb::instance_api_server::InstanceApiServer<Api> as NamedService>::NAME,
    <pb::secret_api_server::SecretApiServer<Api> as NamedService>::NAME,
    <pb::admin_api_server::AdminApiServer<Api> as NamedService>::NAME,
    <pb::network_api_server::NetworkApiServer<Api> as NamedService>::NAME,
    <pb::system_api_server::SystemApiServer<Api> as NamedService>::NAME,
    <pb::bootstrap_api_server::BootstrapApiServer<Api> as NamedService>::NAME,
];

/// The gRPC services, assembled on a server builder: every service but bootstrap, health and
/// reflection sits behind the authenticator.
fn router(
    mut builder: tonic::transport::Server,
    api: &Api,
    auth: &Authenticator,
    health: &Arc<Health>,
) -> anyhow::Result<tonic::transport::server::Router> {
    let health = tonic_health::pb::health_server::HealthServer::new(GrpcHealth(health.clone()));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building gRPC server reflection")?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("building gRPC server reflection")?;
    Ok(builder
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
            auth.clone(),
        ))
        .add_service(pb::bootstrap_api_server::BootstrapApiServer::new(api.clone()))
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha))
}

/// gRPC health checking (`grpc.health.v1`, the protocol of tonic-health) answered from the
/// same [`Health`] as `/healthz`, at the moment of asking, so the two never disagree.
struct GrpcHealth(Arc<Health>);

impl GrpcHealth {
    /// The status of `service` ("" is the whole server); `None` for a service runed does not
    /// serve.
    fn status(&self, service: &str) -> Option<tonic_health::pb::HealthCheckResponse> {
        use tonic_health::pb::health_check_response::ServingStatus;
        if !service.is_empty() && !SERVICE_NAMES.contains(&service) {
            return None;
        }
        let status = if self.0.check().is_ok() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        Some(tonic_health::pb::HealthCheckResponse {
            status: status as i32,
        })
    }
}

#[tonic::async_trait]
impl tonic_health::pb::health_server::Health for GrpcHealth {
    async fn check(
        &self,
        req: tonic::Request<tonic_health::pb::HealthCheckRequest>,
    ) -> Result<tonic::Response<tonic_health::pb::HealthCheckResponse>, tonic::Status> {
        let service = req.into_inner().service;
        self.status(&service)
            .map(tonic::Response::new)
            .ok_or_else(|| tonic::Status::not_found(format!("unknown service {service}")))
    }

    type WatchStream = crate::api::Stream_<tonic_health::pb::HealthCheckResponse>;

    /// The status now, then every change (checked each second) until the client leaves; an
    /// unknown service is SERVICE_UNKNOWN, and the stream stays open, as the protocol asks.
    async fn watch(
        &self,
        req: tonic::Request<tonic_health::pb::HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        use tonic_health::pb::health_check_response::ServingStatus;
        let service = req.into_inner().service;
        let health = GrpcHealth(self.0.clone());
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let now = health
                    .status(&service)
                    .unwrap_or(tonic_health::pb::HealthCheckResponse {
                        status: ServingStatus::ServiceUnknown as i32,
                    });
                if last != Some(now.status) {
                    last = Some(now.status);
                    if tx.send(Ok(now)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = tx.closed() => return,
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// The local admin socket: every RPC, for root on this host (peer credentials are checked on
/// each request), mode 0600. `None` when another live runed already serves the path.
pub fn bind_admin_socket(path: &Path) -> anyhow::Result<Option<UnixListener>> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("server.admin-socket: creating {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("server.admin-socket: {}", dir.display()))?;
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        use std::os::unix::fs::MetadataExt;
        let owner = std::fs::metadata(dir).map(|m| m.uid()).unwrap_or(u32::MAX);
        if owner != 0 && owner != crate::config::current_uid() {
            anyhow::bail!(
                "server.admin-socket: {} belongs to uid {owner}, not to runed's user: another user could replace the socket",
                dir.display()
            );
        }
    }
    if let Ok(m) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !m.file_type().is_socket() {
            anyhow::bail!(
                "server.admin-socket: {} exists and is not a socket",
                path.display()
            );
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            tracing::warn!(socket = %path.display(), "another runed serves this admin socket; this one serves none (set server.admin-socket)");
            return Ok(None);
        }
        // Left by a runed that was killed: nobody answers on it.
        std::fs::remove_file(path)
            .with_context(|| format!("server.admin-socket: removing the stale {}", path.display()))?;
    }
    let l = UnixListener::bind(path)
        .with_context(|| format!("server.admin-socket: cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("server.admin-socket: {}", path.display()))?;
    Ok(Some(l))
}

/// Waits for a server to finish draining, for at most `drain`, then closes what is left.
async fn drained(h: &mut JoinHandle<Result<(), tonic::transport::Error>>, drain: Duration) {
    if tokio::time::timeout(drain, &mut *h).await.is_err() {
        tracing::warn!(
            seconds = drain.as_secs(),
            "in-flight RPCs did not finish in time; closing them"
        );
        h.abort();
    }
}

/// Everything runed serves, started; [`Servers::stop_grpc`] and [`Servers::stop_http`] wind
/// them down in order.
pub struct Servers {
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    admin: Option<(JoinHandle<Result<(), tonic::transport::Error>>, PathBuf)>,
    http: JoinHandle<std::io::Result<()>>,
    metrics: Option<JoinHandle<std::io::Result<()>>>,
    stop_grpc: watch::Sender<bool>,
    stop_http: watch::Sender<bool>,
}

/// What [`Servers::start`] needs.
pub struct Listeners {
    /// The gRPC API.
    pub grpc: TcpListener,
    /// `/healthz`.
    pub http: TcpListener,
    /// `/metrics`, when enabled.
    pub metrics: Option<TcpListener>,
    /// The local admin socket, when enabled and free, with its path.
    pub admin: Option<(UnixListener, PathBuf)>,
}

impl Servers {
    /// Serves the API, health and metrics until [`Servers::stop`].
    pub fn start(
        l: Listeners,
        api: Api,
        auth: Authenticator,
        health: Arc<Health>,
        tls: Option<&crate::tls::TlsMaterial>,
        registry: prometheus::Registry,
        failpoints: Option<axum::Router>,
    ) -> anyhow::Result<Self> {
        let (stop_grpc, stop_rx) = watch::channel(false);
        let (stop_http, stop_http_rx) = watch::channel(false);
        let until = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };

        let mut builder = tonic::transport::Server::builder();
        if let Some(t) = tls {
            builder = builder
                .tls_config(
                    tonic::transport::ServerTlsConfig::new()
                        .identity(tonic::transport::Identity::from_pem(&t.cert, &t.key)),
                )
                .context("configuring TLS for gRPC")?;
        }
        let tcp = router(builder, &api, &auth, &health)?;
        // Small request/response frames: do not let Nagle hold them back.
        let incoming =
            tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(l.grpc), |conn| {
                conn.inspect(|s| {
                    let _ = s.set_nodelay(true);
                })
            });
        let grpc = tokio::spawn(tcp.serve_with_incoming_shutdown(incoming, until(stop_rx.clone())));
        let admin = match l.admin {
            Some((listener, path)) => {
                let local = router(tonic::transport::Server::builder(), &api, &auth, &health)?;
                let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
                tracing::info!(socket = %path.display(), "serving the local admin socket");
                Some((
                    tokio::spawn(local.serve_with_incoming_shutdown(incoming, until(stop_rx))),
                    path,
                ))
            }
            None => None,
        };

        let h = health.clone();
        let mut app = axum::Router::new().route(
            "/healthz",
            get(move |q: axum::extract::RawQuery| {
                let verbose =
                    q.0.is_some_and(|q| q.split('&').any(|p| p == "verbose" || p.starts_with("verbose=")));
                let (ok, body) = h.report(verbose);
                async move {
                    let code = if ok {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    (code, body)
                }
            }),
        );
        if let Some(fp) = failpoints {
            app = app.merge(fp);
        }
        let http = match tls {
            Some(t) => {
                let l = crate::tls::TlsListener::new(l.http, &t.files, &t.cert, &t.key)?;
                tokio::spawn(
                    axum::serve(l, app)
                        .with_graceful_shutdown(until(stop_http_rx.clone()))
                        .into_future(),
                )
            }
            None => tokio::spawn(
                axum::serve(l.http, app)
                    .with_graceful_shutdown(until(stop_http_rx.clone()))
                    .into_future(),
            ),
        };
        let metrics = l.metrics.map(|l| {
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
            tokio::spawn(
                axum::serve(l, app)
                    .with_graceful_shutdown(until(stop_http_rx))
                    .into_future(),
            )
        });
        Ok(Self {
            grpc,
            admin,
            http,
            metrics,
            stop_grpc,
            stop_http,
        })
    }

    /// Stops gRPC (both listeners at once), draining in-flight RPCs for at most `drain`.
    pub async fn stop_grpc(&mut self, drain: Duration) {
        let _ = self.stop_grpc.send(true);
        let admin = self.admin.as_mut().map(|(h, _)| h);
        tokio::join!(drained(&mut self.grpc, drain), async {
            if let Some(h) = admin {
                drained(h, drain).await;
            }
        });
        if let Some((_, path)) = &self.admin {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Stops `/healthz` and `/metrics`, which answer until the log is closed.
    pub async fn stop_http(self, drain: Duration) {
        let _ = self.stop_http.send(true);
        let _ = tokio::time::timeout(drain, self.http).await;
        if let Some(m) = self.metrics {
            let _ = tokio::time::timeout(drain, m).await;
        }
    }
}
