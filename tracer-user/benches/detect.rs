//! `cargo xtask bench detect`: exchanges through the userspace path after the kernel (HTTP
//! parsing, attribution, disclosure, detection, record serialisation) on one core, and the
//! memory each tracked user costs, at 100,000 users. No kernel, no root.
//!
//! The exchanges are the demo platform's shape: a cookie session per user, learned from a login,
//! then address-book pages of 50 persons (about 20 KB of JSON each) of the user's own school.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Instant,
};

use bytes::Bytes;
use sparbar::{
    attribute::attribution::{Attributor, Keyer},
    attribute::routes::RouteTable,
    capture::decode::Event,
    config,
    pipeline::{Pipeline, Settings},
    stats::{Metric, Stats},
};
use tracer_common::*;

const CONFIG: &str = r#"
[agent]
host_name = "bench"
[[targets]]
exe = "/usr/sbin/nginx"
name = "nginx"
[[routes]]
route = "POST /login"
name = "auth.login"
[[routes]]
route = "GET /api/addressbook/persons"
name = "abook.persons.query"
query_params = ["schoolId", "page", "pageSize"]
[routes.disclosure]
persons = "$.persons[*]"
tenant = "schoolId"
total = "$.total"
[identity]
session_cookies = ["sid"]
[[identity.login]]
route = "auth.login"
username = "username"
user_id = "$.userId"
[disclosure.categories]
name = ["name"]
email = ["email"]
[detection]
enforce = false
max_tracked = 200000
[[rules]]
id = "rpm"
kind = "rate"
metric = "requests"
window = "1m"
limit = 100000
[[rules]]
id = "persons-hour"
kind = "rate"
metric = "persons"
window = "1h"
limit = 100000000
[[rules]]
id = "distinct-day"
kind = "rate"
metric = "distinct_persons"
window = "24h"
limit = 100000000
[[rules]]
id = "xt"
kind = "cross_tenant"
"#;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

struct Gen {
    conn: u32,
    pos_in: HashMap<u32, u64>,
    pos_out: HashMap<u32, u64>,
}

impl Gen {
    fn id(&self, fd: u32) -> ConnId {
        ConnId {
            tgid: 4_000_000,
            fd,
            gen: 1,
        }
    }

    fn open(&mut self, fd: u32) -> Event {
        let mut t = Tuple {
            family: AF_INET,
            local_port: 443,
            peer_port: (10_000 + fd % 50_000) as u16,
            ..Default::default()
        };
        t.local_addr[..4].copy_from_slice(&[10, 0, 0, 1]);
        t.peer_addr[..4].copy_from_slice(&[10, 1, (fd >> 8) as u8, fd as u8]);
        self.conn += 1;
        Event::ConnOpen {
            hdr: EventHeader {
                kind: KIND_CONN_OPEN,
                ..Default::default()
            },
            conn: self.id(fd),
            tuple: t,
            origin: ORIGIN_ACCEPT,
            tls: true,
        }
    }

    fn data(&mut self, fd: u32, dir: u8, b: &[u8]) -> Event {
        let pos = if dir == DIR_IN {
            self.pos_in.entry(fd).or_insert(0)
        } else {
            self.pos_out.entry(fd).or_insert(0)
        };
        let p = *pos;
        *pos += b.len() as u64;
        Event::Data {
            hdr: EventHeader {
                kind: KIND_DATA,
                flags: DATA_F_TLS,
                ts_ns: p + 1,
                ..Default::default()
            },
            conn: self.id(fd),
            pos: p,
            msg_len: b.len() as u32,
            dir,
            src: SRC_TLS,
            payload: Bytes::copy_from_slice(b),
        }
    }
}

fn page(school: u32, page: u32) -> Vec<u8> {
    let persons: Vec<String> = (0..50)
        .map(|i| {
            let id = school * 10_000 + page * 50 + i;
            format!(
                r#"{{"id":{id},"name":"Förnamn Efternamn","firstName":"Förnamn","lastName":"Efternamn","class":"7A","role":"pupil","email":"x{id}@skola.example","phone":"070-000 00 00","schoolId":"sch-{school:02}","schoolName":"Skolan"}}"#
            )
        })
        .collect();
    let body = format!(
        r#"{{"schoolId":"sch-{school:02}","page":{page},"pageSize":50,"total":300,"persons":[{}]}}"#,
        persons.join(",")
    );
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn main() {
    let users: u32 = std::env::var("BENCH_USERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let calls_per_user: u32 = 3;
    let cfg = config::parse(CONFIG, "bench").expect("bench config");
    let stats = Arc::new(Stats::default());
    let settings = Settings {
        limits: Default::default(),
        routes: RouteTable::new(&cfg.routes).expect("routes"),
        record_unmatched: false,
        record_caps: Default::default(),
        host_name: "bench".into(),
        mono_to_unix_ns: 1_800_000_000_000_000_000,
        disclosure: cfg.disclosure.clone(),
        detection: cfg.detection.clone(),
        rules: cfg.rules.clone(),
        path_views: HashMap::new(),
    };
    let services = Arc::new(RwLock::new(HashMap::from([(
        4_000_000u32,
        "nginx".to_string(),
    )])));
    let mut p = Pipeline::new(settings, services, stats.clone());
    p.set_attributor(Attributor::new(cfg.identity.clone(), Keyer::new([9; 32])));
    let pages: Vec<Vec<u8>> = (0..8)
        .flat_map(|s| (1..=6).map(move |pg| (s, pg)))
        .map(|(s, pg)| page(s + 1, pg))
        .collect();
    let mut g = Gen {
        conn: 0,
        pos_in: HashMap::new(),
        pos_out: HashMap::new(),
    };
    let rss0 = rss_kib();
    let t0 = Instant::now();
    let mut exchanges = 0u64;
    let mut bytes = 0u64;
    for u in 0..users {
        let fd = u + 3;
        drop(p.handle([g.open(fd)]));
        let login = format!(
            "POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\nusername=u{u}&password=pw",
            format!("username=u{u}&password=pw").len()
        );
        let body = format!(r#"{{"ok":true,"userId":{u}}}"#);
        let resp = format!(
            "HTTP/1.1 200 OK\r\nSet-Cookie: sid=s{u:08x}; Path=/\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let ev = g.data(fd, DIR_IN, login.as_bytes());
        drop(p.handle([ev]));
        let ev = g.data(fd, DIR_OUT, resp.as_bytes());
        drop(p.handle([ev]));
        exchanges += 1;
        for c in 0..calls_per_user {
            let school = u % 8 + 1;
            let pg = (u + c) % 6 + 1;
            let req = format!(
                "GET /api/addressbook/persons?schoolId=sch-{school:02}&page={pg}&pageSize=50 HTTP/1.1\r\nHost: x\r\nCookie: theme=dark; sid=s{u:08x}\r\n\r\n"
            );
            let body = &pages[((school - 1) * 6 + pg - 1) as usize];
            let ev = g.data(fd, DIR_IN, req.as_bytes());
            drop(p.handle([ev]));
            let ev = g.data(fd, DIR_OUT, body);
            drop(p.handle([ev]));
            bytes += body.len() as u64;
            exchanges += 1;
        }
        let close = Event::ConnClose {
            hdr: EventHeader {
                kind: KIND_CONN_CLOSE,
                ..Default::default()
            },
            conn: g.id(fd),
            pos_in: g.pos_in.remove(&fd).unwrap_or(0),
            pos_out: g.pos_out.remove(&fd).unwrap_or(0),
        };
        drop(p.handle([close]));
    }
    let secs = t0.elapsed().as_secs_f64();
    let rss1 = rss_kib();
    let tracked = p.detector().tracked();
    println!("bench detect: {users} users, {exchanges} exchanges ({:.1} MB of response bodies), one core", bytes as f64 / 1e6);
    println!(
        "  exchanges per second (parse + attribute + disclose + detect + record): {:.0}",
        exchanges as f64 / secs
    );
    println!(
        "  detector keys tracked: {tracked}; sessions learned: {}",
        p.attributor().map(|a| a.sessions_known()).unwrap_or(0)
    );
    println!(
        "  resident memory grew by {:.1} MiB: {:.0} bytes per tracked user (detector state for 4 rules, learned session)",
        (rss1.saturating_sub(rss0)) as f64 / 1024.0,
        (rss1.saturating_sub(rss0)) as f64 * 1024.0 / users as f64
    );
    println!(
        "  alerts raised: {}",
        stats
            .snapshot()
            .iter()
            .filter(|(k, _)| k.starts_with(Metric::Alerts.name()))
            .map(|(_, v)| v)
            .sum::<u64>()
    );
}
