//! Runs the agent: load and attach, discover targets, read the ring buffer, run the pipeline,
//! commit its effects (kernel actions, records, decisions), report counters, and stop cleanly
//! on SIGTERM/SIGINT (draining what the kernel already captured). Every arm of the loop ends
//! in one [`commit::commit`] of the effects it produced.

pub mod commit;
mod host;
pub mod plan;
mod report;
mod state;

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use log::{error, info, warn};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{mpsc, watch},
};

pub use self::plan::Plan;
pub use self::state::{DECISIONS_FILE, DETECTOR_FILE, TEST_CLOCK_FILE};
use self::{
    commit::commit,
    host::{warn_unserved_ports, Host},
    plan::{fixed, load_plan, restart_only},
    report::{metrics_page, records_spooled, report, status, write_stats, RATE_WINDOW},
    state::{restore_detection, save_detector, Outputs},
};
use crate::{
    attribute::attribution::{Attributor, Keyer},
    capture::loader,
    capture::source,
    pipeline::{self, Effects, Pipeline},
    ship::shipper::{ShipError, Shipper, DRAIN_TIMEOUT},
    stats::{Metric, Stats},
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
    Attribution(#[from] crate::attribute::attribution::AttributionError),
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

/// Why a SIGHUP's configuration was rejected (the running one stays).
#[derive(Debug, thiserror::Error)]
enum ReloadError {
    #[error("the agent was started without a configuration file")]
    NoConfigFile,
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    #[error(transparent)]
    Sinks(#[from] crate::ship::shipper::ShipError),
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub async fn run(mut plan: Plan, opts: RunOptions) -> Result<(), AgentError> {
    let started = Instant::now();
    std::fs::create_dir_all(&plan.state_dir).map_err(|e| AgentError::StateDir {
        path: plan.state_dir.clone(),
        source: e,
    })?;
    let stats = Arc::new(Stats::default());
    let shipper = Shipper::start(
        &plan.spool,
        &plan.sinks,
        &plan.state_dir,
        &plan.pipeline_host,
        stats.clone(),
    )?;
    let mut out = Outputs::new(shipper, plan.state_dir.clone(), stats.clone());
    commit::Trail::write(&mut out, &mut Vec::new(), &mut Vec::new());

    let fixed_at_start = fixed(&plan);
    let mut kernel = loader::load(&plan.load)?;
    if plan.enforce {
        if let Err(e) = kernel.attach_enforce() {
            error!("enforcement is OFF: {e}. Tracing, detection and alerts go on; decisions are recorded but not enforced");
            stats.add_reason(Metric::EnforcementAttachFailures, "egress", 1);
        }
    }
    let mut host = Host::new(kernel, plan.targets.clone(), plan.edge_services.clone());
    host.scan();
    warn_unserved_ports(&plan.load.plaintext_ports);

    let ring = host.kernel.take_events()?;
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

    let mut pipeline = Pipeline::new(plan.pipeline, host.services.clone(), stats.clone());
    let mut attributor = Attributor::new(plan.identity, Keyer::load_or_create(&plan.state_dir)?);
    attributor.attach_state(&plan.state_dir, &stats);
    if host.kernel.enforcing() {
        let tokens = attributor.kernel_patterns();
        let (tenant, skipped) = if attributor.learns_tenants() {
            pipeline.kernel_tenant_patterns()
        } else {
            (Vec::new(), Vec::new())
        };
        for s in &skipped {
            warn!("cross-tenant attempts on route {s}; the agent's request-time check covers it");
        }
        let mut set = host.kernel.set_token_patterns(&tokens, &tenant);
        if let (Err(e), false) = (&set, tenant.is_empty()) {
            error!("cross-tenant attempts cannot be recognised in the kernel: {e}; the agent's request-time check stops them once it has read them");
            stats.add_reason(Metric::EnforcementAttachFailures, "tenant_patterns", 1);
            set = host.kernel.set_token_patterns(&tokens, &[]);
        }
        match set {
            Ok(()) => {
                // The seed comes from the agent's secret, so the kernel hashes kept with the
                // learned sessions stay valid across restarts.
                let seed = attributor.derived_token_seed();
                if let Err(e) = host.kernel.set_token_seed(seed) {
                    error!("the kernel's token seed: {e}; sessions learned before this start are recognised in the kernel only once seen again");
                    stats.add_reason(Metric::EnforcementAttachFailures, "token_seed", 1);
                }
                attributor.set_token_seed(host.kernel.token_seed());
                pipeline.set_kernel_tenant_checks(host.kernel.tenant_checks());
            }
            Err(e) => {
                error!("blocked sessions cannot be recognised in the kernel: {e}; blocks apply to connections the agent has seen only");
                stats.add_reason(Metric::EnforcementAttachFailures, "tokens", 1);
            }
        }
    }
    pipeline.set_attributor(attributor);
    pipeline.hand_kernel_sessions();
    restore_detection(&mut pipeline, &plan.state_dir, &stats);
    if opts.test_clock {
        pipeline.set_clock_offset_ms(
            std::fs::read_to_string(plan.state_dir.join(TEST_CLOCK_FILE))
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0),
        );
        warn!(
            "test clock on: detection time runs {} ms ahead of the wall clock; never use --test-clock in production",
            pipeline.clock_offset_ms()
        );
    }
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<crate::ops::control::Command>(16);
    let _ctl =
        crate::ops::control::listen(&plan.state_dir, ctl_tx).map_err(|e| AgentError::StateDir {
            path: plan.state_dir.join(crate::ops::control::SOCKET_FILE),
            source: e,
        })?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    out.feed.publish(&pipeline.decisions().active);
    let _feed_task = match plan.feed_listen {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                info!("decision feed on http://{addr}/decisions and /decisions/stream");
                Some(out.feed.serve(l))
            }
            Err(e) => {
                error!(
                    "decision feed: cannot listen on {addr}: {e}; decisions are still in {}",
                    plan.state_dir.join(DECISIONS_FILE).display()
                );
                stats.add_reason(Metric::FeedFailures, "listen", 1);
                None
            }
        },
        None => None,
    };
    let metrics = match plan.metrics_listen {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                let ep = crate::ops::metrics::Endpoint::default().counting(stats.clone());
                let page = metrics_page(
                    &host.kernel,
                    &host.discovery,
                    &pipeline,
                    &out.shipper,
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
                stats.add_reason(Metric::MetricsFailures, "listen", 1);
                None
            }
        },
        None => None,
    };
    let mut metrics_warned = BTreeSet::new();
    let mut rates = crate::ops::metrics::Rates::new(RATE_WINDOW);
    let mut term = signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
    let mut hup = signal(SignalKind::hangup()).map_err(AgentError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;
    let mut scan_tick = tokio::time::interval(Duration::from_secs(1));
    let mut stats_tick = tokio::time::interval(plan.stats_interval);
    stats_tick.tick().await;
    let deadline = opts.duration.map(|d| tokio::time::Instant::now() + d);
    let mut scans = 0u64;
    info!(
        "sparbar running: records go to {}",
        plan.output_file.display()
    );
    // Probes are attached and sinks open: tell systemd (Type=notify), and keep its watchdog fed.
    if let Err(e) = crate::ops::notify::ready() {
        warn!("telling systemd the agent is ready: {e}");
    }
    let mut watchdog = tokio::time::interval(
        crate::ops::notify::watchdog_interval()
            .map(|d| d / 2)
            .unwrap_or(Duration::from_secs(3600)),
    );

    loop {
        tokio::select! {
            batch = rx.recv() => {
                let Some(batch) = batch else { break };
                let fx = pipeline.handle(batch);
                commit(&mut pipeline, fx, &mut host, &mut out, &stats);
            }
            _ = scan_tick.tick(), if !host.stopping() => {
                host.scan();
                scans += 1;
                let mut fx = Effects::default();
                if scans.is_multiple_of(30) {
                    // Keep-alive connections idle for 15 minutes whose close we never saw.
                    fx = pipeline.expire_idle(pipeline::monotonic_ns(), 15 * 60 * 1_000_000_000);
                    let pruned = host.kernel.prune_conns(|tgid| std::path::Path::new(&format!("/proc/{tgid}")).exists());
                    stats.add(Metric::KernelConnectionsPruned, pruned as u64);
                }
                commit(&mut pipeline, fx, &mut host, &mut out, &stats);
            }
            _ = tick.tick() => {
                out.shipper.tick();
                let fx = pipeline.tick(now_unix_ms());
                commit(&mut pipeline, fx, &mut host, &mut out, &stats);
                let agent = stats.snapshot();
                rates.push(Instant::now(), agent.get(Metric::ExchangesParsed.name()).copied().unwrap_or(0), records_spooled(&agent));
                if let Some((ep, _)) = &metrics {
                    ep.publish(metrics_page(&host.kernel, &host.discovery, &pipeline, &out.shipper, &agent, started, &mut metrics_warned));
                }
            }
            cmd = ctl_rx.recv() => {
                if let Some((req, reply)) = cmd {
                    let (answer, fx) = match req {
                        crate::ops::control::Request::Status => (status(&host.kernel, &host.discovery, &pipeline, &out.shipper, &stats, &rates, started), Effects::default()),
                        req => control_command(&mut pipeline, req, opts.test_clock),
                    };
                    if opts.test_clock {
                        let _ = std::fs::write(plan.state_dir.join(TEST_CLOCK_FILE), pipeline.clock_offset_ms().to_string());
                    }
                    commit(&mut pipeline, fx, &mut host, &mut out, &stats);
                    let _ = reply.send(answer);
                }
            }
            _ = stats_tick.tick() => {
                save_detector(&pipeline, &plan.state_dir, &stats);
                if let Some(a) = pipeline.attributor_mut() {
                    a.expire(&stats);
                    a.save(&stats);
                    stats.set(Metric::SessionsKnown, a.sessions_known() as u64);
                }
                let state = report(&host.kernel, &host.discovery, &stats, started, pipeline.open_connections(), false);
                write_stats(&plan.state_dir, &state, Some(out.shipper.usage()));
                if out.shipper.state_due() {
                    out.shipper.state_record(state);
                }
            }
            _ = watchdog.tick() => {
                if crate::ops::notify::watchdog_interval().is_some() {
                    let _ = crate::ops::notify::watchdog();
                }
            }
            _ = hup.recv(), if !host.stopping() => {
                let _ = crate::ops::notify::reloading();
                let reload = match opts.config_path.as_deref() {
                    Some(p) => load_plan(p).map_err(ReloadError::from),
                    None => Err(ReloadError::NoConfigFile),
                };
                let applied = reload.and_then(|new| {
                    let (started, stopped) = out.shipper.reconfigure(&new.sinks)?;
                    let later = restart_only(&fixed_at_start, &new);
                    if let Err(e) = host.kernel.set_filters(&new.load) {
                        warn!("reload: the kernel's target filters: {e}");
                    }
                    host.set_targets(new.targets.clone(), new.edge_services.clone());
                    warn_unserved_ports(&new.load.plaintext_ports);
                    let rules = new.pipeline.rules.len();
                    let routes = new.pipeline.routes.len();
                    let dropped = pipeline.reconfigure(new.pipeline);
                    if let Some(a) = pipeline.attributor_mut() {
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
                        stats.add_label(Metric::ConfigReloads, "result", "applied", 1);
                        out.shipper.agent_event("reloaded", d);
                    }
                    Err(e) => {
                        error!("SIGHUP: the new configuration is rejected, the running one stays: {e}");
                        stats.add_label(Metric::ConfigReloads, "result", "rejected", 1);
                        out.shipper.agent_event("reload_rejected", serde_json::json!({"reason": e.to_string()}));
                    }
                }
                let _ = crate::ops::notify::ready();
            }
            _ = term.recv(), if !host.stopping() => { let _ = crate::ops::notify::stopping(); host.stop_capture("SIGTERM"); let _ = stop_tx.send(true); }
            _ = int.recv(), if !host.stopping() => { host.stop_capture("SIGINT"); let _ = stop_tx.send(true); }
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } }, if !host.stopping() => {
                host.stop_capture("run duration reached");
                let _ = stop_tx.send(true);
            }
        }
    }
    match reader.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(AgentError::Reader(e)),
        Err(e) => warn!("ring buffer reader task ended abnormally: {e}"),
    }
    let fx = pipeline.finish();
    commit(&mut pipeline, fx, &mut host, &mut out, &stats);
    if let Some(a) = pipeline.attributor_mut() {
        a.save(&stats);
        stats.set(Metric::SessionsKnown, a.sessions_known() as u64);
    }
    save_detector(&pipeline, &plan.state_dir, &stats);
    let _ = std::fs::remove_file(plan.state_dir.join(crate::ops::control::SOCKET_FILE));
    let state = report(&host.kernel, &host.discovery, &stats, started, 0, false);
    let spool = out.shipper.stop(state, DRAIN_TIMEOUT);
    let last = report(&host.kernel, &host.discovery, &stats, started, 0, true);
    write_stats(&plan.state_dir, &last, Some(spool));
    info!("sparbar stopped; probes detached");
    Ok(())
}

/// An operator's command from the control socket: its answer, and its effects to commit.
fn control_command(
    p: &mut Pipeline,
    req: crate::ops::control::Request,
    test_clock: bool,
) -> (serde_json::Value, Effects) {
    use crate::detect::decide::Scope;
    use crate::ops::control::Request;
    use serde_json::json;
    let answer = |v: serde_json::Value| (v, Effects::default());
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
                let (d, fx) = p.operator_block(sc, value, duration_ms, reason, now_unix_ms());
                info!(
                    "operator blocked {} {} until {} (decision {})",
                    d.scope.as_str(),
                    d.value,
                    d.until_ms,
                    d.id
                );
                (json!({"ok": true, "decision": d}), fx)
            }
            _ => answer(
                json!({"ok": false, "error": "expected scope \"user\" or \"session\", a value and a duration above 0"}),
            ),
        },
        Request::Unblock { scope: sc, value } => match scope(&sc) {
            Some(sc) => {
                let (n, fx) = p.operator_unblock(sc, &value, now_unix_ms());
                info!(
                    "operator unblocked {} {}: {n} decisions ended",
                    sc.as_str(),
                    value
                );
                (json!({"ok": true, "ended": n}), fx)
            }
            None => answer(json!({"ok": false, "error": "expected scope \"user\" or \"session\""})),
        },
        Request::Decisions => answer(json!({"ok": true, "active": p.decisions().active})),
        // Answered by the loop, which holds the kernel, discovery and the shipper.
        Request::Status => {
            answer(json!({"ok": false, "error": "status is answered by the agent loop"}))
        }
        Request::Clock { advance_ms } => {
            if test_clock {
                let fx = p.advance_clock(advance_ms, now_unix_ms());
                (json!({"ok": true, "offset_ms": p.clock_offset_ms()}), fx)
            } else {
                answer(json!({"ok": false, "error": "the test clock is off (run --test-clock)"}))
            }
        }
    }
}
