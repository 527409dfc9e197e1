//! Running a job in a container through the Docker Engine API (Docker, or podman's
//! compatible service): the image is used when present and pulled otherwise (progress in the
//! job's log), the container gets the job's environment, working directory, user, mounts,
//! ports (published on 127.0.0.1), its reservation as CPU and memory limits and its GPUs
//! (device requests), its output goes to the job's log like a process's, a stop
//! sends SIGTERM and kills after the grace period, and the container is removed at the end.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bollard::auth::DockerCredentials;
use bollard::container::LogOutput;
use bollard::models::{ContainerCreateBody, DeviceRequest, HostConfig, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, KillContainerOptions, LogsOptions,
    RemoveContainerOptions, StopContainerOptions,
};
use bollard::Docker;
use dstack_core::agent::{AgentJobStatus, ContainerSpec, JobInfo, JobSubmit, StopRequest};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::archives::Archives;
use crate::jobs::Job;
use crate::logs::LogWriter;
use crate::state::unix_ms;
use crate::supervisor::{after, finished, sleep_until, Stopping};

/// How often the container is checked for having exited when the engine's wait call failed.
const EXIT_CHECK: Duration = Duration::from_secs(2);

/// How long output may still arrive after the container exited.
const LOG_DRAIN: Duration = Duration::from_secs(2);

/// The container engine's socket: `$DOCKER_HOST` (`unix://…`), else Docker's or podman's
/// usual one, if it answers.
pub async fn detect() -> Option<String> {
    let mut candidates = Vec::new();
    if let Ok(host) = std::env::var("DOCKER_HOST") {
        candidates.push(host.replacen("unix://", "", 1));
    }
    candidates.push("/var/run/docker.sock".to_string());
    candidates.push("/run/podman/podman.sock".to_string());
    for socket in candidates {
        let Ok(docker) = Docker::connect_with_unix(&socket, 10, bollard::API_DEFAULT_VERSION)
        else {
            continue;
        };
        if tokio::time::timeout(Duration::from_secs(2), docker.ping())
            .await
            .is_ok_and(|r| r.is_ok())
        {
            return Some(socket);
        }
    }
    None
}

/// The name of the container of job `id`.
pub(crate) fn name(id: &str) -> String {
    format!("dstack-{id}")
}

/// Removes the containers `names` (killing them if they run) from the engine at `socket`.
pub(crate) async fn remove_all(socket: &str, names: &[String]) {
    if names.is_empty() {
        return;
    }
    match Docker::connect_with_unix(socket, 60, bollard::API_DEFAULT_VERSION) {
        Ok(docker) => {
            for name in names {
                remove(&docker, name).await;
            }
        }
        Err(e) => eprintln!("dstack-agent: cannot remove containers of lost jobs: {e}"),
    }
}

/// Runs `job` (submitted as `spec`) in a container on the engine at `socket`, until it ends.
pub(crate) fn supervise(
    job: Arc<Job>,
    spec: JobSubmit,
    socket: Option<String>,
    archives: Arc<Archives>,
    log: LogWriter,
    stop_requests: mpsc::UnboundedReceiver<StopRequest>,
) {
    tokio::spawn(async move {
        let info = run(&job, spec, socket, &archives, log, stop_requests).await;
        job.finish(info);
    });
}

async fn run(
    job: &Arc<Job>,
    spec: JobSubmit,
    socket: Option<String>,
    archives: &Archives,
    mut log: LogWriter,
    mut stop_requests: mpsc::UnboundedReceiver<StopRequest>,
) -> JobInfo {
    let container = spec.container.clone().unwrap_or_default();
    let Some(socket) = socket else {
        return failed(job, "creating_container_error", "no container engine on this host: `image:` jobs need Docker or podman's Docker API (set DOCKER_HOST)");
    };
    let docker = match Docker::connect_with_unix(&socket, 600, bollard::API_DEFAULT_VERSION) {
        Ok(d) => d,
        Err(e) => {
            return failed(
                job,
                "creating_container_error",
                &format!("cannot reach the container engine at {socket}: {e}"),
            )
        }
    };
    if let Err(message) = ensure_image(&docker, &container, job, &mut log).await {
        return failed(job, "creating_container_error", &message);
    }
    let name = name(&spec.id);
    let _ = docker
        .remove_container(
            &name,
            Some(RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await;
    let options = CreateContainerOptions {
        name: Some(name.clone()),
        ..Default::default()
    };
    if let Err(e) = docker
        .create_container(Some(options), create_body(&spec, &container))
        .await
    {
        return failed(
            job,
            "creating_container_error",
            &format!("cannot create the container: {e}"),
        );
    }
    // The repo and files go in before the job's command runs (relative targets from the
    // working directory the engine gave, else the image's).
    let working_dir = match spec.working_dir.as_str() {
        "" if !spec.archives.is_empty() || spec.clone.is_some() => {
            image_working_dir(&docker, &name).await
        }
        dir => dir.to_string(),
    };
    let sources = (spec.archives.as_slice(), spec.clone.as_ref());
    if let Err(message) = archives
        .unpack_into_container(&docker, &name, sources, &working_dir, &job.scratch())
        .await
    {
        remove(&docker, &name).await;
        return failed(job, "executor_error", &message);
    }
    if let Err(e) = docker.start_container(&name, None).await {
        remove(&docker, &name).await;
        return failed(
            job,
            "creating_container_error",
            &format!("cannot start the container: {e}"),
        );
    }
    let logs = docker.logs(
        &name,
        Some(LogsOptions {
            follow: true,
            stdout: true,
            stderr: true,
            ..Default::default()
        }),
    );
    let mut logs = std::pin::pin!(logs);
    // The container's end is watched on its own: a log stream may outlive it (podman keeps
    // following a container that exited before the stream attached), so once it has exited
    // the remaining output gets a short drain and no more.
    // The engine's wait call reports the exit at once; should it fail, polling takes over.
    let mut wait = std::pin::pin!(docker.wait_container(&name, None));
    let mut waiting = true;
    let mut waited_code: Option<i64> = None;
    let mut check = tokio::time::interval(EXIT_CHECK);
    let mut drain: Option<tokio::time::Instant> = None;
    let mut stopping: Option<Stopping> = None;
    // Checked: a `max_duration` too long to add to the clock is no deadline (a plain `+`
    // panicked this task after the container started, leaving it unsupervised).
    let deadline = spec.max_duration_secs.and_then(after);
    loop {
        tokio::select! {
            chunk = logs.next() => match chunk {
                Some(Ok(LogOutput::StdOut { message } | LogOutput::StdErr { message } | LogOutput::Console { message })) => {
                    if let Ok(len) = log.append(&message) {
                        job.set_log_bytes(len);
                    }
                }
                Some(Ok(LogOutput::StdIn { .. })) => {}
                Some(Err(_)) | None => break,
            },
            Some(request) = stop_requests.recv() => {
                stopping = Some(Stopping { reason: request.reason, message: None });
                stop(&docker, &name, if request.abort { 0 } else { request.grace_secs }).await;
            }
            waited = wait.next(), if waiting && drain.is_none() => match waited {
                Some(Ok(bollard::models::ContainerWaitResponse { status_code: code, .. })
                | Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => {
                    // Trust the wait only once the container is seen stopped; else wait again.
                    if running(&docker, &name).await {
                        wait.set(docker.wait_container(&name, None));
                    } else {
                        waited_code = Some(code);
                        drain = Some(tokio::time::Instant::now() + LOG_DRAIN);
                    }
                }
                Some(Err(_)) | None => waiting = false,
            },
            _ = check.tick(), if !waiting && drain.is_none() => {
                if !running(&docker, &name).await {
                    drain = Some(tokio::time::Instant::now() + LOG_DRAIN);
                }
            }
            () = sleep_until(drain) => break,
            () = sleep_until(deadline), if stopping.is_none() => {
                let secs = spec.max_duration_secs.unwrap_or_default();
                stopping = Some(Stopping {
                    reason: "max_duration_exceeded".to_string(),
                    message: Some(format!("the job ran longer than its max_duration of {secs}s")),
                });
                stop(&docker, &name, 10).await;
            }
        }
    }
    let code = match waited_code {
        Some(code) => Some(code),
        None => exit_code(&docker, &name).await,
    }
    .map(|c| i32::try_from(c).unwrap_or(-1));
    if !spec.artifacts.is_empty() {
        crate::artifacts::keep_container(&docker, &name, &working_dir, job).await;
    }
    remove(&docker, &name).await;
    let description = match code {
        Some(c) => format!("the container exited with status {c}"),
        None => "the container's exit status is unknown".to_string(),
    };
    finished(job.info(), code, description, stopping)
}

/// What to ask the engine to pull for `image`: the name and its tag (`latest` when none), or
/// the whole reference and no tag when the image is pinned by digest (`name@sha256:…`).
fn pull_reference(image: &str) -> (String, Option<String>) {
    if image.contains('@') {
        return (image.to_string(), None);
    }
    match image.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name.to_string(), Some(tag.to_string())),
        _ => (image.to_string(), Some("latest".to_string())),
    }
}

/// Uses the image when present, pulls it otherwise (progress lines go to the job's log).
async fn ensure_image(
    docker: &Docker,
    container: &ContainerSpec,
    job: &Job,
    log: &mut LogWriter,
) -> Result<(), String> {
    if docker.inspect_image(&container.image).await.is_ok() {
        return Ok(());
    }
    let (from_image, tag) = pull_reference(&container.image);
    let options = CreateImageOptions {
        from_image: Some(from_image),
        tag,
        ..Default::default()
    };
    let credentials = container
        .registry_auth
        .as_ref()
        .map(|(user, password)| DockerCredentials {
            username: Some(user.clone()),
            password: Some(password.clone()),
            ..Default::default()
        });
    let mut pull = docker.create_image(Some(options), None, credentials);
    let mut last = String::new();
    while let Some(progress) = pull.next().await {
        match progress {
            Ok(info) => {
                let status = info.status.unwrap_or_default();
                if !status.is_empty() && status != last {
                    if let Ok(len) =
                        log.append(format!("pulling {}: {status}\n", container.image).as_bytes())
                    {
                        job.set_log_bytes(len);
                    }
                    last = status;
                }
            }
            Err(e) => return Err(format!("cannot pull image {}: {e}", container.image)),
        }
    }
    docker
        .inspect_image(&container.image)
        .await
        .map(drop)
        .map_err(|e| {
            format!(
                "image {} is not available after pulling: {e}",
                container.image
            )
        })
}

fn create_body(spec: &JobSubmit, container: &ContainerSpec) -> ContainerCreateBody {
    let env = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let port_bindings: HashMap<String, Option<Vec<PortBinding>>> = container
        .ports
        .iter()
        .map(|p| {
            let binding = PortBinding {
                host_ip: Some("127.0.0.1".to_string()),
                host_port: Some(p.to_string()),
            };
            (format!("{p}/tcp"), Some(vec![binding]))
        })
        .collect();
    ContainerCreateBody {
        image: Some(container.image.clone()),
        entrypoint: container.entrypoint.clone(),
        cmd: (!spec.argv.is_empty()).then(|| spec.argv.clone()),
        env: Some(env),
        working_dir: (!spec.working_dir.is_empty()).then(|| spec.working_dir.clone()),
        user: container.user.clone(),
        exposed_ports: Some(container.ports.iter().map(|p| format!("{p}/tcp")).collect()),
        host_config: Some(HostConfig {
            // An init as PID 1 (catatonit with podman, tini with Docker) hands SIGTERM on to
            // the job's shell: a shell that is PID 1 itself ignores it, so every stop would
            // wait out `stop_duration` (dstack's 5 minutes) before SIGKILL.
            init: Some(true),
            binds: Some(
                container
                    .mounts
                    .iter()
                    .map(|(h, c)| format!("{h}:{c}"))
                    .collect(),
            ),
            port_bindings: Some(port_bindings),
            privileged: Some(container.privileged),
            shm_size: container.shm_size_bytes.map(|b| b as i64),
            nano_cpus: (container.cpus > 0).then_some(i64::from(container.cpus) * 1_000_000_000),
            memory: (container.memory_mib > 0).then_some((container.memory_mib as i64) << 20),
            device_requests: (!container.gpus.is_empty()).then(|| {
                vec![DeviceRequest {
                    driver: Some("nvidia".to_string()),
                    device_ids: Some(container.gpus.iter().map(u32::to_string).collect()),
                    capabilities: Some(vec![vec!["gpu".to_string()]]),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// SIGTERM, then SIGKILL after `grace_secs` (at once with 0).
async fn stop(docker: &Docker, name: &str, grace_secs: u64) {
    if grace_secs == 0 {
        let options = KillContainerOptions {
            signal: "SIGKILL".to_string(),
        };
        let _ = docker.kill_container(name, Some(options)).await;
        return;
    }
    let options = StopContainerOptions {
        t: Some(i32::try_from(grace_secs).unwrap_or(i32::MAX)),
        ..Default::default()
    };
    let docker = docker.clone();
    let name = name.to_string();
    // The stop call returns when the container is gone; the logs end at the same time.
    tokio::spawn(async move {
        let _ = docker.stop_container(&name, Some(options)).await;
    });
}

/// Whether the container still runs (an error counts as running: the log stream decides).
async fn running(docker: &Docker, name: &str) -> bool {
    match docker.inspect_container(name, None).await {
        Ok(inspected) => inspected.state.and_then(|s| s.running).unwrap_or(true),
        Err(e) => !podman_stopped(&e),
    }
}

async fn exit_code(docker: &Docker, name: &str) -> Option<i64> {
    for _ in 0..40 {
        match docker.inspect_container(name, None).await {
            Ok(inspected) => return inspected.state?.exit_code,
            // Until podman settles the state on `exited`, its exit code is not final.
            Err(e) if podman_stopped(&e) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(_) => return None,
        }
    }
    None
}

/// Whether inspecting failed on podman's transient `stopped` state (which the Docker API, and
/// so bollard, does not know): the container is no longer running.
fn podman_stopped(e: &bollard::errors::Error) -> bool {
    matches!(e, bollard::errors::Error::JsonDataError { message, .. } if message.contains("`stopped`"))
}

async fn remove(docker: &Docker, name: &str) {
    let options = RemoveContainerOptions {
        force: true,
        ..Default::default()
    };
    let _ = docker.remove_container(name, Some(options)).await;
}

fn failed(job: &Job, reason: &str, message: &str) -> JobInfo {
    JobInfo {
        status: AgentJobStatus::Failed,
        termination_reason: Some(reason.to_string()),
        termination_message: Some(message.to_string()),
        finished_at_ms: Some(unix_ms()),
        ..job.info()
    }
}

/// The working directory a created container starts in (its image's; `/` when it has none).
pub(crate) async fn image_working_dir(docker: &Docker, name: &str) -> String {
    docker
        .inspect_container(name, None)
        .await
        .ok()
        .and_then(|c| c.config)
        .and_then(|c| c.working_dir)
        .filter(|dir| dir.starts_with('/'))
        .unwrap_or_else(|| "/".to_string())
}

#[cfg(test)]
mod tests {
    use super::pull_reference;

    #[test]
    fn tags_digests_and_registry_ports() {
        let pair = |image| pull_reference(image);
        assert_eq!(pair("ubuntu"), ("ubuntu".into(), Some("latest".into())));
        assert_eq!(
            pair("ubuntu:22.04"),
            ("ubuntu".into(), Some("22.04".into()))
        );
        assert_eq!(
            pair("reg.io:5000/team/img"),
            ("reg.io:5000/team/img".into(), Some("latest".into()))
        );
        let pinned = "reg.io:5000/img@sha256:0123456789abcdef";
        assert_eq!(pair(pinned), (pinned.into(), None));
    }
}
