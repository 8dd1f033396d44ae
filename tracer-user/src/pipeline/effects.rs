//! What one batch of kernel events (or a tick, or an operator's command) asks of the world
//! outside the pipeline, as one value: records to spool, kernel work, process changes, and the
//! decisions in force when they changed. The agent carries it out in one place
//! (`agent::commit`); the pipeline never reaches the kernel, the spool or discovery itself.

use crate::{detect::decide::Decisions, exchange::Tuple};

/// What the agent must do in the kernel for a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Drop the connection's responses and reset it.
    BlockConn {
        tuple: Tuple,
        decision: String,
    },
    /// Its block ended, or the connection closed.
    UnblockConn {
        tuple: Tuple,
    },
    /// Recognise this token (its kernel hash) in requests the edge reads, on any connection.
    BlockToken {
        hash: u64,
        decision: String,
    },
    UnblockToken {
        hash: u64,
    },
    /// The kernel checks this session token's requests against its tenant (both kernel hashes):
    /// one that names another tenant is refused as a cross-tenant attempt.
    SessionTenant {
        hash: u64,
        tenant: u64,
    },
}

/// A traced process changed: discovery looks at it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcChange {
    /// It exec'd: it may now be (or no longer be) a target.
    Exec(u32),
    /// It exited.
    Exit(u32),
}

/// The outcome of one step of the agent loop, in the order the commit carries it out.
#[derive(Debug, Default)]
pub struct Effects {
    /// Kernel work: blocks and unblocks of connections and tokens.
    pub kernel: Vec<Action>,
    /// Access records, one compact JSON line each, for the access spool.
    pub access: Vec<Vec<u8>>,
    /// Security records (alerts, decisions), one JSON line each, for the security spool.
    pub security: Vec<Vec<u8>>,
    /// The decisions in force, when they changed: to save and to publish on the feed.
    pub decisions: Option<Decisions>,
    /// Processes that exec'd or exited, in the order seen.
    pub procs: Vec<ProcChange>,
}

impl Effects {
    pub fn is_empty(&self) -> bool {
        self.kernel.is_empty()
            && self.access.is_empty()
            && self.security.is_empty()
            && self.decisions.is_none()
            && self.procs.is_empty()
    }

    /// `later`'s effects after these.
    pub fn extend(&mut self, later: Effects) {
        self.kernel.extend(later.kernel);
        self.access.extend(later.access);
        self.security.extend(later.security);
        if later.decisions.is_some() {
            self.decisions = later.decisions;
        }
        self.procs.extend(later.procs);
    }
}
