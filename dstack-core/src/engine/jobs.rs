//! Starting jobs on their agents and recording what the agents report.

use std::sync::Arc;

use super::{runs, EngineError, Inner};
use crate::agent::{AgentError, AgentJobStatus, JobInfo, StopRequest};
use crate::model::{now_ms, Instance, Job, JobStatus, JobTerminationReason, Run};
use crate::store::{JobAndRun, StoreError};

const UNFINISHED: &[JobStatus] = &[
    JobStatus::Submitted,
    JobStatus::Provisioning,
    JobStatus::Pulling,
    JobStatus::Running,
    JobStatus::Terminating,
];

/// Starts a `provisioning` job on its instance's agent (idempotent: safe to repeat after a
/// crash, the agent knows the job by its id). `instance` is the job's instance if the caller
/// has just read it (it is read from the store otherwise).
pub(crate) async fn start(inner: Arc<Inner>, job: Job, instance: Option<Instance>) {
    if !inner
        .starting
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(job.id.clone())
    {
        return; // already being started by this process
    }
    let result = try_start(&inner, &job, instance).await;
    inner
        .starting
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&job.id);
    // The agent refused the job, or the job cannot be built: that is final. Anything else is
    // transient (the agent restarting, this process shutting down, a busy store): the job
    // stays `provisioning` (and so does its run); the sweep tries again, and the instance's
    // unreachable deadline fails it if the agent never comes back.
    match result {
        Ok(()) => {}
        // The agent would not queue it behind the job it was to follow (that job has another
        // follower there, or has not reached the agent yet): it waits for a place again.
        Err(EngineError::Agent(AgentError::Status { status: 409, .. }))
            if job.after_job.is_some() =>
        {
            let _ = requeue(&inner, job).await;
        }
        Err(e @ (EngineError::Agent(AgentError::Status { .. }) | EngineError::Invalid(_))) => {
            fail(
                &inner,
                job,
                JobTerminationReason::ExecutorError,
                e.to_string(),
            )
            .await;
        }
        Err(_) => {
            let _ = runs::reconcile(&inner, &job.run_id).await;
        }
    }
}

/// The address of every node of the run, in rank order: the instances of the latest
/// submission of each job (all placed together for a multi-node run).
fn node_addresses(
    inner: &Inner,
    run: &super::Definition,
    instance: &Instance,
) -> Result<Vec<String>, EngineError> {
    let own = || {
        instance
            .address
            .clone()
            .unwrap_or_else(|| "127.0.0.1".to_string())
    };
    if super::command::nodes(&run.config) <= 1 {
        return Ok(vec![own()]);
    }
    let jobs = inner.store.jobs_of_run(&run.id)?;
    let mut latest = super::runs::latest(&jobs);
    latest.sort_by_key(|j| j.job_num);
    let mut addresses = Vec::new();
    for job in latest {
        let id = job.instance_id.as_deref().ok_or_else(|| {
            EngineError::Invalid(format!(
                "node {} of run {} is not placed",
                job.job_num, run.name
            ))
        })?;
        let node = inner
            .store
            .instance(id)?
            .ok_or_else(|| EngineError::Invalid(format!("unknown instance {id}")))?;
        addresses.push(node.address.unwrap_or_else(|| "127.0.0.1".to_string()));
    }
    Ok(addresses)
}

async fn try_start(
    inner: &Arc<Inner>,
    job: &Job,
    instance: Option<Instance>,
) -> Result<(), EngineError> {
    let submit = submission(inner, job, instance)?;
    // What becomes of the job (running, ended) is recorded from the agent's reports (see
    // `agents::watch`), once, whether they arrive before or after this answer; a queued job
    // stays `provisioning`.
    let instance_id = job.instance_id.as_deref().unwrap_or_default();
    let agent = inner.agent(instance_id).await?;
    send_archives(inner, instance_id, &agent, std::slice::from_ref(&submit)).await?;
    agent.submit(&submit).await?;
    Ok(())
}

/// Gives the agent of `instance_id` each archive `submits` start from that it lacks, one
/// instance's uploads at a time: jobs that start together from one archive (a sweep's
/// trials) upload it once per host.
async fn send_archives(
    inner: &Arc<Inner>,
    instance_id: &str,
    agent: &crate::agent::AgentClient,
    submits: &[crate::agent::JobSubmit],
) -> Result<(), EngineError> {
    let mut hashes: Vec<&str> = submits
        .iter()
        .flat_map(|s| s.archives.iter().map(|a| a.hash.as_str()))
        .collect();
    if hashes.is_empty() {
        return Ok(());
    }
    hashes.sort_unstable();
    hashes.dedup();
    let turn = inner
        .uploading
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(instance_id.to_string())
        .or_default()
        .clone();
    let _turn = turn.lock().await;
    for hash in hashes {
        if agent.has_archive(hash).await? {
            continue;
        }
        let file = inner
            .options
            .archives
            .as_ref()
            .and_then(|store| store.find(hash))
            .ok_or_else(|| EngineError::Invalid(format!("archive {hash} is no longer kept")))?;
        let bytes = tokio::fs::read(&file)
            .await
            .map_err(|e| EngineError::Invalid(format!("cannot read archive {hash}: {e}")))?;
        agent.put_archive(hash, bytes).await?;
    }
    Ok(())
}

/// What the agent is sent to start `job` (on `instance`, if the caller has just read it).
fn submission(
    inner: &Arc<Inner>,
    job: &Job,
    instance: Option<Instance>,
) -> Result<crate::agent::JobSubmit, EngineError> {
    let run = inner.definition_of(&job.run_id)?;
    let instance_id = job.instance_id.clone().unwrap_or_default();
    let instance = match instance.filter(|i| i.id == instance_id) {
        Some(instance) => instance,
        None => inner
            .store
            .instance(&instance_id)?
            .ok_or_else(|| EngineError::Invalid(format!("job {} has no instance", job.id)))?,
    };
    let nodes = node_addresses(inner, &run, &instance)?;
    let secrets = match &inner.options.secrets {
        Some(secrets) if super::credentials::needs_secrets(&run.config) => secrets
            .values()
            .map_err(|e| EngineError::Invalid(e.to_string()))?,
        _ => Default::default(),
    };
    super::command::job_submit(&run, job, &instance, &nodes, &secrets)
        .map_err(|e| EngineError::Invalid(e.to_string()))
}

/// Starts `provisioning` jobs placed together on one instance, in order, after those placed
/// there before (a job queued behind one that has not reached the agent yet is refused):
/// jobs queued one behind the other (see `scheduler`) in one request to the agent. If that
/// fails, or the jobs cannot all be claimed, each is started on its own, in order, which
/// reports what became of each (the agent knows those it took by their ids).
pub(crate) async fn start_queue(inner: Arc<Inner>, queue: Vec<(Job, Option<Instance>)>) {
    let Some(instance_id) = queue.first().and_then(|(job, _)| job.instance_id.clone()) else {
        // Not placed: each start says why.
        for (job, instance) in queue {
            start(inner.clone(), job, instance).await;
        }
        return;
    };
    // Claimed before waiting for their turn: the periodic sweep, which starts `provisioning`
    // jobs again, leaves them alone meanwhile.
    let claimed = claim(&inner, &queue);
    let turn = inner
        .queueing
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(instance_id.clone())
        .or_default()
        .clone();
    let _turn = turn.lock().await;
    let sent = claimed && queue.len() > 1 && send_queue(&inner, &instance_id, &queue).await;
    if claimed {
        let mut starting = inner.starting.lock().unwrap_or_else(|e| e.into_inner());
        for (job, _) in &queue {
            starting.remove(&job.id);
        }
    }
    if !sent {
        for (job, instance) in queue {
            start(inner.clone(), job, instance).await;
        }
    }
}

/// `jobs` (each with its instance, if the caller has read it) in queues: each job right
/// after the job it is queued behind when that one is among `jobs` too, so that each queue
/// can be sent to its agent in order ([`start_queue`]); otherwise in the order given.
pub(crate) fn in_queues(jobs: Vec<(Job, Option<Instance>)>) -> Vec<Vec<(Job, Option<Instance>)>> {
    let ids: std::collections::HashSet<String> = jobs.iter().map(|(j, _)| j.id.clone()).collect();
    let mut followers = std::collections::HashMap::new();
    let mut heads = Vec::new();
    for (job, instance) in jobs {
        match job.after_job.clone().filter(|leader| ids.contains(leader)) {
            Some(leader) => {
                followers.insert(leader, (job, instance));
            }
            None => heads.push((job, instance)),
        }
    }
    let mut queues: Vec<Vec<(Job, Option<Instance>)>> = heads
        .into_iter()
        .map(|head| {
            let mut queue = vec![head];
            while let Some(next) = queue
                .last()
                .and_then(|(last, _)| followers.remove(&last.id))
            {
                queue.push(next);
            }
            queue
        })
        .collect();
    // Only a cycle, which the store cannot record, would leave any: each alone then.
    queues.extend(followers.into_values().map(|f| vec![f]));
    queues
}

/// Marks all the jobs of `queue` as being started by this process; `false` (none marked) if
/// any of them already is.
fn claim(inner: &Inner, queue: &[(Job, Option<Instance>)]) -> bool {
    let mut starting = inner.starting.lock().unwrap_or_else(|e| e.into_inner());
    if queue.iter().any(|(job, _)| starting.contains(&job.id)) {
        return false;
    }
    starting.extend(queue.iter().map(|(job, _)| job.id.clone()));
    true
}

/// Sends the jobs of `queue` to the agent of `instance_id` in one request; whether it took
/// them all.
async fn send_queue(
    inner: &Arc<Inner>,
    instance_id: &str,
    queue: &[(Job, Option<Instance>)],
) -> bool {
    let sent = async {
        let submits = queue
            .iter()
            .map(|(job, instance)| submission(inner, job, instance.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let agent = inner.agent(instance_id).await?;
        send_archives(inner, instance_id, &agent, &submits).await?;
        agent.submit_all(&submits).await?;
        Ok::<(), EngineError>(())
    };
    sent.await.is_ok()
}

/// Stops a process that runs on an agent while the store no longer expects it to.
async fn stop_orphan(
    inner: &Arc<Inner>,
    agent: &crate::agent::AgentClient,
    job: Option<&Job>,
    id: &str,
) {
    let reason = job
        .and_then(|j| j.termination_reason.clone())
        .unwrap_or_else(|| {
            JobTerminationReason::TerminatedByServer
                .as_str()
                .to_string()
        });
    let abort = reason == JobTerminationReason::AbortedByUser.as_str();
    // The grace of the run's `stop_duration`, as the first stop had: a stop sent again must
    // not cut it short.
    let run = job.and_then(|j| inner.store.run(&j.run_id).ok().flatten());
    let grace_secs = run.map_or(inner.options.stop_grace.as_secs(), |run| {
        super::runs::stop_grace(inner, &run)
    });
    let request = StopRequest {
        abort,
        grace_secs,
        reason,
    };
    if let Ok(info) = agent.stop(id, &request).await {
        if info.status.is_finished() {
            Box::pin(on_agent_job(inner, info)).await;
        }
    }
}

/// Takes back a follower still queued on its agent (see `scheduler`): it waits for a place
/// again. `false` if it has started (or is being started, or its agent cannot say).
pub(crate) async fn take_back(inner: &Arc<Inner>, job_id: &str) -> bool {
    // Marked as being started: nothing submits it again while it is taken back.
    if !inner
        .starting
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(job_id.to_string())
    {
        return false;
    }
    let taken = try_take_back(inner, job_id).await.unwrap_or(false);
    inner
        .starting
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(job_id);
    taken
}

async fn try_take_back(inner: &Arc<Inner>, job_id: &str) -> Result<bool, EngineError> {
    let Some(job) = inner.store.job(job_id)? else {
        return Ok(false);
    };
    if job.status != JobStatus::Provisioning || job.after_job.is_none() {
        return Ok(false);
    }
    let agent = inner
        .agent(job.instance_id.as_deref().unwrap_or_default())
        .await?;
    match agent.remove(job_id).await {
        // Gone from the agent (or never got there): it will not start.
        Ok(()) | Err(AgentError::Status { status: 404, .. }) => {}
        // Started already (409), or the agent cannot say.
        Err(_) => return Ok(false),
    }
    Ok(requeue(inner, job).await?)
}

/// Puts a `provisioning` job that is not on its agent back in the waiting queue.
async fn requeue(inner: &Arc<Inner>, mut job: Job) -> Result<bool, crate::store::StoreError> {
    job.status = JobStatus::Submitted;
    job.instance_id = None;
    job.reservation = None;
    job.after_job = None;
    let waiting = record(inner, &job, JobStatus::Provisioning).await?;
    if waiting {
        inner.wake_scheduler();
    }
    Ok(waiting)
}

/// Records that a job could not be started or was lost.
pub(crate) async fn fail(
    inner: &Arc<Inner>,
    mut job: Job,
    reason: JobTerminationReason,
    message: String,
) {
    let from = job.status;
    job.status = reason.job_status();
    job.termination_reason = Some(reason.as_str().to_string());
    job.termination_message = Some(message);
    job.finished_at_ms = Some(now_ms());
    let _ = record(inner, &job, from).await;
}

/// The run status derivation of [`runs::derive_update`], for the store to run inside its
/// write transaction; runs whose decision needs more than a write (stopping jobs) are added
/// to `deferred`, to be reconciled after.
fn derive<'a>(
    inner: &'a Inner,
    deferred: &'a mut Vec<String>,
) -> impl FnMut(&Run, &[Job]) -> Option<Run> + 'a {
    move |run: &Run, jobs: &[Job]| {
        if run.status.is_finished() {
            return None;
        }
        let mut defer = false;
        let next = match inner.definition(run) {
            Ok(definition) => runs::derive_update(inner, run, jobs, &definition.config, &mut defer),
            // A configuration that cannot be read (a corrupt record): left to a reconcile,
            // which reports it.
            Err(_) => {
                defer = true;
                None
            }
        };
        if defer && !deferred.contains(&run.id) {
            deferred.push(run.id.clone());
        }
        next
    }
}

/// What follows a job's change once it is written: a finished job wakes the scheduler (its
/// resources are free now, unless they `passed_on` to the job queued behind it), a job that
/// started may be followed, a changed run is announced.
fn written(inner: &Inner, job: &Job, from: JobStatus, run: Option<&Run>, passed_on: bool) {
    let instance_id = job.instance_id.as_deref().unwrap_or_default();
    if let (true, Some(started), Some(finished)) = (
        job.status.is_finished(),
        job.started_at_ms,
        job.finished_at_ms,
    ) {
        if let Some(reservation) = &job.reservation {
            let ran = finished.saturating_sub(started);
            inner.queues.task_ended(instance_id, reservation, ran);
        }
    }
    // A queued job that started, or ended (its start and end reported together), has left
    // its queue.
    let dequeued = from == JobStatus::Provisioning
        && job.after_job.is_some()
        && job.status != JobStatus::Provisioning;
    if dequeued {
        inner.queues.queued_started(instance_id);
    }
    if job.status.is_finished() {
        // A run group with a limit may place another run now, whatever became of the
        // resources.
        let grouped = || {
            inner.definition_of(&job.run_id).map_or(true, |d| {
                d.spec
                    .group
                    .as_ref()
                    .is_some_and(|g| g.max_parallel.is_some())
            })
        };
        if !passed_on || grouped() {
            inner.wake_scheduler();
        } else if dequeued {
            inner.wake_if_blocked(true); // its queue is shorter
        }
    } else if job.status == JobStatus::Running && from == JobStatus::Provisioning {
        // A job can be queued behind this one now.
        inner.wake_if_blocked(dequeued);
    }
    if let Some(run) = run {
        runs::updated(inner, run);
    }
}

/// Records a job's change (a compare-and-set from `from`) and its run's status in one
/// transaction; a run decision that needs jobs stopped is carried out after. `Ok(false)`: the
/// job changed first.
pub(crate) async fn record(
    inner: &Arc<Inner>,
    job: &Job,
    from: JobStatus,
) -> Result<bool, crate::store::StoreError> {
    let mut deferred = Vec::new();
    let written_run = {
        let mut derive = derive(inner, &mut deferred);
        inner.store.update_job_and_run(job, &[from], &mut derive)?
    };
    let JobAndRun::Written(run) = written_run else {
        return Ok(false);
    };
    written(inner, job, from, run.as_deref(), false);
    for run_id in deferred {
        let _ = runs::reconcile(inner, &run_id).await;
    }
    Ok(true)
}

/// Applies an agent's report about a job to the store. If the store fails, the same change
/// also reaches the job's watcher as an event, and the watcher follows the agent anew until
/// it is recorded.
pub(crate) async fn on_agent_job(inner: &Arc<Inner>, info: JobInfo) {
    let _ = on_agent_jobs(inner, vec![info]).await;
}

/// Applies reports of an agent to the store, all in one transaction. On a store error nothing
/// is recorded: the caller must read the agent's state anew (the reports hold only changes).
pub(crate) async fn on_agent_jobs(
    inner: &Arc<Inner>,
    mut infos: Vec<JobInfo>,
) -> Result<(), StoreError> {
    // A queued job stays `provisioning`: nothing to record.
    infos.retain(|info| info.status != AgentJobStatus::Queued);
    if infos.is_empty() {
        return Ok(());
    }
    // Each job once (its last report counts), in the order of their first reports.
    let mut ids: Vec<&str> = Vec::with_capacity(infos.len());
    for info in &infos {
        if !ids.contains(&info.id.as_str()) {
            ids.push(&info.id);
        }
    }
    // Reports that need more than a write (see [`Report`]): jobs to stop again, and runs to
    // reconcile (those of reported ends the store already had; once per run).
    let mut orphans: Vec<Job> = Vec::new();
    let mut deferred = Vec::new();
    let mut ended: Vec<String> = Vec::new();
    let changed = {
        let mut change = |stored: &Job| {
            // The last report of a job is the one that counts.
            let info = infos.iter().rev().find(|i| i.id == stored.id)?;
            match report(stored, info) {
                Report::Write(job) => Some(*job),
                Report::Orphan => {
                    orphans.push(stored.clone());
                    None
                }
                Report::Reconcile => {
                    ended.push(stored.run_id.clone());
                    None
                }
                Report::Nothing => None,
            }
        };
        let mut derive = derive(inner, &mut deferred);
        // A store error: nothing was written; the caller reads the agent's state anew.
        inner
            .store
            .change_jobs_and_runs(&ids, &mut change, &mut derive)?
    };
    for c in &changed {
        written(inner, &c.job, c.from, c.run.as_deref(), c.passed_on);
    }
    // Make sure the runs saw these ends (a reconcile may have been lost in a crash).
    deferred.extend(ended);
    deferred.sort();
    deferred.dedup();
    for run_id in deferred {
        let _ = Box::pin(runs::reconcile(inner, &run_id)).await;
    }
    for job in orphans {
        // Recorded as finished or being stopped, yet running: stop it.
        let agent = job.instance_id.as_deref().and_then(|i| {
            inner
                .agents
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(i)
                .cloned()
        });
        if let Some(agent) = agent {
            Box::pin(stop_orphan(inner, &agent, Some(&job), &job.id)).await;
        }
    }
    Ok(())
}

/// What an agent's report means for a job as stored.
enum Report {
    /// Write the job so.
    Write(Box<Job>),
    /// The job is finished (or being stopped) in the store, yet runs on its agent: stop it
    /// there.
    Orphan,
    /// The job is finished in both: make sure its run saw it.
    Reconcile,
    /// Nothing to do.
    Nothing,
}

fn report(stored: &Job, info: &JobInfo) -> Report {
    if stored.status.is_finished() {
        return if info.status.is_finished() {
            Report::Reconcile
        } else {
            Report::Orphan
        };
    }
    if stored.status == JobStatus::Terminating && !info.status.is_finished() {
        // Being stopped, yet running: the stop may have reached the agent before the job
        // did (and found nothing to stop). Stopping again is harmless.
        return Report::Orphan;
    }
    match info.status {
        AgentJobStatus::Queued => Report::Nothing,
        AgentJobStatus::Running if stored.status == JobStatus::Provisioning => {
            let mut job = stored.clone();
            job.status = JobStatus::Running;
            job.started_at_ms = Some(info.started_at_ms);
            Report::Write(Box::new(job))
        }
        AgentJobStatus::Running => Report::Nothing,
        AgentJobStatus::Done | AgentJobStatus::Failed | AgentJobStatus::Terminated => {
            let default = match info.status {
                AgentJobStatus::Done => JobTerminationReason::DoneByRunner,
                AgentJobStatus::Terminated => JobTerminationReason::TerminatedByUser,
                _ => JobTerminationReason::ContainerExitedWithError,
            };
            let reason = info
                .termination_reason
                .as_deref()
                .and_then(JobTerminationReason::parse)
                .unwrap_or(default);
            let mut job = stored.clone();
            job.status = reason.job_status();
            job.termination_reason = Some(reason.as_str().to_string());
            job.termination_message = info.termination_message.clone();
            job.exit_status = info.exit_status;
            job.started_at_ms = job.started_at_ms.or(Some(info.started_at_ms));
            job.finished_at_ms = Some(info.finished_at_ms.unwrap_or_else(now_ms));
            Report::Write(Box::new(job))
        }
    }
}

/// Fails the `candidates` (see [`started_on`]) that the agent does not know (lost with its
/// state).
pub(crate) async fn fail_unknown(inner: &Arc<Inner>, candidates: Vec<Job>, known: &[JobInfo]) {
    for job in candidates {
        if !known.iter().any(|k| k.id == job.id) {
            let message = "the agent has no record of this job; it was lost".to_string();
            fail(inner, job, JobTerminationReason::ExecutorError, message).await;
        }
    }
}

/// The jobs an instance's agent must know: those the store shows running there. Read them
/// *before* asking the agent, so that a job started in between is not taken for lost.
pub(crate) fn started_on(inner: &Inner, instance_id: &str) -> Vec<Job> {
    let statuses = [JobStatus::Running, JobStatus::Terminating];
    let jobs = inner.store.jobs_with_status(&statuses).unwrap_or_default();
    jobs.into_iter()
        .filter(|j| j.instance_id.as_deref() == Some(instance_id))
        .collect()
}

/// Fails every unfinished job placed on an instance that cannot be reached.
pub(crate) async fn fail_unreachable(inner: &Arc<Inner>, instance_id: &str, error: &AgentError) {
    let Ok(jobs) = inner.store.jobs_with_status(&UNFINISHED[1..]) else {
        return;
    };
    for job in jobs
        .into_iter()
        .filter(|j| j.instance_id.as_deref() == Some(instance_id))
    {
        let message = format!("the instance's agent cannot be reached: {error}");
        fail(
            inner,
            job,
            JobTerminationReason::InstanceUnreachable,
            message,
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, instance: &str, after: Option<&str>) -> (Job, Option<Instance>) {
        let job = Job {
            id: id.into(),
            run_id: format!("run-{id}"),
            run_name: id.into(),
            job_num: 0,
            replica_num: 0,
            submission_num: 0,
            status: JobStatus::Provisioning,
            termination_reason: None,
            termination_message: None,
            exit_status: None,
            instance_id: Some(instance.into()),
            reservation: None,
            after_job: after.map(str::to_string),
            submitted_at_ms: 0,
            started_at_ms: None,
            finished_at_ms: None,
            deployment_num: 0,
        };
        (job, None)
    }

    fn ids(queues: &[Vec<(Job, Option<Instance>)>]) -> Vec<Vec<&str>> {
        queues
            .iter()
            .map(|q| q.iter().map(|(j, _)| j.id.as_str()).collect())
            .collect()
    }

    #[test]
    fn jobs_are_put_in_queues_each_right_after_the_job_it_follows() {
        let jobs = vec![
            job("c", "i-1", Some("b")),
            job("x", "i-2", None),
            job("b", "i-1", Some("a")),
            // Behind a job that is not among them (running, say): the head of a queue.
            job("a", "i-1", Some("running")),
            job("y", "i-2", Some("x")),
            job("z", "i-1", None),
        ];
        assert_eq!(
            ids(&in_queues(jobs)),
            [vec!["x", "y"], vec!["a", "b", "c"], vec!["z"]]
        );
    }
}
