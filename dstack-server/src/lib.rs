//! `dstack server`: the long-lived home of a state directory's engine. It hosts the engine
//! (scheduler, agent links, retries, idle reaping, orphan sweeps, schedules) and serves
//! dstack's REST API on `127.0.0.1:3000` (see [`dstack_core::client::protocol`]) to the CLI,
//! the Python package and Rust [`dstack_core::Client`]s.
//!
//! One server per `$DSTACK_HOME`: it holds `server/server.lock` while it runs, and a second
//! one exits naming the first. Clients start it on demand (`dstack server --auto`); such a
//! server exits on its own once nothing needs supervision and no client has called for
//! [`ServerOptions::idle_exit`] (a server started by hand stays up). Killing it loses
//! nothing: the next one resumes from the state file, and jobs keep running on their agents
//! meanwhile.

mod artifacts;
mod dialect;
mod errors;
mod inactivity;
mod proxy;
mod routes;
mod secrets;
mod ssh;
mod supervision;

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dstack_core::client::home::{self, ClientConfig, ServerInfo};
use dstack_core::engine::EngineError;
use dstack_core::Client;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// dstack's default port.
pub const DEFAULT_PORT: u16 = 3000;

/// How long an auto-started server with nothing to supervise waits for a client before it
/// exits (`DSTACK_SERVER_IDLE_EXIT`, seconds; 0: never).
pub const DEFAULT_IDLE_EXIT: Duration = Duration::from_secs(600);

/// Connections served at once; further ones wait to be accepted.
const MAX_CONNECTIONS: usize = 1024;

/// How long a connection may take to send a request's head (keep-alive included).
const HEADER_TIMEOUT: Duration = Duration::from_secs(60);

/// How often the server checks that its state directory still exists, and whether it idles.
const CHECK_PERIOD: Duration = Duration::from_secs(2);

/// How to run a server.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// The state directory.
    pub home: PathBuf,
    /// The address to listen on (default `127.0.0.1`, or `DSTACK_SERVER_HOST`).
    pub host: String,
    /// The port (default 3000, or `DSTACK_SERVER_PORT`); `None`: 3000, or any free port when
    /// 3000 is taken.
    pub port: Option<u16>,
    /// The admin token (default: the one of `server/token`, created at random on first start).
    pub token: Option<String>,
    /// Exit after this long without a client while nothing needs supervision (auto-started
    /// servers); `None`: never.
    pub idle_exit: Option<Duration>,
    /// The `dstack-agent` binary (default: found next to this program or on `PATH`).
    pub agent_bin: Option<PathBuf>,
    /// How long the services proxy waits for a replica's answer (default 300 s, or
    /// `DSTACK_SERVER_PROXY_TIMEOUT` seconds); then it answers 504.
    pub proxy_timeout: Duration,
    /// The `dstack` program the `ProxyCommand` of `ssh <run>` entries runs (default: this
    /// program).
    pub cli_bin: Option<PathBuf>,
}

impl ServerOptions {
    /// The options of `dstack server` for `home`, from `DSTACK_SERVER_HOST`,
    /// `DSTACK_SERVER_PORT` and, when `auto`, `DSTACK_SERVER_IDLE_EXIT`.
    pub fn from_env(home: PathBuf, auto: bool) -> Result<ServerOptions, ServeError> {
        let host = std::env::var("DSTACK_SERVER_HOST").unwrap_or_else(|_| "127.0.0.1".into());
        let port = match std::env::var("DSTACK_SERVER_PORT") {
            Ok(port) => Some(port.parse().map_err(|_| {
                ServeError::Config(format!("DSTACK_SERVER_PORT={port}: not a port number"))
            })?),
            Err(_) => None,
        };
        let idle_exit = match (auto, std::env::var("DSTACK_SERVER_IDLE_EXIT")) {
            (false, _) => None,
            (true, Ok(secs)) => match secs.parse::<u64>() {
                Ok(0) => None,
                Ok(secs) => Some(Duration::from_secs(secs)),
                Err(_) => {
                    return Err(ServeError::Config(format!(
                        "DSTACK_SERVER_IDLE_EXIT={secs}: not a number of seconds"
                    )))
                }
            },
            (true, Err(_)) => Some(DEFAULT_IDLE_EXIT),
        };
        let proxy_timeout = match std::env::var("DSTACK_SERVER_PROXY_TIMEOUT") {
            Ok(secs) => match secs.parse::<u64>() {
                Ok(secs) if secs > 0 => Duration::from_secs(secs),
                _ => {
                    return Err(ServeError::Config(format!(
                        "DSTACK_SERVER_PROXY_TIMEOUT={secs}: not a positive number of seconds"
                    )))
                }
            },
            Err(_) => proxy::DEFAULT_TIMEOUT,
        };
        Ok(ServerOptions {
            home,
            host,
            port,
            token: None,
            idle_exit,
            agent_bin: None,
            proxy_timeout,
            cli_bin: None,
        })
    }
}

/// Why a server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Another server runs for the same state directory.
    #[error("a dstack server for {home} is already running{running}")]
    AlreadyRunning {
        /// The state directory.
        home: String,
        /// ` (pid N, URL)`, when known.
        running: String,
    },
    /// A file of the state directory could not be used.
    #[error("{0}")]
    Io(String),
    /// The engine could not start.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A setting is wrong.
    #[error("{0}")]
    Config(String),
}

fn io_error(what: &Path, e: io::Error) -> ServeError {
    ServeError::Io(format!("{}: {e}", what.display()))
}

/// What the request handlers share.
pub(crate) struct Shared {
    /// The engine, hosted in this process.
    pub client: Client,
    /// The admin token.
    pub token: String,
    /// When the last request arrived (ms since the server started).
    pub last_request_ms: AtomicU64,
    /// When the server started.
    pub started: tokio::time::Instant,
    /// The services proxy.
    pub proxy: Arc<proxy::Proxy>,
    /// The state directory.
    pub home: PathBuf,
    /// The project's public key, which SSH connections to jobs accept (`runs/ssh`).
    pub project_key: String,
}

impl Shared {
    pub(crate) fn touch(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.last_request_ms.store(now, Ordering::Relaxed);
    }
}

/// Background tasks of a server, aborted when it stops.
struct Duties(Vec<tokio::task::AbortHandle>);

impl Drop for Duties {
    fn drop(&mut self) {
        for duty in &self.0 {
            duty.abort();
        }
    }
}

/// Runs the server until it is told to stop (SIGINT, SIGTERM), its state directory is
/// removed, or (auto-started) it has idled for [`ServerOptions::idle_exit`]. `ready` hears
/// the URL once it listens.
pub async fn serve(options: ServerOptions, ready: impl FnOnce(&str)) -> Result<(), ServeError> {
    let home = options.home.clone();
    dstack_core::client::prepare_home(&home).map_err(|e| io_error(&home, e))?;
    home::move_legacy_state(&home).map_err(|e| io_error(&home, e))?;
    let _lock = lock(&home).await?;
    let token = match &options.token {
        Some(token) => token.clone(),
        None => admin_token(&home)?,
    };
    let client =
        dstack_backends::local::local_client(home.clone(), options.agent_bin.clone()).await?;
    let listener = bind(&options).await?;
    let addr = listener
        .local_addr()
        .map_err(|e| ServeError::Io(e.to_string()))?;
    let url = format!("http://{}", url_authority(&options.host, addr));
    let mut config = ClientConfig::load(&home).map_err(|e| ServeError::Io(e.to_string()))?;
    let client_url = match options.host.as_str() {
        "0.0.0.0" | "::" | "[::]" => format!("http://127.0.0.1:{}", addr.port()),
        _ => url.clone(),
    };
    if home::is_loopback(&client_url) {
        config.set_local(&client_url, &token);
        config
            .save(&home)
            .map_err(|e| io_error(&home::client_config_file(&home), e))?;
    }
    let info = ServerInfo {
        pid: std::process::id(),
        url: client_url,
    };
    let info_bytes = serde_json::to_vec(&info).map_err(|e| ServeError::Io(e.to_string()))?;
    dstack_core::files::replace_private(&home::info_file(&home), &info_bytes)
        .map_err(|e| io_error(&home::info_file(&home), e))?;
    let project =
        dstack_backends::project::Project::load_or_create(&home).map_err(|e| io_error(&home, e))?;
    let cli = match &options.cli_bin {
        Some(cli) => Some(cli.clone()),
        None => std::env::current_exe().ok(),
    };
    // The server's background duties stop with it, also when its future is dropped (a
    // server hosted by a test or a tool): none may keep the engine and its agents going.
    let mut duties = Duties(Vec::new());
    if let Some(cli) = cli {
        let entries = ssh::Entries {
            home: std::path::absolute(&home).map_err(|e| io_error(&home, e))?,
            cli,
        };
        duties
            .0
            .push(ssh::keep(client.clone(), entries).abort_handle());
    }
    ready(&url);
    let engine = client
        .engine()
        .cloned()
        .ok_or_else(|| ServeError::Io("the server's client hosts no engine".into()))?;
    let proxy = Arc::new(proxy::Proxy::new(engine.clone(), options.proxy_timeout));
    duties
        .0
        .push(tokio::spawn(proxy::supervise(proxy.clone(), engine)).abort_handle());
    let shared = Arc::new(Shared {
        client,
        token,
        last_request_ms: AtomicU64::new(0),
        started: tokio::time::Instant::now(),
        proxy,
        home: home.clone(),
        project_key: project.ssh_public_key,
    });
    accept_loop(listener, shared, &options).await;
    drop(duties);
    if ServerInfo::read(&home).is_some_and(|i| i == info) {
        let _ = std::fs::remove_file(home::info_file(&home));
    }
    Ok(())
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, options: &ServerOptions) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut check = tokio::time::interval(CHECK_PERIOD);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let terminated = async move {
        match &mut term {
            Some(term) => term.recv().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(terminated);
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = &mut terminated => break,
            _ = check.tick() => {
                if !options.home.exists() {
                    eprintln!("dstack server: {} was removed; exiting", options.home.display());
                    break;
                }
                let busy = slots.available_permits() < MAX_CONNECTIONS;
                if let Some(limit) = options.idle_exit {
                    if !busy && supervision::may_exit(&shared, limit) {
                        eprintln!(
                            "dstack server: nothing to supervise and no client for {} s; exiting",
                            limit.as_secs()
                        );
                        break;
                    }
                }
            }
            accepted = accept(&listener, &slots) => match accepted {
                (slot, Ok((stream, addr))) => {
                    let _ = stream.set_nodelay(true);
                    let shared = shared.clone();
                    let handler = move |mut req: hyper::Request<hyper::body::Incoming>| {
                        req.extensions_mut().insert(proxy::ClientAddr(addr));
                        routes::handle(shared.clone(), req)
                    };
                    dstack_core::http::serve::spawn_connection(stream, slot, HEADER_TIMEOUT, handler);
                }
                (_, Err(e)) => {
                    eprintln!("dstack server: cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// The next connection, once one of the `slots` is free (held while it is served).
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> (
    Option<tokio::sync::OwnedSemaphorePermit>,
    io::Result<(tokio::net::TcpStream, SocketAddr)>,
) {
    let slot = slots.clone().acquire_owned().await.ok();
    (slot, listener.accept().await)
}

/// Takes the state directory's server lock: waits a moment for a server that is exiting, then
/// refuses, naming the one that holds it.
async fn lock(home: &Path) -> Result<File, ServeError> {
    let path = home::lock_file(home);
    let file = File::create(&path).map_err(|e| io_error(&path, e))?;
    for _ in 0..20 {
        if file.try_lock().is_ok() {
            return Ok(file);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let running = ServerInfo::read(home)
        .map(|i| format!(" (pid {}, {})", i.pid, i.url))
        .unwrap_or_default();
    Err(ServeError::AlreadyRunning {
        home: home.display().to_string(),
        running,
    })
}

/// The admin token of `server/token`, created at random (0600) on first start.
fn admin_token(home: &Path) -> Result<String, ServeError> {
    let path = home::server_dir(home).join("token");
    let fresh = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    dstack_core::files::create_private(&path, fresh.as_bytes()).map_err(|e| io_error(&path, e))?;
    let token = std::fs::read_to_string(&path).map_err(|e| io_error(&path, e))?;
    Ok(token.trim().to_string())
}

/// Binds the listener: the configured port, or 3000 and, for an auto-chosen port, any free
/// one when 3000 is taken (another state directory's server).
async fn bind(options: &ServerOptions) -> Result<TcpListener, ServeError> {
    let host = options.host.trim_start_matches('[').trim_end_matches(']');
    let try_port = |port: u16| TcpListener::bind((host.to_string(), port));
    match options.port {
        Some(port) => try_port(port)
            .await
            .map_err(|e| ServeError::Io(format!("cannot listen on {host}:{port}: {e}"))),
        None => match try_port(DEFAULT_PORT).await {
            Ok(listener) => Ok(listener),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => try_port(0)
                .await
                .map_err(|e| ServeError::Io(format!("cannot listen on {host}: {e}"))),
            Err(e) => Err(ServeError::Io(format!(
                "cannot listen on {host}:{DEFAULT_PORT}: {e}"
            ))),
        },
    }
}

/// `host:port` for URLs (IPv6 hosts in brackets).
fn url_authority(host: &str, addr: SocketAddr) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{}", addr.port())
    } else {
        format!("{host}:{}", addr.port())
    }
}
