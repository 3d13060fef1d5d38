//! `rune policy explain|status` and `rune port-forward`.

use std::net::SocketAddr;

use rune_proto::v1 as pb;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{CliError, Conn, Format};

fn client(ch: super::Chan) -> pb::network_api_client::NetworkApiClient<super::Chan> {
    pb::network_api_client::NetworkApiClient::new(ch)
}

/// `rune policy explain FROM TO [PORT]`: exits 0 when every asked port is allowed, 1 otherwise,
/// so scripts can test a flow.
pub async fn explain(
    conn: &Conn,
    from: &str,
    to: &str,
    port: Option<u16>,
    format: Format,
) -> Result<(), CliError> {
    let mut c = client(conn.channel().await?);
    let r = c
        .explain_policy(pb::ExplainPolicyRequest {
            namespace: conn.namespace.clone(),
            from: from.into(),
            to: to.into(),
            port: port.map_or(0, u32::from),
        })
        .await
        .map_err(|s| conn.status(s))?
        .into_inner();
    let verdict = |v: &Option<pb::PolicyVerdict>| {
        let v = v.clone().unwrap_or_default();
        json!({"allowed": v.allowed, "because": v.because})
    };
    match format {
        Format::Json | Format::Yaml => {
            let v = json!({
                "from": r.from, "to": r.to, "kernel": r.kernel,
                "decisions": r.decisions.iter().map(|d| json!({
                    "port": d.port, "allowed": d.allowed,
                    "egress": verdict(&d.egress), "ingress": verdict(&d.ingress),
                })).collect::<Vec<_>>(),
            });
            if format == Format::Json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                print!("{}", crate::yaml::emit(&v));
            }
        }
        Format::Table | Format::Wide => {
            for d in &r.decisions {
                let word = if d.allowed { "ALLOWED" } else { "DENIED" };
                println!("{word}  {} -> {}:{}", r.from, r.to, d.port);
                let e = d.egress.clone().unwrap_or_default();
                let i = d.ingress.clone().unwrap_or_default();
                println!("  egress  ({}): {}", r.from, e.because);
                println!("  ingress ({}): {}", r.to, i.because);
            }
            println!("kernel enforcement: {}", r.kernel);
        }
    }
    if r.decisions.iter().all(|d| d.allowed) {
        Ok(())
    } else {
        Err(CliError {
            code: super::exit::GENERIC,
            message: String::new(),
        })
    }
}

/// `rune get ingresses`: NAMESPACE SERVICE HOST TLS CERT EXPIRES.
pub async fn get_ingresses(conn: &Conn, all: bool, format: Format) -> Result<(), CliError> {
    let mut c = client(conn.channel().await?);
    let r = c
        .list_ingresses(pb::ListIngressesRequest {
            namespace: if all {
                String::new()
            } else {
                conn.namespace.clone()
            },
        })
        .await
        .map_err(|s| conn.status(s))?
        .into_inner();
    if !format.is_table() {
        let items: Vec<serde_json::Value> = r
            .ingresses
            .iter()
            .map(|i| {
                json!({"namespace": i.namespace, "service": i.service, "host": i.host, "tls": i.tls,
                    "cert": i.cert, "certState": i.cert_state, "certDetail": i.cert_detail,
                    "expiresMs": i.expires_ms, "readyEndpoints": i.ready_endpoints})
            })
            .collect();
        let v = serde_json::Value::Array(items);
        if format == Format::Json {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        } else {
            print!("{}", crate::yaml::emit(&v));
        }
        return Ok(());
    }
    let mut rows = vec![["NAMESPACE", "SERVICE", "HOST", "TLS", "CERT", "EXPIRES"]
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()];
    let mut notes = Vec::new();
    for i in &r.ingresses {
        let (tls, cert) = ingress_cells(i);
        if !i.cert_detail.is_empty() {
            notes.push(format!("{}: {cert}: {}", i.host, i.cert_detail));
        }
        rows.push(vec![
            i.namespace.clone(),
            i.service.clone(),
            i.host.clone(),
            tls,
            cert,
            expires_in(i.expires_ms, now_ms()),
        ]);
    }
    super::output::print_table(&rows);
    for n in notes {
        eprintln!("{n}");
    }
    if !r.edge {
        eprintln!("(this runed has no edge role: nothing is served here)");
    }
    Ok(())
}

/// The TLS and CERT cells, as the original prints them: TLS `acme`, `manual`, `self-signed`
/// or `-`; CERT the certificate's state (`ready`, `pending`, `error`), `self-signed`, or `-`
/// where nothing is served (no TLS, or a runed without the edge role).
fn ingress_cells(i: &pb::Ingress) -> (String, String) {
    let tls = match i.tls.as_str() {
        "none" | "" => "-",
        t => t,
    };
    let cert = match (tls, i.cert.as_str(), i.cert_state.as_str()) {
        ("-", _, _) | (_, "", _) => "-",
        ("self-signed", _, _) => "self-signed",
        (_, _, "") => "pending",
        (_, _, state) => state,
    };
    (tls.to_string(), cert.to_string())
}

/// Time left until `expires_ms`: `89d`, `5h`, `12m`, `30s`, `expired`; `-` when unknown.
fn expires_in(expires_ms: i64, now_ms: i64) -> String {
    if expires_ms <= 0 {
        return "-".into();
    }
    let left = (expires_ms - now_ms) / 1000;
    match left {
        l if l <= 0 => "expired".into(),
        l if l >= 86_400 => format!("{}d", l / 86_400),
        l if l >= 3600 => format!("{}h", l / 3600),
        l if l >= 60 => format!("{}m", l / 60),
        l => format!("{l}s"),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `rune policy status`.
pub async fn status(conn: &Conn, format: Format) -> Result<(), CliError> {
    let mut c = client(conn.channel().await?);
    let r = c
        .network_status(pb::NetworkStatusRequest {})
        .await
        .map_err(|s| conn.status(s))?
        .into_inner();
    let v = json!({
        "kernelEnforcing": r.kernel_enforcing, "kernel": r.kernel,
        "appliedIndex": r.applied_index, "staleSeconds": r.stale_seconds,
        "proxyListeners": r.proxy_listeners, "lastProgramMs": r.last_program_ms,
        "kernelForwarded": {
            "fromContainers": r.kernel_forwarded_from_containers,
            "fromHost": r.kernel_forwarded_from_host,
        },
    });
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
        Format::Yaml => print!("{}", crate::yaml::emit(&v)),
        Format::Table | Format::Wide => {
            println!("kernel enforcement: {}", r.kernel);
            if r.kernel_enforcing {
                println!("last nftables program: {:.1} ms", r.last_program_ms);
                println!(
                    "VIP ports the kernel forwards itself: {} from containers, {} from this host",
                    r.kernel_forwarded_from_containers, r.kernel_forwarded_from_host
                );
            }
            println!("proxy listeners: {}", r.proxy_listeners);
            println!(
                "applied log index: {} (lag {:.1} s)",
                r.applied_index, r.stale_seconds
            );
        }
    }
    Ok(())
}

/// `rune port-forward SERVICE [LOCAL:]PORT...`: each local connection becomes one tunnel
/// through runed to a ready endpoint. Runs until interrupted.
pub async fn port_forward(
    conn: &Conn,
    service: &str,
    specs: &[String],
    address: &str,
) -> Result<(), CliError> {
    let service = service.trim_start_matches("service/").to_string();
    let mut tasks = Vec::new();
    for spec in specs {
        let (local, remote) = match spec.split_once(':') {
            Some((l, r)) => (l, r.to_string()),
            None => (spec.as_str(), spec.clone()),
        };
        // `PORT` by number listens on the same number; by name, on any free port.
        let local: u16 = match local.parse() {
            Ok(n) => n,
            Err(_) if local.is_empty() || !spec.contains(':') => 0,
            Err(_) => {
                return Err(CliError::usage(format!(
                    "port-forward: '{spec}': local port '{local}' is not a port number"
                )))
            }
        };
        if remote.is_empty() {
            return Err(CliError::usage(format!(
                "port-forward: '{spec}': the service port is missing"
            )));
        }
        let bind: SocketAddr = format!("{address}:{local}")
            .parse()
            .map_err(|_| CliError::usage(format!("--address {address}: not an IP address")))?;
        let l = tokio::net::TcpListener::bind(bind)
            .await
            .map_err(|e| CliError::generic(format!("port-forward: cannot listen on {bind}: {e}")))?;
        let at = l.local_addr().map_err(|e| CliError::generic(e.to_string()))?;
        // Fail early when the service or port does not exist.
        check(conn, &service, &remote).await?;
        println!("Forwarding from {at} -> {service}:{remote}");
        let (ns, service) = (conn.namespace.clone(), service.clone());
        let chan = conn.channel().await?;
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((sock, peer)) = l.accept().await else {
                    continue;
                };
                let (chan, ns, service, remote) = (chan.clone(), ns.clone(), service.clone(), remote.clone());
                tokio::spawn(async move {
                    if let Err(e) = tunnel(chan, &ns, &service, &remote, sock).await {
                        eprintln!("port-forward: connection from {peer}: {e}");
                    }
                });
            }
        }));
    }
    let _ = tokio::signal::ctrl_c().await;
    for t in tasks {
        t.abort();
    }
    Ok(())
}

async fn check(conn: &Conn, service: &str, port: &str) -> Result<(), CliError> {
    let mut c = pb::service_api_client::ServiceApiClient::new(conn.channel().await?);
    let s = c
        .get_service(pb::GetServiceRequest {
            namespace: conn.namespace.clone(),
            name: service.into(),
        })
        .await
        .map_err(|s| conn.status(s))?
        .into_inner();
    let spec: serde_json::Value = serde_json::from_str(&s.spec_json).unwrap_or_default();
    let known = spec["ports"].as_array().into_iter().flatten().any(|p| {
        p["name"].as_str() == Some(port) || p["port"].as_i64().map(|n| n.to_string()).as_deref() == Some(port)
    });
    if known {
        Ok(())
    } else {
        Err(CliError::usage(format!(
            "port-forward: service {service} has no port '{port}'"
        )))
    }
}

async fn tunnel(
    chan: super::Chan,
    ns: &str,
    service: &str,
    port: &str,
    sock: tokio::net::TcpStream,
) -> Result<(), String> {
    let mut c = client(chan);
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::PortForwardRequest>(16);
    let start = pb::PortForwardRequest {
        msg: Some(pb::port_forward_request::Msg::Start(pb::PortForwardStart {
            namespace: ns.into(),
            service: service.into(),
            port: port.into(),
        })),
    };
    tx.send(start)
        .await
        .map_err(|_| "cannot send the request".to_string())?;
    let mut stream = c
        .port_forward(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    let (mut rd, mut wr) = sock.into_split();
    let up = tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let m = pb::PortForwardRequest {
                        msg: Some(pb::port_forward_request::Msg::Data(buf[..n].to_vec())),
                    };
                    if tx.send(m).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = tx
            .send(pb::PortForwardRequest {
                msg: Some(pb::port_forward_request::Msg::Eof(true)),
            })
            .await;
    });
    while let Some(m) = stream.message().await.map_err(|s| s.message().to_string())? {
        if let Some(pb::port_forward_response::Msg::Data(b)) = m.msg {
            if wr.write_all(&b).await.is_err() {
                break;
            }
        }
    }
    let _ = wr.shutdown().await;
    up.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingress_cells_read_as_the_original_prints_them() {
        let ing = |tls: &str, cert: &str, state: &str| pb::Ingress {
            tls: tls.into(),
            cert: cert.into(),
            cert_state: state.into(),
            ..Default::default()
        };
        let cells = |i: pb::Ingress| {
            let (t, c) = ingress_cells(&i);
            format!("{t} {c}")
        };
        assert_eq!(cells(ing("acme", "acme", "ready")), "acme ready");
        assert_eq!(cells(ing("acme", "self-signed", "pending")), "acme pending");
        assert_eq!(cells(ing("acme", "self-signed", "")), "acme pending");
        assert_eq!(cells(ing("manual", "manual", "error")), "manual error");
        assert_eq!(
            cells(ing("self-signed", "self-signed", "")),
            "self-signed self-signed"
        );
        assert_eq!(cells(ing("none", "", "")), "- -");
        assert_eq!(
            cells(ing("acme", "", "")),
            "acme -",
            "no edge role: nothing served"
        );
        let day = 86_400_000;
        assert_eq!(expires_in(89 * day + 5_000, 0), "89d");
        assert_eq!(expires_in(5 * 3_600_000 + 1, 0), "5h");
        assert_eq!(expires_in(12 * 60_000, 0), "12m");
        assert_eq!(expires_in(30_000, 0), "30s");
        assert_eq!(expires_in(1_000, 2_000), "expired");
        assert_eq!(expires_in(0, 2_000), "-");
    }
}
