//! Engine latency and throughput on the local backend vs the floor of spawning processes
//! directly. `cargo run --release -p dstack-backends --example engine_latency [N] [SWEEP]`
//! (defaults: 200 sequential runs, a sweep of 1000 submitted at once as sweeps do, then one
//! run at a time). Results go to BENCHMARKS.md.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use dstack_backends::local::{find_agent_binary, LocalBackend};
use dstack_core::config::parse;
use dstack_core::engine::{ApplyOptions, EngineOptions};
use dstack_core::model::RunStatus;
use dstack_core::{Client, ClientOptions};

const TASK: &str =
    "type: task\nshell: sh\ncommands: ['true']\nresources: {cpu: CPUS, memory: 0.1GB.., disk: 1GB..}\n";

/// CPU seconds (user + system) used so far by process `pid` and the children it has waited
/// for, from `/proc/<pid>/stat` (clock ticks of 10 ms).
pub fn cpu_seconds(pid: &str) -> f64 {
    let (own, children) = cpu_split(pid);
    own + children
}

/// CPU seconds (user + system) used so far by process `pid` itself, and by the children it
/// has waited for.
pub fn cpu_split(pid: &str) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime, stime, cutime, cstime are fields 14-17, i.e. 11-14 after the state.
    let seconds = |skip: usize| -> f64 {
        let ticks: f64 = fields
            .iter()
            .skip(skip)
            .take(2)
            .filter_map(|f| f.parse::<f64>().ok())
            .sum();
        ticks / 100.0
    };
    (seconds(11), seconds(13))
}

/// Idle and total clock ticks of all processors so far, from `/proc/stat`.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...: idle is the 4th, iowait the 5th.
    let idle = ticks.iter().skip(3).take(2).sum();
    (idle, ticks.iter().sum())
}

/// The task id of this process's thread named `name` (the engine's own thread is
/// `dstack-engine`), if any.
fn thread_named(name: &str) -> Option<String> {
    std::fs::read_dir("/proc/self/task")
        .ok()?
        .find_map(|entry| {
            let tid = entry.ok()?.file_name().into_string().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).ok()?;
            (comm.trim() == name).then_some(tid)
        })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    let sweep: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let home = tempfile::tempdir().expect("temp dir");
    let backend = LocalBackend::new(
        home.path(),
        find_agent_binary().expect("dstack-agent built"),
    );
    let options = ClientOptions {
        home: home.path().to_path_buf(),
        backends: vec![Arc::new(backend)],
        engine: EngineOptions::default(),
    };
    let client = Client::open(options).await.expect("client");
    // BENCH_CPU sets the task's `cpu:` (default `1..`: two at a time on two cores).
    let task = TASK.replace(
        "CPUS",
        &std::env::var("BENCH_CPU").unwrap_or_else(|_| "1..".into()),
    );
    let config = parse(&task, "bench").expect("valid");
    let apply_opts = || ApplyOptions {
        client_dir: Some("/tmp".into()),
        client_env: Some(Default::default()),
        ..Default::default()
    };

    let floor: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            common::spawn_true();
            t.elapsed()
        })
        .collect();
    let floor_p50 = common::report("floor: spawn `sh -c true`", floor);

    let (to_running, to_done) = common::sequential_runs(&client, &config, apply_opts, n).await;
    let running_p50 = common::report("engine: submit -> running", to_running);
    common::report("engine: submit -> done", to_done);
    println!(
        "overhead over the floor (p50, submit -> running): {:.2} ms",
        (running_p50.as_secs_f64() - floor_p50.as_secs_f64()) * 1e3
    );

    // The floor is measured again after each sweep, and each sweep compared with the mean
    // of the floors before and after it: the machine's speed drifts (a VM's by ±15% within
    // minutes), and bracketing keeps the drift out of the ratio.
    let mut floor_sweep = common::floor_sweep(sweep);

    let agent_pid = std::fs::read_to_string(home.path().join("agent/agent.pid"))
        .map(|p| p.trim().to_string())
        .unwrap_or_default();
    println!(
        "floor: {sweep} spawns, two at a time      {:>8.3} s",
        floor_sweep.as_secs_f64()
    );
    // A sweep as sweeps submit it (`apply_all`: one transaction), then the same number of
    // runs applied one at a time.
    // The engine's own thread, apart from the client's threads in the same process.
    let engine_thread = thread_named("dstack-engine")
        .map(|tid| format!("self/task/{tid}"))
        .unwrap_or_default();
    for batch in [true, false] {
        let (engine_cpu, agent_cpu) = (cpu_seconds("self"), cpu_seconds(&agent_pid));
        let agent_own = cpu_split(&agent_pid).0;
        let thread_cpu = cpu_seconds(&engine_thread);
        let (idle_before, total_before) = machine_ticks();
        let t = Instant::now();
        let runs = if batch {
            let items = (0..sweep).map(|_| (config.clone(), apply_opts())).collect();
            client.runs().apply_all(items).await.expect("apply")
        } else {
            let mut runs = Vec::with_capacity(sweep);
            for _ in 0..sweep {
                let run = client.runs().apply(config.clone(), apply_opts()).await;
                runs.push(run.expect("apply"));
            }
            runs
        };
        let submitted = t.elapsed();
        // The last trial first: trials start in order, so by the time it is done the others
        // mostly are too, and the client is woken once rather than once per trial.
        for run in runs.iter().rev() {
            assert_eq!(run.wait().await.expect("wait").status, RunStatus::Done);
        }
        let engine_sweep = t.elapsed();
        let (idle_after, total_after) = machine_ticks();
        let per_task = |before: f64, of: &str| (cpu_seconds(of) - before) * 1e3 / sweep as f64;
        let agent_own_ms = (cpu_split(&agent_pid).0 - agent_own) * 1e3 / sweep as f64;
        let (engine_ms, thread_ms, agent_ms) = (
            per_task(engine_cpu, "self"),
            per_task(thread_cpu, &engine_thread),
            per_task(agent_cpu, &agent_pid),
        );
        let how = if batch { "at once" } else { "one by one" };
        println!(
            "engine: sweep of {sweep} `true` tasks ({how}: submitted in {:.3} s) {:>8.3} s",
            submitted.as_secs_f64(),
            engine_sweep.as_secs_f64()
        );
        let floor_cpu = cpu_split("self");
        let floor_after = common::floor_sweep(sweep);
        let floor_cpu_after = cpu_split("self");
        let per_spawn = |after: f64, before: f64| (after - before) * 1e3 / sweep as f64;
        println!(
            "floor again after the sweep               {:>8.3} s (CPU per spawn: {:.2} ms, \
             {:.2} ms of it in the processes)",
            floor_after.as_secs_f64(),
            per_spawn(
                floor_cpu_after.0 + floor_cpu_after.1,
                floor_cpu.0 + floor_cpu.1
            ),
            per_spawn(floor_cpu_after.1, floor_cpu.1)
        );
        let floor_mean = (floor_sweep + floor_after) / 2;
        println!(
            "ratio: {:.2}x the floor (the mean of the floors before and after: {:.3} s)",
            engine_sweep.as_secs_f64() / floor_mean.as_secs_f64(),
            floor_mean.as_secs_f64()
        );
        floor_sweep = floor_after;
        println!(
            "CPU per task: engine process {:.2} ms (its engine thread {:.2} ms), agent {:.2} ms \
             (its own {:.2} ms, its jobs' processes {:.2} ms)",
            engine_ms,
            thread_ms,
            agent_ms,
            agent_own_ms,
            agent_ms - agent_own_ms
        );
        println!(
            "machine idle during the sweep: {:.0}%",
            (idle_after - idle_before) as f64 * 100.0 / (total_after - total_before).max(1) as f64
        );
    }
    let _ = std::process::Command::new("kill").arg(&agent_pid).status();
}
