//! Every map the kernel programs share, plus the per-thread call state kept between a
//! syscall's or SSL call's entry and its return.
//!
//! A leaf: it uses nothing else of this crate, and every other module may use it. The per-CPU
//! state of a loop that one module alone runs lives in that module, beside its type: `EMIT` in
//! `emit`, `TOKEN_SCAN`, `TOKEN_STATE` and `TOKEN_TABLES` in `tokens`.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use tracer_common::{
    BlockKey, BlockTokenValue, BlockValue, ConnKey, ConnState, DataEvent, KernelConfig, SslKey,
    TokenCtl, COMM_LEN, COUNTER_MAX, MAX_BLOCKED_CONNS, MAX_BLOCKED_TOKENS, MAX_ENFORCE_TGIDS,
    MAX_SESSION_TENANTS,
};

/// Overridden by the agent from `capture.ring_buffer_size`.
#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(16 * 1024 * 1024, 0);

#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_MAX, 0);

#[map(name = "CONFIG")]
pub static CONFIG: Array<KernelConfig> = Array::with_max_entries(1, 0);

#[map(name = "TARGET_TGIDS")]
pub static TARGET_TGIDS: HashMap<u32, u32> = HashMap::with_max_entries(16384, 0);

#[map(name = "TARGET_COMMS")]
pub static TARGET_COMMS: HashMap<[u8; COMM_LEN], u32> = HashMap::with_max_entries(64, 0);

#[map(name = "TARGET_CGRPS")]
pub static TARGET_CGRPS: HashMap<u64, u32> = HashMap::with_max_entries(64, 0);

#[map(name = "PLAIN_PORTS")]
pub static PLAIN_PORTS: HashMap<u16, u32> = HashMap::with_max_entries(256, 0);

/// Connection state per (tgid, fd). A plain hash (not LRU) so a full table is counted, never a
/// silent eviction; the agent prunes entries of dead processes. Size overridden from config.
#[map(name = "CONNS")]
pub static CONNS: HashMap<ConnKey, ConnState> = HashMap::with_max_entries(65536, 0);

/// SSL* → fd cache; losing an entry only means learning it again.
#[map(name = "SSL_FDS")]
pub static SSL_FDS: LruHashMap<SslKey, u32> = LruHashMap::with_max_entries(65536, 0);

/// Socket syscall in flight per thread (pid_tgid), from sys_enter to sys_exit.
#[map(name = "INFLIGHT")]
pub static INFLIGHT: HashMap<u64, Inflight> = HashMap::with_max_entries(16384, 0);

/// SSL_read/SSL_write in flight per thread.
#[map(name = "SSL_ACTIVE")]
pub static SSL_ACTIVE: HashMap<u64, SslCall> = HashMap::with_max_entries(16384, 0);

/// Last TCP socket fd each target thread read from: maps SSL objects that use memory BIOs
/// (node's TLS) to their socket.
#[map(name = "LAST_RFD")]
pub static LAST_RFD: LruHashMap<u64, u32> = LruHashMap::with_max_entries(16384, 0);

/// Per-CPU scratch where data events are built (far too large for the 512-byte stack).
#[map(name = "SCRATCH")]
pub static SCRATCH: PerCpuArray<DataEvent> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU counter behind connection generations.
#[map(name = "GEN")]
pub static GEN: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Connections whose egress packets `enforce_egress` drops; written by the agent only. A plain
/// hash: a full table refuses the block (the agent reports it), it never evicts one.
#[map(name = "BLOCK_CONNS")]
pub static BLOCK_CONNS: HashMap<BlockKey, BlockValue> =
    HashMap::with_max_entries(MAX_BLOCKED_CONNS, 0);

/// `[0]` non-zero while `BLOCK_CONNS` is not empty (kept by the agent): the fast way out.
#[map(name = "ENFORCE_ON")]
pub static ENFORCE_ON: Array<u32> = Array::with_max_entries(1, 0);

/// Hashes (`tracer_common::token_hash`) of the tokens whose requests are refused; written by
/// the agent only. A plain hash: a full table refuses the block, it never evicts one.
#[map(name = "BLOCK_TOKENS")]
pub static BLOCK_TOKENS: HashMap<u64, BlockTokenValue> =
    HashMap::with_max_entries(MAX_BLOCKED_TOKENS, 0);

/// Session token hash → the hash of its tenant (`tracer_common::tenant_hash`), for the sessions
/// whose requests are checked for cross-tenant attempts; written by the agent only. LRU: a
/// session evicted is checked by the agent's request-time check instead.
#[map(name = "SESSION_TENANTS")]
pub static SESSION_TENANTS: LruHashMap<u64, u64> =
    LruHashMap::with_max_entries(MAX_SESSION_TENANTS, 0);

/// The edge processes (the platform's front servers) whose reads are scanned for blocked tokens;
/// set by the agent, inherited by children at fork, removed at exit.
#[map(name = "ENFORCE_TGIDS")]
pub static ENFORCE_TGIDS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_ENFORCE_TGIDS, 0);

/// `[0]`: the token hash seed and whether any token is blocked (the fast way out).
#[map(name = "TOKEN_CTL")]
pub static TOKEN_CTL: Array<TokenCtl> = Array::with_max_entries(1, 0);

pub const CONN_F_TLS: u32 = 1 << 0;
pub const CONN_F_PLAIN: u32 = 1 << 1;
pub const CONN_F_ANNOUNCED: u32 = 1 << 2;
pub const CONN_F_TUPLE: u32 = 1 << 3;
pub const CONN_F_UNMAPPED: u32 = 1 << 4;

pub const OP_READ: u8 = 1;
pub const OP_WRITE: u8 = 2;
pub const OP_SENDFILE: u8 = 3;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Inflight {
    /// Plain buffer, or the iovec array when `iovcnt > 0`.
    pub buf: u64,
    pub iovcnt: u32,
    pub fd: u32,
    pub op: u8,
    /// Set by the sock tracepoint when this call's bytes are to be captured.
    pub capture: u8,
    pub _pad: [u8; 6],
}

pub const NO_FD: u32 = u32::MAX;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct SslCall {
    pub ssl: u64,
    pub buf: u64,
    /// `size_t *` of SSL_read_ex/SSL_write_ex, 0 for SSL_read/SSL_write.
    pub len_ptr: u64,
    /// Socket fd seen by a syscall during this call, `NO_FD` if none.
    pub fd: u32,
    pub op: u8,
    pub _pad: [u8; 3],
}

#[inline(always)]
pub fn count(idx: u32, n: u64) {
    if let Some(p) = COUNTERS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot of this CPU; programs do not migrate while running.
        unsafe { *p += n };
    }
}

#[inline(always)]
pub fn config() -> Option<&'static KernelConfig> {
    CONFIG.get(0)
}

/// A connection identity that is unique while the programs stay loaded: a per-CPU counter in
/// the high bits and the CPU number in the low byte.
#[inline(always)]
pub fn new_gen() -> u64 {
    // SAFETY: helper without arguments.
    let cpu = unsafe { aya_ebpf::helpers::bpf_get_smp_processor_id() } as u64;
    match GEN.get_ptr_mut(0) {
        Some(p) => {
            // SAFETY: this CPU's slot.
            unsafe {
                *p += 1;
                (*p << 8) | (cpu & 0xff)
            }
        }
        None => cpu,
    }
}
