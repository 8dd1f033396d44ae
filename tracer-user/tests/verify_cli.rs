//! `sparbar verify` end to end: the built binary on a sealed, checkpointed trail, clean and
//! tampered, checking exit codes and that the report names the right file and line.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use sparbar::ship::{
    chain::{self, Head, Signer_},
    Stream,
};

struct Chain {
    stream: Stream,
    lines: Vec<Vec<u8>>,
    prev: [u8; 32],
}

impl Chain {
    fn new(stream: Stream) -> Chain {
        Chain {
            stream,
            lines: Vec::new(),
            prev: chain::ZERO_HASH,
        }
    }
    fn push(&mut self, body: &[u8]) {
        let line = chain::seal(body, self.stream, self.lines.len() as u64 + 1, &self.prev);
        self.prev = chain::hash(&line);
        self.lines.push(line);
    }
    fn head(&self) -> Head {
        Head {
            stream: self.stream,
            seq: self.lines.len() as u64,
            hash: self.prev,
        }
    }
}

fn write(path: &Path, lines: &[Vec<u8>]) {
    let mut out = Vec::new();
    for l in lines {
        out.extend_from_slice(l);
        out.push(b'\n');
    }
    std::fs::write(path, out).unwrap();
}

/// A trail directory (access 1..8 signed, 9..10 not yet) and the checkpoint.pub kept apart.
fn trail(root: &Path) -> (PathBuf, PathBuf, Chain, Chain) {
    let keys = root.join("keys");
    let dir = root.join("trail");
    std::fs::create_dir_all(&keys).unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    let signer = Signer_::load_or_create(&keys).unwrap();
    let mut a = Chain::new(Stream::Access);
    for i in 1..=8 {
        a.push(format!(r#"{{"event":{{"id":"a{i}","dataset":"sparbar.access"}},"user":{{"id":"user-{i}"}}}}"#).as_bytes());
    }
    let mut s = Chain::new(Stream::Security);
    s.push(br#"{"event":{"id":"s1","dataset":"sparbar.agent","action":"started"}}"#);
    s.push(&chain::checkpoint_line(
        &signer,
        &[a.head(), s.head()],
        "cp",
        0,
        "host",
    ));
    for i in 9..=10 {
        a.push(format!(r#"{{"event":{{"id":"a{i}","dataset":"sparbar.access"}}}}"#).as_bytes());
    }
    write(&dir.join("access.jsonl"), &a.lines);
    write(&dir.join("security.jsonl"), &s.lines);
    (dir, keys.join(chain::PUB_FILE), a, s)
}

fn sparbar(args: &[&str]) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(env!("CARGO_BIN_EXE_sparbar"))
        .args(args)
        .output()
        .expect("running sparbar");
    (
        status.code().expect("an exit code"),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

#[test]
fn verify_passes_a_clean_trail_and_names_the_tampered_line() {
    let root = tempfile::tempdir().unwrap();
    let (dir, key, mut a, _) = trail(root.path());
    let (d, k) = (dir.to_str().unwrap(), key.to_str().unwrap());

    let (code, out, err) = sparbar(&["verify", "--key", k, d]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("access: records 1..10: 10 present"), "{out}");
    assert!(
        out.contains("2 records after the last checkpoint are chained but not yet signed"),
        "{out}"
    );
    assert!(out.contains("\nOK: "), "{out}");

    // Without the key kept apart, it still checks, and says what that is worth.
    let (code, out, _) = sparbar(&["verify", d]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("warning: no --key given"), "{out}");

    // One changed byte in record 3.
    let i = a.lines[2].windows(6).position(|w| w == b"user-3").unwrap();
    a.lines[2][i + 5] = b'7';
    write(&dir.join("access.jsonl"), &a.lines);
    let access = dir.join("access.jsonl").display().to_string();
    let (code, out, err) = sparbar(&["verify", "--key", k, d]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains(&format!("problem: {access}:3: record 3 of access changed")),
        "{out}"
    );
    assert!(out.contains("FAILED: 1 problem(s)"), "{out}");

    let (code, out, _) = sparbar(&["verify", "--json", "--key", k, &access]);
    assert_eq!(code, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("a JSON document");
    assert_eq!(v["ok"], false);
    // Only the access file given: the checkpoint is not there, so only the chain speaks.
    assert_eq!(v["problems"][0]["kind"], "changed");
    assert_eq!(v["problems"][0]["file"], access.as_str());
    assert_eq!(v["problems"][0]["line"], 3);
    assert_eq!(v["streams"]["access"]["records"], 10);

    // A deleted line.
    a.lines.remove(5);
    write(&dir.join("access.jsonl"), &a.lines);
    let (code, out, _) = sparbar(&["verify", "--key", k, d]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "problem: {access}:6: record 6 of access missing (deleted?)"
        )),
        "{out}"
    );
}

#[test]
fn verify_refuses_what_it_cannot_check() {
    let root = tempfile::tempdir().unwrap();
    let (dir, _, _, _) = trail(root.path());
    let missing = root.path().join("nope");
    let (code, _, err) = sparbar(&["verify", missing.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains(missing.to_str().unwrap()), "{err}");
    let bad_key = root.path().join("bad.pub");
    std::fs::write(&bad_key, "not a key\n").unwrap();
    let (code, _, err) = sparbar(&[
        "verify",
        "--key",
        bad_key.to_str().unwrap(),
        dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("bad.pub"), "{err}");
    let (code, _, _) = sparbar(&["verify"]);
    assert_eq!(code, 2);
}
