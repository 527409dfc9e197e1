//! Repos registered with `dstack init`: the credentials clones of a git URL use (an OAuth
//! token for HTTPS, a private key for SSH), as dstack's repo credentials.
//!
//! They are kept with the secrets ([`crate::secrets::Secrets::keep_repo_creds`]: 0600,
//! apart from the state database, never listed or printed), looked up by the repo's id when
//! a job that clones the repo is handed to its agent, and given to `git` only through its
//! environment ([`git_env`]): never on a command line, in a log or in the agent's journal.

use std::collections::BTreeMap;
use std::io;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The credentials a repo's clones use.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoCreds {
    /// An OAuth token (HTTPS URLs): the password of git's basic authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A private key in OpenSSH format (SSH URLs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
}

impl std::fmt::Debug for RepoCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |v: &Option<String>| v.as_ref().map(|_| crate::secrets::REDACTED);
        f.debug_struct("RepoCreds")
            .field("token", &shown(&self.token))
            .field("private_key", &shown(&self.private_key))
            .finish()
    }
}

impl RepoCreds {
    /// Whether there is nothing to use (the host's own git credentials apply).
    pub fn is_empty(&self) -> bool {
        self.token.is_none() && self.private_key.is_none()
    }
}

/// The id of the repo at `url`: its host (lowercase, without user or port) and path
/// (without a trailing `/` or `.git`), so that `https://github.com/org/repo.git` and
/// `git@github.com:org/repo` are one repo.
pub fn repo_id(url: &str) -> String {
    let url = url.trim();
    let (authority, path) = match url.split_once("://") {
        Some((_, rest)) => rest.split_once('/').unwrap_or((rest, "")),
        // scp-like: `[user@]host:path`.
        None => url.split_once(':').unwrap_or((url, "")),
    };
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let host = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let path = path.trim_matches('/');
    let path = path.strip_suffix(".git").unwrap_or(path);
    format!("{}/{path}", host.to_ascii_lowercase())
}

/// The name of the variable [`git_env`] passes a token in.
const TOKEN_VAR: &str = "DSTACK_GIT_TOKEN";

/// git's credential helper for a token: prints it as the password of user
/// `x-access-token` (what GitHub, GitLab and Bitbucket take) from [`TOKEN_VAR`]; the token
/// itself is never part of the helper's text.
const TOKEN_HELPER: &str =
    "!f() { test \"$1\" = get || return 0; echo username=x-access-token; echo \"password=$DSTACK_GIT_TOKEN\"; }; f";

/// The environment that makes `git` use a repo's credentials; the private key's file is
/// removed when it is dropped.
#[derive(Debug, Default)]
pub struct GitEnv {
    /// The variables to give `git`.
    pub vars: BTreeMap<String, String>,
    /// The private directory holding the key, if any.
    _keys: Option<tempfile::TempDir>,
}

/// The environment that makes `git` use `creds`: the token through a credential helper
/// reading it from the environment, the private key written to a private temporary
/// directory (0700, the file 0600) and named in `GIT_SSH_COMMAND`. Host keys are checked as
/// the host's own `ssh` checks them; nothing is asked on a terminal ([`run_git`]).
pub fn git_env(creds: &RepoCreds) -> io::Result<GitEnv> {
    let mut env = GitEnv::default();
    let vars = &mut env.vars;
    if let Some(token) = &creds.token {
        vars.insert("GIT_CONFIG_COUNT".to_string(), "1".to_string());
        vars.insert(
            "GIT_CONFIG_KEY_0".to_string(),
            "credential.helper".to_string(),
        );
        vars.insert("GIT_CONFIG_VALUE_0".to_string(), TOKEN_HELPER.to_string());
        vars.insert(TOKEN_VAR.to_string(), token.clone());
    }
    if let Some(key) = &creds.private_key {
        let dir = tempfile::Builder::new().prefix("dstack-git-").tempdir()?;
        let path = dir.path().join("identity");
        let text = path.display().to_string();
        if text.contains('\'') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{text}: a quote in the path of the key file"),
            ));
        }
        let mut key = key.trim_end().to_string();
        key.push('\n');
        crate::files::replace_private(&path, key.as_bytes())?;
        vars.insert(
            "GIT_SSH_COMMAND".to_string(),
            format!("ssh -i '{text}' -o IdentitiesOnly=yes -o BatchMode=yes"),
        );
        env._keys = Some(dir);
    }
    Ok(env)
}

/// Runs git with `args` (never through a shell) and `env` added, within `timeout`, asking
/// nothing on a terminal (blocking); the error is what it said.
pub fn run_git(
    args: &[std::ffi::OsString],
    env: &BTreeMap<String, String>,
    timeout: Duration,
) -> Result<(), String> {
    let mut command = std::process::Command::new("git");
    command
        .args(args)
        .envs(env)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot run git (needed for repos given by URL): {e}"))?;
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        match child.try_wait().map_err(|e| e.to_string())? {
            Some(status) => break status,
            None if std::time::Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "git {} took longer than {timeout:?}",
                    args[0].to_string_lossy()
                ));
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let mut said = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut stderr, &mut said);
    }
    if status.success() {
        return Ok(());
    }
    let tail: String = said
        .chars()
        .rev()
        .take(2000)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    Err(format!(
        "git {} failed: {}",
        args[0].to_string_lossy(),
        tail.trim()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_repo_has_one_id_whatever_its_url_looks_like() {
        for url in [
            "https://github.com/Org/repo.git",
            "https://user:pw@GitHub.com/Org/repo/",
            "ssh://git@github.com/Org/repo.git",
            "git@github.com:Org/repo.git",
            "github.com:Org/repo",
        ] {
            assert_eq!(repo_id(url), "github.com/Org/repo", "{url}");
        }
        assert_ne!(
            repo_id("https://github.com/org/a"),
            repo_id("https://github.com/org/b")
        );
    }

    #[test]
    fn creds_reach_git_through_its_environment_only() {
        let creds = RepoCreds {
            token: Some("tok'en\"".into()),
            private_key: Some("-----BEGIN KEY-----\nabc\n-----END KEY-----".into()),
        };
        let env = git_env(&creds).unwrap();
        assert_eq!(env.vars[TOKEN_VAR], "tok'en\"");
        assert!(
            !env.vars["GIT_CONFIG_VALUE_0"].contains("tok'en"),
            "the helper names no token"
        );
        let ssh = env.vars["GIT_SSH_COMMAND"].clone();
        let key = std::path::PathBuf::from(ssh.split('\'').nth(1).unwrap());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(std::fs::read_to_string(&key).unwrap().contains("abc"));
        drop(env);
        assert!(!key.exists(), "the key is removed with the environment");
        let shown = format!("{creds:?}");
        assert!(
            !shown.contains("tok'en") && !shown.contains("abc"),
            "{shown}"
        );
    }
}
