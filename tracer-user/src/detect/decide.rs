//! Decisions: who is blocked, since when, until when, and why. A detector's alert becomes a
//! block when its rule enforces (not shadow, block durations set); an operator blocks and
//! unblocks through the control socket. Durations escalate per user for repeat offenders.
//! Pure: the agent turns decisions into kernel enforcement and records.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    config::{BlockScope, Rule},
    detect::Alert,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Every session of a user.
    User,
    /// One session (its `session.id` hash).
    Session,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::User => "user",
            Scope::Session => "session",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    Rule,
    Operator,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub id: String,
    pub scope: Scope,
    /// User id or session hash.
    pub value: String,
    pub start_ms: u64,
    pub until_ms: u64,
    /// 1 for a first offence, 2 for the next …
    pub level: u32,
    pub origin: Origin,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rule_id: Option<String>,
    /// The alert's triggering access event id.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub alert_event: Option<String>,
}

/// Why a decision ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    Expired,
    Unblocked,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Expired => "expired",
            EndReason::Unblocked => "unblocked",
        }
    }
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Decisions {
    pub active: Vec<Decision>,
    /// Offences per user (or session), for escalation.
    pub offences: BTreeMap<String, u32>,
    #[serde(skip)]
    pub changed: bool,
}

impl Decisions {
    /// The decision that blocks a call of this user / session now, if any.
    pub fn blocking(
        &self,
        user: Option<&str>,
        session: Option<&str>,
        now_ms: u64,
    ) -> Option<&Decision> {
        self.active.iter().find(|d| {
            d.until_ms > now_ms
                && match d.scope {
                    Scope::User => user == Some(d.value.as_str()),
                    Scope::Session => session == Some(d.value.as_str()),
                }
        })
    }

    /// A block for an alert of an enforcing rule; `None` for shadow rules, or when a block at
    /// least as long is already in force.
    /// The block starts `now_ms`, when it is decided: calls made before that were not blocked.
    pub fn on_alert(
        &mut self,
        rule: &Rule,
        alert: &Alert,
        id: String,
        now_ms: u64,
    ) -> Option<Decision> {
        if alert.shadow || rule.shadow || rule.block.is_empty() {
            return None;
        }
        let (scope, value) = match (rule.scope, &alert.user, &alert.session) {
            (BlockScope::User, Some(u), _) => (Scope::User, u.clone()),
            (_, _, Some(s)) => (Scope::Session, s.clone()),
            (BlockScope::Session, Some(u), None) => (Scope::User, u.clone()),
            _ => return None,
        };
        let now = now_ms.max(alert.ts_ms);
        if self
            .active
            .iter()
            .any(|d| d.scope == scope && d.value == value && d.until_ms > now)
        {
            return None;
        }
        let n = self
            .offences
            .entry(format!("{}:{value}", scope.as_str()))
            .or_insert(0);
        *n += 1;
        let level = *n;
        let dur = rule.block[(level as usize - 1).min(rule.block.len() - 1)];
        let d = Decision {
            id,
            scope,
            value,
            start_ms: now,
            until_ms: now + dur.as_millis() as u64,
            level,
            origin: Origin::Rule,
            reason: format!(
                "{}: {} {} > {}",
                rule.name, alert.metric, alert.value, alert.threshold
            ),
            rule_id: Some(rule.id.clone()),
            alert_event: alert.evidence.last().cloned(),
        };
        self.active.push(d.clone());
        self.changed = true;
        Some(d)
    }

    /// An operator's block; replaces any block of the same scope and value.
    pub fn operator_block(
        &mut self,
        scope: Scope,
        value: String,
        duration_ms: u64,
        reason: String,
        id: String,
        now_ms: u64,
    ) -> Decision {
        self.active
            .retain(|d| !(d.scope == scope && d.value == value));
        let n = self
            .offences
            .entry(format!("{}:{value}", scope.as_str()))
            .or_insert(0);
        *n += 1;
        let d = Decision {
            id,
            scope,
            value,
            start_ms: now_ms,
            until_ms: now_ms + duration_ms,
            level: *n,
            origin: Origin::Operator,
            reason,
            rule_id: None,
            alert_event: None,
        };
        self.active.push(d.clone());
        self.changed = true;
        d
    }

    /// Removes and returns the decisions `end` picks.
    fn take(&mut self, end: impl Fn(&Decision) -> bool) -> Vec<Decision> {
        let (ended, keep): (Vec<Decision>, Vec<Decision>) =
            std::mem::take(&mut self.active).into_iter().partition(end);
        self.active = keep;
        if !ended.is_empty() {
            self.changed = true;
        }
        ended
    }

    /// Ends the blocks of this scope and value.
    pub fn unblock(&mut self, scope: Scope, value: &str) -> Vec<Decision> {
        self.take(|d| d.scope == scope && d.value == value)
    }

    /// Ends the blocks whose time is up.
    pub fn expire(&mut self, now_ms: u64) -> Vec<Decision> {
        self.take(|d| d.until_ms <= now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{By, RuleKind};
    use std::time::Duration;

    fn rule(block: &[u64], shadow: bool) -> Rule {
        Rule {
            id: "r".into(),
            name: "R".into(),
            kind: RuleKind::CrossTenant,
            by: By::User,
            routes: vec![],
            shadow,
            block: block.iter().map(|s| Duration::from_secs(*s)).collect(),
            scope: BlockScope::User,
        }
    }

    fn alert(ts: u64) -> Alert {
        Alert {
            rule_index: 0,
            rule_id: "r".into(),
            rule_name: "R".into(),
            ts_ms: ts,
            by: By::User,
            key: "7".into(),
            metric: "foreign_tenants",
            value: 1.0,
            threshold: 0.0,
            window_s: None,
            user: Some("7".into()),
            role: None,
            tenant: None,
            session: Some("s".into()),
            client_ip: None,
            evidence: vec!["e1".into()],
            persons_disclosed: 3,
            distinct_persons: 3,
            unreadable_answers: 0,
            foreign_tenants: vec![],
            anomalies: vec![],
            shadow: false,
        }
    }

    #[test]
    fn escalates_for_repeat_offenders() {
        let mut d = Decisions::default();
        let r = rule(&[60, 600], false);
        let a = d.on_alert(&r, &alert(1000), "d1".into(), 1000).unwrap();
        assert_eq!((a.level, a.until_ms, a.scope), (1, 61_000, Scope::User));
        // Already blocked: no second decision.
        assert!(d.on_alert(&r, &alert(2000), "d2".into(), 2000).is_none());
        assert!(d.blocking(Some("7"), None, 5000).is_some());
        assert!(d.blocking(Some("8"), Some("s"), 5000).is_none());
        assert_eq!(d.expire(61_000).len(), 1);
        let b = d.on_alert(&r, &alert(70_000), "d3".into(), 70_000).unwrap();
        assert_eq!((b.level, b.until_ms), (2, 670_000));
        let c = d.unblock(Scope::User, "7");
        assert_eq!(c.len(), 1);
        // The last duration repeats.
        let e = d
            .on_alert(&r, &alert(700_000), "d4".into(), 700_000)
            .unwrap();
        assert_eq!((e.level, e.until_ms), (3, 1_300_000));
    }

    #[test]
    fn shadow_rules_never_block() {
        let mut d = Decisions::default();
        assert!(d
            .on_alert(&rule(&[60], true), &alert(1), "x".into(), 1)
            .is_none());
        assert!(d
            .on_alert(&rule(&[], false), &alert(1), "x".into(), 1)
            .is_none());
        assert!(d.active.is_empty());
    }

    #[test]
    fn operator_blocks_sessions() {
        let mut d = Decisions::default();
        d.operator_block(
            Scope::Session,
            "s".into(),
            1000,
            "manual".into(),
            "o1".into(),
            10,
        );
        assert!(d.blocking(None, Some("s"), 500).is_some());
        assert!(d.blocking(None, Some("s"), 1010).is_none());
    }
}
