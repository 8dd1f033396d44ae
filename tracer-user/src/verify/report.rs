//! The outcome of `sparbar verify` as data (what was found, per stream, and every problem with
//! where it shows) and its two renderings: the text an operator reads and the JSON document.

use std::io::{self, Write};

use serde_json::{json, Value};

use crate::ship::Stream;

/// Streams in report order.
pub(super) const STREAMS: [Stream; 2] = [Stream::Access, Stream::Security];

/// A stream's index in [`STREAMS`] (and in every per-stream array).
pub(super) fn si(s: Stream) -> usize {
    match s {
        Stream::Access => 0,
        Stream::Security => 1,
    }
}

/// What kind of evidence a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A line that is not JSON or lacks `event.sequence` / `sparbar.chain`.
    NotSealed,
    /// A compressed file whose data is damaged part-way.
    Unreadable,
    /// Within one file, a record after one with a higher sequence of the same stream.
    Reordered,
    /// Two different lines with the same stream and sequence.
    Conflict,
    /// A broken link of the chain.
    Changed,
    /// Sequences absent from the files and not stated in a gap record.
    Missing,
    /// A checkpoint signed with another key than the one given.
    CheckpointKey,
    /// A checkpoint whose signature does not verify.
    CheckpointSignature,
    /// A checkpoint record that cannot be read.
    CheckpointMalformed,
    /// A record whose hash is not the one a valid checkpoint signed for it.
    CheckpointMismatch,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::NotSealed => "not_sealed",
            Kind::Unreadable => "unreadable",
            Kind::Reordered => "reordered",
            Kind::Conflict => "conflict",
            Kind::Changed => "changed",
            Kind::Missing => "missing",
            Kind::CheckpointKey => "checkpoint_key",
            Kind::CheckpointSignature => "checkpoint_signature",
            Kind::CheckpointMalformed => "checkpoint_malformed",
            Kind::CheckpointMismatch => "checkpoint_mismatch",
        }
    }
}

/// One piece of evidence of tampering (or damage).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub kind: Kind,
    pub stream: Option<Stream>,
    /// The sequences concerned (first, last), when there are any.
    pub seqs: Option<(u64, u64)>,
    /// Where it shows: index into [`Report::files`] and line number.
    pub at: Option<(usize, u64)>,
    /// What is wrong; other places it refers to are named as `file:line` in it.
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSummary {
    pub stream: Stream,
    pub first: Option<u64>,
    pub last: Option<u64>,
    /// Distinct sequences present.
    pub records: u64,
    /// Lines of this stream read (records plus their extra copies).
    pub lines: u64,
    /// Extra identical copies.
    pub duplicates: u64,
    /// Sequences reported missing.
    pub missing: u64,
    /// Sequences absent but stated in a gap record.
    pub stated_gap: u64,
    /// Valid checkpoints that sign a head of this stream.
    pub checkpoints: u64,
    /// The highest sequence a valid checkpoint signed.
    pub signed_through: Option<u64>,
    /// Records present at or below `signed_through`.
    pub signed: u64,
    /// Records present above it: chained, but a truncation among them could not be detected.
    pub unsigned_tail: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    /// `--key`: the checkpoints prove the trail against whoever could rewrite it.
    Given,
    /// The key written in the trail itself: proves only internal consistency.
    Trail,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub files: Vec<String>,
    pub lines: u64,
    pub sealed: u64,
    pub key_source: KeySource,
    /// The key ids checkpoints were checked with.
    pub key_ids: Vec<String>,
    pub checkpoints_found: u64,
    pub checkpoints_verified: u64,
    pub checkpoints_failed: u64,
    pub streams: Vec<StreamSummary>,
    /// Facts that are not evidence of tampering (stated gaps, where the trail starts …).
    pub notes: Vec<String>,
    /// Limits of what this verification proves.
    pub warnings: Vec<String>,
    pub problems: Vec<Problem>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    fn place(&self, p: &Problem) -> String {
        match p.at {
            Some((f, l)) => format!("{}:{l}: ", self.files[f]),
            None => String::new(),
        }
    }

    pub fn write_human(&self, w: &mut impl Write) -> io::Result<()> {
        writeln!(
            w,
            "sparbar verify: {} file(s), {} lines, {} sealed records",
            self.files.len(),
            self.lines,
            self.sealed
        )?;
        for s in &self.streams {
            let name = s.stream.name();
            let (Some(first), Some(last)) = (s.first, s.last) else {
                writeln!(w, "{name}: no records")?;
                continue;
            };
            writeln!(
                w,
                "{name}: records {first}..{last}: {} present, {}, {} missing, {} in stated gaps",
                s.records,
                plural(s.duplicates, "duplicate copy").replace("copys", "copies"),
                s.missing,
                s.stated_gap
            )?;
            match s.signed_through {
                Some(h) => writeln!(
                    w,
                    "  {} verified; {} signed (through record {h})",
                    plural(s.checkpoints, "checkpoint"),
                    plural(s.signed, "record")
                )?,
                None => writeln!(w, "  no verified checkpoint signs this stream")?,
            }
            if s.unsigned_tail > 0 {
                writeln!(
                    w,
                    "  {} after the last checkpoint {} chained but not yet signed: a truncation there could not be detected",
                    plural(s.unsigned_tail, "record"),
                    if s.unsigned_tail == 1 { "is" } else { "are" }
                )?;
            }
        }
        writeln!(
            w,
            "checkpoints: {} found, {} verified, {} failed; key: {} ({})",
            self.checkpoints_found,
            self.checkpoints_verified,
            self.checkpoints_failed,
            if self.key_ids.is_empty() {
                "none".to_string()
            } else {
                self.key_ids.join(", ")
            },
            match self.key_source {
                KeySource::Given => "given with --key",
                KeySource::Trail => "taken from the trail itself",
            }
        )?;
        for n in &self.notes {
            writeln!(w, "note: {n}")?;
        }
        for x in &self.warnings {
            writeln!(w, "warning: {x}")?;
        }
        for p in &self.problems {
            writeln!(w, "problem: {}{}", self.place(p), p.message)?;
        }
        if self.ok() {
            writeln!(
                w,
                "OK: no edited, deleted, reordered or conflicting record found"
            )
        } else {
            writeln!(
                w,
                "FAILED: {} problem(s): the trail was changed, reordered, cut or damaged",
                self.problems.len()
            )
        }
    }

    pub fn json(&self) -> Value {
        let streams: serde_json::Map<String, Value> = self
            .streams
            .iter()
            .map(|s| {
                (
                    s.stream.name().to_string(),
                    json!({
                        "first": s.first, "last": s.last, "records": s.records, "lines": s.lines,
                        "duplicates": s.duplicates, "missing": s.missing, "stated_gap": s.stated_gap,
                        "checkpoints": s.checkpoints, "signed_through": s.signed_through,
                        "signed": s.signed, "unsigned_tail": s.unsigned_tail,
                    }),
                )
            })
            .collect();
        let problems: Vec<Value> = self
            .problems
            .iter()
            .map(|p| {
                json!({
                    "kind": p.kind.name(),
                    "stream": p.stream.map(|s| s.name()),
                    "first": p.seqs.map(|x| x.0),
                    "last": p.seqs.map(|x| x.1),
                    "file": p.at.map(|(f, _)| &self.files[f]),
                    "line": p.at.map(|(_, l)| l),
                    "message": p.message,
                })
            })
            .collect();
        json!({
            "ok": self.ok(),
            "files": self.files,
            "lines": self.lines,
            "sealed": self.sealed,
            "key": {
                "source": match self.key_source { KeySource::Given => "given", KeySource::Trail => "trail" },
                "key_ids": self.key_ids,
            },
            "checkpoints": {
                "found": self.checkpoints_found,
                "verified": self.checkpoints_verified,
                "failed": self.checkpoints_failed,
            },
            "streams": streams,
            "notes": self.notes,
            "warnings": self.warnings,
            "problems": problems,
        })
    }
}

/// `1 record`, `2 records`.
pub(super) fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}
