//! The checks run once every file was read, per stream: copies of one sequence identical or
//! conflicting, every link of the chain, holes not stated in a gap record, checkpoint signatures
//! and the heads they sign, and order within a file. Their outcome is the [`Report`].

use std::collections::{BTreeMap, BTreeSet};

use ed25519_dalek::VerifyingKey;

use super::{
    reader::{Cand, Reader, Rec},
    report::{plural, si, KeySource, Kind, Report, StreamSummary, STREAMS},
};
use crate::ship::{chain, Stream};

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

impl Reader<'_> {
    pub(super) fn analyze(mut self, keys: &[(VerifyingKey, String)], sink: Option<&str>) -> Report {
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
