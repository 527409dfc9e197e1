//! Container jobs vs `podman run` of the same image, side by side:
//! `container_latency DOCKER_HOST IMAGE [N]` (default 20). `bench/container_latency.sh` starts a
//! podman API service and builds the image first.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dstack_backends::local::{find_agent_binary, LocalBackend};
use dstack_core::config::parse;
use dstack_core::engine::{ApplyOptions, EngineOptions};
use dstack_core::model::RunStatus;
use dstack_core::{Client, ClientOptions};

fn report(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    println!(
        "{label:<44} p50 {:>8.1} ms   p99 {:>8.1} ms",
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let docker_host = args
        .next()
        .expect("usage: container_latency DOCKER_HOST IMAGE [N]");
    let image = args
        .next()
        .expect("usage: container_latency DOCKER_HOST IMAGE [N]");
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);

    let mut direct = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let status = Command::new("podman")
            .args(["run", "--rm", &image, "true"])
            .status()
            .expect("podman");
        assert!(status.success());
        direct.push(t.elapsed());
    }
    report("podman run --rm IMAGE true", direct);

    let home = tempfile::tempdir().expect("temp dir");
    let backend = LocalBackend::new(
        home.path(),
        find_agent_binary().expect("dstack-agent built"),
    )
    .with_container_engine(docker_host);
    let client = Client::open(ClientOptions {
        home: home.path().to_path_buf(),
        backends: vec![Arc::new(backend)],
        engine: EngineOptions::default(),
    })
    .await
    .expect("client");
    let task = format!(
        "type: task\nimage: {image}\ncommands: ['true']\nresources: {{cpu: 1.., memory: 0.1GB.., disk: 1GB..}}\n"
    );
    let config = parse(&task, "bench").expect("valid");
    let mut to_running = Vec::with_capacity(n);
    let mut to_done = Vec::with_capacity(n);
    for _ in 0..n {
        let mut changes = client.engine().subscribe();
        let t = Instant::now();
        let run = client
            .runs()
            .apply(config.clone(), ApplyOptions::default())
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
    report("dstack-rs: submit -> running (container)", to_running);
    report("dstack-rs: submit -> done (container)", to_done);
}
