//! The user-space proxy: one listener per service port, each connection checked against the
//! policy, sent to a ready endpoint (round robin or fewest connections) and piped both ways.
//! A connection that cannot be served (denied, no endpoint, stale view) is reset at once, so a
//! client never hangs on a VIP that goes nowhere.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::policy::{decide, Source, SvcKey, Target};
use crate::table::{Mode, Svc};
use crate::{DataPlane, SvcCounters};

/// Where a connection went: the endpoint's own address, and the gateway of the node it runs
/// on when that is another node (its address means something only there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Route {
    /// The other node's gateway, if any.
    pub via: Option<SocketAddr>,
    /// The endpoint's address and port on its node.
    pub addr: SocketAddr,
}

impl Route {
    /// A connection to the endpoint of `service`'s `instance` for service port `port`:
    /// directly on this node, through its node's gateway elsewhere.
    pub(crate) async fn dial(
        self,
        dp: &DataPlane,
        service: &SvcKey,
        instance: &str,
        port: u16,
    ) -> std::io::Result<TcpStream> {
        match self.via {
            None => TcpStream::connect(self.addr).await,
            Some(gw) => crate::gateway::dial(gw, dp.gateway_key(), service, instance, port).await,
        }
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.via {
            Some(gw) => write!(f, "{} via {gw}", self.addr),
            None => write!(f, "{}", self.addr),
        }
    }
}

/// Accepts connections for one service port until aborted.
pub(crate) async fn serve(dp: Arc<DataPlane>, key: SvcKey, port: u16, l: TcpListener) {
    let rr = Arc::new(AtomicUsize::new(0));
    let counters = dp.stats.of(&key);
    loop {
        let (client, peer) = match l.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(service = %key, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let (dp, key, rr, counters) = (dp.clone(), key.clone(), rr.clone(), counters.clone());
        tokio::spawn(async move {
            handle(dp, key, port, client, peer, rr, counters).await;
        });
    }
}

/// Closes with a reset: the client learns at once that nobody will answer.
pub(crate) fn reset(s: TcpStream) {
    if let Ok(std) = s.into_std() {
        let _ = socket_linger_zero(&std);
    }
}

fn socket_linger_zero(s: &std::net::TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads `size_of::<linger>()` bytes from a valid, live `linger` value;
    // the descriptor is owned by `s` and open for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&l).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

async fn handle(
    dp: Arc<DataPlane>,
    key: SvcKey,
    port: u16,
    client: TcpStream,
    peer: SocketAddr,
    rr: Arc<AtomicUsize>,
    counters: Arc<SvcCounters>,
) {
    if dp.stale() {
        counters.connection("stale");
        return reset(client);
    }
    let table = dp.table();
    let Some(svc) = table.services.get(&key) else {
        return reset(client);
    };
    // Name the source only when a policy needs it: naming a host process reads /proc.
    let mut src = Source {
        service: table.by_ip.get(&peer.ip()).cloned(),
        ip: peer.ip(),
    };
    if src.service.is_none()
        && (svc.policy.ingress.is_some() || table.any_egress)
        && !table.by_pgid.is_empty()
    {
        let groups = table.clone();
        let owner = tokio::task::spawn_blocking(move || crate::owner::owner_group(peer, &groups.by_pgid))
            .await
            .ok()
            .flatten();
        src.service = owner.and_then(|g| table.by_pgid.get(&g).cloned());
    }
    let src_policy = src
        .service
        .as_ref()
        .and_then(|k| table.services.get(k))
        .map(|s| &s.policy);
    let target = Target {
        key: &key,
        vip: svc.vip,
        ports: &svc.ports,
        policy: &svc.policy,
    };
    let d = decide(&src, src_policy, &target, port);
    if let Some(direction) = d.denied_by() {
        let charged = if direction == "egress" {
            src.service.clone().unwrap_or_else(|| key.clone())
        } else {
            key.clone()
        };
        tracing::debug!(from = %peer, source = ?src.service, to = %key, port, direction, "connection denied by policy");
        dp.stats.drop(&charged, direction, "proxy");
        counters.connection("denied");
        return reset(client);
    }
    match connect(&dp, svc, port, &rr).await {
        Some((upstream, ep)) => {
            counters.connection("forwarded");
            pipe(
                &dp,
                &counters,
                client,
                upstream,
                ep,
                svc.mode == Mode::LeastConnections,
            )
            .await;
        }
        None => {
            counters.connection("no_endpoint");
            reset(client);
        }
    }
}

/// Connects to an endpoint of `svc` for service port `port`, trying each ready endpoint once
/// from the balancer's choice onward; one on another node through that node's gateway.
pub(crate) async fn connect(
    dp: &DataPlane,
    svc: &Svc,
    port: u16,
    rr: &AtomicUsize,
) -> Option<(TcpStream, Route)> {
    if svc.mode == Mode::None {
        return None;
    }
    let routes: Vec<(Route, &str)> = svc
        .endpoints
        .iter()
        .filter_map(|e| {
            let addr = SocketAddr::new(e.ip, e.target(port)?);
            Some((Route { via: e.via, addr }, e.instance.as_str()))
        })
        .collect();
    if routes.is_empty() {
        return None;
    }
    let start = match svc.mode {
        Mode::LeastConnections => {
            let active = dp.active.lock().ok()?;
            let offset = rr.fetch_add(1, Ordering::Relaxed);
            (0..routes.len())
                .map(|i| (i + offset) % routes.len())
                .min_by_key(|i| active.get(&routes[*i].0).copied().unwrap_or(0))
                .unwrap_or(0)
        }
        _ => rr.fetch_add(1, Ordering::Relaxed) % routes.len(),
    };
    for i in 0..routes.len() {
        let (route, instance) = routes[(start + i) % routes.len()];
        let dial = route.dial(dp, &svc.key, instance, port);
        match tokio::time::timeout(dp.cfg.connect_timeout, dial).await {
            Ok(Ok(s)) => return Some((s, route)),
            Ok(Err(e)) => tracing::debug!(endpoint = %route, error = %e, "endpoint refused; trying the next"),
            Err(_) => tracing::debug!(endpoint = %route, "endpoint did not answer in time; trying the next"),
        }
    }
    None
}

/// Pipes both ways (in the kernel, [`crate::splice`]; in user space when no pipe can be made)
/// until both sides are done, counting
/// bytes and open connections (per endpoint when `track`, for the least-connections balancer).
pub(crate) async fn pipe(
    dp: &DataPlane,
    counters: &SvcCounters,
    mut client: TcpStream,
    mut upstream: TcpStream,
    ep: Route,
    track: bool,
) {
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let _guard = dp.open(ep, track);
    let piped = match crate::splice::pipes() {
        Ok(p) => crate::splice::both_ways(&client, &upstream, p).await,
        Err(e) => {
            // Out of descriptors for pipes: copy in user space, as before splice.
            tracing::debug!(error = %e, "no pipe for splice; copying");
            tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, 32 * 1024, 32 * 1024).await
        }
    };
    match piped {
        Ok((to_endpoint, to_client)) => counters.add_bytes(to_endpoint, to_client),
        Err(e) => tracing::debug!(endpoint = %ep, error = %e, "connection ended with an error"),
    }
}
