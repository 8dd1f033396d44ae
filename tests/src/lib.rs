//! Harness for the privileged end-to-end tests and the demo: starts real servers (nginx with
//! TLS, the demo app, CPython's ssl server, node), runs the agent binary with a generated
//! config, drives real clients, and reads back the agent's records and counters.
//!
//! When the machine lacks something (root, nginx, node, the agent binary), the harness fails
//! with the reason; it never skips silently.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;

pub mod differential;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sparbar-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// A TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("end-to-end tests load eBPF programs and need root (run `cargo xtask test` as root)");
    }
    Ok(())
}

pub fn agent_bin() -> Result<PathBuf> {
    let p = std::env::var_os("SPARBAR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/release/sparbar"));
    if !p.exists() {
        bail!("agent binary {} not found: build it with `cargo xtask build` or run through `cargo xtask test`", p.display());
    }
    Ok(p)
}

/// A child process that is killed when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// SIGTERM, then wait up to `timeout`; SIGKILL after that.
    pub fn stop(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        self.signal(libc::SIGTERM);
        let end = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > end {
                self.child.kill()?;
                bail!(
                    "{} did not stop within {timeout:?} after SIGTERM",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts a server that prints `READY <port>` on stdout when it listens.
pub fn spawn_ready(name: &str, cmd: &mut Command, timeout: Duration) -> Result<Proc> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {name}: {cmd:?}"))?;
    let out = child.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if line.starts_with("READY") {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(timeout).is_err() {
        let _ = child.kill();
        bail!("{name} did not print READY within {timeout:?}");
    }
    Ok(Proc {
        child,
        name: name.to_string(),
    })
}

/// The agent under test.
pub struct Agent {
    pub proc: Proc,
    pub dir: PathBuf,
    pub records: PathBuf,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    /// Writes `config` (TOML; `@DIR@` is replaced by the agent's directory) and starts
    /// `sparbar run`, waiting until it says it is running.
    pub fn start(dir: &Path, config: &str) -> Result<Agent> {
        Agent::start_with(dir, config, &[])
    }

    /// [`Agent::start`] with extra arguments to `sparbar run` (e.g. `--test-clock`).
    pub fn start_with(dir: &Path, config: &str, extra: &[&str]) -> Result<Agent> {
        let bin = agent_bin()?;
        std::fs::create_dir_all(dir)?;
        let config = config.replace("@DIR@", &dir.display().to_string());
        let cfg_path = dir.join("sparbar.toml");
        std::fs::write(&cfg_path, config)?;
        let mut child = Command::new(&bin)
            .args(["run", "--config"])
            .arg(&cfg_path)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let err = child.stderr.take().context("stderr")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("  [agent] {line}");
                if line.contains("sparbar running") {
                    let _ = tx.send(());
                }
                log2.lock().unwrap().push(line);
            }
        });
        let proc = Proc {
            child,
            name: "sparbar".into(),
        };
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            bail!(
                "the agent did not report running within 60 s; its log:\n{}",
                log.lock().unwrap().join("\n")
            );
        }
        Ok(Agent {
            proc,
            dir: dir.to_path_buf(),
            records: dir.join("access.jsonl"),
            log,
        })
    }

    /// SIGTERM and wait for the clean exit; returns the final counters.
    pub fn stop(mut self) -> Result<Stats> {
        let st = self.proc.stop(Duration::from_secs(30))?;
        if !st.success() {
            bail!(
                "agent exited with {st}; log:\n{}",
                self.log.lock().unwrap().join("\n")
            );
        }
        self.stats()
    }

    pub fn stats(&self) -> Result<Stats> {
        let text =
            std::fs::read_to_string(self.dir.join("stats.json")).context("reading stats.json")?;
        Ok(Stats(serde_json::from_str(&text)?))
    }

    pub fn read_records(&self) -> Result<Vec<Value>> {
        read_jsonl(&self.records)
    }

    /// Waits up to 20 s until the agent has logged a line containing every one of `needles`.
    pub fn wait_log(&self, needles: &[&str]) -> Result<()> {
        let t0 = Instant::now();
        while !self
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| needles.iter().all(|n| l.contains(n)))
        {
            ensure!(
                t0.elapsed() < Duration::from_secs(20),
                "the agent never logged a line with {needles:?}; its log:\n{}",
                self.log.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

/// The records of a JSON Lines file the agent wrote, without the trail's own bookkeeping
/// (agent start, state, gap, sink and checkpoint records; see [`read_trail`]).
pub fn read_jsonl(path: &Path) -> Result<Vec<Value>> {
    Ok(read_trail(path)?
        .into_iter()
        .filter(|r| !is_trail_record(r))
        .collect())
}

/// The audit trail's own records: agent start and state, gaps, sink events, checkpoints.
pub fn is_trail_record(r: &Value) -> bool {
    matches!(
        r["event"]["dataset"].as_str(),
        Some(
            "sparbar.agent"
                | "sparbar.state"
                | "sparbar.gap"
                | "sparbar.sink"
                | "sparbar.checkpoint"
        )
    )
}

/// Every line of a JSON Lines file the agent wrote.
pub fn read_trail(path: &Path) -> Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("bad record line: {l}")))
        .collect()
}

/// The agent's `stats.json`.
pub struct Stats(pub Value);

impl Stats {
    pub fn kernel(&self, name: &str) -> u64 {
        self.0["kernel"][name].as_u64().unwrap_or(0)
    }
    pub fn agent(&self, name: &str) -> u64 {
        self.0["agent"][name].as_u64().unwrap_or(0)
    }
    /// Every non-zero counter that means a loss, kernel or agent side.
    pub fn losses(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for side in ["kernel", "agent"] {
            if let Some(m) = self.0[side].as_object() {
                for (k, v) in m {
                    let v = v.as_u64().unwrap_or(0);
                    if v > 0
                        && (k.contains("dropped")
                            || k.contains("lost")
                            || k.contains("uncaptured")
                            || k.contains("unknown")
                            || k.contains("incomplete")
                            || k.contains("anomal"))
                    {
                        out.insert(format!("{side}:{k}"), v);
                    }
                }
            }
        }
        out
    }
}

/// Dotted path lookup in a record: `get(r, "http.response.status_code")`.
pub fn get<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, k| &v[k])
}

/// Runs a command to completion and returns stdout, failing with stderr when it fails.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The demo platform (nginx TLS → app) started through tests/demo/platform.py.
pub struct Platform {
    pub dir: PathBuf,
    pub info: Value,
}

impl Platform {
    pub fn up(dir: &Path, tls_port: u16, app_port: u16, vulnerable: bool) -> Result<Platform> {
        Platform::up_recording(dir, tls_port, app_port, vulnerable, None)
    }

    /// [`Platform::up`], the app writing one line per answered request to `record`
    /// (`app.py --record`: what it received and whom it authenticated).
    pub fn up_recording(
        dir: &Path,
        tls_port: u16,
        app_port: u16,
        vulnerable: bool,
        record: Option<&Path>,
    ) -> Result<Platform> {
        Platform::up_with(dir, tls_port, app_port, vulnerable, record, None)
    }

    /// [`Platform::up`] with a second TLS port on the same nginx that offers HTTP/2.
    pub fn up_h2(
        dir: &Path,
        tls_port: u16,
        app_port: u16,
        h2_port: u16,
        vulnerable: bool,
    ) -> Result<Platform> {
        Platform::up_with(dir, tls_port, app_port, vulnerable, None, Some(h2_port))
    }

    fn up_with(
        dir: &Path,
        tls_port: u16,
        app_port: u16,
        vulnerable: bool,
        record: Option<&Path>,
        h2_port: Option<u16>,
    ) -> Result<Platform> {
        let mut c = Command::new("python3");
        c.arg(repo_root().join("tests/demo/platform.py"))
            .args(["up", "--dir"])
            .arg(dir)
            .args([
                "--tls-port",
                &tls_port.to_string(),
                "--app-port",
                &app_port.to_string(),
            ]);
        if vulnerable {
            c.arg("--vulnerable");
        }
        if let Some(r) = record {
            c.arg("--app-record").arg(r);
        }
        if let Some(p) = h2_port {
            c.args(["--h2-port", &p.to_string()]);
        }
        let text = output(&mut c)?;
        let info: Value = serde_json::from_str(text.lines().last().unwrap_or(""))
            .with_context(|| format!("platform.py up printed: {text}"))?;
        Ok(Platform {
            dir: dir.to_path_buf(),
            info,
        })
    }

    pub fn cert(&self) -> String {
        self.info["cert"].as_str().unwrap_or_default().to_string()
    }
    /// The private key of [`Platform::cert`], for servers the tests start on their own.
    pub fn key(&self) -> String {
        self.info["key"].as_str().unwrap_or_default().to_string()
    }
    pub fn pid(&self, key: &str) -> u32 {
        self.info[key].as_u64().unwrap_or(0) as u32
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        let _ = Command::new("python3")
            .arg(repo_root().join("tests/demo/platform.py"))
            .args(["down", "--dir"])
            .arg(&self.dir)
            .status();
    }
}

/// Runs tests/clients/load.py and returns its report.
pub fn load(
    url: &str,
    cafile: Option<&str>,
    requests: usize,
    connections: usize,
    sizes: &[usize],
    method: &str,
) -> Result<Value> {
    let mut c = Command::new("python3");
    c.arg(repo_root().join("tests/clients/load.py"))
        .args([
            "--url",
            url,
            "--requests",
            &requests.to_string(),
            "--connections",
            &connections.to_string(),
        ])
        .args([
            "--sizes",
            &sizes
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(","),
            "--method",
            method,
        ]);
    if let Some(ca) = cafile {
        c.args(["--cafile", ca]);
    }
    let text = output(&mut c)?;
    Ok(serde_json::from_str(&text)?)
}

// ---------------------------------------------------------------------------------------------
// Comparing records with what a client saw.
// ---------------------------------------------------------------------------------------------

/// (client port or 0, method, path, status, request bytes, response bytes).
pub type Key = (u64, String, String, u64, u64, u64);

/// The client's account (load.py's report) as a multiset of keys.
pub fn client_side(report: &Value, with_port: bool) -> BTreeMap<Key, usize> {
    let mut m = BTreeMap::new();
    for r in report["requests"].as_array().expect("requests") {
        let k = (
            if with_port {
                r["local_port"].as_u64().unwrap()
            } else {
                0
            },
            r["method"].as_str().unwrap().to_string(),
            r["path"].as_str().unwrap().to_string(),
            r["status"].as_u64().unwrap(),
            r["request_bytes"].as_u64().unwrap(),
            r["response_bytes"].as_u64().unwrap(),
        );
        *m.entry(k).or_insert(0) += 1;
    }
    m
}

/// The agent's records as the same multiset.
pub fn agent_side(records: &[&Value], with_port: bool) -> BTreeMap<Key, usize> {
    let mut m = BTreeMap::new();
    for r in records {
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

pub fn records_on_port(records: &[Value], port: u16) -> Vec<&Value> {
    records
        .iter()
        .filter(|r| get(r, "server.port").as_u64() == Some(port as u64))
        .collect()
}

/// What every record of a comparison must also carry.
pub struct Expect<'a> {
    /// Compare client ports with `source.port` (false behind a proxy).
    pub with_port: bool,
    pub tls: bool,
    /// `source.ip` and `server.ip`.
    pub ip: &'a str,
    /// Allowed `sparbar.route.name`s; empty: any.
    pub routes: &'a [&'a str],
}

/// Exactly one record per request the client made, equal field by field, each complete.
pub fn check_records(what: &str, recs: &[&Value], report: &Value, e: &Expect) -> Result<()> {
    let want = report["requests"].as_array().map(Vec::len).unwrap_or(0);
    if recs.len() != want {
        bail!("{what}: {} records for {want} requests", recs.len());
    }
    let (c, a) = (
        client_side(report, e.with_port),
        agent_side(recs, e.with_port),
    );
    if c != a {
        bail!("{what}: records differ from what the client saw\nclient: {c:?}\nagent:  {a:?}");
    }
    for r in recs {
        let checks = [
            (
                get(r, "tls.established").as_bool().unwrap_or(false) == e.tls,
                "tls.established",
            ),
            (
                get(r, "sparbar.capture.complete").as_bool() == Some(true),
                "sparbar.capture.complete",
            ),
            (get(r, "source.ip").as_str() == Some(e.ip), "source.ip"),
            (get(r, "server.ip").as_str() == Some(e.ip), "server.ip"),
            (
                e.routes.is_empty()
                    || e.routes
                        .contains(&get(r, "sparbar.route.name").as_str().unwrap_or("")),
                "sparbar.route.name",
            ),
        ];
        for (ok, field) in checks {
            if !ok {
                bail!("{what}: {field} wrong in {r}");
            }
        }
    }
    Ok(())
}

/// Every loss counter is zero.
pub fn no_losses(stats: &Stats) -> Result<()> {
    let l = stats.losses();
    if !l.is_empty() {
        bail!("loss counters are not zero: {l:?}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The demo platform's traffic and what the agent derives from it.
// ---------------------------------------------------------------------------------------------

/// tests/demo/sparbar.demo.toml for this platform, `@APP_PID@` and `@APP_PORT@` filled in as
/// `cargo xtask demo` does (`@DIR@` is left to [`Agent::start`]).
pub fn demo_config(platform: &Platform) -> Result<String> {
    let app_port = platform.info["app_port"]
        .as_u64()
        .context("platform.py printed no app_port")?;
    Ok(
        std::fs::read_to_string(repo_root().join("tests/demo/sparbar.demo.toml"))?
            .replace("@APP_PID@", &platform.pid("app_pid").to_string())
            .replace("@APP_PORT@", &app_port.to_string())
            .replace(
                "@JWT_SECRET_FILE@",
                &jwt_secret_file(platform)?.display().to_string(),
            ),
    )
}

/// The platform's HS256 secret (`secrets.jwtSecret` of its dataset) in a file beside the
/// dataset, for `identity.jwt.hs256_secret_file`.
pub fn jwt_secret_file(platform: &Platform) -> Result<PathBuf> {
    let dataset = PathBuf::from(
        platform.info["dataset"]
            .as_str()
            .context("platform.py printed no dataset")?,
    );
    let data: Value = serde_json::from_slice(
        &std::fs::read(&dataset).with_context(|| format!("reading {}", dataset.display()))?,
    )?;
    let secret = data["secrets"]["jwtSecret"]
        .as_str()
        .context("the dataset has no secrets.jwtSecret")?;
    let path = dataset.with_extension("jwt-secret");
    std::fs::write(&path, secret)?;
    Ok(path)
}

/// Runs tests/demo/traffic.py against the platform's TLS front with the extra `args` (users,
/// duration, ...), writes its summary to `out` and returns the summary.
pub fn traffic(platform: &Platform, args: &[&str], out: &Path) -> Result<Value> {
    let tls_port = platform.info["tls_port"]
        .as_u64()
        .context("platform.py printed no tls_port")?;
    output(
        Command::new("python3")
            .arg(repo_root().join("tests/demo/traffic.py"))
            .args(["--base", &format!("https://127.0.0.1:{tls_port}")])
            .args(["--cafile", &platform.cert()])
            .args([
                "--data",
                platform.info["dataset"].as_str().unwrap_or_default(),
            ])
            .args(args)
            .arg("--out")
            .arg(out),
    )?;
    let text = std::fs::read_to_string(out)
        .with_context(|| format!("reading the traffic summary {}", out.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// The agent's key for session ids: `<state_dir>/secret.key`, 32 raw bytes, mode 0600.
pub fn secret_key(state_dir: &Path) -> Result<Vec<u8>> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = state_dir.join("secret.key");
    let key = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    if key.len() != 32 {
        bail!("{} holds {} bytes, not 32", path.display(), key.len());
    }
    let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
    if mode != 0o600 {
        bail!("{} has mode {mode:o}, not 600", path.display());
    }
    Ok(key)
}

/// The agent's `session.id` of a session credential (cookie value or raw bearer token): the
/// first 16 bytes of HMAC-SHA256(key, "session:" + credential), lowercase hex.
pub fn session_id(key: &[u8], credential: &str) -> String {
    use hmac::Mac as _;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes any key");
    mac.update(b"session:");
    mac.update(credential.as_bytes());
    hex::encode(&mac.finalize().into_bytes()[..16])
}

/// The agent's `abook.target.digest` of a complete, already sorted id list: `"sha256:"` + hex
/// SHA-256 of the ids, each followed by a newline.
pub fn ids_digest(ids: &[String]) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for id in ids {
        h.update(id.as_bytes());
        h.update(b"\n");
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

// ---------------------------------------------------------------------------------------------
// The audit trail: HTTP receivers, sink lag, verification.
// ---------------------------------------------------------------------------------------------

/// The HTTP receiver stand-in (tests/receivers/http_sinks.py), killed when dropped.
pub struct Receiver {
    child: std::process::Child,
    pub data: u16,
    pub admin: u16,
}

impl Receiver {
    pub fn start(kind: &str) -> Result<Receiver> {
        use std::io::BufRead;
        let mut child = Command::new("python3")
            .arg(repo_root().join("tests/receivers/http_sinks.py"))
            .args(["--kind", kind])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting tests/receivers/http_sinks.py")?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let f: Vec<&str> = line.split_whitespace().collect();
        ensure!(f.len() == 3 && f[0] == "READY", "receiver said {line:?}");
        Ok(Receiver {
            child,
            data: f[1].parse()?,
            admin: f[2].parse()?,
        })
    }

    pub fn admin(&self, path: &str, body: &str) -> Result<Value> {
        let mut c = Command::new("curl");
        c.args(["-sS", "--max-time", "10"]);
        if !body.is_empty() {
            c.args([
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
                "--data",
                body,
            ]);
        }
        c.arg(format!("http://127.0.0.1:{}{path}", self.admin));
        Ok(serde_json::from_str(&output(&mut c)?)?)
    }

    /// Ids stored at least once.
    pub fn stored(&self) -> Result<BTreeSet<String>> {
        let r = self.admin("/received", "")?;
        Ok(r["records"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(_, v)| v["stored"].as_u64().unwrap_or(0) > 0)
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default())
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls the agent's stats until `sink` has acknowledged everything spooled, or `limit`.
pub fn wait_caught_up(agent: &Agent, sink: &str, limit: Duration) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let Ok(st) = agent.stats() else {
            ensure!(t0.elapsed() < limit, "no stats.json after {limit:?}");
            std::thread::sleep(Duration::from_millis(250));
            continue;
        };
        let lag: u64 = ["access", "security"]
            .iter()
            .map(|s| {
                st.agent(&format!(
                    "sink_lag_records{{sink=\"{sink}\",stream=\"{s}\"}}"
                ))
            })
            .sum();
        let acked = st.agent(&format!(
            "sink_acked_sequence{{sink=\"{sink}\",stream=\"access\"}}"
        ));
        if lag == 0 && acked > 0 {
            return Ok(());
        }
        ensure!(
            t0.elapsed() < limit,
            "sink {sink} still {lag} records behind after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Ids per stream in the local file (which has everything the agent spooled).
pub fn file_ids(trail: &[Value]) -> BTreeSet<String> {
    trail
        .iter()
        .filter_map(|r| r["event"]["id"].as_str().map(str::to_string))
        .collect()
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

/// An agent configuration for tests against nginx's `/api/test/bytes/{n}`: `targets`, one
/// route, the records file in the agent's directory (`@DIR@`), and `extra` TOML after it.
pub fn bytes_config(targets: &str, extra: &str) -> String {
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

/// The `[[targets]]` entry for nginx by its executable.
pub const NGINX: &str = "[[targets]]\nexe = \"/usr/sbin/nginx\"\nname = \"nginx\"\n";
