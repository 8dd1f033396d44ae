//! The audit trail under faults, end to end against real nginx/TLS: the agent killed during
//! traffic, sinks that go away, a spool whose disk fills up, tampering. Each test counts the
//! distinct event ids received against the ids produced and fails on any difference that is
//! not stated in a gap record.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use sparbar_tests::*;

fn config(targets: &str, extra: &str) -> String {
    format!(
        r#"
[agent]
state_dir = "@DIR@"
stats_interval = "1s"

{targets}

[[routes]]
route = "GET /api/test/bytes/{{n}}"
name = "test.bytes"

[output]
file = "@DIR@/access.jsonl"

{extra}
"#
    )
}

const NGINX: &str = "[[targets]]\nexe = \"/usr/sbin/nginx\"\nname = \"nginx\"\n";

fn stream_of(r: &Value) -> &str {
    r["sparbar"]["chain"]["stream"].as_str().unwrap_or("")
}

fn seq_of(r: &Value) -> u64 {
    r["event"]["sequence"].as_u64().unwrap_or(0)
}

/// The last sequence the spool holds for `stream` (what was written before a kill).
fn spool_head(state_dir: &Path, stream: &str) -> Result<u64> {
    let dir = state_dir.join("spool").join(stream);
    let mut segs: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            n.strip_suffix(".seg")?.parse::<u64>().ok()
        })
        .collect();
    segs.sort();
    let Some(last) = segs.last() else {
        bail!("no segments in {}", dir.display())
    };
    let text = std::fs::read(dir.join(format!("{last:020}.seg")))?;
    let whole = text.iter().filter(|b| **b == b'\n').count() as u64;
    Ok(last + whole - 1)
}

/// `sparbar verify` on `files`; its exit code and output.
pub fn verify(files: &[&Path], key: Option<&Path>) -> Result<(i32, String)> {
    let mut c = Command::new(agent_bin()?);
    c.arg("verify");
    if let Some(k) = key {
        c.arg("--key").arg(k);
    }
    c.args(files);
    let out = c.output().context("running sparbar verify")?;
    Ok((
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// The agent is SIGKILLed while nginx serves a steady load and the file sink delivers; after
/// the restart every record that was in the spool at the kill is delivered, the chain is whole
/// (sparbar verify passes), and a gap record states the time the agent was not running.
#[test]
fn sigkill_during_traffic_loses_nothing_spooled_and_states_the_gap() -> Result<()> {
    require_root()?;
    let dir = scratch("ship-kill");
    let tls_port = free_port();
    let platform = Platform::up(&dir.join("platform"), tls_port, free_port(), false)?;
    let url = format!("https://127.0.0.1:{tls_port}");
    let state = dir.join("agent");
    let cfg = config(NGINX, "[spool]\ncheckpoint_interval = \"1s\"\n");
    let agent = Agent::start(&state, &cfg)?;
    let cert = platform.cert();
    let u2 = url.clone();
    let c2 = cert.clone();
    let traffic = std::thread::spawn(move || load(&u2, Some(&c2), 3000, 8, &[10, 2000], "GET"));
    // Kill once a good part of the traffic is recorded.
    let t0 = Instant::now();
    loop {
        let n = std::fs::read(state.join("access.jsonl"))
            .map(|b| b.iter().filter(|c| **c == b'\n').count())
            .unwrap_or(0);
        if n >= 600 {
            break;
        }
        ensure!(t0.elapsed() < Duration::from_secs(60), "only {n} records after 60 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let killed_at = std::time::SystemTime::now();
    agent.proc.signal(libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(200));
    let head_at_kill = spool_head(&state, "access")?;
    drop(agent);
    let report = traffic.join().expect("load thread")?;
    ensure!(
        report["errors"].as_array().is_some_and(|e| e.is_empty()),
        "the servers failed while the agent was killed: {}",
        report["errors"]
    );
    let agent = Agent::start(&state, &cfg)?;
    load(&url, Some(&cert), 20, 2, &[10], "GET")?;
    let stats = agent.stop()?;

    let file = state.join("access.jsonl");
    let trail = read_trail(&file)?;
    let access: BTreeSet<u64> = trail
        .iter()
        .filter(|r| stream_of(r) == "access")
        .map(seq_of)
        .collect();
    let missing: Vec<u64> = (1..=head_at_kill).filter(|s| !access.contains(s)).collect();
    ensure!(
        missing.is_empty(),
        "{} of the {head_at_kill} access records spooled before the kill never reached the file: {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    let last = *access.iter().next_back().unwrap_or(&0);
    ensure!(
        access.len() as u64 == last && last >= head_at_kill + 20,
        "access sequences 1..{last}: {} distinct",
        access.len()
    );
    // Distinct event ids = distinct sequences: no record was sealed twice.
    let ids: BTreeSet<&str> = trail
        .iter()
        .filter(|r| stream_of(r) == "access")
        .filter_map(|r| r["event"]["id"].as_str())
        .collect();
    ensure!(ids.len() as u64 == last, "{} ids for {last} sequences", ids.len());
    let gaps: Vec<&Value> = trail
        .iter()
        .filter(|r| r["event"]["dataset"] == "sparbar.gap" && r["sparbar"]["gap"]["reason"] == "agent_crashed")
        .collect();
    ensure!(gaps.len() == 1, "{} agent_crashed gap records", gaps.len());
    let killed_ms = killed_at.duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
    let start = ms(gaps[0]["sparbar"]["gap"]["start"].as_str().unwrap_or(""))?;
    let end = ms(gaps[0]["sparbar"]["gap"]["end"].as_str().unwrap_or(""))?;
    ensure!(
        start <= killed_ms && killed_ms <= end,
        "the gap {start}..{end} does not cover the kill at {killed_ms}"
    );
    ensure!(
        killed_ms - start <= 2_000,
        "the gap starts {} ms before the kill; the heartbeat is every second",
        killed_ms - start
    );
    let (code, out) = verify(&[&file], Some(&state.join("checkpoint.pub")))?;
    ensure!(code == 0, "sparbar verify failed ({code}):\n{out}");
    ensure!(
        stats.agent("records_dropped_total{reason=\"spool_full\",stream=\"access\"}") == 0,
        "spool drops"
    );
    drop(platform);
    Ok(())
}

/// RFC 3339 with microseconds and Z, to Unix ms.
fn ms(t: &str) -> Result<i64> {
    let out = Command::new("date")
        .args(["-u", "-d", t, "+%s%3N"])
        .output()?;
    ensure!(out.status.success(), "date -d {t:?}");
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

#[allow(dead_code)]
fn count_by<'a>(recs: impl Iterator<Item = &'a Value>, key: &str) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in recs {
        *m.entry(get(r, key).to_string()).or_insert(0) += 1;
    }
    m
}
