//! Stopping jobs: graceful, aborted, and after the grace period.

mod common;

use std::time::Instant;

use common::{group_alive, leader_pid, shell_job, wait_finished, wait_for_output, TestAgent};
use dstack_core::agent::{AgentJobStatus, StopRequest};

fn stop(abort: bool, grace_secs: u64, reason: &str) -> StopRequest {
    StopRequest {
        abort,
        grace_secs,
        reason: reason.to_string(),
    }
}

#[tokio::test]
async fn a_graceful_stop_lets_the_job_handle_sigterm() {
    let agent = TestAgent::start().await;
    let script = "trap 'echo got TERM; exit 0' TERM; echo ready; while :; do sleep 0.1; done";
    agent
        .client
        .submit(&shell_job("trap", script))
        .await
        .unwrap();
    wait_for_output(&agent.client, "trap", "ready\n").await;

    let during = agent
        .client
        .stop("trap", &stop(false, 30, "terminated_by_user"))
        .await
        .unwrap();
    assert_eq!(during.id, "trap");
    let info = wait_finished(&agent.client, "trap").await;
    assert_eq!(info.status, AgentJobStatus::Terminated);
    assert_eq!(
        info.termination_reason.as_deref(),
        Some("terminated_by_user")
    );
    assert_eq!(info.exit_status, Some(0));
    let logs = common::read_logs(&agent.client, "trap", 0).await;
    assert!(logs.ends_with("got TERM\n"), "{logs}");

    // Stopping a finished job changes nothing.
    let again = agent
        .client
        .stop("trap", &stop(true, 0, "aborted_by_user"))
        .await
        .unwrap();
    assert_eq!(again, info);
}

#[tokio::test]
async fn abort_kills_the_process_group_at_once() {
    let agent = TestAgent::start().await;
    let job = shell_job("abort", "echo $$; sleep 1000 & exec sleep 1000");
    agent.client.submit(&job).await.unwrap();
    let pgid = leader_pid(&agent.client, "abort").await;
    assert!(group_alive(pgid));

    agent
        .client
        .stop("abort", &stop(true, 600, "aborted_by_user"))
        .await
        .unwrap();
    let info = wait_finished(&agent.client, "abort").await;
    assert_eq!(info.status, AgentJobStatus::Terminated);
    assert_eq!(info.termination_reason.as_deref(), Some("aborted_by_user"));
    assert_eq!(info.exit_status, Some(-9));
    common::eventually("the process group to die", || !group_alive(pgid)).await;
}

#[tokio::test]
async fn a_job_ignoring_sigterm_is_killed_after_the_grace_period() {
    let agent = TestAgent::start().await;
    let script = "trap '' TERM; echo $$; while :; do sleep 0.1; done";
    agent
        .client
        .submit(&shell_job("stubborn", script))
        .await
        .unwrap();
    let pgid = leader_pid(&agent.client, "stubborn").await;

    let asked = Instant::now();
    agent
        .client
        .stop("stubborn", &stop(false, 1, "terminated_by_user"))
        .await
        .unwrap();
    let info = wait_finished(&agent.client, "stubborn").await;
    assert!(
        asked.elapsed().as_millis() >= 900,
        "killed before the grace period"
    );
    assert_eq!(info.status, AgentJobStatus::Terminated);
    assert_eq!(
        info.termination_reason.as_deref(),
        Some("terminated_by_user")
    );
    assert_eq!(info.exit_status, Some(-9));
    common::eventually("the process group to die", || !group_alive(pgid)).await;
}
