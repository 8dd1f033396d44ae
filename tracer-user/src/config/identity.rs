//! The `[identity]` and `[disclosure]` tables and each route's `[routes.disclosure]`: how the
//! agent tells who called (sessions, tokens, learned identities, trusted proxies) and whose data
//! a response carried. Raw layout and validation, in the same style as the rest of the config.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    time::Duration,
};

use serde::Deserialize;

use super::{
    errors::Problems,
    values::{format_duration, has_control, parse_duration},
};
use crate::attribute::{
    jsonpath::JsonPath,
    jwt::{JwtKeys, DEFAULT_LEEWAY_SECS},
};

pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
pub const DEFAULT_MAX_SESSIONS: usize = 200_000;
pub const DEFAULT_MAX_IDS: usize = 100;
pub const DEFAULT_MAX_SUBJECTS: usize = 1_000_000;
const MAX_MAX_SESSIONS: i64 = 10_000_000;
const MAX_MAX_IDS: i64 = 10_000;
const MAX_MAX_SUBJECTS: i64 = 50_000_000;

/// An address block of trusted proxies (`10.0.0.0/8`, `::1/128`, or one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.parse::<u8>().ok().filter(|n| *n <= max)?,
            None => max,
        };
        Some(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let m = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(n) & m == u32::from(a) & m
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let m = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(n) & m == u128::from(a) & m
            }
            _ => false,
        }
    }
}

/// Claims read from a bearer token that is a JWT. They are believed only when the token's
/// signature verifies with one of `keys` (see [`crate::attribute::jwt`]); with no keys every
/// presented token is an opaque session. A token the platform itself issues in a login answer is
/// read without a key (it comes from the server, not the client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtClaims {
    pub user: String,
    pub tenant: Option<String>,
    pub role: Option<String>,
    pub keys: JwtKeys,
}

/// Which credential the platform believes when a request carries several (and, among several
/// crumbs of one session cookie, which one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialOrder {
    /// Most trusted first; default `bearer`, `cookie`, `header` (a bearer header decides alone
    /// on the demo platform and most API frameworks).
    pub precedence: Vec<CredentialKind>,
    /// Several crumbs of the same session cookie: the platform reads the last (Django,
    /// Python's `http.cookies`) instead of the first (PHP, Go, Express, werkzeug's `get`, the
    /// demo platform).
    pub last_cookie_wins: bool,
}

impl Default for CredentialOrder {
    fn default() -> Self {
        CredentialOrder {
            precedence: vec![
                CredentialKind::Bearer,
                CredentialKind::Cookie,
                CredentialKind::Header,
            ],
            last_cookie_wins: false,
        }
    }
}

/// A kind of session credential, as `identity.credential_precedence` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    Bearer,
    Cookie,
    Header,
}

/// The header trusted proxies put the real client's address in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientIpHeader {
    /// `X-Forwarded-For` (nginx `$proxy_add_x_forwarded_for`, haproxy `option forwardfor`).
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=`.
    Forwarded,
    /// `X-Real-IP` (one address).
    XRealIp,
}

/// Identity headers a trusted proxy sets; believed only from `trusted_proxies`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProxyHeaders {
    pub user: String,
    pub tenant: Option<String>,
    pub role: Option<String>,
}

/// A login exchange: the user name in the request, paired with the session the response sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRule {
    /// Route name (`[[routes]] name`).
    pub route: String,
    /// Form field, or JSON path into a JSON request body, holding the user name.
    pub username: Option<String>,
    /// JSON path in the response to the user's id.
    pub user_id: Option<JsonPath>,
    pub role: Option<JsonPath>,
    pub tenant: Option<JsonPath>,
    /// JSON path in the response to a bearer token it issues (else the session is the cookie the
    /// response sets).
    pub token: Option<JsonPath>,
}

/// An identity endpoint: its response describes the caller of the session it was called with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointRule {
    pub route: String,
    pub user_id: JsonPath,
    pub role: Option<JsonPath>,
    pub tenant: Option<JsonPath>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityConfig {
    /// Cookie names that carry an opaque session id.
    pub session_cookies: Vec<String>,
    /// `Authorization: Bearer` carries a session credential.
    pub bearer: bool,
    /// Request headers that carry an opaque session token.
    pub session_headers: Vec<String>,
    /// Idle lifetime of a learned session with no expiry of its own.
    pub session_ttl: Duration,
    pub max_sessions: usize,
    pub trusted_proxies: Vec<Cidr>,
    /// The header whose client address is believed when the peer is a trusted proxy; `None`:
    /// the client is always the socket peer.
    pub client_ip_header: Option<ClientIpHeader>,
    pub credentials: CredentialOrder,
    pub jwt: Option<JwtClaims>,
    pub proxy: Option<ProxyHeaders>,
    pub login: Vec<LoginRule>,
    pub endpoints: Vec<EndpointRule>,
    /// Route names that end the session they are called with.
    pub logout_routes: Vec<String>,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            session_cookies: Vec::new(),
            bearer: true,
            session_headers: Vec::new(),
            session_ttl: DEFAULT_SESSION_TTL,
            max_sessions: DEFAULT_MAX_SESSIONS,
            trusted_proxies: Vec::new(),
            client_ip_header: None,
            credentials: CredentialOrder::default(),
            jwt: None,
            proxy: None,
            login: Vec::new(),
            endpoints: Vec::new(),
            logout_routes: Vec::new(),
        }
    }
}

/// How one route's successful responses disclose personal data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteDisclosure {
    /// Path to the person objects in the response (`$.persons[*]`, `$` for one person).
    pub persons: Option<JsonPath>,
    /// Relative path to a person's id.
    pub id: JsonPath,
    /// Relative path to a person's tenant (school).
    pub tenant: Option<JsonPath>,
    /// Path to the platform's total count.
    pub total: Option<JsonPath>,
    /// Persons embedded in a person (they inherit its tenant when they have none).
    pub nested: Vec<JsonPath>,
    /// The data subject is this path parameter (photos, binary bodies).
    pub subject_param: Option<String>,
    /// Categories every success of this route discloses, besides those found in persons.
    pub categories: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisclosureConfig {
    /// Target ids listed per record; the rest are counted and in the digest.
    pub max_ids: usize,
    /// Persons whose tenant the agent remembers (for endpoints that do not say it).
    pub max_subjects: usize,
    /// Category name → the person fields that carry it.
    pub categories: BTreeMap<String, Vec<String>>,
    /// By route name.
    pub routes: HashMap<String, RouteDisclosure>,
}

impl Default for DisclosureConfig {
    fn default() -> Self {
        DisclosureConfig {
            max_ids: DEFAULT_MAX_IDS,
            max_subjects: DEFAULT_MAX_SUBJECTS,
            categories: BTreeMap::new(),
            routes: HashMap::new(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Raw layout.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIdentity {
    session_cookies: Option<Vec<String>>,
    bearer: Option<bool>,
    session_headers: Option<Vec<String>>,
    session_ttl: Option<String>,
    max_sessions: Option<i64>,
    trusted_proxies: Option<Vec<String>>,
    client_ip_header: Option<String>,
    credential_precedence: Option<Vec<String>>,
    duplicate_cookies: Option<String>,
    jwt: Option<RawJwt>,
    proxy: Option<RawProxy>,
    #[serde(default)]
    login: Vec<RawLogin>,
    #[serde(default)]
    endpoint: Vec<RawEndpoint>,
    logout_routes: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwt {
    user: Option<String>,
    tenant: Option<String>,
    role: Option<String>,
    hs256_secret_file: Option<String>,
    public_key_file: Option<String>,
    jwks_file: Option<String>,
    leeway: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    user: Option<String>,
    tenant: Option<String>,
    role: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLogin {
    route: Option<String>,
    username: Option<String>,
    user_id: Option<String>,
    role: Option<String>,
    tenant: Option<String>,
    token: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    route: Option<String>,
    user_id: Option<String>,
    role: Option<String>,
    tenant: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDisclosure {
    max_ids: Option<i64>,
    max_subjects: Option<i64>,
    categories: Option<BTreeMap<String, Vec<String>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRouteDisclosure {
    persons: Option<String>,
    id: Option<String>,
    tenant: Option<String>,
    total: Option<String>,
    nested: Option<Vec<String>>,
    subject_param: Option<String>,
    categories: Option<Vec<String>>,
}

// ---------------------------------------------------------------------------------------------
// Validation.
// ---------------------------------------------------------------------------------------------

fn path(p: &mut Problems, key: &str, v: Option<&str>) -> Option<JsonPath> {
    let v = v?;
    match JsonPath::parse(v) {
        Ok(j) => Some(j),
        Err(e) => {
            p.push(key, e.to_string());
            None
        }
    }
}

fn names(p: &mut Problems, key: &str, v: Option<Vec<String>>, what: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (i, n) in v.into_iter().flatten().enumerate() {
        if n.trim().is_empty() || has_control(&n) || n.contains([' ', ';', '=', ':']) {
            p.push(
                format!("{key}[{i}]"),
                format!("{n:?} is not a valid name; expected {what}"),
            );
        } else if out.iter().any(|o| o.eq_ignore_ascii_case(&n)) {
            p.push(
                format!("{key}[{i}]"),
                format!("{n:?} is listed twice; expected each name once"),
            );
        } else {
            out.push(n);
        }
    }
    out
}

/// Checks `[identity]`; route names are checked against `route_names`.
pub(super) fn check_identity(
    raw: RawIdentity,
    route_names: &[&str],
    p: &mut Problems,
) -> IdentityConfig {
    let mut c = IdentityConfig {
        session_cookies: names(
            p,
            "identity.session_cookies",
            raw.session_cookies,
            "a cookie name like \"sessionid\"",
        ),
        bearer: raw.bearer.unwrap_or(true),
        session_headers: names(
            p,
            "identity.session_headers",
            raw.session_headers,
            "a header name like \"X-Session-Token\"",
        ),
        ..IdentityConfig::default()
    };
    if let Some(s) = raw.session_ttl {
        match parse_duration(&s) {
            Ok(d) if d >= Duration::from_secs(1) => c.session_ttl = d,
            Ok(d) => p.push(
                "identity.session_ttl",
                format!(
                    "{s:?} ({}) is too short; expected at least 1s",
                    format_duration(d)
                ),
            ),
            Err(e) => p.push("identity.session_ttl", e),
        }
    }
    c.max_sessions = super::values::check_count(
        p,
        "identity.max_sessions",
        raw.max_sessions,
        DEFAULT_MAX_SESSIONS as i64,
        MAX_MAX_SESSIONS,
    ) as usize;
    for (i, t) in raw.trusted_proxies.into_iter().flatten().enumerate() {
        match Cidr::parse(&t) {
            Some(n) => c.trusted_proxies.push(n),
            None => p.push(
                format!("identity.trusted_proxies[{i}]"),
                format!("{t:?} is not an address or address block; expected something like \"10.0.0.0/8\", \"127.0.0.1\" or \"::1/128\""),
            ),
        }
    }
    if let Some(h) = raw.client_ip_header {
        let v = match h.to_ascii_lowercase().as_str() {
            "x-forwarded-for" => Some(ClientIpHeader::XForwardedFor),
            "forwarded" => Some(ClientIpHeader::Forwarded),
            "x-real-ip" => Some(ClientIpHeader::XRealIp),
            _ => {
                p.push(
                    "identity.client_ip_header",
                    format!("{h:?} is not a header the agent reads addresses from; expected \"X-Forwarded-For\", \"Forwarded\" or \"X-Real-IP\""),
                );
                None
            }
        };
        if v.is_some() && c.trusted_proxies.is_empty() {
            p.push(
                "identity.client_ip_header",
                "is set but identity.trusted_proxies is empty, so it would never be believed; expected the proxies' addresses in identity.trusted_proxies",
            );
        }
        c.client_ip_header = v;
    }
    if let Some(list) = raw.credential_precedence {
        let mut out = Vec::new();
        for (i, k) in list.iter().enumerate() {
            let kind = match k.as_str() {
                "bearer" => CredentialKind::Bearer,
                "cookie" => CredentialKind::Cookie,
                "header" => CredentialKind::Header,
                _ => {
                    p.push(
                        format!("identity.credential_precedence[{i}]"),
                        format!("{k:?} is not a credential kind; expected \"bearer\", \"cookie\" or \"header\""),
                    );
                    continue;
                }
            };
            if out.contains(&kind) {
                p.push(
                    format!("identity.credential_precedence[{i}]"),
                    format!("{k:?} is listed twice; expected each kind once"),
                );
            } else {
                out.push(kind);
            }
        }
        // Kinds left out rank last, in the default order.
        for k in CredentialOrder::default().precedence {
            if !out.contains(&k) {
                out.push(k);
            }
        }
        c.credentials.precedence = out;
    }
    match raw.duplicate_cookies.as_deref() {
        None | Some("first") => {}
        Some("last") => c.credentials.last_cookie_wins = true,
        Some(o) => p.push(
            "identity.duplicate_cookies",
            format!("{o:?} is not a choice; expected \"first\" (PHP, Go, Express, Flask) or \"last\" (Django, Python's http.cookies)"),
        ),
    }
    if let Some(j) = raw.jwt {
        let leeway = match j.leeway.as_deref().map(parse_duration) {
            None => DEFAULT_LEEWAY_SECS,
            Some(Ok(d)) => d.as_secs(),
            Some(Err(e)) => {
                p.push("identity.jwt.leeway", e);
                DEFAULT_LEEWAY_SECS
            }
        };
        let file = |k: &str, v: &Option<String>, p: &mut Problems| -> Option<std::path::PathBuf> {
            let v = v.as_ref()?;
            let path = std::path::PathBuf::from(v);
            if !path.is_absolute() {
                p.push(
                    format!("identity.jwt.{k}"),
                    format!("{v:?} is not an absolute path; expected something like \"/etc/sparbar/jwt.key\""),
                );
                return None;
            }
            Some(path)
        };
        let secret = file("hs256_secret_file", &j.hs256_secret_file, p);
        let pem = file("public_key_file", &j.public_key_file, p);
        let jwks = file("jwks_file", &j.jwks_file, p);
        let keys = match JwtKeys::load(secret.as_deref(), pem.as_deref(), jwks.as_deref(), leeway) {
            Ok(k) => k,
            Err(e) => {
                let key = match &e {
                    crate::attribute::jwt::JwtKeyError::Read { path, .. }
                        if Some(path) == secret.as_ref() =>
                    {
                        "identity.jwt.hs256_secret_file"
                    }
                    crate::attribute::jwt::JwtKeyError::EmptySecret { .. } => {
                        "identity.jwt.hs256_secret_file"
                    }
                    crate::attribute::jwt::JwtKeyError::Read { path, .. }
                        if Some(path) == pem.as_ref() =>
                    {
                        "identity.jwt.public_key_file"
                    }
                    crate::attribute::jwt::JwtKeyError::BadPem { .. } => {
                        "identity.jwt.public_key_file"
                    }
                    _ => "identity.jwt.jwks_file",
                };
                p.push(key, e.to_string());
                JwtKeys::default()
            }
        };
        c.jwt = Some(JwtClaims {
            user: j.user.unwrap_or_else(|| "sub".into()),
            tenant: j.tenant,
            role: j.role,
            keys,
        });
    }
    if let Some(x) = raw.proxy {
        match x.user {
            Some(user) => {
                if c.trusted_proxies.is_empty() {
                    p.push(
                        "identity.proxy",
                        "identity headers are configured but identity.trusted_proxies is empty, so they would never be believed; expected the proxies' addresses in identity.trusted_proxies",
                    );
                }
                c.proxy = Some(ProxyHeaders {
                    user,
                    tenant: x.tenant,
                    role: x.role,
                })
            }
            None => p.push(
                "identity.proxy.user",
                "is missing; expected the header a trusted proxy sets with the user id, like \"X-Remote-User\"",
            ),
        }
    }
    let check_route = |p: &mut Problems, key: &str, r: Option<String>| -> String {
        match r {
            None => {
                p.push(
                    key,
                    "is missing; expected the name of a [[routes]] entry, like \"auth.login\"",
                );
                String::new()
            }
            Some(r) if !route_names.contains(&r.as_str()) => {
                p.push(
                    key,
                    format!(
                        "{r:?} is not the name of any [[routes]] entry; expected one of {}",
                        route_names
                            .iter()
                            .map(|n| format!("{n:?}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
                r
            }
            Some(r) => r,
        }
    };
    for (i, l) in raw.login.into_iter().enumerate() {
        let k = format!("identity.login[{i}]");
        let route = check_route(p, &format!("{k}.route"), l.route);
        let rule = LoginRule {
            route,
            username: l.username,
            user_id: path(p, &format!("{k}.user_id"), l.user_id.as_deref()),
            role: path(p, &format!("{k}.role"), l.role.as_deref()),
            tenant: path(p, &format!("{k}.tenant"), l.tenant.as_deref()),
            token: path(p, &format!("{k}.token"), l.token.as_deref()),
        };
        if rule.token.is_none() && c.session_cookies.is_empty() {
            p.push(
                k.clone(),
                "has no token path and identity.session_cookies is empty, so the session it sets cannot be found; expected token = \"$.access_token\" or a cookie name in identity.session_cookies",
            );
        }
        if rule.username.is_none() && rule.user_id.is_none() {
            p.push(
                k.clone(),
                "has neither username nor user_id, so it learns nothing; expected username = \"username\" and/or user_id = \"$.userId\"",
            );
        }
        c.login.push(rule);
    }
    for (i, e) in raw.endpoint.into_iter().enumerate() {
        let k = format!("identity.endpoint[{i}]");
        let route = check_route(p, &format!("{k}.route"), e.route);
        let user_id = match e.user_id {
            Some(u) => path(p, &format!("{k}.user_id"), Some(&u)),
            None => {
                p.push(
                    format!("{k}.user_id"),
                    "is missing; expected the JSON path to the caller's id, like \"$.id\"",
                );
                None
            }
        };
        let role = path(p, &format!("{k}.role"), e.role.as_deref());
        let tenant = path(p, &format!("{k}.tenant"), e.tenant.as_deref());
        if let Some(user_id) = user_id {
            c.endpoints.push(EndpointRule {
                route,
                user_id,
                role,
                tenant,
            });
        }
    }
    for (i, r) in raw.logout_routes.into_iter().flatten().enumerate() {
        let r = check_route(p, &format!("identity.logout_routes[{i}]"), Some(r));
        c.logout_routes.push(r);
    }
    c
}

/// Checks `[disclosure]`; the per-route tables are added by [`check_route_disclosure`].
pub(super) fn check_disclosure(raw: RawDisclosure, p: &mut Problems) -> DisclosureConfig {
    let mut c = DisclosureConfig {
        max_ids: super::values::check_count(
            p,
            "disclosure.max_ids",
            raw.max_ids,
            DEFAULT_MAX_IDS as i64,
            MAX_MAX_IDS,
        ) as usize,
        max_subjects: super::values::check_count(
            p,
            "disclosure.max_subjects",
            raw.max_subjects,
            DEFAULT_MAX_SUBJECTS as i64,
            MAX_MAX_SUBJECTS,
        ) as usize,
        ..DisclosureConfig::default()
    };
    for (cat, fields) in raw.categories.unwrap_or_default() {
        let k = format!("disclosure.categories.{cat}");
        if !valid_category(&cat) {
            p.push(
                &k,
                "is not a valid category name; expected lowercase letters, digits and '_', like \"email\"",
            );
            continue;
        }
        if fields.is_empty() || fields.iter().any(|f| f.is_empty() || has_control(f)) {
            p.push(
                &k,
                "must list the person fields that carry it; expected a list like [\"email\", \"workEmail\"]",
            );
            continue;
        }
        c.categories.insert(cat, fields);
    }
    c
}

fn valid_category(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Checks one route's `[routes.disclosure]`; `params` are the template's parameter names.
pub(super) fn check_route_disclosure(
    raw: RawRouteDisclosure,
    key: &str,
    params: &[String],
    p: &mut Problems,
) -> Option<RouteDisclosure> {
    let persons = path(p, &format!("{key}.persons"), raw.persons.as_deref());
    let id = path(
        p,
        &format!("{key}.id"),
        Some(raw.id.as_deref().unwrap_or("id")),
    );
    let tenant = path(p, &format!("{key}.tenant"), raw.tenant.as_deref());
    let total = path(p, &format!("{key}.total"), raw.total.as_deref());
    let mut nested = Vec::new();
    for (i, n) in raw.nested.into_iter().flatten().enumerate() {
        nested.extend(path(p, &format!("{key}.nested[{i}]"), Some(&n)));
    }
    if let Some(sp) = &raw.subject_param {
        if !params.contains(sp) {
            p.push(
                format!("{key}.subject_param"),
                format!(
                    "{sp:?} is not a parameter of this route's template; expected one of {}",
                    if params.is_empty() {
                        "its {name} parameters (it has none)".to_string()
                    } else {
                        params
                            .iter()
                            .map(|n| format!("{n:?}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                ),
            );
        }
    }
    if raw.persons.is_none() && raw.subject_param.is_none() {
        p.push(
            key,
            "names no data subjects; expected persons = \"$.persons[*]\" (person objects in the body) or subject_param = \"id\" (the path parameter)",
        );
    }
    let mut categories = Vec::new();
    for (i, c) in raw.categories.into_iter().flatten().enumerate() {
        if valid_category(&c) {
            categories.push(c);
        } else {
            p.push(
                format!("{key}.categories[{i}]"),
                format!("{c:?} is not a valid category name; expected lowercase letters, digits and '_', like \"photo\""),
            );
        }
    }
    Some(RouteDisclosure {
        persons,
        id: id?,
        tenant,
        total,
        nested,
        subject_param: raw.subject_param,
        categories,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    const BASE: &str = r#"
[agent]
host_name = "web-1"
[[targets]]
exe = "/usr/sbin/nginx"
[[routes]]
route = "POST /login"
name = "auth.login"
[[routes]]
route = "GET /api/me"
name = "me"
[[routes]]
route = "GET /api/persons/{id}/photo"
name = "photo"
"#;

    fn problems(extra: &str) -> Vec<String> {
        crate::config::problem_lines(&format!("{BASE}{extra}"))
    }

    #[test]
    fn the_demo_config_parses() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/demo/sparbar.demo.toml"
        ))
        .unwrap()
        .replace("@DIR@", "/tmp/d")
        .replace("@APP_PID@", "1")
        .replace("@APP_PORT@", "8081");
        let d = tempfile::tempdir().unwrap();
        let secret = d.path().join("jwt.secret");
        std::fs::write(&secret, "s3cret").unwrap();
        let c = parse(
            &text.replace("@JWT_SECRET_FILE@", &secret.display().to_string()),
            "demo",
        )
        .unwrap();
        assert!(!c.identity.jwt.as_ref().unwrap().keys.is_empty());
        // check-config names a missing key file.
        let p = crate::config::problem_lines(
            &text.replace("@JWT_SECRET_FILE@", "/nonexistent/jwt.secret"),
        );
        assert!(
            p.iter().any(|l| l.starts_with(
                "identity.jwt.hs256_secret_file: /nonexistent/jwt.secret: cannot be read"
            )),
            "{p:#?}"
        );
        assert_eq!(c.identity.session_cookies, vec!["skolsid"]);
        assert_eq!(c.identity.login.len(), 2);
        assert_eq!(c.identity.endpoints.len(), 1);
        assert!(c.identity.jwt.is_some());
        assert!(c.disclosure.routes.contains_key("abook.persons.query"));
        assert_eq!(
            c.disclosure.routes["abook.person.photo"]
                .subject_param
                .as_deref(),
            Some("id")
        );
        assert!(c.disclosure.categories.contains_key("email"));
    }

    #[test]
    fn mistakes_are_explained() {
        let p = problems(
            r#"
[identity]
session_cookies = ["sid", "bad name"]
trusted_proxies = ["10.0.0.0/40"]
logout_routes = ["nope"]
[[identity.login]]
route = "auth.logn"
username = "username"
user_id = "$.user[Id"
[[identity.endpoint]]
route = "me"
"#,
        );
        let want = [
            "identity.session_cookies[1]: \"bad name\" is not a valid name",
            "identity.trusted_proxies[0]: \"10.0.0.0/40\" is not an address",
            "identity.login[0].route: \"auth.logn\" is not the name of any [[routes]] entry; expected one of \"auth.login\", \"me\", \"photo\"",
            "identity.login[0].user_id: \"$.user[Id\": has an unclosed '['",
            "identity.endpoint[0].user_id: is missing",
            "identity.logout_routes[0]: \"nope\" is not the name",
        ];
        for w in want {
            assert!(
                p.iter().any(|l| l.starts_with(w)),
                "missing {w:?} in {p:#?}"
            );
        }
        let p = problems(
            r#"
[[routes]]
route = "GET /api/persons"
name = "list"
[routes.disclosure]
persons = "$.persons[*]"
subject_param = "id"
categories = ["E-mail"]
[disclosure.categories]
email = []
"#,
        );
        for w in [
            "routes[3].disclosure.subject_param: \"id\" is not a parameter of this route's template",
            "routes[3].disclosure.categories[0]: \"E-mail\" is not a valid category name",
            "disclosure.categories.email: must list the person fields",
        ] {
            assert!(p.iter().any(|l| l.starts_with(w)), "missing {w:?} in {p:#?}");
        }
        let p = problems(
            r#"
[[routes]]
route = "GET /api/orgs/{org}/persons"
name = "org"
tenant_param = "{school}"
[identity]
client_ip_header = "Forwarded"
credential_precedence = ["cookie", "jwt"]
duplicate_cookies = "middle"
[identity.jwt]
public_key_file = "relative.pem"
"#,
        );
        for w in [
            "routes[3].tenant_param: \"{school}\" is not a parameter of this route's template",
            "identity.client_ip_header: is set but identity.trusted_proxies is empty",
            "identity.credential_precedence[1]: \"jwt\" is not a credential kind",
            "identity.duplicate_cookies: \"middle\" is not a choice",
            "identity.jwt.public_key_file: \"relative.pem\" is not an absolute path",
        ] {
            assert!(
                p.iter().any(|l| l.starts_with(w)),
                "missing {w:?} in {p:#?}"
            );
        }
        // Unknown keys stop at the syntax stage, with the table named.
        let p = problems("[identity]\nsession_cookie = [\"sid\"]\n");
        assert!(p[0].contains("session_cookie"), "{p:?}");
        assert!(problems("[identity]\nsession_cookies = [\"sid\"]\n").is_empty());
    }

    #[test]
    fn cidr() {
        let n = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(n.contains("10.1.2.3".parse().unwrap()));
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.0.0.1".parse().unwrap()));
        let one = Cidr::parse("127.0.0.1").unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        assert!(Cidr::parse("::1/128")
            .unwrap()
            .contains("::1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        for bad in ["10.0.0.0/33", "x", "10.0.0/8", "::1/129", ""] {
            assert!(Cidr::parse(bad).is_none(), "{bad}");
        }
    }
}
