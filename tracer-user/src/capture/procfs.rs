//! Fallback lookups in /proc for what the kernel side could not tell: the 4-tuple of a socket
//! fd (connections that were open before the agent started and first seen inside an SSL call),
//! the TCP ports something listens on (to warn about a configured port nothing serves), and a
//! process's name and executable (for records and discovery).

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use crate::exchange::Tuple;

/// The kernel's comm of a process ("" when it is gone).
pub fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_default()
}

/// The path of a process's executable, when it can be read.
pub fn executable(pid: u32) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/exe")).ok().map(|p| {
        p.to_string_lossy()
            .trim_end_matches(" (deleted)")
            .to_string()
    })
}

pub fn socket_tuple(tgid: u32, fd: u32) -> Option<Tuple> {
    let link = fs::read_link(format!("/proc/{tgid}/fd/{fd}")).ok()?;
    let inode: u64 = link
        .to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()?;
    for file in ["tcp", "tcp6"] {
        let Ok(text) = fs::read_to_string(format!("/proc/{tgid}/net/{file}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && f[9].parse::<u64>().ok() == Some(inode) {
                return Some(Tuple {
                    local: parse_addr(f[1])?,
                    peer: parse_addr(f[2])?,
                });
            }
        }
    }
    None
}

/// The local ports of the TCP sockets in LISTEN state (IPv4 and IPv6) in the agent's network
/// namespace, from /proc/net/tcp and /proc/net/tcp6.
pub fn listening_ports() -> std::collections::BTreeSet<u16> {
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|f| fs::read_to_string(format!("/proc/net/{f}")).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    // st 0A is TCP_LISTEN.
                    (f.len() > 3 && f[3] == "0A")
                        .then(|| parse_addr(f[1]).map(|a| a.port()))
                        .flatten()
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The local ports of the UDP sockets process `pid` holds that are bound and not connected
/// (a QUIC/HTTP/3 listener is one), from its fds and its network namespace's /proc/net/udp*.
pub fn udp_listening_ports(pid: u32) -> std::collections::BTreeSet<u16> {
    let inodes: std::collections::BTreeSet<u64> = fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let l = fs::read_link(e.path()).ok()?;
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect();
    ["udp", "udp6"]
        .iter()
        .filter_map(|f| fs::read_to_string(format!("/proc/{pid}/net/{f}")).ok())
        .flat_map(|text| udp_listeners(&text, &inodes))
        .collect()
}

/// The local ports of the unconnected, bound sockets among `inodes` in a /proc/net/udp text.
fn udp_listeners(text: &str, inodes: &std::collections::BTreeSet<u64>) -> Vec<u16> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let inode: u64 = f.get(9)?.parse().ok()?;
            let local = parse_addr(f[1])?;
            let peer = parse_addr(f[2])?;
            (inodes.contains(&inode) && local.port() != 0 && peer.port() == 0)
                .then_some(local.port())
        })
        .collect()
}

/// `0100007F:1F90` (IPv4) or 32 hex digits + port (IPv6), as the kernel prints them: each
/// 32-bit word in host byte order.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (a, p) = s.split_once(':')?;
    let port = u16::from_str_radix(p, 16).ok()?;
    let ip = match a.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(a, 16).ok()?.to_ne_bytes(),
        )),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                let w = u32::from_str_radix(&a[i * 8..i * 8 + 8], 16).ok()?;
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            let v6 = Ipv6Addr::from(b);
            v6.to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    #[test]
    fn udp_listeners_are_the_bound_unconnected_sockets_of_the_process() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
   1: 00000000:01BB 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4242 2 0 0\n\
   2: 0100007F:D431 0100007F:0035 01 00000000:00000000 00:00000000 00000000     0        0 4243 2 0 0\n\
   3: 00000000:0202 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 9999 2 0 0\n";
        let mine: std::collections::BTreeSet<u64> = [4242, 4243].into_iter().collect();
        // 443 bound and unconnected; the connected DNS socket and another process's are not.
        assert_eq!(super::udp_listeners(text, &mine), vec![443]);
    }

    #[test]
    fn parses_kernel_notation() {
        assert_eq!(
            super::parse_addr("0100007F:1F90").unwrap().to_string(),
            "127.0.0.1:8080"
        );
        assert_eq!(
            super::parse_addr("0000000000000000FFFF00000100007F:01BB")
                .unwrap()
                .to_string(),
            "127.0.0.1:443"
        );
        assert!(super::parse_addr("zz").is_none());
    }

    #[test]
    fn listening_ports_sees_a_listener_and_not_a_connection() {
        let l4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p4 = l4.local_addr().unwrap().port();
        let l6 = std::net::TcpListener::bind("[::1]:0").ok();
        // A connected client's port is in /proc/net/tcp too, but not in LISTEN.
        let c = std::net::TcpStream::connect(("127.0.0.1", p4)).unwrap();
        let client_port = c.local_addr().unwrap().port();
        let ports = super::listening_ports();
        assert!(ports.contains(&p4), "{p4} not in {ports:?}");
        if let Some(l6) = l6 {
            let p6 = l6.local_addr().unwrap().port();
            assert!(ports.contains(&p6), "{p6} (IPv6) not in {ports:?}");
        }
        assert!(!ports.contains(&client_port));
        drop(l4);
        assert!(!super::listening_ports().contains(&p4));
    }
}
