//! Turns the raw bytes of one ring-buffer record into a typed event. Pure: no kernel, no aya.
//!
//! Every record starts with `tracer_common::EventHeader`; its `kind` selects the layout and its
//! `len` says how many bytes carry meaning.

use bytes::Bytes;
use tracer_common::*;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than its header or its kind's layout")]
    Short(usize),
    #[error("unknown event kind {0}")]
    UnknownKind(u16),
    #[error("data event claims {claimed} payload bytes but carries {have}")]
    BadPayload { claimed: usize, have: usize },
}

impl DecodeError {
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Short(_) => "short_record",
            DecodeError::UnknownKind(_) => "unknown_kind",
            DecodeError::BadPayload { .. } => "bad_payload_length",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Data {
        hdr: EventHeader,
        conn: ConnId,
        pos: u64,
        msg_len: u32,
        dir: u8,
        src: u8,
        payload: Bytes,
    },
    Hole {
        hdr: EventHeader,
        conn: ConnId,
        pos: u64,
        len: u64,
        dir: u8,
        reason: u8,
    },
    ConnOpen {
        hdr: EventHeader,
        conn: ConnId,
        tuple: Tuple,
        origin: u8,
        tls: bool,
    },
    ConnClose {
        hdr: EventHeader,
        conn: ConnId,
        pos_in: u64,
        pos_out: u64,
    },
    ProcExec {
        hdr: EventHeader,
        tgid: u32,
        comm: [u8; COMM_LEN],
    },
    ProcExit {
        hdr: EventHeader,
        tgid: u32,
    },
    /// The kernel recognised the blocked token whose hash is `hash` in a request connection
    /// `conn` read; `hdr.flags` has `HIT_F_CONN_BLOCKED` if it blocked the connection itself.
    EnforceHit {
        hdr: EventHeader,
        conn: ConnId,
        hash: u64,
    },
}

impl Event {
    pub fn header(&self) -> &EventHeader {
        match self {
            Event::Data { hdr, .. }
            | Event::Hole { hdr, .. }
            | Event::ConnOpen { hdr, .. }
            | Event::ConnClose { hdr, .. }
            | Event::ProcExec { hdr, .. }
            | Event::ProcExit { hdr, .. }
            | Event::EnforceHit { hdr, .. } => hdr,
        }
    }
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_ne_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_ne_bytes(b[o..o + 4].try_into().unwrap_or_default())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_ne_bytes(b[o..o + 8].try_into().unwrap_or_default())
}

fn header(b: &[u8]) -> EventHeader {
    EventHeader {
        kind: u16_at(b, 0),
        flags: u16_at(b, 2),
        len: u32_at(b, 4),
        ts_ns: u64_at(b, 8),
        pid_tgid: u64_at(b, 16),
    }
}

fn conn(b: &[u8], o: usize) -> ConnId {
    ConnId {
        tgid: u32_at(b, o),
        fd: u32_at(b, o + 4),
        gen: u64_at(b, o + 8),
    }
}

fn need(b: &[u8], n: usize) -> Result<(), DecodeError> {
    if b.len() < n {
        Err(DecodeError::Short(b.len()))
    } else {
        Ok(())
    }
}

/// Decodes one ring-buffer record. Offsets follow the `#[repr(C)]` layouts in tracer-common,
/// whose sizes are pinned there.
pub fn decode(b: &[u8]) -> Result<Event, DecodeError> {
    need(b, size_of::<EventHeader>())?;
    let hdr = header(b);
    match hdr.kind {
        KIND_DATA => {
            need(b, DATA_HDR_LEN)?;
            let cap = u32_at(b, 52) as usize;
            let have = b.len().min(hdr.len as usize).saturating_sub(DATA_HDR_LEN);
            if cap > CHUNK_SIZE || cap > have {
                return Err(DecodeError::BadPayload { claimed: cap, have });
            }
            Ok(Event::Data {
                hdr,
                conn: conn(b, 24),
                pos: u64_at(b, 40),
                msg_len: u32_at(b, 48),
                dir: b[56],
                src: b[57],
                payload: Bytes::copy_from_slice(&b[DATA_HDR_LEN..DATA_HDR_LEN + cap]),
            })
        }
        KIND_HOLE => {
            need(b, size_of::<HoleEvent>())?;
            Ok(Event::Hole {
                hdr,
                conn: conn(b, 24),
                pos: u64_at(b, 40),
                len: u64_at(b, 48),
                dir: b[56],
                reason: b[57],
            })
        }
        KIND_CONN_OPEN => {
            need(b, size_of::<ConnOpenEvent>())?;
            let mut tuple = Tuple {
                family: u16_at(b, 40),
                local_port: u16_at(b, 42),
                peer_port: u16_at(b, 44),
                ..Tuple::default()
            };
            tuple.local_addr.copy_from_slice(&b[48..64]);
            tuple.peer_addr.copy_from_slice(&b[64..80]);
            Ok(Event::ConnOpen {
                hdr,
                conn: conn(b, 24),
                tuple,
                origin: b[80],
                tls: b[81] != 0,
            })
        }
        KIND_CONN_CLOSE => {
            need(b, size_of::<ConnCloseEvent>())?;
            Ok(Event::ConnClose {
                hdr,
                conn: conn(b, 24),
                pos_in: u64_at(b, 40),
                pos_out: u64_at(b, 48),
            })
        }
        KIND_PROC_EXEC | KIND_PROC_EXIT => {
            need(b, size_of::<ProcEvent>())?;
            let tgid = u32_at(b, 24);
            if hdr.kind == KIND_PROC_EXIT {
                return Ok(Event::ProcExit { hdr, tgid });
            }
            let mut comm = [0u8; COMM_LEN];
            comm.copy_from_slice(&b[32..48]);
            Ok(Event::ProcExec { hdr, tgid, comm })
        }
        KIND_ENFORCE_HIT => {
            need(b, size_of::<EnforceHitEvent>())?;
            Ok(Event::EnforceHit {
                hdr,
                conn: conn(b, 24),
                hash: u64_at(b, 40),
            })
        }
        k => Err(DecodeError::UnknownKind(k)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn as_bytes<T>(v: &T) -> &[u8] {
        // SAFETY: test-only view of a #[repr(C)] plain-data value.
        unsafe { std::slice::from_raw_parts(v as *const T as *const u8, size_of::<T>()) }
    }

    #[test]
    fn data_event_round_trip() {
        let mut ev = DataEvent {
            hdr: EventHeader {
                kind: KIND_DATA,
                flags: DATA_F_TLS,
                len: 0,
                ts_ns: 7,
                pid_tgid: (42 << 32) | 43,
            },
            conn: ConnId {
                tgid: 42,
                fd: 5,
                gen: 99,
            },
            pos: 1000,
            msg_len: 3,
            cap_len: 3,
            dir: DIR_OUT,
            src: SRC_TLS,
            _pad: [0; 6],
            data: [0; CHUNK_SIZE],
        };
        ev.data[..3].copy_from_slice(b"abc");
        ev.hdr.len = (DATA_HDR_LEN + 3) as u32;
        let raw = &as_bytes(&ev)[..DATA_HDR_LEN + 3];
        match decode(raw).unwrap() {
            Event::Data {
                hdr,
                conn,
                pos,
                msg_len,
                dir,
                src,
                payload,
            } => {
                assert_eq!(hdr.flags, DATA_F_TLS);
                assert_eq!(hdr.ts_ns, 7);
                assert_eq!(
                    conn,
                    ConnId {
                        tgid: 42,
                        fd: 5,
                        gen: 99
                    }
                );
                assert_eq!((pos, msg_len, dir, src), (1000, 3, DIR_OUT, SRC_TLS));
                assert_eq!(&payload[..], b"abc");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn conn_open_and_close() {
        let mut t = Tuple {
            family: AF_INET,
            local_port: 443,
            peer_port: 5555,
            ..Default::default()
        };
        t.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let ev = ConnOpenEvent {
            hdr: EventHeader {
                kind: KIND_CONN_OPEN,
                len: 88,
                ..Default::default()
            },
            conn: ConnId {
                tgid: 1,
                fd: 2,
                gen: 3,
            },
            tuple: t,
            origin: ORIGIN_ACCEPT,
            tls: 1,
            _pad: [0; 6],
        };
        assert_eq!(
            decode(as_bytes(&ev)).unwrap(),
            Event::ConnOpen {
                hdr: ev.hdr,
                conn: ev.conn,
                tuple: t,
                origin: ORIGIN_ACCEPT,
                tls: true
            }
        );
        let c = ConnCloseEvent {
            hdr: EventHeader {
                kind: KIND_CONN_CLOSE,
                len: 56,
                ..Default::default()
            },
            conn: ev.conn,
            pos_in: 10,
            pos_out: 20,
        };
        assert_eq!(
            decode(as_bytes(&c)).unwrap(),
            Event::ConnClose {
                hdr: c.hdr,
                conn: ev.conn,
                pos_in: 10,
                pos_out: 20
            }
        );
    }

    #[test]
    fn enforce_hit() {
        let ev = EnforceHitEvent {
            hdr: EventHeader {
                kind: KIND_ENFORCE_HIT,
                flags: HIT_F_CONN_BLOCKED | HIT_F_TLS,
                len: 48,
                ts_ns: 11,
                pid_tgid: (7 << 32) | 8,
            },
            conn: ConnId {
                tgid: 7,
                fd: 12,
                gen: 0x0102_0304_0506_0708,
            },
            hash: token_hash(0xfeed, b"blocked-cookie"),
        };
        let got = decode(as_bytes(&ev)).unwrap();
        assert_eq!(
            got,
            Event::EnforceHit {
                hdr: ev.hdr,
                conn: ev.conn,
                hash: token_hash(0xfeed, b"blocked-cookie"),
            }
        );
        assert_eq!(got.header().flags, HIT_F_CONN_BLOCKED | HIT_F_TLS);
        // Cut anywhere: an error, never a partial event.
        for n in 0..size_of::<EnforceHitEvent>() {
            assert_eq!(decode(&as_bytes(&ev)[..n]), Err(DecodeError::Short(n)));
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert_eq!(decode(&[1, 2, 3]), Err(DecodeError::Short(3)));
        let mut b = vec![0u8; 64];
        b[0] = 200;
        assert_eq!(decode(&b), Err(DecodeError::UnknownKind(200)));
        b[0] = KIND_DATA as u8;
        b[52] = 0xff;
        b[53] = 0xff;
        assert!(matches!(decode(&b), Err(DecodeError::BadPayload { .. })));
        for n in 0..200 {
            let v: Vec<u8> = (0..n).map(|i| (i * 37 % 251) as u8).collect();
            let _ = decode(&v);
        }
    }
}
