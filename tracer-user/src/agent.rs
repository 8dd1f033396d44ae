//! Runs the agent: load and attach, discover targets, read the ring buffer, run the pipeline,
//! write records, report counters, and stop cleanly on SIGTERM/SIGINT (draining what the
//! kernel already captured).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use log::{error, info, warn};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{mpsc, watch},
};
use tracer_common::{COUNTER_NAMES, LOSS_COUNTERS};

use crate::{
    attribution::{Attributor, Keyer},
    config::{Config, IdentityConfig, TargetMatch, Unmatched},
    discovery::{Discovery, TargetSpec},
    http::ParserLimits,
    loader::{self, Kernel, LoadSettings},
    pipeline::{self, Pipeline, Services},
    routes::RouteTable,
    ship::shipper::{ShipError, Shipper, DRAIN_TIMEOUT},
    source,
    stats::{self, Stats},
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Load(#[from] loader::LoadError),
    #[error("audit trail: {0}")]
    Ship(#[from] ShipError),
    #[error("creating the state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    #[error("ring buffer reader: {0}")]
    Reader(std::io::Error),
    #[error(transparent)]
    Attribution(#[from] crate::attribution::AttributionError),
}

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
    pub fn from_config(cfg: &Config) -> Result<Plan, String> {
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
        let routes = RouteTable::new(&cfg.routes).map_err(|e| e.to_string())?;
        let limits = ParserLimits {
            body_keep_bytes: cfg.capture.body_keep_bytes,
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
                host_name: cfg.agent.host_name.clone(),
                mono_to_unix_ns: pipeline::mono_to_unix_ns(),
                disclosure: cfg.disclosure.clone(),
                detection: cfg.detection.clone(),
                rules: cfg.rules.clone(),
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
fn cgroup_id(path: &str) -> Result<u64, String> {
    use std::os::unix::fs::MetadataExt;
    let mounts = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"];
    for m in mounts {
        let p = format!("{m}{path}");
        let is_v2 = std::fs::metadata(format!("{m}/cgroup.controllers")).is_ok();
        if is_v2 {
            if let Ok(md) = std::fs::metadata(&p) {
                return Ok(md.ino());
            }
        }
    }
    Err(format!(
        "targets: cgroup {path:?} does not exist under the cgroup v2 mount ({})",
        mounts.join(" or ")
    ))
}

pub struct RunOptions {
    /// Stop by itself after this long (tests, demo).
    pub duration: Option<Duration>,
    /// Also copy every raw ring-buffer record to this file (replay fixtures, debugging).
    pub tap_events: Option<PathBuf>,
    /// Accept `clock` commands on the control socket (tests that compress days).
    pub test_clock: bool,
    /// The configuration file, read again on SIGHUP.
    pub config_path: Option<PathBuf>,
}

/// Reads and checks the configuration again for a reload.
fn load_plan(path: &std::path::Path) -> Result<Plan, String> {
    let cfg = crate::config::load(path).map_err(|e| e.to_string())?;
    Plan::from_config(&cfg).map_err(|e| format!("{}: {e}", path.display()))
}

/// What a reload cannot change in a running agent (kernel map sizes, where state lives, the
/// enforcement hook, the listeners), by key, so the operator is told a restart is needed.
fn fixed(p: &Plan) -> Vec<(&'static str, String)> {
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

fn restart_only(old: &[(&'static str, String)], new: &Plan) -> Vec<&'static str> {
    old.iter()
        .zip(fixed(new))
        .filter(|((_, a), (_, b))| a != b)
        .map(|((k, _), _)| *k)
        .collect()
}

/// File names in the state directory.
pub const DECISIONS_FILE: &str = "decisions.json";
pub const DETECTOR_FILE: &str = "detector.json";
/// The test clock's offset (ms), kept across restarts (only with `run --test-clock`).
pub const TEST_CLOCK_FILE: &str = "test-clock";

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Writes `bytes` to `dir/name` atomically, mode 0600.
fn save_private(dir: &std::path::Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    crate::statefile::write_private(&dir.join(name), bytes)
}

/// Carries out the pipeline's kernel actions; one `block_enforced` record per decision.
fn apply_actions(pipeline: &mut Pipeline, kernel: &mut Kernel, stats: &Stats, host: &str) {
    use crate::security::{decision_line, Enforcement, Phase};
    let actions = std::mem::take(&mut pipeline.actions);
    if actions.is_empty() {
        return;
    }
    let mut per_decision: BTreeMap<String, Enforcement> = BTreeMap::new();
    for a in actions {
        match a {
            pipeline::Action::BlockConn { tuple, decision } => {
                let e = per_decision.entry(decision).or_default();
                if kernel.enforcing() {
                    match kernel.block_conn(tuple) {
                        Ok(()) => {
                            e.connections_blocked += 1;
                            stats.add("enforcement_connections_blocked_total", 1);
                        }
                        Err(err) => {
                            stats.add_reason("enforcement_failures_total", "block", 1);
                            e.errors.push(err.to_string());
                        }
                    }
                } else {
                    e.errors
                        .push("the kernel egress filter is not attached".into());
                }
                match crate::enforce::destroy(tuple.local, tuple.peer) {
                    Ok(()) => {
                        e.connections_reset += 1;
                        stats.add("enforcement_connections_reset_total", 1);
                    }
                    // Closed before the reset came: nothing left to do.
                    Err(crate::enforce::EnforceError::NoSuchConnection { .. }) => {
                        stats.add("enforcement_connections_gone_total", 1);
                    }
                    Err(err) => {
                        stats.add_reason("enforcement_failures_total", "reset", 1);
                        e.errors.push(err.to_string());
                    }
                }
            }
            pipeline::Action::BlockToken { hash, decision } => {
                let e = per_decision.entry(decision).or_default();
                match kernel.block_token(hash) {
                    Ok(()) => {
                        e.tokens_blocked += 1;
                        stats.add("enforcement_tokens_blocked_total", 1);
                    }
                    Err(err) => {
                        stats.add_reason("enforcement_failures_total", "token", 1);
                        e.errors.push(err.to_string());
                    }
                }
            }
            pipeline::Action::UnblockToken { hash } => {
                if let Err(err) = kernel.unblock_token(hash) {
                    stats.add_reason("enforcement_failures_total", "unblock_token", 1);
                    warn!("unblocking a token: {err}");
                }
            }
            pipeline::Action::UnblockConn { tuple } => {
                if kernel.enforcing() {
                    if let Err(err) = kernel.unblock_conn(tuple) {
                        stats.add_reason("enforcement_failures_total", "unblock", 1);
                        warn!("unblocking {} <-> {}: {err}", tuple.local, tuple.peer);
                    }
                }
            }
        }
    }
    let now = pipeline.now_ms(now_unix_ms() * 1_000_000);
    for (id, e) in per_decision {
        // The first enforcement of a decision is recorded (and its problems logged); later
        // ones add up into the decision's end record.
        let first = !pipeline.enforced.contains_key(&id);
        let total = pipeline.enforced.entry(id.clone()).or_default();
        total.connections_blocked += e.connections_blocked;
        total.connections_reset += e.connections_reset;
        total.tokens_blocked += e.tokens_blocked;
        for err in &e.errors {
            if !total.errors.contains(err) && total.errors.len() < 8 {
                total.errors.push(err.clone());
            }
        }
        if !first {
            continue;
        }
        if !e.errors.is_empty() {
            warn!("enforcing decision {id}: {}", e.errors.join("; "));
        }
        let d = pipeline
            .decisions
            .active
            .iter()
            .find(|d| d.id == id)
            .cloned();
        if let Some(d) = d {
            let rid = crate::ids::EventIds::new().next_id();
            pipeline.security_out.push(decision_line(
                &d,
                Phase::Enforced,
                &rid,
                now,
                host,
                Some(&e),
            ));
        }
    }
}

pub async fn run(mut plan: Plan, opts: RunOptions) -> Result<(), AgentError> {
    let started = Instant::now();
    std::fs::create_dir_all(&plan.state_dir).map_err(|e| AgentError::StateDir {
        path: plan.state_dir.clone(),
        source: e,
    })?;
    let stats = Arc::new(Stats::default());
    let mut shipper = Shipper::start(
        &plan.spool,
        &plan.sinks,
        &plan.state_dir,
        &plan.pipeline_host,
        stats.clone(),
    )?;
    shipper.write(&mut Vec::new(), &mut Vec::new());

    let fixed_at_start = fixed(&plan);
    let mut kernel = loader::load(&plan.load)?;
    if plan.enforce {
        if let Err(e) = kernel.attach_enforce() {
            error!("enforcement is OFF: {e}. Tracing, detection and alerts go on; decisions are recorded but not enforced");
            stats.add_reason("enforcement_attach_failures_total", "egress", 1);
        }
    }
    let mut discovery = Discovery::new(plan.targets.clone());
    let services: Services = Arc::new(RwLock::new(Default::default()));
    discovery.scan(&mut kernel);
    warn_unserved_ports(&plan.load.plaintext_ports);
    publish_services(&discovery, &services);
    let mut edge_marked = std::collections::BTreeSet::new();
    mark_edge(
        &discovery,
        &mut kernel,
        &plan.edge_services,
        &mut edge_marked,
    );

    let ring = kernel.take_events()?;
    let (tx, mut rx) = mpsc::channel(plan.queue_capacity.div_ceil(512).max(4));
    let (stop_tx, stop_rx) = watch::channel(false);
    let tap = match &opts.tap_events {
        // The tap holds captured payload: readable by root only.
        Some(p) => Some(std::io::BufWriter::new({
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(p)
                .map_err(|e| AgentError::StateDir {
                    path: p.clone(),
                    source: e,
                })?
        })),
        None => None,
    };
    let reader = tokio::spawn(source::read_loop(ring, tx, stats.clone(), stop_rx, tap));

    let mut pipeline = Pipeline::new(plan.pipeline, services.clone(), stats.clone());
    let mut attributor = Attributor::new(plan.identity, Keyer::load_or_create(&plan.state_dir)?);
    attributor.attach_state(&plan.state_dir, &stats);
    if kernel.enforcing() {
        match kernel.set_token_patterns(&attributor.kernel_patterns()) {
            Ok(()) => attributor.set_token_seed(kernel.token_seed()),
            Err(e) => {
                error!("blocked sessions cannot be recognised in the kernel: {e}; blocks apply to connections the agent has seen only");
                stats.add_reason("enforcement_attach_failures_total", "tokens", 1);
            }
        }
    }
    pipeline.attributor = Some(attributor);
    let host = plan.pipeline_host.clone();
    restore_detection(&mut pipeline, &plan.state_dir, &stats);
    if opts.test_clock {
        pipeline.clock_offset_ms = std::fs::read_to_string(plan.state_dir.join(TEST_CLOCK_FILE))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
        warn!(
            "test clock on: detection time runs {} ms ahead of the wall clock; never use --test-clock in production",
            pipeline.clock_offset_ms
        );
    }
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<crate::control::Command>(16);
    let _ctl =
        crate::control::listen(&plan.state_dir, ctl_tx).map_err(|e| AgentError::StateDir {
            path: plan.state_dir.join(crate::control::SOCKET_FILE),
            source: e,
        })?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let feed = crate::feed::Feed::default();
    feed.publish(&pipeline.decisions.active);
    let _feed_task = match plan.feed_listen {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                info!("decision feed on http://{addr}/decisions and /decisions/stream");
                Some(feed.serve(l))
            }
            Err(e) => {
                error!(
                    "decision feed: cannot listen on {addr}: {e}; decisions are still in {}",
                    plan.state_dir.join(DECISIONS_FILE).display()
                );
                stats.add_reason("feed_failures_total", "listen", 1);
                None
            }
        },
        None => None,
    };
    let metrics = match plan.metrics_listen {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                let ep = crate::metrics::Endpoint::default();
                let page = metrics_page(
                    &kernel,
                    &discovery,
                    &pipeline,
                    &shipper,
                    &stats.snapshot(),
                    started,
                    &mut BTreeSet::new(),
                );
                ep.publish(page);
                info!("metrics on http://{addr}/metrics");
                let task = ep.serve(l);
                Some((ep, task))
            }
            Err(e) => {
                error!(
                    "metrics: cannot listen on {addr}: {e}; the counters are still in {}",
                    plan.state_dir.join("stats.json").display()
                );
                stats.add_reason("metrics_failures_total", "listen", 1);
                None
            }
        },
        None => None,
    };
    let mut metrics_warned = BTreeSet::new();
    let mut rates = crate::metrics::Rates::new(RATE_WINDOW);
    let mut term = signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
    let mut hup = signal(SignalKind::hangup()).map_err(AgentError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;
    let mut scan_tick = tokio::time::interval(Duration::from_secs(1));
    let mut stats_tick = tokio::time::interval(plan.stats_interval);
    stats_tick.tick().await;
    let deadline = opts.duration.map(|d| tokio::time::Instant::now() + d);
    let mut stopping = false;
    let mut scans = 0u64;
    info!(
        "sparbar running: records go to {}",
        plan.output_file.display()
    );
    // Probes are attached and sinks open: tell systemd (Type=notify), and keep its watchdog fed.
    if let Err(e) = crate::notify::ready() {
        warn!("telling systemd the agent is ready: {e}");
    }
    let mut watchdog = tokio::time::interval(
        crate::notify::watchdog_interval()
            .map(|d| d / 2)
            .unwrap_or(Duration::from_secs(3600)),
    );

    loop {
        tokio::select! {
            batch = rx.recv() => {
                let Some(batch) = batch else { break };
                for ev in batch {
                    pipeline.handle(ev);
                }
                apply_actions(&mut pipeline, &mut kernel, &stats, &host);
                shipper.write(&mut pipeline.out, &mut pipeline.security_out);
                save_decisions(&mut pipeline, &plan.state_dir, &stats, &feed);
                pipeline.flush_stats();
                // While stopping the probes are gone: nothing new is attached.
                let execs = std::mem::take(&mut pipeline.execs);
                for pid in execs.into_iter().filter(|_| !stopping) {
                    discovery.on_exec(&mut kernel, pid);
                    publish_services(&discovery, &services);
                    mark_edge(&discovery, &mut kernel, &plan.edge_services, &mut edge_marked);
                }
                for pid in std::mem::take(&mut pipeline.exits) {
                    discovery.on_exit(pid);
                }
            }
            _ = scan_tick.tick(), if !stopping => {
                discovery.scan(&mut kernel);
                publish_services(&discovery, &services);
                mark_edge(&discovery, &mut kernel, &plan.edge_services, &mut edge_marked);
                scans += 1;
                if scans.is_multiple_of(30) {
                    // Keep-alive connections idle for 15 minutes whose close we never saw.
                    pipeline.expire_idle(pipeline::monotonic_ns(), 15 * 60 * 1_000_000_000);
                    shipper.write(&mut pipeline.out, &mut pipeline.security_out);
                    let pruned = kernel.prune_conns(|tgid| std::path::Path::new(&format!("/proc/{tgid}")).exists());
                    stats.add("kernel_connections_pruned_total", pruned as u64);
                }
            }
            _ = tick.tick() => {
                shipper.tick();
                pipeline.tick(now_unix_ms());
                apply_actions(&mut pipeline, &mut kernel, &stats, &host);
                shipper.write(&mut pipeline.out, &mut pipeline.security_out);
                save_decisions(&mut pipeline, &plan.state_dir, &stats, &feed);
                let agent = stats.snapshot();
                rates.push(Instant::now(), agent.get("exchanges_parsed_total").copied().unwrap_or(0), records_spooled(&agent));
                if let Some((ep, _)) = &metrics {
                    ep.publish(metrics_page(&kernel, &discovery, &pipeline, &shipper, &agent, started, &mut metrics_warned));
                }
            }
            cmd = ctl_rx.recv() => {
                if let Some((req, reply)) = cmd {
                    let answer = match req {
                        crate::control::Request::Status => status(&kernel, &discovery, &pipeline, &shipper, &stats, &rates, started),
                        req => control_command(&mut pipeline, req, opts.test_clock),
                    };
                    if opts.test_clock {
                        let _ = std::fs::write(plan.state_dir.join(TEST_CLOCK_FILE), pipeline.clock_offset_ms.to_string());
                    }
                    apply_actions(&mut pipeline, &mut kernel, &stats, &host);
                    shipper.write(&mut pipeline.out, &mut pipeline.security_out);
                    save_decisions(&mut pipeline, &plan.state_dir, &stats, &feed);
                    let _ = reply.send(answer);
                }
            }
            _ = stats_tick.tick() => {
                save_detector(&pipeline, &plan.state_dir, &stats);
                if let Some(a) = pipeline.attributor.as_mut() {
                    a.expire(&stats);
                    a.save(&stats);
                    stats.set("sessions_known", a.sessions_known() as u64);
                }
                let state = report(&kernel, &discovery, &stats, started, pipeline.open_connections(), false);
                write_stats(&plan.state_dir, &state, Some(shipper.usage()));
                if shipper.state_due() {
                    shipper.state_record(state);
                }
            }
            _ = watchdog.tick() => {
                if crate::notify::watchdog_interval().is_some() {
                    let _ = crate::notify::watchdog();
                }
            }
            _ = hup.recv(), if !stopping => {
                let _ = crate::notify::reloading();
                let reload = match opts.config_path.as_deref() {
                    Some(p) => load_plan(p),
                    None => Err("the agent was started without a configuration file".to_string()),
                };
                let applied = reload.and_then(|new| {
                    let (started, stopped) = shipper.reconfigure(&new.sinks).map_err(|e| e.to_string())?;
                    let later = restart_only(&fixed_at_start, &new);
                    if let Err(e) = kernel.set_filters(&new.load) {
                        warn!("reload: the kernel's target filters: {e}");
                    }
                    discovery.set_targets(&mut kernel, new.targets.clone());
                    warn_unserved_ports(&new.load.plaintext_ports);
                    publish_services(&discovery, &services);
                    plan.edge_services = new.edge_services.clone();
                    mark_edge(&discovery, &mut kernel, &plan.edge_services, &mut edge_marked);
                    let rules = new.pipeline.rules.len();
                    let routes = new.pipeline.routes.len();
                    let dropped = pipeline.reconfigure(new.pipeline);
                    if let Some(a) = pipeline.attributor.as_mut() {
                        a.reconfigure(new.identity);
                    }
                    plan.sinks = new.sinks;
                    plan.targets = new.targets;
                    Ok(serde_json::json!({
                        "routes": routes, "rules": rules, "targets": plan.targets.len(),
                        "sinks": plan.sinks.iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
                        "sinks_started": started, "sinks_stopped": stopped,
                        "detector_states_dropped": dropped, "needs_restart": later,
                    }))
                });
                match applied {
                    Ok(d) => {
                        info!("SIGHUP: configuration reloaded: {d}");
                        if let Some(l) = d["needs_restart"].as_array().filter(|l| !l.is_empty()) {
                            warn!("reload: these changed but take effect only at the next restart: {}", l.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(", "));
                        }
                        stats.add("config_reloads_total{result=\"applied\"}", 1);
                        shipper.agent_event("reloaded", d);
                    }
                    Err(e) => {
                        error!("SIGHUP: the new configuration is rejected, the running one stays: {e}");
                        stats.add("config_reloads_total{result=\"rejected\"}", 1);
                        shipper.agent_event("reload_rejected", serde_json::json!({"reason": e}));
                    }
                }
                let _ = crate::notify::ready();
            }
            _ = term.recv(), if !stopping => { let _ = crate::notify::stopping(); stop_capture(&mut kernel, "SIGTERM"); stopping = true; let _ = stop_tx.send(true); }
            _ = int.recv(), if !stopping => { stop_capture(&mut kernel, "SIGINT"); stopping = true; let _ = stop_tx.send(true); }
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } }, if !stopping => {
                stop_capture(&mut kernel, "run duration reached");
                stopping = true;
                let _ = stop_tx.send(true);
            }
        }
    }
    match reader.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(AgentError::Reader(e)),
        Err(e) => warn!("ring buffer reader task ended abnormally: {e}"),
    }
    pipeline.finish();
    pipeline.flush_stats();
    shipper.write(&mut pipeline.out, &mut pipeline.security_out);
    if let Some(a) = pipeline.attributor.as_mut() {
        a.save(&stats);
        stats.set("sessions_known", a.sessions_known() as u64);
    }
    apply_actions(&mut pipeline, &mut kernel, &stats, &host);
    shipper.write(&mut pipeline.out, &mut pipeline.security_out);
    save_decisions(&mut pipeline, &plan.state_dir, &stats, &feed);
    save_detector(&pipeline, &plan.state_dir, &stats);
    let _ = std::fs::remove_file(plan.state_dir.join(crate::control::SOCKET_FILE));
    let state = report(&kernel, &discovery, &stats, started, 0, false);
    let spool = shipper.stop(state, DRAIN_TIMEOUT);
    let last = report(&kernel, &discovery, &stats, started, 0, true);
    write_stats(&plan.state_dir, &last, Some(spool));
    info!("sparbar stopped; probes detached");
    Ok(())
}

fn publish_services(d: &Discovery, services: &Services) {
    if let Ok(mut m) = services.write() {
        m.clear();
        for (pid, p) in &d.procs {
            if let Some(t) = p.target {
                m.insert(*pid, d.targets()[t].name.clone());
            }
        }
    }
}

/// Tells the kernel which processes are the platform's edge (`detection.services`): only their
/// reads are scanned for blocked tokens. Behind a proxy, the app's upstream connections carry
/// many users' requests and must never be blocked.
fn mark_edge(
    d: &Discovery,
    kernel: &mut Kernel,
    edge: &[String],
    marked: &mut std::collections::BTreeSet<u32>,
) {
    if !kernel.enforcing() {
        return;
    }
    for (pid, p) in &d.procs {
        let Some(t) = p.target else { continue };
        let name = &d.targets()[t].name;
        if (edge.is_empty() || edge.contains(name)) && marked.insert(*pid) {
            if let Err(e) = kernel.set_edge_tgid(*pid, true) {
                warn!("marking pid {pid} as the edge for enforcement: {e}");
            }
        }
    }
    marked.retain(|pid| d.procs.contains_key(pid));
}

/// Logs the counters (one line, drops called out) and writes `<state_dir>/stats.json`.
fn report(
    kernel: &Kernel,
    d: &Discovery,
    stats: &Stats,
    started: Instant,
    open_conns: usize,
    last: bool,
) -> serde_json::Value {
    let k = kernel.counters();
    let kernel_map = kernel_counters(&k);
    let agent = stats.snapshot();
    let losses: Vec<String> = losses(&k, &agent)
        .into_iter()
        .map(|(n, v)| format!("{n}={v}"))
        .collect();
    let records = records_spooled(&agent);
    info!(
        "{}stats: kernel events {} ({} payload bytes), exchanges {}, records {}, open connections {}, losses: {}",
        if last { "final " } else { "" },
        k[tracer_common::C_EVENTS_SENT as usize],
        k[tracer_common::C_BYTES_CAPTURED as usize],
        agent.get("exchanges_parsed_total").copied().unwrap_or(0),
        records,
        open_conns,
        if losses.is_empty() { "none".to_string() } else { losses.join(", ") }
    );
    let libs: Vec<serde_json::Value> = d
        .libraries()
        .into_iter()
        .map(|l| serde_json::json!({"path": l.path, "kind": l.kind, "attached": l.attached, "errors": l.errors}))
        .collect();
    let doc = serde_json::json!({
        "uptime_seconds": started.elapsed().as_secs_f64(),
        "final": last,
        "kernel": kernel_map,
        "agent": agent,
        "tracepoints": kernel.tracepoints,
        "libraries": libs,
        "targets": d.procs.values().map(|p| serde_json::json!({"pid": p.pid, "name": p.name, "executable": p.executable})).collect::<Vec<_>>(),
    });
    doc
}

/// The kernel's counters by name, as in `stats.json`.
fn kernel_counters(k: &[u64]) -> BTreeMap<String, u64> {
    k.iter()
        .enumerate()
        .filter(|(i, _)| COUNTER_NAMES.get(*i).is_some_and(|n| !n.is_empty()))
        .map(|(i, v)| (COUNTER_NAMES[i].to_string(), *v))
        .collect()
}

/// Every loss counter above zero, the kernel's first.
fn losses(k: &[u64], agent: &BTreeMap<String, u64>) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = LOSS_COUNTERS
        .iter()
        .filter(|&&i| k[i as usize] > 0)
        .map(|&i| (COUNTER_NAMES[i as usize].to_string(), k[i as usize]))
        .collect();
    out.extend(
        agent
            .iter()
            .filter(|(n, v)| **v > 0 && stats::is_loss(n))
            .map(|(n, v)| (n.clone(), *v)),
    );
    out
}

/// Records written to the spool, both streams.
fn records_spooled(agent: &BTreeMap<String, u64>) -> u64 {
    agent
        .iter()
        .filter(|(n, _)| n.starts_with("records_spooled_total"))
        .map(|(_, v)| *v)
        .sum()
}

/// How far back `sparbar status` rates look.
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// Renders the Prometheus page from the agent's state; names that cannot be exposed are logged
/// once each.
fn metrics_page(
    kernel: &Kernel,
    d: &Discovery,
    p: &Pipeline,
    shipper: &Shipper,
    agent: &BTreeMap<String, u64>,
    started: Instant,
    warned: &mut BTreeSet<String>,
) -> String {
    use crate::metrics::{Inputs, Library};
    let kernel_map = kernel_counters(&kernel.counters());
    let libs = d.libraries();
    let usage = shipper.usage();
    let mut targets: BTreeMap<&str, u64> =
        d.targets().iter().map(|t| (t.name.as_str(), 0)).collect();
    for proc_ in d.procs.values() {
        if let Some(t) = proc_.target.and_then(|t| d.targets().get(t)) {
            *targets.entry(t.name.as_str()).or_default() += 1;
        }
    }
    let mut decisions_active: BTreeMap<&str, u64> = BTreeMap::new();
    for dec in &p.decisions.active {
        *decisions_active.entry(dec.scope.as_str()).or_default() += 1;
    }
    let spool_bytes = usage["streams"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(s, v)| (s.clone(), v["bytes"].as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    let (page, bad) = crate::metrics::build(&Inputs {
        uptime: started.elapsed(),
        version: env!("CARGO_PKG_VERSION"),
        agent,
        kernel: &kernel_map,
        libraries: libs
            .iter()
            .map(|l| Library {
                path: &l.path,
                kind: l.kind,
                attached: l.attached.len(),
                failed: l.errors.len(),
            })
            .collect(),
        tracepoints: kernel
            .tracepoints
            .iter()
            .map(|(n, e)| (n.as_str(), e.is_none()))
            .collect(),
        targets,
        open_connections: p.open_connections() as u64,
        decisions_active,
        spool_bytes,
        spool_max_bytes: usage["max_bytes"].as_u64().unwrap_or(0),
        security_pending: usage["security_pending"].as_u64().unwrap_or(0),
    });
    for (name, e) in bad {
        if warned.insert(name) {
            warn!("metrics: not exposed: {e}");
        }
    }
    page
}

/// The answer to `sparbar status`: what is traced, how fast, and what is lost or waiting.
fn status(
    kernel: &Kernel,
    d: &Discovery,
    p: &Pipeline,
    shipper: &Shipper,
    stats: &Stats,
    rates: &crate::metrics::Rates,
    started: Instant,
) -> serde_json::Value {
    use serde_json::json;
    let k = kernel.counters();
    let agent = stats.snapshot();
    let libs = d.libraries();
    let mut procs: Vec<_> = d.procs.values().collect();
    procs.sort_by_key(|p| p.pid);
    let targets: Vec<serde_json::Value> = procs
        .iter()
        .map(|proc_| {
            let spec = proc_.target.and_then(|t| d.targets().get(t));
            // The libraries mapped in this process now (and its executable, for static OpenSSL).
            let maps = std::fs::read_to_string(format!("/proc/{}/maps", proc_.pid)).unwrap_or_default();
            let mapped: BTreeSet<&str> = maps
                .lines()
                .filter_map(|l| l.split_whitespace().nth(5))
                .collect();
            let tls: Vec<serde_json::Value> = libs
                .iter()
                .filter(|l| {
                    mapped.contains(l.path.as_str())
                        || proc_.executable.as_deref() == Some(l.path.as_str())
                })
                .map(|l| json!({"path": l.path, "kind": l.kind, "probes": l.attached, "errors": l.errors}))
                .collect();
            json!({
                "pid": proc_.pid,
                "name": proc_.name,
                "executable": proc_.executable,
                "target": spec.map(|s| s.name.as_str()),
                "tls": spec.is_some_and(|s| s.tls),
                "tls_libraries": tls,
            })
        })
        .collect();
    let (exchanges_ps, records_ps, window) = rates.rates();
    let failed: BTreeMap<&str, &str> = kernel
        .tracepoints
        .iter()
        .filter_map(|(n, e)| e.as_deref().map(|e| (n.as_str(), e)))
        .collect();
    json!({
        "ok": true,
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "uptime_seconds": started.elapsed().as_secs_f64(),
        "targets": targets,
        "libraries": libs.iter().map(|l| json!({"path": l.path, "kind": l.kind, "probes": l.attached, "errors": l.errors})).collect::<Vec<_>>(),
        "tracepoints": {"attached": kernel.tracepoints.len() - failed.len(), "failed": failed},
        "rates": {"window_seconds": window, "exchanges_per_second": exchanges_ps, "records_per_second": records_ps},
        "exchanges_parsed_total": agent.get("exchanges_parsed_total").copied().unwrap_or(0),
        "records_spooled_total": records_spooled(&agent),
        "open_connections": p.open_connections(),
        "decisions_open": p.decisions.active.len(),
        "spool": shipper.usage(),
        "sink_lag": shipper.lag(),
        "losses": losses(&k, &agent).into_iter().collect::<BTreeMap<_, _>>(),
    })
}

/// `<state_dir>/stats.json`: the report, with the spool's figures when there are any.
fn write_stats(
    state_dir: &std::path::Path,
    doc: &serde_json::Value,
    spool: Option<serde_json::Value>,
) {
    let mut doc = doc.clone();
    doc["spool"] = spool.unwrap_or(serde_json::Value::Null);
    let path = state_dir.join("stats.json");
    let tmp = state_dir.join("stats.json.tmp");
    let res = std::fs::write(&tmp, serde_json::to_vec_pretty(&doc).unwrap_or_default())
        .and_then(|_| std::fs::rename(&tmp, &path));
    if let Err(e) = res {
        warn!("writing {}: {e}", path.display());
    }
}

fn restore_detection(p: &mut Pipeline, dir: &std::path::Path, stats: &Stats) {
    match std::fs::read(dir.join(DECISIONS_FILE)) {
        Ok(b) => match serde_json::from_slice::<crate::decide::Decisions>(&b) {
            Ok(d) => {
                info!(
                    "restored {} active decisions from {}",
                    d.active.len(),
                    dir.join(DECISIONS_FILE).display()
                );
                p.decisions = d;
            }
            Err(e) => {
                warn!(
                    "{}: cannot be read ({e}); starting with no decisions",
                    dir.join(DECISIONS_FILE).display()
                );
                stats.add_reason("state_files_rejected_total", "decisions", 1);
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!("{}: {e}", dir.join(DECISIONS_FILE).display()),
    }
    match std::fs::read(dir.join(DETECTOR_FILE)) {
        Ok(b) => match p.detector.restore(&b) {
            Ok(n) => info!("restored detector state of {n} keys"),
            Err(e) => {
                warn!(
                    "{}: cannot be read ({e}); detectors start empty",
                    dir.join(DETECTOR_FILE).display()
                );
                stats.add_reason("state_files_rejected_total", "detector", 1);
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!("{}: {e}", dir.join(DETECTOR_FILE).display()),
    }
}

/// The decision file is also the feed for a cooperating enforcement point (a reverse proxy).
fn save_decisions(
    p: &mut Pipeline,
    dir: &std::path::Path,
    stats: &Stats,
    feed: &crate::feed::Feed,
) {
    if !p.decisions.changed {
        return;
    }
    feed.publish(&p.decisions.active);
    let bytes = serde_json::to_vec_pretty(&p.decisions).unwrap_or_default();
    match save_private(dir, DECISIONS_FILE, &bytes) {
        Ok(()) => p.decisions.changed = false,
        Err(e) => {
            stats.add_reason("state_save_errors_total", "decisions", 1);
            warn!("saving {}: {e}", dir.join(DECISIONS_FILE).display());
        }
    }
}

fn save_detector(p: &Pipeline, dir: &std::path::Path, stats: &Stats) {
    if p.detector.rules().is_empty() {
        return;
    }
    stats.set("detector_keys_tracked", p.detector.tracked() as u64);
    if let Err(e) = save_private(dir, DETECTOR_FILE, &p.detector.to_json()) {
        stats.add_reason("state_save_errors_total", "detector", 1);
        warn!("saving {}: {e}", dir.join(DETECTOR_FILE).display());
    }
}

fn control_command(
    p: &mut Pipeline,
    req: crate::control::Request,
    test_clock: bool,
) -> serde_json::Value {
    use crate::control::Request;
    use crate::decide::Scope;
    use serde_json::json;
    let scope = |s: &str| match s {
        "user" => Some(Scope::User),
        "session" => Some(Scope::Session),
        _ => None,
    };
    match req {
        Request::Block {
            scope: sc,
            value,
            duration_ms,
            reason,
        } => match scope(&sc) {
            Some(sc) if !value.is_empty() && duration_ms > 0 => {
                let d = p.operator_block(sc, value, duration_ms, reason, now_unix_ms());
                info!(
                    "operator blocked {} {} until {} (decision {})",
                    d.scope.as_str(),
                    d.value,
                    d.until_ms,
                    d.id
                );
                json!({"ok": true, "decision": d})
            }
            _ => {
                json!({"ok": false, "error": "expected scope \"user\" or \"session\", a value and a duration above 0"})
            }
        },
        Request::Unblock { scope: sc, value } => match scope(&sc) {
            Some(sc) => {
                let n = p.operator_unblock(sc, &value, now_unix_ms());
                info!(
                    "operator unblocked {} {}: {n} decisions ended",
                    sc.as_str(),
                    value
                );
                json!({"ok": true, "ended": n})
            }
            None => json!({"ok": false, "error": "expected scope \"user\" or \"session\""}),
        },
        Request::Decisions => json!({"ok": true, "active": p.decisions.active}),
        // Answered by the loop, which holds the kernel, discovery and the shipper.
        Request::Status => json!({"ok": false, "error": "status is answered by the agent loop"}),
        Request::Clock { advance_ms } => {
            if test_clock {
                p.clock_offset_ms += advance_ms as i64;
                p.tick(now_unix_ms());
                json!({"ok": true, "offset_ms": p.clock_offset_ms})
            } else {
                json!({"ok": false, "error": "the test clock is off (run --test-clock)"})
            }
        }
    }
}

/// Says which configured plaintext ports nothing listens on yet. The kernel filters on the port
/// itself, so their traffic is captured as soon as a server listens there.
fn warn_unserved_ports(ports: &[u16]) {
    let listening = crate::procfs::listening_ports();
    for p in ports.iter().filter(|p| !listening.contains(p)) {
        warn!("nothing listens on plaintext port {p} yet; its traffic is captured as soon as a server does");
    }
}

/// The first step of a stop: no more capture, so the reader's final drain reads everything the
/// kernel captured up to here.
fn stop_capture(kernel: &mut Kernel, why: &str) {
    let n = kernel.stop_capture();
    info!("{why}: {n} capture programs detached; draining what the kernel captured, then stopping");
}
