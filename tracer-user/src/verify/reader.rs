//! The single pass over the files: each line is parsed and kept as little as verification
//! needs (a [`Rec`] per sealed record, checkpoint and gap records whole), records that come after
//! a higher sequence of their stream in the same file are noted, and runs of lines that are not
//! sealed records become one problem each. [`super::check`] judges what was kept.

use std::{collections::BTreeMap, io, path::PathBuf};

use super::{
    input::{self, VerifyError},
    parse::{parse_line, Checkpoint, Gap, LineError, SpecialBody},
    report::{si, Kind, Problem},
};
use crate::ship::{chain, Stream};

/// What is kept of one sealed record.
#[derive(Debug, Clone, Copy)]
pub(super) struct Rec {
    pub(super) seq: u64,
    pub(super) hash: [u8; 32],
    pub(super) prev: [u8; 32],
    pub(super) file: u32,
    pub(super) line: u64,
}

const _: () = assert!(std::mem::size_of::<Rec>() <= 88);

/// A record read after one with a higher sequence in the same file and stream: reordered,
/// unless it is a repeat of a copy earlier in the file (a redelivered batch).
#[derive(Debug, Clone, Copy)]
pub(super) struct Cand {
    pub(super) stream: Stream,
    pub(super) seq: u64,
    pub(super) hash: [u8; 32],
    pub(super) file: u32,
    pub(super) line: u64,
    pub(super) after_seq: u64,
    pub(super) after_line: u64,
    /// Consecutive records of the stream that follow the same higher record share a run.
    pub(super) run: u64,
}

/// A checkpoint or gap record, where it was read and what it says.
#[derive(Debug)]
pub(super) struct Special<T> {
    pub(super) file: u32,
    pub(super) line: u64,
    pub(super) seq: u64,
    pub(super) hash: [u8; 32],
    pub(super) body: Result<T, LineError>,
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
    reason: LineError,
}

pub(super) struct Reader<'a> {
    paths: &'a [PathBuf],
    pub(super) names: Vec<String>,
    pub(super) recs: [Vec<Rec>; 2],
    pub(super) cands: Vec<Cand>,
    pub(super) checkpoints: Vec<Special<Checkpoint>>,
    pub(super) gaps: Vec<Special<Gap>>,
    /// Keyed by the record (sequence, hash), so a copy delivered twice says it once.
    pub(super) sink_notes: BTreeMap<(u64, [u8; 32]), String>,
    pub(super) problems: Vec<Problem>,
    pub(super) notes: Vec<String>,
    pub(super) warnings: Vec<String>,
    pub(super) lines: u64,
    runs: u64,
}

impl<'a> Reader<'a> {
    pub(super) fn new(paths: &'a [PathBuf]) -> Reader<'a> {
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

    pub(super) fn loc(&self, file: u32, line: u64) -> String {
        format!("{}:{line}", self.names[file as usize])
    }

    pub(super) fn rloc(&self, r: &Rec) -> String {
        self.loc(r.file, r.line)
    }

    pub(super) fn problem(
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

    pub(super) fn read_file(&mut self, index: usize) -> Result<(), VerifyError> {
        let path = &self.paths[index];
        let file = index as u32;
        let read_err = |line: u64| {
            let path = path.clone();
            move |source| VerifyError::Read { path, line, source }
        };
        let (mut input, gz) = input::open(path)?;
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
}
