//! The differential suite's parts (tests/tests/differential.rs): Apache httpd as a second TLS
//! edge, the crafted-request client (tests/clients/crafted.py), and the comparison of what the
//! servers did (the client's answers, the upstream's `app.py --record` lines) with the agent's
//! edge records.
//!
//! The join: every crafted request goes on its own connection, so a record's `source.port` is
//! the client's local port; the upstream's line carries the client's `X-Request-Id`
//! (`<edge prefix><case id>`).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use crate::{get, output, repo_root};

pub const APACHE_BIN: &str = "/usr/sbin/apache2";

/// The `[[targets]]` entry for Apache httpd by its executable (mod_ssl links the system
/// libssl, which the agent finds in the process's maps). mod_proxy passes the path on with
/// dot-segments resolved and `//` merged (`path = "resolved"`).
pub const APACHE: &str =
    "[[targets]]\nexe = \"/usr/sbin/apache2\"\nname = \"apache2\"\npath = \"resolved\"\n";

/// Apache httpd (Debian apache2: mod_ssl, mod_proxy, mod_proxy_http) in the foreground with its
/// own config in `dir`, TLS on `tls_port`, proxying everything to the app on `app_port`.
/// Stopped (SIGTERM to the parent, which stops its children) when dropped.
pub struct Apache {
    child: Child,
    pub dir: PathBuf,
    pub port: u16,
}

impl Apache {
    pub fn start(
        dir: &Path,
        tls_port: u16,
        app_port: u16,
        cert: &str,
        key: &str,
    ) -> Result<Apache> {
        if !Path::new(APACHE_BIN).exists() {
            bail!("{APACHE_BIN} not found: install Debian's apache2 (`cargo xtask test` does)");
        }
        std::fs::create_dir_all(dir)?;
        // The children run as www-data and open nothing in dir after start; the parent (root)
        // writes the pid, logs and mutexes.
        let conf = std::fs::read_to_string(repo_root().join("tests/servers/apache2.conf.tmpl"))?
            .replace("@DIR@", &dir.display().to_string())
            .replace("@TLS_PORT@", &tls_port.to_string())
            .replace("@APP_PORT@", &app_port.to_string())
            .replace("@CERT@", cert)
            .replace("@KEY@", key);
        let path = dir.join("apache2.conf");
        std::fs::write(&path, conf)?;
        output(Command::new(APACHE_BIN).arg("-t").arg("-f").arg(&path))
            .context("apache2 -t refused the generated config")?;
        let child = Command::new(APACHE_BIN)
            .arg("-f")
            .arg(&path)
            .arg("-DFOREGROUND")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr.log"))?)
            .spawn()
            .context("starting apache2")?;
        let mut a = Apache {
            child,
            dir: dir.to_path_buf(),
            port: tls_port,
        };
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", tls_port)).is_err() {
            if let Some(st) = a.child.try_wait()? {
                bail!(
                    "apache2 exited with {st}: {}",
                    std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
                );
            }
            if t0.elapsed() > Duration::from_secs(15) {
                bail!("apache2 did not listen on {tls_port} within 15 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(a)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Apache {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn crafted() -> PathBuf {
    repo_root().join("tests/clients/crafted.py")
}

/// The committed corpus.
pub fn corpus_path() -> PathBuf {
    repo_root().join("tests/corpus/crafted.jsonl")
}

/// `crafted.py generate` into `out`.
pub fn generate(out: &Path) -> Result<()> {
    output(
        Command::new("python3")
            .arg(crafted())
            .args(["generate", "--out"])
            .arg(out),
    )?;
    Ok(())
}

/// `crafted.py login`: logs in pupils A and B through the edge on `port`; returns the creds.
pub fn login(port: u16, cafile: &str, dataset: &str, out: &Path) -> Result<Value> {
    output(
        Command::new("python3")
            .arg(crafted())
            .args(["login", "--port", &port.to_string(), "--cafile", cafile])
            .args(["--data", dataset, "--out"])
            .arg(out),
    )?;
    Ok(serde_json::from_str(&std::fs::read_to_string(out)?)?)
}

/// `crafted.py send`: every case (or those listed in `ids`) through the edge on `port`.
pub fn send(
    port: u16,
    cafile: &str,
    creds: &Path,
    rid_prefix: &str,
    ids: Option<&Path>,
    out: &Path,
) -> Result<Vec<ClientResult>> {
    let mut c = Command::new("python3");
    c.arg(crafted())
        .arg("send")
        .arg("--corpus")
        .arg(corpus_path())
        .arg("--creds")
        .arg(creds)
        .args(["--port", &port.to_string(), "--cafile", cafile])
        .args(["--rid-prefix", rid_prefix])
        .arg("--out")
        .arg(out);
    if let Some(ids) = ids {
        c.arg("--ids-from").arg(ids);
    }
    output(&mut c)?;
    crate::read_trail(out)?
        .iter()
        .map(ClientResult::from_json)
        .collect()
}

/// What the client saw of one case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientResult {
    pub id: String,
    pub family: String,
    pub local_port: Option<u16>,
    /// Final statuses of the responses read on the connection, in order.
    pub statuses: Vec<u16>,
}

impl ClientResult {
    pub fn from_json(v: &Value) -> Result<ClientResult> {
        Ok(ClientResult {
            id: v["id"].as_str().context("id")?.to_string(),
            family: v["family"].as_str().context("family")?.to_string(),
            local_port: v["local_port"].as_u64().map(|p| p as u16),
            statuses: v["statuses"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_u64())
                        .map(|s| s as u16)
                        .collect()
                })
                .unwrap_or_default(),
        })
    }
    pub fn answered(&self) -> bool {
        !self.statuses.is_empty()
    }
}

/// One line of `app.py --record`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub rid: String,
    pub method: String,
    /// The path as the app routed it (percent-decoded, no query).
    pub path: String,
    /// The app's handler, if a route matched.
    pub route: Option<String>,
    pub user: Option<u64>,
    pub status: u16,
}

impl Upstream {
    pub fn from_json(v: &Value) -> Option<Upstream> {
        Some(Upstream {
            rid: v["rid"].as_str()?.to_string(),
            method: v["method"].as_str().unwrap_or("").to_string(),
            path: v["path"].as_str().unwrap_or("").to_string(),
            route: v["route"].as_str().map(str::to_string),
            user: v["user"].as_u64(),
            status: v["status"].as_u64().unwrap_or(0) as u16,
        })
    }
}

/// The upstream's lines by request id, in the order it answered them.
pub fn upstream_by_rid(lines: &[Value]) -> BTreeMap<String, Vec<Upstream>> {
    let mut m: BTreeMap<String, Vec<Upstream>> = BTreeMap::new();
    for u in lines.iter().filter_map(Upstream::from_json) {
        m.entry(u.rid.clone()).or_default().push(u);
    }
    m
}

/// `%XX` decoded once, as the app decodes its path (Python's `unquote`: invalid escapes stay,
/// invalid UTF-8 becomes U+FFFD).
pub fn percent_decode(p: &str) -> String {
    let b = p.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A path as records carry it: what follows a `;` in a segment replaced by `*` (the agent's
/// `routes::redact_path_params`).
pub fn redact_path_params(p: &str) -> String {
    p.split('/')
        .map(|seg| match seg.split_once(';') {
            Some((keep, _)) => format!("{keep};*"),
            None => seg.to_string(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// The agent's route name for an app handler (tests/demo/sparbar.demo.toml); `None` for
/// handlers the agent has no route for.
pub fn agent_route(handler: &str) -> Option<&'static str> {
    Some(match handler {
        "login" => "auth.login",
        "logout" => "auth.logout",
        "token" => "auth.token",
        "me" => "identity.me",
        "query_persons" => "abook.persons.query",
        "school_persons" => "abook.school.persons",
        "class_persons" => "abook.class.persons",
        "search" => "abook.search",
        "person" => "abook.person",
        "photo" => "abook.person.photo",
        _ => return None,
    })
}

/// The record says explicitly that the agent could not tell who called: no user, an identity
/// source of `unreadable` or `unknown`, and an anomaly on the record (`sparbar.anomalies`, or
/// the capture's reasons). Anything else without a user is an anonymous call.
pub fn says_unknown_caller(r: &Value) -> bool {
    let source = get(r, "abook.identity.source").as_str().unwrap_or("");
    let anomaly = [
        get(r, "sparbar.anomalies"),
        get(r, "sparbar.capture.reasons"),
    ]
    .iter()
    .any(|v| v.as_array().is_some_and(|a| !a.is_empty()));
    get(r, "user.id").is_null() && matches!(source, "unreadable" | "unknown") && anomaly
}

/// One field where the agent's record and the server disagree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub case: String,
    pub family: String,
    pub field: &'static str,
    pub server: String,
    pub agent: String,
}

/// The outcome of one edge's comparison.
#[derive(Debug, Default)]
pub struct Comparison {
    pub cases: usize,
    pub answered: usize,
    pub responses: usize,
    pub records: usize,
    pub stray_records: usize,
    pub mismatches: Vec<Mismatch>,
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "(none)".into(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// Compares one edge's records (already limited to the edge's port and to this pass) with the
/// client's results and the upstream's lines.
pub fn compare(
    results: &[ClientResult],
    upstream: &BTreeMap<String, Vec<Upstream>>,
    rid_prefix: &str,
    records: &[&Value],
) -> Comparison {
    let mut by_port: BTreeMap<u64, Vec<&Value>> = BTreeMap::new();
    for r in records {
        by_port
            .entry(get(r, "source.port").as_u64().unwrap_or(0))
            .or_default()
            .push(r);
    }
    for v in by_port.values_mut() {
        v.sort_by_key(|r| get(r, "event.start").as_str().unwrap_or("").to_string());
    }
    let mut out = Comparison {
        cases: results.len(),
        records: records.len(),
        ..Default::default()
    };
    let mut joined = BTreeSet::new();
    for c in results {
        let Some(port) = c.local_port else { continue };
        let recs = by_port.get(&(port as u64)).cloned().unwrap_or_default();
        joined.insert(port as u64);
        if !c.answered() {
            continue;
        }
        out.answered += 1;
        out.responses += c.statuses.len();
        let mut miss = |field, server: String, agent: String| {
            out.mismatches.push(Mismatch {
                case: c.id.clone(),
                family: c.family.clone(),
                field,
                server,
                agent,
            })
        };
        if recs.len() != c.statuses.len() {
            miss(
                "records",
                format!("{} answer(s) {:?}", c.statuses.len(), c.statuses),
                format!("{} record(s)", recs.len()),
            );
        }
        let ups = upstream
            .get(&format!("{rid_prefix}{}", c.id))
            .cloned()
            .unwrap_or_default();
        for (i, (status, r)) in c.statuses.iter().zip(&recs).enumerate() {
            let got = get(r, "http.response.status_code");
            if got.as_u64() != Some(*status as u64) {
                miss("status", status.to_string(), s(got));
            }
            // The upstream's i-th line is this answer when it answered with this status; else
            // the edge answered itself and only the status is the server's word.
            let Some(u) = ups.get(i).filter(|u| u.status == *status) else {
                continue;
            };
            let m = get(r, "http.request.method");
            if m.as_str() != Some(u.method.as_str()) {
                miss("method", u.method.clone(), s(m));
            }
            // The same path in any percent-encoding: the agent may write `%2561` where the app
            // routed `%61` (RFC 3986 normalisation keeps `%25`); the route says what it meant.
            // Path parameters' values are not in records (`;*`): compared as redacted.
            let p = get(r, "url.path");
            let want_path = redact_path_params(&u.path);
            if p.as_str().map(percent_decode).as_deref() != Some(want_path.as_str()) {
                miss("path", want_path, s(p));
            }
            // A route found only on the normalised path says that the path as passed on
            // matched no route: the app must not have routed it either.
            let want_route = u.route.as_deref().and_then(agent_route);
            let route = get(r, "sparbar.route.name");
            let normalised = get(r, "sparbar.route.normalised_path");
            let as_sent = if normalised.is_null() {
                route.as_str()
            } else {
                None
            };
            if as_sent != want_route {
                miss(
                    "route",
                    want_route.unwrap_or("(none)").to_string(),
                    match normalised.as_str() {
                        Some(n) => format!("(none as passed on; {} on {n})", s(route)),
                        None => s(route),
                    },
                );
            }
            let uid = get(r, "user.id");
            match u.user {
                Some(want) if uid.as_str() == Some(want.to_string().as_str()) => {}
                Some(_) if says_unknown_caller(r) => {}
                Some(want) => miss(
                    "user",
                    want.to_string(),
                    format!(
                        "{} (identity {})",
                        s(uid),
                        s(get(r, "abook.identity.source"))
                    ),
                ),
                None if uid.is_null() => {}
                None => miss("user", "(none)".into(), s(uid)),
            }
        }
    }
    out.stray_records = by_port
        .iter()
        .filter(|(p, _)| !joined.contains(p))
        .map(|(_, v)| v.len())
        .sum();
    out
}

/// The table of mismatches and a count per family (cases with at least one mismatch).
pub fn report(edge: &str, c: &Comparison, families: &BTreeMap<String, usize>) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "== {edge}: {} cases, {} answered ({} responses), {} records, {} stray, {} mismatches",
        c.cases,
        c.answered,
        c.responses,
        c.records,
        c.stray_records,
        c.mismatches.len()
    );
    let _ = writeln!(
        t,
        "{:<18} {:<8} {:<44} agent said",
        "case", "field", "server said"
    );
    for m in &c.mismatches {
        let _ = writeln!(
            t,
            "{:<18} {:<8} {:<44} {}",
            m.case,
            m.field,
            m.server.escape_debug().to_string(),
            m.agent.escape_debug()
        );
    }
    let mut per: BTreeMap<&str, (BTreeSet<&str>, BTreeMap<&str, usize>)> = BTreeMap::new();
    for m in &c.mismatches {
        let e = per.entry(m.family.as_str()).or_default();
        e.0.insert(m.case.as_str());
        *e.1.entry(m.field).or_insert(0) += 1;
    }
    let _ = writeln!(t, "-- {edge}: cases with a mismatch, per family");
    for (fam, n) in families {
        let (cases, fields) = per.get(fam.as_str()).cloned().unwrap_or_default();
        let _ = writeln!(t, "{fam:<14} {:>3} / {n:<3} {fields:?}", cases.len());
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn client(id: &str, port: u16, statuses: &[u16]) -> ClientResult {
        ClientResult {
            id: id.into(),
            family: "f".into(),
            local_port: Some(port),
            statuses: statuses.to_vec(),
        }
    }

    fn up(rid: &str, path: &str, route: Option<&str>, user: Option<u64>, status: u16) -> Upstream {
        Upstream {
            rid: rid.into(),
            method: "GET".into(),
            path: path.into(),
            route: route.map(str::to_string),
            user,
            status,
        }
    }

    fn rec(port: u16, path: &str, status: u16, route: Option<&str>, user: Option<&str>) -> Value {
        let mut r = json!({
            "event": {"start": "2026-01-01T00:00:00Z"},
            "source": {"port": port},
            "http": {"request": {"method": "GET"}, "response": {"status_code": status}},
            "url": {"path": path},
            "sparbar": {},
        });
        if let Some(route) = route {
            r["sparbar"]["route"] = json!({"name": route});
        }
        if let Some(u) = user {
            r["user"] = json!({"id": u});
        }
        r
    }

    fn ups(list: Vec<Upstream>) -> BTreeMap<String, Vec<Upstream>> {
        let v: Vec<Value> = list
            .iter()
            .map(|u| {
                json!({"rid": u.rid, "method": u.method, "path": u.path, "route": u.route,
                       "user": u.user, "status": u.status})
            })
            .collect();
        upstream_by_rid(&v)
    }

    #[test]
    fn an_exact_record_has_no_mismatch() {
        let u = ups(vec![up("ng-a", "/api/me", Some("me"), Some(7), 200)]);
        let r = rec(5, "/api/me", 200, Some("identity.me"), Some("7"));
        let c = compare(&[client("a", 5, &[200])], &u, "ng-", &[&r]);
        assert_eq!(c.mismatches, vec![]);
        assert_eq!(
            (c.answered, c.responses, c.records, c.stray_records),
            (1, 1, 1, 0)
        );
    }

    #[test]
    fn every_field_is_compared() {
        let u = ups(vec![up(
            "ng-a",
            "/api/addressbook/persons/9",
            Some("person"),
            Some(7),
            200,
        )]);
        let mut r = rec(5, "/api/addressbook/persons/09", 200, None, None);
        r["http"]["request"]["method"] = json!("get");
        let c = compare(&[client("a", 5, &[200])], &u, "ng-", &[&r]);
        let fields: Vec<&str> = c.mismatches.iter().map(|m| m.field).collect();
        assert_eq!(fields, vec!["method", "path", "route", "user"]);
    }

    /// A route found only on the normalised path is the agent saying "as passed on, no route":
    /// right when the app answered 404 without a route, wrong when the app routed it.
    /// Path parameters compare as the record carries them (`;*`).
    #[test]
    fn a_normalised_route_claims_no_route_as_passed_on() {
        let mut r = rec(5, "/api/me;*", 404, Some("identity.me"), None);
        r["sparbar"]["route"]["normalised_path"] = json!("/api/me");
        let u = ups(vec![up("ng-a", "/api/me;x=1", None, None, 404)]);
        let c = compare(&[client("a", 5, &[404])], &u, "ng-", &[&r]);
        assert_eq!(c.mismatches, vec![]);
        let u = ups(vec![up("ng-a", "/api/me;x=1", Some("me"), None, 404)]);
        let c = compare(&[client("a", 5, &[404])], &u, "ng-", &[&r]);
        let got: Vec<(&str, &str, &str)> = c
            .mismatches
            .iter()
            .map(|m| (m.field, m.server.as_str(), m.agent.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![(
                "route",
                "identity.me",
                "(none as passed on; identity.me on /api/me)"
            )]
        );
        assert_eq!(redact_path_params("/a;x=1;y/b/c;"), "/a;*/b/c;*");
    }

    #[test]
    fn paths_compare_in_any_percent_encoding() {
        assert_eq!(percent_decode("/api/%61ddressbook"), "/api/addressbook");
        assert_eq!(percent_decode("/api/%2561ddressbook"), "/api/%61ddressbook");
        assert_eq!(percent_decode("/a%2Fb%2f"), "/a/b/");
        assert_eq!(percent_decode("/me%zz%4"), "/me%zz%4");
        assert_eq!(percent_decode("/s%C3%85%ff"), "/s\u{c5}\u{fffd}");
        let u = ups(vec![up("ng-a", "/api/%61x", None, None, 404)]);
        let r = rec(5, "/api/%2561x", 404, None, None);
        let c = compare(&[client("a", 5, &[404])], &u, "ng-", &[&r]);
        assert_eq!(c.mismatches, vec![]);
    }

    #[test]
    fn a_missing_record_and_a_stray_one_are_counted() {
        let r = rec(6, "/x", 400, None, None);
        let c = compare(&[client("a", 5, &[400])], &BTreeMap::new(), "ng-", &[&r]);
        assert_eq!(c.mismatches.len(), 1);
        assert_eq!(c.mismatches[0].field, "records");
        assert_eq!(c.stray_records, 1);
    }

    #[test]
    fn an_edge_refusal_is_compared_on_status_only() {
        let r = rec(5, "/whatever", 400, None, Some("7"));
        let c = compare(&[client("a", 5, &[400])], &BTreeMap::new(), "ng-", &[&r]);
        assert_eq!(c.mismatches, vec![]);
        let r = rec(5, "/whatever", 200, None, None);
        let c = compare(&[client("a", 5, &[400])], &BTreeMap::new(), "ng-", &[&r]);
        assert_eq!(c.mismatches[0].field, "status");
    }

    #[test]
    fn a_user_the_agent_names_wrongly_or_not_at_all_is_a_mismatch() {
        let u = ups(vec![up("ng-a", "/api/me", Some("me"), Some(7), 200)]);
        for user in [Some("8"), None] {
            let r = rec(5, "/api/me", 200, Some("identity.me"), user);
            let c = compare(&[client("a", 5, &[200])], &u, "ng-", &[&r]);
            assert_eq!(c.mismatches.len(), 1, "{user:?}");
            assert_eq!(c.mismatches[0].field, "user");
        }
        // A refused caller must not be named.
        let u = ups(vec![up("ng-a", "/api/me", Some("me"), None, 401)]);
        let r = rec(5, "/api/me", 401, Some("identity.me"), Some("8"));
        let c = compare(&[client("a", 5, &[401])], &u, "ng-", &[&r]);
        assert_eq!(c.mismatches[0].field, "user");
    }

    #[test]
    fn unknown_with_an_anomaly_is_an_explicit_answer_unknown_alone_is_not() {
        let u = ups(vec![up("ng-a", "/api/me", Some("me"), Some(7), 200)]);
        let mut r = rec(5, "/api/me", 200, Some("identity.me"), None);
        r["abook"] = json!({"identity": {"source": "unknown"}});
        let c = compare(&[client("a", 5, &[200])], &u, "ng-", &[&r]);
        assert_eq!(c.mismatches.len(), 1);
        r["sparbar"]["anomalies"] = json!(["cookie_control_byte"]);
        let c = compare(&[client("a", 5, &[200])], &u, "ng-", &[&r]);
        assert_eq!(c.mismatches, vec![]);
    }

    #[test]
    fn two_answers_on_one_connection_need_two_records_in_order() {
        let u = ups(vec![
            up("ng-a", "/api/me", Some("me"), Some(7), 200),
            up(
                "ng-a",
                "/api/addressbook/persons/9",
                Some("person"),
                Some(7),
                403,
            ),
        ]);
        let mut r1 = rec(5, "/api/me", 200, Some("identity.me"), Some("7"));
        let mut r2 = rec(
            5,
            "/api/addressbook/persons/9",
            403,
            Some("abook.person"),
            Some("7"),
        );
        r1["event"]["start"] = json!("2026-01-01T00:00:01Z");
        r2["event"]["start"] = json!("2026-01-01T00:00:02Z");
        let c = compare(&[client("a", 5, &[200, 403])], &u, "ng-", &[&r2, &r1]);
        assert_eq!(c.mismatches, vec![]);
        let c = compare(&[client("a", 5, &[200, 403])], &u, "ng-", &[&r1]);
        assert_eq!(c.mismatches[0].field, "records");
    }
}
