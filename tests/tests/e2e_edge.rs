//! Privileged end-to-end tests of the edges of the capture: IPv6, the per-call capture cap,
//! nginx reloads and processes started after the agent, HTTP/2 (every exchange recorded) and
//! gzip/chunked responses through nginx. Like `e2e.rs`, each test compares the agent's records
//! with what a real client sent and received, field by field and count for count, and checks the
//! loss counters exactly; none depends on timings.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;
use sparbar_tests::*;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// An agent configuration: `capture` is the body of `[capture]`, `targets` and `routes` are
/// `[[targets]]`/`[[routes]]` tables, `unmatched` is `output.unmatched`.
fn config(capture: &str, targets: &str, routes: &str, unmatched: &str) -> String {
    format!(
        r#"
[agent]
state_dir = "@DIR@"
stats_interval = "1s"

[capture]
{capture}

{targets}

{routes}

[output]
file = "@DIR@/access.jsonl"
unmatched = "{unmatched}"
"#
    )
}

const TEST_ROUTES: &str = r#"
[[routes]]
route = "GET /api/test/bytes/{n}"
name = "test.bytes"

[[routes]]
route = "POST /api/test/echo"
name = "test.echo"
"#;

fn requests(report: &Value) -> &Vec<Value> {
    report["requests"].as_array().expect("requests in report")
}

/// The client reported no transport errors.
fn client_ok(what: &str, report: &Value) -> Result<()> {
    let errors = report["errors"].as_array().map(Vec::len).unwrap_or(1);
    ensure!(errors == 0, "{what}: the client itself failed: {report}");
    Ok(())
}

/// A TCP port on `::1` nobody listens on right now.
fn free_port_v6() -> Result<u16> {
    Ok(TcpListener::bind("[::1]:0")
        .and_then(|l| l.local_addr())
        .context("binding [::1]:0 (is IPv6 loopback configured?)")?
        .port())
}

/// Polls `f` until it returns `Some`, failing with `what` after `timeout`. Used only to wait for
/// a state (a server listening, workers replaced), never to judge an outcome.
fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > end {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ppid_of(pid: u32) -> Option<u32> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}

/// Live children of `pid`.
fn children_of(pid: u32) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
                if ppid_of(p) == Some(pid) {
                    out.insert(p);
                }
            }
        }
    }
    out
}

/// Runs tests/clients/exchanges.py (byte-exact client) and returns its report.
fn exchanges(url: &str, cafile: Option<&str>, extra: &[&str]) -> Result<Value> {
    let mut c = Command::new("python3");
    c.arg(repo_root().join("tests/clients/exchanges.py"))
        .args(["--url", url])
        .args(extra);
    if let Some(ca) = cafile {
        c.args(["--cafile", ca]);
    }
    let text = output(&mut c)?;
    Ok(serde_json::from_str(&text)?)
}

/// An nginx of our own (own prefix directory, config written by the test), run in the
/// foreground as our child. Dropping it stops the master with SIGTERM (which stops its workers)
/// and kills, by pid, any worker of it still alive after that.
struct Nginx {
    child: Child,
}

impl Nginx {
    /// Writes `http_block` (the contents of `http { }`) into `dir/nginx.conf`, checks it with
    /// `nginx -t`, starts nginx and waits until `port` accepts connections.
    fn start(dir: &Path, http_block: &str, port: u16) -> Result<Nginx> {
        for sub in ["logs", "tmp"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        let d = dir.display();
        let conf = format!(
            "user root;\ndaemon off;\nmaster_process on;\nworker_processes 2;\n\
             pid {d}/nginx.pid;\nerror_log {d}/logs/error.log warn;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n    access_log {d}/logs/access.log;\n\
             client_body_temp_path {d}/tmp/client_body;\n    proxy_temp_path {d}/tmp/proxy;\n\
             fastcgi_temp_path {d}/tmp/fastcgi;\n    uwsgi_temp_path {d}/tmp/uwsgi;\n\
             scgi_temp_path {d}/tmp/scgi;\n{http_block}\n}}\n"
        );
        let conf_path = dir.join("nginx.conf");
        fs::write(&conf_path, conf)?;
        let prefix = format!("{d}/");
        let errlog = dir.join("logs/error.log");
        let base = |c: &mut Command| {
            c.args(["-p", &prefix, "-c"])
                .arg(&conf_path)
                .arg("-e")
                .arg(&errlog);
        };
        let mut t = Command::new("/usr/sbin/nginx");
        base(&mut t);
        t.args(["-t", "-q"]);
        output(&mut t).context("nginx -t on the test's own config")?;
        let mut c = Command::new("/usr/sbin/nginx");
        base(&mut c);
        let log = fs::File::create(dir.join("logs/nginx.out"))?;
        let child = c
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting /usr/sbin/nginx")?;
        let mut n = Nginx { child };
        let master = n.master();
        wait_for(
            &format!("the test's nginx (pid {master}) to listen on {port} with 2 workers"),
            Duration::from_secs(20),
            || {
                if let Ok(Some(st)) = n.child.try_wait() {
                    return Some(Err(st));
                }
                (TcpStream::connect(("127.0.0.1", port)).is_ok() && children_of(master).len() == 2)
                    .then_some(Ok(()))
            },
        )?
        .map_err(|st| {
            anyhow::anyhow!(
                "nginx exited with {st}: {}",
                fs::read_to_string(dir.join("logs/error.log")).unwrap_or_default()
            )
        })?;
        Ok(n)
    }

    fn master(&self) -> u32 {
        self.child.id()
    }

    fn workers(&self) -> BTreeSet<u32> {
        children_of(self.master())
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let master = self.master();
        let workers = self.workers();
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for w in workers {
            // Still alive after its master is gone: orphaned (reparented to init), and still
            // nginx (not a reused pid).
            let comm = fs::read_to_string(format!("/proc/{w}/comm")).unwrap_or_default();
            let ppid = ppid_of(w);
            if comm.trim() == "nginx" && (ppid == Some(1) || ppid == Some(master)) {
                // SAFETY: kill(2) on a worker forked by our own nginx master.
                unsafe { libc::kill(w as i32, libc::SIGKILL) };
            }
        }
    }
}

fn start_app(args: &[&str]) -> Result<Proc> {
    spawn_ready(
        "app.py",
        // Debian's interpreter directly: `python3` may be a pyenv wrapper whose pid is not the
        // server's.
        Command::new("/usr/bin/python3")
            .arg(repo_root().join("tests/demo/app.py"))
            .args(args),
        Duration::from_secs(30),
    )
}

// ---------------------------------------------------------------------------------------------
// 1. IPv6
// ---------------------------------------------------------------------------------------------

/// The demo app listening on `::1`, plaintext socket capture: every exchange over several
/// keep-alive IPv6 connections is recorded once, with `::1` on both ends.
#[test]
fn ipv6_plaintext() -> Result<()> {
    require_root()?;
    let dir = scratch("ipv6");
    let port = free_port_v6()?;
    let app = start_app(&["--host", "::1", "--port", &port.to_string()])?;
    let targets = format!(
        "[[targets]]\npid = {}\ntls = false\nplaintext_ports = [{port}]\nname = \"app6\"\n",
        app.pid()
    );
    let agent = Agent::start(
        &dir.join("agent"),
        &config(
            "max_message_bytes = \"2MiB\"",
            &targets,
            TEST_ROUTES,
            "count",
        ),
    )?;
    let url = format!("http://[::1]:{port}");
    let sizes = [
        0, 1, 100, 1500, 16383, 16384, 16385, 65536, 262_144, 1_048_576,
    ];
    let gets = load(&url, None, 120, 6, &sizes, "GET")?;
    let posts = load(&url, None, 24, 3, &[0, 10, 70_000, 300_000], "POST")?;
    client_ok("IPv6 GET", &gets)?;
    client_ok("IPv6 POST", &posts)?;
    ensure!(
        requests(&gets).len() == 120 && requests(&posts).len() == 24,
        "the client did not complete every request: {} GETs, {} POSTs",
        requests(&gets).len(),
        requests(&posts).len()
    );
    let stats = agent.stop()?;
    let records = read_jsonl(&dir.join("agent/access.jsonl"))?;
    let on_port = records_on_port(&records, port);
    ensure!(
        on_port.len() == records.len(),
        "{} of {} records are not on server port {port}: {:?}",
        records.len() - on_port.len(),
        records.len(),
        records
            .iter()
            .filter(|r| get(r, "server.port").as_u64() != Some(port as u64))
            .take(3)
            .collect::<Vec<_>>()
    );
    let (g, p): (Vec<&Value>, Vec<&Value>) = on_port
        .into_iter()
        .partition(|r| get(r, "http.request.method") == "GET");
    check_records(
        "IPv6 GET",
        &g,
        &gets,
        &Expect {
            with_port: true,
            tls: false,
            ip: "::1",
            routes: &[],
        },
    )?;
    check_records(
        "IPv6 POST",
        &p,
        &posts,
        &Expect {
            with_port: true,
            tls: false,
            ip: "::1",
            routes: &[],
        },
    )?;
    for r in g.iter().chain(&p) {
        ensure!(
            get(r, "process.pid").as_u64() == Some(app.pid() as u64),
            "process.pid is not the app's ({}) in {r}",
            app.pid()
        );
        ensure!(
            get(r, "service.name").as_str() == Some("app6"),
            "service.name in {r}"
        );
    }
    no_losses(&stats)?;
    drop(app);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. The per-call capture cap
// ---------------------------------------------------------------------------------------------

const CAP: u64 = 16 * 1024;
/// app.py writes the head and the body of a response in one `sendall()` when the body is at
/// most this long, and the head, then the body, in two otherwise (tests/demo/README.md).
const APP_ONE_WRITE_MAX_BODY: u64 = 256 * 1024;

/// Bytes of one response the kernel cannot capture with a per-call cap of `CAP`: each write
/// call is captured up to `CAP` bytes from its start. The head is always shorter than the cap,
/// so every missing byte is a body byte.
fn expected_missing(head: u64, body: u64) -> u64 {
    if body <= APP_ONE_WRITE_MAX_BODY {
        (head + body).saturating_sub(CAP)
    } else {
        body.saturating_sub(CAP)
    }
}

/// `max_message_bytes = "16KiB"` on the app's plaintext hop: responses larger than the cap are
/// still recorded with their real size and status, marked incomplete with exactly the bytes
/// beyond the cap as missing and the reason `cap`; the kernel counts the same bytes; the
/// exchange after a cut one on the same connection is parsed normally.
#[test]
fn cap_truncation_is_counted() -> Result<()> {
    require_root()?;
    let dir = scratch("cap");
    let port = free_port();
    let app = start_app(&["--host", "127.0.0.1", "--port", &port.to_string()])?;
    let targets = format!(
        "[[targets]]\npid = {}\ntls = false\nplaintext_ports = [{port}]\nname = \"app\"\n",
        app.pid()
    );
    let agent = Agent::start(
        &dir.join("agent"),
        &config(
            "max_message_bytes = \"16KiB\"",
            &targets,
            TEST_ROUTES,
            "count",
        ),
    )?;
    let sizes = [0u64, 1000, 100_000, 1_048_576];
    let paths: Vec<String> = sizes
        .iter()
        .map(|n| format!("/api/test/bytes/{n}"))
        .collect();
    let report = exchanges(
        &format!("http://127.0.0.1:{port}"),
        None,
        &[
            "--connections",
            "2",
            "--rounds",
            "3",
            "--paths",
            &paths.join(","),
        ],
    )?;
    client_ok("cap", &report)?;
    let stats = agent.stop()?;
    let records = read_jsonl(&dir.join("agent/access.jsonl"))?;
    let reqs = requests(&report);
    ensure!(
        reqs.len() == 2 * 3 * sizes.len(),
        "the client completed {} of {} requests",
        reqs.len(),
        2 * 3 * sizes.len()
    );

    // Per connection (client port), in order: what each record must say.
    type Row = (String, u64, u64, bool, u64, Vec<String>);
    let mut want: BTreeMap<u64, Vec<Row>> = BTreeMap::new();
    let (mut want_missing, mut want_cut) = (0u64, 0u64);
    for r in reqs {
        let (head, body) = (
            r["head_bytes"].as_u64().unwrap(),
            r["response_bytes"].as_u64().unwrap(),
        );
        let n: u64 = r["path"].as_str().unwrap()["/api/test/bytes/".len()..].parse()?;
        ensure!(
            body == n && r["status"] == 200,
            "the app answered {r} for {n} bytes"
        );
        let missing = expected_missing(head, body);
        want_missing += missing;
        want_cut += u64::from(missing > 0);
        want.entry(r["local_port"].as_u64().unwrap())
            .or_default()
            .push((
                r["path"].as_str().unwrap().to_string(),
                200,
                body,
                missing == 0,
                missing,
                if missing > 0 {
                    vec!["cap".to_string()]
                } else {
                    vec![]
                },
            ));
    }
    // The sizes chosen must exercise both a single-write cut and a separate body write.
    ensure!(
        want_cut == 2 * 3 * 2,
        "expected 12 responses over the cap, computed {want_cut}"
    );
    // The kernel side first: it does not depend on the HTTP parser.
    let cut_calls = stats.kernel("kernel_calls_truncated_total{reason=\"cap\"}");
    ensure!(
        cut_calls == want_cut,
        "kernel_calls_truncated_total{{reason=\"cap\"}} = {cut_calls}, expected {want_cut} (one \
         write call per response over the cap; more means the app's sendall() was split into \
         several send calls, and the expected missing bytes would then differ)"
    );
    let dropped = stats.kernel("kernel_bytes_dropped_total{reason=\"cap\"}");
    ensure!(
        dropped == want_missing,
        "kernel_bytes_dropped_total{{reason=\"cap\"}} = {dropped}, expected the sum of the \
         missing bytes {want_missing}"
    );
    let uncaptured = stats.agent("stream_bytes_uncaptured_total{reason=\"cap\"}");
    ensure!(
        uncaptured == want_missing,
        "agent stream_bytes_uncaptured_total{{reason=\"cap\"}} = {uncaptured}, expected \
         {want_missing}"
    );
    let mut got: BTreeMap<u64, Vec<Row>> = BTreeMap::new();
    for r in &records {
        got.entry(get(r, "source.port").as_u64().unwrap_or(0))
            .or_default()
            .push((
                get(r, "url.path").as_str().unwrap_or("?").to_string(),
                get(r, "http.response.status_code").as_u64().unwrap_or(0),
                get(r, "http.response.body.bytes")
                    .as_u64()
                    .unwrap_or(u64::MAX),
                get(r, "sparbar.capture.complete").as_bool().unwrap_or(true),
                get(r, "sparbar.capture.response_bytes_missing")
                    .as_u64()
                    .unwrap_or(u64::MAX),
                get(r, "sparbar.capture.reasons")
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|s| s.as_str().unwrap_or("?").to_string())
                            .collect()
                    })
                    .unwrap_or_else(|| vec!["<missing>".into()]),
            ));
    }
    ensure!(
        records.len() == reqs.len(),
        "{} records for {} requests (per connection, (path, status, body bytes, complete, \
         missing, reasons)):\nwant: {want:?}\ngot:  {got:?}",
        records.len(),
        reqs.len()
    );
    let mut diffs = Vec::new();
    for (port, rows) in &want {
        let empty = Vec::new();
        let g = got.get(port).unwrap_or(&empty);
        for i in 0..rows.len().max(g.len()) {
            if rows.get(i) != g.get(i) {
                diffs.push(format!(
                    "  client port {port}, exchange #{i}:\n    want {:?}\n    got  {:?}",
                    rows.get(i),
                    g.get(i)
                ));
            }
        }
    }
    ensure!(
        want == got,
        "{} records differ from what the cap must produce; (path, status, body bytes, complete, \
         response_bytes_missing, reasons) per connection in order:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    for r in &records {
        ensure!(
            get(r, "sparbar.capture.request_bytes_missing").as_u64() == Some(0),
            "request bytes missing in {r}"
        );
    }

    let incomplete = stats.agent("exchanges_incomplete_total");
    ensure!(
        incomplete == want_cut,
        "exchanges_incomplete_total = {incomplete}, expected {want_cut}"
    );
    let expected_losses: BTreeSet<&str> = [
        "kernel:kernel_bytes_dropped_total{reason=\"cap\"}",
        "agent:stream_bytes_uncaptured_total{reason=\"cap\"}",
        "agent:exchanges_incomplete_total",
    ]
    .into();
    let other: BTreeMap<String, u64> = stats
        .losses()
        .into_iter()
        .filter(|(k, _)| !expected_losses.contains(k.as_str()))
        .collect();
    ensure!(
        other.is_empty(),
        "loss/anomaly counters other than the cap's are not zero (an announced cap hole inside a \
         body of known length is neither a loss elsewhere nor an HTTP anomaly): {other:?}"
    );
    drop(app);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. nginx reload and nginx processes started after the agent
// ---------------------------------------------------------------------------------------------

/// Client port → the worker pids that may have served it.
fn ports_to_pids(report: &Value, pids: &BTreeSet<u32>, into: &mut BTreeMap<u64, BTreeSet<u32>>) {
    for r in requests(report) {
        into.entry(r["local_port"].as_u64().unwrap())
            .or_default()
            .extend(pids.iter().copied());
    }
}

fn check_pids(what: &str, recs: &[&Value], allowed: &BTreeMap<u64, BTreeSet<u32>>) -> Result<()> {
    for r in recs {
        let port = get(r, "source.port").as_u64().unwrap_or(0);
        let pid = get(r, "process.pid").as_u64().unwrap_or(0) as u32;
        let ok = allowed.get(&port).is_some_and(|s| s.contains(&pid));
        ensure!(
            ok,
            "{what}: record of client port {port} names process.pid {pid}, expected one of \
             {:?}: {r}",
            allowed.get(&port)
        );
        ensure!(
            get(r, "process.name").as_str() == Some("nginx")
                && get(r, "service.name").as_str() == Some("nginx"),
            "{what}: process.name/service.name in {r}"
        );
    }
    Ok(())
}

/// `exe = "/usr/sbin/nginx"`: requests before and after a reload (new workers forked by the
/// traced master) are each recorded once, by the worker that served them; a second nginx
/// started after the agent is traced too.
#[test]
fn nginx_reload_and_late_processes() -> Result<()> {
    require_root()?;
    let dir = scratch("reload");
    let (tls_port, app_port) = (free_port(), free_port());
    let platform = Platform::up(&dir.join("platform"), tls_port, app_port, false)?;
    let master = platform.pid("nginx_master_pid");
    ensure!(
        master != 0,
        "platform.py gave no nginx master pid: {}",
        platform.info
    );
    let agent = Agent::start(
        &dir.join("agent"),
        &config(
            "max_message_bytes = \"2MiB\"",
            "[[targets]]\nexe = \"/usr/sbin/nginx\"\nname = \"nginx\"\n",
            TEST_ROUTES,
            "count",
        ),
    )?;
    let cert = platform.cert();
    let url = format!("https://127.0.0.1:{tls_port}");
    let sizes = [0, 1, 1500, 16385, 65536, 262_144];

    let old_workers = children_of(master);
    ensure!(
        old_workers.len() == 2,
        "the platform's nginx master {master} has workers {old_workers:?}, expected 2"
    );
    let before = load(&url, Some(&cert), 60, 6, &sizes, "GET")?;
    client_ok("before reload", &before)?;

    // Reload: the master re-reads its config and forks new workers; the old ones leave once
    // their (now closed) connections are gone.
    // SAFETY: kill(2) with a pid platform.py reported for the nginx master it started.
    ensure!(
        unsafe { libc::kill(master as i32, libc::SIGHUP) } == 0,
        "kill -HUP {master} failed"
    );
    let new_workers = wait_for(
        "the reloaded nginx to replace both workers",
        Duration::from_secs(30),
        || {
            let w = children_of(master);
            (w.len() == 2 && w.is_disjoint(&old_workers)).then_some(w)
        },
    )?;
    let after = load(&url, Some(&cert), 60, 6, &sizes, "GET")?;
    client_ok("after reload", &after)?;

    // A second nginx, started while the agent runs: own prefix and TLS port, same certificate,
    // the same app behind it.
    let port2 = free_port();
    let http_block = format!(
        "    upstream app {{ server 127.0.0.1:{app_port}; keepalive 8; }}\n\
         server {{\n        listen 127.0.0.1:{port2} ssl;\n\
         ssl_certificate {cert};\n        ssl_certificate_key {key};\n\
         location / {{ proxy_pass http://app; proxy_http_version 1.1; \
         proxy_set_header Connection \"\"; }}\n    }}",
        key = platform.key()
    );
    let late = Nginx::start(&dir.join("nginx2"), &http_block, port2)?;
    let late_workers = late.workers();
    let third = load(
        &format!("https://127.0.0.1:{port2}"),
        Some(&cert),
        40,
        4,
        &sizes,
        "GET",
    )?;
    client_ok("late nginx", &third)?;

    let stats = agent.stop()?;
    let records = read_jsonl(&dir.join("agent/access.jsonl"))?;

    // The platform's nginx: before and after the reload together.
    let front = records_on_port(&records, tls_port);
    let mut both = before.clone();
    both["requests"]
        .as_array_mut()
        .unwrap()
        .extend(requests(&after).iter().cloned());
    check_records(
        "platform nginx (before + after reload)",
        &front,
        &both,
        &Expect {
            with_port: true,
            tls: true,
            ip: "127.0.0.1",
            routes: &[],
        },
    )?;
    let mut allowed = BTreeMap::new();
    ports_to_pids(&before, &old_workers, &mut allowed);
    ports_to_pids(&after, &new_workers, &mut allowed);
    check_pids("platform nginx", &front, &allowed)?;

    let second = records_on_port(&records, port2);
    check_records(
        "nginx started after the agent",
        &second,
        &third,
        &Expect {
            with_port: true,
            tls: true,
            ip: "127.0.0.1",
            routes: &[],
        },
    )?;
    let mut allowed2 = BTreeMap::new();
    ports_to_pids(&third, &late_workers, &mut allowed2);
    check_pids("nginx started after the agent", &second, &allowed2)?;

    ensure!(
        records.len() == 160,
        "{} records in all, expected 160 (60 + 60 + 40)",
        records.len()
    );
    no_losses(&stats)?;
    drop(late);
    drop(platform);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. HTTP/2
// ---------------------------------------------------------------------------------------------

/// nginx speaking HTTP/2 over TLS (ALPN h2), curl `--http2` with several requests on one
/// connection: every exchange the server answered is one record, with `http.version` "2", the
/// path, the status and the body size the client got, and no HTTP/2 anomaly.
#[test]
fn http2_exchanges_are_recorded_exactly() -> Result<()> {
    require_root()?;
    let dir = scratch("http2");
    // The platform helper makes the certificate; its own servers are not used.
    let platform = Platform::up(&dir.join("platform"), free_port(), free_port(), false)?;
    let cert = platform.cert();
    let port = free_port();
    let http_block = format!(
        "    default_type text/plain;\n    server {{\n        listen 127.0.0.1:{port} ssl http2;\n\
         ssl_certificate {cert};\n        ssl_certificate_key {key};\n\
         location /api/test/bytes/ {{ return 200 \"0123456789\"; }}\n    }}",
        key = platform.key()
    );
    let h2 = Nginx::start(&dir.join("nginx-h2"), &http_block, port)?;
    let agent = Agent::start(
        &dir.join("agent"),
        &config(
            "max_message_bytes = \"2MiB\"",
            "[[targets]]\nexe = \"/usr/sbin/nginx\"\nname = \"nginx\"\n",
            TEST_ROUTES,
            "record",
        ),
    )?;
    const CONNECTIONS: u64 = 3;
    const PER_CONNECTION: usize = 3;
    for k in 0..CONNECTIONS {
        let urls: Vec<String> = (0..PER_CONNECTION)
            .map(|i| format!("https://127.0.0.1:{port}/api/test/bytes/{}", 10 + i))
            .collect();
        let out = output(
            Command::new("curl")
                .args(["-sS", "--http2", "--cacert", &cert, "-w"])
                .arg("%{http_version} %{response_code} %{size_download} %{num_connects}\\n")
                .args(urls.iter().flat_map(|u| ["-o", "/dev/null", u.as_str()])),
        )?;
        let lines: Vec<&str> = out.lines().collect();
        let expect: Vec<String> = (0..PER_CONNECTION)
            .map(|i| format!("2 200 10 {}", u8::from(i == 0)))
            .collect();
        ensure!(
            lines == expect,
            "curl connection {k}: got {lines:?}, expected {expect:?} (HTTP/2, one connection \
             reused for all requests)"
        );
    }
    let stats = agent.stop()?;
    drop(h2);
    let records = read_jsonl(&dir.join("agent/access.jsonl")).unwrap_or_default();
    // Per connection, the paths and body sizes recorded.
    let mut got: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
    for r in &records {
        ensure!(
            r["http"]["version"] == "2" && r["http"]["response"]["status_code"] == 200,
            "record {r}: expected an HTTP/2 200"
        );
        got.entry(r["sparbar"]["connection"]["id"].to_string())
            .or_default()
            .push((
                r["url"]["path"].as_str().unwrap_or_default().to_string(),
                r["http"]["response"]["body"]["bytes"].as_u64().unwrap_or(0),
            ));
    }
    let one: Vec<(String, u64)> = (0..PER_CONNECTION)
        .map(|i| (format!("/api/test/bytes/{}", 10 + i), 10))
        .collect();
    for v in got.values_mut() {
        v.sort();
    }
    ensure!(
        got.len() == CONNECTIONS as usize && got.values().all(|v| *v == one),
        "{} records; per connection {got:?}, expected {CONNECTIONS} connections each with {one:?}",
        records.len()
    );
    let anomalies: BTreeMap<&String, &Value> = stats.0["agent"]
        .as_object()
        .map(|m| m.iter().filter(|(k, _)| k.contains("anomal")).collect())
        .unwrap_or_default();
    ensure!(
        !anomalies.keys().any(|k| k.contains("h2_")),
        "HTTP/2 anomalies on clean traffic: {anomalies:?}"
    );
    let h2_conns = stats.agent("connections_protocol_total{protocol=\"h2\"}");
    ensure!(
        h2_conns == CONNECTIONS,
        "connections_protocol_total{{protocol=\"h2\"}} = {h2_conns}, expected {CONNECTIONS}"
    );
    let parsed = stats.agent("exchanges_parsed_total");
    ensure!(
        parsed == CONNECTIONS * PER_CONNECTION as u64,
        "exchanges_parsed_total = {parsed}, expected {}",
        CONNECTIONS * PER_CONNECTION as u64
    );
    drop(platform);
    Ok(())
}

/// node's HTTP/2 server (OpenSSL linked into node, memory BIOs) and node's HTTP/2 client: 60
/// concurrent streams on one connection, bodies up to 300 KB across many DATA frames, cookie
/// crumbs as separate fields. Every stream is one record with the path, status and body size
/// the client got.
#[test]
fn http2_node_server_and_client_many_streams() -> Result<()> {
    require_root()?;
    let dir = scratch("http2-node");
    let platform = Platform::up(&dir.join("platform"), free_port(), free_port(), false)?;
    let (cert, key) = (platform.cert(), platform.key());
    let port = free_port();
    let server = spawn_ready(
        "node-h2",
        Command::new("node")
            .arg(repo_root().join("tests/servers/node_https.js"))
            .args([
                "--port",
                &port.to_string(),
                "--cert",
                &cert,
                "--key",
                &key,
                "--h2",
            ]),
        Duration::from_secs(30),
    )?;
    let targets = format!("[[targets]]\npid = {}\nname = \"node\"\n", server.pid());
    let agent = Agent::start(
        &dir.join("agent"),
        &config(
            "max_message_bytes = \"2MiB\"",
            &targets,
            TEST_ROUTES,
            "record",
        ),
    )?;
    const SIZES: [u64; 4] = [10, 20_000, 300_000, 0];
    let paths: Vec<String> = (0..60)
        .map(|i| {
            if i % 15 == 14 {
                "/nowhere".to_string()
            } else {
                format!("/api/test/bytes/{}", SIZES[i % SIZES.len()])
            }
        })
        .collect();
    let out = output(
        Command::new("node")
            .arg(repo_root().join("tests/clients/h2_client.js"))
            .args(["--url", &format!("https://127.0.0.1:{port}"), "--ca", &cert])
            .args([
                "--paths",
                &paths.join(","),
                "--cookie",
                "sid=N0deS3ss; theme=dark",
            ]),
    )?;
    let report: Value = serde_json::from_str(out.trim()).context("h2_client output")?;
    ensure!(
        report["errors"].as_array().is_some_and(|e| e.is_empty()),
        "client errors: {report}"
    );
    let mut want: Vec<(String, u64, u64)> = report["responses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["path"].as_str().unwrap().to_string(),
                r["status"].as_u64().unwrap(),
                r["bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    ensure!(want.len() == 60, "the client got {} answers", want.len());
    let stats = agent.stop()?;
    drop(server);
    let records = read_jsonl(&dir.join("agent/access.jsonl"))?;
    let mut got: Vec<(String, u64, u64)> = Vec::new();
    for r in &records {
        ensure!(r["http"]["version"] == "2", "not an HTTP/2 record: {r}");
        got.push((
            r["url"]["path"].as_str().unwrap_or_default().to_string(),
            r["http"]["response"]["status_code"].as_u64().unwrap_or(0),
            r["http"]["response"]["body"]["bytes"]
                .as_u64()
                .unwrap_or(u64::MAX),
        ));
    }
    want.sort();
    got.sort();
    ensure!(
        got == want,
        "{} records, {} answers; records {got:?}, answers {want:?}",
        records.len(),
        want.len()
    );
    let anomalies: BTreeMap<&String, &Value> = stats.0["agent"]
        .as_object()
        .map(|m| m.iter().filter(|(k, _)| k.contains("anomal")).collect())
        .unwrap_or_default();
    ensure!(
        !anomalies.keys().any(|k| k.contains("h2_")),
        "HTTP/2 anomalies on clean traffic: {anomalies:?}"
    );
    ensure!(
        stats.agent("connections_protocol_total{protocol=\"h2\"}") == 1,
        "connections by protocol: {:?}",
        stats.0["agent"]
    );
    no_losses(&stats)?;
    drop(platform);
    Ok(())
}

/// The page Chromium loads: it sets two cookies (sent back as two HPACK crumbs) and fetches the
/// address-book endpoint, then writes the answer's status and size into the page.
const CHROMIUM_PAGE: &str = r#"<!doctype html><html><head><title>h2</title></head><body>
<p id="r">pending</p>
<script>
document.cookie = "sid=Chr0meS3ss; path=/";
document.cookie = "theme=dark; path=/";
fetch("/api/test/bytes/12", {credentials: "same-origin"})
  .then(r => r.text().then(t => { document.getElementById("r").textContent = "got " + r.status + " " + t.length; }))
  .catch(e => { document.getElementById("r").textContent = "failed " + e; });
</script></body></html>
"#;

/// Headless Chromium (Debian's) loads a page from nginx over HTTP/2 whose script calls the API
/// with fetch() and its cookies: every exchange nginx logged is one record with the same method,
/// path, status and body size, all `http.version` "2".
#[test]
fn http2_chromium_page_and_fetch() -> Result<()> {
    require_root()?;
    let dir = scratch("http2-chromium");
    let platform = Platform::up(&dir.join("platform"), free_port(), free_port(), false)?;
    let cert = platform.cert();
    let port = free_port();
    let www = dir.join("www");
    fs::create_dir_all(&www)?;
    fs::write(www.join("index.html"), CHROMIUM_PAGE)?;
    let http_block = format!(
        "    default_type text/html;\n    server {{\n        listen 127.0.0.1:{port} ssl http2;\n\
         ssl_certificate {cert};\n        ssl_certificate_key {key};\n        root {www};\n\
         location /api/test/bytes/ {{ default_type text/plain; return 200 \"0123456789AB\"; }}\n\
         location = /favicon.ico {{ return 204; }}\n    }}",
        key = platform.key(),
        www = www.display()
    );
    let nginx = Nginx::start(&dir.join("nginx-h2"), &http_block, port)?;
    let agent = Agent::start(
        &dir.join("agent"),
        &config(
            "max_message_bytes = \"2MiB\"",
            "[[targets]]\nexe = \"/usr/sbin/nginx\"\nname = \"nginx\"\n",
            TEST_ROUTES,
            "record",
        ),
    )?;
    let dom = output(
        Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--ignore-certificate-errors",
                "--virtual-time-budget=10000",
            ])
            .arg(format!(
                "--user-data-dir={}",
                dir.join("chromium").display()
            ))
            .arg("--dump-dom")
            .arg(format!("https://127.0.0.1:{port}/index.html")),
    )?;
    ensure!(
        dom.contains("got 200 12"),
        "the page's fetch did not complete: {dom}"
    );
    let stats = agent.stop()?;
    drop(nginx);
    // What nginx logged (combined format): method, path, protocol, status, body bytes.
    let log = fs::read_to_string(dir.join("nginx-h2/logs/access.log"))?;
    let mut want: Vec<(String, String, u64, u64)> = Vec::new();
    for line in log.lines() {
        let req = line.split('"').nth(1).unwrap_or_default();
        let after: Vec<&str> = line
            .split('"')
            .nth(2)
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        let parts: Vec<&str> = req.split(' ').collect();
        ensure!(
            parts.len() == 3 && parts[2] == "HTTP/2.0",
            "nginx logged a request that is not HTTP/2: {line}"
        );
        want.push((
            parts[0].to_string(),
            parts[1].to_string(),
            after[0].parse()?,
            after[1].parse()?,
        ));
    }
    ensure!(
        want.iter().any(|w| w.1 == "/api/test/bytes/12"),
        "nginx logged no fetch: {want:?}"
    );
    let records = read_jsonl(&dir.join("agent/access.jsonl"))?;
    let mut got: Vec<(String, String, u64, u64)> = Vec::new();
    for r in &records {
        ensure!(r["http"]["version"] == "2", "not an HTTP/2 record: {r}");
        got.push((
            r["http"]["request"]["method"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            r["url"]["path"].as_str().unwrap_or_default().to_string(),
            r["http"]["response"]["status_code"].as_u64().unwrap_or(0),
            r["http"]["response"]["body"]["bytes"]
                .as_u64()
                .unwrap_or(u64::MAX),
        ));
    }
    want.sort();
    got.sort();
    ensure!(got == want, "records {got:?}, nginx logged {want:?}");
    let anomalies: BTreeMap<&String, &Value> = stats.0["agent"]
        .as_object()
        .map(|m| m.iter().filter(|(k, _)| k.contains("anomal")).collect())
        .unwrap_or_default();
    ensure!(
        !anomalies.keys().any(|k| k.contains("h2_")),
        "HTTP/2 anomalies on Chromium's traffic: {anomalies:?}"
    );
    drop(platform);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. gzip and chunked responses through nginx
// ---------------------------------------------------------------------------------------------

const ABOOK_ROUTES: &str = r#"
[[routes]]
route = "POST /login"
name = "auth.login"

[[routes]]
route = "GET /api/addressbook/schools/{schoolId}/persons"
name = "abook.school.persons"
query_params = ["page", "pageSize", "schoolId"]

[[routes]]
route = "GET /api/addressbook/persons"
name = "abook.persons.query"
query_params = ["page", "pageSize", "schoolId"]

[[routes]]
route = "GET /api/addressbook/persons/{id}"
name = "abook.person"
query_params = ["page", "pageSize", "schoolId"]
"#;
const ALLOWED_QUERY: [&str; 3] = ["page", "pageSize", "schoolId"];

type AbookKey = (u64, String, String, String, u64, u64, u64);

/// The `url.query` a record must carry: the allow-listed parameters, names sorted.
fn allowed_query(path: &str) -> String {
    let Some((_, q)) = path.split_once('?') else {
        return String::new();
    };
    let mut pairs: Vec<(&str, &str)> = q
        .split('&')
        .filter_map(|p| p.split_once('='))
        .filter(|(k, _)| ALLOWED_QUERY.contains(k))
        .collect();
    pairs.sort_by_key(|(k, _)| *k);
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// (client port or 0, method, path, query, status, request bytes, response bytes); the
/// response bytes are `bytes_field` of the client's report.
fn abook_client(report: &Value, with_port: bool, bytes_field: &str) -> BTreeMap<AbookKey, usize> {
    let mut m = BTreeMap::new();
    for r in requests(report) {
        let path = r["path"].as_str().unwrap();
        let k = (
            if with_port {
                r["local_port"].as_u64().unwrap()
            } else {
                0
            },
            r["method"].as_str().unwrap().to_string(),
            path.split('?').next().unwrap().to_string(),
            allowed_query(path),
            r["status"].as_u64().unwrap(),
            r["request_bytes"].as_u64().unwrap(),
            r[bytes_field].as_u64().unwrap(),
        );
        *m.entry(k).or_insert(0) += 1;
    }
    m
}

fn abook_agent(recs: &[&Value], with_port: bool) -> BTreeMap<AbookKey, usize> {
    let mut m = BTreeMap::new();
    for r in recs {
        let k = (
            if with_port {
                get(r, "source.port").as_u64().unwrap_or(u64::MAX)
            } else {
                0
            },
            get(r, "http.request.method")
                .as_str()
                .unwrap_or("?")
                .to_string(),
            get(r, "url.path").as_str().unwrap_or("?").to_string(),
            get(r, "url.query").as_str().unwrap_or("").to_string(),
            get(r, "http.response.status_code").as_u64().unwrap_or(0),
            get(r, "http.request.body.bytes")
                .as_u64()
                .unwrap_or(u64::MAX),
            get(r, "http.response.body.bytes")
                .as_u64()
                .unwrap_or(u64::MAX),
        );
        *m.entry(k).or_insert(0) += 1;
    }
    m
}

/// Address-book JSON through nginx with `Accept-Encoding: gzip`: nginx answers chunked gzip.
/// On the TLS side `http.response.body.bytes` is the compressed size the client received
/// (chunk framing removed, not decoded); on the app's plaintext hop it is the plain JSON size.
#[test]
fn gzip_and_chunked_through_nginx() -> Result<()> {
    require_root()?;
    let dir = scratch("gzip");
    let (tls_port, app_port) = (free_port(), free_port());
    let platform = Platform::up(&dir.join("platform"), tls_port, app_port, false)?;
    let dataset: Value = serde_json::from_str(&fs::read_to_string(
        platform.info["dataset"].as_str().unwrap_or_default(),
    )?)?;
    let account = dataset["accounts"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|a| a["role"] == "principal" && a["schoolId"] == "sch-01")
        })
        .context("no principal of sch-01 in the dataset")?;
    let (user, password) = (
        account["username"].as_str().unwrap_or_default(),
        account["password"].as_str().unwrap_or_default(),
    );
    let own_person = account["userId"].as_u64().unwrap_or(0) + 4;
    let targets = format!(
        "[[targets]]\nexe = \"/usr/sbin/nginx\"\nname = \"nginx\"\n\n[[targets]]\npid = {}\n\
         tls = false\nplaintext_ports = [{app_port}]\nname = \"app\"\n",
        platform.pid("app_pid")
    );
    let agent = Agent::start(
        &dir.join("agent"),
        &config(
            "max_message_bytes = \"2MiB\"",
            &targets,
            ABOOK_ROUTES,
            "count",
        ),
    )?;
    let paths = [
        // about 40 KB of JSON: several gzip chunks
        "/api/addressbook/schools/sch-01/persons?page=1&pageSize=100".to_string(),
        "/api/addressbook/persons?schoolId=sch-01&page=2&pageSize=50".to_string(),
        // one person: a few hundred bytes, still over gzip_min_length
        format!("/api/addressbook/persons/{own_person}"),
        // 403: a small JSON error under gzip_min_length, sent with Content-Length
        "/api/addressbook/schools/sch-02/persons?page=1&pageSize=10".to_string(),
        // an empty page
        "/api/addressbook/schools/sch-01/persons?page=99&pageSize=100".to_string(),
    ];
    let report = exchanges(
        &format!("https://127.0.0.1:{tls_port}"),
        Some(&platform.cert()),
        &[
            "--connections",
            "3",
            "--rounds",
            "2",
            "--login",
            &format!("{user}:{password}"),
            "--accept-encoding",
            "gzip",
            "--paths",
            &paths.join(","),
        ],
    )?;
    client_ok("gzip", &report)?;
    let reqs = requests(&report);
    ensure!(
        reqs.len() == 3 * (1 + 2 * paths.len()),
        "the client completed {} of {} requests",
        reqs.len(),
        3 * (1 + 2 * paths.len())
    );
    // The traffic must really be what this test is about.
    let gz_chunked = reqs
        .iter()
        .filter(|r| {
            r["content_encoding"] == "gzip"
                && r["transfer_encoding"] == "chunked"
                && r["response_bytes"].as_u64() < r["decoded_bytes"].as_u64()
        })
        .count();
    ensure!(
        gz_chunked == 3 * 2 * 3,
        "{gz_chunked} chunked gzip responses, expected 18 (3 of the 5 paths answer with more \
         than gzip_min_length bytes of JSON; is gzip on in the platform's nginx?): {report}"
    );
    ensure!(
        reqs.iter().filter(|r| r["status"] == 403).count() == 6
            && reqs
                .iter()
                .all(|r| r["status"] == 200 || r["status"] == 403),
        "unexpected statuses (login failed?): {report}"
    );
    let stats = agent.stop()?;
    let records = read_jsonl(&dir.join("agent/access.jsonl"))?;

    let front = records_on_port(&records, tls_port);
    ensure!(
        front.len() == reqs.len(),
        "nginx TLS: {} records for {} requests",
        front.len(),
        reqs.len()
    );
    let (c, a) = (
        abook_client(&report, true, "response_bytes"),
        abook_agent(&front, true),
    );
    ensure!(
        c == a,
        "nginx TLS: records differ from what the client received on the wire (response bytes = \
         compressed, dechunked)\nclient: {c:?}\nagent:  {a:?}"
    );
    let up = records_on_port(&records, app_port);
    ensure!(
        up.len() == reqs.len(),
        "app plaintext hop: {} records for {} requests",
        up.len(),
        reqs.len()
    );
    let (c, a) = (
        abook_client(&report, false, "decoded_bytes"),
        abook_agent(&up, false),
    );
    ensure!(
        c == a,
        "app plaintext hop: records differ from the client's decoded bodies (the app sends \
         identity-encoded JSON)\nclient: {c:?}\nagent:  {a:?}"
    );
    ensure!(
        records.len() == 2 * reqs.len(),
        "{} records in all, expected {}",
        records.len(),
        2 * reqs.len()
    );
    let secrets: BTreeSet<&str> = std::iter::once(password)
        .chain(reqs.iter().filter_map(|r| r["cookie"].as_str()))
        .chain(
            reqs.iter()
                .filter_map(|r| r["cookie"].as_str()?.split_once('=').map(|(_, v)| v)),
        )
        .collect();
    for r in &records {
        ensure!(
            get(r, "sparbar.capture.complete").as_bool() == Some(true),
            "capture not complete in {r}"
        );
        let tls = get(r, "server.port").as_u64() == Some(tls_port as u64);
        ensure!(
            get(r, "tls.established").as_bool().unwrap_or(false) == tls,
            "tls.established wrong in {r}"
        );
        if get(r, "http.request.method") == "GET" {
            ensure!(
                get(r, "http.response.mime_type").as_str() == Some("application/json"),
                "http.response.mime_type in {r}"
            );
        }
        let text = r.to_string();
        for s in &secrets {
            ensure!(
                !text.contains(s),
                "a secret ({s:?}) is in the record {text}"
            );
        }
    }
    no_losses(&stats)?;
    drop(platform);
    Ok(())
}

/// nginx serving static files with `sendfile on` over a plaintext port: the body bytes never pass
/// through user memory, so they are counted (kernel and record) but not copied, and the
/// exchanges after them on the same keep-alive connection are still parsed.
#[test]
fn sendfile_is_counted_not_copied() -> Result<()> {
    require_root()?;
    let dir = scratch("sendfile");
    let port = free_port();
    let root = dir.join("static");
    fs::create_dir_all(&root)?;
    let sizes = [1000u64, 30_000, 200_000];
    for n in sizes {
        fs::write(root.join(format!("f{n}.bin")), vec![b'x'; n as usize])?;
    }
    let nginx = Nginx::start(
        &dir.join("nginx"),
        &format!("    server {{\n        listen 127.0.0.1:{port};\n        root {};\n        sendfile on;\n        keepalive_requests 1000;\n    }}", root.display()),
        port,
    )?;
    let targets = format!(
        "[[targets]]\npid = {}\ntls = false\nplaintext_ports = [{port}]\nname = \"nginx-static\"\n",
        nginx.master()
    );
    let routes = "[[routes]]\nroute = \"GET /{file}\"\nname = \"static\"\n";
    let agent = Agent::start(&dir.join("agent"), &config("", &targets, routes, "count"))?;
    // 4 rounds over the 3 files on one keep-alive connection.
    let urls: Vec<String> = (0..4)
        .flat_map(|_| {
            sizes
                .iter()
                .map(|n| format!("http://127.0.0.1:{port}/f{n}.bin"))
        })
        .collect();
    let out = output(
        Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{size_download} %{num_connects}\\n",
            ])
            .args(&urls),
    )?;
    let lines: Vec<&str> = out.lines().collect();
    ensure!(lines.len() == 12, "curl reported {lines:?}");
    ensure!(
        lines.iter().skip(1).all(|l| l.ends_with(" 0")),
        "curl did not reuse its connection: {lines:?}"
    );
    let stats = agent.stop()?;
    let records = read_jsonl(&dir.join("agent/access.jsonl"))?;
    ensure!(
        records.len() == 12,
        "{} records for 12 requests",
        records.len()
    );
    let mut got: Vec<(String, u64, u64, bool, u64)> = records
        .iter()
        .map(|r| {
            (
                get(r, "url.path").as_str().unwrap_or("").to_string(),
                get(r, "http.response.status_code").as_u64().unwrap_or(0),
                get(r, "http.response.body.bytes").as_u64().unwrap_or(0),
                get(r, "sparbar.capture.complete").as_bool().unwrap_or(true),
                get(r, "sparbar.capture.response_bytes_missing")
                    .as_u64()
                    .unwrap_or(0),
            )
        })
        .collect();
    got.sort();
    let mut want: Vec<(String, u64, u64, bool, u64)> = (0..4)
        .flat_map(|_| {
            sizes
                .iter()
                .map(|&n| (format!("/f{n}.bin"), 200, n, false, n))
        })
        .collect();
    want.sort();
    ensure!(
        got == want,
        "records differ:\n got  {got:?}\n want {want:?}"
    );
    for r in &records {
        let reasons = get(r, "sparbar.capture.reasons").to_string();
        ensure!(reasons.contains("sendfile"), "no sendfile reason in {r}");
    }
    let total: u64 = 4 * sizes.iter().sum::<u64>();
    ensure!(
        stats.kernel("kernel_bytes_uncaptured_total{reason=\"sendfile\"}") == total,
        "sendfile bytes counted {} != {total}",
        stats.kernel("kernel_bytes_uncaptured_total{reason=\"sendfile\"}")
    );
    ensure!(
        stats.agent("stream_bytes_uncaptured_total{reason=\"sendfile\"}") == total,
        "agent saw {} sendfile bytes, {total} sent",
        stats.agent("stream_bytes_uncaptured_total{reason=\"sendfile\"}")
    );
    drop(nginx);
    Ok(())
}
