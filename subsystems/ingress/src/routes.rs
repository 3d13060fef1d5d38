//! The ingress's view of the state: each exposed host, the service port it goes to and where
//! that port's ready endpoints listen.

use std::collections::HashMap;
use std::net::SocketAddr;

use redb::ReadableTable;
use rune_statemachine::network::{endpoints_key, EndpointSet};
use rune_statemachine::spec::PortRef;
use rune_statemachine::store::{get_record, list_records, services_prefix, ServiceRecord};
use rune_statemachine::StoreError;

/// Where one host goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The service's namespace.
    pub namespace: String,
    /// The service.
    pub service: String,
    /// The service port exposed.
    pub port: u16,
    /// Only paths under this prefix are routed (`/` when absent).
    pub path: String,
    /// `none`, `self-signed`, `acme` or `manual`, as the spec asks.
    pub tls: String,
    /// The TLS secret of manual mode (in the service's namespace).
    pub secret: Option<String>,
    /// The ready endpoints of that port.
    pub endpoints: Vec<SocketAddr>,
}

/// Exposed hosts, lower-case.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    /// Host → route.
    pub by_host: HashMap<String, Route>,
}

impl Routes {
    /// Reads the routes from the state. Two services exposing one host: the first by
    /// namespace and name wins, and the other is logged.
    pub fn build<R: ReadableTable<&'static str, &'static [u8]>>(t: &R) -> Result<Routes, StoreError> {
        let mut by_host: HashMap<String, Route> = HashMap::new();
        for r in list_records::<ServiceRecord, _>(t, &services_prefix(None))? {
            let Some(e) = &r.spec.expose else { continue };
            let Some(host) = e
                .host
                .as_deref()
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty())
            else {
                continue;
            };
            let (ns, name) = (r.spec.namespace().to_string(), r.spec.name.clone());
            let port = r.spec.ports.iter().find(|p| match &e.port {
                PortRef::Number(n) => p.port == *n,
                PortRef::Name(s) => p.name == *s || p.port.to_string() == *s,
            });
            let Some(port) = port.and_then(|p| u16::try_from(p.port).ok()) else {
                continue;
            };
            let set: EndpointSet = get_record(t, &endpoints_key(&ns, &name))?.unwrap_or_default();
            let endpoints = set
                .endpoints
                .iter()
                .filter_map(|ep| {
                    let target = ep.ports.iter().find(|p| p.port == port)?.target_port;
                    Some(SocketAddr::new(ep.address.parse().ok()?, target))
                })
                .collect();
            let tls = match &e.tls {
                None => "none".to_string(),
                Some(t)
                    if t.auto == Some(true)
                        || t.mode.as_deref() == Some("acme")
                        || t.mode.as_deref() == Some("auto") =>
                {
                    "acme".into()
                }
                Some(t) if t.mode.as_deref() == Some("manual") => "manual".into(),
                Some(_) => "self-signed".into(),
            };
            if let Some(prev) = by_host.get(&host) {
                tracing::warn!(%host, kept = %format!("{}/{}", prev.namespace, prev.service), ignored = %format!("{ns}/{name}"), "two services expose one host");
                continue;
            }
            by_host.insert(
                host,
                Route {
                    namespace: ns,
                    service: name,
                    port,
                    path: e.path.clone().unwrap_or_else(|| "/".into()),
                    tls,
                    secret: e
                        .tls
                        .as_ref()
                        .and_then(|t| t.secret_name.clone().or_else(|| t.secret.clone())),
                    endpoints,
                },
            );
        }
        Ok(Routes { by_host })
    }
}
