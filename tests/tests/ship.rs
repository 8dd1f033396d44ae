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
    // The file sink and an Elasticsearch receiver, which is slower: both have records in
    // flight at the kill.
    let rx = Receiver::start("elastic")?;
    let cfg = bytes_config(
        NGINX,
        &format!(
            "[spool]\ncheckpoint_interval = \"1s\"\n\n[[sinks]]\ntype = \"elasticsearch\"\nname = \"es\"\nurl = \"http://127.0.0.1:{}\"\nbatch_records = 100\n",
            rx.data
        ),
    );
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
        ensure!(
            t0.elapsed() < Duration::from_secs(60),
            "only {n} records after 60 s"
        );
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
    wait_caught_up(&agent, "es", Duration::from_secs(60))?;
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
    ensure!(
        ids.len() as u64 == last,
        "{} ids for {last} sequences",
        ids.len()
    );
    let gaps: Vec<&Value> = trail
        .iter()
        .filter(|r| {
            r["event"]["dataset"] == "sparbar.gap"
                && r["sparbar"]["gap"]["reason"] == "agent_crashed"
        })
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
    let key = state.join("checkpoint.pub");
    let (code, out) = verify(&[&file], Some(&key))?;
    ensure!(code == 0, "sparbar verify failed ({code}):\n{out}");
    // The receiver has every access record that was in the spool at the kill.
    let got = rx.stored()?;
    let lost_at_es: Vec<u64> = trail
        .iter()
        .filter(|r| stream_of(r) == "access" && seq_of(r) <= head_at_kill)
        .filter(|r| !got.contains(r["event"]["id"].as_str().unwrap_or("")))
        .map(seq_of)
        .collect();
    ensure!(
        lost_at_es.is_empty(),
        "{} spooled access records never reached Elasticsearch: {:?}",
        lost_at_es.len(),
        &lost_at_es[..lost_at_es.len().min(20)]
    );
    ensure!(
        stats.agent("records_dropped_total{reason=\"spool_full\",stream=\"access\"}") == 0,
        "spool drops"
    );
    tampering_is_detected(&file, &key, &dir)?;
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

/// A small tmpfs, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Result<Tmpfs> {
        std::fs::create_dir_all(path)?;
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .status()?;
        ensure!(
            st.success(),
            "mounting a {size} tmpfs on {}",
            path.display()
        );
        Ok(Tmpfs(path.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The spool's filesystem fills up while a sink is down: the access records that could not be
/// spooled are stated exactly (count and time span) in gap records of the security stream,
/// which still gets written from its reserve; the file sink has every other record.
#[test]
fn a_full_spool_disk_is_stated_exactly_in_a_gap_record() -> Result<()> {
    require_root()?;
    let dir = scratch("ship-full");
    let tls_port = free_port();
    let platform = Platform::up(&dir.join("platform"), tls_port, free_port(), false)?;
    let url = format!("https://127.0.0.1:{tls_port}");
    let fs = Tmpfs::mount(&dir.join("spoolfs"), "3m")?;
    let dead = free_port(); // nothing listens: the sink retries all along
    let cfg = bytes_config(
        NGINX,
        &format!(
            r#"
[spool]
dir = "{}"
segment_bytes = "256KiB"
security_reserve = "512KiB"

[[sinks]]
type = "syslog"
name = "down"
address = "127.0.0.1:{dead}"
transport = "tcp"
"#,
            fs.0.join("spool").display()
        ),
    );
    let state = dir.join("agent");
    let agent = Agent::start(&state, &cfg)?;
    let sent = 4000;
    let report = load(&url, Some(&platform.cert()), sent, 8, &[10, 2000], "GET")?;
    ensure!(
        report["errors"].as_array().is_some_and(|e| e.is_empty()),
        "client errors: {}",
        report["errors"]
    );
    let stats = agent.stop()?;
    let trail = read_trail(&state.join("access.jsonl"))?;
    let ids: BTreeSet<&str> = trail
        .iter()
        .filter(|r| stream_of(r) == "access")
        .filter_map(|r| r["event"]["id"].as_str())
        .collect();
    let gaps: Vec<&Value> = trail
        .iter()
        .filter(|r| {
            r["event"]["dataset"] == "sparbar.gap" && r["sparbar"]["gap"]["stream"] == "access"
        })
        .collect();
    let stated: u64 = gaps
        .iter()
        .map(|g| g["sparbar"]["gap"]["records"].as_u64().unwrap_or(0))
        .sum();
    ensure!(
        gaps.iter()
            .all(|g| g["sparbar"]["gap"]["reason"] == "disk_full"
                && g["sparbar"]["gap"]["start"].is_string()
                && g["sparbar"]["gap"]["end"].is_string()),
        "gap records: {gaps:?}"
    );
    ensure!(
        stated > 0,
        "the disk never filled: {} records delivered, no gap",
        ids.len()
    );
    ensure!(
        ids.len() as u64 + stated == sent as u64,
        "{} delivered + {stated} stated lost != {sent} produced",
        ids.len()
    );
    let counted = stats.agent("records_dropped_total{reason=\"disk_full\",stream=\"access\"}");
    ensure!(counted == stated, "counted {counted}, stated {stated}");
    // The security stream kept going: the final checkpoint and state were written.
    ensure!(
        trail
            .iter()
            .any(|r| r["event"]["dataset"] == "sparbar.checkpoint"),
        "no checkpoint reached the file"
    );
    let (code, out) = verify(
        &[&state.join("access.jsonl")],
        Some(&state.join("checkpoint.pub")),
    )?;
    ensure!(code == 0, "sparbar verify ({code}):\n{out}");
    drop(fs);
    drop(platform);
    Ok(())
}

/// An Elasticsearch receiver is down for a minute while traffic goes on, then comes back:
/// every record the agent produced (access and security) arrives, none is lost.
#[test]
fn a_receiver_down_for_a_minute_gets_every_record_when_back() -> Result<()> {
    require_root()?;
    let dir = scratch("ship-down");
    let tls_port = free_port();
    let platform = Platform::up(&dir.join("platform"), tls_port, free_port(), false)?;
    let url = format!("https://127.0.0.1:{tls_port}");
    let rx = Receiver::start("elastic")?;
    let cfg = bytes_config(
        NGINX,
        &format!(
            "[[sinks]]\ntype = \"elasticsearch\"\nname = \"es\"\nurl = \"http://127.0.0.1:{}\"\nbatch_linger = \"100ms\"\n",
            rx.data
        ),
    );
    let state = dir.join("agent");
    let agent = Agent::start(&state, &cfg)?;
    let cert = platform.cert();
    let mut sent = load(&url, Some(&cert), 100, 4, &[10, 3000], "GET")?["requests"]
        .as_array()
        .map_or(0, |a| a.len());
    wait_caught_up(&agent, "es", Duration::from_secs(30))?;
    let before = rx.stored()?.len();
    rx.admin("/down", r#"{"seconds":60}"#)?;
    let down_at = Instant::now();
    while down_at.elapsed() < Duration::from_secs(55) {
        sent += load(&url, Some(&cert), 40, 2, &[10, 3000], "GET")?["requests"]
            .as_array()
            .map_or(0, |a| a.len());
        std::thread::sleep(Duration::from_millis(500));
    }
    let during = rx.stored()?.len();
    ensure!(
        during == before,
        "the receiver stored {} records while down",
        during - before
    );
    while down_at.elapsed() < Duration::from_secs(61) {
        std::thread::sleep(Duration::from_millis(200));
    }
    sent += load(&url, Some(&cert), 50, 2, &[10], "GET")?["requests"]
        .as_array()
        .map_or(0, |a| a.len());
    // The worker's backoff is at most 30 s.
    wait_caught_up(&agent, "es", Duration::from_secs(60))?;
    let stats = agent.stop()?;
    let trail = read_trail(&state.join("access.jsonl"))?;
    let access = trail.iter().filter(|r| stream_of(r) == "access").count();
    ensure!(
        access == sent,
        "{access} access records for {sent} requests"
    );
    let produced = file_ids(&trail);
    let got = rx.stored()?;
    // Everything, the final state and checkpoint written at stop included (the stop drains).
    let missing: Vec<&String> = produced.iter().filter(|id| !got.contains(*id)).collect();
    ensure!(
        missing.is_empty(),
        "{} of {} records never reached the receiver: {:?}",
        missing.len(),
        produced.len(),
        &missing[..missing.len().min(10)]
    );
    ensure!(
        got.iter().all(|id| produced.contains(id)),
        "the receiver has ids the agent never wrote"
    );
    ensure!(
        stats.agent("sink_retries_total{sink=\"es\"}") > 0,
        "no retry was counted"
    );
    ensure!(
        trail
            .iter()
            .any(|r| r["event"]["dataset"] == "sparbar.sink" && r["event"]["action"] == "down")
            && trail
                .iter()
                .any(|r| r["event"]["dataset"] == "sparbar.sink" && r["event"]["action"] == "up"),
        "no sink down/up records"
    );
    drop(platform);
    Ok(())
}

/// An Elasticsearch receiver answering 503s, a 429 with Retry-After, per-item 429s, and a 400
/// for some records: the refused records are in the dead-letter file with the reason, every
/// other record arrived, and the two add up exactly to what the agent produced.
#[test]
fn http_receiver_errors_are_retried_or_dead_lettered_exactly() -> Result<()> {
    require_root()?;
    let dir = scratch("ship-faults");
    let tls_port = free_port();
    let platform = Platform::up(&dir.join("platform"), tls_port, free_port(), false)?;
    let url = format!("https://127.0.0.1:{tls_port}");
    let rx = Receiver::start("elastic")?;
    rx.admin(
        "/config",
        r#"{"marker":"/api/test/bytes/4242","item_429":5}"#,
    )?;
    rx.admin("/faults", r#"{"status":503,"count":3}"#)?;
    rx.admin("/faults", r#"{"status":429,"count":1,"retry_after":"1"}"#)?;
    let cfg = bytes_config(
        NGINX,
        &format!(
            "[[sinks]]\ntype = \"elasticsearch\"\nname = \"es\"\nurl = \"http://127.0.0.1:{}\"\nbatch_records = 50\nbatch_linger = \"50ms\"\n",
            rx.data
        ),
    );
    let state = dir.join("agent");
    let agent = Agent::start(&state, &cfg)?;
    let cert = platform.cert();
    let r = load(&url, Some(&cert), 300, 4, &[10, 4242, 1000], "GET")?;
    let sent = r["requests"].as_array().map_or(0, |a| a.len());
    wait_caught_up(&agent, "es", Duration::from_secs(60))?;
    let stats = agent.stop()?;
    let trail = read_trail(&state.join("access.jsonl"))?;
    let marked: BTreeSet<String> = trail
        .iter()
        .filter(|r| r["url"]["path"] == "/api/test/bytes/4242")
        .filter_map(|r| r["event"]["id"].as_str().map(str::to_string))
        .collect();
    ensure!(
        marked.len() == sent / 3 || marked.len() == sent.div_ceil(3),
        "{} marked records of {sent}",
        marked.len()
    );
    let dead = read_trail(&state.join("deadletter/es.jsonl"))?;
    let dead_ids: BTreeSet<String> = dead
        .iter()
        .filter(|d| d["stream"] == "access")
        .filter_map(|d| d["record"]["event"]["id"].as_str().map(str::to_string))
        .collect();
    let dead_all: BTreeSet<String> = dead
        .iter()
        .filter_map(|d| d["record"]["event"]["id"].as_str().map(str::to_string))
        .collect();
    ensure!(
        dead_ids == marked,
        "dead-lettered {} records, {} were refused",
        dead_ids.len(),
        marked.len()
    );
    ensure!(
        dead.iter().all(|d| d["reason"]
            .as_str()
            .is_some_and(|r| r.contains("mapper_parsing_exception"))
            && d["sink"] == "es"
            && d["sequence"].is_u64()),
        "dead-letter entries: {:?}",
        dead.first()
    );
    let got = rx.stored()?;
    let produced = file_ids(&trail);
    let unaccounted: Vec<&String> = produced
        .iter()
        .filter(|id| !got.contains(*id) && !dead_all.contains(*id))
        .collect();
    ensure!(
        unaccounted.is_empty(),
        "{} records neither delivered nor dead-lettered",
        unaccounted.len()
    );
    ensure!(
        stats.agent("records_dead_lettered_total{sink=\"es\",stream=\"access\"}")
            == marked.len() as u64,
        "dead-letter counter"
    );
    let reqs = rx.admin("/received", "")?;
    let statuses: Vec<u64> = reqs["requests"]
        .as_array()
        .map(|a| a.iter().filter_map(|q| q["status"].as_u64()).collect())
        .unwrap_or_default();
    ensure!(
        statuses.iter().filter(|s| **s == 503).count() == 3 && statuses.contains(&429),
        "answers: {statuses:?}"
    );
    drop(platform);
    Ok(())
}

/// A changed byte, a removed line and two swapped lines of a real trail each make `sparbar
/// verify` fail and name the line.
fn tampering_is_detected(file: &Path, key: &Path, dir: &Path) -> Result<()> {
    let text = std::fs::read_to_string(file)?;
    let lines: Vec<&str> = text.lines().collect();
    // An access record in the middle (line numbers are 1-based).
    let i = lines
        .iter()
        .enumerate()
        .skip(lines.len() / 2)
        .find(|(_, l)| l.contains("\"stream\":\"access\"") && l.contains("\"status_code\":200"))
        .map(|(i, _)| i)
        .context("no access record to tamper with")?;
    let write = |name: &str, ls: &[String]| -> Result<std::path::PathBuf> {
        let p = dir.join(name);
        std::fs::write(&p, ls.join("\n") + "\n")?;
        Ok(p)
    };
    let owned: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
    let mut changed = owned.clone();
    changed[i] = changed[i].replacen("\"status_code\":200", "\"status_code\":201", 1);
    let mut removed = owned.clone();
    removed.remove(i);
    let mut swapped = owned.clone();
    let j = (i + 1..owned.len())
        .find(|j| owned[*j].contains("\"stream\":\"access\""))
        .context("no next access record")?;
    swapped.swap(i, j);
    for (what, ls, line, says) in [
        ("changed", changed, i + 1, "changed"),
        ("removed", removed, i + 1, "missing"),
        ("swapped", swapped, j + 1, "reordered"),
    ] {
        let p = write(&format!("{what}.jsonl"), &ls)?;
        let (code, out) = verify(&[&p], Some(key))?;
        ensure!(
            code == 1,
            "verify of the {what} trail exited {code}:\n{out}"
        );
        let at = format!("problem: {}:{line}: ", p.display());
        ensure!(
            out.lines().any(|l| l.starts_with(&at) && l.contains(says)),
            "verify of the {what} trail does not say {says:?} at line {line}:\n{out}"
        );
    }
    Ok(())
}
