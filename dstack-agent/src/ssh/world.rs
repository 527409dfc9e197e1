//! The world of a running job that SSH sessions land in: its working directory, its
//! environment and its user, on the host or inside the job's container.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use dstack_core::agent::AgentJobStatus;

use crate::container;
use crate::jobs::{Job, JobError};

/// Where a session's processes run.
#[derive(Clone, Debug)]
pub(crate) enum Place {
    /// On the host, as the agent's user (as the job's processes do).
    Host,
    /// Inside the job's container (`docker exec`).
    Container {
        /// The container engine's socket.
        socket: String,
        /// The container's name.
        name: String,
    },
}

/// What a session of a job starts from.
#[derive(Clone, Debug)]
pub(crate) struct World {
    /// The job's working directory (empty in a container: the image's).
    pub working_dir: String,
    /// The job's environment (read from its first process: what it was started with, its
    /// secrets resolved; the agent keeps no copy). Empty in a container, whose processes get
    /// the container's own.
    pub env: Vec<(OsString, OsString)>,
    /// The user sessions run as.
    pub user: String,
    /// The shell commands and interactive sessions run in.
    pub shell: String,
    /// Where.
    pub place: Place,
}

impl World {
    /// The world of `job`, which must be running; `containers` is the agent's container
    /// engine.
    pub fn of(job: &Job, containers: Option<&str>) -> Result<World, JobError> {
        let spec = job.spec();
        if job.info().status != AgentJobStatus::Running {
            return Err(JobError::Conflict(format!(
                "job {} is not running: there is nothing to connect to",
                spec.id
            )));
        }
        if let Some(container) = &spec.container {
            let socket = containers.ok_or_else(|| {
                JobError::Conflict("the agent has no container engine".to_string())
            })?;
            return Ok(World {
                working_dir: spec.working_dir.clone(),
                env: Vec::new(),
                user: container.user.clone().unwrap_or_else(|| "root".to_string()),
                shell: String::new(),
                place: Place::Container {
                    socket: socket.to_string(),
                    name: container::name(&spec.id),
                },
            });
        }
        let group = job
            .process()
            .ok_or_else(|| JobError::Conflict(format!("job {} has no process yet", spec.id)))?;
        let environ = std::fs::read(format!("/proc/{}/environ", group.pgid)).map_err(|e| {
            JobError::Conflict(format!(
                "cannot read the environment of job {} (has it ended?): {e}",
                spec.id
            ))
        })?;
        let env = parse_environ(&environ);
        let account = nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten();
        let user = account
            .as_ref()
            .map(|u| u.name.clone())
            .unwrap_or_else(|| nix::unistd::getuid().to_string());
        let shell = env
            .iter()
            .find(|(k, _)| k == "SHELL")
            .map(|(_, v)| v.to_string_lossy().into_owned())
            .or_else(|| account.map(|u| u.shell.to_string_lossy().into_owned()))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "/bin/sh".to_string());
        // The directory the job started in: a job given a fresh directory (a repo or files
        // to unpack) has it only in its environment.
        let working_dir = env
            .iter()
            .find(|(k, _)| k == "DSTACK_WORKING_DIR")
            .map(|(_, v)| v.to_string_lossy().into_owned())
            .filter(|dir| dir.starts_with('/'))
            .unwrap_or_else(|| spec.working_dir.clone());
        Ok(World {
            working_dir,
            env,
            user,
            shell,
            place: Place::Host,
        })
    }
}

/// The variables of a `/proc/<pid>/environ` file (`NAME=value`, NUL-separated).
fn parse_environ(environ: &[u8]) -> Vec<(OsString, OsString)> {
    environ
        .split(|b| *b == 0)
        .filter_map(|entry| {
            let eq = entry.iter().position(|b| *b == b'=')?;
            (eq > 0).then(|| {
                (
                    OsString::from_vec(entry[..eq].to_vec()),
                    OsString::from_vec(entry[eq + 1..].to_vec()),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environ_files_are_parsed() {
        let env = parse_environ(b"A=1\0B=x=y\0=skipped\0C=\0");
        let pairs: Vec<(String, String)> = env
            .into_iter()
            .map(|(k, v)| (k.into_string().unwrap(), v.into_string().unwrap()))
            .collect();
        assert_eq!(
            pairs,
            [("A", "1"), ("B", "x=y"), ("C", "")].map(|(k, v)| (k.to_string(), v.to_string()))
        );
    }
}
