//! RELP (<https://www.rsyslog.com/doc/relp.html>, as librelp speaks it): the session (TXNRs, a
//! window of frames in flight, the answers matched to them), the frames, and a parser that
//! takes the server's byte stream however it is cut.

use std::{
    collections::VecDeque,
    io::{self, Read, Write},
    time::Duration,
};

use super::conn::{io_text, Conn, MAX_ANSWER};

/// RELP frames sent before their answers are awaited (librelp's default window is also 128).
pub const RELP_WINDOW: usize = 128;

/// The offers of our `open` (librelp's format: `name=value[,value]` lines, no final LF).
pub(super) const RELP_OFFERS: &[u8] = b"relp_version=0\nrelp_software=sparbar\ncommands=syslog";

/// TXNR has at most 9 digits. librelp's wrap-around after 999999999 produces a 10-digit number
/// its own parser refuses, so a session close to the end is reopened (a new session starts at 1).
pub(super) const TXNR_MAX: u32 = 999_999_999;

/// What went wrong in a RELP session: the server's bytes, its answers, or the connection.
#[derive(Debug, thiserror::Error)]
pub enum RelpError {
    #[error("the server closed the connection")]
    Closed,
    #[error("no answer from the server within {timeout:?}")]
    NoAnswer { timeout: Duration },
    #[error("reading the server's answers: {source}")]
    Read { source: io::Error },
    #[error("sending: {}", io_text(.source, *.timeout))]
    Send {
        source: io::Error,
        /// The socket's timeout, which the text names when it ran out.
        timeout: Duration,
    },
    #[error("the server answered txnr {txnr}, which is not in flight")]
    NotInFlight { txnr: u32 },
    #[error("the server is closing the session (serverclose)")]
    ServerClose,
    #[error("the server sent an unexpected {command:?} frame (txnr {txnr})")]
    Unexpected { command: String, txnr: u32 },
    /// `found` is the byte at `at`, `None` at the end of the input.
    #[error(
        "malformed RELP frame from the server: {what} at byte {at} (found {})",
        .found.map_or("the end".into(), |c| format!("{:?}", c as char))
    )]
    Malformed {
        what: &'static str,
        at: usize,
        found: Option<u8>,
    },
    #[error(
        "malformed RELP frame from the server: DATALEN {len} is more than the {MAX_ANSWER} bytes an answer may have"
    )]
    TooLong { len: usize },
    /// `got` is the answer's first 16 bytes.
    #[error("malformed RELP answer: expected a 3-digit code, got {got:?}")]
    NoCode { got: String },
    #[error("malformed RELP answer: no space after the code")]
    NoSpaceAfterCode,
    #[error("the server speaks RELP version {version:?}; this client speaks version 0")]
    Version { version: String },
    /// `offers` is the server's whole offer list.
    #[error("the server does not offer the syslog command (its offers: {offers:?})")]
    NoSyslog { offers: String },
}

/// A connection and, for RELP, its session state.
pub(super) struct Session {
    pub(super) conn: Conn,
    pub(super) reader: RelpReader,
    /// The next TXNR to use.
    pub(super) txnr: u32,
}

impl Session {
    pub(super) fn new(conn: Conn, first_txnr: u32) -> Session {
        Session {
            conn,
            reader: RelpReader::default(),
            txnr: first_txnr,
        }
    }

    pub(super) fn take_txnr(&mut self) -> u32 {
        let t = self.txnr;
        self.txnr = if t >= TXNR_MAX { 1 } else { t + 1 };
        t
    }

    /// The next frame from the server, waiting up to the socket's read timeout.
    pub(super) fn read_frame(&mut self, timeout: Duration) -> Result<RelpFrame, RelpError> {
        let mut buf = [0u8; 8192];
        loop {
            if let Some(f) = self.reader.next_frame()? {
                return Ok(f);
            }
            // ACK the answers at once: librelp's socket uses Nagle, so with our ACK delayed
            // (nothing to send at the end of a batch) the last answers wait ~40 ms.
            let _ = socket2::SockRef::from(self.conn.socket()).set_tcp_quickack(true);
            match self.conn.read(&mut buf) {
                Ok(0) => return Err(RelpError::Closed),
                Ok(n) => self.reader.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(RelpError::NoAnswer { timeout })
                }
                Err(source) => return Err(RelpError::Read { source }),
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Answer {
    Accepted,
    Rejected(String),
}

/// Sends every message not yet answered, `RELP_WINDOW` at most in flight, and records the
/// answers. An error means the session is unusable; `answers` then says what was answered.
pub(super) fn relp_round(
    s: &mut Session,
    msgs: &[Vec<u8>],
    answers: &mut [Option<Answer>],
    timeout: Duration,
) -> Result<(), RelpError> {
    let todo: Vec<usize> = (0..msgs.len()).filter(|&i| answers[i].is_none()).collect();
    let mut next = 0;
    let mut inflight: VecDeque<(u32, usize)> = VecDeque::new();
    let mut out = Vec::new();
    while next < todo.len() || !inflight.is_empty() {
        out.clear();
        while next < todo.len() && inflight.len() < RELP_WINDOW {
            let t = s.take_txnr();
            encode_frame(&mut out, t, "syslog", &msgs[todo[next]]);
            inflight.push_back((t, todo[next]));
            next += 1;
        }
        if !out.is_empty() {
            s.conn
                .write_all(&out)
                .and_then(|_| s.conn.flush())
                .map_err(|source| RelpError::Send { source, timeout })?;
        }
        // Wait for an answer, take every answer already here, and refill at once: frames
        // going out carry the ACKs of the answers, so neither side's Nagle or delayed ACK
        // holds the stream up.
        let f = s.read_frame(timeout)?;
        apply_answer(&f, &mut inflight, answers)?;
        while let Some(f) = s.reader.next_frame()? {
            apply_answer(&f, &mut inflight, answers)?;
        }
    }
    Ok(())
}

/// Takes one frame from the server while messages are in flight.
fn apply_answer(
    f: &RelpFrame,
    inflight: &mut VecDeque<(u32, usize)>,
    answers: &mut [Option<Answer>],
) -> Result<(), RelpError> {
    match f.command.as_str() {
        "rsp" => {
            let pos = inflight
                .iter()
                .position(|(t, _)| *t == f.txnr)
                .ok_or(RelpError::NotInFlight { txnr: f.txnr })?;
            let (code, text, _) = parse_rsp(&f.data)?;
            let (_, i) = inflight.remove(pos).unwrap_or_default();
            answers[i] = Some(if code == 200 {
                Answer::Accepted
            } else {
                Answer::Rejected(format!("RELP server answered {code} {text}"))
            });
            Ok(())
        }
        "serverclose" => Err(RelpError::ServerClose),
        other => Err(RelpError::Unexpected {
            command: other.to_string(),
            txnr: f.txnr,
        }),
    }
}

/// One RELP frame: `TXNR SP COMMAND SP DATALEN [SP DATA] LF`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelpFrame {
    pub txnr: u32,
    pub command: String,
    pub data: Vec<u8>,
}

/// Appends a frame (DATA and its SP only when DATA is not empty, as librelp sends them).
pub fn encode_frame(out: &mut Vec<u8>, txnr: u32, command: &str, data: &[u8]) {
    out.extend_from_slice(format!("{txnr} {command} {}", data.len()).as_bytes());
    if !data.is_empty() {
        out.push(b' ');
        out.extend_from_slice(data);
    }
    out.push(b'\n');
}

/// Cuts frames out of the byte stream from the server, however it arrives.
#[derive(Debug, Default)]
pub struct RelpReader {
    buf: Vec<u8>,
}

impl RelpReader {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, `None` until one is complete, an error on a malformed one.
    pub fn next_frame(&mut self) -> Result<Option<RelpFrame>, RelpError> {
        match parse_frame(&self.buf)? {
            None => Ok(None),
            Some((f, used)) => {
                self.buf.drain(..used);
                Ok(Some(f))
            }
        }
    }
}

/// Parses one frame at the start of `b`: `Ok(None)` if it is not complete yet, else the frame
/// and how many bytes it took. Follows librelp's parser (TXNR and DATALEN of at most 9 digits,
/// COMMAND of 1 to 32 letters); also takes `DATALEN SP LF` for an empty DATA.
pub fn parse_frame(b: &[u8]) -> Result<Option<(RelpFrame, usize)>, RelpError> {
    let bad = |what: &'static str, at: usize| RelpError::Malformed {
        what,
        at,
        found: b.get(at).copied(),
    };
    // TXNR
    let Some((txnr, mut i)) = number(b, 0).map_err(|at| bad("expected TXNR digits", at))? else {
        return Ok(None);
    };
    match b.get(i) {
        None => return Ok(None),
        Some(b' ') => i += 1,
        Some(_) => return Err(bad("expected a space after TXNR", i)),
    }
    // COMMAND
    let start = i;
    while i < b.len() && b[i].is_ascii_alphabetic() {
        i += 1;
        if i - start > 32 {
            return Err(bad("COMMAND longer than 32 letters", i));
        }
    }
    match b.get(i) {
        None => return Ok(None),
        Some(b' ') if i > start => {}
        Some(_) => return Err(bad("expected COMMAND letters and a space", i)),
    }
    let command = String::from_utf8_lossy(&b[start..i]).into_owned();
    i += 1;
    // DATALEN
    let Some((len, i)) = number(&b[i..], 0)
        .map(|o| o.map(|(n, j)| (n, i + j)))
        .map_err(|at| bad("expected DATALEN digits", i + at))?
    else {
        return Ok(None);
    };
    let len = len as usize;
    if len > MAX_ANSWER {
        return Err(RelpError::TooLong { len });
    }
    if len == 0 {
        match b.get(i) {
            None => return Ok(None),
            Some(b'\n') => {
                return Ok(Some((
                    RelpFrame {
                        txnr,
                        command,
                        data: Vec::new(),
                    },
                    i + 1,
                )))
            }
            Some(b' ') => match b.get(i + 1) {
                None => return Ok(None),
                Some(b'\n') => {
                    return Ok(Some((
                        RelpFrame {
                            txnr,
                            command,
                            data: Vec::new(),
                        },
                        i + 2,
                    )))
                }
                Some(_) => return Err(bad("expected LF after DATALEN 0", i + 1)),
            },
            Some(_) => return Err(bad("expected LF after DATALEN 0", i)),
        }
    }
    let data_start = match b.get(i) {
        None => return Ok(None),
        Some(b' ') => i + 1,
        Some(_) => return Err(bad("expected a space after DATALEN", i)),
    };
    let end = data_start + len;
    match b.get(end) {
        None => Ok(None),
        Some(b'\n') => Ok(Some((
            RelpFrame {
                txnr,
                command,
                data: b[data_start..end].to_vec(),
            },
            end + 1,
        ))),
        Some(_) => Err(bad("expected LF after DATA", end)),
    }
}

/// Up to 9 digits from `at`: `Ok(None)` if the input ends inside them, `Err(position)` if there
/// is no digit or a tenth one.
fn number(b: &[u8], at: usize) -> Result<Option<(u32, usize)>, usize> {
    let mut i = at;
    let mut n: u32 = 0;
    while let Some(&c) = b.get(i) {
        if !c.is_ascii_digit() {
            break;
        }
        if i - at == 9 {
            return Err(i);
        }
        n = n * 10 + u32::from(c - b'0');
        i += 1;
    }
    if i == b.len() {
        return Ok(None);
    }
    if i == at {
        return Err(i);
    }
    Ok(Some((n, i)))
}

/// The DATA of an `rsp`: `CODE SP TEXT [LF DATA]` → code, text (as printable text), data.
pub(super) fn parse_rsp(d: &[u8]) -> Result<(u16, String, &[u8]), RelpError> {
    let code = d
        .get(..3)
        .filter(|c| c.iter().all(u8::is_ascii_digit))
        .ok_or_else(|| RelpError::NoCode {
            got: String::from_utf8_lossy(&d[..d.len().min(16)]).into_owned(),
        })?;
    let code = code.iter().fold(0u16, |n, c| n * 10 + u16::from(c - b'0'));
    let rest = match d.get(3) {
        None => &d[3..],
        Some(b' ') => &d[4..],
        Some(_) => return Err(RelpError::NoSpaceAfterCode),
    };
    let (text, data) = match rest.iter().position(|&c| c == b'\n') {
        Some(p) => (&rest[..p], &rest[p + 1..]),
        None => (rest, &rest[rest.len()..]),
    };
    let text: String = String::from_utf8_lossy(&text[..text.len().min(80)])
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    Ok((code, text, data))
}

/// Checks the server's offers in its answer to `open`: RELP version 0 and the syslog command.
pub(super) fn check_offers(offers: &[u8]) -> Result<(), RelpError> {
    let text = String::from_utf8_lossy(offers);
    let mut syslog = false;
    for line in text.split('\n') {
        let (name, values) = line.split_once('=').unwrap_or((line, ""));
        match name {
            "relp_version" if values != "0" => {
                return Err(RelpError::Version {
                    version: values.to_string(),
                })
            }
            "commands" => syslog = values.split(',').any(|v| v == "syslog"),
            _ => {}
        }
    }
    if syslog {
        Ok(())
    } else {
        Err(RelpError::NoSyslog {
            offers: text.into_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_encoding() {
        let mut out = Vec::new();
        encode_frame(&mut out, 2, "syslog", b"hello");
        encode_frame(&mut out, 3, "close", b"");
        assert_eq!(out, b"2 syslog 5 hello\n3 close 0\n");
    }

    fn frames_of(chunks: &[&[u8]]) -> Result<Vec<RelpFrame>, RelpError> {
        let mut r = RelpReader::default();
        let mut out = Vec::new();
        for c in chunks {
            r.push(c);
            while let Some(f) = r.next_frame()? {
                out.push(f);
            }
        }
        assert!(r.buf.is_empty(), "left over: {:?}", r.buf);
        Ok(out)
    }

    #[test]
    fn relp_frames_split_at_every_boundary() {
        let stream: &[u8] = b"1 rsp 93 200 OK\nrelp_version=0\nrelp_software=librelp,1.11.0,http://librelp.adiscon.com\ncommands=syslog\n2 rsp 6 200 OK\n3 rsp 20 500 command disabled\n0 serverclose 0\n4 rsp 0 \n5 rsp 3 a\nb\n";
        let whole = frames_of(&[stream]).unwrap();
        assert_eq!(whole.len(), 6);
        assert_eq!(whole[0].txnr, 1);
        assert_eq!(whole[0].command, "rsp");
        assert!(whole[0].data.ends_with(b"commands=syslog"));
        assert_eq!(whole[2].data, b"500 command disabled");
        assert_eq!(
            whole[3],
            RelpFrame {
                txnr: 0,
                command: "serverclose".into(),
                data: vec![]
            }
        );
        assert_eq!(whole[4].data, b"");
        assert_eq!(whole[5].data, b"a\nb");
        for cut in 0..=stream.len() {
            let (a, b) = stream.split_at(cut);
            assert_eq!(frames_of(&[a, b]).unwrap(), whole, "cut at {cut}");
        }
        for cut1 in (0..stream.len()).step_by(7) {
            for cut2 in cut1..stream.len() {
                let parts = [&stream[..cut1], &stream[cut1..cut2], &stream[cut2..]];
                assert_eq!(frames_of(&parts).unwrap(), whole, "cut at {cut1},{cut2}");
            }
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(frames_of(&bytes).unwrap(), whole);
    }

    #[test]
    fn relp_garbage_is_an_error_not_a_panic() {
        for bad in [
            &b"x rsp 2 ok\n"[..],
            b" 1 rsp 0\n",
            b"1234567890 rsp 0\n",
            b"1  rsp 0\n",
            b"1 rs-p 0\n",
            b"1 rsp x\n",
            b"1 rsp 1234567890 \n",
            b"1 rsp 99999999 x",
            b"1 rsp 2 okX",
            b"1 rsp 0X",
            b"1 rsp 0 X",
            b"1 abcdefghijabcdefghijabcdefghijabc 0\n",
            b"\x00\xff\n",
        ] {
            let mut r = RelpReader::default();
            r.push(bad);
            assert!(
                r.next_frame().is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // Incomplete is not an error.
        for part in [
            &b""[..],
            b"1",
            b"12 ",
            b"12 rsp",
            b"12 rsp 10",
            b"12 rsp 10 abc",
            b"12 rsp 0",
            b"12 rsp 0 ",
        ] {
            assert!(
                matches!(parse_frame(part), Ok(None)),
                "{:?}",
                String::from_utf8_lossy(part)
            );
        }
    }

    #[test]
    fn frame_error_texts() {
        assert_eq!(
            parse_frame(b"1 rsp x").unwrap_err().to_string(),
            "malformed RELP frame from the server: expected DATALEN digits at byte 6 (found 'x')"
        );
        assert_eq!(
            parse_frame(b"1 rsp 999999 ").unwrap_err().to_string(),
            "malformed RELP frame from the server: DATALEN 999999 is more than the 65536 bytes an answer may have"
        );
        assert_eq!(
            parse_rsp(b"200-OK").unwrap_err().to_string(),
            "malformed RELP answer: no space after the code"
        );
        assert_eq!(
            check_offers(b"relp_version=1").unwrap_err().to_string(),
            "the server speaks RELP version \"1\"; this client speaks version 0"
        );
    }

    #[test]
    fn rsp_parsing() {
        assert_eq!(parse_rsp(b"200 OK").unwrap(), (200, "OK".into(), &b""[..]));
        assert_eq!(
            parse_rsp(b"200 OK\nrelp_version=0\ncommands=syslog").unwrap(),
            (200, "OK".into(), &b"relp_version=0\ncommands=syslog"[..])
        );
        assert_eq!(parse_rsp(b"500 error\x01x").unwrap().1, "error x");
        assert_eq!(parse_rsp(b"500").unwrap().0, 500);
        assert!(parse_rsp(b"20").is_err());
        assert!(parse_rsp(b"2x0 OK").is_err());
        assert!(parse_rsp(b"200-OK").is_err());
        assert!(check_offers(b"relp_version=0\nrelp_software=librelp,1.11.0,http://librelp.adiscon.com\ncommands=syslog").is_ok());
        assert!(check_offers(b"relp_version=0\ncommands=")
            .unwrap_err()
            .to_string()
            .contains("syslog command"));
        assert!(check_offers(b"relp_version=1\ncommands=syslog")
            .unwrap_err()
            .to_string()
            .contains("version"));
    }
}
