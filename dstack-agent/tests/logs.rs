//! Reading and following job output, and the event stream.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::{read_logs, shell_job, wait_finished, wait_for_output, within, TestAgent};
use dstack_core::agent::{AgentJobStatus, EVENTS_SILENCE};
use futures_util::StreamExt;

#[tokio::test]
async fn logs_are_read_from_an_offset() {
    let agent = TestAgent::start().await;
    agent
        .client
        .submit(&shell_job("off", "printf 'hello world'"))
        .await
        .unwrap();
    wait_finished(&agent.client, "off").await;
    assert_eq!(read_logs(&agent.client, "off", 0).await, "hello world");
    assert_eq!(read_logs(&agent.client, "off", 6).await, "world");
    assert_eq!(read_logs(&agent.client, "off", 11).await, "");
    assert_eq!(read_logs(&agent.client, "off", 1000).await, "");
    let index = std::fs::read_to_string(agent.state_dir().join("jobs/off/output.idx")).unwrap();
    assert!(index.starts_with("0 "), "{index}");
}

#[tokio::test]
async fn following_gets_all_output_of_a_running_job_and_ends_at_exit() {
    let agent = TestAgent::start().await;
    let script = "for i in 1 2 3 4 5; do echo line $i; sleep 0.2; done";
    agent
        .client
        .submit(&shell_job("slow", script))
        .await
        .unwrap();
    let mut stream = agent.client.logs("slow", 0, true).await.unwrap();
    let mut out = Vec::new();
    let mut chunks = 0;
    within("the followed output to end", async {
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk.unwrap());
            chunks += 1;
        }
    })
    .await;
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "line 1\nline 2\nline 3\nline 4\nline 5\n"
    );
    assert!(chunks > 1, "the output arrived as it was printed");
    let info = agent.client.job("slow").await.unwrap().unwrap();
    assert_eq!(info.status, AgentJobStatus::Done);

    // Following from an offset of a finished job returns the rest and ends.
    let mut rest = String::new();
    let mut stream = agent.client.logs("slow", 21, true).await.unwrap();
    while let Some(chunk) = stream.next().await {
        rest.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert_eq!(rest, "line 4\nline 5\n");
}

/// Peak resident memory of this process (the agent runs in it) in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_output_is_streamed_fully_with_bounded_memory() {
    const SIZE: u64 = 200_000_000;
    // All of it kept on disk (by default only the last 64 MiB are).
    let limits = dstack_agent::Limits {
        log_file_bytes: SIZE,
        ..Default::default()
    };
    let agent = TestAgent::start_with(tempfile::tempdir().unwrap(), limits).await;
    let job = shell_job("huge", &format!("head -c {SIZE} /dev/zero"));
    agent.client.submit(&job).await.unwrap();
    let mut stream = agent.client.logs("huge", 0, true).await.unwrap();
    let mut received = 0u64;
    tokio::time::timeout(std::time::Duration::from_secs(120), async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.unwrap();
            assert!(chunk.iter().all(|b| *b == 0));
            received += chunk.len() as u64;
        }
    })
    .await
    .expect("the whole output within two minutes");
    assert_eq!(received, SIZE);
    let info = agent.client.job("huge").await.unwrap().unwrap();
    assert_eq!((info.status, info.log_bytes), (AgentJobStatus::Done, SIZE));
    let peak = peak_rss();
    assert!(
        peak < SIZE / 2,
        "peak memory {peak} bytes: the output was buffered"
    );
}

#[tokio::test]
async fn events_report_jobs_then_their_changes() {
    let agent = TestAgent::start().await;
    agent
        .client
        .submit(&shell_job("before", "true"))
        .await
        .unwrap();
    wait_finished(&agent.client, "before").await;

    let mut events = agent.client.events().await.unwrap();
    let first = within("the snapshot", events.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (first.id.as_str(), first.status),
        ("before", AgentJobStatus::Done)
    );

    agent
        .client
        .submit(&shell_job("watched", "echo hi"))
        .await
        .unwrap();
    // Only the changes of the new job matter (a late echo of the first one's is harmless).
    let mut watched = Vec::new();
    within("the start and finish events", async {
        while watched.len() < 2 {
            let event = events.next().await.unwrap().unwrap();
            if event.id == "watched" {
                watched.push(event);
            }
        }
    })
    .await;
    assert_eq!(watched[0].status, AgentJobStatus::Running);
    let finished = watched.pop().unwrap();
    assert_eq!(finished.status, AgentJobStatus::Done);
    assert_eq!(finished.log_bytes, 3);
    assert_eq!(Some(finished), agent.client.job("watched").await.unwrap());
}

#[tokio::test]
async fn a_quiet_event_stream_stays_open() {
    let agent = TestAgent::start().await;
    let mut events = agent.client.events().await.unwrap();
    // Nothing to report for longer than a client waits for a line: the agent's heartbeats
    // keep the stream open (and the client does not report them).
    let quiet = tokio::time::timeout(EVENTS_SILENCE + Duration::from_secs(2), events.next()).await;
    assert!(quiet.is_err(), "the quiet stream yielded {quiet:?}");
    agent
        .client
        .submit(&shell_job("later", "true"))
        .await
        .unwrap();
    let event = within("an event after the quiet", events.next()).await;
    assert_eq!(event.unwrap().unwrap().id, "later");
}

#[tokio::test]
async fn a_job_that_prints_nothing_creates_no_files() {
    let agent = TestAgent::start().await;
    agent
        .client
        .submit(&shell_job("quiet", "true"))
        .await
        .unwrap();
    let info = wait_finished(&agent.client, "quiet").await;
    assert_eq!((info.status, info.log_bytes), (AgentJobStatus::Done, 0));
    assert_eq!(read_logs(&agent.client, "quiet", 0).await, "");
    assert_eq!(read_logs(&agent.client, "quiet", 5).await, "");
    let jobs = agent.state_dir().join("jobs");
    assert!(!jobs.join("quiet").exists());
    assert_eq!(std::fs::read_dir(&jobs).unwrap().count(), 0);

    // Output creates the job's directory, private to the user.
    agent
        .client
        .submit(&shell_job("loud", "echo hi"))
        .await
        .unwrap();
    wait_finished(&agent.client, "loud").await;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&jobs.join("loud")), 0o700);
    assert_eq!(mode(&jobs.join("loud/output.log")), 0o600);
    assert_eq!(mode(&jobs.join("loud/output.idx")), 0o600);
    assert_eq!(mode(&agent.state_dir().join("jobs.journal")), 0o600);
}

#[tokio::test]
async fn following_gets_output_that_starts_late() {
    let agent = TestAgent::start().await;
    agent
        .client
        .submit(&shell_job("late", "sleep 0.5; echo late"))
        .await
        .unwrap();
    let mut stream = agent.client.logs("late", 0, true).await.unwrap();
    let mut out = Vec::new();
    within("the followed output to end", async {
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk.unwrap());
        }
    })
    .await;
    assert_eq!(String::from_utf8(out).unwrap(), "late\n");
    let info = agent.client.job("late").await.unwrap().unwrap();
    assert_eq!((info.status, info.log_bytes), (AgentJobStatus::Done, 5));
}

#[tokio::test]
async fn a_job_output_beyond_the_log_cap_keeps_only_its_last_files() {
    let limits = dstack_agent::Limits {
        log_file_bytes: 64 * 1024,
        log_files: 2,
        ..Default::default()
    };
    let agent = TestAgent::start_with(tempfile::tempdir().unwrap(), limits).await;
    // 1 MiB of numbered lines, then a last line.
    let script = "seq -w 1 131072; echo the end";
    agent
        .client
        .submit(&shell_job("loud", script))
        .await
        .unwrap();
    let info = wait_finished(&agent.client, "loud").await;
    let total = 131072 * 7 + 8;
    assert_eq!(info.log_bytes, total);
    let dir = agent.state_dir().join("jobs/loud");
    let on_disk: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(
        on_disk <= 2 * 64 * 1024,
        "{on_disk} bytes of output on disk"
    );
    // Reading from the start gets the oldest output kept, at its offset in the whole output.
    let kept = read_logs(&agent.client, "loud", 0).await;
    assert_eq!(kept.len() as u64, on_disk);
    assert!(
        kept.ends_with("131072\nthe end\n"),
        "{}",
        &kept[kept.len() - 20..]
    );
    let tail = read_logs(&agent.client, "loud", total - 8).await;
    assert_eq!(tail, "the end\n");
    // Following from the start while it writes gets the same bytes.
    let job = shell_job("loud2", script);
    agent.client.submit(&job).await.unwrap();
    let followed = wait_for_output(&agent.client, "loud2", "the end\n").await;
    assert!(followed.ends_with("131072\nthe end\n"));
}
