//! Tests of the HTTP/1.1 parser. They drive a whole connection (`ConnParser`) as the pipeline
//! does, so they sit beside it rather than beside the part each one exercises.

use std::io::Write;

use super::framing::parse_chunk_size;
use super::*;
use crate::exchange::{header, BodyLoss, Completeness, Header};
use crate::http::reassembly::StreamLimits;

const IN: Dir = Dir::Inbound;
const OUT: Dir = Dir::Outbound;

pub(super) fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn raw_deflate(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// A connection fed in order with increasing timestamps (10 ns apart).
struct Conn {
    p: ConnParser,
    pos: [u64; 2],
    ts: u64,
}

impl Conn {
    fn new(role: Role) -> Self {
        Self::with(role, false, ParserLimits::default())
    }

    fn with(role: Role, midstream: bool, limits: ParserLimits) -> Self {
        Conn {
            p: ConnParser::new(role, midstream, limits),
            pos: [0; 2],
            ts: 0,
        }
    }

    fn server() -> Self {
        Self::new(Role::Server)
    }

    fn send(&mut self, dir: Dir, bytes: &[u8]) -> &mut Self {
        self.ts += 10;
        self.p.data(dir, self.pos[dir.idx()], self.ts, bytes);
        self.pos[dir.idx()] += bytes.len() as u64;
        self
    }

    fn send_split(&mut self, dir: Dir, bytes: &[u8], n: usize) -> &mut Self {
        for c in bytes.chunks(n) {
            self.send(dir, c);
        }
        self
    }

    fn known_hole(&mut self, dir: Dir, len: u64) -> &mut Self {
        self.ts += 10;
        self.p.hole(dir, self.pos[dir.idx()], len, self.ts);
        self.pos[dir.idx()] += len;
        self
    }

    /// Bytes that never arrive (an unannounced loss).
    fn lose(&mut self, dir: Dir, len: u64) -> &mut Self {
        self.ts += 10;
        self.pos[dir.idx()] += len;
        self
    }

    fn ex(&mut self) -> Vec<Exchange> {
        self.p.take_exchanges()
    }

    fn reasons(&mut self) -> Vec<&'static str> {
        self.p
            .take_anomalies()
            .iter()
            .map(Anomaly::reason)
            .collect()
    }

    fn close(&mut self) -> Vec<Exchange> {
        self.ts += 10;
        self.p.close(self.ts);
        self.p.take_exchanges()
    }

    /// Close with the final positions known.
    fn close_at(&mut self) -> Vec<Exchange> {
        self.ts += 10;
        self.p.close_at(self.ts, self.pos[0], self.pos[1]);
        self.p.take_exchanges()
    }
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: example\r\n\r\n").into_bytes()
}

fn ok(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn hv<'a>(hs: &'a [Header], name: &str) -> Option<&'a str> {
    header(hs, name).and_then(Header::value_str)
}

fn pairs(ex: &[Exchange]) -> Vec<(String, Option<u16>, Completeness)> {
    ex.iter()
        .map(|e| {
            (
                e.request.target.clone(),
                e.response.as_ref().map(|r| r.status),
                e.completeness,
            )
        })
        .collect()
}

#[test]
fn simple_get_and_timestamps() {
    let mut c = Conn::server();
    c.send(IN, b"GET /a?b=c HTTP/1.1\r\nHost: x\r\n");
    c.send(IN, b"\r\n");
    c.send(
        OUT,
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Y: z\r\n\r\nhel",
    );
    c.send(OUT, b"lo");
    let ex = c.ex();
    assert_eq!(ex.len(), 1);
    let e = &ex[0];
    assert_eq!(e.request.method, "GET");
    assert_eq!(e.request.target, "/a?b=c");
    assert_eq!(e.request.minor_version, 1);
    assert_eq!(hv(&e.request.headers, "host"), Some("x"));
    assert_eq!((e.request.first_ns, e.request.last_ns), (10, 20));
    let r = e.response.as_ref().unwrap();
    assert_eq!((r.status, r.reason.as_str()), (200, "OK"));
    assert_eq!(&r.body.data[..], b"hello");
    assert_eq!(r.body.wire_len, 5);
    assert_eq!(r.body.loss, None);
    assert_eq!((r.first_ns, r.last_ns), (30, 40));
    assert_eq!(e.completeness, Completeness::Complete);
    assert!(!e.upgraded);
    assert_eq!(c.p.state(), ConnProtocol::Http1);
    assert!(c.reasons().is_empty());
    assert!(c.close().is_empty());
}

#[test]
fn keep_alive_and_request_bodies() {
    let mut c = Conn::server();
    for i in 0..3 {
        c.send(
            IN,
            format!("POST /p{i} HTTP/1.1\r\nContent-Length: 3\r\n\r\nab{i}").as_bytes(),
        );
        c.send(OUT, &ok(&format!("r{i}")));
    }
    let ex = c.ex();
    assert_eq!(ex.len(), 3);
    for (i, e) in ex.iter().enumerate() {
        assert_eq!(e.request.target, format!("/p{i}"));
        assert_eq!(&e.request.body.data[..], format!("ab{i}").as_bytes());
        assert_eq!(
            &e.response.as_ref().unwrap().body.data[..],
            format!("r{i}").as_bytes()
        );
    }
}

#[test]
fn pipelined_requests_pair_in_order() {
    let mut c = Conn::server();
    let mut reqs = Vec::new();
    for i in 0..4 {
        reqs.extend(get(&format!("/{i}")));
    }
    c.send(IN, &reqs);
    let mut resps = Vec::new();
    for i in 0..4 {
        resps.extend(ok(&format!("{i}")));
    }
    c.send_split(OUT, &resps, 7);
    let ex = c.ex();
    assert_eq!(ex.len(), 4);
    for (i, e) in ex.iter().enumerate() {
        assert_eq!(e.request.target, format!("/{i}"));
        assert_eq!(
            &e.response.as_ref().unwrap().body.data[..],
            format!("{i}").as_bytes()
        );
    }
}

#[test]
fn interim_responses_and_expect_continue() {
    let mut c = Conn::server();
    c.send(
        IN,
        b"PUT /up HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n",
    );
    c.send(OUT, b"HTTP/1.1 100 Continue\r\n\r\n");
    assert!(c.ex().is_empty());
    c.send(IN, b"data");
    c.send(OUT, b"HTTP/1.1 102 Processing\r\n\r\n");
    c.send(OUT, b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n");
    let ex = c.ex();
    assert_eq!(ex.len(), 1);
    assert_eq!(&ex[0].request.body.data[..], b"data");
    assert_eq!(ex[0].response.as_ref().unwrap().status, 201);
    assert_eq!(ex[0].completeness, Completeness::Complete);
}

#[test]
fn early_final_response_waits_for_request_body() {
    let mut c = Conn::server();
    c.send(IN, b"POST /big HTTP/1.1\r\nContent-Length: 6\r\n\r\nabc");
    c.send(OUT, b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n");
    assert!(c.ex().is_empty());
    c.send(IN, b"def");
    let ex = c.ex();
    assert_eq!(ex.len(), 1);
    assert_eq!(&ex[0].request.body.data[..], b"abcdef");
    assert_eq!(ex[0].response.as_ref().unwrap().status, 413);
}

#[test]
fn chunked_bodies_with_extensions_trailers_and_split_sizes() {
    let body =
        b"4;ext=1\r\nWiki\r\nB \r\npedia in \r\n\r\na;x\r\n chunks.!!\r\n0\r\nX-Trailer: t\r\n\r\n";
    let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
    let mut whole = head.to_vec();
    whole.extend_from_slice(body);
    for n in [1, 2, 3, 5, 1000] {
        let mut c = Conn::server();
        c.send(IN, &get("/c"));
        c.send_split(OUT, &whole, n);
        c.send(IN, &get("/next"));
        c.send(OUT, &ok("n"));
        let ex = c.ex();
        assert_eq!(ex.len(), 2, "split {n} {:?} {:?}", pairs(&ex), c.reasons());
        let r = ex[0].response.as_ref().unwrap();
        assert_eq!(&r.body.data[..], b"Wikipedia in \r\n chunks.!!");
        assert_eq!(r.body.wire_len, 4 + 11 + 10);
        assert_eq!(hv(&r.headers, "x-trailer"), None);
        assert_eq!(hv(&r.wire.trailers, "x-trailer"), Some("t"));
        assert_eq!(&ex[1].response.as_ref().unwrap().body.data[..], b"n");
        assert!(c.reasons().is_empty(), "split {n}");
    }
}

#[test]
fn chunked_upper_and_lower_hex_and_bare_lf() {
    let mut c = Conn::server();
    c.send(
        IN,
        b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n1a\nabcdefghijklmnopqrstuvwxyz\n0\n\n",
    );
    c.send(OUT, &ok(""));
    let ex = c.ex();
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].request.body.wire_len, 52);
}

#[test]
fn chunk_size_overflow_is_an_error() {
    assert_eq!(parse_chunk_size(b"ffffffffffffffff\r\n"), Some(u64::MAX));
    assert_eq!(parse_chunk_size(b"10000000000000000\r\n"), None);
    assert_eq!(parse_chunk_size(b"zz\r\n"), None);
    assert_eq!(parse_chunk_size(b"5 ; a=b\r\n"), Some(5));
    // nginx takes anything after SP, HT or `;` as an extension (Apache only `;ext`).
    assert_eq!(parse_chunk_size(b"5 x\r\n"), Some(5));
    assert_eq!(parse_chunk_size(b"5x\r\n"), None);
    let mut c = Conn::server();
    c.send(IN, &get("/a"));
    c.send(
        OUT,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\n",
    );
    assert!(c.reasons().contains(&"bad_chunk_size"));
    let ex = c.ex();
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].completeness, Completeness::Partial);
    assert_eq!(
        ex[0].response.as_ref().unwrap().body.loss,
        Some(BodyLoss::Incomplete)
    );
}

#[test]
fn responses_without_body_regardless_of_headers() {
    let mut c = Conn::server();
    c.send(IN, b"HEAD /h HTTP/1.1\r\n\r\n");
    c.send(IN, &get("/204"));
    c.send(IN, &get("/304"));
    c.send(IN, &get("/last"));
    c.send(OUT, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n");
    c.send(
        OUT,
        b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n",
    );
    c.send(
        OUT,
        b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    c.send(OUT, &ok("end"));
    let ex = c.ex();
    assert_eq!(
        ex.iter()
            .map(|e| e.response.as_ref().unwrap().status)
            .collect::<Vec<_>>(),
        vec![200, 204, 304, 200]
    );
    assert_eq!(ex[0].response.as_ref().unwrap().body.wire_len, 0);
    assert_eq!(&ex[3].response.as_ref().unwrap().body.data[..], b"end");
}

#[test]
fn close_delimited_response_finishes_at_close() {
    let mut c = Conn::server();
    c.send(IN, b"GET /old HTTP/1.0\r\n\r\n");
    c.send(OUT, b"HTTP/1.0 200 OK\r\n\r\nall of ");
    c.send(OUT, b"this");
    assert!(c.ex().is_empty());
    let ex = c.close();
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].request.minor_version, 0);
    let r = ex[0].response.as_ref().unwrap();
    assert_eq!(&r.body.data[..], b"all of this");
    assert_eq!(ex[0].completeness, Completeness::Complete);
}

#[test]
fn request_without_length_has_no_body_and_close_flushes_no_response() {
    let mut c = Conn::server();
    c.send(IN, b"POST /nolen HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n");
    c.send(OUT, &ok("1"));
    let ex = c.ex();
    assert_eq!(
        pairs(&ex),
        vec![("/nolen".into(), Some(200), Completeness::Complete)]
    );
    let ex = c.close();
    assert_eq!(
        pairs(&ex),
        vec![("/b".into(), None, Completeness::NoResponse)]
    );
}

#[test]
fn gzip_and_deflate_are_decoded() {
    let plain = b"the quick brown fox jumps over the lazy dog ".repeat(50);
    for (name, enc) in [
        ("gzip", gzip(&plain)),
        ("deflate", zlib(&plain)),
        ("deflate", raw_deflate(&plain)),
    ] {
        let mut c = Conn::server();
        c.send(IN, &get("/z"));
        let mut resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Encoding: {name}\r\nContent-Length: {}\r\n\r\n",
            enc.len()
        )
        .into_bytes();
        resp.extend_from_slice(&enc);
        c.send_split(OUT, &resp, 13);
        let ex = c.ex();
        let r = ex[0].response.as_ref().unwrap();
        assert_eq!(&r.body.data[..], &plain[..], "{name}");
        assert_eq!(r.body.wire_len, enc.len() as u64);
        assert_eq!(r.body.decoded_from.as_deref(), Some(name));
        assert_eq!(r.body.loss, None);
        assert!(c.reasons().is_empty());
    }
}

#[test]
fn gzip_in_chunked_request() {
    let plain = b"{\"user\":\"alice\"}";
    let enc = gzip(plain);
    let mut req =
        b"POST /j HTTP/1.1\r\nContent-Encoding: GZIP\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for part in enc.chunks(7) {
        req.extend(format!("{:X}\r\n", part.len()).as_bytes());
        req.extend(part);
        req.extend(b"\r\n");
    }
    req.extend(b"0\r\n\r\n");
    let mut c = Conn::server();
    c.send_split(IN, &req, 3);
    c.send(OUT, &ok(""));
    let ex = c.ex();
    assert_eq!(&ex[0].request.body.data[..], plain);
}

#[test]
fn decode_error_is_an_anomaly_not_a_panic() {
    let mut bad = gzip(b"hello hello hello hello");
    let n = bad.len();
    bad[n - 3] ^= 0xff; // corrupt the trailer (length)
    for (enc, body) in [
        ("gzip", bad),
        ("gzip", b"not gzip at all".to_vec()),
        ("deflate", vec![0xff; 20]),
    ] {
        let mut c = Conn::server();
        c.send(IN, &get("/e"));
        let mut resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Encoding: {enc}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        resp.extend_from_slice(&body);
        c.send(OUT, &resp);
        let ex = c.ex();
        let r = ex[0].response.as_ref().unwrap();
        assert_eq!(r.body.loss, Some(BodyLoss::DecodeError));
        assert_eq!(r.body.wire_len, body.len() as u64);
        let reasons = c.reasons();
        assert!(reasons.contains(&"gzip_error") || reasons.contains(&"deflate_error"));
        // Still a complete exchange: nothing was lost on the wire.
        assert_eq!(ex[0].completeness, Completeness::Complete);
    }
}

#[test]
fn gzip_bomb_is_bounded() {
    let plain = vec![0u8; 4 << 20];
    let enc = gzip(&plain);
    let limits = ParserLimits {
        body_keep_bytes: 1 << 20,
        max_decoded_bytes: 64 * 1024,
        ..ParserLimits::default()
    };
    let mut c = Conn::with(Role::Server, false, limits);
    c.send(IN, &get("/bomb"));
    let mut resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\n\r\n",
        enc.len()
    )
    .into_bytes();
    resp.extend_from_slice(&enc);
    c.send(OUT, &resp);
    let ex = c.ex();
    let r = ex[0].response.as_ref().unwrap();
    assert_eq!(r.body.data.len(), 64 * 1024);
    assert_eq!(r.body.loss, Some(BodyLoss::KeptLimit));
    assert_eq!(r.body.wire_len, enc.len() as u64);
}

#[test]
fn identity_body_keep_limit() {
    let limits = ParserLimits {
        body_keep_bytes: 4,
        ..ParserLimits::default()
    };
    let mut c = Conn::with(Role::Server, false, limits);
    c.send(IN, &get("/k"));
    c.send(OUT, &ok("0123456789"));
    let ex = c.ex();
    let r = ex[0].response.as_ref().unwrap();
    assert_eq!(&r.body.data[..], b"0123");
    assert_eq!(r.body.wire_len, 10);
    assert_eq!(r.body.loss, Some(BodyLoss::KeptLimit));
    assert_eq!(ex[0].completeness, Completeness::Complete);
}

#[test]
fn websocket_upgrade_stops_parsing() {
    let mut c = Conn::server();
    c.send(
        IN,
        b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x85junkframe",
    );
    c.send(
        OUT,
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello",
    );
    c.send(IN, b"GET /not-http HTTP/1.1\r\n\r\n");
    let ex = c.ex();
    assert_eq!(ex.len(), 1);
    assert!(ex[0].upgraded);
    assert_eq!(ex[0].response.as_ref().unwrap().status, 101);
    assert_eq!(c.p.state(), ConnProtocol::Upgraded);
    assert!(c.close().is_empty());
    assert!(c.reasons().is_empty());
}

#[test]
fn connect_tunnel_stops_parsing() {
    let mut c = Conn::new(Role::Client);
    c.send(
        OUT,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    );
    // The client may start the tunnel before the answer arrives.
    c.send(OUT, b"\x16\x03\x01\x00\x05hello");
    c.send(
        IN,
        b"HTTP/1.1 200 Connection Established\r\n\r\n\x16\x03\x03",
    );
    let ex = c.ex();
    assert_eq!(ex.len(), 1);
    assert!(ex[0].upgraded);
    assert_eq!(ex[0].request.method, "CONNECT");
    assert_eq!(ex[0].request.target, "example.com:443");
    assert_eq!(c.p.state(), ConnProtocol::Upgraded);
    assert!(c.reasons().is_empty());
}

#[test]
fn refused_connect_goes_on_as_http() {
    let mut c = Conn::new(Role::Client);
    c.send(OUT, b"CONNECT example.com:443 HTTP/1.1\r\n\r\n");
    c.send(IN, b"HTTP/1.1 407 Proxy Auth\r\nContent-Length: 0\r\n\r\n");
    c.send(OUT, &get("/after"));
    c.send(IN, &ok("x"));
    let ex = c.ex();
    assert_eq!(ex.len(), 2);
    assert!(!ex[0].upgraded);
    assert_eq!(ex[1].request.target, "/after");
    assert_eq!(c.p.state(), ConnProtocol::Http1);
}

#[test]
fn http2_preface_switches_to_http2() {
    let mut c = Conn::server();
    c.send_split(
        IN,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00",
        5,
    );
    c.send(OUT, b"\x00\x00\x00\x04\x01\x00\x00\x00\x00");
    assert_eq!(c.p.state(), ConnProtocol::Http2);
    assert!(c.reasons().is_empty());
    assert_eq!(c.p.h2_frames(), Some([0, 1]));
    // The client's SETTINGS frame was cut by the close.
    assert!(c.close().is_empty());
    assert_eq!(c.reasons(), vec!["truncated_at_close"]);
}

#[test]
fn tls_on_plaintext_is_ignored() {
    let mut c = Conn::new(Role::Unknown);
    c.send(IN, b"\x16");
    c.send(
        IN,
        b"\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03GET / HTTP/1.1\r\n\r\n",
    );
    c.send(OUT, &ok("x"));
    assert_eq!(c.p.state(), ConnProtocol::TlsOnPlaintext);
    assert_eq!(c.reasons(), vec!["tls_record_on_plaintext"]);
    assert!(c.close().is_empty());
}

#[test]
fn unknown_role_is_decided_from_content() {
    let mut c = Conn::new(Role::Unknown);
    c.send(OUT, &get("/out"));
    c.send(IN, &ok("in"));
    assert_eq!(c.p.role(), Role::Client);
    let ex = c.ex();
    assert_eq!(ex[0].request.target, "/out");

    let mut c = Conn::new(Role::Unknown);
    c.send(OUT, &ok("early")); // the response arrives first (reordered events)
    c.send(IN, &get("/in"));
    assert_eq!(c.p.role(), Role::Server);
    let ex = c.ex();
    assert_eq!(ex.len(), 1);
    assert_eq!(&ex[0].response.as_ref().unwrap().body.data[..], b"early");
}

#[test]
fn response_before_its_request_waits_for_it() {
    let mut c = Conn::server();
    // A HEAD response with Content-Length arrives before the HEAD request is seen: it must
    // not be framed with a body.
    c.send(OUT, b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n");
    c.send(OUT, &ok("second"));
    c.send(IN, b"HEAD /h HTTP/1.1\r\n\r\n");
    c.send(IN, &get("/g"));
    let ex = c.ex();
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[0].response.as_ref().unwrap().body.wire_len, 0);
    assert_eq!(&ex[1].response.as_ref().unwrap().body.data[..], b"second");
    assert!(c.reasons().is_empty());
}

#[test]
fn known_hole_in_content_length_body_is_skipped() {
    let mut c = Conn::server();
    c.send(IN, &get("/big"));
    c.send(
        OUT,
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",
    );
    c.known_hole(OUT, 80);
    c.send(OUT, b"abcdefghij");
    c.send(IN, &get("/next"));
    c.send(OUT, &ok("fine"));
    let ex = c.ex();
    assert_eq!(ex.len(), 2);
    let r = ex[0].response.as_ref().unwrap();
    assert_eq!(r.body.wire_len, 100);
    assert_eq!(r.body.loss, Some(BodyLoss::NotCaptured));
    assert_eq!(&r.body.data[..], b"0123456789");
    assert_eq!(ex[0].completeness, Completeness::Partial);
    assert_eq!(ex[1].completeness, Completeness::Complete);
    assert_eq!(&ex[1].response.as_ref().unwrap().body.data[..], b"fine");
    assert!(c.reasons().is_empty());
}

#[test]
fn known_hole_in_chunk_data_is_skipped() {
    let mut c = Conn::server();
    c.send(IN, &get("/c"));
    c.send(
        OUT,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n20\r\n0123",
    );
    c.known_hole(OUT, 28);
    c.send(OUT, b"\r\n3\r\nxyz\r\n0\r\n\r\n");
    c.send(IN, &get("/n"));
    c.send(OUT, &ok("n"));
    let ex = c.ex();
    assert_eq!(ex.len(), 2);
    let r = ex[0].response.as_ref().unwrap();
    assert_eq!(r.body.wire_len, 35);
    assert_eq!(r.body.loss, Some(BodyLoss::NotCaptured));
    assert_eq!(ex[1].completeness, Completeness::Complete);
}

#[test]
fn known_hole_ending_a_sendfile_body() {
    let mut c = Conn::server();
    c.send(IN, &get("/file"));
    c.send(OUT, b"HTTP/1.1 200 OK\r\nContent-Length: 4096\r\n\r\n");
    c.known_hole(OUT, 4096);
    c.send(IN, &get("/n"));
    c.send(OUT, &ok("n"));
    let ex = c.ex();
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[0].response.as_ref().unwrap().body.wire_len, 4096);
    assert_eq!(ex[1].response.as_ref().unwrap().status, 200);
    assert_eq!(ex[1].completeness, Completeness::Complete);
}

#[test]
fn unknown_gap_inside_a_known_body_is_skipped() {
    let limits = ParserLimits {
        stream: StreamLimits {
            max_pending_bytes: 1 << 20,
            max_pending_segments: 1,
        },
        ..ParserLimits::default()
    };
    let mut c = Conn::with(Role::Server, false, limits);
    c.send(IN, &get("/a"));
    c.send(
        OUT,
        b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n0123456789",
    );
    c.lose(OUT, 10);
    c.send(OUT, b"abcdefghij");
    c.send(IN, &get("/b"));
    c.send(OUT, &ok("b"));
    let ex = c.ex();
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[0].response.as_ref().unwrap().body.wire_len, 30);
    assert_eq!(ex[0].completeness, Completeness::Partial);
    assert_eq!(ex[1].completeness, Completeness::Complete);
    assert_eq!(c.reasons(), vec!["gap_in_body"]);
}

#[test]
fn hole_in_request_headers_resyncs_to_next_request() {
    let mut c = Conn::server();
    c.send(IN, b"GET /cut HTTP/1.1\r\nCookie: aaaa");
    c.known_hole(IN, 5000);
    c.send(IN, b"aaa\r\n\r\n");
    c.send(IN, &get("/after"));
    let r = c.reasons();
    assert!(r.contains(&"gap_resync"), "{r:?}");
    // The cut request is lost; its response answers nothing we know, and the number of
    // requests lost in 5000 bytes is uncertain: nothing is paired.
    c.send(OUT, &ok("cut"));
    c.send(OUT, &ok("after"));
    let ex = c.close();
    assert_eq!(
        pairs(&ex),
        vec![("/after".into(), None, Completeness::Partial)]
    );
}

/// A line that is not a request line: nginx (and Apache) answer 400 and close, so the answer
/// is recorded with an empty method and target and the anomaly, and what follows on the
/// connection is no request the server acted on (it is the refused request's body).
#[test]
fn malformed_request_line_is_recorded_with_the_edge_answer() {
    let mut c = Conn::server();
    c.send(IN, b"BAD\x01LINE\r\n\r\n");
    c.send(IN, &get("/good"));
    c.send(
        OUT,
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
    );
    let mut ex = c.ex();
    ex.extend(c.close_at());
    assert_eq!(
        pairs(&ex),
        vec![("".into(), Some(400), Completeness::Partial)]
    );
    assert_eq!(ex[0].request.method, "");
    assert_eq!(ex[0].anomalies(), vec!["malformed_request_line"]);
    assert_eq!(
        ex[0].request.body.wire_len,
        (b"\r\n".len() + get("/good").len()) as u64
    );
    assert_eq!(c.reasons(), vec!["malformed_request_line"]);
}

fn one_segment_limits() -> ParserLimits {
    ParserLimits {
        stream: StreamLimits {
            max_pending_bytes: 1 << 20,
            max_pending_segments: 1,
        },
        ..ParserLimits::default()
    }
}

#[test]
fn response_lost_in_gap_is_reported_and_pairing_resumes() {
    // Non-pipelined traffic. The gap cuts response 2 after its status line: /2 has no
    // response, and since /3 was sent after the gap, /3 and /4 pair with certainty.
    let mut c = Conn::with(Role::Server, false, one_segment_limits());
    c.send(IN, &get("/1"));
    c.send(OUT, &ok(&"one".repeat(20)));
    c.send(IN, &get("/2"));
    c.send(OUT, b"HTTP/1.1 200 OK\r\nX-For: 2\r\nCont");
    c.lose(OUT, 30);
    c.send(OUT, b"more body of 2\r\n"); // line starts in the body are not status lines
    c.send(IN, &get("/3"));
    c.send(OUT, &ok(&"three".repeat(20)));
    c.send(IN, &get("/4"));
    c.send(OUT, &ok(&"four".repeat(20)));
    let ex = c.ex();
    assert_eq!(
        pairs(&ex),
        vec![
            ("/1".into(), Some(200), Completeness::Complete),
            ("/2".into(), None, Completeness::Partial),
            ("/3".into(), Some(200), Completeness::Complete),
            ("/4".into(), Some(200), Completeness::Complete),
        ]
    );
    assert_eq!(
        &ex[2].response.as_ref().unwrap().body.data[..],
        "three".repeat(20).as_bytes()
    );
    let r = c.reasons();
    assert!(
        r.contains(&"gap_resync") && r.contains(&"response_lost"),
        "{r:?}"
    );
}

#[test]
fn gap_inside_a_response_body_keeps_pairing() {
    // The gap starts in response 1's chunked body and ends in the same body: /1 gets a
    // partial response; /2 was sent after the gap, so nothing else can have been lost.
    let mut c = Conn::with(Role::Server, false, one_segment_limits());
    c.send(IN, &get("/1"));
    c.send(
        OUT,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
    );
    c.lose(OUT, 20);
    c.send(OUT, b"xyz\r\n0\r\n\r\n");
    c.send(IN, &get("/2"));
    c.send(OUT, &ok("two"));
    let ex = c.close_at();
    assert_eq!(
        pairs(&ex),
        vec![
            ("/1".into(), Some(200), Completeness::Partial),
            ("/2".into(), Some(200), Completeness::Complete),
        ]
    );
}

#[test]
fn pipelined_gap_does_not_mispair() {
    // Four pipelined requests; the loss takes the end of response 1 and the start of
    // response 2. Whether one or two responses were lost cannot be told (the lost region
    // could hold several), and pipelining means a later response may answer any of the
    // candidates: nothing after the gap is paired.
    let limits = ParserLimits {
        stream: StreamLimits {
            max_pending_bytes: 1 << 20,
            max_pending_segments: 1,
        },
        ..ParserLimits::default()
    };
    let mut c = Conn::with(Role::Server, false, limits);
    for i in 1..=4 {
        c.send(IN, &get(&format!("/{i}")));
    }
    let r1 = format!(
        "HTTP/1.1 200 OK\r\nX-For: 1\r\nContent-Length: 40\r\n\r\n{}",
        "a".repeat(40)
    );
    let r2 = format!(
        "HTTP/1.1 200 OK\r\nX-For: 2\r\nContent-Length: 40\r\n\r\n{}",
        "b".repeat(40)
    );
    let r3 = "HTTP/1.1 200 OK\r\nX-For: 3\r\nContent-Length: 0\r\n\r\n";
    let r4 = "HTTP/1.1 200 OK\r\nX-For: 4\r\nContent-Length: 0\r\n\r\n";
    let cut = r1.len() - 20;
    c.send(OUT, &r1.as_bytes()[..cut]);
    c.lose(OUT, (20 + 30) as u64);
    c.send(OUT, &r2.as_bytes()[30..]);
    c.send(OUT, r3.as_bytes());
    c.send(OUT, r4.as_bytes());
    let ex = c.close();
    assert_eq!(ex.len(), 4);
    for e in &ex {
        if let Some(r) = &e.response {
            let id = hv(&r.headers, "x-for").unwrap();
            assert_eq!(e.request.target, format!("/{id}"), "{e:?}");
        }
    }
    assert!(ex[0].response.is_some());
}

#[test]
fn unprovable_loss_count_gives_up_pairing() {
    // The loss takes the end of response 1 and the start of response 2, status line
    // included. The lost region might hold only an interim (1xx) response, in which case
    // response 3 would answer /2: pairing stops rather than guess.
    let mut c = Conn::with(Role::Server, false, one_segment_limits());
    c.send(IN, &get("/1"));
    let r1 = format!(
        "HTTP/1.1 200 OK\r\nX-For: 1\r\nContent-Length: 40\r\n\r\n{}",
        "a".repeat(40)
    );
    let r2 = format!(
        "HTTP/1.1 200 OK\r\nX-For: 2\r\nContent-Length: 40\r\n\r\n{}",
        "b".repeat(40)
    );
    c.send(OUT, &r1.as_bytes()[..r1.len() - 20]);
    c.lose(OUT, 20);
    c.send(IN, &get("/2"));
    c.lose(OUT, 30);
    c.send(OUT, &r2.as_bytes()[30..]);
    c.send(IN, &get("/3"));
    c.send(OUT, &ok("3"));
    c.send(IN, &get("/4"));
    c.send(OUT, &ok("4"));
    let ex = c.close();
    assert_eq!(
        pairs(&ex),
        vec![
            ("/1".into(), Some(200), Completeness::Partial),
            ("/2".into(), None, Completeness::Partial),
            ("/3".into(), None, Completeness::Partial),
            ("/4".into(), None, Completeness::Partial),
        ]
    );
    let r = c.reasons();
    assert!(
        r.contains(&"pairing_uncertain") && r.contains(&"unpaired_response"),
        "{r:?}"
    );
}

#[test]
fn midstream_start_resyncs_and_does_not_pair() {
    let mut c = Conn::with(Role::Server, true, ParserLimits::default());
    c.send(IN, b"ody-of-previous\r\nGET /m HTTP/1.1\r\nHost: h\r\n\r\n");
    c.send(
        OUT,
        b"rest of a body\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    );
    let ex = c.close();
    assert_eq!(pairs(&ex), vec![("/m".into(), None, Completeness::Partial)]);
    let r = c.reasons();
    assert!(
        r.contains(&"pairing_uncertain") && r.contains(&"unpaired_response"),
        "{r:?}"
    );
}

#[test]
fn midstream_start_at_a_boundary_parses_the_first_message() {
    let mut c = Conn::with(Role::Server, true, ParserLimits::default());
    c.send(IN, &get("/first"));
    let ex = c.close();
    assert_eq!(ex[0].request.target, "/first");
}

/// A request head over the parser's limit: nginx refuses far shorter heads (400) and closes,
/// so the request is recorded with its line and the header lines read, and the rest of the
/// connection is its body.
#[test]
fn header_too_large_is_recorded_and_ends_the_connection() {
    let limits = ParserLimits {
        max_header_bytes: 256,
        ..ParserLimits::default()
    };
    let mut c = Conn::with(Role::Server, false, limits);
    let mut req = b"GET /huge HTTP/1.1\r\n".to_vec();
    for i in 0..40 {
        req.extend(format!("X-H{i}: vvvvvvvvvvvvvvvv\r\n").as_bytes());
    }
    req.extend(b"\r\n");
    req.extend(get("/small"));
    c.send_split(IN, &req, 17);
    c.send(
        OUT,
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
    );
    let ex = c.close();
    assert_eq!(
        pairs(&ex),
        vec![("/huge".into(), Some(400), Completeness::Partial)]
    );
    assert_eq!(ex[0].anomalies(), vec!["header_too_large"]);
    // The complete header lines within the limit: the 20-byte line and 9 of 24 bytes.
    assert_eq!(ex[0].request.headers.len(), 9);
    assert_eq!(ex[0].request.headers[8].name, "X-H8");
    assert_eq!(c.reasons(), vec!["header_too_large"]);
}

#[test]
fn garbage_headers_stay_bounded() {
    let limits = ParserLimits {
        max_header_bytes: 1024,
        ..ParserLimits::default()
    };
    let mut c = Conn::with(Role::Server, false, limits);
    c.send(IN, b"GET / HTTP/1.1\r\n");
    for _ in 0..1000 {
        c.send(IN, b"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx");
    }
    let r = c.reasons();
    assert_eq!(r, vec!["header_too_large"]);
}

/// nginx answers 400 to two different lengths and closes, so what follows is not a request
/// (it used to be parsed as one: `/y`).
#[test]
fn bad_content_length_is_an_anomaly() {
    let mut c = Conn::server();
    c.send(
        IN,
        b"POST /x HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    );
    c.send(IN, &get("/y"));
    assert_eq!(c.reasons(), vec!["conflicting_framing"]);
    let ex = c.close();
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].request.target, "/x");
    assert_eq!(ex[0].request.body.wire_len, 6 + get("/y").len() as u64);
    assert_eq!(ex[0].completeness, Completeness::NoResponse);
    let mut c = Conn::server();
    c.send(IN, b"POST /x HTTP/1.1\r\nContent-Length: 5x\r\n\r\nhello");
    assert_eq!(c.reasons(), vec!["bad_content_length"]);
}

/// Requests: nginx refuses TE with CL (400, close), Apache takes TE and closes; either way
/// nothing after is a request, so the rest is body. Responses: TE wins, counted as before.
#[test]
fn te_and_cl_is_conflicting_framing_in_requests_and_chunked_in_responses() {
    let mut c = Conn::server();
    c.send(
        IN,
        b"POST /s HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    );
    c.send(OUT, &ok(""));
    assert_eq!(c.reasons(), vec!["conflicting_framing"]);
    let ex = c.close();
    assert_eq!(&ex[0].request.body.data[..], b"3\r\nabc\r\n0\r\n\r\n");
    assert_eq!(ex[0].anomalies(), vec!["conflicting_framing"]);
    let mut c = Conn::server();
    c.send(IN, &get("/r"));
    c.send(
        OUT,
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    );
    assert_eq!(c.reasons(), vec!["content_length_with_chunked"]);
    assert_eq!(&c.ex()[0].response.as_ref().unwrap().body.data[..], b"abc");
}

#[test]
fn pipeline_overflow_gives_up_pairing() {
    let limits = ParserLimits {
        max_outstanding_requests: 3,
        ..ParserLimits::default()
    };
    let mut c = Conn::with(Role::Server, false, limits);
    for i in 0..5 {
        c.send(IN, &get(&format!("/{i}")));
    }
    assert!(c.reasons().contains(&"pipeline_overflow"));
    c.send(OUT, &ok("0"));
    let ex = c.close();
    assert_eq!(ex.len(), 5);
    assert!(ex.iter().all(|e| e.response.is_none()));
}

#[test]
fn truncated_response_at_close() {
    let mut c = Conn::server();
    c.send(IN, &get("/t"));
    c.send(OUT, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc");
    let ex = c.close();
    assert_eq!(ex.len(), 1);
    let r = ex[0].response.as_ref().unwrap();
    assert_eq!(r.body.loss, Some(BodyLoss::Incomplete));
    assert_eq!(ex[0].completeness, Completeness::Partial);
    assert_eq!(c.reasons(), vec!["truncated_at_close"]);
}

#[test]
fn response_without_request() {
    let mut c = Conn::server();
    c.send(OUT, &ok("?"));
    assert!(c.close().is_empty());
    assert_eq!(c.reasons(), vec!["response_without_request"]);
}

#[test]
fn out_of_order_chunks_are_reassembled() {
    let mut p = ConnParser::new(Role::Server, false, ParserLimits::default());
    let req = get("/ooo");
    let resp = ok("abcdef");
    p.data(IN, 0, 1, &req[..5]);
    p.data(IN, 10, 3, &req[10..]);
    p.data(IN, 5, 2, &req[5..10]);
    p.data(OUT, 0, 4, &resp[..3]);
    p.data(OUT, 20, 6, &resp[20..]);
    p.data(OUT, 3, 5, &resp[3..20]);
    p.data(OUT, 3, 5, &resp[3..20]); // duplicate
    let ex = p.take_exchanges();
    assert_eq!(ex.len(), 1);
    assert_eq!(&ex[0].response.as_ref().unwrap().body.data[..], b"abcdef");
    assert_eq!(p.stream_stats(OUT).bytes_overlap, 17);
}

/// `cargo test --release throughput -- --ignored --nocapture`
#[test]
#[ignore]
fn throughput() {
    let body = "x".repeat(2000);
    let mut reqs = Vec::new();
    let mut resps = Vec::new();
    for i in 0..20_000 {
        reqs.push(format!("GET /item/{i} HTTP/1.1\r\nHost: example\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n").into_bytes());
        resps.push(ok(&body));
    }
    let total: usize = reqs.iter().chain(&resps).map(Vec::len).sum();
    let t = std::time::Instant::now();
    let mut c = Conn::server();
    let mut n = 0;
    for (q, r) in reqs.iter().zip(&resps) {
        c.send(IN, q);
        c.send_split(OUT, r, 1400);
        n += c.ex().len();
    }
    let dt = t.elapsed();
    assert_eq!(n, 20_000);
    eprintln!(
        "{} exchanges, {} MB in {:?}: {:.0} MB/s",
        n,
        total / 1_000_000,
        dt,
        total as f64 / dt.as_secs_f64() / 1e6
    );
}

#[test]
fn data_after_close_is_counted() {
    let mut c = Conn::server();
    c.close();
    c.send(IN, &get("/late"));
    assert_eq!(c.reasons(), vec!["data_after_close"]);
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    struct GenEx {
        method: &'static str,
        extra: Vec<(&'static str, String)>,
        req_body: Option<(Vec<u8>, bool)>,
        expect_continue: bool,
        status: u16,
        resp_plain: Vec<u8>,
        resp_chunked: bool,
        gzip: bool,
    }

    #[derive(Debug, Clone)]
    struct Scenario {
        exs: Vec<GenEx>,
        pipelined: bool,
        last_close_delimited: bool,
        cuts: Vec<usize>,
        chunk_sizes: Vec<usize>,
    }

    /// (direction, position, timestamp, bytes)
    type Event = (Dir, u64, u64, Vec<u8>);

    enum Feed {
        Data(Event),
        /// (direction, position, length, timestamp)
        Hole(Dir, u64, u64, u64),
    }

    fn alnum(max: usize) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            prop_oneof![b'a'..=b'z', b'0'..=b'9', Just(b' '), Just(b'-')],
            0..max,
        )
    }

    fn gen_ex() -> impl Strategy<Value = GenEx> {
        (
            prop_oneof![
                Just("GET"),
                Just("POST"),
                Just("PUT"),
                Just("DELETE"),
                Just("HEAD"),
                Just("PATCH")
            ],
            proptest::collection::vec(
                (
                    prop_oneof![
                        Just("Accept"),
                        Just("X-A"),
                        Just("User-Agent"),
                        Just("Cookie")
                    ],
                    "[a-z0-9=;/]{0,20}",
                ),
                0..3,
            ),
            proptest::option::of((alnum(60), any::<bool>())),
            any::<bool>(),
            prop_oneof![
                Just(200u16),
                Just(201),
                Just(204),
                Just(304),
                Just(404),
                Just(500)
            ],
            alnum(80),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(
                |(
                    method,
                    extra,
                    req_body,
                    expect_continue,
                    status,
                    resp_plain,
                    resp_chunked,
                    gzip,
                )| {
                    let req_body = match method {
                        "POST" | "PUT" | "PATCH" => req_body,
                        _ => None,
                    };
                    GenEx {
                        method,
                        extra,
                        expect_continue: expect_continue && req_body.is_some(),
                        req_body,
                        status,
                        resp_plain,
                        resp_chunked,
                        gzip,
                    }
                },
            )
    }

    fn scenario() -> impl Strategy<Value = Scenario> {
        (
            proptest::collection::vec(gen_ex(), 1..6),
            any::<bool>(),
            any::<bool>(),
            proptest::collection::vec(1usize..60, 1..8),
            proptest::collection::vec(1usize..20, 1..5),
        )
            .prop_map(
                |(exs, pipelined, last_close_delimited, cuts, chunk_sizes)| Scenario {
                    exs,
                    pipelined,
                    last_close_delimited,
                    cuts,
                    chunk_sizes,
                },
            )
    }

    fn chunked(body: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = body;
        let mut i = 0;
        while !rest.is_empty() {
            let n = sizes[i % sizes.len()].min(rest.len());
            i += 1;
            if i % 2 == 0 {
                out.extend(format!("{n:x};ext=v\r\n").as_bytes());
            } else {
                out.extend(format!("{n:X}\r\n").as_bytes());
            }
            out.extend(&rest[..n]);
            out.extend(b"\r\n");
            rest = &rest[n..];
        }
        out.extend(b"0\r\n");
        if i % 2 == 1 {
            out.extend(b"X-Checksum: abc\r\n");
        }
        out.extend(b"\r\n");
        out
    }

    fn no_resp_body(e: &GenEx) -> bool {
        e.method == "HEAD" || e.status == 204 || e.status == 304
    }

    fn resp_body_plain(id: usize, e: &GenEx) -> Vec<u8> {
        let mut b = format!("id={id};").into_bytes();
        b.extend(&e.resp_plain);
        b
    }

    /// Messages as (dir, bytes) in the order they are sent.
    fn messages(sc: &Scenario) -> Vec<(Dir, Vec<u8>)> {
        let n = sc.exs.len();
        let mut reqs = Vec::new();
        let mut resps = Vec::new();
        for (id, e) in sc.exs.iter().enumerate() {
            let mut head = format!("{} /item/{id}?n={id} HTTP/1.1\r\nHost: h\r\n", e.method);
            for (k, v) in &e.extra {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            let mut body = Vec::new();
            if let Some((b, is_chunked)) = &e.req_body {
                if e.expect_continue {
                    head.push_str("Expect: 100-continue\r\n");
                }
                if *is_chunked {
                    head.push_str("Transfer-Encoding: chunked\r\n");
                    body = chunked(b, &sc.chunk_sizes);
                } else {
                    head.push_str(&format!("Content-Length: {}\r\n", b.len()));
                    body = b.clone();
                }
            }
            head.push_str("\r\n");
            let mut r = format!("HTTP/1.1 {} Whatever\r\nX-Req-Id: {id}\r\n", e.status);
            let plain = resp_body_plain(id, e);
            let wire = if e.gzip { gzip(&plain) } else { plain };
            if e.gzip {
                r.push_str("Content-Encoding: gzip\r\n");
            }
            let close_delim = sc.last_close_delimited && id == n - 1 && !no_resp_body(e);
            let mut rbody = Vec::new();
            if close_delim {
                rbody = wire;
            } else if e.resp_chunked && !no_resp_body(e) {
                r.push_str("Transfer-Encoding: chunked\r\n");
                rbody = chunked(&wire, &sc.chunk_sizes);
            } else {
                r.push_str(&format!("Content-Length: {}\r\n", wire.len()));
                if !no_resp_body(e) {
                    rbody = wire;
                }
            }
            r.push_str("\r\n");
            let mut resp = r.into_bytes();
            resp.extend(rbody);
            reqs.push((head.into_bytes(), body, e.expect_continue));
            resps.push(resp);
        }
        let mut out = Vec::new();
        let group = if sc.pipelined { 3 } else { 1 };
        for start in (0..n).step_by(group) {
            let end = (start + group).min(n);
            for (head, body, expect) in &reqs[start..end] {
                if *expect && !sc.pipelined {
                    out.push((IN, head.clone()));
                    out.push((OUT, b"HTTP/1.1 100 Continue\r\n\r\n".to_vec()));
                    out.push((IN, body.clone()));
                } else {
                    let mut m = head.clone();
                    m.extend(body);
                    out.push((IN, m));
                }
            }
            for r in &resps[start..end] {
                out.push((OUT, r.clone()));
            }
        }
        out
    }

    /// Cut every message into events (one call each) with increasing timestamps.
    fn events(sc: &Scenario) -> Vec<Event> {
        let mut pos = [0u64; 2];
        let mut ts = 0u64;
        let mut out = Vec::new();
        let mut ci = 0;
        for (dir, m) in messages(sc) {
            let mut rest = &m[..];
            while !rest.is_empty() {
                let n = sc.cuts[ci % sc.cuts.len()].min(rest.len());
                ci += 1;
                ts += 10;
                out.push((dir, pos[dir.idx()], ts, rest[..n].to_vec()));
                pos[dir.idx()] += n as u64;
                rest = &rest[n..];
            }
        }
        out
    }

    fn run(evs: &[Event], limits: ParserLimits) -> (Vec<Exchange>, Vec<Anomaly>) {
        let mut p = ConnParser::new(Role::Server, false, limits);
        let mut ex = Vec::new();
        let mut last = 0;
        for (dir, pos, ts, b) in evs {
            p.data(*dir, *pos, *ts, b);
            ex.extend(p.take_exchanges());
            last = last.max(*ts);
        }
        p.close(last + 10);
        ex.extend(p.take_exchanges());
        (ex, p.take_anomalies())
    }

    /// Split event `i` at byte `k` (same direction, same timestamp).
    fn split_at(evs: &[Event], i: usize, k: usize) -> Vec<Event> {
        let mut out = evs.to_vec();
        let (d, pos, ts, b) = out.remove(i);
        out.insert(i, (d, pos + k as u64, ts, b[k..].to_vec()));
        out.insert(i, (d, pos, ts, b[..k].to_vec()));
        out
    }

    fn check_expected(sc: &Scenario, ex: &[Exchange]) -> Result<(), TestCaseError> {
        prop_assert_eq!(ex.len(), sc.exs.len());
        for (id, (e, g)) in ex.iter().zip(&sc.exs).enumerate() {
            prop_assert_eq!(e.request.method.as_str(), g.method);
            prop_assert_eq!(e.request.target.clone(), format!("/item/{id}?n={id}"));
            let want_req: &[u8] = g.req_body.as_ref().map_or(&[], |(b, _)| &b[..]);
            prop_assert_eq!(&e.request.body.data[..], want_req);
            let r = e.response.as_ref().expect("paired");
            prop_assert_eq!(r.status, g.status);
            let want_id = id.to_string();
            prop_assert_eq!(hv(&r.headers, "x-req-id"), Some(want_id.as_str()));
            if no_resp_body(g) {
                prop_assert_eq!(r.body.wire_len, 0);
            } else {
                prop_assert_eq!(&r.body.data[..], &resp_body_plain(id, g)[..]);
            }
            prop_assert_eq!(e.completeness, Completeness::Complete);
        }
        Ok(())
    }

    /// Every paired exchange pairs a request with its own response.
    fn check_sound(ex: &[Exchange]) -> Result<(), TestCaseError> {
        let mut seen = std::collections::HashSet::new();
        for e in ex {
            let cut_short =
                e.anomalies().contains(&"request_head_cut") && !e.request.target.contains('?');
            if cut_short {
                // A head cut by the close is recorded as far as it was read: its target is
                // a prefix of one sent (and its id, if any, may itself be cut).
                prop_assert!(
                    "/item/".starts_with(&e.request.target)
                        || e.request.target.starts_with("/item/"),
                    "unexpected cut target {}",
                    e.request.target
                );
                prop_assert!(
                    seen.insert(e.request.target.clone()),
                    "request emitted twice"
                );
                continue;
            }
            let id = e
                .request
                .target
                .strip_prefix("/item/")
                .and_then(|t| t.split('?').next())
                .map(str::to_string);
            prop_assert!(id.is_some(), "unexpected target {}", e.request.target);
            prop_assert!(
                seen.insert(e.request.target.clone()),
                "request emitted twice"
            );
            if let Some(r) = &e.response {
                prop_assert_eq!(
                    hv(&r.headers, "x-req-id").map(str::to_string),
                    id.clone(),
                    "mispaired: {:?}",
                    e
                );
                let body = &r.body.data[..];
                if r.body.loss.is_none() && !body.is_empty() {
                    let want = format!("id={};", id.unwrap_or_default());
                    // A close-delimited body may end early without anyone knowing (bytes
                    // lost at the very end of a stream are never announced).
                    let want = want.as_bytes();
                    prop_assert!(
                        body.starts_with(want) || want.starts_with(body),
                        "body of another response"
                    );
                }
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        /// Any split of the input gives the same exchanges as the whole.
        #[test]
        fn splits_do_not_matter(sc in scenario(), seeds in proptest::collection::vec(any::<u64>(), 8)) {
            let evs = events(&sc);
            let (whole, anomalies) = run(&evs, ParserLimits::default());
            // The generator may send two Cookie lines and request trailers, which are counted.
            prop_assert!(
                anomalies
                    .iter()
                    .all(|a| ["several_cookie_headers", "request_trailers"].contains(&a.reason())),
                "{:?}",
                anomalies
            );
            check_expected(&sc, &whole)?;

            // Every byte its own call.
            let bytewise: Vec<Event> = evs
                .iter()
                .flat_map(|(d, pos, ts, b)| {
                    b.iter().enumerate().map(move |(k, &x)| (*d, pos + k as u64, *ts, vec![x]))
                })
                .collect();
            prop_assert_eq!(&run(&bytewise, ParserLimits::default()).0, &whole);

            let total: usize = evs.iter().map(|e| e.3.len()).sum();
            if total <= 700 {
                // Every single boundary.
                for i in 0..evs.len() {
                    for k in 1..evs[i].3.len() {
                        let (ex, _) = run(&split_at(&evs, i, k), ParserLimits::default());
                        prop_assert_eq!(&ex, &whole, "split event {} at {}", i, k);
                    }
                }
            } else {
                let mut cur = evs.clone();
                for s in seeds {
                    let i = (s as usize) % cur.len();
                    let len = cur[i].3.len();
                    if len > 1 {
                        cur = split_at(&cur, i, 1 + (s >> 32) as usize % (len - 1));
                    }
                }
                prop_assert_eq!(&run(&cur, ParserLimits::default()).0, &whole);
            }
        }

        /// Chunks delivered out of order (within the reassembly limits) give the same
        /// exchanges.
        #[test]
        fn reordering_does_not_matter(sc in scenario(), jitter in proptest::collection::vec(0usize..6, 64)) {
            let evs = events(&sc);
            let (whole, _) = run(&evs, ParserLimits::default());
            let mut keyed: Vec<(i64, Event)> = evs
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    // The first chunk of each direction stays first: a stream starts at the
                    // first position it sees.
                    let k = if e.1 == 0 { -1 } else { (i + jitter[i % jitter.len()]) as i64 };
                    (k, e.clone())
                })
                .collect();
            keyed.sort_by_key(|(k, _)| *k);
            let shuffled: Vec<Event> = keyed.into_iter().map(|(_, e)| e).collect();
            prop_assert_eq!(&run(&shuffled, ParserLimits::default()).0, &whole);
        }

        /// Losing chunks (unannounced, or as known holes, in either direction, at one or
        /// more places) never pairs a request with another request's response, and never
        /// panics.
        #[test]
        fn gaps_never_mispair(
            sc in scenario(),
            drops in proptest::collection::vec((any::<usize>(), 1usize..4, any::<bool>()), 1..3),
            ends_known in any::<bool>(),
            max_segs in prop_oneof![Just(1usize), Just(2), Just(256)],
            jitter in proptest::collection::vec(0usize..3, 16),
        ) {
            let evs = events(&sc);
            // index -> known hole (true) or unannounced loss (false)
            let mut dropped: std::collections::HashMap<usize, bool> = Default::default();
            for (at, len, known) in drops {
                let i = at % evs.len();
                let dir = evs[i].0;
                for j in (i..evs.len()).filter(|&j| evs[j].0 == dir).take(len) {
                    dropped.insert(j, known);
                }
            }
            let limits = ParserLimits {
                stream: StreamLimits { max_pending_bytes: 1 << 20, max_pending_segments: max_segs },
                ..ParserLimits::default()
            };
            let mut feed: Vec<(usize, Feed)> = Vec::new();
            for (j, e) in evs.iter().enumerate() {
                let key = j * 4 + jitter[j % jitter.len()];
                match dropped.get(&j) {
                    None => feed.push((key, Feed::Data(e.clone()))),
                    Some(true) => feed.push((key, Feed::Hole(e.0, e.1, e.3.len() as u64, e.2))),
                    Some(false) => {}
                }
            }
            feed.sort_by_key(|(k, _)| *k);
            let dbg = std::env::var("HTTP_DEBUG").is_ok();
            let mut p = ConnParser::new(Role::Server, false, limits);
            let mut ex = Vec::new();
            let mut last = 0;
            for (_, f) in feed {
                match f {
                    Feed::Data((d, pos, ts, b)) => {
                        if dbg {
                            eprintln!("DATA {d:?} pos={pos} ts={ts} {:?}", String::from_utf8_lossy(&b));
                        }
                        p.data(d, pos, ts, &b);
                        last = last.max(ts);
                    }
                    Feed::Hole(d, pos, len, ts) => {
                        if dbg {
                            eprintln!("HOLE {d:?} pos={pos} len={len} ts={ts}");
                        }
                        p.hole(d, pos, len, ts);
                    }
                }
                ex.extend(p.take_exchanges());
            }
            if ends_known {
                let end = |d: Dir| {
                    evs.iter().filter(|e| e.0 == d).map(|e| e.1 + e.3.len() as u64).max().unwrap_or(0)
                };
                p.close_at(last + 10, end(IN), end(OUT));
            } else {
                p.close(last + 10);
            }
            ex.extend(p.take_exchanges());
            if dbg {
                eprintln!("ANOMALIES {:?}", p.take_anomalies());
                for e in &ex {
                    let r = e.response.as_ref().map(|r| (r.status, hv(&r.headers, "x-req-id").map(str::to_string), r.first_ns));
                    eprintln!("EX {} -> {:?} {:?}", e.request.target, r, e.completeness);
                }
            }
            check_sound(&ex)?;
        }

        /// Arbitrary bytes never panic and never produce unbounded output.
        #[test]
        fn garbage_never_panics(
            chunks in proptest::collection::vec((any::<bool>(), proptest::collection::vec(any::<u8>(), 0..200), 0u64..50), 0..20),
            role in prop_oneof![Just(Role::Server), Just(Role::Client), Just(Role::Unknown)],
            midstream in any::<bool>(),
        ) {
            let limits = ParserLimits { max_header_bytes: 512, ..ParserLimits::default() };
            let mut p = ConnParser::new(role, midstream, limits);
            let mut pos = [0u64; 2];
            for (k, (inbound, b, skip)) in chunks.iter().enumerate() {
                let d = if *inbound { IN } else { OUT };
                pos[d.idx()] += skip;
                if *skip == 7 {
                    p.hole(d, pos[d.idx()], 5, k as u64);
                    pos[d.idx()] += 5;
                }
                p.data(d, pos[d.idx()], k as u64, b);
                pos[d.idx()] += b.len() as u64;
            }
            p.close(1000);
            let _ = p.take_exchanges();
            let _ = p.take_anomalies();
        }
    }
}

/// Crafted requests (issue 12): each is read as nginx 1.22 reads it (see `leniency` for the
/// table), and the exchange carries what was odd about it.
mod crafted {
    use super::*;
    use crate::attribute::credentials::request_cookie;
    use crate::attribute::routes::normalize_target;
    use proptest::prelude::*;

    /// What a test asserts of one exchange: method, target, status, and the request's
    /// headers, ignored lines, trailers and anomalies.
    #[derive(Debug, PartialEq, Eq)]
    struct Seen {
        method: String,
        target: String,
        status: Option<u16>,
        headers: Vec<(String, Vec<u8>)>,
        ignored: Vec<(String, Vec<u8>)>,
        trailers: Vec<(String, Vec<u8>)>,
        anomalies: Vec<&'static str>,
    }

    fn pairs_of(hs: &[Header]) -> Vec<(String, Vec<u8>)> {
        hs.iter()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect()
    }

    fn seen(e: &Exchange) -> Seen {
        Seen {
            method: e.request.method.clone(),
            target: e.request.target.clone(),
            status: e.response.as_ref().map(|r| r.status),
            headers: pairs_of(&e.request.headers),
            ignored: pairs_of(&e.request.wire.ignored_headers),
            trailers: pairs_of(&e.request.wire.trailers),
            anomalies: e.anomalies(),
        }
    }

    fn hs(list: &[(&str, &[u8])]) -> Vec<(String, Vec<u8>)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_vec()))
            .collect()
    }

    /// Feeds `req` then the answer `status` (with an empty body) on a fresh server connection,
    /// closes it, and returns the exchanges and every anomaly counted.
    fn exchange(req: &[u8], status: u16) -> (Vec<Exchange>, Vec<&'static str>) {
        exchange_split(req, status, req.len().max(1))
    }

    fn exchange_split(req: &[u8], status: u16, n: usize) -> (Vec<Exchange>, Vec<&'static str>) {
        let mut c = Conn::server();
        c.send_split(IN, req, n);
        c.send(
            OUT,
            format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n").as_bytes(),
        );
        let mut ex = c.ex();
        ex.extend(c.close_at());
        (ex, c.reasons())
    }

    /// One exchange expected: its `Seen`, with the connection's counted anomalies equal to the
    /// exchange's own.
    fn one(req: &[u8], status: u16) -> Seen {
        let (ex, counted) = exchange(req, status);
        assert_eq!(ex.len(), 1, "{:?} {counted:?}", pairs(&ex));
        let s = seen(&ex[0]);
        assert_eq!(counted, s.anomalies, "counted once each, as in the record");
        s
    }

    fn expect(
        method: &str,
        target: &str,
        status: u16,
        headers: &[(&str, &[u8])],
        anomalies: &[&'static str],
    ) -> Seen {
        Seen {
            method: method.into(),
            target: target.into(),
            status: Some(status),
            headers: hs(headers),
            ignored: vec![],
            trailers: vec![],
            anomalies: anomalies.to_vec(),
        }
    }

    const HOST: (&str, &[u8]) = ("Host", b"h");

    #[test]
    fn two_spaces_in_the_request_line() {
        // nginx 1.22 answers this (checked against the real server); Apache Strict says 400.
        let s = one(b"GET  /path HTTP/1.1\r\nHost: h\r\n\r\n", 200);
        assert_eq!(
            s,
            expect("GET", "/path", 200, &[HOST], &["request_line_whitespace"])
        );
        let s = one(b"GET /path   HTTP/1.1  \r\nHost: h\r\n\r\n", 200);
        assert_eq!(
            s,
            expect("GET", "/path", 200, &[HOST], &["request_line_whitespace"])
        );
    }

    #[test]
    fn tabs_and_leading_whitespace_in_the_request_line() {
        for req in [
            &b"GET\t/p\tHTTP/1.1\r\nHost: h\r\n\r\n"[..],
            b" GET /p HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET /p x HTTP/1.1\r\nHost: h\r\n\r\n",
        ] {
            let s = one(req, 400);
            assert_eq!(
                s,
                expect("GET", "/p", 400, &[HOST], &["request_line_whitespace"]),
                "{}",
                String::from_utf8_lossy(req)
            );
        }
    }

    #[test]
    fn method_case_is_kept_as_sent() {
        let s = one(b"get /p HTTP/1.1\r\nHost: h\r\n\r\n", 400);
        assert_eq!(
            s,
            expect("get", "/p", 400, &[HOST], &["method_not_uppercase"])
        );
        // Not a token: not a request line at all. nginx answers 400: recorded, without the
        // method and target it could not read.
        let s = one(b"G(T /p HTTP/1.1\r\nHost: h\r\n\r\n", 400);
        assert_eq!(s, expect("", "", 400, &[], &["malformed_request_line"]));
    }

    /// Lines that are not request lines, each answered 400 by nginx 1.22 (checked against the
    /// real server): each is recorded with that answer and `malformed_request_line`, the bytes
    /// after it are its body, and nothing of the line is kept as method or target.
    #[test]
    fn lines_that_are_not_request_lines_are_recorded() {
        for req in [
            &b"HELLO\r\n\r\n"[..],
            b"GET\r\nHost: h\r\n\r\n",
            b"\x00\x01\x02 binary\r\n\r\n",
            b"{\"json\": 1}\r\n",
            b"G(T /p HTTP/1.1\r\nHost: h\r\n\r\nGET /next HTTP/1.1\r\nHost: h\r\n\r\n",
            b"/api/me HTTP/1.1\r\nHost: h\r\n\r\n",
        ] {
            for split in [1, 3, req.len()] {
                let (ex, counted) = exchange_split(req, 400, split);
                let what = String::from_utf8_lossy(req);
                assert_eq!(ex.len(), 1, "{what:?} split {split}");
                assert_eq!(
                    seen(&ex[0]),
                    expect("", "", 400, &[], &["malformed_request_line"]),
                    "{what:?}"
                );
                assert_eq!(counted, vec!["malformed_request_line"], "{what:?}");
            }
        }
    }

    /// A header line over nginx's 8 KiB `large_client_header_buffers` buffer (corpus
    /// padded-009): nginx stops reading, answers 400 and closes, so the agent never sees the
    /// end of the head. The request is recorded at the close with its line and the complete
    /// header lines read (the Cookie after the long line is not among them), with the
    /// server's answer and `request_head_cut`.
    #[test]
    fn a_head_cut_by_the_server_is_recorded_with_its_answer() {
        let mut head = b"GET /api/me HTTP/1.1\r\nHost: h\r\nX-Big: ".to_vec();
        head.extend(std::iter::repeat_n(b'b', 8192 - 21));
        for split in [1000, 4096, head.len()] {
            let mut c = Conn::server();
            c.send_split(IN, &head, split);
            c.send(
                OUT,
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            assert!(c.ex().is_empty(), "only at the close");
            let ex = c.close_at();
            assert_eq!(
                seen(&ex[0]),
                expect("GET", "/api/me", 400, &[HOST], &["request_head_cut"])
            );
            assert_eq!(ex.len(), 1);
            assert_eq!(ex[0].completeness, Completeness::Partial);
            assert_eq!(c.reasons(), vec!["request_head_cut"]);
        }
        // A request line over the buffer (nginx: 414): the method and the target as far as
        // it came.
        let mut line = b"GET /api/".to_vec();
        line.extend(std::iter::repeat_n(b'a', 9000));
        let mut c = Conn::server();
        c.send(IN, &line);
        c.send(
            OUT,
            b"HTTP/1.1 414 Request-URI Too Large\r\nContent-Length: 0\r\n\r\n",
        );
        let ex = c.close_at();
        let want = String::from_utf8(line[4..].to_vec()).unwrap();
        assert_eq!(
            seen(&ex[0]),
            expect("GET", &want, 414, &[], &["request_head_cut"])
        );
        // A head cut before its request line shows a method: still the old accounting (a
        // request lost, its answer unpaired).
        let mut c = Conn::server();
        c.send(IN, b"GE");
        c.send(
            OUT,
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
        );
        assert!(c.close_at().is_empty());
        assert_eq!(c.reasons(), vec!["truncated_at_close", "unpaired_response"]);
    }

    #[test]
    fn absolute_form_target_gives_the_path() {
        let s = one(
            b"GET http://other.example/a/b?x=1 HTTP/1.1\r\nHost: h\r\n\r\n",
            200,
        );
        assert_eq!(
            s,
            expect("GET", "http://other.example/a/b?x=1", 200, &[HOST], &[])
        );
        assert_eq!(normalize_target(&s.target).unwrap().path, "/a/b");
    }

    #[test]
    fn http_1_0_and_later_minor_versions() {
        let (ex, counted) = exchange(b"GET /p HTTP/1.0\r\n\r\n", 200);
        assert_eq!(ex[0].request.minor_version, 0);
        assert_eq!(seen(&ex[0]), expect("GET", "/p", 200, &[], &[]));
        assert!(counted.is_empty());
        let (ex, _) = exchange(b"GET /p HTTP/1.01\r\nHost: h\r\n\r\n", 200);
        assert_eq!(ex[0].request.minor_version, 1);
    }

    #[test]
    fn bad_versions_are_recorded_with_their_answer() {
        // nginx answers 505 to HTTP/2.0 (checked against the real server), 400 to the others.
        for (req, status) in [
            (&b"GET /p HTTP/2.0\r\nHost: h\r\n\r\n"[..], 505),
            (b"GET /p http/1.1\r\nHost: h\r\n\r\n", 400),
            (b"GET /p HTTP/1.\r\nHost: h\r\n\r\n", 400),
        ] {
            assert_eq!(
                one(req, status),
                expect("GET", "/p", status, &[HOST], &["bad_version"])
            );
        }
    }

    #[test]
    fn http_0_9_simple_request() {
        // nginx answers the body alone (no status line) and closes.
        let mut c = Conn::server();
        c.send(IN, b"GET /p\r\n");
        c.send(OUT, b"<html>hello</html>");
        let ex = c.close_at();
        let r = c.reasons();
        assert_eq!(ex.len(), 1);
        assert_eq!(ex[0].request.method, "GET");
        assert_eq!(ex[0].request.target, "/p");
        assert_eq!(ex[0].request.minor_version, 0);
        // The answer has no status line: the exchange is partial, without response.
        assert!(ex[0].response.is_none());
        assert_eq!(ex[0].completeness, Completeness::Partial);
        assert_eq!(ex[0].anomalies(), vec!["http09_request"]);
        assert_eq!(
            r,
            vec![
                "http09_request",
                "malformed_status_line",
                "pairing_uncertain"
            ]
        );
    }

    #[test]
    fn control_bytes_and_non_utf8_in_the_target() {
        assert_eq!(
            one(b"GET /a\x01b HTTP/1.1\r\nHost: h\r\n\r\n", 400),
            expect("GET", "/a\x01b", 400, &[HOST], &["control_byte_in_target"])
        );
        assert_eq!(
            one(b"GET /caf\xe9 HTTP/1.1\r\nHost: h\r\n\r\n", 200),
            expect("GET", "/caf\u{fffd}", 200, &[HOST], &["non_utf8_target"])
        );
        // UTF-8 is fine.
        assert_eq!(
            one("GET /café HTTP/1.1\r\nHost: h\r\n\r\n".as_bytes(), 200),
            expect("GET", "/café", 200, &[HOST], &[])
        );
    }

    #[test]
    fn bare_lf_line_ends() {
        let s = one(b"GET /p HTTP/1.1\nHost: h\nCookie: s=1\n\n", 200);
        assert_eq!(
            s,
            expect("GET", "/p", 200, &[HOST, ("Cookie", b"s=1")], &["bare_lf"])
        );
    }

    #[test]
    fn a_control_byte_in_the_cookie_keeps_the_whole_header() {
        // The incident: httparse dropped this whole line, so the call had no user.
        let s = one(
            b"GET /p HTTP/1.1\r\nHost: h\r\nCookie: x=\x01; sess=abc\r\n\r\n",
            200,
        );
        assert_eq!(
            s,
            expect(
                "GET",
                "/p",
                200,
                &[HOST, ("Cookie", b"x=\x01; sess=abc")],
                &["control_byte_in_header"]
            )
        );
        let (ex, _) = exchange(
            b"GET /p HTTP/1.1\r\nHost: h\r\nCookie: x=\x01; sess=abc\r\n\r\n",
            200,
        );
        assert_eq!(
            request_cookie(&ex[0].request.headers, "sess").as_deref(),
            Some("abc")
        );
        // DEL, a lone CR inside the value, and NUL (which nginx refuses with 400) are named too.
        for (req, value) in [
            (
                &b"GET /p HTTP/1.1\r\nX-A: a\x7fb\r\n\r\n"[..],
                &b"a\x7fb"[..],
            ),
            (b"GET /p HTTP/1.1\r\nX-A: a\rb\r\n\r\n", b"a"),
            (b"GET /p HTTP/1.1\r\nX-A: a\x00b\r\n\r\n", b"a\x00b"),
        ] {
            assert_eq!(
                one(req, 400),
                expect(
                    "GET",
                    "/p",
                    400,
                    &[("X-A", value)],
                    &["control_byte_in_header"]
                )
            );
        }
    }

    #[test]
    fn values_are_trimmed_as_nginx_trims_them() {
        // Leading and trailing SP go; HT stays (nginx skips only SP).
        let s = one(
            b"GET /p HTTP/1.1\r\nX-A:   v  \r\nX-B:\tv\t\r\nX-C:\r\n\r\n",
            200,
        );
        assert_eq!(
            s,
            expect(
                "GET",
                "/p",
                200,
                &[("X-A", b"v"), ("X-B", b"\tv\t"), ("X-C", b"")],
                &[]
            )
        );
    }

    #[test]
    fn header_name_case_is_kept_and_compared_without_it() {
        let (ex, counted) = exchange(b"GET /p HTTP/1.1\r\ncOOKIE: sess=abc\r\n\r\n", 200);
        assert!(counted.is_empty());
        assert_eq!(ex[0].request.headers[0].name, "cOOKIE");
        assert_eq!(
            request_cookie(&ex[0].request.headers, "sess").as_deref(),
            Some("abc")
        );
    }

    #[test]
    fn names_nginx_ignores_are_set_apart() {
        let s = one(
            b"GET /p HTTP/1.1\r\nHost: h\r\nX_User: admin\r\nCookie.: sess=evil\r\nCookie: sess=ok\r\n\r\n",
            200,
        );
        assert_eq!(
            s,
            Seen {
                ignored: hs(&[("X_User", b"admin"), ("Cookie.", b"sess=evil")]),
                ..expect(
                    "GET",
                    "/p",
                    200,
                    &[HOST, ("Cookie", b"sess=ok")],
                    &["ignored_header"]
                )
            }
        );
    }

    #[test]
    fn space_before_colon_and_control_bytes_in_names_are_set_apart() {
        for (req, name) in [
            (
                &b"GET /p HTTP/1.1\r\nCookie : sess=evil\r\n\r\n"[..],
                "Cookie ",
            ),
            (
                b"GET /p HTTP/1.1\r\nCoo\x01kie: sess=evil\r\n\r\n",
                "Coo\x01kie",
            ),
            (b"GET /p HTTP/1.1\r\n: sess=evil\r\n\r\n", ""),
        ] {
            let (ex, _) = exchange(req, 400);
            assert_eq!(request_cookie(&ex[0].request.headers, "sess"), None);
            assert_eq!(
                seen(&ex[0]),
                Seen {
                    ignored: hs(&[(name, b"sess=evil")]),
                    ..expect("GET", "/p", 400, &[], &["invalid_header_name"])
                }
            );
        }
    }

    #[test]
    fn a_line_without_colon_is_an_empty_header() {
        let s = one(b"GET /p HTTP/1.1\r\nHost: h\r\nFoo\r\n\r\n", 200);
        assert_eq!(
            s,
            expect(
                "GET",
                "/p",
                200,
                &[HOST, ("Foo", b"")],
                &["header_without_colon"]
            )
        );
    }

    #[test]
    fn obs_fold_is_joined_with_one_space() {
        let s = one(
            b"GET /p HTTP/1.1\r\nX-A: a\r\n \t b \r\nHost: h\r\n\r\n",
            400,
        );
        assert_eq!(
            s,
            expect("GET", "/p", 400, &[("X-A", b"a b"), HOST], &["obs_fold"])
        );
    }

    #[test]
    fn duplicates_are_all_kept_in_order() {
        let s = one(
            b"GET /p HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer a\r\nX-A: 1\r\nauthorization: Bearer b\r\nX-A: 2\r\n\r\n",
            400,
        );
        assert_eq!(
            s,
            expect(
                "GET",
                "/p",
                400,
                &[
                    HOST,
                    ("Authorization", b"Bearer a"),
                    ("X-A", b"1"),
                    ("authorization", b"Bearer b"),
                    ("X-A", b"2"),
                ],
                &["duplicate_header"]
            )
        );
        // Headers nginx allows twice are no anomaly.
        let s = one(
            b"GET /p HTTP/1.1\r\nHost: h\r\nAccept: a\r\nAccept: b\r\n\r\n",
            200,
        );
        assert!(s.anomalies.is_empty());
        assert_eq!(
            one(b"GET /p HTTP/1.1\r\nHost: h\r\nHost: i\r\n\r\n", 400).anomalies,
            vec!["duplicate_header"]
        );
    }

    #[test]
    fn several_cookie_headers_are_all_kept() {
        let s = one(
            b"GET /p HTTP/1.1\r\nHost: h\r\nCookie: a=1\r\nCookie: sess=abc; b=2\r\n\r\n",
            200,
        );
        assert_eq!(
            s,
            expect(
                "GET",
                "/p",
                200,
                &[HOST, ("Cookie", b"a=1"), ("Cookie", b"sess=abc; b=2")],
                &["several_cookie_headers"]
            )
        );
    }

    /// A request with refused framing, then a smuggled request in what follows: the edge
    /// answers the first and closes, so the second is body, never a record.
    fn refused(req_head: &[u8], status: u16, anomaly: &'static str) {
        let mut req = req_head.to_vec();
        let tail = b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: h\r\n\r\n";
        req.extend_from_slice(tail);
        for n in [1, 7, req.len()] {
            let (ex, counted) = exchange_split(&req, status, n);
            assert_eq!(ex.len(), 1, "{:?}", pairs(&ex));
            assert_eq!(ex[0].request.target, "/s");
            assert_eq!(ex[0].response.as_ref().map(|r| r.status), Some(status));
            assert_eq!(ex[0].completeness, Completeness::Complete);
            assert_eq!(ex[0].request.body.wire_len, tail.len() as u64);
            assert_eq!(ex[0].anomalies(), vec![anomaly]);
            assert_eq!(counted, vec![anomaly]);
        }
    }

    #[test]
    fn transfer_encoding_with_content_length() {
        refused(
            b"POST /s HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
            "conflicting_framing",
        );
        refused(
            b"POST /s HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n",
            400,
            "conflicting_framing",
        );
    }

    #[test]
    fn two_content_lengths_even_equal() {
        refused(
            b"POST /s HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            400,
            "conflicting_framing",
        );
        refused(
            b"POST /s HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 3\r\n\r\n",
            400,
            "bad_content_length",
        );
        refused(
            b"POST /s HTTP/1.1\r\nHost: h\r\nContent-Length: +3\r\n\r\n",
            400,
            "bad_content_length",
        );
    }

    #[test]
    fn transfer_encoding_other_than_chunked() {
        for te in [
            &b"gzip, chunked"[..],
            b"\tchunked",
            b"chunked, chunked",
            b"identity",
        ] {
            let mut head = b"POST /s HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: ".to_vec();
            head.extend_from_slice(te);
            head.extend_from_slice(b"\r\n\r\n");
            refused(&head, 501, "bad_transfer_encoding");
        }
        refused(
            b"POST /s HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
            "conflicting_framing",
        );
        refused(
            b"POST /s HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
            "bad_transfer_encoding",
        );
        // Any case of `chunked` is chunked.
        let s = one(
            b"POST /s HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: ChUnKeD\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            200,
        );
        assert!(s.anomalies.is_empty());
        // An ignored `Transfer_Encoding` line does not frame the body.
        let (ex, _) = exchange(
            b"POST /s HTTP/1.1\r\nHost: h\r\nTransfer_Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc",
            200,
        );
        assert_eq!(&ex[0].request.body.data[..], b"abc");
        assert_eq!(ex[0].anomalies(), vec!["ignored_header"]);
    }

    #[test]
    fn chunk_extensions_are_skipped() {
        let (ex, counted) = exchange(
            b"POST /s HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3;a=b\r\nabc\r\n2 x\r\nde\r\n1\t;q\r\nf\r\n0;end\r\n\r\n",
            200,
        );
        assert!(counted.is_empty(), "{counted:?}");
        assert_eq!(&ex[0].request.body.data[..], b"abcdef");
    }

    #[test]
    fn trailers_never_become_headers() {
        // The incident: a trailer `Authorization` was believed before the real cookie.
        let req = b"GET /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nCookie: sess=real\r\n\r\n0\r\nAuthorization: Bearer evil\r\nCookie: sess=victim\r\n\r\n";
        for n in [1, 5, req.len()] {
            let (ex, counted) = exchange_split(req, 200, n);
            assert_eq!(ex.len(), 1);
            assert_eq!(
                seen(&ex[0]),
                Seen {
                    trailers: hs(&[
                        ("Authorization", b"Bearer evil"),
                        ("Cookie", b"sess=victim")
                    ]),
                    ..expect(
                        "GET",
                        "/p",
                        200,
                        &[
                            HOST,
                            ("Transfer-Encoding", b"chunked"),
                            ("Cookie", b"sess=real")
                        ],
                        &["request_trailers"]
                    )
                }
            );
            assert_eq!(counted, vec!["request_trailers"]);
            let req = &ex[0].request;
            assert_eq!(header(&req.headers, "authorization"), None);
            assert_eq!(
                request_cookie(&req.headers, "sess").as_deref(),
                Some("real")
            );
        }
    }

    #[test]
    fn a_refused_request_on_a_role_unknown_connection_is_still_read() {
        // The role comes from the first line; a lenient line with a version decides it.
        let mut c = Conn::new(Role::Unknown);
        c.send(IN, b"GET  /p HTTP/1.1\r\nHost: h\r\n\r\n");
        c.send(OUT, &ok("x"));
        let ex = c.ex();
        assert_eq!(
            pairs(&ex),
            vec![("/p".into(), Some(200), Completeness::Complete)]
        );
        assert_eq!(c.p.role(), Role::Server);
    }

    fn budget_limits(bytes: u64) -> ParserLimits {
        ParserLimits {
            body_budget: BodyBudget::new(bytes),
            ..ParserLimits::default()
        }
    }

    fn post(body: &[u8]) -> Vec<u8> {
        let mut r = format!(
            "POST /u HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    }

    #[test]
    fn the_body_budget_is_shared_by_all_connections() {
        let limits = budget_limits(10);
        let budget = limits.body_budget.clone();
        let mut a = Conn::with(Role::Server, false, limits.clone());
        let mut b = Conn::with(Role::Server, false, limits.clone());
        // Connection a holds 8 bytes (its request waits for its answer).
        a.send(IN, &post(b"aaaaaaaa"));
        assert_eq!(budget.in_use(), 8);
        // Connection b's 8 bytes do not fit: its body is not kept, the exchange is recorded.
        b.send(IN, &post(b"bbbbbbbb"));
        b.send(OUT, &ok(""));
        let eb = b.ex();
        assert_eq!(eb.len(), 1);
        assert_eq!(&eb[0].request.body.data[..], b"");
        assert_eq!(eb[0].request.body.wire_len, 8);
        assert_eq!(eb[0].request.body.loss, Some(BodyLoss::KeptLimit));
        assert_eq!(eb[0].anomalies(), vec!["body_over_budget"]);
        assert_eq!(b.reasons(), vec!["body_over_budget"]);
        a.send(OUT, &ok("xy"));
        let ea = a.ex();
        assert_eq!(&ea[0].request.body.data[..], b"aaaaaaaa");
        assert_eq!(&ea[0].response.as_ref().unwrap().body.data[..], b"xy");
        assert!(ea[0].anomalies().is_empty());
        assert_eq!(budget.in_use(), 10);
        // Bodies give their share back when the exchange is dropped.
        drop(ea);
        drop(eb);
        assert_eq!(budget.in_use(), 0);
        // A connection dropped in the middle of a body gives back what it held.
        let mut c = Conn::with(Role::Server, false, limits);
        c.send(IN, &post(b"cccccccc")[..52]);
        assert!(budget.in_use() > 0);
        drop(c);
        assert_eq!(budget.in_use(), 0);
    }

    #[test]
    fn the_budget_bounds_decoded_bodies_too() {
        let limits = budget_limits(100);
        let budget = limits.body_budget.clone();
        let mut c = Conn::with(Role::Server, false, limits);
        c.send(IN, &get("/z"));
        let plain = vec![b'z'; 1000];
        let gz = gzip(&plain);
        let mut resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\n\r\n",
            gz.len()
        )
        .into_bytes();
        resp.extend_from_slice(&gz);
        c.send(OUT, &resp);
        let ex = c.ex();
        let r = ex[0].response.as_ref().unwrap();
        assert!(r.body.data.len() <= 100, "{}", r.body.data.len());
        assert_eq!(r.body.loss, Some(BodyLoss::KeptLimit));
        assert_eq!(ex[0].anomalies(), vec!["body_over_budget"]);
        assert!(budget.in_use() <= 100);
        drop(ex);
        assert_eq!(budget.in_use(), 0);
    }

    /// Every crafted form above, one after the other where the connection goes on.
    const CORPUS: &[&[u8]] = &[
        b"GET  /a HTTP/1.1\r\nHost: h\r\n\r\n",
        b"get /b HTTP/1.1\nHost: h\nCookie: x=\x01; sess=1\n\n",
        b"GET http://o/c?x=1 HTTP/1.1\r\nX_User: a\r\nCookie : s=2\r\nFoo\r\n\r\n",
        b"GET /d HTTP/1.1\r\nX-A: a\r\n b\r\nCookie: a=1\r\nCookie: b=2\r\nHost: h\r\nHost: i\r\n\r\n",
        b"POST /e HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;x\r\nabc\r\n0\r\nAuthorization: Bearer t\r\n\r\n",
        b"POST /f HTTP/1.1\r\nContent-Length: 3\r\n\r\nxyz",
    ];

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Splitting the crafted requests at any points gives the same exchanges and anomalies.
        #[test]
        fn crafted_forms_split_anywhere(cuts in proptest::collection::vec(1usize..40, 1..30)) {
            let run = |cuts: &[usize]| {
                let mut c = Conn::server();
                for req in CORPUS {
                    let mut rest: &[u8] = req;
                    for &k in cuts.iter().cycle() {
                        if rest.is_empty() {
                            break;
                        }
                        let k = k.min(rest.len());
                        c.send(IN, &rest[..k]);
                        rest = &rest[k..];
                    }
                }
                for _ in CORPUS {
                    c.send(OUT, &ok("r"));
                }
                let mut ex = c.ex();
                ex.extend(c.close_at());
                (ex.iter().map(seen).collect::<Vec<_>>(), c.reasons())
            };
            let (whole, whole_reasons) = run(&[usize::MAX]);
            prop_assert_eq!(whole.len(), CORPUS.len());
            let (split, split_reasons) = run(&cuts);
            prop_assert_eq!(whole, split);
            prop_assert_eq!(whole_reasons, split_reasons);
        }
    }
}
