//! Submit→running latency of tasks on an idle SSH fleet host (and the floor: one command over
//! the same kind of pooled SSH connection). `bench/ssh_latency.sh` sets up a host in a network
//! namespace and runs: `ssh_latency FLEET_FILE [N]` (default 200 sequential runs).

mod common;

use std::time::Instant;

use dstack_backends::ssh::{KnownHosts, SshSession, SshTarget};
use dstack_core::config::parse;
use dstack_core::engine::ApplyOptions;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let file = args.next().expect("usage: ssh_latency FLEET_FILE [N]");
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    let t = Instant::now();
    let (client, name, instances, home) = common::ssh_fleet(&file).await;
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
