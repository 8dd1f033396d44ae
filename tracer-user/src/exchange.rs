//! The meeting point of the HTTP parser and everything after it: one request paired with its
//! response, as parsed from a reassembled connection, with what is known about its completeness.

use std::net::SocketAddr;

use bytes::Bytes;

/// The addresses of a connection as the traced server sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuple {
    /// The server's own address (`server.*`).
    pub local: SocketAddr,
    /// The client's address (`source.*`).
    pub peer: SocketAddr,
}

/// One header as seen on the wire. Names keep their original case; compare with
/// `eq_ignore_ascii_case`. Values are raw bytes (they need not be UTF-8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: Vec<u8>,
}

/// Why a body (or part of one) is not in `Body::data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BodyLoss {
    /// Bytes were never captured (the kernel cut them at the per-call cap, sendfile, or
    /// a ring-buffer loss). The wire length is still known.
    NotCaptured,
    /// The body was longer than the agent keeps in memory (`body_keep_bytes`).
    KeptLimit,
    /// gzip/deflate decoding failed; `data` holds what decoded before the error.
    DecodeError,
    /// The connection ended (or a gap hit) before the body was complete.
    Incomplete,
}

/// A message body: `wire_len` counts bytes on the wire (after chunked framing is removed, before
/// content decoding), `data` is the decoded body as far as it was kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Body {
    pub wire_len: u64,
    pub data: Bytes,
    pub loss: Option<BodyLoss>,
    /// `Content-Encoding` that was decoded (`gzip`, `deflate`), if any.
    pub decoded_from: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The request target exactly as sent (origin-form path and query, or absolute-form).
    pub target: String,
    /// `1` for HTTP/1.1, `0` for HTTP/1.0.
    pub minor_version: u8,
    pub headers: Vec<Header>,
    pub body: Body,
    /// Monotonic kernel timestamps (ns) of the first and last byte seen of this message.
    pub first_ns: u64,
    pub last_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    pub minor_version: u8,
    pub headers: Vec<Header>,
    pub body: Body,
    pub first_ns: u64,
    pub last_ns: u64,
}

/// How a request/response pair ended up. `Complete` is the normal case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Completeness {
    Complete,
    /// The response never came (connection closed, or the agent stopped first).
    NoResponse,
    /// Part of the exchange fell in a capture gap; the fields present are still right.
    Partial,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    pub request: Request,
    pub response: Option<Response>,
    pub completeness: Completeness,
    /// Set when this connection switched protocols (101 Upgrade or a 2xx CONNECT) after this
    /// exchange; nothing after it on the connection is parsed as HTTP/1.
    pub upgraded: bool,
}

impl Header {
    pub fn value_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.value).ok()
    }
}

/// First header named `name` (ASCII case-insensitive).
pub fn header<'a>(headers: &'a [Header], name: &str) -> Option<&'a Header> {
    headers.iter().find(|h| h.name.eq_ignore_ascii_case(name))
}
