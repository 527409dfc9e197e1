//! The job journal across agent restarts: finished jobs are still reported, removed jobs stay
//! removed, a torn last line is ignored, and the journal is compacted on start.

mod common;

use std::io::Write;
use std::path::Path;

use common::{read_logs, shell_job, wait_finished, TestAgent};
use dstack_core::agent::AgentJobStatus;

fn journal_lines(journal: &Path) -> usize {
    std::fs::read_to_string(journal).unwrap().lines().count()
}

#[tokio::test]
async fn jobs_survive_restarts_through_the_journal() {
    let agent = TestAgent::start().await;
    let journal = agent.state_dir().join("jobs.journal");
    let jobs = [
        ("done", "echo fine"),
        ("failed", "echo oops; exit 3"),
        ("quiet", "true"),
        ("removed", "echo bye"),
    ];
    for (id, script) in jobs {
        agent.client.submit(&shell_job(id, script)).await.unwrap();
        wait_finished(&agent.client, id).await;
    }
    agent.client.remove("removed").await.unwrap();
    let before = agent.client.jobs().await.unwrap();
    assert_eq!(before.len(), 3);
    // A start and an end per job, and a tombstone.
    assert_eq!(journal_lines(&journal), 2 * jobs.len() + 1);
    let dir = agent.stop().await;

    // The agent crashed in the middle of appending a record.
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&journal)
        .unwrap();
    file.write_all(br#"{"info":{"id":"torn","status":"#)
        .unwrap();
    drop(file);

    let agent = TestAgent::start_in(dir).await;
    assert_eq!(journal_lines(&journal), before.len(), "compacted");
    assert_eq!(agent.client.jobs().await.unwrap(), before);
    let done = agent.client.job("done").await.unwrap().unwrap();
    assert_eq!(
        (done.status, done.exit_status, done.log_bytes),
        (AgentJobStatus::Done, Some(0), 5)
    );
    assert_eq!(read_logs(&agent.client, "done", 0).await, "fine\n");
    let failed = agent.client.job("failed").await.unwrap().unwrap();
    assert_eq!(
        (failed.status, failed.exit_status),
        (AgentJobStatus::Failed, Some(3))
    );
    assert_eq!(read_logs(&agent.client, "failed", 0).await, "oops\n");
    assert_eq!(read_logs(&agent.client, "quiet", 0).await, "");
    assert_eq!(agent.client.job("removed").await.unwrap(), None);
    assert_eq!(agent.client.job("torn").await.unwrap(), None);

    // Removing after a restart sticks too, and a new job appends to the compacted journal.
    agent.client.remove("quiet").await.unwrap();
    agent
        .client
        .submit(&shell_job("after", "echo again"))
        .await
        .unwrap();
    wait_finished(&agent.client, "after").await;
    let before = agent.client.jobs().await.unwrap();
    let agent = TestAgent::start_in(agent.stop().await).await;
    assert_eq!(agent.client.jobs().await.unwrap(), before);
    assert_eq!(agent.client.job("quiet").await.unwrap(), None);
    assert_eq!(read_logs(&agent.client, "after", 0).await, "again\n");
    assert_eq!(journal_lines(&journal), 3);
}

#[tokio::test]
async fn the_journal_never_holds_a_job_environment_or_registry_credentials() {
    let agent = TestAgent::start().await;
    let journal = agent.state_dir().join("jobs.journal");
    agent
        .client
        .submit(&shell_job("leader", "sleep 30"))
        .await
        .unwrap();
    let mut queued = shell_job("queued", "echo $API_KEY");
    queued.after = Some("leader".to_string());
    queued
        .env
        .insert("API_KEY".to_string(), "sk-live-0123456789".to_string());
    queued.container = Some(dstack_core::agent::ContainerSpec {
        image: "example.com/private:1".to_string(),
        registry_auth: Some(("robot".to_string(), "registry-pa55word".to_string())),
        ..Default::default()
    });
    agent.client.submit(&queued).await.unwrap();
    let mut running = shell_job("running", "sleep 30");
    running
        .env
        .insert("DB_PASSWORD".to_string(), "db-pa55word".to_string());
    agent.client.submit(&running).await.unwrap();
    let text = std::fs::read_to_string(&journal).unwrap();
    for secret in ["sk-live-0123456789", "registry-pa55word", "db-pa55word"] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    assert!(text.contains("queued"));
    // Nor after compaction.
    let agent = TestAgent::start_in(agent.stop().await).await;
    let text = std::fs::read_to_string(&journal).unwrap();
    assert!(!text.contains("sk-live-0123456789"), "{text}");
    agent.shut_down().await;
}
