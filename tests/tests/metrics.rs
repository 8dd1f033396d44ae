//! The Prometheus endpoint and `sparbar status` against real nginx/TLS: a real client (curl)
//! scrapes `/metrics`, every counter on the page equals the agent's own `stats.json` once the
//! traffic has stopped, the page is well formed, and `status` names exactly the nginx
//! processes and counts every request. Off by default, and loopback only unless allowed.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;
use sparbar_tests::*;

/// Requests driven through nginx.
const REQUESTS: usize = 120;

fn config(target: &str, agent_extra: &str) -> String {
    format!(
        r#"
[agent]
state_dir = "@DIR@"
stats_interval = "1s"
{agent_extra}

[[targets]]
{target}

[[routes]]
route = "GET /api/test/bytes/{{n}}"
name = "test.bytes"

[output]
file = "@DIR@/access.jsonl"
"#
    )
}

/// (family, labels sorted by name).
type Key = (String, Vec<(String, String)>);

/// Reads a page strictly: only HELP, TYPE and sample lines; HELP then TYPE once per family,
/// before its samples, families not split; counters end in `_total`; each label set once.
fn parse_page(text: &str) -> Result<BTreeMap<Key, String>> {
    ensure!(
        text.ends_with('\n'),
        "the page does not end with a line feed"
    );
    let mut out = BTreeMap::new();
    let mut seen = BTreeSet::new();
    let (mut family, mut kind) = (String::new(), String::new());
    let name_ok = |n: &str| {
        !n.is_empty()
            && !n.starts_with(|c: char| c.is_ascii_digit())
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if let Some(r) = line.strip_prefix("# HELP ") {
            let (name, help) = r.split_once(' ').context("HELP without text")?;
            ensure!(name_ok(name) && !help.trim().is_empty(), "bad HELP: {line}");
            ensure!(seen.insert(name.to_string()), "family {name} twice");
            let t = lines.next().unwrap_or("");
            let Some((tn, tk)) = t.strip_prefix("# TYPE ").and_then(|t| t.split_once(' ')) else {
                bail!("HELP not followed by TYPE: {line} / {t}");
            };
            ensure!(tn == name, "TYPE of another family: {t}");
            ensure!(tk == "counter" || tk == "gauge", "type {tk}");
            ensure!(
                (tk == "counter") == name.ends_with("_total"),
                "{name} is a {tk}"
            );
            (family, kind) = (name.to_string(), tk.to_string());
            continue;
        }
        ensure!(!line.starts_with('#'), "stray comment: {line}");
        ensure!(!kind.is_empty(), "sample before any TYPE: {line}");
        let (head, value) = line.rsplit_once(' ').context("sample without value")?;
        ensure!(
            value.parse::<f64>().is_ok() || ["NaN", "+Inf", "-Inf"].contains(&value),
            "value {value:?} in {line}"
        );
        let (name, mut labels) = match head.split_once('{') {
            None => (head, Vec::new()),
            Some((n, rest)) => {
                let body = rest.strip_suffix('}').context("labels not closed")?;
                (n, parse_labels(body).with_context(|| line.to_string())?)
            }
        };
        ensure!(name == family, "sample outside its family: {line}");
        labels.sort();
        ensure!(
            out.insert((name.to_string(), labels), value.to_string())
                .is_none(),
            "label set twice: {line}"
        );
    }
    Ok(out)
}

/// `a="x",b="y\"z"` with the format's escapes.
fn parse_labels(mut s: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    while !s.is_empty() {
        let (name, rest) = s.split_once("=\"").context("label=\"")?;
        ensure!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "label name {name:?}"
        );
        let mut value = String::new();
        let mut it = rest.char_indices();
        let end = loop {
            match it.next().context("unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => match it.next().context("dangling escape")?.1 {
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    'n' => value.push('\n'),
                    c => bail!("bad escape \\{c}"),
                },
                (_, c) => value.push(c),
            }
        };
        out.push((name.to_string(), value));
        s = &rest[end + 1..];
        s = s.strip_prefix(',').unwrap_or(s);
    }
    Ok(out)
}

/// A `stats.json` name, `noun_verb_total{a="x"}` (values unescaped), as a page key.
fn stat_key(k: &str) -> Result<Key> {
    let (name, mut labels) = match k.split_once('{') {
        None => (k, Vec::new()),
        Some((n, rest)) => (
            n,
            rest.strip_suffix('}')
                .context("labels not closed")?
                .split("\",")
                .map(|kv| {
                    let (a, b) = kv.split_once("=\"").unwrap_or((kv, ""));
                    (a.to_string(), b.trim_end_matches('"').to_string())
                })
                .collect(),
        ),
    };
    labels.sort();
    Ok((format!("sparbar_{name}"), labels))
}

/// What the agent adds from its own state rather than from `stats.json` counters.
const DERIVED: &[&str] = &[
    "sparbar_up",
    "sparbar_uptime_seconds",
    "sparbar_build_info",
    "sparbar_tls_probes_attached",
    "sparbar_tls_probes_failed",
    "sparbar_tracepoint_attached",
    "sparbar_targets_traced",
    "sparbar_connections_open",
    "sparbar_decisions_active",
    "sparbar_spool_bytes",
    "sparbar_spool_max_bytes",
    "sparbar_spool_security_pending_records",
];

/// GET with curl: (content type, body).
fn scrape(port: u16) -> Result<(String, String)> {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--fail",
            "--max-time",
            "10",
            "-w",
            "\n%{content_type}",
        ])
        .arg(format!("http://127.0.0.1:{port}/metrics"))
        .output()
        .context("running curl")?;
    ensure!(
        out.status.success(),
        "curl failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let (body, ctype) = text.rsplit_once('\n').context("curl output")?;
    Ok((ctype.to_string(), body.to_string()))
}

/// The page against `stats.json`: every counter of the file on the page with the same value,
/// and every page sample not derived from the agent's state in the file. Returns the
/// differences.
fn compare(page: &BTreeMap<Key, String>, stats: &Value) -> Result<Vec<String>> {
    let mut diff = Vec::new();
    let mut from_stats = BTreeSet::new();
    for side in ["kernel", "agent"] {
        for (k, v) in stats[side].as_object().context("stats.json side")? {
            let key = stat_key(k)?;
            let want = v.as_u64().context("counter value")?.to_string();
            match page.get(&key) {
                Some(got) if *got == want => {}
                Some(got) => diff.push(format!("{side} {k}: stats.json {want}, page {got}")),
                None => diff.push(format!("{side} {k} = {want} is not on the page")),
            }
            from_stats.insert(key);
        }
    }
    for (key, v) in page {
        if !DERIVED.contains(&key.0.as_str()) && !from_stats.contains(key) {
            diff.push(format!("page {key:?} = {v} is not in stats.json"));
        }
    }
    Ok(diff)
}

fn value(page: &BTreeMap<Key, String>, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut l: Vec<(String, String)> = labels
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    l.sort();
    page.get(&(name.to_string(), l))
        .and_then(|v| v.parse().ok())
}

/// The nginx master and its workers, from /proc.
fn nginx_pids(master: u32) -> Result<BTreeSet<u32>> {
    let mut out = BTreeSet::from([master]);
    for e in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid = stat
            .rfind(')')
            .and_then(|i| stat[i + 2..].split(' ').nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(master) {
            out.insert(pid);
        }
    }
    Ok(out)
}

fn sparbar(args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new(agent_bin()?).args(args).output()?)
}

#[test]
fn metrics_equal_the_agents_counters_and_status_names_the_targets() -> Result<()> {
    require_root()?;
    let dir = scratch("metrics");
    let tls_port = free_port();
    let platform = Platform::up(&dir.join("platform"), tls_port, free_port(), false)?;
    let master = platform.pid("nginx_master_pid");
    let port = free_port();
    let state = dir.join("agent");
    let agent = Agent::start(
        &state,
        &config(
            &format!("pid = {master}\nname = \"nginx\""),
            &format!("metrics_listen = \"127.0.0.1:{port}\""),
        ),
    )?;
    let cfg = state.join("sparbar.toml");
    let url = format!("https://127.0.0.1:{tls_port}");
    let report = load(
        &url,
        Some(&platform.cert()),
        REQUESTS,
        4,
        &[10, 5000],
        "GET",
    )?;
    let errors = report["errors"].as_array().map_or(0, |a| a.len());
    ensure!(errors == 0, "client errors: {}", report["errors"]);

    // Traffic has stopped: wait until the agent has parsed it all, then until a scrape and
    // stats.json (written on different ticks) agree on every counter.
    let t0 = Instant::now();
    let (ctype, page) = loop {
        // stats.json appears at the first stats tick.
        let Ok(stats) = agent.stats() else {
            ensure!(t0.elapsed() < Duration::from_secs(30), "no stats.json");
            std::thread::sleep(Duration::from_millis(300));
            continue;
        };
        let before = scrape(port)?;
        let page = parse_page(&before.1)?;
        let after = parse_page(&scrape(port)?.1)?;
        let diff = compare(&page, &stats.0)?;
        let settled = stats.agent("exchanges_parsed_total") == REQUESTS as u64;
        let same = page
            .iter()
            .filter(|(k, _)| k.0 != "sparbar_uptime_seconds")
            .eq(after
                .iter()
                .filter(|(k, _)| k.0 != "sparbar_uptime_seconds"));
        if settled && same && diff.is_empty() {
            let counters = page
                .keys()
                .filter(|k| !DERIVED.contains(&k.0.as_str()))
                .count();
            eprintln!("the page and stats.json agree on all {counters} counters");
            std::fs::write(dir.join("metrics.txt"), &before.1)?;
            break (before.0, page);
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(30),
            "the page and stats.json never agreed (parsed {} of {REQUESTS}):\n{}",
            stats.agent("exchanges_parsed_total"),
            diff.join("\n")
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    ensure!(
        ctype.starts_with("text/plain; version=0.0.4"),
        "content type {ctype:?}"
    );
    let n = REQUESTS as f64;
    let pids = nginx_pids(master)?;
    for (name, labels, want) in [
        ("sparbar_up", vec![], 1.0),
        ("sparbar_exchanges_parsed_total", vec![], n),
        (
            "sparbar_exchanges_matched_total",
            vec![("route", "test.bytes")],
            n,
        ),
        (
            "sparbar_records_spooled_total",
            vec![("stream", "access")],
            n,
        ),
        (
            "sparbar_targets_traced",
            vec![("target", "nginx")],
            pids.len() as f64,
        ),
        (
            "sparbar_build_info",
            vec![("version", env!("CARGO_PKG_VERSION"))],
            1.0,
        ),
        ("sparbar_decisions_active", vec![("scope", "user")], 0.0),
    ] {
        let got = value(&page, name, &labels);
        ensure!(
            got == Some(want),
            "{name}{labels:?}: {got:?}, expected {want}"
        );
    }
    ensure!(
        value(&page, "sparbar_uptime_seconds", &[]).is_some_and(|u| u > 0.0),
        "no uptime"
    );
    let attached: Vec<(&Key, &String)> = page
        .iter()
        .filter(|(k, _)| k.0 == "sparbar_tls_probes_attached")
        .collect();
    ensure!(
        !attached.is_empty() && attached.iter().all(|(_, v)| *v != "0"),
        "OpenSSL probes per library: {attached:?}"
    );
    for (k, v) in &page {
        ensure!(
            !(k.0.contains("dropped") || k.0.contains("lost")) || v == "0",
            "a loss on the page: {k:?} = {v}"
        );
    }

    // `sparbar status`: exactly the nginx processes, each with its OpenSSL library, and
    // every request counted.
    let out = sparbar(&["status", "--config", cfg.to_str().unwrap_or(""), "--json"])?;
    ensure!(
        out.status.success(),
        "status --json: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: Value = serde_json::from_slice(&out.stdout)?;
    let got: BTreeSet<u32> = st["targets"]
        .as_array()
        .context("targets")?
        .iter()
        .filter_map(|t| t["pid"].as_u64().map(|p| p as u32))
        .collect();
    ensure!(
        got == pids,
        "status targets {got:?}, nginx processes {pids:?}"
    );
    for t in st["targets"].as_array().into_iter().flatten() {
        ensure!(t["target"] == "nginx" && t["name"] == "nginx", "{t}");
        let libs = t["tls_libraries"].as_array().context("tls_libraries")?;
        ensure!(
            libs.iter().any(|l| l["probes"]
                .as_array()
                .is_some_and(|p| p.iter().any(|s| s == "SSL_read"))),
            "no SSL_read probe for {t}"
        );
    }
    ensure!(
        st["exchanges_parsed_total"] == REQUESTS as u64,
        "status counts {} exchanges for {REQUESTS} requests",
        st["exchanges_parsed_total"]
    );
    ensure!(st["decisions_open"] == 0, "{}", st["decisions_open"]);
    ensure!(
        st["rates"]["exchanges_per_second"]
            .as_f64()
            .is_some_and(|r| r > 0.0),
        "no exchange rate over the last minute: {}",
        st["rates"]
    );
    ensure!(
        st["losses"].as_object().is_some_and(|l| l.is_empty()),
        "losses: {}",
        st["losses"]
    );
    ensure!(
        st["sink_lag"]["file"]["access"] == 0,
        "sink lag: {}",
        st["sink_lag"]
    );
    let out = sparbar(&["status", "--config", cfg.to_str().unwrap_or("")])?;
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    ensure!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        text.contains(&format!("targets: {} processes traced", pids.len()))
            && text.contains(&format!("exchanges parsed: {REQUESTS};"))
            && pids.iter().all(|p| text.contains(&format!("pid {p} ")))
            && text.contains("losses: none"),
        "status report:\n{text}"
    );

    let stats = agent.stop()?;
    no_losses(&stats)?;
    Ok(())
}

/// Listening TCP sockets (inodes) of a process, from its descriptors and /proc/net/tcp{,6}.
fn listening_sockets(pid: u32) -> Result<Vec<String>> {
    let mut inodes = BTreeSet::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))?.flatten() {
        if let Ok(l) = std::fs::read_link(e.path()) {
            let l = l.to_string_lossy().to_string();
            if let Some(i) = l.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                inodes.insert(i.to_string());
            }
        }
    }
    let mut out = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(f)
            .unwrap_or_default()
            .lines()
            .skip(1)
        {
            let c: Vec<&str> = line.split_whitespace().collect();
            if c.len() > 9 && c[3] == "0A" && inodes.contains(c[9]) {
                out.push(format!("{} (inode {})", c[1], c[9]));
            }
        }
    }
    Ok(out)
}

#[test]
fn metrics_are_off_by_default() -> Result<()> {
    require_root()?;
    let dir = scratch("metrics-off");
    let default_port_free = std::net::TcpListener::bind("127.0.0.1:9464").is_ok();
    // Nothing to trace is needed: a target that sends nothing.
    let target = format!(
        "pid = {}\ntls = false\nplaintext_ports = [{}]\nname = \"idle\"",
        std::process::id(),
        free_port()
    );
    let agent = Agent::start(&dir, &config(&target, ""))?;
    let listening = listening_sockets(agent.proc.pid())?;
    ensure!(
        listening.is_empty(),
        "the agent listens on TCP without metrics_listen: {listening:?}"
    );
    if default_port_free {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5", "http://127.0.0.1:9464/metrics"])
            .output()?;
        // curl's exit code 7: could not connect (refused).
        ensure!(
            out.status.code() == Some(7),
            "127.0.0.1:9464 answered ({:?}): {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        eprintln!("127.0.0.1:9464 is in use by another program here: only the socket check ran");
    }
    ensure!(
        !agent
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("metrics on")),
        "the agent says it serves metrics"
    );
    agent.stop()?;
    Ok(())
}

#[test]
fn check_config_refuses_a_remote_metrics_address_unless_allowed() -> Result<()> {
    let dir = scratch("metrics-cfg");
    let remote = dir.join("remote.toml");
    std::fs::write(
        &remote,
        config("pid = 1", "metrics_listen = \"0.0.0.0:9464\"").replace("@DIR@", "/tmp/x"),
    )?;
    let out = sparbar(&["check-config", "--config", remote.to_str().unwrap_or("")])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(2)
            && err.contains("agent.metrics_listen")
            && err.contains("\"0.0.0.0:9464\" is not a loopback address")
            && err.contains("metrics_allow_remote"),
        "exit {:?}: {err}",
        out.status.code()
    );
    let allowed = dir.join("allowed.toml");
    std::fs::write(
        &allowed,
        config(
            "pid = 1",
            "metrics_listen = \"0.0.0.0:9464\"\nmetrics_allow_remote = true",
        )
        .replace("@DIR@", "/tmp/x"),
    )?;
    let out = sparbar(&["check-config", "--config", allowed.to_str().unwrap_or("")])?;
    ensure!(
        out.status.success(),
        "allowed remote address refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let local = dir.join("local.toml");
    std::fs::write(
        &local,
        config("pid = 1", "metrics_listen = \"[::1]:9464\"").replace("@DIR@", "/tmp/x"),
    )?;
    let out = sparbar(&["check-config", "--config", local.to_str().unwrap_or("")])?;
    ensure!(
        out.status.success(),
        "loopback refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
