//! The agent driven the way the engine drives it, without the engine: a loop that follows
//! the agent's event stream and, each time a queued job starts, submits the next one behind
//! its queue's last job (`POST /api/jobs`), keeping two queues `DEPTH` jobs deep, for `N`
//! `true` jobs; vs the same `N` spawns run directly two at a time (the floor, measured
//! before and after each round). It has no store and no scheduler: what it measures beyond
//! the floor is the agent plus one request per job. With `DEPTH` ≥ `N`/2 every job is
//! submitted up front and only the event stream remains.
//! `cargo run --release -p dstack-backends --example agent_loop [N] [DEPTH]` (defaults: 1000,
//! 2, as the engine queues). Results go to BENCHMARKS.md.

mod common;

use std::collections::HashMap;
use std::time::Instant;

use dstack_core::agent::{AgentClient, AgentJobStatus};
use futures_util::StreamExt;

/// CPU seconds (user + system) process `pid` has used itself.
fn own_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    (ticks(11).unwrap_or(0.0) + ticks(12).unwrap_or(0.0)) / 100.0
}

/// The two queues of one round and the jobs submitted so far.
struct Queues {
    round: usize,
    submitted: usize,
    /// The last job of each queue.
    tails: [Option<String>; 2],
    /// The queue of each job.
    queue_of: HashMap<String, usize>,
}

impl Queues {
    /// Submits one job behind the last of queue `q`.
    async fn push(&mut self, client: &AgentClient, q: usize) {
        let id = format!("r{}-{}", self.round, self.submitted);
        let submit = common::sh_job(id.clone(), "true", self.tails[q].take());
        client.submit(&submit).await.expect("submitted");
        self.queue_of.insert(id.clone(), q);
        self.tails[q] = Some(id);
        self.submitted += 1;
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let depth: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2);
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut agent, client) = common::start_agent(dir.path()).await;
    for round in 0..3 {
        let floor = common::floor_sweep(n);
        let cpu = own_cpu_seconds(agent.id());
        let mut events = client.events().await.expect("event stream");
        let t = Instant::now();
        let mut queues = Queues {
            round,
            submitted: 0,
            tails: [None, None],
            queue_of: HashMap::new(),
        };
        for q in 0..2 {
            for _ in 0..=depth.min(n / 2) {
                queues.push(&client, q).await;
            }
        }
        let mut done = 0;
        while done < queues.submitted {
            let info = events
                .next()
                .await
                .expect("the stream goes on")
                .expect("an event");
            let Some(&q) = queues.queue_of.get(&info.id) else {
                continue; // a job of an earlier round
            };
            if info.status == AgentJobStatus::Running && queues.submitted < n {
                queues.push(&client, q).await;
            }
            if info.status.is_finished() {
                done += 1;
            }
        }
        let ran = t.elapsed();
        let agent_cpu = own_cpu_seconds(agent.id()) - cpu;
        let floor_after = common::floor_sweep(n);
        println!(
            "{done} jobs, queues {depth} deep: {:.3} s, ratio {:.2}x the floor (the mean of \
             the floors before and after: {:.3} s), the agent's own CPU {:.2} ms per job",
            ran.as_secs_f64(),
            ran.as_secs_f64() * 2.0 / (floor + floor_after).as_secs_f64(),
            (floor + floor_after).as_secs_f64() / 2.0,
            agent_cpu * 1e3 / done as f64
        );
    }
    let _ = agent.kill();
    let _ = agent.wait();
}
