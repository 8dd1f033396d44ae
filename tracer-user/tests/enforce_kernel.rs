//! Privileged: the enforcement primitives against the real kernel. Loads the agent's kernel
//! programs through the library, attaches `enforce_egress` to the cgroup v2 root, and drives
//! real keep-alive connections on loopback: a blocked connection gets no more bytes from its
//! server while the others do, unblocking lets it (and new connections) through again, and
//! `enforce::destroy` resets a connection, blocked or not, so its client sees ECONNRESET.
//!
//! Needs root; without it each test prints why it did nothing and passes (`cargo xtask test`
//! runs this as root). Anything else missing (cgroup v2, IPv6 on loopback, python3) fails.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use sparbar::{
    enforce::{self, EnforceError},
    loader::{self, Kernel, LoadSettings},
    record::Tuple,
};
use tracer_common::{C_ENFORCE_DROPPED, DEFAULT_MAX_MESSAGE_BYTES};

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
