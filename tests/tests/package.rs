//! The Debian package in a real systemd: build the .deb (twice, the second one a newer
//! revision), boot Debian 12 with systemd in systemd-nspawn on a debootstrap'd root (never on
//! this machine's own root), install it with dpkg, and check that the hardened unit starts the
//! agent, that it traces nginx over TLS and writes records, that reload keeps it running, that
//! stop is clean, that an upgrade keeps the operator's configuration, and that purge removes
//! the configuration, the state and the records.
//!
//! The root is cached in target/nspawn-root/bookworm (the first run debootstraps it, about two
//! minutes; later runs reuse it); each run boots an overlay on it, so the cache stays pristine.
//! Needs root, debootstrap, systemd-nspawn, dpkg-deb and dpkg-shlibdeps (`cargo xtask bootstrap`).

#[path = "../../xtask/src/package.rs"]
mod package;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;
use sparbar_tests::*;

/// The packages debootstrap adds to minbase: a booting systemd, the server to trace, a client,
/// and man (`systemd-analyze verify` checks that the unit's man: pages exist).
const INCLUDE: &str = "systemd,systemd-sysv,dbus,nginx,curl,man-db";
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
const CONF: &str = package::CONFFILE;
const RECORDS: &str = "/var/log/sparbar/access.jsonl";
/// What the test's operator changes in the configuration (see `operator_edit`).
const OPERATOR_MARK: &str = "# operator: nginx.service's cgroup, not its exe (package test)";

fn nspawn_dir() -> PathBuf {
    repo_root().join("target/nspawn-root")
}

fn require_tools() -> Result<()> {
    for tool in [
        "debootstrap",
        "systemd-nspawn",
        "nsenter",
        "dpkg-deb",
        "dpkg-shlibdeps",
        "openssl",
    ] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
            .unwrap_or(false);
        ensure!(
            found,
            "{tool} is not installed: run `cargo xtask bootstrap` (as root)"
        );
    }
    Ok(())
}

/// The cached Debian 12 root; debootstrapped when missing or made with other packages.
fn base_root() -> Result<PathBuf> {
    let dir = nspawn_dir();
    let root = dir.join(SUITE);
    let stamp = dir.join(format!("{SUITE}.ok"));
    let want = format!("{SUITE} minbase {INCLUDE}\n");
    if fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str())
        && root.join("sbin/init").exists()
    {
        return Ok(root);
    }
    eprintln!(
        "debootstrapping Debian 12 with systemd into {} (once; about two minutes)",
        root.display()
    );
    let _ = fs::remove_file(&stamp);
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    fs::create_dir_all(&dir)?;
    let t0 = Instant::now();
    let out = Command::new("debootstrap")
        .args(["--variant=minbase", &format!("--include={INCLUDE}"), SUITE])
        .arg(&root)
        .arg(MIRROR)
        .output()
        .context("running debootstrap")?;
    if !out.status.success() {
        bail!(
            "debootstrap failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    // The image's own nginx site is replaced by the test's; the cache keeps only packages.
    fs::write(&stamp, want)?;
    eprintln!("debootstrap took {:.0?}", t0.elapsed());
    Ok(root)
}

/// A booted container: systemd as PID 1 of its own namespaces, on an overlay of the cached root,
/// with its own network (loopback only: the test's nginx ports clash with nothing).
struct Container {
    nspawn: Child,
    leader: u32,
    dir: PathBuf,
    merged: PathBuf,
}

impl Container {
    fn boot(base: &Path, name: &str) -> Result<Container> {
        let dir = nspawn_dir().join(format!("run-{}", std::process::id()));
        let _ = Command::new("umount")
            .arg(dir.join("merged"))
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir_all(&dir);
        for d in ["upper", "work", "merged"] {
            fs::create_dir_all(dir.join(d))?;
        }
        let merged = dir.join("merged");
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            base.display(),
            dir.join("upper").display(),
            dir.join("work").display()
        );
        let st = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(&merged)
            .status()?;
        ensure!(
            st.success(),
            "mounting the overlay on {}: {st}",
            merged.display()
        );
        let log = fs::File::create(dir.join("nspawn.log"))?;
        // -b: boot the image's systemd. --register=no: there is no host systemd to register with.
        // --keep-unit: no scope unit either. --capability=all: the agent's unit, not the container,
        // is what limits the agent's capabilities. --system-call-filter: nspawn's own seccomp
        // filter refuses bpf(2) and perf_event_open(2) otherwise (map creation fails with EPERM
        // even with every capability).
        let nspawn = Command::new("systemd-nspawn")
            .args([
                "-b",
                "--register=no",
                "--keep-unit",
                "--console=passive",
                "--private-network",
            ])
            .args([
                "--capability=all",
                "--system-call-filter=bpf perf_event_open",
            ])
            .arg(format!("--machine={name}"))
            .arg("-D")
            .arg(&merged)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting systemd-nspawn")?;
        let mut c = Container {
            nspawn,
            leader: 0,
            dir,
            merged,
        };
        let t0 = Instant::now();
        c.leader = loop {
            if let Some(pid) = child_of(c.nspawn.id()) {
                break pid;
            }
            if let Some(st) = c.nspawn.try_wait()? {
                bail!("systemd-nspawn exited at once ({st}):\n{}", c.log());
            }
            ensure!(
                t0.elapsed() < Duration::from_secs(30),
                "the container's init never started:\n{}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        loop {
            let state = c.sh("systemctl is-system-running 2>/dev/null")?;
            let state = String::from_utf8_lossy(&state.stdout).trim().to_string();
            if state == "running" {
                break;
            }
            if state == "degraded" {
                eprintln!(
                    "container booted degraded: {}",
                    c.ok("systemctl --failed --no-legend")?
                );
                break;
            }
            ensure!(
                t0.elapsed() < Duration::from_secs(120),
                "the container's systemd did not finish booting (state {state:?}):\n{}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        eprintln!("container booted in {:.1?}", t0.elapsed());
        Ok(c)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("nspawn.log")).unwrap_or_default()
    }

    /// Runs a shell script inside the container (all of its namespaces).
    fn sh(&self, script: &str) -> Result<Output> {
        Command::new("nsenter")
            .arg("-t")
            .arg(self.leader.to_string())
            .args(["-a", "sh", "-c", script])
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("nsenter into the container: {script}"))
    }

    /// Like `sh`, and the script must succeed; returns its standard output.
    fn ok(&self, script: &str) -> Result<String> {
        let out = self.sh(script)?;
        ensure!(
            out.status.success(),
            "in the container, `{script}` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A path inside the container, seen from the host.
    fn path(&self, p: &str) -> PathBuf {
        self.merged.join(p.trim_start_matches('/'))
    }

    fn journal(&self) -> String {
        self.ok("journalctl -u sparbar.service -o cat --no-pager")
            .unwrap_or_default()
    }

    fn unit(&self, props: &str) -> Result<String> {
        self.ok(&format!("systemctl show sparbar.service -p {props}"))
    }

    /// Waits for `systemctl is-active sparbar` to print `want`.
    fn wait_active(&self, want: &str, what: &str) -> Result<()> {
        let t0 = Instant::now();
        loop {
            let out = self.sh("systemctl is-active sparbar.service")?;
            let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if state == want {
                return Ok(());
            }
            if t0.elapsed() > Duration::from_secs(20) || (state == "failed" && want != "failed") {
                let journal = self.journal();
                let hint = if journal.contains("start operation timed out") {
                    "\nthe agent never sent READY=1 (Type=notify): sparbar::ops::notify::ready() must be called once probes and sinks are up"
                } else if journal.contains("Watchdog timeout") {
                    "\nthe agent stopped sending WATCHDOG=1 (WatchdogSec=30s): call sparbar::ops::notify::watchdog() from the main loop"
                } else {
                    ""
                };
                bail!("{what}: sparbar.service is {state:?}, expected {want:?}{hint}\n{}\njournal:\n{journal}", self.unit("ActiveState,SubState,Result,ExecMainStatus")?);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait_journal(&self, needle: &str, after: usize) -> Result<()> {
        let t0 = Instant::now();
        while !self
            .journal()
            .lines()
            .skip(after)
            .any(|l| l.contains(needle))
        {
            ensure!(
                t0.elapsed() < Duration::from_secs(20),
                "the agent never logged {needle:?}; journal:\n{}",
                self.journal()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // SIGTERM makes systemd-nspawn power the container off in order; SIGKILL if it hangs.
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.nspawn.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        let _ = Command::new("umount").arg(&self.merged).status();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The first child of `pid` (systemd-nspawn's child is the container's init).
fn child_of(pid: u32) -> Option<u32> {
    let s = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// nginx in the container: the stock site replaced by one HTTPS server with a fresh
/// self-signed certificate.
fn nginx_site(c: &Container, port: u16) -> Result<()> {
    let key = c.path("/etc/nginx/test.key");
    let crt = c.path("/etc/nginx/test.crt");
    let st = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .stderr(Stdio::null())
        .status()?;
    ensure!(st.success(), "openssl req failed: {st}");
    let _ = fs::remove_file(c.path("/etc/nginx/sites-enabled/default"));
    fs::write(
        c.path("/etc/nginx/sites-enabled/sparbar-test"),
        format!(
            "server {{\n  listen 127.0.0.1:{port} ssl;\n  ssl_certificate /etc/nginx/test.crt;\n  \
             ssl_certificate_key /etc/nginx/test.key;\n  \
             location / {{ default_type application/json; return 200 '{{\"ok\":true}}'; }}\n}}\n"
        ),
    )?;
    c.ok("systemctl restart nginx.service")?;
    Ok(())
}

/// GETs each path over TLS from inside the container.
fn requests(c: &Container, port: u16, paths: &[String]) -> Result<()> {
    for p in paths {
        let body = c.ok(&format!("curl -sS -k --fail https://127.0.0.1:{port}{p}"))?;
        ensure!(body.contains("\"ok\""), "nginx answered {p} with {body:?}");
    }
    Ok(())
}

/// Every record in the container's records file.
fn records(c: &Container) -> Vec<Value> {
    fs::read_to_string(c.path(RECORDS))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

/// The url.path of every access record in the records file.
fn recorded_paths(c: &Container) -> Vec<String> {
    records(c)
        .into_iter()
        .filter(|r| r["event"]["dataset"] == "sparbar.access")
        .filter_map(|r| r["url"]["path"].as_str().map(str::to_string))
        .collect()
}

fn wait_records(c: &Container, paths: &[String]) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let got = recorded_paths(c);
        if paths.iter().all(|p| got.contains(p)) {
            for p in paths {
                let n = got.iter().filter(|g| *g == p).count();
                ensure!(
                    n == 1,
                    "{p} recorded {n} times, expected once; records: {got:?}"
                );
            }
            return Ok(());
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(20),
            "not every request reached {RECORDS}: wanted {paths:?}, recorded {got:?}; journal:\n{}",
            c.journal()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The operator's change to the configuration: trace nginx by its systemd cgroup instead of its
/// executable. Needed in this container: the agent runs in the container's PID namespace, so
/// the pids it finds in /proc are not the ones the kernel reports to its probes, and only a
/// cgroup target (filtered by cgroup id in the kernel) matches there. On a host the packaged
/// `exe` target works as is.
fn operator_edit(c: &Container) -> Result<()> {
    let path = c.path(CONF);
    let text = fs::read_to_string(&path)?;
    let from = "exe = \"/usr/sbin/nginx\"";
    ensure!(
        text.contains(from),
        "the packaged {CONF} no longer targets nginx by {from}"
    );
    let edited = text.replace(
        from,
        &format!("{OPERATOR_MARK}\ncgroup = \"/system.slice/nginx.service\""),
    );
    fs::write(&path, edited)?;
    c.ok(&format!("sparbar check-config --config {CONF}"))?;
    Ok(())
}

fn build_debs(bin: &Path) -> Result<(package::Artifacts, package::Artifacts)> {
    let out = repo_root().join("target/package-test");
    let build = |revision| {
        package::build(
            &repo_root(),
            &package::Options {
                bin: bin.to_path_buf(),
                out_dir: out.join(format!("rev{revision}")),
                revision,
            },
        )
    };
    Ok((build(1)?, build(2)?))
}

#[test]
fn deb_installs_traces_reloads_stops_upgrades_and_purges() -> Result<()> {
    let t0 = Instant::now();
    require_root()?;
    require_tools()?;
    let bin = agent_bin()?;
    let (first, second) = build_debs(&bin)?;

    // The tarball carries the same tree as the package.
    let list = Command::new("tar")
        .arg("-tzf")
        .arg(&first.tarball)
        .output()?;
    let list = String::from_utf8_lossy(&list.stdout);
    for f in [
        "usr/bin/sparbar",
        package::UNIT_PATH,
        "etc/sparbar/sparbar.toml",
        "usr/share/man/man1/sparbar.1.gz",
        "usr/share/man/man1/sparbar-run.1.gz",
        "usr/share/bash-completion/completions/sparbar",
        "usr/share/zsh/vendor-completions/_sparbar",
        "usr/share/fish/vendor_completions.d/sparbar.fish",
    ] {
        ensure!(
            list.lines().any(|l| l.ends_with(f)),
            "{} lacks {f}",
            first.tarball.display()
        );
    }

    let base = base_root()?;
    let c = Container::boot(&base, &format!("sparbar-pkg-{}", std::process::id()))?;
    let port = 8443;
    nginx_site(&c, port)?;
    for (a, name) in [(&first, "sparbar-1.deb"), (&second, "sparbar-2.deb")] {
        fs::copy(&a.deb, c.path(&format!("/root/{name}")))?;
    }
    // tracefs: the container's systemd mounts it at boot (sys-kernel-tracing.mount), as on a host.
    c.ok("test -e /sys/kernel/tracing/events/syscalls")
        .context("tracefs is not mounted in the container")?;

    // Install: the unit is enabled and started by the postinst; start returns once READY=1.
    c.ok("dpkg -i /root/sparbar-1.deb")?;
    c.wait_active("active", "after dpkg -i")?;
    ensure!(c.ok("systemctl is-enabled sparbar.service")?.trim() == "enabled");
    let verify = c.sh(&format!("systemd-analyze verify /{}", package::UNIT_PATH))?;
    let verify_err = String::from_utf8_lossy(&verify.stderr);
    ensure!(
        verify.status.success() && !verify_err.contains("sparbar"),
        "systemd-analyze verify on the unit: {}\n{verify_err}",
        verify.status
    );
    ensure!(
        c.ok("dpkg-query -W -f='${Conffiles}' sparbar")?
            .contains(CONF),
        "{CONF} is not a conffile"
    );
    for f in [
        "/usr/share/man/man1/sparbar-status.1.gz",
        "/usr/share/bash-completion/completions/sparbar",
    ] {
        ensure!(c.path(f).exists(), "the package did not install {f}");
    }
    // The packaged configuration targets nginx by its executable: the agent finds it.
    c.wait_journal("(nginx, /usr/sbin/nginx) as target \"nginx\"", 0)?;
    c.wait_journal("attached OpenSSL probes", 0)?;
    for (dir, mode) in [("/var/lib/sparbar", "700"), ("/var/log/sparbar", "750")] {
        ensure!(
            c.ok(&format!("stat -c %a {dir}"))?.trim() == mode,
            "{dir} is not mode {mode}"
        );
    }
    let status = c.ok(&format!("sparbar status --config {CONF} --json"))?;
    ensure!(
        status.contains("nginx"),
        "`sparbar status` through the sandbox: {status}"
    );

    // The operator edits the configuration and reloads: the agent stays up and traces nginx.
    operator_edit(&c)?;
    let before = c.journal().lines().count();
    let pid = c.unit("MainPID")?;
    c.ok("systemctl reload sparbar.service")?;
    c.wait_journal("SIGHUP: configuration reloaded", before)?;
    c.wait_active("active", "after systemctl reload")?;
    ensure!(
        c.unit("MainPID")? == pid,
        "reload restarted the agent: {pid} -> {}",
        c.unit("MainPID")?
    );
    let first_paths: Vec<String> = (1..=5)
        .map(|i| format!("/package-test/install/{i}"))
        .collect();
    requests(&c, port, &first_paths)?;
    wait_records(&c, &first_paths)?;

    // Stop is clean: SIGTERM, drained, exit status 0.
    c.ok("systemctl stop sparbar.service")?;
    c.wait_active("inactive", "after systemctl stop")?;
    let shown = c.unit("Result,ExecMainStatus,ExecMainCode")?;
    ensure!(
        shown.contains("Result=success") && shown.contains("ExecMainStatus=0"),
        "sparbar did not stop cleanly: {shown}\njournal:\n{}",
        c.journal()
    );
    ensure!(c.journal().contains("sparbar stopped; probes detached"));

    // Upgrade to a newer revision: the edited conffile stays as it is (no prompt: stdin is
    // /dev/null, and dpkg fails on a conffile question it cannot ask), the agent is restarted.
    c.ok("systemctl start sparbar.service")?;
    c.wait_active("active", "after systemctl start")?;
    let pid = c.unit("MainPID")?;
    c.ok("dpkg -i /root/sparbar-2.deb")?;
    ensure!(c.ok("dpkg-query -W -f='${Version}' sparbar")? == second.version);
    ensure!(
        fs::read_to_string(c.path(CONF))?.contains(OPERATOR_MARK),
        "the upgrade replaced the operator's {CONF}"
    );
    c.wait_active("active", "after the upgrade")?;
    ensure!(
        c.unit("MainPID")? != pid,
        "the upgrade did not restart the agent"
    );
    let upgraded_paths: Vec<String> = (1..=3)
        .map(|i| format!("/package-test/upgraded/{i}"))
        .collect();
    requests(&c, port, &upgraded_paths)?;
    wait_records(&c, &upgraded_paths)?;

    // The agent dies by SIGKILL: nginx serves on as before, systemd restarts the agent
    // (Restart=on-failure), and the restarted agent states the time it was down and traces.
    let pid = c.unit("MainPID")?;
    let killed = pid.trim().trim_start_matches("MainPID=").to_string();
    let restarts = c.unit("NRestarts")?;
    let before = c.journal().lines().count();
    c.ok(&format!("kill -KILL {killed}"))?;
    let while_down: Vec<String> = (1..=3)
        .map(|i| format!("/package-test/while-down/{i}"))
        .collect();
    requests(&c, port, &while_down)?;
    let since_kill = Instant::now();
    while c.unit("NRestarts")? == restarts || c.unit("MainPID")? == pid {
        ensure!(
            since_kill.elapsed() < Duration::from_secs(30),
            "systemd did not restart the agent after SIGKILL: {}\njournal:\n{}",
            c.unit("ActiveState,SubState,Result,NRestarts,MainPID")?,
            c.journal()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    c.wait_active("active", "after the restart that followed SIGKILL")?;
    c.wait_journal("attached OpenSSL probes", before)?;
    let restarted_paths: Vec<String> = (1..=3)
        .map(|i| format!("/package-test/restarted/{i}"))
        .collect();
    requests(&c, port, &restarted_paths)?;
    wait_records(&c, &restarted_paths)?;
    let crashed = records(&c)
        .iter()
        .filter(|r| {
            r["event"]["dataset"] == "sparbar.gap"
                && r["sparbar"]["gap"]["reason"] == "agent_crashed"
        })
        .count();
    ensure!(
        crashed == 1,
        "{crashed} agent_crashed gap records after one SIGKILL"
    );

    // Purge: the agent stops, and its configuration, state and records are gone.
    c.ok("dpkg --purge sparbar")?;
    for gone in [
        "/etc/sparbar",
        "/var/lib/sparbar",
        "/var/log/sparbar",
        "/usr/bin/sparbar",
    ] {
        ensure!(!c.path(gone).exists(), "{gone} is still there after purge");
    }
    ensure!(
        !c.path(&format!("/{}", package::UNIT_PATH)).exists(),
        "the unit is still installed"
    );
    let left = c.ok("grep -lx sparbar /proc/[0-9]*/comm 2>/dev/null || true")?;
    ensure!(
        left.trim().is_empty(),
        "an agent process is still running after purge: {left}"
    );

    eprintln!("package test passed in {:.0?}", t0.elapsed());
    Ok(())
}
