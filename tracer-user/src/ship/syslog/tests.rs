//! A syslog sink against tiny scripted servers: RELP sessions that answer, refuse, reset,
//! close, go stale or stay silent; plain TCP with a receiver that restarts; TLS material errors.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    thread::{self, JoinHandle},
    time::Duration,
};

use super::{
    relp::RELP_OFFERS,
    rfc5424::tests::{header, line},
    *,
};
use crate::{
    config::TlsClientConfig,
    ship::{Line, Outcome, SendError, Stream},
};

fn rec(i: u64) -> Line {
    line(
        Stream::Access,
        i,
        &format!(
            r#"{{"@timestamp":"2024-05-01T10:00:00.123456Z","event":{{"sequence":{i},"id":"ev-{i}","kind":"event"}},"n":{i}}}"#
        ),
    )
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
    // The texts are matched on by operators: exact.
    let r = reason(d.send(&batch(1)));
    assert_eq!(
        r,
        format!("RELP to {addr}: the server refused the session: 500 error 10003 on connect")
    );
    // Garbage after the first answer: the first is acknowledged, the second goes again.
    let o = d.send(&batch(2)).unwrap();
    assert_eq!(o.retry, vec![1]);
    let r = reason(d.send(&batch(1)));
    assert_eq!(
        r,
        format!("RELP to {addr}: the server answered txnr 77, which is not in flight")
    );
    let r = reason(d.send(&batch(1)));
    assert_eq!(
        r,
        format!("RELP to {addr}: malformed RELP answer: expected a 3-digit code, got \"OK!\"")
    );
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
    let e = SyslogDest::new("s", &c, "h").err().unwrap().to_string();
    assert!(
        e.contains("missing.pem") && e.contains("syslog over TLS to 127.0.0.1:6514"),
        "{e}"
    );
    c.tls = Some(TlsClientConfig {
        ca: Some(empty.clone()),
        ..Default::default()
    });
    let e = SyslogDest::new("s", &c, "h").err().unwrap().to_string();
    assert!(
        e.contains("empty.pem") && e.contains("no PEM certificate"),
        "{e}"
    );
}
