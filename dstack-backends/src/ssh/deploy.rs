//! Installing, starting and removing the agent on an SSH host. Everything lives in one
//! directory of the login user (`~/.dstack-rs/<instance name>-<instance id>`, so that two
//! state directories deploying fleets of the same name to one login never share it): the
//! agent binary, its socket and its state. The agent runs detached (its own session), so it
//! outlives the SSH connection.

use std::path::Path;
use std::time::Duration;

use dstack_core::agent::{
    build_stamp, AgentClient, AgentDialer, AgentStream, Healthcheck, LeaseTerms, StopRequest,
};
use dstack_core::backend::BoxFuture;
use std::sync::Arc;

use super::link::HostLink;
use super::session::{quote, SshError, SshSession};

/// Where the agent of one instance lives on its host.
#[derive(Clone, Debug)]
pub struct RemoteAgent {
    /// The directory (absolute).
    pub dir: String,
}

/// The owner lease an agent on a cloud instance is started with (`dstack-agent serve
/// --lease-idle … --lease-window … [--shutdown-command …]`): once it has run no job for the
/// idle time and heard no renewal for the window, it shuts its host down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentLease {
    /// The idle time and the lease window.
    pub terms: LeaseTerms,
    /// The shutdown action (run with `sh -c`); `None`: the agent powers the host off.
    pub shutdown_command: Option<String>,
}

impl AgentLease {
    /// The agent's command-line flags for this lease, quoted for the shell.
    fn flags(&self) -> String {
        let mut flags = format!(
            " --lease-idle {} --lease-window {}",
            self.terms.idle_secs,
            self.terms.window_secs.max(1)
        );
        if let Some(command) = &self.shutdown_command {
            flags.push_str(&format!(" --shutdown-command {}", quote(command)));
        }
        flags
    }
}

/// How long jobs are given to end once stopped, when their agent is removed.
const STOP_GRACE_SECS: u64 = 5;

impl RemoteAgent {
    /// Where `instance`'s agent lives under the login's `home`.
    pub fn of_instance(home: &str, instance_name: &str, instance_id: &str) -> Self {
        let id: String = instance_id
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(12)
            .collect();
        RemoteAgent {
            dir: format!("{home}/.dstack-rs/{instance_name}-{id}"),
        }
    }

    fn binary(&self) -> String {
        format!("{}/dstack-agent", self.dir)
    }

    /// The agent's unix socket on the host.
    pub fn socket(&self) -> String {
        format!("{}/agent.sock", self.dir)
    }

    fn state_dir(&self) -> String {
        format!("{}/agent", self.dir)
    }

    /// Uploads `binary` unless the host already has this very build (a stamp file records
    /// which one it has). The upload goes to a temporary name first, so a full disk leaves no
    /// half-written agent behind.
    pub async fn install(&self, session: &SshSession, binary: &Path) -> Result<(), SshError> {
        let bytes = std::fs::read(binary).map_err(|e| SshError::Session {
            target: session.target().to_string(),
            message: format!("cannot read the agent binary {}: {e}", binary.display()),
        })?;
        let stamp = build_stamp(&bytes[..]).map_err(|e| SshError::Session {
            target: session.target().to_string(),
            message: format!("cannot read the agent binary {}: {e}", binary.display()),
        })?;
        let dir = quote(&self.dir);
        let bin = quote(&self.binary());
        let current = session
            .exec(&format!("cat {dir}/agent.stamp 2>/dev/null"), None)
            .await?
            .text();
        if current == stamp && session.exec(&format!("test -x {bin}"), None).await?.status == 0 {
            return Ok(());
        }
        let tmp = quote(&format!("{}.upload", self.binary()));
        let command = format!(
            "umask 077 && mkdir -p {dir} && cat > {tmp} && chmod 700 {tmp} && mv {tmp} {bin} \
             && printf %s {} > {dir}/agent.stamp || {{ rm -f {tmp}; exit 1; }}",
            quote(&stamp)
        );
        session.run(&command, Some(&bytes)).await.map(drop)
    }

    /// Starts the agent (with `env`, holding `lease` if given) if it does not answer; returns
    /// its healthcheck. An agent of another build than the one installed (see
    /// [`Self::install`]) that runs no job is stopped and replaced; one still running jobs is
    /// an error.
    pub async fn start(
        &self,
        link: &Arc<HostLink>,
        env: &std::collections::BTreeMap<String, String>,
        lease: Option<&AgentLease>,
    ) -> Result<Healthcheck, SshError> {
        let probe = AgentClient::dial(self.dialer(link.clone()));
        let session = link.session().await?;
        if let Ok(health) = probe.healthcheck().await {
            let installed = session
                .exec(&format!("cat {}/agent.stamp", quote(&self.dir)), None)
                .await?
                .text();
            if health.build == installed {
                return Ok(health);
            }
            self.retire(&session, link, &health).await?;
        }
        // The fleet's env reaches the agent too (e.g. DOCKER_HOST for its container engine),
        // as shell assignments on standard input: never on a command line (which every user
        // of the host can read) nor in an error message.
        let mut assignments = String::new();
        for (name, value) in env {
            if !dstack_core::config::interpolate::is_identifier(name) {
                return Err(SshError::Session {
                    target: session.target().to_string(),
                    message: format!("invalid environment variable name {name:?}"),
                });
            }
            assignments.push_str(&format!("{name}={}\n", quote(value)));
        }
        let command = format!(
            "set -a && eval \"$(cat)\" && set +a && exec {} serve --detach --socket {} --state-dir {}{}",
            quote(&self.binary()),
            quote(&self.socket()),
            quote(&self.state_dir()),
            lease.map(AgentLease::flags).unwrap_or_default()
        );
        session.run(&command, Some(assignments.as_bytes())).await?;
        probe.healthcheck().await.map_err(|e| SshError::Session {
            target: session.target().to_string(),
            message: format!("the agent started but does not answer: {e}"),
        })
    }

    /// Stops every job of the agent (containers too) and waits until they ended, then the
    /// agent itself (only the process serving this directory's socket: a stale pid file
    /// never kills another process), then removes the directory.
    pub async fn remove(&self, link: &Arc<HostLink>) -> Result<(), SshError> {
        self.stop_jobs(link).await;
        let session = link.session().await?;
        let dir = quote(&self.dir);
        let pid = quote(&format!("{}/agent.pid", self.state_dir()));
        let socket = quote(&self.socket());
        let command = format!(
            "pid=$(cat {pid} 2>/dev/null); \
             if [ -n \"$pid\" ] && grep -qaF -- {socket} /proc/\"$pid\"/cmdline 2>/dev/null; then \
               kill \"$pid\"; i=0; \
               while kill -0 \"$pid\" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done; \
               grep -qaF -- {socket} /proc/\"$pid\"/cmdline 2>/dev/null && kill -9 \"$pid\"; \
             fi; rm -rf {dir}"
        );
        session.run(&command, None).await.map(drop)
    }

    /// Stops the agent's unfinished jobs and waits (a bounded time) until they ended. An
    /// agent that does not answer has nothing to stop: removing its directory makes it abort
    /// its jobs and exit (it checks every 2 s).
    async fn stop_jobs(&self, link: &Arc<HostLink>) {
        let Ok(client) = self.client(link.clone()).await else {
            return;
        };
        let Ok(jobs) = client.jobs().await else {
            return;
        };
        let stop = StopRequest {
            abort: false,
            grace_secs: STOP_GRACE_SECS,
            reason: "terminated_by_user".to_string(),
        };
        for job in jobs.iter().filter(|j| !j.status.is_finished()) {
            let _ = client.stop(&job.id, &stop).await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(STOP_GRACE_SECS + 10);
        while tokio::time::Instant::now() < deadline {
            match client.jobs().await {
                Ok(jobs) if jobs.iter().any(|j| !j.status.is_finished()) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                _ => return,
            }
        }
    }

    /// The sockets of the other agents running on the host (of any user, any state
    /// directory), found by their command lines.
    pub async fn others(&self, session: &SshSession) -> Result<Vec<String>, SshError> {
        let out = session.run(OTHER_AGENTS, None).await?;
        Ok(other_agents(&out.text(), &self.socket()))
    }

    /// Stops the running agent of another build (`health`) if it runs no job (its jobs would
    /// be lost), and waits until it has exited.
    async fn retire(
        &self,
        session: &SshSession,
        link: &Arc<HostLink>,
        health: &Healthcheck,
    ) -> Result<(), SshError> {
        // An agent older than the token has none and needs none.
        let old = match self.client(link.clone()).await {
            Ok(client) => client,
            Err(_) => AgentClient::dial(self.dialer(link.clone())),
        };
        let failed = |message: String| SshError::Session {
            target: session.target().to_string(),
            message,
        };
        let jobs = old
            .jobs()
            .await
            .map_err(|e| failed(format!("cannot list the old agent's jobs: {e}")))?;
        let busy = jobs.iter().filter(|j| !j.status.is_finished()).count();
        let pid = health.pid;
        if busy > 0 {
            return Err(failed(format!(
                "the agent (pid {pid}) is another build than the one installed and still runs \
                 {busy} job(s): it is replaced once they end"
            )));
        }
        let command = format!(
            "kill {pid} 2>/dev/null; i=0; while kill -0 {pid} 2>/dev/null && [ $i -lt 200 ]; \
             do sleep 0.05; i=$((i+1)); done; ! kill -0 {pid} 2>/dev/null"
        );
        session.run(&command, None).await.map(drop)
    }

    /// A client of this agent over the host's (pooled, reconnecting) SSH connection, holding
    /// the agent's token (read from the host).
    pub async fn client(&self, link: Arc<HostLink>) -> Result<AgentClient, SshError> {
        let session = link.session().await?;
        let path = format!("{}/{}", self.state_dir(), dstack_core::agent::TOKEN_FILE);
        let token = session.run(&format!("cat {}", quote(&path)), None).await?;
        Ok(AgentClient::dial(self.dialer(link)).with_token(&token.text()))
    }

    fn dialer(&self, link: Arc<HostLink>) -> Arc<SshDialer> {
        Arc::new(SshDialer {
            link,
            socket: self.socket(),
        })
    }
}

/// Prints the command line of every `dstack-agent serve` process on the host, one per line
/// (arguments separated by spaces).
const OTHER_AGENTS: &str = r#"for f in /proc/[0-9]*/cmdline; do
  c=$(tr '\0' ' ' < "$f" 2>/dev/null) || continue
  case "$c" in *dstack-agent\ serve\ *) printf '%s\n' "$c" ;; esac
done; true"#;

/// The sockets of the agents in `listing` (see [`OTHER_AGENTS`]) other than `ours`.
fn other_agents(listing: &str, ours: &str) -> Vec<String> {
    let mut sockets: Vec<String> = listing
        .lines()
        .filter_map(|line| {
            let mut words = line.split(' ');
            words.find(|w| *w == "--socket")?;
            words.next().map(str::to_string)
        })
        .filter(|socket| socket != ours)
        .collect();
    sockets.sort();
    sockets.dedup();
    sockets
}

/// Opens a channel to the agent's socket for each request, reconnecting to the host first if
/// its connection dropped.
struct SshDialer {
    link: Arc<HostLink>,
    socket: String,
}

impl AgentDialer for SshDialer {
    fn dial(&self) -> BoxFuture<'_, std::io::Result<Box<dyn AgentStream>>> {
        Box::pin(async move {
            let session = self.link.session().await.map_err(std::io::Error::other)?;
            session.dial(&self.socket).await
        })
    }

    fn target(&self) -> String {
        format!("{}:{}", self.link.target(), self.socket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_directories_are_unique_per_instance() {
        let a =
            RemoteAgent::of_instance("/home/u", "gpu-0", "0f8e4b2a-1c3d-4e5f-8a9b-0c1d2e3f4a5b");
        let b =
            RemoteAgent::of_instance("/home/u", "gpu-0", "7a6b5c4d-1c3d-4e5f-8a9b-0c1d2e3f4a5b");
        assert_eq!(a.dir, "/home/u/.dstack-rs/gpu-0-0f8e4b2a1c3d");
        assert_ne!(a.dir, b.dir);
    }

    #[test]
    fn other_agents_are_told_apart_from_ours() {
        let listing = "/h/.dstack-rs/a-1/dstack-agent serve --socket /h/.dstack-rs/a-1/agent.sock --state-dir /h/.dstack-rs/a-1/agent --new-session \n\
                       /opt/x/dstack-agent serve --socket /run/other.sock --state-dir /x \n\
                       /opt/x/dstack-agent serve --socket /run/other.sock --state-dir /x \n";
        assert_eq!(
            other_agents(listing, "/h/.dstack-rs/a-1/agent.sock"),
            vec!["/run/other.sock".to_string()]
        );
        assert!(other_agents("", "/s").is_empty());
    }
}
