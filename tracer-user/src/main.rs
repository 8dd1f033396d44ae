use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use sparbar::{decode::Event, discovery::{Discovery, Match, TargetSpec}, loader};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Debug: print raw decoded events for the given targets.
    Dump {
        #[arg(long)]
        exe: Vec<PathBuf>,
        #[arg(long)]
        pid: Vec<u32>,
        #[arg(long)]
        port: Vec<u16>,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Dump { exe, pid, port, seconds } => {
            let mut k = loader::load(&loader::LoadSettings {
                ring_buffer_size: 16 << 20,
                max_connections: 65536,
                max_message_bytes: 256 << 10,
                plaintext_ports: port,
                comms: vec![],
                cgroup_ids: vec![],
            })?;
            let mut specs: Vec<TargetSpec> = exe.into_iter().map(|e| TargetSpec { matcher: Match::Exe(e), tls: true, name: "x".into() }).collect();
            specs.extend(pid.into_iter().map(|p| TargetSpec { matcher: Match::Pid(p), tls: true, name: "p".into() }));
            let mut d = Discovery::new(specs);
            d.scan(&mut k);
            let mut ring = k.take_events()?;
            let end = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
            while std::time::Instant::now() < end {
                while let Some(item) = ring.next() {
                    match sparbar::decode::decode(&item) {
                        Ok(Event::Data { hdr, conn, pos, msg_len, dir, payload, .. }) => println!(
                            "DATA {:?} flags={} pos={pos} msg_len={msg_len} dir={dir} {:?}",
                            conn, hdr.flags, String::from_utf8_lossy(&payload[..payload.len().min(60)])
                        ),
                        Ok(ev) => println!("{ev:?}"),
                        Err(e) => println!("ERR {e}"),
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            println!("counters: {:?}", k.counters());
        }
    }
    Ok(())
}
