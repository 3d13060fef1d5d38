//! The data plane's view of the state: services with their VIPs, ports, balancing mode, compiled
//! policy and ready endpoints, and the instances of this node by address and process group, so
//! that a connection's source can be named. Rebuilt whole from a read of the state.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use redb::ReadableTable;
use rune_statemachine::instance::{instances_prefix, InstanceRecord, Phase};
use rune_statemachine::network::{endpoints_prefix, EndpointSet};
use rune_statemachine::spec::PortSpec;
use rune_statemachine::store::{list_records, services_prefix, ServiceRecord};
use rune_statemachine::StoreError;

use crate::policy::{compile, Compiled, SvcKey};

/// How connections to a VIP are spread (`discovery.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Each new connection goes to the next endpoint (the default; also `headless`, whose VIP
    /// still works).
    RoundRobin,
    /// Each new connection goes to the endpoint with the fewest open ones (`load-balanced`).
    LeastConnections,
    /// No VIP traffic.
    None,
}

impl Mode {
    fn of(s: Option<&str>) -> Mode {
        match s {
            Some("load-balanced") => Mode::LeastConnections,
            Some("none") => Mode::None,
            _ => Mode::RoundRobin,
        }
    }
}

/// A ready endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ep {
    /// Instance id.
    pub instance: String,
    /// Its address.
    pub ip: IpAddr,
    /// Service port number → the port the instance listens on.
    pub targets: Vec<(u16, u16)>,
}

impl Ep {
    /// Where this endpoint serves the service port `port`.
    pub fn target(&self, port: u16) -> Option<u16> {
        self.targets.iter().find(|(p, _)| *p == port).map(|(_, t)| *t)
    }
}

/// A service as the data plane sees it.
#[derive(Debug, Clone)]
pub struct Svc {
    /// Namespace and name.
    pub key: SvcKey,
    /// Its VIP.
    pub vip: Option<Ipv4Addr>,
    /// Balancing.
    pub mode: Mode,
    /// Its ports as declared.
    pub ports: Vec<PortSpec>,
    /// Its compiled network policy.
    pub policy: Compiled,
    /// Ready endpoints.
    pub endpoints: Vec<Ep>,
    /// Addresses of its instances on this node that are not the host's (containers).
    pub local_ips: Vec<IpAddr>,
    /// How many of its instances run on this node.
    pub local_instances: usize,
}

impl Svc {
    /// Its TCP ports that the proxy serves: (name, number).
    pub fn tcp_ports(&self) -> Vec<(String, u16)> {
        self.ports
            .iter()
            .filter(|p| {
                p.protocol
                    .as_deref()
                    .is_none_or(|x| x.eq_ignore_ascii_case("tcp"))
            })
            .filter_map(|p| Some((p.name.clone(), u16::try_from(p.port).ok()?)))
            .collect()
    }
}

/// The whole view, swapped atomically when the state changes.
#[derive(Debug, Clone, Default)]
pub struct Table {
    /// Every service.
    pub services: BTreeMap<SvcKey, Svc>,
    /// Local instance addresses (not the host's) → their service.
    pub by_ip: HashMap<IpAddr, SvcKey>,
    /// Local process instances' process groups → their service.
    pub by_pgid: HashMap<i32, SvcKey>,
    /// Whether any service has an egress policy (then every source must be named).
    pub any_egress: bool,
}

impl Table {
    /// Reads the view from the state; only instances of `node` are local.
    pub fn build<R: ReadableTable<&'static str, &'static [u8]>>(
        t: &R,
        node: &str,
    ) -> Result<Table, StoreError> {
        let records: Vec<ServiceRecord> = list_records(t, &services_prefix(None))?;
        let endpoints: Vec<EndpointSet> = list_records(t, &endpoints_prefix(None))?;
        let instances: Vec<InstanceRecord> = list_records(t, &instances_prefix(None, None))?;
        let mut eps: HashMap<SvcKey, Vec<Ep>> = HashMap::new();
        for set in endpoints {
            let list = set
                .endpoints
                .iter()
                .filter_map(|e| {
                    Some(Ep {
                        instance: e.instance.clone(),
                        ip: e.address.parse().ok()?,
                        targets: e.ports.iter().map(|p| (p.port, p.target_port)).collect(),
                    })
                })
                .collect();
            eps.insert(SvcKey::new(&set.namespace, &set.service), list);
        }
        let mut table = Table::default();
        let mut local: HashMap<SvcKey, (usize, Vec<IpAddr>)> = HashMap::new();
        for i in instances
            .iter()
            .filter(|i| i.node == node && i.phase == Phase::Running)
        {
            let key = SvcKey::new(&i.namespace, &i.service);
            let entry = local.entry(key.clone()).or_default();
            entry.0 += 1;
            if i.runtime == "process" {
                if let Ok(pid) = i.runtime_id.parse::<i32>() {
                    table.by_pgid.insert(pid, key);
                }
            } else if let Ok(ip) = i.address.parse::<IpAddr>() {
                if !ip.is_loopback() {
                    entry.1.push(ip);
                    table.by_ip.insert(ip, key);
                }
            }
        }
        for r in records {
            let key = SvcKey::new(r.spec.namespace(), &r.spec.name);
            let policy = compile(&key.ns, r.spec.network_policy.as_ref());
            table.any_egress |= policy.egress.is_some();
            let (local_instances, local_ips) = local.remove(&key).unwrap_or_default();
            let svc = Svc {
                vip: r.vip.as_deref().and_then(|v| v.parse().ok()),
                mode: Mode::of(r.spec.discovery.as_ref().and_then(|d| d.mode.as_deref())),
                ports: r.spec.ports.clone(),
                policy,
                endpoints: eps.remove(&key).unwrap_or_default(),
                local_ips,
                local_instances,
                key: key.clone(),
            };
            table.services.insert(key, svc);
        }
        Ok(table)
    }

    /// Finds a service by `name` in `ns`.
    pub fn get(&self, ns: &str, name: &str) -> Option<&Svc> {
        self.services.get(&SvcKey::new(ns, name))
    }
}
