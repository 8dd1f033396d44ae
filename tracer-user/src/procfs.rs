//! Fallback lookups in /proc for what the kernel side could not tell: the 4-tuple of a socket
//! fd (connections that were open before the agent started and first seen inside an SSL call).

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use crate::record::Tuple;

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
}
