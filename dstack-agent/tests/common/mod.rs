//! Helpers shared by the agent's integration tests: an agent per test, job specs, waiting
//! for jobs, and looking at processes through `/proc`.
#![allow(dead_code)] // Each test binary uses a different subset.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use dstack_agent::{Agent, AgentConfig, LeaseConfig, Limits};
use dstack_core::agent::{AgentClient, JobInfo, JobSubmit};
use futures_util::StreamExt;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The generous limit for anything a test waits for.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Fails the test if `future` takes longer than [`PATIENCE`].
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Waits until `condition` holds.
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    within(what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// An agent served in-process on a socket in a temporary directory.
pub struct TestAgent {
    /// A client of the agent.
    pub client: AgentClient,
    /// Holds the socket, the state directory and a scratch directory.
    pub dir: TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestAgent {
    /// Starts an agent; it answers as soon as this returns.
    pub async fn start() -> TestAgent {
        TestAgent::start_in(tempfile::tempdir().unwrap()).await
    }

    /// Starts an agent in `dir` (from [`TestAgent::stop`]), on the state an earlier agent left.
    pub async fn start_in(dir: TempDir) -> TestAgent {
        TestAgent::start_with(dir, Limits::default()).await
    }

    /// Starts an agent in `dir` with `limits`.
    pub async fn start_with(dir: TempDir, limits: Limits) -> TestAgent {
        TestAgent::start_configured(dir, limits, None).await
    }

    /// Starts an agent holding an owner lease.
    pub async fn start_leased(lease: LeaseConfig) -> TestAgent {
        let dir = tempfile::tempdir().unwrap();
        TestAgent::start_configured(dir, Limits::default(), Some(lease)).await
    }

    async fn start_configured(
        dir: TempDir,
        limits: Limits,
        lease: Option<LeaseConfig>,
    ) -> TestAgent {
        let mut config = AgentConfig::new(dir.path().join("agent.sock"), dir.path().join("state"));
        config.limits = limits;
        config.lease = lease;
        let agent = Agent::start(config).await.expect("the agent starts");
        let client = AgentClient::local(agent.socket(), &dir.path().join("state")).unwrap();
        let (shutdown, stop) = oneshot::channel();
        let task = tokio::spawn(agent.serve_until(async {
            let _ = stop.await;
        }));
        TestAgent {
            client,
            dir,
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    /// The agent's socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    /// The agent's token.
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.state_dir().join("agent.token")).unwrap()
    }

    /// The agent's state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// A scratch directory for jobs.
    pub fn scratch(&self) -> PathBuf {
        let path = self.dir.path().join("scratch");
        std::fs::create_dir_all(&path).unwrap();
        path
    }

    /// Stops serving and waits for the agent to return.
    pub async fn shut_down(self) {
        self.stop().await;
    }

    /// Stops serving, waits for the agent to return, and hands over its directory.
    pub async fn stop(mut self) -> TempDir {
        let _ = self.shutdown.take().unwrap().send(());
        within("the agent to stop", self.task.take().unwrap())
            .await
            .unwrap();
        self.dir
    }
}

/// A job running `script` with `/bin/sh -c` in `/`, with a minimal environment.
pub fn shell_job(id: &str, script: &str) -> JobSubmit {
    JobSubmit {
        id: id.to_string(),
        name: format!("{id}-0-0"),
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: BTreeMap::from([("PATH".to_string(), "/usr/bin:/bin".to_string())]),
        working_dir: "/".to_string(),
        max_duration_secs: None,
        mpi_hostfile: None,
        after: None,
        container: None,
        archives: Vec::new(),
        clone: None,
        artifacts: Vec::new(),
    }
}

/// All of a job's output from `offset`, without following.
pub async fn read_logs(client: &AgentClient, id: &str, offset: u64) -> String {
    let mut stream = client.logs(id, offset, false).await.unwrap();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    String::from_utf8(out).unwrap()
}

/// Follows a job's output until it contains `needle`; returns the output so far.
pub async fn wait_for_output(client: &AgentClient, id: &str, needle: &str) -> String {
    let mut stream = client.logs(id, 0, true).await.unwrap();
    within(&format!("{needle:?} in the output of {id}"), async {
        let mut out = String::new();
        while !out.contains(needle) {
            let chunk = stream.next().await.expect("output before the end").unwrap();
            out.push_str(&String::from_utf8_lossy(&chunk));
        }
        out
    })
    .await
}

/// Waits for a job to finish (by following its output to the end) and returns its state.
pub async fn wait_finished(client: &AgentClient, id: &str) -> JobInfo {
    within(&format!("job {id} to finish"), async {
        let mut stream = client.logs(id, 0, true).await.unwrap();
        while let Some(chunk) = stream.next().await {
            chunk.unwrap();
        }
    })
    .await;
    let info = client.job(id).await.unwrap().expect("the job exists");
    assert!(info.status.is_finished(), "{info:?}");
    info
}

/// Parses `/proc/<pid>/stat`: (state, process group).
fn stat(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat[stat.rfind(')')? + 2..].split(' ');
    let state = fields.next()?.chars().next()?;
    let pgrp = fields.nth(1)?.parse().ok()?;
    Some((state, pgrp))
}

/// Whether process `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    matches!(stat(pid), Some((state, _)) if state != 'Z')
}

/// Whether any live (non-zombie) process is in process group `pgid`.
pub fn group_alive(pgid: i32) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|entry| {
        let pid = entry.file_name().to_string_lossy().parse::<i32>();
        matches!(pid.ok().and_then(stat), Some((state, pgrp)) if pgrp == pgid && state != 'Z')
    })
}

/// The first line of output of a job that starts with `echo $$`: its leader's pid (= pgid).
pub async fn leader_pid(client: &AgentClient, id: &str) -> i32 {
    let out = wait_for_output(client, id, "\n").await;
    out.lines().next().unwrap().trim().parse().unwrap()
}
