//! The agent's own throughput, without the engine: `N` `true` jobs submitted straight to a
//! fresh agent as two queues (each job queued behind the one before it), held back until all
//! are submitted, vs the same `N` spawns run directly two at a time. This is the most a sweep
//! through the engine could get on two slots, since the agent starts each queued job itself.
//! `cargo run --release -p dstack-backends --example agent_throughput [N]` (default 1000).
//! Results go to BENCHMARKS.md.

mod common;

use std::time::{Duration, Instant};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut agent, client) = common::start_agent(dir.path()).await;

    let floor = common::floor_sweep(n);
    println!(
        "floor: {n} spawns, two at a time      {:>8.3} s",
        floor.as_secs_f64()
    );

    // Each queue starts behind a job that holds it until everything is submitted.
    const HOLD: Duration = Duration::from_millis(500);
    let hold = format!("sleep {}", HOLD.as_secs_f64());
    let mut tails: Vec<String> = Vec::new();
    for queue in 0..2 {
        let head = common::sh_job(format!("hold-{queue}"), &hold, None);
        client.submit(&head).await.expect("submitted");
        tails.push(head.id);
    }
    let held_at = Instant::now();
    for i in 0..n {
        let tail = &mut tails[i % 2];
        let next = common::sh_job(format!("job-{i}"), "true", Some(tail.clone()));
        client.submit(&next).await.expect("submitted");
        *tail = next.id;
    }
    let submitted = held_at.elapsed();
    assert!(submitted < HOLD, "submitting took longer than the hold");
    for tail in &tails {
        loop {
            let info = client.job(tail).await.expect("job").expect("known");
            if info.status.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let ran = held_at.elapsed().saturating_sub(HOLD);
    println!(
        "agent: {n} queued `true` jobs, two queues {:>8.3} s (submitted in {:.3} s)",
        ran.as_secs_f64(),
        submitted.as_secs_f64()
    );
    println!(
        "ratio: {:.2}x the floor",
        ran.as_secs_f64() / floor.as_secs_f64()
    );
    let _ = agent.kill();
    let _ = agent.wait();
}
