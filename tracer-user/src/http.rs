//! TEMPORARY minimal HTTP/1.1 parser (in-order streams, Content-Length and chunked, FIFO
//! pairing) standing in until the full parser lands.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::exchange::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Inbound,
    Outbound,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
    Unknown,
}
#[derive(Debug, Clone)]
pub struct ParserLimits {
    pub body_keep_bytes: usize,
}
impl Default for ParserLimits {
    fn default() -> Self {
        ParserLimits {
            body_keep_bytes: 1 << 20,
        }
    }
}
#[derive(Debug)]
pub struct Anomaly(&'static str);
impl Anomaly {
    pub fn reason(&self) -> &'static str {
        self.0
    }
}

#[derive(Default)]
struct Side {
    buf: Vec<u8>,
    next_pos: Option<u64>,
    first_ns: u64,
    last_ns: u64,
}

pub struct ConnParser {
    reqs: Side,
    resps: Side,
    pending: VecDeque<Request>,
    out: Vec<Exchange>,
    anomalies: Vec<Anomaly>,
    head_methods: VecDeque<String>,
}

fn parse_msg(
    buf: &[u8],
    is_req: bool,
    head: bool,
) -> Option<(usize, Vec<Header>, String, String, u16, u64, Bytes)> {
    let mut hs = [httparse::EMPTY_HEADER; 64];
    let (hlen, method, target, status, headers) = if is_req {
        let mut r = httparse::Request::new(&mut hs);
        match r.parse(buf).ok()? {
            httparse::Status::Complete(n) => (
                n,
                r.method?.to_string(),
                r.path?.to_string(),
                0,
                conv(r.headers),
            ),
            _ => return None,
        }
    } else {
        let mut r = httparse::Response::new(&mut hs);
        match r.parse(buf).ok()? {
            httparse::Status::Complete(n) => {
                (n, String::new(), String::new(), r.code?, conv(r.headers))
            }
            _ => return None,
        }
    };
    let cl =
        header(&headers, "content-length").and_then(|h| h.value_str()?.trim().parse::<u64>().ok());
    let chunked = header(&headers, "transfer-encoding")
        .and_then(|h| h.value_str())
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let nobody = !is_req && (head || status / 100 == 1 || status == 204 || status == 304);
    if nobody {
        return Some((hlen, headers, method, target, status, 0, Bytes::new()));
    }
    if chunked {
        let mut p = hlen;
        let mut body = Vec::new();
        loop {
            let line_end = buf[p..].windows(2).position(|w| w == b"\r\n")? + p;
            let size = usize::from_str_radix(
                std::str::from_utf8(&buf[p..line_end])
                    .ok()?
                    .split(';')
                    .next()?
                    .trim(),
                16,
            )
            .ok()?;
            p = line_end + 2;
            if size == 0 {
                let end = buf[p..].windows(2).position(|w| w == b"\r\n")? + p;
                p = end + 2;
                break;
            }
            if buf.len() < p + size + 2 {
                return None;
            }
            body.extend_from_slice(&buf[p..p + size]);
            p += size + 2;
        }
        let n = body.len() as u64;
        return Some((p, headers, method, target, status, n, Bytes::from(body)));
    }
    let n = cl.unwrap_or(0) as usize;
    if buf.len() < hlen + n {
        return None;
    }
    Some((
        hlen + n,
        headers,
        method,
        target,
        status,
        n as u64,
        Bytes::copy_from_slice(&buf[hlen..hlen + n]),
    ))
}

fn conv(h: &[httparse::Header]) -> Vec<Header> {
    h.iter()
        .map(|h| Header {
            name: h.name.to_string(),
            value: h.value.to_vec(),
        })
        .collect()
}

impl ConnParser {
    pub fn new(_role: Role, _midstream: bool, _limits: ParserLimits) -> Self {
        ConnParser {
            reqs: Side::default(),
            resps: Side::default(),
            pending: VecDeque::new(),
            out: Vec::new(),
            anomalies: Vec::new(),
            head_methods: VecDeque::new(),
        }
    }
    pub fn data(&mut self, dir: Dir, pos: u64, ts_ns: u64, bytes: &[u8]) {
        let side = if dir == Dir::Inbound {
            &mut self.reqs
        } else {
            &mut self.resps
        };
        if let Some(np) = side.next_pos {
            if np != pos {
                side.buf.clear();
                self.anomalies.push(Anomaly("gap_resync"));
            }
        }
        if side.buf.is_empty() {
            side.first_ns = ts_ns;
        }
        side.next_pos = Some(pos + bytes.len() as u64);
        side.buf.extend_from_slice(bytes);
        side.last_ns = ts_ns;
        self.drive();
    }
    pub fn hole(&mut self, dir: Dir, pos: u64, len: u64, _ts: u64) {
        let side = if dir == Dir::Inbound {
            &mut self.reqs
        } else {
            &mut self.resps
        };
        side.buf.clear();
        side.next_pos = Some(pos + len);
        self.anomalies.push(Anomaly("gap_resync"));
    }
    fn drive(&mut self) {
        while let Some((n, headers, method, target, _, blen, body)) =
            parse_msg(&self.reqs.buf, true, false)
        {
            self.head_methods.push_back(method.clone());
            self.pending.push_back(Request {
                method,
                target,
                minor_version: 1,
                headers,
                body: Body {
                    wire_len: blen,
                    data: body,
                    loss: None,
                    decoded_from: None,
                },
                first_ns: self.reqs.first_ns,
                last_ns: self.reqs.last_ns,
            });
            self.reqs.buf.drain(..n);
            self.reqs.first_ns = self.reqs.last_ns;
        }
        loop {
            let head = self.head_methods.front().is_some_and(|m| m == "HEAD");
            let Some((n, headers, _, _, status, blen, body)) =
                parse_msg(&self.resps.buf, false, head)
            else {
                break;
            };
            self.resps.buf.drain(..n);
            if status / 100 == 1 {
                continue;
            }
            let resp = Response {
                status,
                reason: String::new(),
                minor_version: 1,
                headers,
                body: Body {
                    wire_len: blen,
                    data: body,
                    loss: None,
                    decoded_from: None,
                },
                first_ns: self.resps.first_ns,
                last_ns: self.resps.last_ns,
            };
            self.resps.first_ns = self.resps.last_ns;
            match self.pending.pop_front() {
                Some(req) => {
                    self.head_methods.pop_front();
                    self.out.push(Exchange {
                        request: req,
                        response: Some(resp),
                        completeness: Completeness::Complete,
                        upgraded: false,
                    })
                }
                None => self.anomalies.push(Anomaly("response_without_request")),
            }
        }
    }
    pub fn close(&mut self, _ts: u64) {
        for req in self.pending.drain(..) {
            self.out.push(Exchange {
                request: req,
                response: None,
                completeness: Completeness::NoResponse,
                upgraded: false,
            });
        }
    }
    pub fn take_exchanges(&mut self) -> Vec<Exchange> {
        std::mem::take(&mut self.out)
    }
    pub fn take_anomalies(&mut self) -> Vec<Anomaly> {
        std::mem::take(&mut self.anomalies)
    }
}
