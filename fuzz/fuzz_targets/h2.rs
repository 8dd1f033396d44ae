//! One HTTP/2 connection's bytes through reassembly, the frame reader, HPACK and the streams,
//! cut into pieces of both directions, with holes and out-of-order pieces, as the capture
//! delivers them. The client's preface is sent first; the rest is the input's.
//!
//! Input: a first byte choosing the role (the client is inbound for a server), then
//! pieces: a control byte (bit 0: direction; bit 1: a hole instead of data; bit 2: send this
//! piece before the previous one; bits 3-7: length / 8), a length byte, then that many bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sparbar::http::{ConnParser, Dir, ParserLimits, Role};

fn idx(d: Dir) -> usize {
    match d {
        Dir::Inbound => 0,
        Dir::Outbound => 1,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, mut rest)) = data.split_first() else {
        return;
    };
    let role = if first & 1 == 0 { Role::Server } else { Role::Client };
    let midstream = false;
    let limits = ParserLimits {
        body_keep_bytes: 4096,
        ..ParserLimits::default()
    };
    let mut p = ConnParser::new(role, midstream, limits);
    let mut pos = [0u64; 2];
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let client = if role == Role::Server { Dir::Inbound } else { Dir::Outbound };
    p.data(client, 0, 1, PREFACE);
    pos[idx(client)] = PREFACE.len() as u64;
    let mut held: Option<(Dir, u64, Vec<u8>)> = None;
    let mut ts = 1_000u64;
    let mut exchanges = 0usize;
    while rest.len() >= 2 {
        let ctl = rest[0];
        let len = (usize::from(rest[1]) | (usize::from(ctl >> 3) << 8)).min(rest.len() - 2);
        let bytes = &rest[2..2 + len];
        rest = &rest[2 + len..];
        let dir = if ctl & 1 == 0 { Dir::Inbound } else { Dir::Outbound };
        let at = pos[idx(dir)];
        pos[idx(dir)] += len as u64;
        ts += 1_000;
        if ctl & 2 != 0 {
            p.hole(dir, at, len as u64, ts);
        } else if ctl & 4 != 0 && held.is_none() {
            held = Some((dir, at, bytes.to_vec()));
            continue;
        } else {
            p.data(dir, at, ts, bytes);
        }
        if let Some((d, a, b)) = held.take() {
            p.data(d, a, ts, &b);
        }
        exchanges += p.take_exchanges().len();
        let _ = p.take_anomalies();
    }
    if let Some((d, a, b)) = held.take() {
        p.data(d, a, ts, &b);
    }
    p.close_at(ts + 1, pos[0], pos[1]);
    exchanges += p.take_exchanges().len();
    let _ = p.take_anomalies();
    // Each exchange needs at least one byte of a request or a response.
    assert!(exchanges as u64 <= pos[0] + pos[1]);
});
