//! Unique record ids: UUIDv7 (48-bit Unix milliseconds, then random bits), so receivers can
//! deduplicate and ids sort by time.

use std::time::{SystemTime, UNIX_EPOCH};

pub struct EventIds {
    state: u64,
}

impl Default for EventIds {
    fn default() -> Self {
        Self::new()
    }
}

impl EventIds {
    pub fn new() -> Self {
        let mut seed = [0u8; 8];
        if std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
            .is_err()
        {
            let t = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1);
            seed = (t ^ (std::process::id() as u64) << 32).to_le_bytes();
        }
        EventIds {
            state: u64::from_le_bytes(seed) | 1,
        }
    }

    fn rand(&mut self) -> u64 {
        // xorshift64*: ids need uniqueness, not secrecy.
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn next_id(&mut self) -> String {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let (a, b) = (self.rand(), self.rand());
        let hi = (ms << 16) | 0x7000 | (a & 0x0fff);
        let lo = (b & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            hi >> 32,
            (hi >> 16) & 0xffff,
            hi & 0xffff,
            lo >> 48,
            lo & 0xffff_ffff_ffff
        )
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn uuid_v7_shape_and_unique() {
        let mut g = super::EventIds::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let id = g.next_id();
            assert_eq!(id.len(), 36);
            assert_eq!(&id[14..15], "7");
            assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"));
            assert!(seen.insert(id));
        }
    }
}
