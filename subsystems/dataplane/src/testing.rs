//! Synthetic views for tests and benchmarks: many services with VIPs, endpoints and policies,
//! without a log behind them.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use rune_statemachine::spec::{EgressRule, IngressRule, NetworkPolicy, Peer, PortRef, PortSpec};

use crate::policy::{compile, SvcKey};
use crate::table::{Ep, Mode, Svc, Table};

/// A synthetic view of `n` services, each with a VIP, a port, two container endpoints and an
/// ingress policy naming another service and a CIDR.
pub fn synthetic(n: usize) -> (Table, BTreeMap<(SvcKey, u16), u16>) {
    let mut t = Table::default();
    let mut ports = BTreeMap::new();
    for i in 0..n {
        let key = SvcKey::new("bench", &format!("s{i}"));
        let ip = |k: usize| IpAddr::V4(Ipv4Addr::from(0x0a80_0000u32 + (i * 2 + k) as u32));
        let np = NetworkPolicy {
            ingress: vec![IngressRule {
                from: vec![
                    Peer {
                        service: Some(format!("s{}", (i + 1) % n)),
                        ..Default::default()
                    },
                    Peer {
                        cidr: Some("192.168.0.0/16".into()),
                        ..Default::default()
                    },
                ],
                ports: vec![PortRef::Name("http".into())],
            }],
            egress: vec![],
        };
        t.services.insert(
            key.clone(),
            std::sync::Arc::new(Svc {
                key: key.clone(),
                vip: Some(Ipv4Addr::from(0x0a60_0002u32 + i as u32)),
                mode: Mode::RoundRobin,
                ports: vec![http()],
                policy: compile("bench", Some(&np)),
                endpoints: (0..2)
                    .map(|k| Ep {
                        instance: format!("s{i}-{k}"),
                        ip: ip(k),
                        targets: vec![(80, 8080)],
                        via: None,
                        here: true,
                    })
                    .collect(),
                local_ips: vec![ip(0), ip(1)],
                local_instances: 2,
                moved: Vec::new(),
            }),
        );
        ports.insert((key, 80), 20_000 + i as u16);
    }
    (t, ports)
}

/// The bench services' one port: `http`, 80 at the VIP, 8080 at the instances.
fn http() -> PortSpec {
    PortSpec {
        name: "http".into(),
        port: 80,
        target_port: Some(8080),
        protocol: None,
        host_port: None,
    }
}

/// `t` with service `i`'s endpoints gone while its containers stay (its VIP port now
/// refused), as when its instances turn unready: the commonest change, which touches no
/// policy (a stopped instance also takes its address out of the policy sets).
pub fn unready(t: &Table, i: usize) -> Table {
    let mut t = t.clone();
    if let Some(svc) = t.services.get_mut(&SvcKey::new("bench", &format!("s{i}"))) {
        Arc::make_mut(svc).endpoints.clear();
    }
    t
}

/// `t` with service `i` changed the way a cast or a rollout changes one: its endpoints gone
/// (its VIP port now refused) and its policy's CIDR moved, or (odd `round`) back again. The
/// CIDR's new prefix length is one no other policy uses, so the policy chains are rewritten.
pub fn change_one(t: &Table, i: usize, round: usize) -> Table {
    let mut t = t.clone();
    let key = SvcKey::new("bench", &format!("s{i}"));
    if let Some(svc) = t.services.get_mut(&key) {
        let svc = Arc::make_mut(svc);
        let gone = round.is_multiple_of(2);
        if gone {
            svc.endpoints.clear();
        }
        let np = NetworkPolicy {
            ingress: vec![IngressRule {
                from: vec![Peer {
                    cidr: Some(if gone { "172.16.0.0/12" } else { "192.168.0.0/16" }.into()),
                    ..Default::default()
                }],
                ports: vec![PortRef::Name("http".into())],
            }],
            egress: vec![],
        };
        svc.policy = compile("bench", Some(&np));
    }
    t
}

/// `t` with one more service, `bench/all`, whose policy names every other service: ingress
/// from their namespace, and the published specs' egress (`to: [cidr: 0.0.0.0/0]`, `ports:
/// [http]`, which opens each service's `http`). A change to any service changes what it
/// allows, so its cost per change shows whether that cost grows with the namespace.
pub fn naming_all(t: &Table) -> Table {
    let mut t = t.clone();
    t.any_egress = true;
    let key = SvcKey::new("bench", "all");
    let np = NetworkPolicy {
        ingress: vec![IngressRule {
            from: vec![Peer {
                namespace: Some("bench".into()),
                ..Default::default()
            }],
            ports: vec![PortRef::Name("http".into())],
        }],
        egress: vec![EgressRule {
            to: vec![Peer {
                cidr: Some("0.0.0.0/0".into()),
                ..Default::default()
            }],
            ports: vec![PortRef::Name("http".into())],
        }],
    };
    let ip = |k: u32| IpAddr::V4(Ipv4Addr::from(0x0a7f_ff00u32 + k));
    t.services.insert(
        key.clone(),
        Arc::new(Svc {
            key,
            vip: Some(Ipv4Addr::new(10, 95, 255, 254)),
            mode: Mode::RoundRobin,
            ports: vec![http()],
            policy: compile("bench", Some(&np)),
            endpoints: Vec::new(),
            local_ips: vec![ip(1), ip(2)],
            local_instances: 2,
            moved: Vec::new(),
        }),
    );
    t
}
