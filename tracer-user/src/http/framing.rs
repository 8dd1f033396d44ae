//! Reading the shape of HTTP/1.1 messages from bytes: which start line a line is, where a head
//! ends, the parsed response head, and the headers that decide a body's framing
//! (Content-Length, Transfer-Encoding, chunk sizes) and its content coding. Request heads and
//! request framing are read as the guarded servers read them, in `leniency` (with the table of
//! what nginx and Apache accept).

use crate::exchange::{header, Header};

use super::types::Kind;

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

pub(super) fn first_byte_ok(kind: Kind, b: u8) -> bool {
    match kind {
        Kind::Response => b == b'H',
        Kind::Request | Kind::Unknown => is_tchar(b),
    }
}

/// Could `buf` still become a start line of `kind`? Cheap check on the first bytes.
pub(super) fn prefix_ok(kind: Kind, buf: &[u8]) -> bool {
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

pub(super) fn has_standard_method(line: &[u8]) -> bool {
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
pub(super) fn classify_line(kind: Kind, line: &[u8]) -> Option<Kind> {
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
pub(super) fn find_head_end(buf: &[u8], from: usize) -> Result<usize, usize> {
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
        .ignore_invalid_headers_in_responses(true);
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

pub(super) struct ParsedHead {
    pub(super) start: Start,
    pub(super) minor: u8,
    pub(super) headers: Vec<Header>,
}

/// Parses a response head (status line and headers) with httparse. Request heads are read by
/// `leniency`, as the guarded servers read them.
pub(super) fn parse_head(kind: Kind, buf: &[u8]) -> Option<ParsedHead> {
    if kind != Kind::Response {
        return None;
    }
    let mut slots = header_slots(buf);
    let mut resp = httparse::Response::new(&mut slots);
    match parser_config().parse_response(&mut resp, buf) {
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

/// All values of header `name`, split on commas, trimmed.
fn header_tokens<'a>(headers: &'a [Header], name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .map(|t| t.trim_ascii())
}

pub(super) enum LengthHeader {
    Absent,
    Valid(u64),
    Invalid,
}

pub(super) fn content_length(headers: &[Header]) -> LengthHeader {
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

pub(super) enum TeHeader {
    Absent,
    Chunked,
    Other,
}

pub(super) fn transfer_encoding(headers: &[Header]) -> TeHeader {
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
pub(super) enum Encoding {
    Gzip,
    Deflate,
    Brotli,
}

impl Encoding {
    pub(super) fn name(self) -> &'static str {
        match self {
            Encoding::Gzip => "gzip",
            Encoding::Deflate => "deflate",
            Encoding::Brotli => "br",
        }
    }
}

pub(super) fn content_encoding(headers: &[Header]) -> Option<Encoding> {
    let mut toks = header_tokens(headers, "content-encoding").filter(|t| !t.is_empty());
    let first = toks.next()?;
    if toks.next().is_some() {
        return None; // stacked codings are kept as they are
    }
    if first.eq_ignore_ascii_case(b"gzip") || first.eq_ignore_ascii_case(b"x-gzip") {
        Some(Encoding::Gzip)
    } else if first.eq_ignore_ascii_case(b"deflate") {
        Some(Encoding::Deflate)
    } else if first.eq_ignore_ascii_case(b"br") {
        Some(Encoding::Brotli)
    } else {
        None
    }
}

/// Parse a chunk-size line (ending in `\n`): hex size, then optionally an extension started by
/// `;`, SP or HT (as nginx reads it). `None` if malformed or the size does not fit in u64.
pub(super) fn parse_chunk_size(line: &[u8]) -> Option<u64> {
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
    // nginx: after the size, `;`, SP or HT starts an extension that runs to the line end.
    let rest = &line[digits..];
    (rest.is_empty() || matches!(rest[0], b';' | b' ' | b'\t')).then_some(n)
}

/// A parsed start line: a request line or a status line.
pub(super) enum Start {
    Req { method: String, target: String },
    Resp { status: u16, reason: String },
}

/// How the body of a message in progress ends, and where its reading stands.
pub(super) enum Framing {
    Length(u64),
    Chunked(Chunk),
    Close,
}

pub(super) enum Chunk {
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
