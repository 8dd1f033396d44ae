//! The agent's own counters: named `<noun>_<verb>_total`, a drop always with its reason. Printed
//! periodically and at exit, and written as JSON to the state directory for operators and tests.

use std::{collections::BTreeMap, sync::Mutex};

#[derive(Default)]
pub struct Stats {
    counters: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    pub fn add(&self, name: &str, n: u64) {
        let mut m = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        match m.get_mut(name) {
            Some(v) => *v += n,
            None => {
                m.insert(name.to_string(), n);
            }
        }
    }

    pub fn add_reason(&self, name: &str, reason: &str, n: u64) {
        self.add(&format!("{name}{{reason=\"{reason}\"}}"), n);
    }

    pub fn set(&self, name: &str, v: u64) {
        let mut m = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        m.insert(name.to_string(), v);
    }

    pub fn get(&self, name: &str) -> u64 {
        let m = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        m.get(name).copied().unwrap_or(0)
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
