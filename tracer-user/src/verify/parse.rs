//! One line of a trail file read as a sealed record: its stream, sequence and `prev` hash, and
//! for the trail's own records (checkpoints, gaps, a sink's dead letters) what they state.
//! Only the fields verification needs are parsed; the rest of the record is skipped.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::Value;

use crate::ship::{
    chain::{self, Head},
    Stream,
};

/// Sequences above this are refused as implausible, so `seq + 1` never overflows.
const MAX_SEQ: u64 = 1 << 62;

#[derive(Debug, Clone)]
pub(super) struct Checkpoint {
    pub(super) heads: Vec<Head>,
    pub(super) key_id: String,
    pub(super) public_key: String,
    pub(super) signature: [u8; 64],
}

#[derive(Debug, Clone)]
pub(super) struct Gap {
    /// None: `"all"` (the agent was not running: neither stream was observed).
    pub(super) stream: Option<Stream>,
    pub(super) reason: String,
    pub(super) records: Option<u64>,
    pub(super) start: Option<String>,
    pub(super) end: Option<String>,
    pub(super) range: Option<(u64, u64)>,
    pub(super) sink: Option<String>,
}

#[derive(Deserialize)]
struct RawRecord<'a> {
    #[serde(borrow)]
    event: RawEvent<'a>,
    #[serde(borrow)]
    sparbar: RawSparbar<'a>,
}

#[derive(Deserialize)]
struct RawEvent<'a> {
    sequence: u64,
    #[serde(borrow, default)]
    dataset: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    action: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct RawSparbar<'a> {
    #[serde(borrow)]
    chain: RawChain<'a>,
    #[serde(default)]
    checkpoint: Option<Value>,
    #[serde(default)]
    gap: Option<Value>,
    #[serde(default)]
    sink: Option<Value>,
}

#[derive(Deserialize)]
struct RawChain<'a> {
    #[serde(borrow)]
    stream: Cow<'a, str>,
    #[serde(borrow)]
    prev: Cow<'a, str>,
}

/// Why a line is not a sealed record, or a checkpoint or gap record cannot be read.
#[derive(Debug, thiserror::Error)]
pub(super) enum LineError {
    #[error("an empty line")]
    Empty,
    #[error("no sealed chain fields ({0})")]
    NoChainFields(serde_json::Error),
    #[error("not JSON ({0})")]
    NotJson(serde_json::Error),
    #[error("sparbar.chain.stream is {0:?}; expected \"access\" or \"security\"")]
    Stream(String),
    #[error("event.sequence is {0}; expected 1 to {MAX_SEQ}")]
    Sequence(u64),
    #[error("it has no {0}")]
    Missing(&'static str),
    /// A field that is there but not what it must be: `{field} {expected}`.
    #[error("{field} {expected}")]
    Field {
        field: String,
        expected: &'static str,
    },
    #[error("sparbar.gap.first_sequence/last_sequence are {first}/{last}; expected two sequences, first <= last")]
    GapRange { first: Value, last: Value },
}

impl LineError {
    fn field(field: impl Into<String>, expected: &'static str) -> LineError {
        LineError::Field {
            field: field.into(),
            expected,
        }
    }
}

pub(super) enum SpecialBody {
    Checkpoint(Result<Checkpoint, LineError>),
    Gap(Result<Gap, LineError>),
    /// What a sink's dead-lettered records mean for its files.
    SinkNote(String),
}

pub(super) struct Parsed {
    pub(super) stream: Stream,
    pub(super) seq: u64,
    pub(super) prev: [u8; 32],
    pub(super) special: Option<SpecialBody>,
}

pub(super) fn parse_line(line: &[u8]) -> Result<Parsed, LineError> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Err(LineError::Empty);
    }
    let r: RawRecord = serde_json::from_slice(line).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => LineError::NoChainFields(e),
        _ => LineError::NotJson(e),
    })?;
    let stream = Stream::from_name(&r.sparbar.chain.stream)
        .ok_or_else(|| LineError::Stream(r.sparbar.chain.stream.to_string()))?;
    let prev = chain::unhex::<32>(&r.sparbar.chain.prev)
        .ok_or_else(|| LineError::field("sparbar.chain.prev", "is not 64 hex digits"))?;
    if r.event.sequence == 0 || r.event.sequence > MAX_SEQ {
        return Err(LineError::Sequence(r.event.sequence));
    }
    let special = match (stream, r.event.dataset.as_deref()) {
        (Stream::Security, Some("sparbar.checkpoint")) => Some(SpecialBody::Checkpoint(
            r.sparbar
                .checkpoint
                .as_ref()
                .ok_or(LineError::Missing("sparbar.checkpoint"))
                .and_then(parse_checkpoint),
        )),
        (Stream::Security, Some("sparbar.gap")) => Some(SpecialBody::Gap(
            r.sparbar
                .gap
                .as_ref()
                .ok_or(LineError::Missing("sparbar.gap"))
                .and_then(parse_gap),
        )),
        (Stream::Security, Some("sparbar.sink"))
            if r.event.action.as_deref() == Some("dead_lettered") =>
        {
            let v = r.sparbar.sink.unwrap_or_default();
            Some(SpecialBody::SinkNote(format!(
                "sink {} dead-lettered {} {} record(s) ({}): they are missing from that sink's files (the agent keeps them in its deadletter directory)",
                v["name"], v["records"], v["stream"].as_str().unwrap_or("?"), v["reason"]
            )))
        }
        _ => None,
    };
    Ok(Parsed {
        stream,
        seq: r.event.sequence,
        prev,
        special,
    })
}

fn parse_checkpoint(v: &Value) -> Result<Checkpoint, LineError> {
    let text = |k: &str| {
        v[k].as_str()
            .map(str::to_string)
            .ok_or_else(|| LineError::field(format!("sparbar.checkpoint.{k}"), "is not a string"))
    };
    let streams = v["streams"]
        .as_array()
        .ok_or_else(|| LineError::field("sparbar.checkpoint.streams", "is not a list"))?;
    let mut heads = Vec::with_capacity(streams.len());
    for (i, h) in streams.iter().enumerate() {
        let bad = |what: &str, expected| {
            LineError::field(format!("sparbar.checkpoint.streams[{i}].{what}"), expected)
        };
        let stream = h["stream"]
            .as_str()
            .and_then(Stream::from_name)
            .ok_or_else(|| bad("stream", "is not \"access\" or \"security\""))?;
        let seq = h["sequence"]
            .as_u64()
            .filter(|&n| n <= MAX_SEQ)
            .ok_or_else(|| bad("sequence", "is not a sequence number"))?;
        let hash = h["hash"]
            .as_str()
            .and_then(chain::unhex::<32>)
            .ok_or_else(|| bad("hash", "is not 64 hex digits"))?;
        heads.push(Head { stream, seq, hash });
    }
    let signature = chain::unhex::<64>(&text("signature")?)
        .ok_or_else(|| LineError::field("sparbar.checkpoint.signature", "is not 128 hex digits"))?;
    Ok(Checkpoint {
        heads,
        key_id: text("key_id")?,
        public_key: text("public_key")?,
        signature,
    })
}

fn parse_gap(v: &Value) -> Result<Gap, LineError> {
    let stream = match v["stream"].as_str() {
        Some("all") => None,
        Some(name) if Stream::from_name(name).is_some() => Stream::from_name(name),
        _ => {
            return Err(LineError::field(
                "sparbar.gap.stream",
                "is not \"access\", \"security\" or \"all\"",
            ))
        }
    };
    let shown = |x: &Value| match x {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    };
    let range = match (&v["first_sequence"], &v["last_sequence"]) {
        (Value::Null, Value::Null) => None,
        (a, b) => match (a.as_u64(), b.as_u64()) {
            (Some(a), Some(b)) if 1 <= a && a <= b && b <= MAX_SEQ => Some((a, b)),
            _ => {
                return Err(LineError::GapRange {
                    first: a.clone(),
                    last: b.clone(),
                })
            }
        },
    };
    Ok(Gap {
        stream,
        reason: shown(&v["reason"]).unwrap_or_else(|| "no reason given".into()),
        records: v["records"].as_u64(),
        start: shown(&v["start"]),
        end: shown(&v["end"]),
        range,
        sink: shown(&v["sink"]),
    })
}
