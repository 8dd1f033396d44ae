//! Grafana Loki: the push API (`POST /loki/api/v1/push`, JSON body, optionally gzipped).
//!
//! One Loki stream per spool stream: the labels are the configured static ones plus
//! `stream="access"|"security"`, never a record's field (user ids as label values would be
//! unbounded cardinality, which Loki forbids, and personal data in its index). Each entry is
//! `["<@timestamp in ns>", "<the sealed line>"]`; a record without a readable `@timestamp` gets
//! the time it is sent.
//!
//! Answers: 2xx delivered; 429, 408 and 5xx retried (with `Retry-After`); 413 splits the batch.
//! **400 is per entry, not per request:** Loki's distributor validates each entry (too old,
//! too far ahead, line too long ...), stores the valid ones and answers 400 with the last error
//! (`... total ignored: X out of Y for stream: {...}`) without saying which entries it dropped.
//! So a 400 is not a verdict on the whole batch: the batch is halved and the halves sent again
//! until each refused entry stands alone, and only those are dead-lettered, with Loki's message.
//! Resending the entries Loki already stored is harmless: Loki drops an exact duplicate (same
//! stream, timestamp and line) and its queries merge the ones it kept. When Loki says it
//! ignored every entry of a request, that request is not split further. The splitting is
//! bounded per send ([`super::http::SPLIT_BUDGET`] requests); what is left is retried.

use std::{collections::BTreeMap, ops::Range};

use serde_json::{json, Value};

use super::{
    http::{config_problem, join, now_ns, send_split, short, Answer, Client, Part, Peek},
    BatchLimits, Destination, Line, Outcome, SendError, SinkSetupError,
};
use crate::config::HttpSinkConfig;

const PUSH_PATH: &str = "/loki/api/v1/push";

pub struct LokiDest {
    name: String,
    client: Client,
    push_url: String,
    labels: BTreeMap<String, String>,
    limits: BatchLimits,
}

impl LokiDest {
    /// `http.url` is Loki's base address (`http://loki:3100`) or the push URL itself.
    pub fn new(
        name: &str,
        http: &HttpSinkConfig,
        labels: &BTreeMap<String, String>,
        limits: BatchLimits,
    ) -> Result<LokiDest, SinkSetupError> {
        if labels.contains_key("stream") {
            return Err(SinkSetupError::LokiStreamLabel {
                name: name.to_string(),
            });
        }
        let client = Client::new(http).map_err(|e| SinkSetupError::Http {
            name: name.to_string(),
            source: Box::new(e),
        })?;
        let base = client.url().trim_end_matches('/');
        let push_url = if base.ends_with(PUSH_PATH) {
            base.to_string()
        } else {
            join(base, PUSH_PATH)
        };
        Ok(LokiDest {
            name: name.to_string(),
            client,
            push_url,
            labels: labels.clone(),
            limits,
        })
    }

    pub fn push_url(&self) -> &str {
        &self.push_url
    }

    /// The push request for `range` of `batch`: one Loki stream per spool stream, entries in
    /// time order (Loki before 2.4 refused out-of-order entries within a stream).
    pub fn body(&self, batch: &[Line], range: Range<usize>) -> Vec<u8> {
        let mut streams: BTreeMap<&'static str, Vec<(u64, usize)>> = BTreeMap::new();
        let now = now_ns();
        for i in range {
            let l = &batch[i];
            let ts = Peek::of(&l.bytes).timestamp_ns().unwrap_or(now);
            streams.entry(l.stream.name()).or_default().push((ts, i));
        }
        let streams: Vec<Value> = streams
            .into_iter()
            .map(|(stream, mut entries)| {
                entries.sort_by_key(|(ts, _)| *ts);
                let mut labels: serde_json::Map<String, Value> = self
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), json!(v)))
                    .collect();
                labels.insert("stream".into(), json!(stream));
                let values: Vec<Value> = entries
                    .into_iter()
                    .map(|(ts, i)| {
                        json!([ts.to_string(), String::from_utf8_lossy(&batch[i].bytes)])
                    })
                    .collect();
                json!({"stream": labels, "values": values})
            })
            .collect();
        serde_json::to_vec(&json!({ "streams": streams })).unwrap_or_default()
    }
}

/// `total ignored: X out of Y` in Loki's 400 message.
fn ignored(msg: &str) -> Option<(usize, usize)> {
    let rest = &msg[msg.find("total ignored: ")? + "total ignored: ".len()..];
    let (x, rest) = rest.split_once(" out of ")?;
    let y: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((x.trim().parse().ok()?, y.parse().ok()?))
}

/// Judges Loki's answer to a push of `n` entries.
pub fn judge(a: &Answer, n: usize, url: &str) -> Part {
    let msg = short(&a.body);
    match a.status {
        200..=299 => Part::Answered(Outcome::delivered()),
        400 => {
            let reason = format!("loki refused the entry (400): {msg}");
            match ignored(&a.body) {
                Some((x, y)) if x == n && y == n => Part::Reject(reason),
                _ => Part::Split(reason),
            }
        }
        413 => Part::Split(format!("loki: the push is too large (413): {msg}")),
        429 => Part::Retry {
            reason: format!("loki is rate limiting (429): {msg}"),
            after: a.retry_after,
        },
        408 | 500..=599 => Part::Retry {
            reason: format!("loki answered {}: {msg}", a.status),
            after: a.retry_after,
        },
        s => match config_problem(s, url) {
            Some(p) => Part::Retry {
                reason: format!("loki {p}"),
                after: a.retry_after,
            },
            None => Part::Reject(format!("loki answered {s}: {msg}")),
        },
    }
}

impl Destination for LokiDest {
    fn name(&self) -> &str {
        &self.name
    }

    fn limits(&self) -> BatchLimits {
        self.limits
    }

    fn send(&mut self, batch: &[Line]) -> Result<Outcome, SendError> {
        send_split(batch.len(), |r| {
            let n = r.len();
            let body = self.body(batch, r);
            match self.client.post(&self.push_url, "application/json", &body) {
                Ok(a) => judge(&a, n, &self.push_url),
                Err(SendError::Retry { reason, after }) => Part::Retry { reason, after },
                Err(SendError::Reject { reason }) => Part::Reject(reason),
            }
        })
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

    fn dest(url: &str) -> LokiDest {
        let labels = BTreeMap::from([
            ("job".to_string(), "sparbar".to_string()),
            ("env".to_string(), "prod".to_string()),
        ]);
        LokiDest::new("loki", &http(url), &labels, BatchLimits::default()).unwrap()
    }

    fn line(stream: Stream, seq: u64, ts: &str) -> Line {
        let v = json!({"@timestamp": ts, "event": {"sequence": seq, "id": format!("ev-{seq}")},
                       "user": {"id": "alice"}, "sparbar": {"chain": {"stream": stream.name()}}});
        Line {
            stream,
            seq,
            bytes: serde_json::to_vec(&v).unwrap(),
        }
    }

    #[test]
    fn push_url_from_base_or_full() {
        assert_eq!(
            dest("http://loki:3100").push_url(),
            "http://loki:3100/loki/api/v1/push"
        );
        assert_eq!(
            dest("http://loki:3100/").push_url(),
            "http://loki:3100/loki/api/v1/push"
        );
        assert_eq!(
            dest("https://gw/tenant/loki/api/v1/push").push_url(),
            "https://gw/tenant/loki/api/v1/push"
        );
        let e = LokiDest::new(
            "l",
            &http("http://x"),
            &BTreeMap::from([("stream".to_string(), "x".to_string())]),
            BatchLimits::default(),
        );
        assert!(e.err().unwrap().to_string().contains("stream"));
    }

    #[test]
    fn body_has_static_labels_and_ns_timestamps() {
        let d = dest("http://loki:3100");
        let batch = vec![
            line(Stream::Access, 1, "2023-11-14T22:13:20.123456Z"),
            line(Stream::Access, 2, "2023-11-14T22:13:19Z"),
            line(Stream::Access, 3, "2023-11-14T22:13:21.000001Z"),
        ];
        let v: Value = serde_json::from_slice(&d.body(&batch, 0..3)).unwrap();
        let streams = v["streams"].as_array().unwrap();
        assert_eq!(streams.len(), 1);
        assert_eq!(
            streams[0]["stream"],
            json!({"job": "sparbar", "env": "prod", "stream": "access"})
        );
        let values = streams[0]["values"].as_array().unwrap();
        // Time order; timestamps are strings of nanoseconds; lines are the exact bytes.
        assert_eq!(values[0][0], "1699999999000000000");
        assert_eq!(values[1][0], "1700000000123456000");
        assert_eq!(values[2][0], "1700000001000001000");
        assert_eq!(
            values[0][1].as_str().unwrap().as_bytes(),
            &batch[1].bytes[..]
        );
        assert_eq!(
            values[1][1].as_str().unwrap().as_bytes(),
            &batch[0].bytes[..]
        );
        // No record field (user.id here) becomes a label.
        assert_eq!(streams[0]["stream"].as_object().unwrap().len(), 3);
    }

    #[test]
    fn body_of_a_range_and_a_missing_timestamp() {
        let d = dest("http://loki:3100");
        let mut batch = vec![
            line(Stream::Security, 1, "2023-11-14T22:13:20Z"),
            line(Stream::Security, 2, "2023-11-14T22:13:21Z"),
        ];
        batch.push(Line {
            stream: Stream::Security,
            seq: 3,
            bytes: b"{\"event\":{\"sequence\":3}}".to_vec(),
        });
        let before = now_ns();
        let v: Value = serde_json::from_slice(&d.body(&batch, 1..3)).unwrap();
        let values = v["streams"][0]["values"].as_array().unwrap();
        assert_eq!(values.len(), 2);
        assert_eq!(v["streams"][0]["stream"]["stream"], "security");
        assert_eq!(values[0][0], "1700000001000000000");
        let ts: u64 = values[1][0].as_str().unwrap().parse().unwrap();
        assert!(ts >= before);
    }

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status,
            body: body.into(),
            retry_after: Some(Duration::from_secs(3)),
        }
    }

    #[test]
    fn answers() {
        let u = "http://loki/loki/api/v1/push";
        assert_eq!(
            judge(&answer(204, ""), 5, u),
            Part::Answered(Outcome::delivered())
        );
        assert_eq!(
            judge(&answer(200, ""), 5, u),
            Part::Answered(Outcome::delivered())
        );
        let too_old = "entry with timestamp 2024-05-06 15:58:50 +0000 UTC ignored, reason: 'entry too far behind, oldest acceptable timestamp is: 2024-05-07T10:25:30Z',\nuser 'fake', total ignored: 1 out of 2 for stream: {job=\"sparbar\"}";
        match judge(&answer(400, too_old), 2, u) {
            Part::Split(r) => {
                assert!(r.starts_with("loki refused the entry (400): entry with timestamp"));
                assert!(!r.contains('\n'));
            }
            p => panic!("{p:?}"),
        }
        // All ignored: no point in splitting.
        let all = too_old.replace("1 out of 2", "2 out of 2");
        assert!(matches!(judge(&answer(400, &all), 2, u), Part::Reject(_)));
        assert!(matches!(judge(&answer(400, "bad"), 1, u), Part::Split(_)));
        assert!(matches!(judge(&answer(413, ""), 9, u), Part::Split(_)));
        for s in [408, 429, 500, 502, 503, 504] {
            match judge(&answer(s, "Ingestion rate limit exceeded"), 3, u) {
                Part::Retry { after, reason } => {
                    assert_eq!(after, Some(Duration::from_secs(3)));
                    assert!(reason.contains(&s.to_string()));
                }
                p => panic!("{s}: {p:?}"),
            }
        }
        match judge(&answer(401, "no org id"), 3, u) {
            Part::Retry { reason, .. } => assert!(reason.contains("credentials")),
            p => panic!("{p:?}"),
        }
        assert!(matches!(judge(&answer(404, ""), 3, u), Part::Retry { .. }));
        assert!(matches!(judge(&answer(405, ""), 3, u), Part::Reject(_)));
    }

    #[test]
    fn ignored_counts() {
        assert_eq!(
            ignored("... total ignored: 3 out of 10 for stream: {a=\"b\"}"),
            Some((3, 10))
        );
        assert_eq!(ignored("total ignored: 1 out of 1"), Some((1, 1)));
        assert_eq!(ignored("line too long"), None);
    }
}
