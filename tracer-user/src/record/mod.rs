//! Turns one captured exchange into the JSON record the audit trail keeps (ECS field names,
//! nested objects), and is the one place that decides what of an exchange may leave the host.
//!
//! # Privacy
//!
//! A record holds only the fields listed in [`FIELDS`]. Header values, cookies, `Authorization`,
//! bodies, user agents and raw queries never go in: the query is rebuilt from the route's
//! allow-listed parameters only, and `mime_type` is the bare media type of `Content-Type`
//! (`application/json`, parameters cut, and only when it is a well-formed `type/subtype`).
//! Path parameters are recorded as they came: on the configured routes they are record ids, not
//! personal data. [`check_fields`] verifies a record against [`FIELDS`].
//!
//! `http.request.mime_type` and `http.response.mime_type` come from the `Content-Type` header;
//! ECS would have them sniffed from the body, which the agent does not do.

pub mod ids;
pub mod security;

use std::net::SocketAddr;

use serde::Serialize;
use serde_json::{Map, Value};
use thiserror::Error;

use crate::attribute::attribution::Attribution;
use crate::attribute::disclosure::Disclosure;
use crate::attribute::routes::{self, CrossTenantAttempt, PathView, RouteMatch};
use crate::exchange::{header, BodyLoss, Completeness, Exchange, Header, Tuple};

/// The traced process.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcessInfo {
    pub pid: u32,
    /// The kernel's comm.
    pub name: String,
    /// Path of the executable, when it could be read.
    pub executable: Option<String>,
}

/// What the capture knows about the completeness of this exchange (the caller works it out).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct CaptureInfo {
    pub complete: bool,
    pub request_bytes_missing: u64,
    pub response_bytes_missing: u64,
    /// Short, fixed reason codes (`"ringbuf_full"`, `"cap"`, `"no_response"`, …).
    pub reasons: Vec<&'static str>,
}

impl CaptureInfo {
    /// What the capture knows of an exchange: whole, or which bytes are missing and why
    /// (`holes`: the reasons of the connection's holes since its last exchange).
    pub fn of(ex: &Exchange, holes: &[&'static str]) -> CaptureInfo {
        let missing = |b: &crate::exchange::Body| -> u64 {
            match b.loss {
                Some(BodyLoss::NotCaptured) | Some(BodyLoss::Incomplete)
                    if b.decoded_from.is_none() =>
                {
                    b.wire_len.saturating_sub(b.data.len() as u64)
                }
                _ => 0,
            }
        };
        let request_bytes_missing = missing(&ex.request.body);
        let response_bytes_missing = ex.response.as_ref().map(|r| missing(&r.body)).unwrap_or(0);
        let mut reasons = holes.to_vec();
        if ex.completeness == Completeness::NoResponse {
            reasons.push("no_response");
        }
        CaptureInfo {
            complete: ex.completeness == Completeness::Complete
                && request_bytes_missing == 0
                && response_bytes_missing == 0,
            request_bytes_missing,
            response_bytes_missing,
            reasons,
        }
    }
}

pub use crate::config::{
    FieldCaps, DEFAULT_MAX_PARAM_BYTES, DEFAULT_MAX_PATH_BYTES, DEFAULT_MAX_QUERY_VALUE_BYTES,
};

/// `s` cut to at most `max` bytes at a character boundary; `true` when it was cut.
fn cap(s: &str, max: usize) -> (&str, bool) {
    if s.len() <= max {
        return (s, false);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    (&s[..end], true)
}

/// Everything a record is built from.
#[derive(Debug, Clone)]
pub struct RecordContext<'a> {
    pub exchange: &'a Exchange,
    /// The matched route; `None` records the exchange without `http.route`, `sparbar.route` and
    /// `url.query`.
    pub route: Option<&'a RouteMatch>,
    /// Wall-clock time of the request's first byte, ns since the Unix epoch.
    pub start_unix_ns: u64,
    /// Request first byte .. response last byte.
    pub duration_ns: u64,
    pub tuple: Option<Tuple>,
    /// The plaintext came from OpenSSL (TLS), not from socket calls.
    pub tls: bool,
    pub process: &'a ProcessInfo,
    pub service_name: &'a str,
    /// How the service passes the request path on: `url.path` is that path.
    pub path_view: PathView,
    pub host_name: &'a str,
    /// Stable connection identity `"tgid:fd:gen"`.
    pub conn_id: String,
    pub capture: CaptureInfo,
    /// Unique id given by the caller.
    pub event_id: String,
    /// Who made the call (absent when attribution is not configured).
    pub attribution: Option<&'a Attribution>,
    /// Whose personal data the response disclosed (routes with a disclosure rule, 2xx only).
    pub disclosure: Option<&'a Disclosure>,
    /// The decision that blocks this call's user or session, if any.
    pub blocked_by: Option<&'a str>,
    /// The request named another tenant than its caller's (known before the answer).
    pub attempt: Option<&'a CrossTenantAttempt>,
    pub caps: FieldCaps,
}

/// A record that holds something it should not.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RecordError {
    #[error("record field {path:?} is not one of the fields a record may hold")]
    UnexpectedField { path: String },
    #[error("a record must be a JSON object")]
    NotAnObject,
}

/// Every field a record may hold, as dotted paths of the nested objects. `sparbar.route.params`
/// is an object whose keys are the route's parameter names.
pub const FIELDS: &[&str] = &[
    "@timestamp",
    "event.id",
    "event.kind",
    "event.category",
    "event.type",
    "event.dataset",
    "event.start",
    "event.end",
    "event.duration",
    "event.outcome",
    "http.version",
    "http.request.method",
    "http.request.body.bytes",
    "http.request.mime_type",
    "http.response.status_code",
    "http.response.body.bytes",
    "http.response.mime_type",
    "http.route",
    "url.path",
    "url.query",
    "source.ip",
    "source.port",
    "server.ip",
    "server.port",
    "network.transport",
    "network.protocol",
    "tls.established",
    "process.pid",
    "process.name",
    "process.executable",
    "service.name",
    "host.name",
    "sparbar.route.name",
    "sparbar.route.params",
    "sparbar.route.normalised_path",
    "sparbar.connection.id",
    "sparbar.capture.complete",
    "sparbar.capture.request_bytes_missing",
    "sparbar.capture.response_bytes_missing",
    "sparbar.capture.reasons",
    "sparbar.anomalies",
    "sparbar.query.dropped",
    "sparbar.truncated",
    "sparbar.cross_tenant_attempt.named",
    "sparbar.cross_tenant_attempt.caller",
    "user.id",
    "user.hash",
    "user.roles",
    "organization.id",
    "client.ip",
    "related.user",
    "session.id",
    "abook.session.kind",
    "abook.session.ids",
    "abook.identity.source",
    "abook.target.ids",
    "abook.target.count",
    "abook.target.ids_omitted",
    "abook.target.digest",
    "abook.target.tenants",
    "abook.target.unknown_tenant",
    "abook.result.total",
    "abook.data_categories",
    "abook.cross_tenant",
    "abook.disclosure.status",
    "abook.disclosure.error",
    "abook.enforcement.blocked",
    "abook.enforcement.decision_id",
];

/// Builds the record for one exchange.
///
/// `user_agent` is left out on purpose: a user agent string identifies people (it is one of the
/// strongest browser fingerprints) and says nothing about which data was read.
/// The record as typed, borrowed fields: serialized straight to a line without building a
/// JSON tree (this is the hot path: one per exchange).
#[derive(Serialize)]
pub struct Record<'a> {
    #[serde(rename = "@timestamp")]
    timestamp: String,
    event: EventFields<'a>,
    http: HttpFields<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<UrlFields>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<Endpoint>,
    #[serde(skip_serializing_if = "Option::is_none")]
    server: Option<Endpoint>,
    network: Network,
    // Only when the plaintext came from OpenSSL. Plaintext from socket calls may still have been
    // TLS between the client and a terminating proxy, so `false` would be a claim we cannot make.
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<Tls>,
    process: Process<'a>,
    service: Name<'a>,
    host: Name<'a>,
    sparbar: SparbarFields<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<User<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    organization: Option<Id<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client: Option<Ip>,
    #[serde(skip_serializing_if = "Option::is_none")]
    related: Option<Related<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    session: Option<Id<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    abook: Option<Abook<'a>>,
}

#[derive(Serialize)]
struct User<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hash: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    roles: Option<[&'a str; 1]>,
}

#[derive(Serialize)]
struct Id<'a> {
    id: &'a str,
}

#[derive(Serialize)]
struct Ip {
    ip: String,
}

#[derive(Serialize)]
struct Related<'a> {
    user: Vec<&'a str>,
}

#[derive(Serialize)]
struct Abook<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    session: Option<Kind<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    identity: Option<Source>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<Target<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<Total>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_categories: Option<Vec<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cross_tenant: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disclosure: Option<DisclosureStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    enforcement: Option<Enforced<'a>>,
}

#[derive(Serialize)]
struct Enforced<'a> {
    blocked: bool,
    decision_id: &'a str,
}

#[derive(Serialize)]
struct Kind<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    /// Every session hash of a request that carried several.
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    ids: &'a [String],
}

#[derive(Serialize)]
struct Source {
    source: &'static str,
}

#[derive(Serialize)]
struct Target<'a> {
    ids: &'a [String],
    count: usize,
    ids_omitted: usize,
    digest: &'a str,
    tenants: Vec<&'a str>,
    #[serde(skip_serializing_if = "is_zero")]
    unknown_tenant: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

#[derive(Serialize)]
struct Total {
    total: u64,
}

#[derive(Serialize)]
struct DisclosureStatus {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
}

/// `abook.cross_tenant`: the caller's tenant is known and a subject's tenant differs from it;
/// `false` when every subject's tenant is known and equal; unknown (absent) otherwise.
pub fn cross_tenant(a: Option<&Attribution>, d: &Disclosure) -> Option<bool> {
    let own = a?.tenant.as_deref()?;
    if d.tenants.iter().any(|t| t != own) {
        Some(true)
    } else if d.unknown_tenant == 0 && !d.ids.is_empty() {
        Some(false)
    } else {
        None
    }
}

#[derive(Serialize)]
struct EventFields<'a> {
    id: &'a str,
    kind: &'static str,
    category: [&'static str; 1],
    #[serde(rename = "type")]
    type_: [&'static str; 1],
    dataset: &'static str,
    start: String,
    end: String,
    duration: u64,
    outcome: &'static str,
}

#[derive(Serialize)]
struct HttpFields<'a> {
    version: &'static str,
    request: HttpRequest<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response: Option<HttpResponse>,
    #[serde(skip_serializing_if = "Option::is_none")]
    route: Option<&'a str>,
}

#[derive(Serialize)]
struct Bytes_ {
    bytes: u64,
}

#[derive(Serialize)]
struct HttpRequest<'a> {
    method: &'a str,
    body: Bytes_,
    #[serde(skip_serializing_if = "Option::is_none")]
    mime_type: Option<String>,
}

#[derive(Serialize)]
struct HttpResponse {
    status_code: u16,
    body: Bytes_,
    #[serde(skip_serializing_if = "Option::is_none")]
    mime_type: Option<String>,
}

#[derive(Serialize)]
struct UrlFields {
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    query: Option<String>,
}

#[derive(Serialize)]
struct Endpoint {
    ip: String,
    port: u16,
}

#[derive(Serialize)]
struct Network {
    transport: &'static str,
    protocol: &'static str,
}

#[derive(Serialize)]
struct Tls {
    established: bool,
}

#[derive(Serialize)]
struct Process<'a> {
    pid: u32,
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    executable: Option<&'a str>,
}

#[derive(Serialize)]
struct Name<'a> {
    name: &'a str,
}

#[derive(Serialize)]
struct SparbarFields<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    route: Option<SparbarRoute<'a>>,
    connection: ConnectionId<'a>,
    capture: &'a CaptureInfo,
    query: Dropped,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    truncated: Vec<&'static str>,
    /// What was unusual about the exchange: on the wire (reasons of `http::Anomaly`: crafted
    /// forms the servers disagree on, conflicting framing, a body cut by the memory budget) and
    /// in its credentials (attribution's anomalies), each once.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    anomalies: Vec<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cross_tenant_attempt: Option<Attempt<'a>>,
}

#[derive(Serialize)]
struct Attempt<'a> {
    named: &'a str,
    caller: &'a str,
}

#[derive(Serialize)]
struct SparbarRoute<'a> {
    name: &'a str,
    params: std::collections::BTreeMap<&'a str, &'a str>,
    /// The route was found only on the normalised path (this one), not on `url.path`.
    #[serde(skip_serializing_if = "Option::is_none")]
    normalised_path: Option<std::borrow::Cow<'a, str>>,
}

/// The anomaly of a request whose route was found only on its normalised path (see
/// `attribute::routes`): counted in `http_anomalies_total`, carried by the record.
pub const PATH_NORMALISED: &str = "path_normalised";

#[derive(Serialize)]
struct ConnectionId<'a> {
    id: &'a str,
}

#[derive(Serialize)]
struct Dropped {
    dropped: usize,
}

/// The typed record of one exchange.
pub fn record<'a>(ctx: &'a RecordContext<'a>) -> Record<'a> {
    let ex = ctx.exchange;
    let req = &ex.request;
    let end_ns = ctx.start_unix_ns.saturating_add(ctx.duration_ns);
    let outcome = match &ex.response {
        Some(r) if r.status < 400 => "success",
        Some(_) => "failure",
        None => "unknown",
    };
    let start = rfc3339_micros(ctx.start_unix_ns);
    let mut truncated: Vec<&'static str> = Vec::new();
    let query = ctx
        .route
        .map(|r| {
            let (q, cut) = allowed_query(r, ctx.caps.query_value);
            if cut {
                truncated.push("url.query");
            }
            q
        })
        .filter(|q| !q.is_empty());
    let query_dropped = match ctx.route {
        Some(r) => r.query_dropped,
        None => routes::query_pairs(&req.target),
    };
    // The path as the server passed it on, its `;parameters` redacted.
    let path = routes::passed_path(&req.target, ctx.path_view).map(|p| {
        let p = routes::redact_path_params(&p).into_owned();
        let (c, cut) = cap(&p, ctx.caps.path);
        if cut {
            truncated.push("url.path");
            c.to_string()
        } else {
            p
        }
    });
    let params = ctx.route.map(|r| {
        let mut cut_any = false;
        let m: std::collections::BTreeMap<&str, &str> = r
            .params
            .iter()
            .map(|(k, v)| {
                let (v, cut) = cap(v, ctx.caps.param);
                cut_any |= cut;
                (k.as_str(), v)
            })
            .collect();
        if cut_any {
            truncated.push("sparbar.route.params");
        }
        m
    });
    let normalised_path = ctx.route.and_then(|r| r.normalised.as_deref()).map(|p| {
        let (c, cut) = cap(p, ctx.caps.path);
        if cut {
            truncated.push("sparbar.route.normalised_path");
        }
        std::borrow::Cow::Borrowed(c)
    });
    let attempt = ctx.attempt.map(|x| {
        let (named, cut) = cap(&x.named, ctx.caps.param);
        if cut {
            truncated.push("sparbar.cross_tenant_attempt.named");
        }
        Attempt {
            named,
            caller: &x.caller,
        }
    });
    // The wire's first (request, then response), then the credentials', each once.
    let mut anomalies: Vec<&'static str> = ex.anomalies();
    let credential = ctx
        .attribution
        .into_iter()
        .flat_map(|a| a.anomalies.iter().map(|x| x.as_str()));
    let tenant = ctx
        .attempt
        .filter(|x| x.duplicate)
        .map(|_| crate::attribute::attribution::Anomaly::DuplicateTenantParam.as_str());
    let normalised = normalised_path.as_ref().map(|_| PATH_NORMALISED);
    for a in normalised.into_iter().chain(credential).chain(tenant) {
        if !anomalies.contains(&a) {
            anomalies.push(a);
        }
    }
    let url = (path.is_some() || query.is_some()).then_some(UrlFields { path, query });
    let endpoint = |a: SocketAddr| Endpoint {
        ip: a.ip().to_canonical().to_string(),
        port: a.port(),
    };
    Record {
        timestamp: start.clone(),
        event: EventFields {
            id: &ctx.event_id,
            kind: "event",
            category: ["web"],
            type_: ["access"],
            dataset: "sparbar.access",
            start,
            end: rfc3339_micros(end_ns),
            duration: ctx.duration_ns,
            outcome,
        },
        http: HttpFields {
            version: match (ex.stream_id, req.minor_version) {
                (Some(_), _) => "2",
                (None, 0) => "1.0",
                (None, _) => "1.1",
            },
            request: HttpRequest {
                method: &req.method,
                body: Bytes_ {
                    bytes: req.body.wire_len,
                },
                mime_type: mime_type(&req.headers),
            },
            response: ex.response.as_ref().map(|r| HttpResponse {
                status_code: r.status,
                body: Bytes_ {
                    bytes: r.body.wire_len,
                },
                mime_type: mime_type(&r.headers),
            }),
            route: ctx.route.map(|r| r.template.as_str()),
        },
        url,
        source: ctx.tuple.map(|t| endpoint(t.peer)),
        server: ctx.tuple.map(|t| endpoint(t.local)),
        network: Network {
            transport: "tcp",
            protocol: "http",
        },
        tls: ctx.tls.then_some(Tls { established: true }),
        process: Process {
            pid: ctx.process.pid,
            name: &ctx.process.name,
            executable: ctx.process.executable.as_deref(),
        },
        service: Name {
            name: ctx.service_name,
        },
        host: Name {
            name: ctx.host_name,
        },
        sparbar: SparbarFields {
            route: ctx.route.zip(params).map(|(r, params)| SparbarRoute {
                name: &r.name,
                params,
                normalised_path,
            }),
            connection: ConnectionId { id: &ctx.conn_id },
            capture: &ctx.capture,
            query: Dropped {
                dropped: query_dropped,
            },
            truncated,
            anomalies,
            cross_tenant_attempt: attempt,
        },
        user: ctx.attribution.and_then(|a| {
            (a.user_id.is_some() || a.user_hash.is_some()).then(|| User {
                id: a.user_id.as_deref(),
                hash: a.user_hash.as_deref(),
                roles: a.role.as_deref().map(|r| [r]),
            })
        }),
        organization: ctx
            .attribution
            .and_then(|a| a.tenant.as_deref())
            .map(|id| Id { id }),
        client: ctx.attribution.and_then(|a| a.client_ip).map(|ip| Ip {
            ip: ip.to_canonical().to_string(),
        }),
        related: {
            let mut users: Vec<&str> = Vec::new();
            if let Some(u) = ctx.attribution.and_then(|a| a.user_id.as_deref()) {
                users.push(u);
            }
            if let Some(d) = ctx.disclosure {
                for id in &d.ids[..d.listed] {
                    if !users.contains(&id.as_str()) {
                        users.push(id);
                    }
                }
            }
            (!users.is_empty()).then_some(Related { user: users })
        },
        session: ctx
            .attribution
            .and_then(|a| a.session_id.as_deref())
            .map(|id| Id { id }),
        abook: abook(ctx),
    }
}

fn abook<'a>(ctx: &'a RecordContext<'a>) -> Option<Abook<'a>> {
    let a = ctx.attribution;
    let d = ctx.disclosure;
    if a.is_none() && d.is_none() && ctx.blocked_by.is_none() {
        return None;
    }
    Some(Abook {
        session: a
            .filter(|a| a.session_kind.is_some() || !a.session_ids.is_empty())
            .map(|a| Kind {
                kind: a.session_kind.map(|k| k.as_str()),
                ids: &a.session_ids,
            }),
        identity: a.map(|a| Source {
            source: a.source.as_str(),
        }),
        target: d
            .filter(|d| {
                d.status == crate::attribute::disclosure::Status::Complete || !d.ids.is_empty()
            })
            .map(|d| Target {
                ids: &d.ids[..d.listed],
                count: d.ids.len(),
                ids_omitted: d.ids.len() - d.listed,
                digest: &d.digest,
                tenants: d.tenants.iter().map(String::as_str).collect(),
                unknown_tenant: d.unknown_tenant,
            }),
        result: d.and_then(|d| d.total).map(|total| Total { total }),
        data_categories: d.map(|d| d.categories.iter().map(String::as_str).collect()),
        cross_tenant: d.and_then(|d| cross_tenant(a, d)),
        disclosure: d.map(|d| DisclosureStatus {
            status: d.status.as_str(),
            error: d.error,
        }),
        enforcement: ctx.blocked_by.map(|decision_id| Enforced {
            blocked: true,
            decision_id,
        }),
    })
}

/// The record as one compact JSON line (no trailing newline), appended to `out`. Returns the
/// fields cut to their caps (`record_fields_truncated_total`).
pub fn write_line(ctx: &RecordContext, out: &mut Vec<u8>) -> Vec<&'static str> {
    let r = record(ctx);
    // Serializing plain structs of strings and integers into a Vec cannot fail.
    let _ = serde_json::to_writer(out, &r);
    r.sparbar.truncated
}

/// The record as a JSON tree (tests and tools; the agent writes lines with [`write_line`]).
pub fn build(ctx: &RecordContext) -> Value {
    serde_json::to_value(record(ctx)).unwrap_or(Value::Null)
}

/// Checks that `record` holds nothing but [`FIELDS`] (defence in depth for tests and debug
/// builds).
pub fn check_fields(record: &Value) -> Result<(), RecordError> {
    fn walk(prefix: &str, v: &Map<String, Value>) -> Result<(), RecordError> {
        for (k, child) in v {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if FIELDS.contains(&path.as_str()) {
                continue;
            }
            let is_prefix = FIELDS.iter().any(|f| {
                f.len() > path.len() && f.starts_with(&path) && f.as_bytes()[path.len()] == b'.'
            });
            match child {
                Value::Object(m) if is_prefix => walk(&path, m)?,
                _ => return Err(RecordError::UnexpectedField { path }),
            }
        }
        Ok(())
    }
    match record {
        Value::Object(m) => walk("", m),
        _ => Err(RecordError::NotAnObject),
    }
}

/// `url.query` rebuilt from the allow-listed parameters only (names sorted, values in request
/// order, each cut to `max` bytes, `application/x-www-form-urlencoded`); `true` when a value
/// was cut.
fn allowed_query(r: &RouteMatch, max: usize) -> (String, bool) {
    let mut parts = Vec::new();
    let mut cut_any = false;
    for (name, values) in &r.query {
        for v in values {
            let (v, cut) = cap(v, max);
            cut_any |= cut;
            parts.push(format!(
                "{}={}",
                routes::form_encode(name),
                routes::form_encode(v)
            ));
        }
    }
    (parts.join("&"), cut_any)
}

/// The media type of the first `Content-Type` header, lower-cased, without parameters; `None`
/// unless it is a well-formed `type/subtype` of at most 127 bytes.
fn mime_type(headers: &[Header]) -> Option<String> {
    fn tchar(b: u8) -> bool {
        b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
    }
    let v = header(headers, "content-type")?.value_str()?;
    let media = v.split(';').next()?.trim().to_ascii_lowercase();
    let (t, s) = media.split_once('/')?;
    let ok = !t.is_empty()
        && !s.is_empty()
        && media.len() <= 127
        && t.bytes().all(tchar)
        && s.bytes().all(tchar);
    ok.then_some(media)
}

/// RFC 3339 UTC with microseconds (`2023-11-14T22:13:20.123456Z`) from ns since the Unix epoch.
pub fn rfc3339_micros(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let micros = (unix_ns % 1_000_000_000) / 1_000;
    let (y, m, d) = civil_from_days(secs / 86_400);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's `civil_from_days`,
/// for non-negative days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March = 0
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribute::routes::RouteTable;
    use crate::config::RouteConfig;
    use crate::exchange::{Body, Completeness, Request, Response};
    use bytes::Bytes;
    use serde_json::json;

    fn h(name: &str, value: &str) -> Header {
        Header {
            name: name.into(),
            value: value.as_bytes().to_vec(),
        }
    }

    fn exchange(target: &str, status: Option<u16>) -> Exchange {
        let req_body =
            r#"{"password":"hunter2","email":"alice@example.com","phone":"+46701234567"}"#;
        let resp_body = r#"{"id":42,"email":"alice@example.com","phone":"+46 70 123 45 67"}"#;
        Exchange {
            request: Request {
                method: "GET".into(),
                target: target.into(),
                minor_version: 1,
                headers: vec![
                    h("Host", "api.example.org"),
                    h("Authorization", "Basic YWxpY2U6aHVudGVyMg=="),
                    h("Cookie", "session=COOKIEVALUE123; theme=dark"),
                    h("User-Agent", "Mozilla/5.0 (X11; alice@example.com)"),
                    h("X-Forwarded-For", "203.0.113.77"),
                    h("X-Phone", "+46701234567"),
                    h("Content-Type", "application/json; charset=utf-8"),
                ],
                body: Body {
                    wire_len: req_body.len() as u64,
                    data: Bytes::from(req_body),
                    loss: None,
                    decoded_from: None,
                },
                first_ns: 1,
                last_ns: 2,
                wire: Default::default(),
            },
            response: status.map(|status| Response {
                status,
                reason: "OK alice@example.com".into(),
                minor_version: 1,
                headers: vec![
                    h("Set-Cookie", "session=SETCOOKIE999; HttpOnly"),
                    h("Content-Type", "Application/JSON"),
                    h("Location", "/mail?to=alice@example.com"),
                ],
                body: Body {
                    wire_len: 1234,
                    data: Bytes::from(resp_body),
                    loss: None,
                    decoded_from: Some("gzip".into()),
                },
                first_ns: 3,
                last_ns: 4,
                wire: Default::default(),
            }),
            completeness: Completeness::Complete,
            upgraded: false,
            stream_id: None,
        }
    }

    fn table() -> RouteTable {
        RouteTable::new(&[RouteConfig {
            route: "GET /api/addressbook/persons/{id}".into(),
            name: "abook.person".into(),
            query_params: vec!["page".into(), "pageSize".into()],
            ..Default::default()
        }])
        .unwrap()
    }

    fn ctx<'a>(
        ex: &'a Exchange,
        route: Option<&'a RouteMatch>,
        process: &'a ProcessInfo,
        tls: bool,
    ) -> RecordContext<'a> {
        RecordContext {
            exchange: ex,
            route,
            start_unix_ns: 1_700_000_000_123_456_789,
            duration_ns: 2_500_000,
            tuple: Some(Tuple {
                local: "[::ffff:10.0.0.5]:443".parse().unwrap(),
                peer: "[2001:db8::7]:51234".parse().unwrap(),
            }),
            tls,
            process,
            service_name: "nginx",
            path_view: PathView::AsSent,
            host_name: "web-1",
            conn_id: "1234:7:99".into(),
            capture: CaptureInfo {
                complete: true,
                request_bytes_missing: 0,
                response_bytes_missing: 0,
                reasons: vec![],
            },
            event_id: "ev-1".into(),
            attribution: None,
            disclosure: None,
            blocked_by: None,
            attempt: None,
            caps: FieldCaps::default(),
        }
    }

    fn proc_info() -> ProcessInfo {
        ProcessInfo {
            pid: 1234,
            name: "nginx".into(),
            executable: Some("/usr/sbin/nginx".into()),
        }
    }

    const TARGET: &str = "/api/addressbook/persons/42?password=hunter2\
                          &email=alice%40example.com&phone=%2B46701234567&page=2&token=COOKIEVALUE123";

    #[test]
    fn no_personal_data_or_secrets_in_the_record() {
        let ex = exchange(TARGET, Some(200));
        let m = table().match_request("GET", TARGET).unwrap();
        let p = proc_info();
        for route in [Some(&m), None] {
            let rec = build(&ctx(&ex, route, &p, true));
            check_fields(&rec).unwrap();
            let text = serde_json::to_string(&rec).unwrap();
            for secret in [
                "hunter2",
                "password",
                "alice",
                "example.com",
                "%40",
                "46701234567",
                "+46 70",
                "phone",
                "email",
                "COOKIEVALUE123",
                "SETCOOKIE999",
                "session",
                "YWxpY2U6aHVudGVyMg",
                "Basic",
                "Mozilla",
                "203.0.113.77",
                "token",
                "charset",
            ] {
                assert!(!text.contains(secret), "{secret:?} leaked into {text}");
            }
        }
    }

    #[test]
    fn matched_record_fields() {
        let ex = exchange(TARGET, Some(200));
        let m = table().match_request("GET", TARGET).unwrap();
        let p = proc_info();
        let rec = build(&ctx(&ex, Some(&m), &p, true));
        let want = json!({
            "@timestamp": "2023-11-14T22:13:20.123456Z",
            "event": {
                "id": "ev-1",
                "kind": "event",
                "category": ["web"],
                "type": ["access"],
                "dataset": "sparbar.access",
                "start": "2023-11-14T22:13:20.123456Z",
                "end": "2023-11-14T22:13:20.125956Z",
                "duration": 2_500_000,
                "outcome": "success",
            },
            "http": {
                "version": "1.1",
                "request": {
                    "method": "GET",
                    "body": { "bytes": ex.request.body.wire_len },
                    "mime_type": "application/json",
                },
                "response": {
                    "status_code": 200,
                    "body": { "bytes": 1234 },
                    "mime_type": "application/json",
                },
                "route": "/api/addressbook/persons/{id}",
            },
            "url": { "path": "/api/addressbook/persons/42", "query": "page=2" },
            "source": { "ip": "2001:db8::7", "port": 51234 },
            "server": { "ip": "10.0.0.5", "port": 443 },
            "network": { "transport": "tcp", "protocol": "http" },
            "tls": { "established": true },
            "process": { "pid": 1234, "name": "nginx", "executable": "/usr/sbin/nginx" },
            "service": { "name": "nginx" },
            "host": { "name": "web-1" },
            "sparbar": {
                "route": { "name": "abook.person", "params": { "id": "42" } },
                "connection": { "id": "1234:7:99" },
                "capture": {
                    "complete": true,
                    "request_bytes_missing": 0,
                    "response_bytes_missing": 0,
                    "reasons": [],
                },
                "query": { "dropped": 4 },
            },
        });
        assert_eq!(rec, want);
        assert!(serde_json::to_string(&rec)
            .unwrap()
            .starts_with("{\"@timestamp\":"));
    }

    #[test]
    fn unmatched_no_response_plaintext() {
        let ex = Exchange {
            request: Request {
                method: "POST".into(),
                target: "http://h/a/./b/../c//?x=1&y=2".into(),
                minor_version: 0,
                headers: vec![h("Content-Type", "not a mime type")],
                body: Body::default(),
                first_ns: 0,
                last_ns: 0,
                wire: Default::default(),
            },
            response: None,
            completeness: Completeness::NoResponse,
            upgraded: false,
            stream_id: None,
        };
        let p = ProcessInfo {
            pid: 9,
            name: "app".into(),
            executable: None,
        };
        let mut c = ctx(&ex, None, &p, false);
        c.tuple = None;
        c.capture = CaptureInfo {
            complete: false,
            request_bytes_missing: 0,
            response_bytes_missing: 0,
            reasons: vec!["no_response"],
        };
        let rec = build(&c);
        check_fields(&rec).unwrap();
        assert_eq!(rec["event"]["outcome"], "unknown");
        assert_eq!(rec["http"]["version"], "1.0");
        assert!(rec["http"].get("route").is_none());
        assert!(rec["http"].get("response").is_none());
        assert!(rec["http"]["request"].get("mime_type").is_none());
        // The path as the server passed it on, not normalised.
        assert_eq!(rec["url"], json!({ "path": "/a/./b/../c//" }));
        assert!(rec.get("tls").is_none());
        assert!(rec.get("source").is_none());
        assert!(rec.get("server").is_none());
        assert!(rec["process"].get("executable").is_none());
        assert!(rec["sparbar"].get("route").is_none());
        assert_eq!(rec["sparbar"]["query"]["dropped"], 2);
        assert_eq!(rec["sparbar"]["capture"]["complete"], false);
        assert_eq!(rec["sparbar"]["capture"]["reasons"], json!(["no_response"]));
    }

    #[test]
    fn anomalies_of_request_and_response_are_carried_once() {
        let p = proc_info();
        let mut ex = exchange("/a", Some(400));
        assert!(build(&ctx(&ex, None, &p, true))["sparbar"]
            .get("anomalies")
            .is_none());
        ex.request.wire.anomalies = vec!["conflicting_framing", "request_line_whitespace"];
        if let Some(r) = ex.response.as_mut() {
            r.wire.anomalies = vec!["body_over_budget", "conflicting_framing"];
        }
        let rec = build(&ctx(&ex, None, &p, true));
        assert_eq!(
            rec["sparbar"]["anomalies"],
            json!([
                "conflicting_framing",
                "request_line_whitespace",
                "body_over_budget"
            ])
        );
        assert_eq!(check_fields(&rec), Ok(()));
    }

    #[test]
    fn outcome_and_asterisk_target() {
        let p = proc_info();
        let mut ex = exchange("*", Some(404));
        ex.request.method = "OPTIONS".into();
        let rec = build(&ctx(&ex, None, &p, true));
        assert_eq!(rec["event"]["outcome"], "failure");
        assert!(rec.get("url").is_none());
        assert_eq!(rec["sparbar"]["query"]["dropped"], 0);
        let ex = exchange("/", Some(399));
        assert_eq!(
            build(&ctx(&ex, None, &p, true))["event"]["outcome"],
            "success"
        );
    }

    #[test]
    fn query_is_rebuilt_encoded() {
        let t = RouteTable::new(&[RouteConfig {
            route: "GET /s".into(),
            name: "s".into(),
            query_params: vec!["q".into(), "page".into()],
            ..Default::default()
        }])
        .unwrap();
        let target = "/s?q=a+b&page=1&q=%26%3D%C3%A4&other=1";
        let m = t.match_request("GET", target).unwrap();
        let ex = exchange(target, Some(200));
        let p = proc_info();
        let rec = build(&ctx(&ex, Some(&m), &p, false));
        assert_eq!(rec["url"]["query"], "page=1&q=a+b&q=%26%3D%C3%A4");
        assert_eq!(rec["sparbar"]["query"]["dropped"], 1);
    }

    /// Crafted long paths, parameters and query values are cut to their caps and marked.
    #[test]
    fn long_request_strings_are_capped_and_marked() {
        let t = RouteTable::new(&[RouteConfig {
            route: "GET /api/addressbook/persons/{id}".into(),
            name: "abook.person".into(),
            query_params: vec!["page".into()],
            ..Default::default()
        }])
        .unwrap();
        let long = "é".repeat(40); // 80 bytes
        let target = format!("/api/addressbook/persons/{long}?page={}", "9".repeat(50));
        let ex = exchange(&target, Some(200));
        let m = t.match_request("GET", &target).unwrap();
        let p = proc_info();
        let mut c = ctx(&ex, Some(&m), &p, true);
        c.caps = FieldCaps {
            path: 40,
            param: 17,
            query_value: 20,
        };
        let mut line = Vec::new();
        let cut = write_line(&c, &mut line);
        assert_eq!(cut, vec!["url.query", "url.path", "sparbar.route.params"]);
        let rec: Value = serde_json::from_slice(&line).unwrap();
        check_fields(&rec).unwrap();
        // 40 bytes end inside an `é` (the prefix is 25 bytes): cut back to 39.
        assert_eq!(
            rec["url"]["path"],
            json!(format!("/api/addressbook/persons/{}", "é".repeat(7)))
        );
        // 17 bytes end inside an `é`: cut back to a character boundary.
        assert_eq!(
            rec["sparbar"]["route"]["params"]["id"],
            json!("é".repeat(8))
        );
        assert_eq!(
            rec["url"]["query"],
            json!(format!("page={}", "9".repeat(20)))
        );
        assert_eq!(
            rec["sparbar"]["truncated"],
            json!(["url.query", "url.path", "sparbar.route.params"])
        );
        // Within the defaults nothing is cut or marked.
        let ex = exchange("/api/addressbook/persons/42?page=2", Some(200));
        let m = t
            .match_request("GET", "/api/addressbook/persons/42?page=2")
            .unwrap();
        let rec = build(&ctx(&ex, Some(&m), &p, true));
        assert!(rec["sparbar"].get("truncated").is_none());
    }

    /// The cross-tenant attempt, the anomalies and every session hash reach the record.
    #[test]
    fn attempt_anomalies_and_session_ids() {
        use crate::attribute::attribution::{Anomaly, IdentitySource};
        let ex = exchange("/api/addressbook/persons/42", Some(200));
        let p = proc_info();
        let who = Attribution {
            session_id: None,
            session_kind: None,
            user_id: None,
            user_hash: None,
            role: None,
            tenant: None,
            source: IdentitySource::Unreadable,
            client_ip: None,
            token: None,
            login_token: None,
            session_ids: vec!["aa".into(), "bb".into()],
            anomalies: vec![Anomaly::TwoCredentials, Anomaly::UnreadableCredential],
        };
        let attempt = CrossTenantAttempt {
            named: "2".into(),
            caller: "1".into(),
            duplicate: true,
        };
        let mut c = ctx(&ex, None, &p, true);
        c.attribution = Some(&who);
        c.attempt = Some(&attempt);
        let rec = build(&c);
        check_fields(&rec).unwrap();
        assert_eq!(rec["abook"]["identity"]["source"], json!("unreadable"));
        assert_eq!(rec["abook"]["session"], json!({"ids": ["aa", "bb"]}));
        assert!(rec.get("user").is_none() && rec.get("session").is_none());
        assert_eq!(
            rec["sparbar"]["anomalies"],
            json!([
                "two_credentials",
                "unreadable_credential",
                "duplicate_tenant_param"
            ])
        );
        assert_eq!(
            rec["sparbar"]["cross_tenant_attempt"],
            json!({"named": "2", "caller": "1"})
        );
    }

    #[test]
    fn check_fields_rejects_extras() {
        assert!(check_fields(&json!({"event": {"id": "x"}})).is_ok());
        assert_eq!(
            check_fields(&json!({"user_agent": {"original": "x"}})),
            Err(RecordError::UnexpectedField {
                path: "user_agent".into()
            })
        );
        assert!(check_fields(&json!({"http": {"request": {"headers": {}}}})).is_err());
        assert!(check_fields(&json!({"event": "flat"})).is_err());
        assert!(check_fields(&json!([])).is_err());
        assert!(check_fields(&json!({"sparbar": {"route": {"params": {"any": "1"}}}})).is_ok());
    }

    #[test]
    fn timestamps() {
        let cases = [
            (0, "1970-01-01T00:00:00.000000Z"),
            (951_782_400_000_000_000, "2000-02-29T00:00:00.000000Z"),
            (1_709_164_800_000_000_000, "2024-02-29T00:00:00.000000Z"),
            (1_700_000_000_123_456_789, "2023-11-14T22:13:20.123456Z"),
            (4_102_444_799_999_999_999, "2099-12-31T23:59:59.999999Z"),
            (u64::MAX, "2554-07-21T23:34:33.709551Z"),
        ];
        for (ns, want) in cases {
            assert_eq!(rfc3339_micros(ns), want, "{ns}");
        }
    }

    #[test]
    fn timestamps_are_monotonic_by_day() {
        // Every day boundary over ~600 years moves the date forward by exactly one day.
        let mut prev = civil_from_days(0);
        for day in 1..(600 * 366) {
            let cur = civil_from_days(day);
            let next_expected = if cur.2 == 1 {
                cur.1 == prev.1 % 12 + 1 && (cur.1 != 1 || cur.0 == prev.0 + 1)
            } else {
                cur == (prev.0, prev.1, prev.2 + 1)
            };
            assert!(next_expected, "{prev:?} -> {cur:?}");
            prev = cur;
        }
    }
}
