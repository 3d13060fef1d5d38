//! The data plane: traffic to `VIP:port` reaches a ready endpoint of the service, and network
//! policy decides who may connect to whom.
//!
//! It is a projection of the applied log, like the DNS: it builds a [`table::Table`] from the
//! state, tails the applied entries and rebuilds on every change of services, instances,
//! endpoints or VIPs (entries that arrive together are coalesced into one rebuild), and swaps
//! the table atomically. It fails closed: past the stale budget new connections through the
//! proxy are reset (an operator's port-forward is not refused).
//!
//! Two halves share one decision ([`policy::decide`]):
//! - the user-space proxy ([`proxy`]), one listener per service port on a stable local port
//!   (`127.0.0.1` in dev mode), which balances, enforces policy and counts;
//! - in production mode, an nftables table of its own ([`nft`]) that redirects VIP traffic to
//!   the proxy and drops denied traffic in the kernel before it reaches anything.

#![warn(missing_docs)]

pub mod nft;
pub mod owner;
pub mod policy;
pub mod ports;
pub mod proxy;
pub mod table;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rune_log::Log;
use rune_statemachine::{Kind, STATE_TABLE};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use policy::{decide, Decision, Source, SvcKey, Target};
use ports::{book_key, PortBook};
use table::Table;

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
    /// The state could not be read.
    #[error("cannot read the state for the data plane: {0}")]
    State(String),
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
}

/// One service's connection and byte counters: atomics, so the proxy's hot path takes no lock.
#[derive(Debug, Default)]
pub struct SvcCounters {
    forwarded: AtomicU64,
    denied: AtomicU64,
    no_endpoint: AtomicU64,
    stale: AtomicU64,
    to_endpoint: AtomicU64,
    to_client: AtomicU64,
}

impl SvcCounters {
    fn connection(&self, result: &'static str) {
        let c = match result {
            "forwarded" => &self.forwarded,
            "denied" => &self.denied,
            "no_endpoint" => &self.no_endpoint,
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

    fn each(&self, f: impl Fn(&SvcCounters) -> [(&'static str, u64); 4]) -> Vec<(SvcKey, &'static str, u64)> {
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

    /// Connections by service and result (`forwarded`, `denied`, `no_endpoint`, `stale`).
    pub fn connections(&self) -> Vec<(SvcKey, &'static str, u64)> {
        self.each(|c| {
            [
                ("forwarded", c.forwarded.load(Ordering::Relaxed)),
                ("denied", c.denied.load(Ordering::Relaxed)),
                ("no_endpoint", c.no_endpoint.load(Ordering::Relaxed)),
                ("stale", c.stale.load(Ordering::Relaxed)),
            ]
        })
    }

    /// Bytes by service and direction (`to_endpoint`, `to_client`).
    pub fn byte_counts(&self) -> Vec<(SvcKey, &'static str, u64)> {
        self.each(|c| {
            [
                ("to_endpoint", c.to_endpoint.load(Ordering::Relaxed)),
                ("to_client", c.to_client.load(Ordering::Relaxed)),
                ("", 0),
                ("", 0),
            ]
        })
    }
}

struct Kernel {
    status: KernelStatus,
    program: String,
    /// Counter totals carried over from earlier programs (a reload resets the kernel's).
    carried: BTreeMap<String, u64>,
    /// The latest reading.
    read: BTreeMap<String, u64>,
    /// Bumped by every load, so a reading of a table that was replaced meanwhile is dropped.
    generation: u64,
    counters: Vec<nft::CounterKey>,
}

struct Listener {
    port: u16,
    task: JoinHandle<()>,
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
    log: Arc<Log>,
    table: RwLock<Arc<Table>>,
    lag: rune_log::lag::Lag,
    paused: AtomicBool,
    book: Mutex<PortBook>,
    listeners: Mutex<HashMap<(SvcKey, u16), Listener>>,
    /// Dev mode: where containers reach services (their network's gateway), and the listeners
    /// there, one per service port (`api:8080` is `gateway:8080`).
    containers: Mutex<ContainerSide>,
    kernel: Mutex<Kernel>,
    active: Mutex<HashMap<SocketAddr, usize>>,
    /// Round-robin position of port-forward connections.
    forward_rr: AtomicUsize,
    /// Counters for metrics.
    pub stats: Stats,
}

/// Decrements an endpoint's open-connection count when a connection ends.
pub(crate) struct OpenGuard<'a> {
    dp: &'a DataPlane,
    ep: SocketAddr,
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
        if cfg.kernel && !cfg.listen.is_loopback() {
            // Off loopback, the proxy ports are shielded from outside by the table's input
            // chain; if no table can be loaded, they stay on loopback.
            let (empty, _) = nft::render(
                &cfg.nft_table,
                &Table::default(),
                &BTreeMap::new(),
                cfg.port_range,
            );
            if let Err(e) = nft::apply(&empty).await {
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
            log: log.clone(),
            table: RwLock::new(Arc::new(Table::default())),
            lag: rune_log::lag::Lag::new(),
            paused: AtomicBool::new(false),
            book: Mutex::new(book),
            listeners: Mutex::new(HashMap::new()),
            containers: Mutex::new(ContainerSide::default()),
            kernel: Mutex::new(Kernel {
                status: KernelStatus {
                    enforcing: false,
                    detail: kernel_detail,
                    last_program: Duration::ZERO,
                },
                program: String::new(),
                carried: BTreeMap::new(),
                read: BTreeMap::new(),
                generation: 0,
                counters: Vec::new(),
            }),
            active: Mutex::new(HashMap::new()),
            forward_rr: AtomicUsize::new(0),
            stats: Stats::default(),
            cfg,
        });
        // Subscribe first, so nothing applied while building is missed.
        let rx = log.subscribe();
        dp.rebuild().await?;
        tokio::spawn(tail(dp.clone(), rx));
        dp.lag.watch(log.clone());
        if dp.cfg.kernel {
            tokio::spawn(read_counters(Arc::downgrade(&dp)));
        }
        Ok(dp)
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
            })
    }

    /// Failpoint: stops applying the log, to exercise the stale budget.
    pub fn pause_tail(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    /// How long the view has lagged the log (0 when caught up).
    pub fn stale_seconds(&self) -> f64 {
        self.lag.stale_seconds()
    }

    /// The last log index applied to the view.
    pub fn applied_index(&self) -> u64 {
        self.lag.applied()
    }

    fn stale(&self) -> bool {
        self.lag.stale(self.cfg.stale_budget)
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
        let mut out: Vec<_> = self
            .stats
            .drops
            .lock()
            .map(|m| m.iter().map(|((k, p, r), n)| (k.clone(), *p, *r, *n)).collect())
            .unwrap_or_default();
        if let Ok(k) = self.kernel.lock() {
            for c in &k.counters {
                let name = nft::counter_name(&c.service, c.direction);
                let n = k.carried.get(&name).copied().unwrap_or(0) + k.read.get(&name).copied().unwrap_or(0);
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

    /// Instances on this node that each policy-bearing service's rules apply to.
    pub fn local_instances(&self) -> Vec<(SvcKey, usize)> {
        self.table()
            .services
            .values()
            .filter(|s| s.policy.ingress.is_some() || s.policy.egress.is_some())
            .map(|s| (s.key.clone(), s.local_instances))
            .collect()
    }

    /// Reads the kernel's counters now (the background reader does this every few seconds).
    pub async fn refresh_counters(&self) {
        let generation = self.kernel.lock().map(|k| k.generation).unwrap_or(0);
        match nft::counters(&self.cfg.nft_table).await {
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
    ) -> Result<(TcpStream, SocketAddr), DpError> {
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
        let mut forced = svc.clone();
        if forced.mode == table::Mode::None {
            forced.mode = table::Mode::RoundRobin;
        }
        proxy::connect(self, &forced, number, &self.forward_rr)
            .await
            .ok_or(DpError::NoEndpoint(key.to_string(), number))
    }

    /// Counts an open connection; per endpoint only when the balancer needs it (`track`).
    fn open(&self, ep: SocketAddr, track: bool) -> OpenGuard<'_> {
        self.stats.active.fetch_add(1, Ordering::Relaxed);
        if track {
            if let Ok(mut m) = self.active.lock() {
                *m.entry(ep).or_default() += 1;
            }
        }
        OpenGuard { dp: self, ep, track }
    }

    async fn rebuild(self: &Arc<Self>) -> Result<(), DpError> {
        let index = *self.log.applied().borrow();
        let table = {
            let txn = self.log.read().map_err(|e| DpError::State(e.to_string()))?;
            let t = txn
                .open_table(STATE_TABLE)
                .map_err(|e| DpError::State(e.to_string()))?;
            Table::build(&t, &self.cfg.node).map_err(|e| DpError::State(e.to_string()))?
        };
        let table = Arc::new(table);
        let ports = self.sync_listeners(&table).await;
        self.sync_container_listeners(&table).await;
        if let Ok(mut t) = self.table.write() {
            *t = table.clone();
        }
        if self.cfg.kernel {
            self.program(&table, &ports).await;
        }
        self.lag.advance(index);
        Ok(())
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
        self.sync_container_listeners(&t).await;
    }

    async fn sync_container_listeners(self: &Arc<Self>, t: &Table) {
        let Some(at) = self.containers.lock().ok().and_then(|c| c.at) else {
            return;
        };
        let wanted: HashMap<u16, SvcKey> = {
            let mut w = HashMap::new();
            for s in t.services.values().filter(|s| s.mode != table::Mode::None) {
                for (_, p) in s.tcp_ports() {
                    w.entry(p).or_insert_with(|| s.key.clone());
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
        // Services sharing a port: the first in the view serves it; the others are said once.
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

    /// Opens a listener for every served service port and closes the rest (connections
    /// already accepted live on: they are their own tasks).
    async fn sync_listeners(self: &Arc<Self>, t: &Table) -> BTreeMap<(SvcKey, u16), u16> {
        let wanted: Vec<(SvcKey, u16)> = t
            .services
            .values()
            .filter(|s| s.mode != table::Mode::None)
            .flat_map(|s| s.tcp_ports().into_iter().map(|(_, p)| (s.key.clone(), p)))
            .collect();
        let keep: HashSet<String> = wanted.iter().map(|(k, p)| book_key(&k.ns, &k.name, *p)).collect();
        let mut bound = BTreeMap::new();
        let mut changed = false;
        {
            let Ok(mut ls) = self.listeners.lock() else {
                return bound;
            };
            ls.retain(|(k, p), l| {
                let ok = keep.contains(&book_key(&k.ns, &k.name, *p));
                if !ok {
                    l.task.abort();
                    tracing::info!(service = %k, port = p, proxy_port = l.port, "proxy listener closed");
                }
                ok
            });
            for (k, p) in &wanted {
                if let Some(l) = ls.get(&(k.clone(), *p)) {
                    bound.insert((k.clone(), *p), l.port);
                }
            }
        }
        for (k, p) in wanted {
            if bound.contains_key(&(k.clone(), p)) {
                continue;
            }
            let bk = book_key(&k.ns, &k.name, p);
            let mut taken = Vec::new();
            loop {
                let Some(pp) = self.book.lock().ok().and_then(|mut b| b.assign(&bk, &taken)) else {
                    tracing::error!(service = %k, port = p, "no free proxy port left in the range");
                    break;
                };
                changed = true;
                match TcpListener::bind(SocketAddr::new(self.cfg.listen, pp)).await {
                    Ok(l) => {
                        tracing::info!(service = %k, port = p, proxy = %SocketAddr::new(self.cfg.listen, pp), "proxy listening");
                        let task = tokio::spawn(proxy::serve(self.clone(), k.clone(), p, l));
                        if let Ok(mut ls) = self.listeners.lock() {
                            ls.insert((k.clone(), p), Listener { port: pp, task });
                        }
                        bound.insert((k.clone(), p), pp);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(service = %k, port = p, proxy_port = pp, error = %e, "proxy port busy; taking another");
                        taken.push(pp);
                    }
                }
            }
        }
        if let Ok(mut b) = self.book.lock() {
            let before = b.len();
            b.retain(&keep);
            if changed || b.len() != before {
                if let Err(e) = b.save() {
                    tracing::warn!(error = %e, "cannot save the proxy port book; ports may change at restart");
                }
            }
        }
        bound
    }

    async fn program(&self, t: &Table, ports: &BTreeMap<(SvcKey, u16), u16>) {
        let (text, counters) = nft::render(&self.cfg.nft_table, t, ports, self.cfg.port_range);
        let unchanged = self
            .kernel
            .lock()
            .map(|k| k.program == text && k.status.enforcing)
            .unwrap_or(false);
        if unchanged {
            return;
        }
        // A reload resets the kernel's counters: carry what they counted so far.
        let before = nft::counters(&self.cfg.nft_table).await.unwrap_or_default();
        let started = Instant::now();
        let r = nft::apply(&text).await;
        let took = started.elapsed();
        let Ok(mut k) = self.kernel.lock() else { return };
        match r {
            Ok(()) => {
                // The new table starts its counters at zero; a failed load left the old ones.
                for (name, n) in before {
                    *k.carried.entry(name).or_default() += n;
                }
                k.read.clear();
                k.generation += 1;
                if !k.status.enforcing {
                    tracing::info!(table = %self.cfg.nft_table, took_ms = took.as_millis() as u64, "nftables programmed; the kernel enforces policy");
                }
                k.status = KernelStatus {
                    enforcing: true,
                    detail: format!("on: nftables table inet {}", self.cfg.nft_table),
                    last_program: took,
                };
                k.program = text;
                k.counters = counters;
            }
            Err(e) => {
                // Said once per change: losing enforcement is an error, never having it (no
                // nft, no privilege) a warning; the same failure again is not news.
                let detail = format!("off: {e}");
                if k.status.enforcing {
                    tracing::error!(error = %e, "kernel enforcement stopped; policy is enforced in the proxy only");
                } else if k.status.detail != detail {
                    tracing::warn!(error = %e, "kernel enforcement is off");
                }
                k.status = KernelStatus {
                    enforcing: false,
                    detail,
                    last_program: took,
                };
                k.program.clear();
            }
        }
    }
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

/// Whether an applied change can alter the view.
fn relevant(k: Kind) -> bool {
    matches!(
        k,
        Kind::Service | Kind::Instance | Kind::Endpoints | Kind::Vip | Kind::Namespace
    )
}

async fn tail(dp: Arc<DataPlane>, mut rx: tokio::sync::broadcast::Receiver<Arc<rune_log::AppliedEntry>>) {
    use tokio::sync::broadcast::error::{RecvError, TryRecvError};
    loop {
        let mut dirty = false;
        let mut last = 0;
        match rx.recv().await {
            Ok(e) => {
                dirty |= e.changes.iter().any(|c| relevant(c.kind));
                last = e.index;
            }
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(
                    missed = n,
                    "data plane fell behind the log; rebuilding from the state"
                );
                dirty = true;
            }
            Err(RecvError::Closed) => return,
        }
        // Coalesce what is already waiting into one rebuild.
        loop {
            match rx.try_recv() {
                Ok(e) => {
                    dirty |= e.changes.iter().any(|c| relevant(c.kind));
                    last = last.max(e.index);
                }
                Err(TryRecvError::Lagged(_)) => dirty = true,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Closed) => return,
            }
        }
        while dp.paused.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if dirty {
            // Until a rebuild succeeds the view is behind: nothing is marked applied, so the
            // stale budget applies, and the rebuild is retried even if the log goes quiet.
            while let Err(e) = dp.rebuild().await {
                tracing::error!(error = %e, "data plane rebuild failed; keeping the previous view, retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        dp.lag.advance(last);
    }
}

async fn read_counters(dp: std::sync::Weak<DataPlane>) {
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let Some(d) = dp.upgrade() else { return };
        if d.kernel_status().enforcing {
            d.refresh_counters().await;
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
}
