//! Everything unexpected the HTTP/1.1 parser can meet on a connection, one variant each, with
//! the stable name its counter carries.

use super::leniency::Oddity;
use super::types::Dir;

/// Something unexpected on a connection. Each is counted by [`Anomaly::reason`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Anomaly {
    MalformedRequestLine {
        dir: Dir,
        pos: u64,
    },
    MalformedStatusLine {
        dir: Dir,
        pos: u64,
    },
    MalformedHeaders {
        dir: Dir,
        pos: u64,
    },
    HeaderTooLarge {
        dir: Dir,
        pos: u64,
    },
    BadContentLength {
        dir: Dir,
        pos: u64,
    },
    BadTransferEncoding {
        dir: Dir,
        pos: u64,
    },
    ContentLengthWithChunked {
        dir: Dir,
        pos: u64,
    },
    BadChunkSize {
        dir: Dir,
        pos: u64,
    },
    BadChunkTerminator {
        dir: Dir,
        pos: u64,
    },
    GapResync {
        dir: Dir,
        pos: u64,
        len: u64,
        known: bool,
    },
    GapInBody {
        dir: Dir,
        pos: u64,
        len: u64,
    },
    TruncatedAtClose {
        dir: Dir,
    },
    ResponseLost,
    PairingUncertain,
    UnpairedResponse {
        status: u16,
    },
    ResponseWithoutRequest {
        status: u16,
    },
    PipelineOverflow,
    FramingGuessWrong,
    /// Something of HTTP/2 framing, HPACK or streams (`h2_*`), or of a message in a stream.
    Http2 {
        dir: Dir,
        reason: &'static str,
    },

    TlsRecordOnPlaintext {
        dir: Dir,
    },
    GzipError {
        dir: Dir,
    },
    DeflateError {
        dir: Dir,
    },
    DataAfterClose {
        dir: Dir,
    },
    /// A request form the guarded servers disagree on or refuse (see `leniency`).
    Lenient {
        dir: Dir,
        pos: u64,
        what: Oddity,
    },
    /// A request with Transfer-Encoding and Content-Length, or either of them twice: the
    /// request-smuggling family. The edge answers and closes; the rest is taken as body.
    ConflictingFraming {
        dir: Dir,
        pos: u64,
    },
    /// A chunked request with a trailer section (kept apart, never read as headers).
    RequestTrailers {
        dir: Dir,
        pos: u64,
    },
    /// A body was cut because the bodies held in flight reached the global memory budget.
    BodyOverBudget {
        dir: Dir,
    },
    /// The connection closed in the middle of a request head: the server answered (or gave up
    /// on) a request it had not read whole, e.g. a header line over nginx's 8 KiB buffer
    /// (400). Recorded with the lines read.
    RequestHeadCut {
        dir: Dir,
        pos: u64,
    },
}

impl Anomaly {
    /// Stable snake_case name for counters.
    pub fn reason(&self) -> &'static str {
        match self {
            Anomaly::MalformedRequestLine { .. } => "malformed_request_line",
            Anomaly::MalformedStatusLine { .. } => "malformed_status_line",
            Anomaly::MalformedHeaders { .. } => "malformed_headers",
            Anomaly::HeaderTooLarge { .. } => "header_too_large",
            Anomaly::BadContentLength { .. } => "bad_content_length",
            Anomaly::BadTransferEncoding { .. } => "bad_transfer_encoding",
            Anomaly::ContentLengthWithChunked { .. } => "content_length_with_chunked",
            Anomaly::BadChunkSize { .. } => "bad_chunk_size",
            Anomaly::BadChunkTerminator { .. } => "bad_chunk_terminator",
            Anomaly::GapResync { .. } => "gap_resync",
            Anomaly::GapInBody { .. } => "gap_in_body",
            Anomaly::TruncatedAtClose { .. } => "truncated_at_close",
            Anomaly::ResponseLost => "response_lost",
            Anomaly::PairingUncertain => "pairing_uncertain",
            Anomaly::UnpairedResponse { .. } => "unpaired_response",
            Anomaly::ResponseWithoutRequest { .. } => "response_without_request",
            Anomaly::PipelineOverflow => "pipeline_overflow",
            Anomaly::FramingGuessWrong => "framing_guess_wrong",
            Anomaly::Http2 { reason, .. } => reason,
            Anomaly::TlsRecordOnPlaintext { .. } => "tls_record_on_plaintext",
            Anomaly::GzipError { .. } => "gzip_error",
            Anomaly::DeflateError { .. } => "deflate_error",
            Anomaly::DataAfterClose { .. } => "data_after_close",
            Anomaly::Lenient { what, .. } => what.reason(),
            Anomaly::ConflictingFraming { .. } => "conflicting_framing",
            Anomaly::RequestTrailers { .. } => "request_trailers",
            Anomaly::BodyOverBudget { .. } => "body_over_budget",
            Anomaly::RequestHeadCut { .. } => "request_head_cut",
        }
    }
}
