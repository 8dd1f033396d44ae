//! The decision feed for a cooperating enforcement point (a reverse proxy, a WAF): on a local
//! address, `GET /decisions` answers the decisions in force as JSON, and `GET /decisions/stream`
//! streams them as JSON lines (`{"op":"add",…}` for each decision in force, then every addition
//! and every end as it happens, `{"op":"end",…}`), over chunked HTTP/1.1 that stays open.
//! The same set is also in `<state_dir>/decisions.json`.

use std::sync::{Arc, RwLock};

use bytes::Bytes;
use hyper::{body::Incoming, Method, Request, Response};
use serde_json::{json, Value};
use tokio::{
    net::TcpListener,
    sync::{broadcast, mpsc},
};

use crate::{
    detect::decide::Decision,
    ops::serve::{self, Body, Limits},
    stats::{Metric, Stats},
};

/// What the feed serves: the decisions in force, and a channel of changes.
#[derive(Clone)]
pub struct Feed {
    current: Arc<RwLock<Vec<Decision>>>,
    changes: broadcast::Sender<Value>,
    stats: Arc<Stats>,
}

impl Default for Feed {
    fn default() -> Self {
        Feed {
            current: Arc::new(RwLock::new(Vec::new())),
            changes: broadcast::channel(1024).0,
            stats: Arc::default(),
        }
    }
}

impl Feed {
    /// Counts the feed's failures (`feed_failures_total`, by reason) on `stats` instead of a
    /// set of its own.
    pub fn counting(mut self, stats: Arc<Stats>) -> Self {
        self.stats = stats;
        self
    }

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
        serve::serve(
            listener,
            Limits::LOCAL,
            self.stats.clone(),
            Metric::FeedFailures,
            move |req| feed.answer(&req),
        )
    }

    fn snapshot(&self) -> Vec<Decision> {
        self.current.read().map(|c| c.clone()).unwrap_or_default()
    }

    /// The routes match the request target exactly (a query string is another target).
    fn answer(&self, req: &Request<Incoming>) -> Response<Body> {
        let target = req.uri().path_and_query().map_or("", |p| p.as_str());
        match (req.method() == Method::GET, target) {
            (true, "/decisions") => {
                let body =
                    serde_json::to_vec(&json!({"decisions": self.snapshot()})).unwrap_or_default();
                serve::respond(200, Some("application/json"), Body::full(body))
            }
            (true, "/decisions/stream") => {
                // Subscribed before the snapshot is taken, so no change falls in between.
                let changes = self.changes.subscribe();
                let (tx, body) = Body::stream(16);
                tokio::spawn(stream(self.snapshot(), changes, tx));
                serve::respond(200, Some("application/x-ndjson"), body)
            }
            _ => serve::status(404, None),
        }
    }
}

/// Feeds one `/decisions/stream` client: an addition for each decision in force, then every
/// change, until the client goes away.
async fn stream(
    current: Vec<Decision>,
    mut changes: broadcast::Receiver<Value>,
    tx: mpsc::Sender<Bytes>,
) {
    for d in current {
        if tx
            .send(line(&json!({"op": "add", "decision": d})))
            .await
            .is_err()
        {
            return;
        }
    }
    loop {
        let v = tokio::select! {
            _ = tx.closed() => return,
            change = changes.recv() => match change {
                Ok(v) => v,
                // A reader too slow for 1024 changes is told to reload the set.
                Err(broadcast::error::RecvError::Lagged(k)) => json!({"op": "lagged", "missed": k}),
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        if tx.send(line(&v)).await.is_err() {
            return;
        }
    }
}

/// One JSON line.
fn line(v: &Value) -> Bytes {
    let mut line = serde_json::to_vec(v).unwrap_or_default();
    line.push(b'\n');
    line.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        detect::decide::{Origin, Scope},
        ops::serve::tests::{check_the_cap, eventually, exchange},
    };
    use std::{net::SocketAddr, time::Duration};
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
    };

    fn decision(id: &str) -> Decision {
        Decision {
            id: id.into(),
            scope: Scope::User,
            value: "42".into(),
            start_ms: 1,
            until_ms: 2,
            level: 1,
            origin: Origin::Operator,
            reason: "test".into(),
            rule_id: None,
            alert_event: None,
        }
    }

    async fn feed() -> (Feed, Arc<Stats>, SocketAddr, tokio::task::JoinHandle<()>) {
        let stats = Arc::new(Stats::default());
        let feed = Feed::default().counting(stats.clone());
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = feed.serve(l);
        (feed, stats, addr, task)
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

    /// One chunk of the stream: a JSON line.
    fn chunk(v: &Value) -> String {
        let line = format!("{v}\n");
        format!("{:x}\r\n{line}\r\n", line.len())
    }

    #[tokio::test]
    async fn the_decisions_in_force() {
        let (feed, stats, addr, _task) = feed().await;
        feed.publish(&[decision("d1")]);
        let r = exchange(addr, b"GET /decisions HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let body = json!({"decisions": [decision("d1")]}).to_string();
        let len = format!("Content-Length: {}", body.len());
        assert_eq!(
            split(&r),
            (
                "HTTP/1.1 200 OK",
                vec![
                    "Connection: close",
                    len.as_str(),
                    "Content-Type: application/json"
                ],
                body.as_str()
            )
        );
        let not_found = (
            "HTTP/1.1 404 Not Found",
            vec!["Connection: close", "Content-Length: 0"],
            "",
        );
        for req in [
            &b"GET /decisions?all HTTP/1.1\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\n\r\n",
            b"POST /decisions HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            b"HEAD /decisions HTTP/1.1\r\n\r\n",
        ] {
            let r = exchange(addr, req).await;
            assert_eq!(split(&r), not_found, "{}", String::from_utf8_lossy(req));
        }
        assert!(stats.snapshot().is_empty(), "{:?}", stats.snapshot());
    }

    #[tokio::test]
    async fn the_stream_sends_the_set_then_every_change() {
        let (feed, _stats, addr, _task) = feed().await;
        feed.publish(&[decision("d1")]);
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /decisions/stream HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut read_until = async |end: &str| {
            let read = async {
                while !String::from_utf8_lossy(&got).ends_with(end) {
                    let mut buf = [0u8; 4096];
                    let n = s.read(&mut buf).await.unwrap();
                    assert!(n > 0, "closed after {}", String::from_utf8_lossy(&got));
                    got.extend_from_slice(&buf[..n]);
                }
            };
            tokio::time::timeout(Duration::from_secs(10), read)
                .await
                .unwrap_or_else(|_| panic!("no {end:?} in {}", String::from_utf8_lossy(&got)));
            String::from_utf8(got.clone()).unwrap()
        };
        let first = chunk(&json!({"op": "add", "decision": decision("d1")}));
        let r = read_until(&first).await;
        assert_eq!(
            split(&r),
            (
                "HTTP/1.1 200 OK",
                vec![
                    "Connection: close",
                    "Content-Type: application/x-ndjson",
                    "Transfer-Encoding: chunked"
                ],
                first.as_str()
            )
        );
        feed.publish(&[decision("d2")]);
        let changes = chunk(&json!({"op": "add", "decision": decision("d2")}))
            + &chunk(&json!({"op": "end", "decision": decision("d1")}));
        let r = read_until(&changes).await;
        assert!(r.ends_with(&format!("{first}{changes}")), "{r}");
        // A client that goes away ends its subscription, with no change to notice it by.
        drop(s);
        eventually("the stream's subscription ends", || {
            feed.changes.receiver_count() == 0
        })
        .await;
    }

    #[tokio::test]
    async fn a_malformed_request_is_answered_400_and_counted() {
        let (_feed, stats, addr, _task) = feed().await;
        let r = exchange(addr, b"GET /decisions HTTP/9.9\r\n\r\n").await;
        assert_eq!(
            split(&r),
            (
                "HTTP/1.1 400 Bad Request",
                vec!["Connection: close", "Content-Length: 0"],
                ""
            )
        );
        eventually("the bad request is counted", || {
            stats.get_reason(Metric::FeedFailures, "bad_request") == 1
        })
        .await;
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_refused_and_counted() {
        let (_feed, stats, addr, _task) = feed().await;
        check_the_cap(
            addr,
            Limits::LOCAL,
            &stats,
            Metric::FeedFailures,
            b"GET /decisions HTTP/1.1\r\n\r\n",
            "HTTP/1.1 200 OK\r\n",
        )
        .await;
    }
}
