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
    /// The header lines the server acts on, in order, duplicates kept (several `Cookie`
    /// lines stay several). Lines the server ignores and trailers are in `wire`, never here.
    pub headers: Vec<Header>,
    pub body: Body,
    /// Monotonic kernel timestamps (ns) of the first and last byte seen of this message.
    pub first_ns: u64,
    pub last_ns: u64,
    pub wire: WireNotes,
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
    pub wire: WireNotes,
}

/// What a message carried besides the headers the server acts on, and what was unusual about
/// it. Kept apart from `headers` on purpose: nothing after the parser (attribution above all)
/// may take a trailer or an ignored line for a header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WireNotes {
    /// Trailer fields of a chunked body. nginx 1.22 skips them; Apache keeps them apart from
    /// the headers (`MergeTrailers off`).
    pub trailers: Vec<Header>,
    /// Header lines the edge ignores (nginx's `ignore_invalid_headers`: names with `_` or
    /// other characters outside `[A-Za-z0-9-]`) or cannot read as a header at all.
    pub ignored_headers: Vec<Header>,
    /// Reasons (the names of [`crate::http::Anomaly::reason`]) of what was unusual about this
    /// message: lenient forms the servers disagree on, conflicting framing, a body cut by the
    /// memory budget. Each was also counted once in `http_anomalies_total`.
    pub anomalies: Vec<&'static str>,
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
    /// The HTTP/2 stream this exchange was (`None`: HTTP/1).
    pub stream_id: Option<u32>,
}

impl Exchange {
    /// The anomaly reasons of the request and the response, each once, request first.
    pub fn anomalies(&self) -> Vec<&'static str> {
        let mut out: Vec<&'static str> = Vec::new();
        let resp = self.response.iter().flat_map(|r| r.wire.anomalies.iter());
        for a in self.request.wire.anomalies.iter().chain(resp) {
            if !out.contains(a) {
                out.push(a);
            }
        }
        out
    }
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
