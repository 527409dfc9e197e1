//! `dstack artifacts list RUN`, `dstack artifacts download RUN [PATH] [-o DIR]`: a run's
//! artifacts (saved while it runs, frozen once it has ended; see `dstack_core::artifacts`).

use std::path::PathBuf;
use std::process::ExitCode;

use dstack_core::Client;

use crate::Failure;

/// `dstack artifacts` subcommands.
#[derive(clap::Subcommand)]
pub enum ArtifactsAction {
    /// List a run's artifacts: each file's path, size and content hash.
    List {
        /// The run.
        run: String,
    },
    /// Download a run's artifacts (those at or below PATH, or all) into DIR at their paths.
    Download {
        /// The run.
        run: String,
        /// A file or directory of the artifacts.
        path: Option<String>,
        /// Where to write them (default: the current directory).
        #[arg(short, long, value_name = "DIR", default_value = ".")]
        output: PathBuf,
    },
}

/// Runs a `dstack artifacts` subcommand.
pub async fn run(client: &Client, action: ArtifactsAction) -> Result<ExitCode, Failure> {
    match action {
        ArtifactsAction::List { run } => {
            let manifest = client.artifacts().list(&run).await?;
            if manifest.files.is_empty() {
                eprintln!("Run {run} has no artifacts (yet)");
            }
            for file in &manifest.files {
                println!("{}\t{}\t{}", file.path, file.size, &file.hash[..12]);
            }
            let state = if manifest.frozen {
                "final"
            } else {
                "the run is still running: a snapshot"
            };
            eprintln!(
                "{} file(s), {} bytes ({state})",
                manifest.files.len(),
                manifest.bytes()
            );
        }
        ArtifactsAction::Download { run, path, output } => {
            let files = client
                .artifacts()
                .download(&run, path.as_deref(), &output)
                .await?;
            eprintln!(
                "Downloaded {} file(s) of run {run} into {}",
                files.len(),
                output.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
