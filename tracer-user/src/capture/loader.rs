//! Loads the embedded eBPF object, writes the kernel-side configuration and attaches the
//! tracepoints. Uprobes on OpenSSL are attached later, per library, by `discovery`.
//!
//! Failing to attach one hook is reported plainly and the agent keeps what did attach.
//!
//! The enforcement filter (`enforce_egress`) is attached only when asked, by
//! [`Kernel::attach_enforce`]; if that fails the agent keeps tracing without blocking.

use std::{
    collections::BTreeMap,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, TracePoint, UProbe},
    Ebpf, EbpfLoader,
};
use aya_log::EbpfLogger;
use log::{debug, info, warn};
use tracer_common::*;

use crate::{
    enforce::{self, EnforceError},
    exchange::Tuple,
};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("loading the eBPF programs failed: {0} (is this kernel built with BPF, BTF and uprobes, and is the agent root or holding CAP_BPF+CAP_PERFMON?)")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF map {0} is missing from the object: the build is broken")]
    MissingMap(&'static str),
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("no tracepoint could be attached; see the errors above")]
    NothingAttached,
    #[error("reading a random token-hash seed from /dev/urandom: {0}")]
    Seed(std::io::Error),
}

/// The settings the loader needs, extracted from the validated config.
#[derive(Debug, Clone)]
pub struct LoadSettings {
    pub ring_buffer_size: u32,
    pub max_connections: u32,
    pub max_message_bytes: u32,
    pub plaintext_ports: Vec<u16>,
    pub comms: Vec<String>,
    pub cgroup_ids: Vec<u64>,
}

/// The tracepoints and the programs behind them: (program, category, name).
pub const TRACEPOINTS: &[(&str, &str, &str)] = &[
    ("socket_enter_read", "syscalls", "sys_enter_read"),
    ("socket_exit_read", "syscalls", "sys_exit_read"),
    ("socket_enter_write", "syscalls", "sys_enter_write"),
    ("socket_exit_write", "syscalls", "sys_exit_write"),
    ("socket_enter_recvfrom", "syscalls", "sys_enter_recvfrom"),
    ("socket_exit_recvfrom", "syscalls", "sys_exit_recvfrom"),
    ("socket_enter_sendto", "syscalls", "sys_enter_sendto"),
    ("socket_exit_sendto", "syscalls", "sys_exit_sendto"),
    ("socket_enter_readv", "syscalls", "sys_enter_readv"),
    ("socket_exit_readv", "syscalls", "sys_exit_readv"),
    ("socket_enter_writev", "syscalls", "sys_enter_writev"),
    ("socket_exit_writev", "syscalls", "sys_exit_writev"),
    ("socket_enter_recvmsg", "syscalls", "sys_enter_recvmsg"),
    ("socket_exit_recvmsg", "syscalls", "sys_exit_recvmsg"),
    ("socket_enter_sendmsg", "syscalls", "sys_enter_sendmsg"),
    ("socket_exit_sendmsg", "syscalls", "sys_exit_sendmsg"),
    ("socket_enter_sendfile", "syscalls", "sys_enter_sendfile64"),
    ("socket_exit_sendfile", "syscalls", "sys_exit_sendfile64"),
    ("socket_exit_accept", "syscalls", "sys_exit_accept"),
    ("socket_exit_accept4", "syscalls", "sys_exit_accept4"),
    ("socket_enter_connect", "syscalls", "sys_enter_connect"),
    ("socket_enter_close", "syscalls", "sys_enter_close"),
    ("socket_sock_recv", "sock", "sock_recv_length"),
    ("socket_sock_send", "sock", "sock_send_length"),
    ("process_fork", "sched", "sched_process_fork"),
    ("process_exec", "sched", "sched_process_exec"),
    ("process_exit", "sched", "sched_process_exit"),
];

/// Uprobe programs: (program, symbol, is return probe, required).
pub const SSL_PROBES: &[(&str, &str, bool, bool)] = &[
    ("openssl_ssl_read", "SSL_read", false, true),
    ("openssl_ssl_rw_ret", "SSL_read", true, true),
    ("openssl_ssl_write", "SSL_write", false, true),
    ("openssl_ssl_rw_ret", "SSL_write", true, true),
    ("openssl_ssl_read_ex", "SSL_read_ex", false, false),
    ("openssl_ssl_rw_ret", "SSL_read_ex", true, false),
    ("openssl_ssl_write_ex", "SSL_write_ex", false, false),
    ("openssl_ssl_rw_ret", "SSL_write_ex", true, false),
    ("openssl_ssl_set_fd", "SSL_set_fd", false, false),
    ("openssl_ssl_free", "SSL_free", false, false),
];

/// The cgroup_skb egress program that drops the packets of blocked connections.
pub const ENFORCE_PROG: &str = "enforce_egress";

pub struct Kernel {
    pub ebpf: Ebpf,
    /// Attach results, "category:name" → error text (None when attached).
    pub tracepoints: BTreeMap<String, Option<String>>,
    /// The cgroup `enforce_egress` is attached to, once it is.
    enforce_cgroup: Option<PathBuf>,
    /// Seed of `tracer_common::token_hash` for this run, also in `TOKEN_CTL`.
    token_seed: u64,
    /// Tenant patterns are set: the kernel checks sessions' requests (`set_token_patterns`).
    tenant_checks: bool,
    /// Forwards the programs' aya-log messages while the programs live (None: not forwarded).
    _kernel_log: Option<KernelLog>,
}

/// A fresh random seed for the token hashes, so they mean nothing outside this run.
fn random_seed() -> Result<u64, LoadError> {
    use std::io::Read as _;
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(LoadError::Seed)?;
    Ok(u64::from_ne_bytes(b))
}

/// Where the agent expects tracefs, and mounts it when it is not there.
pub const TRACEFS: &str = "/sys/kernel/tracing";

/// Mounts tracefs at [`TRACEFS`] when it is not there; tracepoints need it.
pub fn ensure_tracefs() {
    if Path::new(TRACEFS).join("events").exists() {
        return;
    }
    let target = c"/sys/kernel/tracing";
    // SAFETY: mount(2) with valid NUL-terminated strings and no data.
    let rc = unsafe {
        libc::mount(
            c"tracefs".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        info!("tracefs was not mounted; mounted it at /sys/kernel/tracing");
    } else {
        warn!(
            "tracefs is not mounted and mounting it at /sys/kernel/tracing failed: {}; tracepoints will not attach",
            std::io::Error::last_os_error()
        );
    }
}

fn raise_memlock() {
    let lim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) } != 0 {
        debug!("raising RLIMIT_MEMLOCK failed ({}); harmless where BPF memory is charged to the memory cgroup", std::io::Error::last_os_error());
    }
}

pub fn load(s: &LoadSettings) -> Result<Kernel, LoadError> {
    raise_memlock();
    ensure_tracefs();
    let obj = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer-ebpf"));
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(MAP_EVENTS, s.ring_buffer_size)
        .map_max_entries(MAP_CONNS, s.max_connections)
        .override_global(aya_log::LEVEL, &kernel_log_level(), false)
        .load(obj)?;
    let kernel_log = KernelLog::start(&mut ebpf);

    let (off_daddr, off_saddr) = crate::capture::btf::sock_common_v6_offsets();
    let kcfg = KernelConfig {
        agent_tgid: std::process::id(),
        max_message_bytes: s.max_message_bytes,
        flags: if s.cgroup_ids.is_empty() {
            0
        } else {
            CFG_F_CGROUP_TARGETS
        },
        off_v6_daddr: off_daddr,
        off_v6_rcv_saddr: off_saddr,
        wakeup_bytes: s.ring_buffer_size / 8,
        _pad: 0,
    };
    {
        let mut a: Array<_, KernelConfig> = map(&mut ebpf, MAP_CONFIG)?;
        a.set(0, kcfg, 0).map_err(|e| LoadError::Map {
            name: MAP_CONFIG,
            source: e,
        })?;
    }
    let token_seed = random_seed()?;
    {
        let mut a: Array<_, TokenCtl> = map(&mut ebpf, MAP_TOKEN_CTL)?;
        let ctl = TokenCtl {
            seed: token_seed,
            on: 0,
            _pad: 0,
        };
        a.set(0, ctl, 0).map_err(|e| LoadError::Map {
            name: MAP_TOKEN_CTL,
            source: e,
        })?;
    }
    write_filters(&mut ebpf, s)?;

    let mut tracepoints = BTreeMap::new();
    for (prog, category, name) in TRACEPOINTS {
        let res = attach_tracepoint(&mut ebpf, prog, category, name);
        if let Err(e) = &res {
            warn!(
                "could not attach tracepoint {category}:{name}: {e}; what it sees is not captured"
            );
        }
        tracepoints.insert(
            format!("{category}:{name}"),
            res.err().map(|e| e.to_string()),
        );
    }
    if tracepoints.values().all(Option::is_some) {
        return Err(LoadError::NothingAttached);
    }
    for (prog, ..) in SSL_PROBES {
        let p: &mut UProbe = program(&mut ebpf, prog)?;
        if p.fd().is_err() {
            p.load().map_err(|e| LoadError::Program {
                name: prog,
                source: e,
            })?;
        }
    }
    Ok(Kernel {
        ebpf,
        tracepoints,
        enforce_cgroup: None,
        token_seed,
        tenant_checks: false,
        _kernel_log: kernel_log,
    })
}

/// Why one tracepoint could not be attached (the others still are).
#[derive(Debug, thiserror::Error)]
enum AttachError {
    #[error(transparent)]
    Program(#[from] LoadError),
    #[error("load: {0}")]
    Load(aya::programs::ProgramError),
    #[error("attach: {0}")]
    Attach(aya::programs::ProgramError),
}

fn attach_tracepoint(
    ebpf: &mut Ebpf,
    prog: &'static str,
    category: &str,
    name: &str,
) -> Result<(), AttachError> {
    let p: &mut TracePoint = program(ebpf, prog)?;
    p.load().map_err(AttachError::Load)?;
    p.attach(category, name).map_err(AttachError::Attach)?;
    Ok(())
}

pub fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or(LoadError::Program {
        name,
        source: aya::programs::ProgramError::UnexpectedProgramType,
    })?;
    p.try_into()
        .map_err(|e| LoadError::Program { name, source: e })
}

pub fn map<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
{
    let m = ebpf.map_mut(name).ok_or(LoadError::MissingMap(name))?;
    T::try_from(m).map_err(|e| LoadError::Map { name, source: e })
}

/// Writes which processes and ports are traced (plaintext ports, target comms caught at exec,
/// target cgroups), replacing what the maps held: at load, and again at a reload.
fn write_filters(ebpf: &mut Ebpf, s: &LoadSettings) -> Result<(), LoadError> {
    let err = |name| move |e| LoadError::Map { name, source: e };
    {
        let mut m: BpfHashMap<_, u16, u32> = map(ebpf, MAP_PLAIN_PORTS)?;
        let old: Vec<u16> = m.keys().filter_map(Result::ok).collect();
        for p in old.iter().filter(|p| !s.plaintext_ports.contains(p)) {
            m.remove(p).map_err(err(MAP_PLAIN_PORTS))?;
        }
        for p in &s.plaintext_ports {
            m.insert(p, 1, 0).map_err(err(MAP_PLAIN_PORTS))?;
        }
    }
    {
        let mut m: BpfHashMap<_, [u8; COMM_LEN], u32> = map(ebpf, MAP_TARGET_COMMS)?;
        let want: Vec<[u8; COMM_LEN]> = s.comms.iter().map(|c| comm_key(c)).collect();
        let old: Vec<[u8; COMM_LEN]> = m.keys().filter_map(Result::ok).collect();
        for c in old.iter().filter(|c| !want.contains(c)) {
            m.remove(c).map_err(err(MAP_TARGET_COMMS))?;
        }
        for c in &want {
            m.insert(c, 1, 0).map_err(err(MAP_TARGET_COMMS))?;
        }
    }
    {
        let mut m: BpfHashMap<_, u64, u32> = map(ebpf, MAP_TARGET_CGRPS)?;
        let old: Vec<u64> = m.keys().filter_map(Result::ok).collect();
        for id in old.iter().filter(|id| !s.cgroup_ids.contains(id)) {
            m.remove(id).map_err(err(MAP_TARGET_CGRPS))?;
        }
        for id in &s.cgroup_ids {
            m.insert(id, 1, 0).map_err(err(MAP_TARGET_CGRPS))?;
        }
    }
    let mut a: Array<_, KernelConfig> = map(ebpf, MAP_CONFIG)?;
    let mut k = a.get(&0, 0).map_err(err(MAP_CONFIG))?;
    if s.cgroup_ids.is_empty() {
        k.flags &= !CFG_F_CGROUP_TARGETS;
    } else {
        k.flags |= CFG_F_CGROUP_TARGETS;
    }
    a.set(0, k, 0).map_err(err(MAP_CONFIG))
}

pub fn comm_key(c: &str) -> [u8; COMM_LEN] {
    let mut k = [0u8; COMM_LEN];
    let b = c.as_bytes();
    let n = b.len().min(COMM_LEN - 1);
    k[..n].copy_from_slice(&b[..n]);
    k
}

impl Kernel {
    /// A reload: the traced ports, comms and cgroups become those of `s` (sizes and limits
    /// fixed at load are not changed).
    pub fn set_filters(&mut self, s: &LoadSettings) -> Result<(), LoadError> {
        write_filters(&mut self.ebpf, s)
    }

    /// The first step of a stop: detaches and unloads every capture program (tracepoints and
    /// OpenSSL uprobes), so nothing more enters the ring buffer and a final read of it sees
    /// everything the kernel captured. Maps (counters, the ring buffer) and the enforcement
    /// filter stay until the agent exits. Returns how many programs were unloaded.
    pub fn stop_capture(&mut self) -> usize {
        let mut names: Vec<&'static str> = TRACEPOINTS
            .iter()
            .map(|(p, ..)| *p)
            .chain(SSL_PROBES.iter().map(|(p, ..)| *p))
            .collect();
        names.sort_unstable();
        names.dedup();
        let mut unloaded = 0;
        for name in names {
            let Some(p) = self.ebpf.program_mut(name) else {
                continue;
            };
            let res = match p {
                aya::programs::Program::TracePoint(t) => t.unload(),
                aya::programs::Program::UProbe(u) => u.unload(),
                _ => continue,
            };
            match res {
                Ok(()) => unloaded += 1,
                // A program that never loaded (its attach failed earlier) has nothing to undo.
                Err(aya::programs::ProgramError::NotLoaded) => {}
                Err(e) => warn!("stopping capture: unloading {name}: {e}"),
            }
        }
        unloaded
    }

    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, LoadError> {
        let m = self
            .ebpf
            .take_map(MAP_EVENTS)
            .ok_or(LoadError::MissingMap(MAP_EVENTS))?;
        RingBuf::try_from(m).map_err(|e| LoadError::Map {
            name: MAP_EVENTS,
            source: e,
        })
    }

    /// The kernel counters summed over CPUs, indexed as in tracer-common.
    pub fn counters(&self) -> Vec<u64> {
        let mut out = vec![0u64; COUNTER_MAX as usize];
        let Some(m) = self.ebpf.map(MAP_COUNTERS) else {
            return out;
        };
        let Ok(a) = PerCpuArray::<_, u64>::try_from(m) else {
            return out;
        };
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(v) = a.get(&(i as u32), 0) {
                *slot = v.iter().sum();
            }
        }
        out
    }

    pub fn add_target(&mut self, tgid: u32) -> Result<(), LoadError> {
        let mut m: BpfHashMap<_, u32, u32> = map(&mut self.ebpf, MAP_TARGET_TGIDS)?;
        m.insert(tgid, TARGET_FROM_AGENT, 0)
            .map_err(|e| LoadError::Map {
                name: MAP_TARGET_TGIDS,
                source: e,
            })
    }

    pub fn remove_target(&mut self, tgid: u32) {
        if let Ok(mut m) = map::<BpfHashMap<_, u32, u32>>(&mut self.ebpf, MAP_TARGET_TGIDS) {
            let _ = m.remove(&tgid);
        }
    }

    /// Target tgids the kernel currently knows (including those it added on fork/exec).
    pub fn targets(&mut self) -> Vec<u32> {
        match map::<BpfHashMap<_, u32, u32>>(&mut self.ebpf, MAP_TARGET_TGIDS) {
            Ok(m) => m.keys().filter_map(Result::ok).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Removes connection-table entries of processes that no longer exist.
    pub fn prune_conns(&mut self, alive: impl Fn(u32) -> bool) -> usize {
        let Ok(mut m) = map::<BpfHashMap<_, ConnKey, ConnState>>(&mut self.ebpf, MAP_CONNS) else {
            return 0;
        };
        let dead: Vec<ConnKey> = m
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !alive(k.tgid))
            .collect();
        for k in &dead {
            let _ = m.remove(k);
        }
        dead.len()
    }

    /// Loads `enforce_egress` and attaches it to the egress of the cgroup v2 root, where it sees
    /// every socket's packets; returns that cgroup's path. It is attached as a BPF link (kernel
    /// 5.7+), which runs beside any other program on the cgroup or below it and is detached when
    /// the agent exits. Until a connection is blocked it costs each packet one array lookup. An
    /// error leaves tracing untouched; calling this again once attached does nothing.
    pub fn attach_enforce(&mut self) -> Result<PathBuf, EnforceError> {
        if let Some(p) = &self.enforce_cgroup {
            return Ok(p.clone());
        }
        let root = enforce::cgroup2_root()?;
        let cgroup = std::fs::File::open(&root).map_err(|e| EnforceError::Cgroup {
            path: root.clone(),
            source: e,
        })?;
        let prog: &mut CgroupSkb = self
            .ebpf
            .program_mut(ENFORCE_PROG)
            .ok_or(EnforceError::MissingProgram(ENFORCE_PROG))?
            .try_into()
            .map_err(|e| EnforceError::Load {
                name: ENFORCE_PROG,
                source: e,
            })?;
        if prog.fd().is_err() {
            prog.load().map_err(|e| EnforceError::Load {
                name: ENFORCE_PROG,
                source: e,
            })?;
        }
        prog.attach(
            &cgroup,
            CgroupSkbAttachType::Egress,
            // Links take no flags; they always allow other programs (multi-attach).
            CgroupAttachMode::Single,
        )
        .map_err(|e| EnforceError::Attach {
            name: ENFORCE_PROG,
            cgroup: root.clone(),
            source: e,
        })?;
        self.enforce_cgroup = Some(root.clone());
        let on = self.blocked_conns() > 0;
        self.set_enforce_on(on)?;
        info!(
            "enforcement filter attached to the egress of cgroup {}",
            root.display()
        );
        Ok(root)
    }

    /// Whether `attach_enforce` succeeded.
    pub fn enforcing(&self) -> bool {
        self.enforce_cgroup.is_some()
    }

    /// Drops every further egress packet of the TCP connection `t` (local = this host's end),
    /// except a reset. IPv4-mapped IPv6 addresses are read as IPv4. Blocking a blocked
    /// connection again is not an error.
    pub fn block_conn(&mut self, t: Tuple) -> Result<(), EnforceError> {
        if self.enforce_cgroup.is_none() {
            return Err(EnforceError::NotAttached {
                local: t.local,
                peer: t.peer,
            });
        }
        let key = enforce::block_key(&t)?;
        let mut m = block_map(&mut self.ebpf)?;
        m.insert(key, 0, 0).map_err(|e| match &e {
            aya::maps::MapError::SyscallError(s)
                if s.io_error.raw_os_error() == Some(libc::E2BIG) =>
            {
                enforce::table_full(&t)
            }
            _ => EnforceError::Map {
                name: MAP_BLOCK_CONNS,
                source: e,
            },
        })?;
        self.set_enforce_on(true)
    }

    /// Lets the packets of connection `t` through again; `Ok(false)` if it was not blocked.
    pub fn unblock_conn(&mut self, t: Tuple) -> Result<bool, EnforceError> {
        let key = enforce::block_key(&t)?;
        let mut m = block_map(&mut self.ebpf)?;
        let removed = match m.remove(&key) {
            Ok(()) => true,
            Err(aya::maps::MapError::SyscallError(s))
                if s.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                false
            }
            Err(e) => {
                return Err(EnforceError::Map {
                    name: MAP_BLOCK_CONNS,
                    source: e,
                })
            }
        };
        let empty = m.keys().next().is_none();
        if empty {
            self.set_enforce_on(false)?;
            // The kernel adds entries itself on a token hit (entry first, then the flag): one
            // that came between the look and the store above must not be left unenforced.
            if self.blocked_conns() > 0 {
                self.set_enforce_on(true)?;
            }
        }
        Ok(removed)
    }

    /// The seed of `tracer_common::token_hash` the kernel uses in this run (random, from
    /// /dev/urandom at load, unless `set_token_seed` replaced it). Hash a token with it to
    /// block it.
    pub fn token_seed(&self) -> u64 {
        self.token_seed
    }

    /// Uses `seed` for token hashes from now on (before any token is blocked or session
    /// handed over: the agent derives it from its secret, so the hashes it keeps of sessions
    /// stay valid across restarts).
    pub fn set_token_seed(&mut self, seed: u64) -> Result<(), EnforceError> {
        self.token_seed = seed;
        let on = self.tenant_checks || self.blocked_tokens() > 0;
        self.set_token_scan(on)
    }

    /// The patterns after which the kernel looks for tokens in what an edge process reads, e.g.
    /// `skolsid=`, `Bearer `, `username=`, `"username":"`, compiled into the kernel's streaming
    /// matcher (`enforce::token_patterns` says how each is matched), with the routes' tenant
    /// patterns (`tenant`, empty when no rule blocks cross-tenant attempts). Replaces the
    /// previous set; at most `MAX_TOKEN_PATS` patterns of 1 to `TOKEN_PAT_LEN` bytes. With tenant
    /// patterns the kernel scans every request of an edge (it checks the sessions of
    /// `set_session_tenant`), else only while a token is blocked.
    pub fn set_token_patterns(
        &mut self,
        pats: &[Vec<u8>],
        tenant: &[(Vec<u8>, u8)],
    ) -> Result<(), EnforceError> {
        let tables = enforce::token_patterns(pats, tenant)?;
        let m = self
            .ebpf
            .map_mut(MAP_TOKEN_TABLES)
            .ok_or(EnforceError::MissingMap(MAP_TOKEN_TABLES))?;
        let mut a = Array::<_, tracer_common::scan::ScanTables>::try_from(m).map_err(|e| {
            EnforceError::Map {
                name: MAP_TOKEN_TABLES,
                source: e,
            }
        })?;
        a.set(0, tables, 0).map_err(|e| EnforceError::Map {
            name: MAP_TOKEN_TABLES,
            source: e,
        })?;
        self.tenant_checks = !tenant.is_empty();
        let on = self.tenant_checks || self.blocked_tokens() > 0;
        self.set_token_scan(on)
    }

    /// Whether the kernel checks sessions' requests for cross-tenant attempts (tenant patterns
    /// are set).
    pub fn tenant_checks(&self) -> bool {
        self.tenant_checks
    }

    /// The kernel refuses, from now on, a request carrying session token `hash` (its
    /// `tracer_common::token_hash`) whose request line names another tenant than the one hashed
    /// `tenant` (`tracer_common::tenant_hash`), as it refuses a blocked token's. The table is
    /// LRU: the least recently used session goes when it is full.
    pub fn set_session_tenant(&mut self, hash: u64, tenant: u64) -> Result<(), EnforceError> {
        let m = self
            .ebpf
            .map_mut(MAP_SESSION_TENANTS)
            .ok_or(EnforceError::MissingMap(MAP_SESSION_TENANTS))?;
        let mut m = BpfHashMap::<_, u64, u64>::try_from(m).map_err(|e| EnforceError::Map {
            name: MAP_SESSION_TENANTS,
            source: e,
        })?;
        m.insert(hash, tenant, 0).map_err(|e| EnforceError::Map {
            name: MAP_SESSION_TENANTS,
            source: e,
        })
    }

    /// Makes process `tgid` an edge process (`on`), whose reads are scanned for blocked tokens,
    /// or not. Its children forked from now on inherit it. Only a traced process (a target) is
    /// scanned, and only the platform's edge should be: never an application behind it, whose
    /// connection from the edge carries many users' requests.
    pub fn set_edge_tgid(&mut self, tgid: u32, on: bool) -> Result<(), EnforceError> {
        let m = self
            .ebpf
            .map_mut(MAP_ENFORCE_TGIDS)
            .ok_or(EnforceError::MissingMap(MAP_ENFORCE_TGIDS))?;
        let mut m = BpfHashMap::<_, u32, u32>::try_from(m).map_err(|e| EnforceError::Map {
            name: MAP_ENFORCE_TGIDS,
            source: e,
        })?;
        let res = if on {
            m.insert(tgid, TARGET_FROM_AGENT, 0)
        } else {
            m.remove(&tgid)
        };
        match res {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::SyscallError(s)) if !on && is_errno(&s, libc::ENOENT) => {
                Ok(())
            }
            Err(aya::maps::MapError::SyscallError(s)) if on && is_errno(&s, libc::E2BIG) => {
                Err(EnforceError::EdgeTableFull {
                    max: MAX_ENFORCE_TGIDS,
                    tgid,
                })
            }
            Err(e) => Err(EnforceError::Map {
                name: MAP_ENFORCE_TGIDS,
                source: e,
            }),
        }
    }

    /// Edge processes the kernel currently knows (including children it added at fork).
    pub fn edge_tgids(&self) -> Vec<u32> {
        let Some(m) = self.ebpf.map(MAP_ENFORCE_TGIDS) else {
            return Vec::new();
        };
        match BpfHashMap::<_, u32, u32>::try_from(m) {
            Ok(m) => m.keys().filter_map(Result::ok).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Refuses, from now on, every request an edge process reads that carries a token whose
    /// `tracer_common::token_hash(self.token_seed(), token)` is `hash`, on any connection: the
    /// kernel puts that connection into the blocked-connection table (its responses are
    /// dropped) and reports a `KIND_ENFORCE_HIT` event. Needs the egress filter attached.
    /// Blocking a blocked token again is not an error.
    pub fn block_token(&mut self, hash: u64) -> Result<(), EnforceError> {
        if self.enforce_cgroup.is_none() {
            return Err(EnforceError::TokensNotAttached { hash });
        }
        let mut m = token_map(&mut self.ebpf)?;
        m.insert(hash, 0, 0).map_err(|e| match &e {
            aya::maps::MapError::SyscallError(s) if is_errno(s, libc::E2BIG) => {
                EnforceError::TokenTableFull {
                    max: MAX_BLOCKED_TOKENS,
                    hash,
                }
            }
            _ => EnforceError::Map {
                name: MAP_BLOCK_TOKENS,
                source: e,
            },
        })?;
        self.set_token_scan(true)
    }

    /// Stops refusing requests with token `hash`; `Ok(false)` if it was not blocked. Connections
    /// the kernel already blocked on it stay blocked until `unblock_conn`.
    pub fn unblock_token(&mut self, hash: u64) -> Result<bool, EnforceError> {
        let mut m = token_map(&mut self.ebpf)?;
        let removed = match m.remove(&hash) {
            Ok(()) => true,
            Err(aya::maps::MapError::SyscallError(s)) if is_errno(&s, libc::ENOENT) => false,
            Err(e) => {
                return Err(EnforceError::Map {
                    name: MAP_BLOCK_TOKENS,
                    source: e,
                })
            }
        };
        if m.keys().next().is_none() && !self.tenant_checks {
            self.set_token_scan(false)?;
        }
        Ok(removed)
    }

    /// Tokens blocked right now (walks the kernel table: one syscall per entry).
    pub fn blocked_tokens(&self) -> usize {
        let Some(m) = self.ebpf.map(MAP_BLOCK_TOKENS) else {
            return 0;
        };
        match BpfHashMap::<_, u64, BlockTokenValue>::try_from(m) {
            Ok(m) => m.keys().filter(Result::is_ok).count(),
            Err(_) => 0,
        }
    }

    /// Turns the kernel's token scan on or off (`TOKEN_CTL[0].on`), keeping the seed.
    fn set_token_scan(&mut self, on: bool) -> Result<(), EnforceError> {
        let ctl = TokenCtl {
            seed: self.token_seed,
            on: on as u32,
            _pad: 0,
        };
        let m = self
            .ebpf
            .map_mut(MAP_TOKEN_CTL)
            .ok_or(EnforceError::MissingMap(MAP_TOKEN_CTL))?;
        let mut a = Array::<_, TokenCtl>::try_from(m).map_err(|e| EnforceError::Map {
            name: MAP_TOKEN_CTL,
            source: e,
        })?;
        a.set(0, ctl, 0).map_err(|e| EnforceError::Map {
            name: MAP_TOKEN_CTL,
            source: e,
        })
    }

    /// Connections blocked right now (walks the kernel table: one syscall per entry).
    pub fn blocked_conns(&self) -> usize {
        let Some(m) = self.ebpf.map(MAP_BLOCK_CONNS) else {
            return 0;
        };
        match BpfHashMap::<_, BlockKey, BlockValue>::try_from(m) {
            Ok(m) => m.keys().filter(Result::is_ok).count(),
            Err(_) => 0,
        }
    }

    fn set_enforce_on(&mut self, on: bool) -> Result<(), EnforceError> {
        let m = self
            .ebpf
            .map_mut(MAP_ENFORCE_ON)
            .ok_or(EnforceError::MissingMap(MAP_ENFORCE_ON))?;
        let mut a = Array::<_, u32>::try_from(m).map_err(|e| EnforceError::Map {
            name: MAP_ENFORCE_ON,
            source: e,
        })?;
        a.set(ENFORCE_ON_IDX, on as u32, 0)
            .map_err(|e| EnforceError::Map {
                name: MAP_ENFORCE_ON,
                source: e,
            })
    }
}

fn is_errno(e: &aya::sys::SyscallError, errno: i32) -> bool {
    e.io_error.raw_os_error() == Some(errno)
}

fn token_map(
    ebpf: &mut Ebpf,
) -> Result<BpfHashMap<&mut MapData, u64, BlockTokenValue>, EnforceError> {
    let m = ebpf
        .map_mut(MAP_BLOCK_TOKENS)
        .ok_or(EnforceError::MissingMap(MAP_BLOCK_TOKENS))?;
    BpfHashMap::try_from(m).map_err(|e| EnforceError::Map {
        name: MAP_BLOCK_TOKENS,
        source: e,
    })
}

fn block_map(
    ebpf: &mut Ebpf,
) -> Result<BpfHashMap<&mut MapData, BlockKey, BlockValue>, EnforceError> {
    let m = ebpf
        .map_mut(MAP_BLOCK_CONNS)
        .ok_or(EnforceError::MissingMap(MAP_BLOCK_CONNS))?;
    BpfHashMap::try_from(m).map_err(|e| EnforceError::Map {
        name: MAP_BLOCK_CONNS,
        source: e,
    })
}

/// The `log` target of the kernel programs' aya-log messages (set by the programs themselves,
/// tracer-ebpf's `diag`): `RUST_LOG=sparbar::kernel=off` silences them, `=debug` shows all.
pub const KERNEL_LOG_TARGET: &str = "sparbar::kernel";

/// aya-log's in-kernel level (`AYA_LOG_LEVEL`) from the agent's own log filter for
/// [`KERNEL_LOG_TARGET`]: a message the filter would drop is never written in the kernel.
fn kernel_log_level() -> u8 {
    use log::Level;
    let max = [
        Level::Trace,
        Level::Debug,
        Level::Info,
        Level::Warn,
        Level::Error,
    ]
    .into_iter()
    .find(|l| log::log_enabled!(target: KERNEL_LOG_TARGET, *l));
    let level = match max {
        None => return 0,
        Some(Level::Error) => aya_log::Level::Error,
        Some(Level::Warn) => aya_log::Level::Warn,
        Some(Level::Info) => aya_log::Level::Info,
        Some(Level::Debug) => aya_log::Level::Debug,
        Some(Level::Trace) => aya_log::Level::Trace,
    };
    level.into()
}

/// Hands the kernel programs' aya-log messages to the agent's logger, from a thread that sleeps
/// in poll(2) on aya-log's ring buffer until the kernel writes one; it stops within a second of
/// the drop. The logger (the map's fd, which the programs refer to) lives as long as the
/// [`Kernel`], whatever becomes of the thread.
struct KernelLog {
    logger: Arc<Mutex<EbpfLogger<&'static dyn log::Log>>>,
    stop: Arc<AtomicBool>,
}

impl KernelLog {
    /// Not fatal: without it the programs run the same, their messages are just not shown
    /// (and an object without log statements has no aya-log map at all).
    fn start(ebpf: &mut Ebpf) -> Option<Self> {
        let logger = match EbpfLogger::init(ebpf) {
            Ok(l) => l,
            Err(e) => {
                debug!("kernel log messages are not forwarded: {e}");
                return None;
            }
        };
        let fd = logger.as_raw_fd();
        let log = KernelLog {
            logger: Arc::new(Mutex::new(logger)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (logger, stop) = (log.logger.clone(), log.stop.clone());
        let run = move || {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: poll(2) on one pollfd that lives across the call; `fd` stays open
                // while `logger` does.
                if unsafe { libc::poll(&mut pfd, 1, 1000) } > 0 {
                    match logger.lock() {
                        Ok(mut l) => l.flush(),
                        Err(_) => return,
                    }
                }
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name("kernel-log".into())
            .spawn(run)
        {
            debug!("kernel log messages are not forwarded: starting their thread: {e}");
        }
        Some(log)
    }
}

impl Drop for KernelLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
