//! The run state machine: status derivation from jobs, retries, scheduled starts, stopping.
//!
//! A scheduled run (`schedule.cron`, dstack-spec §2.4–2.6) is applied `pending` with the time of
//! its first start (`Run::next_triggered_at_ms`) and no jobs; [`pending_timer`] submits every
//! job at that time. When the run then ends by itself (done or failed, after its retries), it
//! goes back to `pending` with its next start instead of finishing; a user's stop ends it.

use std::sync::Arc;
use std::time::Duration;

use super::{EngineError, Inner};
use crate::agent::StopRequest;
use crate::backend::BoxFuture;
use crate::config::duration::OffableDuration;
use crate::config::profile::{Retry, RetryEvent, Schedule, StopCriteria};
use crate::config::Configuration;
use crate::model::{
    now_ms, Job, JobStatus, JobTerminationReason, Run, RunStatus, RunTerminationReason,
};

/// The effective retry policy of a run: events and duration in seconds.
fn retry_policy(retry: &Option<Retry>) -> Option<(Vec<RetryEvent>, i64)> {
    let all = vec![
        RetryEvent::NoCapacity,
        RetryEvent::Interruption,
        RetryEvent::Error,
    ];
    match retry {
        None | Some(Retry::Enabled(false)) => None,
        Some(Retry::Enabled(true)) => Some((all, 3600)),
        Some(Retry::Policy {
            on_events,
            duration,
        }) => Some((
            on_events.clone().unwrap_or(all),
            duration.map_or(3600, |d| d.0),
        )),
    }
}

/// The status message of a service scaled to zero.
pub(crate) const SCALED_TO_ZERO: &str = "scaled to zero: the next request starts a replica";

/// What one job contributes to its run's status.
enum Verdict {
    Done,
    Running,
    Provisioning,
    Submitted,
    Retry,
    Failed(RunTerminationReason),
}

/// The latest submission of each job (replica and node).
pub(crate) fn latest(jobs: &[Job]) -> Vec<&Job> {
    let mut out: Vec<&Job> = Vec::new();
    for job in jobs {
        match out.iter_mut().find(|j| j.slot() == job.slot()) {
            Some(slot) if slot.submission_num < job.submission_num => *slot = job,
            Some(_) => {}
            None => out.push(job),
        }
    }
    out
}

fn verdict(run: &Run, retry: &Option<Retry>, job: &Job, all: &[Job], now: u64) -> Verdict {
    let reason = job
        .termination_reason
        .as_deref()
        .and_then(JobTerminationReason::parse);
    match job.status {
        JobStatus::Done => return Verdict::Done,
        JobStatus::Running | JobStatus::Terminating | JobStatus::Pulling => {
            return if reason == Some(JobTerminationReason::DoneByRunner) {
                Verdict::Done
            } else {
                Verdict::Running
            }
        }
        JobStatus::Provisioning => return Verdict::Provisioning,
        JobStatus::Submitted => return Verdict::Submitted,
        JobStatus::Failed | JobStatus::Terminated | JobStatus::Aborted => {}
    }
    let Some((events, duration)) = retry_policy(retry) else {
        return Verdict::Failed(RunTerminationReason::JobFailed);
    };
    let Some(event) = reason.and_then(JobTerminationReason::retry_event) else {
        return Verdict::Failed(RunTerminationReason::JobFailed);
    };
    if !events.contains(&event) {
        return Verdict::Failed(RunTerminationReason::JobFailed);
    }
    // A scheduled run's window is that of its current start: submissions from then on.
    let start = run.next_triggered_at_ms.unwrap_or(0);
    let provisioned = all
        .iter()
        .filter(|j| j.slot() == job.slot() && j.instance_id.is_some())
        .filter(|j| j.submitted_at_ms >= start)
        .max_by_key(|j| j.submission_num);
    let since = match provisioned {
        // Never placed: the window runs from the run's submission (or its start, if scheduled).
        None => run.next_triggered_at_ms.unwrap_or(run.submitted_at_ms),
        Some(p) => p.finished_at_ms.or(p.started_at_ms).unwrap_or(now),
    };
    if now.saturating_sub(since) as i64 > duration.max(0).saturating_mul(1000) {
        Verdict::Failed(RunTerminationReason::RetryLimitExceeded)
    } else {
        Verdict::Retry
    }
}

/// Brings a run's status in line with its jobs (and retries, terminates or finishes it).
///
/// Several tasks (and processes) may reconcile the same run at once; each decision is a
/// compare-and-set on the run's status, and a task whose decision lost the race reads the run
/// again and decides anew, so the last job change is never lost.
pub(crate) async fn reconcile(inner: &Arc<Inner>, run_id: &str) -> Result<(), EngineError> {
    for _ in 0..16 {
        if reconcile_once(inner, run_id).await? {
            return Ok(());
        }
    }
    Err(EngineError::Invalid(format!(
        "run {run_id} keeps changing; its status will be updated on the next change"
    )))
}

/// What reconciling a run decides from the run and its jobs alone.
pub(crate) enum Decision {
    /// Nothing to change.
    Keep,
    /// Write the run as given (a new status; nothing to stop).
    Update(Run),
    /// Write the run as given (`terminating`, with its termination reason), then stop its
    /// unfinished jobs.
    Terminate(Run),
    /// Stop these unfinished nodes of a multi-node run: a node will be retried, and the nodes
    /// of a run retry together.
    StopNodes(Run, Vec<Job>),
}

/// Decides how a run follows its jobs, as of `now` (retry windows, the next start of a
/// scheduled run), with the engine's retry delays.
pub(crate) fn decide(
    mut run: Run,
    jobs: &[Job],
    config: &Configuration,
    retry_delays: &[Duration],
    now: u64,
) -> Decision {
    if run.status.is_finished() || run.status == RunStatus::Pending {
        return Decision::Keep;
    }
    let schedule = schedule(config);
    if run.status == RunStatus::Terminating {
        return finished(run, jobs).map_or(Decision::Keep, |run| {
            Decision::Update(rescheduled(run, schedule, now))
        });
    }
    // Replicas scaled down are no longer part of the run.
    let current: Vec<&Job> = latest(jobs)
        .into_iter()
        .filter(|j| !super::scaling::scaled_down(j))
        .collect();
    if current.is_empty() && !jobs.is_empty() {
        run.status = RunStatus::Pending;
        run.next_attempt_at_ms = None;
        run.status_message = Some(SCALED_TO_ZERO.to_string());
        return Decision::Update(run);
    }
    let retry = &super::command::common(config).profile.retry;
    let mut verdicts: Vec<Verdict> = current
        .iter()
        .map(|j| verdict(&run, retry, j, jobs, now))
        .collect();
    // Multi-node: the nodes of a run retry together. A node that will be retried stops the
    // others; nodes stopped that way are retried with it.
    if super::command::nodes(config) > 1 && verdicts.iter().any(|v| matches!(v, Verdict::Retry)) {
        let stopped = JobTerminationReason::TerminatedByServer.as_str();
        for (v, job) in verdicts.iter_mut().zip(&current) {
            if job.status.is_finished() && job.termination_reason.as_deref() == Some(stopped) {
                *v = Verdict::Retry;
            }
        }
        let unfinished: Vec<Job> = current
            .iter()
            .filter(|j| !j.status.is_finished())
            .map(|j| (*j).clone())
            .collect();
        if !unfinished.is_empty() {
            return Decision::StopNodes(run, unfinished);
        }
    }
    let failed = verdicts.iter().find_map(|v| match v {
        Verdict::Failed(RunTerminationReason::JobFailed) => Some(RunTerminationReason::JobFailed),
        _ => None,
    });
    let failed = failed.or_else(|| {
        verdicts.iter().find_map(|v| match v {
            Verdict::Failed(r) => Some(*r),
            _ => None,
        })
    });
    let any = |f: fn(&Verdict) -> bool| verdicts.iter().any(f);
    let from = run.status;
    if let Some(reason) = failed {
        return ending(run, reason, jobs, schedule, now);
    } else if master_done(config, &current, &verdicts) {
        // `stop_criteria: master-done`: the other nodes are stopped.
        return ending(run, RunTerminationReason::AllJobsDone, jobs, schedule, now);
    } else if any(|v| matches!(v, Verdict::Running)) {
        run.status = RunStatus::Running;
    } else if any(|v| matches!(v, Verdict::Provisioning)) {
        run.status = RunStatus::Provisioning;
        run.resubmission_attempt = 0;
    } else if any(|v| matches!(v, Verdict::Submitted)) {
        run.status = RunStatus::Submitted;
    } else if any(|v| matches!(v, Verdict::Retry)) {
        run.status = RunStatus::Pending;
        run.resubmission_attempt += 1;
        let delay = retry_delays
            .get(run.resubmission_attempt as usize - 1)
            .or(retry_delays.last())
            .copied()
            .unwrap_or(Duration::ZERO);
        run.next_attempt_at_ms = Some(now + delay.as_millis() as u64);
        run.status_message = Some(format!("retrying in {}s", delay.as_secs()));
    } else {
        return ending(run, RunTerminationReason::AllJobsDone, jobs, schedule, now);
    }
    if run.status == from {
        Decision::Keep
    } else {
        Decision::Update(run)
    }
}

/// Whether a multi-node task with `stop_criteria: master-done` is done: its master node (rank
/// 0) is.
fn master_done(config: &Configuration, current: &[&Job], verdicts: &[Verdict]) -> bool {
    let criteria = super::command::common(config).profile.stop_criteria;
    super::command::nodes(config) > 1
        && criteria == Some(StopCriteria::MasterDone)
        && current
            .iter()
            .zip(verdicts)
            .any(|(job, v)| job.job_num == 0 && matches!(v, Verdict::Done))
}

/// Ending a run with `reason`: in one step when none of its jobs is left to stop (a scheduled
/// run then waits for its next start).
fn ending(
    run: Run,
    reason: RunTerminationReason,
    jobs: &[Job],
    schedule: Option<&Schedule>,
    now: u64,
) -> Decision {
    let run = with_termination(run, reason, jobs);
    if run.status == RunStatus::Terminating {
        Decision::Terminate(run)
    } else {
        Decision::Update(rescheduled(run, schedule, now))
    }
}

/// The schedule of a run's configuration, if it has one.
fn schedule(config: &Configuration) -> Option<&Schedule> {
    super::command::common(config).profile.schedule.as_ref()
}

/// A finished run, or, if it is scheduled and was not stopped by its user, the run `pending`
/// for its next start after `now` (dstack-spec §2.6, terminating phase). What the last start
/// ended with is kept in the status message; its jobs stay as they ended.
fn rescheduled(mut run: Run, schedule: Option<&Schedule>, now: u64) -> Run {
    let reason = run
        .termination_reason
        .as_deref()
        .and_then(RunTerminationReason::parse);
    let by_user = matches!(
        reason,
        Some(RunTerminationReason::StoppedByUser | RunTerminationReason::AbortedByUser)
    );
    if !run.status.is_finished() || by_user {
        return run;
    }
    let Some(next) = schedule.and_then(|s| s.next_after(now)) else {
        return run;
    };
    run.status_message = Some(format!(
        "the last start ended {} ({})",
        run.status,
        run.termination_reason.as_deref().unwrap_or("-")
    ));
    run.status = RunStatus::Pending;
    run.termination_reason = None;
    run.next_triggered_at_ms = Some(next);
    run.next_attempt_at_ms = None;
    run.resubmission_attempt = 0;
    run
}

/// The run ending with `reason`: finished if none of its jobs is left to stop, `terminating`
/// otherwise.
fn with_termination(mut run: Run, reason: RunTerminationReason, jobs: &[Job]) -> Run {
    run.termination_reason = Some(reason.as_str().to_string());
    run.status_message = reason.error().map(str::to_string);
    run.status = if jobs.iter().all(|j| j.status.is_finished()) {
        reason.run_status()
    } else {
        RunStatus::Terminating
    };
    run
}

/// A `terminating` run whose jobs have all finished, in its final status.
fn finished(mut run: Run, jobs: &[Job]) -> Option<Run> {
    if jobs.iter().any(|j| !j.status.is_finished()) {
        return None;
    }
    let reason = run
        .termination_reason
        .as_deref()
        .and_then(RunTerminationReason::parse)
        .unwrap_or(RunTerminationReason::ServerError);
    run.status = reason.run_status();
    Some(run)
}

/// The run `derive` writes beside a job change (see `Store::update_job_and_run`): the
/// decision when it is a plain update. A decision that needs jobs stopped is left to a
/// reconcile after the write, and `deferred` says so.
pub(crate) fn derive_update(
    inner: &Inner,
    run: &Run,
    jobs: &[Job],
    config: &Configuration,
    deferred: &mut bool,
) -> Option<Run> {
    match decide(
        run.clone(),
        jobs,
        config,
        &inner.options.retry_delays,
        now_ms(),
    ) {
        Decision::Keep => None,
        Decision::Update(next) => Some(next),
        Decision::Terminate(..) | Decision::StopNodes(..) => {
            *deferred = true;
            None
        }
    }
}

/// What follows a run's update once it is written: wake the timer of `pending` runs, drop
/// what is cached about a finished one, tell the waiters.
pub(crate) fn updated(inner: &Inner, run: &Run) {
    if run.status == RunStatus::Pending {
        inner.retries.notify_one();
    }
    if run.status.is_finished() {
        forget(inner, run);
    }
    inner.emit(run);
}

/// One reconciliation; `false` when another writer changed the run first.
async fn reconcile_once(inner: &Arc<Inner>, run_id: &str) -> Result<bool, EngineError> {
    let Some((run, jobs)) = inner.store.run_with_jobs(run_id)? else {
        return Ok(true);
    };
    if run.status.is_finished() {
        return Ok(true);
    }
    let config = inner.configuration(&run)?;
    let from = run.status;
    match decide(run, &jobs, &config, &inner.options.retry_delays, now_ms()) {
        Decision::Keep => Ok(true),
        Decision::Update(run) => write_update(inner, &run, from),
        Decision::Terminate(run) => stop_and_finish(inner, run, from, false).await,
        Decision::StopNodes(run, unfinished) => {
            for job in unfinished {
                terminate_job(
                    inner,
                    &run,
                    job,
                    JobTerminationReason::TerminatedByServer,
                    false,
                );
            }
            Ok(true)
        }
    }
}

/// Writes a run's update (a compare-and-set from `from`) and what follows it; `false` when
/// another writer changed the run first.
fn write_update(inner: &Inner, run: &Run, from: RunStatus) -> Result<bool, EngineError> {
    if !inner.store.update_run(run, &[from])? {
        return Ok(false);
    }
    updated(inner, run);
    Ok(true)
}

/// Moves a run to `terminating` with `reason`, stops its jobs, and finishes it when they are.
/// `false` when another writer changed the run first.
async fn terminate(
    inner: &Arc<Inner>,
    run: Run,
    reason: RunTerminationReason,
    abort: bool,
    jobs: &[Job],
) -> Result<bool, EngineError> {
    let from = run.status;
    let run = with_termination(run, reason, jobs);
    if run.status == RunStatus::Terminating {
        stop_and_finish(inner, run, from, abort).await
    } else {
        write_update(inner, &run, from)
    }
}

/// Writes a `terminating` run (a compare-and-set from `from`), stops its jobs, and finishes
/// it when they are. `false` when another writer changed the run first.
async fn stop_and_finish(
    inner: &Arc<Inner>,
    run: Run,
    from: RunStatus,
    abort: bool,
) -> Result<bool, EngineError> {
    if !inner.store.update_run(&run, &[from])? {
        return Ok(false);
    }
    inner.emit(&run);
    terminate_jobs(inner, &run, abort).await;
    let jobs = inner.store.jobs_of_run(&run.id)?;
    let config = inner.configuration(&run)?;
    if let Some(done) = finished(run, &jobs) {
        let done = rescheduled(done, schedule(&config), now_ms());
        write_update(inner, &done, RunStatus::Terminating)?;
    }
    Ok(true)
}

/// Drops what the engine caches about a finished run.
fn forget(inner: &Inner, run: &Run) {
    inner
        .definitions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&run.id);
}

/// Stops every unfinished job of a terminating run.
pub(crate) async fn terminate_jobs(inner: &Arc<Inner>, run: &Run, abort: bool) {
    let reason = run
        .termination_reason
        .as_deref()
        .and_then(RunTerminationReason::parse)
        .unwrap_or(RunTerminationReason::ServerError);
    let abort = abort || reason == RunTerminationReason::AbortedByUser;
    let job_reason = reason.job_reason();
    let jobs = match inner.store.jobs_of_run(&run.id) {
        Ok(jobs) => jobs,
        Err(_) => return,
    };
    for job in jobs.into_iter().filter(|j| !j.status.is_finished()) {
        terminate_job(inner, run, job, job_reason, abort);
    }
}

/// Stops one job of a terminating run. A compare-and-set that loses to a concurrent change
/// (the job was just placed or started) reads the job again and retries, so no job of a
/// terminating run is left running.
pub(crate) fn terminate_job(
    inner: &Arc<Inner>,
    run: &Run,
    mut job: Job,
    reason: JobTerminationReason,
    abort: bool,
) {
    for _ in 0..16 {
        let from = job.status;
        if from.is_finished() {
            return;
        }
        let mut next = job.clone();
        next.termination_reason = Some(reason.as_str().to_string());
        if from == JobStatus::Submitted {
            next.status = reason.job_status();
            next.finished_at_ms = Some(now_ms());
        } else {
            next.status = JobStatus::Terminating;
        }
        let changed = from == JobStatus::Terminating
            || inner.store.update_job(&next, &[from]).unwrap_or(false);
        if changed {
            if next.status == JobStatus::Terminating {
                let request = StopRequest {
                    abort,
                    grace_secs: stop_grace(inner, run),
                    reason: reason.as_str().to_string(),
                };
                inner
                    .runtime
                    .spawn(stop_on_agent(inner.clone(), next, request));
            }
            return;
        }
        match inner.store.job(&job.id) {
            Ok(Some(current)) => job = current,
            _ => return,
        }
    }
}

/// Seconds between SIGTERM and SIGKILL when `run`'s jobs are stopped (its `stop_duration`).
pub(super) fn stop_grace(inner: &Inner, run: &Run) -> u64 {
    let configured = inner
        .configuration(run)
        .ok()
        .and_then(|c| super::command::common(&c).profile.stop_duration);
    grace_secs(configured, inner.options.stop_grace)
}

/// Seconds between SIGTERM and SIGKILL for a `stop_duration`: as set, the engine's default
/// when unset (dstack's 5 minutes), and for `off` never ([`u64::MAX`]: the agent sends no
/// SIGKILL).
fn grace_secs(stop_duration: Option<OffableDuration>, default: Duration) -> u64 {
    match stop_duration {
        Some(OffableDuration::Seconds(d)) => u64::try_from(d.0).unwrap_or(0),
        Some(OffableDuration::Off) => u64::MAX,
        None => default.as_secs(),
    }
}

/// Asks the job's agent to stop it; a job the agent never got is finished here. (A boxed,
/// type-erased task: stopping reports back into the run state machine that started it.)
fn stop_on_agent(inner: Arc<Inner>, job: Job, request: StopRequest) -> BoxFuture<'static, ()> {
    Box::pin(async move { stop_job_on_agent(&inner, job, request).await })
}

async fn stop_job_on_agent(inner: &Arc<Inner>, job: Job, request: StopRequest) {
    let Some(instance_id) = job.instance_id.clone() else {
        return;
    };
    // A stop that fails (agent restarting, busy) is retried a few times before the watcher's
    // unreachable deadline takes over.
    let mut delay = Duration::from_millis(200);
    let mut result = Err(EngineError::Invalid("not tried".to_string()));
    for _ in 0..5 {
        result = match inner.agent(&instance_id).await {
            Ok(agent) => agent
                .stop(&job.id, &request)
                .await
                .map_err(EngineError::from),
            Err(e) => Err(e),
        };
        let retry = matches!(&result, Err(e) if !matches!(e, EngineError::Agent(crate::agent::AgentError::Status { status: 404, .. })));
        if !retry {
            break;
        }
        tokio::time::sleep(delay).await;
        delay *= 2;
    }
    match result {
        Ok(info) if info.status.is_finished() => super::jobs::on_agent_job(inner, info).await,
        Ok(_) => {}
        Err(EngineError::Agent(crate::agent::AgentError::Status { status: 404, .. })) => {
            let mut job = job;
            let reason = JobTerminationReason::parse(&request.reason)
                .unwrap_or(JobTerminationReason::TerminatedByServer);
            job.status = reason.job_status();
            job.finished_at_ms = Some(now_ms());
            let _ = super::jobs::record(inner, &job, JobStatus::Terminating).await;
        }
        Err(_) => {} // the agent watcher fails the job if the instance stays unreachable
    }
}

/// Stops a run by user request.
pub(crate) async fn stop(
    inner: &Arc<Inner>,
    run_id: &str,
    abort: bool,
) -> Result<Run, EngineError> {
    let reason = if abort {
        RunTerminationReason::AbortedByUser
    } else {
        RunTerminationReason::StoppedByUser
    };
    loop {
        let run = inner
            .store
            .run(run_id)?
            .ok_or_else(|| EngineError::Invalid(format!("no run with id {run_id}")))?;
        if run.status.is_finished() {
            return Ok(run);
        }
        if run.status == RunStatus::Terminating {
            // Stop again: escalates to abort, and re-sends a stop an agent may have missed.
            terminate_jobs(inner, &run, abort).await;
        } else if !terminate(inner, run, reason, abort, &inner.store.jobs_of_run(run_id)?).await? {
            continue; // the run changed meanwhile: decide again
        }
        return inner
            .store
            .run(run_id)?
            .ok_or_else(|| EngineError::Invalid(format!("run {run_id} disappeared")));
    }
}

/// The longest the timer of `pending` runs sleeps before it looks again: the clock it sleeps
/// by is not the wall clock that schedules are written in (a suspended machine, a clock set
/// anew), and a sleep of years is beyond what the runtime's timer takes.
const PENDING_TIMER_MAX_SLEEP: Duration = Duration::from_secs(3600);

/// What a `pending` run waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Waiting {
    /// The retry of its unfinished jobs, due at this time (Unix ms).
    Retry(u64),
    /// Its next scheduled start, due at this time (Unix ms): every job is submitted anew.
    Start(u64),
}

impl Waiting {
    /// What `run` (`pending`) waits for.
    pub(crate) fn of(run: &Run) -> Waiting {
        match run.scheduled_start_ms() {
            Some(at) => Waiting::Start(at),
            None => Waiting::Retry(run.next_attempt_at_ms.unwrap_or(0)),
        }
    }

    /// When it is due (Unix ms).
    fn due(self) -> u64 {
        match self {
            Waiting::Retry(at) | Waiting::Start(at) => at,
        }
    }
}

/// Resubmits `pending` runs when their backoff has passed, and submits scheduled runs at
/// their start times. Woken by every run that becomes `pending` (and by the sweep).
pub(crate) async fn pending_timer(inner: Arc<Inner>) {
    loop {
        let notified = inner.retries.notified();
        let now = now_ms();
        let mut next: Option<u64> = None;
        if let Ok(pending) = inner.store.runs_with_status(&[RunStatus::Pending]) {
            for run in pending {
                let waiting = Waiting::of(&run);
                if waiting.due() <= now {
                    let _ = resubmit(&inner, run, waiting).await;
                } else {
                    next = Some(next.map_or(waiting.due(), |n: u64| n.min(waiting.due())));
                }
            }
        }
        match next {
            Some(at) => {
                let wait =
                    Duration::from_millis(at.saturating_sub(now_ms())).min(PENDING_TIMER_MAX_SLEEP);
                let _ = tokio::time::timeout(wait, notified).await;
            }
            None => notified.await,
        }
    }
}

/// The submissions that (re)start a run whose jobs are `slots` (see
/// [`super::command::slots`]): every job for a scheduled start, the jobs that are not done
/// for a retry; each numbered after its job's latest submission.
pub(crate) fn next_submissions(
    run: &Run,
    jobs: &[Job],
    slots: &[(u32, u32)],
    waiting: Waiting,
) -> Vec<Job> {
    let current = latest(jobs);
    let submission = |slot: (u32, u32)| {
        current
            .iter()
            .find(|j| j.slot() == slot)
            .map_or(0, |j| j.submission_num + 1)
    };
    match waiting {
        Waiting::Start(_) => slots
            .iter()
            .map(|&slot| Job::of_slot(run, slot, submission(slot)))
            .collect(),
        Waiting::Retry(_) => current
            .into_iter()
            .filter(|j| j.status != JobStatus::Done && !super::scaling::scaled_down(j))
            .map(|job| Job::of_slot(run, job.slot(), job.submission_num + 1))
            .collect(),
    }
}

async fn resubmit(inner: &Arc<Inner>, mut run: Run, waiting: Waiting) -> Result<(), EngineError> {
    let config = inner.configuration(&run)?;
    let jobs = inner.store.jobs_of_run(&run.id)?;
    let next = next_submissions(&run, &jobs, &super::command::slots(&config), waiting);
    if next.is_empty() {
        // A service scaled to zero: its next request scales it up (`scaling::scale`).
        return Ok(());
    }
    run.status = RunStatus::Submitted;
    run.next_attempt_at_ms = None;
    run.status_message = None;
    // The run's status and its new submissions are written together, or not at all.
    if !inner
        .store
        .update_run_with_jobs(&run, &[RunStatus::Pending], &next)?
    {
        return Ok(());
    }
    inner.emit(&run);
    inner.wake_scheduler();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: u64 = 60_000;
    const HOUR: u64 = 60 * MINUTE;
    /// 2026-12-07 10:00 UTC.
    const NOW: u64 = 1_796_637_600_000;
    /// 2026-12-08 08:00 UTC: the next start of `0 8 * * *` after `NOW`.
    const TOMORROW_8AM: u64 = NOW + 22 * HOUR;

    fn config(extra: &str) -> Configuration {
        crate::config::parse(&format!("type: task\ncommands: [x]\n{extra}"), "t.yml").unwrap()
    }

    /// `stop_duration` is the grace after SIGTERM: as set, dstack's 5 minutes by default,
    /// and forever with `off`.
    #[test]
    fn stop_duration_sets_the_grace_dstacks_default_is_five_minutes_and_off_waits() {
        let default = super::super::EngineOptions::default().stop_grace;
        assert_eq!(default, Duration::from_secs(300));
        let grace = |extra: &str| {
            grace_secs(
                super::super::command::common(&config(extra))
                    .profile
                    .stop_duration,
                default,
            )
        };
        assert_eq!(grace(""), 300);
        assert_eq!(grace("stop_duration: 30s\n"), 30);
        assert_eq!(grace("stop_duration: 0\n"), 0);
        assert_eq!(grace("stop_duration: off\n"), u64::MAX);
    }

    fn daily() -> Configuration {
        config("schedule: {cron: '0 8 * * *'}\n")
    }

    /// A run applied two days ago whose start was due two hours ago.
    fn run(status: RunStatus) -> Run {
        Run {
            submitted_at_ms: NOW - 48 * HOUR,
            next_triggered_at_ms: Some(NOW - 2 * HOUR),
            ..Run::for_tests(status)
        }
    }

    fn job(run: &Run, num: u32, status: JobStatus, reason: JobTerminationReason) -> Job {
        let mut job = Job::submission(run, num, 0);
        job.status = status;
        job.termination_reason = Some(reason.as_str().to_string());
        job.submitted_at_ms = NOW - 2 * HOUR;
        job
    }

    fn updated(decision: Decision) -> Run {
        match decision {
            Decision::Update(run) => run,
            _ => panic!("expected a plain update"),
        }
    }

    /// `stop_criteria: master-done`: a multi-node task is done once its master node is (the
    /// others are stopped); with `all-done` (the default) it waits for every node.
    #[test]
    fn a_master_done_task_ends_with_its_master_node() {
        let r = run(RunStatus::Running);
        let master = job(&r, 0, JobStatus::Done, JobTerminationReason::DoneByRunner);
        let mut worker = job(
            &r,
            1,
            JobStatus::Running,
            JobTerminationReason::DoneByRunner,
        );
        worker.termination_reason = None;
        let jobs = [master, worker.clone()];
        let decide_for = |extra: &str| decide(r.clone(), &jobs, &config(extra), &[], NOW);
        match decide_for("nodes: 2\nstop_criteria: master-done\n") {
            Decision::Terminate(run) => {
                assert_eq!(run.status, RunStatus::Terminating);
                assert_eq!(run.termination_reason.as_deref(), Some("all_jobs_done"));
            }
            _ => panic!("expected the run to end, stopping the worker"),
        }
        for extra in ["nodes: 2\n", "nodes: 2\nstop_criteria: all-done\n"] {
            assert!(matches!(decide_for(extra), Decision::Keep), "{extra}");
        }
        // A worker that ends first does not end the run.
        let mut master = worker.clone();
        master.job_num = 0;
        let mut done_worker = job(&r, 1, JobStatus::Done, JobTerminationReason::DoneByRunner);
        done_worker.job_num = 1;
        let jobs = [master, done_worker];
        let config = config("nodes: 2\nstop_criteria: master-done\n");
        assert!(matches!(
            decide(r.clone(), &jobs, &config, &[], NOW),
            Decision::Keep
        ));
    }

    #[test]
    fn a_scheduled_run_that_ends_by_itself_waits_for_its_next_start() {
        let ends = [
            (
                JobStatus::Done,
                JobTerminationReason::DoneByRunner,
                "done (all_jobs_done)",
            ),
            (
                JobStatus::Failed,
                JobTerminationReason::ContainerExitedWithError,
                "failed (job_failed)",
            ),
        ];
        for (status, reason, ended) in ends {
            let mut running = run(RunStatus::Running);
            running.resubmission_attempt = 2;
            let jobs = [job(&running, 0, status, reason)];
            let next = updated(decide(running, &jobs, &daily(), &[], NOW));
            assert_eq!(next.status, RunStatus::Pending, "{ended}");
            assert_eq!(next.next_triggered_at_ms, Some(TOMORROW_8AM));
            assert_eq!(next.scheduled_start_ms(), Some(TOMORROW_8AM));
            assert_eq!(next.termination_reason, None);
            assert_eq!(next.resubmission_attempt, 0);
            assert_eq!(
                next.status_message.as_deref(),
                Some(format!("the last start ended {ended}").as_str())
            );
        }
        // Without a schedule, the run finishes.
        let running = run(RunStatus::Running);
        let jobs = [job(
            &running,
            0,
            JobStatus::Done,
            JobTerminationReason::DoneByRunner,
        )];
        let done = updated(decide(running, &jobs, &config(""), &[], NOW));
        assert_eq!(done.status, RunStatus::Done);
    }

    #[test]
    fn a_scheduled_run_stopped_by_its_user_ends_for_good() {
        for reason in [
            RunTerminationReason::StoppedByUser,
            RunTerminationReason::AbortedByUser,
        ] {
            let mut stopping = run(RunStatus::Terminating);
            stopping.termination_reason = Some(reason.as_str().to_string());
            let jobs = [job(
                &stopping,
                0,
                JobStatus::Terminated,
                reason.job_reason(),
            )];
            let ended = updated(decide(stopping, &jobs, &daily(), &[], NOW));
            assert_eq!(ended.status, reason.run_status());
            assert_eq!(ended.scheduled_start_ms(), None);
        }
        // Ended by the server (the other nodes of a failed multi-node run stopped): rescheduled.
        let mut stopping = run(RunStatus::Terminating);
        stopping.termination_reason = Some(RunTerminationReason::JobFailed.as_str().to_string());
        let jobs = [job(
            &stopping,
            0,
            JobStatus::Terminated,
            JobTerminationReason::TerminatedByServer,
        )];
        let next = updated(decide(stopping, &jobs, &daily(), &[], NOW));
        assert_eq!(next.scheduled_start_ms(), Some(TOMORROW_8AM));
    }

    #[test]
    fn a_scheduled_run_retries_within_its_start_before_waiting_for_the_next() {
        let retrying = config(
            "schedule: {cron: '0 8 * * *'}\nretry: {on_events: [no-capacity], duration: 1h}\n",
        );
        let no_capacity = |run: &Run| {
            [job(
                run,
                0,
                JobStatus::Failed,
                JobTerminationReason::FailedToStartDueToNoCapacity,
            )]
        };
        // Applied two days ago, started 30 minutes ago: within the retry window of the start.
        let mut submitted = run(RunStatus::Submitted);
        submitted.next_triggered_at_ms = Some(NOW - 30 * MINUTE);
        let jobs = no_capacity(&submitted);
        let delays = [Duration::from_secs(15)];
        let retry = updated(decide(submitted, &jobs, &retrying, &delays, NOW));
        assert_eq!(retry.status, RunStatus::Pending);
        assert_eq!(retry.next_attempt_at_ms, Some(NOW + 15_000));
        assert_eq!(retry.resubmission_attempt, 1);
        assert_eq!(Waiting::of(&retry), Waiting::Retry(NOW + 15_000));
        // Started two hours ago: past the window; the start ends, the next one is awaited.
        let submitted = run(RunStatus::Submitted);
        let jobs = no_capacity(&submitted);
        let next = updated(decide(submitted, &jobs, &retrying, &delays, NOW));
        assert_eq!(Waiting::of(&next), Waiting::Start(TOMORROW_8AM));
        assert_eq!(
            next.status_message.as_deref(),
            Some("the last start ended failed (retry_limit_exceeded)")
        );
    }

    #[test]
    fn a_start_submits_every_job_anew_and_a_retry_only_those_not_done() {
        let pending = run(RunStatus::Pending);
        let numbers = |jobs: Vec<Job>| -> Vec<(u32, u32)> {
            jobs.iter().map(|j| (j.job_num, j.submission_num)).collect()
        };
        let start = Waiting::of(&pending);
        assert_eq!(start, Waiting::Start(NOW - 2 * HOUR));
        assert_eq!(
            numbers(next_submissions(&pending, &[], &[(0, 0), (0, 1)], start)),
            [(0, 0), (1, 0)]
        );
        let mut jobs = vec![
            job(
                &pending,
                0,
                JobStatus::Done,
                JobTerminationReason::DoneByRunner,
            ),
            job(
                &pending,
                1,
                JobStatus::Failed,
                JobTerminationReason::InstanceUnreachable,
            ),
        ];
        jobs[1].submission_num = 3;
        assert_eq!(
            numbers(next_submissions(&pending, &jobs, &[(0, 0), (0, 1)], start)),
            [(0, 1), (1, 4)]
        );
        assert_eq!(
            numbers(next_submissions(
                &pending,
                &jobs,
                &[(0, 0), (0, 1)],
                Waiting::Retry(NOW)
            )),
            [(1, 4)]
        );
        // A run without a schedule waits only for retries.
        let mut plain = run(RunStatus::Pending);
        plain.next_triggered_at_ms = None;
        assert_eq!(Waiting::of(&plain), Waiting::Retry(0));
    }
}
