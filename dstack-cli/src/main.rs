//! The `dstack` command-line interface.

mod validate;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// dstack-rs: run AI workloads on this machine, your own servers, or the cloud.
#[derive(Parser)]
#[command(name = "dstack", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check configuration files and show them normalized, as dstack would read them.
    ///
    /// Exits 0 when every file is valid and 1 when any is not; each problem is printed on
    /// stderr as FILE:LINE:COL: FIELD: MESSAGE [CODE].
    Validate(validate::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate(args) => validate::run(&args),
    }
}
