//! `cargo xtask demo`: the demo platform behind real nginx/TLS with the incident's flaw switched
//! on, the agent attached, ordinary users and one abusive pupil, then a summary of what the
//! agent recorded.

use std::{collections::BTreeMap, path::Path, process::Command};

use anyhow::{Context as _, Result};
use serde_json::Value;
use sparbar_tests::{free_port, get, output, read_jsonl, repo_root, Agent, Platform};

use crate::step;

pub fn run(bin: &Path, duration: u64) -> Result<()> {
    std::env::set_var("SPARBAR_BIN", bin);
    let dir = repo_root().join("target/demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (tls_port, app_port) = (free_port(), free_port());
    step(&format!("starting the demo platform: nginx TLS on :{tls_port} → app on :{app_port} (vulnerable schoolId switch ON)"));
    let platform = Platform::up(&dir.join("platform"), tls_port, app_port, true)?;

    step("starting the agent (sparbar run)");
    let cfg = std::fs::read_to_string(repo_root().join("tests/demo/sparbar.demo.toml"))?
        .replace("@APP_PID@", &platform.pid("app_pid").to_string())
        .replace("@APP_PORT@", &app_port.to_string())
        .replace(
            "@JWT_SECRET_FILE@",
            &sparbar_tests::jwt_secret_file(&platform)?
                .display()
                .to_string(),
        );
    let agent = Agent::start(&dir.join("agent"), &cfg)?;

    step(&format!("running {duration} s of traffic: ordinary teachers, pupils, guardians, and one abusive pupil"));
    let summary_path = dir.join("traffic.json");
    output(
        Command::new("python3")
            .arg(repo_root().join("tests/demo/traffic.py"))
            .args([
                "--base",
                &format!("https://127.0.0.1:{tls_port}"),
                "--cafile",
                &platform.cert(),
            ])
            .args([
                "--data",
                platform.info["dataset"].as_str().unwrap_or_default(),
            ])
            .args([
                "--users",
                "40",
                "--duration",
                &duration.to_string(),
                "--abuser",
                "--quiet",
                "--out",
            ])
            .arg(&summary_path),
    )?;
    step("stopping the agent (SIGTERM: drain, flush, detach)");
    let records_path = agent.records.clone();
    let stats = agent.stop()?;
    let records = read_jsonl(&records_path)?;
    let traffic: Value = serde_json::from_str(&std::fs::read_to_string(&summary_path)?)
        .context("traffic summary")?;
    drop(platform);

    let sent = traffic["requests"].as_array().map(|a| a.len()).unwrap_or(0);
    let front: Vec<&Value> = records
        .iter()
        .filter(|r| get(r, "server.port").as_u64() == Some(tls_port as u64))
        .collect();
    let upstream = records
        .iter()
        .filter(|r| get(r, "server.port").as_u64() == Some(app_port as u64))
        .count();
    let mut per_route: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for r in &front {
        let name = get(r, "sparbar.route.name")
            .as_str()
            .unwrap_or("(unmatched)")
            .to_string();
        let e = per_route.entry(name).or_default();
        e.0 += 1;
        if get(r, "http.response.status_code").as_u64().unwrap_or(0) >= 400 {
            e.1 += 1;
        }
    }
    println!();
    println!("Spårbar demo summary");
    println!("  requests sent by the traffic generator : {sent}");
    println!("  exchanges recorded at nginx (TLS)      : {}", front.len());
    println!("  exchanges recorded at the app (plain)  : {upstream}");
    println!("  per route (at nginx)                   : records / of which 4xx-5xx");
    for (k, (n, e)) in &per_route {
        println!("    {k:<28} {n:>6} / {e}");
    }
    attribution_summary(&front);
    detection_summary(&records, &traffic);
    trail_summary(&records_path, &dir.join("agent"), bin)?;
    let losses = stats.losses();
    println!(
        "  losses                                 : {}",
        if losses.is_empty() {
            "none".to_string()
        } else {
            format!("{losses:?}")
        }
    );
    println!(
        "  kernel events / payload bytes          : {} / {}",
        stats.kernel("kernel_events_sent_total"),
        stats.kernel("kernel_bytes_captured_total")
    );
    println!(
        "  records                                : {}",
        records_path.display()
    );
    println!(
        "  agent counters                         : {}",
        dir.join("agent/stats.json").display()
    );
    println!(
        "  traffic generator's own account        : {}",
        summary_path.display()
    );
    Ok(())
}

/// A cross-tenant caller: (role, own school, answers, schools hit, persons, answers blocked).
type Cross = (
    String,
    String,
    usize,
    std::collections::BTreeSet<String>,
    u64,
    usize,
);

/// Who called and whose data left, as the records at nginx tell it.
fn attribution_summary(front: &[&Value]) {
    use std::collections::BTreeSet;
    let s = |r: &Value, p: &str| get(r, p).as_str().map(str::to_string);
    let mut sources: BTreeMap<String, usize> = BTreeMap::new();
    let mut users: BTreeMap<String, String> = BTreeMap::new();
    let mut subjects: BTreeSet<String> = BTreeSet::new();
    let mut omitted = 0u64;
    let mut disclosing = 0usize;
    let mut categories: BTreeSet<String> = BTreeSet::new();
    // Cross-tenant callers: user -> (role, own school, records, schools hit, persons).
    let mut cross: BTreeMap<String, Cross> = BTreeMap::new();
    for r in front {
        let src = s(r, "abook.identity.source").unwrap_or_else(|| "(none)".into());
        *sources.entry(src).or_default() += 1;
        if let Some(u) = s(r, "user.id") {
            let e = users.entry(u).or_insert_with(|| "role unknown".into());
            if let Some(role) = get(r, "user.roles")[0].as_str() {
                *e = role.to_string();
            }
        }
        if let Some(ids) = get(r, "abook.target.ids").as_array() {
            disclosing += 1;
            subjects.extend(ids.iter().filter_map(|v| v.as_str().map(str::to_string)));
            omitted += get(r, "abook.target.ids_omitted").as_u64().unwrap_or(0);
        }
        if let Some(c) = get(r, "abook.data_categories").as_array() {
            categories.extend(c.iter().filter_map(|v| v.as_str().map(str::to_string)));
        }
        if get(r, "abook.cross_tenant").as_bool() == Some(true) {
            let u = s(r, "user.id").unwrap_or_else(|| "?".into());
            let e = cross.entry(u).or_insert_with(|| {
                (
                    get(r, "user.roles")[0].as_str().unwrap_or("?").to_string(),
                    s(r, "organization.id").unwrap_or_default(),
                    0,
                    BTreeSet::new(),
                    0,
                    0,
                )
            });
            e.2 += 1;
            if get(r, "abook.enforcement.blocked").as_bool() == Some(true) {
                e.5 += 1;
            }
            e.4 += get(r, "abook.target.count").as_u64().unwrap_or(0);
            if let Some(t) = get(r, "abook.target.tenants").as_array() {
                e.3.extend(t.iter().filter_map(|v| v.as_str().map(str::to_string)));
            }
        }
    }
    let attributed = front
        .iter()
        .filter(|r| !get(r, "user.id").is_null())
        .count();
    println!(
        "  attributed to a user (at nginx)        : {attributed} of {} records",
        front.len()
    );
    println!(
        "    identity sources                     : {}",
        sources
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut roles: BTreeMap<&str, usize> = BTreeMap::new();
    for r in users.values() {
        *roles.entry(r).or_default() += 1;
    }
    println!(
        "    distinct users                       : {} ({})",
        users.len(),
        roles
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  answers that disclosed personal data   : {disclosing}, of {} distinct persons listed ({omitted} more counted, not listed)",
        subjects.len()
    );
    println!(
        "    categories disclosed                 : {}",
        categories.into_iter().collect::<Vec<_>>().join(", ")
    );
    if cross.is_empty() {
        println!("  cross-tenant disclosures               : none");
    }
    for (u, (role, own, n, hit, persons, blocked)) in &cross {
        println!(
            "  cross-tenant disclosures               : user {u} ({role} of {own}): {n} answers, {persons} persons, schools hit: {}",
            hit.iter().filter(|t| *t != own).cloned().collect::<Vec<_>>().join(", ")
        );
        if *blocked > 0 {
            println!(
                "    of which blocked in the kernel       : {blocked} (written by the server, dropped before leaving the host)"
            );
        }
    }
}

/// What the detectors raised and what was decided and enforced.
fn detection_summary(records: &[Value], traffic: &Value) {
    let of = |ds: &str| -> Vec<&Value> {
        records
            .iter()
            .filter(|r| get(r, "event.dataset").as_str() == Some(ds))
            .collect()
    };
    let alerts = of("sparbar.alert");
    let mut per_rule: BTreeMap<String, (usize, std::collections::BTreeSet<String>)> =
        BTreeMap::new();
    for a in &alerts {
        let e = per_rule
            .entry(get(a, "rule.id").as_str().unwrap_or("?").to_string())
            .or_default();
        e.0 += 1;
        e.1.insert(get(a, "user.id").as_str().unwrap_or("?").to_string());
    }
    println!(
        "  alerts                                 : {}",
        alerts.len()
    );
    for (rule, (n, users)) in &per_rule {
        println!(
            "    {rule:<28} {n:>6}  users: {}",
            users.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    for d in of("sparbar.decision") {
        let action = get(d, "event.action").as_str().unwrap_or("?");
        let dec = get(d, "abook.decision");
        let extra = match action {
            "block_enforced" | "block_end" => format!(
                " (connections reset {}, tokens refused in the kernel {})",
                dec["enforcement"]["connections_reset"], dec["enforcement"]["tokens_blocked"]
            ),
            _ => String::new(),
        };
        println!(
            "  decision {action:<14}               : {} {} by {} (level {}, {} s){extra}",
            dec["scope"].as_str().unwrap_or("?"),
            dec["value"].as_str().unwrap_or("?"),
            dec["rule_id"].as_str().unwrap_or("operator"),
            dec["level"],
            dec["duration_s"],
        );
    }
    let ab = &traffic["totals"]["abusive"];
    println!(
        "  the abuser, as its client saw it       : {} requests, statuses {}, failed (blocked) {}",
        ab["requests"], ab["perStatus"], ab["transportErrors"]
    );
}

/// The audit trail: both streams' sequences, the trail's own records, and `sparbar verify`.
fn trail_summary(records: &Path, state: &Path, bin: &Path) -> Result<()> {
    let all = sparbar_tests::read_trail(records)?;
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    let mut own: BTreeMap<String, usize> = BTreeMap::new();
    for r in &all {
        let stream = get(r, "sparbar.chain.stream")
            .as_str()
            .unwrap_or("?")
            .to_string();
        let seq = get(r, "event.sequence").as_u64().unwrap_or(0);
        let e = last.entry(stream).or_default();
        *e = (*e).max(seq);
        if sparbar_tests::is_trail_record(r) {
            *own.entry(get(r, "event.dataset").as_str().unwrap_or("?").to_string())
                .or_default() += 1;
        }
    }
    println!(
        "  audit trail (both streams in the file) : {}",
        last.iter()
            .map(|(s, n)| format!("{s} 1..{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  the trail's own records                : {}",
        own.iter()
            .map(|(d, n)| format!("{d} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let out = Command::new(bin)
        .arg("verify")
        .arg("--key")
        .arg(state.join("checkpoint.pub"))
        .arg(records)
        .output()
        .context("running sparbar verify")?;
    let text = String::from_utf8_lossy(&out.stdout);
    println!(
        "  sparbar verify                         : {}",
        text.lines().last().unwrap_or("(no output)")
    );
    Ok(())
}
