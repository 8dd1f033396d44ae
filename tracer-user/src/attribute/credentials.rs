//! Reading credentials and identities off the wire as the server does: cookies (request and
//! `Set-Cookie`), bearer tokens, JWT claims, login form fields, and the client address a
//! trusted proxy forwards. Pure functions over headers and bodies; `attribution` decides what
//! they mean.

use std::{
    net::IpAddr,
    time::{SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use serde_json::Value;

use crate::{
    attribute::jsonpath::JsonPath,
    config::{Cidr, ClientIpHeader},
    exchange::{header, Header},
};

/// A credential as read off one header or cookie crumb: its value, or `Err` when the agent
/// cannot tell what the server makes of it (bytes outside the grammar that frameworks strip,
/// keep or refuse differently).
pub(super) type Read = Result<String, ()>;

/// SP and HTAB at both ends, as every HTTP parser trims header values and cookie crumbs.
fn trim_ows(mut b: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = b {
        b = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = b {
        b = rest;
    }
    b
}

/// Every ASCII control byte, space and DEL at both ends (what the most lenient framework would
/// strip: Python's `str.strip()` also strips `\x0b`, `\x0c` and `\x1c`..`\x1f`).
fn trim_all(mut b: &[u8]) -> &[u8] {
    let junk = |c: &u8| *c <= b' ' || *c == 0x7f;
    while b.first().is_some_and(junk) {
        b = &b[1..];
    }
    while b.last().is_some_and(junk) {
        b = &b[..b.len() - 1];
    }
    b
}

/// RFC 6750 `token68`: `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
fn is_token68(b: &[u8]) -> bool {
    let body = b.iter().rposition(|c| *c != b'=').map_or(0, |i| i + 1);
    body > 0
        && b[..body]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-._~+/".contains(c))
}

/// RFC 6265 `cookie-octet`: visible ASCII except DQUOTE, comma, semicolon and backslash.
fn is_cookie_octet(c: u8) -> bool {
    matches!(c, 0x21 | 0x23..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E)
}

/// The bearer credential of one `Authorization` value: `None` when it is not `Bearer` at all
/// (another scheme, or `Bearer` with no token), `Some(Err)` when it is `Bearer` but the agent
/// cannot read the token the way every server would.
///
/// The scheme is matched in any case. The token follows one or more SP and must be `token68`
/// once SP/HTAB are trimmed: a tab or a control byte after `Bearer`, or inside or at the end of
/// the token (`tok\x1f`, which Python's `strip()` drops and others keep), is unreadable.
pub(super) fn bearer_token(v: &[u8]) -> Option<Read> {
    let t = trim_ows(v);
    let scheme = |b: &[u8]| b.len() >= 6 && b[..6].eq_ignore_ascii_case(b"bearer");
    if !scheme(t) {
        // Control bytes before the scheme: some servers strip them and read a bearer token.
        return scheme(trim_all(v)).then_some(Err(()));
    }
    match t.get(6) {
        None => None,
        Some(b' ') => {
            let tok = trim_ows(&t[7..]);
            if tok.is_empty() {
                None
            } else if is_token68(tok) {
                Some(Ok(String::from_utf8_lossy(tok).into_owned()))
            } else {
                Some(Err(()))
            }
        }
        // `Bearerish`: another scheme.
        Some(c) if c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(c) => None,
        Some(_) => Some(Err(())),
    }
}

/// The value of cookie `name` in the request's `Cookie` headers (quotes removed): the first
/// readable crumb (see [`cookie_crumbs`]).
pub fn request_cookie(headers: &[Header], name: &str) -> Option<String> {
    cookie_crumbs(headers, name)
        .into_iter()
        .find_map(Result::ok)
}

/// Every crumb of cookie `name`, in order, across all `Cookie` headers (nginx 1.22 passes
/// several through as they came; frameworks join them).
///
/// Read as the lenient frameworks do: each header is split on `;`, each crumb trimmed of SP and
/// HTAB and split at its first `=`; the name must match exactly (case-sensitive, as in every
/// framework). Bytes in *other* crumbs do not matter (`x=\x01; sid=…` still yields `sid`: the
/// split-on-`;` frameworks, the demo platform among them, find it). A crumb is `Err` when the
/// agent cannot tell what the server reads: its value (without one pair of DQUOTEs) has bytes
/// outside RFC 6265 `cookie-octet` (control bytes, spaces, non-ASCII), or its name matches only
/// after trimming spaces or control bytes around it (`sid =x`: Django reads it, the demo
/// platform and Go do not). Crumbs with an empty value are no session and are left out.
pub(super) fn cookie_crumbs(headers: &[Header], name: &str) -> Vec<Read> {
    let name = name.as_bytes();
    let mut out = Vec::new();
    for h in headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("cookie"))
    {
        for crumb in h.value.split(|b| *b == b';') {
            let crumb = trim_ows(crumb);
            let Some(eq) = crumb.iter().position(|b| *b == b'=') else {
                continue;
            };
            let (k, v) = (&crumb[..eq], &crumb[eq + 1..]);
            if k == name {
                let v = v
                    .strip_prefix(b"\"")
                    .and_then(|s| s.strip_suffix(b"\""))
                    .unwrap_or(v);
                if v.is_empty() {
                    continue;
                }
                out.push(if v.iter().all(|c| is_cookie_octet(*c)) {
                    Ok(String::from_utf8_lossy(v).into_owned())
                } else {
                    Err(())
                });
            } else if trim_all(k) == name {
                out.push(Err(()));
            }
        }
    }
    out
}

/// Every value of session header `name`, in order: `Err` unless it is visible ASCII once SP
/// and HTAB are trimmed.
pub(super) fn session_header_values(headers: &[Header], name: &str) -> Vec<Read> {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(name))
        .filter_map(|h| {
            let v = trim_ows(&h.value);
            if v.is_empty() {
                None
            } else if v.iter().all(|c| (0x21..=0x7e).contains(c)) {
                Some(Ok(String::from_utf8_lossy(v).into_owned()))
            } else {
                Some(Err(()))
            }
        })
        .collect()
}

/// One `Set-Cookie` for a given cookie name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetCookie {
    /// The raw credential: it never leaves the attribution step.
    pub(super) value: String,
    max_age: Option<i64>,
    expires: Option<u64>,
    /// The cookie is deleted (empty value, `Max-Age<=0` or an expiry in the past).
    pub cleared: bool,
}

impl SetCookie {
    pub(super) fn expires(&self, now: u64) -> Option<u64> {
        match self.max_age {
            Some(m) => Some(now.saturating_add(m.max(0) as u64)),
            None => self.expires,
        }
    }
}

/// Every `Set-Cookie` of the response for cookie `name`.
pub fn set_cookies(headers: &[Header], name: &str) -> Vec<SetCookie> {
    let now = now_unix();
    let mut out = Vec::new();
    for h in headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("set-cookie"))
    {
        let Some(v) = h.value_str() else { continue };
        let mut parts = v.split(';');
        let Some((k, val)) = parts.next().and_then(|p| p.split_once('=')) else {
            continue;
        };
        if k.trim() != name {
            continue;
        }
        let val = val.trim();
        let val = val
            .strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            .unwrap_or(val)
            .to_string();
        let mut sc = SetCookie {
            value: val,
            max_age: None,
            expires: None,
            cleared: false,
        };
        for attr in parts {
            let (an, av) = attr.split_once('=').unwrap_or((attr, ""));
            let an = an.trim();
            if an.eq_ignore_ascii_case("max-age") {
                sc.max_age = av.trim().parse().ok();
            } else if an.eq_ignore_ascii_case("expires") {
                sc.expires = httpdate::parse_http_date(av.trim())
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_secs());
            }
        }
        sc.cleared = sc.value.is_empty()
            || sc.max_age.is_some_and(|m| m <= 0)
            || (sc.max_age.is_none() && sc.expires.is_some_and(|e| e <= now));
        out.push(sc);
    }
    out
}

/// The claims of a JWT (`header.claims.signature`, base64url), unverified.
pub(super) fn jwt_claims(token: &str) -> Option<serde_json::Map<String, Value>> {
    let mut it = token.split('.');
    let (_h, c, _s) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() || c.len() > 16 * 1024 {
        return None;
    }
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(c.trim_end_matches('='))
        .ok()?;
    match serde_json::from_slice::<Value>(&raw).ok()? {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

/// The user name in a login request: a form field, or a JSON path into a JSON body.
pub(super) fn login_username(req: &crate::exchange::Request, field: &str) -> Option<String> {
    let body = &req.body.data;
    let ctype = header(&req.headers, "content-type")
        .and_then(|h| h.value_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let v = if ctype.contains("json") || body.first() == Some(&b'{') {
        let v: Value = serde_json::from_slice(body).ok()?;
        let p = JsonPath::parse(field).ok()?;
        p.first_id(&v)
    } else {
        form_urlencoded::parse(body)
            .find(|(k, _)| k == field)
            .map(|(_, v)| v.into_owned())
    };
    v.filter(|s| !s.is_empty())
}

/// The raw bytes of form field or JSON member `field` in a request body as the kernel reads them:
/// after `field=` or `"field":"`, up to the first token end (see `tracer_common::is_token_end`).
pub fn wire_value<'a>(body: &'a [u8], field: &str) -> Option<&'a [u8]> {
    for pat in token_patterns_for_field(field) {
        if let Some(i) = find(body, &pat) {
            let rest = &body[i + pat.len()..];
            let end = rest
                .iter()
                .position(|b| tracer_common::is_token_end(*b))
                .unwrap_or(rest.len());
            if end > 0 {
                return Some(&rest[..end]);
            }
        }
    }
    None
}

/// The byte patterns that precede a login name in a form or JSON body.
pub fn token_patterns_for_field(field: &str) -> Vec<Vec<u8>> {
    let f = field.trim_start_matches("$.");
    vec![
        format!("{f}=").into_bytes(),
        format!("\"{f}\":\"").into_bytes(),
    ]
}

pub(super) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The client behind trusted proxies, from the one header the operator named: the right-most
/// address in `X-Forwarded-For` (or `Forwarded: for=`) that is not itself a trusted proxy, the
/// left-most when all are; the last `X-Real-IP`. Other headers are never read: nginx passes a
/// client's own `Forwarded` through untouched, so believing it would let anyone pick an address.
pub fn forwarded_client(
    headers: &[Header],
    which: ClientIpHeader,
    trusted: &[Cidr],
) -> Option<IpAddr> {
    let mut chain: Vec<IpAddr> = Vec::new();
    let named = |n: &'static str| {
        headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(n))
            .filter_map(|h| h.value_str())
    };
    match which {
        ClientIpHeader::Forwarded => {
            for v in named("forwarded") {
                for elem in v.split(',') {
                    for pair in elem.split(';') {
                        if let Some((k, val)) = pair.split_once('=') {
                            if k.trim().eq_ignore_ascii_case("for") {
                                chain.extend(parse_node(val.trim().trim_matches('"')));
                            }
                        }
                    }
                }
            }
        }
        ClientIpHeader::XForwardedFor => {
            for v in named("x-forwarded-for") {
                chain.extend(v.split(',').filter_map(|s| parse_node(s.trim())));
            }
        }
        ClientIpHeader::XRealIp => {
            return named("x-real-ip")
                .next_back()
                .and_then(|v| parse_node(v.trim()))
                .map(|ip| ip.to_canonical());
        }
    }
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|c| c.contains(*ip));
    chain
        .iter()
        .rev()
        .find(|ip| !is_trusted(ip))
        .or(chain.first())
        .map(|ip| ip.to_canonical())
}

/// An address as proxies write it: `1.2.3.4`, `1.2.3.4:5678`, `[::1]`, `[::1]:443`, `::1`.
pub(super) fn parse_node(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    s.rsplit_once(':')?.0.parse().ok()
}

/// Now, in Unix seconds.
pub(super) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
