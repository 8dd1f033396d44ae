//! The one place a step's [`Effects`] are carried out: kernel actions first (their outcome goes
//! back to the pipeline, which records each decision's first enforcement), then records to the
//! trail, the decisions in force to their file and feed, and process changes to discovery. The
//! kernel side and the trail are traits, so tests run the whole path with fakes and no root.

use std::collections::BTreeMap;

use log::warn;

use crate::{
    detect::decide::Decisions,
    exchange::Tuple,
    pipeline::{Action, Effects, Pipeline, ProcChange},
    record::security::Enforcement,
    stats::{Metric, Stats},
};

/// What the commit needs of the kernel and of discovery.
pub trait KernelSide {
    type Error: std::fmt::Display;
    /// The egress filter that drops a blocked connection's answers is attached.
    fn enforcing(&self) -> bool;
    /// Drops the connection's answers from now on.
    fn block_conn(&mut self, t: Tuple) -> Result<(), Self::Error>;
    fn unblock_conn(&mut self, t: Tuple) -> Result<(), Self::Error>;
    /// Resets the connection (SOCK_DESTROY); `Ok(false)` when it was already gone.
    fn reset_conn(&mut self, t: Tuple) -> Result<bool, Self::Error>;
    /// Refuses requests carrying this token (its kernel hash) from now on.
    fn block_token(&mut self, hash: u64) -> Result<(), Self::Error>;
    fn unblock_token(&mut self, hash: u64) -> Result<(), Self::Error>;
    /// Checks this session token's requests against its tenant from now on.
    fn session_tenant(&mut self, hash: u64, tenant: u64) -> Result<(), Self::Error>;
    /// A traced process exec'd or exited: discovery looks at it again.
    fn process_changed(&mut self, c: ProcChange);
}

/// What the commit needs of the audit trail and the state directory.
pub trait Trail {
    /// Takes the records into the spools (security first); the vectors are left empty. Called
    /// on every commit, also with nothing new, so a backlog is retried.
    fn write(&mut self, access: &mut Vec<Vec<u8>>, security: &mut Vec<Vec<u8>>);
    /// The decisions in force, when they changed (`None`: no change since the last commit;
    /// a save that failed before is retried).
    fn decisions(&mut self, changed: Option<Decisions>);
}

/// Carries out `fx` in order: kernel actions, records, decisions, process changes.
pub fn commit(
    p: &mut Pipeline,
    fx: Effects,
    kernel: &mut impl KernelSide,
    trail: &mut impl Trail,
    stats: &Stats,
) {
    let Effects {
        kernel: actions,
        mut access,
        mut security,
        decisions,
        procs,
    } = fx;
    let done = apply(actions, kernel, stats);
    let mut decisions = decisions;
    if !done.is_empty() {
        let more = p.enforcement_done(done);
        security.extend(more.security);
        decisions = more.decisions.or(decisions);
    }
    trail.write(&mut access, &mut security);
    trail.decisions(decisions);
    for c in procs {
        kernel.process_changed(c);
    }
}

/// Carries out the kernel actions; what each decision's enforcement did, by decision id.
pub fn apply(
    actions: Vec<Action>,
    kernel: &mut impl KernelSide,
    stats: &Stats,
) -> BTreeMap<String, Enforcement> {
    let mut per_decision: BTreeMap<String, Enforcement> = BTreeMap::new();
    for a in actions {
        match a {
            Action::BlockConn { tuple, decision } => {
                let e = per_decision.entry(decision).or_default();
                if kernel.enforcing() {
                    match kernel.block_conn(tuple) {
                        Ok(()) => {
                            e.connections_blocked += 1;
                            stats.add(Metric::EnforcementConnectionsBlocked, 1);
                        }
                        Err(err) => {
                            stats.add_reason(Metric::EnforcementFailures, "block", 1);
                            e.errors.push(err.to_string());
                        }
                    }
                } else {
                    e.errors
                        .push("the kernel egress filter is not attached".into());
                }
                match kernel.reset_conn(tuple) {
                    Ok(true) => {
                        e.connections_reset += 1;
                        stats.add(Metric::EnforcementConnectionsReset, 1);
                    }
                    // Closed before the reset came: nothing left to do.
                    Ok(false) => stats.add(Metric::EnforcementConnectionsGone, 1),
                    Err(err) => {
                        stats.add_reason(Metric::EnforcementFailures, "reset", 1);
                        e.errors.push(err.to_string());
                    }
                }
            }
            Action::BlockToken { hash, decision } => {
                let e = per_decision.entry(decision).or_default();
                match kernel.block_token(hash) {
                    Ok(()) => {
                        e.tokens_blocked += 1;
                        stats.add(Metric::EnforcementTokensBlocked, 1);
                    }
                    Err(err) => {
                        stats.add_reason(Metric::EnforcementFailures, "token", 1);
                        e.errors.push(err.to_string());
                    }
                }
            }
            Action::SessionTenant { hash, tenant } => match kernel.session_tenant(hash, tenant) {
                Ok(()) => stats.add(Metric::EnforcementSessionTenants, 1),
                Err(err) => {
                    stats.add_reason(Metric::EnforcementFailures, "session_tenant", 1);
                    warn!("checking a session's tenant in the kernel: {err}");
                }
            },
            Action::UnblockToken { hash } => {
                if let Err(err) = kernel.unblock_token(hash) {
                    stats.add_reason(Metric::EnforcementFailures, "unblock_token", 1);
                    warn!("unblocking a token: {err}");
                }
            }
            Action::UnblockConn { tuple } => {
                if kernel.enforcing() {
                    if let Err(err) = kernel.unblock_conn(tuple) {
                        stats.add_reason(Metric::EnforcementFailures, "unblock", 1);
                        warn!("unblocking {} <-> {}: {err}", tuple.local, tuple.peer);
                    }
                }
            }
        }
    }
    per_decision
}
