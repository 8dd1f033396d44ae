//! Ships the audit trail: every record goes first into a durable spool on disk (one per stream),
//! sealed into that stream's hash chain, and from there to each configured sink by a worker of
//! its own that keeps its own acknowledged position. A slow or dead sink delays only itself;
//! nothing is deleted from the spool until every sink has it; what cannot be delivered is
//! dead-lettered with its reason, and what was never spooled is stated in a gap record.
//!
//! The data path: [`spool::Spool::append`] (agent thread) → segment files → [`deliver`] workers
//! (one thread per sink) → a [`Destination`] (file, stdout, syslog, Loki, Elasticsearch, OTLP).

pub mod chain;
pub mod deliver;
pub mod elastic;
pub mod file;
pub mod http;
pub mod loki;
pub mod otlp;
pub mod shipper;
pub mod sinks;
pub mod spool;
pub mod syslog;

use std::time::Duration;

/// Defined with the sink settings that name them; every part of shipping uses them.
pub use crate::config::{BatchLimits, Stream};

/// One spooled record as a destination sees it: the exact sealed JSON line (no newline), which
/// carries `event.id`, `event.sequence` and `sparbar.chain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub stream: Stream,
    pub seq: u64,
    pub bytes: Vec<u8>,
}

impl Line {
    /// The record parsed (destinations that re-encode it: Loki, OTLP, Elasticsearch).
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.bytes).ok()
    }
}

/// What a destination did with a batch it answered for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outcome {
    /// Indexes into the batch rejected for good, with the receiver's reason: these go to the
    /// dead-letter file and are not sent again.
    pub rejected: Vec<(usize, String)>,
    /// Indexes into the batch to send again later (a partial failure the receiver says is
    /// retryable). Everything not listed in `rejected` or `retry` was accepted.
    pub retry: Vec<usize>,
    /// Receiver asked to wait before the retry (`Retry-After`).
    pub retry_after: Option<Duration>,
}

impl Outcome {
    pub fn delivered() -> Outcome {
        Outcome::default()
    }
}

/// Why a destination could not be built from its sink's config (here, above the destinations
/// that return it and the factory in [`sinks`], so neither imports the other) (at start or on a reload, which
/// then keeps the old sinks); each text names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum SinkSetupError {
    /// A file sink's file (or its directory) cannot be opened now.
    #[error(transparent)]
    File { source: file::OpenError },
    /// The TLS material or server name of a syslog sink.
    #[error(transparent)]
    Syslog(#[from] syslog::SyslogError),
    /// The url, headers or TLS material of a Loki, Elasticsearch or OTLP sink.
    /// (Boxed: the rustls and ureq errors inside are large.) The sink's name is in
    /// [`ShipError::Sink`](super::shipper::ShipError::Sink) around it.
    #[error("{source}")]
    Http {
        name: String,
        source: Box<http::ClientError>,
    },
    #[error("the label \"stream\" is set by the agent; expected another name")]
    LokiStreamLabel { name: String },
    #[error("the index is empty")]
    EmptyIndex { name: String },
}

/// A batch that failed as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The receiver is unreachable or answered with a transient error (connection refused,
    /// timeout, 429, 5xx, a RELP error): send the same batch again after a backoff, or after
    /// `after` when the receiver said (`Retry-After`).
    #[error("{reason} (will retry)")]
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    /// The receiver refused the whole batch for good (400, 413 after splitting down to one
    /// record, 401/403 are NOT this: they are retried, an operator can fix credentials):
    /// every record goes to the dead-letter file with this reason.
    #[error("rejected: {reason}")]
    Reject { reason: String },
}

impl SendError {
    pub fn retry(reason: impl Into<String>) -> SendError {
        SendError::Retry {
            reason: reason.into(),
            after: None,
        }
    }
}

/// A place records are delivered to. Implementations block (each runs on its own worker
/// thread), must not panic on bad answers, and say precisely why a batch failed.
pub trait Destination: Send {
    /// The sink's configured name, for logs, counters and the position files.
    fn name(&self) -> &str;
    /// How batches for this destination are cut.
    fn limits(&self) -> BatchLimits {
        BatchLimits::default()
    }
    /// Delivers `batch` (all of one stream, in sequence order). `Ok` means the receiver answered
    /// for every record as the [`Outcome`] says; only then does the worker move past them.
    fn send(&mut self, batch: &[Line]) -> Result<Outcome, SendError>;
    /// Makes what was delivered durable at the destination where that means something (file
    /// fsync); called before the worker records its position as acknowledged... for
    /// destinations whose `send` already waits for the receiver's acknowledgement, a no-op.
    fn flush(&mut self) -> Result<(), SendError> {
        Ok(())
    }
}
