//! Puts records where people read them: appended to a JSON Lines file that only the agent and its
//! group can read, and optionally to standard output, one whole line per record, with every
//! failure reported (with the path and the OS error) rather than hidden.
//!
//! Records are buffered (64 KiB) and handed to the OS when the buffer fills and on
//! [`Sink::flush`]; the caller flushes periodically and before exit. If a write fails part-way
//! through a line, the next record starts on a new line, so one broken line never swallows the
//! records after it.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use log::warn;
use serde_json::Value;
use thiserror::Error;

/// Buffered bytes above which a write hands the buffer to the OS.
const BUF_CAP: usize = 64 * 1024;
const DIR_MODE: u32 = 0o750;
const FILE_MODE: u32 = 0o640;

#[derive(Debug, Error)]
pub enum SinkError {
    #[error("{path}: cannot create the directory: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: cannot open for appending: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Writing failed; `records_lost` buffered records (this one included) were not written.
    #[error("{path}: write failed, {records_lost} record(s) lost: {source}")]
    Write {
        path: PathBuf,
        records_lost: u64,
        #[source]
        source: io::Error,
    },
    #[error("{path}: fdatasync failed: {source}")]
    Sync {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: a record could not be encoded as JSON: {source}")]
    Encode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl SinkError {
    /// Records this error lost (0 for errors that lose none, 1 for an encoding error).
    pub fn records_lost(&self) -> u64 {
        match self {
            SinkError::Write { records_lost, .. } => *records_lost,
            SinkError::Encode { .. } => 1,
            _ => 0,
        }
    }
}

/// What a sink has handed to the OS so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SinkStats {
    /// Whole records (lines) written.
    pub records: u64,
    /// Bytes written, newlines included.
    pub bytes: u64,
}

/// A destination for records.
pub trait Sink {
    /// Appends one record, already serialized as compact JSON without a newline, as one
    /// `\n`-terminated line (buffered).
    fn write_line(&mut self, line: &[u8]) -> Result<(), SinkError>;
    /// Appends `record` as one `\n`-terminated line (buffered).
    fn write(&mut self, record: &Value) -> Result<(), SinkError> {
        let line = serde_json::to_vec(record).map_err(|source| SinkError::Encode {
            path: PathBuf::from(self.name()),
            source,
        })?;
        self.write_line(&line)
    }
    /// Hands buffered records to the OS, and makes them durable where that means something.
    fn flush(&mut self) -> Result<(), SinkError>;
    /// A name for logs and stats: the file's path, or `stdout`.
    fn name(&self) -> &str;
    /// Records and bytes written so far.
    fn stats(&self) -> SinkStats;
}

/// The buffering and line-integrity logic shared by the sinks.
#[derive(Debug)]
struct Lines<W: Write> {
    out: W,
    path: PathBuf,
    buf: Vec<u8>,
    buffered_records: u64,
    /// The last write stopped in the middle of a line.
    broken_line: bool,
    stats: SinkStats,
}

impl<W: Write> Lines<W> {
    fn new(out: W, path: PathBuf) -> Self {
        Lines {
            out,
            path,
            buf: Vec::with_capacity(BUF_CAP),
            buffered_records: 0,
            broken_line: false,
            stats: SinkStats::default(),
        }
    }

    fn write_line(&mut self, line: &[u8]) -> Result<(), SinkError> {
        if self.broken_line {
            // End the half-written line so this record starts clean.
            self.buf.push(b'\n');
            self.broken_line = false;
        }
        // Compact serde_json output escapes control characters, so it never holds a newline.
        self.buf.extend_from_slice(line);
        self.buf.push(b'\n');
        self.buffered_records += 1;
        if self.buf.len() >= BUF_CAP {
            self.drain()?;
        }
        Ok(())
    }

    /// Writes the whole buffer. On error the buffer is dropped (so a full disk cannot make the
    /// agent grow without bound) and the error counts the records that did not make it.
    fn drain(&mut self) -> Result<(), SinkError> {
        let mut written = 0;
        let mut failure = None;
        while written < self.buf.len() {
            match self.out.write(&self.buf[written..]) {
                Ok(0) => {
                    failure = Some(io::Error::from(io::ErrorKind::WriteZero));
                    break;
                }
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let done = &self.buf[..written];
        let lines = done.iter().filter(|&&b| b == b'\n').count() as u64;
        // A leading '\n' that only closed a broken line is not a record.
        let closers = u64::from(done.first() == Some(&b'\n'));
        let records = lines.saturating_sub(closers).min(self.buffered_records);
        self.stats.records += records;
        self.stats.bytes += written as u64;
        let lost = self.buffered_records - records;
        self.broken_line = failure.is_some() && written > 0 && done.last() != Some(&b'\n');
        self.buf.clear();
        self.buffered_records = 0;
        match failure {
            None => Ok(()),
            Some(source) => Err(SinkError::Write {
                path: self.path.clone(),
                records_lost: lost,
                source,
            }),
        }
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        self.drain()?;
        self.out.flush().map_err(|source| SinkError::Write {
            path: self.path.clone(),
            records_lost: 0,
            source,
        })
    }
}

/// Records appended to a JSON Lines file.
#[derive(Debug)]
pub struct JsonlFile {
    lines: Lines<File>,
    name: String,
}

impl JsonlFile {
    /// Opens `path` for appending, creating missing parent directories (mode 0750) and the file
    /// (mode 0640; both less the process umask). An existing file keeps its mode; a warning is
    /// logged when others may read it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, SinkError> {
        let path = path.as_ref().to_path_buf();
        let file = open_append(&path)?;
        Ok(JsonlFile {
            name: path.display().to_string(),
            lines: Lines::new(file, path),
        })
    }

    /// Writes what is buffered, then opens the path again (after log rotation moved the file).
    pub fn reopen(&mut self) -> Result<(), SinkError> {
        let flushed = self.flush();
        let file = open_append(&self.lines.path)?;
        self.lines.out = file;
        self.lines.broken_line = false;
        flushed
    }

    pub fn path(&self) -> &Path {
        &self.lines.path
    }
}

fn open_append(path: &Path) -> Result<File, SinkError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(dir)
                .map_err(|source| SinkError::CreateDir {
                    path: dir.to_path_buf(),
                    source,
                })?;
        }
    }
    let existed = path.exists();
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(FILE_MODE)
        .open(path)
        .map_err(|source| SinkError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    if let Ok(meta) = file.metadata() {
        let mode = meta.permissions().mode();
        if meta.is_file() && mode & 0o007 != 0 {
            warn!(
                "{}: records file is readable or writable by others (mode {:o}); expected 0640",
                path.display(),
                mode & 0o777
            );
        }
    }
    if !existed {
        // Make the new directory entry durable too.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
                warn!("{}: fsync of the directory failed: {e}", dir.display());
            }
        }
    }
    Ok(file)
}

impl Sink for JsonlFile {
    fn write_line(&mut self, line: &[u8]) -> Result<(), SinkError> {
        self.lines.write_line(line)
    }

    /// Writes the buffer, then `fdatasync`s the file.
    fn flush(&mut self) -> Result<(), SinkError> {
        self.lines.flush()?;
        self.lines
            .out
            .sync_data()
            .map_err(|source| SinkError::Sync {
                path: self.lines.path.clone(),
                source,
            })
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn stats(&self) -> SinkStats {
        self.lines.stats
    }
}

impl Drop for JsonlFile {
    fn drop(&mut self) {
        if let Err(e) = Sink::flush(self) {
            warn!("{e}");
        }
    }
}

/// Records written to standard output.
#[derive(Debug)]
pub struct Stdout {
    lines: Lines<io::Stdout>,
}

impl Stdout {
    pub fn new() -> Self {
        Stdout {
            lines: Lines::new(io::stdout(), PathBuf::from("stdout")),
        }
    }
}

impl Default for Stdout {
    fn default() -> Self {
        Self::new()
    }
}

impl Sink for Stdout {
    fn write_line(&mut self, line: &[u8]) -> Result<(), SinkError> {
        self.lines.write_line(line)
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        self.lines.flush()
    }

    fn name(&self) -> &str {
        "stdout"
    }

    fn stats(&self) -> SinkStats {
        self.lines.stats
    }
}

impl Drop for Stdout {
    fn drop(&mut self) {
        if let Err(e) = self.lines.flush() {
            warn!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::fs::MetadataExt;

    fn read_lines(p: &Path) -> Vec<Value> {
        fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn writes_lines_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/access.jsonl");
        let mut s = JsonlFile::open(&path).unwrap();
        assert_eq!(s.name(), path.display().to_string());
        let r1 = json!({"event": {"id": "1"}, "text": "line\nbreak"});
        let r2 = json!({"event": {"id": "2"}});
        s.write(&r1).unwrap();
        s.write(&r2).unwrap();
        // Buffered until flushed.
        assert_eq!(s.stats(), SinkStats::default());
        assert_eq!(fs::read_to_string(&path).unwrap(), "");
        s.flush().unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.ends_with('\n'));
        assert_eq!(text.lines().count(), 2);
        assert_eq!(read_lines(&path), vec![r1, r2]);
        assert_eq!(
            s.stats(),
            SinkStats {
                records: 2,
                bytes: text.len() as u64
            }
        );
    }

    #[test]
    fn appends_and_drop_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.jsonl");
        {
            let mut s = JsonlFile::open(&path).unwrap();
            s.write(&json!({"n": 1})).unwrap();
        }
        {
            let mut s = JsonlFile::open(&path).unwrap();
            s.write(&json!({"n": 2})).unwrap();
        }
        assert_eq!(read_lines(&path), vec![json!({"n": 1}), json!({"n": 2})]);
    }

    #[test]
    fn large_volumes_flush_by_themselves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.jsonl");
        let mut s = JsonlFile::open(&path).unwrap();
        let big = "x".repeat(1000);
        for i in 0..500 {
            s.write(&json!({"i": i, "pad": big})).unwrap();
        }
        assert!(s.stats().records > 0, "the buffer should have drained");
        s.flush().unwrap();
        let recs = read_lines(&path);
        assert_eq!(recs.len(), 500);
        assert_eq!(s.stats().records, 500);
        assert_eq!(s.stats().bytes, fs::metadata(&path).unwrap().len());
        assert!(recs.iter().enumerate().all(|(i, r)| r["i"] == i));
    }

    #[test]
    fn modes() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("logs/sparbar");
        let path = sub.join("access.jsonl");
        let _s = JsonlFile::open(&path).unwrap();
        let dmode = fs::metadata(&sub).unwrap().mode() & 0o777;
        let fmode = fs::metadata(&path).unwrap().mode() & 0o777;
        // At most 0750 / 0640 whatever the umask.
        assert_eq!(dmode & !0o750, 0, "{dmode:o}");
        assert_eq!(fmode & !0o640, 0, "{fmode:o}");
        assert_eq!(dmode & 0o700, 0o700);
        assert_eq!(fmode & 0o600, 0o600);
    }

    #[test]
    fn open_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        fs::write(&blocker, "").unwrap();
        let err = JsonlFile::open(blocker.join("sub/access.jsonl")).unwrap_err();
        assert!(matches!(err, SinkError::CreateDir { .. }), "{err}");
        assert!(err.to_string().contains(&*blocker.display().to_string()));
        let err = JsonlFile::open(dir.path()).unwrap_err();
        assert!(matches!(err, SinkError::Open { .. }), "{err}");
        assert!(err
            .to_string()
            .starts_with(&dir.path().display().to_string()));
    }

    #[test]
    fn disk_full_is_reported_with_path_and_os_error() {
        // /dev/full fails every write with ENOSPC.
        let Ok(mut s) = JsonlFile::open("/dev/full") else {
            eprintln!("skipped: /dev/full cannot be opened here");
            return;
        };
        s.write(&json!({"n": 1})).unwrap();
        s.write(&json!({"n": 2})).unwrap();
        let err = s.flush().unwrap_err();
        match &err {
            SinkError::Write {
                path,
                records_lost,
                source,
            } => {
                assert_eq!(path, Path::new("/dev/full"));
                assert_eq!(*records_lost, 2);
                assert_eq!(source.raw_os_error(), Some(libc::ENOSPC));
            }
            other => panic!("unexpected {other}"),
        }
        assert_eq!(err.records_lost(), 2);
        let text = err.to_string();
        assert!(
            text.starts_with("/dev/full: write failed, 2 record(s) lost: "),
            "{text}"
        );
        assert_eq!(s.stats(), SinkStats::default());
        // The buffer was dropped: the next flush has nothing left to lose.
        s.write(&json!({"n": 3})).unwrap();
        assert_eq!(s.flush().unwrap_err().records_lost(), 1);
        std::mem::forget(s); // its Drop would only log the same error again
    }

    /// A writer that accepts `budget` bytes and then fails, to test partial lines.
    struct Flaky {
        data: Vec<u8>,
        budget: usize,
    }

    impl Write for Flaky {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            if self.budget == 0 {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            let n = b.len().min(self.budget).min(7);
            self.data.extend_from_slice(&b[..n]);
            self.budget -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_broken_line_does_not_swallow_the_next_records() {
        let first = serde_json::to_vec(&json!({"n": 1})).unwrap().len() + 1;
        let mut l = Lines::new(
            Flaky {
                data: Vec::new(),
                budget: first + 3,
            },
            PathBuf::from("flaky"),
        );
        l.write_line(&serde_json::to_vec(&json!({"n": 1})).unwrap())
            .unwrap();
        l.write_line(&serde_json::to_vec(&json!({"n": 2})).unwrap())
            .unwrap();
        l.write_line(&serde_json::to_vec(&json!({"n": 3})).unwrap())
            .unwrap();
        let err = l.flush().unwrap_err();
        assert_eq!(err.records_lost(), 2);
        assert_eq!(l.stats.records, 1);
        assert!(l.broken_line);
        l.out.budget = usize::MAX;
        l.write_line(&serde_json::to_vec(&json!({"n": 4})).unwrap())
            .unwrap();
        l.flush().unwrap();
        assert_eq!(l.stats.records, 2);
        let text = String::from_utf8(l.out.data.clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text:?}");
        assert_eq!(lines[0], r#"{"n":1}"#);
        assert!(serde_json::from_str::<Value>(lines[1]).is_err());
        assert_eq!(lines[2], r#"{"n":4}"#);
        assert_eq!(l.stats.bytes, text.len() as u64);
    }

    #[test]
    fn reopen_follows_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.jsonl");
        let rotated = dir.path().join("access.jsonl.1");
        let mut s = JsonlFile::open(&path).unwrap();
        s.write(&json!({"n": 1})).unwrap();
        s.flush().unwrap();
        fs::rename(&path, &rotated).unwrap();
        s.write(&json!({"n": 2})).unwrap();
        s.reopen().unwrap();
        s.write(&json!({"n": 3})).unwrap();
        s.flush().unwrap();
        assert_eq!(read_lines(&rotated), vec![json!({"n": 1}), json!({"n": 2})]);
        assert_eq!(read_lines(&path), vec![json!({"n": 3})]);
        assert_eq!(s.stats().records, 3);
    }

    #[test]
    fn stdout_sink() {
        let mut s = Stdout::new();
        assert_eq!(s.name(), "stdout");
        s.write(&json!({"stdout": "test"})).unwrap();
        s.flush().unwrap();
        assert_eq!(s.stats().records, 1);
        let dyn_sink: &mut dyn Sink = &mut s;
        assert_eq!(dyn_sink.name(), "stdout");
    }
}
