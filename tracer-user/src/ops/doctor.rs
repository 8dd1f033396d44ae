//! `sparbar doctor`: checks, before the agent runs, that this host gives it what it needs, and
//! says for every missing piece what that piece disables.
//!
//! Wherever a real trial is cheap the doctor makes one instead of guessing from files: it loads
//! the agent's own eBPF object afresh (its own, empty maps: the programs filter everything out
//! and share nothing with a running agent), attaches one tracepoint, one uprobe (scoped to the
//! doctor's own pid) and the cgroup egress filter, and detaches each at once; it resets a
//! loopback connection of its own with SOCK_DESTROY. A filesystem it must look into but that is
//! not mounted (tracefs, securityfs) is mounted in a private mount namespace of one thread, which
//! vanishes with the thread: the host's mounts are never changed.
//!
//! A line is FAIL when the agent could not start, or could not capture TLS or enforce at all
//! while the configuration asks for it (without a configuration: as the defaults do); warn when
//! it runs with less.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CStr,
    fmt::Write as _,
    fs, io,
    io::Read as _,
    net::{TcpListener, TcpStream},
    num::NonZeroU32,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    programs::{
        uprobe::UProbeScope, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, TracePoint, UProbe,
    },
    Ebpf, EbpfLoader,
};
use serde::Serialize;

use crate::{
    agent::Plan,
    capture::discovery::{self, Discovery, TargetSpec},
    capture::loader::{TRACEFS, TRACEPOINTS},
    capture::procfs,
    config::{self, TargetMatch},
    enforce,
    enforce::chain,
};

/// Where `sparbar doctor` looks for a configuration when none is given.
pub const DEFAULT_CONFIG: &str = "/etc/sparbar/sparbar.toml";

/// The kernel the agent needs at least: the BPF ring buffer and CAP_BPF came in 5.8.
const MIN_KERNEL: (u32, u32, u32) = (5, 8, 0);

const SECURITYFS: &str = "/sys/kernel/security";
const BTF: &str = "/sys/kernel/btf/vmlinux";
const UPROBE_PMU: &str = "/sys/bus/event_source/devices/uprobe/type";

/// Capabilities (linux/capability.h) the agent uses, and what each one is for.
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_RESOURCE: u32 = 24;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Verdict {
    #[serde(rename = "ok")]
    Ok,
    #[serde(rename = "warn")]
    Warn,
    #[serde(rename = "FAIL")]
    Fail,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        }
    }

    /// FAIL when what is missing is needed, warn when not.
    fn needed(needed: bool) -> Verdict {
        if needed {
            Verdict::Fail
        } else {
            Verdict::Warn
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub check: String,
    pub verdict: Verdict,
    /// What was looked at and what was found.
    pub detail: String,
    /// What the agent cannot do because of it; `None` when nothing is lost.
    pub consequence: Option<String>,
    /// For a target: the processes that match it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<TargetProcess>,
}

impl Check {
    fn new(check: &str, verdict: Verdict, detail: String, consequence: Option<String>) -> Check {
        Check {
            check: check.to_string(),
            verdict,
            detail,
            consequence,
            processes: Vec::new(),
        }
    }
    fn ok(check: &str, detail: String) -> Check {
        Check::new(check, Verdict::Ok, detail, None)
    }
}

/// A running process that a target matches, and the images in it that carry OpenSSL.
#[derive(Debug, Clone, Serialize)]
pub struct TargetProcess {
    pub pid: u32,
    pub name: String,
    pub executable: Option<String>,
    pub tls: Vec<TlsImage>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TlsImage {
    pub path: String,
    pub kind: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
    pub ok: usize,
    pub warn: usize,
    pub fail: usize,
}

impl Report {
    fn new(checks: Vec<Check>) -> Report {
        let count = |v| checks.iter().filter(|c| c.verdict == v).count();
        Report {
            ok: count(Verdict::Ok),
            warn: count(Verdict::Warn),
            fail: count(Verdict::Fail),
            checks,
        }
    }

    /// The table: check, verdict and detail on one line, the consequence under the detail.
    pub fn table(&self) -> String {
        let w = self
            .checks
            .iter()
            .map(|c| c.check.len())
            .chain([5])
            .max()
            .unwrap_or(5);
        let indent = " ".repeat(w + 2 + 7 + 2);
        let mut out = format!("{:w$}  VERDICT  DETAIL\n", "CHECK");
        for c in &self.checks {
            let detail = c.detail.replace('\n', &format!("\n{indent}"));
            let _ = writeln!(out, "{:w$}  {:7}  {detail}", c.check, c.verdict.as_str());
            if let Some(q) = &c.consequence {
                let _ = writeln!(out, "{indent}-> {q}");
            }
        }
        let _ = writeln!(
            out,
            "\n{} ok, {} warn, {} FAIL: {}",
            self.ok,
            self.warn,
            self.fail,
            if self.fail > 0 {
                "the agent cannot do what it is configured for here; see the FAIL lines"
            } else if self.warn > 0 {
                "the agent can run here; the warn lines say what it will miss"
            } else {
                "the agent can run here"
            }
        );
        out
    }
}

/// `sparbar doctor [--config FILE] [--json]`: prints the report; exit code 0 when nothing
/// FAILs, 1 otherwise.
pub fn command(config: Option<&Path>, json: bool) -> u8 {
    let report = run(config);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("the report serialises")
        );
    } else {
        print!("{}", report.table());
    }
    u8::from(report.fail > 0)
}

/// What the configuration asks of the host.
struct Wants {
    tls: bool,
    enforce: bool,
}

/// Runs every check. `config`: the file whose targets to look for; `None`: [`DEFAULT_CONFIG`]
/// if it exists.
pub fn run(config: Option<&Path>) -> Report {
    let release = kernel_release();
    let kconfig = read_kconfig(&release);
    let (config_check, plan) = check_config(config);
    let wants = match &plan {
        Some(p) => Wants {
            tls: p.targets.iter().any(|t| t.tls),
            enforce: p.enforce,
        },
        None => Wants {
            tls: true,
            enforce: true,
        },
    };
    let target_checks: Vec<Check> = plan
        .as_ref()
        .map(|p| check_targets(&p.targets))
        .unwrap_or_default();

    let mut checks = vec![
        check_kernel(&release),
        check_privileges(&release, &wants),
        check_lockdown(kconfig.as_ref()),
        check_btf(),
    ];
    let (object_check, mut ebpf) = load_object();
    checks.push(object_check);
    let (tracefs_check, tracefs) = check_tracefs();
    checks.push(tracefs_check);
    checks.push(check_tracepoints(tracefs, ebpf.as_mut()));
    checks.push(check_uprobes(
        ebpf.as_mut(),
        &target_checks,
        &wants,
        kconfig.as_ref(),
    ));
    checks.push(check_cgroup(ebpf.as_mut(), &wants));
    checks.push(check_sock_destroy(kconfig.as_ref()));
    checks.push(config_check);
    checks.extend(target_checks);
    Report::new(checks)
}

// ---------------------------------------------------------------------------------------------
// Kernel version
// ---------------------------------------------------------------------------------------------

fn kernel_release() -> String {
    // SAFETY: utsname is plain data; all-zero is a valid value that uname(2) overwrites.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname(2) with a pointer to a utsname we own.
    if unsafe { libc::uname(&mut u) } != 0 {
        return fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
    }
    // SAFETY: the kernel NUL-terminates `release`, which lives as long as `u`.
    unsafe { CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// `6.18.44-fc-v1045` → (6, 18, 44); `6.1` → (6, 1, 0); None when it does not start with
/// `MAJOR.MINOR`.
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32, u32)> {
    let mut parts = release.splitn(3, '.');
    let num = |s: &str| -> Option<u32> {
        let d: String = s.chars().take_while(char::is_ascii_digit).collect();
        d.parse().ok()
    };
    let major = parts.next().and_then(num)?;
    let minor_s = parts.next()?;
    let minor = num(minor_s)?;
    // "6.1-rc1": no patch level; "6.1.0-13-amd64": 0.
    let patch = if minor_s.chars().all(|c| c.is_ascii_digit()) {
        parts.next().and_then(num).unwrap_or(0)
    } else {
        0
    };
    Some((major, minor, patch))
}

fn check_kernel(release: &str) -> Check {
    let (a, b, _) = MIN_KERNEL;
    match parse_kernel_version(release) {
        Some(v) if v >= MIN_KERNEL => Check::ok(
            "kernel",
            format!("{release} (the agent needs {a}.{b} or later)"),
        ),
        Some((x, y, z)) => Check::new(
            "kernel",
            Verdict::Fail,
            format!("{release} is {x}.{y}.{z}, older than {a}.{b}"),
            Some(format!(
                "the BPF ring buffer needs {a}.{b}: the agent's programs do not load, nothing can be traced"
            )),
        ),
        None => Check::new(
            "kernel",
            Verdict::Warn,
            format!("cannot read a version from the release {release:?}"),
            Some(format!(
                "unknown whether it is {a}.{b} or later; the checks below tell what works"
            )),
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Kernel build configuration (/proc/config.gz, /boot/config-RELEASE)
// ---------------------------------------------------------------------------------------------

/// A kernel build configuration and where it was read.
pub struct Kconfig {
    pub source: String,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KOption {
    /// `CONFIG_X=VALUE` (`y`, `m`, a number, a string).
    Set(String),
    /// `# CONFIG_X is not set`.
    NotSet,
    /// Not in the file at all (the option does not exist in this kernel version).
    Absent,
}

impl Kconfig {
    pub fn get(&self, name: &str) -> KOption {
        kconfig_option(&self.text, name)
    }

    /// `CONFIG_X=y (/proc/config.gz)`, for details.
    fn describe(&self, name: &str) -> String {
        match self.get(name) {
            KOption::Set(v) => format!("{name}={v} ({})", self.source),
            KOption::NotSet => format!("{name} is not set ({})", self.source),
            KOption::Absent => format!("{name} is not in {}", self.source),
        }
    }
}

/// The value of option `name` in the text of a kernel `.config`.
pub fn kconfig_option(text: &str, name: &str) -> KOption {
    for line in text.lines() {
        let line = line.trim();
        if let Some(v) = line
            .strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('='))
        {
            return KOption::Set(v.to_string());
        }
        if line
            .strip_prefix("# ")
            .and_then(|rest| rest.strip_prefix(name))
            == Some(" is not set")
        {
            return KOption::NotSet;
        }
    }
    KOption::Absent
}

fn read_kconfig(release: &str) -> Option<Kconfig> {
    if let Ok(f) = fs::File::open("/proc/config.gz") {
        let mut text = String::new();
        if flate2::read::GzDecoder::new(f)
            .read_to_string(&mut text)
            .is_ok()
        {
            return Some(Kconfig {
                source: "/proc/config.gz".into(),
                text,
            });
        }
    }
    let boot = format!("/boot/config-{release}");
    fs::read_to_string(&boot)
        .ok()
        .map(|text| Kconfig { source: boot, text })
}

// ---------------------------------------------------------------------------------------------
// Privileges
// ---------------------------------------------------------------------------------------------

/// The `CapEff:` mask of a /proc/PID/status text.
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

fn check_privileges(release: &str, wants: &Wants) -> Check {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let Some(eff) = fs::read_to_string("/proc/self/status")
        .ok()
        .as_deref()
        .and_then(parse_cap_eff)
    else {
        return Check::new(
            "privileges",
            Verdict::Warn,
            format!("uid {euid}; cannot read CapEff from /proc/self/status"),
            Some(
                "unknown whether the agent may load and attach its programs; the trials below tell"
                    .into(),
            ),
        );
    };
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    // (capability, name, verdict when missing, what it disables)
    let caps: [(u32, &str, Verdict, &str); 5] = [
        (CAP_BPF, "CAP_BPF", Verdict::Fail, "the programs and maps cannot be loaded: nothing can be traced"),
        (CAP_PERFMON, "CAP_PERFMON", Verdict::Fail, "tracepoints cannot be attached: the agent does not start"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN", Verdict::needed(wants.tls), "the uprobe attach fails (perf_event_open EACCES): no TLS traffic is captured; tracefs cannot be mounted"),
        (CAP_SYS_PTRACE, "CAP_SYS_PTRACE", Verdict::needed(wants.tls), "/proc/PID/exe and maps of other users' processes (nginx's root master) are unreadable: no OpenSSL probe is attached to them"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN", Verdict::Warn, "SOCK_DESTROY is refused: blocked connections are dropped but not reset"),
    ];
    let present: Vec<&str> = caps.iter().filter(|c| has(c.0)).map(|c| c.1).collect();
    let missing: Vec<_> = caps.iter().filter(|c| !has(c.0)).collect();
    let mut detail = format!("uid {euid}, CapEff {eff:016x}");
    if !present.is_empty() {
        let _ = write!(detail, "; present: {}", present.join(", "));
    }
    if !missing.is_empty() {
        let names: Vec<&str> = missing.iter().map(|c| c.1).collect();
        let _ = write!(detail, "; missing: {}", names.join(", "));
    }
    let mut verdict = missing.iter().map(|c| c.2).max().unwrap_or(Verdict::Ok);
    let mut consequences: Vec<String> = missing
        .iter()
        .map(|c| format!("no {}: {}", c.1, c.3))
        .collect();
    if !has(CAP_SYS_RESOURCE) {
        match parse_kernel_version(release) {
            Some(v) if v >= (5, 11, 0) => detail.push_str(
                "; no CAP_SYS_RESOURCE: harmless here, BPF memory is charged to the memory cgroup (5.11+)",
            ),
            _ => {
                verdict = verdict.max(Verdict::Warn);
                consequences.push("no CAP_SYS_RESOURCE: RLIMIT_MEMLOCK cannot be raised and bounds the maps before 5.11: large maps may fail to create".into());
            }
        }
    }
    Check::new(
        "privileges",
        verdict,
        detail,
        (!consequences.is_empty()).then(|| consequences.join("; ")),
    )
}

// ---------------------------------------------------------------------------------------------
// Lockdown
// ---------------------------------------------------------------------------------------------

/// The mode in brackets of `/sys/kernel/security/lockdown` (`none [integrity] confidentiality`).
pub fn parse_lockdown(text: &str) -> Option<&str> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
}

/// The lockdown mode a kernel is built to force (`CONFIG_LOCK_DOWN_KERNEL_FORCE_*`).
pub fn forced_lockdown(k: &Kconfig) -> Option<&'static str> {
    [
        (
            "CONFIG_LOCK_DOWN_KERNEL_FORCE_CONFIDENTIALITY",
            "confidentiality",
        ),
        ("CONFIG_LOCK_DOWN_KERNEL_FORCE_INTEGRITY", "integrity"),
        ("CONFIG_LOCK_DOWN_KERNEL_FORCE_NONE", "none"),
    ]
    .into_iter()
    .find(|(opt, _)| k.get(opt) == KOption::Set("y".into()))
    .map(|(_, mode)| mode)
}

fn lockdown_check(mode: &str, how: &str) -> Check {
    match mode {
        "none" => Check::ok("lockdown", format!("none ({how})")),
        "integrity" => Check::ok(
            "lockdown",
            format!("integrity ({how}): bpf_probe_write_user is refused; the agent does not use it"),
        ),
        "confidentiality" => Check::new(
            "lockdown",
            Verdict::Fail,
            format!("confidentiality ({how})"),
            Some("tracefs and BPF reads of kernel memory are refused: no tracepoint attaches (the agent does not start) and sockets' addresses cannot be read".into()),
        ),
        other => Check::new(
            "lockdown",
            Verdict::Warn,
            format!("unknown mode {other:?} ({how})"),
            Some("unknown what it refuses; the trials below tell".into()),
        ),
    }
}

fn check_lockdown(kconfig: Option<&Kconfig>) -> Check {
    let file = Path::new(SECURITYFS).join("lockdown");
    let read = |how: &str| match fs::read_to_string(&file) {
        Ok(text) => match parse_lockdown(&text) {
            Some(mode) => Ok(lockdown_check(mode, how)),
            None => Err(TrialError::NoLockdownMode {
                path: file.clone(),
                text: text.trim().to_string(),
            }),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Check::ok(
            "lockdown",
            format!(
                "none: {SECURITYFS} has no lockdown file, the kernel has no lockdown LSM ({how})"
            ),
        )),
        Err(source) => Err(TrialError::Read {
            path: file.clone(),
            source,
        }),
    };
    let result = if is_mounted("securityfs", SECURITYFS) {
        read(&format!("{} read", file.display()))
    } else {
        in_private_mount(c"securityfs", c"/sys/kernel/security", || {
            read("securityfs is not mounted; read through a private mount of it")
        })
        .and_then(|r| r)
    };
    match result {
        Ok(c) => c,
        Err(e) => {
            let forced = kconfig.and_then(|k| forced_lockdown(k).map(|m| (m, &k.source)));
            match forced {
                Some((mode, source)) => {
                    let mut c = lockdown_check(
                        mode,
                        &format!(
                            "forced by the build: CONFIG_LOCK_DOWN_KERNEL_FORCE_{}=y in {source}; the current mode is unreadable: {e}",
                            mode.to_uppercase()
                        ),
                    );
                    if c.verdict == Verdict::Ok {
                        c.verdict = Verdict::Warn;
                        c.consequence = Some("the mode may have been raised since boot; if it is confidentiality nothing can be traced".into());
                    }
                    c
                }
                None => Check::new(
                    "lockdown",
                    Verdict::Warn,
                    format!("cannot tell: {e}"),
                    Some("if it is confidentiality, nothing can be traced".into()),
                ),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// BTF
// ---------------------------------------------------------------------------------------------

fn check_btf() -> Check {
    let fallback = || {
        let (d, s) = crate::capture::btf::DEFAULT_V6_OFFSETS;
        format!("the agent assumes the x86_64 offsets {d} and {s} of struct sock_common's IPv6 addresses: IPv6 addresses in records may be wrong on this kernel")
    };
    match fs::read(BTF) {
        Ok(b) => match crate::capture::btf::struct_member_offsets(
            &b,
            "sock_common",
            &["skc_v6_daddr", "skc_v6_rcv_saddr"],
        ) {
            Some(v) if v.len() == 2 => Check::ok(
                "btf",
                format!(
                    "{BTF}: {} bytes; struct sock_common: skc_v6_daddr at {}, skc_v6_rcv_saddr at {}",
                    b.len(),
                    v[0],
                    v[1]
                ),
            ),
            _ => Check::new(
                "btf",
                Verdict::Warn,
                format!("{BTF}: {} bytes, but no struct sock_common with IPv6 addresses in it (malformed, or IPv6 is not built)", b.len()),
                Some(fallback()),
            ),
        },
        Err(e) => Check::new(
            "btf",
            Verdict::Warn,
            format!("{BTF}: {e} (the kernel is built without CONFIG_DEBUG_INFO_BTF?)"),
            Some(fallback()),
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// The agent's eBPF object
// ---------------------------------------------------------------------------------------------

/// Loads the agent's embedded object with small maps (the trials need no capacity).
fn load_object() -> (Check, Option<Ebpf>) {
    let obj = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer-ebpf"));
    match EbpfLoader::new()
        .map_max_entries(tracer_common::MAP_EVENTS, 256 * 1024)
        .map_max_entries(tracer_common::MAP_CONNS, 1024)
        .load(obj)
    {
        Ok(ebpf) => (
            Check::ok(
                "bpf",
                format!(
                    "the agent's eBPF object ({} bytes) loads: {} maps created, {} programs in it",
                    obj.len(),
                    ebpf.maps().count(),
                    ebpf.programs().count()
                ),
            ),
            Some(ebpf),
        ),
        Err(e) => (
            Check::new(
                "bpf",
                Verdict::Fail,
                format!("loading the agent's eBPF object failed: {}", chain(&e)),
                Some("nothing can be traced (needs root, or CAP_BPF and CAP_PERFMON, and a kernel with BPF)".into()),
            ),
            None,
        ),
    }
}

/// A trial is not possible because the object did not load.
const NO_OBJECT: &str = "no trial: the eBPF object did not load (see bpf)";

/// Why a trial (load, attach, mount, reset) did not work; its text goes into the check's line.
#[derive(Debug, thiserror::Error)]
enum TrialError {
    #[error("{NO_OBJECT}")]
    NoObject,
    #[error("program {0} is missing from the object: the build is broken")]
    MissingProgram(&'static str),
    #[error("{name}: {}", chain(.source))]
    ProgramType {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("loading {name}: {}", chain(.source))]
    Load {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("attaching {name} to {to}: {}", chain(.source))]
    Attach {
        name: &'static str,
        to: String,
        source: aya::programs::ProgramError,
    },
    /// The uprobe's attach error says by itself where.
    #[error("{}", chain(.0))]
    AttachUprobe(aya::programs::ProgramError),
    #[error("detaching {name}: {}", chain(.source))]
    Detach {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("opening {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{} reads {text:?}, no mode in brackets", path.display())]
    NoLockdownMode { path: PathBuf, text: String },
    /// A system call of the private mount namespace failed.
    #[error("{what}: {source}")]
    Os { what: String, source: io::Error },
    #[error("the check's thread panicked")]
    Panicked,
    #[error("{what} for the trial: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
    #[error(transparent)]
    Destroy(#[from] enforce::EnforceError),
    #[error("SOCK_DESTROY of {local} <-> {peer} was acknowledged, but the peer read {n} bytes instead of a reset")]
    NotResetRead {
        local: std::net::SocketAddr,
        peer: std::net::SocketAddr,
        n: usize,
    },
    #[error("SOCK_DESTROY of {local} <-> {peer} was acknowledged, but the peer's read gave \"{source}\" instead of a reset")]
    NotReset {
        local: std::net::SocketAddr,
        peer: std::net::SocketAddr,
        source: io::Error,
    },
}

/// The program `name` of the object, as type `T`.
fn trial_program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, TrialError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(TrialError::MissingProgram(name))?
        .try_into()
        .map_err(|source| TrialError::ProgramType { name, source })
}

// ---------------------------------------------------------------------------------------------
// Mounts
// ---------------------------------------------------------------------------------------------

/// Mount points of `fstype` in a mountinfo text (proc_pid_mountinfo(5)), octal escapes undone.
pub fn mounts_of_type(mountinfo: &str, fstype: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            if post.split(' ').next()? != fstype {
                return None;
            }
            Some(PathBuf::from(enforce::unescape_mount(
                pre.split(' ').nth(4)?,
            )))
        })
        .collect()
}

fn own_mounts(fstype: &str) -> Vec<PathBuf> {
    mounts_of_type(
        &fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
        fstype,
    )
}

fn is_mounted(fstype: &str, at: &str) -> bool {
    own_mounts(fstype).iter().any(|p| p == Path::new(at))
}

/// Runs `f` on a thread of its own that has a private mount namespace with `fstype` mounted at
/// `at`. Mounts are made private first, so nothing propagates to the host; the namespace goes
/// away with the thread.
fn in_private_mount<T: Send>(
    fstype: &CStr,
    at: &CStr,
    f: impl FnOnce() -> T + Send,
) -> Result<T, TrialError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let fail = |what: &str| TrialError::Os {
                what: what.to_string(),
                source: io::Error::last_os_error(),
            };
            // SAFETY: unshare(2) with constant flags. On a thread it gives this thread alone its
            // own mount namespace (CLONE_NEWNS implies CLONE_FS, which threads may unshare).
            if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
                return Err(fail("unshare(CLONE_NEWNS) for a private mount namespace"));
            }
            // SAFETY: mount(2) changing only the propagation of "/" and everything below it.
            let rc = unsafe {
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                )
            };
            if rc != 0 {
                return Err(fail("making the private namespace's mounts private"));
            }
            // SAFETY: mount(2) with valid NUL-terminated strings and no data.
            let rc = unsafe {
                libc::mount(
                    fstype.as_ptr(),
                    at.as_ptr(),
                    fstype.as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            if rc != 0 {
                return Err(fail(&format!(
                    "mounting {} at {}",
                    fstype.to_string_lossy(),
                    at.to_string_lossy()
                )));
            }
            Ok(f())
        })
        .join()
        .unwrap_or(Err(TrialError::Panicked))
    })
}

// ---------------------------------------------------------------------------------------------
// tracefs and tracepoints
// ---------------------------------------------------------------------------------------------

/// Where the tracepoints can be looked at.
#[derive(Clone, Copy)]
enum Tracefs {
    /// Mounted where the agent wants it.
    Mounted,
    /// Not mounted, but the agent will mount it (a trial mount worked).
    Mountable,
    /// Neither.
    Missing,
}

fn check_tracefs() -> (Check, Tracefs) {
    let elsewhere: Vec<String> = own_mounts("tracefs")
        .into_iter()
        .filter(|p| p != Path::new(TRACEFS))
        .map(|p| p.display().to_string())
        .collect();
    let also = if elsewhere.is_empty() {
        String::new()
    } else {
        format!(" (also mounted at {})", elsewhere.join(", "))
    };
    // The agent's own test (`loader::ensure_tracefs`).
    let events = Path::new(TRACEFS).join("events");
    if events.exists() {
        return (
            Check::ok("tracefs", format!("mounted at {TRACEFS}{also}")),
            Tracefs::Mounted,
        );
    }
    if is_mounted("tracefs", TRACEFS) {
        let e = fs::metadata(&events)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        return (
            Check::new(
                "tracefs",
                Verdict::Fail,
                format!("mounted at {TRACEFS}{also}, but {}: {e}", events.display()),
                Some(
                    "the tracepoints cannot be found (root can read it): the agent does not start"
                        .into(),
                ),
            ),
            Tracefs::Missing,
        );
    }
    let not = if elsewhere.is_empty() {
        "not mounted".to_string()
    } else {
        format!(
            "not mounted at {TRACEFS} (only at {})",
            elsewhere.join(", ")
        )
    };
    match in_private_mount(c"tracefs", c"/sys/kernel/tracing", || {
        Path::new(TRACEFS).join("events").exists()
    }) {
        Ok(true) => (
            Check::ok(
                "tracefs",
                format!("{not}; the agent mounts it at {TRACEFS} when it starts (a trial mount in a private mount namespace worked)"),
            ),
            Tracefs::Mountable,
        ),
        Ok(false) => (
            Check::new(
                "tracefs",
                Verdict::Fail,
                format!("{not}; a trial mount worked but has no events directory"),
                Some(no_tracefs()),
            ),
            Tracefs::Missing,
        ),
        Err(e) => (
            Check::new(
                "tracefs",
                Verdict::Fail,
                format!("{not}, and it cannot be mounted: {e}"),
                Some(no_tracefs()),
            ),
            Tracefs::Missing,
        ),
    }
}

fn no_tracefs() -> String {
    "no tracefs and cannot mount it: no syscall tracepoints, so plaintext capture and the connection table are off; the agent does not start".into()
}

/// What the tracepoints look like under tracefs, and a trial attach of one.
struct TracepointSurvey {
    missing: Vec<(&'static str, &'static str)>,
    trial: Result<String, TrialError>,
}

fn survey_tracepoints(ebpf: Option<&mut Ebpf>) -> TracepointSurvey {
    let events = Path::new(TRACEFS).join("events");
    let missing = TRACEPOINTS
        .iter()
        .filter(|(_, cat, name)| !events.join(cat).join(name).join("id").exists())
        .map(|(_, cat, name)| (*cat, *name))
        .collect();
    let trial = match ebpf {
        None => Err(TrialError::NoObject),
        Some(ebpf) => trial_tracepoint(ebpf),
    };
    TracepointSurvey { missing, trial }
}

fn trial_tracepoint(ebpf: &mut Ebpf) -> Result<String, TrialError> {
    let (prog, category, name) = TRACEPOINTS[0];
    let p: &mut TracePoint = trial_program(ebpf, prog)?;
    p.load()
        .map_err(|source| TrialError::Load { name: prog, source })?;
    let link = p
        .attach(category, name)
        .map_err(|source| TrialError::Attach {
            name: prog,
            to: format!("{category}:{name}"),
            source,
        })?;
    p.detach(link)
        .map_err(|source| TrialError::Detach { name: prog, source })?;
    Ok(format!(
        "{prog} loaded and attached to {category}:{name}, then detached"
    ))
}

/// What the agent loses without the tracepoints of `category`.
fn tracepoint_consequence(category: &str) -> &'static str {
    match category {
        "syscalls" => "plaintext capture and the connection table miss what these calls do",
        "sock" => "the 4-tuples of connections are not learned and TLS connections are not told apart from plaintext: records lack addresses",
        "sched" => "new processes of targets (nginx workers after a reload) are not followed and exited ones are not forgotten",
        _ => "what they see is not captured",
    }
}

fn check_tracepoints(tracefs: Tracefs, ebpf: Option<&mut Ebpf>) -> Check {
    let (survey, via) = match tracefs {
        Tracefs::Missing => {
            return Check::new(
                "tracepoints",
                Verdict::Fail,
                "not checked: no tracefs".into(),
                Some(no_tracefs()),
            )
        }
        Tracefs::Mounted => (survey_tracepoints(ebpf), ""),
        Tracefs::Mountable => match in_private_mount(c"tracefs", c"/sys/kernel/tracing", || {
            survey_tracepoints(ebpf)
        }) {
            Ok(s) => (s, " (through a private mount of tracefs)"),
            Err(e) => {
                return Check::new(
                    "tracepoints",
                    Verdict::Fail,
                    format!("not checked: {e}"),
                    Some(no_tracefs()),
                )
            }
        },
    };
    let total = TRACEPOINTS.len();
    let present = total - survey.missing.len();
    let mut detail = format!("{present} of {total} present under {TRACEFS}/events{via}");
    let mut verdict = Verdict::Ok;
    let mut consequences = Vec::new();
    if !survey.missing.is_empty() {
        let names: Vec<String> = survey
            .missing
            .iter()
            .map(|(c, n)| format!("{c}:{n}"))
            .collect();
        let _ = write!(detail, "; missing: {}", names.join(", "));
        verdict = Verdict::Warn;
        let cats: BTreeSet<&str> = survey.missing.iter().map(|(c, _)| *c).collect();
        for cat in cats {
            consequences.push(format!("no {cat}:*: {}", tracepoint_consequence(cat)));
        }
        if present == 0 {
            verdict = Verdict::Fail;
            consequences.push("no tracepoint at all: the agent does not start".into());
        }
    }
    match survey.trial {
        Ok(t) => {
            let _ = write!(detail, "; {t}");
        }
        Err(e) => {
            let _ = write!(detail, "; trial attach: {e}");
            verdict = Verdict::Fail;
            consequences.push(
                "the agent's tracepoint programs do not attach: the agent does not start".into(),
            );
        }
    }
    Check::new(
        "tracepoints",
        verdict,
        detail,
        (!consequences.is_empty()).then(|| consequences.join("; ")),
    )
}

// ---------------------------------------------------------------------------------------------
// Uprobes
// ---------------------------------------------------------------------------------------------

/// A library to try the OpenSSL uprobe on: a target's own (as the host sees it), else the
/// system's libssl.
fn uprobe_trial_target(targets: &[Check]) -> Option<(String, String)> {
    for t in targets {
        for p in &t.processes {
            if let Some(img) = p.tls.first() {
                return Some((
                    format!("/proc/{}/root{}", p.pid, img.path),
                    format!("{} (used by pid {})", img.path, p.pid),
                ));
            }
        }
    }
    let arch = std::env::consts::ARCH;
    let dirs = [
        format!("/usr/lib/{arch}-linux-gnu"),
        format!("/lib/{arch}-linux-gnu"),
        "/usr/lib64".to_string(),
        "/lib64".to_string(),
        "/usr/lib".to_string(),
    ];
    for d in &dirs {
        for lib in ["libssl.so.3", "libssl.so.1.1"] {
            let p = format!("{d}/{lib}");
            if Path::new(&p).exists() {
                return Some((p.clone(), p));
            }
        }
    }
    None
}

fn check_uprobes(
    ebpf: Option<&mut Ebpf>,
    targets: &[Check],
    wants: &Wants,
    kconfig: Option<&Kconfig>,
) -> Check {
    let lost = "no OpenSSL uprobes: TLS traffic is not captured (plaintext ports still are)";
    let paranoid = fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
        .map(|s| format!("perf_event_paranoid {} (CAP_PERFMON is exempt)", s.trim()))
        .unwrap_or_else(|e| format!("perf_event_paranoid unreadable: {e}"));
    let pmu = match fs::read_to_string(UPROBE_PMU) {
        Ok(t) => format!("uprobe PMU type {} ({UPROBE_PMU})", t.trim()),
        Err(e) => {
            let build = kconfig
                .map(|k| format!("; {}", k.describe("CONFIG_UPROBES")))
                .unwrap_or_default();
            return Check::new(
                "uprobes",
                Verdict::needed(wants.tls),
                format!("{UPROBE_PMU}: {e}{build}; {paranoid}"),
                Some(lost.into()),
            );
        }
    };
    let Some(ebpf) = ebpf else {
        return Check::new(
            "uprobes",
            Verdict::needed(wants.tls),
            format!("{pmu}; {paranoid}; {NO_OBJECT}"),
            Some(lost.into()),
        );
    };
    let Some((host_path, shown)) = uprobe_trial_target(targets) else {
        return Check::ok(
            "uprobes",
            format!("{pmu}; {paranoid}; no libssl on this host to try an attach on"),
        );
    };
    match trial_uprobe(ebpf, &host_path) {
        Ok(()) => Check::ok(
            "uprobes",
            format!("{pmu}; {paranoid}; openssl_ssl_read loaded and attached to SSL_read in {shown}, scoped to the doctor's own pid, then detached"),
        ),
        Err(e) => Check::new(
            "uprobes",
            Verdict::needed(wants.tls),
            format!("{pmu}; {paranoid}; trial attach to SSL_read in {shown}: {e}"),
            Some(lost.into()),
        ),
    }
}

fn trial_uprobe(ebpf: &mut Ebpf, target: &str) -> Result<(), TrialError> {
    const PROG: &str = "openssl_ssl_read";
    let p: &mut UProbe = trial_program(ebpf, PROG)?;
    p.load()
        .map_err(|source| TrialError::Load { name: PROG, source })?;
    let me = NonZeroU32::new(std::process::id()).expect("a pid is not 0");
    let link = p
        .attach("SSL_read", target, UProbeScope::OneProcess(me))
        .map_err(TrialError::AttachUprobe)?;
    p.detach(link)
        .map_err(|source| TrialError::Detach { name: PROG, source })
}

// ---------------------------------------------------------------------------------------------
// cgroup v2 and the egress filter
// ---------------------------------------------------------------------------------------------

fn check_cgroup(ebpf: Option<&mut Ebpf>, wants: &Wants) -> Check {
    let lost = "blocked connections cannot be dropped: enforcement is off (decisions are still made and recorded)";
    let root = match enforce::cgroup2_root() {
        Ok(r) => r,
        Err(e) => {
            return Check::new(
                "cgroup",
                Verdict::needed(wants.enforce),
                e.to_string(),
                Some(lost.into()),
            )
        }
    };
    let mode = if own_mounts("cgroup").is_empty() {
        "unified"
    } else {
        "hybrid: cgroup v1 hierarchies beside it"
    };
    let found = format!("cgroup v2 root at {} ({mode})", root.display());
    let Some(ebpf) = ebpf else {
        return Check::new(
            "cgroup",
            Verdict::needed(wants.enforce),
            format!("{found}; {NO_OBJECT}"),
            Some(lost.into()),
        );
    };
    match trial_cgroup_skb(ebpf, &root) {
        Ok(()) => Check::ok(
            "cgroup",
            format!("{found}; {} (cgroup_skb) loaded and attached to its egress as a BPF link, then detached", crate::capture::loader::ENFORCE_PROG),
        ),
        Err(e) => Check::new(
            "cgroup",
            Verdict::needed(wants.enforce),
            format!("{found}; trial: {e}"),
            Some(lost.into()),
        ),
    }
}

fn trial_cgroup_skb(ebpf: &mut Ebpf, root: &Path) -> Result<(), TrialError> {
    let name = crate::capture::loader::ENFORCE_PROG;
    let cgroup = fs::File::open(root).map_err(|source| TrialError::Open {
        path: root.to_path_buf(),
        source,
    })?;
    let p: &mut CgroupSkb = trial_program(ebpf, name)?;
    p.load()
        .map_err(|source| TrialError::Load { name, source })?;
    // As `Kernel::attach_enforce` does: a link, which runs beside any other program there.
    let link = p
        .attach(
            &cgroup,
            CgroupSkbAttachType::Egress,
            CgroupAttachMode::Single,
        )
        .map_err(|source| TrialError::Attach {
            name,
            to: format!("the egress of {}", root.display()),
            source,
        })?;
    p.detach(link)
        .map_err(|source| TrialError::Detach { name, source })
}

// ---------------------------------------------------------------------------------------------
// SOCK_DESTROY
// ---------------------------------------------------------------------------------------------

fn check_sock_destroy(kconfig: Option<&Kconfig>) -> Check {
    const OPT: &str = "CONFIG_INET_DIAG_DESTROY";
    let lost = "no SOCK_DESTROY: blocked connections are dropped but not reset (their clients wait for their own timeouts)";
    let build = kconfig.map(|k| (k.describe(OPT), k.get(OPT)));
    let prefix = build
        .as_ref()
        .map(|(d, _)| format!("{d}; "))
        .unwrap_or_else(|| "no kernel config in /proc/config.gz or /boot; ".into());
    match destroy_trial() {
        Ok(t) => Check::ok("sock_destroy", format!("{prefix}{t}")),
        Err(e) => Check::new(
            "sock_destroy",
            Verdict::Warn,
            format!("{prefix}trial: {e}"),
            Some(lost.into()),
        ),
    }
}

/// Opens a loopback connection of the doctor's own and resets it by its 4-tuple, as the agent
/// resets a blocked connection; the peer must see the reset.
fn destroy_trial() -> Result<String, TrialError> {
    fn io(what: &'static str) -> impl Fn(io::Error) -> TrialError {
        move |source| TrialError::Io { what, source }
    }
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("a loopback listener"))?;
    let client = TcpStream::connect(listener.local_addr().map_err(io("its address"))?)
        .map_err(io("a loopback connection"))?;
    let (server, peer) = listener.accept().map_err(io("accepting the connection"))?;
    let local = server
        .local_addr()
        .map_err(io("the server end's address"))?;
    enforce::destroy(local, peer)?;
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io("a read timeout"))?;
    let mut b = [0u8; 1];
    match (&client).read(&mut b) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(format!(
            "a trial SOCK_DESTROY reset a loopback connection of the doctor's own ({local} <-> {peer}): its peer saw ECONNRESET"
        )),
        Ok(n) => Err(TrialError::NotResetRead { local, peer, n }),
        Err(source) => Err(TrialError::NotReset {
            local,
            peer,
            source,
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// The configuration and its targets
// ---------------------------------------------------------------------------------------------

fn check_config(given: Option<&Path>) -> (Check, Option<Plan>) {
    let path = match given {
        Some(p) => p.to_path_buf(),
        None if Path::new(DEFAULT_CONFIG).exists() => PathBuf::from(DEFAULT_CONFIG),
        None => {
            return (
                Check::new(
                    "config",
                    Verdict::Warn,
                    format!("no --config given and {DEFAULT_CONFIG} does not exist"),
                    Some(
                        "the targets were not looked for; run `sparbar doctor --config FILE`"
                            .into(),
                    ),
                ),
                None,
            )
        }
    };
    let refused = |e: String| {
        (
            Check::new(
                "config",
                Verdict::Fail,
                e,
                Some("the agent refuses to start with this file".into()),
            ),
            None,
        )
    };
    let cfg = match config::load(&path) {
        Ok(c) => c,
        Err(e) => return refused(e.to_string()),
    };
    match Plan::from_config(&cfg) {
        Ok(plan) => (
            Check::ok(
                "config",
                format!(
                    "{}: valid; {} target(s); enforcement {}",
                    path.display(),
                    plan.targets.len(),
                    if plan.enforce { "on" } else { "off" }
                ),
            ),
            Some(plan),
        ),
        Err(e) => refused(format!("{}: {e}", path.display())),
    }
}

fn describe_matcher(m: &TargetMatch) -> String {
    match m {
        TargetMatch::Exe(p) => format!("exe {}", p.display()),
        TargetMatch::Comm(c) => format!("comm {c:?}"),
        TargetMatch::Cgroup(c) => format!("cgroup {c}"),
        TargetMatch::Pid(p) => format!("pid {p}"),
    }
}

/// The processes each target matches, as the agent's discovery would adopt them: direct
/// matches, then their descendants.
fn matching_processes(targets: &[TargetSpec]) -> BTreeMap<usize, Vec<discovery::ProcInfo>> {
    let me = std::process::id();
    let procs: Vec<discovery::ProcInfo> = fs::read_dir("/proc")
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
                .filter(|pid| *pid != me)
                .map(discovery::read_proc_info)
                .collect()
        })
        .unwrap_or_default();
    // The agent's own rule: a process matches by itself or through the parent it was forked
    // from; nothing is traced yet.
    let (found, _) = Discovery::new(targets.to_vec()).assign(procs, |_| None);
    let mut out: BTreeMap<usize, Vec<discovery::ProcInfo>> = BTreeMap::new();
    for a in found {
        out.entry(a.target).or_default().push(a.info);
    }
    for v in out.values_mut() {
        v.sort_by_key(|p| p.pid);
    }
    out
}

fn check_targets(targets: &[TargetSpec]) -> Vec<Check> {
    let mut procs = matching_processes(targets);
    targets
        .iter()
        .enumerate()
        .map(|(i, t)| check_target(t, procs.remove(&i).unwrap_or_default()))
        .collect()
}

fn check_target(t: &TargetSpec, procs: Vec<discovery::ProcInfo>) -> Check {
    let name = format!("target {}", t.name);
    let what = describe_matcher(&t.matcher);
    if procs.is_empty() {
        return Check::new(
            &name,
            Verdict::Warn,
            format!("{what}: no running process matches"),
            Some("nothing of it is traced until one appears (the agent attaches then)".into()),
        );
    }
    let processes: Vec<TargetProcess> = procs
        .into_iter()
        .map(|p| TargetProcess {
            tls: if t.tls {
                discovery::tls_images(p.pid)
                    .into_iter()
                    .map(|(path, kind)| TlsImage { path, kind })
                    .collect()
            } else {
                Vec::new()
            },
            pid: p.pid,
            name: p.name,
            executable: p.executable,
        })
        .collect();
    let pids: Vec<String> = processes
        .iter()
        .map(|p| format!("{} ({})", p.pid, p.name))
        .collect();
    let mut detail = format!("{what}: matches pid {}", pids.join(", "));
    let mut verdict = Verdict::Ok;
    let mut consequences = Vec::new();
    if t.tls {
        // Each image once, with the processes that map it.
        let mut images: BTreeMap<(&str, &str), Vec<u32>> = BTreeMap::new();
        for p in &processes {
            for img in &p.tls {
                images
                    .entry((img.path.as_str(), img.kind))
                    .or_default()
                    .push(p.pid);
            }
        }
        for ((path, kind), pids) in &images {
            let _ = write!(detail, "; {kind} {path}");
            let host = format!("/proc/{}/root{path}", pids[0]);
            if !discovery::exports_ssl(Path::new(&host)) {
                verdict = Verdict::Warn;
                let _ = write!(detail, " (defines no SSL_read)");
                consequences.push(format!(
                    "{path} defines no SSL_read to attach to: the TLS traffic through it is not captured"
                ));
            }
        }
        let without: Vec<String> = processes
            .iter()
            .filter(|p| p.tls.is_empty())
            .map(|p| p.pid.to_string())
            .collect();
        if !without.is_empty() {
            verdict = Verdict::Warn;
            let _ = write!(
                detail,
                "; no OpenSSL in pid {} (no libssl mapped, no SSL_read in the executable)",
                without.join(", ")
            );
            consequences.push(format!(
                "the TLS traffic of pid {} is not captured",
                without.join(", ")
            ));
        }
    } else {
        detail.push_str("; TLS not traced (tls = false)");
    }
    // QUIC (HTTP/3) runs over UDP with its own TLS: no OpenSSL read or write carries it.
    for p in &processes {
        let udp = procfs::udp_listening_ports(p.pid);
        if !udp.is_empty() {
            verdict = Verdict::Warn;
            let ports: Vec<String> = udp.iter().map(u16::to_string).collect();
            let _ = write!(
                detail,
                "; pid {} listens on UDP port {}",
                p.pid,
                ports.join(", ")
            );
            consequences.push(
                "if that is QUIC (an edge offering HTTP/3), what clients send over it is not seen: \
                 no uprobe on OpenSSL reads QUIC, so those requests are neither recorded nor \
                 blocked; turn HTTP/3 off at the edge (nginx: no `listen ... quic`, no Alt-Svc \
                 h3) to keep them on HTTP/1.1 or HTTP/2"
                    .to_string(),
            );
        }
    }
    let mut c = Check::new(
        &name,
        verdict,
        detail,
        (!consequences.is_empty()).then(|| consequences.join("; ")),
    );
    c.processes = processes;
    c
}

#[cfg(test)]
#[path = "doctor_tests.rs"]
mod tests;
