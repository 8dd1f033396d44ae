//! SIGTERM under traffic, against real nginx/TLS: the agent drains what the kernel captured,
//! writes every exchange the clients completed before the signal, syncs its spool, detaches
//! every probe and exits 0, even with a sink that is down; what that sink has not acknowledged
//! stays in the spool and reaches it after the next start.

use std::{
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use serde_json::Value;
use sparbar_tests::*;

/// Requests per round of traffic; each round asks for its own response size, so its records
/// are told apart by `url.path`.
const ROUND: usize = 100;

/// nginx traced, the file sink and an Elasticsearch receiver at `es_port`.
fn config(es_port: u16) -> String {
    bytes_config(
        NGINX,
        &format!(
            "[[sinks]]\ntype = \"elasticsearch\"\nname = \"es\"\nurl = \"http://127.0.0.1:{es_port}\"\nbatch_records = 100\n"
        ),
    )
}

/// The names of the BPF programs loaded in the kernel, and the programs attached to the
/// cgroup v2 root, as bpftool reports them.
fn bpf_state() -> Result<(Vec<String>, String)> {
    let progs: Value = serde_json::from_str(&output(
        Command::new("bpftool").args(["prog", "show", "-j"]),
    )?)?;
    let mut names: Vec<String> = progs
        .as_array()
        .context("bpftool prog show")?
        .iter()
        .map(|p| p["name"].as_str().unwrap_or("?").to_string())
        .collect();
    names.sort();
    let cg =
        output(Command::new("bpftool").args(["cgroup", "show", "/sys/fs/cgroup/unified", "-j"]))?;
    Ok((names, cg))
}

/// One round of traffic and whether it was over before the SIGTERM.
struct Round {
    size: usize,
    report: Value,
    done_before_term: bool,
}

#[test]
fn sigterm_under_traffic_drains_detaches_and_leaves_a_dead_sinks_share_in_the_spool() -> Result<()>
{
    require_root()?;
    let dir = scratch("drain");
    let tls_port = free_port();
    let platform = Platform::up(&dir.join("platform"), tls_port, free_port(), false)?;
    let url = format!("https://127.0.0.1:{tls_port}");
    let cert = platform.cert();
    let rx = Receiver::start("elastic")?;
    let state = dir.join("agent");
    let before = bpf_state()?;

    let agent = Agent::start(&state, &config(rx.data))?;
    ensure!(
        bpf_state()?.0.len() > before.0.len(),
        "no BPF program appeared when the agent started"
    );

    // Rounds of traffic until told to stop; each says whether it ended before the SIGTERM.
    let term_sent = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (url, cert, term_sent, stop) =
            (url.clone(), cert.clone(), term_sent.clone(), stop.clone());
        std::thread::spawn(move || -> Result<Vec<Round>> {
            let mut rounds = Vec::new();
            let mut size = 1000;
            while !stop.load(Ordering::SeqCst) {
                let report = load(&url, Some(&cert), ROUND, 4, &[size], "GET")?;
                rounds.push(Round {
                    size,
                    report,
                    done_before_term: !term_sent.load(Ordering::SeqCst),
                });
                size += 1;
            }
            Ok(rounds)
        })
    };
    // The receiver goes away while traffic goes on, and stays away past the agent's stop.
    std::thread::sleep(Duration::from_millis(1500));
    rx.admin("/down", r#"{"seconds":25}"#)?;
    let down_at = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));

    term_sent.store(true, Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    agent.proc.signal(libc::SIGTERM);
    let log = agent.log.clone();
    // Agent::stop fails unless the exit is clean (status 0) within 30 s.
    let stats = agent.stop()?;
    let rounds = traffic.join().expect("traffic thread")?;
    ensure!(
        down_at.elapsed() < Duration::from_secs(25),
        "the receiver came back before the agent had stopped; the test proves nothing"
    );

    // Every probe is gone: the kernel has the programs and cgroup attachments it had before.
    let after = bpf_state()?;
    ensure!(
        after == before,
        "BPF left behind after the agent exited: before {before:?}, after {after:?}"
    );
    let log_text = log.lock().unwrap().join("\n");
    for needle in [
        "capture programs detached; draining what the kernel captured",
        "sink es: still behind after",
        "sparbar stopped; probes detached",
    ] {
        ensure!(
            log_text.contains(needle),
            "the agent never logged {needle:?}"
        );
    }

    // The servers never failed a request.
    for r in &rounds {
        ensure!(
            r.report["errors"].as_array().is_some_and(|e| e.is_empty()),
            "client errors in round {}: {}",
            r.size,
            r.report["errors"]
        );
    }
    // Every exchange of a round that ended before the signal is recorded exactly once and
    // whole; of the rounds the signal cut into, no record is one the clients did not make.
    let records = read_jsonl(&state.join("access.jsonl"))?;
    let on_port = records_on_port(&records, tls_port);
    let e = Expect {
        with_port: true,
        tls: true,
        ip: "127.0.0.1",
        routes: &["test.bytes"],
    };
    let (mut whole, mut cut) = (0, 0);
    for r in &rounds {
        let path = format!("/api/test/bytes/{}", r.size);
        let recs: Vec<&Value> = on_port
            .iter()
            .copied()
            .filter(|x| get(x, "url.path").as_str() == Some(&path))
            .collect();
        if r.done_before_term {
            check_records(&format!("round {}", r.size), &recs, &r.report, &e)?;
            whole += 1;
        } else {
            let (c, a) = (client_side(&r.report, true), agent_side(&recs, true));
            for (k, n) in &a {
                ensure!(
                    c.get(k).is_some_and(|m| m >= n),
                    "round {} (cut by the signal): {n} records of {k:?}, which the clients made {:?} times",
                    r.size,
                    c.get(k)
                );
            }
            cut += 1;
        }
    }
    ensure!(
        whole >= 2 && cut == 1,
        "{whole} rounds ended before the SIGTERM, {cut} after it"
    );
    ensure!(
        on_port.len() == records.len(),
        "records of another port: {}",
        records.len() - on_port.len()
    );

    // The spool was synced and the file sink has it all; the dead sink is behind, counted.
    let trail_file = state.join("access.jsonl");
    let trail = read_trail(&trail_file)?;
    let ids = file_ids(&trail);
    ensure!(
        ids.len() == trail.len(),
        "an event id appears twice in the file"
    );
    for s in ["access", "security"] {
        ensure!(
            stats.agent(&format!("sink_lag_records{{sink=\"file\",stream=\"{s}\"}}")) == 0,
            "the file sink is behind on {s} after the stop"
        );
    }
    let es_lag: u64 = ["access", "security"]
        .iter()
        .map(|s| stats.agent(&format!("sink_lag_records{{sink=\"es\",stream=\"{s}\"}}")))
        .sum();
    ensure!(es_lag > 0, "the dead sink was not behind at the stop");
    let (code, out) = verify(&[&trail_file], Some(&state.join("checkpoint.pub")))?;
    ensure!(code == 0, "sparbar verify failed ({code}):\n{out}");

    // The next start delivers to the sink what it missed: every id of the first run arrives.
    let agent = Agent::start(&state, &config(rx.data))?;
    wait_caught_up(&agent, "es", Duration::from_secs(90))?;
    agent.stop()?;
    let got = rx.stored()?;
    let missing: Vec<&String> = ids.iter().filter(|i| !got.contains(*i)).collect();
    ensure!(
        missing.is_empty(),
        "{} of the {} records of the first run never reached the sink, e.g. {:?}",
        missing.len(),
        ids.len(),
        &missing[..missing.len().min(5)]
    );
    // The time it was not running is stated once, as a clean stop.
    let gaps: Vec<String> = read_trail(&trail_file)?
        .iter()
        .filter(|r| r["event"]["dataset"] == "sparbar.gap")
        .map(|r| {
            r["sparbar"]["gap"]["reason"]
                .as_str()
                .unwrap_or("?")
                .to_string()
        })
        .collect();
    ensure!(
        gaps == ["agent_stopped"],
        "gap records after a clean stop and start: {gaps:?}"
    );
    println!(
        "drain: {whole} rounds whole before SIGTERM, {cut} cut by it, {} records, es {es_lag} behind at the stop and caught up after the restart",
        records.len()
    );
    drop(platform);
    Ok(())
}
