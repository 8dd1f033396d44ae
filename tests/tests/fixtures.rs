//! Makes the replay fixtures of tracer-user/tests/fixtures from a real run. Ignored: run it on
//! purpose to record them again, as root, with the agent built:
//! `SPARBAR_BIN=target/release/sparbar cargo test --release -p sparbar-tests --test fixtures -- --ignored --nocapture`
//!
//! `incident`: the incident in three calls through nginx/TLS with the flaw switched on. A pupil
//! of sch-01 logs in, then on one keep-alive connection asks who it is (`/api/me`, where the
//! agent learns its school), reads a page of its own school's address book and a page of
//! sch-02's (the manipulated parameter). The second answer is a
//! cross-tenant disclosure: the agent alerts, decides a block of the pupil and blocks its
//! connection and session token in the kernel. The raw ring-buffer events (`--tap-events`), the
//! configuration and the security records the live agent wrote are kept.

use std::path::Path;

use anyhow::{ensure, Context as _, Result};
use serde_json::{json, Value};
use sparbar_tests::*;

fn curl(cert: &str, args: &[&str]) -> Result<String> {
    output(
        std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code} "])
            .args(["--max-time", "4", "--cacert", cert])
            .args(args),
    )
}

#[test]
#[ignore = "records fixtures; run on purpose"]
fn record_incident_fixture() -> Result<()> {
    require_root()?;
    let dir = scratch("fixture-incident");
    let (tls_port, app_port) = (free_port(), free_port());
    let platform = Platform::up(&dir.join("platform"), tls_port, app_port, true)?;
    let ds: Value = serde_json::from_str(&std::fs::read_to_string(
        platform.info["dataset"].as_str().unwrap_or_default(),
    )?)?;
    let pupil = ds["accounts"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|x| x["role"] == "pupil" && x["schoolId"] == "sch-01")
        })
        .context("no pupil of sch-01 in the dataset")?
        .clone();
    // Only the cross-tenant rule: the fixture shows one alert, one decision, one block.
    let mut config = demo_config(&platform)?;
    let rules_at = config
        .find("[[rules]]")
        .context("demo config has no rules")?;
    config.truncate(rules_at);
    config.push_str(
        "[[rules]]\nid = \"cross-tenant\"\nname = \"address book of another school\"\nkind = \"cross_tenant\"\nblock = [\"10m\", \"1h\", \"24h\"]\n",
    );
    let events = dir.join("incident.events");
    let agent = Agent::start_with(
        &dir.join("agent"),
        &config,
        &["--tap-events", &events.display().to_string()],
    )?;
    let cert = platform.cert();
    let url = format!("https://127.0.0.1:{tls_port}");
    let jar = dir.join("jar");
    let login = curl(
        &cert,
        &[
            "-c",
            &jar.display().to_string(),
            "--data-urlencode",
            &format!(
                "username={}",
                pupil["username"].as_str().unwrap_or_default()
            ),
            "--data-urlencode",
            &format!(
                "password={}",
                pupil["password"].as_str().unwrap_or_default()
            ),
            &format!("{url}/login"),
        ],
    )?;
    let pages = curl(
        &cert,
        &[
            "-b",
            &jar.display().to_string(),
            // The platform's client asks who it is first: that is where the agent learns the
            // pupil's school.
            &format!("{url}/api/me"),
            // One output per URL: the helper's `-o` covers the first.
            "-o",
            "/dev/null",
            &format!("{url}/api/addressbook/persons?schoolId=sch-01&page=1&pageSize=20"),
            "-o",
            "/dev/null",
            &format!("{url}/api/addressbook/persons?schoolId=sch-02&page=1&pageSize=20"),
        ],
    )?;
    eprintln!("login: {login}; calls: {pages}");
    ensure!(login.trim() == "200", "login answered {login}");
    ensure!(
        pages.trim() == "200 200 200",
        "the two pages answered {pages}: the flaw must let the second through"
    );
    // Give the agent a moment to read the answers before the stop drains them.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let trail = agent.records.clone();
    agent.stop()?;
    drop(platform);
    let security = read_jsonl(&trail).unwrap_or_default();
    let live: Vec<Value> = security
        .iter()
        .filter(|r| {
            matches!(
                get(r, "event.dataset").as_str(),
                Some("sparbar.alert") | Some("sparbar.decision")
            )
        })
        .map(|r| {
            json!({
                "dataset": get(r, "event.dataset"), "action": get(r, "event.action"),
                "rule": get(r, "rule.id"), "user": get(r, "user.id"),
                "scope": get(r, "abook.decision.scope"), "value": get(r, "abook.decision.value"),
                "enforcement": get(r, "abook.decision.enforcement"),
            })
        })
        .collect();
    ensure!(
        !live.is_empty(),
        "the live agent wrote no alert or decision"
    );
    let out = repo_root().join("tracer-user/tests/fixtures");
    std::fs::copy(&events, out.join("incident.events"))?;
    let header = format!(
        "# The configuration the replay fixture incident.events was captured with (demo platform,\n# nginx TLS on {tls_port} in front of the app on {app_port}; see tests/tests/fixtures.rs).\n# Used by tracer-user/tests/replay.rs.\n\n"
    );
    let config = config.replace("@DIR@", "/tmp/sparbar-replay");
    std::fs::write(out.join("incident.toml"), header + &config)?;
    std::fs::write(
        out.join("incident.live.json"),
        serde_json::to_string_pretty(
            &json!({"pupil": pupil["userId"], "tls_port": tls_port, "security": live}),
        )?,
    )?;
    eprintln!(
        "fixture written to {}: {} live security records",
        out.display(),
        live.len()
    );
    let _ = Path::new(&events);
    Ok(())
}
