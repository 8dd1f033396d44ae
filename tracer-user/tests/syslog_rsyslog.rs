//! The syslog sink against a real rsyslogd: plain TCP (imptcp), TLS (imtcp with the gtls driver),
//! RELP and RELP over TLS with a client certificate (imrelp). Each test starts its own rsyslogd on
//! free loopback ports with a CA made by openssl at test time, sends records through
//! `SyslogDest`, stops rsyslogd and compares every record rsyslog wrote (the MSG kept raw) with
//! what was sent: the exact set of event ids, the count, and the header fields.
//!
//! Needs `rsyslogd` with the relp and gnutls modules (`rsyslog`, `rsyslog-relp`,
//! `rsyslog-gnutls`; `cargo xtask bootstrap` installs them) and `openssl`; without them the
//! tests fail and say so. No root needed.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use sparbar::{
    config::{SyslogSinkConfig, SyslogTransport, TlsClientConfig},
    ship::{
        syslog::{sd_escape, SyslogDest, SD_ID},
        Destination, Line, SendError, Stream,
    },
};

const HOST: &str = "sparbar-test-host";
/// What starts every record in rsyslog's output files (see `Rsyslog::received`).
const MARK: &str = "@@rec@@";

fn run_ok(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn require_tools() {
    for (tool, arg, pkg) in [
        ("rsyslogd", "-v", "rsyslog rsyslog-relp rsyslog-gnutls"),
        ("openssl", "version", "openssl"),
    ] {
        let ok = Command::new(tool)
            .arg(arg)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            ok,
            "{tool} is missing: these tests drive a real rsyslogd; install it with `cargo xtask bootstrap` (or apt-get install {pkg})"
        );
    }
}

/// A CA, a server certificate for localhost/127.0.0.1 and a client certificate, all made now.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    /// A CA that signed nothing here, to see verification fail.
    other_ca: PathBuf,
}

fn make_pki(dir: &Path) -> Pki {
    let ossl = |args: &[&str], what: &str| {
        run_ok(Command::new("openssl").current_dir(dir).args(args), what);
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    for (name, cn) in [("ca", "sparbar test CA"), ("other-ca", "unrelated CA")] {
        let mut a = vec!["req", "-x509"];
        a.extend(ec);
        let (key, pem, subj) = (
            format!("{name}.key"),
            format!("{name}.pem"),
            format!("/CN={cn}"),
        );
        a.extend([
            "-keyout",
            &key,
            "-out",
            &pem,
            "-days",
            "2",
            "-subj",
            &subj,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        ossl(&a, "making a test CA");
    }
    for (name, cn, eku, san) in [
        (
            "server",
            "localhost",
            "serverAuth",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        ),
        ("client", "sparbar-agent", "clientAuth", ""),
    ] {
        let ext = format!(
            "{san}basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage={eku}\n"
        );
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        let (key, csr, pem, subj, extf) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("/CN={cn}"),
            format!("{name}.ext"),
        );
        let mut a = vec!["req", "-new"];
        a.extend(ec);
        a.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        ossl(&a, "making a test key");
        ossl(
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-set_serial",
                if name == "server" { "2" } else { "3" },
                "-days",
                "2",
                "-extfile",
                &extf,
                "-out",
                &pem,
            ],
            "signing a test certificate",
        );
    }
    Pki {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
        other_ca: dir.join("other-ca.pem"),
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Ports {
    tcp: u16,
    tls: u16,
    relp: u16,
    relp_tls: u16,
}

/// One rsyslogd of our own: config, work directory and output files in a temporary directory.
struct Rsyslog {
    dir: tempfile::TempDir,
    pki: Pki,
    ports: Ports,
    child: Option<Child>,
    starts: u32,
}

impl Rsyslog {
    fn start() -> Rsyslog {
        require_tools();
        let dir = tempfile::tempdir().unwrap();
        let pki = make_pki(dir.path());
        std::fs::create_dir(dir.path().join("work")).unwrap();
        let ports = Ports {
            tcp: free_port(),
            tls: free_port(),
            relp: free_port(),
            relp_tls: free_port(),
        };
        let d = dir.path().display();
        let (ca, cert, key) = (
            pki.ca.display(),
            pki.server_cert.display(),
            pki.server_key.display(),
        );
        // The main queue is Direct: imrelp answers 200 OK only after omfile wrote the message,
        // so a killed rsyslogd cannot take acknowledged records with it.
        let conf = format!(
            r#"global(workDirectory="{d}/work" maxMessageSize="64k"
  DefaultNetstreamDriver="gtls"
  DefaultNetstreamDriverCAFile="{ca}" DefaultNetstreamDriverCertFile="{cert}" DefaultNetstreamDriverKeyFile="{key}")
main_queue(queue.type="Direct")
module(load="imptcp")
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="anon")
module(load="imrelp")
template(name="raw" type="string" string="{MARK}%pri%|%timereported:::date-rfc3339%|%hostname%|%app-name%|%procid%|%msgid%|%structured-data%|%msg%\n")
ruleset(name="tcp") {{ action(type="omfile" file="{d}/tcp.log" template="raw") }}
ruleset(name="tls") {{ action(type="omfile" file="{d}/tls.log" template="raw") }}
ruleset(name="relp") {{ action(type="omfile" file="{d}/relp.log" template="raw") }}
ruleset(name="relptls") {{ action(type="omfile" file="{d}/relptls.log" template="raw") }}
input(type="imptcp" address="127.0.0.1" port="{}" ruleset="tcp")
input(type="imtcp" address="127.0.0.1" port="{}" ruleset="tls")
input(type="imrelp" address="127.0.0.1" port="{}" ruleset="relp")
input(type="imrelp" address="127.0.0.1" port="{}" ruleset="relptls" tls="on"
  tls.caCert="{ca}" tls.myCert="{cert}" tls.myPrivKey="{key}" tls.authMode="certvalid")
"#,
            ports.tcp, ports.tls, ports.relp, ports.relp_tls
        );
        std::fs::write(dir.path().join("rsyslog.conf"), conf).unwrap();
        let check = Command::new("rsyslogd")
            .arg("-N1")
            .arg("-f")
            .arg(dir.path().join("rsyslog.conf"))
            .output()
            .expect("running rsyslogd -N1");
        assert!(
            check.status.success(),
            "rsyslogd refused the test config (are rsyslog-relp and rsyslog-gnutls installed? `cargo xtask bootstrap`):\n{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let mut r = Rsyslog {
            dir,
            pki,
            ports,
            child: None,
            starts: 0,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none());
        self.starts += 1;
        let p = self.dir.path();
        let log = std::fs::File::create(p.join(format!("rsyslogd-{}.out", self.starts))).unwrap();
        let child = Command::new("rsyslogd")
            .arg("-n")
            .arg("-f")
            .arg(p.join("rsyslog.conf"))
            .arg("-i")
            .arg(p.join("rsyslogd.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting rsyslogd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        for port in [
            self.ports.tcp,
            self.ports.tls,
            self.ports.relp,
            self.ports.relp_tls,
        ] {
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                    panic!("rsyslogd exited ({st}) while starting: {}", self.output());
                }
                assert!(
                    Instant::now() < deadline,
                    "rsyslogd does not listen on 127.0.0.1:{port}: {}",
                    self.output()
                );
                thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn output(&self) -> String {
        (1..=self.starts)
            .map(|i| {
                std::fs::read_to_string(self.dir.path().join(format!("rsyslogd-{i}.out")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn kill9(&mut self) {
        let mut c = self.child.take().expect("rsyslogd runs");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// SIGTERM and wait: rsyslogd closes its sessions (imrelp sends serverclose).
    fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        run_ok(
            Command::new("kill").args(["-TERM", &c.id().to_string()]),
            "stopping rsyslogd",
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while c.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("rsyslogd did not stop on SIGTERM: {}", self.output());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn dest(&self, transport: SyslogTransport, tls: Option<TlsClientConfig>) -> SyslogDest {
        let port = match (transport, tls.is_some()) {
            (SyslogTransport::Tcp, _) => self.ports.tcp,
            (SyslogTransport::Tls, _) => self.ports.tls,
            (SyslogTransport::Relp, false) => self.ports.relp,
            (SyslogTransport::Relp, true) => self.ports.relp_tls,
        };
        // RELP over TLS goes by name (localhost may resolve to ::1 first, where nothing
        // listens); the others by address, verified against the certificate's IP SAN.
        let host = if transport == SyslogTransport::Relp && tls.is_some() {
            "localhost"
        } else {
            "127.0.0.1"
        };
        let cfg = SyslogSinkConfig {
            address: format!("{host}:{port}"),
            transport,
            tls,
            app_name: "sparbar".into(),
            facility: 13,
            timeout: Duration::from_secs(5),
        };
        SyslogDest::new("rsyslog-test", &cfg, HOST).expect("SyslogDest::new")
    }

    fn trust(&self) -> TlsClientConfig {
        TlsClientConfig {
            ca: Some(self.pki.ca.clone()),
            ..Default::default()
        }
    }

    /// Waits until rsyslog wrote `n` lines to `file` (TCP and TLS have no acknowledgement: a
    /// record written to the socket may still be on its way when the sender is done).
    fn wait_lines(&self, file: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = std::fs::read(self.dir.path().join(file))
                .map(|b| b.iter().filter(|&&c| c == b'\n').count())
                .unwrap_or(0);
            if got >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "rsyslog wrote {got} of {n} records to {file}: {}",
                self.output()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// What rsyslog wrote for one input, as (header fields, MSG), and how many records it left
    /// torn. Every record starts with [`MARK`] and ends with a newline; omfile writes its buffer
    /// when full, so a rsyslogd killed mid-write leaves the head of a record without its tail,
    /// and the next record it writes after the restart follows on the same line. Such a record
    /// was never acknowledged (the sender sends it again); it is counted here, never taken for
    /// a received one.
    fn received(&self, file: &str) -> (Vec<Received>, usize) {
        let text = std::fs::read_to_string(self.dir.path().join(file)).unwrap_or_default();
        let mut torn = 0;
        let mut got = Vec::new();
        let mut pieces = text.split(MARK);
        assert_eq!(
            pieces.next(),
            Some(""),
            "{file} does not start with a record"
        );
        for piece in pieces {
            let Some(l) = piece.strip_suffix('\n') else {
                torn += 1;
                continue;
            };
            assert!(!l.contains('\n'), "a record on two lines: {l:?}");
            let f: Vec<&str> = l.splitn(8, '|').collect();
            assert_eq!(f.len(), 8, "unexpected line from rsyslog: {l:?}");
            got.push(Received {
                pri: f[0].into(),
                timestamp: f[1].into(),
                host: f[2].into(),
                app: f[3].into(),
                procid: f[4].into(),
                msgid: f[5].into(),
                sd: f[6].into(),
                msg: f[7].into(),
            });
        }
        (got, torn)
    }

    /// [`Rsyslog::received`] of a run without failures: no record may be torn.
    fn received_whole(&self, file: &str) -> Vec<Received> {
        let (got, torn) = self.received(file);
        assert_eq!(
            torn, 0,
            "rsyslogd tore {torn} records in {file} without being killed"
        );
        got
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[derive(Debug)]
struct Received {
    pri: String,
    timestamp: String,
    host: String,
    app: String,
    procid: String,
    msgid: String,
    sd: String,
    msg: String,
}

/// Records shaped like the sealed ones: `event.sequence` first, an id, a kind; some with
/// characters that need escaping in structured data, and non-ASCII text.
fn records(stream: Stream, n: u64, tag: &str) -> Vec<Line> {
    (1..=n)
        .map(|seq| {
            let kind = if stream == Stream::Security && seq % 7 == 0 {
                "alert"
            } else {
                "event"
            };
            let id = if seq % 50 == 0 {
                format!("{tag}-{seq}-\"q\"]\\")
            } else {
                format!("{tag}-{seq}")
            };
            let v = serde_json::json!({
                "event": {"sequence": seq, "id": id, "kind": kind, "dataset": format!("sparbar.{}", stream.name())},
                "@timestamp": format!("2024-05-01T10:{:02}:{:02}.{:06}Z", seq / 60 % 60, seq % 60, seq),
                "user": {"name": "Åsa Öberg | \"x\" [y]"},
                "url": {"path": format!("/api/pupils/{seq}")},
            });
            Line {
                stream,
                seq,
                bytes: serde_json::to_vec(&v).unwrap(),
            }
        })
        .collect()
}

/// Checks every received message against what was sent; returns the number of duplicates.
fn check(sent: &[Line], got: &[Received], exact: bool) -> usize {
    let by_id: BTreeMap<String, &Line> = sent
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_slice(&l.bytes).unwrap();
            (v["event"]["id"].as_str().unwrap().to_string(), l)
        })
        .collect();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for r in got {
        let v: Value = serde_json::from_str(&r.msg)
            .unwrap_or_else(|e| panic!("MSG is not the JSON record ({e}): {r:?}"));
        let id = v["event"]["id"].as_str().unwrap().to_string();
        let l = by_id
            .get(&id)
            .unwrap_or_else(|| panic!("received an id never sent: {id}"));
        assert_eq!(r.msg.as_bytes(), &l.bytes[..], "MSG arrives byte for byte");
        let kind = v["event"]["kind"].as_str().unwrap();
        let severity = match (kind, l.stream) {
            ("alert", _) => 4,
            (_, Stream::Security) => 5,
            (_, Stream::Access) => 6,
        };
        assert_eq!(r.pri, (13 * 8 + severity).to_string(), "{r:?}");
        assert_eq!(r.timestamp, v["@timestamp"].as_str().unwrap(), "{r:?}");
        assert_eq!(r.host, HOST);
        assert_eq!(r.app, "sparbar");
        assert_eq!(r.procid, std::process::id().to_string());
        assert_eq!(r.msgid, l.stream.name());
        assert_eq!(
            r.sd,
            format!("[{SD_ID} id=\"{}\" seq=\"{}\"]", sd_escape(&id), l.seq),
            "{r:?}"
        );
        *seen.entry(id).or_default() += 1;
    }
    let missing: Vec<&String> = by_id.keys().filter(|k| !seen.contains_key(*k)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} records never arrived, e.g. {:?}",
        missing.len(),
        sent.len(),
        &missing[..missing.len().min(5)]
    );
    let sent_ids: BTreeSet<&String> = by_id.keys().collect();
    let got_ids: BTreeSet<&String> = seen.keys().collect();
    assert_eq!(sent_ids, got_ids);
    let dups = got.len() - sent.len();
    if exact {
        assert_eq!(got.len(), sent.len(), "no duplicates without failures");
    }
    dups
}

#[derive(Default, Debug)]
struct Delivery {
    failures: usize,
    /// Sends answered in part (`Outcome::retry` not empty).
    partial: usize,
    resent: usize,
    last_reason: String,
}

/// Delivers `lines` as the worker does: a failed batch goes again after a pause, and of a
/// partly answered batch only the records listed in `Outcome::retry`.
fn deliver(
    dest: &mut SyslogDest,
    lines: &[Line],
    batch: usize,
    progress: &AtomicUsize,
) -> Delivery {
    let mut d = Delivery::default();
    let deadline = Instant::now() + Duration::from_secs(40);
    for chunk in lines.chunks(batch) {
        let mut pending: Vec<Line> = chunk.to_vec();
        loop {
            assert!(
                Instant::now() < deadline,
                "delivery did not finish; last failure: {}",
                d.last_reason
            );
            match dest.send(&pending) {
                Ok(o) => {
                    assert!(o.rejected.is_empty(), "rsyslog rejected: {:?}", o.rejected);
                    if o.retry.is_empty() {
                        break;
                    }
                    d.failures += 1;
                    d.partial += 1;
                    d.resent += o.retry.len();
                    d.last_reason = format!("{} of {} to retry", o.retry.len(), pending.len());
                    pending = o.retry.iter().map(|&i| pending[i].clone()).collect();
                }
                Err(SendError::Retry { reason, .. }) => {
                    d.failures += 1;
                    d.resent += pending.len();
                    d.last_reason = reason;
                    thread::sleep(Duration::from_millis(50));
                }
                Err(SendError::Reject { reason }) => panic!("batch rejected: {reason}"),
            }
        }
        progress.fetch_add(chunk.len(), Ordering::SeqCst);
    }
    d
}

fn send_all(
    r: &Rsyslog,
    transport: SyslogTransport,
    tls: Option<TlsClientConfig>,
    lines: &[Line],
) -> Delivery {
    let mut dest = r.dest(transport, tls);
    let d = deliver(&mut dest, lines, 500, &AtomicUsize::new(0));
    assert_eq!(
        d.failures,
        0,
        "failures against a healthy rsyslogd: {}\n{}",
        d.last_reason,
        r.output()
    );
    d
}

#[test]
fn tcp_delivers_every_record_exactly_once() {
    let mut r = Rsyslog::start();
    let mut lines = records(Stream::Access, 2000, "tcp");
    lines.extend(records(Stream::Security, 500, "tcp-sec"));
    send_all(&r, SyslogTransport::Tcp, None, &lines);
    r.wait_lines("tcp.log", lines.len());
    r.stop();
    check(&lines, &r.received_whole("tcp.log"), true);
}

#[test]
fn tls_delivers_every_record_exactly_once() {
    let mut r = Rsyslog::start();
    let lines = records(Stream::Access, 2000, "tls");
    send_all(&r, SyslogTransport::Tls, Some(r.trust()), &lines);
    r.wait_lines("tls.log", lines.len());
    r.stop();
    check(&lines, &r.received_whole("tls.log"), true);
}

#[test]
fn tls_refuses_a_server_it_cannot_verify() {
    let r = Rsyslog::start();
    let wrong_ca = TlsClientConfig {
        ca: Some(r.pki.other_ca.clone()),
        ..Default::default()
    };
    let wrong_name = TlsClientConfig {
        server_name: Some("logs.example.org".into()),
        ..r.trust()
    };
    for (tls, want) in [
        (wrong_ca, "UnknownIssuer"),
        (wrong_name, "not valid for name"),
    ] {
        let mut dest = r.dest(SyslogTransport::Tls, Some(tls));
        match dest.send(&records(Stream::Access, 1, "x")) {
            Err(SendError::Retry { reason, .. }) => {
                assert!(
                    reason.contains("TLS handshake")
                        && reason.contains(want)
                        && reason.contains(&format!("127.0.0.1:{}", r.ports.tls)),
                    "{reason}"
                )
            }
            other => panic!("expected a TLS failure, got {other:?}"),
        }
    }
}

#[test]
fn relp_delivers_every_record_exactly_once() {
    let mut r = Rsyslog::start();
    let mut lines = records(Stream::Security, 1500, "relp");
    lines.extend(records(Stream::Access, 1500, "relp-acc"));
    send_all(&r, SyslogTransport::Relp, None, &lines);
    r.stop();
    check(&lines, &r.received_whole("relp.log"), true);
}

#[test]
fn relp_over_tls_with_a_client_certificate() {
    let mut r = Rsyslog::start();
    let lines = records(Stream::Security, 2000, "relptls");
    let tls = TlsClientConfig {
        cert: Some(r.pki.client_cert.clone()),
        key: Some(r.pki.client_key.clone()),
        ..r.trust()
    };
    send_all(&r, SyslogTransport::Relp, Some(tls), &lines);
    // Without the client certificate the server (authMode certvalid) refuses the session.
    let mut anon = r.dest(SyslogTransport::Relp, Some(r.trust()));
    assert!(
        anon.send(&records(Stream::Security, 1, "anon")).is_err(),
        "rsyslog took RELP/TLS without a client certificate"
    );
    drop(anon);
    r.stop();
    check(&lines, &r.received_whole("relptls.log"), true);
}

#[test]
fn relp_loses_nothing_when_rsyslog_is_killed_and_restarted() {
    let mut r = Rsyslog::start();
    let lines = Arc::new(records(Stream::Security, 50_000, "kill"));
    let progress = Arc::new(AtomicUsize::new(0));
    let mut dest = r.dest(SyslogTransport::Relp, None);
    let sender = {
        let (lines, progress) = (lines.clone(), progress.clone());
        thread::spawn(move || deliver(&mut dest, &lines, 200, &progress))
    };
    let wait_for = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while progress.load(Ordering::SeqCst) < n && !sender.is_finished() {
            assert!(Instant::now() < deadline, "the sender is stuck below {n}");
            thread::sleep(Duration::from_millis(5));
        }
        assert!(
            !sender.is_finished(),
            "the sender finished before rsyslogd could be stopped under it"
        );
    };
    wait_for(10_000);
    r.kill9(); // mid-stream, acknowledgements in flight
    r.spawn();
    wait_for(30_000);
    r.stop(); // graceful: imrelp sends serverclose to the session
    r.spawn();
    let d = sender.join().expect("the sender panicked");
    r.stop();
    let (got, torn) = r.received("relp.log");
    // One kill can tear at most the one record omfile was writing.
    assert!(torn <= 1, "{torn} records torn by one kill");
    let dups = check(&lines, &got, false);
    println!(
        "rsyslogd killed once and stopped once mid-stream: {} records, {} received whole ({torn} torn by the kill), {dups} duplicates, {} failed sends ({} answered in part), {} records resent",
        lines.len(),
        got.len(),
        d.failures,
        d.partial,
        d.resent
    );
    assert!(
        d.failures >= 2,
        "the sender never noticed rsyslogd go away: {d:?}"
    );
}
