//! The userspace path of one exchange after decoding: per-connection reassembly and HTTP parsing,
//! route matching, and one record per exchange. Pure apart from reading /proc for process names:
//! replay tests feed it events without a kernel.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, RwLock},
};

use tracer_common::*;

use crate::{
    attribution::Attributor,
    config::{DetectionConfig, DisclosureConfig, Rule},
    decide::{Decision, Decisions, EndReason, Scope},
    decode::Event,
    detect::{Access, Detector},
    disclosure::{self, SubjectDirectory},
    exchange::{BodyLoss, Completeness, Exchange},
    http::{ConnParser, Dir, ParserLimits, Role},
    ids::EventIds,
    record::{self, CaptureInfo, ProcessInfo, RecordContext},
    routes::RouteTable,
    security::{self, Phase},
    stats::Stats,
};

pub struct Settings {
    pub limits: ParserLimits,
    pub routes: RouteTable,
    pub record_unmatched: bool,
    pub host_name: String,
    /// CLOCK_REALTIME − CLOCK_MONOTONIC at start, to date kernel timestamps.
    pub mono_to_unix_ns: i128,
    /// Which routes disclose whose data.
    pub disclosure: DisclosureConfig,
    pub detection: DetectionConfig,
    pub rules: Vec<Rule>,
}

/// Service names by tgid, kept up to date by discovery.
pub type Services = Arc<RwLock<HashMap<u32, String>>>;

struct Conn {
    parser: ConnParser,
    tuple: Option<record::Tuple>,
    tls: bool,
    /// Reasons of holes seen since the last exchange was recorded.
    hole_reasons: BTreeSet<&'static str>,
    /// Kernel timestamp of the last event seen on this connection.
    last_ns: u64,
    /// Set for a connection first seen in the middle of its life (see `MidstreamGate`).
    gate: Option<MidstreamGate>,
    /// The user and session of the connection's last call.
    user: Option<String>,
    session: Option<String>,
    /// The decision whose enforcement blocked this connection.
    blocked_by: Option<String>,
}

/// What the agent must do in the kernel for a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Drop the connection's responses and reset it.
    BlockConn {
        tuple: record::Tuple,
        decision: String,
    },
    /// Its block ended, or the connection closed.
    UnblockConn {
        tuple: record::Tuple,
    },
    /// Recognise this token (its kernel hash) in requests the edge reads, on any connection.
    BlockToken {
        hash: u64,
        decision: String,
    },
    UnblockToken {
        hash: u64,
    },
}

/// A connection the kernel first saw mid-life (opened before the agent started) is parsed as
/// if it began at its first captured request: the kernel numbers its bytes from 0 there, and an
/// idle keep-alive connection's next bytes are a request and then its response. What the server
/// writes before that first request was read answers requests the agent never saw (a client
/// that does not pipeline sends its next request only after the previous response), so it is
/// skipped and counted, never paired. Positions are rebased so each direction starts at 0.
#[derive(Default)]
struct MidstreamGate {
    first_in_ns: Option<u64>,
    base_in: Option<u64>,
    base_out: Option<u64>,
}

enum Piece<'a> {
    Data(&'a [u8]),
    Hole(u64),
}

impl Conn {
    /// Hands one piece to the parser, through the midstream gate; returns the bytes skipped.
    fn feed(&mut self, dir: Dir, pos: u64, ts: u64, piece: Piece) -> u64 {
        let len = match piece {
            Piece::Data(b) => b.len() as u64,
            Piece::Hole(n) => n,
        };
        let pos = match &mut self.gate {
            None => pos,
            Some(g) => {
                let (base, open) = match dir {
                    Dir::Inbound => (&mut g.base_in, matches!(piece, Piece::Data(_))),
                    Dir::Outbound => (&mut g.base_out, g.first_in_ns.is_some_and(|t| ts >= t)),
                };
                match *base {
                    Some(b) if pos >= b => pos - b,
                    Some(_) => return len,
                    None if open => {
                        *base = Some(pos);
                        if dir == Dir::Inbound {
                            g.first_in_ns = Some(ts);
                        }
                        0
                    }
                    None => return len,
                }
            }
        };
        match piece {
            Piece::Data(b) => self.parser.data(dir, pos, ts, b),
            Piece::Hole(n) => self.parser.hole(dir, pos, n, ts),
        }
        0
    }

    /// The connection ended with `pos_in`/`pos_out` bytes in each direction.
    fn close_at(&mut self, ts: u64, pos_in: u64, pos_out: u64) {
        let (i, o) = match &self.gate {
            None => (pos_in, pos_out),
            Some(g) => (
                g.base_in.map_or(0, |b| pos_in.saturating_sub(b)),
                g.base_out.map_or(0, |b| pos_out.saturating_sub(b)),
            ),
        };
        self.parser.close_at(ts, i, o);
    }
}

pub struct Pipeline {
    s: Settings,
    conns: HashMap<ConnId, Conn>,
    procs: HashMap<u32, (ProcessInfo, String)>,
    services: Services,
    stats: Arc<Stats>,
    ids: EventIds,
    /// Access records ready for the spool, one compact JSON line each.
    pub out: Vec<Vec<u8>>,
    /// Security records (alerts, decisions) ready for the security spool.
    pub security_out: Vec<Vec<u8>>,
    /// Processes that exec'd, for discovery to re-check.
    pub execs: Vec<u32>,
    pub exits: Vec<u32>,
    /// Counter names per route index, built once.
    route_counters: Vec<String>,
    /// Payload bytes since the last `flush_stats`.
    payload_bytes: u64,
    /// Who made each call; `None` leaves records unattributed (replay of capture-only fixtures).
    pub attributor: Option<Attributor>,
    subjects: SubjectDirectory,
    pub detector: Detector,
    pub decisions: Decisions,
    /// Kernel work for the agent: blocks and unblocks of connections.
    pub actions: Vec<Action>,
    /// What enforcement did so far, per decision id (filled in by the agent).
    pub enforced: HashMap<String, security::Enforcement>,
    /// Tokens blocked in the kernel, and the decision that blocked each.
    blocked_tokens: HashMap<u64, String>,
    /// Added to record time for detection and decisions (an injectable clock for tests that
    /// compress days; 0 in production).
    pub clock_offset_ms: i64,
}

fn hole_reason(r: u8) -> &'static str {
    match r {
        HOLE_CAP => "cap",
        HOLE_READ_FAILED => "read_user_failed",
        HOLE_RINGBUF_FULL => "ringbuf_full",
        HOLE_SENDFILE => "sendfile",
        HOLE_TOO_MANY_CHUNKS => "too_many_chunks",
        _ => "unknown",
    }
}

fn tuple_addrs(t: &Tuple) -> Option<record::Tuple> {
    let ip = |a: &[u8; 16]| -> IpAddr {
        if t.family == AF_INET {
            IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
        } else {
            let v6 = Ipv6Addr::from(*a);
            match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            }
        }
    };
    if t.family != AF_INET && t.family != AF_INET6 {
        return None;
    }
    Some(record::Tuple {
        local: SocketAddr::new(ip(&t.local_addr), t.local_port),
        peer: SocketAddr::new(ip(&t.peer_addr), t.peer_port),
    })
}

impl Pipeline {
    pub fn new(s: Settings, services: Services, stats: Arc<Stats>) -> Self {
        let subjects = SubjectDirectory::new(s.disclosure.max_subjects);
        let detector = Detector::new(s.detection.clone(), s.rules.clone());
        Pipeline {
            detector,
            decisions: Decisions::default(),
            actions: Vec::new(),
            enforced: HashMap::new(),
            blocked_tokens: HashMap::new(),
            clock_offset_ms: 0,
            attributor: None,
            subjects,
            s,
            conns: HashMap::new(),
            procs: HashMap::new(),
            services,
            stats,
            ids: EventIds::new(),
            out: Vec::new(),
            security_out: Vec::new(),
            execs: Vec::new(),
            exits: Vec::new(),
            route_counters: Vec::new(),
            payload_bytes: 0,
        }
    }

    /// A reload: new routes, rules, disclosure and limits apply to the exchanges that complete
    /// from now on; open connections, learned identities, detector windows (of rules whose id
    /// and kind stay) and decisions are kept. Returns how many detector rule states went.
    pub fn reconfigure(&mut self, s: Settings) -> usize {
        let dropped = self
            .detector
            .reconfigure(s.detection.clone(), s.rules.clone());
        // Counter names were built per route index.
        self.route_counters.clear();
        let mono = self.s.mono_to_unix_ns;
        self.s = Settings {
            mono_to_unix_ns: mono,
            ..s
        };
        dropped
    }

    pub fn open_connections(&self) -> usize {
        self.conns.len()
    }

    fn conn(
        &mut self,
        id: ConnId,
        origin: u8,
        tuple: Option<record::Tuple>,
        tls: bool,
    ) -> &mut Conn {
        let limits = self.s.limits.clone();
        let stats = &self.stats;
        self.conns.entry(id).or_insert_with(|| {
            stats.add("connections_opened_total", 1);
            // The agent traces servers: a connection first seen mid-life is taken as one too.
            let role = match origin {
                ORIGIN_CONNECT => Role::Client,
                _ => Role::Server,
            };
            let midstream = origin == ORIGIN_MIDSTREAM;
            if midstream {
                stats.add("connections_opened_total{origin=\"midstream\"}", 1);
            }
            Conn {
                parser: ConnParser::new(role, false, limits),
                tuple,
                tls,
                hole_reasons: BTreeSet::new(),
                last_ns: 0,
                gate: midstream.then(MidstreamGate::default),
                user: None,
                session: None,
                blocked_by: None,
            }
        })
    }

    pub fn handle(&mut self, ev: Event) {
        match ev {
            Event::ConnOpen {
                conn,
                tuple,
                origin,
                tls,
                ..
            } => {
                let mut t = tuple_addrs(&tuple);
                if t.is_none() && conn.fd & 0x8000_0000 == 0 {
                    t = crate::procfs::socket_tuple(conn.tgid, conn.fd);
                    self.stats.add(
                        if t.is_some() {
                            "tuples_resolved_total{source=\"procfs\"}"
                        } else {
                            "tuples_unknown_total"
                        },
                        1,
                    );
                }
                if self.conns.contains_key(&conn) {
                    self.stats
                        .add_reason("events_anomalous_total", "duplicate_conn_open", 1);
                }
                let c = self.conn(conn, origin, t, tls);
                c.tls |= tls;
            }
            Event::Data {
                hdr,
                conn,
                pos,
                dir,
                payload,
                ..
            } => {
                if !self.conns.contains_key(&conn) {
                    self.stats
                        .add_reason("events_anomalous_total", "data_before_conn_open", 1);
                }
                let tls = hdr.flags & DATA_F_TLS != 0;
                self.payload_bytes += payload.len() as u64;
                let c = self.conn(conn, ORIGIN_MIDSTREAM, None, tls);
                let d = if dir == DIR_IN {
                    Dir::Inbound
                } else {
                    Dir::Outbound
                };
                let skipped = c.feed(d, pos, hdr.ts_ns, Piece::Data(&payload));
                if skipped > 0 {
                    self.stats.add("midstream_bytes_skipped_total", skipped);
                }
                self.collect(conn);
            }
            Event::Hole {
                hdr,
                conn,
                pos,
                len,
                dir,
                reason,
            } => {
                let r = hole_reason(reason);
                self.stats.add(
                    &format!("stream_bytes_uncaptured_total{{reason=\"{r}\"}}"),
                    len,
                );
                let c = self.conn(conn, ORIGIN_MIDSTREAM, None, hdr.flags & DATA_F_TLS != 0);
                c.hole_reasons.insert(r);
                c.last_ns = hdr.ts_ns;
                let d = if dir == DIR_IN {
                    Dir::Inbound
                } else {
                    Dir::Outbound
                };
                let skipped = c.feed(d, pos, hdr.ts_ns, Piece::Hole(len));
                if skipped > 0 {
                    self.stats.add("midstream_bytes_skipped_total", skipped);
                }
                self.collect(conn);
            }
            Event::ConnClose {
                hdr,
                conn,
                pos_in,
                pos_out,
            } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.close_at(hdr.ts_ns, pos_in, pos_out);
                    self.collect(conn);
                    self.drop_conn(conn);
                    self.stats.add("connections_closed_total", 1);
                }
            }
            Event::ProcExec { tgid, .. } => {
                self.procs.remove(&tgid);
                self.execs.push(tgid);
            }
            Event::EnforceHit { conn, hash, .. } => self.enforce_hit(conn, hash),
            Event::ProcExit { tgid, .. } => {
                self.procs.remove(&tgid);
                self.exits.push(tgid);
                // Connections of a dead process end here; their fds were closed by the kernel
                // without a close(2) we could see.
                let ids: Vec<ConnId> = self
                    .conns
                    .keys()
                    .filter(|k| k.tgid == tgid)
                    .copied()
                    .collect();
                for id in ids {
                    if let Some(c) = self.conns.get_mut(&id) {
                        c.parser.close(0);
                    }
                    self.collect(id);
                    self.drop_conn(id);
                    self.stats
                        .add("connections_closed_total{reason=\"process_exit\"}", 1);
                }
            }
        }
    }

    /// Forgets a connection; a blocked one is unblocked in the kernel.
    fn drop_conn(&mut self, id: ConnId) {
        if let Some(c) = self.conns.remove(&id) {
            if let (Some(_), Some(tuple)) = (c.blocked_by, c.tuple) {
                self.actions.push(Action::UnblockConn { tuple });
            }
        }
    }

    /// The kernel refused a request carrying a blocked token on connection `id` (its responses
    /// are dropped from now on): the agent resets the connection and counts it.
    pub fn enforce_hit(&mut self, id: ConnId, hash: u64) {
        self.stats.add("enforcement_requests_refused_total", 1);
        let Some(decision) = self.blocked_tokens.get(&hash).cloned() else {
            self.stats
                .add_reason("enforcement_hits_unmatched_total", "token_unknown", 1);
            return;
        };
        if let Some(c) = self.conns.get_mut(&id) {
            if c.blocked_by.is_none() {
                if let Some(tuple) = c.tuple {
                    c.blocked_by = Some(decision.clone());
                    self.actions.push(Action::BlockConn { tuple, decision });
                }
            }
        }
    }

    /// Detection time: wall-clock ms (plus the test clock's offset).
    pub fn now_ms(&self, unix_ns: u64) -> u64 {
        ((unix_ns / 1_000_000) as i64 + self.clock_offset_ms).max(0) as u64
    }

    fn is_edge(&self, service: &str) -> bool {
        let s = &self.s.detection.services;
        s.is_empty() || s.iter().any(|x| x == service)
    }

    fn block_conn(&mut self, id: ConnId, decision: &str) {
        if !self.s.detection.enforce {
            return;
        }
        if let Some(c) = self.conns.get_mut(&id) {
            if c.blocked_by.is_none() {
                if let Some(tuple) = c.tuple {
                    c.blocked_by = Some(decision.to_string());
                    self.actions.push(Action::BlockConn {
                        tuple,
                        decision: decision.to_string(),
                    });
                }
            }
        }
    }

    fn block_token(&mut self, hash: u64, decision: &str) {
        if self.s.detection.enforce && !self.blocked_tokens.contains_key(&hash) {
            self.blocked_tokens.insert(hash, decision.to_string());
            self.actions.push(Action::BlockToken {
                hash,
                decision: decision.to_string(),
            });
        }
    }

    /// Blocks every open edge connection of the decision's user or session, and every token of
    /// theirs the agent knows, so their next requests are refused in the kernel.
    fn enforce_decision(&mut self, d: &Decision) {
        let tokens = self
            .attributor
            .as_ref()
            .map(|a| match d.scope {
                Scope::User => a.tokens_of(Some(&d.value), None),
                Scope::Session => a.tokens_of(None, Some(&d.value)),
            })
            .unwrap_or_default();
        for t in tokens {
            self.block_token(t, &d.id);
        }
        let ids: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(k, c)| {
                let matches = match d.scope {
                    Scope::User => c.user.as_deref() == Some(d.value.as_str()),
                    Scope::Session => c.session.as_deref() == Some(d.value.as_str()),
                };
                matches
                    && self
                        .procs
                        .get(&k.tgid)
                        .is_some_and(|(_, svc)| self.is_edge(svc))
            })
            .map(|(k, _)| *k)
            .collect();
        for id in ids {
            self.block_conn(id, &d.id);
        }
    }

    fn end_decisions(&mut self, ended: Vec<Decision>, why: EndReason, now_ms: u64) {
        for d in ended {
            let id = self.ids.next_id();
            let enf = self.enforced.remove(&d.id);
            self.security_out.push(security::decision_line(
                &d,
                Phase::End(why),
                &id,
                now_ms,
                &self.s.host_name,
                enf.as_ref(),
            ));
            self.stats
                .add_reason("decisions_ended_total", why.as_str(), 1);
            let tuples: Vec<record::Tuple> = self
                .conns
                .values_mut()
                .filter(|c| c.blocked_by.as_deref() == Some(d.id.as_str()))
                .filter_map(|c| {
                    c.blocked_by = None;
                    c.tuple
                })
                .collect();
            for tuple in tuples {
                self.actions.push(Action::UnblockConn { tuple });
            }
            let hashes: Vec<u64> = self
                .blocked_tokens
                .iter()
                .filter(|(_, did)| **did == d.id)
                .map(|(h, _)| *h)
                .collect();
            for hash in hashes {
                self.blocked_tokens.remove(&hash);
                self.actions.push(Action::UnblockToken { hash });
            }
        }
    }

    /// Ends the decisions whose time is up (called about once a second).
    pub fn tick(&mut self, now_unix_ms: u64) {
        let now = ((now_unix_ms as i64) + self.clock_offset_ms).max(0) as u64;
        let ended = self.decisions.expire(now);
        self.end_decisions(ended, EndReason::Expired, now);
    }

    /// An operator's block (through the control socket).
    pub fn operator_block(
        &mut self,
        scope: Scope,
        value: String,
        duration_ms: u64,
        reason: String,
        now_unix_ms: u64,
    ) -> Decision {
        let now = ((now_unix_ms as i64) + self.clock_offset_ms).max(0) as u64;
        let id = self.ids.next_id();
        let d = self
            .decisions
            .operator_block(scope, value, duration_ms, reason, id, now);
        let rid = self.ids.next_id();
        self.security_out.push(security::decision_line(
            &d,
            Phase::Start,
            &rid,
            now,
            &self.s.host_name,
            None,
        ));
        self.stats
            .add("decisions_started_total{origin=\"operator\"}", 1);
        self.enforce_decision(&d);
        d
    }

    /// An operator's unblock; returns how many decisions ended.
    pub fn operator_unblock(&mut self, scope: Scope, value: &str, now_unix_ms: u64) -> usize {
        let now = ((now_unix_ms as i64) + self.clock_offset_ms).max(0) as u64;
        let ended = self.decisions.unblock(scope, value);
        let n = ended.len();
        self.end_decisions(ended, EndReason::Unblocked, now);
        n
    }

    /// Hands the counters kept locally on the hot path to the shared stats.
    pub fn flush_stats(&mut self) {
        if self.payload_bytes > 0 {
            self.stats.add(
                "payload_bytes_received_total",
                std::mem::take(&mut self.payload_bytes),
            );
        }
    }

    /// Ends connections with no event for `idle_ns` (their close was never seen, e.g. lost in a
    /// full ring buffer): what can be finished is recorded, and the expiry is counted.
    pub fn expire_idle(&mut self, now_ns: u64, idle_ns: u64) {
        let idle: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.last_ns != 0 && now_ns.saturating_sub(c.last_ns) > idle_ns)
            .map(|(k, _)| *k)
            .collect();
        for id in idle {
            if let Some(c) = self.conns.get_mut(&id) {
                c.parser.close(now_ns);
            }
            self.collect(id);
            self.drop_conn(id);
            self.stats
                .add("connections_closed_total{reason=\"idle_expired\"}", 1);
        }
    }

    /// Ends every open connection (agent shutdown): what can be finished is recorded.
    pub fn finish(&mut self) {
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            if let Some(c) = self.conns.get_mut(&id) {
                c.parser.close(0);
            }
            self.collect(id);
        }
        self.conns.clear();
    }

    fn process(&mut self, tgid: u32) -> (ProcessInfo, String) {
        if let Some(p) = self.procs.get(&tgid) {
            return p.clone();
        }
        let info = crate::discovery::read_proc_info(tgid);
        let service = self
            .services
            .read()
            .ok()
            .and_then(|m| m.get(&tgid).cloned())
            .unwrap_or_else(|| info.name.clone());
        let p = (
            ProcessInfo {
                pid: tgid,
                name: info.name,
                executable: info.executable,
            },
            service,
        );
        self.procs.insert(tgid, p.clone());
        p
    }

    fn collect(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let exchanges = c.parser.take_exchanges();
        for a in c.parser.take_anomalies() {
            self.stats.add_reason("http_anomalies_total", a.reason(), 1);
        }
        if exchanges.is_empty() {
            return;
        }
        let reasons: Vec<&'static str> = std::mem::take(&mut c.hole_reasons).into_iter().collect();
        let (tuple, tls) = (c.tuple, c.tls);
        for ex in exchanges {
            self.record(id, &ex, tuple, tls, &reasons);
        }
    }

    fn record(
        &mut self,
        id: ConnId,
        ex: &Exchange,
        tuple: Option<record::Tuple>,
        tls: bool,
        reasons: &[&'static str],
    ) {
        self.stats.add("exchanges_parsed_total", 1);
        let route = self
            .s
            .routes
            .match_request(&ex.request.method, &ex.request.target);
        match &route {
            Some(m) => {
                if self.route_counters.len() <= m.index {
                    self.route_counters.resize(m.index + 1, String::new());
                }
                if self.route_counters[m.index].is_empty() {
                    self.route_counters[m.index] =
                        format!("exchanges_matched_total{{route=\"{}\"}}", m.name);
                }
                self.stats.add(&self.route_counters[m.index], 1);
            }
            None => {
                self.stats.add("exchanges_unmatched_total", 1);
                if !self.s.record_unmatched {
                    return;
                }
            }
        }
        let (proc_info, service) = self.process(id.tgid);
        let missing = |b: &crate::exchange::Body| -> u64 {
            match b.loss {
                Some(BodyLoss::NotCaptured) | Some(BodyLoss::Incomplete)
                    if b.decoded_from.is_none() =>
                {
                    b.wire_len.saturating_sub(b.data.len() as u64)
                }
                _ => 0,
            }
        };
        let req_missing = missing(&ex.request.body);
        let resp_missing = ex.response.as_ref().map(|r| missing(&r.body)).unwrap_or(0);
        let mut reasons: Vec<&'static str> = reasons.to_vec();
        if ex.completeness == Completeness::NoResponse {
            reasons.push("no_response");
        }
        let complete =
            ex.completeness == Completeness::Complete && req_missing == 0 && resp_missing == 0;
        if !complete {
            self.stats.add("exchanges_incomplete_total", 1);
        }
        let first = ex.request.first_ns;
        let last = ex
            .response
            .as_ref()
            .map(|r| r.last_ns)
            .unwrap_or(ex.request.last_ns);
        let start_unix_ns = (first as i128 + self.s.mono_to_unix_ns).max(0) as u64;
        let route_name = route.as_ref().map(|m| m.name.as_str());
        let attribution = self
            .attributor
            .as_mut()
            .map(|a| a.attribute(ex, route_name, tuple.map(|t| t.peer.ip()), &self.stats));
        let disclosure = match (&route, &ex.response) {
            (Some(m), Some(resp)) => self.s.disclosure.routes.get(&m.name).and_then(|rule| {
                disclosure::extract(
                    &self.s.disclosure,
                    rule,
                    m,
                    resp,
                    &mut self.subjects,
                    &self.stats,
                )
            }),
            _ => None,
        };
        let cross = match (&disclosure, &attribution) {
            (Some(d), Some(a)) => record::cross_tenant(Some(a), d) == Some(true),
            _ => false,
        };
        if cross {
            self.stats.add("disclosures_cross_tenant_total", 1);
        }
        // Enforcement: a call of a blocked user or session.
        let now_ms = self.now_ms(start_unix_ns);
        let edge = self.is_edge(&service);
        let mut blocked_by: Option<String> = None;
        if let Some(a) = &attribution {
            if let Some(c) = self.conns.get_mut(&id) {
                c.user = a.user_id.clone();
                c.session = a.session_id.clone();
            }
            if let Some(d) =
                self.decisions
                    .blocking(a.user_id.as_deref(), a.session_id.as_deref(), now_ms)
            {
                let did = d.id.clone();
                self.stats.add("exchanges_blocked_total", 1);
                if edge {
                    self.block_conn(id, &did);
                }
                // A new session (a login while blocked) or a login name: refused from now on.
                for t in [a.token, a.login_token].into_iter().flatten() {
                    self.block_token(t, &did);
                }
                blocked_by = Some(did);
            }
        }
        // Detection, on the edge only (behind it the same call is seen again).
        let event_id = self.ids.next_id();
        let ctx = RecordContext {
            exchange: ex,
            route: route.as_ref(),
            start_unix_ns,
            duration_ns: last.saturating_sub(first),
            tuple,
            tls,
            process: &proc_info,
            service_name: &service,
            host_name: &self.s.host_name,
            conn_id: format!("{}:{}:{}", id.tgid, id.fd, id.gen),
            capture: CaptureInfo {
                complete,
                request_bytes_missing: req_missing,
                response_bytes_missing: resp_missing,
                reasons,
            },
            event_id: event_id.clone(),
            attribution: attribution.as_ref(),
            disclosure: disclosure.as_ref(),
            blocked_by: blocked_by.as_deref(),
        };
        let mut line = Vec::with_capacity(1024);
        record::write_line(&ctx, &mut line);
        self.out.push(line);
        // Detection, on the edge only (behind it the same call is seen again). The record is
        // written, so what it was built from moves into the detector's view of the call.
        if edge && !self.detector.rules().is_empty() {
            self.detect(Access {
                event_id,
                ts_ms: now_ms,
                has_disclosure: route
                    .as_ref()
                    .is_some_and(|m| self.s.disclosure.routes.contains_key(&m.name)),
                service,
                status: ex.response.as_ref().map(|r| r.status),
                cross_tenant: cross,
                ..Access::from_parts(attribution, disclosure, route)
            });
        }
    }

    /// Feeds one access to the detectors; alerts and the decisions they make become records,
    /// and decisions are enforced.
    fn detect(&mut self, access: Access) {
        for al in self.detector.observe(&access, &self.stats) {
            let aid = self.ids.next_id();
            self.security_out
                .push(security::alert_line(&al, &aid, &self.s.host_name));
            let rule = self.s.rules[al.rule_index].clone();
            let did = self.ids.next_id();
            let decided = self.now_ms(wall_ns());
            if let Some(d) = self.decisions.on_alert(&rule, &al, did, decided) {
                let rid = self.ids.next_id();
                self.security_out.push(security::decision_line(
                    &d,
                    Phase::Start,
                    &rid,
                    d.start_ms,
                    &self.s.host_name,
                    None,
                ));
                self.stats
                    .add("decisions_started_total{origin=\"rule\"}", 1);
                self.enforce_decision(&d);
            }
        }
    }
}

/// CLOCK_REALTIME now, in ns (when a decision is made).
fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// CLOCK_MONOTONIC now, in ns (the clock of the kernel's timestamps).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime with a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CLOCK_REALTIME − CLOCK_MONOTONIC now, in ns.
pub fn mono_to_unix_ns() -> i128 {
    let read = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime with a valid timespec.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
    };
    read(libc::CLOCK_REALTIME) - read(libc::CLOCK_MONOTONIC)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::config::RouteConfig;

    fn pipeline() -> (Pipeline, Arc<Stats>) {
        let routes = RouteTable::new(&[RouteConfig {
            route: "GET /p/{id}".into(),
            name: "p".into(),
            query_params: vec![],
        }])
        .unwrap();
        let s = Settings {
            limits: ParserLimits::default(),
            routes,
            record_unmatched: false,
            host_name: "h".into(),
            mono_to_unix_ns: 0,
            disclosure: Default::default(),
            detection: Default::default(),
            rules: vec![],
        };
        let stats = Arc::new(Stats::default());
        (
            Pipeline::new(s, Arc::new(RwLock::new(HashMap::new())), stats.clone()),
            stats,
        )
    }

    const CONN: ConnId = ConnId {
        tgid: 4_000_000,
        fd: 7,
        gen: 1,
    };

    fn open(origin: u8) -> Event {
        let mut t = Tuple {
            family: AF_INET,
            local_port: 8080,
            peer_port: 5000,
            ..Default::default()
        };
        t.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        t.peer_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        Event::ConnOpen {
            hdr: EventHeader {
                kind: KIND_CONN_OPEN,
                ..Default::default()
            },
            conn: CONN,
            tuple: t,
            origin,
            tls: false,
        }
    }

    fn data(dir: u8, pos: u64, ts: u64, b: &str) -> Event {
        Event::Data {
            hdr: EventHeader {
                kind: KIND_DATA,
                ts_ns: ts,
                ..Default::default()
            },
            conn: CONN,
            pos,
            msg_len: b.len() as u32,
            dir,
            src: SRC_SYSCALL,
            payload: Bytes::copy_from_slice(b.as_bytes()),
        }
    }

    fn resp(body: &str) -> String {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    fn records(p: &Pipeline) -> Vec<(String, String)> {
        p.out
            .iter()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_slice(l).unwrap();
                (
                    v["url"]["path"].as_str().unwrap_or("").to_string(),
                    v["http"]["response"]["body"]["bytes"].to_string(),
                )
            })
            .collect()
    }

    /// A connection picked up while the server was still writing the answer to a request the
    /// agent never saw: that answer is skipped, never paired with the next request.
    #[test]
    fn midstream_skips_answers_to_unseen_requests() {
        let (mut p, stats) = pipeline();
        p.handle(open(ORIGIN_MIDSTREAM));
        let old = resp("old-answer");
        p.handle(data(DIR_OUT, 0, 10, &old));
        p.handle(data(DIR_IN, 0, 20, "GET /p/1 HTTP/1.1\r\nHost: x\r\n\r\n"));
        p.handle(data(DIR_OUT, old.len() as u64, 30, &resp("one")));
        p.handle(data(DIR_IN, 31, 40, "GET /p/2 HTTP/1.1\r\nHost: x\r\n\r\n"));
        p.handle(data(
            DIR_OUT,
            old.len() as u64 + resp("one").len() as u64,
            50,
            &resp("two!"),
        ));
        p.finish();
        assert_eq!(
            records(&p),
            vec![
                ("/p/1".to_string(), "3".to_string()),
                ("/p/2".to_string(), "4".to_string())
            ]
        );
        assert_eq!(stats.get("midstream_bytes_skipped_total"), old.len() as u64);
    }

    /// The same bytes on a connection seen from its accept are all paired in order.
    #[test]
    fn accepted_connection_pairs_from_zero() {
        let (mut p, stats) = pipeline();
        p.handle(open(ORIGIN_ACCEPT));
        let r1 = resp("one");
        p.handle(data(DIR_IN, 0, 20, "GET /p/1 HTTP/1.1\r\nHost: x\r\n\r\n"));
        p.handle(data(DIR_OUT, 0, 30, &r1));
        p.handle(data(DIR_IN, 31, 40, "GET /p/2 HTTP/1.1\r\nHost: x\r\n\r\n"));
        p.handle(data(DIR_OUT, r1.len() as u64, 50, &resp("two!")));
        p.finish();
        assert_eq!(
            records(&p),
            vec![
                ("/p/1".to_string(), "3".to_string()),
                ("/p/2".to_string(), "4".to_string())
            ]
        );
        assert_eq!(stats.get("midstream_bytes_skipped_total"), 0);
    }
}
