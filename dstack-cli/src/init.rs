//! `dstack init`: registers a repo's git credentials with the project, as dstack's: the
//! repo is found (a local work tree's `origin`, or a URL), a clone is tried with the token
//! or key given (else this machine's own git credentials), and what worked is kept by the
//! server for the runs that clone the repo (`repos:` with a `url`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use dstack_core::repos::{self, RepoCreds};
use dstack_core::Client;

use crate::Failure;

/// How long checking access to the repo may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);

/// Arguments of `dstack init`.
#[derive(clap::Args)]
pub struct InitArgs {
    /// The repo to initialize: a local path or a git URL (default: this directory).
    #[arg(short = 'P', long = "repo", value_name = "REPO")]
    repo: Option<String>,
    #[command(flatten)]
    creds: CredsArgs,
}

/// Whether `repo` is a git URL rather than a path (`https://…`, `ssh://…`, `git@host:…`).
pub fn is_url(repo: &str) -> bool {
    repo.contains("://")
        || repo
            .split_once(':')
            .is_some_and(|(before, _)| before.contains('@') && !before.contains('/'))
}

/// `dstack init`.
pub async fn init(client: &Client, args: &InitArgs) -> Result<ExitCode, Failure> {
    let url = match args.repo.as_deref() {
        Some(repo) if is_url(repo) => repo.to_string(),
        Some(path) => origin(Path::new(path))?,
        None => origin(Path::new("."))?,
    };
    register(client, &url, &args.creds.creds()?).await?;
    println!("OK");
    Ok(ExitCode::SUCCESS)
}

/// The repo credentials flags `dstack init` and `dstack apply` share.
#[derive(clap::Args, Default)]
pub struct CredsArgs {
    /// An OAuth token for a private repo over HTTPS.
    #[arg(
        short = 't',
        long = "token",
        value_name = "OAUTH_TOKEN",
        help_heading = "Repo"
    )]
    token: Option<String>,
    /// A private SSH key (a file) for a private repo over SSH.
    #[arg(
        long = "git-identity",
        value_name = "SSH_PRIVATE_KEY",
        help_heading = "Repo"
    )]
    git_identity: Option<PathBuf>,
}

impl CredsArgs {
    /// Whether any was given.
    pub fn given(&self) -> bool {
        self.token.is_some() || self.git_identity.is_some()
    }

    /// The credentials given (the key file read).
    pub fn creds(&self) -> Result<RepoCreds, Failure> {
        Ok(RepoCreds {
            token: self.token.clone(),
            private_key: match &self.git_identity {
                Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
                    Failure::new(format!(
                        "--git-identity: cannot read {}: {e}",
                        path.display()
                    ))
                })?),
                None => None,
            },
        })
    }
}

/// Checks that `creds` (this machine's own when empty) open the repo at `url`, then
/// registers them with the project for the runs that clone it.
pub async fn register(client: &Client, url: &str, creds: &RepoCreds) -> Result<(), Failure> {
    let (checked, at) = (creds.clone(), url.to_string());
    tokio::task::spawn_blocking(move || check_access(&at, &checked))
        .await
        .map_err(|e| Failure::new(e.to_string()))??;
    client.secrets().init_repo(url, creds).await?;
    Ok(())
}

/// The `origin` URL of the git work tree at `path`.
fn origin(path: &Path) -> Result<String, Failure> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(path)
        .args(["remote", "get-url", "origin"])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| Failure::new(format!("cannot run git: {e}")))?;
    let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() && !url.is_empty() {
        return Ok(url);
    }
    Err(Failure::new(format!(
        "{}: not a git repo with a remote `origin` ({}); a local repo needs no init: \
         `dstack apply -P {}` uploads its files with each run",
        path.display(),
        String::from_utf8_lossy(&out.stderr).trim(),
        path.display()
    )))
}

/// Lists the repo's branches with `creds` (this machine's git credentials when empty), as
/// a clone would reach it.
fn check_access(url: &str, creds: &RepoCreds) -> Result<(), Failure> {
    let env = repos::git_env(creds)
        .map_err(|e| Failure::new(format!("cannot prepare the credentials: {e}")))?;
    let args: Vec<std::ffi::OsString> = vec![
        "ls-remote".into(),
        "--heads".into(),
        "--".into(),
        url.into(),
    ];
    repos::run_git(&args, &env.vars, CHECK_TIMEOUT).map_err(|said| {
        let hint = if creds.is_empty() {
            "No valid default Git credentials found. Pass valid `--token` or `--git-identity`."
        } else {
            "The credentials given do not open the repo."
        };
        Failure::new(format!("{hint}\n{said}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_paths_are_told_apart() {
        for url in [
            "https://github.com/o/r",
            "ssh://git@h/o/r",
            "git@github.com:o/r.git",
        ] {
            assert!(is_url(url), "{url}");
        }
        for path in [".", "../code", "/srv/repo", "dir:with/colon"] {
            assert!(!is_url(path), "{path}");
        }
    }
}
