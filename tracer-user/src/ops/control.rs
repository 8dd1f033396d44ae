//! The control socket: how `sparbar block`, `sparbar unblock`, `sparbar decisions` and `sparbar
//! status` talk to the running agent. A Unix socket in the state directory (mode 0600, so root only), one JSON
//! request line and one JSON answer line per connection.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

/// File name of the socket in the state directory.
pub const SOCKET_FILE: &str = "control.sock";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Block {
        scope: String,
        value: String,
        duration_ms: u64,
        reason: String,
    },
    Unblock {
        scope: String,
        value: String,
    },
    Decisions,
    /// What is traced, rates, decisions open, spool and sink lag, losses (`sparbar status`).
    Status,
    /// Moves the agent's detection clock forward (only with `run --test-clock`).
    Clock {
        advance_ms: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{path}: cannot connect to the agent's control socket ({source}); is `sparbar run` running with this configuration?")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the agent answered something that is not JSON: {0}")]
    BadAnswer(String),
}

/// One command and the channel its answer goes back on.
pub type Command = (Request, oneshot::Sender<Value>);

/// Listens on `<dir>/control.sock` and hands each request to the agent's loop.
pub fn listen(
    dir: &Path,
    tx: mpsc::Sender<Command>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(SOCKET_FILE);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = serve(stream, tx).await;
            });
        }
    }))
}

async fn serve(stream: UnixStream, tx: mpsc::Sender<Command>) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    BufReader::new(r)
        .take(64 * 1024)
        .read_line(&mut line)
        .await?;
    let answer = match serde_json::from_str::<Request>(line.trim()) {
        Ok(req) => {
            let (otx, orx) = oneshot::channel();
            if tx.send((req, otx)).await.is_err() {
                serde_json::json!({"ok": false, "error": "the agent is stopping"})
            } else {
                orx.await
                    .unwrap_or_else(|_| serde_json::json!({"ok": false, "error": "no answer"}))
            }
        }
        Err(e) => serde_json::json!({"ok": false, "error": format!("bad request: {e}")}),
    };
    let mut out = serde_json::to_vec(&answer).unwrap_or_default();
    out.push(b'\n');
    w.write_all(&out).await?;
    w.shutdown().await
}

use tokio::io::AsyncReadExt as _;

/// Sends one request to the agent whose state directory is `dir` (blocking; for the CLI).
pub fn call(dir: &Path, req: &Request) -> Result<Value, ControlError> {
    use std::io::{BufRead, Write};
    let path = dir.join(SOCKET_FILE);
    let mut s =
        std::os::unix::net::UnixStream::connect(&path).map_err(|source| ControlError::Connect {
            path: path.clone(),
            source,
        })?;
    let io = |source| ControlError::Io {
        path: path.clone(),
        source,
    };
    let mut line = serde_json::to_vec(req).unwrap_or_default();
    line.push(b'\n');
    s.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    std::io::BufReader::new(s)
        .read_line(&mut answer)
        .map_err(|e| ControlError::Io {
            path: path.clone(),
            source: e,
        })?;
    serde_json::from_str(answer.trim()).map_err(|_| ControlError::BadAnswer(answer))
}

/// `sparbar status`: asks the agent running with `config` and prints its answer, as a report
/// or (`json`) as the JSON document. Exit 0 when the agent answered, 1 when it did not, 2 when
/// the configuration cannot be read.
pub fn status_command(config: &Path, json: bool) -> u8 {
    let cfg = match crate::config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    match call(&cfg.agent.state_dir, &Request::Status) {
        Ok(v) if v["ok"] == Value::Bool(true) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                print!("{}", render_status(&v));
            }
            0
        }
        Ok(v) => {
            eprintln!("the agent refused the status request: {}", v["error"]);
            1
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

fn duration_text(secs: f64) -> String {
    let s = secs as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m {s:02}s"),
        (h, m, s) => format!("{h}h {m:02}m {s:02}s"),
    }
}

fn bytes_text(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// The status answer as a report for a terminal.
pub fn render_status(v: &Value) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let u = |x: &Value| x.as_u64().unwrap_or(0);
    let strs = |x: &Value| -> Vec<String> {
        x.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let _ = writeln!(
        o,
        "sparbar {} (pid {}), up {}",
        v["version"].as_str().unwrap_or("?"),
        u(&v["pid"]),
        duration_text(v["uptime_seconds"].as_f64().unwrap_or(0.0))
    );
    let targets = v["targets"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(o, "targets: {} processes traced", targets.len());
    for t in &targets {
        let tls = t["tls_libraries"].as_array().cloned().unwrap_or_default();
        let tls_text = if tls.is_empty() {
            if t["tls"] == Value::Bool(true) {
                "TLS: no OpenSSL probes attached".to_string()
            } else {
                "TLS: not traced (plaintext only)".to_string()
            }
        } else {
            tls.iter()
                .map(|l| {
                    let mut s = format!(
                        "TLS: {} ({}), probes: {}",
                        l["path"].as_str().unwrap_or("?"),
                        l["kind"].as_str().unwrap_or("?"),
                        strs(&l["probes"]).join(", ")
                    );
                    let errors = strs(&l["errors"]);
                    if !errors.is_empty() {
                        let _ = write!(s, "; failed: {}", errors.join("; "));
                    }
                    s
                })
                .collect::<Vec<_>>()
                .join("\n      ")
        };
        let _ = writeln!(
            o,
            "  pid {:<7} {:<15} target {:<12} {tls_text}",
            u(&t["pid"]),
            t["name"].as_str().unwrap_or("?"),
            t["target"].as_str().unwrap_or("?"),
        );
    }
    let failed = v["tracepoints"]["failed"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let _ = writeln!(
        o,
        "tracepoints: {} attached, {} failed{}",
        u(&v["tracepoints"]["attached"]),
        failed.len(),
        failed
            .iter()
            .map(|(n, e)| format!("\n  {n}: {}", e.as_str().unwrap_or("?")))
            .collect::<String>()
    );
    let r = &v["rates"];
    let _ = writeln!(
        o,
        "rates over the last {:.0} s: {:.1} exchanges/s, {:.1} records/s",
        r["window_seconds"].as_f64().unwrap_or(0.0),
        r["exchanges_per_second"].as_f64().unwrap_or(0.0),
        r["records_per_second"].as_f64().unwrap_or(0.0)
    );
    let _ = writeln!(
        o,
        "exchanges parsed: {}; records spooled: {}; open connections: {}",
        u(&v["exchanges_parsed_total"]),
        u(&v["records_spooled_total"]),
        u(&v["open_connections"])
    );
    let _ = writeln!(o, "decisions open: {}", u(&v["decisions_open"]));
    let streams = v["spool"]["streams"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let _ = writeln!(
        o,
        "spool: {} of {}",
        streams
            .iter()
            .map(|(s, x)| format!("{s} {}", bytes_text(u(&x["bytes"]))))
            .collect::<Vec<_>>()
            .join(", "),
        bytes_text(u(&v["spool"]["max_bytes"]))
    );
    let _ = writeln!(o, "sink lag (records not yet acknowledged):");
    for (sink, m) in v["sink_lag"].as_object().cloned().unwrap_or_default() {
        let _ = writeln!(
            o,
            "  {sink}: {}",
            m.as_object()
                .map(|m| m
                    .iter()
                    .map(|(s, n)| format!("{s} {}", u(n)))
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default()
        );
    }
    let losses = v["losses"].as_object().cloned().unwrap_or_default();
    if losses.is_empty() {
        let _ = writeln!(o, "losses: none");
    } else {
        let _ = writeln!(o, "losses:");
        for (n, x) in losses {
            let _ = writeln!(o, "  {n} {}", u(&x));
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn status_request_on_the_wire() {
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"cmd":"status"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"status"}"#).unwrap(),
            Request::Status
        );
    }

    #[test]
    fn status_report() {
        let v = json!({
            "ok": true, "version": "0.1.0", "pid": 42, "uptime_seconds": 3725.2,
            "targets": [
                {"pid": 100, "name": "nginx", "target": "nginx", "tls": true,
                 "tls_libraries": [{"path": "/usr/lib/libssl.so.3", "kind": "libssl",
                    "probes": ["SSL_read", "SSL_write"], "errors": []}]},
                {"pid": 200, "name": "python3", "target": "app", "tls": false, "tls_libraries": []}
            ],
            "tracepoints": {"attached": 9, "failed": {}},
            "rates": {"window_seconds": 60.0, "exchanges_per_second": 2.5, "records_per_second": 2.5},
            "exchanges_parsed_total": 150, "records_spooled_total": 152, "open_connections": 1,
            "decisions_open": 2,
            "spool": {"streams": {"access": {"bytes": 2048}, "security": {"bytes": 10}}, "max_bytes": 1073741824u64},
            "sink_lag": {"file": {"access": 0, "security": 1}},
            "losses": {"records_dropped_total{reason=\"spool_full\",stream=\"access\"}": 3}
        });
        let text = render_status(&v);
        for want in [
            "sparbar 0.1.0 (pid 42), up 1h 02m 05s\n",
            "targets: 2 processes traced\n",
            "pid 100",
            "TLS: /usr/lib/libssl.so.3 (libssl), probes: SSL_read, SSL_write",
            "TLS: not traced (plaintext only)",
            "rates over the last 60 s: 2.5 exchanges/s, 2.5 records/s\n",
            "exchanges parsed: 150; records spooled: 152; open connections: 1\n",
            "decisions open: 2\n",
            "spool: access 2.0 KiB, security 10 B of 1.0 GiB\n",
            "  file: access 0, security 1\n",
            "losses:\n  records_dropped_total{reason=\"spool_full\",stream=\"access\"} 3\n",
        ] {
            assert!(text.contains(want), "{want:?} not in:\n{text}");
        }
        assert_eq!(duration_text(59.9), "59s");
        assert_eq!(duration_text(61.0), "1m 01s");
    }
}
