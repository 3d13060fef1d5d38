//! Service VIPs: one stable /32 per service, chosen inside apply so that replay chooses the same.
//!
//! Keys: `network/config` (the cluster CIDR), `network/cursor` (the next address to try),
//! `network/vips/<u32>` → the service holding it, `network/released/<u32>` → when it was given
//! back. Allocation walks forward from the cursor, so a released address is reached again only
//! after the rest of the range, and never within [`VIP_COOLDOWN_MS`] of its release.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// The default cluster network.
pub const DEFAULT_CLUSTER_CIDR: &str = "10.96.0.0/16";

/// How long a released VIP is held back before it can be given to another service, so that
/// clients still holding the old answer (DNS TTL, connection pools) do not reach a stranger.
pub const VIP_COOLDOWN_MS: i64 = 60_000;

/// Key of the cluster network settings.
pub const CONFIG_KEY: &str = "network/config";
/// Key of the allocation cursor.
pub const CURSOR_KEY: &str = "network/cursor";
/// Prefix of allocated VIPs.
pub const VIPS_PREFIX: &str = "network/vips/";
/// Prefix of released VIPs cooling down.
pub const RELEASED_PREFIX: &str = "network/released/";

/// The cluster network as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// `a.b.c.d/n`.
    pub cluster_cidr: String,
}

/// Prefix of exposed hosts claimed by a service (`network/hosts/<host>`): one service per host.
pub const HOSTS_PREFIX: &str = "network/hosts/";

/// Key of the claim on an exposed host (lower-case).
pub fn host_key(host: &str) -> String {
    format!("{HOSTS_PREFIX}{host}")
}

/// Who holds a VIP or an exposed host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipHolder {
    /// Namespace of the service.
    pub namespace: String,
    /// Name of the service.
    pub service: String,
}

/// A parsed, validated cluster CIDR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The network address.
    pub base: u32,
    /// The prefix length.
    pub prefix: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/n`, accepting only RFC 1918 and 100.64.0.0/10 ranges (a VIP must never
    /// shadow a public address), with room for at least two services.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (ip, len) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| format!("'{s}' is not a CIDR such as 10.96.0.0/16"))?;
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|_| format!("'{s}': '{ip}' is not an IPv4 address"))?;
        let prefix: u8 = len
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("'{s}': '/{len}' is not a prefix length"))?;
        if prefix > 29 {
            return Err(format!("'{s}' is too small: use a /29 or larger"));
        }
        // A /0 shifts by 32, which `<<` refuses.
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        let base = u32::from(ip) & mask;
        let c = Cidr { base, prefix };
        let allowed = [
            ("10.0.0.0", 8),
            ("172.16.0.0", 12),
            ("192.168.0.0", 16),
            ("100.64.0.0", 10),
        ];
        let inside = allowed.iter().any(|(net, len)| {
            let n = u32::from(net.parse::<Ipv4Addr>().unwrap_or(Ipv4Addr::UNSPECIFIED));
            let m = u32::MAX << (32 - len);
            prefix >= *len && base & m == n
        });
        if !inside {
            return Err(format!(
                "'{s}' is not private: use a range inside 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16 or 100.64.0.0/10"
            ));
        }
        Ok(c)
    }

    /// The first and last address handed out: the network address, the first host (often a
    /// gateway) and the broadcast address are skipped.
    pub fn usable(&self) -> (u32, u32) {
        let size = 1u64 << (32 - u32::from(self.prefix));
        let last = u64::from(self.base) + size - 2;
        (self.base + 2, u32::try_from(last).unwrap_or(u32::MAX))
    }
}

/// The key of a VIP under `prefix`, sortable by address.
pub fn vip_key(prefix: &str, ip: u32) -> String {
    format!("{prefix}{ip:010}")
}

/// Dotted form of an address.
pub fn dotted(ip: u32) -> String {
    Ipv4Addr::from(ip).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str, port: u16, target_port: u16, protocol: &str) -> EndpointPort {
        EndpointPort {
            name: name.into(),
            port,
            target_port,
            protocol: protocol.into(),
        }
    }

    #[test]
    fn a_run_serves_the_current_ports_where_its_own_spec_put_them() {
        // Named ports match by name, even when the service port moved.
        let current = [p("http", 8000, 9090, "tcp"), p("dns", 53, 5353, "udp")];
        let run = [p("http", 80, 8080, "tcp"), p("dns", 53, 5300, "tcp")];
        assert_eq!(
            EndpointPort::serving(&current, &run),
            // The run's `dns` was TCP: not the same port, so the current target stands.
            [p("http", 8000, 8080, "tcp"), p("dns", 53, 5353, "udp")]
        );
        // An unnamed port matches by number only.
        let current = [p("", 80, 9090, "tcp")];
        assert_eq!(
            EndpointPort::serving(&current, &[p("", 80, 8080, "tcp")]),
            [p("", 80, 8080, "tcp")]
        );
        // A spec's only port stays the same port when its number moves.
        assert_eq!(
            EndpointPort::serving(&current, &[p("", 81, 8080, "tcp")]),
            [p("", 80, 8080, "tcp")]
        );
        assert_eq!(
            EndpointPort::serving(&current, &[p("", 81, 8080, "tcp"), p("", 82, 8081, "tcp")]),
            current
        );
        assert_eq!(
            EndpointPort::serving(&current, &[p("http", 80, 8080, "tcp")]),
            current
        );
        // A port the run did not have keeps the current target.
        assert_eq!(EndpointPort::serving(&current, &[]), current);
    }

    #[test]
    fn cidrs() {
        let c = Cidr::parse("10.96.0.0/16").unwrap();
        assert_eq!(dotted(c.usable().0), "10.96.0.2");
        assert_eq!(dotted(c.usable().1), "10.96.255.254");
        assert!(Cidr::parse("100.64.0.0/10").is_ok());
        assert!(Cidr::parse("172.20.0.0/16").is_ok());
        assert!(Cidr::parse("8.8.8.0/24").unwrap_err().contains("not private"));
        assert!(Cidr::parse("10.0.0.0/7").unwrap_err().contains("not private"));
        // No shift overflow on the way to that answer.
        assert!(Cidr::parse("10.0.0.0/0").unwrap_err().contains("not private"));
        assert!(Cidr::parse("10.0.0.0/30").unwrap_err().contains("too small"));
        assert!(Cidr::parse("10.0.0.0").is_err());
        assert!(Cidr::parse("10.0.0.300/16").is_err());
    }
}

/// Where a service can be reached right now: its ready instances, derived in apply from the
/// instance records whenever one changes, so the data plane and DNS follow the log alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct EndpointSet {
    /// Namespace of the service.
    pub namespace: String,
    /// Name of the service.
    pub service: String,
    /// Ready instances, by instance id.
    pub endpoints: Vec<Endpoint>,
}

/// One ready instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Instance id.
    pub instance: String,
    /// The address its ports listen on.
    pub address: String,
    /// The node it runs on.
    pub node: String,
    /// Its ports: the service port's name and number, and where the instance listens.
    pub ports: Vec<EndpointPort>,
}

/// A port of an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointPort {
    /// Service port name.
    pub name: String,
    /// Service port number (what clients of the VIP use).
    pub port: u16,
    /// Where the instance listens.
    pub target_port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
}

impl EndpointPort {
    /// The ports a service's spec declares, as an endpoint serves them. An instance's run
    /// records those of the spec it was started from, so that while a rollout changes a
    /// `targetPort` each endpoint is reached where it listens (see [`Self::serving`]).
    pub fn of_spec(ports: &[crate::spec::PortSpec]) -> Vec<EndpointPort> {
        ports
            .iter()
            .filter_map(|p| {
                Some(EndpointPort {
                    name: p.name.clone(),
                    port: u16::try_from(p.port).ok()?,
                    target_port: u16::try_from(p.target_port.unwrap_or(p.port)).ok()?,
                    protocol: p.protocol.clone().unwrap_or_else(|| "tcp".into()).to_lowercase(),
                })
            })
            .collect()
    }

    /// The service's current ports (`current`), each with the target port of the same port in
    /// the spec a run was started from (`run`), as Kubernetes resolves a named `targetPort`
    /// per pod: a port is the same by name, or, unnamed, by number (a spec's only port, the
    /// one case a port may go unnamed, is the same whatever its number); both by protocol. A
    /// port the run did not have (or a run that recorded none) keeps the current target.
    pub fn serving(current: &[EndpointPort], run: &[EndpointPort]) -> Vec<EndpointPort> {
        current
            .iter()
            .map(|c| {
                let same = |r: &&EndpointPort| {
                    r.protocol == c.protocol
                        && if c.name.is_empty() {
                            r.name.is_empty() && (r.port == c.port || (current.len() == 1 && run.len() == 1))
                        } else {
                            r.name == c.name
                        }
                };
                match run.iter().find(same) {
                    Some(r) => EndpointPort {
                        target_port: r.target_port,
                        ..c.clone()
                    },
                    None => c.clone(),
                }
            })
            .collect()
    }

    /// Whether this port is TCP, as [`crate::spec::PortSpec::is_tcp`] says of the port it
    /// comes from (an empty protocol is the default, TCP).
    pub fn is_tcp(&self) -> bool {
        self.protocol.is_empty() || self.protocol.eq_ignore_ascii_case("tcp")
    }
}

/// Key of a service's endpoints.
pub fn endpoints_key(ns: &str, service: &str) -> String {
    format!("endpoints/{ns}/{service}")
}

/// Key prefix of the endpoints of a namespace, or of all.
pub fn endpoints_prefix(ns: Option<&str>) -> String {
    ns.map_or_else(|| "endpoints/".into(), |ns| format!("endpoints/{ns}/"))
}
