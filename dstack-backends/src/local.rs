//! The `local` backend: this machine is the only offer, and its instance is the implicit
//! `local` fleet. Jobs run as processes under a `dstack-agent` that this backend starts
//! detached (and restarts when it is gone), so runs outlive the process that started them.
//! An agent of another build (an upgrade) is replaced once it runs no job.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use dstack_core::agent::{build_stamp, AgentClient, Healthcheck};
use dstack_core::backend::{BoxFuture, Compute, ComputeError, CreatedInstance, InstanceConfig};
use dstack_core::engine::{EngineError, EngineOptions};
use dstack_core::model::Instance;
use dstack_core::offers::{Availability, Offer};
use dstack_core::{Client, ClientOptions};

/// How long a freshly started agent may take to answer.
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(10);

/// This machine as a backend.
pub struct LocalBackend {
    state_dir: PathBuf,
    agent_bin: PathBuf,
    agent_path: Option<std::ffi::OsString>,
    docker_host: Option<std::ffi::OsString>,
    /// Whether the agent reported a container engine (learned from its healthcheck).
    containers: std::sync::atomic::AtomicBool,
    /// The [`build_stamp`] of `agent_bin`, once read.
    build: std::sync::OnceLock<String>,
}

impl LocalBackend {
    /// A backend whose agent keeps its state in `<home>/agent` and is the `agent_bin` binary.
    pub fn new(home: &Path, agent_bin: PathBuf) -> Self {
        LocalBackend {
            state_dir: home.join("agent"),
            agent_bin,
            agent_path: None,
            docker_host: None,
            containers: std::sync::atomic::AtomicBool::new(false),
            build: std::sync::OnceLock::new(),
        }
    }

    /// Starts the agent with this `PATH` (where it finds `nvidia-smi`), instead of inheriting
    /// this process's.
    pub fn with_agent_path(mut self, path: impl Into<std::ffi::OsString>) -> Self {
        self.agent_path = Some(path.into());
        self
    }

    /// Starts the agent with this container engine (`DOCKER_HOST`: `unix:///path/to.sock`)
    /// instead of the one in this process's environment.
    pub fn with_container_engine(mut self, docker_host: impl Into<std::ffi::OsString>) -> Self {
        self.docker_host = Some(docker_host.into());
        self
    }

    /// A backend using the `dstack-agent` found by [`find_agent_binary`].
    pub fn with_default_agent(home: &Path) -> Result<Self, ComputeError> {
        Ok(Self::new(home, find_agent_binary()?))
    }

    /// The agent's unix socket.
    pub fn socket(&self) -> PathBuf {
        self.state_dir.join("agent.sock")
    }

    /// Returns a client of the running agent, starting it if it does not answer (or if it
    /// is of another build than `agent_bin` and runs no job: see [`Self::retire`]).
    pub async fn ensure_agent(&self) -> Result<AgentClient, ComputeError> {
        let probe = AgentClient::unix(self.socket());
        let build = self.build()?;
        match probe.healthcheck().await {
            Ok(health) if health.build == build => return self.client(&health),
            _ => {}
        }
        std::fs::create_dir_all(&self.state_dir)
            .map_err(|e| other("cannot create the agent state dir", e))?;
        // One starter at a time across processes; the others find it running.
        let lock = std::fs::File::create(self.state_dir.join("start.lock"))
            .map_err(|e| other("cannot create the agent start lock", e))?;
        let lock = tokio::task::spawn_blocking(move || lock.lock().map(|()| lock))
            .await
            .map_err(|e| ComputeError::Other(e.to_string()))?
            .map_err(|e| other("cannot lock the agent start lock", e))?;
        match probe.healthcheck().await {
            Ok(health) if health.build == build => return self.client(&health),
            Ok(other) => self.retire(&other).await?,
            Err(_) => {}
        }
        self.spawn_agent().await?;
        let health = probe.healthcheck().await.map_err(|e| {
            ComputeError::Other(format!(
                "the local agent started but does not answer ({e}); see {}",
                self.state_dir.join("agent.log").display()
            ))
        })?;
        drop(lock);
        self.client(&health)
    }

    /// The build stamp of the agent binary this backend starts.
    fn build(&self) -> Result<&str, ComputeError> {
        if let Some(build) = self.build.get() {
            return Ok(build);
        }
        let stamp = std::fs::File::open(&self.agent_bin)
            .and_then(build_stamp)
            .map_err(|e| other(&format!("cannot read {}", self.agent_bin.display()), e))?;
        Ok(self.build.get_or_init(|| stamp))
    }

    /// A client of the agent that answered with `health`, holding its token.
    fn client(&self, health: &Healthcheck) -> Result<AgentClient, ComputeError> {
        self.note_containers(health.containers.is_some());
        AgentClient::local(self.socket(), &self.state_dir)
            .map_err(|e| other("cannot read the local agent's token", e))
    }

    /// Stops the running agent of another build (`health`), so that this build's starts: only
    /// once it runs no job (stopping it would lose them); until then this is an error that
    /// says so.
    async fn retire(&self, health: &Healthcheck) -> Result<(), ComputeError> {
        // An agent older than the token has none and needs none.
        let old = AgentClient::local(self.socket(), &self.state_dir)
            .unwrap_or_else(|_| AgentClient::unix(self.socket()));
        let busy = old
            .jobs()
            .await
            .map_err(|e| ComputeError::Other(format!("cannot list the old agent's jobs: {e}")))?
            .iter()
            .filter(|job| !job.status.is_finished())
            .count();
        let pid = health.pid;
        if busy > 0 {
            return Err(ComputeError::Other(format!(
                "the local agent (pid {pid}, {}) is another build than {} and still runs {busy} \
                 job(s): it is replaced once they end (or stop it with `kill {pid}`: its jobs are \
                 then lost)",
                self.socket().display(),
                self.agent_bin.display()
            )));
        }
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).map_err(|e| {
            ComputeError::Other(format!("cannot stop the old local agent (pid {pid}): {e}"))
        })?;
        let deadline = tokio::time::Instant::now() + AGENT_START_TIMEOUT;
        // Gone once the process is (it holds the state directory's lock until it exits).
        while nix::sys::signal::kill(pid, None).is_ok() {
            if tokio::time::Instant::now() >= deadline {
                return Err(ComputeError::Other(format!(
                    "the old local agent (pid {pid}) did not stop within {}s",
                    AGENT_START_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Records whether the agent has a container engine (see `supports_containers`).
    fn note_containers(&self, available: bool) {
        self.containers
            .store(available, std::sync::atomic::Ordering::Relaxed);
    }

    /// Runs `dstack-agent serve --detach`, which returns once the detached agent answers.
    async fn spawn_agent(&self) -> Result<(), ComputeError> {
        let log = self.state_dir.join("agent.log");
        let mut command = tokio::process::Command::new(&self.agent_bin);
        if let Some(path) = &self.agent_path {
            command.env("PATH", path);
        }
        if let Some(host) = &self.docker_host {
            command.env("DOCKER_HOST", host);
        }
        let mut child = command
            .arg("serve")
            .arg("--socket")
            .arg(self.socket())
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--detach")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| other(&format!("cannot start {}", self.agent_bin.display()), e))?;
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            use tokio::io::AsyncReadExt;
            let _ = pipe.read_to_string(&mut stderr).await;
        }
        let status = tokio::time::timeout(AGENT_START_TIMEOUT, child.wait())
            .await
            .map_err(|_| {
                ComputeError::Other(format!(
                    "the local agent did not start within {}s; see {}",
                    AGENT_START_TIMEOUT.as_secs(),
                    log.display()
                ))
            })?
            .map_err(|e| other("cannot wait for the agent", e))?;
        if !status.success() {
            return Err(ComputeError::Other(format!(
                "the local agent failed to start: {}",
                stderr.trim()
            )));
        }
        Ok(())
    }
}

fn other(what: &str, e: std::io::Error) -> ComputeError {
    ComputeError::Other(format!("{what}: {e}"))
}

/// Finds `dstack-agent`: `$DSTACK_AGENT_BIN`, next to the current executable (or one level
/// up, as for test binaries), then on `PATH`.
pub fn find_agent_binary() -> Result<PathBuf, ComputeError> {
    dstack_core::client::home::find_executable("dstack-agent", "DSTACK_AGENT_BIN").ok_or_else(|| {
        ComputeError::NotFound(
            "the `dstack-agent` binary was not found next to this program or on PATH; set DSTACK_AGENT_BIN".to_string(),
        )
    })
}

impl Compute for LocalBackend {
    fn backend(&self) -> &'static str {
        "local"
    }

    fn supports_containers(&self) -> bool {
        self.containers.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn offers(&self) -> BoxFuture<'_, Result<Vec<Offer>, ComputeError>> {
        Box::pin(async move {
            let client = self.ensure_agent().await?;
            let health = client
                .healthcheck()
                .await
                .map_err(|e| ComputeError::Other(e.to_string()))?;
            Ok(vec![Offer {
                backend: "local".to_string(),
                instance_type: "local".to_string(),
                region: "local".to_string(),
                price: 0.0,
                spot: false,
                resources: health.host,
                availability: Availability::Available,
                availability_zones: None,
                backend_data: serde_json::Value::Null,
            }])
        })
    }

    fn create_instance<'a>(
        &'a self,
        offer: &'a Offer,
        _config: &'a InstanceConfig,
    ) -> BoxFuture<'a, Result<CreatedInstance, ComputeError>> {
        Box::pin(async move {
            self.ensure_agent().await?;
            let backend_data = serde_json::json!({ "socket": self.socket() });
            Ok(CreatedInstance {
                offer: offer.clone(),
                cloud_id: None,
                backend_data,
            })
        })
    }

    fn connect<'a>(
        &'a self,
        _instance: &'a Instance,
    ) -> BoxFuture<'a, Result<AgentClient, ComputeError>> {
        Box::pin(self.ensure_agent())
    }

    fn terminate_instance<'a>(
        &'a self,
        _instance: &'a Instance,
    ) -> BoxFuture<'a, Result<(), ComputeError>> {
        // This machine is never terminated.
        Box::pin(async { Ok(()) })
    }
}

/// A client hosting the engine of `home` in this process (what `dstack server` runs): the
/// local backend, (with the `ssh` feature) SSH fleets and the cloud backends
/// `home/server/config.yml` configures (a backend that cannot be used is
/// skipped with a message on stderr); the agent is `agent_bin` (or the one
/// [`find_agent_binary`] finds).
pub async fn local_client(
    home: PathBuf,
    agent_bin: Option<PathBuf>,
) -> Result<Client, EngineError> {
    let agent_bin = match agent_bin {
        Some(bin) => bin,
        None => find_agent_binary()?,
    };
    let mut backends: Vec<Arc<dyn Compute>> = Vec::new();
    #[cfg(feature = "ssh")]
    backends.push(Arc::new(crate::ssh::SshCompute::new(
        crate::ssh::KnownHosts::in_home(&home),
        agent_bin.clone(),
    )));
    let (clouds, skipped) = crate::cloud::configured_backends(&home, &agent_bin)
        .await
        .map_err(|e| EngineError::Invalid(e.to_string()))?;
    for why in skipped {
        eprintln!("dstack: {why}");
    }
    backends.extend(clouds);
    backends.insert(0, Arc::new(LocalBackend::new(&home, agent_bin)));
    let config = crate::config::load(&home).map_err(|e| EngineError::Invalid(e.to_string()))?;
    let artifacts = match &config.artifacts {
        Some(storage) => Some(dstack_core::artifacts::ArtifactStore::open(storage)?),
        None => None,
    };
    Client::open(ClientOptions {
        home,
        backends,
        engine: EngineOptions {
            artifacts,
            ..EngineOptions::default()
        },
    })
    .await
}
