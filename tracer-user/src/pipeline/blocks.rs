//! Decisions → kernel enforcement, as the pipeline keeps it: which connections and tokens a
//! decision blocked, the kernel actions that block and unblock them, and the end records. The
//! actions go out in the step's [`Effects`](super::Effects); the commit carries them out and
//! reports back what the kernel did (`Pipeline::enforcement_done`).

use tracer_common::ConnId;

use super::{Action, Pipeline};
use crate::{
    attribute::attribution::Attribution,
    detect::decide::{Decision, EndReason, Scope},
    exchange::Tuple,
    http::ConnProtocol,
    record::security::{self, Phase},
    stats::Metric,
};

impl Pipeline {
    /// Forgets a connection; a blocked one is unblocked in the kernel.
    pub(super) fn drop_conn(&mut self, id: ConnId) {
        if let Some(placed) = self.held.remove(&id) {
            self.release_hold(id, placed, "closed");
        }
        if let Some(c) = self.conns.remove(&id) {
            let protocol = match c.parser.state() {
                ConnProtocol::Http1 => "http1",
                ConnProtocol::Http2 => "h2",
                ConnProtocol::Http2Midstream => "h2_midstream",
                ConnProtocol::TlsOnPlaintext => "tls_on_plaintext",
                ConnProtocol::Upgraded => "upgraded",
                ConnProtocol::Unknown => "unknown",
            };
            self.stats
                .add_label(Metric::ConnectionsProtocol, "protocol", protocol, 1);
            if let (Some(_), Some(tuple)) = (c.blocked_by, c.tuple) {
                self.fx.kernel.push(Action::UnblockConn { tuple });
            }
        }
    }

    /// The kernel refused a request carrying a blocked token on connection `id` (its responses
    /// are dropped from now on): the agent resets the connection and counts it.
    pub(super) fn enforce_hit(&mut self, id: ConnId, hash: u64) {
        self.stats.add(Metric::EnforcementRequestsRefused, 1);
        let Some(decision) = self.blocked_tokens.get(&hash).cloned() else {
            self.stats
                .add_reason(Metric::EnforcementHitsUnmatched, "token_unknown", 1);
            return;
        };
        self.kernel_blocked(id, decision);
    }

    /// The kernel blocked connection `id` itself (a refused request): the agent owns the block
    /// from now on under `decision`, resets the connection, and unblocks it when it closes.
    /// Unlike `block_conn` this does not ask whether enforcement is on: the kernel already
    /// acted.
    pub(super) fn kernel_blocked(&mut self, id: ConnId, decision: String) {
        if let Some(c) = self.conns.get_mut(&id) {
            if c.blocked_by.is_none() {
                if let Some(tuple) = c.tuple {
                    c.blocked_by = Some(decision.clone());
                    self.fx.kernel.push(Action::BlockConn { tuple, decision });
                }
            }
        }
    }

    /// A call of a blocked user or session: the decision that blocks it. On the edge its
    /// connection is blocked, and its tokens (a new session, a login name) are refused from
    /// now on.
    pub(super) fn blocked(
        &mut self,
        id: ConnId,
        a: &Attribution,
        now_ms: u64,
        edge: bool,
    ) -> Option<String> {
        let did = self
            .decisions
            .blocking(a.user_id.as_deref(), a.session_id.as_deref(), now_ms)?
            .id
            .clone();
        self.stats.add(Metric::ExchangesBlocked, 1);
        if edge {
            self.block_conn(id, &did);
        }
        for t in [a.token, a.login_token].into_iter().flatten() {
            self.block_token(t, &did);
        }
        Some(did)
    }

    pub(super) fn block_conn(&mut self, id: ConnId, decision: &str) {
        if !self.s.detection.enforce {
            return;
        }
        if let Some(c) = self.conns.get_mut(&id) {
            if c.blocked_by.is_none() {
                if let Some(tuple) = c.tuple {
                    c.blocked_by = Some(decision.to_string());
                    self.fx.kernel.push(Action::BlockConn {
                        tuple,
                        decision: decision.to_string(),
                    });
                }
            }
        }
    }

    pub(super) fn block_token(&mut self, hash: u64, decision: &str) {
        if self.s.detection.enforce && !self.blocked_tokens.contains_key(&hash) {
            self.blocked_tokens.insert(hash, decision.to_string());
            self.fx.kernel.push(Action::BlockToken {
                hash,
                decision: decision.to_string(),
            });
        }
    }

    /// Blocks every open edge connection of the decision's user or session, and every token of
    /// theirs the agent knows, so their next requests are refused in the kernel.
    pub(super) fn enforce_decision(&mut self, d: &Decision) {
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

    /// Decisions end: their end records (with what enforcement did), and every connection and
    /// token they blocked is unblocked.
    pub(super) fn end_decisions(&mut self, ended: Vec<Decision>, why: EndReason, now_ms: u64) {
        for d in ended {
            let id = self.ids.next_id();
            let enf = self.enforced.remove(&d.id);
            self.fx.security.push(security::decision_line(
                &d,
                Phase::End(why),
                &id,
                now_ms,
                &self.s.host_name,
                enf.as_ref(),
            ));
            self.stats
                .add_reason(Metric::DecisionsEnded, why.as_str(), 1);
            let tuples: Vec<Tuple> = self
                .conns
                .values_mut()
                .filter(|c| c.blocked_by.as_deref() == Some(d.id.as_str()))
                .filter_map(|c| {
                    c.blocked_by = None;
                    c.tuple
                })
                .collect();
            for tuple in tuples {
                self.fx.kernel.push(Action::UnblockConn { tuple });
            }
            let hashes: Vec<u64> = self
                .blocked_tokens
                .iter()
                .filter(|(_, did)| **did == d.id)
                .map(|(h, _)| *h)
                .collect();
            for hash in hashes {
                self.blocked_tokens.remove(&hash);
                self.fx.kernel.push(Action::UnblockToken { hash });
            }
        }
    }
}
