//! One HTTP/2 stream: its request half and response half as they arrive, and the exchange
//! they make once the stream is over.

use crate::exchange::{Body, Completeness, Exchange, Header, Request, Response, WireNotes};

use super::super::anomaly::Anomaly;
use super::super::body::BodyAcc;
use super::super::direction::Shared;
use super::super::framing::content_encoding;
use super::super::types::Dir;

/// Header fields no HTTP/2 message may carry (RFC 9113 8.2.2); nginx and Apache refuse the
/// stream.
const CONNECTION_SPECIFIC: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
];

struct Head {
    method: String,
    target: String,
    status: u16,
    headers: Vec<Header>,
}

/// One direction of a stream.
#[derive(Default)]
pub(super) struct Half {
    head: Option<Head>,
    body: Option<BodyAcc>,
    done_body: Option<Body>,
    data_seen: bool,
    ended: bool,
    trailers: Vec<Header>,
    first_ns: u64,
    last_ns: u64,
    anomalies: Vec<&'static str>,
}

impl Half {
    fn note(&mut self, sh: &mut Shared, dir: Dir, reason: &'static str) {
        if !self.anomalies.contains(&reason) {
            self.anomalies.push(reason);
        }
        sh.anomaly(Anomaly::Http2 { dir, reason });
    }

    /// A decoded header block: the head (true), or an interim response or trailers (false).
    pub fn headers(
        &mut self,
        sh: &mut Shared,
        dir: Dir,
        fields: Vec<(Vec<u8>, Vec<u8>)>,
        ts: u64,
        request: bool,
    ) -> bool {
        if self.head.is_some() {
            // Trailers: kept apart, never read as headers.
            for (n, v) in fields {
                self.trailers.push(Header {
                    name: String::from_utf8_lossy(&n).into_owned(),
                    value: v,
                });
            }
            if request {
                self.note(sh, dir, "request_trailers");
            }
            self.last_ns = self.last_ns.max(ts);
            return false;
        }
        let mut pseudo_done = false;
        let (mut method, mut path, mut authority, mut status) = (None, None, None, None);
        let mut headers: Vec<Header> = Vec::with_capacity(fields.len());
        let mut cookie_at: Option<usize> = None;
        let mut malformed = false;
        for (n, v) in fields {
            if let Some(p) = n.strip_prefix(b":") {
                if pseudo_done {
                    malformed = true;
                }
                let slot = match (request, p) {
                    (true, b"method") => &mut method,
                    (true, b"path") => &mut path,
                    (true, b"authority") => &mut authority,
                    (false, b"status") => &mut status,
                    (true, b"scheme" | b"protocol") => continue,
                    _ => {
                        malformed = true;
                        continue;
                    }
                };
                if slot.is_some() {
                    malformed = true;
                }
                slot.get_or_insert(v);
                continue;
            }
            pseudo_done = true;
            if n.iter().any(u8::is_ascii_uppercase) {
                self.note(sh, dir, "h2_uppercase_header_name");
            }
            let name = String::from_utf8_lossy(&n).into_owned();
            if CONNECTION_SPECIFIC
                .iter()
                .any(|c| name.eq_ignore_ascii_case(c))
                || (name.eq_ignore_ascii_case("te") && !v.eq_ignore_ascii_case(b"trailers"))
            {
                self.note(sh, dir, "h2_connection_header");
            }
            if request && name.eq_ignore_ascii_case("cookie") {
                // Crumbs are joined into one field, as the servers do (RFC 9113 8.2.3).
                if let Some(i) = cookie_at {
                    let h = &mut headers[i];
                    h.value.extend_from_slice(b"; ");
                    h.value.extend_from_slice(&v);
                    continue;
                }
                cookie_at = Some(headers.len());
            }
            headers.push(Header { name, value: v });
        }
        let status_code = match &status {
            Some(s) => std::str::from_utf8(s)
                .ok()
                .filter(|s| s.len() == 3)
                .and_then(|s| s.parse::<u16>().ok()),
            None => None,
        };
        if request {
            if method.is_none() || path.is_none() && method.as_deref() != Some(b"CONNECT") {
                malformed = true;
            }
        } else if status_code.is_none() {
            malformed = true;
        }
        if malformed {
            self.note(sh, dir, "h2_malformed_headers");
        }
        if let Some(s) = status_code {
            if (100..200).contains(&s) && s != 101 {
                // Interim: no head yet.
                return false;
            }
        }
        if request && !headers.iter().any(|h| h.name.eq_ignore_ascii_case("host")) {
            if let Some(a) = &authority {
                headers.insert(
                    0,
                    Header {
                        name: "host".to_string(),
                        value: a.clone(),
                    },
                );
            }
        }
        let method = method.map_or_else(String::new, |m| String::from_utf8_lossy(&m).into_owned());
        let target = match (&path, method.as_str()) {
            (Some(p), _) => String::from_utf8_lossy(p).into_owned(),
            (None, "CONNECT") => authority
                .as_deref()
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .unwrap_or_default(),
            (None, _) => String::new(),
        };
        let expect = headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| {
                std::str::from_utf8(&h.value)
                    .ok()?
                    .trim()
                    .parse::<u64>()
                    .ok()
            });
        self.body = Some(BodyAcc::new(&sh.limits, content_encoding(&headers), expect));
        self.head = Some(Head {
            method,
            target,
            status: status_code.unwrap_or(0),
            headers,
        });
        self.first_ns = ts;
        self.last_ns = ts;
        true
    }

    pub fn data(&mut self, data: &[u8], ts: u64) {
        self.data_seen |= !data.is_empty();
        self.last_ns = self.last_ns.max(ts);
        if let Some(b) = self.body.as_mut() {
            b.push(data);
        }
    }

    pub fn hole(&mut self, len: u64, ts: u64) {
        self.data_seen = true;
        self.last_ns = self.last_ns.max(ts);
        if let Some(b) = self.body.as_mut() {
            b.hole(len);
        }
    }

    pub fn body_started(&self) -> bool {
        self.data_seen
    }

    pub fn end(&mut self, ts: u64) {
        self.ended = true;
        self.last_ns = self.last_ns.max(ts);
    }

    /// The body as far as it came: finished (`complete` when the half ended normally).
    fn take_body(&mut self, sh: &mut Shared, dir: Dir, complete: bool) -> Body {
        if let Some(b) = self.done_body.take() {
            return b;
        }
        let Some(acc) = self.body.take() else {
            return Body::default();
        };
        let f = acc.finish(complete);
        if f.decode_error {
            let reason = match f.body.decoded_from.as_deref() {
                Some("gzip") => "gzip_error",
                Some("deflate") => "deflate_error",
                _ => "br_error",
            };
            self.note(sh, dir, reason);
        }
        if f.over_budget {
            self.note(sh, dir, "body_over_budget");
        }
        f.body
    }
}

pub(super) struct H2Stream {
    pub sid: u32,
    req: Half,
    resp: Half,
    /// RST_STREAM seen: from which direction, with its error code.
    pub reset: Option<(Dir, u32)>,
    /// The connection desynchronised while the stream was open.
    pub cut: bool,
    /// The connection closed while the stream was open.
    pub closed: bool,
}

impl H2Stream {
    pub fn new(sid: u32) -> H2Stream {
        H2Stream {
            sid,
            req: Half::default(),
            resp: Half::default(),
            reset: None,
            cut: false,
            closed: false,
        }
    }

    pub fn half(&mut self, request: bool) -> &mut Half {
        if request {
            &mut self.req
        } else {
            &mut self.resp
        }
    }

    pub fn resp_head(&self) -> Option<u16> {
        self.resp.head.as_ref().map(|h| h.status)
    }

    /// An anomaly of the whole exchange (kept with the request).
    pub fn note(&mut self, sh: &mut Shared, dir: Dir, reason: &'static str) {
        self.req.note(sh, dir, reason);
    }

    pub fn done(&self) -> bool {
        self.req.ended && self.resp.ended && self.req.head.is_some()
    }

    /// The request as read so far (its body once it ended, finished as the exchange will
    /// carry it, with its decoding anomalies), for checks before the answer.
    pub fn request_so_far(&mut self, sh: &mut Shared, client: Dir) -> Option<Request> {
        self.req.head.as_ref()?;
        let body = if self.req.ended {
            let b = self.req.take_body(sh, client, true);
            self.req.done_body = Some(b.clone());
            b
        } else {
            Body::default()
        };
        let h = self.req.head.as_ref()?;
        Some(Request {
            method: h.method.clone(),
            target: h.target.clone(),
            minor_version: 1,
            headers: h.headers.clone(),
            body,
            first_ns: self.req.first_ns,
            last_ns: self.req.last_ns,
            wire: WireNotes {
                trailers: self.req.trailers.clone(),
                ignored_headers: Vec::new(),
                anomalies: self.req.anomalies.clone(),
            },
        })
    }

    pub fn into_exchange(mut self, sh: &mut Shared, client: Dir) -> Option<Exchange> {
        let server = client.other();
        if self.req.head.is_none() {
            if self.resp.head.is_some() {
                sh.anomaly(Anomaly::Http2 {
                    dir: server,
                    reason: "h2_response_without_request",
                });
            }
            return None;
        }
        let over = self.req.ended && self.resp.ended;
        if !over {
            if self.reset.is_some() {
                self.note(sh, client, "h2_stream_reset");
            }
            if self.closed && !self.cut && self.resp.head.is_some() {
                self.note(sh, server, "truncated_at_close");
            }
        }
        let req_body = self.req.take_body(sh, client, self.req.ended);
        let resp_complete = self.resp.ended;
        let response = match self.resp.head.take() {
            Some(h) => {
                let body = self.resp.take_body(sh, server, resp_complete);
                Some(Response {
                    status: h.status,
                    reason: String::new(),
                    minor_version: 1,
                    headers: h.headers,
                    body,
                    first_ns: self.resp.first_ns,
                    last_ns: self.resp.last_ns,
                    wire: WireNotes {
                        trailers: std::mem::take(&mut self.resp.trailers),
                        ignored_headers: Vec::new(),
                        anomalies: std::mem::take(&mut self.resp.anomalies),
                    },
                })
            }
            None => None,
        };
        use crate::exchange::BodyLoss;
        let lost = |b: &Body| matches!(b.loss, Some(BodyLoss::NotCaptured | BodyLoss::Incomplete));
        let completeness = match &response {
            None if self.cut => Completeness::Partial,
            None => Completeness::NoResponse,
            Some(r) if over && !lost(&req_body) && !lost(&r.body) => Completeness::Complete,
            Some(_) => Completeness::Partial,
        };
        let h = self.req.head.take().expect("checked above");
        Some(Exchange {
            request: Request {
                method: h.method,
                target: h.target,
                minor_version: 1,
                headers: h.headers,
                body: req_body,
                first_ns: self.req.first_ns,
                last_ns: self.req.last_ns,
                wire: WireNotes {
                    trailers: std::mem::take(&mut self.req.trailers),
                    ignored_headers: Vec::new(),
                    anomalies: std::mem::take(&mut self.req.anomalies),
                },
            },
            response,
            completeness,
            upgraded: false,
            stream_id: Some(self.sid),
        })
    }
}
