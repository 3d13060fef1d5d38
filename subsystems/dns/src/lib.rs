//! The embedded DNS, on hickory-server: `<svc>.<ns>.rune` answered with the service's VIP (TTL
//! 5 s), `_<port>._<proto>.<svc>.<ns>.rune` with SRV records, the VIPs' reverse names with PTR,
//! NXDOMAIN and NODATA with the zone's SOA so resolvers cache them, and every other name
//! forwarded through hickory's forwarder to the upstreams (never to its own main listener, nor
//! back through systemd-resolved's stub).
//!
//! It is a projection of the applied log ([`rune_log::projection`]): the records are built from
//! the services at an index, then each service delta after it replaces the names of that one
//! service ([`zone::Records`]). It fails closed: a name that leads to a VIP gets SERVFAIL while
//! the data path does not carry that VIP (in production, its kernel redirect is not
//! programmed), and every name of our zones does while no data path is set or the projection
//! lags the log past its budget.
//!
//! Each listener address has its own hickory `Catalog`, sharing the records and the forwarder:
//! in dev mode the answer depends on which address was asked. TCP is served by hickory's
//! `Server`; UDP by one socket read by a thread per core, each of which answers our
//! zones in place (`serve_udp`) and keeps the answers it made, by the query's bytes, until
//! the next applied entry ([`Answers`]).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod zone;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use hickory_server::net::runtime::{Time, TokioTime};
use hickory_server::net::xfer::Protocol;
use hickory_server::net::NetError;
use hickory_server::proto::op::{Edns, Header, HeaderCounts, MessageType, Metadata, ResponseCode};
use hickory_server::proto::rr::{DNSClass, LowerName, Name, Record};
use hickory_server::proto::serialize::binary::{BinDecodable, BinDecoder, BinEncodable, BinEncoder};
use hickory_server::resolver::config::{ConnectionConfig, NameServerConfig, ResolverOpts};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::forwarder::{ForwardConfig, ForwardZoneHandler};
use hickory_server::zone_handler::MessageResponse;
use hickory_server::zone_handler::{Catalog, MessageResponseBuilder, ZoneHandler};
use hickory_server::Server;
use nix::errno::Errno;
use nix::sys::socket::{recvmmsg, MsgFlags, MultiHeaders, SockaddrStorage};
use rune_log::projection::Projection;
use rune_log::Log;
use std::io::{IoSlice, IoSliceMut};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub use zone::TTL;
use zone::{Records, ZoneAt};

/// Settings of the DNS server.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Where to listen, UDP and TCP.
    pub addr: SocketAddr,
    /// Where other names go; empty means the nameservers of /etc/resolv.conf.
    pub upstreams: Vec<SocketAddr>,
    /// Answer `.rune` names with the address of the listener asked (127.0.0.1 for the host, the
    /// container network's gateway for containers): dev mode's data path serves them there.
    pub dev_mode: bool,
    /// How long the projection may lag the log before `.rune` answers fail closed.
    pub stale_budget: Duration,
    /// How long to wait for an upstream.
    pub forward_timeout: Duration,
    /// The cluster network VIPs come from, `(network, prefix)`: its reverse zone is served.
    pub cluster_cidr: Option<(Ipv4Addr, u8)>,
    /// Threads reading each address's UDP socket; 0 means one per core (at most 8).
    pub udp_threads: usize,
}

/// Failures to start the server.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The address could not be bound.
    #[error("cannot listen for DNS on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    /// The forwarder could not be built from the upstreams.
    #[error("cannot forward to the upstreams {0:?}: {1}")]
    Forwarder(Vec<SocketAddr>, String),
}

/// What the DNS asks the data path before it hands out a VIP: is traffic to it handled (sent
/// to the proxy, or reset at once when nothing is ready)? Implemented by runed over the data
/// plane, which this crate does not know.
pub trait DataPath: Send + Sync {
    /// Whether traffic to `vip` is carried now.
    fn carries(&self, vip: Ipv4Addr) -> bool;
}

/// What every listener's handler shares.
struct Shared {
    records: Arc<Records>,
    projection: Arc<Projection>,
    data_path: RwLock<Option<Arc<dyn DataPath>>>,
    /// `rune.` and the reverse zones: the names the gate applies to.
    zones: Vec<LowerName>,
    /// Forwarders for queries that came over UDP (UDP, then TCP for a truncated answer) and
    /// over TCP (TCP only: a client that asked over TCP expects an answer too big for UDP).
    forwarder: Option<Forwarders>,
    dev_mode: bool,
}

impl Shared {
    /// Why a name of our zones must not be answered now, if it must not.
    fn refuse(&self, name: &LowerName) -> Option<ResponseCode> {
        (!self.open_for(self.records.vip_behind(name))).then_some(ResponseCode::ServFail)
    }

    /// The gate: whether a name of our zones leading to `vip` (or to no VIP) may be answered
    /// now. A poisoned lock fails closed like an unset data path.
    fn open_for(&self, vip: Option<Ipv4Addr>) -> bool {
        if self.projection.stale() || !self.records.readable() {
            return false;
        }
        let dp = self.data_path.read().ok().and_then(|d| d.clone());
        let Some(dp) = dp else {
            return false;
        };
        vip.is_none_or(|v| dp.carries(v))
    }

    /// A catalog for a listener on `here`, for queries that came over TCP or not.
    fn catalog(shared: &Arc<Shared>, here: Ipv4Addr, tcp: bool) -> Catalog {
        let mut c = Catalog::new();
        let here = shared.dev_mode.then_some(here);
        for z in &shared.zones {
            let handler: Arc<dyn ZoneHandler> =
                Arc::new(ZoneAt::new(shared.records.clone(), z.clone().into(), here, {
                    let p = shared.projection.clone();
                    Arc::new(move || p.applied_index())
                }));
            c.upsert(z.clone(), vec![handler]);
        }
        if let Some(f) = &shared.forwarder {
            let f = if tcp { f.tcp.clone() } else { f.udp.clone() };
            c.upsert(LowerName::new(&Name::root()), vec![f]);
        }
        c
    }
}

/// One listener's request handler: the gate, then hickory's catalog.
struct Handler {
    shared: Arc<Shared>,
    catalog: Catalog,
}

impl Handler {
    /// Whether the query is for one of our zones: answered here, with no upstream to wait for.
    fn is_ours(&self, request: &Request) -> bool {
        request
            .request_info()
            .is_ok_and(|i| self.shared.zones.iter().any(|z| z.zone_of(i.query.name())))
    }

    /// The gate for our zones' names (`ours`, as [`Handler::is_ours`] found), then hickory's
    /// catalog. The UDP threads ask `is_ours` once to choose where to answer, and pass it on.
    async fn answer<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        ours: bool,
        response: R,
    ) -> ResponseInfo {
        if ours {
            if let Ok(info) = request.request_info() {
                let code = if info.query.query_class() != DNSClass::IN {
                    Some(ResponseCode::Refused)
                } else {
                    self.shared.refuse(info.query.name())
                };
                if let Some(code) = code {
                    return error(request, code, response).await;
                }
            }
        }
        self.catalog.handle_request::<R, T>(request, response).await
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response: R,
    ) -> ResponseInfo {
        self.answer::<R, T>(request, self.is_ours(request), response)
            .await
    }
}

/// An error response that keeps the client's EDNS (so its buffer size still applies).
async fn error<R: ResponseHandler>(request: &Request, code: ResponseCode, mut response: R) -> ResponseInfo {
    let edns = request.edns.as_ref().map(|e| {
        let mut r = Edns::new();
        r.set_max_payload(e.max_payload().max(512));
        r
    });
    let msg = MessageResponseBuilder::new(&request.queries, edns.as_ref()).error_msg(&request.metadata, code);
    match response.send_response(msg).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!(error = %e, "DNS error response not sent");
            let mut metadata = Metadata::response_from_request(&request.metadata);
            metadata.message_type = MessageType::Response;
            metadata.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header {
                metadata,
                counts: HeaderCounts::default(),
            })
        }
    }
}

/// The running server.
pub struct Dns {
    shared: Arc<Shared>,
    udp_threads: usize,
    local: SocketAddr,
    /// The host listener: dropping it stops it.
    _main: Listener,
    /// The container network's listener: replaced when that network is made anew.
    also: Mutex<Option<Listener>>,
}

impl Dns {
    /// Binds, loads the records from the state and starts answering.
    pub async fn start(log: Arc<Log>, cfg: DnsConfig) -> Result<Arc<Self>, DnsError> {
        let udp_threads = match cfg.udp_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()).min(8),
            n => n,
        };
        let (udp, local) = bind_udp(cfg.addr)?;
        let tcp = TcpListener::bind(local)
            .await
            .map_err(|e| DnsError::Bind(local, e))?;
        let upstreams: Vec<SocketAddr> = if cfg.upstreams.is_empty() {
            system_upstreams(local)
        } else {
            cfg.upstreams
                .iter()
                .copied()
                .filter(|u| !is_self(*u, local))
                .collect()
        };
        if upstreams.len() < cfg.upstreams.len() {
            tracing::warn!(addr = %local, "an upstream is this server itself; it is left out so queries do not loop");
        }
        let forwarder = match upstreams.is_empty() {
            true => None,
            false => Some(Forwarders {
                udp: forwarder(&upstreams, cfg.forward_timeout, false)?,
                tcp: forwarder(&upstreams, cfg.forward_timeout, true)?,
            }),
        };
        let reverse = cfg
            .cluster_cidr
            .map(|(net, prefix)| zone::reverse_zones(net, prefix))
            .unwrap_or_default();
        let records = Arc::new(Records::new(&reverse));
        let projection = Projection::start(log, "dns", records.clone(), cfg.stale_budget).await;
        let mut zones = vec![LowerName::new(&zone::rune_origin())];
        zones.extend(reverse.iter().map(LowerName::new));
        let shared = Arc::new(Shared {
            records,
            projection,
            data_path: RwLock::new(None),
            zones,
            forwarder,
            dev_mode: cfg.dev_mode,
        });
        // In dev mode, host clients reach the data path on loopback.
        let main = serve(&shared, udp, udp_threads, tcp, Ipv4Addr::LOCALHOST);
        tracing::info!(addr = %local, ?upstreams, udp_threads, reverse_zones = reverse.len(), "DNS listening");
        Ok(Arc::new(Dns {
            shared,
            udp_threads,
            local,
            _main: main,
            also: Mutex::new(None),
        }))
    }

    /// Serves on the container network's gateway too, instead of any earlier one. In dev mode its
    /// clients (containers) get that address for `.rune` names: the data plane serves service
    /// ports there.
    pub async fn listen_also(self: &Arc<Self>, addr: SocketAddr) -> Result<(), DnsError> {
        let here = match addr.ip() {
            IpAddr::V4(ip) => ip,
            IpAddr::V6(_) => Ipv4Addr::LOCALHOST,
        };
        // A network made anew has a new gateway: the old address is gone, and so are its
        // listeners (dropping a server stops it).
        if let Ok(mut also) = self.also.lock() {
            also.take();
        }
        let (udp, local) = bind_udp(addr)?;
        let tcp = TcpListener::bind(local)
            .await
            .map_err(|e| DnsError::Bind(local, e))?;
        let server = serve(&self.shared, udp, self.udp_threads, tcp, here);
        if let Ok(mut also) = self.also.lock() {
            *also = Some(server);
        }
        tracing::info!(%addr, "DNS listening for containers");
        Ok(())
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Set by runed once the data plane runs: from then on a name is answered when the data
    /// path carries its VIP. `None` closes every name of our zones (SERVFAIL) rather than send
    /// clients to an address that goes nowhere.
    pub fn set_data_path(&self, dp: Option<Arc<dyn DataPath>>) {
        if let Ok(mut d) = self.shared.data_path.write() {
            *d = dp;
        }
    }

    /// The records' projection: its lag, counters and pause failpoint.
    pub fn projection(&self) -> &Arc<Projection> {
        &self.shared.projection
    }
}

/// One listener address being served: TCP by a hickory server, UDP by [`serve_udp`] threads.
/// Dropping it stops both (the UDP threads within their read timeout).
struct Listener {
    _tcp: Server<Handler>,
    stop: Arc<AtomicBool>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Starts serving the UDP socket, read by `threads` threads, and the TCP listener.
fn serve(
    shared: &Arc<Shared>,
    udp: std::net::UdpSocket,
    threads: usize,
    tcp: TcpListener,
    here: Ipv4Addr,
) -> Listener {
    let handler = |over_tcp| Handler {
        shared: shared.clone(),
        catalog: Shared::catalog(shared, here, over_tcp),
    };
    let mut server = Server::new(handler(true));
    server.register_listener(tcp, Duration::from_secs(10), 64);
    let udp_handler = Arc::new(handler(false));
    let forwards = Arc::new(Semaphore::new(MAX_FORWARDS));
    let stop = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Handle::current();
    let udp = Arc::new(udp);
    for i in 0..threads.max(1) {
        let (s, h, f, st, rt) = (
            udp.clone(),
            udp_handler.clone(),
            forwards.clone(),
            stop.clone(),
            rt.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name(format!("dns-udp-{i}"))
            .spawn(move || serve_udp(s, h, f, st, rt));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a DNS UDP thread");
        }
    }
    Listener { _tcp: server, stop }
}

/// Forwarded UDP queries waiting on an upstream at once; past it, more are dropped (clients
/// retry) rather than pile up.
const MAX_FORWARDS: usize = 4096;

/// How often a UDP thread looks up from a quiet socket to see whether it should stop.
const UDP_POLL: Duration = Duration::from_millis(500);

/// One of the threads reading a UDP socket, blocked in `recvmmsg`, answering our zones' names
/// in place through hickory's catalog (whose lookups here never wait: the future is driven to
/// completion on this thread). hickory's own UDP loop spawns a task and passes the answer
/// through a channel per query, and a tokio socket adds an epoll round and a task switch per
/// packet: together more than the answer costs. Under load one call takes up to [`BATCH`]
/// queries and one `sendmmsg` sends the kept answers among them ([`Answers`]). Forwarded
/// queries, which wait on an upstream, go to the runtime as a task each (bounded by
/// `forwards`).
fn serve_udp(
    sock: Arc<std::net::UdpSocket>,
    handler: Arc<Handler>,
    forwards: Arc<Semaphore>,
    stop: Arc<AtomicBool>,
    rt: tokio::runtime::Handle,
) {
    use std::os::fd::AsRawFd;
    let fd = sock.as_raw_fd();
    let mut bufs = vec![[0u8; 4096]; BATCH];
    let mut received = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut got: Vec<(usize, Option<SocketAddr>)> = Vec::with_capacity(BATCH);
    let mut out = Outgoing::default();
    let mut answers = Answers::default();
    // Empty polls left before the next receive blocks, and how many the next batch gets (see
    // [`SPIN`]).
    let mut spins = 0;
    let mut budget = SPIN;
    while !stop.load(Ordering::Relaxed) {
        got.clear();
        {
            let mut iovs: Vec<[IoSliceMut<'_>; 1]> =
                bufs.iter_mut().map(|b| [IoSliceMut::new(&mut b[..])]).collect();
            let flags = if spins > 0 {
                MsgFlags::MSG_WAITFORONE | MsgFlags::MSG_DONTWAIT
            } else {
                MsgFlags::MSG_WAITFORONE
            };
            match recvmmsg(fd, &mut received, iovs.iter_mut(), flags, None) {
                Ok(msgs) => {
                    got.extend(msgs.map(|m| (m.bytes, m.address.and_then(std_addr))));
                    // Polling found the next queries: poll longer next time.
                    if spins > 0 {
                        budget = (budget * 2).min(SPIN);
                    }
                    spins = budget;
                }
                // Nothing yet while polling: let the clients run and look again, or, polled
                // in vain, poll less after the next batch and block now.
                Err(Errno::EAGAIN) if spins > 0 => {
                    spins -= 1;
                    if spins == 0 {
                        budget = (budget / 2).max(1);
                    } else {
                        std::thread::yield_now();
                    }
                    continue;
                }
                // The socket's read timeout: look up to see whether to stop.
                Err(Errno::EAGAIN | Errno::EINTR) => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "DNS receive failed");
                    continue;
                }
            }
        }
        for (i, (n, src)) in got.iter().enumerate() {
            // Nothing can be sent back to port 0.
            let Some(src) = src.filter(|a| a.port() != 0) else {
                continue;
            };
            let packet = &bufs[i][..*n];
            if let Some(kept) = answers.kept(packet, &handler.shared) {
                out.push(kept, &packet[..2], src);
                continue;
            }
            answer_udp(packet, src, &sock, &handler, &forwards, &rt, &mut answers);
        }
        out.send(&sock);
    }
}

/// Queries one `recvmmsg` takes at most.
const BATCH: usize = 32;

/// Most non-blocking polls (each after a `sched_yield`) a UDP thread makes after a batch
/// before it blocks again. Under load the next query is usually a few microseconds away, and
/// sleeping in `recvmmsg` costs a context switch and a wake-up per batch (a third of the
/// thread's time in the profile); polling lets the clients run meanwhile and takes their next
/// queries without one (measured: ~10% more queries/s, lower latency at a fixed load). The
/// number adapts as an adaptive mutex spins: doubled when polling found queries, halved (down
/// to one poll) when it did not, so a lightly loaded server spends about one poll per query.
const SPIN: u32 = 64;

/// A socket address as the standard library spells it.
fn std_addr(a: SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}

/// Kept answers waiting for the batch's one `sendmmsg`.
#[derive(Default)]
struct Outgoing {
    bytes: Vec<Vec<u8>>,
    to: Vec<rustix::net::SocketAddrAny>,
}

impl Outgoing {
    /// Queues `answer` for `to` under the query's `id`.
    fn push(&mut self, answer: &[u8], id: &[u8], to: SocketAddr) {
        let i = self.to.len();
        if self.bytes.len() == i {
            self.bytes.push(Vec::with_capacity(512));
        }
        let b = &mut self.bytes[i];
        b.clear();
        b.extend_from_slice(answer);
        b[..2].copy_from_slice(id);
        self.to.push(to.into());
    }

    /// Sends what is queued. `sendmmsg` stops at the first answer it cannot send: that one is
    /// dropped, as a lost datagram would be (its client asks again), and the rest still go.
    /// (rustix's, not nix's: reading nix's results back touches address slots it never wrote.)
    fn send(&mut self, sock: &std::net::UdpSocket) {
        use rustix::net::{sendmmsg, MMsgHdr, SendAncillaryBuffer, SendFlags};
        let n = self.to.len();
        let slices: Vec<[IoSlice<'_>; 1]> = self.bytes[..n].iter().map(|b| [IoSlice::new(b)]).collect();
        let mut control: Vec<SendAncillaryBuffer<'_, '_, '_>> = (0..n).map(|_| Default::default()).collect();
        let mut headers: Vec<MMsgHdr<'_>> = self
            .to
            .iter()
            .zip(&slices)
            .zip(control.iter_mut())
            .map(|((to, iov), c)| MMsgHdr::new_with_addr(to, iov, c))
            .collect();
        let mut from = 0;
        while from < n {
            match sendmmsg(sock, &mut headers[from..], SendFlags::empty()) {
                Ok(sent) => from += sent.max(1),
                Err(e) => {
                    tracing::debug!(error = %e, "a DNS answer not sent");
                    from += 1;
                }
            }
        }
        drop(headers);
        self.to.clear();
    }
}

/// Answers one query that has no kept answer: ours in place (keeping the answer), others
/// forwarded by a task.
fn answer_udp(
    packet: &[u8],
    src: SocketAddr,
    sock: &Arc<std::net::UdpSocket>,
    handler: &Arc<Handler>,
    forwards: &Arc<Semaphore>,
    rt: &tokio::runtime::Handle,
    answers: &mut Answers,
) {
    let request = match Request::from_bytes(packet.to_vec(), src, Protocol::Udp) {
        Ok(r) => r,
        Err(_) => {
            if let Some(reply) = formerr(packet) {
                let _ = sock.send_to(&reply, src);
            }
            return;
        }
    };
    // Responses are never answered (no reflection).
    if request.metadata.message_type == MessageType::Response {
        return;
    }
    let reply = UdpReply {
        sock: sock.clone(),
        dst: src,
        sent: None,
    };
    if handler.is_ours(&request) {
        // Read before answering: an answer is never kept under a newer index than the
        // records it was made from.
        let at = handler.shared.projection.applied_index();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let reply = UdpReply {
            sent: Some(sent.clone()),
            ..reply
        };
        // A bug in answering one packet must not end this socket's thread.
        let answered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            futures::executor::block_on(handler.answer::<_, TokioTime>(&request, true, reply))
        }));
        if answered.is_err() {
            tracing::error!(%src, "answering a DNS query panicked; the query is dropped");
        } else if let Ok(sent) = sent.lock() {
            let vip = request
                .request_info()
                .ok()
                .and_then(|i| handler.shared.records.vip_behind(i.query.name()));
            answers.keep(packet, &sent, vip, at);
        }
    } else if let Ok(permit) = forwards.clone().try_acquire_owned() {
        let handler = handler.clone();
        rt.spawn(async move {
            handler.answer::<_, TokioTime>(&request, false, reply).await;
            drop(permit);
        });
    } else {
        tracing::debug!(%src, "too many forwarded queries in flight; one dropped");
    }
}

/// Answers a UDP thread made for our zones, by the query's bytes after its ID: the same bytes
/// get the same answer (the records, the listener and the transport are the same), so a
/// repeated query costs a lookup and a copy instead of a parse, a catalog walk and an
/// encoding. All are dropped when the applied index moves (the records, and the SOA serial,
/// may have changed); the gate is asked again on every use, since the data path and the
/// projection's staleness change without an entry. Only NOERROR and NXDOMAIN answers are kept:
/// a SERVFAIL says the gate or the catalog could not answer then.
#[derive(Default)]
struct Answers {
    at: u64,
    by_query: HashMap<Box<[u8]>, Kept>,
}

/// A kept answer, and the VIP its name leads to (the gate's question).
struct Kept {
    bytes: Box<[u8]>,
    vip: Option<Ipv4Addr>,
}

/// Answers kept per UDP thread; past it they are all dropped and kept anew.
const ANSWERS: usize = 4096;

/// Queries longer than this are answered but not kept.
const KEPT_QUERY_MAX: usize = 512;

impl Answers {
    /// The kept answer to `query` (its ID still to be set), if there is one and the gate is
    /// open.
    fn kept(&mut self, query: &[u8], shared: &Shared) -> Option<&[u8]> {
        // Longer queries are never kept: no need to hash them.
        if query.len() <= 12 || query.len() > KEPT_QUERY_MAX || self.by_query.is_empty() {
            return None;
        }
        let at = shared.projection.applied_index();
        if at != self.at {
            self.by_query.clear();
            return None;
        }
        let kept = self.by_query.get(&query[2..])?;
        shared.open_for(kept.vip).then_some(&kept.bytes[..])
    }

    /// Keeps the answer sent to `query`, made from the records at index `at`.
    fn keep(&mut self, query: &[u8], sent: &[u8], vip: Option<Ipv4Addr>, at: u64) {
        if query.len() <= 12 || query.len() > KEPT_QUERY_MAX || sent.len() < 12 {
            return;
        }
        let rcode = sent[3] & 0x0f;
        if rcode != ResponseCode::NoError.low() && rcode != ResponseCode::NXDomain.low() {
            return;
        }
        if at != self.at || self.by_query.len() >= ANSWERS {
            self.by_query.clear();
            self.at = at;
        }
        self.by_query.insert(
            query[2..].into(),
            Kept {
                bytes: sent.into(),
                vip,
            },
        );
    }
}

/// FORMERR for a packet with a query header whose body does not parse; `None` for anything
/// without a header, or a response.
fn formerr(packet: &[u8]) -> Option<Vec<u8>> {
    let header = Header::read(&mut BinDecoder::new(packet)).ok()?;
    if header.metadata.message_type == MessageType::Response {
        return None;
    }
    let mut metadata = Metadata::response_from_request(&header.metadata);
    metadata.response_code = ResponseCode::FormErr;
    let mut out = Vec::with_capacity(12);
    Header {
        metadata,
        counts: HeaderCounts::default(),
    }
    .emit(&mut BinEncoder::new(&mut out))
    .ok()?;
    Some(out)
}

/// Sends a response straight back on the socket it came in on, cut to the client's buffer
/// (512 bytes without EDNS) with TC set when it does not fit.
#[derive(Clone)]
struct UdpReply {
    sock: Arc<std::net::UdpSocket>,
    dst: SocketAddr,
    /// Where to leave a copy of what was sent, to be kept.
    sent: Option<Arc<Mutex<Vec<u8>>>>,
}

#[async_trait::async_trait]
impl ResponseHandler for UdpReply {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let max = response.edns().map_or(512, |e| e.max_payload().max(512));
        let mut bytes = Vec::with_capacity(512);
        let info = {
            let mut encoder = BinEncoder::new(&mut bytes);
            encoder.set_max_size(max);
            response.destructive_emit(&mut encoder)?
        };
        // A UDP send does not wait for the peer; the socket's buffer takes it at once.
        self.sock.send_to(&bytes, self.dst)?;
        if let Some(Ok(mut sent)) = self.sent.as_ref().map(|s| s.lock()) {
            *sent = bytes;
        }
        Ok(info)
    }
}

/// The UDP socket of one address, read by several threads: one queue that whichever thread is
/// free takes from. (One SO_REUSEPORT socket per thread split the queries by the client's
/// address and port, so a few busy clients could load one thread while another idled.)
fn bind_udp(addr: SocketAddr) -> Result<(std::net::UdpSocket, SocketAddr), DnsError> {
    let bind = || -> std::io::Result<(std::net::UdpSocket, SocketAddr)> {
        let s = std::net::UdpSocket::bind(addr)?;
        s.set_read_timeout(Some(UDP_POLL))?;
        let local = s.local_addr()?;
        Ok((s, local))
    };
    bind().map_err(|e| DnsError::Bind(addr, e))
}

/// The two forwarders (see [`Shared`]).
struct Forwarders {
    udp: Arc<dyn ZoneHandler>,
    tcp: Arc<dyn ZoneHandler>,
}

/// hickory's forwarder over the upstreams: UDP first and TCP for truncated answers, or TCP
/// only.
fn forwarder(
    upstreams: &[SocketAddr],
    timeout: Duration,
    tcp_only: bool,
) -> Result<Arc<dyn ZoneHandler>, DnsError> {
    let name_servers = upstreams
        .iter()
        .map(|u| {
            let mut ns = NameServerConfig::udp_and_tcp(u.ip());
            let transports = if tcp_only {
                vec![ConnectionConfig::tcp()]
            } else {
                vec![ConnectionConfig::udp(), ConnectionConfig::tcp()]
            };
            ns.connections = transports
                .into_iter()
                .map(|mut c| {
                    c.port = u.port();
                    c
                })
                .collect();
            ns
        })
        .collect();
    let mut options = ResolverOpts::default();
    options.timeout = timeout;
    options.attempts = 1;
    let f = ForwardZoneHandler::builder_tokio(ForwardConfig {
        name_servers,
        options: Some(options),
    })
    .build()
    .map_err(|e| DnsError::Forwarder(upstreams.to_vec(), e))?;
    Ok(Arc::new(f))
}

/// The host's resolvers: those of /etc/resolv.conf, or, when that names systemd-resolved's stub
/// (127.0.0.53/54), the servers resolved itself asks. With a `~rune` routing domain pointing at
/// this server, forwarding to the stub would send names back here.
fn system_upstreams(own: SocketAddr) -> Vec<SocketAddr> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let ups = resolv_conf_upstreams(&read("/etc/resolv.conf"), own);
    let stub = |u: &SocketAddr| matches!(u.ip(), IpAddr::V4(ip) if ip == Ipv4Addr::new(127, 0, 0, 53) || ip == Ipv4Addr::new(127, 0, 0, 54));
    if ups.iter().any(stub) {
        let behind = resolv_conf_upstreams(&read("/run/systemd/resolve/resolv.conf"), own);
        if !behind.is_empty() {
            return behind;
        }
    }
    ups
}

/// The nameservers of a resolv.conf, except this server itself.
pub fn resolv_conf_upstreams(text: &str, own: SocketAddr) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next()).flatten()
        })
        .filter_map(|ip| ip.split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .filter(|a| !is_self(*a, own))
        .collect()
}

/// Whether `upstream` is this server listening at `own`: the same address, or, when it
/// listens on every address (`0.0.0.0:53`), the same port at a loopback address or at an
/// address of this host (one a socket can be bound to). Forwarding there would loop until
/// every forwarding slot waits out its timeout.
pub fn is_self(upstream: SocketAddr, own: SocketAddr) -> bool {
    if upstream == own {
        return true;
    }
    // `0.0.0.0` is IPv4 only; `[::]` takes IPv4 too where the host maps it.
    let family =
        upstream.is_ipv4() == own.is_ipv4() || own.ip() == IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED);
    upstream.port() == own.port()
        && own.ip().is_unspecified()
        && family
        && (upstream.ip().is_loopback() || std::net::UdpSocket::bind((upstream.ip(), 0)).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rune_log::projection::View;
    use rune_statemachine::delta::Delta;
    use rune_statemachine::testing::{delta, fold};

    #[test]
    fn an_upstream_at_this_servers_own_port_is_itself() {
        let any: SocketAddr = "0.0.0.0:5353".parse().unwrap();
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(is_self(at("127.0.0.1:5353"), any));
        assert!(is_self(at("127.0.0.53:5353"), any));
        assert!(!is_self(at("127.0.0.1:53"), any));
        // An address no interface here has is another server.
        assert!(!is_self(at("192.0.2.7:5353"), any));
        // 0.0.0.0 is IPv4 only: a resolver on ::1 at that port is another server.
        assert!(!is_self(at("[::1]:5353"), any));
        let one = at("127.0.0.1:5353");
        assert!(is_self(one, one));
        assert!(!is_self(at("127.0.0.2:5353"), one));
        assert_eq!(
            resolv_conf_upstreams("nameserver 127.0.0.1\nnameserver 192.0.2.7\n", at("0.0.0.0:53")),
            [at("192.0.2.7:53")]
        );
    }

    fn records() -> Records {
        Records::new(&zone::reverse_zones(Ipv4Addr::new(10, 96, 0, 0), 16))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// The projection contract: built from the state at one point and fed every later
        /// delta, the records equal those built from the state at the end.
        #[test]
        fn fed_equals_built(ds in prop::collection::vec(delta(), 0..60), cut in 0usize..60) {
            let cut = cut.min(ds.len());
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let (fed, built) = (records(), records());
            rt.block_on(async {
                fed.reset(fold(&ds[..cut])).await.unwrap();
                let rest: Vec<&Delta> = ds[cut..].iter().filter(|d| fed.wants(d)).collect();
                fed.apply(&rest).await.unwrap();
                built.reset(fold(&ds)).await.unwrap();
            });
            prop_assert_eq!(fed.dump(), built.dump());
        }
    }

    #[test]
    fn reverse_zones_round_out_to_octets() {
        let names = |net: [u8; 4], p| -> Vec<String> {
            zone::reverse_zones(Ipv4Addr::from(net), p)
                .iter()
                .map(|n| n.to_string())
                .collect()
        };
        assert_eq!(names([10, 96, 0, 0], 16), ["96.10.in-addr.arpa."]);
        assert_eq!(names([10, 96, 7, 0], 24), ["7.96.10.in-addr.arpa."]);
        let twelve = names([10, 96, 0, 0], 12);
        assert_eq!(twelve.len(), 16);
        assert_eq!(twelve[0], "96.10.in-addr.arpa.");
        assert_eq!(twelve[15], "111.10.in-addr.arpa.");
        // Below a /24, each address is its own zone: the rest of the /24 is someone else's.
        let small = names([10, 96, 0, 8], 29);
        assert_eq!(small.len(), 8);
        assert_eq!(small[0], "8.0.96.10.in-addr.arpa.");
    }

    /// The UDP threads share one socket and nothing else may share its address: a second
    /// server on it (another runed left running, say) is refused instead of silently taking a
    /// share of the queries, as SO_REUSEPORT let it.
    #[test]
    fn a_held_address_is_not_bound_twice() {
        let (_held, at) = bind_udp("127.0.0.1:0".parse().expect("address")).expect("first bind");
        match bind_udp(at) {
            Err(DnsError::Bind(a, _)) => assert_eq!(a, at),
            Ok((_, again)) => panic!("{at} was bound a second time, as {again}"),
            Err(e) => panic!("unexpected error: {e}"),
        }
    }

    #[test]
    fn resolv_conf() {
        let own: SocketAddr = "127.0.0.123:53".parse().unwrap();
        let text = "# x\nnameserver 127.0.0.123\nnameserver 192.0.2.53\nsearch a\nnameserver fe80::1%eth0\n";
        let ups = resolv_conf_upstreams(text, own);
        assert_eq!(ups.len(), 2);
        assert_eq!(ups[0], "192.0.2.53:53".parse().unwrap());
    }
}
