//! The ABI shared by Spårbar's kernel programs and its agent: event layouts, event kinds, counter
//! indexes, map names and limits. Everything here is `#[repr(C)]`, fixed-width, explicitly padded,
//! and its size pinned at compile time, because both sides read the same bytes.
#![no_std]

use core::mem::size_of;

pub mod huff;
pub mod scan;
pub mod scan_h2;

// ---------------------------------------------------------------------------------------------
// Map names (at most 15 bytes: the kernel cuts longer names).
// ---------------------------------------------------------------------------------------------
pub const MAP_EVENTS: &str = "EVENTS";
pub const MAP_COUNTERS: &str = "COUNTERS";
pub const MAP_CONFIG: &str = "CONFIG";
pub const MAP_TARGET_TGIDS: &str = "TARGET_TGIDS";
pub const MAP_TARGET_COMMS: &str = "TARGET_COMMS";
pub const MAP_TARGET_CGRPS: &str = "TARGET_CGRPS";
pub const MAP_PLAIN_PORTS: &str = "PLAIN_PORTS";
pub const MAP_CONNS: &str = "CONNS";
pub const MAP_SSL_FDS: &str = "SSL_FDS";
pub const MAP_BLOCK_CONNS: &str = "BLOCK_CONNS";
pub const MAP_ENFORCE_ON: &str = "ENFORCE_ON";
pub const MAP_TOKEN_TABLES: &str = "TOKEN_TABLES";
pub const MAP_BLOCK_TOKENS: &str = "BLOCK_TOKENS";
pub const MAP_ENFORCE_TGIDS: &str = "ENFORCE_TGIDS";
pub const MAP_TOKEN_CTL: &str = "TOKEN_CTL";
pub const MAP_SESSION_TENANTS: &str = "SESSION_TENANTS";
pub const MAP_TOKEN_STATE: &str = "TOKEN_STATE";

// ---------------------------------------------------------------------------------------------
// Limits.
// ---------------------------------------------------------------------------------------------
/// Payload bytes carried by one data event. A larger read/write is split into several events.
pub const CHUNK_SIZE: usize = 16 * 1024;
/// Upper bound of events one read/write call may produce (bounded loop in the kernel). With
/// `CHUNK_SIZE` this caps one call at 16 MiB even when the configured cap is larger; iovec calls
/// with many small segments use one iteration per segment piece.
pub const MAX_CHUNKS_PER_CALL: u32 = 1024;
/// Default per-call capture cap (bytes); the config may lower or raise it up to
/// `CHUNK_SIZE * MAX_CHUNKS_PER_CALL`.
pub const DEFAULT_MAX_MESSAGE_BYTES: u32 = 256 * 1024;
/// iovec segments looked at per readv/writev/recvmsg/sendmsg call.
pub const MAX_IOV: u32 = 64;
pub const COMM_LEN: usize = 16;

// ---------------------------------------------------------------------------------------------
// Event kinds. Numbers are never reused.
// ---------------------------------------------------------------------------------------------
pub const KIND_DATA: u16 = 1;
pub const KIND_CONN_OPEN: u16 = 2;
pub const KIND_CONN_CLOSE: u16 = 3;
pub const KIND_HOLE: u16 = 4;
pub const KIND_PROC_EXEC: u16 = 5;
pub const KIND_PROC_EXIT: u16 = 6;
/// The kernel recognised a blocked token in a request an edge server read (`EnforceHitEvent`).
pub const KIND_ENFORCE_HIT: u16 = 7;

/// Every event starts with this header; the agent's decoder reads `kind` and `len` from the
/// first bytes of each ring-buffer record before it looks at anything else, so this struct must
/// stay first in every event and keep its layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    pub kind: u16,
    pub flags: u16,
    /// Bytes of this event that carry meaning (header + body + captured payload).
    pub len: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    pub pid_tgid: u64,
}
const _: () = assert!(size_of::<EventHeader>() == 24);

/// A connection as the kernel side names it. `gen` is unique per connection for the life of the
/// loaded programs, so a reused fd gets a new identity.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnId {
    pub tgid: u32,
    pub fd: u32,
    pub gen: u64,
}
const _: () = assert!(size_of::<ConnId>() == 16);

/// Direction of bytes relative to the traced process.
pub const DIR_IN: u8 = 0; // the process read them
pub const DIR_OUT: u8 = 1; // the process wrote them

/// Where the payload came from.
pub const SRC_SYSCALL: u8 = 0;
pub const SRC_TLS: u8 = 1;

/// `EventHeader::flags` of data and hole events.
pub const DATA_F_TLS: u16 = 1 << 0;
/// This call carried more than the cap; the bytes past `pos + cap_len` of the last chunk, up to
/// `msg_pos + msg_len`, were not captured (a hole event follows with the exact range).
pub const DATA_F_TRUNCATED: u16 = 1 << 1;
/// The connection's SSL* could not be mapped to a socket; the data is positioned relative to
/// the SSL object instead.
pub const DATA_F_SSL_UNMAPPED: u16 = 1 << 2;

/// One piece of a read or write. `pos` is the stream offset of `data[0]` in this direction.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DataEvent {
    pub hdr: EventHeader,
    pub conn: ConnId,
    pub pos: u64,
    /// Real length returned by the call this piece belongs to.
    pub msg_len: u32,
    /// Payload bytes that follow in `data`.
    pub cap_len: u32,
    pub dir: u8,
    pub src: u8,
    pub _pad: [u8; 6],
    pub data: [u8; CHUNK_SIZE],
}
/// Bytes of a `DataEvent` before `data`.
pub const DATA_HDR_LEN: usize = 64;
const _: () = assert!(size_of::<DataEvent>() == DATA_HDR_LEN + CHUNK_SIZE);

/// Why bytes of a stream were not captured (`HoleEvent::reason`).
pub const HOLE_CAP: u8 = 1;
pub const HOLE_READ_FAILED: u8 = 2;
pub const HOLE_RINGBUF_FULL: u8 = 3;
pub const HOLE_SENDFILE: u8 = 4;
pub const HOLE_TOO_MANY_CHUNKS: u8 = 5;

/// Bytes `[pos, pos + len)` in direction `dir` exist on the wire but were not captured.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HoleEvent {
    pub hdr: EventHeader,
    pub conn: ConnId,
    pub pos: u64,
    pub len: u64,
    pub dir: u8,
    pub reason: u8,
    pub _pad: [u8; 6],
}
const _: () = assert!(size_of::<HoleEvent>() == 64);

/// How the kernel side learned of a connection (`ConnOpenEvent::origin`).
pub const ORIGIN_ACCEPT: u8 = 1;
pub const ORIGIN_CONNECT: u8 = 2;
/// First seen in the middle of its life (opened before the agent started, or the accept/connect
/// was missed): positions start at the first byte seen.
pub const ORIGIN_MIDSTREAM: u8 = 3;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Addresses in network byte order; IPv4 in the first 4 bytes of the 16. Ports in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tuple {
    pub family: u16,
    pub local_port: u16,
    pub peer_port: u16,
    pub _pad: u16,
    pub local_addr: [u8; 16],
    pub peer_addr: [u8; 16],
}
const _: () = assert!(size_of::<Tuple>() == 40);

/// Sent once per connection before its first data event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnOpenEvent {
    pub hdr: EventHeader,
    pub conn: ConnId,
    pub tuple: Tuple,
    pub origin: u8,
    pub tls: u8,
    pub _pad: [u8; 6],
}
const _: () = assert!(size_of::<ConnOpenEvent>() == 88);

/// The traced process closed a connection that was announced with `ConnOpenEvent`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnCloseEvent {
    pub hdr: EventHeader,
    pub conn: ConnId,
    pub pos_in: u64,
    pub pos_out: u64,
}
const _: () = assert!(size_of::<ConnCloseEvent>() == 56);

/// A target process exec'd (kernel matched its comm) or a process leader exited.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcEvent {
    pub hdr: EventHeader,
    pub tgid: u32,
    pub _pad: u32,
    pub comm: [u8; COMM_LEN],
}
const _: () = assert!(size_of::<ProcEvent>() == 48);

// ---------------------------------------------------------------------------------------------
// Kernel counters: a per-CPU array indexed by these; the agent sums the CPUs. Never reuse a
// number; append new ones before `COUNTER_MAX` and raise it.
// ---------------------------------------------------------------------------------------------
pub const C_EVENTS_SENT: u32 = 0;
pub const C_BYTES_CAPTURED: u32 = 1;
pub const C_RINGBUF_FULL_EVENTS: u32 = 2;
pub const C_RINGBUF_FULL_BYTES: u32 = 3;
pub const C_CAP_TRUNCATED_CALLS: u32 = 4;
pub const C_CAP_TRUNCATED_BYTES: u32 = 5;
pub const C_READ_FAILED_EVENTS: u32 = 6;
pub const C_READ_FAILED_BYTES: u32 = 7;
pub const C_SSL_FD_UNKNOWN: u32 = 8;
pub const C_SSL_FD_INCONSISTENT: u32 = 9;
pub const C_SSL_FD_HEURISTIC: u32 = 10;
pub const C_CONN_TABLE_FULL: u32 = 11;
pub const C_TOO_MANY_CHUNKS_BYTES: u32 = 12;
pub const C_SENDFILE_BYTES: u32 = 13;
pub const C_CONN_ANNOUNCE_FAILED: u32 = 14;
pub const C_FD_REUSED: u32 = 15;
pub const C_SCRATCH_MISSING: u32 = 16;
pub const C_INFLIGHT_FULL: u32 = 17;
pub const C_TARGETS_FULL: u32 = 18;
pub const C_SSL_CALLS: u32 = 19;
pub const C_SYSCALLS_CAPTURED: u32 = 20;
/// Egress packets the enforcement program dropped because their connection is blocked. Named
/// `..._blocked_total`, not `..._dropped_total`: they are enforcement, not capture loss.
pub const C_ENFORCE_DROPPED: u32 = 21;
/// Requests in which the kernel recognised a blocked token (one per hit, whether or not it could
/// block the connection itself).
pub const C_REQUESTS_REFUSED: u32 = 22;
/// Hits whose connection the kernel could not block itself because its 4-tuple was not known
/// yet; the agent blocks it from the hit event.
pub const C_REFUSED_NO_TUPLE: u32 = 23;
/// Hits whose connection the kernel could not block because `BLOCK_CONNS` was full.
pub const C_REFUSED_TABLE_FULL: u32 = 24;
/// Reads scanned for blocked tokens.
pub const C_TOKEN_SCANS: u32 = 25;
/// Reads whose scan stopped at the loop budget before their end.
pub const C_TOKEN_SCAN_BUDGET: u32 = 26;
/// Reads that could not be scanned because copying the buffer failed.
pub const C_TOKEN_SCAN_FAILED: u32 = 27;
/// Request heads longer than `scan::SCAN_HEAD_MAX`: their connection is no longer scanned.
pub const C_TOKEN_SCAN_HEAD_BOUND: u32 = 28;
/// Request bodies longer than `scan::SCAN_BODY_MAX`: the rest of the body is not scanned.
pub const C_TOKEN_SCAN_BODY_BOUND: u32 = 29;
pub const COUNTER_MAX: u32 = 30;

/// Names the agent reports the kernel counters under (`<noun>_<verb>_total` style, reason last).
pub const COUNTER_NAMES: [&str; COUNTER_MAX as usize] = [
    "kernel_events_sent_total",
    "kernel_bytes_captured_total",
    "kernel_events_dropped_total{reason=\"ringbuf_full\"}",
    "kernel_bytes_dropped_total{reason=\"ringbuf_full\"}",
    "kernel_calls_truncated_total{reason=\"cap\"}",
    "kernel_bytes_dropped_total{reason=\"cap\"}",
    "kernel_events_dropped_total{reason=\"read_user_failed\"}",
    "kernel_bytes_dropped_total{reason=\"read_user_failed\"}",
    "kernel_ssl_fd_mapping_total{result=\"unknown\"}",
    "kernel_ssl_fd_mapping_total{result=\"inconsistent\"}",
    "kernel_ssl_fd_mapping_total{result=\"heuristic\"}",
    "kernel_connections_dropped_total{reason=\"table_full\"}",
    "kernel_bytes_dropped_total{reason=\"too_many_chunks\"}",
    "kernel_bytes_uncaptured_total{reason=\"sendfile\"}",
    "kernel_events_dropped_total{reason=\"conn_announce_failed\"}",
    "kernel_fd_reused_without_close_total",
    "kernel_events_dropped_total{reason=\"scratch_missing\"}",
    "kernel_calls_dropped_total{reason=\"inflight_table_full\"}",
    "kernel_targets_dropped_total{reason=\"table_full\"}",
    "kernel_ssl_calls_total",
    "kernel_syscalls_captured_total",
    "kernel_packets_blocked_total",
    "kernel_requests_refused_total",
    "kernel_refusals_unenforced_total{reason=\"tuple_unknown\"}",
    "kernel_refusals_unenforced_total{reason=\"block_table_full\"}",
    "kernel_token_scans_total",
    "kernel_token_scans_truncated_total{reason=\"loop_budget\"}",
    "kernel_token_scans_failed_total{reason=\"read_user_failed\"}",
    "kernel_token_scans_truncated_total{reason=\"head_bound\"}",
    "kernel_token_scans_truncated_total{reason=\"body_bound\"}",
];

/// Counters that mean something was lost; the agent reports them as drops.
pub const LOSS_COUNTERS: [u32; 9] = [
    C_RINGBUF_FULL_EVENTS,
    C_RINGBUF_FULL_BYTES,
    C_CAP_TRUNCATED_BYTES,
    C_READ_FAILED_EVENTS,
    C_READ_FAILED_BYTES,
    C_CONN_TABLE_FULL,
    C_TOO_MANY_CHUNKS_BYTES,
    C_CONN_ANNOUNCE_FAILED,
    C_SCRATCH_MISSING,
];

// ---------------------------------------------------------------------------------------------
// Configuration written by the agent before attaching.
// ---------------------------------------------------------------------------------------------
pub const CFG_F_CGROUP_TARGETS: u32 = 1 << 0;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelConfig {
    /// The agent's own tgid: never traced.
    pub agent_tgid: u32,
    /// Per-call capture cap in bytes.
    pub max_message_bytes: u32,
    pub flags: u32,
    /// Offsets of `skc_v6_daddr` / `skc_v6_rcv_saddr` in `struct sock_common`, read from BTF.
    pub off_v6_daddr: u16,
    pub off_v6_rcv_saddr: u16,
    /// Events are written without waking the reader (it polls on a short timer) until this
    /// many bytes wait in the ring buffer; then every write wakes it.
    pub wakeup_bytes: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<KernelConfig>() == 24);

/// How often the agent polls the ring buffer when the kernel did not wake it.
pub const POLL_INTERVAL_MS: u64 = 5;

/// Key of the connection table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub tgid: u32,
    pub fd: u32,
}
const _: () = assert!(size_of::<ConnKey>() == 8);

/// Value of the connection table: the kernel keeps it, the agent only prunes entries of dead
/// processes, so both must agree on its size.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnState {
    pub gen: u64,
    pub pos_in: u64,
    pub pos_out: u64,
    pub tuple: Tuple,
    /// `CONN_F_*` flags of the kernel programs.
    pub flags: u32,
    pub origin: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<ConnState>() == 72);

/// Key of the SSL* → fd cache.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SslKey {
    pub tgid: u32,
    pub _pad: u32,
    pub ssl: u64,
}
const _: () = assert!(size_of::<SslKey>() == 16);

/// What a target entry (TARGET_TGIDS value) came from.
pub const TARGET_FROM_AGENT: u32 = 1;
pub const TARGET_FROM_FORK: u32 = 2;
pub const TARGET_FROM_EXEC: u32 = 3;

// ---------------------------------------------------------------------------------------------
// Enforcement: connections whose egress packets the kernel drops.
// ---------------------------------------------------------------------------------------------
/// Entries of the blocked-connection table (`BLOCK_CONNS`).
pub const MAX_BLOCKED_CONNS: u32 = 16384;

/// Key of `BLOCK_CONNS`: a TCP connection as its own host sends it (local = the packet's source).
/// Addresses in network byte order, IPv4 in the first 4 bytes of the 16 with the rest zero;
/// ports in host order. IPv4 traffic of dual-stack (IPv4-mapped IPv6) sockets is keyed as plain
/// IPv4, because the kernel program reads the addresses from the IPv4 header on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BlockKey {
    pub family: u16,
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: u16,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
}
const _: () = assert!(size_of::<BlockKey>() == 40);

/// Value of `BLOCK_CONNS`: reserved for flags, written as 0 by the agent.
pub type BlockValue = u64;
/// `BlockValue` flag: the kernel blocked this connection itself, on a token hit
/// (`KIND_ENFORCE_HIT`); the agent owns the entry from then on like one it wrote.
pub const BLOCK_F_TOKEN: BlockValue = 1 << 0;
/// `BlockValue` flag: the kernel holds this connection's answers until the agent has judged
/// its request (a request of a session the kernel does not know yet names a tenant), at most
/// until the deadline in the value's other bits (`bpf_ktime_get_ns`, low byte cleared): then
/// they pass again. The agent releases it (removes the entry) or blocks it (overwrites it).
pub const BLOCK_F_HOLD: BlockValue = 1 << 1;
/// How long the kernel holds a connection's answers at most when the agent does not judge.
pub const HOLD_NS: u64 = 1_000_000_000;
/// The deadline of a `BLOCK_F_HOLD` value.
pub const fn hold_deadline(v: BlockValue) -> u64 {
    v & !0xff
}

/// `ENFORCE_ON[0]`: non-zero while `BLOCK_CONNS` holds at least one entry; while it is zero the
/// enforcement program passes every packet after one array lookup.
pub const ENFORCE_ON_IDX: u32 = 0;

// ---------------------------------------------------------------------------------------------
// Enforcement: session tokens recognised in the kernel when a server reads a request.
// ---------------------------------------------------------------------------------------------
/// Bytes of a token (cookie value, bearer token, login name) that go into its hash.
pub const MAX_TOKEN_LEN: usize = 256;

/// Bytes that end a token in a request head (see [`scan::is_end`], which the kernel uses).
pub const fn is_token_end(b: u8) -> bool {
    scan::is_end(b, true)
}

/// The hash the kernel and the agent both give a token: FNV-1a 64 over at most
/// [`MAX_TOKEN_LEN`] bytes, its offset basis mixed with the agent's random `seed` so the hashes
/// are useless outside one run. Never stored; kernel maps and memory only.
pub const fn token_hash(seed: u64, bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    let mut i = 0;
    while i < bytes.len() && i < MAX_TOKEN_LEN {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    h
}

/// The hash the kernel gives a tenant value in a request line (`scan::PK_TENANT_*`), and the
/// agent the tenant of a session: [`token_hash`] of `bytes` with its leading `0`s, spaces and
/// tabs skipped, so `02` and `2` (equal as the integers platforms compare them) and a value
/// with escaped blanks before it hash alike.
pub const fn tenant_hash(seed: u64, bytes: &[u8]) -> u64 {
    let mut i = 0;
    while i < bytes.len() && (bytes[i] == b'0' || bytes[i] == b' ' || bytes[i] == b'\t') {
        i += 1;
    }
    let mut h: u64 = token_hash_start(seed);
    let mut n = 0;
    while i < bytes.len() && n < MAX_TOKEN_LEN {
        h = token_hash_byte(h, bytes[i]);
        i += 1;
        n += 1;
    }
    h
}

/// [`token_hash`] one byte at a time, as the kernel computes it while it reads a token:
/// `token_hash(s, b) == b.iter().fold(token_hash_start(s), |h, x| token_hash_byte(h, *x))` for
/// `b` of at most [`MAX_TOKEN_LEN`] bytes.
pub const fn token_hash_start(seed: u64) -> u64 {
    0xcbf2_9ce4_8422_2325 ^ seed
}

/// See [`token_hash_start`].
pub const fn token_hash_byte(h: u64, b: u8) -> u64 {
    (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
}

const _: () = {
    let b = b"blocked-cookie";
    let mut h = token_hash_start(0x1234_5678_9abc_def0);
    let mut i = 0;
    while i < b.len() {
        h = token_hash_byte(h, b[i]);
        i += 1;
    }
    assert!(h == token_hash(0x1234_5678_9abc_def0, b));
    // FNV-1a 64 of "a" with seed 0: the published test vector.
    assert!(token_hash(0, b"a") == 0xaf63_dc4c_8601_ec8c);
};

/// Patterns the agent may configure (session cookies, `Bearer`, session headers, login fields);
/// compiled into `TOKEN_TABLES` (see [`scan::ScanTables`]).
pub const MAX_TOKEN_PATS: u32 = 8;
/// Bytes of one configured pattern.
pub const TOKEN_PAT_LEN: usize = 32;
/// Entries of the blocked-token table (`BLOCK_TOKENS`).
pub const MAX_BLOCKED_TOKENS: u32 = 16384;
/// Entries of the edge-process table (`ENFORCE_TGIDS`).
pub const MAX_ENFORCE_TGIDS: u32 = 16384;
/// Connections whose scan state the kernel keeps between reads (`TOKEN_STATE`, LRU).
pub const MAX_SCAN_CONNS: u32 = 16384;

/// `TOKEN_CTL[0]`, written by the agent: the seed of [`token_hash`] and whether to scan at all.
/// While `on` is zero (no token blocked) a read costs the kernel this one array lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenCtl {
    pub seed: u64,
    /// Non-zero while `BLOCK_TOKENS` holds at least one entry, or sessions are checked for
    /// cross-tenant attempts (`SESSION_TENANTS`).
    pub on: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<TokenCtl>() == 16);

/// Entries of the session-tenant table (`SESSION_TENANTS`, LRU): the sessions whose requests
/// the kernel checks for cross-tenant attempts.
pub const MAX_SESSION_TENANTS: u32 = 65536;
/// Route and tenant-parameter patterns the agent may configure (`scan::PK_ROUTE`,
/// `PK_TENANT_*`), besides [`MAX_TOKEN_PATS`].
pub const MAX_TENANT_PATS: u32 = 8;

/// Value of `BLOCK_TOKENS` (key: the token's hash): reserved for flags, written as 0.
pub type BlockTokenValue = u64;

/// `EventHeader::flags` of an enforce-hit event: the kernel put the connection into
/// `BLOCK_CONNS` itself (its responses are dropped from the request on). Without it the 4-tuple
/// was unknown or the table full, and the agent has to block the connection.
pub const HIT_F_CONN_BLOCKED: u16 = 1 << 0;
/// The request was read through OpenSSL (else a plaintext socket read).
pub const HIT_F_TLS: u16 = 1 << 1;
/// The request names another tenant than the one `SESSION_TENANTS` holds for its session token
/// (a cross-tenant attempt stopped before its answer), not a blocked token.
pub const HIT_F_CROSS_TENANT: u16 = 1 << 2;
/// Not a refusal: the kernel holds the connection's answers (`BLOCK_F_HOLD`) because a request
/// of a session it does not know names a tenant; the agent judges the request and releases or
/// blocks the connection.
pub const HIT_F_HOLD: u16 = 1 << 3;

/// A request that an edge process read carried a token whose hash is in `BLOCK_TOKENS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnforceHitEvent {
    pub hdr: EventHeader,
    pub conn: ConnId,
    pub hash: u64,
}
const _: () = assert!(size_of::<EnforceHitEvent>() == 48);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], contain only integers and byte arrays, and have
    // explicit padding, so every bit pattern is valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for super::KernelConfig {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::ConnState {}
    unsafe impl aya::Pod for super::SslKey {}
    unsafe impl aya::Pod for super::BlockKey {}
    unsafe impl aya::Pod for super::scan::ScanTables {}
    unsafe impl aya::Pod for super::scan::ConnScan {}
    unsafe impl aya::Pod for super::TokenCtl {}
}
