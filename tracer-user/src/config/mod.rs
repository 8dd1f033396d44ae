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

mod capture;
mod detection;
mod errors;
mod identity;
mod routes;
mod sinks;
mod targets;
#[cfg(test)]
mod tests;
mod values;

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

pub use self::{
    capture::{
        CaptureConfig, DEFAULT_BODY_KEEP_BYTES, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_MESSAGE_BYTES,
        DEFAULT_QUEUE_CAPACITY, DEFAULT_RING_BUFFER_SIZE,
    },
    detection::{BlockScope, By, DetectionConfig, Metric, Rule, RuleKind},
    errors::{ConfigError, Problem, SyntaxError},
    identity::{
        Cidr, ClientIpHeader, CredentialKind, CredentialOrder, DisclosureConfig, EndpointRule,
        IdentityConfig, JwtClaims, LoginRule, ProxyHeaders, RouteDisclosure,
    },
    sinks::{
        BatchLimits, FileSinkConfig, HttpSinkConfig, OnFull, SinkConfig, SinkKind, SpoolConfig,
        Stream, SyslogSinkConfig, SyslogTransport, TlsClientConfig,
    },
    targets::{Target, TargetMatch},
    values::{format_size, parse_duration, parse_size},
};
use self::{
    errors::{syntax_error, Problems},
    values::format_duration,
};
pub use crate::attribute::routes::RouteConfig;

/// Default cap of `url.path` in records, in bytes.
pub const DEFAULT_MAX_PATH_BYTES: usize = 1024;
/// Default cap of each path parameter value (`sparbar.route.params`), in bytes.
pub const DEFAULT_MAX_PARAM_BYTES: usize = 128;
/// Default cap of each allow-listed query value (`url.query`), in bytes.
pub const DEFAULT_MAX_QUERY_VALUE_BYTES: usize = 128;

/// Length caps on the request-controlled strings a record copies (`[output]` keys
/// `max_path_bytes`, `max_param_bytes`, `max_query_value_bytes`): a crafted 8 KiB path must not
/// make every record 8 KiB. A cut value is cut at a UTF-8 boundary, and the record lists the
/// cut fields in `sparbar.truncated`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldCaps {
    pub path: usize,
    pub param: usize,
    pub query_value: usize,
}

impl Default for FieldCaps {
    fn default() -> Self {
        FieldCaps {
            path: DEFAULT_MAX_PATH_BYTES,
            param: DEFAULT_MAX_PARAM_BYTES,
            query_value: DEFAULT_MAX_QUERY_VALUE_BYTES,
        }
    }
}

pub const DEFAULT_STATE_DIR: &str = "/var/lib/sparbar";
pub const DEFAULT_STATS_INTERVAL: Duration = Duration::from_secs(10);
/// File name of the records file inside `agent.state_dir` when `output.file` is not set.
pub const DEFAULT_OUTPUT_FILE_NAME: &str = "access.jsonl";

const MIN_STATS_INTERVAL: Duration = Duration::from_millis(100);
const MAX_STATS_INTERVAL: Duration = Duration::from_secs(24 * 3600);

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
    /// Already checked with [`crate::attribute::routes::validate`]:
    /// `RouteTable::new(&config.routes)` succeeds.
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
    /// Length caps of request strings in records.
    pub caps: FieldCaps,
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

// ---------------------------------------------------------------------------------------------
// Raw file layout.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    agent: RawAgent,
    #[serde(default)]
    capture: capture::RawCapture,
    #[serde(default)]
    targets: Vec<targets::RawTarget>,
    #[serde(default)]
    routes: Vec<routes::RawRoute>,
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
struct RawOutput {
    file: Option<String>,
    stdout: Option<bool>,
    unmatched: Option<String>,
    max_path_bytes: Option<i64>,
    max_param_bytes: Option<i64>,
    max_query_value_bytes: Option<i64>,
}

// ---------------------------------------------------------------------------------------------
// Validation.
// ---------------------------------------------------------------------------------------------

fn validate(raw: RawConfig, origin: &str) -> Result<Config, ConfigError> {
    let mut p = Problems::default();

    let agent = check_agent(raw.agent, &mut p);
    let capture = capture::check_capture(raw.capture, &mut p);
    let targets = targets::check_targets(raw.targets, &mut p);
    let mut raw_routes = raw.routes;
    let route_disclosures: Vec<Option<identity::RawRouteDisclosure>> =
        raw_routes.iter_mut().map(|r| r.disclosure.take()).collect();
    let routes = routes::check_routes(raw_routes, &mut p);
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
            let params = routes::template_params(&r.route);
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
    let d = FieldCaps::default();
    let caps = FieldCaps {
        path: values::check_count(
            p,
            "output.max_path_bytes",
            raw.max_path_bytes,
            d.path as i64,
            65_536,
        ) as usize,
        param: values::check_count(
            p,
            "output.max_param_bytes",
            raw.max_param_bytes,
            d.param as i64,
            65_536,
        ) as usize,
        query_value: values::check_count(
            p,
            "output.max_query_value_bytes",
            raw.max_query_value_bytes,
            d.query_value as i64,
            65_536,
        ) as usize,
    };
    OutputConfig {
        file,
        stdout: raw.stdout.unwrap_or(false),
        unmatched,
        caps,
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
