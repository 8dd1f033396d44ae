//! Installs what a fresh machine lacks, idempotently, one clear message per step.

use std::{path::Path, process::Command};

use anyhow::{bail, Result};

use crate::{run_cmd, step};

/// Debian packages: the LLVM that bpf-linker links against, the servers and clients the
/// end-to-end tests and the demo drive, and the tools the benchmarks use.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "nginx",
    // The second real edge of the differential suite (tests/tests/differential.rs): httpd with
    // mod_ssl, mod_proxy and mod_proxy_http, started by the test with its own config.
    "apache2",
    "wrk",
    "curl",
    // A real browser for the HTTP/2 tests (headless), and an HTTP/2 load generator for
    // `cargo xtask bench capture`.
    "chromium",
    "nghttp2-client",
    "openssl",
    "bpftool",
    "procps",
    "iproute2",
    "rsyslog",
    "rsyslog-relp",
    "rsyslog-gnutls",
    // `cargo xtask package` (dpkg-shlibdeps) and its proof in a booted Debian 12 container.
    "dpkg-dev",
    "debootstrap",
    "systemd-container",
];

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn have(cmd: &str, arg: &str) -> bool {
    Command::new(cmd)
        .arg(arg)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

pub fn run() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        step("apt packages: all present");
    } else {
        step(&format!("apt packages: installing {}", missing.join(" ")));
        run_cmd(Command::new("apt-get").args(["update", "-q"]))?;
        run_cmd(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }

    // rust-src: the eBPF build uses -Z build-std=core; clippy/rustfmt: `cargo xtask lint`.
    for (toolchain, component) in [
        ("nightly", "rust-src"),
        ("nightly", "clippy"),
        ("stable", "clippy"),
        ("stable", "rustfmt"),
    ] {
        let present = Command::new("rustup")
            .args(["component", "list", "--installed", "--toolchain", toolchain])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .any(|l| l.starts_with(component))
            })
            .unwrap_or(false);
        if present {
            step(&format!(
                "{component} for the {toolchain} toolchain: present"
            ));
        } else {
            step(&format!(
                "{component} for the {toolchain} toolchain: installing"
            ));
            run_cmd(Command::new("rustup").args([
                "component",
                "add",
                component,
                "--toolchain",
                toolchain,
            ]))?;
        }
    }

    if have("bpf-linker", "--version") {
        step("bpf-linker: present");
    } else {
        step("bpf-linker: installing 0.13.0 against Debian's LLVM 22 (about a minute)");
        run_cmd(
            Command::new("cargo")
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    "0.13.0",
                    "--locked",
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
        )?;
    }

    if Path::new("/sys/kernel/tracing/events").exists() {
        step("tracefs: mounted");
    } else {
        step("tracefs: mounting at /sys/kernel/tracing (tracepoints need it)");
        run_cmd(Command::new("mount").args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"]))?;
    }

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!("the end-to-end tests and the demo load eBPF programs: run as root");
    }
    Ok(())
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
