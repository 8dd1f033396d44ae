//! HTTP/2 (RFC 9113) on one connection, from the client's preface on: frames, HPACK (RFC 7541,
//! with `loona-hpack`, a maintained fork of the `hpack` crate), streams, and each stream turned
//! into one [`Exchange`] with the same fields an HTTP/1 exchange has.
//!
//! The path of the bytes: [`frame`] cuts each direction into frames (a DATA payload is passed
//! on as it arrives, never buffered whole); header blocks (HEADERS or PUSH_PROMISE with their
//! CONTINUATIONs) are decoded by that direction's HPACK decoder, whose dynamic table follows
//! the peer's encoder exactly as the receiving server's does; [`stream`] keeps each stream's
//! request and response until both ended (or it was reset, refused by GOAWAY, or the
//! connection closed), then emits it.
//!
//! What the server does with the fields, the exchange keeps: cookie crumbs (one `cookie` field
//! each, as browsers send them) are joined with `"; "` into one `cookie` header, as nginx and
//! Apache do before anything reads them, and `:authority` becomes `host` when there is none.
//!
//! Nothing is guessed. A hole anywhere but inside a DATA payload loses the frame boundaries,
//! and a header block that cannot be decoded loses the dynamic table (the server closes the
//! connection with COMPRESSION_ERROR then too): the connection is then *desynchronised*, the
//! streams in flight are emitted as partial, and nothing after is parsed (counted as
//! `h2_desync`).

mod frame;
mod stream;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use super::anomaly::Anomaly;
use super::direction::Shared;
use super::reassembly::Piece;
use super::types::Dir;
use frame::{Frame, FrameReader, Step};
use stream::H2Stream;

/// The client's connection preface after its first line (`PRI * HTTP/2.0\r\n`), which the
/// HTTP/1 start check has already read.
pub(super) const PREFACE_REST: &[u8] = b"\r\nSM\r\n\r\n";

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PUSH_PROMISE: u8 = 5;
const GOAWAY: u8 = 7;
const CONTINUATION: u8 = 9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

const SETTINGS_HEADER_TABLE_SIZE: u16 = 1;
/// RFC 7541's initial dynamic table size.
const DEFAULT_TABLE_SIZE: usize = 4096;
/// Streams kept open at once; more are a flood (nginx's `http2_max_concurrent_streams` is 128).
const MAX_OPEN_STREAMS: usize = 1024;

/// A header block being assembled from HEADERS (or PUSH_PROMISE) and its CONTINUATIONs.
struct Block {
    sid: u32,
    end_stream: bool,
    /// PUSH_PROMISE: the stream it promises.
    promised: Option<u32>,
    buf: Vec<u8>,
    ts: u64,
}

/// One direction: its frames and its peer's HPACK encoder state.
struct Side {
    /// Bytes of [`PREFACE_REST`] still expected (client side only).
    preface_left: usize,
    reader: FrameReader,
    hpack: loona_hpack::Decoder<'static>,
    /// The largest dynamic table this side's encoder may use: its peer's
    /// SETTINGS_HEADER_TABLE_SIZE (the largest seen, so that a change in flight is no error).
    max_table: usize,
    block: Option<Block>,
    /// Position of the next byte.
    pos: u64,
}

impl Side {
    fn new(client: bool, max_frame: usize) -> Side {
        let mut hpack = loona_hpack::Decoder::new();
        hpack.set_max_allowed_table_size(DEFAULT_TABLE_SIZE);
        Side {
            preface_left: if client { PREFACE_REST.len() } else { 0 },
            reader: FrameReader::new(max_frame),
            hpack,
            max_table: DEFAULT_TABLE_SIZE,
            block: None,
            pos: 0,
        }
    }
}

/// The HTTP/2 state of one connection.
pub(super) struct H2Conn {
    /// The direction the client writes (requests).
    client: Dir,
    sides: [Side; 2],
    streams: BTreeMap<u32, H2Stream>,
    /// Set once the frame boundaries or the HPACK state are lost.
    dead: bool,
    /// Frames parsed, per direction.
    pub(super) frames: [u64; 2],
}

impl H2Conn {
    pub(super) fn new(client: Dir, sh: &Shared) -> H2Conn {
        let max_frame = sh.limits.max_header_bytes;
        H2Conn {
            client,
            sides: [
                Side::new(client == Dir::Inbound, max_frame),
                Side::new(client == Dir::Outbound, max_frame),
            ],
            streams: BTreeMap::new(),
            dead: false,
            frames: [0, 0],
        }
    }

    /// The client side starts right after the preface line, at `pos`.
    pub(super) fn set_start(&mut self, dir: Dir, pos: u64) {
        self.sides[dir.idx()].pos = pos;
    }

    pub(super) fn piece(&mut self, sh: &mut Shared, dir: Dir, piece: Piece) {
        if self.dead {
            return;
        }
        match piece {
            Piece::Data { pos, ts_ns, bytes } => {
                let side = &mut self.sides[dir.idx()];
                if pos != side.pos {
                    // Pieces come in order from reassembly; a jump is a hole not announced.
                    let p = side.pos;
                    return self.desync(sh, dir, p, "h2_gap");
                }
                self.data(sh, dir, ts_ns, &bytes);
            }
            Piece::Hole {
                pos, len, ts_ns, ..
            } => {
                let side = &mut self.sides[dir.idx()];
                if pos != side.pos {
                    let p = side.pos;
                    return self.desync(sh, dir, p, "h2_gap");
                }
                match side.reader.skip_in_data(len) {
                    Some((sid, data_len, ended)) => {
                        side.pos += len;
                        let from_client = dir == self.client;
                        if let Some(st) = self.streams.get_mut(&sid) {
                            st.half(from_client).hole(data_len, ts_ns);
                        }
                        sh.anomaly(Anomaly::GapInBody { dir, pos, len });
                        if ended == Some(true) {
                            self.end_half(sh, sid, from_client, ts_ns);
                        }
                    }
                    None => self.desync(sh, dir, pos, "h2_gap"),
                }
            }
        }
    }

    fn data(&mut self, sh: &mut Shared, dir: Dir, ts: u64, mut bytes: &[u8]) {
        let i = dir.idx();
        let left = self.sides[i].preface_left;
        if left > 0 {
            let want = &PREFACE_REST[PREFACE_REST.len() - left..];
            let n = left.min(bytes.len());
            if bytes[..n] != want[..n] {
                let p = self.sides[i].pos;
                return self.desync(sh, dir, p, "h2_bad_preface");
            }
            self.sides[i].preface_left -= n;
            self.sides[i].pos += n as u64;
            bytes = &bytes[n..];
        }
        while !bytes.is_empty() && !self.dead {
            let (n, step) = self.sides[i].reader.feed(bytes, ts);
            self.sides[i].pos += n as u64;
            bytes = &bytes[n..];
            match step {
                Step::More => {}
                Step::Data {
                    sid,
                    data,
                    end_stream,
                } => self.on_data(sh, dir, sid, &data, end_stream, ts),
                Step::Frame(f) => {
                    self.frames[i] += 1;
                    self.on_frame(sh, dir, f);
                }
                Step::Error(why) => {
                    let p = self.sides[i].pos;
                    self.desync(sh, dir, p, why);
                }
            }
        }
    }

    fn on_data(&mut self, sh: &mut Shared, dir: Dir, sid: u32, data: &[u8], end: bool, ts: u64) {
        let from_client = dir == self.client;
        if sid == 0 {
            let p = self.sides[dir.idx()].pos;
            return self.desync(sh, dir, p, "h2_protocol_error");
        }
        let Some(st) = self.streams.get_mut(&sid) else {
            if !data.is_empty() || end {
                sh.anomaly(Anomaly::Http2 {
                    dir,
                    reason: "h2_data_on_unknown_stream",
                });
            }
            return;
        };
        st.half(from_client).data(data, ts);
        if end {
            self.end_half(sh, sid, from_client, ts);
        }
    }

    fn on_frame(&mut self, sh: &mut Shared, dir: Dir, f: Frame) {
        let i = dir.idx();
        let from_client = dir == self.client;
        if self.sides[i].block.is_some() && f.typ != CONTINUATION {
            // RFC 9113 6.10: nothing may come between a header block's frames.
            let p = self.sides[i].pos;
            return self.desync(sh, dir, p, "h2_continuation_expected");
        }
        match f.typ {
            HEADERS | PUSH_PROMISE => {
                let Some(fragment) = f.fragment() else {
                    let p = self.sides[i].pos;
                    return self.desync(sh, dir, p, "h2_protocol_error");
                };
                let promised = if f.typ == PUSH_PROMISE {
                    if fragment.len() < 4 || from_client {
                        let p = self.sides[i].pos;
                        return self.desync(sh, dir, p, "h2_protocol_error");
                    }
                    Some(u32::from_be_bytes(fragment[..4].try_into().unwrap()) & 0x7fff_ffff)
                } else {
                    None
                };
                let fragment = if promised.is_some() {
                    &fragment[4..]
                } else {
                    fragment
                };
                if f.sid == 0 {
                    let p = self.sides[i].pos;
                    return self.desync(sh, dir, p, "h2_protocol_error");
                }
                let block = Block {
                    sid: f.sid,
                    end_stream: f.typ == HEADERS && f.flags & END_STREAM != 0,
                    promised,
                    buf: fragment.to_vec(),
                    ts: f.ts,
                };
                if f.flags & END_HEADERS != 0 {
                    self.header_block(sh, dir, block);
                } else {
                    self.sides[i].block = Some(block);
                }
            }
            CONTINUATION => {
                let Some(mut block) = self.sides[i].block.take() else {
                    let p = self.sides[i].pos;
                    return self.desync(sh, dir, p, "h2_protocol_error");
                };
                if block.sid != f.sid {
                    let p = self.sides[i].pos;
                    return self.desync(sh, dir, p, "h2_protocol_error");
                }
                if block.buf.len() + f.payload.len() > sh.limits.max_header_bytes {
                    let p = self.sides[i].pos;
                    return self.desync(sh, dir, p, "h2_header_block_too_large");
                }
                block.buf.extend_from_slice(&f.payload);
                if f.flags & END_HEADERS != 0 {
                    self.header_block(sh, dir, block);
                } else {
                    self.sides[i].block = Some(block);
                }
            }
            RST_STREAM => {
                if let Some(st) = self.streams.get_mut(&f.sid) {
                    let code = f
                        .payload
                        .get(..4)
                        .map_or(0, |b| u32::from_be_bytes(b.try_into().unwrap()));
                    st.reset = Some((dir, code));
                    self.emit(sh, f.sid);
                }
            }
            SETTINGS if f.flags & ACK == 0 => {
                for s in f.payload.chunks_exact(6) {
                    let id = u16::from_be_bytes([s[0], s[1]]);
                    let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]) as usize;
                    if id == SETTINGS_HEADER_TABLE_SIZE {
                        // This side's decoder limits the *other* side's encoder.
                        let other = &mut self.sides[1 - i];
                        if v > other.max_table {
                            other.max_table = v;
                            other.hpack.set_max_allowed_table_size(v);
                        }
                    }
                }
            }
            GOAWAY if !from_client => {
                // Streams above the last one the server processed were never acted on.
                let last = f.payload.get(..4).map_or(u32::MAX, |b| {
                    u32::from_be_bytes(b.try_into().unwrap()) & 0x7fff_ffff
                });
                let refused: Vec<u32> = self
                    .streams
                    .iter()
                    .filter(|(&sid, st)| sid > last && sid % 2 == 1 && st.resp_head().is_none())
                    .map(|(&sid, _)| sid)
                    .collect();
                for sid in refused {
                    if let Some(st) = self.streams.get_mut(&sid) {
                        st.note(sh, dir, "h2_refused_by_goaway");
                    }
                    self.emit(sh, sid);
                }
            }
            _ => {}
        }
    }

    fn header_block(&mut self, sh: &mut Shared, dir: Dir, block: Block) {
        let i = dir.idx();
        let from_client = dir == self.client;
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let decoded = self.sides[i].hpack.decode_with_cb(&block.buf, |n, v| {
            fields.push((n.into_owned(), v.into_owned()))
        });
        if decoded.is_err() {
            let p = self.sides[i].pos;
            return self.desync(sh, dir, p, "h2_hpack_error");
        }
        let (sid, from_req) = match block.promised {
            // A pushed stream: the promise is its request, already ended.
            Some(p) => (p, true),
            None => (block.sid, from_client),
        };
        if block.promised.is_some() {
            sh.anomaly(Anomaly::Http2 {
                dir,
                reason: "h2_push_promise",
            });
        }
        if !self.streams.contains_key(&sid) {
            if self.streams.len() >= MAX_OPEN_STREAMS {
                let p = self.sides[i].pos;
                return self.desync(sh, dir, p, "h2_too_many_streams");
            }
            if !from_req {
                // An answer before its request was read (the two directions are read
                // independently): kept until the request comes.
                sh.anomaly(Anomaly::Http2 {
                    dir,
                    reason: "h2_response_before_request",
                });
            }
            self.streams.insert(sid, H2Stream::new(sid));
        }
        let st = self.streams.get_mut(&sid).expect("inserted above");
        let head = st
            .half(from_req)
            .headers(sh, dir, fields, block.ts, from_req);
        if from_req && head {
            // The request head is read: checks that act before the answer see it now.
            let whole = block.end_stream || block.promised.is_some();
            hand_request(sh, st, self.client, whole);
        }
        if block.end_stream || block.promised.is_some() {
            self.end_half(sh, sid, from_req, block.ts);
        }
    }

    fn end_half(&mut self, sh: &mut Shared, sid: u32, from_client: bool, ts: u64) {
        let Some(st) = self.streams.get_mut(&sid) else {
            return;
        };
        let had_body = st.half(from_client).body_started();
        st.half(from_client).end(ts);
        if from_client && had_body {
            hand_request(sh, st, self.client, true);
        }
        if st.done() {
            self.emit(sh, sid);
        }
    }

    fn emit(&mut self, sh: &mut Shared, sid: u32) {
        if let Some(st) = self.streams.remove(&sid) {
            if let Some(ex) = st.into_exchange(sh, self.client) {
                sh.pairing.out.push(ex);
            }
        }
    }

    /// The frame boundaries or the HPACK state are lost: streams in flight are emitted as
    /// they are, and nothing more is parsed.
    fn desync(&mut self, sh: &mut Shared, dir: Dir, pos: u64, reason: &'static str) {
        sh.anomaly(Anomaly::Http2 { dir, reason });
        if reason != "h2_desync" {
            sh.anomaly(Anomaly::Http2 {
                dir,
                reason: "h2_desync",
            });
        }
        log::debug!("http2: {reason} at {dir:?} {pos}: nothing more parsed on this connection");
        self.dead = true;
        let sids: Vec<u32> = self.streams.keys().copied().collect();
        for sid in sids {
            if let Some(st) = self.streams.get_mut(&sid) {
                st.cut = true;
            }
            self.emit(sh, sid);
        }
    }

    /// The connection closed: every stream still open is emitted as far as it came.
    pub(super) fn close(&mut self, sh: &mut Shared) {
        let cut_block = self
            .sides
            .iter()
            .any(|s| s.block.is_some() || s.reader.mid_frame());
        if cut_block && !self.dead {
            let d = if self.sides[0].reader.mid_frame() || self.sides[0].block.is_some() {
                Dir::Inbound
            } else {
                Dir::Outbound
            };
            sh.anomaly(Anomaly::TruncatedAtClose { dir: d });
        }
        let sids: Vec<u32> = self.streams.keys().copied().collect();
        for sid in sids {
            if let Some(st) = self.streams.get_mut(&sid) {
                st.closed = true;
            }
            self.emit(sh, sid);
        }
    }
}

/// Hands the request of `st` as read so far to the checks that act before the answer (when the
/// connection keeps them, `ConnParser::keep_requests_read`).
fn hand_request(sh: &mut Shared, st: &mut H2Stream, client: Dir, body_read: bool) {
    if sh.requests_read.is_none() {
        return;
    }
    if let Some(request) = st.request_so_far(sh, client) {
        if let Some(q) = sh.requests_read.as_mut() {
            q.push(super::RequestRead { request, body_read });
        }
    }
}
