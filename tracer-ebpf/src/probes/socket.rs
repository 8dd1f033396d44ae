//! Socket syscalls and the sock tracepoints: plaintext capture on the configured ports, the
//! connection table (accept/connect/close, 4-tuples), and the fd that an SSL call touches.
//! Plaintext reads of an edge process are checked for blocked session tokens (`tokens`).
//!
//! Assumes the fixed syscall tracepoint layout (args at 16 + 8*i, `ret` at 16) and the
//! `sock:sock_{recv,send}_length` layout (sk at 8, family at 16, protocol at 18), which fire
//! inside the syscall on the calling thread. The 4-tuple is read from the first 16 bytes of
//! `struct sock_common` (stable for many years) and the IPv6 addresses at offsets the agent
//! reads from BTF.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel, bpf_probe_read_user},
    macros::tracepoint,
    programs::TracePointContext,
};
use tracer_common::*;

use crate::{emit::*, maps::*, tokens::check_read};

const ARG0: usize = 16;
const ARG1: usize = 24;
const ARG2: usize = 32;
const RET: usize = 16;

#[inline(always)]
fn enter(ctx: &TracePointContext, op: u8, buf: u64, iovcnt: u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !is_target((pid_tgid >> 32) as u32) {
        return;
    }
    let fd: u64 = tp_arg(ctx, ARG0);
    let inf = Inflight {
        buf,
        iovcnt,
        fd: fd as u32,
        op,
        capture: 0,
        _pad: [0; 6],
    };
    if INFLIGHT.insert(pid_tgid, inf, 0).is_err() {
        count(C_INFLIGHT_FULL, 1);
    }
}

#[inline(always)]
fn enter_buf(ctx: &TracePointContext, op: u8) -> u32 {
    let buf: u64 = tp_arg(ctx, ARG1);
    enter(ctx, op, buf, 0);
    0
}

#[inline(always)]
fn enter_iov(ctx: &TracePointContext, op: u8) -> u32 {
    let iov: u64 = tp_arg(ctx, ARG1);
    let cnt: u64 = tp_arg(ctx, ARG2);
    enter(
        ctx,
        op,
        iov,
        if cnt > u32::MAX as u64 {
            u32::MAX
        } else {
            cnt as u32
        },
    );
    0
}

#[repr(C)]
#[derive(Clone, Copy)]
struct MsgHdrHead {
    name: u64,
    namelen: u64,
    iov: u64,
    iovlen: u64,
}

#[inline(always)]
fn enter_msg(ctx: &TracePointContext, op: u8) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !is_target((pid_tgid >> 32) as u32) {
        return 0;
    }
    let msg: u64 = tp_arg(ctx, ARG1);
    // SAFETY: reading the traced process's msghdr; failure is handled.
    let Ok(h) = (unsafe { bpf_probe_read_user(msg as *const MsgHdrHead) }) else {
        return 0;
    };
    enter(
        ctx,
        op,
        h.iov,
        if h.iovlen > u32::MAX as u64 {
            u32::MAX
        } else {
            h.iovlen as u32
        },
    );
    0
}

#[inline(always)]
fn exit(ctx: &TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: value copied out before the entry is removed.
    let Some(inf) = (unsafe { INFLIGHT.get(pid_tgid) }).copied() else {
        return 0;
    };
    let _ = INFLIGHT.remove(pid_tgid);
    if inf.capture == 0 {
        return 0;
    }
    let ret: i64 = tp_arg(ctx, RET);
    if ret <= 0 {
        return 0;
    }
    let key = ConnKey {
        tgid: (pid_tgid >> 32) as u32,
        fd: inf.fd,
    };
    let Some(st) = CONNS.get_ptr_mut(key) else {
        return 0;
    };
    // SAFETY: map value pointer, valid for this program run.
    let st = unsafe { &mut *st };
    announce(&key, st, pid_tgid);
    let id = conn_id(&key, st);
    let n = ret as u64;
    count(C_SYSCALLS_CAPTURED, 1);
    let (dir, pos) = if inf.op == OP_READ {
        let p = st.pos_in;
        st.pos_in += n;
        (DIR_IN, p)
    } else {
        let p = st.pos_out;
        st.pos_out += n;
        (DIR_OUT, p)
    };
    if inf.op == OP_SENDFILE {
        count(C_SENDFILE_BYTES, n);
        emit_hole(id, pid_tgid, dir, 0, pos, n, HOLE_SENDFILE);
    } else {
        let ub = UserBuf {
            ptr: inf.buf,
            iovcnt: inf.iovcnt,
        };
        if inf.op == OP_READ {
            check_read(&key, st, pid_tgid, ub, n, false);
        }
        emit_data(id, pid_tgid, dir, 0, SRC_SYSCALL, ub, pos, n);
    }
    0
}

macro_rules! syscall_pair {
    ($enter:ident, $exit:ident, $how:ident, $op:expr) => {
        #[tracepoint]
        pub fn $enter(ctx: TracePointContext) -> u32 {
            $how(&ctx, $op)
        }
        #[tracepoint]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            exit(&ctx)
        }
    };
}

syscall_pair!(socket_enter_read, socket_exit_read, enter_buf, OP_READ);
syscall_pair!(socket_enter_write, socket_exit_write, enter_buf, OP_WRITE);
syscall_pair!(
    socket_enter_recvfrom,
    socket_exit_recvfrom,
    enter_buf,
    OP_READ
);
syscall_pair!(socket_enter_sendto, socket_exit_sendto, enter_buf, OP_WRITE);
syscall_pair!(socket_enter_readv, socket_exit_readv, enter_iov, OP_READ);
syscall_pair!(socket_enter_writev, socket_exit_writev, enter_iov, OP_WRITE);
syscall_pair!(
    socket_enter_recvmsg,
    socket_exit_recvmsg,
    enter_msg,
    OP_READ
);
syscall_pair!(
    socket_enter_sendmsg,
    socket_exit_sendmsg,
    enter_msg,
    OP_WRITE
);

/// sys_enter_sendfile64: the bytes are counted and announced as a hole, never copied.
#[tracepoint]
pub fn socket_enter_sendfile(ctx: TracePointContext) -> u32 {
    enter(&ctx, OP_SENDFILE, 0, 0);
    0
}

#[tracepoint]
pub fn socket_exit_sendfile(ctx: TracePointContext) -> u32 {
    exit(&ctx)
}

/// Creates (or replaces) the connection entry for `key`.
#[inline(always)]
pub fn new_conn(key: &ConnKey, origin: u8, pid_tgid: u64) -> Option<*mut ConnState> {
    if let Some(old) = CONNS.get_ptr_mut(key) {
        // SAFETY: map value pointer.
        let old = unsafe { &*old };
        if old.flags & CONN_F_ANNOUNCED != 0 {
            count(C_FD_REUSED, 1);
            send_close(key, old, pid_tgid);
        }
    }
    let st = ConnState {
        gen: new_gen(),
        pos_in: 0,
        pos_out: 0,
        tuple: Tuple::default(),
        flags: 0,
        origin,
        _pad: [0; 3],
    };
    if CONNS.insert(key, st, 0).is_err() {
        count(C_CONN_TABLE_FULL, 1);
        return None;
    }
    CONNS.get_ptr_mut(key)
}

#[inline(always)]
pub fn send_close(key: &ConnKey, st: &ConnState, pid_tgid: u64) {
    let ev = ConnCloseEvent {
        hdr: header(
            KIND_CONN_CLOSE,
            0,
            core::mem::size_of::<ConnCloseEvent>() as u32,
            pid_tgid,
        ),
        conn: conn_id(key, st),
        pos_in: st.pos_in,
        pos_out: st.pos_out,
    };
    if EVENTS.output::<ConnCloseEvent>(&ev, rb_flags()).is_ok() {
        count(C_EVENTS_SENT, 1);
    } else {
        count(C_RINGBUF_FULL_EVENTS, 1);
    }
}

#[inline(always)]
fn accepted(ctx: &TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !is_target(tgid) {
        return 0;
    }
    let ret: i64 = tp_arg(ctx, RET);
    if ret < 0 {
        return 0;
    }
    new_conn(
        &ConnKey {
            tgid,
            fd: ret as u32,
        },
        ORIGIN_ACCEPT,
        pid_tgid,
    );
    0
}

#[tracepoint]
pub fn socket_exit_accept(ctx: TracePointContext) -> u32 {
    accepted(&ctx)
}

#[tracepoint]
pub fn socket_exit_accept4(ctx: TracePointContext) -> u32 {
    accepted(&ctx)
}

#[tracepoint]
pub fn socket_enter_connect(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !is_target(tgid) {
        return 0;
    }
    let fd: u64 = tp_arg(&ctx, ARG0);
    new_conn(
        &ConnKey {
            tgid,
            fd: fd as u32,
        },
        ORIGIN_CONNECT,
        pid_tgid,
    );
    0
}

#[tracepoint]
pub fn socket_enter_close(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !is_target(tgid) {
        return 0;
    }
    let fd: u64 = tp_arg(&ctx, ARG0);
    let key = ConnKey {
        tgid,
        fd: fd as u32,
    };
    // SAFETY: value copied before removal.
    if let Some(st) = unsafe { CONNS.get(key) } {
        if st.flags & CONN_F_ANNOUNCED != 0 {
            send_close(&key, st, pid_tgid);
        }
        let _ = CONNS.remove(key);
    }
    0
}

#[inline(always)]
fn fill_tuple(st: &mut ConnState, sk: u64, family: u16) {
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Head {
        daddr: [u8; 4],
        rcv_saddr: [u8; 4],
        hash: u32,
        dport: u16,
        num: u16,
    }
    // SAFETY: reading kernel memory of a live `struct sock` passed by the tracepoint.
    let Ok(h) = (unsafe { bpf_probe_read_kernel(sk as *const Head) }) else {
        return;
    };
    let mut t = Tuple {
        family,
        local_port: h.num,
        peer_port: u16::from_be(h.dport),
        ..Tuple::default()
    };
    if family == AF_INET {
        t.local_addr[..4].copy_from_slice(&h.rcv_saddr);
        t.peer_addr[..4].copy_from_slice(&h.daddr);
    } else if let Some(cfg) = config() {
        // SAFETY: as above, at offsets read from the kernel's BTF by the agent.
        unsafe {
            if let Ok(a) =
                bpf_probe_read_kernel((sk + cfg.off_v6_rcv_saddr as u64) as *const [u8; 16])
            {
                t.local_addr = a;
            }
            if let Ok(a) = bpf_probe_read_kernel((sk + cfg.off_v6_daddr as u64) as *const [u8; 16])
            {
                t.peer_addr = a;
            }
        }
    }
    st.tuple = t;
    st.flags |= CONN_F_TUPLE;
    if PLAIN_PORTS.get_ptr(t.local_port).is_some() {
        st.flags |= CONN_F_PLAIN;
    }
}

/// Fires inside the socket syscall: learns the 4-tuple, marks connections that an SSL call is
/// using as TLS (their ciphertext is never captured), and decides plaintext capture.
#[inline(always)]
fn on_sock(ctx: &TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(inf) = INFLIGHT.get_ptr_mut(pid_tgid) else {
        return 0;
    };
    // SAFETY: map value pointer, valid for this run.
    let inf = unsafe { &mut *inf };
    let family: u16 = tp_arg(ctx, 16);
    let protocol: u16 = tp_arg(ctx, 18);
    if protocol != 6 || (family != AF_INET && family != AF_INET6) {
        return 0;
    }
    let sk: u64 = tp_arg(ctx, 8);
    let key = ConnKey {
        tgid: (pid_tgid >> 32) as u32,
        fd: inf.fd,
    };
    let st = match CONNS.get_ptr_mut(key) {
        Some(p) => p,
        None => match new_conn(&key, ORIGIN_MIDSTREAM, pid_tgid) {
            Some(p) => p,
            None => return 0,
        },
    };
    // SAFETY: map value pointer.
    let st = unsafe { &mut *st };
    if st.flags & CONN_F_TUPLE == 0 {
        fill_tuple(st, sk, family);
    }
    if let Some(call) = SSL_ACTIVE.get_ptr_mut(pid_tgid) {
        // SAFETY: map value pointer.
        unsafe { (*call).fd = inf.fd };
        st.flags |= CONN_F_TLS;
        inf.capture = 0;
        return 0;
    }
    if st.flags & CONN_F_TLS == 0 && st.flags & CONN_F_PLAIN != 0 {
        inf.capture = 1;
    }
    // Only reads outside an SSL call matter here: they are how memory-BIO users (node) fetch
    // the ciphertext that their next SSL_read decrypts.
    if inf.op == OP_READ {
        let _ = LAST_RFD.insert(pid_tgid, inf.fd, 0);
    }
    0
}

#[tracepoint]
pub fn socket_sock_recv(ctx: TracePointContext) -> u32 {
    on_sock(&ctx)
}

#[tracepoint]
pub fn socket_sock_send(ctx: TracePointContext) -> u32 {
    on_sock(&ctx)
}
