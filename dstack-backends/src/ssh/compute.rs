//! The `ssh` backend: hosts listed in a fleet's `ssh_config`. It never creates or destroys
//! machines: `deploy` installs and starts the agent on a host, `connect` reaches that agent
//! through an SSH channel (one pooled connection per host), and `terminate_instance` stops
//! the agent and removes what was installed.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use dstack_core::agent::{AgentClient, AgentStream};
use dstack_core::backend::{
    BoxFuture, Compute, ComputeError, CreatedInstance, Deployed, InstanceConfig,
};
use dstack_core::model::{HostSession, Instance};
use dstack_core::offers::Offer;
use serde::{Deserialize, Serialize};

use super::deploy::{AgentLease, RemoteAgent};
use super::known_hosts::KnownHosts;
use super::link::HostLink;
use super::session::{Keepalive, SshError, SshSession, SshTarget};

/// What an SSH instance records as its `backend_data`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SshInstanceData {
    /// How to reach the host.
    #[serde(flatten)]
    pub target: SshTarget,
    /// The host's address on the fleet's private network, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_ip: Option<String>,
    /// The agent's directory on the host, once deployed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    /// The host's `blocks:` as configured (kept for the engine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks: Option<serde_json::Value>,
    /// The fleet's `env`, which the agent gets too.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

/// SSH hosts as a backend.
pub struct SshCompute {
    known_hosts: KnownHosts,
    agent_bin: PathBuf,
    keepalive: Keepalive,
    links: Mutex<HashMap<String, Arc<HostLink>>>,
    /// The build stamp of `agent_bin`, once read.
    build: std::sync::OnceLock<Option<String>>,
}

impl SshCompute {
    /// A backend recording host keys in `known_hosts` and installing `agent_bin` on hosts.
    pub fn new(known_hosts: KnownHosts, agent_bin: PathBuf) -> Self {
        SshCompute {
            known_hosts,
            agent_bin,
            keepalive: Keepalive::default(),
            links: Mutex::new(HashMap::new()),
            build: std::sync::OnceLock::new(),
        }
    }

    /// The build stamp of the agent this backend installs (`None` if it cannot be read).
    pub fn agent_build(&self) -> Option<String> {
        self.build
            .get_or_init(|| {
                std::fs::File::open(&self.agent_bin)
                    .and_then(dstack_core::agent::build_stamp)
                    .ok()
            })
            .clone()
    }

    /// Notices dead connections with this keepalive (default: every 5 s, 3 missed).
    pub fn with_keepalive(mut self, keepalive: Keepalive) -> Self {
        self.keepalive = keepalive;
        self
    }

    fn data(instance: &Instance) -> Result<SshInstanceData, ComputeError> {
        serde_json::from_value(instance.backend_data.clone()).map_err(|e| {
            ComputeError::Other(format!(
                "instance {}: bad SSH host data: {e}",
                instance.name
            ))
        })
    }

    /// Whether `target` answers SSH yet, with the host key on record and a login: `false`
    /// while its port refuses or drops connections (a cloud instance still booting); a host
    /// presenting another key than the one pinned for it is an error (a new instance's key
    /// was given to it at creation, so another key is never its own).
    pub async fn answers(&self, target: &SshTarget) -> Result<bool, ComputeError> {
        match SshSession::connect(target, &self.known_hosts, self.keepalive).await {
            Ok(_) => Ok(true),
            Err(SshError::Connect { .. }) => Ok(false),
            Err(SshError::HostKeyChanged { presented, .. }) => Err(ComputeError::Other(format!(
                "{target} answers with host key {presented}, not the one it was given at \
                 creation: refusing it"
            ))),
            Err(e) => Err(to_compute(e)),
        }
    }

    /// The pooled link to a host (one per user@host:port).
    fn link(&self, target: &SshTarget) -> Arc<HostLink> {
        let mut links = self.links.lock().unwrap_or_else(PoisonError::into_inner);
        links
            .entry(format!("{target}"))
            .or_insert_with(|| {
                Arc::new(HostLink::new(
                    target.clone(),
                    self.known_hosts.clone(),
                    self.keepalive,
                ))
            })
            .clone()
    }

    /// Installs and starts the agent on the instance's host, holding `lease` if given (agents
    /// on cloud instances: an SSH fleet host is the user's own machine and gets none).
    pub async fn deploy_with(
        &self,
        instance: &Instance,
        lease: Option<&AgentLease>,
    ) -> Result<Deployed, ComputeError> {
        let mut data = Self::data(instance)?;
        let link = self.link(&data.target);
        link.reset().await; // deploying checks the host afresh
        let session = link.session().await.map_err(to_compute)?;
        let arch = session
            .run("uname -m", None)
            .await
            .map_err(to_compute)?
            .text();
        let ours = std::env::consts::ARCH;
        if normalize_arch(&arch) != normalize_arch(ours) {
            return Err(ComputeError::NotSupported(format!(
                "{}: the host is {arch}; this dstack-agent is built for {ours}",
                data.target
            )));
        }
        let login = session
            .run(SESSION_PROBE, None)
            .await
            .map_err(to_compute)?
            .text();
        let session_info = parse_session(&login);
        let agent = RemoteAgent::of_instance(&session_info.home, &instance.name, &instance.id);
        agent
            .install(&session, &self.agent_bin)
            .await
            .map_err(to_compute)?;
        let health = agent
            .start(&link, &data.env, lease)
            .await
            .map_err(to_compute)?;
        // Another agent on a host with GPUs would hand the same GPUs to its jobs: refused.
        // Without GPUs the host is shared, and said so (each counts CPU and memory apart).
        let others = agent.others(&session).await.map_err(to_compute)?;
        let note = (!others.is_empty()).then(|| {
            format!(
                "another dstack-agent runs on this host ({}), deployed by another fleet or \
                 state directory",
                others.join(", ")
            )
        });
        if let Some(note) = note.as_ref().filter(|_| !health.host.gpus.is_empty()) {
            agent.remove(&link).await.map_err(to_compute)?;
            return Err(ComputeError::NotSupported(format!(
                "{}: {note}; both would hand out the same GPUs. Delete that fleet first",
                data.target
            )));
        }
        let note = note.map(|n| format!("{n}: CPU and memory are shared, each counts its own"));
        data.dir = Some(agent.dir.clone());
        let backend_data = serde_json::to_value(&data)
            .map_err(|e| ComputeError::Other(format!("cannot record the host: {e}")))?;
        Ok(Deployed {
            host: health.host,
            backend_data,
            session: session_info,
            containers: health.containers.is_some(),
            note,
        })
    }

    fn remote_agent(
        instance: &Instance,
        data: &SshInstanceData,
    ) -> Result<RemoteAgent, ComputeError> {
        let dir = data.dir.clone().ok_or_else(|| {
            ComputeError::NotFound(format!("instance {} has no agent deployed", instance.name))
        })?;
        Ok(RemoteAgent { dir })
    }
}

/// Marks the start of what [`SESSION_PROBE`] prints (a login shell may print a banner first).
const SESSION_BEGIN: &str = "--dstack-session-begin--";
/// Marks its end (and whatever a shell prints on exit comes after).
const SESSION_END: &str = "--dstack-session-end--";

/// Prints the login session jobs get on the host between [`SESSION_BEGIN`] and
/// [`SESSION_END`]: home, then `NAME=value` lines.
const SESSION_PROBE: &str = r#"printf '%s\n' --dstack-session-begin-- "$HOME"
for v in HOME PATH USER LOGNAME SHELL LANG; do
  eval "x=\${$v-}"
  [ -n "$x" ] && printf '%s=%s\n' "$v" "$x"
done
[ -n "${USER-}" ] || printf 'USER=%s\n' "$(id -un)"
printf '%s\n' --dstack-session-end--"#;

/// The session in what [`SESSION_PROBE`] printed, ignoring anything around its markers.
fn parse_session(text: &str) -> HostSession {
    let mut lines = text
        .lines()
        .skip_while(|l| l.trim_end() != SESSION_BEGIN)
        .skip(1)
        .take_while(|l| l.trim_end() != SESSION_END);
    let home = lines.next().unwrap_or("/").to_string();
    let env = lines
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    HostSession { home, env }
}

fn normalize_arch(arch: &str) -> &str {
    match arch {
        "x86_64" | "amd64" => "x86_64",
        "aarch64" | "arm64" => "aarch64",
        other => other,
    }
}

/// SSH failures as backend error kinds.
fn to_compute(e: SshError) -> ComputeError {
    match e {
        SshError::Auth { .. } | SshError::Key { .. } => {
            ComputeError::Unauthenticated(e.to_string())
        }
        other => ComputeError::Other(other.to_string()),
    }
}

impl Compute for SshCompute {
    fn backend(&self) -> &'static str {
        "ssh"
    }

    fn supports_containers(&self) -> bool {
        false
    }

    fn offers(&self) -> BoxFuture<'_, Result<Vec<Offer>, ComputeError>> {
        // SSH hosts are listed in fleets, never provisioned from offers.
        Box::pin(async { Ok(Vec::new()) })
    }

    fn create_instance<'a>(
        &'a self,
        _offer: &'a Offer,
        _config: &'a InstanceConfig,
    ) -> BoxFuture<'a, Result<CreatedInstance, ComputeError>> {
        Box::pin(async {
            Err(ComputeError::NotSupported(
                "SSH hosts are added by applying a fleet with `ssh_config`".to_string(),
            ))
        })
    }

    fn deploy<'a>(
        &'a self,
        instance: &'a Instance,
    ) -> BoxFuture<'a, Result<Deployed, ComputeError>> {
        Box::pin(self.deploy_with(instance, None))
    }

    fn agent_build(&self) -> Option<String> {
        SshCompute::agent_build(self)
    }

    fn dial_port<'a>(
        &'a self,
        instance: &'a Instance,
        port: u16,
    ) -> BoxFuture<'a, std::io::Result<Box<dyn AgentStream>>> {
        Box::pin(async move {
            let data = Self::data(instance).map_err(std::io::Error::other)?;
            let session = self
                .link(&data.target)
                .session()
                .await
                .map_err(std::io::Error::other)?;
            session.dial_tcp(port).await
        })
    }

    fn connect<'a>(
        &'a self,
        instance: &'a Instance,
    ) -> BoxFuture<'a, Result<AgentClient, ComputeError>> {
        Box::pin(async move {
            let data = Self::data(instance)?;
            let agent = Self::remote_agent(instance, &data)?;
            agent
                .client(self.link(&data.target))
                .await
                .map_err(to_compute)
        })
    }

    fn terminate_instance<'a>(
        &'a self,
        instance: &'a Instance,
    ) -> BoxFuture<'a, Result<(), ComputeError>> {
        Box::pin(async move {
            // A record without host data (or agent directory) had nothing installed.
            let Ok(data) = Self::data(instance) else {
                return Ok(());
            };
            let Ok(agent) = Self::remote_agent(instance, &data) else {
                return Ok(());
            };
            let link = self.link(&data.target);
            agent.remove(&link).await.map_err(to_compute)?;
            link.reset().await;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_banner_is_not_taken_for_the_session() {
        let printed = "Welcome to host!\nLAST=login\n--dstack-session-begin--\n/home/u\n\
                       PATH=/usr/bin\nUSER=u\n--dstack-session-end--\nbye=now\n";
        let session = parse_session(printed);
        assert_eq!(session.home, "/home/u");
        assert_eq!(
            session.env.into_iter().collect::<Vec<_>>(),
            vec![
                ("PATH".to_string(), "/usr/bin".to_string()),
                ("USER".to_string(), "u".to_string())
            ]
        );
    }
}
