//! Enforcement primitives for when the agent has decided to block a caller: the kernel-table key
//! of a blocked connection, the cgroup v2 root the egress filter attaches to, and resetting one
//! TCP connection with SOCK_DESTROY over NETLINK_SOCK_DIAG (what `ss -K` does).
//!
//! The kernel side (attaching `enforce_egress`, writing `BLOCK_CONNS`) is driven through
//! `loader::Kernel::{attach_enforce, block_conn, unblock_conn, blocked_conns}`; refusing the
//! requests of blocked session tokens in the kernel through `loader::Kernel::{block_token,
//! unblock_token, set_token_patterns, set_edge_tgid, token_seed}`. A blocked
//! connection stays blocked until it is unblocked, also after it was destroyed: the caller removes
//! the entry once the connection is gone, so that a later connection reusing the same 4-tuple is
//! not caught.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use thiserror::Error;
use tracer_common::{
    scan::{Pattern, ScanTables, TablesError, PK_TOKEN},
    BlockKey, AF_INET, AF_INET6, MAX_BLOCKED_CONNS, MAX_TENANT_PATS, MAX_TOKEN_PATS, TOKEN_PAT_LEN,
};

use crate::exchange::Tuple;

#[derive(Debug, Error)]
pub enum EnforceError {
    #[error("connection {local} <-> {peer}: the two ends are of different address families (after reading IPv4-mapped IPv6 as IPv4); a TCP connection has one")]
    MixedFamilies { local: SocketAddr, peer: SocketAddr },
    #[error("no cgroup v2 hierarchy is mounted (no cgroup2 root in /proc/self/mountinfo): blocking connections needs one, e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`")]
    NoCgroup2,
    #[error("opening the cgroup v2 root {path}: {source}")]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("eBPF program {0} is missing from the object: the build is broken")]
    MissingProgram(&'static str),
    #[error("eBPF map {0} is missing from the object: the build is broken")]
    MissingMap(&'static str),
    #[error("loading the enforcement program {name} failed: {}; the agent keeps tracing but cannot block connections", chain(source))]
    Load {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("attaching {name} to the egress of cgroup {} failed: {} (needs root, or CAP_BPF and CAP_NET_ADMIN, and CONFIG_CGROUP_BPF); the agent keeps tracing but cannot block connections", cgroup.display(), chain(source))]
    Attach {
        name: &'static str,
        cgroup: PathBuf,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {}", chain(source))]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("blocking is not available: the egress filter is not attached (Kernel::attach_enforce failed or was not called); connection {local} <-> {peer} is not blocked")]
    NotAttached { local: SocketAddr, peer: SocketAddr },
    #[error("the table of blocked connections is full ({max} entries); connection {local} <-> {peer} is not blocked; unblock connections that are gone")]
    TableFull {
        max: u32,
        local: SocketAddr,
        peer: SocketAddr,
    },
    #[error("blocking tokens is not available: the egress filter is not attached (Kernel::attach_enforce failed or was not called), so a request the kernel recognised could not be refused; token {hash:#018x} is not blocked")]
    TokensNotAttached { hash: u64 },
    #[error("the table of blocked tokens is full ({max} entries); token {hash:#018x} is not blocked; unblock tokens of users who are no longer blocked")]
    TokenTableFull { max: u32, hash: u64 },
    #[error("{n} token patterns given, the kernel holds at most {max}; drop some of the configured credential patterns")]
    TooManyPatterns { n: usize, max: u32 },
    #[error(
        "token pattern {index} ({pattern:?}) is {len} bytes; patterns must be 1 to {max} bytes"
    )]
    BadPattern {
        index: usize,
        pattern: String,
        len: usize,
        max: usize,
    },
    #[error("the token patterns take {bytes} bytes together, the kernel's matcher holds at most {max}; drop some of the configured session cookies, session headers or login fields")]
    PatternsTooLong { bytes: usize, max: usize },
    #[error("the table of edge processes is full ({max} entries); pid {tgid} is not scanned for blocked tokens")]
    EdgeTableFull { max: u32, tgid: u32 },
    #[error("opening a NETLINK_SOCK_DIAG socket: {0}")]
    Socket(io::Error),
    #[error("sending a sock_diag request about {local} <-> {peer} to the kernel: {source}")]
    Send {
        local: SocketAddr,
        peer: SocketAddr,
        source: io::Error,
    },
    #[error("reading the kernel's sock_diag answer about {local} <-> {peer}: {source}")]
    Recv {
        local: SocketAddr,
        peer: SocketAddr,
        source: io::Error,
    },
    #[error("the kernel's sock_diag answer is malformed: {0}")]
    BadReply(&'static str),
    #[error("no TCP connection {local} <-> {peer} exists (it may have closed already)")]
    NoSuchConnection { local: SocketAddr, peer: SocketAddr },
    #[error("this kernel cannot destroy sockets (EOPNOTSUPP: built without CONFIG_INET_DIAG_DESTROY); connection {local} <-> {peer} was not reset")]
    NotSupported { local: SocketAddr, peer: SocketAddr },
    #[error("not permitted to destroy connection {local} <-> {peer}: SOCK_DESTROY needs CAP_NET_ADMIN in the socket's network namespace")]
    NotPermitted { local: SocketAddr, peer: SocketAddr },
    #[error("SOCK_DESTROY for {local} <-> {peer} failed: {source}")]
    Kernel {
        local: SocketAddr,
        peer: SocketAddr,
        source: io::Error,
    },
}

/// An error and its causes, `outer: inner: ...` (aya's syscall errors keep the errno in the
/// source).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`, how dual-stack sockets name IPv4 peers) as plain IPv4;
/// everything else unchanged.
pub fn normalise(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        SocketAddr::V4(_) => a,
    }
}

/// Both ends normalised, and of one family.
fn same_family(
    local: SocketAddr,
    peer: SocketAddr,
) -> Result<(SocketAddr, SocketAddr), EnforceError> {
    let (l, p) = (normalise(local), normalise(peer));
    if l.is_ipv4() != p.is_ipv4() {
        return Err(EnforceError::MixedFamilies { local, peer });
    }
    Ok((l, p))
}

fn addr_bytes(a: &SocketAddr) -> [u8; 16] {
    let mut b = [0u8; 16];
    match a.ip() {
        IpAddr::V4(v4) => b[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => b = v6.octets(),
    }
    b
}

/// The `BLOCK_CONNS` key of a connection as its local end (`t.local`) sends it.
pub fn block_key(t: &Tuple) -> Result<BlockKey, EnforceError> {
    let (l, p) = same_family(t.local, t.peer)?;
    Ok(BlockKey {
        family: if l.is_ipv4() { AF_INET } else { AF_INET6 },
        local_port: l.port(),
        remote_port: p.port(),
        _pad: 0,
        local_addr: addr_bytes(&l),
        remote_addr: addr_bytes(&p),
    })
}

/// The kernel's matcher (`TOKEN_TABLES`) for `pats`, the agent's patterns after which a token
/// follows (`Attributor::kernel_patterns`): at most `MAX_TOKEN_PATS` patterns of 1 to
/// `TOKEN_PAT_LEN` bytes each. The kernel skips spaces and tabs before every token, so trailing
/// spaces are dropped; a pattern that names a header (`Name: `) matches at the start of a line
/// and, like `Bearer `, in any case (servers compare header names and the auth scheme without
/// case); cookie names and login fields match exactly.
///
/// `tenant` are the routes' tenant patterns (`pipeline::early::tenant_patterns`), each with its
/// kind (`PK_ROUTE`, `PK_TENANT_QUERY`, `PK_TENANT_PATH`), matched exactly in request lines: at
/// most `MAX_TENANT_PATS` of them.
pub fn token_patterns(
    pats: &[Vec<u8>],
    tenant: &[(Vec<u8>, u8)],
) -> Result<ScanTables, EnforceError> {
    if tenant.len() > MAX_TENANT_PATS as usize {
        return Err(EnforceError::TooManyPatterns {
            n: tenant.len(),
            max: MAX_TENANT_PATS,
        });
    }
    if pats.len() > MAX_TOKEN_PATS as usize {
        return Err(EnforceError::TooManyPatterns {
            n: pats.len(),
            max: MAX_TOKEN_PATS,
        });
    }
    let mut shaped: Vec<(Vec<u8>, bool)> = Vec::with_capacity(pats.len());
    for (index, p) in pats.iter().enumerate() {
        if p.is_empty() || p.len() > TOKEN_PAT_LEN {
            return Err(EnforceError::BadPattern {
                index,
                pattern: String::from_utf8_lossy(p).into_owned(),
                len: p.len(),
                max: TOKEN_PAT_LEN,
            });
        }
        shaped.push(shape_pattern(p));
    }
    for (index, (p, _)) in tenant.iter().enumerate() {
        if p.is_empty() || p.len() > TOKEN_PAT_LEN {
            return Err(EnforceError::BadPattern {
                index: pats.len() + index,
                pattern: String::from_utf8_lossy(p).into_owned(),
                len: p.len(),
                max: TOKEN_PAT_LEN,
            });
        }
    }
    let compiled: Vec<Pattern> = shaped
        .iter()
        .map(|(b, any_case)| Pattern {
            bytes: b,
            any_case: *any_case,
            kind: PK_TOKEN,
        })
        .chain(tenant.iter().map(|(b, kind)| Pattern {
            bytes: b,
            any_case: false,
            kind: *kind,
        }))
        .collect();
    ScanTables::build(&compiled).map_err(|e| match e {
        TablesError::TooLong { bytes, max } => EnforceError::PatternsTooLong { bytes, max },
        TablesError::Empty { index } => EnforceError::BadPattern {
            index,
            pattern: String::new(),
            len: 0,
            max: TOKEN_PAT_LEN,
        },
    })
}

/// A configured pattern as the kernel matches it, and whether in any case (see
/// [`token_patterns`]).
fn shape_pattern(p: &[u8]) -> (Vec<u8>, bool) {
    let trimmed: Vec<u8> = {
        let mut v = p.to_vec();
        while v.len() > 1 && v.last() == Some(&b' ') {
            v.pop();
        }
        v
    };
    if p.eq_ignore_ascii_case(b"bearer ") {
        // The scheme, then any spacing or a line fold (Apache joins `Bearer\r\n <token>`).
        return (b"bearer".to_vec(), true);
    }
    if trimmed.last() == Some(&b':') && trimmed.len() > 1 && p.ends_with(b": ") {
        let mut v = vec![b'\n'];
        v.extend_from_slice(&trimmed);
        return (v, true);
    }
    (trimmed, false)
}

pub(crate) fn table_full(t: &Tuple) -> EnforceError {
    EnforceError::TableFull {
        max: MAX_BLOCKED_CONNS,
        local: t.local,
        peer: t.peer,
    }
}

/// The mount point of the cgroup v2 hierarchy's root: `/sys/fs/cgroup/unified` on hybrid
/// hosts, `/sys/fs/cgroup` on unified ones.
pub fn cgroup2_root() -> Result<PathBuf, EnforceError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if let Some(p) = cgroup2_root_in(&text) {
        return Ok(p);
    }
    // No procfs: the usual places, if they are cgroup2 mounts.
    for p in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        if Path::new(p).join("cgroup.controllers").exists() {
            return Ok(PathBuf::from(p));
        }
    }
    Err(EnforceError::NoCgroup2)
}

/// The first cgroup2 mount of the hierarchy's root in a mountinfo text (proc_pid_mountinfo(5):
/// `id parent major:minor root mountpoint options [optional...] - fstype source superoptions`).
fn cgroup2_root_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        if post.split(' ').next()? != "cgroup2" {
            return None;
        }
        let mut f = pre.split(' ');
        let root = f.nth(3)?;
        let mount_point = f.next()?;
        (root == "/").then(|| PathBuf::from(unescape_mount(mount_point)))
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
pub(crate) fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1] <= b'3'
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------------
// SOCK_DESTROY over NETLINK_SOCK_DIAG (linux/sock_diag.h, linux/inet_diag.h).
//
// The kernel looks a SOCK_DESTROY request's 4-tuple up the way it routes an incoming segment:
// when no connection has it any more, the server's LISTENING socket on that port matches, and
// destroying that would take the whole server down. So `destroy` first asks for the socket
// (SOCK_DIAG_BY_FAMILY, same lookup), checks that the answer is that very connection, and then
// destroys it by its cookie, which no other socket (the listener included) can match.
// ---------------------------------------------------------------------------------------------
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_HDR_LEN: usize = 16;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, then `inet_diag_sockid`.
const INET_DIAG_REQ_V2_LEN: usize = 8 + 48;
const REQ_MSG_LEN: usize = NLMSG_HDR_LEN + INET_DIAG_REQ_V2_LEN;
/// `struct inet_diag_msg`: family, state, timer, retrans, `inet_diag_sockid`, then 5 u32.
const INET_DIAG_MSG_LEN: usize = 4 + 48 + 20;
const IPPROTO_TCP: u8 = 6;
const TCP_LISTEN: u8 = 10;
/// `idiag_states`: every TCP state.
const ALL_STATES: u32 = u32::MAX;
/// `INET_DIAG_NOCOOKIE`: match by the 4-tuple alone.
const NO_COOKIE: [u8; 8] = [0xff; 8];
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

static SEQ: AtomicU32 = AtomicU32::new(1);

/// An `inet_diag_req_v2` message of type `ty` for the TCP connection whose local end is `local`
/// (both ends already normalised and of one family).
fn encode_req(
    ty: u16,
    flags: u16,
    local: SocketAddr,
    peer: SocketAddr,
    seq: u32,
    cookie: [u8; 8],
) -> [u8; REQ_MSG_LEN] {
    let mut m = [0u8; REQ_MSG_LEN];
    // struct nlmsghdr (host byte order); nlmsg_pid 0 is the kernel.
    m[0..4].copy_from_slice(&(REQ_MSG_LEN as u32).to_ne_bytes());
    m[4..6].copy_from_slice(&ty.to_ne_bytes());
    m[6..8].copy_from_slice(&flags.to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    // struct inet_diag_req_v2
    let r = &mut m[NLMSG_HDR_LEN..];
    r[0] = if local.is_ipv4() { AF_INET } else { AF_INET6 } as u8;
    r[1] = IPPROTO_TCP;
    r[4..8].copy_from_slice(&ALL_STATES.to_ne_bytes());
    // struct inet_diag_sockid: ports and addresses in network byte order; the cookie is opaque.
    let id = &mut r[8..];
    id[0..2].copy_from_slice(&local.port().to_be_bytes());
    id[2..4].copy_from_slice(&peer.port().to_be_bytes());
    id[4..20].copy_from_slice(&addr_bytes(&local));
    id[20..36].copy_from_slice(&addr_bytes(&peer));
    let ifindex = match local {
        SocketAddr::V6(v6) => v6.scope_id(),
        SocketAddr::V4(_) => 0,
    };
    id[36..40].copy_from_slice(&ifindex.to_ne_bytes());
    id[40..48].copy_from_slice(&cookie);
    m
}

fn encode_query(local: SocketAddr, peer: SocketAddr, seq: u32) -> [u8; REQ_MSG_LEN] {
    encode_req(
        SOCK_DIAG_BY_FAMILY,
        libc::NLM_F_REQUEST as u16,
        local,
        peer,
        seq,
        NO_COOKIE,
    )
}

fn encode_destroy(
    local: SocketAddr,
    peer: SocketAddr,
    seq: u32,
    cookie: [u8; 8],
) -> [u8; REQ_MSG_LEN] {
    encode_req(
        SOCK_DESTROY,
        (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
        local,
        peer,
        seq,
        cookie,
    )
}

/// The socket the kernel found for a SOCK_DIAG_BY_FAMILY request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DiagSock {
    state: u8,
    /// Normalised (IPv4-mapped read as IPv4).
    local: SocketAddr,
    peer: SocketAddr,
    cookie: [u8; 8],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    /// NLMSG_ERROR: 0 for an acknowledgement, else the errno.
    Ack(i32),
    Sock(DiagSock),
}

fn parse_diag_msg(b: &[u8]) -> Result<DiagSock, EnforceError> {
    if b.len() < INET_DIAG_MSG_LEN {
        return Err(EnforceError::BadReply("inet_diag_msg is too short"));
    }
    let id = &b[4..52];
    let sport = u16::from_be_bytes([id[0], id[1]]);
    let dport = u16::from_be_bytes([id[2], id[3]]);
    let addr = |a: &[u8], port| -> Result<SocketAddr, EnforceError> {
        let ip: IpAddr = match b[0] as u16 {
            AF_INET => IpAddr::from(<[u8; 4]>::try_from(&a[..4]).expect("4 bytes")),
            AF_INET6 => IpAddr::from(<[u8; 16]>::try_from(a).expect("16 bytes")),
            _ => return Err(EnforceError::BadReply("inet_diag_msg of an unknown family")),
        };
        Ok(normalise(SocketAddr::new(ip, port)))
    };
    Ok(DiagSock {
        state: b[1],
        local: addr(&id[4..20], sport)?,
        peer: addr(&id[20..36], dport)?,
        cookie: id[40..48].try_into().expect("8 bytes"),
    })
}

/// Looks through one datagram of netlink messages for the answer to `seq`; `None` when it is
/// not in this datagram.
fn parse_reply(buf: &[u8], seq: u32) -> Result<Option<Reply>, EnforceError> {
    let mut off = 0;
    while off + NLMSG_HDR_LEN <= buf.len() {
        let h = &buf[off..];
        let len = u32::from_ne_bytes(h[0..4].try_into().expect("4 bytes")) as usize;
        let ty = u16::from_ne_bytes(h[4..6].try_into().expect("2 bytes"));
        let mseq = u32::from_ne_bytes(h[8..12].try_into().expect("4 bytes"));
        if len < NLMSG_HDR_LEN || off + len > buf.len() {
            return Err(EnforceError::BadReply(
                "a message length runs past the datagram",
            ));
        }
        if mseq == seq {
            let body = &h[NLMSG_HDR_LEN..len];
            if ty == libc::NLMSG_ERROR as u16 {
                let Some(code) = body.get(..4) else {
                    return Err(EnforceError::BadReply("NLMSG_ERROR without an error code"));
                };
                let err = i32::from_ne_bytes(code.try_into().expect("4 bytes"));
                return Ok(Some(Reply::Ack(-err)));
            }
            if ty == SOCK_DIAG_BY_FAMILY {
                return parse_diag_msg(body).map(|s| Some(Reply::Sock(s)));
            }
        }
        off += (len + 3) & !3;
    }
    Ok(None)
}

fn errno_to_result(errno: i32, local: SocketAddr, peer: SocketAddr) -> Result<(), EnforceError> {
    match errno {
        0 => Ok(()),
        libc::ENOENT => Err(EnforceError::NoSuchConnection { local, peer }),
        libc::EOPNOTSUPP => Err(EnforceError::NotSupported { local, peer }),
        libc::EPERM | libc::EACCES => Err(EnforceError::NotPermitted { local, peer }),
        e => Err(EnforceError::Kernel {
            local,
            peer,
            source: io::Error::from_raw_os_error(e),
        }),
    }
}

/// Whether the socket the kernel found is the connection asked for (and not, say, the
/// listener the lookup falls back to).
fn is_the_connection(s: &DiagSock, local: SocketAddr, peer: SocketAddr) -> bool {
    s.state != TCP_LISTEN && s.local == local && s.peer == peer
}

/// A NETLINK_SOCK_DIAG socket that gives up on an answer after `REPLY_TIMEOUT`.
struct DiagSocket {
    fd: OwnedFd,
    local: SocketAddr,
    peer: SocketAddr,
}

impl DiagSocket {
    fn open(local: SocketAddr, peer: SocketAddr) -> Result<DiagSocket, EnforceError> {
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(EnforceError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: REPLY_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: setsockopt with a valid timeval and its size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(EnforceError::Socket(io::Error::last_os_error()));
        }
        Ok(DiagSocket { fd, local, peer })
    }

    /// Sends `msg` (whose sequence number is `seq`) to the kernel and returns its answer.
    fn ask(&self, msg: &[u8], seq: u32) -> Result<Reply, EnforceError> {
        let (local, peer) = (self.local, self.peer);
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: sendto with a buffer and an address that outlive the call, and their sizes.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(EnforceError::Send {
                local,
                peer,
                source: io::Error::last_os_error(),
            });
        }
        let mut buf = [0u8; 8192];
        loop {
            // SAFETY: recv into a buffer we own, bounded by its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(EnforceError::Recv {
                    local,
                    peer,
                    source: e,
                });
            }
            if n == 0 {
                return Err(EnforceError::BadReply(
                    "the socket closed without an answer",
                ));
            }
            if let Some(r) = parse_reply(&buf[..n as usize], seq)? {
                return Ok(r);
            }
        }
    }
}

/// Resets the TCP connection whose local end is `local` and remote end `peer`, as this host sees
/// it (for a server: its own address and the client's). The kernel aborts the socket (its owner
/// gets ECONNABORTED) and sends the peer a reset. IPv4-mapped IPv6 addresses are read as IPv4.
/// Only that connection is touched: a tuple that is gone gives `NoSuchConnection`, never the
/// server's listener. Needs CAP_NET_ADMIN.
pub fn destroy(local: SocketAddr, peer: SocketAddr) -> Result<(), EnforceError> {
    let (l, p) = same_family(local, peer)?;
    let sock = DiagSocket::open(local, peer)?;
    let seq = SEQ.fetch_add(2, Ordering::Relaxed);
    let found = match sock.ask(&encode_query(l, p, seq), seq)? {
        Reply::Sock(s) => s,
        Reply::Ack(0) => {
            return Err(EnforceError::BadReply(
                "an acknowledgement instead of the socket",
            ))
        }
        Reply::Ack(errno) => return errno_to_result(errno, local, peer),
    };
    if !is_the_connection(&found, l, p) {
        return Err(EnforceError::NoSuchConnection { local, peer });
    }
    let seq = seq.wrapping_add(1);
    match sock.ask(&encode_destroy(l, p, seq, found.cookie), seq)? {
        Reply::Ack(errno) => errno_to_result(errno, local, peer),
        Reply::Sock(_) => Err(EnforceError::BadReply(
            "a socket instead of an acknowledgement",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracer_common::scan::{PK_ROUTE, PK_TENANT_QUERY};

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn destroy_request_ipv4() {
        let cookie = [1, 2, 3, 4, 5, 6, 7, 8];
        let m = encode_destroy(sa("10.0.0.1:443"), sa("192.168.7.9:51000"), 7, cookie);
        let mut want = Vec::new();
        want.extend(72u32.to_ne_bytes()); // nlmsg_len
        want.extend(21u16.to_ne_bytes()); // SOCK_DESTROY
        want.extend(5u16.to_ne_bytes()); // NLM_F_REQUEST | NLM_F_ACK
        want.extend(7u32.to_ne_bytes()); // seq
        want.extend(0u32.to_ne_bytes()); // pid: the kernel
        want.extend([2, 6, 0, 0]); // AF_INET, IPPROTO_TCP, ext, pad
        want.extend(u32::MAX.to_ne_bytes()); // all states
        want.extend([0x01, 0xbb]); // sport 443, big endian
        want.extend([0xc7, 0x38]); // dport 51000
        want.extend([10, 0, 0, 1]);
        want.extend([0; 12]);
        want.extend([192, 168, 7, 9]);
        want.extend([0; 12]);
        want.extend(0u32.to_ne_bytes()); // ifindex
        want.extend(cookie); // the socket found by the query, as the kernel gave it
        assert_eq!(m.to_vec(), want);
    }

    #[test]
    fn query_request_ipv6_with_scope() {
        let m = encode_query(sa("[fe80::1%3]:8080"), sa("[2001:db8::2]:40000"), 1);
        assert_eq!(m.len(), 72);
        assert_eq!(&m[4..6], &20u16.to_ne_bytes()); // SOCK_DIAG_BY_FAMILY
        assert_eq!(&m[6..8], &1u16.to_ne_bytes()); // NLM_F_REQUEST: one socket, no dump
        assert_eq!(m[16], 10); // AF_INET6
        assert_eq!(m[17], 6);
        assert_eq!(&m[24..26], &8080u16.to_be_bytes());
        assert_eq!(&m[26..28], &40000u16.to_be_bytes());
        assert_eq!(
            &m[28..44],
            &"fe80::1".parse::<std::net::Ipv6Addr>().unwrap().octets()
        );
        assert_eq!(
            &m[44..60],
            &"2001:db8::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        assert_eq!(&m[60..64], &3u32.to_ne_bytes());
        assert_eq!(&m[64..72], &[0xff; 8]); // INET_DIAG_NOCOOKIE
    }

    /// An `inet_diag_msg` answer as the kernel sends it.
    fn diag_msg(
        seq: u32,
        family: u8,
        state: u8,
        src: &[u8],
        sport: u16,
        dst: &[u8],
        dport: u16,
    ) -> Vec<u8> {
        let mut body = vec![family, state, 0, 0];
        body.extend(sport.to_be_bytes());
        body.extend(dport.to_be_bytes());
        let mut a = [0u8; 16];
        a[..src.len()].copy_from_slice(src);
        body.extend(a);
        let mut a = [0u8; 16];
        a[..dst.len()].copy_from_slice(dst);
        body.extend(a);
        body.extend(0u32.to_ne_bytes()); // if
        body.extend([9, 9, 9, 9, 0, 0, 0, 1]); // cookie
        body.extend([0u8; 20]); // expires, rqueue, wqueue, uid, inode
        let mut m = Vec::new();
        m.extend(((16 + body.len()) as u32).to_ne_bytes());
        m.extend(20u16.to_ne_bytes());
        m.extend(0u16.to_ne_bytes());
        m.extend(seq.to_ne_bytes());
        m.extend(0u32.to_ne_bytes());
        m.extend(body);
        m
    }

    #[test]
    fn the_found_socket_must_be_the_connection() {
        let (l, p) = (sa("127.0.0.1:8080"), sa("127.0.0.1:40000"));
        let est = diag_msg(3, 2, 1, &[127, 0, 0, 1], 8080, &[127, 0, 0, 1], 40000);
        let Some(Reply::Sock(s)) = parse_reply(&est, 3).unwrap() else {
            panic!("no socket parsed")
        };
        assert_eq!((s.state, s.local, s.peer), (1, l, p));
        assert_eq!(s.cookie, [9, 9, 9, 9, 0, 0, 0, 1]);
        assert!(is_the_connection(&s, l, p));
        // The connection is gone and the lookup fell back to the server's listener.
        let listen = diag_msg(3, 2, 10, &[127, 0, 0, 1], 8080, &[0; 4], 0);
        let Some(Reply::Sock(s)) = parse_reply(&listen, 3).unwrap() else {
            panic!("no socket parsed")
        };
        assert!(!is_the_connection(&s, l, p));
        // A dual-stack socket answers in IPv6 with mapped addresses.
        let mapped: Vec<u8> = [0u8; 10]
            .into_iter()
            .chain([0xff, 0xff, 127, 0, 0, 1])
            .collect();
        let m6 = diag_msg(3, 10, 1, &mapped, 8080, &mapped, 40000);
        let Some(Reply::Sock(s)) = parse_reply(&m6, 3).unwrap() else {
            panic!("no socket parsed")
        };
        assert!(is_the_connection(&s, l, p));
        assert!(parse_reply(&est[..60], 3).is_err());
    }

    #[test]
    fn mapped_addresses_are_ipv4_and_families_must_agree() {
        assert_eq!(normalise(sa("[::ffff:127.0.0.1]:80")), sa("127.0.0.1:80"));
        assert_eq!(normalise(sa("[::1]:80")), sa("[::1]:80"));
        let (l, p) = same_family(sa("[::ffff:10.1.2.3]:80"), sa("10.9.9.9:5000")).unwrap();
        assert_eq!((l, p), (sa("10.1.2.3:80"), sa("10.9.9.9:5000")));
        assert!(matches!(
            same_family(sa("[::1]:80"), sa("10.9.9.9:5000")),
            Err(EnforceError::MixedFamilies { .. })
        ));
        assert!(matches!(
            destroy(sa("[::1]:80"), sa("10.9.9.9:5000")),
            Err(EnforceError::MixedFamilies { .. })
        ));
    }

    #[test]
    fn block_keys() {
        let k = block_key(&Tuple {
            local: sa("[::ffff:127.0.0.1]:8080"),
            peer: sa("[::ffff:127.0.0.2]:40000"),
        })
        .unwrap();
        assert_eq!(k.family, AF_INET);
        assert_eq!((k.local_port, k.remote_port), (8080, 40000));
        assert_eq!(k.local_addr[..4], [127, 0, 0, 1]);
        assert_eq!(k.remote_addr[..4], [127, 0, 0, 2]);
        assert!(k.local_addr[4..]
            .iter()
            .chain(&k.remote_addr[4..])
            .all(|b| *b == 0));
        let plain = block_key(&Tuple {
            local: sa("127.0.0.1:8080"),
            peer: sa("127.0.0.2:40000"),
        })
        .unwrap();
        assert_eq!(k, plain);
        let k6 = block_key(&Tuple {
            local: sa("[::1]:443"),
            peer: sa("[2001:db8::7]:1234"),
        })
        .unwrap();
        assert_eq!(k6.family, AF_INET6);
        assert_eq!(k6.local_addr, std::net::Ipv6Addr::LOCALHOST.octets());
    }

    fn ack(seq: u32, err: i32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend(36u32.to_ne_bytes());
        m.extend((libc::NLMSG_ERROR as u16).to_ne_bytes());
        m.extend(0u16.to_ne_bytes());
        m.extend(seq.to_ne_bytes());
        m.extend(1234u32.to_ne_bytes());
        m.extend(err.to_ne_bytes());
        m.extend([0u8; 16]); // the request's header
        m
    }

    #[test]
    fn acks_map_to_results() {
        let l = sa("127.0.0.1:1");
        let p = sa("127.0.0.1:2");
        assert_eq!(parse_reply(&ack(9, 0), 9).unwrap(), Some(Reply::Ack(0)));
        assert_eq!(
            parse_reply(&ack(9, -libc::ENOENT), 9).unwrap(),
            Some(Reply::Ack(libc::ENOENT))
        );
        // Another request's answer is skipped; ours follows in the same datagram.
        let mut two = ack(8, 0);
        two.extend(ack(9, -libc::EOPNOTSUPP));
        assert_eq!(
            parse_reply(&two, 9).unwrap(),
            Some(Reply::Ack(libc::EOPNOTSUPP))
        );
        assert_eq!(parse_reply(&ack(8, 0), 9).unwrap(), None);
        assert!(parse_reply(&ack(9, 0)[..20], 9).is_err());
        assert!(errno_to_result(0, l, p).is_ok());
        assert!(matches!(
            errno_to_result(libc::ENOENT, l, p),
            Err(EnforceError::NoSuchConnection { .. })
        ));
        assert!(matches!(
            errno_to_result(libc::EOPNOTSUPP, l, p),
            Err(EnforceError::NotSupported { .. })
        ));
        assert!(matches!(
            errno_to_result(libc::EPERM, l, p),
            Err(EnforceError::NotPermitted { .. })
        ));
        let e = errno_to_result(libc::EBUSY, l, p).unwrap_err().to_string();
        assert!(e.contains("127.0.0.1:1 <-> 127.0.0.1:2"), "{e}");
    }

    #[test]
    fn token_pattern_limits() {
        use tracer_common::scan::{BUILTIN_PAT_BYTES, PAT_BITS};
        let pats: Vec<Vec<u8>> = vec![
            b"skolsid=".to_vec(),
            b"\"username\":\"".to_vec(),
            b"Bearer ".to_vec(),
            b"X-Session: ".to_vec(),
        ];
        let t = token_patterns(&pats, &[]).unwrap();
        // skolsid= (8), "username":" (12), bearer (6), \nX-Session: (11), then built-ins.
        let used = 8 + 12 + 6 + 11 + BUILTIN_PAT_BYTES;
        let bits = |w: [u64; 3]| w.iter().map(|x| x.count_ones()).sum::<u32>();
        assert_eq!(bits(t.start), 6);
        assert_eq!(bits(t.end), 6);
        // Cookie names exactly; `Bearer` and header names in any case.
        // (`k` is in no pattern matched in any case.)
        assert_eq!(t.mask[b'K' as usize], [0, 0, 0]);
        assert_ne!(t.mask[b'k' as usize], [0, 0, 0]);
        assert_ne!(t.mask[b'B' as usize], [0, 0, 0]);
        assert_eq!(t.mask[b'B' as usize], t.mask[b'b' as usize]);
        assert_eq!(t.mask[b'x' as usize], t.mask[b'X' as usize]);
        assert!(used <= PAT_BITS);
        assert!(token_patterns(&[], &[]).is_ok());
        let nine: Vec<Vec<u8>> = (0..9).map(|i| vec![b'a' + i]).collect();
        assert!(matches!(
            token_patterns(&nine, &[]),
            Err(EnforceError::TooManyPatterns { n: 9, max: 8 })
        ));
        let long = vec![b"ok=".to_vec(), vec![b'x'; 33]];
        let e = token_patterns(&long, &[]).unwrap_err();
        assert!(
            matches!(
                e,
                EnforceError::BadPattern {
                    index: 1,
                    len: 33,
                    ..
                }
            ),
            "{e}"
        );
        assert!(matches!(
            token_patterns(&[Vec::new()], &[]),
            Err(EnforceError::BadPattern { len: 0, .. })
        ));
        // Tenant patterns are matched exactly, and counted apart.
        let t = token_patterns(
            &pats,
            &[
                (b"/api/addressbook/persons".to_vec(), PK_ROUTE),
                (b"schoolId=".to_vec(), PK_TENANT_QUERY),
            ],
        )
        .unwrap();
        assert_eq!(bits(t.start), 8);
        assert_eq!(bits(t.end_route), 1);
        assert_eq!(bits(t.end_tq), 1);
        // (`p` is in no pattern matched in any case.)
        assert_eq!(t.mask[b'P' as usize], [0, 0, 0]);
        assert_ne!(t.mask[b'p' as usize], [0, 0, 0]);
        let nine: Vec<(Vec<u8>, u8)> = (0..9).map(|i| (vec![b'a' + i], PK_ROUTE)).collect();
        assert!(matches!(
            token_patterns(&pats, &nine),
            Err(EnforceError::TooManyPatterns { n: 9, max: 8 })
        ));
        // Together they must fit the matcher.
        let full: Vec<Vec<u8>> = (0..8).map(|i| vec![b'a' + i; 32]).collect();
        assert!(matches!(
            token_patterns(&full, &[]),
            Err(EnforceError::PatternsTooLong { bytes: 256, max }) if max == PAT_BITS - BUILTIN_PAT_BYTES
        ));
    }

    #[test]
    fn cgroup2_root_from_mountinfo() {
        let hybrid = "\
25 1 0:23 / /sys rw - sysfs sysfs rw
31 25 0:27 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
42 31 0:39 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
";
        assert_eq!(
            cgroup2_root_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified =
            "30 24 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            cgroup2_root_in(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        // A bind mount of a sub-cgroup is not the root; an escaped space is undone.
        let sub = "\
50 24 0:26 /system.slice /mnt/sub rw - cgroup2 cgroup2 rw
51 24 0:26 / /mnt/cg\\040root rw - cgroup2 cgroup2 rw
";
        assert_eq!(cgroup2_root_in(sub), Some(PathBuf::from("/mnt/cg root")));
        assert_eq!(
            cgroup2_root_in("25 1 0:23 / /sys rw - sysfs sysfs rw\n"),
            None
        );
    }
}
