//! The node gateway: how one node's data plane reaches an instance that runs on another. An
//! instance's address (a container's on its node's bridge, a process's loopback) means
//! something only on its own node, so a proxy whose chosen endpoint is elsewhere dials that
//! node's gateway instead and names the instance; the gateway connects to it locally, answers
//! whether that worked (so the proxy can try the next endpoint), and then pipes raw bytes both
//! ways, as the proxy does.
//!
//! The policy was decided where the connection entered (the proxy knows the client); the
//! gateway serves only the other nodes' gateway addresses, only requests that carry the
//! cluster's gateway key (which only members can derive: a container on another node, whose
//! traffic leaves that node from its address, cannot), and only instances of this node that
//! are ready endpoints of the service named. The link between nodes is plain TCP: the
//! cluster's network is trusted as a Kubernetes pod network without encryption is.
//!
//! On the wire, before the bytes of the connection: `RGW1`, a big-endian `u16` length and
//! `key namespace service instance port` (the key in hex, the service port; space-separated);
//! the answer is one byte `0`, or `1`, a `u16` length and why not (UTF-8). Both sides read
//! exactly these bytes, so nothing of the connection's own is read into a buffer before the
//! pipe starts.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::policy::SvcKey;
use crate::proxy::Route;
use crate::DataPlane;

const MAGIC: &[u8; 4] = b"RGW1";
/// The longest request: names are DNS labels, so far shorter in practice.
const MAX_REQUEST: usize = 1024;
/// How long a peer may take to name what it wants.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The secret every member of a cluster shares for its gateways (derived by the daemon from
/// what only members hold).
pub type GatewayKey = [u8; 32];

/// What a peer asks the gateway for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Request {
    key: GatewayKey,
    service: SvcKey,
    instance: String,
    port: u16,
}

fn encode(r: &Request) -> Vec<u8> {
    let body = format!(
        "{} {} {} {} {}",
        hex::encode(r.key),
        r.service.ns,
        r.service.name,
        r.instance,
        r.port
    );
    let mut out = Vec::with_capacity(6 + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(body.as_bytes());
    out
}

fn parse(body: &[u8]) -> Result<Request, String> {
    let text = std::str::from_utf8(body).map_err(|_| "request is not UTF-8".to_string())?;
    let mut f = text.split(' ');
    match (f.next(), f.next(), f.next(), f.next(), f.next(), f.next()) {
        (Some(key), Some(ns), Some(name), Some(instance), Some(port), None)
            if !ns.is_empty() && !name.is_empty() && !instance.is_empty() =>
        {
            let key = hex::decode(key)
                .ok()
                .and_then(|k| GatewayKey::try_from(k).ok())
                .ok_or_else(|| "the key is not 64 hex digits".to_string())?;
            let port = port
                .parse()
                .map_err(|_| format!("port '{port}' is not a port number"))?;
            Ok(Request {
                key,
                service: SvcKey::new(ns, name),
                instance: instance.to_string(),
                port,
            })
        }
        _ => Err("request is not 'key namespace service instance port'".to_string()),
    }
}

async fn read_request(s: &mut TcpStream) -> Result<Request, String> {
    let mut head = [0u8; 6];
    s.read_exact(&mut head)
        .await
        .map_err(|e| format!("reading the request: {e}"))?;
    if &head[..4] != MAGIC {
        return Err("not a rune gateway request".into());
    }
    let len = usize::from(u16::from_be_bytes([head[4], head[5]]));
    if len > MAX_REQUEST {
        return Err(format!("request of {len} bytes (at most {MAX_REQUEST})"));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)
        .await
        .map_err(|e| format!("reading the request: {e}"))?;
    parse(&body)
}

/// Dials the gateway at `gw` for `instance` of `service` on service port `port`; the stream
/// returned carries the connection's bytes to it. An error says why the gateway refused.
pub(crate) async fn dial(
    gw: SocketAddr,
    key: Option<&GatewayKey>,
    service: &SvcKey,
    instance: &str,
    port: u16,
) -> io::Result<TcpStream> {
    let key = *key.ok_or_else(|| io::Error::other("this node has no gateway key (not in a cluster)"))?;
    let mut s = TcpStream::connect(gw).await?;
    let _ = s.set_nodelay(true);
    let req = Request {
        key,
        service: service.clone(),
        instance: instance.to_string(),
        port,
    };
    s.write_all(&encode(&req)).await?;
    match s.read_u8().await? {
        0 => Ok(s),
        _ => {
            let len = usize::from(s.read_u16().await?).min(MAX_REQUEST);
            let mut why = vec![0u8; len];
            s.read_exact(&mut why).await?;
            Err(io::Error::other(format!(
                "gateway {gw}: {}",
                String::from_utf8_lossy(&why)
            )))
        }
    }
}

async fn refuse(mut s: TcpStream, why: &str) {
    let why = &why.as_bytes()[..why.len().min(MAX_REQUEST)];
    let mut out = vec![1u8];
    out.extend_from_slice(&(why.len() as u16).to_be_bytes());
    out.extend_from_slice(why);
    let _ = s.write_all(&out).await;
}

/// Whether two keys are equal, in time that does not depend on where they differ.
fn same_key(a: &GatewayKey, b: &GatewayKey) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves the gateway on `l` until the task is aborted.
pub(crate) async fn serve(dp: Arc<DataPlane>, l: TcpListener) {
    loop {
        let (s, peer) = match l.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "gateway accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        tokio::spawn(handle(dp.clone(), s, peer));
    }
}

async fn handle(dp: Arc<DataPlane>, mut s: TcpStream, peer: SocketAddr) {
    if !dp.table().is_node(peer.ip()) {
        dp.stats
            .gateway_strangers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(%peer, "gateway connection from an address that is no node's gateway; closed");
        return crate::proxy::reset(s);
    }
    let req = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut s)).await {
        Ok(Ok(r)) => r,
        Ok(Err(why)) => {
            tracing::debug!(%peer, why, "bad gateway request");
            return refuse(s, &why).await;
        }
        Err(_) => return refuse(s, "no request in time").await,
    };
    if !dp.gateway_key().is_some_and(|k| same_key(k, &req.key)) {
        dp.stats
            .gateway_strangers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(%peer, "gateway request without the cluster's key; closed");
        return crate::proxy::reset(s);
    }
    let counters = dp.stats.of(&req.service);
    if dp.stale() {
        counters.connection("stale");
        return refuse(s, "this node's view of the state is stale").await;
    }
    let table = dp.table();
    let target = table.services.get(&req.service).and_then(|svc| {
        let ep = svc
            .endpoints
            .iter()
            .find(|e| e.instance == req.instance && e.via.is_none())?;
        Some(SocketAddr::new(ep.ip, ep.target(req.port)?))
    });
    let Some(addr) = target else {
        counters.connection("no_endpoint");
        let why = format!(
            "{} is not a ready endpoint of {} port {} on this node",
            req.instance, req.service, req.port
        );
        return refuse(s, &why).await;
    };
    let upstream = match tokio::time::timeout(dp.cfg.connect_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(u)) => u,
        Ok(Err(e)) => return refuse(s, &format!("{addr}: {e}")).await,
        Err(_) => return refuse(s, &format!("{addr}: no answer in time")).await,
    };
    if s.write_all(&[0]).await.is_err() {
        return;
    }
    counters.connection("from_node");
    crate::proxy::pipe(&dp, &counters, s, upstream, Route { via: None, addr }, false).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_ones_are_named() {
        let r = Request {
            key: [7; 32],
            service: SvcKey::new("prod", "api"),
            instance: "api-2".into(),
            port: 8080,
        };
        let wire = encode(&r);
        assert_eq!(&wire[..4], MAGIC);
        assert_eq!(parse(&wire[6..]), Ok(r));
        let k = hex::encode([7u8; 32]);
        let bad = |rest: &str| parse(format!("{k} {rest}").as_bytes());
        assert!(bad("prod api api-2")
            .unwrap_err()
            .contains("namespace service instance port"));
        assert!(bad("prod api api-2 http").unwrap_err().contains("'http'"));
        assert!(bad("prod api api-2 80 extra").is_err());
        assert!(bad(" api api-2 80").is_err());
        assert!(parse(b"abc prod api api-2 80")
            .unwrap_err()
            .contains("64 hex digits"));
        assert!(parse(&[0xff, 0xfe]).unwrap_err().contains("UTF-8"));
        assert!(same_key(&[7; 32], &[7; 32]) && !same_key(&[7; 32], &[8; 32]));
    }
}
