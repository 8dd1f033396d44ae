//! Diagnostics of the kernel programs through aya-log: rare messages for the operator, never
//! data (data travels through `EVENTS`, and every loss is counted in `COUNTERS`).
//!
//! A message is logged only the first time its counter counts on a CPU ([`warn_first!`]), so
//! however often its condition recurs it costs at most one line per CPU per load; the counter
//! keeps counting every case. Only programs that run per process event (fork, exec) log: the
//! programs that run per read/write call and per packet have no log statement at all, so the
//! capture path costs exactly what it did without aya-log.
//!
//! The agent prints the messages under the log target [`TARGET`], filtered like its own logs.

use crate::maps::COUNTERS;

/// The `log` target of every kernel message in the agent (`RUST_LOG=sparbar::kernel=debug`).
pub const TARGET: &str = "sparbar::kernel";

/// Counts one case of counter `idx` (as `maps::count`) and says whether it was the first on
/// this CPU. The agent never resets the counters, so this is true once per CPU per load.
#[inline(always)]
pub fn count_first(idx: u32) -> bool {
    match COUNTERS.get_ptr_mut(idx) {
        Some(p) => {
            // SAFETY: per-CPU slot of this CPU; programs do not migrate while running.
            unsafe {
                let first = *p == 0;
                *p += 1;
                first
            }
        }
        None => false,
    }
}

/// Counts one case of counter `$idx` and, the first time on this CPU, logs a warning under
/// [`TARGET`] (the arguments of `aya_log_ebpf::warn!` after its context).
macro_rules! warn_first {
    ($idx:expr, $($msg:tt)+) => {
        if $crate::diag::count_first($idx) {
            aya_log_ebpf::warn!(&(), target: $crate::diag::TARGET, $($msg)+);
        }
    };
}
pub(crate) use warn_first;
