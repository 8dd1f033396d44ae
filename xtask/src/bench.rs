//! Benchmarks that print ratios measured side by side in one invocation.
//!
//! `capture`: nginx over TLS serving a small static file, driven by wrk; runs alternate
//! without and with the agent, and the throughput ratio, the agent's CPU time and records
//! captured versus requests served are printed.
//!
//! `detect`: recorded-shape exchanges through parsing, attribution, disclosure and detection
//! without the kernel (tracer-user/benches/detect.rs): exchanges per second on one core and
//! memory per tracked user.
//!
//! `ship`: records through the durable spool to a file sink and to a loopback HTTP sink, beside
//! a direct file write, and the security stream's fsync cost (tracer-user/benches/ship.rs).

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
    /// Exchanges per second through attribution and detection (no kernel), and memory per
    /// tracked user.
    Detect {
        /// Simulated users (each logs in and reads three pages).
        #[arg(long, default_value_t = 100_000)]
        users: u32,
    },
    /// Records per second through the spool to a file sink and a loopback HTTP sink, and the
    /// cost of the security stream's fsync.
    Ship {
        /// Access records per run.
        #[arg(long, default_value_t = 200_000)]
        records: u64,
    },
}

pub fn run(bin: &Path, which: Which) -> Result<()> {
    match which {
        Which::Capture {
            seconds,
            rounds,
            connections,
        } => capture(bin, seconds, rounds, connections),
        Which::Detect { users } => {
            step(&format!(
                "bench detect: {users} users through the userspace path"
            ));
            let status = Command::new(env!("CARGO"))
                .current_dir(sparbar_tests::repo_root())
                .args(["bench", "--quiet", "-p", "tracer-user", "--bench", "detect"])
                .env("BENCH_USERS", users.to_string())
                .status()
                .context("cargo bench")?;
            anyhow::ensure!(status.success(), "the detect benchmark failed: {status}");
            Ok(())
        }
        Which::Ship { records } => {
            step(&format!("bench ship: {records} records through the spool"));
            let status = Command::new(env!("CARGO"))
                .current_dir(sparbar_tests::repo_root())
                .args(["bench", "--quiet", "-p", "tracer-user", "--bench", "ship"])
                .env("BENCH_RECORDS", records.to_string())
                .status()
                .context("cargo bench")?;
            anyhow::ensure!(status.success(), "the ship benchmark failed: {status}");
            Ok(())
        }
    }
}

/// One wrk run: (requests/s, requests completed, mean latency in ms).
fn wrk(url: &str, seconds: u64, connections: u32) -> Result<(f64, u64, f64)> {
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
    let latency = out
        .lines()
        .find(|l| l.trim_start().starts_with("Latency"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| {
            let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
            let n: f64 = num.parse().ok()?;
            Some(match unit {
                "us" => n / 1000.0,
                "ms" => n,
                "s" => n * 1000.0,
                _ => return None,
            })
        })
        .context("wrk printed no latency")?;
    Ok((rps, total, latency))
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

struct Scenario {
    name: &'static str,
    url: String,
    config: String,
    /// Records one request produces (one per traced hop).
    hops: u64,
    connections: u32,
    /// Driven over HTTP/2 by h2load (10 streams per connection) instead of wrk.
    h2: bool,
}

impl Scenario {
    fn load(&self, seconds: u64) -> Result<(f64, u64, f64)> {
        if self.h2 {
            h2load(&self.url, seconds, self.connections)
        } else {
            wrk(&self.url, seconds, self.connections)
        }
    }
}

/// One h2load run over HTTP/2, 10 concurrent streams per connection: (requests/s, requests
/// completed, mean latency in ms).
fn h2load(url: &str, seconds: u64, connections: u32) -> Result<(f64, u64, f64)> {
    let out = output(Command::new("h2load").args([
        "-c",
        &connections.to_string(),
        "-m",
        "10",
        "-D",
        &seconds.to_string(),
        url,
    ]))?;
    let rps: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|s| s.strip_suffix(" req/s"))
        .and_then(|s| s.parse().ok())
        .context("h2load printed no req/s")?;
    let total: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("requests: "))
        .and_then(|l| l.split(", ").find_map(|p| p.strip_suffix(" succeeded")))
        .and_then(|s| s.parse().ok())
        .context("h2load printed no succeeded count")?;
    let ms = |s: &str| -> Option<f64> {
        if let Some(v) = s.strip_suffix("ms") {
            v.parse().ok()
        } else if let Some(v) = s.strip_suffix("us") {
            v.parse::<f64>().ok().map(|x| x / 1000.0)
        } else {
            s.strip_suffix('s')?.parse::<f64>().ok().map(|x| x * 1000.0)
        }
    };
    let lat = out
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("time for request:"))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(ms)
        .context("h2load printed no mean request time")?;
    Ok((rps, total, lat))
}

fn capture(bin: &Path, seconds: u64, rounds: u32, connections: u32) -> Result<()> {
    std::env::set_var("SPARBAR_BIN", bin);
    let dir = sparbar_tests::repo_root().join("target/bench-capture");
    let _ = std::fs::remove_dir_all(&dir);
    let (tls_port, app_port, h2_port) = (free_port(), free_port(), free_port());
    step("starting the demo platform: nginx over TLS (and HTTP/2 on a second port) in front of the app");
    let platform = Platform::up_h2(&dir.join("platform"), tls_port, app_port, h2_port, false)?;
    let head = "[agent]\nstate_dir = \"@DIR@\"\nstats_interval = \"5s\"\n\n[[targets]]\nexe = \"/usr/sbin/nginx\"\nname = \"nginx\"\n\n[output]\nfile = \"@DIR@/access.jsonl\"\n";
    let scenarios = [
        // The floor: a tiny static file served by nginx itself, at saturation.
        Scenario {
            name: "static file from nginx (saturation)",
            url: format!("https://127.0.0.1:{tls_port}/static/hello.txt"),
            config: format!("{head}\n[[routes]]\nroute = \"GET /static/{{file}}\"\nname = \"static\"\n"),
            hops: 1,
            connections,
            h2: false,
        },
        // The floor again with the kernel's token scan on for every request nginx reads: a
        // cross-tenant rule blocks, so the kernel reads each request line and head for session
        // tokens and tenants (the cost of the in-kernel check, side by side with the floor).
        Scenario {
            name: "static file, kernel scan of every request (saturation)",
            url: format!("https://127.0.0.1:{tls_port}/static/hello.txt"),
            config: format!(
                "{head}\n[[routes]]\nroute = \"GET /static/{{file}}\"\nname = \"static\"\n\n[[routes]]\nroute = \"GET /api/me\"\nname = \"me\"\n\n[[routes]]\nroute = \"GET /api/addressbook/persons\"\nname = \"persons\"\ntenant_param = \"schoolId\"\n\n[identity]\nsession_cookies = [\"skolsid\"]\n\n[[identity.endpoint]]\nroute = \"me\"\nuser_id = \"$.id\"\ntenant = \"$.schoolId\"\n\n[detection]\nservices = [\"nginx\"]\nenforce = true\n\n[[rules]]\nid = \"xt\"\nname = \"cross tenant\"\nkind = \"cross_tenant\"\nblock = [\"10m\"]\n"
            ),
            hops: 1,
            connections,
            h2: false,
        },
        // A realistic request: 20 KB of JSON-sized body from the app behind nginx, both hops
        // traced (nginx TLS and the app's plaintext), 2 connections as in ordinary use.
        Scenario {
            name: "20 KB from the app through nginx, 2 connections",
            url: format!("https://127.0.0.1:{tls_port}/api/test/bytes/20000"),
            config: format!(
                "{head}\n[[targets]]\npid = {}\ntls = false\nplaintext_ports = [{app_port}]\nname = \"app\"\n\n[[routes]]\nroute = \"GET /api/test/bytes/{{n}}\"\nname = \"bytes\"\n",
                platform.pid("app_pid")
            ),
            hops: 2,
            connections: 2,
            h2: false,
        },
        // The floor over HTTP/2: the same static file, h2load with 10 streams per connection.
        Scenario {
            name: "static file from nginx over HTTP/2 (saturation)",
            url: format!("https://127.0.0.1:{h2_port}/static/hello.txt"),
            config: format!("{head}\n[[routes]]\nroute = \"GET /static/{{file}}\"\nname = \"static\"\n"),
            hops: 1,
            connections,
            h2: true,
        },
    ];
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let mut report = Vec::new();
    for (k, sc) in scenarios.iter().enumerate() {
        sc.load(2)?; // warm-up
        let (mut base, mut with, mut lat0, mut lat1) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut served, mut recorded, mut agent_cpu, mut agent_wall) = (0u64, 0u64, 0.0, 0.0);
        for round in 0..rounds {
            let (rps, _, lat) = sc.load(seconds)?;
            step(&format!(
                "{}: round {round}: without agent {rps:.0} req/s, {lat:.2} ms",
                sc.name
            ));
            base.push(rps);
            lat0.push(lat);
            let adir = dir.join(format!("agent-{k}-{round}"));
            let agent = Agent::start(&adir, &sc.config)?;
            let pid = agent.proc.pid();
            let cpu0 = cpu_seconds(pid);
            let t0 = std::time::Instant::now();
            let (rps, total, lat) = sc.load(seconds)?;
            std::thread::sleep(Duration::from_millis(500));
            agent_cpu += cpu_seconds(pid) - cpu0;
            agent_wall += t0.elapsed().as_secs_f64();
            let stats = agent.stop()?;
            let recs = read_jsonl(&adir.join("access.jsonl"))?.len() as u64;
            step(&format!(
                "{}: round {round}: with agent    {rps:.0} req/s, {lat:.2} ms, {recs} records for {total} requests, {} kernel token scans, losses {:?}",
                sc.name,
                stats.kernel("kernel_token_scans_total"),
                stats.losses()
            ));
            with.push(rps);
            lat1.push(lat);
            served += total * sc.hops;
            recorded += recs;
        }
        report.push(format!(
            "{}, {} -c{} -d{seconds}s, {rounds} alternating rounds\n  without agent      : {:.0} req/s, mean latency {:.2} ms\n  with agent         : {:.0} req/s, mean latency {:.2} ms\n  throughput ratio   : {:.2}\n  agent CPU          : {:.0}% of one core while loaded\n  records / (requests x hops) : {recorded} / {served} ({:.4}; wrk does not count the requests in flight when it stops)",
            sc.name,
            if sc.h2 { "h2load -m10" } else { "wrk -t1" },
            sc.connections,
            mean(&base),
            mean(&lat0),
            mean(&with),
            mean(&lat1),
            mean(&with) / mean(&base),
            100.0 * agent_cpu / agent_wall.max(1e-9),
            recorded as f64 / served.max(1) as f64
        ));
    }
    println!();
    println!("bench capture");
    for r in report {
        println!("{r}");
    }
    drop(platform);
    Ok(())
}
