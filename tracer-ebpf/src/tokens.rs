//! Recognising blocked session tokens and login names in the requests an edge server reads,
//! so that the kernel blocks the connection before the server has answered and before the
//! agent has seen a byte; and, likewise, requests of known sessions whose request line names
//! another tenant than theirs (a cross-tenant attempt, the incident's manipulated call).
//!
//! Called with the plaintext a read returned (SSL_read/SSL_read_ex, or a plaintext socket read
//! on a configured port) of a process in `ENFORCE_TGIDS`. Every byte of the read goes through
//! the streaming matcher of `tracer_common::scan` (the agent's tests run the same code), whose
//! state per connection (`TOKEN_STATE`) is carried between reads and between the chunks of one
//! read: so a pattern or token cut anywhere is found, and every byte of a request head (up to
//! `SCAN_HEAD_MAX`) and of a login body (up to `SCAN_BODY_MAX`) is looked at. A token that ends
//! is looked up by its hash in `BLOCK_TOKENS`, and in `SESSION_TENANTS` against the tenant
//! values the request line named (`scan::names_other_tenant`); on a hit the connection goes
//! into `BLOCK_CONNS`, so `enforce_egress` drops its responses, and the agent is told with a
//! `KIND_ENFORCE_HIT` event (`HIT_F_CROSS_TENANT` for an attempt). Bounds passed are counted (`C_TOKEN_SCAN_HEAD_BOUND`, `C_TOKEN_SCAN_BODY_BOUND`).
//!
//! While no token is blocked and no session is checked (`TOKEN_CTL[0].on == 0`) a read costs
//! one array lookup.

use aya_ebpf::{
    helpers::{bpf_probe_read_user, bpf_probe_read_user_buf, generated::bpf_loop},
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray},
};

use tracer_common::{
    scan::{
        drain, names_other_tenant, take, ConnScan, ScanTables, EV_BODY_BOUND, EV_HEAD_BOUND,
        EV_TOKEN, MODE_OFF, T_SEEN,
    },
    *,
};

use crate::{emit::*, maps::*};

/// Bytes of a read copied at a time into the scan buffer (a power of two, for masking).
pub const CHUNK: usize = 4096;
const MASK: u32 = CHUNK as u32 - 1;
/// Head bytes the fast path takes per loop step before it hands one to `step`.
const FAST: u32 = 16;
/// `BPF_NOEXIST`: insert only a new key.
const BPF_NOEXIST: u64 = 1;
/// `Work::hit`: a blocked token, or a cross-tenant attempt of a known session; `scan`'s answer
/// also a hold.
const HIT_TOKEN: u32 = 1;
const HIT_TENANT: u32 = 2;
const HIT_HOLD: u32 = 3;
/// bpf_loop's own limit of iterations.
const MAX_LOOPS: u64 = 1 << 23;

/// The compiled patterns, written by the agent (`tracer_common::scan::ScanTables`).
#[map(name = "TOKEN_TABLES")]
static TOKEN_TABLES: Array<ScanTables> = Array::with_max_entries(1, 0);

/// The scan state of each edge connection between reads. LRU: losing one loses the state of a
/// request cut between reads (the next request starts afresh).
#[map(name = "TOKEN_STATE")]
static TOKEN_STATE: LruHashMap<ConnKey, ConnScan> = LruHashMap::with_max_entries(MAX_SCAN_CONNS, 0);

/// The state of one read's scan, in a per-CPU map: far too large for the stack, and values read
/// from a map are unknown to the verifier, so it checks the loop step once.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Work {
    buf: [u8; CHUNK],
    /// The connection's state, copied in and written back after the loop.
    cs: ConnScan,
    seed: u64,
    /// The read: its address and length, and the bytes of it taken so far.
    ptr: u64,
    n: u64,
    off: u64,
    /// Bytes in `buf`, and the next one to scan.
    blen: u32,
    bpos: u32,
    hit: u32,
    done: u32,
    /// `EV_*` bits seen.
    evs: u32,
    /// A request to hold (see `BLOCK_F_HOLD`), and the token that asked for it.
    hold: u32,
    hold_hash: u64,
}

/// Per-CPU state of the token scan (see [`Work`]).
#[map(name = "TOKEN_SCAN")]
static TOKEN_SCAN: PerCpuArray<Work> = PerCpuArray::with_max_entries(1, 0);

/// One step of the scan: a bpf_loop callback. Returns 1 to stop.
#[inline(never)]
unsafe extern "C" fn scan_step(_i: u64, _ctx: *mut core::ffi::c_void) -> i64 {
    let Some(w) = TOKEN_SCAN.get_ptr_mut(0) else {
        return 1;
    };
    let Some(t) = TOKEN_TABLES.get(0) else {
        return 1;
    };
    // SAFETY: this CPU's slot of the per-CPU state map, valid for the program run.
    let w = unsafe { &mut *w };
    if w.cs.mode == MODE_OFF {
        w.done = 1;
        return 1;
    }
    // Decoded bytes waiting: one of them into the matcher. At most one `drain` or `take` per
    // step keeps what the verifier has to walk small.
    if w.cs.draining() {
        let ev = drain(&mut w.cs, t, w.seed);
        w.evs |= ev;
        if ev & EV_TOKEN != 0 {
            let h = w.cs.done_hash;
            if BLOCK_TOKENS.get_ptr(h).is_some() {
                w.hit = HIT_TOKEN;
                return 1;
            }
            match SESSION_TENANTS.get_ptr(h) {
                // SAFETY: map value pointer, valid for this run. 0: a session with no tenant.
                Some(t) => {
                    let t = unsafe { *t };
                    if t != 0 && names_other_tenant(&w.cs, t) {
                        w.hit = HIT_TENANT;
                        return 1;
                    }
                }
                // A session the agent has not handed over names a tenant: its answer waits
                // for the agent's judgement. The rest of the read is still scanned.
                None if w.cs.tflags & T_SEEN != 0 && w.hold == 0 => {
                    w.hold = 1;
                    w.hold_hash = h;
                }
                None => {}
            }
        }
        return 0;
    }
    // The rest of a body past the bound: skipped, in the buffer and then in the read.
    let k = w.cs.skip((w.blen - w.bpos) as u64);
    w.bpos += k as u32;
    if w.bpos >= w.blen {
        let k = w.cs.skip(w.n - w.off);
        w.off += k;
        if w.cs.mode == MODE_OFF || w.off >= w.n {
            w.done = 1;
            return 1;
        }
        let want = w.n - w.off;
        let m = if want < CHUNK as u64 {
            want as usize
        } else {
            CHUNK
        };
        if m == 0 || m > CHUNK {
            w.done = 1;
            return 1;
        }
        // SAFETY: reading the traced process's buffer, which the call just filled.
        if unsafe { bpf_probe_read_user_buf((w.ptr + w.off) as *const u8, &mut w.buf[..m]) }
            .is_err()
        {
            count(C_TOKEN_SCAN_FAILED, 1);
            w.done = 1;
            return 1;
        }
        w.off += m as u64;
        w.blen = m as u32;
        w.bpos = 0;
        return 0;
    }
    if w.cs.plain_head() {
        // The common case: head bytes that complete no pattern.
        let mut i = 0;
        while i < FAST {
            if w.bpos >= w.blen {
                return 0;
            }
            let c = w.buf[(w.bpos & MASK) as usize];
            if !w.cs.fast_head(t, c) {
                break;
            }
            w.bpos += 1;
            i += 1;
        }
        if i > 0 {
            return 0;
        }
    }
    let c = w.buf[(w.bpos & MASK) as usize];
    w.bpos += 1;
    w.evs |= take(&mut w.cs, c);
    0
}

/// Scans the `n` bytes at user address `ptr` that connection `key` read, after what its
/// previous reads left; the hash of the token that stops or holds it if one is there, and how
/// (`HIT_TOKEN`, `HIT_TENANT`, `HIT_HOLD`).
#[inline(always)]
fn scan(key: &ConnKey, st: &ConnState, ptr: u64, n: u64, seed: u64) -> Option<(u64, u32)> {
    let Some(w) = TOKEN_SCAN.get_ptr_mut(0) else {
        count(C_SCRATCH_MISSING, 1);
        return None;
    };
    // SAFETY: this CPU's slot, valid for the program run.
    let w = unsafe { &mut *w };
    // Copied straight into the per-CPU slot: a `ConnScan` on the stack would take a quarter of
    // the 512 bytes the verifier allows this program and the loop's callback together.
    match TOKEN_STATE.get_ptr(key) {
        // SAFETY: map value pointer, valid for this run; `w.cs` is this CPU's slot.
        Some(p) if unsafe { (*p).gen } == st.gen => unsafe {
            core::ptr::copy_nonoverlapping(p, &mut w.cs as *mut ConnScan, 1)
        },
        _ => w.cs.reset(st.gen),
    }
    if w.cs.mode == MODE_OFF {
        return None;
    }
    count(C_TOKEN_SCANS, 1);
    w.seed = seed;
    w.ptr = ptr;
    w.n = n;
    w.off = 0;
    w.blen = 0;
    w.bpos = 0;
    w.hit = 0;
    w.done = 0;
    w.evs = 0;
    w.hold = 0;
    w.hold_hash = 0;
    // Per byte at most one `take` and four `drain`s, plus a refill per chunk.
    let want = 5 * n + n / CHUNK as u64 + 4;
    let loops = if want < MAX_LOOPS { want } else { MAX_LOOPS };
    // SAFETY: bpf_loop calls a static callback that finds its state in this CPU's slot.
    unsafe {
        let mut unused: u64 = 0;
        bpf_loop(
            loops as u32,
            scan_step as *mut core::ffi::c_void,
            &mut unused as *mut u64 as *mut core::ffi::c_void,
            0,
        );
    }
    if w.evs & EV_HEAD_BOUND != 0 {
        count(C_TOKEN_SCAN_HEAD_BOUND, 1);
    }
    if w.evs & EV_BODY_BOUND != 0 {
        count(C_TOKEN_SCAN_BODY_BOUND, 1);
    }
    if w.hit != 0 {
        // Refused: the next request starts afresh.
        let _ = TOKEN_STATE.remove(key);
        return Some((w.cs.done_hash, w.hit));
    }
    if w.done == 0 {
        count(C_TOKEN_SCAN_BUDGET, 1);
    }
    // Losing it (LRU) only loses a request cut between reads. By reference: the value is
    // large for the stack.
    #[allow(clippy::needless_borrows_for_generic_args)]
    let _ = TOKEN_STATE.insert(key, &w.cs, 0);
    if w.hold != 0 {
        return Some((w.hold_hash, HIT_HOLD));
    }
    None
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
fn hit(key: &ConnKey, st: &ConnState, pid_tgid: u64, hash: u64, tls: bool, how: u32) {
    let mut flags = if tls { HIT_F_TLS } else { 0 };
    // A hold never replaces a block already there (BPF_NOEXIST).
    let (value, map_flags) = match how {
        HIT_HOLD => {
            flags |= HIT_F_HOLD;
            // SAFETY: a helper without arguments.
            let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
            (((now + HOLD_NS) & !0xff) | BLOCK_F_HOLD, BPF_NOEXIST)
        }
        HIT_TENANT => {
            flags |= HIT_F_CROSS_TENANT;
            (BLOCK_F_TOKEN, 0)
        }
        _ => (BLOCK_F_TOKEN, 0),
    };
    if how != HIT_HOLD {
        count(C_REQUESTS_REFUSED, 1);
    }
    if st.flags & CONN_F_TUPLE != 0 {
        let bk = block_key(&st.tuple);
        if BLOCK_CONNS.insert(bk, value, map_flags).is_ok() {
            if let Some(on) = ENFORCE_ON.get_ptr_mut(ENFORCE_ON_IDX) {
                // SAFETY: the array's only slot; a plain store of a flag.
                unsafe { *on = 1 };
            }
            flags |= HIT_F_CONN_BLOCKED;
        } else if how != HIT_HOLD {
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
    // Rare and urgent: wake the agent now, it resets (or releases) the connection.
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
    if let Some((hash, how)) = scan(key, st, ptr, len, seed) {
        hit(key, st, pid_tgid, hash, tls, how);
    }
}
