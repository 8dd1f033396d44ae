//! Privileged end-to-end test of enforcement against crafted requests (issue 12, deliverable
//! 4): the demo platform behind nginx/TLS, the agent enforcing; a pupil is blocked by the
//! operator, then sends each crafted form of a request on a fresh connection. At the client,
//! no answer may come back for any of them; an honest pupil's same forms are answered.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context as _, Result};
use serde_json::{json, Value};
use sparbar_tests::*;

/// Sends each request (a list of byte pieces, written with a pause between them) over a fresh
/// TLS connection and reports per request whether an HTTP status line came back, and which.
const CLIENT: &str = r#"
import json, socket, ssl, sys, time
port, cafile = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cafile=cafile)
ctx.check_hostname = False
out = []
for pieces in json.load(sys.stdin):
    got = b""
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=4)
        s = ctx.wrap_socket(raw, server_hostname="localhost")
        for i, p in enumerate(pieces):
            if i:
                time.sleep(0.3)
            s.sendall(bytes.fromhex(p))
        s.settimeout(3)
        while True:
            b = s.recv(65536)
            if not b:
                break
            got += b
            if b"\r\n\r\n" in got:
                break
    except (OSError, ssl.SSLError):
        pass
    line = got.split(b"\r\n", 1)[0].decode("latin-1")
    out.append(line if line.startswith("HTTP/1.") else None)
print(json.dumps(out))
"#;

fn send(port: u16, cafile: &str, reqs: &[Vec<Vec<u8>>]) -> Result<Vec<Option<String>>> {
    let input: Vec<Vec<String>> = reqs
        .iter()
        .map(|pieces| pieces.iter().map(hex::encode).collect())
        .collect();
    let mut child = std::process::Command::new("python3")
        .args(["-c", CLIENT, &port.to_string(), cafile])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().context("stdin")?;
        stdin.write_all(serde_json::to_string(&input)?.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "the TLS client failed");
    let v: Vec<Option<String>> = serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stdout).into_owned())?;
    Ok(v)
}

/// `n` bytes of other headers, in lines of about 700 bytes: within nginx's 8k per line and the
/// demo app's (Python's) 100 headers, so an honest request so padded is answered.
fn padding(n: usize) -> String {
    let mut s = String::new();
    let mut i = 0;
    while s.len() < n {
        s.push_str(&format!("X-Pad-{i}: {}\r\n", "a".repeat(700)));
        i += 1;
    }
    s
}

fn get(path: &str, headers: &str) -> Vec<Vec<u8>> {
    vec![
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Connection: close\r\n\r\n")
            .into_bytes(),
    ]
}

fn post(path: &str, ctype: &str, body: &str) -> Vec<Vec<u8>> {
    vec![format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()]
}

/// Every crafted form of a call by `a` (whose session cookie is `sid` and bearer token `jwt`),
/// named.
fn crafted(a: &Value, sid: &str, jwt: &str) -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let me = "/api/me";
    let user = a["username"].as_str().unwrap_or_default();
    let pw = a["password"].as_str().unwrap_or_default();
    let enc: String = user.bytes().map(|b| format!("%{b:02X}")).collect();
    let split = {
        let head = format!("GET {me} HTTP/1.1\r\nHost: localhost\r\nCookie: skolsid=");
        let (x, y) = sid.split_at(sid.len() / 2);
        vec![
            format!("{head}{x}").into_bytes(),
            format!("{y}\r\nConnection: close\r\n\r\n").into_bytes(),
        ]
    };
    let mut ctl =
        format!("GET {me} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer ").into_bytes();
    ctl.extend(jwt.as_bytes());
    ctl.push(0x1f);
    ctl.extend(b"\r\nConnection: close\r\n\r\n");
    vec![
        (
            "padded 6 KB",
            get(
                me,
                &format!("{}Cookie: skolsid={sid}\r\n", padding(6 * 1024)),
            ),
        ),
        (
            "padded 30 KB",
            get(
                me,
                &format!("{}Cookie: skolsid={sid}\r\n", padding(30 * 1024)),
            ),
        ),
        ("cOOKIE", get(me, &format!("cOOKIE: skolsid={sid}\r\n"))),
        (
            "bearer",
            get(me, &format!("Authorization: bearer {jwt}\r\n")),
        ),
        (
            "Bearer two spaces",
            get(me, &format!("Authorization: Bearer  {jwt}\r\n")),
        ),
        ("token ended by 0x1f", vec![ctl]),
        (
            "percent-encoded login",
            post(
                "/login",
                "application/x-www-form-urlencoded",
                &format!("username={enc}&password={pw}"),
            ),
        ),
        (
            "JSON-escaped login",
            post(
                "/login",
                "application/json",
                &format!(r#"{{"\u0075sername":"{user}","password":"{pw}"}}"#),
            ),
        ),
        ("cookie split across writes", split),
    ]
}

fn login(url: &str, cert: &str, a: &Value, jar: &Path) -> Result<(String, String)> {
    let user = a["username"].as_str().unwrap_or_default();
    let pw = a["password"].as_str().unwrap_or_default();
    output(std::process::Command::new("curl").args([
        "-sf",
        "--cacert",
        cert,
        "-c",
        &jar.display().to_string(),
        "--data-urlencode",
        &format!("username={user}"),
        "--data-urlencode",
        &format!("password={pw}"),
        &format!("{url}/login"),
    ]))?;
    let jar_text = std::fs::read_to_string(jar)?;
    let sid = jar_text
        .lines()
        .find_map(|l| l.split('\t').nth(6).filter(|_| l.contains("skolsid")))
        .context("no skolsid in the cookie jar")?
        .to_string();
    let tok: Value = serde_json::from_str(&output(std::process::Command::new("curl").args([
        "-sf",
        "--cacert",
        cert,
        "-H",
        "Content-Type: application/json",
        "-d",
        &json!({"username": user, "password": pw}).to_string(),
        &format!("{url}/api/token"),
    ]))?)?;
    let jwt = tok["access_token"]
        .as_str()
        .context("no access_token")?
        .to_string();
    Ok((sid, jwt))
}

/// The demo platform behind nginx/TLS (`vulnerable`: the flaw switched on) in a scratch
/// directory: the directory, the TLS port, the platform and its dataset.
fn platform(name: &str, vulnerable: bool) -> Result<(PathBuf, u16, Platform, Value)> {
    require_root()?;
    let dir = scratch(name);
    let (tls_port, app_port) = (free_port(), free_port());
    let platform = Platform::up(&dir.join("platform"), tls_port, app_port, vulnerable)?;
    let ds: Value = serde_json::from_str(&std::fs::read_to_string(
        platform.info["dataset"].as_str().unwrap_or_default(),
    )?)?;
    Ok((dir, tls_port, platform, ds))
}

/// The dataset's pupil accounts, in order.
fn pupils(ds: &Value) -> Result<Vec<&Value>> {
    Ok(ds["accounts"]
        .as_array()
        .context("accounts")?
        .iter()
        .filter(|a| a["role"] == "pupil")
        .collect())
}

#[test]
fn a_blocked_pupil_gets_no_answer_to_any_crafted_request() -> Result<()> {
    let (dir, tls_port, platform, ds) = platform("crafted", false)?;
    let pupils = pupils(&ds)?;
    let (x, y) = (pupils[0], pupils[1]);
    let agent = Agent::start(&dir.join("agent"), &demo_config(&platform)?)?;
    let cert = platform.cert();
    let url = format!("https://127.0.0.1:{tls_port}");
    let (sx, jx) = login(&url, &cert, x, &dir.join("x.jar"))?;
    let (sy, jy) = login(&url, &cert, y, &dir.join("y.jar"))?;
    // Before the block: the plain forms are answered for both.
    let plain = |sid: &str| get("/api/me", &format!("Cookie: skolsid={sid}\r\n"));
    let before = send(tls_port, &cert, &[plain(&sx), plain(&sy)])?;
    ensure!(
        before
            .iter()
            .all(|s| s.as_deref().is_some_and(|l| l.contains(" 200 "))),
        "before the block: {before:?}"
    );

    let cfg = dir.join("agent/sparbar.toml").display().to_string();
    let uid = x["userId"].to_string();
    let b = output(std::process::Command::new(agent_bin()?).args([
        "block",
        "--config",
        &cfg,
        "--user",
        &uid,
        "--duration",
        "10m",
        "--reason",
        "test",
    ]))?;
    ensure!(b.contains("\"ok\":true"), "sparbar block: {b}");

    let forms = crafted(x, &sx, &jx);
    let got = send(
        tls_port,
        &cert,
        &forms.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>(),
    )?;
    let answered: Vec<(&str, &String)> = forms
        .iter()
        .zip(&got)
        .filter_map(|((n, _), g)| g.as_ref().map(|l| (*n, l)))
        .collect();
    // The honest pupil's same forms (the login forms log it in; the padded ones stay within
    // nginx's header buffers).
    let honest = crafted(y, &sy, &jy);
    let honest_got = send(
        tls_port,
        &cert,
        &honest.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>(),
    )?;
    let stats = agent.stop()?;

    ensure!(
        answered.is_empty(),
        "{} of {} crafted requests of a blocked pupil were answered: {answered:?}",
        answered.len(),
        forms.len()
    );
    let honest_ok: Vec<(&str, Option<&String>)> = honest
        .iter()
        .zip(&honest_got)
        .map(|((n, _), g)| (*n, g.as_ref()))
        .filter(|(_, g)| !g.is_some_and(|l| l.contains(" 200 ")))
        .collect();
    ensure!(
        honest_ok.is_empty(),
        "an honest pupil's requests were not answered 200: {honest_ok:?}"
    );
    ensure!(
        stats.kernel("kernel_token_scans_truncated_total{reason=\"loop_budget\"}") == 0
            && stats.kernel("kernel_token_scans_failed_total{reason=\"read_user_failed\"}") == 0,
        "kernel scan problems: {:?}",
        stats.0
    );
    Ok(())
}

/// A request target built from the caller's own school and the school it names.
type Target = fn(&str, &str) -> String;

/// The incident's manipulated call, crafted every way a pupil could write it, each by a fresh
/// pupil right after the call that tells the agent its school (`/api/me`): not one answer about
/// another school comes back, on the vulnerable platform that would serve it. The kernel
/// refuses it when it already knows the session's school, else holds its answer until the
/// agent has judged the request. The same pupils' calls about their own school are answered.
#[test]
fn the_manipulated_call_never_gets_an_answer() -> Result<()> {
    let (dir, tls_port, platform, ds) = platform("crafted-tenant", true)?;
    let pupils = pupils(&ds)?;
    let agent = Agent::start(&dir.join("agent"), &demo_config(&platform)?)?;
    let cert = platform.cert();
    let url = format!("https://127.0.0.1:{tls_port}");
    let forms: Vec<(&str, Target)> = vec![
        ("query", |_, f| {
            format!("/api/addressbook/persons?schoolId={f}&page=1")
        }),
        ("path", |_, f| {
            format!("/api/addressbook/schools/{f}/persons")
        }),
        ("escaped name", |_, f| {
            format!("/api/addressbook/persons?school%49d={f}")
        }),
        ("escaped value", |_, f| {
            format!(
                "/api/addressbook/persons?schoolId={}",
                f.replace('-', "%2D")
            )
        }),
        ("escaped path", |_, f| {
            format!("/api/addressbook/%70ersons?schoolId={f}")
        }),
        ("escaped path segment", |_, f| {
            format!("/api/%61ddressbook/schools/{f}/persons")
        }),
        ("own first, foreign second", |o, f| {
            format!("/api/addressbook/persons?schoolId={o}&schoolId={f}")
        }),
        ("foreign first, own second", |o, f| {
            format!("/api/addressbook/persons?schoolId={f}&schoolId={o}")
        }),
    ];
    let mut answered = Vec::new();
    let mut own_refused = Vec::new();
    for (i, (name, form)) in forms.iter().enumerate() {
        // Two fresh pupils per form: one calls about its own school, one about another.
        let (p, q) = (pupils[2 * i], pupils[2 * i + 1]);
        for (who, foreign) in [(p, false), (q, true)] {
            let own = who["schoolId"].as_str().context("schoolId")?;
            let other = ds["schools"]
                .as_array()
                .context("schools")?
                .iter()
                .filter_map(|s| s["id"].as_str())
                .find(|s| *s != own)
                .context("another school")?;
            let (sid, _) = login(&url, &cert, who, &dir.join(format!("{i}-{foreign}.jar")))?;
            let cookie = format!("Cookie: skolsid={sid}\r\n");
            let target = if foreign {
                form(own, other)
            } else {
                form(own, own)
            };
            let got = send(
                tls_port,
                &cert,
                &[get("/api/me", &cookie), get(&target, &cookie)],
            )?;
            ensure!(
                got[0].as_deref().is_some_and(|l| l.contains(" 200 ")),
                "{name}: /api/me was not answered: {got:?}"
            );
            match (foreign, &got[1]) {
                (true, Some(l)) => answered.push(format!("{name}: {target} -> {l}")),
                (false, l) if !l.as_deref().is_some_and(|l| l.contains(" 200 ")) => {
                    own_refused.push(format!("{name}: {target} -> {l:?}"))
                }
                _ => {}
            }
        }
    }
    let stats = agent.stop()?;
    ensure!(
        answered.is_empty(),
        "{} of {} manipulated calls were answered: {answered:?}",
        answered.len(),
        forms.len()
    );
    ensure!(
        own_refused.is_empty(),
        "calls about the pupil's own school were not answered: {own_refused:?}"
    );
    let by_kernel =
        stats.agent("enforcement_requests_stopped_total{reason=\"kernel_cross_tenant\"}");
    let held = stats.agent("enforcement_requests_held_total{reason=\"stopped\"}");
    let early = stats.agent("enforcement_requests_stopped_total{reason=\"cross_tenant\"}");
    ensure!(
        by_kernel + held + early >= forms.len() as u64,
        "not every manipulated call was stopped before its answer: kernel {by_kernel}, held {held}, request-time {early}"
    );
    Ok(())
}

/// One HTTP/2 connection of node's client on `port`: every path at once with `cookie` (its
/// crumbs as separate fields, as browsers send them); each path's status (0: no answer).
fn h2_get(port: u16, cert: &str, paths: &[&str], cookie: &str) -> Result<Vec<u64>> {
    let out = output(
        std::process::Command::new("node")
            .arg(repo_root().join("tests/clients/h2_client.js"))
            .args(["--url", &format!("https://127.0.0.1:{port}"), "--ca", cert])
            .args(["--paths", &paths.join(","), "--cookie", cookie])
            .args(["--timeout-ms", "8000"]),
    )?;
    let report: Value = serde_json::from_str(out.trim()).context("h2_client output")?;
    Ok(report["responses"]
        .as_array()
        .context("responses")?
        .iter()
        .map(|r| r["status"].as_u64().unwrap_or(0))
        .collect())
}

/// A blocked pupil's new HTTP/2 connections (node's client, cookie crumbs HPACK-coded as a
/// literal, Huffman or not as node chooses; curl --http2 with the whole Cookie header as one
/// field) are refused in the kernel from their first HEADERS frame: no answer comes back.
/// The honest pupil's are answered.
#[test]
fn a_blocked_pupils_new_http2_connections_get_no_answer() -> Result<()> {
    require_root()?;
    let dir = scratch("crafted-h2");
    let (tls_port, app_port, h2_port) = (free_port(), free_port(), free_port());
    let platform = Platform::up_h2(&dir.join("platform"), tls_port, app_port, h2_port, false)?;
    let ds: Value = serde_json::from_str(&std::fs::read_to_string(
        platform.info["dataset"].as_str().unwrap_or_default(),
    )?)?;
    let pupils = pupils(&ds)?;
    let (x, y) = (pupils[0], pupils[1]);
    let agent = Agent::start(&dir.join("agent"), &demo_config(&platform)?)?;
    let cert = platform.cert();
    let url = format!("https://127.0.0.1:{tls_port}");
    let (sx, _) = login(&url, &cert, x, &dir.join("x.jar"))?;
    let (sy, _) = login(&url, &cert, y, &dir.join("y.jar"))?;
    let before = h2_get(
        h2_port,
        &cert,
        &["/api/me"],
        &format!("theme=dark; skolsid={sx}"),
    )?;
    ensure!(before == [200], "before the block, over HTTP/2: {before:?}");

    let cfg = dir.join("agent/sparbar.toml").display().to_string();
    let uid = x["userId"].to_string();
    let b = output(std::process::Command::new(agent_bin()?).args([
        "block",
        "--config",
        &cfg,
        "--user",
        &uid,
        "--duration",
        "10m",
        "--reason",
        "test",
    ]))?;
    ensure!(b.contains("\"ok\":true"), "sparbar block: {b}");

    let mut answered = Vec::new();
    for (k, cookie) in [
        format!("skolsid={sx}"),
        format!("theme=dark; skolsid={sx}; lang=sv"),
        format!("a=1; skolsid={sx}"),
    ]
    .iter()
    .enumerate()
    {
        let got = h2_get(h2_port, &cert, &["/api/me", "/api/me?x=1"], cookie)?;
        if got.iter().any(|s| *s != 0) {
            answered.push(format!("node connection {k}: {got:?}"));
        }
    }
    // curl: one Cookie field.
    let curl = std::process::Command::new("curl")
        .args([
            "-s",
            "--http2",
            "--cacert",
            &cert,
            "-m",
            "8",
            "-o",
            "/dev/null",
        ])
        .args(["-w", "%{http_version} %{response_code}"])
        .args(["-H", &format!("Cookie: skolsid={sx}")])
        .arg(format!("https://127.0.0.1:{h2_port}/api/me"))
        .output()?;
    let curl_out = String::from_utf8_lossy(&curl.stdout).to_string();
    if !curl_out.ends_with(" 000") && !curl_out.is_empty() {
        answered.push(format!("curl --http2: {curl_out}"));
    }
    let honest = h2_get(h2_port, &cert, &["/api/me"], &format!("skolsid={sy}"))?;
    let stats = agent.stop()?;
    ensure!(
        answered.is_empty(),
        "a blocked pupil's HTTP/2 requests were answered: {answered:?}"
    );
    ensure!(honest == [200], "the honest pupil over HTTP/2: {honest:?}");
    let refused = stats.kernel("kernel_requests_refused_total");
    ensure!(
        refused >= 4,
        "the kernel refused {refused} requests, expected one per connection (4); stats {:?}",
        stats.0
    );
    Ok(())
}

/// The page Chromium loads from the platform (`/static/`): it sets the pupil's session cookie
/// and calls the API with fetch(), writing what came back into the page.
const PUPIL_PAGE: &str = r#"<!doctype html><html><body><p id="r">pending</p><script>
document.cookie = "skolsid=@SID@; path=/";
fetch("/api/me", {credentials: "same-origin"})
  .then(r => r.text().then(t => { document.getElementById("r").textContent = "got " + r.status; }))
  .catch(e => { document.getElementById("r").textContent = "refused " + e; });
</script></body></html>
"#;

/// Headless Chromium loads the pupil page with session `sid` over HTTP/2; what the page says.
fn chromium_page(dir: &Path, h2_port: u16, sid: &str, name: &str) -> Result<String> {
    let page = dir.join("platform/static").join(format!("{name}.html"));
    std::fs::write(&page, PUPIL_PAGE.replace("@SID@", sid))?;
    let dom = output(
        std::process::Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
            ])
            .args(["--ignore-certificate-errors", "--virtual-time-budget=8000"])
            .arg(format!(
                "--user-data-dir={}",
                dir.join(format!("chromium-{name}")).display()
            ))
            .arg("--dump-dom")
            .arg(format!("https://127.0.0.1:{h2_port}/static/{name}.html")),
    )?;
    Ok(dom
        .split("<p id=\"r\">")
        .nth(1)
        .and_then(|r| r.split('<').next())
        .unwrap_or("no result")
        .to_string())
}

/// The incident over HTTP/2, on the vulnerable platform: a pupil's manipulated call about
/// another school (node's HTTP/2 client) raises the cross-tenant alert and the block; from then
/// on not one answer comes back to the pupil over HTTP/2, on new connections of node's client
/// and of Chromium, whose page load with the pupil's session gets its API call refused.
#[test]
fn the_incident_over_http2_is_blocked() -> Result<()> {
    require_root()?;
    let dir = scratch("crafted-h2-incident");
    let (tls_port, app_port, h2_port) = (free_port(), free_port(), free_port());
    let platform = Platform::up_h2(&dir.join("platform"), tls_port, app_port, h2_port, true)?;
    let ds: Value = serde_json::from_str(&std::fs::read_to_string(
        platform.info["dataset"].as_str().unwrap_or_default(),
    )?)?;
    let pupils = pupils(&ds)?;
    let (x, y) = (pupils[0], pupils[1]);
    let own = x["schoolId"].as_str().context("schoolId")?;
    let other = ds["schools"]
        .as_array()
        .context("schools")?
        .iter()
        .filter_map(|s| s["id"].as_str())
        .find(|s| *s != own)
        .context("another school")?
        .to_string();
    let agent = Agent::start(&dir.join("agent"), &demo_config(&platform)?)?;
    let cert = platform.cert();
    let url = format!("https://127.0.0.1:{tls_port}");
    let (sx, _) = login(&url, &cert, x, &dir.join("x.jar"))?;
    let (sy, _) = login(&url, &cert, y, &dir.join("y.jar"))?;
    // Before: Chromium's page works for the pupil.
    let before = chromium_page(&dir, h2_port, &sx, "before")?;
    ensure!(
        before == "got 200",
        "before the incident, Chromium's page said {before:?}"
    );

    // The manipulated call.
    let cookie = format!("skolsid={sx}");
    let foreign = format!("/api/addressbook/persons?schoolId={other}");
    h2_get(h2_port, &cert, &["/api/me", &foreign], &cookie)?;
    // The block is in force once its block_enforced record is in the trail.
    let trail = dir.join("agent/access.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let enforced = read_trail(&trail)
            .unwrap_or_default()
            .iter()
            .any(|r| r["event"]["action"] == "block_enforced");
        if enforced {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "no block_enforced record within 30 s of the manipulated call"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let mut answered = Vec::new();
    for k in 0..3 {
        let got = h2_get(h2_port, &cert, &["/api/me", &foreign], &cookie)?;
        if got.iter().any(|s| *s != 0) {
            answered.push(format!("node connection {k}: {got:?}"));
        }
    }
    let after = chromium_page(&dir, h2_port, &sx, "after")?;
    if !after.starts_with("refused") {
        answered.push(format!("Chromium: {after}"));
    }
    let honest = h2_get(h2_port, &cert, &["/api/me"], &format!("skolsid={sy}"))?;
    let stats = agent.stop()?;
    ensure!(
        answered.is_empty(),
        "after the block, the pupil was answered over HTTP/2: {answered:?}"
    );
    ensure!(honest == [200], "another pupil over HTTP/2: {honest:?}");
    let records = read_trail(&trail)?;
    let alert = records.iter().any(|r| {
        r["event"]["dataset"] == "sparbar.alert" && r["event"]["action"] == "cross-tenant"
    });
    ensure!(alert, "no cross-tenant alert in the trail");
    let cross: Vec<&Value> = records
        .iter()
        .filter(|r| r["http"]["version"] == "2" && r["url"]["path"] == "/api/addressbook/persons")
        .collect();
    ensure!(
        !cross.is_empty(),
        "no HTTP/2 record of the manipulated call"
    );
    // Attributed over HTTP/2 as over HTTP/1: the pupil, its school, its session cookie.
    let uid = x["userId"].to_string().trim_matches('"').to_string();
    for r in &cross {
        ensure!(
            r["user"]["id"].as_str() == Some(uid.as_str())
                && r["organization"]["id"].as_str() == Some(own)
                && r["abook"]["session"]["kind"] == "cookie",
            "the manipulated call over HTTP/2 is not attributed to pupil {uid} of {own}: {r}"
        );
    }
    ensure!(
        stats.kernel("kernel_requests_refused_total") >= 4,
        "the kernel refused {} requests, expected at least one per connection after the block (4)",
        stats.kernel("kernel_requests_refused_total")
    );
    Ok(())
}
