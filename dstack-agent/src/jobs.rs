//! The agent's jobs: submitting, stopping, removing, recovering them after a restart, and the
//! stream of their changes. Every change is recorded in the journal (see [`crate::journal`]).
//!
//! A job submitted to follow another ([`JobSubmit::after`]) is `queued` until that one ends,
//! and starts the moment it does: before the end is published, so that whoever learns of the
//! end finds the follower started. Jobs queue one behind the other (a running job, the job
//! queued behind it, the job queued behind that one, ...) and start in that order. A queued
//! job can be stopped (it never starts) or removed (taken back: as if it had never been
//! submitted); the job behind it then waits for the one before it.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Seek};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};

use bytes::Bytes;
use dstack_core::agent::{AgentJobStatus, JobInfo, JobSubmit, StopRequest, EVENTS_HEARTBEAT};
use futures_util::Stream;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{broadcast, mpsc, watch};

use crate::archives::{self, Archives};
use crate::container;
use crate::journal::{JobRecord, Journal};
use crate::logs::{self, LogWriter, Rotation};
use crate::process::ProcessGroup;
use crate::state::{random_hex, unix_ms, StateDir};
use crate::supervisor;
use crate::Limits;

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
    /// Its private directory outside the agent's state (its metrics file and MPI hostfile):
    /// nothing a job is given points into the agent's state directory. `None` for jobs of
    /// older agents, whose files are beside the job directories.
    scratch: Option<PathBuf>,
    journal: Arc<Journal>,
    /// The submission, without what it runs (see `command`).
    spec: JobSubmit,
    /// What it runs, kept until it starts: a job that has started keeps neither its `argv`,
    /// its `env` nor its registry credentials in memory (the journal never holds the latter
    /// two: see [`crate::journal`]).
    command: Mutex<Option<Command>>,
    /// Set when the process starts.
    process: OnceLock<ProcessGroup>,
    info: watch::Sender<JobInfo>,
    /// Stop requests for its supervisor, while it runs (dropped when it ends: a finished job
    /// keeps no channel).
    stops: Mutex<Option<mpsc::UnboundedSender<StopRequest>>>,
    events: broadcast::Sender<JobInfo>,
    /// The agent's jobs, which start the job queued behind this one when it ends.
    owner: Weak<Jobs>,
    /// The job queued behind this one, if any.
    follower: Mutex<Option<String>>,
    /// The job this one is queued behind, while it is queued.
    leader: Mutex<Option<String>>,
    /// Whether the journal holds the whole job (later changes append only its state).
    journaled: AtomicBool,
}

impl Job {
    /// The submission, without its `argv` and `env` (see [`Job::submission`]).
    pub fn spec(&self) -> &JobSubmit {
        &self.spec
    }

    /// The whole submission: with its `argv`, `env` and registry credentials until it starts.
    fn submission(&self) -> JobSubmit {
        let mut spec = self.spec.clone();
        if let Some(command) = lock(&self.command).as_ref() {
            command.fill(&mut spec);
        }
        spec
    }

    /// The process group it runs in, once it started as a process of the host (container
    /// jobs have none).
    pub fn process(&self) -> Option<&ProcessGroup> {
        self.process.get()
    }

    /// The current state.
    pub fn info(&self) -> JobInfo {
        self.info.borrow().clone()
    }

    /// Records a change of state: appends it to the journal (the whole job the first time,
    /// the new state after that), then publishes it (to event subscribers unless it is
    /// `queued`).
    pub fn transition(&self, info: JobInfo) {
        let recorded = if self.journaled.load(Ordering::SeqCst) {
            self.journal.update(&info, self.process.get())
        } else {
            let record = JobRecord {
                info: info.clone(),
                spec: self.submission(),
                process: self.process.get().cloned(),
                scratch: self.scratch.clone(),
                withheld: false,
            };
            let recorded = self.journal.record(record);
            self.journaled.store(recorded.is_ok(), Ordering::SeqCst);
            recorded
        };
        if let Err(e) = recorded {
            eprintln!("dstack-agent: cannot record job {}: {e}", self.spec.id);
        }
        let queued = info.status == AgentJobStatus::Queued;
        if info.status.is_finished() {
            // Nothing can stop or start it any more (a queued job may end without starting).
            lock(&self.stops).take();
            lock(&self.command).take();
        }
        self.info.send_replace(info.clone());
        // Being queued is no event: the submitter learns it from the reply. No subscriber is
        // not an error.
        if !queued {
            let _ = self.events.send(info);
        }
    }

    /// Its private directory (the system's temporary directory for jobs of older agents).
    pub fn scratch(&self) -> PathBuf {
        self.scratch.clone().unwrap_or_else(std::env::temp_dir)
    }

    /// The fresh directory a host process starts in (or below, for a relative working
    /// directory) when it has a repo or files and no absolute working directory (inside its private directory; removed when it ends, as
    /// a container's filesystem is); `None` for any other job.
    fn workspace(&self) -> Option<PathBuf> {
        let own_dir = self.spec.container.is_none()
            && (!self.spec.archives.is_empty() || self.spec.clone.is_some())
            && !self.spec.working_dir.starts_with('/');
        match (&self.scratch, own_dir) {
            (Some(scratch), true) => Some(scratch.join("work")),
            _ => None,
        }
    }

    /// The directory a host process runs in: its fresh directory (or the relative working
    /// directory below it), else its own working directory.
    pub fn host_working_dir(&self) -> PathBuf {
        match (self.workspace(), self.spec.working_dir.as_str()) {
            (Some(workspace), "") => workspace,
            (Some(workspace), dir) => workspace.join(dir.trim_start_matches("./")),
            (None, dir) => PathBuf::from(dir),
        }
    }

    /// Records the job's final state, once its process (or container) is gone; the job
    /// queued behind it starts first.
    pub fn finish(&self, info: JobInfo) {
        if !self.spec.artifacts.is_empty() && self.spec.container.is_none() {
            crate::artifacts::keep_host(self, self.workspace().is_some());
        }
        if let Some(workspace) = self.workspace() {
            tokio::task::spawn_blocking(move || remove_dir_if_exists(&workspace));
        }
        match self.owner.upgrade() {
            Some(jobs) => jobs.finish(self, info),
            None => self.transition(info),
        }
    }

    /// The job queued behind this one, if it is still queued.
    fn queued_follower(&self, jobs: &BTreeMap<String, Arc<Job>>) -> Option<Arc<Job>> {
        let follower = lock(&self.follower).clone()?;
        jobs.get(&follower)
            .filter(|f| f.info().status == AgentJobStatus::Queued)
            .cloned()
    }

    /// Publishes output growth to log followers (not persisted: the log file is the truth).
    pub fn set_log_bytes(&self, log_bytes: u64) {
        self.info.send_modify(|info| info.log_bytes = log_bytes);
    }

    /// The job's output from `offset` (or from the first chunk written at `since_ms` or later,
    /// when that is further), following it while the job runs if `follow`.
    pub async fn logs(
        &self,
        offset: u64,
        since_ms: Option<u64>,
        follow: bool,
    ) -> io::Result<impl Stream<Item = io::Result<Bytes>> + Send> {
        let offset = match since_ms {
            Some(since) => offset.max(logs::offset_since(&self.dir, since)?),
            None => offset,
        };
        logs::stream(&self.dir, offset, follow, self.info.subscribe()).await
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
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
    /// Itself, for the jobs it creates.
    this: Weak<Jobs>,
    /// Set when the agent stops serving: queued jobs no longer start (the next agent on the
    /// state directory starts them).
    closed: AtomicBool,
    /// How many finished jobs are kept, and how much output of each.
    limits: Limits,
    /// The directories no container may mount (the agent's state, its socket's directory),
    /// resolved.
    private: Vec<PathBuf>,
    /// The archives jobs start from.
    archives: Arc<Archives>,
}

impl Jobs {
    /// Loads the jobs recorded in the state directory (compacting its journal); `image:` jobs
    /// run with the container engine at `containers`. Jobs recorded as running belonged to
    /// an agent that is gone, so nobody can wait for their processes any more: what is left
    /// of them is killed and they are recorded as lost. Jobs recorded as queued start now
    /// (the jobs they followed have ended, if only as lost). Needs a Tokio runtime.
    /// Only the last [`Limits::finished_jobs`] finished jobs are kept. No container may mount
    /// the state directory, the directories in `private`, what they contain or what contains
    /// them.
    pub fn recover(
        state: &StateDir,
        containers: Option<String>,
        limits: Limits,
        private: &[&Path],
    ) -> io::Result<Arc<Jobs>> {
        let private = std::iter::once(state.root())
            .chain(private.iter().copied())
            .map(|dir| dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf()))
            .collect();
        let root = state.jobs();
        let (journal, records) = Journal::open(&state.journal(), &root)?;
        let journal = Arc::new(journal);
        let jobs = Arc::new_cyclic(|this| {
            let (events, _) = broadcast::channel(EVENT_BACKLOG);
            let mut jobs = Jobs {
                root,
                journal,
                jobs: Mutex::new(BTreeMap::new()),
                events,
                containers,
                lost_containers: Vec::new(),
                this: this.clone(),
                closed: AtomicBool::new(false),
                limits,
                private,
                archives: Arc::new(Archives::new(state.root().join("archives"))),
            };
            jobs.load(records);
            jobs
        });
        jobs.retain(&mut jobs.lock());
        // Queued jobs wait behind the queued jobs they were submitted to follow; the first
        // of each queue starts (what it waited for ended, if only as lost).
        let heads: Vec<Arc<Job>> = {
            let all = jobs.lock();
            let queued = |id: &str| {
                all.get(id)
                    .filter(|j| j.info().status == AgentJobStatus::Queued)
            };
            let mut heads = Vec::new();
            for job in all.values() {
                if job.info().status != AgentJobStatus::Queued {
                    continue;
                }
                match job.spec.after.as_deref().and_then(queued) {
                    Some(leader) => {
                        *lock(&leader.follower) = Some(job.spec.id.clone());
                        *lock(&job.leader) = Some(leader.spec.id.clone());
                    }
                    None => heads.push(job.clone()),
                }
            }
            heads
        };
        for job in heads {
            jobs.launch(job);
        }
        Ok(jobs)
    }

    /// Loads recovered records (see [`Jobs::recover`]), recording running ones as lost.
    fn load(&mut self, records: Vec<JobRecord>) {
        let root = &self.root;
        let mut jobs = BTreeMap::new();
        for record in records {
            // Only a hand-edited journal holds ids that could name a path outside `root`.
            if let Err(e) = validate_id(&record.spec.id) {
                eprintln!("dstack-agent: skipping a job record: {e}");
                continue;
            }
            let dir = root.join(&record.spec.id);
            let mut log = match LogWriter::open(&dir, self.rotation()) {
                Ok(log) => log,
                Err(e) => {
                    eprintln!("dstack-agent: skipping {}: {e}", dir.display());
                    continue;
                }
            };
            let mut info = record.info;
            info.log_bytes = log.len();
            let lost = info.status == AgentJobStatus::Running;
            if record.withheld && info.status == AgentJobStatus::Queued {
                // Its environment and registry credentials were kept only in memory: it is
                // forgotten, and its submitter sends it again (the engine re-sends every job
                // it placed that an agent does not know).
                eprintln!(
                    "dstack-agent: forgetting queued job {}: its environment was kept only in \
                     memory",
                    record.spec.id
                );
                let _ = std::fs::remove_dir_all(&dir);
                if let Some(scratch) = &record.scratch {
                    let _ = std::fs::remove_dir_all(scratch);
                }
                continue;
            }
            let job = self.job(record.spec, info.clone(), record.scratch);
            if info.status != AgentJobStatus::Queued {
                // It will not start (again): what it ran is of no more use.
                lock(&job.command).take();
            }
            job.journaled.store(true, Ordering::SeqCst); // the compacted journal holds it
            if let Some(group) = record.process {
                let _ = job.process.set(group);
            }
            if lost {
                if let Some(group) = job.process.get() {
                    group.kill_leftovers();
                }
                if job.spec.container.is_some() {
                    self.lost_containers.push(container::name(&job.spec.id));
                }
                job.transition(failed(info, "executor_error", LOST_MESSAGE, &mut log));
            }
            jobs.insert(job.spec.id.clone(), Arc::new(job));
        }
        self.jobs = Mutex::new(jobs);
    }

    /// A job of this agent, in state `info` (not recorded yet), whose private directory is
    /// `scratch`.
    fn job(&self, mut spec: JobSubmit, info: JobInfo, scratch: Option<PathBuf>) -> Job {
        let command = Command {
            argv: std::mem::take(&mut spec.argv),
            env: std::mem::take(&mut spec.env),
            registry_auth: spec.container.as_mut().and_then(|c| c.registry_auth.take()),
        };
        Job {
            dir: self.root.join(&spec.id),
            scratch,
            journal: self.journal.clone(),
            command: Mutex::new(Some(command)),
            spec,
            process: OnceLock::new(),
            info: watch::Sender::new(info),
            stops: Mutex::new(None),
            events: self.events.clone(),
            owner: self.this.clone(),
            follower: Mutex::new(None),
            leader: Mutex::new(None),
            journaled: AtomicBool::new(false),
        }
    }

    /// The archives jobs start from.
    pub fn archives(&self) -> &Archives {
        &self.archives
    }

    /// The container engine's socket `image:` jobs run with, if any.
    pub fn container_engine(&self) -> Option<&str> {
        self.containers.as_deref()
    }

    /// Removes the containers of the jobs recovery found lost (their agent could no longer
    /// follow them), so none keeps running or lingers; needs the container engine.
    pub async fn remove_lost_containers(&self) {
        if let Some(socket) = &self.containers {
            container::remove_all(socket, &self.lost_containers).await;
        }
    }

    /// Refuses a container mount that would give the job the agent's state or socket.
    fn check_mounts(&self, spec: &JobSubmit) -> Result<(), JobError> {
        let mounts = spec.container.iter().flat_map(|c| &c.mounts);
        for (host, inside) in mounts {
            let path = Path::new(host);
            let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
            if let Some(dir) = self
                .private
                .iter()
                .find(|dir| path.starts_with(dir) || dir.starts_with(&path))
            {
                return Err(JobError::BadRequest(format!(
                    "volume {host}:{inside} would give the container the agent's own files \
                     ({}): mount a directory outside it",
                    dir.display()
                )));
            }
        }
        Ok(())
    }

    /// How jobs' output is split into files.
    fn rotation(&self) -> Rotation {
        Rotation {
            file_bytes: self.limits.log_file_bytes,
            files: self.limits.log_files,
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Job>>> {
        lock(&self.jobs)
    }

    /// What the job wrote to its metrics file (`$DSTACK_METRICS_FILE`): its last lines, at
    /// most `max_bytes` of them (see [`crate::Limits::metrics_bytes`]); empty when nothing.
    pub fn metrics(&self, id: &str, max_bytes: u64) -> Result<Vec<u8>, JobError> {
        let job = self.get(id)?;
        Ok(read_tail(&job.metrics_path(&self.root), max_bytes)?)
    }

    /// Submits `specs` in order (see [`Jobs::submit`]): a queue, each job behind the one before
    /// it. Stops at the first that is refused, with why; those before it are submitted.
    pub fn submit_all(&self, specs: Vec<JobSubmit>) -> Result<Vec<JobInfo>, JobError> {
        specs.into_iter().map(|spec| self.submit(spec)).collect()
    }

    /// Starts a job (or queues it behind the job it follows), or returns the job already
    /// submitted with this id. A job whose process cannot start is recorded as failed with
    /// `executor_error`.
    pub fn submit(&self, mut spec: JobSubmit) -> Result<JobInfo, JobError> {
        validate(&spec)?;
        self.check_mounts(&spec)?;
        let mut jobs = self.lock();
        if let Some(job) = jobs.get(&spec.id) {
            return Ok(job.info());
        }
        self.archives
            .hold(&spec.archives)
            .map_err(JobError::BadRequest)?;
        let leader = match spec.after.as_deref() {
            // A job this agent does not know may not have reached it yet: starting now could
            // run both at once.
            Some(id) if !jobs.contains_key(id) => {
                return Err(JobError::Conflict(format!(
                    "job {id} is unknown here: cannot queue behind it"
                )));
            }
            // A job that has ended is no reason to wait.
            Some(id) => jobs
                .get(id)
                .filter(|leader| !leader.info().status.is_finished())
                .cloned(),
            None => None,
        };
        if let Some(follower) = leader.as_ref().and_then(|l| l.queued_follower(&jobs)) {
            return Err(JobError::Conflict(format!(
                "job {} already follows job {}",
                follower.spec.id,
                spec.after.as_deref().unwrap_or_default()
            )));
        }
        let dir = self.root.join(&spec.id);
        // Output left behind by an earlier job of this id (e.g. its removal was interrupted)
        // is not this job's.
        remove_dir_if_exists(&dir)?;
        let scratch = create_scratch_dir()?;
        let metrics = scratch.join(METRICS_FILE);
        spec.env
            .insert(METRICS_ENV.to_string(), metrics.display().to_string());
        if let Some(hosts) = &spec.mpi_hostfile {
            let hostfile = scratch.join(HOSTFILE);
            fs::write(&hostfile, hosts)?;
            spec.env
                .insert(HOSTFILE_ENV.to_string(), hostfile.display().to_string());
        }
        let queued = state(&spec.id, AgentJobStatus::Queued);
        let job = Arc::new(self.job(spec, queued.clone(), Some(scratch)));
        jobs.insert(job.spec.id.clone(), job.clone());
        match leader {
            Some(leader) => {
                *lock(&leader.follower) = Some(job.spec.id.clone());
                *lock(&job.leader) = Some(leader.spec.id.clone());
                job.transition(queued);
            }
            None => self.launch(job.clone()),
        }
        let info = job.info();
        self.retain(&mut jobs);
        Ok(info)
    }

    /// Starts the process (or container) of a new or queued job.
    fn launch(&self, job: Arc<Job>) {
        // Nothing has written to the directory of a job that has not started.
        let mut log = LogWriter::empty(&job.dir, self.rotation());
        let (stops, stop_requests) = mpsc::unbounded_channel();
        *lock(&job.stops) = Some(stops);
        let running = state(&job.spec.id, AgentJobStatus::Running);
        // What it runs is needed no more once it has started: a job started after a restart
        // is recorded as queued with it, and one found running after a restart is lost.
        let command = lock(&job.command).take().unwrap_or_default();
        if job.spec.container.is_some() {
            let mut submission = job.spec.clone();
            command.fill(&mut submission);
            job.transition(running);
            let socket = self.containers.clone();
            let archives = self.archives.clone();
            container::supervise(job, submission, socket, archives, log, stop_requests);
            return;
        }
        if job.spec.archives.is_empty() && job.spec.clone.is_none() {
            let working_dir = job.spec.working_dir.clone();
            // The jobs are locked here: the end is recorded as it is.
            if let Err(ended) =
                start_process(job.clone(), &working_dir, &command, log, stop_requests)
            {
                job.transition(ended);
            }
            return;
        }
        // Archives are unpacked (and a fresh directory made) away from the jobs' lock; the
        // job is running meanwhile, and a stop waits in its channel until it has started.
        job.transition(running.clone());
        let store = self.archives.clone();
        tokio::spawn(async move {
            let unpacking = job.clone();
            let mut command = command;
            let prepared = tokio::task::spawn_blocking(move || {
                let spec = unpacking.spec();
                // Relative targets and a relative working directory are taken from the
                // fresh directory, when the job has one.
                let base = match unpacking.workspace() {
                    Some(workspace) => archives::fresh_dir(&workspace)?,
                    None => spec.working_dir.clone(),
                };
                let working_dir = match spec.working_dir.as_str() {
                    dir if dir.is_empty() || dir.starts_with('/') => base.clone(),
                    dir => format!("{base}/{}", dir.trim_start_matches("./")),
                };
                let sources = (spec.archives.as_slice(), spec.clone.as_ref());
                let dir = store.unpack_for_host(sources, &base, working_dir, &mut command.env);
                dir.map(|dir| (dir, command))
            })
            .await
            .unwrap_or_else(|e| Err(format!("unpacking failed: {e}")));
            // Not under the jobs' lock: an end is recorded as any end (the job behind starts).
            let ended = match prepared {
                Ok((dir, command)) => {
                    start_process(job.clone(), &dir, &command, log, stop_requests).err()
                }
                Err(message) => Some(failed(running, "executor_error", &message, &mut log)),
            };
            if let Some(ended) = ended {
                job.finish(ended);
            }
        });
    }

    /// Records that `job` ended (`info`), starting the job queued behind it first.
    fn finish(&self, job: &Job, info: JobInfo) {
        // Under the lock: no job can be queued behind this one between the two steps.
        let mut jobs = self.lock();
        if let Some(follower) = job.queued_follower(&jobs) {
            if !self.closed.load(Ordering::SeqCst) {
                *lock(&follower.leader) = None;
                self.launch(follower);
            }
        }
        job.transition(info);
        self.retain(&mut jobs);
    }

    /// Removes the jobs that finished first while more than [`Limits::finished_jobs`] have
    /// finished (a job that cannot be removed is reported and kept).
    fn retain(&self, jobs: &mut BTreeMap<String, Arc<Job>>) {
        let mut finished: Vec<(u64, String)> = jobs
            .values()
            .filter_map(|job| {
                let info = job.info.borrow();
                info.finished_at_ms.map(|at| (at, info.id.clone()))
            })
            .collect();
        let Some(excess) = finished.len().checked_sub(self.limits.finished_jobs) else {
            return;
        };
        if excess == 0 {
            return;
        }
        finished.select_nth_unstable(excess - 1);
        for (_, id) in &finished[..excess] {
            if let Err(e) = self.remove_locked(jobs, id) {
                eprintln!("dstack-agent: cannot remove finished job {id}: {e}");
            }
        }
    }

    /// Takes queued `job` out of its queue (it is being stopped or removed): the job behind
    /// it now waits for the one before it, or starts if there is none.
    fn unqueue(&self, jobs: &BTreeMap<String, Arc<Job>>, job: &Job) {
        let leader = lock(&job.leader)
            .take()
            .and_then(|id| jobs.get(&id).cloned())
            .filter(|l| !l.info().status.is_finished());
        let follower = job.queued_follower(jobs);
        *lock(&job.follower) = None;
        if let Some(leader) = &leader {
            *lock(&leader.follower) = follower.as_ref().map(|f| f.spec.id.clone());
        }
        if let Some(follower) = follower {
            *lock(&follower.leader) = leader.as_ref().map(|l| l.spec.id.clone());
            if leader.is_none() && !self.closed.load(Ordering::SeqCst) {
                self.launch(follower);
            }
        }
    }

    /// Starts no queued job from now on: the agent has stopped serving.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// The job `id`.
    pub fn get(&self, id: &str) -> Result<Arc<Job>, JobError> {
        self.lock()
            .get(id)
            .cloned()
            .ok_or_else(|| JobError::NotFound(id.to_string()))
    }

    /// Whether a job is running or queued.
    pub fn busy(&self) -> bool {
        self.lock()
            .values()
            .any(|job| !job.info.borrow().status.is_finished())
    }

    /// Every change of a job's status from now on (but to `queued`), as `/api/events`
    /// publishes them.
    pub fn subscribe(&self) -> broadcast::Receiver<JobInfo> {
        self.events.subscribe()
    }

    /// The state of every job.
    pub fn list(&self) -> Vec<JobInfo> {
        self.lock().values().map(|job| job.info()).collect()
    }

    /// Asks the job's supervisor to stop it; a queued job is recorded as stopped (it never
    /// starts), a finished job is left as it is.
    pub fn stop(&self, id: &str, request: StopRequest) -> Result<JobInfo, JobError> {
        let jobs = self.lock();
        let job = jobs
            .get(id)
            .cloned()
            .ok_or_else(|| JobError::NotFound(id.to_string()))?;
        if job.info().status == AgentJobStatus::Queued {
            self.unqueue(&jobs, &job);
            let message = "stopped before it started";
            let mut log = LogWriter::empty(&job.dir, self.rotation());
            if let Err(e) = log.append_message(message) {
                eprintln!("dstack-agent: cannot write to the log of job {id}: {e}");
            }
            let stopping = supervisor::Stopping {
                reason: request.reason,
                message: None,
            };
            let info = supervisor::finished(job.info(), None, message.to_string(), Some(stopping));
            job.transition(JobInfo {
                log_bytes: log.len(),
                ..info
            });
            let mut jobs = jobs;
            self.retain(&mut jobs);
            return Ok(job.info());
        }
        drop(jobs);
        if let Some(stops) = lock(&job.stops).as_ref() {
            // Fails only once the supervisor is gone, i.e. the job has finished.
            let _ = stops.send(request);
        }
        Ok(job.info())
    }

    /// Forgets a finished job, or takes back a queued one (it will not start): deletes its
    /// directory (logs included), then records the removal in the journal.
    pub fn remove(&self, id: &str) -> Result<(), JobError> {
        self.remove_locked(&mut self.lock(), id)
    }

    /// [`Jobs::remove`], with the jobs locked.
    fn remove_locked(
        &self,
        jobs: &mut BTreeMap<String, Arc<Job>>,
        id: &str,
    ) -> Result<(), JobError> {
        let job = jobs
            .get(id)
            .cloned()
            .ok_or_else(|| JobError::NotFound(id.to_string()))?;
        match job.info().status {
            AgentJobStatus::Running => {
                return Err(JobError::Conflict(format!("job {id} is running")));
            }
            AgentJobStatus::Queued => self.unqueue(jobs, &job),
            _ => {}
        }
        remove_dir_if_exists(&job.dir)?;
        match &job.scratch {
            Some(scratch) => remove_dir_if_exists(scratch)?,
            None => {
                remove_file_if_exists(&legacy_path(&self.root, id, "metrics.jsonl"))?;
                remove_file_if_exists(&legacy_path(&self.root, id, "hostfile"))?;
            }
        }
        self.journal.remove(id)?;
        jobs.remove(id);
        Ok(())
    }

    /// Newline-delimited JSON [`JobInfo`]s: every job now, then every change, and an empty
    /// line after [`EVENTS_HEARTBEAT`] without one. A subscriber that falls too far behind is
    /// sent every job again.
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
                    // Nothing to report for a while: a heartbeat, so that the subscriber can
                    // tell a quiet agent from a hung one.
                    let Ok(change) = tokio::time::timeout(EVENTS_HEARTBEAT, changes.recv()).await
                    else {
                        let heartbeat = Bytes::from_static(b"\n");
                        return Some((Ok(heartbeat), (jobs, changes, None)));
                    };
                    match change {
                        Ok(info) => {
                            // Changes already waiting go out with it, in one chunk.
                            let mut infos = vec![info];
                            let mut next = None;
                            loop {
                                match changes.try_recv() {
                                    Ok(info) => infos.push(info),
                                    Err(TryRecvError::Lagged(_)) => {
                                        next = Some(jobs.snapshot());
                                        break;
                                    }
                                    Err(_) => break,
                                }
                            }
                            return Some((Ok(json_lines(infos)), (jobs, changes, next)));
                        }
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

/// Rejects submissions the agent cannot even record or run.
fn validate(spec: &JobSubmit) -> Result<(), JobError> {
    validate_id(&spec.id)?;
    if spec.argv.is_empty() && spec.container.is_none() {
        return Err(JobError::BadRequest("argv must not be empty".to_string()));
    }
    Ok(())
}

/// Rejects job ids that could name a path outside the jobs' directory.
fn validate_id(id: &str) -> Result<(), JobError> {
    let id_ok = !id.is_empty()
        && id.len() <= 200
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !id_ok {
        return Err(JobError::BadRequest(format!(
            "invalid job id {id:?}: use letters, digits, '-', '_' and '.'"
        )));
    }
    Ok(())
}

/// What a job runs, and what it needs to start that is not written down: kept in memory
/// until it starts.
#[derive(Default)]
struct Command {
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    /// The container registry's user and password.
    registry_auth: Option<(String, String)>,
}

impl Command {
    /// Puts what `spec` was submitted with back into it.
    fn fill(&self, spec: &mut JobSubmit) {
        spec.argv = self.argv.clone();
        spec.env = self.env.clone();
        if let Some(container) = &mut spec.container {
            container.registry_auth = self.registry_auth.clone();
        }
    }
}

impl Job {
    /// The job's metrics file (`$DSTACK_METRICS_FILE`), whose directory is under `root` for
    /// a job of an older agent.
    fn metrics_path(&self, root: &Path) -> PathBuf {
        match &self.scratch {
            Some(scratch) => scratch.join(METRICS_FILE),
            None => legacy_path(root, &self.spec.id, "metrics.jsonl"),
        }
    }
}

/// The variable that tells a job where to append its metrics (JSON lines).
pub const METRICS_ENV: &str = "DSTACK_METRICS_FILE";

/// The metrics file in a job's private directory.
const METRICS_FILE: &str = "metrics.jsonl";

/// The variable that names a multi-node job's MPI hostfile.
pub const HOSTFILE_ENV: &str = "DSTACK_MPI_HOSTFILE";

/// The MPI hostfile in a job's private directory.
const HOSTFILE: &str = "hostfile";

/// Starts a host process job in `working_dir` and supervises it; the job's final state
/// when it could not start (for the caller to record: with the jobs locked, or not).
fn start_process(
    job: Arc<Job>,
    working_dir: &str,
    command: &Command,
    mut log: LogWriter,
    stop_requests: mpsc::UnboundedReceiver<StopRequest>,
) -> Result<(), JobInfo> {
    let running = state(&job.spec.id, AgentJobStatus::Running);
    match supervisor::launch(working_dir, &command.argv, &command.env) {
        Ok(launched) => {
            let _ = job.process.set(launched.group.clone());
            job.transition(running);
            supervisor::supervise(job, launched, log, stop_requests);
            Ok(())
        }
        Err(message) => Err(failed(running, "executor_error", &message, &mut log)),
    }
}

/// A new private directory (0700) for a job: `dstack-job-<random>` in the system's temporary
/// directory, away from the agent's state.
fn create_scratch_dir() -> io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("dstack-job-{}", random_hex(12)?));
    fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

/// Where agents before job directories outside the state kept job `id`'s `what`
/// (`metrics.jsonl`, `hostfile`): beside the job directories.
fn legacy_path(root: &Path, id: &str, what: &str) -> PathBuf {
    root.join(format!("{id}.{what}"))
}

/// The last lines of the file at `path` within its last `max_bytes` bytes (from the first
/// line that starts within them); empty if there is no file.
fn read_tail(path: &Path, max_bytes: u64) -> io::Result<Vec<u8>> {
    let mut file = match fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let start = len.saturating_sub(max_bytes);
    file.seek(io::SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.take(max_bytes).read_to_end(&mut bytes)?;
    if start > 0 {
        // Started within a line: it begins after the first newline.
        let cut = bytes
            .iter()
            .position(|b| *b == b'\n')
            .map_or(bytes.len(), |i| i + 1);
        bytes.drain(..cut);
    }
    Ok(bytes)
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

/// A job that is `status` from now on (`queued` or `running`).
fn state(id: &str, status: AgentJobStatus) -> JobInfo {
    JobInfo {
        id: id.to_string(),
        status,
        exit_status: None,
        termination_reason: None,
        termination_message: None,
        started_at_ms: if status == AgentJobStatus::Queued {
            0
        } else {
            unix_ms()
        },
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
pub(crate) mod tests {
    use futures_util::StreamExt;

    use super::*;

    /// A job `id` running `/bin/true` in `working_dir`.
    pub(crate) fn true_job(id: &str, working_dir: &str) -> JobSubmit {
        JobSubmit {
            id: id.into(),
            name: format!("{id}-0-0"),
            argv: vec!["/bin/true".into()],
            env: BTreeMap::new(),
            working_dir: working_dir.into(),
            max_duration_secs: None,
            mpi_hostfile: None,
            after: None,
            archives: Vec::new(),
            clone: None,
            artifacts: Vec::new(),
            container: None,
        }
    }

    #[tokio::test]
    async fn a_job_lets_go_of_its_command_once_started_and_its_stop_channel_once_ended() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let jobs = Jobs::recover(&state, None, Limits::default(), &[]).unwrap();
        jobs.submit(true_job("quick", "/")).unwrap();
        let job = jobs.get("quick").unwrap();
        assert!(lock(&job.stops).is_some(), "a running job can be stopped");
        assert!(
            lock(&job.command).is_none(),
            "a started job keeps what it ran"
        );
        let mut info = job.info.subscribe();
        info.wait_for(|i| i.status.is_finished()).await.unwrap();
        assert_eq!(job.info().status, AgentJobStatus::Done);
        assert!(lock(&job.stops).is_none(), "the channel outlived the job");
        // Stopping it now is no error: it is left as it is.
        let stopped = jobs.stop(
            "quick",
            StopRequest {
                abort: true,
                grace_secs: 0,
                reason: "x".into(),
            },
        );
        assert_eq!(stopped.unwrap().status, AgentJobStatus::Done);
    }

    #[tokio::test]
    async fn a_lagging_event_subscriber_is_sent_every_job_again() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let jobs = Jobs::recover(&state, None, Limits::default(), &[]).unwrap();
        let failed = jobs.submit(true_job("nodir", "/no/such/dir")).unwrap();
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
        // Then the changes still buffered, together in one chunk.
        let rest = events.next().await.unwrap().unwrap();
        let line = json_lines([other]);
        assert!(rest.len() > line.len(), "one change per chunk");
        assert_eq!(rest.len() % line.len(), 0);
        assert!(rest.chunks(line.len()).all(|l| l == line));
    }
}
