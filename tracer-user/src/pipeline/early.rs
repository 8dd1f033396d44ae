//! The request-time check: a request is looked at as soon as the HTTP parser has read it (its
//! head, and again with its body), before its answer. A request of a blocked user or session,
//! one that carries a blocked token or login name, or a cross-tenant attempt under a blocking
//! rule puts its connection into the kernel's drop table (and its tokens into the token table)
//! right away, so the answer the server writes never leaves. This is the fallback for what the
//! kernel's own scan (`tracer_common::scan`) cannot see: heads and bodies past its bounds, forms
//! it does not decode, requests read before the token was known.

use std::net::IpAddr;

use super::{ConnFacts, Pipeline};
use crate::{
    attribute::attribution::Attribution,
    attribute::routes::{RouteMatch, RouteTable},
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

    /// The first cross-tenant rule that blocks (not in shadow mode).
    fn cross_tenant_blocks(&self) -> Option<&str> {
        self.s
            .rules
            .iter()
            .find(|r| r.kind == RuleKind::CrossTenant && !r.block.is_empty() && !r.shadow)
            .map(|r| r.id.as_str())
    }

    /// One request as soon as it is read (see the module docs).
    pub(super) fn request_read(&mut self, r: RequestRead, at: &ConnFacts) {
        if !self.early_checks_wanted() {
            return;
        }
        let (_, service) = self.process(at.id.tgid);
        if !self.is_edge(&service) {
            return;
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
            return;
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
        };
        let who = attributor.attribute(&ex, login_route, peer, &self.scratch_stats);
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
            return;
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
        let (mut p, stats) = pipeline_with(vec![Rule {
            id: "xt".into(),
            name: "cross tenant".into(),
            kind: RuleKind::CrossTenant,
            by: By::User,
            routes: vec![],
            shadow: false,
            block: vec![std::time::Duration::from_secs(600)],
            scope: BlockScope::User,
        }]);
        let req = login("pupil");
        let body = r#"{"userId":"u1","school":"sch-01"}"#;
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
