//! Enforcement: drops every egress packet of the TCP connections the agent blocked, so a blocked
//! server's answers never leave the host. The agent resets such a connection separately
//! (SOCK_DESTROY over netlink); the reset this causes is let through.
//!
//! The connection is read from the packet's own IP and TCP headers (a cgroup_skb program sees
//! the packet from its network header on), not from `__sk_buff`'s socket fields: that keys
//! IPv4 traffic of dual-stack sockets as plain IPv4 and avoids the fields' mixed byte orders.

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{helpers::bpf_skb_load_bytes, macros::cgroup_skb, programs::SkBuffContext};
use tracer_common::*;

use crate::maps::*;

const PASS: i32 = 1;
const DROP: i32 = 0;
const IPPROTO_TCP: u8 = 6;
const TCP_FLAG_RST: u8 = 0x04;

/// Offsets in the IPv4 header.
const IP4_PROTOCOL: u32 = 9;
const IP4_FRAG_OFF: u32 = 6;
const IP4_SADDR: u32 = 12;
const IP4_DADDR: u32 = 16;
/// Offsets in the (fixed, 40-byte) IPv6 header.
const IP6_NEXT_HEADER: u32 = 6;
const IP6_SADDR: u32 = 8;
const IP6_DADDR: u32 = 24;
const IP6_LEN: u32 = 40;

/// The first 14 bytes of a TCP header, fields in network byte order.
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpHead {
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    doff: u8,
    flags: u8,
}

/// Copies `size_of::<T>()` packet bytes at `off` (from the IP header) into `dst`.
#[inline(always)]
fn load_into<T: Copy>(ctx: &SkBuffContext, off: u32, dst: &mut T) -> Result<(), i64> {
    // SAFETY: the helper writes exactly size_of::<T>() bytes to `dst`, which is that large, and
    // T is plain data (integers and byte arrays) for which any bytes are valid.
    let r = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const c_void,
            off,
            dst as *mut T as *mut c_void,
            size_of::<T>() as u32,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(r)
    }
}

/// `cgroup_skb/egress`, attached by the agent to the cgroup v2 root as a BPF link, so it runs
/// for every socket of every cgroup beside any other program there. Assumes what such
/// programs get on every kernel since 4.10: the packet starts at its IP header and returning 0
/// drops it. While `ENFORCE_ON[0]` is zero it passes everything after one array lookup.
#[cgroup_skb(egress)]
pub fn enforce_egress(ctx: SkBuffContext) -> i32 {
    try_enforce_egress(&ctx).unwrap_or(PASS)
}

#[inline(always)]
fn try_enforce_egress(ctx: &SkBuffContext) -> Result<i32, i64> {
    match ENFORCE_ON.get(ENFORCE_ON_IDX) {
        Some(on) if *on != 0 => {}
        _ => return Ok(PASS),
    }
    let first: u8 = ctx.load(0)?;
    let mut key = BlockKey::default();
    let l4 = match first >> 4 {
        4 => {
            let protocol: u8 = ctx.load(IP4_PROTOCOL as usize)?;
            // Only the first fragment carries the TCP header (TCP sets DF; this is rare).
            let frag: u16 = ctx.load(IP4_FRAG_OFF as usize)?;
            if protocol != IPPROTO_TCP || u16::from_be(frag) & 0x1fff != 0 {
                return Ok(PASS);
            }
            key.family = AF_INET;
            let mut a = [0u8; 4];
            load_into(ctx, IP4_SADDR, &mut a)?;
            key.local_addr[..4].copy_from_slice(&a);
            load_into(ctx, IP4_DADDR, &mut a)?;
            key.remote_addr[..4].copy_from_slice(&a);
            ((first & 0x0f) as u32) * 4
        }
        6 => {
            let next: u8 = ctx.load(IP6_NEXT_HEADER as usize)?;
            // TCP sockets send no extension headers unless the application sets them.
            if next != IPPROTO_TCP {
                return Ok(PASS);
            }
            key.family = AF_INET6;
            load_into(ctx, IP6_SADDR, &mut key.local_addr)?;
            load_into(ctx, IP6_DADDR, &mut key.remote_addr)?;
            IP6_LEN
        }
        _ => return Ok(PASS),
    };
    let tcp: TcpHead = ctx.load(l4 as usize)?;
    key.local_port = u16::from_be(tcp.sport);
    key.remote_port = u16::from_be(tcp.dport);
    let Some(v) = BLOCK_CONNS.get_ptr(key) else {
        return Ok(PASS);
    };
    // SAFETY: map value pointer, valid for this run.
    let v = unsafe { *v };
    // A hold whose deadline passed: the agent did not judge in time, the answers go.
    // SAFETY: a helper without arguments.
    if v & BLOCK_F_HOLD != 0 && unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() } >= hold_deadline(v)
    {
        return Ok(PASS);
    }
    // The reset of a destroyed connection is how its peer learns that it is gone.
    if tcp.flags & TCP_FLAG_RST != 0 {
        return Ok(PASS);
    }
    count(C_ENFORCE_DROPPED, 1);
    Ok(DROP)
}
