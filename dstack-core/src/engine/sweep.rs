//! A slow safety net under the event-driven paths: every few seconds, pick up what an event
//! could not deliver — work left by a process that exited mid-way, changes made by other
//! processes sharing the state file (including instances they added), a reconciliation lost
//! to an error. With cloud backends it also reaps idle instances, terminates lost ones and
//! brings backend fleets back to their `nodes.min` (`engine::consolidate`). Every
//! [`ORPHAN_SWEEPS`] sweeps, events past their retention are pruned (`crate::events`).

use std::sync::Arc;

use super::{jobs, runs, Inner};
use crate::model::{JobStatus, RunStatus};

/// How many sweeps pass between two searches for orphaned cloud resources (and two prunings
/// of old events).
const ORPHAN_SWEEPS: u32 = 20;

/// Runs the sweep forever.
pub(crate) async fn run(inner: Arc<Inner>) {
    let mut count = 0u32;
    loop {
        tokio::time::sleep(inner.options.sweep_period).await;
        count = count.wrapping_add(1);
        if inner.backends.iter().any(|b| b.creates_instances()) {
            let _ = inner.reap_idle().await;
            let _ = inner.terminate_lost().await;
            let _ = inner.consolidate_fleets().await;
            let _ = inner.clean_up_volumes().await;
            if count.is_multiple_of(ORPHAN_SWEEPS) {
                let _ = inner.reap_orphans().await;
            }
        }
        if count.is_multiple_of(ORPHAN_SWEEPS) {
            let before = crate::model::now_ms().saturating_sub(crate::events::RETENTION_MS);
            let _ = inner.store.prune_events(before, crate::events::MAX_KEPT);
        }
        inner.watch_instances();
        // A deeper pass than those woken by events: jobs further back that fit (backfill).
        inner
            .backfill
            .store(true, std::sync::atomic::Ordering::SeqCst);
        inner.wake_scheduler();
        inner.retries.notify_one();
        if let Ok(jobs) = inner.store.jobs_with_status(&[JobStatus::Provisioning]) {
            // Starting is idempotent on the agent, so a start in flight elsewhere is harmless;
            // queued jobs go in their queues' order, a queue in one request.
            let jobs = jobs.into_iter().map(|job| (job, None)).collect();
            for queue in jobs::in_queues(jobs) {
                inner.runtime.spawn(jobs::start_queue(inner.clone(), queue));
            }
        }
        // Runs whose jobs are placed (waiting runs are the scheduler's, woken above).
        let active = [
            RunStatus::Provisioning,
            RunStatus::Running,
            RunStatus::Terminating,
        ];
        if let Ok(active) = inner.store.runs_with_status(&active) {
            for run in active {
                let _ = runs::reconcile(&inner, &run.id).await;
            }
        }
        // Runs still `submitted` although a job of theirs was placed (a reconcile after the
        // start was lost to a crash or a store error).
        if let Ok(behind) = inner.store.submitted_runs_with_placed_jobs() {
            for run_id in behind {
                let _ = runs::reconcile(&inner, &run_id).await;
            }
        }
    }
}
