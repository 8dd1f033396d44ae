//! What `sparbar verify` reads: the trail files named (directories expanded to their `*.jsonl*`
//! files, each file once), each opened as plain text or gzip by its first bytes, and the
//! `--key` files; and [`VerifyError`], why that could not be done.

use std::{
    collections::BTreeSet,
    fs::File,
    io::{self, BufRead, BufReader},
    path::{Path, PathBuf},
};

use ed25519_dalek::VerifyingKey;

use crate::ship::chain;

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

pub(super) fn load_key(path: &Path) -> Result<(VerifyingKey, String), VerifyError> {
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
pub(super) fn collect_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, VerifyError> {
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

/// Opens a trail file for reading lines: gzip (by its magic bytes, members concatenated as
/// rotation appends them) is decompressed. The flag says whether it was.
pub(super) fn open(path: &Path) -> Result<(Box<dyn BufRead>, bool), VerifyError> {
    let f = File::open(path).map_err(|source| VerifyError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let mut raw = BufReader::with_capacity(1 << 18, f);
    let gz = raw
        .fill_buf()
        .map_err(|source| VerifyError::Read {
            path: path.to_path_buf(),
            line: 0,
            source,
        })?
        .starts_with(&[0x1f, 0x8b]);
    let input: Box<dyn BufRead> = if gz {
        Box::new(BufReader::with_capacity(
            1 << 18,
            flate2::bufread::MultiGzDecoder::new(raw),
        ))
    } else {
        Box::new(raw)
    };
    Ok((input, gz))
}
