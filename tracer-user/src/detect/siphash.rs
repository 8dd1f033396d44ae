//! SipHash-2-4 with a secret key: where a person or an id lands in a detector's sketch. The
//! sketches count distinct values by the bit patterns of their hashes; with a public hash a
//! caller can choose the values it reads so that tens of thousands look like a few hundred. With
//! the agent's secret key (see `Keyer::subkey`) nobody can predict the patterns. SipHash is a
//! keyed pseudo-random function made for exactly this (hash flooding), and it is fast: a
//! 1000-person page costs microseconds.

/// A 128-bit SipHash key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SipKey {
    k0: u64,
    k1: u64,
}

impl std::fmt::Debug for SipKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A secret: never printed.
        f.write_str("SipKey(..)")
    }
}

impl SipKey {
    pub fn new(key: [u8; 16]) -> SipKey {
        let (a, b) = key.split_at(8);
        SipKey {
            k0: u64::from_le_bytes(a.try_into().unwrap_or_default()),
            k1: u64::from_le_bytes(b.try_into().unwrap_or_default()),
        }
    }

    /// A key drawn from the process's random source (for a detector that was not given the
    /// agent's key: never a public constant).
    pub fn random() -> SipKey {
        use std::hash::BuildHasher;
        let r = std::collections::hash_map::RandomState::new();
        SipKey {
            k0: r.hash_one(0_u64),
            k1: r.hash_one(1_u64),
        }
    }

    /// SipHash-2-4 of `msg`.
    pub fn hash(&self, msg: &[u8]) -> u64 {
        let mut v = [
            self.k0 ^ 0x736f_6d65_7073_6575,
            self.k1 ^ 0x646f_7261_6e64_6f6d,
            self.k0 ^ 0x6c79_6765_6e65_7261,
            self.k1 ^ 0x7465_6462_7974_6573,
        ];
        let mut chunks = msg.chunks_exact(8);
        for c in &mut chunks {
            let m = u64::from_le_bytes(c.try_into().unwrap_or_default());
            v[3] ^= m;
            round(&mut v);
            round(&mut v);
            v[0] ^= m;
        }
        let mut last = [0u8; 8];
        let tail = chunks.remainder();
        last[..tail.len()].copy_from_slice(tail);
        let m = u64::from_le_bytes(last) | ((msg.len() as u64) << 56);
        v[3] ^= m;
        round(&mut v);
        round(&mut v);
        v[0] ^= m;
        v[2] ^= 0xff;
        for _ in 0..4 {
            round(&mut v);
        }
        v[0] ^ v[1] ^ v[2] ^ v[3]
    }
}

#[inline]
fn round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13);
    v[1] ^= v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16);
    v[3] ^= v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21);
    v[3] ^= v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17);
    v[1] ^= v[2];
    v[2] = v[2].rotate_left(32);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference_key() -> SipKey {
        let mut k = [0u8; 16];
        for (i, b) in k.iter_mut().enumerate() {
            *b = i as u8;
        }
        SipKey::new(k)
    }

    /// The test vectors of the SipHash paper (Aumasson and Bernstein, appendix A) and its
    /// reference implementation's `vectors.h`.
    #[test]
    fn matches_the_reference_vectors() {
        let k = reference_key();
        let msg: Vec<u8> = (0u8..64).collect();
        assert_eq!(k.hash(&msg[..0]), 0x726f_db47_dd0e_0e31);
        assert_eq!(k.hash(&msg[..1]), 0x74f8_39c5_93dc_67fd);
        assert_eq!(k.hash(&msg[..15]), 0xa129_ca61_49be_45e5);
        assert_eq!(k.hash(&msg[..63]), 0x958a_324c_eb06_4572);
    }

    #[test]
    fn the_key_changes_everything() {
        let a = SipKey::new([1; 16]);
        let b = SipKey::new([2; 16]);
        assert_ne!(a.hash(b"12"), b.hash(b"12"));
        assert_eq!(a.hash(b"12"), SipKey::new([1; 16]).hash(b"12"));
        assert_ne!(SipKey::random(), SipKey::random());
        assert_eq!(format!("{a:?}"), "SipKey(..)");
    }
}
