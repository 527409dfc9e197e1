//! What a job runs: the argv, environment and working directory built from a configuration,
//! as dstack's job configurators and runner do, for jobs that run as host processes.

use std::collections::BTreeMap;
use std::path::Path;

use super::credentials::resolve;
use super::Definition;
use crate::agent::{ContainerSpec, JobSubmit};
use crate::config::env::EnvValue;
use crate::config::run::RunCommon;
use crate::config::Configuration;
use crate::model::{HostSession, Instance, Job};

/// A job that cannot be built (e.g. a bare `env` name the client did not have).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CommandError(pub String);

/// The image of `docker: true` runs (Docker-in-Docker), as dstack's.
pub const DIND_IMAGE: &str = "dstackai/dind";

/// The command that starts the Docker daemon inside [`DIND_IMAGE`], run before the commands
/// of `docker: true` runs.
const DIND_PROLOGUE: &str = "start-dockerd";

/// The shell that runs `commands`: the configured one, else bash when present, else sh.
fn shell(common: &RunCommon) -> String {
    match common.shell.as_deref() {
        Some("sh") => "/bin/sh".to_string(),
        Some("bash") => "/bin/bash".to_string(),
        Some(path) => path.to_string(),
        None if Path::new("/bin/bash").exists() => "/bin/bash".to_string(),
        None => "/bin/sh".to_string(),
    }
}

/// Joins commands with ` && `, wrapping a command that ends in `&` in braces, as dstack does.
pub fn join_commands(commands: &[String]) -> String {
    commands
        .iter()
        .map(|c| c.trim())
        .filter(|c| !c.is_empty())
        .map(|c| {
            if c.ends_with('&') {
                format!("{{ {c} }}")
            } else {
                c.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" && ")
}

/// Splits a command line the way a POSIX shell would tokenize words (quotes and backslashes,
/// no expansion).
pub fn shell_split(s: &str) -> Result<Vec<String>, CommandError> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(ch) => word.push(ch),
                        None => return Err(CommandError(format!("unclosed ' in `{s}`"))),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(ch @ ('"' | '\\' | '$' | '`')) => word.push(ch),
                            Some(ch) => {
                                word.push('\\');
                                word.push(ch);
                            }
                            None => return Err(CommandError(format!("unclosed \" in `{s}`"))),
                        },
                        Some(ch) => word.push(ch),
                        None => return Err(CommandError(format!("unclosed \" in `{s}`"))),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(ch) = chars.next() {
                    word.push(ch);
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// The commands and shell settings of a run configuration; for a job run as a host process,
/// first the words that check its `user` (see [`super::host_user`]) and choose its `python`
/// (see [`super::python`]).
fn script(config: &Configuration) -> (&RunCommon, Vec<String>) {
    let (common, commands) = commands(config);
    let user = common
        .user
        .as_deref()
        .filter(|_| !common.in_container())
        .map(super::host_user::check);
    let python = common.python.map(|v| super::python::prologue(v.as_str()));
    let prologue = user.into_iter().chain(python);
    (common, prologue.chain(commands).collect())
}

/// The commands of a run configuration as configured.
fn commands(config: &Configuration) -> (&RunCommon, Vec<String>) {
    match config {
        Configuration::Task(t) => (
            &t.common,
            [t.common.setup.clone(), t.commands.clone()].concat(),
        ),
        Configuration::Service(s) => (
            &s.common,
            [s.common.setup.clone(), s.commands.clone()].concat(),
        ),
        Configuration::DevEnvironment(d) => {
            let keep_alive = vec!["tail -f /dev/null".to_string()];
            (
                &d.common,
                [d.common.setup.clone(), d.init.clone(), keep_alive].concat(),
            )
        }
        _ => unreachable!("only run configurations have jobs"),
    }
}

/// The argv of a job: `entrypoint` + commands, or the shell running the joined commands.
pub fn argv(config: &Configuration) -> Result<Vec<String>, CommandError> {
    let (common, commands) = script(config);
    if let Some(entrypoint) = &common.entrypoint {
        let mut argv = shell_split(entrypoint)?;
        argv.extend(commands);
        if argv.is_empty() {
            return Err(CommandError("`entrypoint` is empty".to_string()));
        }
        return Ok(argv);
    }
    Ok(vec![
        shell(common),
        "-c".to_string(),
        join_commands(&commands),
    ])
}

/// What a container job runs: with `entrypoint`, the entrypoint is replaced and the commands
/// are its arguments; with commands only, the configured shell (`/bin/sh` by default in custom
/// images, bash in dstack's own) runs them joined with `&&` (after `start-dockerd` with
/// `docker: true`); with neither, the image's own entrypoint and command.
fn container_argv(
    config: &Configuration,
) -> Result<(Option<Vec<String>>, Vec<String>), CommandError> {
    let (common, mut commands) = script(config);
    if let Some(entrypoint) = &common.entrypoint {
        return Ok((Some(shell_split(entrypoint)?), commands));
    }
    if commands.iter().all(|c| c.trim().is_empty()) {
        return Ok((None, Vec::new()));
    }
    let dind = common.image.is_none() && common.docker == Some(true);
    if dind {
        commands.insert(0, DIND_PROLOGUE.to_string());
    }
    let shell = match common.shell.as_deref() {
        Some("bash") => "/bin/bash".to_string(),
        Some("sh") => "/bin/sh".to_string(),
        None if dind => "/bin/bash".to_string(),
        None => "/bin/sh".to_string(),
        Some(path) => path.to_string(),
    };
    Ok((
        None,
        vec![shell, "-c".to_string(), join_commands(&commands)],
    ))
}

/// How the agent runs an `image:` or `docker: true` job (`None` for jobs run as host
/// processes), limited to the job's reservation. `docker: true` runs [`DIND_IMAGE`]
/// privileged, as dstack does.
fn container_spec(config: &Configuration, job: &Job) -> Option<ContainerSpec> {
    let common = common(config);
    let dind = common.docker == Some(true);
    let image = match &common.image {
        Some(image) => image.clone(),
        None if dind => DIND_IMAGE.to_string(),
        None => return None,
    };
    let mounts = common
        .volumes
        .iter()
        .filter_map(|m| match m {
            crate::config::mounts::MountPoint::Instance {
                instance_path,
                path,
                ..
            } => Some((instance_path.clone(), path.clone())),
            _ => None,
        })
        .collect();
    Some(ContainerSpec {
        image,
        entrypoint: None,
        user: common.user.clone(),
        privileged: common.privileged || dind,
        shm_size_bytes: common
            .resources
            .shm_size
            .map(|m| (m.0 * 1024.0 * 1024.0 * 1024.0) as u64),
        ports: ports(config).iter().map(|p| p.container_port).collect(),
        mounts,
        registry_auth: common
            .registry_auth
            .as_ref()
            .map(|a| (a.username.clone(), a.password.clone())),
        cpus: job.reservation.as_ref().map_or(0, |r| r.cpus),
        memory_mib: job.reservation.as_ref().map_or(0, |r| r.memory_mib),
        gpus: job
            .reservation
            .as_ref()
            .map(|r| r.gpus.clone())
            .unwrap_or_default(),
    })
}

/// The run-configuration fields shared by every type.
pub fn common(config: &Configuration) -> &RunCommon {
    config
        .run_common()
        .expect("only run configurations have jobs")
}

/// The run-configuration fields shared by every type, to change them (`None` for other
/// configurations).
pub(crate) fn common_mut(config: &mut Configuration) -> Option<&mut RunCommon> {
    match config {
        Configuration::Task(t) => Some(&mut t.common),
        Configuration::Service(s) => Some(&mut s.common),
        Configuration::DevEnvironment(d) => Some(&mut d.common),
        _ => None,
    }
}

/// Whether a run needs a container engine (`image:`, or `docker: true`).
pub fn needs_containers(common: &RunCommon) -> bool {
    common.in_container()
}

/// The ports a run's job listens on, as configured (`ports:`, or a service's `port:`).
pub fn ports(config: &Configuration) -> Vec<crate::config::ports::PortMapping> {
    match config {
        Configuration::Task(t) => t.ports.clone(),
        Configuration::DevEnvironment(d) => d.ports.clone(),
        Configuration::Service(s) => vec![s.port],
        _ => Vec::new(),
    }
}

/// The jobs of a run, as `(replica_num, job_num)`: one per node of a task (`nodes:`), one
/// per replica of a service (`replicas:`, its minimum when it is a range), one otherwise.
pub fn slots(config: &Configuration) -> Vec<(u32, u32)> {
    match config {
        Configuration::Service(s) => (0..super::scaling::initial_replicas(s))
            .map(|r| (r, 0))
            .collect(),
        _ => (0..nodes(config) as u32).map(|n| (0, n)).collect(),
    }
}

/// How many nodes a run has (`nodes:` of a task; 1 otherwise).
pub fn nodes(config: &Configuration) -> usize {
    match config {
        // The parser keeps `nodes` within 1..=limits::MAX_NODE_COUNT.
        Configuration::Task(t) => t
            .nodes
            .map_or(1, |n| usize::try_from(n).unwrap_or(1).max(1)),
        _ => 1,
    }
}

/// The working directory: the configured one (`~` expanded), relative ones resolved against
/// the default; by default the directory the run was applied from (this machine) or the
/// login user's home (a remote host).
fn working_dir(run: &Definition, common: &RunCommon, session: Option<&HostSession>) -> String {
    let (home, default) = match session {
        Some(s) => (s.home.clone(), s.home.clone()),
        None => (
            run.spec
                .client_env
                .get("HOME")
                .cloned()
                .unwrap_or_else(|| "/root".into()),
            run.spec.client_dir.clone(),
        ),
    };
    match &common.working_dir {
        Some(dir) if dir == "~" || dir.starts_with("~/") => format!("{home}{}", &dir[1..]),
        Some(dir) if dir.starts_with('/') => dir.clone(),
        Some(dir) => format!("{}/{dir}", default.trim_end_matches('/')),
        None => default,
    }
}

/// The repo given by URL, if any: cloned by the agent, with the credentials `dstack init`
/// registered for it among `secrets`.
fn repo_clone(
    common: &RunCommon,
    secrets: &BTreeMap<String, String>,
) -> Option<crate::archive::RepoClone> {
    let repo = common.repos.first()?;
    let url = repo.url.clone()?;
    Some(crate::archive::RepoClone {
        creds: crate::secrets::repo_creds(secrets, &url),
        url,
        branch: repo.branch.clone(),
        hash: repo.hash.clone(),
        single_branch: common.single_branch.unwrap_or(false),
        path: repo.path.clone(),
        if_exists: repo.if_exists.into(),
    })
}

/// The working directory of a container with a repo and none configured: dstack's.
const REPO_WORKING_DIR: &str = "/workflow";

/// Everything the agent needs to start `job`.
///
/// `nodes` holds the address of every node of the run in rank order (just this instance's
/// for a single-node run); `secrets` the values `${{ secrets.NAME }}` references resolve to
/// (see `credentials`).
pub(crate) fn job_submit(
    run: &Definition,
    job: &Job,
    instance: &Instance,
    nodes: &[String],
    secrets: &BTreeMap<String, String>,
) -> Result<JobSubmit, CommandError> {
    let config = &*run.config;
    let common = common(config);
    let session = instance.session.as_ref();
    let master = nodes.first().map_or("127.0.0.1", String::as_str);
    let mut container = container_spec(config, job);
    if let Some((username, password)) = container.as_mut().and_then(|c| c.registry_auth.as_mut()) {
        *username = resolve(username, secrets, "registry_auth.username")?;
        *password = resolve(password, secrets, "registry_auth.password")?;
    }
    // A container starts in the image's working directory unless one is configured, or in
    // dstack's `/workflow` when it has a repo; a host process with archives to unpack and no
    // working directory configured starts in a fresh directory the agent makes (empty here).
    let archives = &run.spec.archives;
    let clone = repo_clone(common, secrets);
    let has_repo = clone.is_some() || archives.iter().any(|a| a.repo);
    let sources = has_repo || !archives.is_empty();
    let relative = |dir: &str| !dir.starts_with('/') && !dir.starts_with('~');
    let mut archives = archives.clone();
    let mut clone = clone;
    let working_dir = match (&container, &common.working_dir) {
        (Some(_), Some(dir)) if dir.starts_with('/') => dir.clone(),
        // dstack's legacy rule: a relative working directory is below `/workflow`, where
        // the repo and relative targets go.
        (Some(_), Some(dir)) if relative(dir) => {
            for path in archives
                .iter_mut()
                .map(|a| &mut a.path)
                .chain(clone.iter_mut().map(|c| &mut c.path))
            {
                *path = crate::archive::target_dir(path, REPO_WORKING_DIR, "~");
            }
            format!("{REPO_WORKING_DIR}/{}", dir.trim_start_matches("./"))
        }
        (Some(_), _) if has_repo => REPO_WORKING_DIR.to_string(),
        (Some(_), _) => String::new(),
        // The agent makes a fresh directory for the sources and starts the job in it (or in
        // the relative working directory below it).
        (None, None) if sources => String::new(),
        (None, Some(dir)) if sources && relative(dir) => dir.clone(),
        (None, _) => working_dir(run, common, session),
    };
    // A container: only what the job is given; this machine: the client's session; a remote
    // host: its login session.
    let mut env: BTreeMap<String, String> = match (&container, session) {
        (Some(_), _) => BTreeMap::new(),
        (None, Some(s)) => s.env.clone(),
        (None, None) => run.spec.client_env.clone(),
    };
    for (name, value) in &common.env.0 {
        let value = match value {
            EnvValue::Value(v) => resolve(v, secrets, &format!("env.{name}"))?,
            EnvValue::FromClient => run.spec.client_env.get(name).cloned().ok_or_else(|| {
                CommandError(format!(
                    "environment variable {name} is not set on the client"
                ))
            })?,
        };
        env.insert(name.clone(), value);
    }
    let gpus = job
        .reservation
        .as_ref()
        .map(|r| r.gpus.clone())
        .unwrap_or_default();
    let visible = gpus
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let dstack = [
        ("DSTACK_RUN_NAME", run.name.clone()),
        ("DSTACK_RUN_ID", run.id.clone()),
        ("DSTACK_JOB_ID", job.id.clone()),
        (
            "DSTACK_REPO_ID",
            archives
                .iter()
                .find(|a| a.repo)
                .map_or_else(|| "none".to_string(), |a| a.hash[..16].to_string()),
        ),
        ("DSTACK_WORKING_DIR", working_dir.clone()),
        ("DSTACK_NODE_RANK", job.job_num.to_string()),
        ("DSTACK_NODES_NUM", nodes.len().to_string()),
        ("DSTACK_MASTER_NODE_IP", master.to_string()),
        ("DSTACK_NODES_IPS", nodes.join("\n")),
        ("DSTACK_GPUS_PER_NODE", gpus.len().to_string()),
        ("DSTACK_GPUS_NUM", (gpus.len() * nodes.len()).to_string()),
        ("CUDA_VISIBLE_DEVICES", visible.clone()),
        (
            "NVIDIA_VISIBLE_DEVICES",
            if visible.is_empty() {
                "void".to_string()
            } else {
                visible
            },
        ),
    ];
    for (k, v) in dstack {
        env.insert(k.to_string(), v);
    }
    // Where the repo lands, when it is known here (the agent sets it for a fresh directory).
    let repo_path = clone
        .as_ref()
        .map(|c| &c.path)
        .or(archives.iter().find(|a| a.repo).map(|a| &a.path));
    if let Some(path) = repo_path.filter(|_| working_dir.starts_with('/')) {
        let home = if container.is_some() {
            "/root"
        } else {
            env.get("HOME").map_or("/", String::as_str)
        };
        let dir = crate::archive::target_dir(path, &working_dir, home);
        env.insert("DSTACK_REPO_DIR".to_string(), dir);
    }
    let max_duration_secs = match common.profile.max_duration {
        Some(crate::config::duration::OffableDuration::Seconds(d)) => {
            u64::try_from(d.0).ok().filter(|s| *s > 0)
        }
        _ => None,
    };
    let argv = match &mut container {
        Some(spec) => {
            let (entrypoint, argv) = container_argv(config)?;
            spec.entrypoint = entrypoint;
            argv
        }
        None => argv(config)?,
    };
    Ok(JobSubmit {
        id: job.id.clone(),
        name: job.name(),
        argv,
        env,
        working_dir,
        max_duration_secs,
        mpi_hostfile: (nodes.len() > 1).then(|| {
            let slots = gpus.len().max(1);
            nodes
                .iter()
                .map(|ip| format!("{ip} slots={slots}\n"))
                .collect()
        }),
        container,
        after: job.after_job.clone(),
        archives: archives
            .into_iter()
            .chain(run.spec.artifacts.dependencies.iter().cloned())
            .collect(),
        clone,
        // The first node of the first replica saves the run's artifacts.
        artifacts: if job.job_num == 0 && job.replica_num == 0 {
            run.spec.artifacts.paths.clone()
        } else {
            Vec::new()
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_commands_like_dstack() {
        let c = |v: &[&str]| join_commands(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(c(&["echo a", " echo b "]), "echo a && echo b");
        assert_eq!(c(&["sleep 1 &", "echo b"]), "{ sleep 1 & } && echo b");
    }

    #[test]
    fn docker_true_runs_start_dockerd_first_in_bash_privileged() {
        let config =
            crate::config::parse("type: task\ndocker: true\ncommands: [docker ps]\n", "t.yml")
                .unwrap();
        let (entrypoint, argv) = container_argv(&config).unwrap();
        assert_eq!(entrypoint, None);
        assert_eq!(argv, ["/bin/bash", "-c", "start-dockerd && docker ps"]);
        let common = common(&config);
        assert_eq!(common.docker, Some(true));
        let custom =
            crate::config::parse("type: task\nimage: alpine\ncommands: [ls]\n", "t.yml").unwrap();
        assert_eq!(container_argv(&custom).unwrap().1, ["/bin/sh", "-c", "ls"]);
    }

    #[test]
    fn splits_like_a_shell() {
        assert_eq!(
            shell_split("python -m 'a b' \"c \\\"d\\\"\" e\\ f").unwrap(),
            ["python", "-m", "a b", "c \"d\"", "e f"]
        );
        assert!(shell_split("echo 'oops").is_err());
    }
}
