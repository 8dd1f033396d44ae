//! The request-time check: a request is looked at as soon as the HTTP parser has read it (its
//! head, and again with its body), before its answer. A request of a blocked user or session,
//! one that carries a blocked token or login name, or a cross-tenant attempt under a blocking
//! rule puts its connection into the kernel's drop table (and its tokens into the token table)
//! right away, so the answer the server writes never leaves. This is the fallback for what the
//! kernel's own scan (`tracer_common::scan`) cannot see: heads and bodies past its bounds, forms
//! it does not decode, requests read before the token was known.

use std::net::IpAddr;

use tracer_common::{
    scan::{PK_ROUTE, PK_TENANT_PATH, PK_TENANT_QUERY},
    ConnId, TOKEN_PAT_LEN,
};

use super::{Action, ConnFacts, Pipeline};
use crate::{
    attribute::attribution::Attribution,
    attribute::routes::{RouteMatch, RouteTable, TenantParam},
    config::RuleKind,
    exchange::{Completeness, Exchange, Request},
    http::RequestRead,
    stats::Metric,
};

/// The school a request names (a route's tenant parameter), when it is another than the
/// caller's: found from the request alone, before any answer (`RouteTable::tenant_attempt`).
fn cross_tenant_attempt(
    routes: &RouteTable,
    req: &Request,
    who: &Attribution,
    route: Option<&RouteMatch>,
) -> Option<String> {
    routes
        .tenant_attempt(route?, &req.target, who.tenant.as_deref())
        .map(|a| a.named)
}

/// The kernel's tenant patterns for the routes that name their tenant (`enforce::token_patterns`
/// takes them), and the routes whose tenant the kernel cannot find, with why:
///
/// - a query parameter (`tenant_param = "schoolId"`): the route's static path prefix (up to its
///   first `{`), after which `schoolId=` in the query names the tenant;
/// - a path parameter (`"{org}"`): the static prefix up to its segment, which is the tenant.
///   Only when no other parameter comes before it (`/a/{x}/b/{org}` is left to the agent).
///
/// A pattern longer than the kernel takes keeps its last `TOKEN_PAT_LEN` bytes (a path that
/// matches the route still contains them). The kernel matches them in request lines, decoded.
pub fn tenant_patterns(routes: &RouteTable) -> (Vec<(Vec<u8>, u8)>, Vec<String>) {
    let tail = |p: &str| -> Vec<u8> {
        let b = p.as_bytes();
        b[b.len().saturating_sub(TOKEN_PAT_LEN)..].to_vec()
    };
    let mut out: Vec<(Vec<u8>, u8)> = Vec::new();
    let mut skipped = Vec::new();
    let mut add = |p: Vec<u8>, kind: u8| {
        if !p.is_empty() && !out.contains(&(p.clone(), kind)) {
            out.push((p, kind));
        }
    };
    for (template, param) in routes.tenant_routes() {
        let prefix_end = template.find('{').unwrap_or(template.len());
        match param {
            TenantParam::Query(name) => {
                add(tail(&template[..prefix_end]), PK_ROUTE);
                add(tail(&format!("{name}=")), PK_TENANT_QUERY);
            }
            TenantParam::Path(name) => {
                let seg = format!("{{{name}}}");
                match template.find(&seg) {
                    Some(i) if i == prefix_end => add(tail(&template[..i]), PK_TENANT_PATH),
                    _ => skipped.push(format!(
                        "{template}: a parameter comes before {seg}, so the kernel cannot find its segment"
                    )),
                }
            }
        }
    }
    (out, skipped)
}

/// Held requests of a session whose tenant stays unknown before the kernel stops holding them:
/// one. By the time the agent judges a held request it has read every answer sent before it
/// (the hold wakes it), so a school named by an earlier answer (`/api/me`) is known; none
/// will come later for this request.
const TENANTLESS_HOLDS: u8 = 1;

/// Why a request was stopped at read time (the counter's reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    /// Its user or session is blocked.
    Blocked,
    /// It carries a session token or login name the kernel was told to refuse.
    Token,
    /// It names another school than the caller's, and a cross-tenant rule blocks.
    CrossTenant,
}

impl Stop {
    pub(super) fn reason(self) -> &'static str {
        match self {
            Stop::Blocked => "blocked",
            Stop::Token => "blocked_token",
            Stop::CrossTenant => "cross_tenant",
        }
    }
}

impl Pipeline {
    /// Whether requests are worth looking at as they are read: enforcement is on and something
    /// is blocked, or a cross-tenant rule blocks.
    pub(super) fn early_checks_wanted(&self) -> bool {
        self.s.detection.enforce
            && self.attributor.is_some()
            && (!self.decisions.active.is_empty()
                || !self.blocked_tokens.is_empty()
                || self.cross_tenant_blocks().is_some())
    }

    /// The kernel's tenant patterns (see [`tenant_patterns`]) when a cross-tenant rule blocks
    /// and enforcement is on; none otherwise (the kernel then checks no session, and costs
    /// nothing while no token is blocked).
    pub fn kernel_tenant_patterns(&self) -> (Vec<(Vec<u8>, u8)>, Vec<String>) {
        if !self.s.detection.enforce || self.cross_tenant_blocks().is_none() {
            return (Vec::new(), Vec::new());
        }
        tenant_patterns(&self.s.routes)
    }

    /// The kernel checks sessions' requests for cross-tenant attempts (the agent set its tenant
    /// patterns): from now on each session token seen with its tenant is handed to it.
    pub fn set_kernel_tenant_checks(&mut self, on: bool) {
        self.kernel_tenants = if on { Some(Default::default()) } else { None };
    }

    /// Hands the kernel every learned session of a known user (at start: the sessions came
    /// back from disk with their kernel hashes), with its tenant or 0 when none is known, so
    /// their requests are checked in the kernel and not held.
    pub fn hand_kernel_sessions(&mut self) {
        let (Some(_), Some(at)) = (self.kernel_tenants.as_ref(), self.attributor.as_ref()) else {
            return;
        };
        for (token, tenant) in at.kernel_sessions() {
            // A session of a known user whose tenant is not known: 0 (see
            // `check_session_tenant`).
            if self.kernel_tenants.as_ref().map_or(0, |s| s.len())
                >= tracer_common::MAX_SESSION_TENANTS as usize
            {
                break;
            }
            self.hand_session(token, tenant.unwrap_or(0));
        }
    }

    /// Tells the kernel session `token`'s tenant hash `th`, unless it was told exactly that.
    fn hand_session(&mut self, token: u64, th: u64) {
        let Some(seen) = self.kernel_tenants.as_mut() else {
            return;
        };
        if seen.get(&token) == Some(&th) {
            return;
        }
        // Only a cache of what the kernel was told: forgetting it re-sends, nothing else.
        if seen.len() >= tracer_common::MAX_SESSION_TENANTS as usize {
            seen.clear();
        }
        seen.insert(token, th);
        self.fx.kernel.push(Action::SessionTenant {
            hash: token,
            tenant: th,
        });
    }

    /// Hands the kernel a session token's tenant when it is new or changed, so the kernel
    /// refuses that session's requests that name another tenant (`SESSION_TENANTS`). The login
    /// exchange that learned the session hands it over before its next request, as a rule.
    pub(super) fn check_session_tenant(&mut self, who: Option<&Attribution>, held: bool) {
        if self.kernel_tenants.is_none() {
            return;
        }
        let (Some(a), Some(at)) = (who, self.attributor.as_ref()) else {
            return;
        };
        let Some(token) = a.token else {
            return;
        };
        // A session of a known user whose tenant stays unknown through `TENANTLESS_HOLDS`
        // held requests: 0, checked for nothing and held no more (nothing could judge its
        // requests; the detectors' `tenants_spanned` still sees them).
        let th = match (a.tenant.as_deref(), &a.user_id) {
            (Some(t), _) => match at.tenant_khash(t) {
                Some(h) => h,
                None => return,
            },
            (None, Some(_)) if held => {
                if self.tenantless.len() >= tracer_common::MAX_SESSION_TENANTS as usize {
                    self.tenantless.clear();
                }
                let n = self.tenantless.entry(token).or_insert(0);
                *n += 1;
                if *n < TENANTLESS_HOLDS {
                    return;
                }
                0
            }
            _ => return,
        };
        self.hand_session(token, th);
    }

    /// The kernel refused a request on connection `id` because it named another tenant than its
    /// session's: the connection is reset (its answers are already dropped), counted. The
    /// request itself still becomes a record with its cross-tenant attempt, whose rule decides.
    pub(super) fn kernel_cross_tenant(&mut self, id: ConnId) {
        self.stats
            .add_reason(Metric::EnforcementRequestsStopped, "kernel_cross_tenant", 1);
        let rule = self.cross_tenant_blocks().map(str::to_string);
        let decision = format!("rule:{}", rule.as_deref().unwrap_or("cross_tenant"));
        self.kernel_blocked(id, decision);
    }

    /// The first cross-tenant rule that blocks (not in shadow mode).
    fn cross_tenant_blocks(&self) -> Option<&str> {
        self.s
            .rules
            .iter()
            .find(|r| r.kind == RuleKind::CrossTenant && !r.block.is_empty() && !r.shadow)
            .map(|r| r.id.as_str())
    }

    /// The kernel holds connection `id`'s answers until its request is judged (a session it
    /// does not know named a tenant): the request-time check of that request releases or
    /// stops it.
    pub(super) fn hold(&mut self, id: ConnId, placed: bool) {
        self.held.insert(id, placed);
    }

    /// A hold ends (`outcome`: `released` after the request was judged, `stopped` when the
    /// judgement blocked the connection, `closed` when it ended first): unless the connection
    /// is blocked, the kernel lets its answers go (TCP sends them again).
    pub(super) fn release_hold(&mut self, id: ConnId, placed: bool, outcome: &'static str) {
        self.stats
            .add_reason(Metric::EnforcementRequestsHeld, outcome, 1);
        if !placed {
            return;
        }
        match self.conns.get(&id) {
            Some(c) if c.blocked_by.is_some() => {}
            Some(c) => {
                if let Some(tuple) = c.tuple {
                    self.fx.kernel.push(Action::UnblockConn { tuple });
                }
            }
            None => {}
        }
    }

    /// One request as soon as it is read (see the module docs); a held connection is released
    /// or stopped by it.
    pub(super) fn request_read(&mut self, r: RequestRead, at: &ConnFacts) {
        let held = self.held.remove(&at.id);
        let stopped = self.check_request(r, at, held.is_some());
        if let Some(placed) = held {
            let outcome = if stopped { "stopped" } else { "released" };
            self.release_hold(at.id, placed, outcome);
        }
    }

    /// The request-time check; `true` when it stopped the request's connection.
    fn check_request(&mut self, r: RequestRead, at: &ConnFacts, held: bool) -> bool {
        if !self.early_checks_wanted() {
            return false;
        }
        let (_, service) = self.process(at.id.tgid);
        if !self.is_edge(&service) {
            return false;
        }
        let route = self.s.routes.match_as(
            &r.request.method,
            &r.request.target,
            self.path_view(&service),
        );
        let start_unix_ns = (r.request.first_ns as i128 + self.s.mono_to_unix_ns).max(0) as u64;
        let now_ms = self.now_ms(start_unix_ns);
        let peer: Option<IpAddr> = at.tuple.map(|t| t.peer.ip());
        let Some(attributor) = self.attributor.as_mut() else {
            return false;
        };
        // Only a login route's name is passed: the request has no answer yet, and the other
        // routes' rules (identity endpoints, logout) learn from answers. The path's own step
        // attributes the exchange again, counted; this look is not counted.
        let login_route = route
            .as_ref()
            .map(|m| m.name.as_str())
            .filter(|n| attributor.is_login_route(n));
        let ex = Exchange {
            request: r.request,
            response: None,
            completeness: Completeness::NoResponse,
            upgraded: false,
            stream_id: None,
        };
        let who = attributor.attribute(&ex, login_route, peer, &self.scratch_stats);
        // The kernel learns the session's tenant now if it had not (so its next request is
        // checked in the kernel, not held).
        self.check_session_tenant(Some(&who), held);
        let stop = if let Some(d) =
            self.decisions
                .blocking(who.user_id.as_deref(), who.session_id.as_deref(), now_ms)
        {
            Some((Stop::Blocked, d.id.clone()))
        } else if let Some(d) = [who.token, who.login_token]
            .into_iter()
            .flatten()
            .find_map(|t| self.blocked_tokens.get(&t).cloned())
        {
            Some((Stop::Token, d))
        } else {
            match (
                self.cross_tenant_blocks().map(str::to_string),
                cross_tenant_attempt(&self.s.routes, &ex.request, &who, route.as_ref()),
            ) {
                (Some(rule), Some(_school)) => Some((Stop::CrossTenant, format!("rule:{rule}"))),
                _ => None,
            }
        };
        let Some((why, decision)) = stop else {
            return false;
        };
        let newly = self
            .conns
            .get(&at.id)
            .is_some_and(|c| c.blocked_by.is_none());
        if newly {
            self.stats
                .add_reason(Metric::EnforcementRequestsStopped, why.reason(), 1);
        }
        self.block_conn(at.id, &decision);
        if why != Stop::CrossTenant {
            for t in [who.token, who.login_token].into_iter().flatten() {
                self.block_token(t, &decision);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        sync::{Arc, RwLock},
    };

    use bytes::Bytes;
    use tracer_common::*;

    use super::super::{Action, Effects, Pipeline, Settings};
    use crate::{
        attribute::attribution::{Attributor, Keyer},
        attribute::jsonpath::JsonPath,
        attribute::routes::{RouteTable, TenantParam},
        capture::decode::Event,
        config::{BlockScope, By, IdentityConfig, LoginRule, RouteConfig, Rule, RuleKind},
        detect::decide::Scope,
        http::ParserLimits,
        stats::{Metric, Stats},
    };

    fn pipeline() -> (Pipeline, Arc<Stats>) {
        pipeline_with(vec![])
    }

    fn pipeline_with(rules: Vec<Rule>) -> (Pipeline, Arc<Stats>) {
        let routes = RouteTable::new(&[
            RouteConfig {
                route: "POST /login".into(),
                name: "login".into(),
                query_params: vec![],
                tenant_param: None,
            },
            RouteConfig {
                route: "GET /p/{id}".into(),
                name: "p".into(),
                query_params: vec![],
                tenant_param: None,
            },
            RouteConfig {
                route: "GET /s/{org}/persons".into(),
                name: "persons".into(),
                query_params: vec![],
                tenant_param: Some(TenantParam::Path("org".into())),
            },
        ])
        .unwrap();
        let s = Settings {
            path_views: HashMap::new(),
            limits: ParserLimits::default(),
            routes,
            record_unmatched: false,
            host_name: "h".into(),
            mono_to_unix_ns: 0,
            disclosure: Default::default(),
            detection: Default::default(),
            rules,
            record_caps: Default::default(),
        };
        assert!(s.detection.enforce);
        let stats = Arc::new(Stats::default());
        let mut p = Pipeline::new(s, Arc::new(RwLock::new(HashMap::new())), stats.clone());
        let mut a = Attributor::new(
            IdentityConfig {
                session_cookies: vec!["sid".into()],
                login: vec![LoginRule {
                    route: "login".into(),
                    username: Some("username".into()),
                    user_id: Some(JsonPath::parse("$.userId").unwrap()),
                    role: None,
                    tenant: Some(JsonPath::parse("$.school").unwrap()),
                    token: None,
                }],
                ..IdentityConfig::default()
            },
            Keyer::new([7; 32]),
        );
        a.set_token_seed(0x5eed);
        p.set_attributor(a);
        (p, stats)
    }

    fn conn(fd: u32) -> ConnId {
        ConnId {
            tgid: 4_000_000,
            fd,
            gen: fd as u64,
        }
    }

    fn open(fd: u32) -> Event {
        let mut t = Tuple {
            family: AF_INET,
            local_port: 443,
            peer_port: 40000 + fd as u16,
            ..Default::default()
        };
        t.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        t.peer_addr[..4].copy_from_slice(&[127, 0, 0, 2]);
        Event::ConnOpen {
            hdr: EventHeader {
                kind: KIND_CONN_OPEN,
                ..Default::default()
            },
            conn: conn(fd),
            tuple: t,
            origin: ORIGIN_ACCEPT,
            tls: true,
        }
    }

    fn data(fd: u32, dir: u8, pos: u64, b: &[u8]) -> Event {
        Event::Data {
            hdr: EventHeader {
                kind: KIND_DATA,
                ts_ns: 10 + pos,
                flags: DATA_F_TLS,
                ..Default::default()
            },
            conn: conn(fd),
            pos,
            msg_len: b.len() as u32,
            dir,
            src: SRC_TLS,
            payload: Bytes::copy_from_slice(b),
        }
    }

    fn login(user: &str) -> String {
        let body = format!("username={user}&password=x");
        format!(
            "POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    /// A blocking cross-tenant rule.
    fn cross_tenant_rule() -> Rule {
        Rule {
            id: "xt".into(),
            name: "cross tenant".into(),
            kind: RuleKind::CrossTenant,
            by: By::User,
            routes: vec![],
            shadow: false,
            block: vec![std::time::Duration::from_secs(600)],
            scope: BlockScope::User,
        }
    }

    /// Pupil `u1` of sch-01 logs in on connection 1 and gets session `abc`.
    fn log_in(p: &mut Pipeline) -> Effects {
        let body = r#"{"userId":"u1","school":"sch-01"}"#;
        let resp = format!(
            "HTTP/1.1 200 OK\r\nSet-Cookie: sid=abc; Path=/\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        p.handle([
            open(1),
            data(1, DIR_IN, 0, login("pupil").as_bytes()),
            data(1, DIR_OUT, 0, resp.as_bytes()),
        ])
    }

    fn blocked_conns(fx: &Effects) -> Vec<u16> {
        fx.kernel
            .iter()
            .filter_map(|a| match a {
                Action::BlockConn { tuple, .. } => Some(tuple.peer.port()),
                _ => None,
            })
            .collect()
    }

    /// A blocked user's requests are stopped as soon as they are read, with no answer yet: by
    /// session (the cookie, after a padded head), and by login name however it is encoded. An
    /// honest user's request is not.
    #[test]
    fn requests_of_a_blocked_user_are_stopped_before_their_answer() {
        let (mut p, stats) = pipeline();
        let req = login("pupil");
        let body = r#"{"userId":"u1"}"#;
        let resp = format!(
            "HTTP/1.1 200 OK\r\nSet-Cookie: sid=abc; Path=/\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let fx = p.handle([
            open(1),
            data(1, DIR_IN, 0, req.as_bytes()),
            data(1, DIR_OUT, 0, resp.as_bytes()),
        ]);
        assert_eq!(fx.access.len(), 1);
        assert!(blocked_conns(&fx).is_empty());
        let (_, fx) = p.operator_block(Scope::User, "u1".into(), 600_000, "t".into(), 1);
        // The session token and the login name go to the kernel.
        assert_eq!(
            fx.kernel
                .iter()
                .filter(|a| matches!(a, Action::BlockToken { .. }))
                .count(),
            2
        );
        let padded = format!(
            "GET /p/1 HTTP/1.1\r\nHost: x\r\n{}cOOKIE: sid=abc\r\n\r\n",
            "X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n".repeat(900)
        );
        let fx = p.handle([
            open(2),
            data(2, DIR_IN, 0, padded.as_bytes()),
            open(3),
            data(3, DIR_IN, 0, login("%70upil").as_bytes()),
            open(4),
            data(
                4,
                DIR_IN,
                0,
                b"GET /p/1 HTTP/1.1\r\nHost: x\r\nCookie: sid=other\r\n\r\n",
            ),
        ]);
        assert_eq!(blocked_conns(&fx), vec![40002, 40003]);
        assert!(fx.access.is_empty(), "no exchange is complete yet");
        assert_eq!(
            stats.get_reason(Metric::EnforcementRequestsStopped, "blocked"),
            1
        );
        assert_eq!(
            stats.get_reason(Metric::EnforcementRequestsStopped, "blocked_token"),
            1
        );
    }

    /// The incident's call: a pupil of sch-01 (school learned at login) names sch-02 in the
    /// path. Under a blocking cross-tenant rule its connection is stopped as soon as the request
    /// is read, before any answer; a call to its own school is not.
    #[test]
    fn a_cross_tenant_attempt_is_stopped_before_its_answer() {
        let (mut p, stats) = pipeline_with(vec![cross_tenant_rule()]);
        let fx = log_in(&mut p);
        assert_eq!(fx.access.len(), 1);
        assert!(blocked_conns(&fx).is_empty());
        let fx = p.handle([
            open(2),
            data(
                2,
                DIR_IN,
                0,
                b"GET /s/sch-01/persons HTTP/1.1\r\nHost: x\r\nCookie: sid=abc\r\n\r\n",
            ),
            open(3),
            data(
                3,
                DIR_IN,
                0,
                b"GET /s/sch-02/persons HTTP/1.1\r\nHost: x\r\nCookie: sid=abc\r\n\r\n",
            ),
        ]);
        assert_eq!(blocked_conns(&fx), vec![40003]);
        assert!(fx.access.is_empty(), "no exchange is complete yet");
        assert_eq!(
            stats.get_reason(Metric::EnforcementRequestsStopped, "cross_tenant"),
            1
        );
    }

    /// The kernel's patterns for the demo's tenant routes; a route with a parameter before its
    /// tenant segment is left to the agent, and said so.
    #[test]
    fn tenant_patterns_follow_the_routes() {
        let routes = RouteTable::new(&[
            RouteConfig {
                route: "GET /api/addressbook/persons".into(),
                name: "q".into(),
                query_params: vec![],
                tenant_param: Some(TenantParam::Query("schoolId".into())),
            },
            RouteConfig {
                route: "GET /api/addressbook/schools/{schoolId}/persons".into(),
                name: "p".into(),
                query_params: vec![],
                tenant_param: Some(TenantParam::Path("schoolId".into())),
            },
            RouteConfig {
                route: "GET /api/{v}/orgs/{org}".into(),
                name: "o".into(),
                query_params: vec![],
                tenant_param: Some(TenantParam::Path("org".into())),
            },
            RouteConfig {
                route: "GET /api/a-very-long-static-prefix-of-this-route/persons".into(),
                name: "l".into(),
                query_params: vec![],
                tenant_param: Some(TenantParam::Query("schoolId".into())),
            },
            RouteConfig {
                route: "GET /api/me".into(),
                name: "me".into(),
                query_params: vec![],
                tenant_param: None,
            },
        ])
        .unwrap();
        let (pats, skipped) = super::tenant_patterns(&routes);
        assert_eq!(
            pats,
            vec![
                (b"/api/addressbook/persons".to_vec(), scan::PK_ROUTE),
                (b"schoolId=".to_vec(), scan::PK_TENANT_QUERY),
                (b"/api/addressbook/schools/".to_vec(), scan::PK_TENANT_PATH),
                (
                    b"-static-prefix-of-this-route/persons"[4..].to_vec(),
                    scan::PK_ROUTE
                ),
            ]
        );
        assert_eq!(skipped.len(), 1);
        assert!(
            skipped[0].starts_with("/api/{v}/orgs/{org}: "),
            "{skipped:?}"
        );
    }

    /// With the kernel's checks on, each session token is handed to the kernel with its school
    /// once (at the login that learned it); a kernel refusal of a cross-tenant request resets
    /// its connection and is counted.
    #[test]
    fn sessions_are_handed_to_the_kernel_with_their_school() {
        let (mut p, stats) = pipeline_with(vec![cross_tenant_rule()]);
        let (pats, _) = p.kernel_tenant_patterns();
        assert_eq!(pats, vec![(b"/s/".to_vec(), scan::PK_TENANT_PATH)]);
        p.set_kernel_tenant_checks(true);
        let fx = log_in(&mut p);
        let handed = |fx: &Effects| -> Vec<(u64, u64)> {
            fx.kernel
                .iter()
                .filter_map(|a| match a {
                    Action::SessionTenant { hash, tenant } => Some((*hash, *tenant)),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(
            handed(&fx),
            vec![(token_hash(0x5eed, b"abc"), tenant_hash(0x5eed, b"sch-01"))]
        );
        let own = b"GET /s/sch-01/persons HTTP/1.1\r\nHost: x\r\nCookie: sid=abc\r\n\r\n";
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        let fx = p.handle([open(2), data(2, DIR_IN, 0, own), data(2, DIR_OUT, 0, ok)]);
        assert_eq!(fx.access.len(), 1);
        assert!(handed(&fx).is_empty(), "told once");
        let fx = p.handle([
            open(3),
            Event::EnforceHit {
                hdr: EventHeader {
                    kind: KIND_ENFORCE_HIT,
                    flags: HIT_F_CROSS_TENANT | HIT_F_CONN_BLOCKED | HIT_F_TLS,
                    ..Default::default()
                },
                conn: conn(3),
                hash: token_hash(0x5eed, b"abc"),
            },
        ]);
        assert_eq!(blocked_conns(&fx), vec![40003]);
        assert_eq!(
            stats.get_reason(Metric::EnforcementRequestsStopped, "kernel_cross_tenant"),
            1
        );
        assert_eq!(stats.get(Metric::EnforcementHitsUnmatched), 0);
    }

    /// A held connection (a session the kernel did not know named a school) is stopped when
    /// its request names another school than the session's, and released otherwise; one that
    /// closes first is released too.
    #[test]
    fn held_requests_are_judged_then_released_or_stopped() {
        let (mut p, stats) = pipeline_with(vec![cross_tenant_rule()]);
        p.set_kernel_tenant_checks(true);
        log_in(&mut p);
        let hold = |fd: u32| Event::EnforceHit {
            hdr: EventHeader {
                kind: KIND_ENFORCE_HIT,
                flags: HIT_F_HOLD | HIT_F_CONN_BLOCKED | HIT_F_TLS,
                ..Default::default()
            },
            conn: conn(fd),
            hash: token_hash(0x5eed, b"abc"),
        };
        let unblocked = |fx: &Effects| -> Vec<u16> {
            fx.kernel
                .iter()
                .filter_map(|a| match a {
                    Action::UnblockConn { tuple } => Some(tuple.peer.port()),
                    _ => None,
                })
                .collect()
        };
        let fx = p.handle([
            open(2),
            hold(2),
            data(
                2,
                DIR_IN,
                0,
                b"GET /s/sch-01/persons HTTP/1.1\r\nHost: x\r\nCookie: sid=abc\r\n\r\n",
            ),
            open(3),
            hold(3),
            data(
                3,
                DIR_IN,
                0,
                b"GET /s/sch-02/persons HTTP/1.1\r\nHost: x\r\nCookie: sid=abc\r\n\r\n",
            ),
            open(4),
            hold(4),
        ]);
        assert_eq!(unblocked(&fx), vec![40002]);
        assert_eq!(blocked_conns(&fx), vec![40003]);
        assert_eq!(
            stats.get_reason(Metric::EnforcementRequestsHeld, "released"),
            1
        );
        assert_eq!(
            stats.get_reason(Metric::EnforcementRequestsHeld, "stopped"),
            1
        );
        let fx = p.handle([Event::ConnClose {
            hdr: EventHeader {
                kind: KIND_CONN_CLOSE,
                ..Default::default()
            },
            conn: conn(4),
            pos_in: 0,
            pos_out: 0,
        }]);
        assert_eq!(unblocked(&fx), vec![40004]);
        assert_eq!(
            stats.get_reason(Metric::EnforcementRequestsHeld, "closed"),
            1
        );
    }

    /// Nothing is blocked: requests are not looked at early.
    #[test]
    fn nothing_blocked_nothing_looked_at() {
        let (mut p, stats) = pipeline();
        assert!(!p.early_checks_wanted());
        let fx = p.handle([
            open(1),
            data(
                1,
                DIR_IN,
                0,
                b"GET /p/1 HTTP/1.1\r\nHost: x\r\nCookie: sid=abc\r\n\r\n",
            ),
        ]);
        assert!(fx.kernel.is_empty());
        assert_eq!(
            stats.get_reason(Metric::EnforcementRequestsStopped, "blocked"),
            0
        );
    }
}
