//! `inactivity_duration` of dev environments: a running dev environment whose first job has
//! had no SSH connection (see the agent's `no_connections_secs`) for that long is stopped,
//! its job ending with dstack's reason `inactivity_duration_exceeded`.

use dstack_core::agent::StopRequest;
use dstack_core::config::Configuration;
use dstack_core::engine::{Engine, EngineError};
use dstack_core::model::{JobStatus, JobTerminationReason, RunStatus};
use dstack_core::Client;

/// How long the stopped job's processes get between SIGTERM and SIGKILL.
const GRACE_SECS: u64 = 10;

/// Stops the running dev environments that have been inactive past their
/// `inactivity_duration`.
pub(crate) async fn enforce(client: &Client, engine: &Engine) -> Result<(), EngineError> {
    let runs = client.runs();
    let ids: Vec<String> = engine
        .store()
        .running_runs()?
        .into_iter()
        .filter(|r| r.status == RunStatus::Running)
        .filter(|r| limit_secs(&r.spec.configuration().ok()).is_some())
        .map(|r| r.id)
        .collect();
    for snapshot in runs.snapshots(&ids).await? {
        let Some(limit) = limit_secs(&snapshot.run.spec.configuration().ok()) else {
            continue;
        };
        let job = snapshot
            .jobs
            .iter()
            .filter(|j| j.job_num == 0 && j.replica_num == 0 && j.status == JobStatus::Running)
            .max_by_key(|j| j.submission_num);
        let Some((job, instance)) = job.and_then(|j| Some((j, j.instance_id.as_deref()?))) else {
            continue;
        };
        // An agent that does not answer is dealt with by its watcher; the others are checked.
        let Ok(agent) = engine.agent(instance).await else {
            continue;
        };
        let Ok(endpoint) = agent.ssh_endpoint(&job.id).await else {
            continue;
        };
        let idle = endpoint.no_connections_secs;
        if idle >= limit {
            eprintln!(
                "dstack server: {} had no SSH connection for {idle} s (inactivity_duration \
                 {limit} s): stopping it",
                snapshot.run.name
            );
            let request = StopRequest {
                abort: false,
                grace_secs: GRACE_SECS,
                reason: JobTerminationReason::InactivityDurationExceeded
                    .as_str()
                    .to_string(),
            };
            if let Err(e) = agent.stop(&job.id, &request).await {
                eprintln!("dstack server: cannot stop {}: {e}", snapshot.run.name);
            }
        }
    }
    Ok(())
}

/// A dev environment's `inactivity_duration` in seconds (`None`: none, or another kind of
/// run).
fn limit_secs(config: &Option<Configuration>) -> Option<u64> {
    match config {
        Some(Configuration::DevEnvironment(dev)) => dev
            .inactivity_duration
            .and_then(|d| u64::try_from(d.0).ok())
            .filter(|secs| *secs > 0),
        _ => None,
    }
}
