//! Ships records to a syslog receiver (rsyslog, syslog-ng, a SIEM's collector): each record is the
//! MSG of an RFC 5424 message, sent over TCP with RFC 6587 octet counting, over TLS (RFC 5425), or
//! over RELP, the only one of the three in which the receiver acknowledges every message.
//!
//! Plain TCP and TLS have no acknowledgement: a batch counts as delivered once it is written and
//! flushed into the kernel, so what was in flight when the receiver died is lost, and a batch
//! that failed half-way is sent again whole (the receiver may get some records twice). That is
//! why RELP exists; use it when the audit trail must arrive. With RELP a record counts as
//! delivered when the server answered `200 OK` for it, and only what was not answered is sent
//! again (duplicates are still possible: a server may have taken a record and died before its
//! answer reached us). Every message carries `[sparbar@32473 id=".." seq=".."]` so receivers can
//! drop duplicates.

mod conn;
mod relp;
mod rfc5424;
#[cfg(test)]
mod tests;

use std::{
    io::{self, Write},
    net::{SocketAddr, TcpStream, ToSocketAddrs},
    sync::Arc,
    time::Duration,
};

use log::warn;
use rustls::pki_types::{InvalidDnsNameError, ServerName};

pub use self::{
    conn::TlsError,
    relp::{encode_frame, parse_frame, RelpError, RelpFrame, RelpReader, RELP_WINDOW},
    rfc5424::{octet_frame, rfc5424_timestamp, sd_escape, severity, SD_ID},
};
use self::{
    conn::{host_of, io_text, tls_config, Conn},
    relp::{check_offers, parse_rsp, relp_round, Answer, Session, RELP_OFFERS, TXNR_MAX},
    rfc5424::{header_field, Header},
};
use super::{BatchLimits, Destination, Line, Outcome, SendError};
use crate::config::{SyslogSinkConfig, SyslogTransport};

/// Why a syslog sink could not be set up (`new`) or could not open its connection or RELP
/// session (`place` is "RELP over TLS to logs.example.org:2514").
#[derive(Debug, thiserror::Error)]
pub enum SyslogError {
    /// (Boxed: the rustls errors inside are large, and every `Result` carrying this pays.)
    #[error("{place}: {source}")]
    Tls {
        name: String,
        place: String,
        source: Box<TlsError>,
    },
    #[error("{place}: {host:?} is not a name to verify the server's certificate against ({source}); set server_name")]
    ServerName {
        name: String,
        place: String,
        host: String,
        source: InvalidDnsNameError,
    },
    #[error("{place}: resolving the address: {source}")]
    Resolve { place: String, source: io::Error },
    #[error("{place}: connecting: the name resolved to no address")]
    NoAddress { place: String },
    /// The last address tried and why it failed.
    #[error("{place}: connecting: {addr}: {source}")]
    Connect {
        place: String,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("{place}: setting up the socket: {source}")]
    Socket { place: String, source: io::Error },
    #[error("{place}: starting TLS: {source}")]
    StartTls {
        place: String,
        source: rustls::Error,
    },
    #[error("{place}: TLS handshake: {}", io_text(.source, *.timeout))]
    Handshake {
        place: String,
        source: io::Error,
        timeout: Duration,
    },
    #[error("{place}: sending open: {}", io_text(.source, *.timeout))]
    SendOpen {
        place: String,
        source: io::Error,
        timeout: Duration,
    },
    #[error("{place}: waiting for the answer to open: {source}")]
    AwaitOpen { place: String, source: RelpError },
    #[error("{place}: the server closed the session it was opening (serverclose)")]
    ClosedOnOpen { place: String },
    #[error(
        "{place}: expected the answer to open (txnr {txnr} rsp), got txnr {got_txnr} {command:?}"
    )]
    NotTheOpenAnswer {
        place: String,
        txnr: u32,
        got_txnr: u32,
        command: String,
    },
    #[error("{place}: the answer to open: {source}")]
    OpenAnswer { place: String, source: RelpError },
    #[error("{place}: the server refused the session: {code} {text}")]
    Refused {
        place: String,
        code: u16,
        text: String,
    },
    #[error("{place}: {source}")]
    Offers { place: String, source: RelpError },
}

impl From<SyslogError> for SendError {
    fn from(e: SyslogError) -> SendError {
        SendError::retry(e.to_string())
    }
}

/// A syslog sink: one connection (or RELP session), opened when needed and kept between batches.
///
/// Over TCP and TLS, `send` returns `Ok` once the batch is written and flushed: a receiver that
/// dies with it in flight loses it, and a write error sends the whole batch again (duplicates
/// possible). A kept connection the receiver closed meanwhile is noticed before writing (a
/// read that does not wait), which narrows that window but cannot close it. Over RELP, `send`
/// returns after the server answered every record, or with `Outcome::retry` listing the records
/// it did not answer when the session broke half-way; a 500 answer rejects that record.
///
/// The receiver must take messages as large as the largest record: rsyslog truncates anything
/// over its `maxMessageSize` (8 KiB by default), over RELP too, and still answers `200 OK`.
pub struct SyslogDest {
    name: String,
    address: String,
    transport: SyslogTransport,
    /// "RELP over TLS to logs.example.org:2514", for error messages.
    place: String,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    header: Header,
    timeout: Duration,
    limits: BatchLimits,
    session: Option<Session>,
}

impl SyslogDest {
    /// Checks the TLS material (CA, client certificate and key are read now, so a bad path is
    /// reported at startup); connects on the first batch.
    pub fn new(
        name: &str,
        cfg: &SyslogSinkConfig,
        host_name: &str,
    ) -> Result<SyslogDest, SyslogError> {
        let use_tls = match cfg.transport {
            SyslogTransport::Tcp => false,
            SyslogTransport::Tls => true,
            SyslogTransport::Relp => cfg.tls.is_some(),
        };
        let place = format!(
            "{} to {}",
            match (cfg.transport, use_tls) {
                (SyslogTransport::Relp, true) => "RELP over TLS",
                (SyslogTransport::Relp, false) => "RELP",
                (_, true) => "syslog over TLS",
                (_, false) => "syslog over TCP",
            },
            cfg.address
        );
        let tls = if use_tls {
            let t = cfg.tls.clone().unwrap_or_default();
            let config = tls_config(&t).map_err(|e| SyslogError::Tls {
                name: name.to_string(),
                place: place.clone(),
                source: Box::new(e),
            })?;
            let host = t
                .server_name
                .clone()
                .unwrap_or_else(|| host_of(&cfg.address));
            let server =
                ServerName::try_from(host.clone()).map_err(|source| SyslogError::ServerName {
                    name: name.to_string(),
                    place: place.clone(),
                    host: host.clone(),
                    source,
                })?;
            Some((config, server))
        } else {
            None
        };
        Ok(SyslogDest {
            name: name.to_string(),
            address: cfg.address.clone(),
            transport: cfg.transport,
            place,
            tls,
            header: Header {
                facility: cfg.facility.min(23),
                host: header_field(host_name, 255),
                app: header_field(&cfg.app_name, 48),
                procid: std::process::id().to_string(),
            },
            timeout: if cfg.timeout.is_zero() {
                Duration::from_secs(10)
            } else {
                cfg.timeout
            },
            limits: BatchLimits::default(),
            session: None,
        })
    }

    /// How the worker should cut batches (the sink's `batch_*` settings).
    pub fn with_limits(mut self, limits: BatchLimits) -> SyslogDest {
        self.limits = limits;
        self
    }

    fn connect(&self) -> Result<Conn, SyslogError> {
        let place = || self.place.clone();
        let addrs = self
            .address
            .to_socket_addrs()
            .map_err(|source| SyslogError::Resolve {
                place: place(),
                source,
            })?;
        let mut sock = None;
        let mut last = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, self.timeout) {
                Ok(s) => {
                    sock = Some(s);
                    break;
                }
                Err(e) => last = Some((a, e)),
            }
        }
        let mut sock = match (sock, last) {
            (Some(s), _) => s,
            (None, Some((addr, source))) => {
                return Err(SyslogError::Connect {
                    place: place(),
                    addr,
                    source,
                })
            }
            (None, None) => return Err(SyslogError::NoAddress { place: place() }),
        };
        sock.set_read_timeout(Some(self.timeout))
            .and_then(|_| sock.set_write_timeout(Some(self.timeout)))
            .and_then(|_| sock.set_nodelay(true))
            .map_err(|source| SyslogError::Socket {
                place: place(),
                source,
            })?;
        let Some((config, server)) = &self.tls else {
            return Ok(Conn::Plain(sock));
        };
        let mut c =
            rustls::ClientConnection::new(config.clone(), server.clone()).map_err(|source| {
                SyslogError::StartTls {
                    place: place(),
                    source,
                }
            })?;
        while c.is_handshaking() {
            c.complete_io(&mut sock)
                .map_err(|source| SyslogError::Handshake {
                    place: place(),
                    source,
                    timeout: self.timeout,
                })?;
        }
        Ok(Conn::Tls(Box::new(rustls::StreamOwned::new(c, sock))))
    }

    /// Drops a kept connection the receiver has closed meanwhile (a restarted rsyslog), so the
    /// next batch goes to a new one instead of into a dead socket. For RELP, also reads what the
    /// server sent between batches: a `serverclose` hint ends the session.
    fn check_kept(&mut self) {
        let Some(s) = &mut self.session else { return };
        let mut got = Vec::new();
        let alive = s.conn.read_nonblocking(&mut got);
        let mut ok = alive;
        // A plain syslog receiver sends nothing; whatever it sent is ignored (TLS session
        // tickets never get here, rustls takes them).
        if alive && !got.is_empty() && self.transport == SyslogTransport::Relp {
            s.reader.push(&got);
            // Nothing is in flight between batches: any frame means the session is over.
            ok = matches!(s.reader.next_frame(), Ok(None));
        }
        if !ok {
            self.session = None;
        }
    }

    fn send_stream(&mut self, batch: &[Line]) -> Result<Outcome, SendError> {
        let mut out = Vec::with_capacity(batch.iter().map(|l| l.bytes.len() + 128).sum());
        for l in batch {
            octet_frame(&mut out, &self.header.message(l));
        }
        self.check_kept();
        if self.session.is_none() {
            let conn = self.connect()?;
            self.session = Some(Session::new(conn, 1));
        }
        let Some(s) = self.session.as_mut() else {
            return Err(SendError::retry(format!("{}: no connection", self.place)));
        };
        match s.conn.write_all(&out).and_then(|_| s.conn.flush()) {
            Ok(()) => Ok(Outcome::delivered()),
            Err(e) => {
                self.session = None;
                Err(SendError::retry(format!(
                    "{}: sending {} message(s): {}; the batch goes again on a new connection (the receiver may get some twice)",
                    self.place,
                    batch.len(),
                    io_text(&e, self.timeout)
                )))
            }
        }
    }

    fn open_relp(&self) -> Result<Session, SyslogError> {
        let place = || self.place.clone();
        let conn = self.connect()?;
        let mut s = Session::new(conn, 1);
        let t = s.take_txnr();
        let mut out = Vec::new();
        encode_frame(&mut out, t, "open", RELP_OFFERS);
        s.conn
            .write_all(&out)
            .and_then(|_| s.conn.flush())
            .map_err(|source| SyslogError::SendOpen {
                place: place(),
                source,
                timeout: self.timeout,
            })?;
        let f = s
            .read_frame(self.timeout)
            .map_err(|source| SyslogError::AwaitOpen {
                place: place(),
                source,
            })?;
        if f.command == "serverclose" {
            return Err(SyslogError::ClosedOnOpen { place: place() });
        }
        if f.command != "rsp" || f.txnr != t {
            return Err(SyslogError::NotTheOpenAnswer {
                place: place(),
                txnr: t,
                got_txnr: f.txnr,
                command: f.command,
            });
        }
        let (code, text, offers) =
            parse_rsp(&f.data).map_err(|source| SyslogError::OpenAnswer {
                place: place(),
                source,
            })?;
        if code != 200 {
            return Err(SyslogError::Refused {
                place: place(),
                code,
                text,
            });
        }
        check_offers(offers).map_err(|source| SyslogError::Offers {
            place: place(),
            source,
        })?;
        Ok(s)
    }

    fn send_relp(&mut self, batch: &[Line]) -> Result<Outcome, SendError> {
        let msgs: Vec<Vec<u8>> = batch.iter().map(|l| self.header.message(l)).collect();
        let mut answers: Vec<Option<Answer>> = vec![None; msgs.len()];
        self.check_kept();
        if self
            .session
            .as_ref()
            .is_some_and(|s| s.txnr as u64 + msgs.len() as u64 >= TXNR_MAX as u64)
        {
            self.close_session();
        }
        let mut fresh_retry_done = false;
        let reason = loop {
            let reused = self.session.is_some();
            if !reused {
                self.session = Some(self.open_relp()?);
            }
            let Some(s) = self.session.as_mut() else {
                return Err(SendError::retry(format!("{}: no session", self.place)));
            };
            let before = answers.iter().filter(|a| a.is_some()).count();
            match relp_round(s, &msgs, &mut answers, self.timeout) {
                Ok(()) => break None,
                Err(e) => {
                    self.session = None;
                    let answered = answers.iter().filter(|a| a.is_some()).count() > before;
                    // A kept session that died before answering anything was stale (the server
                    // restarted between batches): nothing of this batch was taken, try once anew.
                    if reused && !answered && !fresh_retry_done {
                        fresh_retry_done = true;
                        continue;
                    }
                    break Some(format!("{}: {e}", self.place));
                }
            }
        };
        let mut outcome = Outcome::default();
        for (i, a) in answers.iter().enumerate() {
            match a {
                Some(Answer::Accepted) => {}
                Some(Answer::Rejected(why)) => outcome.rejected.push((i, why.clone())),
                None => outcome.retry.push(i),
            }
        }
        if let Some(reason) = reason {
            if outcome.retry.len() == batch.len() {
                return Err(SendError::retry(reason));
            }
            warn!(
                "sink {}: {reason}; {} of {} record(s) answered, the other {} go again",
                self.name,
                batch.len() - outcome.retry.len(),
                batch.len(),
                outcome.retry.len()
            );
        }
        Ok(outcome)
    }

    /// Ends a session politely: RELP `close` (waiting briefly for its answer), TLS close_notify.
    fn close_session(&mut self) {
        let Some(mut s) = self.session.take() else {
            return;
        };
        if self.transport == SyslogTransport::Relp {
            let t = s.take_txnr();
            let mut out = Vec::new();
            encode_frame(&mut out, t, "close", b"");
            if s.conn.write_all(&out).and_then(|_| s.conn.flush()).is_ok() {
                let wait = self.timeout.min(Duration::from_secs(2));
                let _ = s.conn.socket().set_read_timeout(Some(wait));
                for _ in 0..4 {
                    match s.read_frame(wait) {
                        Ok(f) if f.command == "rsp" && f.txnr == t => break,
                        Ok(_) => continue,
                        Err(_) => break,
                    }
                }
            }
        }
        if let Conn::Tls(t) = &mut s.conn {
            t.conn.send_close_notify();
            let _ = t.flush();
        }
    }
}

impl Drop for SyslogDest {
    fn drop(&mut self) {
        self.close_session();
    }
}

impl Destination for SyslogDest {
    fn name(&self) -> &str {
        &self.name
    }

    fn limits(&self) -> BatchLimits {
        self.limits
    }

    fn send(&mut self, batch: &[Line]) -> Result<Outcome, SendError> {
        if batch.is_empty() {
            return Ok(Outcome::delivered());
        }
        match self.transport {
            SyslogTransport::Tcp | SyslogTransport::Tls => self.send_stream(batch),
            SyslogTransport::Relp => self.send_relp(batch),
        }
    }
}
