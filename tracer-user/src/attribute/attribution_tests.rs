//! Tests of the attribution step: credentials, learned sessions, identity sources, proxies.

use super::*;
use crate::attribute::jwt::JwtKeys;
use crate::config::Cidr;
use crate::config::{ClientIpHeader, CredentialKind, EndpointRule, JwtClaims, ProxyHeaders};
use crate::exchange::{Body, Completeness, Request, Response};
use base64::Engine as _;
use bytes::Bytes;

fn h(name: &str, value: &str) -> Header {
    Header {
        name: name.into(),
        value: value.as_bytes().to_vec(),
    }
}

fn ex(
    req_headers: Vec<Header>,
    req_body: &str,
    status: u16,
    resp_headers: Vec<Header>,
    resp_body: &str,
) -> Exchange {
    Exchange {
        request: Request {
            method: "GET".into(),
            target: "/x".into(),
            minor_version: 1,
            headers: req_headers,
            body: Body {
                wire_len: req_body.len() as u64,
                data: Bytes::copy_from_slice(req_body.as_bytes()),
                loss: None,
                decoded_from: None,
            },
            first_ns: 0,
            last_ns: 0,
            wire: Default::default(),
        },
        response: Some(Response {
            status,
            reason: String::new(),
            minor_version: 1,
            headers: resp_headers,
            body: Body {
                wire_len: resp_body.len() as u64,
                data: Bytes::copy_from_slice(resp_body.as_bytes()),
                loss: None,
                decoded_from: None,
            },
            first_ns: 0,
            last_ns: 0,
            wire: Default::default(),
        }),
        completeness: Completeness::Complete,
        upgraded: false,
        stream_id: None,
    }
}

fn cfg() -> IdentityConfig {
    IdentityConfig {
        session_cookies: vec!["sid".into()],
        session_headers: vec!["X-Session".into()],
        trusted_proxies: vec![Cidr::parse("10.0.0.0/8").unwrap()],
        client_ip_header: Some(ClientIpHeader::XForwardedFor),
        jwt: Some(JwtClaims {
            user: "sub".into(),
            tenant: Some("school".into()),
            role: Some("role".into()),
            keys: JwtKeys::hs256(SECRET),
        }),
        login: vec![LoginRule {
            route: "login".into(),
            username: Some("username".into()),
            user_id: Some(JsonPath::parse("$.userId").unwrap()),
            role: None,
            tenant: None,
            token: None,
        }],
        endpoints: vec![EndpointRule {
            route: "me".into(),
            user_id: JsonPath::parse("$.id").unwrap(),
            role: Some(JsonPath::parse("$.role").unwrap()),
            tenant: Some(JsonPath::parse("$.schoolId").unwrap()),
        }],
        logout_routes: vec!["logout".into()],
        ..IdentityConfig::default()
    }
}

fn attributor() -> Attributor {
    Attributor::new(cfg(), Keyer::new([7; 32]))
}

const SECRET: &[u8] = b"platform-secret";

/// A JWT signed with HS256 and `secret`.
fn signed(claims: &str, secret: &[u8]) -> String {
    let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let msg = format!(
        "{}.{}",
        e.encode(br#"{"alg":"HS256","typ":"JWT"}"#),
        e.encode(claims.as_bytes())
    );
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap();
    m.update(msg.as_bytes());
    format!("{msg}.{}", e.encode(m.finalize().into_bytes()))
}

/// A JWT with a made-up signature.
fn jwt(claims: &str) -> String {
    let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.c2ln",
        e.encode(br#"{"alg":"HS256","typ":"JWT"}"#),
        e.encode(claims.as_bytes())
    )
}

fn cred(a: &Attributor, headers: Vec<Header>) -> Option<(SessionKind, String)> {
    a.credential(&headers).map(|c| (c.kind, c.value))
}

/// Every way a session can be presented, and what is not a session.
#[test]
fn session_presentations() {
    let a = attributor();
    let c = |v: &str| Some((SessionKind::Cookie, v.to_string()));
    assert_eq!(cred(&a, vec![h("Cookie", "sid=abc")]), c("abc"));
    assert_eq!(
        cred(&a, vec![h("cookie", "theme=dark; sid=abc; lang=sv")]),
        c("abc")
    );
    assert_eq!(cred(&a, vec![h("Cookie", "  sid=abc ;x=1")]), c("abc"));
    // Spaces around `=`: Django reads `sid`, the demo platform and Go do not; unreadable.
    assert_eq!(cred(&a, vec![h("Cookie", "  sid = abc ;x=1")]), None);
    assert_eq!(cred(&a, vec![h("Cookie", "sid=\"q\"")]), c("q"));
    assert_eq!(
        cred(&a, vec![h("Cookie", "a=1"), h("Cookie", "sid=two")]),
        c("two")
    );
    assert_eq!(cred(&a, vec![h("Cookie", "xsid=abc; sidx=1")]), None);
    assert_eq!(cred(&a, vec![h("Cookie", "sid=")]), None);
    assert_eq!(cred(&a, vec![h("Cookie", "garbage;;;=")]), None);
    let b = |v: &str| Some((SessionKind::Bearer, v.to_string()));
    assert_eq!(cred(&a, vec![h("Authorization", "Bearer tok")]), b("tok"));
    assert_eq!(
        cred(&a, vec![h("authorization", "bearer   tok  ")]),
        b("tok")
    );
    assert_eq!(cred(&a, vec![h("Authorization", "BEARER tok")]), b("tok"));
    assert_eq!(
        cred(&a, vec![h("Authorization", "Basic dXNlcjpwdw==")]),
        None
    );
    assert_eq!(cred(&a, vec![h("Authorization", "Bearer ")]), None);
    // A bearer token wins over a cookie.
    assert_eq!(
        cred(
            &a,
            vec![h("Cookie", "sid=abc"), h("Authorization", "Bearer tok")]
        ),
        b("tok")
    );
    assert_eq!(
        cred(&a, vec![h("x-session", " hdr ")]),
        Some((SessionKind::Header, "hdr".into()))
    );
    assert_eq!(cred(&a, vec![h("X-Other", "1")]), None);
    // Bearer can be switched off.
    let mut c2 = cfg();
    c2.bearer = false;
    let a2 = Attributor::new(c2, Keyer::new([7; 32]));
    assert_eq!(cred(&a2, vec![h("Authorization", "Bearer tok")]), None);
}

#[test]
fn hashes_are_keyed_and_stable() {
    let k1 = Keyer::new([1; 32]);
    let k2 = Keyer::new([2; 32]);
    assert_eq!(k1.session_id("abc"), k1.session_id("abc"));
    assert_ne!(k1.session_id("abc"), k2.session_id("abc"));
    assert_ne!(k1.session_id("abc"), k1.user_hash("abc"));
    assert_eq!(k1.session_id("abc").len(), 32);
    // HMAC-SHA256(key = 32 x 0x01, "session:abc"), first 16 bytes.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&[1; 32]).unwrap();
    m.update(b"session:abc");
    assert_eq!(k1.session_id("abc"), hex(&m.finalize().into_bytes()[..16]));
}

#[test]
fn login_then_calls_are_attributed() {
    let mut a = attributor();
    let st = Stats::default();
    let login = ex(
        vec![h("Content-Type", "application/x-www-form-urlencoded")],
        "username=p1013&password=secret",
        200,
        vec![h("Set-Cookie", "sid=s3cr3t; Path=/; HttpOnly")],
        r#"{"ok":true,"userId":1013}"#,
    );
    let r = a.attribute(&login, Some("login"), None, &st);
    assert_eq!(r.source, IdentitySource::Login);
    assert_eq!(r.user_id.as_deref(), Some("1013"));
    assert_eq!(r.user_hash, Some(a.keyer().user_hash("p1013")));
    assert_eq!(r.session_id, Some(a.keyer().session_id("s3cr3t")));
    let call = ex(vec![h("Cookie", "sid=s3cr3t")], "", 200, vec![], "{}");
    let r = a.attribute(&call, Some("list"), None, &st);
    assert_eq!(r.source, IdentitySource::Login);
    assert_eq!(r.user_id.as_deref(), Some("1013"));
    assert_eq!(r.role, None);
    // The identity endpoint adds role and tenant.
    let me = ex(
        vec![h("Cookie", "sid=s3cr3t")],
        "",
        200,
        vec![],
        r#"{"id":1013,"role":"pupil","schoolId":"sch-01","name":"X"}"#,
    );
    let r = a.attribute(&me, Some("me"), None, &st);
    assert_eq!(r.source, IdentitySource::IdentityEndpoint);
    assert_eq!(
        (r.role.as_deref(), r.tenant.as_deref()),
        (Some("pupil"), Some("sch-01"))
    );
    let r = a.attribute(&call, Some("list"), None, &st);
    assert_eq!(r.source, IdentitySource::IdentityEndpoint);
    assert_eq!(r.tenant.as_deref(), Some("sch-01"));
    // A JSON login of the same user on a new session knows their role at once.
    let login2 = ex(
        vec![h("Content-Type", "application/json")],
        r#"{"username":"p1013","password":"x"}"#,
        200,
        vec![h("Set-Cookie", "sid=other; Max-Age=600")],
        r#"{"ok":true,"userId":1013}"#,
    );
    let r = a.attribute(&login2, Some("login"), None, &st);
    assert_eq!(r.user_hash, Some(a.keyer().user_hash("p1013")));
    assert_eq!(r.role.as_deref(), Some("pupil"));
    // A failed login: no identity, the attempted name only as a hash.
    let bad = ex(vec![], "username=p1013&password=wrong", 401, vec![], "{}");
    let r = a.attribute(&bad, Some("login"), None, &st);
    assert_eq!(r.source, IdentitySource::Rejected);
    assert_eq!(r.user_id, None);
    assert!(r.user_hash.is_some());
}

#[test]
fn unknown_sessions_and_rejections() {
    let mut a = attributor();
    let st = Stats::default();
    let call = ex(vec![h("Cookie", "sid=never-seen")], "", 200, vec![], "{}");
    let r = a.attribute(&call, Some("list"), None, &st);
    assert_eq!(r.source, IdentitySource::Unknown);
    assert_eq!(r.user_id, None);
    assert_eq!(r.session_id, Some(a.keyer().session_id("never-seen")));
    let none = ex(vec![], "", 200, vec![], "{}");
    let r = a.attribute(&none, Some("list"), None, &st);
    assert_eq!((r.source, r.session_id), (IdentitySource::None, None));
    // A JWT the platform refuses says nothing about who called.
    let t = jwt(r#"{"sub":"9","school":"sch-02","role":"admin"}"#);
    let forged = ex(
        vec![h("Authorization", &format!("Bearer {t}"))],
        "",
        401,
        vec![],
        "{}",
    );
    let r = a.attribute(&forged, Some("list"), None, &st);
    assert_eq!((r.source, r.user_id), (IdentitySource::Rejected, None));
}

#[test]
fn jwt_claims_identify() {
    let mut a = attributor();
    let st = Stats::default();
    let t = signed(
        r#"{"sub":"1334","school":"sch-02","role":"principal","exp":99999999999}"#,
        SECRET,
    );
    let call = ex(
        vec![h("Authorization", &format!("Bearer {t}"))],
        "",
        200,
        vec![],
        "{}",
    );
    let r = a.attribute(&call, Some("list"), None, &st);
    assert_eq!(r.source, IdentitySource::Jwt);
    assert_eq!(r.user_id.as_deref(), Some("1334"));
    assert_eq!(r.role.as_deref(), Some("principal"));
    assert_eq!(r.tenant.as_deref(), Some("sch-02"));
    assert_eq!(r.session_kind, Some(SessionKind::Bearer));
    // Numbers as claims, and a token that is not a JWT (opaque).
    let t = signed(r#"{"sub":42}"#, SECRET);
    let call = ex(
        vec![h("Authorization", &format!("Bearer {t}"))],
        "",
        200,
        vec![],
        "{}",
    );
    assert_eq!(
        a.attribute(&call, None, None, &st).user_id.as_deref(),
        Some("42")
    );
    for opaque in [
        "abc",
        "a.b.c",
        &signed("[1,2]", SECRET),
        &signed("{\"nosub\":1}", SECRET),
    ] {
        let call = ex(
            vec![h("Authorization", &format!("Bearer {opaque}"))],
            "",
            200,
            vec![],
            "{}",
        );
        assert_eq!(
            a.attribute(&call, None, None, &st).source,
            IdentitySource::Unknown,
            "{opaque}"
        );
    }
}

#[test]
fn logout_ends_the_session_after_a_grace() {
    let mut a = attributor();
    let st = Stats::default();
    let login = ex(
        vec![],
        "username=u",
        200,
        vec![h("Set-Cookie", "sid=v")],
        r#"{"userId":5}"#,
    );
    a.attribute(&login, Some("login"), None, &st);
    let out = ex(
        vec![h("Cookie", "sid=v")],
        "",
        200,
        vec![h("Set-Cookie", "sid=; Max-Age=0")],
        "{}",
    );
    // Both hops see the logout, both attribute it.
    for _ in 0..2 {
        assert_eq!(
            a.attribute(&out, Some("logout"), None, &st)
                .user_id
                .as_deref(),
            Some("5")
        );
    }
    assert_eq!(st.get(Metric::SessionsEnded), 1);
    let sid = a.keyer().session_id("v");
    let e = a.sessions.get(&sid).unwrap();
    assert!(e.expires.unwrap() <= now_unix() + LOGOUT_GRACE_SECS);
    assert!(expired(e, now_unix() + LOGOUT_GRACE_SECS, 3600));
}

#[test]
fn set_cookie_parsing() {
    let now = now_unix();
    let sc = set_cookies(&[h("Set-Cookie", "sid=a; Max-Age=60; Path=/")], "sid");
    assert_eq!(sc.len(), 1);
    assert!(!sc[0].cleared);
    assert_eq!(sc[0].expires(now), Some(now + 60));
    let sc = set_cookies(
        &[h(
            "Set-Cookie",
            "sid=a; Expires=Wed, 21 Oct 2015 07:28:00 GMT",
        )],
        "sid",
    );
    assert!(sc[0].cleared);
    assert_eq!(sc[0].expires(now), Some(1445412480));
    assert!(set_cookies(&[h("Set-Cookie", "sid=; Path=/")], "sid")[0].cleared);
    assert!(set_cookies(&[h("Set-Cookie", "sid=x; max-age=0")], "sid")[0].cleared);
    assert!(set_cookies(&[h("Set-Cookie", "other=x")], "sid").is_empty());
    assert!(set_cookies(&[h("Set-Cookie", "garbage")], "sid").is_empty());
}

#[test]
fn trusted_proxies_and_forwarded_clients() {
    let mut c = cfg();
    c.proxy = Some(ProxyHeaders {
        user: "X-User".into(),
        tenant: Some("X-Tenant".into()),
        role: None,
    });
    let mut a = Attributor::new(c, Keyer::new([7; 32]));
    let st = Stats::default();
    let proxy: IpAddr = "10.1.1.1".parse().unwrap();
    let stranger: IpAddr = "192.0.2.7".parse().unwrap();
    let req = |hs: Vec<Header>| ex(hs, "", 200, vec![], "{}");
    let r = a.attribute(
        &req(vec![h("X-Forwarded-For", "203.0.113.9, 10.2.2.2")]),
        None,
        Some(proxy),
        &st,
    );
    assert_eq!(r.client_ip, Some("203.0.113.9".parse().unwrap()));
    // A stranger's X-Forwarded-For and identity headers are not believed.
    let r = a.attribute(
        &req(vec![
            h("X-Forwarded-For", "203.0.113.9"),
            h("X-User", "admin"),
        ]),
        None,
        Some(stranger),
        &st,
    );
    assert_eq!(r.client_ip, Some(stranger));
    assert_eq!((r.user_id, r.source), (None, IdentitySource::None));
    let r = a.attribute(
        &req(vec![h("X-User", "u7"), h("X-Tenant", "t1")]),
        None,
        Some(proxy),
        &st,
    );
    assert_eq!(
        (r.user_id.as_deref(), r.tenant.as_deref(), r.source),
        (Some("u7"), Some("t1"), IdentitySource::ProxyHeader)
    );
    // A spoofed left-most entry does not hide the real client.
    let r = a.attribute(
        &req(vec![h("X-Forwarded-For", "1.1.1.1, 198.51.100.3")]),
        None,
        Some(proxy),
        &st,
    );
    assert_eq!(r.client_ip, Some("198.51.100.3".parse().unwrap()));
    let trusted = [Cidr::parse("10.0.0.0/8").unwrap()];
    let f = |v: &str| forwarded_client(&[h("Forwarded", v)], ClientIpHeader::Forwarded, &trusted);
    assert_eq!(
        f("for=192.0.2.60;proto=http;by=10.0.0.1"),
        Some("192.0.2.60".parse().unwrap())
    );
    assert_eq!(
        f("for=\"[2001:db8::17]:4711\""),
        Some("2001:db8::17".parse().unwrap())
    );
    assert_eq!(
        f("for=192.0.2.43, for=10.0.0.5"),
        Some("192.0.2.43".parse().unwrap())
    );
    assert_eq!(f("for=unknown"), None);
    assert_eq!(
        forwarded_client(
            &[h("X-Forwarded-For", "10.0.0.9")],
            ClientIpHeader::XForwardedFor,
            &trusted
        ),
        Some("10.0.0.9".parse().unwrap())
    );
    assert_eq!(
        forwarded_client(
            &[h("X-Forwarded-For", "junk, 192.0.2.1:5555")],
            ClientIpHeader::XForwardedFor,
            &trusted
        ),
        Some("192.0.2.1".parse().unwrap())
    );
    assert_eq!(
        forwarded_client(&[], ClientIpHeader::XForwardedFor, &trusted),
        None
    );
}

/// The learned map survives a restart, holds no raw credential, and is private.
#[test]
fn state_survives_restart_without_secrets() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let st = Stats::default();
    let key = Keyer::load_or_create(dir.path()).unwrap();
    let mode = std::fs::metadata(dir.path().join(KEY_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let mut a = Attributor::new(cfg(), key);
    a.attach_state(dir.path(), &st);
    let login = ex(
        vec![],
        "username=p77&password=pw-77",
        200,
        vec![h("Set-Cookie", "sid=RAWCOOKIE")],
        r#"{"userId":77}"#,
    );
    a.attribute(&login, Some("login"), None, &st);
    a.save(&st);
    let text = std::fs::read_to_string(dir.path().join(SESSIONS_FILE)).unwrap();
    for secret in ["RAWCOOKIE", "p77", "pw-77"] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    let mode = std::fs::metadata(dir.path().join(SESSIONS_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let mut b = Attributor::new(cfg(), Keyer::load_or_create(dir.path()).unwrap());
    b.attach_state(dir.path(), &st);
    let call = ex(vec![h("Cookie", "sid=RAWCOOKIE")], "", 200, vec![], "{}");
    let r = b.attribute(&call, None, None, &st);
    assert_eq!(
        (r.user_id.as_deref(), r.source),
        (Some("77"), IdentitySource::Login)
    );
    // A damaged state file is set aside, not fatal.
    std::fs::write(dir.path().join(SESSIONS_FILE), b"{not json").unwrap();
    let mut c = Attributor::new(cfg(), Keyer::load_or_create(dir.path()).unwrap());
    c.attach_state(dir.path(), &st);
    assert_eq!(c.sessions_known(), 0);
    assert!(dir.path().join("sessions.json.bad").exists());
    assert_eq!(st.get_reason(Metric::StateFilesRejected, "malformed"), 1);
    // A key file of the wrong size is an error that says what to do.
    std::fs::write(dir.path().join(KEY_FILE), b"short").unwrap();
    let e = Keyer::load_or_create(dir.path()).err().unwrap().to_string();
    assert!(e.contains("exactly 32 bytes"), "{e}");
}

#[test]
fn session_budget_evicts_oldest_counted() {
    let mut c = cfg();
    c.max_sessions = 100;
    let mut a = Attributor::new(c, Keyer::new([7; 32]));
    let st = Stats::default();
    for i in 0..250 {
        let login = ex(
            vec![],
            "username=u",
            200,
            vec![h("Set-Cookie", &format!("sid=s{i}"))],
            &format!(r#"{{"userId":{i}}}"#),
        );
        a.attribute(&login, Some("login"), None, &st);
    }
    assert!(a.sessions_known() <= 100);
    assert_eq!(
        st.get_reason(Metric::SessionsEvicted, "budget"),
        250 - a.sessions_known() as u64
    );
    let last = ex(vec![h("Cookie", "sid=s249")], "", 200, vec![], "{}");
    assert_eq!(
        a.attribute(&last, None, None, &st).user_id.as_deref(),
        Some("249")
    );
}

fn hb(name: &str, value: &[u8]) -> Header {
    Header {
        name: name.into(),
        value: value.to_vec(),
    }
}

fn call(headers: Vec<Header>, status: u16) -> Exchange {
    ex(headers, "", status, vec![], "{}")
}

/// Learns session `sid=<cookie>` as user `uid` of school `school` through the login route.
fn login(a: &mut Attributor, cookie: &str, uid: &str, school: &str, st: &Stats) {
    let mut c = a.cfg.clone();
    c.login[0].tenant = Some(JsonPath::parse("$.schoolId").unwrap());
    a.reconfigure(c);
    let l = ex(
        vec![],
        "username=x",
        200,
        vec![h("Set-Cookie", &format!("sid={cookie}; Path=/"))],
        &format!(r#"{{"userId":"{uid}","schoolId":"{school}"}}"#),
    );
    let r = a.attribute(&l, Some("login"), None, st);
    assert_eq!(r.source, IdentitySource::Login);
}

/// A JWT counts only when a configured key verifies it; otherwise it is an opaque session,
/// learned like a cookie, and a failed signature is an anomaly.
#[test]
fn unverified_jwt_claims_are_not_believed() {
    let mut a = attributor();
    let st = Stats::default();
    let bearer = |t: &str| vec![h("Authorization", &format!("Bearer {t}"))];
    // The incident: a pupil's unsigned token naming a victim in another school.
    let victim = r#"{"sub":"9001","school":"sch-09","role":"teacher","exp":99999999999}"#;
    for (token, reason, forged) in [
        (jwt(victim), "bad_signature", true),
        (signed(victim, b"guessed-secret"), "bad_signature", true),
        (
            {
                let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
                format!("{}.{}.", e.encode(br#"{"alg":"none"}"#), e.encode(victim))
            },
            "alg_none",
            true,
        ),
        (
            signed(r#"{"sub":"9001","exp":1000}"#, SECRET),
            "expired",
            false,
        ),
    ] {
        let r = a.attribute(&call(bearer(&token), 200), Some("list"), None, &st);
        assert_eq!(r.source, IdentitySource::Unknown, "{reason}");
        assert_eq!(
            (r.user_id, r.tenant, r.role),
            (None, None, None),
            "{reason}"
        );
        assert_eq!(r.session_id, Some(a.keyer().session_id(&token)), "{reason}");
        assert_eq!(
            r.anomalies,
            if forged {
                vec![Anomaly::JwtSignatureInvalid]
            } else {
                vec![]
            },
            "{reason}"
        );
    }
    assert_eq!(st.get_reason(Metric::JwtUnverified, "bad_signature"), 2);
    assert_eq!(st.get_reason(Metric::JwtUnverified, "alg_none"), 1);
    assert_eq!(st.get_reason(Metric::JwtUnverified, "expired"), 1);
    assert_eq!(
        st.get_reason(Metric::AttributionAnomalies, "jwt_signature_invalid"),
        3
    );
    // With no key configured, a token is learned like a cookie: the identity endpoint's answer
    // names its holder, later calls are attributed from that, and the claims never count.
    let mut c = cfg();
    c.jwt.as_mut().unwrap().keys = JwtKeys::default();
    let mut a = Attributor::new(c, Keyer::new([7; 32]));
    let t = jwt(victim);
    let me = ex(
        bearer(&t),
        "",
        200,
        vec![],
        r#"{"id":"42","role":"pupil","schoolId":"sch-01"}"#,
    );
    assert_eq!(
        a.attribute(&me, Some("me"), None, &st).source,
        IdentitySource::IdentityEndpoint
    );
    let r = a.attribute(&call(bearer(&t), 200), Some("list"), None, &st);
    assert_eq!(
        (r.user_id.as_deref(), r.tenant.as_deref(), r.source),
        (Some("42"), Some("sch-01"), IdentitySource::IdentityEndpoint)
    );
    assert!(r.anomalies.is_empty());
    assert_eq!(st.get_reason(Metric::JwtUnverified, "no_key"), 2);
}

/// Two credentials: both session hashes, an anomaly, and the user of the one the platform
/// believes (configured precedence; default bearer, then cookie, then header).
#[test]
fn two_credentials_are_recorded_with_both_hashes() {
    let mut a = attributor();
    let st = Stats::default();
    login(&mut a, "victimsid", "77", "sch-01", &st);
    let k = |v: &str| a.keyer().session_id(v);
    let (kv, kt, kb) = (k("victimsid"), k("tok"), k("b"));
    // A cookie and a bearer token: the bearer token decides (the demo platform reads it alone).
    let r = a.attribute(
        &call(
            vec![
                h("Cookie", "sid=victimsid"),
                h("Authorization", "Bearer tok"),
            ],
            200,
        ),
        Some("list"),
        None,
        &st,
    );
    assert_eq!(r.session_ids, vec![kt.clone(), kv.clone()]);
    assert_eq!(r.session_id, Some(kt.clone()));
    assert_eq!(r.anomalies, vec![Anomaly::TwoCredentials]);
    assert_eq!((r.user_id, r.source), (None, IdentitySource::Unknown));
    // Configured for a platform that prefers its cookie.
    let mut c = a.cfg.clone();
    c.credentials.precedence = vec![
        CredentialKind::Cookie,
        CredentialKind::Bearer,
        CredentialKind::Header,
    ];
    a.reconfigure(c);
    let r = a.attribute(
        &call(
            vec![
                h("Authorization", "Bearer tok"),
                h("Cookie", "sid=victimsid"),
            ],
            200,
        ),
        Some("list"),
        None,
        &st,
    );
    assert_eq!(r.session_ids, vec![kv.clone(), kt.clone()]);
    assert_eq!(r.user_id.as_deref(), Some("77"));
    // Two crumbs of the session cookie: the first wins by default, the last when configured.
    let two = || call(vec![h("Cookie", "sid=victimsid; theme=x; sid=b")], 200);
    let r = a.attribute(&two(), Some("list"), None, &st);
    assert_eq!(
        (
            r.user_id.as_deref(),
            r.session_ids.clone(),
            r.anomalies.clone()
        ),
        (
            Some("77"),
            vec![kv.clone(), kb.clone()],
            vec![Anomaly::TwoCredentials]
        )
    );
    let mut c = a.cfg.clone();
    c.credentials.last_cookie_wins = true;
    a.reconfigure(c);
    let r = a.attribute(&two(), Some("list"), None, &st);
    assert_eq!(r.session_id, Some(kb.clone()));
    assert_eq!(r.session_ids, vec![kb, kv.clone()]);
    assert_eq!(r.user_id, None);
    // The same value twice (in two Cookie headers) is one credential.
    let r = a.attribute(
        &call(
            vec![h("Cookie", "sid=victimsid"), h("Cookie", "sid=victimsid")],
            200,
        ),
        Some("list"),
        None,
        &st,
    );
    assert_eq!((r.session_ids.len(), r.anomalies.len()), (0, 0));
    assert_eq!(
        st.get_reason(Metric::AttributionAnomalies, "two_credentials"),
        4
    );
}

/// A credential the agent cannot read as the server would: the record says `unreadable`, with
/// an anomaly, never an anonymous call.
#[test]
fn unreadable_credentials_are_said_so() {
    let mut a = attributor();
    let st = Stats::default();
    login(&mut a, "pupilsid", "5", "sch-01", &st);
    for (what, headers) in [
        // Python's strip() drops \x1f and finds the session; others keep it.
        (
            "unit separator after the cookie",
            vec![hb("Cookie", b"sid=pupilsid\x1f")],
        ),
        (
            "control byte in the cookie",
            vec![hb("Cookie", b"sid=pupil\x01sid")],
        ),
        (
            "non-ASCII in the cookie",
            vec![hb("Cookie", b"sid=pupilsid\xff")],
        ),
        ("space before =", vec![h("Cookie", "sid =pupilsid")]),
        (
            "control byte before the name",
            vec![hb("Cookie", b"\x0bsid=pupilsid")],
        ),
        ("tab after Bearer", vec![h("Authorization", "Bearer\ttok")]),
        (
            "token ended by \\x1f",
            vec![hb("Authorization", b"Bearer tok\x1f")],
        ),
        (
            "control byte before the scheme",
            vec![hb("Authorization", b"\x0bBearer tok")],
        ),
        (
            "space inside the token",
            vec![h("Authorization", "Bearer to k")],
        ),
        (
            "session header with a control byte",
            vec![hb("X-Session", b"ab\x01c")],
        ),
    ] {
        let r = a.attribute(&call(headers, 200), Some("list"), None, &st);
        assert_eq!(r.source, IdentitySource::Unreadable, "{what}");
        assert_eq!((r.session_id, r.user_id), (None, None), "{what}");
        assert_eq!(r.anomalies, vec![Anomaly::UnreadableCredential], "{what}");
    }
    assert_eq!(
        st.get_reason(Metric::AttributionAnomalies, "unreadable_credential"),
        10
    );
    // The platform refused it: rejected (the anomaly stays).
    let r = a.attribute(
        &call(vec![hb("Cookie", b"sid=x\x1f")], 401),
        Some("list"),
        None,
        &st,
    );
    assert_eq!(r.source, IdentitySource::Rejected);
    assert_eq!(r.anomalies, vec![Anomaly::UnreadableCredential]);
    // The incident's `Cookie: x=\x01; <session>`: the session crumb itself is clean, and the
    // split-on-';' frameworks (the demo platform among them) find it, so the agent does too.
    let r = a.attribute(
        &call(vec![hb("Cookie", b"x=\x01; sid=pupilsid")], 200),
        Some("list"),
        None,
        &st,
    );
    assert_eq!(
        (r.user_id.as_deref(), r.tenant.as_deref(), r.source),
        (Some("5"), Some("sch-01"), IdentitySource::Login)
    );
    // A readable winner and an unreadable other: attributed, with the anomaly.
    let r = a.attribute(
        &call(vec![hb("Cookie", b"sid=pupilsid; sid=x\x01")], 200),
        Some("list"),
        None,
        &st,
    );
    assert_eq!(r.user_id.as_deref(), Some("5"));
    assert_eq!(r.anomalies, vec![Anomaly::UnreadableCredential]);
    // Other schemes and other cookies are no credential at all.
    for headers in [
        vec![h("Authorization", "Basic dXNlcjpwdw==")],
        vec![h("Authorization", "Bearerx tok")],
        vec![hb("Cookie", b"theme=\x01\xff; SID=upper")],
    ] {
        let r = a.attribute(&call(headers, 200), Some("list"), None, &st);
        assert_eq!((r.source, r.anomalies.len()), (IdentitySource::None, 0));
    }
}

/// The login answer names the school: later calls carry it without the identity endpoint.
#[test]
fn login_answer_names_the_school() {
    let mut a = attributor();
    let st = Stats::default();
    login(&mut a, "s1", "12", "sch-03", &st);
    let r = a.attribute(
        &call(vec![h("Cookie", "sid=s1")], 200),
        Some("list"),
        None,
        &st,
    );
    assert_eq!(
        (r.user_id.as_deref(), r.tenant.as_deref(), r.source),
        (Some("12"), Some("sch-03"), IdentitySource::Login)
    );
}

/// The client address: the socket peer unless a header is configured, and then only that
/// header, only from trusted proxies.
#[test]
fn forwarded_is_believed_only_when_configured() {
    let st = Stats::default();
    let proxy: IpAddr = "10.1.1.1".parse().unwrap();
    let headers = || {
        vec![
            h("Forwarded", "for=198.51.100.66"),
            h("X-Forwarded-For", "203.0.113.9"),
            h("X-Real-IP", "192.0.2.44"),
        ]
    };
    let ip = |which: Option<ClientIpHeader>| {
        let mut c = cfg();
        c.client_ip_header = which;
        let mut a = Attributor::new(c, Keyer::new([7; 32]));
        a.attribute(&call(headers(), 200), None, Some(proxy), &st)
            .client_ip
            .unwrap()
            .to_string()
    };
    assert_eq!(ip(None), "10.1.1.1");
    assert_eq!(ip(Some(ClientIpHeader::XForwardedFor)), "203.0.113.9");
    assert_eq!(ip(Some(ClientIpHeader::Forwarded)), "198.51.100.66");
    assert_eq!(ip(Some(ClientIpHeader::XRealIp)), "192.0.2.44");
}
