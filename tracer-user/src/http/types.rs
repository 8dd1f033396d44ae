//! The small vocabulary every part of the HTTP/1.1 parser shares: directions, roles, what a
//! connection carries, the limits, and what a direction is expected to carry. A leaf: it
//! depends on no other part of `http`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::http::reassembly::StreamLimits;

/// Shortest possible HTTP/1.x message (T3 in the `http` module docs).
pub const MIN_MSG_LEN: u64 = 14;

/// Direction of bytes relative to the traced process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dir {
    /// Bytes the traced process read.
    Inbound,
    /// Bytes the traced process wrote.
    Outbound,
}

impl Dir {
    pub(super) fn idx(self) -> usize {
        match self {
            Dir::Inbound => 0,
            Dir::Outbound => 1,
        }
    }

    pub(super) fn other(self) -> Dir {
        match self {
            Dir::Inbound => Dir::Outbound,
            Dir::Outbound => Dir::Inbound,
        }
    }
}

/// Which side of the connection the traced process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Inbound bytes are requests.
    Server,
    /// Inbound bytes are responses.
    Client,
    /// Decided from the content: the first direction whose first line parses as a request line
    /// or a status line.
    Unknown,
}

/// What the connection turned out to carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnProtocol {
    Http1,
    /// Started with the HTTP/2 preface: parsed as HTTP/2 from there.
    Http2,
    /// HTTP/2 frames from the first byte seen: a connection first seen mid-life, whose HPACK
    /// state is unknown. Counted, not parsed (nothing is guessed).
    Http2Midstream,
    /// TLS records where plaintext was expected; nothing is parsed.
    TlsOnPlaintext,
    /// Switched protocols (101, or a 2xx answer to CONNECT); nothing after is parsed.
    Upgraded,
    /// Nothing recognisable yet.
    Unknown,
}

/// Not `Copy` on purpose: callers keep one and `clone()` it per connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParserLimits {
    /// Longest request/status line plus headers (and trailers) accepted (64 KiB).
    pub max_header_bytes: usize,
    /// Decoded body bytes kept per message (1 MiB).
    pub body_keep_bytes: usize,
    /// Most output a content decoder may produce per message (gzip bomb guard, 8 MiB).
    pub max_decoded_bytes: usize,
    /// Requests waiting for their responses (pipelining depth, 64).
    pub max_outstanding_requests: usize,
    pub stream: StreamLimits,
    /// Body bytes held in memory across all connections that share this budget (clones of
    /// one `ParserLimits` share it).
    pub body_budget: BodyBudget,
}

impl Default for ParserLimits {
    fn default() -> Self {
        ParserLimits {
            max_header_bytes: 64 * 1024,
            body_keep_bytes: 1 << 20,
            max_decoded_bytes: 8 << 20,
            max_outstanding_requests: 64,
            stream: StreamLimits::default(),
            body_budget: BodyBudget::new(DEFAULT_BODY_BUDGET_BYTES),
        }
    }
}

/// Default for [`BodyBudget`]: 64 MiB, 64 bodies at the default keep limit of 1 MiB. The
/// config's default (`capture.body_budget_bytes`) is the same (a test checks it).
pub const DEFAULT_BODY_BUDGET_BYTES: u64 = 64 << 20;

/// A global bound on the body bytes the parser holds in memory: bodies being read, and bodies
/// of parsed messages until the exchange that carries them is dropped. A body that would go
/// over it is cut (`BodyLoss::KeptLimit`, anomaly `body_over_budget`); the exchange is still
/// recorded. Clones share one count.
#[derive(Debug, Clone)]
pub struct BodyBudget {
    inner: Arc<BudgetInner>,
}

#[derive(Debug)]
struct BudgetInner {
    limit: u64,
    used: AtomicU64,
}

impl BodyBudget {
    pub fn new(limit: u64) -> Self {
        BodyBudget {
            inner: Arc::new(BudgetInner {
                limit,
                used: AtomicU64::new(0),
            }),
        }
    }

    pub fn limit(&self) -> u64 {
        self.inner.limit
    }

    /// Bytes held now.
    pub fn in_use(&self) -> u64 {
        self.inner.used.load(Ordering::Relaxed)
    }

    /// Takes `want` bytes if they fit under the limit, all or nothing.
    pub(super) fn take(&self, want: u64) -> bool {
        let u = &self.inner.used;
        let mut cur = u.load(Ordering::Relaxed);
        loop {
            let Some(next) = cur.checked_add(want).filter(|&n| n <= self.inner.limit) else {
                return false;
            };
            match u.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    pub(super) fn give_back(&self, n: u64) {
        if n > 0 {
            self.inner.used.fetch_sub(n, Ordering::Relaxed);
        }
    }
}

/// Two budgets are the same setting when their limits are equal (a configuration compares
/// limits; the counts in flight are not part of it).
impl PartialEq for BodyBudget {
    fn eq(&self, other: &Self) -> bool {
        self.limit() == other.limit()
    }
}

impl Eq for BodyBudget {}

/// What a direction carries: requests, responses, or not known yet (the role is undecided).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Request,
    Response,
    Unknown,
}

pub(super) fn kind_of(role: Role, dir: Dir) -> Kind {
    match (role, dir) {
        (Role::Server, Dir::Inbound) | (Role::Client, Dir::Outbound) => Kind::Request,
        (Role::Server, Dir::Outbound) | (Role::Client, Dir::Inbound) => Kind::Response,
        (Role::Unknown, _) => Kind::Unknown,
    }
}

/// What a request's method means for its response's framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Class {
    Head,
    Connect,
    Other,
}
