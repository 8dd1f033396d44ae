//! Developer and CI tasks: set up a fresh machine, build, test, run the demo, benchmark.
//!
//! Every task starts with `bootstrap`, which installs only what is missing and says what it
//! does, so `cargo xtask demo` and `cargo xtask test` work on a fresh machine.

mod bench;
mod bootstrap;
mod demo;
mod fuzz;
mod package;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Spårbar's developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: apt packages, rust-src for the nightly, bpf-linker, tracefs.
    Bootstrap,
    /// Build the agent (release) with its embedded eBPF object.
    Build,
    /// Unit tests, then the privileged end-to-end tests against real servers.
    Test {
        /// Only the unit tests (no root, no servers).
        #[arg(long)]
        unit: bool,
        /// Filter passed to the end-to-end test binary.
        filter: Option<String>,
    },
    /// The demo platform behind nginx/TLS, the agent attached, real traffic with an abuser.
    Demo {
        /// Seconds of traffic.
        #[arg(long, default_value_t = 20)]
        duration: u64,
    },
    /// rustfmt and clippy (-D warnings) on the host crates and, with the nightly, the eBPF crate.
    Lint,
    /// Benchmarks that print ratios measured side by side.
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
    /// The libFuzzer targets of fuzz/ (cargo-fuzz on the nightly), seeded from the crafted corpus.
    Fuzz {
        /// Executions per target.
        #[arg(long, default_value_t = 10_000_000)]
        runs: u64,
        /// Stop a target after this many seconds even if it has not done `runs`.
        #[arg(long)]
        max_total_time: Option<u64>,
        /// Targets to run (default: all of them).
        targets: Vec<String>,
    },
    /// The Debian package and the tarball (binary, systemd unit, config, man pages, completions).
    Package {
        /// Debian revision: the package is <version>-<revision>.
        #[arg(long, default_value_t = 1)]
        revision: u32,
        /// Output directory.
        #[arg(long, default_value = "target/package")]
        out: PathBuf,
        /// Then prove it in a booted Debian 12 container (tests/tests/package.rs).
        #[arg(long)]
        test: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Bootstrap => bootstrap::run(),
        Cmd::Build => {
            bootstrap::run()?;
            build_release().map(|_| ())
        }
        Cmd::Test { unit, filter } => {
            bootstrap::run()?;
            lint()?;
            test(unit, filter)
        }
        Cmd::Lint => {
            bootstrap::run()?;
            lint()
        }
        Cmd::Demo { duration } => {
            bootstrap::run()?;
            let bin = build_release()?;
            demo::run(&bin, duration)
        }
        Cmd::Fuzz {
            runs,
            max_total_time,
            targets,
        } => {
            bootstrap::run()?;
            fuzz::run(&targets, runs, max_total_time)
        }
        Cmd::Bench { which } => {
            bootstrap::run()?;
            let bin = build_release()?;
            bench::run(&bin, which)
        }
        Cmd::Package {
            revision,
            out,
            test,
        } => {
            bootstrap::run()?;
            let bin = build_release()?;
            step("packaging: .deb and tarball");
            let opts = package::Options {
                bin: bin.clone(),
                out_dir: root().join(out),
                revision,
            };
            let a = package::build(&root(), &opts)?;
            step(&format!(
                "sparbar {}: {}\n    {}",
                a.version,
                a.deb.display(),
                a.tarball.display()
            ));
            if test {
                step("package proof: install, run, reload, stop, upgrade, purge in systemd-nspawn");
                let mut c = cargo();
                c.args([
                    "test",
                    "--release",
                    "-p",
                    "sparbar-tests",
                    "--test",
                    "package",
                ])
                .args(["--", "--nocapture"])
                .env("SPARBAR_BIN", &bin);
                run_cmd(&mut c)?;
            }
            Ok(())
        }
    }
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

pub fn step(msg: &str) {
    eprintln!("==> {msg}");
}

pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// Builds `sparbar` in release mode and returns its path.
pub fn build_release() -> Result<PathBuf> {
    step("building sparbar (release, with the eBPF programs)");
    run_cmd(cargo().args([
        "build",
        "--release",
        "--package",
        "tracer-user",
        "--bin",
        "sparbar",
    ]))?;
    Ok(root().join("target/release/sparbar"))
}

/// `-p` arguments for the crates built for the host (never the eBPF crate); the end-to-end
/// crate only when asked, since its tests need root and servers.
fn host_packages(with_e2e: bool) -> Vec<&'static str> {
    let mut v = vec!["-p", "tracer-common", "-p", "tracer-user", "-p", "xtask"];
    if with_e2e {
        v.extend(["-p", "sparbar-tests"]);
    }
    v
}

fn lint() -> Result<()> {
    step("rustfmt --check");
    run_cmd(cargo().args(["fmt", "--all", "--check"]))?;
    step("module graph: no import cycles, pure logic imports no aya");
    let graph = root().join("xtask/module_graph.py");
    run_cmd(
        Command::new("python3")
            .arg(&graph)
            .args([
                "tracer-user/src",
                "crate",
                // The path's pure steps and what they use: no kernel, no aya.
                "pipeline",
                "http",
                "attribute",
                "record",
                "detect",
                "ship",
                "exchange",
                "config",
                "verify",
                "stats",
                "statefile",
            ])
            .current_dir(root()),
    )?;
    run_cmd(
        Command::new("python3")
            .arg(&graph)
            .args(["tracer-ebpf/src", "crate"])
            .current_dir(root()),
    )?;
    step("clippy -D warnings (host crates)");
    run_cmd(
        cargo()
            .args(["clippy", "--release"])
            .args(host_packages(true))
            .args(["--all-targets", "--", "-D", "warnings"]),
    )?;
    step("clippy -D warnings (eBPF crate, nightly, bpfel-unknown-none)");
    let mut c = Command::new("rustup");
    c.current_dir(root().join("tracer-ebpf"))
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ])
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO");
    run_cmd(&mut c)
}

fn test(unit_only: bool, filter: Option<String>) -> Result<()> {
    step("unit, property and replay tests");
    // Not --workspace: that would build the eBPF crate for the host.
    run_cmd(
        cargo()
            .args(["test", "--release"])
            .args(host_packages(false)),
    )?;
    if unit_only {
        return Ok(());
    }
    let bin = build_release()?;
    step("privileged end-to-end tests (real kernel, nginx, Apache httpd, CPython ssl, node, plaintext hop)");
    let mut c = cargo();
    c.args(["test", "--release", "--package", "sparbar-tests", "--"]);
    c.arg("--test-threads=1").arg("--nocapture");
    if let Some(f) = filter {
        c.arg(f);
    }
    c.env("SPARBAR_BIN", &bin);
    run_cmd(&mut c)
}
