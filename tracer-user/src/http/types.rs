//! The small vocabulary every part of the HTTP/1.1 parser shares: directions, roles, what a
//! connection carries, the limits, and what a direction is expected to carry. A leaf: it
//! depends on no other part of `http`.

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
    /// Started with the HTTP/2 preface; nothing is parsed.
    Http2Unsupported,
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
}

impl Default for ParserLimits {
    fn default() -> Self {
        ParserLimits {
            max_header_bytes: 64 * 1024,
            body_keep_bytes: 1 << 20,
            max_decoded_bytes: 8 << 20,
            max_outstanding_requests: 64,
            stream: StreamLimits::default(),
        }
    }
}

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
