//! The agent's state directory: `agent.lock` (held while an agent uses the directory),
//! `agent.pid`, `agent.token` (the secret its API requires, see [`StateDir::token`]), the job
//! journal `jobs.journal` (see [`crate::journal`]), and `jobs/<id>/`,
//! created for a job only once it has output (see [`crate::logs`]).

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    since.as_millis() as u64
}

/// `bytes` random bytes (from the kernel), in hexadecimal.
pub(crate) fn random_hex(bytes: usize) -> io::Result<String> {
    let mut random = vec![0u8; bytes];
    File::open("/dev/urandom")?.read_exact(&mut random)?;
    Ok(random.iter().map(|b| format!("{b:02x}")).collect())
}

/// Creates `dir` (and its parents) if needed and makes it private to the user (0700).
pub(crate) fn create_private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// An agent's state directory, locked for as long as this value lives.
pub(crate) struct StateDir {
    root: PathBuf,
    _lock: Flock<File>,
}

impl StateDir {
    /// Creates and locks the state directory; fails if another agent holds it.
    pub fn open(root: &Path) -> io::Result<Self> {
        let context = |what: &str, e: io::Error| {
            io::Error::new(e.kind(), format!("cannot {what} {}: {e}", root.display()))
        };
        create_private_dir(root).map_err(|e| context("create the state directory", e))?;
        create_private_dir(&root.join("jobs")).map_err(|e| context("create jobs in", e))?;
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join("agent.lock"))
            .map_err(|e| context("lock", e))?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
            let message = match e {
                Errno::EWOULDBLOCK => "another dstack-agent is using the state directory",
                _ => "cannot lock the state directory",
            };
            let kind = io::Error::from(e).kind();
            io::Error::new(kind, format!("{message} {}", root.display()))
        })?;
        Ok(StateDir {
            root: root.to_path_buf(),
            _lock: lock,
        })
    }

    /// The directory holding the subdirectory of each job that has output.
    pub fn jobs(&self) -> PathBuf {
        self.root.join("jobs")
    }

    /// The job journal.
    pub fn journal(&self) -> PathBuf {
        self.root.join("jobs.journal")
    }

    /// The root of the state directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The secret the API requires: the state directory's `agent.token` (mode 0600), made
    /// of 32 random bytes at the agent's first start and kept across restarts, so that
    /// clients holding it keep working.
    pub fn token(&self) -> io::Result<String> {
        let path = self.root.join(dstack_core::agent::TOKEN_FILE);
        match fs::read_to_string(&path) {
            Ok(token) if !token.trim().is_empty() => return Ok(token.trim().to_string()),
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let token = random_hex(32)?;
        dstack_core::files::replace_private(&path, token.as_bytes())?;
        Ok(token)
    }

    /// The file holding the agent's pid.
    pub fn pid_file(&self) -> PathBuf {
        self.root.join("agent.pid")
    }
}
