//! Turns the two reassembled byte streams of one traced connection into HTTP/1.1 request/response
//! pairs ([`Exchange`]), surviving what capture does to a stream: pieces that are missing,
//! uncaptured on purpose, or start in the middle of a message. It knows nothing of eBPF; it sees
//! positions, timestamps, bytes and holes.
//!
//! # Structure
//!
//! Each direction has a [`Stream`](crate::http::reassembly::Stream) (reassembly) and a message
//! parser (`DirState`) that turns the in-order pieces into request or response messages.
//! Parsed messages go into a pairing queue (`Pairing`), which matches the n-th request with the
//! n-th final response (1xx interim responses consume no request). A connection seen from its
//! start has positions starting at 0 in both directions (so a loss of its first bytes is a
//! gap); one picked up midstream starts each direction at the first position it sees.
//!
//! # Gaps and resynchronisation
//!
//! A hole (known or lost) that falls inside a body of known extent (Content-Length, the data
//! of one chunk, or a body delimited by the connection's close) is skipped: the framing is
//! still known, `Body::wire_len` stays right and `BodyLoss::NotCaptured` is set (a lost one is
//! also counted as `gap_in_body`). Any other hole means message boundaries are lost
//! (`gap_resync`): the message in progress is finished as partial when its head was parsed (or
//! counted as lost when it was not), and the direction scans for the next message start, never
//! stitching bytes across the hole:
//!
//! - requests: a line that httparse accepts as a request line, starting right after a `\n`, or
//!   at the first byte after the hole or of a new piece (one read/write call); at those last
//!   two places the line may be the tail of a cut one (`EAD /x` of `HEAD /x`), so only the
//!   standard methods are believed there;
//! - responses: `HTTP/1.x NNN` accepted by httparse as a status line, at any position (a
//!   response usually follows the previous body with no line break).
//!
//! # Pairing after a gap (the soundness argument)
//!
//! Wherever messages may have been lost, the pairing queue of that direction holds a *loss
//! marker* with a range `lo..=hi` for the number of lost messages that count in pairing.
//! Pairing goes on past a marker only when that number is *certain*; otherwise the connection
//! is declared desynchronised: from then on requests are emitted with `response: None`
//! (`Completeness::Partial`, anomaly `pairing_uncertain`) and responses are dropped (anomaly
//! `unpaired_response`). The reasoning rests on these assumptions, and on nothing else:
//!
//! - **T1** Within one direction, timestamps do not decrease with the stream position.
//! - **T2** A response's first byte is not earlier than the last byte of its request's head
//!   (a server answers after it has read the request line and headers; it may answer before
//!   the request body, which is why the head and not the whole request is used).
//! - **T3** An HTTP/1.x message is at least [`MIN_MSG_LEN`] (14) bytes long
//!   (`A / HTTP/1.1\n\n`, `HTTP/1.1 200\n\n`), and between two requests there are at most
//!   2 stray bytes (CRLF).
//!
//! Bounds of a marker. Let the lost region run from B (where knowledge stopped) to P (where the
//! resynchronised message starts). `hi` is the number of cut or malformed heads plus
//! `unknown_bytes / 14` (T3). `lo` is 1 when a cut or malformed request head was seen, or when
//! on the request side B is a known message boundary and the region has at least 16 bytes
//! (T3). On the response side the region may hold nothing but interim 1xx responses (which
//! pair with nothing), so `lo` is 1 only when a cut head shows a final status (`HTTP/1.1 2..`).
//!
//! *Responses lost* (a marker on the response side; `ta` = timestamp of the first byte of the
//! message after the region): a lost response began at or before `ta` (T1), so its request's
//! head ended at or before `ta` (T2). Once every request whose head may end by `ta` is parsed
//! (the request direction consumed a byte stamped after `ta` and is not itself
//! resynchronising, or the connection closed with its end positions known), the candidates
//! are exactly the pending requests with `head_ns <= ta`, a prefix `D` of the queue, so
//! `hi <= |D|`. Then each count `k` is checked against the responses already parsed after the
//! marker: under `k`, the i-th of them answers pending request `k + i`, which must exist (or
//! still be able to arrive: the request watermark is not past the response's first byte) with
//! a head ending no later than that response's first byte (T2). A larger `k` only makes this
//! harder, so failures lower `hi`. When `lo == hi`, the first `lo` candidates are emitted
//! without response (anomaly `response_lost`) and pairing continues.
//!
//! *Requests lost* (a marker on the request side; `tb` = timestamp of the last byte before the
//! region): a lost request's head ended at or after `tb` (T1), so a response starting before
//! `tb` cannot answer it (T2), which bounds `hi`; and under `k`, the responses `k, k+1, ..`
//! answer the requests after the marker, each no earlier than that request's head (T2), which
//! raises `lo`. When `lo == hi` the next `lo` responses are dropped as answers to lost requests.
//!
//! *Framing by guess.* A response's body framing depends on its request (HEAD, CONNECT). When
//! the request is not known for certain (after a gap), the response is framed as if it
//! answered a GET. If it then pairs with a known HEAD request, its body is dropped, the pair is
//! partial and the connection desynchronises (`framing_guess_wrong`). Because the request may
//! be unknowable (lost), a response framed by guess with a Content-Length is followed by a
//! response-side marker (`lo = 0`, `hi = body / 14`, `ta` = its last byte): if it answered a
//! HEAD, the responses swallowed as its body are accounted for like a gap. A response whose
//! request is simply not parsed yet waits for it (bounded by the stream's pending limit).
//!
//! *What this costs.* Lower bounds only come from T3 and visible heads, and clients may
//! pipeline, so a gap that loses whole messages without leaving a visible head usually leaves
//! `lo < hi` and desynchronises the connection for good: the price of never pairing wrongly.
//! A connection picked up midstream starts desynchronised for the same reason (requests sent
//! before capture began may still be waiting for their responses), and so does one whose
//! pipeline overflows `max_outstanding_requests`. Without the final positions
//! ([`ConnParser::close_at`]) a loss at the very end of a stream is invisible, so at close
//! fewer pairings after a gap can be proven.
//!
//! # Layout
//!
//! Following the path of the bytes: `framing` reads start lines, heads and framing headers;
//! `body` collects and decodes a body; `direction` is one direction's message parser (with
//! `direction::resync` for gaps); `pairing` matches requests with responses; this file holds
//! the connection ([`ConnParser`]) that drives both directions and pairing. `types` and
//! `anomaly` hold the shared vocabulary.

mod anomaly;
mod body;
mod direction;
mod framing;
mod h2;
mod leniency;
mod pairing;
pub mod reassembly;
#[cfg(test)]
mod tests;
mod types;

pub use anomaly::Anomaly;
pub use leniency::Oddity;
pub use types::{
    BodyBudget, ConnProtocol, Dir, ParserLimits, Role, DEFAULT_BODY_BUDGET_BYTES, MIN_MSG_LEN,
};

use crate::exchange::Exchange;
use crate::http::reassembly::StreamStats;

use direction::{DirState, Shared};
use pairing::{Pairing, PumpCtx};

/// A request as soon as the parser has read it, before its answer is paired: once when its
/// head is read (if a body follows, `body_read: false`, empty body) and once when it is whole.
/// For checks that must act before the server answers (the pipeline's request-time blocks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRead {
    pub request: crate::exchange::Request,
    pub body_read: bool,
}

/// Parses one connection: feed it pieces of both directions, take exchanges and anomalies.
pub struct ConnParser {
    dirs: [DirState; 2],
    sh: Shared,
    closed: bool,
    /// `close_at` gave the final positions of both directions.
    ends_known: bool,
    /// The connection speaks HTTP/2 (from the client's preface on).
    h2: Option<Box<h2::H2Conn>>,
}

impl ConnParser {
    /// `midstream: false`: the connection is seen from its first byte, and positions of both
    /// directions start at 0 (missing first bytes are a gap). `midstream: true`: it was picked
    /// up after it started; each direction starts at the first position seen and the first
    /// bytes may be the middle of a message. Pairing stays off for such a connection (see the
    /// module docs).
    pub fn new(role: Role, midstream: bool, limits: ParserLimits) -> Self {
        let pairing = Pairing::new(midstream);
        ConnParser {
            dirs: [
                DirState::new(Dir::Inbound, &limits, midstream),
                DirState::new(Dir::Outbound, &limits, midstream),
            ],
            sh: Shared {
                limits,
                role,
                protocol: ConnProtocol::Unknown,
                closing: false,
                next_seq: 0,
                pairing,
                anomalies: Vec::new(),
                requests_read: None,
                h2_start: None,
            },
            closed: false,
            ends_known: false,
            h2: None,
        }
    }

    pub fn data(&mut self, dir: Dir, pos: u64, ts_ns: u64, bytes: &[u8]) {
        if self.closed {
            self.sh.anomaly(Anomaly::DataAfterClose { dir });
            return;
        }
        self.dirs[dir.idx()].stream.push_data(pos, ts_ns, bytes);
        self.pump();
    }

    /// Bytes `[pos, pos + len)` of `dir` exist but were not captured.
    pub fn hole(&mut self, dir: Dir, pos: u64, len: u64, ts_ns: u64) {
        if self.closed {
            self.sh.anomaly(Anomaly::DataAfterClose { dir });
            return;
        }
        self.dirs[dir.idx()].stream.push_hole(pos, len, ts_ns);
        self.pump();
    }

    /// The connection closed: declare what never arrived, finish what can be finished (a
    /// response delimited by the close), and emit requests still waiting as `NoResponse`.
    ///
    /// Without the final positions, bytes lost at the very end of a direction cannot be seen,
    /// so fewer pairings can be proven after a gap than with [`ConnParser::close_at`].
    pub fn close(&mut self, ts_ns: u64) {
        self.close_inner(ts_ns, None);
    }

    /// Like [`ConnParser::close`], knowing the position after the last byte of each direction
    /// (the kernel's count at close): bytes missing before them are declared lost, and
    /// everything that happened on the connection is then known to have been seen.
    pub fn close_at(&mut self, ts_ns: u64, inbound_end: u64, outbound_end: u64) {
        self.close_inner(ts_ns, Some([inbound_end, outbound_end]));
    }

    fn close_inner(&mut self, ts_ns: u64, ends: Option<[u64; 2]>) {
        if self.closed {
            return;
        }
        self.closed = true;
        self.ends_known = ends.is_some();
        for (i, d) in self.dirs.iter_mut().enumerate() {
            match ends {
                Some(e) => d.stream.flush_until(e[i], ts_ns),
                None => d.stream.flush_all(),
            }
        }
        // What can be parsed without guessing first; then a request head cut by the close
        // becomes its request, so that an answer waiting for it is not guessed.
        self.run_dirs();
        if self.sh.protocol == ConnProtocol::Http2 {
            self.pump_h2();
            if let Some(h2) = self.h2.as_mut() {
                h2.close(&mut self.sh);
            }
            return;
        }
        for d in &mut self.dirs {
            d.finish_cut_request(&mut self.sh);
        }
        self.sh.closing = true;
        // Parse everything first, without pairing: a direction still resynchronising at the
        // end adds its loss marker in `finish_at_close`, and pairing must see it.
        self.run_dirs();
        for d in &mut self.dirs {
            d.finish_at_close(&mut self.sh);
        }
        self.pump_pairing();
        self.sh.pairing.finish(&mut self.sh.anomalies);
    }

    /// Both directions' parsers until neither makes progress (no pairing).
    fn run_dirs(&mut self) {
        loop {
            let mut progress = false;
            for d in &mut self.dirs {
                progress |= d.run(&mut self.sh);
            }
            if !progress {
                break;
            }
        }
    }

    pub fn take_exchanges(&mut self) -> Vec<Exchange> {
        std::mem::take(&mut self.sh.pairing.out)
    }

    /// Keeps every request as soon as it is read, for [`ConnParser::take_requests_read`].
    pub fn keep_requests_read(&mut self) {
        self.sh.requests_read.get_or_insert_with(Vec::new);
    }

    /// The requests read since the last call (empty unless [`ConnParser::keep_requests_read`]).
    pub fn take_requests_read(&mut self) -> Vec<RequestRead> {
        self.sh
            .requests_read
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    pub fn take_anomalies(&mut self) -> Vec<Anomaly> {
        std::mem::take(&mut self.sh.anomalies)
    }

    pub fn state(&self) -> ConnProtocol {
        self.sh.protocol
    }

    /// The role, once decided from the content when it was created `Unknown`.
    pub fn role(&self) -> Role {
        self.sh.role
    }

    /// Reassembly counters of one direction.
    pub fn stream_stats(&self, dir: Dir) -> StreamStats {
        self.dirs[dir.idx()].stream.stats()
    }

    fn request_dir(&self) -> Option<Dir> {
        match self.sh.role {
            Role::Server => Some(Dir::Inbound),
            Role::Client => Some(Dir::Outbound),
            Role::Unknown => None,
        }
    }

    fn pump(&mut self) {
        if self.h2.is_some() {
            return self.pump_h2();
        }
        loop {
            let mut progress = false;
            // Requests first, so that a response finds its request when both are ready.
            let order = match self.request_dir() {
                Some(Dir::Outbound) => [1, 0],
                _ => [0, 1],
            };
            for i in order {
                progress |= self.dirs[i].run(&mut self.sh);
            }
            progress |= self.pump_pairing();
            if !progress {
                break;
            }
        }
        if self.sh.protocol == ConnProtocol::Http2 {
            self.pump_h2();
        }
    }

    /// HTTP/2: every ready piece of both directions, the client's first.
    fn pump_h2(&mut self) {
        let Some((client, start)) = self.sh.h2_start else {
            return;
        };
        let h2 = self.h2.get_or_insert_with(|| {
            let mut c = Box::new(h2::H2Conn::new(client, &self.sh));
            c.set_start(client, start);
            c
        });
        for d in [client, client.other()] {
            while let Some(piece) = self.dirs[d.idx()].take_piece() {
                h2.piece(&mut self.sh, d, piece);
            }
        }
    }

    /// HTTP/2 frames parsed in each direction (inbound, outbound); `None` for HTTP/1.
    pub fn h2_frames(&self) -> Option<[u64; 2]> {
        self.h2.as_ref().map(|h| h.frames)
    }

    fn pump_pairing(&mut self) -> bool {
        let closing = self.sh.closing;
        let (req_wm, req_resyncing) = match self.request_dir() {
            Some(d) => {
                let ds = &self.dirs[d.idx()];
                (ds.wm_ns, ds.resyncing())
            }
            None => (0, false),
        };
        let cx = PumpCtx {
            req_wm,
            req_resyncing: req_resyncing && !closing,
            closing,
            all_seen: closing && self.ends_known,
            max_outstanding: self.sh.limits.max_outstanding_requests,
        };
        let progress = self.sh.pairing.pump(&cx, &mut self.sh.anomalies);
        if self.sh.pairing.upgraded && self.sh.protocol != ConnProtocol::Upgraded {
            self.sh.protocol = ConnProtocol::Upgraded;
        }
        progress
    }
}
