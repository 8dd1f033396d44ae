//! Finds the target processes in /proc, tells the kernel about them, and attaches the OpenSSL
//! uprobes once per library inode (shared libssl, or an executable that exports a statically
//! linked OpenSSL), including for processes that start later.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs,
    os::unix::fs::MetadataExt,
    path::Path,
};

use aya::programs::{uprobe::UProbeScope, UProbe};
use log::{info, warn};

use crate::{
    capture::loader::{program, Kernel, SSL_PROBES},
    config::TargetMatch,
};

#[derive(Debug, Clone)]
pub struct TargetSpec {
    pub matcher: TargetMatch,
    pub tls: bool,
    pub name: String,
}

/// What we know of a traced process, for records.
#[derive(Debug, Clone, Default)]
pub struct ProcInfo {
    pub pid: u32,
    pub name: String,
    pub executable: Option<String>,
    /// Index into the target list that matched (or that its parent matched).
    pub target: Option<usize>,
}

/// A process and the target it belongs to ([`Discovery::assign`]).
#[derive(Debug, Clone)]
pub struct Assigned {
    pub info: ProcInfo,
    pub target: usize,
    /// The parent it inherited the target from; `None` when it matches the target itself.
    pub parent: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct LibAttach {
    pub path: String,
    pub kind: &'static str,
    pub attached: Vec<&'static str>,
    pub errors: Vec<String>,
}

pub struct Discovery {
    targets: Vec<TargetSpec>,
    self_pid: u32,
    /// (dev, inode) of every library/executable we attached to (or failed on).
    libs: HashMap<(u64, u64), LibAttach>,
    pub procs: HashMap<u32, ProcInfo>,
    warned_missing: HashSet<usize>,
    /// Traced processes of TLS targets that map no OpenSSL yet: their maps are read again at
    /// every scan, so a library loaded later (CPython imports `ssl` on first use) is attached.
    without_tls: HashSet<u32>,
    /// (target, executable) pairs already warned about having no OpenSSL: one line each.
    warned_no_tls: HashSet<(usize, String)>,
}

pub fn read_proc_info(pid: u32) -> ProcInfo {
    ProcInfo {
        pid,
        name: crate::capture::procfs::comm(pid),
        executable: crate::capture::procfs::executable(pid),
        target: None,
    }
}

fn cgroup_of(pid: u32) -> Option<String> {
    let s = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
}

impl Discovery {
    pub fn new(targets: Vec<TargetSpec>) -> Self {
        Discovery {
            targets,
            self_pid: std::process::id(),
            libs: HashMap::new(),
            procs: HashMap::new(),
            warned_missing: HashSet::new(),
            without_tls: HashSet::new(),
            warned_no_tls: HashSet::new(),
        }
    }

    pub fn targets(&self) -> &[TargetSpec] {
        &self.targets
    }

    /// Which configured target this process matches, if any.
    pub fn classify(&self, info: &ProcInfo) -> Option<usize> {
        if info.pid == self.self_pid {
            return None;
        }
        self.targets.iter().position(|t| match &t.matcher {
            TargetMatch::Exe(p) => info.executable.as_deref() == Some(&*p.to_string_lossy()),
            TargetMatch::Comm(c) => &info.name == c,
            TargetMatch::Pid(p) => *p == info.pid,
            TargetMatch::Cgroup(c) => {
                cgroup_of(info.pid).is_some_and(|g| g == *c || g.starts_with(&format!("{c}/")))
            }
        })
    }

    /// Which target each process of `pending` belongs to: the target it matches itself, else
    /// the target of its parent, found by `traced` (processes already traced) or among those
    /// matched here, level by level. Matches come in that order (direct ones first, then each
    /// generation of children); the processes that belong to no target are returned apart.
    pub fn assign(
        &self,
        pending: Vec<ProcInfo>,
        traced: impl Fn(u32) -> Option<usize>,
    ) -> (Vec<Assigned>, Vec<ProcInfo>) {
        let mut found: Vec<Assigned> = Vec::new();
        let mut matched: HashMap<u32, usize> = HashMap::new();
        let mut rest = Vec::new();
        for info in pending {
            match self.classify(&info) {
                Some(t) => {
                    matched.insert(info.pid, t);
                    found.push(Assigned {
                        info,
                        target: t,
                        parent: None,
                    });
                }
                None => rest.push(info),
            }
        }
        loop {
            let before = rest.len();
            for info in std::mem::take(&mut rest) {
                let parent = parent_of(info.pid);
                match parent.and_then(|pp| traced(pp).or_else(|| matched.get(&pp).copied())) {
                    Some(t) => {
                        matched.insert(info.pid, t);
                        found.push(Assigned {
                            info,
                            target: t,
                            parent,
                        });
                    }
                    None => rest.push(info),
                }
            }
            if rest.len() == before {
                break;
            }
        }
        (found, rest)
    }

    /// One pass over /proc: new matching processes become targets (and get their TLS library
    /// attached); targets that exited are forgotten. Also adopts processes the kernel added on
    /// fork/exec.
    pub fn scan(&mut self, kernel: &mut Kernel) {
        let kernel_targets: HashSet<u32> = kernel.targets().into_iter().collect();
        let Ok(dir) = fs::read_dir("/proc") else {
            return;
        };
        let alive: HashSet<u32> = dir
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
            .collect();
        let pending: Vec<ProcInfo> = alive
            .iter()
            .filter(|pid| !self.procs.contains_key(pid) && **pid != self.self_pid)
            .map(|&pid| read_proc_info(pid))
            .collect();
        // Direct matches first, then children of targets, level by level: workers forked before
        // the agent started, and the children the kernel already added at fork.
        let (found, mut pending) =
            self.assign(pending, |pp| self.procs.get(&pp).and_then(|p| p.target));
        for m in found {
            // A child goes with its parent: not when the parent could not be traced.
            if m.parent.is_some_and(|pp| !self.procs.contains_key(&pp)) {
                pending.push(m.info);
                continue;
            }
            self.adopt(kernel, m.info, m.target);
        }
        // The kernel added these on exec by name, but they are not what the config means.
        for info in &pending {
            if kernel_targets.contains(&info.pid) {
                kernel.remove_target(info.pid);
            }
        }
        self.procs.retain(|pid, _| alive.contains(pid));
        self.without_tls.retain(|pid| alive.contains(pid));
        let recheck: Vec<u32> = self
            .without_tls
            .iter()
            .copied()
            .filter(|pid| !mapped_libssl(*pid).is_empty())
            .collect();
        for pid in recheck {
            info!("pid {pid} loaded OpenSSL after it was found; attaching");
            self.attach_tls(kernel, pid);
        }
        for (i, t) in self.targets.iter().enumerate() {
            if !self.procs.values().any(|p| p.target == Some(i)) && self.warned_missing.insert(i) {
                warn!("no running process matches target {:?} ({:?}) yet; it is attached when it appears", t.name, t.matcher);
            }
        }
    }

    fn adopt(&mut self, kernel: &mut Kernel, mut info: ProcInfo, t: usize) {
        let pid = info.pid;
        info.target = Some(t);
        if let Err(e) = kernel.add_target(pid) {
            warn!("cannot trace pid {pid} ({}): {e}", info.name);
            return;
        }
        info!(
            "tracing pid {pid} ({}, {}) as target {:?}",
            info.name,
            info.executable.as_deref().unwrap_or("?"),
            self.targets[t].name
        );
        self.procs.insert(pid, info);
        if self.targets[t].tls {
            self.attach_tls(kernel, pid);
        }
    }

    /// A reload: the targets become `targets`. Processes that still match stay traced without a
    /// gap; those that no longer match are dropped from the kernel's set; new matches are
    /// adopted by a scan.
    pub fn set_targets(&mut self, kernel: &mut Kernel, targets: Vec<TargetSpec>) {
        self.targets = targets;
        self.warned_missing.clear();
        let pids: Vec<u32> = self.procs.keys().copied().collect();
        let (found, _) = self.assign(pids.iter().map(|p| read_proc_info(*p)).collect(), |_| None);
        let keep: HashMap<u32, usize> = found.iter().map(|a| (a.info.pid, a.target)).collect();
        for pid in pids {
            match keep.get(&pid) {
                Some(&t) => {
                    if let Some(p) = self.procs.get_mut(&pid) {
                        p.target = Some(t);
                    }
                    if self.targets[t].tls {
                        self.attach_tls(kernel, pid);
                    }
                }
                None => {
                    info!("pid {pid} no longer matches any target: not traced any more");
                    kernel.remove_target(pid);
                    self.procs.remove(&pid);
                }
            }
        }
        self.scan(kernel);
    }

    /// A process exec'd (the kernel saw its name match, or it was a target): re-check it.
    pub fn on_exec(&mut self, kernel: &mut Kernel, pid: u32) {
        self.procs.remove(&pid);
        let info = read_proc_info(pid);
        match self.classify(&info) {
            Some(_) => self.scan(kernel),
            None => {
                kernel.remove_target(pid);
            }
        }
    }

    pub fn on_exit(&mut self, pid: u32) {
        self.procs.remove(&pid);
        self.without_tls.remove(&pid);
    }

    /// Attaches the OpenSSL probes to the TLS images `pid` maps; a process that maps none is
    /// said once per target and executable, and looked at again at every scan.
    fn attach_tls(&mut self, kernel: &mut Kernel, pid: u32) {
        let images = tls_images(pid);
        if images.is_empty() {
            if self.without_tls.insert(pid) {
                let p = self.procs.get(&pid);
                let target = p.and_then(|p| p.target).unwrap_or(usize::MAX);
                let exe = p
                    .and_then(|p| p.executable.clone())
                    .unwrap_or_else(|| "?".into());
                if self.warned_no_tls.insert((target, exe.clone())) {
                    let name = self.targets.get(target).map_or("?", |t| t.name.as_str());
                    warn!("pid {pid} ({exe}, target {name:?}) maps no OpenSSL library (libssl.so*, or SSL_read exported by the executable): its TLS traffic is not captured until it loads one (looked for again at every scan)");
                }
            }
            return;
        }
        self.without_tls.remove(&pid);
        for (path, kind) in images {
            let host_path = format!("/proc/{pid}/root{path}");
            let Ok(md) = fs::metadata(&host_path) else {
                continue;
            };
            let key = (md.dev(), md.ino());
            if self.libs.contains_key(&key) {
                continue;
            }
            let la = attach_ssl(kernel, &host_path, &path, kind);
            if la.attached.is_empty() {
                warn!("could not attach OpenSSL probes to {path} ({kind}) used by pid {pid}: {}; TLS traffic of this process is not captured", la.errors.join("; "));
            } else {
                info!(
                    "attached OpenSSL probes to {path} ({kind}): {}",
                    la.attached.join(", ")
                );
                for e in &la.errors {
                    info!("  {path}: {e}");
                }
            }
            self.libs.insert(key, la);
        }
    }

    pub fn libraries(&self) -> Vec<LibAttach> {
        let mut v: Vec<_> = self.libs.values().cloned().collect();
        v.sort_by(|a, b| a.path.cmp(&b.path));
        v
    }
}

fn parent_of(pid: u32) -> Option<u32> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}

/// The images in this process that carry OpenSSL: every mapped libssl, and the executable
/// itself when it exports SSL_read (static OpenSSL, e.g. node).
pub fn tls_images(pid: u32) -> Vec<(String, &'static str)> {
    let mut out: BTreeMap<String, &'static str> = mapped_libssl(pid)
        .into_iter()
        .map(|p| (p, "libssl"))
        .collect();
    if let Ok(exe) = fs::read_link(format!("/proc/{pid}/exe")) {
        let exe = exe
            .to_string_lossy()
            .trim_end_matches(" (deleted)")
            .to_string();
        if exports_ssl(Path::new(&format!("/proc/{pid}/root{exe}"))) {
            out.insert(exe, "static OpenSSL in executable");
        }
    }
    out.into_iter().collect()
}

/// The shared libssl files `pid` maps, from /proc/PID/maps.
pub fn mapped_libssl(pid: u32) -> Vec<String> {
    let Ok(maps) = fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return Vec::new();
    };
    let mut out: Vec<String> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.rsplit('/').next().unwrap_or("").starts_with("libssl.so"))
        .map(str::to_string)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Does this ELF file define (not just import) SSL_read in its dynamic symbol table?
pub fn exports_ssl(path: &Path) -> bool {
    use object::{Object, ObjectSymbol};
    let Ok(data) = fs::read(path) else {
        return false;
    };
    let Ok(file) = object::File::parse(&*data) else {
        return false;
    };
    file.dynamic_symbols()
        .any(|s| s.name() == Ok("SSL_read") && !s.is_undefined())
}

fn attach_ssl(kernel: &mut Kernel, host_path: &str, path: &str, kind: &'static str) -> LibAttach {
    let mut la = LibAttach {
        path: path.to_string(),
        kind,
        attached: Vec::new(),
        errors: Vec::new(),
    };
    for (prog, sym, _ret, required) in SSL_PROBES {
        let res = program::<UProbe>(&mut kernel.ebpf, prog)
            .map_err(|e| e.to_string())
            .and_then(|p| {
                p.attach(*sym, host_path, UProbeScope::AllProcesses)
                    .map_err(|e| e.to_string())
            });
        match res {
            Ok(_) => {
                if !la.attached.contains(sym) {
                    la.attached.push(sym);
                }
            }
            Err(e) if *required => la.errors.push(format!("{sym} ({prog}): {e}")),
            Err(e) => la
                .errors
                .push(format!("optional {sym} ({prog}) not attached: {e}")),
        }
    }
    la
}
