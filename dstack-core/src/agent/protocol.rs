//! Wire types of the agent API (JSON).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How long the agent's event stream stays quiet at most: with no change to report for this
/// long, the agent writes an empty line.
pub const EVENTS_HEARTBEAT: Duration = Duration::from_secs(2);

/// How long a client waits for the agent's event stream (its answer, then each line or
/// heartbeat) before it takes the agent as hung: several heartbeats.
pub const EVENTS_SILENCE: Duration = Duration::from_secs(10);

/// The agent's answer to `GET /api/healthcheck`: who it is and what the host has.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Healthcheck {
    /// Always `dstack-agent`.
    pub service: String,
    /// The agent's version (the crate version).
    pub version: String,
    /// The agent's process id.
    pub pid: u32,
    /// The host's resources.
    pub host: HostInfo,
    /// The container engine the agent can run `image:` jobs with (`docker` API at this
    /// socket), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub containers: Option<String>,
    /// Which build of the agent answers ([`build_stamp`] of its binary; empty from agents
    /// older than the stamp): a client finding an agent of another build replaces it.
    #[serde(default)]
    pub build: String,
}

/// The file, in an agent's state directory, holding the secret its API requires (mode
/// 0600): every request but `GET /api/healthcheck` carries `Authorization: Bearer <token>`.
/// Jobs are never given it (see the README's "Security model").
pub const TOKEN_FILE: &str = "agent.token";

/// Identifies a build of the agent binary read from `binary`: its length and a hash of its
/// bytes (read in chunks: a binary is never held whole). The agent reports its own in
/// [`Healthcheck::build`]; deployers compare it with the binary they would start.
pub fn build_stamp(mut binary: impl std::io::Read) -> std::io::Result<String> {
    use std::hash::{DefaultHasher, Hasher};
    let mut hasher = DefaultHasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut len = 0u64;
    loop {
        match binary.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.write(&buf[..n]);
                len += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(format!("{len}-{:016x}", hasher.finish()))
}

/// Resources of the agent's host (all zero until an agent reported them).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    /// Logical CPUs.
    pub cpus: u32,
    /// Total RAM in bytes.
    pub memory_bytes: u64,
    /// Total size in bytes of the filesystem holding the agent's working directory.
    pub disk_bytes: u64,
    /// CPU architecture (`x86` or `arm`).
    pub cpu_arch: String,
    /// GPUs, in `nvidia-smi` index order.
    pub gpus: Vec<GpuInfo>,
}

/// One GPU of the host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// Index as `CUDA_VISIBLE_DEVICES` counts them.
    pub index: u32,
    /// Normalized name (`A100`, `H100`, `RTX4090`, …).
    pub name: String,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Vendor (`nvidia`).
    pub vendor: String,
    /// Device UUID, when known.
    pub uuid: Option<String>,
}

/// `POST /api/jobs`: start a job as a process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSubmit {
    /// The job submission id (unique; submitting the same id again is a no-op).
    pub id: String,
    /// The job name (`<run>-<job_num>-<replica_num>`), for humans.
    pub name: String,
    /// The program and its arguments, e.g. `["/bin/bash", "-c", "echo hi"]`.
    pub argv: Vec<String>,
    /// The complete environment of the process (nothing else is inherited).
    pub env: BTreeMap<String, String>,
    /// Absolute working directory; the job fails with `executor_error` if it does not exist.
    pub working_dir: String,
    /// Terminate with `max_duration_exceeded` after this many seconds of running.
    pub max_duration_secs: Option<u64>,
    /// The MPI hostfile of a multi-node job: the agent writes it to a file of its own and
    /// points `DSTACK_MPI_HOSTFILE` at it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mpi_hostfile: Option<String>,
    /// Run the job in a container instead of as a process of the host: `argv` is then the
    /// container's command (empty: the image's own) and `working_dir` its working directory
    /// (empty: the image's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerSpec>,
    /// Start only once this job of the agent has ended (the job is `queued` until then); at
    /// once if that job has already ended. The job named may be queued itself (jobs queue one
    /// behind the other and start in that order) but must be known to the agent and have no
    /// job queued behind it (409 otherwise). The engine queues a job behind one whose resources it will
    /// take over, so that it starts the moment they free up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// Archives unpacked before the job starts, in order (the repo first, then `files:`);
    /// the agent must hold each ([`crate::agent::AgentClient::put_archive`]). A host process
    /// whose `working_dir` is empty gets a fresh directory of its own, removed when it ends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub archives: Vec<crate::archive::Archive>,
    /// A repo given by URL, cloned before the archives are unpacked (a host process without
    /// `working_dir` gets a fresh directory for it too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone: Option<crate::archive::RepoClone>,
    /// The paths (relative to the working directory) whose files are the job's artifacts:
    /// listed and served while it runs (`GET`/`POST /api/jobs/{id}/artifacts`), and kept by
    /// the agent as they were at its end (a fresh directory or a container is removed then).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<String>,
}

/// `GET /api/jobs/{id}/artifacts`: the job's artifact files now (or as they were at its end).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactListing {
    /// Whether the job has ended: the files are those it left, and will not change.
    pub ended: bool,
    /// The files, in path order.
    pub files: Vec<crate::artifacts::FileEntry>,
}

/// How to run a job in a container.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// The image (pulled when missing).
    pub image: String,
    /// Replaces the image's entrypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// The user to run as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Run privileged.
    #[serde(default)]
    pub privileged: bool,
    /// Size of `/dev/shm` in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shm_size_bytes: Option<u64>,
    /// Ports published on the host's 127.0.0.1 at the same number.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// `(host path, container path)` bind mounts.
    #[serde(default)]
    pub mounts: Vec<(String, String)>,
    /// Registry credentials: `(username, password)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_auth: Option<(String, String)>,
    /// CPU limit (the job's reservation); 0: none.
    #[serde(default)]
    pub cpus: u32,
    /// Memory limit in MiB (the job's reservation); 0: none.
    #[serde(default)]
    pub memory_mib: u64,
    /// The host GPUs the container gets (indices).
    #[serde(default)]
    pub gpus: Vec<u32>,
}

/// The state of a job on the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentJobStatus {
    /// Waiting for the job it was submitted to follow ([`JobSubmit::after`]) to end.
    Queued,
    /// The process is running.
    Running,
    /// Exited with status 0.
    Done,
    /// Exited non-zero, could not start, or was lost.
    Failed,
    /// Stopped (by request or by `max_duration`).
    Terminated,
}

impl AgentJobStatus {
    /// Whether the job has finished.
    pub fn is_finished(self) -> bool {
        !matches!(self, AgentJobStatus::Queued | AgentJobStatus::Running)
    }
}

/// A job as the agent sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    /// The job submission id.
    pub id: String,
    /// The state.
    pub status: AgentJobStatus,
    /// The exit status of the process, when it exited (negative: killed by that signal).
    pub exit_status: Option<i32>,
    /// A dstack job termination reason (`done_by_runner`, `container_exited_with_error`,
    /// `executor_error`, `max_duration_exceeded`, `terminated_by_user`, `aborted_by_user`, …).
    pub termination_reason: Option<String>,
    /// A human explanation of the reason.
    pub termination_message: Option<String>,
    /// Unix milliseconds when the process started (0 while `queued`).
    pub started_at_ms: u64,
    /// Unix milliseconds when it finished.
    pub finished_at_ms: Option<u64>,
    /// Bytes of output written so far.
    pub log_bytes: u64,
}

/// `POST /api/jobs/{id}/stop`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StopRequest {
    /// Kill at once (SIGKILL to the process group) instead of SIGTERM and a grace period.
    pub abort: bool,
    /// Seconds between SIGTERM and SIGKILL.
    pub grace_secs: u64,
    /// The termination reason to record (`terminated_by_user`, `aborted_by_user`, …).
    pub reason: String,
}

/// The answer to `GET /api/lease` and `POST /api/lease` (which renews it): the owner lease
/// of an agent on a cloud instance. An agent with a lease runs its shutdown action once it
/// has run no job for `idle_secs` and heard no renewal for `window_secs`, so that an instance
/// whose owner (the engine) is gone stops costing money.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseStatus {
    /// The lease's terms; `None` for an agent without a lease (this machine's, SSH hosts'):
    /// it never shuts its host down, and renewing is a no-op.
    pub terms: Option<LeaseTerms>,
    /// How many renewals the agent has received since it started.
    pub renewals: u64,
    /// Whether the agent has run its shutdown action.
    pub shut_down: bool,
}

/// What an owner lease allows (see [`LeaseStatus`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseTerms {
    /// How long the host may run no job before it is shut down (once the lease has lapsed).
    pub idle_secs: u64,
    /// How long the lease lasts without a renewal.
    pub window_secs: u64,
}

/// The `Upgrade` protocol of `POST /api/jobs/{id}/ssh`: after `101 Switching Protocols`
/// the connection carries one SSH connection (the agent is the SSH server).
pub const SSH_UPGRADE: &str = "ssh";

/// `POST /api/jobs/{id}/ssh`: which public keys the SSH connection may authenticate with.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshRequest {
    /// Public keys in OpenSSH form (`ssh-ed25519 AAAA… comment`); any other key is refused
    /// (lines that are not keys are ignored; 400 when none is).
    pub authorized_keys: Vec<String>,
}

/// The answer to `GET /api/jobs/{id}/ssh`: what an SSH client needs to know of a running
/// job's SSH endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshEndpoint {
    /// The agent's host key (`ssh-ed25519 AAAA…`), the same for every job of the agent: pin
    /// it.
    pub host_key: String,
    /// The user sessions run as (the job's user).
    pub user: String,
    /// The directory sessions start in (the job's working directory).
    pub working_dir: String,
    /// Seconds since the job last had an SSH connection (0 while one is open; connections
    /// shorter than 10 s do not count), or since it started: a dev environment's
    /// `inactivity_duration` is measured with it.
    #[serde(default)]
    pub no_connections_secs: u64,
}
