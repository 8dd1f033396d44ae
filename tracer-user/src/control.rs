//! The control socket: how `sparbar block`, `sparbar unblock` and `sparbar decisions` talk to the
//! running agent. A Unix socket in the state directory (mode 0600, so root only), one JSON
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
