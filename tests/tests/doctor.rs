//! `sparbar doctor` as root on this machine: the verdict it must give on every line, each
//! compared with the fact read here independently (`uname -r`, /proc/self/mountinfo,
//! /proc/config.gz, /proc/self/status, securityfs, /proc/PID of a real nginx), the nginx
//! processes of a real platform with the libssl they map, a target that matches nothing, a
//! broken configuration (exit 1), and tracefs missing (the agent will mount it). The doctor must
//! leave the host's mounts as they were.

use std::{
    collections::BTreeSet,
    path::Path,
    process::{Command, Output},
};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;
use sparbar_tests::*;

/// Runs `sparbar doctor ARGS --json` and returns its exit code and report.
fn doctor_json(args: &[&str]) -> Result<(Option<i32>, Value)> {
    let out = Command::new(agent_bin()?)
        .arg("doctor")
        .args(args)
        .arg("--json")
        .output()?;
    parse(out)
}

fn parse(out: Output) -> Result<(Option<i32>, Value)> {
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&text).with_context(|| {
        format!(
            "doctor --json printed no JSON:\n{text}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok((out.status.code(), v))
}

fn check<'a>(report: &'a Value, name: &str) -> Result<&'a Value> {
    report["checks"]
        .as_array()
        .context("no checks array")?
        .iter()
        .find(|c| c["check"] == name)
        .with_context(|| format!("no check {name:?} in {report:#}"))
}

/// The check `name` has verdict `verdict` and its detail contains every one of `needles`.
fn expect(report: &Value, name: &str, verdict: &str, needles: &[&str]) -> Result<()> {
    let c = check(report, name)?;
    ensure!(
        c["verdict"] == verdict,
        "{name}: verdict {} instead of {verdict}: {c:#}",
        c["verdict"]
    );
    let detail = c["detail"].as_str().unwrap_or_default();
    for n in needles {
        ensure!(
            detail.contains(n),
            "{name}: {n:?} not in the detail {detail:?}"
        );
    }
    if verdict == "ok" {
        ensure!(
            c["consequence"].is_null(),
            "{name}: ok with a consequence: {c:#}"
        );
    } else {
        ensure!(
            c["consequence"].as_str().is_some_and(|s| !s.is_empty()),
            "{name}: {verdict} without a consequence: {c:#}"
        );
    }
    Ok(())
}

fn sh(cmd: &str) -> Result<String> {
    Ok(output(Command::new("sh").args(["-c", cmd]))?
        .trim()
        .to_string())
}

/// Mount points of `fstype` in our own mountinfo, read here without the agent's code.
fn mounts(fstype: &str) -> Result<Vec<String>> {
    Ok(std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split(' ').next()? == fstype)
                .then(|| pre.split(' ').nth(4).map(str::to_string))?
        })
        .collect())
}

fn ppid(pid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s[s.rfind(')')? + 2..].split(' ').nth(1)?.parse().ok()
}

fn children(pid: u32) -> Result<BTreeSet<u32>> {
    Ok(std::fs::read_dir("/proc")?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| ppid(*p) == Some(pid))
        .collect())
}

/// The libssl files mapped in a process, from its /proc/PID/maps.
fn libssl_of(pid: u32) -> Result<BTreeSet<String>> {
    Ok(std::fs::read_to_string(format!("/proc/{pid}/maps"))?
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| {
            p.rsplit('/')
                .next()
                .is_some_and(|b| b.starts_with("libssl.so"))
        })
        .map(str::to_string)
        .collect())
}

/// The checks about the host, which do not depend on the configuration.
fn expect_host(report: &Value) -> Result<()> {
    let release = sh("uname -r")?;
    expect(report, "kernel", "ok", &[&release])?;
    ensure!(
        check(report, "kernel")?["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with(&format!("{release} "))),
        "kernel detail does not start with {release}"
    );

    let cap_eff = std::fs::read_to_string("/proc/self/status")?
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:").map(|v| v.trim().to_string()))
        .context("no CapEff")?;
    expect(
        report,
        "privileges",
        "ok",
        &[
            "uid 0",
            &format!("CapEff {cap_eff}"),
            "CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_NET_ADMIN",
        ],
    )?;

    // securityfs is not mounted here: read the mode in a private mount namespace of our own.
    let lockdown = sh("unshare -m sh -c 'grep -q \" - securityfs \" /proc/self/mountinfo || mount -t securityfs none /sys/kernel/security; cat /sys/kernel/security/lockdown'")?;
    let mode = lockdown
        .split_whitespace()
        .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
        .with_context(|| format!("no mode in {lockdown:?}"))?;
    ensure!(
        mode == "integrity",
        "PLATFORM.md says lockdown integrity; securityfs says {lockdown:?}"
    );
    expect(report, "lockdown", "ok", &["integrity ("])?;

    let btf = std::fs::metadata("/sys/kernel/btf/vmlinux")?.len();
    expect(
        report,
        "btf",
        "ok",
        &[&format!("/sys/kernel/btf/vmlinux: {btf} bytes")],
    )?;
    expect(report, "bpf", "ok", &["maps created"])?;

    let tracefs = mounts("tracefs")?;
    if tracefs.iter().any(|m| m == "/sys/kernel/tracing") {
        expect(report, "tracefs", "ok", &["mounted at /sys/kernel/tracing"])?;
        expect(
            report,
            "tracepoints",
            "ok",
            &["27 of 27 present", "attached to syscalls:sys_enter_read"],
        )?;
    } else {
        expect(
            report,
            "tracefs",
            "ok",
            &["not mounted; the agent mounts it at /sys/kernel/tracing"],
        )?;
        expect(
            report,
            "tracepoints",
            "ok",
            &["27 of 27 present", "private mount"],
        )?;
    }
    expect(
        report,
        "uprobes",
        "ok",
        &["uprobe PMU type", "attached to SSL_read in"],
    )?;

    let cgroup2 = mounts("cgroup2")?;
    ensure!(
        cgroup2.first().map(String::as_str) == Some("/sys/fs/cgroup/unified"),
        "PLATFORM.md says cgroup v2 is at /sys/fs/cgroup/unified; mountinfo says {cgroup2:?}"
    );
    ensure!(
        !mounts("cgroup")?.is_empty(),
        "no cgroup v1 mounts: not hybrid"
    );
    expect(
        report,
        "cgroup",
        "ok",
        &[
            "cgroup v2 root at /sys/fs/cgroup/unified (hybrid",
            "attached to its egress",
        ],
    )?;

    let destroy = sh("zcat /proc/config.gz | grep -E '^CONFIG_INET_DIAG_DESTROY=|^# CONFIG_INET_DIAG_DESTROY is not set'")?;
    ensure!(
        destroy == "CONFIG_INET_DIAG_DESTROY=y",
        "/proc/config.gz: {destroy:?}"
    );
    expect(
        report,
        "sock_destroy",
        "ok",
        &[
            "CONFIG_INET_DIAG_DESTROY=y (/proc/config.gz)",
            "its peer saw ECONNRESET",
        ],
    )
}

#[test]
fn doctor_on_this_host_with_a_real_nginx() -> Result<()> {
    require_root()?;
    let dir = scratch("doctor");
    let (tls_port, app_port) = (free_port(), free_port());
    let platform = Platform::up(&dir.join("platform"), tls_port, app_port, false)?;
    let master = platform.pid("nginx_master_pid");
    let app = platform.pid("app_pid");
    ensure!(
        master != 0 && app != 0,
        "platform.py printed {}",
        platform.info
    );
    let workers = children(master)?;
    ensure!(!workers.is_empty(), "nginx master {master} has no workers");

    let cfg = dir.join("sparbar.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[agent]
state_dir = "{dir}/state"

[[targets]]
exe = "/usr/sbin/nginx"
name = "nginx"

[[targets]]
pid = {app}
tls = false
plaintext_ports = [{app_port}]
name = "app"

[[targets]]
comm = "sparbar-ghost"
name = "ghost"

[[routes]]
route = "GET /api/test/bytes/{{n}}"
name = "test.bytes"

[output]
file = "{dir}/access.jsonl"
"#,
            dir = dir.display()
        ),
    )?;
    let cfg_s = cfg.display().to_string();
    let securityfs_before = mounts("securityfs")?;
    let (code, report) = doctor_json(&["--config", &cfg_s])?;
    ensure!(
        mounts("securityfs")? == securityfs_before,
        "the doctor changed the host's securityfs mounts"
    );
    expect_host(&report)?;
    expect(
        &report,
        "config",
        "ok",
        &[&format!("{cfg_s}: valid; 3 target(s); enforcement on")],
    )?;

    // nginx: the master and every worker, each with the libssl it maps.
    expect(
        &report,
        "target nginx",
        "ok",
        &["exe /usr/sbin/nginx: matches pid ", "libssl /"],
    )?;
    let procs = check(&report, "target nginx")?["processes"]
        .as_array()
        .context("no processes")?;
    let listed: BTreeSet<u32> = procs
        .iter()
        .map(|p| p["pid"].as_u64().unwrap_or(0) as u32)
        .collect();
    let ours: BTreeSet<u32> = workers.iter().copied().chain([master]).collect();
    ensure!(
        ours.is_subset(&listed),
        "doctor lists nginx pids {listed:?}, the platform's are {ours:?}"
    );
    for p in procs {
        let pid = p["pid"].as_u64().unwrap_or(0) as u32;
        // Other tests may run their own nginx: each listed process must be one (if it still runs).
        let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
            continue;
        };
        ensure!(exe == Path::new("/usr/sbin/nginx"), "pid {pid} is {exe:?}");
        let tls: BTreeSet<String> = p["tls"]
            .as_array()
            .context("no tls")?
            .iter()
            .filter(|i| i["kind"] == "libssl")
            .map(|i| i["path"].as_str().unwrap_or_default().to_string())
            .collect();
        let maps = libssl_of(pid)?;
        ensure!(
            tls == maps,
            "pid {pid}: doctor says {tls:?}, its maps {maps:?}"
        );
        ensure!(
            tls.iter().any(|l| l.ends_with("/libssl.so.3")),
            "pid {pid}: no libssl.so.3 in {tls:?}"
        );
    }

    expect(
        &report,
        "target app",
        "ok",
        &[&format!("pid {app}: matches pid {app} ("), "tls = false"],
    )?;
    let app_procs = &check(&report, "target app")?["processes"];
    ensure!(
        app_procs.as_array().map(Vec::len) == Some(1) && app_procs[0]["pid"] == app,
        "target app: {app_procs}"
    );
    expect(
        &report,
        "target ghost",
        "warn",
        &["comm \"sparbar-ghost\": no running process matches"],
    )?;

    ensure!(
        code == Some(0) && report["fail"] == 0 && report["warn"] == 1,
        "exit {code:?}, {} FAIL, {} warn: {report:#}",
        report["fail"],
        report["warn"]
    );

    // The table says the same, one line per check.
    let out = Command::new(agent_bin()?)
        .args(["doctor", "--config", &cfg_s])
        .output()?;
    ensure!(
        out.status.code() == Some(0),
        "table run exited {:?}",
        out.status
    );
    let table = String::from_utf8_lossy(&out.stdout);
    for c in report["checks"].as_array().context("checks")? {
        let (name, verdict) = (
            c["check"].as_str().unwrap_or_default(),
            c["verdict"].as_str().unwrap_or_default(),
        );
        let line = table
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .with_context(|| format!("no line for {name} in:\n{table}"))?;
        ensure!(
            line[name.len()..]
                .trim_start()
                .starts_with(&format!("{verdict} ")),
            "line for {name} does not say {verdict}: {line}"
        );
    }
    ensure!(
        table.contains("-> nothing of it is traced until one appears"),
        "no consequence under the ghost target:\n{table}"
    );
    ensure!(table.contains("0 FAIL"), "no summary:\n{table}");
    Ok(())
}

#[test]
fn doctor_fails_on_a_broken_config() -> Result<()> {
    require_root()?;
    let dir = scratch("doctor-bad");
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, "[[targets]]\ncomm = \"a-name-far-too-long\"\n")?;
    let (code, report) = doctor_json(&["--config", &cfg.display().to_string()])?;
    expect(&report, "config", "FAIL", &["bad.toml", "targets[0].comm"])?;
    ensure!(
        check(&report, "config")?["consequence"] == "the agent refuses to start with this file",
        "{report:#}"
    );
    expect_host(&report)?;
    ensure!(
        code == Some(1) && report["fail"] == 1,
        "exit {code:?} with {} FAIL",
        report["fail"]
    );
    Ok(())
}

#[test]
fn doctor_without_tracefs_says_the_agent_mounts_it() -> Result<()> {
    require_root()?;
    let bin = agent_bin()?;
    // A private mount namespace of our own (unshare makes its mounts private) without tracefs.
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c"])
        .arg(
            "umount /sys/kernel/tracing 2>/dev/null; umount /sys/kernel/debug/tracing 2>/dev/null; \
             if grep -q ' - tracefs ' /proc/self/mountinfo; then echo 'tracefs still mounted' >&2; exit 99; fi; \
             \"$0\" doctor --json; rc=$?; \
             if grep -q ' - tracefs ' /proc/self/mountinfo; then echo 'the doctor mounted tracefs' >&2; exit 98; fi; \
             exit $rc",
        )
        .arg(&bin)
        .output()?;
    if matches!(out.status.code(), Some(98 | 99)) {
        bail!("{}", String::from_utf8_lossy(&out.stderr));
    }
    let (code, report) = parse(out)?;
    expect(
        &report,
        "tracefs",
        "ok",
        &[
            "not mounted; the agent mounts it at /sys/kernel/tracing when it starts",
            "trial mount",
        ],
    )?;
    expect(
        &report,
        "tracepoints",
        "ok",
        &[
            "27 of 27 present",
            "through a private mount of tracefs",
            "attached to syscalls:sys_enter_read",
        ],
    )?;
    // No config here: that line warns (unless this host has a default one), nothing fails.
    if !Path::new("/etc/sparbar/sparbar.toml").exists() {
        expect(&report, "config", "warn", &["no --config given"])?;
        ensure!(code == Some(0), "exit {code:?}: {report:#}");
    }
    Ok(())
}

/// A target that also listens on UDP (an edge offering HTTP/3 over QUIC listens on its TLS
/// port's number over UDP): the doctor warns that what clients send over it is not seen. The
/// same process without the UDP socket is fine.
#[test]
fn doctor_warns_of_a_target_listening_on_udp() -> Result<()> {
    require_root()?;
    let dir = scratch("doctor-quic");
    std::fs::create_dir_all(&dir)?;
    let port = free_port();
    let script = format!(
        "import socket, sys, time\n\
         t = socket.socket(); t.bind(('127.0.0.1', {port})); t.listen()\n\
         u = None\n\
         if sys.argv[1] == 'udp':\n    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(('127.0.0.1', {port}))\n\
         print('READY', {port}, flush=True)\n\
         time.sleep(120)\n"
    );
    for udp in [true, false] {
        let server = spawn_ready(
            "edge",
            Command::new("/usr/bin/python3")
                .args(["-c", &script])
                .arg(if udp { "udp" } else { "tcp" }),
            std::time::Duration::from_secs(20),
        )?;
        let cfg = dir.join(format!("sparbar-{udp}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[agent]\nstate_dir = \"{d}/state\"\n\n[[targets]]\npid = {pid}\nname = \"edge\"\n\n\
                 [output]\nfile = \"{d}/access.jsonl\"\nunmatched = \"record\"\n",
                d = dir.display(),
                pid = server.pid()
            ),
        )?;
        let (_, report) = doctor_json(&["--config", &cfg.display().to_string()])?;
        let c = check(&report, "target edge")?;
        let detail = c["detail"].as_str().unwrap_or_default();
        let consequence = c["consequence"].as_str().unwrap_or_default();
        let said = detail.contains(&format!("listens on UDP port {port}"));
        ensure!(said == udp, "udp {udp}: the doctor said {c:#}");
        if udp {
            ensure!(
                c["verdict"] == "warn" && consequence.contains("QUIC"),
                "a UDP listener without a QUIC warning: {c:#}"
            );
        }
        drop(server);
    }
    Ok(())
}
