//! The durable spool: per stream, a directory of segment files holding sealed record lines in
//! sequence order, written by the agent's thread and read by each sink's worker at its own
//! acknowledged position.
//!
//! Layout of `<spool.dir>/<stream>/`:
//! - `<first_seq:020>.seg`: whole lines only, the k-th line being record `first_seq + k`;
//! - `<first_seq:020>.prev`: hex hash of the record before `first_seq`, so the chain goes on
//!   after restarts even when every earlier segment was delivered and deleted;
//! - `<sink>.pos`: the last sequence that sink acknowledged (written by its worker);
//! - `reserve` (security only): preallocated space given up when the disk is full.
//!
//! Crash safety: a restart reads the newest segment, cuts a torn last line (counted), and goes
//! on from the last whole record. Records are handed to the OS before workers may read them,
//! so a SIGKILL loses nothing that was appended and flushed; the security stream is also
//! fdatasync'ed per flush, the access stream every `spool.access_sync`.

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex},
    time::Duration,
};

use super::{chain, Line, Stream};

const SEG_EXT: &str = "seg";
const MODE: u32 = 0o600;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `spool.max_bytes` reached and the policy is drop_new.
    #[error("spool {stream} is full ({bytes} bytes of at most {max})")]
    Full {
        stream: &'static str,
        bytes: u64,
        max: u64,
    },
}

impl SpoolError {
    fn io(path: &Path, source: io::Error) -> SpoolError {
        SpoolError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn is_disk_full(&self) -> bool {
        matches!(self, SpoolError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) || source.raw_os_error() == Some(libc::EDQUOT))
    }
}

/// What the writer publishes to the workers.
#[derive(Debug, Default)]
pub struct Published {
    /// Per stream: the last sequence handed to the OS (readable by workers).
    pub visible: BTreeMap<Stream, u64>,
    /// Per stream: the oldest sequence still on disk.
    pub oldest: BTreeMap<Stream, u64>,
    /// Bumped on every publish, so waiting workers wake.
    pub generation: u64,
    /// The agent is stopping: workers deliver what is visible, then end.
    pub draining: bool,
}

/// Shared between the writer and the workers.
#[derive(Debug, Default)]
pub struct Shared {
    pub state: Mutex<Published>,
    pub cond: Condvar,
    /// Per (stream, sink): the last acknowledged sequence.
    pub acked: Mutex<BTreeMap<(Stream, String), u64>>,
}

impl Shared {
    pub fn visible(&self, s: Stream) -> u64 {
        self.lock().visible.get(&s).copied().unwrap_or(0)
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, Published> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn ack(&self, s: Stream, sink: &str, seq: u64) {
        self.acked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((s, sink.to_string()), seq);
    }

    /// Waits until something new is published, or `timeout`.
    pub fn wait(&self, seen_generation: u64, timeout: Duration) -> u64 {
        let g = self.lock();
        if g.generation != seen_generation || g.draining {
            return g.generation;
        }
        let (g, _) = self
            .cond
            .wait_timeout(g, timeout)
            .unwrap_or_else(|e| e.into_inner());
        g.generation
    }
}

#[derive(Debug, Clone, Copy)]
struct Seg {
    first: u64,
    bytes: u64,
}

/// What opening a stream's spool found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Bytes of a torn last line cut off.
    pub torn_bytes: u64,
    /// The last sequence on disk (0 if none).
    pub last_seq: u64,
}

/// One stream's writer.
pub struct StreamSpool {
    pub stream: Stream,
    dir: PathBuf,
    segment_bytes: u64,
    /// Sync after every flush (security).
    sync_each: bool,
    segs: BTreeMap<u64, Seg>,
    file: File,
    buf: Vec<u8>,
    buf_records: u64,
    /// The next sequence and the hash of the last sealed record (including the buffer).
    next_seq: u64,
    prev: [u8; 32],
    /// The same, as of the last successful flush (the buffer is rolled back to it on failure).
    durable_next: u64,
    durable_prev: [u8; 32],
    /// Bytes on disk, all segments.
    total_bytes: u64,
    pub recovered: Recovered,
}

fn seg_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.{SEG_EXT}"))
}

fn prev_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.prev"))
}

/// Segment start sequences found in `dir`, oldest first.
pub fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let n = e.file_name();
        let Some(n) = n.to_str() else { continue };
        if let Some(stem) = n.strip_suffix(".seg") {
            if let Ok(s) = stem.parse::<u64>() {
                v.push(s);
            }
        }
    }
    v.sort_unstable();
    Ok(v)
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(MODE)
        .open(path)
}

fn write_prev(dir: &Path, first: u64, prev: &[u8; 32]) -> io::Result<()> {
    crate::statefile::write_private(&prev_path(dir, first), chain::hex(prev).as_bytes())
}

impl StreamSpool {
    /// Opens (or creates) the spool of `stream` under `root`, recovering from a crash.
    pub fn open(
        root: &Path,
        stream: Stream,
        segment_bytes: u64,
        sync_each: bool,
    ) -> Result<StreamSpool, SpoolError> {
        let dir = root.join(stream.name());
        fs::create_dir_all(&dir).map_err(|e| SpoolError::io(&dir, e))?;
        let _ = fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700));
        let firsts = list_segments(&dir).map_err(|e| SpoolError::io(&dir, e))?;
        let mut segs = BTreeMap::new();
        let mut total_bytes = 0;
        for f in &firsts {
            let b = fs::metadata(seg_path(&dir, *f))
                .map(|m| m.len())
                .unwrap_or(0);
            segs.insert(
                *f,
                Seg {
                    first: *f,
                    bytes: b,
                },
            );
            total_bytes += b;
        }
        let mut recovered = Recovered::default();
        let (next_seq, prev) = match firsts.last() {
            None => {
                write_prev(&dir, 1, &chain::ZERO_HASH).map_err(|e| SpoolError::io(&dir, e))?;
                segs.insert(1, Seg { first: 1, bytes: 0 });
                (1, chain::ZERO_HASH)
            }
            Some(&last) => {
                let path = seg_path(&dir, last);
                let mut data = Vec::new();
                File::open(&path)
                    .and_then(|mut f| f.read_to_end(&mut data))
                    .map_err(|e| SpoolError::io(&path, e))?;
                let whole = data.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
                if whole < data.len() {
                    recovered.torn_bytes = (data.len() - whole) as u64;
                    OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .and_then(|f| f.set_len(whole as u64))
                        .map_err(|e| SpoolError::io(&path, e))?;
                    total_bytes -= recovered.torn_bytes;
                    if let Some(s) = segs.get_mut(&last) {
                        s.bytes = whole as u64;
                    }
                }
                let lines = data[..whole].iter().filter(|b| **b == b'\n').count() as u64;
                let prev = if lines > 0 {
                    let body = &data[..whole - 1];
                    let start = body.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
                    chain::hash(&body[start..])
                } else {
                    let p = prev_path(&dir, last);
                    fs::read_to_string(&p)
                        .ok()
                        .and_then(|t| chain::unhex::<32>(t.trim()))
                        .ok_or_else(|| {
                            SpoolError::io(
                                &p,
                                io::Error::new(
                                    io::ErrorKind::InvalidData,
                                    "the chain link of an empty segment is missing or unreadable; the chain cannot be continued (move the spool away to start a new chain)",
                                ),
                            )
                        })?
                };
                (last + lines, prev)
            }
        };
        recovered.last_seq = next_seq - 1;
        let head = *segs.keys().next_back().unwrap_or(&1);
        let path = seg_path(&dir, head);
        let file = open_append(&path).map_err(|e| SpoolError::io(&path, e))?;
        Ok(StreamSpool {
            stream,
            dir,
            segment_bytes,
            sync_each,
            segs,
            file,
            buf: Vec::with_capacity(64 * 1024),
            buf_records: 0,
            next_seq,
            prev,
            durable_next: next_seq,
            durable_prev: prev,
            total_bytes,
            recovered,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Seals `line` as the next record and buffers it; returns its sequence.
    pub fn append(&mut self, line: &[u8]) -> u64 {
        let seq = self.next_seq;
        let sealed = chain::seal(line, self.stream, seq, &self.prev);
        self.prev = chain::hash(&sealed);
        self.buf.extend_from_slice(&sealed);
        self.buf.push(b'\n');
        self.buf_records += 1;
        self.next_seq += 1;
        seq
    }

    /// Bytes buffered and not yet handed to the OS.
    pub fn buffered_bytes(&self) -> usize {
        self.buf.len()
    }

    pub fn buffered_records(&self) -> u64 {
        self.buf_records
    }

    /// The head of the chain as flushed: (last sequence, its hash).
    pub fn head(&self) -> (u64, [u8; 32]) {
        (self.durable_next - 1, self.durable_prev)
    }

    pub fn total_bytes(&self) -> u64 {
        self.total_bytes + self.buf.len() as u64
    }

    pub fn oldest_seq(&self) -> u64 {
        *self.segs.keys().next().unwrap_or(&self.durable_next)
    }

    /// Hands the buffer to the OS (and syncs it for the security stream). On failure the
    /// buffered records are dropped, the file is cut back to the last whole record and the
    /// chain to the last flushed record; the error says how many were lost
    /// ([`Self::last_loss`]).
    pub fn flush(&mut self) -> Result<u64, (SpoolError, u64)> {
        if self.buf.is_empty() {
            return Ok(0);
        }
        let head = *self.segs.keys().next_back().unwrap_or(&1);
        let path = seg_path(&self.dir, head);
        let res = self.file.write_all(&self.buf).and_then(|_| {
            if self.sync_each {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        match res {
            Ok(()) => {
                let n = self.buf_records;
                let len = self.buf.len() as u64;
                if let Some(s) = self.segs.get_mut(&head) {
                    s.bytes += len;
                }
                self.total_bytes += len;
                self.buf.clear();
                self.buf_records = 0;
                self.durable_next = self.next_seq;
                self.durable_prev = self.prev;
                if self
                    .segs
                    .get(&head)
                    .is_some_and(|s| s.bytes >= self.segment_bytes)
                {
                    if let Err(e) = self.roll() {
                        log::warn!(
                            "spool {}: cannot start a new segment: {e}; staying on the current one",
                            self.stream.name()
                        );
                    }
                }
                Ok(n)
            }
            Err(e) => {
                let lost = self.buf_records;
                let keep = self.segs.get(&head).map_or(0, |s| s.bytes);
                let _ = self.file.set_len(keep);
                let _ = self.file.seek(SeekFrom::End(0));
                self.buf.clear();
                self.buf_records = 0;
                self.next_seq = self.durable_next;
                self.prev = self.durable_prev;
                Err((SpoolError::io(&path, e), lost))
            }
        }
    }

    /// Makes what was flushed durable (fdatasync).
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        self.file
            .sync_data()
            .map_err(|e| SpoolError::io(&self.dir, e))
    }

    fn roll(&mut self) -> io::Result<()> {
        self.file.sync_data()?;
        let first = self.durable_next;
        write_prev(&self.dir, first, &self.durable_prev)?;
        let f = open_append(&seg_path(&self.dir, first))?;
        self.file = f;
        self.segs.insert(first, Seg { first, bytes: 0 });
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Deletes whole segments every reader is past (`acked_min`: the lowest acknowledged
    /// sequence of the sinks taking this stream, or `u64::MAX` if none does). Never the segment
    /// being written. Returns the bytes freed.
    pub fn collect(&mut self, acked_min: u64) -> u64 {
        let firsts: Vec<u64> = self.segs.keys().copied().collect();
        let mut freed = 0;
        for w in firsts.windows(2) {
            let (first, next_first) = (w[0], w[1]);
            if next_first - 1 > acked_min {
                break;
            }
            freed += self.delete(first);
        }
        freed
    }

    fn delete(&mut self, first: u64) -> u64 {
        let Some(s) = self.segs.remove(&first) else {
            return 0;
        };
        let _ = fs::remove_file(seg_path(&self.dir, s.first));
        let _ = fs::remove_file(prev_path(&self.dir, s.first));
        self.total_bytes = self.total_bytes.saturating_sub(s.bytes);
        s.bytes
    }

    /// Deletes the oldest segment regardless of readers (spool full, drop_oldest). Returns its
    /// sequence range, or None when only the segment being written is left.
    pub fn drop_oldest(&mut self) -> Option<(u64, u64, u64)> {
        if self.segs.len() < 2 {
            return None;
        }
        let mut it = self.segs.keys();
        let first = *it.next()?;
        let next = *it.next()?;
        let bytes = self.delete(first);
        Some((first, next - 1, bytes))
    }

    /// Roll now if the current segment holds anything (so it can be collected).
    pub fn roll_if_nonempty(&mut self) {
        let head = *self.segs.keys().next_back().unwrap_or(&1);
        if self.buf.is_empty() && self.segs.get(&head).is_some_and(|s| s.bytes > 0) {
            let _ = self.roll();
        }
    }
}

/// Reads one stream's spool for one sink, from its acknowledged position on.
pub struct Reader {
    pub stream: Stream,
    dir: PathBuf,
    /// The next sequence to read.
    pub next: u64,
    cur: Option<(u64, BufReader<File>, u64)>, // (segment first, reader, next seq in it)
}

/// The position file of `sink` for a stream.
pub fn pos_path(root: &Path, stream: Stream, sink: &str) -> PathBuf {
    root.join(stream.name()).join(format!("{sink}.pos"))
}

pub fn read_pos(root: &Path, stream: Stream, sink: &str) -> Option<u64> {
    fs::read_to_string(pos_path(root, stream, sink))
        .ok()?
        .trim()
        .parse()
        .ok()
}

pub fn write_pos(root: &Path, stream: Stream, sink: &str, seq: u64) -> io::Result<()> {
    let p = pos_path(root, stream, sink);
    let mut tmp = p.as_os_str().to_owned();
    tmp.push(".tmp");
    fs::write(&tmp, seq.to_string())?;
    fs::rename(&tmp, &p)
}

/// What a read found besides records.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Skipped {
    /// Sequences that were deleted before this reader had them (spool full, drop_oldest).
    pub ranges: Vec<(u64, u64)>,
}

impl Reader {
    /// A reader starting after `acked` (None: from the oldest record on disk).
    pub fn new(root: &Path, stream: Stream, acked: Option<u64>) -> Reader {
        Reader {
            stream,
            dir: root.join(stream.name()),
            next: acked.map_or(0, |a| a + 1),
            cur: None,
        }
    }

    fn open_at(&mut self, skipped: &mut Skipped) -> io::Result<bool> {
        let segs = list_segments(&self.dir)?;
        let Some(&oldest) = segs.first() else {
            return Ok(false);
        };
        if self.next < oldest {
            if self.next > 0 {
                skipped.ranges.push((self.next, oldest - 1));
            }
            self.next = oldest;
        }
        let Some(&first) = segs.iter().rev().find(|f| **f <= self.next) else {
            return Ok(false);
        };
        let f = File::open(seg_path(&self.dir, first))?;
        let mut r = BufReader::with_capacity(256 * 1024, f);
        let mut at = first;
        let mut line = Vec::new();
        while at < self.next {
            line.clear();
            if r.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            at += 1;
        }
        self.cur = Some((first, r, at));
        Ok(true)
    }

    /// Reads up to `max_records` / `max_bytes` records, never past `visible`.
    pub fn read(
        &mut self,
        visible: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> io::Result<(Vec<Line>, Skipped)> {
        let mut out = Vec::new();
        let mut skipped = Skipped::default();
        let mut bytes = 0;
        let mut reopened = false;
        while self.next <= visible && out.len() < max_records && bytes < max_bytes {
            if self.cur.is_none() && !self.open_at(&mut skipped)? {
                break;
            }
            let Some((_, r, at)) = self.cur.as_mut() else {
                break;
            };
            if *at != self.next {
                self.cur = None;
                continue;
            }
            let mut line = Vec::new();
            let n = r.read_until(b'\n', &mut line)?;
            if n == 0 || line.last() != Some(&b'\n') {
                // End of this segment: the next one starts at `next`.
                self.cur = None;
                if reopened {
                    break;
                }
                reopened = true;
                let p = seg_path(&self.dir, self.next);
                match File::open(&p) {
                    Ok(f) => {
                        self.cur = Some((
                            self.next,
                            BufReader::with_capacity(256 * 1024, f),
                            self.next,
                        ));
                        reopened = false;
                    }
                    Err(_) => {
                        // Deleted under us (drop_oldest) or not yet visible: rescan.
                        if !self.open_at(&mut skipped)? {
                            break;
                        }
                    }
                }
                continue;
            }
            line.pop();
            bytes += line.len();
            *at += 1;
            out.push(Line {
                stream: self.stream,
                seq: self.next,
                bytes: line,
            });
            self.next += 1;
            reopened = false;
        }
        Ok((out, skipped))
    }
}

/// Preallocates the security reserve; `release` gives it up when the disk is full.
pub struct Reserve {
    path: PathBuf,
    bytes: u64,
    pub held: bool,
}

impl Reserve {
    pub fn new(dir: &Path, bytes: u64) -> Reserve {
        let mut r = Reserve {
            path: dir.join("reserve"),
            bytes,
            held: false,
        };
        r.ensure();
        r
    }

    /// (Re)creates the reserve file if it is not held; true if it now is.
    pub fn ensure(&mut self) -> bool {
        if self.held || self.bytes == 0 {
            return self.held;
        }
        let ok = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .mode(MODE)
            .open(&self.path)
            .and_then(|f| {
                use std::os::fd::AsRawFd;
                // SAFETY: fd is a valid open file for the duration of the call.
                let rc =
                    unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, self.bytes as libc::off_t) };
                if rc == 0 {
                    Ok(())
                } else {
                    Err(io::Error::from_raw_os_error(rc))
                }
            });
        match ok {
            Ok(()) => self.held = true,
            Err(_) => {
                let _ = fs::remove_file(&self.path);
            }
        }
        self.held
    }

    pub fn release(&mut self) -> bool {
        if !self.held {
            return false;
        }
        self.held = false;
        fs::remove_file(&self.path).is_ok()
    }
}

/// Every stream's spool with the state shared with the workers.
pub struct Spool {
    pub root: PathBuf,
    pub streams: BTreeMap<Stream, StreamSpool>,
    pub shared: Arc<Shared>,
    pub reserve: Reserve,
}

impl Spool {
    pub fn open(root: &Path, segment_bytes: u64, reserve: u64) -> Result<Spool, SpoolError> {
        fs::create_dir_all(root).map_err(|e| SpoolError::io(root, e))?;
        let mut streams = BTreeMap::new();
        streams.insert(
            Stream::Access,
            StreamSpool::open(root, Stream::Access, segment_bytes, false)?,
        );
        streams.insert(
            Stream::Security,
            StreamSpool::open(
                root,
                Stream::Security,
                (segment_bytes / 8).max(64 << 10),
                true,
            )?,
        );
        let shared = Arc::new(Shared::default());
        {
            let mut g = shared.lock();
            for (s, sp) in &streams {
                g.visible.insert(*s, sp.head().0);
                g.oldest.insert(*s, sp.oldest_seq());
            }
        }
        let reserve = Reserve::new(&root.join(Stream::Security.name()), reserve);
        Ok(Spool {
            root: root.to_path_buf(),
            streams,
            shared,
            reserve,
        })
    }

    pub fn stream(&mut self, s: Stream) -> &mut StreamSpool {
        self.streams
            .get_mut(&s)
            .expect("both streams are always open")
    }

    /// Tells the workers what is now readable.
    pub fn publish(&self) {
        let mut g = self.shared.lock();
        for (s, sp) in &self.streams {
            g.visible.insert(*s, sp.head().0);
            g.oldest.insert(*s, sp.oldest_seq());
        }
        g.generation += 1;
        drop(g);
        self.shared.cond.notify_all();
    }

    pub fn drain(&self) {
        self.shared.lock().draining = true;
        self.shared.cond.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: u64) -> Vec<u8> {
        format!(r#"{{"@timestamp":"t","event":{{"id":"id-{i}"}},"n":{i}}}"#).into_bytes()
    }

    #[test]
    fn append_flush_read_and_resume_the_chain() {
        let d = tempfile::tempdir().unwrap();
        let mut sp = StreamSpool::open(d.path(), Stream::Access, 64 << 10, false).unwrap();
        for i in 0..1000 {
            assert_eq!(sp.append(&rec(i)), i + 1);
        }
        sp.flush().unwrap();
        let (last, h) = sp.head();
        assert_eq!(last, 1000);
        assert!(list_segments(sp.dir()).unwrap().len() > 1, "rolled");
        drop(sp);
        let mut sp = StreamSpool::open(d.path(), Stream::Access, 64 << 10, false).unwrap();
        assert_eq!(sp.head(), (1000, h));
        assert_eq!(sp.append(&rec(1000)), 1001);
        sp.flush().unwrap();
        let mut r = Reader::new(d.path(), Stream::Access, None);
        let mut all = Vec::new();
        loop {
            let (b, sk) = r.read(1001, 77, 1 << 20).unwrap();
            assert!(sk.ranges.is_empty());
            if b.is_empty() {
                break;
            }
            all.extend(b);
        }
        assert_eq!(all.len(), 1001);
        let mut prev = chain::ZERO_HASH;
        for (i, l) in all.iter().enumerate() {
            assert_eq!(l.seq, i as u64 + 1);
            let v: serde_json::Value = serde_json::from_slice(&l.bytes).unwrap();
            assert_eq!(v["event"]["sequence"], l.seq);
            assert_eq!(v["sparbar"]["chain"]["prev"], chain::hex(&prev));
            prev = chain::hash(&l.bytes);
        }
        // A reader resumes after its position.
        let mut r = Reader::new(d.path(), Stream::Access, Some(990));
        let (b, _) = r.read(1001, 1000, 1 << 20).unwrap();
        assert_eq!(b.first().map(|l| l.seq), Some(991));
        assert_eq!(b.len(), 11);
    }

    #[test]
    fn torn_line_is_cut_and_chain_continues_after_collect() {
        let d = tempfile::tempdir().unwrap();
        let mut sp = StreamSpool::open(d.path(), Stream::Security, 64 << 10, true).unwrap();
        for i in 0..10 {
            sp.append(&rec(i));
        }
        sp.flush().unwrap();
        let h = sp.head();
        let seg = seg_path(sp.dir(), 1);
        drop(sp);
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(b"{\"torn").unwrap();
        let mut sp = StreamSpool::open(d.path(), Stream::Security, 64 << 10, true).unwrap();
        assert_eq!(sp.recovered.torn_bytes, 6);
        assert_eq!(sp.head(), h);
        sp.roll_if_nonempty();
        assert!(sp.collect(10) > 0);
        assert!(!seg.exists(), "the delivered segment is deleted");
        drop(sp);
        let mut sp = StreamSpool::open(d.path(), Stream::Security, 64 << 10, true).unwrap();
        assert_eq!(
            sp.head(),
            h,
            "the chain link survives when every record was collected"
        );
        assert_eq!(sp.append(&rec(10)), 11);
    }

    #[test]
    fn drop_oldest_shows_as_skipped_range() {
        let d = tempfile::tempdir().unwrap();
        let mut sp = StreamSpool::open(d.path(), Stream::Access, 64 << 10, false).unwrap();
        for i in 0..2000 {
            sp.append(&rec(i));
            if i % 100 == 99 {
                sp.flush().unwrap();
            }
        }
        sp.flush().unwrap();
        let (a, b, _) = sp.drop_oldest().unwrap();
        assert_eq!(a, 1);
        let mut r = Reader::new(d.path(), Stream::Access, Some(0));
        let (batch, sk) = r.read(2000, 10, 1 << 20).unwrap();
        assert_eq!(sk.ranges, vec![(1, b)]);
        assert_eq!(batch[0].seq, b + 1);
    }

    #[test]
    fn failed_flush_rolls_back_the_chain() {
        let d = tempfile::tempdir().unwrap();
        let mut sp = StreamSpool::open(d.path(), Stream::Access, 1 << 20, false).unwrap();
        sp.append(&rec(0));
        sp.flush().unwrap();
        let h = sp.head();
        sp.append(&rec(1));
        // Replace the file handle with a read-only one so the write fails.
        sp.file = File::open(seg_path(sp.dir(), 1)).unwrap();
        let (_, lost) = sp.flush().unwrap_err();
        assert_eq!(lost, 1);
        assert_eq!(sp.head(), h);
        assert_eq!(
            sp.append(&rec(2)),
            2,
            "the lost record's sequence is reused: it never existed"
        );
    }
}
