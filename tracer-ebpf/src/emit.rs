//! Building and sending events: the target check every program starts with, connection
//! announcement, and the bounded loop that splits one read/write into ring-buffer events.

use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_ktime_get_ns, bpf_probe_read_user, bpf_probe_read_user_buf,
    generated::bpf_loop,
};
use aya_ebpf::{macros::map, maps::PerCpuArray, programs::TracePointContext, EbpfContext};
use tracer_common::*;

use crate::maps::*;

/// A field of a tracepoint record at a fixed offset (from the tracepoint's format file).
#[inline(always)]
pub fn tp_arg<T: Copy>(ctx: &TracePointContext, off: usize) -> T {
    // SAFETY: tracepoint record memory at a fixed offset inside the record (checked by the
    // verifier against the tracepoint's size).
    unsafe { core::ptr::read(ctx.as_ptr().cast::<u8>().add(off).cast::<T>()) }
}

/// Is this process traced? The first thing every program asks.
#[inline(always)]
pub fn is_target(tgid: u32) -> bool {
    if TARGET_TGIDS.get_ptr(tgid).is_some() {
        return true;
    }
    match config() {
        Some(cfg) if cfg.flags & CFG_F_CGROUP_TARGETS != 0 => {
            // SAFETY: helper without arguments.
            let cg = unsafe { bpf_get_current_cgroup_id() };
            TARGET_CGRPS.get_ptr(cg).is_some()
        }
        _ => false,
    }
}

const BPF_RB_NO_WAKEUP: u64 = 1;
pub const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;

/// Wake the reader only when enough is waiting: it polls on a short timer anyway, and a wakeup
/// per event costs the traced server an irq_work and the agent a context switch.
#[inline(always)]
pub fn rb_flags() -> u64 {
    let threshold = match config() {
        Some(c) => c.wakeup_bytes as u64,
        None => 0,
    };
    if EVENTS.query(BPF_RB_AVAIL_DATA) >= threshold {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

#[inline(always)]
pub fn header(kind: u16, flags: u16, len: u32, pid_tgid: u64) -> EventHeader {
    EventHeader {
        kind,
        flags,
        len,
        // SAFETY: helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        pid_tgid,
    }
}

#[inline(always)]
pub fn conn_id(key: &ConnKey, st: &ConnState) -> ConnId {
    ConnId {
        tgid: key.tgid,
        fd: key.fd,
        gen: st.gen,
    }
}

/// Sends the connection's open event once, before its first data.
#[inline(always)]
pub fn announce(key: &ConnKey, st: &mut ConnState, pid_tgid: u64) -> bool {
    if st.flags & CONN_F_ANNOUNCED != 0 {
        return true;
    }
    let ev = ConnOpenEvent {
        hdr: header(
            KIND_CONN_OPEN,
            0,
            core::mem::size_of::<ConnOpenEvent>() as u32,
            pid_tgid,
        ),
        conn: conn_id(key, st),
        tuple: st.tuple,
        origin: st.origin,
        tls: (st.flags & CONN_F_TLS != 0) as u8,
        _pad: [0; 6],
    };
    if EVENTS.output::<ConnOpenEvent>(&ev, rb_flags()).is_ok() {
        st.flags |= CONN_F_ANNOUNCED;
        count(C_EVENTS_SENT, 1);
        true
    } else {
        count(C_CONN_ANNOUNCE_FAILED, 1);
        false
    }
}

#[inline(always)]
pub fn emit_hole(id: ConnId, pid_tgid: u64, dir: u8, flags: u16, pos: u64, len: u64, reason: u8) {
    let ev = HoleEvent {
        hdr: header(
            KIND_HOLE,
            flags,
            core::mem::size_of::<HoleEvent>() as u32,
            pid_tgid,
        ),
        conn: id,
        pos,
        len,
        dir,
        reason,
        _pad: [0; 6],
    };
    if EVENTS.output::<HoleEvent>(&ev, rb_flags()).is_ok() {
        count(C_EVENTS_SENT, 1);
    } else {
        count(C_RINGBUF_FULL_EVENTS, 1);
    }
}

/// Where the bytes of one call are in the traced process.
#[derive(Clone, Copy)]
pub struct UserBuf {
    /// A plain buffer, or an iovec array when `iovcnt > 0`.
    pub ptr: u64,
    pub iovcnt: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Iovec {
    base: u64,
    len: u64,
}

/// The state of one call's copy. It lives in a per-CPU map rather than on the stack: values
/// read from a map are unknown to the verifier, so it checks the loop body once instead of
/// following every concrete iteration.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Emit {
    id: ConnId,
    pid_tgid: u64,
    ptr: u64,
    pos: u64,
    want: u64,
    done: u64,
    seg_base: u64,
    seg_len: u64,
    seg_off: u64,
    iovcnt: u32,
    seg: u32,
    flags: u16,
    dir: u8,
    need_iov: u8,
    _pad: [u8; 4],
}

/// Per-CPU state of the copy loop (see [`Emit`]).
#[map(name = "EMIT")]
static EMIT: PerCpuArray<Emit> = PerCpuArray::with_max_entries(1, 0);

/// One chunk of the copy: a bpf_loop callback, so the verifier checks it once instead of once
/// per iteration. Returns 1 to stop.
#[inline(never)]
unsafe extern "C" fn emit_step(_i: u64, _ctx: *mut core::ffi::c_void) -> i64 {
    let Some(e) = EMIT.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's slot of the per-CPU state map, valid for the program run.
    let e = unsafe { &mut *e };
    if e.done >= e.want {
        return 1;
    }
    if e.need_iov != 0 {
        if e.seg >= e.iovcnt || e.seg >= MAX_IOV {
            return 1;
        }
        let p = (e.ptr + (e.seg as u64) * 16) as *const Iovec;
        // SAFETY: reading the traced process's iovec array; failure is handled.
        match unsafe { bpf_probe_read_user(p) } {
            Ok(v) => {
                e.seg_base = v.base;
                e.seg_len = v.len;
            }
            Err(_) => return 1,
        }
        e.seg_off = 0;
        e.need_iov = 0;
    }
    let avail = e.seg_len.saturating_sub(e.seg_off);
    if avail == 0 {
        if e.iovcnt == 0 {
            return 1;
        }
        e.seg += 1;
        e.need_iov = 1;
        return 0;
    }
    let mut n = e.want - e.done;
    if n > avail {
        n = avail;
    }
    if n > CHUNK_SIZE as u64 {
        n = CHUNK_SIZE as u64;
    }
    let n = n as usize;
    if n == 0 || n > CHUNK_SIZE {
        return 1;
    }
    let Some(ev) = SCRATCH.get_ptr_mut(0) else {
        count(C_SCRATCH_MISSING, 1);
        return 1;
    };
    // SAFETY: the per-CPU scratch slot, valid for the whole program run.
    let ev = unsafe { &mut *ev };
    // SAFETY: reading the traced process's buffer into our scratch; failure is handled.
    let read = unsafe {
        bpf_probe_read_user_buf((e.seg_base + e.seg_off) as *const u8, &mut ev.data[..n])
    };
    if read.is_err() {
        count(C_READ_FAILED_EVENTS, 1);
        count(C_READ_FAILED_BYTES, n as u64);
        emit_hole(
            e.id,
            e.pid_tgid,
            e.dir,
            e.flags,
            e.pos + e.done,
            n as u64,
            HOLE_READ_FAILED,
        );
    } else {
        ev.pos = e.pos + e.done;
        ev.cap_len = n as u32;
        ev.hdr.len = (DATA_HDR_LEN + n) as u32;
        // SAFETY: the first DATA_HDR_LEN + n bytes of the scratch event are initialised.
        let bytes = unsafe {
            core::slice::from_raw_parts(ev as *const DataEvent as *const u8, DATA_HDR_LEN + n)
        };
        if EVENTS.output::<[u8]>(bytes, rb_flags()).is_ok() {
            count(C_EVENTS_SENT, 1);
            count(C_BYTES_CAPTURED, n as u64);
        } else {
            count(C_RINGBUF_FULL_EVENTS, 1);
            count(C_RINGBUF_FULL_BYTES, n as u64);
        }
    }
    e.done += n as u64;
    e.seg_off += n as u64;
    0
}

/// Copies `total` bytes of one call, starting at stream position `pos`, into as many data
/// events as needed, up to the configured cap; what is not copied is announced as a hole with
/// its reason. Every outcome is counted.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn emit_data(
    id: ConnId,
    pid_tgid: u64,
    dir: u8,
    flags: u16,
    src: u8,
    ub: UserBuf,
    pos: u64,
    total: u64,
) {
    let cap = match config() {
        Some(c) => c.max_message_bytes as u64,
        None => DEFAULT_MAX_MESSAGE_BYTES as u64,
    };
    let want = if total < cap { total } else { cap };
    let Some(ev) = SCRATCH.get_ptr_mut(0) else {
        count(C_SCRATCH_MISSING, 1);
        return;
    };
    // SAFETY: the per-CPU scratch slot, valid for the whole program run.
    let ev = unsafe { &mut *ev };
    ev.hdr = header(KIND_DATA, flags, 0, pid_tgid);
    ev.conn = id;
    ev.msg_len = if total > u32::MAX as u64 {
        u32::MAX
    } else {
        total as u32
    };
    ev.dir = dir;
    ev.src = src;

    let Some(slot) = EMIT.get_ptr_mut(0) else {
        count(C_SCRATCH_MISSING, 1);
        return;
    };
    let e = Emit {
        id,
        pid_tgid,
        ptr: ub.ptr,
        pos,
        want,
        done: 0,
        seg_base: ub.ptr,
        seg_len: if ub.iovcnt == 0 { total } else { 0 },
        seg_off: 0,
        iovcnt: ub.iovcnt,
        seg: 0,
        flags,
        dir,
        need_iov: (ub.iovcnt > 0) as u8,
        _pad: [0; 4],
    };
    // SAFETY: this CPU's slot; bpf_loop calls a static callback that finds the state there.
    let done = unsafe {
        *slot = e;
        let mut unused: u64 = 0;
        bpf_loop(
            MAX_CHUNKS_PER_CALL,
            emit_step as *mut core::ffi::c_void,
            &mut unused as *mut u64 as *mut core::ffi::c_void,
            0,
        );
        (*slot).done
    };
    if done < total {
        let rest = total - done;
        if done >= cap {
            count(C_CAP_TRUNCATED_CALLS, 1);
            count(C_CAP_TRUNCATED_BYTES, rest);
            emit_hole(
                id,
                pid_tgid,
                dir,
                flags | DATA_F_TRUNCATED,
                pos + done,
                rest,
                HOLE_CAP,
            );
        } else {
            count(C_TOO_MANY_CHUNKS_BYTES, rest);
            emit_hole(
                id,
                pid_tgid,
                dir,
                flags,
                pos + done,
                rest,
                HOLE_TOO_MANY_CHUNKS,
            );
        }
    }
}
