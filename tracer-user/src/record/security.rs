//! The security records: one alert per detector firing, and one decision record when a block
//! starts, when it is enforced, and when it ends. ECS names where ECS has them (`rule.*`,
//! `event.kind: alert`, `user.*`, `organization.id`, `session.id`, `client.ip`), ours under
//! `abook.alert.*` and `abook.decision.*`. Like access records they hold ids, hashes and counts,
//! never personal-data values.

use serde_json::{json, Map, Value};

use crate::{
    detect::decide::{Decision, EndReason},
    detect::Alert,
    record::rfc3339_micros,
};

/// Evidence event ids listed per alert.
pub const MAX_EVIDENCE: usize = 16;

/// `@timestamp` is the time of what the record is about (on the detection clock: the call that
/// fired, the decision's start); `event.created` is the wall-clock time the agent made it.
fn base(id: &str, kind: &str, dataset: &str, ts_ms: u64, host: &str) -> Map<String, Value> {
    let ts = rfc3339_micros(ts_ms.saturating_mul(1_000_000));
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut m = Map::new();
    m.insert("@timestamp".into(), json!(ts));
    m.insert(
        "event".into(),
        json!({"id": id, "kind": kind, "dataset": dataset, "created": rfc3339_micros(created)}),
    );
    m.insert("host".into(), json!({"name": host}));
    m
}

fn who(
    m: &mut Map<String, Value>,
    user: Option<&str>,
    role: Option<&str>,
    tenant: Option<&str>,
    session: Option<&str>,
    ip: Option<std::net::IpAddr>,
) {
    let mut u = Map::new();
    if let Some(x) = user {
        u.insert("id".into(), json!(x));
    }
    if let Some(r) = role {
        u.insert("roles".into(), json!([r]));
    }
    if !u.is_empty() {
        m.insert("user".into(), Value::Object(u));
    }
    if let Some(t) = tenant {
        m.insert("organization".into(), json!({"id": t}));
    }
    if let Some(s) = session {
        m.insert("session".into(), json!({"id": s}));
    }
    if let Some(ip) = ip {
        m.insert(
            "client".into(),
            json!({"ip": ip.to_canonical().to_string()}),
        );
    }
}

/// The alert record of one firing.
pub fn alert_line(a: &Alert, id: &str, host: &str) -> Vec<u8> {
    let mut m = base(id, "alert", "sparbar.alert", a.ts_ms, host);
    if let Some(Value::Object(e)) = m.get_mut("event") {
        e.insert("category".into(), json!(["intrusion_detection"]));
        e.insert("type".into(), json!(["indicator"]));
        e.insert("action".into(), json!(a.rule_id));
    }
    m.insert(
        "rule".into(),
        json!({"id": a.rule_id, "name": a.rule_name, "ruleset": "sparbar"}),
    );
    who(
        &mut m,
        a.user.as_deref(),
        a.role.as_deref(),
        a.tenant.as_deref(),
        a.session.as_deref(),
        a.client_ip,
    );
    let ev: Vec<&String> = a
        .evidence
        .iter()
        .rev()
        .take(MAX_EVIDENCE)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let mut alert = json!({
        "metric": a.metric,
        "value": a.value,
        "threshold": a.threshold,
        "by": a.by.as_str(),
        "key": a.key,
        "shadow": a.shadow,
    });
    if let Some(w) = a.window_s {
        alert["window_s"] = json!(w);
    }
    if !a.foreign_tenants.is_empty() {
        alert["foreign_tenants"] = json!(a.foreign_tenants);
    }
    if !a.anomalies.is_empty() {
        alert["anomalies"] = json!(a.anomalies);
    }
    m.insert(
        "abook".into(),
        json!({
            "alert": alert,
            "evidence": {
                "event_ids": ev,
                "persons_disclosed": a.persons_disclosed,
                "distinct_persons": a.distinct_persons,
                "unreadable_answers": a.unreadable_answers,
            }
        }),
    );
    serde_json::to_vec(&Value::Object(m)).unwrap_or_default()
}

/// What happened to a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Start,
    Enforced,
    End(EndReason),
}

/// Kernel enforcement of one decision, as far as it went.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Enforcement {
    pub connections_blocked: u64,
    pub connections_reset: u64,
    /// Session tokens and login names the kernel now refuses in requests.
    pub tokens_blocked: u64,
    /// Why enforcement did not (fully) happen.
    pub errors: Vec<String>,
}

impl Enforcement {
    /// Adds a later enforcement of the same decision (at most 8 distinct errors are kept).
    pub fn add(&mut self, e: &Enforcement) {
        self.connections_blocked += e.connections_blocked;
        self.connections_reset += e.connections_reset;
        self.tokens_blocked += e.tokens_blocked;
        for err in &e.errors {
            if !self.errors.contains(err) && self.errors.len() < 8 {
                self.errors.push(err.clone());
            }
        }
    }
}

/// A decision record.
pub fn decision_line(
    d: &Decision,
    phase: Phase,
    id: &str,
    ts_ms: u64,
    host: &str,
    enf: Option<&Enforcement>,
) -> Vec<u8> {
    let mut m = base(id, "event", "sparbar.decision", ts_ms, host);
    let (action, kind_type) = match phase {
        Phase::Start => ("block_start", "start"),
        Phase::Enforced => ("block_enforced", "change"),
        Phase::End(_) => ("block_end", "end"),
    };
    if let Some(Value::Object(e)) = m.get_mut("event") {
        e.insert("category".into(), json!(["iam"]));
        e.insert("type".into(), json!([kind_type, "denied"]));
        e.insert("action".into(), json!(action));
        e.insert("reason".into(), json!(d.reason));
    }
    if d.scope == crate::detect::decide::Scope::User {
        m.insert("user".into(), json!({"id": d.value}));
    } else {
        m.insert("session".into(), json!({"id": d.value}));
    }
    let mut dec = json!({
        "id": d.id,
        "scope": d.scope.as_str(),
        "value": d.value,
        "start": rfc3339_micros(d.start_ms.saturating_mul(1_000_000)),
        "until": rfc3339_micros(d.until_ms.saturating_mul(1_000_000)),
        "duration_s": (d.until_ms.saturating_sub(d.start_ms)) / 1000,
        "level": d.level,
        "origin": match d.origin { crate::detect::decide::Origin::Rule => "rule", crate::detect::decide::Origin::Operator => "operator" },
    });
    if let Some(r) = &d.rule_id {
        dec["rule_id"] = json!(r);
        m.insert("rule".into(), json!({"id": r}));
    }
    if let Some(e) = &d.alert_event {
        dec["alert_event_id"] = json!(e);
    }
    if let Phase::End(r) = phase {
        dec["end_reason"] = json!(r.as_str());
    }
    if let Some(e) = enf {
        dec["enforcement"] = json!({
            "connections_blocked": e.connections_blocked,
            "connections_reset": e.connections_reset,
            "tokens_blocked": e.tokens_blocked,
            "errors": e.errors,
        });
    }
    m.insert("abook".into(), json!({ "decision": dec }));
    serde_json::to_vec(&Value::Object(m)).unwrap_or_default()
}
