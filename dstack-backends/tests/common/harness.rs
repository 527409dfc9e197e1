//! What the fleet and cloud tests share: a client whose only backend is the one under test
//! (for clouds, its project key accepted by the namespace hosts its instances are mapped to),
//! fleet apply with progress, and running a task to its end.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dstack_backends::project::Project;
use dstack_core::backend::Compute;
use dstack_core::config::parse;
use dstack_core::engine::{ApplyOptions, EngineError, EngineOptions};
use dstack_core::model::{Instance, Run};
use dstack_core::{Client, ClientOptions, RunHandle};
use futures_util::StreamExt;

use super::netns::TestHosts;

/// Lets the project key of the state in `home` (created if needed) log in on every host.
pub fn authorize_project(home: &Path, hosts: &TestHosts) {
    let project = Project::load_or_create(home).unwrap();
    hosts.authorize(&project.ssh_public_key);
}

/// A client on `home` with `backend` as its only backend.
pub async fn client(home: &Path, backend: Arc<dyn Compute>, engine: EngineOptions) -> Client {
    Client::open(ClientOptions {
        home: home.to_path_buf(),
        backends: vec![backend],
        engine,
    })
    .await
    .unwrap()
}

/// Applies a fleet; its live instances (or the error) and every progress line.
pub async fn apply_fleet_with_progress(
    client: &Client,
    yaml: &str,
) -> (Result<Vec<Instance>, EngineError>, Vec<String>) {
    let lines = Mutex::new(Vec::new());
    let progress =
        |i: &Instance, step: &str| lines.lock().unwrap().push(format!("{}: {step}", i.name));
    let config = parse(yaml, "fleet.dstack.yml").unwrap();
    let result = client.fleets().apply(&config, &progress).await;
    let lines = lines.into_inner().unwrap();
    (result.map(|(_, instances)| instances), lines)
}

/// Applies a fleet; its live instances, or the error with every progress line.
pub async fn apply_fleet(client: &Client, yaml: &str) -> Result<Vec<Instance>, String> {
    let (result, lines) = apply_fleet_with_progress(client, yaml).await;
    result.map_err(|e| format!("{e}\n{}", lines.join("\n")))
}

/// Applies a task and waits up to `secs` for its end; the run record and its output.
pub async fn run_task(client: &Client, yaml: &str, secs: u64) -> (RunHandle, Run, String) {
    let task = parse(yaml, "task.dstack.yml").unwrap();
    let run = client
        .runs()
        .apply(task, ApplyOptions::default())
        .await
        .unwrap();
    let done = tokio::time::timeout(Duration::from_secs(secs), run.wait())
        .await
        .expect("the run ends in time")
        .unwrap();
    let mut logs = run.logs(false);
    let mut out = Vec::new();
    while let Some(chunk) = logs.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    (run, done, String::from_utf8_lossy(&out).into_owned())
}

/// The agent of a cloud instance, after checking that it holds an owner lease of `idle_secs`
/// with the provider's lease window.
pub async fn leased_agent(
    client: &Client,
    instance: &Instance,
    idle_secs: u64,
) -> dstack_core::agent::AgentClient {
    let agent = client.engine().unwrap().agent(&instance.id).await.unwrap();
    let lease = agent.lease().await.unwrap();
    assert_eq!(
        lease.terms,
        Some(dstack_core::agent::LeaseTerms {
            idle_secs,
            window_secs: dstack_backends::provider::LEASE_WINDOW.as_secs(),
        })
    );
    agent
}
