//! The `[spool]` table and the `[[sinks]]`: where the audit trail is kept on disk until every
//! destination has it, and the destinations (local files, stdout, syslog, Loki, Elasticsearch or
//! OpenSearch, OpenTelemetry). `output.file` and `output.stdout` stay as the short way to say
//! "a local file" and "standard output". The two [`Stream`]s a sink takes and the
//! [`BatchLimits`] it sets are defined here; shipping uses them (as `ship::Stream` and
//! `ship::BatchLimits`), so config depends on nothing of shipping.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{
    errors::Problems,
    values::{check_count, check_size, has_control, parse_duration, SizeValue},
};

/// The two streams, with separate spools: `access` is high volume; `security` (alerts,
/// decisions, gaps, checkpoints, agent state) is low volume, synced per record, never dropped,
/// and delivered before any access backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stream {
    Access,
    Security,
}

impl Stream {
    pub const ALL: [Stream; 2] = [Stream::Security, Stream::Access];

    pub fn name(self) -> &'static str {
        match self {
            Stream::Access => "access",
            Stream::Security => "security",
        }
    }

    pub fn from_name(s: &str) -> Option<Stream> {
        match s {
            "access" => Some(Stream::Access),
            "security" => Some(Stream::Security),
            _ => None,
        }
    }
}

/// How a destination wants its batches cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_records: usize,
    pub max_bytes: usize,
    /// How long a worker waits for a batch to fill before sending what it has.
    pub linger: Duration,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            max_records: 500,
            max_bytes: 1 << 20,
            linger: Duration::from_millis(200),
        }
    }
}

/// What to do when the access spool reaches `spool.max_bytes` or its disk is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFull {
    /// Refuse new access records (counted, and stated in a gap record) until sinks catch up.
    DropNew,
    /// Delete the oldest access segments even if a sink has not had them (each sink that
    /// misses records gets a gap record with the exact sequence range).
    DropOldest,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SpoolConfig {
    /// Default `<state_dir>/spool`.
    pub dir: PathBuf,
    /// Most bytes the access spool may hold on disk.
    pub max_bytes: u64,
    /// Segment size at which a stream's spool starts a new file.
    pub segment_bytes: u64,
    /// Space kept free on the spool's filesystem for the security stream (a preallocated file
    /// given up when the disk is full).
    pub security_reserve: u64,
    pub on_full: OnFull,
    /// How often the access spool is fdatasync'ed (the security spool is synced per record).
    pub access_sync: Duration,
    /// How often a signed checkpoint of both chains goes into the security stream.
    pub checkpoint_interval: Duration,
    /// How often the agent state record goes into the security stream.
    pub state_interval: Duration,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsClientConfig {
    /// PEM file of the CA certificates to trust instead of the system's.
    pub ca: Option<PathBuf>,
    /// Name to verify the server's certificate against, when not the host of the address.
    pub server_name: Option<String>,
    /// Client certificate and key (PEM), for receivers that require mutual TLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyslogTransport {
    /// RFC 6587 octet-counting over plain TCP.
    Tcp,
    /// RFC 5425: octet-counting over TLS.
    Tls,
    /// RELP (acknowledged per message), optionally over TLS.
    Relp,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FileSinkConfig {
    /// Absolute path; `{stream}` in it is replaced by `access` or `security`, otherwise both
    /// streams share the file.
    pub path: String,
    /// Rotate when the file reaches this size (0: never by size).
    pub rotate_bytes: u64,
    /// Rotate when the file is this old.
    pub rotate_interval: Option<Duration>,
    /// Rotated files kept (oldest deleted first).
    pub keep_files: usize,
    /// fdatasync each batch before acknowledging it.
    pub sync: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SyslogSinkConfig {
    /// `host:port`.
    pub address: String,
    pub transport: SyslogTransport,
    /// Some for `tls`, and for `relp` with `tls = true`.
    pub tls: Option<TlsClientConfig>,
    /// APP-NAME of RFC 5424.
    pub app_name: String,
    /// Facility number (default 13, log audit).
    pub facility: u8,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HttpSinkConfig {
    /// `http://` or `https://` URL of the endpoint (for Elasticsearch the cluster's base URL).
    pub url: String,
    pub tls: TlsClientConfig,
    pub gzip: bool,
    /// Extra request headers (authentication, tenant ids such as `X-Scope-OrgID`).
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SinkKind {
    File(FileSinkConfig),
    Stdout,
    Syslog(SyslogSinkConfig),
    /// Grafana Loki push API. Labels are fixed strings: never user ids (unbounded label values
    /// are what Loki forbids, and they would be personal data in the index).
    Loki {
        http: HttpSinkConfig,
        labels: BTreeMap<String, String>,
    },
    /// Elasticsearch/OpenSearch `_bulk` with `create` by `event.id`; `{stream}` in `index`.
    Elasticsearch {
        http: HttpSinkConfig,
        index: String,
    },
    /// OpenTelemetry OTLP/HTTP logs (JSON encoding).
    Otlp {
        http: HttpSinkConfig,
    },
}

impl SinkKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            SinkKind::File(_) => "file",
            SinkKind::Stdout => "stdout",
            SinkKind::Syslog(_) => "syslog",
            SinkKind::Loki { .. } => "loki",
            SinkKind::Elasticsearch { .. } => "elasticsearch",
            SinkKind::Otlp { .. } => "otlp",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SinkConfig {
    /// Unique; names the position files and counters (`[a-z0-9_-]`).
    pub name: String,
    pub streams: Vec<Stream>,
    pub batch: BatchLimits,
    pub kind: SinkKind,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSpool {
    dir: Option<String>,
    max_bytes: Option<SizeValue>,
    segment_bytes: Option<SizeValue>,
    security_reserve: Option<SizeValue>,
    on_full: Option<String>,
    access_sync: Option<String>,
    checkpoint_interval: Option<String>,
    state_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSink {
    #[serde(rename = "type")]
    type_: Option<String>,
    name: Option<String>,
    streams: Option<Vec<String>>,
    batch_records: Option<i64>,
    batch_bytes: Option<SizeValue>,
    batch_linger: Option<String>,
    // file
    path: Option<String>,
    rotate_bytes: Option<SizeValue>,
    rotate_interval: Option<String>,
    keep_files: Option<i64>,
    sync: Option<bool>,
    // syslog
    address: Option<String>,
    transport: Option<String>,
    tls: Option<bool>,
    app_name: Option<String>,
    facility: Option<i64>,
    // http
    url: Option<String>,
    gzip: Option<bool>,
    headers: Option<BTreeMap<String, String>>,
    labels: Option<BTreeMap<String, String>>,
    index: Option<String>,
    // tls (syslog tls/relp, https)
    ca: Option<String>,
    server_name: Option<String>,
    client_cert: Option<String>,
    client_key: Option<String>,
    timeout: Option<String>,
}

fn duration(p: &mut Problems, key: &str, v: Option<String>, default: Duration) -> Duration {
    match v {
        None => default,
        Some(t) => match parse_duration(&t) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                p.push(
                    key,
                    format!("{t:?} is zero; expected a duration like \"1s\""),
                );
                default
            }
            Err(e) => {
                p.push(key, e);
                default
            }
        },
    }
}

fn abs_path(p: &mut Problems, key: &str, v: &str) -> PathBuf {
    let path = PathBuf::from(v);
    if !path.is_absolute() {
        p.push(
            key,
            format!("{v:?} is not an absolute path; expected a path like \"/etc/sparbar/ca.pem\""),
        );
    }
    path
}

pub(super) fn check_spool(
    raw: RawSpool,
    state_dir: &std::path::Path,
    p: &mut Problems,
) -> SpoolConfig {
    let dir = match raw.dir {
        None => state_dir.join("spool"),
        Some(d) => abs_path(p, "spool.dir", &d),
    };
    let on_full = match raw.on_full.as_deref() {
        None | Some("drop_new") => OnFull::DropNew,
        Some("drop_oldest") => OnFull::DropOldest,
        Some(o) => {
            p.push(
                "spool.on_full",
                format!("{o:?} is not a choice; expected \"drop_new\" or \"drop_oldest\""),
            );
            OnFull::DropNew
        }
    };
    let max_bytes = check_size(
        p,
        "spool.max_bytes",
        raw.max_bytes,
        1 << 30,
        1 << 20,
        1 << 50,
        false,
    );
    let segment_bytes = check_size(
        p,
        "spool.segment_bytes",
        raw.segment_bytes,
        (8 << 20).min(max_bytes / 4).max(64 << 10),
        64 << 10,
        1 << 30,
        false,
    );
    if segment_bytes > max_bytes / 2 {
        p.push(
            "spool.segment_bytes",
            "is more than half of spool.max_bytes; expected segments of at most a half (a quarter or less is better)",
        );
    }
    SpoolConfig {
        dir,
        max_bytes,
        segment_bytes,
        security_reserve: check_size(
            p,
            "spool.security_reserve",
            raw.security_reserve,
            16 << 20,
            0,
            1 << 34,
            false,
        ),
        on_full,
        access_sync: duration(
            p,
            "spool.access_sync",
            raw.access_sync,
            Duration::from_secs(1),
        ),
        checkpoint_interval: duration(
            p,
            "spool.checkpoint_interval",
            raw.checkpoint_interval,
            Duration::from_secs(60),
        ),
        state_interval: duration(
            p,
            "spool.state_interval",
            raw.state_interval,
            Duration::from_secs(60),
        ),
    }
}

/// The fields each sink type takes besides the common ones.
fn allowed(type_: &str) -> &'static [&'static str] {
    match type_ {
        "file" => &[
            "path",
            "rotate_bytes",
            "rotate_interval",
            "keep_files",
            "sync",
        ],
        "stdout" => &[],
        "syslog" => &[
            "address",
            "transport",
            "tls",
            "app_name",
            "facility",
            "ca",
            "server_name",
            "client_cert",
            "client_key",
            "timeout",
        ],
        "loki" => &[
            "url",
            "gzip",
            "headers",
            "labels",
            "ca",
            "server_name",
            "client_cert",
            "client_key",
            "timeout",
        ],
        "elasticsearch" => &[
            "url",
            "gzip",
            "headers",
            "index",
            "ca",
            "server_name",
            "client_cert",
            "client_key",
            "timeout",
        ],
        "otlp" => &[
            "url",
            "gzip",
            "headers",
            "ca",
            "server_name",
            "client_cert",
            "client_key",
            "timeout",
        ],
        _ => &[],
    }
}

fn present(r: &RawSink) -> Vec<&'static str> {
    let mut v = Vec::new();
    macro_rules! f {
        ($($n:ident),*) => { $( if r.$n.is_some() { v.push(stringify!($n)); } )* };
    }
    f!(
        path,
        rotate_bytes,
        rotate_interval,
        keep_files,
        sync,
        address,
        transport,
        tls,
        app_name,
        facility,
        url,
        gzip,
        headers,
        labels,
        index,
        ca,
        server_name,
        client_cert,
        client_key,
        timeout
    );
    v
}

fn tls_of(r: &RawSink, key: &str, p: &mut Problems) -> TlsClientConfig {
    let cert = r
        .client_cert
        .as_deref()
        .map(|c| abs_path(p, &format!("{key}.client_cert"), c));
    let k = r
        .client_key
        .as_deref()
        .map(|c| abs_path(p, &format!("{key}.client_key"), c));
    if cert.is_some() != k.is_some() {
        p.push(
            key,
            "client_cert and client_key go together; expected both or neither",
        );
    }
    TlsClientConfig {
        ca: r
            .ca
            .as_deref()
            .map(|c| abs_path(p, &format!("{key}.ca"), c)),
        server_name: r.server_name.clone(),
        cert,
        key: k,
    }
}

fn http_of(r: &mut RawSink, key: &str, p: &mut Problems) -> HttpSinkConfig {
    let url = match r.url.take() {
        Some(u) if u.starts_with("http://") || u.starts_with("https://") => u,
        Some(u) => {
            p.push(
                format!("{key}.url"),
                format!("{u:?} is not an http:// or https:// URL"),
            );
            u
        }
        None => {
            p.push(key, "has no url; expected url = \"https://host:port/...\"");
            String::new()
        }
    };
    if r.ca.is_some() && url.starts_with("http://") {
        p.push(
            format!("{key}.ca"),
            "is set but the url is http://; expected an https:// url",
        );
    }
    let headers: Vec<(String, String)> = r.headers.take().unwrap_or_default().into_iter().collect();
    for (h, v) in &headers {
        if h.is_empty()
            || !h
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            || has_control(v)
        {
            p.push(format!("{key}.headers"), format!("{h:?} is not a valid header; expected a token name and a value without control characters"));
        }
    }
    HttpSinkConfig {
        tls: tls_of(r, key, p),
        url,
        gzip: r.gzip.unwrap_or(true),
        headers,
        timeout: duration(
            p,
            &format!("{key}.timeout"),
            r.timeout.take(),
            Duration::from_secs(10),
        ),
    }
}

/// `output.file`/`output.stdout` become sinks named `file` and `stdout`; `[[sinks]]` follow.
pub(super) fn check_sinks(
    raw: Vec<RawSink>,
    output_file: Option<&std::path::Path>,
    stdout: bool,
    p: &mut Problems,
) -> Vec<SinkConfig> {
    let mut out = Vec::new();
    if let Some(f) = output_file {
        out.push(SinkConfig {
            name: "file".into(),
            streams: vec![Stream::Security, Stream::Access],
            batch: BatchLimits {
                max_records: 1000,
                max_bytes: 1 << 20,
                linger: Duration::from_millis(50),
            },
            kind: SinkKind::File(FileSinkConfig {
                path: f.display().to_string(),
                rotate_bytes: 0,
                rotate_interval: None,
                keep_files: 0,
                sync: false,
            }),
        });
    }
    if stdout {
        out.push(SinkConfig {
            name: "stdout".into(),
            streams: vec![Stream::Security, Stream::Access],
            batch: BatchLimits {
                max_records: 1000,
                max_bytes: 1 << 20,
                linger: Duration::from_millis(50),
            },
            kind: SinkKind::Stdout,
        });
    }
    for (i, mut r) in raw.into_iter().enumerate() {
        let key = format!("sinks[{i}]");
        let Some(type_) = r.type_.clone() else {
            p.push(&key, "has no type; expected type = \"file\", \"stdout\", \"syslog\", \"loki\", \"elasticsearch\" or \"otlp\"");
            continue;
        };
        if !["file", "stdout", "syslog", "loki", "elasticsearch", "otlp"].contains(&type_.as_str())
        {
            p.push(format!("{key}.type"), format!("{type_:?} is not a sink type; expected \"file\", \"stdout\", \"syslog\", \"loki\", \"elasticsearch\" or \"otlp\""));
            continue;
        }
        for f in present(&r) {
            if !allowed(&type_).contains(&f) {
                p.push(
                    format!("{key}.{f}"),
                    format!(
                        "is not used by a {type_:?} sink; expected one of: {}",
                        allowed(&type_).join(", ")
                    ),
                );
            }
        }
        let name = r.name.clone().unwrap_or_else(|| type_.clone());
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            p.push(
                format!("{key}.name"),
                format!("{name:?} is not a sink name; expected up to 64 of a-z, 0-9, _ and -"),
            );
        }
        if out.iter().any(|s: &SinkConfig| s.name == name) {
            p.push(format!("{key}.name"), format!("{name:?} is already the name of another sink (output.file is \"file\", output.stdout is \"stdout\"); expected a unique name"));
        }
        let streams = match r.streams.take() {
            None => vec![Stream::Security, Stream::Access],
            Some(v) => {
                let mut s = Vec::new();
                for n in &v {
                    match Stream::from_name(n) {
                        Some(x) if !s.contains(&x) => s.push(x),
                        Some(_) => {}
                        None => p.push(
                            format!("{key}.streams"),
                            format!("{n:?} is not a stream; expected \"access\" or \"security\""),
                        ),
                    }
                }
                if s.is_empty() {
                    p.push(
                        format!("{key}.streams"),
                        "is empty; expected [\"access\"], [\"security\"] or both",
                    );
                }
                s.sort();
                s.reverse(); // security first
                s
            }
        };
        let batch = BatchLimits {
            max_records: check_count(
                p,
                &format!("{key}.batch_records"),
                r.batch_records,
                500,
                100_000,
            ) as usize,
            max_bytes: check_size(
                p,
                &format!("{key}.batch_bytes"),
                r.batch_bytes.take(),
                1 << 20,
                1 << 10,
                64 << 20,
                false,
            ) as usize,
            linger: duration(
                p,
                &format!("{key}.batch_linger"),
                r.batch_linger.take(),
                Duration::from_millis(200),
            ),
        };
        let kind = match type_.as_str() {
            "file" => {
                let path = match r.path.take() {
                    Some(f) => {
                        abs_path(p, &format!("{key}.path"), &f);
                        f
                    }
                    None => {
                        p.push(
                            &key,
                            "has no path; expected path = \"/var/log/sparbar/{stream}.jsonl\"",
                        );
                        String::new()
                    }
                };
                SinkKind::File(FileSinkConfig {
                    path,
                    rotate_bytes: check_size(
                        p,
                        &format!("{key}.rotate_bytes"),
                        r.rotate_bytes.take(),
                        0,
                        0,
                        1 << 40,
                        false,
                    ),
                    rotate_interval: r.rotate_interval.take().map(|t| {
                        duration(
                            p,
                            &format!("{key}.rotate_interval"),
                            Some(t),
                            Duration::from_secs(86400),
                        )
                    }),
                    keep_files: match r.keep_files {
                        None => 0,
                        Some(n) if (0..=100_000).contains(&n) => n as usize,
                        Some(n) => {
                            p.push(
                                format!("{key}.keep_files"),
                                format!("{n} is out of range; expected 0 (keep all) to 100000"),
                            );
                            0
                        }
                    },
                    sync: r.sync.unwrap_or(false),
                })
            }
            "stdout" => SinkKind::Stdout,
            "syslog" => {
                let address = match r.address.take() {
                    Some(a)
                        if a.rsplit_once(':').is_some_and(|(h, port)| {
                            !h.is_empty() && port.parse::<u16>().is_ok_and(|n| n > 0)
                        }) =>
                    {
                        a
                    }
                    Some(a) => {
                        p.push(
                            format!("{key}.address"),
                            format!(
                                "{a:?} is not host:port; expected e.g. \"logs.example.org:6514\""
                            ),
                        );
                        a
                    }
                    None => {
                        p.push(&key, "has no address; expected address = \"host:port\"");
                        String::new()
                    }
                };
                let transport = match r.transport.as_deref() {
                    None | Some("tcp") => SyslogTransport::Tcp,
                    Some("tls") => SyslogTransport::Tls,
                    Some("relp") => SyslogTransport::Relp,
                    Some(o) => {
                        p.push(
                            format!("{key}.transport"),
                            format!("{o:?} is not a choice; expected \"tcp\", \"tls\" or \"relp\""),
                        );
                        SyslogTransport::Tcp
                    }
                };
                let use_tls = match transport {
                    SyslogTransport::Tls => true,
                    SyslogTransport::Relp => r.tls.unwrap_or(false),
                    SyslogTransport::Tcp => {
                        if r.tls == Some(true) {
                            p.push(
                                format!("{key}.tls"),
                                "is true but transport is \"tcp\"; expected transport = \"tls\"",
                            );
                        }
                        false
                    }
                };
                let tls = tls_of(&r, &key, p);
                if !use_tls && (tls.ca.is_some() || tls.cert.is_some()) {
                    p.push(format!("{key}.ca"), "is set but the transport does not use TLS; expected transport = \"tls\", or tls = true with relp");
                }
                let app_name = r.app_name.take().unwrap_or_else(|| "sparbar".into());
                if app_name.is_empty()
                    || app_name.len() > 48
                    || !app_name.bytes().all(|b| (33..=126).contains(&b))
                {
                    p.push(format!("{key}.app_name"), format!("{app_name:?} is not an RFC 5424 APP-NAME; expected 1 to 48 printable ASCII characters without spaces"));
                }
                let facility = match r.facility {
                    None => 13,
                    Some(n) if (0..=23).contains(&n) => n as u8,
                    Some(n) => {
                        p.push(
                            format!("{key}.facility"),
                            format!("{n} is out of range; expected 0 to 23 (13 is log audit)"),
                        );
                        13
                    }
                };
                SinkKind::Syslog(SyslogSinkConfig {
                    address,
                    transport,
                    tls: use_tls.then_some(tls),
                    app_name,
                    facility,
                    timeout: duration(
                        p,
                        &format!("{key}.timeout"),
                        r.timeout.take(),
                        Duration::from_secs(10),
                    ),
                })
            }
            "loki" => {
                let labels = r.labels.take().unwrap_or_else(|| {
                    BTreeMap::from([("job".to_string(), "sparbar".to_string())])
                });
                for (k, v) in &labels {
                    if k.is_empty()
                        || !k.bytes().enumerate().all(|(i, b)| {
                            b.is_ascii_alphabetic() || b == b'_' || (i > 0 && b.is_ascii_digit())
                        })
                    {
                        p.push(
                            format!("{key}.labels"),
                            format!(
                                "{k:?} is not a Loki label name; expected [a-zA-Z_][a-zA-Z0-9_]*"
                            ),
                        );
                    }
                    if k == "stream" {
                        p.push(format!("{key}.labels"), "\"stream\" is set by the agent (access or security); expected another name");
                    }
                    if has_control(v) {
                        p.push(
                            format!("{key}.labels"),
                            format!("the value of {k:?} has control characters"),
                        );
                    }
                }
                SinkKind::Loki {
                    http: http_of(&mut r, &key, p),
                    labels,
                }
            }
            "elasticsearch" => {
                let index = r.index.take().unwrap_or_else(|| "sparbar-{stream}".into());
                if index.is_empty()
                    || index.starts_with(['-', '_', '+'])
                    || index
                        .bytes()
                        .any(|b| b.is_ascii_uppercase() || b"\\/*?\"<>| ,#:".contains(&b))
                {
                    p.push(format!("{key}.index"), format!("{index:?} is not an Elasticsearch index name; expected lowercase, without \\ / * ? \" < > | space , # :"));
                }
                SinkKind::Elasticsearch {
                    http: http_of(&mut r, &key, p),
                    index,
                }
            }
            _ => SinkKind::Otlp {
                http: http_of(&mut r, &key, p),
            },
        };
        out.push(SinkConfig {
            name,
            streams,
            batch,
            kind,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    const BASE: &str = r#"
[agent]
host_name = "web-1"
state_dir = "/srv/sp"
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
    fn defaults_give_the_embedded_file_sink_and_a_spool_under_the_state_dir() {
        let c = parse(BASE, "s.toml").unwrap();
        assert_eq!(c.spool.dir, PathBuf::from("/srv/sp/spool"));
        assert_eq!(c.spool.on_full, OnFull::DropNew);
        assert_eq!(c.sinks.len(), 1);
        assert_eq!(c.sinks[0].name, "file");
        assert_eq!(c.sinks[0].streams, vec![Stream::Security, Stream::Access]);
        assert!(matches!(&c.sinks[0].kind, SinkKind::File(f) if f.path == "/srv/sp/access.jsonl"));
    }

    #[test]
    fn every_sink_type_parses() {
        let c = parse(
            &format!(
                "{BASE}{}",
                r#"
[spool]
max_bytes = "64MiB"
on_full = "drop_oldest"
[[sinks]]
type = "syslog"
name = "siem"
address = "127.0.0.1:2514"
transport = "relp"
tls = true
ca = "/etc/ca.pem"
streams = ["security"]
[[sinks]]
type = "loki"
url = "https://l:3100/loki/api/v1/push"
labels = { job = "x" }
[[sinks]]
type = "elasticsearch"
url = "http://es:9200"
gzip = false
[[sinks]]
type = "otlp"
url = "http://c:4318/v1/logs"
batch_records = 10
batch_linger = "2s"
[[sinks]]
type = "file"
name = "arch"
path = "/var/log/s/{stream}.jsonl"
rotate_bytes = "1MiB"
keep_files = 3
"#
            ),
            "s.toml",
        )
        .unwrap();
        assert_eq!(c.spool.on_full, OnFull::DropOldest);
        let names: Vec<&str> = c.sinks.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["file", "siem", "loki", "elasticsearch", "otlp", "arch"]
        );
        assert!(
            matches!(&c.sinks[1].kind, SinkKind::Syslog(s) if s.transport == SyslogTransport::Relp && s.tls.as_ref().is_some_and(|t| t.ca.is_some()))
        );
        assert_eq!(c.sinks[1].streams, vec![Stream::Security]);
        assert!(
            matches!(&c.sinks[3].kind, SinkKind::Elasticsearch { http, index } if !http.gzip && index == "sparbar-{stream}")
        );
        assert_eq!(c.sinks[4].batch.max_records, 10);
        assert!(
            matches!(&c.sinks[5].kind, SinkKind::File(f) if f.keep_files == 3 && f.rotate_bytes == 1 << 20)
        );
    }

    #[test]
    fn mistakes_are_explained() {
        let p = problems(
            r#"
[spool]
on_full = "block"
access_sync = "0s"
[[sinks]]
type = "kafka"
[[sinks]]
type = "syslog"
address = "nohost"
transport = "udp"
url = "http://x"
[[sinks]]
type = "loki"
url = "ftp://x"
labels = { "user.id" = "1", stream = "x" }
[[sinks]]
type = "file"
name = "file"
[[sinks]]
type = "elasticsearch"
url = "http://es:9200"
index = "Sparbar"
streams = ["audit"]
"#,
        );
        let want = [
            "spool.on_full: \"block\" is not a choice",
            "spool.access_sync: \"0s\" is zero",
            "sinks[0].type: \"kafka\" is not a sink type",
            "sinks[1].url: is not used by a \"syslog\" sink",
            "sinks[1].address: \"nohost\" is not host:port",
            "sinks[1].transport: \"udp\" is not a choice",
            "sinks[2].labels: \"user.id\" is not a Loki label name",
            "sinks[2].labels: \"stream\" is set by the agent",
            "sinks[2].url: \"ftp://x\" is not an http:// or https:// URL",
            "sinks[3].name: \"file\" is already the name of another sink",
            "sinks[3]: has no path",
            "sinks[4].streams: \"audit\" is not a stream",
            "sinks[4].index: \"Sparbar\" is not an Elasticsearch index name",
        ];
        for w in want {
            assert!(p.iter().any(|l| l.contains(w)), "missing {w:?} in {p:#?}");
        }
        assert_eq!(p.len(), want.len() + 1, "{p:#?}"); // + streams is empty
    }
}
