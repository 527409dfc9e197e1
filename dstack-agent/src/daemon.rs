//! Running the agent in the background, detached from whoever started it.
//!
//! `dstack-agent serve --detach` starts a second copy of itself with `--new-session`, which
//! calls `setsid()` (leaving the caller's session, process group and terminal) and ignores
//! SIGHUP, and exits once that copy answers on its socket. The agent is then a child of init:
//! it survives its starter, and its starter never has to reap it.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Seek};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use dstack_core::agent::{AgentClient, Healthcheck};
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::Instant;

use crate::state::create_private_dir;
use crate::AgentConfig;

/// How long a starting agent may take to answer (host detection can be slow).
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Starts an agent that outlives the caller, and returns its healthcheck once it answers.
/// Runs `program` (a `dstack-agent` binary) as `serve --detach`; when `config.tool_path` is
/// set, it becomes the agent's `PATH`.
pub async fn spawn_detached(program: &Path, config: &AgentConfig) -> io::Result<Healthcheck> {
    let output = tokio::process::Command::from(serve_command(program, config, "--detach"))
        .stdin(Stdio::null())
        .output()
        .await?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(io::Error::other(format!(
            "{} serve --detach failed ({}): {}",
            program.display(),
            output.status,
            stderr.trim()
        )));
    }
    AgentClient::unix(&config.socket)
        .healthcheck()
        .await
        .map_err(io::Error::other)
}

/// What `serve --detach` does: starts `program serve --new-session` with no stdin or stdout
/// and its stderr appended to `<state_dir>/agent.log`, and waits until it answers. The caller
/// is the agent's parent until it exits.
pub async fn start_in_background(program: &Path, config: &AgentConfig) -> io::Result<Healthcheck> {
    create_private_dir(&config.state_dir)?;
    let log_path = config.state_dir.join("agent.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let log_start = log.metadata()?.len();
    let mut child = serve_command(program, config, "--new-session")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let client = AgentClient::unix(&config.socket);
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            let said = read_from(&log_path, log_start).unwrap_or_default();
            return Err(io::Error::other(format!(
                "the agent exited at once ({status}): {}",
                said.trim()
            )));
        }
        match client.healthcheck().await {
            Ok(health) if health.pid == child.id() => return Ok(health),
            _ if Instant::now() >= deadline => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the agent (pid {}) did not answer on {} within {}s; see {}",
                        child.id(),
                        config.socket.display(),
                        READY_TIMEOUT.as_secs(),
                        log_path.display()
                    ),
                ))
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Closes every descriptor above stderr the process inherited, so that the long-lived agent
/// keeps nothing its starter happened to leave open (a pipe a caller waits on for end of
/// file, a lock held through `flock`). What `serve --new-session` does first, before anything
/// opens a descriptor of its own.
pub fn close_inherited_fds() -> io::Result<()> {
    let inherited: Vec<i32> = fs::read_dir("/proc/self/fd")?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in inherited {
        // The listing's own descriptor is among them, closed already: EBADF, ignored.
        let _ = nix::unistd::close(fd);
    }
    Ok(())
}

/// What `serve --new-session` does before serving: leaves the caller's session, process
/// group and controlling terminal (`setsid`), and ignores SIGHUP. Must run in a tokio
/// runtime.
pub fn new_session() -> io::Result<()> {
    nix::unistd::setsid()
        .map_err(|e| io::Error::other(format!("cannot start a new session: {e}")))?;
    // Once tokio handles a signal, it does for the rest of the process's life: SIGHUP no
    // longer ends the agent, and with the stream dropped it is simply discarded.
    drop(signal(SignalKind::hangup())?);
    Ok(())
}

/// `program serve --socket … --state-dir … <flag>`, with the lease's flags if it has one.
fn serve_command(program: &Path, config: &AgentConfig, flag: &str) -> Command {
    let mut command = Command::new(program);
    command
        .arg("serve")
        .arg("--socket")
        .arg(&config.socket)
        .arg("--state-dir")
        .arg(&config.state_dir)
        .arg(flag);
    if let Some(lease) = &config.lease {
        command
            .arg("--lease-idle")
            .arg(lease.idle.as_secs().to_string())
            .arg("--lease-window")
            .arg(lease.window.as_secs().max(1).to_string());
        if let Some(shutdown) = &lease.shutdown_command {
            command.arg("--shutdown-command").arg(shutdown);
        }
    }
    if let Some(path) = &config.tool_path {
        command.env("PATH", path);
    }
    command
}

fn read_from(path: &Path, offset: u64) -> io::Result<String> {
    let mut file = fs::File::open(path)?;
    file.seek(io::SeekFrom::Start(offset))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}
