//! Privileged: the enforcement primitives against the real kernel. Loads the agent's kernel
//! programs through the library, attaches `enforce_egress` to the cgroup v2 root, and drives
//! real keep-alive connections on loopback: a blocked connection gets no more bytes from its
//! server while the others do, unblocking lets it (and new connections) through again, and
//! `enforce::destroy` resets a connection, blocked or not, so its client sees ECONNRESET.
//! Session tokens: a TLS edge server's requests that carry a blocked token are refused in the
//! kernel on new connections (no answer arrives, the hit is counted and reported), others are
//! answered, the application behind the edge is never scanned, and unblocking lets them through.
//!
//! Needs root; without it each test prints why it did nothing and passes (`cargo xtask test`
//! runs this as root). Anything else missing (cgroup v2, IPv6 on loopback, python3, openssl,
//! curl) fails.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use sparbar::{
    capture::decode::{decode, Event},
    capture::discovery::{Discovery, TargetSpec},
    capture::loader::{self, Kernel, LoadSettings},
    config::TargetMatch,
    enforce::{self, EnforceError},
    exchange::Tuple,
};
use tracer_common::{
    token_hash, C_ENFORCE_DROPPED, C_REFUSED_NO_TUPLE, C_REQUESTS_REFUSED, C_SSL_CALLS,
    C_TOKEN_SCANS, C_TOKEN_SCAN_BUDGET, C_TOKEN_SCAN_FAILED, DEFAULT_MAX_MESSAGE_BYTES,
    HIT_F_CONN_BLOCKED, HIT_F_TLS,
};

/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_secs(3);
/// Upper bound for things that must happen (TCP retransmission after an unblock, a reset).
const DEADLINE: Duration = Duration::from_secs(30);

fn is_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    eprintln!("SKIPPED {test}: it loads eBPF programs and needs root (`cargo xtask test` runs it as root)");
    false
}

fn kernel() -> Kernel {
    let mut k = loader::load(&LoadSettings {
        ring_buffer_size: 1 << 20,
        max_connections: 4096,
        max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        plaintext_ports: Vec::new(),
        comms: Vec::new(),
        cgroup_ids: Vec::new(),
    })
    .unwrap_or_else(|e| panic!("loading the kernel programs: {e}"));
    let cg = k
        .attach_enforce()
        .unwrap_or_else(|e| panic!("attaching the enforcement program: {e}"));
    eprintln!("enforce_egress attached to {}", cg.display());
    assert!(k.enforcing());
    assert_eq!(k.blocked_conns(), 0);
    k
}

fn drops(k: &Kernel) -> u64 {
    k.counters()[C_ENFORCE_DROPPED as usize]
}

/// The connection as the server sees it: its own address local, the client's as peer.
fn server_side(c: &TcpStream) -> Tuple {
    Tuple {
        local: c.peer_addr().unwrap(),
        peer: c.local_addr().unwrap(),
    }
}

/// Nothing arrives on `c` within `QUIET`.
fn assert_silent(c: &mut TcpStream, what: &str) {
    c.set_read_timeout(Some(QUIET)).unwrap();
    let mut buf = [0u8; 256];
    match c.read(&mut buf) {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) => {}
        Ok(n) => panic!(
            "{what}: {n} bytes arrived on a blocked connection: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => panic!("{what}: reading a blocked connection failed instead of waiting: {e}"),
    }
}

/// The next read on `c` fails with a connection reset.
fn assert_reset(c: &mut TcpStream, what: &str) {
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut buf = [0u8; 256];
    match c.read(&mut buf) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Ok(0) => panic!("{what}: the connection was closed (FIN), not reset"),
        Ok(n) => panic!("{what}: {n} bytes arrived instead of a reset"),
        Err(e) => panic!("{what}: expected ECONNRESET, got {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// IPv4: CPython's http.server, HTTP/1.1 keep-alive.
// ---------------------------------------------------------------------------------------------

const HTTP_SERVER: &str = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = ("ok " + self.path + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    daemon_threads = True
    def handle_error(self, request, client_address):
        pass  # destroyed connections end their handler with ECONNABORTED
s = S(("127.0.0.1", 0), H)
print("READY", s.server_address[1], flush=True)
s.serve_forever()
"#;

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_server() -> Server {
    let mut child = Command::new("python3")
        .args(["-c", HTTP_SERVER])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("starting python3 http.server (CPython 3 is needed): {e}"));
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line
        .strip_prefix("READY ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("python3 http.server did not print READY <port>: {line:?}"));
    Server {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
    }
}

/// A keep-alive HTTP/1.1 client on one connection.
struct Client {
    s: TcpStream,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        Client {
            s: TcpStream::connect(addr).unwrap(),
        }
    }

    fn send(&mut self, path: &str) {
        write!(self.s, "GET {path} HTTP/1.1\r\nHost: enforce.test\r\n\r\n").unwrap();
    }

    /// Reads one response and returns its body.
    fn response(&mut self, timeout: Duration) -> io::Result<String> {
        self.s.set_read_timeout(Some(timeout))?;
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_string();
                assert!(
                    head.starts_with("HTTP/1.1 200"),
                    "unexpected answer: {head}"
                );
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .expect("Content-Length");
                if got.len() >= end + 4 + len {
                    return Ok(String::from_utf8_lossy(&got[end + 4..end + 4 + len]).to_string());
                }
            }
            let n = self.s.read(&mut buf)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            got.extend_from_slice(&buf[..n]);
        }
    }

    fn get(&mut self, path: &str) -> String {
        self.send(path);
        self.response(DEADLINE)
            .unwrap_or_else(|e| panic!("GET {path} on an unblocked connection: {e}"))
    }
}

#[test]
fn block_unblock_and_destroy_ipv4_http() {
    if !is_root("block_unblock_and_destroy_ipv4_http") {
        return;
    }
    let mut k = kernel();
    let server = http_server();
    let mut a = Client::connect(server.addr);
    let mut b = Client::connect(server.addr);
    assert_eq!(a.get("/a1"), "ok /a1\n");
    assert_eq!(b.get("/b1"), "ok /b1\n");
    let ta = server_side(&a.s);
    let tb = server_side(&b.s);
    let before = drops(&k);

    // Blocked: the server's answer never reaches the client; the other connection and new
    // connections are answered as before.
    k.block_conn(ta).unwrap();
    k.block_conn(ta).unwrap(); // again: not an error
    assert_eq!(k.blocked_conns(), 1);
    a.send("/a2");
    assert_silent(&mut a.s, "GET /a2 while blocked");
    assert_eq!(b.get("/b2"), "ok /b2\n");
    assert_eq!(Client::connect(server.addr).get("/new1"), "ok /new1\n");
    assert!(
        drops(&k) > before,
        "the drop counter did not move: {} before, {} after",
        before,
        drops(&k)
    );

    // Unblocked: the held-back answer arrives (TCP retransmits it) and new connections work.
    assert!(k.unblock_conn(ta).unwrap());
    assert!(!k.unblock_conn(ta).unwrap());
    assert_eq!(k.blocked_conns(), 0);
    assert_eq!(
        a.response(DEADLINE)
            .expect("the answer held back while blocked arrives after unblocking"),
        "ok /a2\n"
    );
    assert_eq!(a.get("/a3"), "ok /a3\n");
    assert_eq!(Client::connect(server.addr).get("/new2"), "ok /new2\n");
    let after_unblock = drops(&k);

    // Destroying a blocked connection: its reset passes the block and the client sees it.
    k.block_conn(ta).unwrap();
    a.send("/a4");
    assert_silent(&mut a.s, "GET /a4 while blocked");
    enforce::destroy(ta.local, ta.peer).unwrap();
    assert_reset(&mut a.s, "blocked connection after destroy");
    assert!(k.unblock_conn(ta).unwrap());
    assert!(drops(&k) > after_unblock);

    // Destroying an idle keep-alive connection that is not blocked.
    assert_eq!(b.get("/b3"), "ok /b3\n");
    enforce::destroy(tb.local, tb.peer).unwrap();
    assert_reset(&mut b.s, "idle connection after destroy");

    // Gone tuples (this one now, one that never existed) are refused: the kernel's lookup of
    // such a tuple falls back to the server's listener, which must survive.
    let never = Tuple {
        local: server.addr,
        peer: "127.0.0.1:9".parse().unwrap(),
    };
    for t in [tb, never] {
        match enforce::destroy(t.local, t.peer) {
            Err(EnforceError::NoSuchConnection { .. }) => {}
            other => panic!(
                "destroying {} <-> {}, which does not exist: expected NoSuchConnection, got {other:?}",
                t.local, t.peer
            ),
        }
    }
    // The server itself was never affected.
    assert_eq!(Client::connect(server.addr).get("/new3"), "ok /new3\n");
    assert_eq!(k.blocked_conns(), 0);
}

// ---------------------------------------------------------------------------------------------
// IPv6 and IPv4-mapped: a dual-stack line-echo server on [::].
// ---------------------------------------------------------------------------------------------

/// Answers every line with `echo <line>`; reports each accepted connection as the server sees
/// it (an IPv4 client appears as IPv4-mapped IPv6, the way the agent's tuples name it).
fn echo_server() -> (SocketAddr, mpsc::Receiver<Tuple>) {
    let l = TcpListener::bind("[::]:0").expect("binding a dual-stack listener on [::]");
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            let t = Tuple {
                local: s.local_addr().unwrap(),
                peer: s.peer_addr().unwrap(),
            };
            if tx.send(t).is_err() {
                return;
            }
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                for line in BufReader::new(s).lines() {
                    let Ok(line) = line else { return };
                    if writeln!(w, "echo {line}").is_err() {
                        return;
                    }
                }
            });
        }
    });
    (SocketAddr::from(([0u16; 8], port)), rx)
}

struct LineClient {
    r: BufReader<TcpStream>,
}

impl LineClient {
    fn connect(addr: SocketAddr, accepted: &mpsc::Receiver<Tuple>) -> (LineClient, Tuple) {
        let s = TcpStream::connect(addr)
            .unwrap_or_else(|e| panic!("connecting to {addr} (is IPv6 enabled on lo?): {e}"));
        let t = accepted
            .recv_timeout(DEADLINE)
            .expect("the server accepted");
        assert_eq!(
            t.peer,
            enforce::normalise(s.local_addr().unwrap()).to_mapped()
        );
        (
            LineClient {
                r: BufReader::new(s),
            },
            t,
        )
    }

    fn send(&mut self, line: &str) {
        writeln!(self.r.get_mut(), "{line}").unwrap();
    }

    fn line(&mut self, timeout: Duration) -> io::Result<String> {
        self.r.get_mut().set_read_timeout(Some(timeout))?;
        let mut s = String::new();
        if self.r.read_line(&mut s)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(s)
    }

    fn ask(&mut self, line: &str) -> String {
        self.send(line);
        self.line(DEADLINE)
            .unwrap_or_else(|e| panic!("asking {line:?} on an unblocked connection: {e}"))
    }
}

/// `SocketAddr` as a dual-stack server names it.
trait ToMapped {
    fn to_mapped(self) -> SocketAddr;
}

impl ToMapped for SocketAddr {
    fn to_mapped(self) -> SocketAddr {
        match self {
            SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
            v6 => v6,
        }
    }
}

#[test]
fn block_and_destroy_ipv6_and_ipv4_mapped() {
    if !is_root("block_and_destroy_ipv6_and_ipv4_mapped") {
        return;
    }
    let mut k = kernel();
    let (any, accepted) = echo_server();
    let v4: SocketAddr = SocketAddr::from(([127, 0, 0, 1], any.port()));
    let v6: SocketAddr = format!("[::1]:{}", any.port()).parse().unwrap();
    let (mut c4, t4) = LineClient::connect(v4, &accepted);
    let (mut c6, t6) = LineClient::connect(v6, &accepted);
    assert!(
        t4.local.is_ipv6() && enforce::normalise(t4.local).is_ipv4(),
        "{t4:?}"
    );
    assert!(
        t6.local.is_ipv6() && enforce::normalise(t6.local).is_ipv6(),
        "{t6:?}"
    );
    assert_eq!(c4.ask("one"), "echo one\n");
    assert_eq!(c6.ask("one"), "echo one\n");
    let before = drops(&k);

    // Blocked by the IPv4-mapped tuple the dual-stack server reports.
    k.block_conn(t4).unwrap();
    c4.send("two");
    assert_silent(
        c4.r.get_mut(),
        "IPv4 client of a dual-stack server while blocked",
    );
    assert_eq!(c6.ask("two"), "echo two\n");
    // Blocked by its IPv6 tuple.
    k.block_conn(t6).unwrap();
    assert_eq!(k.blocked_conns(), 2);
    c6.send("three");
    assert_silent(c6.r.get_mut(), "IPv6 client while blocked");
    let (mut other, _) = LineClient::connect(v6, &accepted);
    assert_eq!(other.ask("x"), "echo x\n");
    assert!(drops(&k) > before);

    // Unblocked by the same tuple in plain IPv4 notation: the keys agree.
    let plain4 = Tuple {
        local: enforce::normalise(t4.local),
        peer: enforce::normalise(t4.peer),
    };
    assert!(k.unblock_conn(plain4).unwrap());
    assert_eq!(c4.line(DEADLINE).unwrap(), "echo two\n");
    assert!(k.unblock_conn(t6).unwrap());
    assert_eq!(c6.line(DEADLINE).unwrap(), "echo three\n");
    assert_eq!(k.blocked_conns(), 0);

    // Destroy by the mapped tuple and by the IPv6 one.
    enforce::destroy(t4.local, t4.peer).unwrap();
    assert_reset(
        c4.r.get_mut(),
        "IPv4 client of a dual-stack server after destroy",
    );
    enforce::destroy(t6.local, t6.peer).unwrap();
    assert_reset(c6.r.get_mut(), "IPv6 client after destroy");
    assert_eq!(other.ask("y"), "echo y\n");
}

/// `block_conn` refuses to pretend when the filter is not attached.
#[test]
fn block_needs_the_filter_attached() {
    if !is_root("block_needs_the_filter_attached") {
        return;
    }
    let mut k = loader::load(&LoadSettings {
        ring_buffer_size: 1 << 20,
        max_connections: 1024,
        max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        plaintext_ports: Vec::new(),
        comms: Vec::new(),
        cgroup_ids: Vec::new(),
    })
    .unwrap();
    assert!(!k.enforcing());
    let t = Tuple {
        local: "127.0.0.1:1".parse().unwrap(),
        peer: "127.0.0.1:2".parse().unwrap(),
    };
    let e = k.block_conn(t).unwrap_err();
    assert!(matches!(e, EnforceError::NotAttached { .. }), "{e}");
    assert_eq!(k.blocked_conns(), 0);
}

// ---------------------------------------------------------------------------------------------
// Session tokens recognised in the kernel: CPython's http.server over TLS (OpenSSL 3).
// ---------------------------------------------------------------------------------------------

/// An HTTP/1.1 server over TLS on 127.0.0.1 that answers `ok <path>` (to GET and POST). Mode
/// `fork`: each connection is served by a forked child, the way nginx's workers are children of
/// its master (so the edge flag must be inherited at fork); `thread`: by threads; `plain`: by
/// threads, without TLS.
const TLS_SERVER: &str = r#"
import http.server, os, socketserver, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def do_GET(self):
        body = ("ok " + self.path + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.do_GET()
    def log_message(self, *a):
        pass
forking = sys.argv[3] == "fork"
base = socketserver.ForkingMixIn if forking else socketserver.ThreadingMixIn
class S(base, http.server.HTTPServer):
    daemon_threads = True
    def handle_error(self, request, client_address):
        pass  # clients that time out on a refused request leave broken connections
s = S(("127.0.0.1", 0), H)
if sys.argv[3] != "plain":
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[1], sys.argv[2])
    s.socket = ctx.wrap_socket(s.socket, server_side=True)
print("READY", s.server_address[1], os.getpid(), flush=True)
s.serve_forever()
"#;

struct TlsServer {
    child: Child,
    port: u16,
    pid: u32,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A self-signed certificate for 127.0.0.1 made with `openssl req`: (cert, key).
fn self_signed(dir: &std::path::Path) -> (String, String) {
    let cert = dir.join("cert.pem").to_string_lossy().into_owned();
    let key = dir.join("key.pem").to_string_lossy().into_owned();
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=127.0.0.1", "-keyout", &key, "-out", &cert])
        .output()
        .unwrap_or_else(|e| panic!("running openssl req (the openssl tool is needed): {e}"));
    assert!(
        out.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

fn tls_server(cert: &str, key: &str, mode: &str) -> TlsServer {
    let mut child = Command::new("python3")
        .args(["-c", TLS_SERVER, cert, key, mode])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("starting python3 http.server over TLS (CPython 3 is needed): {e}")
        });
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let mut f = line.split_whitespace();
    let (Some("READY"), Some(port), Some(pid)) = (f.next(), f.next(), f.next()) else {
        panic!("the TLS server did not print READY <port> <pid>: {line:?}");
    };
    TlsServer {
        child,
        port: port.parse().unwrap(),
        pid: pid.parse().unwrap(),
    }
}

/// One GET over a new TLS connection with curl: `Some(body)` if answered, `None` if no answer
/// came within `QUIET` (curl's timeout).
fn curl_get(port: u16, path: &str, header: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["--silent", "--show-error", "--insecure", "--http1.1"])
        .args(["--max-time", &QUIET.as_secs().to_string()])
        .args(["-H", header])
        .arg(format!("https://127.0.0.1:{port}{path}"))
        .output()
        .unwrap_or_else(|e| panic!("running curl: {e}"));
    match out.status.code() {
        Some(0) => Some(String::from_utf8_lossy(&out.stdout).into_owned()),
        // CURLE_OPERATION_TIMEDOUT: the request went out and no answer came back.
        Some(28) => {
            assert!(
                out.stdout.is_empty(),
                "curl timed out but got part of an answer: {:?}",
                String::from_utf8_lossy(&out.stdout)
            );
            None
        }
        other => panic!(
            "curl GET {path} ({header}) failed with {other:?} instead of an answer or a timeout: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Sends `parts` over one new TLS connection, pausing between them so that the server reads
/// each on its own; `Some(body)` if an answer came within `QUIET`.
fn tls_request_in_parts(port: u16, parts: &[&str]) -> Option<String> {
    const CLIENT: &str = r#"
import socket, ssl, sys, time
ctx = ssl._create_unverified_context()
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[1]))))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for part in sys.argv[3:]:
    s.sendall(part.encode())
    time.sleep(0.3)
s.settimeout(float(sys.argv[2]))
got = b""
try:
    while b"\n" not in got.partition(b"\r\n\r\n")[2]:
        b = s.recv(4096)
        if not b:
            sys.exit("closed without an answer: %r" % got)
        got += b
except TimeoutError:
    if got:
        sys.exit("part of an answer arrived: %r" % got)
    print("TIMEOUT")
    sys.exit(0)
print(got.partition(b"\r\n\r\n")[2].decode(), end="")
"#;
    let out = Command::new("python3")
        .args([
            "-c",
            CLIENT,
            &port.to_string(),
            &QUIET.as_secs().to_string(),
        ])
        .args(parts)
        .output()
        .unwrap_or_else(|e| panic!("running the python3 TLS client: {e}"));
    assert!(
        out.status.success(),
        "the TLS client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    (body != "TIMEOUT\n").then_some(body)
}

/// The enforce-hit events waiting in the ring buffer (other events are skipped).
fn hits(rb: &mut aya::maps::RingBuf<aya::maps::MapData>) -> Vec<(tracer_common::ConnId, u64, u16)> {
    let mut out = Vec::new();
    while let Some(item) = rb.next() {
        if let Ok(Event::EnforceHit { hdr, conn, hash }) = decode(&item) {
            out.push((conn, hash, hdr.flags));
        }
    }
    out
}

fn parent_of(pid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s[s.rfind(')')? + 2..].split(' ').nth(1)?.parse().ok()
}

#[test]
fn kernel_refuses_requests_with_blocked_tokens() {
    if !is_root("kernel_refuses_requests_with_blocked_tokens") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let edge = tls_server(&cert, &key, "fork");
    let app = tls_server(&cert, &key, "thread");

    let mut k = kernel();
    let failed: Vec<_> = k.tracepoints.iter().filter(|(_, e)| e.is_some()).collect();
    assert!(failed.is_empty(), "tracepoints not attached: {failed:?}");
    // Both servers are traced (and get their libssl's uprobes), the agent's way.
    let mut disc = Discovery::new(
        [("edge", edge.pid), ("app", app.pid)]
            .into_iter()
            .map(|(name, pid)| TargetSpec {
                matcher: TargetMatch::Pid(pid),
                tls: true,
                name: name.to_string(),
            })
            .collect(),
    );
    disc.scan(&mut k);
    assert!(
        disc.libraries()
            .iter()
            .any(|l| l.attached.contains(&"SSL_read_ex")),
        "no libssl with SSL_read_ex attached: {:?}",
        disc.libraries()
    );
    let mut rb = k.take_events().unwrap();

    // Nothing blocked yet: requests are answered and nothing is scanned.
    assert_eq!(
        curl_get(edge.port, "/warm", "Cookie: skolsid=blocked-cookie").as_deref(),
        Some("ok /warm\n")
    );
    let c = k.counters();
    assert_eq!(
        c[C_TOKEN_SCANS as usize], 0,
        "scanned with no token blocked"
    );
    assert!(
        c[C_SSL_CALLS as usize] > 0,
        "the TLS server's reads were not traced"
    );

    k.set_token_patterns(&[b"skolsid=".to_vec(), b"Bearer ".to_vec()], &[])
        .unwrap();
    k.set_edge_tgid(edge.pid, true).unwrap();
    let seed = k.token_seed();
    let cookie = token_hash(seed, b"blocked-cookie");
    let bearer = token_hash(seed, b"blocked-bearer");
    k.block_token(cookie).unwrap();
    k.block_token(cookie).unwrap(); // again: not an error
    k.block_token(bearer).unwrap();
    assert_eq!(k.blocked_tokens(), 2);
    hits(&mut rb);
    let refused = |k: &Kernel| k.counters()[C_REQUESTS_REFUSED as usize];

    // A new connection carrying the blocked cookie among others: no answer reaches the client.
    let (r0, d0) = (refused(&k), drops(&k));
    assert_eq!(
        curl_get(
            edge.port,
            "/refused",
            "Cookie: a=1; skolsid=blocked-cookie; b=2"
        ),
        None,
        "a request with the blocked cookie was answered"
    );
    assert_eq!(refused(&k), r0 + 1);
    assert!(drops(&k) > d0, "no egress packet was dropped");
    let got = hits(&mut rb);
    assert_eq!(got.len(), 1, "{got:?}");
    let (conn, hash, flags) = got[0];
    assert_eq!(hash, cookie);
    assert!(
        flags & HIT_F_CONN_BLOCKED != 0 && flags & HIT_F_TLS != 0,
        "flags {flags:#x}"
    );
    // Served by a forked child of the edge server: the edge flag was inherited.
    assert_ne!(conn.tgid, edge.pid);
    assert_eq!(parent_of(conn.tgid).unwrap_or(edge.pid), edge.pid);
    assert!(k.blocked_conns() >= 1);

    // Another value of the same cookie, and the blocked value under another name that the
    // pattern does not cover: answered.
    assert_eq!(
        curl_get(edge.port, "/other", "Cookie: skolsid=other").as_deref(),
        Some("ok /other\n")
    );
    assert_eq!(
        curl_get(edge.port, "/prefix", "Cookie: skolsid=blocked-cookie-2").as_deref(),
        Some("ok /prefix\n")
    );
    assert_eq!(refused(&k), r0 + 1);

    // A blocked bearer token.
    assert_eq!(
        curl_get(edge.port, "/bearer", "Authorization: Bearer blocked-bearer"),
        None,
        "a request with the blocked bearer token was answered"
    );
    assert_eq!(refused(&k), r0 + 2);
    let got = hits(&mut rb);
    assert_eq!(got.iter().map(|h| h.1).collect::<Vec<_>>(), vec![bearer]);

    // Cut between two reads, inside the token or inside the pattern: still recognised.
    let head = "GET /cut HTTP/1.1\r\nHost: enforce.test\r\nCookie: a=1; ";
    for (first, second) in [
        ("skolsid=blocked-", "cookie\r\n\r\n"),
        ("sko", "lsid=blocked-cookie; b=2\r\n\r\n"),
    ] {
        let first = format!("{head}{first}");
        assert_eq!(
            tls_request_in_parts(edge.port, &[&first, second]),
            None,
            "a request with the blocked cookie cut as {first:?} + {second:?} was answered"
        );
    }
    assert_eq!(refused(&k), r0 + 4);
    let got = hits(&mut rb);
    assert_eq!(
        got.iter().map(|h| h.1).collect::<Vec<_>>(),
        vec![cookie, cookie]
    );
    // The same cut around a value that is not blocked.
    let first = format!("{head}skolsid=blocked-");
    assert_eq!(
        tls_request_in_parts(edge.port, &[&first, "other\r\n\r\n"]).as_deref(),
        Some("ok /cut\n")
    );
    assert_eq!(refused(&k), r0 + 4);

    // The application behind the edge is traced but not an edge: never scanned, answered.
    let scans = k.counters()[C_TOKEN_SCANS as usize];
    let ssl_calls = k.counters()[C_SSL_CALLS as usize];
    assert_eq!(
        curl_get(app.port, "/app", "Cookie: skolsid=blocked-cookie").as_deref(),
        Some("ok /app\n")
    );
    assert!(k.counters()[C_SSL_CALLS as usize] > ssl_calls);
    assert_eq!(k.counters()[C_TOKEN_SCANS as usize], scans);
    assert_eq!(refused(&k), r0 + 4);

    // Unblocked: new connections with the formerly blocked cookie are answered.
    assert!(k.unblock_token(cookie).unwrap());
    assert!(!k.unblock_token(cookie).unwrap());
    assert_eq!(
        curl_get(edge.port, "/again", "Cookie: a=1; skolsid=blocked-cookie").as_deref(),
        Some("ok /again\n")
    );
    // The last blocked token gone: the scan is off again.
    assert!(k.unblock_token(bearer).unwrap());
    assert_eq!(k.blocked_tokens(), 0);
    let scans = k.counters()[C_TOKEN_SCANS as usize];
    assert_eq!(
        curl_get(edge.port, "/off", "Authorization: Bearer blocked-bearer").as_deref(),
        Some("ok /off\n")
    );
    assert_eq!(k.counters()[C_TOKEN_SCANS as usize], scans);
    assert_eq!(refused(&k), r0 + 4);
    assert!(hits(&mut rb).is_empty());
    let c = k.counters();
    assert_eq!(c[C_REFUSED_NO_TUPLE as usize], 0);
    assert_eq!(c[C_TOKEN_SCAN_BUDGET as usize], 0);
    assert_eq!(c[C_TOKEN_SCAN_FAILED as usize], 0);
}

/// One request over a new plaintext connection: `Some(body)` if answered within `QUIET`.
fn plain_request(port: u16, request: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    s.set_read_timeout(Some(QUIET)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => panic!("the server closed without answering: {got:?}"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                assert!(got.is_empty(), "part of an answer arrived: {got:?}");
                return None;
            }
            Err(e) => panic!("reading the answer: {e}"),
        }
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            assert!(
                head.starts_with("HTTP/1.1 200"),
                "unexpected answer: {head}"
            );
            if body.ends_with('\n') {
                return Some(body.to_string());
            }
        }
    }
}

fn post(path: &str, content_type: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: enforce.test\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// The same on plaintext reads of an edge on a configured plaintext port, with login names in
/// form and JSON bodies.
#[test]
fn kernel_refuses_blocked_tokens_on_plaintext_ports() {
    if !is_root("kernel_refuses_blocked_tokens_on_plaintext_ports") {
        return;
    }
    let edge = tls_server("-", "-", "plain");
    let mut k = loader::load(&LoadSettings {
        ring_buffer_size: 1 << 20,
        max_connections: 4096,
        max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        plaintext_ports: vec![edge.port],
        comms: Vec::new(),
        cgroup_ids: Vec::new(),
    })
    .unwrap_or_else(|e| panic!("loading the kernel programs: {e}"));
    k.attach_enforce().unwrap();
    k.add_target(edge.pid).unwrap();
    k.set_edge_tgid(edge.pid, true).unwrap();
    k.set_token_patterns(&[b"username=".to_vec(), b"\"username\":\"".to_vec()], &[])
        .unwrap();
    let seed = k.token_seed();
    let alice = token_hash(seed, b"alice");
    k.block_token(alice).unwrap();
    let mut rb = k.take_events().unwrap();
    let refused = |k: &Kernel| k.counters()[C_REQUESTS_REFUSED as usize];
    let r0 = refused(&k);

    let form = "application/x-www-form-urlencoded";
    assert_eq!(
        plain_request(
            edge.port,
            &post("/login", form, "username=alice&password=x")
        ),
        None,
        "a form login of the blocked user was answered"
    );
    assert_eq!(
        plain_request(
            edge.port,
            &post("/login", form, "password=x&username=alice")
        ),
        None,
        "a form login of the blocked user (last field) was answered"
    );
    assert_eq!(
        plain_request(
            edge.port,
            &post("/api", "application/json", r#"{"username":"alice","x":1}"#)
        ),
        None,
        "a JSON login of the blocked user was answered"
    );
    assert_eq!(refused(&k), r0 + 3);
    let got = hits(&mut rb);
    assert_eq!(got.len(), 3, "{got:?}");
    for (conn, hash, flags) in got {
        assert_eq!((conn.tgid, hash), (edge.pid, alice));
        assert_eq!(flags, HIT_F_CONN_BLOCKED, "plaintext hit flags {flags:#x}");
    }
    assert_eq!(
        plain_request(
            edge.port,
            &post("/login", form, "username=alicia&password=x")
        )
        .as_deref(),
        Some("ok /login\n")
    );
    assert_eq!(
        plain_request(
            edge.port,
            &post("/api", "application/json", r#"{"username":"bob"}"#)
        )
        .as_deref(),
        Some("ok /api\n")
    );
    assert_eq!(refused(&k), r0 + 3);

    // No longer an edge: not scanned.
    k.set_edge_tgid(edge.pid, false).unwrap();
    assert_eq!(
        plain_request(edge.port, &post("/login", form, "username=alice")).as_deref(),
        Some("ok /login\n")
    );
    assert_eq!(refused(&k), r0 + 3);
}

/// `block_token` refuses to pretend when the filter is not attached; patterns are checked.
#[test]
fn block_token_needs_the_filter_attached() {
    if !is_root("block_token_needs_the_filter_attached") {
        return;
    }
    let mut k = loader::load(&LoadSettings {
        ring_buffer_size: 1 << 20,
        max_connections: 1024,
        max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        plaintext_ports: Vec::new(),
        comms: Vec::new(),
        cgroup_ids: Vec::new(),
    })
    .unwrap();
    let e = k.block_token(token_hash(k.token_seed(), b"x")).unwrap_err();
    assert!(matches!(e, EnforceError::TokensNotAttached { .. }), "{e}");
    assert_eq!(k.blocked_tokens(), 0);
    let nine: Vec<Vec<u8>> = (0..9).map(|i| vec![b'a' + i]).collect();
    assert!(matches!(
        k.set_token_patterns(&nine, &[]),
        Err(EnforceError::TooManyPatterns { .. })
    ));
    assert!(matches!(
        k.set_token_patterns(&[vec![b'x'; 33]], &[]),
        Err(EnforceError::BadPattern { .. })
    ));
    k.set_token_patterns(&[b"skolsid=".to_vec()], &[]).unwrap();
    k.set_edge_tgid(std::process::id(), true).unwrap();
    assert_eq!(k.edge_tgids(), vec![std::process::id()]);
    k.set_edge_tgid(std::process::id(), false).unwrap();
    k.set_edge_tgid(std::process::id(), false).unwrap(); // again: not an error
    assert!(k.edge_tgids().is_empty());
    // Two loads, two seeds.
    let other = loader::load(&LoadSettings {
        ring_buffer_size: 1 << 20,
        max_connections: 1024,
        max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        plaintext_ports: Vec::new(),
        comms: Vec::new(),
        cgroup_ids: Vec::new(),
    })
    .unwrap();
    assert_ne!(k.token_seed(), other.token_seed());
}
