//! The agent's state directory: `agent.lock` (held while an agent uses the directory),
//! `agent.pid`, and `jobs/<id>/job.json` records written atomically on every transition.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use dstack_core::agent::{JobInfo, JobSubmit};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::process::ProcessGroup;

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    since.as_millis() as u64
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

    /// The directory holding one subdirectory per job.
    pub fn jobs(&self) -> PathBuf {
        self.root.join("jobs")
    }

    /// The root of the state directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file holding the agent's pid.
    pub fn pid_file(&self) -> PathBuf {
        self.root.join("agent.pid")
    }
}

/// What `job.json` holds: everything needed to report, and after a restart recover, a job.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct JobRecord {
    /// The job as the API reports it.
    pub info: JobInfo,
    /// What was submitted.
    pub spec: JobSubmit,
    /// The process group, when the process was started.
    pub process: Option<ProcessGroup>,
}

impl JobRecord {
    /// Writes the record to `<dir>/job.json` atomically (a temporary file, then a rename).
    pub fn save(&self, dir: &Path) -> io::Result<()> {
        let tmp = dir.join("job.json.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        fs::rename(tmp, dir.join("job.json"))
    }

    /// Reads every `<jobs>/*/job.json`, with the directory each came from. Unreadable
    /// records are reported and skipped.
    pub fn load_all(jobs: &Path) -> io::Result<Vec<(PathBuf, JobRecord)>> {
        let mut records = Vec::new();
        for entry in fs::read_dir(jobs)? {
            let dir = entry?.path();
            let path = dir.join("job.json");
            let record = fs::read(&path).and_then(|bytes| {
                serde_json::from_slice::<JobRecord>(&bytes).map_err(io::Error::from)
            });
            match record {
                Ok(record) => records.push((dir, record)),
                Err(e) => eprintln!("dstack-agent: skipping {}: {e}", path.display()),
            }
        }
        Ok(records)
    }
}
