//! The local destinations: JSON Lines files (the embedded default) with rotation by size and
//! age and a retention count, and standard output (journald under systemd; the agent's own logs
//! stay on stderr). A batch is written whole or not at all: on a failed write the file is cut
//! back to where the batch began, so a retry never leaves a torn line behind.

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use super::{Destination, Line, Outcome, SendError, SinkSetupError, Stream};
use crate::config::FileSinkConfig;
use crate::ship::BatchLimits;

const FILE_MODE: u32 = 0o640;
const DIR_MODE: u32 = 0o750;

struct Open {
    path: PathBuf,
    file: File,
    len: u64,
    opened: SystemTime,
}

pub struct FileDest {
    name: String,
    cfg: FileSinkConfig,
    limits: BatchLimits,
    /// Keyed by the stream when the path has `{stream}`, else one file under `Access`.
    open: BTreeMap<Stream, Open>,
    per_stream: bool,
    buf: Vec<u8>,
}

fn err(path: &Path, what: &str, e: io::Error) -> SendError {
    SendError::retry(format!("{}: {what}: {e}", path.display()))
}

/// Why a sink's file cannot be opened (at start, the sink is refused; while sending, the batch
/// is retried).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{}: cannot create the directory: {source}", .dir.display())]
    CreateDir { dir: PathBuf, source: io::Error },
    #[error("{}: cannot open for appending: {source}", .path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("{}: stat: {source}", .path.display())]
    Stat { path: PathBuf, source: io::Error },
}

impl From<OpenError> for SendError {
    fn from(e: OpenError) -> SendError {
        SendError::retry(e.to_string())
    }
}

impl FileDest {
    pub fn new(
        name: &str,
        cfg: &FileSinkConfig,
        limits: BatchLimits,
    ) -> Result<FileDest, SinkSetupError> {
        let per_stream = cfg.path.contains("{stream}");
        let mut d = FileDest {
            name: name.to_string(),
            cfg: cfg.clone(),
            limits,
            open: BTreeMap::new(),
            per_stream,
            buf: Vec::with_capacity(1 << 20),
        };
        // Open now, so a wrong path or permission is reported at start.
        for s in if per_stream {
            &Stream::ALL[..]
        } else {
            &[Stream::Access][..]
        } {
            d.file(*s)
                .map_err(|source| SinkSetupError::File { source })?;
        }
        Ok(d)
    }

    fn path_of(&self, s: Stream) -> PathBuf {
        PathBuf::from(self.cfg.path.replace("{stream}", s.name()))
    }

    fn key(&self, s: Stream) -> Stream {
        if self.per_stream {
            s
        } else {
            Stream::Access
        }
    }

    fn file(&mut self, s: Stream) -> Result<&mut Open, OpenError> {
        let k = self.key(s);
        if !self.open.contains_key(&k) {
            let path = self.path_of(k);
            if let Some(dir) = path.parent() {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(DIR_MODE)
                    .create(dir)
                    .map_err(|source| OpenError::CreateDir {
                        dir: dir.to_path_buf(),
                        source,
                    })?;
            }
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(FILE_MODE)
                .open(&path)
                .map_err(|source| OpenError::Open {
                    path: path.clone(),
                    source,
                })?;
            let md = file.metadata().map_err(|source| OpenError::Stat {
                path: path.clone(),
                source,
            })?;
            let opened = md
                .created()
                .or_else(|_| md.modified())
                .unwrap_or_else(|_| SystemTime::now());
            self.open.insert(
                k,
                Open {
                    path,
                    file,
                    len: md.len(),
                    opened,
                },
            );
        }
        Ok(self.open.get_mut(&k).expect("just inserted"))
    }

    fn rotate_if_due(&mut self, s: Stream) -> Result<(), SendError> {
        let (bytes, interval, keep) = (
            self.cfg.rotate_bytes,
            self.cfg.rotate_interval,
            self.cfg.keep_files,
        );
        let k = self.key(s);
        let Some(o) = self.open.get(&k) else {
            return Ok(());
        };
        let by_size = bytes > 0 && o.len >= bytes;
        let by_age = interval
            .is_some_and(|i| o.len > 0 && o.opened.elapsed().unwrap_or(Duration::ZERO) >= i);
        if !(by_size || by_age) {
            return Ok(());
        }
        let path = o.path.clone();
        let _ = o.file.sync_data();
        let stamp = crate::record::rfc3339_micros(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0),
        )
        .replace([':', '-'], "");
        let mut to = PathBuf::from(format!("{}.{stamp}", path.display()));
        let mut n = 1;
        while to.exists() {
            to = PathBuf::from(format!("{}.{stamp}-{n}", path.display()));
            n += 1;
        }
        fs::rename(&path, &to).map_err(|e| err(&path, "rotating", e))?;
        self.open.remove(&k);
        if keep > 0 {
            prune(&path, keep);
        }
        self.file(s)?;
        Ok(())
    }
}

/// Deletes the oldest rotated copies of `path` beyond `keep`.
fn prune(path: &Path, keep: usize) {
    let (Some(dir), Some(base)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return;
    };
    let prefix = format!("{base}.");
    let mut rotated: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.starts_with(&prefix) && !n.ends_with(".tmp"))
        .collect();
    rotated.sort();
    let excess = rotated.len().saturating_sub(keep);
    for n in rotated.into_iter().take(excess) {
        let _ = fs::remove_file(dir.join(n));
    }
}

impl Destination for FileDest {
    fn name(&self) -> &str {
        &self.name
    }

    fn limits(&self) -> BatchLimits {
        self.limits
    }

    fn send(&mut self, batch: &[Line]) -> Result<Outcome, SendError> {
        let Some(first) = batch.first() else {
            return Ok(Outcome::delivered());
        };
        let s = first.stream;
        self.rotate_if_due(s)?;
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        for l in batch {
            buf.extend_from_slice(&l.bytes);
            buf.push(b'\n');
        }
        let sync = self.cfg.sync;
        let o = self.file(s)?;
        let res = o
            .file
            .write_all(&buf)
            .and_then(|_| if sync { o.file.sync_data() } else { Ok(()) });
        let out = match res {
            Ok(()) => {
                o.len += buf.len() as u64;
                Ok(Outcome::delivered())
            }
            Err(e) => {
                // Cut back a partial write so the retry starts on a clean line.
                let _ = o.file.set_len(o.len);
                Err(err(&o.path, "write failed", e))
            }
        };
        self.buf = buf;
        out
    }

    fn flush(&mut self) -> Result<(), SendError> {
        Ok(())
    }
}

/// Standard output: one line per record.
pub struct StdoutDest {
    name: String,
    limits: BatchLimits,
}

impl StdoutDest {
    pub fn new(name: &str, limits: BatchLimits) -> StdoutDest {
        StdoutDest {
            name: name.to_string(),
            limits,
        }
    }
}

impl Destination for StdoutDest {
    fn name(&self) -> &str {
        &self.name
    }

    fn limits(&self) -> BatchLimits {
        self.limits
    }

    fn send(&mut self, batch: &[Line]) -> Result<Outcome, SendError> {
        let mut out = io::stdout().lock();
        let mut buf = Vec::new();
        for l in batch {
            buf.extend_from_slice(&l.bytes);
            buf.push(b'\n');
        }
        out.write_all(&buf)
            .and_then(|_| out.flush())
            .map_err(|e| SendError::retry(format!("stdout: {e}")))?;
        Ok(Outcome::delivered())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(s: Stream, seq: u64) -> Line {
        Line {
            stream: s,
            seq,
            bytes: format!("{{\"n\":{seq}}}").into_bytes(),
        }
    }

    #[test]
    fn per_stream_files_rotate_and_keep() {
        let d = tempfile::tempdir().unwrap();
        let cfg = FileSinkConfig {
            path: format!("{}/{{stream}}.jsonl", d.path().display()),
            rotate_bytes: 20,
            rotate_interval: None,
            keep_files: 2,
            sync: true,
        };
        let mut f = FileDest::new("f", &cfg, BatchLimits::default()).unwrap();
        for i in 1..=10 {
            f.send(&[line(Stream::Access, i), line(Stream::Access, i + 100)])
                .unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        f.send(&[line(Stream::Security, 1)]).unwrap();
        let names: Vec<String> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.contains(&"access.jsonl".to_string()));
        assert!(names.contains(&"security.jsonl".to_string()));
        assert_eq!(
            names
                .iter()
                .filter(|n| n.starts_with("access.jsonl."))
                .count(),
            2,
            "{names:?}"
        );
        assert_eq!(
            fs::read_to_string(d.path().join("security.jsonl")).unwrap(),
            "{\"n\":1}\n"
        );
    }
}
