//! Submit→running latency of tasks on an idle SSH fleet host (and the floor: one command over
//! the same kind of pooled SSH connection). `bench/ssh_latency.sh` sets up a host in a network
//! namespace and runs: `ssh_latency FLEET_FILE [N]` (default 200 sequential runs).

mod common;

use std::sync::Arc;
use std::time::Instant;

use dstack_backends::local::{find_agent_binary, LocalBackend};
use dstack_backends::ssh::{KnownHosts, SshCompute, SshSession, SshTarget};
use dstack_core::config::{parse, Configuration};
use dstack_core::engine::{ApplyOptions, EngineOptions};
use dstack_core::{Client, ClientOptions};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let file = args.next().expect("usage: ssh_latency FLEET_FILE [N]");
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    let yaml = std::fs::read_to_string(&file).expect("fleet file");
    let fleet = parse(&yaml, &file).expect("valid fleet");
    let Configuration::Fleet(spec) = &fleet else {
        panic!("{file} is not a fleet")
    };
    let name = spec.name.clone().expect("the fleet has a name");
    let home = tempfile::tempdir().expect("temp dir");
    let agent = find_agent_binary().expect("dstack-agent built");
    let backends: Vec<Arc<dyn dstack_core::backend::Compute>> = vec![
        Arc::new(LocalBackend::new(home.path(), agent.clone())),
        Arc::new(SshCompute::new(KnownHosts::in_home(home.path()), agent)),
    ];
    let client = Client::open(ClientOptions {
        home: home.path().to_path_buf(),
        backends,
        engine: EngineOptions::default(),
    })
    .await
    .expect("client");
    let t = Instant::now();
    let (_, instances) = client
        .fleets()
        .apply(&fleet, &|i, step| eprintln!("{}: {step}", i.name))
        .await
        .expect("fleet");
    println!(
        "fleet apply (1 host, agent upload)        {:>8.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let instance = instances.first().expect("the host joined");

    // Floor: a command over one pooled SSH connection.
    let target: SshTarget = serde_json::from_value(instance.backend_data.clone()).expect("target");
    let session = SshSession::connect(
        &target,
        &KnownHosts::in_home(home.path()),
        Default::default(),
    )
    .await
    .expect("ssh");
    let mut floor = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        session.run("true", None).await.expect("exec");
        floor.push(t.elapsed());
    }
    common::report("floor: `true` over a pooled SSH session", floor);

    let task = format!(
        "type: task\nfleets: [{name}]\nshell: sh\ncommands: ['true']\n\
         resources: {{cpu: 1.., memory: 0.1GB.., disk: 1GB..}}\n"
    );
    let config = parse(&task, "bench").expect("valid task");
    let (to_running, to_done) =
        common::sequential_runs(&client, &config, ApplyOptions::default, n).await;
    common::report("ssh host: submit -> running", to_running);
    common::report("ssh host: submit -> done", to_done);
    client.fleets().delete(&name, true).await.expect("delete");
}
