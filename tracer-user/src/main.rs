//! `sparbar`: parse the command line, set up logging, run.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use sparbar::{agent, config, ops::control, verify};

fn scope_value(user: Option<String>, session: Option<String>) -> (String, String) {
    match (user, session) {
        (Some(u), _) => ("user".into(), u),
        (None, Some(s)) => ("session".into(), s),
        (None, None) => ("user".into(), String::new()),
    }
}

/// Sends one request to the agent running with `config` and prints its answer.
fn control(config: &std::path::Path, req: &control::Request) -> ExitCode {
    let cfg = match config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match control::call(&cfg.agent.state_dir, req) {
        Ok(v) => {
            println!("{v}");
            if v["ok"] == serde_json::Value::Bool(true) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Parser)]
#[command(
    name = "sparbar",
    version,
    about = "Traces who read whose personal data through a platform's HTTP APIs, from eBPF"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent.
    Run {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Stop by itself after this many seconds (for demos and tests).
        #[arg(long, value_name = "SECONDS")]
        duration: Option<u64>,
        /// Also copy every raw kernel event to FILE (for replay fixtures and debugging; the
        /// file holds captured payload, so keep it private).
        #[arg(long, value_name = "FILE", hide = true)]
        tap_events: Option<PathBuf>,
        /// Accept clock-advance commands on the control socket (tests that compress days).
        #[arg(long, hide = true)]
        test_clock: bool,
    },
    /// Block a user (all their sessions) or one session in the running agent.
    Block {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// The user id (`user.id` in records).
        #[arg(long, conflicts_with = "session", required_unless_present = "session")]
        user: Option<String>,
        /// The session hash (`session.id` in records).
        #[arg(long)]
        session: Option<String>,
        /// How long, e.g. "15m", "2h".
        #[arg(long, default_value = "1h")]
        duration: String,
        /// Why (goes into the decision record).
        #[arg(long, default_value = "operator decision")]
        reason: String,
    },
    /// End the blocks of a user or a session in the running agent.
    Unblock {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        #[arg(long, conflicts_with = "session", required_unless_present = "session")]
        user: Option<String>,
        #[arg(long)]
        session: Option<String>,
    },
    /// List the decisions in force in the running agent (JSON).
    Decisions {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// What the running agent traces, its rates, decisions open, spool, sink lag and losses.
    Status {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Print the JSON document instead of the report.
        #[arg(long)]
        json: bool,
    },
    /// Move the running agent's detection clock forward (only with `run --test-clock`).
    #[command(hide = true)]
    AdvanceClock {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        #[arg(long)]
        by: String,
    },
    /// Validate a configuration file and explain every problem; nothing else.
    CheckConfig {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Check audit-trail files for edited, deleted or reordered records (exit 0: none found,
    /// 1: problems found, 2: could not check).
    Verify {
        /// The agent's checkpoint.pub, kept apart from the trail (repeat it for an older key).
        #[arg(long, value_name = "CHECKPOINT_PUB")]
        key: Vec<PathBuf>,
        /// Print a JSON document instead of the report.
        #[arg(long)]
        json: bool,
        /// The sink that wrote the files: only gaps stated for it excuse missing records.
        #[arg(long, value_name = "NAME")]
        sink: Option<String>,
        /// Files, or directories (every *.jsonl* file in them, rotated and .gz ones included).
        #[arg(required = true, value_name = "FILE_OR_DIR")]
        paths: Vec<PathBuf>,
    },
    /// Check this host for what the agent needs and say what each missing piece disables
    /// (exit 0: nothing FAILs, 1: something does).
    Doctor {
        /// The configuration whose targets to look for (default: /etc/sparbar/sparbar.toml, if
        /// it exists).
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Print the JSON document instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Print a man page or a shell completion script (for packagers).
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        what: Generate,
    },
}

#[derive(Subcommand)]
enum Generate {
    /// The man page sparbar(1), or sparbar-SUBCOMMAND(1).
    Man {
        /// The subcommand to print the page of.
        subcommand: Option<String>,
        /// List the subcommands that have a page, one per line, instead.
        #[arg(long, conflicts_with = "subcommand")]
        list: bool,
    },
    /// The completion script for a shell.
    Completions { shell: clap_complete::Shell },
}

/// Writes a man page, the list of subcommand pages, or a completion script to stdout.
fn generate(what: Generate) -> ExitCode {
    use clap::CommandFactory;
    use std::io::Write as _;
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    // Rendered in memory first: clap_complete panics on a write error such as a closed pipe.
    let mut text = Vec::new();
    let page = match what {
        Generate::Completions { shell } => {
            clap_complete::generate(shell, &mut cmd, "sparbar", &mut text);
            None
        }
        Generate::Man { list: true, .. } => {
            for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
                text.extend_from_slice(format!("{}\n", sub.get_name()).as_bytes());
            }
            None
        }
        Generate::Man {
            subcommand: None, ..
        } => Some(cmd),
        Generate::Man {
            subcommand: Some(name),
            ..
        } => match cmd.find_subcommand(&name).filter(|s| !s.is_hide_set()) {
            Some(sub) => Some(sub.clone()),
            None => {
                eprintln!("generate man: sparbar has no subcommand {name:?}; see `sparbar generate man --list`");
                return ExitCode::from(2);
            }
        },
    };
    if let Some(page) = page {
        let man =
            clap_mangen::Man::new(page).source(concat!("sparbar ", env!("CARGO_PKG_VERSION")));
        if let Err(e) = man.render(&mut text) {
            eprintln!("generate man: {e}");
            return ExitCode::FAILURE;
        }
    }
    match std::io::stdout().lock().write_all(&text) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("generate: writing to stdout: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Generate { what } => generate(what),
        Cmd::Doctor { config, json } => {
            ExitCode::from(sparbar::ops::doctor::command(config.as_deref(), json))
        }
        Cmd::CheckConfig { config } => match config::load(&config) {
            Ok(_) => {
                println!("{}: configuration is valid", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Cmd::Verify {
            key,
            json,
            sink,
            paths,
        } => ExitCode::from(verify::command(
            &verify::Options {
                paths,
                keys: key,
                sink,
            },
            json,
        )),
        Cmd::Block {
            config,
            user,
            session,
            duration,
            reason,
        } => {
            let ms = match config::parse_duration(&duration) {
                Ok(d) => d.as_millis() as u64,
                Err(e) => {
                    eprintln!("--duration: {e}");
                    return ExitCode::from(2);
                }
            };
            let (scope, value) = scope_value(user, session);
            control(
                &config,
                &control::Request::Block {
                    scope,
                    value,
                    duration_ms: ms,
                    reason,
                },
            )
        }
        Cmd::Unblock {
            config,
            user,
            session,
        } => {
            let (scope, value) = scope_value(user, session);
            control(&config, &control::Request::Unblock { scope, value })
        }
        Cmd::Decisions { config } => control(&config, &control::Request::Decisions),
        Cmd::Status { config, json } => ExitCode::from(control::status_command(&config, json)),
        Cmd::AdvanceClock { config, by } => match config::parse_duration(&by) {
            Ok(d) => control(
                &config,
                &control::Request::Clock {
                    advance_ms: d.as_millis() as u64,
                },
            ),
            Err(e) => {
                eprintln!("--by: {e}");
                ExitCode::from(2)
            }
        },
        Cmd::Run {
            config,
            duration,
            tap_events,
            test_clock,
        } => {
            let cfg = match config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            let plan = match agent::Plan::from_config(&cfg) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("{}: {e}", config.display());
                    return ExitCode::from(2);
                }
            };
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(agent::run(
                plan,
                agent::RunOptions {
                    duration: duration.map(Duration::from_secs),
                    tap_events,
                    test_clock,
                    config_path: Some(config.clone()),
                },
            )) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    log::error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
