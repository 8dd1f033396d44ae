//! Pairing requests with responses across both directions, and the loss markers that let it
//! go on after a gap only when the number of lost messages is certain (the soundness argument
//! in the `http` module docs).

use std::collections::VecDeque;

use crate::exchange::{Body, Completeness, Exchange, Request, Response};

use super::anomaly::Anomaly;
use super::types::{Class, Kind};

/// A loss marker: between the neighbouring messages of one direction, `lo..=hi` whole messages
/// were lost. `tb`: timestamp of the last byte seen before the lost region; `ta`: timestamp of
/// the first byte of the message that follows it (`u64::MAX` if none did).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Loss {
    pub(super) lo: u64,
    pub(super) hi: u64,
    pub(super) tb: u64,
    pub(super) ta: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoResponse {
    /// Its response certainly fell in a gap.
    Lost,
}

struct PendingReq {
    seq: u64,
    head_ns: u64,
    class: Class,
    /// Filled when the request is complete.
    req: Option<Request>,
    partial: bool,
    no_response: Option<NoResponse>,
}

pub(super) struct PendingResp {
    pub(super) resp: Response,
    pub(super) partial: bool,
    pub(super) guessed: bool,
    /// The framing gave it a body (Content-Length > 0, chunked, or close-delimited).
    pub(super) body_framed: bool,
    /// 101, or framed as the 2xx answer to a CONNECT.
    pub(super) upgrade: bool,
}

enum ReqItem {
    Msg(Box<PendingReq>),
    Lost(Loss),
}

enum RespItem {
    Msg(Box<PendingResp>),
    Lost(Loss),
}

pub(super) enum ClassAnswer {
    Known(Class),
    Guess,
    Wait,
}

pub(super) enum Verdict {
    Pending,
    Proceed,
    Upgraded,
}

enum Resolve {
    Wait,
    Done,
    Desync,
}

pub(super) struct PumpCtx {
    /// Timestamp of the latest byte the request direction consumed.
    pub(super) req_wm: u64,
    /// The request direction is between a gap and the next message: a loss marker may follow.
    pub(super) req_resyncing: bool,
    pub(super) closing: bool,
    /// Closing, and both streams are known to be complete up to their end positions.
    pub(super) all_seen: bool,
    pub(super) max_outstanding: usize,
}

#[derive(Default)]
pub(super) struct Pairing {
    reqs: VecDeque<ReqItem>,
    resps: VecDeque<RespItem>,
    /// Responses still to come that answer lost requests.
    skip_resps: u64,
    pub(super) desync: bool,
    pub(super) upgraded: bool,
    pub(super) out: Vec<Exchange>,
}

fn req_msgs(reqs: &VecDeque<ReqItem>) -> impl Iterator<Item = &PendingReq> {
    reqs.iter().filter_map(|i| match i {
        ReqItem::Msg(q) => Some(&**q),
        ReqItem::Lost(_) => None,
    })
}

impl Pairing {
    /// `desync`: pairing starts off (a connection picked up midstream, see the module docs).
    pub(super) fn new(desync: bool) -> Self {
        Pairing {
            desync,
            ..Pairing::default()
        }
    }

    pub(super) fn push_request_head(&mut self, seq: u64, head_ns: u64, class: Class) {
        self.reqs.push_back(ReqItem::Msg(Box::new(PendingReq {
            seq,
            head_ns,
            class,
            req: None,
            partial: false,
            no_response: None,
        })));
    }

    pub(super) fn complete_request(&mut self, seq: u64, req: Request, partial: bool) {
        for item in self.reqs.iter_mut().rev() {
            if let ReqItem::Msg(q) = item {
                if q.seq == seq {
                    q.req = Some(req);
                    q.partial |= partial;
                    return;
                }
            }
        }
        log::warn!("http: completed request {seq} not found in the pairing queue");
    }

    pub(super) fn push_response(&mut self, r: PendingResp) {
        self.resps.push_back(RespItem::Msg(Box::new(r)));
    }

    pub(super) fn push_loss(&mut self, kind: Kind, loss: Loss) {
        log::trace!("http: loss marker {kind:?} {loss:?}");
        match kind {
            Kind::Request => self.reqs.push_back(ReqItem::Lost(loss)),
            Kind::Response => self.resps.push_back(RespItem::Lost(loss)),
            Kind::Unknown => {}
        }
    }

    /// The method class of the request the next response (the one being parsed) answers.
    pub(super) fn class_for_next_response(&self) -> ClassAnswer {
        if self.desync || self.upgraded || self.skip_resps > 0 {
            return ClassAnswer::Guess;
        }
        let mut before = 0usize;
        for r in &self.resps {
            match r {
                RespItem::Msg(_) => before += 1,
                RespItem::Lost(_) => return ClassAnswer::Guess,
            }
        }
        let mut idx = 0usize;
        for item in &self.reqs {
            match item {
                ReqItem::Lost(_) => return ClassAnswer::Guess,
                ReqItem::Msg(q) if q.no_response.is_some() => {}
                ReqItem::Msg(q) => {
                    if idx == before {
                        return ClassAnswer::Known(q.class);
                    }
                    idx += 1;
                }
            }
        }
        ClassAnswer::Wait
    }

    /// Whether the request side may go on after request `seq` asked to switch protocols.
    pub(super) fn upgrade_verdict(&self, seq: u64) -> Verdict {
        if self.upgraded {
            return Verdict::Upgraded;
        }
        if self.desync || self.skip_resps > 0 {
            return Verdict::Proceed;
        }
        let waiting = req_msgs(&self.reqs).any(|q| q.seq == seq && q.no_response.is_none());
        if !waiting {
            return Verdict::Proceed;
        }
        let lossy = self.reqs.iter().any(|i| matches!(i, ReqItem::Lost(_)))
            || self.resps.iter().any(|i| matches!(i, RespItem::Lost(_)));
        if lossy {
            Verdict::Proceed
        } else {
            Verdict::Pending
        }
    }

    fn emit(&mut self, request: Request, response: Option<Response>, c: Completeness, up: bool) {
        self.out.push(Exchange {
            request,
            response,
            completeness: c,
            upgraded: up,
            stream_id: None,
        });
    }

    pub(super) fn pump(&mut self, cx: &PumpCtx, an: &mut Vec<Anomaly>) -> bool {
        let mut progress = false;
        loop {
            if self.upgraded {
                progress |= self.drain_after_upgrade(an);
                return progress;
            }
            progress |= self.enforce_bounds(cx, an);
            if self.desync {
                progress |= self.drain_desync(an);
                return progress;
            }
            // A request whose response is known to be lost: emit it once it is complete.
            if let Some(ReqItem::Msg(q)) = self.reqs.front() {
                if q.no_response.is_some() {
                    if q.req.is_none() {
                        return progress;
                    }
                    if let Some(ReqItem::Msg(q)) = self.reqs.pop_front() {
                        an.push(Anomaly::ResponseLost);
                        if let Some(req) = q.req {
                            self.emit(req, None, Completeness::Partial, false);
                        }
                    }
                    progress = true;
                    continue;
                }
            }
            // Responses that answer lost requests.
            if self.skip_resps > 0 {
                match self.resps.front() {
                    Some(RespItem::Msg(r)) => {
                        an.push(Anomaly::UnpairedResponse {
                            status: r.resp.status,
                        });
                        self.resps.pop_front();
                        self.skip_resps -= 1;
                        progress = true;
                        continue;
                    }
                    Some(RespItem::Lost(_)) => {
                        self.desync = true;
                        progress = true;
                        continue;
                    }
                    None => return progress,
                }
            }
            let step = match (self.reqs.front(), self.resps.front()) {
                (Some(ReqItem::Lost(m)), _) => {
                    let m = *m;
                    self.resolve_req_loss(m, cx)
                }
                (_, Some(RespItem::Lost(m))) => {
                    let m = *m;
                    self.resolve_resp_loss(m, cx)
                }
                (Some(ReqItem::Msg(q)), Some(RespItem::Msg(_))) => {
                    if q.req.is_none() {
                        return progress;
                    }
                    self.pair(an);
                    Resolve::Done
                }
                (None, Some(RespItem::Msg(r))) => {
                    if !cx.closing {
                        return progress;
                    }
                    an.push(Anomaly::ResponseWithoutRequest {
                        status: r.resp.status,
                    });
                    self.resps.pop_front();
                    Resolve::Done
                }
                (Some(ReqItem::Msg(_)), None) | (None, None) => return progress,
            };
            match step {
                Resolve::Wait => return progress,
                Resolve::Done => progress = true,
                Resolve::Desync => {
                    self.desync = true;
                    progress = true;
                }
            }
        }
    }

    fn pair(&mut self, an: &mut Vec<Anomaly>) {
        let (Some(ReqItem::Msg(q)), Some(RespItem::Msg(r))) =
            (self.reqs.pop_front(), self.resps.pop_front())
        else {
            return;
        };
        let Some(req) = q.req else { return };
        let mut partial = q.partial || r.partial;
        let mut resp = r.resp;
        if r.guessed && q.class == Class::Head && r.body_framed {
            // Framed with a body although it answers a HEAD: the "body" belonged to what
            // followed, and everything after it is suspect.
            an.push(Anomaly::FramingGuessWrong);
            resp.body = Body::default();
            partial = true;
            self.desync = true;
        }
        let status = resp.status;
        let upgraded = r.upgrade || (q.class == Class::Connect && (200..300).contains(&status));
        if upgraded {
            self.upgraded = true;
        }
        let c = if partial {
            Completeness::Partial
        } else {
            Completeness::Complete
        };
        self.emit(req, Some(resp), c, upgraded);
    }

    fn drain_after_upgrade(&mut self, an: &mut Vec<Anomaly>) -> bool {
        let mut progress = false;
        while let Some(item) = self.reqs.front() {
            if let ReqItem::Msg(q) = item {
                if q.req.is_none() {
                    break;
                }
            }
            if let Some(ReqItem::Msg(q)) = self.reqs.pop_front() {
                if let Some(req) = q.req {
                    self.emit(req, None, Completeness::NoResponse, false);
                }
            }
            progress = true;
        }
        while let Some(item) = self.resps.pop_front() {
            if let RespItem::Msg(r) = item {
                an.push(Anomaly::UnpairedResponse {
                    status: r.resp.status,
                });
            }
            progress = true;
        }
        progress
    }

    fn drain_desync(&mut self, an: &mut Vec<Anomaly>) -> bool {
        let mut progress = false;
        while let Some(item) = self.reqs.front() {
            if let ReqItem::Msg(q) = item {
                if q.req.is_none() {
                    break;
                }
            }
            if let Some(ReqItem::Msg(q)) = self.reqs.pop_front() {
                an.push(match q.no_response {
                    Some(NoResponse::Lost) => Anomaly::ResponseLost,
                    None => Anomaly::PairingUncertain,
                });
                if let Some(req) = q.req {
                    self.emit(req, None, Completeness::Partial, false);
                }
            }
            progress = true;
        }
        while let Some(item) = self.resps.pop_front() {
            if let RespItem::Msg(r) = item {
                an.push(Anomaly::UnpairedResponse {
                    status: r.resp.status,
                });
            }
            progress = true;
        }
        self.skip_resps = 0;
        progress
    }

    /// Too many requests waiting (or responses without requests): give up pairing.
    fn enforce_bounds(&mut self, cx: &PumpCtx, an: &mut Vec<Anomaly>) -> bool {
        // Loss markers count too: garbage that yields one marker per line stays bounded.
        let reqs = self.reqs.len();
        let resps = self.resps.len();
        if !self.desync && (reqs > cx.max_outstanding || resps > cx.max_outstanding) {
            an.push(Anomaly::PipelineOverflow);
            self.desync = true;
            return true;
        }
        false
    }

    /// Front of `resps` is a loss marker: how many of the pending requests lost their response?
    fn resolve_resp_loss(&mut self, m: Loss, cx: &PumpCtx) -> Resolve {
        if !cx.closing && (cx.req_wm <= m.ta || cx.req_resyncing) {
            // A request whose response may be among the lost could still be unparsed.
            return Resolve::Wait;
        }
        // Every request whose head may end at or before `ta` has been parsed (T1). At a close
        // without end positions this may not hold: requests may have been lost, unannounced,
        // at the end of the request stream.
        let req_complete = cx.all_seen || (cx.req_wm > m.ta && !cx.req_resyncing);
        // Candidates: the pending requests (without a known fate) in order, up to a loss
        // marker on the request side.
        let mut heads: Vec<u64> = Vec::new();
        let mut truncated = false;
        let mut doubtful = 0u64;
        let mut in_prefix = true;
        for item in &self.reqs {
            match item {
                ReqItem::Msg(q) if q.no_response.is_some() => {}
                ReqItem::Msg(q) => {
                    if in_prefix && q.head_ns <= m.ta {
                        doubtful += 1;
                    } else {
                        in_prefix = false;
                    }
                    heads.push(q.head_ns);
                }
                ReqItem::Lost(_) => {
                    if in_prefix {
                        // Lost requests could be among the candidates: unknowable.
                        return Resolve::Desync;
                    }
                    truncated = true;
                    break;
                }
            }
        }
        let lo = m.lo;
        let mut hi = if req_complete {
            m.hi.min(doubtful)
        } else {
            m.hi
        };
        if lo > hi {
            return Resolve::Desync;
        }
        let after: Vec<u64> = self
            .resps
            .iter()
            .skip(1)
            .map_while(|r| match r {
                RespItem::Msg(r) => Some(r.resp.first_ns),
                RespItem::Lost(_) => None,
            })
            .collect();
        let consistent = |k: u64| -> bool {
            for (i, &t) in after.iter().enumerate() {
                let qi = k as usize + i;
                match heads.get(qi) {
                    Some(&h) => {
                        if t < h {
                            return false;
                        }
                    }
                    None => {
                        if truncated {
                            return true;
                        }
                        // Every request is known once all was seen; otherwise a request yet
                        // to come (or lost) has its head at or after the watermark (T1).
                        return !(cx.all_seen || cx.req_wm > t);
                    }
                }
            }
            true
        };
        while hi > lo && !consistent(hi) {
            hi -= 1;
        }
        log::trace!("http: resolving {m:?}: {lo}..={hi} of {doubtful} candidates");
        if lo == hi {
            // The first `lo` candidates lost their response. Fewer may be parsed (a close
            // without end positions): the others were lost themselves.
            let mut left = lo;
            for item in self.reqs.iter_mut() {
                if left == 0 {
                    break;
                }
                if let ReqItem::Msg(q) = item {
                    if q.no_response.is_none() && q.head_ns <= m.ta {
                        q.no_response = Some(NoResponse::Lost);
                        left -= 1;
                    }
                }
            }
            self.resps.pop_front();
            return Resolve::Done;
        }
        // Still ambiguous. The first response after the marker settles non-pipelined traffic;
        // once its evidence is final (or another loss follows) and the ambiguity remains, give
        // up.
        let next_is_loss = matches!(self.resps.get(1), Some(RespItem::Lost(_)));
        if cx.closing || next_is_loss || after.first().is_some_and(|&t| cx.req_wm > t) {
            return Resolve::Desync;
        }
        Resolve::Wait
    }

    /// Front of `reqs` is a loss marker: how many of the coming responses answer lost requests?
    fn resolve_req_loss(&mut self, m: Loss, cx: &PumpCtx) -> Resolve {
        let heads: Vec<u64> = self
            .reqs
            .iter()
            .skip(1)
            .map_while(|i| match i {
                ReqItem::Msg(q) => Some(q.head_ns),
                ReqItem::Lost(_) => None,
            })
            .collect();
        let mut resp_truncated = false;
        let mut ts: Vec<u64> = Vec::new();
        for r in &self.resps {
            match r {
                RespItem::Msg(r) => ts.push(r.resp.first_ns),
                RespItem::Lost(_) => {
                    resp_truncated = true;
                    break;
                }
            }
        }
        let mut lo = m.lo;
        let mut hi = m.hi;
        // A response starting before the lost region cannot answer a lost request (T1, T2).
        if let Some(j) = ts.iter().position(|&t| t < m.tb) {
            hi = hi.min(j as u64);
        }
        // Under k, responses k, k+1, .. answer the requests after the marker (T2).
        let consistent = |k: u64| -> bool {
            for (i, &h) in heads.iter().enumerate() {
                match ts.get(k as usize + i) {
                    Some(&t) => {
                        if t < h {
                            return false;
                        }
                    }
                    None => return true,
                }
            }
            true
        };
        while lo <= hi && (lo as usize) < ts.len() && !consistent(lo) {
            lo += 1;
        }
        if lo > hi {
            return Resolve::Desync;
        }
        if lo == hi {
            self.reqs.pop_front();
            self.skip_resps += lo;
            return Resolve::Done;
        }
        if cx.closing || resp_truncated || ((lo as usize) < ts.len() && !heads.is_empty()) {
            return Resolve::Desync;
        }
        Resolve::Wait
    }

    /// At close, after the last pump: whatever is left.
    pub(super) fn finish(&mut self, an: &mut Vec<Anomaly>) {
        while let Some(item) = self.reqs.pop_front() {
            if let ReqItem::Msg(q) = item {
                let Some(req) = q.req else { continue };
                match q.no_response {
                    Some(NoResponse::Lost) => {
                        an.push(Anomaly::ResponseLost);
                        self.emit(req, None, Completeness::Partial, false);
                    }
                    None => self.emit(req, None, Completeness::NoResponse, false),
                }
            }
        }
        while let Some(item) = self.resps.pop_front() {
            if let RespItem::Msg(r) = item {
                an.push(Anomaly::ResponseWithoutRequest {
                    status: r.resp.status,
                });
            }
        }
    }
}
