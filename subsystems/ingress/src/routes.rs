//! The ingress's view of the state: each exposed host, the service port it goes to and where
//! that port's ready endpoints listen, kept from the projection's deltas.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;

use rune_statemachine::delta::Delta;
use rune_statemachine::network::EndpointSet;
use rune_statemachine::spec::PortRef;
use rune_statemachine::store::ServiceRecord;

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
    /// Plain HTTP requests get a permanent redirect to HTTPS (`expose.tls.redirect`).
    pub redirect: bool,
    /// The ready endpoints of that port.
    pub endpoints: Vec<Backend>,
}

/// One ready endpoint of a route, and how this node reaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// On this node (or on one runed): dialled at its address.
    Here(SocketAddr),
    /// On another node, by instance id: its address means something only there, so the
    /// connection goes through that node ([`crate::Remote`]).
    Elsewhere(String),
}

/// Exposed hosts, lower-case.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    /// Host → route.
    pub by_host: HashMap<String, Route>,
}

/// What the ingress keeps of the state: exposed services and their endpoints. Only services
/// with an `expose` host are kept, so a change costs what the exposed services cost, whatever
/// the number of services.
#[derive(Debug, Default)]
pub struct Exposed {
    services: BTreeMap<(String, String), ServiceRecord>,
    endpoints: HashMap<(String, String), EndpointSet>,
    /// This node, in a cluster: endpoints of other nodes are [`Backend::Elsewhere`]. None: every
    /// endpoint is dialled where it is.
    node: Option<String>,
    /// The other nodes whose gateway is known. Without one a node's process instances (at
    /// its loopback) cannot be reached from here; its containers are dialled where they are.
    gateways: HashSet<String>,
}

impl Exposed {
    /// The view of node `node` of a cluster, which reaches other nodes' instances through them.
    pub fn on_node(node: &str) -> Exposed {
        Exposed {
            node: Some(node.to_string()),
            ..Exposed::default()
        }
    }

    /// An empty view for the same node, to be built again from a state.
    pub fn emptied(&self) -> Exposed {
        Exposed {
            node: self.node.clone(),
            ..Exposed::default()
        }
    }

    /// Takes one delta; returns whether the routes may have changed.
    pub fn apply(&mut self, d: &Delta) -> bool {
        match d {
            Delta::Service {
                namespace,
                name,
                record,
            } => {
                let key = (namespace.clone(), name.clone());
                match record.as_deref().filter(|r| host_of(r).is_some()) {
                    Some(r) => {
                        self.services.insert(key, r.clone());
                        true
                    }
                    None => self.services.remove(&key).is_some(),
                }
            }
            Delta::Endpoints {
                namespace,
                service,
                set,
            } => {
                let key = (namespace.clone(), service.clone());
                match set {
                    Some(s) => self.endpoints.insert(key.clone(), (**s).clone()),
                    None => self.endpoints.remove(&key),
                };
                self.services.contains_key(&key)
            }
            Delta::Node { name, record } => {
                let known = record
                    .as_ref()
                    .and_then(|r| r.gateway.as_deref())
                    .is_some_and(|g| g.parse::<SocketAddr>().is_ok());
                let changed = if known {
                    self.gateways.insert(name.clone())
                } else {
                    self.gateways.remove(name)
                };
                // Only a cluster's node routes through other nodes.
                changed && self.node.is_some()
            }
            Delta::Instance { .. } | Delta::Placement { .. } | Delta::Namespace { .. } => false,
        }
    }

    /// The routes this view gives. Two services exposing one host (only a state written
    /// before apply refused that): the first by namespace and name wins, and the other is logged.
    pub fn routes(&self) -> Routes {
        let mut by_host: HashMap<String, Route> = HashMap::new();
        for ((ns, name), r) in &self.services {
            let (Some(e), Some(host)) = (&r.spec.expose, host_of(r)) else {
                continue;
            };
            let port = r.spec.ports.iter().find(|p| match &e.port {
                PortRef::Number(n) => p.port == *n,
                PortRef::Name(s) => p.name == *s || p.port.to_string() == *s,
            });
            let Some(port) = port.and_then(|p| u16::try_from(p.port).ok()) else {
                continue;
            };
            let endpoints = self
                .endpoints
                .get(&(ns.clone(), name.clone()))
                .map(|set| {
                    set.endpoints
                        .iter()
                        .filter_map(|ep| {
                            let target = ep.ports.iter().find(|p| p.port == port)?.target_port;
                            let elsewhere = self
                                .node
                                .as_ref()
                                .is_some_and(|me| !ep.node.is_empty() && ep.node != *me);
                            if elsewhere {
                                // As the data plane reaches it: through its node's gateway, or
                                // without one (a node of an older build) at its address, which
                                // a loopback one is not from here.
                                let loopback = ep
                                    .address
                                    .parse::<std::net::IpAddr>()
                                    .is_ok_and(|ip| ip.is_loopback());
                                let reachable = self.gateways.contains(&ep.node) || !loopback;
                                return reachable.then(|| Backend::Elsewhere(ep.instance.clone()));
                            }
                            Some(Backend::Here(SocketAddr::new(ep.address.parse().ok()?, target)))
                        })
                        .collect()
                })
                .unwrap_or_default();
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
                    namespace: ns.clone(),
                    service: name.clone(),
                    port,
                    path: e.path.clone().unwrap_or_else(|| "/".into()),
                    tls,
                    secret: e
                        .tls
                        .as_ref()
                        .and_then(|t| t.secret_name.clone().or_else(|| t.secret.clone())),
                    redirect: e.tls.as_ref().is_some_and(|t| t.redirect == Some(true)),
                    endpoints,
                },
            );
        }
        Routes { by_host }
    }
}

/// The host a service exposes, lower-case, if any.
fn host_of(r: &ServiceRecord) -> Option<String> {
    r.spec.expose.as_ref()?.host()
}
