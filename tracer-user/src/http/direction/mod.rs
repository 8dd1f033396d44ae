//! One direction's message parser: turns the in-order pieces of one stream into request or
//! response heads and bodies and hands them to pairing. Gaps and the search for the next
//! message after one are in [`resync`].

mod resync;

use crate::exchange::{header, Body, Header, Request, Response, WireNotes};
use crate::http::reassembly::{Piece, Stream};

use self::resync::{LossAcc, Resync};
use super::anomaly::Anomaly;
use super::body::{BodyAcc, Finished};
use super::framing::{
    classify_line, content_encoding, content_length, find_head_end, parse_chunk_size, parse_head,
    prefix_ok, transfer_encoding, Chunk, Framing, LengthHeader, Start, TeHeader,
};
use super::leniency::{
    parse_fields, parse_request_line, request_framing, Oddity, Refusal, ReqFraming,
};
use super::pairing::{ClassAnswer, Loss, Pairing, PendingResp, Verdict};
use super::types::{kind_of, Class, ConnProtocol, Dir, Kind, ParserLimits, Role, MIN_MSG_LEN};

/// Longest chunk-size line (size plus extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;

struct HeadBuf {
    buf: Vec<u8>,
    start_pos: u64,
    first_ns: u64,
    line_done: bool,
    scan: usize,
}

enum Phase {
    Idle,
    Head(HeadBuf),
    Body {
        msg: Box<InMsg>,
        framing: Framing,
    },
    /// A response head waits for its request's method.
    Stalled(Box<InMsg>),
    /// After a request that asked to switch protocols: wait for the verdict.
    Paused(u64),
    Resync(Box<Resync>),
    Dead,
}

enum Unblock {
    Free,
    Blocked,
    Changed,
}

/// The connection's state that both directions read and change: its limits, role and protocol,
/// the pairing queue and the anomalies.
pub(super) struct Shared {
    pub(super) limits: ParserLimits,
    pub(super) role: Role,
    pub(super) protocol: ConnProtocol,
    pub(super) closing: bool,
    pub(super) next_seq: u64,
    pub(super) pairing: Pairing,
    pub(super) anomalies: Vec<Anomaly>,
    /// Requests as soon as they are read, for checks before the answer (`None`: not wanted).
    pub(super) requests_read: Option<Vec<super::RequestRead>>,
    /// Where HTTP/2 starts: the direction that sent the preface and the position after its
    /// first line.
    pub(super) h2_start: Option<(Dir, u64)>,
}

impl Shared {
    pub(super) fn anomaly(&mut self, a: Anomaly) {
        log::debug!("http anomaly: {a:?}");
        self.anomalies.push(a);
    }

    fn kind_of(&self, dir: Dir) -> Kind {
        kind_of(self.role, dir)
    }

    fn decide(&mut self, dir: Dir, kind: Kind) {
        if self.role == Role::Unknown {
            self.role = match (kind, dir) {
                (Kind::Request, Dir::Inbound) | (Kind::Response, Dir::Outbound) => Role::Server,
                _ => Role::Client,
            };
        }
        if self.protocol == ConnProtocol::Unknown {
            self.protocol = ConnProtocol::Http1;
        }
    }

    fn terminal(&self) -> bool {
        matches!(
            self.protocol,
            ConnProtocol::Http2
                | ConnProtocol::Http2Midstream
                | ConnProtocol::TlsOnPlaintext
                | ConnProtocol::Upgraded
        )
    }
}

/// One direction of the connection: its reassembly and where its message parsing stands.
pub(super) struct DirState {
    dir: Dir,
    pub(super) stream: Stream,
    /// The rest of a piece that could not be consumed yet.
    cur: Option<Piece>,
    /// Position of the next byte to consume.
    pos: u64,
    /// Timestamp of the latest byte consumed.
    pub(super) wm_ns: u64,
    phase: Phase,
    /// Nothing but CR/LF consumed yet on a stream seen from its start: look for the HTTP/2
    /// preface and TLS records.
    fresh: bool,
    /// The last byte consumed was `\n` (true at the start of a stream seen from its start).
    after_nl: bool,
}

enum StartCheck {
    NeedMore,
    Http2,
    /// An HTTP/2 frame header where a connection's first bytes were expected: one first seen
    /// mid-life, its preface and HPACK state never seen.
    Http2Midstream,
    Tls,
    Plain,
}

fn start_check(buf: &[u8]) -> StartCheck {
    const PREFACE_LINE: &[u8] = b"PRI * HTTP/2.0\r\n";
    let Some(&b0) = buf.first() else {
        return StartCheck::NeedMore;
    };
    if b0 == 0x00 {
        // No HTTP/1 message starts with a NUL; an HTTP/2 frame (length < 64 KiB) does.
        if buf.len() < 9 {
            return StartCheck::NeedMore;
        }
        return if buf[3] <= 9 && buf[5] & 0x80 == 0 {
            StartCheck::Http2Midstream
        } else {
            StartCheck::Plain
        };
    }
    if b0 == 0x16 {
        if buf.len() < 3 {
            return StartCheck::NeedMore;
        }
        return if buf[1] == 0x03 && buf[2] <= 0x04 {
            StartCheck::Tls
        } else {
            StartCheck::Plain
        };
    }
    let n = buf.len().min(PREFACE_LINE.len());
    if buf[..n] != PREFACE_LINE[..n] {
        StartCheck::Plain
    } else if n == PREFACE_LINE.len() {
        StartCheck::Http2
    } else {
        StartCheck::NeedMore
    }
}

/// The request line at the start of a request head that may be cut or malformed, and the bytes
/// after it: the whole first line when it is one nginx reads, else the method and target of a
/// line cut before its end (`GET /very-long…`: nginx answers 414). `None` when neither is there.
fn cut_request_line(buf: &[u8]) -> Option<(super::leniency::ReqLine, &[u8])> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(i) => parse_request_line(&buf[..=i], false).map(|l| (l, &buf[i + 1..])),
        None => {
            let mut line = buf.to_vec();
            line.push(b'\n');
            let l = parse_request_line(&line, false)?;
            // Only the method and the target as far as it came: no version was read.
            let fields = line
                .split(|&b| b == b' ' || b == b'\t')
                .filter(|f| !f.is_empty());
            (fields.count() == 2)
                .then_some(super::leniency::ReqLine {
                    oddities: Vec::new(),
                    http09: false,
                    minor: 1,
                    ..l
                })
                .map(|l| (l, &buf[buf.len()..]))
        }
    }
}

/// A message whose head is parsed, while its body is read.
struct InMsg {
    start: Start,
    minor: u8,
    headers: Vec<Header>,
    first_ns: u64,
    head_ns: u64,
    last_ns: u64,
    body: BodyAcc,
    /// Part of the message fell in a gap or was cut.
    partial: bool,
    /// Requests: sequence number in the pairing queue.
    seq: u64,
    /// Requests: the request asked to switch protocols (CONNECT, or an `Upgrade` header).
    upgrade_req: bool,
    /// Responses: framed without knowing the request for certain.
    guessed: bool,
    /// Responses: framed by guess with a Content-Length; if the request was in fact a HEAD,
    /// the "body" holds the following responses, so a loss marker follows it.
    guessed_len: bool,
    /// Trailers, ignored header lines and the anomalies of this message.
    wire: WireNotes,
}

impl InMsg {
    /// An anomaly of this message: counted for the connection and carried by the record.
    fn note(&mut self, sh: &mut Shared, a: Anomaly) {
        let r = a.reason();
        if !self.wire.anomalies.contains(&r) {
            self.wire.anomalies.push(r);
        }
        sh.anomaly(a);
    }
}

impl InMsg {
    fn status(&self) -> u16 {
        match self.start {
            Start::Resp { status, .. } => status,
            Start::Req { .. } => 0,
        }
    }
}

impl DirState {
    pub(super) fn new(dir: Dir, limits: &ParserLimits, midstream: bool) -> Self {
        DirState {
            dir,
            // A connection seen from its start has its positions start at 0, so that a loss
            // of its first bytes is seen as a gap; one picked up midstream starts wherever its
            // first piece is.
            stream: if midstream {
                Stream::new(limits.stream)
            } else {
                Stream::with_start(limits.stream, 0)
            },
            cur: None,
            pos: 0,
            wm_ns: 0,
            phase: if midstream {
                Phase::Resync(Box::new(Resync {
                    line: Vec::new(),
                    in_line: false,
                    at_line_start: true,
                    cand_pos: 0,
                    cand_ts: 0,
                    cand_clean: false,
                    loss: LossAcc::midstream(),
                }))
            } else {
                Phase::Idle
            },
            fresh: !midstream,
            after_nl: !midstream,
        }
    }

    /// The next piece for HTTP/2: the rest of a piece the HTTP/1 parser stopped in, then the
    /// stream's.
    pub(super) fn take_piece(&mut self) -> Option<Piece> {
        self.cur.take().or_else(|| self.stream.next_piece())
    }

    /// Between a gap and the next message: a loss marker may still follow.
    pub(super) fn resyncing(&self) -> bool {
        matches!(self.phase, Phase::Resync(_))
    }

    fn blocked_too_long(&self, sh: &Shared) -> bool {
        sh.closing || self.stream.ready_bytes() > sh.limits.stream.max_pending_bytes
    }

    fn try_unblock(&mut self, sh: &mut Shared) -> Unblock {
        match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Stalled(msg) => {
                let ans = match sh.pairing.class_for_next_response() {
                    ClassAnswer::Wait if self.blocked_too_long(sh) => ClassAnswer::Guess,
                    a => a,
                };
                match ans {
                    ClassAnswer::Wait => {
                        self.phase = Phase::Stalled(msg);
                        Unblock::Blocked
                    }
                    ClassAnswer::Known(c) => {
                        self.phase = self.start_response_body(sh, msg, c, false);
                        Unblock::Changed
                    }
                    ClassAnswer::Guess => {
                        self.phase = self.start_response_body(sh, msg, Class::Other, true);
                        Unblock::Changed
                    }
                }
            }
            Phase::Paused(seq) => match sh.pairing.upgrade_verdict(seq) {
                Verdict::Pending if !self.blocked_too_long(sh) => {
                    self.phase = Phase::Paused(seq);
                    Unblock::Blocked
                }
                Verdict::Upgraded => {
                    self.phase = Phase::Dead;
                    Unblock::Changed
                }
                _ => Unblock::Changed,
            },
            other => {
                self.phase = other;
                Unblock::Free
            }
        }
    }

    /// Consume what can be consumed. Returns whether anything changed.
    pub(super) fn run(&mut self, sh: &mut Shared) -> bool {
        let mut progress = false;
        if sh.protocol == ConnProtocol::Http2 {
            return progress;
        }
        if self.fresh
            && sh.protocol == ConnProtocol::Unknown
            && !sh.closing
            && sh.role != Role::Unknown
            && sh.kind_of(self.dir) == Kind::Response
            && self.stream.ready_bytes() <= sh.limits.stream.max_pending_bytes
        {
            // What the server writes before the client's first bytes decided the protocol
            // waits (an HTTP/2 server's SETTINGS come before the client's preface is read).
            return progress;
        }
        loop {
            if sh.protocol == ConnProtocol::Http2 {
                return progress;
            }
            if sh.terminal() && !matches!(self.phase, Phase::Dead) {
                self.phase = Phase::Dead;
                progress = true;
            }
            match self.try_unblock(sh) {
                Unblock::Blocked => return progress,
                Unblock::Changed => progress = true,
                Unblock::Free => {}
            }
            let piece = match self.cur.take() {
                Some(p) => p,
                None => {
                    let Some(p) = self.stream.next_piece() else {
                        return progress;
                    };
                    // A new piece (one read or write call) often starts a message: while
                    // resynchronising, its first byte is a candidate like a line start.
                    if let Phase::Resync(r) = &mut self.phase {
                        if !r.in_line {
                            r.at_line_start = true;
                        }
                    }
                    p
                }
            };
            match piece {
                Piece::Hole {
                    pos,
                    len,
                    ts_ns,
                    known,
                } => {
                    self.on_hole(sh, pos, len, ts_ns, known);
                    progress = true;
                }
                Piece::Data { pos, ts_ns, bytes } => {
                    if self.pos != pos {
                        // Only at the very first piece (positions start where the stream starts).
                        self.pos = pos;
                    }
                    let used = self.on_data(sh, &bytes, ts_ns);
                    if used > 0 {
                        progress = true;
                    }
                    if used < bytes.len() {
                        self.cur = Some(Piece::Data {
                            pos: pos + used as u64,
                            ts_ns,
                            bytes: bytes.slice(used..),
                        });
                        if used == 0 && !matches!(self.phase, Phase::Stalled(_) | Phase::Paused(_))
                        {
                            // Defensive: a handler that neither consumes nor blocks would spin.
                            log::warn!("http: parser made no progress; dropping a byte");
                            self.cur = None;
                            if bytes.len() > 1 {
                                self.cur = Some(Piece::Data {
                                    pos: pos + 1,
                                    ts_ns,
                                    bytes: bytes.slice(1..),
                                });
                            }
                            self.pos += 1;
                        }
                    }
                }
            }
        }
    }

    fn on_data(&mut self, sh: &mut Shared, bytes: &[u8], ts: u64) -> usize {
        let mut off = 0;
        let mut idle_rounds = 0;
        while off < bytes.len() {
            if sh.protocol == ConnProtocol::Http2 {
                // The rest is HTTP/2's (`DirState::take_piece`).
                break;
            }
            if sh.terminal() {
                self.phase = Phase::Dead;
            }
            let phase = std::mem::replace(&mut self.phase, Phase::Idle);
            if matches!(phase, Phase::Stalled(_) | Phase::Paused(_)) {
                self.phase = phase;
                break;
            }
            let data = &bytes[off..];
            let (next, n) = match phase {
                Phase::Dead => (Phase::Dead, data.len()),
                Phase::Idle => self.idle_data(data, ts),
                Phase::Head(h) => self.head_data(sh, h, data, ts),
                Phase::Body { msg, framing } => self.body_data(sh, msg, framing, data, ts),
                Phase::Resync(r) => self.resync_data(sh, r, data, ts),
                p @ (Phase::Stalled(_) | Phase::Paused(_)) => (p, 0),
            };
            self.phase = next;
            off += n;
            self.pos += n as u64;
            if n > 0 {
                self.after_nl = bytes[off - 1] == b'\n';
                self.wm_ns = self.wm_ns.max(ts);
                idle_rounds = 0;
            } else {
                idle_rounds += 1;
                if idle_rounds > 8 {
                    break;
                }
            }
        }
        off
    }

    fn idle_data(&mut self, data: &[u8], ts: u64) -> (Phase, usize) {
        let skip = data
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        if skip == data.len() {
            return (Phase::Idle, skip);
        }
        (
            Phase::Head(HeadBuf {
                buf: Vec::new(),
                start_pos: self.pos + skip as u64,
                first_ns: ts,
                line_done: false,
                scan: 0,
            }),
            skip,
        )
    }

    fn malformed_start(&self, sh: &mut Shared, kind: Kind, pos: u64) {
        let dir = self.dir;
        sh.anomaly(match kind {
            Kind::Response => Anomaly::MalformedStatusLine { dir, pos },
            Kind::Request | Kind::Unknown => Anomaly::MalformedRequestLine { dir, pos },
        });
    }

    fn head_data(
        &mut self,
        sh: &mut Shared,
        mut h: HeadBuf,
        data: &[u8],
        ts: u64,
    ) -> (Phase, usize) {
        let kind = sh.kind_of(self.dir);
        let max = sh.limits.max_header_bytes;
        if !h.line_done {
            let room = (max + 1).saturating_sub(h.buf.len()).max(1);
            let avail = &data[..data.len().min(room)];
            let (take, got_nl) = match avail.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (avail.len(), false),
            };
            h.buf.extend_from_slice(&avail[..take]);
            if self.fresh {
                match start_check(&h.buf) {
                    StartCheck::NeedMore => return (Phase::Head(h), take),
                    StartCheck::Http2 => {
                        // HTTP/2 from the byte after this line on (`super::h2`).
                        sh.protocol = ConnProtocol::Http2;
                        sh.h2_start = Some((self.dir, h.start_pos + h.buf.len() as u64));
                        return (Phase::Dead, take);
                    }
                    StartCheck::Http2Midstream if kind == Kind::Response => {
                        // The server's HTTP/2 SETTINGS on a connection whose client sent
                        // nothing (a browser's unused preconnect): nothing to parse.
                        return (Phase::Dead, take);
                    }
                    StartCheck::Http2Midstream => {
                        sh.anomaly(Anomaly::Http2 {
                            dir: self.dir,
                            reason: "h2_midstream",
                        });
                        sh.protocol = ConnProtocol::Http2Midstream;
                        return (Phase::Dead, take);
                    }
                    StartCheck::Tls => {
                        sh.anomaly(Anomaly::TlsRecordOnPlaintext { dir: self.dir });
                        sh.protocol = ConnProtocol::TlsOnPlaintext;
                        return (Phase::Dead, take);
                    }
                    StartCheck::Plain => self.fresh = false,
                }
            }
            // nginx and Apache answer (400) a request line that starts with whitespace: it is
            // read, so that the answer has its request.
            let lead_ws = kind == Kind::Request && matches!(h.buf[0], b' ' | b'\t');
            if !lead_ws && !prefix_ok(kind, &h.buf) {
                if kind == Kind::Request {
                    let why = Anomaly::MalformedRequestLine {
                        dir: self.dir,
                        pos: h.start_pos,
                    };
                    return (self.refused_head(sh, &h, why, ts), take);
                }
                self.malformed_start(sh, kind, h.start_pos);
                return (self.head_lost(sh, &h, got_nl), take);
            }
            if !got_nl {
                if h.buf.len() > max {
                    let why = Anomaly::HeaderTooLarge {
                        dir: self.dir,
                        pos: h.start_pos,
                    };
                    if kind == Kind::Request {
                        return (self.refused_head(sh, &h, why, ts), take);
                    }
                    sh.anomaly(why);
                    return (self.head_lost(sh, &h, false), take);
                }
                return (Phase::Head(h), take);
            }
            // A known request direction reads the line as the servers do; elsewhere (the role
            // is not known yet) a lenient request line must at least end in `HTTP/1.x`.
            let found = match kind {
                Kind::Request => {
                    parse_request_line(&h.buf, false).map(|l| (Kind::Request, l.http09))
                }
                _ => classify_line(kind, &h.buf).map(|k| (k, false)).or_else(|| {
                    (kind == Kind::Unknown)
                        .then(|| parse_request_line(&h.buf, true))
                        .flatten()
                        .map(|_| (Kind::Request, false))
                }),
            };
            match found {
                Some((k, http09)) => {
                    sh.decide(self.dir, k);
                    if http09 {
                        // An HTTP/0.9 simple request has no headers: its head is this line.
                        return (self.complete_head(sh, h, ts), take);
                    }
                }
                None if kind == Kind::Request => {
                    let why = Anomaly::MalformedRequestLine {
                        dir: self.dir,
                        pos: h.start_pos,
                    };
                    return (self.refused_head(sh, &h, why, ts), take);
                }
                None => {
                    self.malformed_start(sh, kind, h.start_pos);
                    return (self.head_lost(sh, &h, true), take);
                }
            }
            h.line_done = true;
            h.scan = h.buf.len() - 1;
            return (Phase::Head(h), take);
        }
        let room = (max + 3).saturating_sub(h.buf.len()).max(1);
        let avail = &data[..data.len().min(room)];
        let old = h.buf.len();
        h.buf.extend_from_slice(avail);
        match find_head_end(&h.buf, h.scan) {
            Ok(end) => {
                let used = end.saturating_sub(old).max(1).min(avail.len());
                h.buf.truncate(old + used);
                (self.complete_head(sh, h, ts), used)
            }
            Err(resume) => {
                h.scan = resume;
                if h.buf.len() > max {
                    let why = Anomaly::HeaderTooLarge {
                        dir: self.dir,
                        pos: h.start_pos,
                    };
                    if kind == Kind::Request {
                        return (self.refused_head(sh, &h, why, ts), avail.len());
                    }
                    sh.anomaly(why);
                    return (self.head_lost(sh, &h, false), avail.len());
                }
                (Phase::Head(h), avail.len())
            }
        }
    }

    /// A request head the server refuses or answers without reading it whole (a line that is
    /// not a request line, a head over the limit, a head cut by the close): nginx answers it
    /// (400, 414 or 494) and closes. It becomes a partial request, carrying `why` and what
    /// could be read of it (the request line, or its method and target; the complete header
    /// lines), so the server's answer pairs with it and is recorded; the rest of the
    /// connection is its body (see `leniency`). Without a readable request line the method and
    /// target are empty: nothing of the line is written into the record.
    fn refused_head(&mut self, sh: &mut Shared, h: &HeadBuf, why: Anomaly, ts: u64) -> Phase {
        let (method, target, minor, mut oddities, rest) = match cut_request_line(&h.buf) {
            Some((line, rest)) => (line.method, line.target, line.minor, line.oddities, rest),
            None => (
                String::new(),
                String::new(),
                1,
                Vec::new(),
                &h.buf[h.buf.len()..],
            ),
        };
        // Complete header lines only: a cut last line is not a header the server read.
        let whole = rest
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(&rest[..0], |i| &rest[..=i]);
        let fields = parse_fields(whole);
        for o in fields.oddities {
            if !oddities.contains(&o) {
                oddities.push(o);
            }
        }
        sh.decide(self.dir, Kind::Request);
        let pos = h.start_pos;
        let mut msg = Box::new(InMsg {
            start: Start::Req { method, target },
            minor,
            headers: fields.headers,
            first_ns: h.first_ns,
            head_ns: ts,
            last_ns: ts,
            body: BodyAcc::new(&sh.limits, None, None),
            partial: true,
            seq: sh.next_seq,
            upgrade_req: false,
            guessed: false,
            guessed_len: false,
            wire: WireNotes {
                ignored_headers: fields.ignored,
                ..WireNotes::default()
            },
        });
        sh.next_seq += 1;
        msg.note(sh, why);
        for what in oddities {
            msg.note(
                sh,
                Anomaly::Lenient {
                    dir: self.dir,
                    pos,
                    what,
                },
            );
        }
        // A refused HEAD's answer is header-only too (nginx and Apache keep the method).
        let class = match &msg.start {
            Start::Req { method, .. } if method == "HEAD" => Class::Head,
            _ => Class::Other,
        };
        sh.pairing.push_request_head(msg.seq, ts, class);
        Phase::Body {
            msg,
            framing: Framing::Close,
        }
    }

    fn complete_head(&mut self, sh: &mut Shared, h: HeadBuf, ts: u64) -> Phase {
        let kind = sh.kind_of(self.dir);
        let pos = h.start_pos;
        let mut oddities: Vec<Oddity> = Vec::new();
        let mut wire = WireNotes::default();
        let parsed = match kind {
            Kind::Request => {
                let nl = h
                    .buf
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(h.buf.len(), |i| i + 1);
                parse_request_line(&h.buf[..nl], false).map(|line| {
                    let fields = parse_fields(&h.buf[nl..]);
                    oddities = line.oddities;
                    for o in fields.oddities {
                        if !oddities.contains(&o) {
                            oddities.push(o);
                        }
                    }
                    wire.ignored_headers = fields.ignored;
                    (
                        Start::Req {
                            method: line.method,
                            target: line.target,
                        },
                        line.minor,
                        fields.headers,
                        line.http09,
                    )
                })
            }
            _ => parse_head(kind, &h.buf).map(|p| (p.start, p.minor, p.headers, false)),
        };
        let Some((start, minor, headers, http09)) = parsed else {
            sh.anomaly(Anomaly::MalformedHeaders { dir: self.dir, pos });
            return self.head_lost(sh, &h, true);
        };
        sh.decide(self.dir, kind);
        let encoding = content_encoding(&headers);
        let mut msg = Box::new(InMsg {
            start,
            minor,
            headers,
            first_ns: h.first_ns,
            head_ns: ts,
            last_ns: ts,
            body: BodyAcc::new(&sh.limits, None, None),
            partial: false,
            seq: 0,
            upgrade_req: false,
            guessed: false,
            guessed_len: false,
            wire,
        });
        for what in oddities {
            msg.note(
                sh,
                Anomaly::Lenient {
                    dir: self.dir,
                    pos,
                    what,
                },
            );
        }
        match kind {
            Kind::Request => {
                let class = match &msg.start {
                    Start::Req { method, .. } if method == "HEAD" => Class::Head,
                    Start::Req { method, .. } if method == "CONNECT" => Class::Connect,
                    _ => Class::Other,
                };
                msg.seq = sh.next_seq;
                sh.next_seq += 1;
                msg.upgrade_req =
                    class == Class::Connect || header(&msg.headers, "upgrade").is_some();
                sh.pairing.push_request_head(msg.seq, ts, class);
                let framing = if http09 {
                    // The server answers a simple request and closes.
                    Some(Framing::Close)
                } else {
                    match request_framing(&msg.headers, msg.minor) {
                        ReqFraming::None => None,
                        ReqFraming::Length(n) => Some(Framing::Length(n)),
                        ReqFraming::Chunked => Some(Framing::Chunked(Chunk::Size(Vec::new()))),
                        ReqFraming::Refused(why) => {
                            let dir = self.dir;
                            msg.note(
                                sh,
                                match why {
                                    Refusal::Conflicting => {
                                        Anomaly::ConflictingFraming { dir, pos }
                                    }
                                    Refusal::BadTransferEncoding => {
                                        Anomaly::BadTransferEncoding { dir, pos }
                                    }
                                    Refusal::BadContentLength => {
                                        Anomaly::BadContentLength { dir, pos }
                                    }
                                },
                            );
                            // The edge answers and closes: nothing after this head is a
                            // request it acts on (see `leniency`).
                            msg.upgrade_req = false;
                            Some(Framing::Close)
                        }
                    }
                };
                let expect = match &framing {
                    Some(Framing::Length(n)) => Some(*n),
                    _ => None,
                };
                msg.body = BodyAcc::new(&sh.limits, encoding, expect);
                match framing {
                    Some(framing) => {
                        // The head is read; the body may take a while (its own event follows).
                        if let (Some(q), Start::Req { method, target }) =
                            (sh.requests_read.as_mut(), &msg.start)
                        {
                            q.push(super::RequestRead {
                                request: Request {
                                    method: method.clone(),
                                    target: target.clone(),
                                    minor_version: msg.minor,
                                    headers: msg.headers.clone(),
                                    body: Body::default(),
                                    first_ns: msg.first_ns,
                                    last_ns: msg.last_ns,
                                    wire: msg.wire.clone(),
                                },
                                body_read: false,
                            });
                        }
                        Phase::Body { msg, framing }
                    }
                    None => self.finish_request(sh, msg, true),
                }
            }
            Kind::Response => {
                let status = msg.status();
                if (100..200).contains(&status) && status != 101 {
                    // Interim response: consumes no request, has no body.
                    return Phase::Idle;
                }
                match sh.pairing.class_for_next_response() {
                    ClassAnswer::Known(c) => self.start_response_body(sh, msg, c, false),
                    ClassAnswer::Guess => self.start_response_body(sh, msg, Class::Other, true),
                    ClassAnswer::Wait => Phase::Stalled(msg),
                }
            }
            Kind::Unknown => self.head_lost(sh, &h, true),
        }
    }

    fn start_response_body(
        &mut self,
        sh: &mut Shared,
        mut msg: Box<InMsg>,
        class: Class,
        guessed: bool,
    ) -> Phase {
        msg.guessed = guessed;
        let status = msg.status();
        let pos = self.pos;
        if status == 101 || (class == Class::Connect && (200..300).contains(&status)) {
            // The connection switches protocols right after this head.
            self.finish_response(sh, msg, true, false, true);
            sh.protocol = ConnProtocol::Upgraded;
            return Phase::Dead;
        }
        if class == Class::Head || (100..200).contains(&status) || status == 204 || status == 304 {
            self.finish_response(sh, msg, true, false, false);
            return Phase::Idle;
        }
        let encoding = content_encoding(&msg.headers);
        let framing = match (
            transfer_encoding(&msg.headers),
            content_length(&msg.headers),
        ) {
            (TeHeader::Chunked, cl) => {
                if !matches!(cl, LengthHeader::Absent) {
                    sh.anomaly(Anomaly::ContentLengthWithChunked { dir: self.dir, pos });
                }
                Framing::Chunked(Chunk::Size(Vec::new()))
            }
            (TeHeader::Other, _) => Framing::Close,
            (TeHeader::Absent, LengthHeader::Valid(0)) => {
                self.finish_response(sh, msg, true, false, false);
                return Phase::Idle;
            }
            (TeHeader::Absent, LengthHeader::Valid(n)) => {
                msg.guessed_len = guessed;
                Framing::Length(n)
            }
            (TeHeader::Absent, LengthHeader::Invalid) => {
                sh.anomaly(Anomaly::BadContentLength { dir: self.dir, pos });
                msg.partial = true;
                let tb = msg.head_ns;
                self.finish_response(sh, msg, false, true, false);
                return self.new_resync(LossAcc::region(false, 0, tb), true);
            }
            (TeHeader::Absent, LengthHeader::Absent) => Framing::Close,
        };
        let expect = match framing {
            Framing::Length(n) => Some(n),
            _ => None,
        };
        msg.body = BodyAcc::new(&sh.limits, encoding, expect);
        Phase::Body { msg, framing }
    }

    fn finish_request(&mut self, sh: &mut Shared, msg: Box<InMsg>, complete: bool) -> Phase {
        let mut msg = *msg;
        let body = self.finish_body(sh, &mut msg, complete);
        let Start::Req { method, target } = msg.start else {
            return Phase::Idle;
        };
        let req = Request {
            method,
            target,
            minor_version: msg.minor,
            headers: msg.headers,
            body,
            first_ns: msg.first_ns,
            last_ns: msg.last_ns,
            wire: msg.wire,
        };
        if let Some(q) = sh.requests_read.as_mut() {
            q.push(super::RequestRead {
                request: req.clone(),
                body_read: true,
            });
        }
        sh.pairing
            .complete_request(msg.seq, req, msg.partial || !complete);
        if complete && msg.upgrade_req {
            Phase::Paused(msg.seq)
        } else {
            Phase::Idle
        }
    }

    fn finish_response(
        &mut self,
        sh: &mut Shared,
        msg: Box<InMsg>,
        complete: bool,
        body_framed: bool,
        upgrade: bool,
    ) {
        let mut msg = *msg;
        let body = self.finish_body(sh, &mut msg, complete);
        let Start::Resp { status, reason } = msg.start else {
            return;
        };
        let wire_len = body.wire_len;
        sh.pairing.push_response(PendingResp {
            resp: Response {
                status,
                reason,
                minor_version: msg.minor,
                headers: msg.headers,
                body,
                first_ns: msg.first_ns,
                last_ns: msg.last_ns,
                wire: msg.wire,
            },
            partial: msg.partial || !complete,
            guessed: msg.guessed,
            body_framed,
            upgrade,
        });
        if msg.guessed_len && !sh.pairing.desync {
            // If the guess was wrong (the request was a HEAD), the bytes taken as body were
            // the next responses: as many as fit in them may have been swallowed. Their first
            // bytes came no later than the last byte of this "body".
            let hi = wire_len / MIN_MSG_LEN;
            if hi > 0 {
                sh.pairing.push_loss(
                    Kind::Response,
                    Loss {
                        lo: 0,
                        hi,
                        tb: msg.head_ns,
                        ta: msg.last_ns,
                    },
                );
            }
        }
    }

    /// Finishes the body of `msg` (its accumulator is left empty) and notes what went wrong.
    fn finish_body(&self, sh: &mut Shared, msg: &mut InMsg, complete: bool) -> Body {
        let acc = std::mem::replace(&mut msg.body, BodyAcc::new(&sh.limits, None, None));
        let Finished {
            body,
            decode_error,
            over_budget,
        } = acc.finish(complete);
        let dir = self.dir;
        if decode_error {
            msg.note(
                sh,
                match body.decoded_from.as_deref() {
                    Some("deflate") => Anomaly::DeflateError { dir },
                    _ => Anomaly::GzipError { dir },
                },
            );
        }
        if over_budget {
            msg.note(sh, Anomaly::BodyOverBudget { dir });
        }
        body
    }

    fn finish_msg(&mut self, sh: &mut Shared, msg: Box<InMsg>, complete: bool) -> Phase {
        match msg.start {
            Start::Req { .. } => self.finish_request(sh, msg, complete),
            Start::Resp { .. } => {
                self.finish_response(sh, msg, complete, true, false);
                Phase::Idle
            }
        }
    }

    fn body_data(
        &mut self,
        sh: &mut Shared,
        mut msg: Box<InMsg>,
        framing: Framing,
        data: &[u8],
        ts: u64,
    ) -> (Phase, usize) {
        msg.last_ns = ts;
        match framing {
            Framing::Close => {
                msg.body.push(data);
                (Phase::Body { msg, framing }, data.len())
            }
            Framing::Length(rem) => {
                let n = (data.len() as u64).min(rem) as usize;
                msg.body.push(&data[..n]);
                let rem = rem - n as u64;
                if rem == 0 {
                    (self.finish_msg(sh, msg, true), n)
                } else {
                    (
                        Phase::Body {
                            msg,
                            framing: Framing::Length(rem),
                        },
                        n,
                    )
                }
            }
            Framing::Chunked(ch) => self.chunk_data(sh, msg, ch, data),
        }
    }

    fn chunk_data(
        &mut self,
        sh: &mut Shared,
        mut msg: Box<InMsg>,
        ch: Chunk,
        data: &[u8],
    ) -> (Phase, usize) {
        let body = |msg, ch| Phase::Body {
            msg,
            framing: Framing::Chunked(ch),
        };
        match ch {
            Chunk::Size(mut line) => {
                let room = MAX_CHUNK_LINE.saturating_sub(line.len()).max(1);
                let avail = &data[..data.len().min(room)];
                let (take, got_nl) = match avail.iter().position(|&b| b == b'\n') {
                    Some(i) => (i + 1, true),
                    None => (avail.len(), false),
                };
                line.extend_from_slice(&avail[..take]);
                if !got_nl {
                    if line.len() >= MAX_CHUNK_LINE {
                        sh.anomaly(Anomaly::BadChunkSize {
                            dir: self.dir,
                            pos: self.pos,
                        });
                        return (self.framing_lost(sh, msg, 0, false), take);
                    }
                    return (body(msg, Chunk::Size(line)), take);
                }
                match parse_chunk_size(&line) {
                    Some(0) => (body(msg, Chunk::Trailers(vec![b'\n'], 0)), take),
                    Some(n) => (body(msg, Chunk::Data(n)), take),
                    None => {
                        sh.anomaly(Anomaly::BadChunkSize {
                            dir: self.dir,
                            pos: self.pos,
                        });
                        (self.framing_lost(sh, msg, 0, true), take)
                    }
                }
            }
            Chunk::Data(rem) => {
                let n = (data.len() as u64).min(rem) as usize;
                msg.body.push(&data[..n]);
                let rem = rem - n as u64;
                if rem == 0 {
                    (body(msg, Chunk::DataEnd(false)), n)
                } else {
                    (body(msg, Chunk::Data(rem)), n)
                }
            }
            Chunk::DataEnd(seen_cr) => match (seen_cr, data[0]) {
                (false, b'\r') => (body(msg, Chunk::DataEnd(true)), 1),
                (_, b'\n') => (body(msg, Chunk::Size(Vec::new())), 1),
                _ => {
                    sh.anomaly(Anomaly::BadChunkTerminator {
                        dir: self.dir,
                        pos: self.pos,
                    });
                    (self.framing_lost(sh, msg, 0, false), 1)
                }
            },
            Chunk::Trailers(mut buf, scan) => {
                let max = sh.limits.max_header_bytes;
                let room = (max + 3).saturating_sub(buf.len()).max(1);
                let avail = &data[..data.len().min(room)];
                let old = buf.len();
                buf.extend_from_slice(avail);
                match find_head_end(&buf, scan) {
                    Ok(end) => {
                        let used = end.saturating_sub(old).max(1).min(avail.len());
                        let block = &buf[1..end];
                        if block.len() > 2 {
                            // Trailers are kept apart from the headers: nginx drops them,
                            // Apache keeps them apart; no server reads them as headers.
                            let f = parse_fields(block);
                            msg.wire.trailers = f.headers;
                            msg.wire.trailers.extend(f.ignored);
                            if matches!(msg.start, Start::Req { .. }) {
                                let (dir, pos) = (self.dir, self.pos);
                                msg.note(sh, Anomaly::RequestTrailers { dir, pos });
                            }
                        }
                        (self.finish_msg(sh, msg, true), used)
                    }
                    Err(resume) => {
                        if buf.len() > max {
                            sh.anomaly(Anomaly::HeaderTooLarge {
                                dir: self.dir,
                                pos: self.pos,
                            });
                            return (self.framing_lost(sh, msg, 0, false), avail.len());
                        }
                        (body(msg, Chunk::Trailers(buf, resume)), avail.len())
                    }
                }
            }
        }
    }

    /// At close, before any answer is guessed: a request head cut by the close becomes its
    /// request (as far as it was read), so the answer waiting for it learns its method (a
    /// HEAD's answer has no body).
    pub(super) fn finish_cut_request(&mut self, sh: &mut Shared) {
        let cut = matches!(&self.phase, Phase::Head(h)
            if sh.kind_of(self.dir) == Kind::Request && cut_request_line(&h.buf).is_some());
        if !cut {
            return;
        }
        if let Phase::Head(h) = std::mem::replace(&mut self.phase, Phase::Dead) {
            // The server answered (or gave up on) a head it had not read whole: the
            // request is recorded with what was read, and pairs with that answer.
            let why = Anomaly::RequestHeadCut {
                dir: self.dir,
                pos: h.start_pos,
            };
            let ts = self.wm_ns;
            if let Phase::Body { msg, .. } = self.refused_head(sh, &h, why, ts) {
                self.finish_request(sh, msg, true);
            }
        }
    }

    /// At close: finish what can be finished.
    pub(super) fn finish_at_close(&mut self, sh: &mut Shared) {
        let kind = sh.kind_of(self.dir);
        match std::mem::replace(&mut self.phase, Phase::Dead) {
            Phase::Body {
                msg,
                framing: Framing::Close,
            } => {
                self.finish_msg(sh, msg, true);
            }
            Phase::Body { msg, .. } => {
                sh.anomaly(Anomaly::TruncatedAtClose { dir: self.dir });
                let mut msg = msg;
                msg.partial = true;
                self.finish_msg(sh, msg, false);
            }
            Phase::Stalled(msg) => {
                sh.anomaly(Anomaly::TruncatedAtClose { dir: self.dir });
                self.finish_response(sh, msg, false, false, false);
            }
            Phase::Head(h) if kind == Kind::Request && cut_request_line(&h.buf).is_some() => {
                self.phase = Phase::Head(h);
                self.finish_cut_request(sh);
            }
            Phase::Head(h) => {
                sh.anomaly(Anomaly::TruncatedAtClose { dir: self.dir });
                if let Some(m) = LossAcc::cut_head(kind, &h, 0).marker(kind, u64::MAX) {
                    sh.pairing.push_loss(kind, m);
                }
            }
            Phase::Resync(r) => {
                if let Some(m) = r.loss.marker(kind, u64::MAX) {
                    sh.pairing.push_loss(kind, m);
                }
            }
            Phase::Idle | Phase::Paused(_) | Phase::Dead => {}
        }
    }
}
