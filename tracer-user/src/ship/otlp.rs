//! OpenTelemetry: OTLP/HTTP logs in the JSON encoding (`POST` to the configured `/v1/logs` URL,
//! `Content-Type: application/json`, optionally gzipped).
//!
//! One `resourceLogs` per `host.name` of the records (normally one: the agent's), with
//! `service.name = "sparbar"`; one `scopeLogs` with `scope.name = "sparbar"`; one `logRecords`
//! entry per record: `timeUnixNano` from `@timestamp`, `observedTimeUnixNano` from
//! `event.created` (else the time it is sent), both as strings (the JSON mapping of 64-bit
//! integers); `severityNumber`/`severityText` WARN (13) for alerts (`event.kind = "alert"`),
//! INFO (9) for the rest; `body.stringValue` the sealed line; attributes `event.id`,
//! `event.sequence` and `sparbar.stream`.
//!
//! Answers, as the OTLP specification says: 2xx is success; 429, 502, 503 and 504 are retried
//! (honouring `Retry-After`); every other 4xx/5xx is permanent, so the batch is rejected with the
//! receiver's `Status.message` — except what an operator can fix (401, 403, 404, a redirect),
//! which the agent retries rather than dead-letter an audit trail over an expired token, and
//! 413, which halves the batch (a single record still too large is rejected).
//!
//! **Partial success.** A 2xx whose `partialSuccess.rejectedLogRecords` is N > 0 must not be
//! retried, and it does not say which records were refused. The agent will not guess and will
//! not lose them silently: when N is the whole batch every record is rejected with the
//! receiver's `errorMessage`; otherwise every record of the batch is dead-lettered as *possibly*
//! rejected, the reason saying "N of M" and that the others were accepted. The dead-letter file
//! then holds a superset of what the receiver lacks (checkable by `event.id`), never less; the
//! dead-letter count overstates the loss by M − N, which the reason states.

use std::{collections::BTreeMap, ops::Range};

use log::warn;
use serde_json::{json, Value};

use super::{
    http::{
        config_problem, join, now_ns, rfc3339_unix_ns, send_split, short, Answer, Client, Every,
        Part, Peek,
    },
    BatchLimits, Destination, Line, Outcome, SendError, SinkSetupError,
};
use crate::config::HttpSinkConfig;

const SEVERITY_INFO: u8 = 9;
const SEVERITY_WARN: u8 = 13;

pub struct OtlpDest {
    name: String,
    client: Client,
    url: String,
    /// `host.name` for records that carry none.
    host: String,
    limits: BatchLimits,
    note_log: Every,
}

fn kv(key: &str, value: Value) -> Value {
    json!({"key": key, "value": value})
}

fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

impl OtlpDest {
    /// `http.url` is the full logs URL (`http://collector:4318/v1/logs`); a URL with no path
    /// gets `/v1/logs` (as OTEL_EXPORTER_OTLP_ENDPOINT does).
    pub fn new(
        name: &str,
        http: &HttpSinkConfig,
        limits: BatchLimits,
    ) -> Result<OtlpDest, SinkSetupError> {
        let client = Client::new(http).map_err(|e| SinkSetupError::Http {
            name: name.to_string(),
            source: Box::new(e),
        })?;
        let u = client.url();
        let after_scheme = u.split_once("://").map(|(_, r)| r).unwrap_or(u);
        let url = match after_scheme.find('/') {
            None => join(u, "v1/logs"),
            Some(p) if after_scheme[p..] == *"/" => join(u, "v1/logs"),
            Some(_) => u.to_string(),
        };
        Ok(OtlpDest {
            name: name.to_string(),
            client,
            url,
            host: this_host(),
            limits,
            note_log: Every::default(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The ExportLogsServiceRequest (JSON) for `range` of `batch`.
    pub fn body(&self, batch: &[Line], range: Range<usize>) -> Vec<u8> {
        let now = now_ns().to_string();
        let mut by_host: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        let mut order: Vec<String> = Vec::new();
        for l in &batch[range] {
            let p = Peek::of(&l.bytes);
            let alert = p.event.kind.as_deref() == Some("alert");
            let (num, text) = if alert {
                (SEVERITY_WARN, "WARN")
            } else {
                (SEVERITY_INFO, "INFO")
            };
            let mut attrs = Vec::with_capacity(3);
            if let Some(id) = &p.event.id {
                attrs.push(kv("event.id", json!({"stringValue": id})));
            }
            attrs.push(kv(
                "event.sequence",
                json!({"intValue": p.event.sequence.unwrap_or(l.seq).to_string()}),
            ));
            attrs.push(kv(
                "sparbar.stream",
                json!({"stringValue": l.stream.name()}),
            ));
            let mut rec = json!({
                "observedTimeUnixNano": p.event.created.as_deref()
                    .and_then(rfc3339_unix_ns).map(|t| t.to_string()).unwrap_or_else(|| now.clone()),
                "severityNumber": num,
                "severityText": text,
                "body": {"stringValue": String::from_utf8_lossy(&l.bytes)},
                "attributes": attrs,
            });
            // Absent (0) means unknown, as the data model says.
            if let Some(t) = p.timestamp_ns() {
                rec["timeUnixNano"] = json!(t.to_string());
            }
            let host = p.host.name.clone().unwrap_or_else(|| self.host.clone());
            if !by_host.contains_key(&host) {
                order.push(host.clone());
            }
            by_host.entry(host).or_default().push(rec);
        }
        let resource_logs: Vec<Value> = order
            .into_iter()
            .map(|host| {
                let records = by_host.remove(&host).unwrap_or_default();
                json!({
                    "resource": {"attributes": [
                        kv("service.name", json!({"stringValue": "sparbar"})),
                        kv("host.name", json!({"stringValue": host})),
                    ]},
                    "scopeLogs": [{
                        "scope": {"name": "sparbar", "version": env!("CARGO_PKG_VERSION")},
                        "logRecords": records,
                    }],
                })
            })
            .collect();
        serde_json::to_vec(&json!({ "resourceLogs": resource_logs })).unwrap_or_default()
    }
}

/// `rejectedLogRecords` and `errorMessage` of a success answer (an int64 is a string or a
/// number in JSON; an empty or non-JSON body has no partial success).
fn partial(body: &str) -> (u64, String) {
    let Ok(v) = serde_json::from_str::<Value>(body) else {
        return (0, String::new());
    };
    let ps = &v["partialSuccess"];
    let n = match &ps["rejectedLogRecords"] {
        Value::Number(n) => n.as_u64().unwrap_or(0),
        Value::String(s) => s.parse().unwrap_or(0),
        _ => 0,
    };
    (n, ps["errorMessage"].as_str().unwrap_or("").to_string())
}

/// `Status.message` of an error answer, else the body.
fn status_message(body: &str) -> String {
    match serde_json::from_str::<Value>(body) {
        Ok(v) if v["message"].is_string() => short(v["message"].as_str().unwrap_or("")),
        _ => short(body),
    }
}

/// Judges the receiver's answer to an export of `range` of a batch. The second value is a note
/// for the log (a success with a warning in `errorMessage`).
pub fn judge(a: &Answer, range: Range<usize>, url: &str) -> (Part, Option<String>) {
    let n = range.len() as u64;
    match a.status {
        200..=299 => {
            let (rejected, msg) = partial(&a.body);
            let msg = short(&msg);
            if rejected == 0 {
                let note = (!msg.is_empty())
                    .then(|| format!("receiver accepted all with a warning: {msg}"));
                return (Part::Answered(Outcome::delivered()), note);
            }
            if rejected >= n {
                return (
                    Part::Reject(format!(
                        "otlp receiver rejected all {n} records of the export (partial success): {msg}"
                    )),
                    None,
                );
            }
            let reason = format!(
                "possibly rejected: the otlp receiver rejected {rejected} of the {n} records of this export without saying which (partial success, not retried): {msg}; the other {} were accepted",
                n - rejected
            );
            let out = Outcome {
                rejected: range.map(|i| (i, reason.clone())).collect(),
                ..Outcome::default()
            };
            (Part::Answered(out), None)
        }
        429 | 502 | 503 | 504 => (
            Part::Retry {
                reason: format!(
                    "otlp receiver answered {}: {}",
                    a.status,
                    status_message(&a.body)
                ),
                after: a.retry_after,
            },
            None,
        ),
        413 => (
            Part::Split(format!(
                "otlp receiver: the export is too large (413): {}",
                status_message(&a.body)
            )),
            None,
        ),
        s => match config_problem(s, url) {
            Some(p) => (
                Part::Retry {
                    reason: format!("otlp receiver {p}: {}", status_message(&a.body)),
                    after: a.retry_after,
                },
                None,
            ),
            None => (
                Part::Reject(format!(
                    "otlp receiver answered {s} (permanent per the OTLP spec): {}",
                    status_message(&a.body)
                )),
                None,
            ),
        },
    }
}

impl Destination for OtlpDest {
    fn name(&self) -> &str {
        &self.name
    }

    fn limits(&self) -> BatchLimits {
        self.limits
    }

    fn send(&mut self, batch: &[Line]) -> Result<Outcome, SendError> {
        let mut note = None;
        let result = send_split(batch.len(), |r| {
            let body = self.body(batch, r.clone());
            match self.client.post(&self.url, "application/json", &body) {
                Ok(a) => {
                    let (part, n) = judge(&a, r, &self.url);
                    if n.is_some() {
                        note = n;
                    }
                    part
                }
                Err(SendError::Retry { reason, after }) => Part::Retry { reason, after },
                Err(SendError::Reject { reason }) => Part::Reject(reason),
            }
        });
        if let Some(note) = note {
            if let Some(n) = self.note_log.note(1) {
                warn!(
                    "sink {}: {note} ({n} such answer(s) since the last note)",
                    self.name
                );
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{config::TlsClientConfig, ship::Stream};

    fn http(url: &str) -> HttpSinkConfig {
        HttpSinkConfig {
            url: url.into(),
            tls: TlsClientConfig::default(),
            gzip: false,
            headers: vec![],
            timeout: Duration::from_secs(1),
        }
    }

    fn dest(url: &str) -> OtlpDest {
        OtlpDest::new("otel", &http(url), BatchLimits::default()).unwrap()
    }

    #[test]
    fn url_as_given_or_with_v1_logs() {
        assert_eq!(dest("http://c:4318/v1/logs").url(), "http://c:4318/v1/logs");
        assert_eq!(dest("http://c:4318").url(), "http://c:4318/v1/logs");
        assert_eq!(dest("http://c:4318/").url(), "http://c:4318/v1/logs");
        assert_eq!(
            dest("https://gw/otlp/v1/logs").url(),
            "https://gw/otlp/v1/logs"
        );
    }

    #[test]
    fn export_request() {
        let d = dest("http://c:4318/v1/logs");
        let alert = json!({"@timestamp": "2023-11-14T22:13:20.123456Z",
            "event": {"sequence": 4, "id": "al-1", "kind": "alert", "created": "2023-11-14T22:13:21Z"},
            "host": {"name": "web-1"}});
        let access = json!({"@timestamp": "2023-11-14T22:13:19Z",
            "event": {"sequence": 9, "id": "ev-9", "kind": "event"}, "host": {"name": "web-1"}});
        let batch = vec![
            Line {
                stream: Stream::Security,
                seq: 4,
                bytes: serde_json::to_vec(&alert).unwrap(),
            },
            Line {
                stream: Stream::Access,
                seq: 9,
                bytes: serde_json::to_vec(&access).unwrap(),
            },
            Line {
                stream: Stream::Access,
                seq: 10,
                bytes: b"not json".to_vec(),
            },
        ];
        let before = now_ns();
        let v: Value = serde_json::from_slice(&d.body(&batch, 0..3)).unwrap();
        let rl = v["resourceLogs"].as_array().unwrap();
        assert_eq!(
            rl.len(),
            2,
            "web-1, then this host for the record without host.name"
        );
        assert_eq!(
            rl[0]["resource"]["attributes"],
            json!([{"key": "service.name", "value": {"stringValue": "sparbar"}},
                   {"key": "host.name", "value": {"stringValue": "web-1"}}])
        );
        let sl = &rl[0]["scopeLogs"][0];
        assert_eq!(sl["scope"]["name"], "sparbar");
        let recs = sl["logRecords"].as_array().unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0]["timeUnixNano"], "1700000000123456000");
        assert_eq!(recs[0]["observedTimeUnixNano"], "1700000001000000000");
        assert_eq!(recs[0]["severityNumber"], 13);
        assert_eq!(recs[0]["severityText"], "WARN");
        assert_eq!(
            recs[0]["body"]["stringValue"].as_str().unwrap().as_bytes(),
            &batch[0].bytes[..]
        );
        assert_eq!(
            recs[0]["attributes"],
            json!([{"key": "event.id", "value": {"stringValue": "al-1"}},
                   {"key": "event.sequence", "value": {"intValue": "4"}},
                   {"key": "sparbar.stream", "value": {"stringValue": "security"}}])
        );
        assert_eq!(recs[1]["severityNumber"], 9);
        assert_eq!(recs[1]["severityText"], "INFO");
        let odd = &rl[1]["scopeLogs"][0]["logRecords"][0];
        assert!(odd.get("timeUnixNano").is_none());
        assert!(
            odd["observedTimeUnixNano"]
                .as_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
                >= before
        );
        assert_eq!(odd["body"]["stringValue"], "not json");
        assert_eq!(odd["attributes"][0]["key"], "event.sequence");
        assert_eq!(odd["attributes"][0]["value"]["intValue"], "10");
    }

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status,
            body: body.into(),
            retry_after: Some(Duration::from_secs(4)),
        }
    }

    #[test]
    fn answers() {
        let u = "http://c/v1/logs";
        assert_eq!(
            judge(&answer(200, "{}"), 0..3, u).0,
            Part::Answered(Outcome::delivered())
        );
        assert_eq!(
            judge(&answer(200, ""), 0..3, u).0,
            Part::Answered(Outcome::delivered())
        );
        let (p, note) = judge(
            &answer(200, r#"{"partialSuccess":{"errorMessage":"slow down"}}"#),
            0..3,
            u,
        );
        assert_eq!(p, Part::Answered(Outcome::delivered()));
        assert!(note.unwrap().contains("slow down"));
        // Some rejected, which unknown: all of the export, "possibly".
        let (p, _) = judge(
            &answer(
                200,
                r#"{"partialSuccess":{"rejectedLogRecords":"1","errorMessage":"bad record"}}"#,
            ),
            5..8,
            u,
        );
        let Part::Answered(o) = p else {
            panic!("{p:?}")
        };
        assert_eq!(
            o.rejected.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            vec![5, 6, 7]
        );
        assert!(o.rejected[0]
            .1
            .starts_with("possibly rejected: the otlp receiver rejected 1 of the 3"));
        assert!(o.rejected[0].1.contains("bad record"));
        assert!(o.retry.is_empty());
        // All rejected (a number this time).
        let (p, _) = judge(
            &answer(200, r#"{"partialSuccess":{"rejectedLogRecords":3}}"#),
            0..3,
            u,
        );
        assert!(matches!(p, Part::Reject(r) if r.contains("all 3")));
        for s in [429, 502, 503, 504] {
            match judge(
                &answer(s, r#"{"code":14,"message":"unavailable"}"#),
                0..3,
                u,
            )
            .0
            {
                Part::Retry { reason, after } => {
                    assert!(reason.contains("unavailable"));
                    assert_eq!(after, Some(Duration::from_secs(4)));
                }
                p => panic!("{s}: {p:?}"),
            }
        }
        for s in [400, 500, 501, 408] {
            assert!(
                matches!(judge(&answer(s, r#"{"code":3,"message":"invalid"}"#), 0..3, u).0, Part::Reject(r) if r.contains("invalid")),
                "{s}"
            );
        }
        assert!(
            matches!(judge(&answer(401, ""), 0..3, u).0, Part::Retry { reason, .. } if reason.contains("credentials"))
        );
        assert!(matches!(judge(&answer(413, ""), 0..3, u).0, Part::Split(_)));
    }
}
