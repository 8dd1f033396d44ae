//! Elasticsearch and OpenSearch: the `_bulk` API with `create` actions keyed by `event.id`, so
//! a resent record is refused as already there (409) instead of stored twice, and the index may
//! be a data stream (which takes only `create`).
//!
//! Request: `POST {url}/_bulk` with NDJSON (`Content-Type: application/x-ndjson`, ending in a
//! newline), one `{"create":{"_index":"<index, {stream} replaced>","_id":"<event.id>"}}` line
//! before each sealed line. A record without `event.id` (or with one longer than the 512 bytes
//! Elasticsearch allows) is keyed by the SHA-256 of its line, which is unique too: it covers the
//! chain's `prev` hash.
//!
//! Answers, whole request: 2xx → read the items; 413 → halve the batch and send the halves (a
//! single record still too large is rejected); 429, 408 and 5xx → retry (with `Retry-After`);
//! 401/403 (and other configuration problems) → retry, saying what to fix; 400 → the batch is
//! rejected with Elasticsearch's error type and reason.
//! Per item (in request order, as Elasticsearch answers them): 2xx stored; 409 (version conflict
//! on `create`) was already there, so delivered, and counted as a duplicate; 429, 408 and 5xx →
//! only that record is retried; 404 `index_not_found_exception` (automatic index creation
//! turned off) → retried until an operator creates the index; any other 4xx (such as 400
//! `mapper_parsing_exception`) → that record is rejected with the error's type and reason.

use std::{collections::BTreeMap, ops::Range};

use log::{info, warn};
use serde::Deserialize;
use serde_json::Value;

use super::{
    chain,
    http::{config_problem, join, send_split, short, Answer, Client, Every, Part, Peek},
    BatchLimits, Destination, Line, Outcome, SendError, SinkSetupError,
};
use crate::config::HttpSinkConfig;

/// Longest `_id` Elasticsearch accepts, in bytes.
const MAX_ID: usize = 512;

pub struct ElasticDest {
    name: String,
    client: Client,
    bulk_url: String,
    index: String,
    limits: BatchLimits,
    duplicates: u64,
    dup_log: Every,
    retry_log: Every,
}

#[derive(Debug, Deserialize)]
struct Bulk {
    errors: Option<bool>,
    #[serde(default)]
    items: Vec<BTreeMap<String, Item>>,
}

#[derive(Debug, Deserialize)]
struct Item {
    status: Option<u16>,
    error: Option<Value>,
}

/// What the per-item answers came to, besides the [`Outcome`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Items {
    pub outcome: Outcome,
    pub duplicates: u64,
    /// One reason among the records to retry, for the log.
    pub retry_reason: Option<String>,
}

/// `type: reason` of an Elasticsearch error object (`{"type","reason","caused_by"}`), or the
/// error as text when it has another shape.
fn error_text(e: &Value) -> String {
    let Some(t) = e.get("type").and_then(Value::as_str) else {
        return short(&match e {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        });
    };
    let mut s = format!(
        "{t}: {}",
        e.get("reason").and_then(Value::as_str).unwrap_or("")
    );
    if let Some(c) = e.get("caused_by") {
        if let (Some(ct), cr) = (c.get("type").and_then(Value::as_str), c.get("reason")) {
            s.push_str(&format!(
                " (caused by {ct}: {})",
                cr.and_then(Value::as_str).unwrap_or("")
            ));
        }
    }
    short(&s)
}

/// The `error` of a whole-request error answer (`{"error":{...},"status":N}`), else the body.
fn request_error(body: &str) -> String {
    match serde_json::from_str::<Value>(body) {
        Ok(v) => match v.get("error") {
            Some(e) => error_text(e),
            None => short(body),
        },
        Err(_) => short(body),
    }
}

/// What is wrong with an answer from Elasticsearch (the whole request is retried).
#[derive(Debug, thiserror::Error)]
pub enum ElasticError {
    /// A proxy's page, or a body cut short: no verdict on any record.
    #[error("answered 2xx but not with a bulk response ({source}): {body}")]
    NotBulk {
        source: serde_json::Error,
        /// The start of the body (see [`short`]).
        body: String,
    },
}

/// Judges the items of a 2xx `_bulk` answer for `range` of the batch.
pub fn judge_items(body: &str, range: Range<usize>) -> Result<Items, ElasticError> {
    let bulk: Bulk = serde_json::from_str(body).map_err(|source| ElasticError::NotBulk {
        source,
        body: short(body),
    })?;
    let mut out = Items::default();
    if bulk.errors == Some(false) {
        return Ok(out);
    }
    for (k, i) in range.enumerate() {
        let Some(item) = bulk.items.get(k).and_then(|m| m.values().next()) else {
            // Elasticsearch answers every action; a short answer is not a verdict.
            out.outcome.retry.push(i);
            out.retry_reason
                .get_or_insert_with(|| "the bulk response has fewer items than the request".into());
            continue;
        };
        let status = item.status.unwrap_or(0);
        let error = item.error.as_ref().map(error_text).unwrap_or_default();
        let kind = item
            .error
            .as_ref()
            .and_then(|e| e.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("");
        match status {
            200..=299 => {}
            409 => out.duplicates += 1,
            404 if kind == "index_not_found_exception" => {
                out.outcome.retry.push(i);
                out.retry_reason.get_or_insert_with(|| {
                    format!("the index does not exist and may not be created automatically; create it (or allow action.auto_create_index): {error}")
                });
            }
            408 | 429 | 500..=599 => {
                out.outcome.retry.push(i);
                out.retry_reason
                    .get_or_insert_with(|| format!("{status}: {error}"));
            }
            _ => out.outcome.rejected.push((
                i,
                format!("elasticsearch refused the record ({status}): {error}"),
            )),
        }
    }
    Ok(out)
}

impl ElasticDest {
    /// `http.url` is the cluster's base address (`https://es:9200`).
    pub fn new(
        name: &str,
        http: &HttpSinkConfig,
        index: &str,
        limits: BatchLimits,
    ) -> Result<ElasticDest, SinkSetupError> {
        if index.is_empty() {
            return Err(SinkSetupError::EmptyIndex {
                name: name.to_string(),
            });
        }
        let client = Client::new(http).map_err(|e| SinkSetupError::Http {
            name: name.to_string(),
            source: Box::new(e),
        })?;
        // Only what is judged comes back (the status and error of each item, in order).
        let bulk_url = format!(
            "{}?filter_path=errors,items.*.status,items.*.error",
            join(client.url(), "_bulk")
        );
        Ok(ElasticDest {
            name: name.to_string(),
            client,
            bulk_url,
            index: index.to_string(),
            limits,
            duplicates: 0,
            dup_log: Every::default(),
            retry_log: Every::default(),
        })
    }

    pub fn bulk_url(&self) -> &str {
        &self.bulk_url
    }

    /// Records answered 409 (already in the index) since the start, counted as delivered.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// The `_id` of a record.
    pub fn doc_id(line: &Line) -> String {
        match Peek::of(&line.bytes).event.id {
            Some(id) if !id.is_empty() && id.len() <= MAX_ID => id,
            _ => chain::hex(&chain::hash(&line.bytes)),
        }
    }

    /// The NDJSON body for `range` of `batch`.
    pub fn body(&self, batch: &[Line], range: Range<usize>) -> Vec<u8> {
        let mut out = Vec::new();
        for l in &batch[range] {
            let index = self.index.replace("{stream}", l.stream.name());
            let action = serde_json::json!({"create": {"_index": index, "_id": Self::doc_id(l)}});
            // Serializing a json! value cannot fail.
            out.extend_from_slice(&serde_json::to_vec(&action).unwrap_or_default());
            out.push(b'\n');
            out.extend_from_slice(&l.bytes);
            out.push(b'\n');
        }
        out
    }
}

/// Judges a whole-request answer that is not 2xx.
pub fn judge_request(a: &Answer, url: &str) -> Part {
    let err = request_error(&a.body);
    match a.status {
        413 => Part::Split(format!(
            "elasticsearch: the bulk request is too large (413): {err}"
        )),
        408 | 429 | 500..=599 => Part::Retry {
            reason: format!("elasticsearch answered {}: {err}", a.status),
            after: a.retry_after,
        },
        400 => Part::Reject(format!(
            "elasticsearch refused the bulk request (400): {err}"
        )),
        s => match config_problem(s, url) {
            Some(p) => Part::Retry {
                reason: format!("elasticsearch {p}: {err}"),
                after: a.retry_after,
            },
            None => Part::Reject(format!("elasticsearch answered {s}: {err}")),
        },
    }
}

impl Destination for ElasticDest {
    fn name(&self) -> &str {
        &self.name
    }

    fn limits(&self) -> BatchLimits {
        self.limits
    }

    fn send(&mut self, batch: &[Line]) -> Result<Outcome, SendError> {
        let mut duplicates = 0;
        let mut retry_reason = None;
        let result = send_split(batch.len(), |r| {
            let body = self.body(batch, r.clone());
            let a = match self
                .client
                .post(&self.bulk_url, "application/x-ndjson", &body)
            {
                Ok(a) => a,
                Err(SendError::Retry { reason, after }) => return Part::Retry { reason, after },
                Err(SendError::Reject { reason }) => return Part::Reject(reason),
            };
            if !(200..300).contains(&a.status) {
                return judge_request(&a, &self.bulk_url);
            }
            match judge_items(&a.body, r) {
                Ok(items) => {
                    duplicates += items.duplicates;
                    if items.retry_reason.is_some() {
                        retry_reason = items.retry_reason;
                    }
                    Part::Answered(items.outcome)
                }
                // create is idempotent by _id: resending is harmless.
                Err(e) => Part::Retry {
                    reason: format!("elasticsearch {e}"),
                    after: None,
                },
            }
        });
        self.duplicates += duplicates;
        if let Some(n) = self.dup_log.note(duplicates) {
            info!(
                "sink {}: {n} record(s) were already in the index (409 on create), counted as delivered",
                self.name
            );
        }
        if let Some(reason) = retry_reason {
            let n = result.as_ref().map(|o| o.retry.len() as u64).unwrap_or(0);
            if let Some(total) = self.retry_log.note(n.max(1)) {
                warn!(
                    "sink {}: elasticsearch asked to retry {total} record(s) since the last note, e.g. {reason}",
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

    use serde_json::json;

    use super::*;
    use crate::{config::TlsClientConfig, ship::Stream};

    fn dest() -> ElasticDest {
        let http = HttpSinkConfig {
            url: "http://es:9200/".into(),
            tls: TlsClientConfig::default(),
            gzip: false,
            headers: vec![],
            timeout: Duration::from_secs(1),
        };
        ElasticDest::new("es", &http, "sparbar-{stream}", BatchLimits::default()).unwrap()
    }

    fn line(stream: Stream, seq: u64, id: Option<&str>) -> Line {
        let mut v = json!({"@timestamp": "2023-11-14T22:13:20Z", "event": {"sequence": seq}});
        if let Some(id) = id {
            v["event"]["id"] = json!(id);
        }
        Line {
            stream,
            seq,
            bytes: serde_json::to_vec(&v).unwrap(),
        }
    }

    #[test]
    fn bulk_body() {
        let d = dest();
        assert_eq!(
            d.bulk_url(),
            "http://es:9200/_bulk?filter_path=errors,items.*.status,items.*.error"
        );
        let batch = vec![
            line(Stream::Access, 1, Some("ev-1")),
            line(Stream::Security, 2, Some("al\"2")),
            line(Stream::Access, 3, None),
        ];
        let body = String::from_utf8(d.body(&batch, 0..3)).unwrap();
        assert!(body.ends_with('\n'));
        let lines: Vec<&str> = body.trim_end_matches('\n').split('\n').collect();
        assert_eq!(lines.len(), 6);
        assert_eq!(
            serde_json::from_str::<Value>(lines[0]).unwrap(),
            json!({"create": {"_index": "sparbar-access", "_id": "ev-1"}})
        );
        assert_eq!(lines[1].as_bytes(), &batch[0].bytes[..]);
        assert_eq!(
            serde_json::from_str::<Value>(lines[2]).unwrap(),
            json!({"create": {"_index": "sparbar-security", "_id": "al\"2"}})
        );
        let third: Value = serde_json::from_str(lines[4]).unwrap();
        assert_eq!(
            third["create"]["_id"],
            chain::hex(&chain::hash(&batch[2].bytes))
        );
        // A range is exactly its records.
        let one = String::from_utf8(d.body(&batch, 1..2)).unwrap();
        assert_eq!(one.lines().count(), 2);
        assert!(one.contains("sparbar-security"));
        let long = "x".repeat(513);
        assert_eq!(
            ElasticDest::doc_id(&line(Stream::Access, 9, Some(&long))).len(),
            64
        );
    }

    #[test]
    fn items_are_judged_in_order() {
        let body = json!({"errors": true, "items": [
            {"create": {"status": 201}},
            {"create": {"status": 409, "error": {"type": "version_conflict_engine_exception",
                "reason": "[ev-2]: version conflict, document already exists (current version [1])"}}},
            {"create": {"status": 429, "error": {"type": "es_rejected_execution_exception",
                "reason": "rejected execution of coordinating operation"}}},
            {"create": {"status": 400, "error": {"type": "mapper_parsing_exception",
                "reason": "failed to parse field [http.response.status_code] of type [long]",
                "caused_by": {"type": "illegal_argument_exception", "reason": "For input string: \"x\""}}}},
            {"create": {"status": 503, "error": {"type": "unavailable_shards_exception", "reason": "primary shard is not active"}}},
            {"create": {"status": 404, "error": {"type": "index_not_found_exception", "reason": "no such index [sparbar-access]"}}}
        ]})
        .to_string();
        let items = judge_items(&body, 10..17).unwrap();
        assert_eq!(items.duplicates, 1);
        // 16: missing from the answer, retried.
        assert_eq!(items.outcome.retry, vec![12, 14, 15, 16]);
        assert_eq!(items.outcome.rejected.len(), 1);
        let (i, reason) = &items.outcome.rejected[0];
        assert_eq!(*i, 13);
        assert_eq!(
            reason,
            "elasticsearch refused the record (400): mapper_parsing_exception: failed to parse field [http.response.status_code] of type [long] (caused by illegal_argument_exception: For input string: \"x\")"
        );
        assert!(items
            .retry_reason
            .unwrap()
            .contains("es_rejected_execution_exception"));
    }

    #[test]
    fn no_errors_is_all_delivered() {
        let items = judge_items(r#"{"errors":false}"#, 0..3).unwrap();
        assert_eq!(items, Items::default());
        let items = judge_items(
            r#"{"errors":false,"items":[{"create":{"status":201}}]}"#,
            0..1,
        )
        .unwrap();
        assert_eq!(items.outcome, Outcome::delivered());
        assert!(judge_items("<html>proxy error</html>", 0..1).is_err());
    }

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status,
            body: body.into(),
            retry_after: Some(Duration::from_secs(2)),
        }
    }

    #[test]
    fn whole_request_answers() {
        let u = "http://es:9200/_bulk";
        assert!(matches!(judge_request(&answer(413, ""), u), Part::Split(_)));
        for s in [408, 429, 500, 502, 503, 504] {
            match judge_request(
                &answer(s, r#"{"error":{"type":"x","reason":"y"},"status":503}"#),
                u,
            ) {
                Part::Retry { reason, after } => {
                    assert!(reason.contains("x: y"), "{reason}");
                    assert_eq!(after, Some(Duration::from_secs(2)));
                }
                p => panic!("{s}: {p:?}"),
            }
        }
        for s in [401, 403] {
            match judge_request(
                &answer(
                    s,
                    r#"{"error":{"type":"security_exception","reason":"missing authentication credentials"},"status":401}"#,
                ),
                u,
            ) {
                Part::Retry { reason, .. } => {
                    assert!(reason.contains("credentials"));
                    assert!(reason.contains("will retry"));
                }
                p => panic!("{s}: {p:?}"),
            }
        }
        match judge_request(
            &answer(
                400,
                r#"{"error":{"type":"illegal_argument_exception","reason":"The bulk request must be terminated by a newline [\\n]"},"status":400}"#,
            ),
            u,
        ) {
            Part::Reject(r) => assert!(r.contains("illegal_argument_exception: The bulk request")),
            p => panic!("{p:?}"),
        }
        assert!(matches!(
            judge_request(&answer(406, "{}"), u),
            Part::Reject(_)
        ));
    }
}
