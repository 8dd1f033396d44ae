//! One traced connection as the pipeline keeps it: its HTTP parser, addresses, the holes seen
//! since its last exchange, who its last call was from, and the gate that makes a connection
//! first seen mid-life parse as if it began at its first captured request.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use tracer_common::{
    Tuple as KernelTuple, AF_INET, AF_INET6, HOLE_CAP, HOLE_READ_FAILED, HOLE_RINGBUF_FULL,
    HOLE_SENDFILE, HOLE_TOO_MANY_CHUNKS,
};

use crate::{
    exchange::Tuple,
    http::{ConnParser, Dir},
};

pub(super) struct Conn {
    pub parser: ConnParser,
    pub tuple: Option<Tuple>,
    pub tls: bool,
    /// Reasons of holes seen since the last exchange was recorded.
    pub hole_reasons: BTreeSet<&'static str>,
    /// The parser's anomalies since the last exchange was recorded (for anomaly rules).
    pub anomalies: BTreeSet<&'static str>,
    /// Kernel timestamp of the last event seen on this connection.
    pub last_ns: u64,
    /// Set for a connection first seen in the middle of its life (see `MidstreamGate`).
    pub gate: Option<MidstreamGate>,
    /// The user and session of the connection's last call.
    pub user: Option<String>,
    pub session: Option<String>,
    /// The decision whose enforcement blocked this connection.
    pub blocked_by: Option<String>,
}

/// A connection the kernel first saw mid-life (opened before the agent started) is parsed as
/// if it began at its first captured request: the kernel numbers its bytes from 0 there, and an
/// idle keep-alive connection's next bytes are a request and then its response. What the server
/// writes before that first request was read answers requests the agent never saw (a client
/// that does not pipeline sends its next request only after the previous response), so it is
/// skipped and counted, never paired. Positions are rebased so each direction starts at 0.
#[derive(Default)]
pub(super) struct MidstreamGate {
    first_in_ns: Option<u64>,
    base_in: Option<u64>,
    base_out: Option<u64>,
}

pub(super) enum Piece<'a> {
    Data(&'a [u8]),
    Hole(u64),
}

impl Conn {
    pub fn new(parser: ConnParser, tuple: Option<Tuple>, tls: bool, midstream: bool) -> Conn {
        Conn {
            parser,
            tuple,
            tls,
            hole_reasons: BTreeSet::new(),
            anomalies: BTreeSet::new(),
            last_ns: 0,
            gate: midstream.then(MidstreamGate::default),
            user: None,
            session: None,
            blocked_by: None,
        }
    }

    /// Hands one piece to the parser, through the midstream gate; returns the bytes skipped.
    pub fn feed(&mut self, dir: Dir, pos: u64, ts: u64, piece: Piece) -> u64 {
        let len = match piece {
            Piece::Data(b) => b.len() as u64,
            Piece::Hole(n) => n,
        };
        let pos = match &mut self.gate {
            None => pos,
            Some(g) => {
                let (base, open) = match dir {
                    Dir::Inbound => (&mut g.base_in, matches!(piece, Piece::Data(_))),
                    Dir::Outbound => (&mut g.base_out, g.first_in_ns.is_some_and(|t| ts >= t)),
                };
                match *base {
                    Some(b) if pos >= b => pos - b,
                    Some(_) => return len,
                    None if open => {
                        *base = Some(pos);
                        if dir == Dir::Inbound {
                            g.first_in_ns = Some(ts);
                        }
                        0
                    }
                    None => return len,
                }
            }
        };
        match piece {
            Piece::Data(b) => self.parser.data(dir, pos, ts, b),
            Piece::Hole(n) => self.parser.hole(dir, pos, n, ts),
        }
        0
    }

    /// The connection ended with `pos_in`/`pos_out` bytes in each direction.
    pub fn close_at(&mut self, ts: u64, pos_in: u64, pos_out: u64) {
        let (i, o) = match &self.gate {
            None => (pos_in, pos_out),
            Some(g) => (
                g.base_in.map_or(0, |b| pos_in.saturating_sub(b)),
                g.base_out.map_or(0, |b| pos_out.saturating_sub(b)),
            ),
        };
        self.parser.close_at(ts, i, o);
    }
}

/// The reason code of a kernel hole, as counted and recorded.
pub(super) fn hole_reason(r: u8) -> &'static str {
    match r {
        HOLE_CAP => "cap",
        HOLE_READ_FAILED => "read_user_failed",
        HOLE_RINGBUF_FULL => "ringbuf_full",
        HOLE_SENDFILE => "sendfile",
        HOLE_TOO_MANY_CHUNKS => "too_many_chunks",
        _ => "unknown",
    }
}

/// The kernel's address pair as socket addresses (IPv4-mapped IPv6 shown as IPv4); `None` for
/// a family that is not IP (the kernel could not read it).
pub(super) fn tuple_addrs(t: &KernelTuple) -> Option<Tuple> {
    let ip = |a: &[u8; 16]| -> IpAddr {
        if t.family == AF_INET {
            IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
        } else {
            let v6 = Ipv6Addr::from(*a);
            match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            }
        }
    };
    if t.family != AF_INET && t.family != AF_INET6 {
        return None;
    }
    Some(Tuple {
        local: SocketAddr::new(ip(&t.local_addr), t.local_port),
        peer: SocketAddr::new(ip(&t.peer_addr), t.peer_port),
    })
}
