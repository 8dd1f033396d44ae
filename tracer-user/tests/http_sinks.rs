//! The HTTP sinks against local stand-ins of Loki, Elasticsearch and an OTLP collector
//! (`tests/receivers/http_sinks.py`, Python's standard library), driven the way the delivery
//! worker drives a destination: send; on a whole-batch retry wait (the receiver's `Retry-After`,
//! capped for tests) and send again; resend what an `Outcome` hands back; collect what is
//! rejected. Every produced `event.id` must arrive or be rejected with the right reason, with
//! exact counts; timing claims are checked on the receiver's own clock (when it answered 429
//! with `Retry-After`, when the retry arrived), not on the test's.
//!
//! Needs `python3` (3.11) and, for the TLS test, `openssl` on PATH: they fail, naming what is
//! missing, when those are absent.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use sparbar::{
    config::{HttpSinkConfig, TlsClientConfig},
    record::rfc3339_micros,
    ship::{
        chain, elastic::ElasticDest, http::rfc3339_unix_ns, loki::LokiDest, otlp::OtlpDest,
        BatchLimits, Destination, Line, SendError, Stream,
    },
};

/// Longest wait honoured between attempts in these tests (the worker's cap is 600 s).
const WAIT_CAP: Duration = Duration::from_secs(3);
/// Each test's deadline for delivering everything.
const DEADLINE: Duration = Duration::from_secs(25);

struct Receiver {
    child: Child,
    _stdin: ChildStdin,
    data: u16,
    admin: u16,
    agent: ureq::Agent,
}

impl Receiver {
    fn start(kind: &str, tls: Option<&Pki>) -> Receiver {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/receivers/http_sinks.py");
        let mut cmd = Command::new("python3");
        cmd.arg(&script).args(["--kind", kind]);
        if let Some(p) = tls {
            cmd.arg("--cert").arg(p.file("server.pem"));
            cmd.arg("--key").arg(p.file("server.key"));
            cmd.arg("--client-ca").arg(p.file("ca.pem"));
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start python3 {}: {e}; these tests need python3 (3.11) on PATH",
                    script.display()
                )
            });
        let stdin = child.stdin.take().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let parts: Vec<&str> = line.split_whitespace().collect();
        assert!(
            parts.len() == 3 && parts[0] == "READY",
            "the {kind} receiver did not start (said {line:?}); see its stderr above"
        );
        Receiver {
            child,
            _stdin: stdin,
            data: parts[1].parse().unwrap(),
            admin: parts[2].parse().unwrap(),
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into(),
        }
    }

    fn url(&self, scheme: &str) -> String {
        format!("{scheme}://127.0.0.1:{}", self.data)
    }

    fn admin(&self, path: &str, body: Value) {
        let mut r = self
            .agent
            .post(format!("http://127.0.0.1:{}{path}", self.admin))
            .header("content-type", "application/json")
            .send(body.to_string())
            .unwrap();
        assert_eq!(
            r.status(),
            200,
            "{}",
            r.body_mut().read_to_string().unwrap()
        );
    }

    fn received(&self) -> Value {
        let mut r = self
            .agent
            .get(format!("http://127.0.0.1:{}/received", self.admin))
            .call()
            .unwrap();
        serde_json::from_str(
            &r.body_mut()
                .with_config()
                .limit(64 << 20)
                .read_to_string()
                .unwrap(),
        )
        .unwrap()
    }

    /// `event.id` → times stored.
    fn stored(&self) -> BTreeMap<String, u64> {
        self.received()["records"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, r)| r["stored"].as_u64().unwrap() > 0)
            .map(|(k, r)| (k.clone(), r["stored"].as_u64().unwrap()))
            .collect()
    }

    /// The data requests, in arrival order.
    fn requests(&self) -> Vec<Value> {
        self.received()["requests"].as_array().unwrap().clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http(url: String) -> HttpSinkConfig {
    HttpSinkConfig {
        url,
        tls: TlsClientConfig::default(),
        gzip: true,
        headers: vec![],
        timeout: Duration::from_secs(5),
    }
}

const T0: u64 = 1_700_000_000_000_000_000;

/// A sealed record of `stream` (sequence `seq`, id `id`), with `extra` fields merged in.
fn record(stream: Stream, seq: u64, id: &str, extra: Value) -> Line {
    let mut v = json!({
        "@timestamp": rfc3339_micros(T0 + seq * 1_000_000),
        "event": {"id": id, "kind": "event", "dataset": format!("sparbar.{}", stream.name())},
        "host": {"name": "web-1"},
        "user": {"id": "alice"},
    });
    if let (Value::Object(m), Value::Object(x)) = (&mut v, extra) {
        for (k, val) in x {
            m.insert(k, val);
        }
    }
    let raw = serde_json::to_vec(&v).unwrap();
    Line {
        stream,
        seq,
        bytes: chain::seal(&raw, stream, seq, &chain::ZERO_HASH),
    }
}

fn records(stream: Stream, seqs: std::ops::Range<u64>, prefix: &str) -> Vec<Line> {
    seqs.map(|s| record(stream, s, &format!("{prefix}-{s}"), json!({})))
        .collect()
}

fn id_of(l: &Line) -> String {
    let v: Value = serde_json::from_slice(&l.bytes).unwrap();
    v["event"]["id"].as_str().unwrap().to_string()
}

#[derive(Debug, Default)]
struct Driven {
    /// `event.id` → reason.
    rejected: BTreeMap<String, String>,
    /// Reasons of whole-batch retries, in order.
    retries: Vec<String>,
    /// Records handed back in `Outcome::retry`.
    resent: Vec<String>,
}

/// What the worker does with a destination, for `batches` one after the other.
fn drive(dest: &mut dyn Destination, batches: Vec<Vec<Line>>) -> Driven {
    let until = Instant::now() + DEADLINE;
    let mut out = Driven::default();
    for batch in batches {
        let mut pending = batch;
        loop {
            assert!(
                Instant::now() < until,
                "not delivered within {DEADLINE:?}: {out:?}"
            );
            match dest.send(&pending) {
                Ok(o) => {
                    let rej: BTreeSet<usize> = o.rejected.iter().map(|(i, _)| *i).collect();
                    let retry: BTreeSet<usize> = o.retry.iter().copied().collect();
                    assert_eq!(
                        rej.len(),
                        o.rejected.len(),
                        "an index rejected twice: {o:?}"
                    );
                    assert_eq!(retry.len(), o.retry.len(), "an index to retry twice: {o:?}");
                    assert!(rej.is_disjoint(&retry), "rejected and to retry: {o:?}");
                    assert!(rej.iter().chain(&retry).all(|i| *i < pending.len()));
                    for (i, r) in &o.rejected {
                        out.rejected.insert(id_of(&pending[*i]), r.clone());
                    }
                    if o.retry.is_empty() {
                        break;
                    }
                    pending = pending
                        .into_iter()
                        .enumerate()
                        .filter(|(i, _)| retry.contains(i))
                        .map(|(_, l)| l)
                        .collect();
                    out.resent.extend(pending.iter().map(id_of));
                    std::thread::sleep(
                        o.retry_after
                            .unwrap_or(Duration::from_millis(50))
                            .min(WAIT_CAP),
                    );
                }
                Err(SendError::Reject { reason }) => {
                    for l in &pending {
                        out.rejected.insert(id_of(l), reason.clone());
                    }
                    break;
                }
                Err(SendError::Retry { reason, after }) => {
                    out.retries.push(reason);
                    std::thread::sleep(after.unwrap_or(Duration::from_millis(100)).min(WAIT_CAP));
                }
            }
        }
    }
    out
}

fn ids(batches: &[Vec<Line>]) -> BTreeSet<String> {
    batches.iter().flat_map(|b| ids_of(b)).collect()
}

fn ids_of(lines: &[Line]) -> BTreeSet<String> {
    lines.iter().map(id_of).collect()
}

fn once(ids: &BTreeSet<String>) -> BTreeMap<String, u64> {
    ids.iter().map(|i| (i.clone(), 1)).collect()
}

fn loki(url: String, gzip: bool) -> LokiDest {
    let mut h = http(url);
    h.gzip = gzip;
    h.headers = vec![("X-Scope-OrgID".into(), "tenant-1".into())];
    let labels = BTreeMap::from([
        ("job".to_string(), "sparbar".to_string()),
        ("env".to_string(), "test".to_string()),
    ]);
    LokiDest::new("loki", &h, &labels, BatchLimits::default()).unwrap()
}

#[test]
fn loki_push_labels_timestamps_gzip_and_headers() {
    let rcv = Receiver::start("loki", None);
    let mut d = loki(rcv.url("http"), true);
    let batches = vec![
        records(Stream::Security, 1..6, "al"),
        records(Stream::Access, 1..11, "ev"),
        records(Stream::Access, 11..21, "ev"),
        records(Stream::Access, 21..31, "ev"),
    ];
    let want = ids(&batches);
    let lines: BTreeMap<String, Line> = batches
        .iter()
        .flatten()
        .map(|l| (id_of(l), l.clone()))
        .collect();
    let got = drive(&mut d, batches);
    assert!(got.rejected.is_empty() && got.retries.is_empty(), "{got:?}");
    assert_eq!(rcv.stored(), once(&want));
    let recs = rcv.received()["records"].clone();
    for (id, l) in &lines {
        let r = &recs[id];
        // Static labels plus the stream; nothing from the record (its user.id) is a label.
        assert_eq!(
            r["labels"],
            json!({"job": "sparbar", "env": "test", "stream": l.stream.name()}),
            "{id}"
        );
        let v: Value = serde_json::from_slice(&l.bytes).unwrap();
        let ns = rfc3339_unix_ns(v["@timestamp"].as_str().unwrap()).unwrap();
        assert_eq!(r["ts"], ns.to_string(), "{id}");
        assert_eq!(r["line"].as_str().unwrap().as_bytes(), &l.bytes[..], "{id}");
    }
    let reqs = rcv.requests();
    assert_eq!(reqs.len(), 4);
    for q in &reqs {
        assert_eq!(q["path"], "/loki/api/v1/push");
        assert_eq!(q["content_encoding"], "gzip");
        assert_eq!(q["content_type"], "application/json");
        assert_eq!(q["headers"]["x-scope-orgid"], "tenant-1");
        assert_eq!(q["status"], 204);
    }
}

/// The receiver's answer times and the next request's arrival, on its own clock.
fn gaps_after(reqs: &[Value], status: u64) -> Vec<(f64, String)> {
    reqs.windows(2)
        .filter(|w| w[0]["status"] == status)
        .map(|w| {
            let gap = w[1]["t_in"].as_f64().unwrap() - w[0]["t_out"].as_f64().unwrap();
            (gap, w[0]["retry_after"].as_str().unwrap_or("").to_string())
        })
        .collect()
}

#[test]
fn loki_429_retry_after_is_waited_for_in_seconds_and_as_a_date() {
    let rcv = Receiver::start("loki", None);
    rcv.admin(
        "/faults",
        json!({"status": 429, "count": 2, "retry_after": "1"}),
    );
    rcv.admin(
        "/faults",
        json!({"status": 429, "count": 1, "retry_after": "date:2"}),
    );
    let mut d = loki(rcv.url("http"), false);
    let batches = vec![records(Stream::Access, 1..6, "ev")];
    let want = ids(&batches);
    let got = drive(&mut d, batches);
    assert!(got.rejected.is_empty(), "{got:?}");
    assert_eq!(got.retries.len(), 3, "{got:?}");
    assert!(
        got.retries
            .iter()
            .all(|r| r.contains("loki is rate limiting (429)")),
        "{got:?}"
    );
    assert_eq!(rcv.stored(), once(&want));
    let reqs = rcv.requests();
    let statuses: Vec<u64> = reqs.iter().map(|q| q["status"].as_u64().unwrap()).collect();
    assert_eq!(statuses, vec![429, 429, 429, 204]);
    let gaps = gaps_after(&reqs, 429);
    assert_eq!(gaps.len(), 3);
    for (gap, ra) in &gaps[..2] {
        assert_eq!(ra, "1");
        assert!(
            *gap >= 1.0,
            "retried {gap:.3}s after a 429 with Retry-After: 1"
        );
    }
    // An HTTP-date 2 s ahead, at one-second resolution: at least 1 s away when it was sent.
    let (gap, ra) = &gaps[2];
    assert!(ra.ends_with(" GMT"), "{ra}");
    assert!(
        *gap >= 1.0,
        "retried {gap:.3}s after a 429 with Retry-After: {ra}"
    );
}

#[test]
fn loki_400_dead_letters_only_the_refused_entries() {
    let rcv = Receiver::start("loki", None);
    rcv.admin("/config", json!({"marker": "POISON"}));
    let mut d = loki(rcv.url("http"), true);
    let batch: Vec<Line> = (1..21)
        .map(|s| {
            let extra = if s == 7 || s == 13 {
                json!({"note": "POISON"})
            } else {
                json!({})
            };
            record(Stream::Access, s, &format!("ev-{s}"), extra)
        })
        .collect();
    let got = drive(&mut d, vec![batch.clone()]);
    let bad: BTreeSet<String> = ["ev-7".to_string(), "ev-13".to_string()].into();
    assert_eq!(
        got.rejected.keys().cloned().collect::<BTreeSet<_>>(),
        bad,
        "{got:?}"
    );
    for r in got.rejected.values() {
        assert!(
            r.starts_with("loki refused the entry (400): entry with timestamp"),
            "{r}"
        );
        assert!(
            r.contains("Max entry size") && r.contains("total ignored: 1 out of 1"),
            "{r}"
        );
    }
    let good: BTreeSet<String> = batch
        .iter()
        .map(id_of)
        .filter(|i| !bad.contains(i))
        .collect();
    // Loki stores the valid entries of a refused push and drops exact duplicates on resend.
    assert_eq!(rcv.stored(), once(&good));
    let first = &rcv.requests()[0];
    assert_eq!(first["status"], 400);
    assert_eq!(first["ids"].as_array().unwrap().len(), 20);
}

#[test]
fn loki_survives_503s_and_an_outage() {
    let rcv = Receiver::start("loki", None);
    rcv.admin("/faults", json!({"status": 503, "count": 2}));
    let mut d = loki(rcv.url("http"), true);
    let first = vec![records(Stream::Security, 1..4, "al")];
    let got = drive(&mut d, first.clone());
    assert_eq!(got.retries.len(), 2, "{got:?}");
    assert!(
        got.retries.iter().all(|r| r.contains("loki answered 503")),
        "{got:?}"
    );
    // Down for 1.5 s: refused connections (and the kept-alive one cut off) are retried.
    rcv.admin("/down", json!({"seconds": 1.5}));
    let second = vec![records(Stream::Access, 1..11, "ev")];
    let got = drive(&mut d, second.clone());
    assert!(got.rejected.is_empty(), "{got:?}");
    assert!(
        got.retries.iter().any(|r| r.contains("connection refused")),
        "expected a refused connection while the receiver was down: {got:?}"
    );
    let mut all = ids(&first);
    all.extend(ids(&second));
    assert_eq!(rcv.stored(), once(&all));
}

fn elastic(url: String, gzip: bool) -> ElasticDest {
    let mut h = http(url);
    h.gzip = gzip;
    h.headers = vec![("Authorization".into(), "ApiKey c2VjcmV0".into())];
    ElasticDest::new("es", &h, "sparbar-{stream}", BatchLimits::default()).unwrap()
}

#[test]
fn elastic_create_409_item_retries_and_rejects() {
    let rcv = Receiver::start("elastic", None);
    // ev-2 and ev-3 are already in the index; the first two items get 429; ev-5 is unmappable.
    rcv.admin(
        "/config",
        json!({"preload": ["ev-2", "ev-3"], "item_429": 2, "marker": "UNMAPPABLE"}),
    );
    let mut d = elastic(rcv.url("http"), true);
    let batch: Vec<Line> = (0..10)
        .map(|s| {
            let extra = if s == 5 {
                json!({"marker": "UNMAPPABLE"})
            } else {
                json!({})
            };
            record(Stream::Access, s + 1, &format!("ev-{s}"), extra)
        })
        .collect();
    let got = drive(&mut d, vec![batch.clone()]);
    assert!(got.retries.is_empty(), "{got:?}");
    // Only the two items answered 429 were sent again.
    assert_eq!(got.resent, vec!["ev-0".to_string(), "ev-1".to_string()]);
    let reqs = rcv.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0]["ids"].as_array().unwrap().len(), 10);
    assert_eq!(reqs[1]["ids"], json!(["ev-0", "ev-1"]));
    for q in &reqs {
        assert!(q["path"]
            .as_str()
            .unwrap()
            .starts_with("/_bulk?filter_path="));
        assert_eq!(q["content_type"], "application/x-ndjson");
        assert_eq!(q["content_encoding"], "gzip");
        assert_eq!(q["headers"]["authorization"], "ApiKey c2VjcmV0");
    }
    assert_eq!(got.rejected.len(), 1, "{got:?}");
    let reason = &got.rejected["ev-5"];
    assert!(
        reason.starts_with("elasticsearch refused the record (400): mapper_parsing_exception: failed to parse field [marker]"),
        "{reason}"
    );
    assert!(
        reason.contains("caused by illegal_argument_exception"),
        "{reason}"
    );
    let stored: BTreeSet<String> = ["ev-0", "ev-1", "ev-4", "ev-6", "ev-7", "ev-8", "ev-9"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(rcv.stored(), once(&stored));
    // The 409s were delivered, and counted.
    assert_eq!(d.duplicates(), 2);
    let recs = rcv.received()["records"].clone();
    assert_eq!(recs["ev-0"]["index"], "sparbar-access");

    // The same batch again (a redelivery after a restart): every stored one is a 409, delivered.
    let got = drive(&mut d, vec![batch]);
    assert_eq!(got.rejected.keys().collect::<Vec<_>>(), vec!["ev-5"]);
    assert!(got.resent.is_empty() && got.retries.is_empty(), "{got:?}");
    assert_eq!(d.duplicates(), 2 + 9);
    assert_eq!(rcv.stored(), once(&stored));
}

#[test]
fn elastic_413_splits_and_rejects_only_a_record_too_large_alone() {
    let rcv = Receiver::start("elastic", None);
    let max = 3000;
    rcv.admin("/config", json!({"max_body": max}));
    let mut d = elastic(rcv.url("http"), false);
    let pad = "p".repeat(200);
    let mut batch: Vec<Line> = (1..17)
        .map(|s| record(Stream::Security, s, &format!("al-{s}"), json!({"pad": pad})))
        .collect();
    batch.insert(
        9,
        record(
            Stream::Security,
            99,
            "al-huge",
            json!({"pad": "h".repeat(4000)}),
        ),
    );
    let got = drive(&mut d, vec![batch.clone()]);
    assert!(got.retries.is_empty() && got.resent.is_empty(), "{got:?}");
    assert_eq!(got.rejected.keys().collect::<Vec<_>>(), vec!["al-huge"]);
    assert!(
        got.rejected["al-huge"].contains("too large (413)"),
        "{got:?}"
    );
    let good: BTreeSet<String> = batch.iter().map(id_of).filter(|i| i != "al-huge").collect();
    assert_eq!(rcv.stored(), once(&good));
    for q in rcv.requests() {
        if q["status"] == 200 {
            assert!(q["wire_bytes"].as_u64().unwrap() <= max);
        } else {
            assert_eq!(q["status"], 413);
        }
    }
}

#[test]
fn elastic_401_is_retried_and_says_credentials() {
    let rcv = Receiver::start("elastic", None);
    rcv.admin("/faults", json!({"status": 401, "count": 1}));
    let mut d = elastic(rcv.url("http"), true);
    let batch = records(Stream::Access, 1..4, "ev");
    match d.send(&batch) {
        Err(SendError::Retry { reason, .. }) => {
            assert!(
                reason.contains("401") && reason.contains("credentials"),
                "{reason}"
            );
            assert!(reason.contains("security_exception"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let got = drive(&mut d, vec![batch.clone()]);
    assert!(got.rejected.is_empty(), "{got:?}");
    assert_eq!(rcv.stored(), once(&ids_of(&batch)));
}

fn otlp(url: String) -> OtlpDest {
    OtlpDest::new("otel", &http(url), BatchLimits::default()).unwrap()
}

#[test]
fn otlp_export_fields_partial_success_and_errors() {
    let rcv = Receiver::start("otlp", None);
    let mut d = otlp(format!("{}/v1/logs", rcv.url("http")));

    // The request as the collector reads it.
    let security = vec![
        record(
            Stream::Security,
            1,
            "al-1",
            json!({"event": {"id": "al-1", "kind": "alert"}}),
        ),
        record(
            Stream::Security,
            2,
            "de-2",
            json!({"event": {"id": "de-2", "kind": "event"}}),
        ),
    ];
    let got = drive(&mut d, vec![security.clone()]);
    assert!(got.rejected.is_empty() && got.retries.is_empty(), "{got:?}");
    let recs = rcv.received()["records"].clone();
    for l in &security {
        let id = id_of(l);
        let o = &recs[&id]["otlp"];
        assert_eq!(
            o["resource"],
            json!({"service.name": "sparbar", "host.name": "web-1"})
        );
        assert_eq!(o["scope"], "sparbar");
        assert_eq!(
            o["attributes"],
            json!({"event.id": id, "event.sequence": l.seq.to_string(), "sparbar.stream": "security"})
        );
        assert_eq!(o["timeUnixNano"], (T0 + l.seq * 1_000_000).to_string());
        assert!(o["observedTimeUnixNano"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .is_ok());
        assert_eq!(o["line"].as_str().unwrap().as_bytes(), &l.bytes[..]);
    }
    assert_eq!(recs["al-1"]["otlp"]["severityText"], "WARN");
    assert_eq!(recs["al-1"]["otlp"]["severityNumber"], 13);
    assert_eq!(recs["de-2"]["otlp"]["severityText"], "INFO");
    assert_eq!(recs["de-2"]["otlp"]["severityNumber"], 9);
    let q = &rcv.requests()[0];
    assert_eq!(q["path"], "/v1/logs");
    assert_eq!(q["content_type"], "application/json");
    assert_eq!(q["content_encoding"], "gzip");

    // Partial success: 1 of 5 refused, which one unsaid: all 5 dead-lettered as "possibly",
    // never retried (the spec forbids it), and the receiver has the other 4.
    rcv.admin("/config", json!({"marker": "REFUSE-ME"}));
    let access: Vec<Line> = (1..6)
        .map(|s| {
            let extra = if s == 3 {
                json!({"note": "REFUSE-ME"})
            } else {
                json!({})
            };
            record(Stream::Access, s, &format!("ev-{s}"), extra)
        })
        .collect();
    let before = rcv.requests().len();
    let got = drive(&mut d, vec![access.clone()]);
    assert_eq!(
        rcv.requests().len(),
        before + 1,
        "a partial success is not retried"
    );
    assert_eq!(
        got.rejected.keys().cloned().collect::<BTreeSet<_>>(),
        ids_of(&access)
    );
    for r in got.rejected.values() {
        assert!(
            r.starts_with("possibly rejected: the otlp receiver rejected 1 of the 5 records"),
            "{r}"
        );
        assert!(
            r.contains("the other 4 were accepted") && r.contains("REFUSE-ME"),
            "{r}"
        );
    }
    let stored = rcv.stored();
    for l in &access {
        let id = id_of(l);
        assert_eq!(
            stored.get(&id).copied(),
            if l.seq == 3 { None } else { Some(1) },
            "{id}"
        );
    }
    rcv.admin("/config", json!({"marker": null}));

    // 500 is permanent in OTLP: rejected, not retried.
    rcv.admin("/faults", json!({"status": 500, "count": 1}));
    let c = records(Stream::Access, 10..13, "c");
    let got = drive(&mut d, vec![c.clone()]);
    assert!(got.retries.is_empty(), "{got:?}");
    assert_eq!(got.rejected.len(), 3);
    assert!(got
        .rejected
        .values()
        .all(|r| r.contains("answered 500 (permanent") && r.contains("injected 500")));

    // 503 with Retry-After: retried after the wait, then delivered.
    rcv.admin(
        "/faults",
        json!({"status": 503, "count": 1, "retry_after": "1"}),
    );
    let e = records(Stream::Access, 20..23, "e");
    let got = drive(&mut d, vec![e.clone()]);
    assert!(got.rejected.is_empty(), "{got:?}");
    assert_eq!(got.retries.len(), 1);
    let reqs = rcv.requests();
    let gaps = gaps_after(&reqs, 503);
    assert_eq!(gaps.len(), 1);
    assert!(
        gaps[0].0 >= 1.0,
        "retried {:.3}s after Retry-After: 1",
        gaps[0].0
    );
    for l in &e {
        assert_eq!(rcv.stored()[&id_of(l)], 1);
    }
}

/// A CA, a server certificate for 127.0.0.1 and `receiver.test`, and a client certificate,
/// made by openssl for this test.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let p = Pki { dir };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        p.openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=sparbar test CA",
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ],
            ]
            .concat(),
        );
        for (name, cn, ext) in [
            ("server", "receiver.test", "subjectAltName=IP:127.0.0.1,DNS:receiver.test\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n"),
            ("client", "sparbar-agent", "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n"),
        ] {
            std::fs::write(p.file(&format!("{name}.ext")), ext).unwrap();
            let subj = format!("/CN={cn}");
            let (key, csr, pem, extf) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("{name}.ext"));
            p.openssl(&[&["req"][..], &ec, &["-keyout", &key, "-out", &csr, "-subj", &subj]].concat());
            p.openssl(&["x509", "-req", "-in", &csr, "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", &pem, "-days", "2", "-extfile", &extf]);
        }
        p
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run openssl: {e}; the TLS test needs openssl on PATH")
            });
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

#[test]
fn https_with_the_custom_ca_works_and_fails_clearly_without_it() {
    let pki = Pki::new();
    let rcv = Receiver::start("loki", Some(&pki));
    let labels = BTreeMap::from([("job".to_string(), "sparbar".to_string())]);
    let tls = |ca: bool, client: bool, server_name: Option<&str>| TlsClientConfig {
        ca: ca.then(|| pki.file("ca.pem")),
        server_name: server_name.map(str::to_string),
        cert: client.then(|| pki.file("client.pem")),
        key: client.then(|| pki.file("client.key")),
    };
    let dest = |t: TlsClientConfig| {
        let mut h = http(rcv.url("https"));
        h.tls = t;
        LokiDest::new("loki", &h, &labels, BatchLimits::default()).unwrap()
    };

    // The private CA and a client certificate: delivered, and the receiver saw who we are.
    let mut d = dest(tls(true, true, None));
    let a = records(Stream::Security, 1..4, "al");
    let got = drive(&mut d, vec![a.clone()]);
    assert!(got.rejected.is_empty() && got.retries.is_empty(), "{got:?}");
    assert_eq!(rcv.stored(), once(&ids_of(&a)));
    assert_eq!(rcv.requests()[0]["client_cert"], "sparbar-agent");

    // Without the CA (the system's roots): refused, saying what to set.
    let mut d = dest(tls(false, true, None));
    match d.send(&records(Stream::Access, 1..2, "x")) {
        Err(SendError::Retry { reason, .. }) => {
            assert!(reason.contains("certificate was not accepted"), "{reason}");
            assert!(reason.contains("set ca ="), "{reason}");
            assert!(reason.contains("UnknownIssuer"), "{reason}");
        }
        other => panic!("expected a TLS failure, got {other:?}"),
    }

    // server_name: the certificate is checked against receiver.test, the connection goes to
    // the url's address.
    let mut d = dest(tls(true, true, Some("receiver.test")));
    let b = records(Stream::Access, 1..3, "ev");
    let got = drive(&mut d, vec![b.clone()]);
    assert!(got.rejected.is_empty() && got.retries.is_empty(), "{got:?}");
    let last = rcv.requests().last().unwrap().clone();
    assert_eq!(
        last["headers"]["host"],
        format!("receiver.test:{}", rcv.data)
    );
    // A name the certificate does not carry is refused.
    let mut d = dest(tls(true, true, Some("other.test")));
    assert!(
        matches!(d.send(&b), Err(SendError::Retry { reason, .. }) if reason.contains("certificate"))
    );

    // The receiver requires a client certificate: without one the handshake fails (retried).
    let mut d = dest(tls(true, false, None));
    assert!(matches!(d.send(&b), Err(SendError::Retry { .. })));
    let mut all = ids_of(&a);
    all.extend(ids_of(&b));
    assert_eq!(rcv.stored(), once(&all));
}
