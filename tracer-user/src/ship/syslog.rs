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

use std::{
    borrow::Cow,
    collections::VecDeque,
    io::{self, Read, Write},
    net::{TcpStream, ToSocketAddrs},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use log::warn;
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};
use serde::Deserialize;

use super::{BatchLimits, Destination, Line, Outcome, SendError, Stream};
use crate::config::{SyslogSinkConfig, SyslogTransport, TlsClientConfig};

/// The SD-ID of the structured-data element. 32473 is the private enterprise number RFC 5612
/// reserves for documentation; a registered number would replace it (receivers match on it).
pub const SD_ID: &str = "sparbar@32473";

/// RELP frames sent before their answers are awaited (librelp's default window is also 128).
pub const RELP_WINDOW: usize = 128;

/// The offers of our `open` (librelp's format: `name=value[,value]` lines, no final LF).
const RELP_OFFERS: &[u8] = b"relp_version=0\nrelp_software=sparbar\ncommands=syslog";

/// Largest DATA we accept in a frame from a RELP server (answers are a few bytes; the answer
/// to `open` lists offers): anything larger is garbage, not something to buffer.
const MAX_ANSWER: usize = 64 << 10;

/// TXNR has at most 9 digits. librelp's wrap-around after 999999999 produces a 10-digit number
/// its own parser refuses, so a session close to the end is reopened (a new session starts at 1).
const TXNR_MAX: u32 = 999_999_999;

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
    pub fn new(name: &str, cfg: &SyslogSinkConfig, host_name: &str) -> Result<SyslogDest, String> {
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
            let config =
                tls_config(&t).map_err(|e| format!("syslog sink {name} ({place}): {e}"))?;
            let host = t
                .server_name
                .clone()
                .unwrap_or_else(|| host_of(&cfg.address));
            let server = ServerName::try_from(host.clone()).map_err(|e| {
                format!("syslog sink {name} ({place}): {host:?} is not a name to verify the server's certificate against ({e}); set server_name")
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

    fn connect(&self) -> Result<Conn, String> {
        let place = &self.place;
        let addrs = self
            .address
            .to_socket_addrs()
            .map_err(|e| format!("{place}: resolving the address: {e}"))?;
        let mut sock = None;
        let mut last = String::from("the name resolved to no address");
        for a in addrs {
            match TcpStream::connect_timeout(&a, self.timeout) {
                Ok(s) => {
                    sock = Some(s);
                    break;
                }
                Err(e) => last = format!("{a}: {e}"),
            }
        }
        let mut sock = sock.ok_or_else(|| format!("{place}: connecting: {last}"))?;
        sock.set_read_timeout(Some(self.timeout))
            .and_then(|_| sock.set_write_timeout(Some(self.timeout)))
            .and_then(|_| sock.set_nodelay(true))
            .map_err(|e| format!("{place}: setting up the socket: {e}"))?;
        let Some((config, server)) = &self.tls else {
            return Ok(Conn::Plain(sock));
        };
        let mut c = rustls::ClientConnection::new(config.clone(), server.clone())
            .map_err(|e| format!("{place}: starting TLS: {e}"))?;
        while c.is_handshaking() {
            c.complete_io(&mut sock)
                .map_err(|e| format!("{place}: TLS handshake: {}", io_text(&e, self.timeout)))?;
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
            let conn = self.connect().map_err(SendError::retry)?;
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

    fn open_relp(&self) -> Result<Session, String> {
        let place = &self.place;
        let conn = self.connect()?;
        let mut s = Session::new(conn, 1);
        let t = s.take_txnr();
        let mut out = Vec::new();
        encode_frame(&mut out, t, "open", RELP_OFFERS);
        s.conn
            .write_all(&out)
            .and_then(|_| s.conn.flush())
            .map_err(|e| format!("{place}: sending open: {}", io_text(&e, self.timeout)))?;
        let f = s
            .read_frame(self.timeout)
            .map_err(|e| format!("{place}: waiting for the answer to open: {e}"))?;
        if f.command == "serverclose" {
            return Err(format!(
                "{place}: the server closed the session it was opening (serverclose)"
            ));
        }
        if f.command != "rsp" || f.txnr != t {
            return Err(format!(
                "{place}: expected the answer to open (txnr {t} rsp), got txnr {} {:?}",
                f.txnr, f.command
            ));
        }
        let (code, text, offers) =
            parse_rsp(&f.data).map_err(|e| format!("{place}: the answer to open: {e}"))?;
        if code != 200 {
            return Err(format!(
                "{place}: the server refused the session: {code} {text}"
            ));
        }
        check_offers(offers).map_err(|e| format!("{place}: {e}"))?;
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
                self.session = Some(self.open_relp().map_err(SendError::retry)?);
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

// ---------------------------------------------------------------------------------------------
// RFC 5424 messages

/// The fixed part of every message.
struct Header {
    facility: u8,
    host: String,
    app: String,
    procid: String,
}

/// The fields of a record the header needs (the rest of the record is skipped unparsed).
#[derive(Deserialize, Default)]
struct RecordHead<'a> {
    #[serde(rename = "@timestamp", borrow, default)]
    timestamp: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    event: Option<EventHead<'a>>,
}

#[derive(Deserialize, Default)]
struct EventHead<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(default)]
    sequence: Option<u64>,
}

impl Header {
    /// `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [sparbar@32473 id=".." seq=".."] MSG`.
    /// MSG is the record as spooled, without the UTF-8 BOM RFC 5424 asks of MSG-UTF8: it is then
    /// MSG-ANY, which every receiver takes as is, and the record stays byte-exact (its hash
    /// chain covers those bytes).
    fn message(&self, line: &Line) -> Vec<u8> {
        let head: RecordHead = serde_json::from_slice(&line.bytes).unwrap_or_default();
        let event = head.event.unwrap_or_default();
        let pri =
            u16::from(self.facility) * 8 + u16::from(severity(line.stream, event.kind.as_deref()));
        let ts = head
            .timestamp
            .as_deref()
            .and_then(rfc5424_timestamp)
            .unwrap_or_else(|| Cow::Owned(now_timestamp()));
        let mut sd = format!("[{SD_ID}");
        if let Some(id) = &event.id {
            sd.push_str(" id=\"");
            sd_escape_into(&mut sd, id);
            sd.push('"');
        }
        sd.push_str(&format!(" seq=\"{}\"]", event.sequence.unwrap_or(line.seq)));
        let mut m = format!(
            "<{pri}>1 {ts} {} {} {} {} {sd} ",
            self.host,
            self.app,
            self.procid,
            line.stream.name()
        )
        .into_bytes();
        m.extend_from_slice(&line.bytes);
        m
    }
}

/// 4 (warning) for alerts, 5 (notice) for the rest of the security stream, 6 (info) for access.
pub fn severity(stream: Stream, event_kind: Option<&str>) -> u8 {
    match (event_kind, stream) {
        (Some("alert"), _) => 4,
        (_, Stream::Security) => 5,
        (_, Stream::Access) => 6,
    }
}

/// Escapes a PARAM-VALUE (RFC 5424 §6.3.3): `"`, `\` and `]` get a backslash.
pub fn sd_escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    sd_escape_into(&mut s, v);
    s
}

fn sd_escape_into(out: &mut String, v: &str) {
    for c in v.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
}

/// A header field as RFC 5424 allows it: 1 to `max` printable US-ASCII characters, `-` if
/// nothing is left.
fn header_field(v: &str, max: usize) -> String {
    let s: String = v
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if s.is_empty() {
        "-".into()
    } else {
        s
    }
}

/// An RFC 3339 timestamp as RFC 5424's TIMESTAMP: upper-case `T` and `Z`, at most 6 fractional
/// digits (more are cut, not rounded). `None` when it is not a valid timestamp.
pub fn rfc5424_timestamp(s: &str) -> Option<Cow<'_, str>> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let d = b.get(r)?;
        d.iter()
            .all(u8::is_ascii_digit)
            .then(|| d.iter().fold(0, |n, c| n * 10 + u32::from(c - b'0')))
    };
    let (mo, d, h, mi, sec) = (
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    num(0..4)?;
    if b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 59 {
        return None;
    }
    let mut i = 19;
    let mut frac_end = 19;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
        frac_end = start + (i - start).min(6);
    }
    let zone = &s[i..];
    let zb = zone.as_bytes();
    let zone_ok = matches!(zone, "Z" | "z")
        || (zb.len() == 6
            && matches!(zb[0], b'+' | b'-')
            && zb[3] == b':'
            && num(i + 1..i + 3).is_some_and(|h| h <= 23)
            && num(i + 4..i + 6).is_some_and(|m| m <= 59));
    if !zone_ok {
        return None;
    }
    if b[10] == b'T' && zone != "z" && frac_end == i {
        return Some(Cow::Borrowed(s));
    }
    let mut out = String::with_capacity(s.len());
    out.push_str(&s[..10]);
    out.push('T');
    out.push_str(&s[11..frac_end]);
    out.push_str(if zone == "z" { "Z" } else { zone });
    Some(Cow::Owned(out))
}

fn now_timestamp() -> String {
    let ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    crate::record::rfc3339_micros(ns)
}

/// RFC 6587 octet counting (also RFC 5425's framing): `MSG-LEN SP SYSLOG-MSG`.
pub fn octet_frame(out: &mut Vec<u8>, msg: &[u8]) {
    out.extend_from_slice(msg.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(msg);
}

// ---------------------------------------------------------------------------------------------
// Connections

enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Conn {
    fn socket(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(t) => t.get_ref(),
        }
    }

    /// Reads what is already there without waiting, into `got`. False when the peer closed the
    /// connection or it failed.
    fn read_nonblocking(&mut self, got: &mut Vec<u8>) -> bool {
        if self.socket().set_nonblocking(true).is_err() {
            return false;
        }
        let mut buf = [0u8; 4096];
        let alive = loop {
            match self.read(&mut buf) {
                Ok(0) => break false,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    if got.len() > MAX_ANSWER {
                        break false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break true,
                Err(_) => break false,
            }
        };
        alive && self.socket().set_nonblocking(false).is_ok()
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(t) => t.flush(),
        }
    }
}

fn io_text(e: &io::Error, timeout: Duration) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!("timed out after {timeout:?}")
        }
        _ => e.to_string(),
    }
}

/// The host part of `host:port` (`[::1]:514` → `::1`).
fn host_of(address: &str) -> String {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

fn tls_config(t: &TlsClientConfig) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    match &t.ca {
        Some(ca) => {
            let certs = CertificateDer::pem_file_iter(ca)
                .map_err(|e| format!("reading the CA file {}: {e}", ca.display()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("reading the CA file {}: {e}", ca.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "the CA file {} holds no PEM certificate; expected -----BEGIN CERTIFICATE-----",
                    ca.display()
                ));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("the CA file {}: {e}", ca.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map_or(String::new(), |e| format!(" ({e})"));
                return Err(format!(
                    "found no system CA certificates to trust{why}; install ca-certificates or set ca"
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots);
    let config = match (&t.cert, &t.key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|e| format!("reading the client certificate {}: {e}", cert.display()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("reading the client certificate {}: {e}", cert.display()))?;
            if chain.is_empty() {
                return Err(format!(
                    "the client certificate file {} holds no PEM certificate",
                    cert.display()
                ));
            }
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("reading the client key {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("the client certificate and key: {e}"))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => return Err("client_cert and client_key go together; set both or neither".into()),
    };
    Ok(Arc::new(config))
}

// ---------------------------------------------------------------------------------------------
// RELP (https://www.rsyslog.com/doc/relp.html, as librelp speaks it)

/// A connection and, for RELP, its session state.
struct Session {
    conn: Conn,
    reader: RelpReader,
    /// The next TXNR to use.
    txnr: u32,
}

impl Session {
    fn new(conn: Conn, first_txnr: u32) -> Session {
        Session {
            conn,
            reader: RelpReader::default(),
            txnr: first_txnr,
        }
    }

    fn take_txnr(&mut self) -> u32 {
        let t = self.txnr;
        self.txnr = if t >= TXNR_MAX { 1 } else { t + 1 };
        t
    }

    /// The next frame from the server, waiting up to the socket's read timeout.
    fn read_frame(&mut self, timeout: Duration) -> Result<RelpFrame, String> {
        let mut buf = [0u8; 8192];
        loop {
            if let Some(f) = self.reader.next_frame()? {
                return Ok(f);
            }
            // ACK the answers at once: librelp's socket uses Nagle, so with our ACK delayed
            // (nothing to send at the end of a batch) the last answers wait ~40 ms.
            let _ = socket2::SockRef::from(self.conn.socket()).set_tcp_quickack(true);
            match self.conn.read(&mut buf) {
                Ok(0) => return Err("the server closed the connection".into()),
                Ok(n) => self.reader.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(format!("no answer from the server within {timeout:?}"))
                }
                Err(e) => return Err(format!("reading the server's answers: {e}")),
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Accepted,
    Rejected(String),
}

/// Sends every message not yet answered, `RELP_WINDOW` at most in flight, and records the
/// answers. An error means the session is unusable; `answers` then says what was answered.
fn relp_round(
    s: &mut Session,
    msgs: &[Vec<u8>],
    answers: &mut [Option<Answer>],
    timeout: Duration,
) -> Result<(), String> {
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
                .map_err(|e| format!("sending: {}", io_text(&e, timeout)))?;
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
) -> Result<(), String> {
    match f.command.as_str() {
        "rsp" => {
            let pos = inflight
                .iter()
                .position(|(t, _)| *t == f.txnr)
                .ok_or_else(|| {
                    format!(
                        "the server answered txnr {}, which is not in flight",
                        f.txnr
                    )
                })?;
            let (code, text, _) = parse_rsp(&f.data)?;
            let (_, i) = inflight.remove(pos).unwrap_or_default();
            answers[i] = Some(if code == 200 {
                Answer::Accepted
            } else {
                Answer::Rejected(format!("RELP server answered {code} {text}"))
            });
            Ok(())
        }
        "serverclose" => Err("the server is closing the session (serverclose)".into()),
        other => Err(format!(
            "the server sent an unexpected {other:?} frame (txnr {})",
            f.txnr
        )),
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
    pub fn next_frame(&mut self) -> Result<Option<RelpFrame>, String> {
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
pub fn parse_frame(b: &[u8]) -> Result<Option<(RelpFrame, usize)>, String> {
    let bad = |what: &str, at: usize| {
        format!(
            "malformed RELP frame from the server: {what} at byte {at} (found {})",
            b.get(at)
                .map_or("the end".into(), |c| format!("{:?}", *c as char))
        )
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
        return Err(format!(
            "malformed RELP frame from the server: DATALEN {len} is more than the {MAX_ANSWER} bytes an answer may have"
        ));
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
fn parse_rsp(d: &[u8]) -> Result<(u16, String, &[u8]), String> {
    let code = d
        .get(..3)
        .filter(|c| c.iter().all(u8::is_ascii_digit))
        .ok_or_else(|| {
            format!(
                "malformed RELP answer: expected a 3-digit code, got {:?}",
                String::from_utf8_lossy(&d[..d.len().min(16)])
            )
        })?;
    let code = code.iter().fold(0u16, |n, c| n * 10 + u16::from(c - b'0'));
    let rest = match d.get(3) {
        None => &d[3..],
        Some(b' ') => &d[4..],
        Some(_) => return Err("malformed RELP answer: no space after the code".into()),
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
fn check_offers(offers: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(offers);
    let mut syslog = false;
    for line in text.split('\n') {
        let (name, values) = line.split_once('=').unwrap_or((line, ""));
        match name {
            "relp_version" if values != "0" => {
                return Err(format!(
                    "the server speaks RELP version {values:?}; this client speaks version 0"
                ))
            }
            "commands" => syslog = values.split(',').any(|v| v == "syslog"),
            _ => {}
        }
    }
    if syslog {
        Ok(())
    } else {
        Err(format!(
            "the server does not offer the syslog command (its offers: {text:?})"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        net::TcpListener,
        sync::mpsc,
        thread::{self, JoinHandle},
    };

    fn line(stream: Stream, seq: u64, json: &str) -> Line {
        Line {
            stream,
            seq,
            bytes: json.as_bytes().to_vec(),
        }
    }

    fn rec(i: u64) -> Line {
        line(
            Stream::Access,
            i,
            &format!(
                r#"{{"@timestamp":"2024-05-01T10:00:00.123456Z","event":{{"sequence":{i},"id":"ev-{i}","kind":"event"}},"n":{i}}}"#
            ),
        )
    }

    fn header() -> Header {
        Header {
            facility: 13,
            host: "web-1".into(),
            app: "sparbar".into(),
            procid: "42".into(),
        }
    }

    fn cfg(address: &str, transport: SyslogTransport) -> SyslogSinkConfig {
        SyslogSinkConfig {
            address: address.into(),
            transport,
            tls: None,
            app_name: "sparbar".into(),
            facility: 13,
            timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn message_layout() {
        let l = line(
            Stream::Security,
            9,
            r#"{"event":{"sequence":7,"id":"a\"b]c\\d","kind":"alert"},"@timestamp":"2024-05-01T10:00:00.123456789+02:00","x":"é"}"#,
        );
        let m = String::from_utf8(header().message(&l)).unwrap();
        assert_eq!(
            m,
            r#"<108>1 2024-05-01T10:00:00.123456+02:00 web-1 sparbar 42 security [sparbar@32473 id="a\"b\]c\\d" seq="7"] {"event":{"sequence":7,"id":"a\"b]c\\d","kind":"alert"},"@timestamp":"2024-05-01T10:00:00.123456789+02:00","x":"é"}"#
        );
    }

    #[test]
    fn pri_per_stream_and_kind() {
        let h = header();
        let pri = |l: &Line| {
            let m = h.message(l);
            let end = m.iter().position(|&c| c == b'>').unwrap();
            String::from_utf8(m[1..end].to_vec()).unwrap()
        };
        assert_eq!(
            pri(&line(Stream::Access, 1, r#"{"event":{"kind":"event"}}"#)),
            "110"
        );
        assert_eq!(
            pri(&line(Stream::Security, 1, r#"{"event":{"kind":"event"}}"#)),
            "109"
        );
        assert_eq!(
            pri(&line(Stream::Security, 1, r#"{"event":{"kind":"alert"}}"#)),
            "108"
        );
        assert_eq!(
            pri(&line(Stream::Access, 1, r#"{"event":{"kind":"alert"}}"#)),
            "108"
        );
        let mut h0 = header();
        h0.facility = 0;
        assert_eq!(h0.message(&line(Stream::Access, 1, "{}"))[..3], *b"<6>");
        assert_eq!(severity(Stream::Security, None), 5);
    }

    #[test]
    fn missing_or_odd_fields_still_make_a_message() {
        let h = header();
        // Not JSON at all, a number where a string was expected: now, and the spool's sequence.
        for bad in [
            "not json",
            r#"{"event":{"id":5}}"#,
            r#"{"@timestamp":"yesterday"}"#,
        ] {
            let m = String::from_utf8(h.message(&line(Stream::Access, 77, bad))).unwrap();
            let parts: Vec<&str> = m.splitn(8, ' ').collect();
            assert_eq!(parts[0], "<110>1");
            assert!(rfc5424_timestamp(parts[1]).is_some(), "{m}");
            assert_eq!(parts[6], r#"[sparbar@32473"#);
            assert!(m.contains(r#" seq="77"] "#), "{m}");
            assert!(m.ends_with(bad));
        }
    }

    #[test]
    fn sd_escaping() {
        assert_eq!(sd_escape(r#"plain-id"#), "plain-id");
        assert_eq!(sd_escape(r#"a"b"#), r#"a\"b"#);
        assert_eq!(sd_escape(r#"a\b"#), r#"a\\b"#);
        assert_eq!(sd_escape(r#"a]b"#), r#"a\]b"#);
        assert_eq!(sd_escape(r#"[x="y"]\"#), r#"[x=\"y\"\]\\"#);
        assert_eq!(sd_escape("ünïcode"), "ünïcode");
    }

    #[test]
    fn timestamps() {
        let ok =
            |s: &str, want: &str| assert_eq!(rfc5424_timestamp(s).as_deref(), Some(want), "{s}");
        ok("2024-05-01T10:00:00Z", "2024-05-01T10:00:00Z");
        ok("2024-05-01T10:00:00.1Z", "2024-05-01T10:00:00.1Z");
        ok("2024-05-01T10:00:00.123456Z", "2024-05-01T10:00:00.123456Z");
        ok(
            "2024-05-01T10:00:00.123456789Z",
            "2024-05-01T10:00:00.123456Z",
        );
        ok("2024-05-01t10:00:00z", "2024-05-01T10:00:00Z");
        ok("2024-05-01T10:00:00-05:30", "2024-05-01T10:00:00-05:30");
        assert!(matches!(
            rfc5424_timestamp("2024-05-01T10:00:00Z"),
            Some(Cow::Borrowed(_))
        ));
        for bad in [
            "",
            "2024-05-01",
            "2024-05-01 10:00:00Z",
            "2024-13-01T10:00:00Z",
            "2024-05-01T24:00:00Z",
            "2024-05-01T10:00:60Z",
            "2024-05-01T10:00:00.Z",
            "2024-05-01T10:00:00",
            "2024-05-01T10:00:00+0200",
            "2024-05-01T10:00:00Zjunk",
            "2024-05-01T10:00:00+25:00",
            "2024-05-01T10:00:00\u{e9}",
            "\u{e9}024-05-01T10:00:00Z",
        ] {
            assert_eq!(rfc5424_timestamp(bad), None, "{bad:?}");
        }
        assert!(rfc5424_timestamp(&now_timestamp()).is_some());
    }

    #[test]
    fn octet_counting() {
        let mut out = Vec::new();
        octet_frame(&mut out, "<110>1 - - - - - - é".as_bytes());
        octet_frame(&mut out, b"x");
        assert_eq!(out, "21 <110>1 - - - - - - é1 x".as_bytes());
    }

    #[test]
    fn header_fields() {
        assert_eq!(header_field("web 1\u{e9}.example", 255), "web1.example");
        assert_eq!(header_field("", 255), "-");
        assert_eq!(header_field(&"a".repeat(300), 255).len(), 255);
        assert_eq!(host_of("[::1]:514"), "::1");
        assert_eq!(host_of("logs.example.org:6514"), "logs.example.org");
    }

    #[test]
    fn frame_encoding() {
        let mut out = Vec::new();
        encode_frame(&mut out, 2, "syslog", b"hello");
        encode_frame(&mut out, 3, "close", b"");
        assert_eq!(out, b"2 syslog 5 hello\n3 close 0\n");
    }

    fn frames_of(chunks: &[&[u8]]) -> Result<Vec<RelpFrame>, String> {
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
            assert_eq!(
                parse_frame(part),
                Ok(None),
                "{:?}",
                String::from_utf8_lossy(part)
            );
        }
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
            .contains("syslog command"));
        assert!(check_offers(b"relp_version=1\ncommands=syslog")
            .unwrap_err()
            .contains("version"));
    }

    // --- a tiny RELP server, scripted per connection --------------------------------------

    struct Peer {
        sock: TcpStream,
        reader: RelpReader,
    }

    impl Peer {
        fn frame(&mut self) -> Option<RelpFrame> {
            let mut buf = [0u8; 4096];
            loop {
                if let Some(f) = self.reader.next_frame().unwrap() {
                    return Some(f);
                }
                match self.sock.read(&mut buf) {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.reader.push(&buf[..n]),
                }
            }
        }

        fn send(&mut self, txnr: u32, cmd: &str, data: &[u8]) {
            let mut out = Vec::new();
            encode_frame(&mut out, txnr, cmd, data);
            let _ = self.sock.write_all(&out);
        }

        /// Answers the open like librelp; returns false if the client sent something else.
        fn accept_open(&mut self) -> bool {
            match self.frame() {
                Some(f) if f.command == "open" && f.txnr == 1 => {
                    assert_eq!(f.data, RELP_OFFERS);
                    self.send(
                        1,
                        "rsp",
                        b"200 OK\nrelp_version=0\nrelp_software=fake\ncommands=syslog",
                    );
                    true
                }
                _ => false,
            }
        }
    }

    /// Serves one scripted connection per script; returns the address and what each script
    /// returned.
    fn server<T: Send + 'static>(scripts: Vec<Script<T>>) -> (String, JoinHandle<Vec<T>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let h = thread::spawn(move || {
            let mut out = Vec::new();
            for s in scripts {
                let (sock, _) = l.accept().unwrap();
                sock.set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                let mut p = Peer {
                    sock,
                    reader: RelpReader::default(),
                };
                out.push(s(&mut p));
            }
            out
        });
        (addr, h)
    }

    type Script<T> = Box<dyn FnOnce(&mut Peer) -> T + Send>;

    /// How a scripted server ends a connection when `answer` says `None`.
    #[derive(Clone, Copy)]
    enum End {
        /// Stops answering, half-closes and reads the rest (the client sees the answers sent
        /// before, then EOF).
        Graceful,
        /// The same after a `serverclose` hint, as librelp does when it shuts down.
        Hint,
        /// Closes with the client's frames unread: the kernel resets the connection, which can
        /// discard answers not yet read by the client.
        Abort,
    }

    /// Answers syslog frames with `answer(i)` (i counts from 0); `None` ends the connection as
    /// `end` says. Returns the records answered, in order.
    fn relp_script(
        answer: impl Fn(usize) -> Option<&'static str> + Send + 'static,
        end: End,
    ) -> Script<Vec<Vec<u8>>> {
        Box::new(move |p: &mut Peer| {
            let mut got = Vec::new();
            if !p.accept_open() {
                return got;
            }
            let mut want_txnr = 2;
            while let Some(f) = p.frame() {
                if f.command == "close" {
                    p.send(f.txnr, "rsp", b"200 OK");
                    break;
                }
                assert_eq!(f.command, "syslog");
                assert_eq!(f.txnr, want_txnr, "txnrs go up by one");
                want_txnr += 1;
                match answer(got.len()) {
                    Some(a) => p.send(f.txnr, "rsp", a.as_bytes()),
                    None => {
                        if matches!(end, End::Hint) {
                            p.send(0, "serverclose", b"");
                        }
                        if !matches!(end, End::Abort) {
                            let _ = p.sock.shutdown(std::net::Shutdown::Write);
                            while p.frame().is_some() {}
                        }
                        break;
                    }
                }
                got.push(f.data);
            }
            got
        })
    }

    fn relp_dest(addr: &str) -> SyslogDest {
        SyslogDest::new("test", &cfg(addr, SyslogTransport::Relp), "web-1").unwrap()
    }

    fn batch(n: u64) -> Vec<Line> {
        (1..=n).map(rec).collect()
    }

    fn id_of(msg: &[u8]) -> String {
        let m = String::from_utf8_lossy(msg);
        let i = m.find(" id=\"").unwrap() + 5;
        m[i..].split('"').next().unwrap().to_string()
    }

    #[test]
    fn relp_pipelines_a_batch_larger_than_the_window() {
        let (addr, h) = server(vec![relp_script(|_| Some("200 OK"), End::Graceful)]);
        let mut d = relp_dest(&addr);
        let b = batch(300);
        assert_eq!(d.send(&b).unwrap(), Outcome::delivered());
        let b2: Vec<Line> = (301..=310).map(rec).collect();
        assert_eq!(d.send(&b2).unwrap(), Outcome::delivered());
        drop(d); // sends close
        let got = h.join().unwrap().remove(0);
        assert_eq!(got.len(), 310);
        for (i, m) in got.iter().enumerate() {
            assert_eq!(id_of(m), format!("ev-{}", i + 1));
            assert!(m.ends_with(&rec(i as u64 + 1).bytes));
        }
    }

    #[test]
    fn relp_500_rejects_that_record_only() {
        let (addr, h) = server(vec![relp_script(
            |i| {
                Some(if i == 3 || i == 200 {
                    "500 record refused by policy"
                } else {
                    "200 OK"
                })
            },
            End::Graceful,
        )]);
        let mut d = relp_dest(&addr);
        let o = d.send(&batch(250)).unwrap();
        assert_eq!(o.retry, Vec::<usize>::new());
        assert_eq!(
            o.rejected,
            vec![
                (
                    3,
                    "RELP server answered 500 record refused by policy".to_string()
                ),
                (
                    200,
                    "RELP server answered 500 record refused by policy".to_string()
                )
            ]
        );
        drop(d);
        assert_eq!(h.join().unwrap()[0].len(), 250);
    }

    #[test]
    fn relp_serverclose_mid_batch_retries_only_the_unanswered() {
        let (addr, h) = server(vec![relp_script(
            |i| (i < 10).then_some("200 OK"),
            End::Hint,
        )]);
        let mut d = relp_dest(&addr);
        let o = d.send(&batch(50)).unwrap();
        assert_eq!(o.rejected, vec![]);
        assert_eq!(o.retry, (10..50).collect::<Vec<_>>());
        assert_eq!(h.join().unwrap()[0].len(), 10);
    }

    #[test]
    fn relp_disconnect_mid_batch_retries_only_the_unanswered() {
        let (addr, h) = server(vec![relp_script(
            |i| (i < 130).then_some("200 OK"),
            End::Graceful,
        )]);
        let mut d = relp_dest(&addr);
        let o = d.send(&batch(300)).unwrap();
        assert_eq!(o.retry, (130..300).collect::<Vec<_>>());
        assert_eq!(h.join().unwrap()[0].len(), 130);
        // The server is gone: the rest fails as a whole, with the place in the reason.
        let rest: Vec<Line> = o.retry.iter().map(|&i| rec(i as u64 + 1)).collect();
        match d.send(&rest) {
            Err(SendError::Retry { reason, .. }) => {
                assert!(
                    reason.contains(&addr) && reason.contains("RELP"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn relp_reset_mid_batch_never_loses_a_record() {
        // A reset can swallow answers the server sent: those records go again (duplicates),
        // but everything not retried was answered.
        let (addr, h) = server(vec![relp_script(
            |i| (i < 100).then_some("200 OK"),
            End::Abort,
        )]);
        let mut d = relp_dest(&addr);
        let o = match d.send(&batch(300)) {
            Ok(o) => o,
            Err(SendError::Retry { .. }) => Outcome {
                retry: (0..300).collect(),
                ..Outcome::default()
            },
            Err(e) => panic!("{e:?}"),
        };
        let answered = h.join().unwrap()[0].len();
        assert_eq!(answered, 100);
        let first_retry = o.retry[0];
        assert!(first_retry <= 100);
        assert_eq!(o.retry, (first_retry..300).collect::<Vec<_>>());
        assert!(o.rejected.is_empty());
    }

    #[test]
    fn relp_disconnect_before_any_answer_is_a_whole_retry() {
        let (addr, h) = server(vec![relp_script(|_| None, End::Graceful)]);
        let mut d = relp_dest(&addr);
        match d.send(&batch(5)) {
            Err(SendError::Retry { reason, .. }) => assert!(reason.contains("closed"), "{reason}"),
            other => panic!("{other:?}"),
        }
        h.join().unwrap();
    }

    #[test]
    fn relp_stale_session_is_reopened_transparently() {
        // First connection: answers the first batch, then the server restarts (closes).
        let first: Script<Vec<Vec<u8>>> = Box::new(|p: &mut Peer| {
            let mut got = Vec::new();
            assert!(p.accept_open());
            while got.len() < 3 {
                let f = p.frame().unwrap();
                p.send(f.txnr, "rsp", b"200 OK");
                got.push(f.data);
            }
            got
        });
        let (addr, h) = server(vec![first, relp_script(|_| Some("200 OK"), End::Graceful)]);
        let mut d = relp_dest(&addr);
        assert_eq!(d.send(&batch(3)).unwrap(), Outcome::delivered());
        let b2: Vec<Line> = (4..=8).map(rec).collect();
        assert_eq!(d.send(&b2).unwrap(), Outcome::delivered());
        drop(d);
        let got = h.join().unwrap();
        assert_eq!(got[0].len(), 3);
        assert_eq!(got[1].len(), 5);
        assert_eq!(id_of(&got[1][0]), "ev-4");
    }

    #[test]
    fn relp_refused_open_and_garbage_answers() {
        let refuse: Script<()> = Box::new(|p: &mut Peer| {
            p.frame();
            p.send(1, "rsp", b"500 error 10003 on connect");
        });
        let garbage: Script<()> = Box::new(|p: &mut Peer| {
            assert!(p.accept_open());
            p.frame();
            let _ = p.sock.write_all(b"2 rsp 6 200 OK\n\x00\x01garbage\n");
            p.frame();
        });
        let wrong_txnr: Script<()> = Box::new(|p: &mut Peer| {
            assert!(p.accept_open());
            p.frame();
            p.send(77, "rsp", b"200 OK");
            p.frame();
        });
        let bad_code: Script<()> = Box::new(|p: &mut Peer| {
            assert!(p.accept_open());
            let f = p.frame().unwrap();
            p.send(f.txnr, "rsp", b"OK!");
            p.frame();
        });
        let (addr, h) = server(vec![refuse, garbage, wrong_txnr, bad_code]);
        let mut d = relp_dest(&addr);
        let reason = |r: Result<Outcome, SendError>| match r {
            Err(SendError::Retry { reason, .. }) => reason,
            other => panic!("{other:?}"),
        };
        let r = reason(d.send(&batch(1)));
        assert!(
            r.contains("refused the session: 500 error 10003 on connect"),
            "{r}"
        );
        // Garbage after the first answer: the first is acknowledged, the second goes again.
        let o = d.send(&batch(2)).unwrap();
        assert_eq!(o.retry, vec![1]);
        let r = reason(d.send(&batch(1)));
        assert!(r.contains("txnr 77"), "{r}");
        let r = reason(d.send(&batch(1)));
        assert!(r.contains("3-digit code"), "{r}");
        drop(d);
        h.join().unwrap();
    }

    #[test]
    fn relp_silent_server_times_out() {
        let (tx, rx) = mpsc::channel::<()>();
        let silent: Script<()> = Box::new(move |p: &mut Peer| {
            assert!(p.accept_open());
            let _ = rx.recv();
        });
        let (addr, h) = server(vec![silent]);
        let mut c = cfg(&addr, SyslogTransport::Relp);
        c.timeout = Duration::from_millis(300);
        let mut d = SyslogDest::new("test", &c, "web-1").unwrap();
        match d.send(&batch(2)) {
            Err(SendError::Retry { reason, .. }) => {
                assert!(reason.contains("no answer"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        tx.send(()).unwrap();
        h.join().unwrap();
    }

    #[test]
    fn refused_connection_says_where() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        for t in [SyslogTransport::Tcp, SyslogTransport::Relp] {
            let mut d = SyslogDest::new("test", &cfg(&addr, t), "web-1").unwrap();
            match d.send(&batch(1)) {
                Err(SendError::Retry { reason, .. }) => {
                    assert!(
                        reason.contains(&addr) && reason.contains("connecting"),
                        "{reason}"
                    )
                }
                other => panic!("{other:?}"),
            }
        }
    }

    /// Reads octet-counted messages until the client closes or `n` arrived.
    fn read_octet_counted(sock: &mut TcpStream, n: usize) -> Vec<Vec<u8>> {
        let mut buf = Vec::new();
        let mut out = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            while let Some(sp) = buf.iter().position(|&c| c == b' ') {
                let len: usize = std::str::from_utf8(&buf[..sp]).unwrap().parse().unwrap();
                if buf.len() < sp + 1 + len {
                    break;
                }
                out.push(buf[sp + 1..sp + 1 + len].to_vec());
                buf.drain(..sp + 1 + len);
            }
            if out.len() >= n {
                return out;
            }
            match sock.read(&mut chunk) {
                Ok(0) | Err(_) => return out,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
        }
    }

    #[test]
    fn tcp_octet_counting_and_reconnect_after_the_server_closed() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let (closed_tx, closed_rx) = mpsc::channel();
        let h = thread::spawn(move || {
            let (mut s1, _) = l.accept().unwrap();
            let first = read_octet_counted(&mut s1, 3);
            drop(s1);
            closed_tx.send(()).unwrap();
            let (mut s2, _) = l.accept().unwrap();
            (first, read_octet_counted(&mut s2, 2))
        });
        let mut d = SyslogDest::new("test", &cfg(&addr, SyslogTransport::Tcp), "web-1").unwrap();
        assert_eq!(d.send(&batch(3)).unwrap(), Outcome::delivered());
        closed_rx.recv().unwrap();
        // The kept connection was closed by the server: the check before writing notices it
        // and the batch goes on a new connection instead of into the dead one.
        let b2: Vec<Line> = (4..=5).map(rec).collect();
        assert_eq!(d.send(&b2).unwrap(), Outcome::delivered());
        drop(d);
        let (first, second) = h.join().unwrap();
        let mut h = header();
        h.procid = std::process::id().to_string();
        assert_eq!(
            first,
            batch(3).iter().map(|l| h.message(l)).collect::<Vec<_>>()
        );
        assert_eq!(
            second.iter().map(|m| id_of(m)).collect::<Vec<_>>(),
            ["ev-4", "ev-5"]
        );
    }

    #[test]
    fn tls_material_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no pem here\n").unwrap();
        let mut c = cfg("127.0.0.1:6514", SyslogTransport::Tls);
        c.tls = Some(TlsClientConfig {
            ca: Some(dir.path().join("missing.pem")),
            ..Default::default()
        });
        let e = SyslogDest::new("s", &c, "h").err().unwrap();
        assert!(
            e.contains("missing.pem") && e.contains("syslog over TLS to 127.0.0.1:6514"),
            "{e}"
        );
        c.tls = Some(TlsClientConfig {
            ca: Some(empty.clone()),
            ..Default::default()
        });
        let e = SyslogDest::new("s", &c, "h").err().unwrap();
        assert!(
            e.contains("empty.pem") && e.contains("no PEM certificate"),
            "{e}"
        );
    }
}
