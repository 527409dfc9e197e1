//! Service replicas up and down: dstack's RPS autoscaler (a pure decision of the desired
//! count) and the change it makes to a run — new replica jobs numbered after the highest so
//! far, or the least important replicas stopped with `scaled_down`, which is never a failure.
//! A service scaled to zero waits `pending` until the next request scales it up again.

use std::sync::Arc;

use super::runs::{self, latest};
use super::{EngineError, Inner};
use crate::config::service::ScalingSpec;
use crate::model::{Job, JobStatus, JobTerminationReason, Run, RunStatus};

/// dstack's default averaging window of `scaling.window`.
pub const DEFAULT_WINDOW_SECS: u64 = 60;

/// What the autoscaler knows of a service at one moment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScaleInput {
    /// The replica range (`replicas: MIN..MAX`).
    pub min: u32,
    /// The largest count.
    pub max: u32,
    /// How many replicas the service has now (not scaled down, not finished).
    pub current: u32,
    /// Requests per second over the window; `None`: no statistics yet.
    pub rps: Option<f64>,
    /// Milliseconds since the last scaling event, `None` if there was none.
    pub since_last_scaling_ms: Option<u64>,
}

/// The replica count dstack's RPS autoscaler wants: `ceil(rps / target)` within
/// `[min, max]`; up at once from zero, otherwise only `scale_up_delay` after the last scaling
/// event; down (to zero included) only `scale_down_delay` after it; unchanged without
/// statistics.
pub fn desired_replicas(spec: &ScalingSpec, input: ScaleInput) -> u32 {
    let Some(rps) = input.rps else {
        return input.current.clamp(input.min, input.max);
    };
    let wanted = if spec.target > 0.0 {
        (rps / spec.target).ceil().min(f64::from(u32::MAX)) as u32
    } else {
        input.max
    };
    let wanted = wanted.clamp(input.min, input.max);
    let waited = |delay: &crate::config::duration::Duration| {
        input
            .since_last_scaling_ms
            .is_none_or(|ms| ms as i64 >= delay.0.saturating_mul(1000))
    };
    let may = match wanted.cmp(&input.current) {
        std::cmp::Ordering::Greater => input.current == 0 || waited(&spec.scale_up_delay),
        std::cmp::Ordering::Less => waited(&spec.scale_down_delay),
        std::cmp::Ordering::Equal => true,
    };
    if may {
        wanted
    } else {
        input.current
    }
}

/// How many replicas a service starts with: `replicas` (the minimum of a range; 1 when
/// omitted).
pub fn initial_replicas(service: &crate::config::ServiceConfiguration) -> u32 {
    service.replicas.as_ref().map_or(1, |r| {
        u32::try_from(r.min.or(r.max).unwrap_or(1).max(0)).unwrap_or(1)
    })
}

/// Whether a job was stopped by scaling down (its slot is no longer part of the run).
pub(crate) fn scaled_down(job: &Job) -> bool {
    job.termination_reason.as_deref() == Some(JobTerminationReason::ScaledDown.as_str())
}

/// How many replicas a service with these job submissions has now (see [`active`]).
pub fn replica_count(jobs: &[Job]) -> u32 {
    active(jobs).len() as u32
}

/// The replicas a service has now: the latest submission of each replica that was not
/// scaled down and has not finished.
pub(crate) fn active(jobs: &[Job]) -> Vec<&Job> {
    latest(jobs)
        .into_iter()
        .filter(|j| !scaled_down(j) && !j.status.is_finished())
        .collect()
}

/// The replicas of a service with these job submissions to stop to go down to `desired`
/// (see [`least_important`]).
pub fn to_retire(jobs: &[Job], desired: u32) -> Vec<Job> {
    least_important(&active(jobs), desired as usize)
}

/// The replicas to stop to go down to `desired`: those not running yet first, then the
/// highest replica numbers.
fn least_important(active: &[&Job], desired: usize) -> Vec<Job> {
    let mut order: Vec<&Job> = active.to_vec();
    order.sort_by_key(|j| {
        (
            j.status == JobStatus::Running,
            std::cmp::Reverse(j.replica_num),
        )
    });
    order
        .into_iter()
        .take(active.len().saturating_sub(desired))
        .cloned()
        .collect()
}

/// Brings service run `run_id` to `desired` replicas; returns the number it had.
pub(crate) async fn scale(
    inner: &Arc<Inner>,
    run_id: &str,
    desired: u32,
) -> Result<u32, EngineError> {
    for _ in 0..16 {
        let Some((run, jobs)) = inner.store.run_with_jobs(run_id)? else {
            return Err(EngineError::Invalid(format!("unknown run {run_id}")));
        };
        if run.status.is_finished() || run.status == RunStatus::Terminating {
            return Ok(0);
        }
        let active = active(&jobs);
        let had = active.len() as u32;
        if desired > had {
            let next = jobs.iter().map(|j| j.replica_num + 1).max().unwrap_or(0);
            let new: Vec<Job> = (next..next + (desired - had))
                .map(|replica| Job::of_slot(&run, (replica, 0), 0))
                .collect();
            let mut updated: Run = run.clone();
            if run.status == RunStatus::Pending {
                updated.status = RunStatus::Submitted;
                updated.status_message = None;
                updated.next_attempt_at_ms = None;
            }
            if !inner
                .store
                .update_run_with_jobs(&updated, &[run.status], &new)?
            {
                continue; // the run changed meanwhile: decide again
            }
            if updated.status != run.status {
                runs::updated(inner, &updated);
            }
            inner.wake_scheduler();
        } else if desired < had {
            for job in least_important(&active, desired as usize) {
                runs::terminate_job(inner, &run, job, JobTerminationReason::ScaledDown, false);
            }
            runs::reconcile(inner, run_id).await?;
        }
        return Ok(had);
    }
    Err(EngineError::Invalid(format!(
        "run {run_id} keeps changing; scaling is tried again later"
    )))
}

/// Stops replica job `job_id` of run `run_id` with `scaled_down`.
pub(crate) async fn retire(
    inner: &Arc<Inner>,
    run_id: &str,
    job_id: &str,
) -> Result<(), EngineError> {
    let Some((run, jobs)) = inner.store.run_with_jobs(run_id)? else {
        return Err(EngineError::Invalid(format!("unknown run {run_id}")));
    };
    let Some(job) = jobs.into_iter().find(|j| j.id == job_id) else {
        return Err(EngineError::Invalid(format!(
            "run {} has no job {job_id}",
            run.name
        )));
    };
    runs::terminate_job(inner, &run, job, JobTerminationReason::ScaledDown, false);
    runs::reconcile(inner, run_id).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::duration::Duration;

    fn spec() -> ScalingSpec {
        ScalingSpec {
            metric: "rps",
            target: 10.0,
            window: None,
            scale_up_delay: Duration(300),
            scale_down_delay: Duration(600),
        }
    }

    fn input(current: u32, rps: Option<f64>, since_s: Option<u64>) -> ScaleInput {
        ScaleInput {
            min: 0,
            max: 4,
            current,
            rps,
            since_last_scaling_ms: since_s.map(|s| s * 1000),
        }
    }

    #[test]
    fn replicas_follow_the_request_rate_within_the_range() {
        assert_eq!(
            desired_replicas(&spec(), input(1, Some(25.0), Some(300))),
            3
        );
        assert_eq!(
            desired_replicas(&spec(), input(1, Some(1000.0), Some(300))),
            4
        );
        assert_eq!(desired_replicas(&spec(), input(3, Some(0.0), Some(600))), 0);
        let at_least_one = ScaleInput {
            min: 1,
            ..input(3, Some(0.0), Some(600))
        };
        assert_eq!(desired_replicas(&spec(), at_least_one), 1);
    }

    #[test]
    fn delays_hold_scaling_back_except_up_from_zero() {
        assert_eq!(
            desired_replicas(&spec(), input(1, Some(25.0), Some(299))),
            1
        );
        assert_eq!(desired_replicas(&spec(), input(0, Some(0.1), Some(1))), 1);
        assert_eq!(desired_replicas(&spec(), input(3, Some(0.0), Some(599))), 3);
        assert_eq!(desired_replicas(&spec(), input(2, Some(25.0), None)), 3);
    }

    #[test]
    fn without_statistics_the_count_stays() {
        assert_eq!(desired_replicas(&spec(), input(2, None, Some(10_000))), 2);
        let below = ScaleInput {
            min: 2,
            ..input(1, None, None)
        };
        assert_eq!(desired_replicas(&spec(), below), 2);
    }

    #[test]
    fn scaling_down_stops_replicas_not_yet_running_then_the_highest() {
        let run = crate::model::Run::for_tests(RunStatus::Running);
        let job = |replica: u32, status: JobStatus| {
            let mut j = Job::of_slot(&run, (replica, 0), 0);
            j.status = status;
            j
        };
        let jobs = [
            job(0, JobStatus::Running),
            job(1, JobStatus::Running),
            job(2, JobStatus::Submitted),
            job(3, JobStatus::Running),
        ];
        let refs: Vec<&Job> = jobs.iter().collect();
        let stopped: Vec<u32> = least_important(&refs, 1)
            .iter()
            .map(|j| j.replica_num)
            .collect();
        assert_eq!(stopped, [2, 3, 1]);
    }
}
