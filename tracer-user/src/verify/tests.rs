//! `sparbar verify` against trails sealed as the agent seals them, then edited, cut, reordered,
//! duplicated, forged or compressed.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::*;
use crate::ship::{
    chain::{self, checkpoint_line, seal, Head, Signer_},
    Stream,
};

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
