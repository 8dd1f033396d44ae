//! `cargo xtask fuzz`: the libFuzzer targets of `fuzz/` (cargo-fuzz, on the nightly), each for a
//! number of executions, seeded from the differential suite's crafted requests.
//!
//! Crashes are left by libFuzzer in `fuzz/artifacts/<target>/`; each one becomes a unit test
//! beside the code it broke. The working corpus (`fuzz/corpus/<target>/`) is kept between runs
//! and is not committed: the seeds are made again from `tests/corpus/crafted.jsonl` every run.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::{root, run_cmd, step};

/// The targets, in the order they run.
pub const TARGETS: [&str; 5] = ["http1", "h2", "decode", "jsonpath", "token_scan"];
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// What one target's run did.
struct Outcome {
    target: String,
    runs: Option<u64>,
    seconds: Option<u64>,
    crashes: Vec<PathBuf>,
}

pub fn run(targets: &[String], runs: u64, max_total_time: Option<u64>) -> Result<()> {
    ensure_cargo_fuzz()?;
    let fuzz = root().join("fuzz");
    let chosen: Vec<String> = if targets.is_empty() {
        TARGETS.iter().map(|t| t.to_string()).collect()
    } else {
        for t in targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!(
                    "no fuzz target {t:?}; the targets are {}",
                    TARGETS.join(", ")
                );
            }
        }
        targets.to_vec()
    };
    step("building the fuzz targets (nightly, libFuzzer, address sanitizer, debug assertions on)");
    run_cmd(
        Command::new("rustup")
            .args(["run", "nightly", "cargo", "fuzz", "build"])
            .current_dir(&fuzz),
    )?;
    let mut outcomes = Vec::new();
    for t in &chosen {
        let corpus = fuzz.join("corpus").join(t);
        fs::create_dir_all(&corpus)?;
        let seeds = seed(t, &corpus)?;
        step(&format!(
            "fuzzing {t}: {runs} executions ({seeds} seeds from tests/corpus, corpus in {})",
            corpus.display()
        ));
        outcomes.push(run_one(&fuzz, t, &corpus, runs, max_total_time)?);
    }
    step("fuzzing: summary");
    let mut failed = false;
    for o in &outcomes {
        let runs = o.runs.map_or("?".into(), |r| r.to_string());
        let secs = o.seconds.map_or("?".into(), |s| s.to_string());
        eprintln!(
            "    {:<10} {runs:>12} executions in {secs:>6} s, {} crash(es)",
            o.target,
            o.crashes.len()
        );
        for c in &o.crashes {
            eprintln!("        {}", c.display());
        }
        failed |= !o.crashes.is_empty();
    }
    if failed {
        bail!("fuzzing found crashes: reproduce with `cargo +nightly fuzz run <target> <file>` in fuzz/, then make each a unit test");
    }
    Ok(())
}

fn ensure_cargo_fuzz() -> Result<()> {
    let present = Command::new("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        step("cargo-fuzz: present");
        return Ok(());
    }
    step(&format!("cargo-fuzz: installing {CARGO_FUZZ_VERSION}"));
    run_cmd(Command::new("cargo").args([
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
    ]))
}

fn run_one(
    fuzz: &Path,
    target: &str,
    corpus: &Path,
    runs: u64,
    max_total_time: Option<u64>,
) -> Result<Outcome> {
    let artifacts = fuzz.join("artifacts").join(target);
    fs::create_dir_all(&artifacts)?;
    let before: Vec<PathBuf> = listing(&artifacts)?;
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "fuzz", "run", target])
        .arg(corpus)
        .arg("--")
        .arg(format!("-runs={runs}"))
        .arg("-max_len=16384")
        .arg("-print_final_stats=1")
        .current_dir(fuzz)
        .stderr(Stdio::piped());
    if let Some(t) = max_total_time {
        cmd.arg(format!("-max_total_time={t}"));
    }
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let mut runs_done = None;
    let mut seconds = None;
    let stderr = child.stderr.take().context("stderr")?;
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        // "Done 10000000 runs in 321 second(s)"
        if let Some(rest) = line.strip_prefix("Done ") {
            let mut w = rest.split_whitespace();
            runs_done = w.next().and_then(|n| n.parse().ok());
            seconds = w.nth(2).and_then(|n| n.parse().ok());
        }
        // stat::number_of_executed_units: 10000000
        if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
            runs_done = runs_done.or(n.trim().parse().ok());
        }
        if (line.starts_with('#') && !line.contains("pulse")) || line.contains("NEW_FUNC") {
            continue;
        }
        eprintln!("    {line}");
    }
    let status = child.wait()?;
    let crashes: Vec<PathBuf> = listing(&artifacts)?
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    if !status.success() && crashes.is_empty() {
        bail!("fuzz target {target} failed ({status}) without leaving a crash file");
    }
    Ok(Outcome {
        target: target.to_string(),
        runs: runs_done,
        seconds,
        crashes,
    })
}

fn listing(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir)? {
        v.push(e?.path());
    }
    Ok(v)
}

/// The crafted requests of the differential suite, placeholders filled in.
fn crafted() -> Result<Vec<Vec<u8>>> {
    let path = root().join("tests/corpus/crafted.jsonl");
    let Ok(text) = fs::read_to_string(&path) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: {line}", path.display()))?;
        let Some(raw) = v["raw"].as_str() else {
            continue;
        };
        let raw = raw
            .replace("@HOST@", "platform.test")
            .replace("@RID@", "fuzz-1")
            .replace("@SID_A@", "4f1c2a9e0b7d4e21a3c5")
            .replace("@SID_B@", "9d8e7f6a5b4c3d2e1f00")
            .replace("@JWT_A@", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMDEzIn0.c2ln")
            .replace("@JWT_B@", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMzQ1In0.c2ln")
            .replace("@SCHOOL_A@", "sch-01")
            .replace("@SCHOOL_B@", "sch-02");
        // Any placeholder left: a neutral value.
        out.push(raw.into_bytes());
    }
    Ok(out)
}

/// Writes the seeds of `target` into its corpus directory; returns how many.
fn seed(target: &str, corpus: &Path) -> Result<usize> {
    let seeds: Vec<Vec<u8>> = match target {
        "http1" => crafted()?
            .iter()
            .map(|req| {
                http1_input(
                    req,
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
                )
            })
            .collect(),
        "h2" => vec![h2_input()],
        "jsonpath" => [
            ("$.id", r#"{"id":7}"#),
            ("$.data[*].id", r#"{"data":[{"id":1},{"id":"2"}]}"#),
            ("$.user.school", r#"{"user":{"school":"sch-01"}}"#),
            ("$[*].contacts[*].email", r#"[{"contacts":[{"email":"x"}]}]"#),
        ]
        .iter()
        .map(|(p, d)| [p.as_bytes(), b"\0", d.as_bytes()].concat())
        .collect(),
        // Two bytes of cut position, then the request (and a cross-tenant one after it).
        "token_scan" => crafted()?
            .iter()
            .enumerate()
            .map(|(i, req)| {
                let cut = (i as u16).wrapping_mul(7);
                [
                    &cut.to_le_bytes()[..],
                    req,
                    b"GET /api/addressbook/persons?schoolId=sch-02 HTTP/1.1\r\nCookie: skolsid=4f1c2a9e0b7d4e21a3c5\r\n\r\n",
                ]
                .concat()
            })
            .collect(),
        _ => Vec::new(),
    };
    for (i, s) in seeds.iter().enumerate() {
        fs::write(corpus.join(format!("seed-{i:04}")), s)?;
    }
    Ok(seeds.len())
}

/// The `h2` target's input: after the preface (which the target sends), the client's SETTINGS
/// and a GET with a cookie crumb, the server's SETTINGS, a 200 and a padded DATA frame.
fn h2_input() -> Vec<u8> {
    let frame = |typ: u8, flags: u8, sid: u32, payload: &[u8]| {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([typ, flags]);
        f.extend(sid.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    // :method GET, :scheme https, :path /, :authority "s", cookie "sid=ab" (literals with
    // indexed names, never Huffman).
    let block = [&[0x82, 0x87, 0x84, 0x41, 1, b's', 0x60, 6][..], b"sid=ab"].concat();
    let client = [frame(4, 0, 0, &[]), frame(1, 0x5, 1, &block)].concat();
    let server = [
        frame(4, 0, 0, &[]),
        frame(1, 0x4, 1, &[0x88]),
        frame(0, 0x9, 1, &[1, b'{', b'}', 0]),
    ]
    .concat();
    let mut out = vec![0u8];
    for (dir, bytes) in [(0u8, &client), (1u8, &server)] {
        out.push(((bytes.len() >> 8) as u8) << 3 | dir);
        out.push((bytes.len() & 0xff) as u8);
        out.extend_from_slice(bytes);
    }
    out
}

/// The `http1` target's input for one request and its answer: a server connection seen from its
/// start, the request in pieces of at most 1,000 bytes, then the answer.
fn http1_input(req: &[u8], resp: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8];
    for (dir, bytes) in [(0u8, req), (1u8, resp)] {
        for piece in bytes.chunks(1000) {
            let len = piece.len();
            out.push(((len >> 8) as u8) << 3 | dir);
            out.push((len & 0xff) as u8);
            out.extend_from_slice(piece);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::http1_input;

    #[test]
    fn http1_input_encodes_lengths_over_255() {
        let req = vec![b'a'; 700];
        let v = http1_input(&req, b"HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(v[0], 0);
        // 700 = 0x2bc: high bits 2 in bits 3-7 of the control byte, direction 0.
        assert_eq!(v[1], 2 << 3);
        assert_eq!(v[2], 0xbc);
        assert_eq!(v[3 + 700], 1);
        assert_eq!(v[3 + 700 + 1], 27);
        assert_eq!(v.len(), 1 + 2 + 700 + 2 + 27);
    }
}
