//! Jobs queued behind another (`JobSubmit::after`): they start when it ends, can be stopped or
//! taken back while queued, and survive a restart of the agent.

mod common;

use common::{read_logs, shell_job, wait_finished, within, TestAgent};
use dstack_core::agent::{AgentError, AgentJobStatus, JobInfo, JobSubmit, StopRequest};
use futures_util::StreamExt;

fn after(id: &str, script: &str, leader: &str) -> JobSubmit {
    JobSubmit {
        after: Some(leader.to_string()),
        ..shell_job(id, script)
    }
}

fn stop_request() -> StopRequest {
    StopRequest {
        abort: false,
        grace_secs: 1,
        reason: "terminated_by_user".to_string(),
    }
}

fn status_code(e: AgentError) -> u16 {
    match e {
        AgentError::Status { status, .. } => status,
        other => panic!("expected an HTTP status, got {other}"),
    }
}

#[tokio::test]
async fn a_queued_job_starts_the_moment_its_leader_ends_and_is_reported_first() {
    let agent = TestAgent::start().await;
    let client = &agent.client;
    let mut events = client.events().await.unwrap();
    client
        .submit(&shell_job("leader", "sleep 0.3; echo led"))
        .await
        .unwrap();
    let queued = client
        .submit(&after("follower", "echo followed", "leader"))
        .await
        .unwrap();
    assert_eq!(queued.status, AgentJobStatus::Queued);
    assert_eq!(queued.started_at_ms, 0);

    let leader = wait_finished(client, "leader").await;
    let follower = wait_finished(client, "follower").await;
    assert_eq!(follower.status, AgentJobStatus::Done);
    assert_eq!(read_logs(client, "follower", 0).await, "followed\n");
    assert!(follower.started_at_ms >= leader.finished_at_ms.unwrap());

    // Whoever learns that the leader ended already knows that the follower started.
    let seen: Vec<JobInfo> = within("the events", async {
        let mut seen = Vec::new();
        while !seen
            .iter()
            .any(|i: &JobInfo| i.id == "follower" && i.status.is_finished())
        {
            seen.push(events.next().await.unwrap().unwrap());
        }
        seen
    })
    .await;
    let position = |id: &str, running: bool| {
        seen.iter()
            .position(|i| i.id == id && (i.status == AgentJobStatus::Running) == running)
            .unwrap_or_else(|| panic!("no event of {id} (running: {running}) in {seen:?}"))
    };
    assert!(position("follower", true) < position("leader", false));
}

#[tokio::test]
async fn following_a_job_that_has_ended_or_is_unknown_starts_at_once() {
    let agent = TestAgent::start().await;
    let client = &agent.client;
    client.submit(&shell_job("first", "true")).await.unwrap();
    wait_finished(client, "first").await;
    for (id, leader) in [("second", "first"), ("third", "nobody")] {
        let info = client.submit(&after(id, "true", leader)).await.unwrap();
        assert_eq!(info.status, AgentJobStatus::Running, "{id}");
        assert_eq!(wait_finished(client, id).await.status, AgentJobStatus::Done);
    }
}

#[tokio::test]
async fn a_leader_takes_one_follower_and_followers_take_none() {
    let agent = TestAgent::start().await;
    let client = &agent.client;
    client
        .submit(&shell_job("leader", "sleep 30"))
        .await
        .unwrap();
    client
        .submit(&after("one", "true", "leader"))
        .await
        .unwrap();
    let two = client.submit(&after("two", "true", "leader")).await;
    assert_eq!(status_code(two.unwrap_err()), 409);
    let chained = client.submit(&after("chained", "true", "one")).await;
    assert_eq!(status_code(chained.unwrap_err()), 409);
    assert_eq!(client.job("two").await.unwrap(), None);
    client.stop("leader", &stop_request()).await.unwrap();
    wait_finished(client, "one").await;
}

#[tokio::test]
async fn a_queued_job_can_be_stopped_or_taken_back_and_never_starts() {
    let agent = TestAgent::start().await;
    let client = &agent.client;
    let marker = agent.scratch().join("ran");
    let script = format!("touch {}", marker.display());
    client
        .submit(&shell_job("leader", "sleep 1"))
        .await
        .unwrap();

    client
        .submit(&after("stopped", &script, "leader"))
        .await
        .unwrap();
    let stopped = client.stop("stopped", &stop_request()).await.unwrap();
    assert_eq!(stopped.status, AgentJobStatus::Terminated);
    assert_eq!(
        stopped.termination_reason.as_deref(),
        Some("terminated_by_user")
    );
    assert_eq!(stopped.exit_status, None);
    assert_eq!(
        read_logs(client, "stopped", 0).await,
        "stopped before it started\n"
    );

    // The leader takes a follower again; taking it back forgets it.
    client
        .submit(&after("taken", &script, "leader"))
        .await
        .unwrap();
    client.remove("taken").await.unwrap();
    assert_eq!(client.job("taken").await.unwrap(), None);
    // A running job cannot be taken back.
    assert_eq!(status_code(client.remove("leader").await.unwrap_err()), 409);

    wait_finished(client, "leader").await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!marker.exists(), "a stopped or taken-back job ran");
    let stopped_now = client.job("stopped").await.unwrap().unwrap();
    assert_eq!(stopped_now, stopped);
}

#[tokio::test]
async fn a_queued_job_starts_after_the_agent_restarts() {
    let agent = TestAgent::start().await;
    agent
        .client
        .submit(&shell_job("leader", "sleep 30"))
        .await
        .unwrap();
    agent
        .client
        .submit(&after("follower", "echo after the restart", "leader"))
        .await
        .unwrap();
    let agent = TestAgent::start_in(agent.stop().await).await;
    let client = &agent.client;
    let leader = client.job("leader").await.unwrap().unwrap();
    assert_eq!(leader.status, AgentJobStatus::Failed); // lost with the agent
    let follower = wait_finished(client, "follower").await;
    assert_eq!(follower.status, AgentJobStatus::Done);
    assert_eq!(
        read_logs(client, "follower", 0).await,
        "after the restart\n"
    );
}
