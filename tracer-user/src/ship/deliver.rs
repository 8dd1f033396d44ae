//! One worker thread per sink: reads the spool from the sink's acknowledged position (security
//! before access, always), cuts batches, sends them, retries with exponential backoff and
//! jitter (or the receiver's `Retry-After`), dead-letters what the receiver refuses for good, and
//! only then moves and saves its position. A sink that is down delays only itself.

use std::{
    collections::BTreeMap,
    fs::OpenOptions,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::PathBuf,
    sync::{mpsc, Arc},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use log::{error, info, warn};

use super::{
    spool::{read_pos, write_pos, Reader, Shared},
    Destination, Line, Outcome, SendError, Stream,
};
use crate::stats::{Key, Metric, Stats};

/// Longest backoff between attempts, and the longest `Retry-After` honoured.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);
const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// What a worker tells the agent (which turns it into security records).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Sequences deleted from the spool (full, drop_oldest) before this sink had them.
    Skipped {
        sink: String,
        stream: Stream,
        first: u64,
        last: u64,
    },
    /// Records the receiver refused for good, now in the dead-letter file.
    DeadLettered {
        sink: String,
        stream: Stream,
        records: u64,
        reason: String,
    },
    /// The sink failed after working (or at its first attempt), or recovered.
    Down {
        sink: String,
        reason: String,
    },
    Up {
        sink: String,
        after_failures: u64,
    },
}

pub struct WorkerCtx {
    pub root: PathBuf,
    pub shared: Arc<Shared>,
    pub stats: Arc<Stats>,
    pub deadletter_dir: PathBuf,
    pub notices: mpsc::Sender<Notice>,
    /// Set to end this worker alone (a reload removed or changed its sink): it stops between
    /// attempts, and what it had not acknowledged is delivered again by its successor.
    pub stop: Arc<std::sync::atomic::AtomicBool>,
}

fn stopped(ctx: &WorkerCtx) -> bool {
    ctx.stop.load(std::sync::atomic::Ordering::Relaxed)
}

struct Names {
    delivered: BTreeMap<Stream, Key>,
    dead: BTreeMap<Stream, Key>,
    skipped: BTreeMap<Stream, Key>,
    retries: Key,
    acked: BTreeMap<Stream, Key>,
}

fn jitter(d: Duration, state: &mut u64) -> Duration {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    let half = d / 2;
    half + Duration::from_nanos(*state % (half.as_nanos() as u64).max(1))
}

/// Starts the worker of `dest` over `streams`.
pub fn spawn(
    mut dest: Box<dyn Destination>,
    streams: Vec<Stream>,
    ctx: WorkerCtx,
) -> std::io::Result<JoinHandle<()>> {
    let name = dest.name().to_string();
    std::thread::Builder::new()
        .name(format!("sink-{name}").chars().take(15).collect())
        .spawn(move || run(&mut *dest, &streams, &ctx))
}

fn run(dest: &mut dyn Destination, streams: &[Stream], ctx: &WorkerCtx) {
    let name = dest.name().to_string();
    let label = |m: Metric, s: Stream| m.label("sink", &name).label("stream", s.name());
    let names = Names {
        delivered: streams
            .iter()
            .map(|s| (*s, label(Metric::RecordsDelivered, *s)))
            .collect(),
        dead: streams
            .iter()
            .map(|s| (*s, label(Metric::RecordsDeadLettered, *s)))
            .collect(),
        skipped: streams
            .iter()
            .map(|s| {
                let k = Metric::RecordsDropped.label("reason", "spool_full");
                (*s, k.label("sink", &name).label("stream", s.name()))
            })
            .collect(),
        retries: Metric::SinkRetries.label("sink", &name),
        acked: streams
            .iter()
            .map(|s| (*s, label(Metric::SinkAckedSequence, *s)))
            .collect(),
    };
    let mut readers: Vec<Reader> = streams
        .iter()
        .map(|s| {
            let acked = read_pos(&ctx.root, *s, &name);
            if let Some(a) = acked {
                ctx.shared.ack(*s, &name, a);
                ctx.stats.set_key(&names.acked[s], a);
            } else {
                // A new sink: everything still spooled is its to deliver.
                ctx.shared.ack(*s, &name, 0);
            }
            Reader::new(&ctx.root, *s, acked)
        })
        .collect();
    let limits = dest.limits();
    let mut rng =
        (std::process::id() as u64) << 32 | (Instant::now().elapsed().subsec_nanos() as u64 | 1);
    let mut generation = 0;
    let mut failures = 0u64;
    let mut last_log: Option<Instant> = None;
    loop {
        let mut did = false;
        for r in readers.iter_mut() {
            let visible = ctx.shared.visible(r.stream);
            if r.next > visible && r.next != 0 {
                continue;
            }
            let (mut batch, skipped) = match r.read(visible, limits.max_records, limits.max_bytes) {
                Ok(x) => x,
                Err(e) => {
                    error!("sink {name}: reading the {} spool: {e}", r.stream.name());
                    ctx.stats.add_reason(Metric::SpoolReadErrors, &name, 1);
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                }
            };
            for (a, b) in skipped.ranges {
                ctx.stats.add_key(&names.skipped[&r.stream], b - a + 1);
                let _ = ctx.notices.send(Notice::Skipped {
                    sink: name.clone(),
                    stream: r.stream,
                    first: a,
                    last: b,
                });
            }
            if batch.is_empty() {
                continue;
            }
            // Access batches wait a little to fill; security records go at once.
            let full = |b: &[Line]| {
                b.len() >= limits.max_records
                    || b.iter().map(|l| l.bytes.len()).sum::<usize>() >= limits.max_bytes
            };
            // Records already waiting (a backlog) mean there is no point in waiting for more.
            let backlog = ctx.shared.visible(r.stream) >= r.next;
            if r.stream == Stream::Access
                && !full(&batch)
                && !backlog
                && !limits.linger.is_zero()
                && !ctx.shared.lock().draining
            {
                let deadline = Instant::now() + limits.linger;
                while !full(&batch) && Instant::now() < deadline {
                    generation = ctx.shared.wait(
                        generation,
                        deadline.saturating_duration_since(Instant::now()),
                    );
                    let visible = ctx.shared.visible(r.stream);
                    let bytes: usize = batch.iter().map(|l| l.bytes.len()).sum();
                    match r.read(
                        visible,
                        limits.max_records - batch.len(),
                        limits.max_bytes.saturating_sub(bytes),
                    ) {
                        Ok((more, _)) if !more.is_empty() => batch.extend(more),
                        _ => {}
                    }
                    if ctx.shared.lock().draining {
                        break;
                    }
                }
            }
            let last = batch.last().map_or(0, |l| l.seq);
            let delivered = deliver(
                dest,
                batch,
                ctx,
                &names,
                &mut rng,
                &mut failures,
                &mut last_log,
            );
            if !delivered {
                return;
            }
            if let Err(e) = write_pos(&ctx.root, r.stream, &name, last) {
                warn!("sink {name}: saving its position: {e}; it may deliver some records again after a restart");
            }
            ctx.shared.ack(r.stream, &name, last);
            ctx.stats.set_key(&names.acked[&r.stream], last);
            did = true;
            break; // security first again
        }
        if stopped(ctx) {
            let _ = dest.flush();
            return;
        }
        if !did {
            let g = ctx.shared.lock();
            let draining = g.draining;
            let caught_up = readers
                .iter()
                .all(|r| r.next > g.visible.get(&r.stream).copied().unwrap_or(0));
            drop(g);
            if draining && caught_up {
                if let Err(e) = dest.flush() {
                    warn!("sink {name}: final flush: {e}");
                }
                return;
            }
            generation = ctx.shared.wait(generation, Duration::from_millis(500));
        }
    }
}

/// Sends `batch` until every record is accepted or dead-lettered (true). Blocks through
/// outages; false when the worker was told to stop first.
fn deliver(
    dest: &mut dyn Destination,
    batch: Vec<Line>,
    ctx: &WorkerCtx,
    names: &Names,
    rng: &mut u64,
    failures: &mut u64,
    last_log: &mut Option<Instant>,
) -> bool {
    let name = dest.name().to_string();
    let stream = batch[0].stream;
    let mut pending = batch;
    let mut attempt = 0u32;
    let mut partial_attempt = 0u32;
    loop {
        let result = dest.send(&pending).and_then(|o| dest.flush().map(|_| o));
        let (wait, reason, partial) = match result {
            Ok(Outcome {
                rejected,
                retry,
                retry_after,
            }) => {
                if !rejected.is_empty() {
                    dead_letter(&name, &pending, &rejected, ctx, names);
                }
                let accepted = pending.len() - rejected.len() - retry.len();
                ctx.stats
                    .add_key(&names.delivered[&stream], accepted as u64);
                if *failures > 0 {
                    info!(
                        "sink {name}: delivering again after {} failed attempt(s)",
                        failures
                    );
                    let _ = ctx.notices.send(Notice::Up {
                        sink: name.clone(),
                        after_failures: *failures,
                    });
                    *failures = 0;
                }
                if retry.is_empty() {
                    return true;
                }
                // The receiver answered: whole-batch backoff starts over.
                attempt = 0;
                let keep: std::collections::BTreeSet<usize> = retry.into_iter().collect();
                pending = pending
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| keep.contains(i))
                    .map(|(_, l)| l)
                    .collect();
                (
                    retry_after,
                    format!("{} record(s) to retry", pending.len()),
                    true,
                )
            }
            Err(SendError::Reject { reason }) => {
                let all: Vec<(usize, String)> =
                    (0..pending.len()).map(|i| (i, reason.clone())).collect();
                dead_letter(&name, &pending, &all, ctx, names);
                return true;
            }
            Err(SendError::Retry { reason, after }) => (after, reason, false),
        };
        ctx.stats.add_key(&names.retries, 1);
        // Items the receiver asked to resend are not the sink being down.
        if !partial {
            *failures += 1;
        }
        if *failures == 1 && !partial {
            let _ = ctx.notices.send(Notice::Down {
                sink: name.clone(),
                reason: reason.clone(),
            });
        }
        if last_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            warn!(
                "sink {name}: {reason}; retrying (attempt {}), records wait in the spool",
                attempt + 1
            );
            *last_log = Some(Instant::now());
        }
        // Items the receiver asked to resend: it is up, so the wait stays short (at most 5 s).
        let backoff = if partial {
            partial_attempt += 1;
            jitter(
                FIRST_BACKOFF
                    .saturating_mul(1 << (partial_attempt - 1).min(5))
                    .min(Duration::from_secs(5)),
                rng,
            )
        } else {
            jitter(
                FIRST_BACKOFF
                    .saturating_mul(1 << attempt.min(8))
                    .min(MAX_BACKOFF),
                rng,
            )
        };
        let wait = match wait {
            Some(w) => w.min(MAX_RETRY_AFTER).max(backoff / 4),
            None => backoff,
        };
        if !partial {
            attempt += 1;
        }
        let until = Instant::now() + wait;
        while Instant::now() < until {
            if stopped(ctx) {
                return false;
            }
            std::thread::sleep(
                until
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(100)),
            );
        }
    }
}

fn dead_letter(
    name: &str,
    batch: &[Line],
    rejected: &[(usize, String)],
    ctx: &WorkerCtx,
    names: &Names,
) {
    let stream = batch[0].stream;
    let path = ctx.deadletter_dir.join(format!("{name}.jsonl"));
    let mut out = Vec::new();
    for (i, reason) in rejected {
        let Some(l) = batch.get(*i) else { continue };
        let head = serde_json::json!({"sink": name, "stream": stream.name(), "sequence": l.seq, "reason": reason});
        let mut h = serde_json::to_vec(&head).unwrap_or_default();
        h.pop();
        out.extend_from_slice(&h);
        out.extend_from_slice(b",\"record\":");
        if serde_json::from_slice::<serde::de::IgnoredAny>(&l.bytes).is_ok() {
            out.extend_from_slice(&l.bytes);
        } else {
            out.extend_from_slice(
                serde_json::to_string(&String::from_utf8_lossy(&l.bytes))
                    .unwrap_or_default()
                    .as_bytes(),
            );
        }
        out.extend_from_slice(b"}\n");
    }
    let res = std::fs::create_dir_all(&ctx.deadletter_dir).and_then(|_| {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&path)?;
        f.write_all(&out)?;
        f.sync_data()
    });
    let n = rejected.len() as u64;
    ctx.stats.add_key(&names.dead[&stream], n);
    if let Err(e) = res {
        error!(
            "sink {name}: {n} rejected record(s) could not be written to {}: {e}",
            path.display()
        );
        let key = Metric::RecordsDropped.label("reason", "dead_letter_failed");
        ctx.stats.add_key(&key.label("sink", name), n);
    }
    let reason = rejected.first().map(|r| r.1.clone()).unwrap_or_default();
    // A receiver that refuses the notices of its own refusals must not make a loop of them.
    let only_notices = rejected.iter().all(|(i, _)| {
        batch.get(*i).is_some_and(|l| {
            l.bytes
                .windows(24)
                .any(|w| w == b"\"dataset\":\"sparbar.sink\"")
        })
    });
    if only_notices {
        return;
    }
    warn!(
        "sink {name}: {n} {} record(s) rejected for good ({reason}); kept in {}",
        stream.name(),
        path.display()
    );
    let _ = ctx.notices.send(Notice::DeadLettered {
        sink: name.to_string(),
        stream,
        records: n,
        reason,
    });
}
