//! Replay: raw kernel events captured from a real run (nginx TLS in front of the demo app,
//! `sparbar run --tap-events`) go through the whole userspace path without a kernel: decode,
//! reassembly, HTTP, routes, records. The records must be exactly those the live agent wrote.

use std::{
    collections::BTreeSet,
    path::Path,
    sync::{Arc, RwLock},
};

use serde_json::{json, Value};
use sparbar::{
    agent::{
        commit::{commit, KernelSide, Trail},
        Plan,
    },
    attribute::attribution::{Attributor, Keyer},
    capture::decode,
    config,
    exchange::Tuple,
    pipeline::{self, Pipeline},
    stats::Stats,
};

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn events() -> Vec<decode::Event> {
    events_of(&std::fs::read(fixture("nginx-demo.events")).unwrap())
}

/// The records of a `--tap-events` file: a little-endian u32 length, then the raw record.
fn events_of(raw: &[u8]) -> Vec<decode::Event> {
    let mut out = Vec::new();
    let mut p = 0;
    while p + 4 <= raw.len() {
        let n = u32::from_le_bytes(raw[p..p + 4].try_into().unwrap()) as usize;
        out.push(decode::decode(&raw[p + 4..p + 4 + n]).expect("fixture record decodes"));
        p += 4 + n;
    }
    assert_eq!(p, raw.len(), "fixture ends mid-record");
    out
}

fn run(events: impl IntoIterator<Item = decode::Event>) -> (Vec<Value>, Arc<Stats>) {
    let text = std::fs::read_to_string(fixture("nginx-demo.toml")).unwrap();
    let cfg = config::parse(&text, "nginx-demo.toml").unwrap();
    let plan = Plan::from_config(&cfg).unwrap();
    let stats = Arc::new(Stats::default());
    let mut p = Pipeline::new(
        plan.pipeline,
        Arc::new(RwLock::new(Default::default())),
        stats.clone(),
    );
    let mut fx = p.handle(events);
    fx.extend(p.finish());
    let recs = fx
        .access
        .iter()
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    (recs, stats)
}

/// The fields the live agent's records are compared on (ids, times and process names differ
/// between a live run and a replay).
fn project(recs: &[Value]) -> Vec<Value> {
    let mut v: Vec<Value> = recs
        .iter()
        .map(|r| {
            json!({
                "server_port": r["server"]["port"], "method": r["http"]["request"]["method"],
                "path": r["url"]["path"], "query": r["url"]["query"],
                "status": r["http"]["response"]["status_code"],
                "request_bytes": r["http"]["request"]["body"]["bytes"],
                "response_bytes": r["http"]["response"]["body"]["bytes"],
                "route": r["sparbar"]["route"]["name"], "complete": r["sparbar"]["capture"]["complete"],
                "tls": r.get("tls").is_some(),
            })
        })
        .collect();
    v.sort_by_key(|x| x.to_string());
    v
}

fn expected() -> Vec<Value> {
    let mut v: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(fixture("nginx-demo.expected.json")).unwrap(),
    )
    .unwrap();
    v.sort_by_key(|x| x.to_string());
    v
}

#[test]
fn replay_gives_the_live_records() {
    let (recs, stats) = run(events());
    assert_eq!(project(&recs), expected());
    assert_eq!(stats.get("exchanges_parsed_total"), 14);
    for r in &recs {
        sparbar::record::check_fields(r).unwrap();
    }
}

/// Events of different connections interleaved differently (each connection's own order kept)
/// give the same records: nothing depends on what other connections do.
#[test]
fn replay_is_independent_of_interleaving() {
    let evs = events();
    let mut by_conn: std::collections::BTreeMap<String, Vec<decode::Event>> = Default::default();
    for ev in evs {
        let key = match &ev {
            decode::Event::Data { conn, .. }
            | decode::Event::Hole { conn, .. }
            | decode::Event::ConnOpen { conn, .. }
            | decode::Event::ConnClose { conn, .. } => format!("{conn:?}"),
            _ => "proc".into(),
        };
        by_conn.entry(key).or_default().push(ev);
    }
    // Connection after connection, in reverse order of their ids.
    let serial: Vec<decode::Event> = by_conn.into_values().rev().flatten().collect();
    let (recs, _) = run(serial);
    assert_eq!(project(&recs), expected());
}

/// The kernel side as the commit sees it, with nothing behind it: every action is remembered.
/// Resets find the connection gone, as in the live run the fixture was made from (curl had
/// closed its connection by the time the block came).
#[derive(Default)]
struct FakeKernel {
    actions: Vec<pipeline::Action>,
    procs: Vec<pipeline::ProcChange>,
}

impl KernelSide for FakeKernel {
    type Error = std::convert::Infallible;
    fn enforcing(&self) -> bool {
        true
    }
    fn block_conn(&mut self, t: Tuple) -> Result<(), Self::Error> {
        self.actions.push(pipeline::Action::BlockConn {
            tuple: t,
            decision: String::new(),
        });
        Ok(())
    }
    fn unblock_conn(&mut self, t: Tuple) -> Result<(), Self::Error> {
        self.actions
            .push(pipeline::Action::UnblockConn { tuple: t });
        Ok(())
    }
    fn reset_conn(&mut self, _: Tuple) -> Result<bool, Self::Error> {
        Ok(false)
    }
    fn block_token(&mut self, hash: u64) -> Result<(), Self::Error> {
        self.actions.push(pipeline::Action::BlockToken {
            hash,
            decision: String::new(),
        });
        Ok(())
    }
    fn unblock_token(&mut self, hash: u64) -> Result<(), Self::Error> {
        self.actions.push(pipeline::Action::UnblockToken { hash });
        Ok(())
    }
    fn session_tenant(&mut self, hash: u64, tenant: u64) -> Result<(), Self::Error> {
        self.actions
            .push(pipeline::Action::SessionTenant { hash, tenant });
        Ok(())
    }
    fn process_changed(&mut self, c: pipeline::ProcChange) {
        self.procs.push(c);
    }
}

/// The audit trail and decision file, kept in memory.
#[derive(Default)]
struct FakeTrail {
    access: Vec<Value>,
    security: Vec<Value>,
    decisions: Vec<sparbar::detect::decide::Decisions>,
}

impl Trail for FakeTrail {
    fn write(&mut self, access: &mut Vec<Vec<u8>>, security: &mut Vec<Vec<u8>>) {
        let parse = |l: Vec<u8>| serde_json::from_slice::<Value>(&l).unwrap();
        self.access.extend(access.drain(..).map(parse));
        self.security.extend(security.drain(..).map(parse));
    }
    fn decisions(&mut self, changed: Option<sparbar::detect::decide::Decisions>) {
        self.decisions.extend(changed);
    }
}

/// The incident, recorded live (tests/tests/fixtures.rs): a pupil of sch-01 logs in, reads its
/// own school's address book, then sch-02's by changing the parameter. Its raw kernel events go
/// through the whole userspace path and the commit, with the kernel and the trail faked: out
/// come exactly the alert, the decision and the kernel actions the live agent took, and the
/// live agent's security records.
#[test]
fn incident_replay_alerts_decides_and_blocks_without_root() {
    let raw = std::fs::read(fixture("incident.events")).unwrap();
    let text = std::fs::read_to_string(fixture("incident.toml")).unwrap();
    let cfg = config::parse(&text, "incident.toml").unwrap();
    let plan = Plan::from_config(&cfg).unwrap();
    let live: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("incident.live.json")).unwrap())
            .unwrap();
    let evs = events_of(&raw);
    // nginx is the edge (`detection.services`): discovery would name the processes that
    // accepted on the TLS port so.
    let tls_port = live["tls_port"].as_u64().unwrap() as u16;
    let services: std::collections::HashMap<u32, String> = evs
        .iter()
        .filter_map(|e| match e {
            decode::Event::ConnOpen { conn, tuple, .. } if tuple.local_port == tls_port => {
                Some((conn.tgid, "nginx".to_string()))
            }
            _ => None,
        })
        .collect();
    assert!(
        !services.is_empty(),
        "no connection to nginx in the fixture"
    );
    let stats = Arc::new(Stats::default());
    let mut p = Pipeline::new(
        plan.pipeline,
        Arc::new(RwLock::new(services)),
        stats.clone(),
    );
    let mut attributor = Attributor::new(plan.identity, Keyer::new([7; 32]));
    // The kernel's token hashes are on (its seed is random per load; any seed does here).
    attributor.set_token_seed(0x5eed);
    p.set_attributor(attributor);
    let (mut kernel, mut trail) = (FakeKernel::default(), FakeTrail::default());
    // Batches as the reader hands them out; the commit after each, as the agent loop does.
    for batch in evs.chunks(64) {
        let fx = p.handle(batch.iter().cloned());
        commit(&mut p, fx, &mut kernel, &mut trail, &stats);
    }
    let fx = p.finish();
    commit(&mut p, fx, &mut kernel, &mut trail, &stats);

    let pupil = live["pupil"].to_string();
    let project = |r: &Value| {
        json!({
            "dataset": r["event"]["dataset"], "action": r["event"]["action"],
            "rule": r["rule"]["id"], "user": r["user"]["id"],
            "scope": r["abook"]["decision"]["scope"], "value": r["abook"]["decision"]["value"],
            "enforcement": r["abook"]["decision"]["enforcement"],
        })
    };
    let got: Vec<Value> = trail.security.iter().map(project).collect();
    assert_eq!(got, live["security"].as_array().unwrap().clone());
    assert_eq!(
        got.len(),
        3,
        "one alert, one block_start, one block_enforced"
    );

    // Exactly one cross-tenant call at nginx; the alert names it as its evidence and the
    // decision names it as the call that fired.
    let cross: Vec<&Value> = trail
        .access
        .iter()
        .filter(|r| {
            r["abook"]["cross_tenant"] == json!(true)
                && r["server"]["port"].as_u64() == Some(tls_port as u64)
        })
        .collect();
    assert_eq!(cross.len(), 1, "cross-tenant calls at nginx");
    let call = cross[0]["event"]["id"].clone();
    let (alert, decision) = (&trail.security[0], &trail.security[1]);
    let did = decision["abook"]["decision"]["id"].as_str().unwrap();
    assert_eq!(alert["user"]["id"].as_str(), Some(pupil.as_str()));
    // The evidence: the pupil's address-book calls at nginx, its own school's page and then
    // the cross-tenant one.
    let abook_at_edge: Vec<Value> = trail
        .access
        .iter()
        .filter(|r| {
            r["server"]["port"].as_u64() == Some(tls_port as u64)
                && r["sparbar"]["route"]["name"] == json!("abook.persons.query")
        })
        .map(|r| r["event"]["id"].clone())
        .collect();
    assert_eq!(abook_at_edge.len(), 2);
    assert_eq!(abook_at_edge[1], call);
    assert_eq!(
        alert["abook"]["evidence"]["event_ids"],
        json!(abook_at_edge)
    );
    assert_eq!(decision["abook"]["decision"]["alert_event_id"], call);

    // The kernel was asked for exactly this: the pupil's session token and login name refused
    // in requests, its connection's answers dropped (reset found it gone), and the connection
    // unblocked when it closed. Nothing else.
    let kinds: Vec<&str> = kernel
        .actions
        .iter()
        .map(|a| match a {
            pipeline::Action::BlockConn { .. } => "block_conn",
            pipeline::Action::UnblockConn { .. } => "unblock_conn",
            pipeline::Action::BlockToken { .. } => "block_token",
            pipeline::Action::UnblockToken { .. } => "unblock_token",
            pipeline::Action::SessionTenant { .. } => "session_tenant",
        })
        .collect();
    assert_eq!(
        kinds,
        ["block_token", "block_token", "block_conn", "unblock_conn"]
    );
    let tokens: BTreeSet<u64> = kernel
        .actions
        .iter()
        .filter_map(|a| match a {
            pipeline::Action::BlockToken { hash, .. } => Some(*hash),
            _ => None,
        })
        .collect();
    assert_eq!(tokens.len(), 2, "two distinct tokens");
    let blocked = kernel.actions.iter().find_map(|a| match a {
        pipeline::Action::BlockConn { tuple, .. } => Some(*tuple),
        _ => None,
    });
    // The blocked connection is the one the cross-tenant call came on.
    let blocked = blocked.unwrap();
    assert_eq!(
        (
            cross[0]["server"]["port"].as_u64(),
            cross[0]["source"]["port"].as_u64()
        ),
        (
            Some(blocked.local.port() as u64),
            Some(blocked.peer.port() as u64)
        )
    );
    // The decision file was written with the block in force.
    let last = trail.decisions.last().expect("decisions saved");
    assert_eq!(last.active.len(), 1);
    assert_eq!(last.active[0].id, did);
    assert_eq!(stats.get("enforcement_connections_gone_total"), 1);
    assert_eq!(stats.get("enforcement_tokens_blocked_total"), 2);
}

/// The incident again, but the agent never learns the pupil's school (no identity endpoint
/// names it: a scraper that never calls `/api/me`). No answer can be called cross-tenant, yet
/// the cross-tenant rule still fires, on the same call, because the pupil's answers span two
/// schools; and the pupil is blocked the same way.
#[test]
fn incident_replay_without_the_callers_school_still_fires() {
    let raw = std::fs::read(fixture("incident.events")).unwrap();
    let text = std::fs::read_to_string(fixture("incident.toml")).unwrap();
    let endpoint =
        "route = \"identity.me\"\nuser_id = \"$.id\"\nrole = \"$.role\"\ntenant = \"$.schoolId\"\n";
    assert!(text.contains(endpoint), "the fixture's identity endpoint");
    let text = text.replace(
        endpoint,
        "route = \"identity.me\"\nuser_id = \"$.id\"\nrole = \"$.role\"\n",
    );
    let cfg = config::parse(&text, "incident.toml").unwrap();
    let plan = Plan::from_config(&cfg).unwrap();
    let live: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("incident.live.json")).unwrap())
            .unwrap();
    let evs = events_of(&raw);
    let tls_port = live["tls_port"].as_u64().unwrap() as u16;
    let services: std::collections::HashMap<u32, String> = evs
        .iter()
        .filter_map(|e| match e {
            decode::Event::ConnOpen { conn, tuple, .. } if tuple.local_port == tls_port => {
                Some((conn.tgid, "nginx".to_string()))
            }
            _ => None,
        })
        .collect();
    let stats = Arc::new(Stats::default());
    let mut p = Pipeline::new(
        plan.pipeline,
        Arc::new(RwLock::new(services)),
        stats.clone(),
    );
    let mut attributor = Attributor::new(plan.identity, Keyer::new([7; 32]));
    attributor.set_token_seed(0x5eed);
    p.set_attributor(attributor);
    let (mut kernel, mut trail) = (FakeKernel::default(), FakeTrail::default());
    for batch in evs.chunks(64) {
        let fx = p.handle(batch.iter().cloned());
        commit(&mut p, fx, &mut kernel, &mut trail, &stats);
    }
    let fx = p.finish();
    commit(&mut p, fx, &mut kernel, &mut trail, &stats);

    let edge_abook: Vec<&Value> = trail
        .access
        .iter()
        .filter(|r| {
            r["server"]["port"].as_u64() == Some(tls_port as u64)
                && r["sparbar"]["route"]["name"] == json!("abook.persons.query")
        })
        .collect();
    assert_eq!(edge_abook.len(), 2);
    // The school is unknown: no record says cross-tenant, none has an organization.
    assert!(edge_abook
        .iter()
        .all(|r| r["abook"]["cross_tenant"].is_null() && r["organization"].is_null()));
    let schools: Vec<Value> = edge_abook
        .iter()
        .map(|r| r["abook"]["target"]["tenants"].clone())
        .collect();
    assert_eq!(schools, [json!(["sch-01"]), json!(["sch-02"])]);

    let pupil = live["pupil"].to_string();
    let alerts: Vec<&Value> = trail
        .security
        .iter()
        .filter(|r| r["event"]["dataset"] == json!("sparbar.alert"))
        .collect();
    assert_eq!(alerts.len(), 1);
    let a = &alerts[0];
    assert_eq!(
        (
            a["rule"]["id"].as_str(),
            a["user"]["id"].as_str(),
            a["abook"]["alert"]["metric"].as_str(),
            a["abook"]["alert"]["value"].as_f64(),
            a["abook"]["alert"]["foreign_tenants"].clone()
        ),
        (
            Some("cross-tenant"),
            Some(pupil.as_str()),
            Some("tenants_spanned"),
            Some(2.0),
            json!(["sch-01", "sch-02"])
        )
    );
    let second = edge_abook[1]["event"]["id"].clone();
    assert_eq!(
        a["abook"]["evidence"]["event_ids"]
            .as_array()
            .unwrap()
            .last(),
        Some(&second)
    );
    let starts: Vec<&Value> = trail
        .security
        .iter()
        .filter(|r| r["event"]["action"] == json!("block_start"))
        .collect();
    assert_eq!(starts.len(), 1);
    assert_eq!(
        (
            starts[0]["abook"]["decision"]["scope"].as_str(),
            starts[0]["abook"]["decision"]["value"].as_str(),
            starts[0]["abook"]["decision"]["alert_event_id"].clone()
        ),
        (Some("user"), Some(pupil.as_str()), second)
    );
}
