//! Turns the two reassembled byte streams of one traced connection into HTTP/1.1 request/response
//! pairs ([`Exchange`]), surviving what capture does to a stream: pieces that are missing,
//! uncaptured on purpose, or start in the middle of a message. It knows nothing of eBPF; it sees
//! positions, timestamps, bytes and holes.
//!
//! # Structure
//!
//! Each direction has a [`Stream`] (reassembly) and a message parser (`DirState`) that turns
//! the in-order pieces into request or response messages. Parsed messages go into a pairing
//! queue (`Pairing`), which matches the n-th request with the n-th final response (1xx interim
//! responses consume no request). A connection seen from its start has positions starting at 0
//! in both directions (so a loss of its first bytes is a gap); one picked up midstream starts
//! each direction at the first position it sees.
//!
//! # Gaps and resynchronisation
//!
//! A hole (known or lost) that falls inside a body of known extent (Content-Length, the data
//! of one chunk, or a body delimited by the connection's close) is skipped: the framing is
//! still known, `Body::wire_len` stays right and `BodyLoss::NotCaptured` is set (a lost one is
//! also counted as `gap_in_body`). Any other hole means message boundaries are lost
//! (`gap_resync`): the message in progress is finished as partial when its head was parsed (or
//! counted as lost when it was not), and the direction scans for the next message start, never
//! stitching bytes across the hole:
//!
//! - requests: a line that httparse accepts as a request line, starting right after a `\n`, or
//!   at the first byte after the hole or of a new piece (one read/write call); at those last
//!   two places the line may be the tail of a cut one (`EAD /x` of `HEAD /x`), so only the
//!   standard methods are believed there;
//! - responses: `HTTP/1.x NNN` accepted by httparse as a status line, at any position (a
//!   response usually follows the previous body with no line break).
//!
//! # Pairing after a gap (the soundness argument)
//!
//! Wherever messages may have been lost, the pairing queue of that direction holds a *loss
//! marker* with a range `lo..=hi` for the number of lost messages that count in pairing.
//! Pairing goes on past a marker only when that number is *certain*; otherwise the connection
//! is declared desynchronised: from then on requests are emitted with `response: None`
//! (`Completeness::Partial`, anomaly `pairing_uncertain`) and responses are dropped (anomaly
//! `unpaired_response`). The reasoning rests on these assumptions, and on nothing else:
//!
//! - **T1** Within one direction, timestamps do not decrease with the stream position.
//! - **T2** A response's first byte is not earlier than the last byte of its request's head
//!   (a server answers after it has read the request line and headers; it may answer before
//!   the request body, which is why the head and not the whole request is used).
//! - **T3** An HTTP/1.x message is at least [`MIN_MSG_LEN`] (14) bytes long
//!   (`A / HTTP/1.1\n\n`, `HTTP/1.1 200\n\n`), and between two requests there are at most
//!   2 stray bytes (CRLF).
//!
//! Bounds of a marker. Let the lost region run from B (where knowledge stopped) to P (where the
//! resynchronised message starts). `hi` is the number of cut or malformed heads plus
//! `unknown_bytes / 14` (T3). `lo` is 1 when a cut or malformed request head was seen, or when
//! on the request side B is a known message boundary and the region has at least 16 bytes
//! (T3). On the response side the region may hold nothing but interim 1xx responses (which
//! pair with nothing), so `lo` is 1 only when a cut head shows a final status (`HTTP/1.1 2..`).
//!
//! *Responses lost* (a marker on the response side; `ta` = timestamp of the first byte of the
//! message after the region): a lost response began at or before `ta` (T1), so its request's
//! head ended at or before `ta` (T2). Once every request whose head may end by `ta` is parsed
//! (the request direction consumed a byte stamped after `ta` and is not itself
//! resynchronising, or the connection closed with its end positions known), the candidates
//! are exactly the pending requests with `head_ns <= ta`, a prefix `D` of the queue, so
//! `hi <= |D|`. Then each count `k` is checked against the responses already parsed after the
//! marker: under `k`, the i-th of them answers pending request `k + i`, which must exist (or
//! still be able to arrive: the request watermark is not past the response's first byte) with
//! a head ending no later than that response's first byte (T2). A larger `k` only makes this
//! harder, so failures lower `hi`. When `lo == hi`, the first `lo` candidates are emitted
//! without response (anomaly `response_lost`) and pairing continues.
//!
//! *Requests lost* (a marker on the request side; `tb` = timestamp of the last byte before the
//! region): a lost request's head ended at or after `tb` (T1), so a response starting before
//! `tb` cannot answer it (T2), which bounds `hi`; and under `k`, the responses `k, k+1, ..`
//! answer the requests after the marker, each no earlier than that request's head (T2), which
//! raises `lo`. When `lo == hi` the next `lo` responses are dropped as answers to lost requests.
//!
//! *Framing by guess.* A response's body framing depends on its request (HEAD, CONNECT). When
//! the request is not known for certain (after a gap), the response is framed as if it
//! answered a GET. If it then pairs with a known HEAD request, its body is dropped, the pair is
//! partial and the connection desynchronises (`framing_guess_wrong`). Because the request may
//! be unknowable (lost), a response framed by guess with a Content-Length is followed by a
//! response-side marker (`lo = 0`, `hi = body / 14`, `ta` = its last byte): if it answered a
//! HEAD, the responses swallowed as its body are accounted for like a gap. A response whose
//! request is simply not parsed yet waits for it (bounded by the stream's pending limit).
//!
//! *What this costs.* Lower bounds only come from T3 and visible heads, and clients may
//! pipeline, so a gap that loses whole messages without leaving a visible head usually leaves
//! `lo < hi` and desynchronises the connection for good: the price of never pairing wrongly.
//! A connection picked up midstream starts desynchronised for the same reason (requests sent
//! before capture began may still be waiting for their responses), and so does one whose
//! pipeline overflows `max_outstanding_requests`. Without the final positions
//! ([`ConnParser::close_at`]) a loss at the very end of a stream is invisible, so at close
//! fewer pairings after a gap can be proven.

use std::collections::VecDeque;
use std::io::Write;

use bytes::Bytes;
use flate2::write::{DeflateDecoder, GzDecoder, ZlibDecoder};

use crate::exchange::{header, Body, BodyLoss, Completeness, Exchange, Header, Request, Response};
use crate::reassembly::{Piece, Stream, StreamLimits, StreamStats};

/// Shortest possible HTTP/1.x message (T3 in the module docs).
pub const MIN_MSG_LEN: u64 = 14;
/// Stray CRLF bytes tolerated between two messages (T3).
const MAX_JUNK: u64 = 2;
/// Longest chunk-size line (size plus extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;
/// Longest candidate line looked at while resynchronising.
const MAX_RESYNC_LINE: usize = 16 * 1024;
/// Compressed input kept to retry a `deflate` body as raw deflate when it is not zlib-wrapped.
const ZLIB_REPLAY_MAX: usize = 16 * 1024;
/// Compressed input fed to a decoder at once (bounds the output per step).
const DECODE_SLICE: usize = 16 * 1024;

/// Direction of bytes relative to the traced process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dir {
    /// Bytes the traced process read.
    Inbound,
    /// Bytes the traced process wrote.
    Outbound,
}

impl Dir {
    fn idx(self) -> usize {
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

/// Something unexpected on a connection. Each is counted by [`Anomaly::reason`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Anomaly {
    MalformedRequestLine {
        dir: Dir,
        pos: u64,
    },
    MalformedStatusLine {
        dir: Dir,
        pos: u64,
    },
    MalformedHeaders {
        dir: Dir,
        pos: u64,
    },
    HeaderTooLarge {
        dir: Dir,
        pos: u64,
    },
    BadContentLength {
        dir: Dir,
        pos: u64,
    },
    BadTransferEncoding {
        dir: Dir,
        pos: u64,
    },
    ContentLengthWithChunked {
        dir: Dir,
        pos: u64,
    },
    BadChunkSize {
        dir: Dir,
        pos: u64,
    },
    BadChunkTerminator {
        dir: Dir,
        pos: u64,
    },
    GapResync {
        dir: Dir,
        pos: u64,
        len: u64,
        known: bool,
    },
    GapInBody {
        dir: Dir,
        pos: u64,
        len: u64,
    },
    TruncatedAtClose {
        dir: Dir,
    },
    ResponseLost,
    PairingUncertain,
    UnpairedResponse {
        status: u16,
    },
    ResponseWithoutRequest {
        status: u16,
    },
    PipelineOverflow,
    FramingGuessWrong,
    Http2Preface {
        dir: Dir,
    },
    TlsRecordOnPlaintext {
        dir: Dir,
    },
    GzipError {
        dir: Dir,
    },
    DeflateError {
        dir: Dir,
    },
    DataAfterClose {
        dir: Dir,
    },
}

impl Anomaly {
    /// Stable snake_case name for counters.
    pub fn reason(&self) -> &'static str {
        match self {
            Anomaly::MalformedRequestLine { .. } => "malformed_request_line",
            Anomaly::MalformedStatusLine { .. } => "malformed_status_line",
            Anomaly::MalformedHeaders { .. } => "malformed_headers",
            Anomaly::HeaderTooLarge { .. } => "header_too_large",
            Anomaly::BadContentLength { .. } => "bad_content_length",
            Anomaly::BadTransferEncoding { .. } => "bad_transfer_encoding",
            Anomaly::ContentLengthWithChunked { .. } => "content_length_with_chunked",
            Anomaly::BadChunkSize { .. } => "bad_chunk_size",
            Anomaly::BadChunkTerminator { .. } => "bad_chunk_terminator",
            Anomaly::GapResync { .. } => "gap_resync",
            Anomaly::GapInBody { .. } => "gap_in_body",
            Anomaly::TruncatedAtClose { .. } => "truncated_at_close",
            Anomaly::ResponseLost => "response_lost",
            Anomaly::PairingUncertain => "pairing_uncertain",
            Anomaly::UnpairedResponse { .. } => "unpaired_response",
            Anomaly::ResponseWithoutRequest { .. } => "response_without_request",
            Anomaly::PipelineOverflow => "pipeline_overflow",
            Anomaly::FramingGuessWrong => "framing_guess_wrong",
            Anomaly::Http2Preface { .. } => "http2_preface",
            Anomaly::TlsRecordOnPlaintext { .. } => "tls_record_on_plaintext",
            Anomaly::GzipError { .. } => "gzip_error",
            Anomaly::DeflateError { .. } => "deflate_error",
            Anomaly::DataAfterClose { .. } => "data_after_close",
        }
    }
}

// ------------------------------------------------------------------------------------------
// Small helpers
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Request,
    Response,
    Unknown,
}

fn kind_of(role: Role, dir: Dir) -> Kind {
    match (role, dir) {
        (Role::Server, Dir::Inbound) | (Role::Client, Dir::Outbound) => Kind::Request,
        (Role::Server, Dir::Outbound) | (Role::Client, Dir::Inbound) => Kind::Response,
        (Role::Unknown, _) => Kind::Unknown,
    }
}

/// What a request's method means for its response's framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Head,
    Connect,
    Other,
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn first_byte_ok(kind: Kind, b: u8) -> bool {
    match kind {
        Kind::Response => b == b'H',
        Kind::Request | Kind::Unknown => is_tchar(b),
    }
}

/// Could `buf` still become a start line of `kind`? Cheap check on the first bytes.
fn prefix_ok(kind: Kind, buf: &[u8]) -> bool {
    match buf.first() {
        None => true,
        Some(&b) if !first_byte_ok(kind, b) => false,
        Some(_) if kind == Kind::Response => {
            let n = buf.len().min(7);
            buf[..n] == b"HTTP/1."[..n]
        }
        Some(_) => true,
    }
}

fn is_status_line(line: &[u8]) -> bool {
    if !line.starts_with(b"HTTP/1.") {
        return false;
    }
    let mut resp = httparse::Response::new(&mut []);
    resp.parse(line).is_ok()
}

fn is_request_line(line: &[u8]) -> bool {
    let mut req = httparse::Request::new(&mut []);
    req.parse(line).is_ok()
}

fn has_standard_method(line: &[u8]) -> bool {
    const METHODS: [&[u8]; 9] = [
        b"GET ",
        b"HEAD ",
        b"POST ",
        b"PUT ",
        b"DELETE ",
        b"CONNECT ",
        b"OPTIONS ",
        b"TRACE ",
        b"PATCH ",
    ];
    METHODS.iter().any(|m| line.starts_with(m))
}

/// Which kind of start line `line` (ending in `\n`) is, given what the direction should carry.
fn classify_line(kind: Kind, line: &[u8]) -> Option<Kind> {
    match kind {
        Kind::Request => is_request_line(line).then_some(Kind::Request),
        Kind::Response => is_status_line(line).then_some(Kind::Response),
        Kind::Unknown => {
            if is_status_line(line) {
                Some(Kind::Response)
            } else if is_request_line(line) {
                Some(Kind::Request)
            } else {
                None
            }
        }
    }
}

/// End of a header block in `buf` (index after the empty line), searching from `from` (an index
/// at or before the `\n` that may start the terminator). `Err(resume)` if not found yet.
fn find_head_end(buf: &[u8], from: usize) -> Result<usize, usize> {
    let mut i = from;
    while let Some(off) = buf
        .get(i..)
        .and_then(|s| s.iter().position(|&b| b == b'\n'))
    {
        let j = i + off;
        match buf.get(j + 1) {
            None => return Err(j),
            Some(b'\n') => return Ok(j + 2),
            Some(b'\r') => match buf.get(j + 2) {
                None => return Err(j),
                Some(b'\n') => return Ok(j + 3),
                Some(_) => {}
            },
            Some(_) => {}
        }
        i = j + 1;
    }
    Err(buf.len())
}

fn parser_config() -> httparse::ParserConfig {
    let mut c = httparse::ParserConfig::default();
    c.allow_spaces_after_header_name_in_responses(true)
        .allow_obsolete_multiline_headers_in_responses(true)
        .ignore_invalid_headers_in_responses(true)
        .ignore_invalid_headers_in_requests(true);
    c
}

fn header_slots(buf: &[u8]) -> Vec<httparse::Header<'static>> {
    let lines = buf.iter().filter(|&&b| b == b'\n').count();
    vec![httparse::EMPTY_HEADER; lines + 1]
}

fn convert_headers(hs: &[httparse::Header<'_>]) -> Vec<Header> {
    hs.iter()
        .map(|h| Header {
            name: h.name.to_string(),
            value: h.value.to_vec(),
        })
        .collect()
}

struct ParsedHead {
    start: Start,
    minor: u8,
    headers: Vec<Header>,
}

fn parse_head(kind: Kind, buf: &[u8]) -> Option<ParsedHead> {
    let mut slots = header_slots(buf);
    let cfg = parser_config();
    match kind {
        Kind::Request => {
            let mut req = httparse::Request::new(&mut slots);
            match cfg.parse_request(&mut req, buf) {
                Ok(httparse::Status::Complete(_)) => Some(ParsedHead {
                    start: Start::Req {
                        method: req.method?.to_string(),
                        target: req.path?.to_string(),
                    },
                    minor: req.version?,
                    headers: convert_headers(req.headers),
                }),
                _ => None,
            }
        }
        Kind::Response => {
            let mut resp = httparse::Response::new(&mut slots);
            match cfg.parse_response(&mut resp, buf) {
                Ok(httparse::Status::Complete(_)) => Some(ParsedHead {
                    start: Start::Resp {
                        status: resp.code?,
                        reason: resp.reason.unwrap_or("").to_string(),
                    },
                    minor: resp.version?,
                    headers: convert_headers(resp.headers),
                }),
                _ => None,
            }
        }
        Kind::Unknown => None,
    }
}

/// All values of header `name`, split on commas, trimmed.
fn header_tokens<'a>(headers: &'a [Header], name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .map(|t| t.trim_ascii())
}

enum LengthHeader {
    Absent,
    Valid(u64),
    Invalid,
}

fn content_length(headers: &[Header]) -> LengthHeader {
    let mut found: Option<u64> = None;
    for t in header_tokens(headers, "content-length") {
        if t.is_empty() || !t.iter().all(u8::is_ascii_digit) {
            return LengthHeader::Invalid;
        }
        let Some(n) = std::str::from_utf8(t)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        else {
            return LengthHeader::Invalid;
        };
        match found {
            Some(m) if m != n => return LengthHeader::Invalid,
            _ => found = Some(n),
        }
    }
    found.map_or(LengthHeader::Absent, LengthHeader::Valid)
}

enum TeHeader {
    Absent,
    Chunked,
    Other,
}

fn transfer_encoding(headers: &[Header]) -> TeHeader {
    match header_tokens(headers, "transfer-encoding")
        .filter(|t| !t.is_empty())
        .last()
    {
        None if header(headers, "transfer-encoding").is_none() => TeHeader::Absent,
        Some(t) if t.eq_ignore_ascii_case(b"chunked") => TeHeader::Chunked,
        _ => TeHeader::Other,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Gzip,
    Deflate,
}

impl Encoding {
    fn name(self) -> &'static str {
        match self {
            Encoding::Gzip => "gzip",
            Encoding::Deflate => "deflate",
        }
    }
}

fn content_encoding(headers: &[Header]) -> Option<Encoding> {
    let mut toks = header_tokens(headers, "content-encoding").filter(|t| !t.is_empty());
    let first = toks.next()?;
    if toks.next().is_some() {
        return None; // stacked codings are kept as they are
    }
    if first.eq_ignore_ascii_case(b"gzip") || first.eq_ignore_ascii_case(b"x-gzip") {
        Some(Encoding::Gzip)
    } else if first.eq_ignore_ascii_case(b"deflate") {
        Some(Encoding::Deflate)
    } else {
        None
    }
}

/// Parse a chunk-size line (ending in `\n`): hex size, optional whitespace, optional
/// `;extensions`. `None` if malformed or the size does not fit in u64.
fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\n")?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return None;
    }
    let mut n: u64 = 0;
    for &b in &line[..digits] {
        let d = (b as char).to_digit(16)? as u64;
        n = n.checked_mul(16)?.checked_add(d)?;
    }
    let rest = line[digits..].trim_ascii_start();
    (rest.is_empty() || rest[0] == b';').then_some(n)
}

// ------------------------------------------------------------------------------------------
// Bodies
// ------------------------------------------------------------------------------------------

/// Decoder output, kept up to `cap` bytes.
#[derive(Debug)]
struct Sink {
    data: Vec<u8>,
    cap: usize,
    overflow: bool,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = self.cap.saturating_sub(self.data.len());
        if buf.len() > room {
            self.overflow = true;
        }
        self.data.extend_from_slice(&buf[..buf.len().min(room)]);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

enum Decoder {
    Gzip(GzDecoder<Sink>),
    /// `deflate` as it should be (zlib-wrapped); `replay` keeps the first input to retry as raw
    /// deflate if the zlib header is refused.
    Zlib {
        dec: ZlibDecoder<Sink>,
        replay: Option<Vec<u8>>,
    },
    Raw(DeflateDecoder<Sink>),
}

impl Decoder {
    fn new(enc: Encoding, cap: usize) -> Self {
        let sink = Sink {
            data: Vec::new(),
            cap,
            overflow: false,
        };
        match enc {
            Encoding::Gzip => Decoder::Gzip(GzDecoder::new(sink)),
            Encoding::Deflate => Decoder::Zlib {
                dec: ZlibDecoder::new(sink),
                replay: Some(Vec::new()),
            },
        }
    }

    fn sink(&mut self) -> &mut Sink {
        match self {
            Decoder::Gzip(d) => d.get_mut(),
            Decoder::Zlib { dec, .. } => dec.get_mut(),
            Decoder::Raw(d) => d.get_mut(),
        }
    }

    fn write(&mut self, input: &[u8]) -> std::io::Result<usize> {
        match self {
            Decoder::Gzip(d) => d.write(input),
            Decoder::Zlib { dec, .. } => dec.write(input),
            Decoder::Raw(d) => d.write(input),
        }
    }

    /// Feed compressed input. `Err` on a decoding error. Stops early once the sink overflowed.
    fn feed(&mut self, input: &[u8]) -> Result<(), ()> {
        if let Decoder::Zlib { replay, .. } = self {
            if let Some(r) = replay {
                if r.len() + input.len() <= ZLIB_REPLAY_MAX {
                    r.extend_from_slice(input);
                } else {
                    *replay = None;
                }
            }
        }
        let mut rest = input;
        while !rest.is_empty() {
            match self.write(rest) {
                Ok(0) => return Ok(()), // stream ended; trailing bytes are ignored
                Ok(n) => rest = &rest[n..],
                Err(_) => return self.fallback_to_raw(),
            }
            if self.sink().overflow {
                return Ok(());
            }
        }
        Ok(())
    }

    /// A `deflate` body that is not zlib-wrapped: retry from the start as raw deflate.
    fn fallback_to_raw(&mut self) -> Result<(), ()> {
        let Decoder::Zlib { dec, replay } = self else {
            return Err(());
        };
        let (Some(input), true) = (replay.take(), dec.get_ref().data.is_empty()) else {
            return Err(());
        };
        let cap = dec.get_ref().cap;
        *self = Decoder::Raw(DeflateDecoder::new(Sink {
            data: Vec::new(),
            cap,
            overflow: false,
        }));
        self.feed(&input)
    }

    /// Everything decoded so far (after flushing the decoder's buffer).
    fn take_output(&mut self) -> (Vec<u8>, bool) {
        let _ = match self {
            Decoder::Gzip(d) => d.flush(),
            Decoder::Zlib { dec, .. } => dec.flush(),
            Decoder::Raw(d) => d.flush(),
        };
        let s = self.sink();
        (std::mem::take(&mut s.data), s.overflow)
    }

    /// Finish a complete stream: `Err` if it is truncated or corrupt.
    fn finish(&mut self) -> Result<(), ()> {
        let r = match self {
            Decoder::Gzip(d) => d.try_finish(),
            Decoder::Zlib { dec, .. } => dec.try_finish(),
            Decoder::Raw(d) => d.try_finish(),
        };
        r.map_err(|_| ())
    }
}

fn loss_rank(l: BodyLoss) -> u8 {
    match l {
        BodyLoss::KeptLimit => 1,
        BodyLoss::DecodeError => 2,
        BodyLoss::NotCaptured => 3,
        BodyLoss::Incomplete => 4,
    }
}

struct BodyAcc {
    wire_len: u64,
    /// Identity bytes, or the decoder's output once decoding stopped.
    keep: Vec<u8>,
    keep_cap: usize,
    loss: Option<BodyLoss>,
    encoding: Option<Encoding>,
    decoder: Option<Decoder>,
    decode_cap: usize,
    /// Nothing more is added to `keep` (after a hole, a decoding stop, or the keep limit).
    stopped: bool,
    decoded_from: Option<String>,
    decode_error: bool,
}

impl BodyAcc {
    fn new(limits: &ParserLimits, encoding: Option<Encoding>, expect: Option<u64>) -> Self {
        let reserve = expect.unwrap_or(0).min(64 * 1024) as usize;
        BodyAcc {
            wire_len: 0,
            keep: Vec::with_capacity(if encoding.is_none() {
                reserve.min(limits.body_keep_bytes)
            } else {
                0
            }),
            keep_cap: limits.body_keep_bytes,
            loss: None,
            encoding,
            decoder: None,
            decode_cap: limits.body_keep_bytes.min(limits.max_decoded_bytes),
            stopped: false,
            decoded_from: None,
            decode_error: false,
        }
    }

    fn set_loss(&mut self, l: BodyLoss) {
        if self.loss.is_none_or(|old| loss_rank(l) > loss_rank(old)) {
            self.loss = Some(l);
        }
    }

    fn push(&mut self, data: &[u8]) {
        self.wire_len += data.len() as u64;
        if self.stopped || data.is_empty() {
            return;
        }
        if let Some(enc) = self.encoding {
            if self.decoder.is_none() && self.wire_len == data.len() as u64 {
                self.decoder = Some(Decoder::new(enc, self.decode_cap));
                self.decoded_from = Some(enc.name().to_string());
            }
            let Some(dec) = self.decoder.as_mut() else {
                return;
            };
            let mut failed = false;
            for slice in data.chunks(DECODE_SLICE) {
                if dec.feed(slice).is_err() {
                    failed = true;
                    break;
                }
                if dec.sink().overflow {
                    break;
                }
            }
            let overflow = dec.sink().overflow;
            if failed {
                self.decode_error = true;
                self.set_loss(BodyLoss::DecodeError);
                self.stop_decoding();
            } else if overflow {
                self.set_loss(BodyLoss::KeptLimit);
                self.stop_decoding();
            }
            return;
        }
        let room = self.keep_cap.saturating_sub(self.keep.len());
        if data.len() > room {
            self.set_loss(BodyLoss::KeptLimit);
            self.stopped = true;
        }
        self.keep.extend_from_slice(&data[..data.len().min(room)]);
    }

    fn stop_decoding(&mut self) {
        if let Some(mut dec) = self.decoder.take() {
            let (out, overflow) = dec.take_output();
            if overflow {
                self.set_loss(BodyLoss::KeptLimit);
            }
            self.keep = out;
        }
        self.stopped = true;
    }

    fn hole(&mut self, len: u64) {
        self.wire_len += len;
        self.set_loss(BodyLoss::NotCaptured);
        if self.decoder.is_some() {
            self.stop_decoding();
        }
        // Bytes after a hole are not appended: `data` stays a prefix of the body.
        self.stopped = true;
    }

    /// Finish the body; `complete`: its framing ended normally.
    fn finish(mut self, complete: bool) -> (Body, bool) {
        if let Some(mut dec) = self.decoder.take() {
            if complete && dec.finish().is_err() {
                self.decode_error = true;
                self.set_loss(BodyLoss::DecodeError);
            }
            let (out, overflow) = dec.take_output();
            if overflow {
                self.set_loss(BodyLoss::KeptLimit);
            }
            self.keep = out;
        }
        if !complete {
            self.set_loss(BodyLoss::Incomplete);
        }
        (
            Body {
                wire_len: self.wire_len,
                data: Bytes::from(self.keep),
                loss: self.loss,
                decoded_from: self.decoded_from,
            },
            self.decode_error,
        )
    }
}

// ------------------------------------------------------------------------------------------
// Messages in progress
// ------------------------------------------------------------------------------------------

enum Start {
    Req { method: String, target: String },
    Resp { status: u16, reason: String },
}

struct InMsg {
    start: Start,
    minor: u8,
    headers: Vec<Header>,
    first_ns: u64,
    head_ns: u64,
    last_ns: u64,
    body: BodyAcc,
    /// Part of the message fell in a gap or was cut.
    partial: bool,
    /// Requests: sequence number in the pairing queue.
    seq: u64,
    /// Requests: the request asked to switch protocols (CONNECT, or an `Upgrade` header).
    upgrade_req: bool,
    /// Responses: framed without knowing the request for certain.
    guessed: bool,
    /// Responses: framed by guess with a Content-Length; if the request was in fact a HEAD,
    /// the "body" holds the following responses, so a loss marker follows it.
    guessed_len: bool,
}

impl InMsg {
    fn status(&self) -> u16 {
        match self.start {
            Start::Resp { status, .. } => status,
            Start::Req { .. } => 0,
        }
    }
}

enum Framing {
    Length(u64),
    Chunked(Chunk),
    Close,
}

enum Chunk {
    /// Accumulating a chunk-size line.
    Size(Vec<u8>),
    /// Inside chunk data: bytes left.
    Data(u64),
    /// After chunk data, expecting CRLF: whether CR was seen.
    DataEnd(bool),
    /// Trailer section; the buffer starts with a virtual `\n` so that an empty section is
    /// found by `find_head_end` like an end of headers.
    Trailers(Vec<u8>, usize),
}

// ------------------------------------------------------------------------------------------
// Pairing
// ------------------------------------------------------------------------------------------

/// A loss marker: between the neighbouring messages of one direction, `lo..=hi` whole messages
/// were lost. `tb`: timestamp of the last byte seen before the lost region; `ta`: timestamp of
/// the first byte of the message that follows it (`u64::MAX` if none did).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loss {
    lo: u64,
    hi: u64,
    tb: u64,
    ta: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoResponse {
    /// Its response certainly fell in a gap.
    Lost,
}

struct PendingReq {
    seq: u64,
    head_ns: u64,
    class: Class,
    /// Filled when the request is complete.
    req: Option<Request>,
    partial: bool,
    no_response: Option<NoResponse>,
}

struct PendingResp {
    resp: Response,
    partial: bool,
    guessed: bool,
    /// The framing gave it a body (Content-Length > 0, chunked, or close-delimited).
    body_framed: bool,
    /// 101, or framed as the 2xx answer to a CONNECT.
    upgrade: bool,
}

enum ReqItem {
    Msg(Box<PendingReq>),
    Lost(Loss),
}

enum RespItem {
    Msg(Box<PendingResp>),
    Lost(Loss),
}

enum ClassAnswer {
    Known(Class),
    Guess,
    Wait,
}

enum Verdict {
    Pending,
    Proceed,
    Upgraded,
}

enum Resolve {
    Wait,
    Done,
    Desync,
}

struct PumpCtx {
    /// Timestamp of the latest byte the request direction consumed.
    req_wm: u64,
    /// The request direction is between a gap and the next message: a loss marker may follow.
    req_resyncing: bool,
    closing: bool,
    /// Closing, and both streams are known to be complete up to their end positions.
    all_seen: bool,
    max_outstanding: usize,
}

#[derive(Default)]
struct Pairing {
    reqs: VecDeque<ReqItem>,
    resps: VecDeque<RespItem>,
    /// Responses still to come that answer lost requests.
    skip_resps: u64,
    desync: bool,
    upgraded: bool,
    out: Vec<Exchange>,
}

fn req_msgs(reqs: &VecDeque<ReqItem>) -> impl Iterator<Item = &PendingReq> {
    reqs.iter().filter_map(|i| match i {
        ReqItem::Msg(q) => Some(&**q),
        ReqItem::Lost(_) => None,
    })
}

impl Pairing {
    fn push_request_head(&mut self, seq: u64, head_ns: u64, class: Class) {
        self.reqs.push_back(ReqItem::Msg(Box::new(PendingReq {
            seq,
            head_ns,
            class,
            req: None,
            partial: false,
            no_response: None,
        })));
    }

    fn complete_request(&mut self, seq: u64, req: Request, partial: bool) {
        for item in self.reqs.iter_mut().rev() {
            if let ReqItem::Msg(q) = item {
                if q.seq == seq {
                    q.req = Some(req);
                    q.partial |= partial;
                    return;
                }
            }
        }
        log::warn!("http: completed request {seq} not found in the pairing queue");
    }

    fn push_response(&mut self, r: PendingResp) {
        self.resps.push_back(RespItem::Msg(Box::new(r)));
    }

    fn push_loss(&mut self, kind: Kind, loss: Loss) {
        log::trace!("http: loss marker {kind:?} {loss:?}");
        match kind {
            Kind::Request => self.reqs.push_back(ReqItem::Lost(loss)),
            Kind::Response => self.resps.push_back(RespItem::Lost(loss)),
            Kind::Unknown => {}
        }
    }

    /// The method class of the request the next response (the one being parsed) answers.
    fn class_for_next_response(&self) -> ClassAnswer {
        if self.desync || self.upgraded || self.skip_resps > 0 {
            return ClassAnswer::Guess;
        }
        let mut before = 0usize;
        for r in &self.resps {
            match r {
                RespItem::Msg(_) => before += 1,
                RespItem::Lost(_) => return ClassAnswer::Guess,
            }
        }
        let mut idx = 0usize;
        for item in &self.reqs {
            match item {
                ReqItem::Lost(_) => return ClassAnswer::Guess,
                ReqItem::Msg(q) if q.no_response.is_some() => {}
                ReqItem::Msg(q) => {
                    if idx == before {
                        return ClassAnswer::Known(q.class);
                    }
                    idx += 1;
                }
            }
        }
        ClassAnswer::Wait
    }

    /// Whether the request side may go on after request `seq` asked to switch protocols.
    fn upgrade_verdict(&self, seq: u64) -> Verdict {
        if self.upgraded {
            return Verdict::Upgraded;
        }
        if self.desync || self.skip_resps > 0 {
            return Verdict::Proceed;
        }
        let waiting = req_msgs(&self.reqs).any(|q| q.seq == seq && q.no_response.is_none());
        if !waiting {
            return Verdict::Proceed;
        }
        let lossy = self.reqs.iter().any(|i| matches!(i, ReqItem::Lost(_)))
            || self.resps.iter().any(|i| matches!(i, RespItem::Lost(_)));
        if lossy {
            Verdict::Proceed
        } else {
            Verdict::Pending
        }
    }

    fn emit(&mut self, request: Request, response: Option<Response>, c: Completeness, up: bool) {
        self.out.push(Exchange {
            request,
            response,
            completeness: c,
            upgraded: up,
        });
    }

    fn pump(&mut self, cx: &PumpCtx, an: &mut Vec<Anomaly>) -> bool {
        let mut progress = false;
        loop {
            if self.upgraded {
                progress |= self.drain_after_upgrade(an);
                return progress;
            }
            progress |= self.enforce_bounds(cx, an);
            if self.desync {
                progress |= self.drain_desync(an);
                return progress;
            }
            // A request whose response is known to be lost: emit it once it is complete.
            if let Some(ReqItem::Msg(q)) = self.reqs.front() {
                if q.no_response.is_some() {
                    if q.req.is_none() {
                        return progress;
                    }
                    if let Some(ReqItem::Msg(q)) = self.reqs.pop_front() {
                        an.push(Anomaly::ResponseLost);
                        if let Some(req) = q.req {
                            self.emit(req, None, Completeness::Partial, false);
                        }
                    }
                    progress = true;
                    continue;
                }
            }
            // Responses that answer lost requests.
            if self.skip_resps > 0 {
                match self.resps.front() {
                    Some(RespItem::Msg(r)) => {
                        an.push(Anomaly::UnpairedResponse {
                            status: r.resp.status,
                        });
                        self.resps.pop_front();
                        self.skip_resps -= 1;
                        progress = true;
                        continue;
                    }
                    Some(RespItem::Lost(_)) => {
                        self.desync = true;
                        progress = true;
                        continue;
                    }
                    None => return progress,
                }
            }
            let step = match (self.reqs.front(), self.resps.front()) {
                (Some(ReqItem::Lost(m)), _) => {
                    let m = *m;
                    self.resolve_req_loss(m, cx)
                }
                (_, Some(RespItem::Lost(m))) => {
                    let m = *m;
                    self.resolve_resp_loss(m, cx)
                }
                (Some(ReqItem::Msg(q)), Some(RespItem::Msg(_))) => {
                    if q.req.is_none() {
                        return progress;
                    }
                    self.pair(an);
                    Resolve::Done
                }
                (None, Some(RespItem::Msg(r))) => {
                    if !cx.closing {
                        return progress;
                    }
                    an.push(Anomaly::ResponseWithoutRequest {
                        status: r.resp.status,
                    });
                    self.resps.pop_front();
                    Resolve::Done
                }
                (Some(ReqItem::Msg(_)), None) | (None, None) => return progress,
            };
            match step {
                Resolve::Wait => return progress,
                Resolve::Done => progress = true,
                Resolve::Desync => {
                    self.desync = true;
                    progress = true;
                }
            }
        }
    }

    fn pair(&mut self, an: &mut Vec<Anomaly>) {
        let (Some(ReqItem::Msg(q)), Some(RespItem::Msg(r))) =
            (self.reqs.pop_front(), self.resps.pop_front())
        else {
            return;
        };
        let Some(req) = q.req else { return };
        let mut partial = q.partial || r.partial;
        let mut resp = r.resp;
        if r.guessed && q.class == Class::Head && r.body_framed {
            // Framed with a body although it answers a HEAD: the "body" belonged to what
            // followed, and everything after it is suspect.
            an.push(Anomaly::FramingGuessWrong);
            resp.body = Body::default();
            partial = true;
            self.desync = true;
        }
        let status = resp.status;
        let upgraded = r.upgrade || (q.class == Class::Connect && (200..300).contains(&status));
        if upgraded {
            self.upgraded = true;
        }
        let c = if partial {
            Completeness::Partial
        } else {
            Completeness::Complete
        };
        self.emit(req, Some(resp), c, upgraded);
    }

    fn drain_after_upgrade(&mut self, an: &mut Vec<Anomaly>) -> bool {
        let mut progress = false;
        while let Some(item) = self.reqs.front() {
            if let ReqItem::Msg(q) = item {
                if q.req.is_none() {
                    break;
                }
            }
            if let Some(ReqItem::Msg(q)) = self.reqs.pop_front() {
                if let Some(req) = q.req {
                    self.emit(req, None, Completeness::NoResponse, false);
                }
            }
            progress = true;
        }
        while let Some(item) = self.resps.pop_front() {
            if let RespItem::Msg(r) = item {
                an.push(Anomaly::UnpairedResponse {
                    status: r.resp.status,
                });
            }
            progress = true;
        }
        progress
    }

    fn drain_desync(&mut self, an: &mut Vec<Anomaly>) -> bool {
        let mut progress = false;
        while let Some(item) = self.reqs.front() {
            if let ReqItem::Msg(q) = item {
                if q.req.is_none() {
                    break;
                }
            }
            if let Some(ReqItem::Msg(q)) = self.reqs.pop_front() {
                an.push(match q.no_response {
                    Some(NoResponse::Lost) => Anomaly::ResponseLost,
                    None => Anomaly::PairingUncertain,
                });
                if let Some(req) = q.req {
                    self.emit(req, None, Completeness::Partial, false);
                }
            }
            progress = true;
        }
        while let Some(item) = self.resps.pop_front() {
            if let RespItem::Msg(r) = item {
                an.push(Anomaly::UnpairedResponse {
                    status: r.resp.status,
                });
            }
            progress = true;
        }
        self.skip_resps = 0;
        progress
    }

    /// Too many requests waiting (or responses without requests): give up pairing.
    fn enforce_bounds(&mut self, cx: &PumpCtx, an: &mut Vec<Anomaly>) -> bool {
        // Loss markers count too: garbage that yields one marker per line stays bounded.
        let reqs = self.reqs.len();
        let resps = self.resps.len();
        if !self.desync && (reqs > cx.max_outstanding || resps > cx.max_outstanding) {
            an.push(Anomaly::PipelineOverflow);
            self.desync = true;
            return true;
        }
        false
    }

    /// Front of `resps` is a loss marker: how many of the pending requests lost their response?
    fn resolve_resp_loss(&mut self, m: Loss, cx: &PumpCtx) -> Resolve {
        if !cx.closing && (cx.req_wm <= m.ta || cx.req_resyncing) {
            // A request whose response may be among the lost could still be unparsed.
            return Resolve::Wait;
        }
        // Every request whose head may end at or before `ta` has been parsed (T1). At a close
        // without end positions this may not hold: requests may have been lost, unannounced,
        // at the end of the request stream.
        let req_complete = cx.all_seen || (cx.req_wm > m.ta && !cx.req_resyncing);
        // Candidates: the pending requests (without a known fate) in order, up to a loss
        // marker on the request side.
        let mut heads: Vec<u64> = Vec::new();
        let mut truncated = false;
        let mut doubtful = 0u64;
        let mut in_prefix = true;
        for item in &self.reqs {
            match item {
                ReqItem::Msg(q) if q.no_response.is_some() => {}
                ReqItem::Msg(q) => {
                    if in_prefix && q.head_ns <= m.ta {
                        doubtful += 1;
                    } else {
                        in_prefix = false;
                    }
                    heads.push(q.head_ns);
                }
                ReqItem::Lost(_) => {
                    if in_prefix {
                        // Lost requests could be among the candidates: unknowable.
                        return Resolve::Desync;
                    }
                    truncated = true;
                    break;
                }
            }
        }
        let lo = m.lo;
        let mut hi = if req_complete {
            m.hi.min(doubtful)
        } else {
            m.hi
        };
        if lo > hi {
            return Resolve::Desync;
        }
        let after: Vec<u64> = self
            .resps
            .iter()
            .skip(1)
            .map_while(|r| match r {
                RespItem::Msg(r) => Some(r.resp.first_ns),
                RespItem::Lost(_) => None,
            })
            .collect();
        let consistent = |k: u64| -> bool {
            for (i, &t) in after.iter().enumerate() {
                let qi = k as usize + i;
                match heads.get(qi) {
                    Some(&h) => {
                        if t < h {
                            return false;
                        }
                    }
                    None => {
                        if truncated {
                            return true;
                        }
                        // Every request is known once all was seen; otherwise a request yet
                        // to come (or lost) has its head at or after the watermark (T1).
                        return !(cx.all_seen || cx.req_wm > t);
                    }
                }
            }
            true
        };
        while hi > lo && !consistent(hi) {
            hi -= 1;
        }
        log::trace!("http: resolving {m:?}: {lo}..={hi} of {doubtful} candidates");
        if lo == hi {
            // The first `lo` candidates lost their response. Fewer may be parsed (a close
            // without end positions): the others were lost themselves.
            let mut left = lo;
            for item in self.reqs.iter_mut() {
                if left == 0 {
                    break;
                }
                if let ReqItem::Msg(q) = item {
                    if q.no_response.is_none() && q.head_ns <= m.ta {
                        q.no_response = Some(NoResponse::Lost);
                        left -= 1;
                    }
                }
            }
            self.resps.pop_front();
            return Resolve::Done;
        }
        // Still ambiguous. The first response after the marker settles non-pipelined traffic;
        // once its evidence is final (or another loss follows) and the ambiguity remains, give
        // up.
        let next_is_loss = matches!(self.resps.get(1), Some(RespItem::Lost(_)));
        if cx.closing || next_is_loss || after.first().is_some_and(|&t| cx.req_wm > t) {
            return Resolve::Desync;
        }
        Resolve::Wait
    }

    /// Front of `reqs` is a loss marker: how many of the coming responses answer lost requests?
    fn resolve_req_loss(&mut self, m: Loss, cx: &PumpCtx) -> Resolve {
        let heads: Vec<u64> = self
            .reqs
            .iter()
            .skip(1)
            .map_while(|i| match i {
                ReqItem::Msg(q) => Some(q.head_ns),
                ReqItem::Lost(_) => None,
            })
            .collect();
        let mut resp_truncated = false;
        let mut ts: Vec<u64> = Vec::new();
        for r in &self.resps {
            match r {
                RespItem::Msg(r) => ts.push(r.resp.first_ns),
                RespItem::Lost(_) => {
                    resp_truncated = true;
                    break;
                }
            }
        }
        let mut lo = m.lo;
        let mut hi = m.hi;
        // A response starting before the lost region cannot answer a lost request (T1, T2).
        if let Some(j) = ts.iter().position(|&t| t < m.tb) {
            hi = hi.min(j as u64);
        }
        // Under k, responses k, k+1, .. answer the requests after the marker (T2).
        let consistent = |k: u64| -> bool {
            for (i, &h) in heads.iter().enumerate() {
                match ts.get(k as usize + i) {
                    Some(&t) => {
                        if t < h {
                            return false;
                        }
                    }
                    None => return true,
                }
            }
            true
        };
        while lo <= hi && (lo as usize) < ts.len() && !consistent(lo) {
            lo += 1;
        }
        if lo > hi {
            return Resolve::Desync;
        }
        if lo == hi {
            self.reqs.pop_front();
            self.skip_resps += lo;
            return Resolve::Done;
        }
        if cx.closing || resp_truncated || ((lo as usize) < ts.len() && !heads.is_empty()) {
            return Resolve::Desync;
        }
        Resolve::Wait
    }

    /// At close, after the last pump: whatever is left.
    fn finish(&mut self, an: &mut Vec<Anomaly>) {
        while let Some(item) = self.reqs.pop_front() {
            if let ReqItem::Msg(q) = item {
                let Some(req) = q.req else { continue };
                match q.no_response {
                    Some(NoResponse::Lost) => {
                        an.push(Anomaly::ResponseLost);
                        self.emit(req, None, Completeness::Partial, false);
                    }
                    None => self.emit(req, None, Completeness::NoResponse, false),
                }
            }
        }
        while let Some(item) = self.resps.pop_front() {
            if let RespItem::Msg(r) = item {
                an.push(Anomaly::ResponseWithoutRequest {
                    status: r.resp.status,
                });
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// One direction
// ------------------------------------------------------------------------------------------

/// What is known about a lost region while resynchronising.
#[derive(Debug, Clone, Copy)]
struct LossAcc {
    /// Messages certainly lost that count for pairing (a cut or malformed request head, or a
    /// response head showing a final status).
    lost_lo: u64,
    /// Messages possibly lost that were seen in part (heads cut or malformed).
    lost_hi: u64,
    /// The region starts at a known message boundary.
    boundary: bool,
    /// Bytes of the region that may hold message starts (holes and skipped bytes).
    unknown: u64,
    /// Timestamp of the last byte before the region.
    tb: u64,
    /// Picked up midstream: pairing is off anyway, no marker.
    midstream: bool,
}

/// Whether a cut or malformed head certainly belongs to a message that consumes a request or a
/// response in pairing: any request; a response only when its status line shows a final status
/// (a lost 1xx would not count).
fn head_counts(kind: Kind, buf: &[u8]) -> bool {
    match kind {
        Kind::Request => true,
        Kind::Response => {
            buf.len() >= 12
                && buf.starts_with(b"HTTP/1.")
                && buf[8] == b' '
                && buf[9..12].iter().all(u8::is_ascii_digit)
                && buf[9] >= b'2'
        }
        Kind::Unknown => false,
    }
}

impl LossAcc {
    fn region(boundary: bool, unknown: u64, tb: u64) -> Self {
        LossAcc {
            lost_lo: 0,
            lost_hi: 0,
            boundary,
            unknown,
            tb,
            midstream: false,
        }
    }

    fn cut_head(kind: Kind, h: &HeadBuf, unknown: u64) -> Self {
        let seen = h.buf.iter().any(|&b| b != b'\r' && b != b'\n');
        LossAcc {
            lost_lo: u64::from(seen && head_counts(kind, &h.buf)),
            lost_hi: u64::from(seen),
            boundary: true,
            unknown,
            tb: h.first_ns,
            midstream: false,
        }
    }

    /// The marker for pairing once the region ended at a message starting at `ta`.
    ///
    /// On the request side a region that starts at a boundary and is long enough holds at
    /// least one request (T3). On the response side it may hold only interim (1xx) responses,
    /// so only a visible final status line gives a lower bound.
    fn marker(&self, kind: Kind, ta: u64) -> Option<Loss> {
        if self.midstream {
            return None;
        }
        let hi = self.lost_hi + self.unknown / MIN_MSG_LEN;
        let lo = if self.lost_lo > 0 {
            self.lost_lo
        } else if kind == Kind::Request
            && self.lost_hi == 0
            && self.boundary
            && self.unknown >= MIN_MSG_LEN + MAX_JUNK
        {
            1
        } else {
            0
        };
        (hi > 0).then_some(Loss {
            lo: lo.min(hi),
            hi,
            tb: self.tb,
            ta,
        })
    }
}

struct HeadBuf {
    buf: Vec<u8>,
    start_pos: u64,
    first_ns: u64,
    line_done: bool,
    scan: usize,
}

struct Resync {
    line: Vec<u8>,
    in_line: bool,
    at_line_start: bool,
    cand_pos: u64,
    cand_ts: u64,
    /// The candidate follows a `\n` (or the start of a stream seen from its start). Otherwise
    /// (right after a gap, at a piece start) it may be the tail of a cut line.
    cand_clean: bool,
    loss: LossAcc,
}

enum Phase {
    Idle,
    Head(HeadBuf),
    Body {
        msg: Box<InMsg>,
        framing: Framing,
    },
    /// A response head waits for its request's method.
    Stalled(Box<InMsg>),
    /// After a request that asked to switch protocols: wait for the verdict.
    Paused(u64),
    Resync(Box<Resync>),
    Dead,
}

enum Unblock {
    Free,
    Blocked,
    Changed,
}

struct Shared {
    limits: ParserLimits,
    role: Role,
    protocol: ConnProtocol,
    closing: bool,
    next_seq: u64,
    pairing: Pairing,
    anomalies: Vec<Anomaly>,
}

impl Shared {
    fn anomaly(&mut self, a: Anomaly) {
        log::debug!("http anomaly: {a:?}");
        self.anomalies.push(a);
    }

    fn kind_of(&self, dir: Dir) -> Kind {
        kind_of(self.role, dir)
    }

    fn decide(&mut self, dir: Dir, kind: Kind) {
        if self.role == Role::Unknown {
            self.role = match (kind, dir) {
                (Kind::Request, Dir::Inbound) | (Kind::Response, Dir::Outbound) => Role::Server,
                _ => Role::Client,
            };
        }
        if self.protocol == ConnProtocol::Unknown {
            self.protocol = ConnProtocol::Http1;
        }
    }

    fn terminal(&self) -> bool {
        matches!(
            self.protocol,
            ConnProtocol::Http2Unsupported | ConnProtocol::TlsOnPlaintext | ConnProtocol::Upgraded
        )
    }
}

struct DirState {
    dir: Dir,
    stream: Stream,
    /// The rest of a piece that could not be consumed yet.
    cur: Option<Piece>,
    /// Position of the next byte to consume.
    pos: u64,
    /// Timestamp of the latest byte consumed.
    wm_ns: u64,
    phase: Phase,
    /// Nothing but CR/LF consumed yet on a stream seen from its start: look for the HTTP/2
    /// preface and TLS records.
    fresh: bool,
    /// The last byte consumed was `\n` (true at the start of a stream seen from its start).
    after_nl: bool,
}

enum StartCheck {
    NeedMore,
    Http2,
    Tls,
    Plain,
}

fn start_check(buf: &[u8]) -> StartCheck {
    const PREFACE_LINE: &[u8] = b"PRI * HTTP/2.0\r\n";
    let Some(&b0) = buf.first() else {
        return StartCheck::NeedMore;
    };
    if b0 == 0x16 {
        if buf.len() < 3 {
            return StartCheck::NeedMore;
        }
        return if buf[1] == 0x03 && buf[2] <= 0x04 {
            StartCheck::Tls
        } else {
            StartCheck::Plain
        };
    }
    let n = buf.len().min(PREFACE_LINE.len());
    if buf[..n] != PREFACE_LINE[..n] {
        StartCheck::Plain
    } else if n == PREFACE_LINE.len() {
        StartCheck::Http2
    } else {
        StartCheck::NeedMore
    }
}

impl DirState {
    fn new(dir: Dir, limits: &ParserLimits, midstream: bool) -> Self {
        DirState {
            dir,
            // A connection seen from its start has its positions start at 0, so that a loss
            // of its first bytes is seen as a gap; one picked up midstream starts wherever its
            // first piece is.
            stream: if midstream {
                Stream::new(limits.stream)
            } else {
                Stream::with_start(limits.stream, 0)
            },
            cur: None,
            pos: 0,
            wm_ns: 0,
            phase: if midstream {
                Phase::Resync(Box::new(Resync {
                    line: Vec::new(),
                    in_line: false,
                    at_line_start: true,
                    cand_pos: 0,
                    cand_ts: 0,
                    cand_clean: false,
                    loss: LossAcc {
                        midstream: true,
                        ..LossAcc::region(false, 0, 0)
                    },
                }))
            } else {
                Phase::Idle
            },
            fresh: !midstream,
            after_nl: !midstream,
        }
    }

    fn blocked_too_long(&self, sh: &Shared) -> bool {
        sh.closing || self.stream.ready_bytes() > sh.limits.stream.max_pending_bytes
    }

    fn try_unblock(&mut self, sh: &mut Shared) -> Unblock {
        match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Stalled(msg) => {
                let ans = match sh.pairing.class_for_next_response() {
                    ClassAnswer::Wait if self.blocked_too_long(sh) => ClassAnswer::Guess,
                    a => a,
                };
                match ans {
                    ClassAnswer::Wait => {
                        self.phase = Phase::Stalled(msg);
                        Unblock::Blocked
                    }
                    ClassAnswer::Known(c) => {
                        self.phase = self.start_response_body(sh, msg, c, false);
                        Unblock::Changed
                    }
                    ClassAnswer::Guess => {
                        self.phase = self.start_response_body(sh, msg, Class::Other, true);
                        Unblock::Changed
                    }
                }
            }
            Phase::Paused(seq) => match sh.pairing.upgrade_verdict(seq) {
                Verdict::Pending if !self.blocked_too_long(sh) => {
                    self.phase = Phase::Paused(seq);
                    Unblock::Blocked
                }
                Verdict::Upgraded => {
                    self.phase = Phase::Dead;
                    Unblock::Changed
                }
                _ => Unblock::Changed,
            },
            other => {
                self.phase = other;
                Unblock::Free
            }
        }
    }

    /// Consume what can be consumed. Returns whether anything changed.
    fn run(&mut self, sh: &mut Shared) -> bool {
        let mut progress = false;
        loop {
            if sh.terminal() && !matches!(self.phase, Phase::Dead) {
                self.phase = Phase::Dead;
                progress = true;
            }
            match self.try_unblock(sh) {
                Unblock::Blocked => return progress,
                Unblock::Changed => progress = true,
                Unblock::Free => {}
            }
            let piece = match self.cur.take() {
                Some(p) => p,
                None => {
                    let Some(p) = self.stream.next_piece() else {
                        return progress;
                    };
                    // A new piece (one read or write call) often starts a message: while
                    // resynchronising, its first byte is a candidate like a line start.
                    if let Phase::Resync(r) = &mut self.phase {
                        if !r.in_line {
                            r.at_line_start = true;
                        }
                    }
                    p
                }
            };
            match piece {
                Piece::Hole {
                    pos,
                    len,
                    ts_ns,
                    known,
                } => {
                    self.on_hole(sh, pos, len, ts_ns, known);
                    progress = true;
                }
                Piece::Data { pos, ts_ns, bytes } => {
                    if self.pos != pos {
                        // Only at the very first piece (positions start where the stream starts).
                        self.pos = pos;
                    }
                    let used = self.on_data(sh, &bytes, ts_ns);
                    if used > 0 {
                        progress = true;
                    }
                    if used < bytes.len() {
                        self.cur = Some(Piece::Data {
                            pos: pos + used as u64,
                            ts_ns,
                            bytes: bytes.slice(used..),
                        });
                        if used == 0 && !matches!(self.phase, Phase::Stalled(_) | Phase::Paused(_))
                        {
                            // Defensive: a handler that neither consumes nor blocks would spin.
                            log::warn!("http: parser made no progress; dropping a byte");
                            self.cur = None;
                            if bytes.len() > 1 {
                                self.cur = Some(Piece::Data {
                                    pos: pos + 1,
                                    ts_ns,
                                    bytes: bytes.slice(1..),
                                });
                            }
                            self.pos += 1;
                        }
                    }
                }
            }
        }
    }

    fn on_data(&mut self, sh: &mut Shared, bytes: &[u8], ts: u64) -> usize {
        let mut off = 0;
        let mut idle_rounds = 0;
        while off < bytes.len() {
            if sh.terminal() {
                self.phase = Phase::Dead;
            }
            let phase = std::mem::replace(&mut self.phase, Phase::Idle);
            if matches!(phase, Phase::Stalled(_) | Phase::Paused(_)) {
                self.phase = phase;
                break;
            }
            let data = &bytes[off..];
            let (next, n) = match phase {
                Phase::Dead => (Phase::Dead, data.len()),
                Phase::Idle => self.idle_data(data, ts),
                Phase::Head(h) => self.head_data(sh, h, data, ts),
                Phase::Body { msg, framing } => self.body_data(sh, msg, framing, data, ts),
                Phase::Resync(r) => self.resync_data(sh, r, data, ts),
                p @ (Phase::Stalled(_) | Phase::Paused(_)) => (p, 0),
            };
            self.phase = next;
            off += n;
            self.pos += n as u64;
            if n > 0 {
                self.after_nl = bytes[off - 1] == b'\n';
                self.wm_ns = self.wm_ns.max(ts);
                idle_rounds = 0;
            } else {
                idle_rounds += 1;
                if idle_rounds > 8 {
                    break;
                }
            }
        }
        off
    }

    fn idle_data(&mut self, data: &[u8], ts: u64) -> (Phase, usize) {
        let skip = data
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        if skip == data.len() {
            return (Phase::Idle, skip);
        }
        (
            Phase::Head(HeadBuf {
                buf: Vec::new(),
                start_pos: self.pos + skip as u64,
                first_ns: ts,
                line_done: false,
                scan: 0,
            }),
            skip,
        )
    }

    fn new_resync(&self, loss: LossAcc, at_line_start: bool) -> Phase {
        Phase::Resync(Box::new(Resync {
            line: Vec::new(),
            in_line: false,
            at_line_start,
            cand_pos: 0,
            cand_ts: 0,
            cand_clean: false,
            loss,
        }))
    }

    /// A message whose head was being read is lost (malformed, too large, or cut).
    fn head_lost(&self, sh: &Shared, h: &HeadBuf, at_line_start: bool) -> Phase {
        self.new_resync(LossAcc::cut_head(sh.kind_of(self.dir), h, 0), at_line_start)
    }

    fn malformed_start(&self, sh: &mut Shared, kind: Kind, pos: u64) {
        let dir = self.dir;
        sh.anomaly(match kind {
            Kind::Response => Anomaly::MalformedStatusLine { dir, pos },
            Kind::Request | Kind::Unknown => Anomaly::MalformedRequestLine { dir, pos },
        });
    }

    fn head_data(
        &mut self,
        sh: &mut Shared,
        mut h: HeadBuf,
        data: &[u8],
        ts: u64,
    ) -> (Phase, usize) {
        let kind = sh.kind_of(self.dir);
        let max = sh.limits.max_header_bytes;
        if !h.line_done {
            let room = (max + 1).saturating_sub(h.buf.len()).max(1);
            let avail = &data[..data.len().min(room)];
            let (take, got_nl) = match avail.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (avail.len(), false),
            };
            h.buf.extend_from_slice(&avail[..take]);
            if self.fresh {
                match start_check(&h.buf) {
                    StartCheck::NeedMore => return (Phase::Head(h), take),
                    StartCheck::Http2 => {
                        sh.anomaly(Anomaly::Http2Preface { dir: self.dir });
                        sh.protocol = ConnProtocol::Http2Unsupported;
                        return (Phase::Dead, take);
                    }
                    StartCheck::Tls => {
                        sh.anomaly(Anomaly::TlsRecordOnPlaintext { dir: self.dir });
                        sh.protocol = ConnProtocol::TlsOnPlaintext;
                        return (Phase::Dead, take);
                    }
                    StartCheck::Plain => self.fresh = false,
                }
            }
            if !prefix_ok(kind, &h.buf) {
                self.malformed_start(sh, kind, h.start_pos);
                return (self.head_lost(sh, &h, got_nl), take);
            }
            if !got_nl {
                if h.buf.len() > max {
                    sh.anomaly(Anomaly::HeaderTooLarge {
                        dir: self.dir,
                        pos: h.start_pos,
                    });
                    return (self.head_lost(sh, &h, false), take);
                }
                return (Phase::Head(h), take);
            }
            match classify_line(kind, &h.buf) {
                Some(k) => sh.decide(self.dir, k),
                None => {
                    self.malformed_start(sh, kind, h.start_pos);
                    return (self.head_lost(sh, &h, true), take);
                }
            }
            h.line_done = true;
            h.scan = h.buf.len() - 1;
            return (Phase::Head(h), take);
        }
        let room = (max + 3).saturating_sub(h.buf.len()).max(1);
        let avail = &data[..data.len().min(room)];
        let old = h.buf.len();
        h.buf.extend_from_slice(avail);
        match find_head_end(&h.buf, h.scan) {
            Ok(end) => {
                let used = end.saturating_sub(old).max(1).min(avail.len());
                h.buf.truncate(old + used);
                (self.complete_head(sh, h, ts), used)
            }
            Err(resume) => {
                h.scan = resume;
                if h.buf.len() > max {
                    sh.anomaly(Anomaly::HeaderTooLarge {
                        dir: self.dir,
                        pos: h.start_pos,
                    });
                    return (self.head_lost(sh, &h, false), avail.len());
                }
                (Phase::Head(h), avail.len())
            }
        }
    }

    fn complete_head(&mut self, sh: &mut Shared, h: HeadBuf, ts: u64) -> Phase {
        let kind = sh.kind_of(self.dir);
        let Some(p) = parse_head(kind, &h.buf) else {
            sh.anomaly(Anomaly::MalformedHeaders {
                dir: self.dir,
                pos: h.start_pos,
            });
            return self.head_lost(sh, &h, true);
        };
        sh.decide(self.dir, kind);
        let encoding = content_encoding(&p.headers);
        let mut msg = Box::new(InMsg {
            start: p.start,
            minor: p.minor,
            headers: p.headers,
            first_ns: h.first_ns,
            head_ns: ts,
            last_ns: ts,
            body: BodyAcc::new(&sh.limits, None, None),
            partial: false,
            seq: 0,
            upgrade_req: false,
            guessed: false,
            guessed_len: false,
        });
        let pos = h.start_pos;
        match kind {
            Kind::Request => {
                let class = match &msg.start {
                    Start::Req { method, .. } if method == "HEAD" => Class::Head,
                    Start::Req { method, .. } if method == "CONNECT" => Class::Connect,
                    _ => Class::Other,
                };
                msg.seq = sh.next_seq;
                sh.next_seq += 1;
                msg.upgrade_req =
                    class == Class::Connect || header(&msg.headers, "upgrade").is_some();
                sh.pairing.push_request_head(msg.seq, ts, class);
                let te = transfer_encoding(&msg.headers);
                let cl = content_length(&msg.headers);
                let framing = match (te, cl) {
                    (TeHeader::Chunked, cl) => {
                        if !matches!(cl, LengthHeader::Absent) {
                            sh.anomaly(Anomaly::ContentLengthWithChunked { dir: self.dir, pos });
                        }
                        Some(Framing::Chunked(Chunk::Size(Vec::new())))
                    }
                    (TeHeader::Other, _) => {
                        sh.anomaly(Anomaly::BadTransferEncoding { dir: self.dir, pos });
                        return self.request_unframeable(sh, msg);
                    }
                    (TeHeader::Absent, LengthHeader::Invalid) => {
                        sh.anomaly(Anomaly::BadContentLength { dir: self.dir, pos });
                        return self.request_unframeable(sh, msg);
                    }
                    (TeHeader::Absent, LengthHeader::Valid(n)) if n > 0 => Some(Framing::Length(n)),
                    (TeHeader::Absent, _) => None,
                };
                let expect = match &framing {
                    Some(Framing::Length(n)) => Some(*n),
                    _ => None,
                };
                msg.body = BodyAcc::new(&sh.limits, encoding, expect);
                match framing {
                    Some(framing) => Phase::Body { msg, framing },
                    None => self.finish_request(sh, msg, true),
                }
            }
            Kind::Response => {
                let status = msg.status();
                if (100..200).contains(&status) && status != 101 {
                    // Interim response: consumes no request, has no body.
                    return Phase::Idle;
                }
                match sh.pairing.class_for_next_response() {
                    ClassAnswer::Known(c) => self.start_response_body(sh, msg, c, false),
                    ClassAnswer::Guess => self.start_response_body(sh, msg, Class::Other, true),
                    ClassAnswer::Wait => Phase::Stalled(msg),
                }
            }
            Kind::Unknown => self.head_lost(sh, &h, true),
        }
    }

    /// A request head whose body cannot be framed: keep the request, resynchronise after it.
    fn request_unframeable(&mut self, sh: &mut Shared, mut msg: Box<InMsg>) -> Phase {
        msg.partial = true;
        let tb = msg.head_ns;
        self.finish_request(sh, msg, false);
        self.new_resync(LossAcc::region(false, 0, tb), true)
    }

    fn start_response_body(
        &mut self,
        sh: &mut Shared,
        mut msg: Box<InMsg>,
        class: Class,
        guessed: bool,
    ) -> Phase {
        msg.guessed = guessed;
        let status = msg.status();
        let pos = self.pos;
        if status == 101 || (class == Class::Connect && (200..300).contains(&status)) {
            // The connection switches protocols right after this head.
            self.finish_response(sh, msg, true, false, true);
            sh.protocol = ConnProtocol::Upgraded;
            return Phase::Dead;
        }
        if class == Class::Head || (100..200).contains(&status) || status == 204 || status == 304 {
            self.finish_response(sh, msg, true, false, false);
            return Phase::Idle;
        }
        let encoding = content_encoding(&msg.headers);
        let framing = match (
            transfer_encoding(&msg.headers),
            content_length(&msg.headers),
        ) {
            (TeHeader::Chunked, cl) => {
                if !matches!(cl, LengthHeader::Absent) {
                    sh.anomaly(Anomaly::ContentLengthWithChunked { dir: self.dir, pos });
                }
                Framing::Chunked(Chunk::Size(Vec::new()))
            }
            (TeHeader::Other, _) => Framing::Close,
            (TeHeader::Absent, LengthHeader::Valid(0)) => {
                self.finish_response(sh, msg, true, false, false);
                return Phase::Idle;
            }
            (TeHeader::Absent, LengthHeader::Valid(n)) => {
                msg.guessed_len = guessed;
                Framing::Length(n)
            }
            (TeHeader::Absent, LengthHeader::Invalid) => {
                sh.anomaly(Anomaly::BadContentLength { dir: self.dir, pos });
                msg.partial = true;
                let tb = msg.head_ns;
                self.finish_response(sh, msg, false, true, false);
                return self.new_resync(LossAcc::region(false, 0, tb), true);
            }
            (TeHeader::Absent, LengthHeader::Absent) => Framing::Close,
        };
        let expect = match framing {
            Framing::Length(n) => Some(n),
            _ => None,
        };
        msg.body = BodyAcc::new(&sh.limits, encoding, expect);
        Phase::Body { msg, framing }
    }

    fn finish_request(&mut self, sh: &mut Shared, msg: Box<InMsg>, complete: bool) -> Phase {
        let msg = *msg;
        let (body, decode_error) = msg.body.finish(complete);
        if decode_error {
            self.decode_anomaly(sh, &body);
        }
        let Start::Req { method, target } = msg.start else {
            return Phase::Idle;
        };
        let req = Request {
            method,
            target,
            minor_version: msg.minor,
            headers: msg.headers,
            body,
            first_ns: msg.first_ns,
            last_ns: msg.last_ns,
        };
        sh.pairing
            .complete_request(msg.seq, req, msg.partial || !complete);
        if complete && msg.upgrade_req {
            Phase::Paused(msg.seq)
        } else {
            Phase::Idle
        }
    }

    fn finish_response(
        &mut self,
        sh: &mut Shared,
        msg: Box<InMsg>,
        complete: bool,
        body_framed: bool,
        upgrade: bool,
    ) {
        let msg = *msg;
        let (body, decode_error) = msg.body.finish(complete);
        if decode_error {
            self.decode_anomaly(sh, &body);
        }
        let Start::Resp { status, reason } = msg.start else {
            return;
        };
        let wire_len = body.wire_len;
        sh.pairing.push_response(PendingResp {
            resp: Response {
                status,
                reason,
                minor_version: msg.minor,
                headers: msg.headers,
                body,
                first_ns: msg.first_ns,
                last_ns: msg.last_ns,
            },
            partial: msg.partial || !complete,
            guessed: msg.guessed,
            body_framed,
            upgrade,
        });
        if msg.guessed_len && !sh.pairing.desync {
            // If the guess was wrong (the request was a HEAD), the bytes taken as body were
            // the next responses: as many as fit in them may have been swallowed. Their first
            // bytes came no later than the last byte of this "body".
            let hi = wire_len / MIN_MSG_LEN;
            if hi > 0 {
                sh.pairing.push_loss(
                    Kind::Response,
                    Loss {
                        lo: 0,
                        hi,
                        tb: msg.head_ns,
                        ta: msg.last_ns,
                    },
                );
            }
        }
    }

    fn decode_anomaly(&self, sh: &mut Shared, body: &Body) {
        let dir = self.dir;
        sh.anomaly(match body.decoded_from.as_deref() {
            Some("deflate") => Anomaly::DeflateError { dir },
            _ => Anomaly::GzipError { dir },
        });
    }

    fn finish_msg(&mut self, sh: &mut Shared, msg: Box<InMsg>, complete: bool) -> Phase {
        match msg.start {
            Start::Req { .. } => self.finish_request(sh, msg, complete),
            Start::Resp { .. } => {
                self.finish_response(sh, msg, complete, true, false);
                Phase::Idle
            }
        }
    }

    /// A message's framing broke (bad chunk framing, or a gap in it): finish it as partial and
    /// resynchronise; the region does not start at a known boundary.
    fn framing_lost(
        &mut self,
        sh: &mut Shared,
        mut msg: Box<InMsg>,
        unknown: u64,
        at_line_start: bool,
    ) -> Phase {
        msg.partial = true;
        let tb = self.wm_ns;
        self.finish_msg(sh, msg, false);
        self.new_resync(LossAcc::region(false, unknown, tb), at_line_start)
    }

    fn body_data(
        &mut self,
        sh: &mut Shared,
        mut msg: Box<InMsg>,
        framing: Framing,
        data: &[u8],
        ts: u64,
    ) -> (Phase, usize) {
        msg.last_ns = ts;
        match framing {
            Framing::Close => {
                msg.body.push(data);
                (Phase::Body { msg, framing }, data.len())
            }
            Framing::Length(rem) => {
                let n = (data.len() as u64).min(rem) as usize;
                msg.body.push(&data[..n]);
                let rem = rem - n as u64;
                if rem == 0 {
                    (self.finish_msg(sh, msg, true), n)
                } else {
                    (
                        Phase::Body {
                            msg,
                            framing: Framing::Length(rem),
                        },
                        n,
                    )
                }
            }
            Framing::Chunked(ch) => self.chunk_data(sh, msg, ch, data),
        }
    }

    fn chunk_data(
        &mut self,
        sh: &mut Shared,
        mut msg: Box<InMsg>,
        ch: Chunk,
        data: &[u8],
    ) -> (Phase, usize) {
        let body = |msg, ch| Phase::Body {
            msg,
            framing: Framing::Chunked(ch),
        };
        match ch {
            Chunk::Size(mut line) => {
                let room = MAX_CHUNK_LINE.saturating_sub(line.len()).max(1);
                let avail = &data[..data.len().min(room)];
                let (take, got_nl) = match avail.iter().position(|&b| b == b'\n') {
                    Some(i) => (i + 1, true),
                    None => (avail.len(), false),
                };
                line.extend_from_slice(&avail[..take]);
                if !got_nl {
                    if line.len() >= MAX_CHUNK_LINE {
                        sh.anomaly(Anomaly::BadChunkSize {
                            dir: self.dir,
                            pos: self.pos,
                        });
                        return (self.framing_lost(sh, msg, 0, false), take);
                    }
                    return (body(msg, Chunk::Size(line)), take);
                }
                match parse_chunk_size(&line) {
                    Some(0) => (body(msg, Chunk::Trailers(vec![b'\n'], 0)), take),
                    Some(n) => (body(msg, Chunk::Data(n)), take),
                    None => {
                        sh.anomaly(Anomaly::BadChunkSize {
                            dir: self.dir,
                            pos: self.pos,
                        });
                        (self.framing_lost(sh, msg, 0, true), take)
                    }
                }
            }
            Chunk::Data(rem) => {
                let n = (data.len() as u64).min(rem) as usize;
                msg.body.push(&data[..n]);
                let rem = rem - n as u64;
                if rem == 0 {
                    (body(msg, Chunk::DataEnd(false)), n)
                } else {
                    (body(msg, Chunk::Data(rem)), n)
                }
            }
            Chunk::DataEnd(seen_cr) => match (seen_cr, data[0]) {
                (false, b'\r') => (body(msg, Chunk::DataEnd(true)), 1),
                (_, b'\n') => (body(msg, Chunk::Size(Vec::new())), 1),
                _ => {
                    sh.anomaly(Anomaly::BadChunkTerminator {
                        dir: self.dir,
                        pos: self.pos,
                    });
                    (self.framing_lost(sh, msg, 0, false), 1)
                }
            },
            Chunk::Trailers(mut buf, scan) => {
                let max = sh.limits.max_header_bytes;
                let room = (max + 3).saturating_sub(buf.len()).max(1);
                let avail = &data[..data.len().min(room)];
                let old = buf.len();
                buf.extend_from_slice(avail);
                match find_head_end(&buf, scan) {
                    Ok(end) => {
                        let used = end.saturating_sub(old).max(1).min(avail.len());
                        let block = &buf[1..end];
                        if block.len() > 2 {
                            let mut slots = header_slots(block);
                            match httparse::parse_headers(block, &mut slots) {
                                Ok(httparse::Status::Complete((_, hs))) => {
                                    msg.headers.extend(convert_headers(hs))
                                }
                                _ => {
                                    sh.anomaly(Anomaly::MalformedHeaders {
                                        dir: self.dir,
                                        pos: self.pos,
                                    });
                                    msg.partial = true;
                                }
                            }
                        }
                        (self.finish_msg(sh, msg, true), used)
                    }
                    Err(resume) => {
                        if buf.len() > max {
                            sh.anomaly(Anomaly::HeaderTooLarge {
                                dir: self.dir,
                                pos: self.pos,
                            });
                            return (self.framing_lost(sh, msg, 0, false), avail.len());
                        }
                        (body(msg, Chunk::Trailers(buf, resume)), avail.len())
                    }
                }
            }
        }
    }

    fn resync_data(
        &mut self,
        sh: &mut Shared,
        mut r: Box<Resync>,
        data: &[u8],
        ts: u64,
    ) -> (Phase, usize) {
        let kind = sh.kind_of(self.dir);
        if !r.in_line {
            if r.at_line_start {
                let skip = data
                    .iter()
                    .take_while(|&&b| b == b'\r' || b == b'\n')
                    .count();
                if skip > 0 {
                    r.loss.unknown += skip as u64;
                    return (Phase::Resync(r), skip);
                }
                if !first_byte_ok(kind, data[0]) {
                    r.at_line_start = false;
                    return (Phase::Resync(r), 0);
                }
                r.in_line = true;
                r.at_line_start = false;
                r.cand_pos = self.pos;
                r.cand_ts = ts;
                r.cand_clean = self.after_nl;
                r.line.clear();
                return (Phase::Resync(r), 0);
            }
            // Request lines are looked for at line starts; status lines anywhere (a response
            // usually follows the previous body with no line break).
            let stop = match kind {
                Kind::Request => data.iter().position(|&b| b == b'\n'),
                Kind::Response | Kind::Unknown => {
                    data.iter().position(|&b| b == b'\n' || b == b'H')
                }
            };
            return match stop {
                Some(i) if data[i] == b'H' => {
                    r.loss.unknown += i as u64;
                    r.in_line = true;
                    r.cand_pos = self.pos + i as u64;
                    r.cand_ts = ts;
                    r.cand_clean = if i == 0 {
                        self.after_nl
                    } else {
                        data[i - 1] == b'\n'
                    };
                    r.line.clear();
                    (Phase::Resync(r), i)
                }
                Some(i) => {
                    r.loss.unknown += i as u64 + 1;
                    r.at_line_start = true;
                    (Phase::Resync(r), i + 1)
                }
                None => {
                    r.loss.unknown += data.len() as u64;
                    (Phase::Resync(r), data.len())
                }
            };
        }
        if kind == Kind::Response && r.line.len() < 7 {
            // Check the "HTTP/1." prefix byte by byte, so that a mismatching byte is looked at
            // again as a possible start.
            const PREFIX: &[u8] = b"HTTP/1.";
            let n = (PREFIX.len() - r.line.len()).min(data.len());
            for (k, &b) in data[..n].iter().enumerate() {
                if b != PREFIX[r.line.len()] {
                    r.loss.unknown += r.line.len() as u64;
                    r.line.clear();
                    r.in_line = false;
                    return (Phase::Resync(r), k);
                }
                r.line.push(b);
            }
            return (Phase::Resync(r), n);
        }
        let room = MAX_RESYNC_LINE
            .min(sh.limits.max_header_bytes)
            .saturating_sub(r.line.len())
            .max(1);
        let avail = &data[..data.len().min(room)];
        let nl = avail.iter().position(|&b| b == b'\n');
        let take = nl.map_or(avail.len(), |i| i + 1);
        r.line.extend_from_slice(&avail[..take]);
        if !prefix_ok(kind, &r.line) {
            // Not a start line: skip to the next line.
            r.loss.unknown += r.line.len() as u64;
            r.in_line = false;
            r.at_line_start = nl.is_some();
            return (Phase::Resync(r), take);
        }
        if nl.is_none() {
            if r.line.len() >= MAX_RESYNC_LINE.min(sh.limits.max_header_bytes) {
                r.loss.unknown += r.line.len() as u64;
                r.line.clear();
                r.in_line = false;
            }
            return (Phase::Resync(r), take);
        }
        // A request line right after a gap may be the tail of a cut one ("EAD /x HTTP/1.1" for
        // "HEAD /x ..."): there, only the standard methods are believed.
        let found = classify_line(kind, &r.line)
            .filter(|&k| r.cand_clean || k != Kind::Request || has_standard_method(&r.line));
        match found {
            Some(k) => {
                sh.decide(self.dir, k);
                if let Some(m) = r.loss.marker(k, r.cand_ts) {
                    sh.pairing.push_loss(k, m);
                }
                let line = std::mem::take(&mut r.line);
                let scan = line.len() - 1;
                (
                    Phase::Head(HeadBuf {
                        buf: line,
                        start_pos: r.cand_pos,
                        first_ns: r.cand_ts,
                        line_done: true,
                        scan,
                    }),
                    take,
                )
            }
            None => {
                r.loss.unknown += r.line.len() as u64;
                r.in_line = false;
                r.at_line_start = true;
                (Phase::Resync(r), take)
            }
        }
    }

    fn on_hole(&mut self, sh: &mut Shared, pos: u64, len: u64, ts: u64, known: bool) {
        let tb = self.wm_ns;
        self.pos = pos + len;
        self.wm_ns = self.wm_ns.max(ts);
        self.fresh = false;
        self.after_nl = false;
        let dir = self.dir;
        let resync_anomaly = |sh: &mut Shared| {
            sh.anomaly(Anomaly::GapResync {
                dir,
                pos,
                len,
                known,
            })
        };
        let in_body = |sh: &mut Shared, msg: &mut InMsg, n: u64| {
            msg.body.hole(n);
            msg.partial = true;
            msg.last_ns = msg.last_ns.max(ts);
            if !known {
                sh.anomaly(Anomaly::GapInBody { dir, pos, len: n });
            }
        };
        let at_boundary = |unknown: u64, tb: u64| LossAcc::region(true, unknown, tb);
        self.phase = match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Dead => Phase::Dead,
            Phase::Idle | Phase::Paused(_) => {
                resync_anomaly(sh);
                self.new_resync(at_boundary(len, tb), true)
            }
            Phase::Stalled(msg) => {
                // Not reached (no piece is taken while stalled); keep the head, lose the rest.
                resync_anomaly(sh);
                self.finish_response(sh, msg, false, true, false);
                self.new_resync(at_boundary(len, tb), true)
            }
            Phase::Head(h) => {
                resync_anomaly(sh);
                let loss = LossAcc::cut_head(sh.kind_of(dir), &h, len);
                self.new_resync(loss, true)
            }
            Phase::Body { mut msg, framing } => match framing {
                Framing::Close => {
                    in_body(sh, &mut msg, len);
                    Phase::Body { msg, framing }
                }
                Framing::Length(rem) if len < rem => {
                    in_body(sh, &mut msg, len);
                    Phase::Body {
                        msg,
                        framing: Framing::Length(rem - len),
                    }
                }
                Framing::Length(rem) => {
                    in_body(sh, &mut msg, rem);
                    let next = self.finish_msg(sh, msg, true);
                    if len == rem {
                        next
                    } else {
                        // The hole runs past the end of the message: what follows is lost.
                        resync_anomaly(sh);
                        self.new_resync(at_boundary(len - rem, tb), true)
                    }
                }
                Framing::Chunked(Chunk::Data(rem)) if len < rem => {
                    in_body(sh, &mut msg, len);
                    Phase::Body {
                        msg,
                        framing: Framing::Chunked(Chunk::Data(rem - len)),
                    }
                }
                Framing::Chunked(Chunk::Data(rem)) if len == rem => {
                    in_body(sh, &mut msg, len);
                    Phase::Body {
                        msg,
                        framing: Framing::Chunked(Chunk::DataEnd(false)),
                    }
                }
                Framing::Chunked(ch) => {
                    resync_anomaly(sh);
                    let in_data = match ch {
                        Chunk::Data(rem) => rem,
                        _ => 0,
                    };
                    msg.body.hole(in_data);
                    msg.partial = true;
                    self.wm_ns = tb;
                    let phase = self.framing_lost(sh, msg, len - in_data, true);
                    self.wm_ns = self.wm_ns.max(ts);
                    phase
                }
            },
            Phase::Resync(mut r) => {
                resync_anomaly(sh);
                r.line.clear();
                r.in_line = false;
                r.at_line_start = true;
                r.loss.unknown += len;
                Phase::Resync(r)
            }
        };
    }

    /// At close: finish what can be finished.
    fn finish_at_close(&mut self, sh: &mut Shared) {
        let kind = sh.kind_of(self.dir);
        match std::mem::replace(&mut self.phase, Phase::Dead) {
            Phase::Body {
                msg,
                framing: Framing::Close,
            } => {
                self.finish_msg(sh, msg, true);
            }
            Phase::Body { msg, .. } => {
                sh.anomaly(Anomaly::TruncatedAtClose { dir: self.dir });
                let mut msg = msg;
                msg.partial = true;
                self.finish_msg(sh, msg, false);
            }
            Phase::Stalled(msg) => {
                sh.anomaly(Anomaly::TruncatedAtClose { dir: self.dir });
                self.finish_response(sh, msg, false, false, false);
            }
            Phase::Head(h) => {
                sh.anomaly(Anomaly::TruncatedAtClose { dir: self.dir });
                if let Some(m) = LossAcc::cut_head(kind, &h, 0).marker(kind, u64::MAX) {
                    sh.pairing.push_loss(kind, m);
                }
            }
            Phase::Resync(r) => {
                if let Some(m) = r.loss.marker(kind, u64::MAX) {
                    sh.pairing.push_loss(kind, m);
                }
            }
            Phase::Idle | Phase::Paused(_) | Phase::Dead => {}
        }
    }
}

// ------------------------------------------------------------------------------------------
// The connection
// ------------------------------------------------------------------------------------------

/// Parses one connection: feed it pieces of both directions, take exchanges and anomalies.
pub struct ConnParser {
    dirs: [DirState; 2],
    sh: Shared,
    closed: bool,
    /// `close_at` gave the final positions of both directions.
    ends_known: bool,
}

impl ConnParser {
    /// `midstream: false`: the connection is seen from its first byte, and positions of both
    /// directions start at 0 (missing first bytes are a gap). `midstream: true`: it was picked
    /// up after it started; each direction starts at the first position seen and the first
    /// bytes may be the middle of a message. Pairing stays off for such a connection (see the
    /// module docs).
    pub fn new(role: Role, midstream: bool, limits: ParserLimits) -> Self {
        let pairing = Pairing {
            desync: midstream,
            ..Pairing::default()
        };
        ConnParser {
            dirs: [
                DirState::new(Dir::Inbound, &limits, midstream),
                DirState::new(Dir::Outbound, &limits, midstream),
            ],
            sh: Shared {
                limits,
                role,
                protocol: ConnProtocol::Unknown,
                closing: false,
                next_seq: 0,
                pairing,
                anomalies: Vec::new(),
            },
            closed: false,
            ends_known: false,
        }
    }

    pub fn data(&mut self, dir: Dir, pos: u64, ts_ns: u64, bytes: &[u8]) {
        if self.closed {
            self.sh.anomaly(Anomaly::DataAfterClose { dir });
            return;
        }
        self.dirs[dir.idx()].stream.push_data(pos, ts_ns, bytes);
        self.pump();
    }

    /// Bytes `[pos, pos + len)` of `dir` exist but were not captured.
    pub fn hole(&mut self, dir: Dir, pos: u64, len: u64, ts_ns: u64) {
        if self.closed {
            self.sh.anomaly(Anomaly::DataAfterClose { dir });
            return;
        }
        self.dirs[dir.idx()].stream.push_hole(pos, len, ts_ns);
        self.pump();
    }

    /// The connection closed: declare what never arrived, finish what can be finished (a
    /// response delimited by the close), and emit requests still waiting as `NoResponse`.
    ///
    /// Without the final positions, bytes lost at the very end of a direction cannot be seen,
    /// so fewer pairings can be proven after a gap than with [`ConnParser::close_at`].
    pub fn close(&mut self, ts_ns: u64) {
        self.close_inner(ts_ns, None);
    }

    /// Like [`ConnParser::close`], knowing the position after the last byte of each direction
    /// (the kernel's count at close): bytes missing before them are declared lost, and
    /// everything that happened on the connection is then known to have been seen.
    pub fn close_at(&mut self, ts_ns: u64, inbound_end: u64, outbound_end: u64) {
        self.close_inner(ts_ns, Some([inbound_end, outbound_end]));
    }

    fn close_inner(&mut self, ts_ns: u64, ends: Option<[u64; 2]>) {
        if self.closed {
            return;
        }
        self.closed = true;
        self.sh.closing = true;
        self.ends_known = ends.is_some();
        for (i, d) in self.dirs.iter_mut().enumerate() {
            match ends {
                Some(e) => d.stream.flush_until(e[i], ts_ns),
                None => d.stream.flush_all(),
            }
        }
        // Parse everything first, without pairing: a direction still resynchronising at the
        // end adds its loss marker in `finish_at_close`, and pairing must see it.
        loop {
            let mut progress = false;
            for d in &mut self.dirs {
                progress |= d.run(&mut self.sh);
            }
            if !progress {
                break;
            }
        }
        for d in &mut self.dirs {
            d.finish_at_close(&mut self.sh);
        }
        self.pump_pairing();
        self.sh.pairing.finish(&mut self.sh.anomalies);
    }

    pub fn take_exchanges(&mut self) -> Vec<Exchange> {
        std::mem::take(&mut self.sh.pairing.out)
    }

    pub fn take_anomalies(&mut self) -> Vec<Anomaly> {
        std::mem::take(&mut self.sh.anomalies)
    }

    pub fn state(&self) -> ConnProtocol {
        self.sh.protocol
    }

    /// The role, once decided from the content when it was created `Unknown`.
    pub fn role(&self) -> Role {
        self.sh.role
    }

    /// Reassembly counters of one direction.
    pub fn stream_stats(&self, dir: Dir) -> StreamStats {
        self.dirs[dir.idx()].stream.stats()
    }

    fn request_dir(&self) -> Option<Dir> {
        match self.sh.role {
            Role::Server => Some(Dir::Inbound),
            Role::Client => Some(Dir::Outbound),
            Role::Unknown => None,
        }
    }

    fn pump(&mut self) {
        loop {
            let mut progress = false;
            // Requests first, so that a response finds its request when both are ready.
            let order = match self.request_dir() {
                Some(Dir::Outbound) => [1, 0],
                _ => [0, 1],
            };
            for i in order {
                progress |= self.dirs[i].run(&mut self.sh);
            }
            progress |= self.pump_pairing();
            if !progress {
                break;
            }
        }
    }

    fn pump_pairing(&mut self) -> bool {
        let closing = self.sh.closing;
        let (req_wm, req_resyncing) = match self.request_dir() {
            Some(d) => {
                let ds = &self.dirs[d.idx()];
                (ds.wm_ns, matches!(ds.phase, Phase::Resync(_)))
            }
            None => (0, false),
        };
        let cx = PumpCtx {
            req_wm,
            req_resyncing: req_resyncing && !closing,
            closing,
            all_seen: closing && self.ends_known,
            max_outstanding: self.sh.limits.max_outstanding_requests,
        };
        let progress = self.sh.pairing.pump(&cx, &mut self.sh.anomalies);
        if self.sh.pairing.upgraded && self.sh.protocol != ConnProtocol::Upgraded {
            self.sh.protocol = ConnProtocol::Upgraded;
        }
        progress
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IN: Dir = Dir::Inbound;
    const OUT: Dir = Dir::Outbound;

    pub(super) fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn raw_deflate(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// A connection fed in order with increasing timestamps (10 ns apart).
    struct Conn {
        p: ConnParser,
        pos: [u64; 2],
        ts: u64,
    }

    impl Conn {
        fn new(role: Role) -> Self {
            Self::with(role, false, ParserLimits::default())
        }

        fn with(role: Role, midstream: bool, limits: ParserLimits) -> Self {
            Conn {
                p: ConnParser::new(role, midstream, limits),
                pos: [0; 2],
                ts: 0,
            }
        }

        fn server() -> Self {
            Self::new(Role::Server)
        }

        fn send(&mut self, dir: Dir, bytes: &[u8]) -> &mut Self {
            self.ts += 10;
            self.p.data(dir, self.pos[dir.idx()], self.ts, bytes);
            self.pos[dir.idx()] += bytes.len() as u64;
            self
        }

        fn send_split(&mut self, dir: Dir, bytes: &[u8], n: usize) -> &mut Self {
            for c in bytes.chunks(n) {
                self.send(dir, c);
            }
            self
        }

        fn known_hole(&mut self, dir: Dir, len: u64) -> &mut Self {
            self.ts += 10;
            self.p.hole(dir, self.pos[dir.idx()], len, self.ts);
            self.pos[dir.idx()] += len;
            self
        }

        /// Bytes that never arrive (an unannounced loss).
        fn lose(&mut self, dir: Dir, len: u64) -> &mut Self {
            self.ts += 10;
            self.pos[dir.idx()] += len;
            self
        }

        fn ex(&mut self) -> Vec<Exchange> {
            self.p.take_exchanges()
        }

        fn reasons(&mut self) -> Vec<&'static str> {
            self.p
                .take_anomalies()
                .iter()
                .map(Anomaly::reason)
                .collect()
        }

        fn close(&mut self) -> Vec<Exchange> {
            self.ts += 10;
            self.p.close(self.ts);
            self.p.take_exchanges()
        }

        /// Close with the final positions known.
        fn close_at(&mut self) -> Vec<Exchange> {
            self.ts += 10;
            self.p.close_at(self.ts, self.pos[0], self.pos[1]);
            self.p.take_exchanges()
        }
    }

    fn get(path: &str) -> Vec<u8> {
        format!("GET {path} HTTP/1.1\r\nHost: example\r\n\r\n").into_bytes()
    }

    fn ok(body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    fn hv<'a>(hs: &'a [Header], name: &str) -> Option<&'a str> {
        header(hs, name).and_then(Header::value_str)
    }

    fn pairs(ex: &[Exchange]) -> Vec<(String, Option<u16>, Completeness)> {
        ex.iter()
            .map(|e| {
                (
                    e.request.target.clone(),
                    e.response.as_ref().map(|r| r.status),
                    e.completeness,
                )
            })
            .collect()
    }

    #[test]
    fn simple_get_and_timestamps() {
        let mut c = Conn::server();
        c.send(IN, b"GET /a?b=c HTTP/1.1\r\nHost: x\r\n");
        c.send(IN, b"\r\n");
        c.send(
            OUT,
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Y: z\r\n\r\nhel",
        );
        c.send(OUT, b"lo");
        let ex = c.ex();
        assert_eq!(ex.len(), 1);
        let e = &ex[0];
        assert_eq!(e.request.method, "GET");
        assert_eq!(e.request.target, "/a?b=c");
        assert_eq!(e.request.minor_version, 1);
        assert_eq!(hv(&e.request.headers, "host"), Some("x"));
        assert_eq!((e.request.first_ns, e.request.last_ns), (10, 20));
        let r = e.response.as_ref().unwrap();
        assert_eq!((r.status, r.reason.as_str()), (200, "OK"));
        assert_eq!(&r.body.data[..], b"hello");
        assert_eq!(r.body.wire_len, 5);
        assert_eq!(r.body.loss, None);
        assert_eq!((r.first_ns, r.last_ns), (30, 40));
        assert_eq!(e.completeness, Completeness::Complete);
        assert!(!e.upgraded);
        assert_eq!(c.p.state(), ConnProtocol::Http1);
        assert!(c.reasons().is_empty());
        assert!(c.close().is_empty());
    }

    #[test]
    fn keep_alive_and_request_bodies() {
        let mut c = Conn::server();
        for i in 0..3 {
            c.send(
                IN,
                format!("POST /p{i} HTTP/1.1\r\nContent-Length: 3\r\n\r\nab{i}").as_bytes(),
            );
            c.send(OUT, &ok(&format!("r{i}")));
        }
        let ex = c.ex();
        assert_eq!(ex.len(), 3);
        for (i, e) in ex.iter().enumerate() {
            assert_eq!(e.request.target, format!("/p{i}"));
            assert_eq!(&e.request.body.data[..], format!("ab{i}").as_bytes());
            assert_eq!(
                &e.response.as_ref().unwrap().body.data[..],
                format!("r{i}").as_bytes()
            );
        }
    }

    #[test]
    fn pipelined_requests_pair_in_order() {
        let mut c = Conn::server();
        let mut reqs = Vec::new();
        for i in 0..4 {
            reqs.extend(get(&format!("/{i}")));
        }
        c.send(IN, &reqs);
        let mut resps = Vec::new();
        for i in 0..4 {
            resps.extend(ok(&format!("{i}")));
        }
        c.send_split(OUT, &resps, 7);
        let ex = c.ex();
        assert_eq!(ex.len(), 4);
        for (i, e) in ex.iter().enumerate() {
            assert_eq!(e.request.target, format!("/{i}"));
            assert_eq!(
                &e.response.as_ref().unwrap().body.data[..],
                format!("{i}").as_bytes()
            );
        }
    }

    #[test]
    fn interim_responses_and_expect_continue() {
        let mut c = Conn::server();
        c.send(
            IN,
            b"PUT /up HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n",
        );
        c.send(OUT, b"HTTP/1.1 100 Continue\r\n\r\n");
        assert!(c.ex().is_empty());
        c.send(IN, b"data");
        c.send(OUT, b"HTTP/1.1 102 Processing\r\n\r\n");
        c.send(OUT, b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n");
        let ex = c.ex();
        assert_eq!(ex.len(), 1);
        assert_eq!(&ex[0].request.body.data[..], b"data");
        assert_eq!(ex[0].response.as_ref().unwrap().status, 201);
        assert_eq!(ex[0].completeness, Completeness::Complete);
    }

    #[test]
    fn early_final_response_waits_for_request_body() {
        let mut c = Conn::server();
        c.send(IN, b"POST /big HTTP/1.1\r\nContent-Length: 6\r\n\r\nabc");
        c.send(OUT, b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n");
        assert!(c.ex().is_empty());
        c.send(IN, b"def");
        let ex = c.ex();
        assert_eq!(ex.len(), 1);
        assert_eq!(&ex[0].request.body.data[..], b"abcdef");
        assert_eq!(ex[0].response.as_ref().unwrap().status, 413);
    }

    #[test]
    fn chunked_bodies_with_extensions_trailers_and_split_sizes() {
        let body = b"4;ext=1\r\nWiki\r\nB \r\npedia in \r\n\r\na;x\r\n chunks.!!\r\n0\r\nX-Trailer: t\r\n\r\n";
        let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut whole = head.to_vec();
        whole.extend_from_slice(body);
        for n in [1, 2, 3, 5, 1000] {
            let mut c = Conn::server();
            c.send(IN, &get("/c"));
            c.send_split(OUT, &whole, n);
            c.send(IN, &get("/next"));
            c.send(OUT, &ok("n"));
            let ex = c.ex();
            assert_eq!(ex.len(), 2, "split {n} {:?} {:?}", pairs(&ex), c.reasons());
            let r = ex[0].response.as_ref().unwrap();
            assert_eq!(&r.body.data[..], b"Wikipedia in \r\n chunks.!!");
            assert_eq!(r.body.wire_len, 4 + 11 + 10);
            assert_eq!(hv(&r.headers, "x-trailer"), Some("t"));
            assert_eq!(&ex[1].response.as_ref().unwrap().body.data[..], b"n");
            assert!(c.reasons().is_empty(), "split {n}");
        }
    }

    #[test]
    fn chunked_upper_and_lower_hex_and_bare_lf() {
        let mut c = Conn::server();
        c.send(
            IN,
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n1a\nabcdefghijklmnopqrstuvwxyz\n0\n\n",
        );
        c.send(OUT, &ok(""));
        let ex = c.ex();
        assert_eq!(ex.len(), 1);
        assert_eq!(ex[0].request.body.wire_len, 52);
    }

    #[test]
    fn chunk_size_overflow_is_an_error() {
        assert_eq!(parse_chunk_size(b"ffffffffffffffff\r\n"), Some(u64::MAX));
        assert_eq!(parse_chunk_size(b"10000000000000000\r\n"), None);
        assert_eq!(parse_chunk_size(b"zz\r\n"), None);
        assert_eq!(parse_chunk_size(b"5 ; a=b\r\n"), Some(5));
        assert_eq!(parse_chunk_size(b"5 x\r\n"), None);
        let mut c = Conn::server();
        c.send(IN, &get("/a"));
        c.send(
            OUT,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\n",
        );
        assert!(c.reasons().contains(&"bad_chunk_size"));
        let ex = c.ex();
        assert_eq!(ex.len(), 1);
        assert_eq!(ex[0].completeness, Completeness::Partial);
        assert_eq!(
            ex[0].response.as_ref().unwrap().body.loss,
            Some(BodyLoss::Incomplete)
        );
    }

    #[test]
    fn responses_without_body_regardless_of_headers() {
        let mut c = Conn::server();
        c.send(IN, b"HEAD /h HTTP/1.1\r\n\r\n");
        c.send(IN, &get("/204"));
        c.send(IN, &get("/304"));
        c.send(IN, &get("/last"));
        c.send(OUT, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n");
        c.send(
            OUT,
            b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n",
        );
        c.send(
            OUT,
            b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        c.send(OUT, &ok("end"));
        let ex = c.ex();
        assert_eq!(
            ex.iter()
                .map(|e| e.response.as_ref().unwrap().status)
                .collect::<Vec<_>>(),
            vec![200, 204, 304, 200]
        );
        assert_eq!(ex[0].response.as_ref().unwrap().body.wire_len, 0);
        assert_eq!(&ex[3].response.as_ref().unwrap().body.data[..], b"end");
    }

    #[test]
    fn close_delimited_response_finishes_at_close() {
        let mut c = Conn::server();
        c.send(IN, b"GET /old HTTP/1.0\r\n\r\n");
        c.send(OUT, b"HTTP/1.0 200 OK\r\n\r\nall of ");
        c.send(OUT, b"this");
        assert!(c.ex().is_empty());
        let ex = c.close();
        assert_eq!(ex.len(), 1);
        assert_eq!(ex[0].request.minor_version, 0);
        let r = ex[0].response.as_ref().unwrap();
        assert_eq!(&r.body.data[..], b"all of this");
        assert_eq!(ex[0].completeness, Completeness::Complete);
    }

    #[test]
    fn request_without_length_has_no_body_and_close_flushes_no_response() {
        let mut c = Conn::server();
        c.send(IN, b"POST /nolen HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n");
        c.send(OUT, &ok("1"));
        let ex = c.ex();
        assert_eq!(
            pairs(&ex),
            vec![("/nolen".into(), Some(200), Completeness::Complete)]
        );
        let ex = c.close();
        assert_eq!(
            pairs(&ex),
            vec![("/b".into(), None, Completeness::NoResponse)]
        );
    }

    #[test]
    fn gzip_and_deflate_are_decoded() {
        let plain = b"the quick brown fox jumps over the lazy dog ".repeat(50);
        for (name, enc) in [
            ("gzip", gzip(&plain)),
            ("deflate", zlib(&plain)),
            ("deflate", raw_deflate(&plain)),
        ] {
            let mut c = Conn::server();
            c.send(IN, &get("/z"));
            let mut resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Encoding: {name}\r\nContent-Length: {}\r\n\r\n",
                enc.len()
            )
            .into_bytes();
            resp.extend_from_slice(&enc);
            c.send_split(OUT, &resp, 13);
            let ex = c.ex();
            let r = ex[0].response.as_ref().unwrap();
            assert_eq!(&r.body.data[..], &plain[..], "{name}");
            assert_eq!(r.body.wire_len, enc.len() as u64);
            assert_eq!(r.body.decoded_from.as_deref(), Some(name));
            assert_eq!(r.body.loss, None);
            assert!(c.reasons().is_empty());
        }
    }

    #[test]
    fn gzip_in_chunked_request() {
        let plain = b"{\"user\":\"alice\"}";
        let enc = gzip(plain);
        let mut req =
            b"POST /j HTTP/1.1\r\nContent-Encoding: GZIP\r\nTransfer-Encoding: chunked\r\n\r\n"
                .to_vec();
        for part in enc.chunks(7) {
            req.extend(format!("{:X}\r\n", part.len()).as_bytes());
            req.extend(part);
            req.extend(b"\r\n");
        }
        req.extend(b"0\r\n\r\n");
        let mut c = Conn::server();
        c.send_split(IN, &req, 3);
        c.send(OUT, &ok(""));
        let ex = c.ex();
        assert_eq!(&ex[0].request.body.data[..], plain);
    }

    #[test]
    fn decode_error_is_an_anomaly_not_a_panic() {
        let mut bad = gzip(b"hello hello hello hello");
        let n = bad.len();
        bad[n - 3] ^= 0xff; // corrupt the trailer (length)
        for (enc, body) in [
            ("gzip", bad),
            ("gzip", b"not gzip at all".to_vec()),
            ("deflate", vec![0xff; 20]),
        ] {
            let mut c = Conn::server();
            c.send(IN, &get("/e"));
            let mut resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Encoding: {enc}\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            resp.extend_from_slice(&body);
            c.send(OUT, &resp);
            let ex = c.ex();
            let r = ex[0].response.as_ref().unwrap();
            assert_eq!(r.body.loss, Some(BodyLoss::DecodeError));
            assert_eq!(r.body.wire_len, body.len() as u64);
            let reasons = c.reasons();
            assert!(reasons.contains(&"gzip_error") || reasons.contains(&"deflate_error"));
            // Still a complete exchange: nothing was lost on the wire.
            assert_eq!(ex[0].completeness, Completeness::Complete);
        }
    }

    #[test]
    fn gzip_bomb_is_bounded() {
        let plain = vec![0u8; 4 << 20];
        let enc = gzip(&plain);
        let limits = ParserLimits {
            body_keep_bytes: 1 << 20,
            max_decoded_bytes: 64 * 1024,
            ..ParserLimits::default()
        };
        let mut c = Conn::with(Role::Server, false, limits);
        c.send(IN, &get("/bomb"));
        let mut resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\n\r\n",
            enc.len()
        )
        .into_bytes();
        resp.extend_from_slice(&enc);
        c.send(OUT, &resp);
        let ex = c.ex();
        let r = ex[0].response.as_ref().unwrap();
        assert_eq!(r.body.data.len(), 64 * 1024);
        assert_eq!(r.body.loss, Some(BodyLoss::KeptLimit));
        assert_eq!(r.body.wire_len, enc.len() as u64);
    }

    #[test]
    fn identity_body_keep_limit() {
        let limits = ParserLimits {
            body_keep_bytes: 4,
            ..ParserLimits::default()
        };
        let mut c = Conn::with(Role::Server, false, limits);
        c.send(IN, &get("/k"));
        c.send(OUT, &ok("0123456789"));
        let ex = c.ex();
        let r = ex[0].response.as_ref().unwrap();
        assert_eq!(&r.body.data[..], b"0123");
        assert_eq!(r.body.wire_len, 10);
        assert_eq!(r.body.loss, Some(BodyLoss::KeptLimit));
        assert_eq!(ex[0].completeness, Completeness::Complete);
    }

    #[test]
    fn websocket_upgrade_stops_parsing() {
        let mut c = Conn::server();
        c.send(
            IN,
            b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x85junkframe",
        );
        c.send(
            OUT,
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello",
        );
        c.send(IN, b"GET /not-http HTTP/1.1\r\n\r\n");
        let ex = c.ex();
        assert_eq!(ex.len(), 1);
        assert!(ex[0].upgraded);
        assert_eq!(ex[0].response.as_ref().unwrap().status, 101);
        assert_eq!(c.p.state(), ConnProtocol::Upgraded);
        assert!(c.close().is_empty());
        assert!(c.reasons().is_empty());
    }

    #[test]
    fn connect_tunnel_stops_parsing() {
        let mut c = Conn::new(Role::Client);
        c.send(
            OUT,
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        );
        // The client may start the tunnel before the answer arrives.
        c.send(OUT, b"\x16\x03\x01\x00\x05hello");
        c.send(
            IN,
            b"HTTP/1.1 200 Connection Established\r\n\r\n\x16\x03\x03",
        );
        let ex = c.ex();
        assert_eq!(ex.len(), 1);
        assert!(ex[0].upgraded);
        assert_eq!(ex[0].request.method, "CONNECT");
        assert_eq!(ex[0].request.target, "example.com:443");
        assert_eq!(c.p.state(), ConnProtocol::Upgraded);
        assert!(c.reasons().is_empty());
    }

    #[test]
    fn refused_connect_goes_on_as_http() {
        let mut c = Conn::new(Role::Client);
        c.send(OUT, b"CONNECT example.com:443 HTTP/1.1\r\n\r\n");
        c.send(IN, b"HTTP/1.1 407 Proxy Auth\r\nContent-Length: 0\r\n\r\n");
        c.send(OUT, &get("/after"));
        c.send(IN, &ok("x"));
        let ex = c.ex();
        assert_eq!(ex.len(), 2);
        assert!(!ex[0].upgraded);
        assert_eq!(ex[1].request.target, "/after");
        assert_eq!(c.p.state(), ConnProtocol::Http1);
    }

    #[test]
    fn http2_preface_is_not_parsed() {
        let mut c = Conn::server();
        c.send_split(
            IN,
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00",
            5,
        );
        c.send(OUT, b"\x00\x00\x00\x04\x01\x00\x00\x00\x00");
        assert_eq!(c.p.state(), ConnProtocol::Http2Unsupported);
        assert_eq!(c.reasons(), vec!["http2_preface"]);
        assert!(c.close().is_empty());
        assert!(c.reasons().is_empty());
    }

    #[test]
    fn tls_on_plaintext_is_ignored() {
        let mut c = Conn::new(Role::Unknown);
        c.send(IN, b"\x16");
        c.send(
            IN,
            b"\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03GET / HTTP/1.1\r\n\r\n",
        );
        c.send(OUT, &ok("x"));
        assert_eq!(c.p.state(), ConnProtocol::TlsOnPlaintext);
        assert_eq!(c.reasons(), vec!["tls_record_on_plaintext"]);
        assert!(c.close().is_empty());
    }

    #[test]
    fn unknown_role_is_decided_from_content() {
        let mut c = Conn::new(Role::Unknown);
        c.send(OUT, &get("/out"));
        c.send(IN, &ok("in"));
        assert_eq!(c.p.role(), Role::Client);
        let ex = c.ex();
        assert_eq!(ex[0].request.target, "/out");

        let mut c = Conn::new(Role::Unknown);
        c.send(OUT, &ok("early")); // the response arrives first (reordered events)
        c.send(IN, &get("/in"));
        assert_eq!(c.p.role(), Role::Server);
        let ex = c.ex();
        assert_eq!(ex.len(), 1);
        assert_eq!(&ex[0].response.as_ref().unwrap().body.data[..], b"early");
    }

    #[test]
    fn response_before_its_request_waits_for_it() {
        let mut c = Conn::server();
        // A HEAD response with Content-Length arrives before the HEAD request is seen: it must
        // not be framed with a body.
        c.send(OUT, b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n");
        c.send(OUT, &ok("second"));
        c.send(IN, b"HEAD /h HTTP/1.1\r\n\r\n");
        c.send(IN, &get("/g"));
        let ex = c.ex();
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[0].response.as_ref().unwrap().body.wire_len, 0);
        assert_eq!(&ex[1].response.as_ref().unwrap().body.data[..], b"second");
        assert!(c.reasons().is_empty());
    }

    #[test]
    fn known_hole_in_content_length_body_is_skipped() {
        let mut c = Conn::server();
        c.send(IN, &get("/big"));
        c.send(
            OUT,
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",
        );
        c.known_hole(OUT, 80);
        c.send(OUT, b"abcdefghij");
        c.send(IN, &get("/next"));
        c.send(OUT, &ok("fine"));
        let ex = c.ex();
        assert_eq!(ex.len(), 2);
        let r = ex[0].response.as_ref().unwrap();
        assert_eq!(r.body.wire_len, 100);
        assert_eq!(r.body.loss, Some(BodyLoss::NotCaptured));
        assert_eq!(&r.body.data[..], b"0123456789");
        assert_eq!(ex[0].completeness, Completeness::Partial);
        assert_eq!(ex[1].completeness, Completeness::Complete);
        assert_eq!(&ex[1].response.as_ref().unwrap().body.data[..], b"fine");
        assert!(c.reasons().is_empty());
    }

    #[test]
    fn known_hole_in_chunk_data_is_skipped() {
        let mut c = Conn::server();
        c.send(IN, &get("/c"));
        c.send(
            OUT,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n20\r\n0123",
        );
        c.known_hole(OUT, 28);
        c.send(OUT, b"\r\n3\r\nxyz\r\n0\r\n\r\n");
        c.send(IN, &get("/n"));
        c.send(OUT, &ok("n"));
        let ex = c.ex();
        assert_eq!(ex.len(), 2);
        let r = ex[0].response.as_ref().unwrap();
        assert_eq!(r.body.wire_len, 35);
        assert_eq!(r.body.loss, Some(BodyLoss::NotCaptured));
        assert_eq!(ex[1].completeness, Completeness::Complete);
    }

    #[test]
    fn known_hole_ending_a_sendfile_body() {
        let mut c = Conn::server();
        c.send(IN, &get("/file"));
        c.send(OUT, b"HTTP/1.1 200 OK\r\nContent-Length: 4096\r\n\r\n");
        c.known_hole(OUT, 4096);
        c.send(IN, &get("/n"));
        c.send(OUT, &ok("n"));
        let ex = c.ex();
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[0].response.as_ref().unwrap().body.wire_len, 4096);
        assert_eq!(ex[1].response.as_ref().unwrap().status, 200);
        assert_eq!(ex[1].completeness, Completeness::Complete);
    }

    #[test]
    fn unknown_gap_inside_a_known_body_is_skipped() {
        let limits = ParserLimits {
            stream: StreamLimits {
                max_pending_bytes: 1 << 20,
                max_pending_segments: 1,
            },
            ..ParserLimits::default()
        };
        let mut c = Conn::with(Role::Server, false, limits);
        c.send(IN, &get("/a"));
        c.send(
            OUT,
            b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n0123456789",
        );
        c.lose(OUT, 10);
        c.send(OUT, b"abcdefghij");
        c.send(IN, &get("/b"));
        c.send(OUT, &ok("b"));
        let ex = c.ex();
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[0].response.as_ref().unwrap().body.wire_len, 30);
        assert_eq!(ex[0].completeness, Completeness::Partial);
        assert_eq!(ex[1].completeness, Completeness::Complete);
        assert_eq!(c.reasons(), vec!["gap_in_body"]);
    }

    #[test]
    fn hole_in_request_headers_resyncs_to_next_request() {
        let mut c = Conn::server();
        c.send(IN, b"GET /cut HTTP/1.1\r\nCookie: aaaa");
        c.known_hole(IN, 5000);
        c.send(IN, b"aaa\r\n\r\n");
        c.send(IN, &get("/after"));
        let r = c.reasons();
        assert!(r.contains(&"gap_resync"), "{r:?}");
        // The cut request is lost; its response answers nothing we know, and the number of
        // requests lost in 5000 bytes is uncertain: nothing is paired.
        c.send(OUT, &ok("cut"));
        c.send(OUT, &ok("after"));
        let ex = c.close();
        assert_eq!(
            pairs(&ex),
            vec![("/after".into(), None, Completeness::Partial)]
        );
    }

    #[test]
    fn small_malformed_request_is_counted_exactly_and_pairing_goes_on() {
        let mut c = Conn::server();
        c.send(IN, b"BAD\x01LINE\r\n\r\n");
        c.send(IN, &get("/good"));
        c.send(
            OUT,
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
        );
        c.send(OUT, &ok("good"));
        let ex = c.ex();
        assert_eq!(
            pairs(&ex),
            vec![("/good".into(), Some(200), Completeness::Complete)]
        );
        let r = c.reasons();
        assert!(r.contains(&"malformed_request_line"), "{r:?}");
        assert!(r.contains(&"unpaired_response"), "{r:?}");
    }

    fn one_segment_limits() -> ParserLimits {
        ParserLimits {
            stream: StreamLimits {
                max_pending_bytes: 1 << 20,
                max_pending_segments: 1,
            },
            ..ParserLimits::default()
        }
    }

    #[test]
    fn response_lost_in_gap_is_reported_and_pairing_resumes() {
        // Non-pipelined traffic. The gap cuts response 2 after its status line: /2 has no
        // response, and since /3 was sent after the gap, /3 and /4 pair with certainty.
        let mut c = Conn::with(Role::Server, false, one_segment_limits());
        c.send(IN, &get("/1"));
        c.send(OUT, &ok(&"one".repeat(20)));
        c.send(IN, &get("/2"));
        c.send(OUT, b"HTTP/1.1 200 OK\r\nX-For: 2\r\nCont");
        c.lose(OUT, 30);
        c.send(OUT, b"more body of 2\r\n"); // line starts in the body are not status lines
        c.send(IN, &get("/3"));
        c.send(OUT, &ok(&"three".repeat(20)));
        c.send(IN, &get("/4"));
        c.send(OUT, &ok(&"four".repeat(20)));
        let ex = c.ex();
        assert_eq!(
            pairs(&ex),
            vec![
                ("/1".into(), Some(200), Completeness::Complete),
                ("/2".into(), None, Completeness::Partial),
                ("/3".into(), Some(200), Completeness::Complete),
                ("/4".into(), Some(200), Completeness::Complete),
            ]
        );
        assert_eq!(
            &ex[2].response.as_ref().unwrap().body.data[..],
            "three".repeat(20).as_bytes()
        );
        let r = c.reasons();
        assert!(
            r.contains(&"gap_resync") && r.contains(&"response_lost"),
            "{r:?}"
        );
    }

    #[test]
    fn gap_inside_a_response_body_keeps_pairing() {
        // The gap starts in response 1's chunked body and ends in the same body: /1 gets a
        // partial response; /2 was sent after the gap, so nothing else can have been lost.
        let mut c = Conn::with(Role::Server, false, one_segment_limits());
        c.send(IN, &get("/1"));
        c.send(
            OUT,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
        );
        c.lose(OUT, 20);
        c.send(OUT, b"xyz\r\n0\r\n\r\n");
        c.send(IN, &get("/2"));
        c.send(OUT, &ok("two"));
        let ex = c.close_at();
        assert_eq!(
            pairs(&ex),
            vec![
                ("/1".into(), Some(200), Completeness::Partial),
                ("/2".into(), Some(200), Completeness::Complete),
            ]
        );
    }

    #[test]
    fn pipelined_gap_does_not_mispair() {
        // Four pipelined requests; the loss takes the end of response 1 and the start of
        // response 2. Whether one or two responses were lost cannot be told (the lost region
        // could hold several), and pipelining means a later response may answer any of the
        // candidates: nothing after the gap is paired.
        let limits = ParserLimits {
            stream: StreamLimits {
                max_pending_bytes: 1 << 20,
                max_pending_segments: 1,
            },
            ..ParserLimits::default()
        };
        let mut c = Conn::with(Role::Server, false, limits);
        for i in 1..=4 {
            c.send(IN, &get(&format!("/{i}")));
        }
        let r1 = format!(
            "HTTP/1.1 200 OK\r\nX-For: 1\r\nContent-Length: 40\r\n\r\n{}",
            "a".repeat(40)
        );
        let r2 = format!(
            "HTTP/1.1 200 OK\r\nX-For: 2\r\nContent-Length: 40\r\n\r\n{}",
            "b".repeat(40)
        );
        let r3 = "HTTP/1.1 200 OK\r\nX-For: 3\r\nContent-Length: 0\r\n\r\n";
        let r4 = "HTTP/1.1 200 OK\r\nX-For: 4\r\nContent-Length: 0\r\n\r\n";
        let cut = r1.len() - 20;
        c.send(OUT, &r1.as_bytes()[..cut]);
        c.lose(OUT, (20 + 30) as u64);
        c.send(OUT, &r2.as_bytes()[30..]);
        c.send(OUT, r3.as_bytes());
        c.send(OUT, r4.as_bytes());
        let ex = c.close();
        assert_eq!(ex.len(), 4);
        for e in &ex {
            if let Some(r) = &e.response {
                let id = hv(&r.headers, "x-for").unwrap();
                assert_eq!(e.request.target, format!("/{id}"), "{e:?}");
            }
        }
        assert!(ex[0].response.is_some());
    }

    #[test]
    fn unprovable_loss_count_gives_up_pairing() {
        // The loss takes the end of response 1 and the start of response 2, status line
        // included. The lost region might hold only an interim (1xx) response, in which case
        // response 3 would answer /2: pairing stops rather than guess.
        let mut c = Conn::with(Role::Server, false, one_segment_limits());
        c.send(IN, &get("/1"));
        let r1 = format!(
            "HTTP/1.1 200 OK\r\nX-For: 1\r\nContent-Length: 40\r\n\r\n{}",
            "a".repeat(40)
        );
        let r2 = format!(
            "HTTP/1.1 200 OK\r\nX-For: 2\r\nContent-Length: 40\r\n\r\n{}",
            "b".repeat(40)
        );
        c.send(OUT, &r1.as_bytes()[..r1.len() - 20]);
        c.lose(OUT, 20);
        c.send(IN, &get("/2"));
        c.lose(OUT, 30);
        c.send(OUT, &r2.as_bytes()[30..]);
        c.send(IN, &get("/3"));
        c.send(OUT, &ok("3"));
        c.send(IN, &get("/4"));
        c.send(OUT, &ok("4"));
        let ex = c.close();
        assert_eq!(
            pairs(&ex),
            vec![
                ("/1".into(), Some(200), Completeness::Partial),
                ("/2".into(), None, Completeness::Partial),
                ("/3".into(), None, Completeness::Partial),
                ("/4".into(), None, Completeness::Partial),
            ]
        );
        let r = c.reasons();
        assert!(
            r.contains(&"pairing_uncertain") && r.contains(&"unpaired_response"),
            "{r:?}"
        );
    }

    #[test]
    fn midstream_start_resyncs_and_does_not_pair() {
        let mut c = Conn::with(Role::Server, true, ParserLimits::default());
        c.send(IN, b"ody-of-previous\r\nGET /m HTTP/1.1\r\nHost: h\r\n\r\n");
        c.send(
            OUT,
            b"rest of a body\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        );
        let ex = c.close();
        assert_eq!(pairs(&ex), vec![("/m".into(), None, Completeness::Partial)]);
        let r = c.reasons();
        assert!(
            r.contains(&"pairing_uncertain") && r.contains(&"unpaired_response"),
            "{r:?}"
        );
    }

    #[test]
    fn midstream_start_at_a_boundary_parses_the_first_message() {
        let mut c = Conn::with(Role::Server, true, ParserLimits::default());
        c.send(IN, &get("/first"));
        let ex = c.close();
        assert_eq!(ex[0].request.target, "/first");
    }

    #[test]
    fn header_too_large_resyncs() {
        let limits = ParserLimits {
            max_header_bytes: 256,
            ..ParserLimits::default()
        };
        let mut c = Conn::with(Role::Server, false, limits);
        let mut req = b"GET /huge HTTP/1.1\r\n".to_vec();
        for i in 0..40 {
            req.extend(format!("X-H{i}: vvvvvvvvvvvvvvvv\r\n").as_bytes());
        }
        req.extend(b"\r\n");
        req.extend(get("/small"));
        c.send_split(IN, &req, 17);
        let r = c.reasons();
        assert!(r.contains(&"header_too_large"), "{r:?}");
        let ex = c.close();
        assert_eq!(ex.len(), 1);
        assert_eq!(ex[0].request.target, "/small");
    }

    #[test]
    fn garbage_headers_stay_bounded() {
        let limits = ParserLimits {
            max_header_bytes: 1024,
            ..ParserLimits::default()
        };
        let mut c = Conn::with(Role::Server, false, limits);
        c.send(IN, b"GET / HTTP/1.1\r\n");
        for _ in 0..1000 {
            c.send(IN, b"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx");
        }
        let r = c.reasons();
        assert_eq!(r, vec!["header_too_large"]);
    }

    #[test]
    fn bad_content_length_is_an_anomaly() {
        let mut c = Conn::server();
        c.send(
            IN,
            b"POST /x HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        );
        c.send(IN, &get("/y"));
        let r = c.reasons();
        assert!(r.contains(&"bad_content_length"), "{r:?}");
        let ex = c.close();
        assert_eq!(ex[0].request.target, "/x");
        assert_eq!(ex[0].request.body.loss, Some(BodyLoss::Incomplete));
        assert_eq!(ex[0].completeness, Completeness::NoResponse);
        assert_eq!(ex[1].request.target, "/y");
    }

    #[test]
    fn te_and_cl_uses_chunked_and_is_counted() {
        let mut c = Conn::server();
        c.send(
            IN,
            b"POST /s HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        );
        c.send(OUT, &ok(""));
        assert_eq!(c.reasons(), vec!["content_length_with_chunked"]);
        assert_eq!(&c.ex()[0].request.body.data[..], b"abc");
    }

    #[test]
    fn pipeline_overflow_gives_up_pairing() {
        let limits = ParserLimits {
            max_outstanding_requests: 3,
            ..ParserLimits::default()
        };
        let mut c = Conn::with(Role::Server, false, limits);
        for i in 0..5 {
            c.send(IN, &get(&format!("/{i}")));
        }
        assert!(c.reasons().contains(&"pipeline_overflow"));
        c.send(OUT, &ok("0"));
        let ex = c.close();
        assert_eq!(ex.len(), 5);
        assert!(ex.iter().all(|e| e.response.is_none()));
    }

    #[test]
    fn truncated_response_at_close() {
        let mut c = Conn::server();
        c.send(IN, &get("/t"));
        c.send(OUT, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc");
        let ex = c.close();
        assert_eq!(ex.len(), 1);
        let r = ex[0].response.as_ref().unwrap();
        assert_eq!(r.body.loss, Some(BodyLoss::Incomplete));
        assert_eq!(ex[0].completeness, Completeness::Partial);
        assert_eq!(c.reasons(), vec!["truncated_at_close"]);
    }

    #[test]
    fn response_without_request() {
        let mut c = Conn::server();
        c.send(OUT, &ok("?"));
        assert!(c.close().is_empty());
        assert_eq!(c.reasons(), vec!["response_without_request"]);
    }

    #[test]
    fn out_of_order_chunks_are_reassembled() {
        let mut p = ConnParser::new(Role::Server, false, ParserLimits::default());
        let req = get("/ooo");
        let resp = ok("abcdef");
        p.data(IN, 0, 1, &req[..5]);
        p.data(IN, 10, 3, &req[10..]);
        p.data(IN, 5, 2, &req[5..10]);
        p.data(OUT, 0, 4, &resp[..3]);
        p.data(OUT, 20, 6, &resp[20..]);
        p.data(OUT, 3, 5, &resp[3..20]);
        p.data(OUT, 3, 5, &resp[3..20]); // duplicate
        let ex = p.take_exchanges();
        assert_eq!(ex.len(), 1);
        assert_eq!(&ex[0].response.as_ref().unwrap().body.data[..], b"abcdef");
        assert_eq!(p.stream_stats(OUT).bytes_overlap, 17);
    }

    /// `cargo test --release throughput -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn throughput() {
        let body = "x".repeat(2000);
        let mut reqs = Vec::new();
        let mut resps = Vec::new();
        for i in 0..20_000 {
            reqs.push(format!("GET /item/{i} HTTP/1.1\r\nHost: example\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n").into_bytes());
            resps.push(ok(&body));
        }
        let total: usize = reqs.iter().chain(&resps).map(Vec::len).sum();
        let t = std::time::Instant::now();
        let mut c = Conn::server();
        let mut n = 0;
        for (q, r) in reqs.iter().zip(&resps) {
            c.send(IN, q);
            c.send_split(OUT, r, 1400);
            n += c.ex().len();
        }
        let dt = t.elapsed();
        assert_eq!(n, 20_000);
        eprintln!(
            "{} exchanges, {} MB in {:?}: {:.0} MB/s",
            n,
            total / 1_000_000,
            dt,
            total as f64 / dt.as_secs_f64() / 1e6
        );
    }

    #[test]
    fn data_after_close_is_counted() {
        let mut c = Conn::server();
        c.close();
        c.send(IN, &get("/late"));
        assert_eq!(c.reasons(), vec!["data_after_close"]);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        struct GenEx {
            method: &'static str,
            extra: Vec<(&'static str, String)>,
            req_body: Option<(Vec<u8>, bool)>,
            expect_continue: bool,
            status: u16,
            resp_plain: Vec<u8>,
            resp_chunked: bool,
            gzip: bool,
        }

        #[derive(Debug, Clone)]
        struct Scenario {
            exs: Vec<GenEx>,
            pipelined: bool,
            last_close_delimited: bool,
            cuts: Vec<usize>,
            chunk_sizes: Vec<usize>,
        }

        /// (direction, position, timestamp, bytes)
        type Event = (Dir, u64, u64, Vec<u8>);

        enum Feed {
            Data(Event),
            /// (direction, position, length, timestamp)
            Hole(Dir, u64, u64, u64),
        }

        fn alnum(max: usize) -> impl Strategy<Value = Vec<u8>> {
            proptest::collection::vec(
                prop_oneof![b'a'..=b'z', b'0'..=b'9', Just(b' '), Just(b'-')],
                0..max,
            )
        }

        fn gen_ex() -> impl Strategy<Value = GenEx> {
            (
                prop_oneof![
                    Just("GET"),
                    Just("POST"),
                    Just("PUT"),
                    Just("DELETE"),
                    Just("HEAD"),
                    Just("PATCH")
                ],
                proptest::collection::vec(
                    (
                        prop_oneof![
                            Just("Accept"),
                            Just("X-A"),
                            Just("User-Agent"),
                            Just("Cookie")
                        ],
                        "[a-z0-9=;/]{0,20}",
                    ),
                    0..3,
                ),
                proptest::option::of((alnum(60), any::<bool>())),
                any::<bool>(),
                prop_oneof![
                    Just(200u16),
                    Just(201),
                    Just(204),
                    Just(304),
                    Just(404),
                    Just(500)
                ],
                alnum(80),
                any::<bool>(),
                any::<bool>(),
            )
                .prop_map(
                    |(
                        method,
                        extra,
                        req_body,
                        expect_continue,
                        status,
                        resp_plain,
                        resp_chunked,
                        gzip,
                    )| {
                        let req_body = match method {
                            "POST" | "PUT" | "PATCH" => req_body,
                            _ => None,
                        };
                        GenEx {
                            method,
                            extra,
                            expect_continue: expect_continue && req_body.is_some(),
                            req_body,
                            status,
                            resp_plain,
                            resp_chunked,
                            gzip,
                        }
                    },
                )
        }

        fn scenario() -> impl Strategy<Value = Scenario> {
            (
                proptest::collection::vec(gen_ex(), 1..6),
                any::<bool>(),
                any::<bool>(),
                proptest::collection::vec(1usize..60, 1..8),
                proptest::collection::vec(1usize..20, 1..5),
            )
                .prop_map(
                    |(exs, pipelined, last_close_delimited, cuts, chunk_sizes)| Scenario {
                        exs,
                        pipelined,
                        last_close_delimited,
                        cuts,
                        chunk_sizes,
                    },
                )
        }

        fn chunked(body: &[u8], sizes: &[usize]) -> Vec<u8> {
            let mut out = Vec::new();
            let mut rest = body;
            let mut i = 0;
            while !rest.is_empty() {
                let n = sizes[i % sizes.len()].min(rest.len());
                i += 1;
                if i % 2 == 0 {
                    out.extend(format!("{n:x};ext=v\r\n").as_bytes());
                } else {
                    out.extend(format!("{n:X}\r\n").as_bytes());
                }
                out.extend(&rest[..n]);
                out.extend(b"\r\n");
                rest = &rest[n..];
            }
            out.extend(b"0\r\n");
            if i % 2 == 1 {
                out.extend(b"X-Checksum: abc\r\n");
            }
            out.extend(b"\r\n");
            out
        }

        fn no_resp_body(e: &GenEx) -> bool {
            e.method == "HEAD" || e.status == 204 || e.status == 304
        }

        fn resp_body_plain(id: usize, e: &GenEx) -> Vec<u8> {
            let mut b = format!("id={id};").into_bytes();
            b.extend(&e.resp_plain);
            b
        }

        /// Messages as (dir, bytes) in the order they are sent.
        fn messages(sc: &Scenario) -> Vec<(Dir, Vec<u8>)> {
            let n = sc.exs.len();
            let mut reqs = Vec::new();
            let mut resps = Vec::new();
            for (id, e) in sc.exs.iter().enumerate() {
                let mut head = format!("{} /item/{id}?n={id} HTTP/1.1\r\nHost: h\r\n", e.method);
                for (k, v) in &e.extra {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                let mut body = Vec::new();
                if let Some((b, is_chunked)) = &e.req_body {
                    if e.expect_continue {
                        head.push_str("Expect: 100-continue\r\n");
                    }
                    if *is_chunked {
                        head.push_str("Transfer-Encoding: chunked\r\n");
                        body = chunked(b, &sc.chunk_sizes);
                    } else {
                        head.push_str(&format!("Content-Length: {}\r\n", b.len()));
                        body = b.clone();
                    }
                }
                head.push_str("\r\n");
                let mut r = format!("HTTP/1.1 {} Whatever\r\nX-Req-Id: {id}\r\n", e.status);
                let plain = resp_body_plain(id, e);
                let wire = if e.gzip { gzip(&plain) } else { plain };
                if e.gzip {
                    r.push_str("Content-Encoding: gzip\r\n");
                }
                let close_delim = sc.last_close_delimited && id == n - 1 && !no_resp_body(e);
                let mut rbody = Vec::new();
                if close_delim {
                    rbody = wire;
                } else if e.resp_chunked && !no_resp_body(e) {
                    r.push_str("Transfer-Encoding: chunked\r\n");
                    rbody = chunked(&wire, &sc.chunk_sizes);
                } else {
                    r.push_str(&format!("Content-Length: {}\r\n", wire.len()));
                    if !no_resp_body(e) {
                        rbody = wire;
                    }
                }
                r.push_str("\r\n");
                let mut resp = r.into_bytes();
                resp.extend(rbody);
                reqs.push((head.into_bytes(), body, e.expect_continue));
                resps.push(resp);
            }
            let mut out = Vec::new();
            let group = if sc.pipelined { 3 } else { 1 };
            for start in (0..n).step_by(group) {
                let end = (start + group).min(n);
                for (head, body, expect) in &reqs[start..end] {
                    if *expect && !sc.pipelined {
                        out.push((IN, head.clone()));
                        out.push((OUT, b"HTTP/1.1 100 Continue\r\n\r\n".to_vec()));
                        out.push((IN, body.clone()));
                    } else {
                        let mut m = head.clone();
                        m.extend(body);
                        out.push((IN, m));
                    }
                }
                for r in &resps[start..end] {
                    out.push((OUT, r.clone()));
                }
            }
            out
        }

        /// Cut every message into events (one call each) with increasing timestamps.
        fn events(sc: &Scenario) -> Vec<Event> {
            let mut pos = [0u64; 2];
            let mut ts = 0u64;
            let mut out = Vec::new();
            let mut ci = 0;
            for (dir, m) in messages(sc) {
                let mut rest = &m[..];
                while !rest.is_empty() {
                    let n = sc.cuts[ci % sc.cuts.len()].min(rest.len());
                    ci += 1;
                    ts += 10;
                    out.push((dir, pos[dir.idx()], ts, rest[..n].to_vec()));
                    pos[dir.idx()] += n as u64;
                    rest = &rest[n..];
                }
            }
            out
        }

        fn run(evs: &[Event], limits: ParserLimits) -> (Vec<Exchange>, Vec<Anomaly>) {
            let mut p = ConnParser::new(Role::Server, false, limits);
            let mut ex = Vec::new();
            let mut last = 0;
            for (dir, pos, ts, b) in evs {
                p.data(*dir, *pos, *ts, b);
                ex.extend(p.take_exchanges());
                last = last.max(*ts);
            }
            p.close(last + 10);
            ex.extend(p.take_exchanges());
            (ex, p.take_anomalies())
        }

        /// Split event `i` at byte `k` (same direction, same timestamp).
        fn split_at(evs: &[Event], i: usize, k: usize) -> Vec<Event> {
            let mut out = evs.to_vec();
            let (d, pos, ts, b) = out.remove(i);
            out.insert(i, (d, pos + k as u64, ts, b[k..].to_vec()));
            out.insert(i, (d, pos, ts, b[..k].to_vec()));
            out
        }

        fn check_expected(sc: &Scenario, ex: &[Exchange]) -> Result<(), TestCaseError> {
            prop_assert_eq!(ex.len(), sc.exs.len());
            for (id, (e, g)) in ex.iter().zip(&sc.exs).enumerate() {
                prop_assert_eq!(e.request.method.as_str(), g.method);
                prop_assert_eq!(e.request.target.clone(), format!("/item/{id}?n={id}"));
                let want_req: &[u8] = g.req_body.as_ref().map_or(&[], |(b, _)| &b[..]);
                prop_assert_eq!(&e.request.body.data[..], want_req);
                let r = e.response.as_ref().expect("paired");
                prop_assert_eq!(r.status, g.status);
                let want_id = id.to_string();
                prop_assert_eq!(hv(&r.headers, "x-req-id"), Some(want_id.as_str()));
                if no_resp_body(g) {
                    prop_assert_eq!(r.body.wire_len, 0);
                } else {
                    prop_assert_eq!(&r.body.data[..], &resp_body_plain(id, g)[..]);
                }
                prop_assert_eq!(e.completeness, Completeness::Complete);
            }
            Ok(())
        }

        /// Every paired exchange pairs a request with its own response.
        fn check_sound(ex: &[Exchange]) -> Result<(), TestCaseError> {
            let mut seen = std::collections::HashSet::new();
            for e in ex {
                let id = e
                    .request
                    .target
                    .strip_prefix("/item/")
                    .and_then(|t| t.split('?').next())
                    .map(str::to_string);
                prop_assert!(id.is_some(), "unexpected target {}", e.request.target);
                prop_assert!(
                    seen.insert(e.request.target.clone()),
                    "request emitted twice"
                );
                if let Some(r) = &e.response {
                    prop_assert_eq!(
                        hv(&r.headers, "x-req-id").map(str::to_string),
                        id.clone(),
                        "mispaired: {:?}",
                        e
                    );
                    let body = &r.body.data[..];
                    if r.body.loss.is_none() && !body.is_empty() {
                        let want = format!("id={};", id.unwrap_or_default());
                        // A close-delimited body may end early without anyone knowing (bytes
                        // lost at the very end of a stream are never announced).
                        let want = want.as_bytes();
                        prop_assert!(
                            body.starts_with(want) || want.starts_with(body),
                            "body of another response"
                        );
                    }
                }
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

            /// Any split of the input gives the same exchanges as the whole.
            #[test]
            fn splits_do_not_matter(sc in scenario(), seeds in proptest::collection::vec(any::<u64>(), 8)) {
                let evs = events(&sc);
                let (whole, anomalies) = run(&evs, ParserLimits::default());
                prop_assert!(anomalies.is_empty(), "{:?}", anomalies);
                check_expected(&sc, &whole)?;

                // Every byte its own call.
                let bytewise: Vec<Event> = evs
                    .iter()
                    .flat_map(|(d, pos, ts, b)| {
                        b.iter().enumerate().map(move |(k, &x)| (*d, pos + k as u64, *ts, vec![x]))
                    })
                    .collect();
                prop_assert_eq!(&run(&bytewise, ParserLimits::default()).0, &whole);

                let total: usize = evs.iter().map(|e| e.3.len()).sum();
                if total <= 700 {
                    // Every single boundary.
                    for i in 0..evs.len() {
                        for k in 1..evs[i].3.len() {
                            let (ex, _) = run(&split_at(&evs, i, k), ParserLimits::default());
                            prop_assert_eq!(&ex, &whole, "split event {} at {}", i, k);
                        }
                    }
                } else {
                    let mut cur = evs.clone();
                    for s in seeds {
                        let i = (s as usize) % cur.len();
                        let len = cur[i].3.len();
                        if len > 1 {
                            cur = split_at(&cur, i, 1 + (s >> 32) as usize % (len - 1));
                        }
                    }
                    prop_assert_eq!(&run(&cur, ParserLimits::default()).0, &whole);
                }
            }

            /// Chunks delivered out of order (within the reassembly limits) give the same
            /// exchanges.
            #[test]
            fn reordering_does_not_matter(sc in scenario(), jitter in proptest::collection::vec(0usize..6, 64)) {
                let evs = events(&sc);
                let (whole, _) = run(&evs, ParserLimits::default());
                let mut keyed: Vec<(i64, Event)> = evs
                    .iter()
                    .enumerate()
                    .map(|(i, e)| {
                        // The first chunk of each direction stays first: a stream starts at the
                        // first position it sees.
                        let k = if e.1 == 0 { -1 } else { (i + jitter[i % jitter.len()]) as i64 };
                        (k, e.clone())
                    })
                    .collect();
                keyed.sort_by_key(|(k, _)| *k);
                let shuffled: Vec<Event> = keyed.into_iter().map(|(_, e)| e).collect();
                prop_assert_eq!(&run(&shuffled, ParserLimits::default()).0, &whole);
            }

            /// Losing chunks (unannounced, or as known holes, in either direction, at one or
            /// more places) never pairs a request with another request's response, and never
            /// panics.
            #[test]
            fn gaps_never_mispair(
                sc in scenario(),
                drops in proptest::collection::vec((any::<usize>(), 1usize..4, any::<bool>()), 1..3),
                ends_known in any::<bool>(),
                max_segs in prop_oneof![Just(1usize), Just(2), Just(256)],
                jitter in proptest::collection::vec(0usize..3, 16),
            ) {
                let evs = events(&sc);
                // index -> known hole (true) or unannounced loss (false)
                let mut dropped: std::collections::HashMap<usize, bool> = Default::default();
                for (at, len, known) in drops {
                    let i = at % evs.len();
                    let dir = evs[i].0;
                    for j in (i..evs.len()).filter(|&j| evs[j].0 == dir).take(len) {
                        dropped.insert(j, known);
                    }
                }
                let limits = ParserLimits {
                    stream: StreamLimits { max_pending_bytes: 1 << 20, max_pending_segments: max_segs },
                    ..ParserLimits::default()
                };
                let mut feed: Vec<(usize, Feed)> = Vec::new();
                for (j, e) in evs.iter().enumerate() {
                    let key = j * 4 + jitter[j % jitter.len()];
                    match dropped.get(&j) {
                        None => feed.push((key, Feed::Data(e.clone()))),
                        Some(true) => feed.push((key, Feed::Hole(e.0, e.1, e.3.len() as u64, e.2))),
                        Some(false) => {}
                    }
                }
                feed.sort_by_key(|(k, _)| *k);
                let dbg = std::env::var("HTTP_DEBUG").is_ok();
                let mut p = ConnParser::new(Role::Server, false, limits);
                let mut ex = Vec::new();
                let mut last = 0;
                for (_, f) in feed {
                    match f {
                        Feed::Data((d, pos, ts, b)) => {
                            if dbg {
                                eprintln!("DATA {d:?} pos={pos} ts={ts} {:?}", String::from_utf8_lossy(&b));
                            }
                            p.data(d, pos, ts, &b);
                            last = last.max(ts);
                        }
                        Feed::Hole(d, pos, len, ts) => {
                            if dbg {
                                eprintln!("HOLE {d:?} pos={pos} len={len} ts={ts}");
                            }
                            p.hole(d, pos, len, ts);
                        }
                    }
                    ex.extend(p.take_exchanges());
                }
                if ends_known {
                    let end = |d: Dir| {
                        evs.iter().filter(|e| e.0 == d).map(|e| e.1 + e.3.len() as u64).max().unwrap_or(0)
                    };
                    p.close_at(last + 10, end(IN), end(OUT));
                } else {
                    p.close(last + 10);
                }
                ex.extend(p.take_exchanges());
                if dbg {
                    eprintln!("ANOMALIES {:?}", p.take_anomalies());
                    for e in &ex {
                        let r = e.response.as_ref().map(|r| (r.status, hv(&r.headers, "x-req-id").map(str::to_string), r.first_ns));
                        eprintln!("EX {} -> {:?} {:?}", e.request.target, r, e.completeness);
                    }
                }
                check_sound(&ex)?;
            }

            /// Arbitrary bytes never panic and never produce unbounded output.
            #[test]
            fn garbage_never_panics(
                chunks in proptest::collection::vec((any::<bool>(), proptest::collection::vec(any::<u8>(), 0..200), 0u64..50), 0..20),
                role in prop_oneof![Just(Role::Server), Just(Role::Client), Just(Role::Unknown)],
                midstream in any::<bool>(),
            ) {
                let limits = ParserLimits { max_header_bytes: 512, ..ParserLimits::default() };
                let mut p = ConnParser::new(role, midstream, limits);
                let mut pos = [0u64; 2];
                for (k, (inbound, b, skip)) in chunks.iter().enumerate() {
                    let d = if *inbound { IN } else { OUT };
                    pos[d.idx()] += skip;
                    if *skip == 7 {
                        p.hole(d, pos[d.idx()], 5, k as u64);
                        pos[d.idx()] += 5;
                    }
                    p.data(d, pos[d.idx()], k as u64, b);
                    pos[d.idx()] += b.len() as u64;
                }
                p.close(1000);
                let _ = p.take_exchanges();
                let _ = p.take_anomalies();
            }
        }
    }
}
