//! What the agent says about itself: the periodic counters line and `stats.json`, the
//! Prometheus page, and the answer to `sparbar status`.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use log::{info, warn};
use tracer_common::{COUNTER_NAMES, LOSS_COUNTERS};

use crate::{
    capture::discovery::Discovery,
    capture::loader::Kernel,
    pipeline::Pipeline,
    ship::shipper::Shipper,
    stats::{self, Metric, Stats},
};

/// Logs the counters (one line, drops called out) and writes `<state_dir>/stats.json`.
pub fn report(
    kernel: &Kernel,
    d: &Discovery,
    stats: &Stats,
    started: Instant,
    open_conns: usize,
    last: bool,
) -> serde_json::Value {
    let k = kernel.counters();
    let kernel_map = kernel_counters(&k);
    let agent = stats.snapshot();
    let losses: Vec<String> = losses(&k, &agent)
        .into_iter()
        .map(|(n, v)| format!("{n}={v}"))
        .collect();
    let records = records_spooled(&agent);
    info!(
        "{}stats: kernel events {} ({} payload bytes), exchanges {}, records {}, open connections {}, losses: {}",
        if last { "final " } else { "" },
        k[tracer_common::C_EVENTS_SENT as usize],
        k[tracer_common::C_BYTES_CAPTURED as usize],
        agent.get(Metric::ExchangesParsed.name()).copied().unwrap_or(0),
        records,
        open_conns,
        if losses.is_empty() { "none".to_string() } else { losses.join(", ") }
    );
    let libs: Vec<serde_json::Value> = d
        .libraries()
        .into_iter()
        .map(|l| serde_json::json!({"path": l.path, "kind": l.kind, "attached": l.attached, "errors": l.errors}))
        .collect();
    let doc = serde_json::json!({
        "uptime_seconds": started.elapsed().as_secs_f64(),
        "final": last,
        "kernel": kernel_map,
        "agent": agent,
        "tracepoints": kernel.tracepoints,
        "libraries": libs,
        "targets": d.procs.values().map(|p| serde_json::json!({"pid": p.pid, "name": p.name, "executable": p.executable})).collect::<Vec<_>>(),
    });
    doc
}

/// The kernel's counters by name, as in `stats.json`.
fn kernel_counters(k: &[u64]) -> BTreeMap<String, u64> {
    k.iter()
        .enumerate()
        .filter(|(i, _)| COUNTER_NAMES.get(*i).is_some_and(|n| !n.is_empty()))
        .map(|(i, v)| (COUNTER_NAMES[i].to_string(), *v))
        .collect()
}

/// Every loss counter above zero, the kernel's first.
fn losses(k: &[u64], agent: &BTreeMap<String, u64>) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = LOSS_COUNTERS
        .iter()
        .filter(|&&i| k[i as usize] > 0)
        .map(|&i| (COUNTER_NAMES[i as usize].to_string(), k[i as usize]))
        .collect();
    out.extend(
        agent
            .iter()
            .filter(|(n, v)| **v > 0 && stats::is_loss(n))
            .map(|(n, v)| (n.clone(), *v)),
    );
    out
}

/// Records written to the spool, both streams.
pub fn records_spooled(agent: &BTreeMap<String, u64>) -> u64 {
    agent
        .iter()
        .filter(|(n, _)| n.starts_with(Metric::RecordsSpooled.name()))
        .map(|(_, v)| *v)
        .sum()
}

/// How far back `sparbar status` rates look.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);

/// Renders the Prometheus page from the agent's state; names that cannot be exposed are logged
/// once each.
pub fn metrics_page(
    kernel: &Kernel,
    d: &Discovery,
    p: &Pipeline,
    shipper: &Shipper,
    agent: &BTreeMap<String, u64>,
    started: Instant,
    warned: &mut BTreeSet<String>,
) -> String {
    use crate::ops::metrics::{Inputs, Library};
    let kernel_map = kernel_counters(&kernel.counters());
    let libs = d.libraries();
    let usage = shipper.usage();
    let mut targets: BTreeMap<&str, u64> =
        d.targets().iter().map(|t| (t.name.as_str(), 0)).collect();
    for proc_ in d.procs.values() {
        if let Some(t) = proc_.target.and_then(|t| d.targets().get(t)) {
            *targets.entry(t.name.as_str()).or_default() += 1;
        }
    }
    let mut decisions_active: BTreeMap<&str, u64> = BTreeMap::new();
    for dec in &p.decisions().active {
        *decisions_active.entry(dec.scope.as_str()).or_default() += 1;
    }
    let spool_bytes = usage["streams"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(s, v)| (s.clone(), v["bytes"].as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    let (page, bad) = crate::ops::metrics::build(&Inputs {
        uptime: started.elapsed(),
        version: env!("CARGO_PKG_VERSION"),
        agent,
        kernel: &kernel_map,
        libraries: libs
            .iter()
            .map(|l| Library {
                path: &l.path,
                kind: l.kind,
                attached: l.attached.len(),
                failed: l.errors.len(),
            })
            .collect(),
        tracepoints: kernel
            .tracepoints
            .iter()
            .map(|(n, e)| (n.as_str(), e.is_none()))
            .collect(),
        targets,
        open_connections: p.open_connections() as u64,
        decisions_active,
        spool_bytes,
        spool_max_bytes: usage["max_bytes"].as_u64().unwrap_or(0),
        security_pending: usage["security_pending"].as_u64().unwrap_or(0),
    });
    for (name, e) in bad {
        if warned.insert(name) {
            warn!("metrics: not exposed: {e}");
        }
    }
    page
}

/// The answer to `sparbar status`: what is traced, how fast, and what is lost or waiting.
pub fn status(
    kernel: &Kernel,
    d: &Discovery,
    p: &Pipeline,
    shipper: &Shipper,
    stats: &Stats,
    rates: &crate::ops::metrics::Rates,
    started: Instant,
) -> serde_json::Value {
    use serde_json::json;
    let k = kernel.counters();
    let agent = stats.snapshot();
    let libs = d.libraries();
    let mut procs: Vec<_> = d.procs.values().collect();
    procs.sort_by_key(|p| p.pid);
    let targets: Vec<serde_json::Value> = procs
        .iter()
        .map(|proc_| {
            let spec = proc_.target.and_then(|t| d.targets().get(t));
            // The libraries mapped in this process now (and its executable, for static OpenSSL).
            let maps = std::fs::read_to_string(format!("/proc/{}/maps", proc_.pid)).unwrap_or_default();
            let mapped: BTreeSet<&str> = maps
                .lines()
                .filter_map(|l| l.split_whitespace().nth(5))
                .collect();
            let tls: Vec<serde_json::Value> = libs
                .iter()
                .filter(|l| {
                    mapped.contains(l.path.as_str())
                        || proc_.executable.as_deref() == Some(l.path.as_str())
                })
                .map(|l| json!({"path": l.path, "kind": l.kind, "probes": l.attached, "errors": l.errors}))
                .collect();
            json!({
                "pid": proc_.pid,
                "name": proc_.name,
                "executable": proc_.executable,
                "target": spec.map(|s| s.name.as_str()),
                "tls": spec.is_some_and(|s| s.tls),
                "tls_libraries": tls,
            })
        })
        .collect();
    let (exchanges_ps, records_ps, window) = rates.rates();
    let failed: BTreeMap<&str, &str> = kernel
        .tracepoints
        .iter()
        .filter_map(|(n, e)| e.as_deref().map(|e| (n.as_str(), e)))
        .collect();
    json!({
        "ok": true,
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "uptime_seconds": started.elapsed().as_secs_f64(),
        "targets": targets,
        "libraries": libs.iter().map(|l| json!({"path": l.path, "kind": l.kind, "probes": l.attached, "errors": l.errors})).collect::<Vec<_>>(),
        "tracepoints": {"attached": kernel.tracepoints.len() - failed.len(), "failed": failed},
        "rates": {"window_seconds": window, "exchanges_per_second": exchanges_ps, "records_per_second": records_ps},
        "exchanges_parsed_total": agent.get(Metric::ExchangesParsed.name()).copied().unwrap_or(0),
        "records_spooled_total": records_spooled(&agent),
        "open_connections": p.open_connections(),
        "decisions_open": p.decisions().active.len(),
        "spool": shipper.usage(),
        "sink_lag": shipper.lag(),
        "losses": losses(&k, &agent).into_iter().collect::<BTreeMap<_, _>>(),
    })
}

/// `<state_dir>/stats.json`: the report, with the spool's figures when there are any.
pub fn write_stats(
    state_dir: &std::path::Path,
    doc: &serde_json::Value,
    spool: Option<serde_json::Value>,
) {
    let mut doc = doc.clone();
    doc["spool"] = spool.unwrap_or(serde_json::Value::Null);
    let path = state_dir.join("stats.json");
    let tmp = state_dir.join("stats.json.tmp");
    let res = std::fs::write(&tmp, serde_json::to_vec_pretty(&doc).unwrap_or_default())
        .and_then(|_| std::fs::rename(&tmp, &path));
    if let Err(e) = res {
        warn!("writing {}: {e}", path.display());
    }
}
