//! `sparbar`: parse the command line, set up logging, run.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use sparbar::{agent, config};

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
    },
    /// Validate a configuration file and explain every problem; nothing else.
    CheckConfig {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
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
        Cmd::Run {
            config,
            duration,
            tap_events,
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
