//! Installing, starting and removing the agent on an SSH host. Everything lives in one
//! directory of the login user (`~/.dstack-rs/<instance>`): the agent binary, its socket and
//! its state. The agent runs detached (its own session), so it outlives the SSH connection.

use std::path::Path;

use dstack_core::agent::{build_stamp, AgentClient, AgentDialer, AgentStream, Healthcheck};
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

impl RemoteAgent {
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

    /// Starts the agent (with `env`) if it does not answer; returns its healthcheck. An agent
    /// of another build than the one installed (see [`Self::install`]) that runs no job is
    /// stopped and replaced; one still running jobs is an error.
    pub async fn start(
        &self,
        link: &Arc<HostLink>,
        env: &std::collections::BTreeMap<String, String>,
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
        // The fleet's env reaches the agent too (e.g. DOCKER_HOST for its container engine).
        let env: Vec<String> = env
            .iter()
            .map(|(k, v)| quote(&format!("{k}={v}")))
            .collect();
        let command = format!(
            "env {} {} serve --detach --socket {} --state-dir {}",
            env.join(" "),
            quote(&self.binary()),
            quote(&self.socket()),
            quote(&self.state_dir())
        );
        session.run(&command, None).await?;
        probe.healthcheck().await.map_err(|e| SshError::Session {
            target: session.target().to_string(),
            message: format!("the agent started but does not answer: {e}"),
        })
    }

    /// Stops the agent (its jobs end with it) and removes the directory.
    pub async fn remove(&self, session: &SshSession) -> Result<(), SshError> {
        let dir = quote(&self.dir);
        let pid = quote(&format!("{}/agent.pid", self.state_dir()));
        let command =
            format!("if [ -f {pid} ]; then kill -9 \"$(cat {pid})\" 2>/dev/null; fi; rm -rf {dir}");
        session.run(&command, None).await.map(drop)
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
