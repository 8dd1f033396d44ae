//! The `[detection]` table and the `[[rules]]`: which calls are watched, the detectors with their
//! thresholds and windows, allowlists, shadow mode and block durations.

use std::{collections::BTreeMap, time::Duration};

use serde::Deserialize;

use super::{
    errors::Problems,
    identity::Cidr,
    values::{format_duration, has_control, parse_duration},
};

pub const DEFAULT_MAX_TRACKED: usize = 100_000;
pub const DEFAULT_MAX_TRACKED_UNAUTHENTICATED: usize = 20_000;
/// How far apart two ids may be for the second to count as a step of an id walk.
pub const DEFAULT_MAX_GAP: u64 = 16;
/// The anomaly names the agent reports on an access (the record's anomaly list and the HTTP
/// parser's anomalies), for `kind = "anomaly"` rules. A name added to a record's anomalies must
/// be added here too, or check-config refuses rules that name it.
pub const KNOWN_ANOMALIES: &[&str] = &[
    // Attribution and parsing of the request (issue 12).
    "unreadable_credential",
    "two_credentials",
    "conflicting_framing",
    // A route found only on the normalised path (`attribute::routes`).
    "path_normalised",
    // The HTTP parser's anomalies on the connection (`http_anomalies_total{reason}`).
    "malformed_request_line",
    "malformed_status_line",
    "malformed_headers",
    "header_too_large",
    "bad_content_length",
    "bad_transfer_encoding",
    "content_length_with_chunked",
    "bad_chunk_size",
    "bad_chunk_terminator",
    "gap_resync",
    "gap_in_body",
    "truncated_at_close",
    "response_lost",
    "pairing_uncertain",
    "unpaired_response",
    "response_without_request",
    "pipeline_overflow",
    "framing_guess_wrong",
    "h2_bad_preface",
    "h2_gap",
    "h2_midstream",
    "h2_desync",
    "h2_protocol_error",
    "h2_continuation_expected",
    "h2_header_block_too_large",
    "h2_hpack_error",
    "h2_too_many_streams",
    "h2_data_on_unknown_stream",
    "h2_push_promise",
    "h2_response_before_request",
    "h2_response_without_request",
    "h2_refused_by_goaway",
    "h2_stream_reset",
    "h2_malformed_headers",
    "h2_uppercase_header_name",
    "h2_connection_header",
    "br_error",
    "tls_record_on_plaintext",
    "gzip_error",
    "deflate_error",
    "data_after_close",
    "request_trailers",
    "body_over_budget",
    "request_head_cut",
    // Leniencies: what the agent accepted as the servers do (`http::Oddity`).
    "request_line_whitespace",
    "method_not_uppercase",
    "http09_request",
    "bad_version",
    "control_byte_in_target",
    "non_utf8_target",
    "bare_lf",
    "control_byte_in_header",
    "ignored_header",
    "invalid_header_name",
    "header_without_colon",
    "obs_fold",
    "duplicate_header",
    "several_cookie_headers",
];
pub const DEFAULT_IDLE_EXPIRY: Duration = Duration::from_secs(48 * 3600);
const MAX_MAX_TRACKED: i64 = 10_000_000;

/// What a rate rule counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Calls on the rule's routes.
    Requests,
    /// Persons disclosed (a person read twice counts twice).
    Persons,
    /// Distinct persons disclosed.
    DistinctPersons,
    /// Calls answered 4xx.
    Errors,
    /// Successful answers of disclosure routes the agent could not read (persons unknown).
    UnreadableAnswers,
}

impl Metric {
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Requests => "requests",
            Metric::Persons => "persons",
            Metric::DistinctPersons => "distinct_persons",
            Metric::Errors => "errors",
            Metric::UnreadableAnswers => "unreadable_answers",
        }
    }
}

/// Whose calls a rule adds up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum By {
    User,
    Session,
    ClientIp,
    /// All accounts of one tenant together (several accounts covering a school).
    Tenant,
}

impl By {
    pub fn as_str(self) -> &'static str {
        match self {
            By::User => "user",
            By::Session => "session",
            By::ClientIp => "client_ip",
            By::Tenant => "tenant",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum RuleKind {
    /// `metric` over `window` above `limit` (or the caller role's limit).
    Rate {
        metric: Metric,
        window: Duration,
        limit: u64,
        role_limits: BTreeMap<String, u64>,
    },
    /// A successful answer carrying persons outside the caller's tenant; when the caller's
    /// tenant is not known, answers of one key that span two tenants or more.
    CrossTenant,
    /// An id walk in any order: more than `limit` calls in `window` asking for a new id within
    /// `max_gap` of an id asked for before in the window; or, with `distinct_limit`, more
    /// distinct ids than that in the window.
    SequentialIds {
        param: String,
        window: Duration,
        limit: u64,
        max_gap: u64,
        distinct_limit: Option<u64>,
    },
    /// More than `limit` calls in `window` carrying one of the named anomalies (`*`: any).
    Anomaly {
        names: Vec<String>,
        window: Duration,
        limit: u64,
    },
    /// A query parameter above `limit` (page sizes, page numbers beyond what the platform's own
    /// client uses).
    QueryAbove { param: String, limit: u64 },
    /// 4xx answers / calls over `window` at or above `ratio`, once at least `min_requests`.
    ErrorRatio {
        window: Duration,
        ratio: f64,
        min_requests: u64,
    },
}

/// What follows a firing.
#[derive(Debug, Clone, PartialEq, Eq, Copy)]
pub enum BlockScope {
    User,
    Session,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub id: String,
    pub name: String,
    pub kind: RuleKind,
    pub by: By,
    /// Route names (a trailing `*` matches a prefix); empty: the routes with a disclosure rule.
    pub routes: Vec<String>,
    /// Alert and record, never enforce.
    pub shadow: bool,
    /// Block durations by offence: the first firing blocks for `block[0]`, the next for
    /// `block[1]` …, the last repeating. Empty: alert only.
    pub block: Vec<Duration>,
    pub scope: BlockScope,
}

impl Rule {
    pub fn matches_route(&self, route: &str, has_disclosure: bool) -> bool {
        if self.routes.is_empty() {
            // A crafted call is a signal on any route, not only those that disclose.
            return has_disclosure || matches!(self.kind, RuleKind::Anomaly { .. });
        }
        self.routes.iter().any(|r| match r.strip_suffix('*') {
            Some(p) => route.starts_with(p),
            None => r == route,
        })
    }

    pub fn window(&self) -> Option<Duration> {
        match &self.kind {
            RuleKind::Rate { window, .. }
            | RuleKind::SequentialIds { window, .. }
            | RuleKind::ErrorRatio { window, .. }
            | RuleKind::Anomaly { window, .. } => Some(*window),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DetectionConfig {
    /// Target names (`service.name`) whose calls are watched and whose connections are
    /// enforced on: the platform's edge (behind it, the same call is seen again). Empty: all.
    pub services: Vec<String>,
    pub allow_users: Vec<String>,
    pub allow_roles: Vec<String>,
    pub allow_clients: Vec<Cidr>,
    /// Keys (users, sessions, addresses) tracked at once; past it the least recently active are
    /// evicted, counted.
    pub max_tracked: usize,
    /// Unauthenticated callers (no user, and no session the platform ever accepted: 401/403
    /// floods with random cookies) are tracked by client address in a table of their own, this
    /// large, so they can never evict an authenticated key.
    pub max_tracked_unauthenticated: usize,
    /// A key with no call for this long is forgotten.
    pub idle_expiry: Duration,
    /// Enforce decisions in the kernel (drop responses, reset connections).
    pub enforce: bool,
    /// Loopback address of the decision feed (`GET /decisions`, `GET /decisions/stream`).
    pub feed_listen: Option<std::net::SocketAddr>,
}

impl Default for DetectionConfig {
    fn default() -> Self {
        DetectionConfig {
            services: Vec::new(),
            allow_users: Vec::new(),
            allow_roles: Vec::new(),
            allow_clients: Vec::new(),
            max_tracked: DEFAULT_MAX_TRACKED,
            max_tracked_unauthenticated: DEFAULT_MAX_TRACKED_UNAUTHENTICATED,
            idle_expiry: DEFAULT_IDLE_EXPIRY,
            enforce: true,
            feed_listen: None,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDetection {
    services: Option<Vec<String>>,
    allow_users: Option<Vec<String>>,
    allow_roles: Option<Vec<String>>,
    allow_clients: Option<Vec<String>>,
    max_tracked: Option<i64>,
    max_tracked_unauthenticated: Option<i64>,
    idle_expiry: Option<String>,
    enforce: Option<bool>,
    feed_listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    id: Option<String>,
    name: Option<String>,
    kind: Option<String>,
    metric: Option<String>,
    window: Option<String>,
    limit: Option<i64>,
    role_limits: Option<BTreeMap<String, i64>>,
    param: Option<String>,
    ratio: Option<f64>,
    min_requests: Option<i64>,
    max_gap: Option<i64>,
    distinct_limit: Option<i64>,
    anomalies: Option<Vec<String>>,
    by: Option<String>,
    routes: Option<Vec<String>>,
    shadow: Option<bool>,
    block: Option<Vec<String>>,
    scope: Option<String>,
}

fn duration(p: &mut Problems, key: &str, v: Option<&str>) -> Option<Duration> {
    let v = v?;
    match parse_duration(v) {
        Ok(d) if d >= Duration::from_secs(1) => Some(d),
        Ok(d) => {
            p.push(
                key,
                format!(
                    "{v:?} ({}) is too short; expected at least 1s",
                    format_duration(d)
                ),
            );
            None
        }
        Err(e) => {
            p.push(key, e);
            None
        }
    }
}

pub(super) fn check_detection(
    raw: RawDetection,
    services: &[&str],
    p: &mut Problems,
) -> DetectionConfig {
    let mut c = DetectionConfig::default();
    for (i, s) in raw.services.into_iter().flatten().enumerate() {
        if !services.contains(&s.as_str()) {
            p.push(
                format!("detection.services[{i}]"),
                format!(
                    "{s:?} is not the name of any [[targets]] entry; expected one of {}",
                    services
                        .iter()
                        .map(|n| format!("{n:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
        c.services.push(s);
    }
    c.allow_users = raw.allow_users.unwrap_or_default();
    c.allow_roles = raw.allow_roles.unwrap_or_default();
    for (i, a) in raw.allow_clients.into_iter().flatten().enumerate() {
        match Cidr::parse(&a) {
            Some(n) => c.allow_clients.push(n),
            None => p.push(
                format!("detection.allow_clients[{i}]"),
                format!("{a:?} is not an address or address block; expected something like \"10.0.0.0/8\""),
            ),
        }
    }
    c.max_tracked = super::values::check_count(
        p,
        "detection.max_tracked",
        raw.max_tracked,
        DEFAULT_MAX_TRACKED as i64,
        MAX_MAX_TRACKED,
    ) as usize;
    c.max_tracked_unauthenticated = super::values::check_count(
        p,
        "detection.max_tracked_unauthenticated",
        raw.max_tracked_unauthenticated,
        DEFAULT_MAX_TRACKED_UNAUTHENTICATED as i64,
        MAX_MAX_TRACKED,
    ) as usize;
    if let Some(d) = duration(p, "detection.idle_expiry", raw.idle_expiry.as_deref()) {
        c.idle_expiry = d;
    }
    c.enforce = raw.enforce.unwrap_or(true);
    if let Some(f) = raw.feed_listen {
        match f.parse::<std::net::SocketAddr>() {
            Ok(a) if a.ip().is_loopback() => c.feed_listen = Some(a),
            _ => p.push(
                "detection.feed_listen",
                format!("{f:?} is not a loopback address and port; expected something like \"127.0.0.1:9471\" (the feed is for a proxy on the same host)"),
            ),
        }
    }
    c
}

pub(super) fn check_rules(raw: Vec<RawRule>, route_names: &[&str], p: &mut Problems) -> Vec<Rule> {
    let mut out: Vec<Rule> = Vec::new();
    for (i, r) in raw.into_iter().enumerate() {
        let k = format!("rules[{i}]");
        let id = match r.id {
            Some(id) if !id.trim().is_empty() && !has_control(&id) => id,
            _ => {
                p.push(
                    format!("{k}.id"),
                    "is missing or empty; expected a short unique id like \"abook-rate-1h\"",
                );
                String::new()
            }
        };
        if !id.is_empty() && out.iter().any(|o| o.id == id) {
            p.push(
                format!("{k}.id"),
                format!("{id:?} is the id of an earlier rule; expected unique ids"),
            );
        }
        let name = r.name.unwrap_or_else(|| id.clone());
        let window = duration(p, &format!("{k}.window"), r.window.as_deref());
        let need_window = |p: &mut Problems, w: Option<Duration>| -> Duration {
            w.unwrap_or_else(|| {
                p.push(
                    format!("{k}.window"),
                    "is missing; expected a duration like \"1m\", \"1h\" or \"168h\"",
                );
                Duration::from_secs(60)
            })
        };
        let need_limit = |p: &mut Problems, l: Option<i64>| -> u64 {
            match l {
                Some(n) if n >= 0 => n as u64,
                Some(n) => {
                    p.push(
                        format!("{k}.limit"),
                        format!("{n} is negative; expected a whole number of 0 or more"),
                    );
                    0
                }
                None => {
                    p.push(
                        format!("{k}.limit"),
                        "is missing; expected the highest value that is still normal, like 300",
                    );
                    0
                }
            }
        };
        let kind = match r.kind.as_deref() {
            Some("rate") => {
                let metric = match r.metric.as_deref() {
                    Some("requests") => Metric::Requests,
                    Some("persons") => Metric::Persons,
                    Some("distinct_persons") => Metric::DistinctPersons,
                    Some("errors") => Metric::Errors,
                    Some("unreadable_answers") => Metric::UnreadableAnswers,
                    other => {
                        p.push(
                            format!("{k}.metric"),
                            format!("{} is not a metric; expected \"requests\", \"persons\", \"distinct_persons\", \"errors\" or \"unreadable_answers\"", other.map(|o| format!("{o:?}")).unwrap_or_else(|| "(missing)".into())),
                        );
                        Metric::Requests
                    }
                };
                let mut role_limits = BTreeMap::new();
                for (role, l) in r.role_limits.unwrap_or_default() {
                    if l < 0 {
                        p.push(
                            format!("{k}.role_limits.{role}"),
                            format!("{l} is negative; expected a whole number"),
                        );
                    } else {
                        role_limits.insert(role, l as u64);
                    }
                }
                RuleKind::Rate {
                    metric,
                    window: need_window(p, window),
                    limit: need_limit(p, r.limit),
                    role_limits,
                }
            }
            Some("cross_tenant") => RuleKind::CrossTenant,
            Some("sequential_ids") => {
                RuleKind::SequentialIds {
                    param: r.param.clone().unwrap_or_else(|| "id".into()),
                    window: need_window(p, window),
                    limit: need_limit(p, r.limit),
                    max_gap: match r.max_gap {
                        None => DEFAULT_MAX_GAP,
                        Some(n) if n >= 1 => n as u64,
                        Some(n) => {
                            p.push(
                            format!("{k}.max_gap"),
                            format!("{n} is too small; expected a whole number of 1 or more (1: only neighbouring ids make a walk)"),
                        );
                            DEFAULT_MAX_GAP
                        }
                    },
                    distinct_limit: match r.distinct_limit {
                        None => None,
                        Some(n) if n >= 1 => Some(n as u64),
                        Some(n) => {
                            p.push(
                            format!("{k}.distinct_limit"),
                            format!("{n} is too small; expected a whole number of 1 or more, like 200"),
                        );
                            None
                        }
                    },
                }
            }
            Some("anomaly") => {
                let names = r.anomalies.clone().unwrap_or_default();
                if names.is_empty() {
                    p.push(
                        format!("{k}.anomalies"),
                        "is missing or empty; expected anomaly names like [\"unreadable_credential\", \"two_credentials\"], or [\"*\"] for any",
                    );
                }
                for (j, n) in names.iter().enumerate() {
                    if n != "*" && !KNOWN_ANOMALIES.contains(&n.as_str()) {
                        p.push(
                            format!("{k}.anomalies[{j}]"),
                            format!(
                                "{n:?} is not an anomaly the agent reports; expected \"*\" or one of {}",
                                KNOWN_ANOMALIES.join(", ")
                            ),
                        );
                    }
                }
                RuleKind::Anomaly {
                    names,
                    window: need_window(p, window),
                    limit: need_limit(p, r.limit),
                }
            }
            Some("query_above") => RuleKind::QueryAbove {
                param: match r.param.clone() {
                    Some(x) => x,
                    None => {
                        p.push(
                            format!("{k}.param"),
                            "is missing; expected the query parameter, like \"pageSize\"",
                        );
                        String::new()
                    }
                },
                limit: need_limit(p, r.limit),
            },
            Some("error_ratio") => RuleKind::ErrorRatio {
                window: need_window(p, window),
                ratio: match r.ratio {
                    Some(x) if (0.0..=1.0).contains(&x) && x > 0.0 => x,
                    other => {
                        p.push(format!("{k}.ratio"), format!("{} is not a ratio; expected a number above 0 and at most 1, like 0.5", other.map(|o| o.to_string()).unwrap_or_else(|| "(missing)".into())));
                        0.5
                    }
                },
                min_requests: r.min_requests.unwrap_or(20).max(1) as u64,
            },
            other => {
                p.push(
                    format!("{k}.kind"),
                    format!("{} is not a rule kind; expected \"rate\", \"cross_tenant\", \"sequential_ids\", \"query_above\", \"error_ratio\" or \"anomaly\"", other.map(|o| format!("{o:?}")).unwrap_or_else(|| "(missing)".into())),
                );
                RuleKind::CrossTenant
            }
        };
        let by = match r.by.as_deref() {
            None | Some("user") => By::User,
            Some("session") => By::Session,
            Some("client_ip") => By::ClientIp,
            Some("tenant") => By::Tenant,
            Some(o) => {
                p.push(format!("{k}.by"), format!("{o:?} is not a choice; expected \"user\", \"session\", \"client_ip\" or \"tenant\""));
                By::User
            }
        };
        let routes = r.routes.unwrap_or_default();
        for (j, rt) in routes.iter().enumerate() {
            let known = match rt.strip_suffix('*') {
                Some(pre) => route_names.iter().any(|n| n.starts_with(pre)),
                None => route_names.contains(&rt.as_str()),
            };
            if !known {
                p.push(format!("{k}.routes[{j}]"), format!("{rt:?} matches no [[routes]] name; expected a route name, or a prefix ending in '*' like \"abook.*\""));
            }
        }
        let mut block = Vec::new();
        for (j, b) in r.block.into_iter().flatten().enumerate() {
            block.extend(duration(p, &format!("{k}.block[{j}]"), Some(&b)));
        }
        let scope = match r.scope.as_deref() {
            None | Some("user") => BlockScope::User,
            Some("session") => BlockScope::Session,
            Some(o) => {
                p.push(format!("{k}.scope"), format!("{o:?} is not a choice; expected \"user\" (all their sessions) or \"session\""));
                BlockScope::User
            }
        };
        out.push(Rule {
            id,
            name,
            kind,
            by,
            routes,
            shadow: r.shadow.unwrap_or(false),
            block,
            scope,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::config::{parse, Metric, RuleKind};

    const BASE: &str = r#"
[agent]
host_name = "web-1"
[[targets]]
exe = "/usr/sbin/nginx"
[[routes]]
route = "GET /api/persons/{id}"
name = "abook.person"
"#;

    fn problems(extra: &str) -> Vec<String> {
        crate::config::problem_lines(&format!("{BASE}{extra}"))
    }

    #[test]
    fn rules_parse() {
        let c = parse(
            &format!(
                "{BASE}{}",
                r#"
[detection]
services = ["nginx"]
allow_users = ["svc"]
[[rules]]
id = "r1"
kind = "rate"
metric = "distinct_persons"
window = "24h"
limit = 500
role_limits = { teacher = 3000 }
block = ["15m", "1h"]
[[rules]]
id = "r2"
kind = "cross_tenant"
shadow = true
"#
            ),
            "s.toml",
        )
        .unwrap();
        assert_eq!(c.detection.services, vec!["nginx"]);
        assert_eq!(c.rules.len(), 2);
        match &c.rules[0].kind {
            RuleKind::Rate {
                metric,
                limit,
                role_limits,
                ..
            } => {
                assert_eq!(*metric, Metric::DistinctPersons);
                assert_eq!(*limit, 500);
                assert_eq!(role_limits["teacher"], 3000);
            }
            k => panic!("{k:?}"),
        }
        assert_eq!(c.rules[0].block.len(), 2);
        assert!(c.rules[1].shadow);
    }

    #[test]
    fn rule_mistakes_are_explained() {
        let p = problems(
            r#"
[detection]
services = ["ngnix"]
allow_clients = ["10.0.0.0/99"]
[[rules]]
id = "a"
kind = "rate"
metric = "reqs"
[[rules]]
id = "a"
kind = "sequential"
routes = ["abook.nope"]
block = ["soon"]
[[rules]]
id = "c"
kind = "error_ratio"
window = "1m"
ratio = 2.0
"#,
        );
        for w in [
            "detection.services[0]: \"ngnix\" is not the name of any [[targets]] entry; expected one of \"nginx\"",
            "detection.allow_clients[0]: \"10.0.0.0/99\" is not an address",
            "rules[0].metric: \"reqs\" is not a metric",
            "rules[0].window: is missing",
            "rules[0].limit: is missing",
            "rules[1].id: \"a\" is the id of an earlier rule",
            "rules[1].kind: \"sequential\" is not a rule kind",
            "rules[1].routes[0]: \"abook.nope\" matches no [[routes]] name",
            "rules[1].block[0]:",
            "rules[2].ratio: 2 is not a ratio",
        ] {
            assert!(p.iter().any(|l| l.starts_with(w)), "missing {w:?} in {p:#?}");
        }
    }

    #[test]
    fn new_rule_kinds_and_keys_parse() {
        let c = parse(
            &format!(
                "{BASE}{}",
                r#"
[detection]
max_tracked_unauthenticated = 5000
[[rules]]
id = "walk"
kind = "sequential_ids"
window = "10m"
limit = 20
max_gap = 50
distinct_limit = 300
[[rules]]
id = "walk-old"
kind = "sequential_ids"
window = "1m"
limit = 5
[[rules]]
id = "crafted"
kind = "anomaly"
anomalies = ["unreadable_credential", "two_credentials", "conflicting_framing"]
window = "1h"
limit = 0
block = ["15m"]
[[rules]]
id = "unread"
kind = "rate"
metric = "unreadable_answers"
window = "1h"
limit = 20
"#
            ),
            "s.toml",
        )
        .unwrap();
        assert_eq!(c.detection.max_tracked_unauthenticated, 5000);
        assert_eq!(
            c.rules[0].kind,
            RuleKind::SequentialIds {
                param: "id".into(),
                window: std::time::Duration::from_secs(600),
                limit: 20,
                max_gap: 50,
                distinct_limit: Some(300),
            }
        );
        // An existing rule keeps working: walks in any order within 16 ids, no distinct limit.
        assert_eq!(
            c.rules[1].kind,
            RuleKind::SequentialIds {
                param: "id".into(),
                window: std::time::Duration::from_secs(60),
                limit: 5,
                max_gap: super::DEFAULT_MAX_GAP,
                distinct_limit: None,
            }
        );
        assert_eq!(
            c.rules[2].kind,
            RuleKind::Anomaly {
                names: vec![
                    "unreadable_credential".into(),
                    "two_credentials".into(),
                    "conflicting_framing".into()
                ],
                window: std::time::Duration::from_secs(3600),
                limit: 0,
            }
        );
        // Anomaly rules watch every route when none is named.
        assert!(c.rules[2].matches_route("anything", false));
        assert!(!c.rules[0].matches_route("anything", false));
        assert_eq!(
            c.rules[2].window(),
            Some(std::time::Duration::from_secs(3600))
        );
        match &c.rules[3].kind {
            RuleKind::Rate { metric, .. } => assert_eq!(*metric, Metric::UnreadableAnswers),
            k => panic!("{k:?}"),
        }
        assert_eq!(c.detection.max_tracked, super::DEFAULT_MAX_TRACKED);
    }

    #[test]
    fn new_rule_mistakes_are_explained() {
        let p = problems(
            r#"
[detection]
max_tracked_unauthenticated = -1
[[rules]]
id = "a"
kind = "anomaly"
anomalies = ["two_credentials", "two_credential"]
window = "1h"
limit = 1
[[rules]]
id = "b"
kind = "anomaly"
window = "1h"
limit = 1
[[rules]]
id = "c"
kind = "sequential_ids"
window = "1m"
limit = 5
max_gap = 0
distinct_limit = 0
"#,
        );
        for w in [
            "detection.max_tracked_unauthenticated:",
            "rules[0].anomalies[1]: \"two_credential\" is not an anomaly the agent reports; expected \"*\" or one of unreadable_credential, two_credentials,",
            "rules[1].anomalies: is missing or empty",
            "rules[2].max_gap: 0 is too small",
            "rules[2].distinct_limit: 0 is too small",
        ] {
            assert!(p.iter().any(|l| l.starts_with(w)), "missing {w:?} in {p:#?}");
        }
        assert_eq!(p.len(), 5, "{p:#?}");
        // Every leniency the parser records can be named in a rule (a new one fails to
        // compile here until it is listed).
        use crate::http::Oddity as O;
        let all = [
            O::RequestLineWhitespace,
            O::MethodNotUppercase,
            O::Http09Request,
            O::BadVersion,
            O::ControlByteInTarget,
            O::NonUtf8Target,
            O::BareLf,
            O::ControlByteInHeader,
            O::IgnoredHeader,
            O::InvalidHeaderName,
            O::HeaderWithoutColon,
            O::ObsFold,
            O::DuplicateHeader,
            O::SeveralCookieHeaders,
        ];
        for o in all {
            match o {
                O::RequestLineWhitespace
                | O::MethodNotUppercase
                | O::Http09Request
                | O::BadVersion
                | O::ControlByteInTarget
                | O::NonUtf8Target
                | O::BareLf
                | O::ControlByteInHeader
                | O::IgnoredHeader
                | O::InvalidHeaderName
                | O::HeaderWithoutColon
                | O::ObsFold
                | O::DuplicateHeader
                | O::SeveralCookieHeaders => {}
            }
            assert!(super::KNOWN_ANOMALIES.contains(&o.reason()), "{o:?}");
        }
        // Every anomaly the HTTP parser reports can be named in a rule.
        for a in [
            "malformed_request_line",
            "content_length_with_chunked",
            "bad_transfer_encoding",
            "header_too_large",
            "conflicting_framing",
            "request_trailers",
            "body_over_budget",
        ] {
            assert!(super::KNOWN_ANOMALIES.contains(&a), "{a}");
        }
    }
}
