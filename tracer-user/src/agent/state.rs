//! What the agent keeps between runs and hands to the world: the audit trail (the shipper),
//! the decisions file and feed, the detector windows, all in the state directory. `Outputs` is
//! the commit's trail.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use log::{info, warn};

use super::commit::Trail;
use crate::{
    detect::decide::Decisions,
    ops::feed::Feed,
    pipeline::Pipeline,
    ship::shipper::Shipper,
    stats::{Metric, Stats},
};

/// File names in the state directory.
pub const DECISIONS_FILE: &str = "decisions.json";
pub const DETECTOR_FILE: &str = "detector.json";
/// The test clock's offset (ms), kept across restarts (only with `run --test-clock`).
pub const TEST_CLOCK_FILE: &str = "test-clock";

/// Writes `bytes` to `dir/name` atomically, mode 0600.
fn save_private(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    crate::statefile::write_private(&dir.join(name), bytes)
}

/// The trail the commit writes to: the spools and sinks, and the decisions file that is also
/// the feed for a cooperating enforcement point (a reverse proxy).
pub struct Outputs {
    pub shipper: Shipper,
    pub feed: Feed,
    state_dir: PathBuf,
    stats: Arc<Stats>,
    /// Decisions whose save failed, retried at the next commit.
    unsaved: Option<Decisions>,
}

impl Outputs {
    pub fn new(shipper: Shipper, state_dir: PathBuf, stats: Arc<Stats>) -> Outputs {
        Outputs {
            shipper,
            feed: Feed::default().counting(stats.clone()),
            state_dir,
            stats,
            unsaved: None,
        }
    }
}

impl Trail for Outputs {
    fn write(&mut self, access: &mut Vec<Vec<u8>>, security: &mut Vec<Vec<u8>>) {
        self.shipper.write(access, security);
    }

    fn decisions(&mut self, changed: Option<Decisions>) {
        let Some(d) = changed.or_else(|| self.unsaved.take()) else {
            return;
        };
        self.feed.publish(&d.active);
        let bytes = serde_json::to_vec_pretty(&d).unwrap_or_default();
        if let Err(e) = save_private(&self.state_dir, DECISIONS_FILE, &bytes) {
            self.stats
                .add_reason(Metric::StateSaveErrors, "decisions", 1);
            warn!(
                "saving {}: {e}",
                self.state_dir.join(DECISIONS_FILE).display()
            );
            self.unsaved = Some(d);
        }
    }
}

/// Decisions and detector windows saved by an earlier run go back into the pipeline; a file
/// that cannot be read is said and counted, and that part starts empty.
pub fn restore_detection(p: &mut Pipeline, dir: &Path, stats: &Stats) {
    match std::fs::read(dir.join(DECISIONS_FILE)) {
        Ok(b) => match serde_json::from_slice::<Decisions>(&b) {
            Ok(d) => {
                info!(
                    "restored {} active decisions from {}",
                    d.active.len(),
                    dir.join(DECISIONS_FILE).display()
                );
                p.restore_decisions(d);
            }
            Err(e) => {
                warn!(
                    "{}: cannot be read ({e}); starting with no decisions",
                    dir.join(DECISIONS_FILE).display()
                );
                stats.add_reason(Metric::StateFilesRejected, "decisions", 1);
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!("{}: {e}", dir.join(DECISIONS_FILE).display()),
    }
    match std::fs::read(dir.join(DETECTOR_FILE)) {
        Ok(b) => match p.restore_detector(&b) {
            Ok(r) => {
                info!("restored detector state of {} keys", r.keys);
                if r.sketches_reset > 0 {
                    warn!(
                        "{}: {} distinct-count sketches were made with another key (or none) and start over",
                        dir.join(DETECTOR_FILE).display(),
                        r.sketches_reset
                    );
                    stats.add_reason(Metric::StateFilesRejected, "detector_sketches", 1);
                }
            }
            Err(e) => {
                warn!(
                    "{}: cannot be read ({e}); detectors start empty",
                    dir.join(DETECTOR_FILE).display()
                );
                stats.add_reason(Metric::StateFilesRejected, "detector", 1);
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!("{}: {e}", dir.join(DETECTOR_FILE).display()),
    }
}

pub fn save_detector(p: &Pipeline, dir: &Path, stats: &Stats) {
    if p.detector().rules().is_empty() {
        return;
    }
    stats.set(Metric::DetectorKeysTracked, p.detector().tracked() as u64);
    if let Err(e) = save_private(dir, DETECTOR_FILE, &p.detector().to_json()) {
        stats.add_reason(Metric::StateSaveErrors, "detector", 1);
        warn!("saving {}: {e}", dir.join(DETECTOR_FILE).display());
    }
}
