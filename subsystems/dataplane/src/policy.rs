//! Network policy compiled from the service specs into a table the proxy and the kernel program
//! consult, and the one function that decides a flow (also behind `rune policy explain`).
//!
//! A service without `networkPolicy` allows everything. A direction with at least one rule is
//! default-deny: a flow passes only if a rule matches both its peer and its port. A flow to a
//! service must pass the source's egress policy and the destination's ingress policy.

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use rune_statemachine::spec::{NetworkPolicy, Peer, PortRef, PortSpec};

/// A service, by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SvcKey {
    /// Namespace.
    pub ns: String,
    /// Name.
    pub name: String,
}

impl SvcKey {
    /// A key from its parts.
    pub fn new(ns: &str, name: &str) -> Self {
        SvcKey {
            ns: ns.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for SvcKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ns, self.name)
    }
}

/// An IPv4 or IPv6 network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Net {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl Net {
    /// Parses `a.b.c.d/n` or `x::/n` (validation has already checked the form).
    pub fn parse(s: &str) -> Option<Net> {
        let (ip, len) = s.trim().split_once('/')?;
        let addr: IpAddr = ip.parse().ok()?;
        let prefix: u8 = len.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Net { addr, prefix })
    }

    /// Whether `ip` is inside.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let m = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.prefix))
                };
                u32::from(n) & m == u32::from(a) & m
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let m = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.prefix))
                };
                u128::from(n) & m == u128::from(a) & m
            }
            _ => false,
        }
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// What a rule's peer stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMatch {
    /// One service.
    Service(SvcKey),
    /// Every service of a namespace.
    Namespace(String),
    /// Addresses (the source of an ingress flow, the VIP of an egress flow).
    Cidr(Net),
    /// A peer this version cannot match (a `serviceSelector`): it matches nothing, so the
    /// policy errs on the side of denying.
    Nothing(String),
}

impl fmt::Display for PeerMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerMatch::Service(k) => write!(f, "service {k}"),
            PeerMatch::Namespace(ns) => write!(f, "namespace {ns}"),
            PeerMatch::Cidr(n) => write!(f, "cidr {n}"),
            PeerMatch::Nothing(why) => write!(f, "nothing ({why})"),
        }
    }
}

/// A port as a rule names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortMatch {
    /// A number (`80`, or the original's `80/tcp`).
    Number(u16),
    /// A name of the destination service's ports.
    Name(String),
}

/// One rule of one direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Its index in `networkPolicy.<direction>`.
    pub index: usize,
    /// Its peers, with their indexes.
    pub peers: Vec<(usize, PeerMatch)>,
    /// Allowed ports; `None` allows every port.
    pub ports: Option<Vec<PortMatch>>,
}

/// A service's compiled policy. `None` in a direction means that direction allows everything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Compiled {
    /// Who may connect.
    pub ingress: Option<Vec<Rule>>,
    /// Where it may connect.
    pub egress: Option<Vec<Rule>>,
}

/// Compiles a service's `networkPolicy` (`ns` resolves peers that name no namespace).
pub fn compile(ns: &str, p: Option<&NetworkPolicy>) -> Compiled {
    let Some(p) = p else {
        return Compiled::default();
    };
    let rules = |list: Vec<(&Vec<Peer>, &Vec<PortRef>)>| -> Option<Vec<Rule>> {
        if list.is_empty() {
            return None;
        }
        Some(
            list.into_iter()
                .enumerate()
                .map(|(index, (peers, ports))| Rule {
                    index,
                    peers: peers.iter().map(|p| peer(ns, p)).enumerate().collect(),
                    ports: (!ports.is_empty()).then(|| ports.iter().map(port).collect()),
                })
                .collect(),
        )
    };
    Compiled {
        ingress: rules(p.ingress.iter().map(|r| (&r.from, &r.ports)).collect()),
        egress: rules(p.egress.iter().map(|r| (&r.to, &r.ports)).collect()),
    }
}

fn peer(ns: &str, p: &Peer) -> PeerMatch {
    if let Some(s) = &p.service {
        return PeerMatch::Service(SvcKey::new(p.namespace.as_deref().unwrap_or(ns), s));
    }
    if let Some(n) = &p.namespace {
        return PeerMatch::Namespace(n.clone());
    }
    if let Some(c) = &p.cidr {
        return match Net::parse(c) {
            Some(n) => PeerMatch::Cidr(n),
            None => PeerMatch::Nothing(format!("'{c}' is not a CIDR")),
        };
    }
    PeerMatch::Nothing("serviceSelector is not supported yet".into())
}

/// Where an egress rule names a port by name toward a CIDR, as `(field, name, cidr)`
/// (`networkPolicy.egress[0].ports[0]`). Such a name opens, at each service inside the
/// network, that service's port of the name, and nothing at an address outside Rune's
/// services: the published specs write `to: [cidr: 0.0.0.0/0], ports: [http]`, perhaps
/// meaning port 80 anywhere, so `rune lint` and `rune cast` say what it does.
pub fn cidr_port_names(p: &NetworkPolicy) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for (i, r) in p.egress.iter().enumerate() {
        // IPv4 networks only: VIPs and the kernel's table are IPv4.
        let cidrs: Vec<&str> =
            r.to.iter()
                .filter_map(|peer| peer.cidr.as_deref())
                .filter(|c| Net::parse(c).is_some_and(|n| n.addr.is_ipv4()))
                .collect();
        if cidrs.is_empty() {
            continue;
        }
        for (j, p) in r.ports.iter().enumerate() {
            match port(p) {
                PortMatch::Name(n) if resolvable(&n) => {
                    out.push((
                        format!("networkPolicy.egress[{i}].ports[{j}]"),
                        n,
                        cidrs.join(", "),
                    ));
                }
                _ => {}
            }
        }
    }
    out
}

/// Whether a port name can name a port: `53/udp` or `http/tcp` names none (only TCP ports
/// are proxied or enforced, and port names hold no `/`).
fn resolvable(name: &str) -> bool {
    !name.contains('/')
}

fn port(p: &PortRef) -> PortMatch {
    match p {
        PortRef::Number(n) => PortMatch::Number(u16::try_from(*n).unwrap_or(0)),
        PortRef::Name(s) => {
            let (num, proto) = s.split_once('/').unwrap_or((s.as_str(), "tcp"));
            match num.trim().parse::<u16>() {
                Ok(n) if proto.trim().eq_ignore_ascii_case("tcp") => PortMatch::Number(n),
                // `53/udp` names no TCP port: kept as a name no port has, so it opens nothing
                // the proxy or the kernel program serve (both are TCP only).
                _ => PortMatch::Name(s.trim().to_string()),
            }
        }
    }
}

/// The other end of a flow, as the data plane identified it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The instance's service, when the address (or the socket's owner) is a local instance.
    pub service: Option<SvcKey>,
    /// The source address.
    pub ip: IpAddr,
}

/// What one side's policy said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Whether it allows the flow.
    pub allowed: bool,
    /// The rule that allowed it (`networkPolicy.ingress[0].from[1]`), or why it was decided by
    /// default. Static for the common no-policy case, so the proxy's hot path allocates nothing.
    pub because: Cow<'static, str>,
}

/// A decision on a flow: both sides' verdicts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The source's egress policy (allows when the source is not a service or has none).
    pub egress: Verdict,
    /// The destination's ingress policy.
    pub ingress: Verdict,
}

impl Decision {
    /// Whether the flow passes.
    pub fn allowed(&self) -> bool {
        self.egress.allowed && self.ingress.allowed
    }

    /// The direction that denied it, for the drop counter's `policy` label.
    pub fn denied_by(&self) -> Option<&'static str> {
        if !self.egress.allowed {
            Some("egress")
        } else if !self.ingress.allowed {
            Some("ingress")
        } else {
            None
        }
    }
}

/// What the decision needs to know about the destination service.
pub struct Target<'a> {
    /// The service.
    pub key: &'a SvcKey,
    /// Its VIP (egress CIDR rules match it).
    pub vip: Option<Ipv4Addr>,
    /// Its ports, to resolve port names.
    pub ports: &'a [PortSpec],
    /// Its policy.
    pub policy: &'a Compiled,
}

/// Decides a flow from `src` to `port` of the service `to`. `src_policy` is the source service's
/// compiled policy, when the source is a service.
pub fn decide(src: &Source, src_policy: Option<&Compiled>, to: &Target<'_>, port: u16) -> Decision {
    let port_ok = |ports: &Option<Vec<PortMatch>>| match ports {
        None => true,
        Some(list) => list.iter().any(|m| match m {
            PortMatch::Number(n) => *n == port,
            PortMatch::Name(name) => to
                .ports
                .iter()
                .any(|p| p.name == *name && p.is_tcp() && u16::try_from(p.port).ok() == Some(port)),
        }),
    };
    let egress = match src_policy.and_then(|p| p.egress.as_ref()) {
        None => Verdict {
            allowed: true,
            because: "no egress policy (default allow)".into(),
        },
        Some(rules) => first_match(rules, "egress", "to", port_ok, |m| match m {
            PeerMatch::Service(k) => k == to.key,
            PeerMatch::Namespace(ns) => *ns == to.key.ns,
            PeerMatch::Cidr(n) => to.vip.is_some_and(|v| n.contains(IpAddr::V4(v))),
            PeerMatch::Nothing(_) => false,
        }),
    };
    let ingress = match &to.policy.ingress {
        None => Verdict {
            allowed: true,
            because: "no ingress policy (default allow)".into(),
        },
        Some(rules) => first_match(rules, "ingress", "from", port_ok, |m| match m {
            PeerMatch::Service(k) => src.service.as_ref() == Some(k),
            PeerMatch::Namespace(ns) => src.service.as_ref().is_some_and(|k| k.ns == *ns),
            PeerMatch::Cidr(n) => n.contains(src.ip),
            PeerMatch::Nothing(_) => false,
        }),
    };
    Decision { egress, ingress }
}

fn first_match(
    rules: &[Rule],
    direction: &str,
    side: &str,
    port_ok: impl Fn(&Option<Vec<PortMatch>>) -> bool,
    peer_ok: impl Fn(&PeerMatch) -> bool,
) -> Verdict {
    for r in rules {
        if !port_ok(&r.ports) {
            continue;
        }
        if let Some((j, m)) = r.peers.iter().find(|(_, m)| peer_ok(m)) {
            return Verdict {
                allowed: true,
                because: format!("networkPolicy.{direction}[{}].{side}[{j}] ({m})", r.index).into(),
            };
        }
    }
    Verdict {
        allowed: false,
        because: format!("no {direction} rule matches (default deny)").into(),
    }
}

/// The port numbers a rule opens, names resolved against `ports` (the destination's); `None`
/// when the rule names no ports (all are open). Used by the kernel program.
pub fn ports_of(rule: &Rule, ports: &[PortSpec]) -> Option<Vec<u16>> {
    rule.ports.as_ref().map(|list| resolve(list, ports, true))
}

/// What only the port names of a rule stand for among `ports` (its numbers left out): a
/// name toward a CIDR opens, at each service inside it, that service's port of the name.
pub fn named_ports_of(rule: &Rule, ports: &[PortSpec]) -> Vec<u16> {
    rule.ports
        .as_ref()
        .map(|list| resolve(list, ports, false))
        .unwrap_or_default()
}

/// Whether a rule names a port by name (which resolves against each destination's ports).
pub fn has_port_names(rule: &Rule) -> bool {
    rule.ports
        .as_ref()
        .is_some_and(|l| l.iter().any(|m| matches!(m, PortMatch::Name(n) if resolvable(n))))
}

fn resolve(list: &[PortMatch], ports: &[PortSpec], numbers: bool) -> Vec<u16> {
    let mut out: Vec<u16> = list
        .iter()
        .filter_map(|m| match m {
            PortMatch::Number(n) => numbers.then_some(*n),
            PortMatch::Name(name) => ports
                .iter()
                .find(|p| p.name == *name && p.is_tcp())
                .and_then(|p| u16::try_from(p.port).ok()),
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rune_statemachine::spec::{EgressRule, IngressRule};

    fn ports() -> Vec<PortSpec> {
        vec![PortSpec {
            name: "http".into(),
            port: 80,
            target_port: Some(8080),
            protocol: None,
            host_port: None,
        }]
    }

    fn svc_peer(name: &str) -> Peer {
        Peer {
            service: Some(name.into()),
            ..Default::default()
        }
    }

    #[test]
    fn no_policy_allows_everything() {
        let api = SvcKey::new("default", "api");
        let c = compile("default", None);
        let src = Source {
            service: None,
            ip: "192.0.2.1".parse().unwrap(),
        };
        let d = decide(
            &src,
            None,
            &Target {
                key: &api,
                vip: None,
                ports: &ports(),
                policy: &c,
            },
            80,
        );
        assert!(d.allowed());
        assert!(d.ingress.because.contains("default allow"));
    }

    /// Only real names toward a network are pointed out: numbers, `80/tcp` and `53/udp` mean
    /// what they say, and a service peer resolves names against that service.
    #[test]
    fn port_names_toward_a_cidr_are_pointed_out() {
        let cidr = |c: &str| Peer {
            cidr: Some(c.into()),
            ..Default::default()
        };
        let np = NetworkPolicy {
            ingress: vec![],
            egress: vec![
                EgressRule {
                    to: vec![svc_peer("db")],
                    ports: vec![PortRef::Name("postgres".into())],
                },
                // VIPs are IPv4: an IPv6 network holds none.
                EgressRule {
                    to: vec![cidr("fd00::/8")],
                    ports: vec![PortRef::Name("http".into())],
                },
                EgressRule {
                    to: vec![cidr("10.0.0.0/8"), cidr("fd00::/8"), cidr("0.0.0.0/0")],
                    ports: ["80/tcp", "53/udp", "http"]
                        .into_iter()
                        .map(|p| PortRef::Name(p.into()))
                        .chain([PortRef::Number(443)])
                        .collect(),
                },
            ],
        };
        assert_eq!(
            cidr_port_names(&np),
            vec![(
                "networkPolicy.egress[2].ports[2]".to_string(),
                "http".to_string(),
                "10.0.0.0/8, 0.0.0.0/0".to_string()
            )]
        );
    }

    #[test]
    fn a_udp_port_name_opens_no_tcp_port() {
        let api = SvcKey::new("default", "api");
        // `dns` is UDP 53; TCP 53 is another port of the same number.
        let ports = vec![
            PortSpec {
                name: "dns-tcp".into(),
                port: 53,
                target_port: Some(5353),
                protocol: Some("TCP".into()),
                host_port: None,
            },
            PortSpec {
                name: "dns".into(),
                port: 53,
                target_port: Some(5354),
                protocol: Some("udp".into()),
                host_port: None,
            },
        ];
        let np = NetworkPolicy {
            ingress: vec![IngressRule {
                from: vec![svc_peer("frontend")],
                ports: vec![PortRef::Name("dns".into())],
            }],
            egress: vec![],
        };
        let c = compile("default", Some(&np));
        let rule = &c.ingress.as_ref().unwrap()[0];
        assert_eq!(ports_of(rule, &ports), Some(vec![]), "the kernel opens nothing");
        let t = Target {
            key: &api,
            vip: None,
            ports: &ports,
            policy: &c,
        };
        let fe = Source {
            service: Some(SvcKey::new("default", "frontend")),
            ip: "127.0.0.1".parse().unwrap(),
        };
        assert!(!decide(&fe, None, &t, 53).allowed(), "nor does the proxy");
        // Named by its TCP port, at the VIP 53 and at the instances its TCP target only.
        let tcp = vec![PortMatch::Name("dns-tcp".into())];
        let rule = Rule {
            ports: Some(tcp),
            ..rule.clone()
        };
        assert_eq!(ports_of(&rule, &ports), Some(vec![53]));
        assert_eq!(crate::nft::instance_ports(&ports, &[53]), vec![5353]);
    }

    #[test]
    fn ingress_by_service_port_name_and_cidr() {
        let api = SvcKey::new("default", "api");
        let np = NetworkPolicy {
            ingress: vec![
                IngressRule {
                    from: vec![svc_peer("frontend")],
                    ports: vec![PortRef::Name("http".into())],
                },
                IngressRule {
                    from: vec![Peer {
                        cidr: Some("10.250.1.0/24".into()),
                        ..Default::default()
                    }],
                    ports: vec![PortRef::Name("80/tcp".into())],
                },
            ],
            egress: vec![],
        };
        let c = compile("default", Some(&np));
        let t = Target {
            key: &api,
            vip: None,
            ports: &ports(),
            policy: &c,
        };
        let fe = Source {
            service: Some(SvcKey::new("default", "frontend")),
            ip: "127.0.0.1".parse().unwrap(),
        };
        let d = decide(&fe, None, &t, 80);
        assert!(d.allowed());
        assert_eq!(
            d.ingress.because,
            "networkPolicy.ingress[0].from[0] (service default/frontend)"
        );
        // The same service from another namespace is someone else.
        let other = Source {
            service: Some(SvcKey::new("prod", "frontend")),
            ip: "127.0.0.1".parse().unwrap(),
        };
        assert_eq!(decide(&other, None, &t, 80).denied_by(), Some("ingress"));
        // Wrong port.
        assert!(!decide(&fe, None, &t, 81).allowed());
        let outside = Source {
            service: None,
            ip: "10.250.1.7".parse().unwrap(),
        };
        let d = decide(&outside, None, &t, 80);
        assert!(d.allowed(), "{d:?}");
        assert!(d.ingress.because.starts_with("networkPolicy.ingress[1].from[0]"));
        let stranger = Source {
            service: None,
            ip: "10.250.2.7".parse().unwrap(),
        };
        let d = decide(&stranger, None, &t, 80);
        assert!(!d.allowed());
        assert_eq!(d.ingress.because, "no ingress rule matches (default deny)");
    }

    #[test]
    fn egress_namespace_and_selector_denies() {
        let db = SvcKey::new("data", "db");
        let none = Compiled::default();
        let t = Target {
            key: &db,
            vip: Some(Ipv4Addr::new(10, 96, 0, 9)),
            ports: &[],
            policy: &none,
        };
        let src = Source {
            service: Some(SvcKey::new("default", "api")),
            ip: "127.0.0.1".parse().unwrap(),
        };
        let np = NetworkPolicy {
            ingress: vec![],
            egress: vec![EgressRule {
                to: vec![Peer {
                    namespace: Some("data".into()),
                    ..Default::default()
                }],
                ports: vec![],
            }],
        };
        let c = compile("default", Some(&np));
        assert!(c.ingress.is_none());
        assert!(decide(&src, Some(&c), &t, 5432).allowed());
        let sel = NetworkPolicy {
            ingress: vec![],
            egress: vec![EgressRule {
                to: vec![Peer {
                    service_selector: Some(serde_json::json!({"app": "db"})),
                    ..Default::default()
                }],
                ports: vec![],
            }],
        };
        let c = compile("default", Some(&sel));
        let d = decide(&src, Some(&c), &t, 5432);
        assert_eq!(d.denied_by(), Some("egress"));
        let cidr = NetworkPolicy {
            ingress: vec![],
            egress: vec![EgressRule {
                to: vec![Peer {
                    cidr: Some("10.96.0.0/16".into()),
                    ..Default::default()
                }],
                ports: vec![PortRef::Number(5432)],
            }],
        };
        let c = compile("default", Some(&cidr));
        assert!(decide(&src, Some(&c), &t, 5432).allowed());
        assert!(!decide(&src, Some(&c), &t, 80).allowed());
        let udp = NetworkPolicy {
            ingress: vec![],
            egress: vec![EgressRule {
                to: vec![Peer {
                    cidr: Some("10.96.0.0/16".into()),
                    ..Default::default()
                }],
                ports: vec![PortRef::Name("5432/udp".into())],
            }],
        };
        let c = compile("default", Some(&udp));
        assert!(
            !decide(&src, Some(&c), &t, 5432).allowed(),
            "a UDP port opens no TCP port"
        );
    }

    #[test]
    fn nets() {
        let n = Net::parse("10.0.0.0/8").unwrap();
        assert!(n.contains("10.2.3.4".parse().unwrap()));
        assert!(!n.contains("11.2.3.4".parse().unwrap()));
        assert!(!n.contains("::1".parse().unwrap()));
        assert!(Net::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!(Net::parse("fd00::/8")
            .unwrap()
            .contains("fd12::1".parse().unwrap()));
        assert!(Net::parse("10.0.0.0/33").is_none());
    }
}
