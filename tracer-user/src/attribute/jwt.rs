//! Whether a bearer token's claims may be believed: only when its signature verifies with a key
//! the operator configured (an HS256 secret, an RS256/ES256 public key in PEM, or a JWKS file)
//! and its `exp`/`nbf` hold. Anything else (no key configured, `alg: none`, a bad signature, an
//! unknown `kid`, an algorithm the keys are not for) leaves the token an opaque session, learned
//! like a cookie; a failed signature is also an anomaly (someone forged or altered a token).
//!
//! Keys are read once, when the configuration is checked (`sparbar check-config` reports a
//! missing or unreadable file); the raw key bytes never leave this module.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use jsonwebtoken::{
    errors::ErrorKind,
    jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm},
    Algorithm, DecodingKey, Validation,
};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Default clock skew allowed on `exp` and `nbf`, in seconds.
pub const DEFAULT_LEEWAY_SECS: u64 = 60;

/// A key file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JwtKeyError {
    #[error("{path}: cannot be read: {source}; expected a file the agent can read")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: is empty; expected the platform's HS256 secret")]
    EmptySecret { path: PathBuf },
    #[error("{path}: is neither an RSA nor a P-256 EC public key in PEM; expected a file starting with \"-----BEGIN PUBLIC KEY-----\"")]
    BadPem { path: PathBuf },
    #[error("{path}: is not a JWKS document ({detail}); expected {{\"keys\": [{{\"kty\": \"RSA\", \"kid\": …, \"n\": …, \"e\": …}}]}}")]
    BadJwks { path: PathBuf, detail: String },
    #[error("{path}: holds no RSA, P-256 EC or HMAC key the agent can use")]
    NoUsableJwk { path: PathBuf },
}

/// One verification key.
#[derive(Clone)]
struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// The configured verification keys (possibly none).
#[derive(Clone, Default)]
pub struct JwtKeys {
    keys: Vec<Key>,
    /// SHA-256 over the key material, so a reload can tell whether keys changed.
    fingerprint: [u8; 32],
    pub leeway_secs: u64,
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKeys")
            .field("keys", &self.keys.len())
            .field("leeway_secs", &self.leeway_secs)
            .finish()
    }
}

impl PartialEq for JwtKeys {
    fn eq(&self, o: &Self) -> bool {
        self.fingerprint == o.fingerprint
            && self.leeway_secs == o.leeway_secs
            && self.keys.len() == o.keys.len()
    }
}
impl Eq for JwtKeys {}

fn read(path: &Path) -> Result<Vec<u8>, JwtKeyError> {
    std::fs::read(path).map_err(|source| JwtKeyError::Read {
        path: path.to_path_buf(),
        source,
    })
}

impl JwtKeys {
    /// Keys from the configured files (each optional).
    pub fn load(
        hs256_secret_file: Option<&Path>,
        public_key_file: Option<&Path>,
        jwks_file: Option<&Path>,
        leeway_secs: u64,
    ) -> Result<JwtKeys, JwtKeyError> {
        let mut k = JwtKeys {
            leeway_secs,
            ..JwtKeys::default()
        };
        let mut fp = Sha256::new();
        if let Some(p) = hs256_secret_file {
            let mut s = read(p)?;
            // One trailing line end is the file's, not the secret's.
            if s.ends_with(b"\n") {
                s.pop();
                if s.ends_with(b"\r") {
                    s.pop();
                }
            }
            if s.is_empty() {
                return Err(JwtKeyError::EmptySecret {
                    path: p.to_path_buf(),
                });
            }
            fp.update(b"hs256:");
            fp.update(&s);
            k.keys.push(Key {
                kid: None,
                alg: Algorithm::HS256,
                key: DecodingKey::from_secret(&s),
            });
        }
        if let Some(p) = public_key_file {
            let pem = read(p)?;
            fp.update(b"pem:");
            fp.update(&pem);
            let key = if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                Key {
                    kid: None,
                    alg: Algorithm::RS256,
                    key,
                }
            } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
                Key {
                    kid: None,
                    alg: Algorithm::ES256,
                    key,
                }
            } else {
                return Err(JwtKeyError::BadPem {
                    path: p.to_path_buf(),
                });
            };
            k.keys.push(key);
        }
        if let Some(p) = jwks_file {
            let raw = read(p)?;
            fp.update(b"jwks:");
            fp.update(&raw);
            let set: JwkSet = serde_json::from_slice(&raw).map_err(|e| JwtKeyError::BadJwks {
                path: p.to_path_buf(),
                detail: e.to_string(),
            })?;
            let before = k.keys.len();
            for jwk in &set.keys {
                let alg = match (&jwk.algorithm, jwk.common.key_algorithm) {
                    (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => {
                        Algorithm::RS256
                    }
                    (AlgorithmParameters::EllipticCurve(ec), None | Some(KeyAlgorithm::ES256))
                        if ec.curve == EllipticCurve::P256 =>
                    {
                        Algorithm::ES256
                    }
                    (AlgorithmParameters::OctetKey(_), None | Some(KeyAlgorithm::HS256)) => {
                        Algorithm::HS256
                    }
                    _ => continue,
                };
                let Ok(key) = DecodingKey::from_jwk(jwk) else {
                    continue;
                };
                k.keys.push(Key {
                    kid: jwk.common.key_id.clone(),
                    alg,
                    key,
                });
            }
            if k.keys.len() == before {
                return Err(JwtKeyError::NoUsableJwk {
                    path: p.to_path_buf(),
                });
            }
        }
        k.fingerprint = fp.finalize().into();
        Ok(k)
    }

    /// Keys of one HS256 secret (tests and tools; the agent reads secrets from files).
    pub fn hs256(secret: &[u8]) -> JwtKeys {
        JwtKeys {
            keys: vec![Key {
                kid: None,
                alg: Algorithm::HS256,
                key: DecodingKey::from_secret(secret),
            }],
            fingerprint: Sha256::digest(secret).into(),
            leeway_secs: DEFAULT_LEEWAY_SECS,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks `token` (a bearer credential) as the platform would.
    pub fn check(&self, token: &str) -> JwtCheck {
        let Some(alg) = header_alg(token) else {
            return JwtCheck::NotJwt;
        };
        if alg.eq_ignore_ascii_case("none") {
            return JwtCheck::Unverified(if self.keys.is_empty() {
                JwtFailure::NoKey
            } else {
                JwtFailure::AlgNone
            });
        }
        if self.keys.is_empty() {
            return JwtCheck::Unverified(JwtFailure::NoKey);
        }
        let Ok(header) = jsonwebtoken::decode_header(token) else {
            // An algorithm name the library does not know.
            return JwtCheck::Unverified(JwtFailure::AlgMismatch);
        };
        // A `kid` picks its key; a token without one is tried against every key.
        let candidates: Vec<&Key> = match &header.kid {
            Some(kid) => {
                let named: Vec<&Key> = self
                    .keys
                    .iter()
                    .filter(|k| k.kid.as_deref() == Some(kid.as_str()))
                    .collect();
                if named.is_empty() {
                    let anonymous: Vec<&Key> =
                        self.keys.iter().filter(|k| k.kid.is_none()).collect();
                    if anonymous.is_empty() {
                        return JwtCheck::Unverified(JwtFailure::UnknownKid);
                    }
                    anonymous
                } else {
                    named
                }
            }
            None => self.keys.iter().collect(),
        };
        let candidates: Vec<&Key> = candidates
            .into_iter()
            .filter(|k| k.alg == header.alg)
            .collect();
        if candidates.is_empty() {
            return JwtCheck::Unverified(JwtFailure::AlgMismatch);
        }
        let mut v = Validation::new(header.alg);
        v.required_spec_claims.clear();
        v.validate_exp = true;
        v.validate_nbf = true;
        v.validate_aud = false;
        v.leeway = self.leeway_secs;
        let mut failure = JwtFailure::BadSignature;
        for k in candidates {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &k.key, &v) {
                Ok(d) => {
                    // A time claim that is not a number is skipped by the library; platforms
                    // refuse such a token (`int(claims["exp"])` fails), so it is not believed.
                    let bad_time = ["exp", "nbf"]
                        .iter()
                        .any(|c| d.claims.get(*c).is_some_and(|v| !v.is_number()));
                    return if bad_time {
                        JwtCheck::Unverified(JwtFailure::Malformed)
                    } else {
                        JwtCheck::Verified(d.claims)
                    };
                }
                Err(e) => {
                    failure = match e.kind() {
                        ErrorKind::InvalidSignature => JwtFailure::BadSignature,
                        ErrorKind::ExpiredSignature => JwtFailure::Expired,
                        ErrorKind::ImmatureSignature => JwtFailure::NotYetValid,
                        ErrorKind::InvalidAlgorithm => JwtFailure::AlgMismatch,
                        _ => JwtFailure::Malformed,
                    };
                    // The signature held: another key would not change the verdict.
                    if matches!(
                        failure,
                        JwtFailure::Expired | JwtFailure::NotYetValid | JwtFailure::Malformed
                    ) {
                        break;
                    }
                }
            }
        }
        JwtCheck::Unverified(failure)
    }
}

/// The `alg` of a token shaped like a JWT (three base64url parts, a JSON object header).
fn header_alg(token: &str) -> Option<String> {
    let mut it = token.split('.');
    let (h, _c, _s) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() || h.len() > 4096 {
        return None;
    }
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(h.trim_end_matches('='))
        .ok()?;
    match serde_json::from_slice::<Value>(&raw).ok()? {
        Value::Object(m) => m.get("alg")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// What a bearer token's claims are worth.
#[derive(Debug, Clone, PartialEq)]
pub enum JwtCheck {
    /// Not a JWT at all: an opaque token.
    NotJwt,
    /// Signed by a configured key and within its validity: the claims are believed.
    Verified(Map<String, Value>),
    /// A JWT whose claims are not believed; the token is an opaque session.
    Unverified(JwtFailure),
}

/// Why a JWT's claims are not believed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtFailure {
    /// No verification key is configured.
    NoKey,
    /// `alg: none` while keys are configured.
    AlgNone,
    /// The signature does not verify with the configured key(s).
    BadSignature,
    /// A `kid` no configured key has.
    UnknownKid,
    /// An algorithm none of the configured keys is for (HS256 against an RSA key, …).
    AlgMismatch,
    /// `exp` has passed (beyond the leeway).
    Expired,
    /// `nbf` is still ahead (beyond the leeway).
    NotYetValid,
    /// Claims that are not a JSON object or malformed time claims.
    Malformed,
}

impl JwtFailure {
    /// The `reason` label of `jwt_unverified_total`.
    pub fn reason(self) -> &'static str {
        match self {
            JwtFailure::NoKey => "no_key",
            JwtFailure::AlgNone => "alg_none",
            JwtFailure::BadSignature => "bad_signature",
            JwtFailure::UnknownKid => "unknown_kid",
            JwtFailure::AlgMismatch => "alg_mismatch",
            JwtFailure::Expired => "expired",
            JwtFailure::NotYetValid => "not_yet_valid",
            JwtFailure::Malformed => "malformed",
        }
    }

    /// A signature that should have verified and did not: a forged or altered token.
    pub fn is_forgery(self) -> bool {
        matches!(
            self,
            JwtFailure::AlgNone
                | JwtFailure::BadSignature
                | JwtFailure::UnknownKid
                | JwtFailure::AlgMismatch
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{Hmac, Mac};

    const RSA_PUB: &str = "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA6/IQztbEdNAWXCED+vKj\nCMqtAIAFmLAYdFkzIHtMJF/U1oU+B1/a+UDxDdnfH0nqdreWKCikpG9udwS5FNG+\nRrkEGnj0vlMH/4Em8QhX1f2QO/A7TVqQlnwFdPWgHwvnKDVEbmfGpfTnsYlefY/B\nEoIevcMNChm+Kbdz1b6Z/5Ry4h1p0+bNV6YkPM/TUQ1n++tLdiRXueyh2skJLz6L\n+t62pdFCoR7rUFyLSlnUoRTANoA1+ZBHfeHXcv+isqXwMpALyOi5G4HIQuV60pTP\nAiHByqI9mBTiWAkp0phIxLSleeQ7ivBdy5skFsAj/MmQh7EcSu0p2PVJqadE0cPb\nCQIDAQAB\n-----END PUBLIC KEY-----\n";
    const EC_PUB: &str = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEdUJHZDvgP1kSzEdrN7g7yJJVOMvp\nFm02DnDdsiJUSgJK86P7rHHIyMYSGXcynzWVtEm+3ytvltX8uuxQz/Gu7g==\n-----END PUBLIC KEY-----\n";
    /// `{"sub":"1334","school":"sch-02","role":"principal","exp":99999999999}` signed by the
    /// private halves of the keys above (made with `openssl dgst -sha256 -sign`).
    const RS256_TOKEN: &str = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMzM0Iiwic2Nob29sIjoic2NoLTAyIiwicm9sZSI6InByaW5jaXBhbCIsImV4cCI6OTk5OTk5OTk5OTl9.oojyJ_2TP8hWMbOpFLXj_ddvrgA69rRmjMhkdAVtJdQUNVtxWiipCoSenJRZm5O74rFJ-8ZItx8lae_pexhybgSZaLx0fCHiURvDbFLmT4ukxERjXyVF7Pkk4v_lqEpEKVjg9IWNeGQuLarcYuDPf2bVIGi43wW_ua3Jlq0uGCDLO5cFsgMJR4cA7dpOneS_mTNsMqZk0YpkPwNFo7uR9FOo5tpdiR6kFVQmFufL_hLMDNzA640gSOsxhTtB08Yehzc4WVdrmCykwic2Mi6RyN1gKac1AaFmLm6So9KlCS8GQ_5_wgXQ2U0ywR1Tjy1Cy5-k2WPcNKl024upHXqEyQ";
    const ES256_TOKEN: &str = "eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMzM0Iiwic2Nob29sIjoic2NoLTAyIiwicm9sZSI6InByaW5jaXBhbCIsImV4cCI6OTk5OTk5OTk5OTl9.mdoAlWyV15tJmM4TuE0q5WfgzG10fIhxxVtPsL_KRuY4ONfF1bENrZhNgn-EugnzNXICm9uGNDZY9C8NZ34OkA";

    fn b64(b: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    }

    fn hs(header: &str, claims: &str, secret: &[u8]) -> String {
        let msg = format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()));
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap();
        m.update(msg.as_bytes());
        format!("{msg}.{}", b64(&m.finalize().into_bytes()))
    }

    fn file(dir: &tempfile::TempDir, name: &str, body: &[u8]) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    fn sub(c: JwtCheck) -> Option<String> {
        match c {
            JwtCheck::Verified(m) => m.get("sub").and_then(|v| v.as_str()).map(str::to_string),
            _ => None,
        }
    }

    const H: &str = r#"{"alg":"HS256","typ":"JWT"}"#;
    const CLAIMS: &str = r#"{"sub":"1334","exp":99999999999}"#;

    #[test]
    fn hs256_secret_from_a_file() {
        let d = tempfile::tempdir().unwrap();
        let k = JwtKeys::load(Some(&file(&d, "s", b"s3cret\n")), None, None, 60).unwrap();
        assert_eq!(
            sub(k.check(&hs(H, CLAIMS, b"s3cret"))).as_deref(),
            Some("1334")
        );
        // A pupil's own token, signed with a guessed secret.
        let forged = hs(H, r#"{"sub":"1","exp":99999999999}"#, b"guess");
        assert_eq!(
            k.check(&forged),
            JwtCheck::Unverified(JwtFailure::BadSignature)
        );
        // The claims altered after signing.
        let good = hs(H, CLAIMS, b"s3cret");
        let parts: Vec<&str> = good.split('.').collect();
        let altered = format!(
            "{}.{}.{}",
            parts[0],
            b64(br#"{"sub":"1","exp":99999999999}"#),
            parts[2]
        );
        assert_eq!(
            k.check(&altered),
            JwtCheck::Unverified(JwtFailure::BadSignature)
        );
        // alg none, in any case, with or without a signature part.
        for alg in ["none", "None", "NONE"] {
            let t = format!(
                "{}.{}.",
                b64(format!(r#"{{"alg":"{alg}"}}"#).as_bytes()),
                b64(CLAIMS.as_bytes())
            );
            assert_eq!(
                k.check(&t),
                JwtCheck::Unverified(JwtFailure::AlgNone),
                "{alg}"
            );
        }
        // HS256 tokens are not checked against an RSA key, nor RS256 tokens against a secret.
        assert_eq!(
            k.check(RS256_TOKEN),
            JwtCheck::Unverified(JwtFailure::AlgMismatch)
        );
        assert_eq!(k.check("opaque-token"), JwtCheck::NotJwt);
        assert_eq!(k.check("a.b.c"), JwtCheck::NotJwt);
        assert!(JwtFailure::BadSignature.is_forgery() && !JwtFailure::Expired.is_forgery());
        assert!(matches!(
            JwtKeys::load(Some(&file(&d, "e", b"\n")), None, None, 60),
            Err(JwtKeyError::EmptySecret { .. })
        ));
    }

    #[test]
    fn exp_and_nbf_are_checked_with_leeway() {
        let k = JwtKeys::hs256(b"k");
        let now = crate::attribute::credentials::now_unix();
        let t = |c: String| k.check(&hs(H, &c, b"k"));
        assert_eq!(
            t(format!(r#"{{"sub":"1","exp":{}}}"#, now - 3600)),
            JwtCheck::Unverified(JwtFailure::Expired)
        );
        assert_eq!(
            sub(t(format!(r#"{{"sub":"1","exp":{}}}"#, now - 30))).as_deref(),
            Some("1")
        );
        assert_eq!(
            t(format!(r#"{{"sub":"1","nbf":{}}}"#, now + 3600)),
            JwtCheck::Unverified(JwtFailure::NotYetValid)
        );
        assert_eq!(sub(t(r#"{"sub":"1"}"#.to_string())).as_deref(), Some("1"));
        assert_eq!(
            t(r#"{"sub":"1","exp":"soon"}"#.to_string()),
            JwtCheck::Unverified(JwtFailure::Malformed)
        );
        // No key at all: nothing is believed, and nothing is a forgery.
        let none = JwtKeys::default();
        assert_eq!(
            none.check(&hs(H, CLAIMS, b"k")),
            JwtCheck::Unverified(JwtFailure::NoKey)
        );
        assert!(!JwtFailure::NoKey.is_forgery());
    }

    #[test]
    fn rs256_and_es256_public_keys_in_pem() {
        let d = tempfile::tempdir().unwrap();
        let rsa =
            JwtKeys::load(None, Some(&file(&d, "r.pem", RSA_PUB.as_bytes())), None, 60).unwrap();
        assert_eq!(sub(rsa.check(RS256_TOKEN)).as_deref(), Some("1334"));
        assert_eq!(
            rsa.check(ES256_TOKEN),
            JwtCheck::Unverified(JwtFailure::AlgMismatch)
        );
        // The key-confusion attack: HS256 "signed" with the public key's bytes.
        let confused = hs(r#"{"alg":"HS256"}"#, CLAIMS, RSA_PUB.as_bytes());
        assert_eq!(
            rsa.check(&confused),
            JwtCheck::Unverified(JwtFailure::AlgMismatch)
        );
        let ec =
            JwtKeys::load(None, Some(&file(&d, "e.pem", EC_PUB.as_bytes())), None, 60).unwrap();
        assert_eq!(sub(ec.check(ES256_TOKEN)).as_deref(), Some("1334"));
        let mut bad = ES256_TOKEN.to_string();
        bad.replace_range(bad.len() - 4.., "AAAA");
        assert_eq!(
            ec.check(&bad),
            JwtCheck::Unverified(JwtFailure::BadSignature)
        );
        assert!(matches!(
            JwtKeys::load(None, Some(&file(&d, "x.pem", b"not a key")), None, 60),
            Err(JwtKeyError::BadPem { .. })
        ));
        assert!(matches!(
            JwtKeys::load(None, Some(&d.path().join("missing.pem")), None, 60),
            Err(JwtKeyError::Read { .. })
        ));
    }

    #[test]
    fn jwks_keys_by_kid() {
        let d = tempfile::tempdir().unwrap();
        let jwks = format!(
            r#"{{"keys":[{{"kty":"oct","kid":"k1","alg":"HS256","k":"{}"}}]}}"#,
            b64(b"s1")
        );
        let k = JwtKeys::load(None, None, Some(&file(&d, "j.json", jwks.as_bytes())), 60).unwrap();
        let with_kid = |kid: &str, secret: &[u8]| {
            hs(
                &format!(r#"{{"alg":"HS256","kid":"{kid}"}}"#),
                CLAIMS,
                secret,
            )
        };
        assert_eq!(
            sub(k.check(&with_kid("k1", b"s1"))).as_deref(),
            Some("1334")
        );
        assert_eq!(
            k.check(&with_kid("k9", b"s1")),
            JwtCheck::Unverified(JwtFailure::UnknownKid)
        );
        assert_eq!(
            k.check(&with_kid("k1", b"s2")),
            JwtCheck::Unverified(JwtFailure::BadSignature)
        );
        assert_eq!(sub(k.check(&hs(H, CLAIMS, b"s1"))).as_deref(), Some("1334"));
        assert!(matches!(
            JwtKeys::load(None, None, Some(&file(&d, "b.json", b"{}")), 60),
            Err(JwtKeyError::BadJwks { .. })
        ));
        assert!(matches!(
            JwtKeys::load(None, None, Some(&file(&d, "n.json", br#"{"keys":[]}"#)), 60),
            Err(JwtKeyError::NoUsableJwk { .. })
        ));
    }
}
