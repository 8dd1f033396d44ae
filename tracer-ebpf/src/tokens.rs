//! Recognising blocked session tokens in the requests an edge server reads, so that the kernel
//! blocks the connection before the server has answered and before the agent has seen a byte.
//!
//! Called with the plaintext a read returned (SSL_read/SSL_read_ex, or a plaintext socket read
//! on a configured port) of a process in `ENFORCE_TGIDS`. The first `TOKEN_SCAN_BYTES` of the
//! read are searched for every `TOKEN_PATS` pattern; the bytes after a match, up to the first
//! `is_token_end` byte (at most `MAX_TOKEN_LEN`), are hashed with `token_hash` and looked up in
//! `BLOCK_TOKENS`. On a hit the connection goes into `BLOCK_CONNS`, so `enforce_egress` drops
//! its responses, and the agent is told with a `KIND_ENFORCE_HIT` event.
//!
//! A pattern or token that one read cuts off and the next continues (nginx reads a request's
//! first KiB on its own) is found too: the last `CARRY_LEN` bytes each scanned read leaves are
//! kept per connection (`TOKEN_CARRY`) and scanned again in front of the next read.
//!
//! While no token is blocked (`TOKEN_CTL[0].on == 0`) a read costs one array lookup.

use aya_ebpf::{
    helpers::{
        bpf_probe_read_kernel_buf, bpf_probe_read_user, bpf_probe_read_user_buf,
        generated::bpf_loop,
    },
    macros::map,
    maps::{LruHashMap, PerCpuArray},
};
use core::cmp::min;

use tracer_common::*;

use crate::{emit::*, maps::*};

/// Size of the scan buffer: a power of two that holds the previous read's end and the copied
/// part of this one, so that every index can be masked into bounds for the verifier.
pub const SCAN_BUF: usize = 8192;
const MASK: u32 = SCAN_BUF as u32 - 1;
/// Bytes copied from a read: a pattern may begin anywhere in the first `TOKEN_SCAN_BYTES`, and
/// it and its token may run on past them.
const COPY_MAX: u64 = (TOKEN_SCAN_BYTES + TOKEN_PAT_LEN + MAX_TOKEN_LEN) as u64;
/// Bytes of a read's end kept for the next read of the connection: a pattern that begins
/// earlier has had its longest token before the cut.
pub const CARRY_LEN: usize = TOKEN_PAT_LEN + MAX_TOKEN_LEN;
const _: () = assert!(CARRY_LEN + COPY_MAX as usize <= SCAN_BUF && SCAN_BUF.is_power_of_two());

/// The end of a connection's last scanned read (`TOKEN_CARRY` value).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Carry {
    /// `ConnState::gen` of the connection: a reused fd does not inherit it.
    gen: u64,
    len: u32,
    _pad: u32,
    bytes: [u8; CARRY_LEN],
}

/// Positions tested per loop step while no pattern's first byte is seen.
const STRIDE: u32 = 16;
/// Token bytes hashed per loop step.
const TOKEN_STRIDE: u32 = 32;
/// Upper bound of loop steps per read, which bounds what a hostile request can cost. Typical
/// requests need about `len / STRIDE` plus one per candidate position and pattern; the worst case
/// (every position a candidate of all 8 patterns) needs 8 per position. A scan cut short by the
/// budget is counted (`C_TOKEN_SCAN_BUDGET`).
const LOOP_BUDGET: u32 = 8 * (TOKEN_SCAN_BYTES + CARRY_LEN) as u32 + 2048;

const MODE_SCAN: u32 = 0;
const MODE_CHECK: u32 = 1;
const MODE_TOKEN: u32 = 2;
const MODE_DONE: u32 = 3;

/// The state of one read's scan, in a per-CPU map: far too large for the stack, and values read
/// from a map are unknown to the verifier, so it checks the loop step once.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Scan {
    buf: [u8; SCAN_BUF],
    /// Bit `j` of `first[b]`: pattern `j` begins with byte `b`.
    first: [u8; 256],
    seed: u64,
    /// Hash of the token being read; the blocked token's hash once `hit` is set.
    hash: u64,
    /// Bytes in `buf`.
    have: u32,
    /// A pattern may begin at positions below this.
    limit: u32,
    pos: u32,
    /// Patterns still to compare at `pos` (bit mask).
    cand: u32,
    /// Next token byte, and the token's first byte.
    tok: u32,
    tok_start: u32,
    mode: u32,
    hit: u32,
    /// Where the next `TOKEN_CARRY` value is built.
    carry: Carry,
}

/// The end of each edge connection's last scanned read, scanned again in front of its next
/// ([`Carry`]). LRU: losing one only loses a token cut between two reads.
#[map(name = "TOKEN_CARRY")]
static TOKEN_CARRY: LruHashMap<ConnKey, Carry> = LruHashMap::with_max_entries(8192, 0);

/// Per-CPU state of the token scan (see [`Scan`]).
#[map(name = "TOKEN_SCAN")]
static TOKEN_SCAN: PerCpuArray<Scan> = PerCpuArray::with_max_entries(1, 0);

/// Does pattern `p` (of `len` bytes) begin at `s.pos`?
#[inline(always)]
fn pattern_at(s: &Scan, p: &TokenPattern, len: u32) -> bool {
    if s.pos + len > s.have {
        return false;
    }
    let mut k = 0u32;
    while k < TOKEN_PAT_LEN as u32 {
        if k >= len {
            return true;
        }
        if s.buf[((s.pos + k) & MASK) as usize] != p.bytes[k as usize] {
            return false;
        }
        k += 1;
    }
    true
}

/// One step of the scan: a bpf_loop callback. Returns 1 to stop.
#[inline(never)]
unsafe extern "C" fn scan_step(_i: u64, _ctx: *mut core::ffi::c_void) -> i64 {
    let Some(s) = TOKEN_SCAN.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's slot of the per-CPU state map, valid for the program run.
    let s = unsafe { &mut *s };
    match s.mode {
        MODE_SCAN => {
            let mut n = 0;
            while n < STRIDE {
                if s.pos >= s.limit {
                    s.mode = MODE_DONE;
                    return 1;
                }
                let b = s.buf[(s.pos & MASK) as usize];
                let m = s.first[b as usize];
                if m != 0 {
                    s.cand = m as u32;
                    s.mode = MODE_CHECK;
                    return 0;
                }
                s.pos += 1;
                n += 1;
            }
            0
        }
        MODE_CHECK => {
            let c = s.cand;
            if c == 0 {
                s.pos += 1;
                s.mode = MODE_SCAN;
                return 0;
            }
            // The lowest candidate; BPF has no count-trailing-zeros instruction.
            let mut j = 0u32;
            while j < MAX_TOKEN_PATS && c & (1 << j) == 0 {
                j += 1;
            }
            s.cand = c & c.wrapping_sub(1);
            let Some(p) = TOKEN_PATS.get(j) else {
                return 0;
            };
            let len = p.len;
            if len == 0 || len > TOKEN_PAT_LEN as u32 || !pattern_at(s, p, len) {
                return 0;
            }
            s.tok_start = s.pos + len;
            s.tok = s.tok_start;
            s.hash = token_hash_start(s.seed);
            s.mode = MODE_TOKEN;
            0
        }
        MODE_TOKEN => {
            let mut n = 0;
            while n < TOKEN_STRIDE {
                let t = s.tok;
                if t >= s.have || t - s.tok_start >= MAX_TOKEN_LEN as u32 {
                    return token_end(s);
                }
                let b = s.buf[(t & MASK) as usize];
                if is_token_end(b) {
                    return token_end(s);
                }
                s.hash = token_hash_byte(s.hash, b);
                s.tok = t + 1;
                n += 1;
            }
            0
        }
        _ => 1,
    }
}

/// The token ends at `s.tok`: a hit stops the scan; otherwise it goes on after the token.
#[inline(always)]
fn token_end(s: &mut Scan) -> i64 {
    if s.tok > s.tok_start && BLOCK_TOKENS.get_ptr(s.hash).is_some() {
        s.hit = 1;
        s.mode = MODE_DONE;
        return 1;
    }
    s.pos = s.tok;
    s.cand = 0;
    s.mode = MODE_SCAN;
    0
}

/// Scans `n` bytes at user address `ptr` that connection `key` read, after what its previous
/// read left; the blocked token's hash if one is there.
#[inline(always)]
fn scan(key: &ConnKey, st: &ConnState, ptr: u64, n: u64, seed: u64) -> Option<u64> {
    let Some(s) = TOKEN_SCAN.get_ptr_mut(0) else {
        count(C_SCRATCH_MISSING, 1);
        return None;
    };
    // SAFETY: this CPU's slot, valid for the program run.
    let s = unsafe { &mut *s };
    let mut i = 0usize;
    while i < 256 {
        s.first[i] = 0;
        i += 1;
    }
    let mut j = 0u32;
    while j < MAX_TOKEN_PATS {
        if let Some(p) = TOKEN_PATS.get(j) {
            if p.len != 0 && p.len <= TOKEN_PAT_LEN as u32 {
                s.first[p.bytes[0] as usize] |= 1 << j;
            }
        }
        j += 1;
    }
    // What the previous read of this connection left, in front.
    let mut c = 0usize;
    if let Some(prev) = TOKEN_CARRY.get_ptr(key) {
        // SAFETY: map value pointer, valid for this run.
        let prev = unsafe { &*prev };
        // A clamp, not `0 < l <= CARRY_LEN`: LLVM turns that into one compare of `l - 1` in
        // another register, and the verifier then knows no bound of `l`. Zero bytes is fine.
        let l = min(prev.len as usize, CARRY_LEN);
        if prev.gen == st.gen
            // SAFETY: copying between two map values of this program.
            && unsafe { bpf_probe_read_kernel_buf(prev.bytes.as_ptr(), &mut s.buf[..l]) }.is_ok()
        {
            c = l;
        }
    }
    let m = min(n as usize, COPY_MAX as usize);
    let c = min(c, CARRY_LEN);
    // SAFETY: reading the traced process's buffer, which the call just filled, into our scratch.
    if unsafe { bpf_probe_read_user_buf(ptr as *const u8, &mut s.buf[c..c + m]) }.is_err() {
        count(C_TOKEN_SCAN_FAILED, 1);
        return None;
    }
    count(C_TOKEN_SCANS, 1);
    s.seed = seed;
    s.hash = 0;
    s.have = (c + m) as u32;
    s.limit = (c as u32)
        + if n < TOKEN_SCAN_BYTES as u64 {
            n as u32
        } else {
            TOKEN_SCAN_BYTES as u32
        };
    s.pos = 0;
    s.cand = 0;
    s.tok = 0;
    s.tok_start = 0;
    s.mode = MODE_SCAN;
    s.hit = 0;
    // SAFETY: bpf_loop calls a static callback that finds its state in this CPU's slot.
    unsafe {
        let mut unused: u64 = 0;
        bpf_loop(
            LOOP_BUDGET,
            scan_step as *mut core::ffi::c_void,
            &mut unused as *mut u64 as *mut core::ffi::c_void,
            0,
        );
    }
    if s.hit != 0 {
        // Refused: the next request starts afresh.
        let _ = TOKEN_CARRY.remove(key);
        return Some(s.hash);
    }
    if s.mode != MODE_DONE {
        count(C_TOKEN_SCAN_BUDGET, 1);
    }
    keep_end(s, key, st, ptr, n);
    None
}

/// Keeps the last `CARRY_LEN` bytes of the stream so far for the connection's next read: from
/// the scan buffer when it holds the whole read, else from the read's own end.
#[inline(always)]
fn keep_end(s: &mut Scan, key: &ConnKey, st: &ConnState, ptr: u64, n: u64) {
    let have = s.have as usize;
    let ok = if n <= COPY_MAX {
        let t = min(have, CARRY_LEN);
        let start = have - t;
        if start + t > SCAN_BUF {
            return;
        }
        s.carry.len = t as u32;
        // SAFETY: copying within this CPU's scan state, inside `buf`.
        unsafe { bpf_probe_read_kernel_buf(s.buf.as_ptr().add(start), &mut s.carry.bytes[..t]) }
            .is_ok()
    } else {
        s.carry.len = CARRY_LEN as u32;
        let end = (ptr + n - CARRY_LEN as u64) as *const u8;
        // SAFETY: reading the traced process's buffer, which the call just filled.
        unsafe { bpf_probe_read_user_buf(end, &mut s.carry.bytes) }.is_ok()
    };
    if ok && s.carry.len != 0 {
        s.carry.gen = st.gen;
        s.carry._pad = 0;
        // Losing it (LRU) only loses a pattern cut at this read's end. By reference: a copy
        // of the value would not fit the stack.
        #[allow(clippy::needless_borrows_for_generic_args)]
        let _ = TOKEN_CARRY.insert(key, &s.carry, 0);
    } else {
        let _ = TOKEN_CARRY.remove(key);
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Iovec {
    base: u64,
    len: u64,
}

/// The `BLOCK_CONNS` key of a connection as its process (the server) sends it; IPv4-mapped
/// IPv6 as plain IPv4, the way the egress filter reads the packet.
#[inline(always)]
fn block_key(t: &Tuple) -> BlockKey {
    let mut k = BlockKey {
        family: t.family,
        local_port: t.local_port,
        remote_port: t.peer_port,
        _pad: 0,
        local_addr: t.local_addr,
        remote_addr: t.peer_addr,
    };
    let a = &t.local_addr;
    let mapped =
        t.family == AF_INET6 && a[..10].iter().all(|b| *b == 0) && a[10] == 0xff && a[11] == 0xff;
    if mapped {
        k.family = AF_INET;
        k.local_addr = [0; 16];
        k.remote_addr = [0; 16];
        k.local_addr[..4].copy_from_slice(&t.local_addr[12..]);
        k.remote_addr[..4].copy_from_slice(&t.peer_addr[12..]);
    }
    k
}

/// The kernel recognised blocked token `hash` in what connection `key` just read: block the
/// connection (if its 4-tuple is known) and tell the agent.
#[inline(always)]
fn hit(key: &ConnKey, st: &ConnState, pid_tgid: u64, hash: u64, tls: bool) {
    count(C_REQUESTS_REFUSED, 1);
    let mut flags = if tls { HIT_F_TLS } else { 0 };
    if st.flags & CONN_F_TUPLE != 0 {
        let bk = block_key(&st.tuple);
        if BLOCK_CONNS.insert(bk, BLOCK_F_TOKEN, 0).is_ok() {
            if let Some(on) = ENFORCE_ON.get_ptr_mut(ENFORCE_ON_IDX) {
                // SAFETY: the array's only slot; a plain store of a flag.
                unsafe { *on = 1 };
            }
            flags |= HIT_F_CONN_BLOCKED;
        } else {
            count(C_REFUSED_TABLE_FULL, 1);
        }
    } else {
        count(C_REFUSED_NO_TUPLE, 1);
    }
    let ev = EnforceHitEvent {
        hdr: header(
            KIND_ENFORCE_HIT,
            flags,
            core::mem::size_of::<EnforceHitEvent>() as u32,
            pid_tgid,
        ),
        conn: conn_id(key, st),
        hash,
    };
    // Rare and urgent: wake the agent now, it resets the connection.
    if EVENTS
        .output::<EnforceHitEvent>(&ev, BPF_RB_FORCE_WAKEUP)
        .is_ok()
    {
        count(C_EVENTS_SENT, 1);
    } else {
        count(C_RINGBUF_FULL_EVENTS, 1);
    }
}

/// Called on every read of a target that returned `n > 0` bytes into `ub`: scans it for
/// blocked tokens when any is blocked and the process is an edge. Of a vectored read only the
/// first segment is scanned.
#[inline(always)]
pub fn check_read(key: &ConnKey, st: &ConnState, pid_tgid: u64, ub: UserBuf, n: u64, tls: bool) {
    let seed = match TOKEN_CTL.get(0) {
        Some(c) if c.on != 0 => c.seed,
        _ => return,
    };
    if ENFORCE_TGIDS.get_ptr(key.tgid).is_none() {
        return;
    }
    let (ptr, len) = if ub.iovcnt == 0 {
        (ub.ptr, n)
    } else {
        // SAFETY: reading the traced process's iovec array; failure is counted.
        match unsafe { bpf_probe_read_user(ub.ptr as *const Iovec) } {
            Ok(v) => (v.base, if v.len < n { v.len } else { n }),
            Err(_) => {
                count(C_TOKEN_SCAN_FAILED, 1);
                return;
            }
        }
    };
    if let Some(hash) = scan(key, st, ptr, len, seed) {
        hit(key, st, pid_tgid, hash, tls);
    }
}
