//! What the HTTP batch destinations (Loki, Elasticsearch/OpenSearch, OTLP) share: one blocking
//! client per sink (ureq over rustls, trusting `ca` or else the system's roots, optional client
//! certificate, gzip request bodies, extra headers, one timeout for the whole exchange), the
//! reading of `Retry-After` and RFC 3339 timestamps, and the driver that splits a batch when the
//! receiver answers for it as a whole in a way smaller requests can fix or pin down.
//!
//! Answers every destination treats alike (each names its product in the reason):
//! - a redirect, 401, 403, 404 and 407 are configuration or credential problems an operator can
//!   fix (the url, a token, a tenant header): the batch is retried, never dead-lettered, and the
//!   reason says what to check;
//! - transport failures (refused, reset, timeout, TLS) are retried; a certificate the client
//!   does not trust says to set `ca` (and `server_name`).

use std::{
    collections::BTreeMap,
    io::{self, Write},
    ops::Range,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use ureq::{
    http::{
        header::{InvalidHeaderName, InvalidHeaderValue},
        uri::InvalidUri,
        HeaderName, HeaderValue, Uri,
    },
    tls::{Certificate, ClientCert, PemItem, PrivateKey, RootCerts, TlsConfig},
    unversioned::{
        resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver},
        transport::{DefaultConnector, NextTimeout},
    },
    Agent,
};

use super::{Outcome, SendError};
use crate::config::{HttpSinkConfig, TlsClientConfig};

/// Largest answer body read; the rest is not needed to judge the answer.
const MAX_ANSWER: u64 = 16 << 20;
/// Requests one `send` may make while splitting a batch; what is left is handed back as
/// `Outcome::retry` so the worker resends it (each call makes progress: the budget is larger
/// than two requests per halving of the largest batch).
pub const SPLIT_BUDGET: usize = 64;
/// Headers the destinations set themselves.
const OWN_HEADERS: &[&str] = &[
    "content-type",
    "content-encoding",
    "content-length",
    "host",
    "transfer-encoding",
];

/// The receiver's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// The body (lossy UTF-8, at most [`MAX_ANSWER`] bytes).
    pub body: String,
    pub retry_after: Option<Duration>,
}

/// One sink's HTTP client.
pub struct Client {
    agent: Agent,
    /// The configured url, with its host replaced by `server_name` when that is set (a pinned
    /// resolver still connects to the configured host).
    url: String,
    gzip: bool,
    headers: Vec<(HeaderName, HeaderValue)>,
    timeout: Duration,
}

/// Resolves `server_name` to the configured host's addresses, so the certificate is checked
/// against `server_name` (and `Host`/SNI name it) while the connection goes where the url says.
#[derive(Debug)]
struct Pinned {
    server_name: String,
    target: Uri,
    inner: DefaultResolver,
}

impl Resolver for Pinned {
    fn resolve(
        &self,
        uri: &Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        if uri.host() == Some(self.server_name.as_str()) {
            self.inner.resolve(&self.target, config, timeout)
        } else {
            self.inner.resolve(uri, config, timeout)
        }
    }
}

/// Why a sink's HTTP client could not be built from its config (its url, headers or TLS
/// material); each text names the setting or file to fix.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read the {what} {}: {source}", .path.display())]
    Read {
        /// "CA file", "client certificate" or "client key".
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{}: not a PEM file: {source}", .path.display())]
    NotPem { path: PathBuf, source: ureq::Error },
    #[error(
        "{}: no certificate in it; expected PEM \"-----BEGIN CERTIFICATE-----\" blocks",
        .path.display()
    )]
    NoCaCertificate { path: PathBuf },
    #[error("{}: no certificate in it", .path.display())]
    NoClientCertificate { path: PathBuf },
    #[error("{}: no private key in it: {source}", .path.display())]
    NoPrivateKey { path: PathBuf, source: ureq::Error },
    #[error("url {url:?} is not a URL: {source}")]
    NotAUrl { url: String, source: InvalidUri },
    #[error("url {url:?} is not http:// or https://")]
    Scheme { url: String },
    #[error("url {url:?} has no host")]
    NoHost { url: String },
    #[error("server_name is set but the url {url:?} is http://; expected an https:// url")]
    ServerNameWithoutTls { url: String },
    #[error("header {name:?} is not a header name: {source}")]
    HeaderName {
        name: String,
        source: InvalidHeaderName,
    },
    #[error("header {name:?} is set by the agent; expected authentication or tenant headers")]
    OwnHeader { name: String },
    #[error("the value of header {name:?} is not valid: {source}")]
    HeaderValue {
        name: String,
        source: InvalidHeaderValue,
    },
    #[error("server_name {server_name:?} is not a host name: {source}")]
    ServerName {
        server_name: String,
        source: InvalidUri,
    },
    /// The url's host and port do not make a url of their own (to pin `server_name` to).
    #[error("url {url:?}: {source}")]
    Target { url: String, source: InvalidUri },
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|source| ClientError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn certs_of(path: &Path) -> Result<Vec<Certificate<'static>>, ClientError> {
    let pem = read_file("CA file", path)?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(PemItem::Certificate(c)) => certs.push(c),
            Ok(_) => {}
            Err(source) => {
                return Err(ClientError::NotPem {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
    if certs.is_empty() {
        return Err(ClientError::NoCaCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn tls_config(tls: &TlsClientConfig) -> Result<TlsConfig, ClientError> {
    let roots = match &tls.ca {
        Some(ca) => RootCerts::from(certs_of(ca)?),
        None => {
            // The system's store (SSL_CERT_FILE/SSL_CERT_DIR are honoured); Mozilla's roots,
            // built in, when it has none.
            let found = rustls_native_certs::load_native_certs();
            if found.certs.is_empty() {
                RootCerts::WebPki
            } else {
                RootCerts::from(
                    found
                        .certs
                        .iter()
                        .map(|c| Certificate::from_der(c.as_ref()).to_owned()),
                )
            }
        }
    };
    let client = match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let pem = read_file("client certificate", cert)?;
            let chain: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
                .filter_map(|i| match i {
                    Ok(PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            if chain.is_empty() {
                return Err(ClientError::NoClientCertificate { path: cert.clone() });
            }
            let k = PrivateKey::from_pem(&read_file("client key", key)?).map_err(|source| {
                ClientError::NoPrivateKey {
                    path: key.clone(),
                    source,
                }
            })?;
            Some(ClientCert::new_with_certs(&chain, k))
        }
        _ => None,
    };
    Ok(TlsConfig::builder()
        .root_certs(roots)
        .client_cert(client)
        .build())
}

impl Client {
    pub fn new(cfg: &HttpSinkConfig) -> Result<Client, ClientError> {
        let uri: Uri = cfg.url.parse().map_err(|source| ClientError::NotAUrl {
            url: cfg.url.clone(),
            source,
        })?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(ClientError::Scheme {
                    url: cfg.url.clone(),
                })
            }
        };
        let Some(authority) = uri.authority().cloned() else {
            return Err(ClientError::NoHost {
                url: cfg.url.clone(),
            });
        };
        if !https && cfg.tls.server_name.is_some() {
            return Err(ClientError::ServerNameWithoutTls {
                url: cfg.url.clone(),
            });
        }
        let mut headers = Vec::with_capacity(cfg.headers.len());
        for (k, v) in &cfg.headers {
            let name =
                HeaderName::try_from(k.as_str()).map_err(|source| ClientError::HeaderName {
                    name: k.clone(),
                    source,
                })?;
            if OWN_HEADERS.contains(&name.as_str()) {
                return Err(ClientError::OwnHeader { name: k.clone() });
            }
            let value =
                HeaderValue::try_from(v.as_str()).map_err(|source| ClientError::HeaderValue {
                    name: k.clone(),
                    source,
                })?;
            headers.push((name, value));
        }
        let mut builder = Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(cfg.timeout))
            // A redirect of a POST is a wrong url: answered, not followed.
            .max_redirects(0)
            .user_agent(format!("sparbar/{}", env!("CARGO_PKG_VERSION")));
        if https {
            builder = builder.tls_config(tls_config(&cfg.tls)?);
        }
        let config = builder.build();
        let (agent, url) = match (&cfg.tls.server_name, https) {
            (Some(sn), true) => {
                let port = uri.port_u16().unwrap_or(443);
                let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
                let url = format!("https://{sn}:{port}{path}");
                url.parse::<Uri>()
                    .map_err(|source| ClientError::ServerName {
                        server_name: sn.clone(),
                        source,
                    })?;
                let target: Uri = format!("https://{authority}/").parse().map_err(|source| {
                    ClientError::Target {
                        url: cfg.url.clone(),
                        source,
                    }
                })?;
                let resolver = Pinned {
                    server_name: sn.clone(),
                    target,
                    inner: DefaultResolver::default(),
                };
                (
                    Agent::with_parts(config, DefaultConnector::default(), resolver),
                    url,
                )
            }
            _ => (Agent::new_with_config(config), cfg.url.clone()),
        };
        Ok(Client {
            agent,
            url,
            gzip: cfg.gzip,
            headers,
            timeout: cfg.timeout,
        })
    }

    /// The url requests go to (the configured one, or with `server_name` as its host).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// POSTs `body` to `url`. `Err` only when there is no answer (always `Retry`).
    pub fn post(&self, url: &str, content_type: &str, body: &[u8]) -> Result<Answer, SendError> {
        let mut req = self.agent.post(url).header("content-type", content_type);
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        let sent = if self.gzip {
            let z = gzip(body).map_err(|e| SendError::retry(format!("gzip failed: {e}")))?;
            req.header("content-encoding", "gzip").send(&z[..])
        } else {
            req.send(body)
        };
        let mut resp = sent.map_err(|e| SendError::retry(self.transport_error(url, e)))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry_after(v, SystemTime::now()));
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER)
            .read_to_vec()
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        let body = match body {
            Ok(b) => b,
            // The status is the answer; a body cut short only matters where it is parsed (2xx),
            // and there it is a retry (resending is harmless to every receiver here).
            Err(e) if !(200..300).contains(&status) => format!("(body unreadable: {e})"),
            Err(e) => {
                return Err(SendError::retry(format!(
                    "POST {url}: answered {status} but the body could not be read: {e}"
                )))
            }
        };
        Ok(Answer {
            status,
            body,
            retry_after,
        })
    }

    fn transport_error(&self, url: &str, e: ureq::Error) -> String {
        let what = match &e {
            ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
                "connection refused (is the receiver running and the port right?)".to_string()
            }
            ureq::Error::Io(io) if io.to_string().contains("certificate") => format!(
                "TLS: the receiver's certificate was not accepted ({io}); if a private CA signed it, \
                 set ca = \"/path/to/ca.pem\", and server_name if it names another host"
            ),
            ureq::Error::Timeout(_) => format!("no answer within {:?} (timeout)", self.timeout),
            ureq::Error::HostNotFound => "host not found (DNS)".to_string(),
            other => other.to_string(),
        };
        format!("POST {url}: {what}")
    }
}

/// Gzips `body` (what `gzip = true` sends, with `Content-Encoding: gzip`).
pub fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut z = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4 + 64),
        flate2::Compression::default(),
    );
    z.write_all(body)?;
    z.finish()
}

/// `Retry-After` (RFC 9110 §10.2.3): delay-seconds, or an HTTP-date, taken relative to `now`
/// (a date in the past is zero). Anything else is ignored (the worker's backoff applies).
pub fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(v.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

fn digits(b: &[u8], at: usize, n: usize) -> Option<u64> {
    let s = b.get(at..at + n)?;
    s.iter().try_fold(0u64, |acc, c| {
        c.is_ascii_digit().then(|| acc * 10 + u64::from(c - b'0'))
    })
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Nanoseconds since the epoch of an RFC 3339 date-time (`2023-11-14T22:13:20.123456Z`,
/// `...+02:00`); `None` when it is not one or is before 1970.
pub fn rfc3339_unix_ns(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let (y, mo, d) = (digits(b, 0, 4)?, digits(b, 5, 2)?, digits(b, 8, 2)?);
    let (h, mi, sec) = (digits(b, 11, 2)?, digits(b, 14, 2)?, digits(b, 17, 2)?);
    if b.get(4) != Some(&b'-')
        || b.get(7) != Some(&b'-')
        || !matches!(b.get(10), Some(b'T' | b't' | b' '))
        || b.get(13) != Some(&b':')
        || b.get(16) != Some(&b':')
    {
        return None;
    }
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&mo)
        || d == 0
        || d > month_days[mo as usize - 1]
        || h > 23
        || mi > 59
        || sec > 60
    {
        return None;
    }
    let mut i = 19;
    let mut frac_ns = 0u64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            if i - start < 9 {
                frac_ns = frac_ns * 10 + u64::from(b[i] - b'0');
            }
            i += 1;
        }
        if i == start {
            return None;
        }
        for _ in (i - start)..9 {
            frac_ns *= 10;
        }
    }
    let offset: i64 = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
            let (oh, om) = (digits(b, i + 1, 2)?, digits(b, i + 4, 2)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let o = (oh * 3600 + om * 60) as i64;
            if *sign == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return None,
    };
    let days = days_from_civil(y as i64, mo as i64, d as i64);
    // A leap second (:60) is folded into the next second's first instant.
    let secs =
        days * 86_400 + (h * 3600 + mi * 60 + sec.min(59)) as i64 + i64::from(sec == 60) - offset;
    let secs = u64::try_from(secs).ok()?;
    secs.checked_mul(1_000_000_000)?.checked_add(frac_ns)
}

/// Nanoseconds since the epoch, now.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A receiver's text cut to one line of at most 300 characters, for reasons and logs.
pub fn short(text: &str) -> String {
    let one: String = text
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one.chars().count() > 300 {
        let mut s: String = one.chars().take(300).collect();
        s.push('…');
        s
    } else {
        one
    }
}

/// The answers that are a configuration or credential problem: retried, with what to check.
pub fn config_problem(status: u16, url: &str) -> Option<String> {
    Some(match status {
        300..=399 => format!(
            "answered {status} (a redirect): the url {url} is not the endpoint; set url to the address the receiver redirects to"
        ),
        401 => "answered 401 Unauthorized: the credentials in headers are missing or wrong (will retry until an operator fixes them)".to_string(),
        403 => "answered 403 Forbidden: the credentials in headers may not write here (will retry until an operator fixes them)".to_string(),
        404 => format!("answered 404 Not Found: check the url {url}"),
        407 => "answered 407: the HTTP proxy (HTTPS_PROXY) wants credentials".to_string(),
        _ => return None,
    })
}

/// What a receiver said about one request carrying a contiguous part of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Answered per record (indexes into the whole batch); what is not listed was accepted.
    Answered(Outcome),
    /// Failed as a whole, transiently.
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    /// Refused as a whole, for good.
    Reject(String),
    /// Refused as a whole in a way smaller requests can fix or pin down (413; Loki's 400, which
    /// names no entry): the halves are sent; a single record answered so is rejected.
    Split(String),
}

/// Sends `0..len` through `send` (which makes one request for a range and judges the answer),
/// splitting as the answers ask, in batch order. When the first request (the whole batch) fails
/// as a whole the error is the batch's; once part of it went through, what fails later is
/// handed back in `retry` (or `rejected`) so the worker resends only that.
pub fn send_split(
    len: usize,
    mut send: impl FnMut(Range<usize>) -> Part,
) -> Result<Outcome, SendError> {
    let mut out = Outcome::default();
    if len == 0 {
        return Ok(out);
    }
    // A stack of ranges still to send; the top is next (batch order).
    let mut todo: Vec<Range<usize>> = Vec::with_capacity(16);
    todo.push(0..len);
    let mut requests = 0;
    while let Some(r) = todo.pop() {
        let whole = r.start == 0 && r.end == len;
        if requests == SPLIT_BUDGET {
            todo.push(r);
            break;
        }
        requests += 1;
        match send(r.clone()) {
            Part::Answered(o) => {
                out.rejected.extend(o.rejected);
                out.retry.extend(o.retry);
                out.retry_after = out.retry_after.max(o.retry_after);
            }
            Part::Retry { reason, after } if whole => {
                return Err(SendError::Retry { reason, after })
            }
            Part::Retry { after, .. } => {
                // The receiver is struggling: stop here and leave the rest to the worker.
                out.retry_after = out.retry_after.max(after);
                todo.push(r);
                break;
            }
            Part::Reject(reason) if whole => return Err(SendError::Reject { reason }),
            Part::Split(reason) if whole && len == 1 => return Err(SendError::Reject { reason }),
            Part::Reject(reason) | Part::Split(reason) if r.len() == 1 => {
                out.rejected.push((r.start, reason))
            }
            Part::Reject(reason) => out.rejected.extend(r.map(|i| (i, reason.clone()))),
            Part::Split(_) => {
                let mid = r.start + r.len() / 2;
                todo.push(mid..r.end);
                todo.push(r.start..mid);
            }
        }
    }
    for r in todo {
        out.retry.extend(r);
    }
    out.rejected.sort_by_key(|(i, _)| *i);
    out.rejected.dedup_by_key(|(i, _)| *i);
    out.retry.sort_unstable();
    out.retry.dedup();
    out.retry
        .retain(|i| out.rejected.binary_search_by_key(i, |(j, _)| *j).is_err());
    Ok(out)
}

/// Logs a per-record note at most once a minute, with the count since the last line.
#[derive(Debug, Default)]
pub struct Every {
    last: Option<Instant>,
    pending: u64,
}

impl Every {
    /// Adds `n`; returns the total to log when a line is due.
    pub fn note(&mut self, n: u64) -> Option<u64> {
        self.pending += n;
        if self.pending == 0
            || self
                .last
                .is_some_and(|t| t.elapsed() < Duration::from_secs(60))
        {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.pending))
    }
}

/// The few fields of a record the HTTP destinations read (without building the whole tree).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct Peek {
    #[serde(rename = "@timestamp")]
    pub timestamp: Option<String>,
    pub event: PeekEvent,
    pub host: PeekHost,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct PeekEvent {
    pub id: Option<String>,
    pub kind: Option<String>,
    pub created: Option<String>,
    pub sequence: Option<u64>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct PeekHost {
    pub name: Option<String>,
}

impl Peek {
    /// What `line` says; all `None` when it is not a JSON object of the expected shape.
    pub fn of(line: &[u8]) -> Peek {
        serde_json::from_slice(line).unwrap_or_default()
    }

    /// `@timestamp` in nanoseconds since the epoch, if present and RFC 3339.
    pub fn timestamp_ns(&self) -> Option<u64> {
        self.timestamp.as_deref().and_then(rfc3339_unix_ns)
    }
}

/// Groups indexes by a key, keeping batch order inside each group and groups in order of first
/// appearance.
pub fn group_by<K: Ord + Clone>(
    keys: impl IntoIterator<Item = (usize, K)>,
) -> Vec<(K, Vec<usize>)> {
    let mut order: Vec<K> = Vec::new();
    let mut groups: BTreeMap<K, Vec<usize>> = BTreeMap::new();
    for (i, k) in keys {
        groups
            .entry(k.clone())
            .or_insert_with(|| {
                order.push(k);
                Vec::new()
            })
            .push(i);
    }
    order
        .into_iter()
        .map(|k| {
            let v = groups.remove(&k).unwrap_or_default();
            (k, v)
        })
        .collect()
}

/// `base` and `path` joined by exactly one `/`.
pub fn join(base: &str, path: &str) -> String {
    format!(
        "{}/{}",
        base.trim_end_matches('/'),
        path.trim_start_matches('/')
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(retry_after(" 0 ", now), Some(Duration::ZERO));
        let at = httpdate::fmt_http_date(now + Duration::from_secs(5));
        assert_eq!(retry_after(&at, now), Some(Duration::from_secs(5)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(5));
        assert_eq!(retry_after(&past, now), Some(Duration::ZERO));
        // RFC 850 and asctime forms are HTTP-dates too.
        assert_eq!(
            retry_after("Tuesday, 14-Nov-23 22:13:25 GMT", now),
            Some(Duration::from_secs(5))
        );
        assert_eq!(retry_after("-3", now), None);
        assert_eq!(retry_after("1.5", now), None);
        assert_eq!(retry_after("soon", now), None);
        assert_eq!(retry_after("", now), None);
    }

    #[test]
    fn rfc3339() {
        assert_eq!(
            rfc3339_unix_ns("2023-11-14T22:13:20.123456Z"),
            Some(1_700_000_000_123_456_000)
        );
        assert_eq!(rfc3339_unix_ns("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            rfc3339_unix_ns("2023-11-15T00:13:20.5+02:00"),
            Some(1_700_000_000_500_000_000)
        );
        assert_eq!(
            rfc3339_unix_ns("2023-11-14T21:13:20-01:00"),
            Some(1_700_000_000_000_000_000)
        );
        assert_eq!(
            rfc3339_unix_ns("2023-11-14T22:13:20.1234567891Z"),
            Some(1_700_000_000_123_456_789)
        );
        assert_eq!(
            rfc3339_unix_ns("2024-02-29T00:00:00Z"),
            Some(1_709_164_800_000_000_000)
        );
        // What the agent writes round-trips.
        let ns = 1_712_345_678_901_234_000;
        assert_eq!(
            rfc3339_unix_ns(&crate::record::rfc3339_micros(ns)),
            Some(ns)
        );
        for bad in [
            "",
            "2023-11-14",
            "2023-11-14T22:13:20",
            "2023-13-14T22:13:20Z",
            "2023-02-29T22:13:20Z",
            "2023-11-14T24:13:20Z",
            "2023-11-14T22:13:20.Z",
            "2023-11-14T22:13:20+0200",
            "1969-12-31T23:59:59Z",
            "2023-11-14T22:13:20Zjunk",
            "२०२३-11-14T22:13:20Z",
        ] {
            assert_eq!(rfc3339_unix_ns(bad), None, "{bad}");
        }
    }

    #[test]
    fn gzip_round_trips() {
        let body = b"{\"streams\":[]}".repeat(100);
        let z = gzip(&body).unwrap();
        assert!(z.len() < body.len());
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&z[..]), &mut out).unwrap();
        assert_eq!(out, body);
    }

    #[test]
    fn short_is_one_line() {
        assert_eq!(short(" a\nb\r\n"), "a b");
        assert_eq!(short(&"x".repeat(400)).chars().count(), 301);
    }

    /// A receiver that refuses (as a whole, "split") any range holding a bad index.
    fn judge(bad: &[usize], r: Range<usize>) -> Part {
        if r.clone().any(|i| bad.contains(&i)) {
            Part::Split(format!("bad in {r:?}"))
        } else {
            Part::Answered(Outcome::delivered())
        }
    }

    #[test]
    fn split_pins_down_the_bad_records() {
        let mut seen = Vec::new();
        let o = send_split(10, |r| {
            seen.push(r.clone());
            judge(&[3, 7], r)
        })
        .unwrap();
        assert_eq!(
            o.rejected.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            vec![3, 7]
        );
        assert!(o.retry.is_empty());
        // In batch order, depth first; every good record sent in some accepted part.
        assert_eq!(seen[0], 0..10);
        assert_eq!(seen[1], 0..5);
        let mut accepted: Vec<usize> = seen
            .iter()
            .filter(|r| !(r.start..r.end).any(|i| i == 3 || i == 7))
            .flat_map(|r| r.clone())
            .collect();
        accepted.sort();
        assert_eq!(accepted, vec![0, 1, 2, 4, 5, 6, 8, 9]);
    }

    #[test]
    fn split_of_one_record_is_a_reject() {
        let e = send_split(1, |r| judge(&[0], r)).unwrap_err();
        assert_eq!(
            e,
            SendError::Reject {
                reason: "bad in 0..1".into()
            }
        );
    }

    #[test]
    fn whole_batch_failures_are_the_batch_error() {
        let e = send_split(4, |_| Part::Retry {
            reason: "503".into(),
            after: Some(Duration::from_secs(2)),
        })
        .unwrap_err();
        assert_eq!(
            e,
            SendError::Retry {
                reason: "503".into(),
                after: Some(Duration::from_secs(2))
            }
        );
        let e = send_split(4, |_| Part::Reject("400".into())).unwrap_err();
        assert_eq!(
            e,
            SendError::Reject {
                reason: "400".into()
            }
        );
    }

    #[test]
    fn a_retry_after_a_split_hands_back_the_rest() {
        let mut n = 0;
        let o = send_split(8, |_| {
            n += 1;
            match n {
                1 => Part::Split("413".into()),
                2 => Part::Answered(Outcome::delivered()), // 0..4
                _ => Part::Retry {
                    reason: "503".into(),
                    after: Some(Duration::from_secs(1)),
                },
            }
        })
        .unwrap();
        assert!(o.rejected.is_empty());
        assert_eq!(o.retry, vec![4, 5, 6, 7]);
        assert_eq!(o.retry_after, Some(Duration::from_secs(1)));
    }

    #[test]
    fn the_budget_bounds_one_send_and_progress_is_kept() {
        // Every record bad: one send may not make 2n requests; what is left comes back.
        let mut requests = 0;
        let o = send_split(500, |r| {
            requests += 1;
            judge(&(0..500).collect::<Vec<_>>(), r)
        })
        .unwrap();
        assert_eq!(requests, SPLIT_BUDGET);
        assert!(!o.rejected.is_empty());
        assert_eq!(o.rejected.len() + o.retry.len(), 500);
        assert_eq!(o.rejected[0].0, 0);
    }

    #[test]
    fn per_record_answers_are_merged() {
        let o = send_split(6, |r| {
            if r.len() == 6 {
                Part::Split("413".into())
            } else if r.start == 0 {
                Part::Answered(Outcome {
                    rejected: vec![(1, "bad".into())],
                    retry: vec![2],
                    retry_after: None,
                })
            } else {
                Part::Answered(Outcome {
                    rejected: vec![],
                    retry: vec![5],
                    retry_after: Some(Duration::from_secs(3)),
                })
            }
        })
        .unwrap();
        assert_eq!(o.rejected, vec![(1, "bad".to_string())]);
        assert_eq!(o.retry, vec![2, 5]);
        assert_eq!(o.retry_after, Some(Duration::from_secs(3)));
    }

    #[test]
    fn group_by_keeps_order() {
        let g = group_by([(0, "b"), (1, "a"), (2, "b"), (3, "c")]);
        assert_eq!(g, vec![("b", vec![0, 2]), ("a", vec![1]), ("c", vec![3])]);
    }

    #[test]
    fn config_problems_are_named() {
        assert!(config_problem(401, "u").unwrap().contains("credentials"));
        assert!(config_problem(403, "u").unwrap().contains("credentials"));
        assert!(config_problem(404, "http://x/y")
            .unwrap()
            .contains("http://x/y"));
        assert!(config_problem(301, "u").unwrap().contains("redirect"));
        assert!(config_problem(400, "u").is_none());
        assert!(config_problem(500, "u").is_none());
    }

    #[test]
    fn client_refuses_bad_configs() {
        let cfg = |url: &str, headers: Vec<(&str, &str)>| HttpSinkConfig {
            url: url.into(),
            tls: TlsClientConfig::default(),
            gzip: true,
            headers: headers
                .into_iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            timeout: Duration::from_secs(1),
        };
        assert!(Client::new(&cfg("ftp://x/", vec![])).is_err());
        assert!(Client::new(&cfg("http://", vec![])).is_err());
        let e = Client::new(&cfg("http://x/", vec![("Content-Type", "text/plain")])).err();
        assert!(e.unwrap().to_string().contains("set by the agent"));
        assert!(Client::new(&cfg("http://x:3100/", vec![("X-Scope-OrgID", "t1")])).is_ok());
        let mut c = cfg("https://x/", vec![]);
        c.tls.ca = Some("/nonexistent/ca.pem".into());
        assert!(Client::new(&c)
            .err()
            .unwrap()
            .to_string()
            .contains("/nonexistent/ca.pem"));
        let mut c = cfg("https://10.0.0.1:9200/", vec![]);
        c.tls.server_name = Some("es.internal".into());
        let client = Client::new(&c).unwrap();
        assert_eq!(client.url(), "https://es.internal:9200/");
    }

    #[test]
    fn every_logs_once_a_minute() {
        let mut e = Every::default();
        assert_eq!(e.note(0), None);
        assert_eq!(e.note(3), Some(3));
        assert_eq!(e.note(2), None);
        assert_eq!(e.note(1), None);
    }
}
