//! The agent binary: `--detach`, refusing a second agent, shutting down on SIGTERM, recovering
//! after being killed, and GPU detection through `nvidia-smi`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{alive, eventually, group_alive, leader_pid, read_logs, shell_job, within};
use dstack_agent::{spawn_detached, AgentConfig};
use dstack_core::agent::{AgentClient, AgentJobStatus, Healthcheck};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_dstack-agent"))
}

fn config(dir: &Path) -> AgentConfig {
    AgentConfig::new(dir.join("agent.sock"), dir.join("state"))
}

async fn start(config: &AgentConfig) -> (Healthcheck, AgentClient) {
    let health = within("the agent to start", spawn_detached(binary(), config))
        .await
        .expect("the agent starts");
    let client = AgentClient::local(&config.socket, &config.state_dir).unwrap();
    (health, client)
}

/// The session id of process `pid`.
fn session(pid: u32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    fields[3].parse().unwrap()
}

async fn signal_and_wait(pid: u32, signal: Signal) {
    kill(Pid::from_raw(pid as i32), signal).unwrap();
    eventually("the agent to exit", || !alive(pid as i32)).await;
}

#[tokio::test]
async fn a_detached_agent_keeps_no_descriptor_its_starter_left_open() {
    use std::os::fd::AsFd;
    let dir = tempfile::tempdir().unwrap();
    // An inheritable descriptor, as `flock FILE command` leaves one to the command.
    let held = dir.path().join("held.lock");
    let file = std::fs::File::create(&held).unwrap();
    nix::fcntl::fcntl(
        file.as_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    let config = config(dir.path());
    let (health, _client) = start(&config).await;
    let open: Vec<_> = std::fs::read_dir(format!("/proc/{}/fd", health.pid))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .collect();
    assert!(!open.contains(&held), "{open:?}");
    signal_and_wait(health.pid, Signal::SIGTERM).await;
    drop(file);
}

#[tokio::test]
async fn a_detached_agent_runs_in_its_own_session_and_is_not_started_twice() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let (health, client) = start(&config).await;
    assert_eq!(health.service, "dstack-agent");
    assert_eq!(health.version, env!("CARGO_PKG_VERSION"));
    assert_ne!(health.pid, std::process::id());
    assert_eq!(session(health.pid), health.pid as i32);
    let pid_file = std::fs::read_to_string(config.state_dir.join("agent.pid")).unwrap();
    assert_eq!(pid_file.trim(), health.pid.to_string());
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&config.socket), 0o600);
    assert_eq!(mode(&config.state_dir), 0o700);

    let same_state = AgentConfig::new(dir.path().join("other.sock"), &config.state_dir);
    let err = spawn_detached(binary(), &same_state).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("another dstack-agent is using the state directory"),
        "{err}"
    );
    let same_socket = AgentConfig::new(&config.socket, dir.path().join("other-state"));
    let err = spawn_detached(binary(), &same_socket).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("another dstack-agent is already listening"),
        "{err}"
    );
    assert_eq!(client.healthcheck().await.unwrap().pid, health.pid);

    signal_and_wait(health.pid, Signal::SIGTERM).await;
    assert!(!config.socket.exists());
    assert!(!config.state_dir.join("agent.pid").exists());
}

#[tokio::test]
async fn sigterm_stops_the_agent_but_not_its_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let (health, client) = start(&config).await;
    client
        .submit(&shell_job("kept", "echo $$; exec sleep 1000"))
        .await
        .unwrap();
    let pgid = leader_pid(&client, "kept").await;

    signal_and_wait(health.pid, Signal::SIGTERM).await;
    assert!(client.healthcheck().await.unwrap_err().is_unreachable());
    assert!(group_alive(pgid));
    killpg(Pid::from_raw(pgid), Signal::SIGKILL).unwrap();
}

#[tokio::test]
async fn jobs_of_a_killed_agent_are_reported_lost_by_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let (first, client) = start(&config).await;
    client
        .submit(&shell_job("done", "echo fine"))
        .await
        .unwrap();
    common::wait_finished(&client, "done").await;
    client
        .submit(&shell_job("orphan", "echo $$; exec sleep 1000"))
        .await
        .unwrap();
    let pgid = leader_pid(&client, "orphan").await;

    signal_and_wait(first.pid, Signal::SIGKILL).await;
    assert!(
        config.socket.exists(),
        "a killed agent leaves its socket behind"
    );
    assert!(group_alive(pgid));

    let (second, client) = start(&config).await;
    assert_ne!(second.pid, first.pid);
    let lost = client.job("orphan").await.unwrap().unwrap();
    assert_eq!(lost.status, AgentJobStatus::Failed);
    assert_eq!(lost.termination_reason.as_deref(), Some("executor_error"));
    let message = "the agent stopped while the job was running; the job was lost";
    assert_eq!(lost.termination_message.as_deref(), Some(message));
    assert!(lost.finished_at_ms.is_some());
    let logs = read_logs(&client, "orphan", 0).await;
    assert_eq!(logs, format!("{pgid}\n{message}\n"));
    assert_eq!(lost.log_bytes, logs.len() as u64);
    eventually("the lost job's processes to die", || !group_alive(pgid)).await;

    let done = client.job("done").await.unwrap().unwrap();
    assert_eq!(done.status, AgentJobStatus::Done);
    assert_eq!(read_logs(&client, "done", 0).await, "fine\n");
    assert_eq!(client.jobs().await.unwrap().len(), 2);

    signal_and_wait(second.pid, Signal::SIGTERM).await;
}

#[tokio::test]
async fn gpus_are_detected_with_nvidia_smi_on_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let fake = bin.join("nvidia-smi");
    std::fs::write(
        &fake,
        "#!/bin/sh\n\
         printf '0, NVIDIA A100-SXM4-80GB, 81920, GPU-abc\\n1, NVIDIA A100-SXM4-80GB, 81920, GPU-def\\n'\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut config = config(dir.path());
    config.tool_path = Some(bin.into_os_string());

    let (health, _client) = start(&config).await;
    let gpus: Vec<_> = health
        .host
        .gpus
        .iter()
        .map(|g| {
            (
                g.index,
                g.name.as_str(),
                g.memory_mib,
                g.vendor.as_str(),
                g.uuid.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        gpus,
        [
            (0, "A100", 81920, "nvidia", Some("GPU-abc")),
            (1, "A100", 81920, "nvidia", Some("GPU-def")),
        ]
    );
    assert!(["x86", "arm"].contains(&health.host.cpu_arch.as_str()));
    assert!(health.host.cpus >= 1 && health.host.memory_bytes > 0 && health.host.disk_bytes > 0);
    signal_and_wait(health.pid, Signal::SIGTERM).await;
}

#[tokio::test]
async fn an_agent_whose_state_directory_is_removed_stops_its_jobs_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let (health, client) = start(&config).await;
    client
        .submit(&shell_job("stranded", "echo $$; exec sleep 1000"))
        .await
        .unwrap();
    let job = leader_pid(&client, "stranded").await;
    std::fs::remove_dir_all(&config.state_dir).unwrap();
    eventually("the agent to exit", || !alive(health.pid as i32)).await;
    assert!(!group_alive(job), "its job was stopped");
}
