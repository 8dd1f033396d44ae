//! HTTP/2 through the whole connection parser. The traffic is made by a real HTTP/2
//! implementation (the `h2` crate, hyper's, with Huffman coding and the dynamic table) over an
//! in-memory pipe whose writes are recorded in order; what the recording does not cover
//! (padding, priority, CONTINUATION, table-size settings) is framed by hand.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};

use crate::exchange::{BodyLoss, Completeness, Exchange, Header};
use crate::http::{ConnParser, Dir, ParserLimits, Role};

fn header<'a>(hs: &'a [Header], name: &str) -> Option<&'a str> {
    crate::exchange::header(hs, name).and_then(|h| h.value_str())
}

type Log = Arc<Mutex<Vec<(Dir, Vec<u8>)>>>;

/// One end of the pipe; what it writes is logged as `dir`.
struct Rec {
    dir: Dir,
    log: Log,
    io: DuplexStream,
}

impl AsyncRead for Rec {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rec {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            let d = self.dir;
            self.log.lock().unwrap().push((d, buf[..*n].to_vec()));
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// What the test server does with a request.
#[derive(Clone, Copy)]
enum Answer {
    /// 200 with `n` bytes of body (`id=<path>;` then filler), in DATA frames of the crate's
    /// choosing, and a trailer when `trailer`.
    Body { n: usize, trailer: bool },
    /// RST_STREAM (REFUSED_STREAM) instead of an answer.
    Reset,
    /// 200 with a fixed gzip or br body.
    Encoded(&'static str),
}

pub(super) const BR_BODY: &str =
    "0b12807b22706572736f6e73223a5b7b226964223a227031227d2c7b226964223a227032227d5d7d03";
const PLAIN_BODY: &[u8] = br#"{"persons":[{"id":"p1"},{"id":"p2"}]}"#;

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Runs `reqs` (path, cookie crumbs, request body) concurrently through a real HTTP/2 client
/// and server; returns the bytes each wrote, in the order they wrote them.
fn traffic(reqs: Vec<(String, Vec<&'static str>, Vec<u8>)>, answer: Answer) -> Vec<(Dir, Vec<u8>)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let log: Log = Arc::default();
    rt.block_on(async {
        let (a, b) = tokio::io::duplex(1 << 16);
        let client_io = Rec {
            dir: Dir::Inbound,
            log: log.clone(),
            io: a,
        };
        let server_io = Rec {
            dir: Dir::Outbound,
            log: log.clone(),
            io: b,
        };
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io).await.unwrap();
            while let Some(r) = conn.accept().await {
                let Ok((req, mut respond)) = r else { break };
                tokio::spawn(async move {
                    let path = req.uri().path().to_string();
                    let mut body = req.into_body();
                    while let Some(d) = body.data().await {
                        let d = d.unwrap();
                        let _ = body.flow_control().release_capacity(d.len());
                    }
                    match answer {
                        Answer::Reset => respond.send_reset(h2::Reason::REFUSED_STREAM),
                        Answer::Body { n, trailer } => {
                            let rsp = http::Response::builder()
                                .status(200)
                                .header("content-type", "text/plain")
                                .body(())
                                .unwrap();
                            let mut s = respond.send_response(rsp, n == 0 && !trailer).unwrap();
                            if n > 0 || trailer {
                                let mut data = format!("id={path};").into_bytes();
                                data.resize(n.max(data.len()), b'x');
                                let mut rest = Bytes::from(data);
                                while !rest.is_empty() {
                                    let k = rest.len().min(5000);
                                    s.reserve_capacity(k);
                                    let chunk = rest.split_to(k);
                                    let end = rest.is_empty() && !trailer;
                                    s.send_data(chunk, end).unwrap();
                                }
                                if trailer {
                                    let mut t = http::HeaderMap::new();
                                    t.insert("x-checksum", "abc".parse().unwrap());
                                    s.send_trailers(t).unwrap();
                                }
                            }
                        }
                        Answer::Encoded(enc) => {
                            let body = if enc == "br" {
                                hex(BR_BODY)
                            } else {
                                super::super::tests::gzip(PLAIN_BODY)
                            };
                            let rsp = http::Response::builder()
                                .status(200)
                                .header("content-encoding", enc)
                                .body(())
                                .unwrap();
                            let mut s = respond.send_response(rsp, false).unwrap();
                            s.send_data(Bytes::from(body), true).unwrap();
                        }
                    }
                });
            }
        });
        let (client, conn) = h2::client::handshake(client_io).await.unwrap();
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut waits = Vec::new();
        for (path, crumbs, body) in reqs {
            let mut client = client.clone().ready().await.unwrap();
            let mut b = http::Request::builder()
                .method(if body.is_empty() { "GET" } else { "POST" })
                .uri(format!("https://school.example{path}"));
            for c in crumbs {
                b = b.header("cookie", c);
            }
            let (resp, mut stream) = client
                .send_request(b.body(()).unwrap(), body.is_empty())
                .unwrap();
            if !body.is_empty() {
                stream.send_data(Bytes::from(body), true).unwrap();
            }
            waits.push(tokio::spawn(async move {
                if let Ok(r) = resp.await {
                    let mut body = r.into_body();
                    while let Some(Ok(d)) = body.data().await {
                        let _ = body.flow_control().release_capacity(d.len());
                    }
                    let _ = body.trailers().await;
                }
            }));
        }
        for w in waits {
            w.await.unwrap();
        }
        drop(client);
        let _ = driver.await;
        server.abort();
    });
    let out = log.lock().unwrap().clone();
    out
}

/// Feeds the recorded writes to a parser, each split into pieces of at most `split` bytes.
fn parse(log: &[(Dir, Vec<u8>)], split: usize) -> (Vec<Exchange>, Vec<&'static str>) {
    let mut p = ConnParser::new(Role::Server, false, ParserLimits::default());
    let mut pos = [0u64; 2];
    let mut ts = 0;
    let mut ex = Vec::new();
    for (d, b) in log {
        for c in b.chunks(split.max(1)) {
            ts += 10;
            p.data(*d, pos[d.idx()], ts, c);
            pos[d.idx()] += c.len() as u64;
            ex.extend(p.take_exchanges());
        }
    }
    p.close_at(ts + 10, pos[0], pos[1]);
    ex.extend(p.take_exchanges());
    let reasons = p.take_anomalies().iter().map(|a| a.reason()).collect();
    ex.sort_by_key(|e| e.stream_id);
    (ex, reasons)
}

fn body_of(e: &Exchange) -> &[u8] {
    &e.response.as_ref().unwrap().body.data
}

#[test]
fn concurrent_streams_with_large_data_are_each_one_exchange() {
    let reqs: Vec<_> = (0..24)
        .map(|i| {
            (
                format!("/api/abook/{i}?schoolId=7"),
                vec!["sid=S3cr3t", "theme=dark"],
                if i % 3 == 0 {
                    vec![b'q'; 40_000]
                } else {
                    Vec::new()
                },
            )
        })
        .collect();
    let log = traffic(
        reqs,
        Answer::Body {
            n: 70_000,
            trailer: false,
        },
    );
    for split in [usize::MAX, 7, 1] {
        let (ex, reasons) = parse(&log, split);
        assert!(reasons.is_empty(), "split {split}: {reasons:?}");
        assert_eq!(ex.len(), 24, "split {split}");
        for e in &ex {
            let path = &e.request.target;
            let sid = e.stream_id.unwrap();
            assert_eq!(sid % 2, 1);
            assert_eq!(e.completeness, Completeness::Complete, "{path}");
            assert_eq!(header(&e.request.headers, "host"), Some("school.example"));
            // The crumbs are one header, joined as the server joins them.
            assert_eq!(
                header(&e.request.headers, "cookie"),
                Some("sid=S3cr3t; theme=dark")
            );
            let cookies = e
                .request
                .headers
                .iter()
                .filter(|h| h.name == "cookie")
                .count();
            assert_eq!(cookies, 1);
            let r = e.response.as_ref().unwrap();
            assert_eq!(r.status, 200);
            assert_eq!(r.body.wire_len, 70_000);
            assert!(body_of(e)
                .starts_with(format!("id={};", path.split('?').next().unwrap()).as_bytes()));
            let i: usize = path[11..].split('?').next().unwrap().parse().unwrap();
            let want = if i.is_multiple_of(3) { 40_000 } else { 0 };
            assert_eq!(e.request.method, if want > 0 { "POST" } else { "GET" });
            assert_eq!(e.request.body.wire_len, want);
        }
    }
}

#[test]
fn trailers_are_kept_apart_and_encoded_bodies_decoded() {
    let log = traffic(
        vec![("/t".into(), vec!["sid=a"], Vec::new())],
        Answer::Body {
            n: 100,
            trailer: true,
        },
    );
    let (ex, reasons) = parse(&log, 3);
    assert!(reasons.is_empty(), "{reasons:?}");
    let r = ex[0].response.as_ref().unwrap();
    assert_eq!(r.wire.trailers.len(), 1);
    assert_eq!(r.wire.trailers[0].name, "x-checksum");
    assert!(header(&r.headers, "x-checksum").is_none());

    for enc in ["gzip", "br"] {
        let log = traffic(
            vec![("/e".into(), vec![], Vec::new())],
            Answer::Encoded(enc),
        );
        let (ex, reasons) = parse(&log, 5);
        assert!(reasons.is_empty(), "{enc}: {reasons:?}");
        let b = &ex[0].response.as_ref().unwrap().body;
        assert_eq!(&b.data[..], PLAIN_BODY, "{enc}");
        assert_eq!(b.decoded_from.as_deref(), Some(enc));
        assert_eq!(b.loss, None);
    }
}

#[test]
fn a_reset_stream_has_no_answer_and_says_so() {
    let log = traffic(
        vec![("/r".into(), vec!["sid=a"], Vec::new())],
        Answer::Reset,
    );
    let (ex, reasons) = parse(&log, usize::MAX);
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].completeness, Completeness::NoResponse);
    assert!(ex[0].response.is_none());
    assert_eq!(ex[0].anomalies(), vec!["h2_stream_reset"]);
    assert_eq!(reasons, vec!["h2_stream_reset"]);
}

#[test]
fn a_hole_in_data_is_a_loss_and_a_hole_elsewhere_desynchronises() {
    let log = traffic(
        vec![
            ("/a".into(), vec!["sid=a"], Vec::new()),
            ("/b".into(), vec!["sid=a"], Vec::new()),
        ],
        Answer::Body {
            n: 30_000,
            trailer: false,
        },
    );
    // Cuts `len` bytes at stream offset `at` of `dir` (within one write).
    let run = |cut_dir: Dir, at: u64, len: u64| {
        let mut p = ConnParser::new(Role::Server, false, ParserLimits::default());
        let mut pos = [0u64; 2];
        let mut ts = 0;
        let mut ex = Vec::new();
        for (d, b) in &log {
            ts += 10;
            let start = pos[d.idx()];
            let end = start + b.len() as u64;
            if *d == cut_dir && at >= start && at + len <= end {
                let from = (at - start) as usize;
                let to = from + len as usize;
                p.data(*d, start, ts, &b[..from]);
                p.hole(*d, at, len, ts);
                p.data(*d, at + len, ts, &b[to..]);
            } else {
                p.data(*d, start, ts, b);
            }
            pos[d.idx()] = end;
            ex.extend(p.take_exchanges());
        }
        p.close_at(ts + 10, pos[0], pos[1]);
        ex.extend(p.take_exchanges());
        let reasons: Vec<&str> = p.take_anomalies().iter().map(|a| a.reason()).collect();
        (ex, reasons)
    };
    // Frame offsets of one direction's stream: (offset, type, length).
    let frames = |d: Dir| {
        let all: Vec<u8> = log
            .iter()
            .filter(|(x, _)| *x == d)
            .flat_map(|(_, b)| b.clone())
            .collect();
        let mut at = if d == Dir::Inbound { PREFACE.len() } else { 0 };
        let mut out = Vec::new();
        while at + 9 <= all.len() {
            let len = u32::from_be_bytes([0, all[at], all[at + 1], all[at + 2]]) as usize;
            out.push((at as u64, all[at + 3], len as u64));
            at += 9 + len;
        }
        out
    };
    // The largest DATA frame of the server: 100 bytes inside its payload are lost.
    let data = frames(Dir::Outbound)
        .into_iter()
        .filter(|f| f.1 == 0)
        .max_by_key(|f| f.2)
        .unwrap();
    assert!(data.2 > 300);
    let (ex, reasons) = run(Dir::Outbound, data.0 + 9 + 100, 100);
    assert_eq!(ex.len(), 2);
    let lossy: Vec<_> = ex
        .iter()
        .filter(|e| e.response.as_ref().unwrap().body.loss == Some(BodyLoss::NotCaptured))
        .collect();
    assert_eq!(lossy.len(), 1, "{reasons:?}");
    assert_eq!(lossy[0].response.as_ref().unwrap().body.wire_len, 30_000);
    assert_eq!(lossy[0].completeness, Completeness::Partial);
    assert!(reasons.contains(&"gap_in_body") && !reasons.contains(&"h2_desync"));

    // 5 bytes of the client's first HEADERS frame: the framing is lost, nothing is guessed.
    let headers = frames(Dir::Inbound).into_iter().find(|f| f.1 == 1).unwrap();
    let (ex, reasons) = run(Dir::Inbound, headers.0, 5);
    assert!(reasons.contains(&"h2_desync"), "{reasons:?}");
    assert!(ex.iter().all(|e| e.completeness != Completeness::Complete));
}

/// A frame by hand.
fn frame(typ: u8, flags: u8, sid: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.push(typ);
    f.push(flags);
    f.extend_from_slice(&sid.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn hpack(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut e = loona_hpack::Encoder::new();
    e.encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[test]
fn padding_priority_continuation_and_table_size_settings() {
    let req = hpack(&[
        (":method", "GET"),
        (":scheme", "https"),
        (":path", "/api/abook?schoolId=7"),
        (":authority", "school.example"),
        ("cookie", "sid=abc"),
        ("cookie", "x=1"),
    ]);
    // HEADERS with padding and priority, its block split over two CONTINUATIONs.
    let mut hp = vec![4u8];
    hp.extend_from_slice(&[0, 0, 0, 0, 16]);
    hp.extend_from_slice(&req[..5]);
    hp.extend_from_slice(&[0; 4]);
    let mut client = PREFACE.to_vec();
    client.extend(frame(4, 0, 0, &[]));
    client.extend(frame(1, 0x1 | 0x8 | 0x20, 1, &hp));
    client.extend(frame(9, 0, 1, &req[5..9]));
    client.extend(frame(9, 0x4, 1, &req[9..]));
    // The client raised the server's table to 8192: the server's block starts with a size
    // update to 8192, allowed by that setting only.
    let client_settings = frame(4, 0, 0, &[0, 1, 0, 0, 0x20, 0]);
    let mut resp_block = vec![0x3f, 0xe1, 0x3f]; // size update: 31 + 8161 = 8192
    resp_block.extend(hpack(&[(":status", "200")]));
    let mut server = frame(4, 0, 0, &[]).to_vec();
    server.extend(frame(1, 0x4, 1, &resp_block));
    // Padded DATA: 3 bytes of data, 2 of padding.
    server.extend(frame(0, 0x1 | 0x8, 1, &[2, b'a', b'b', b'c', 0, 0]));

    for with_setting in [true, false] {
        let mut p = ConnParser::new(Role::Server, false, ParserLimits::default());
        let mut c = client.clone();
        if with_setting {
            c.splice(
                PREFACE.len()..PREFACE.len(),
                client_settings.iter().copied(),
            );
        }
        p.data(Dir::Inbound, 0, 10, &c);
        p.data(Dir::Outbound, 0, 20, &server);
        p.close_at(30, c.len() as u64, server.len() as u64);
        let ex = p.take_exchanges();
        let reasons: Vec<&str> = p.take_anomalies().iter().map(|a| a.reason()).collect();
        assert_eq!(ex.len(), 1);
        let e = &ex[0];
        assert_eq!(e.request.target, "/api/abook?schoolId=7");
        assert_eq!(header(&e.request.headers, "cookie"), Some("sid=abc; x=1"));
        if with_setting {
            assert!(reasons.is_empty(), "{reasons:?}");
            assert_eq!(e.completeness, Completeness::Complete);
            assert_eq!(body_of(e), b"abc");
        } else {
            // Without the setting the server's decoder (and ours) refuses the update.
            assert_eq!(reasons, vec!["h2_hpack_error", "h2_desync"]);
            assert!(e.response.is_none());
            assert_eq!(e.completeness, Completeness::Partial);
        }
    }
}

#[test]
fn a_connection_first_seen_mid_life_is_counted_never_guessed() {
    let log = traffic(
        vec![
            ("/a".into(), vec!["sid=a"], Vec::new()),
            ("/b".into(), vec!["sid=a"], Vec::new()),
        ],
        Answer::Body {
            n: 100,
            trailer: false,
        },
    );
    // Everything after the client's preface and first frames, as a capture that started late
    // sees it: a frame boundary in each direction.
    let inb: Vec<u8> = log
        .iter()
        .filter(|(d, _)| *d == Dir::Inbound)
        .flat_map(|(_, b)| b.clone())
        .collect();
    let outb: Vec<u8> = log
        .iter()
        .filter(|(d, _)| *d == Dir::Outbound)
        .flat_map(|(_, b)| b.clone())
        .collect();
    let skip_frame = |b: &[u8], at: usize| {
        at + 9 + u32::from_be_bytes([0, b[at], b[at + 1], b[at + 2]]) as usize
    };
    let i0 = skip_frame(&inb, PREFACE.len());
    let o0 = skip_frame(&outb, 0);
    let mut p = ConnParser::new(Role::Server, false, ParserLimits::default());
    p.data(Dir::Outbound, 0, 5, &outb[o0..]);
    p.data(Dir::Inbound, 0, 10, &inb[i0..]);
    p.close(20);
    assert!(p.take_exchanges().is_empty());
    let reasons: Vec<&str> = p.take_anomalies().iter().map(|a| a.reason()).collect();
    assert_eq!(reasons, vec!["h2_midstream"]);
    assert_eq!(p.state(), crate::http::ConnProtocol::Http2Midstream);
}

/// A browser's preconnect that was never used: nginx sends its SETTINGS, the client nothing.
/// Not an HTTP/2 connection first seen mid-life, and nothing to parse.
#[test]
fn a_connection_the_client_never_spoke_on_is_no_anomaly() {
    let mut p = ConnParser::new(Role::Server, false, ParserLimits::default());
    p.data(Dir::Outbound, 0, 5, &frame(4, 0, 0, &[0, 3, 0, 0, 0, 128]));
    p.close_at(10, 0, 15);
    assert!(p.take_exchanges().is_empty());
    assert!(p.take_anomalies().is_empty());
    assert_eq!(p.state(), crate::http::ConnProtocol::Unknown);
}

#[test]
fn a_request_read_is_handed_over_before_its_answer() {
    let req = hpack(&[
        (":method", "GET"),
        (":scheme", "https"),
        (":path", "/api/me"),
        (":authority", "s"),
        ("cookie", "sid=abc"),
    ]);
    let mut c = PREFACE.to_vec();
    c.extend(frame(4, 0, 0, &[]));
    c.extend(frame(1, 0x5, 1, &req));
    let mut p = ConnParser::new(Role::Server, false, ParserLimits::default());
    p.keep_requests_read();
    // The server's SETTINGS come first; they wait for the client's preface.
    p.data(Dir::Outbound, 0, 5, &frame(4, 0, 0, &[]));
    p.data(Dir::Inbound, 0, 10, &c);
    let read = p.take_requests_read();
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].request.target, "/api/me");
    assert_eq!(header(&read[0].request.headers, "cookie"), Some("sid=abc"));
    assert!(p.take_anomalies().is_empty());
    assert_eq!(p.h2_frames(), Some([2, 1]));
}

/// A request body that fails to decode, with the request-time hand-over on: the failure is in
/// the request handed over, in the exchange, and counted once.
#[test]
fn a_request_body_decoding_error_is_kept_when_handed_over() {
    let req = hpack(&[
        (":method", "POST"),
        (":scheme", "https"),
        (":path", "/login"),
        (":authority", "s"),
        ("content-encoding", "gzip"),
    ]);
    let mut c = PREFACE.to_vec();
    c.extend(frame(4, 0, 0, &[]));
    c.extend(frame(1, 0x4, 1, &req));
    c.extend(frame(0, 0x1, 1, b"not gzip at all"));
    let mut s = frame(4, 0, 0, &[]);
    s.extend(frame(1, 0x5, 1, &hpack(&[(":status", "204")])));
    let mut p = ConnParser::new(Role::Server, false, ParserLimits::default());
    p.keep_requests_read();
    p.data(Dir::Inbound, 0, 10, &c);
    p.data(Dir::Outbound, 0, 20, &s);
    let read = p.take_requests_read();
    assert_eq!(read.len(), 2);
    assert!(read[1].body_read);
    assert_eq!(read[1].request.wire.anomalies, vec!["gzip_error"]);
    let ex = p.take_exchanges();
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].request.wire.anomalies, vec!["gzip_error"]);
    let reasons: Vec<&str> = p.take_anomalies().iter().map(|a| a.reason()).collect();
    assert_eq!(reasons, vec!["gzip_error"]);
}
