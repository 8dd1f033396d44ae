//! The `[capture]` table: how much the kernel side buffers and copies (ring buffer, bytes per
//! call), and how much the agent keeps in memory (queue, body bytes, connections).

use serde::Deserialize;

use super::{
    errors::Problems,
    values::{check_count, check_size, SizeValue},
};

pub const DEFAULT_RING_BUFFER_SIZE: u32 = 16 << 20;
pub const DEFAULT_MAX_MESSAGE_BYTES: u32 = 256 << 10;
pub const DEFAULT_QUEUE_CAPACITY: usize = 65536;
pub const DEFAULT_BODY_KEEP_BYTES: usize = 1 << 20;
pub const DEFAULT_MAX_CONNECTIONS: u32 = 65536;
/// 64 bodies at the default `body_keep_bytes`.
pub const DEFAULT_BODY_BUDGET_BYTES: u64 = 64 << 20;

const MIN_RING_BUFFER_SIZE: u64 = 64 << 10;
const MAX_RING_BUFFER_SIZE: u64 = 1 << 30;
const MIN_MAX_MESSAGE_BYTES: u64 = 16 << 10;
const MAX_MAX_MESSAGE_BYTES: u64 = 16 << 20;
const MAX_QUEUE_CAPACITY: i64 = 1 << 24;
const MAX_BODY_KEEP_BYTES: u64 = 64 << 20;
const MAX_MAX_CONNECTIONS: i64 = 1 << 20;
const MAX_BODY_BUDGET_BYTES: u64 = 16 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Bytes; a power of two in 64 KiB ..= 1 GiB.
    pub ring_buffer_size: u32,
    /// Bytes captured per read/write call; 16 KiB ..= 16 MiB.
    pub max_message_bytes: u32,
    /// Events buffered between the ring-buffer reader and the pipeline; 1 ..= 2^24.
    pub queue_capacity: usize,
    /// Decoded body bytes kept per message; 0 ..= 64 MiB.
    pub body_keep_bytes: usize,
    /// Tracked connections; 1 ..= 2^20.
    pub max_connections: u32,
    /// Body bytes held in memory across all connections at once; 0 ..= 16 GiB.
    pub body_budget_bytes: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCapture {
    ring_buffer_size: Option<SizeValue>,
    max_message_bytes: Option<SizeValue>,
    queue_capacity: Option<i64>,
    body_keep_bytes: Option<SizeValue>,
    max_connections: Option<i64>,
    body_budget_bytes: Option<SizeValue>,
}

pub(super) fn check_capture(raw: RawCapture, p: &mut Problems) -> CaptureConfig {
    let ring = check_size(
        p,
        "capture.ring_buffer_size",
        raw.ring_buffer_size,
        DEFAULT_RING_BUFFER_SIZE.into(),
        MIN_RING_BUFFER_SIZE,
        MAX_RING_BUFFER_SIZE,
        true,
    );
    let msg = check_size(
        p,
        "capture.max_message_bytes",
        raw.max_message_bytes,
        DEFAULT_MAX_MESSAGE_BYTES.into(),
        MIN_MAX_MESSAGE_BYTES,
        MAX_MAX_MESSAGE_BYTES,
        false,
    );
    let keep = check_size(
        p,
        "capture.body_keep_bytes",
        raw.body_keep_bytes,
        DEFAULT_BODY_KEEP_BYTES as u64,
        0,
        MAX_BODY_KEEP_BYTES,
        false,
    );
    let budget = check_size(
        p,
        "capture.body_budget_bytes",
        raw.body_budget_bytes,
        DEFAULT_BODY_BUDGET_BYTES,
        0,
        MAX_BODY_BUDGET_BYTES,
        false,
    );
    let queue = check_count(
        p,
        "capture.queue_capacity",
        raw.queue_capacity,
        DEFAULT_QUEUE_CAPACITY as i64,
        MAX_QUEUE_CAPACITY,
    );
    let conns = check_count(
        p,
        "capture.max_connections",
        raw.max_connections,
        DEFAULT_MAX_CONNECTIONS.into(),
        MAX_MAX_CONNECTIONS,
    );
    // All bounds above are far below u32::MAX / usize::MAX, so these conversions are exact.
    CaptureConfig {
        ring_buffer_size: u32::try_from(ring).unwrap_or(DEFAULT_RING_BUFFER_SIZE),
        max_message_bytes: u32::try_from(msg).unwrap_or(DEFAULT_MAX_MESSAGE_BYTES),
        queue_capacity: usize::try_from(queue).unwrap_or(DEFAULT_QUEUE_CAPACITY),
        body_keep_bytes: usize::try_from(keep).unwrap_or(DEFAULT_BODY_KEEP_BYTES),
        max_connections: u32::try_from(conns).unwrap_or(DEFAULT_MAX_CONNECTIONS),
        body_budget_bytes: budget,
    }
}
