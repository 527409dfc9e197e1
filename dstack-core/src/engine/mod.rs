//! The engine: plans runs, places their jobs on instances, starts them through the agents and
//! drives runs and jobs through dstack's state machines.
//!
//! Event-driven: submitting a run wakes the scheduler, an agent's job update wakes the run's
//! reconciliation and (when resources free up) the scheduler again. Timers exist only for
//! retry backoff. Write before act: a job is recorded `provisioning` with its reservation
//! before the agent is asked to start it, and a start is idempotent, so a crashed process
//! leaves nothing that a new one cannot finish.

mod agents;
mod artifacts;
pub(crate) mod command;
mod consolidate;
mod credentials;
pub mod fleets;
pub use fleets::Progress as FleetProgress;
mod gang;
mod host_user;
mod jobs;
pub mod names;
pub mod pool;
mod provision;
mod python;
mod queues;
pub mod rollout;
mod runs;
pub mod scaling;
mod scheduler;
mod startup;
mod sweep;
mod volumes;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, watch, Notify};
use tokio::task::AbortHandle;

pub use command::{join_commands, ports, shell_split};
pub use provision::{LeftAlone, OrphanSweep};

use crate::agent::{AgentClient, AgentError};
use crate::backend::{Compute, ComputeError};
use crate::config::mounts::{MountPoint, VolumeNames};
use crate::config::Configuration;
use crate::model::{
    now_ms, Fleet, FleetStatus, Instance, InstanceStatus, Job, JobStatus, Run, RunSpec, RunStatus,
    Volume,
};
use crate::offers::{mismatch, Availability, Offer};
use crate::secrets::Secrets;
use crate::store::{Store, StoreError};

/// Tunables of the engine (dstack's values by default).
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Delays before a failed run is resubmitted, by attempt (the last one repeats).
    pub retry_delays: Vec<Duration>,
    /// Time between SIGTERM and SIGKILL when a job is stopped unless its `stop_duration` says
    /// otherwise (dstack's default `stop_duration`, 5 minutes).
    pub stop_grace: Duration,
    /// How long an instance's agent may stay unreachable before its jobs fail with
    /// `instance_unreachable` (after the connection is found dead: for SSH hosts, after the
    /// keepalives went unanswered).
    pub unreachable_after: Duration,
    /// How long a cloud instance may take to become reachable after it was created.
    pub provisioning_timeout: Duration,
    /// How long a cloud instance's agent may stay unreachable before the instance is
    /// terminated as lost (dstack's termination deadline, 20 minutes; its fleet then gets a
    /// new one if it falls below `nodes.min`). Instances of backends that do not create them
    /// (SSH hosts, this machine) are never terminated for it.
    pub termination_deadline: Duration,
    /// Delays between attempts to bring a backend fleet back to its `nodes.min`, by attempt
    /// (the last one repeats): dstack's 1, 2, 5, 10 and 30 minutes (see `engine::consolidate`).
    pub fleet_retry_delays: Vec<Duration>,
    /// How old a `pending` instance record must be before a process that did not create it
    /// takes it as abandoned (its creator stopped mid-way) and reaps what it left.
    pub orphan_grace: Duration,
    /// How often the engine's safety net goes over the state file: work left by a process
    /// that exited mid-way, changes of other processes, reconciliations lost to an error
    /// (see `engine::sweep`). Nothing on the event-driven paths waits for it.
    pub sweep_period: Duration,
    /// How much work the tasks queued on an agent behind a running task should hold, in
    /// terms of how long tasks have lately run on its instance: the shorter the tasks, the
    /// deeper the queue (see `engine::queues`; two deep at least, 32 at most).
    pub queue_cover: Duration,
    /// How often the engine renews the owner lease of each cloud instance's agent while it
    /// watches the instance (an agent whose lease goes unrenewed for its window, ten minutes,
    /// shuts its idle instance down: see the README's "Cloud instances without an owner").
    pub lease_renewal: Duration,
    /// Where `${{ secrets.NAME }}` references are resolved when jobs are handed to their
    /// agents, and where registry passwords written in clear are kept instead of the state
    /// database (`None`: no secrets; [`crate::Client::open`] uses `$DSTACK_HOME`'s).
    pub secrets: Option<Secrets>,
    /// Where the archives runs start from are kept (`None`: runs with `repos:` or `files:`
    /// are refused; [`crate::Client::open`] uses `$DSTACK_HOME/server/archives`).
    pub archives: Option<crate::archive::ArchiveStore>,
    /// Where runs' artifacts and tags are kept (`None`: runs with `artifacts` or
    /// `depends-on` are refused; [`crate::Client::open`] uses `$DSTACK_HOME/server/
    /// artifacts`).
    pub artifacts: Option<crate::artifacts::ArtifactStore>,
    /// How often the artifacts of running runs are saved.
    pub artifacts_period: Duration,
}

impl Default for EngineOptions {
    fn default() -> Self {
        let secs = |s| Duration::from_secs(s);
        EngineOptions {
            retry_delays: vec![
                secs(15),
                secs(30),
                secs(60),
                secs(120),
                secs(300),
                secs(600),
            ],
            stop_grace: secs(300),
            unreachable_after: secs(20),
            provisioning_timeout: secs(600),
            termination_deadline: secs(20 * 60),
            fleet_retry_delays: [1, 2, 5, 10, 30].map(|m| secs(m * 60)).to_vec(),
            orphan_grace: secs(120),
            sweep_period: secs(3),
            queue_cover: Duration::from_millis(16),
            lease_renewal: secs(60),
            secrets: None,
            archives: None,
            artifacts: None,
            artifacts_period: secs(10),
        }
    }
}

/// A failure of an engine operation.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A backend failed.
    #[error(transparent)]
    Compute(#[from] ComputeError),
    /// An agent failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The configuration cannot run here.
    #[error("{0}")]
    Unsupported(String),
    /// A bad request (unknown run, invalid name, …).
    #[error("{0}")]
    Invalid(String),
    /// A port of this machine that a run's port should be forwarded to is already in use.
    #[error("{0}")]
    PortUsed(String),
    /// Artifacts or tags could not be read or written.
    #[error(transparent)]
    Artifacts(#[from] crate::artifacts::ArtifactError),
    /// The server failed or refused the request (clients of a `dstack server`).
    #[error(transparent)]
    Server(#[from] crate::client::ServerError),
}

/// The result of planning a run.
#[derive(Clone, Debug)]
pub struct RunPlan {
    /// The configuration as it will run.
    pub configuration: Configuration,
    /// Where it can run: existing instances first, then new capacity, unavailable last.
    pub offers: Vec<Offer>,
    /// Why there are no offers, when there are none.
    pub no_offers_reason: Option<String>,
    /// How many offers there are in all (`offers` keeps the first [`PLAN_OFFERS`] of new
    /// capacity).
    pub total_offers: usize,
}

/// How many offers of new capacity a plan lists.
pub const PLAN_OFFERS: usize = 50;

/// How to apply a configuration.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ApplyOptions {
    /// Overrides the run name.
    pub name: Option<String>,
    /// Extra or overriding environment variables (`-e KEY=VALUE`).
    pub env: BTreeMap<String, String>,
    /// The configuration file, for humans.
    pub configuration_path: Option<String>,
    /// The directory the run is applied from (default: the current directory).
    pub client_dir: Option<String>,
    /// The client's environment (default: this process's), from which bare `env` names and
    /// the basics of a local session are taken.
    pub client_env: Option<BTreeMap<String, String>>,
    /// The group (sweep) the run belongs to.
    pub group: Option<crate::model::RunGroup>,
    /// The archives of the configuration's `repos:` and `files:`, packed and kept in the
    /// engine's store by the client ([`crate::Client`] does it); a run whose configuration
    /// has either is refused without them.
    pub archives: Vec<crate::archive::Archive>,
    /// The workflow the configuration comes from (`dstack run WORKFLOW`): tags of the run
    /// are that workflow's.
    pub workflow: Option<String>,
    /// The paths saved as the run's artifacts (relative to its working directory).
    pub artifacts: Vec<String>,
    /// Tags whose artifacts are put into the run's working directory before it starts.
    pub depends_on: Vec<crate::artifacts::TagRef>,
}

/// Variables of the client session passed to local jobs (besides the configuration's env).
const SESSION_VARS: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TERM",
    "TMPDIR",
    "TZ",
    "VIRTUAL_ENV",
    "CONDA_PREFIX",
    "PYTHONPATH",
    "LD_LIBRARY_PATH",
];

/// The variables of `env` a run applied with `configuration` takes from its client: the
/// session basics ([`SESSION_VARS`]), the names `env` lists without a value, and those
/// `registry_auth` refers to (`${{ env.NAME }}`). What a client sends its server.
pub fn session_env(
    configuration: &Configuration,
    env: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut names: Vec<String> = SESSION_VARS.iter().map(|s| s.to_string()).collect();
    {
        let common = command::common(configuration);
        for (k, v) in &common.env.0 {
            if let crate::config::env::EnvValue::FromClient = v {
                names.push(k.clone());
            }
        }
        if let Some(auth) = &common.registry_auth {
            for text in [&auth.username, &auth.password] {
                names.extend(crate::config::interpolate::env_references(text));
            }
        }
    }
    names
        .into_iter()
        .filter_map(|k| env.get(&k).map(|v| (k, v.clone())))
        .collect()
}

/// A change of a run, as broadcast to waiters (and streamed by `runs/watch_group`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RunChange {
    /// The run id.
    pub run_id: String,
    /// Its new status.
    pub status: RunStatus,
}

pub(crate) struct Inner {
    /// The engine's own runtime (see [`EngineThread`]): background work is spawned there.
    pub(crate) runtime: tokio::runtime::Handle,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) backends: Vec<Arc<dyn Compute>>,
    pub(crate) options: EngineOptions,
    /// Wakes the scheduler (through [`Inner::wake_scheduler`] and
    /// [`Inner::wake_for_new_run`]).
    pub(crate) schedule: Notify,
    /// Bumped by every change that may free or add capacity (see `scheduler::Blocked`).
    pub(crate) capacity_epoch: std::sync::atomic::AtomicU64,
    /// What the last placement pass found no room for.
    pub(crate) blocked: Mutex<scheduler::Blocked>,
    /// How deep the agents' queues are kept, and how many tasks they hold.
    pub(crate) queues: queues::Queues,
    /// Set for the periodic placement pass, which looks further into the waiting queue.
    pub(crate) backfill: std::sync::atomic::AtomicBool,
    /// Wakes the timer of `pending` runs (retries and scheduled starts).
    pub(crate) retries: Notify,
    pub(crate) changes: broadcast::Sender<RunChange>,
    /// The status of each run someone waits on, as it changes (see [`Engine::watch_run`]).
    run_watchers: Mutex<HashMap<String, RunWatch>>,
    pub(crate) agents: Mutex<HashMap<String, AgentClient>>,
    /// The watcher task of each live instance (see `agents::watch`).
    pub(crate) watchers: Mutex<HashMap<String, AbortHandle>>,
    /// Jobs this process is starting right now.
    pub(crate) starting: Mutex<std::collections::HashSet<String>>,
    /// Per instance: held while queued jobs are sent to its agent, so that they reach it in
    /// the order they were placed (a job queued behind one not there yet is refused).
    pub(crate) queueing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Per instance: held while archives are given to its agent, so that jobs starting
    /// together from one archive upload it once.
    pub(crate) uploading: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Per run: held while a snapshot of its artifacts is taken.
    pub(crate) saving: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The definition of each unfinished run this process has dealt with.
    pub(crate) definitions: Mutex<HashMap<String, Arc<Definition>>>,
    /// Instances this process is provisioning right now.
    pub(crate) provisioning: Mutex<std::collections::HashSet<String>>,
}

/// The watch of one run's status (see [`Engine::watch_run`]).
struct RunWatch {
    sender: watch::Sender<RunStatus>,
    /// The statuses that wake its waiters (one bit per [`RunStatus`]).
    wakes: u16,
}

impl RunWatch {
    fn bit(status: RunStatus) -> u16 {
        1 << status as u16
    }

    /// The bits of the statuses for which `wake` holds.
    fn statuses(wake: impl Fn(RunStatus) -> bool) -> u16 {
        RunStatus::ALL
            .iter()
            .filter(|s| wake(**s))
            .fold(0, |bits, s| bits | RunWatch::bit(*s))
    }
}

/// What never changes about a run once it is applied, with its parsed configuration: cached
/// per unfinished run, so that placing and starting its jobs need not read the run.
pub(crate) struct Definition {
    /// The run's id.
    pub id: String,
    /// The run's name.
    pub name: String,
    /// What was applied.
    pub spec: RunSpec,
    /// `spec`'s configuration, parsed.
    pub config: Arc<Configuration>,
    /// The run's deployment (see [`Run::deployment_num`]).
    pub deployment_num: u32,
}

impl Definition {
    /// The definition of `run`, whose configuration parses to `config`.
    fn of(run: &Run, config: Arc<Configuration>) -> Definition {
        Definition {
            id: run.id.clone(),
            name: run.name.clone(),
            spec: run.spec.clone(),
            config,
            deployment_num: run.deployment_num,
        }
    }
}

struct Shared {
    inner: Arc<Inner>,
    tasks: Vec<AbortHandle>,
    _thread: EngineThread,
}

/// The thread the engine's background work runs on: a single-threaded runtime of its own, so
/// that the engine's tasks (placement, agent watchers, starts) hand work to each other
/// without crossing threads or contending for the store, whatever runtime the embedding
/// application uses. It stops when this value is dropped.
struct EngineThread {
    runtime: tokio::runtime::Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl EngineThread {
    fn start() -> std::io::Result<EngineThread> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("dstack-engine".to_string())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(EngineThread {
            runtime: handle,
            _stop: stop,
        })
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let watchers = self
            .inner
            .watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for w in watchers.values() {
            w.abort();
        }
    }
}

/// The engine. Cheap to clone; background tasks stop when the last clone is dropped.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl Engine {
    /// Starts the engine on `store` with `backends`: creates the implicit local fleet if a
    /// backend provides one, connects to every instance's agent, resumes unfinished work.
    /// Must be called within a tokio runtime.
    pub async fn start(
        store: Arc<dyn Store>,
        backends: Vec<Arc<dyn Compute>>,
        options: EngineOptions,
    ) -> Result<Engine, EngineError> {
        let thread = EngineThread::start()
            .map_err(|e| EngineError::Invalid(format!("cannot start the engine thread: {e}")))?;
        let inner = Arc::new(Inner {
            runtime: thread.runtime.clone(),
            store,
            backends,
            options,
            schedule: Notify::new(),
            capacity_epoch: Default::default(),
            blocked: Default::default(),
            queues: Default::default(),
            backfill: Default::default(),
            retries: Notify::new(),
            changes: broadcast::channel(1024).0,
            run_watchers: Mutex::new(HashMap::new()),
            queueing: Default::default(),
            uploading: Default::default(),
            saving: Default::default(),
            agents: Mutex::new(HashMap::new()),
            watchers: Mutex::new(HashMap::new()),
            starting: Mutex::new(Default::default()),
            definitions: Mutex::new(HashMap::new()),
            provisioning: Mutex::new(Default::default()),
        });
        inner.ensure_implicit_fleets().await?;
        inner.catch_up().await;
        let mut tasks = Vec::new();
        inner.watch_instances();
        let runtime = &inner.runtime;
        tasks.push(runtime.spawn(scheduler::run(inner.clone())).abort_handle());
        tasks.push(
            runtime
                .spawn(runs::pending_timer(inner.clone()))
                .abort_handle(),
        );
        tasks.push(runtime.spawn(sweep::run(inner.clone())).abort_handle());
        if inner.options.artifacts.is_some() {
            tasks.push(runtime.spawn(artifacts::keep(inner.clone())).abort_handle());
        }
        for job in inner.store.jobs_with_status(&[JobStatus::Provisioning])? {
            inner.runtime.spawn(jobs::start(inner.clone(), job, None));
        }
        for run in inner.store.runs_with_status(&[RunStatus::Terminating])? {
            runs::terminate_jobs(&inner, &run, false).await;
        }
        if inner.backends.iter().any(|b| b.creates_instances()) {
            let reaper = inner.clone();
            inner.runtime.spawn(async move {
                let _ = reaper.reap_orphans().await;
            });
        }
        inner.wake_scheduler();
        Ok(Engine {
            shared: Arc::new(Shared {
                inner,
                tasks,
                _thread: thread,
            }),
        })
    }

    fn inner(&self) -> &Arc<Inner> {
        &self.shared.inner
    }

    /// The state store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner().store
    }

    /// Where artifacts and tags are kept, if anywhere.
    pub fn artifact_store(&self) -> Option<&crate::artifacts::ArtifactStore> {
        self.inner().options.artifacts.as_ref()
    }

    /// The artifacts of run `name` (the latest of that name): saved now while it runs,
    /// frozen once it has ended.
    pub async fn artifacts(&self, name: &str) -> Result<crate::artifacts::Manifest, EngineError> {
        let run = self.run_named(name)?;
        artifacts::of_run(self.inner(), &run).await
    }

    /// Tags the artifacts of finished run `run` as `name` (of the run's workflow).
    pub async fn tag_run(
        &self,
        name: &str,
        run: &str,
    ) -> Result<crate::artifacts::Tag, EngineError> {
        let run = self.run_named(run)?;
        artifacts::tag_run(self.inner(), name, &run).await
    }

    /// Tags `files` (their content already in the store) as `:name`.
    pub async fn tag_files(
        &self,
        name: &str,
        files: Vec<crate::artifacts::FileEntry>,
    ) -> Result<crate::artifacts::Tag, EngineError> {
        artifacts::tag_files(self.inner(), name, files).await
    }

    fn run_named(&self, name: &str) -> Result<Run, EngineError> {
        self.inner()
            .store
            .run_by_name(name)?
            .ok_or_else(|| EngineError::Invalid(format!("no run named {name}")))
    }

    /// Where the archives runs start from are kept, if anywhere.
    pub fn archives(&self) -> Option<&crate::archive::ArchiveStore> {
        self.inner().options.archives.as_ref()
    }

    /// Subscribes to run status changes.
    pub fn subscribe(&self) -> broadcast::Receiver<RunChange> {
        self.inner().changes.subscribe()
    }

    /// The status of run `id` as this process changes it: a waiter on one run is woken by
    /// that run's changes to a status for which `wake` holds (and those of other waiters on the
    /// run), not by other runs' changes or by steps nobody waits for (changes made by other
    /// processes are not seen here: read the store for those). `status` is the channel's
    /// value until its first change when nobody watches the run yet (mark it seen and read the
    /// run after subscribing: nothing is missed in between).
    pub fn watch_run(
        &self,
        id: &str,
        status: RunStatus,
        wake: impl Fn(RunStatus) -> bool,
    ) -> watch::Receiver<RunStatus> {
        let mut watchers = self
            .inner()
            .run_watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        watchers.retain(|_, w| w.sender.receiver_count() > 0);
        let watch = watchers.entry(id.to_string()).or_insert_with(|| RunWatch {
            sender: watch::channel(status).0,
            wakes: 0,
        });
        watch.wakes |= RunWatch::statuses(wake);
        watch.sender.subscribe()
    }

    /// Offers for a configuration, without side effects.
    pub async fn plan(&self, configuration: &Configuration) -> Result<RunPlan, EngineError> {
        self.inner().plan(configuration).await
    }

    /// Records a run and wakes the scheduler; returns the run.
    pub async fn apply(
        &self,
        configuration: Configuration,
        opts: ApplyOptions,
    ) -> Result<Run, EngineError> {
        let mut runs = self.apply_all(vec![(configuration, opts)]).await?;
        runs.pop()
            .ok_or_else(|| EngineError::Invalid("no run was recorded".to_string()))
    }

    /// Records several runs in one transaction (all of them, or none if any is invalid) and
    /// wakes the scheduler; returns them in order. Sweeps submit their trials this way.
    pub async fn apply_all(
        &self,
        items: Vec<(Configuration, ApplyOptions)>,
    ) -> Result<Vec<Run>, EngineError> {
        let inner = self.inner();
        let mut batch: Vec<(Run, Vec<Job>, Arc<Configuration>)> = Vec::with_capacity(items.len());
        let mut generated: Vec<String> = Vec::new();
        for (configuration, opts) in items {
            let dependencies = artifacts::dependencies(inner, &opts.depends_on).await?;
            let mut prepared = inner.prepare_run(configuration, opts, &mut generated, None)?;
            prepared.0.spec.artifacts.dependencies = dependencies;
            batch.push(prepared);
        }
        let records: Vec<(&Run, &[Job])> = batch
            .iter()
            .map(|(run, jobs, _)| (run, jobs.as_slice()))
            .collect();
        inner.store.insert_runs(&records)?;
        let mut runs = Vec::with_capacity(batch.len());
        for (run, _, configuration) in batch {
            let definition = Definition::of(&run, configuration.clone());
            inner
                .definitions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(run.id.clone(), Arc::new(definition));
            inner.emit(&run);
            if run.status == RunStatus::Pending {
                inner.retries.notify_one(); // a scheduled run: the timer waits for its start
            } else {
                inner.wake_for_new_run(&configuration);
            }
            runs.push(run);
        }
        Ok(runs)
    }

    /// Opens a TCP connection to `port` on an instance's host (see `Compute::dial_port`).
    pub async fn dial_port(
        &self,
        instance_id: &str,
        port: u16,
    ) -> std::io::Result<Box<dyn crate::agent::AgentStream>> {
        let inner = self.inner();
        let instance = inner
            .store
            .instance(instance_id)
            .map_err(std::io::Error::other)?
            .ok_or_else(|| std::io::Error::other(format!("unknown instance {instance_id}")))?;
        let backend = inner.backend(&instance.backend).ok_or_else(|| {
            std::io::Error::other(format!("backend {} is not configured", instance.backend))
        })?;
        backend.dial_port(&instance, port).await
    }

    /// Applies a fleet configuration: records it, deploys every host at once (one bad host
    /// fails alone, with its reason in `status_message`), and returns the fleet with its live
    /// instances. `progress` hears each step of each host.
    pub async fn apply_fleet(
        &self,
        configuration: &Configuration,
        progress: fleets::Progress<'_>,
    ) -> Result<(Fleet, Vec<Instance>), EngineError> {
        self.inner().apply_fleet(configuration, progress).await
    }

    /// Deletes a fleet, or only its instances numbered `instance_nums` (when not empty):
    /// stops their hosts' agents and removes what was installed; refuses while jobs run on
    /// them unless `force`. Returns each instance with the error of its removal.
    pub async fn delete_fleet(
        &self,
        name: &str,
        instance_nums: &[u64],
        force: bool,
    ) -> Result<(Fleet, Vec<(Instance, Option<String>)>), EngineError> {
        self.inner().delete_fleet(name, instance_nums, force).await
    }

    /// Runs one pass of the orphan sweep now (it also runs as the engine starts and every
    /// minute): terminates the cloud resources this state's creation attempts made that it no
    /// longer holds as live, and reports those carrying its owner tag that it leaves alone.
    pub async fn reap_orphans(&self) -> Result<OrphanSweep, EngineError> {
        self.inner().reap_orphans().await
    }

    /// Applies a volume configuration: creates the disk (or registers `volume_id`) and returns
    /// the volume, `active` or `failed` with the reason.
    pub async fn apply_volume(&self, configuration: &Configuration) -> Result<Volume, EngineError> {
        self.inner().apply_volume(configuration).await
    }

    /// Deletes a volume that is attached nowhere (a registered one is only forgotten).
    pub async fn delete_volume(&self, name: &str) -> Result<Volume, EngineError> {
        self.inner().delete_volume(name).await
    }

    /// Attaches a volume to an instance of its backend and region.
    pub async fn attach_volume(
        &self,
        name: &str,
        instance_id: &str,
    ) -> Result<Volume, EngineError> {
        self.inner().attach_volume(name, instance_id).await
    }

    /// Detaches a volume from an instance (`force`: even while in use).
    pub async fn detach_volume(
        &self,
        name: &str,
        instance_id: &str,
        force: bool,
    ) -> Result<Volume, EngineError> {
        self.inner().detach_volume(name, instance_id, force).await
    }

    /// Brings service run `run_id` to `desired` replicas (see [`scaling`]): new replica jobs,
    /// or the least important ones stopped with `scaled_down`; a service at zero waits
    /// `pending`. Returns how many it had.
    pub async fn scale(&self, run_id: &str, desired: u32) -> Result<u32, EngineError> {
        scaling::scale(self.inner(), run_id, desired).await
    }

    /// Updates an active service in place (dstack's rolling deployment; see [`rollout`]):
    /// the run named in `opts` or the configuration takes the new configuration; a change of
    /// what its replicas run starts a new deployment, whose replicas `dstack server` brings
    /// up one at a time, each replacing an old one once it is ready.
    pub async fn update_service(
        &self,
        configuration: Configuration,
        opts: ApplyOptions,
    ) -> Result<Run, EngineError> {
        rollout::update(self.inner(), configuration, opts).await
    }

    /// Stops one replica of a service (`scaled_down`: a rolling deployment replaced it).
    pub async fn retire_replica(&self, run_id: &str, job_id: &str) -> Result<(), EngineError> {
        scaling::retire(self.inner(), run_id, job_id).await
    }

    /// Stops a run: gracefully (SIGTERM, then SIGKILL after the grace period) or, with
    /// `abort`, at once.
    pub async fn stop(&self, run_id: &str, abort: bool) -> Result<Run, EngineError> {
        runs::stop(self.inner(), run_id, abort).await
    }

    /// Where `${{ secrets.NAME }}` references are resolved (see [`EngineOptions::secrets`]).
    pub fn secrets(&self) -> Option<&Secrets> {
        self.inner().options.secrets.as_ref()
    }

    /// A client of the agent of an instance.
    pub async fn agent(&self, instance_id: &str) -> Result<AgentClient, EngineError> {
        self.inner().agent(instance_id).await
    }
}

/// Refuses a configuration with fields it would ignore ([`crate::config::support`]), naming
/// each field.
pub(crate) fn refuse_unsupported(configuration: &Configuration) -> Result<(), EngineError> {
    let found = crate::config::support::unsupported(configuration);
    if found.is_empty() {
        return Ok(());
    }
    let text: Vec<String> = found.iter().map(ToString::to_string).collect();
    Err(EngineError::Unsupported(text.join("; ")))
}

/// Refuses mounts a run would otherwise silently go without: network volumes (not mounted
/// into runs yet) and, for jobs run as host processes, instance directories mounted at
/// another path (that needs a container); `optional` instance mounts are skipped there.
fn check_mounts(mounts: &[MountPoint], containers: bool) -> Result<(), EngineError> {
    for (i, mount) in mounts.iter().enumerate() {
        match mount {
            MountPoint::Volume { name, path } => {
                let name = match name {
                    VolumeNames::One(name) => name.clone(),
                    VolumeNames::Any(names) => names.join(" | "),
                };
                return Err(EngineError::Unsupported(format!(
                    "volumes[{i}]: network volume `{name}` at {path}: mounting network volumes \
                     into runs is not supported yet (manage them with `dstack volume`; \
                     instance directories `/host/path:{path}` work)"
                )));
            }
            MountPoint::Instance {
                instance_path,
                path,
                optional,
            } if !containers && !optional && instance_path != path => {
                return Err(EngineError::Unsupported(format!(
                    "volumes[{i}]: {instance_path}:{path}: a job run as a host process sees \
                     the host's own paths; mounting {instance_path} at {path} needs a container \
                     (`image:`), or use the same path on both sides"
                )));
            }
            MountPoint::Instance { .. } => {}
        }
    }
    Ok(())
}

/// Refuses what the services proxy cannot do (yet), rather than ignoring it.
fn check_service(service: &crate::config::ServiceConfiguration) -> Result<(), EngineError> {
    use crate::config::service::{GatewayRef, Https, ModelSpec};
    let refuse = |what: &str| Err(EngineError::Unsupported(what.to_string()));
    if !matches!(service.gateway, None | Some(GatewayRef::Default(false))) {
        return refuse(
            "`gateway`: gateways are not supported; services are published through the \
             server's built-in proxy at <server>/proxy/services/<project>/<run>/ (auth, \
             replicas, probes, rate limits): remove `gateway` or set `gateway: false` (a \
             gateway would add a domain of your own and TLS)",
        );
    }
    if service.https == Some(Https::Enabled(false)) {
        return refuse(
            "`https: false` applies to gateways only; the built-in proxy serves the service at \
             the server's own URL: remove `https`",
        );
    }
    if let Some(ModelSpec::Tgi { .. }) = service.model {
        return refuse(
            "`model.format: tgi` is not supported yet: serve the model's OpenAI-compatible API \
             (TGI has one at /v1) and set `model: <name>` (format openai)",
        );
    }
    if service.groups.is_some() {
        return refuse(
            "replica groups (`replicas` as a list, or `groups`) are not supported yet; use \
             `replicas: N`",
        );
    }
    if service.scaling.is_none() && service.replicas.as_ref().is_some_and(|r| r.max == Some(0)) {
        return refuse("`replicas: 0` runs nothing: set at least 1");
    }
    Ok(())
}

/// Applies `-e KEY=VALUE` overrides to a run configuration's env.
fn apply_env_overrides(configuration: &mut Configuration, env: &BTreeMap<String, String>) {
    use crate::config::env::EnvValue;
    let Some(common) = command::common_mut(configuration) else {
        return;
    };
    for (k, v) in env {
        common.env.0.insert(k.clone(), EnvValue::Value(v.clone()));
    }
}

impl Inner {
    /// Starts a watcher for every ready instance that has none (instances join while the
    /// engine runs: fleets applied here or by other processes), and stops the watchers of
    /// instances that are gone.
    pub(crate) fn watch_instances(self: &Arc<Self>) {
        let Ok(instances) = self.store.instances() else {
            return;
        };
        let mut watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        for instance in instances {
            let live = matches!(instance.status, InstanceStatus::Idle | InstanceStatus::Busy);
            match (live, watchers.contains_key(&instance.id)) {
                (true, false) => {
                    let id = instance.id.clone();
                    let watcher = self.runtime.spawn(agents::watch(self.clone(), instance));
                    watchers.insert(id, watcher.abort_handle());
                }
                (false, true) if instance.status != InstanceStatus::Provisioning => {
                    if let Some(w) = watchers.remove(&instance.id) {
                        w.abort();
                    }
                }
                _ => {}
            }
        }
    }

    /// The archives a run of `common` starts from: one per local `repos:` entry (a repo
    /// given by URL is cloned by the agent) and `files:` entry, each kept in the engine's store (the client packs and uploads them before applying).
    fn checked_archives(
        &self,
        common: &crate::config::run::RunCommon,
        archives: Vec<crate::archive::Archive>,
    ) -> Result<Vec<crate::archive::Archive>, EngineError> {
        let local_repos = common.repos.iter().filter(|r| r.local_path.is_some());
        let expected = local_repos.count() + common.files.len();
        if archives.len() != expected {
            return Err(EngineError::Invalid(format!(
                "the configuration has {expected} `repos`/`files` entries but {} archives were \
                 uploaded for them (apply it through a dstack client, which packs them)",
                archives.len()
            )));
        }
        for archive in &archives {
            let kept = self
                .options
                .archives
                .as_ref()
                .and_then(|store| store.find(&archive.hash));
            if kept.is_none() {
                return Err(EngineError::Invalid(format!(
                    "archive {} (for `{}`) was not uploaded",
                    archive.hash, archive.path
                )));
            }
        }
        Ok(archives)
    }

    /// A new run and its first jobs, from a configuration as applied: `submitted` with its
    /// jobs, or, with a `schedule`, `pending` until its first start, without jobs yet. Names
    /// generated for runs of the same batch so far are in `generated` (and this run's is
    /// added).
    /// A new run of `configuration` with its first jobs; `id` keeps an existing run's id (an
    /// update in place).
    pub(crate) fn prepare_run(
        &self,
        configuration: Configuration,
        opts: ApplyOptions,
        generated: &mut Vec<String>,
        id: Option<String>,
    ) -> Result<(Run, Vec<Job>, Arc<Configuration>), EngineError> {
        self.check_runnable(&configuration)?;
        let common = command::common(&configuration);
        let now = now_ms();
        let next_start = match &common.profile.schedule {
            Some(schedule) => Some(schedule.next_after(now).ok_or_else(|| {
                EngineError::Invalid("schedule.cron: none of its expressions fires".to_string())
            })?),
            None => None,
        };
        let name = match opts.name.clone().or_else(|| common.name.clone()) {
            Some(name) if !names::is_valid(&name) => {
                return Err(EngineError::Invalid(format!(
                    "invalid run name `{name}`: use 2-41 characters of a-z, 0-9 and -, starting with a letter"
                )))
            }
            Some(name) => name,
            None => {
                let prefix = names::prefix(uuid::Uuid::new_v4().as_u128() as u64);
                let mut taken = self.store.run_names(&prefix)?;
                taken.extend(generated.iter().filter(|n| n.starts_with(&prefix)).cloned());
                let name = names::generate(&prefix, &taken);
                generated.push(name.clone());
                name
            }
        };
        let client_env = opts
            .client_env
            .clone()
            .unwrap_or_else(|| std::env::vars().collect());
        let mut captured: BTreeMap<String, String> = SESSION_VARS
            .iter()
            .filter_map(|k| client_env.get(*k).map(|v| (k.to_string(), v.clone())))
            .collect();
        for (k, v) in &common.env.0 {
            if let crate::config::env::EnvValue::FromClient = v {
                match client_env.get(k) {
                    Some(value) => {
                        captured.insert(k.clone(), value.clone());
                    }
                    None => {
                        return Err(EngineError::Invalid(format!(
                            "environment variable {k} is listed in `env` without a value, and it is not set here"
                        )))
                    }
                }
            }
        }
        let archives = self.checked_archives(common, opts.archives)?;
        let saved = crate::model::RunArtifacts {
            workflow: opts.workflow.clone(),
            paths: artifacts::checked_paths(self, &opts.artifacts)?,
            dependencies: Vec::new(),
        };
        let id = id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let mut configuration = configuration;
        apply_env_overrides(&mut configuration, &opts.env);
        credentials::seal_registry_auth(
            &mut configuration,
            &id,
            &client_env,
            self.options.secrets.as_ref(),
        )?;
        let configuration = Arc::new(configuration);
        let client_dir = match opts.client_dir {
            Some(dir) => dir,
            None => std::env::current_dir()
                .map(|d| d.display().to_string())
                .map_err(|e| {
                    EngineError::Invalid(format!("cannot read the current directory: {e}"))
                })?,
        };
        // `replicas: 0..N`: nothing runs until the first request.
        let scaled_to_zero = next_start.is_none() && command::slots(&configuration).is_empty();
        let run = Run {
            id,
            name,
            status: if next_start.is_some() || scaled_to_zero {
                RunStatus::Pending
            } else {
                RunStatus::Submitted
            },
            termination_reason: None,
            status_message: scaled_to_zero.then(|| runs::SCALED_TO_ZERO.to_string()),
            spec: RunSpec {
                configuration: crate::model::RawJson::from_value(&configuration.to_json()),
                configuration_path: opts.configuration_path,
                client_dir,
                client_env: captured,
                group: opts.group.clone(),
                archives,
                artifacts: saved,
            },
            submitted_at_ms: now,
            resubmission_attempt: 0,
            next_attempt_at_ms: None,
            next_triggered_at_ms: next_start,
            deployment_num: 0,
        };
        // A scheduled run's jobs are submitted at its start (`runs::pending_timer`).
        let jobs: Vec<Job> = match next_start {
            Some(_) => Vec::new(),
            None => command::slots(&configuration)
                .into_iter()
                .map(|slot| Job::of_slot(&run, slot, 0))
                .collect(),
        };
        Ok((run, jobs, configuration))
    }

    pub(crate) fn emit(&self, run: &Run) {
        if let Some(watch) = self
            .run_watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&run.id)
        {
            // The value is always kept current; waiters are woken only for what they wait for.
            let wakes = watch.wakes & RunWatch::bit(run.status) != 0;
            watch.sender.send_if_modified(|status| {
                *status = run.status;
                wakes
            });
        }
        let _ = self.changes.send(RunChange {
            run_id: run.id.clone(),
            status: run.status,
        });
    }

    pub(crate) fn backend(&self, name: &str) -> Option<&Arc<dyn Compute>> {
        self.backends.iter().find(|b| b.backend() == name)
    }

    /// The parsed configuration of a run by id (cached; reads the run only on a miss).
    pub(crate) fn configuration_of(&self, run_id: &str) -> Result<Arc<Configuration>, EngineError> {
        Ok(self.definition_of(run_id)?.config.clone())
    }

    /// The parsed configuration of a run (cached).
    pub(crate) fn configuration(&self, run: &Run) -> Result<Arc<Configuration>, EngineError> {
        Ok(self.definition(run)?.config.clone())
    }

    /// The definition of a run by id (cached; reads the run only on a miss).
    pub(crate) fn definition_of(&self, run_id: &str) -> Result<Arc<Definition>, EngineError> {
        if let Some(d) = self
            .definitions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(run_id)
        {
            return Ok(d.clone());
        }
        let run = self
            .store
            .run(run_id)?
            .ok_or_else(|| EngineError::Invalid(format!("unknown run {run_id}")))?;
        self.definition(&run)
    }

    /// The definition of a run (cached).
    pub(crate) fn definition(&self, run: &Run) -> Result<Arc<Definition>, EngineError> {
        let mut cache = self.definitions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = cache.get(&run.id) {
            return Ok(d.clone());
        }
        let parsed = run.spec.configuration().map_err(|e| {
            EngineError::Invalid(format!("stored configuration of run {}: {e}", run.name))
        })?;
        let definition = Arc::new(Definition::of(run, Arc::new(parsed)));
        cache.insert(run.id.clone(), definition.clone());
        Ok(definition)
    }

    fn check_runnable(&self, configuration: &Configuration) -> Result<(), EngineError> {
        let common = match configuration {
            Configuration::Task(_)
            | Configuration::Service(_)
            | Configuration::DevEnvironment(_) => command::common(configuration),
            other => {
                return Err(EngineError::Invalid(format!(
                    "a {} configuration is not a run; apply it as a {}",
                    other.type_name(),
                    other.type_name()
                )))
            }
        };
        refuse_unsupported(configuration)?;
        let needs_containers = command::needs_containers(common);
        if needs_containers
            && !self.backends.iter().any(|b| b.supports_containers())
            && !self.store.instances()?.iter().any(|i| {
                i.containers && matches!(i.status, InstanceStatus::Idle | InstanceStatus::Busy)
            })
        {
            return Err(EngineError::Unsupported(
                "container runtime not available on this backend yet: `image:` and `docker:` need \
                 one, and the local backend runs jobs as processes on this machine"
                    .to_string(),
            ));
        }
        if let Some(crate::config::profile::Retry::Policy {
            duration: Some(d), ..
        }) = &common.profile.retry
        {
            if d.0 < 0 {
                return Err(EngineError::Invalid(
                    "retry.duration cannot be negative".to_string(),
                ));
            }
        }
        if let (Configuration::Service(service), Some(_)) =
            (configuration, &common.profile.schedule)
        {
            if service.scales_to_zero() {
                return Err(EngineError::Invalid(
                    "a scheduled service cannot scale to zero: set `replicas` to at least 1"
                        .to_string(),
                ));
            }
        }
        if let Configuration::Service(service) = configuration {
            check_service(service)?;
        }
        if let Configuration::Task(t) = configuration {
            if t.groups.is_some() {
                return Err(EngineError::Unsupported(
                    "node groups (`groups:`) are not supported yet; use `nodes: N`".to_string(),
                ));
            }
        }
        check_mounts(&common.volumes, needs_containers)
    }

    async fn plan(&self, configuration: &Configuration) -> Result<RunPlan, EngineError> {
        self.check_runnable(configuration)?;
        let common = command::common(configuration);
        let spec = &common.resources;
        let mut offers = Vec::new();
        let mut reasons = Vec::new();
        let ready: Vec<Instance> = self
            .store
            .instances()?
            .into_iter()
            .filter(|i| {
                matches!(i.status, InstanceStatus::Idle | InstanceStatus::Busy) && !i.unreachable
            })
            .collect();
        let fleets = self.store.fleets()?;
        for instance in &ready {
            let fleet = pool::fleet_name(&fleets, instance);
            if let Some(why) = pool::mismatch(&common.profile, instance, fleet) {
                reasons.push(format!("{}: {why}", instance.name));
            }
        }
        for instance in scheduler::eligible(&ready, &fleets, common) {
            match mismatch(spec, &instance.host) {
                Some(reason) => reasons.push(format!("{}: {reason}", instance.name)),
                None => {
                    let busy = !self
                        .store
                        .jobs_with_status(&[JobStatus::Running])?
                        .is_empty();
                    offers.push(Offer {
                        backend: instance.backend.clone(),
                        instance_type: scheduler::instance_type(instance).to_string(),
                        region: scheduler::instance_region(instance).to_string(),
                        price: instance.price,
                        spot: false,
                        resources: instance.host.clone(),
                        availability: if busy {
                            Availability::Busy
                        } else {
                            Availability::Idle
                        },
                        availability_zones: None,
                        backend_data: serde_json::Value::Null,
                    });
                }
            }
        }
        let request = crate::backend::OfferRequest {
            filter: crate::offers::query::QueryFilter::for_run(common),
            disk: spec.disk.as_ref().map(|d| d.size),
        };
        let (cloud, errors) = self.cloud_offers(&request, &[&common.profile]).await;
        reasons.extend(errors);
        let total_offers = offers.len() + cloud.len();
        offers.extend(cloud.into_iter().take(PLAN_OFFERS));
        let no_offers_reason = offers.is_empty().then(|| {
            if reasons.is_empty() {
                "no fleet can run it: no instances are configured".to_string()
            } else {
                reasons.join("; ")
            }
        });
        Ok(RunPlan {
            configuration: configuration.clone(),
            offers,
            no_offers_reason,
            total_offers,
        })
    }

    /// Records what the agents did while no engine was watching (jobs that finished meanwhile),
    /// so that a fresh process reports the truth at once instead of after its watchers connect.
    async fn catch_up(self: &Arc<Self>) {
        let Ok(instances) = self.store.instances() else {
            return;
        };
        let Ok(unfinished) = self
            .store
            .jobs_with_status(&[JobStatus::Running, JobStatus::Terminating])
        else {
            return;
        };
        for instance in instances {
            if !unfinished
                .iter()
                .any(|j| j.instance_id.as_deref() == Some(instance.id.as_str()))
            {
                continue;
            }
            let Ok(agent) = self.agent(&instance.id).await else {
                continue;
            };
            let Ok(reported) = agent.jobs().await else {
                continue;
            };
            for info in reported {
                if info.status.is_finished() && unfinished.iter().any(|j| j.id == info.id) {
                    jobs::on_agent_job(self, info).await;
                }
            }
        }
    }

    /// Creates the implicit fleet of each backend that has one (the local backend: this host).
    async fn ensure_implicit_fleets(&self) -> Result<(), EngineError> {
        let instances = self.store.instances()?;
        for backend in &self.backends {
            if backend.backend() != "local" {
                continue;
            }
            if let Some(existing) = instances.iter().find(|i| i.backend == "local") {
                let client = backend.connect(existing).await?;
                let health = client.healthcheck().await?;
                let containers = health.containers.is_some();
                if health.host != existing.host || containers != existing.containers {
                    let mut updated = existing.clone();
                    updated.host = health.host;
                    updated.containers = containers;
                    self.store.put_instance(&updated)?;
                }
                continue;
            }
            let offer = backend.offers().await?.into_iter().next().ok_or_else(|| {
                EngineError::Unsupported("the local backend has no offer for this host".to_string())
            })?;
            // Reuse the fleet if an earlier start got as far as creating it.
            let existing = self.store.fleets()?.into_iter().find(|f| f.name == "local");
            // Fixed ids: processes starting on a fresh state file at once write the same rows.
            let fleet = existing.unwrap_or_else(|| Fleet {
                id: "fleet-local".to_string(),
                name: "local".to_string(),
                status: FleetStatus::Active,
                configuration: None,
                created_at_ms: now_ms(),
                status_message: None,
                consolidation: None,
            });
            self.store.put_fleet(&fleet)?;
            let config = crate::backend::InstanceConfig {
                instance_id: "instance-local-0".to_string(),
                attempt_id: "instance-local-0".to_string(),
                state_id: self.store.state_id().to_string(),
                name: "local-0".to_string(),
                fleet: fleet.name.clone(),
                tags: Default::default(),
            };
            let created = backend.create_instance(&offer, &config).await?;
            let instance = Instance {
                id: "instance-local-0".to_string(),
                name: "local-0".to_string(),
                fleet_id: fleet.id.clone(),
                backend: "local".to_string(),
                status: InstanceStatus::Idle,
                host: created.offer.resources,
                price: 0.0,
                backend_data: created.backend_data,
                created_at_ms: now_ms(),
                address: None,
                session: None,
                status_message: None,
                unreachable: false,
                unreachable_since_ms: None,
                offer: None,
                idle_timeout_secs: None,
                last_job_at_ms: None,
                cloud_id: None,
                attempts: Vec::new(),
                blocks: None,
                containers: backend.supports_containers(),
            };
            self.store.put_instance(&instance)?;
        }
        Ok(())
    }

    /// A client of an instance's agent, connecting (and restarting it) if needed.
    pub(crate) async fn agent(&self, instance_id: &str) -> Result<AgentClient, EngineError> {
        if let Some(c) = self
            .agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(instance_id)
        {
            return Ok(c.clone());
        }
        let instance = self
            .store
            .instance(instance_id)?
            .ok_or_else(|| EngineError::Invalid(format!("unknown instance {instance_id}")))?;
        let backend = self.backend(&instance.backend).ok_or_else(|| {
            EngineError::Unsupported(format!("backend {} is not configured", instance.backend))
        })?;
        let client = backend.connect(&instance).await?;
        self.agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(instance_id.to_string(), client.clone());
        Ok(client)
    }
}
