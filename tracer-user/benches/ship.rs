//! `cargo xtask bench ship`: records per second through the durable spool to a local JSON Lines
//! file sink and to a loopback HTTP sink (Elasticsearch bulk shape, answered by a minimal
//! in-process server), each beside the same records written straight to a file; and the cost
//! of the security stream's fdatasync per record beside the same appends without it. No
//! kernel, no root. The spool lives under `target/bench-ship` (a real disk, not tmpfs).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpListener,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use sparbar::{
    config::{FileSinkConfig, SinkConfig, SinkKind, SpoolConfig},
    ship::{shipper::Shipper, spool::StreamSpool, BatchLimits, Stream},
    stats::{Metric, Stats},
};

/// An access record of the demo's shape (about 1.3 KB).
fn record(i: u64) -> Vec<u8> {
    format!(
        r#"{{"@timestamp":"2026-12-01T10:00:00.{i:06}Z","event":{{"id":"019ad8f0-0000-7000-8000-{i:012x}","kind":"event","category":["web"],"type":["access"],"dataset":"sparbar.access","start":"2026-12-01T10:00:00.000000Z","end":"2026-12-01T10:00:00.004000Z","duration":4000000,"outcome":"success"}},"http":{{"version":"1.1","request":{{"method":"GET","bytes":612,"body":{{"bytes":0}}}},"response":{{"status_code":200,"bytes":20480,"body":{{"bytes":20311}},"mime_type":"application/json"}},"route":"abook.persons.query"}},"url":{{"path":"/api/addressbook/persons","query":"schoolId=S03&page=2&pageSize=50"}},"source":{{"ip":"127.0.0.1","port":51234}},"server":{{"ip":"127.0.0.1","port":8443}},"network":{{"transport":"tcp","protocol":"http"}},"tls":{{"established":true}},"process":{{"pid":1234,"name":"nginx"}},"service":{{"name":"nginx"}},"host":{{"name":"bench"}},"sparbar":{{"hop":"edge"}},"user":{{"id":"1191","hash":"5f2c0a9e1d3b4c5d","roles":["pupil"]}},"organization":{{"id":"S03"}},"client":{{"ip":"127.0.0.1"}},"session":{{"id":"9a8b7c6d5e4f30211203f4e5d6c7b8a9"}},"abook":{{"identity":{{"source":"identity_endpoint"}},"target":{{"ids":["p1","p2","p3","p4","p5","p6","p7","p8"],"count":50,"ids_omitted":42,"digest":"3f9a1c0b5e7d2a4f6c8e0b1d3f5a7c9e2b4d6f8a0c1e3b5d7f9a2c4e6b8d0f1a","tenants":["S03"]}},"result":{{"total":412}},"data_categories":["class","email","name","phone","photo"],"cross_tenant":false}}}}"#
    )
    .into_bytes()
}

fn spool_cfg(dir: &Path) -> SpoolConfig {
    SpoolConfig {
        dir: dir.join("spool"),
        max_bytes: 8 << 30,
        segment_bytes: 64 << 20,
        security_reserve: 0,
        on_full: sparbar::config::OnFull::DropNew,
        access_sync: Duration::from_secs(1),
        checkpoint_interval: Duration::from_secs(3600),
        state_interval: Duration::from_secs(3600),
    }
}

/// Baseline: the same lines appended straight to a file, synced at the end.
fn direct(dir: &Path, n: u64) -> f64 {
    let path = dir.join("direct.jsonl");
    let t = Instant::now();
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&path).unwrap());
    for i in 0..n {
        f.write_all(&record(i)).unwrap();
        f.write_all(b"\n").unwrap();
    }
    f.into_inner().unwrap().sync_data().unwrap();
    n as f64 / t.elapsed().as_secs_f64()
}

/// Through the spool to `sink`, until the sink has acknowledged every record.
fn shipped(dir: &Path, n: u64, sink: SinkConfig) -> f64 {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let stats = Arc::new(Stats::default());
    let mut sh = Shipper::start(
        &spool_cfg(dir),
        std::slice::from_ref(&sink),
        dir,
        "bench",
        stats.clone(),
    )
    .unwrap();
    // The start record and the first state go first; measure from here.
    sh.write(&mut Vec::new(), &mut Vec::new());
    let base = sh.spool.stream(Stream::Access).head().0;
    let t = Instant::now();
    let mut i = 0;
    while i < n {
        let mut batch: Vec<Vec<u8>> = (i..(i + 256).min(n)).map(record).collect();
        i += batch.len() as u64;
        sh.write(&mut batch, &mut Vec::new());
    }
    let spooled = t.elapsed();
    let key = Metric::SinkAckedSequence
        .label("sink", &sink.name)
        .label("stream", "access");
    while stats.get(&key) < base + n {
        std::thread::sleep(Duration::from_millis(1));
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    println!(
        "  ({}: the agent thread spooled {n} records in {:.2} s, {:.0} records/s; the sink had them all {:.2} s after the start)",
        sink.name,
        spooled.as_secs_f64(),
        n as f64 / spooled.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    let _ = sh.stop(serde_json::json!({}), Duration::from_secs(10));
    rate
}

/// A loopback HTTP server answering every `_bulk` with a success body (keep-alive).
fn http_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                loop {
                    let mut len = 0usize;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let l = line.trim_end();
                        if l.is_empty() {
                            break;
                        }
                        if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    // One item per action line, as Elasticsearch answers (filter_path applied).
                    let n = body.iter().filter(|b| **b == b'\n').count() / 2;
                    let items = vec!["{\"create\":{\"status\":201}}"; n].join(",");
                    let resp = format!("{{\"errors\":false,\"items\":[{items}]}}").into_bytes();
                    // One write, so Nagle's algorithm never holds the answer back.
                    let mut out = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", resp.len()).into_bytes();
                    out.extend_from_slice(&resp);
                    let _ = w.write_all(&out);
                }
            });
        }
    });
    port
}

/// Per-record cost of appending to a stream spool with and without a sync per record.
fn security_fsync(dir: &Path, n: u64) -> (f64, f64) {
    let mut out = [0.0; 2];
    for (k, sync) in [false, true].into_iter().enumerate() {
        let d = dir.join(format!("sec-{sync}"));
        let _ = std::fs::remove_dir_all(&d);
        let mut sp = StreamSpool::open(&d, Stream::Security, 64 << 20, sync).unwrap();
        let t = Instant::now();
        for i in 0..n {
            sp.append(&record(i));
            sp.flush().unwrap();
        }
        out[k] = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    }
    (out[0], out[1])
}

fn main() {
    let n: u64 = std::env::var("BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-ship");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let limits = BatchLimits {
        max_records: 1000,
        max_bytes: 1 << 20,
        linger: Duration::from_millis(20),
    };
    let base = direct(&root, n);
    let file = shipped(
        &root.join("file"),
        n,
        SinkConfig {
            name: "file".into(),
            streams: vec![Stream::Security, Stream::Access],
            batch: limits,
            kind: SinkKind::File(FileSinkConfig {
                path: root.join("file-sink/{stream}.jsonl").display().to_string(),
                rotate_bytes: 0,
                rotate_interval: None,
                keep_files: 0,
                sync: false,
            }),
        },
    );
    let base2 = direct(&root, n);
    println!("records: {n} access records of {} bytes", record(0).len());
    println!("direct to a file (baseline, twice): {base:.0} and {base2:.0} records/s");
    println!(
        "spool -> file sink: {file:.0} records/s, ratio {:.2} of the direct write",
        file / base.max(base2)
    );
    match http_sink(&root, n, limits) {
        Some(http) => println!(
            "spool -> loopback HTTP sink (Elasticsearch bulk, gzip off): {http:.0} records/s, ratio {:.2} of the direct write",
            http / base.max(base2)
        ),
        None => println!("spool -> loopback HTTP sink: not built into this agent"),
    }
    let m = 2000;
    let (plain, synced) = security_fsync(&root, m);
    println!(
        "security stream, {m} records one by one: {plain:.1} us/record without fdatasync, {synced:.1} us/record with (fsync costs {:.1} us, x{:.1})",
        synced - plain,
        synced / plain.max(0.001)
    );
}

fn http_sink(root: &Path, n: u64, limits: BatchLimits) -> Option<f64> {
    let port = http_server();
    let sink = SinkConfig {
        name: "es".into(),
        streams: vec![Stream::Security, Stream::Access],
        batch: limits,
        kind: SinkKind::Elasticsearch {
            http: sparbar::config::HttpSinkConfig {
                url: format!("http://127.0.0.1:{port}"),
                tls: Default::default(),
                gzip: false,
                headers: vec![],
                timeout: Duration::from_secs(10),
            },
            index: "sparbar-{stream}".into(),
        },
    };
    sparbar::ship::sinks::destination(&sink, "bench").ok()?;
    Some(shipped(&root.join("http"), n, sink))
}
