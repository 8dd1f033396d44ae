//! The streaming recognition of session tokens and login names in what an edge server reads,
//! byte by byte, as the kernel runs it (`tracer-ebpf/src/tokens.rs` calls [`step`] for every
//! byte of every read) and as the agent's tests and fuzzers model it ([`scan_all`]).
//!
//! One [`ConnScan`] per connection is carried between reads (and between the chunks of one
//! read), so nothing depends on where reads are cut. It follows the request stream:
//!
//! - **head** (request line and headers, up to the first empty line, bare LF or CRLF): every
//!   byte is matched against the patterns of [`ScanTables`] (a bit-parallel shift-and over at
//!   most [`PAT_BITS`] pattern bytes); header names and `Bearer` match in any case. After a
//!   pattern, spaces and tabs are skipped and the token runs to the first byte the servers end
//!   it at ([`is_end`]: whitespace and control bytes, including what Python's `str.strip`
//!   removes, `;`, `,`, `&`, `"`). `Content-Length` is read; a `Transfer-Encoding` header makes
//!   the body's extent unknown, so its bytes are then scanned like a head.
//! - **body** (its `Content-Length`, at most [`SCAN_BODY_MAX`] bytes of it scanned): decoded as
//!   the platform decodes it before matching: a body whose first non-blank byte is `{` or `[`
//!   as JSON (whitespace outside strings dropped, `\"`, `\\`, `\uXXXX` with surrogate pairs
//!   decoded to UTF-8), else as a form (`%XX` and `+` decoded). Decoded bytes never end a
//!   token; a form value ends at a raw `&` and at the end of the body.
//! - past [`SCAN_HEAD_MAX`] bytes of one head the connection is no longer scanned
//!   ([`EV_HEAD_BOUND`]); past [`SCAN_BODY_MAX`] bytes of a body the rest of it is skipped
//!   ([`EV_BODY_BOUND`]). Both are counted; the agent's request-time check covers them.
//!
//! Everything is fixed-width and bounded so the BPF verifier accepts it.

use core::mem::size_of;

use crate::scan_h2::{is_h2, preface_byte, skip_h2, take_h2, H2Scan, PRE_H2, PRE_NO};
use crate::{token_hash_byte, token_hash_start, MAX_TOKEN_LEN};

/// Bytes of one request head scanned: above nginx's largest (`large_client_header_buffers`
/// 4 × 8k) and Apache httpd's (`LimitRequestFieldSize` 8190 × `LimitRequestFields` 100, plus
/// the request line), so a head a server accepts is scanned whole.
pub const SCAN_HEAD_MAX: u32 = 1 << 20;
/// Bytes of one request body scanned for login names (a login form or JSON is far smaller).
pub const SCAN_BODY_MAX: u32 = 16 * 1024;
/// 64-bit words of the matcher's state and masks.
pub const W: usize = 3;
/// Pattern bytes the tables hold, configured and built-in together.
pub const PAT_BITS: usize = 64 * W;
/// Pattern bytes the built-in patterns take (`\ncontent-length:`, `\ntransfer-encoding:`).
pub const BUILTIN_PAT_BYTES: usize = BUILTIN_CL.len() + BUILTIN_TE.len();
pub const BUILTIN_CL: &[u8] = b"\ncontent-length:";
pub const BUILTIN_TE: &[u8] = b"\ntransfer-encoding:";

/// What a pattern ending at a bit starts (`ScanTables::kind`).
pub const PK_TOKEN: u8 = 1;
pub const PK_CONTENT_LENGTH: u8 = 2;
pub const PK_TRANSFER_ENCODING: u8 = 3;
/// A route's static path prefix (e.g. `/api/addressbook/persons`): in a request line, it makes
/// the query tenant parameters that follow count.
pub const PK_ROUTE: u8 = 4;
/// A query parameter that names the tenant (`schoolId=`): in the query of a request line whose
/// path matched a `PK_ROUTE` pattern, the value after it is a tenant value.
pub const PK_TENANT_QUERY: u8 = 5;
/// A route's static prefix up to a tenant path segment (`/api/addressbook/schools/`): in the
/// path of a request line, the segment after it is a tenant value.
pub const PK_TENANT_PATH: u8 = 6;

/// The compiled patterns (`TOKEN_TABLES[0]`), written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ScanTables {
    /// Bit `i` of `mask[c]`: pattern byte `i` accepts byte `c`.
    pub mask: [[u64; W]; 256],
    /// The first byte of each pattern.
    pub start: [u64; W],
    /// The last byte of each pattern.
    pub end: [u64; W],
    /// The last byte of the patterns of each kind (`PK_*`).
    pub end_tok: [u64; W],
    pub end_cl: [u64; W],
    pub end_te: [u64; W],
    pub end_route: [u64; W],
    pub end_tq: [u64; W],
    pub end_tp: [u64; W],
}
const _: () = assert!(size_of::<ScanTables>() == 256 * 8 * W + 8 * 8 * W);

impl ScanTables {
    pub const fn empty() -> ScanTables {
        ScanTables {
            mask: [[0; W]; 256],
            start: [0; W],
            end: [0; W],
            end_tok: [0; W],
            end_cl: [0; W],
            end_te: [0; W],
            end_route: [0; W],
            end_tq: [0; W],
            end_tp: [0; W],
        }
    }
}

/// Why [`ScanTables::build`] refused the patterns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TablesError {
    Empty { index: usize },
    TooLong { bytes: usize, max: usize },
}

/// One pattern: its bytes and whether letters match in any case.
#[derive(Debug, Clone, Copy)]
pub struct Pattern<'a> {
    pub bytes: &'a [u8],
    pub any_case: bool,
    pub kind: u8,
}

impl ScanTables {
    /// Compiles `pats` and the built-in framing patterns.
    pub fn build(pats: &[Pattern]) -> Result<ScanTables, TablesError> {
        let mut t = ScanTables::empty();
        let mut total = 0;
        for (index, p) in pats.iter().enumerate() {
            if p.bytes.is_empty() {
                return Err(TablesError::Empty { index });
            }
            total += p.bytes.len();
        }
        let all = total + BUILTIN_PAT_BYTES;
        if all > PAT_BITS {
            return Err(TablesError::TooLong {
                bytes: total,
                max: PAT_BITS - BUILTIN_PAT_BYTES,
            });
        }
        let builtins = [
            Pattern {
                bytes: BUILTIN_CL,
                any_case: true,
                kind: PK_CONTENT_LENGTH,
            },
            Pattern {
                bytes: BUILTIN_TE,
                any_case: true,
                kind: PK_TRANSFER_ENCODING,
            },
        ];
        let mut bit = 0usize;
        for p in pats.iter().chain(builtins.iter()) {
            for (k, &b) in p.bytes.iter().enumerate() {
                let (w, m) = (bit / 64, 1u64 << (bit % 64));
                if k == 0 {
                    t.start[w] |= m;
                }
                if k == p.bytes.len() - 1 {
                    t.end[w] |= m;
                    match p.kind {
                        PK_CONTENT_LENGTH => t.end_cl[w] |= m,
                        PK_TRANSFER_ENCODING => t.end_te[w] |= m,
                        PK_ROUTE => t.end_route[w] |= m,
                        PK_TENANT_QUERY => t.end_tq[w] |= m,
                        PK_TENANT_PATH => t.end_tp[w] |= m,
                        _ => t.end_tok[w] |= m,
                    }
                }
                if p.any_case && b.is_ascii_alphabetic() {
                    t.mask[b.to_ascii_lowercase() as usize][w] |= m;
                    t.mask[b.to_ascii_uppercase() as usize][w] |= m;
                } else if p.any_case && p.kind == PK_TOKEN && b == b'-' {
                    // A configured header name: Apache httpd passes `X_Session` on, and
                    // CGI-style frameworks read it as `X-Session`.
                    t.mask[b'-' as usize][w] |= m;
                    t.mask[b'_' as usize][w] |= m;
                } else {
                    t.mask[b as usize][w] |= m;
                }
                bit += 1;
            }
        }
        Ok(t)
    }
}

pub const MODE_HEAD: u8 = 0;
pub const MODE_BODY: u8 = 1;
/// The rest of a body past `SCAN_BODY_MAX`: skipped without looking.
pub const MODE_SKIP: u8 = 2;
/// A head past `SCAN_HEAD_MAX`: the connection is not scanned any more.
pub const MODE_OFF: u8 = 3;

const TOK_NONE: u8 = 0;
const TOK_SKIPWS: u8 = 1;
const TOK_TOKEN: u8 = 2;
const TOK_CL: u8 = 3;

/// `ConnScan::tflags`: the request line has content (a blank line before it is skipped, as
/// the servers skip it).
pub const T_LINE0: u8 = 1;
/// Past the request line: header lines.
pub const T_LINE1: u8 = 2;
/// In the request line's query (after its first raw `?`).
pub const T_QUERY: u8 = 4;
/// The request line's path matched a `PK_ROUTE` pattern.
pub const T_ROUTE: u8 = 8;
/// A tenant value was read (`ConnScan::tenant` holds the first).
pub const T_SEEN: u8 = 16;
/// Another tenant value differed from the first.
pub const T_MIXED: u8 = 32;
/// The token being read is a tenant value.
pub const T_TOK: u8 = 64;

const F_TE: u8 = 1;
const F_CL_DIGIT: u8 = 2;
const F_BODY_KIND: u8 = 4;
const F_JSON: u8 = 8;

const D_IN_STR: u8 = 1;
const D_ESC: u8 = 2;
const D_UHEX: u8 = 4;
const D_PCT1: u8 = 8;
const D_PCT2: u8 = 16;

/// A token ended; its hash is in `ConnScan::done_hash`.
pub const EV_TOKEN: u32 = 1;
/// A head passed `SCAN_HEAD_MAX`: the connection is no longer scanned.
pub const EV_HEAD_BOUND: u32 = 2;
/// A body passed `SCAN_BODY_MAX`: its rest is skipped.
pub const EV_BODY_BOUND: u32 = 4;

/// Largest Content-Length kept (larger ones are kept as this; the body is skipped anyway).
const CL_MAX: u64 = 1 << 40;

/// The scan state of one connection (`TOKEN_STATE` value), carried between reads.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnScan {
    /// `ConnState::gen` of the connection: a reused fd does not inherit it.
    pub gen: u64,
    /// Shift-and state: bit `i` set when the bytes so far end with pattern bytes `..=i`.
    pub d: [u64; W],
    /// Hash of the token being read.
    pub hash: u64,
    /// Hash of the last token that ended.
    pub done_hash: u64,
    /// Hash of the first tenant value of this request's line (`T_SEEN`), in the canonical
    /// form of [`crate::tenant_hash`].
    pub tenant: u64,
    pub content_length: u64,
    /// Body bytes still to come.
    pub body_left: u64,
    pub head_len: u32,
    pub body_seen: u32,
    pub tok_len: u32,
    /// Hex value being decoded (`\uXXXX`, `%XX`).
    pub dec_val: u32,
    /// A high surrogate waiting for its low half.
    pub hi_sur: u16,
    pub mode: u8,
    pub tok: u8,
    /// The current line is empty so far.
    pub blank: u8,
    pub flags: u8,
    pub dec: u8,
    pub dec_n: u8,
    /// Decoded bytes waiting for the matcher (one per kernel loop step), and which of them are
    /// literal (bit `i`).
    pub q: [u8; 4],
    pub q_lit: u8,
    pub q_n: u8,
    /// The body ended: end its token once the queue is drained.
    pub body_end: u8,
    /// Request-line and tenant state (`T_*`).
    pub tflags: u8,
    /// HTTP/2 framing and HPACK state ([`crate::scan_h2`]).
    pub h2: H2Scan,
}
const _: () = assert!(size_of::<ConnScan>() == 136);

impl ConnScan {
    pub const fn new(gen: u64) -> ConnScan {
        ConnScan {
            gen,
            d: [0; W],
            hash: 0,
            done_hash: 0,
            tenant: 0,
            content_length: 0,
            body_left: 0,
            head_len: 0,
            body_seen: 0,
            tok_len: 0,
            dec_val: 0,
            hi_sur: 0,
            mode: MODE_HEAD,
            tok: TOK_NONE,
            blank: 0,
            flags: 0,
            dec: 0,
            dec_n: 0,
            q: [0; 4],
            q_lit: 0,
            q_n: 0,
            body_end: 0,
            tflags: 0,
            h2: H2Scan::new(),
        }
    }

    /// Decoded bytes or the end of a body are waiting: the next step is [`drain`], not
    /// [`take`].
    #[inline(always)]
    pub fn draining(&self) -> bool {
        self.q_n != 0 || self.body_end != 0
    }

    /// The head fast path can take the next byte without `step`: a header line (the request
    /// line is decoded, so it always takes the slow path), no token or decoding state.
    #[inline(always)]
    pub fn plain_head(&self) -> bool {
        self.mode == MODE_HEAD
            && self.tok == TOK_NONE
            && self.q_n == 0
            && self.tflags & T_LINE1 != 0
            && self.h2.pre == PRE_NO
    }

    /// `step` for a head byte in `plain_head` state that neither completes a pattern nor ends
    /// the head nor passes the bound: `true` if it was taken, else nothing changed.
    #[inline(always)]
    pub fn fast_head(&mut self, t: &ScanTables, c: u8) -> bool {
        if self.head_len >= SCAN_HEAD_MAX {
            return false;
        }
        let d = shift(&self.d, t, c);
        if any(&d, &t.end) {
            return false;
        }
        if c == b'\n' {
            if self.blank != 0 {
                return false;
            }
            self.blank = 1;
        } else if c != b'\r' {
            self.blank = 0;
        }
        self.d = d;
        self.head_len += 1;
        true
    }

    /// Body bytes that may be skipped now (`MODE_SKIP`), at most `avail`; the state moves past
    /// them.
    #[inline(always)]
    pub fn skip(&mut self, avail: u64) -> u64 {
        if self.h2.pre == PRE_H2 {
            // HTTP/2: the payload of a frame that is not a header block.
            let k = self.h2.skippable(avail);
            if k > 0 {
                skip_h2(self, k);
            }
            return k;
        }
        if self.mode != MODE_SKIP {
            return 0;
        }
        let k = if self.body_left < avail {
            self.body_left
        } else {
            avail
        };
        self.body_left -= k;
        if self.body_left == 0 {
            self.restart();
        }
        k
    }

    /// [`ConnScan::new`] in place (no temporary on the BPF stack).
    #[inline(always)]
    pub fn reset(&mut self, gen: u64) {
        self.restart();
        self.gen = gen;
        self.done_hash = 0;
        self.h2.reset();
    }

    /// A new request: everything but the connection's own state (its generation, the last
    /// token's hash, HTTP/2) starts afresh. Field by field, as [`ConnScan::new`] sets them: no
    /// temporary on the BPF stack (the verifier's 512 bytes are shared with the caller of the
    /// loop).
    #[inline(always)]
    pub(crate) fn restart(&mut self) {
        self.d = [0; W];
        self.hash = 0;
        self.tenant = 0;
        self.content_length = 0;
        self.body_left = 0;
        self.head_len = 0;
        self.body_seen = 0;
        self.tok_len = 0;
        self.dec_val = 0;
        self.hi_sur = 0;
        self.mode = MODE_HEAD;
        self.tok = TOK_NONE;
        self.blank = 0;
        self.flags = 0;
        self.dec = 0;
        self.dec_n = 0;
        self.q = [0; 4];
        self.q_lit = 0;
        self.q_n = 0;
        self.body_end = 0;
        self.tflags = 0;
    }
}

/// Where the servers end a token: whitespace and control bytes (also those Python's `str.strip`
/// removes from a Latin-1 header: `\x1c`-`\x1f`, `\x85`, `\xa0`), and the separators `;`, `,`,
/// `&`, `"`. In a body, `\x85` and `\xa0` are UTF-8 continuation bytes and end nothing.
#[inline(always)]
pub const fn is_end(c: u8, head: bool) -> bool {
    c <= 0x20
        || c == 0x7f
        || c == b';'
        || c == b','
        || c == b'&'
        || c == b'"'
        || (head && (c == 0x85 || c == 0xa0))
}

#[inline(always)]
fn hex(c: u8) -> Option<u32> {
    match c {
        b'0'..=b'9' => Some((c - b'0') as u32),
        b'a'..=b'f' => Some((c - b'a' + 10) as u32),
        b'A'..=b'F' => Some((c - b'A' + 10) as u32),
        _ => None,
    }
}

/// The matcher's state after byte `c` (a shift-and step over [`W`] words).
#[inline(always)]
fn shift(d: &[u64; W], t: &ScanTables, c: u8) -> [u64; W] {
    let m = &t.mask[c as usize];
    [
        ((d[0] << 1) | t.start[0]) & m[0],
        ((d[1] << 1) | (d[0] >> 63) | t.start[1]) & m[1],
        ((d[2] << 1) | (d[1] >> 63) | t.start[2]) & m[2],
    ]
}
const _: () = assert!(W == 3);

#[inline(always)]
fn any(d: &[u64; W], e: &[u64; W]) -> bool {
    (d[0] & e[0]) | (d[1] & e[1]) | (d[2] & e[2]) != 0
}

/// Where a tenant value ends in a request line: where a token ends, and at the path's and
/// query's own separators.
#[inline(always)]
const fn is_tenant_end(c: u8) -> bool {
    is_end(c, true) || c == b'/' || c == b'?' || c == b'#'
}

/// A tenant value ended with hash `h`: the first is kept, a different later one marks the
/// request line as naming several.
#[inline(always)]
fn tenant_done(s: &mut ConnScan, h: u64) {
    if s.tflags & T_SEEN == 0 {
        s.tenant = h;
        s.tflags |= T_SEEN;
    } else if h != s.tenant {
        s.tflags |= T_MIXED;
    }
    s.tflags &= !T_TOK;
    s.tok = TOK_NONE;
}

/// One decoded byte of a tenant value (`T_TOK`): hashed in the canonical form of
/// [`crate::tenant_hash`] (leading `0`s and decoded blanks skipped). `true` if it was taken;
/// `false` if it ended the value (it then goes to the matcher).
#[inline(always)]
fn tenant_byte(s: &mut ConnScan, seed: u64, c: u8, literal: bool) -> bool {
    if !literal && is_tenant_end(c) {
        let h = if s.tok == TOK_SKIPWS {
            token_hash_start(seed)
        } else {
            s.hash
        };
        tenant_done(s, h);
        return false;
    }
    if s.tok == TOK_SKIPWS {
        if c == b'0' || (literal && (c == b' ' || c == b'\t')) {
            return true;
        }
        s.tok = TOK_TOKEN;
        s.hash = token_hash_start(seed);
        s.tok_len = 0;
    }
    s.hash = token_hash_byte(s.hash, c);
    s.tok_len += 1;
    if s.tok_len >= MAX_TOKEN_LEN as u32 {
        tenant_done(s, s.hash);
    }
    true
}

/// One decoded byte into the token reader and the pattern matcher. `literal`: it came out of
/// an escape (or a JSON string) and cannot end a token.
#[inline(always)]
fn feed(s: &mut ConnScan, t: &ScanTables, seed: u64, c: u8, literal: bool) -> u32 {
    let head = s.mode == MODE_HEAD;
    let mut ev = 0;
    if s.tflags & T_TOK != 0 {
        if tenant_byte(s, seed, c, literal) {
            return 0;
        }
    } else if s.tok == TOK_SKIPWS {
        // Spacing, and in a head a line fold (`\r\n ` joined by Apache httpd; nginx refuses
        // it): a token after a fold is the one Apache passes on.
        if !literal && (c == b' ' || c == b'\t' || (head && (c == b'\r' || c == b'\n'))) {
            return 0;
        }
        s.tok = TOK_TOKEN;
        s.hash = token_hash_start(seed);
        s.tok_len = 0;
    }
    if s.tok == TOK_TOKEN {
        if literal || !is_end(c, head) {
            s.hash = token_hash_byte(s.hash, c);
            s.tok_len += 1;
            if s.tok_len >= MAX_TOKEN_LEN as u32 {
                // The hash covers the first MAX_TOKEN_LEN bytes (as `token_hash` does).
                s.done_hash = s.hash;
                s.tok = TOK_NONE;
                return EV_TOKEN;
            }
            return 0;
        }
        if s.tok_len > 0 {
            s.done_hash = s.hash;
            ev = EV_TOKEN;
        }
        s.tok = TOK_NONE;
    } else if s.tok == TOK_CL {
        if !literal && c.is_ascii_digit() {
            let v = s.content_length * 10 + (c - b'0') as u64;
            s.content_length = if v > CL_MAX { CL_MAX } else { v };
            s.flags |= F_CL_DIGIT;
            return 0;
        }
        if !literal && (c == b' ' || c == b'\t') && s.flags & F_CL_DIGIT == 0 {
            return 0;
        }
        s.tok = TOK_NONE;
    }
    // The byte that ended a token goes to the matcher too (a `\n` starts the next header).
    let d = shift(&s.d, t, c);
    s.d = d;
    if !any(&d, &t.end) {
        return ev;
    }
    let line0 = head && s.tflags & T_LINE1 == 0;
    // Framing is read from header lines only, never from a decoded byte.
    let header = head && !line0 && !literal;
    if any(&d, &t.end_cl) {
        if header {
            s.tok = TOK_CL;
            s.content_length = 0;
            s.flags &= !F_CL_DIGIT;
            s.d = [0; W];
        }
    } else if any(&d, &t.end_te) {
        if header {
            s.flags |= F_TE;
        }
    } else if any(&d, &t.end_tok) {
        s.tok = TOK_SKIPWS;
        s.d = [0; W];
    } else if line0 {
        let q = s.tflags & T_QUERY != 0;
        if (any(&d, &t.end_tq) && q && s.tflags & T_ROUTE != 0) || (any(&d, &t.end_tp) && !q) {
            s.tok = TOK_SKIPWS;
            s.tflags |= T_TOK;
            s.d = [0; W];
        } else if any(&d, &t.end_route) && !q {
            s.tflags |= T_ROUTE;
        }
    }
    ev
}

#[inline(always)]
pub(crate) fn push(s: &mut ConnScan, c: u8, literal: bool) {
    let n = s.q_n as usize;
    if n < 4 {
        s.q[n & 3] = c;
        if literal {
            s.q_lit |= 1 << n;
        }
        s.q_n += 1;
    }
}

/// A code point decoded from `\uXXXX`, as UTF-8 into the queue.
#[inline(always)]
fn push_cp(s: &mut ConnScan, cp: u32) {
    if (0xd800..0xdc00).contains(&cp) {
        s.hi_sur = cp as u16;
        return;
    }
    let mut cp = cp;
    if (0xdc00..0xe000).contains(&cp) && s.hi_sur != 0 {
        cp = 0x10000 + (((s.hi_sur as u32) - 0xd800) << 10) + (cp - 0xdc00);
    }
    s.hi_sur = 0;
    if cp < 0x80 {
        push(s, cp as u8, true);
    } else if cp < 0x800 {
        push(s, 0xc0 | (cp >> 6) as u8, true);
        push(s, 0x80 | (cp & 0x3f) as u8, true);
    } else if cp < 0x10000 {
        push(s, 0xe0 | (cp >> 12) as u8, true);
        push(s, 0x80 | ((cp >> 6) & 0x3f) as u8, true);
        push(s, 0x80 | (cp & 0x3f) as u8, true);
    } else {
        push(s, 0xf0 | (cp >> 18) as u8, true);
        push(s, 0x80 | ((cp >> 12) & 0x3f) as u8, true);
        push(s, 0x80 | ((cp >> 6) & 0x3f) as u8, true);
        push(s, 0x80 | (cp & 0x3f) as u8, true);
    }
}

/// One raw body byte, decoded as JSON or as a form into the queue.
#[inline(always)]
fn body_byte(s: &mut ConnScan, c: u8) {
    let ws = c == b' ' || c == b'\t' || c == b'\r' || c == b'\n';
    if s.flags & F_BODY_KIND == 0 {
        if ws {
            return;
        }
        s.flags |= F_BODY_KIND;
        if c == b'{' || c == b'[' {
            s.flags |= F_JSON;
        }
    }
    if s.flags & F_JSON != 0 {
        if s.dec & D_IN_STR == 0 {
            if ws {
                return;
            }
            if c == b'"' {
                s.dec = D_IN_STR;
            }
            push(s, c, false);
            return;
        }
        if s.dec & D_UHEX != 0 {
            if let Some(v) = hex(c) {
                s.dec_val = (s.dec_val << 4) | v;
                s.dec_n += 1;
                if s.dec_n == 4 {
                    s.dec = D_IN_STR;
                    push_cp(s, s.dec_val);
                }
                return;
            }
            s.dec = D_IN_STR;
        } else if s.dec & D_ESC != 0 {
            s.dec = D_IN_STR;
            let out = match c {
                b'u' => {
                    s.dec = D_IN_STR | D_UHEX;
                    s.dec_val = 0;
                    s.dec_n = 0;
                    return;
                }
                b'n' => b'\n',
                b'r' => b'\r',
                b't' => b'\t',
                b'b' => 0x08,
                b'f' => 0x0c,
                other => other,
            };
            s.hi_sur = 0;
            push(s, out, true);
            return;
        }
        if c == b'\\' {
            s.dec = D_IN_STR | D_ESC;
            return;
        }
        s.hi_sur = 0;
        if c == b'"' {
            s.dec = 0;
            push(s, c, false);
        } else {
            push(s, c, true);
        }
        return;
    }
    pct_byte(s, c, true);
}

/// One raw byte of a form or of a request line, `%XX` (and `+` when `plus`) decoded to
/// literal bytes into the queue; an invalid escape stays as it is (Python's `unquote`).
#[inline(always)]
fn pct_byte(s: &mut ConnScan, c: u8, plus: bool) {
    if s.dec == D_PCT1 {
        if let Some(v) = hex(c) {
            s.dec = D_PCT2;
            s.dec_val = v;
            s.dec_n = c;
            return;
        }
        s.dec = 0;
        push(s, b'%', true);
    } else if s.dec == D_PCT2 {
        s.dec = 0;
        if let Some(v) = hex(c) {
            push(s, ((s.dec_val << 4) | v) as u8, true);
            return;
        }
        push(s, b'%', true);
        push(s, s.dec_n, true);
    }
    match c {
        b'%' => s.dec = D_PCT1,
        b'+' if plus => push(s, b' ', true),
        _ => push(s, c, false),
    }
}

/// One raw byte of a request line: its path and query are decoded as the platform decodes
/// them, so a route, a tenant parameter's name and its value are matched however they are
/// escaped (`%70ersons`, `school%49d=`, `sch%2D02`); the query's `+` is a space. The first raw
/// `?` starts the query.
#[inline(always)]
fn line0_byte(s: &mut ConnScan, c: u8) {
    if c == b'?' && s.dec == 0 && s.tflags & T_QUERY == 0 {
        s.tflags |= T_QUERY;
        push(s, c, false);
        return;
    }
    pct_byte(s, c, s.tflags & T_QUERY != 0);
}

/// The token in progress ends with the body.
#[inline(always)]
fn end_token(s: &mut ConnScan) -> u32 {
    let ev = if s.tok == TOK_TOKEN && s.tok_len > 0 && s.tflags & T_TOK == 0 {
        s.done_hash = s.hash;
        EV_TOKEN
    } else {
        0
    };
    s.tok = TOK_NONE;
    ev
}

/// Takes one byte the server read (when not [`ConnScan::draining`]): a head byte is queued
/// for the matcher, a body byte decoded into the queue. `EV_*` bounds passed.
#[inline(always)]
pub fn take(s: &mut ConnScan, c: u8) -> u32 {
    if is_h2(s) {
        return take_h2(s, c);
    }
    if s.h2.pre < PRE_H2 && preface_byte(s, c) {
        return 0;
    }
    if s.mode == MODE_HEAD {
        if s.head_len >= SCAN_HEAD_MAX {
            s.mode = MODE_OFF;
            return EV_HEAD_BOUND;
        }
        s.head_len += 1;
        if s.tflags & T_LINE1 == 0 {
            line0_byte(s, c);
        } else {
            push(s, c, false);
        }
        return 0;
    }
    if s.mode == MODE_BODY {
        body_byte(s, c);
        s.body_left -= 1;
        s.body_seen += 1;
        if s.body_left == 0 {
            s.body_end = 1;
        } else if s.body_seen >= SCAN_BODY_MAX {
            // A token cut by the bound is not checked: its prefix is not the token.
            s.tok = TOK_NONE;
            s.q_n = 0;
            s.q_lit = 0;
            s.mode = MODE_SKIP;
            return EV_BODY_BOUND;
        }
    }
    0
}

/// One queued byte into the token reader and the matcher (or the end of a body once the queue
/// is empty). `EV_TOKEN` when a token ended (its hash in `done_hash`).
#[inline(always)]
pub fn drain(s: &mut ConnScan, t: &ScanTables, seed: u64) -> u32 {
    if s.q_n == 0 {
        if s.body_end != 0 {
            let ev = end_token(s);
            s.restart();
            return ev;
        }
        return 0;
    }
    let c = s.q[0];
    let lit = s.q_lit & 1 != 0;
    s.q = [s.q[1], s.q[2], s.q[3], 0];
    s.q_lit >>= 1;
    s.q_n -= 1;
    let mut ev = feed(s, t, seed, c, lit);
    if s.mode == MODE_HEAD {
        if c == b'\n' && !lit && s.tflags & T_LINE1 == 0 {
            // The end of the request line; a blank line before it is skipped.
            if s.tflags & T_LINE0 != 0 {
                s.tflags |= T_LINE1;
                s.dec = 0;
                s.blank = 1;
            }
        } else if c == b'\n' && !lit {
            if s.blank != 0 {
                // The end of the head.
                ev |= end_token(s);
                let (te, cl) = (s.flags & F_TE != 0, s.content_length);
                s.restart();
                if !te && cl > 0 {
                    s.mode = MODE_BODY;
                    s.body_left = cl;
                }
            } else {
                s.blank = 1;
            }
        } else if c != b'\r' || lit {
            s.blank = 0;
            s.tflags |= T_LINE0;
        }
    }
    ev
}

/// One byte the server read, all the way ([`take`], then [`drain`] until the queue is empty).
pub fn step(s: &mut ConnScan, t: &ScanTables, seed: u64, c: u8) -> u32 {
    let mut ev = take(s, c);
    while s.draining() {
        ev |= drain(s, t, seed);
    }
    ev
}

/// Whether a request whose session token the kernel knows to belong to the tenant hashed
/// `session_tenant` (`SESSION_TENANTS`) names another tenant in its request line: a tenant
/// value was read and it differs, or several differing values were.
#[inline(always)]
pub fn names_other_tenant(s: &ConnScan, session_tenant: u64) -> bool {
    s.tflags & T_SEEN != 0 && (s.tflags & T_MIXED != 0 || s.tenant != session_tenant)
}

/// The model of the kernel's scan over a whole stream (tests and fuzzing): every token hash
/// that ended, in order, with the state at that point (for [`names_other_tenant`]), and the
/// bound events.
pub fn scan_all(
    s: &mut ConnScan,
    t: &ScanTables,
    seed: u64,
    bytes: &[u8],
    mut out: impl FnMut(u64, &ConnScan),
) -> u32 {
    let mut evs = 0;
    let mut i = 0;
    while i < bytes.len() {
        let k = s.skip((bytes.len() - i) as u64) as usize;
        if k > 0 {
            i += k;
            continue;
        }
        if s.plain_head() && s.fast_head(t, bytes[i]) {
            i += 1;
            continue;
        }
        evs |= take(s, bytes[i]);
        while s.draining() {
            let ev = drain(s, t, seed);
            if ev & EV_TOKEN != 0 {
                out(s.done_hash, s);
            }
            evs |= ev;
        }
        i += 1;
    }
    evs
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{format, string::String, vec, vec::Vec};

    use super::*;
    use crate::token_hash;

    const SEED: u64 = 0x5eed;

    fn tables() -> ScanTables {
        // As `enforce::token_patterns` shapes the agent's patterns for the demo platform.
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
                bytes: b"username=",
                any_case: false,
                kind: PK_TOKEN,
            },
            Pattern {
                bytes: b"\"username\":\"",
                any_case: false,
                kind: PK_TOKEN,
            },
        ])
        .unwrap()
    }

    /// Every token hash the scan finds in `stream`, fed in pieces cut at `cuts`.
    fn hashes(stream: &[u8], cuts: &[usize]) -> (Vec<u64>, u32) {
        let t = tables();
        let mut s = ConnScan::new(1);
        let mut out = Vec::new();
        let mut evs = 0;
        let mut last = 0;
        for &c in cuts.iter().chain([stream.len()].iter()) {
            evs |= scan_all(&mut s, &t, SEED, &stream[last..c], |h, _| out.push(h));
            last = c;
        }
        (out, evs)
    }

    fn found(stream: &[u8], token: &[u8]) -> bool {
        let want = token_hash(SEED, token);
        // Whole, and cut at every byte boundary into two reads.
        let whole = hashes(stream, &[]).0.contains(&want);
        for cut in 1..stream.len() {
            assert_eq!(
                hashes(stream, &[cut]).0.contains(&want),
                whole,
                "cut at {cut} of {:?}",
                String::from_utf8_lossy(stream)
            );
        }
        whole
    }

    fn get(headers: &str) -> Vec<u8> {
        format!("GET /api/me HTTP/1.1\r\nHost: x\r\n{headers}\r\n").into_bytes()
    }

    fn post(ctype: &str, body: &str) -> Vec<u8> {
        format!(
            "POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    fn padding(n: usize) -> String {
        let mut s = String::new();
        let mut i = 0;
        while s.len() < n {
            s.push_str(&format!("X-Pad-{i}: {}\r\n", "a".repeat(90)));
            i += 1;
        }
        s
    }

    /// `restart` resets every field `new` sets, keeping the connection's own ones.
    #[test]
    fn reset_is_new() {
        let mut s = ConnScan::new(7);
        scan_all(
            &mut s,
            &tables(),
            SEED,
            b"GET / HTTP/1.1\r\nCookie: skolsid=abc\r\n",
            |_, _| {},
        );
        s.h2.dyn_mask = 5;
        s.reset(9);
        assert_eq!(s, ConnScan::new(9));
    }

    #[test]
    fn restart_is_new_but_for_the_connection() {
        let mut s = ConnScan::new(7);
        scan_all(
            &mut s,
            &tables(),
            SEED,
            b"POST /login HTTP/1.1\r\nContent-Length: 20\r\nCookie: skolsid=abc\r\n\r\nusername=%41",
            |_, _| {},
        );
        s.done_hash = 42;
        s.h2.dyn_mask = 3;
        assert_ne!(s, ConnScan::new(7));
        s.restart();
        let mut want = ConnScan::new(7);
        want.done_hash = 42;
        want.h2 = s.h2;
        assert_eq!(s, want);
    }

    #[test]
    fn plain_cookie_and_bearer() {
        assert!(found(&get("Cookie: a=1; skolsid=tok123\r\n"), b"tok123"));
        assert!(found(&get("Authorization: Bearer tok123\r\n"), b"tok123"));
        assert!(!found(&get("Cookie: xskolsid2=tok123\r\n"), b"tok1234"));
    }

    #[test]
    fn padded_heads_are_scanned_whole() {
        for n in [6 * 1024, 30 * 1024, 200 * 1024] {
            let req = get(&format!("{}Cookie: skolsid=tok123\r\n", padding(n)));
            let want = token_hash(SEED, b"tok123");
            assert!(hashes(&req, &[]).0.contains(&want), "{n}");
            // Cut into reads the way nginx reads (1 KiB, then 8 KiB buffers).
            let cuts: Vec<usize> = (0..req.len()).step_by(1024).skip(1).collect();
            assert!(hashes(&req, &cuts).0.contains(&want), "{n} in 1 KiB reads");
        }
    }

    #[test]
    fn header_name_case_and_bearer_spacing() {
        assert!(found(&get("cOOKIE: skolsid=tok123\r\n"), b"tok123"));
        assert!(found(&get("authorization: bearer tok123\r\n"), b"tok123"));
        assert!(found(&get("Authorization: BEARER tok123\r\n"), b"tok123"));
        assert!(found(&get("Authorization: Bearer  tok123\r\n"), b"tok123"));
        assert!(found(
            &get("Authorization: Bearer \t tok123\r\n"),
            b"tok123"
        ));
    }

    /// Apache httpd joins a folded header line and passes `_` in header names on: the token
    /// after a fold, and a session header spelled with `_`, are found.
    #[test]
    fn folds_and_underscores_as_apache_reads_them() {
        assert!(found(
            &get("Authorization: Bearer\r\n tok123\r\n"),
            b"tok123"
        ));
        assert!(found(
            &get("Authorization:\r\n\tBearer tok123\r\n"),
            b"tok123"
        ));
        assert!(found(
            &get("Cookie: x=1;\r\n skolsid=tok123\r\n"),
            b"tok123"
        ));
        assert!(found(&get("Cookie: skolsid=\r\n tok123\r\n"), b"tok123"));
        let t = ScanTables::build(&[Pattern {
            bytes: b"\nx-session:",
            any_case: true,
            kind: PK_TOKEN,
        }])
        .unwrap();
        let mut s = ConnScan::new(1);
        let mut out = Vec::new();
        scan_all(&mut s, &t, SEED, &get("X_SESSION: tok123\r\n"), |h, _| {
            out.push(h)
        });
        assert_eq!(out, vec![token_hash(SEED, b"tok123")]);
        // Framing is never read from an `_` spelling (neither server frames by it).
        let req = b"POST /x HTTP/1.1\r\nContent_Length: 5\r\n\r\nGET /y HTTP/1.1\r\nCookie: skolsid=tok123\r\n\r\n";
        assert!(found(req, b"tok123"));
    }

    #[test]
    fn a_token_ends_where_the_server_ends_it() {
        for end in [
            0x1fu8, 0x1c, 0x0b, 0x0c, 0x7f, 0x85, 0xa0, b' ', b'\t', b';', b',',
        ] {
            let mut req = b"GET / HTTP/1.1\r\nCookie: skolsid=tok123".to_vec();
            req.push(end);
            req.extend_from_slice(b"\r\nAuthorization: Bearer bt");
            req.push(end);
            req.extend_from_slice(b"\r\n\r\n");
            assert!(found(&req, b"tok123"), "cookie ended by {end:#x}");
            assert!(found(&req, b"bt"), "bearer ended by {end:#x}");
        }
    }

    #[test]
    fn login_names_are_decoded_as_the_platform_decodes_them() {
        let form = "application/x-www-form-urlencoded";
        assert!(found(&post(form, "username=p12&password=x"), b"p12"));
        assert!(found(&post(form, "username=%70%31%32&password=x"), b"p12"));
        assert!(found(&post(form, "password=x&%75sername=p12"), b"p12"));
        assert!(found(&post(form, "username=anna+maria"), b"anna maria"));
        // An invalid escape stays as it is (Python's unquote).
        assert!(found(&post(form, "username=a%zz"), b"a%zz"));
        let json = "application/json";
        assert!(found(
            &post(json, r#"{"username":"p12","password":"x"}"#),
            b"p12"
        ));
        assert!(found(&post(json, r#"{ "username" : "p12" }"#), b"p12"));
        assert!(found(&post(json, r#"{"\u0075sername":"p12"}"#), b"p12"));
        assert!(found(
            &post(json, r#"{"username":"\u0070\u00312"}"#),
            b"p12"
        ));
        assert!(found(&post(json, r#"{"username":"a\"b"}"#), b"a\"b"));
        assert!(found(
            &post(json, r#"{"username":"bj\u00f6rn"}"#),
            "björn".as_bytes()
        ));
        assert!(found(
            &post(json, r#"{"username":"\ud83d\ude00"}"#),
            "😀".as_bytes()
        ));
        // The body ends the form value; the next request is a head again.
        let mut two = post(form, "username=p12");
        two.extend(get("Cookie: skolsid=tok123\r\n"));
        assert!(found(&two, b"p12"));
        assert!(found(&two, b"tok123"));
    }

    #[test]
    fn bodies_are_not_heads_and_bounds_are_reported() {
        // A body that only looks like a header is decoded, not taken as a cookie line.
        let b = "skolsid=tok123";
        let (h, _) = hashes(&post("text/plain", b), &[]);
        // (The form decoding finds it too: a cookie pattern in a body is matched like any.)
        assert!(h.contains(&token_hash(SEED, b"tok123")));
        // A head past the bound is reported and no longer scanned.
        let huge = get(&format!(
            "{}Cookie: skolsid=tok123\r\n",
            padding(SCAN_HEAD_MAX as usize + 10)
        ));
        let (h, evs) = hashes(&huge, &[]);
        assert!(!h.contains(&token_hash(SEED, b"tok123")));
        assert_eq!(evs & EV_HEAD_BOUND, EV_HEAD_BOUND);
        // A body past its bound is skipped to its end; the next request is scanned.
        let big = "x".repeat(SCAN_BODY_MAX as usize + 100);
        let mut two = post("text/plain", &big);
        two.extend(get("Cookie: skolsid=tok123\r\n"));
        let (h, evs) = hashes(&two, &[700, 9000]);
        assert!(h.contains(&token_hash(SEED, b"tok123")));
        assert_eq!(evs & EV_BODY_BOUND, EV_BODY_BOUND);
    }

    #[test]
    fn chunked_bodies_are_scanned_like_heads() {
        let req =
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 100000\r\n\r\n\
5\r\nhello\r\n0\r\n\r\nGET /y HTTP/1.1\r\nCookie: skolsid=tok123\r\n\r\n";
        assert!(found(req, b"tok123"));
    }

    #[test]
    fn long_tokens_hash_their_first_bytes() {
        let tok = vec![b'A'; 400];
        let mut req = b"GET / HTTP/1.1\r\nAuthorization: Bearer ".to_vec();
        req.extend(&tok);
        req.extend(b"\r\n\r\n");
        assert!(hashes(&req, &[]).0.contains(&token_hash(SEED, &tok)));
    }

    /// The demo's tenant routes: the query route's prefix, its `schoolId` parameter, and the
    /// path route's prefix up to its `{schoolId}` segment.
    fn tenant_tables() -> ScanTables {
        ScanTables::build(&[
            Pattern {
                bytes: b"skolsid=",
                any_case: false,
                kind: PK_TOKEN,
            },
            Pattern {
                bytes: b"/api/addressbook/persons",
                any_case: false,
                kind: PK_ROUTE,
            },
            Pattern {
                bytes: b"schoolId=",
                any_case: false,
                kind: PK_TENANT_QUERY,
            },
            Pattern {
                bytes: b"/api/addressbook/schools/",
                any_case: false,
                kind: PK_TENANT_PATH,
            },
        ])
        .unwrap()
    }

    /// Whether the kernel would stop `req` carrying session `tok123` of school `own`, fed whole
    /// and cut at every byte into two reads (which must agree).
    fn stops(req: &[u8], own: &str) -> bool {
        let t = tenant_tables();
        let tok = token_hash(SEED, b"tok123");
        let own = crate::tenant_hash(SEED, own.as_bytes());
        let run = |cut: usize| {
            let mut s = ConnScan::new(1);
            let mut stop = false;
            let mut seen = false;
            for part in [&req[..cut], &req[cut..]] {
                scan_all(&mut s, &t, SEED, part, |h, cs| {
                    if h == tok {
                        seen = true;
                        stop |= names_other_tenant(cs, own);
                    }
                });
            }
            assert!(
                seen,
                "the session token is found in {:?}",
                String::from_utf8_lossy(req)
            );
            stop
        };
        let whole = run(req.len());
        for cut in 1..req.len() {
            assert_eq!(
                run(cut),
                whole,
                "cut at {cut} of {:?}",
                String::from_utf8_lossy(req)
            );
        }
        whole
    }

    fn line(target: &str) -> Vec<u8> {
        format!("GET {target} HTTP/1.1\r\nHost: x\r\nCookie: skolsid=tok123\r\n\r\n").into_bytes()
    }

    #[test]
    fn a_request_naming_another_school_is_stopped() {
        let q = "/api/addressbook/persons?schoolId=";
        assert!(!stops(&line(&format!("{q}sch-01&page=1")), "sch-01"));
        assert!(stops(&line(&format!("{q}sch-02&page=1")), "sch-01"));
        assert!(stops(&line(&format!("{q}sch-02")), "sch-01"));
        assert!(!stops(
            &line("/api/addressbook/schools/sch-01/persons?page=2"),
            "sch-01"
        ));
        assert!(stops(
            &line("/api/addressbook/schools/sch-02/persons?page=2"),
            "sch-01"
        ));
        assert!(stops(&line("/api/addressbook/schools/sch-02"), "sch-01"));
        // Another route with the same parameter name is not the tenant route.
        assert!(!stops(&line("/api/other?schoolId=sch-02"), "sch-01"));
        // No tenant named: nothing to compare.
        assert!(!stops(&line("/api/addressbook/persons?page=1"), "sch-01"));
        assert!(!stops(&line("/api/me"), "sch-01"));
    }

    #[test]
    fn crafted_tenant_values_are_read_as_the_platform_reads_them() {
        let q = "/api/addressbook/persons?";
        // Escaped: the name, the value, the path.
        assert!(stops(&line(&format!("{q}school%49d=sch-02")), "sch-01"));
        assert!(stops(&line(&format!("{q}schoolId=sch%2D02")), "sch-01"));
        assert!(!stops(&line(&format!("{q}schoolId=sch%2D01")), "sch-01"));
        assert!(stops(
            &line("/api/addressbook/%70ersons?schoolId=sch-02"),
            "sch-01"
        ));
        assert!(stops(
            &line("/api/addressbook/schools/sch%2D02/persons"),
            "sch-01"
        ));
        assert!(stops(
            &line("/api/%61ddressbook/schools/sch-02/persons"),
            "sch-01"
        ));
        // Repeated: any foreign value counts, first or last.
        assert!(stops(
            &line(&format!("{q}schoolId=sch-01&schoolId=sch-02")),
            "sch-01"
        ));
        assert!(stops(
            &line(&format!("{q}schoolId=sch-02&schoolId=sch-01")),
            "sch-01"
        ));
        assert!(!stops(
            &line(&format!("{q}schoolId=sch-01&schoolId=sch-01")),
            "sch-01"
        ));
        // An escaped separator stays inside the value.
        assert!(stops(
            &line(&format!("{q}schoolId=sch-01%26schoolId=sch-02")),
            "sch-01"
        ));
        assert!(stops(
            &line("/api/addressbook/schools/sch-01%2F..%2Fsch-02/persons"),
            "sch-01"
        ));
        // Integers as platforms compare them, and escaped blanks before the value.
        assert!(!stops(&line(&format!("{q}schoolId=007")), "7"));
        assert!(stops(&line(&format!("{q}schoolId=008")), "7"));
        assert!(!stops(&line(&format!("{q}schoolId=%207")), "7"));
        assert!(!stops(&line(&format!("{q}schoolId=+7")), "7"));
        // A blank line before the request line (the servers skip it), two spaces, a fragment.
        let mut r = b"\r\n".to_vec();
        r.extend(line(&format!("{q}schoolId=sch-02")));
        assert!(stops(&r, "sch-01"));
        let two = format!("GET  {q}schoolId=sch-02 HTTP/1.1\r\nCookie: skolsid=tok123\r\n\r\n");
        assert!(stops(two.as_bytes(), "sch-01"));
        assert!(stops(&line(&format!("{q}schoolId=sch-02#x")), "sch-01"));
        // An escaped line break in the request line is not a header line: no framing from it,
        // and the next request is still scanned.
        let mut two = line(&format!(
            "{q}a=%0d%0acontent-length:%2099999&schoolId=sch-01"
        ));
        two.extend(line(&format!("{q}schoolId=sch-02")));
        let t = tenant_tables();
        let mut s = ConnScan::new(1);
        let mut verdicts = Vec::new();
        let own = crate::tenant_hash(SEED, b"sch-01");
        scan_all(&mut s, &t, SEED, &two, |_, cs| {
            verdicts.push(names_other_tenant(cs, own))
        });
        assert_eq!(verdicts, vec![false, true]);
    }

    #[test]
    fn each_request_is_judged_alone() {
        let mut two = line("/api/addressbook/persons?schoolId=sch-02");
        two.extend(line("/api/addressbook/persons?schoolId=sch-01"));
        let t = tenant_tables();
        let own = crate::tenant_hash(SEED, b"sch-01");
        let mut s = ConnScan::new(1);
        let mut verdicts = Vec::new();
        scan_all(&mut s, &t, SEED, &two, |_, cs| {
            verdicts.push(names_other_tenant(cs, own))
        });
        assert_eq!(verdicts, vec![true, false]);
    }
}
