//! Reading a request head as the servers the agent guards read it. A crafted request that nginx
//! or Apache answers must still become a record with the method, path and status the server
//! acted on, so the request side does not use httparse (which refuses `GET  /x HTTP/1.1` and
//! drops a whole header line for one control byte): this small parser accepts what the servers
//! accept, keeps every header line in order, sets apart the lines the server ignores, and
//! names every form the servers disagree on as an [`Oddity`] (counted, and carried by the
//! record). Responses come from the server itself and keep httparse.
//!
//! # What the servers accept
//!
//! Read from the sources: nginx 1.22.1 (`src/http/ngx_http_parse.c`: request line, header
//! line, chunked; `ngx_http_request.c`: header handlers, `ngx_http_process_request_header`),
//! defaults `ignore_invalid_headers on`, `underscores_in_headers off`; Apache httpd 2.4.62
//! (`server/protocol.c`: `ap_parse_request_line`, `ap_get_mime_headers_core`, `ap_read_request`;
//! `modules/http/http_filters.c`), default `HttpProtocolOptions Strict LenientMethods
//! Allow0.9`, `MergeTrailers off`. Debian 12 ships nginx 1.22.1 and Apache 2.4.6x.
//!
//! | form | nginx 1.22 | Apache 2.4 (Strict) | agent (nginx's view) and oddity |
//! |---|---|---|---|
//! | several SP in the request line | accepts | 400 | accepts; `request_line_whitespace` |
//! | HT in the request line | 400 | 400 | accepts; `request_line_whitespace` |
//! | leading whitespace before the method | 400 | 400 | accepts; `request_line_whitespace` |
//! | method not `[A-Z_-]+` (`get`) | 400 | any token (501 later) | as sent; `method_not_uppercase` |
//! | absolute-form `GET http://h/p HTTP/1.1` | path `/p`, host from the URI | same | path `/p` (`routes::normalize_target`) |
//! | `HTTP/1.0` | accepts | accepts | `minor_version` 0 |
//! | `HTTP/0.9` (`GET /p`, no version) | GET only, no headers, then close | GET only (Strict) | head ends at the line; `http09_request` |
//! | version not `HTTP/1.x` | 400 (505 for 2+) | 400 | taken as 1.1; `bad_version` |
//! | control byte in the target | 400 | 400 | accepts; `control_byte_in_target` |
//! | bare LF line ends | accepts | 400 | accepts; `bare_lf` |
//! | header-name case | insensitive | insensitive | insensitive |
//! | control byte in a header value | accepts (NUL: 400) | 400 | kept in the value; `control_byte_in_header` |
//! | name with `_` or other non-`[A-Za-z0-9-]` | ignores the line | `_` and tokens kept, others 400 | set apart, not for attribution; `ignored_header` |
//! | control byte or space in a name (`Name : v`) | 400 | 400 | set apart; `invalid_header_name` |
//! | line without `:` | header with empty value | 400 | header, empty value; `header_without_colon` |
//! | obs-fold (line starting with SP/HT) | 400 | joined with SP | joined with SP; `obs_fold` |
//! | duplicate Host, Authorization, Content-Length, Transfer-Encoding, If-*, Expect, Content-Range | 400 | merged with `, ` | all kept; `duplicate_header` |
//! | other duplicate headers | kept | merged with `, ` | all kept |
//! | several `Cookie` lines | kept, `$http_cookie` joins with `; ` | merged with `, ` | all kept; `several_cookie_headers` |
//! | Transfer-Encoding and Content-Length | 400, close | TE wins, CL dropped, close | rest of the connection is body; `conflicting_framing` |
//! | two Content-Length (even equal) | 400, close | merged, invalid, 400, close | rest is body; `conflicting_framing` |
//! | TE other than exactly `chunked` (`gzip, chunked`, `\tchunked`) | 501, close | chunked last: accepts; else 400, close | rest is body; `bad_transfer_encoding` |
//! | TE in HTTP/1.0 | 400, close | accepts, close | rest is body; `bad_transfer_encoding` |
//! | invalid Content-Length | 400, close | 400, close | rest is body; `bad_content_length` |
//! | chunk extensions (`;x`, SP, HT then anything) | accepted, ignored | `;ext` accepted | accepted, ignored |
//! | trailers | read and dropped | kept apart (`trailers_in`) | kept apart in `WireNotes::trailers`; requests: `request_trailers` |
//! | a line that is not a request line (`HELLO`, `GET` alone, binary, `/p HTTP/1.1`, a method with `(`) | 400, close | 400 (source, not run here) | recorded with the answer, method and target empty; rest is body; `malformed_request_line` |
//! | a header line over the buffer (nginx `large_client_header_buffers` 4 8k; Apache `LimitRequestFieldSize` 8190) | 400, close, the rest of the head unread | 400 (source, not run here) | recorded at the close with the line and the complete header lines read, paired with the answer; `request_head_cut` |
//! | a request line over the buffer | 414, close | 414, close | as above: the method and the target as far as read; `request_head_cut` |
//! | a head over the agent's `max_header_bytes` (64 KiB, above both servers' limits) | 400, close | 400 | recorded with what fits; rest is body; `header_too_large` |
//!
//! Where the servers differ the agent takes nginx's view (the edge in the deployments this
//! agent is built for) and the oddity says the request was ambiguous. A per-target flavour
//! (Apache's view for an Apache edge) would be the next step; it is not built.
//!
//! "Rest of the connection is body": when the edge refuses a request's framing or head it
//! answers and closes (both servers turn keep-alive off on a 400), so nothing after that head
//! is a request the server acts on (checked against nginx 1.22.1: `BAD\x01LINE` followed by a
//! valid request gets one 400 and the close). Taking those bytes as
//! body means a request smuggled behind a conflicting framing never becomes a record of a call
//! that was not made, while the refused request itself is recorded with the edge's answer.

use crate::exchange::Header;

/// A request form that the guarded servers treat differently, or that one of them refuses.
/// Each has a stable reason name, counted in `http_anomalies_total` and written into the
/// record's `sparbar.anomalies`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Oddity {
    RequestLineWhitespace,
    MethodNotUppercase,
    Http09Request,
    BadVersion,
    ControlByteInTarget,
    NonUtf8Target,
    BareLf,
    ControlByteInHeader,
    IgnoredHeader,
    InvalidHeaderName,
    HeaderWithoutColon,
    ObsFold,
    DuplicateHeader,
    SeveralCookieHeaders,
}

impl Oddity {
    pub fn reason(self) -> &'static str {
        match self {
            Oddity::RequestLineWhitespace => "request_line_whitespace",
            Oddity::MethodNotUppercase => "method_not_uppercase",
            Oddity::Http09Request => "http09_request",
            Oddity::BadVersion => "bad_version",
            Oddity::ControlByteInTarget => "control_byte_in_target",
            Oddity::NonUtf8Target => "non_utf8_target",
            Oddity::BareLf => "bare_lf",
            Oddity::ControlByteInHeader => "control_byte_in_header",
            Oddity::IgnoredHeader => "ignored_header",
            Oddity::InvalidHeaderName => "invalid_header_name",
            Oddity::HeaderWithoutColon => "header_without_colon",
            Oddity::ObsFold => "obs_fold",
            Oddity::DuplicateHeader => "duplicate_header",
            Oddity::SeveralCookieHeaders => "several_cookie_headers",
        }
    }
}

/// Headers nginx 1.22 holds once (`ngx_http_process_unique_header_line`, `process_host`): a
/// second one is answered with 400. Apache merges them with `, `.
const UNIQUE: [&str; 11] = [
    "host",
    "if-modified-since",
    "if-unmodified-since",
    "if-match",
    "if-none-match",
    "content-length",
    "content-range",
    "if-range",
    "transfer-encoding",
    "expect",
    "authorization",
];

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A request line as nginx reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ReqLine {
    pub(super) method: String,
    pub(super) target: String,
    pub(super) minor: u8,
    /// No version: an HTTP/0.9 simple request, whose head is this line alone.
    pub(super) http09: bool,
    pub(super) oddities: Vec<Oddity>,
}

fn push(v: &mut Vec<Oddity>, o: Oddity) {
    if !v.contains(&o) {
        v.push(o);
    }
}

/// Reads one request line (ending in `\n`). `None` when it is not a request line at all: no
/// method token followed by whitespace and a target. With `need_version`, a line without an
/// `HTTP/1.x` version is refused too (used where a line could be anything, e.g. to tell the
/// role of a connection).
pub(super) fn parse_request_line(line: &[u8], need_version: bool) -> Option<ReqLine> {
    let mut odd = Vec::new();
    let body = line.strip_suffix(b"\n")?;
    let body = match body.strip_suffix(b"\r") {
        Some(b) => b,
        None => {
            push(&mut odd, Oddity::BareLf);
            body
        }
    };
    let is_ws = |b: &u8| *b == b' ' || *b == b'\t';
    if body.first().is_some_and(is_ws) {
        push(&mut odd, Oddity::RequestLineWhitespace);
    }
    let fields: Vec<&[u8]> = body.split(|b| is_ws(b)).filter(|f| !f.is_empty()).collect();
    if fields.len() < 2 {
        return None;
    }
    // Exactly one SP between fields and none at the ends is the only form both servers take.
    let canonical_len = fields.iter().map(|f| f.len()).sum::<usize>() + fields.len() - 1;
    if body.len() != canonical_len || body.contains(&b'\t') {
        push(&mut odd, Oddity::RequestLineWhitespace);
    }
    let (method, target, version) = match fields.as_slice() {
        [m, t] => (*m, *t, None),
        [m, t, v] => (*m, *t, Some(*v)),
        [m, t, .., v] => {
            // `GET /a b HTTP/1.1`: both servers answer 400; the request is still recorded.
            push(&mut odd, Oddity::RequestLineWhitespace);
            (*m, *t, Some(*v))
        }
        _ => return None,
    };
    if !method.iter().all(|&b| is_tchar(b)) {
        return None;
    }
    if !method
        .iter()
        .all(|&b| b.is_ascii_uppercase() || b == b'_' || b == b'-')
    {
        push(&mut odd, Oddity::MethodNotUppercase);
    }
    if target.iter().any(|&b| b < 0x20 || b == 0x7f) {
        push(&mut odd, Oddity::ControlByteInTarget);
    }
    let (minor, http09) = match version {
        None if need_version => return None,
        None => {
            push(&mut odd, Oddity::Http09Request);
            (0, true)
        }
        Some(v) => match parse_version(v) {
            Some(minor) => (minor, false),
            None if need_version => return None,
            None => {
                push(&mut odd, Oddity::BadVersion);
                (1, false)
            }
        },
    };
    let target = match std::str::from_utf8(target) {
        Ok(t) => t.to_string(),
        Err(_) => {
            push(&mut odd, Oddity::NonUtf8Target);
            String::from_utf8_lossy(target).into_owned()
        }
    };
    Some(ReqLine {
        // A token is ASCII.
        method: String::from_utf8_lossy(method).into_owned(),
        target,
        minor,
        http09,
        oddities: odd,
    })
}

/// `HTTP/1.<digits>` as nginx takes it: the minor version, 0 for 1.0 and 1 for anything later.
fn parse_version(v: &[u8]) -> Option<u8> {
    let minor = v.strip_prefix(b"HTTP/1.")?;
    if minor.is_empty() || minor.len() > 3 || !minor.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(u8::from(minor.iter().any(|&b| b != b'0')))
}

/// The header lines of a head or a trailer section, as nginx reads them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Fields {
    /// Lines the server acts on, in order.
    pub(super) headers: Vec<Header>,
    /// Lines the server ignores or cannot read as a header.
    pub(super) ignored: Vec<Header>,
    pub(super) oddities: Vec<Oddity>,
}

enum Slot {
    Kept,
    Ignored,
}

/// Reads header lines from `block` (each ending in `\n`; the empty line that ends the section
/// may be there or not). Never fails: a line nginx would refuse is set apart and named.
pub(super) fn parse_fields(block: &[u8]) -> Fields {
    let mut f = Fields::default();
    let mut last: Option<Slot> = None;
    for raw in block.split_inclusive(|&b| b == b'\n') {
        let Some(line) = raw.strip_suffix(b"\n") else {
            continue; // no line end: not part of a complete section
        };
        let line = match line.strip_suffix(b"\r") {
            Some(l) => l,
            None => {
                push(&mut f.oddities, Oddity::BareLf);
                line
            }
        };
        if line.is_empty() {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            // obs-fold: nginx refuses it, Apache joins it to the line before with one SP.
            push(&mut f.oddities, Oddity::ObsFold);
            let more = line.trim_ascii();
            let prev = match last {
                Some(Slot::Kept) => f.headers.last_mut(),
                Some(Slot::Ignored) => f.ignored.last_mut(),
                None => None,
            };
            match prev {
                Some(h) => {
                    h.value.push(b' ');
                    h.value.extend_from_slice(more);
                }
                None => f.ignored.push(Header {
                    name: String::new(),
                    value: more.to_vec(),
                }),
            }
            continue;
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => {
                push(&mut f.oddities, Oddity::HeaderWithoutColon);
                (line, &line[line.len()..])
            }
        };
        let value = read_value(value, &mut f.oddities);
        let slot = if name.is_empty() || name.iter().any(|&b| b <= 0x20 || b == 0x7f) {
            push(&mut f.oddities, Oddity::InvalidHeaderName);
            Slot::Ignored
        } else if name.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'-') {
            Slot::Kept
        } else {
            push(&mut f.oddities, Oddity::IgnoredHeader);
            Slot::Ignored
        };
        let h = Header {
            name: String::from_utf8_lossy(name).into_owned(),
            value,
        };
        match slot {
            Slot::Kept => f.headers.push(h),
            Slot::Ignored => f.ignored.push(h),
        }
        last = Some(slot);
    }
    for (i, h) in f.headers.iter().enumerate() {
        let lower = h.name.to_ascii_lowercase();
        let again = f.headers[..i]
            .iter()
            .any(|p| p.name.eq_ignore_ascii_case(&h.name));
        // Two Content-Length or Transfer-Encoding lines are `conflicting_framing` instead.
        let framing = lower == "content-length" || lower == "transfer-encoding";
        if again && !framing && UNIQUE.contains(&lower.as_str()) {
            push(&mut f.oddities, Oddity::DuplicateHeader);
        }
        if again && lower == "cookie" {
            push(&mut f.oddities, Oddity::SeveralCookieHeaders);
        }
    }
    f
}

/// A header value as nginx stores it: leading SP skipped, ended by the first CR, trailing SP
/// trimmed (HT is kept at both ends, as nginx does).
fn read_value(v: &[u8], odd: &mut Vec<Oddity>) -> Vec<u8> {
    let start = v.iter().position(|&b| b != b' ').unwrap_or(v.len());
    let v = &v[start..];
    let (v, after_cr) = match v.iter().position(|&b| b == b'\r') {
        Some(i) => (&v[..i], &v[i..]),
        None => (v, &v[v.len()..]),
    };
    if after_cr.iter().any(|&b| b != b'\r')
        || v.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f)
    {
        push(odd, Oddity::ControlByteInHeader);
    }
    let end = v.iter().rposition(|&b| b != b' ').map_or(0, |i| i + 1);
    v[..end].to_vec()
}

/// How a request's body is framed, decided as the edge (nginx) decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReqFraming {
    None,
    Length(u64),
    Chunked,
    /// The edge refuses the framing, answers and closes: the rest of the connection is body.
    Refused(Refusal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// Transfer-Encoding with Content-Length, or either of them twice.
    Conflicting,
    /// Transfer-Encoding other than exactly `chunked`, or in an HTTP/1.0 request.
    BadTransferEncoding,
    /// Content-Length that is not a number.
    BadContentLength,
}

/// The framing of a request body from its headers (`headers` only: ignored lines do not count,
/// as they do not for the server).
pub(super) fn request_framing(headers: &[Header], minor: u8) -> ReqFraming {
    let named = |n: &'static str| -> Vec<&Header> {
        headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(n))
            .collect()
    };
    let te = named("transfer-encoding");
    let cl = named("content-length");
    if !te.is_empty() {
        if !cl.is_empty() || te.len() > 1 {
            return ReqFraming::Refused(Refusal::Conflicting);
        }
        if minor == 0 || !te[0].value.eq_ignore_ascii_case(b"chunked") {
            return ReqFraming::Refused(Refusal::BadTransferEncoding);
        }
        return ReqFraming::Chunked;
    }
    match cl.as_slice() {
        [] => ReqFraming::None,
        [one] => match parse_length(&one.value) {
            Some(0) => ReqFraming::None,
            Some(n) => ReqFraming::Length(n),
            None => ReqFraming::Refused(Refusal::BadContentLength),
        },
        _ => ReqFraming::Refused(Refusal::Conflicting),
    }
}

/// Digits only, as `ngx_atoof` reads them (no sign, no space, no overflow).
fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}
