//! The decision feed for a cooperating enforcement point (a reverse proxy, a WAF): on a local
//! address, `GET /decisions` answers the decisions in force as JSON, and `GET /decisions/stream`
//! streams them as JSON lines (`{"op":"add",…}` for each decision in force, then every addition
//! and every end as it happens, `{"op":"end",…}`), over chunked HTTP/1.1 that stays open.
//! The same set is also in `<state_dir>/decisions.json`.

use std::sync::{Arc, RwLock};

use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::broadcast,
};

use crate::detect::decide::Decision;

/// What the feed serves: the decisions in force, and a channel of changes.
#[derive(Clone)]
pub struct Feed {
    current: Arc<RwLock<Vec<Decision>>>,
    changes: broadcast::Sender<Value>,
}

impl Default for Feed {
    fn default() -> Self {
        Feed {
            current: Arc::new(RwLock::new(Vec::new())),
            changes: broadcast::channel(1024).0,
        }
    }
}

impl Feed {
    /// Publishes the set in force; additions and ends are worked out against the previous set.
    pub fn publish(&self, now: &[Decision]) {
        let Ok(mut cur) = self.current.write() else {
            return;
        };
        for d in now.iter().filter(|d| !cur.iter().any(|c| c.id == d.id)) {
            let _ = self.changes.send(json!({"op": "add", "decision": d}));
        }
        for d in cur.iter().filter(|c| !now.iter().any(|d| d.id == c.id)) {
            let _ = self.changes.send(json!({"op": "end", "decision": d}));
        }
        *cur = now.to_vec();
    }

    /// Serves the feed on `listener` until the agent stops.
    pub fn serve(&self, listener: TcpListener) -> tokio::task::JoinHandle<()> {
        let feed = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                let f = feed.clone();
                tokio::spawn(async move {
                    let _ = f.answer(s).await;
                });
            }
        })
    }

    async fn answer(&self, mut s: TcpStream) -> std::io::Result<()> {
        let mut buf = vec![0u8; 8192];
        let mut n = 0;
        let path = loop {
            let r = s.read(&mut buf[n..]).await?;
            if r == 0 {
                return Ok(());
            }
            n += r;
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf[..n]) {
                Ok(httparse::Status::Complete(_)) => {
                    break (
                        req.method.unwrap_or("").to_string(),
                        req.path.unwrap_or("").to_string(),
                    );
                }
                Ok(httparse::Status::Partial) if n < buf.len() => continue,
                _ => {
                    return s
                        .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .await;
                }
            }
        };
        let snapshot = || self.current.read().map(|c| c.clone()).unwrap_or_default();
        match (path.0.as_str(), path.1.as_str()) {
            ("GET", "/decisions") => {
                let body =
                    serde_json::to_vec(&json!({"decisions": snapshot()})).unwrap_or_default();
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                s.write_all(head.as_bytes()).await?;
                s.write_all(&body).await
            }
            ("GET", "/decisions/stream") => {
                let mut rx = self.changes.subscribe();
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n")
                    .await?;
                for d in snapshot() {
                    chunk(&mut s, &json!({"op": "add", "decision": d})).await?;
                }
                loop {
                    match rx.recv().await {
                        Ok(v) => chunk(&mut s, &v).await?,
                        // A reader too slow for 1024 changes is told to reload the set.
                        Err(broadcast::error::RecvError::Lagged(k)) => {
                            chunk(&mut s, &json!({"op": "lagged", "missed": k})).await?
                        }
                        Err(broadcast::error::RecvError::Closed) => return Ok(()),
                    }
                }
            }
            _ => {
                s.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await
            }
        }
    }
}

async fn chunk(s: &mut TcpStream, v: &Value) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(v).unwrap_or_default();
    line.push(b'\n');
    s.write_all(format!("{:x}\r\n", line.len()).as_bytes())
        .await?;
    s.write_all(&line).await?;
    s.write_all(b"\r\n").await?;
    s.flush().await
}
