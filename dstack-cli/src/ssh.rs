//! `ssh <run>` on the client's side: the hidden `dstack ssh-proxy` that the entries of
//! `$DSTACK_HOME/ssh/config` run as their `ProxyCommand` (a `runs/ssh` tunnel through the
//! home's server to the job's agent, carried over standard input and output), and the
//! `Include` of that file in `~/.ssh/config`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use dstack_core::client::home;
use dstack_core::client::protocol::SshTunnelRequest;
use tokio::io::AsyncWriteExt;

use crate::Failure;

/// Arguments of `dstack ssh-proxy` (run by `ssh` through `ProxyCommand`).
#[derive(clap::Args)]
pub struct ProxyArgs {
    /// The state directory (default: `$DSTACK_HOME`, or `~/.dstack`).
    #[arg(long)]
    home: Option<PathBuf>,
    /// The run name.
    run: String,
    /// The job (node rank).
    #[arg(long, default_value_t = 0)]
    job: u32,
    /// The replica.
    #[arg(long, default_value_t = 0)]
    replica: u32,
}

/// `dstack ssh-proxy RUN`: opens an SSH connection to the job's agent through the home's
/// server and carries it over standard input and output until either side closes it. Exits
/// the process (a read of standard input cannot be cancelled).
pub async fn proxy(args: &ProxyArgs) -> Result<ExitCode, Failure> {
    let home = args
        .home
        .clone()
        .unwrap_or_else(dstack_core::client::default_home);
    let exe = std::env::current_exe().ok();
    let remote = home::connect(&home, exe.as_deref())
        .await
        .map_err(|e| Failure::new(format!("dstack ssh-proxy: {e}")))?;
    let request = SshTunnelRequest {
        run_name: args.run.clone(),
        job_num: args.job,
        replica_num: args.replica,
    };
    let tunnel = remote
        .tunnel("runs/ssh", &request)
        .await
        .map_err(|e| Failure::new(format!("dstack ssh-proxy: {e}")))?;
    let (mut from_job, mut to_job) = tokio::io::split(tunnel);
    let upstream = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let _ = tokio::io::copy(&mut stdin, &mut to_job).await;
        let _ = to_job.shutdown().await;
    });
    let mut stdout = tokio::io::stdout();
    let _ = tokio::io::copy(&mut from_job, &mut stdout).await;
    let _ = stdout.flush().await;
    upstream.abort();
    std::process::exit(0)
}

/// The user's own public keys, in the order `ssh` tries them by default.
const USER_KEYS: &[&str] = &["id_ed25519.pub", "id_ecdsa.pub", "id_rsa.pub"];

/// Adds the user's own public key (the first of `~/.ssh/id_*.pub`), if there is one, to the
/// keys `ssh <run>` sessions accept (`$DSTACK_HOME/ssh/authorized_keys`, 0600), as dstack
/// adds the user's key.
pub fn remember_user_key(home: &Path) {
    let Some(user_home) = std::env::var_os("HOME").map(PathBuf::from) else {
        return;
    };
    let Some(key) = USER_KEYS
        .iter()
        .filter_map(|name| fs::read_to_string(user_home.join(".ssh").join(name)).ok())
        .map(|text| text.trim().to_string())
        .find(|text| !text.is_empty() && !text.contains('\n'))
    else {
        return;
    };
    if let Err(e) = add_line(&home::ssh_user_keys_file(home), &key) {
        eprintln!("warning: your SSH key is not added for `ssh <run>`: {e}");
    }
}

/// `dstack attach --ssh-identity PATH`: `ssh <run>` sessions also accept the key whose
/// public half is `PATH.pub`.
pub fn accept_identity(home: &Path, identity: &Path) -> Result<(), Failure> {
    let mut public = identity.as_os_str().to_owned();
    public.push(".pub");
    let public = PathBuf::from(public);
    let key = fs::read_to_string(&public).map_err(|e| {
        Failure::new(format!(
            "--ssh-identity: cannot read {}: {e}",
            public.display()
        ))
    })?;
    let key = key.trim();
    if key.is_empty() || key.contains('\n') {
        return Err(Failure::new(format!(
            "--ssh-identity: {} does not hold one public key",
            public.display()
        )));
    }
    add_line(&home::ssh_user_keys_file(home), key)
        .map_err(|e| Failure::new(format!("--ssh-identity: {e}")))
}

/// Appends `line` to the private file `path` unless it holds it already (under a lock).
fn add_line(path: &Path, line: &str) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .mode(0o600)
        .open(path)?;
    file.lock()?;
    let text = fs::read_to_string(path)?;
    if !text.lines().any(|l| l.trim() == line) {
        file.write_all(format!("{line}\n").as_bytes())?;
    }
    Ok(())
}

/// The line of `~/.ssh/config` that brings in the entries of `home`.
fn include_line(home: &Path) -> String {
    format!("Include \"{}\"", home::ssh_config_file(home).display())
}

/// Makes sure `~/.ssh/config` includes `$DSTACK_HOME/ssh/config` (at its top, where an
/// `Include` applies to every host), adding the line once, under a lock; when the file
/// cannot be written, prints the line to add instead.
pub fn ensure_include(home: &Path) {
    let Some(user_home) = std::env::var_os("HOME").map(PathBuf::from) else {
        return;
    };
    let home = std::path::absolute(home).unwrap_or_else(|_| home.to_path_buf());
    let line = include_line(&home);
    if let Err(e) = add_include(&user_home.join(".ssh"), &line) {
        eprintln!(
            "`ssh <run>` needs this line at the top of ~/.ssh/config, which cannot be \
             written ({e}):\n    {line}"
        );
    }
}

fn add_include(dir: &Path, line: &str) -> io::Result<()> {
    let config = dir.join("config");
    let present = |text: &str| text.lines().any(|l| l.trim() == line);
    if fs::read_to_string(&config).is_ok_and(|t| present(&t)) {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(dir.join(".dstack-include.lock"))?;
    lock.lock()?;
    let current = match fs::read_to_string(&config) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    if present(&current) {
        return Ok(());
    }
    let mode = fs::metadata(&config).map_or(0o600, |m| m.permissions().mode() & 0o777);
    let temp = dir.join(".config.dstack-tmp");
    let mut file = File::create(&temp)?;
    file.set_permissions(fs::Permissions::from_mode(mode))?;
    file.write_all(format!("{line}\n\n{current}").as_bytes())?;
    file.sync_all()?;
    fs::rename(&temp, &config)?;
    eprintln!("Added `{line}` to {}", config.display());
    Ok(())
}
