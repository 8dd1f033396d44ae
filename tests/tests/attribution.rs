//! Privileged end-to-end tests of attribution: who read whose personal data. The demo platform
//! (nginx TLS → app, the incident's flaw switched on) is driven by real clients, and every record
//! is compared with the client's own account and the dataset: which user and session made the
//! request, which persons' data left, which kinds of data and from which schools. Also: no
//! secret and no personal data ever reaches the agent's outputs, and each way of learning an
//! identity (login exchange, identity endpoint, token claims, restart) works on its own.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use aho_corasick::AhoCorasick;
use anyhow::{anyhow, bail, ensure, Context as _, Result};
use serde_json::{json, Value};
use sparbar_tests::*;

// ---------------------------------------------------------------------------------------------
// The demo run shared by the first two tests
// ---------------------------------------------------------------------------------------------

/// One run of the demo: the agent with tests/demo/sparbar.demo.toml watching traffic.py.
struct DemoRun {
    tls_port: u16,
    app_port: u16,
    agent_dir: PathBuf,
    summary_path: PathBuf,
    summary: Value,
    dataset: Value,
    records: Vec<Value>,
    log: Vec<String>,
    stats: Stats,
}

static DEMO: OnceLock<std::result::Result<DemoRun, String>> = OnceLock::new();

/// The demo run, made on first use.
fn demo_run() -> Result<&'static DemoRun> {
    DEMO.get_or_init(|| run_demo().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("the demo run failed: {e}"))
}

fn run_demo() -> Result<DemoRun> {
    require_root()?;
    let dir = scratch("attribution-demo");
    let (tls_port, app_port) = (free_port(), free_port());
    let platform = Platform::up(&dir.join("platform"), tls_port, app_port, true)?;
    let agent_dir = dir.join("agent");
    // Attribution is checked on every call the abuser makes, so nothing is blocked here (the
    // detectors still run and record; enforcement has its own tests).
    let config = demo_config(&platform)?.replace("enforce = true", "enforce = false");
    let agent = Agent::start(&agent_dir, &config)?;
    let summary_path = dir.join("traffic.json");
    let summary = traffic(
        &platform,
        &[
            "--users",
            "40",
            "--concurrency",
            "8",
            "--duration",
            "12",
            "--abuser",
            "--seed",
            "1",
            "--quiet",
        ],
        &summary_path,
    )?;
    let log = agent.log.clone();
    let records_path = agent.records.clone();
    let stats = agent.stop()?;
    let records = read_jsonl(&records_path)?;
    let dataset: Value = serde_json::from_str(&std::fs::read_to_string(
        platform.info["dataset"].as_str().unwrap_or_default(),
    )?)
    .context("dataset.json")?;
    drop(platform);
    let log = log.lock().unwrap().clone();
    Ok(DemoRun {
        tls_port,
        app_port,
        agent_dir,
        summary_path,
        summary,
        dataset,
        records,
        log,
        stats,
    })
}

// ---------------------------------------------------------------------------------------------
// Ground truth from the dataset
// ---------------------------------------------------------------------------------------------

/// The dataset's persons by id.
fn persons(dataset: &Value) -> HashMap<u64, &Value> {
    dataset["persons"]
        .as_array()
        .expect("persons in dataset.json")
        .iter()
        .map(|p| (p["id"].as_u64().expect("person id"), p))
        .collect()
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// What one 200 address-book response disclosed, worked out from the dataset the way the app's
/// `Store._public` renders persons.
#[derive(Debug, Default)]
struct Disclosure {
    /// subject id → school (embedded persons inherit the enclosing person's school).
    subjects: BTreeMap<u64, String>,
    categories: BTreeSet<&'static str>,
}

impl Disclosure {
    fn of(route: &str, returned: &[u64], persons: &HashMap<u64, &Value>) -> Disclosure {
        let mut d = Disclosure::default();
        let school = |p: &Value| p["schoolId"].as_str().unwrap_or("?").to_string();
        if route == "GET /api/addressbook/persons/{id}/photo" {
            for id in returned {
                d.subjects.insert(*id, school(persons[id]));
            }
            d.categories.insert("photo");
            return d;
        }
        for id in returned {
            let p = persons[id];
            let s = school(p);
            d.subjects.insert(*id, s.clone());
            d.categories.extend(["name", "email", "phone"]);
            let role = p["role"].as_str().unwrap_or("");
            if role == "pupil" {
                d.categories.insert("nickname");
                // guardians[*]: id, name, relation, email, phone
                for g in ids(&p["guardianIds"]) {
                    d.subjects.entry(g).or_insert_with(|| s.clone());
                }
            }
            if p["classId"].as_str().is_some_and(|c| !c.is_empty()) {
                d.categories.insert("class");
            }
            if p["hasPhoto"].as_bool() == Some(true) {
                d.categories.insert("photo");
            }
            if role == "guardian" {
                // children[*]: id, name, class
                let kids = ids(&p["childIds"]);
                if !kids.is_empty() {
                    d.categories.insert("class");
                }
                for k in kids {
                    d.subjects.entry(k).or_insert_with(|| s.clone());
                }
            }
        }
        d
    }

    /// All subject ids as strings, numerically sorted (they are all integers).
    fn sorted_ids(&self) -> Vec<String> {
        self.subjects.keys().map(u64::to_string).collect()
    }

    fn tenants(&self) -> Vec<String> {
        self.subjects
            .values()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Comparing one record with what it must say
// ---------------------------------------------------------------------------------------------

/// What a record field must hold.
enum Want {
    /// The field must not be there.
    Absent,
    /// The field must be there with this value.
    Must(Value),
    /// If the field is there, it holds this value.
    IfAny(Value),
    /// If the field is there, it is one of these.
    OneOf(Vec<Value>, bool),
}

/// Mismatches collected over many records, reported together.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn field(&mut self, what: &str, r: &Value, path: &str, want: Want) {
        let got = get(r, path);
        let bad = match &want {
            Want::Absent => (!got.is_null()).then(|| "must be absent".to_string()),
            Want::Must(w) if got.is_null() => Some(format!("missing, want {w}")),
            Want::Must(w) | Want::IfAny(w) if !got.is_null() && got != w => {
                Some(format!("want {w}"))
            }
            Want::OneOf(ws, required) => {
                if got.is_null() {
                    required.then(|| format!("missing, want one of {ws:?}"))
                } else {
                    (!ws.contains(got)).then(|| format!("want one of {ws:?}"))
                }
            }
            _ => None,
        };
        if let Some(why) = bad {
            self.0
                .push(format!("{path} = {}: {why}\n    in {what}", short(got)));
        }
    }

    fn check(&mut self, ok: bool, msg: impl FnOnce() -> String) {
        if !ok {
            self.0.push(msg());
        }
    }

    fn done(self, what: &str) -> Result<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        // Per field (a message starts with the field's path): how many, and the first two.
        let mut per: BTreeMap<&str, Vec<&String>> = BTreeMap::new();
        for m in &self.0 {
            let field = m.split([' ', ':']).next().unwrap_or("");
            per.entry(field).or_default().push(m);
        }
        let counts: BTreeMap<&str, usize> = per.iter().map(|(k, v)| (*k, v.len())).collect();
        let examples: Vec<&String> = per
            .values()
            .flat_map(|v| v.iter().take(2))
            .copied()
            .collect();
        bail!(
            "{what}: {} mismatches, per field {counts:?}; the first of each:\n  {}",
            self.0.len(),
            examples
                .iter()
                .take(16)
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n  ")
        );
    }
}

/// A value for a failure message: long arrays cut to their first elements.
fn short(v: &Value) -> Value {
    match v {
        Value::Array(a) if a.len() > 6 => {
            let mut a: Vec<Value> = a[..5].iter().map(short).collect();
            a.push(json!(format!(
                "... {} more",
                v.as_array().map_or(0, Vec::len) - 5
            )));
            Value::Array(a)
        }
        Value::Array(a) => Value::Array(a.iter().map(short).collect()),
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), short(v))).collect()),
        v => v.clone(),
    }
}

/// The attribution fields of a record, for failure messages.
fn brief(r: &Value) -> Value {
    let mut out = serde_json::Map::new();
    for f in [
        "@timestamp",
        "source.port",
        "url.path",
        "http.response.status_code",
        "sparbar.route.name",
        "user",
        "organization",
        "client",
        "related",
        "session",
        "abook",
    ] {
        let v = get(r, f);
        if !v.is_null() {
            out.insert(f.to_string(), short(v));
        }
    }
    Value::Object(out)
}

fn path_only(p: &str) -> &str {
    p.split('?').next().unwrap_or(p)
}

/// A connection's records in the order they were exchanged.
fn by_start(recs: &mut [&Value]) {
    recs.sort_by(|a, b| {
        let k = |r: &Value| {
            (
                get(r, "event.start").as_str().unwrap_or("").to_string(),
                get(r, "event.end").as_str().unwrap_or("").to_string(),
            )
        };
        k(a).cmp(&k(b))
    });
}

const ABOOK_PREFIX: &str = "GET /api/addressbook/";
const LISTS: &[&str] = &[
    "GET /api/addressbook/persons",
    "GET /api/addressbook/schools/{schoolId}/persons",
    "GET /api/addressbook/classes/{classId}/persons",
    "GET /api/addressbook/search",
];

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

/// Many concurrent users of every role, cookie and bearer, plus the abusive pupil: every request
/// at nginx has exactly one record, attributed to the right user, role, school and session, and
/// every 200 address-book response names exactly the persons, schools and kinds of data that
/// left; only the abuser's cross-school reads are flagged cross-tenant. The app hop agrees.
#[test]
fn demo_traffic_is_attributed() -> Result<()> {
    let run = demo_run()?;
    let s = &run.summary;
    let reqs = s["requests"].as_array().context("requests in summary")?;
    let tot = &s["totals"];
    ensure!(
        tot["transportErrors"] == 0
            && tot["retries"] == 0
            && tot["abusive"]["transportErrors"] == 0
            && tot["abusive"]["retries"] == 0,
        "the traffic had transport errors or retries ({tot}): its account cannot be compared \
         request by request"
    );
    let persons = persons(&run.dataset);
    let key = secret_key(&run.agent_dir)?;
    let users: HashMap<u64, &Value> = s["users"]
        .as_array()
        .context("users in summary")?
        .iter()
        .map(|u| (u["userId"].as_u64().unwrap(), u))
        .collect();
    ensure!(
        users.values().any(|u| u["credential"]["kind"] == "bearer")
            && users.values().any(|u| u["credential"]["kind"] == "cookie")
            && users.values().any(|u| u["abuser"] == true),
        "the traffic lacks cookie users, bearer users or the abuser"
    );

    // Pair every request with its record at nginx: same client port, same place on that
    // connection.
    let front = records_on_port(&run.records, run.tls_port);
    ensure!(
        front.len() == reqs.len(),
        "{} records at nginx for {} requests",
        front.len(),
        reqs.len()
    );
    let mut by_port_req: BTreeMap<u64, Vec<&Value>> = BTreeMap::new();
    for r in reqs {
        by_port_req
            .entry(r["localPort"].as_u64().context("localPort")?)
            .or_default()
            .push(r);
    }
    let mut by_port_rec: BTreeMap<u64, Vec<&Value>> = BTreeMap::new();
    for r in &front {
        by_port_rec
            .entry(get(r, "source.port").as_u64().unwrap_or(0))
            .or_default()
            .push(r);
    }
    let mut pairs: Vec<(&Value, &Value)> = Vec::new();
    let mut p = Problems::default();
    for (port, rq) in &mut by_port_req {
        rq.sort_by_key(|r| r["seq"].as_u64());
        let mut rc = by_port_rec.remove(port).unwrap_or_default();
        by_start(&mut rc);
        if rq.len() != rc.len() {
            p.0.push(format!(
                "client port {port}: {} requests {:?}, {} records {:?}",
                rq.len(),
                rq.iter().map(|r| &r["path"]).collect::<Vec<_>>(),
                rc.len(),
                rc.iter().map(|r| get(r, "url.path")).collect::<Vec<_>>()
            ));
            continue;
        }
        for (q, r) in rq.iter().zip(rc) {
            let same = get(r, "http.request.method") == &q["method"]
                && get(r, "url.path").as_str() == q["path"].as_str().map(path_only)
                && get(r, "http.response.status_code") == &q["status"];
            p.check(same, || {
                format!(
                    "client port {port}: request seq {} {} {} -> {} paired with record {}",
                    q["seq"],
                    q["method"],
                    q["path"],
                    q["status"],
                    brief(r)
                )
            });
            pairs.push((q, r));
        }
    }
    for (port, rc) in &by_port_rec {
        p.0.push(format!(
            "records from client port {port} no request was sent from: {:?}",
            rc.iter().map(|r| brief(r)).collect::<Vec<_>>()
        ));
    }
    p.done("pairing requests with records at nginx")?;

    // Each user's requests in order, to know when the agent can know what.
    let mut per_user: BTreeMap<u64, Vec<(&Value, &Value)>> = BTreeMap::new();
    for (q, r) in &pairs {
        per_user
            .entry(q["userId"].as_u64().unwrap())
            .or_default()
            .push((q, r));
    }
    let mut p = Problems::default();
    let mut cross_true = 0;
    for (uid, list) in &mut per_user {
        list.sort_by_key(|(q, _)| q["seq"].as_u64());
        let u = users[uid];
        let cred = u["credential"]["value"].as_str().unwrap_or_default();
        let kind = u["credential"]["kind"].as_str().unwrap_or_default();
        let sid = session_id(&key, cred);
        let role = u["role"].as_str().unwrap_or_default();
        let school = u["schoolId"].as_str().unwrap_or_default();
        let mut me_seen = false;
        // Persons this user has received so far (top level and embedded).
        let mut seen: BTreeSet<u64> = BTreeSet::new();
        for (q, r) in list.iter() {
            let what = format!(
                "seq {} user {uid} ({role}, {kind}) {} {} -> {} | record {}",
                q["seq"],
                q["method"],
                q["path"],
                q["status"],
                brief(r)
            );
            let route = q["route"].as_str().unwrap_or_default();
            let status = q["status"].as_u64().unwrap_or(0);
            let auth = q["auth"].as_str().unwrap_or_default();
            let carries = auth == "cookie" || auth == "bearer";
            let login = route == "POST /login" && status == 200;
            let token = route == "POST /api/token" && status == 200;
            let uid_s = json!(uid.to_string());

            p.field(&what, r, "client.ip", Want::Must(json!("127.0.0.1")));
            // Who.
            p.field(
                &what,
                r,
                "user.id",
                if carries || login {
                    Want::Must(uid_s.clone())
                } else if token {
                    Want::IfAny(uid_s.clone())
                } else {
                    Want::Absent
                },
            );
            let known_org = auth == "bearer" || (auth == "cookie" && me_seen);
            let (roles, org) = (json!([role]), json!(school));
            if known_org {
                p.field(&what, r, "user.roles", Want::Must(roles));
                p.field(&what, r, "organization.id", Want::Must(org));
            } else {
                p.field(&what, r, "user.roles", Want::IfAny(roles));
                p.field(&what, r, "organization.id", Want::IfAny(org));
            }
            // A keyed hash of the user name, on the login exchanges only.
            if login || token {
                let h = get(r, "user.hash");
                p.check(
                    h.as_str()
                        .is_some_and(|h| !h.is_empty() && h != u["username"]),
                    || {
                        format!(
                            "user.hash = {h}: want a keyed hash of the user name\n    in {what}"
                        )
                    },
                );
            } else {
                p.field(&what, r, "user.hash", Want::Absent);
            }
            // Which session.
            if carries || login || token {
                p.field(&what, r, "session.id", Want::Must(json!(sid)));
            } else {
                p.field(&what, r, "session.id", Want::Absent);
            }
            if carries {
                p.field(&what, r, "abook.session.kind", Want::Must(json!(kind)));
            } else if login || token {
                p.field(&what, r, "abook.session.kind", Want::IfAny(json!(kind)));
            }
            let source = if auth == "bearer" && route == "GET /api/me" {
                // The identity endpoint's answer names the caller as well as the token does.
                Want::OneOf(vec![json!("jwt"), json!("identity_endpoint")], true)
            } else if auth == "bearer" {
                Want::Must(json!("jwt"))
            } else if login {
                Want::Must(json!("login"))
            } else if token {
                Want::OneOf(vec![json!("login"), json!("jwt")], true)
            } else if auth == "cookie" {
                Want::OneOf(vec![json!("login"), json!("identity_endpoint")], true)
            } else {
                Want::OneOf(vec![json!("none")], false)
            };
            p.field(&what, r, "abook.identity.source", source);
            // related.user: the caller first, then the listed targets.
            let related = strs(get(r, "related.user"));
            let listed = strs(get(r, "abook.target.ids"));
            if carries || login {
                let mut want: BTreeSet<String> = listed.iter().cloned().collect();
                want.insert(uid.to_string());
                p.check(
                    related.first() == Some(&uid.to_string())
                        && related.iter().cloned().collect::<BTreeSet<_>>() == want,
                    || {
                        format!(
                            "related.user = {related:?}: want {uid} then {listed:?}\n    in {what}"
                        )
                    },
                );
            }

            // Whose data.
            let abook = route.starts_with(ABOOK_PREFIX) && status == 200;
            if !abook {
                p.field(&what, r, "abook.target", Want::Absent);
                p.field(&what, r, "abook.data_categories", Want::Absent);
                p.field(&what, r, "abook.cross_tenant", Want::Absent);
            } else {
                let returned = ids(&q["personIds"]);
                let d = Disclosure::of(route, &returned, &persons);
                let all = d.sorted_ids();
                let shown: Vec<String> = all.iter().take(100).cloned().collect();
                p.field(&what, r, "abook.target.ids", Want::Must(json!(shown)));
                p.field(&what, r, "abook.target.count", Want::Must(json!(all.len())));
                p.field(
                    &what,
                    r,
                    "abook.target.ids_omitted",
                    Want::Must(json!(all.len() - shown.len())),
                );
                p.field(
                    &what,
                    r,
                    "abook.target.digest",
                    Want::Must(json!(ids_digest(&all))),
                );
                // A photo's school is known once the agent has seen the person.
                let photo = route.ends_with("/photo");
                let tenants_known = !photo || returned.iter().all(|i| seen.contains(i));
                let tenants = json!(d.tenants());
                p.field(
                    &what,
                    r,
                    "abook.target.tenants",
                    if tenants_known {
                        Want::Must(tenants)
                    } else {
                        Want::IfAny(tenants)
                    },
                );
                p.field(
                    &what,
                    r,
                    "abook.data_categories",
                    Want::Must(json!(d.categories)),
                );
                p.field(
                    &what,
                    r,
                    "abook.result.total",
                    if LISTS.contains(&route) {
                        Want::Must(q["total"].clone())
                    } else {
                        Want::Absent
                    },
                );
                p.field(
                    &what,
                    r,
                    "abook.disclosure.status",
                    Want::Must(json!("complete")),
                );
                let cross = d.subjects.values().any(|t| t != school);
                ensure!(
                    cross == (q["abusive"] == true && q["crossSchool"] == true),
                    "test bug: the dataset says cross-school {cross} for {what}"
                );
                let has_tenants = !get(r, "abook.target.tenants").is_null();
                p.field(
                    &what,
                    r,
                    "abook.cross_tenant",
                    if (known_org && tenants_known && !d.subjects.is_empty())
                        || (has_tenants && !get(r, "organization.id").is_null())
                    {
                        Want::Must(json!(cross))
                    } else {
                        Want::IfAny(json!(cross))
                    },
                );
                if cross {
                    cross_true += 1;
                }
                seen.extend(d.subjects.keys());
            }
            p.check(
                get(r, "abook.cross_tenant") != true
                    || (q["abusive"] == true && q["crossSchool"] == true && status == 200),
                || format!("abook.cross_tenant is true on a request that is not cross-school abuse\n    in {what}"),
            );
            if route == "GET /api/me" && status == 200 {
                me_seen = true;
            }
        }
    }
    p.done("attribution at nginx")?;
    let abusive_cross = reqs
        .iter()
        .filter(|q| q["abusive"] == true && q["crossSchool"] == true && q["status"] == 200)
        .count();
    ensure!(
        abusive_cross > 0 && cross_true == abusive_cross,
        "{abusive_cross} cross-school abusive 200s, {cross_true} expected cross-tenant records"
    );

    // The app hop (behind nginx, shared upstream connections) tells the same story.
    let app = records_on_port(&run.records, run.app_port);
    ensure!(
        app.len() == reqs.len(),
        "{} records at the app for {} requests",
        app.len(),
        reqs.len()
    );
    let story = |recs: &[&Value]| {
        let mut m: BTreeMap<String, usize> = BTreeMap::new();
        for r in recs {
            let k = json!([
                get(r, "user.id"),
                get(r, "sparbar.route.name"),
                get(r, "http.response.status_code"),
                get(r, "session.id"),
                get(r, "abook.target.digest"),
            ])
            .to_string();
            *m.entry(k).or_insert(0) += 1;
        }
        m
    };
    let (f, a) = (story(&front), story(&app));
    if f != a {
        let only_f: Vec<_> = f
            .iter()
            .filter(|(k, n)| a.get(*k) != Some(n))
            .take(8)
            .collect();
        let only_a: Vec<_> = a
            .iter()
            .filter(|(k, n)| f.get(*k) != Some(n))
            .take(8)
            .collect();
        bail!(
            "the app hop's (user.id, route, status, session.id, digest) differ from nginx's:\n  \
             nginx: {only_f:?}\n  app:   {only_a:?}"
        );
    }
    no_losses(&run.stats)?;
    Ok(())
}

/// Nothing the agent writes or logs holds a password, a session cookie, a bearer token, or a
/// name, e-mail address or phone number of anyone in the dataset.
#[test]
fn no_secrets_or_personal_data_in_outputs() -> Result<()> {
    let run = demo_run()?;
    let needles = Needles::new(&run.dataset, &run.summary)?;

    // The search finds what it looks for: the summary lists every kind of secret, the dataset
    // every kind of personal data.
    let summary_text = std::fs::read_to_string(&run.summary_path)?;
    let hits = needles.find(&summary_text);
    for kind in ["password", "session cookie", "bearer token"] {
        ensure!(
            hits.iter().any(|(k, _)| *k == kind),
            "self-check: the search finds no {kind} in the traffic summary"
        );
    }
    let hits = needles.find(&run.dataset.to_string());
    for kind in ["name", "e-mail address", "phone number"] {
        ensure!(
            hits.iter().any(|(k, _)| *k == kind),
            "self-check: the search finds no {kind} in the dataset"
        );
    }

    let mut files = Vec::new();
    walk(&run.agent_dir, &mut files)?;
    ensure!(
        files.iter().any(|f| f.ends_with("access.jsonl")),
        "no access.jsonl under {}",
        run.agent_dir.display()
    );
    let mut found = Vec::new();
    for f in &files {
        if f.file_name().is_some_and(|n| n == "secret.key") {
            continue;
        }
        let bytes = std::fs::read(f)?;
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        // JSON may escape what it holds (\u00e5, \/): search the decoded strings too.
        text.push('\n');
        text.push_str(&json_strings(&String::from_utf8_lossy(&bytes)));
        for (kind, what) in needles.find(&text) {
            found.push(format!("{}: {kind} {what:?}", f.display()));
        }
    }
    for (kind, what) in needles.find(&run.log.join("\n")) {
        found.push(format!("agent log: {kind} {what:?}"));
    }
    found.sort();
    found.dedup();
    ensure!(
        found.is_empty(),
        "{} secrets or personal data in the agent's outputs (files: {:?}); the first:\n  {}",
        found.len(),
        files,
        found
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    Ok(())
}

/// What must never be in the agent's outputs, with what kind of thing each is.
struct Needles {
    ac: AhoCorasick,
    what: Vec<(&'static str, String)>,
}

impl Needles {
    fn new(dataset: &Value, summary: &Value) -> Result<Needles> {
        let mut what: Vec<(&'static str, String)> = Vec::new();
        for a in dataset["accounts"].as_array().context("accounts")? {
            what.push(("password", a["password"].as_str().unwrap_or("").into()));
        }
        for p in dataset["persons"].as_array().context("persons")? {
            what.push(("name", p["name"].as_str().unwrap_or("").into()));
            what.push(("e-mail address", p["email"].as_str().unwrap_or("").into()));
            what.push(("phone number", p["phone"].as_str().unwrap_or("").into()));
        }
        let secrets = &summary["secretsSeen"];
        for c in strs(&secrets["sessionCookies"]) {
            what.push(("session cookie", c));
        }
        for t in strs(&secrets["bearerTokens"]) {
            what.push(("bearer token", t));
        }
        for u in summary["users"].as_array().context("users")? {
            let kind = match u["credential"]["kind"].as_str() {
                Some("cookie") => "session cookie",
                Some("bearer") => "bearer token",
                _ => continue,
            };
            what.push((kind, u["credential"]["value"].as_str().unwrap_or("").into()));
        }
        what.retain(|(_, s)| s.len() >= 6);
        what.sort();
        what.dedup();
        ensure!(
            what.iter().filter(|(k, _)| *k == "session cookie").count() > 0
                && what.iter().filter(|(k, _)| *k == "bearer token").count() > 0,
            "the traffic summary lists no session cookies or bearer tokens"
        );
        let ac = AhoCorasick::new(what.iter().map(|(_, s)| s.as_str()))?;
        Ok(Needles { ac, what })
    }

    /// (kind, the needle) of every needle found in `text`.
    fn find(&self, text: &str) -> Vec<(&'static str, String)> {
        let mut out: BTreeSet<(&'static str, String)> = BTreeSet::new();
        for m in self.ac.find_overlapping_iter(text) {
            out.insert(self.what[m.pattern().as_usize()].clone());
        }
        out.into_iter().collect()
    }
}

/// Every file under `dir`.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e?;
        if e.file_type()?.is_dir() {
            walk(&e.path(), out)?;
        } else {
            out.push(e.path());
        }
    }
    Ok(())
}

/// The keys and string values of a JSON document or of JSON lines, one a line.
fn json_strings(text: &str) -> String {
    fn collect(v: &Value, out: &mut String) {
        match v {
            Value::String(s) => {
                out.push_str(s);
                out.push('\n');
            }
            Value::Array(a) => a.iter().for_each(|v| collect(v, out)),
            Value::Object(m) => {
                for (k, v) in m {
                    out.push_str(k);
                    out.push('\n');
                    collect(v, out);
                }
            }
            _ => {}
        }
    }
    let mut out = String::new();
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        collect(&v, &mut out);
    } else {
        for l in text.lines() {
            if let Ok(v) = serde_json::from_str::<Value>(l) {
                collect(&v, &mut out);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Identity learning, one mechanism at a time, with curl
// ---------------------------------------------------------------------------------------------

/// The `[identity]` table every reduced configuration keeps.
const IDENTITY_BASE: &str = r#"
[identity]
session_cookies = ["skolsid"]
bearer = true
session_ttl = "12h"
trusted_proxies = ["127.0.0.1/32", "::1/128"]
# nginx appends the real client to X-Forwarded-For; a client's own Forwarded is never believed.
client_ip_header = "X-Forwarded-For"
logout_routes = ["auth.logout"]
"#;
const LOGIN: &str = r#"
[[identity.login]]
route = "auth.login"
username = "username"
user_id = "$.userId"
"#;
const ENDPOINT: &str = r#"
[[identity.endpoint]]
route = "identity.me"
user_id = "$.id"
role = "$.role"
tenant = "$.schoolId"
"#;
const JWT: &str = r#"
[identity.jwt]
user = "sub"
tenant = "school"
role = "role"
hs256_secret_file = "@JWT_SECRET_FILE@"
"#;

/// The demo configuration with its identity tables replaced by `identity`.
fn reduced_config(platform: &Platform, identity: &[&str]) -> Result<String> {
    let mut out = String::new();
    let mut skip = false;
    for line in demo_config(platform)?.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            let name = t.trim_matches(|c| c == '[' || c == ']').trim();
            skip = name == "identity" || name.starts_with("identity.");
        }
        if !skip {
            out.push_str(line);
            out.push('\n');
        }
    }
    ensure!(
        !out.contains("[identity") && out.contains("[disclosure]"),
        "could not take the identity tables out of the demo configuration"
    );
    out.push_str(IDENTITY_BASE);
    for t in identity {
        out.push_str(t);
    }
    Ok(out.replace(
        "@JWT_SECRET_FILE@",
        &jwt_secret_file(platform)?.display().to_string(),
    ))
}

/// The platform for one curl test, and a person with an account to act as.
struct Site {
    platform: Platform,
    tls_port: u16,
    app_port: u16,
    url: String,
    dataset: Value,
}

impl Site {
    fn up(name: &str) -> Result<(PathBuf, Site)> {
        require_root()?;
        let dir = scratch(name);
        let (tls_port, app_port) = (free_port(), free_port());
        let platform = Platform::up(&dir.join("platform"), tls_port, app_port, true)?;
        let dataset = serde_json::from_str(&std::fs::read_to_string(
            platform.info["dataset"].as_str().unwrap_or_default(),
        )?)?;
        Ok((
            dir,
            Site {
                platform,
                tls_port,
                app_port,
                url: format!("https://127.0.0.1:{tls_port}"),
                dataset,
            },
        ))
    }

    /// The first account of this role in `school`: (user id, user name, password, school).
    fn account(&self, role: &str, school: &str) -> Result<(u64, String, String, String)> {
        let a = self.dataset["accounts"]
            .as_array()
            .context("accounts")?
            .iter()
            .find(|a| a["role"] == role && a["schoolId"] == school)
            .with_context(|| format!("no {role} account in {school}"))?;
        let s = |k: &str| a[k].as_str().unwrap_or_default().to_string();
        Ok((
            a["userId"].as_u64().unwrap_or(0),
            s("username"),
            s("password"),
            s("schoolId"),
        ))
    }

    /// curl with the platform's certificate; fails on HTTP errors; returns the body.
    fn curl(&self, args: &[&str]) -> Result<String> {
        output(
            Command::new("curl")
                .args(["-sS", "--fail", "--cacert", &self.platform.cert()])
                .args(args),
        )
    }

    /// POST /login (form) with a cookie jar; returns the session cookie's value.
    fn login(&self, jar: &Path, user: &str, password: &str) -> Result<String> {
        let jar_s = jar.display().to_string();
        self.curl(&[
            "-c",
            &jar_s,
            "--data-urlencode",
            &format!("username={user}"),
            "--data-urlencode",
            &format!("password={password}"),
            &format!("{}/login", self.url),
        ])?;
        // Netscape format; HttpOnly cookies are prefixed `#HttpOnly_`.
        std::fs::read_to_string(jar)?
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l
                    .strip_prefix("#HttpOnly_")
                    .unwrap_or(l)
                    .split('\t')
                    .collect();
                (f.len() == 7 && f[5] == "skolsid").then(|| f[6].to_string())
            })
            .next_back()
            .context("curl's cookie jar holds no skolsid cookie after POST /login")
    }

    fn get_with_cookie(&self, jar: &Path, path: &str) -> Result<String> {
        self.curl(&[
            "-b",
            &jar.display().to_string(),
            &format!("{}{path}", self.url),
        ])
    }

    /// The records of one hop, in order.
    fn hop<'a>(&self, records: &'a [Value], port: u16) -> Vec<&'a Value> {
        let mut v = records_on_port(records, port);
        by_start(&mut v);
        v
    }
}

/// The records at nginx are exactly `paths` in order, and the app hop's attribution agrees.
fn front_records<'a>(site: &Site, records: &'a [Value], paths: &[&str]) -> Result<Vec<&'a Value>> {
    let front = site.hop(records, site.tls_port);
    let got: Vec<&str> = front
        .iter()
        .map(|r| get(r, "url.path").as_str().unwrap_or("?"))
        .collect();
    ensure!(
        got == paths,
        "records at nginx for {got:?}, expected {paths:?}: {:?}",
        front.iter().map(|r| brief(r)).collect::<Vec<_>>()
    );
    let app = site.hop(records, site.app_port);
    let att = |r: &Value| {
        json!([
            get(r, "url.path"),
            get(r, "user.id"),
            get(r, "user.roles"),
            get(r, "organization.id"),
            get(r, "session.id"),
            get(r, "abook.identity.source")
        ])
    };
    let (f, a): (Vec<Value>, Vec<Value>) = (
        front.iter().map(|r| att(r)).collect(),
        app.iter().map(|r| att(r)).collect(),
    );
    ensure!(
        f == a,
        "the app hop attributes differently from nginx:\n  nginx: {f:?}\n  app:   {a:?}"
    );
    Ok(front)
}

/// The identity fields one record must carry: user, role and school (None: absent), source.
fn attributed(
    what: &str,
    r: &Value,
    user: Option<u64>,
    role_school: Option<(&str, &str)>,
    source: &str,
    session: &str,
) -> Result<()> {
    let mut p = Problems::default();
    let what = format!("{what}: record {}", brief(r));
    match user {
        Some(u) => p.field(&what, r, "user.id", Want::Must(json!(u.to_string()))),
        None => p.field(&what, r, "user.id", Want::Absent),
    }
    match role_school {
        Some((role, school)) => {
            p.field(&what, r, "user.roles", Want::Must(json!([role])));
            p.field(&what, r, "organization.id", Want::Must(json!(school)));
        }
        None => {
            p.field(&what, r, "user.roles", Want::Absent);
            p.field(&what, r, "organization.id", Want::Absent);
        }
    }
    p.field(&what, r, "abook.identity.source", Want::Must(json!(source)));
    p.field(&what, r, "session.id", Want::Must(json!(session)));
    p.done("identity")
}

/// Only the login exchange teaches the agent who holds a cookie: the login and the reads after
/// it name the user.
#[test]
fn identity_from_login() -> Result<()> {
    let (dir, site) = Site::up("attr-login")?;
    let (uid, user, pw, school) = site.account("teacher", "sch-02")?;
    let agent_dir = dir.join("agent");
    let agent = Agent::start(&agent_dir, &reduced_config(&site.platform, &[LOGIN])?)?;
    let jar = dir.join("cookies.txt");
    let cookie = site.login(&jar, &user, &pw)?;
    let a = format!("/api/addressbook/persons/{uid}");
    let b = format!("/api/addressbook/schools/{school}/persons");
    site.get_with_cookie(&jar, &a)?;
    site.get_with_cookie(&jar, &format!("{b}?page=1&pageSize=5"))?;
    agent.stop()?;
    let records = read_jsonl(&agent_dir.join("access.jsonl"))?;
    let sid = session_id(&secret_key(&agent_dir)?, &cookie);
    let front = front_records(&site, &records, &["/login", &a, &b])?;
    for (i, r) in front.iter().enumerate() {
        attributed(&format!("request {i}"), r, Some(uid), None, "login", &sid)?;
    }
    ensure!(
        get(front[0], "user.hash")
            .as_str()
            .is_some_and(|h| !h.is_empty() && h != user),
        "the login record has no keyed user.hash: {}",
        brief(front[0])
    );
    Ok(())
}

/// The agent never saw the login: a cookie it does not know is "unknown" until the identity
/// endpoint's response names its holder.
#[test]
fn identity_from_me_endpoint() -> Result<()> {
    let (dir, site) = Site::up("attr-me")?;
    let (uid, user, pw, school) = site.account("pupil", "sch-03")?;
    let jar = dir.join("cookies.txt");
    let cookie = site.login(&jar, &user, &pw)?;
    let agent_dir = dir.join("agent");
    let agent = Agent::start(&agent_dir, &reduced_config(&site.platform, &[ENDPOINT])?)?;
    let a = format!("/api/addressbook/persons/{uid}");
    site.get_with_cookie(&jar, &a)?;
    let me: Value = serde_json::from_str(&site.get_with_cookie(&jar, "/api/me")?)?;
    ensure!(me["id"] == uid, "/api/me answered {me}");
    site.get_with_cookie(&jar, &a)?;
    agent.stop()?;
    let records = read_jsonl(&agent_dir.join("access.jsonl"))?;
    let sid = session_id(&secret_key(&agent_dir)?, &cookie);
    let front = front_records(&site, &records, &[&a, "/api/me", &a])?;
    attributed("before /api/me", front[0], None, None, "unknown", &sid)?;
    attributed(
        "after /api/me",
        front[2],
        Some(uid),
        Some(("pupil", &school)),
        "identity_endpoint",
        &sid,
    )?;
    Ok(())
}

/// Bearer tokens carry their holder in their claims: no login or endpoint learning needed.
#[test]
fn identity_from_jwt() -> Result<()> {
    let (dir, site) = Site::up("attr-jwt")?;
    let (uid, user, pw, school) = site.account("guardian", "sch-04")?;
    let agent_dir = dir.join("agent");
    let agent = Agent::start(&agent_dir, &reduced_config(&site.platform, &[JWT])?)?;
    let body = json!({"username": user, "password": pw}).to_string();
    let tok: Value = serde_json::from_str(&site.curl(&[
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        &body,
        &format!("{}/api/token", site.url),
    ])?)?;
    let token = tok["access_token"]
        .as_str()
        .context("no access_token")?
        .to_string();
    let bearer = format!("Authorization: Bearer {token}");
    let a = format!("/api/addressbook/persons/{uid}");
    let b = format!("/api/addressbook/schools/{school}/persons");
    site.curl(&["-H", &bearer, &format!("{}{a}", site.url)])?;
    site.curl(&["-H", &bearer, &format!("{}{b}?pageSize=3", site.url)])?;
    agent.stop()?;
    let records = read_jsonl(&agent_dir.join("access.jsonl"))?;
    let sid = session_id(&secret_key(&agent_dir)?, &token);
    let front = front_records(&site, &records, &["/api/token", &a, &b])?;
    for (i, r) in front[1..].iter().enumerate() {
        attributed(
            &format!("bearer request {i}"),
            r,
            Some(uid),
            Some(("guardian", &school)),
            "jwt",
            &sid,
        )?;
        ensure!(
            get(r, "abook.session.kind") == "bearer",
            "abook.session.kind in {}",
            brief(r)
        );
    }
    Ok(())
}

/// What the agent learned about a session survives a restart on the same state directory.
#[test]
fn session_map_survives_restart() -> Result<()> {
    let (dir, site) = Site::up("attr-restart")?;
    let (uid, user, pw, school) = site.account("principal", "sch-05")?;
    let agent_dir = dir.join("agent");
    let cfg = reduced_config(&site.platform, &[LOGIN, ENDPOINT])?;
    let a = Agent::start(&agent_dir, &cfg)?;
    let jar = dir.join("cookies.txt");
    let cookie = site.login(&jar, &user, &pw)?;
    site.get_with_cookie(&jar, "/api/me")?;
    a.stop()?;
    let b = Agent::start(&agent_dir, &cfg)?;
    let path = format!("/api/addressbook/persons/{uid}");
    site.get_with_cookie(&jar, &path)?;
    b.stop()?;
    let records = read_jsonl(&agent_dir.join("access.jsonl"))?;
    let sid = session_id(&secret_key(&agent_dir)?, &cookie);
    let after: Vec<&Value> = site
        .hop(&records, site.tls_port)
        .into_iter()
        .filter(|r| get(r, "url.path") == path.as_str())
        .collect();
    ensure!(
        after.len() == 1,
        "{} records at nginx for GET {path} after the restart",
        after.len()
    );
    let r = after[0];
    let source = get(r, "abook.identity.source")
        .as_str()
        .unwrap_or("")
        .to_string();
    ensure!(
        source == "login" || source == "identity_endpoint",
        "after the restart abook.identity.source = {source:?}: want what agent A learned: {}",
        brief(r)
    );
    attributed(
        "after the restart",
        r,
        Some(uid),
        Some(("principal", &school)),
        &source,
        &sid,
    )
}
