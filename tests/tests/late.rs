//! A configuration that points at what is not there yet: a process that does not run, a
//! process that runs but has not loaded OpenSSL, a plaintext port nothing listens on. The agent
//! starts, says each plainly, and traces each as soon as it appears, against real CPython
//! servers (the demo app, TLS through the system libssl, and plaintext).

use std::{
    io::{BufRead, BufReader, Write as _},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;
use sparbar_tests::*;

/// The kernel's comm of a process is the base name of the path it was exec'd by, so a symlink
/// to the interpreter gives these servers names no other process on the machine has.
const TLS_COMM: &str = "sparbar-late";
const PLAIN_COMM: &str = "sparbar-latep";

/// Waits for a line starting with `word` on a child's stdout.
fn wait_line(lines: &mpsc::Receiver<String>, word: &str, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(l) if l.starts_with(word) => return Ok(()),
            Ok(_) => {}
            Err(_) => bail!("{what} did not print {word} within 30 s"),
        }
    }
}

#[test]
fn missing_process_library_and_port_are_said_and_traced_when_they_appear() -> Result<()> {
    require_root()?;
    let dir = scratch("late");
    // The platform helper makes the certificate; its nginx is not a target here.
    let platform = Platform::up(&dir.join("platform"), free_port(), free_port(), false)?;
    let (cert, key) = (platform.cert(), platform.key());
    let (tls_port, plain_port) = (free_port(), free_port());
    let python = std::fs::canonicalize("/usr/bin/python3")?;
    for comm in [TLS_COMM, PLAIN_COMM] {
        std::os::unix::fs::symlink(&python, dir.join(comm))?;
    }
    // The TLS server waits for a line on stdin before it runs the app, which imports `ssl`:
    // until then the interpreter maps no libssl.
    let wrapper = dir.join("late_tls.py");
    std::fs::write(
        &wrapper,
        format!(
            "import runpy, sys\nassert 'ssl' not in sys.modules\nprint('WAITING', flush=True)\nsys.stdin.readline()\nsys.argv = ['app.py'] + sys.argv[1:]\nrunpy.run_path({:?}, run_name='__main__')\n",
            repo_root().join("tests/demo/app.py").display().to_string()
        ),
    )?;

    let config = format!(
        r#"
[agent]
state_dir = "@DIR@"
stats_interval = "1s"

[[targets]]
comm = "{TLS_COMM}"
name = "late-tls"

[[targets]]
comm = "{PLAIN_COMM}"
name = "late-plain"
tls = false
plaintext_ports = [{plain_port}]

[[routes]]
route = "GET /api/test/bytes/{{n}}"
name = "test.bytes"

[output]
file = "@DIR@/access.jsonl"
"#
    );
    let agent = Agent::start(&dir.join("agent"), &config)?;
    // At start: neither process runs, nothing listens on the plaintext port.
    agent.wait_log(&["no running process matches target \"late-tls\"", "yet"])?;
    agent.wait_log(&["no running process matches target \"late-plain\"", "yet"])?;
    agent.wait_log(&[&format!(
        "nothing listens on plaintext port {plain_port} yet"
    )])?;

    // The TLS process appears without OpenSSL: traced, and said to have no TLS library.
    let child = Command::new(dir.join(TLS_COMM))
        .arg(&wrapper)
        .args([
            "--port",
            &tls_port.to_string(),
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the late TLS server")?;
    let mut tls = Proc {
        child,
        name: TLS_COMM.into(),
    };
    let (tx, tls_lines) = mpsc::channel();
    let out = tls.child.stdout.take().context("stdout")?;
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    wait_line(&tls_lines, "WAITING", "the late TLS server")?;
    let tls_pid = tls.pid();
    agent.wait_log(&[&format!("tracing pid {tls_pid} "), "late-tls"])?;
    agent.wait_log(&[&format!("pid {tls_pid} "), "maps no OpenSSL library"])?;

    // The plaintext server appears and listens.
    let plain = spawn_ready(
        PLAIN_COMM,
        Command::new(dir.join(PLAIN_COMM))
            .arg(repo_root().join("tests/demo/app.py"))
            .args(["--port", &plain_port.to_string()]),
        Duration::from_secs(30),
    )?;
    agent.wait_log(&[&format!("tracing pid {} ", plain.pid()), "late-plain"])?;

    // The TLS server loads OpenSSL: the agent attaches at its next scan.
    tls.child
        .stdin
        .take()
        .context("stdin")?
        .write_all(b"go\n")?;
    wait_line(&tls_lines, "READY", "the late TLS server")?;
    agent.wait_log(&[&format!("pid {tls_pid} loaded OpenSSL after it was found")])?;
    agent.wait_log(&["attached OpenSSL probes to", "libssl"])?;

    let tls_report = load(
        &format!("https://127.0.0.1:{tls_port}"),
        Some(&cert),
        60,
        4,
        &[10, 3000],
        "GET",
    )?;
    let plain_report = load(
        &format!("http://127.0.0.1:{plain_port}"),
        None,
        40,
        4,
        &[10, 3000],
        "GET",
    )?;
    let stats = agent.stop()?;
    let records = read_jsonl(&dir.join("agent/access.jsonl"))?;
    let on = |port: u16| -> Vec<&Value> { records_on_port(&records, port) };
    ensure!(
        on(tls_port).len() + on(plain_port).len() == records.len(),
        "records of other ports: {} of {}",
        records.len() - on(tls_port).len() - on(plain_port).len(),
        records.len()
    );
    let expect = |tls: bool| Expect {
        with_port: true,
        tls,
        ip: "127.0.0.1",
        routes: &["test.bytes"],
    };
    check_records("late TLS server", &on(tls_port), &tls_report, &expect(true))?;
    check_records(
        "late plaintext server",
        &on(plain_port),
        &plain_report,
        &expect(false),
    )?;
    no_losses(&stats)?;
    drop((tls, plain, platform));
    Ok(())
}
