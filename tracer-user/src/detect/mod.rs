//! The detectors: per-user (or per-session, per-address, per-tenant) state over sliding windows,
//! fed one attributed access at a time, firing alerts when a rule's threshold is crossed. Pure:
//! time comes with each access (so tests and replays can compress days), nothing here touches
//! the kernel or the disk.
//!
//! # Memory
//! Each tracked key holds, per rule that applies to it, a fixed-size state: 16 counting buckets
//! (64 bytes) for counts and ratios, 8 buckets of a 256-register HyperLogLog (2 KiB) for distinct
//! persons, a short run for sequential ids; plus the key's own evidence ring (16 event ids) and a
//! 256-register sketch of every person it was disclosed. Keys idle past `idle_expiry` are
//! forgotten; past `max_tracked` the least recently active tenth is evicted, counted.

pub mod decide;

use std::{
    collections::{HashMap, VecDeque},
    hash::{Hash, Hasher},
    net::IpAddr,
};

use serde::{Deserialize, Serialize};

use crate::{
    config::{By, DetectionConfig, Metric, Rule, RuleKind},
    stats::{Metric as StatMetric, Stats},
};

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
    /// Tenants other than the caller's whose persons were disclosed (cross-tenant rules).
    pub foreign_tenants: Vec<String>,
    pub shadow: bool,
}

const BUCKETS: usize = 16;
const HLL_BUCKETS: usize = 8;
const HLL_M: usize = 256;
const EVIDENCE: usize = 16;
/// A rule that fired does not fire again for the same key for this long (or its window).
const COOLDOWN_MS: u64 = 60_000;

fn hash_id(s: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// A HyperLogLog sketch with 256 registers (standard error about 6.5%; small counts are
/// near-exact through linear counting).
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq, Debug)]
pub struct Hll(#[serde(with = "serde_bytes_vec")] Vec<u8>);

mod serde_bytes_vec {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::attribute::attribution::hex(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let t = String::deserialize(d)?;
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
        self.counts.iter().sum()
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
}

#[derive(Clone, Serialize, Deserialize, Debug)]
enum RuleState {
    Count(Buckets),
    Distinct(HllBuckets),
    Ratio {
        errors: Buckets,
        total: Buckets,
    },
    Sequence {
        last: Option<i64>,
        hits: VecDeque<u64>,
    },
    None,
}

#[derive(Clone, Serialize, Deserialize, Debug)]
struct KeyState {
    last_ms: u64,
    /// Per rule id: its state and the time until which it does not fire again.
    rules: Vec<(String, RuleState, u64)>,
    evidence: VecDeque<String>,
    persons: u64,
    distinct: Hll,
}

impl KeyState {
    fn new() -> Self {
        KeyState {
            last_ms: 0,
            rules: Vec::new(),
            evidence: VecDeque::new(),
            persons: 0,
            distinct: Hll::default(),
        }
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
            last: None,
            hits: VecDeque::new(),
        },
        _ => RuleState::None,
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

/// The detector state of every tracked key.
#[derive(Serialize, Deserialize, Default)]
pub struct Detector {
    #[serde(skip)]
    rules: Vec<Rule>,
    #[serde(skip)]
    cfg: Option<DetectionConfig>,
    keys: HashMap<String, KeyState>,
}

impl Detector {
    pub fn new(cfg: DetectionConfig, rules: Vec<Rule>) -> Detector {
        Detector {
            rules,
            cfg: Some(cfg),
            keys: HashMap::new(),
        }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn tracked(&self) -> usize {
        self.keys.len()
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
        let subject_hashes: Vec<u64> = a.subjects.iter().map(|s| hash_id(s)).collect();
        let ok = a.status.is_some_and(|s| (200..300).contains(&s));
        let err = a.status.is_some_and(|s| (400..500).contains(&s));
        for (ri, rule) in self.rules.iter().enumerate() {
            if !rule.matches_route(route, a.has_disclosure) {
                continue;
            }
            let Some(key) = key_of(rule.by, a) else {
                continue;
            };
            let ks = self.keys.entry(key.clone()).or_insert_with(KeyState::new);
            ks.last_ms = ks.last_ms.max(a.ts_ms);
            if ks.evidence.back() != Some(&a.event_id) {
                ks.evidence.push_back(a.event_id.clone());
                if ks.evidence.len() > EVIDENCE {
                    ks.evidence.pop_front();
                }
                ks.persons += a.subjects.len() as u64;
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
            let fired: Option<(&'static str, f64, f64)> = match (&rule.kind, st) {
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
                                Metric::DistinctPersons => 0,
                            };
                            b.add(a.ts_ms / width, n);
                            b.sum()
                        }
                        _ => 0,
                    };
                    (value > limit).then_some((metric.as_str(), value as f64, limit as f64))
                }
                // An attempt counts whatever the answer (it may be refused, or never leave).
                (RuleKind::CrossTenant, _) => ((ok && a.cross_tenant) || a.cross_tenant_attempt)
                    .then_some((
                        "foreign_tenants",
                        a.target_tenants
                            .iter()
                            .filter(|t| Some(*t) != a.tenant.as_ref())
                            .count()
                            .max(usize::from(a.cross_tenant_attempt))
                            as f64,
                        0.0,
                    )),
                (RuleKind::QueryAbove { param, limit }, _) => a
                    .query
                    .get(param)
                    .and_then(|v| v.iter().filter_map(|x| x.trim().parse::<u64>().ok()).max())
                    .filter(|v| v > limit)
                    .map(|v| ("query_value", v as f64, *limit as f64)),
                (
                    RuleKind::SequentialIds {
                        param,
                        window,
                        limit,
                    },
                    RuleState::Sequence { last, hits },
                ) => {
                    let id = a.params.get(param).and_then(|v| v.parse::<i64>().ok());
                    if let Some(id) = id {
                        if last.is_some_and(|l| id == l + 1) {
                            hits.push_back(a.ts_ms);
                        }
                        *last = Some(id);
                    }
                    let from = a.ts_ms.saturating_sub(window.as_millis() as u64);
                    while hits.front().is_some_and(|&t| t < from) {
                        hits.pop_front();
                    }
                    while hits.len() as u64 > limit + 1 {
                        hits.pop_front();
                    }
                    (hits.len() as u64 > *limit).then_some((
                        "sequential_ids",
                        hits.len() as f64,
                        *limit as f64,
                    ))
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
                    (t >= *min_requests && r >= *ratio).then_some(("error_ratio", r, *ratio))
                }
                _ => None,
            };
            if let Some((metric, value, threshold)) = fired {
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
                    metric,
                    value,
                    threshold,
                    window_s: rule.window().map(|w| w.as_secs()),
                    user: a.user.clone(),
                    role: a.role.clone(),
                    tenant: a.tenant.clone(),
                    session: a.session.clone(),
                    client_ip: a.client_ip,
                    evidence: ks.evidence.iter().cloned().collect(),
                    persons_disclosed: ks.persons,
                    distinct_persons: ks.distinct.count(),
                    foreign_tenants: a
                        .target_tenants
                        .iter()
                        .filter(|t| Some(*t) != a.tenant.as_ref())
                        .cloned()
                        .collect(),
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
        let before = self.keys.len();
        self.keys
            .retain(|_, k| now_ms.saturating_sub(k.last_ms) <= idle);
        let n = before - self.keys.len();
        if n > 0 {
            stats.add_reason(StatMetric::DetectorKeysEvicted, "idle", n as u64);
        }
    }

    fn bound(&mut self, stats: &Stats) {
        let max = self.cfg().max_tracked;
        let n = crate::statefile::evict_oldest(&mut self.keys, max, |k| k.last_ms);
        if n > 0 {
            stats.add_reason(StatMetric::DetectorKeysEvicted, "budget", n as u64);
        }
    }

    /// The state as JSON (for the state directory: long windows survive restarts).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.keys).unwrap_or_default()
    }

    /// Takes a new configuration and rule set (a reload) keeping what was counted: a rule
    /// whose id and kind stay keeps its windows; a removed or changed-kind rule's state goes.
    /// Returns how many rule states were dropped.
    pub fn reconfigure(&mut self, cfg: DetectionConfig, rules: Vec<Rule>) -> usize {
        let mut dropped = 0;
        for s in self.keys.values_mut() {
            let before = s.rules.len();
            s.rules
                .retain(|(id, st, _)| rules.iter().any(|r| r.id == *id && fits(r, st)));
            dropped += before - s.rules.len();
        }
        self.rules = rules;
        self.cfg = Some(cfg);
        dropped
    }

    /// Restores state saved by [`to_json`]; states of rules that no longer exist are dropped.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<usize, serde_json::Error> {
        let keys: HashMap<String, KeyState> = serde_json::from_slice(bytes)?;
        let rules = &self.rules;
        self.keys = keys
            .into_iter()
            .map(|(k, mut s)| {
                s.rules
                    .retain(|(id, st, _)| rules.iter().any(|r| r.id == *id && fits(r, st)));
                (k, s)
            })
            .collect();
        Ok(self.keys.len())
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
        Detector::new(
            DetectionConfig {
                services: vec!["nginx".into()],
                allow_users: vec!["svc".into()],
                ..DetectionConfig::default()
            },
            rules,
        )
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

    #[test]
    fn hll_is_close() {
        for n in [1u64, 10, 100, 250, 1000, 10_000, 100_000] {
            let mut h = Hll::default();
            for i in 0..n {
                h.add(hash_id(&i.to_string()));
            }
            let c = h.count() as f64;
            let err = (c - n as f64).abs() / n as f64;
            assert!(err < if n <= 250 { 0.1 } else { 0.2 }, "n={n} count={c}");
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
        assert_eq!(e.restore(&saved).unwrap(), 1);
        assert_eq!(e.observe(&access(10, "u", &[]), &st).len(), 1);
        // Idle keys are forgotten.
        e.expire(10 + 49 * 3600 * 1000, &st);
        assert_eq!(e.tracked(), 0);
    }
}
