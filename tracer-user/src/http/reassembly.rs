//! Puts one direction of one connection back into byte order: the kernel hands over chunks tagged
//! with their stream position, possibly out of order, duplicated, or missing, and the HTTP parser
//! needs one ordered sequence of data and holes in which every position appears exactly once.
//!
//! A [`Stream`] starts at the first position it is given (a connection may be picked up in the
//! middle) unless built with [`Stream::with_start`]. Data that overlaps what was already
//! delivered or is already held is trimmed, first arrival wins. Data past the next expected
//! position is held until the gap before it fills; when the held data exceeds
//! [`StreamLimits`], the gap is declared lost and delivered as `Hole { known: false }` so that
//! delivery can go on. Every byte given to the stream ends up in exactly one counter of
//! [`StreamStats`].

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;

/// How much out-of-order data one direction may hold while it waits for a gap to fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// Data bytes held past a gap (default 1 MiB).
    pub max_pending_bytes: usize,
    /// Segments (data or known holes) held past a gap (default 256).
    pub max_pending_segments: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            max_pending_bytes: 1 << 20,
            max_pending_segments: 256,
        }
    }
}

/// One in-order piece of the stream. Consecutive pieces are contiguous: each starts where the
/// previous one ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Data {
        pos: u64,
        ts_ns: u64,
        bytes: Bytes,
    },
    /// `[pos, pos + len)` is missing. `known`: the bytes exist but were deliberately not
    /// captured (capture cap, sendfile); otherwise they were lost (ring-buffer loss, or never
    /// arrived before the pending limits or the end of the stream). `ts_ns` is an upper bound of
    /// the time the missing bytes went over the wire: the hole's own timestamp for a known hole,
    /// the timestamp of the first byte after it for an unknown one.
    Hole {
        pos: u64,
        len: u64,
        ts_ns: u64,
        known: bool,
    },
}

impl Piece {
    pub fn pos(&self) -> u64 {
        match self {
            Piece::Data { pos, .. } | Piece::Hole { pos, .. } => *pos,
        }
    }

    pub fn len(&self) -> u64 {
        match self {
            Piece::Data { bytes, .. } => bytes.len() as u64,
            Piece::Hole { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn ts_ns(&self) -> u64 {
        match self {
            Piece::Data { ts_ns, .. } | Piece::Hole { ts_ns, .. } => *ts_ns,
        }
    }
}

/// Counters of one direction. Every byte pushed lands in exactly one of `bytes_delivered`,
/// `bytes_in_holes_known`, `bytes_overlap`, `bytes_pending` (still held); `bytes_lost` counts
/// positions declared lost, for which no byte was ever pushed in time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Data bytes handed to the consumer.
    pub bytes_delivered: u64,
    /// Bytes of known holes handed to the consumer.
    pub bytes_in_holes_known: u64,
    /// Bytes of unknown holes handed to the consumer (never captured or arrived too late).
    pub bytes_lost: u64,
    /// Data or hole bytes dropped because their positions were already delivered, declared
    /// lost, or held (duplicates, overlaps, data arriving after its gap was given up on, data
    /// before the stream's first position).
    pub bytes_overlap: u64,
    /// Pushes that arrived ahead of the next expected position and had to be held.
    pub segments_reordered: u64,
    /// Unknown holes declared (pending limits exceeded, or `flush_all`).
    pub gaps_declared: u64,
    /// Data bytes currently held out of order, or in order but not yet taken.
    pub bytes_pending: u64,
}

#[derive(Debug)]
enum Seg {
    Data { ts_ns: u64, bytes: Bytes },
    Hole { len: u64, ts_ns: u64 },
}

impl Seg {
    fn len(&self) -> u64 {
        match self {
            Seg::Data { bytes, .. } => bytes.len() as u64,
            Seg::Hole { len, .. } => *len,
        }
    }

    fn ts_ns(&self) -> u64 {
        match self {
            Seg::Data { ts_ns, .. } | Seg::Hole { ts_ns, .. } => *ts_ns,
        }
    }
}

/// One direction of one connection, reassembled by byte position.
#[derive(Debug)]
pub struct Stream {
    limits: StreamLimits,
    /// Next position to hand out; `None` until the first push.
    next: Option<u64>,
    /// Held segments, keyed by position: all at or after `next`, none overlapping.
    pending: BTreeMap<u64, Seg>,
    pending_bytes: usize,
    /// In-order pieces not yet taken by the consumer.
    ready: VecDeque<Piece>,
    ready_bytes: usize,
    stats: StreamStats,
}

impl Stream {
    pub fn new(limits: StreamLimits) -> Self {
        Stream {
            limits,
            next: None,
            pending: BTreeMap::new(),
            pending_bytes: 0,
            ready: VecDeque::new(),
            ready_bytes: 0,
            stats: StreamStats::default(),
        }
    }

    /// A stream whose first position is known in advance: data arriving out of order before
    /// the first chunk is not mistaken for data before the start.
    pub fn with_start(limits: StreamLimits, start: u64) -> Self {
        let mut s = Stream::new(limits);
        s.next = Some(start);
        s
    }

    pub fn push_data(&mut self, pos: u64, ts_ns: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        // Positions past u64::MAX do not exist: drop what would lie there, counted.
        let room = u64::MAX - pos;
        let data = if (data.len() as u64) > room {
            self.stats.bytes_overlap += data.len() as u64 - room;
            &data[..room as usize]
        } else {
            data
        };
        if data.is_empty() {
            return;
        }
        self.insert(pos, data.len() as u64, ts_ns, Some(data));
    }

    /// Bytes `[pos, pos + len)` exist but were not captured (known hole, e.g. cap or sendfile).
    pub fn push_hole(&mut self, pos: u64, len: u64, ts_ns: u64) {
        let len = len.min(u64::MAX - pos);
        if len == 0 {
            return;
        }
        self.insert(pos, len, ts_ns, None);
    }

    /// Next in-order piece, if any.
    pub fn next_piece(&mut self) -> Option<Piece> {
        let p = self.ready.pop_front()?;
        match &p {
            Piece::Data { bytes, .. } => {
                self.ready_bytes -= bytes.len();
                self.stats.bytes_delivered += bytes.len() as u64;
            }
            Piece::Hole { len, known, .. } => {
                if *known {
                    self.stats.bytes_in_holes_known += len;
                } else {
                    self.stats.bytes_lost += len;
                }
            }
        }
        Some(p)
    }

    /// At connection close: every gap before held data is declared lost, and everything held
    /// becomes ready.
    pub fn flush_all(&mut self) {
        while let Some((&first, _)) = self.pending.iter().next() {
            self.declare_gap_until(first);
            self.drain();
        }
    }

    /// At connection close, knowing the position after the stream's last byte: like
    /// `flush_all`, and the range from the last byte seen to `end` is declared lost too
    /// (stamped `ts_ns`). A stream that saw nothing and has no known start stays empty.
    pub fn flush_until(&mut self, end: u64, ts_ns: u64) {
        self.flush_all();
        if let Some(next) = self.next {
            if end > next {
                self.stats.gaps_declared += 1;
                self.ready.push_back(Piece::Hole {
                    pos: next,
                    len: end - next,
                    ts_ns,
                    known: false,
                });
                self.next = Some(end);
            }
        }
    }

    pub fn stats(&self) -> StreamStats {
        let mut s = self.stats;
        s.bytes_pending = (self.pending_bytes + self.ready_bytes) as u64;
        s
    }

    /// Data bytes ready in order but not yet taken by `next_piece`.
    pub fn ready_bytes(&self) -> usize {
        self.ready_bytes
    }

    /// Data bytes held out of order.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }

    /// The position after the last byte made ready (`None` before the first push).
    pub fn next_pos(&self) -> Option<u64> {
        self.next
    }

    fn insert(&mut self, pos: u64, len: u64, ts_ns: u64, data: Option<&[u8]>) {
        let next = *self.next.get_or_insert(pos);
        let end = pos + len;
        if end <= next {
            self.stats.bytes_overlap += len;
            return;
        }
        let start = pos.max(next);
        self.stats.bytes_overlap += start - pos;

        // The parts of [start, end) not covered by held segments. Held segments never overlap
        // one another, so one pass from the segment starting before `start` finds them all.
        let mut free: Vec<(u64, u64)> = Vec::new();
        let mut cursor = start;
        if let Some((&s, seg)) = self.pending.range(..start).next_back() {
            cursor = cursor.max((s + seg.len()).min(end));
        }
        for (&s, seg) in self.pending.range(start..end) {
            if s > cursor {
                free.push((cursor, s));
            }
            cursor = cursor.max((s + seg.len()).min(end));
        }
        if cursor < end {
            free.push((cursor, end));
        }
        let kept: u64 = free.iter().map(|(a, b)| b - a).sum();
        self.stats.bytes_overlap += (end - start) - kept;
        if free.first().is_some_and(|&(a, _)| a > next) {
            self.stats.segments_reordered += 1;
        }

        for (a, b) in free {
            let seg = match data {
                Some(d) => {
                    let lo = (a - pos) as usize;
                    let hi = (b - pos) as usize;
                    self.pending_bytes += hi - lo;
                    Seg::Data {
                        ts_ns,
                        bytes: Bytes::copy_from_slice(&d[lo..hi]),
                    }
                }
                None => Seg::Hole { len: b - a, ts_ns },
            };
            self.pending.insert(a, seg);
        }
        self.drain();
        self.enforce_limits();
    }

    /// Move held segments that start at `next` to the ready queue.
    fn drain(&mut self) {
        while let Some(entry) = self.pending.first_entry() {
            let Some(next) = self.next else { return };
            if *entry.key() != next {
                return;
            }
            let (pos, seg) = entry.remove_entry();
            self.next = Some(pos + seg.len());
            match seg {
                Seg::Data { ts_ns, bytes } => {
                    self.pending_bytes -= bytes.len();
                    self.ready_bytes += bytes.len();
                    self.ready.push_back(Piece::Data { pos, ts_ns, bytes });
                }
                Seg::Hole { len, ts_ns } => self.ready.push_back(Piece::Hole {
                    pos,
                    len,
                    ts_ns,
                    known: true,
                }),
            }
        }
    }

    fn enforce_limits(&mut self) {
        while self.pending_bytes > self.limits.max_pending_bytes
            || self.pending.len() > self.limits.max_pending_segments
        {
            let Some((&first, _)) = self.pending.iter().next() else {
                return;
            };
            self.declare_gap_until(first);
            self.drain();
        }
    }

    /// Declare `[next, until)` lost. `until` is the position of the first held segment.
    fn declare_gap_until(&mut self, until: u64) {
        let Some(next) = self.next else { return };
        if until <= next {
            return;
        }
        let ts_ns = self.pending.get(&until).map_or(0, Seg::ts_ns);
        self.stats.gaps_declared += 1;
        self.ready.push_back(Piece::Hole {
            pos: next,
            len: until - next,
            ts_ns,
            known: false,
        });
        self.next = Some(until);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(s: &mut Stream) -> Vec<Piece> {
        std::iter::from_fn(|| s.next_piece()).collect()
    }

    fn data(pos: u64, ts: u64, b: &[u8]) -> Piece {
        Piece::Data {
            pos,
            ts_ns: ts,
            bytes: Bytes::copy_from_slice(b),
        }
    }

    /// Concatenate data and render holes as '?' (known) or '!' (lost) to compare easily.
    fn render(pieces: &[Piece]) -> String {
        let mut out = String::new();
        let mut expect: Option<u64> = None;
        for p in pieces {
            if let Some(e) = expect {
                assert_eq!(p.pos(), e, "pieces must be contiguous");
            }
            expect = Some(p.pos() + p.len());
            match p {
                Piece::Data { bytes, .. } => out.push_str(std::str::from_utf8(bytes).unwrap()),
                Piece::Hole { len, known, .. } => {
                    for _ in 0..*len {
                        out.push(if *known { '?' } else { '!' });
                    }
                }
            }
        }
        out
    }

    #[test]
    fn in_order_passes_through() {
        let mut s = Stream::new(StreamLimits::default());
        s.push_data(100, 1, b"hello ");
        s.push_data(106, 2, b"world");
        assert_eq!(
            drain(&mut s),
            vec![data(100, 1, b"hello "), data(106, 2, b"world")]
        );
        let st = s.stats();
        assert_eq!(st.bytes_delivered, 11);
        assert_eq!(st.segments_reordered, 0);
        assert_eq!(st.bytes_pending, 0);
    }

    #[test]
    fn out_of_order_is_held_until_gap_fills() {
        let mut s = Stream::new(StreamLimits::default());
        s.push_data(0, 1, b"ab");
        s.push_data(4, 3, b"ef");
        assert_eq!(render(&drain(&mut s)), "ab");
        assert_eq!(s.pending_bytes(), 2);
        s.push_data(2, 2, b"cd");
        assert_eq!(render(&drain(&mut s)), "cdef");
        assert_eq!(s.stats().segments_reordered, 1);
        assert_eq!(s.stats().bytes_delivered, 6);
    }

    #[test]
    fn duplicates_and_overlaps_are_trimmed_and_counted() {
        let mut s = Stream::new(StreamLimits::default());
        s.push_data(0, 1, b"abcd");
        s.push_data(2, 1, b"cdef"); // 2 old, 2 new
        s.push_data(0, 1, b"ab"); // all old
        s.push_data(10, 1, b"kl");
        s.push_data(8, 1, b"ijklmn"); // overlaps the held "kl" in the middle
        s.push_data(6, 1, b"gh");
        assert_eq!(render(&drain(&mut s)), "abcdefghijklmn");
        let st = s.stats();
        assert_eq!(st.bytes_overlap, 2 + 2 + 2);
        assert_eq!(st.bytes_delivered, 14);
    }

    #[test]
    fn first_push_sets_start_and_earlier_bytes_are_dropped() {
        let mut s = Stream::new(StreamLimits::default());
        s.push_data(50, 1, b"xyz");
        s.push_data(45, 1, b"abcdefg"); // 45..52: 5 before start, 2 duplicates
        assert_eq!(render(&drain(&mut s)), "xyz");
        assert_eq!(s.stats().bytes_overlap, 7);
    }

    #[test]
    fn with_start_waits_for_the_first_bytes() {
        let mut s = Stream::with_start(StreamLimits::default(), 0);
        s.push_data(3, 1, b"def");
        assert!(drain(&mut s).is_empty());
        s.push_data(0, 1, b"abc");
        assert_eq!(render(&drain(&mut s)), "abcdef");
    }

    #[test]
    fn known_holes_are_delivered_in_place() {
        let mut s = Stream::new(StreamLimits::default());
        s.push_data(0, 1, b"ab");
        s.push_hole(5, 3, 2);
        s.push_data(2, 1, b"cde");
        s.push_data(8, 3, b"ij");
        let p = drain(&mut s);
        assert_eq!(render(&p), "abcde???ij");
        assert!(matches!(
            p[2],
            Piece::Hole {
                pos: 5,
                len: 3,
                ts_ns: 2,
                known: true
            }
        ));
        assert_eq!(s.stats().bytes_in_holes_known, 3);
    }

    #[test]
    fn pending_byte_limit_declares_unknown_gap() {
        let mut s = Stream::new(StreamLimits {
            max_pending_bytes: 4,
            max_pending_segments: 100,
        });
        s.push_data(0, 1, b"ab");
        s.push_data(4, 5, b"ef");
        s.push_data(6, 6, b"gh");
        assert_eq!(render(&drain(&mut s)), "ab");
        s.push_data(8, 7, b"i"); // 5 bytes held > 4
        let p = drain(&mut s);
        assert_eq!(render(&p), "!!efghi");
        // The lost range is stamped with the time of the first byte after it.
        assert!(matches!(
            p[0],
            Piece::Hole {
                pos: 2,
                len: 2,
                ts_ns: 5,
                known: false
            }
        ));
        // The late bytes are counted, not delivered.
        s.push_data(2, 9, b"cd");
        assert!(drain(&mut s).is_empty());
        let st = s.stats();
        assert_eq!(st.bytes_lost, 2);
        assert_eq!(st.bytes_overlap, 2);
        assert_eq!(st.gaps_declared, 1);
    }

    #[test]
    fn pending_segment_limit_declares_unknown_gap() {
        let mut s = Stream::new(StreamLimits {
            max_pending_bytes: 1000,
            max_pending_segments: 2,
        });
        s.push_data(0, 1, b"a");
        s.push_data(2, 1, b"c");
        s.push_data(4, 1, b"e");
        assert_eq!(render(&drain(&mut s)), "a");
        s.push_data(6, 1, b"g");
        assert_eq!(render(&drain(&mut s)), "!c");
    }

    #[test]
    fn flush_all_declares_remaining_gaps() {
        let mut s = Stream::new(StreamLimits::default());
        s.push_data(0, 1, b"a");
        s.push_data(3, 1, b"d");
        s.push_hole(6, 2, 1);
        s.flush_all();
        assert_eq!(render(&drain(&mut s)), "a!!d!!??");
        let st = s.stats();
        assert_eq!(st.bytes_lost, 4);
        assert_eq!(st.bytes_in_holes_known, 2);
        assert_eq!(st.gaps_declared, 2);
    }

    #[test]
    fn flush_until_declares_the_lost_tail() {
        let mut s = Stream::with_start(StreamLimits::default(), 0);
        s.push_data(0, 1, b"ab");
        s.push_data(4, 1, b"e");
        s.flush_until(8, 9);
        let p = drain(&mut s);
        assert_eq!(render(&p), "ab!!e!!!");
        assert!(matches!(
            p[3],
            Piece::Hole {
                pos: 5,
                len: 3,
                ts_ns: 9,
                known: false
            }
        ));
        assert_eq!(s.stats().bytes_lost, 5);
        let mut s = Stream::new(StreamLimits::default());
        s.flush_until(8, 9);
        assert!(drain(&mut s).is_empty());
    }

    #[test]
    fn hole_overlapping_data_is_trimmed() {
        let mut s = Stream::new(StreamLimits::default());
        s.push_data(0, 1, b"abcd");
        s.push_hole(2, 4, 1); // 2 overlap, 2 new
        s.push_data(4, 1, b"efgh"); // 2 overlap the hole
        assert_eq!(render(&drain(&mut s)), "abcd??gh");
        assert_eq!(s.stats().bytes_overlap, 4);
    }

    #[test]
    fn positions_near_u64_max_do_not_overflow() {
        let mut s = Stream::new(StreamLimits::default());
        s.push_data(u64::MAX - 2, 1, b"abcdef");
        s.push_hole(u64::MAX - 1, 10, 1);
        assert_eq!(render(&drain(&mut s)), "ab");
        assert_eq!(s.stats().bytes_overlap, 4 + 1);
    }

    #[test]
    fn empty_pushes_are_ignored() {
        let mut s = Stream::new(StreamLimits::default());
        s.push_data(10, 1, b"");
        s.push_hole(10, 0, 1);
        s.push_data(0, 1, b"a");
        assert_eq!(render(&drain(&mut s)), "a");
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Whatever the order and overlap of pushes, the output is contiguous, never
            /// repeats a position, matches the source bytes wherever it has data, and every
            /// pushed byte is counted exactly once.
            #[test]
            fn any_push_order_is_consistent(
                src in proptest::collection::vec(any::<u8>(), 1..200),
                cuts in proptest::collection::vec((0usize..200, 1usize..40), 1..30),
                limit in 1usize..64,
            ) {
                let mut s = Stream::with_start(
                    StreamLimits { max_pending_bytes: limit, max_pending_segments: 8 }, 0);
                let mut pushed = 0u64;
                let mut out = Vec::new();
                for (start, len) in cuts {
                    let start = start % src.len();
                    let end = (start + len).min(src.len());
                    s.push_data(start as u64, 1, &src[start..end]);
                    pushed += (end - start) as u64;
                    out.extend(std::iter::from_fn(|| s.next_piece()));
                }
                s.flush_all();
                out.extend(std::iter::from_fn(|| s.next_piece()));
                let mut pos = 0u64;
                for p in &out {
                    prop_assert_eq!(p.pos(), pos);
                    if let Piece::Data { bytes, .. } = p {
                        prop_assert_eq!(&bytes[..], &src[pos as usize..pos as usize + bytes.len()]);
                    }
                    pos += p.len();
                }
                let st = s.stats();
                prop_assert_eq!(st.bytes_delivered + st.bytes_overlap + st.bytes_pending, pushed);
                prop_assert_eq!(st.bytes_pending, 0);
            }
        }
    }
}
