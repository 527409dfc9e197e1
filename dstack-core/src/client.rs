//! The public, typed API: [`Client`] with its [`Runs`] and [`Fleets`] collections and the
//! [`RunHandle`] of one run.
//!
//! ```no_run
//! # async fn demo(client: dstack_core::Client) -> Result<(), dstack_core::engine::EngineError> {
//! use futures_util::StreamExt;
//! let config = dstack_core::config::parse("type: task\ncommands: [echo hi]\n", "inline").unwrap();
//! let run = client.runs().apply(config, Default::default()).await?;
//! let mut logs = run.logs(true);
//! while let Some(chunk) = logs.next().await {
//!     print!("{}", String::from_utf8_lossy(&chunk?));
//! }
//! println!("finished: {}", run.wait().await?.status);
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_core::Stream;
use futures_util::StreamExt;

use crate::agent::ByteStream;
use crate::backend::Compute;
use crate::config::Configuration;
use crate::engine::{ApplyOptions, Engine, EngineError, EngineOptions, RunPlan};
use crate::model::{Fleet, Instance, Job, Run, RunStatus};
use crate::store::{RunFilter, RunListing, SqliteStore};

/// `$DSTACK_HOME`, or `~/.dstack`.
pub fn default_home() -> PathBuf {
    if let Some(home) = std::env::var_os("DSTACK_HOME") {
        return PathBuf::from(home);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".dstack")
}

/// How to open a [`Client`].
pub struct ClientOptions {
    /// The state directory (`$DSTACK_HOME`).
    pub home: PathBuf,
    /// The backends to use.
    pub backends: Vec<Arc<dyn Compute>>,
    /// Engine tunables.
    pub engine: EngineOptions,
}

/// An embedded dstack: runs, fleets and the engine that drives them.
#[derive(Clone)]
pub struct Client {
    engine: Engine,
}

impl Client {
    /// Opens the state in `options.home` (`state.db`, created if needed) and starts the
    /// engine. Must be called within a tokio runtime.
    pub async fn open(options: ClientOptions) -> Result<Client, EngineError> {
        prepare_home(&options.home)
            .map_err(|e| EngineError::Invalid(format!("{}: {e}", options.home.display())))?;
        let store = SqliteStore::open(&state_file(&options.home))?;
        let mut engine_options = options.engine;
        engine_options
            .secrets
            .get_or_insert_with(|| crate::secrets::Secrets::in_home(&options.home));
        let engine = Engine::start(Arc::new(store), options.backends, engine_options).await?;
        Ok(Client { engine })
    }

    /// The runs.
    pub fn runs(&self) -> Runs<'_> {
        Runs { client: self }
    }

    /// The fleets.
    pub fn fleets(&self) -> Fleets<'_> {
        Fleets { client: self }
    }

    /// The network volumes.
    pub fn volumes(&self) -> Volumes<'_> {
        Volumes { client: self }
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

/// Creates the state directory (0700), or takes group's and others' access away from an
/// existing one: it holds keys, secrets and the state of every run.
pub fn prepare_home(home: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(home)?;
    let mode = std::fs::metadata(home)?.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(home, std::fs::Permissions::from_mode(mode & 0o700))?;
    }
    Ok(())
}

/// The state database inside a state directory.
pub fn state_file(home: &Path) -> PathBuf {
    home.join("state.db")
}

/// The runs of a [`Client`].
pub struct Runs<'a> {
    client: &'a Client,
}

impl Runs<'_> {
    /// Where a configuration would run, without running it.
    pub async fn plan(&self, configuration: &Configuration) -> Result<RunPlan, EngineError> {
        self.client.engine.plan(configuration).await
    }

    /// Submits a run.
    pub async fn apply(
        &self,
        configuration: Configuration,
        options: ApplyOptions,
    ) -> Result<RunHandle, EngineError> {
        let run = self.client.engine.apply(configuration, options).await?;
        Ok(self.handle(&run))
    }

    /// Submits several runs at once, in one store transaction: all of them, or none if one
    /// is invalid (e.g. the trials of a sweep).
    pub async fn apply_all(
        &self,
        items: Vec<(Configuration, ApplyOptions)>,
    ) -> Result<Vec<RunHandle>, EngineError> {
        let runs = self.client.engine.apply_all(items).await?;
        Ok(runs.iter().map(|run| self.handle(run)).collect())
    }

    /// The current run with this name.
    pub fn get(&self, name: &str) -> Result<Option<RunHandle>, EngineError> {
        Ok(self
            .client
            .engine
            .store()
            .run_by_name(name)?
            .map(|r| self.handle(&r)))
    }

    /// Runs, newest first: only unfinished ones unless `all`.
    pub fn list(&self, all: bool) -> Result<Vec<Run>, EngineError> {
        Ok(self.listing(all)?.runs)
    }

    /// The runs (unfinished ones unless `all`), newest first, and the records that could not
    /// be read (listed apart, so that one corrupt record hides no other run).
    pub fn listing(&self, all: bool) -> Result<RunListing, EngineError> {
        let filter = RunFilter {
            active_only: !all,
            limit: None,
        };
        Ok(self.client.engine.store().runs(filter)?)
    }

    fn handle(&self, run: &Run) -> RunHandle {
        RunHandle {
            engine: self.client.engine.clone(),
            id: run.id.clone(),
            name: run.name.clone(),
        }
    }
}

/// The fleets of a [`Client`].
pub struct Fleets<'a> {
    client: &'a Client,
}

impl Fleets<'_> {
    /// Every fleet with its instances.
    pub fn list(&self) -> Result<Vec<(Fleet, Vec<Instance>)>, EngineError> {
        let store = self.client.engine.store();
        let instances = store.instances()?;
        Ok(store
            .fleets()?
            .into_iter()
            .map(|f| {
                let own = instances
                    .iter()
                    .filter(|i| i.fleet_id == f.id)
                    .cloned()
                    .collect();
                (f, own)
            })
            .collect())
    }

    /// A fleet by name, with its instances.
    pub fn get(&self, name: &str) -> Result<Option<(Fleet, Vec<Instance>)>, EngineError> {
        Ok(self.list()?.into_iter().find(|(f, _)| f.name == name))
    }
}

/// The network volumes of a [`Client`].
pub struct Volumes<'a> {
    client: &'a Client,
}

impl Volumes<'_> {
    /// Every volume not deleted.
    pub fn list(&self) -> Result<Vec<crate::model::Volume>, EngineError> {
        Ok(self
            .client
            .engine
            .store()
            .volumes()?
            .into_iter()
            .filter(|v| v.status != crate::model::VolumeStatus::Deleted)
            .collect())
    }

    /// A volume by name (not deleted).
    pub fn get(&self, name: &str) -> Result<Option<crate::model::Volume>, EngineError> {
        Ok(self.list()?.into_iter().find(|v| v.name == name))
    }

    /// Creates (or registers) a volume from its configuration.
    pub async fn apply(
        &self,
        configuration: &crate::config::Configuration,
    ) -> Result<crate::model::Volume, EngineError> {
        self.client.engine.apply_volume(configuration).await
    }

    /// Deletes a volume attached nowhere.
    pub async fn delete(&self, name: &str) -> Result<crate::model::Volume, EngineError> {
        self.client.engine.delete_volume(name).await
    }
}

/// A stream of log bytes.
pub type LogStream = Pin<Box<dyn Stream<Item = Result<Bytes, EngineError>> + Send>>;

/// One run.
#[derive(Clone)]
pub struct RunHandle {
    engine: Engine,
    id: String,
    name: String,
}

impl RunHandle {
    /// The run id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The run name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The run record, read now.
    pub fn run(&self) -> Result<Run, EngineError> {
        self.engine
            .store()
            .run(&self.id)?
            .ok_or_else(|| EngineError::Invalid(format!("run {} no longer exists", self.name)))
    }

    /// The current status.
    pub fn status(&self) -> Result<RunStatus, EngineError> {
        Ok(self.run()?.status)
    }

    /// Every job submission of the run.
    pub fn jobs(&self) -> Result<Vec<Job>, EngineError> {
        Ok(self.engine.store().jobs_of_run(&self.id)?)
    }

    /// The instances the run's job submissions were placed on.
    pub fn instances(&self) -> Result<Vec<Instance>, EngineError> {
        let mut ids: Vec<String> = self
            .jobs()?
            .into_iter()
            .filter_map(|j| j.instance_id)
            .collect();
        ids.sort();
        ids.dedup();
        let store = self.engine.store();
        let mut instances = Vec::new();
        for id in ids {
            instances.extend(store.instance(&id)?);
        }
        Ok(instances)
    }

    /// The exit status of the latest submission of job 0, once it exited.
    pub fn exit_status(&self) -> Result<Option<i32>, EngineError> {
        Ok(self.latest_job()?.and_then(|j| j.exit_status))
    }

    /// The metrics the run's job reported: every JSON object it wrote as a line to
    /// `$DSTACK_METRICS_FILE`, in order (other lines are skipped). Empty before the job starts.
    pub async fn metrics(&self) -> Result<Vec<serde_json::Value>, EngineError> {
        let Some(job) = self.latest_job()? else {
            return Ok(Vec::new());
        };
        let Some(instance) = job.instance_id.as_deref() else {
            return Ok(Vec::new());
        };
        let agent = self.engine.agent(instance).await?;
        let bytes = match agent.metrics(&job.id).await {
            Ok(bytes) => bytes,
            Err(crate::agent::AgentError::Status { status: 404, .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        Ok(bytes
            .split(|b| *b == b'\n')
            .filter_map(|line| serde_json::from_slice::<serde_json::Value>(line).ok())
            .filter(serde_json::Value::is_object)
            .collect())
    }

    /// Forwards the ports of the run's job to this machine for as long as the returned guard
    /// lives (see [`crate::forward`]). Call it once the run is running.
    pub async fn forward_ports(&self) -> Result<crate::forward::PortForward, EngineError> {
        let run = self.run()?;
        let config = run.spec.configuration().map_err(|e| {
            EngineError::Invalid(format!("stored configuration of run {}: {e}", run.name))
        })?;
        let ports: Vec<(u16, u16)> = crate::engine::ports(&config)
            .iter()
            .map(|p| (p.local_port.unwrap_or(p.container_port), p.container_port))
            .collect();
        let job = self
            .latest_job()?
            .ok_or_else(|| EngineError::Invalid(format!("run {} has no job", run.name)))?;
        let instance_id = job.instance_id.ok_or_else(|| {
            EngineError::Invalid(format!("run {} is not placed on an instance yet", run.name))
        })?;
        let instance = self
            .engine
            .store()
            .instance(&instance_id)?
            .ok_or_else(|| EngineError::Invalid(format!("unknown instance {instance_id}")))?;
        let local = instance.session.is_none();
        crate::forward::forward(&self.engine, &instance_id, ports, local).await
    }

    /// The latest submission of job 0.
    fn latest_job(&self) -> Result<Option<Job>, EngineError> {
        Ok(self
            .jobs()?
            .into_iter()
            .filter(|j| j.job_num == 0)
            .max_by_key(|j| j.submission_num))
    }

    /// Waits until the run has finished and returns it.
    pub async fn wait(&self) -> Result<Run, EngineError> {
        self.wait_until(|s| s.is_finished()).await
    }

    /// Waits until the run's status satisfies `done` (or the run finished) and returns it.
    pub async fn wait_until(&self, done: impl Fn(RunStatus) -> bool) -> Result<Run, EngineError> {
        // Watching before reading: no change made in between is missed.
        let wake = |s: RunStatus| done(s) || s.is_finished();
        let mut changes = self.engine.watch_run(&self.id, RunStatus::Submitted, wake);
        changes.mark_unchanged();
        let mut run = self.run()?;
        loop {
            if wake(run.status) {
                return Ok(run);
            }
            // Changes made in this process arrive at once; the store is read again at least
            // every second for other processes' changes.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
            loop {
                match tokio::time::timeout_at(deadline, changes.changed()).await {
                    // A step of the run that is not awaited.
                    Ok(Ok(())) => {
                        if wake(*changes.borrow_and_update()) {
                            break;
                        }
                    }
                    Ok(Err(_)) => {
                        tokio::time::sleep_until(deadline).await;
                        break;
                    }
                    _ => break,
                }
            }
            run = self.run()?;
        }
    }

    /// Stops the run (see [`Engine::stop`]).
    pub async fn stop(&self, abort: bool) -> Result<Run, EngineError> {
        self.engine.stop(&self.id, abort).await
    }

    /// The output of the run's job: everything written so far, and with `follow` everything
    /// it writes until it finishes (across retries).
    pub fn logs(&self, follow: bool) -> LogStream {
        let state = LogState {
            handle: self.clone(),
            follow,
            streamed: Vec::new(),
            current: None,
            changes: self.engine.subscribe(),
        };
        Box::pin(futures_util::stream::unfold(
            state,
            |mut state| async move {
                match state.next_chunk().await {
                    Ok(Some(chunk)) => Some((Ok(chunk), state)),
                    Ok(None) => None,
                    Err(e) => {
                        state.follow = false;
                        state.current = None;
                        state.streamed.push(String::new());
                        Some((Err(e), state))
                    }
                }
            },
        ))
    }
}

struct LogState {
    handle: RunHandle,
    follow: bool,
    /// Job submissions already streamed.
    streamed: Vec<String>,
    current: Option<ByteStream>,
    changes: tokio::sync::broadcast::Receiver<crate::engine::RunChange>,
}

impl LogState {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, EngineError> {
        loop {
            if let Some(stream) = &mut self.current {
                match stream.next().await {
                    Some(Ok(chunk)) => return Ok(Some(chunk)),
                    Some(Err(e)) => return Err(e.into()),
                    None => {
                        self.current = None;
                        if !self.follow {
                            return Ok(None);
                        }
                        continue;
                    }
                }
            }
            if !self.streamed.is_empty() && !self.follow {
                return Ok(None);
            }
            let run = self.handle.run()?;
            let jobs = self.handle.jobs()?;
            let next = jobs
                .iter()
                .filter(|j| {
                    j.job_num == 0 && j.instance_id.is_some() && !self.streamed.contains(&j.id)
                })
                .filter(|j| j.started_at_ms.is_some() || j.status.is_finished())
                .max_by_key(|j| j.submission_num);
            if let Some(job) = next {
                self.streamed.push(job.id.clone());
                let instance = job.instance_id.clone().unwrap_or_default();
                let agent = self.handle.engine.agent(&instance).await?;
                let follow = self.follow && !job.status.is_finished();
                match agent.logs(&job.id, 0, follow).await {
                    Ok(stream) => self.current = Some(stream),
                    Err(crate::agent::AgentError::Status { status: 404, .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                continue;
            }
            if !self.follow || run.status.is_finished() {
                return Ok(None);
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), self.changes.recv()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_state_directory_is_private_new_or_existing() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = dir.path().join("a/home");
        prepare_home(&fresh).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&fresh), 0o700);
        let loose = dir.path().join("loose");
        std::fs::create_dir(&loose).unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare_home(&loose).unwrap();
        assert_eq!(mode(&loose), 0o700);
    }
}
