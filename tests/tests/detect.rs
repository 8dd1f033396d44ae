//! Privileged end-to-end tests of detection and enforcement with the demo platform behind
//! nginx/TLS (the incident's flaw switched on): the incident replayed (the abusive pupil is
//! alerted on its first cross-tenant success and blocked; after the decision it gets no more
//! address-book answers, checked at the client, while everyone else is unaffected), shadow mode
//! (alerts, never blocks), and an ordinary school day (no alert, no block).

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;
use sparbar_tests::*;

struct Run {
    summary: Value,
    records: Vec<Value>,
    tls_port: u16,
    stats: Stats,
}

fn run(name: &str, config_edit: impl Fn(String) -> String, traffic_args: &[&str]) -> Result<Run> {
    require_root()?;
    let dir = scratch(name);
    let (tls_port, app_port) = (free_port(), free_port());
    let platform = Platform::up(&dir.join("platform"), tls_port, app_port, true)?;
    let config = config_edit(demo_config(&platform)?);
    let agent = Agent::start(&dir.join("agent"), &config)?;
    let summary = traffic(&platform, traffic_args, &dir.join("traffic.json"))?;
    let records_path = agent.records.clone();
    let stats = agent.stop()?;
    let records = read_jsonl(&records_path)?;
    Ok(Run {
        summary,
        records,
        tls_port,
        stats,
    })
}

fn dataset_of<'a>(records: &'a [Value], ds: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| get(r, "event.dataset").as_str() == Some(ds))
        .collect()
}

/// RFC 3339 (as the agent writes it, UTC, µs) to Unix seconds.
fn unix_s(ts: &str) -> Result<f64> {
    let (date, time) = ts
        .trim_end_matches('Z')
        .split_once('T')
        .context("timestamp")?;
    let d: Vec<i64> = date.split('-').map(|x| x.parse().unwrap_or(0)).collect();
    let t: Vec<f64> = time.split(':').map(|x| x.parse().unwrap_or(0.0)).collect();
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m, dd) = (if d[1] <= 2 { d[0] - 1 } else { d[0] }, d[1], d[2]);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Ok(days as f64 * 86400.0 + t[0] * 3600.0 + t[1] * 60.0 + t[2])
}

const TRAFFIC: &[&str] = &[
    "--users",
    "30",
    "--concurrency",
    "8",
    "--duration",
    "10",
    "--seed",
    "3",
    "--quiet",
];

#[test]
fn incident_is_alerted_and_blocked_others_unaffected() -> Result<()> {
    let mut args = TRAFFIC.to_vec();
    args.extend(["--abuser", "--abuser-delay", "2"]);
    let r = run("detect-incident", |c| c, &args)?;
    let s = &r.summary;
    let abuser = s["config"]["abuserUserId"]
        .as_u64()
        .context("abuser id")?
        .to_string();
    let front = records_on_port(&r.records, r.tls_port);

    // The first cross-tenant success at nginx, and the alert it raised.
    let mut cross: Vec<&&Value> = front
        .iter()
        .filter(|x| get(x, "abook.cross_tenant").as_bool() == Some(true))
        .collect();
    cross.sort_by(|a, b| {
        get(a, "@timestamp")
            .as_str()
            .cmp(&get(b, "@timestamp").as_str())
    });
    let first = cross
        .first()
        .context("no cross-tenant access was recorded")?;
    ensure!(
        get(first, "user.id").as_str() == Some(abuser.as_str()),
        "the first cross-tenant access is not the abuser's: {first}"
    );
    let alerts = dataset_of(&r.records, "sparbar.alert");
    let xt: Vec<&&Value> = alerts
        .iter()
        .filter(|a| get(a, "rule.id").as_str() == Some("cross-tenant"))
        .collect();
    let a = xt.first().context("no cross-tenant alert")?;
    let evidence = get(a, "abook.evidence.event_ids")
        .as_array()
        .context("evidence")?;
    ensure!(
        evidence.last() == Some(get(first, "event.id")),
        "the cross-tenant alert was not raised by the first cross-tenant success {}: {a}",
        get(first, "event.id")
    );
    ensure!(
        get(a, "user.id").as_str() == Some(abuser.as_str())
            && get(a, "event.kind").as_str() == Some("alert"),
        "alert fields: {a}"
    );
    for al in &alerts {
        ensure!(
            get(al, "user.id").as_str() == Some(abuser.as_str()),
            "an alert for someone other than the abuser: {al}"
        );
    }

    // The decision: started by that rule, enforced (connections reset).
    let decisions = dataset_of(&r.records, "sparbar.decision");
    let start = decisions
        .iter()
        .find(|d| get(d, "event.action").as_str() == Some("block_start"))
        .context("no block decision")?;
    ensure!(
        get(start, "abook.decision.value").as_str() == Some(abuser.as_str())
            && get(start, "abook.decision.scope").as_str() == Some("user")
            && get(start, "abook.decision.rule_id").as_str() == Some("cross-tenant")
            && get(start, "abook.decision.level").as_u64() == Some(1)
            && get(start, "abook.decision.duration_s").as_u64() == Some(600),
        "decision fields: {start}"
    );
    let enforced = decisions
        .iter()
        .find(|d| get(d, "event.action").as_str() == Some("block_enforced"))
        .context("the decision was never enforced")?;
    ensure!(
        get(enforced, "abook.decision.enforcement.connections_reset")
            .as_u64()
            .unwrap_or(0)
            >= 1,
        "no connection was reset: {enforced}"
    );
    for d in &decisions {
        ensure!(
            get(d, "abook.decision.value").as_str() == Some(abuser.as_str()),
            "a decision about someone other than the abuser: {d}"
        );
    }

    // At the client: no address-book answer to the abuser for any request sent after the
    // decision was made.
    let decided = unix_s(get(start, "event.created").as_str().context("created")?)?;
    let t0 = s["startedAt"].as_f64().context("startedAt")?;
    let reqs = s["requests"].as_array().context("requests")?;
    let mut after = 0;
    let mut leaked = Vec::new();
    for q in reqs.iter().filter(|q| q["abuser"] == true) {
        let sent = t0 + q["t"].as_f64().unwrap_or(0.0);
        if sent <= decided {
            continue;
        }
        after += 1;
        let abook = q["route"]
            .as_str()
            .is_some_and(|x| x.starts_with("GET /api/addressbook/"));
        if abook && q["status"].as_u64().is_some() {
            leaked.push(format!("{} {} -> {}", q["seq"], q["path"], q["status"]));
        }
    }
    ensure!(
        after > 0,
        "the abuser sent nothing after the decision, so the test proves nothing"
    );
    ensure!(
        leaked.is_empty(),
        "{} address-book answers reached the abuser after the decision: {:?}",
        leaked.len(),
        &leaked[..leaked.len().min(5)]
    );

    // Everyone else: no transport error, no record blocked, no alert.
    let tot = &s["totals"];
    ensure!(
        tot["transportErrors"] == 0,
        "ordinary users had transport errors: {tot}"
    );
    for x in &front {
        if get(x, "abook.enforcement.blocked").as_bool() == Some(true) {
            ensure!(
                get(x, "user.id").as_str() == Some(abuser.as_str()),
                "an ordinary user's call was blocked: {x}"
            );
        }
    }
    Ok(())
}

#[test]
fn shadow_mode_alerts_but_never_blocks() -> Result<()> {
    let mut args = TRAFFIC.to_vec();
    args.push("--abuser");
    let r = run(
        "detect-shadow",
        |c| {
            c.replace(
                "kind = \"cross_tenant\"",
                "kind = \"cross_tenant\"\nshadow = true",
            )
        },
        &args,
    )?;
    let alerts = dataset_of(&r.records, "sparbar.alert");
    let xt: Vec<&&Value> = alerts
        .iter()
        .filter(|a| get(a, "rule.id").as_str() == Some("cross-tenant"))
        .collect();
    ensure!(!xt.is_empty(), "shadow mode raised no cross-tenant alert");
    ensure!(
        xt.iter()
            .all(|a| get(a, "abook.alert.shadow").as_bool() == Some(true)),
        "a shadow alert not marked shadow"
    );
    // Other (enforcing) rules may still fire on the abuser; the cross-tenant rule never blocks.
    for d in dataset_of(&r.records, "sparbar.decision") {
        ensure!(
            get(d, "abook.decision.rule_id").as_str() != Some("cross-tenant"),
            "a shadow rule made a decision: {d}"
        );
    }
    Ok(())
}

#[test]
fn an_ordinary_school_day_raises_nothing() -> Result<()> {
    let r = run("detect-day", |c| c, TRAFFIC)?;
    let alerts = dataset_of(&r.records, "sparbar.alert");
    let decisions = dataset_of(&r.records, "sparbar.decision");
    ensure!(
        alerts.is_empty() && decisions.is_empty(),
        "ordinary users raised {} alerts and {} decisions: {:?}",
        alerts.len(),
        decisions.len(),
        alerts.iter().take(3).collect::<Vec<_>>()
    );
    let s = &r.summary;
    let reqs = s["requests"].as_array().map(Vec::len).unwrap_or(0);
    let front = records_on_port(&r.records, r.tls_port);
    ensure!(
        front.len() == reqs,
        "{} records for {reqs} requests",
        front.len()
    );
    ensure!(
        r.stats.agent("detector_accesses_total") == reqs as u64,
        "the detectors saw {} calls of {reqs}",
        r.stats.agent("detector_accesses_total")
    );
    if s["totals"]["transportErrors"] != 0 {
        bail!("transport errors: {}", s["totals"]);
    }
    Ok(())
}
