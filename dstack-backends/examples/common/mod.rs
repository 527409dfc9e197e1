//! Measuring helpers shared by the latency examples.

// Each example uses some of these helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use dstack_backends::local::{find_agent_binary, LocalBackend};
use dstack_backends::ssh::{KnownHosts, SshCompute};
use dstack_core::agent::{AgentClient, JobSubmit};
use dstack_core::config::Configuration;
use dstack_core::engine::{ApplyOptions, EngineOptions};
use dstack_core::model::{Instance, RunStatus};
use dstack_core::{Client, ClientOptions};

/// A client of an engine in this process (a state directory of its own, this machine and SSH
/// hosts) that has applied the fleet in file `file`: the client, the fleet's name, the
/// instances that joined, and the state directory (removed when dropped).
pub async fn ssh_fleet(file: &str) -> (Client, String, Vec<Instance>, tempfile::TempDir) {
    let yaml = std::fs::read_to_string(file).expect("fleet file");
    let fleet = dstack_core::config::parse(&yaml, file).expect("valid fleet");
    let Configuration::Fleet(spec) = &fleet else {
        panic!("{file} is not a fleet")
    };
    let name = spec.name.clone().expect("the fleet has a name");
    let home = tempfile::tempdir().expect("temp dir");
    let agent = find_agent_binary().expect("dstack-agent built");
    let backends: Vec<std::sync::Arc<dyn dstack_core::backend::Compute>> = vec![
        std::sync::Arc::new(LocalBackend::new(home.path(), agent.clone())),
        std::sync::Arc::new(SshCompute::new(KnownHosts::in_home(home.path()), agent)),
    ];
    let client = Client::open(ClientOptions {
        home: home.path().to_path_buf(),
        backends,
        engine: EngineOptions::default(),
    })
    .await
    .expect("client");
    let (_, instances) = client
        .fleets()
        .apply(&fleet, &|i, step| eprintln!("{}: {step}", i.name))
        .await
        .expect("fleet");
    (client, name, instances, home)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Spawns `sh -c true` directly and waits for it: the floor of starting a task.
pub fn spawn_true() {
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg("true")
        .status()
        .expect("sh runs");
    assert!(status.success());
}

/// The time `n` spawns of `sh -c true` take when run directly two at a time (one thread
/// each): the floor of a sweep on two slots.
pub fn floor_sweep(n: usize) -> Duration {
    let t = std::time::Instant::now();
    let threads: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(move || (0..n / 2).for_each(|_| spawn_true())))
        .collect();
    threads.into_iter().for_each(|h| h.join().expect("thread"));
    t.elapsed()
}

/// Prints p50 and p99 of `samples` and returns the p50.
pub fn report(label: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let p50 = percentile(&samples, 0.5);
    println!(
        "{label:<44} p50 {:>8.2} ms   p99 {:>8.2} ms",
        p50.as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3
    );
    p50
}

/// Applies `config` `n` times, one run after the other; returns the submit→running and
/// submit→done times (a run that finishes before it is seen running counts as running then).
pub async fn sequential_runs(
    client: &Client,
    config: &Configuration,
    options: impl Fn() -> ApplyOptions,
    n: usize,
) -> (Vec<Duration>, Vec<Duration>) {
    let mut to_running = Vec::with_capacity(n);
    let mut to_done = Vec::with_capacity(n);
    for _ in 0..n {
        let mut changes = client.engine().unwrap().subscribe();
        let t = Instant::now();
        let run = client
            .runs()
            .apply(config.clone(), options())
            .await
            .expect("apply");
        loop {
            let change = changes.recv().await.expect("changes");
            if change.run_id == run.id()
                && matches!(
                    change.status,
                    RunStatus::Running | RunStatus::Done | RunStatus::Terminating
                )
            {
                to_running.push(t.elapsed());
                break;
            }
        }
        assert_eq!(run.wait().await.expect("wait").status, RunStatus::Done);
        to_done.push(t.elapsed());
    }
    (to_running, to_done)
}

/// Starts an agent (the built `dstack-agent`) with its socket and state under `dir`, and
/// waits until it answers.
pub async fn start_agent(dir: &Path) -> (std::process::Child, AgentClient) {
    let socket = dir.join("agent.sock");
    let agent = std::process::Command::new(find_agent_binary().expect("dstack-agent built"))
        .arg("serve")
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("agent"))
        .spawn()
        .expect("agent starts");
    let client = AgentClient::unix(&socket);
    while client.healthcheck().await.is_err() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let client = AgentClient::local(&socket, &dir.join("agent")).expect("the agent's token");
    (agent, client)
}

/// A job of `script` run by `/bin/sh`, queued behind `after`.
pub fn sh_job(id: String, script: &str, after: Option<String>) -> JobSubmit {
    JobSubmit {
        name: id.clone(),
        id,
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: BTreeMap::from([("PATH".to_string(), "/usr/bin:/bin".to_string())]),
        working_dir: "/tmp".into(),
        max_duration_secs: None,
        mpi_hostfile: None,
        container: None,
        after,
        archives: Vec::new(),
        clone: None,
        artifacts: Vec::new(),
    }
}
