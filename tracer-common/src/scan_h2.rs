//! HTTP/2 for the kernel's token scan: a connection that starts with the client's preface is
//! read as frames, and each request's header block (HEADERS and its CONTINUATIONs) is turned
//! into the header lines the HTTP/1 matcher of [`crate::scan`] reads, so every pattern, token
//! end and hash is the same as over HTTP/1.
//!
//! What the block carries is read without the dynamic table: the value of every field named by
//! a literal name is fed as `name:value`, and the value of a field named `cookie` or
//! `authorization` by its static index (32, 23), or by a dynamic index whose entry had such a
//! name or a literal one (a bit per entry inserted, [`H2Scan::dyn_mask`]), is fed as a line of
//! its own. Huffman-coded strings are decoded on the way ([`crate::huff`]). A value only the
//! dynamic table holds (an indexed field) is not seen: it was a literal in an earlier block of
//! the same connection, where it was read. DATA and every other frame are skipped by their
//! length. The request line is not made up: tenant checks and holds stay HTTP/1's.

use crate::huff::huff_byte;
use crate::scan::{push, ConnScan, MODE_OFF, SCAN_HEAD_MAX, T_LINE0, T_LINE1};

/// The client's connection preface.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// `H2Scan::pre`: the whole preface was read, the connection is HTTP/2.
pub const PRE_H2: u8 = 24;
/// `H2Scan::pre`: the connection did not start with the preface.
pub const PRE_NO: u8 = 0xff;

const HEADERS: u8 = 1;
const CONTINUATION: u8 = 9;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// `H2Scan::hs`: where the HPACK reader stands.
const HS_REP: u8 = 0;
/// Continuation bytes of an integer that is skipped (an index of an indexed field, a size).
const HS_SKIP_INT: u8 = 1;
/// Continuation bytes of a literal's name index.
const HS_IDX_INT: u8 = 2;
/// The first byte of a string (Huffman bit and length).
const HS_LEN: u8 = 3;
/// Continuation bytes of a string length.
const HS_LEN_INT: u8 = 4;
/// String bytes.
const HS_STR: u8 = 5;

/// `H2Scan::field`: what is fed of the current field.
const FD_SKIP: u8 = 0;
/// The value, as a line of its own.
const FD_VALUE: u8 = 1;
/// The name (literal), `:`, then the value.
const FD_NAME: u8 = 2;
/// Set while the name string is read.
const FD_IN_NAME: u8 = 4;
/// The field is inserted into the dynamic table.
const FD_INSERT: u8 = 8;

/// The HTTP/2 state of a connection's scan (`ConnScan::h2`); kept across requests.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct H2Scan {
    /// Bit `i`: dynamic table entry `62 + i` has a name whose value is read (see the module
    /// docs). Entries are only ever inserted at 62, so a shift per insertion keeps it.
    pub dyn_mask: u64,
    /// Payload bytes left in the current frame.
    pub flen: u32,
    /// Bytes left in the current string.
    pub slen: u32,
    /// The integer being decoded.
    pub int: u32,
    /// Preface bytes matched so far, [`PRE_H2`] or [`PRE_NO`].
    pub pre: u8,
    /// Frame header bytes read (9: in the payload).
    pub hdr_n: u8,
    pub ftype: u8,
    pub fflags: u8,
    /// Padding at the end of the current frame's payload.
    pub pad: u8,
    /// Bytes before the block fragment still to come: the pad length (bit 7) and the
    /// priority fields (low bits).
    pub lead: u8,
    pub hs: u8,
    pub field: u8,
    /// The current string is Huffman-coded, and the decoder's state.
    pub huff: u8,
    pub hst: u8,
    /// Shift of the next 7 bits of the integer being decoded.
    pub shift: u8,
    /// Inside a header block.
    pub in_block: u8,
}

impl H2Scan {
    pub const fn new() -> H2Scan {
        H2Scan {
            dyn_mask: 0,
            flen: 0,
            slen: 0,
            int: 0,
            pre: 0,
            hdr_n: 0,
            ftype: 0,
            fflags: 0,
            pad: 0,
            lead: 0,
            hs: HS_REP,
            field: FD_SKIP,
            huff: 0,
            hst: 0,
            shift: 0,
            in_block: 0,
        }
    }

    /// [`H2Scan::new`] in place.
    #[inline(always)]
    pub fn reset(&mut self) {
        self.dyn_mask = 0;
        self.flen = 0;
        self.slen = 0;
        self.int = 0;
        self.pre = 0;
        self.hdr_n = 0;
        self.ftype = 0;
        self.fflags = 0;
        self.pad = 0;
        self.lead = 0;
        self.hs = HS_REP;
        self.field = FD_SKIP;
        self.huff = 0;
        self.hst = 0;
        self.shift = 0;
        self.in_block = 0;
    }

    /// In a frame whose payload is not read (DATA and the rest): how many of `avail` bytes
    /// can be skipped at once.
    #[inline(always)]
    pub fn skippable(&self, avail: u64) -> u64 {
        if self.pre != PRE_H2 || self.hdr_n != 9 || self.ftype == HEADERS {
            return 0;
        }
        if self.ftype == CONTINUATION && self.in_block != 0 {
            return 0;
        }
        let f = self.flen as u64;
        if f < avail {
            f
        } else {
            avail
        }
    }
}

/// Whether the preface has been read: then every byte goes to [`take_h2`].
#[inline(always)]
pub fn is_h2(s: &ConnScan) -> bool {
    s.h2.pre == PRE_H2
}

/// Follows the preface at the start of a connection; `true` once it is complete (the scan
/// then starts afresh as HTTP/2).
#[inline(always)]
pub fn preface_byte(s: &mut ConnScan, c: u8) -> bool {
    let p = s.h2.pre;
    if p >= PRE_H2 {
        return false;
    }
    if (p as usize) >= PREFACE.len() || c != PREFACE[p as usize] {
        s.h2.pre = PRE_NO;
        return false;
    }
    s.h2.pre = p + 1;
    if s.h2.pre == PRE_H2 {
        s.restart();
        return true;
    }
    false
}

/// Skips `k` bytes of a frame that is not read ([`H2Scan::skippable`]).
#[inline(always)]
pub fn skip_h2(s: &mut ConnScan, k: u64) {
    s.h2.flen -= k as u32;
    if s.h2.flen == 0 {
        s.h2.hdr_n = 0;
    }
}

/// One byte of an HTTP/2 connection (after the preface). `EV_HEAD_BOUND` when a header block
/// passed the bound.
#[inline(always)]
pub fn take_h2(s: &mut ConnScan, c: u8) -> u32 {
    let h = &mut s.h2;
    if h.hdr_n < 9 {
        match h.hdr_n {
            0 => h.flen = (c as u32) << 16,
            1 => h.flen |= (c as u32) << 8,
            2 => h.flen |= c as u32,
            3 => h.ftype = c,
            4 => h.fflags = c,
            _ => {}
        }
        h.hdr_n += 1;
        if h.hdr_n == 9 {
            return frame_start(s);
        }
        return 0;
    }
    h.flen -= 1;
    let last = h.flen == 0;
    let mut ev = 0;
    let read = h.ftype == HEADERS || (h.ftype == CONTINUATION && h.in_block != 0);
    if read {
        if h.lead & 0x80 != 0 {
            h.lead &= 0x7f;
            h.pad = c;
        } else if h.lead > 0 {
            h.lead -= 1;
        } else if h.flen >= h.pad as u32 {
            ev = hpack_byte(s, c);
        }
    }
    if last {
        ev |= frame_end(s);
    }
    ev
}

#[inline(always)]
fn frame_start(s: &mut ConnScan) -> u32 {
    let h = &mut s.h2;
    h.pad = 0;
    h.lead = 0;
    if h.ftype == HEADERS {
        // A new request's head: header lines from a line start.
        h.in_block = 1;
        h.hs = HS_REP;
        h.field = FD_SKIP;
        if h.fflags & PADDED != 0 {
            h.lead = 0x80;
        }
        if h.fflags & PRIORITY != 0 {
            h.lead |= 5;
        }
        s.tflags |= T_LINE0 | T_LINE1;
        s.blank = 0;
        push(s, b'\n', false);
    }
    if s.h2.flen == 0 {
        return frame_end(s);
    }
    0
}

#[inline(always)]
fn frame_end(s: &mut ConnScan) -> u32 {
    let h = &mut s.h2;
    h.hdr_n = 0;
    let block = h.ftype == HEADERS || (h.ftype == CONTINUATION && h.in_block != 0);
    if block && h.fflags & END_HEADERS != 0 {
        h.in_block = 0;
        // The end of the head: a blank line (no body is read: DATA is skipped by length).
        s.content_length = 0;
        s.flags = 0;
        push(s, b'\n', false);
    }
    0
}

/// Classifies a literal's name index: what of the field is fed, and whether its entry's bit
/// is set if it is inserted.
#[inline(always)]
fn classify(s: &mut ConnScan, idx: u32) {
    let h = &mut s.h2;
    let (what, bit) = match idx {
        0 => (FD_NAME | FD_IN_NAME, 1),
        23 | 32 => (FD_VALUE, 1),
        1..=61 => (FD_SKIP, 0),
        _ => {
            let k = idx - 62;
            if k >= 64 || (h.dyn_mask >> k) & 1 != 0 {
                (FD_VALUE, 1)
            } else {
                (FD_SKIP, 0)
            }
        }
    };
    if h.field & FD_INSERT != 0 {
        h.dyn_mask = h.dyn_mask << 1 | bit;
    }
    h.field = (h.field & FD_INSERT) | what;
    h.hs = HS_LEN;
}

/// An integer with an `n`-bit prefix starts with `v` (the prefix's bits): `true` if it
/// continues.
#[inline(always)]
fn int_start(h: &mut H2Scan, v: u32, max: u32) -> bool {
    h.int = v;
    h.shift = 0;
    v == max
}

/// A continuation byte of an integer: `true` when it was the last.
#[inline(always)]
fn int_more(h: &mut H2Scan, c: u8) -> bool {
    if h.shift < 28 {
        h.int = h.int.wrapping_add(((c & 0x7f) as u32) << h.shift);
    } else {
        h.int = u32::MAX;
    }
    h.shift += 7;
    c & 0x80 == 0
}

#[inline(always)]
fn hpack_byte(s: &mut ConnScan, c: u8) -> u32 {
    if s.head_len >= SCAN_HEAD_MAX {
        s.mode = MODE_OFF;
        return crate::scan::EV_HEAD_BOUND;
    }
    s.head_len += 1;
    let h = &mut s.h2;
    match h.hs {
        HS_REP => {
            if c & 0x80 != 0 {
                // Indexed field: nothing to read.
                if int_start(h, (c & 0x7f) as u32, 0x7f) {
                    h.hs = HS_SKIP_INT;
                }
            } else if c & 0xe0 == 0x20 {
                // Dynamic table size update.
                if int_start(h, (c & 0x1f) as u32, 0x1f) {
                    h.hs = HS_SKIP_INT;
                }
            } else {
                let (v, max) = if c & 0x40 != 0 {
                    ((c & 0x3f) as u32, 0x3f)
                } else {
                    ((c & 0x0f) as u32, 0x0f)
                };
                h.field = if c & 0x40 != 0 { FD_INSERT } else { 0 };
                if int_start(h, v, max) {
                    h.hs = HS_IDX_INT;
                } else {
                    classify(s, v);
                }
            }
        }
        HS_SKIP_INT => {
            if int_more(h, c) {
                h.hs = HS_REP;
            }
        }
        HS_IDX_INT => {
            if int_more(h, c) {
                let v = h.int;
                classify(s, v);
            }
        }
        HS_LEN => {
            h.huff = c >> 7;
            h.hst = 0;
            if int_start(h, (c & 0x7f) as u32, 0x7f) {
                h.hs = HS_LEN_INT;
            } else {
                let n = h.int;
                string_start(s, n);
            }
        }
        HS_LEN_INT => {
            if int_more(h, c) {
                let n = h.int;
                string_start(s, n);
            }
        }
        _ => {
            // HS_STR
            if h.field & (FD_VALUE | FD_NAME) != 0 {
                if h.huff != 0 {
                    let (st, syms, _) = huff_byte(h.hst, c);
                    h.hst = st;
                    if let Some(a) = syms[0] {
                        h.int += 1;
                        push(s, a, false);
                    }
                    if let Some(b) = syms[1] {
                        s.h2.int += 1;
                        push(s, b, false);
                    }
                } else {
                    h.int += 1;
                    push(s, c, false);
                }
            }
            let h = &mut s.h2;
            h.slen -= 1;
            if h.slen == 0 {
                string_end(s);
            }
        }
    }
    0
}

#[inline(always)]
fn string_start(s: &mut ConnScan, n: u32) {
    // `int` counts the bytes fed of the string.
    s.h2.int = 0;
    s.h2.slen = n;
    s.h2.hs = HS_STR;
    if n == 0 {
        string_end(s);
    }
}

#[inline(always)]
fn string_end(s: &mut ConnScan) {
    let h = &mut s.h2;
    if h.field & FD_IN_NAME != 0 {
        h.field &= !FD_IN_NAME;
        h.hs = HS_LEN;
        push(s, b':', false);
        return;
    }
    // A line for a name, or for a value that fed something (an empty line ends a head).
    let fed = h.field & FD_NAME != 0 || (h.field & FD_VALUE != 0 && h.int > 0);
    h.hs = HS_REP;
    h.field = FD_SKIP;
    if fed {
        push(s, b'\n', false);
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{vec, vec::Vec};

    use crate::huff::tests::encode;
    use crate::scan::{scan_all, Pattern, ScanTables, PK_TOKEN};
    use crate::token_hash;

    use super::*;

    const SEED: u64 = 0x5eed;

    fn tables() -> ScanTables {
        ScanTables::build(&[
            Pattern {
                bytes: b"skolsid=",
                any_case: false,
                kind: PK_TOKEN,
            },
            Pattern {
                bytes: b"bearer",
                any_case: true,
                kind: PK_TOKEN,
            },
            Pattern {
                bytes: b"\nx-session:",
                any_case: true,
                kind: PK_TOKEN,
            },
        ])
        .unwrap()
    }

    /// An HPACK string, raw or Huffman-coded (lengths under 127).
    fn string(s: &[u8], huff: bool) -> Vec<u8> {
        let b = if huff { encode(s) } else { s.to_vec() };
        assert!(b.len() < 127);
        let mut out = vec![(b.len() as u8) | if huff { 0x80 } else { 0 }];
        out.extend(b);
        out
    }

    fn frame(typ: u8, flags: u8, sid: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.push(typ);
        f.push(flags);
        f.extend_from_slice(&sid.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// `:method GET`, `:scheme https`, `:path /`, `:authority s` and then `fields`.
    fn block(fields: &[u8]) -> Vec<u8> {
        let mut b = vec![0x82, 0x87, 0x84, 0x41, 1, b's'];
        b.extend_from_slice(fields);
        b
    }

    /// The preface, SETTINGS, and `frames`.
    fn conn(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut c = PREFACE.to_vec();
        c.extend(frame(4, 0, 0, &[0, 1, 0, 0, 0x10, 0]));
        for f in frames {
            c.extend_from_slice(f);
        }
        c
    }

    fn hashes(stream: &[u8], cut: Option<usize>) -> Vec<u64> {
        let t = tables();
        let mut s = ConnScan::new(1);
        let mut out = Vec::new();
        let cut = cut.unwrap_or(stream.len());
        scan_all(&mut s, &t, SEED, &stream[..cut], |h, _| out.push(h));
        scan_all(&mut s, &t, SEED, &stream[cut..], |h, _| out.push(h));
        out
    }

    /// Whether `token` is found in `stream`, whole and cut at every byte into two reads.
    fn found(stream: &[u8], token: &[u8]) -> bool {
        let want = token_hash(SEED, token);
        let whole = hashes(stream, None).contains(&want);
        for cut in 1..stream.len() {
            assert_eq!(
                hashes(stream, Some(cut)).contains(&want),
                whole,
                "cut at {cut}"
            );
        }
        whole
    }

    fn headers(fields: &[u8]) -> Vec<u8> {
        conn(&[frame(1, 0x5, 1, &block(fields))])
    }

    /// `cookie` (static 32) with incremental indexing.
    fn cookie(v: &[u8], huff: bool) -> Vec<u8> {
        let mut f = vec![0x60];
        f.extend(string(v, huff));
        f
    }

    #[test]
    fn cookie_crumbs_raw_and_huffman() {
        for huff in [false, true] {
            assert!(found(&headers(&cookie(b"skolsid=tok123", huff)), b"tok123"));
            // One field with several crumbs (curl), never indexed (0x10 | 0x0f, then 17).
            let mut f = vec![0x1f, 0x11];
            f.extend(string(b"a=1; skolsid=tok123; theme=dark", huff));
            assert!(found(&headers(&f), b"tok123"), "huff {huff}");
            // Another cookie: not this token.
            assert!(!found(
                &headers(&cookie(b"skolsid=tok1234", huff)),
                b"tok123"
            ));
        }
    }

    #[test]
    fn bearer_and_a_literal_session_header() {
        for huff in [false, true] {
            let mut f = vec![0x57];
            f.extend(string(b"Bearer tok123", huff));
            assert!(found(&headers(&f), b"tok123"));
            // A literal name, never indexed.
            let mut f = vec![0x10];
            f.extend(string(b"x-session", huff));
            f.extend(string(b"tok123", huff));
            assert!(found(&headers(&f), b"tok123"), "huff {huff}");
        }
    }

    #[test]
    fn a_dynamic_name_that_was_a_cookie_is_read() {
        // cookie: a=b inserted (62), then a field named by index 62 (0x40 | 62).
        let mut f = cookie(b"a=b", false);
        f.push(0x7e);
        f.extend(string(b"skolsid=tok123", true));
        assert!(found(&headers(&f), b"tok123"));
        // user-agent (58) inserted at 62: its value is not read, so neither is index 62's.
        let mut f = vec![0x40 | 58];
        f.extend(string(b"curl", false));
        f.push(0x7e);
        f.extend(string(b"skolsid=tok123", false));
        assert!(!found(&headers(&f), b"tok123"));
    }

    #[test]
    fn padding_priority_and_continuation() {
        let b = block(&cookie(b"skolsid=tok123", true));
        let (a, rest) = b.split_at(8);
        let (m, z) = rest.split_at(5);
        // HEADERS with 3 bytes of padding and a priority, then two CONTINUATIONs.
        let mut h = vec![3, 0, 0, 0, 0, 16];
        h.extend_from_slice(a);
        h.extend_from_slice(&[0, 0, 0]);
        let c = conn(&[
            frame(1, 0x8 | 0x20, 1, &h),
            frame(9, 0, 1, m),
            frame(9, 0x4, 1, z),
        ]);
        assert!(found(&c, b"tok123"));
    }

    #[test]
    fn data_and_other_frames_are_skipped_and_later_requests_read() {
        // A body that looks like a cookie is not a header; the second request's is.
        let c = conn(&[
            frame(1, 0x4, 1, &block(&cookie(b"theme=dark", false))),
            frame(0, 0x1, 1, b"skolsid=tok123\r\n"),
            frame(8, 0, 0, &[0, 0, 1, 0]),
            frame(1, 0x5, 3, &block(&cookie(b"skolsid=tok456", true))),
        ]);
        assert!(!found(&c, b"tok123"));
        assert!(found(&c, b"tok456"));
    }

    #[test]
    fn http1_is_untouched_and_a_near_preface_is_http1() {
        let get = b"GET / HTTP/1.1\r\nCookie: skolsid=tok123\r\n\r\n";
        assert!(found(get, b"tok123"));
        let mut s = ConnScan::new(1);
        scan_all(
            &mut s,
            &tables(),
            SEED,
            b"PRI * HTTP/1.1\r\n\r\n",
            |_, _| {},
        );
        assert_eq!(s.h2.pre, PRE_NO);
    }
}
