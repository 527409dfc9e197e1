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
    // Its submitter learnt from the reply that it was queued.
    assert!(
        seen.iter().all(|i| i.status != AgentJobStatus::Queued),
        "{seen:?}"
    );
}

#[tokio::test]
async fn following_a_job_that_has_ended_starts_at_once_and_an_unknown_one_is_refused() {
    let agent = TestAgent::start().await;
    let client = &agent.client;
    client.submit(&shell_job("first", "true")).await.unwrap();
    wait_finished(client, "first").await;
    let info = client
        .submit(&after("second", "true", "first"))
        .await
        .unwrap();
    assert_eq!(info.status, AgentJobStatus::Running);
    assert_eq!(
        wait_finished(client, "second").await.status,
        AgentJobStatus::Done
    );
    // Perhaps submitted but not arrived yet: waiting for it is not possible, starting could
    // run both at once.
    let unknown = client.submit(&after("third", "true", "nobody")).await;
    assert_eq!(status_code(unknown.unwrap_err()), 409);
    assert_eq!(client.job("third").await.unwrap(), None);
}

#[tokio::test]
async fn jobs_queue_one_behind_the_other_and_close_ranks_over_a_removed_one() {
    let agent = TestAgent::start().await;
    let client = &agent.client;
    client
        .submit(&shell_job("leader", "sleep 0.5"))
        .await
        .unwrap();
    client
        .submit(&after("one", "echo one", "leader"))
        .await
        .unwrap();
    let two = client.submit(&after("two", "true", "leader")).await;
    assert_eq!(
        status_code(two.unwrap_err()),
        409,
        "only the last may be followed"
    );
    assert_eq!(client.job("two").await.unwrap(), None);
    for (id, leader) in [("three", "one"), ("four", "three")] {
        let info = client
            .submit(&after(id, &format!("echo {id}"), leader))
            .await;
        assert_eq!(info.unwrap().status, AgentJobStatus::Queued);
    }
    // Taken out of the middle: `four` now waits for `one`.
    client.remove("three").await.unwrap();

    let leader = wait_finished(client, "leader").await;
    let one = wait_finished(client, "one").await;
    let four = wait_finished(client, "four").await;
    assert!(one.started_at_ms >= leader.finished_at_ms.unwrap());
    assert!(four.started_at_ms >= one.finished_at_ms.unwrap());
    assert_eq!(read_logs(client, "four", 0).await, "four\n");
    assert_eq!(client.job("three").await.unwrap(), None);
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
async fn queued_jobs_start_in_order_after_the_agent_restarts_and_those_with_secrets_are_forgotten()
{
    let agent = TestAgent::start().await;
    agent
        .client
        .submit(&shell_job("leader", "sleep 30"))
        .await
        .unwrap();
    // Jobs with no environment (and no registry credentials): the journal holds all of them.
    let bare = |id: &str, script: &str, leader: &str| JobSubmit {
        env: Default::default(),
        ..after(id, script, leader)
    };
    agent
        .client
        .submit(&bare(
            "first",
            "echo after the restart; /bin/sleep 0.2",
            "leader",
        ))
        .await
        .unwrap();
    agent
        .client
        .submit(&bare("second", "echo after the restart", "first"))
        .await
        .unwrap();
    // A job with an environment, which is kept only in memory.
    let mut secret = after("secret", "echo $TOKEN", "second");
    secret
        .env
        .insert("TOKEN".to_string(), "hunter2-queued".to_string());
    agent.client.submit(&secret).await.unwrap();
    let agent = TestAgent::start_in(agent.stop().await).await;
    let client = &agent.client;
    let leader = client.job("leader").await.unwrap().unwrap();
    assert_eq!(leader.status, AgentJobStatus::Failed); // lost with the agent
                                                       // Its environment was kept only in memory: forgotten, for its submitter to send again.
    assert!(client.job("secret").await.unwrap().is_none());
    client.submit(&secret).await.unwrap();
    let first = wait_finished(client, "first").await;
    let second = wait_finished(client, "second").await;
    assert_eq!(first.status, AgentJobStatus::Done, "{first:?}");
    assert!(second.started_at_ms >= first.finished_at_ms.unwrap());
    assert_eq!(read_logs(client, "second", 0).await, "after the restart\n");
    let secret = wait_finished(client, "secret").await;
    assert_eq!(secret.status, AgentJobStatus::Done, "{secret:?}");
    assert_eq!(read_logs(client, "secret", 0).await, "hunter2-queued\n");
}

#[tokio::test]
async fn a_list_of_jobs_is_taken_in_order_up_to_the_first_refused() {
    let agent = TestAgent::start().await;
    let client = &agent.client;
    client
        .submit(&shell_job("head", "sleep 0.3; echo 1"))
        .await
        .unwrap();
    let queue = [
        after("second", "echo 2", "head"),
        after("third", "echo 3", "second"),
    ];
    let taken = client.submit_all(&queue).await.unwrap();
    let ids: Vec<&str> = taken.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["second", "third"]);
    assert!(taken.iter().all(|i| i.status == AgentJobStatus::Queued));
    let second = wait_finished(client, "second").await;
    let third = wait_finished(client, "third").await;
    assert_eq!(read_logs(client, "third", 0).await, "3\n");
    assert!(third.started_at_ms >= second.finished_at_ms.unwrap());

    // Sent again, the same list is answered with the jobs as they are (ids are idempotent).
    let again = client.submit_all(&queue).await.unwrap();
    assert!(again.iter().all(|i| i.status == AgentJobStatus::Done));

    // A job behind one the agent does not know is refused, and ends the request; the jobs
    // before it are taken, those after it are not.
    let refused = client
        .submit_all(&[
            shell_job("fourth", "echo 4"),
            after("fifth", "echo 5", "nobody"),
            shell_job("sixth", "echo 6"),
        ])
        .await
        .unwrap_err();
    assert_eq!(status_code(refused), 409);
    assert_eq!(
        wait_finished(client, "fourth").await.status,
        AgentJobStatus::Done
    );
    assert!(client.job("fifth").await.unwrap().is_none());
    assert!(client.job("sixth").await.unwrap().is_none());
}
