//! Privileged end-to-end tests of detection and enforcement with the demo platform behind
//! nginx/TLS (the incident's flaw switched on): the incident replayed (the abusive pupil is
//! alerted on its first cross-tenant success and blocked; after the decision it gets no more
//! address-book answers, checked at the client, while everyone else is unaffected), shadow mode
//! (alerts, never blocks), and an ordinary school day (no alert, no block).

use std::path::Path;

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;
use sparbar_tests::*;

struct Run {
    summary: Value,
    records: Vec<Value>,
    tls_port: u16,
    stats: Stats,
}

fn run(name: &str, config_edit: impl Fn(String) -> String, traffic_args: &[&str]) -> Result<Run> {
    require_root()?;
    let dir = scratch(name);
    let (tls_port, app_port) = (free_port(), free_port());
    let platform = Platform::up(&dir.join("platform"), tls_port, app_port, true)?;
    let config = config_edit(demo_config(&platform)?);
    let agent = Agent::start(&dir.join("agent"), &config)?;
    let summary = traffic(&platform, traffic_args, &dir.join("traffic.json"))?;
    let records_path = agent.records.clone();
    let stats = agent.stop()?;
    let records = read_jsonl(&records_path)?;
    Ok(Run {
        summary,
        records,
        tls_port,
        stats,
    })
}

/// The demo platform (the flaw switched off), a scratch directory and the platform's dataset.
fn platform_with_dataset(name: &str) -> Result<(std::path::PathBuf, Platform, Value)> {
    require_root()?;
    let dir = scratch(name);
    let (tls_port, app_port) = (free_port(), free_port());
    let platform = Platform::up(&dir.join("platform"), tls_port, app_port, false)?;
    let ds: Value = serde_json::from_str(&std::fs::read_to_string(
        platform.info["dataset"].as_str().unwrap_or_default(),
    )?)?;
    Ok((dir, platform, ds))
}

fn dataset_of<'a>(records: &'a [Value], ds: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| get(r, "event.dataset").as_str() == Some(ds))
        .collect()
}

/// RFC 3339 (as the agent writes it, UTC, µs) to Unix seconds.
fn unix_s(ts: &str) -> Result<f64> {
    let (date, time) = ts
        .trim_end_matches('Z')
        .split_once('T')
        .context("timestamp")?;
    let d: Vec<i64> = date.split('-').map(|x| x.parse().unwrap_or(0)).collect();
    let t: Vec<f64> = time.split(':').map(|x| x.parse().unwrap_or(0.0)).collect();
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m, dd) = (if d[1] <= 2 { d[0] - 1 } else { d[0] }, d[1], d[2]);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Ok(days as f64 * 86400.0 + t[0] * 3600.0 + t[1] * 60.0 + t[2])
}

const TRAFFIC: &[&str] = &[
    "--users",
    "30",
    "--concurrency",
    "8",
    "--duration",
    "10",
    "--seed",
    "3",
    "--quiet",
];

#[test]
fn incident_is_alerted_and_blocked_others_unaffected() -> Result<()> {
    let mut args = TRAFFIC.to_vec();
    args.extend(["--abuser", "--abuser-delay", "2"]);
    let r = run("detect-incident", |c| c, &args)?;
    let s = &r.summary;
    let abuser = s["config"]["abuserUserId"]
        .as_u64()
        .context("abuser id")?
        .to_string();
    let front = records_on_port(&r.records, r.tls_port);

    // The first cross-tenant call at nginx (the request names another school; the kernel
    // refused it, so it has no answer), and the alert it raised.
    let mut cross: Vec<&&Value> = front
        .iter()
        .filter(|x| {
            get(x, "abook.cross_tenant").as_bool() == Some(true)
                || get(x, "sparbar.cross_tenant_attempt.named").is_string()
        })
        .collect();
    cross.sort_by(|a, b| {
        get(a, "@timestamp")
            .as_str()
            .cmp(&get(b, "@timestamp").as_str())
    });
    let first = cross.first().context("no cross-tenant call was recorded")?;
    ensure!(
        get(first, "user.id").as_str() == Some(abuser.as_str()),
        "the first cross-tenant access is not the abuser's: {first}"
    );
    let alerts = dataset_of(&r.records, "sparbar.alert");
    let xt: Vec<&&Value> = alerts
        .iter()
        .filter(|a| get(a, "rule.id").as_str() == Some("cross-tenant"))
        .collect();
    let a = xt.first().context("no cross-tenant alert")?;
    let evidence = get(a, "abook.evidence.event_ids")
        .as_array()
        .context("evidence")?;
    ensure!(
        evidence.last() == Some(get(first, "event.id")),
        "the cross-tenant alert was not raised by the first cross-tenant call {}: {a}",
        get(first, "event.id")
    );
    ensure!(
        get(a, "user.id").as_str() == Some(abuser.as_str())
            && get(a, "event.kind").as_str() == Some("alert"),
        "alert fields: {a}"
    );
    for al in &alerts {
        ensure!(
            get(al, "user.id").as_str() == Some(abuser.as_str()),
            "an alert for someone other than the abuser: {al}"
        );
    }

    // The decision: started by that rule, enforced (connections reset).
    let decisions = dataset_of(&r.records, "sparbar.decision");
    let start = decisions
        .iter()
        .find(|d| get(d, "event.action").as_str() == Some("block_start"))
        .context("no block decision")?;
    ensure!(
        get(start, "abook.decision.value").as_str() == Some(abuser.as_str())
            && get(start, "abook.decision.scope").as_str() == Some("user")
            && get(start, "abook.decision.rule_id").as_str() == Some("cross-tenant")
            && get(start, "abook.decision.level").as_u64() == Some(1)
            && get(start, "abook.decision.duration_s").as_u64() == Some(600),
        "decision fields: {start}"
    );
    let enforced = decisions
        .iter()
        .find(|d| get(d, "event.action").as_str() == Some("block_enforced"))
        .context("the decision was never enforced")?;
    // The abuser's connection is reset by the decision, or was already stopped when its
    // cross-tenant request was read (the routes name `schoolId` as the tenant parameter), before
    // the decision existed.
    let stopped_early = r
        .stats
        .agent("enforcement_requests_stopped_total{reason=\"cross_tenant\"}")
        + r.stats
            .agent("enforcement_requests_stopped_total{reason=\"kernel_cross_tenant\"}");
    ensure!(
        get(enforced, "abook.decision.enforcement.connections_reset")
            .as_u64()
            .unwrap_or(0)
            + stopped_early
            >= 1,
        "no connection was reset or stopped: {enforced}"
    );
    for d in &decisions {
        ensure!(
            get(d, "abook.decision.value").as_str() == Some(abuser.as_str()),
            "a decision about someone other than the abuser: {d}"
        );
    }

    // At the client: no address-book answer to the abuser for any request sent after the
    // decision was in force in the kernel (the block_enforced record is made right after).
    let decided = unix_s(get(enforced, "event.created").as_str().context("created")?)?;
    let t0 = s["startedAt"].as_f64().context("startedAt")?;
    let reqs = s["requests"].as_array().context("requests")?;
    let mut after = 0;
    let mut leaked = Vec::new();
    for q in reqs.iter().filter(|q| q["abuser"] == true) {
        let sent = t0 + q["t"].as_f64().unwrap_or(0.0);
        if sent <= decided {
            continue;
        }
        after += 1;
        let abook = q["route"]
            .as_str()
            .is_some_and(|x| x.starts_with("GET /api/addressbook/"));
        if abook && q["status"].as_u64().is_some() {
            leaked.push(format!("{} {} -> {}", q["seq"], q["path"], q["status"]));
        }
    }
    ensure!(
        after > 0,
        "the abuser sent nothing after the decision, so the test proves nothing"
    );
    ensure!(
        leaked.is_empty(),
        "{} address-book answers reached the abuser after the decision: {:?}",
        leaked.len(),
        &leaked[..leaked.len().min(5)]
    );
    // Not even the first foreign page: the kernel refused the first request naming another
    // school (the session's school is known from /api/me), before its answer.
    let foreign: Vec<String> = reqs
        .iter()
        .filter(|q| q["abuser"] == true && q["crossSchool"] == true)
        .filter(|q| q["status"].as_u64().is_some())
        .map(|q| format!("{} {} -> {}", q["seq"], q["path"], q["status"]))
        .collect();
    let tried = reqs
        .iter()
        .filter(|q| q["abuser"] == true && q["crossSchool"] == true)
        .count();
    ensure!(tried > 0, "the abuser never named another school");
    ensure!(
        foreign.is_empty(),
        "{} answers about another school reached the abuser: {:?}",
        foreign.len(),
        &foreign[..foreign.len().min(5)]
    );
    ensure!(
        r.stats
            .agent("enforcement_requests_stopped_total{reason=\"kernel_cross_tenant\"}")
            >= 1,
        "the kernel stopped no cross-tenant request"
    );
    // The refused request's record says its answer was blocked.
    ensure!(
        get(first, "abook.enforcement.blocked").as_bool() == Some(true),
        "the first cross-tenant record is not marked blocked: {first}"
    );

    // Everyone else: no transport error, no record blocked, no alert.
    let tot = &s["totals"];
    ensure!(
        tot["transportErrors"] == 0,
        "ordinary users had transport errors: {tot}"
    );
    for x in &front {
        if get(x, "abook.enforcement.blocked").as_bool() == Some(true) {
            ensure!(
                get(x, "user.id").as_str() == Some(abuser.as_str()),
                "an ordinary user's call was blocked: {x}"
            );
        }
    }
    Ok(())
}

#[test]
fn shadow_mode_alerts_but_never_blocks() -> Result<()> {
    let mut args = TRAFFIC.to_vec();
    args.push("--abuser");
    let r = run(
        "detect-shadow",
        |c| {
            c.replace(
                "kind = \"cross_tenant\"",
                "kind = \"cross_tenant\"\nshadow = true",
            )
        },
        &args,
    )?;
    let alerts = dataset_of(&r.records, "sparbar.alert");
    let xt: Vec<&&Value> = alerts
        .iter()
        .filter(|a| get(a, "rule.id").as_str() == Some("cross-tenant"))
        .collect();
    ensure!(!xt.is_empty(), "shadow mode raised no cross-tenant alert");
    ensure!(
        xt.iter()
            .all(|a| get(a, "abook.alert.shadow").as_bool() == Some(true)),
        "a shadow alert not marked shadow"
    );
    // Other (enforcing) rules may still fire on the abuser; the cross-tenant rule never blocks.
    for d in dataset_of(&r.records, "sparbar.decision") {
        ensure!(
            get(d, "abook.decision.rule_id").as_str() != Some("cross-tenant"),
            "a shadow rule made a decision: {d}"
        );
    }
    Ok(())
}

#[test]
fn an_ordinary_school_day_raises_nothing() -> Result<()> {
    let r = run("detect-day", |c| c, TRAFFIC)?;
    let alerts = dataset_of(&r.records, "sparbar.alert");
    let decisions = dataset_of(&r.records, "sparbar.decision");
    ensure!(
        alerts.is_empty() && decisions.is_empty(),
        "ordinary users raised {} alerts and {} decisions: {:?}",
        alerts.len(),
        decisions.len(),
        alerts.iter().take(3).collect::<Vec<_>>()
    );
    let s = &r.summary;
    let reqs = s["requests"].as_array().map(Vec::len).unwrap_or(0);
    let front = records_on_port(&r.records, r.tls_port);
    ensure!(
        front.len() == reqs,
        "{} records for {reqs} requests",
        front.len()
    );
    ensure!(
        r.stats.agent("detector_accesses_total") == reqs as u64,
        "the detectors saw {} calls of {reqs}",
        r.stats.agent("detector_accesses_total")
    );
    if s["totals"]["transportErrors"] != 0 {
        bail!("transport errors: {}", s["totals"]);
    }
    Ok(())
}

/// One HTTPS call with curl; `None` when no answer came (refused in the kernel, reset, or
/// dropped until the deadline), else the status.
fn curl_status(cert: &str, args: &[&str]) -> Option<u16> {
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "4",
        ])
        .args(["--cacert", cert])
        .args(args)
        .output()
        .ok()?;
    let code: u16 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    (out.status.success() && code != 0).then_some(code)
}

fn sparbar(args: &[&str]) -> Result<Value> {
    let text = output(std::process::Command::new(agent_bin()?).args(args))?;
    serde_json::from_str(text.trim()).with_context(|| format!("sparbar {args:?} printed {text}"))
}

/// An operator blocks a user through `sparbar block`: the user's next calls on new connections
/// get no answer, logging in again does not help, others are unaffected; `sparbar unblock`
/// restores access. Every step is in the decision and access records.
#[test]
fn operator_block_survives_relogin_and_unblock_restores() -> Result<()> {
    let (dir, platform, ds) = platform_with_dataset("detect-operator")?;
    let tls_port = platform.info["tls_port"].as_u64().context("tls_port")? as u16;
    let pupils: Vec<&Value> = ds["accounts"]
        .as_array()
        .context("accounts")?
        .iter()
        .filter(|a| a["role"] == "pupil")
        .take(2)
        .collect();
    let (x, y) = (pupils[0], pupils[1]);
    let feed_port = free_port();
    let config = demo_config(&platform)?.replace(
        "enforce = true",
        &format!("enforce = true\nfeed_listen = \"127.0.0.1:{feed_port}\""),
    );
    let agent = Agent::start(&dir.join("agent"), &config)?;
    let feed = format!("http://127.0.0.1:{feed_port}/decisions");
    let stream_file = std::fs::File::create(dir.join("stream.ndjson"))?;
    let mut stream = std::process::Command::new("curl")
        .args(["-sN", "--max-time", "60", &format!("{feed}/stream")])
        .stdout(stream_file)
        .spawn()?;
    let cfg_path = dir.join("agent/sparbar.toml").display().to_string();
    let cert = platform.cert();
    let url = format!("https://127.0.0.1:{tls_port}");
    let login = |jar: &Path, a: &Value| {
        curl_status(
            &cert,
            &[
                "-c",
                &jar.display().to_string(),
                "--data-urlencode",
                &format!("username={}", a["username"].as_str().unwrap_or_default()),
                "--data-urlencode",
                &format!("password={}", a["password"].as_str().unwrap_or_default()),
                &format!("{url}/login"),
            ],
        )
    };
    let call = |jar: &Path, a: &Value| {
        curl_status(
            &cert,
            &[
                "-b",
                &jar.display().to_string(),
                &format!("{url}/api/addressbook/persons/{}", a["userId"]),
            ],
        )
    };
    let (jx, jx2, jy) = (dir.join("x.jar"), dir.join("x2.jar"), dir.join("y.jar"));
    ensure!(
        login(&jx, x) == Some(200) && login(&jy, y) == Some(200),
        "logins failed"
    );
    ensure!(
        call(&jx, x) == Some(200) && call(&jy, y) == Some(200),
        "calls before the block failed"
    );

    let uid = x["userId"].to_string();
    let b = sparbar(&[
        "block",
        "--config",
        &cfg_path,
        "--user",
        &uid,
        "--duration",
        "10m",
        "--reason",
        "test",
    ])?;
    ensure!(b["ok"] == true, "sparbar block: {b}");
    let blocked_get = call(&jx, x);
    let relogin = login(&jx2, x);
    let relogin_get = call(&jx2, x);
    let other = call(&jy, y);
    let listed = sparbar(&["decisions", "--config", &cfg_path])?;
    let fed: Value = serde_json::from_str(&output(
        std::process::Command::new("curl").args(["-s", &feed]),
    )?)?;
    let u = sparbar(&["unblock", "--config", &cfg_path, "--user", &uid])?;
    let after = call(&jx, x);
    // Both changes were published before the unblock command answered; give curl a moment to
    // write them out.
    for _ in 0..50 {
        if std::fs::read_to_string(dir.join("stream.ndjson"))?.contains("\"end\"") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = stream.kill();
    let _ = stream.wait();
    let streamed: Vec<Value> = std::fs::read_to_string(dir.join("stream.ndjson"))?
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let records_path = agent.records.clone();
    agent.stop()?;
    let records = read_jsonl(&records_path)?;

    ensure!(
        blocked_get.is_none(),
        "a blocked user's call was answered ({blocked_get:?})"
    );
    ensure!(
        relogin.is_none() || relogin_get.is_none(),
        "a blocked user logged in again and was answered (login {relogin:?}, call {relogin_get:?})"
    );
    // Either the login itself is refused (its answer, with the new cookie, never leaves), and
    // the next call has no session (401); or the new session's calls are refused.
    ensure!(
        relogin_get != Some(200),
        "a call after logging in again was answered 200 (login {relogin:?})"
    );
    ensure!(other == Some(200), "another user was affected: {other:?}");
    ensure!(
        listed["active"].as_array().map(Vec::len) == Some(1)
            && listed["active"][0]["value"] == Value::String(uid.clone()),
        "sparbar decisions: {listed}"
    );
    ensure!(u["ok"] == true && u["ended"] == 1, "sparbar unblock: {u}");
    let did = listed["active"][0]["id"].clone();
    ensure!(
        fed["decisions"].as_array().map(Vec::len) == Some(1) && fed["decisions"][0]["id"] == did,
        "GET /decisions during the block: {fed}"
    );
    let ops: Vec<(String, Value)> = streamed
        .iter()
        .map(|v| {
            (
                v["op"].as_str().unwrap_or("?").to_string(),
                v["decision"]["id"].clone(),
            )
        })
        .collect();
    ensure!(
        ops == vec![
            ("add".to_string(), did.clone()),
            ("end".to_string(), did.clone())
        ],
        "the decision stream: {ops:?}"
    );
    ensure!(
        after == Some(200),
        "access did not come back after unblock: {after:?}"
    );

    let decisions = dataset_of(&records, "sparbar.decision");
    let actions: Vec<&str> = decisions
        .iter()
        .map(|d| get(d, "event.action").as_str().unwrap_or("?"))
        .collect();
    ensure!(
        actions.first() == Some(&"block_start") && actions.last() == Some(&"block_end"),
        "decision records: {actions:?}"
    );
    let start = decisions[0];
    ensure!(
        get(start, "abook.decision.origin").as_str() == Some("operator")
            && get(start, "event.reason").as_str() == Some("test"),
        "operator decision: {start}"
    );
    let end = decisions.last().context("end")?;
    ensure!(
        get(end, "abook.decision.end_reason").as_str() == Some("unblocked"),
        "end record: {end}"
    );
    let front = records_on_port(&records, tls_port);
    let blocked: Vec<&&Value> = front
        .iter()
        .filter(|r| get(r, "abook.enforcement.blocked").as_bool() == Some(true))
        .collect();
    // The user's login name hash (from its login records): a login attempt stopped before its
    // answer names the user only by it.
    let hashes: Vec<&str> = front
        .iter()
        .filter(|r| get(r, "user.id").as_str() == Some(uid.as_str()))
        .filter_map(|r| get(r, "user.hash").as_str())
        .collect();
    ensure!(!hashes.is_empty(), "no login record of the user");
    ensure!(
        !blocked.is_empty()
            && blocked.iter().all(|r| {
                get(r, "user.id").as_str() == Some(uid.as_str())
                    || get(r, "user.hash")
                        .as_str()
                        .is_some_and(|h| hashes.contains(&h))
            }),
        "access records of blocked calls: {blocked:?}"
    );
    Ok(())
}

/// A scripted scraper inside its own school (no cross-tenant access) crosses the persons-per-hour
/// threshold of its role and is blocked within two requests past it: the request that crossed
/// it is the alert's last evidence, and from two requests later on nothing is answered.
#[test]
fn a_scraper_in_its_own_school_is_blocked_past_the_threshold() -> Result<()> {
    let (dir, platform, ds) = platform_with_dataset("detect-scraper")?;
    let tls_port = platform.info["tls_port"].as_u64().context("tls_port")? as u16;
    let acct = ds["accounts"]
        .as_array()
        .context("accounts")?
        .iter()
        .find(|a| a["role"] == "pupil")
        .context("a pupil")?;
    let agent = Agent::start(&dir.join("agent"), &demo_config(&platform)?)?;
    let out = dir.join("scraper.json");
    output(
        std::process::Command::new("python3")
            .arg(repo_root().join("tests/clients/scraper.py"))
            .args(["--base", &format!("https://127.0.0.1:{tls_port}")])
            .args(["--cafile", &platform.cert()])
            .args(["--username", acct["username"].as_str().unwrap_or_default()])
            .args(["--password", acct["password"].as_str().unwrap_or_default()])
            .args(["--school", acct["schoolId"].as_str().unwrap_or_default()])
            .args(["--pages", "4", "--rounds", "12", "--interval", "0.05"])
            .arg("--out")
            .arg(&out),
    )?;
    let records_path = agent.records.clone();
    agent.stop()?;
    let records = read_jsonl(&records_path)?;
    let client: Value = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
    let reqs = client["requests"].as_array().context("requests")?;

    // The scraper's address-book calls at nginx, in order, and where the sum crossed 3000.
    let uid = acct["userId"].to_string();
    let mut calls: Vec<&Value> = records_on_port(&records, tls_port)
        .into_iter()
        .filter(|r| get(r, "sparbar.route.name").as_str() == Some("abook.persons.query"))
        .collect();
    calls.sort_by(|a, b| {
        get(a, "@timestamp")
            .as_str()
            .cmp(&get(b, "@timestamp").as_str())
    });
    let mut sum = 0;
    let mut crossed = None;
    for (i, r) in calls.iter().enumerate() {
        ensure!(
            get(r, "user.id").as_str() == Some(uid.as_str()),
            "not the scraper: {r}"
        );
        sum += get(r, "abook.target.count").as_u64().unwrap_or(0);
        if sum > 3000 {
            crossed = Some(i);
            break;
        }
    }
    let k = crossed.context("the scraper never crossed 3000 persons: the test proves nothing")?;
    let alert = dataset_of(&records, "sparbar.alert")
        .into_iter()
        .find(|a| get(a, "rule.id").as_str() == Some("persons-per-hour"))
        .context("no persons-per-hour alert")?;
    ensure!(
        get(alert, "abook.evidence.event_ids")
            .as_array()
            .and_then(|e| e.last())
            == Some(get(calls[k], "event.id")),
        "the alert was not raised by the call that crossed the threshold ({}): {alert}",
        get(calls[k], "event.id")
    );
    ensure!(
        get(alert, "abook.alert.threshold").as_f64() == Some(3000.0)
            && get(alert, "abook.alert.value").as_f64() == Some(sum as f64),
        "alert value/threshold: {alert}"
    );
    // At the client: the k-th address-book call (0-based, after the login) crossed it; from
    // call k + 3 on, nothing is answered.
    let book: Vec<&Value> = reqs.iter().skip(1).collect();
    let first_fail = book
        .iter()
        .position(|q| q["status"].is_null())
        .context("the scraper was never blocked")?;
    ensure!(
        first_fail > k && first_fail <= k + 2,
        "blocked at call {first_fail}, threshold crossed at call {k}: more than 2 past it"
    );
    let answered_after: Vec<usize> = book
        .iter()
        .enumerate()
        .skip(first_fail)
        .filter(|(_, q)| !q["status"].is_null())
        .map(|(i, _)| i)
        .collect();
    ensure!(
        answered_after.is_empty(),
        "calls answered after the block: {answered_after:?}"
    );
    Ok(())
}

/// Logs in with curl (form) into `jar`.
fn curl_login(cert: &str, url: &str, jar: &Path, a: &Value) -> Option<u16> {
    curl_status(
        cert,
        &[
            "-c",
            &jar.display().to_string(),
            "--data-urlencode",
            &format!("username={}", a["username"].as_str().unwrap_or_default()),
            "--data-urlencode",
            &format!("password={}", a["password"].as_str().unwrap_or_default()),
            &format!("{url}/login"),
        ],
    )
}

fn curl_page(cert: &str, url: &str, jar: &Path, school: &str, page: u32, size: u32) -> Option<u16> {
    curl_status(
        cert,
        &[
            "-b",
            &jar.display().to_string(),
            &format!("{url}/api/addressbook/persons?schoolId={school}&page={page}&pageSize={size}"),
        ],
    )
}

fn pupils_of(ds: &Value, school: &str, n: usize) -> Vec<Value> {
    ds["accounts"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|x| x["role"] == "pupil" && x["schoolId"] == school)
                .take(n)
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

const WEEKLY: &str = r#"
[[rules]]
id = "distinct-persons-7d"
name = "distinct persons read per week"
kind = "rate"
metric = "distinct_persons"
window = "168h"
limit = 200
block = ["24h"]
"#;

/// Low and slow: one page a day stays under every per-minute, per-hour and per-day limit, but
/// the weekly distinct-persons rule adds the days up, across an agent restart (the test clock
/// moves a day between the calls).
#[test]
fn low_and_slow_is_caught_by_the_weekly_rule_across_a_restart() -> Result<()> {
    let (dir, platform, ds) = platform_with_dataset("detect-slow")?;
    let tls_port = platform.info["tls_port"].as_u64().context("tls_port")? as u16;
    let p = pupils_of(&ds, "sch-01", 1)
        .pop()
        .context("a pupil of sch-01")?;
    let config = format!("{}{WEEKLY}", demo_config(&platform)?);
    let (cert, url) = (platform.cert(), format!("https://127.0.0.1:{tls_port}"));
    let adir = dir.join("agent");
    let cfg_path = adir.join("sparbar.toml").display().to_string();
    let jar = dir.join("p.jar");

    let a = Agent::start_with(&adir, &config, &["--test-clock"])?;
    ensure!(
        curl_login(&cert, &url, &jar, &p) == Some(200),
        "login failed"
    );
    ensure!(
        curl_page(&cert, &url, &jar, "sch-01", 1, 100) == Some(200),
        "day 1 failed"
    );
    let adv = sparbar(&["advance-clock", "--config", &cfg_path, "--by", "24h"])?;
    ensure!(adv["ok"] == true, "advance-clock: {adv}");
    let day1 = a.records.clone();
    a.stop()?;
    let first = read_jsonl(&day1)?;
    ensure!(
        dataset_of(&first, "sparbar.alert").is_empty(),
        "day 1 alone raised an alert: {:?}",
        dataset_of(&first, "sparbar.alert")
    );
    let day1_persons = records_on_port(&first, tls_port)
        .iter()
        .filter_map(|r| get(r, "abook.target.count").as_u64())
        .sum::<u64>();

    let b = Agent::start_with(&adir, &config, &["--test-clock"])?;
    // Day 2, same session (the session map and the detector state came back from disk).
    let second = curl_page(&cert, &url, &jar, "sch-01", 2, 100);
    let path = b.records.clone();
    b.stop()?;
    ensure!(second == Some(200), "day 2 call failed: {second:?}");
    let all = read_jsonl(&path)?;
    let alerts = dataset_of(&all, "sparbar.alert");
    ensure!(
        alerts.len() == 1,
        "expected exactly the weekly alert, got {}: {alerts:?}",
        alerts.len()
    );
    let al = alerts[0];
    let uid = p["userId"].to_string();
    let value = get(al, "abook.alert.value").as_f64().unwrap_or(0.0);
    ensure!(
        get(al, "rule.id").as_str() == Some("distinct-persons-7d")
            && get(al, "user.id").as_str() == Some(uid.as_str())
            && value > 200.0
            && get(al, "abook.alert.window_s").as_u64() == Some(168 * 3600),
        "weekly alert: {al}"
    );
    // Day 2 alone would not have crossed it: the first day's persons were remembered.
    let day2: Vec<u64> = records_on_port(&all, tls_port)
        .iter()
        .filter(|r| {
            get(r, "url.query")
                .as_str()
                .is_some_and(|q| q.contains("page=2"))
        })
        .filter_map(|r| get(r, "abook.target.count").as_u64())
        .collect();
    ensure!(
        day1_persons < 200 && day2.iter().all(|n| *n < 200),
        "one day alone crosses the limit (day 1 {day1_persons}, day 2 {day2:?}): the test proves nothing"
    );
    let d = dataset_of(&all, "sparbar.decision");
    ensure!(
        d.iter()
            .any(|x| get(x, "event.action").as_str() == Some("block_start")
                && get(x, "abook.decision.rule_id").as_str() == Some("distinct-persons-7d")),
        "the weekly rule did not block: {d:?}"
    );
    Ok(())
}

const COLLUSION: &str = r#"
[[rules]]
id = "persons-per-address"
name = "distinct persons per client address"
kind = "rate"
metric = "distinct_persons"
by = "client_ip"
window = "1h"
limit = 250

[[rules]]
id = "persons-per-school-accounts"
name = "distinct persons read by one school's accounts"
kind = "rate"
metric = "distinct_persons"
by = "tenant"
window = "1h"
limit = 250
"#;

/// Several accounts of one school, each reading only a page it may read, together cover the
/// school: no per-user rule fires, but the per-address and per-school-accounts rules do.
#[test]
fn several_accounts_covering_a_school_raise_the_collusion_signal() -> Result<()> {
    let (dir, platform, ds) = platform_with_dataset("detect-collusion")?;
    let tls_port = platform.info["tls_port"].as_u64().context("tls_port")? as u16;
    let pupils = pupils_of(&ds, "sch-01", 4);
    let config = format!("{}{COLLUSION}", demo_config(&platform)?);
    let (cert, url) = (platform.cert(), format!("https://127.0.0.1:{tls_port}"));
    let agent = Agent::start(&dir.join("agent"), &config)?;
    for (i, p) in pupils.iter().enumerate() {
        let jar = dir.join(format!("p{i}.jar"));
        ensure!(curl_login(&cert, &url, &jar, p) == Some(200), "login {i}");
        // Every account logs in and asks /api/me, as the real client does, then one page each.
        ensure!(
            curl_status(
                &cert,
                &["-b", &jar.display().to_string(), &format!("{url}/api/me")]
            ) == Some(200),
            "me {i}"
        );
        ensure!(
            curl_page(&cert, &url, &jar, "sch-01", i as u32 + 1, 100) == Some(200),
            "page {i}"
        );
    }
    let path = agent.records.clone();
    agent.stop()?;
    let all = read_jsonl(&path)?;
    let alerts = dataset_of(&all, "sparbar.alert");
    let rules: Vec<&str> = alerts
        .iter()
        .filter_map(|a| get(a, "rule.id").as_str())
        .collect();
    ensure!(
        rules.contains(&"persons-per-address") && rules.contains(&"persons-per-school-accounts"),
        "collusion rules did not fire: {rules:?}"
    );
    for a in &alerts {
        let by = get(a, "abook.alert.by").as_str().unwrap_or("?");
        ensure!(
            by != "user",
            "a per-user rule fired on accounts that each read one page: {a}"
        );
        let key = get(a, "abook.alert.key").as_str().unwrap_or("?");
        ensure!(
            (by == "client_ip" && key == "127.0.0.1") || (by == "tenant" && key == "sch-01"),
            "alert key: {a}"
        );
    }
    Ok(())
}
