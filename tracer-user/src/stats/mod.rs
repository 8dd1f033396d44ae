//! The agent's own counters: named `<noun>_<verb>_total`, a drop always with its reason. Printed
//! periodically and at exit, and written as JSON to the state directory for operators and tests.
//! Every metric is a [`Metric`] of the one table in `names.rs`; labels are added to its name as
//! `name{label="value"}`, values written as given (not escaped).

mod names;

use std::{collections::BTreeMap, sync::Mutex};

pub use names::{Kind, Metric};

impl AsRef<str> for Metric {
    fn as_ref(&self) -> &str {
        self.name()
    }
}

impl Metric {
    /// This metric with one label: its key `name{label="value"}`.
    pub fn label(self, label: &'static str, value: &str) -> Key {
        Key(self.name().to_string()).label(label, value)
    }
}

/// A metric with its labels, as it is stored: `name{a="x",b="y"}`. Built once where a hot
/// path or several labels call for it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(String);

impl Key {
    /// Adds one more label, after those already there.
    pub fn label(mut self, label: &'static str, value: &str) -> Key {
        if self.0.ends_with('}') {
            self.0.pop();
            self.0.push(',');
        } else {
            self.0.push('{');
        }
        self.0.push_str(label);
        self.0.push_str("=\"");
        self.0.push_str(value);
        self.0.push_str("\"}");
        self
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<Metric> for Key {
    fn from(m: Metric) -> Key {
        Key(m.name().to_string())
    }
}

impl AsRef<str> for Key {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

fn labeled(m: Metric, label: &str, value: &str) -> String {
    format!("{}{{{label}=\"{value}\"}}", m.name())
}

#[derive(Default)]
pub struct Stats {
    counters: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    fn bump(&self, key: &str, n: u64) {
        let mut m = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        match m.get_mut(key) {
            Some(v) => *v += n,
            None => {
                m.insert(key.to_string(), n);
            }
        }
    }

    fn put(&self, key: &str, v: u64) {
        let mut m = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        m.insert(key.to_string(), v);
    }

    pub fn add(&self, m: Metric, n: u64) {
        self.bump(m.name(), n);
    }

    /// Adds to `m{reason="..."}`.
    pub fn add_reason(&self, m: Metric, reason: &str, n: u64) {
        self.add_label(m, "reason", reason, n);
    }

    /// Adds to `m{label="value"}`.
    pub fn add_label(&self, m: Metric, label: &'static str, value: &str, n: u64) {
        self.bump(&labeled(m, label, value), n);
    }

    /// Adds to a metric with its labels.
    pub fn add_key(&self, k: &Key, n: u64) {
        self.bump(&k.0, n);
    }

    pub fn set(&self, m: Metric, v: u64) {
        self.put(m.name(), v);
    }

    /// Sets a metric with its labels.
    pub fn set_key(&self, k: &Key, v: u64) {
        self.put(&k.0, v);
    }

    /// The value under a key: a [`Metric`], a [`Key`], or a key as written in `stats.json`.
    pub fn get(&self, key: impl AsRef<str>) -> u64 {
        let m = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        m.get(key.as_ref()).copied().unwrap_or(0)
    }

    /// The value of `m{reason="..."}`.
    pub fn get_reason(&self, m: Metric, reason: &str) -> u64 {
        self.get_label(m, "reason", reason)
    }

    /// The value of `m{label="value"}`.
    pub fn get_label(&self, m: Metric, label: &'static str, value: &str) -> u64 {
        self.get(labeled(m, label, value))
    }

    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Is this counter a loss (something dropped, cut or not captured)?
pub fn is_loss(name: &str) -> bool {
    name.contains("_dropped_total")
        || name.contains("_lost_total")
        || name.contains("reason=\"cap\"")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Names kept from before the `<noun>_<verb>_total` rule: they are in operators' dashboards
    /// and the end-to-end tests, so they stay as they are.
    const ONE_WORD_COUNTERS: [&str; 2] = ["alerts_total", "disclosures_total"];

    #[test]
    fn names_follow_the_rule() {
        for m in Metric::ALL {
            let n = m.name();
            let words: Vec<&str> = n.split('_').collect();
            assert!(
                words
                    .iter()
                    .all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase())),
                "{m:?}: {n} is not lowercase snake_case"
            );
            match m.kind() {
                Kind::Counter => {
                    assert_eq!(
                        words.last(),
                        Some(&"total"),
                        "{m:?}: a counter ends in _total"
                    );
                    assert!(
                        words.len() >= 3 || ONE_WORD_COUNTERS.contains(&n),
                        "{m:?}: {n} is not <noun>_<verb>_total"
                    );
                }
                Kind::Gauge => assert!(!n.ends_with("_total"), "{m:?}: a gauge ends in _total"),
            }
            assert_eq!(Kind::of(n), m.kind(), "{m:?}");
            assert_eq!(Metric::from_name(n), Some(*m));
        }
    }

    #[test]
    fn names_are_unique_and_every_help_is_written() {
        let mut seen = BTreeSet::new();
        for m in Metric::ALL {
            assert!(seen.insert(m.name()), "{} twice", m.name());
            let h = m.help();
            assert!(!h.trim().is_empty(), "{m:?} has no HELP");
            assert!(h.ends_with('.') && !h.contains('\n'), "{m:?}: {h:?}");
        }
        assert_eq!(seen.len(), Metric::ALL.len());
    }

    #[test]
    fn stored_keys_are_name_and_labels() {
        let s = Stats::default();
        s.add(Metric::ExchangesParsed, 2);
        s.add(Metric::ExchangesParsed, 3);
        s.add_reason(Metric::ConnectionsClosed, "process_exit", 1);
        s.add_label(Metric::ExchangesMatched, "route", "GET /a/{id}", 4);
        s.add_key(
            &Metric::RecordsDropped
                .label("reason", "spool_full")
                .label("sink", "siem")
                .label("stream", "access"),
            5,
        );
        s.set(Metric::SessionsKnown, 7);
        s.set(Metric::SessionsKnown, 6);
        s.set_key(
            &Metric::SinkLagRecords
                .label("sink", "file")
                .label("stream", "access"),
            8,
        );
        let want: BTreeMap<String, u64> = [
            ("exchanges_parsed_total", 5),
            ("connections_closed_total{reason=\"process_exit\"}", 1),
            ("exchanges_matched_total{route=\"GET /a/{id}\"}", 4),
            (
                "records_dropped_total{reason=\"spool_full\",sink=\"siem\",stream=\"access\"}",
                5,
            ),
            ("sessions_known", 6),
            ("sink_lag_records{sink=\"file\",stream=\"access\"}", 8),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(s.snapshot(), want);
        assert_eq!(s.get(Metric::ExchangesParsed), 5);
        assert_eq!(s.get("exchanges_parsed_total"), 5);
        assert_eq!(s.get_reason(Metric::ConnectionsClosed, "process_exit"), 1);
        assert_eq!(s.get_reason(Metric::ConnectionsClosed, "idle_expired"), 0);
        assert_eq!(
            s.get_label(Metric::ExchangesMatched, "route", "GET /a/{id}"),
            4
        );
        assert_eq!(
            Metric::Alerts.label("rule", "enum").as_str(),
            "alerts_total{rule=\"enum\"}"
        );
        assert_eq!(Key::from(Metric::SessionsKnown).as_str(), "sessions_known");
    }
}
