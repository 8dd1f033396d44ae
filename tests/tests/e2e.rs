//! Privileged end-to-end tests: the real kernel programs against real servers and real clients.
//! Each test compares the agent's records with what the client sent and received, field by
//! field and count for count, and requires every loss counter to be zero.

use std::{process::Command, time::Duration};

use anyhow::{ensure, Result};
use serde_json::Value;
use sparbar_tests::*;

/// Response sizes from empty to 1 MiB, around the 16 KiB chunk and TLS record boundaries.
const SIZES: &[usize] = &[
    0, 1, 100, 1500, 16383, 16384, 16385, 65536, 262_144, 1_048_576,
];

fn config(targets: &str) -> String {
    format!(
        r#"
[agent]
state_dir = "@DIR@"
stats_interval = "1s"

[capture]
max_message_bytes = "2MiB"

{targets}

[[routes]]
route = "GET /api/test/bytes/{{n}}"
name = "test.bytes"

[[routes]]
route = "POST /api/test/echo"
name = "test.echo"

[output]
file = "@DIR@/access.jsonl"
"#
    )
}

/// nginx terminating TLS (OpenSSL uprobes) in front of the app (plaintext socket capture on the
/// upstream hop): every request appears exactly once on each hop.
#[test]
fn nginx_tls_front_and_plaintext_upstream() -> Result<()> {
    require_root()?;
    let dir = scratch("nginx");
    let (tls_port, app_port) = (free_port(), free_port());
    let platform = Platform::up(&dir.join("platform"), tls_port, app_port, false)?;
    let targets = format!(
        "[[targets]]\nexe = \"/usr/sbin/nginx\"\nname = \"nginx\"\n\n[[targets]]\npid = {}\ntls = false\nplaintext_ports = [{app_port}]\nname = \"app\"\n",
        platform.pid("app_pid")
    );
    let agent = Agent::start(&dir.join("agent"), &config(&targets))?;
    let url = format!("https://127.0.0.1:{tls_port}");
    let gets = load(&url, Some(&platform.cert()), 200, 16, SIZES, "GET")?;
    let posts = load(
        &url,
        Some(&platform.cert()),
        40,
        4,
        &[0, 10, 70_000, 300_000],
        "POST",
    )?;
    let stats = agent.stop()?;
    let records = read_jsonl(&dir.join("agent/access.jsonl"))?;

    let front = records_on_port(&records, tls_port);
    let (fg, fp): (Vec<&Value>, Vec<&Value>) = front
        .into_iter()
        .partition(|r| get(r, "http.request.method") == "GET");
    check_records(
        "nginx TLS GET",
        &fg,
        &gets,
        &Expect {
            with_port: true,
            tls: true,
            ip: "127.0.0.1",
            routes: &["test.bytes"],
        },
    )?;
    check_records(
        "nginx TLS POST",
        &fp,
        &posts,
        &Expect {
            with_port: true,
            tls: true,
            ip: "127.0.0.1",
            routes: &["test.echo"],
        },
    )?;
    for r in &fg {
        ensure!(
            get(r, "process.name").as_str() == Some("nginx"),
            "process.name in {r}"
        );
        ensure!(
            get(r, "service.name").as_str() == Some("nginx"),
            "service.name in {r}"
        );
    }
    let up = records_on_port(&records, app_port);
    let (ug, upo): (Vec<&Value>, Vec<&Value>) = up
        .into_iter()
        .partition(|r| get(r, "http.request.method") == "GET");
    check_records(
        "app plaintext GET",
        &ug,
        &gets,
        &Expect {
            with_port: false,
            tls: false,
            ip: "127.0.0.1",
            routes: &["test.bytes"],
        },
    )?;
    check_records(
        "app plaintext POST",
        &upo,
        &posts,
        &Expect {
            with_port: false,
            tls: false,
            ip: "127.0.0.1",
            routes: &["test.echo"],
        },
    )?;
    ensure!(
        records.len() == 2 * (200 + 40),
        "{} records in all, expected {}",
        records.len(),
        2 * 240
    );
    no_losses(&stats)?;
    drop(platform);
    Ok(())
}

/// A server that terminates TLS itself, started by `server(port, cert, key)`, traced by pid:
/// every request of a many-connection keep-alive load is recorded once, exactly.
fn tls_server_is_traced(name: &str, server: impl Fn(u16, &str, &str) -> Command) -> Result<()> {
    require_root()?;
    let dir = scratch(name);
    // The platform helper makes the certificate; the server is started on its own.
    let platform = Platform::up(&dir.join("platform"), free_port(), free_port(), false)?;
    let port = free_port();
    let (cert, key) = (platform.cert(), platform.key());
    let proc = spawn_ready(
        name,
        &mut server(port, &cert, &key),
        Duration::from_secs(30),
    )?;
    let targets = format!("[[targets]]\npid = {}\nname = \"{name}\"\n", proc.pid());
    let agent = Agent::start(&dir.join("agent"), &config(&targets))?;
    let report = load(
        &format!("https://127.0.0.1:{port}"),
        Some(&cert),
        150,
        12,
        SIZES,
        "GET",
    )?;
    let stats = agent.stop()?;
    let records = read_jsonl(&dir.join("agent/access.jsonl"))?;
    let recs: Vec<&Value> = records.iter().collect();
    let expect = Expect {
        with_port: true,
        tls: true,
        ip: "127.0.0.1",
        routes: &["test.bytes"],
    };
    check_records(name, &recs, &report, &expect)?;
    ensure!(
        stats.kernel("kernel_ssl_calls_total") > 0,
        "{name}: no SSL calls counted"
    );
    no_losses(&stats)?;
    drop(proc);
    Ok(())
}

/// CPython's ssl module (SSL_read_ex/SSL_write_ex in the system libssl) serving TLS itself.
#[test]
fn cpython_ssl_server() -> Result<()> {
    tls_server_is_traced("cpython", |port, cert, key| {
        // Debian's interpreter directly: `python3` may be a pyenv wrapper whose pid is not the
        // server's.
        let mut c = Command::new("/usr/bin/python3");
        c.arg(repo_root().join("tests/demo/app.py")).args([
            "--port",
            &port.to_string(),
            "--tls-cert",
            cert,
            "--tls-key",
            key,
        ]);
        c
    })
}

/// node's https server: OpenSSL linked statically into the node binary, memory BIOs.
#[test]
fn node_https_server() -> Result<()> {
    tls_server_is_traced("node", |port, cert, key| {
        let mut c = Command::new("node");
        c.arg(repo_root().join("tests/servers/node_https.js"))
            .args(["--port", &port.to_string(), "--cert", cert, "--key", key]);
        c
    })
}

/// Stopping the agent, even with SIGKILL, leaves the servers serving normally.
#[test]
fn agent_stop_and_kill_leave_servers_serving() -> Result<()> {
    require_root()?;
    let dir = scratch("stop");
    let tls_port = free_port();
    let platform = Platform::up(&dir.join("platform"), tls_port, free_port(), false)?;
    let url = format!("https://127.0.0.1:{tls_port}");
    let targets = "[[targets]]\nexe = \"/usr/sbin/nginx\"\nname = \"nginx\"\n";

    let agent = Agent::start(&dir.join("a1"), &config(targets))?;
    let r = load(&url, Some(&platform.cert()), 50, 4, &[10, 20_000], "GET")?;
    ensure!(
        r["errors"].as_array().unwrap().is_empty(),
        "errors with the agent attached: {r}"
    );
    agent.proc.signal(libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(300));
    let r = load(&url, Some(&platform.cert()), 50, 4, &[10, 20_000], "GET")?;
    ensure!(
        r["requests"].as_array().unwrap().len() == 50,
        "after SIGKILL: {r}"
    );
    drop(agent);

    let agent = Agent::start(&dir.join("a2"), &config(targets))?;
    load(&url, Some(&platform.cert()), 20, 2, &[10], "GET")?;
    agent.stop()?;
    let r = load(&url, Some(&platform.cert()), 50, 4, &[10, 20_000], "GET")?;
    ensure!(
        r["requests"].as_array().unwrap().len() == 50,
        "after SIGTERM: {r}"
    );
    drop(platform);
    Ok(())
}

/// Keep-alive connections opened before the agent started are picked up: the requests sent on
/// them afterwards are recorded, each exactly once.
#[test]
fn connections_open_before_the_agent_are_picked_up() -> Result<()> {
    use std::io::{BufRead, BufReader, Write};
    require_root()?;
    let dir = scratch("preexisting");
    let tls_port = free_port();
    let platform = Platform::up(&dir.join("platform"), tls_port, free_port(), false)?;
    let mut client = std::process::Command::new("python3")
        .arg(repo_root().join("tests/clients/preexisting.py"))
        .args([
            "--url",
            &format!("https://127.0.0.1:{tls_port}"),
            "--cafile",
            &platform.cert(),
        ])
        .args(["--connections", "4", "--requests", "5", "--size", "3000"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut out = BufReader::new(client.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line)?;
    ensure!(line.trim() == "OPEN", "client said {line:?}");
    let agent = Agent::start(
        &dir.join("agent"),
        &config("[[targets]]\nexe = \"/usr/sbin/nginx\"\nname = \"nginx\"\n"),
    )?;
    writeln!(client.stdin.as_mut().unwrap())?;
    line.clear();
    out.read_line(&mut line)?;
    let report: Value = serde_json::from_str(&line)?;
    client.wait()?;
    let stats = agent.stop()?;
    let records = read_jsonl(&dir.join("agent/access.jsonl"))?;
    let recs: Vec<&Value> = records.iter().collect();
    ensure!(
        recs.len() == 20,
        "{} records for 20 requests on pre-existing connections",
        recs.len()
    );
    ensure!(
        client_side(&report, true) == agent_side(&recs, true),
        "records differ from the client's account"
    );
    no_losses(&stats)?;
    drop(platform);
    Ok(())
}

/// Targets chosen by cgroup (the kernel checks the cgroup id) and by process name.
#[test]
fn cgroup_and_comm_targets() -> Result<()> {
    require_root()?;
    let dir = scratch("cgroup");
    let tls_port = free_port();
    let platform = Platform::up(&dir.join("platform"), tls_port, free_port(), false)?;
    let cg_root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .find(|m| std::path::Path::new(&format!("{m}/cgroup.controllers")).exists())
        .ok_or_else(|| {
            anyhow::anyhow!("no cgroup v2 mount at /sys/fs/cgroup/unified or /sys/fs/cgroup")
        })?;
    let name = format!("sparbar-e2e-{}", std::process::id());
    let cg = format!("{cg_root}/{name}");
    std::fs::create_dir_all(&cg)?;
    let master = platform.pid("nginx_master_pid");
    let mut pids = vec![master];
    pids.extend(
        output(Command::new("pgrep").args(["-P", &master.to_string()]))?
            .lines()
            .filter_map(|l| l.trim().parse::<u32>().ok()),
    );
    for p in &pids {
        std::fs::write(format!("{cg}/cgroup.procs"), p.to_string())?;
    }
    let url = format!("https://127.0.0.1:{tls_port}");
    for (i, targets) in [
        format!("[[targets]]\ncgroup = \"/{name}\"\nname = \"nginx\"\n"),
        "[[targets]]\ncomm = \"nginx\"\nname = \"nginx\"\n".to_string(),
    ]
    .iter()
    .enumerate()
    {
        let agent = Agent::start(&dir.join(format!("agent{i}")), &config(targets))?;
        let report = load(
            &url,
            Some(&platform.cert()),
            60,
            6,
            &[0, 5000, 70_000],
            "GET",
        )?;
        let stats = agent.stop()?;
        let records = read_jsonl(&dir.join(format!("agent{i}/access.jsonl")))?;
        let recs: Vec<&Value> = records.iter().collect();
        check_records(
            &format!("target {targets:?}"),
            &recs,
            &report,
            &Expect {
                with_port: true,
                tls: true,
                ip: "127.0.0.1",
                routes: &["test.bytes"],
            },
        )?;
        no_losses(&stats)?;
    }
    drop(platform);
    // Empty now: its processes are gone with the platform.
    let _ = std::fs::remove_dir(&cg);
    Ok(())
}
