//! The userspace path of one exchange after decoding, as one line: per-connection reassembly
//! and HTTP parsing (`conn`), then for each exchange route → attribute → disclose → record →
//! detect → decide, each a step of its own module. A batch of kernel events goes in and its
//! [`Effects`] come out: records, kernel actions, process changes, the decisions in force. The
//! pipeline carries none of them out; `agent::commit` does. Pure apart from reading /proc for
//! process names: replay tests feed it events without a kernel.

mod blocks;
mod conn;
mod early;
mod effects;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
};

use tracer_common::*;

use self::conn::{hole_reason, tuple_addrs, Conn, Piece};
pub use self::effects::{Action, Effects, ProcChange};
use crate::{
    attribute::attribution::{Attribution, Attributor},
    attribute::disclosure::{self, Disclosure, SubjectDirectory},
    attribute::routes::{CrossTenantAttempt, PathView, RouteMatch, RouteTable},
    capture::decode::Event,
    config::{DetectionConfig, DisclosureConfig, Rule},
    detect::decide::{Decision, Decisions, EndReason, Scope},
    detect::{Access, Alert, Detector},
    exchange::{Exchange, Tuple as Addrs},
    http::{ConnParser, Dir, ParserLimits, Role},
    record::ids::EventIds,
    record::security::{self, Enforcement, Phase},
    record::{self, CaptureInfo, ProcessInfo, RecordContext},
    stats::{Key, Metric, Stats},
};

pub struct Settings {
    pub limits: ParserLimits,
    pub routes: RouteTable,
    pub record_unmatched: bool,
    /// Length caps of request strings in records.
    pub record_caps: record::FieldCaps,
    pub host_name: String,
    /// CLOCK_REALTIME − CLOCK_MONOTONIC at start, to date kernel timestamps.
    pub mono_to_unix_ns: i128,
    /// Which routes disclose whose data.
    pub disclosure: DisclosureConfig,
    pub detection: DetectionConfig,
    pub rules: Vec<Rule>,
    /// How each service passes the request path on, by service name (`[[targets]] path`);
    /// services not named pass it as sent.
    pub path_views: HashMap<String, PathView>,
}

/// Service names by tgid, kept up to date by discovery.
pub type Services = Arc<RwLock<HashMap<u32, String>>>;

pub struct Pipeline {
    s: Settings,
    conns: HashMap<ConnId, Conn>,
    procs: HashMap<u32, (ProcessInfo, String)>,
    services: Services,
    stats: Arc<Stats>,
    ids: EventIds,
    /// The effects of the step in progress, handed out when it ends.
    fx: Effects,
    /// Counter names per route index, built once.
    route_counters: Vec<Option<Key>>,
    /// Payload bytes since the last batch ended.
    payload_bytes: u64,
    /// Who made each call; `None` leaves records unattributed (replay of capture-only fixtures).
    attributor: Option<Attributor>,
    subjects: SubjectDirectory,
    detector: Detector,
    decisions: Decisions,
    /// What enforcement did so far, per decision id (reported back by the commit).
    enforced: HashMap<String, Enforcement>,
    /// Tokens blocked in the kernel, and the decision that blocked each.
    blocked_tokens: HashMap<u64, String>,
    /// Session token → tenant (kernel hashes) the kernel was handed, while it checks sessions
    /// for cross-tenant attempts (`set_kernel_tenant_checks`); `None` while it does not.
    kernel_tenants: Option<HashMap<u64, u64>>,
    /// Connections whose answers the kernel holds until their request is judged (`HIT_F_HOLD`),
    /// and whether the kernel placed the hold itself (`HIT_F_CONN_BLOCKED`).
    held: HashMap<ConnId, bool>,
    /// Held requests judged per session token whose tenant was unknown (`TENANTLESS_HOLDS`).
    tenantless: HashMap<u64, u8>,
    /// Added to record time for detection and decisions (an injectable clock for tests that
    /// compress days; 0 in production).
    clock_offset_ms: i64,
    /// Counts of the request-time look at a request (`early`), which the exchange's own
    /// attribution counts again: thrown away.
    scratch_stats: Stats,
}

/// What the path knows of the connection an exchange came on.
struct ConnFacts {
    id: ConnId,
    tuple: Option<Addrs>,
    tls: bool,
    holes: Vec<&'static str>,
    /// The parser's anomalies on the connection since the last exchanges were recorded (the
    /// detectors' anomaly rules see them on these exchanges).
    anomalies: Vec<&'static str>,
}

impl Pipeline {
    pub fn new(s: Settings, services: Services, stats: Arc<Stats>) -> Self {
        let subjects = SubjectDirectory::new(s.disclosure.max_subjects);
        let detector = Detector::new(s.detection.clone(), s.rules.clone());
        Pipeline {
            detector,
            decisions: Decisions::default(),
            enforced: HashMap::new(),
            blocked_tokens: HashMap::new(),
            kernel_tenants: None,
            held: HashMap::new(),
            tenantless: HashMap::new(),
            clock_offset_ms: 0,
            scratch_stats: Stats::default(),
            attributor: None,
            subjects,
            s,
            conns: HashMap::new(),
            procs: HashMap::new(),
            services,
            stats,
            ids: EventIds::new(),
            fx: Effects::default(),
            route_counters: Vec::new(),
            payload_bytes: 0,
        }
    }

    /// Attributes calls from now on (without one, records carry no user).
    /// The detectors' sketches are keyed with the attributor's secret from then on.
    pub fn set_attributor(&mut self, a: Attributor) {
        self.detector.set_key(a.keyer().subkey("detector-sketches"));
        self.attributor = Some(a);
    }

    pub fn attributor(&self) -> Option<&Attributor> {
        self.attributor.as_ref()
    }

    pub fn attributor_mut(&mut self) -> Option<&mut Attributor> {
        self.attributor.as_mut()
    }

    pub fn detector(&self) -> &Detector {
        &self.detector
    }

    /// Detector windows saved by an earlier run; returns how many keys came back.
    pub fn restore_detector(
        &mut self,
        bytes: &[u8],
    ) -> Result<crate::detect::Restored, crate::detect::DetectorStateError> {
        self.detector.restore(bytes)
    }

    /// The decisions in force (and the offence counts that escalate them).
    pub fn decisions(&self) -> &Decisions {
        &self.decisions
    }

    /// Decisions saved by an earlier run.
    pub fn restore_decisions(&mut self, d: Decisions) {
        self.decisions = d;
    }

    pub fn clock_offset_ms(&self) -> i64 {
        self.clock_offset_ms
    }

    /// Sets the test clock's offset (restored at start).
    pub fn set_clock_offset_ms(&mut self, ms: i64) {
        self.clock_offset_ms = ms;
    }

    /// Moves the test clock forward and ends the decisions whose time is then up.
    pub fn advance_clock(&mut self, ms: u64, now_unix_ms: u64) -> Effects {
        self.clock_offset_ms += ms as i64;
        self.tick(now_unix_ms)
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

    /// Hands out the effects of the step that just ended.
    fn take(&mut self) -> Effects {
        if self.decisions.changed {
            self.decisions.changed = false;
            self.fx.decisions = Some(self.decisions.clone());
        }
        std::mem::take(&mut self.fx)
    }

    /// One batch of kernel events in, its effects out.
    pub fn handle(&mut self, batch: impl IntoIterator<Item = Event>) -> Effects {
        for ev in batch {
            self.event(ev);
        }
        // Counters kept locally on the hot path go to the shared stats once per batch.
        if self.payload_bytes > 0 {
            self.stats.add(
                Metric::PayloadBytesReceived,
                std::mem::take(&mut self.payload_bytes),
            );
        }
        self.take()
    }

    fn conn(&mut self, id: ConnId, origin: u8, tuple: Option<Addrs>, tls: bool) -> &mut Conn {
        let limits = self.s.limits.clone();
        // Requests are kept as they are read only where blocks can be enforced.
        let early = self.s.detection.enforce && self.attributor.is_some();
        let stats = &self.stats;
        self.conns.entry(id).or_insert_with(|| {
            stats.add(Metric::ConnectionsOpened, 1);
            // The agent traces servers: a connection first seen mid-life is taken as one too.
            let role = match origin {
                ORIGIN_CONNECT => Role::Client,
                _ => Role::Server,
            };
            let midstream = origin == ORIGIN_MIDSTREAM;
            if midstream {
                stats.add_label(Metric::ConnectionsOpened, "origin", "midstream", 1);
            }
            let mut parser = ConnParser::new(role, false, limits);
            if early {
                parser.keep_requests_read();
            }
            Conn::new(parser, tuple, tls, midstream)
        })
    }

    fn event(&mut self, ev: Event) {
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
                    t = crate::capture::procfs::socket_tuple(conn.tgid, conn.fd);
                    if t.is_some() {
                        self.stats
                            .add_label(Metric::TuplesResolved, "source", "procfs", 1);
                    } else {
                        self.stats.add(Metric::TuplesUnknown, 1);
                    }
                }
                if self.conns.contains_key(&conn) {
                    self.stats
                        .add_reason(Metric::EventsAnomalous, "duplicate_conn_open", 1);
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
                        .add_reason(Metric::EventsAnomalous, "data_before_conn_open", 1);
                }
                let tls = hdr.flags & DATA_F_TLS != 0;
                self.payload_bytes += payload.len() as u64;
                let c = self.conn(conn, ORIGIN_MIDSTREAM, None, tls);
                let skipped = c.feed(dir_of(dir), pos, hdr.ts_ns, Piece::Data(&payload));
                if skipped > 0 {
                    self.stats.add(Metric::MidstreamBytesSkipped, skipped);
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
                self.stats.add_reason(Metric::StreamBytesUncaptured, r, len);
                let c = self.conn(conn, ORIGIN_MIDSTREAM, None, hdr.flags & DATA_F_TLS != 0);
                c.hole_reasons.insert(r);
                c.last_ns = hdr.ts_ns;
                let skipped = c.feed(dir_of(dir), pos, hdr.ts_ns, Piece::Hole(len));
                if skipped > 0 {
                    self.stats.add(Metric::MidstreamBytesSkipped, skipped);
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
                    self.stats.add(Metric::ConnectionsClosed, 1);
                }
            }
            Event::ProcExec { tgid, .. } => {
                self.procs.remove(&tgid);
                self.fx.procs.push(ProcChange::Exec(tgid));
            }
            Event::EnforceHit { hdr, conn, .. } if hdr.flags & HIT_F_HOLD != 0 => {
                self.hold(conn, hdr.flags & HIT_F_CONN_BLOCKED != 0)
            }
            Event::EnforceHit { hdr, conn, .. } if hdr.flags & HIT_F_CROSS_TENANT != 0 => {
                self.kernel_cross_tenant(conn)
            }
            Event::EnforceHit { conn, hash, .. } => self.enforce_hit(conn, hash),
            Event::ProcExit { tgid, .. } => {
                self.procs.remove(&tgid);
                self.fx.procs.push(ProcChange::Exit(tgid));
                // Connections of a dead process end here; their fds were closed by the kernel
                // without a close(2) we could see.
                let ids: Vec<ConnId> = self
                    .conns
                    .keys()
                    .filter(|k| k.tgid == tgid)
                    .copied()
                    .collect();
                self.end_conns(ids, 0, "process_exit");
            }
        }
    }

    /// Ends connections whose end was not seen: what can be finished is recorded, they are
    /// forgotten (a blocked one is unblocked), and each is counted as closed for `reason`.
    fn end_conns(&mut self, ids: Vec<ConnId>, now_ns: u64, reason: &str) {
        for id in ids {
            if let Some(c) = self.conns.get_mut(&id) {
                c.parser.close(now_ns);
            }
            self.collect(id);
            self.drop_conn(id);
            self.stats.add_reason(Metric::ConnectionsClosed, reason, 1);
        }
    }

    /// Detection time: wall-clock ms (plus the test clock's offset).
    pub fn now_ms(&self, unix_ns: u64) -> u64 {
        self.at_ms(unix_ns / 1_000_000)
    }

    /// Wall-clock ms on the detection clock (plus the test clock's offset).
    fn at_ms(&self, unix_ms: u64) -> u64 {
        ((unix_ms as i64) + self.clock_offset_ms).max(0) as u64
    }

    fn is_edge(&self, service: &str) -> bool {
        let s = &self.s.detection.services;
        s.is_empty() || s.iter().any(|x| x == service)
    }

    /// Ends the decisions whose time is up (called about once a second).
    pub fn tick(&mut self, now_unix_ms: u64) -> Effects {
        let now = self.at_ms(now_unix_ms);
        let ended = self.decisions.expire(now);
        self.end_decisions(ended, EndReason::Expired, now);
        self.take()
    }

    /// An operator's block (through the control socket).
    pub fn operator_block(
        &mut self,
        scope: Scope,
        value: String,
        duration_ms: u64,
        reason: String,
        now_unix_ms: u64,
    ) -> (Decision, Effects) {
        let now = self.at_ms(now_unix_ms);
        let id = self.ids.next_id();
        let d = self
            .decisions
            .operator_block(scope, value, duration_ms, reason, id, now);
        self.start_decision(&d, now, "operator");
        (d, self.take())
    }

    /// An operator's unblock; returns how many decisions ended.
    pub fn operator_unblock(
        &mut self,
        scope: Scope,
        value: &str,
        now_unix_ms: u64,
    ) -> (usize, Effects) {
        let now = self.at_ms(now_unix_ms);
        let ended = self.decisions.unblock(scope, value);
        let n = ended.len();
        self.end_decisions(ended, EndReason::Unblocked, now);
        (n, self.take())
    }

    /// Ends connections with no event for `idle_ns` (their close was never seen, e.g. lost in a
    /// full ring buffer): what can be finished is recorded, and the expiry is counted.
    pub fn expire_idle(&mut self, now_ns: u64, idle_ns: u64) -> Effects {
        let idle: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.last_ns != 0 && now_ns.saturating_sub(c.last_ns) > idle_ns)
            .map(|(k, _)| *k)
            .collect();
        self.end_conns(idle, now_ns, "idle_expired");
        self.take()
    }

    /// Ends every open connection (agent shutdown): what can be finished is recorded.
    pub fn finish(&mut self) -> Effects {
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            if let Some(c) = self.conns.get_mut(&id) {
                c.parser.close(0);
            }
            self.collect(id);
        }
        self.conns.clear();
        self.take()
    }

    fn process(&mut self, tgid: u32) -> (ProcessInfo, String) {
        if let Some(p) = self.procs.get(&tgid) {
            return p.clone();
        }
        let name = crate::capture::procfs::comm(tgid);
        let service = self
            .services
            .read()
            .ok()
            .and_then(|m| m.get(&tgid).cloned())
            .unwrap_or_else(|| name.clone());
        let p = (
            ProcessInfo {
                pid: tgid,
                name,
                executable: crate::capture::procfs::executable(tgid),
            },
            service,
        );
        self.procs.insert(tgid, p.clone());
        p
    }

    /// Takes the exchanges the connection's parser finished and sends each down the path.
    fn collect(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let read = c.parser.take_requests_read();
        let exchanges = c.parser.take_exchanges();
        for a in c.parser.take_anomalies() {
            self.stats.add_reason(Metric::HttpAnomalies, a.reason(), 1);
            c.anomalies.insert(a.reason());
        }
        for ex in &exchanges {
            count_truncated(&self.stats, ex);
        }
        self.stats.set(
            Metric::HttpBodyBytesHeld,
            self.s.limits.body_budget.in_use(),
        );
        if exchanges.is_empty() && read.is_empty() {
            return;
        }
        let facts = ConnFacts {
            id,
            tuple: c.tuple,
            tls: c.tls,
            holes: if exchanges.is_empty() {
                Vec::new()
            } else {
                std::mem::take(&mut c.hole_reasons).into_iter().collect()
            },
            // Kept on the connection until an exchange is recorded to carry them.
            anomalies: if exchanges.is_empty() {
                Vec::new()
            } else {
                std::mem::take(&mut c.anomalies).into_iter().collect()
            },
        };
        // Requests first, as soon as they are read: a block must reach the kernel before the
        // answer is written.
        for r in read {
            self.request_read(r, &facts);
        }
        for ex in exchanges {
            self.exchange(&ex, &facts);
        }
    }

    /// One exchange along the path: route → attribute → disclose → record → detect → decide.
    fn exchange(&mut self, ex: &Exchange, at: &ConnFacts) {
        self.stats.add(Metric::ExchangesParsed, 1);
        let (process, service) = self.process(at.id.tgid);
        let view = self.path_view(&service);
        let route = self.route(ex, view);
        if route.is_none() && !self.s.record_unmatched {
            return;
        }
        let edge = self.is_edge(&service);
        let start_unix_ns = (ex.request.first_ns as i128 + self.s.mono_to_unix_ns).max(0) as u64;
        let now_ms = self.now_ms(start_unix_ns);
        let who = self.attribute(ex, route.as_ref(), at);
        if edge {
            self.check_session_tenant(who.as_ref(), false);
        }
        let whose = disclosure::disclose(
            &self.s.disclosure,
            route.as_ref(),
            ex,
            &mut self.subjects,
            &self.stats,
        );
        let cross = matches!((&who, &whose), (Some(a), Some(d)) if record::cross_tenant(Some(a), d) == Some(true));
        if cross {
            self.stats.add(Metric::DisclosuresCrossTenant, 1);
        }
        // The request itself names another school than its caller's (known before the answer).
        let attempt = route.as_ref().and_then(|m| {
            self.s.routes.tenant_attempt(
                m,
                &ex.request.target,
                who.as_ref().and_then(|a| a.tenant.as_deref()),
            )
        });
        if attempt.is_some() {
            self.stats.add(Metric::CrossTenantAttempts, 1);
        }
        // Blocked by a decision in force, or its connection was stopped before the answer (the
        // kernel or the request-time check): either way the answer never left.
        let blocked_by = who
            .as_ref()
            .and_then(|a| self.blocked(at.id, a, now_ms, edge))
            .or_else(|| self.conns.get(&at.id).and_then(|c| c.blocked_by.clone()));
        let event_id = self.ids.next_id();
        let line = self.record(
            ex,
            at,
            &process,
            &service,
            RecordParts {
                route: route.as_ref(),
                start_unix_ns,
                event_id: &event_id,
                who: who.as_ref(),
                whose: whose.as_ref(),
                blocked_by: blocked_by.as_deref(),
                attempt: attempt.as_ref(),
            },
        );
        self.fx.access.push(line);
        // Detection, on the edge only (behind it the same call is seen again). The record is
        // written, so what it was built from moves into the detector's view of the call.
        if edge && !self.detector.rules().is_empty() {
            let access = Access {
                event_id,
                ts_ms: now_ms,
                has_disclosure: route
                    .as_ref()
                    .is_some_and(|m| self.s.disclosure.routes.contains_key(&m.name)),
                service,
                status: ex.response.as_ref().map(|r| r.status),
                cross_tenant: cross,
                cross_tenant_attempt: attempt.is_some(),
                anomalies: {
                    let mut a = anomaly_names(ex, at);
                    if route.as_ref().is_some_and(|m| m.normalised.is_some()) {
                        a.push(record::PATH_NORMALISED.to_string());
                    }
                    a
                },
                ..Access::from_parts(who, whose, route)
            };
            for alert in self.detector.observe(&access, &self.stats) {
                self.decide(alert);
            }
        }
    }

    /// How `service` passes the request path on.
    fn path_view(&self, service: &str) -> PathView {
        self.s.path_views.get(service).copied().unwrap_or_default()
    }

    /// The route step: which configured route the request matched, counted per route (and a
    /// route found only on the normalised path counted as `path_normalised`).
    fn route(&mut self, ex: &Exchange, view: PathView) -> Option<RouteMatch> {
        let route = self
            .s
            .routes
            .match_as(&ex.request.method, &ex.request.target, view);
        match &route {
            Some(m) => {
                if m.normalised.is_some() {
                    self.stats
                        .add_reason(Metric::HttpAnomalies, record::PATH_NORMALISED, 1);
                }
                if self.route_counters.len() <= m.index {
                    self.route_counters.resize(m.index + 1, None);
                }
                let key = self.route_counters[m.index]
                    .get_or_insert_with(|| Metric::ExchangesMatched.label("route", &m.name));
                self.stats.add_key(key, 1);
            }
            None => self.stats.add(Metric::ExchangesUnmatched, 1),
        }
        route
    }

    /// The attribution step: who made the call; the connection remembers it (for blocks that
    /// come later).
    fn attribute(
        &mut self,
        ex: &Exchange,
        route: Option<&RouteMatch>,
        at: &ConnFacts,
    ) -> Option<Attribution> {
        let peer = at.tuple.map(|t| t.peer.ip());
        let a = self.attributor.as_mut()?.attribute(
            ex,
            route.map(|m| m.name.as_str()),
            peer,
            &self.stats,
        );
        if let Some(c) = self.conns.get_mut(&at.id) {
            c.user = a.user_id.clone();
            c.session = a.session_id.clone();
        }
        Some(a)
    }

    /// The record step: the exchange's access record, one JSON line.
    fn record(
        &self,
        ex: &Exchange,
        at: &ConnFacts,
        process: &ProcessInfo,
        service: &str,
        p: RecordParts,
    ) -> Vec<u8> {
        let capture = CaptureInfo::of(ex, &at.holes);
        if !capture.complete {
            self.stats.add(Metric::ExchangesIncomplete, 1);
        }
        let first = ex.request.first_ns;
        let last = ex
            .response
            .as_ref()
            .map(|r| r.last_ns)
            .unwrap_or(ex.request.last_ns);
        let ctx = RecordContext {
            exchange: ex,
            route: p.route,
            start_unix_ns: p.start_unix_ns,
            duration_ns: last.saturating_sub(first),
            tuple: at.tuple,
            tls: at.tls,
            process,
            service_name: service,
            path_view: self.path_view(service),
            host_name: &self.s.host_name,
            conn_id: format!("{}:{}:{}", at.id.tgid, at.id.fd, at.id.gen),
            capture,
            event_id: p.event_id.to_string(),
            attribution: p.who,
            disclosure: p.whose,
            blocked_by: p.blocked_by,
            attempt: p.attempt,
            caps: self.s.record_caps,
        };
        let mut line = Vec::with_capacity(1024);
        for field in record::write_line(&ctx, &mut line) {
            self.stats
                .add_label(Metric::RecordFieldsTruncated, "field", field, 1);
        }
        line
    }

    /// The decide step: one alert becomes its record and, for an enforcing rule, a decision
    /// that is recorded and enforced.
    fn decide(&mut self, alert: Alert) {
        let aid = self.ids.next_id();
        self.fx
            .security
            .push(security::alert_line(&alert, &aid, &self.s.host_name));
        let rule = self.s.rules[alert.rule_index].clone();
        let did = self.ids.next_id();
        let decided = self.now_ms(wall_ns());
        if let Some(d) = self.decisions.on_alert(&rule, &alert, did, decided) {
            let start = d.start_ms;
            self.start_decision(&d, start, "rule");
        }
    }

    /// A decision starts: its record, its counter (by `origin`), and its enforcement.
    fn start_decision(&mut self, d: &Decision, at_ms: u64, origin: &str) {
        let rid = self.ids.next_id();
        self.fx.security.push(security::decision_line(
            d,
            Phase::Start,
            &rid,
            at_ms,
            &self.s.host_name,
            None,
        ));
        self.stats
            .add_label(Metric::DecisionsStarted, "origin", origin, 1);
        self.enforce_decision(d);
    }

    /// What the kernel did for decisions (from the commit): the first enforcement of each is
    /// recorded; later ones add up into the decision's end record.
    pub fn enforcement_done(&mut self, done: BTreeMap<String, Enforcement>) -> Effects {
        let now = self.now_ms(wall_ns());
        for (id, e) in done {
            let first = !self.enforced.contains_key(&id);
            let total = self.enforced.entry(id.clone()).or_default();
            total.add(&e);
            if !first {
                continue;
            }
            if !e.errors.is_empty() {
                log::warn!("enforcing decision {id}: {}", e.errors.join("; "));
            }
            if let Some(d) = self.decisions.active.iter().find(|d| d.id == id).cloned() {
                let rid = self.ids.next_id();
                self.fx.security.push(security::decision_line(
                    &d,
                    Phase::Enforced,
                    &rid,
                    now,
                    &self.s.host_name,
                    Some(&e),
                ));
            }
        }
        self.take()
    }
}

/// The parts of a record that come from the steps before it.
struct RecordParts<'a> {
    route: Option<&'a RouteMatch>,
    start_unix_ns: u64,
    event_id: &'a str,
    who: Option<&'a Attribution>,
    whose: Option<&'a Disclosure>,
    blocked_by: Option<&'a str>,
    attempt: Option<&'a CrossTenantAttempt>,
}

fn dir_of(dir: u8) -> Dir {
    if dir == DIR_IN {
        Dir::Inbound
    } else {
        Dir::Outbound
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

/// Counts the bodies of one exchange that were kept only in part, by why.
fn count_truncated(stats: &Stats, ex: &Exchange) {
    let msgs = [
        Some((&ex.request.body, &ex.request.wire)),
        ex.response.as_ref().map(|r| (&r.body, &r.wire)),
    ];
    for (body, wire) in msgs.into_iter().flatten() {
        if body.loss != Some(crate::exchange::BodyLoss::KeptLimit) {
            continue;
        }
        let reason = if wire.anomalies.contains(&"body_over_budget") {
            "memory_budget"
        } else {
            "keep_limit"
        };
        stats.add_reason(Metric::HttpBodiesTruncated, reason, 1);
    }
}

/// The anomaly names a call is judged by: the exchange's own (those in its record) and the
/// connection's since the last exchange was recorded, each once.
fn anomaly_names(ex: &Exchange, at: &ConnFacts) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for a in ex
        .anomalies()
        .into_iter()
        .chain(at.anomalies.iter().copied())
    {
        if !out.iter().any(|o| o == a) {
            out.push(a.to_string());
        }
    }
    out
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
            ..Default::default()
        }])
        .unwrap();
        let s = Settings {
            path_views: HashMap::new(),
            limits: ParserLimits::default(),
            routes,
            record_unmatched: false,
            record_caps: Default::default(),
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

    fn records(fx: &Effects) -> Vec<(String, String)> {
        fx.access
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
        let old = resp("old-answer");
        let mut fx = p.handle([
            open(ORIGIN_MIDSTREAM),
            data(DIR_OUT, 0, 10, &old),
            data(DIR_IN, 0, 20, "GET /p/1 HTTP/1.1\r\nHost: x\r\n\r\n"),
            data(DIR_OUT, old.len() as u64, 30, &resp("one")),
            data(DIR_IN, 31, 40, "GET /p/2 HTTP/1.1\r\nHost: x\r\n\r\n"),
            data(
                DIR_OUT,
                old.len() as u64 + resp("one").len() as u64,
                50,
                &resp("two!"),
            ),
        ]);
        fx.extend(p.finish());
        assert_eq!(
            records(&fx),
            vec![
                ("/p/1".to_string(), "3".to_string()),
                ("/p/2".to_string(), "4".to_string())
            ]
        );
        assert_eq!(stats.get(Metric::MidstreamBytesSkipped), old.len() as u64);
    }

    /// A crafted call's anomalies reach the detectors with its exchange: a request framed with
    /// both Content-Length and chunked fires an anomaly rule, on that call only (the request is
    /// read, and its connection anomaly raised, before its answer is written: the connection
    /// keeps the anomaly until the exchange is recorded).
    #[test]
    fn crafted_framing_fires_an_anomaly_rule() {
        use crate::config::{BlockScope, By, Rule, RuleKind};
        let (mut p, stats) = pipeline();
        let rules = vec![Rule {
            id: "framing".into(),
            name: "framing".into(),
            kind: RuleKind::Anomaly {
                names: vec!["conflicting_framing".into()],
                window: std::time::Duration::from_secs(60),
                limit: 0,
            },
            by: By::ClientIp,
            routes: vec![],
            shadow: true,
            block: vec![],
            scope: BlockScope::User,
        }];
        p.s.rules = rules.clone();
        p.detector.reconfigure(Default::default(), rules);
        p.set_attributor(Attributor::new(
            Default::default(),
            crate::attribute::attribution::Keyer::new([1; 32]),
        ));
        let req = "GET /p/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let one = resp("one");
        let mut fx = p.handle([open(ORIGIN_ACCEPT), data(DIR_IN, 0, 10, req)]);
        fx.extend(p.handle([data(DIR_OUT, 0, 20, &one)]));
        fx.extend(p.finish());
        assert_eq!(
            stats.get_reason(Metric::HttpAnomalies, "conflicting_framing"),
            1
        );
        let alerts: Vec<serde_json::Value> = fx
            .security
            .iter()
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        let first: serde_json::Value = serde_json::from_slice(&fx.access[0]).unwrap();
        assert_eq!(
            (
                alerts[0]["rule"]["id"].as_str(),
                alerts[0]["abook"]["alert"]["anomalies"].clone(),
                alerts[0]["abook"]["alert"]["key"].as_str(),
                alerts[0]["abook"]["evidence"]["event_ids"].clone(),
            ),
            (
                Some("framing"),
                serde_json::json!(["conflicting_framing"]),
                Some("127.0.0.1"),
                serde_json::json!([first["event"]["id"]]),
            )
        );
    }

    /// A route found only on the normalised path: the record keeps the path as sent (its
    /// `;parameters` redacted), names the normalised path and the anomaly, the anomaly is
    /// counted, and an anomaly rule that names `path_normalised` fires on that call only.
    #[test]
    fn a_normalised_path_is_recorded_counted_and_fires_an_anomaly_rule() {
        use crate::config::{BlockScope, By, Rule, RuleKind};
        let (mut p, stats) = pipeline();
        let rules = vec![Rule {
            id: "paths".into(),
            name: "paths".into(),
            kind: RuleKind::Anomaly {
                names: vec!["path_normalised".into()],
                window: std::time::Duration::from_secs(60),
                limit: 0,
            },
            by: By::ClientIp,
            routes: vec![],
            shadow: true,
            block: vec![],
            scope: BlockScope::User,
        }];
        p.s.rules = rules.clone();
        p.detector.reconfigure(Default::default(), rules);
        p.set_attributor(Attributor::new(
            Default::default(),
            crate::attribute::attribution::Keyer::new([1; 32]),
        ));
        let r1 = resp("one");
        let crafted = "GET /x/../p;jsessionid=SECRET/2 HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut fx = p.handle([
            open(ORIGIN_ACCEPT),
            data(DIR_IN, 0, 20, "GET /p/1 HTTP/1.1\r\nHost: x\r\n\r\n"),
            data(DIR_OUT, 0, 30, &r1),
            data(DIR_IN, 31, 40, crafted),
            data(DIR_OUT, r1.len() as u64, 50, &resp("two!")),
        ]);
        fx.extend(p.finish());
        let recs: Vec<serde_json::Value> = fx
            .access
            .iter()
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0]["url"]["path"], "/p/1");
        assert!(recs[0]["sparbar"]["route"].get("normalised_path").is_none());
        assert!(recs[0]["sparbar"].get("anomalies").is_none());
        assert_eq!(recs[1]["url"]["path"], "/x/../p;*/2");
        assert_eq!(
            recs[1]["sparbar"]["route"],
            serde_json::json!({"name": "p", "params": {"id": "2"}, "normalised_path": "/p/2"})
        );
        assert_eq!(
            recs[1]["sparbar"]["anomalies"],
            serde_json::json!(["path_normalised"])
        );
        assert!(!String::from_utf8_lossy(&fx.access[1]).contains("SECRET"));
        assert_eq!(
            stats.get_reason(Metric::HttpAnomalies, "path_normalised"),
            1
        );
        let alerts: Vec<serde_json::Value> = fx
            .security
            .iter()
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        // It fired on the crafted call (the evidence is the client's calls in the window).
        assert_eq!(
            (
                alerts[0]["abook"]["alert"]["anomalies"].clone(),
                alerts[0]["abook"]["evidence"]["event_ids"].clone()
            ),
            (
                serde_json::json!(["path_normalised"]),
                serde_json::json!([recs[0]["event"]["id"], recs[1]["event"]["id"]])
            )
        );
    }

    /// A service that resolves the path before passing it on (`[[targets]] path =
    /// "resolved"`, Apache httpd): its record's path is the resolved one, which matches as is.
    #[test]
    fn a_resolving_service_records_the_path_it_passed_on() {
        let (mut p, stats) = pipeline();
        p.services
            .write()
            .unwrap()
            .insert(CONN.tgid, "apache2".into());
        p.s.path_views.insert("apache2".into(), PathView::Resolved);
        let mut fx = p.handle([
            open(ORIGIN_ACCEPT),
            data(
                DIR_IN,
                0,
                20,
                "GET //x/../p/%31 HTTP/1.1\r\nHost: x\r\n\r\n",
            ),
            data(DIR_OUT, 0, 30, &resp("one")),
        ]);
        fx.extend(p.finish());
        let rec: serde_json::Value = serde_json::from_slice(&fx.access[0]).unwrap();
        assert_eq!(rec["url"]["path"], "/p/1");
        assert_eq!(
            rec["sparbar"]["route"],
            serde_json::json!({"name": "p", "params": {"id": "1"}})
        );
        assert_eq!(
            stats.get_reason(Metric::HttpAnomalies, "path_normalised"),
            0
        );
    }

    /// The same bytes on a connection seen from its accept are all paired in order.
    #[test]
    fn accepted_connection_pairs_from_zero() {
        let (mut p, stats) = pipeline();
        let r1 = resp("one");
        let mut fx = p.handle([
            open(ORIGIN_ACCEPT),
            data(DIR_IN, 0, 20, "GET /p/1 HTTP/1.1\r\nHost: x\r\n\r\n"),
            data(DIR_OUT, 0, 30, &r1),
            data(DIR_IN, 31, 40, "GET /p/2 HTTP/1.1\r\nHost: x\r\n\r\n"),
            data(DIR_OUT, r1.len() as u64, 50, &resp("two!")),
        ]);
        fx.extend(p.finish());
        assert_eq!(
            records(&fx),
            vec![
                ("/p/1".to_string(), "3".to_string()),
                ("/p/2".to_string(), "4".to_string())
            ]
        );
        assert_eq!(stats.get(Metric::MidstreamBytesSkipped), 0);
    }
}
