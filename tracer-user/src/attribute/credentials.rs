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
    config::Cidr,
    exchange::{header, Header},
};

/// `Bearer <token>` (scheme case-insensitive).
pub(super) fn bearer_token(v: &str) -> Option<&str> {
    let v = v.trim();
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let t = rest.trim();
    (!t.is_empty()).then_some(t)
}

/// The value of cookie `name` in the request's `Cookie` headers (quotes removed).
pub fn request_cookie(headers: &[Header], name: &str) -> Option<String> {
    for h in headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("cookie"))
    {
        let Some(v) = h.value_str() else { continue };
        for part in v.split(';') {
            let Some((k, val)) = part.split_once('=') else {
                continue;
            };
            if k.trim() == name {
                let val = val.trim();
                let val = val
                    .strip_prefix('"')
                    .and_then(|s| s.strip_suffix('"'))
                    .unwrap_or(val);
                if !val.is_empty() {
                    return Some(val.to_string());
                }
            }
        }
    }
    None
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

/// The client behind trusted proxies: the right-most address in `X-Forwarded-For` (or
/// `Forwarded: for=`) that is not itself a trusted proxy; the left-most when all are.
pub fn forwarded_client(headers: &[Header], trusted: &[Cidr]) -> Option<IpAddr> {
    let mut chain: Vec<IpAddr> = Vec::new();
    let forwarded: Vec<&Header> = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("forwarded"))
        .collect();
    if !forwarded.is_empty() {
        for h in forwarded {
            let Some(v) = h.value_str() else { continue };
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
    } else {
        for h in headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("x-forwarded-for"))
        {
            let Some(v) = h.value_str() else { continue };
            chain.extend(v.split(',').filter_map(|s| parse_node(s.trim())));
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
