//! The embedded DNS: `<svc>.<ns>.rune` answered with the service's VIP (TTL 5 s), other types
//! for an existing name with no data, unknown `.rune` names with NXDOMAIN, and every other name
//! forwarded to the upstreams (never to itself).
//!
//! It is a projection of the applied log ([`rune_log::projection`]): the zone is built from the
//! services at an index, then each service delta after it puts or removes one name. It fails
//! closed: `.rune` names get
//! SERVFAIL while the data path cannot carry traffic yet, and while the projection lags the log
//! for longer than its stale budget.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod wire;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rune_log::projection::{Projection, ProjectionError, View};
use rune_log::Log;
use rune_statemachine::delta::Delta;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

use wire::{Bad, Query, Rcode};

/// Seconds a `.rune` answer may be cached: short, so a changed VIP is seen soon.
pub const TTL: u32 = 5;

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
}

/// Failures to start the server.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The address could not be bound.
    #[error("cannot listen for DNS on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
}

/// `svc.ns` → VIP: the projection's view.
#[derive(Default)]
struct Zone(RwLock<HashMap<String, [u8; 4]>>);

impl Zone {
    fn get(&self, name: &str) -> Option<[u8; 4]> {
        self.0.read().ok().and_then(|z| z.get(name).copied())
    }

    fn put(z: &mut HashMap<String, [u8; 4]>, d: &Delta) {
        if let Delta::Service {
            namespace,
            name,
            record,
        } = d
        {
            let key = format!("{name}.{namespace}");
            match record
                .as_ref()
                .and_then(|r| r.vip.as_deref()?.parse::<Ipv4Addr>().ok())
            {
                Some(ip) => z.insert(key, ip.octets()),
                None => z.remove(&key),
            };
        }
    }
}

impl View for Zone {
    async fn reset(&self, state: Vec<Delta>) -> Result<(), ProjectionError> {
        let mut z = HashMap::new();
        for d in &state {
            Zone::put(&mut z, d);
        }
        *self.0.write().map_err(|e| ProjectionError::View(e.to_string()))? = z;
        Ok(())
    }

    async fn apply(&self, deltas: &[&Delta]) -> Result<(), ProjectionError> {
        let mut z = self.0.write().map_err(|e| ProjectionError::View(e.to_string()))?;
        for d in deltas {
            Zone::put(&mut z, d);
        }
        Ok(())
    }

    fn wants(&self, d: &Delta) -> bool {
        matches!(d, Delta::Service { .. })
    }
}

/// The running server.
pub struct Dns {
    cfg: DnsConfig,
    upstreams: Vec<SocketAddr>,
    zone: Arc<Zone>,
    projection: Arc<Projection>,
    data_path_ready: AtomicBool,
    local: SocketAddr,
    /// The container network's listeners: replaced when that network is made anew.
    also: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Dns {
    /// Binds, loads the zone from the state and starts answering.
    pub async fn start(log: Arc<Log>, cfg: DnsConfig) -> Result<Arc<Self>, DnsError> {
        let udp = UdpSocket::bind(cfg.addr)
            .await
            .map_err(|e| DnsError::Bind(cfg.addr, e))?;
        let local = udp.local_addr().map_err(|e| DnsError::Bind(cfg.addr, e))?;
        let tcp = TcpListener::bind(local)
            .await
            .map_err(|e| DnsError::Bind(local, e))?;
        let upstreams = if cfg.upstreams.is_empty() {
            resolv_conf_upstreams(
                &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
                local,
            )
        } else {
            cfg.upstreams.iter().copied().filter(|u| *u != local).collect()
        };
        let zone = Arc::new(Zone::default());
        let projection = Projection::start(log, "dns", zone.clone(), cfg.stale_budget).await;
        let dns = Arc::new(Dns {
            cfg,
            upstreams,
            zone,
            projection,
            data_path_ready: AtomicBool::new(false),
            local,
            also: std::sync::Mutex::new(Vec::new()),
        });
        tracing::info!(addr = %local, upstreams = ?dns.upstreams, "DNS listening");
        // In dev mode, host clients reach the data path on loopback.
        let here = Ipv4Addr::LOCALHOST;
        tokio::spawn(serve_udp(dns.clone(), Arc::new(udp), here));
        tokio::spawn(serve_tcp(dns.clone(), tcp, here));
        Ok(dns)
    }

    /// Serves on the container network's gateway too, instead of any earlier one. In dev mode its
    /// clients (containers) get that address for `.rune` names: the data plane serves service
    /// ports there.
    pub async fn listen_also(self: &Arc<Self>, addr: SocketAddr) -> Result<(), DnsError> {
        let here = match addr.ip() {
            IpAddr::V4(ip) => ip,
            IpAddr::V6(_) => Ipv4Addr::LOCALHOST,
        };
        let udp = UdpSocket::bind(addr).await.map_err(|e| DnsError::Bind(addr, e))?;
        let tcp = TcpListener::bind(addr)
            .await
            .map_err(|e| DnsError::Bind(addr, e))?;
        let tasks = vec![
            tokio::spawn(serve_udp(self.clone(), Arc::new(udp), here)),
            tokio::spawn(serve_tcp(self.clone(), tcp, here)),
        ];
        // A network made anew has a new gateway: the old address is gone, and so are its
        // listeners.
        if let Ok(mut also) = self.also.lock() {
            for t in also.drain(..) {
                t.abort();
            }
            *also = tasks;
        }
        tracing::info!(%addr, "DNS listening for containers");
        Ok(())
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Opened by the data plane once VIP traffic reaches endpoints; until then `.rune` names
    /// answer SERVFAIL rather than send clients to an address that goes nowhere.
    pub fn set_data_path_ready(&self, ready: bool) {
        self.data_path_ready.store(ready, Ordering::Relaxed);
    }

    /// The zone's projection: its lag, counters and pause failpoint.
    pub fn projection(&self) -> &Arc<Projection> {
        &self.projection
    }

    /// The answer to a packet that arrived at a listener on `here`, or `None` to drop it.
    pub async fn answer(&self, p: &[u8], here: Ipv4Addr) -> Option<Vec<u8>> {
        match wire::parse(p) {
            Err(Bad::Drop) => None,
            Err(Bad::Answer(id, rd, rc)) => Some(wire::error(id, rd, rc)),
            Ok(q) if q.name == "rune" || q.name.ends_with(".rune") => Some(self.local_answer(p, &q, here)),
            Ok(q) => Some(self.forward(p, &q).await),
        }
    }

    /// `here` is the listener's address: in dev mode, where the data path serves that
    /// listener's clients.
    fn local_answer(&self, p: &[u8], q: &Query, here: Ipv4Addr) -> Vec<u8> {
        if !wire::class_ok(q) {
            return wire::respond(p, q, Rcode::NotImp, true, &[], TTL);
        }
        if !self.data_path_ready.load(Ordering::Relaxed) || self.projection.stale() {
            return wire::respond(p, q, Rcode::ServFail, false, &[], TTL);
        }
        let labels: Vec<&str> = q.name.split('.').collect();
        let found = match labels.as_slice() {
            ["rune"] => return wire::respond(p, q, Rcode::NoError, true, &[], TTL),
            [svc, ns, "rune"] => self.zone.get(&format!("{svc}.{ns}")),
            _ => None,
        };
        match found {
            None => wire::respond(p, q, Rcode::NxDomain, true, &[], TTL),
            Some(vip) if q.qtype == wire::TYPE_A || q.qtype == 255 => {
                let ip = if self.cfg.dev_mode { here.octets() } else { vip };
                wire::respond(p, q, Rcode::NoError, true, &[ip], TTL)
            }
            // The name exists; it has no data of this type (AAAA, MX, ...).
            Some(_) => wire::respond(p, q, Rcode::NoError, true, &[], TTL),
        }
    }

    async fn forward(&self, p: &[u8], q: &Query) -> Vec<u8> {
        for up in &self.upstreams {
            let bind: SocketAddr = match up.ip() {
                IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
                IpAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
            };
            let Ok(sock) = UdpSocket::bind(bind).await else {
                continue;
            };
            if sock.send_to(p, up).await.is_err() {
                continue;
            }
            let mut buf = vec![0u8; 4096];
            let got = tokio::time::timeout(self.cfg.forward_timeout, async {
                loop {
                    let (n, from) = sock.recv_from(&mut buf).await?;
                    // Only the upstream's reply to this query counts.
                    if from == *up && n >= 2 && buf[..2] == q.id.to_be_bytes() {
                        return Ok::<usize, std::io::Error>(n);
                    }
                }
            })
            .await;
            if let Ok(Ok(n)) = got {
                buf.truncate(n);
                return buf;
            }
            tracing::debug!(upstream = %up, name = %q.name, "upstream did not answer in time");
        }
        wire::respond(p, q, Rcode::ServFail, false, &[], TTL)
    }
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
        .filter(|a| *a != own)
        .collect()
}

async fn serve_udp(dns: Arc<Dns>, sock: Arc<UdpSocket>, here: Ipv4Addr) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "DNS receive failed");
                continue;
            }
        };
        let pkt = buf[..n].to_vec();
        match wire::parse(&pkt) {
            // Local answers are quick: answered inline, in order.
            Ok(q) if q.name == "rune" || q.name.ends_with(".rune") => {
                let r = dns.local_answer(&pkt, &q, here);
                let _ = sock.send_to(&r, peer).await;
            }
            // Forwarding waits on an upstream: off the receive loop.
            _ => {
                let (dns, sock) = (dns.clone(), sock.clone());
                tokio::spawn(async move {
                    if let Some(r) = dns.answer(&pkt, here).await {
                        let _ = sock.send_to(&r, peer).await;
                    }
                });
            }
        }
    }
}

async fn serve_tcp(dns: Arc<Dns>, l: TcpListener, here: Ipv4Addr) {
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            continue;
        };
        let dns = dns.clone();
        tokio::spawn(async move {
            loop {
                let read = async {
                    let len = s.read_u16().await? as usize;
                    let mut pkt = vec![0u8; len];
                    s.read_exact(&mut pkt).await?;
                    Ok::<Vec<u8>, std::io::Error>(pkt)
                };
                let Ok(Ok(pkt)) = tokio::time::timeout(Duration::from_secs(10), read).await else {
                    return;
                };
                let Some(r) = dns.answer(&pkt, here).await else {
                    return;
                };
                let Ok(len) = u16::try_from(r.len()) else { return };
                if s.write_all(&len.to_be_bytes()).await.is_err() || s.write_all(&r).await.is_err() {
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rune_statemachine::testing::{delta, fold};

    fn zone(z: &Zone) -> Vec<(String, [u8; 4])> {
        let mut v: Vec<_> = z.0.read().unwrap().iter().map(|(k, v)| (k.clone(), *v)).collect();
        v.sort();
        v
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// The projection contract: built from the state at one point and fed every later
        /// delta, the zone equals one built from the state at the end.
        #[test]
        fn fed_equals_built(ds in prop::collection::vec(delta(), 0..60), cut in 0usize..60) {
            let cut = cut.min(ds.len());
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let (fed, built) = (Zone::default(), Zone::default());
            rt.block_on(async {
                fed.reset(fold(&ds[..cut])).await.unwrap();
                let rest: Vec<&Delta> = ds[cut..].iter().filter(|d| fed.wants(d)).collect();
                fed.apply(&rest).await.unwrap();
                built.reset(fold(&ds)).await.unwrap();
            });
            prop_assert_eq!(zone(&fed), zone(&built));
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
