//! The detectors: per-user (or per-session, per-address, per-tenant) state over sliding windows,
//! fed one attributed access at a time, firing alerts when a rule's threshold is crossed. Pure:
//! time comes with each access (so tests and replays can compress days), nothing here touches
//! the kernel or the disk.
//!
//! # Not gamed
//! Distinct persons and ids are hashed with a key derived from the agent's secret
//! ([`siphash`]), so nobody can choose values that crowd a sketch's registers. Id walks count
//! in any order (a new id near one asked for before, or distinct ids per window). Callers the
//! platform never accepted (no user, no session that ever got a success: 401 floods with random
//! cookies) are tracked by client address in a bounded table of their own, so noise never
//! evicts an authenticated key. Answers the agent could not read count as unreadable, not as
//! zero persons; anomalies are counted like any other metric.
//!
//! # Memory
//! Each tracked key holds, per rule that applies to it, a fixed-size state: 16 counting buckets
//! (64 bytes) for counts and ratios, 8 buckets of a 256-register HyperLogLog (2 KiB) for distinct
//! persons, the last 64 ids (1 KiB, plus 2 KiB with `distinct_limit`) for id walks, at most 16
//! tenants for cross-tenant spans; plus the key's own evidence ring (16 event ids) and a
//! 256-register sketch of every person it was disclosed. Keys idle past `idle_expiry` are
//! forgotten; past `max_tracked` (`max_tracked_unauthenticated` for the unauthenticated table)
//! the least recently active tenth is evicted, counted.

pub mod decide;
pub mod siphash;

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
};

use serde::{Deserialize, Serialize};

use self::siphash::SipKey;
use crate::{
    config::{By, DetectionConfig, Metric, Rule, RuleKind},
    stats::{Metric as StatMetric, Stats},
};

/// Why saved detector state was refused (the detectors then start empty).
#[derive(Debug, thiserror::Error)]
pub enum DetectorStateError {
    #[error("not detector state ({0}); remove the file to start the detectors empty")]
    Json(#[from] serde_json::Error),
    #[error("corrupt detector state: {0}; remove the file to start the detectors empty")]
    Corrupt(&'static str),
}

/// What a restore brought back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// Keys (authenticated and unauthenticated) whose windows came back.
    pub keys: usize,
    /// Distinct-count sketches started over because they were made with another key (or by a
    /// version that hashed without one): mixing them would count persons twice.
    pub sketches_reset: usize,
}

/// What the detectors need of one attributed access.
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub event_id: String,
    /// Wall-clock ms of the request.
    pub ts_ms: u64,
    pub service: String,
    pub route: Option<String>,
    pub has_disclosure: bool,
    pub status: Option<u16>,
    pub user: Option<String>,
    pub role: Option<String>,
    pub tenant: Option<String>,
    pub session: Option<String>,
    pub client_ip: Option<IpAddr>,
    /// Every data subject disclosed.
    pub subjects: Vec<String>,
    pub cross_tenant: bool,
    /// The request named another tenant than the caller's in its route's tenant parameter.
    pub cross_tenant_attempt: bool,
    pub target_tenants: Vec<String>,
    /// The answer was a disclosure the agent could not read (its persons are unknown).
    pub unreadable: bool,
    /// The access's anomaly names (the record's anomaly list, the parser's anomalies).
    pub anomalies: Vec<String>,
    pub params: std::collections::BTreeMap<String, String>,
    pub query: std::collections::BTreeMap<String, Vec<String>>,
}

impl Access {
    /// The who, whose and where of a recorded exchange, taken apart (the rest left empty).
    pub fn from_parts(
        a: Option<crate::attribute::attribution::Attribution>,
        d: Option<crate::attribute::disclosure::Disclosure>,
        route: Option<crate::attribute::routes::RouteMatch>,
    ) -> Access {
        let mut x = Access::default();
        if let Some(a) = a {
            (x.user, x.role, x.tenant, x.session, x.client_ip) =
                (a.user_id, a.role, a.tenant, a.session_id, a.client_ip);
        }
        if let Some(d) = d {
            x.unreadable = d.status == crate::attribute::disclosure::Status::Unreadable;
            x.subjects = d.ids;
            x.target_tenants = d.tenants.into_iter().collect();
        }
        if let Some(m) = route {
            (x.route, x.params, x.query) = (Some(m.name), m.params, m.query);
        }
        x
    }
}

/// One detector firing.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub rule_index: usize,
    pub rule_id: String,
    pub rule_name: String,
    pub ts_ms: u64,
    pub by: By,
    /// The value of the key the rule adds up by (user id, session hash, address, tenant).
    pub key: String,
    pub metric: &'static str,
    pub value: f64,
    pub threshold: f64,
    pub window_s: Option<u64>,
    pub user: Option<String>,
    pub role: Option<String>,
    pub tenant: Option<String>,
    pub session: Option<String>,
    pub client_ip: Option<IpAddr>,
    /// The most recent contributing access event ids (the triggering one last).
    pub evidence: Vec<String>,
    pub persons_disclosed: u64,
    pub distinct_persons: u64,
    /// Answers to this key the agent could not read (their persons are unknown), so far.
    pub unreadable_answers: u64,
    /// Tenants other than the caller's whose persons were disclosed (cross-tenant rules); when
    /// the caller's tenant is unknown, the tenants its answers spanned.
    pub foreign_tenants: Vec<String>,
    /// The triggering access's anomalies that the rule counts (anomaly rules).
    pub anomalies: Vec<String>,
    pub shadow: bool,
}

const BUCKETS: usize = 16;
const HLL_BUCKETS: usize = 8;
const HLL_M: usize = 256;
const EVIDENCE: usize = 16;
/// Ids an id-walk state remembers (the most recent in its window).
const RECENT_IDS: usize = 64;
/// Tenants a cross-tenant span remembers per key.
const SPAN_TENANTS: usize = 16;
/// A rule that fired does not fire again for the same key for this long (or its window).
const COOLDOWN_MS: u64 = 60_000;
/// The saved state's format.
const STATE_VERSION: u32 = 2;

/// A HyperLogLog sketch with 256 registers (standard error about 6.5%; small counts are
/// near-exact through linear counting).
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq, Debug)]
pub struct Hll(#[serde(with = "serde_bytes_vec")] Vec<u8>);

mod serde_bytes_vec {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::attribute::attribution::hex(v))
    }
    /// Exactly `HLL_M` registers in hex, or an error (never a panic: the file may be corrupt).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let t = String::deserialize(d)?;
        if t.len() != 2 * super::HLL_M || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(serde::de::Error::custom(format!(
                "a sketch must be {} hex digits",
                2 * super::HLL_M
            )));
        }
        (0..t.len() / 2)
            .map(|i| u8::from_str_radix(&t[2 * i..2 * i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(serde::de::Error::custom)
    }
}

impl Default for Hll {
    fn default() -> Self {
        Hll(vec![0; HLL_M])
    }
}

impl Hll {
    pub fn add(&mut self, h: u64) {
        let idx = (h >> 56) as usize;
        let rest = (h << 8) | 0xff;
        let rank = rest.leading_zeros() as u8 + 1;
        if self.0[idx] < rank {
            self.0[idx] = rank;
        }
    }

    pub fn merge(&mut self, o: &Hll) {
        for (a, b) in self.0.iter_mut().zip(&o.0) {
            *a = (*a).max(*b);
        }
    }

    pub fn clear(&mut self) {
        self.0.iter_mut().for_each(|r| *r = 0);
    }

    pub fn count(&self) -> u64 {
        let m = HLL_M as f64;
        let zeros = self.0.iter().filter(|&&r| r == 0).count();
        let sum: f64 = self.0.iter().map(|&r| 2f64.powi(-(r as i32))).sum();
        let alpha = 0.7213 / (1.0 + 1.079 / m);
        let e = alpha * m * m / sum;
        if e <= 2.5 * m && zeros > 0 {
            (m * (m / zeros as f64).ln()).round() as u64
        } else {
            e.round() as u64
        }
    }
}

/// Counts in `BUCKETS` time buckets covering one window.
#[derive(Clone, Serialize, Deserialize, Default, Debug)]
struct Buckets {
    counts: Vec<u64>,
    /// Index (ms / bucket width) of the newest bucket.
    head: u64,
}

impl Buckets {
    fn advance(&mut self, slot: u64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS];
            self.head = slot;
        }
        if slot <= self.head {
            return;
        }
        let steps = (slot - self.head).min(BUCKETS as u64);
        for i in 1..=steps {
            let idx = ((self.head + i) % BUCKETS as u64) as usize;
            self.counts[idx] = 0;
        }
        self.head = slot;
    }

    fn add(&mut self, slot: u64, n: u64) {
        self.advance(slot);
        // An access older than the newest bucket (out of order) still counts in its bucket, if
        // the window still holds it.
        if slot + (BUCKETS as u64) > self.head {
            let idx = (slot % BUCKETS as u64) as usize;
            self.counts[idx] += n;
        }
    }

    fn sum(&self) -> u64 {
        self.counts.iter().fold(0u64, |a, b| a.saturating_add(*b))
    }

    fn valid(&self) -> bool {
        self.counts.is_empty() || self.counts.len() == BUCKETS
    }
}

#[derive(Clone, Serialize, Deserialize, Default, Debug)]
struct HllBuckets {
    sketches: Vec<Hll>,
    head: u64,
}

impl HllBuckets {
    fn add(&mut self, slot: u64, h: u64) {
        if self.sketches.is_empty() {
            self.sketches = vec![Hll::default(); HLL_BUCKETS];
            self.head = slot;
        }
        if slot > self.head {
            let steps = (slot - self.head).min(HLL_BUCKETS as u64);
            for i in 1..=steps {
                self.sketches[((self.head + i) % HLL_BUCKETS as u64) as usize].clear();
            }
            self.head = slot;
        }
        if slot + (HLL_BUCKETS as u64) > self.head {
            self.sketches[(slot % HLL_BUCKETS as u64) as usize].add(h);
        }
    }

    fn count(&self) -> u64 {
        let mut all = Hll::default();
        for s in &self.sketches {
            all.merge(s);
        }
        all.count()
    }

    fn valid(&self) -> bool {
        self.sketches.is_empty() || self.sketches.len() == HLL_BUCKETS
    }
}

#[derive(Clone, Serialize, Deserialize, Debug)]
enum RuleState {
    Count(Buckets),
    Distinct(HllBuckets),
    Ratio {
        errors: Buckets,
        total: Buckets,
    },
    /// An id walk: times of steps to a new id near one asked for before, the recent ids (with
    /// the time each was last asked for), and the distinct ids per window (`distinct_limit`).
    Sequence {
        hits: VecDeque<u64>,
        #[serde(default)]
        recent: VecDeque<(i64, u64)>,
        #[serde(default)]
        distinct: Option<HllBuckets>,
    },
    /// The tenants one key's answers spanned while its own tenant was unknown.
    Span {
        tenants: Vec<String>,
    },
    None,
}

impl RuleState {
    /// Checks a restored state's shape; trims what may be longer than the detectors keep.
    fn repair(&mut self) -> Result<(), &'static str> {
        match self {
            RuleState::Count(b) if !b.valid() => Err("counting buckets of the wrong length"),
            RuleState::Ratio { errors, total } if !errors.valid() || !total.valid() => {
                Err("ratio buckets of the wrong length")
            }
            RuleState::Distinct(h) if !h.valid() => {
                Err("distinct-count buckets of the wrong length")
            }
            RuleState::Sequence {
                hits,
                recent,
                distinct,
            } => {
                if distinct.as_ref().is_some_and(|d| !d.valid()) {
                    return Err("distinct-id buckets of the wrong length");
                }
                while recent.len() > RECENT_IDS {
                    recent.pop_front();
                }
                while hits.len() > 1 << 20 {
                    hits.pop_front();
                }
                Ok(())
            }
            RuleState::Span { tenants } => {
                tenants.truncate(SPAN_TENANTS);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Starts over the sketches hashed with the (old) key; returns how many.
    fn reset_sketches(&mut self) -> usize {
        match self {
            RuleState::Distinct(h) if !h.sketches.is_empty() => {
                *h = HllBuckets::default();
                1
            }
            RuleState::Sequence {
                distinct: Some(d), ..
            } => {
                *d = HllBuckets::default();
                1
            }
            _ => 0,
        }
    }
}

#[derive(Clone, Serialize, Deserialize, Debug)]
struct KeyState {
    last_ms: u64,
    /// Per rule id: its state and the time until which it does not fire again.
    rules: Vec<(String, RuleState, u64)>,
    evidence: VecDeque<String>,
    persons: u64,
    distinct: Hll,
    #[serde(default)]
    unreadable: u64,
}

impl KeyState {
    fn new() -> Self {
        KeyState {
            last_ms: 0,
            rules: Vec::new(),
            evidence: VecDeque::new(),
            persons: 0,
            distinct: Hll::default(),
            unreadable: 0,
        }
    }

    fn repair(&mut self) -> Result<(), &'static str> {
        while self.evidence.len() > EVIDENCE {
            self.evidence.pop_front();
        }
        for (_, st, _) in &mut self.rules {
            st.repair()?;
        }
        Ok(())
    }

    fn reset_sketches(&mut self) -> usize {
        self.distinct.clear();
        self.rules
            .iter_mut()
            .map(|(_, st, _)| st.reset_sketches())
            .sum::<usize>()
    }
}

fn fresh_state(rule: &Rule) -> RuleState {
    match &rule.kind {
        RuleKind::Rate {
            metric: Metric::DistinctPersons,
            ..
        } => RuleState::Distinct(HllBuckets::default()),
        RuleKind::Rate { .. } => RuleState::Count(Buckets::default()),
        RuleKind::ErrorRatio { .. } => RuleState::Ratio {
            errors: Buckets::default(),
            total: Buckets::default(),
        },
        RuleKind::SequentialIds { .. } => RuleState::Sequence {
            hits: VecDeque::new(),
            recent: VecDeque::new(),
            distinct: None,
        },
        RuleKind::Anomaly { .. } => RuleState::Count(Buckets::default()),
        RuleKind::CrossTenant => RuleState::Span {
            tenants: Vec::new(),
        },
        RuleKind::QueryAbove { .. } => RuleState::None,
    }
}

/// Does a (restored) state belong to this rule's kind?
fn fits(rule: &Rule, st: &RuleState) -> bool {
    std::mem::discriminant(&fresh_state(rule)) == std::mem::discriminant(st)
}

fn key_of(by: By, a: &Access) -> Option<String> {
    match by {
        // An unknown user is tracked by session, so an anonymous harvester is still seen.
        By::User => a
            .user
            .as_ref()
            .map(|u| format!("user:{u}"))
            .or_else(|| a.session.as_ref().map(|s| format!("session:{s}"))),
        By::Session => a.session.as_ref().map(|s| format!("session:{s}")),
        By::ClientIp => a.client_ip.map(|ip| format!("client_ip:{ip}")),
        By::Tenant => a.tenant.as_ref().map(|t| format!("tenant:{t}")),
    }
}

/// The key of a call the platform never accepted: its client address (a session hash only
/// when the address is unknown).
fn unauthenticated_key(by: By, a: &Access) -> Option<String> {
    match by {
        By::Tenant => key_of(by, a),
        _ => a
            .client_ip
            .map(|ip| format!("client_ip:{ip}"))
            .or_else(|| key_of(by, a)),
    }
}

/// Did the platform accept this call's caller: a known user, or a success (2xx, 3xx)?
fn accepted(a: &Access) -> bool {
    a.user.is_some() || a.status.is_some_and(|s| (200..400).contains(&s))
}

/// What fired, and the tenants it names.
struct Fired {
    metric: &'static str,
    value: f64,
    threshold: f64,
    tenants: Option<Vec<String>>,
    anomalies: Vec<String>,
}

impl Fired {
    fn new(metric: &'static str, value: f64, threshold: f64) -> Fired {
        Fired {
            metric,
            value,
            threshold,
            tenants: None,
            anomalies: Vec::new(),
        }
    }
}

/// The detector state as saved in the state directory.
#[derive(Serialize, Deserialize)]
struct Saved {
    version: u32,
    /// A check value of the sketch key (SipHash of a constant: reveals nothing of the key),
    /// so sketches made with another key are not mixed with new ones.
    key_check: String,
    keys: HashMap<String, KeyState>,
    #[serde(default)]
    unauthenticated: HashMap<String, KeyState>,
}

/// The detector state of every tracked key.
pub struct Detector {
    rules: Vec<Rule>,
    cfg: Option<DetectionConfig>,
    /// The key of every distinct-count hash.
    key: SipKey,
    /// Keys of callers the platform accepted.
    keys: HashMap<String, KeyState>,
    /// Callers it never accepted, by client address, bounded on their own.
    unauthenticated: HashMap<String, KeyState>,
}

impl Default for Detector {
    fn default() -> Self {
        Detector {
            rules: Vec::new(),
            cfg: None,
            key: SipKey::random(),
            keys: HashMap::new(),
            unauthenticated: HashMap::new(),
        }
    }
}

impl Detector {
    /// A detector whose sketches are keyed with a random key until [`set_key`] gives it the
    /// agent's own (which survives restarts, as the saved sketches must).
    pub fn new(cfg: DetectionConfig, rules: Vec<Rule>) -> Detector {
        Detector {
            rules,
            cfg: Some(cfg),
            ..Detector::default()
        }
    }

    /// Keys the distinct counts with the agent's secret (`Keyer::subkey`). Set it before
    /// [`restore`]; sketches counted with another key start over.
    pub fn set_key(&mut self, key: [u8; 16]) {
        let k = SipKey::new(key);
        if k != self.key {
            for s in self
                .keys
                .values_mut()
                .chain(self.unauthenticated.values_mut())
            {
                s.reset_sketches();
            }
        }
        self.key = k;
    }

    fn key_check(&self) -> String {
        format!("{:016x}", self.key.hash(b"sparbar detector key check"))
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Keys of accepted callers tracked now.
    pub fn tracked(&self) -> usize {
        self.keys.len()
    }

    /// Unauthenticated callers (by address) tracked now.
    pub fn tracked_unauthenticated(&self) -> usize {
        self.unauthenticated.len()
    }

    fn cfg(&self) -> &DetectionConfig {
        self.cfg.as_ref().expect("detector built with new()")
    }

    /// Is this access watched at all (its service, the allowlists)?
    pub fn watches(&self, a: &Access) -> bool {
        let c = self.cfg();
        if !c.services.is_empty() && !c.services.contains(&a.service) {
            return false;
        }
        if a.user.as_ref().is_some_and(|u| c.allow_users.contains(u))
            || a.role.as_ref().is_some_and(|r| c.allow_roles.contains(r))
            || a.client_ip
                .is_some_and(|ip| c.allow_clients.iter().any(|n| n.contains(ip)))
        {
            return false;
        }
        true
    }

    /// Feeds one access; returns the alerts it triggers.
    pub fn observe(&mut self, a: &Access, stats: &Stats) -> Vec<Alert> {
        if !self.watches(a) {
            stats.add(StatMetric::DetectorAccessesSkipped, 1);
            return Vec::new();
        }
        stats.add(StatMetric::DetectorAccesses, 1);
        let mut alerts = Vec::new();
        let route = a.route.as_deref().unwrap_or("");
        let sip = self.key;
        let subject_hashes: Vec<u64> = a.subjects.iter().map(|s| sip.hash(s.as_bytes())).collect();
        let ok = a.status.is_some_and(|s| (200..300).contains(&s));
        let err = a.status.is_some_and(|s| (400..500).contains(&s));
        let accepted = accepted(a);
        for (ri, rule) in self.rules.iter().enumerate() {
            if !rule.matches_route(route, a.has_disclosure) {
                continue;
            }
            // A caller the platform accepted (now, or ever: its key is tracked) counts under its
            // own key; one it never accepted under its address, in a table of its own.
            let own = key_of(rule.by, a);
            let (table, key) = match own {
                Some(k) if accepted || self.keys.contains_key(&k) => (&mut self.keys, k),
                own => match unauthenticated_key(rule.by, a).or(own) {
                    Some(k) => (&mut self.unauthenticated, k),
                    None => continue,
                },
            };
            let ks = table.entry(key.clone()).or_insert_with(KeyState::new);
            ks.last_ms = ks.last_ms.max(a.ts_ms);
            if ks.evidence.back() != Some(&a.event_id) {
                ks.evidence.push_back(a.event_id.clone());
                if ks.evidence.len() > EVIDENCE {
                    ks.evidence.pop_front();
                }
                ks.persons += a.subjects.len() as u64;
                ks.unreadable += a.unreadable as u64;
                for h in &subject_hashes {
                    ks.distinct.add(*h);
                }
            }
            let pos = match ks.rules.iter().position(|(id, _, _)| *id == rule.id) {
                Some(p) if fits(rule, &ks.rules[p].1) => p,
                Some(p) => {
                    ks.rules[p].1 = fresh_state(rule);
                    p
                }
                None => {
                    ks.rules.push((rule.id.clone(), fresh_state(rule), 0));
                    ks.rules.len() - 1
                }
            };
            let (_, st, cooldown) = &mut ks.rules[pos];
            let fired: Option<Fired> = match (&rule.kind, st) {
                (
                    RuleKind::Rate {
                        metric,
                        window,
                        limit,
                        role_limits,
                    },
                    st,
                ) => {
                    let limit = a
                        .role
                        .as_ref()
                        .and_then(|r| role_limits.get(r))
                        .copied()
                        .unwrap_or(*limit);
                    let width = (window.as_millis() as u64 / BUCKETS as u64).max(1);
                    let value = match st {
                        RuleState::Distinct(h) => {
                            let w = (window.as_millis() as u64 / HLL_BUCKETS as u64).max(1);
                            for x in &subject_hashes {
                                h.add(a.ts_ms / w, *x);
                            }
                            h.count()
                        }
                        RuleState::Count(b) => {
                            let n = match metric {
                                Metric::Requests => 1,
                                Metric::Persons => a.subjects.len() as u64,
                                Metric::Errors => err as u64,
                                Metric::UnreadableAnswers => a.unreadable as u64,
                                Metric::DistinctPersons => 0,
                            };
                            b.add(a.ts_ms / width, n);
                            b.sum()
                        }
                        _ => 0,
                    };
                    (value > limit).then(|| Fired::new(metric.as_str(), value as f64, limit as f64))
                }
                (RuleKind::CrossTenant, RuleState::Span { tenants }) => {
                    // An attempt counts whatever the answer (it may be refused, or never leave).
                    if (ok && a.cross_tenant) || a.cross_tenant_attempt {
                        Some(Fired::new(
                            "foreign_tenants",
                            a.target_tenants
                                .iter()
                                .filter(|t| Some(*t) != a.tenant.as_ref())
                                .count()
                                .max(usize::from(a.cross_tenant_attempt))
                                as f64,
                            0.0,
                        ))
                    } else if ok && a.tenant.is_none() && !a.target_tenants.is_empty() {
                        // The caller's school is unknown (it never called an identity
                        // endpoint): answers that span several schools are the same pattern.
                        for t in &a.target_tenants {
                            if !tenants.contains(t) && tenants.len() < SPAN_TENANTS {
                                tenants.push(t.clone());
                            }
                        }
                        (tenants.len() >= 2).then(|| Fired {
                            tenants: Some(tenants.clone()),
                            ..Fired::new("tenants_spanned", tenants.len() as f64, 1.0)
                        })
                    } else {
                        None
                    }
                }
                (RuleKind::QueryAbove { param, limit }, _) => a
                    .query
                    .get(param)
                    .and_then(|v| v.iter().filter_map(|x| x.trim().parse::<u64>().ok()).max())
                    .filter(|v| v > limit)
                    .map(|v| Fired::new("query_value", v as f64, *limit as f64)),
                (
                    RuleKind::SequentialIds {
                        param,
                        window,
                        limit,
                        max_gap,
                        distinct_limit,
                    },
                    RuleState::Sequence {
                        hits,
                        recent,
                        distinct,
                    },
                ) => {
                    let w = window.as_millis() as u64;
                    let from = a.ts_ms.saturating_sub(w);
                    while recent.front().is_some_and(|&(_, t)| t < from) {
                        recent.pop_front();
                    }
                    let raw = a.params.get(param).filter(|v| !v.is_empty());
                    let mut distinct_ids = None;
                    if let (Some(v), Some(dl)) = (raw, distinct_limit) {
                        let h = distinct.get_or_insert_with(HllBuckets::default);
                        h.add(
                            a.ts_ms / (w / HLL_BUCKETS as u64).max(1),
                            sip.hash(v.as_bytes()),
                        );
                        distinct_ids = Some((h.count(), *dl));
                    }
                    if let Some(id) = raw.and_then(|v| v.parse::<i64>().ok()) {
                        match recent.iter().position(|&(x, _)| x == id) {
                            // Asked for again: no step, but it stays recent.
                            Some(p) => {
                                recent.remove(p);
                            }
                            None => {
                                if recent.iter().any(|&(x, _)| x.abs_diff(id) <= *max_gap) {
                                    hits.push_back(a.ts_ms);
                                }
                            }
                        }
                        recent.push_back((id, a.ts_ms));
                        if recent.len() > RECENT_IDS {
                            recent.pop_front();
                        }
                    }
                    while hits.front().is_some_and(|&t| t < from) {
                        hits.pop_front();
                    }
                    while hits.len() as u64 > limit + 1 {
                        hits.pop_front();
                    }
                    if hits.len() as u64 > *limit {
                        Some(Fired::new(
                            "sequential_ids",
                            hits.len() as f64,
                            *limit as f64,
                        ))
                    } else {
                        distinct_ids
                            .filter(|(n, dl)| n > dl)
                            .map(|(n, dl)| Fired::new("distinct_ids", n as f64, dl as f64))
                    }
                }
                (
                    RuleKind::ErrorRatio {
                        window,
                        ratio,
                        min_requests,
                    },
                    RuleState::Ratio { errors, total },
                ) => {
                    let width = (window.as_millis() as u64 / BUCKETS as u64).max(1);
                    errors.add(a.ts_ms / width, err as u64);
                    total.add(a.ts_ms / width, 1);
                    let (e, t) = (errors.sum(), total.sum());
                    let r = e as f64 / t.max(1) as f64;
                    (t >= *min_requests && r >= *ratio)
                        .then(|| Fired::new("error_ratio", r, *ratio))
                }
                (
                    RuleKind::Anomaly {
                        names,
                        window,
                        limit,
                    },
                    RuleState::Count(b),
                ) => {
                    // Matched by name: any anomaly a module reports, now or later.
                    let seen: Vec<String> = a
                        .anomalies
                        .iter()
                        .filter(|x| names.iter().any(|n| n == "*" || n == *x))
                        .cloned()
                        .collect();
                    let width = (window.as_millis() as u64 / BUCKETS as u64).max(1);
                    b.add(a.ts_ms / width, !seen.is_empty() as u64);
                    let n = b.sum();
                    (!seen.is_empty() && n > *limit).then(|| Fired {
                        anomalies: seen,
                        ..Fired::new("anomalies", n as f64, *limit as f64)
                    })
                }
                _ => None,
            };
            if let Some(f) = fired {
                if a.ts_ms < *cooldown {
                    continue;
                }
                let cd = rule
                    .window()
                    .map(|w| w.as_millis() as u64)
                    .unwrap_or(COOLDOWN_MS)
                    .min(COOLDOWN_MS);
                *cooldown = a.ts_ms + cd;
                stats.add_label(StatMetric::Alerts, "rule", &rule.id, 1);
                alerts.push(Alert {
                    rule_index: ri,
                    rule_id: rule.id.clone(),
                    rule_name: rule.name.clone(),
                    ts_ms: a.ts_ms,
                    by: rule.by,
                    key: key.split_once(':').map(|x| x.1).unwrap_or(&key).to_string(),
                    metric: f.metric,
                    value: f.value,
                    threshold: f.threshold,
                    window_s: rule.window().map(|w| w.as_secs()),
                    user: a.user.clone(),
                    role: a.role.clone(),
                    tenant: a.tenant.clone(),
                    session: a.session.clone(),
                    client_ip: a.client_ip,
                    evidence: ks.evidence.iter().cloned().collect(),
                    persons_disclosed: ks.persons,
                    distinct_persons: ks.distinct.count(),
                    unreadable_answers: ks.unreadable,
                    foreign_tenants: f.tenants.unwrap_or_else(|| {
                        a.target_tenants
                            .iter()
                            .filter(|t| Some(*t) != a.tenant.as_ref())
                            .cloned()
                            .collect()
                    }),
                    anomalies: f.anomalies,
                    shadow: rule.shadow || rule.block.is_empty(),
                });
            }
        }
        self.bound(stats);
        alerts
    }

    /// Forgets keys idle past `idle_expiry` (relative to `now_ms`).
    pub fn expire(&mut self, now_ms: u64, stats: &Stats) {
        let idle = self.cfg().idle_expiry.as_millis() as u64;
        let before = self.keys.len() + self.unauthenticated.len();
        self.keys
            .retain(|_, k| now_ms.saturating_sub(k.last_ms) <= idle);
        self.unauthenticated
            .retain(|_, k| now_ms.saturating_sub(k.last_ms) <= idle);
        let n = before - self.keys.len() - self.unauthenticated.len();
        if n > 0 {
            stats.add_reason(StatMetric::DetectorKeysEvicted, "idle", n as u64);
        }
    }

    fn bound(&mut self, stats: &Stats) {
        let (max, max_unauth) = (
            self.cfg().max_tracked,
            self.cfg().max_tracked_unauthenticated,
        );
        let n = crate::statefile::evict_oldest(&mut self.keys, max, |k| k.last_ms);
        if n > 0 {
            stats.add_reason(StatMetric::DetectorKeysEvicted, "budget", n as u64);
        }
        let n =
            crate::statefile::evict_oldest(&mut self.unauthenticated, max_unauth, |k| k.last_ms);
        if n > 0 {
            stats.add_reason(
                StatMetric::DetectorKeysEvicted,
                "unauthenticated_budget",
                n as u64,
            );
        }
    }

    /// The state as JSON (for the state directory: long windows survive restarts).
    pub fn to_json(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct SavedRef<'a> {
            version: u32,
            key_check: String,
            keys: &'a HashMap<String, KeyState>,
            unauthenticated: &'a HashMap<String, KeyState>,
        }
        serde_json::to_vec(&SavedRef {
            version: STATE_VERSION,
            key_check: self.key_check(),
            keys: &self.keys,
            unauthenticated: &self.unauthenticated,
        })
        .unwrap_or_default()
    }

    /// Takes a new configuration and rule set (a reload) keeping what was counted: a rule
    /// whose id and kind stay keeps its windows; a removed or changed-kind rule's state goes.
    /// Returns how many rule states were dropped.
    pub fn reconfigure(&mut self, cfg: DetectionConfig, rules: Vec<Rule>) -> usize {
        let mut dropped = 0;
        for s in self
            .keys
            .values_mut()
            .chain(self.unauthenticated.values_mut())
        {
            let before = s.rules.len();
            s.rules
                .retain(|(id, st, _)| rules.iter().any(|r| r.id == *id && fits(r, st)));
            dropped += before - s.rules.len();
        }
        self.rules = rules;
        self.cfg = Some(cfg);
        dropped
    }

    /// Restores state saved by [`to_json`] (or by the version before it, a bare map of keys);
    /// states of rules that no longer exist are dropped. A file that is not such state, or
    /// whose shapes are wrong, is refused whole: the detectors keep what they had.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<Restored, DetectorStateError> {
        let saved = match serde_json::from_slice::<Saved>(bytes) {
            Ok(s) if s.version == STATE_VERSION => s,
            Ok(_) => return Err(DetectorStateError::Corrupt("an unknown format version")),
            Err(e) => match serde_json::from_slice::<HashMap<String, KeyState>>(bytes) {
                // The format before keyed sketches: its sketches are reset below.
                Ok(keys) => Saved {
                    version: 1,
                    key_check: String::new(),
                    keys,
                    unauthenticated: HashMap::new(),
                },
                Err(_) => return Err(e.into()),
            },
        };
        let same_key = saved.key_check == self.key_check();
        let mut sketches_reset = 0;
        let rules = &self.rules;
        let mut take = |m: HashMap<String, KeyState>| -> Result<HashMap<String, KeyState>, DetectorStateError> {
            m.into_iter()
                .map(|(k, mut s)| {
                    s.repair().map_err(DetectorStateError::Corrupt)?;
                    s.rules
                        .retain(|(id, st, _)| rules.iter().any(|r| r.id == *id && fits(r, st)));
                    if !same_key {
                        sketches_reset += s.reset_sketches();
                    }
                    Ok((k, s))
                })
                .collect()
        };
        let keys = take(saved.keys)?;
        let unauthenticated = take(saved.unauthenticated)?;
        self.keys = keys;
        self.unauthenticated = unauthenticated;
        Ok(Restored {
            keys: self.keys.len() + self.unauthenticated.len(),
            sketches_reset,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BlockScope;
    use std::time::Duration;

    fn rule(id: &str, kind: RuleKind, by: By) -> Rule {
        Rule {
            id: id.into(),
            name: id.into(),
            kind,
            by,
            routes: vec![],
            shadow: false,
            block: vec![Duration::from_secs(60)],
            scope: BlockScope::User,
        }
    }

    fn access(ts: u64, user: &str, subjects: &[u32]) -> Access {
        Access {
            event_id: format!("e{ts}"),
            ts_ms: ts,
            service: "nginx".into(),
            route: Some("abook.list".into()),
            has_disclosure: true,
            status: Some(200),
            user: Some(user.into()),
            role: Some("pupil".into()),
            tenant: Some("s1".into()),
            session: Some(format!("sess-{user}")),
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            target_tenants: vec!["s1".into()],
            ..Default::default()
        }
    }

    fn det(rules: Vec<Rule>) -> Detector {
        let mut d = Detector::new(
            DetectionConfig {
                services: vec!["nginx".into()],
                allow_users: vec!["svc".into()],
                ..DetectionConfig::default()
            },
            rules,
        );
        d.set_key(*b"sparbar-test-key");
        d
    }

    #[test]
    fn a_reload_keeps_the_windows_of_rules_that_stay() {
        let stats = Stats::default();
        let r = rule("req", rate(Metric::Requests, 3600, 3), By::User);
        let mut d = det(vec![r.clone()]);
        for t in 0..3 {
            assert!(d.observe(&access(1000 + t, "u1", &[1]), &stats).is_empty());
        }
        // Same rule, and a new one: the count goes on, so the 4th call fires.
        let other = rule("err", rate(Metric::Errors, 60, 100), By::User);
        assert_eq!(
            d.reconfigure(
                DetectionConfig {
                    services: vec!["nginx".into()],
                    ..DetectionConfig::default()
                },
                vec![r.clone(), other]
            ),
            0
        );
        let fired = d.observe(&access(1010, "u1", &[1]), &stats);
        assert_eq!(
            fired.iter().map(|a| a.rule_id.as_str()).collect::<Vec<_>>(),
            ["req"]
        );
        // The rule's kind changes: its state goes, and counting starts over.
        let seq = rule(
            "req",
            RuleKind::SequentialIds {
                param: "id".into(),
                window: Duration::from_secs(60),
                limit: 5,
                max_gap: 16,
                distinct_limit: None,
            },
            By::User,
        );
        assert_eq!(
            d.reconfigure(DetectionConfig::default(), vec![seq]),
            2,
            "req (kind changed) and err (removed)"
        );
    }

    fn rate(metric: Metric, window: u64, limit: u64) -> RuleKind {
        RuleKind::Rate {
            metric,
            window: Duration::from_secs(window),
            limit,
            role_limits: [("teacher".to_string(), limit * 10)].into(),
        }
    }

    #[test]
    fn request_rate_fires_past_the_limit_once_per_window() {
        let st = Stats::default();
        let mut d = det(vec![rule("rpm", rate(Metric::Requests, 60, 10), By::User)]);
        let mut fired = vec![];
        for i in 0..30u64 {
            for a in d.observe(&access(1_000_000 + i * 100, "u1", &[]), &st) {
                fired.push((i, a.value, a.threshold));
            }
        }
        // The 11th call within the minute fires; no second alert within the window.
        assert_eq!(fired, vec![(10, 11.0, 10.0)]);
        // A teacher's limit is ten times higher.
        let mut t = access(1_000_000, "t1", &[]);
        t.role = Some("teacher".into());
        let mut n = 0;
        for i in 0..100u64 {
            t.ts_ms = 1_000_000 + i * 100;
            t.event_id = format!("t{i}");
            n += d.observe(&t, &st).len();
        }
        assert_eq!(n, 0);
        // Calls spread so no minute has more than 10 never fire.
        let mut d = det(vec![rule("rpm", rate(Metric::Requests, 60, 10), By::User)]);
        for i in 0..100u64 {
            assert!(d.observe(&access(i * 7_000, "u2", &[]), &st).is_empty());
        }
    }

    #[test]
    fn distinct_persons_are_counted_once() {
        let st = Stats::default();
        let mut d = det(vec![rule(
            "dp",
            rate(Metric::DistinctPersons, 3600, 150),
            By::User,
        )]);
        // The same 100 persons over and over: never more than 100 distinct.
        let same: Vec<u32> = (1..=100).collect();
        for i in 0..20 {
            assert!(d.observe(&access(i * 1000, "u", &same), &st).is_empty());
        }
        // New persons push it over 150.
        let fresh: Vec<u32> = (1000..1100).collect();
        let a = d.observe(&access(30_000, "u", &fresh), &st);
        assert_eq!(a.len(), 1);
        assert!((180.0..=220.0).contains(&a[0].value), "{}", a[0].value);
        assert_eq!(a[0].persons_disclosed, 2100);
        // Persons summed, not distinct:
        let mut d = det(vec![rule("p", rate(Metric::Persons, 3600, 1000), By::User)]);
        let mut fired_at = None;
        for i in 0..20u64 {
            if !d.observe(&access(i * 1000, "u", &same), &st).is_empty() {
                fired_at.get_or_insert(i);
            }
        }
        assert_eq!(fired_at, Some(10));
    }

    /// The estimate's error over 16 keys: 256 registers give about 6.5 % standard error
    /// (linear counting below 640: about 5 % near 250), so no key is off by more than 4.5
    /// standard errors and the mean of 16 is within 2.5 of its standard error (a biased or
    /// lumpy hash fails both).
    #[test]
    fn hll_is_close() {
        for n in [1u64, 10, 100, 250, 1000, 10_000, 100_000] {
            let mut errs = Vec::new();
            for k in 0..16u8 {
                let key = SipKey::new([k; 16]);
                let mut h = Hll::default();
                for i in 0..n {
                    h.add(key.hash(i.to_string().as_bytes()));
                }
                errs.push((h.count() as f64 - n as f64) / n as f64);
            }
            let worst = errs.iter().fold(0f64, |a, e| a.max(e.abs()));
            let mean = errs.iter().sum::<f64>() / errs.len() as f64;
            eprintln!("n={n} worst={worst:.3} mean={mean:.3}");
            assert!(worst < if n == 1 { 0.01 } else { 0.3 }, "n={n} {errs:?}");
            assert!(mean.abs() < 0.04, "n={n} {errs:?}");
        }
    }

    #[test]
    fn cross_tenant_sequential_ids_query_and_errors() {
        let st = Stats::default();
        let mut d = det(vec![
            rule("xt", RuleKind::CrossTenant, By::User),
            rule(
                "seq",
                RuleKind::SequentialIds {
                    param: "id".into(),
                    window: Duration::from_secs(60),
                    limit: 5,
                    max_gap: 1,
                    distinct_limit: None,
                },
                By::User,
            ),
            rule(
                "ps",
                RuleKind::QueryAbove {
                    param: "pageSize".into(),
                    limit: 100,
                },
                By::User,
            ),
            rule(
                "er",
                RuleKind::ErrorRatio {
                    window: Duration::from_secs(60),
                    ratio: 0.5,
                    min_requests: 10,
                },
                By::User,
            ),
        ]);
        let mut a = access(1000, "u", &[5, 6]);
        a.cross_tenant = true;
        a.target_tenants = vec!["s1".into(), "s2".into()];
        let al = d.observe(&a, &st);
        assert_eq!(
            al.iter().map(|x| x.rule_id.as_str()).collect::<Vec<_>>(),
            vec!["xt"]
        );
        assert_eq!(al[0].foreign_tenants, vec!["s2".to_string()]);
        // A refused cross-tenant call is not a disclosure.
        let mut r = a.clone();
        r.status = Some(403);
        r.ts_ms = 200_000;
        assert!(d.observe(&r, &st).iter().all(|x| x.rule_id != "xt"));
        // A request that names another school counts whatever the answer (refused, or
        // stopped before it left).
        let mut at = access(250_000, "u", &[]);
        at.status = Some(403);
        at.tenant = Some("s1".into());
        at.cross_tenant_attempt = true;
        let al = d.observe(&at, &st);
        assert_eq!(
            al.iter()
                .map(|x| (x.rule_id.as_str(), x.value))
                .collect::<Vec<_>>(),
            vec![("xt", 1.0)]
        );
        // Walking ids 100, 101, 102 ...: the 6th step fires.
        let mut fired = None;
        for i in 0..10u64 {
            let mut x = access(300_000 + i, "u", &[]);
            x.params.insert("id".into(), (100 + i).to_string());
            if d.observe(&x, &st).iter().any(|y| y.rule_id == "seq") {
                fired.get_or_insert(i);
            }
        }
        assert_eq!(fired, Some(6));
        let mut q = access(400_000, "u", &[]);
        q.query.insert("pageSize".into(), vec!["1000".into()]);
        assert!(d
            .observe(&q, &st)
            .iter()
            .any(|y| y.rule_id == "ps" && y.value == 1000.0));
        let mut fired = None;
        for i in 0..20u64 {
            let mut e = access(500_000 + i, "u", &[]);
            e.status = Some(if i % 3 == 0 { 200 } else { 404 });
            if d.observe(&e, &st).iter().any(|y| y.rule_id == "er") {
                fired.get_or_insert(i);
            }
        }
        assert_eq!(fired, Some(9));
    }

    #[test]
    fn allowlists_services_and_persistence() {
        let st = Stats::default();
        let rules = vec![rule("rpm", rate(Metric::Requests, 3600, 3), By::User)];
        let mut d = det(rules.clone());
        let svc = access(1, "svc", &[]);
        let mut app = access(1, "u", &[]);
        app.service = "app".into();
        for i in 0..10 {
            let mut s = svc.clone();
            s.ts_ms = i;
            assert!(d.observe(&s, &st).is_empty());
            let mut x = app.clone();
            x.ts_ms = i;
            assert!(d.observe(&x, &st).is_empty());
        }
        assert_eq!(d.tracked(), 0);
        for i in 0..3 {
            assert!(d.observe(&access(i, "u", &[]), &st).is_empty());
        }
        // The state survives a restart: the 4th call fires in the new detector.
        let saved = d.to_json();
        let mut e = det(rules);
        assert_eq!(
            e.restore(&saved).unwrap(),
            Restored {
                keys: 1,
                sketches_reset: 0
            }
        );
        assert_eq!(e.observe(&access(10, "u", &[]), &st).len(), 1);
        // Idle keys are forgotten.
        e.expire(10 + 49 * 3600 * 1000, &st);
        assert_eq!(e.tracked(), 0);
    }

    /// A small deterministic generator for crafted traffic.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// The hash the detector used before: std's SipHash-1-3 with the public all-zero key.
    fn public_hash(s: &str) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        s.hash(&mut h);
        h.finish()
    }

    /// The issue's evasion: a scraper reads only persons whose id, under the public hash, has
    /// rank 1 in its register. Every register then holds 1, and 49,991 persons look like 368.
    /// With the agent's secret key the same ids are spread like any others.
    #[test]
    fn ids_chosen_by_their_public_hash_rank_are_still_counted() {
        let chosen: Vec<u32> = (0u32..)
            .filter(|i| (public_hash(&i.to_string()) << 8).leading_zeros() == 0)
            .take(49_991)
            .collect();
        let mut public = Hll::default();
        for i in &chosen {
            public.add(public_hash(&i.to_string()));
        }
        assert_eq!(public.count(), 368, "the evasion, under the public hash");

        let st = Stats::default();
        let mut d = det(vec![rule(
            "dp",
            rate(Metric::DistinctPersons, 7 * 24 * 3600, 40_000),
            By::User,
        )]);
        let mut fired = Vec::new();
        for (p, page) in chosen.chunks(50).enumerate() {
            for a in d.observe(&access(1_000 + p as u64, "u", page), &st) {
                fired.push((50 * (p + 1).min(1000) as u64, a.value, a.distinct_persons));
            }
        }
        assert_eq!(fired.len(), 1, "{fired:?}");
        let (read, value, all_time) = fired[0];
        // Within the sketch's error of the persons really read when it fired.
        let err = (value - read as f64).abs() / read as f64;
        assert!(
            value > 40_000.0 && err < 0.2,
            "{read} read, counted {value}"
        );
        let err = (all_time as f64 - read as f64).abs() / read as f64;
        assert!(err < 0.2, "{read} read, all-time sketch {all_time}");
    }

    /// Sketches made with one key are not mixed with another key's: a restore under another
    /// key starts them over (counted), the other windows stay.
    #[test]
    fn sketches_of_another_key_start_over() {
        let st = Stats::default();
        let rules = vec![
            rule("dp", rate(Metric::DistinctPersons, 3600, 1_000), By::User),
            rule("rq", rate(Metric::Requests, 3600, 3), By::User),
        ];
        let mut d = det(rules.clone());
        let persons: Vec<u32> = (1..=100).collect();
        for t in 0..3 {
            assert!(d.observe(&access(1_000 + t, "u", &persons), &st).is_empty());
        }
        let saved = d.to_json();
        let mut same = det(rules.clone());
        assert_eq!(same.restore(&saved).unwrap().sketches_reset, 0);
        let mut other = det(rules.clone());
        other.set_key([9; 16]);
        assert_eq!(
            other.restore(&saved).unwrap(),
            Restored {
                keys: 1,
                sketches_reset: 1
            }
        );
        // The request window survived (the 4th call fires); the distinct count started over.
        let a = other.observe(&access(2_000, "u", &[7]), &st);
        assert_eq!(a.len(), 1);
        assert_eq!((a[0].rule_id.as_str(), a[0].distinct_persons), ("rq", 1));
        // The format before keyed sketches (a bare map of keys) restores the same way.
        let v: serde_json::Value = serde_json::from_slice(&saved).unwrap();
        let old = serde_json::to_vec(&v["keys"]).unwrap();
        let mut e = det(rules);
        assert_eq!(
            e.restore(&old).unwrap(),
            Restored {
                keys: 1,
                sketches_reset: 1
            }
        );
    }

    fn walk_rule(max_gap: u64, distinct_limit: Option<u64>) -> Rule {
        rule(
            "walk",
            RuleKind::SequentialIds {
                param: "id".into(),
                window: Duration::from_secs(60),
                limit: 5,
                max_gap,
                distinct_limit,
            },
            By::User,
        )
    }

    /// Feeds ids, one call each 10 ms; returns the index of the first call that fired and its
    /// metric.
    fn walk(rule: Rule, ids: &[i64]) -> Option<(usize, &'static str)> {
        let st = Stats::default();
        let mut d = det(vec![rule]);
        for (i, id) in ids.iter().enumerate() {
            let mut x = access(1_000 + 10 * i as u64, "u", &[]);
            x.params.insert("id".into(), id.to_string());
            if let Some(a) = d.observe(&x, &st).first() {
                return Some((i, a.metric));
            }
        }
        None
    }

    #[test]
    fn id_walks_are_caught_in_any_order() {
        let seq = (100..200).collect::<Vec<i64>>();
        assert_eq!(walk(walk_rule(16, None), &seq), Some((6, "sequential_ids")));
        let down = (100..200).rev().collect::<Vec<i64>>();
        assert_eq!(
            walk(walk_rule(16, None), &down),
            Some((6, "sequential_ids"))
        );
        // Steps of 7: caught at the same step; with `max_gap = 1` (the +1 rule) never.
        let by7 = (0..200).map(|i| 1_000 + 7 * i).collect::<Vec<i64>>();
        assert_eq!(walk(walk_rule(16, None), &by7), Some((6, "sequential_ids")));
        assert_eq!(walk(walk_rule(1, None), &by7), None);
        // A shuffled walk over 1..=5000.
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        let mut shuffled: Vec<i64> = (1..=5000).collect();
        for i in (1..shuffled.len()).rev() {
            shuffled.swap(i, (r.next() % (i as u64 + 1)) as usize);
        }
        let hit = walk(walk_rule(16, None), &shuffled);
        assert_eq!(hit, Some((37, "sequential_ids")));
        // A walk with three random ids (of a billion) after each of its steps: the 6th step.
        let mut mixed = Vec::new();
        for i in 0..100 {
            mixed.push(50_000 + i);
            for _ in 0..3 {
                mixed.push(1_000_000 + (r.next() % 1_000_000_000) as i64);
            }
        }
        assert_eq!(
            walk(walk_rule(16, None), &mixed),
            Some((24, "sequential_ids"))
        );
        // Random ids alone are no walk; asking for the same ids again is none either.
        let random: Vec<i64> = (0..500)
            .map(|_| (r.next() % 1_000_000_000) as i64)
            .collect();
        assert_eq!(walk(walk_rule(16, None), &random), None);
        let again: Vec<i64> = (0..500).map(|i| [10, 11, 12][i % 3]).collect();
        assert_eq!(walk(walk_rule(16, None), &again), None);
        // With `distinct_limit`, spread ids are caught by their number (counted with the
        // keyed sketch: within its error of the 101st).
        let (i, metric) = walk(walk_rule(16, Some(100)), &random).unwrap();
        assert_eq!(metric, "distinct_ids");
        assert!((95..=110).contains(&i), "{i}");
        // Non-numeric ids (UUIDs) count too.
        let st = Stats::default();
        let mut d = det(vec![walk_rule(16, Some(100))]);
        let mut at = None;
        for i in 0..300u64 {
            let mut x = access(1_000 + i, "u", &[]);
            x.params
                .insert("id".into(), format!("{:016x}-uuid", r.next()));
            if !d.observe(&x, &st).is_empty() {
                at.get_or_insert(i);
            }
        }
        assert!(at.is_some_and(|i| (95..=110).contains(&i)), "{at:?}");
    }

    /// The issue's eviction: random-cookie 401s filled the table and evicted a low-and-slow
    /// scraper's weekly window. Callers the platform never accepted now live in a table of
    /// their own, by address; the scraper fires at exactly the page it fires at without the
    /// flood.
    #[test]
    fn random_cookie_401_floods_do_not_evict_a_low_and_slow_scraper() {
        let rules = vec![
            rule(
                "week",
                rate(Metric::Persons, 7 * 24 * 3600, 1_000),
                By::User,
            ),
            rule("errors", rate(Metric::Errors, 3600, 100_000), By::User),
        ];
        let cfg = DetectionConfig {
            services: vec!["nginx".into()],
            max_tracked: 100,
            max_tracked_unauthenticated: 1_000,
            ..DetectionConfig::default()
        };
        let run = |flood: bool| {
            let st = Stats::default();
            let mut d = Detector::new(cfg.clone(), rules.clone());
            d.set_key([1; 16]);
            let mut r = Rng(7);
            let mut fired = None;
            for hour in 0..60u64 {
                let t = hour * 3_600_000;
                // 50 honest users, and the scraper's page of 20 new persons.
                for u in 0..50 {
                    d.observe(&access(t + u, &format!("honest{u}"), &[u as u32]), &st);
                }
                let page: Vec<u32> = (0..20).map(|i| (hour * 20 + i) as u32).collect();
                let mut s = access(t + 100, "scraper", &page);
                s.event_id = format!("s{hour}");
                if d.observe(&s, &st).iter().any(|a| a.rule_id == "week") {
                    fired.get_or_insert(hour);
                }
                if flood {
                    for i in 0..2_000u64 {
                        let n = r.next();
                        let x = Access {
                            event_id: format!("f{hour}-{i}"),
                            ts_ms: t + 200 + i,
                            service: "nginx".into(),
                            route: Some("abook.list".into()),
                            has_disclosure: true,
                            status: Some(401),
                            session: Some(format!("{n:032x}")),
                            client_ip: Some(IpAddr::from((n as u32).to_be_bytes())),
                            ..Default::default()
                        };
                        d.observe(&x, &st);
                    }
                }
            }
            (fired, d.tracked(), d.tracked_unauthenticated(), st)
        };
        let (quiet, tracked, _, _) = run(false);
        assert_eq!(quiet, Some(50), "1020 persons > 1000 at the 51st page");
        assert_eq!(tracked, 51);
        let (flooded, tracked, unauth, st) = run(true);
        assert_eq!(flooded, Some(50));
        assert_eq!(tracked, 51);
        assert!(unauth <= 1_000, "{unauth}");
        assert_eq!(st.get_reason(StatMetric::DetectorKeysEvicted, "budget"), 0);
        assert!(st.get_reason(StatMetric::DetectorKeysEvicted, "unauthenticated_budget") > 100_000);
    }

    /// A 401 flood from one address adds up under that address; a session the platform
    /// accepted once stays under its own key when later refused.
    #[test]
    fn unauthenticated_calls_are_tracked_by_address() {
        let st = Stats::default();
        let mut d = det(vec![rule("err", rate(Metric::Errors, 60, 10), By::User)]);
        let ip: IpAddr = "10.9.9.9".parse().unwrap();
        let mut fired = None;
        for i in 0..20u64 {
            let x = Access {
                event_id: format!("f{i}"),
                ts_ms: 1_000 + i,
                service: "nginx".into(),
                route: Some("abook.list".into()),
                has_disclosure: true,
                status: Some(401),
                session: Some(format!("random{i}")),
                client_ip: Some(ip),
                ..Default::default()
            };
            if let Some(a) = d.observe(&x, &st).first() {
                fired.get_or_insert((i, a.key.clone(), a.value));
            }
        }
        assert_eq!(fired, Some((10, "10.9.9.9".to_string(), 11.0)));
        assert_eq!((d.tracked(), d.tracked_unauthenticated()), (0, 1));
        // An anonymous harvester's session that got answers stays under its session.
        let mut ok = access(5_000, "x", &[1]);
        (ok.user, ok.client_ip) = (None, Some(ip));
        ok.session = Some("harvester".into());
        d.observe(&ok, &st);
        let mut refused = ok.clone();
        (refused.status, refused.event_id, refused.ts_ms) = (Some(403), "r".into(), 5_001);
        d.observe(&refused, &st);
        assert_eq!((d.tracked(), d.tracked_unauthenticated()), (1, 1));
        // Both tables survive a restart.
        let mut e = det(vec![rule("err", rate(Metric::Errors, 60, 10), By::User)]);
        assert_eq!(e.restore(&d.to_json()).unwrap().keys, 2);
        assert_eq!((e.tracked(), e.tracked_unauthenticated()), (1, 1));
    }

    /// Answers the agent cannot read are never zero persons: they have their own metric.
    #[test]
    fn unreadable_answers_have_their_own_limit() {
        let st = Stats::default();
        let mut d = det(vec![
            rule("unread", rate(Metric::UnreadableAnswers, 3600, 2), By::User),
            rule("persons", rate(Metric::Persons, 3600, 0), By::User),
        ]);
        let mut fired = Vec::new();
        for i in 0..5u64 {
            let mut x = access(1_000 + i, "u", &[]);
            x.unreadable = i != 1;
            for a in d.observe(&x, &st) {
                fired.push((i, a.rule_id, a.value, a.unreadable_answers));
            }
        }
        assert_eq!(fired, vec![(3, "unread".to_string(), 3.0, 3)]);
        // The disclosure step's verdict becomes the access's.
        let dis = crate::attribute::disclosure::Disclosure {
            ids: vec![],
            listed: 0,
            digest: String::new(),
            tenants: Default::default(),
            categories: Default::default(),
            total: None,
            status: crate::attribute::disclosure::Status::Unreadable,
            error: Some("body_truncated"),
            unknown_tenant: 0,
        };
        assert!(Access::from_parts(None, Some(dis.clone()), None).unreadable);
        let complete = crate::attribute::disclosure::Disclosure {
            status: crate::attribute::disclosure::Status::Complete,
            ..dis
        };
        assert!(!Access::from_parts(None, Some(complete), None).unreadable);
    }

    /// Anomalies are a rule kind that alerts and blocks, matched by name (any name a module
    /// reports), on every route.
    #[test]
    fn anomaly_rules_alert_and_block() {
        let st = Stats::default();
        let r = rule(
            "crafted",
            RuleKind::Anomaly {
                names: vec!["unreadable_credential".into(), "two_credentials".into()],
                window: Duration::from_secs(600),
                limit: 1,
            },
            By::User,
        );
        let any = rule(
            "any",
            RuleKind::Anomaly {
                names: vec!["*".into()],
                window: Duration::from_secs(600),
                limit: 0,
            },
            By::Session,
        );
        let mut d = det(vec![r.clone(), any]);
        let call = |ts: u64, names: &[&str]| {
            let mut x = access(ts, "u", &[]);
            (x.route, x.has_disclosure) = (Some("auth.me".into()), false);
            x.anomalies = names.iter().map(|n| n.to_string()).collect();
            x
        };
        let ids = |a: &[Alert]| a.iter().map(|x| x.rule_id.clone()).collect::<Vec<_>>();
        assert!(d.observe(&call(1_000, &[]), &st).is_empty());
        // A name no rule lists yet still counts for `*`.
        let a = d.observe(&call(1_001, &["some_future_anomaly"]), &st);
        assert_eq!(ids(&a), ["any"]);
        assert_eq!(a[0].anomalies, ["some_future_anomaly"]);
        assert!(d
            .observe(&call(1_002, &["unreadable_credential"]), &st)
            .is_empty());
        let a = d.observe(&call(1_003, &["gap_in_body", "two_credentials"]), &st);
        assert_eq!(ids(&a), ["crafted"]);
        assert_eq!(
            (a[0].metric, a[0].value, a[0].threshold),
            ("anomalies", 2.0, 1.0)
        );
        assert_eq!(a[0].anomalies, ["two_credentials"]);
        // It blocks like any enforcing rule.
        let mut decisions = decide::Decisions::default();
        let dcs = decisions.on_alert(&r, &a[0], "d1".into(), 1_003).unwrap();
        assert_eq!((dcs.scope, dcs.value.as_str()), (decide::Scope::User, "u"));
    }

    /// A caller whose school is unknown (it never called the identity endpoint) is flagged when
    /// its answers span two schools.
    #[test]
    fn answers_spanning_schools_fire_cross_tenant_without_the_callers_school() {
        let st = Stats::default();
        let mut d = det(vec![rule("xt", RuleKind::CrossTenant, By::User)]);
        let call = |ts: u64, tenants: &[&str], status: u16| {
            let mut x = access(ts, "u", &[1]);
            x.tenant = None;
            x.status = Some(status);
            x.target_tenants = tenants.iter().map(|t| t.to_string()).collect();
            x
        };
        assert!(d.observe(&call(1_000, &["s1"], 200), &st).is_empty());
        assert!(d.observe(&call(1_001, &["s1"], 200), &st).is_empty());
        assert!(d.observe(&call(1_002, &["s2"], 403), &st).is_empty());
        let a = d.observe(&call(1_003, &["s2"], 200), &st);
        assert_eq!(a.len(), 1);
        assert_eq!(
            (a[0].metric, a[0].value, a[0].threshold),
            ("tenants_spanned", 2.0, 1.0)
        );
        assert_eq!(a[0].foreign_tenants, ["s1", "s2"]);
        // One answer spanning two schools is enough; a caller of a known school reading its
        // own is not flagged by the span.
        let mut one = call(1_004, &["s3", "s4"], 200);
        one.user = Some("v".into());
        assert_eq!(d.observe(&one, &st).len(), 1);
        let mut own = call(1_005, &["s1"], 200);
        (own.user, own.tenant) = (Some("w".into()), Some("s1".into()));
        assert!(d.observe(&own, &st).is_empty());
        let mut own2 = own.clone();
        (own2.ts_ms, own2.event_id, own2.target_tenants) = (1_006, "x".into(), vec!["s1".into()]);
        assert!(d.observe(&own2, &st).is_empty());
    }

    /// A saved state of every kind of rule.
    fn full_state() -> (Vec<Rule>, Vec<u8>) {
        let st = Stats::default();
        let rules = vec![
            rule("rq", rate(Metric::Requests, 60, 1_000), By::User),
            rule("dp", rate(Metric::DistinctPersons, 3600, 1_000), By::User),
            rule(
                "er",
                RuleKind::ErrorRatio {
                    window: Duration::from_secs(60),
                    ratio: 0.9,
                    min_requests: 1_000,
                },
                By::User,
            ),
            walk_rule(16, Some(1_000)),
            rule("xt", RuleKind::CrossTenant, By::User),
            rule(
                "an",
                RuleKind::Anomaly {
                    names: vec!["*".into()],
                    window: Duration::from_secs(60),
                    limit: 1_000,
                },
                By::User,
            ),
        ];
        let mut d = det(rules.clone());
        for i in 0..3u64 {
            let mut x = access(1_000 + i, "u", &[1, 2]);
            x.params.insert("id".into(), (10 + i).to_string());
            x.tenant = None;
            x.anomalies = vec!["two_credentials".into()];
            d.observe(&x, &st);
            let mut y = x.clone();
            (y.user, y.status, y.session) = (None, Some(401), Some("r".into()));
            y.client_ip = Some("10.0.0.1".parse().unwrap());
            d.observe(&y, &st);
        }
        (rules, d.to_json())
    }

    /// The issue's panic: a corrupt detector.json. Every truncation and garbage file is refused
    /// with an error, the detectors keep what they had, and no byte changed anywhere makes a
    /// restore or the calls after it panic.
    #[test]
    fn corrupt_detector_state_is_refused_not_a_panic() {
        let st = Stats::default();
        let (rules, saved) = full_state();
        // Inside a sketch's 512 hex digits every 61st position is enough: they are all alike.
        let mut in_sketch = vec![false; saved.len()];
        let mut run = 0;
        for (i, b) in saved.iter().enumerate() {
            run = if b.is_ascii_hexdigit() { run + 1 } else { 0 };
            in_sketch[i] = run > 8 && saved.get(i + 8).is_some_and(u8::is_ascii_hexdigit);
        }
        let mut d = det(rules.clone());
        assert_eq!(d.restore(&saved).unwrap().keys, 2);
        for n in (0..saved.len()).filter(|&i| !in_sketch[i] || i % 61 == 0) {
            let e = d.restore(&saved[..n]).unwrap_err();
            assert!(
                e.to_string()
                    .contains("remove the file to start the detectors empty"),
                "{e}"
            );
            assert_eq!((d.tracked(), d.tracked_unauthenticated()), (1, 1));
        }
        let text = String::from_utf8(saved.clone()).unwrap();
        let sketch = text
            .split('"')
            .find(|s| s.len() == 2 * HLL_M)
            .unwrap()
            .to_string();
        let garbage: Vec<(Vec<u8>, &str)> = vec![
            (b"".to_vec(), "EOF"),
            (b"\xff\xfe\x00garbage".to_vec(), "expected value"),
            (b"null".to_vec(), "invalid type"),
            (b"[1,2]".to_vec(), "invalid type"),
            (
                b"{\"version\":3,\"key_check\":\"\",\"keys\":{}}".to_vec(),
                "unknown format version",
            ),
            // A sketch of the right length in bytes but not hex, with a two-byte character across
            // a digit pair (slicing it used to panic).
            (
                text.replacen(&sketch, &format!("0{}0", "é".repeat(HLL_M - 1)), 1)
                    .into_bytes(),
                "hex digits",
            ),
            // A sketch too short (adding to it used to index past its end).
            (
                text.replacen(&sketch, &sketch[..20], 1).into_bytes(),
                "hex digits",
            ),
            // Counting buckets of the wrong length (indexing them used to panic).
            (
                text.replacen("\"counts\":[0,", "\"counts\":[", 1)
                    .into_bytes(),
                "buckets of the wrong length",
            ),
        ];
        for (g, why) in &garbage {
            let e = d.restore(g).unwrap_err().to_string();
            assert!(e.contains(why), "{e:?} lacks {why:?}");
            assert_eq!((d.tracked(), d.tracked_unauthenticated()), (1, 1));
        }
        // Any byte replaced anywhere: an error or a state the detectors can run on.
        let mut accepted = 0;
        for i in (0..saved.len()).filter(|&i| !in_sketch[i] || i % 61 == 0) {
            for b in [b'0', b'9', b'f', b'"', b'[', b'{', b'-', b'e', 0xc3] {
                let mut m = saved.clone();
                m[i] = b;
                let mut e = det(rules.clone());
                if e.restore(&m).is_ok() {
                    accepted += 1;
                    for t in 0..3u64 {
                        let mut x = access(2_000 + t, "u", &[3]);
                        x.params.insert("id".into(), "11".into());
                        e.observe(&x, &st);
                    }
                    let _ = e.to_json();
                }
            }
        }
        assert!(accepted > 0);
    }
}
