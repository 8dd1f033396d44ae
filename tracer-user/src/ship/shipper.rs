//! The agent's side of shipping: appends the pipeline's records to the two spools, keeps the
//! access spool within its budget (by the configured policy), syncs, collects delivered
//! segments, and writes the trail's own records into the security stream: gaps (what was never
//! spooled, what a sink missed, when the agent was not running), the agent's start and state,
//! and signed checkpoints. At stop it drains the workers for a bounded time.

use std::{
    collections::{BTreeMap, VecDeque},
    path::{Path, PathBuf},
    sync::{mpsc, Arc},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use log::{error, info, warn};
use serde_json::{json, Value};

use super::{
    chain::{self, Head, Signer_},
    deliver::{self, Notice, WorkerCtx},
    sinks::{destination, SinkSetupError},
    spool::{Spool, SpoolError},
    Destination, Stream,
};
use crate::{
    config::{OnFull, SinkConfig, SpoolConfig},
    record::ids::EventIds,
    record::rfc3339_micros,
    stats::{Metric, Stats},
};

/// How long a stop waits for the sinks to take what is spooled.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Security records held in memory while their spool cannot be written (disk full, reserve
/// gone); beyond that they are counted as lost.
const MAX_PENDING_SECURITY: usize = 100_000;
pub const RUN_FILE: &str = "run.json";

#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// A sink's destination could not be built from its config.
    #[error("sink {name}: {source}")]
    Sink {
        name: String,
        source: SinkSetupError,
    },
    #[error("sink {name}: cannot start its worker thread: {source}")]
    Worker {
        name: String,
        source: std::io::Error,
    },
    #[error("checkpoint key in {path}: {source}")]
    Key {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Records that never made it into the spool, per stream and reason, until stated.
#[derive(Debug, Clone)]
struct Loss {
    first_ms: u64,
    last_ms: u64,
    records: u64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn ts(ms: u64) -> String {
    rfc3339_micros(ms.saturating_mul(1_000_000))
}

/// A running sink worker.
struct Worker {
    cfg: SinkConfig,
    handle: JoinHandle<()>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

pub struct Shipper {
    pub spool: Spool,
    cfg: SpoolConfig,
    stats: Arc<Stats>,
    host: String,
    ids: EventIds,
    signer: Signer_,
    workers: Vec<Worker>,
    sinks: Vec<(String, Vec<Stream>)>,
    notices: mpsc::Receiver<Notice>,
    notices_tx: mpsc::Sender<Notice>,
    losses: BTreeMap<(Stream, &'static str), Loss>,
    pending_security: VecDeque<Vec<u8>>,
    last_sync: Instant,
    last_checkpoint: Instant,
    last_state: Instant,
    last_heartbeat: Instant,
    state_dir: PathBuf,
    started_ms: u64,
    last_error_log: Option<Instant>,
    dead: BTreeMap<(String, Stream), (u64, String)>,
    last_dead_emit: Instant,
}

impl Shipper {
    /// Opens the spools, starts one worker per sink, and states in the security stream how the
    /// previous run ended and what was not observed since.
    pub fn start(
        cfg: &SpoolConfig,
        sinks: &[SinkConfig],
        state_dir: &Path,
        host: &str,
        stats: Arc<Stats>,
    ) -> Result<Shipper, ShipError> {
        let spool = Spool::open(&cfg.dir, cfg.segment_bytes, cfg.security_reserve)?;
        for (s, sp) in &spool.streams {
            if sp.recovered.torn_bytes > 0 {
                warn!(
                    "spool {}: cut a torn last record ({} bytes) left by a crash",
                    s.name(),
                    sp.recovered.torn_bytes
                );
                stats.add_label(
                    Metric::SpoolTornBytes,
                    "stream",
                    s.name(),
                    sp.recovered.torn_bytes,
                );
            }
        }
        if !spool.reserve.held && cfg.security_reserve > 0 {
            warn!(
                "spool: cannot reserve {} bytes for the security stream (disk full?)",
                cfg.security_reserve
            );
        }
        let signer = Signer_::load_or_create(state_dir).map_err(|e| ShipError::Key {
            path: state_dir.join(chain::KEY_FILE),
            source: e,
        })?;
        let (tx, rx) = mpsc::channel();
        let mut dests = Vec::new();
        for s in sinks {
            dests.push(destination(s, host).map_err(|source| ShipError::Sink {
                name: s.name.clone(),
                source,
            })?);
        }
        let now = Instant::now();
        let mut sh = Shipper {
            spool,
            cfg: cfg.clone(),
            stats,
            host: host.to_string(),
            ids: EventIds::new(),
            signer,
            workers: Vec::new(),
            sinks: Vec::new(),
            notices: rx,
            notices_tx: tx,
            losses: BTreeMap::new(),
            pending_security: VecDeque::new(),
            last_sync: now,
            last_checkpoint: now,
            last_state: now,
            last_heartbeat: now,
            state_dir: state_dir.to_path_buf(),
            started_ms: now_ms(),
            last_error_log: None,
            dead: BTreeMap::new(),
            last_dead_emit: now,
        };
        for (s, d) in sinks.iter().zip(dests) {
            sh.spawn(s, d)?;
        }
        sh.previous_run();
        sh.heartbeat(false);
        Ok(sh)
    }

    fn spawn(&mut self, s: &SinkConfig, dest: Box<dyn Destination>) -> Result<(), ShipError> {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ctx = WorkerCtx {
            root: self.cfg.dir.clone(),
            shared: self.spool.shared.clone(),
            stats: self.stats.clone(),
            deadletter_dir: self.state_dir.join("deadletter"),
            notices: self.notices_tx.clone(),
            stop: stop.clone(),
        };
        // Register the position before the worker runs, so nothing is collected under it.
        for st in &s.streams {
            let p = super::spool::read_pos(&self.cfg.dir, *st, &s.name).unwrap_or(0);
            self.spool.shared.ack(*st, &s.name, p);
        }
        let handle =
            deliver::spawn(dest, s.streams.clone(), ctx).map_err(|source| ShipError::Worker {
                name: s.name.clone(),
                source,
            })?;
        info!(
            "sink {} ({}): {}",
            s.name,
            s.kind.type_name(),
            s.streams
                .iter()
                .map(|x| x.name())
                .collect::<Vec<_>>()
                .join(" and ")
        );
        self.workers.push(Worker {
            cfg: s.clone(),
            handle,
            stop,
        });
        self.sinks = self
            .workers
            .iter()
            .map(|w| (w.cfg.name.clone(), w.cfg.streams.clone()))
            .collect();
        Ok(())
    }

    /// A reload: sinks whose configuration is unchanged keep running; removed or changed ones
    /// stop between attempts (what they had not acknowledged stays spooled and a changed sink's
    /// new worker resumes from the same position); new ones start. Every new destination is
    /// built first, so a bad one rejects the whole change and the old sinks go on.
    /// Returns the names of the sinks started and stopped.
    pub fn reconfigure(
        &mut self,
        sinks: &[SinkConfig],
    ) -> Result<(Vec<String>, Vec<String>), ShipError> {
        let mut fresh = Vec::new();
        for s in sinks {
            if self.workers.iter().any(|w| w.cfg == *s) {
                continue;
            }
            let d = destination(s, &self.host).map_err(|source| ShipError::Sink {
                name: s.name.clone(),
                source,
            })?;
            fresh.push((s.clone(), d));
        }
        let (keep, gone): (Vec<Worker>, Vec<Worker>) = std::mem::take(&mut self.workers)
            .into_iter()
            .partition(|w| sinks.contains(&w.cfg));
        self.workers = keep;
        let mut stopped = Vec::new();
        for w in &gone {
            w.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        self.spool.shared.cond.notify_all();
        let deadline = Instant::now() + Duration::from_secs(10);
        for w in gone {
            while !w.handle.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if w.handle.is_finished() {
                let _ = w.handle.join();
            } else {
                warn!(
                    "sink {}: its old worker is still in a send; it ends after it",
                    w.cfg.name
                );
            }
            stopped.push(w.cfg.name.clone());
        }
        let mut started = Vec::new();
        for (s, d) in fresh {
            self.spawn(&s, d)?;
            started.push(s.name.clone());
        }
        self.sinks = self
            .workers
            .iter()
            .map(|w| (w.cfg.name.clone(), w.cfg.streams.clone()))
            .collect();
        Ok((started, stopped))
    }

    fn base(&mut self, dataset: &str, at_ms: u64, action: &str) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert("@timestamp".into(), json!(ts(at_ms)));
        m.insert(
            "event".into(),
            json!({"id": self.ids.next_id(), "kind": "event", "category": ["process"], "type": ["info"], "action": action, "dataset": dataset, "created": ts(now_ms())}),
        );
        m.insert("host".into(), json!({"name": self.host}));
        m
    }

    fn security(&mut self, m: serde_json::Map<String, Value>) {
        let line = serde_json::to_vec(&Value::Object(m)).unwrap_or_default();
        self.pending_security.push_back(line);
    }

    /// The start record, and a gap record for the time the agent was not running.
    fn previous_run(&mut self) {
        let prev: Option<Value> = std::fs::read(self.state_dir.join(RUN_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let now = now_ms();
        let mut m = self.base("sparbar.agent", now, "started");
        let mut agent = json!({"version": env!("CARGO_PKG_VERSION"), "pid": std::process::id()});
        let heads: Vec<Value> = self
            .spool
            .streams
            .iter()
            .map(|(s, sp)| json!({"stream": s.name(), "sequence": sp.head().0}))
            .collect();
        agent["spool"] = json!(heads);
        if let Some(p) = &prev {
            let clean = p["clean"].as_bool().unwrap_or(false);
            let last = p["last_seen_ms"].as_u64().unwrap_or(0);
            agent["previous"] =
                json!({"clean_stop": clean, "last_seen": ts(last), "pid": p["pid"]});
            if !clean {
                warn!("the previous run (pid {}) did not stop cleanly: last seen {}; records it had not yet spooled are lost and traffic since was not observed", p["pid"], ts(last));
            }
            m.insert("sparbar".into(), json!({"agent": agent}));
            self.security(m);
            let mut g = self.base("sparbar.gap", last, "agent_not_running");
            g.insert(
                "sparbar".into(),
                json!({"gap": {"stream": "all", "reason": if clean { "agent_stopped" } else { "agent_crashed" }, "start": ts(last), "end": ts(now), "duration_ms": now.saturating_sub(last)}}),
            );
            if let Some(Value::Object(e)) = g.get_mut("event") {
                e.insert("start".into(), json!(ts(last)));
                e.insert("end".into(), json!(ts(now)));
            }
            self.security(g);
            return;
        }
        m.insert("sparbar".into(), json!({"agent": agent}));
        self.security(m);
    }

    /// A `sparbar.agent` record of something the agent did to itself (a reload, applied or
    /// rejected), with its details under `sparbar.agent`.
    pub fn agent_event(&mut self, action: &str, details: Value) {
        let mut m = self.base("sparbar.agent", now_ms(), action);
        m.insert("sparbar".into(), json!({ "agent": details }));
        self.security(m);
        self.write_security();
        self.spool.publish();
    }

    /// `run.json`: when this run was last seen alive, and whether it stopped cleanly.
    fn heartbeat(&mut self, clean: bool) {
        let doc = json!({"pid": std::process::id(), "started_ms": self.started_ms, "last_seen_ms": now_ms(), "clean": clean});
        let _ = crate::statefile::write_private(
            &self.state_dir.join(RUN_FILE),
            &serde_json::to_vec(&doc).unwrap_or_default(),
        );
        self.last_heartbeat = Instant::now();
    }

    fn lose(&mut self, stream: Stream, reason: &'static str, n: u64) {
        if n == 0 {
            return;
        }
        let now = now_ms();
        let key = Metric::RecordsDropped.label("reason", reason);
        self.stats.add_key(&key.label("stream", stream.name()), n);
        let l = self.losses.entry((stream, reason)).or_insert(Loss {
            first_ms: now,
            last_ms: now,
            records: 0,
        });
        l.last_ms = now;
        l.records += n;
    }

    /// Appends the pipeline's records (draining both vectors), hands them to the OS and tells
    /// the workers.
    pub fn write(&mut self, access: &mut Vec<Vec<u8>>, security: &mut Vec<Vec<u8>>) {
        self.pending_security.extend(security.drain(..));
        self.write_security();
        if !access.is_empty() {
            let max = self.cfg.max_bytes;
            let mut refused = 0u64;
            let mut dropped_segments = false;
            for line in access.drain(..) {
                let sp = self.spool.stream(Stream::Access);
                if sp.total_bytes() + line.len() as u64 > max {
                    match self.cfg.on_full {
                        OnFull::DropNew => {
                            refused += 1;
                            continue;
                        }
                        OnFull::DropOldest => {
                            let _ = sp.flush();
                            sp.roll_if_nonempty();
                            if sp.drop_oldest().is_some() {
                                dropped_segments = true;
                            } else {
                                refused += 1;
                                continue;
                            }
                        }
                    }
                }
                self.spool.stream(Stream::Access).append(&line);
                if self.spool.stream(Stream::Access).buffered_bytes() >= 1 << 20 {
                    self.flush_access();
                }
            }
            if dropped_segments {
                let key = Metric::SpoolSegmentsDropped.label("reason", "spool_full");
                self.stats.add_key(&key.label("stream", "access"), 1);
            }
            self.lose(Stream::Access, "spool_full", refused);
            self.flush_access();
        }
        self.spool.publish();
    }

    fn flush_access(&mut self) {
        match self.spool.stream(Stream::Access).flush() {
            Ok(n) => self
                .stats
                .add_label(Metric::RecordsSpooled, "stream", "access", n),
            Err((e, lost)) => {
                let reason = if e.is_disk_full() {
                    "disk_full"
                } else {
                    "spool_write_error"
                };
                if self
                    .last_error_log
                    .is_none_or(|t| t.elapsed() > Duration::from_secs(10))
                {
                    error!("{e}: access records are being lost ({lost} now; counted, and stated in a gap record)");
                    self.last_error_log = Some(Instant::now());
                }
                self.lose(Stream::Access, reason, lost);
            }
        }
    }

    /// Security records go one by one, each synced; when the disk is full the reserve is given
    /// up, and what still cannot be written waits in memory.
    fn write_security(&mut self) {
        while let Some(line) = self.pending_security.pop_front() {
            let sp = self.spool.stream(Stream::Security);
            sp.append(&line);
            match sp.flush() {
                Ok(n) => self
                    .stats
                    .add_label(Metric::RecordsSpooled, "stream", "security", n),
                Err((e, _)) => {
                    if e.is_disk_full() && self.spool.reserve.release() {
                        warn!("spool: disk full; gave up the security reserve to keep writing security records");
                        self.pending_security.push_front(line);
                        continue;
                    }
                    error!(
                        "{e}: security records wait in memory ({} held)",
                        self.pending_security.len() + 1
                    );
                    self.pending_security.push_front(line);
                    while self.pending_security.len() > MAX_PENDING_SECURITY {
                        self.pending_security.pop_back();
                        self.lose(Stream::Security, "spool_write_error", 1);
                    }
                    break;
                }
            }
        }
    }

    /// One `dead_lettered` record per sink and stream at most every 10 s (and at stop), with the
    /// count and the last reason.
    fn dead_letter_records(&mut self, force: bool) {
        if self.dead.is_empty()
            || (!force && self.last_dead_emit.elapsed() < Duration::from_secs(10))
        {
            return;
        }
        for ((sink, stream), (records, reason)) in std::mem::take(&mut self.dead) {
            let mut g = self.base("sparbar.sink", now_ms(), "dead_lettered");
            g.insert("sparbar".into(), json!({"sink": {"name": sink, "stream": stream.name(), "records": records, "reason": reason}}));
            self.security(g);
        }
        self.last_dead_emit = Instant::now();
    }

    fn gap_records(&mut self) {
        for ((stream, reason), l) in std::mem::take(&mut self.losses) {
            let mut g = self.base("sparbar.gap", l.first_ms, reason);
            g.insert(
                "sparbar".into(),
                json!({"gap": {"stream": stream.name(), "reason": reason, "records": l.records, "start": ts(l.first_ms), "end": ts(l.last_ms)}}),
            );
            warn!(
                "{} {} record(s) lost between {} and {}: {reason}",
                l.records,
                stream.name(),
                ts(l.first_ms),
                ts(l.last_ms)
            );
            self.security(g);
        }
        while let Ok(n) = self.notices.try_recv() {
            match n {
                Notice::Skipped {
                    sink,
                    stream,
                    first,
                    last,
                } => {
                    let mut g = self.base("sparbar.gap", now_ms(), "spool_full");
                    g.insert(
                        "sparbar".into(),
                        json!({"gap": {"stream": stream.name(), "reason": "spool_full", "sink": sink, "first_sequence": first, "last_sequence": last, "records": last - first + 1}}),
                    );
                    self.security(g);
                }
                Notice::DeadLettered {
                    sink,
                    stream,
                    records,
                    reason,
                } => {
                    let e = self
                        .dead
                        .entry((sink, stream))
                        .or_insert((0, String::new()));
                    e.0 += records;
                    e.1 = reason;
                }
                Notice::Down { sink, reason } => {
                    let mut g = self.base("sparbar.sink", now_ms(), "down");
                    g.insert(
                        "sparbar".into(),
                        json!({"sink": {"name": sink, "reason": reason}}),
                    );
                    self.security(g);
                }
                Notice::Up {
                    sink,
                    after_failures,
                } => {
                    let mut g = self.base("sparbar.sink", now_ms(), "up");
                    g.insert(
                        "sparbar".into(),
                        json!({"sink": {"name": sink, "failed_attempts": after_failures}}),
                    );
                    self.security(g);
                }
            }
        }
    }

    /// Per sink and stream: records spooled and not yet acknowledged.
    pub fn lag(&self) -> BTreeMap<String, BTreeMap<&'static str, u64>> {
        let g = self.spool.shared.lock();
        let acked = self
            .spool
            .shared
            .acked
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut out = BTreeMap::new();
        for (name, streams) in &self.sinks {
            let m: &mut BTreeMap<&'static str, u64> = out.entry(name.clone()).or_default();
            for s in streams {
                let v = g.visible.get(s).copied().unwrap_or(0);
                let a = acked.get(&(*s, name.clone())).copied().unwrap_or(0);
                m.insert(s.name(), v.saturating_sub(a));
            }
        }
        out
    }

    /// The spool's own figures, for the state record and stats.json.
    pub fn usage(&self) -> Value {
        let streams: BTreeMap<&str, Value> = self
            .spool
            .streams
            .iter()
            .map(|(s, sp)| (s.name(), json!({"bytes": sp.total_bytes(), "oldest_sequence": sp.oldest_seq(), "last_sequence": sp.head().0})))
            .collect();
        json!({"streams": streams, "max_bytes": self.cfg.max_bytes, "security_reserve_held": self.spool.reserve.held, "security_pending": self.pending_security.len(), "sink_lag": self.lag()})
    }

    fn collect(&mut self) {
        let acked = self
            .spool
            .shared
            .acked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for s in Stream::ALL {
            let min = self
                .sinks
                .iter()
                .filter(|(_, st)| st.contains(&s))
                .map(|(n, _)| acked.get(&(s, n.clone())).copied().unwrap_or(0))
                .min()
                .unwrap_or(u64::MAX);
            let sp = self.spool.stream(s);
            // A fully delivered segment being written is closed so it can go too.
            if min >= sp.head().0 && sp.total_bytes() > self.cfg.segment_bytes / 2 {
                sp.roll_if_nonempty();
            }
            let freed = sp.collect(min);
            if freed > 0 {
                self.stats
                    .add_label(Metric::SpoolBytesCollected, "stream", s.name(), freed);
            }
        }
    }

    fn checkpoint(&mut self) {
        self.write_security();
        let heads: Vec<Head> = self
            .spool
            .streams
            .iter()
            .map(|(s, sp)| {
                let (seq, hash) = sp.head();
                Head {
                    stream: *s,
                    seq,
                    hash,
                }
            })
            .collect();
        let id = self.ids.next_id();
        let line = chain::checkpoint_line(&self.signer, &heads, &id, now_ms(), &self.host);
        self.pending_security.push_back(line);
        self.write_security();
        self.stats.add(Metric::CheckpointsWritten, 1);
        self.last_checkpoint = Instant::now();
    }

    /// The periodic agent state record: `state` is what the agent reports of itself (probes,
    /// counters); the spool's figures are added here.
    pub fn state_record(&mut self, state: Value) {
        let mut m = self.base("sparbar.state", now_ms(), "state");
        let mut st = state;
        st["spool"] = self.usage();
        m.insert("sparbar".into(), json!({"state": st}));
        self.security(m);
        self.last_state = Instant::now();
    }

    pub fn state_due(&self) -> bool {
        self.last_state.elapsed() >= self.cfg.state_interval
    }

    /// The 1 s housekeeping.
    pub fn tick(&mut self) {
        self.gap_records();
        self.dead_letter_records(false);
        if self.last_sync.elapsed() >= self.cfg.access_sync {
            if let Err(e) = self.spool.stream(Stream::Access).sync() {
                warn!("{e}");
            }
            self.last_sync = Instant::now();
        }
        if !self.spool.reserve.held {
            self.spool.reserve.ensure();
        }
        self.collect();
        if self.last_checkpoint.elapsed() >= self.cfg.checkpoint_interval {
            self.checkpoint();
        }
        self.write_security();
        self.spool.publish();
        for (name, m) in self.lag() {
            for (s, v) in m {
                let key = Metric::SinkLagRecords.label("sink", &name);
                self.stats.set_key(&key.label("stream", s), v);
            }
        }
        if self.last_heartbeat.elapsed() >= Duration::from_secs(1) {
            self.heartbeat(false);
        }
    }

    /// Final records and checkpoint, then lets the workers deliver for up to `timeout`.
    /// Returns the spool's figures after the drain.
    pub fn stop(mut self, final_state: Value, timeout: Duration) -> Value {
        self.gap_records();
        self.dead_letter_records(true);
        self.state_record(final_state);
        self.checkpoint();
        let _ = self.spool.stream(Stream::Access).sync();
        self.spool.publish();
        self.spool.drain();
        let deadline = Instant::now() + timeout;
        for Worker { cfg, handle: h, .. } in std::mem::take(&mut self.workers) {
            let name = cfg.name;
            while !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if h.is_finished() {
                let _ = h.join();
            } else {
                warn!("sink {name}: still behind after {timeout:?}; what it has not acknowledged stays in the spool for the next start");
            }
        }
        self.collect();
        for (name, m) in self.lag() {
            for (s, v) in m {
                let key = Metric::SinkLagRecords.label("sink", &name);
                self.stats.set_key(&key.label("stream", s), v);
            }
        }
        self.heartbeat(true);
        self.usage()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FileSinkConfig, SinkKind};
    use crate::ship::BatchLimits;

    fn file_sink(name: &str, path: &Path) -> SinkConfig {
        SinkConfig {
            name: name.into(),
            streams: vec![Stream::Security, Stream::Access],
            batch: BatchLimits {
                max_records: 100,
                max_bytes: 1 << 20,
                linger: Duration::from_millis(1),
            },
            kind: SinkKind::File(FileSinkConfig {
                path: path.display().to_string(),
                rotate_bytes: 0,
                rotate_interval: None,
                keep_files: 0,
                sync: false,
            }),
        }
    }

    fn spool_cfg(dir: &Path) -> SpoolConfig {
        SpoolConfig {
            dir: dir.join("spool"),
            max_bytes: 1 << 30,
            segment_bytes: 1 << 20,
            security_reserve: 0,
            on_full: OnFull::DropNew,
            access_sync: Duration::from_secs(1),
            checkpoint_interval: Duration::from_secs(3600),
            state_interval: Duration::from_secs(3600),
        }
    }

    fn access_ids(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["sparbar"]["chain"]["stream"] == "access")
            .map(|v| v["event"]["id"].as_str().unwrap_or("").to_string())
            .collect()
    }

    fn wait_for(path: &Path, n: usize) {
        let t = Instant::now();
        while access_ids(path).len() < n && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_reload_adds_and_removes_sinks_without_losing_a_record() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a.jsonl"), d.path().join("b.jsonl"));
        let stats = Arc::new(Stats::default());
        let mut sh = Shipper::start(
            &spool_cfg(d.path()),
            &[file_sink("a", &a)],
            d.path(),
            "h",
            stats,
        )
        .unwrap();
        let rec = |i: u32| format!(r#"{{"event":{{"id":"r{i}"}}}}"#).into_bytes();
        sh.write(&mut (0..50).map(rec).collect(), &mut Vec::new());
        wait_for(&a, 50);
        // A broken new sink rejects the whole change; "a" goes on.
        let bad = file_sink("b", Path::new("/proc/no/such/dir/b.jsonl"));
        assert!(sh.reconfigure(&[file_sink("a", &a), bad]).is_err());
        sh.write(&mut (50..60).map(rec).collect(), &mut Vec::new());
        wait_for(&a, 60);
        let (started, stopped) = sh
            .reconfigure(&[file_sink("a", &a), file_sink("b", &b)])
            .unwrap();
        assert_eq!((started, stopped), (vec!["b".to_string()], vec![]));
        sh.write(&mut (60..100).map(rec).collect(), &mut Vec::new());
        wait_for(&a, 100);
        wait_for(&b, 40);
        // "a" is removed; "b" goes on.
        let (_, stopped) = sh.reconfigure(&[file_sink("b", &b)]).unwrap();
        assert_eq!(stopped, vec!["a".to_string()]);
        sh.write(&mut (100..110).map(rec).collect(), &mut Vec::new());
        let _ = sh.stop(json!({}), Duration::from_secs(10));
        let ids_a = access_ids(&a);
        let want_a: Vec<String> = (0..100).map(|i| format!("r{i}")).collect();
        assert_eq!(
            ids_a, want_a,
            "a: every record once, in order, until it was removed"
        );
        let ids_b = access_ids(&b);
        assert!(
            ids_b.ends_with(&(60..110).map(|i| format!("r{i}")).collect::<Vec<_>>()),
            "b: {ids_b:?}"
        );
        let mut uniq = ids_b.clone();
        uniq.dedup();
        assert_eq!(uniq.len(), ids_b.len(), "no duplicates in b");
    }
}
