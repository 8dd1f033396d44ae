//! Process lifecycle: children of target processes are targets at once (nginx workers, also
//! after a reload), processes whose name is configured become targets at exec, and the entries
//! of exited threads and processes are removed. The same holds for edge processes
//! (`ENFORCE_TGIDS`), the ones scanned for blocked tokens.
//!
//! Assumes the sched tracepoint layouts of this kernel generation: sched_process_fork has
//! parent_pid at 12 and child_pid at 20 (comms as __data_loc strings).

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::tracepoint,
    programs::TracePointContext,
};
use tracer_common::*;

use crate::{diag::warn_first, emit::*, maps::*};

#[inline(always)]
fn proc_event(kind: u16, pid_tgid: u64, comm: [u8; COMM_LEN]) {
    let ev = ProcEvent {
        hdr: header(kind, 0, core::mem::size_of::<ProcEvent>() as u32, pid_tgid),
        tgid: (pid_tgid >> 32) as u32,
        _pad: 0,
        comm,
    };
    if EVENTS.output::<ProcEvent>(&ev, rb_flags()).is_ok() {
        count(C_EVENTS_SENT, 1);
    } else {
        count(C_RINGBUF_FULL_EVENTS, 1);
    }
}

// Separate for the same reason as `comm_is_target` below.
#[inline(never)]
fn tgid_is_edge(tgid: u32) -> u32 {
    ENFORCE_TGIDS.get_ptr(tgid).is_some() as u32
}

/// sched:sched_process_fork: the child of a target is a target, the child of an edge process
/// (whose reads are scanned for blocked tokens) an edge process.
#[tracepoint]
pub fn process_fork(ctx: TracePointContext) -> u32 {
    let parent: i32 = tp_arg(&ctx, 12);
    let child: i32 = tp_arg(&ctx, 20);
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if tgid_is_edge(tgid) != 0 || tgid_is_edge(parent as u32) != 0 {
        if let Err(e) = ENFORCE_TGIDS.insert(child as u32, TARGET_FROM_FORK, 0) {
            warn_first!(
                C_TARGETS_FULL,
                "ENFORCE_TGIDS insert failed (error {}): child {} of edge process {} is not scanned for blocked tokens; later cases on this CPU are only counted",
                e,
                child,
                parent
            );
        }
    }
    if TARGET_TGIDS.get_ptr(tgid).is_none() && TARGET_TGIDS.get_ptr(parent as u32).is_none() {
        return 0;
    }
    if let Some(cfg) = config() {
        if cfg.agent_tgid == child as u32 {
            return 0;
        }
    }
    if let Err(e) = TARGET_TGIDS.insert(child as u32, TARGET_FROM_FORK, 0) {
        warn_first!(
            C_TARGETS_FULL,
            "TARGET_TGIDS insert failed (error {}): child {} of target {} is not traced; later cases on this CPU are only counted",
            e,
            child,
            parent
        );
    }
    0
}

// Separate functions: inlined, LLVM merges the two null checks into an OR of two map-value
// pointers, which the verifier rejects ("pointer |= pointer prohibited").
#[inline(never)]
fn comm_is_target(comm: &[u8; COMM_LEN]) -> u32 {
    TARGET_COMMS.get_ptr(comm).is_some() as u32
}

#[inline(never)]
fn tgid_is_target(tgid: u32) -> u32 {
    TARGET_TGIDS.get_ptr(tgid).is_some() as u32
}

/// sched:sched_process_exec: a process whose new name is configured becomes a target; the agent
/// is told about every exec of a target so it can attach to the new image and re-check it.
#[tracepoint]
pub fn process_exec(_ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Ok(comm) = bpf_get_current_comm() else {
        return 0;
    };
    let named = comm_is_target(&comm) != 0;
    let known = tgid_is_target(tgid) != 0;
    if !named && !known {
        return 0;
    }
    if let Some(cfg) = config() {
        if cfg.agent_tgid == tgid {
            return 0;
        }
    }
    if named && !known {
        if let Err(e) = TARGET_TGIDS.insert(tgid, TARGET_FROM_EXEC, 0) {
            warn_first!(
                C_TARGETS_FULL,
                "TARGET_TGIDS insert failed (error {}): process {}, whose name is configured, is not traced; later cases on this CPU are only counted",
                e,
                tgid
            );
        }
    }
    proc_event(KIND_PROC_EXEC, pid_tgid, comm);
    0
}

/// sched:sched_process_exit: fires per thread; forget its per-thread state, its target entry
/// and its edge entry (a process's when its leader exits, a thread's own when it exits).
#[tracepoint]
pub fn process_exit(_ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let tgid = (pid_tgid >> 32) as u32;
    if tgid_is_edge(tid) != 0 {
        let _ = ENFORCE_TGIDS.remove(tid);
    }
    if TARGET_TGIDS.get_ptr(tgid).is_none() && TARGET_TGIDS.get_ptr(tid).is_none() {
        return 0;
    }
    let _ = INFLIGHT.remove(pid_tgid);
    let _ = SSL_ACTIVE.remove(pid_tgid);
    let _ = LAST_RFD.remove(pid_tgid);
    if tid == tgid {
        let _ = TARGET_TGIDS.remove(tgid);
        proc_event(KIND_PROC_EXIT, pid_tgid, [0; COMM_LEN]);
    } else {
        // A thread's own entry, inserted when it was cloned.
        if let Some(v) = unsafe { TARGET_TGIDS.get(tid) } {
            if *v == TARGET_FROM_FORK {
                let _ = TARGET_TGIDS.remove(tid);
            }
        }
    }
    0
}
