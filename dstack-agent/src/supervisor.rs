//! Running one job's process: starting it, copying its output to the log, stopping it on
//! request or after `max_duration`, and recording how it ended.

use std::collections::BTreeMap;
use std::io::{self, PipeReader};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use dstack_core::agent::{AgentJobStatus, JobInfo, StopRequest};
use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::unistd::{access, AccessFlags};
use tokio::io::AsyncReadExt;
use tokio::process::Child;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::jobs::Job;
use crate::logs::{LogWriter, CHUNK};
use crate::process::{describe_exit, ProcessGroup};
use crate::state::unix_ms;

/// Seconds between SIGTERM and SIGKILL when a job exceeds its `max_duration`.
const MAX_DURATION_GRACE_SECS: u64 = 10;

/// How long the output may stay open after the process group is gone (a process that left
/// the group can hold it open forever); later output is dropped.
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);

/// A job process that has started.
pub(crate) struct Launched {
    child: Child,
    output: PipeReader,
    /// The process group the job runs in.
    pub group: ProcessGroup,
}

/// Starts `argv` in `working_dir` as a process group of its own, with exactly the
/// environment `env` and stdout and stderr both on one pipe. The error is a message for the
/// user.
pub(crate) fn launch(
    working_dir: &str,
    argv: &[String],
    env: &BTreeMap<String, String>,
) -> Result<Launched, String> {
    let dir = Path::new(working_dir);
    if !dir.is_absolute() {
        return Err(format!(
            "working directory {working_dir} is not an absolute path"
        ));
    }
    if !dir.is_dir() {
        return Err(format!("working directory {working_dir} does not exist"));
    }
    let Some((program, args)) = argv.split_first() else {
        return Err("the job has no command to run".to_string());
    };
    let (output, stdout) =
        std::io::pipe().map_err(|e| format!("cannot create the output pipe: {}", describe(&e)))?;
    let stderr = stdout
        .try_clone()
        .map_err(|e| format!("cannot create the output pipe: {}", describe(&e)))?;
    let mut command = tokio::process::Command::new(found_in_path(program, env, dir));
    command
        .args(args)
        .env_clear()
        .envs(env)
        .current_dir(dir)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    let child = command
        .spawn()
        .map_err(|e| format!("cannot start {program}: {}", describe(&e)))?;
    // The command holds the pipe's write ends: drop them so that the output ends when the
    // job's processes close theirs.
    drop(command);
    let pid = child
        .id()
        .ok_or_else(|| format!("cannot start {program}: it exited at once"))?;
    Ok(Launched {
        child,
        output,
        group: ProcessGroup::led_by(pid),
    })
}

/// Where the job's own `PATH` finds `program`, when the job sets `PATH` and names its program
/// without a slash (searched as `execvp` does: entries in order, relative ones and the empty
/// one from the working directory); `program` as it is otherwise, or when no entry holds it
/// (starting it then fails as it would have). Given a bare name and a `PATH` of its own, the
/// standard library cannot use `posix_spawn` and forks the agent instead: a copy of the
/// agent's page tables for every such job.
fn found_in_path(program: &str, env: &BTreeMap<String, String>, working_dir: &Path) -> PathBuf {
    let Some(path) = env.get("PATH").filter(|_| !program.contains('/')) else {
        return PathBuf::from(program);
    };
    path.split(':')
        .map(|entry| working_dir.join(entry).join(program))
        .find(|candidate| candidate.is_file() && access(candidate, AccessFlags::X_OK).is_ok())
        .unwrap_or_else(|| PathBuf::from(program))
}

/// An I/O error without Rust's `(os error N)` suffix.
fn describe(e: &io::Error) -> String {
    e.raw_os_error().map_or_else(
        || e.to_string(),
        |code| Errno::from_raw(code).desc().to_string(),
    )
}

/// Supervises a launched job until it ends: copies its output to `log` and obeys stop
/// requests and the job's `max_duration`.
pub(crate) fn supervise(
    job: Arc<Job>,
    launched: Launched,
    log: LogWriter,
    stop_requests: mpsc::UnboundedReceiver<StopRequest>,
) {
    let output = OutputCopy::start(launched.output, log, job.clone());
    tokio::spawn(run(
        job,
        launched.child,
        launched.group,
        stop_requests,
        output,
    ));
}

/// Why a job is being stopped.
pub(crate) struct Stopping {
    /// The termination reason.
    pub reason: String,
    /// What to tell the user, when more than how the job ended.
    pub message: Option<String>,
}

async fn run(
    job: Arc<Job>,
    mut child: Child,
    group: ProcessGroup,
    mut stop_requests: mpsc::UnboundedReceiver<StopRequest>,
    output: OutputCopy,
) {
    let max_duration = job.spec().max_duration_secs;
    let deadline = max_duration.and_then(after);
    let mut stopping: Option<Stopping> = None;
    let mut kill_at: Option<Instant> = None;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            Some(request) = stop_requests.recv() => {
                stopping = Some(Stopping { reason: request.reason, message: None });
                if request.abort {
                    group.signal(Signal::SIGKILL);
                } else {
                    group.signal(Signal::SIGTERM);
                    kill_at = earliest(kill_at, after(request.grace_secs));
                }
            }
            () = sleep_until(deadline), if stopping.is_none() => {
                let secs = max_duration.unwrap_or_default();
                stopping = Some(Stopping {
                    reason: "max_duration_exceeded".to_string(),
                    message: Some(format!("the job ran longer than its max_duration of {secs}s")),
                });
                group.signal(Signal::SIGTERM);
                kill_at = earliest(kill_at, after(MAX_DURATION_GRACE_SECS));
            }
            () = sleep_until(kill_at) => {
                group.signal(Signal::SIGKILL);
                kill_at = None;
            }
        }
    };
    // Background processes of the job do not outlive it.
    group.signal(Signal::SIGKILL);
    output.finish().await;
    job.finish(ended(job.info(), status, stopping));
}

/// `secs` seconds from now; `None` if that is beyond what a clock can represent.
/// The instant `secs` from now, or `None` when it cannot be represented (never panics).
pub(crate) fn after(secs: u64) -> Option<Instant> {
    Instant::now().checked_add(Duration::from_secs(secs))
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Sleeps until `deadline`; forever without one.
pub(crate) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The final state of a job whose process ended with `status`.
fn ended(job: JobInfo, status: io::Result<ExitStatus>, stopping: Option<Stopping>) -> JobInfo {
    match status {
        Ok(status) => {
            let (code, description) = describe_exit(status);
            finished(job, Some(code), description, stopping)
        }
        Err(e) => finished(
            job,
            None,
            format!("cannot wait for the process: {e}"),
            stopping,
        ),
    }
}

/// The final state of a job (process or container) that ended with `exit_status` (`None`:
/// unknown), `description` saying how, after `stopping` if it was being stopped.
pub(crate) fn finished(
    job: JobInfo,
    exit_status: Option<i32>,
    description: String,
    stopping: Option<Stopping>,
) -> JobInfo {
    let (status, reason, message) = match (stopping, exit_status) {
        (Some(stop), _) => (
            AgentJobStatus::Terminated,
            stop.reason,
            Some(stop.message.unwrap_or(description)),
        ),
        (None, Some(0)) => (AgentJobStatus::Done, "done_by_runner".to_string(), None),
        (None, Some(_)) => (
            AgentJobStatus::Failed,
            "container_exited_with_error".to_string(),
            Some(description),
        ),
        (None, None) => (
            AgentJobStatus::Failed,
            "executor_error".to_string(),
            Some(description),
        ),
    };
    JobInfo {
        status,
        exit_status,
        termination_reason: Some(reason),
        termination_message: message,
        finished_at_ms: Some(unix_ms()),
        ..job
    }
}

/// A task copying a job's output pipe to its log, chunk by chunk.
struct OutputCopy {
    task: tokio::task::JoinHandle<()>,
}

impl OutputCopy {
    fn start(output: PipeReader, log: LogWriter, job: Arc<Job>) -> OutputCopy {
        let task = tokio::spawn(async move {
            if let Err(e) = copy_output(output, log, &job).await {
                eprintln!("dstack-agent: output of job {} lost: {e}", job.spec().id);
            }
        });
        OutputCopy { task }
    }

    /// Waits until the output has ended and every byte of it is in the log; gives up (and
    /// drops later output) after [`OUTPUT_DRAIN`].
    async fn finish(self) {
        let mut task = self.task;
        if tokio::time::timeout(OUTPUT_DRAIN, &mut task).await.is_err() {
            task.abort();
        }
    }
}

async fn copy_output(output: PipeReader, mut log: LogWriter, job: &Job) -> io::Result<()> {
    let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(output))?;
    // Read into spare capacity: nothing is zeroed or touched before output arrives (most
    // short jobs write little or nothing).
    let mut buf = bytes::BytesMut::with_capacity(CHUNK);
    loop {
        buf.clear();
        if pipe.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
        job.set_log_bytes(log.append(&buf)?);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_too_far_to_represent_is_none() {
        assert!(after(1).is_some());
        assert!(after(u64::MAX).is_none());
    }
}
