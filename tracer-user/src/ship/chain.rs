//! The tamper evidence: each stream is a hash chain, and signed checkpoints pin its head.
//!
//! **Sealing.** When a record enters its stream's spool it gets two fields, spliced into the
//! serialized line without re-encoding it:
//! - `event.sequence`: 1, 2, 3 … per stream, never reused (inserted as the first key of the
//!   top-level `event` object);
//! - `sparbar.chain`: `{"stream": "access"|"security", "prev": "<hex>"}` (the first key of the
//!   top-level `sparbar` object, which is added at the end when the record has none), where
//!   `prev` is the SHA-256 of the previous sealed line of the same stream, exactly as written
//!   (without its newline), or 64 zeros for sequence 1.
//!
//! **Checkpoints.** Every `spool.checkpoint_interval` and at a clean stop, the agent signs the
//! head of each chain with its Ed25519 key (`<state_dir>/checkpoint.key`, 0600; the public key is
//! `checkpoint.pub`) and writes a `sparbar.checkpoint` record into the security stream:
//! `sparbar.checkpoint.streams` = `[{stream, sequence, hash}]` (sorted by stream name),
//! `.key_id` (the first 16 bytes of SHA-256 of the public key, hex), `.public_key` and
//! `.signature` (hex), over [`checkpoint_message`]. An edit, a deletion or a reordering breaks
//! the chain; rewriting the whole chain after the edit breaks the signatures.

use std::path::Path;

use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

use super::Stream;

pub const ZERO_HASH: [u8; 32] = [0; 32];
pub const KEY_FILE: &str = "checkpoint.key";
pub const PUB_FILE: &str = "checkpoint.pub";

pub fn hash(line: &[u8]) -> [u8; 32] {
    Sha256::digest(line).into()
}

pub fn hex(bytes: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(H[(b >> 4) as usize] as char);
        s.push(H[(b & 15) as usize] as char);
    }
    s
}

pub fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let b = s.as_bytes();
    if b.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        let d = |c: u8| (c as char).to_digit(16).map(|v| v as u8);
        *o = d(b[2 * i])? << 4 | d(b[2 * i + 1])?;
    }
    Some(out)
}

/// Where the top-level `"event":{` and `"sparbar":{` objects open (the index just past their
/// `{`), found by a scan that tracks strings and nesting, so a nested key of the same name or
/// text inside a string never matches.
fn top_level_objects(line: &[u8]) -> (Option<usize>, Option<usize>) {
    let (mut event, mut sparbar) = (None, None);
    let mut depth = 0usize;
    let mut i = 0;
    let mut key_start: Option<usize> = None; // start of the last string seen at depth 1
    let mut last_string: Option<(usize, usize)> = None;
    while i < line.len() {
        match line[i] {
            b'"' => {
                let start = i + 1;
                i += 1;
                while i < line.len() && line[i] != b'"' {
                    if line[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                if depth == 1 {
                    key_start = Some(start);
                    last_string = Some((start, i));
                }
            }
            b'{' | b'[' => {
                if depth == 1 && line[i] == b'{' {
                    if let (Some((s, e)), Some(_)) = (last_string, key_start) {
                        // `"key":{` — only whitespace-free compact JSON is sealed.
                        if e + 2 == i && line[e + 1] == b':' {
                            match &line[s..e] {
                                b"event" if event.is_none() => event = Some(i + 1),
                                b"sparbar" if sparbar.is_none() => sparbar = Some(i + 1),
                                _ => {}
                            }
                        }
                    }
                }
                depth += 1;
                last_string = None;
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            b',' => last_string = None,
            _ => {}
        }
        i += 1;
    }
    (event, sparbar)
}

/// Seals `line` (one compact JSON object) as record `seq` of `stream` following a record whose
/// hash is `prev`. A line that is not a JSON object is wrapped as `{"sparbar":{..,"raw":line}}`
/// so nothing is ever refused here.
pub fn seal(line: &[u8], stream: Stream, seq: u64, prev: &[u8; 32]) -> Vec<u8> {
    let chain = format!(
        "\"chain\":{{\"stream\":\"{}\",\"prev\":\"{}\"}}",
        stream.name(),
        hex(prev)
    );
    let ok_object = line.first() == Some(&b'{') && line.last() == Some(&b'}');
    if !ok_object {
        let raw = serde_json::to_string(&String::from_utf8_lossy(line)).unwrap_or_default();
        return format!(
            "{{\"event\":{{\"sequence\":{seq}}},\"sparbar\":{{{chain},\"raw\":{raw}}}}}"
        )
        .into_bytes();
    }
    let (event, sparbar) = top_level_objects(line);
    let seq_text = format!("\"sequence\":{seq}");
    let mut out = Vec::with_capacity(line.len() + chain.len() + seq_text.len() + 16);
    let mut inserts: Vec<(usize, String)> = Vec::with_capacity(2);
    let comma_after = |at: usize| line.get(at) != Some(&b'}');
    match event {
        Some(at) => inserts.push((
            at,
            if comma_after(at) {
                format!("{seq_text},")
            } else {
                seq_text.clone()
            },
        )),
        None => inserts.push((
            1,
            format!(
                "\"event\":{{{seq_text}}}{}",
                if line.len() > 2 { "," } else { "" }
            ),
        )),
    }
    match sparbar {
        Some(at) => inserts.push((
            at,
            if comma_after(at) {
                format!("{chain},")
            } else {
                chain.clone()
            },
        )),
        None => {
            let sep = if line.len() > 2 || event.is_none() {
                ","
            } else {
                ""
            };
            inserts.push((line.len() - 1, format!("{sep}\"sparbar\":{{{chain}}}")));
        }
    }
    inserts.sort_by_key(|(at, _)| *at);
    let mut from = 0;
    for (at, text) in inserts {
        out.extend_from_slice(&line[from..at]);
        out.extend_from_slice(text.as_bytes());
        from = at;
    }
    out.extend_from_slice(&line[from..]);
    out
}

/// One stream's head as a checkpoint states it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub stream: Stream,
    pub seq: u64,
    pub hash: [u8; 32],
}

/// The bytes a checkpoint signs: a version line, then one `stream seq hash` line per stream,
/// sorted by stream name.
pub fn checkpoint_message(heads: &[Head]) -> Vec<u8> {
    let mut h: Vec<&Head> = heads.iter().collect();
    h.sort_by_key(|x| x.stream.name());
    let mut m = b"sparbar-checkpoint-v1\n".to_vec();
    for x in h {
        m.extend_from_slice(format!("{} {} {}\n", x.stream.name(), x.seq, hex(&x.hash)).as_bytes());
    }
    m
}

pub fn key_id(public: &VerifyingKey) -> String {
    hex(&hash(public.as_bytes())[..16])
}

/// The agent's checkpoint key.
pub struct Signer_ {
    key: SigningKey,
}

impl Signer_ {
    /// Loads `<state_dir>/checkpoint.key`, or makes one (32 random bytes, 0600) and writes the
    /// public key beside it (`checkpoint.pub`, hex, 0644) for auditors to keep elsewhere.
    pub fn load_or_create(state_dir: &Path) -> std::io::Result<Signer_> {
        let path = state_dir.join(KEY_FILE);
        let key = match std::fs::read(&path) {
            Ok(b) if b.len() == 32 => {
                let mut seed = [0u8; 32];
                seed.copy_from_slice(&b);
                SigningKey::from_bytes(&seed)
            }
            Ok(b) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {} bytes; expected a 32-byte Ed25519 seed (delete it to make a new key; old checkpoints then verify only with the old checkpoint.pub)", path.display(), b.len()),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut seed = [0u8; 32];
                std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut seed)?;
                crate::statefile::write_private(&path, &seed)?;
                SigningKey::from_bytes(&seed)
            }
            Err(e) => return Err(e),
        };
        let public = hex(key.verifying_key().as_bytes()) + "\n";
        let pub_path = state_dir.join(PUB_FILE);
        if std::fs::read_to_string(&pub_path).ok().as_deref() != Some(public.as_str()) {
            std::fs::write(&pub_path, public)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&pub_path, std::fs::Permissions::from_mode(0o644))?;
        }
        Ok(Signer_ { key })
    }

    pub fn public(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    pub fn sign(&self, heads: &[Head]) -> [u8; 64] {
        self.key.sign(&checkpoint_message(heads)).to_bytes()
    }
}

/// Reads a public key as `checkpoint.pub` holds it (64 hex digits).
pub fn parse_public(text: &str) -> Option<VerifyingKey> {
    VerifyingKey::from_bytes(&unhex::<32>(text.trim())?).ok()
}

pub fn verify_signature(public: &VerifyingKey, heads: &[Head], sig: &[u8; 64]) -> bool {
    public
        .verify(
            &checkpoint_message(heads),
            &ed25519_dalek::Signature::from_bytes(sig),
        )
        .is_ok()
}

/// The checkpoint record (its body; sealing adds the sequence and chain).
pub fn checkpoint_line(
    signer: &Signer_,
    heads: &[Head],
    id: &str,
    now_ms: u64,
    host: &str,
) -> Vec<u8> {
    let ts = crate::record::rfc3339_micros(now_ms.saturating_mul(1_000_000));
    let mut hs: Vec<&Head> = heads.iter().collect();
    hs.sort_by_key(|x| x.stream.name());
    let streams: Vec<serde_json::Value> = hs
        .iter()
        .map(|h| serde_json::json!({"stream": h.stream.name(), "sequence": h.seq, "hash": hex(&h.hash)}))
        .collect();
    let public = signer.public();
    serde_json::to_vec(&serde_json::json!({
        "@timestamp": ts,
        "event": {"id": id, "kind": "event", "category": ["configuration"], "type": ["info"], "dataset": "sparbar.checkpoint", "created": ts},
        "host": {"name": host},
        "sparbar": {"checkpoint": {
            "streams": streams,
            "key_id": key_id(&public),
            "public_key": hex(public.as_bytes()),
            "signature": hex(&signer.sign(heads)),
        }},
    }))
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn sealed(line: &str) -> Value {
        let s = seal(line.as_bytes(), Stream::Access, 7, &[0xab; 32]);
        serde_json::from_slice(&s)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&s)))
    }

    #[test]
    fn seal_splices_into_existing_objects() {
        let v = sealed(
            r#"{"@timestamp":"t","event":{"id":"x"},"sparbar":{"hop":1},"abook":{"event":{"a":1}}}"#,
        );
        assert_eq!(v["event"]["sequence"], 7);
        assert_eq!(v["event"]["id"], "x");
        assert_eq!(v["sparbar"]["chain"]["stream"], "access");
        assert_eq!(v["sparbar"]["chain"]["prev"], hex(&[0xab; 32]));
        assert_eq!(v["sparbar"]["hop"], 1);
        assert!(v["abook"]["event"].get("sequence").is_none());
    }

    #[test]
    fn seal_adds_missing_objects_and_ignores_lookalikes_in_strings() {
        let v = sealed(r#"{"a":"\"event\":{","b":{"sparbar":{}}}"#);
        assert_eq!(v["event"]["sequence"], 7);
        assert_eq!(v["sparbar"]["chain"]["stream"], "access");
        assert_eq!(v["a"], "\"event\":{");
        assert!(v["b"]["sparbar"].get("chain").is_none());
        let v = sealed(r#"{"event":{},"sparbar":{}}"#);
        assert_eq!(v["event"]["sequence"], 7);
        assert!(v["sparbar"]["chain"].is_object());
        let v = sealed("{}");
        assert_eq!(v["event"]["sequence"], 7);
        let v = sealed("not json");
        assert_eq!(v["sparbar"]["raw"], "not json");
        assert_eq!(v["event"]["sequence"], 7);
    }

    #[test]
    fn checkpoint_signs_and_verifies() {
        let d = tempfile::tempdir().unwrap();
        let s = Signer_::load_or_create(d.path()).unwrap();
        let again = Signer_::load_or_create(d.path()).unwrap();
        assert_eq!(s.public(), again.public());
        let heads = vec![
            Head {
                stream: Stream::Security,
                seq: 3,
                hash: [1; 32],
            },
            Head {
                stream: Stream::Access,
                seq: 10,
                hash: [2; 32],
            },
        ];
        let sig = s.sign(&heads);
        let public =
            parse_public(&std::fs::read_to_string(d.path().join(PUB_FILE)).unwrap()).unwrap();
        assert!(verify_signature(&public, &heads, &sig));
        let mut other = heads.clone();
        other[1].seq = 9;
        assert!(!verify_signature(&public, &other, &sig));
        let line = checkpoint_line(&s, &heads, "id", 0, "h");
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["sparbar"]["checkpoint"]["streams"][0]["stream"], "access");
        assert_eq!(v["sparbar"]["checkpoint"]["signature"], hex(&sig));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(d.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
    }
}
