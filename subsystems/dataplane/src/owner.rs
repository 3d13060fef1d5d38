//! Which local process group owns the client end of a connection. Host processes all share the
//! host's addresses, so the proxy names a process instance by its socket: the client's
//! `ip:port` → the socket's inode (`/proc/net/tcp*`) → the process holding it, among the
//! process groups of this node's instances (`/proc/<pid>/stat`, `/proc/<pid>/fd`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

/// The process group, among `groups`, that holds the established TCP socket bound to `client`.
pub fn owner_group<V>(client: SocketAddr, groups: &HashMap<i32, V>) -> Option<i32> {
    if groups.is_empty() {
        return None;
    }
    let inode = socket_inode(client)?;
    let wanted = format!("socket:[{inode}]");
    let procs = std::fs::read_dir("/proc").ok()?;
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Some(pgrp) = process_group(pid) else { continue };
        if !groups.contains_key(&pgrp) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == wanted.as_str()) {
                return Some(pgrp);
            }
        }
    }
    None
}

fn process_group(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid pgrp ...`; comm may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(2)?.parse().ok()
}

fn socket_inode(client: SocketAddr) -> Option<u64> {
    let (file, want) = match client.ip() {
        IpAddr::V4(ip) => (
            "/proc/net/tcp",
            format!("{:08X}:{:04X}", u32::from_le_bytes(ip.octets()), client.port()),
        ),
        IpAddr::V6(ip) => {
            let o = ip.octets();
            let words: String = o
                .chunks(4)
                .map(|c| format!("{:08X}", u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect();
            ("/proc/net/tcp6", format!("{words}:{:04X}", client.port()))
        }
    };
    let text = std::fs::read_to_string(file).ok()?;
    find_inode(&text, &want)
}

/// The inode of the established socket whose local address is `local` (kernel hex form).
fn find_inode(table: &str, local: &str) -> Option<u64> {
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
        (f.len() > 9 && f[1] == local && f[3] == "01")
            .then(|| f[9].parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_established_socket_by_local_address() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:7531 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1111 1 0\n\
   1: 0100007F:A2C4 0100007F:7531 01 00000000:00000000 00:00000000 00000000     0        0 2222 1 0\n";
        assert_eq!(find_inode(t, "0100007F:A2C4"), Some(2222));
        // The listening socket is not a client.
        assert_eq!(find_inode(t, "0100007F:7531"), None);
    }

    #[test]
    fn names_this_process_as_its_own_group_member() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let _s = l.accept().unwrap();
        let me = process_group(std::process::id() as i32).unwrap();
        let groups: HashMap<i32, ()> = [(me, ())].into();
        assert_eq!(owner_group(c.local_addr().unwrap(), &groups), Some(me));
        let others: HashMap<i32, ()> = [(me + 1_000_000, ())].into();
        assert_eq!(owner_group(c.local_addr().unwrap(), &others), None);
    }
}
