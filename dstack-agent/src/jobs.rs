//! The agent's jobs: submitting, stopping, removing, recovering them after a restart, and the
//! stream of their changes. Every change is recorded in the journal (see [`crate::journal`]).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use dstack_core::agent::{AgentJobStatus, JobInfo, JobSubmit, StopRequest};
use futures_util::Stream;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc, watch};

use crate::container;
use crate::journal::{JobRecord, Journal};
use crate::logs::{self, LogWriter};
use crate::process::ProcessGroup;
use crate::state::{unix_ms, StateDir};
use crate::supervisor;

/// How many changes a slow `/api/events` subscriber may fall behind before it is resent the
/// state of every job instead.
const EVENT_BACKLOG: usize = 1024;

/// What the agent says about a job that was running when the previous agent stopped.
const LOST_MESSAGE: &str = "the agent stopped while the job was running; the job was lost";

/// Why a request about jobs failed (each maps to an HTTP status).
#[derive(Debug, thiserror::Error)]
pub(crate) enum JobError {
    /// The request is invalid (400).
    #[error("{0}")]
    BadRequest(String),
    /// No such job (404).
    #[error("no job {0}")]
    NotFound(String),
    /// The job is in the wrong state for the request (409).
    #[error("{0}")]
    Conflict(String),
    /// The agent's state directory failed (500).
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// One job: its spec, its process group, and its current state, which is published to
/// followers of its logs (every change, including output growth) and to event subscribers
/// (every change of status).
pub(crate) struct Job {
    /// Where its output goes (created with the first output).
    dir: PathBuf,
    journal: Arc<Journal>,
    spec: JobSubmit,
    process: Option<ProcessGroup>,
    info: watch::Sender<JobInfo>,
    stops: Option<mpsc::UnboundedSender<StopRequest>>,
    events: broadcast::Sender<JobInfo>,
}

impl Job {
    /// The submission.
    pub fn spec(&self) -> &JobSubmit {
        &self.spec
    }

    /// The current state.
    pub fn info(&self) -> JobInfo {
        self.info.borrow().clone()
    }

    /// Records a change of state: appends it to the journal, then publishes it.
    pub fn transition(&self, info: JobInfo) {
        let record = JobRecord {
            info: info.clone(),
            spec: self.spec.clone(),
            process: self.process.clone(),
        };
        if let Err(e) = self.journal.record(record) {
            eprintln!("dstack-agent: cannot record job {}: {e}", self.spec.id);
        }
        self.info.send_replace(info.clone());
        // No subscriber is not an error.
        let _ = self.events.send(info);
    }

    /// Publishes output growth to log followers (not persisted: the log file is the truth).
    pub fn set_log_bytes(&self, log_bytes: u64) {
        self.info.send_modify(|info| info.log_bytes = log_bytes);
    }

    /// The job's output from `offset`, following it while the job runs if `follow`.
    pub async fn logs(
        &self,
        offset: u64,
        follow: bool,
    ) -> io::Result<impl Stream<Item = io::Result<Bytes>> + Send> {
        logs::stream(
            &logs::log_path(&self.dir),
            offset,
            follow,
            self.info.subscribe(),
        )
        .await
    }
}

/// Every job of the agent, keyed by id.
pub(crate) struct Jobs {
    /// The directory holding the directories of jobs.
    root: PathBuf,
    journal: Arc<Journal>,
    jobs: Mutex<BTreeMap<String, Arc<Job>>>,
    events: broadcast::Sender<JobInfo>,
    /// The container engine's socket, for `image:` jobs.
    containers: Option<String>,
    /// The containers of jobs that were running when the previous agent stopped.
    lost_containers: Vec<String>,
}

impl Jobs {
    /// Runs `image:` jobs with the container engine at `socket`.
    pub fn with_containers(mut self, socket: Option<String>) -> Jobs {
        self.containers = socket;
        self
    }

    /// Loads the jobs recorded in the state directory (compacting its journal). Jobs recorded
    /// as running belonged to an agent that is gone, so nobody can wait for their processes
    /// any more: what is left of them is killed and they are recorded as lost.
    pub fn recover(state: &StateDir) -> io::Result<Jobs> {
        let root = state.jobs();
        let (journal, records) = Journal::open(&state.journal(), &root)?;
        let journal = Arc::new(journal);
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        let mut jobs = BTreeMap::new();
        let mut lost_containers = Vec::new();
        for record in records {
            // Only a hand-edited journal holds ids that could name a path outside `root`.
            if let Err(e) = validate(&record.spec) {
                eprintln!("dstack-agent: skipping a job record: {e}");
                continue;
            }
            let dir = root.join(&record.spec.id);
            let mut log = match LogWriter::open(&dir) {
                Ok(log) => log,
                Err(e) => {
                    eprintln!("dstack-agent: skipping {}: {e}", dir.display());
                    continue;
                }
            };
            let mut info = record.info;
            info.log_bytes = log.len();
            let lost = !info.status.is_finished();
            let job = Job {
                dir,
                journal: journal.clone(),
                spec: record.spec,
                process: record.process,
                info: watch::Sender::new(info.clone()),
                stops: None,
                events: events.clone(),
            };
            if lost {
                if let Some(group) = &job.process {
                    group.kill_leftovers();
                }
                if job.spec.container.is_some() {
                    lost_containers.push(container::name(&job.spec.id));
                }
                job.transition(failed(info, "executor_error", LOST_MESSAGE, &mut log));
            }
            jobs.insert(job.spec.id.clone(), Arc::new(job));
        }
        Ok(Jobs {
            root,
            journal,
            jobs: Mutex::new(jobs),
            events,
            containers: None,
            lost_containers,
        })
    }

    /// Removes the containers of the jobs recovery found lost (their agent could no longer
    /// follow them), so none keeps running or lingers; needs the container engine.
    pub async fn remove_lost_containers(&self) {
        if let Some(socket) = &self.containers {
            container::remove_all(socket, &self.lost_containers).await;
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What the job wrote to its metrics file (`$DSTACK_METRICS_FILE`); empty when nothing.
    pub fn metrics(&self, id: &str) -> Result<Vec<u8>, JobError> {
        let job = self.get(id)?;
        match fs::read(metrics_path(&self.root, &job.spec.id)) {
            Ok(bytes) => Ok(bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }

    /// Starts a job, or returns the job already submitted with this id. A job whose process
    /// cannot start is recorded as failed with `executor_error`.
    pub fn submit(&self, mut spec: JobSubmit) -> Result<JobInfo, JobError> {
        validate(&spec)?;
        let mut jobs = self.lock();
        if let Some(job) = jobs.get(&spec.id) {
            return Ok(job.info());
        }
        let dir = self.root.join(&spec.id);
        // Output left behind by an earlier job of this id (e.g. its removal was interrupted)
        // is not this job's.
        remove_dir_if_exists(&dir)?;
        let metrics = metrics_path(&self.root, &spec.id);
        remove_file_if_exists(&metrics)?;
        let mut log = LogWriter::open(&dir)?;
        spec.env
            .insert(METRICS_ENV.to_string(), metrics.display().to_string());
        if let Some(hosts) = &spec.mpi_hostfile {
            let hostfile = hostfile_path(&self.root, &spec.id);
            fs::write(&hostfile, hosts)?;
            spec.env
                .insert(HOSTFILE_ENV.to_string(), hostfile.display().to_string());
        }
        let mut job = Job {
            dir,
            journal: self.journal.clone(),
            info: watch::Sender::new(running(&spec.id)),
            spec,
            process: None,
            stops: None,
            events: self.events.clone(),
        };
        if job.spec.container.is_some() {
            let (stops, stop_requests) = mpsc::unbounded_channel();
            job.stops = Some(stops);
            let job = Arc::new(job);
            job.transition(job.info());
            crate::container::supervise(job.clone(), self.containers.clone(), log, stop_requests);
            jobs.insert(job.spec.id.clone(), job.clone());
            return Ok(job.info());
        }
        let job = match supervisor::launch(&job.spec) {
            Ok(launched) => {
                let (stops, stop_requests) = mpsc::unbounded_channel();
                job.process = Some(launched.group.clone());
                job.stops = Some(stops);
                let job = Arc::new(job);
                job.transition(job.info());
                supervisor::supervise(job.clone(), launched, log, stop_requests);
                job
            }
            Err(message) => {
                job.transition(failed(job.info(), "executor_error", &message, &mut log));
                Arc::new(job)
            }
        };
        jobs.insert(job.spec.id.clone(), job.clone());
        Ok(job.info())
    }

    /// The job `id`.
    pub fn get(&self, id: &str) -> Result<Arc<Job>, JobError> {
        self.lock()
            .get(id)
            .cloned()
            .ok_or_else(|| JobError::NotFound(id.to_string()))
    }

    /// The state of every job.
    pub fn list(&self) -> Vec<JobInfo> {
        self.lock().values().map(|job| job.info()).collect()
    }

    /// Asks the job's supervisor to stop it; a finished job is left as it is.
    pub fn stop(&self, id: &str, request: StopRequest) -> Result<JobInfo, JobError> {
        let job = self.get(id)?;
        if let Some(stops) = &job.stops {
            // Fails only once the supervisor is gone, i.e. the job has finished.
            let _ = stops.send(request);
        }
        Ok(job.info())
    }

    /// Forgets a finished job: deletes its directory (logs included), then records the removal
    /// in the journal.
    pub fn remove(&self, id: &str) -> Result<(), JobError> {
        let mut jobs = self.lock();
        let job = jobs
            .get(id)
            .ok_or_else(|| JobError::NotFound(id.to_string()))?;
        if !job.info().status.is_finished() {
            return Err(JobError::Conflict(format!("job {id} is running")));
        }
        remove_dir_if_exists(&job.dir)?;
        remove_file_if_exists(&metrics_path(&self.root, id))?;
        remove_file_if_exists(&hostfile_path(&self.root, id))?;
        self.journal.remove(id)?;
        jobs.remove(id);
        Ok(())
    }

    /// Newline-delimited JSON [`JobInfo`]s: every job now, then every change. A subscriber
    /// that falls too far behind is sent every job again.
    pub fn events(self: &Arc<Self>) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        let changes = self.events.subscribe();
        let pending = Some(self.snapshot());
        futures_util::stream::unfold(
            (self.clone(), changes, pending),
            |(jobs, mut changes, mut pending)| async move {
                loop {
                    if let Some(lines) = pending.take().filter(|lines| !lines.is_empty()) {
                        return Some((Ok(lines), (jobs, changes, None)));
                    }
                    match changes.recv().await {
                        Ok(info) => return Some((Ok(json_lines([info])), (jobs, changes, None))),
                        Err(RecvError::Lagged(_)) => pending = Some(jobs.snapshot()),
                        Err(RecvError::Closed) => return None,
                    }
                }
            },
        )
    }

    fn snapshot(&self) -> Bytes {
        json_lines(self.list())
    }
}

fn json_lines(infos: impl IntoIterator<Item = JobInfo>) -> Bytes {
    let mut out = Vec::new();
    for info in infos {
        // A JobInfo always serializes.
        if serde_json::to_writer(&mut out, &info).is_ok() {
            out.push(b'\n');
        }
    }
    out.into()
}

/// Rejects submissions the agent cannot even record.
fn validate(spec: &JobSubmit) -> Result<(), JobError> {
    let id_ok = !spec.id.is_empty()
        && spec.id.len() <= 200
        && !spec.id.starts_with('.')
        && spec
            .id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !id_ok {
        return Err(JobError::BadRequest(format!(
            "invalid job id {:?}: use letters, digits, '-', '_' and '.'",
            spec.id
        )));
    }
    if spec.argv.is_empty() && spec.container.is_none() {
        return Err(JobError::BadRequest("argv must not be empty".to_string()));
    }
    Ok(())
}

/// The variable that tells a job where to append its metrics (JSON lines).
pub const METRICS_ENV: &str = "DSTACK_METRICS_FILE";

/// The metrics file of job `id`: beside the job directories, so that it exists before the
/// job's first output creates its directory.
fn metrics_path(root: &Path, id: &str) -> PathBuf {
    root.join(format!("{id}.metrics.jsonl"))
}

/// The variable that names a multi-node job's MPI hostfile.
pub const HOSTFILE_ENV: &str = "DSTACK_MPI_HOSTFILE";

/// The MPI hostfile of job `id`.
fn hostfile_path(root: &Path, id: &str) -> PathBuf {
    root.join(format!("{id}.hostfile"))
}

fn remove_file_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn remove_dir_if_exists(dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// A job starting now.
fn running(id: &str) -> JobInfo {
    JobInfo {
        id: id.to_string(),
        status: AgentJobStatus::Running,
        exit_status: None,
        termination_reason: None,
        termination_message: None,
        started_at_ms: unix_ms(),
        finished_at_ms: None,
        log_bytes: 0,
    }
}

/// `job` failed without an exit status; `message` is also appended to its log.
fn failed(job: JobInfo, reason: &str, message: &str, log: &mut LogWriter) -> JobInfo {
    if let Err(e) = log.append_message(message) {
        eprintln!(
            "dstack-agent: cannot write to the log of job {}: {e}",
            job.id
        );
    }
    JobInfo {
        status: AgentJobStatus::Failed,
        termination_reason: Some(reason.to_string()),
        termination_message: Some(message.to_string()),
        finished_at_ms: Some(unix_ms()),
        log_bytes: log.len(),
        ..job
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use futures_util::StreamExt;

    use super::*;

    #[tokio::test]
    async fn a_lagging_event_subscriber_is_sent_every_job_again() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let jobs = Arc::new(Jobs::recover(&state).unwrap());
        let spec = JobSubmit {
            id: "nodir".into(),
            name: "nodir-0-0".into(),
            argv: vec!["/bin/true".into()],
            env: BTreeMap::new(),
            working_dir: "/no/such/dir".into(),
            max_duration_secs: None,
            mpi_hostfile: None,
            container: None,
        };
        let failed = jobs.submit(spec).unwrap();
        let snapshot = json_lines([failed.clone()]);

        let mut events = Box::pin(jobs.events());
        assert_eq!(events.next().await.unwrap().unwrap(), snapshot);
        let other = JobInfo {
            id: "other".into(),
            ..failed
        };
        for _ in 0..EVENT_BACKLOG + 10 {
            jobs.events.send(other.clone()).unwrap();
        }
        assert_eq!(events.next().await.unwrap().unwrap(), snapshot);
        assert_eq!(events.next().await.unwrap().unwrap(), json_lines([other]));
    }
}
