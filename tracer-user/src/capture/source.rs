//! The ring-buffer reader: wakes on the ring buffer's fd (tokio AsyncFd), decodes every record
//! and hands batches to the pipeline through a bounded queue. When the queue is full the reader
//! waits, the ring buffer fills, and the kernel counts what it could not write: nothing is
//! dropped here without a count.

use std::sync::Arc;

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, watch},
};

use crate::{
    capture::decode::decode,
    capture::decode::Event,
    stats::{Metric, Stats},
};

/// Events per batch sent to the pipeline.
const BATCH: usize = 512;

/// Where raw ring-buffer records are also copied, for replay fixtures: each record as a
/// little-endian u32 length followed by its bytes.
pub type Tap = Option<std::io::BufWriter<std::fs::File>>;

pub async fn read_loop(
    ring: RingBuf<MapData>,
    tx: mpsc::Sender<Vec<Event>>,
    stats: Arc<Stats>,
    mut stop: watch::Receiver<bool>,
    mut tap: Tap,
) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its map fd and keeps it open, unchanged, for as long as it
    // lives, which is as long as this AsyncFd.
    let mut afd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut poll = tokio::time::interval(std::time::Duration::from_millis(
        tracer_common::POLL_INTERVAL_MS,
    ));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // The kernel wakes us only when the ring buffer fills up; otherwise we poll.
            _ = poll.tick() => {
                if !drain(afd.get_mut(), &tx, &stats, &mut tap).await {
                    return Ok(());
                }
            }
            guard = afd.readable_mut() => {
                let mut guard = guard?;
                if !drain(guard.get_inner_mut(), &tx, &stats, &mut tap).await {
                    return Ok(());
                }
                guard.clear_ready();
            }
            _ = stop.changed() => {
                // Final drain: what the kernel wrote before the stop is still delivered.
                drain(afd.get_mut(), &tx, &stats, &mut tap).await;
                if let Some(mut w) = tap {
                    use std::io::Write as _;
                    w.flush()?;
                }
                return Ok(());
            }
        }
    }
}

/// Reads everything available; false when the pipeline is gone.
async fn drain(
    ring: &mut RingBuf<MapData>,
    tx: &mpsc::Sender<Vec<Event>>,
    stats: &Stats,
    tap: &mut Tap,
) -> bool {
    loop {
        let mut batch = Vec::with_capacity(BATCH);
        let mut read = 0u64;
        while batch.len() < BATCH {
            let Some(item) = ring.next() else { break };
            read += 1;
            if let Some(w) = tap.as_mut() {
                use std::io::Write as _;
                let ok = w
                    .write_all(&(item.len() as u32).to_le_bytes())
                    .and_then(|_| w.write_all(&item));
                if let Err(e) = ok {
                    log::warn!("event tap: {e}; tapping stopped");
                    *tap = None;
                }
            }
            match decode(&item) {
                Ok(ev) => batch.push(ev),
                Err(e) => stats.add_reason(Metric::EventsDropped, e.reason(), 1),
            }
        }
        if read > 0 {
            stats.add(Metric::RingbufRecordsRead, read);
        }
        if batch.is_empty() {
            return true;
        }
        let full = batch.len() == BATCH;
        if tx.send(batch).await.is_err() {
            return false;
        }
        if !full {
            return true;
        }
    }
}
