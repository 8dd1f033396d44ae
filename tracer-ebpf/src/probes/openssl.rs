//! OpenSSL uprobes: the plaintext of SSL_read/SSL_read_ex/SSL_write/SSL_write_ex, mapped to the
//! socket the call used. Attached to libssl (1.1 and 3.x share these signatures) and to
//! executables that export a statically linked OpenSSL's symbols.
//!
//! Mapping an SSL* to its socket, in order of trust: the socket syscall seen on this thread
//! during the call; the per-SSL* cache (seeded by SSL_set_fd); the last socket this thread read
//! (for memory-BIO users such as node, whose socket I/O happens outside the SSL call); else the
//! data still flows, positioned per SSL* and flagged unmapped. Every fallback is counted.
//!
//! What an edge process reads is also checked for blocked session tokens (`tokens`), before
//! its data event is sent.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use tracer_common::*;

use crate::{
    emit::*,
    maps::*,
    probes::socket::{new_conn, send_close},
    tokens::check_read,
};

#[inline(always)]
fn ssl_enter(ctx: &ProbeContext, op: u8, ex: bool) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !is_target((pid_tgid >> 32) as u32) {
        return 0;
    }
    let ssl: u64 = ctx.arg(0).unwrap_or(0);
    let buf: u64 = ctx.arg(1).unwrap_or(0);
    let len_ptr: u64 = if ex { ctx.arg(3).unwrap_or(0) } else { 0 };
    if ssl == 0 || (ex && len_ptr == 0) {
        return 0;
    }
    let call = SslCall {
        ssl,
        buf,
        len_ptr,
        fd: NO_FD,
        op,
        _pad: [0; 3],
    };
    if SSL_ACTIVE.insert(pid_tgid, call, 0).is_err() {
        count(C_INFLIGHT_FULL, 1);
    }
    0
}

/// `int SSL_read(SSL *ssl, void *buf, int num)`
#[uprobe]
pub fn openssl_ssl_read(ctx: ProbeContext) -> u32 {
    ssl_enter(&ctx, OP_READ, false)
}

/// `int SSL_read_ex(SSL *ssl, void *buf, size_t num, size_t *readbytes)`
#[uprobe]
pub fn openssl_ssl_read_ex(ctx: ProbeContext) -> u32 {
    ssl_enter(&ctx, OP_READ, true)
}

/// `int SSL_write(SSL *ssl, const void *buf, int num)`
#[uprobe]
pub fn openssl_ssl_write(ctx: ProbeContext) -> u32 {
    ssl_enter(&ctx, OP_WRITE, false)
}

/// `int SSL_write_ex(SSL *ssl, const void *buf, size_t num, size_t *written)`
#[uprobe]
pub fn openssl_ssl_write_ex(ctx: ProbeContext) -> u32 {
    ssl_enter(&ctx, OP_WRITE, true)
}

/// Return of any of the four: how many bytes moved, and where they belong.
#[uretprobe]
pub fn openssl_ssl_rw_ret(ctx: RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: value copied before removal.
    let Some(call) = (unsafe { SSL_ACTIVE.get(pid_tgid) }).copied() else {
        return 0;
    };
    let _ = SSL_ACTIVE.remove(pid_tgid);
    let ret: i64 = ctx.ret();
    let ret = ret as i32;
    let n: u64 = if call.len_ptr != 0 {
        if ret != 1 {
            return 0;
        }
        // SAFETY: reading the caller's size_t out-parameter; failure means nothing to report.
        match unsafe { bpf_probe_read_user(call.len_ptr as *const u64) } {
            Ok(v) => v,
            Err(_) => return 0,
        }
    } else {
        if ret <= 0 {
            return 0;
        }
        ret as u64
    };
    if n == 0 {
        return 0;
    }
    count(C_SSL_CALLS, 1);
    let tgid = (pid_tgid >> 32) as u32;
    let skey = SslKey {
        tgid,
        _pad: 0,
        ssl: call.ssl,
    };
    // SAFETY: value copied.
    let cached = unsafe { SSL_FDS.get(skey) }.copied();
    let mut flags = DATA_F_TLS;
    let fd = if call.fd != NO_FD {
        if let Some(c) = cached {
            if c != call.fd {
                count(C_SSL_FD_INCONSISTENT, 1);
                let _ = SSL_FDS.insert(skey, call.fd, 0);
            }
        } else {
            let _ = SSL_FDS.insert(skey, call.fd, 0);
        }
        call.fd
    } else if let Some(c) = cached {
        c
    } else if let Some(last) = unsafe { LAST_RFD.get(pid_tgid) }.copied() {
        count(C_SSL_FD_HEURISTIC, 1);
        let _ = SSL_FDS.insert(skey, last, 0);
        last
    } else {
        count(C_SSL_FD_UNKNOWN, 1);
        flags |= DATA_F_SSL_UNMAPPED;
        0x8000_0000 | ((call.ssl >> 4) as u32 & 0x7fff_ffff)
    };
    let key = ConnKey { tgid, fd };
    let st = match CONNS.get_ptr_mut(key) {
        Some(p) => p,
        None => match new_conn(&key, ORIGIN_MIDSTREAM, pid_tgid) {
            Some(p) => p,
            None => return 0,
        },
    };
    // SAFETY: map value pointer, valid for this run.
    let st = unsafe { &mut *st };
    st.flags |= CONN_F_TLS;
    st.flags &= !CONN_F_PLAIN;
    if flags & DATA_F_SSL_UNMAPPED != 0 {
        st.flags |= CONN_F_UNMAPPED;
    }
    announce(&key, st, pid_tgid);
    let ub = UserBuf {
        ptr: call.buf,
        iovcnt: 0,
    };
    if call.op == OP_READ {
        check_read(&key, st, pid_tgid, ub, n, true);
    }
    let id = conn_id(&key, st);
    let (dir, pos) = if call.op == OP_READ {
        let p = st.pos_in;
        st.pos_in += n;
        (DIR_IN, p)
    } else {
        let p = st.pos_out;
        st.pos_out += n;
        (DIR_OUT, p)
    };
    emit_data(id, pid_tgid, dir, flags, SRC_TLS, ub, pos, n);
    0
}

/// `int SSL_set_fd(SSL *ssl, int fd)`: a hint for the SSL* → socket cache.
#[uprobe]
pub fn openssl_ssl_set_fd(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !is_target(tgid) {
        return 0;
    }
    let ssl: u64 = ctx.arg(0).unwrap_or(0);
    let fd: i64 = ctx.arg(1).unwrap_or(-1);
    if ssl != 0 && fd >= 0 {
        let _ = SSL_FDS.insert(SslKey { tgid, _pad: 0, ssl }, fd as u32, 0);
    }
    0
}

/// `void SSL_free(SSL *ssl)`: the end of a TLS connection object. Forgets the cache entry and
/// closes a connection that was only known by its SSL*.
#[uprobe]
pub fn openssl_ssl_free(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !is_target(tgid) {
        return 0;
    }
    let ssl: u64 = ctx.arg(0).unwrap_or(0);
    let _ = SSL_FDS.remove(SslKey { tgid, _pad: 0, ssl });
    let key = ConnKey {
        tgid,
        fd: 0x8000_0000 | ((ssl >> 4) as u32 & 0x7fff_ffff),
    };
    // SAFETY: value copied before removal.
    if let Some(st) = unsafe { CONNS.get(key) }.copied() {
        if st.flags & CONN_F_UNMAPPED != 0 {
            send_close(&key, &st, pid_tgid);
            let _ = CONNS.remove(key);
        }
    }
    0
}
