//! Collecting one message's body: its length on the wire, the bytes kept (bounded), holes, and
//! gzip/deflate/br decoding that can neither panic nor grow without bound.

use std::io::Write;

use bytes::Bytes;
use flate2::write::{DeflateDecoder, GzDecoder, ZlibDecoder};

use crate::exchange::{Body, BodyLoss};

use super::framing::Encoding;
use super::types::{BodyBudget, ParserLimits};

/// Compressed input kept to retry a `deflate` body as raw deflate when it is not zlib-wrapped.
const ZLIB_REPLAY_MAX: usize = 16 * 1024;
/// Compressed input fed to a decoder at once (bounds the output per step).
const DECODE_SLICE: usize = 16 * 1024;

/// Decoder output, kept up to `cap` bytes and as far as the global budget allows.
#[derive(Debug)]
struct Sink {
    data: Vec<u8>,
    cap: usize,
    overflow: bool,
    budget: BodyBudget,
    /// Bytes of `data` taken from the budget (given back on drop unless moved on).
    charged: u64,
    over_budget: bool,
}

impl Sink {
    fn new(cap: usize, budget: BodyBudget) -> Self {
        Sink {
            data: Vec::new(),
            cap,
            overflow: false,
            budget,
            charged: 0,
            over_budget: false,
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.budget.give_back(self.charged);
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = self.cap.saturating_sub(self.data.len());
        if buf.len() > room {
            self.overflow = true;
        }
        let mut n = buf.len().min(room);
        if n > 0 && !self.budget.take(n as u64) {
            self.overflow = true;
            self.over_budget = true;
            n = 0;
        }
        self.charged += n as u64;
        self.data.extend_from_slice(&buf[..n]);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

enum Decoder {
    Gzip(GzDecoder<Sink>),
    /// `deflate` as it should be (zlib-wrapped); `replay` keeps the first input to retry as raw
    /// deflate if the zlib header is refused.
    Zlib {
        dec: ZlibDecoder<Sink>,
        replay: Option<Vec<u8>>,
    },
    Raw(DeflateDecoder<Sink>),
    /// `br` (browsers ask for it, and servers may send it).
    Brotli(Box<brotli_decompressor::DecompressorWriter<Sink>>),
}

impl Decoder {
    fn new(enc: Encoding, cap: usize, budget: BodyBudget) -> Self {
        let sink = Sink::new(cap, budget);
        match enc {
            Encoding::Gzip => Decoder::Gzip(GzDecoder::new(sink)),
            Encoding::Deflate => Decoder::Zlib {
                dec: ZlibDecoder::new(sink),
                replay: Some(Vec::new()),
            },
            Encoding::Brotli => Decoder::Brotli(Box::new(
                brotli_decompressor::DecompressorWriter::new(sink, 4096),
            )),
        }
    }

    fn sink(&mut self) -> &mut Sink {
        match self {
            Decoder::Gzip(d) => d.get_mut(),
            Decoder::Zlib { dec, .. } => dec.get_mut(),
            Decoder::Raw(d) => d.get_mut(),
            Decoder::Brotli(d) => d.get_mut(),
        }
    }

    fn write(&mut self, input: &[u8]) -> std::io::Result<usize> {
        match self {
            Decoder::Gzip(d) => d.write(input),
            Decoder::Zlib { dec, .. } => dec.write(input),
            Decoder::Raw(d) => d.write(input),
            Decoder::Brotli(d) => d.write(input),
        }
    }

    /// Feed compressed input. `Err` on a decoding error. Stops early once the sink overflowed.
    fn feed(&mut self, input: &[u8]) -> Result<(), ()> {
        if let Decoder::Zlib { replay, .. } = self {
            if let Some(r) = replay {
                if r.len() + input.len() <= ZLIB_REPLAY_MAX {
                    r.extend_from_slice(input);
                } else {
                    *replay = None;
                }
            }
        }
        let mut rest = input;
        while !rest.is_empty() {
            match self.write(rest) {
                Ok(0) => return Ok(()), // stream ended; trailing bytes are ignored
                Ok(n) => rest = &rest[n..],
                Err(_) => return self.fallback_to_raw(),
            }
            if self.sink().overflow {
                return Ok(());
            }
        }
        Ok(())
    }

    /// A `deflate` body that is not zlib-wrapped: retry from the start as raw deflate.
    fn fallback_to_raw(&mut self) -> Result<(), ()> {
        let Decoder::Zlib { dec, replay } = self else {
            return Err(());
        };
        let (Some(input), true) = (replay.take(), dec.get_ref().data.is_empty()) else {
            return Err(());
        };
        let cap = dec.get_ref().cap;
        let budget = dec.get_ref().budget.clone();
        *self = Decoder::Raw(DeflateDecoder::new(Sink::new(cap, budget)));
        self.feed(&input)
    }

    /// Everything decoded so far (after flushing the decoder's buffer), with the budget bytes
    /// it holds (the caller takes them over).
    fn take_output(&mut self) -> Output {
        let _ = match self {
            Decoder::Gzip(d) => d.flush(),
            Decoder::Zlib { dec, .. } => dec.flush(),
            Decoder::Raw(d) => d.flush(),
            Decoder::Brotli(d) => d.flush(),
        };
        let s = self.sink();
        Output {
            data: std::mem::take(&mut s.data),
            overflow: s.overflow,
            charged: std::mem::take(&mut s.charged),
            over_budget: s.over_budget,
        }
    }

    /// Finish a complete stream: `Err` if it is truncated or corrupt.
    fn finish(&mut self) -> Result<(), ()> {
        let r = match self {
            Decoder::Gzip(d) => d.try_finish(),
            Decoder::Zlib { dec, .. } => dec.try_finish(),
            Decoder::Raw(d) => d.try_finish(),
            Decoder::Brotli(d) => d.close(),
        };
        r.map_err(|_| ())
    }
}

struct Output {
    data: Vec<u8>,
    overflow: bool,
    charged: u64,
    over_budget: bool,
}

/// The bytes of a finished body, holding their share of the budget until the last `Bytes`
/// that points at them is dropped.
struct Charged {
    data: Vec<u8>,
    budget: BodyBudget,
    n: u64,
}

impl AsRef<[u8]> for Charged {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Charged {
    fn drop(&mut self) {
        self.budget.give_back(self.n);
    }
}

/// A finished body and what went wrong while reading it.
pub(super) struct Finished {
    pub(super) body: Body,
    pub(super) decode_error: bool,
    /// Cut because the global body budget was reached.
    pub(super) over_budget: bool,
}

fn loss_rank(l: BodyLoss) -> u8 {
    match l {
        BodyLoss::KeptLimit => 1,
        BodyLoss::DecodeError => 2,
        BodyLoss::NotCaptured => 3,
        BodyLoss::Incomplete => 4,
    }
}

pub(super) struct BodyAcc {
    wire_len: u64,
    /// Identity bytes, or the decoder's output once decoding stopped.
    keep: Vec<u8>,
    keep_cap: usize,
    loss: Option<BodyLoss>,
    encoding: Option<Encoding>,
    decoder: Option<Decoder>,
    decode_cap: usize,
    /// Nothing more is added to `keep` (after a hole, a decoding stop, or the keep limit).
    stopped: bool,
    decoded_from: Option<String>,
    decode_error: bool,
    budget: BodyBudget,
    /// Bytes of `keep` taken from the budget.
    charged: u64,
    over_budget: bool,
}

impl Drop for BodyAcc {
    fn drop(&mut self) {
        self.budget.give_back(self.charged);
    }
}

impl BodyAcc {
    pub(super) fn new(
        limits: &ParserLimits,
        encoding: Option<Encoding>,
        expect: Option<u64>,
    ) -> Self {
        let reserve = expect.unwrap_or(0).min(64 * 1024) as usize;
        BodyAcc {
            wire_len: 0,
            keep: Vec::with_capacity(if encoding.is_none() {
                reserve.min(limits.body_keep_bytes)
            } else {
                0
            }),
            keep_cap: limits.body_keep_bytes,
            loss: None,
            encoding,
            decoder: None,
            decode_cap: limits.body_keep_bytes.min(limits.max_decoded_bytes),
            stopped: false,
            decoded_from: None,
            decode_error: false,
            budget: limits.body_budget.clone(),
            charged: 0,
            over_budget: false,
        }
    }

    /// Takes over what the decoder decoded: its bytes become `keep`, its budget share ours.
    fn adopt(&mut self, out: Output) {
        if out.overflow {
            self.set_loss(BodyLoss::KeptLimit);
        }
        self.over_budget |= out.over_budget;
        self.budget.give_back(std::mem::take(&mut self.charged));
        self.keep = out.data;
        self.charged = out.charged;
    }

    fn set_loss(&mut self, l: BodyLoss) {
        if self.loss.is_none_or(|old| loss_rank(l) > loss_rank(old)) {
            self.loss = Some(l);
        }
    }

    pub(super) fn push(&mut self, data: &[u8]) {
        self.wire_len += data.len() as u64;
        if self.stopped || data.is_empty() {
            return;
        }
        if let Some(enc) = self.encoding {
            if self.decoder.is_none() && self.wire_len == data.len() as u64 {
                self.decoder = Some(Decoder::new(enc, self.decode_cap, self.budget.clone()));
                self.decoded_from = Some(enc.name().to_string());
            }
            let Some(dec) = self.decoder.as_mut() else {
                return;
            };
            let mut failed = false;
            for slice in data.chunks(DECODE_SLICE) {
                if dec.feed(slice).is_err() {
                    failed = true;
                    break;
                }
                if dec.sink().overflow {
                    break;
                }
            }
            let overflow = dec.sink().overflow;
            if failed {
                self.decode_error = true;
                self.set_loss(BodyLoss::DecodeError);
                self.stop_decoding();
            } else if overflow {
                self.set_loss(BodyLoss::KeptLimit);
                self.stop_decoding();
            }
            return;
        }
        let room = self.keep_cap.saturating_sub(self.keep.len());
        if data.len() > room {
            self.set_loss(BodyLoss::KeptLimit);
            self.stopped = true;
        }
        let n = data.len().min(room);
        if n > 0 && !self.budget.take(n as u64) {
            self.set_loss(BodyLoss::KeptLimit);
            self.over_budget = true;
            self.stopped = true;
            return;
        }
        self.charged += n as u64;
        self.keep.extend_from_slice(&data[..n]);
    }

    fn stop_decoding(&mut self) {
        if let Some(mut dec) = self.decoder.take() {
            let out = dec.take_output();
            self.adopt(out);
        }
        self.stopped = true;
    }

    pub(super) fn hole(&mut self, len: u64) {
        self.wire_len += len;
        self.set_loss(BodyLoss::NotCaptured);
        if self.decoder.is_some() {
            self.stop_decoding();
        }
        // Bytes after a hole are not appended: `data` stays a prefix of the body.
        self.stopped = true;
    }

    /// Finish the body; `complete`: its framing ended normally.
    pub(super) fn finish(mut self, complete: bool) -> Finished {
        if let Some(mut dec) = self.decoder.take() {
            if complete && dec.finish().is_err() {
                self.decode_error = true;
                self.set_loss(BodyLoss::DecodeError);
            }
            let out = dec.take_output();
            self.adopt(out);
        }
        if !complete {
            self.set_loss(BodyLoss::Incomplete);
        }
        let keep = std::mem::take(&mut self.keep);
        let data = match std::mem::take(&mut self.charged) {
            0 => Bytes::from(keep),
            n => Bytes::from_owner(Charged {
                data: keep,
                budget: self.budget.clone(),
                n,
            }),
        };
        Finished {
            body: Body {
                wire_len: self.wire_len,
                data,
                loss: self.loss,
                decoded_from: self.decoded_from.take(),
            },
            decode_error: self.decode_error,
            over_budget: self.over_budget,
        }
    }
}
