//! `dstack-agent`: the dstack-rs host agent.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use dstack_agent::{AgentConfig, LeaseConfig};

#[derive(Parser)]
#[command(name = "dstack-agent", version, about = "The dstack-rs host agent")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Supervise jobs and serve the agent API on a unix socket.
    Serve(ServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// The unix socket to serve the API on.
    #[arg(long)]
    socket: PathBuf,
    /// The state directory (job records and logs).
    #[arg(long)]
    state_dir: PathBuf,
    /// Run in the background, in a session of its own: exit once the agent answers.
    #[arg(long)]
    detach: bool,
    /// Internal (used by --detach): start a new session and ignore SIGHUP first.
    #[arg(long, hide = true, conflicts_with = "detach")]
    new_session: bool,
    /// Take an owner lease (agents on cloud instances): once no job has run for this many
    /// seconds and no renewal (`POST /api/lease`) came for a lease window, run the shutdown
    /// action.
    #[arg(long, value_name = "SECS")]
    lease_idle: Option<u64>,
    /// How long the owner lease lasts without a renewal, in seconds.
    #[arg(long, value_name = "SECS", requires = "lease_idle",
          default_value_t = dstack_agent::DEFAULT_LEASE_WINDOW.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    lease_window: u64,
    /// The shutdown action, run with `sh -c` when the lease lapses (default: power the host
    /// off, through `sudo -n` unless the agent runs as root).
    #[arg(long, value_name = "COMMAND", requires = "lease_idle")]
    shutdown_command: Option<String>,
}

fn main() -> ExitCode {
    let Cmd::Serve(args) = Cli::parse().command;
    let mut config = AgentConfig::new(args.socket, args.state_dir);
    config.lease = args.lease_idle.map(|idle| LeaseConfig {
        idle: Duration::from_secs(idle),
        window: Duration::from_secs(args.lease_window),
        shutdown_command: args.shutdown_command,
    });
    if args.new_session {
        if let Err(e) = dstack_agent::close_inherited_fds() {
            eprintln!("dstack-agent: cannot close inherited descriptors: {e}");
            return ExitCode::FAILURE;
        }
    }
    // One thread: the agent multiplexes I/O and child processes, and copies job output on
    // threads of its own; a single-threaded runtime hands work between threads less often.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let result = runtime.and_then(|runtime| {
        runtime.block_on(async {
            if args.detach {
                let program = std::env::current_exe()?;
                return dstack_agent::start_in_background(&program, &config)
                    .await
                    .map(drop);
            }
            if args.new_session {
                dstack_agent::new_session()?;
            }
            dstack_agent::serve(config).await
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dstack-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
