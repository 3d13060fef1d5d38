//! The data plane: traffic to `VIP:port` reaches a ready endpoint of the service, and network
//! policy decides who may connect to whom.
//!
//! It is a projection of the applied log ([`rune_log::projection`]), like the DNS: a
//! [`table::Table`] built from the state and changed by each delta after it; only the services
//! a batch of entries touched get their listeners opened or closed. It fails closed: past the
//! stale budget new connections through the proxy are reset (an operator's port-forward is not
//! refused).
//!
//! Two halves share one decision ([`policy::decide`]):
//! - the user-space proxy ([`proxy`]), one listener per service port on a stable local port
//!   (`127.0.0.1` in dev mode), which balances, enforces policy and counts;
//! - in production mode, an nftables table of its own ([`nft`]) that drops denied traffic in
//!   the kernel before it reaches anything, forwards a VIP port whose endpoints all run on this
//!   node itself (DNAT, as kube-proxy's nftables mode does: the bytes cross the TCP stack
//!   once), and redirects every other VIP port to the proxy (endpoints on other nodes,
//!   fewest-connections balancing, or this host's own traffic while a policy needs its source
//!   named). A stale view leaves every VIP to the proxy.

#![warn(missing_docs)]

pub mod gateway;
mod libnft;
pub mod live;
pub mod nft;
pub mod owner;
pub mod policy;
pub mod ports;
pub mod proxy;
mod splice;
pub mod table;
#[cfg(feature = "testing")]
pub mod testing;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};

use rune_log::projection::{Projection, ProjectionError, View};
use rune_log::Log;
use rune_statemachine::delta::Delta;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use policy::{decide, Decision, Source, SvcKey, Target};
use ports::{book_key, PortBook};
use table::Table;

/// Proxy listeners opened before the data plane lets the other followers of the log run.
const LISTENERS_PER_TURN: usize = 64;

/// Settings of the data plane.
#[derive(Debug, Clone)]
pub struct DataPlaneConfig {
    /// This node: only its instances are local.
    pub node: String,
    /// Where the proxy listens (`127.0.0.1` in dev mode; all addresses when nftables
    /// redirects VIP traffic from containers and other hosts to it).
    pub listen: IpAddr,
    /// The range proxy ports are taken from.
    pub port_range: (u16, u16),
    /// The file that remembers each service port's proxy port.
    pub ports_file: PathBuf,
    /// Program nftables (production mode); off in dev mode.
    pub kernel: bool,
    /// The nftables table runed owns (family `inet`).
    pub nft_table: String,
    /// How long the view may lag the log before new connections are refused.
    pub stale_budget: Duration,
    /// How long to wait for an endpoint to accept.
    pub connect_timeout: Duration,
}

/// Failures of the data plane's operations.
#[derive(Debug, thiserror::Error)]
pub enum DpError {
    /// No such service.
    #[error("service {0} not found")]
    NoService(String),
    /// The service has no such port.
    #[error("service {0} has no TCP port {1}")]
    NoPort(String, String),
    /// Nothing is ready to take the connection.
    #[error("service {0} has no ready endpoint for port {1}")]
    NoEndpoint(String, u16),
}

/// Whether the kernel enforces policy, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelStatus {
    /// nftables programmed and current.
    pub enforcing: bool,
    /// A sentence for the operator.
    pub detail: String,
    /// How long the last program took to load.
    pub last_program: Duration,
    /// `VIP . port`s the loaded table forwards itself (DNAT to an endpoint here) for this
    /// node's containers and for this host: connections the proxy, and its counters, never
    /// see. Zero while the view is stale (every VIP is then the proxy's).
    pub kernel_forwarded: KernelForwarded,
}

/// How many `VIP . port`s the kernel forwards without the proxy, by where the connection
/// comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelForwarded {
    /// From this node's containers.
    pub from_containers: usize,
    /// From this host's own processes.
    pub from_host: usize,
}

/// One service's connection and byte counters: atomics, so the proxy's hot path takes no lock.
#[derive(Debug, Default)]
pub struct SvcCounters {
    forwarded: AtomicU64,
    denied: AtomicU64,
    no_endpoint: AtomicU64,
    stale: AtomicU64,
    from_node: AtomicU64,
    to_endpoint: AtomicU64,
    to_client: AtomicU64,
}

impl SvcCounters {
    fn connection(&self, result: &'static str) {
        let c = match result {
            "forwarded" => &self.forwarded,
            "denied" => &self.denied,
            "no_endpoint" => &self.no_endpoint,
            "from_node" => &self.from_node,
            _ => &self.stale,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn add_bytes(&self, to_endpoint: u64, to_client: u64) {
        self.to_endpoint.fetch_add(to_endpoint, Ordering::Relaxed);
        self.to_client.fetch_add(to_client, Ordering::Relaxed);
    }
}

/// Counters of the data plane, read by the daemon's metrics.
#[derive(Debug, Default)]
pub struct Stats {
    per_service: Mutex<BTreeMap<SvcKey, Arc<SvcCounters>>>,
    drops: Mutex<BTreeMap<(SvcKey, &'static str, &'static str), u64>>,
    /// Open connections through the proxy.
    pub active: AtomicI64,
    /// Connections to the gateway closed unserved: from an address that is no other node's
    /// gateway, or without the cluster's gateway key.
    pub gateway_strangers: AtomicU64,
}

impl Stats {
    /// The counters of a service, created on first use (once per listener, not per connection).
    fn of(&self, k: &SvcKey) -> Arc<SvcCounters> {
        match self.per_service.lock() {
            Ok(mut m) => m.entry(k.clone()).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }

    fn drop(&self, k: &SvcKey, policy: &'static str, reason: &'static str) {
        if let Ok(mut m) = self.drops.lock() {
            *m.entry((k.clone(), policy, reason)).or_default() += 1;
        }
    }

    fn each<const N: usize>(
        &self,
        f: impl Fn(&SvcCounters) -> [(&'static str, u64); N],
    ) -> Vec<(SvcKey, &'static str, u64)> {
        let Ok(m) = self.per_service.lock() else {
            return Vec::new();
        };
        m.iter()
            .flat_map(|(k, c)| {
                f(c).into_iter()
                    .filter(|(_, n)| *n > 0)
                    .map(|(l, n)| (k.clone(), l, n))
            })
            .collect()
    }

    /// Connections by service and result (`forwarded`, `denied`, `no_endpoint`, `stale`, and
    /// `from_node`: taken by this node's gateway for one of its instances).
    pub fn connections(&self) -> Vec<(SvcKey, &'static str, u64)> {
        self.each(|c| {
            [
                ("forwarded", c.forwarded.load(Ordering::Relaxed)),
                ("denied", c.denied.load(Ordering::Relaxed)),
                ("no_endpoint", c.no_endpoint.load(Ordering::Relaxed)),
                ("stale", c.stale.load(Ordering::Relaxed)),
                ("from_node", c.from_node.load(Ordering::Relaxed)),
            ]
        })
    }

    /// Bytes by service and direction (`to_endpoint`, `to_client`).
    pub fn byte_counts(&self) -> Vec<(SvcKey, &'static str, u64)> {
        self.each(|c| {
            [
                ("to_endpoint", c.to_endpoint.load(Ordering::Relaxed)),
                ("to_client", c.to_client.load(Ordering::Relaxed)),
            ]
        })
    }
}

struct Kernel {
    status: KernelStatus,
    /// The view's model, kept per change (see [`live`]).
    live: live::Live,
    /// The services changed since `live` was last brought up to date (all, at first).
    pending: Pending,
    /// Whether the kernel holds `live`'s model (as of its last update): then a change is
    /// its patch, and drops are attributed by it.
    live_loaded: bool,
    /// Otherwise the model this runed last loaded: what the kernel holds while
    /// `status.enforcing` (a stale view's, every VIP left to the proxy); after a failure,
    /// still what its drop counts are attributed by.
    model: Option<Arc<nft::Model>>,
    /// Drops by policy carried over from addresses whose counts were deleted (they left their
    /// policy, or the table was loaded whole).
    carried: BTreeMap<String, u64>,
    /// The latest reading, by address.
    read: nft::Drops,
    /// Bumped by every load, so a reading of a table that was replaced meanwhile is dropped.
    generation: u64,
    /// The VIPs the loaded table redirects (a failed load leaves the old table, and these).
    vips: HashSet<Ipv4Addr>,
    /// When to load the table again although nothing changed: after a failed load (with
    /// backoff), and at start until a first load (so a view that could not be built still
    /// replaces the previous run's table with one refusing every VIP). `None` once loaded,
    /// or when there is no nftables to load into.
    retry_at: Option<Instant>,
    /// Failed loads in a row, for the backoff.
    failures: u32,
}

impl Kernel {
    /// The model whose drops the kernel counts: the one it holds, or held last.
    fn counting(&self) -> Option<&nft::Model> {
        if self.live_loaded {
            Some(self.live.model())
        } else {
            self.model.as_deref()
        }
    }
}

/// Services changed since the kernel's model was last brought up to date.
enum Pending {
    /// Every service (at start, and after a view rebuilt whole).
    All,
    /// These.
    Some(BTreeSet<SvcKey>),
}

impl Pending {
    fn add(&mut self, changed: Option<&BTreeSet<SvcKey>>) {
        match (&mut *self, changed) {
            (Pending::Some(s), Some(c)) => s.extend(c.iter().cloned()),
            (_, None) => *self = Pending::All,
            (Pending::All, Some(_)) => {}
        }
    }
}

struct Listener {
    port: u16,
    task: JoinHandle<()>,
}

/// The proxy's ports, as the kernel's model asks for them.
struct ListenerPorts<'a>(&'a HashMap<(SvcKey, u16), Listener>);

impl live::ProxyPorts for ListenerPorts<'_> {
    fn proxy_port(&self, svc: &SvcKey, port: u16) -> Option<u16> {
        self.0.get(&(svc.clone(), port)).map(|l| l.port)
    }
}

/// Dev mode's listeners for containers (no nftables redirects VIPs there).
#[derive(Default)]
struct ContainerSide {
    /// The container network's gateway, once known.
    at: Option<IpAddr>,
    /// By service port: the service holding it and its listener.
    listeners: HashMap<u16, (SvcKey, JoinHandle<()>)>,
    /// Ports another service holds already, said once per service.
    refused: HashSet<(SvcKey, u16)>,
}

/// The running data plane.
pub struct DataPlane {
    cfg: DataPlaneConfig,
    table: RwLock<Arc<Table>>,
    projection: OnceLock<Arc<Projection>>,
    book: Mutex<PortBook>,
    listeners: Mutex<HashMap<(SvcKey, u16), Listener>>,
    /// Dev mode: where containers reach services (their network's gateway), and the listeners
    /// there, one per service port (`api:8080` is `gateway:8080`).
    containers: Mutex<ContainerSide>,
    kernel: Mutex<Kernel>,
    /// The open libnftables context (production mode), or why there is none.
    nft: Result<nft::Nft, String>,
    active: Mutex<HashMap<proxy::Route, usize>>,
    /// Round-robin position of port-forward connections.
    forward_rr: AtomicUsize,
    /// Set when someone read the drops: the kernel's counters are then read again. Listing
    /// them costs nft ~140 ms at 1,000 policy chains, too much to do every 2 s for nobody.
    counters_wanted: AtomicBool,
    /// The cluster's gateway key, once the gateway serves ([`DataPlane::serve_gateway`]).
    gateway_key: OnceLock<gateway::GatewayKey>,
    /// Serialises loads of the kernel's table: a changed view, and a view gone stale or
    /// fresh again, and retries ([`watch_kernel`]).
    programming: tokio::sync::Mutex<()>,
    /// The loaded table leaves every VIP to the proxy because the view was stale then.
    withheld: AtomicBool,
    /// Counters for metrics.
    pub stats: Stats,
}

/// Decrements an endpoint's open-connection count when a connection ends.
pub(crate) struct OpenGuard<'a> {
    dp: &'a DataPlane,
    ep: proxy::Route,
    track: bool,
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.dp.stats.active.fetch_sub(1, Ordering::Relaxed);
        if !self.track {
            return;
        }
        if let Ok(mut m) = self.dp.active.lock() {
            if let Some(n) = m.get_mut(&self.ep) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&self.ep);
                }
            }
        }
    }
}

impl DataPlane {
    /// Builds the view, opens the listeners, programs the kernel (when asked) and starts
    /// tailing the log. Returns once VIP traffic can flow.
    pub async fn start(log: Arc<Log>, mut cfg: DataPlaneConfig) -> Result<Arc<Self>, DpError> {
        let nft = if cfg.kernel {
            nft::Nft::open().map_err(|e| e.to_string())
        } else {
            Err("off".to_string())
        };
        if cfg.kernel && !cfg.listen.is_loopback() {
            // Off loopback, the proxy ports are shielded from outside by the table's input
            // chain; if no table can be loaded, they stay on loopback.
            let empty = nft::Model::of(&Table::default(), &BTreeMap::new(), cfg.port_range);
            let loaded = match &nft {
                Ok(n) => nft::apply(n, nft::full(&cfg.nft_table, &empty))
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.clone()),
            };
            if let Err(e) = loaded {
                tracing::warn!(error = %e, "nftables cannot be programmed; the proxy listens on 127.0.0.1 only");
                cfg.listen = IpAddr::from([127, 0, 0, 1]);
            }
        }
        let book = PortBook::load(&cfg.ports_file, cfg.port_range);
        let kernel_detail = if cfg.kernel {
            "not programmed yet".to_string()
        } else {
            "off (dev mode or networking.nftables: off); policy is enforced in the proxy only".to_string()
        };
        let dp = Arc::new(DataPlane {
            table: RwLock::new(Arc::new(Table::new(&cfg.node))),
            projection: OnceLock::new(),
            book: Mutex::new(book),
            listeners: Mutex::new(HashMap::new()),
            containers: Mutex::new(ContainerSide::default()),
            kernel: Mutex::new(Kernel {
                status: KernelStatus {
                    enforcing: false,
                    detail: kernel_detail,
                    last_program: Duration::ZERO,
                    kernel_forwarded: KernelForwarded::default(),
                },
                live: live::Live::new(cfg.port_range),
                pending: Pending::All,
                live_loaded: false,
                model: None,
                carried: BTreeMap::new(),
                read: nft::Drops::new(),
                generation: 0,
                vips: HashSet::new(),
                retry_at: nft.is_ok().then(Instant::now),
                failures: 0,
            }),
            active: Mutex::new(HashMap::new()),
            nft,
            forward_rr: AtomicUsize::new(0),
            counters_wanted: AtomicBool::new(false),
            gateway_key: OnceLock::new(),
            programming: tokio::sync::Mutex::new(()),
            withheld: AtomicBool::new(false),
            stats: Stats::default(),
            cfg,
        });
        let view = Arc::new(DpView(Arc::downgrade(&dp)));
        let projection = Projection::start(log, "dataplane", view, dp.cfg.stale_budget).await;
        let _ = dp.projection.set(projection);
        if dp.cfg.kernel {
            tokio::spawn(read_counters(Arc::downgrade(&dp)));
            tokio::spawn(watch_kernel(Arc::downgrade(&dp)));
        }
        Ok(dp)
    }

    /// Serves the node gateway on `l` (in a cluster): the other nodes' data planes reach this
    /// node's instances through it, with `key`, which every member derives alike and nothing
    /// else can. Runs as long as the process.
    pub fn serve_gateway(self: &Arc<Self>, l: TcpListener, key: gateway::GatewayKey) {
        let _ = self.gateway_key.set(key);
        tracing::info!(address = ?l.local_addr().ok(), "node gateway listening");
        tokio::spawn(gateway::serve(self.clone(), l));
    }

    pub(crate) fn gateway_key(&self) -> Option<&gateway::GatewayKey> {
        self.gateway_key.get()
    }

    /// The current view.
    pub fn table(&self) -> Arc<Table> {
        self.table.read().map(|t| t.clone()).unwrap_or_default()
    }

    /// Whether the kernel enforces policy.
    pub fn kernel_status(&self) -> KernelStatus {
        self.kernel
            .lock()
            .map(|k| k.status.clone())
            .unwrap_or(KernelStatus {
                enforcing: false,
                detail: "unknown".into(),
                last_program: Duration::ZERO,
                kernel_forwarded: KernelForwarded::default(),
            })
    }

    /// The view's projection: lag, counters and the pause failpoint.
    pub fn projection(&self) -> Option<&Arc<Projection>> {
        self.projection.get()
    }

    /// Whether traffic to `vip` is handled now: with the kernel on, the loaded table was built
    /// from a view holding it (its TCP ports are redirected to the proxy, or reset when nothing
    /// is ready). With nftables off, by the operator's choice (dev mode, or
    /// `networking.nftables: off` where VIP routing is theirs), every VIP is. Never while the
    /// view is stale.
    pub fn carries(&self, vip: Ipv4Addr) -> bool {
        if self.stale() {
            return false;
        }
        if !self.cfg.kernel {
            return true;
        }
        self.kernel.lock().map(|k| k.vips.contains(&vip)).unwrap_or(false)
    }

    /// Behind the log past the stale budget (or not started): new connections are refused.
    fn stale(&self) -> bool {
        self.projection.get().is_none_or(|p| p.stale())
    }

    /// The proxy address of each served port of a service: (service port, listen address).
    pub fn proxy_ports(&self, ns: &str, name: &str) -> Vec<(u16, SocketAddr)> {
        let Ok(l) = self.listeners.lock() else {
            return Vec::new();
        };
        let key = SvcKey::new(ns, name);
        let mut v: Vec<(u16, SocketAddr)> = l
            .iter()
            .filter(|((k, _), _)| *k == key)
            .map(|((_, p), li)| (*p, SocketAddr::new(self.cfg.listen, li.port)))
            .collect();
        v.sort();
        v
    }

    /// Policy drops by (service, direction, reason): the proxy's and the kernel's.
    pub fn drops(&self) -> Vec<(SvcKey, &'static str, &'static str, u64)> {
        self.counters_wanted.store(true, Ordering::Relaxed);
        let mut out: Vec<_> = self
            .stats
            .drops
            .lock()
            .map(|m| m.iter().map(|((k, p, r), n)| (k.clone(), *p, *r, *n)).collect())
            .unwrap_or_default();
        if let Ok(k) = self.kernel.lock() {
            let counting = k.counting();
            let live = counting.map(|m| m.tally(&k.read)).unwrap_or_default();
            for c in counting.map(|m| m.counters()).unwrap_or_default() {
                let name = nft::counter_name(&c.service, c.direction);
                let n = k.carried.get(&name).copied().unwrap_or(0) + live.get(&name).copied().unwrap_or(0);
                out.push((c.service.clone(), c.direction, "kernel", n));
            }
        }
        out
    }

    /// Policy rules compiled into the current view, ingress and egress together.
    pub fn policy_rules(&self) -> usize {
        self.table()
            .services
            .values()
            .map(|s| {
                s.policy.ingress.as_ref().map_or(0, Vec::len) + s.policy.egress.as_ref().map_or(0, Vec::len)
            })
            .sum()
    }

    /// Container addresses on this node by service (every service, policy or not): the rows
    /// the kernel's maps would key a policy on.
    pub fn local_instances(&self) -> Vec<(SvcKey, usize)> {
        self.table()
            .services
            .values()
            .map(|s| (s.key.clone(), s.local_ips.len()))
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .collect()
    }

    /// Reads the kernel's counters now (the background reader does this every few seconds).
    pub async fn refresh_counters(&self) {
        let Ok(n) = &self.nft else { return };
        let generation = self.kernel.lock().map(|k| k.generation).unwrap_or(0);
        match nft::drops(n, &self.cfg.nft_table).await {
            Ok(read) => {
                if let Ok(mut k) = self.kernel.lock() {
                    if k.generation == generation {
                        k.read = read;
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot read nftables counters"),
        }
    }

    /// Decides a flow as the proxy would: `from` is `ns/name`, `name` (in `ns`) or an address.
    pub fn explain(&self, ns: &str, from: &str, to: &str, port: Option<u16>) -> Result<Explanation, DpError> {
        let t = self.table();
        let to_key = parse_service(ns, to);
        let svc = t
            .services
            .get(&to_key)
            .ok_or_else(|| DpError::NoService(to_key.to_string()))?;
        let src = match from.parse::<IpAddr>() {
            Ok(ip) => Source {
                service: t.by_ip.get(&ip).cloned(),
                ip,
            },
            Err(_) => {
                let k = parse_service(ns, from);
                if !t.services.contains_key(&k) {
                    return Err(DpError::NoService(k.to_string()));
                }
                let ip = t
                    .services
                    .get(&k)
                    .and_then(|s| s.local_ips.first().copied())
                    .unwrap_or(IpAddr::from([127, 0, 0, 1]));
                Source { service: Some(k), ip }
            }
        };
        let ports: Vec<u16> = match port {
            Some(p) => vec![p],
            None => svc.tcp_ports().into_iter().map(|(_, p)| p).collect(),
        };
        if ports.is_empty() {
            return Err(DpError::NoPort(to_key.to_string(), "(none declared)".into()));
        }
        let src_policy = src
            .service
            .as_ref()
            .and_then(|k| t.services.get(k))
            .map(|s| &s.policy);
        let target = Target {
            key: &to_key,
            vip: svc.vip,
            ports: &svc.ports,
            policy: &svc.policy,
        };
        Ok(Explanation {
            from: src
                .service
                .as_ref()
                .map_or_else(|| src.ip.to_string(), |k| k.to_string()),
            to: to_key.to_string(),
            decisions: ports
                .iter()
                .map(|p| (*p, decide(&src, src_policy, &target, *p)))
                .collect(),
        })
    }

    /// A connection to a ready endpoint of a service port, for `rune port-forward` (an
    /// operator's tunnel, like `kubectl port-forward`: balanced, not subject to policy).
    pub async fn connect(
        &self,
        ns: &str,
        name: &str,
        port: &str,
    ) -> Result<(TcpStream, proxy::Route), DpError> {
        let t = self.table();
        let key = SvcKey::new(ns, name);
        let svc = t
            .services
            .get(&key)
            .ok_or_else(|| DpError::NoService(key.to_string()))?;
        let number = svc
            .tcp_ports()
            .into_iter()
            .find(|(n, p)| n == port || p.to_string() == port)
            .map(|(_, p)| p)
            .ok_or_else(|| DpError::NoPort(key.to_string(), port.to_string()))?;
        let mut forced = (**svc).clone();
        if forced.mode == table::Mode::None {
            forced.mode = table::Mode::RoundRobin;
        }
        proxy::connect(self, &forced, number, &self.forward_rr)
            .await
            .ok_or(DpError::NoEndpoint(key.to_string(), number))
    }

    /// A connection to one ready endpoint of a service, by instance id, for service port
    /// `port`: directly on this node, through its node's gateway elsewhere. For the ingress,
    /// which picks its own endpoint and needs a way to one on another node.
    pub async fn dial_instance(
        &self,
        ns: &str,
        name: &str,
        instance: &str,
        port: u16,
    ) -> std::io::Result<TcpStream> {
        let key = SvcKey::new(ns, name);
        let route = self.table().services.get(&key).and_then(|svc| {
            let ep = svc.endpoints.iter().find(|e| e.instance == instance)?;
            Some(proxy::Route {
                via: ep.via,
                addr: SocketAddr::new(ep.ip, ep.target(port)?),
            })
        });
        match route {
            Some(route) => route.dial(self, &key, instance, port).await,
            None => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{instance} is not a ready endpoint of {key} port {port} here"),
            )),
        }
    }

    /// Counts an open connection; per endpoint only when the balancer needs it (`track`).
    fn open(&self, ep: proxy::Route, track: bool) -> OpenGuard<'_> {
        self.stats.active.fetch_add(1, Ordering::Relaxed);
        if track {
            if let Ok(mut m) = self.active.lock() {
                *m.entry(ep).or_default() += 1;
            }
        }
        OpenGuard { dp: self, ep, track }
    }

    /// Puts a changed view in place: the listeners of the services in `changed` (all when
    /// `None`) follow it, then the kernel.
    async fn install(self: &Arc<Self>, table: Arc<Table>, changed: Option<&BTreeSet<SvcKey>>) {
        self.sync_listeners(&table, changed).await;
        self.sync_container_listeners(&table, changed).await;
        if self.cfg.kernel {
            if let Ok(mut k) = self.kernel.lock() {
                k.pending.add(changed);
            }
            self.program().await;
        }
    }

    /// Dev mode: containers reach services on their network's gateway, at each service's own
    /// port (the DNS answers containers with that address). Without nftables there are no
    /// VIPs to redirect, so this is how `curl http://api:8080` works from a container.
    pub async fn serve_containers_at(self: &Arc<Self>, gateway: IpAddr) {
        if self.cfg.kernel {
            return;
        }
        if let Ok(mut c) = self.containers.lock() {
            if c.at == Some(gateway) {
                return;
            }
            for (_, (_, task)) in c.listeners.drain() {
                task.abort();
            }
            c.refused.clear();
            c.at = Some(gateway);
        }
        let t = self.table();
        self.sync_container_listeners(&t, None).await;
    }

    async fn sync_container_listeners(self: &Arc<Self>, t: &Table, changed: Option<&BTreeSet<SvcKey>>) {
        let Some(at) = self.containers.lock().ok().and_then(|c| c.at) else {
            return;
        };
        // Ports are shared among services, so a change to one may free a port for another:
        // recompute unless nothing changed serves or held a port here.
        let irrelevant = |side: &ContainerSide| {
            changed.is_some_and(|c| {
                c.iter().all(|k| {
                    t.services.get(k).is_none_or(|s| s.tcp_ports().is_empty())
                        && !side.listeners.values().any(|(held, _)| held == k)
                })
            })
        };
        if self.containers.lock().is_ok_and(|side| irrelevant(&side)) {
            return;
        }
        let wanted: HashMap<u16, SvcKey> = {
            let mut w: HashMap<u16, SvcKey> = HashMap::new();
            for s in t.services.values().filter(|s| s.mode != table::Mode::None) {
                for (_, p) in s.tcp_ports() {
                    // The first service in key order serves a shared port, however the map
                    // is laid out.
                    match w.get_mut(&p) {
                        Some(k) if s.key < *k => *k = s.key.clone(),
                        Some(_) => {}
                        None => {
                            w.insert(p, s.key.clone());
                        }
                    }
                }
            }
            w
        };
        let todo: Vec<(u16, SvcKey)> = {
            let Ok(mut c) = self.containers.lock() else { return };
            c.listeners.retain(|p, (k, task)| {
                let keep = wanted.get(p) == Some(k);
                if !keep {
                    task.abort();
                }
                keep
            });
            wanted
                .iter()
                .filter(|(p, _)| !c.listeners.contains_key(p))
                .map(|(p, k)| (*p, k.clone()))
                .collect()
        };
        for (p, k) in todo {
            match TcpListener::bind(SocketAddr::new(at, p)).await {
                Ok(l) => {
                    tracing::info!(service = %k, port = p, address = %SocketAddr::new(at, p), "serving the service to containers");
                    let task = tokio::spawn(proxy::serve(self.clone(), k.clone(), p, l));
                    if let Ok(mut c) = self.containers.lock() {
                        c.listeners.insert(p, (k, task));
                    }
                }
                Err(e) => {
                    if self
                        .containers
                        .lock()
                        .is_ok_and(|mut c| c.refused.insert((k.clone(), p)))
                    {
                        tracing::warn!(service = %k, port = p, error = %e, "containers cannot reach this service port in dev mode (another service or program holds it on the gateway)");
                    }
                }
            }
        }
        // Services sharing a port: the first in key order serves it; the others are said once.
        for s in t.services.values().filter(|s| s.mode != table::Mode::None) {
            for (_, p) in s.tcp_ports() {
                if wanted.get(&p) != Some(&s.key)
                    && self
                        .containers
                        .lock()
                        .is_ok_and(|mut c| c.refused.insert((s.key.clone(), p)))
                {
                    tracing::warn!(service = %s.key, port = p, "containers cannot reach this service port in dev mode: another service uses the same port");
                }
            }
        }
    }

    /// Opens a listener for every served port of the services in `changed` (all when `None`)
    /// and closes those they no longer serve (connections already accepted live on: they are
    /// their own tasks).
    async fn sync_listeners(self: &Arc<Self>, t: &Table, changed: Option<&BTreeSet<SvcKey>>) {
        let touched = |k: &SvcKey| changed.is_none_or(|c| c.contains(k));
        let services: Vec<&Arc<table::Svc>> = match changed {
            None => t.sorted(),
            Some(c) => c.iter().filter_map(|k| t.services.get(k)).collect(),
        };
        let wanted: Vec<(SvcKey, u16)> = services
            .into_iter()
            .filter(|s| s.mode != table::Mode::None)
            .flat_map(|s| s.tcp_ports().into_iter().map(|(_, p)| (s.key.clone(), p)))
            .collect();
        let keep: HashSet<(SvcKey, u16)> = wanted.iter().cloned().collect();
        let mut forgotten = Vec::new();
        let mut missing = Vec::new();
        {
            let Ok(mut ls) = self.listeners.lock() else {
                return;
            };
            ls.retain(|(k, p), l| {
                let ok = !touched(k) || keep.contains(&(k.clone(), *p));
                if !ok {
                    l.task.abort();
                    forgotten.push(book_key(&k.ns, &k.name, *p));
                    tracing::info!(service = %k, port = p, proxy_port = l.port, "proxy listener closed");
                }
                ok
            });
            for (k, p) in wanted {
                if !ls.contains_key(&(k.clone(), p)) {
                    missing.push((k, p));
                }
            }
        }
        let mut changed_book = !forgotten.is_empty();
        for (i, (k, p)) in missing.into_iter().enumerate() {
            // Thousands of listeners at once (a start, a large cast): the views that share the
            // followers' task answer meanwhile.
            if i % LISTENERS_PER_TURN == LISTENERS_PER_TURN - 1 {
                tokio::task::yield_now().await;
            }
            let bk = book_key(&k.ns, &k.name, p);
            let mut taken = Vec::new();
            loop {
                let Some(pp) = self.book.lock().ok().and_then(|mut b| b.assign(&bk, &taken)) else {
                    tracing::error!(service = %k, port = p, "no free proxy port left in the range");
                    break;
                };
                changed_book = true;
                match TcpListener::bind(SocketAddr::new(self.cfg.listen, pp)).await {
                    Ok(l) => {
                        tracing::info!(service = %k, port = p, proxy = %SocketAddr::new(self.cfg.listen, pp), "proxy listening");
                        let task = tokio::spawn(proxy::serve(self.clone(), k.clone(), p, l));
                        if let Ok(mut ls) = self.listeners.lock() {
                            ls.insert((k.clone(), p), Listener { port: pp, task });
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(service = %k, port = p, proxy_port = pp, error = %e, "proxy port busy; taking another");
                        taken.push(pp);
                    }
                }
            }
        }
        let save = self.book.lock().ok().and_then(|mut b| {
            if changed.is_none() {
                // A full view: anything the book holds beyond it is from services long gone.
                let keep: HashSet<String> = keep.iter().map(|(k, p)| book_key(&k.ns, &k.name, *p)).collect();
                let before = b.len();
                b.retain(&keep);
                changed_book |= b.len() != before;
            }
            for k in &forgotten {
                b.remove(k);
            }
            changed_book.then(|| b.to_save())
        });
        // The whole book is written: on the blocking pool, so that the other views sharing
        // the followers' task go on meanwhile. Saves stay in order: this view's changes are
        // installed one after another.
        if let Some(save) = save {
            let failed = match tokio::task::spawn_blocking(move || save.write()).await {
                Ok(r) => r.err().map(|e| e.to_string()),
                Err(e) => Some(e.to_string()),
            };
            if let Some(e) = failed {
                tracing::warn!(error = %e, "cannot save the proxy port book; ports may change at restart");
            }
        }
    }

    /// Brings the kernel's table to the current view. The view's model is brought up to date
    /// with the services changed since (see [`live`]); while the kernel holds that model, the
    /// change is loaded as its patch, whatever the number of services. The table is loaded
    /// whole at start, after a failure, and when a change is refused because the table was
    /// touched from outside; a stale view's (every VIP left to the proxy) is loaded as the
    /// difference of two whole models. The view is read under the lock, so of two callers the
    /// later never loads an older view than the earlier.
    async fn program(&self) {
        let _one = self.programming.lock().await;
        let nft = match &self.nft {
            Ok(n) => n,
            Err(e) => {
                if let Ok(mut k) = self.kernel.lock() {
                    kernel_off(&mut k, e, Duration::ZERO);
                    // No library or no context: trying again cannot help.
                    k.retry_at = None;
                    k.pending = Pending::All;
                }
                return;
            }
        };
        // Fail closed: a stale view's VIPs all go to the proxy, which refuses new connections.
        let stale = self.stale();
        let (t, patch) = {
            let Ok(mut guard) = self.kernel.lock() else { return };
            let k = &mut *guard;
            // The view is read under the lock `install` adds to `pending` under, after it
            // wrote the view: a change is in both the view read here and the set taken, or
            // left pending for the next call.
            let t = self.table();
            let Ok(listeners) = self.listeners.lock() else {
                k.pending = Pending::All;
                return;
            };
            let pending = std::mem::replace(&mut k.pending, Pending::Some(BTreeSet::new()));
            let changed = match &pending {
                Pending::All => None,
                Pending::Some(s) => Some(s),
            };
            let patch = k.live.update(&t, changed, &ListenerPorts(&listeners));
            if k.status.enforcing && k.live_loaded && !stale && patch.is_empty() {
                // A service without ports adds nothing to the table, but its VIP is carried.
                for v in &patch.vips.0 {
                    k.vips.remove(v);
                }
                k.vips.extend(&patch.vips.1);
                self.withheld.store(false, Ordering::Relaxed);
                return;
            }
            (t, patch)
        };
        let table = &self.cfg.nft_table;
        // A failed reading falls back to the last one: fewer drops carried, none lost twice.
        let last_read = || self.kernel.lock().map(|k| k.read.clone()).unwrap_or_default();
        let patchable = self
            .kernel
            .lock()
            .is_ok_and(|k| k.status.enforcing && k.live_loaded && !stale);
        let mut refused = false;
        if patchable {
            // Drop counts the patch deletes (of addresses leaving their policy) are read
            // first, to be carried.
            let leaving = patch.before.leaving(&patch.after);
            let before = if leaving.is_empty() {
                nft::Drops::new()
            } else {
                nft::drops(nft, table).await.unwrap_or_else(|_| last_read())
            };
            let started = Instant::now();
            match nft::apply(nft, nft::delta_patch(table, &patch)).await {
                Ok(()) => {
                    let took = started.elapsed();
                    let Ok(mut k) = self.kernel.lock() else { return };
                    carry(&mut k, &before, leaving);
                    for v in &patch.vips.0 {
                        k.vips.remove(v);
                    }
                    k.vips.extend(&patch.vips.1);
                    let m = k.live.model();
                    k.status.kernel_forwarded = KernelForwarded {
                        from_containers: m.fast_pre.len(),
                        from_host: m.fast_out.len(),
                    };
                    k.status.last_program = took;
                    self.withheld.store(false, Ordering::Relaxed);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "an incremental nftables change was refused; loading the table whole");
                    refused = true;
                }
            }
        }
        let (model, loaded) = {
            let Ok(k) = self.kernel.lock() else { return };
            let model = k.live.model().clone();
            let model = if stale { model.proxied() } else { model };
            // What the kernel holds: the live model before this patch, or the last loaded.
            let loaded = if k.live_loaded {
                Some(Arc::new(patch.undo(k.live.model())))
            } else {
                k.model.clone()
            };
            (model, loaded)
        };
        let vips: HashSet<Ipv4Addr> = t.services.values().filter_map(|s| s.vip).collect();
        let enforcing = self.kernel.lock().is_ok_and(|k| k.status.enforcing);
        if enforcing && !refused && loaded.as_deref() == Some(&model) {
            if let Ok(mut k) = self.kernel.lock() {
                k.vips = vips;
                // As after a load: a stale view's model is not the live one.
                k.live_loaded = !stale;
                k.model = stale.then(|| Arc::new(model));
            }
            self.withheld.store(stale, Ordering::Relaxed);
            return;
        }
        let started = Instant::now();
        // The drops of a change that deletes entries (of addresses leaving their policy; all
        // of them in a whole load) are read first, to be carried.
        let diff_from = loaded.clone().filter(|_| enforcing && !refused);
        let leaving = diff_from
            .as_ref()
            .map(|old| old.leaving(&model))
            .unwrap_or_default();
        let mut whole = diff_from.is_none();
        let mut before = if whole || !leaving.is_empty() {
            nft::drops(nft, table).await.unwrap_or_else(|_| last_read())
        } else {
            nft::Drops::new()
        };
        let mut r = match &diff_from {
            Some(old) => nft::apply(nft, nft::delta(table, old, &model)).await,
            None => nft::apply(nft, nft::full(table, &model)).await,
        };
        if let (Err(e), false) = (&r, whole) {
            tracing::warn!(error = %e, "an incremental nftables change was refused; loading the table whole");
            before = nft::drops(nft, table).await.unwrap_or_else(|_| last_read());
            whole = true;
            r = nft::apply(nft, nft::full(table, &model)).await;
        }
        let took = started.elapsed();
        let Ok(mut k) = self.kernel.lock() else { return };
        match r {
            Ok(()) => {
                if whole {
                    // Every count restarted: the model that counted them (the last one
                    // loaded, even if a change failed since) says whose they were.
                    let carried = match &loaded {
                        Some(old) => before
                            .keys()
                            .filter_map(|(d, ip)| old.policy_of(d, *ip).map(|c| (*d, *ip, c.clone())))
                            .collect(),
                        None => Vec::new(),
                    };
                    carry(&mut k, &before, carried);
                    // Including any the reading before missed.
                    k.read.clear();
                    k.generation += 1;
                } else {
                    carry(&mut k, &before, leaving);
                }
                if !k.status.enforcing {
                    tracing::info!(table = %table, took_ms = took.as_millis() as u64, "nftables programmed; the kernel enforces policy");
                }
                k.status = KernelStatus {
                    enforcing: true,
                    detail: format!("on: nftables table inet {table}"),
                    last_program: took,
                    kernel_forwarded: KernelForwarded {
                        from_containers: model.fast_pre.len(),
                        from_host: model.fast_out.len(),
                    },
                };
                // A fresh view's model is the live one: from now on changes are its patches.
                k.live_loaded = !stale;
                k.model = stale.then(|| Arc::new(model));
                k.vips = vips;
                k.retry_at = None;
                k.failures = 0;
                self.withheld.store(stale, Ordering::Relaxed);
            }
            Err(e) => {
                kernel_off(&mut k, &e, took);
                // The last model loaded stays, to attribute the drops counted under it.
                if k.live_loaded {
                    k.live_loaded = false;
                    k.model = loaded;
                }
                // The kernel keeps the last table loaded (old endpoints, old policy) until a
                // load succeeds, so one is tried again even if the view never changes.
                k.failures = k.failures.saturating_add(1);
                let wait = retry_delay(k.failures);
                k.retry_at = Some(Instant::now() + wait);
                tracing::debug!(
                    failures = k.failures,
                    retry_in_ms = wait.as_millis() as u64,
                    "the nftables load will be tried again"
                );
            }
        }
    }
}

/// Carries the drops `read` counted at addresses whose entries a load deletes (`gone`:
/// direction, address, the policy they counted for) to their policies, so the totals stay.
fn carry(k: &mut Kernel, read: &nft::Drops, gone: Vec<(&'static str, Ipv4Addr, String)>) {
    if gone.is_empty() {
        return;
    }
    for (direction, ip, chain) in gone {
        if let Some(n) = read.get(&(direction, ip)) {
            *k.carried.entry(chain).or_default() += n;
        }
        k.read.remove(&(direction, ip));
    }
    // A reading taken before this change may hold counts now deleted.
    k.generation += 1;
}

/// Records that the kernel does not enforce, and why. Said once per change: losing
/// enforcement is an error, never having it (no nftables, no privilege) a warning; the same
/// failure again is not news. The DNS answers a name only once its VIP is redirected
/// (`carries`).
fn kernel_off(k: &mut Kernel, e: &dyn std::fmt::Display, took: Duration) {
    let detail = format!(
        "off: {e}; VIPs not in the loaded table are not redirected, so the DNS does not answer their names"
    );
    if k.status.enforcing {
        tracing::error!(error = %e, "kernel enforcement stopped; policy is enforced in the proxy only");
    } else if k.status.detail != detail {
        tracing::warn!(error = %e, "kernel enforcement is off");
    }
    k.status = KernelStatus {
        enforcing: false,
        detail,
        last_program: took,
        // What the last loaded table forwarded, which a failed change may have left in place.
        kernel_forwarded: k.status.kernel_forwarded,
    };
    // What the kernel holds is not known for sure: not enforcing, the next change loads it
    // whole. The last model stays, to attribute the drops counted under it.
}

/// `rune policy explain`'s answer.
#[derive(Debug, Clone)]
pub struct Explanation {
    /// The source as named.
    pub from: String,
    /// The destination service.
    pub to: String,
    /// Each port's decision.
    pub decisions: Vec<(u16, Decision)>,
}

/// A service as users write it: `name` (in `ns`), `ns/name`, `name.ns` or `name.ns.rune`.
pub fn parse_service(ns: &str, s: &str) -> SvcKey {
    match s.split_once('/') {
        Some((n, name)) => SvcKey::new(n, name),
        None => match s.strip_suffix(".rune").unwrap_or(s).split_once('.') {
            Some((name, n)) => SvcKey::new(n, name),
            None => SvcKey::new(ns, s),
        },
    }
}

/// The data plane as its projection sees it; weak, so the projection does not keep a stopped
/// data plane alive.
struct DpView(Weak<DataPlane>);

impl DpView {
    fn dp(&self) -> Result<Arc<DataPlane>, ProjectionError> {
        self.0
            .upgrade()
            .ok_or_else(|| ProjectionError::View("the data plane is gone".into()))
    }
}

impl View for DpView {
    async fn reset(&self, state: Vec<Delta>) -> Result<(), ProjectionError> {
        let dp = self.dp()?;
        let table = Arc::new(Table::build(&dp.cfg.node, &state));
        *dp.table
            .write()
            .map_err(|e| ProjectionError::View(e.to_string()))? = table.clone();
        dp.install(table, None).await;
        Ok(())
    }

    async fn apply(&self, deltas: &[&Delta]) -> Result<(), ProjectionError> {
        let dp = self.dp()?;
        let mut changed = BTreeSet::new();
        let table = {
            let mut guard = dp
                .table
                .write()
                .map_err(|e| ProjectionError::View(e.to_string()))?;
            // Copies only if a reader holds the current view: then it keeps the one it has.
            let t = Arc::make_mut(&mut guard);
            for d in deltas {
                t.apply(d, &mut changed);
            }
            guard.clone()
        };
        if !changed.is_empty() {
            dp.install(table, Some(&changed)).await;
        }
        Ok(())
    }
}

async fn read_counters(dp: std::sync::Weak<DataPlane>) {
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let Some(d) = dp.upgrade() else { return };
        // Read only for a reader (a scrape of /metrics): its next look sees counts at most one
        // period older than the look before.
        let has_counters = d
            .kernel
            .lock()
            .is_ok_and(|k| k.counting().is_some_and(|m| !m.policies.is_empty()));
        if d.kernel_status().enforcing && has_counters && d.counters_wanted.swap(false, Ordering::Relaxed) {
            d.refresh_counters().await;
        }
    }
}

/// How long after the `failures`th failed load in a row the next is tried: 1 s doubling to
/// 30 s, so a kernel that refuses for a while is not asked four times a second, and one that
/// recovers is used again within half a minute.
fn retry_delay(failures: u32) -> Duration {
    let secs = 1u64 << failures.saturating_sub(1).min(5);
    Duration::from_secs(secs.min(30))
}

/// Loads the table again without a change to the view: when the view goes stale (the kernel
/// stops forwarding on its own, so new connections meet the proxy, which refuses them) or
/// fresh again, a quarter of a second past the budget at most (the proxy itself refuses at
/// once); and when a load failed, or none was made yet, once its retry is due.
async fn watch_kernel(dp: std::sync::Weak<DataPlane>) {
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Some(d) = dp.upgrade() else { return };
        let (enforcing, due) = match d.kernel.lock() {
            Ok(k) => (
                k.status.enforcing,
                k.retry_at.is_some_and(|at| at <= Instant::now()),
            ),
            Err(_) => return,
        };
        let flipped = enforcing && d.stale() != d.withheld.load(Ordering::Relaxed);
        if flipped || (!enforcing && due) {
            d.program().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names() {
        assert_eq!(parse_service("default", "api"), SvcKey::new("default", "api"));
        assert_eq!(parse_service("default", "prod/api"), SvcKey::new("prod", "api"));
        assert_eq!(
            parse_service("default", "api.prod.rune"),
            SvcKey::new("prod", "api")
        );
        assert_eq!(parse_service("default", "api.prod"), SvcKey::new("prod", "api"));
    }

    #[test]
    fn failed_loads_back_off_to_half_a_minute() {
        let waits: Vec<u64> = (1..=8).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(retry_delay(u32::MAX).as_secs(), 30);
    }
}
