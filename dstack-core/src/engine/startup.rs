//! `startup_order` of a multi-node task: which of its placed nodes may start now. Pure: the
//! caller (`jobs::start`) leaves a node that may not start `provisioning` and starts it when
//! the nodes it waits for report running (`jobs::start_waiting_nodes`), or on the next sweep.

use crate::config::profile::StartupOrder;
use crate::model::{Job, JobStatus};

/// Whether `job` may start under `order`, given the jobs of its run (every submission: only
/// the latest of each node of `job`'s replica counts). The master is node 0; a node waited
/// for counts once it runs (or has already ended: nothing is left to wait for).
pub(crate) fn may_start(order: StartupOrder, job: &Job, jobs: &[Job]) -> bool {
    let started = |node: &Job| node.status == JobStatus::Running || node.status.is_finished();
    let mut others = latest_of_replica(job, jobs)
        .into_iter()
        .filter(|other| other.job_num != job.job_num);
    match order {
        StartupOrder::Any => true,
        StartupOrder::MasterFirst if job.job_num == 0 => true,
        StartupOrder::MasterFirst => others.find(|o| o.job_num == 0).is_none_or(started),
        StartupOrder::WorkersFirst if job.job_num != 0 => true,
        StartupOrder::WorkersFirst => others.all(started),
    }
}

/// The latest submission of each node of `job`'s replica.
fn latest_of_replica<'a>(job: &Job, jobs: &'a [Job]) -> Vec<&'a Job> {
    let mut latest: std::collections::BTreeMap<u32, &Job> = std::collections::BTreeMap::new();
    for other in jobs.iter().filter(|o| o.replica_num == job.replica_num) {
        let newer = latest
            .get(&other.job_num)
            .is_none_or(|seen| other.submission_num > seen.submission_num);
        if newer {
            latest.insert(other.job_num, other);
        }
    }
    latest.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(job_num: u32, submission_num: u32, status: JobStatus) -> Job {
        let run = crate::model::Run::for_tests(crate::model::RunStatus::Provisioning);
        Job {
            status,
            ..Job::submission(&run, job_num, submission_num)
        }
    }

    #[test]
    fn the_master_or_the_workers_go_first_as_ordered() {
        use JobStatus::*;
        let master = node(0, 0, Provisioning);
        let worker = node(1, 0, Provisioning);
        let placed = [master.clone(), worker.clone()];
        assert!(may_start(StartupOrder::Any, &worker, &placed));
        assert!(may_start(StartupOrder::MasterFirst, &master, &placed));
        assert!(!may_start(StartupOrder::MasterFirst, &worker, &placed));
        assert!(may_start(StartupOrder::WorkersFirst, &worker, &placed));
        assert!(!may_start(StartupOrder::WorkersFirst, &master, &placed));

        let master_runs = [node(0, 0, Running), worker.clone()];
        assert!(may_start(StartupOrder::MasterFirst, &worker, &master_runs));
        let workers_run = [master.clone(), node(1, 0, Running), node(2, 0, Done)];
        assert!(may_start(StartupOrder::WorkersFirst, &master, &workers_run));
        let one_waits = [
            master.clone(),
            node(1, 0, Running),
            node(2, 0, Provisioning),
        ];
        assert!(!may_start(StartupOrder::WorkersFirst, &master, &one_waits));
    }

    #[test]
    fn only_the_latest_submission_of_each_node_counts() {
        use JobStatus::*;
        let retried = node(1, 1, Provisioning);
        let jobs = [
            node(0, 0, Failed),
            node(0, 1, Provisioning),
            node(1, 0, Failed),
            retried.clone(),
        ];
        assert!(!may_start(StartupOrder::MasterFirst, &retried, &jobs));
    }
}
