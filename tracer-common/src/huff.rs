//! HPACK's Huffman code (RFC 7541, Appendix B) as the kernel's token scan decodes it: a
//! finite-state machine over 4-bit nibbles, built at compile time from the code table, so that
//! decoding a byte is two lookups in a fixed 16 KiB array (no loops, no branches on the code).

/// `(code, length in bits)` of symbols 0..=255 and of EOS (256), RFC 7541 Appendix B.
pub const HUFF_CODES: [(u32, u8); 257] = [
    (0x1ff8, 13),
    (0x7fffd8, 23),
    (0xfffffe2, 28),
    (0xfffffe3, 28),
    (0xfffffe4, 28),
    (0xfffffe5, 28),
    (0xfffffe6, 28),
    (0xfffffe7, 28),
    (0xfffffe8, 28),
    (0xffffea, 24),
    (0x3ffffffc, 30),
    (0xfffffe9, 28),
    (0xfffffea, 28),
    (0x3ffffffd, 30),
    (0xfffffeb, 28),
    (0xfffffec, 28),
    (0xfffffed, 28),
    (0xfffffee, 28),
    (0xfffffef, 28),
    (0xffffff0, 28),
    (0xffffff1, 28),
    (0xffffff2, 28),
    (0x3ffffffe, 30),
    (0xffffff3, 28),
    (0xffffff4, 28),
    (0xffffff5, 28),
    (0xffffff6, 28),
    (0xffffff7, 28),
    (0xffffff8, 28),
    (0xffffff9, 28),
    (0xffffffa, 28),
    (0xffffffb, 28),
    (0x14, 6),
    (0x3f8, 10),
    (0x3f9, 10),
    (0xffa, 12),
    (0x1ff9, 13),
    (0x15, 6),
    (0xf8, 8),
    (0x7fa, 11),
    (0x3fa, 10),
    (0x3fb, 10),
    (0xf9, 8),
    (0x7fb, 11),
    (0xfa, 8),
    (0x16, 6),
    (0x17, 6),
    (0x18, 6),
    (0x0, 5),
    (0x1, 5),
    (0x2, 5),
    (0x19, 6),
    (0x1a, 6),
    (0x1b, 6),
    (0x1c, 6),
    (0x1d, 6),
    (0x1e, 6),
    (0x1f, 6),
    (0x5c, 7),
    (0xfb, 8),
    (0x7ffc, 15),
    (0x20, 6),
    (0xffb, 12),
    (0x3fc, 10),
    (0x1ffa, 13),
    (0x21, 6),
    (0x5d, 7),
    (0x5e, 7),
    (0x5f, 7),
    (0x60, 7),
    (0x61, 7),
    (0x62, 7),
    (0x63, 7),
    (0x64, 7),
    (0x65, 7),
    (0x66, 7),
    (0x67, 7),
    (0x68, 7),
    (0x69, 7),
    (0x6a, 7),
    (0x6b, 7),
    (0x6c, 7),
    (0x6d, 7),
    (0x6e, 7),
    (0x6f, 7),
    (0x70, 7),
    (0x71, 7),
    (0x72, 7),
    (0xfc, 8),
    (0x73, 7),
    (0xfd, 8),
    (0x1ffb, 13),
    (0x7fff0, 19),
    (0x1ffc, 13),
    (0x3ffc, 14),
    (0x22, 6),
    (0x7ffd, 15),
    (0x3, 5),
    (0x23, 6),
    (0x4, 5),
    (0x24, 6),
    (0x5, 5),
    (0x25, 6),
    (0x26, 6),
    (0x27, 6),
    (0x6, 5),
    (0x74, 7),
    (0x75, 7),
    (0x28, 6),
    (0x29, 6),
    (0x2a, 6),
    (0x7, 5),
    (0x2b, 6),
    (0x76, 7),
    (0x2c, 6),
    (0x8, 5),
    (0x9, 5),
    (0x2d, 6),
    (0x77, 7),
    (0x78, 7),
    (0x79, 7),
    (0x7a, 7),
    (0x7b, 7),
    (0x7ffe, 15),
    (0x7fc, 11),
    (0x3ffd, 14),
    (0x1ffd, 13),
    (0xffffffc, 28),
    (0xfffe6, 20),
    (0x3fffd2, 22),
    (0xfffe7, 20),
    (0xfffe8, 20),
    (0x3fffd3, 22),
    (0x3fffd4, 22),
    (0x3fffd5, 22),
    (0x7fffd9, 23),
    (0x3fffd6, 22),
    (0x7fffda, 23),
    (0x7fffdb, 23),
    (0x7fffdc, 23),
    (0x7fffdd, 23),
    (0x7fffde, 23),
    (0xffffeb, 24),
    (0x7fffdf, 23),
    (0xffffec, 24),
    (0xffffed, 24),
    (0x3fffd7, 22),
    (0x7fffe0, 23),
    (0xffffee, 24),
    (0x7fffe1, 23),
    (0x7fffe2, 23),
    (0x7fffe3, 23),
    (0x7fffe4, 23),
    (0x1fffdc, 21),
    (0x3fffd8, 22),
    (0x7fffe5, 23),
    (0x3fffd9, 22),
    (0x7fffe6, 23),
    (0x7fffe7, 23),
    (0xffffef, 24),
    (0x3fffda, 22),
    (0x1fffdd, 21),
    (0xfffe9, 20),
    (0x3fffdb, 22),
    (0x3fffdc, 22),
    (0x7fffe8, 23),
    (0x7fffe9, 23),
    (0x1fffde, 21),
    (0x7fffea, 23),
    (0x3fffdd, 22),
    (0x3fffde, 22),
    (0xfffff0, 24),
    (0x1fffdf, 21),
    (0x3fffdf, 22),
    (0x7fffeb, 23),
    (0x7fffec, 23),
    (0x1fffe0, 21),
    (0x1fffe1, 21),
    (0x3fffe0, 22),
    (0x1fffe2, 21),
    (0x7fffed, 23),
    (0x3fffe1, 22),
    (0x7fffee, 23),
    (0x7fffef, 23),
    (0xfffea, 20),
    (0x3fffe2, 22),
    (0x3fffe3, 22),
    (0x3fffe4, 22),
    (0x7ffff0, 23),
    (0x3fffe5, 22),
    (0x3fffe6, 22),
    (0x7ffff1, 23),
    (0x3ffffe0, 26),
    (0x3ffffe1, 26),
    (0xfffeb, 20),
    (0x7fff1, 19),
    (0x3fffe7, 22),
    (0x7ffff2, 23),
    (0x3fffe8, 22),
    (0x1ffffec, 25),
    (0x3ffffe2, 26),
    (0x3ffffe3, 26),
    (0x3ffffe4, 26),
    (0x7ffffde, 27),
    (0x7ffffdf, 27),
    (0x3ffffe5, 26),
    (0xfffff1, 24),
    (0x1ffffed, 25),
    (0x7fff2, 19),
    (0x1fffe3, 21),
    (0x3ffffe6, 26),
    (0x7ffffe0, 27),
    (0x7ffffe1, 27),
    (0x3ffffe7, 26),
    (0x7ffffe2, 27),
    (0xfffff2, 24),
    (0x1fffe4, 21),
    (0x1fffe5, 21),
    (0x3ffffe8, 26),
    (0x3ffffe9, 26),
    (0xffffffd, 28),
    (0x7ffffe3, 27),
    (0x7ffffe4, 27),
    (0x7ffffe5, 27),
    (0xfffec, 20),
    (0xfffff3, 24),
    (0xfffed, 20),
    (0x1fffe6, 21),
    (0x3fffe9, 22),
    (0x1fffe7, 21),
    (0x1fffe8, 21),
    (0x7ffff3, 23),
    (0x3fffea, 22),
    (0x3fffeb, 22),
    (0x1ffffee, 25),
    (0x1ffffef, 25),
    (0xfffff4, 24),
    (0xfffff5, 24),
    (0x3ffffea, 26),
    (0x7ffff4, 23),
    (0x3ffffeb, 26),
    (0x7ffffe6, 27),
    (0x3ffffec, 26),
    (0x3ffffed, 26),
    (0x7ffffe7, 27),
    (0x7ffffe8, 27),
    (0x7ffffe9, 27),
    (0x7ffffea, 27),
    (0x7ffffeb, 27),
    (0xffffffe, 28),
    (0x7ffffec, 27),
    (0x7ffffed, 27),
    (0x7ffffee, 27),
    (0x7ffffef, 27),
    (0x7fffff0, 27),
    (0x3ffffee, 26),
    (0x3fffffff, 30),
];

/// Bits of a [`HUFF_FSM`] entry: the next state (an internal node of the code's tree, the root
/// being 0), a symbol to emit, and a failure (EOS or an impossible path).
pub const HF_STATE: u32 = 0xff;
pub const HF_EMIT: u32 = 1 << 8;
pub const HF_FAIL: u32 = 1 << 9;
pub const HF_SYM_SHIFT: u32 = 16;

const NONE: u16 = u16::MAX;

/// The code's tree: `child[node][bit]` is an internal node (< 256) or a leaf (256 + symbol).
const fn tree() -> [[u16; 2]; 256] {
    let mut child = [[NONE; 2]; 256];
    let mut next: u16 = 1;
    let mut sym = 0;
    while sym < 257 {
        let (code, len) = HUFF_CODES[sym];
        let mut node = 0usize;
        let mut i = 0;
        while i < len {
            let bit = ((code >> (len - 1 - i)) & 1) as usize;
            if i == len - 1 {
                child[node][bit] = 256 + sym as u16;
            } else {
                if child[node][bit] == NONE {
                    child[node][bit] = next;
                    next += 1;
                }
                node = child[node][bit] as usize;
            }
            i += 1;
        }
        sym += 1;
    }
    child
}

/// Entry `state * 16 + nibble`: where the nibble leads from `state` (a symbol completes at most
/// once per nibble: the shortest code is 5 bits).
const fn fsm() -> [u32; 4096] {
    let child = tree();
    let mut t = [0u32; 4096];
    let mut st = 0;
    while st < 256 {
        let mut nib = 0;
        while nib < 16 {
            let mut node = st;
            let mut out = 0u32;
            let mut b = 0;
            while b < 4 {
                let bit = (nib >> (3 - b)) & 1;
                let c = child[node][bit];
                if c == NONE || c == 256 + 256 {
                    out |= HF_FAIL;
                    node = 0;
                    break;
                }
                if c >= 256 {
                    out |= HF_EMIT | (((c - 256) as u32) << HF_SYM_SHIFT);
                    node = 0;
                } else {
                    node = c as usize;
                }
                b += 1;
            }
            t[st * 16 + nib] = out | node as u32;
            nib += 1;
        }
        st += 1;
    }
    t
}

/// The nibble machine (see the module docs).
pub static HUFF_FSM: [u32; 4096] = fsm();

/// Decodes one byte of a Huffman-coded string from `state`: the new state and up to two
/// symbols (`None` where none completed); `None` overall on a failure.
#[inline(always)]
pub fn huff_byte(state: u8, c: u8) -> (u8, [Option<u8>; 2], bool) {
    let a = HUFF_FSM[((state as usize) << 4 | (c >> 4) as usize) & 4095];
    let b = HUFF_FSM[((a & HF_STATE) as usize) << 4 | (c & 0xf) as usize & 4095];
    let sym = |e: u32| (e & HF_EMIT != 0).then_some((e >> HF_SYM_SHIFT) as u8);
    (
        (b & HF_STATE) as u8,
        [sym(a), sym(b)],
        (a | b) & HF_FAIL != 0,
    )
}

#[cfg(test)]
pub(crate) mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    /// Huffman-codes `s` (padding with EOS's leading ones); the HTTP/2 scan's tests use it too.
    pub(crate) fn encode(s: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let (mut acc, mut n) = (0u64, 0u32);
        for &c in s {
            let (code, len) = HUFF_CODES[c as usize];
            acc = acc << len | code as u64;
            n += len as u32;
            while n >= 8 {
                out.push((acc >> (n - 8)) as u8);
                n -= 8;
            }
        }
        if n > 0 {
            out.push(((acc << (8 - n)) | (0xff >> n)) as u8);
        }
        out
    }

    fn decode(b: &[u8]) -> Option<Vec<u8>> {
        let mut st = 0u8;
        let mut out = Vec::new();
        for &c in b {
            let (s, syms, fail) = huff_byte(st, c);
            if fail {
                return None;
            }
            out.extend(syms.iter().flatten());
            st = s;
        }
        Some(out)
    }

    #[test]
    fn every_byte_value_round_trips() {
        let all: Vec<u8> = (0..=255u8).collect();
        assert_eq!(decode(&encode(&all)).unwrap(), all);
        let s = b"skolsid=4f1c2a9e0b7d4e21a3c5; theme=dark";
        assert_eq!(decode(&encode(s)).unwrap(), s);
        // RFC 7541 C.4.1: "www.example.com".
        assert_eq!(
            encode(b"www.example.com"),
            [0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff]
        );
    }

    #[test]
    fn eos_inside_a_string_fails() {
        // 30 ones: EOS.
        assert!(decode(&[0xff, 0xff, 0xff, 0xfc]).is_none());
    }
}
