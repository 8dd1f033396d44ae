//! Replay: raw kernel events captured from a real run (nginx TLS in front of the demo app,
//! `sparbar run --tap-events`) go through the whole userspace path without a kernel: decode,
//! reassembly, HTTP, routes, records. The records must be exactly those the live agent wrote.

use std::{
    path::Path,
    sync::{Arc, RwLock},
};

use serde_json::{json, Value};
use sparbar::{agent::Plan, config, decode, pipeline::Pipeline, stats::Stats};

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn events() -> Vec<decode::Event> {
    let raw = std::fs::read(fixture("nginx-demo.events")).unwrap();
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
