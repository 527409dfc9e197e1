//! Container jobs vs `podman run` of the same image, side by side:
//! `container_latency DOCKER_HOST IMAGE [N]` (default 20). `bench/container_latency.sh` starts a
//! podman API service and builds the image first.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use dstack_backends::local::{find_agent_binary, LocalBackend};
use dstack_core::config::parse;
use dstack_core::engine::{ApplyOptions, EngineOptions};
use dstack_core::{Client, ClientOptions};

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
    common::report("podman run --rm IMAGE true", direct);

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
    let (to_running, to_done) =
        common::sequential_runs(&client, &config, ApplyOptions::default, n).await;
    common::report("dstack-rs: submit -> running (container)", to_running);
    common::report("dstack-rs: submit -> done (container)", to_done);
}
