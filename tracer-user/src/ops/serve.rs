//! The one small HTTP/1.1 server behind the agent's local endpoints (the decision feed, the
//! Prometheus page): hyper on the agent's tokio runtime, with the limits that keep a client
//! from holding the agent up. At most [`Limits::max_connections`] connections at once (one more
//! is answered 503 and closed), a deadline for the request head counted from the connection's
//! start (so an idle connection is let go too), one request per connection (`Connection:
//! close`, as the endpoints always answered), and 400 for what is not HTTP (hyper answers it).
//! Each failure is counted on the endpoint's own counter, `<family>{reason="..."}`: `accept`,
//! `busy` (over the cap), `bad_request`, `timeout`.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use hyper::{
    body::{Bytes, Frame, Incoming, SizeHint},
    server::conn::http1,
    service::service_fn,
    Request, Response,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::TcpListener,
    sync::{mpsc, Semaphore},
    task::JoinHandle,
};

use crate::stats::{Metric, Stats};

/// What one server allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; one more is answered 503 and closed at once.
    pub max_connections: usize,
    /// Time from accepting a connection to the end of its request head.
    pub header_read_timeout: Duration,
    /// Time a whole connection may take, for endpoints whose answers are short (a scrape);
    /// `None` for endpoints that stream until the client goes away.
    pub max_connection_time: Option<Duration>,
}

impl Limits {
    /// For a local endpoint: 64 connections, 10 s for the request head, no overall limit.
    pub const LOCAL: Limits = Limits {
        max_connections: 64,
        header_read_timeout: Duration::from_secs(10),
        max_connection_time: None,
    };
}

/// What a connection over the cap is told before it is closed.
const BUSY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// Serves `listener` until the returned task is aborted or the runtime stops: each request goes
/// to `handler`, whose answer is sent as it is. Failures are counted on `stats` as
/// `family{reason="..."}`.
pub fn serve<H>(
    listener: TcpListener,
    limits: Limits,
    stats: Arc<Stats>,
    family: Metric,
    handler: H,
) -> JoinHandle<()>
where
    H: Fn(Request<Incoming>) -> Response<Body> + Clone + Send + Sync + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors, most likely: wait rather than spin.
                    log::debug!("{}: accept: {e}", family.name());
                    stats.add_reason(family, "accept", 1);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                stats.add_reason(family, "busy", 1);
                // Best effort: a fresh socket's send buffer takes these few bytes at once.
                let _ = stream.try_write(BUSY);
                continue;
            };
            let (stats, handler) = (stats.clone(), handler.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let service = service_fn(move |req| {
                    let answer = handler(req);
                    async move { Ok::<_, Infallible>(answer) }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.header_read_timeout)
                    .keep_alive(false)
                    .title_case_headers(true)
                    .serve_connection(TokioIo::new(stream), service);
                let outcome = match limits.max_connection_time {
                    Some(t) => match tokio::time::timeout(t, conn).await {
                        Ok(r) => r,
                        Err(_) => {
                            stats.add_reason(family, "timeout", 1);
                            return;
                        }
                    },
                    None => conn.await,
                };
                if let Err(e) = outcome {
                    log::debug!("{}: {e}", family.name());
                    if let Some(reason) = reason(&e) {
                        stats.add_reason(family, reason, 1);
                    }
                }
            });
        }
    })
}

/// The counted reason of a connection's error; `None` for a client that went away.
fn reason(e: &hyper::Error) -> Option<&'static str> {
    if e.is_timeout() {
        Some("timeout")
    } else if e.is_parse() {
        Some("bad_request")
    } else {
        None
    }
}

/// A response body: all of it at once, or a stream of pieces sent (chunked) as they come,
/// until their sender is dropped.
pub struct Body(Inner);

enum Inner {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl Body {
    pub fn empty() -> Body {
        Body(Inner::Full(None))
    }

    pub fn full(bytes: impl Into<Bytes>) -> Body {
        Body(Inner::Full(Some(bytes.into())))
    }

    /// A streamed body and its sender; `capacity` pieces wait before `send` waits.
    /// When the client goes away, the body is dropped and `send` fails.
    pub fn stream(capacity: usize) -> (mpsc::Sender<Bytes>, Body) {
        let (tx, rx) = mpsc::channel(capacity);
        (tx, Body(Inner::Stream(rx)))
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match &mut self.get_mut().0 {
            Inner::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Inner::Stream(rx) => rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.0, Inner::Full(None))
    }

    /// Exact for a whole body, so hyper sends `Content-Length` (also for HEAD); a stream is
    /// sent chunked.
    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Stream(_) => SizeHint::default(),
        }
    }
}

/// An answer with no body, and `Content-Type` when given. `Content-Length: 0` is written out,
/// as the endpoints always did, also to a HEAD (where hyper would leave it out).
pub fn status(code: u16, content_type: Option<&str>) -> Response<Body> {
    let mut r = respond(code, content_type, Body::empty());
    r.headers_mut().insert(
        hyper::header::CONTENT_LENGTH,
        hyper::header::HeaderValue::from_static("0"),
    );
    r
}

/// An answer with `body` and, when given, `Content-Type`.
pub fn respond(code: u16, content_type: Option<&str>, body: Body) -> Response<Body> {
    let mut r = Response::builder().status(code);
    if let Some(t) = content_type {
        r = r.header(hyper::header::CONTENT_TYPE, t);
    }
    r.body(body).unwrap_or_else(|_| {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
        r
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
    };

    /// Sends `request` raw and reads the whole answer, until the server closes.
    pub(crate) async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        String::from_utf8(out).unwrap()
    }

    /// Waits (bounded) until `cond` holds; for what another task does after answering.
    pub(crate) async fn eventually(what: &str, cond: impl Fn() -> bool) {
        for _ in 0..500 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never happened: {what}");
    }

    /// Holds `limits.max_connections` connections open (each with a request head that never
    /// ends), checks that one more is answered 503, closed and counted, and that a slot frees
    /// up once a held connection goes away.
    pub(crate) async fn check_the_cap(
        addr: SocketAddr,
        limits: Limits,
        stats: &Stats,
        family: Metric,
        request: &[u8],
        ok_status_line: &str,
    ) {
        let mut held = Vec::new();
        for _ in 0..limits.max_connections {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /").await.unwrap();
            held.push(s);
        }
        // Connections are accepted in order, so the one over the cap is this one. It sends
        // nothing: closing a socket with unread input resets it, and the 503 could be lost.
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).await.unwrap();
        assert_eq!(
            r,
            "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(stats.get_reason(family, "busy"), 1);
        drop(held.pop());
        // The slot is freed by the server's task once it sees the close; until then a new
        // connection is still refused (a 503, or a reset when the request came first) and
        // counted, so retry.
        let mut refused = 0;
        loop {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut out = Vec::new();
            let answer = match s.write_all(request).await {
                Ok(()) => s.read_to_end(&mut out).await.map(|_| out),
                Err(e) => Err(e),
            };
            match answer {
                Ok(out) if out.starts_with(ok_status_line.as_bytes()) => break,
                Ok(out) => assert!(
                    out.starts_with(b"HTTP/1.1 503 "),
                    "{}",
                    String::from_utf8_lossy(&out)
                ),
                Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
            }
            refused += 1;
            assert!(refused < 500, "no slot was freed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(stats.get_reason(family, "busy"), 1 + refused);
    }

    /// A server of `/hello` and a two-line `/stream`, with a small cap and a short deadline.
    async fn hello(
        header_read_timeout: Duration,
    ) -> (SocketAddr, Arc<Stats>, JoinHandle<()>, Limits) {
        let limits = Limits {
            max_connections: 3,
            header_read_timeout,
            max_connection_time: None,
        };
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let task = serve(
            l,
            limits,
            stats.clone(),
            Metric::MetricsFailures,
            |req| match req.uri().path() {
                "/hello" => respond(200, Some("text/plain"), Body::full("hello\n")),
                "/stream" => {
                    let (tx, body) = Body::stream(4);
                    tokio::spawn(async move {
                        for piece in ["one\n", "two\n"] {
                            let _ = tx.send(Bytes::from_static(piece.as_bytes())).await;
                        }
                    });
                    respond(200, Some("text/plain"), body)
                }
                _ => status(404, None),
            },
        );
        (addr, stats, task, limits)
    }

    #[tokio::test]
    async fn answers_exactly() {
        let (addr, stats, _task, _) = hello(Duration::from_secs(10)).await;
        let r = exchange(addr, b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        let mut lines = head.split("\r\n");
        assert_eq!(lines.next(), Some("HTTP/1.1 200 OK"));
        let mut headers: Vec<&str> = lines.filter(|h| !h.starts_with("Date: ")).collect();
        headers.sort();
        assert_eq!(
            headers,
            [
                "Connection: close",
                "Content-Length: 6",
                "Content-Type: text/plain"
            ]
        );
        assert_eq!(body, "hello\n");

        let r = exchange(addr, b"GET /other HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 404 Not Found\r\n"), "{r}");
        assert!(r.contains("\r\nContent-Length: 0\r\n"), "{r}");
        assert!(!r.contains("Content-Type"), "{r}");

        let r = exchange(addr, b"GET /stream HTTP/1.1\r\n\r\n").await;
        assert!(r.contains("\r\nTransfer-Encoding: chunked\r\n"), "{r}");
        assert!(
            r.ends_with("\r\n\r\n4\r\none\n\r\n4\r\ntwo\n\r\n0\r\n\r\n"),
            "{r}"
        );
        assert!(stats.snapshot().is_empty(), "{:?}", stats.snapshot());
    }

    #[tokio::test]
    async fn a_malformed_request_is_answered_400_and_counted() {
        let (addr, stats, _task, _) = hello(Duration::from_secs(10)).await;
        let r = exchange(addr, b"\x01\x02 nonsense\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{r}");
        eventually("the bad request is counted", || {
            stats.get_reason(Metric::MetricsFailures, "bad_request") == 1
        })
        .await;
    }

    #[tokio::test]
    async fn a_silent_or_slow_client_is_let_go_and_counted() {
        let (addr, stats, _task, _) = hello(Duration::from_millis(200)).await;
        // Connects and says nothing: closed once the head deadline passes.
        let mut idle = TcpStream::connect(addr).await.unwrap();
        let mut out = Vec::new();
        idle.read_to_end(&mut out).await.unwrap();
        // Starts a head and never ends it.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /hello HTTP/1.1\r\n").await.unwrap();
        slow.read_to_end(&mut out).await.unwrap();
        eventually("both timeouts are counted", || {
            stats.get_reason(Metric::MetricsFailures, "timeout") == 2
        })
        .await;
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_refused_and_counted() {
        let (addr, stats, _task, limits) = hello(Duration::from_secs(10)).await;
        check_the_cap(
            addr,
            limits,
            &stats,
            Metric::MetricsFailures,
            b"GET /hello HTTP/1.1\r\n\r\n",
            "HTTP/1.1 200 OK\r\n",
        )
        .await;
    }
}
