//! `sparbar verify`: checks audit-trail files against their hash chains and signed checkpoints,
//! and names every edit, deletion and reordering by file and line.
//!
//! One pass reads every line (plain or gzip) and keeps, per sealed record, only its sequence, its
//! hash, the hash it chains to and where it was read (88 bytes); checkpoint and gap records are
//! kept whole (they are few). Then, per stream: records sorted by sequence; copies of one
//! sequence are either identical (at-least-once delivery: counted) or conflicting (an error);
//! every link `prev(n+1) == hash(n)` is checked; holes between the lowest sequence and the highest
//! one present or signed are reported unless a gap record states them; every checkpoint's
//! signature is checked and its heads compared with the records. [`chain`](crate::ship::chain)
//! defines the format.

mod check;
mod input;
mod parse;
mod reader;
mod report;
#[cfg(test)]
mod tests;

use std::{
    io::{self, Write},
    path::PathBuf,
};

pub use self::{
    input::VerifyError,
    report::{KeySource, Kind, Problem, Report, StreamSummary},
};

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
        .map(|p| input::load_key(p))
        .collect::<Result<Vec<_>, _>>()?;
    let files = input::collect_files(&opts.paths)?;
    let mut r = reader::Reader::new(&files);
    for i in 0..files.len() {
        r.read_file(i)?;
    }
    if r.recs.iter().all(Vec::is_empty) {
        return Err(VerifyError::Empty { files: files.len() });
    }
    Ok(r.analyze(&keys, opts.sink.as_deref()))
}
