//! `dstack tags add TAG RUN`, `dstack tags add TAG --artifact PATH…`, `dstack tags list`,
//! `dstack tags delete TAG`: names for a finished run's artifacts (a tag of the run's
//! workflow: `prepare:latest`) or for files uploaded from here (`:TAG`), which
//! `depends-on` puts into later runs.

use std::path::PathBuf;
use std::process::ExitCode;

use dstack_core::Client;

use crate::Failure;

/// `dstack tags` subcommands.
#[derive(clap::Subcommand)]
pub enum TagsAction {
    /// Tag a finished run's artifacts, or upload local files as a tagged artifact set.
    Add {
        /// The tag's name.
        tag: String,
        /// The finished run whose artifacts it names.
        #[arg(required_unless_present = "artifacts", conflicts_with = "artifacts")]
        run: Option<String>,
        /// A local file or directory to upload (repeat for several).
        #[arg(long = "artifact", value_name = "PATH")]
        artifacts: Vec<PathBuf>,
    },
    /// List the tags (the default).
    List,
    /// Delete a tag (TAG, WORKFLOW:TAG or :TAG); the artifacts it named stay with their run.
    Delete {
        /// The tag.
        tag: String,
    },
}

/// Runs a `dstack tags` subcommand.
pub async fn run(client: &Client, action: Option<TagsAction>) -> Result<ExitCode, Failure> {
    let tags = client.tags();
    match action.unwrap_or(TagsAction::List) {
        TagsAction::Add {
            tag,
            run: Some(run),
            ..
        } => {
            let made = tags.add(&tag, &run).await?;
            eprintln!(
                "Tagged the artifacts of run {run} as {} ({} file(s))",
                made.tag,
                made.manifest.files.len()
            );
        }
        TagsAction::Add { tag, artifacts, .. } => {
            let made = tags.add_files(&tag, &artifacts).await?;
            eprintln!(
                "Uploaded {} file(s) as {}",
                made.manifest.files.len(),
                made.tag
            );
        }
        TagsAction::List => {
            let all = tags.list().await?;
            if all.is_empty() {
                eprintln!("No tags. Tag a finished run with `dstack tags add TAG RUN`.");
            }
            for tag in all {
                let from = tag
                    .manifest
                    .run_name
                    .clone()
                    .unwrap_or_else(|| "(uploaded)".to_string());
                println!(
                    "{}\t{from}\t{} file(s)\t{} bytes",
                    tag.tag,
                    tag.manifest.files.len(),
                    tag.manifest.bytes()
                );
            }
        }
        TagsAction::Delete { tag } => {
            let deleted = tags.delete(&tag).await?;
            eprintln!("Tag {deleted} deleted");
        }
    }
    Ok(ExitCode::SUCCESS)
}
