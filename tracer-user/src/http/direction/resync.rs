//! Gaps in one direction: a hole inside a body of known extent is skipped; any other hole
//! loses the message boundaries, so the direction scans for the next message start and
//! accounts for what may have been lost (the loss marker pairing needs).

use super::{DirState, HeadBuf, InMsg, Phase, Shared};
use crate::http::anomaly::Anomaly;
use crate::http::framing::{
    classify_line, first_byte_ok, has_standard_method, prefix_ok, Chunk, Framing,
};
use crate::http::pairing::Loss;
use crate::http::types::{Kind, MIN_MSG_LEN};

/// Stray CRLF bytes tolerated between two messages (T3).
const MAX_JUNK: u64 = 2;
/// Longest candidate line looked at while resynchronising.
const MAX_RESYNC_LINE: usize = 16 * 1024;

/// What is known about a lost region while resynchronising.
#[derive(Debug, Clone, Copy)]
pub(super) struct LossAcc {
    /// Messages certainly lost that count for pairing (a cut or malformed request head, or a
    /// response head showing a final status).
    lost_lo: u64,
    /// Messages possibly lost that were seen in part (heads cut or malformed).
    lost_hi: u64,
    /// The region starts at a known message boundary.
    boundary: bool,
    /// Bytes of the region that may hold message starts (holes and skipped bytes).
    unknown: u64,
    /// Timestamp of the last byte before the region.
    tb: u64,
    /// Picked up midstream: pairing is off anyway, no marker.
    midstream: bool,
}

/// Whether a cut or malformed head certainly belongs to a message that consumes a request or a
/// response in pairing: any request; a response only when its status line shows a final status
/// (a lost 1xx would not count).
fn head_counts(kind: Kind, buf: &[u8]) -> bool {
    match kind {
        Kind::Request => true,
        Kind::Response => {
            buf.len() >= 12
                && buf.starts_with(b"HTTP/1.")
                && buf[8] == b' '
                && buf[9..12].iter().all(u8::is_ascii_digit)
                && buf[9] >= b'2'
        }
        Kind::Unknown => false,
    }
}

impl LossAcc {
    pub(super) fn region(boundary: bool, unknown: u64, tb: u64) -> Self {
        LossAcc {
            lost_lo: 0,
            lost_hi: 0,
            boundary,
            unknown,
            tb,
            midstream: false,
        }
    }

    /// A connection picked up midstream: pairing is off anyway, so no marker is made.
    pub(super) fn midstream() -> Self {
        LossAcc {
            midstream: true,
            ..LossAcc::region(false, 0, 0)
        }
    }

    pub(super) fn cut_head(kind: Kind, h: &HeadBuf, unknown: u64) -> Self {
        let seen = h.buf.iter().any(|&b| b != b'\r' && b != b'\n');
        LossAcc {
            lost_lo: u64::from(seen && head_counts(kind, &h.buf)),
            lost_hi: u64::from(seen),
            boundary: true,
            unknown,
            tb: h.first_ns,
            midstream: false,
        }
    }

    /// The marker for pairing once the region ended at a message starting at `ta`.
    ///
    /// On the request side a region that starts at a boundary and is long enough holds at
    /// least one request (T3). On the response side it may hold only interim (1xx) responses,
    /// so only a visible final status line gives a lower bound.
    pub(super) fn marker(&self, kind: Kind, ta: u64) -> Option<Loss> {
        if self.midstream {
            return None;
        }
        let hi = self.lost_hi + self.unknown / MIN_MSG_LEN;
        let lo = if self.lost_lo > 0 {
            self.lost_lo
        } else if kind == Kind::Request
            && self.lost_hi == 0
            && self.boundary
            && self.unknown >= MIN_MSG_LEN + MAX_JUNK
        {
            1
        } else {
            0
        };
        (hi > 0).then_some(Loss {
            lo: lo.min(hi),
            hi,
            tb: self.tb,
            ta,
        })
    }
}

pub(super) struct Resync {
    pub(super) line: Vec<u8>,
    pub(super) in_line: bool,
    pub(super) at_line_start: bool,
    pub(super) cand_pos: u64,
    pub(super) cand_ts: u64,
    /// The candidate follows a `\n` (or the start of a stream seen from its start). Otherwise
    /// (right after a gap, at a piece start) it may be the tail of a cut line.
    pub(super) cand_clean: bool,
    pub(super) loss: LossAcc,
}

impl DirState {
    pub(super) fn new_resync(&self, loss: LossAcc, at_line_start: bool) -> Phase {
        Phase::Resync(Box::new(Resync {
            line: Vec::new(),
            in_line: false,
            at_line_start,
            cand_pos: 0,
            cand_ts: 0,
            cand_clean: false,
            loss,
        }))
    }

    /// A message whose head was being read is lost (malformed, too large, or cut).
    pub(super) fn head_lost(&self, sh: &Shared, h: &HeadBuf, at_line_start: bool) -> Phase {
        self.new_resync(LossAcc::cut_head(sh.kind_of(self.dir), h, 0), at_line_start)
    }

    /// A message's framing broke (bad chunk framing, or a gap in it): finish it as partial and
    /// resynchronise; the region does not start at a known boundary.
    pub(super) fn framing_lost(
        &mut self,
        sh: &mut Shared,
        mut msg: Box<InMsg>,
        unknown: u64,
        at_line_start: bool,
    ) -> Phase {
        msg.partial = true;
        let tb = self.wm_ns;
        self.finish_msg(sh, msg, false);
        self.new_resync(LossAcc::region(false, unknown, tb), at_line_start)
    }

    pub(super) fn resync_data(
        &mut self,
        sh: &mut Shared,
        mut r: Box<Resync>,
        data: &[u8],
        ts: u64,
    ) -> (Phase, usize) {
        let kind = sh.kind_of(self.dir);
        if !r.in_line {
            if r.at_line_start {
                let skip = data
                    .iter()
                    .take_while(|&&b| b == b'\r' || b == b'\n')
                    .count();
                if skip > 0 {
                    r.loss.unknown += skip as u64;
                    return (Phase::Resync(r), skip);
                }
                if !first_byte_ok(kind, data[0]) {
                    r.at_line_start = false;
                    return (Phase::Resync(r), 0);
                }
                r.in_line = true;
                r.at_line_start = false;
                r.cand_pos = self.pos;
                r.cand_ts = ts;
                r.cand_clean = self.after_nl;
                r.line.clear();
                return (Phase::Resync(r), 0);
            }
            // Request lines are looked for at line starts; status lines anywhere (a response
            // usually follows the previous body with no line break).
            let stop = match kind {
                Kind::Request => data.iter().position(|&b| b == b'\n'),
                Kind::Response | Kind::Unknown => {
                    data.iter().position(|&b| b == b'\n' || b == b'H')
                }
            };
            return match stop {
                Some(i) if data[i] == b'H' => {
                    r.loss.unknown += i as u64;
                    r.in_line = true;
                    r.cand_pos = self.pos + i as u64;
                    r.cand_ts = ts;
                    r.cand_clean = if i == 0 {
                        self.after_nl
                    } else {
                        data[i - 1] == b'\n'
                    };
                    r.line.clear();
                    (Phase::Resync(r), i)
                }
                Some(i) => {
                    r.loss.unknown += i as u64 + 1;
                    r.at_line_start = true;
                    (Phase::Resync(r), i + 1)
                }
                None => {
                    r.loss.unknown += data.len() as u64;
                    (Phase::Resync(r), data.len())
                }
            };
        }
        if kind == Kind::Response && r.line.len() < 7 {
            // Check the "HTTP/1." prefix byte by byte, so that a mismatching byte is looked at
            // again as a possible start.
            const PREFIX: &[u8] = b"HTTP/1.";
            let n = (PREFIX.len() - r.line.len()).min(data.len());
            for (k, &b) in data[..n].iter().enumerate() {
                if b != PREFIX[r.line.len()] {
                    r.loss.unknown += r.line.len() as u64;
                    r.line.clear();
                    r.in_line = false;
                    return (Phase::Resync(r), k);
                }
                r.line.push(b);
            }
            return (Phase::Resync(r), n);
        }
        let room = MAX_RESYNC_LINE
            .min(sh.limits.max_header_bytes)
            .saturating_sub(r.line.len())
            .max(1);
        let avail = &data[..data.len().min(room)];
        let nl = avail.iter().position(|&b| b == b'\n');
        let take = nl.map_or(avail.len(), |i| i + 1);
        r.line.extend_from_slice(&avail[..take]);
        if !prefix_ok(kind, &r.line) {
            // Not a start line: skip to the next line.
            r.loss.unknown += r.line.len() as u64;
            r.in_line = false;
            r.at_line_start = nl.is_some();
            return (Phase::Resync(r), take);
        }
        if nl.is_none() {
            if r.line.len() >= MAX_RESYNC_LINE.min(sh.limits.max_header_bytes) {
                r.loss.unknown += r.line.len() as u64;
                r.line.clear();
                r.in_line = false;
            }
            return (Phase::Resync(r), take);
        }
        // A request line right after a gap may be the tail of a cut one ("EAD /x HTTP/1.1" for
        // "HEAD /x ..."): there, only the standard methods are believed.
        let found = classify_line(kind, &r.line)
            .filter(|&k| r.cand_clean || k != Kind::Request || has_standard_method(&r.line));
        match found {
            Some(k) => {
                sh.decide(self.dir, k);
                if let Some(m) = r.loss.marker(k, r.cand_ts) {
                    sh.pairing.push_loss(k, m);
                }
                let line = std::mem::take(&mut r.line);
                let scan = line.len() - 1;
                (
                    Phase::Head(HeadBuf {
                        buf: line,
                        start_pos: r.cand_pos,
                        first_ns: r.cand_ts,
                        line_done: true,
                        scan,
                    }),
                    take,
                )
            }
            None => {
                r.loss.unknown += r.line.len() as u64;
                r.in_line = false;
                r.at_line_start = true;
                (Phase::Resync(r), take)
            }
        }
    }

    pub(super) fn on_hole(&mut self, sh: &mut Shared, pos: u64, len: u64, ts: u64, known: bool) {
        let tb = self.wm_ns;
        self.pos = pos + len;
        self.wm_ns = self.wm_ns.max(ts);
        self.fresh = false;
        self.after_nl = false;
        let dir = self.dir;
        let resync_anomaly = |sh: &mut Shared| {
            sh.anomaly(Anomaly::GapResync {
                dir,
                pos,
                len,
                known,
            })
        };
        let in_body = |sh: &mut Shared, msg: &mut InMsg, n: u64| {
            msg.body.hole(n);
            msg.partial = true;
            msg.last_ns = msg.last_ns.max(ts);
            if !known {
                sh.anomaly(Anomaly::GapInBody { dir, pos, len: n });
            }
        };
        let at_boundary = |unknown: u64, tb: u64| LossAcc::region(true, unknown, tb);
        self.phase = match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Dead => Phase::Dead,
            Phase::Idle | Phase::Paused(_) => {
                resync_anomaly(sh);
                self.new_resync(at_boundary(len, tb), true)
            }
            Phase::Stalled(msg) => {
                // Not reached (no piece is taken while stalled); keep the head, lose the rest.
                resync_anomaly(sh);
                self.finish_response(sh, msg, false, true, false);
                self.new_resync(at_boundary(len, tb), true)
            }
            Phase::Head(h) => {
                resync_anomaly(sh);
                let loss = LossAcc::cut_head(sh.kind_of(dir), &h, len);
                self.new_resync(loss, true)
            }
            Phase::Body { mut msg, framing } => match framing {
                Framing::Close => {
                    in_body(sh, &mut msg, len);
                    Phase::Body { msg, framing }
                }
                Framing::Length(rem) if len < rem => {
                    in_body(sh, &mut msg, len);
                    Phase::Body {
                        msg,
                        framing: Framing::Length(rem - len),
                    }
                }
                Framing::Length(rem) => {
                    in_body(sh, &mut msg, rem);
                    let next = self.finish_msg(sh, msg, true);
                    if len == rem {
                        next
                    } else {
                        // The hole runs past the end of the message: what follows is lost.
                        resync_anomaly(sh);
                        self.new_resync(at_boundary(len - rem, tb), true)
                    }
                }
                Framing::Chunked(Chunk::Data(rem)) if len < rem => {
                    in_body(sh, &mut msg, len);
                    Phase::Body {
                        msg,
                        framing: Framing::Chunked(Chunk::Data(rem - len)),
                    }
                }
                Framing::Chunked(Chunk::Data(rem)) if len == rem => {
                    in_body(sh, &mut msg, len);
                    Phase::Body {
                        msg,
                        framing: Framing::Chunked(Chunk::DataEnd(false)),
                    }
                }
                Framing::Chunked(ch) => {
                    resync_anomaly(sh);
                    let in_data = match ch {
                        Chunk::Data(rem) => rem,
                        _ => 0,
                    };
                    msg.body.hole(in_data);
                    msg.partial = true;
                    self.wm_ns = tb;
                    let phase = self.framing_lost(sh, msg, len - in_data, true);
                    self.wm_ns = self.wm_ns.max(ts);
                    phase
                }
            },
            Phase::Resync(mut r) => {
                resync_anomaly(sh);
                r.line.clear();
                r.in_line = false;
                r.at_line_start = true;
                r.loss.unknown += len;
                Phase::Resync(r)
            }
        };
    }
}
