//! Cutting one direction into HTTP/2 frames. A frame's 9-byte header is collected across
//! pieces; DATA payloads are passed on as they arrive (padding removed), every other payload
//! is kept whole up to a bound (header blocks up to `max_header_bytes`, control frames their
//! first bytes, unknown extension frames nothing).

use super::{DATA, HEADERS, PADDED, PRIORITY, PUSH_PROMISE};

/// A whole frame other than DATA.
pub(super) struct Frame {
    pub typ: u8,
    pub flags: u8,
    pub sid: u32,
    /// The payload as kept (see the module docs).
    pub payload: Vec<u8>,
    /// Timestamp of the piece that carried the frame's first byte.
    pub ts: u64,
}

impl Frame {
    /// A HEADERS or PUSH_PROMISE payload without its padding and priority fields (for
    /// PUSH_PROMISE, starting with the promised stream id). `None` when the padding does not
    /// fit (a PROTOCOL_ERROR).
    pub fn fragment(&self) -> Option<&[u8]> {
        let mut p = &self.payload[..];
        let mut pad = 0usize;
        if self.flags & PADDED != 0 {
            pad = *p.first()? as usize;
            p = &p[1..];
        }
        if self.typ == HEADERS && self.flags & PRIORITY != 0 {
            p = p.get(5..)?;
        }
        let end = p.len().checked_sub(pad)?;
        Some(&p[..end])
    }
}

/// What one call to [`FrameReader::feed`] produced.
pub(super) enum Step {
    /// Nothing yet.
    More,
    /// Bytes of a DATA frame's payload (possibly none, at its end).
    Data {
        sid: u32,
        data: Vec<u8>,
        end_stream: bool,
    },
    Frame(Frame),
    Error(&'static str),
}

struct Cur {
    len: usize,
    typ: u8,
    flags: u8,
    sid: u32,
    /// Payload bytes consumed.
    got: usize,
    /// Payload bytes kept (non-DATA).
    keep: usize,
    buf: Vec<u8>,
    /// DATA with PADDED: the pad length, once read.
    pad: Option<usize>,
    ts: u64,
}

pub(super) struct FrameReader {
    head: [u8; 9],
    head_len: usize,
    cur: Option<Cur>,
    max_block: usize,
}

impl FrameReader {
    pub fn new(max_block: usize) -> FrameReader {
        FrameReader {
            head: [0; 9],
            head_len: 0,
            cur: None,
            max_block,
        }
    }

    /// In the middle of a frame (or of its header).
    pub fn mid_frame(&self) -> bool {
        self.head_len > 0 || self.cur.is_some()
    }

    /// Consumes from `bytes`; returns how many bytes were used and what they completed.
    pub fn feed(&mut self, bytes: &[u8], ts: u64) -> (usize, Step) {
        let Some(cur) = self.cur.as_mut() else {
            let n = (9 - self.head_len).min(bytes.len());
            self.head[self.head_len..self.head_len + n].copy_from_slice(&bytes[..n]);
            self.head_len += n;
            if self.head_len < 9 {
                return (n, Step::More);
            }
            self.head_len = 0;
            let h = self.head;
            let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
            let typ = h[3];
            let flags = h[4];
            let sid = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            let keep = match typ {
                DATA => 0,
                HEADERS | PUSH_PROMISE | super::CONTINUATION => {
                    if len > self.max_block {
                        return (n, Step::Error("h2_header_block_too_large"));
                    }
                    len
                }
                super::SETTINGS => len.min(6 * 64),
                // RST_STREAM, PRIORITY, PING, GOAWAY, WINDOW_UPDATE: their fixed fields.
                2 | 3 | 6 | 7 | 8 => len.min(8),
                // Extension frames are ignored (RFC 9113 5.5).
                _ => 0,
            };
            self.cur = Some(Cur {
                len,
                typ,
                flags,
                sid,
                got: 0,
                keep,
                buf: Vec::with_capacity(keep),
                pad: None,
                ts,
            });
            if len == 0 {
                return (n, self.finish());
            }
            return (n, Step::More);
        };
        let n = (cur.len - cur.got).min(bytes.len());
        let chunk = &bytes[..n];
        let step = if cur.typ == DATA {
            let mut data = chunk;
            let mut off = cur.got;
            if cur.flags & PADDED != 0 && cur.pad.is_none() && off == 0 && !data.is_empty() {
                let pad = data[0] as usize;
                if pad + 1 > cur.len {
                    return (n, Step::Error("h2_protocol_error"));
                }
                cur.pad = Some(pad);
                data = &data[1..];
                off = 1;
            }
            let end = cur.len - cur.pad.unwrap_or(0);
            let take = end.saturating_sub(off).min(data.len());
            cur.got += n;
            let out = data[..take].to_vec();
            if cur.got == cur.len {
                let sid = cur.sid;
                let end_stream = cur.flags & super::END_STREAM != 0;
                self.cur = None;
                Step::Data {
                    sid,
                    data: out,
                    end_stream,
                }
            } else if out.is_empty() {
                Step::More
            } else {
                Step::Data {
                    sid: cur.sid,
                    data: out,
                    end_stream: false,
                }
            }
        } else {
            let room = cur.keep.saturating_sub(cur.buf.len()).min(chunk.len());
            cur.buf.extend_from_slice(&chunk[..room]);
            cur.got += n;
            if cur.got == cur.len {
                self.finish()
            } else {
                Step::More
            }
        };
        (n, step)
    }

    fn finish(&mut self) -> Step {
        let cur = self.cur.take().expect("a frame in progress");
        if cur.typ == DATA {
            return Step::Data {
                sid: cur.sid,
                data: Vec::new(),
                end_stream: cur.flags & super::END_STREAM != 0,
            };
        }
        Step::Frame(Frame {
            typ: cur.typ,
            flags: cur.flags,
            sid: cur.sid,
            payload: cur.buf,
            ts: cur.ts,
        })
    }

    /// A hole of `len` bytes: skipped when it falls inside a DATA payload past its pad length
    /// byte (the framing is still known). Returns the stream, how many of the bytes were data
    /// (not padding), and, when the hole ran to the frame's end, its END_STREAM flag; `None`
    /// when the hole loses the framing.
    pub fn skip_in_data(&mut self, len: u64) -> Option<(u32, u64, Option<bool>)> {
        let cur = self.cur.as_mut()?;
        if cur.typ != DATA || self.head_len > 0 {
            return None;
        }
        if cur.flags & PADDED != 0 && cur.got == 0 {
            return None;
        }
        let left = (cur.len - cur.got) as u64;
        if len > left {
            return None;
        }
        let end = (cur.len - cur.pad.unwrap_or(0)) as u64;
        let from = cur.got as u64;
        let data = end.saturating_sub(from).min(len);
        cur.got += len as usize;
        let sid = cur.sid;
        let ended = (cur.got == cur.len).then_some(cur.flags & super::END_STREAM != 0);
        if ended.is_some() {
            self.cur = None;
        }
        Some((sid, data, ended))
    }
}
