//! The `[[targets]]`: which processes are traced (by executable, process name, cgroup or pid),
//! whether through OpenSSL or on plaintext ports, and the service name their records carry.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::{errors::Problems, values::has_control};
use crate::attribute::routes::PathView;

/// The kernel keeps 16 bytes of a task's comm, the last one a NUL.
const MAX_COMM_LEN: usize = 15;

/// How a target's processes are recognised.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TargetMatch {
    /// Absolute path of the executable.
    Exe(PathBuf),
    /// Process name (the kernel's comm), 1..=15 bytes.
    Comm(String),
    /// cgroup v2 path relative to the cgroup2 mount, absolute form (`/system.slice/x.service`).
    Cgroup(String),
    Pid(u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub matcher: TargetMatch,
    /// Trace OpenSSL in these processes.
    pub tls: bool,
    /// Local TCP ports whose plaintext socket traffic is captured; none is 0, no duplicates.
    pub plaintext_ports: Vec<u16>,
    /// `service.name` in records.
    pub name: String,
    /// How the server passes the request path on (`path`): what records and the first step of
    /// route matching take as the request's path.
    pub path: PathView,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTarget {
    exe: Option<String>,
    comm: Option<String>,
    cgroup: Option<String>,
    pid: Option<i64>,
    tls: Option<bool>,
    plaintext_ports: Option<Vec<i64>>,
    name: Option<String>,
    path: Option<String>,
}

/// The label a target gets when it has no `name`.
fn derived_name(m: &TargetMatch) -> String {
    match m {
        TargetMatch::Exe(p) => p
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| p.display().to_string()),
        TargetMatch::Comm(c) => c.clone(),
        TargetMatch::Cgroup(c) => {
            let last = c.rsplit('/').find(|s| !s.is_empty()).unwrap_or("root");
            [".service", ".scope", ".slice"]
                .iter()
                .find_map(|suf| last.strip_suffix(suf).filter(|s| !s.is_empty()))
                .unwrap_or(last)
                .to_string()
        }
        TargetMatch::Pid(pid) => format!("pid-{pid}"),
    }
}

pub(super) fn check_targets(raw: Vec<RawTarget>, p: &mut Problems) -> Vec<Target> {
    const ONE_OF: &str = "expected exactly one of exe, comm, cgroup or pid";
    if raw.is_empty() {
        p.push(
            "targets",
            "no [[targets]] are configured; expected at least one [[targets]] table with one of \
             exe, comm, cgroup or pid, e.g. exe = \"/usr/sbin/nginx\"",
        );
        return Vec::new();
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut seen: HashMap<TargetMatch, usize> = HashMap::new();
    for (i, t) in raw.into_iter().enumerate() {
        let key = format!("targets[{i}]");
        let given: Vec<&str> = [
            t.exe.as_ref().map(|_| "exe"),
            t.comm.as_ref().map(|_| "comm"),
            t.cgroup.as_ref().map(|_| "cgroup"),
            t.pid.as_ref().map(|_| "pid"),
        ]
        .into_iter()
        .flatten()
        .collect();
        let matcher = match given.len() {
            0 => {
                p.push(
                    &key,
                    format!("has none of exe, comm, cgroup, pid; {ONE_OF}"),
                );
                None
            }
            1 => check_matcher(&t, &key, p),
            _ => {
                p.push(&key, format!("has {}; {ONE_OF}", given.join(" and ")));
                None
            }
        };

        let tls = t.tls.unwrap_or(true);
        let mut ports: Vec<u16> = Vec::new();
        for (j, &port) in t.plaintext_ports.iter().flatten().enumerate() {
            let pkey = format!("{key}.plaintext_ports[{j}]");
            match u16::try_from(port) {
                Ok(0) | Err(_) => p.push(
                    pkey,
                    format!("{port} is not a TCP port; expected a port between 1 and 65535"),
                ),
                Ok(port) if ports.contains(&port) => p.push(
                    pkey,
                    format!("{port} is listed twice; expected each port once"),
                ),
                Ok(port) => ports.push(port),
            }
        }
        if !tls && t.plaintext_ports.as_ref().is_none_or(|v| v.is_empty()) {
            p.push(
                &key,
                "has tls = false and no plaintext_ports, so nothing would be captured; expected \
                 tls = true, or the server ports in plaintext_ports",
            );
        }

        let name = match t.name {
            Some(n) => {
                if n.trim().is_empty() || has_control(&n) {
                    p.push(
                        format!("{key}.name"),
                        format!("{n:?} is empty or has control characters; expected a service label like \"nginx\""),
                    );
                }
                n
            }
            None => matcher.as_ref().map(derived_name).unwrap_or_default(),
        };

        let path = match t.path.as_deref() {
            None | Some("as-sent") => PathView::AsSent,
            Some("resolved") => PathView::Resolved,
            Some(other) => {
                p.push(
                    format!("{key}.path"),
                    format!(
                        "{other:?} is not a way of passing a path on; expected \"as-sent\" (nginx \
                         proxy_pass without a URI, the default) or \"resolved\" (Apache httpd \
                         mod_proxy: dot-segments resolved, // merged)"
                    ),
                );
                PathView::AsSent
            }
        };

        if let Some(m) = matcher {
            if let Some(first) = seen.get(&m) {
                p.push(
                    &key,
                    format!("matches the same processes as targets[{first}]; expected each target once (merge the two)"),
                );
            } else {
                seen.insert(m.clone(), i);
            }
            out.push(Target {
                matcher: m,
                tls,
                plaintext_ports: ports,
                name,
                path,
            });
        }
    }
    out
}

fn check_matcher(t: &RawTarget, key: &str, p: &mut Problems) -> Option<TargetMatch> {
    if let Some(exe) = &t.exe {
        let path = Path::new(exe);
        if !path.is_absolute() || exe.ends_with('/') || path.file_name().is_none() {
            p.push(
                format!("{key}.exe"),
                format!("{exe:?} is not an absolute path to a file; expected the executable's path like \"/usr/sbin/nginx\""),
            );
            return None;
        }
        return Some(TargetMatch::Exe(path.to_path_buf()));
    }
    if let Some(comm) = &t.comm {
        if comm.is_empty() || comm.len() > MAX_COMM_LEN || comm.contains('\0') {
            p.push(
                format!("{key}.comm"),
                format!(
                    "{comm:?} is {} bytes long; expected a process name of 1 to {MAX_COMM_LEN} bytes, \
                     as the kernel keeps it (see /proc/<pid>/comm)",
                    comm.len()
                ),
            );
            return None;
        }
        return Some(TargetMatch::Comm(comm.clone()));
    }
    if let Some(cg) = &t.cgroup {
        let ckey = format!("{key}.cgroup");
        if cg.starts_with("/sys/fs/cgroup") {
            p.push(
                ckey,
                format!("{cg:?} includes the cgroup2 mount point; expected the path relative to it, like \"/system.slice/nginx.service\""),
            );
            return None;
        }
        let bad_seg = cg
            .split('/')
            .skip(1)
            .any(|s| s.is_empty() || s == "." || s == "..");
        if !cg.starts_with('/') || (cg != "/" && bad_seg) || has_control(cg) {
            p.push(
                ckey,
                format!("{cg:?} is not a cgroup v2 path in absolute form; expected a path like \"/system.slice/nginx.service\""),
            );
            return None;
        }
        return Some(TargetMatch::Cgroup(cg.clone()));
    }
    if let Some(pid) = t.pid {
        return match u32::try_from(pid) {
            Ok(pid) if pid > 0 && pid <= 4_194_304 => Some(TargetMatch::Pid(pid)),
            _ => {
                p.push(
                    format!("{key}.pid"),
                    format!("{pid} is not a process id; expected a number between 1 and 4194304"),
                );
                None
            }
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_names() {
        assert_eq!(
            derived_name(&TargetMatch::Cgroup("/system.slice/nginx.service".into())),
            "nginx"
        );
        assert_eq!(derived_name(&TargetMatch::Cgroup("/".into())), "root");
        assert_eq!(derived_name(&TargetMatch::Cgroup("/a/b".into())), "b");
        assert_eq!(
            derived_name(&TargetMatch::Comm("php-fpm".into())),
            "php-fpm"
        );
    }
}
