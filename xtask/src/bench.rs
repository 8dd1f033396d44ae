//! Benchmarks that print ratios measured side by side in one invocation.
//!
//! `capture`: nginx over TLS serving a small static file, driven by wrk; runs alternate
//! without and with the agent, and the throughput ratio, the agent's CPU time and records
//! captured versus requests served are printed.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result};
use clap::Subcommand;
use sparbar_tests::{free_port, output, read_jsonl, Agent, Platform};

use crate::step;

#[derive(Subcommand)]
pub enum Which {
    /// Throughput of nginx/TLS with and without the agent.
    Capture {
        /// Seconds per wrk run.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Pairs of (without, with) runs.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// wrk connections.
        #[arg(long, default_value_t = 16)]
        connections: u32,
    },
}

pub fn run(bin: &Path, which: Which) -> Result<()> {
    match which {
        Which::Capture {
            seconds,
            rounds,
            connections,
        } => capture(bin, seconds, rounds, connections),
    }
}

fn wrk(url: &str, seconds: u64, connections: u32) -> Result<(f64, u64)> {
    let out = output(Command::new("wrk").args([
        "-t1",
        &format!("-c{connections}"),
        &format!("-d{seconds}s"),
        url,
    ]))?;
    let rps = out
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .context("wrk printed no Requests/sec")?;
    let total = out
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .context("wrk printed no request count")?;
    Ok((rps, total))
}

fn cpu_seconds(pid: u32) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let rest = &s[s.rfind(')').map(|i| i + 2).unwrap_or(0)..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc_sysconf(2) } as f64
}

extern "C" {
    #[link_name = "sysconf"]
    fn libc_sysconf(name: i32) -> i64;
}

fn capture(bin: &Path, seconds: u64, rounds: u32, connections: u32) -> Result<()> {
    std::env::set_var("SPARBAR_BIN", bin);
    let dir = sparbar_tests::repo_root().join("target/bench-capture");
    let _ = std::fs::remove_dir_all(&dir);
    let tls_port = free_port();
    step("starting nginx over TLS (the demo platform's nginx; /static/ is served by nginx itself)");
    let platform = Platform::up(&dir.join("platform"), tls_port, free_port(), false)?;
    let url = format!("https://127.0.0.1:{tls_port}/static/hello.txt");
    let cfg = "[agent]\nstate_dir = \"@DIR@\"\nstats_interval = \"5s\"\n\n[[targets]]\nexe = \"/usr/sbin/nginx\"\nname = \"nginx\"\n\n[[routes]]\nroute = \"GET /static/{file}\"\nname = \"static\"\n\n[output]\nfile = \"@DIR@/access.jsonl\"\n";
    wrk(&url, 2, connections)?; // warm-up
    let (mut base, mut with) = (Vec::new(), Vec::new());
    let (mut served, mut recorded, mut agent_cpu, mut agent_wall) = (0u64, 0u64, 0.0, 0.0);
    for round in 0..rounds {
        let (rps, _) = wrk(&url, seconds, connections)?;
        step(&format!("round {round}: without agent {rps:.0} req/s"));
        base.push(rps);
        let adir = dir.join(format!("agent-{round}"));
        let agent = Agent::start(&adir, cfg)?;
        let pid = agent.proc.pid();
        let cpu0 = cpu_seconds(pid);
        let t0 = std::time::Instant::now();
        let (rps, total) = wrk(&url, seconds, connections)?;
        std::thread::sleep(Duration::from_millis(500));
        agent_cpu += cpu_seconds(pid) - cpu0;
        agent_wall += t0.elapsed().as_secs_f64();
        let stats = agent.stop()?;
        let recs = read_jsonl(&adir.join("access.jsonl"))?.len() as u64;
        step(&format!("round {round}: with agent    {rps:.0} req/s, {recs} records for {total} requests, losses {:?}", stats.losses()));
        with.push(rps);
        served += total;
        recorded += recs;
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!();
    println!("bench capture: nginx TLS, wrk -t1 -c{connections} -d{seconds}s, {rounds} alternating rounds");
    println!("  without agent      : {:.0} req/s", mean(&base));
    println!("  with agent         : {:.0} req/s", mean(&with));
    println!("  throughput ratio   : {:.2}", mean(&with) / mean(&base));
    println!(
        "  agent CPU          : {:.0}% of one core while loaded",
        100.0 * agent_cpu / agent_wall.max(1e-9)
    );
    println!(
        "  records / requests : {recorded} / {served} ({:.4})",
        recorded as f64 / served.max(1) as f64
    );
    drop(platform);
    Ok(())
}
