//! Reads `sparbar.toml` and turns it into a checked, typed [`Config`], so that every mistake in
//! the file is reported at once, by key, before the agent touches the kernel.
//!
//! Two steps: `toml` parses the file into raw structs that reject unknown keys (syntax and type
//! errors stop there, with the file's line and column), then every value is checked and all
//! semantic problems are collected into one [`ConfigError::Invalid`], one line per problem:
//!
//! ```text
//! sparbar.toml: routes[2].route: "GET /api/{id" has an unclosed "{"; expected a path template like "GET /api/addressbook/persons/{id}"
//! ```

use std::{
    collections::HashMap,
    fmt, fs,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{de, Deserialize, Deserializer};
use thiserror::Error;

use crate::attribute::routes;
pub use crate::attribute::routes::RouteConfig;

mod detection;
mod identity;
mod sinks;
pub use detection::{BlockScope, By, DetectionConfig, Metric, Rule, RuleKind};
pub use identity::{
    Cidr, DisclosureConfig, EndpointRule, IdentityConfig, JwtClaims, LoginRule, ProxyHeaders,
    RouteDisclosure,
};
pub use sinks::{
    BatchLimits, FileSinkConfig, HttpSinkConfig, OnFull, SinkConfig, SinkKind, SpoolConfig, Stream,
    SyslogSinkConfig, SyslogTransport, TlsClientConfig,
};

pub const DEFAULT_STATE_DIR: &str = "/var/lib/sparbar";
pub const DEFAULT_STATS_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_RING_BUFFER_SIZE: u32 = 16 << 20;
pub const DEFAULT_MAX_MESSAGE_BYTES: u32 = 256 << 10;
pub const DEFAULT_QUEUE_CAPACITY: usize = 65536;
pub const DEFAULT_BODY_KEEP_BYTES: usize = 1 << 20;
pub const DEFAULT_MAX_CONNECTIONS: u32 = 65536;
/// File name of the records file inside `agent.state_dir` when `output.file` is not set.
pub const DEFAULT_OUTPUT_FILE_NAME: &str = "access.jsonl";

const MIN_STATS_INTERVAL: Duration = Duration::from_millis(100);
const MAX_STATS_INTERVAL: Duration = Duration::from_secs(24 * 3600);
const MIN_RING_BUFFER_SIZE: u64 = 64 << 10;
const MAX_RING_BUFFER_SIZE: u64 = 1 << 30;
const MIN_MAX_MESSAGE_BYTES: u64 = 16 << 10;
const MAX_MAX_MESSAGE_BYTES: u64 = 16 << 20;
const MAX_QUEUE_CAPACITY: i64 = 1 << 24;
const MAX_BODY_KEEP_BYTES: u64 = 64 << 20;
const MAX_MAX_CONNECTIONS: i64 = 1 << 20;
/// The kernel keeps 16 bytes of a task's comm, the last one a NUL.
const MAX_COMM_LEN: usize = 15;

const SIZE_EXPECTED: &str =
    "expected a size like \"4096\", \"64KiB\", \"16MiB\" or \"1GiB\" (binary units B, KiB, MiB, GiB)";
const DURATION_EXPECTED: &str = "expected a duration like \"500ms\", \"10s\", \"5m\" or \"1h\"";

// ---------------------------------------------------------------------------------------------
// The typed configuration.
// ---------------------------------------------------------------------------------------------

/// The whole, validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub agent: AgentConfig,
    pub capture: CaptureConfig,
    /// At least one.
    pub targets: Vec<Target>,
    /// Already checked with [`routes::validate`]: `RouteTable::new(&config.routes)` succeeds.
    pub routes: Vec<RouteConfig>,
    pub output: OutputConfig,
    /// Sessions, tokens, learned identities and trusted proxies.
    pub identity: IdentityConfig,
    /// Which routes disclose whose personal data, and how to read it from their responses.
    pub disclosure: DisclosureConfig,
    /// Which calls are watched, allowlists, budgets.
    pub detection: DetectionConfig,
    /// The detectors.
    pub rules: Vec<Rule>,
    /// Where records wait on disk until every sink has them.
    pub spool: SpoolConfig,
    /// The destinations: `output.file` (named `file`), `output.stdout` (`stdout`), then
    /// `[[sinks]]` in order.
    pub sinks: Vec<SinkConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// Absolute.
    pub state_dir: PathBuf,
    pub stats_interval: Duration,
    /// `host.name` in records.
    pub host_name: String,
    /// Where `GET /metrics` (Prometheus) is served; off when `None`. Loopback unless
    /// `metrics_allow_remote`.
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub metrics_allow_remote: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Bytes; a power of two in 64 KiB ..= 1 GiB.
    pub ring_buffer_size: u32,
    /// Bytes captured per read/write call; 16 KiB ..= 16 MiB.
    pub max_message_bytes: u32,
    /// Events buffered between the ring-buffer reader and the pipeline; 1 ..= 2^24.
    pub queue_capacity: usize,
    /// Decoded body bytes kept per message; 0 ..= 64 MiB.
    pub body_keep_bytes: usize,
    /// Tracked connections; 1 ..= 2^20.
    pub max_connections: u32,
}

/// How a target's processes are recognised.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TargetMatch {
    /// Absolute path of the executable.
    Exe(PathBuf),
    /// Process name (the kernel's comm), 1..=15 bytes.
    Comm(String),
    /// cgroup v2 path relative to the cgroup2 mount, absolute form (`/system.slice/x.service`).
    Cgroup(String),
    Pid(u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub matcher: TargetMatch,
    /// Trace OpenSSL in these processes.
    pub tls: bool,
    /// Local TCP ports whose plaintext socket traffic is captured; none is 0, no duplicates.
    pub plaintext_ports: Vec<u16>,
    /// `service.name` in records.
    pub name: String,
}

/// What happens to exchanges that match no configured route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmatched {
    /// Only counted.
    Count,
    /// Recorded without `http.route`.
    Record,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputConfig {
    /// Absolute path of the JSON Lines file.
    pub file: PathBuf,
    pub stdout: bool,
    pub unmatched: Unmatched,
}

// ---------------------------------------------------------------------------------------------
// Errors.
// ---------------------------------------------------------------------------------------------

/// One semantic problem: the key path (`routes[2].route`) and what is wrong with it, ending in
/// what is expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Where and why `toml` refused the file. `line` and `column` are 1-based; `key` is the table
/// (and key) the error is in, as far as it can be told from the text (`targets[1]`,
/// `output.stdout`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub origin: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub key: Option<String>,
    pub message: String,
    /// The offending line of the file, shown under the message.
    pub source_line: Option<String>,
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.origin)?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
            if let Some(c) = self.column {
                write!(f, ":{c}")?;
            }
        }
        f.write_str(": ")?;
        if let Some(k) = &self.key {
            write!(f, "{k}: ")?;
        }
        f.write_str(&self.message)?;
        if let (Some(l), Some(src)) = (self.line, &self.source_line) {
            write!(f, "\n{l:>6} | {src}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read the configuration file: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax error, wrong value type, or unknown key.
    #[error("{0}")]
    Syntax(Box<SyntaxError>),
    /// Every semantic problem found; `Display` prints one per line, each prefixed by `origin`.
    #[error("{}", self.render_problems())]
    Invalid {
        origin: String,
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// The semantic problems (empty for other kinds of error).
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid { problems, .. } => problems,
            _ => &[],
        }
    }

    fn render_problems(&self) -> String {
        let ConfigError::Invalid { origin, problems } = self else {
            return String::new();
        };
        problems
            .iter()
            .map(|p| format!("{origin}: {p}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points.
// ---------------------------------------------------------------------------------------------

/// Reads and validates the file at `path`; errors name it as it was given.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: origin.clone(),
        source,
    })?;
    parse(&text, &origin)
}

/// Parses and validates `text`; `origin` names it in errors (usually the file name).
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| syntax_error(text, origin, &e))?;
    validate(raw, origin)
}

fn syntax_error(text: &str, origin: &str, e: &toml::de::Error) -> ConfigError {
    let message = friendlier(&e.message().trim().replace('\n', "; "));
    let Some(span) = e.span() else {
        return ConfigError::Syntax(Box::new(SyntaxError {
            origin: origin.to_string(),
            line: None,
            column: None,
            key: None,
            message,
            source_line: None,
        }));
    };
    let start = floor_char_boundary(text, span.start.min(text.len()));
    let before = &text[..start];
    let line_idx = before.matches('\n').count();
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    let line_text = text[line_start..].lines().next().unwrap_or("");

    // Which table is this in? The last header above the error (`[x]`, or the n-th `[[x]]`).
    let mut table: Option<String> = None;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for l in text[..line_start].lines() {
        let l = l.split('#').next().unwrap_or("").trim();
        if let Some(inner) = l.strip_prefix("[[").and_then(|r| r.strip_suffix("]]")) {
            let name = inner.trim().to_string();
            let n = counts.entry(name.clone()).or_insert(0);
            table = Some(format!("{name}[{n}]"));
            *n += 1;
        } else if let Some(inner) = l.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            table = Some(inner.trim().to_string());
        }
    }
    // A value error points after `key =`: name the key too.
    let col_byte = start - line_start;
    let key_here = line_text
        .get(..col_byte)
        .and_then(|pre| pre.split_once('='))
        .map(|(k, _)| k.trim().trim_matches('"').to_string())
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    // `[targets]` where `[[targets]]` is meant.
    let header = line_text.trim();
    if message.contains("invalid type: map, expected an array") && !header.starts_with("[[") {
        if let Some(name) = header
            .strip_prefix('[')
            .and_then(|h| h.split(']').next())
            .map(str::trim)
        {
            return ConfigError::Syntax(Box::new(SyntaxError {
                origin: origin.to_string(),
                line: Some(line_idx + 1),
                column: Some(column),
                key: Some(name.to_string()),
                message: format!(
                    "[{name}] is a single table; expected [[{name}]] (an array of tables), one \
                     [[{name}]] per entry"
                ),
                source_line: Some(line_text.to_string()),
            }));
        }
    }
    let key = match (table, key_here) {
        (Some(t), Some(k)) => Some(format!("{t}.{k}")),
        (Some(t), None) => Some(t),
        (None, Some(k)) => Some(k),
        (None, None) => None,
    };
    ConfigError::Syntax(Box::new(SyntaxError {
        origin: origin.to_string(),
        line: Some(line_idx + 1),
        column: Some(column),
        key,
        message,
        source_line: Some(line_text.to_string()),
    }))
}

/// Replaces Rust type names in serde's messages with the TOML words for them.
fn friendlier(message: &str) -> String {
    let mut m = message.to_string();
    for (rust, toml) in [
        ("expected i64", "expected an integer"),
        ("expected u16", "expected an integer"),
        ("expected u32", "expected an integer"),
        ("expected a sequence", "expected an array"),
    ] {
        m = m.replace(rust, toml);
    }
    if let Some(i) = m.find("expected struct Raw") {
        m.truncate(i);
        m.push_str("expected a table");
    }
    m
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

// ---------------------------------------------------------------------------------------------
// Size and duration helpers.
// ---------------------------------------------------------------------------------------------

/// Parses a size: a whole number of bytes with an optional binary unit: `"4096"`, `"64KiB"`,
/// `"16MiB"`, `"1GiB"` (also `B` and `TiB`; a space before the unit is allowed).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(end);
    let unit = unit.trim_start();
    if num.is_empty() {
        return Err(format!(
            "{text:?} does not start with a number; {SIZE_EXPECTED}"
        ));
    }
    if unit.starts_with(['.', ',']) {
        return Err(format!("{text:?} is not a whole number; {SIZE_EXPECTED}"));
    }
    let mult: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        u if ["k", "kb", "m", "mb", "g", "gb", "t", "tb"]
            .contains(&u.to_ascii_lowercase().as_str()) =>
        {
            return Err(format!(
                "{text:?} uses the unit {u:?}; sizes here are binary, write {:?} instead; \
                 {SIZE_EXPECTED}",
                format!("{num}{}iB", u[..1].to_ascii_uppercase())
            ))
        }
        u => {
            return Err(format!(
                "{text:?} has the unknown unit {u:?}; {SIZE_EXPECTED}"
            ))
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{text:?} is too large; {SIZE_EXPECTED}"))
}

/// Parses a duration: a whole number with the unit `ms`, `s`, `m` or `h`: `"500ms"`, `"10s"`,
/// `"5m"`, `"1h"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(end);
    let unit = unit.trim_start();
    if num.is_empty() {
        return Err(format!(
            "{text:?} does not start with a number; {DURATION_EXPECTED}"
        ));
    }
    if unit.starts_with(['.', ',']) {
        return Err(format!(
            "{text:?} is not a whole number; use a smaller unit; {DURATION_EXPECTED}"
        ));
    }
    let ms_per: u64 = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "" => return Err(format!("{text:?} has no unit; {DURATION_EXPECTED}")),
        u => {
            return Err(format!(
                "{text:?} has the unknown unit {u:?}; {DURATION_EXPECTED}"
            ))
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(ms_per))
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{text:?} is too large; {DURATION_EXPECTED}"))
}

/// Formats a byte count the way the config writes it (`16MiB`, or plain bytes).
pub fn format_size(n: u64) -> String {
    for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if n != 0 && n.is_multiple_of(1u64 << shift) {
            return format!("{}{unit}", n >> shift);
        }
    }
    n.to_string()
}

fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(3_600_000) && ms != 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms != 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

// ---------------------------------------------------------------------------------------------
// Raw file layout.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    agent: RawAgent,
    #[serde(default)]
    capture: RawCapture,
    #[serde(default)]
    targets: Vec<RawTarget>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default)]
    output: RawOutput,
    #[serde(default)]
    identity: identity::RawIdentity,
    #[serde(default)]
    disclosure: identity::RawDisclosure,
    #[serde(default)]
    detection: detection::RawDetection,
    #[serde(default)]
    rules: Vec<detection::RawRule>,
    #[serde(default)]
    spool: sinks::RawSpool,
    #[serde(default)]
    sinks: Vec<sinks::RawSink>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    state_dir: Option<String>,
    stats_interval: Option<String>,
    host_name: Option<String>,
    metrics_listen: Option<String>,
    metrics_allow_remote: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCapture {
    ring_buffer_size: Option<SizeValue>,
    max_message_bytes: Option<SizeValue>,
    queue_capacity: Option<i64>,
    body_keep_bytes: Option<SizeValue>,
    max_connections: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    exe: Option<String>,
    comm: Option<String>,
    cgroup: Option<String>,
    pid: Option<i64>,
    tls: Option<bool>,
    plaintext_ports: Option<Vec<i64>>,
    name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    route: Option<String>,
    name: Option<String>,
    query_params: Option<Vec<String>>,
    disclosure: Option<identity::RawRouteDisclosure>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    file: Option<String>,
    stdout: Option<bool>,
    unmatched: Option<String>,
}

/// A size as written: a string with a unit, or an integer number of bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SizeValue {
    Bytes(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for SizeValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = SizeValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size like \"16MiB\" or a whole number of bytes")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<SizeValue, E> {
                Ok(SizeValue::Bytes(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<SizeValue, E> {
                Ok(SizeValue::Bytes(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SizeValue, E> {
                Ok(SizeValue::Text(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------------------------
// Validation.
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }
}

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

fn validate(raw: RawConfig, origin: &str) -> Result<Config, ConfigError> {
    let mut p = Problems::default();

    let agent = check_agent(raw.agent, &mut p);
    let capture = check_capture(raw.capture, &mut p);
    let targets = check_targets(raw.targets, &mut p);
    let mut raw_routes = raw.routes;
    let route_disclosures: Vec<Option<identity::RawRouteDisclosure>> =
        raw_routes.iter_mut().map(|r| r.disclosure.take()).collect();
    let routes = check_routes(raw_routes, &mut p);
    let output = check_output(raw.output, &agent.state_dir, &mut p);
    let route_names: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
    let identity = identity::check_identity(raw.identity, &route_names, &mut p);
    let target_names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
    let detection = detection::check_detection(raw.detection, &target_names, &mut p);
    let rules = detection::check_rules(raw.rules, &route_names, &mut p);
    let spool = sinks::check_spool(raw.spool, &agent.state_dir, &mut p);
    let sinks = sinks::check_sinks(raw.sinks, Some(&output.file), output.stdout, &mut p);
    let mut disclosure = identity::check_disclosure(raw.disclosure, &mut p);
    for (i, (d, r)) in route_disclosures.into_iter().zip(&routes).enumerate() {
        if let Some(d) = d {
            let params = template_params(&r.route);
            let key = format!("routes[{i}].disclosure");
            if let Some(rd) = identity::check_route_disclosure(d, &key, &params, &mut p) {
                disclosure.routes.insert(r.name.clone(), rd);
            }
        }
    }

    if routes.is_empty() && output.unmatched == Unmatched::Count {
        p.push(
            "routes",
            "no [[routes]] are configured and output.unmatched is \"count\", so nothing would \
             ever be recorded; expected at least one [[routes]] table, or output.unmatched = \
             \"record\"",
        );
    }

    if p.0.is_empty() {
        Ok(Config {
            agent,
            capture,
            targets,
            routes,
            output,
            identity,
            disclosure,
            detection,
            rules,
            spool,
            sinks,
        })
    } else {
        Err(ConfigError::Invalid {
            origin: origin.to_string(),
            problems: p.0,
        })
    }
}

fn check_agent(raw: RawAgent, p: &mut Problems) -> AgentConfig {
    let state_dir = match raw.state_dir {
        None => PathBuf::from(DEFAULT_STATE_DIR),
        Some(s) => {
            if !Path::new(&s).is_absolute() {
                p.push(
                    "agent.state_dir",
                    format!("{s:?} is not an absolute path; expected a directory like \"{DEFAULT_STATE_DIR}\""),
                );
            }
            PathBuf::from(s)
        }
    };

    let stats_interval = match raw.stats_interval {
        None => DEFAULT_STATS_INTERVAL,
        Some(s) => match parse_duration(&s) {
            Ok(d) if (MIN_STATS_INTERVAL..=MAX_STATS_INTERVAL).contains(&d) => d,
            Ok(d) => {
                p.push(
                    "agent.stats_interval",
                    format!(
                        "{s:?} ({}) is out of range; expected a duration between {} and {}",
                        format_duration(d),
                        format_duration(MIN_STATS_INTERVAL),
                        format_duration(MAX_STATS_INTERVAL)
                    ),
                );
                DEFAULT_STATS_INTERVAL
            }
            Err(e) => {
                p.push("agent.stats_interval", e);
                DEFAULT_STATS_INTERVAL
            }
        },
    };

    let host_name = match raw.host_name {
        Some(h) => {
            if h.trim().is_empty() || h.chars().any(|c| c.is_whitespace() || c.is_control()) {
                p.push(
                    "agent.host_name",
                    format!(
                        "{h:?} is empty or has white space; expected a host name like \"web-1\""
                    ),
                );
            }
            h
        }
        None => match system_host_name() {
            Some(h) => h,
            None => {
                p.push(
                    "agent.host_name",
                    "is not set and the system host name could not be read from \
                     /proc/sys/kernel/hostname; expected a host name like \"web-1\"",
                );
                String::new()
            }
        },
    };

    let metrics_allow_remote = raw.metrics_allow_remote.unwrap_or(false);
    let metrics_listen = raw.metrics_listen.and_then(|m| {
        match m.parse::<std::net::SocketAddr>() {
            Ok(a) if a.ip().is_loopback() || metrics_allow_remote => Some(a),
            Ok(a) => {
                p.push(
                    "agent.metrics_listen",
                    format!(
                        "{m:?} is not a loopback address; the counters tell who can reach what, so \
                         expected something like \"127.0.0.1:9464\", or set \
                         agent.metrics_allow_remote = true to serve {} on purpose",
                        a.ip()
                    ),
                );
                None
            }
            Err(_) => {
                p.push(
                    "agent.metrics_listen",
                    format!("{m:?} is not an address and port; expected something like \"127.0.0.1:9464\""),
                );
                None
            }
        }
    });

    AgentConfig {
        state_dir,
        stats_interval,
        host_name,
        metrics_listen,
        metrics_allow_remote,
    }
}

/// The kernel's host name (of the agent's UTS namespace).
fn system_host_name() -> Option<String> {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|f| fs::read_to_string(f).ok())
        .map(|s| s.trim().to_string())
        .find(|s| !s.is_empty())
}

fn size_value(v: &SizeValue) -> Result<u64, String> {
    match v {
        SizeValue::Bytes(n) => {
            u64::try_from(*n).map_err(|_| format!("{n} is negative; {SIZE_EXPECTED}"))
        }
        SizeValue::Text(t) => parse_size(t),
    }
}

fn shown(v: &SizeValue, n: u64) -> String {
    match v {
        SizeValue::Text(t) if t.trim() == format_size(n) => format!("{t:?}"),
        SizeValue::Text(t) => format!("{t:?} ({n} bytes)"),
        SizeValue::Bytes(_) if format_size(n) == n.to_string() => n.to_string(),
        SizeValue::Bytes(_) => format!("{n} ({})", format_size(n)),
    }
}

fn check_size(
    p: &mut Problems,
    key: &str,
    v: Option<SizeValue>,
    default: u64,
    min: u64,
    max: u64,
    pow2: bool,
) -> u64 {
    let Some(v) = v else { return default };
    match size_value(&v) {
        Err(e) => {
            p.push(key, e);
            default
        }
        Ok(n) => {
            let range = format!("between {} and {}", format_size(min), format_size(max));
            if pow2 && (!n.is_power_of_two() || n < min || n > max) {
                p.push(
                    key,
                    format!(
                        "{} is not a power of two {range}; expected one of \"64KiB\", \
                         \"128KiB\", …, \"16MiB\", …, \"1GiB\"",
                        shown(&v, n)
                    ),
                );
                default
            } else if n < min || n > max {
                p.push(
                    key,
                    format!("{} is out of range; expected a size {range}", shown(&v, n)),
                );
                default
            } else {
                n
            }
        }
    }
}

fn check_count(p: &mut Problems, key: &str, v: Option<i64>, default: i64, max: i64) -> i64 {
    match v {
        None => default,
        Some(n) if (1..=max).contains(&n) => n,
        Some(n) => {
            p.push(
                key,
                format!("{n} is out of range; expected a whole number between 1 and {max}"),
            );
            default
        }
    }
}

fn check_capture(raw: RawCapture, p: &mut Problems) -> CaptureConfig {
    let ring = check_size(
        p,
        "capture.ring_buffer_size",
        raw.ring_buffer_size,
        DEFAULT_RING_BUFFER_SIZE.into(),
        MIN_RING_BUFFER_SIZE,
        MAX_RING_BUFFER_SIZE,
        true,
    );
    let msg = check_size(
        p,
        "capture.max_message_bytes",
        raw.max_message_bytes,
        DEFAULT_MAX_MESSAGE_BYTES.into(),
        MIN_MAX_MESSAGE_BYTES,
        MAX_MAX_MESSAGE_BYTES,
        false,
    );
    let keep = check_size(
        p,
        "capture.body_keep_bytes",
        raw.body_keep_bytes,
        DEFAULT_BODY_KEEP_BYTES as u64,
        0,
        MAX_BODY_KEEP_BYTES,
        false,
    );
    let queue = check_count(
        p,
        "capture.queue_capacity",
        raw.queue_capacity,
        DEFAULT_QUEUE_CAPACITY as i64,
        MAX_QUEUE_CAPACITY,
    );
    let conns = check_count(
        p,
        "capture.max_connections",
        raw.max_connections,
        DEFAULT_MAX_CONNECTIONS.into(),
        MAX_MAX_CONNECTIONS,
    );
    // All bounds above are far below u32::MAX / usize::MAX, so these conversions are exact.
    CaptureConfig {
        ring_buffer_size: u32::try_from(ring).unwrap_or(DEFAULT_RING_BUFFER_SIZE),
        max_message_bytes: u32::try_from(msg).unwrap_or(DEFAULT_MAX_MESSAGE_BYTES),
        queue_capacity: usize::try_from(queue).unwrap_or(DEFAULT_QUEUE_CAPACITY),
        body_keep_bytes: usize::try_from(keep).unwrap_or(DEFAULT_BODY_KEEP_BYTES),
        max_connections: u32::try_from(conns).unwrap_or(DEFAULT_MAX_CONNECTIONS),
    }
}

/// The label a target gets when it has no `name`.
fn derived_name(m: &TargetMatch) -> String {
    match m {
        TargetMatch::Exe(p) => p
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| p.display().to_string()),
        TargetMatch::Comm(c) => c.clone(),
        TargetMatch::Cgroup(c) => {
            let last = c.rsplit('/').find(|s| !s.is_empty()).unwrap_or("root");
            [".service", ".scope", ".slice"]
                .iter()
                .find_map(|suf| last.strip_suffix(suf).filter(|s| !s.is_empty()))
                .unwrap_or(last)
                .to_string()
        }
        TargetMatch::Pid(pid) => format!("pid-{pid}"),
    }
}

fn check_targets(raw: Vec<RawTarget>, p: &mut Problems) -> Vec<Target> {
    const ONE_OF: &str = "expected exactly one of exe, comm, cgroup or pid";
    if raw.is_empty() {
        p.push(
            "targets",
            "no [[targets]] are configured; expected at least one [[targets]] table with one of \
             exe, comm, cgroup or pid, e.g. exe = \"/usr/sbin/nginx\"",
        );
        return Vec::new();
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut seen: HashMap<TargetMatch, usize> = HashMap::new();
    for (i, t) in raw.into_iter().enumerate() {
        let key = format!("targets[{i}]");
        let given: Vec<&str> = [
            t.exe.as_ref().map(|_| "exe"),
            t.comm.as_ref().map(|_| "comm"),
            t.cgroup.as_ref().map(|_| "cgroup"),
            t.pid.as_ref().map(|_| "pid"),
        ]
        .into_iter()
        .flatten()
        .collect();
        let matcher = match given.len() {
            0 => {
                p.push(
                    &key,
                    format!("has none of exe, comm, cgroup, pid; {ONE_OF}"),
                );
                None
            }
            1 => check_matcher(&t, &key, p),
            _ => {
                p.push(&key, format!("has {}; {ONE_OF}", given.join(" and ")));
                None
            }
        };

        let tls = t.tls.unwrap_or(true);
        let mut ports: Vec<u16> = Vec::new();
        for (j, &port) in t.plaintext_ports.iter().flatten().enumerate() {
            let pkey = format!("{key}.plaintext_ports[{j}]");
            match u16::try_from(port) {
                Ok(0) | Err(_) => p.push(
                    pkey,
                    format!("{port} is not a TCP port; expected a port between 1 and 65535"),
                ),
                Ok(port) if ports.contains(&port) => p.push(
                    pkey,
                    format!("{port} is listed twice; expected each port once"),
                ),
                Ok(port) => ports.push(port),
            }
        }
        if !tls && t.plaintext_ports.as_ref().is_none_or(|v| v.is_empty()) {
            p.push(
                &key,
                "has tls = false and no plaintext_ports, so nothing would be captured; expected \
                 tls = true, or the server ports in plaintext_ports",
            );
        }

        let name = match t.name {
            Some(n) => {
                if n.trim().is_empty() || has_control(&n) {
                    p.push(
                        format!("{key}.name"),
                        format!("{n:?} is empty or has control characters; expected a service label like \"nginx\""),
                    );
                }
                n
            }
            None => matcher.as_ref().map(derived_name).unwrap_or_default(),
        };

        if let Some(m) = matcher {
            if let Some(first) = seen.get(&m) {
                p.push(
                    &key,
                    format!("matches the same processes as targets[{first}]; expected each target once (merge the two)"),
                );
            } else {
                seen.insert(m.clone(), i);
            }
            out.push(Target {
                matcher: m,
                tls,
                plaintext_ports: ports,
                name,
            });
        }
    }
    out
}

fn check_matcher(t: &RawTarget, key: &str, p: &mut Problems) -> Option<TargetMatch> {
    if let Some(exe) = &t.exe {
        let path = Path::new(exe);
        if !path.is_absolute() || exe.ends_with('/') || path.file_name().is_none() {
            p.push(
                format!("{key}.exe"),
                format!("{exe:?} is not an absolute path to a file; expected the executable's path like \"/usr/sbin/nginx\""),
            );
            return None;
        }
        return Some(TargetMatch::Exe(path.to_path_buf()));
    }
    if let Some(comm) = &t.comm {
        if comm.is_empty() || comm.len() > MAX_COMM_LEN || comm.contains('\0') {
            p.push(
                format!("{key}.comm"),
                format!(
                    "{comm:?} is {} bytes long; expected a process name of 1 to {MAX_COMM_LEN} bytes, \
                     as the kernel keeps it (see /proc/<pid>/comm)",
                    comm.len()
                ),
            );
            return None;
        }
        return Some(TargetMatch::Comm(comm.clone()));
    }
    if let Some(cg) = &t.cgroup {
        let ckey = format!("{key}.cgroup");
        if cg.starts_with("/sys/fs/cgroup") {
            p.push(
                ckey,
                format!("{cg:?} includes the cgroup2 mount point; expected the path relative to it, like \"/system.slice/nginx.service\""),
            );
            return None;
        }
        let bad_seg = cg
            .split('/')
            .skip(1)
            .any(|s| s.is_empty() || s == "." || s == "..");
        if !cg.starts_with('/') || (cg != "/" && bad_seg) || has_control(cg) {
            p.push(
                ckey,
                format!("{cg:?} is not a cgroup v2 path in absolute form; expected a path like \"/system.slice/nginx.service\""),
            );
            return None;
        }
        return Some(TargetMatch::Cgroup(cg.clone()));
    }
    if let Some(pid) = t.pid {
        return match u32::try_from(pid) {
            Ok(pid) if pid > 0 && pid <= 4_194_304 => Some(TargetMatch::Pid(pid)),
            _ => {
                p.push(
                    format!("{key}.pid"),
                    format!("{pid} is not a process id; expected a number between 1 and 4194304"),
                );
                None
            }
        };
    }
    None
}

fn check_routes(raw: Vec<RawRoute>, problems: &mut Problems) -> Vec<RouteConfig> {
    let mut local = Problems::default();
    let p = &mut local;
    let mut out = Vec::with_capacity(raw.len());
    let mut missing = vec![false; raw.len()];
    let mut names: HashMap<String, usize> = HashMap::new();
    for (i, r) in raw.into_iter().enumerate() {
        let key = format!("routes[{i}]");
        let route = match r.route {
            Some(route) => route,
            None => {
                missing[i] = true;
                p.push(
                    format!("{key}.route"),
                    format!(
                        "is missing; expected a path template like {:?}",
                        routes::TEMPLATE_EXAMPLE
                    ),
                );
                String::new()
            }
        };
        let name = match r.name {
            Some(n) => {
                if n.trim().is_empty() || has_control(&n) {
                    p.push(
                        format!("{key}.name"),
                        format!("{n:?} is empty or has control characters; expected an id like \"abook.person\""),
                    );
                }
                n
            }
            None => route.clone(),
        };
        if !missing[i] && !name.is_empty() {
            if let Some(&first) = names.get(&name) {
                // The same route string twice is reported once, on `.route`.
                if out
                    .get(first)
                    .is_none_or(|f: &RouteConfig| f.route != route)
                {
                    p.push(
                    format!("{key}.name"),
                    format!("{name:?} is already the name of routes[{first}]; expected a unique name per route"),
                );
                }
            } else {
                names.insert(name.clone(), i);
            }
        }
        let mut query_params: Vec<String> = Vec::new();
        for (j, q) in r.query_params.into_iter().flatten().enumerate() {
            let qkey = format!("{key}.query_params[{j}]");
            if q.is_empty() || has_control(&q) {
                p.push(qkey, format!("{q:?} is empty or has control characters; expected a parameter name like \"page\""));
            } else if query_params.contains(&q) {
                p.push(
                    qkey,
                    format!("{q:?} is listed twice; expected each parameter once"),
                );
            } else {
                query_params.push(q);
            }
        }
        out.push(RouteConfig {
            route,
            name,
            query_params,
        });
    }
    for e in routes::validate(&out) {
        if !missing[e.index()] {
            p.push(format!("routes[{}].route", e.index()), e.detail());
        }
    }
    // Report in file order: by route index, then as found.
    local.0.sort_by_key(|pr| {
        pr.key
            .strip_prefix("routes[")
            .and_then(|k| k.split(']').next())
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(usize::MAX)
    });
    problems.0.extend(local.0);
    out
}

/// The `{name}` / `{name*}` parameter names of a `METHOD /path` route string.
fn template_params(route: &str) -> Vec<String> {
    route
        .split('/')
        .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
        .map(|n| n.trim_end_matches('*').to_string())
        .collect()
}

fn check_output(raw: RawOutput, state_dir: &Path, p: &mut Problems) -> OutputConfig {
    let file = match raw.file {
        None => state_dir.join(DEFAULT_OUTPUT_FILE_NAME),
        Some(f) => {
            let path = PathBuf::from(&f);
            if !path.is_absolute() || f.ends_with('/') || path.file_name().is_none() {
                p.push(
                    "output.file",
                    format!("{f:?} is not an absolute path to a file; expected a path like \"/var/log/sparbar/access.jsonl\""),
                );
            }
            path
        }
    };
    let unmatched = match raw.unmatched.as_deref() {
        None | Some("count") => Unmatched::Count,
        Some("record") => Unmatched::Record,
        Some(other) => {
            p.push(
                "output.unmatched",
                format!("{other:?} is not a choice; expected \"count\" or \"record\""),
            );
            Unmatched::Count
        }
    };
    OutputConfig {
        file,
        stdout: raw.stdout.unwrap_or(false),
        unmatched,
    }
}

/// Every problem `parse` finds in `text`, one line each (a syntax error is one line; a valid
/// text none), for the tests of this module and its parts.
#[cfg(test)]
fn problem_lines(text: &str) -> Vec<String> {
    match parse(text, "s.toml") {
        Err(ConfigError::Invalid { problems, .. }) => {
            problems.iter().map(|p| p.to_string()).collect()
        }
        Err(e) => vec![e.to_string()],
        Ok(_) => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[agent]
host_name = "web-1"

[[targets]]
exe = "/usr/sbin/nginx"

[[routes]]
route = "GET /api/addressbook/persons/{id}"
"#;

    fn problems(text: &str) -> Vec<String> {
        match parse(text, "sparbar.toml") {
            Err(ConfigError::Invalid { problems, .. }) => {
                problems.iter().map(|p| p.to_string()).collect()
            }
            Err(e) => panic!("expected semantic problems, got: {e}"),
            Ok(_) => panic!("expected semantic problems, got a config"),
        }
    }

    #[test]
    fn defaults() {
        let c = parse(MINIMAL, "sparbar.toml").unwrap();
        assert_eq!(c.agent.state_dir, PathBuf::from("/var/lib/sparbar"));
        assert_eq!(c.agent.stats_interval, Duration::from_secs(10));
        assert_eq!(c.agent.host_name, "web-1");
        assert_eq!(
            c.capture,
            CaptureConfig {
                ring_buffer_size: 16 << 20,
                max_message_bytes: 256 << 10,
                queue_capacity: 65536,
                body_keep_bytes: 1 << 20,
                max_connections: 65536,
            }
        );
        assert_eq!(
            c.targets,
            vec![Target {
                matcher: TargetMatch::Exe("/usr/sbin/nginx".into()),
                tls: true,
                plaintext_ports: vec![],
                name: "nginx".into(),
            }]
        );
        assert_eq!(
            c.routes,
            vec![RouteConfig {
                route: "GET /api/addressbook/persons/{id}".into(),
                name: "GET /api/addressbook/persons/{id}".into(),
                query_params: vec![],
            }]
        );
        assert_eq!(
            c.output,
            OutputConfig {
                file: "/var/lib/sparbar/access.jsonl".into(),
                stdout: false,
                unmatched: Unmatched::Count,
            }
        );
        assert!(routes::RouteTable::new(&c.routes).is_ok());
    }

    #[test]
    fn metrics_listen() {
        let c = parse(MINIMAL, "x").unwrap();
        assert_eq!(c.agent.metrics_listen, None);
        assert!(!c.agent.metrics_allow_remote);
        for ok in ["127.0.0.1:9464", "[::1]:9464", "127.0.0.2:1"] {
            let text = MINIMAL.replace("[agent]", &format!("[agent]\nmetrics_listen = \"{ok}\""));
            let c = parse(&text, "x").unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(c.agent.metrics_listen, Some(ok.parse().unwrap()));
        }
        let remote = MINIMAL.replace("[agent]", "[agent]\nmetrics_listen = \"0.0.0.0:9464\"");
        let got = problems(&remote);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].starts_with("agent.metrics_listen: \"0.0.0.0:9464\" is not a loopback address")
                && got[0].contains("metrics_allow_remote = true"),
            "{got:?}"
        );
        let allowed = remote.replace("[agent]", "[agent]\nmetrics_allow_remote = true");
        let c = parse(&allowed, "x").unwrap();
        assert_eq!(
            c.agent.metrics_listen,
            Some("0.0.0.0:9464".parse().unwrap())
        );
        assert!(c.agent.metrics_allow_remote);
        for bad in ["localhost:9464", "127.0.0.1", "9464", ""] {
            let got = problems(
                &MINIMAL.replace("[agent]", &format!("[agent]\nmetrics_listen = \"{bad}\"")),
            );
            assert_eq!(
                got,
                vec![format!("agent.metrics_listen: {bad:?} is not an address and port; expected something like \"127.0.0.1:9464\"")]
            );
        }
    }

    #[test]
    fn default_host_name_is_the_systems() {
        let text = MINIMAL.replace("host_name = \"web-1\"", "");
        let c = parse(&text, "x").unwrap();
        assert!(!c.agent.host_name.is_empty());
    }

    #[test]
    fn example_file_parses() {
        let text = include_str!("../sparbar.example.toml");
        let c = parse(text, "sparbar.example.toml").unwrap_or_else(|e| panic!("{e}"));
        assert!(!c.targets.is_empty());
        assert!(!c.routes.is_empty());
        routes::RouteTable::new(&c.routes).unwrap();
    }

    #[test]
    fn full_config() {
        let text = r#"
[agent]
state_dir = "/srv/sparbar"
stats_interval = "500ms"
host_name = "web-2"

[capture]
ring_buffer_size = "64KiB"
max_message_bytes = 16384
queue_capacity = 10
body_keep_bytes = "0"
max_connections = 100

[[targets]]
comm = "nginx"
tls = false
plaintext_ports = [8081, 8082]

[[targets]]
cgroup = "/system.slice/app.service"

[[targets]]
pid = 1234
name = "legacy"

[[routes]]
route = "* /api/{rest*}"
name = "api.any"
query_params = ["page"]

[output]
stdout = true
unmatched = "record"
"#;
        let c = parse(text, "t").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.agent.stats_interval, Duration::from_millis(500));
        assert_eq!(c.capture.ring_buffer_size, 65536);
        assert_eq!(c.capture.max_message_bytes, 16384);
        assert_eq!(c.capture.queue_capacity, 10);
        assert_eq!(c.capture.body_keep_bytes, 0);
        assert_eq!(c.capture.max_connections, 100);
        assert_eq!(c.targets[0].matcher, TargetMatch::Comm("nginx".into()));
        assert_eq!(c.targets[0].plaintext_ports, vec![8081, 8082]);
        assert!(!c.targets[0].tls);
        assert_eq!(c.targets[1].name, "app");
        assert_eq!(c.targets[2].name, "legacy");
        assert_eq!(c.routes[0].name, "api.any");
        assert_eq!(c.routes[0].query_params, vec!["page".to_string()]);
        assert_eq!(c.output.file, PathBuf::from("/srv/sparbar/access.jsonl"));
        assert!(c.output.stdout);
        assert_eq!(c.output.unmatched, Unmatched::Record);
    }

    #[test]
    fn the_briefs_error_format() {
        let text = format!(
            "{MINIMAL}\n[[routes]]\nroute = \"GET /a\"\n[[routes]]\nroute = \"GET /api/{{id\"\n"
        );
        let err = parse(&text, "sparbar.toml").unwrap_err();
        assert_eq!(
            err.to_string(),
            "sparbar.toml: routes[2].route: \"GET /api/{id\" has an unclosed \"{\"; expected a \
             path template like \"GET /api/addressbook/persons/{id}\""
        );
    }

    #[test]
    fn collects_all_problems() {
        let text = r#"
[agent]
state_dir = "var/lib/sparbar"
stats_interval = "10"
host_name = "web 1"

[capture]
ring_buffer_size = "48MiB"
max_message_bytes = "8KiB"
queue_capacity = 0
body_keep_bytes = "1MB"
max_connections = -1

[[targets]]
exe = "nginx"

[[targets]]
comm = "a-very-long-process-name"
plaintext_ports = [0, 8080, 8080, 70000]

[[targets]]
exe = "/usr/bin/a"
pid = 3

[[targets]]
name = "x"

[[targets]]
cgroup = "/sys/fs/cgroup/system.slice/x.service"

[[targets]]
cgroup = "system.slice/x.service"
tls = false

[[targets]]
pid = 0

[[routes]]
route = "GET /a/{id}/{id}"

[[routes]]
route = "GET /b"
name = "b"
query_params = ["p", "p", ""]

[[routes]]
route = "GET /b"
name = "b2"

[[routes]]
name = "no-route"

[[routes]]
route = "GET /a/{x}"

[[routes]]
route = "GET /a/{y}"

[[routes]]
route = "GET /c"
name = "b"

[output]
file = "access.jsonl"
unmatched = "all"
"#;
        let got = problems(text);
        let want_prefixes = [
            "agent.state_dir: \"var/lib/sparbar\" is not an absolute path",
            "agent.stats_interval: \"10\" has no unit",
            "agent.host_name: \"web 1\"",
            "capture.ring_buffer_size: \"48MiB\" is not a power of two between 64KiB and 1GiB",
            "capture.max_message_bytes: \"8KiB\" is out of range; expected a size between 16KiB and 16MiB",
            "capture.body_keep_bytes: \"1MB\" uses the unit \"MB\"; sizes here are binary, write \"1MiB\"",
            "capture.queue_capacity: 0 is out of range",
            "capture.max_connections: -1 is out of range",
            "targets[0].exe: \"nginx\" is not an absolute path",
            "targets[1].comm: \"a-very-long-process-name\" is 24 bytes long",
            "targets[1].plaintext_ports[0]: 0 is not a TCP port",
            "targets[1].plaintext_ports[2]: 8080 is listed twice",
            "targets[1].plaintext_ports[3]: 70000 is not a TCP port",
            "targets[2]: has exe and pid; expected exactly one of exe, comm, cgroup or pid",
            "targets[3]: has none of exe, comm, cgroup, pid",
            "targets[4].cgroup: \"/sys/fs/cgroup/system.slice/x.service\" includes the cgroup2 mount point",
            "targets[5].cgroup: \"system.slice/x.service\" is not a cgroup v2 path",
            "targets[5]: has tls = false and no plaintext_ports",
            "targets[6].pid: 0 is not a process id",
            "routes[1].query_params[1]: \"p\" is listed twice",
            "routes[1].query_params[2]: \"\" is empty",
            "routes[6].name: \"b\" is already the name of routes[1]",
            "routes[3].route: is missing",
            "routes[0].route: \"GET /a/{id}/{id}\" uses {id} twice",
            "routes[2].route: \"GET /b\" is already configured as routes[1]",
            "routes[5].route: \"GET /a/{y}\" matches exactly the same requests as routes[4]",
            "output.file: \"access.jsonl\" is not an absolute path",
            "output.unmatched: \"all\" is not a choice; expected \"count\" or \"record\"",
        ];
        for w in want_prefixes {
            assert!(
                got.iter().any(|g| g.starts_with(w)),
                "missing problem {w:?} in:\n{}",
                got.join("\n")
            );
        }
        assert_eq!(got.len(), want_prefixes.len(), "{}", got.join("\n"));
        let route_idx: Vec<char> = got
            .iter()
            .filter_map(|g| g.strip_prefix("routes["))
            .filter_map(|g| g.chars().next())
            .collect();
        assert!(route_idx.windows(2).all(|w| w[0] <= w[1]), "{route_idx:?}");
        // Display: one line per problem, each naming the file.
        let err = parse(text, "sparbar.toml").unwrap_err().to_string();
        assert_eq!(err.lines().count(), want_prefixes.len());
        assert!(err.lines().all(|l| l.starts_with("sparbar.toml: ")));
    }

    #[test]
    fn empty_file() {
        let got = problems("");
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].starts_with("targets: no [[targets]] are configured"));
        assert!(got[1].starts_with("routes: no [[routes]] are configured"));
        // With unmatched = "record", routes may be empty.
        let c = parse(
            "[agent]\nhost_name='h'\n[[targets]]\npid=1\n[output]\nunmatched='record'\n",
            "t",
        )
        .unwrap();
        assert!(c.routes.is_empty());
        assert_eq!(c.targets[0].name, "pid-1");
    }

    #[test]
    fn unknown_keys_name_the_key_and_the_allowed_ones() {
        let text = format!("{MINIMAL}\n[[targets]]\nexe_path = \"/usr/bin/x\"\n");
        let err = parse(&text, "sparbar.toml").unwrap_err();
        let s = err.to_string();
        assert!(
            matches!(&err, ConfigError::Syntax(e) if e.line == Some(12) && e.column == Some(1)),
            "{s}"
        );
        assert!(
            s.starts_with("sparbar.toml:12:1: targets[1]: unknown field `exe_path`, expected one of `exe`, `comm`, `cgroup`, `pid`, `tls`, `plaintext_ports`, `name`"),
            "{s}"
        );
        assert!(s.contains("exe_path = \"/usr/bin/x\""), "{s}");

        let err = parse("[agnet]\nx = 1\n", "sparbar.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `agnet`"), "{err}");
        assert!(
            err.contains("`agent`, `capture`, `targets`, `routes`, `output`"),
            "{err}"
        );
        assert!(err.starts_with("sparbar.toml:1:"), "{err}");

        let err = parse("[output]\nstdout = true\nformat = 'x'\n", "f.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("f.toml:3:1: output: unknown field `format`"),
            "{err}"
        );
    }

    #[test]
    fn syntax_and_type_errors_keep_line_and_column() {
        let s = parse("[capture]\nqueue_capacity = '10'\n", "s.toml")
            .unwrap_err()
            .to_string();
        assert!(s.starts_with("s.toml:2:18: capture.queue_capacity: invalid type: string \"10\", expected an integer"), "{s}");
        let s = parse("[targets]\nexe = '/x'\n", "s.toml")
            .unwrap_err()
            .to_string();
        assert!(
            s.starts_with("s.toml:1:1: targets: [targets] is a single table; expected [[targets]]"),
            "{s}"
        );

        let err = parse("[agent]\nstate_dir = \n", "s.toml").unwrap_err();
        assert!(
            matches!(&err, ConfigError::Syntax(e) if e.line == Some(2)),
            "{err}"
        );

        let err = parse("[output]\nstdout = \"yes\"\n", "s.toml").unwrap_err();
        let s = err.to_string();
        assert!(
            s.starts_with(
                "s.toml:2:10: output.stdout: invalid type: string \"yes\", expected a boolean"
            ),
            "{s}"
        );

        let err = parse("[capture]\nring_buffer_size = true\n", "s.toml").unwrap_err();
        let s = err.to_string();
        assert!(
            s.contains("expected a size like \"16MiB\" or a whole number of bytes"),
            "{s}"
        );
        assert!(s.starts_with("s.toml:2:"), "{s}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("16 MiB"), Ok(16 << 20));
        assert_eq!(parse_size("12B"), Ok(12));
        for bad in [
            "",
            "MiB",
            "1.5MiB",
            "16mib",
            "16XB",
            "99999999999999999999",
            "17179869184GiB",
            "-1",
        ] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains("expected a size like"), "{bad}: {e}");
        }
        assert!(parse_size("16M").unwrap_err().contains("write \"16MiB\""));
        assert_eq!(format_size(16 << 20), "16MiB");
        assert_eq!(format_size(1000), "1000");
        assert_eq!(format_size(0), "0");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "10", "1.5s", "1d", "s", "1m30s", "-1s"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains("expected a duration like"), "{bad}: {e}");
        }
        let got = problems(&MINIMAL.replace("[agent]", "[agent]\nstats_interval = \"0s\""));
        assert_eq!(got.len(), 1);
        assert!(
            got[0].contains("out of range; expected a duration between 100ms and 24h"),
            "{got:?}"
        );
    }

    #[test]
    fn derived_names() {
        assert_eq!(
            derived_name(&TargetMatch::Cgroup("/system.slice/nginx.service".into())),
            "nginx"
        );
        assert_eq!(derived_name(&TargetMatch::Cgroup("/".into())), "root");
        assert_eq!(derived_name(&TargetMatch::Cgroup("/a/b".into())), "b");
        assert_eq!(
            derived_name(&TargetMatch::Comm("php-fpm".into())),
            "php-fpm"
        );
    }

    #[test]
    fn load_names_the_file() {
        let err = load(Path::new("/nonexistent/sparbar.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("/nonexistent/sparbar.toml: cannot read"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparbar.toml");
        fs::write(&path, MINIMAL).unwrap();
        assert!(load(&path).is_ok());
        fs::write(
            &path,
            "[[targets]]\nexe = 'x'\n[output]\nunmatched='record'\n",
        )
        .unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}: targets[0].exe", path.display())),
            "{err}"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]

        /// Whatever the text, parse returns a config or an error; it never panics.
        #[test]
        fn parse_never_panics(text in "\\PC{0,200}", cut in 0usize..4000, insert in "\\PC{0,8}") {
            let _ = parse(&text, "p");
            let example = include_str!("../sparbar.example.toml");
            let mut at = cut.min(example.len());
            while !example.is_char_boundary(at) {
                at -= 1;
            }
            let mutated = format!("{}{insert}{}", &example[..at], &example[at..]);
            let _ = parse(&mutated, "p").map_err(|e| e.to_string());
        }
    }
}
