//! Reloading the configuration on SIGHUP under traffic, against real nginx/TLS: no record is
//! lost across the reload, the new routes apply to the calls after it, a new sink starts, and
//! an invalid configuration is refused with its reason while the running one goes on.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{ensure, Result};
use serde_json::Value;
use sparbar_tests::*;

fn config(route_name: &str, extra: &str) -> String {
    format!(
        r#"
[agent]
state_dir = "@DIR@"
stats_interval = "1s"

[[targets]]
exe = "/usr/sbin/nginx"
name = "nginx"

[[routes]]
route = "GET /api/test/bytes/{{n}}"
name = "{route_name}"

[output]
file = "@DIR@/access.jsonl"
{extra}
"#
    )
}

#[test]
fn sighup_reloads_under_traffic_without_losing_a_record() -> Result<()> {
    require_root()?;
    let dir = scratch("reload");
    let tls_port = free_port();
    let platform = Platform::up(&dir.join("platform"), tls_port, free_port(), false)?;
    let url = format!("https://127.0.0.1:{tls_port}");
    let state = dir.join("agent");
    let agent = Agent::start(&state, &config("test.before", ""))?;
    let cfg_path = state.join("sparbar.toml");
    // Traffic in rounds until told to stop, so it spans both reloads.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (u2, c2, s2) = (url.clone(), platform.cert(), stop.clone());
    let traffic = std::thread::spawn(move || -> Result<(usize, Vec<Value>)> {
        let (mut sent, mut errors) = (0, Vec::new());
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            let r = load(&u2, Some(&c2), 200, 4, &[10, 5000], "GET")?;
            sent += r["requests"].as_array().map_or(0, |a| a.len());
            errors.extend(r["errors"].as_array().cloned().unwrap_or_default());
        }
        Ok((sent, errors))
    });
    std::thread::sleep(Duration::from_millis(1500));

    // An invalid configuration is refused; the running one goes on.
    std::fs::write(&cfg_path, "[agent]\nstate_dir = \"relative\"\n")?;
    agent.proc.signal(libc::SIGHUP);
    agent.wait_log(&["the new configuration is rejected"])?;

    // A valid one: a renamed route and a second file sink.
    let second = state.join("second.jsonl");
    std::fs::write(
        &cfg_path,
        config(
            "test.after",
            &format!(
                "\n[[sinks]]\ntype = \"file\"\nname = \"second\"\npath = \"{}\"\n",
                second.display()
            ),
        )
        .replace("@DIR@", &state.display().to_string()),
    )?;
    agent.proc.signal(libc::SIGHUP);
    agent.wait_log(&["configuration reloaded"])?;
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, errors) = traffic.join().expect("load thread")?;
    ensure!(errors.is_empty(), "client errors: {errors:?}");
    let stats = agent.stop()?;

    let records = read_jsonl(&state.join("access.jsonl"))?;
    let access: Vec<&Value> = records
        .iter()
        .filter(|r| r["event"]["dataset"] == "sparbar.access")
        .collect();
    let mut by_route: BTreeMap<String, usize> = BTreeMap::new();
    for r in &access {
        *by_route
            .entry(
                get(r, "sparbar.route.name")
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            )
            .or_default() += 1;
    }
    ensure!(
        access.len() == sent,
        "{} records for {sent} requests: {by_route:?}",
        access.len()
    );
    ensure!(
        by_route.len() == 2
            && by_route.get("test.before").is_some_and(|n| *n > 0)
            && by_route.get("test.after").is_some_and(|n| *n > 0),
        "routes before and after the reload: {by_route:?}"
    );
    // Once renamed, never the old name again (records in file order are by completion).
    let first_after = access
        .iter()
        .position(|r| get(r, "sparbar.route.name") == "test.after")
        .unwrap_or(0);
    let late_before = access[first_after..]
        .iter()
        .filter(|r| get(r, "sparbar.route.name") == "test.before")
        .count();
    ensure!(late_before <= 8, "{late_before} records of the old route after the first of the new (8 connections in flight at most)");
    no_losses(&stats)?;
    ensure!(
        stats.agent("config_reloads_total{result=\"applied\"}") == 1,
        "applied reloads"
    );
    ensure!(
        stats.agent("config_reloads_total{result=\"rejected\"}") == 1,
        "rejected reloads"
    );
    let trail = read_trail(&state.join("access.jsonl"))?;
    let events: Vec<&str> = trail
        .iter()
        .filter(|r| r["event"]["dataset"] == "sparbar.agent")
        .filter_map(|r| r["event"]["action"].as_str())
        .collect();
    ensure!(
        events == ["started", "reload_rejected", "reloaded"],
        "agent events: {events:?}"
    );
    let rejected = trail
        .iter()
        .find(|r| r["event"]["action"] == "reload_rejected")
        .unwrap();
    ensure!(
        rejected["sparbar"]["agent"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("agent.state_dir")),
        "the rejection's reason: {}",
        rejected["sparbar"]["agent"]
    );
    // The new sink got the records from its start: at least every call after the reload.
    let second_recs = read_jsonl(&second)?;
    let after = access
        .iter()
        .filter(|r| get(r, "sparbar.route.name") == "test.after")
        .count();
    ensure!(
        second_recs
            .iter()
            .filter(|r| r["event"]["dataset"] == "sparbar.access")
            .count()
            >= after,
        "the second sink has fewer records than were made after the reload"
    );
    drop(platform);
    Ok(())
}
