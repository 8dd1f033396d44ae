//! Spårbar's kernel programs: OpenSSL uprobes and socket/sched tracepoints that copy HTTP bytes of
//! the target processes into one ring buffer, with every loss counted.
//!
//! Only uprobes, tracepoints and cgroup programs are used: they work on hardened kernels without
//! kprobes or fentry.
#![no_std]
#![no_main]
#![allow(static_mut_refs)]

mod diag;
mod emit;
mod maps;
mod probes;
mod tokens;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible licence: needed for bpf_probe_read_user and friends.
#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
