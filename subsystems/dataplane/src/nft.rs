//! The kernel half of the data plane: one nftables table of runed's own (`inet rune` unless
//! configured otherwise), replaced whole in one `nft -f` transaction whenever the view changes,
//! so the kernel never holds half a policy. Nothing else in the ruleset is read or touched.
//!
//! - `nat_prerouting`/`nat_output` redirect `VIP:port` to the proxy's port for that service port
//!   (from containers and other hosts, and from this host).
//! - `filter_prerouting` (before NAT) rejects VIP ports without ready endpoints with a TCP reset,
//!   then sends traffic from a service's containers through its egress chain and traffic to a
//!   service's VIP or container addresses through its ingress chain. Established flows pass
//!   first, so a policy swap never cuts a connection it allowed.
//! - Each policy chain ends in a named counter and `drop`: these are the kernel drops.
//!   Host processes share the host's address and cannot be told apart here; their flows reach
//!   the proxy, which names them by socket and applies the same decision.
//! - `input` drops packets to the proxy ports that did not come through the redirect, so the
//!   VIP stays the only way in from outside.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::process::Stdio;

use tokio::io::AsyncWriteExt;

use crate::policy::{ports_of, PeerMatch, Rule, SvcKey};
use crate::table::{Mode, Table};

/// Why the kernel cannot be programmed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// `nft` is not installed.
    #[error("nft is missing (install Debian's nftables); policy is enforced in the proxy only")]
    Missing,
    /// No CAP_NET_ADMIN.
    #[error(
        "no privilege to program nftables (runed needs CAP_NET_ADMIN); policy is enforced in the proxy only"
    )]
    Privilege,
    /// nft refused the program.
    #[error("nft refused the program: {0}")]
    Refused(String),
    /// Spawning or talking to nft failed.
    #[error("cannot run nft: {0}")]
    Io(#[from] std::io::Error),
}

/// Which policy chain a named counter belongs to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct CounterKey {
    /// The service.
    pub service: SvcKey,
    /// `ingress` or `egress`.
    pub direction: &'static str,
}

/// The counter (and chain) name of a service's policy direction. Namespaces and names are
/// DNS labels, which cannot hold `_`, so the name is unambiguous.
pub fn counter_name(k: &SvcKey, direction: &str) -> String {
    let d = if direction == "ingress" { "in" } else { "eg" };
    format!("{d}_{}_{}", k.ns, k.name)
}

/// The program: the table's full text, and the counters it defines.
pub fn render(
    table_name: &str,
    t: &Table,
    proxy_ports: &BTreeMap<(SvcKey, u16), u16>,
    range: (u16, u16),
) -> (String, Vec<CounterKey>) {
    let mut s = String::new();
    let mut counters = Vec::new();
    let mut redirects = Vec::new();
    let mut refused = Vec::new();
    for svc in t.services.values() {
        let Some(vip) = svc.vip else { continue };
        for (_, port) in svc.tcp_ports() {
            match proxy_ports.get(&(svc.key.clone(), port)) {
                Some(pp) if svc.mode != Mode::None && !svc.endpoints.is_empty() => {
                    redirects.push(format!("{vip} . {port} : {pp}"))
                }
                _ => refused.push(format!("{vip} . {port}")),
            }
        }
    }
    // `add` + `delete` first makes the delete safe when the table does not exist yet; the
    // whole file is one transaction.
    let _ = writeln!(
        s,
        "add table inet {table_name}\ndelete table inet {table_name}\ntable inet {table_name} {{"
    );
    let _ = writeln!(
        s,
        "  map vip_ports {{ type ipv4_addr . inet_service : inet_service;"
    );
    if !redirects.is_empty() {
        let _ = writeln!(s, "    elements = {{ {} }}", redirects.join(", "));
    }
    let _ = writeln!(s, "  }}\n  set refused {{ type ipv4_addr . inet_service;");
    if !refused.is_empty() {
        let _ = writeln!(s, "    elements = {{ {} }}", refused.join(", "));
    }
    let _ = writeln!(s, "  }}");
    // Which chain a packet goes through is one lookup in a verdict map, not a rule per service.
    let (mut egress_from, mut ingress_to) = (Vec::new(), Vec::new());
    let mut chains = String::new();
    // Egress first: its chains `return` on a match, so the ingress check still follows.
    for svc in t.services.values() {
        let Some(rules) = &svc.policy.egress else { continue };
        if svc.local_ips.is_empty() {
            continue;
        }
        let name = counter_name(&svc.key, "egress");
        egress_from.extend(
            svc.local_ips
                .iter()
                .filter(|i| i.is_ipv4())
                .map(|i| format!("{i} : jump {name}")),
        );
        let _ = writeln!(chains, "  chain {name} {{");
        for r in rules {
            for line in egress_lines(t, r) {
                let _ = writeln!(chains, "    {line} return");
            }
        }
        // The node's own DNS stays reachable: a default-deny egress must not break names.
        let _ = writeln!(
            chains,
            "    fib daddr type local meta l4proto {{ tcp, udp }} th dport 53 return"
        );
        let _ = writeln!(chains, "    counter name \"{name}\" drop\n  }}");
        let _ = writeln!(s, "  counter {name} {{ }}");
        counters.push(CounterKey {
            service: svc.key.clone(),
            direction: "egress",
        });
    }
    for svc in t.services.values() {
        let Some(rules) = &svc.policy.ingress else {
            continue;
        };
        let name = counter_name(&svc.key, "ingress");
        let mut dests: Vec<IpAddr> = svc.local_ips.clone();
        if let Some(v) = svc.vip {
            dests.push(IpAddr::V4(v));
        }
        if dests.is_empty() {
            continue;
        }
        ingress_to.extend(
            dests
                .iter()
                .filter(|i| i.is_ipv4())
                .map(|i| format!("{i} : jump {name}")),
        );
        let _ = writeln!(chains, "  chain {name} {{");
        for r in rules {
            for line in ingress_lines(t, svc, r) {
                let _ = writeln!(chains, "    {line} accept");
            }
        }
        let _ = writeln!(chains, "    counter name \"{name}\" drop\n  }}");
        let _ = writeln!(s, "  counter {name} {{ }}");
        counters.push(CounterKey {
            service: svc.key.clone(),
            direction: "ingress",
        });
    }
    let _ = writeln!(
        s,
        "  chain filter_prerouting {{ type filter hook prerouting priority -150; policy accept;\n    \
         ct state established,related accept\n    iif lo accept\n    \
         ip daddr . tcp dport @refused reject with tcp reset\n    \
         ip saddr vmap @egress_from\n    ip daddr vmap @ingress_to\n  }}"
    );
    let _ = writeln!(
        s,
        "  chain filter_output {{ type filter hook output priority -150; policy accept;\n    \
         ip daddr . tcp dport @refused reject with tcp reset\n  }}"
    );
    s.push_str(&chains);
    for (map, elems) in [("egress_from", &egress_from), ("ingress_to", &ingress_to)] {
        let _ = writeln!(s, "  map {map} {{ type ipv4_addr : verdict;");
        if !elems.is_empty() {
            let _ = writeln!(s, "    elements = {{ {} }}", elems.join(", "));
        }
        let _ = writeln!(s, "  }}");
    }
    for (chain, hook) in [("nat_prerouting", "prerouting"), ("nat_output", "output")] {
        let _ = writeln!(
            s,
            "  chain {chain} {{ type nat hook {hook} priority -100; policy accept;\n    \
             meta l4proto tcp redirect to ip daddr . tcp dport map @vip_ports\n  }}"
        );
    }
    let _ = writeln!(
        s,
        "  chain input {{ type filter hook input priority 0; policy accept;\n    \
         tcp dport {}-{} iif != lo ct status ! dnat drop\n  }}\n}}",
        range.0, range.1
    );
    (s, counters)
}

/// `a` alone, or `{ a, b }`: anonymous sets cost the kernel more than a plain match.
fn one_or_set(items: &[String]) -> String {
    match items {
        [one] => one.clone(),
        many => format!("{{ {} }}", many.join(", ")),
    }
}

fn port_clause(ports: &Option<Vec<u16>>) -> Option<String> {
    match ports {
        None => Some(String::new()),
        Some(p) if p.is_empty() => None,
        Some(p) => Some(format!(
            " tcp dport {}",
            one_or_set(&p.iter().map(|x| x.to_string()).collect::<Vec<_>>())
        )),
    }
}

/// Addresses a peer stands for on this node: the containers of a service or namespace, a CIDR.
fn peer_addrs(t: &Table, m: &PeerMatch, with_vips: bool) -> Vec<String> {
    let svc_addrs = |k: &SvcKey| -> Vec<String> {
        let Some(s) = t.services.get(k) else {
            return Vec::new();
        };
        let mut v: Vec<String> = s.local_ips.iter().map(|i| i.to_string()).collect();
        if with_vips {
            v.extend(s.vip.map(|x| x.to_string()));
        }
        v
    };
    match m {
        PeerMatch::Service(k) => svc_addrs(k),
        PeerMatch::Namespace(ns) => t
            .services
            .keys()
            .filter(|k| k.ns == *ns)
            .flat_map(svc_addrs)
            .collect(),
        PeerMatch::Cidr(n) => vec![n.to_string()],
        PeerMatch::Nothing(_) => Vec::new(),
    }
}

fn family(addr: &str) -> &'static str {
    if addr.contains(':') {
        "ip6"
    } else {
        "ip"
    }
}

fn ingress_lines(t: &Table, svc: &crate::table::Svc, r: &Rule) -> Vec<String> {
    // Both the service port (via the VIP) and where the instances listen (direct to a container).
    let ports = ports_of(r, &svc.ports).map(|list| {
        let mut all = list.clone();
        for p in &svc.ports {
            if list.iter().any(|x| i64::from(*x) == p.port) {
                all.extend(p.target_port.and_then(|x| u16::try_from(x).ok()));
            }
        }
        all.sort_unstable();
        all.dedup();
        all
    });
    let Some(pc) = port_clause(&ports) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (_, m) in &r.peers {
        for fam in ["ip", "ip6"] {
            let addrs: Vec<String> = peer_addrs(t, m, false)
                .into_iter()
                .filter(|a| family(a) == fam)
                .collect();
            if !addrs.is_empty() {
                out.push(format!("{fam} saddr {}{pc}", one_or_set(&addrs)));
            }
        }
    }
    out
}

fn egress_lines(t: &Table, r: &Rule) -> Vec<String> {
    let mut out = Vec::new();
    for (_, m) in &r.peers {
        // Port names resolve against the destination service's ports.
        let dest_ports = match m {
            PeerMatch::Service(k) => t.services.get(k).map(|s| s.ports.clone()).unwrap_or_default(),
            _ => Vec::new(),
        };
        let Some(pc) = port_clause(&ports_of(r, &dest_ports)) else {
            continue;
        };
        for fam in ["ip", "ip6"] {
            let addrs: Vec<String> = peer_addrs(t, m, true)
                .into_iter()
                .filter(|a| family(a) == fam)
                .collect();
            if !addrs.is_empty() {
                out.push(format!("{fam} daddr {}{pc}", one_or_set(&addrs)));
            }
        }
    }
    out
}

/// Loads a program with `nft -f -`.
pub async fn apply(program: &str) -> Result<(), NftError> {
    let out = run_nft(&["-f", "-"], Some(program)).await?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    if err.contains("Operation not permitted") || err.contains("Permission denied") {
        return Err(NftError::Privilege);
    }
    Err(NftError::Refused(
        err.lines().take(6).collect::<Vec<_>>().join(" | "),
    ))
}

/// Reads the packet counts of the table's named counters.
pub async fn counters(table_name: &str) -> Result<BTreeMap<String, u64>, NftError> {
    let out = run_nft(&["-j", "list", "counters", "table", "inet", table_name], None).await?;
    if !out.status.success() {
        return Err(NftError::Refused(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| NftError::Refused(format!("unreadable nft -j output: {e}")))?;
    let mut m = BTreeMap::new();
    for item in v.get("nftables").and_then(|x| x.as_array()).into_iter().flatten() {
        if let Some(c) = item.get("counter") {
            if let (Some(n), Some(p)) = (
                c.get("name").and_then(|x| x.as_str()),
                c.get("packets").and_then(|x| x.as_u64()),
            ) {
                m.insert(n.to_string(), p);
            }
        }
    }
    Ok(m)
}

async fn run_nft(args: &[&str], stdin: Option<&str>) -> Result<std::process::Output, NftError> {
    let mut cmd = tokio::process::Command::new("nft");
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => NftError::Missing,
        std::io::ErrorKind::PermissionDenied => NftError::Privilege,
        _ => NftError::Io(e),
    })?;
    if let (Some(text), Some(mut w)) = (stdin, child.stdin.take()) {
        w.write_all(text.as_bytes()).await?;
        drop(w);
    }
    Ok(child.wait_with_output().await?)
}
