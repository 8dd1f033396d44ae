//! Unique record ids: UUIDv7 (48-bit Unix milliseconds, then a counter and random bits), so
//! receivers can deduplicate and ids sort by time.

use uuid::{timestamp::context::ContextV7, Timestamp, Uuid};

/// One generator of record ids. Ids from the same generator are strictly increasing, also
/// within one millisecond: the v7 counter of [`ContextV7`] (42 bits, reseeded at random each
/// millisecond) orders them, the rest of the 74 random bits keeps them unique. Ids from two
/// generators are only ordered by their millisecond.
pub struct EventIds {
    context: ContextV7,
}

impl Default for EventIds {
    fn default() -> Self {
        Self::new()
    }
}

impl EventIds {
    pub fn new() -> Self {
        EventIds {
            context: ContextV7::new(),
        }
    }

    /// The next id, hyphenated lowercase (`0190b7a2-…-7…-8…`).
    pub fn next_id(&mut self) -> String {
        Uuid::new_v7(Timestamp::now(&self.context))
            .hyphenated()
            .to_string()
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

    #[test]
    fn ids_of_one_generator_strictly_increase() {
        let mut g = super::EventIds::new();
        let mut last = g.next_id();
        for _ in 0..10_000 {
            let id = g.next_id();
            assert!(id > last, "{id} after {last}");
            last = id;
        }
    }

    #[test]
    fn ids_start_with_the_wall_clock_millisecond() {
        let ms = |at: std::time::SystemTime| {
            at.duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64
        };
        let before = ms(std::time::SystemTime::now());
        let id = super::EventIds::new().next_id();
        let after = ms(std::time::SystemTime::now());
        let hex: String = id.chars().filter(|c| *c != '-').take(12).collect();
        let got = u64::from_str_radix(&hex, 16).unwrap();
        assert!(
            (before..=after).contains(&got),
            "{got} not in {before}..={after}"
        );
    }
}
