//! Builds the eBPF programs (tracer-ebpf) with the nightly toolchain and embeds the object.
//!
//! The same build as `aya_build::build_ebpf` (aya-build 0.2.0): `rustup run nightly cargo build
//! --package tracer-ebpf --bins --release --target bpfel-unknown-none -Z build-std=core` into
//! `$OUT_DIR/aya-build/target/tracer-ebpf`, with the rustflags aya-build sets, and the binary
//! copied to `$OUT_DIR/tracer-ebpf`. What differs is the output: aya-build forwards every line
//! of the nested build (each `Compiling ...`) as a cargo warning; here only the compiler's
//! warnings and errors and cargo's own `warning:`/`error:` lines are forwarded, and everything
//! the nested cargo printed is shown when it fails.
use std::{
    env,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{anyhow, bail, Context as _};

const PACKAGE: &str = "tracer-ebpf";
/// `AYA_BUILD_SKIP=1` skips the nested build, as with aya-build (the object from an earlier build
/// in `$OUT_DIR` is embedded).
const SKIP: &str = "AYA_BUILD_SKIP";

fn main() -> anyhow::Result<()> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?;
    // The kernel programs and what they are built from: their crate, the ABI crate they share
    // with the agent (not a build-dependency of this crate, so cargo would not notice it), and
    // the workspace manifest and lock file (the eBPF profile, dependency versions).
    for path in [
        workspace.join(PACKAGE),
        workspace.join("tracer-common"),
        workspace.join("Cargo.toml"),
        workspace.join("Cargo.lock"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    println!("cargo:rerun-if-env-changed={SKIP}");
    if env::var(SKIP).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        println!("cargo:warning={SKIP} is set; the eBPF programs are not rebuilt");
        return Ok(());
    }

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let target = match env::var("CARGO_CFG_TARGET_ENDIAN")?.as_str() {
        "little" => "bpfel-unknown-none",
        "big" => "bpfeb-unknown-none",
        other => bail!("unsupported endianness {other}"),
    };
    let arch = env::var("CARGO_CFG_TARGET_ARCH")?;
    let arch = if arch.starts_with("riscv64") {
        "riscv64"
    } else {
        arch.as_str()
    };

    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--package", PACKAGE])
        .args(["--bins", "--message-format=json", "--release"])
        .args(["--target", target, "-Z", "build-std=core", "--target-dir"])
        .arg(out_dir.join("aya-build").join("target").join(PACKAGE))
        .current_dir(workspace)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
        )
        // Else the nested cargo would use this (stable) build's compiler.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {cmd:?} (is rustup installed?)"))?;

    // cargo's own lines ("Compiling ...", "warning: ...", "error: ..."), read beside stdout.
    let stderr = BufReader::new(child.stderr.take().context("stderr")?);
    let stderr = std::thread::spawn(move || stderr.lines().map_while(Result::ok).collect());

    // stdout: one JSON message per line (compiler diagnostics, artifacts).
    let mut other = Vec::new();
    let mut binaries = Vec::new();
    for line in BufReader::new(child.stdout.take().context("stdout")?).lines() {
        let line = line.context("reading the eBPF build's output")?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            other.push(line);
            continue;
        };
        match msg["reason"].as_str() {
            Some("compiler-message") => {
                let level = msg["message"]["level"].as_str().unwrap_or("");
                if level.starts_with("warning") || level.starts_with("error") {
                    let rendered = msg["message"]["rendered"].as_str().unwrap_or("");
                    for l in rendered.trim_end().lines() {
                        println!("cargo:warning={l}");
                    }
                }
            }
            Some("compiler-artifact") => {
                if let (Some(name), Some(exe)) =
                    (msg["target"]["name"].as_str(), msg["executable"].as_str())
                {
                    binaries.push((name.to_string(), PathBuf::from(exe)));
                }
            }
            _ => {}
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for {cmd:?}"))?;
    let stderr: Vec<String> = stderr
        .join()
        .map_err(|_| anyhow!("reading the eBPF build's stderr"))?;
    if !status.success() {
        for l in stderr.iter().chain(&other) {
            eprintln!("{l}");
        }
        bail!("building the eBPF programs failed ({status}): {cmd:?}");
    }
    for l in &stderr {
        if l.starts_with("warning") || l.starts_with("error") {
            println!("cargo:warning={l}");
        }
    }

    for (name, exe) in binaries {
        let dst = out_dir.join(&name);
        std::fs::copy(&exe, &dst)
            .with_context(|| format!("copying {} to {}", exe.display(), dst.display()))?;
    }
    Ok(())
}
