// TEMPORARY measurement, deleted after use.
use aya::programs::UProbe;
use sparbar::{
    config::TargetMatch,
    discovery::{Discovery, TargetSpec},
    loader::{self, LoadSettings},
};
use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};
use tracer_common::*;

include!("/tmp/tls_server.rs");

const CLIENT: &str = r#"
import http.client, ssl, sys, time
ctx = ssl._create_unverified_context()
c = http.client.HTTPSConnection("127.0.0.1", int(sys.argv[1]), context=ctx)
hdr = {"Cookie": "a=1; " + "x" * int(sys.argv[3]) + "; skolsid=some-user-cookie", "Authorization": "Bearer abcdef"}
for i in range(int(sys.argv[2])):
    c.request("GET", "/p", headers=hdr)
    c.getresponse().read()
"#;

fn stats(k: &mut sparbar::loader::Kernel) -> (u64, u64) {
    let p: &mut UProbe = loader::program(&mut k.ebpf, "openssl_ssl_rw_ret").unwrap();
    let i = p.info().unwrap();
    (i.run_time().as_nanos() as u64, i.run_count())
}

#[test]
fn scan_cost() {
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("c.pem").to_string_lossy().into_owned();
    let key = dir.path().join("k.pem").to_string_lossy().into_owned();
    assert!(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=x",
            "-keyout", &key, "-out", &cert
        ])
        .output()
        .unwrap()
        .status
        .success());
    let mut child = Command::new("python3")
        .args(["-c", TLS_SERVER, &cert, &key, "thread"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let f: Vec<&str> = line.split_whitespace().collect();
    let (port, pid): (u16, u32) = (f[1].parse().unwrap(), f[2].parse().unwrap());
    let mut k = loader::load(&LoadSettings {
        ring_buffer_size: 1 << 22,
        max_connections: 4096,
        max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        plaintext_ports: vec![],
        comms: vec![],
        cgroup_ids: vec![],
    })
    .unwrap();
    k.attach_enforce().unwrap();
    let mut d = Discovery::new(vec![TargetSpec {
        matcher: TargetMatch::Pid(pid),
        tls: true,
        name: "e".into(),
    }]);
    d.scan(&mut k);
    k.set_token_patterns(&[
        b"skolsid=".to_vec(),
        b"Bearer ".to_vec(),
        b"username=".to_vec(),
        b"\"username\":\"".to_vec(),
    ])
    .unwrap();
    k.set_edge_tgid(pid, true).unwrap();
    let mut rb = k.take_events().unwrap();
    let n = 1000;
    for (label, block, pad) in [
        ("off, 0.1KiB hdr", false, 50usize),
        ("on, 0.1KiB hdr", true, 50),
        ("off, 0.1KiB hdr", false, 50usize),
        ("on, 0.1KiB hdr", true, 50),
        ("off, 0.1KiB hdr", false, 50usize),
        ("on, 0.1KiB hdr", true, 50),
        ("off, 1KiB hdr", false, 1000),
        ("on, 1KiB hdr", true, 1000),
        ("off, 4KiB hdr", false, 4000),
        ("on, 4KiB hdr", true, 4000),
    ] {
        if block {
            k.block_token(token_hash(k.token_seed(), b"nobody"))
                .unwrap();
        } else {
            let _ = k.unblock_token(token_hash(k.token_seed(), b"nobody"));
        }
        let (t0, c0) = stats(&mut k);
        let s0 = k.counters()[C_TOKEN_SCANS as usize];
        let st = std::time::Instant::now();
        assert!(Command::new("python3")
            .args([
                "-c",
                CLIENT,
                &port.to_string(),
                &n.to_string(),
                &pad.to_string()
            ])
            .status()
            .unwrap()
            .success());
        let el = st.elapsed();
        while rb.next().is_some() {}
        let (t1, c1) = stats(&mut k);
        let s1 = k.counters()[C_TOKEN_SCANS as usize];
        eprintln!(
            "{label}: ret probe avg {} ns over {} runs; scans {}; wall {:?}/req; budget {}",
            (t1 - t0) / (c1 - c0).max(1),
            c1 - c0,
            s1 - s0,
            el / n,
            k.counters()[C_TOKEN_SCAN_BUDGET as usize]
        );
        // drain the ring in between
    }
    let _ = child.kill();
}
