//! Placement of multi-node tasks (`nodes: N`): all N jobs together, each on its own host (all
//! of its blocks) of one fleet with `placement: cluster`, or none of them. Job `k` (rank `k`) goes to the `k`-th
//! host chosen; rank 0 is the master node.

use std::sync::Arc;

use super::scheduler::{eligible, fit};
use super::{jobs, runs, Inner};
use crate::config::Configuration;
use crate::model::{Fleet, Instance, Job, JobStatus, JobTerminationReason, Reservation};
use crate::offers::mismatch;

/// Whether a fleet's hosts are interconnected (`placement: cluster`).
fn is_cluster(fleet: &Fleet) -> bool {
    fleet
        .configuration
        .as_ref()
        .and_then(|c| c.get("placement"))
        .and_then(|p| p.as_str())
        == Some("cluster")
}

/// Tries to place every waiting job of a multi-node run at once; `true` if it did.
pub(crate) async fn place(
    inner: &Arc<Inner>,
    run_id: &str,
    config: &Configuration,
    instances: &[Instance],
    fleets: &[Fleet],
) -> bool {
    let nodes = super::command::nodes(config);
    let Ok(all) = inner.store.jobs_of_run(run_id) else {
        return false;
    };
    let mut waiting: Vec<Job> = runs::latest(&all)
        .into_iter()
        .filter(|j| j.status == JobStatus::Submitted)
        .cloned()
        .collect();
    if waiting.len() != nodes {
        return false; // part of the run is placed or finished: reconciliation deals with it
    }
    waiting.sort_by_key(|j| j.job_num);
    let common = super::command::common(config);
    let spec = &common.resources;
    let candidates = eligible(instances, fleets, common);
    // Hosts that could ever run a node, per cluster fleet.
    let mut clusters: Vec<(&Fleet, Vec<&Instance>)> = fleets
        .iter()
        .filter(|f| is_cluster(f))
        .map(|f| {
            let hosts = candidates
                .iter()
                .copied()
                .filter(|i| i.fleet_id == f.id && mismatch(spec, &i.host).is_none())
                .collect();
            (f, hosts)
        })
        .collect();
    clusters.retain(|(_, hosts): &(&Fleet, Vec<&Instance>)| hosts.len() >= nodes);
    if clusters.is_empty() {
        let message = format!(
            "no offers: {nodes} nodes need a fleet with `placement: cluster` and at least \
             {nodes} ready hosts that fit the resources"
        );
        for job in waiting {
            jobs::fail(
                inner,
                job,
                JobTerminationReason::FailedToStartDueToNoCapacity,
                message.clone(),
            )
            .await;
        }
        return false;
    }
    for (_, hosts) in clusters {
        if let Some(placed) = assign_all(inner, &waiting, &hosts, spec) {
            let _ = runs::reconcile(inner, run_id).await;
            for job in placed {
                inner.runtime.spawn(jobs::start(inner.clone(), job, None));
            }
            return true;
        }
    }
    false
}

/// Assigns each job to its own host among `hosts`; on any failure undoes the assignments
/// made so far and returns `None` (the run waits for the next pass).
fn assign_all(
    inner: &Inner,
    waiting: &[Job],
    hosts: &[&Instance],
    spec: &crate::config::resources::ResourcesSpec,
) -> Option<Vec<Job>> {
    let mut placed: Vec<Job> = Vec::new();
    let mut used: Vec<&str> = Vec::new();
    for job in waiting {
        let mut assigned = None;
        for host in hosts.iter().filter(|h| !used.contains(&h.id.as_str())) {
            let fits = |held: &[Reservation]| fit(spec, host, held, true);
            if let Ok(Some(job)) = inner.store.assign_job(&job.id, &host.id, None, &fits) {
                used.push(&host.id);
                assigned = Some(job);
                break;
            }
        }
        match assigned {
            Some(job) => placed.push(job),
            None => {
                undo(inner, placed);
                return None;
            }
        }
    }
    Some(placed)
}

/// Puts placed jobs back in the queue.
fn undo(inner: &Inner, placed: Vec<Job>) {
    for mut job in placed {
        job.status = JobStatus::Submitted;
        job.instance_id = None;
        job.reservation = None;
        let _ = inner.store.update_job(&job, &[JobStatus::Provisioning]);
    }
}
