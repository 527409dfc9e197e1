//! What the agent bounds: connections (how many at once, how long a request's head may take)
//! and how much of a job's metrics file it serves.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use common::{eventually, shell_job, wait_finished, within, TestAgent};
use dstack_agent::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// How many connections the agent listening on `socket` has accepted and not closed: this
/// process's sockets that `/proc/net/unix` lists under that path, besides the listener.
fn accepted(socket: &Path) -> usize {
    let ours: HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let socket = socket.display().to_string();
    std::fs::read_to_string("/proc/net/unix")
        .unwrap()
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // Num RefCount Protocol Flags Type St Inode Path; St 03: connected.
            fields.len() == 8
                && fields[7] == socket
                && fields[5] == "03"
                && ours.contains(fields[6])
        })
        .count()
}

/// Opens a connection and sends half a request head.
async fn half_open(socket: &Path) -> UnixStream {
    let mut stream = UnixStream::connect(socket).await.unwrap();
    stream
        .write_all(b"GET /api/jobs HTTP/1.1\r\nhost: a\r\n")
        .await
        .unwrap();
    stream
}

/// Waits until the agent closes `stream` (it reads the end, or an error).
async fn closed(mut stream: UnixStream) {
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest).await;
}

#[tokio::test]
async fn half_open_requests_neither_block_others_nor_stay_open() {
    let limits = Limits {
        header_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let agent = TestAgent::start_with(tempfile::tempdir().unwrap(), limits).await;
    let mut held = Vec::new();
    for _ in 0..600 {
        held.push(half_open(&agent.socket()).await);
    }
    // A fresh client is served at once.
    within(
        "an answer beside 600 half-open requests",
        agent.client.jobs(),
    )
    .await
    .unwrap();
    // And the half-open requests are closed once the header timeout has passed.
    within("the half-open requests to be closed", async {
        for stream in held {
            closed(stream).await;
        }
    })
    .await;
    eventually("the agent to let go of them", || {
        accepted(&agent.socket()) <= 1
    })
    .await;
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_until_one_closes() {
    let limits = Limits {
        max_connections: 4,
        header_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let agent = TestAgent::start_with(tempfile::tempdir().unwrap(), limits).await;
    let socket = agent.socket();
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(half_open(&socket).await);
    }
    // Every one is served in the end, never more than the cap at once.
    let mut most = 0;
    within("every connection to be closed", async {
        let mut waiting = Box::pin(async {
            for stream in held {
                closed(stream).await;
            }
        });
        loop {
            most = most.max(accepted(&socket));
            tokio::select! {
                () = &mut waiting => break,
                () = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
    })
    .await;
    assert!(most <= 4, "{most} connections at once");
    assert!(most >= 1);
    within("an answer", agent.client.jobs()).await.unwrap();
}

#[tokio::test]
async fn only_the_tail_of_a_big_metrics_file_is_served() {
    let limits = Limits {
        metrics_bytes: 64 * 1024,
        ..Limits::default()
    };
    let agent = TestAgent::start_with(tempfile::tempdir().unwrap(), limits).await;
    // 50 MB of metrics lines.
    let script = r#"yes '{"loss": 0.123456789, "step": 1234567890, "pad": "xxxxxxxxxxxxxxxxxx"}' | head -n 650000 > "$DSTACK_METRICS_FILE"; echo '{"last": true}' >> "$DSTACK_METRICS_FILE""#;
    agent
        .client
        .submit(&shell_job("metered", script))
        .await
        .unwrap();
    assert_eq!(
        wait_finished(&agent.client, "metered").await.exit_status,
        Some(0)
    );
    let metrics = agent.client.metrics("metered").await.unwrap();
    assert!(metrics.len() <= 64 * 1024, "{} bytes served", metrics.len());
    let text = std::str::from_utf8(&metrics).unwrap();
    assert!(text.ends_with("{\"last\": true}\n"), "{text}");
    // Whole lines only.
    for line in text.lines() {
        serde_json::from_str::<serde_json::Value>(line).unwrap();
    }
}
