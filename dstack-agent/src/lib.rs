//! The dstack-rs host agent.
//!
//! The same agent runs on every host (this machine, SSH hosts, cloud VMs). It supervises jobs
//! as plain processes, keeps their state and output under a state directory, and serves the
//! agent API described in [`dstack_core::agent`] over HTTP/1.1 on a unix socket (never on a
//! network port).
//!
//! Embedding: [`Agent::start`] then [`Agent::serve_until`], or [`serve`] to run until SIGTERM
//! or SIGINT. To run an agent that outlives its caller, use [`spawn_detached`].

mod archives;
mod artifacts;
mod container;
mod daemon;
mod host;
mod http;
mod jobs;
mod journal;
mod lease;
mod logs;
mod process;
mod ssh;
mod state;
mod supervisor;

use std::ffi::OsString;
use std::fs;
use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dstack_core::agent::Healthcheck;
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use daemon::{close_inherited_fds, new_session, spawn_detached, start_in_background};
pub use lease::{LeaseConfig, DEFAULT_LEASE_WINDOW, POWER_OFF};

use http::App;
use jobs::Jobs;
use lease::Lease;
use state::StateDir;

/// Where an agent listens and keeps its state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// The unix socket the API is served on (created with mode 0600).
    pub socket: PathBuf,
    /// The state directory (mode 0700): job records and their output.
    pub state_dir: PathBuf,
    /// A `PATH`-style list of directories where host tools (`nvidia-smi`) are looked for;
    /// `None` means the agent's own `PATH`.
    pub tool_path: Option<OsString>,
    /// What the agent bounds.
    pub limits: Limits,
    /// The owner lease: only agents on cloud instances have one (never this machine's nor an
    /// SSH host's), which shut their host down once nobody owns it (see [`LeaseConfig`]).
    pub lease: Option<LeaseConfig>,
}

/// What an agent bounds, so that neither clients nor jobs can make it hold unbounded memory,
/// connections or disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once (default 512); further ones wait to be accepted until one
    /// closes.
    pub max_connections: usize,
    /// How long a connection may take to send a request's head, idle keep-alive time included
    /// (default 10 s); it is closed then.
    pub header_timeout: Duration,
    /// How much of a job's metrics file is served: its last lines within this many bytes
    /// (default 1 MiB).
    pub metrics_bytes: u64,
    /// The size of one log file of a job (default 32 MiB): output beyond goes to a new file.
    pub log_file_bytes: u64,
    /// How many log files of a job are kept, the one being written included (default 2):
    /// older output is deleted, so that a job's output on disk is at most
    /// `log_file_bytes × log_files` (plus its timestamp index).
    pub log_files: usize,
    /// How many finished jobs are kept (default 1000): when more have finished, the one that
    /// finished first is removed with its output.
    pub finished_jobs: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 512,
            header_timeout: Duration::from_secs(10),
            metrics_bytes: 1024 * 1024,
            log_file_bytes: 32 * 1024 * 1024,
            log_files: 2,
            finished_jobs: 1000,
        }
    }
}

impl AgentConfig {
    /// An agent on `socket` keeping its state in `state_dir`, finding host tools on `PATH`.
    pub fn new(socket: impl Into<PathBuf>, state_dir: impl Into<PathBuf>) -> Self {
        AgentConfig {
            socket: socket.into(),
            state_dir: state_dir.into(),
            tool_path: None,
            limits: Limits::default(),
            lease: None,
        }
    }
}

/// How often the agent checks that its state directory still exists: an agent whose
/// directory was removed (e.g. a deleted `$DSTACK_HOME`) stops its jobs and exits instead of
/// running on forever.
const STATE_CHECK: Duration = Duration::from_secs(2);

/// An agent that has recovered its jobs and is listening on its socket, ready to serve.
pub struct Agent {
    listener: UnixListener,
    app: Arc<App>,
    socket: PathBuf,
    state: StateDir,
    limits: Limits,
}

impl Agent {
    /// Takes the state directory (creating and locking it), recovers the jobs recorded there,
    /// detects the host, binds the socket and writes `agent.pid`. Fails if another agent uses
    /// the state directory or answers on the socket.
    pub async fn start(config: AgentConfig) -> io::Result<Agent> {
        let state = StateDir::open(&config.state_dir)?;
        let containers = container::detect().await;
        let socket_dir = config.socket.parent().unwrap_or(Path::new("/"));
        let jobs = Jobs::recover(
            &state,
            containers.clone(),
            config.limits.clone(),
            &[socket_dir],
        )?;
        jobs.remove_lost_containers().await;
        let tool_path = config.tool_path.or_else(|| std::env::var_os("PATH"));
        let host = host::detect(state.root(), tool_path.as_deref()).await;
        let token = state.token()?;
        let ssh = ssh::SshServer::load(state.root())?;
        let listener = bind(&config.socket).await?;
        fs::write(state.pid_file(), format!("{}\n", std::process::id()))?;
        let health = Healthcheck {
            service: "dstack-agent".to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            host,
            containers,
            build: own_build(),
        };
        Ok(Agent {
            listener,
            app: Arc::new(App {
                jobs,
                health,
                token,
                metrics_bytes: config.limits.metrics_bytes,
                lease: config.lease.map(|l| Arc::new(Lease::new(l))),
                ssh,
                hashes: Arc::default(),
            }),
            socket: config.socket,
            state,
            limits: config.limits,
        })
    }

    /// The socket the agent listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Serves requests until `shutdown` completes, then stops listening and removes the socket
    /// and `agent.pid`. Running jobs are left alone: they are recorded, and the next agent on
    /// this state directory reports them as lost; queued jobs stay queued, for the next agent
    /// to start. If the state directory is removed, the agent aborts its jobs and stops
    /// serving. An agent with an owner lease runs its shutdown action once the lease says so
    /// (see [`LeaseConfig`]), and goes on serving.
    pub async fn serve_until(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let app = self.app.clone();
        let lease = async {
            match &app.lease {
                Some(lease) => lease.keep(&app.jobs).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(lease);
        let mut leasing = true;
        let mut check = tokio::time::interval(STATE_CHECK);
        let slots = Arc::new(Semaphore::new(self.limits.max_connections));
        let timeout = self.limits.header_timeout;
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                // Done once the shutdown action ran.
                () = &mut lease, if leasing => leasing = false,
                _ = check.tick() => {
                    if !self.state.root().exists() {
                        eprintln!(
                            "dstack-agent: {} was removed; stopping its jobs and exiting",
                            self.state.root().display()
                        );
                        self.abort_all().await;
                        break;
                    }
                }
                (slot, accepted) = accept(&self.listener, &slots) => match accepted {
                    Ok((stream, _)) => serve_connection(self.app.clone(), stream, slot, timeout),
                    Err(e) => {
                        // E.g. out of file descriptors: retry without spinning.
                        eprintln!("dstack-agent: cannot accept a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        drop(self.listener);
        self.app.jobs.close();
        let _ = fs::remove_file(&self.socket);
        let _ = fs::remove_file(self.state.pid_file());
    }
}

impl Agent {
    /// Aborts every running job and gives their supervisors a moment to finish.
    async fn abort_all(&self) {
        let jobs = &self.app.jobs;
        let running: Vec<String> = jobs
            .list()
            .into_iter()
            .filter(|j| !j.status.is_finished())
            .map(|j| j.id)
            .collect();
        for id in &running {
            let request = dstack_core::agent::StopRequest {
                abort: true,
                grace_secs: 0,
                reason: "terminated_by_server".to_string(),
            };
            let _ = jobs.stop(id, request);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < deadline
            && jobs
                .list()
                .iter()
                .any(|j| running.contains(&j.id) && !j.status.is_finished())
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Runs an agent until SIGTERM or SIGINT.
pub async fn serve(config: AgentConfig) -> io::Result<()> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let agent = Agent::start(config).await?;
    agent
        .serve_until(async move {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
        })
        .await;
    Ok(())
}

/// The next connection, once one of the `slots` is free (it is held while the connection
/// is served).
async fn accept(
    listener: &UnixListener,
    slots: &Arc<Semaphore>,
) -> (
    Option<OwnedSemaphorePermit>,
    io::Result<(UnixStream, tokio::net::unix::SocketAddr)>,
) {
    // The semaphore is never closed.
    let slot = slots.clone().acquire_owned().await.ok();
    (slot, listener.accept().await)
}

/// Serves one connection (see [`dstack_core::http::serve::spawn_connection`]).
fn serve_connection(
    app: Arc<App>,
    stream: UnixStream,
    slot: Option<OwnedSemaphorePermit>,
    timeout: Duration,
) {
    let handler = move |req| http::handle(app.clone(), req);
    dstack_core::http::serve::spawn_connection(stream, slot, timeout, handler);
}

/// The [`dstack_core::agent::build_stamp`] of the running binary (empty if unreadable).
fn own_build() -> String {
    fs::File::open("/proc/self/exe")
        .and_then(dstack_core::agent::build_stamp)
        .unwrap_or_default()
}

/// Binds the socket (mode 0600), replacing a stale socket file that nobody answers on.
async fn bind(socket: &Path) -> io::Result<UnixListener> {
    if let Some(parent) = socket.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
    }
    if let Ok(meta) = fs::symlink_metadata(socket) {
        let shown = socket.display();
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{shown} exists and is not a socket"),
            ));
        }
        if UnixStream::connect(socket).await.is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("another dstack-agent is already listening on {shown}"),
            ));
        }
        fs::remove_file(socket)?;
    }
    let listener = UnixListener::bind(socket).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot listen on {}: {e}", socket.display()),
        )
    })?;
    fs::set_permissions(socket, fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}
