//! `sparbar verify`: checks audit-trail files against their hash chains and signed checkpoints,
//! and names every edit, deletion and reordering by file and line.
//!
//! One pass reads every line (plain or gzip) and keeps, per sealed record, only its sequence, its
//! hash, the hash it chains to and where it was read (88 bytes); checkpoint and gap records are
//! kept whole (they are few). Then, per stream: records sorted by sequence; copies of one
//! sequence are either identical (at-least-once delivery: counted) or conflicting (an error);
//! every link `prev(n+1) == hash(n)` is checked; holes between the lowest sequence and the highest
//! one present or signed are reported unless a gap record states them; every checkpoint's
//! signature is checked and its heads compared with the records. [`chain`] defines the format.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io::{self, BufRead, BufReader, Write},
    path::{Path, PathBuf},
};

use ed25519_dalek::VerifyingKey;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::ship::{
    chain::{self, Head},
    Stream,
};

/// Sequences above this are refused as implausible, so `seq + 1` never overflows.
const MAX_SEQ: u64 = 1 << 62;

/// Streams in report order.
const STREAMS: [Stream; 2] = [Stream::Access, Stream::Security];

fn si(s: Stream) -> usize {
    match s {
        Stream::Access => 0,
        Stream::Security => 1,
    }
}

/// Why verification could not run at all (exit 2), as opposed to what it found (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{}: {source}; expected an audit-trail file or a directory of them", .path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("{}: holds no *.jsonl* file; expected the directory a file sink writes to", .path.display())]
    EmptyDir { path: PathBuf },
    #[error("{}: reading after line {line}: {source}", .path.display())]
    Read {
        path: PathBuf,
        line: u64,
        source: io::Error,
    },
    #[error("--key {}: {reason}; expected the checkpoint.pub the agent wrote (64 hex digits)", .path.display())]
    Key { path: PathBuf, reason: String },
    #[error("no sealed record in the {files} file(s) given; expected files a sparbar sink wrote")]
    Empty { files: usize },
}

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Files, or directories whose `*.jsonl*` files are all read.
    pub paths: Vec<PathBuf>,
    /// `checkpoint.pub` files; none: the key each checkpoint carries is used (and said so).
    pub keys: Vec<PathBuf>,
    /// The sink that wrote the files: only gap records stated for it (or for no sink in
    /// particular) excuse missing records. None: a gap stated for any sink does.
    pub sink: Option<String>,
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

/// Runs `sparbar verify`: prints the report (or the JSON document) and returns the exit code:
/// 0 no problem, 1 problems found, 2 verification could not run.
pub fn command(opts: &Options, as_json: bool) -> u8 {
    match verify(opts) {
        Err(e) => {
            eprintln!("sparbar verify: {e}");
            2
        }
        Ok(r) => {
            let mut out = io::stdout().lock();
            let _ = if as_json {
                writeln!(out, "{:#}", r.json())
            } else {
                r.write_human(&mut out)
            };
            if r.ok() {
                0
            } else {
                1
            }
        }
    }
}

/// Reads the files `opts` names and checks them.
pub fn verify(opts: &Options) -> Result<Report, VerifyError> {
    let keys = opts
        .keys
        .iter()
        .map(|p| load_key(p))
        .collect::<Result<Vec<_>, _>>()?;
    let files = collect_files(&opts.paths)?;
    let mut r = Reader::new(&files);
    for i in 0..files.len() {
        r.read_file(i)?;
    }
    if r.recs.iter().all(Vec::is_empty) {
        return Err(VerifyError::Empty { files: files.len() });
    }
    Ok(r.analyze(&keys, opts.sink.as_deref()))
}

fn load_key(path: &Path) -> Result<(VerifyingKey, String), VerifyError> {
    let text = std::fs::read_to_string(path).map_err(|e| VerifyError::Key {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let key = chain::parse_public(&text).ok_or_else(|| VerifyError::Key {
        path: path.to_path_buf(),
        reason: "not an Ed25519 public key".into(),
    })?;
    let id = chain::key_id(&key);
    Ok((key, id))
}

/// The files to read: each file given, and each `*.jsonl*` file (rotated and `.gz` ones
/// included) directly in each directory given, in name order; each file once.
fn collect_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, VerifyError> {
    let mut out: Vec<PathBuf> = Vec::new();
    let mut seen = BTreeSet::new();
    let open = |path: &Path| {
        let path = path.to_path_buf();
        move |source| VerifyError::Open { path, source }
    };
    for p in paths {
        let meta = std::fs::metadata(p).map_err(open(p))?;
        let mut found = Vec::new();
        if meta.is_dir() {
            for e in std::fs::read_dir(p).map_err(open(p))? {
                let e = e.map_err(open(p))?;
                let name = e.file_name();
                if name.to_string_lossy().contains(".jsonl")
                    && std::fs::metadata(e.path()).is_ok_and(|m| m.is_file())
                {
                    found.push(e.path());
                }
            }
            if found.is_empty() {
                return Err(VerifyError::EmptyDir { path: p.clone() });
            }
            found.sort();
        } else {
            found.push(p.clone());
        }
        for f in found {
            let id = std::fs::canonicalize(&f).unwrap_or_else(|_| f.clone());
            if seen.insert(id) {
                out.push(f);
            }
        }
    }
    Ok(out)
}

/// What is kept of one sealed record.
#[derive(Debug, Clone, Copy)]
struct Rec {
    seq: u64,
    hash: [u8; 32],
    prev: [u8; 32],
    file: u32,
    line: u64,
}

const _: () = assert!(std::mem::size_of::<Rec>() <= 88);

/// A record read after one with a higher sequence in the same file and stream: reordered,
/// unless it is a repeat of a copy earlier in the file (a redelivered batch).
#[derive(Debug, Clone, Copy)]
struct Cand {
    stream: Stream,
    seq: u64,
    hash: [u8; 32],
    file: u32,
    line: u64,
    after_seq: u64,
    after_line: u64,
    /// Consecutive records of the stream that follow the same higher record share a run.
    run: u64,
}

/// A checkpoint or gap record, where it was read and what it says.
#[derive(Debug, Clone)]
struct Special<T> {
    file: u32,
    line: u64,
    seq: u64,
    hash: [u8; 32],
    body: Result<T, String>,
}

#[derive(Debug, Clone)]
struct Checkpoint {
    heads: Vec<Head>,
    key_id: String,
    public_key: String,
    signature: [u8; 64],
}

#[derive(Debug, Clone)]
struct Gap {
    /// None: `"all"` (the agent was not running: neither stream was observed).
    stream: Option<Stream>,
    reason: String,
    records: Option<u64>,
    start: Option<String>,
    end: Option<String>,
    range: Option<(u64, u64)>,
    sink: Option<String>,
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

enum SpecialBody {
    Checkpoint(Result<Checkpoint, String>),
    Gap(Result<Gap, String>),
    /// What a sink's dead-lettered records mean for its files.
    SinkNote(String),
}

struct Parsed {
    stream: Stream,
    seq: u64,
    prev: [u8; 32],
    special: Option<SpecialBody>,
}

fn parse_line(line: &[u8]) -> Result<Parsed, String> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Err("an empty line".into());
    }
    let r: RawRecord = serde_json::from_slice(line).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => format!("no sealed chain fields ({e})"),
        _ => format!("not JSON ({e})"),
    })?;
    let stream = Stream::from_name(&r.sparbar.chain.stream).ok_or_else(|| {
        format!(
            "sparbar.chain.stream is {:?}; expected \"access\" or \"security\"",
            r.sparbar.chain.stream
        )
    })?;
    let prev = chain::unhex::<32>(&r.sparbar.chain.prev)
        .ok_or("sparbar.chain.prev is not 64 hex digits")?;
    if r.event.sequence == 0 || r.event.sequence > MAX_SEQ {
        return Err(format!(
            "event.sequence is {}; expected 1 to {MAX_SEQ}",
            r.event.sequence
        ));
    }
    let special = match (stream, r.event.dataset.as_deref()) {
        (Stream::Security, Some("sparbar.checkpoint")) => Some(SpecialBody::Checkpoint(
            r.sparbar
                .checkpoint
                .as_ref()
                .ok_or_else(|| "it has no sparbar.checkpoint".to_string())
                .and_then(parse_checkpoint),
        )),
        (Stream::Security, Some("sparbar.gap")) => Some(SpecialBody::Gap(
            r.sparbar
                .gap
                .as_ref()
                .ok_or_else(|| "it has no sparbar.gap".to_string())
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

fn parse_checkpoint(v: &Value) -> Result<Checkpoint, String> {
    let text = |k: &str| {
        v[k].as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("sparbar.checkpoint.{k} is not a string"))
    };
    let streams = v["streams"]
        .as_array()
        .ok_or("sparbar.checkpoint.streams is not a list")?;
    let mut heads = Vec::with_capacity(streams.len());
    for (i, h) in streams.iter().enumerate() {
        let bad = |what: &str| format!("sparbar.checkpoint.streams[{i}].{what}");
        let stream = h["stream"]
            .as_str()
            .and_then(Stream::from_name)
            .ok_or_else(|| bad("stream is not \"access\" or \"security\""))?;
        let seq = h["sequence"]
            .as_u64()
            .filter(|&n| n <= MAX_SEQ)
            .ok_or_else(|| bad("sequence is not a sequence number"))?;
        let hash = h["hash"]
            .as_str()
            .and_then(chain::unhex::<32>)
            .ok_or_else(|| bad("hash is not 64 hex digits"))?;
        heads.push(Head { stream, seq, hash });
    }
    let signature = chain::unhex::<64>(&text("signature")?)
        .ok_or("sparbar.checkpoint.signature is not 128 hex digits")?;
    Ok(Checkpoint {
        heads,
        key_id: text("key_id")?,
        public_key: text("public_key")?,
        signature,
    })
}

fn parse_gap(v: &Value) -> Result<Gap, String> {
    let stream = match v["stream"].as_str() {
        Some("all") => None,
        Some(name) if Stream::from_name(name).is_some() => Stream::from_name(name),
        _ => return Err("sparbar.gap.stream is not \"access\", \"security\" or \"all\"".into()),
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
                return Err(format!(
                    "sparbar.gap.first_sequence/last_sequence are {a}/{b}; expected two sequences, first <= last"
                ))
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

/// Per file and stream while reading: the highest sequence so far and where it was.
#[derive(Debug, Default, Clone, Copy)]
struct FileStream {
    max: Option<(u64, u64)>,
    /// The higher record the previous record of this stream came after, if it was out of order.
    last_cand: Option<(u64, u64)>,
}

/// Consecutive lines that are not sealed records, reported as one problem.
struct BadRun {
    first: u64,
    last: u64,
    reason: String,
}

struct Reader<'a> {
    paths: &'a [PathBuf],
    names: Vec<String>,
    recs: [Vec<Rec>; 2],
    cands: Vec<Cand>,
    checkpoints: Vec<Special<Checkpoint>>,
    gaps: Vec<Special<Gap>>,
    /// Keyed by the record (sequence, hash), so a copy delivered twice says it once.
    sink_notes: BTreeMap<(u64, [u8; 32]), String>,
    problems: Vec<Problem>,
    notes: Vec<String>,
    warnings: Vec<String>,
    lines: u64,
    runs: u64,
}

/// `1 record`, `2 records`.
fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

fn short(h: &[u8; 32]) -> String {
    chain::hex(&h[..8]) + "…"
}

fn range_text(a: u64, b: u64) -> String {
    if a == b {
        format!("record {a}")
    } else {
        format!("records {a}..{b}")
    }
}

impl<'a> Reader<'a> {
    fn new(paths: &'a [PathBuf]) -> Reader<'a> {
        Reader {
            paths,
            names: paths.iter().map(|p| p.display().to_string()).collect(),
            recs: [Vec::new(), Vec::new()],
            cands: Vec::new(),
            checkpoints: Vec::new(),
            gaps: Vec::new(),
            sink_notes: BTreeMap::new(),
            problems: Vec::new(),
            notes: Vec::new(),
            warnings: Vec::new(),
            lines: 0,
            runs: 0,
        }
    }

    fn loc(&self, file: u32, line: u64) -> String {
        format!("{}:{line}", self.names[file as usize])
    }

    fn rloc(&self, r: &Rec) -> String {
        self.loc(r.file, r.line)
    }

    fn problem(
        &mut self,
        kind: Kind,
        stream: Option<Stream>,
        seqs: Option<(u64, u64)>,
        at: Option<(u32, u64)>,
        message: String,
    ) {
        self.problems.push(Problem {
            kind,
            stream,
            seqs,
            at: at.map(|(f, l)| (f as usize, l)),
            message,
        });
    }

    fn read_file(&mut self, index: usize) -> Result<(), VerifyError> {
        let path = &self.paths[index];
        let file = index as u32;
        let read_err = |line: u64| {
            let path = path.clone();
            move |source| VerifyError::Read { path, line, source }
        };
        let f = File::open(path).map_err(|source| VerifyError::Open {
            path: path.clone(),
            source,
        })?;
        let mut raw = BufReader::with_capacity(1 << 18, f);
        let gz = raw
            .fill_buf()
            .map_err(read_err(0))?
            .starts_with(&[0x1f, 0x8b]);
        let mut input: Box<dyn BufRead> = if gz {
            Box::new(BufReader::with_capacity(
                1 << 18,
                flate2::bufread::MultiGzDecoder::new(raw),
            ))
        } else {
            Box::new(raw)
        };
        let mut buf = Vec::with_capacity(4096);
        let mut line = 0u64;
        let mut state = [FileStream::default(); 2];
        let mut bad: Option<BadRun> = None;
        loop {
            buf.clear();
            match input.read_until(b'\n', &mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e)
                    if gz
                        && matches!(
                            e.kind(),
                            io::ErrorKind::InvalidData
                                | io::ErrorKind::InvalidInput
                                | io::ErrorKind::UnexpectedEof
                        ) =>
                {
                    self.flush_bad(file, &mut bad);
                    self.problem(
                        Kind::Unreadable,
                        None,
                        None,
                        Some((file, line + 1)),
                        format!("the compressed data is damaged or cut after line {line} ({e}); the rest of the file cannot be read"),
                    );
                    break;
                }
                Err(e) => return Err(read_err(line)(e)),
            }
            line += 1;
            if buf.last() == Some(&b'\n') {
                buf.pop();
            }
            self.line(file, line, &buf, &mut state, &mut bad);
        }
        self.flush_bad(file, &mut bad);
        self.lines += line;
        Ok(())
    }

    fn flush_bad(&mut self, file: u32, bad: &mut Option<BadRun>) {
        let Some(b) = bad.take() else { return };
        let message = if b.first == b.last {
            format!("not a sealed record: {}", b.reason)
        } else {
            format!(
                "lines {}..{} ({} lines) are not sealed records; the first: {}",
                b.first,
                b.last,
                b.last - b.first + 1,
                b.reason
            )
        };
        self.problem(Kind::NotSealed, None, None, Some((file, b.first)), message);
    }

    fn line(
        &mut self,
        file: u32,
        line: u64,
        bytes: &[u8],
        state: &mut [FileStream; 2],
        bad: &mut Option<BadRun>,
    ) {
        let p = match parse_line(bytes) {
            Ok(p) => p,
            Err(reason) => {
                match bad {
                    Some(b) if b.last + 1 == line => b.last = line,
                    _ => {
                        self.flush_bad(file, bad);
                        *bad = Some(BadRun {
                            first: line,
                            last: line,
                            reason,
                        });
                    }
                }
                return;
            }
        };
        self.flush_bad(file, bad);
        let hash = chain::hash(bytes);
        let st = &mut state[si(p.stream)];
        match st.max {
            Some((mseq, mline)) if p.seq < mseq => {
                if st.last_cand != Some((mseq, mline)) {
                    self.runs += 1;
                }
                st.last_cand = Some((mseq, mline));
                self.cands.push(Cand {
                    stream: p.stream,
                    seq: p.seq,
                    hash,
                    file,
                    line,
                    after_seq: mseq,
                    after_line: mline,
                    run: self.runs,
                });
            }
            _ => {
                if st.max.is_none_or(|(m, _)| p.seq > m) {
                    st.max = Some((p.seq, line));
                }
                st.last_cand = None;
            }
        }
        self.recs[si(p.stream)].push(Rec {
            seq: p.seq,
            hash,
            prev: p.prev,
            file,
            line,
        });
        match p.special {
            Some(SpecialBody::Checkpoint(body)) => self.checkpoints.push(Special {
                file,
                line,
                seq: p.seq,
                hash,
                body,
            }),
            Some(SpecialBody::Gap(body)) => self.gaps.push(Special {
                file,
                line,
                seq: p.seq,
                hash,
                body,
            }),
            Some(SpecialBody::SinkNote(text)) => {
                let at = self.loc(file, line);
                self.sink_notes
                    .entry((p.seq, hash))
                    .or_insert_with(|| format!("{at}: {text}"));
            }
            None => {}
        }
    }

    fn analyze(mut self, keys: &[(VerifyingKey, String)], sink: Option<&str>) -> Report {
        // The same checkpoint or gap record delivered twice counts once.
        self.checkpoints
            .sort_by_key(|s| (s.seq, s.hash, s.file, s.line));
        self.checkpoints
            .dedup_by(|a, b| (a.seq, a.hash) == (b.seq, b.hash));
        self.gaps.sort_by_key(|s| (s.seq, s.hash, s.file, s.line));
        self.gaps
            .dedup_by(|a, b| (a.seq, a.hash) == (b.seq, b.hash));

        let signed = self.check_checkpoints(keys);
        let sink_notes = std::mem::take(&mut self.sink_notes);
        self.notes.extend(sink_notes.into_values());
        let stated = self.stated_gaps(sink);

        let mut streams = Vec::new();
        let cands = std::mem::take(&mut self.cands);
        for s in STREAMS {
            let recs = std::mem::take(&mut self.recs[si(s)]);
            streams.push(self.check_stream(s, recs, &cands, &signed.heads[si(s)], &stated[si(s)]));
        }
        for s in &mut streams {
            s.checkpoints = signed.per_stream[si(s.stream)];
        }
        if self.checkpoints.is_empty() {
            self.warnings.push("no checkpoint record in the files: nothing is signed, so a rewrite of a whole stream or a truncation could not be detected".into());
        }
        let key_ids: Vec<String> = if keys.is_empty() {
            signed.trail_keys.iter().cloned().collect()
        } else {
            keys.iter().map(|(_, id)| id.clone()).collect()
        };
        if keys.is_empty() && !self.checkpoints.is_empty() {
            self.warnings.push(format!(
                "no --key given: the checkpoints were checked with the public key the trail itself carries ({}); that proves nothing against someone who can rewrite the whole trail: check with --key <checkpoint.pub> kept apart from it",
                if key_ids.is_empty() { "none usable".to_string() } else { key_ids.join(", ") }
            ));
        }
        let sealed = streams.iter().map(|s| s.lines).sum();
        Report {
            files: self.names,
            lines: self.lines,
            sealed,
            key_source: if keys.is_empty() {
                KeySource::Trail
            } else {
                KeySource::Given
            },
            key_ids,
            checkpoints_found: self.checkpoints.len() as u64,
            checkpoints_verified: signed.verified,
            checkpoints_failed: self.checkpoints.len() as u64 - signed.verified,
            streams,
            notes: self.notes,
            warnings: self.warnings,
            problems: self.problems,
        }
    }

    /// Verifies every checkpoint's signature; returns the heads of the valid ones.
    fn check_checkpoints(&mut self, keys: &[(VerifyingKey, String)]) -> Signed {
        let mut out = Signed::default();
        let cps = std::mem::take(&mut self.checkpoints);
        for cp in &cps {
            let at = Some((cp.file, cp.line));
            let what = format!("checkpoint (security record {})", cp.seq);
            let c = match &cp.body {
                Ok(c) => c,
                Err(why) => {
                    self.problem(
                        Kind::CheckpointMalformed,
                        Some(Stream::Security),
                        Some((cp.seq, cp.seq)),
                        at,
                        format!("{what} cannot be read: {why}"),
                    );
                    continue;
                }
            };
            let public = if keys.is_empty() {
                match chain::parse_public(&c.public_key) {
                    None => {
                        self.problem(
                            Kind::CheckpointMalformed,
                            Some(Stream::Security),
                            Some((cp.seq, cp.seq)),
                            at,
                            format!("{what}: its public_key is not an Ed25519 public key"),
                        );
                        continue;
                    }
                    Some(pk) if chain::key_id(&pk) != c.key_id => {
                        self.problem(
                            Kind::CheckpointKey,
                            Some(Stream::Security),
                            Some((cp.seq, cp.seq)),
                            at,
                            format!(
                                "{what}: its key_id {} is not the id of its public_key ({}): altered",
                                c.key_id,
                                chain::key_id(&pk)
                            ),
                        );
                        continue;
                    }
                    Some(pk) => {
                        out.trail_keys.insert(c.key_id.clone());
                        pk
                    }
                }
            } else {
                match keys.iter().find(|(_, id)| *id == c.key_id) {
                    Some((pk, _)) => *pk,
                    None => {
                        self.problem(
                            Kind::CheckpointKey,
                            Some(Stream::Security),
                            Some((cp.seq, cp.seq)),
                            at,
                            format!(
                                "{what} is signed with key {}, not with the given key {}: forged, or written by an agent with another key",
                                c.key_id,
                                keys.iter().map(|(_, id)| id.as_str()).collect::<Vec<_>>().join(", ")
                            ),
                        );
                        continue;
                    }
                }
            };
            if !chain::verify_signature(&public, &c.heads, &c.signature) {
                self.problem(
                    Kind::CheckpointSignature,
                    Some(Stream::Security),
                    Some((cp.seq, cp.seq)),
                    at,
                    format!(
                        "the signature of {what} does not verify with key {}: its heads or its signature were altered, or it was forged",
                        c.key_id
                    ),
                );
                continue;
            }
            out.verified += 1;
            // A stream with no record yet has head 0: signed, but nothing to compare.
            for h in c.heads.iter().filter(|h| h.seq > 0) {
                out.per_stream[si(h.stream)] += 1;
                let v = out.heads[si(h.stream)].entry(h.seq).or_default();
                if !v.iter().any(|(x, _)| *x == h.hash) {
                    v.push((h.hash, (cp.file, cp.line)));
                }
            }
        }
        self.checkpoints = cps;
        out
    }

    /// The gap records that state sequence ranges (for `sink`, when given), per stream, sorted;
    /// the others become notes.
    fn stated_gaps(&mut self, sink: Option<&str>) -> [Vec<StatedGap>; 2] {
        let mut out: [Vec<StatedGap>; 2] = [Vec::new(), Vec::new()];
        let gaps = std::mem::take(&mut self.gaps);
        for g in &gaps {
            let at = self.loc(g.file, g.line);
            let body = match &g.body {
                Ok(b) => b,
                Err(why) => {
                    self.warnings
                        .push(format!("{at}: a gap record cannot be read: {why}"));
                    continue;
                }
            };
            let when = match (&body.start, &body.end) {
                (Some(a), Some(b)) => format!(", {a} to {b}"),
                _ => String::new(),
            };
            let for_sink = body
                .sink
                .as_ref()
                .map(|s| format!(" for sink {s:?}"))
                .unwrap_or_default();
            match body.range {
                None => self.notes.push(match (body.records, body.stream) {
                    (Some(n), Some(s)) => format!(
                        "{at}: stated gap: {} never spooled ({}{when}){for_sink}",
                        plural(n, &format!("{} record", s.name())),
                        body.reason
                    ),
                    (_, s) => format!(
                        "{at}: stated gap: {} ({}{when}){for_sink}",
                        s.map_or("neither stream was observed".to_string(), |s| format!(
                            "the {} stream was not observed",
                            s.name()
                        )),
                        body.reason
                    ),
                }),
                Some((a, b)) => {
                    if let (Some(want), Some(theirs)) = (sink, body.sink.as_deref()) {
                        if want != theirs {
                            self.notes.push(format!(
                                "{at}: a stated gap of {} {} for sink {theirs:?} does not apply to sink {want:?}",
                                body.stream.map_or("all", |s| s.name()),
                                range_text(a, b)
                            ));
                            continue;
                        }
                    }
                    for s in body.stream.map_or(STREAMS.to_vec(), |s| vec![s]) {
                        out[si(s)].push(StatedGap {
                            first: a,
                            last: b,
                            text: format!("{at}: {}{when}{for_sink}", body.reason),
                        });
                    }
                }
            }
        }
        for v in &mut out {
            v.sort_by_key(|g| (g.first, g.last));
        }
        self.gaps = gaps;
        out
    }

    fn check_stream(
        &mut self,
        s: Stream,
        mut recs: Vec<Rec>,
        cands: &[Cand],
        heads: &SignedHeads,
        stated: &[StatedGap],
    ) -> StreamSummary {
        let name = s.name();
        let signed_through = heads.keys().next_back().copied();
        let mut sum = StreamSummary {
            stream: s,
            first: None,
            last: None,
            records: 0,
            lines: recs.len() as u64,
            duplicates: 0,
            missing: 0,
            stated_gap: 0,
            checkpoints: 0,
            signed_through,
            signed: 0,
            unsigned_tail: 0,
        };
        if recs.is_empty() {
            if let Some(h) = signed_through {
                self.notes.push(format!("{name}: no records in the files given; the checkpoints sign records up to {h} (another file or sink may hold them)"));
            }
            return sum;
        }
        recs.sort_unstable_by(|a, b| {
            (a.seq, a.hash, a.file, a.line).cmp(&(b.seq, b.hash, b.file, b.line))
        });

        self.check_order(s, &recs, cands);

        // Group starts by sequence (plus an end sentinel).
        let mut starts: Vec<usize> = Vec::new();
        for i in 0..recs.len() {
            if i == 0 || recs[i].seq != recs[i - 1].seq {
                starts.push(i);
            }
        }
        let ng = starts.len();
        starts.push(recs.len());
        sum.records = ng as u64;
        sum.first = Some(recs[0].seq);
        sum.last = Some(recs[recs.len() - 1].seq);

        // Copies: identical ones are duplicates; different ones conflict. The copy the chain (or
        // a checkpoint) vouches for is moved to the front of its group: it stands for the record.
        for g in 0..ng {
            let (a, b) = (starts[g], starts[g + 1]);
            if b - a == 1 {
                continue;
            }
            let variants: Vec<usize> = (a..b)
                .filter(|&i| i == a || recs[i].hash != recs[i - 1].hash)
                .collect();
            sum.duplicates += ((b - a) - variants.len()) as u64;
            if variants.len() == 1 {
                continue;
            }
            let seq = recs[a].seq;
            let next = if g + 1 < ng && recs[starts[g + 1]].seq == seq + 1 {
                &recs[starts[g + 1]..starts[g + 2]]
            } else {
                &recs[0..0]
            };
            let by_checkpoint = variants.iter().copied().find(|&i| {
                heads
                    .get(&seq)
                    .is_some_and(|v| v.iter().any(|(h, _)| *h == recs[i].hash))
            });
            let by_next = variants
                .iter()
                .copied()
                .find(|&i| next.iter().any(|r| r.prev == recs[i].hash));
            let earliest = variants
                .iter()
                .copied()
                .min_by_key(|&i| (recs[i].file, recs[i].line))
                .unwrap_or(a);
            let rep = by_checkpoint.or(by_next).unwrap_or(earliest);
            let mut listed: Vec<String> = variants
                .iter()
                .take(4)
                .map(|&i| self.rloc(&recs[i]))
                .collect();
            if variants.len() > 4 {
                listed.push(format!("and {} more", variants.len() - 4));
            }
            let which = if by_checkpoint.is_some() {
                format!(
                    "; the signed checkpoint vouches for the one at {}",
                    self.rloc(&recs[rep])
                )
            } else if by_next.is_some() {
                format!(
                    "; record {} chains to the one at {}",
                    seq + 1,
                    self.rloc(&recs[rep])
                )
            } else {
                String::new()
            };
            let at = (recs[earliest].file, recs[earliest].line);
            self.problem(
                Kind::Conflict,
                Some(s),
                Some((seq, seq)),
                Some(at),
                format!(
                    "{} different lines are record {seq} of {name}: {}{which}",
                    variants.len(),
                    listed.join(", ")
                ),
            );
            recs.swap(a, rep);
        }

        let recs = &recs;
        let starts = &starts;
        let rep = |g: usize| &recs[starts[g]];
        // Does record g's chain.prev match the record before it? None: that one is not present.
        let prev_ok = |g: usize| -> Option<bool> {
            let r = rep(g);
            if r.seq == 1 {
                Some(r.prev == chain::ZERO_HASH)
            } else if g > 0 && rep(g - 1).seq + 1 == r.seq {
                Some(r.prev == rep(g - 1).hash)
            } else {
                None
            }
        };
        let next_ok = |g: usize| -> Option<bool> {
            if g + 1 < ng && rep(g + 1).seq == rep(g).seq + 1 {
                prev_ok(g + 1)
            } else {
                None
            }
        };
        let signed_by = |g: usize| -> Option<(u32, u64)> {
            let r = rep(g);
            heads
                .get(&r.seq)
                .and_then(|v| v.iter().find(|(h, _)| *h == r.hash))
                .map(|(_, at)| *at)
        };

        // Broken links, in runs of consecutive ones.
        let mut g = 0;
        while g < ng {
            if prev_ok(g) != Some(false) {
                g += 1;
                continue;
            }
            let gs = g;
            while g + 1 < ng && rep(g + 1).seq == rep(g).seq + 1 && prev_ok(g + 1) == Some(false) {
                g += 1;
            }
            let ge = g;
            g += 1;
            if gs == ge {
                let m = rep(gs);
                if m.seq == 1 {
                    self.problem(Kind::Changed, Some(s), Some((1, 1)), Some((m.file, m.line)),
                        format!("record 1 of {name}: its chain.prev is not 64 zeros, as the first record of a stream must have (its chain.prev or its event.sequence was edited)"));
                    continue;
                }
                let n = rep(gs - 1);
                let (nl, ml) = (self.rloc(n), self.rloc(m));
                if let (Some(cp), None) = (signed_by(gs - 1), signed_by(gs)) {
                    self.problem(Kind::Changed, Some(s), Some((m.seq, m.seq)), Some((m.file, m.line)),
                        format!("record {} of {name} changed: its chain.prev is not the hash of record {} ({nl}), which the checkpoint at {} signed", m.seq, n.seq, self.loc(cp.0, cp.1)));
                } else if next_ok(gs) == Some(true) || signed_by(gs).is_some() {
                    let by = match signed_by(gs) {
                        Some(cp) => format!("the checkpoint at {}", self.loc(cp.0, cp.1)),
                        None => format!("record {} ({})", m.seq + 1, self.rloc(rep(gs + 1))),
                    };
                    self.problem(Kind::Changed, Some(s), Some((n.seq, n.seq)), Some((n.file, n.line)),
                        format!("record {} of {name} changed: its hash no longer matches the chain.prev that record {} ({ml}) holds, and record {} is itself confirmed by {by}", n.seq, m.seq, m.seq));
                } else {
                    self.problem(Kind::Changed, Some(s), Some((n.seq, m.seq)), Some((n.file, n.line)),
                        format!("record {} of {name}, or the chain.prev of record {} ({ml}), was changed: record {}'s chain.prev is not the hash of record {}, and nothing after record {} tells which", n.seq, m.seq, m.seq, n.seq, m.seq));
                }
                continue;
            }
            // Records gs..ge-1: neither side of each one matches its neighbours.
            if ge - gs > 8 {
                let (a, b) = (rep(gs), rep(ge - 1));
                self.problem(Kind::Changed, Some(s), Some((a.seq, b.seq)), Some((a.file, a.line)),
                    format!("records {}..{} of {name} changed ({} records, up to {}): none of them has the hash of the record before it as its chain.prev, nor the hash the record after it holds (rewritten or re-encoded)", a.seq, b.seq, ge - gs, self.rloc(b)));
                continue;
            }
            for k in gs..ge {
                let r = rep(k);
                let before = if r.seq == 1 {
                    "its chain.prev is not 64 zeros".to_string()
                } else {
                    format!(
                        "its chain.prev is not the hash of record {} ({})",
                        r.seq - 1,
                        self.rloc(rep(k - 1))
                    )
                };
                let after = format!("record {} ({})", r.seq + 1, self.rloc(rep(k + 1)));
                let message = match signed_by(k) {
                    Some(cp) => format!(
                        "record {} of {name} is the one the checkpoint at {} signed, yet {before} and {after} does not chain to it: the record before it and the chain.prev of the record after it were changed",
                        r.seq,
                        self.loc(cp.0, cp.1)
                    ),
                    None if r.seq == 1 => format!(
                        "record 1 of {name} changed: {before}, and its hash is not the chain.prev of {after}"
                    ),
                    None => format!(
                        "record {} of {name} changed: {before}, and its hash is not the chain.prev of {after} (its chain.prev was edited, or record {} was changed as well)",
                        r.seq,
                        r.seq - 1
                    ),
                };
                self.problem(
                    Kind::Changed,
                    Some(s),
                    Some((r.seq, r.seq)),
                    Some((r.file, r.line)),
                    message,
                );
            }
        }

        // Holes: between the lowest sequence (extended down by gaps that state what precedes
        // it) and the highest present, signed or stated.
        let first = rep(0).seq;
        let last = rep(ng - 1).seq;
        let upper = last
            .max(signed_through.unwrap_or(0))
            .max(stated.iter().map(|x| x.last).max().unwrap_or(0));
        let mut lower = first;
        while let Some(x) = stated
            .iter()
            .find(|x| x.first < lower && x.last + 1 >= lower)
        {
            lower = x.first;
        }
        if lower > 1 {
            self.notes.push(format!(
                "{name}: the trail starts at record {lower}: records 1..{} are not in the files given (older rotated files, or another sink, may hold them)",
                lower - 1
            ));
        }
        let mut holes: Vec<(u64, u64, Option<usize>, Option<usize>)> = Vec::new();
        if lower < first {
            holes.push((lower, first - 1, None, Some(0)));
        }
        for g in 0..ng - 1 {
            if rep(g + 1).seq > rep(g).seq + 1 {
                holes.push((rep(g).seq + 1, rep(g + 1).seq - 1, Some(g), Some(g + 1)));
            }
        }
        if upper > last {
            holes.push((last + 1, upper, Some(ng - 1), None));
        }
        for (a, b, before, after) in holes {
            let mut cur = a;
            let mut pieces: Vec<(u64, u64, Option<&StatedGap>)> = Vec::new();
            for x in stated {
                if x.last < cur {
                    continue;
                }
                if x.first > b {
                    break;
                }
                if x.first > cur {
                    pieces.push((cur, x.first - 1, None));
                }
                let end = x.last.min(b);
                pieces.push((cur.max(x.first), end, Some(x)));
                cur = end + 1;
                if cur > b {
                    break;
                }
            }
            if cur <= b {
                pieces.push((cur, b, None));
            }
            for (x, y, why) in pieces {
                let n = y - x + 1;
                if let Some(gap) = why {
                    sum.stated_gap += n;
                    self.notes.push(format!(
                        "{} of {name} are not in the files: a stated gap ({})",
                        range_text(x, y),
                        gap.text
                    ));
                    continue;
                }
                sum.missing += n;
                let context = match (before, after) {
                    (Some(p), Some(q)) => format!(
                        "between record {} ({}) and record {} ({})",
                        rep(p).seq,
                        self.rloc(rep(p)),
                        rep(q).seq,
                        self.rloc(rep(q))
                    ),
                    (None, Some(q)) => format!(
                        "before record {} ({}), the first in the files",
                        rep(q).seq,
                        self.rloc(rep(q))
                    ),
                    (Some(p), _) => {
                        let cp = heads
                            .range(x..)
                            .next()
                            .and_then(|(_, v)| v.first())
                            .map(|(_, at)| {
                                format!("; the checkpoint at {} signed them", self.loc(at.0, at.1))
                            })
                            .unwrap_or_default();
                        format!(
                            "after record {} ({}), the last in the files{cp} (deleted, or not delivered yet)",
                            rep(p).seq,
                            self.rloc(rep(p))
                        )
                    }
                    (None, None) => String::new(),
                };
                let at = after.or(before).map(|g| (rep(g).file, rep(g).line));
                self.problem(
                    Kind::Missing,
                    Some(s),
                    Some((x, y)),
                    at,
                    format!(
                        "{} of {name} missing (deleted?): {context}",
                        range_text(x, y)
                    ),
                );
            }
        }

        // Every signed head present must be the record signed.
        for (&seq, v) in heads {
            let i = recs.partition_point(|r| r.seq < seq);
            if i >= recs.len() || recs[i].seq != seq {
                continue;
            }
            let copies = &recs[i..starts[starts.partition_point(|&x| x <= i)]];
            for (h, cp) in v {
                if copies.iter().any(|r| r.hash == *h) {
                    continue;
                }
                let r = &recs[i];
                self.problem(
                    Kind::CheckpointMismatch,
                    Some(s),
                    Some((seq, seq)),
                    Some((r.file, r.line)),
                    format!(
                        "record {seq} of {name} differs from the signed checkpoint at {}: it hashes to {}, the checkpoint signed {} (the record, or the chain up to it, was rewritten)",
                        self.loc(cp.0, cp.1),
                        short(&r.hash),
                        short(h)
                    ),
                );
            }
        }

        if let Some(h) = signed_through {
            let covered = starts[..ng].partition_point(|&i| recs[i].seq <= h);
            sum.signed = covered as u64;
        }
        sum.unsigned_tail = sum.records - sum.signed;
        sum
    }

    /// Reports records that come after a higher sequence of their stream in the same file,
    /// except repeats of copies earlier in that file (a redelivered batch).
    fn check_order(&mut self, s: Stream, recs: &[Rec], cands: &[Cand]) {
        let out_of_order: Vec<&Cand> = cands
            .iter()
            .filter(|c| c.stream == s)
            .filter(|c| {
                let lo = recs.partition_point(|r| (r.seq, r.hash) < (c.seq, c.hash));
                !recs[lo..]
                    .iter()
                    .take_while(|r| r.seq == c.seq && r.hash == c.hash)
                    .any(|r| r.file == c.file && r.line < c.line)
            })
            .collect();
        for run in out_of_order.chunk_by(|a, b| a.run == b.run) {
            let c = run[0];
            let after = format!(
                "record {} ({})",
                c.after_seq,
                self.loc(c.file, c.after_line)
            );
            let message = if run.len() == 1 {
                format!(
                    "record {} of {} comes after {after} in the same file: reordered",
                    c.seq,
                    s.name()
                )
            } else {
                let lo = run.iter().map(|c| c.seq).min().unwrap_or(c.seq);
                let hi = run.iter().map(|c| c.seq).max().unwrap_or(c.seq);
                format!(
                    "{} records of {} ({lo}..{hi}, to line {}) come after {after} in the same file: reordered",
                    run.len(),
                    s.name(),
                    run[run.len() - 1].line
                )
            };
            let lo = run.iter().map(|c| c.seq).min().unwrap_or(c.seq);
            let hi = run.iter().map(|c| c.seq).max().unwrap_or(c.seq);
            self.problem(
                Kind::Reordered,
                Some(s),
                Some((lo, hi)),
                Some((c.file, c.line)),
                message,
            );
        }
    }
}

/// Per stream: sequence → the hashes valid checkpoints signed for it, each with where that
/// checkpoint is (file, line).
type SignedHeads = BTreeMap<u64, Vec<([u8; 32], (u32, u64))>>;

/// The heads of the checkpoints whose signature verified.
#[derive(Default)]
struct Signed {
    /// Per stream: sequence → the hashes signed for it, with where the checkpoint is.
    heads: [SignedHeads; 2],
    per_stream: [u64; 2],
    verified: u64,
    trail_keys: BTreeSet<String>,
}

/// A sequence range a gap record states was deleted, and what it says.
struct StatedGap {
    first: u64,
    last: u64,
    text: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ship::chain::{checkpoint_line, seal, Signer_};

    /// A stream's chain as the agent would seal it, with the bodies kept for re-sealing.
    struct Chain {
        stream: Stream,
        bodies: Vec<Vec<u8>>,
        lines: Vec<Vec<u8>>,
        prev: [u8; 32],
    }

    impl Chain {
        fn new(stream: Stream) -> Chain {
            Chain {
                stream,
                bodies: Vec::new(),
                lines: Vec::new(),
                prev: chain::ZERO_HASH,
            }
        }
        fn push(&mut self, body: &[u8]) {
            let line = seal(body, self.stream, self.lines.len() as u64 + 1, &self.prev);
            self.prev = chain::hash(&line);
            self.bodies.push(body.to_vec());
            self.lines.push(line);
        }
        fn head(&self) -> Head {
            Head {
                stream: self.stream,
                seq: self.lines.len() as u64,
                hash: self.prev,
            }
        }
    }

    fn access_body(i: u64) -> Vec<u8> {
        format!(r#"{{"@timestamp":"2026-12-01T10:00:00Z","event":{{"id":"a{i}","dataset":"sparbar.access"}},"user":{{"id":"user-{i}"}}}}"#).into_bytes()
    }

    fn gap_body(first: u64, last: u64, sink: &str) -> Vec<u8> {
        format!(r#"{{"@timestamp":"2026-12-01T10:00:00Z","event":{{"id":"g","dataset":"sparbar.gap","action":"spool_full"}},"sparbar":{{"gap":{{"stream":"access","reason":"spool_full","sink":"{sink}","first_sequence":{first},"last_sequence":{last},"records":{}}}}}}}"#, last - first + 1).into_bytes()
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        trail: PathBuf,
        key: PathBuf,
        signer: Signer_,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let trail = dir.path().join("trail");
        std::fs::create_dir_all(&keys).unwrap();
        std::fs::create_dir_all(&trail).unwrap();
        let signer = Signer_::load_or_create(&keys).unwrap();
        Fixture {
            key: keys.join(chain::PUB_FILE),
            trail,
            signer,
            _dir: dir,
        }
    }

    struct Trail {
        access: Chain,
        security: Chain,
    }

    /// Access records 1..=signed, a checkpoint of both heads in the security stream (after an
    /// agent record and the optional gap record), then `tail` more access records.
    fn build(signer: &Signer_, signed: u64, tail: u64, gap: Option<(u64, u64, &str)>) -> Trail {
        let mut a = Chain::new(Stream::Access);
        for i in 1..=signed {
            a.push(&access_body(i));
        }
        let mut s = Chain::new(Stream::Security);
        s.push(br#"{"event":{"id":"s1","dataset":"sparbar.agent","action":"started"}}"#);
        if let Some((f, l, sink)) = gap {
            s.push(&gap_body(f, l, sink));
        }
        let cp = checkpoint_line(signer, &[a.head(), s.head()], "cp1", 0, "host");
        s.push(&cp);
        for i in signed + 1..=signed + tail {
            a.push(&access_body(i));
        }
        Trail {
            access: a,
            security: s,
        }
    }

    fn write(path: &Path, lines: &[Vec<u8>]) {
        let mut out = Vec::new();
        for l in lines {
            out.extend_from_slice(l);
            out.push(b'\n');
        }
        std::fs::write(path, out).unwrap();
    }

    impl Fixture {
        fn write(&self, t: &Trail) {
            write(&self.trail.join("access.jsonl"), &t.access.lines);
            write(&self.trail.join("security.jsonl"), &t.security.lines);
        }
        fn check(&self) -> Report {
            self.check_with(std::slice::from_ref(&self.key), None)
        }
        fn check_with(&self, keys: &[PathBuf], sink: Option<&str>) -> Report {
            verify(&Options {
                paths: vec![self.trail.clone()],
                keys: keys.to_vec(),
                sink: sink.map(str::to_string),
            })
            .unwrap()
        }
    }

    fn text(r: &Report) -> String {
        let mut v = Vec::new();
        r.write_human(&mut v).unwrap();
        String::from_utf8(v).unwrap()
    }

    fn at(r: &Report, p: &Problem) -> String {
        let (f, l) = p.at.expect("a located problem");
        format!(
            "{}:{l}",
            Path::new(&r.files[f])
                .file_name()
                .unwrap()
                .to_string_lossy()
        )
    }

    /// The only problem, with the report shown when there is not exactly one.
    fn only(r: &Report) -> &Problem {
        assert_eq!(r.problems.len(), 1, "{}", text(r));
        &r.problems[0]
    }

    fn access(r: &Report) -> &StreamSummary {
        &r.streams[0]
    }

    #[test]
    fn a_clean_trail_passes() {
        let f = fixture();
        let t = build(&f.signer, 10, 3, None);
        f.write(&t);
        let r = f.check();
        assert!(r.ok(), "{}", text(&r));
        let a = access(&r);
        assert_eq!((a.first, a.last, a.records), (Some(1), Some(13), 13));
        assert_eq!(
            (a.signed_through, a.signed, a.unsigned_tail),
            (Some(10), 10, 3)
        );
        assert_eq!(a.checkpoints, 1);
        assert_eq!(r.checkpoints_verified, 1);
        assert_eq!(r.key_source, KeySource::Given);
        let out = text(&r);
        assert!(out.contains("3 records after the last checkpoint are chained but not yet signed: a truncation there could not be detected"), "{out}");
        assert!(out.ends_with("OK: no edited, deleted, reordered or conflicting record found\n"));
        assert!(r.warnings.is_empty(), "{out}");
        assert_eq!(r.json()["ok"], true);
    }

    #[test]
    fn a_changed_byte_is_blamed_on_that_record() {
        let f = fixture();
        let mut t = build(&f.signer, 10, 0, None);
        let l = &mut t.access.lines[3];
        let i = l.windows(6).position(|w| w == b"user-4").unwrap();
        l[i + 5] = b'9';
        f.write(&t);
        let r = f.check();
        let p = only(&r);
        assert_eq!((p.kind, p.seqs), (Kind::Changed, Some((4, 4))));
        assert_eq!(at(&r, p), "access.jsonl:4");
        assert!(
            p.message.contains("record 4 of access changed"),
            "{}",
            p.message
        );
        assert!(p.message.contains("access.jsonl:5"), "{}", p.message);
        assert_eq!(r.json()["problems"][0]["line"], 4);
    }

    #[test]
    fn an_edited_chain_prev_is_reported_with_both_facts() {
        let f = fixture();
        let mut t = build(&f.signer, 10, 0, None);
        let l = String::from_utf8(t.access.lines[4].clone()).unwrap();
        let prev = chain::hex(&chain::hash(&t.access.lines[3]));
        t.access.lines[4] = l.replace(&prev, &"0".repeat(64)).into_bytes();
        f.write(&t);
        let r = f.check();
        let p = only(&r);
        assert_eq!((p.kind, p.seqs), (Kind::Changed, Some((5, 5))));
        assert_eq!(at(&r, p), "access.jsonl:5");
        assert!(
            p.message.contains("not the hash of record 4 (")
                && p.message.contains("not the chain.prev of record 6 ("),
            "{}",
            p.message
        );
    }

    #[test]
    fn a_removed_line_is_missing() {
        let f = fixture();
        let mut t = build(&f.signer, 10, 0, None);
        t.access.lines.remove(4);
        f.write(&t);
        let r = f.check();
        let p = only(&r);
        assert_eq!((p.kind, p.seqs), (Kind::Missing, Some((5, 5))));
        assert!(p
            .message
            .starts_with("record 5 of access missing (deleted?)"));
        assert!(p.message.contains("access.jsonl:4") && p.message.contains("access.jsonl:5"));
        assert_eq!(access(&r).missing, 1);
    }

    #[test]
    fn a_truncation_of_signed_records_is_missing() {
        let f = fixture();
        let mut t = build(&f.signer, 10, 0, None);
        t.access.lines.truncate(8);
        f.write(&t);
        let r = f.check();
        let p = only(&r);
        assert_eq!((p.kind, p.seqs), (Kind::Missing, Some((9, 10))));
        assert!(
            p.message.contains("security.jsonl:2 signed them"),
            "{}",
            p.message
        );
    }

    #[test]
    fn swapped_lines_are_reordered() {
        let f = fixture();
        let mut t = build(&f.signer, 10, 0, None);
        t.access.lines.swap(2, 3);
        f.write(&t);
        let r = f.check();
        let p = only(&r);
        assert_eq!((p.kind, p.seqs), (Kind::Reordered, Some((3, 3))));
        assert_eq!(at(&r, p), "access.jsonl:4");
        assert!(
            p.message
                .contains("record 3 of access comes after record 4 (")
                && p.message.contains("access.jsonl:3)"),
            "{}",
            p.message
        );
    }

    #[test]
    fn duplicates_and_redelivered_batches_are_not_errors() {
        let f = fixture();
        let mut t = build(&f.signer, 10, 0, None);
        // A batch 5..8 delivered again after 1..10, and record 6 in a second file too.
        let again: Vec<Vec<u8>> = t.access.lines[4..8].to_vec();
        let copy = t.access.lines[5].clone();
        t.access.lines.extend(again);
        f.write(&t);
        write(&f.trail.join("copy.jsonl"), &[copy]);
        let r = f.check();
        assert!(r.ok(), "{}", text(&r));
        assert_eq!(access(&r).duplicates, 5);
        assert_eq!(access(&r).records, 10);
    }

    #[test]
    fn conflicting_copies_are_errors() {
        let f = fixture();
        let t = build(&f.signer, 10, 0, None);
        f.write(&t);
        let other = seal(
            &access_body(99),
            Stream::Access,
            6,
            &chain::hash(&t.access.lines[4]),
        );
        write(&f.trail.join("other.jsonl"), &[other]);
        let r = f.check();
        let p = only(&r);
        assert_eq!((p.kind, p.seqs), (Kind::Conflict, Some((6, 6))));
        assert!(p.message.contains("other.jsonl:1"), "{}", p.message);
        assert!(
            p.message.contains("record 7 chains to the one at")
                || p.message.contains("checkpoint vouches"),
            "{}",
            p.message
        );
    }

    #[test]
    fn a_checkpoint_signed_with_another_key_is_forged() {
        let f = fixture();
        let other = tempfile::tempdir().unwrap();
        let forger = Signer_::load_or_create(other.path()).unwrap();
        let t = build(&forger, 10, 0, None);
        f.write(&t);
        let r = f.check();
        let p = only(&r);
        assert_eq!(p.kind, Kind::CheckpointKey);
        assert_eq!(at(&r, p), "security.jsonl:2");
        assert_eq!(access(&r).signed_through, None);
        // Without --key it verifies, but says what that is worth.
        let r = f.check_with(&[], None);
        assert!(r.ok(), "{}", text(&r));
        assert_eq!(r.key_source, KeySource::Trail);
        assert!(r.warnings[0].contains("proves nothing"), "{:?}", r.warnings);
    }

    #[test]
    fn an_altered_checkpoint_fails_its_signature() {
        let f = fixture();
        let mut t = build(&f.signer, 10, 0, None);
        // Claim a shorter head (a truncation cover-up), re-sealed so the chain holds.
        let cp = checkpoint_line(
            &f.signer,
            &[t.access.head(), t.security.head()],
            "cp",
            0,
            "h",
        );
        let mut v: Value = serde_json::from_slice(&cp).unwrap();
        v["sparbar"]["checkpoint"]["streams"][0]["sequence"] = json!(8);
        let first = t.security.bodies[0].clone();
        t.security = Chain::new(Stream::Security);
        t.security.push(&first);
        t.security.push(&serde_json::to_vec(&v).unwrap());
        t.access.lines.truncate(8);
        f.write(&t);
        let r = f.check();
        let p = only(&r);
        assert_eq!(p.kind, Kind::CheckpointSignature, "{}", text(&r));
    }

    #[test]
    fn a_stated_gap_is_not_a_deletion() {
        let f = fixture();
        let mut t = build(&f.signer, 10, 0, Some((5, 7, "file")));
        t.access.lines.drain(4..7);
        f.write(&t);
        let r = f.check();
        assert!(r.ok(), "{}", text(&r));
        assert_eq!((access(&r).stated_gap, access(&r).missing), (3, 0));
        assert!(r.notes.iter().any(|n| n
            .starts_with("records 5..7 of access are not in the files: a stated gap (")
            && n.contains("spool_full")));
        // Stated for another sink than the one that wrote these files: deleted.
        let r = f.check_with(std::slice::from_ref(&f.key), Some("loki"));
        assert_eq!(only(&r).kind, Kind::Missing);
        // A gap that covers only part of what is absent excuses only that part.
        let mut t = build(&f.signer, 10, 0, Some((5, 6, "file")));
        t.access.lines.drain(4..7);
        f.write(&t);
        let r = f.check();
        let p = only(&r);
        assert_eq!((p.kind, p.seqs), (Kind::Missing, Some((7, 7))));
    }

    #[test]
    fn a_rewritten_chain_is_caught_by_the_checkpoint() {
        let f = fixture();
        let mut t = build(&f.signer, 10, 2, None);
        // Edit record 3 and re-seal everything after it: the chain itself is intact.
        let mut bodies = t.access.bodies.clone();
        bodies[2] = access_body(333);
        let mut forged = Chain::new(Stream::Access);
        for b in &bodies {
            forged.push(b);
        }
        t.access = forged;
        f.write(&t);
        let r = f.check();
        let p = only(&r);
        assert_eq!((p.kind, p.seqs), (Kind::CheckpointMismatch, Some((10, 10))));
        assert_eq!(at(&r, p), "access.jsonl:10");
        assert!(p.message.contains("security.jsonl:2"), "{}", p.message);
    }

    #[test]
    fn lines_that_are_not_sealed_records_are_named() {
        let f = fixture();
        let mut t = build(&f.signer, 4, 0, None);
        t.access.lines.insert(2, b"not json".to_vec());
        t.access
            .lines
            .insert(3, br#"{"event":{"id":"x"}}"#.to_vec());
        f.write(&t);
        let r = f.check();
        let p = only(&r);
        assert_eq!(p.kind, Kind::NotSealed);
        assert_eq!(at(&r, p), "access.jsonl:3");
        assert!(p.message.contains("lines 3..4"), "{}", p.message);
    }

    #[test]
    fn rotated_and_compressed_files_in_a_directory_are_read() {
        use std::io::Write as _;
        let f = fixture();
        let t = build(&f.signer, 10, 0, None);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        for l in &t.access.lines[..6] {
            gz.write_all(l).unwrap();
            gz.write_all(b"\n").unwrap();
        }
        std::fs::write(
            f.trail.join("access.jsonl.20261201T101010Z.gz"),
            gz.finish().unwrap(),
        )
        .unwrap();
        write(&f.trail.join("access.jsonl"), &t.access.lines[6..]);
        write(&f.trail.join("security.jsonl"), &t.security.lines);
        std::fs::write(f.trail.join("notes.txt"), "not part of the trail").unwrap();
        let r = f.check();
        assert!(r.ok(), "{}", text(&r));
        assert_eq!(r.files.len(), 3);
        assert_eq!(access(&r).records, 10);
    }

    #[test]
    fn a_trail_that_starts_late_is_not_an_error() {
        let f = fixture();
        let mut t = build(&f.signer, 10, 0, None);
        t.access.lines.drain(..4);
        f.write(&t);
        let r = f.check();
        assert!(r.ok(), "{}", text(&r));
        assert!(r.notes.iter().any(|n| n.contains("starts at record 5")));
    }

    #[test]
    fn nothing_to_read_is_a_usage_error() {
        let f = fixture();
        assert!(matches!(
            verify(&Options {
                paths: vec![f.trail.clone()],
                ..Options::default()
            }),
            Err(VerifyError::EmptyDir { .. })
        ));
        std::fs::write(f.trail.join("x.jsonl"), "").unwrap();
        assert!(matches!(
            verify(&Options {
                paths: vec![f.trail.clone()],
                ..Options::default()
            }),
            Err(VerifyError::Empty { .. })
        ));
        assert!(matches!(
            verify(&Options {
                paths: vec![f.trail.clone()],
                keys: vec![f.trail.join("x.jsonl")],
                ..Options::default()
            }),
            Err(VerifyError::Key { .. })
        ));
    }
}
