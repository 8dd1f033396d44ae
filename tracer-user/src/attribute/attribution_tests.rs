//! Tests of the attribution step: credentials, learned sessions, identity sources, proxies.

use super::*;
use crate::config::Cidr;
use crate::config::{EndpointRule, JwtClaims, ProxyHeaders};
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
    }
}

fn cfg() -> IdentityConfig {
    IdentityConfig {
        session_cookies: vec!["sid".into()],
        session_headers: vec!["X-Session".into()],
        trusted_proxies: vec![Cidr::parse("10.0.0.0/8").unwrap()],
        jwt: Some(JwtClaims {
            user: "sub".into(),
            tenant: Some("school".into()),
            role: Some("role".into()),
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
    assert_eq!(cred(&a, vec![h("Cookie", "  sid = abc ;x=1")]), c("abc"));
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
    let t = jwt(r#"{"sub":"1334","school":"sch-02","role":"principal","exp":99999999999}"#);
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
    let t = jwt(r#"{"sub":42}"#);
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
        "a.!!!.c",
        &jwt("[1,2]"),
        &jwt("{\"nosub\":1}"),
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
    let f = |v: &str| forwarded_client(&[h("Forwarded", v)], &trusted);
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
        forwarded_client(&[h("X-Forwarded-For", "10.0.0.9")], &trusted),
        Some("10.0.0.9".parse().unwrap())
    );
    assert_eq!(
        forwarded_client(&[h("X-Forwarded-For", "junk, 192.0.2.1:5555")], &trusted),
        Some("192.0.2.1".parse().unwrap())
    );
    assert_eq!(forwarded_client(&[], &trusted), None);
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
