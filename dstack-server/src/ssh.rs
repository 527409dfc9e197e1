//! `ssh <run>` on the server's side: the `runs/ssh` tunnel a `ProxyCommand` opens to a job's
//! SSH endpoint (served by its agent), and the SSH entries of running jobs, kept current in
//! `$DSTACK_HOME/ssh/config` with their agents' host keys pinned in
//! `ssh/known_hosts_runs` (both 0600) while the server runs; the same loop enforces dev
//! environments' `inactivity_duration` ([`crate::inactivity`]).
//!
//! Host names: `<run>` is job 0 of replica 0; every job is also `<run>-<job_num>-<replica_num>`
//! (its name, as `dstack ps` shows it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dstack_core::agent::{SshEndpoint, SshRequest};
use dstack_core::client::home;
use dstack_core::client::protocol::{RunRef, SshTunnelRequest};
use dstack_core::engine::{Engine, EngineError};
use dstack_core::model::{Job, JobStatus, RunStatus};
use dstack_core::Client;
use hyper::body::Incoming;
use hyper::{Request, Response};

use crate::errors::ApiError;
use crate::Shared;

/// How often the entries are checked even without a change (changes of other processes,
/// endpoints that could not be read), and dev environments for inactivity.
const RECHECK: Duration = Duration::from_secs(5);

/// How long changes are gathered before the entries are written.
const GATHER: Duration = Duration::from_millis(20);

/// `runs/ssh`: upgrades the connection to an SSH connection to the job's agent, which
/// accepts the project's key.
pub(crate) async fn tunnel(
    shared: &Shared,
    req: Request<Incoming>,
) -> Result<Response<dstack_core::http::serve::Body>, ApiError> {
    let (parts, request) = crate::routes::upgrade_request::<SshTunnelRequest>(req).await?;
    let (job, agent) = job_agent(shared, &request).await?;
    let ssh = SshRequest {
        authorized_keys: authorized_keys(shared),
    };
    let outbound = agent.ssh(&job.id, &ssh).await.map_err(|e| {
        ApiError::bad_request(format!(
            "cannot reach the SSH endpoint of {}: {e}",
            job.name()
        ))
    })?;
    Ok(crate::routes::splice(parts, outbound))
}

/// `runs/ssh_endpoint`: what the job's agent says of its SSH endpoint (host key, user,
/// working directory).
pub(crate) async fn endpoint(
    shared: &Shared,
    request: &SshTunnelRequest,
) -> Result<SshEndpoint, ApiError> {
    let (job, agent) = job_agent(shared, request).await?;
    Ok(agent
        .ssh_endpoint(&job.id)
        .await
        .map_err(EngineError::from)?)
}

/// The running job a request names, and a client of its agent.
async fn job_agent(
    shared: &Shared,
    request: &SshTunnelRequest,
) -> Result<(Job, dstack_core::agent::AgentClient), ApiError> {
    let which = RunRef {
        run_name: Some(request.run_name.clone()),
        id: None,
    };
    let snapshot = crate::routes::run_handle(shared, &which)
        .await?
        .snapshot()
        .await?;
    let job = running_job(&snapshot.jobs, request.job_num, request.replica_num)
        .cloned()
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "job {} of replica {} of run {} is not running",
                request.job_num, request.replica_num, request.run_name
            ))
        })?;
    let instance = job.instance_id.as_deref().unwrap_or_default();
    let agent = crate::routes::engine(shared)?.agent(instance).await?;
    Ok((job, agent))
}

/// The keys a session accepts: the project's, and the users' own (`ssh/authorized_keys`,
/// read anew for each connection).
fn authorized_keys(shared: &Shared) -> Vec<String> {
    let users = std::fs::read_to_string(home::ssh_user_keys_file(&shared.home)).unwrap_or_default();
    let mut keys = vec![shared.project_key.clone()];
    keys.extend(
        users
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string),
    );
    keys
}

/// The latest running submission of job `job_num` of replica `replica_num`.
fn running_job(jobs: &[Job], job_num: u32, replica_num: u32) -> Option<&Job> {
    jobs.iter()
        .filter(|j| j.job_num == job_num && j.replica_num == replica_num)
        .filter(|j| j.status == JobStatus::Running && j.instance_id.is_some())
        .max_by_key(|j| j.submission_num)
}

/// Why the SSH entries cannot be written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EntriesError {
    /// A path cannot be written into an SSH configuration.
    #[error("{0} cannot be written in an SSH configuration (it contains a quote or a control character)")]
    Unquotable(String),
}

/// What the entries of one home are made of.
#[derive(Clone, Debug)]
pub(crate) struct Entries {
    /// `$DSTACK_HOME`.
    pub home: PathBuf,
    /// The `dstack` program `ProxyCommand` runs.
    pub cli: PathBuf,
}

/// One job's entry.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    run_name: String,
    job_num: u32,
    replica_num: u32,
    endpoint: SshEndpoint,
}

impl Entry {
    /// The host names of the entry.
    fn names(&self) -> Vec<String> {
        let mut names = Vec::new();
        if self.job_num == 0 && self.replica_num == 0 {
            names.push(self.run_name.clone());
        }
        names.push(format!(
            "{}-{}-{}",
            self.run_name, self.job_num, self.replica_num
        ));
        names
    }
}

impl Entries {
    /// Writes `ssh/config` and `ssh/known_hosts_runs` for `entries`, unless they are what
    /// was `last` written.
    fn write(
        &self,
        entries: &[Entry],
        last: &mut Option<(String, String)>,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let texts = self.render(entries)?;
        if last.as_ref() == Some(&texts) {
            return Ok(());
        }
        let (config, known_hosts) = texts.clone();
        let dir = self.home.join("ssh");
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(&dir)?;
        for (path, text) in [
            (home::ssh_known_hosts_file(&self.home), known_hosts),
            (home::ssh_config_file(&self.home), config),
        ] {
            dstack_core::files::replace_private(&path, text.as_bytes())?;
        }
        *last = Some(texts);
        Ok(())
    }

    /// The texts of `ssh/config` and `ssh/known_hosts_runs`.
    fn render(&self, entries: &[Entry]) -> Result<(String, String), EntriesError> {
        let key = config_value(&home::project_key_file(&self.home))?;
        let known = config_value(&home::ssh_known_hosts_file(&self.home))?;
        let proxy = format!(
            "{} ssh-proxy --home {}",
            shell_word(&self.cli)?,
            shell_word(&self.home)?
        );
        let mut config = String::from(
            "# Written by dstack while runs run (`ssh <run>`); rewritten as they start and end.\n",
        );
        let mut known_hosts = String::new();
        for entry in entries {
            let names = entry.names();
            let alias = names.last().cloned().unwrap_or_default();
            config.push_str(&format!(
                "\nHost {names}\n    User {user}\n    ProxyCommand {proxy} {run} --job {job} --replica {replica}\n    \
                 IdentityFile {key}\n    IdentitiesOnly yes\n    HostKeyAlias dstack-{alias}\n    \
                 UserKnownHostsFile {known}\n    StrictHostKeyChecking yes\n    \
                 CheckHostIP no\n    ServerAliveInterval 30\n",
                names = names.join(" "),
                user = config_word(&entry.endpoint.user)?,
                run = entry.run_name,
                job = entry.job_num,
                replica = entry.replica_num,
            ));
            known_hosts.push_str(&format!(
                "dstack-{alias} {}\n",
                entry.endpoint.host_key.trim()
            ));
        }
        Ok((config, known_hosts))
    }
}

/// A path as one quoted SSH configuration value (`%` is a token there: doubled).
fn config_value(path: &Path) -> Result<String, EntriesError> {
    let text = path.display().to_string();
    if text.contains('"') || text.chars().any(char::is_control) {
        return Err(EntriesError::Unquotable(text));
    }
    Ok(format!("\"{}\"", text.replace('%', "%%")))
}

/// A user name as an SSH configuration value (`%` doubled; quoted if it has blanks).
fn config_word(word: &str) -> Result<String, EntriesError> {
    if word.contains('"') || word.chars().any(char::is_control) {
        return Err(EntriesError::Unquotable(word.to_string()));
    }
    let word = word.replace('%', "%%");
    Ok(if word.contains(char::is_whitespace) || word.is_empty() {
        format!("\"{word}\"")
    } else {
        word
    })
}

/// A path as one word of the shell command `ProxyCommand` runs: single-quoted (a `'`
/// inside written `'\''`), `%` doubled (a token of `ProxyCommand`).
fn shell_word(path: &Path) -> Result<String, EntriesError> {
    let text = path.display().to_string();
    if text.chars().any(char::is_control) {
        return Err(EntriesError::Unquotable(text));
    }
    Ok(format!(
        "'{}'",
        text.replace('\'', "'\\''").replace('%', "%%")
    ))
}

/// Keeps the entries of `engine`'s running jobs written while the server runs (and writes
/// none when it stops: the jobs may outlive it, and the next server takes over).
pub(crate) fn keep(client: Client, entries: Entries) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Some(engine) = client.engine().cloned() else {
            return;
        };
        let mut changes = engine.subscribe();
        let mut endpoints: HashMap<String, SshEndpoint> = HashMap::new();
        let mut last = None;
        let mut reported = std::collections::HashSet::new();
        loop {
            let complete = match current(&client, &engine, &mut endpoints, &mut reported).await {
                Ok((list, complete)) => {
                    if let Err(e) = entries.write(&list, &mut last) {
                        eprintln!("dstack server: cannot write the SSH entries of runs: {e}");
                    }
                    complete
                }
                Err(e) => {
                    eprintln!("dstack server: cannot list the runs for their SSH entries: {e}");
                    false
                }
            };
            if let Err(e) = crate::inactivity::enforce(&client, &engine).await {
                eprintln!("dstack server: cannot check dev environments for inactivity: {e}");
            }
            let wait = if complete {
                RECHECK
            } else {
                Duration::from_secs(1)
            };
            tokio::select! {
                change = changes.recv() => {
                    if matches!(change, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                        return;
                    }
                    tokio::time::sleep(GATHER).await;
                    while changes.try_recv().is_ok() {}
                }
                () = tokio::time::sleep(wait) => {}
            }
        }
    })
}

/// The entries of the running jobs, and whether every endpoint could be read; `endpoints`
/// caches them by job id, and `reported` holds the jobs whose missing entry was logged (once
/// each).
async fn current(
    client: &Client,
    engine: &Engine,
    endpoints: &mut HashMap<String, SshEndpoint>,
    reported: &mut std::collections::HashSet<String>,
) -> Result<(Vec<Entry>, bool), dstack_core::engine::EngineError> {
    let runs = client.runs();
    // Only runs with a running job can have entries: not every unfinished run is read.
    let running = engine.store().running_runs()?;
    let ids: Vec<String> = running
        .iter()
        .filter(|r| r.status == RunStatus::Running)
        .map(|r| r.id.clone())
        .collect();
    let mut entries = Vec::new();
    let mut complete = true;
    let mut live = std::collections::HashSet::new();
    for snapshot in runs.snapshots(&ids).await? {
        let mut jobs: Vec<&Job> = snapshot
            .jobs
            .iter()
            .filter(|j| running_job(&snapshot.jobs, j.job_num, j.replica_num) == Some(j))
            .collect();
        jobs.sort_by_key(|j| (j.replica_num, j.job_num));
        for job in jobs {
            live.insert(job.id.clone());
            let endpoint = match endpoints.get(&job.id) {
                Some(endpoint) => endpoint.clone(),
                None => {
                    let instance = job.instance_id.as_deref().unwrap_or_default();
                    let found = match engine.agent(instance).await {
                        Ok(agent) => agent.ssh_endpoint(&job.id).await.map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    let endpoint = match found {
                        Ok(endpoint) => endpoint,
                        Err(e) => {
                            if reported.insert(job.id.clone()) {
                                eprintln!(
                                    "dstack server: no SSH entry for {} yet: {e}",
                                    job.name()
                                );
                            }
                            complete = false;
                            continue;
                        }
                    };
                    endpoints.insert(job.id.clone(), endpoint.clone());
                    endpoint
                }
            };
            entries.push(Entry {
                run_name: snapshot.run.name.clone(),
                job_num: job.job_num,
                replica_num: job.replica_num,
                endpoint,
            });
        }
    }
    endpoints.retain(|id, _| live.contains(id));
    reported.retain(|id| live.contains(id));
    Ok((entries, complete))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(run: &str, job_num: u32) -> Entry {
        Entry {
            run_name: run.to_string(),
            job_num,
            replica_num: 0,
            endpoint: SshEndpoint {
                host_key: "ssh-ed25519 AAAAkey".to_string(),
                user: "me".to_string(),
                working_dir: "/w".to_string(),
                no_connections_secs: 0,
            },
        }
    }

    #[test]
    fn entries_quote_what_reaches_a_shell_and_pin_keys() {
        let entries = Entries {
            home: PathBuf::from("/h/it's 100%"),
            cli: PathBuf::from("/bin/dstack"),
        };
        let (config, known) = entries.render(&[entry("dev", 0), entry("dev", 1)]).unwrap();
        assert!(config.contains("\nHost dev dev-0-0\n"), "{config}");
        assert!(config.contains("\nHost dev-1-0\n"), "{config}");
        assert!(config.contains(
            "ProxyCommand '/bin/dstack' ssh-proxy --home '/h/it'\\''s 100%%' dev --job 1 --replica 0"
        ), "{config}");
        assert!(
            config.contains("IdentityFile \"/h/it's 100%%/ssh/project_key\""),
            "{config}"
        );
        assert!(config.contains("StrictHostKeyChecking yes"), "{config}");
        assert_eq!(
            known,
            "dstack-dev-0-0 ssh-ed25519 AAAAkey\ndstack-dev-1-0 ssh-ed25519 AAAAkey\n"
        );
        let quoted = Entries {
            home: PathBuf::from("/h/\"x"),
            cli: PathBuf::from("/bin/dstack"),
        };
        assert!(quoted.render(&[entry("dev", 0)]).is_err());
    }
}
