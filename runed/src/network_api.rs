//! `NetworkApi`: what the data plane decides (`rune policy explain`), whether the kernel enforces
//! it (`rune policy status`), and `rune port-forward`'s tunnel to a service.

use rune_proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Request, Response, Status, Streaming};

use crate::api::{Api, Stream_};
use crate::grpc::namespace_or_default;

fn verdict(v: &rune_dataplane::policy::Verdict) -> pb::PolicyVerdict {
    pb::PolicyVerdict {
        allowed: v.allowed,
        because: v.because.to_string(),
    }
}

fn dp_status(e: rune_dataplane::DpError) -> Status {
    use rune_dataplane::DpError as E;
    match e {
        E::NoService(_) => Status::not_found(e.to_string()),
        E::NoPort(..) => Status::invalid_argument(e.to_string()),
        E::NoEndpoint(..) => Status::failed_precondition(e.to_string()),
    }
}

#[tonic::async_trait]
impl pb::network_api_server::NetworkApi for Api {
    async fn list_ingresses(
        &self,
        req: Request<pb::ListIngressesRequest>,
    ) -> Result<Response<pb::ListIngressesResponse>, Status> {
        let ns = req.get_ref().namespace.clone();
        crate::auth::authorize(&req, "services", "list", (!ns.is_empty()).then_some(ns.as_str()))?;
        // The routes as the state has them; what is served, from this node's ingress.
        let routes = {
            let (_, state) = rune_log::projection::read_state(&self.log).map_err(crate::grpc::internal)?;
            let mut exposed = rune_ingress::routes::Exposed::default();
            for d in &state {
                exposed.apply(d);
            }
            exposed.routes()
        };
        let states = self
            .ingress
            .as_ref()
            .map(|i| i.certificate_states())
            .unwrap_or_default();
        let mut out: Vec<pb::Ingress> = routes
            .by_host
            .iter()
            .filter(|(_, r)| ns.is_empty() || r.namespace == ns)
            .map(|(host, r)| {
                let st = states.get(host);
                let served = self
                    .ingress
                    .as_ref()
                    .and_then(|i| i.certs().kind(host))
                    .unwrap_or(if r.tls == "none" { "" } else { "self-signed" });
                pb::Ingress {
                    namespace: r.namespace.clone(),
                    service: r.service.clone(),
                    host: host.clone(),
                    tls: r.tls.clone(),
                    cert: if self.ingress.is_some() {
                        served.to_string()
                    } else {
                        String::new()
                    },
                    cert_state: st.map(|c| c.state.to_string()).unwrap_or_default(),
                    cert_detail: st.map(|c| c.detail.clone()).unwrap_or_default(),
                    expires_ms: st.map_or(0, |c| c.not_after.saturating_mul(1000)),
                    ready_endpoints: u32::try_from(r.endpoints.len()).unwrap_or(u32::MAX),
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.namespace, &a.host).cmp(&(&b.namespace, &b.host)));
        Ok(Response::new(pb::ListIngressesResponse {
            ingresses: out,
            edge: self.ingress.is_some(),
        }))
    }

    async fn explain_policy(
        &self,
        req: Request<pb::ExplainPolicyRequest>,
    ) -> Result<Response<pb::ExplainPolicyResponse>, Status> {
        let r = req.get_ref();
        let ns = namespace_or_default(&r.namespace).to_string();
        if r.from.trim().is_empty() {
            return Err(Status::invalid_argument(
                "from: is required (a service or an address)",
            ));
        }
        if r.to.trim().is_empty() {
            return Err(Status::invalid_argument("to: is required (a service)"));
        }
        let port = match r.port {
            0 => None,
            p => Some(
                u16::try_from(p).map_err(|_| Status::invalid_argument(format!("port: {p} is not a port")))?,
            ),
        };
        // Both ends may name other namespaces: the caller must be able to read each.
        let caller = crate::auth::authorize(&req, "services", "get", Some(&ns))?;
        for end in [r.from.trim(), r.to.trim()] {
            if end.parse::<std::net::IpAddr>().is_err() {
                let k = rune_dataplane::parse_service(&ns, end);
                crate::auth::check(&caller, "services", "get", Some(&k.ns))?;
            }
        }
        let e = self
            .dataplane
            .explain(&ns, r.from.trim(), r.to.trim(), port)
            .map_err(dp_status)?;
        // An address resolves to the service that holds it, in whatever namespace: named (and
        // its policy applied) only for a caller who may read there.
        if let Some((owner_ns, _)) = e.from.split_once('/') {
            if crate::auth::check(&caller, "services", "get", Some(owner_ns)).is_err() {
                return Err(Status::permission_denied(format!(
                    "{} belongs to a service this token may not read",
                    r.from.trim()
                )));
            }
        }
        Ok(Response::new(pb::ExplainPolicyResponse {
            from: e.from,
            to: e.to,
            decisions: e
                .decisions
                .iter()
                .map(|(p, d)| pb::PortDecision {
                    port: u32::from(*p),
                    allowed: d.allowed(),
                    egress: Some(verdict(&d.egress)),
                    ingress: Some(verdict(&d.ingress)),
                })
                .collect(),
            kernel: self.dataplane.kernel_status().detail,
        }))
    }

    async fn network_status(
        &self,
        req: Request<pb::NetworkStatusRequest>,
    ) -> Result<Response<pb::NetworkStatusResponse>, Status> {
        crate::auth::authorize(&req, "services", "list", None)?;
        let k = self.dataplane.kernel_status();
        let listeners = self
            .dataplane
            .table()
            .services
            .values()
            .map(|s| self.dataplane.proxy_ports(&s.key.ns, &s.key.name).len())
            .sum::<usize>();
        Ok(Response::new(pb::NetworkStatusResponse {
            kernel_enforcing: k.enforcing,
            kernel: k.detail,
            applied_index: self.dataplane.projection().map_or(0, |p| p.applied_index()),
            stale_seconds: self.dataplane.projection().map_or(0.0, |p| p.stale_seconds()),
            proxy_listeners: u32::try_from(listeners).unwrap_or(u32::MAX),
            last_program_ms: k.last_program.as_secs_f64() * 1000.0,
            kernel_forwarded_from_containers: u32::try_from(k.kernel_forwarded.from_containers)
                .unwrap_or(u32::MAX),
            kernel_forwarded_from_host: u32::try_from(k.kernel_forwarded.from_host).unwrap_or(u32::MAX),
        }))
    }

    type PortForwardStream = Stream_<pb::PortForwardResponse>;

    async fn port_forward(
        &self,
        req: Request<Streaming<pb::PortForwardRequest>>,
    ) -> Result<Response<Self::PortForwardStream>, Status> {
        let caller = crate::auth::caller(&req)?;
        let mut input = req.into_inner();
        let first = input
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("port-forward: no start message"))?;
        let Some(pb::port_forward_request::Msg::Start(start)) = first.msg else {
            return Err(Status::invalid_argument(
                "port-forward: the first message must be start",
            ));
        };
        let ns = namespace_or_default(&start.namespace).to_string();
        if start.service.is_empty() {
            return Err(Status::invalid_argument("service: is required"));
        }
        // A tunnel into a service's instances is as strong as exec.
        crate::auth::check(&caller, "exec", "exec", Some(&ns))?;
        let (stream, ep) = self
            .dataplane
            .connect(&ns, &start.service, start.port.trim())
            .await
            .map_err(dp_status)?;
        tracing::info!(namespace = %ns, service = %start.service, port = %start.port, endpoint = %ep, user = %caller.user, "port-forward");
        let (mut rd, mut wr) = stream.into_split();
        let upstream = tokio::spawn(async move {
            while let Ok(Some(m)) = input.message().await {
                match m.msg {
                    Some(pb::port_forward_request::Msg::Data(b)) if wr.write_all(&b).await.is_err() => return,
                    Some(pb::port_forward_request::Msg::Eof(_)) => break,
                    _ => {}
                }
            }
            let _ = wr.shutdown().await;
        });
        let (tx, out) = tokio::sync::mpsc::channel(16);
        let downstream = tokio::spawn(async move {
            let hello = pb::PortForwardResponse {
                msg: Some(pb::port_forward_response::Msg::Endpoint(ep.to_string())),
            };
            if tx.send(Ok(hello)).await.is_err() {
                return;
            }
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let m = pb::PortForwardResponse {
                            msg: Some(pb::port_forward_response::Msg::Data(buf[..n].to_vec())),
                        };
                        if tx.send(Ok(m)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(crate::auth::until_token_ends(
            self.log.clone(),
            &caller,
            Box::pin(tokio_stream::wrappers::ReceiverStream::new(out)),
            vec![upstream.abort_handle(), downstream.abort_handle()],
        )))
    }
}
