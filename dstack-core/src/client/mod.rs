//! The public, typed API: [`Client`] with its [`Runs`], [`Fleets`] and [`Volumes`]
//! collections and the [`RunHandle`] of one run. A client either talks to a `dstack server`
//! ([`Client::connect`], which starts the one of a local state directory when none answers,
//! or [`Client::remote`]) or hosts the engine in this process ([`Client::open`]); both offer
//! the same calls.
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

mod archives;
mod artifacts;
mod group;
pub mod home;
mod logs;
pub mod protocol;
mod remote;

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_core::Stream;
use futures_util::StreamExt;

pub use archives::{ArchiveKept, HasArchive};
pub use artifacts::{Artifacts, ArtifactsOf, ObjectRef, TagAdd, Tags};
pub use group::GroupChanges;
pub use remote::{Remote, ServerError};

use crate::backend::Compute;
use crate::config::Configuration;
use crate::engine::{ApplyOptions, Engine, EngineError, EngineOptions, RunPlan};
use crate::events::{Event, EventQuery};
use crate::model::{Fleet, Instance, Job, JobStatus, Run, RunStatus, Volume, VolumeStatus};
use crate::store::{RunFilter, RunListing, SqliteStore};
use protocol::{
    ApplyRequest, ConfigurationRequest, DeleteRequest, FleetDeleted, FleetEntry, FleetEvent,
    ListRequest, LogQuery, LogsRequest, PlanAnswer, PlanRequest, RunIds, RunRef, Snapshot,
    StopRequest, WaitRequest,
};

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

/// How to open a [`Client`] that hosts the engine in this process.
pub struct ClientOptions {
    /// The state directory (`$DSTACK_HOME`).
    pub home: PathBuf,
    /// The backends to use.
    pub backends: Vec<Arc<dyn Compute>>,
    /// Engine tunables.
    pub engine: EngineOptions,
}

/// Where a client's calls go.
#[derive(Clone)]
enum Via {
    /// An engine hosted in this process.
    Engine(Engine),
    /// A `dstack server`.
    Server(Remote),
}

/// A dstack client: runs, fleets and volumes, through a server or an engine of its own.
#[derive(Clone)]
pub struct Client {
    via: Via,
}

impl Client {
    /// Opens the state in `options.home` (`server/state.db`, created if needed) and starts
    /// the engine in this process: what `dstack server` does, and what a Rust tool may do
    /// instead of talking to one. Must be called within a tokio runtime.
    pub async fn open(options: ClientOptions) -> Result<Client, EngineError> {
        prepare_home(&options.home)
            .and_then(|()| home::move_legacy_state(&options.home))
            .map_err(|e| EngineError::Invalid(format!("{}: {e}", options.home.display())))?;
        let store = SqliteStore::open(&state_file(&options.home))?;
        let mut engine_options = options.engine;
        engine_options
            .secrets
            .get_or_insert_with(|| crate::secrets::Secrets::in_home(&options.home));
        engine_options.archives.get_or_insert_with(|| {
            crate::archive::ArchiveStore::new(home::server_dir(&options.home).join("archives"))
        });
        if engine_options.artifacts.is_none() {
            let path = home::server_dir(&options.home).join("artifacts");
            let local = crate::artifacts::StorageConfig::Local { path };
            engine_options.artifacts = Some(crate::artifacts::ArtifactStore::open(&local)?);
        }
        let engine = Engine::start(Arc::new(store), options.backends, engine_options).await?;
        Ok(Client {
            via: Via::Engine(engine),
        })
    }

    /// A client of the server `remote`.
    pub fn remote(remote: Remote) -> Client {
        Client {
            via: Via::Server(remote),
        }
    }

    /// A client of the server of the state directory `home` (see [`home::connect`]): the
    /// default project of `home/config.yml`; for a local one, the server is started
    /// (`server_bin server`) when none answers.
    pub async fn connect(home: &Path, server_bin: Option<&Path>) -> Result<Client, EngineError> {
        Ok(Client::remote(home::connect(home, server_bin).await?))
    }

    /// Where service `run` is published (see [`RunHandle::service`]).
    pub fn service(&self, run: &Run) -> Option<ServiceEndpoint> {
        service_of(&self.via, run)
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

    /// Runs' artifacts.
    pub fn artifacts(&self) -> Artifacts<'_> {
        Artifacts { client: self }
    }

    /// Tags: names for runs' artifacts and uploaded files.
    pub fn tags(&self) -> Tags<'_> {
        Tags { client: self }
    }

    /// The secrets (`${{ secrets.NAME }}`).
    pub fn secrets(&self) -> Secrets<'_> {
        Secrets { client: self }
    }

    /// The recorded history of status changes.
    pub fn events(&self) -> Events<'_> {
        Events { client: self }
    }

    /// The engine, when this client hosts it.
    pub fn engine(&self) -> Option<&Engine> {
        match &self.via {
            Via::Engine(engine) => Some(engine),
            Via::Server(_) => None,
        }
    }

    /// The server, when this client talks to one.
    pub fn server(&self) -> Option<&Remote> {
        match &self.via {
            Via::Server(remote) => Some(remote),
            Via::Engine(_) => None,
        }
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

/// The state database inside a state directory: `server/state.db` (a `state.db` left at the
/// top by an earlier version is moved there by [`home::move_legacy_state`]).
pub fn state_file(home: &Path) -> PathBuf {
    home::server_dir(home).join("state.db")
}

/// The runs of a [`Client`].
pub struct Runs<'a> {
    client: &'a Client,
}

impl Runs<'_> {
    /// Where a configuration would run, without running it.
    pub async fn plan(&self, configuration: &Configuration) -> Result<RunPlan, EngineError> {
        match &self.client.via {
            Via::Engine(engine) => engine.plan(configuration).await,
            Via::Server(remote) => {
                let request = PlanRequest {
                    configuration: configuration.to_json(),
                };
                let answer: PlanAnswer = remote.call("runs/get_plan", &request).await?;
                let configuration =
                    crate::config::parse_value(&answer.configuration, "the server's plan")
                        .map_err(|e| EngineError::Invalid(e.to_string()))?;
                Ok(RunPlan {
                    configuration,
                    offers: answer.offers,
                    no_offers_reason: answer.no_offers_reason,
                    total_offers: answer.total_offers,
                })
            }
        }
    }

    /// Submits a run.
    pub async fn apply(
        &self,
        configuration: Configuration,
        options: ApplyOptions,
    ) -> Result<RunHandle, EngineError> {
        let mut handles = self.apply_all(vec![(configuration, options)]).await?;
        handles
            .pop()
            .ok_or_else(|| EngineError::Invalid("no run was recorded".to_string()))
    }

    /// The name of the unfinished service that applying `configuration` (as `name`, or its
    /// own name) would update in place (see [`Runs::update`]), if there is one; dstack's
    /// `apply` updates such a run instead of refusing the name.
    pub async fn running_service(
        &self,
        configuration: &Configuration,
        name: Option<&str>,
    ) -> Result<Option<String>, EngineError> {
        let Configuration::Service(service) = configuration else {
            return Ok(None);
        };
        let Some(name) = name.or(service.common.name.as_deref()) else {
            return Ok(None);
        };
        let Some(run) = self.get(name).await? else {
            return Ok(None);
        };
        let current = run.run().await?;
        let is_service = matches!(current.spec.configuration(), Ok(Configuration::Service(_)));
        Ok((is_service && !current.status.is_finished()).then(|| name.to_string()))
    }

    /// Updates the active service that `configuration` (or `options.name`) names in place:
    /// a rolling deployment when what its replicas run changed (see
    /// [`crate::engine::rollout`]).
    pub async fn update(
        &self,
        configuration: Configuration,
        options: ApplyOptions,
    ) -> Result<RunHandle, EngineError> {
        let mut items = [(configuration, options)];
        archives::prepare(&self.client.via, &mut items).await?;
        let [(configuration, options)] = items;
        let run = match &self.client.via {
            Via::Engine(engine) => engine.update_service(configuration, options).await?,
            Via::Server(remote) => {
                let request = ApplyRequest {
                    options: from_this_client(&configuration, options)?,
                    configuration: configuration.to_json(),
                };
                remote.call("runs/update", &request).await?
            }
        };
        Ok(self.handle(&run))
    }

    /// Submits several runs at once, in one store transaction: all of them, or none if one
    /// is invalid (e.g. the trials of a sweep). The configurations' `repos:` and `files:` are packed here and handed over first.
    pub async fn apply_all(
        &self,
        mut items: Vec<(Configuration, ApplyOptions)>,
    ) -> Result<Vec<RunHandle>, EngineError> {
        archives::prepare(&self.client.via, &mut items).await?;
        let runs = match &self.client.via {
            Via::Engine(engine) => engine.apply_all(items).await?,
            Via::Server(remote) => {
                let requests = items
                    .into_iter()
                    .map(|(configuration, options)| {
                        Ok(ApplyRequest {
                            options: from_this_client(&configuration, options)?,
                            configuration: configuration.to_json(),
                        })
                    })
                    .collect::<Result<Vec<_>, EngineError>>()?;
                if requests.len() == 1 {
                    vec![remote.call("runs/apply", &requests[0]).await?]
                } else {
                    remote.call("runs/apply_group", &requests).await?
                }
            }
        };
        Ok(runs.iter().map(|run| self.handle(run)).collect())
    }

    /// The current run with this name.
    pub async fn get(&self, name: &str) -> Result<Option<RunHandle>, EngineError> {
        let run = match &self.client.via {
            Via::Engine(engine) => engine.store().run_by_name(name)?,
            Via::Server(remote) => {
                let by_name = RunRef {
                    run_name: Some(name.to_string()),
                    id: None,
                };
                snapshot_of(remote, &by_name).await?.map(|s| s.run)
            }
        };
        Ok(run.map(|r| self.handle(&r)))
    }

    /// The run with this id (finished or not).
    pub async fn by_id(&self, id: &str) -> Result<Option<RunHandle>, EngineError> {
        let run = match &self.client.via {
            Via::Engine(engine) => engine.store().run(id)?,
            Via::Server(remote) => {
                let by_id = RunRef {
                    run_name: None,
                    id: Some(id.to_string()),
                };
                snapshot_of(remote, &by_id).await?.map(|s| s.run)
            }
        };
        Ok(run.map(|r| self.handle(&r)))
    }

    /// The snapshots of these runs (those that exist, in order), in one request to a server:
    /// what a sweep reads to follow its trials.
    pub async fn snapshots(&self, ids: &[String]) -> Result<Vec<Snapshot>, EngineError> {
        match &self.client.via {
            Via::Engine(_) => {
                let mut found = Vec::with_capacity(ids.len());
                for id in ids {
                    if let Some(handle) = self.by_id(id).await? {
                        found.push(handle.snapshot().await?);
                    }
                }
                Ok(found)
            }
            Via::Server(remote) => {
                let request = RunIds { ids: ids.to_vec() };
                let mut snapshots: Vec<Snapshot> = remote.call("runs/get_many", &request).await?;
                for snapshot in &mut snapshots {
                    snapshot.service = endpoint(remote, &snapshot.run);
                }
                Ok(snapshots)
            }
        }
    }

    /// The metrics of each of these runs (see [`RunHandle::metrics`]), in order, in one request
    /// to a server; a run that is gone, or whose host cannot be reached now, has none.
    pub async fn metrics_many(
        &self,
        ids: &[String],
    ) -> Result<Vec<Vec<serde_json::Value>>, EngineError> {
        match &self.client.via {
            Via::Engine(_) => {
                // A few agents' answers awaited at once.
                Ok(futures_util::stream::iter(ids.iter().cloned())
                    .map(|id| async move { self.metrics_or_none(&id).await })
                    .buffered(METRICS_AT_ONCE)
                    .collect()
                    .await)
            }
            Via::Server(remote) => {
                let request = RunIds { ids: ids.to_vec() };
                Ok(remote.call("runs/metrics_many", &request).await?)
            }
        }
    }

    /// The metrics of run `id`; none if it is gone or its host cannot be reached now.
    async fn metrics_or_none(&self, id: &str) -> Vec<serde_json::Value> {
        match self.by_id(id).await {
            Ok(Some(handle)) => handle.metrics().await.unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// Stops these runs (gracefully, or at once with `abort`), in one request to a server;
    /// returns them as stopped.
    pub async fn stop_many(&self, ids: &[String], abort: bool) -> Result<Vec<Run>, EngineError> {
        match &self.client.via {
            Via::Engine(engine) => {
                let mut stopped = Vec::with_capacity(ids.len());
                for id in ids {
                    stopped.push(engine.stop(id, abort).await?);
                }
                Ok(stopped)
            }
            Via::Server(remote) => {
                let request = StopRequest {
                    runs_names: Vec::new(),
                    ids: ids.to_vec(),
                    abort,
                };
                Ok(remote.call("runs/stop", &request).await?)
            }
        }
    }

    /// The status changes of run group `group_id` (a sweep), pushed: each run's status, then
    /// each change, until every run of the group has finished.
    pub fn watch_group(&self, group_id: &str) -> GroupChanges {
        match &self.client.via {
            Via::Engine(engine) => group::watch(engine.clone(), group_id.to_string()),
            Via::Server(remote) => group::remote_watch(remote.clone(), group_id.to_string()),
        }
    }

    /// Runs, newest first: only unfinished ones unless `all`.
    pub async fn list(&self, all: bool) -> Result<Vec<Run>, EngineError> {
        Ok(self.listing(all).await?.runs)
    }

    /// The runs (unfinished ones unless `all`), newest first, and the records that could not
    /// be read (listed apart, so that one corrupt record hides no other run).
    pub async fn listing(&self, all: bool) -> Result<RunListing, EngineError> {
        self.listing_limited(all, None).await
    }

    /// As [`Runs::listing`], the newest `limit` runs at most.
    pub async fn listing_limited(
        &self,
        all: bool,
        limit: Option<usize>,
    ) -> Result<RunListing, EngineError> {
        match &self.client.via {
            Via::Engine(engine) => {
                let filter = RunFilter {
                    active_only: !all,
                    limit,
                };
                Ok(engine.store().runs(filter)?)
            }
            Via::Server(remote) => {
                let request = ListRequest {
                    all,
                    limit,
                    ..ListRequest::default()
                };
                let path = "/api/runs/list";
                Ok(remote.post(path, &request, Duration::from_secs(60)).await?)
            }
        }
    }

    fn handle(&self, run: &Run) -> RunHandle {
        RunHandle {
            via: self.client.via.clone(),
            id: run.id.clone(),
            name: run.name.clone(),
        }
    }
}

/// `options` with what the server cannot know filled in from this process: its directory and
/// the variables of its environment the run takes (see [`crate::engine::session_env`]).
fn from_this_client(
    configuration: &Configuration,
    mut options: ApplyOptions,
) -> Result<ApplyOptions, EngineError> {
    if options.client_dir.is_none() {
        let dir = std::env::current_dir()
            .map_err(|e| EngineError::Invalid(format!("cannot read the current directory: {e}")))?;
        options.client_dir = Some(dir.display().to_string());
    }
    if options.client_env.is_none() {
        let env: std::collections::BTreeMap<String, String> = std::env::vars().collect();
        options.client_env = Some(crate::engine::session_env(configuration, &env));
    }
    Ok(options)
}

/// A run with its jobs, by name or id; `None` when there is none.
async fn snapshot_of(remote: &Remote, which: &RunRef) -> Result<Option<Snapshot>, EngineError> {
    match remote.call::<Snapshot>("runs/get", which).await {
        Ok(mut snapshot) => {
            snapshot.service = endpoint(remote, &snapshot.run);
            Ok(Some(snapshot))
        }
        Err(ServerError::Refused { code, .. }) if code == "resource_not_exists" => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The fleets of a [`Client`].
pub struct Fleets<'a> {
    client: &'a Client,
}

impl Fleets<'_> {
    /// Every fleet with its instances.
    pub async fn list(&self) -> Result<Vec<(Fleet, Vec<Instance>)>, EngineError> {
        match &self.client.via {
            Via::Engine(engine) => {
                let store = engine.store();
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
            Via::Server(remote) => {
                let entries: Vec<FleetEntry> =
                    remote.call("fleets/list", &serde_json::json!({})).await?;
                Ok(entries
                    .into_iter()
                    .map(|e| (e.fleet, e.instances))
                    .collect())
            }
        }
    }

    /// The instances whose jobs hold resources now.
    pub async fn busy_instances(&self) -> Result<Vec<String>, EngineError> {
        match &self.client.via {
            Via::Engine(engine) => Ok(engine
                .store()
                .jobs_with_status(crate::model::JobStatus::HOLDING)?
                .into_iter()
                .filter_map(|j| j.instance_id)
                .collect()),
            Via::Server(remote) => Ok(remote.call("fleets/busy", &serde_json::json!({})).await?),
        }
    }

    /// A fleet by name, with its instances.
    pub async fn get(&self, name: &str) -> Result<Option<(Fleet, Vec<Instance>)>, EngineError> {
        Ok(self.list().await?.into_iter().find(|(f, _)| f.name == name))
    }

    /// Applies a fleet configuration: records it, deploys every host at once and returns the
    /// fleet with its live instances; `progress` hears each step of each host.
    pub async fn apply(
        &self,
        configuration: &Configuration,
        progress: crate::engine::FleetProgress<'_>,
    ) -> Result<(Fleet, Vec<Instance>), EngineError> {
        match &self.client.via {
            Via::Engine(engine) => engine.apply_fleet(configuration, progress).await,
            Via::Server(remote) => {
                let request = ConfigurationRequest {
                    configuration: configuration.to_json(),
                };
                let mut lines = json_lines(remote.stream("fleets/apply", &request).await?);
                while let Some(event) = lines.next().await {
                    match event? {
                        FleetEvent::Progress { instance, step } => progress(&instance, &step),
                        FleetEvent::Applied(entry) => return Ok((entry.fleet, entry.instances)),
                        FleetEvent::Failed(detail) => {
                            return Err(ServerError::Refused {
                                status: 400,
                                code: detail.code,
                                message: detail.msg,
                            }
                            .into())
                        }
                    }
                }
                Err(EngineError::Invalid(
                    "the server's answer to fleets/apply ended early".to_string(),
                ))
            }
        }
    }

    /// Deletes a fleet: stops its hosts' agents and removes what was installed; refuses while
    /// jobs run on it unless `force`. Returns each instance with the error of its removal.
    pub async fn delete(
        &self,
        name: &str,
        force: bool,
    ) -> Result<(Fleet, Vec<(Instance, Option<String>)>), EngineError> {
        self.delete_some(name, &[], force).await
    }

    /// Deletes the instances of fleet `name` numbered `instance_nums` (dstack's
    /// `instance_num`, the number their name ends with), as [`Fleets::delete`] deletes a
    /// whole fleet; the fleet stays.
    pub async fn delete_instances(
        &self,
        name: &str,
        instance_nums: &[u64],
        force: bool,
    ) -> Result<(Fleet, Vec<(Instance, Option<String>)>), EngineError> {
        if instance_nums.is_empty() {
            return Err(EngineError::Invalid(
                "no instance numbers given".to_string(),
            ));
        }
        self.delete_some(name, instance_nums, force).await
    }

    /// The whole fleet (`instance_nums` empty) or those instances.
    async fn delete_some(
        &self,
        name: &str,
        instance_nums: &[u64],
        force: bool,
    ) -> Result<(Fleet, Vec<(Instance, Option<String>)>), EngineError> {
        match &self.client.via {
            Via::Engine(engine) => engine.delete_fleet(name, instance_nums, force).await,
            Via::Server(remote) => {
                let request = DeleteRequest {
                    names: vec![name.to_string()],
                    force,
                    instance_nums: instance_nums.to_vec(),
                };
                let deleted: FleetDeleted = remote.call("fleets/delete", &request).await?;
                Ok((deleted.fleet, deleted.instances))
            }
        }
    }
}

/// The network volumes of a [`Client`].
pub struct Volumes<'a> {
    client: &'a Client,
}

impl Volumes<'_> {
    /// Every volume not deleted.
    pub async fn list(&self) -> Result<Vec<Volume>, EngineError> {
        let volumes = match &self.client.via {
            Via::Engine(engine) => engine.store().volumes()?,
            Via::Server(remote) => remote.call("volumes/list", &serde_json::json!({})).await?,
        };
        Ok(volumes
            .into_iter()
            .filter(|v| v.status != VolumeStatus::Deleted)
            .collect())
    }

    /// A volume by name (not deleted).
    pub async fn get(&self, name: &str) -> Result<Option<Volume>, EngineError> {
        Ok(self.list().await?.into_iter().find(|v| v.name == name))
    }

    /// Creates (or registers) a volume from its configuration.
    pub async fn apply(&self, configuration: &Configuration) -> Result<Volume, EngineError> {
        match &self.client.via {
            Via::Engine(engine) => engine.apply_volume(configuration).await,
            Via::Server(remote) => {
                let request = ConfigurationRequest {
                    configuration: configuration.to_json(),
                };
                Ok(remote.call("volumes/create", &request).await?)
            }
        }
    }

    /// Deletes a volume attached nowhere.
    pub async fn delete(&self, name: &str) -> Result<Volume, EngineError> {
        match &self.client.via {
            Via::Engine(engine) => engine.delete_volume(name).await,
            Via::Server(remote) => {
                let request = DeleteRequest {
                    names: vec![name.to_string()],
                    force: false,
                    instance_nums: Vec::new(),
                };
                Ok(remote.call("volumes/delete", &request).await?)
            }
        }
    }
}

/// The history of status changes of a [`Client`]'s records (see [`crate::events`]).
pub struct Events<'a> {
    client: &'a Client,
}

impl Events<'_> {
    /// The events `query` selects, in its order.
    pub async fn list(&self, query: &EventQuery) -> Result<Vec<Event>, EngineError> {
        match &self.client.via {
            Via::Engine(engine) => Ok(engine.store().events(query)?),
            Via::Server(remote) => Ok(remote
                .post(protocol::EVENTS_LIST, query, Duration::from_secs(60))
                .await?),
        }
    }
}

/// The secrets of a [`Client`]: names and values that `${{ secrets.NAME }}` in `env` values
/// and `registry_auth` resolve to when a job is handed to its agent.
pub struct Secrets<'a> {
    client: &'a Client,
}

impl Secrets<'_> {
    /// The names, sorted (values are never listed).
    pub async fn names(&self) -> Result<Vec<String>, EngineError> {
        match &self.client.via {
            Via::Engine(engine) => Ok(local_secrets(engine)?.names().map_err(secret_error)?),
            Via::Server(remote) => {
                let listed: Vec<SecretEntry> =
                    remote.call("secrets/list", &serde_json::json!({})).await?;
                Ok(listed.into_iter().map(|s| s.name).collect())
            }
        }
    }

    /// A secret's value, if it exists.
    pub async fn get(&self, name: &str) -> Result<Option<String>, EngineError> {
        match &self.client.via {
            Via::Engine(engine) => Ok(local_secrets(engine)?.get(name).map_err(secret_error)?),
            Via::Server(remote) => {
                let asked = serde_json::json!({ "name": name });
                match remote.call::<SecretEntry>("secrets/get", &asked).await {
                    Ok(secret) => Ok(secret.value),
                    Err(e) if e.code() == Some("resource_not_exists") => Ok(None),
                    Err(e) => Err(e.into()),
                }
            }
        }
    }

    /// Creates or replaces a secret.
    pub async fn set(&self, name: &str, value: &str) -> Result<(), EngineError> {
        match &self.client.via {
            Via::Engine(engine) => Ok(local_secrets(engine)?
                .set(name, value)
                .map_err(secret_error)?),
            Via::Server(remote) => {
                let body = serde_json::json!({ "name": name, "value": value });
                remote
                    .call::<SecretEntry>("secrets/create_or_update", &body)
                    .await?;
                Ok(())
            }
        }
    }

    /// Deletes a secret; returns whether it existed.
    pub async fn delete(&self, name: &str) -> Result<bool, EngineError> {
        match &self.client.via {
            Via::Engine(engine) => Ok(local_secrets(engine)?.delete(name).map_err(secret_error)?),
            Via::Server(remote) => {
                let body = serde_json::json!({ "secrets_names": [name] });
                match remote
                    .call::<serde_json::Value>("secrets/delete", &body)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(e) if e.code() == Some("resource_not_exists") => Ok(false),
                    Err(e) => Err(e.into()),
                }
            }
        }
    }
}

impl Secrets<'_> {
    /// Registers the repo at `url` with the credentials its clones use (`dstack init`;
    /// dstack's `repos/init`); empty credentials forget earlier ones, so the host's own
    /// apply.
    pub async fn init_repo(
        &self,
        url: &str,
        creds: &crate::repos::RepoCreds,
    ) -> Result<(), EngineError> {
        match &self.client.via {
            Via::Engine(engine) => Ok(local_secrets(engine)?
                .keep_repo_creds(url, creds)
                .map_err(secret_error)?),
            Via::Server(remote) => {
                let body = serde_json::json!({
                    "repo_id": crate::repos::repo_id(url),
                    "repo_info": {"repo_type": "remote", "repo_name": crate::repos::repo_id(url)},
                    "repo_creds": {
                        "clone_url": url,
                        "oauth_token": creds.token,
                        "private_key": creds.private_key,
                    },
                });
                remote
                    .call::<serde_json::Value>("repos/init", &body)
                    .await?;
                Ok(())
            }
        }
    }
}

/// The secrets of an engine hosted in this process.
fn local_secrets(engine: &Engine) -> Result<&crate::secrets::Secrets, EngineError> {
    engine
        .secrets()
        .ok_or_else(|| EngineError::Unsupported("this engine was started without secrets".into()))
}

/// A secret as dstack's API carries it.
#[derive(serde::Deserialize)]
struct SecretEntry {
    name: String,
    #[serde(default)]
    value: Option<String>,
}

/// A failure of the secrets file or a refused name or value.
fn secret_error(e: crate::secrets::SecretError) -> EngineError {
    EngineError::Invalid(e.to_string())
}

fn service_of(via: &Via, run: &Run) -> Option<ServiceEndpoint> {
    match via {
        Via::Server(remote) => endpoint(remote, run),
        Via::Engine(_) => None,
    }
}

/// Where service `run` is published on the server of `remote`.
fn endpoint(remote: &Remote, run: &Run) -> Option<ServiceEndpoint> {
    let Ok(Configuration::Service(service)) = run.spec.configuration() else {
        return None;
    };
    Some(ServiceEndpoint::of(
        &remote.url(),
        remote.project(),
        &run.name,
        &service,
    ))
}

/// Where a service is published (dstack's `ServiceSpec`, with absolute URLs).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServiceEndpoint {
    /// `<server>/proxy/services/<project>/<run>/`.
    pub url: String,
    /// The model name (`model:`), if the service serves one.
    pub model: Option<String>,
    /// The base URL of the model's OpenAI-compatible API: the service's own prefix for
    /// `format: openai`, the project's model endpoint otherwise.
    pub model_base_url: Option<String>,
}

impl ServiceEndpoint {
    /// The endpoint of service `run` of `project` on the server at `server_url`.
    pub fn of(
        server_url: &str,
        project: &str,
        run: &str,
        service: &crate::config::ServiceConfiguration,
    ) -> ServiceEndpoint {
        use crate::config::service::ModelSpec;
        let server = server_url.trim_end_matches('/');
        let url = format!("{server}/proxy/services/{project}/{run}/");
        let (model, model_base_url) = match &service.model {
            Some(ModelSpec::OpenAi { name, prefix, .. }) => (
                Some(name.clone()),
                Some(format!("{}{prefix}", url.trim_end_matches('/'))),
            ),
            Some(ModelSpec::Tgi { name, .. }) => (
                Some(name.clone()),
                Some(format!("{server}/proxy/models/{project}/")),
            ),
            None => (None, None),
        };
        ServiceEndpoint {
            url,
            model,
            model_base_url,
        }
    }
}

/// A stream of log bytes.
pub type LogStream = Pin<Box<dyn Stream<Item = Result<Bytes, EngineError>> + Send>>;

/// How long one `runs/wait` request waits on the server before answering anyway.
const WAIT_SLICE: Duration = Duration::from_secs(25);

/// One run.
#[derive(Clone)]
pub struct RunHandle {
    via: Via,
    id: String,
    name: String,
}

impl RunHandle {
    /// The client the run is reached through.
    pub fn client(&self) -> Client {
        Client {
            via: self.via.clone(),
        }
    }

    /// The run id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The run name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn by_id(&self) -> RunRef {
        RunRef {
            run_name: None,
            id: Some(self.id.clone()),
        }
    }

    fn gone(&self) -> EngineError {
        EngineError::Invalid(format!("run {} no longer exists", self.name))
    }

    /// The run record with every job submission and their instances, read now.
    pub async fn snapshot(&self) -> Result<Snapshot, EngineError> {
        match &self.via {
            Via::Engine(engine) => {
                let store = engine.store();
                let run = store.run(&self.id)?.ok_or_else(|| self.gone())?;
                let jobs = store.jobs_of_run(&self.id)?;
                let mut ids: Vec<&str> = jobs
                    .iter()
                    .filter_map(|j| j.instance_id.as_deref())
                    .collect();
                ids.sort_unstable();
                ids.dedup();
                let mut instances = Vec::new();
                for id in ids {
                    instances.extend(store.instance(id)?);
                }
                Ok(Snapshot {
                    run,
                    jobs,
                    instances,
                    service: None,
                })
            }
            Via::Server(remote) => snapshot_of(remote, &self.by_id())
                .await?
                .ok_or_else(|| self.gone()),
        }
    }

    /// Where a service is published: its URL on the server's proxy and its model endpoint
    /// (dstack's `ServiceSpec`); `None` for other runs, and for runs of an engine hosted in
    /// this process (only a `dstack server` proxies services).
    pub fn service(&self, run: &Run) -> Option<ServiceEndpoint> {
        service_of(&self.via, run)
    }

    /// A service's running replicas as the server's proxy sees them (readiness, probes);
    /// empty for other runs and for an engine hosted in this process (no proxy).
    pub async fn replicas(&self) -> Result<Vec<protocol::ReplicaState>, EngineError> {
        match &self.via {
            Via::Engine(_) => Ok(Vec::new()),
            Via::Server(remote) => Ok(remote.call("runs/replicas", &self.by_id()).await?),
        }
    }

    /// The run record, read now.
    pub async fn run(&self) -> Result<Run, EngineError> {
        match &self.via {
            Via::Engine(engine) => engine.store().run(&self.id)?.ok_or_else(|| self.gone()),
            Via::Server(_) => Ok(self.snapshot().await?.run),
        }
    }

    /// The current status.
    pub async fn status(&self) -> Result<RunStatus, EngineError> {
        Ok(self.run().await?.status)
    }

    /// Every job submission of the run.
    pub async fn jobs(&self) -> Result<Vec<Job>, EngineError> {
        Ok(self.snapshot().await?.jobs)
    }

    /// The exit status of the latest submission of job 0, once it exited.
    pub async fn exit_status(&self) -> Result<Option<i32>, EngineError> {
        Ok(latest_job(&self.jobs().await?).and_then(|j| j.exit_status))
    }

    /// The metrics the run's job reported: every JSON object it wrote as a line to
    /// `$DSTACK_METRICS_FILE`, in order (other lines are skipped). Empty before the job starts.
    pub async fn metrics(&self) -> Result<Vec<serde_json::Value>, EngineError> {
        let engine = match &self.via {
            Via::Engine(engine) => engine,
            Via::Server(remote) => return Ok(remote.call("runs/metrics", &self.by_id()).await?),
        };
        let jobs = engine.store().jobs_of_run(&self.id)?;
        let Some(job) = latest_job(&jobs) else {
            return Ok(Vec::new());
        };
        let Some(instance) = job.instance_id.as_deref() else {
            return Ok(Vec::new());
        };
        let agent = engine.agent(instance).await?;
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
        self.forward_job_ports(0, 0, &[]).await
    }

    /// Forwards the ports of job `job_num` of replica `replica_num` (its latest submission),
    /// with `overrides` (`(local, remote)`: remote port `remote` at `local` here, whether
    /// configured or not), for as long as the returned guard lives.
    pub async fn forward_job_ports(
        &self,
        job_num: u32,
        replica_num: u32,
        overrides: &[(u16, u16)],
    ) -> Result<crate::forward::PortForward, EngineError> {
        let loopback = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
        self.forward_job_ports_on(loopback, job_num, replica_num, overrides)
            .await
    }

    /// [`RunHandle::forward_job_ports`], listening on `bind` (dstack's `bind_address`)
    /// rather than `127.0.0.1`. Ports of a job on this machine that are not moved are not
    /// forwarded: they are where the job itself listens.
    pub async fn forward_job_ports_on(
        &self,
        bind: std::net::IpAddr,
        job_num: u32,
        replica_num: u32,
        overrides: &[(u16, u16)],
    ) -> Result<crate::forward::PortForward, EngineError> {
        let Snapshot {
            run,
            jobs,
            instances,
            ..
        } = self.snapshot().await?;
        let config = run.spec.configuration().map_err(|e| {
            EngineError::Invalid(format!("stored configuration of run {}: {e}", run.name))
        })?;
        let mut ports: Vec<(u16, u16)> = match config {
            // A service is reached through the server's proxy (`RunHandle::service`); only
            // ports asked for explicitly are forwarded.
            Configuration::Service(_) if overrides.is_empty() => {
                return Ok(crate::forward::PortForward::none())
            }
            Configuration::Service(_) => Vec::new(),
            _ => crate::engine::ports(&config)
                .iter()
                .map(|p| (p.local_port.unwrap_or(p.container_port), p.container_port))
                .collect(),
        };
        for &(here, there) in overrides {
            match ports.iter_mut().find(|(_, remote)| *remote == there) {
                Some(port) => port.0 = here,
                None => ports.push((here, there)),
            }
        }
        let job = jobs
            .iter()
            .filter(|j| j.job_num == job_num && j.replica_num == replica_num)
            .max_by_key(|j| j.submission_num)
            .ok_or_else(|| {
                EngineError::Invalid(format!(
                    "run {} has no job {job_num} of replica {replica_num}",
                    run.name
                ))
            })?;
        let instance_id = job.instance_id.clone().ok_or_else(|| {
            EngineError::Invalid(format!("run {} is not placed on an instance yet", run.name))
        })?;
        let instance = instances
            .iter()
            .find(|i| i.id == instance_id)
            .ok_or_else(|| EngineError::Invalid(format!("unknown instance {instance_id}")))?;
        let local = instance.session.is_none();
        let dial = match &self.via {
            Via::Engine(engine) => crate::forward::Dial::Engine(engine.clone()),
            Via::Server(remote) => crate::forward::Dial::Server(remote.clone()),
        };
        crate::forward::forward(dial, &instance_id, ports, local, bind).await
    }

    /// The link that opens this dev environment in its IDE (`ide:`, see [`crate::ide`]) on
    /// the working directory of its first job, through its `ssh <run>` entry; `None` for
    /// other runs, a dev environment without `ide`, or one whose first job is not running.
    pub async fn ide_link(&self) -> Result<Option<String>, EngineError> {
        let snapshot = self.snapshot().await?;
        let config = snapshot.run.spec.configuration().map_err(|e| {
            EngineError::Invalid(format!("stored configuration of run {}: {e}", self.name))
        })?;
        let Configuration::DevEnvironment(dev) = &config else {
            return Ok(None);
        };
        let Some(ide) = dev.ide else {
            return Ok(None);
        };
        let Some(job) = latest_job(&snapshot.jobs).filter(|j| j.status == JobStatus::Running)
        else {
            return Ok(None);
        };
        let endpoint: crate::agent::SshEndpoint = match &self.via {
            Via::Engine(engine) => {
                let instance = job.instance_id.as_deref().unwrap_or_default();
                engine.agent(instance).await?.ssh_endpoint(&job.id).await?
            }
            Via::Server(remote) => {
                let request = protocol::SshTunnelRequest {
                    run_name: self.name.clone(),
                    job_num: 0,
                    replica_num: 0,
                };
                remote.call("runs/ssh_endpoint", &request).await?
            }
        };
        Ok(Some(crate::ide::link(
            ide,
            &self.name,
            &endpoint.working_dir,
        )))
    }

    /// Waits until the run has finished and returns it.
    pub async fn wait(&self) -> Result<Run, EngineError> {
        self.wait_until(|s| s.is_finished()).await
    }

    /// Waits until the run's status satisfies `done` (or the run finished) and returns it.
    pub async fn wait_until(&self, done: impl Fn(RunStatus) -> bool) -> Result<Run, EngineError> {
        let wake = |s: RunStatus| done(s) || s.is_finished();
        let engine = match &self.via {
            Via::Engine(engine) => engine,
            Via::Server(remote) => {
                let mut run = self.run().await?;
                while !wake(run.status) {
                    let request = WaitRequest {
                        id: self.id.clone(),
                        status: run.status,
                        timeout_ms: WAIT_SLICE.as_millis() as u64,
                    };
                    let limit = WAIT_SLICE + Duration::from_secs(30);
                    run = remote.post(&wait_path(remote), &request, limit).await?;
                }
                return Ok(run);
            }
        };
        // Watching before reading: no change made in between is missed.
        let mut changes = engine.watch_run(&self.id, RunStatus::Submitted, wake);
        changes.mark_unchanged();
        let mut run = self.run().await?;
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
            run = self.run().await?;
        }
    }

    /// Stops the run (see [`Engine::stop`]).
    pub async fn stop(&self, abort: bool) -> Result<Run, EngineError> {
        match &self.via {
            Via::Engine(engine) => engine.stop(&self.id, abort).await,
            Via::Server(remote) => {
                let request = StopRequest {
                    runs_names: Vec::new(),
                    ids: vec![self.id.clone()],
                    abort,
                };
                let mut stopped: Vec<Run> = remote.call("runs/stop", &request).await?;
                stopped.pop().ok_or_else(|| self.gone())
            }
        }
    }

    /// The output of the run's first job: everything written so far, and with `follow`
    /// everything it writes until it finishes (across retries).
    pub fn logs(&self, follow: bool) -> LogStream {
        self.job_logs(LogQuery {
            follow,
            ..LogQuery::default()
        })
    }

    /// The output of one job of the run (`query`'s replica and node), from `query.since_ms`
    /// on, following it until the run finishes with `query.follow` (across retries).
    pub fn job_logs(&self, query: LogQuery) -> LogStream {
        match &self.via {
            Via::Engine(engine) => logs::stream(engine.clone(), self.id.clone(), query),
            Via::Server(remote) => {
                let remote = remote.clone();
                let request = LogsRequest {
                    id: self.id.clone(),
                    query,
                };
                let opened = async move { remote.stream("logs/follow", &request).await };
                Box::pin(futures_util::stream::once(opened).flat_map(|opened| {
                    match opened {
                        Ok(bytes) => bytes
                            .map(|chunk| chunk.map_err(|e| EngineError::from(ServerError::from(e))))
                            .boxed(),
                        Err(e) => futures_util::stream::once(async move { Err(e.into()) }).boxed(),
                    }
                }))
            }
        }
    }
}

/// How many runs' metrics `Runs::metrics_many` reads at once.
const METRICS_AT_ONCE: usize = 16;

/// The project route of `runs/wait`.
fn wait_path(remote: &Remote) -> String {
    format!("/api/project/{}/runs/wait", remote.project())
}

/// The latest submission of the first job (node 0 of replica 0).
fn latest_job(jobs: &[Job]) -> Option<&Job> {
    jobs.iter()
        .filter(|j| j.slot() == (0, 0))
        .max_by_key(|j| j.submission_num)
}

/// The JSON values of a newline-delimited stream.
fn json_lines<T: serde::de::DeserializeOwned + Send + 'static>(
    bytes: crate::http::client::ByteStream,
) -> Pin<Box<dyn Stream<Item = Result<T, EngineError>> + Send>> {
    fn parse<T: serde::de::DeserializeOwned>(line: &[u8]) -> Result<T, EngineError> {
        serde_json::from_slice(line)
            .map_err(|e| EngineError::Invalid(format!("unexpected answer from the server: {e}")))
    }
    let lines = futures_util::stream::unfold(
        (bytes, Vec::<u8>::new(), false),
        |(mut bytes, mut buf, done)| async move {
            loop {
                if let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    return Some((parse(&line[..pos]), (bytes, buf, done)));
                }
                if done {
                    return None;
                }
                match bytes.next().await {
                    Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                    Some(Err(e)) => {
                        let e = EngineError::from(ServerError::from(e));
                        return Some((Err(e), (bytes, buf, true)));
                    }
                    None if buf.is_empty() => return None,
                    None => {
                        let rest = std::mem::take(&mut buf);
                        return Some((parse(&rest), (bytes, buf, true)));
                    }
                }
            }
        },
    );
    Box::pin(lines)
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
