//! The edge ingress: HTTP and HTTPS listeners that route each request by its host to a ready
//! endpoint of the service exposing that host (`expose: {host, port, path, tls}`).
//!
//! A projection like the DNS and the data plane ([`rune_log::projection`]): it keeps the exposed
//! services and their endpoints ([`routes::Exposed`]) and remakes [`routes::Routes`] when a
//! delta touches one of them. Past its stale budget it fails closed (503). Requests
//! and responses stream both ways; upgrades (websockets) are spliced; `X-Forwarded-For`,
//! `-Proto` and `-Host` are set. An unknown host gets 404, a host without a ready endpoint 503,
//! both with a short plain body. HTTPS speaks HTTP/1.1 and HTTP/2 (ALPN) and picks the
//! certificate by SNI; a host without a certificate of its own is served a self-signed one.
//! In a cluster, an endpoint on another node is reached through that node ([`Remote`]).

#![warn(missing_docs)]

pub mod acme;
pub mod routes;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Either, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, HOST};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rune_log::projection::{Projection, ProjectionError, View};
use rune_log::Log;
use rune_statemachine::delta::Delta;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio_util::io::InspectReader;

use routes::{Backend, Exposed, Routes};

/// A boxed future, as [`Remote`] returns one.
pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// How the ingress of a cluster's node reaches an instance on another node, whose address means
/// something only there: runed hands it the data plane's node gateway.
pub trait Remote: Send + Sync {
    /// A connection to `instance` of `namespace/service`, for service port `port`.
    fn dial(
        &self,
        namespace: &str,
        service: &str,
        instance: &str,
        port: u16,
    ) -> BoxFuture<std::io::Result<tokio::net::TcpStream>>;
}

/// The host part of a backend URI that names an instance on another node
/// (`<instance>.<service>.<namespace>.<REMOTE_HOST>`): hyper's pool keeps its connections
/// apart from every other backend's, and [`Connector`] dials it through [`Remote`].
const REMOTE_HOST: &str = "node.rune.invalid";

/// The `host` label of requests for hosts nobody exposes (one label, so the metric stays bounded).
pub const UNKNOWN_HOST: &str = "unknown";

/// Settings of the ingress.
#[derive(Clone)]
pub struct IngressConfig {
    /// The HTTP listener (ACME HTTP-01 challenges are answered here too).
    pub http: SocketAddr,
    /// The HTTPS listener.
    pub https: SocketAddr,
    /// The ACME client's settings.
    pub acme: acme::AcmeConfig,
    /// Where certificates are kept (sealed secrets, through the log).
    pub vault: Arc<dyn acme::Vault>,
    /// How long the routes may lag the log before requests are refused (503).
    pub stale_budget: Duration,
    /// Threads serving HTTPS, each with a runtime and a backend pool of its own; 0: one per
    /// core (at most 8).
    pub workers: usize,
    /// In a cluster: this node's name, and how to reach instances of the others.
    pub remote: Option<(String, Arc<dyn Remote>)>,
    /// How long clients may keep a connection without using it.
    pub timeouts: Timeouts,
    /// Client connections served at once, upgraded ones (websockets) included; more wait in
    /// the kernel's listen backlog. None: a quarter of the process's file descriptors.
    pub max_connections: Option<usize>,
}

/// How long the ingress waits on its clients, as a web server's timeouts do: a client that
/// holds a connection without using it must not keep its place under the connection cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// For a request's head, from the connection (or, on a keep-alive HTTP/1.1 connection, the
    /// previous request) to its last header line; also how often an HTTP/2 client is pinged.
    /// nginx: `client_header_timeout`, 60 s.
    pub header: Duration,
    /// An HTTP/2 connection with no request open is closed (GOAWAY) after this, however
    /// faithfully it answers pings. nginx: `keepalive_timeout`, 75 s.
    pub idle: Duration,
    /// An upgraded connection (a websocket) that carries no byte either way for this long is
    /// closed. haproxy: `timeout tunnel`, commonly an hour.
    pub tunnel: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            header: Duration::from_secs(30),
            idle: Duration::from_secs(75),
            tunnel: Duration::from_secs(3600),
        }
    }
}

/// Failures to start the ingress.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    /// A listener could not be bound.
    #[error("cannot listen for ingress on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    /// TLS could not be set up.
    #[error("ingress TLS: {0}")]
    Tls(String),
    /// A worker thread or its runtime could not be started.
    #[error("cannot start an ingress worker: {0}")]
    Runtime(std::io::Error),
}

type Body = BoxBody<Bytes, hyper::Error>;

/// The running ingress.
pub struct Ingress {
    view: Arc<RouteView>,
    rr: AtomicUsize,
    certs: Arc<Certs>,
    requests: RwLock<HashMap<String, Arc<StatusCounts>>>,
    acme: acme::AcmeConfig,
    /// How far the routes are behind the log (shown by `/healthz?verbose`).
    projection: Arc<Projection>,
    vault: Arc<dyn acme::Vault>,
    challenges: acme::Challenges,
    states: Mutex<BTreeMap<String, acme::CertState>>,
    /// Where redirected plain-HTTP requests are sent (the HTTPS listener's port).
    https_port: u16,
    timeouts: Timeouts,
    /// Places under the connection cap, one per connection served (a tunnel's included): one
    /// cap for the HTTP listener and every HTTPS worker together.
    room: Arc<tokio::sync::Semaphore>,
    /// The cap.
    cap: usize,
}

/// Requests of one host by status code (100..=599).
struct StatusCounts([AtomicU64; 500]);

impl Default for StatusCounts {
    fn default() -> Self {
        StatusCounts(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

/// Certificates by host: self-signed ones made on first use, replaced by real ones when they
/// exist; the next handshake sees a replacement, no listener restarts.
#[derive(Debug, Default)]
pub struct Certs {
    by_host: RwLock<HashMap<String, (Arc<CertifiedKey>, &'static str)>>,
    /// Exposed hosts: only these get a self-signed certificate of their own, so a client
    /// cannot make the server mint (and keep) a key per name it invents.
    exposed: RwLock<HashSet<String>>,
    fallback: OnceLock<Option<Arc<CertifiedKey>>>,
}

impl Certs {
    /// Serves `key` for `host` from the next handshake on.
    pub fn install(&self, host: &str, key: Arc<CertifiedKey>, kind: &'static str) {
        if let Ok(mut m) = self.by_host.write() {
            m.insert(host.to_ascii_lowercase(), (key, kind));
        }
    }

    /// What kind of certificate a host is served now (`self-signed`, `manual`, `acme`).
    pub fn kind(&self, host: &str) -> Option<&'static str> {
        self.by_host.read().ok()?.get(host).map(|(_, k)| *k)
    }

    /// The hosts exposed now: certificates of hosts no longer exposed stop being served (a
    /// handshake for them gets the shared fallback, as for any unknown name).
    fn expose(&self, hosts: HashSet<String>) {
        if let Ok(mut m) = self.by_host.write() {
            m.retain(|h, _| hosts.contains(h));
        }
        if let Ok(mut e) = self.exposed.write() {
            *e = hosts;
        }
    }

    fn generate(host: &str) -> Option<Arc<CertifiedKey>> {
        let ck = rcgen::generate_simple_self_signed(vec![host.to_string()]).ok()?;
        let key = rustls::pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).ok()?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&key).ok()?;
        Some(Arc::new(CertifiedKey::new(vec![ck.cert.der().clone()], signer)))
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // `web.test.` is `web.test`: exposed hosts are stored without the root's dot.
        let host = hello
            .server_name()
            .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
            .unwrap_or_default();
        if let Some((k, _)) = self.by_host.read().ok()?.get(&host) {
            return Some(k.clone());
        }
        if self.exposed.read().ok()?.contains(&host) {
            let k = Self::generate(&host)?;
            self.install(&host, k.clone(), "self-signed");
            return Some(k);
        }
        // Unknown or no SNI: one self-signed certificate for all of them.
        self.fallback
            .get_or_init(|| Self::generate("rune-ingress"))
            .clone()
    }
}

impl Ingress {
    /// Binds both listeners, loads the routes and starts serving.
    pub async fn start(log: Arc<Log>, cfg: IngressConfig) -> Result<Arc<Self>, IngressError> {
        let http = TcpListener::bind(cfg.http)
            .await
            .map_err(|e| IngressError::Bind(cfg.http, e))?;
        let https = std::net::TcpListener::bind(cfg.https)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| IngressError::Bind(cfg.https, e))?;
        let http_addr = http.local_addr().map_err(|e| IngressError::Bind(cfg.http, e))?;
        let https_addr = https.local_addr().map_err(|e| IngressError::Bind(cfg.https, e))?;
        let certs = Arc::new(Certs::default());
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| IngressError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(certs.clone());
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // Returning clients resume with a ticket (keys rotated by rustls every 6 h) instead of
        // a full handshake; the in-memory session cache serves clients that send session IDs.
        tls.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| IngressError::Tls(e.to_string()))?;
        // One ticket per handshake, as Go's server sends and OpenSSL's sends on resumption: a
        // returning client gets a fresh one each time, and the second (rustls sends two) was
        // a ticket sealed, written and stored by the client for nothing.
        tls.send_tls13_tickets = 1;
        // The server's order decides (see `provider`), as Go's crypto/tls does.
        tls.ignore_client_order = true;
        let exposed = match &cfg.remote {
            Some((node, _)) => Exposed::on_node(node),
            None => Exposed::default(),
        };
        let view = Arc::new(RouteView::new(certs.clone(), exposed));
        let projection = Projection::start(log, "ingress", view.clone(), cfg.stale_budget).await;
        let cap = connection_cap(cfg.max_connections);
        let ing = Arc::new(Ingress {
            view,
            rr: AtomicUsize::new(0),
            certs,
            requests: RwLock::new(HashMap::new()),
            acme: cfg.acme.clone(),
            vault: cfg.vault.clone(),
            challenges: acme::Challenges::default(),
            states: Mutex::new(BTreeMap::new()),
            projection,
            https_port: https_addr.port(),
            timeouts: cfg.timeouts,
            room: Arc::new(tokio::sync::Semaphore::new(cap)),
            cap,
        });
        let remote = cfg.remote.clone().map(|(_, r)| r);
        tokio::spawn(certificates(ing.clone()));
        tokio::spawn(serve(ing.clone(), http, None, remote.clone()));
        let workers = match cfg.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()).min(8),
            n => n,
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        for i in 0..workers {
            let l = https.try_clone().map_err(|e| IngressError::Bind(https_addr, e))?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(IngressError::Runtime)?;
            let (ing, acceptor, remote) = (ing.clone(), acceptor.clone(), remote.clone());
            std::thread::Builder::new()
                .name(format!("ingress-{i}"))
                .spawn(move || {
                    rt.block_on(async move {
                        match TcpListener::from_std(l) {
                            Ok(l) => serve(ing, l, Some(acceptor), remote).await,
                            Err(e) => tracing::error!(error = %e, "ingress worker cannot listen"),
                        }
                    });
                })
                .map_err(IngressError::Runtime)?;
        }
        tracing::info!(http = %http_addr, https = %https_addr, max_connections = cap, "ingress listening");
        Ok(ing)
    }

    /// Client connections served now (websockets included) and the cap, as nginx's
    /// `stub_status` shows active connections: at the cap, new ones wait in the backlog.
    pub fn connections(&self) -> (usize, usize) {
        (self.cap.saturating_sub(self.room.available_permits()), self.cap)
    }

    /// The routes' projection: lag, counters and the pause failpoint.
    pub fn projection(&self) -> &Arc<Projection> {
        &self.projection
    }

    /// The current routes.
    pub fn routes(&self) -> Arc<Routes> {
        self.view.routes()
    }

    /// The certificates served.
    pub fn certs(&self) -> &Arc<Certs> {
        &self.certs
    }

    /// Requests answered, by host and status.
    pub fn requests(&self) -> Vec<(String, u16, u64)> {
        let Ok(m) = self.requests.read() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (host, c) in m.iter() {
            for (i, n) in c.0.iter().enumerate() {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    out.push((host.clone(), 100 + i as u16, n));
                }
            }
        }
        out.sort();
        out
    }

    /// Counts a request: a read lock and an atomic add, no allocation once the host is known.
    fn count(&self, host: &str, status: StatusCode) {
        let i = usize::from(status.as_u16().clamp(100, 599) - 100);
        if let Ok(m) = self.requests.read() {
            if let Some(c) = m.get(host) {
                c.0[i].fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        if let Ok(mut m) = self.requests.write() {
            m.entry(host.to_string())
                .or_insert_with(|| Arc::new(StatusCounts::default()))
                .0[i]
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Each TLS host's certificate state (`pending`, `ready`, `error`) and expiry.
    pub fn certificate_states(&self) -> BTreeMap<String, acme::CertState> {
        self.states.lock().map(|m| m.clone()).unwrap_or_default()
    }

    fn set_state(&self, host: &str, state: &'static str, detail: String, not_after: i64) {
        if let Ok(mut m) = self.states.lock() {
            m.insert(
                host.to_string(),
                acme::CertState {
                    state,
                    detail,
                    not_after,
                },
            );
        }
    }

    /// A permanent redirect (308: the method and body are kept) to the same target over HTTPS.
    fn redirect(&self, host: &str, target: &str) -> Response<Body> {
        let location = match self.https_port {
            443 => format!("https://{host}{target}"),
            port => format!("https://{host}:{port}{target}"),
        };
        self.count(host, StatusCode::PERMANENT_REDIRECT);
        let mut r = plain(StatusCode::PERMANENT_REDIRECT, format!("moved to {location}\n"));
        if let Ok(v) = HeaderValue::from_str(&location) {
            r.headers_mut().insert(hyper::header::LOCATION, v);
        }
        r
    }

    async fn handle(
        self: Arc<Self>,
        client: &Backends,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        scheme: &'static str,
        open: &OpenRequest,
    ) -> Response<Body> {
        if let Some(token) = req.uri().path().strip_prefix("/.well-known/acme-challenge/") {
            let answer = self.challenges.lock().ok().and_then(|m| m.get(token).cloned());
            return match answer {
                Some(ka) => plain(StatusCode::OK, ka),
                None => plain(StatusCode::NOT_FOUND, "no such challenge\n".into()),
            };
        }
        let host = req
            .uri()
            .host()
            .map(str::to_string)
            .or_else(|| {
                req.headers()
                    .get(HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(String::from)
            })
            .unwrap_or_default();
        let host = host
            .rsplit_once(':')
            .map_or(host.as_str(), |(h, p)| {
                if p.chars().all(|c| c.is_ascii_digit()) {
                    h
                } else {
                    host.as_str()
                }
            })
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if self.projection.stale() {
            // Routes this far behind may send a request where the service no longer is. Hosts
            // come from clients: only an exposed one gets a label of its own.
            let label = if self.routes().by_host.contains_key(&host) {
                host.as_str()
            } else {
                UNKNOWN_HOST
            };
            self.count(label, StatusCode::SERVICE_UNAVAILABLE);
            return plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "the ingress's routes are behind the state; try again shortly\n".into(),
            );
        }
        if has_dot_segment(req.uri().path()) {
            // `/api/../admin` would reach a backend that resolves it as `/admin`, a path the
            // route does not expose; clients resolve dot segments before they send.
            return plain(
                StatusCode::BAD_REQUEST,
                "bad request target: dot segments\n".into(),
            );
        }
        let routes = self.routes();
        let route = routes
            .by_host
            .get(&host)
            .filter(|r| under_prefix(req.uri().path(), &r.path));
        let Some(route) = route else {
            // Hosts come from clients: unknown ones share one label, so the metric stays bounded.
            self.count(UNKNOWN_HOST, StatusCode::NOT_FOUND);
            return plain(
                StatusCode::NOT_FOUND,
                format!("no service is exposed as {host}\n"),
            );
        };
        if route.redirect && scheme == "http" {
            return self.redirect(&host, req.uri().path_and_query().map_or("/", |p| p.as_str()));
        }
        if route.endpoints.is_empty() {
            self.count(&host, StatusCode::SERVICE_UNAVAILABLE);
            return plain(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{}/{} has no ready backend\n", route.namespace, route.service),
            );
        }
        // Shared bytes, not a copy: the target is made again for each endpoint tried.
        let pq = req.uri().path_and_query().cloned();
        let n = route.endpoints.len();
        let first = self.rr.fetch_add(1, Ordering::Relaxed);
        let target = |attempt: usize| -> Option<hyper::Uri> {
            let pq = pq.as_ref().map_or("/", |p| p.as_str());
            let t = match &route.endpoints[(first + attempt) % n] {
                Backend::Here(ep) => format!("http://{ep}{pq}"),
                Backend::Elsewhere(instance) => format!(
                    "http://{instance}.{}.{}.{REMOTE_HOST}:{}{pq}",
                    route.service, route.namespace, route.port
                ),
            };
            t.parse().ok()
        };
        let bad_target = || plain(StatusCode::BAD_REQUEST, "bad request target\n".into());
        let Some(uri) = target(0) else {
            return bad_target();
        };
        let upgrade = req.headers().contains_key(hyper::header::UPGRADE);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        parts.uri = uri;
        strip_hop_by_hop(&mut parts.headers, upgrade);
        if parts.version == hyper::Version::HTTP_2 {
            join_cookies(&mut parts.headers);
        }
        // HTTP/2 requests carry the host in :authority; the backend speaks HTTP/1.1.
        parts.version = hyper::Version::HTTP_11;
        if let Ok(v) = HeaderValue::from_str(&host) {
            parts.headers.insert(HOST, v.clone());
            parts.headers.insert("x-forwarded-host", v);
        }
        let xff = match parts.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {}", peer.ip()),
            None => peer.ip().to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&xff) {
            parts.headers.insert("x-forwarded-for", v);
        }
        parts
            .headers
            .insert("x-forwarded-proto", HeaderValue::from_static(scheme));
        // Without a body the request can be sent again, to the next endpoint, when one refuses
        // the connection (an instance that just stopped, before its probe says so).
        let again = (n > 1 && hyper::body::Body::is_end_stream(&body))
            .then(|| (parts.method.clone(), parts.headers.clone()));
        let mut sent = client
            .request(Request::from_parts(parts, Either::Left(body)))
            .await;
        // The endpoint the answer (or the failure) came from, for the logs.
        let mut at = 0;
        if let Some((method, headers)) = again {
            for attempt in 1..n.min(MAX_ATTEMPTS) {
                match &sent {
                    Err(e) if e.is_connect() => {
                        let endpoint = &route.endpoints[(first + at) % n];
                        tracing::debug!(%host, ?endpoint, error = %e, "cannot connect to a backend; trying the next");
                    }
                    _ => break,
                }
                at = attempt;
                let Some(uri) = target(attempt) else {
                    return bad_target();
                };
                let mut next = Request::new(Either::Right(Empty::new()));
                *next.method_mut() = method.clone();
                *next.uri_mut() = uri;
                *next.headers_mut() = headers.clone();
                sent = client.request(next).await;
            }
        }
        match sent {
            Ok(mut resp) => {
                self.count(&host, resp.status());
                let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
                strip_hop_by_hop(resp.headers_mut(), switching);
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    if let Some(client_up) = client_upgrade {
                        let backend_up = hyper::upgrade::on(&mut resp);
                        let limit = self.timeouts.tunnel;
                        // The tunnel keeps the connection's place under the cap.
                        let place = open.0.clone();
                        tokio::spawn(async move {
                            let _place = place;
                            if let (Ok(c), Ok(b)) = (client_up.await, backend_up.await) {
                                // Every byte either way is read from one of the two sides: a
                                // read on either is the tunnel's sign of life.
                                let seen = Arc::new(LastSeen::new());
                                let touch = |seen: &Arc<LastSeen>| {
                                    let seen = seen.clone();
                                    move |bytes: &[u8]| {
                                        if !bytes.is_empty() {
                                            seen.touch();
                                        }
                                    }
                                };
                                let mut c = InspectReader::new(TokioIo::new(c), touch(&seen));
                                let mut b = InspectReader::new(TokioIo::new(b), touch(&seen));
                                tokio::select! {
                                    _ = tokio::io::copy_bidirectional(&mut c, &mut b) => {}
                                    () = seen.idle_for(limit) => {
                                        tracing::debug!(%host, ?limit, "closing an idle upgraded connection");
                                    }
                                }
                            }
                        });
                    }
                }
                resp.map(|b| b.boxed())
            }
            Err(e) => {
                let endpoint = &route.endpoints[(first + at) % n];
                tracing::debug!(%host, ?endpoint, error = %e, "backend failed");
                self.count(&host, StatusCode::BAD_GATEWAY);
                plain(
                    StatusCode::BAD_GATEWAY,
                    format!("{}/{}: backend failed\n", route.namespace, route.service),
                )
            }
        }
    }
}

/// Removes what belongs to one hop (RFC 9110 §7.6.1): the headers `Connection` names and the
/// standard hop-by-hop ones. An upgrade keeps `Connection: upgrade` and `Upgrade`, which must
/// reach the other side.
fn strip_hop_by_hop(h: &mut hyper::HeaderMap, upgrade: bool) {
    let named: Vec<String> = h
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !(t.is_empty() || (upgrade && t == "upgrade")))
        .collect();
    for n in named {
        h.remove(n.as_str());
    }
    for n in [
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
    ] {
        h.remove(n);
    }
    if upgrade {
        h.insert(hyper::header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(hyper::header::CONNECTION);
        h.remove(hyper::header::UPGRADE);
    }
}

fn plain(status: StatusCode, text: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(text))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// rustls's suites with AES-128-GCM first. Its TLS 1.3 key schedule runs on SHA-256, which
/// CPUs with SHA extensions compute in hardware; AES-256-GCM's runs on SHA-384, which ring
/// computes in portable code except on Intel CPUs with AVX. Profiled on an AMD host, SHA-384
/// was a tenth of the ingress's time per resumed TLS connection. AES-128-GCM is what Go's
/// TLS server prefers too; ChaCha20 stays for clients without AES.
fn provider() -> rustls::crypto::CryptoProvider {
    use rustls::CipherSuite as S;
    let mut p = rustls::crypto::ring::default_provider();
    // Stable: the other suites keep rustls's order.
    p.cipher_suites.sort_by_key(|c| {
        !matches!(
            c.suite(),
            S::TLS13_AES_128_GCM_SHA256
                | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    p
}

/// A pool of keep-alive connections to the backends. Each serving loop has its own, so a
/// request and the backend connection it uses are driven by the same thread.
type Backends = Client<Connector, Either<Incoming, Empty<Bytes>>>;

/// Endpoints one request without a body may try, each once, while they refuse the connection
/// (as nginx's `proxy_next_upstream error`): enough to step over an instance that just
/// stopped without making a client wait out many connect timeouts.
const MAX_ATTEMPTS: usize = 3;

/// Dials backends: at their address, or, for an instance on another node (a
/// [`REMOTE_HOST`] name), through [`Remote`].
#[derive(Clone)]
struct Connector {
    http: HttpConnector,
    remote: Option<Arc<dyn Remote>>,
}

/// Client connections the ingress serves at once, its listeners together; more wait in the
/// kernel's backlog. By default a quarter of the process's file descriptors (a client
/// connection may hold a backend one too), so raft, the log and the API keep theirs; a cap
/// set by hand is kept, with a warning when it could starve them.
fn connection_cap(set: Option<usize>) -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limit into the struct it is given, nothing else.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        1024
    };
    let quarter = usize::try_from(soft / 4).unwrap_or(usize::MAX);
    match set {
        Some(n) => {
            if n > quarter.saturating_mul(2) {
                tracing::warn!(
                    max_connections = n,
                    open_files_limit = soft,
                    "ingress.max-connections is above half the open-files limit: at the cap, \
                     client and backend sockets could take the descriptors the log and the API need"
                );
            }
            n.clamp(1, tokio::sync::Semaphore::MAX_PERMITS)
        }
        None => quarter.clamp(64, 65_536),
    }
}

/// A connection's stream until its first byte: a client that connects (or finishes its TLS
/// handshake) and sends nothing is cut off after the header timeout ([`Timeouts::header`]).
/// hyper's own header timer starts only once it has read enough to tell HTTP/1 from HTTP/2,
/// so without this a silent client would hold its connection, and a place under the cap, for
/// ever.
struct FirstByte<S> {
    inner: S,
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S> FirstByte<S> {
    fn new(inner: S, timeout: Duration) -> Self {
        FirstByte {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep(timeout))),
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for FirstByte<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::future::Future;
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.deadline.is_none() {
            return r;
        }
        if r.is_ready() && buf.filled().len() > before {
            self.deadline = None;
        } else if r.is_pending()
            && self
                .deadline
                .as_mut()
                .is_some_and(|d| d.as_mut().poll(cx).is_ready())
        {
            return std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no request from the client in time",
            )));
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for FirstByte<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// When something last happened on a connection, for its idle timer: read and set per
/// request or per read and write, so a clock reading rather than a lock.
struct LastSeen {
    start: tokio::time::Instant,
    /// Milliseconds from `start`.
    at_ms: AtomicU64,
}

impl LastSeen {
    fn new() -> Self {
        LastSeen {
            start: tokio::time::Instant::now(),
            at_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.at_ms.store(ms, Ordering::Release);
    }

    /// How long since the last touch (or the start).
    fn since(&self) -> Duration {
        self.start
            .elapsed()
            .saturating_sub(Duration::from_millis(self.at_ms.load(Ordering::Acquire)))
    }

    /// Resolves once nothing has touched it for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let left = limit.saturating_sub(self.since());
            if left.is_zero() {
                return;
            }
            tokio::time::sleep(left).await;
        }
    }
}

/// A connection's requests in progress, from their head until their response body is sent
/// or dropped, and when the last one ended: what its idle timer reads. It also holds the
/// connection's place under the cap, for as long as the connection or a tunnel it was
/// upgraded to (which outlives hyper's connection) holds this.
struct Requests {
    open: AtomicUsize,
    ended: LastSeen,
    _place: tokio::sync::OwnedSemaphorePermit,
}

impl Requests {
    fn new(place: tokio::sync::OwnedSemaphorePermit) -> Arc<Self> {
        Arc::new(Requests {
            open: AtomicUsize::new(0),
            ended: LastSeen::new(),
            _place: place,
        })
    }

    fn begin(self: &Arc<Self>) -> OpenRequest {
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenRequest(self.clone())
    }

    /// How long no request has been open (zero while one is).
    fn idle(&self) -> Duration {
        // Acquire: a count of zero comes with the end time written before it.
        if self.open.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        self.ended.since()
    }
}

/// One request in progress; its end is when this is dropped.
struct OpenRequest(Arc<Requests>);

impl Drop for OpenRequest {
    fn drop(&mut self) {
        // The time first: a timer that sees no request open then reads this end.
        self.0.ended.touch();
        self.0.open.fetch_sub(1, Ordering::Release);
    }
}

/// A response body that keeps its request open until it is sent (or dropped): a long
/// download is not an idle connection.
struct Counted {
    body: Body,
    _open: OpenRequest,
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Whether `path` lies under the route prefix `prefix`, segment by segment: `/api` holds
/// `/api` and `/api/x`, not `/apiary`.
fn under_prefix(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Whether `path` holds a `.` or `..` segment, spelt out or percent-encoded, between slashes
/// or backslashes (either also encoded: a backend may decode `%2F` or take `\` for `/` before
/// it resolves the path). An encoded slash alone is fine: APIs use it inside a segment.
/// Reads the path once, decoding as it goes, and allocates nothing: it runs on every request.
fn has_dot_segment(path: &str) -> bool {
    let b = path.as_bytes();
    // Characters in the current segment, and whether all of them are dots.
    let (mut len, mut dots) = (0usize, true);
    let mut i = 0;
    loop {
        let (c, step) = match b.get(i) {
            None => (b'/', 1),
            Some(b'%') if i + 2 < b.len() => match (b[i + 1], b[i + 2].to_ascii_lowercase()) {
                (b'2', b'e') => (b'.', 3),
                (b'2', b'f') | (b'5', b'c') => (b'/', 3),
                _ => (b'%', 1),
            },
            Some(b'\\') => (b'/', 1),
            Some(&c) => (c, 1),
        };
        if c == b'/' {
            if dots && (1..=2).contains(&len) {
                return true;
            }
            if i >= b.len() {
                return false;
            }
            (len, dots) = (0, true);
        } else {
            len += 1;
            dots &= c == b'.';
        }
        i += step;
    }
}

/// Joins the separate `cookie` fields an HTTP/2 client may send into one, as RFC 9113
/// §8.2.3 asks before a request goes on over HTTP/1.1 (where many servers read only the
/// first `Cookie` line).
fn join_cookies(headers: &mut hyper::HeaderMap) {
    let cookie = hyper::header::COOKIE;
    if headers.get_all(&cookie).iter().nth(1).is_none() {
        return;
    }
    let mut joined = Vec::new();
    for v in headers.get_all(&cookie) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(cookie, v);
    }
}

/// How long a backend may take to accept, on this node or through another.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl tower_service::Service<hyper::Uri> for Connector {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: hyper::Uri) -> Self::Future {
        let elsewhere = uri
            .host()
            .and_then(|h| h.strip_suffix(REMOTE_HOST)?.strip_suffix('.'))
            .and_then(|h| {
                let mut parts = h.split('.');
                match (parts.next(), parts.next(), parts.next(), parts.next()) {
                    (Some(i), Some(s), Some(n), None) => Some((i.to_string(), s.to_string(), n.to_string())),
                    _ => None,
                }
            });
        match (elsewhere, &self.remote) {
            (Some((instance, service, namespace)), Some(remote)) => {
                let port = uri.port_u16().unwrap_or(80);
                let remote = remote.clone();
                Box::pin(async move {
                    let dial = remote.dial(&namespace, &service, &instance, port);
                    let s = tokio::time::timeout(CONNECT_TIMEOUT, dial)
                        .await
                        .map_err(|_| format!("{instance}: no answer through its node in time"))??;
                    let _ = s.set_nodelay(true);
                    Ok(TokioIo::new(s))
                })
            }
            (Some(_), None) => {
                Box::pin(async { Err("an instance on another node, and no way to reach it".into()) })
            }
            (None, _) => {
                let connecting = self.http.call(uri);
                Box::pin(async move { connecting.await.map_err(Into::into) })
            }
        }
    }
}

fn backends(remote: Option<Arc<dyn Remote>>) -> Backends {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    Client::builder(TokioExecutor::new()).build(Connector { http, remote })
}

/// Accepts and serves connections on the current runtime. HTTPS runs one of these per worker
/// thread on a shared listener, as nginx runs workers: a connection, its requests and its
/// backend connection stay on one thread, so no request waits on a wake-up across threads.
async fn serve(
    ing: Arc<Ingress>,
    l: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    remote: Option<Arc<dyn Remote>>,
) {
    let client = backends(remote);
    loop {
        let (tcp, peer) = match l.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "ingress accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        // At the cap, this loop holds the one connection it accepted until a place frees, and
        // accepts no other meanwhile: the rest wait in the listen backlog, and the ingress
        // never takes the file descriptors raft, the log and the API need. (A place taken
        // before the accept would be held by every idle loop, the HTTPS workers' too: a small
        // cap would leave the HTTP listener none.)
        let Ok(permit) = ing.room.clone().acquire_owned().await else {
            return;
        };
        let _ = tcp.set_nodelay(true);
        let (ing, tls, client) = (ing.clone(), tls.clone(), client.clone());
        tokio::spawn(async move {
            let scheme = if tls.is_some() { "https" } else { "http" };
            let timeouts = ing.timeouts;
            let requests = Requests::new(permit);
            let counted = requests.clone();
            let svc = hyper::service::service_fn(move |req| {
                let (ing, client, open) = (ing.clone(), client.clone(), counted.begin());
                async move {
                    let resp = ing.handle(&client, req, peer, scheme, &open).await;
                    Ok::<_, std::convert::Infallible>(resp.map(|body| Counted { body, _open: open }))
                }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            // A client that sends no request (or stops halfway through its head) is closed
            // after the header timeout, an idle keep-alive connection too; without a timer
            // hyper waits forever. HTTP/2 connections are pinged and closed when the peer is
            // gone, and closed when idle (below).
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(timeouts.header);
            builder
                .http2()
                .timer(TokioTimer::new())
                .keep_alive_interval(Some(timeouts.header))
                // Generous: a ping's answer may queue behind a slow upload's bytes.
                .keep_alive_timeout(Duration::from_secs(60));
            let r = match tls {
                None => {
                    let io = TokioIo::new(FirstByte::new(tcp, timeouts.header));
                    let conn = builder.serve_connection_with_upgrades(io, svc);
                    UntilIdle::new(conn, |c| c.graceful_shutdown(), requests, timeouts.idle).await
                }
                Some(acc) => match tokio::time::timeout(Duration::from_secs(10), acc.accept(tcp)).await {
                    Ok(Ok(s)) => {
                        let io = TokioIo::new(FirstByte::new(s, timeouts.header));
                        let conn = builder.serve_connection_with_upgrades(io, svc);
                        UntilIdle::new(conn, |c| c.graceful_shutdown(), requests, timeouts.idle).await
                    }
                    _ => return,
                },
            };
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "ingress connection ended with an error");
            }
        });
    }
}

/// Serves a connection to its end, asking it to finish (`close`: hyper's graceful shutdown,
/// for HTTP/2 a GOAWAY) once no request has been open on it for `idle`. Keep-alive pings do
/// not count: a client that only answers them would hold a connection, and a place under the
/// cap, for nothing. A future by hand rather than an `async fn`: the compiler cannot tell
/// that the latter, generic over hyper's connection, is `Send`.
struct UntilIdle<F, C> {
    conn: std::pin::Pin<Box<F>>,
    close: C,
    requests: Arc<Requests>,
    idle: Duration,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    closing: bool,
}

impl<F: std::future::Future, C: FnMut(std::pin::Pin<&mut F>)> UntilIdle<F, C> {
    fn new(conn: F, close: C, requests: Arc<Requests>, idle: Duration) -> Self {
        UntilIdle {
            conn: Box::pin(conn),
            close,
            requests,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            closing: false,
        }
    }
}

impl<F: std::future::Future, C: FnMut(std::pin::Pin<&mut F>) + Unpin> std::future::Future
    for UntilIdle<F, C>
{
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        let this = self.get_mut();
        if let std::task::Poll::Ready(r) = this.conn.as_mut().poll(cx) {
            return std::task::Poll::Ready(r);
        }
        while !this.closing && this.timer.as_mut().poll(cx).is_ready() {
            // Zero while a request is open: the whole period is waited again.
            let quiet = this.requests.idle();
            if quiet >= this.idle {
                (this.close)(this.conn.as_mut());
                this.closing = true;
                // The shutdown goes on only when the connection is polled.
                return this.conn.as_mut().poll(cx);
            }
            let next = tokio::time::Instant::now() + (this.idle - quiet);
            this.timer.as_mut().reset(next);
        }
        std::task::Poll::Pending
    }
}

/// How often stored certificates are checked against the exposed hosts.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// ACME orders in flight at most: enough that one slow order holds nobody back, few enough
/// that a first start with many hosts does not trip the server's new-order rate limit.
const MAX_ORDERS: usize = 8;

/// How long one order may take, account creation included: an ACME server that accepts a
/// connection and then stalls must not hold the host (or, at the first order, every host)
/// for ever. Orders take seconds.
const ORDER_TIMEOUT: Duration = Duration::from_secs(300);

/// A host's failed orders: when to try again, the current backoff, and the last error (shown
/// while a valid certificate keeps serving, so a failing renewal is seen before it expires).
type Retries = HashMap<String, (tokio::time::Instant, Duration, String)>;

/// Keeps every TLS host's certificate current: manual ones from their secret, ACME ones from
/// the vault, ordered when missing or due, with backoff on failure. Orders run side by side
/// ([`MAX_ORDERS`] at most, one per host), so a slow or failing order does not hold the others
/// back. Stored
/// certificates of hosts no longer exposed are deleted once `keep_unexposed` has passed.
async fn certificates(ing: Arc<Ingress>) {
    let mut installed: HashMap<String, Vec<u8>> = HashMap::new();
    let mut retry_at: Retries = HashMap::new();
    let mut checked: HashMap<String, (tokio::time::Instant, i64)> = HashMap::new();
    let account: Arc<tokio::sync::OnceCell<instant_acme::Account>> = Arc::default();
    let mut orders: tokio::task::JoinSet<Result<(), String>> = tokio::task::JoinSet::new();
    let mut ordering: HashMap<tokio::task::Id, String> = HashMap::new();
    let mut unexposed: HashMap<String, tokio::time::Instant> = HashMap::new();
    let mut swept: Option<tokio::time::Instant> = None;
    loop {
        while let Some(done) = orders.try_join_next_with_id() {
            let (id, result) = match done {
                Ok((id, r)) => (id, r),
                Err(e) => (e.id(), Err(format!("the order task failed: {e}"))),
            };
            let Some(host) = ordering.remove(&id) else {
                continue;
            };
            ordered(&ing, &host, result, &mut retry_at);
            // Read back from the vault on this pass.
            checked.remove(&host);
        }
        let routes = ing.routes();
        for (host, r) in &routes.by_host {
            let (ns, name) = match r.tls.as_str() {
                "manual" => match &r.secret {
                    Some(s) => (r.namespace.clone(), s.clone()),
                    None => {
                        ing.set_state(host, "error", "tls.mode manual needs tls.secretName".into(), 0);
                        continue;
                    }
                },
                "acme" => (acme::SYSTEM_NAMESPACE.to_string(), acme::cert_secret_name(host)),
                _ => continue,
            };
            let kind = if r.tls == "manual" { "manual" } else { "acme" };
            // What the resolver serves: a host taken away and put back between two passes lost
            // its certificate there (and may hold a self-signed one) though `installed` has it.
            let served = ing.certs.kind(host) == Some(kind);
            // A served certificate that is not due is looked at again every 10 s (a changed
            // manual secret shows up then), not on every pass.
            let fresh = checked
                .get(host)
                .is_some_and(|(at, renew)| at.elapsed() < Duration::from_secs(10) && *renew > unix_now());
            if fresh && served && installed.contains_key(host) {
                continue;
            }
            let stored = match ing.vault.get(&ns, &name) {
                Ok(s) => s,
                Err(e) => {
                    ing.set_state(host, "error", e, 0);
                    continue;
                }
            };
            let mut due = true;
            if let Some(data) = stored {
                let (crt, key) = (
                    data.get("tls.crt").cloned().unwrap_or_default(),
                    data.get("tls.key").cloned().unwrap_or_default(),
                );
                match acme::load_pair(&crt, &key) {
                    Ok(l) => {
                        if installed.get(host) != Some(&crt) || !served {
                            ing.certs.install(host, l.key.clone(), kind);
                            installed.insert(host.clone(), crt.clone());
                            tracing::info!(%host, kind, not_after = l.not_after, "certificate installed");
                        }
                        let renew = if kind == "acme" {
                            acme::renew_at(&l, ing.acme.renew_before)
                        } else {
                            i64::MAX
                        };
                        due = renew <= unix_now();
                        checked.insert(host.clone(), (tokio::time::Instant::now(), renew));
                        if l.not_after > unix_now() {
                            let detail = match retry_at.get(host) {
                                Some((_, _, e)) => format!("renewal failed, retrying: {e}"),
                                None => String::new(),
                            };
                            ing.set_state(host, "ready", detail, l.not_after);
                        } else {
                            ing.set_state(host, "error", "the certificate has expired".into(), l.not_after);
                        }
                    }
                    Err(e) => ing.set_state(host, "error", format!("secret {ns}/{name}: {e}"), 0),
                }
            } else if kind == "manual" {
                ing.set_state(host, "error", format!("secret {ns}/{name} not found"), 0);
            }
            let backing_off = retry_at
                .get(host)
                .is_some_and(|(at, _, _)| tokio::time::Instant::now() < *at);
            if kind != "acme" || !due || backing_off || ordering.values().any(|h| h == host) {
                continue;
            }
            if ordering.len() >= MAX_ORDERS {
                // The rest wait for a free slot (ACME servers limit new orders per account).
                continue;
            }
            if !installed.contains_key(host) {
                ing.set_state(
                    host,
                    "pending",
                    "ordering a certificate; serving a self-signed one meanwhile".into(),
                    0,
                );
            }
            let (ing2, account, host2) = (ing.clone(), account.clone(), host.clone());
            let task = orders.spawn(async move {
                tokio::time::timeout(ORDER_TIMEOUT, order(&ing2, &account, &host2, &name))
                    .await
                    .unwrap_or_else(|_| {
                        Err(format!(
                            "no answer from the ACME server within {} s",
                            ORDER_TIMEOUT.as_secs()
                        ))
                    })
            });
            ordering.insert(task.id(), host.clone());
        }
        // What is no longer exposed: forgotten here, and its stored certificate deleted later.
        installed.retain(|h, _| routes.by_host.contains_key(h));
        checked.retain(|h, _| routes.by_host.contains_key(h));
        retry_at.retain(|h, _| routes.by_host.contains_key(h));
        if let Ok(mut m) = ing.states.lock() {
            m.retain(|h, _| {
                routes
                    .by_host
                    .get(h)
                    .is_some_and(|r| r.tls == "acme" || r.tls == "manual")
            });
        }
        if swept.is_none_or(|at| at.elapsed() >= SWEEP_EVERY) {
            sweep(&ing, &routes, &ordering, &mut unexposed).await;
            swept = Some(tokio::time::Instant::now());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Orders a certificate for `host` and stores it as the secret `name`.
async fn order(
    ing: &Ingress,
    account: &tokio::sync::OnceCell<instant_acme::Account>,
    host: &str,
    name: &str,
) -> Result<(), String> {
    let acct = account
        .get_or_try_init(|| acme::account(&ing.acme, ing.vault.as_ref()))
        .await?;
    let (chain, key) = acme::order(acct, host, &ing.challenges).await?;
    acme::load_pair(chain.as_bytes(), key.as_bytes())?;
    let data = BTreeMap::from([
        ("tls.crt".to_string(), chain.into_bytes()),
        ("tls.key".to_string(), key.into_bytes()),
    ]);
    ing.vault.put(acme::SYSTEM_NAMESPACE, name, data).await
}

/// Takes the result of one host's order: clears its backoff, or doubles it (30 s to 1 h).
fn ordered(ing: &Ingress, host: &str, result: Result<(), String>, retry_at: &mut Retries) {
    match result {
        Ok(()) => {
            retry_at.remove(host);
            tracing::info!(%host, "certificate issued");
        }
        Err(e) => {
            let wait = retry_at.get(host).map_or(Duration::from_secs(30), |(_, w, _)| {
                (*w * 2).min(Duration::from_secs(3600))
            });
            tracing::warn!(%host, error = %e, retry_in = ?wait, "certificate order failed");
            // A valid certificate keeps serving (and stays "ready") while renewal retries: the
            // next pass reads it back and puts this failure in its detail.
            let serving = ing
                .certificate_states()
                .get(host)
                .is_some_and(|c| c.state == "ready");
            if !serving {
                ing.set_state(host, "error", e.clone(), 0);
            }
            retry_at.insert(host.to_string(), (tokio::time::Instant::now() + wait, wait, e));
        }
    }
}

/// Deletes the stored certificates of hosts that have not been exposed with ACME for
/// `keep_unexposed`. Only while the routes are current: routes that lag (or were never built)
/// would make every host look gone.
async fn sweep(
    ing: &Ingress,
    routes: &Routes,
    ordering: &HashMap<tokio::task::Id, String>,
    unexposed: &mut HashMap<String, tokio::time::Instant>,
) {
    if ing.projection.stale() || ing.projection.stale_seconds() > 0.0 {
        return;
    }
    let names = match ing.vault.names(acme::SYSTEM_NAMESPACE, acme::CERT_SECRET_PREFIX) {
        Ok(n) => n,
        Err(e) => {
            tracing::debug!(error = %e, "cannot list stored certificates");
            return;
        }
    };
    let wanted: HashSet<String> = routes
        .by_host
        .iter()
        .filter(|(_, r)| r.tls == "acme")
        .map(|(h, _)| h)
        .chain(ordering.values())
        .map(|h| acme::cert_secret_name(h))
        .collect();
    let gone: HashSet<String> = names
        .into_iter()
        .filter(|n| acme::is_cert_secret_name(n) && !wanted.contains(n))
        .collect();
    unexposed.retain(|n, _| gone.contains(n));
    let now = tokio::time::Instant::now();
    for name in gone {
        let since = *unexposed.entry(name.clone()).or_insert(now);
        if now.duration_since(since) < ing.acme.keep_unexposed {
            continue;
        }
        match ing.vault.delete(acme::SYSTEM_NAMESPACE, &name).await {
            Ok(()) => {
                unexposed.remove(&name);
                tracing::info!(secret = %name, "deleted the certificate of a host no longer exposed");
            }
            Err(e) => {
                tracing::warn!(secret = %name, error = %e, "cannot delete the certificate of a host no longer exposed")
            }
        }
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The projection's view: the exposed services, and the routes made from them, swapped whole
/// for the next request when a delta touches an exposed service.
struct RouteView {
    exposed: Mutex<Exposed>,
    routes: RwLock<Arc<Routes>>,
    certs: Arc<Certs>,
}

impl RouteView {
    fn new(certs: Arc<Certs>, exposed: Exposed) -> Self {
        RouteView {
            exposed: Mutex::new(exposed),
            routes: RwLock::new(Arc::new(Routes::default())),
            certs,
        }
    }

    fn routes(&self) -> Arc<Routes> {
        self.routes.read().map(|r| r.clone()).unwrap_or_default()
    }

    fn publish(&self, exposed: &Exposed) -> Result<(), ProjectionError> {
        let routes = exposed.routes();
        self.certs.expose(routes.by_host.keys().cloned().collect());
        *self
            .routes
            .write()
            .map_err(|e| ProjectionError::View(e.to_string()))? = Arc::new(routes);
        Ok(())
    }
}

impl View for RouteView {
    async fn reset(&self, state: Vec<Delta>) -> Result<(), ProjectionError> {
        let mut fresh = self
            .exposed
            .lock()
            .map_err(|e| ProjectionError::View(e.to_string()))?
            .emptied();
        for d in &state {
            fresh.apply(d);
        }
        self.publish(&fresh)?;
        *self
            .exposed
            .lock()
            .map_err(|e| ProjectionError::View(e.to_string()))? = fresh;
        Ok(())
    }

    async fn apply(&self, deltas: &[&Delta]) -> Result<(), ProjectionError> {
        let mut exposed = self
            .exposed
            .lock()
            .map_err(|e| ProjectionError::View(e.to_string()))?;
        let mut changed = false;
        for d in deltas {
            changed |= exposed.apply(d);
        }
        if changed {
            self.publish(&exposed)?;
        }
        Ok(())
    }

    fn wants(&self, d: &Delta) -> bool {
        !matches!(d, Delta::Instance { .. } | Delta::Placement { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_prefix_holds_whole_segments_only() {
        assert!(under_prefix("/api", "/api"));
        assert!(under_prefix("/api/v1", "/api"));
        assert!(!under_prefix("/apiary", "/api"));
        assert!(under_prefix("/api/v1", "/api/"));
        assert!(under_prefix("/anything", "/"));
        assert!(!under_prefix("/", "/api"));
    }

    #[test]
    fn dot_segments_are_found_spelt_out_or_encoded() {
        for bad in ["/api/../admin", "/api/./x", "/api/%2e%2E/admin", "/..", "/api/."] {
            assert!(has_dot_segment(bad), "{bad}");
        }
        for bad in ["/api/x%2f..%2fadmin", "/api/x%5C..%5cadmin", "/api\\..\\admin"] {
            assert!(has_dot_segment(bad), "{bad}");
        }
        assert!(has_dot_segment("/api/%2e"), "an encoded dot at the very end");
        for good in [
            "/a%2",
            "/",
            "",
            "/api/x.y",
            "/api/..x",
            "/.well-known/x",
            "/a...b/",
            "/api/group%2Fproject",
        ] {
            assert!(!has_dot_segment(good), "{good}");
        }
    }

    #[test]
    fn http2_cookie_fields_become_one_line() {
        let mut h = hyper::HeaderMap::new();
        h.append(hyper::header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(hyper::header::COOKIE, HeaderValue::from_static("b=2"));
        join_cookies(&mut h);
        let all: Vec<_> = h.get_all(hyper::header::COOKIE).iter().collect();
        assert_eq!(all, [HeaderValue::from_static("a=1; b=2")]);
        // One field is left as it is.
        join_cookies(&mut h);
        assert_eq!(h.get_all(hyper::header::COOKIE).iter().count(), 1);
    }
}
