//! The run plan: everything `run` needs, derived from a validated configuration, and what of
//! it a reload cannot change.

use std::{path::PathBuf, time::Duration};

use crate::{
    attribute::routes::{PathView, RouteTable},
    capture::discovery::TargetSpec,
    capture::loader::LoadSettings,
    config::{Config, IdentityConfig, TargetMatch, Unmatched},
    http::{BodyBudget, ParserLimits},
    pipeline,
};

/// Why a plan could not be made from a configuration.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("targets: cgroup {path:?} does not exist under the cgroup v2 mount ({})", CGROUP_MOUNTS.join(" or "))]
    NoCgroup { path: String },
    #[error(transparent)]
    Routes(#[from] crate::attribute::routes::RouteError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A reload's plan, with the file it came from.
    #[error("{}: {source}", path.display())]
    In {
        path: PathBuf,
        source: Box<PlanError>,
    },
}

/// Where cgroup v2 may be mounted, in the order they are tried.
const CGROUP_MOUNTS: [&str; 2] = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"];

/// Everything `run` needs, derived from the validated config.
pub struct Plan {
    pub load: LoadSettings,
    pub targets: Vec<TargetSpec>,
    pub pipeline: pipeline::Settings,
    pub state_dir: PathBuf,
    pub output_file: PathBuf,
    pub spool: crate::config::SpoolConfig,
    pub sinks: Vec<crate::config::SinkConfig>,
    pub stats_interval: Duration,
    pub queue_capacity: usize,
    pub identity: IdentityConfig,
    /// `host.name` of security records.
    pub pipeline_host: String,
    /// Enforce decisions in the kernel.
    pub enforce: bool,
    /// `detection.services`: the edge.
    pub edge_services: Vec<String>,
    pub feed_listen: Option<std::net::SocketAddr>,
    /// `agent.metrics_listen`: the Prometheus endpoint, off when `None`.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl Plan {
    /// Derives the run plan from a validated config. Fails only on what needs the host to
    /// check (a cgroup path that does not exist).
    pub fn from_config(cfg: &Config) -> Result<Plan, PlanError> {
        let mut ports: Vec<u16> = cfg
            .targets
            .iter()
            .flat_map(|t| t.plaintext_ports.iter().copied())
            .collect();
        ports.sort_unstable();
        ports.dedup();
        let mut comms = Vec::new();
        let mut cgroup_ids = Vec::new();
        for t in &cfg.targets {
            match &t.matcher {
                TargetMatch::Comm(c) => comms.push(c.clone()),
                // Children are followed on fork; a new process of this executable is caught at
                // exec by its name and then checked against the path.
                TargetMatch::Exe(p) => {
                    if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
                        comms.push(n.chars().take(15).collect());
                    }
                }
                TargetMatch::Cgroup(path) => cgroup_ids.push(cgroup_id(path)?),
                TargetMatch::Pid(_) => {}
            }
        }
        let routes = RouteTable::new(&cfg.routes)?;
        let limits = ParserLimits {
            body_keep_bytes: cfg.capture.body_keep_bytes,
            body_budget: BodyBudget::new(cfg.capture.body_budget_bytes),
            ..ParserLimits::default()
        };
        Ok(Plan {
            load: LoadSettings {
                ring_buffer_size: cfg.capture.ring_buffer_size,
                max_connections: cfg.capture.max_connections,
                max_message_bytes: cfg.capture.max_message_bytes,
                plaintext_ports: ports,
                comms,
                cgroup_ids,
            },
            targets: cfg
                .targets
                .iter()
                .map(|t| TargetSpec {
                    matcher: t.matcher.clone(),
                    tls: t.tls,
                    name: t.name.clone(),
                })
                .collect(),
            pipeline: pipeline::Settings {
                limits,
                routes,
                record_unmatched: cfg.output.unmatched == Unmatched::Record,
                record_caps: cfg.output.caps,
                host_name: cfg.agent.host_name.clone(),
                mono_to_unix_ns: pipeline::mono_to_unix_ns(),
                disclosure: cfg.disclosure.clone(),
                detection: cfg.detection.clone(),
                rules: cfg.rules.clone(),
                path_views: cfg
                    .targets
                    .iter()
                    .filter(|t| t.path != PathView::AsSent)
                    .map(|t| (t.name.clone(), t.path))
                    .collect(),
            },
            identity: cfg.identity.clone(),
            pipeline_host: cfg.agent.host_name.clone(),
            enforce: cfg.detection.enforce,
            edge_services: cfg.detection.services.clone(),
            feed_listen: cfg.detection.feed_listen,
            metrics_listen: cfg.agent.metrics_listen,
            state_dir: cfg.agent.state_dir.clone(),
            output_file: cfg.output.file.clone(),
            spool: cfg.spool.clone(),
            sinks: cfg.sinks.clone(),
            stats_interval: cfg.agent.stats_interval,
            queue_capacity: cfg.capture.queue_capacity,
        })
    }
}

/// The id the kernel gives a cgroup v2 directory is its inode number.
fn cgroup_id(path: &str) -> Result<u64, PlanError> {
    use std::os::unix::fs::MetadataExt;
    for m in CGROUP_MOUNTS {
        let p = format!("{m}{path}");
        let is_v2 = std::fs::metadata(format!("{m}/cgroup.controllers")).is_ok();
        if is_v2 {
            if let Ok(md) = std::fs::metadata(&p) {
                return Ok(md.ino());
            }
        }
    }
    Err(PlanError::NoCgroup {
        path: path.to_string(),
    })
}

/// Reads and checks the configuration again for a reload.
pub fn load_plan(path: &std::path::Path) -> Result<Plan, PlanError> {
    let cfg = crate::config::load(path)?;
    Plan::from_config(&cfg).map_err(|e| PlanError::In {
        path: path.to_path_buf(),
        source: Box::new(e),
    })
}

/// What a reload cannot change in a running agent (kernel map sizes, where state lives, the
/// enforcement hook, the listeners), by key, so the operator is told a restart is needed.
pub fn fixed(p: &Plan) -> Vec<(&'static str, String)> {
    vec![
        (
            "capture.ring_buffer_size",
            p.load.ring_buffer_size.to_string(),
        ),
        (
            "capture.max_connections",
            p.load.max_connections.to_string(),
        ),
        (
            "capture.max_message_bytes",
            p.load.max_message_bytes.to_string(),
        ),
        ("capture.queue_capacity", p.queue_capacity.to_string()),
        ("agent.state_dir", p.state_dir.display().to_string()),
        ("agent.stats_interval", format!("{:?}", p.stats_interval)),
        ("spool", format!("{:?}", p.spool)),
        ("detection.enforce", p.enforce.to_string()),
        ("detection.feed_listen", format!("{:?}", p.feed_listen)),
        ("agent.metrics_listen", format!("{:?}", p.metrics_listen)),
    ]
}

pub fn restart_only(old: &[(&'static str, String)], new: &Plan) -> Vec<&'static str> {
    old.iter()
        .zip(fixed(new))
        .filter(|((_, a), (_, b))| a != b)
        .map(|((k, _), _)| *k)
        .collect()
}
