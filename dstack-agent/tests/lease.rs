//! The owner lease: an agent on a cloud instance runs its shutdown action once it has run no
//! job for its idle time and heard no renewal for a lease window. The shutdown action here
//! appends a line to a file instead of powering anything off.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{alive, eventually, shell_job, wait_finished, within, TestAgent};
use dstack_agent::{spawn_detached, AgentConfig, LeaseConfig};
use dstack_core::agent::{AgentClient, LeaseTerms};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

/// A lease of `idle` seconds and a window of `window` seconds whose shutdown action appends
/// a line to `<marks>/shutdown`.
fn lease(idle: u64, window: u64, marks: &TempDir) -> LeaseConfig {
    LeaseConfig {
        idle: Duration::from_secs(idle),
        window: Duration::from_secs(window),
        shutdown_command: Some(format!("echo down >> '{}'", shutdown_file(marks).display())),
    }
}

fn shutdown_file(marks: &TempDir) -> PathBuf {
    marks.path().join("shutdown")
}

/// How many times the shutdown action ran.
fn shutdowns(marks: &TempDir) -> usize {
    std::fs::read_to_string(shutdown_file(marks)).map_or(0, |s| s.lines().count())
}

/// Renews the agent's lease every 200 ms, `times` times.
async fn renew(client: &AgentClient, times: u64) {
    for _ in 0..times {
        client.renew_lease().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn an_idle_agent_whose_lease_is_not_renewed_runs_the_shutdown_action_once() {
    let marks = tempfile::tempdir().unwrap();
    let agent = TestAgent::start_leased(lease(0, 1, &marks)).await;
    let status = agent.client.lease().await.unwrap();
    assert_eq!(
        status.terms,
        Some(LeaseTerms {
            idle_secs: 0,
            window_secs: 1
        })
    );
    assert!(!status.shut_down);
    eventually("the shutdown action", || shutdowns(&marks) > 0).await;
    // Several more windows without a renewal: the action is not run again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(shutdowns(&marks), 1);
    let status = agent.client.lease().await.unwrap();
    assert!(status.shut_down, "{status:?}");
    // The agent goes on serving (the host is on its way down).
    agent.client.jobs().await.unwrap();
    agent.shut_down().await;
}

#[tokio::test]
async fn a_renewed_lease_keeps_an_idle_host() {
    let marks = tempfile::tempdir().unwrap();
    let agent = TestAgent::start_leased(lease(0, 2, &marks)).await;
    renew(&agent.client, 20).await;
    assert_eq!(shutdowns(&marks), 0, "renewed every 200 ms, for 2 windows");
    let status = agent.client.lease().await.unwrap();
    assert_eq!(status.renewals, 20);
    assert!(!status.shut_down);
    // Renewals stop: the lease lapses.
    eventually("the shutdown action", || shutdowns(&marks) == 1).await;
    agent.shut_down().await;
}

#[tokio::test]
async fn a_running_job_keeps_the_host_until_it_ends_and_the_idle_time_passed() {
    let marks = tempfile::tempdir().unwrap();
    // Never renewed; the job runs for 3 lease windows, and the host may idle 2 s after.
    let agent = TestAgent::start_leased(lease(2, 1, &marks)).await;
    let client = &agent.client;
    client.submit(&shell_job("busy", "sleep 3")).await.unwrap();
    let info = wait_finished(client, "busy").await;
    assert_eq!(info.exit_status, Some(0));
    assert_eq!(
        shutdowns(&marks),
        0,
        "the running job kept the host for 3 windows"
    );
    eventually("the shutdown action", || shutdowns(&marks) == 1).await;
    agent.shut_down().await;
}

#[tokio::test]
async fn an_agent_without_a_lease_never_shuts_its_host_down() {
    let agent = TestAgent::start().await;
    let status = agent.client.renew_lease().await.unwrap();
    assert_eq!(status.terms, None);
    assert!(!status.shut_down);
    agent.shut_down().await;
}

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_dstack-agent"))
}

#[tokio::test]
async fn a_detached_agent_keeps_its_lease() {
    let dir = tempfile::tempdir().unwrap();
    let marks = tempfile::tempdir().unwrap();
    let mut config = AgentConfig::new(dir.path().join("agent.sock"), dir.path().join("state"));
    config.lease = Some(lease(3600, 1, &marks));
    let health = within("the agent to start", spawn_detached(binary(), &config))
        .await
        .expect("the agent starts");
    let client = AgentClient::local(&config.socket, &config.state_dir).unwrap();
    let status = client.renew_lease().await.unwrap();
    assert_eq!(
        status.terms,
        Some(LeaseTerms {
            idle_secs: 3600,
            window_secs: 1
        })
    );
    assert_eq!(status.renewals, 1);
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", health.pid)).unwrap();
    let args: Vec<_> = cmdline.split(|b| *b == 0).collect();
    assert!(
        args.windows(2)
            .any(|w| w[0] == b"--shutdown-command" && w[1].starts_with(b"echo down")),
        "{:?}",
        String::from_utf8_lossy(&cmdline)
    );
    kill(Pid::from_raw(health.pid as i32), Signal::SIGTERM).unwrap();
    eventually("the agent to exit", || !alive(health.pid as i32)).await;
    assert_eq!(shutdowns(&marks), 0);
}
