//! The Prometheus endpoint: the agent's counters, the kernel's, and what it traces, as
//! `GET /metrics` in the text exposition format 0.0.4. Off unless `agent.metrics_listen` is set.
//! The agent renders the page once a second from its own loop; the HTTP side only hands out the
//! last rendering, so a slow or stuck scraper never holds up the pipeline.

use std::{
    collections::{BTreeMap, VecDeque},
    fmt::Write as _,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use bytes::Bytes;
use hyper::{body::Incoming, Method, Request, Response};
use tokio::net::TcpListener;

use crate::{
    ops::serve::{self, Body, Limits},
    stats::{Metric, Stats},
};

/// Every family name starts with this.
pub const PREFIX: &str = "sparbar_";
/// The media type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetricsError {
    #[error("{0:?} is not a metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)")]
    BadName(String),
    #[error(
        "{name}: {label:?} is not a label name ([a-zA-Z_][a-zA-Z0-9_]*, not starting with __)"
    )]
    BadLabel { name: String, label: String },
    #[error("{0}: the labels cannot be read (expected name{{label=\"value\",...}})")]
    BadLabels(String),
    #[error("{0}: a counter's name ends in _total, a gauge's does not")]
    KindMismatch(String),
    #[error("{0}: this label set is already in the family")]
    Duplicate(String),
}

pub use crate::stats::Kind;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    /// Counters and counts: exact, whatever their size.
    Int(u64),
    Float(f64),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Value::Int(n) => write!(f, "{n}"),
            Value::Float(x) if x.is_nan() => f.write_str("NaN"),
            Value::Float(x) if x == f64::INFINITY => f.write_str("+Inf"),
            Value::Float(x) if x == f64::NEG_INFINITY => f.write_str("-Inf"),
            Value::Float(x) => write!(f, "{x}"),
        }
    }
}

struct Family {
    kind: Kind,
    help: String,
    /// Label sets in the order they were added, each with its value; `keys` catches repeats.
    samples: Vec<(Vec<(String, String)>, Value)>,
    keys: std::collections::BTreeSet<Vec<(String, String)>>,
}

/// A page being built: families by name, each with its HELP, TYPE and samples.
#[derive(Default)]
pub struct Exposition {
    families: BTreeMap<String, Family>,
}

fn name_ok(n: &str) -> bool {
    let mut c = n.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn label_ok(n: &str) -> bool {
    let mut c = n.chars();
    !n.starts_with("__")
        && c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A label value as the format wants it: backslash, double quote and line feed escaped.
pub fn escape_label(v: &str) -> String {
    let mut o = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o
}

/// HELP text: backslash and line feed escaped.
pub fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Label names and values, in order.
pub type Labels = Vec<(String, String)>;

/// Splits one of the agent's counter names, `noun_verb_total{a="x",b="y"}`, into the name and
/// its labels. The agent writes label values without escaping, so a value ends at the `"` that
/// is followed by `,label="` or by the closing `}` at the very end.
pub fn split_key(key: &str) -> Result<(&str, Labels), MetricsError> {
    let Some(open) = key.find('{') else {
        return Ok((key, Vec::new()));
    };
    let bad = || MetricsError::BadLabels(key.to_string());
    let name = &key[..open];
    let mut rest = key[open + 1..].strip_suffix('}').ok_or_else(bad)?;
    let mut labels = Vec::new();
    while !rest.is_empty() {
        let eq = rest.find("=\"").ok_or_else(bad)?;
        let label = &rest[..eq];
        let after = &rest[eq + 2..];
        let end = after
            .match_indices('"')
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &after[i + 1..];
                tail.is_empty()
                    || tail
                        .strip_prefix(',')
                        .is_some_and(|t| t.find("=\"").is_some_and(|e| label_ok(&t[..e])))
            })
            .ok_or_else(bad)?;
        labels.push((label.to_string(), after[..end].to_string()));
        rest = after[end + 1..]
            .strip_prefix(',')
            .unwrap_or(&after[end + 1..]);
    }
    Ok((name, labels))
}

impl Exposition {
    /// Adds one sample. The first sample of a family sets its HELP text and type.
    pub fn add(
        &mut self,
        name: &str,
        kind: Kind,
        help: &str,
        labels: &[(&str, &str)],
        value: Value,
    ) -> Result<(), MetricsError> {
        let labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.add_owned(name, kind, help, labels, value)
    }

    fn add_owned(
        &mut self,
        name: &str,
        kind: Kind,
        help: &str,
        labels: Vec<(String, String)>,
        value: Value,
    ) -> Result<(), MetricsError> {
        if !name_ok(name) {
            return Err(MetricsError::BadName(name.to_string()));
        }
        if Kind::of(name) != kind {
            return Err(MetricsError::KindMismatch(name.to_string()));
        }
        if let Some((l, _)) = labels.iter().find(|(l, _)| !label_ok(l)) {
            return Err(MetricsError::BadLabel {
                name: name.to_string(),
                label: l.clone(),
            });
        }
        let mut key = labels.clone();
        key.sort();
        if key.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err(MetricsError::BadLabels(name.to_string()));
        }
        let f = self
            .families
            .entry(name.to_string())
            .or_insert_with(|| Family {
                kind,
                help: help.to_string(),
                samples: Vec::new(),
                keys: Default::default(),
            });
        if !f.keys.insert(key) {
            return Err(MetricsError::Duplicate(name.to_string()));
        }
        f.samples.push((labels, value));
        Ok(())
    }

    /// Adds one of the agent's (or the kernel's) counters by its name in `stats.json`:
    /// prefixed `sparbar_`, a counter when it ends in `_total`, a gauge otherwise.
    pub fn add_stat(&mut self, key: &str, value: u64) -> Result<(), MetricsError> {
        let (base, labels) = split_key(key)?;
        let name = format!("{PREFIX}{base}");
        self.add_owned(&name, kind(base), help(base), labels, Value::Int(value))
    }

    /// The page: families in name order, `# HELP` and `# TYPE` once each, then the samples.
    pub fn render(&self) -> String {
        let mut o = String::new();
        for (name, f) in &self.families {
            let _ = writeln!(o, "# HELP {name} {}", escape_help(&f.help));
            let _ = writeln!(o, "# TYPE {name} {}", f.kind.as_str());
            for (labels, v) in &f.samples {
                o.push_str(name);
                if !labels.is_empty() {
                    o.push('{');
                    for (i, (k, val)) in labels.iter().enumerate() {
                        if i > 0 {
                            o.push(',');
                        }
                        let _ = write!(o, "{k}=\"{}\"", escape_label(val));
                    }
                    o.push('}');
                }
                let _ = writeln!(o, " {v}");
            }
        }
        o
    }
}

/// HELP text of the agent's and the kernel's counters, by name without the prefix: the agent's
/// from its table ([`Metric`]), the kernel's (named in `tracer_common::COUNTER_NAMES`) here.
pub fn help(name: &str) -> &'static str {
    Metric::from_name(name).map_or_else(|| kernel_help(name), Metric::help)
}

/// The type of a counter by name without the prefix: the agent's from its table, any other's
/// (the kernel's) by its name.
pub fn kind(name: &str) -> Kind {
    Metric::from_name(name).map_or_else(|| Kind::of(name), Metric::kind)
}

/// HELP text of the kernel's counters, by name without the prefix or labels.
fn kernel_help(name: &str) -> &'static str {
    match name {
        "kernel_events_sent_total" => "Events the kernel programs put in the ring buffer.",
        "kernel_bytes_captured_total" => "Payload bytes the kernel programs captured.",
        "kernel_events_dropped_total" => "Events the kernel programs could not send, by reason.",
        "kernel_bytes_dropped_total" => {
            "Payload bytes the kernel programs could not send, by reason."
        }
        "kernel_calls_truncated_total" => {
            "Read and write calls captured only up to the per-call cap."
        }
        "kernel_ssl_fd_mapping_total" => {
            "SSL objects whose socket was found other than directly, by result."
        }
        "kernel_connections_dropped_total" => "Connections not tracked by the kernel, by reason.",
        "kernel_bytes_uncaptured_total" => {
            "Bytes sent in ways the kernel programs do not capture, by reason."
        }
        "kernel_fd_reused_without_close_total" => {
            "Socket descriptors reused without a close being seen."
        }
        "kernel_calls_dropped_total" => "Calls not captured, by reason.",
        "kernel_targets_dropped_total" => "Target processes the kernel could not add, by reason.",
        "kernel_ssl_calls_total" => "SSL_read and SSL_write calls seen.",
        "kernel_syscalls_captured_total" => "Plaintext socket calls captured.",
        "kernel_packets_blocked_total" => {
            "Packets of blocked connections dropped by the egress filter."
        }
        "kernel_requests_refused_total" => "Requests refused in the kernel for a blocked token.",
        "kernel_refusals_unenforced_total" => "Refusals the kernel could not enforce, by reason.",
        "kernel_token_scans_total" => "Requests scanned for blocked tokens.",
        "kernel_token_scans_truncated_total" => "Token scans cut short, by reason.",
        "kernel_token_scans_failed_total" => "Token scans that failed, by reason.",
        _ => "An agent counter, as in stats.json (see the README, Operations).",
    }
}

/// One TLS library (or executable with static OpenSSL) the agent attached to.
pub struct Library<'a> {
    pub path: &'a str,
    pub kind: &'a str,
    pub attached: usize,
    pub failed: usize,
}

/// Everything the page shows, gathered by the agent in its 1 s tick.
pub struct Inputs<'a> {
    pub uptime: Duration,
    pub version: &'a str,
    /// The agent's counters (`stats.json` "agent").
    pub agent: &'a BTreeMap<String, u64>,
    /// The kernel's counters (`stats.json` "kernel").
    pub kernel: &'a BTreeMap<String, u64>,
    pub libraries: Vec<Library<'a>>,
    /// Tracepoint "category:name" → attached.
    pub tracepoints: Vec<(&'a str, bool)>,
    /// Configured target name → processes traced now (0 for a target with none).
    pub targets: BTreeMap<&'a str, u64>,
    pub open_connections: u64,
    /// Decisions in force, by scope.
    pub decisions_active: BTreeMap<&'a str, u64>,
    /// Spool bytes on disk by stream, and the limit.
    pub spool_bytes: BTreeMap<String, u64>,
    pub spool_max_bytes: u64,
    pub security_pending: u64,
}

/// Builds the page. Counter names that cannot be exposed are returned beside it (the agent
/// logs each once); the rest is served.
pub fn build(i: &Inputs) -> (String, Vec<(String, MetricsError)>) {
    let mut e = Exposition::default();
    let mut bad = Vec::new();
    let g = |n: &str| format!("{PREFIX}{n}");
    let mut add = |e: &mut Exposition, n: &str, help: &str, l: &[(&str, &str)], v: Value| {
        if let Err(err) = e.add(&g(n), Kind::of(n), help, l, v) {
            bad.push((n.to_string(), err));
        }
    };
    add(&mut e, "up", "1 while the agent runs.", &[], Value::Int(1));
    add(
        &mut e,
        "uptime_seconds",
        "Seconds since the agent started.",
        &[],
        Value::Float(i.uptime.as_secs_f64()),
    );
    add(
        &mut e,
        "build_info",
        "The agent's version, as a label; always 1.",
        &[("version", i.version)],
        Value::Int(1),
    );
    for l in &i.libraries {
        let labels = [("library", l.path), ("kind", l.kind)];
        add(
            &mut e,
            "tls_probes_attached",
            "OpenSSL uprobes attached, by library.",
            &labels,
            Value::Int(l.attached as u64),
        );
        add(
            &mut e,
            "tls_probes_failed",
            "OpenSSL uprobes that could not be attached, by library.",
            &labels,
            Value::Int(l.failed as u64),
        );
    }
    for (tp, ok) in &i.tracepoints {
        add(
            &mut e,
            "tracepoint_attached",
            "1 when the kernel tracepoint is attached, 0 when it failed.",
            &[("tracepoint", tp)],
            Value::Int(u64::from(*ok)),
        );
    }
    for (t, n) in &i.targets {
        add(
            &mut e,
            "targets_traced",
            "Processes traced now, by configured target.",
            &[("target", t)],
            Value::Int(*n),
        );
    }
    add(
        &mut e,
        "connections_open",
        "Traced connections open now.",
        &[],
        Value::Int(i.open_connections),
    );
    for scope in ["user", "session"] {
        let n = i.decisions_active.get(scope).copied().unwrap_or(0);
        add(
            &mut e,
            "decisions_active",
            "Decisions in force now, by scope.",
            &[("scope", scope)],
            Value::Int(n),
        );
    }
    for (s, n) in &i.spool_bytes {
        add(
            &mut e,
            "spool_bytes",
            "Bytes of records in the spool, by stream.",
            &[("stream", s)],
            Value::Int(*n),
        );
    }
    add(
        &mut e,
        "spool_max_bytes",
        "The spool's size limit in bytes (spool.max_bytes).",
        &[],
        Value::Int(i.spool_max_bytes),
    );
    add(
        &mut e,
        "spool_security_pending_records",
        "Security records waiting for spool space.",
        &[],
        Value::Int(i.security_pending),
    );
    for (k, v) in i.kernel.iter().chain(i.agent) {
        if let Err(err) = e.add_stat(k, *v) {
            bad.push((k.clone(), err));
        }
    }
    (e.render(), bad)
}

/// Per-second samples of two counters over the last minute, for `sparbar status` rates.
pub struct Rates {
    samples: VecDeque<(Instant, u64, u64)>,
    window: Duration,
}

impl Rates {
    pub fn new(window: Duration) -> Rates {
        Rates {
            samples: VecDeque::new(),
            window,
        }
    }

    /// Adds a sample; samples older than the window (but the newest outside it) are dropped.
    pub fn push(&mut self, at: Instant, a: u64, b: u64) {
        self.samples.push_back((at, a, b));
        while self.samples.len() > 2 && at.duration_since(self.samples[1].0) >= self.window {
            self.samples.pop_front();
        }
    }

    /// Per-second rates of both counters over the samples held, and the seconds they span.
    pub fn rates(&self) -> (f64, f64, f64) {
        match (self.samples.front(), self.samples.back()) {
            (Some(f), Some(l)) if l.0 > f.0 => {
                let secs = l.0.duration_since(f.0).as_secs_f64();
                (
                    l.1.saturating_sub(f.1) as f64 / secs,
                    l.2.saturating_sub(f.2) as f64 / secs,
                    secs,
                )
            }
            _ => (0.0, 0.0, 0.0),
        }
    }
}

/// The last rendered page, shared between the agent's loop and the HTTP side.
#[derive(Clone, Default)]
pub struct Endpoint {
    page: Arc<RwLock<Bytes>>,
    stats: Arc<Stats>,
}

impl Endpoint {
    /// Counts the endpoint's failures (`metrics_failures_total`, by reason) on `stats` instead
    /// of a set of its own.
    pub fn counting(mut self, stats: Arc<Stats>) -> Self {
        self.stats = stats;
        self
    }

    pub fn publish(&self, page: String) {
        if let Ok(mut p) = self.page.write() {
            *p = page.into();
        }
    }

    fn page(&self) -> Bytes {
        self.page
            .read()
            .map(|p| p.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// Serves `GET /metrics` on `listener` until the agent stops.
    pub fn serve(&self, listener: TcpListener) -> tokio::task::JoinHandle<()> {
        let ep = self.clone();
        // A client that never finishes its scrape is let go.
        let limits = Limits {
            max_connection_time: Some(Duration::from_secs(10)),
            ..Limits::LOCAL
        };
        serve::serve(
            listener,
            limits,
            self.stats.clone(),
            Metric::MetricsFailures,
            move |req| ep.answer(&req),
        )
    }

    /// `GET` and `HEAD` of `/metrics` (any query string); 405 for other methods, 404 elsewhere.
    fn answer(&self, req: &Request<Incoming>) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (&Method::GET | &Method::HEAD, "/metrics") => {
                serve::respond(200, Some(CONTENT_TYPE), Body::full(self.page()))
            }
            (_, "/metrics") => serve::status(405, Some("text/plain")),
            _ => serve::status(404, Some("text/plain")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A strict reader of the text format, as far as this page uses it: every line is a HELP,
    /// a TYPE or a sample; HELP and TYPE come once per family, before its samples, and the
    /// samples of a family are together. Returns (family, kind, labels, value text) per sample.
    fn parse(text: &str) -> Vec<(String, String, Labels, String)> {
        assert!(text.ends_with('\n'), "the page ends with a line feed");
        let mut kinds: BTreeMap<String, String> = BTreeMap::new();
        let mut helped = std::collections::BTreeSet::new();
        let mut done = std::collections::BTreeSet::new();
        let mut current = String::new();
        let mut out = Vec::new();
        for line in text.lines() {
            if let Some(r) = line.strip_prefix("# HELP ") {
                let (name, help) = r.split_once(' ').expect("HELP name text");
                assert!(name_ok(name) && !help.is_empty(), "{line}");
                assert!(helped.insert(name.to_string()), "second HELP: {line}");
                assert!(!kinds.contains_key(name), "HELP after TYPE: {line}");
                if current != name {
                    assert!(done.insert(current.clone()) || current.is_empty());
                }
                assert!(!done.contains(name), "family {name} split");
                current = name.to_string();
                continue;
            }
            if let Some(r) = line.strip_prefix("# TYPE ") {
                let (name, kind) = r.split_once(' ').expect("TYPE name kind");
                assert_eq!(name, current, "TYPE without its HELP: {line}");
                assert!(["counter", "gauge"].contains(&kind), "{line}");
                assert!(
                    kinds.insert(name.to_string(), kind.to_string()).is_none(),
                    "second TYPE: {line}"
                );
                continue;
            }
            assert!(!line.starts_with('#'), "{line}");
            // name, optional {labels}, one space, value.
            let name_end = line.find(['{', ' ']).expect("name end");
            let name = &line[..name_end];
            assert_eq!(name, current, "sample outside its family: {line}");
            let mut rest = &line[name_end..];
            let mut labels = Vec::new();
            if let Some(r) = rest.strip_prefix('{') {
                let mut r = r;
                loop {
                    let eq = r.find("=\"").expect("label=\"");
                    let label = &r[..eq];
                    assert!(label_ok(label), "{line}");
                    let mut value = String::new();
                    let mut chars = r[eq + 2..].char_indices();
                    let end = loop {
                        match chars.next().expect("unterminated value") {
                            (i, '"') => break eq + 2 + i + 1,
                            (_, '\\') => match chars.next().expect("escape").1 {
                                '\\' => value.push('\\'),
                                '"' => value.push('"'),
                                'n' => value.push('\n'),
                                c => panic!("bad escape \\{c} in {line}"),
                            },
                            (_, '\n') => panic!("raw line feed"),
                            (_, c) => value.push(c),
                        }
                    };
                    labels.push((label.to_string(), value));
                    r = &r[end..];
                    if let Some(t) = r.strip_prefix(',') {
                        r = t;
                    } else {
                        rest = r.strip_prefix('}').expect("}");
                        break;
                    }
                }
            }
            let value = rest.strip_prefix(' ').expect("one space before the value");
            assert!(
                value == "NaN"
                    || value == "+Inf"
                    || value == "-Inf"
                    || value.parse::<f64>().is_ok(),
                "value {value:?}"
            );
            let kind = kinds.get(name).expect("sample before TYPE").clone();
            assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
            out.push((name.to_string(), kind, labels, value.to_string()));
        }
        out
    }

    #[test]
    fn escaping() {
        assert_eq!(escape_label(r#"a\b"c"#), r#"a\\b\"c"#);
        assert_eq!(escape_label("x\ny"), "x\\ny");
        assert_eq!(escape_label("GET /api/{id}"), "GET /api/{id}");
        assert_eq!(escape_help("a\\b\nc \"q\""), "a\\\\b\\nc \"q\"");
        let mut e = Exposition::default();
        let nasty = "GET /x/\"{id}\"\\\n";
        e.add(
            "sparbar_t_total",
            Kind::Counter,
            "h\nx",
            &[("route", nasty)],
            Value::Int(3),
        )
        .unwrap();
        let page = e.render();
        assert_eq!(
            page,
            "# HELP sparbar_t_total h\\nx\n# TYPE sparbar_t_total counter\nsparbar_t_total{route=\"GET /x/\\\"{id}\\\"\\\\\\n\"} 3\n"
        );
        let got = parse(&page);
        assert_eq!(got[0].2, vec![("route".to_string(), nasty.to_string())]);
    }

    #[test]
    fn stat_names_split() {
        assert_eq!(split_key("a_total").unwrap(), ("a_total", vec![]));
        let (n, l) = split_key(
            "records_dropped_total{reason=\"spool_full\",sink=\"siem\",stream=\"access\"}",
        )
        .unwrap();
        assert_eq!(n, "records_dropped_total");
        assert_eq!(
            l,
            vec![
                ("reason".into(), "spool_full".into()),
                ("sink".into(), "siem".into()),
                ("stream".into(), "access".into())
            ]
        );
        // Route names are written unescaped: braces, commas and quotes inside stay in the value.
        let (_, l) = split_key("exchanges_matched_total{route=\"GET /a/{id},\"x\"}").unwrap();
        assert_eq!(l, vec![("route".into(), "GET /a/{id},\"x".into())]);
        for bad in ["a{", "a{b}", "a{b=\"c}", "a{b=\"c\"", "a{=\"c\"}"] {
            let r = split_key(bad).and_then(|(n, l)| {
                let mut e = Exposition::default();
                e.add_owned(n, Kind::of(n), "h", l, Value::Int(1))
            });
            assert!(r.is_err(), "{bad}: {r:?}");
        }
    }

    #[test]
    fn counters_and_gauges_split_by_total() {
        let mut e = Exposition::default();
        for (k, v) in [
            ("exchanges_parsed_total", 7),
            ("sink_lag_records{sink=\"file\",stream=\"access\"}", 2),
            ("sink_lag_records{sink=\"file\",stream=\"security\"}", 0),
            ("sessions_known", 4),
            ("records_spooled_total{stream=\"access\"}", 9),
        ] {
            e.add_stat(k, v).unwrap();
        }
        let got = parse(&e.render());
        let kinds: BTreeMap<&str, &str> = got
            .iter()
            .map(|(n, k, _, _)| (n.as_str(), k.as_str()))
            .collect();
        assert_eq!(
            kinds,
            BTreeMap::from([
                ("sparbar_exchanges_parsed_total", "counter"),
                ("sparbar_records_spooled_total", "counter"),
                ("sparbar_sessions_known", "gauge"),
                ("sparbar_sink_lag_records", "gauge"),
            ])
        );
        assert_eq!(got.len(), 5);
        // A family's type follows its name: a gauge named like a counter is refused.
        assert_eq!(
            e.add("sparbar_x_total", Kind::Gauge, "h", &[], Value::Int(1)),
            Err(MetricsError::KindMismatch("sparbar_x_total".into()))
        );
    }

    #[test]
    fn help_and_type_once_per_family_and_no_repeated_label_sets() {
        let mut e = Exposition::default();
        e.add_stat("a_total{reason=\"x\"}", 1).unwrap();
        e.add_stat("b", 1).unwrap();
        e.add_stat("a_total{reason=\"y\"}", 2).unwrap();
        e.add_stat("a_total", 3).unwrap();
        assert_eq!(
            e.add_stat("a_total{reason=\"x\"}", 5),
            Err(MetricsError::Duplicate("sparbar_a_total".into()))
        );
        // The same set in another order is the same set.
        e.add_stat("c_total{p=\"1\",q=\"2\"}", 1).unwrap();
        assert!(e.add_stat("c_total{q=\"2\",p=\"1\"}", 1).is_err());
        assert!(e.add_stat("c_total{p=\"1\",p=\"2\"}", 1).is_err());
        let page = e.render();
        assert_eq!(page.matches("# HELP sparbar_a_total ").count(), 1);
        assert_eq!(page.matches("# TYPE sparbar_a_total counter").count(), 1);
        let got = parse(&page);
        assert_eq!(got.iter().filter(|s| s.0 == "sparbar_a_total").count(), 3);
    }

    #[test]
    fn bad_names_are_refused() {
        let mut e = Exposition::default();
        for n in ["", "1a", "a-b", "a b", "é"] {
            assert!(matches!(
                e.add(n, Kind::Gauge, "h", &[], Value::Int(1)),
                Err(MetricsError::BadName(_))
            ));
        }
        for l in ["", "1a", "a-b", "__x"] {
            assert!(matches!(
                e.add("ok", Kind::Gauge, "h", &[(l, "v")], Value::Int(1)),
                Err(MetricsError::BadLabel { .. })
            ));
        }
    }

    #[test]
    fn values() {
        assert_eq!(Value::Int(u64::MAX).to_string(), "18446744073709551615");
        assert_eq!(Value::Float(1.5).to_string(), "1.5");
        assert_eq!(Value::Float(f64::NAN).to_string(), "NaN");
        assert_eq!(Value::Float(f64::INFINITY).to_string(), "+Inf");
        assert_eq!(Value::Float(f64::NEG_INFINITY).to_string(), "-Inf");
        assert_eq!(Value::Float(3.0).to_string(), "3");
    }

    #[test]
    fn the_page_parses_and_carries_everything() {
        let agent = BTreeMap::from([
            ("exchanges_parsed_total".to_string(), 10),
            ("alerts_total{rule=\"enum\"}".to_string(), 1),
            (
                "sink_lag_records{sink=\"file\",stream=\"access\"}".to_string(),
                0,
            ),
            ("bad name{".to_string(), 1),
        ]);
        let kernel = BTreeMap::from([
            ("kernel_events_sent_total".to_string(), 30),
            (
                "kernel_events_dropped_total{reason=\"ringbuf_full\"}".to_string(),
                0,
            ),
        ]);
        let (page, bad) = build(&Inputs {
            uptime: Duration::from_millis(1500),
            version: "1.2.3",
            agent: &agent,
            kernel: &kernel,
            libraries: vec![Library {
                path: "/usr/lib/libssl.so.3",
                kind: "libssl",
                attached: 4,
                failed: 1,
            }],
            tracepoints: vec![("syscalls:sys_enter_read", true)],
            targets: BTreeMap::from([("nginx", 5), ("app", 0)]),
            open_connections: 2,
            decisions_active: BTreeMap::from([("user", 1)]),
            spool_bytes: BTreeMap::from([("access".into(), 100), ("security".into(), 7)]),
            spool_max_bytes: 1 << 30,
            security_pending: 0,
        });
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert_eq!(bad[0].0, "bad name{");
        let got = parse(&page);
        let find = |n: &str, l: &[(&str, &str)]| -> String {
            let l: Vec<(String, String)> = l
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
            got.iter()
                .find(|s| s.0 == n && s.2 == l)
                .unwrap_or_else(|| panic!("{n} {l:?} not in:\n{page}"))
                .3
                .clone()
        };
        assert_eq!(find("sparbar_up", &[]), "1");
        assert_eq!(find("sparbar_uptime_seconds", &[]), "1.5");
        assert_eq!(find("sparbar_build_info", &[("version", "1.2.3")]), "1");
        assert_eq!(
            find(
                "sparbar_tls_probes_failed",
                &[("library", "/usr/lib/libssl.so.3"), ("kind", "libssl")]
            ),
            "1"
        );
        assert_eq!(find("sparbar_targets_traced", &[("target", "app")]), "0");
        assert_eq!(
            find("sparbar_decisions_active", &[("scope", "session")]),
            "0"
        );
        assert_eq!(find("sparbar_exchanges_parsed_total", &[]), "10");
        assert_eq!(find("sparbar_kernel_events_sent_total", &[]), "30");
        assert_eq!(
            find(
                "sparbar_sink_lag_records",
                &[("sink", "file"), ("stream", "access")]
            ),
            "0"
        );
        assert_eq!(find("sparbar_spool_bytes", &[("stream", "security")]), "7");
        assert!(page.contains("# HELP sparbar_alerts_total Alerts raised, by rule.\n"));
    }

    #[test]
    fn every_named_family_has_its_own_help() {
        for n in tracer_common::COUNTER_NAMES
            .iter()
            .filter(|n| !n.is_empty())
        {
            let (base, _) = split_key(n).unwrap();
            assert!(!help(base).starts_with("An agent counter"), "{base}");
        }
    }

    #[test]
    fn the_agents_help_and_type_come_from_its_table() {
        for m in Metric::ALL {
            assert_eq!(help(m.name()), m.help(), "{m:?}");
            assert_eq!(kind(m.name()), m.kind(), "{m:?}");
        }
        assert_eq!(kind("kernel_events_sent_total"), Kind::Counter);
    }

    #[test]
    fn rates_over_the_window() {
        let t0 = Instant::now();
        let mut r = Rates::new(Duration::from_secs(60));
        assert_eq!(r.rates(), (0.0, 0.0, 0.0));
        for s in 0..=120u64 {
            r.push(t0 + Duration::from_secs(s), s * 10, s * 2);
        }
        let (a, b, secs) = r.rates();
        assert_eq!((a, b), (10.0, 2.0));
        assert!((60.0..=61.0).contains(&secs), "{secs}");
        assert!(r.samples.len() <= 62);
    }

    #[tokio::test]
    async fn serves_the_last_page() {
        use tokio::{
            io::{AsyncReadExt, AsyncWriteExt},
            net::TcpStream,
        };
        let ep = Endpoint::default();
        ep.publish("sparbar_up 1\n".into());
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _task = ep.serve(l);
        let get = |req: &'static str| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let r = get("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"));
        assert!(r.ends_with("\r\n\r\nsparbar_up 1\n"), "{r}");
        ep.publish("sparbar_up 2\n".into());
        let r = get("GET /metrics?x=1 HTTP/1.1\r\n\r\n").await;
        assert!(r.ends_with("sparbar_up 2\n"), "{r}");
        let r = get("GET / HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        let r = get("POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 405"), "{r}");
        let r = get("\x01\x02 nonsense\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    }

    type Served = (
        Endpoint,
        Arc<Stats>,
        std::net::SocketAddr,
        tokio::task::JoinHandle<()>,
    );

    async fn endpoint() -> Served {
        let stats = Arc::new(Stats::default());
        let ep = Endpoint::default().counting(stats.clone());
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = ep.serve(l);
        (ep, stats, addr, task)
    }

    /// The status line, the headers but `Date` (sorted), and the body.
    fn split(r: &str) -> (&str, Vec<&str>, &str) {
        let (head, body) = r.split_once("\r\n\r\n").expect("a head");
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap();
        let mut headers: Vec<&str> = lines.filter(|h| !h.starts_with("Date: ")).collect();
        headers.sort();
        (status, headers, body)
    }

    #[tokio::test]
    async fn exact_answers() {
        use crate::ops::serve::tests::exchange;
        let (ep, stats, addr, _task) = endpoint().await;
        ep.publish("sparbar_up 1\n".into());
        let r = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(
            split(&r),
            (
                "HTTP/1.1 200 OK",
                vec![
                    "Connection: close",
                    "Content-Length: 13",
                    "Content-Type: text/plain; version=0.0.4; charset=utf-8"
                ],
                "sparbar_up 1\n"
            )
        );
        let r = exchange(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(
            split(&r),
            (
                "HTTP/1.1 200 OK",
                vec![
                    "Connection: close",
                    "Content-Length: 13",
                    "Content-Type: text/plain; version=0.0.4; charset=utf-8"
                ],
                ""
            )
        );
        let empty = |status| {
            (
                status,
                vec![
                    "Connection: close",
                    "Content-Length: 0",
                    "Content-Type: text/plain",
                ],
                "",
            )
        };
        let r = exchange(addr, b"GET /metricsx HTTP/1.1\r\n\r\n").await;
        assert_eq!(split(&r), empty("HTTP/1.1 404 Not Found"));
        let r = exchange(addr, b"DELETE /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(split(&r), empty("HTTP/1.1 405 Method Not Allowed"));
        assert!(stats.snapshot().is_empty(), "{:?}", stats.snapshot());
    }

    #[tokio::test]
    async fn a_malformed_request_is_answered_400_and_counted() {
        use crate::ops::serve::tests::{eventually, exchange};
        let (_ep, stats, addr, _task) = endpoint().await;
        let r = exchange(addr, b"GET /metrics HTTP/1.1\r\nbad header\r\n\r\n").await;
        assert_eq!(
            split(&r),
            (
                "HTTP/1.1 400 Bad Request",
                vec!["Connection: close", "Content-Length: 0"],
                ""
            )
        );
        eventually("the bad request is counted", || {
            stats.get_reason(Metric::MetricsFailures, "bad_request") == 1
        })
        .await;
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_refused_and_counted() {
        let (ep, stats, addr, _task) = endpoint().await;
        ep.publish("sparbar_up 1\n".into());
        crate::ops::serve::tests::check_the_cap(
            addr,
            Limits::LOCAL,
            &stats,
            Metric::MetricsFailures,
            b"GET /metrics HTTP/1.1\r\n\r\n",
            "HTTP/1.1 200 OK\r\n",
        )
        .await;
    }
}
