//! Who made each call: the session credential the request carries (cookie, bearer token or
//! header), the identity behind it (learned from login exchanges and identity endpoints, read
//! from JWT claims, or set by a trusted proxy), and the real client address behind trusted
//! proxies. Learned sessions persist across restarts in the state directory.
//!
//! # Privacy
//! Credentials never leave this module: a session is known only by its keyed hash
//! ([`Keyer::session_id`]), in records and in the state file alike. User names from login forms
//! are kept only as keyed hashes (`user.hash`), since they are often e-mail addresses.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;

use super::credentials::{
    bearer_token, cookie_crumbs, jwt_claims, login_username, now_unix, session_header_values, Read,
};
pub use super::credentials::{
    forwarded_client, request_cookie, set_cookies, token_patterns_for_field, SetCookie,
};
use super::jwt::JwtCheck;
use crate::{
    attribute::jsonpath::{scalar_id, JsonPath},
    config::{CredentialKind, IdentityConfig, LoginRule},
    exchange::{header, Exchange, Header},
    stats::{Metric, Stats},
};

/// File name of the HMAC key in the state directory.
pub const KEY_FILE: &str = "secret.key";
/// How long a session stays known after its logout (other hops see the same exchange).
pub const LOGOUT_GRACE_SECS: u64 = 30;
/// File name of the learned sessions in the state directory.
pub const SESSIONS_FILE: &str = "sessions.json";

#[derive(Debug, thiserror::Error)]
pub enum AttributionError {
    #[error("{path}: {what}: {source}; the state directory must be writable by the agent")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{path}: the key file must hold exactly 32 bytes, it holds {len}; remove it to have a new key made (session hashes will change)")]
    BadKey { path: PathBuf, len: usize },
}

/// Keyed hashes (HMAC-SHA256) with the agent's own key, so a session hash cannot be reversed
/// or recomputed by anyone without the key file.
pub struct Keyer {
    key: [u8; 32],
}

impl Keyer {
    pub fn new(key: [u8; 32]) -> Keyer {
        Keyer { key }
    }

    /// Reads `<dir>/secret.key`, or creates it (32 random bytes, mode 0600) on first start.
    pub fn load_or_create(dir: &Path) -> Result<Keyer, AttributionError> {
        use std::io::{Read, Write};
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(KEY_FILE);
        let io = |what, source| AttributionError::Io {
            path: path.clone(),
            what,
            source,
        };
        match std::fs::read(&path) {
            Ok(b) => {
                let key: [u8; 32] =
                    b.as_slice()
                        .try_into()
                        .map_err(|_| AttributionError::BadKey {
                            path: path.clone(),
                            len: b.len(),
                        })?;
                Ok(Keyer { key })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                std::fs::File::open("/dev/urandom")
                    .and_then(|mut f| f.read_exact(&mut key))
                    .map_err(|e| io("reading /dev/urandom for a new key", e))?;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| io("creating the key file", e))?;
                f.write_all(&key)
                    .and_then(|_| f.sync_all())
                    .map_err(|e| io("writing the key file", e))?;
                log::info!("created a new HMAC key at {} (mode 0600)", path.display());
                Ok(Keyer { key })
            }
            Err(e) => Err(io("reading the key file", e)),
        }
    }

    fn mac(&self, domain: &str, value: &[u8]) -> String {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.key).expect("any key length");
        m.update(domain.as_bytes());
        m.update(value);
        let out = m.finalize().into_bytes();
        hex(&out[..16])
    }

    /// `session.id`: the first 16 bytes, in hex, of HMAC-SHA256(key, "session:" + credential).
    pub fn session_id(&self, credential: &str) -> String {
        self.mac("session:", credential.as_bytes())
    }

    /// `user.hash`: HMAC-SHA256(key, "user:" + user name), first 16 bytes in hex.
    pub fn user_hash(&self, name: &str) -> String {
        self.mac("user:", name.as_bytes())
    }

    /// A key of its own for another keyed hash of the agent's (the detectors' sketches):
    /// the first 16 bytes of HMAC-SHA256(key, "subkey:" + purpose). Nobody without the key
    /// file can predict where a value lands in a sketch keyed with it.
    pub fn subkey(&self, purpose: &str) -> [u8; 16] {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.key).expect("any key length");
        m.update(b"subkey:");
        m.update(purpose.as_bytes());
        let out = m.finalize().into_bytes();
        let mut k = [0u8; 16];
        k.copy_from_slice(&out[..16]);
        k
    }
}

pub fn hex(b: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// How the request presented its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionKind {
    Cookie,
    Bearer,
    Header,
}

impl SessionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionKind::Cookie => "cookie",
            SessionKind::Bearer => "bearer",
            SessionKind::Header => "header",
        }
    }
}

/// Where the identity in a record comes from (`abook.identity.source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentitySource {
    /// Learned from a login exchange.
    Login,
    /// Learned from an identity endpoint's answer.
    IdentityEndpoint,
    /// Claims of the bearer token itself.
    Jwt,
    /// Headers set by a trusted proxy.
    ProxyHeader,
    /// A session credential whose identity the agent has not learned.
    Unknown,
    /// No session credential at all.
    None,
    /// The platform refused the credentials (401).
    Rejected,
    /// The request carries a credential the agent cannot read as the server would (see
    /// [`crate::attribute::credentials`]): the caller is not known, and that is a signal.
    Unreadable,
}

impl IdentitySource {
    pub fn as_str(self) -> &'static str {
        match self {
            IdentitySource::Login => "login",
            IdentitySource::IdentityEndpoint => "identity_endpoint",
            IdentitySource::Jwt => "jwt",
            IdentitySource::ProxyHeader => "proxy_header",
            IdentitySource::Unknown => "unknown",
            IdentitySource::None => "none",
            IdentitySource::Rejected => "rejected",
            IdentitySource::Unreadable => "unreadable",
        }
    }
}

/// A session credential as presented (the raw value never leaves this module).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub kind: SessionKind,
    value: String,
}

/// Something about a request's credentials (or its tenant parameter) that an honest client
/// does not do; listed in the record (`sparbar.anomalies`) and counted
/// (`attribution_anomalies_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Anomaly {
    /// Two different credentials (kinds, or crumbs of one cookie) in one request.
    TwoCredentials,
    /// A credential the agent cannot read as the server would.
    UnreadableCredential,
    /// A JWT whose signature should verify with the configured keys and does not (or `alg:
    /// none`, an unknown `kid`, an algorithm the keys are not for).
    JwtSignatureInvalid,
    /// The route's tenant parameter given several times with different values.
    DuplicateTenantParam,
}

impl Anomaly {
    pub fn as_str(self) -> &'static str {
        match self {
            Anomaly::TwoCredentials => "two_credentials",
            Anomaly::UnreadableCredential => "unreadable_credential",
            Anomaly::JwtSignatureInvalid => "jwt_signature_invalid",
            Anomaly::DuplicateTenantParam => "duplicate_tenant_param",
        }
    }
}

/// Every credential a request presents, in the order the platform believes them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Presented {
    /// The one the platform acts on: `Err(kind)` when it cannot be read.
    pub winner: Option<Result<Credential, SessionKind>>,
    /// Other readable credentials with a value different from the winner's (distinct).
    pub others: Vec<Credential>,
    /// How many of the others cannot be read.
    pub unreadable_others: usize,
}
/// Who made one call, as far as the agent knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribution {
    pub session_id: Option<String>,
    pub session_kind: Option<SessionKind>,
    pub user_id: Option<String>,
    pub user_hash: Option<String>,
    pub role: Option<String>,
    pub tenant: Option<String>,
    pub source: IdentitySource,
    /// The real client: from X-Forwarded-For/Forwarded when the peer is a trusted proxy, else
    /// the peer.
    pub client_ip: Option<IpAddr>,
    /// The kernel's hash of the credential (see `tracer_common::token_hash`), for blocking it
    /// in the kernel; only when the kernel's seed is set.
    pub token: Option<u64>,
    /// The kernel's hash of the user name of a login request.
    pub login_token: Option<u64>,
    /// Every session hash the request carried when it carried several (the believed one first);
    /// empty otherwise.
    pub session_ids: Vec<String>,
    /// What was odd about the request's credentials, sorted, each once.
    pub anomalies: Vec<Anomaly>,
}

impl Attribution {
    fn flag(&mut self, x: Anomaly) {
        if let Err(i) = self.anomalies.binary_search(&x) {
            self.anomalies.insert(i, x);
        }
    }
}

/// What the agent remembers of one session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SessionEntry {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    user_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    user_hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    tenant: Option<String>,
    source: IdentitySource,
    kind: SessionKind,
    /// Unix seconds after which the session is gone (its cookie's or token's own expiry).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    expires: Option<u64>,
    /// Unix seconds of the last call seen with it.
    last_seen: u64,
    /// The kernel's hash of the credential (`tracer_common::token_hash` with the seed the agent
    /// derives from its secret: a keyed hash, so the kernel can be handed the session again
    /// after a restart).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    token: Option<u64>,
}

/// What the agent knows of a user across sessions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct UserEntry {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    tenant: Option<String>,
    last_seen: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    sessions: HashMap<String, SessionEntry>,
    users: HashMap<String, UserEntry>,
}

/// Route indices of the identity rules, looked up by route name once.
pub struct Attributor {
    cfg: IdentityConfig,
    keyer: Keyer,
    sessions: HashMap<String, SessionEntry>,
    users: HashMap<String, UserEntry>,
    dirty: bool,
    state_path: Option<PathBuf>,
    /// The kernel's token hash seed; `None` until enforcement in the kernel is on.
    token_seed: Option<u64>,
    /// The kernel's hashes of each user's login names (memory only).
    login_tokens: HashMap<String, Vec<u64>>,
}

impl Attributor {
    pub fn new(cfg: IdentityConfig, keyer: Keyer) -> Attributor {
        Attributor {
            cfg,
            keyer,
            sessions: HashMap::new(),
            users: HashMap::new(),
            dirty: false,
            state_path: None,
            token_seed: None,
            login_tokens: HashMap::new(),
        }
    }

    /// A reload: the new identity settings apply from now on; learned sessions and users stay.
    pub fn reconfigure(&mut self, cfg: IdentityConfig) {
        self.cfg = cfg;
    }

    /// Turns on the kernel's token hashes (the seed the kernel programs use).
    pub fn set_token_seed(&mut self, seed: u64) {
        self.token_seed = Some(seed);
    }

    /// The seed of the kernel's token hashes, derived from the agent's secret: the same in
    /// every run, so the kernel hashes kept with sessions stay valid.
    pub fn derived_token_seed(&self) -> u64 {
        let k = self.keyer.subkey("kernel-token-seed");
        u64::from_le_bytes([k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7]])
    }

    /// Every learned session the kernel can be handed again (after a restart): its kernel
    /// token hash, and its tenant's (`tracer_common::tenant_hash`) when known.
    pub fn kernel_sessions(&self) -> Vec<(u64, Option<u64>)> {
        self.sessions
            .values()
            .filter(|e| e.user_id.is_some() || e.tenant.is_some())
            .filter_map(|e| {
                let t = e.token?;
                Some((t, e.tenant.as_deref().and_then(|x| self.tenant_khash(x))))
            })
            .collect()
    }

    /// The kernel's hash of a tenant id (`tracer_common::tenant_hash`), as the kernel hashes the
    /// tenant a request line names; only when the kernel's seed is set.
    pub fn tenant_khash(&self, tenant: &str) -> Option<u64> {
        self.token_seed
            .map(|seed| tracer_common::tenant_hash(seed, tenant.as_bytes()))
    }

    fn khash(&self, v: &[u8]) -> Option<u64> {
        self.token_seed
            .map(|seed| tracer_common::token_hash(seed, v))
    }

    /// The byte patterns after which the kernel finds a token in a request it reads: each
    /// session cookie (`name=`), `Bearer `, each session header (`Name: `) and each login form's
    /// user name field (`field=` and `"field":"`).
    pub fn kernel_patterns(&self) -> Vec<Vec<u8>> {
        let mut v: Vec<Vec<u8>> = Vec::new();
        for c in &self.cfg.session_cookies {
            v.push(format!("{c}=").into_bytes());
        }
        if self.cfg.bearer {
            v.push(b"Bearer ".to_vec());
        }
        for h in &self.cfg.session_headers {
            v.push(format!("{h}: ").into_bytes());
        }
        for l in &self.cfg.login {
            if let Some(f) = &l.username {
                v.extend(token_patterns_for_field(f));
            }
        }
        v.dedup();
        v
    }

    /// Whether any configured source names a caller's tenant (a login answer, an identity
    /// endpoint, a verified JWT claim, a trusted proxy header): without one no request can be
    /// judged a cross-tenant attempt.
    pub fn learns_tenants(&self) -> bool {
        self.cfg.login.iter().any(|l| l.tenant.is_some())
            || self.cfg.endpoints.iter().any(|e| e.tenant.is_some())
            || self.cfg.jwt.as_ref().is_some_and(|j| j.tenant.is_some())
            || self.cfg.proxy.as_ref().is_some_and(|p| p.tenant.is_some())
    }

    /// Whether route `name` is a login route (its request carries a login name).
    pub fn is_login_route(&self, name: &str) -> bool {
        self.cfg.login.iter().any(|l| l.route == name)
    }

    /// The kernel's hashes of every credential and login name known for a user (or a session).
    pub fn tokens_of(&self, user: Option<&str>, session: Option<&str>) -> Vec<u64> {
        let mut out: Vec<u64> = self
            .sessions
            .iter()
            .filter(|(sid, e)| {
                (user.is_some() && e.user_id.as_deref() == user) || session == Some(sid.as_str())
            })
            .filter_map(|(_, e)| e.token)
            .collect();
        if let Some(u) = user {
            out.extend(self.login_tokens.get(u).into_iter().flatten().copied());
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    pub fn keyer(&self) -> &Keyer {
        &self.keyer
    }

    pub fn sessions_known(&self) -> usize {
        self.sessions.len()
    }

    /// Loads the learned sessions from `<dir>/sessions.json` (if any) and saves there from now
    /// on. A damaged file is set aside (renamed `.bad`) and reported, never fatal.
    pub fn attach_state(&mut self, dir: &Path, stats: &Stats) {
        let path = dir.join(SESSIONS_FILE);
        match std::fs::read(&path) {
            Ok(b) => match serde_json::from_slice::<StateFile>(&b) {
                Ok(s) if s.version == 1 => {
                    let now = now_unix();
                    let ttl = self.cfg.session_ttl.as_secs();
                    let before = s.sessions.len();
                    self.sessions = s
                        .sessions
                        .into_iter()
                        .filter(|(_, e)| !expired(e, now, ttl))
                        .collect();
                    self.users = s.users;
                    stats.add(
                        Metric::SessionsExpired,
                        (before - self.sessions.len()) as u64,
                    );
                    log::info!(
                        "loaded {} learned sessions and {} users from {}",
                        self.sessions.len(),
                        self.users.len(),
                        path.display()
                    );
                }
                Ok(s) => {
                    log::warn!(
                        "{}: unknown version {}; starting with no learned sessions",
                        path.display(),
                        s.version
                    );
                    stats.add_reason(Metric::StateFilesRejected, "version", 1);
                }
                Err(e) => {
                    let bad = dir.join(format!("{SESSIONS_FILE}.bad"));
                    let _ = std::fs::rename(&path, &bad);
                    log::warn!(
                        "{}: cannot be read ({e}); moved to {} and starting with no learned sessions",
                        path.display(),
                        bad.display()
                    );
                    stats.add_reason(Metric::StateFilesRejected, "malformed", 1);
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("{}: {e}; starting with no learned sessions", path.display()),
        }
        self.state_path = Some(path);
    }

    /// Writes the learned sessions if they changed (atomically, mode 0600).
    pub fn save(&mut self, stats: &Stats) {
        let Some(path) = &self.state_path else { return };
        if !self.dirty {
            return;
        }
        let doc = StateFile {
            version: 1,
            sessions: std::mem::take(&mut self.sessions),
            users: std::mem::take(&mut self.users),
        };
        let bytes = serde_json::to_vec(&doc).unwrap_or_default();
        self.sessions = doc.sessions;
        self.users = doc.users;
        let res = crate::statefile::write_private(path, &bytes);
        match res {
            Ok(()) => {
                self.dirty = false;
                stats.add(Metric::StateSaves, 1);
            }
            Err(e) => {
                stats.add_reason(Metric::StateSaveErrors, "io", 1);
                log::warn!(
                    "saving learned sessions to {}: {e} (kept in memory)",
                    path.display()
                );
            }
        }
    }

    /// Forgets expired sessions; returns how many.
    pub fn expire(&mut self, stats: &Stats) -> usize {
        let now = now_unix();
        let ttl = self.cfg.session_ttl.as_secs();
        let before = self.sessions.len();
        self.sessions.retain(|_, e| !expired(e, now, ttl));
        let n = before - self.sessions.len();
        if n > 0 {
            self.dirty = true;
            stats.add(Metric::SessionsExpired, n as u64);
        }
        n
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        self.cfg.trusted_proxies.iter().any(|c| c.contains(ip))
    }

    /// The session credential the platform believes, if it can be read (see [`Self::presented`]).
    pub fn credential(&self, headers: &[Header]) -> Option<Credential> {
        self.presented(headers).winner.and_then(Result::ok)
    }

    /// Every credential a request carries, ordered as the platform believes them: by kind in
    /// `identity.credential_precedence` (default bearer, cookie, header), then the first
    /// `Authorization`/session header, and the first (or, with `duplicate_cookies = "last"`, the
    /// last) crumb of a session cookie, configured cookie names in their order. Only request
    /// headers are read: trailers never name a caller.
    pub fn presented(&self, headers: &[Header]) -> Presented {
        let mut all: Vec<(SessionKind, Read)> = Vec::new();
        for ck in &self.cfg.credentials.precedence {
            let kind = &match ck {
                CredentialKind::Bearer => SessionKind::Bearer,
                CredentialKind::Cookie => SessionKind::Cookie,
                CredentialKind::Header => SessionKind::Header,
            };
            match kind {
                SessionKind::Bearer if self.cfg.bearer => {
                    for h in headers
                        .iter()
                        .filter(|h| h.name.eq_ignore_ascii_case("authorization"))
                    {
                        all.extend(bearer_token(&h.value).map(|r| (*kind, r)));
                    }
                }
                SessionKind::Bearer => {}
                SessionKind::Cookie => {
                    for name in &self.cfg.session_cookies {
                        let mut crumbs = cookie_crumbs(headers, name);
                        if self.cfg.credentials.last_cookie_wins {
                            crumbs.reverse();
                        }
                        all.extend(crumbs.into_iter().map(|r| (*kind, r)));
                    }
                }
                SessionKind::Header => {
                    for name in &self.cfg.session_headers {
                        all.extend(
                            session_header_values(headers, name)
                                .into_iter()
                                .map(|r| (*kind, r)),
                        );
                    }
                }
            }
        }
        let mut it = all.into_iter();
        let Some((kind, first)) = it.next() else {
            return Presented::default();
        };
        let winner = match first {
            Ok(value) => Ok(Credential { kind, value }),
            Err(()) => Err(kind),
        };
        let mut p = Presented {
            winner: Some(winner),
            ..Presented::default()
        };
        for (kind, r) in it {
            match r {
                Ok(value) => {
                    let seen = matches!(&p.winner, Some(Ok(w)) if w.value == value)
                        || p.others.iter().any(|o| o.value == value);
                    if !seen {
                        p.others.push(Credential { kind, value });
                    }
                }
                Err(()) => p.unreadable_others += 1,
            }
        }
        p
    }

    /// Attributes one exchange and learns what it teaches. `route_name` is the matched route's
    /// name; `peer` the TCP peer.
    pub fn attribute(
        &mut self,
        ex: &Exchange,
        route_name: Option<&str>,
        peer: Option<IpAddr>,
        stats: &Stats,
    ) -> Attribution {
        let now = now_unix();
        let req = &ex.request;
        let status = ex.response.as_ref().map(|r| r.status);
        let ok = status.is_some_and(|s| (200..300).contains(&s));
        let peer_trusted = peer.is_some_and(|p| self.trusted(p));
        let client_ip = match (peer, self.cfg.client_ip_header) {
            (Some(p), Some(which)) if peer_trusted => {
                forwarded_client(&req.headers, which, &self.cfg.trusted_proxies).or(Some(p))
            }
            (p, _) => p,
        };
        let mut a = Attribution {
            session_id: None,
            session_kind: None,
            user_id: None,
            user_hash: None,
            role: None,
            tenant: None,
            source: IdentitySource::None,
            client_ip,
            token: None,
            login_token: None,
            session_ids: Vec::new(),
            anomalies: Vec::new(),
        };
        let presented = self.presented(&req.headers);
        let cred = match &presented.winner {
            Some(Ok(c)) => Some(c.clone()),
            Some(Err(_)) => {
                a.source = IdentitySource::Unreadable;
                a.flag(Anomaly::UnreadableCredential);
                None
            }
            None => None,
        };
        if presented.unreadable_others > 0 {
            a.flag(Anomaly::UnreadableCredential);
        }
        if !presented.others.is_empty() {
            a.flag(Anomaly::TwoCredentials);
            a.session_ids = cred
                .iter()
                .chain(&presented.others)
                .map(|c| self.keyer.session_id(&c.value))
                .collect();
        }
        for x in &a.anomalies {
            stats.add_reason(Metric::AttributionAnomalies, x.as_str(), 1);
        }
        if let Some(c) = &cred {
            a.session_id = Some(self.keyer.session_id(&c.value));
            a.session_kind = Some(c.kind);
            a.source = IdentitySource::Unknown;
            a.token = self.khash(c.value.as_bytes());
            // The kernel learns tokens as they are used (they are never saved).
            if let (Some(t), Some(e)) = (
                a.token,
                a.session_id.as_ref().and_then(|s| self.sessions.get_mut(s)),
            ) {
                e.token = Some(t);
            }
        }

        // A login exchange: the session it creates and who it belongs to.
        if let Some(rule) = route_name.and_then(|n| self.cfg.login.iter().find(|l| l.route == n)) {
            let rule = rule.clone();
            self.learn_login(&rule, ex, ok, now, &mut a, stats);
            return a;
        }

        // Identity from the request itself: trusted proxy headers, then JWT claims, then what
        // was learned about the session.
        if let (true, Some(px)) = (peer_trusted, &self.cfg.proxy) {
            if let Some(u) = header(&req.headers, &px.user).and_then(|h| h.value_str()) {
                let u = u.trim();
                if !u.is_empty() {
                    a.user_id = Some(u.to_string());
                    let hv = |n: &Option<String>| {
                        n.as_ref()
                            .and_then(|n| header(&req.headers, n))
                            .and_then(|h| h.value_str())
                            .map(|s| s.trim().to_string())
                            .filter(|s| !s.is_empty())
                    };
                    a.role = hv(&px.role);
                    a.tenant = hv(&px.tenant);
                    a.source = IdentitySource::ProxyHeader;
                }
            }
        }
        if a.source != IdentitySource::ProxyHeader {
            if let Some(c) = &cred {
                // Claims count only when a configured key verifies the token.
                let claims = match (c.kind, &self.cfg.jwt) {
                    (SessionKind::Bearer, Some(j)) => match j.keys.check(&c.value) {
                        JwtCheck::Verified(claims) => Some(claims),
                        JwtCheck::NotJwt => None,
                        JwtCheck::Unverified(why) => {
                            stats.add_reason(Metric::JwtUnverified, why.reason(), 1);
                            if why.is_forgery() {
                                a.flag(Anomaly::JwtSignatureInvalid);
                                stats.add_reason(
                                    Metric::AttributionAnomalies,
                                    Anomaly::JwtSignatureInvalid.as_str(),
                                    1,
                                );
                            }
                            None
                        }
                    },
                    _ => None,
                };
                let jwt = match (&claims, &self.cfg.jwt) {
                    (Some(claims), Some(j)) => {
                        let get = |n: &str| claims.get(n).and_then(scalar_id);
                        get(&j.user).map(|user| {
                            (
                                user,
                                j.role.as_deref().and_then(get),
                                j.tenant.as_deref().and_then(get),
                            )
                        })
                    }
                    _ => None,
                };
                let sid = a.session_id.clone().unwrap_or_default();
                if let Some((user, role, tenant)) = jwt {
                    a.user_id = Some(user);
                    a.role = role;
                    a.tenant = tenant;
                    a.source = IdentitySource::Jwt;
                    stats.add_label(Metric::IdentitiesResolved, "source", "jwt", 1);
                } else if let Some(e) = self.sessions.get_mut(&sid) {
                    if !expired(e, now, self.cfg.session_ttl.as_secs()) {
                        e.last_seen = now;
                        a.user_id = e.user_id.clone();
                        // The login name's hash identifies the caller only where the platform
                        // never named the user's id.
                        if e.user_id.is_none() {
                            a.user_hash = e.user_hash.clone();
                        }
                        a.role = e.role.clone();
                        a.tenant = e.tenant.clone();
                        a.source = e.source;
                    }
                }
            }
        }
        // Fill role and tenant from what is known of the user.
        if let Some(u) = a.user_id.as_ref().and_then(|u| self.users.get(u)) {
            if a.role.is_none() {
                a.role = u.role.clone();
            }
            if a.tenant.is_none() {
                a.tenant = u.tenant.clone();
            }
        }

        // An identity endpoint answers who the session belongs to.
        if let (true, Some(c), Some(rule)) = (
            ok,
            &cred,
            route_name.and_then(|n| self.cfg.endpoints.iter().find(|e| e.route == n)),
        ) {
            let body = ex
                .response
                .as_ref()
                .and_then(|r| serde_json::from_slice::<Value>(&r.body.data).ok());
            match body
                .as_ref()
                .and_then(|b| rule.user_id.first_id(b).map(|u| (b, u)))
            {
                Some((b, user)) => {
                    let role = rule.role.as_ref().and_then(|p| p.first_id(b));
                    let tenant = rule.tenant.as_ref().and_then(|p| p.first_id(b));
                    a.user_id = Some(user);
                    a.role = role.or(a.role.take());
                    a.tenant = tenant.or(a.tenant.take());
                    a.source = IdentitySource::IdentityEndpoint;
                    let expires = self
                        .sessions
                        .get(a.session_id.as_deref().unwrap_or(""))
                        .and_then(|e| e.expires);
                    let expires = expires.or_else(|| token_expiry(c));
                    self.remember(&a, c.kind, expires, now, stats);
                    stats.add_label(Metric::IdentitiesLearned, "source", "identity_endpoint", 1);
                }
                None => stats.add_reason(Metric::IdentitiesUnlearned, "endpoint_body", 1),
            }
        }

        // The platform refused the credentials: whatever they claim is not an identity.
        if status == Some(401) {
            a.user_id = None;
            a.role = None;
            a.tenant = None;
            a.source = if cred.is_some() || presented.winner.is_some() {
                IdentitySource::Rejected
            } else {
                IdentitySource::None
            };
        }

        // Sessions that end: a logout route, or the response clears the session cookie.
        let logout = route_name.is_some_and(|n| self.cfg.logout_routes.iter().any(|l| l == n));
        let cleared = ex.response.as_ref().is_some_and(|r| {
            self.cfg
                .session_cookies
                .iter()
                .any(|n| set_cookies(&r.headers, n).iter().any(|s| s.cleared))
        });
        if logout || cleared {
            // Kept for a short grace period: the same exchange is often seen again at another
            // hop (the proxy and the app behind it), and it must be attributed there too.
            if let Some(e) = a.session_id.as_ref().and_then(|s| self.sessions.get_mut(s)) {
                let end = now + LOGOUT_GRACE_SECS;
                if e.expires.is_none_or(|x| x > end) {
                    e.expires = Some(end);
                    self.dirty = true;
                    stats.add(Metric::SessionsEnded, 1);
                }
            }
        } else if let Some(r) = &ex.response {
            // Session rotation: a new session cookie set on a known session keeps its identity.
            if a.user_id.is_some() && ok {
                for name in self.cfg.session_cookies.clone() {
                    for sc in set_cookies(&r.headers, &name) {
                        if !sc.cleared {
                            let new = Attribution {
                                session_id: Some(self.keyer.session_id(&sc.value)),
                                ..a.clone()
                            };
                            if new.session_id != a.session_id {
                                let exp = sc.expires(now);
                                self.remember(&new, SessionKind::Cookie, exp, now, stats);
                            }
                        }
                    }
                }
            }
        }
        if a.source == IdentitySource::Unknown {
            stats.add(Metric::IdentitiesUnknown, 1);
        }
        a
    }

    fn learn_login(
        &mut self,
        rule: &LoginRule,
        ex: &Exchange,
        ok: bool,
        now: u64,
        a: &mut Attribution,
        stats: &Stats,
    ) {
        let req = &ex.request;
        let name = rule
            .username
            .as_deref()
            .and_then(|f| login_username(req, f));
        a.user_hash = name.as_deref().map(|n| self.keyer.user_hash(n));
        // The kernel decodes the name as the platform does (tracer_common::scan), so its hash
        // is of the decoded name however the request encodes it.
        a.login_token = name.as_deref().and_then(|n| self.khash(n.as_bytes()));
        let Some(resp) = ex.response.as_ref().filter(|_| ok) else {
            // A failed login: the attempted name is kept as a hash only.
            a.source = match ex.response.as_ref().map(|r| r.status) {
                Some(401) | Some(403) => IdentitySource::Rejected,
                _ => a.source,
            };
            return;
        };
        let body = serde_json::from_slice::<Value>(&resp.body.data).ok();
        let from_body = |p: &Option<JsonPath>| {
            p.as_ref()
                .and_then(|p| body.as_ref().and_then(|b| p.first_id(b)))
        };
        a.user_id = from_body(&rule.user_id);
        a.role = from_body(&rule.role);
        a.tenant = from_body(&rule.tenant);
        if let Some(u) = a.user_id.as_ref().and_then(|u| self.users.get(u)) {
            a.role = a.role.take().or(u.role.clone());
            a.tenant = a.tenant.take().or(u.tenant.clone());
        }
        // The session the response creates.
        let (cred, expires) = match &rule.token {
            Some(tp) => match body
                .as_ref()
                .and_then(|b| tp.first(b))
                .and_then(|v| v.as_str())
            {
                Some(tok) => {
                    let c = Credential {
                        kind: SessionKind::Bearer,
                        value: tok.to_string(),
                    };
                    let exp = token_expiry(&c);
                    (Some(c), exp)
                }
                None => (None, None),
            },
            None => {
                let mut found = (None, None);
                for n in &self.cfg.session_cookies {
                    if let Some(sc) = set_cookies(&resp.headers, n)
                        .into_iter()
                        .find(|s| !s.cleared)
                    {
                        found = (
                            Some(Credential {
                                kind: SessionKind::Cookie,
                                value: sc.value.clone(),
                            }),
                            sc.expires(now),
                        );
                        break;
                    }
                }
                found
            }
        };
        let Some(cred) = cred else {
            stats.add_reason(Metric::IdentitiesUnlearned, "login_no_session", 1);
            return;
        };
        if a.user_id.is_none() && a.user_hash.is_none() && self.cfg.jwt.is_none() {
            stats.add_reason(Metric::IdentitiesUnlearned, "login_no_user", 1);
            return;
        }
        a.session_id = Some(self.keyer.session_id(&cred.value));
        a.session_kind = Some(cred.kind);
        a.source = IdentitySource::Login;
        a.token = self.khash(cred.value.as_bytes());
        // A token that is a JWT names its user itself.
        if let (SessionKind::Bearer, Some(j)) = (cred.kind, &self.cfg.jwt) {
            if let Some(claims) = jwt_claims(&cred.value) {
                let get = |n: &str| claims.get(n).and_then(scalar_id);
                a.user_id = a.user_id.take().or_else(|| get(&j.user));
                a.role = a.role.take().or_else(|| j.role.as_deref().and_then(get));
                a.tenant = a
                    .tenant
                    .take()
                    .or_else(|| j.tenant.as_deref().and_then(get));
            }
        }
        self.remember(a, cred.kind, expires, now, stats);
        stats.add_label(Metric::IdentitiesLearned, "source", "login", 1);
    }

    /// Stores the session → identity mapping of `a`, and the user's role and tenant.
    fn remember(
        &mut self,
        a: &Attribution,
        kind: SessionKind,
        expires: Option<u64>,
        now: u64,
        stats: &Stats,
    ) {
        let Some(sid) = a.session_id.clone() else {
            return;
        };
        if let Some(u) = &a.user_id {
            if a.role.is_some() || a.tenant.is_some() {
                let e = self.users.entry(u.clone()).or_insert(UserEntry {
                    role: None,
                    tenant: None,
                    last_seen: now,
                });
                if a.role.is_some() {
                    e.role = a.role.clone();
                }
                if a.tenant.is_some() {
                    e.tenant = a.tenant.clone();
                }
                e.last_seen = now;
            }
        }
        let entry = SessionEntry {
            user_id: a.user_id.clone(),
            user_hash: a.user_hash.clone(),
            role: a.role.clone(),
            tenant: a.tenant.clone(),
            source: a.source,
            kind,
            expires,
            last_seen: now,
            token: a.token,
        };
        if let (Some(u), Some(t)) = (&a.user_id, a.login_token) {
            let v = self.login_tokens.entry(u.clone()).or_default();
            if !v.contains(&t) && v.len() < 8 {
                v.push(t);
            }
        }
        if self.sessions.get(&sid) != Some(&entry) {
            self.sessions.insert(sid, entry);
            self.dirty = true;
        }
        self.bound(stats);
    }

    /// Keeps the maps within their budget: the least recently seen tenth goes first, counted.
    fn bound(&mut self, stats: &Stats) {
        let max = self.cfg.max_sessions;
        let n = crate::statefile::evict_oldest(&mut self.sessions, max, |e| e.last_seen);
        if n > 0 {
            stats.add_reason(Metric::SessionsEvicted, "budget", n as u64);
        }
        let n = crate::statefile::evict_oldest(&mut self.users, max, |e| e.last_seen);
        if n > 0 {
            stats.add_reason(Metric::UsersEvicted, "budget", n as u64);
        }
    }
}

fn expired(e: &SessionEntry, now: u64, ttl: u64) -> bool {
    e.expires.is_some_and(|x| x <= now) || (e.expires.is_none() && e.last_seen + ttl <= now)
}

/// The `exp` of a bearer token that is a JWT.
fn token_expiry(c: &Credential) -> Option<u64> {
    if c.kind != SessionKind::Bearer {
        return None;
    }
    jwt_claims(&c.value)?.get("exp")?.as_u64()
}

#[cfg(test)]
#[path = "attribution_tests.rs"]
mod tests;
