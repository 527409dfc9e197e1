//! `RawClient`: the native side of `dstack.Client` — a client of the state directory's
//! `dstack server` (started when none answers), and its runs and fleets as plain data.

use std::collections::BTreeMap;
use std::path::PathBuf;

use dstack_core::api::RequestError;
use dstack_core::config::Configuration;
use dstack_core::engine::{ApplyOptions, RunPlan};
use dstack_core::model::RunGroup;
use dstack_core::Client;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::convert::{from_py, record_to_py, to_py};
use crate::errors::{raise, Failure, Outcome};
use crate::run::RawRun;
use crate::runtime::{block_on, spawn, RawTask};

/// A client of a server.
#[pyclass(module = "dstack._native", frozen)]
pub struct RawClient {
    client: Client,
    home: PathBuf,
}

/// How to apply a run, as the Python layer passes it.
struct Apply {
    name: Option<String>,
    env: BTreeMap<String, String>,
    configuration_path: Option<String>,
    client_dir: Option<String>,
}

impl Apply {
    fn new(
        name: Option<String>,
        env: Option<BTreeMap<String, String>>,
        configuration_path: Option<String>,
        client_dir: Option<String>,
    ) -> Self {
        Apply {
            name,
            env: env.unwrap_or_default(),
            configuration_path,
            client_dir,
        }
    }
}

#[pymethods]
impl RawClient {
    /// A client of the server of the state directory `home` (its project, or `project`),
    /// starting it with `server` (the `dstack` binary) when none answers; or, with `url` and
    /// `token`, of that server.
    #[staticmethod]
    #[pyo3(signature = (home, server = None, url = None, token = None, project = None))]
    fn open(
        py: Python<'_>,
        home: PathBuf,
        server: Option<PathBuf>,
        url: Option<String>,
        token: Option<String>,
        project: Option<String>,
    ) -> PyResult<RawClient> {
        let opened = match (url, token) {
            (Some(url), Some(token)) => {
                let project = project.as_deref().unwrap_or("main");
                dstack_core::client::Remote::new(&url, project, &token)
                    .map(Client::remote)
                    .map_err(|e| Failure::from(dstack_core::engine::EngineError::from(e)))
            }
            (None, None) => {
                let home = home.clone();
                let connected = block_on(py, async move {
                    Client::connect(&home, server.as_deref()).await
                })?;
                connected.map_err(Failure::from).and_then(|client| {
                    // A project asked for by name must be the one the home's client
                    // configuration leads to.
                    let found = client.server().map(|s| s.project().to_string());
                    match (&project, found) {
                        (Some(wanted), Some(found)) if *wanted != found => Err(Failure::new(
                            "ClientError",
                            format!(
                                "project {wanted} is not this home's (its server has project \
                                 {found}); pass server_url and user_token for another server"
                            ),
                        )),
                        _ => Ok(client),
                    }
                })
            }
            _ => Err(Failure::new(
                "ClientError",
                "server_url and user_token go together",
            )),
        };
        let client = raise(py, opened)?;
        Ok(RawClient { client, home })
    }

    /// The server's URL.
    #[getter]
    fn server_url(&self) -> Option<String> {
        self.client.server().map(|s| s.url())
    }

    /// The state directory.
    #[getter]
    fn home(&self) -> String {
        self.home.display().to_string()
    }

    /// Where a configuration would run: `{"configuration", "offers", "no_offers_reason"}`.
    fn plan(&self, py: Python<'_>, configuration: &Bound<'_, PyAny>) -> PyResult<PyObject> {
        let configuration = configuration_of(py, configuration)?;
        let client = self.client.clone();
        let plan = block_on(py, async move { client.runs().plan(&configuration).await })?;
        plan_to_py(py, raise(py, plan.map_err(Failure::from))?)
    }

    /// `plan`, for asyncio (see [`RawTask`]).
    fn plan_async(&self, py: Python<'_>, configuration: &Bound<'_, PyAny>) -> PyResult<RawTask> {
        let configuration = configuration_of(py, configuration)?;
        let client = self.client.clone();
        let fut = async move { Ok(client.runs().plan(&configuration).await?) };
        spawn(fut, plan_to_py)
    }

    /// Submits a run and returns its handle; its jobs on this machine run in `client_dir`
    /// (default: the current directory).
    #[pyo3(signature = (configuration, name = None, env = None, configuration_path = None, client_dir = None))]
    fn apply(
        &self,
        py: Python<'_>,
        configuration: &Bound<'_, PyAny>,
        name: Option<String>,
        env: Option<BTreeMap<String, String>>,
        configuration_path: Option<String>,
        client_dir: Option<String>,
    ) -> PyResult<RawRun> {
        let configuration = configuration_of(py, configuration)?;
        let options = Apply::new(name, env, configuration_path, client_dir);
        let client = self.client.clone();
        let run = block_on(py, apply(client, configuration, options))?;
        raise(py, run)
    }

    /// Submits one run of `configuration` per trial `(name, env)`, all in one transaction,
    /// as group `group_id` of which at most `max_parallel` runs hold resources at once.
    #[pyo3(signature = (configuration, trials, group_id, max_parallel = None))]
    fn apply_group(
        &self,
        py: Python<'_>,
        configuration: &Bound<'_, PyAny>,
        trials: Vec<(String, BTreeMap<String, String>)>,
        group_id: String,
        max_parallel: Option<u32>,
    ) -> PyResult<Vec<RawRun>> {
        let configuration = configuration_of(py, configuration)?;
        let group = RunGroup {
            id: group_id,
            max_parallel,
        };
        let items = trials
            .into_iter()
            .map(|(name, env)| {
                let options = ApplyOptions {
                    name: Some(name),
                    env,
                    group: Some(group.clone()),
                    ..ApplyOptions::default()
                };
                (configuration.clone(), options)
            })
            .collect();
        let client = self.client.clone();
        let runs = block_on(py, async move {
            let runs = client.runs().apply_all(items).await?;
            Ok::<_, Failure>(runs.into_iter().map(RawRun::new).collect())
        })?;
        raise(py, runs)
    }

    /// Tags the artifacts of finished run `run`, or uploads local `paths` as `:name`; the tag
    /// `{"workflow", "name", "created_at_ms", "manifest"}`.
    #[pyo3(signature = (name, run = None, paths = Vec::new()))]
    fn tags_add(
        &self,
        py: Python<'_>,
        name: String,
        run: Option<String>,
        paths: Vec<PathBuf>,
    ) -> PyResult<PyObject> {
        let client = self.client.clone();
        let tag = block_on(py, async move {
            match run {
                Some(run) => client.tags().add(&name, &run).await,
                None => client.tags().add_files(&name, &paths).await,
            }
        })?;
        let tag = raise(py, tag.map_err(Failure::from))?;
        to_py(py, &serde_json::to_value(&tag).unwrap_or_default())
    }

    /// Every tag (as `tags_add` returns them).
    fn tags_list(&self, py: Python<'_>) -> PyResult<PyObject> {
        let client = self.client.clone();
        let tags = block_on(py, async move { client.tags().list().await })?;
        let tags = raise(py, tags.map_err(Failure::from))?;
        to_py(py, &serde_json::to_value(&tags).unwrap_or_default())
    }

    /// Deletes tag `tag` (`TAG`, `WORKFLOW:TAG` or `:TAG`); the tag deleted, as written
    /// in full.
    fn tags_delete(&self, py: Python<'_>, tag: String) -> PyResult<String> {
        let client = self.client.clone();
        let deleted = block_on(py, async move { client.tags().delete(&tag).await })?;
        Ok(raise(py, deleted.map_err(Failure::from))?.to_string())
    }

    /// The metrics of each of these runs (by id), in order, in one request; none for a run
    /// that is gone or whose host cannot be reached now.
    fn metrics_many(&self, py: Python<'_>, ids: Vec<String>) -> PyResult<PyObject> {
        let client = self.client.clone();
        let found = block_on(py, async move { client.runs().metrics_many(&ids).await })?;
        let found = raise(py, found.map_err(Failure::from))?;
        crate::convert::to_py(
            py,
            &serde_json::Value::Array(found.into_iter().map(serde_json::Value::Array).collect()),
        )
    }

    /// Stops these runs (by id) in one request.
    #[pyo3(signature = (ids, abort = false))]
    fn stop_many(&self, py: Python<'_>, ids: Vec<String>, abort: bool) -> PyResult<()> {
        let client = self.client.clone();
        let stopped = block_on(
            py,
            async move { client.runs().stop_many(&ids, abort).await },
        )?;
        raise(py, stopped.map(drop).map_err(Failure::from))
    }

    /// The status changes of group `group_id` (a sweep's trials), pushed by the engine.
    fn watch_group(&self, group_id: &str) -> crate::group::RawGroupWatch {
        crate::group::RawGroupWatch::new(self.client.runs().watch_group(group_id))
    }

    /// `apply`, for asyncio.
    #[pyo3(signature = (configuration, name = None, env = None, configuration_path = None, client_dir = None))]
    fn apply_async(
        &self,
        py: Python<'_>,
        configuration: &Bound<'_, PyAny>,
        name: Option<String>,
        env: Option<BTreeMap<String, String>>,
        configuration_path: Option<String>,
        client_dir: Option<String>,
    ) -> PyResult<RawTask> {
        let configuration = configuration_of(py, configuration)?;
        let options = Apply::new(name, env, configuration_path, client_dir);
        let fut = apply(self.client.clone(), configuration, options);
        spawn(fut, |py, run| Ok(Py::new(py, run)?.into_any()))
    }

    /// The current run with this name, or `None`.
    fn get(&self, py: Python<'_>, name: String) -> PyResult<Option<RawRun>> {
        let client = self.client.clone();
        let found = block_on(py, async move { client.runs().get(&name).await })?;
        Ok(raise(py, found.map_err(Failure::from))?.map(RawRun::new))
    }

    /// Runs (as records), newest first: unfinished ones only unless `all`.
    #[pyo3(signature = (all = false, limit = None))]
    fn list(&self, py: Python<'_>, all: bool, limit: Option<usize>) -> PyResult<Vec<PyObject>> {
        let client = self.client.clone();
        let runs = block_on(py, async move { client.runs().list(all).await })?;
        let runs = raise(py, runs.map_err(Failure::from))?;
        runs.iter()
            .take(limit.unwrap_or(usize::MAX))
            .map(|r| record_to_py(py, r))
            .collect()
    }

    /// Handles of these run names (current runs only; unknown names are skipped).
    fn handles(&self, py: Python<'_>, names: Vec<String>) -> PyResult<Vec<RawRun>> {
        let client = self.client.clone();
        let found = block_on(py, async move {
            let mut found = Vec::with_capacity(names.len());
            for name in &names {
                found.push(client.runs().get(name).await?);
            }
            Ok::<_, Failure>(found)
        })?;
        Ok(raise(py, found)?
            .into_iter()
            .flatten()
            .map(RawRun::new)
            .collect())
    }

    /// The snapshots (`{"run", "jobs", "instances"}`) of these runs, those that exist, in
    /// one request.
    fn snapshots(&self, py: Python<'_>, ids: Vec<String>) -> PyResult<Vec<PyObject>> {
        let client = self.client.clone();
        let found = block_on(py, async move { client.runs().snapshots(&ids).await })?;
        let found = raise(py, found.map_err(Failure::from))?;
        found
            .into_iter()
            .map(|s| crate::run::snapshot_to_py(py, s))
            .collect()
    }

    /// Fleets, each `{"fleet": …, "instances": […]}`.
    fn fleets(&self, py: Python<'_>) -> PyResult<Vec<PyObject>> {
        let client = self.client.clone();
        let fleets = block_on(py, async move { client.fleets().list().await })?;
        let fleets = raise(py, fleets.map_err(Failure::from))?;
        fleets
            .iter()
            .map(|(fleet, instances)| {
                let item = PyDict::new(py);
                item.set_item("fleet", record_to_py(py, fleet)?)?;
                item.set_item("instances", record_to_py(py, instances)?)?;
                Ok(item.into_any().unbind())
            })
            .collect()
    }

    /// Applies a fleet configuration (SSH hosts): deploys every host at once and returns
    /// `{"fleet": …, "instances": […]}`; `progress(instance_name, step)` hears each step.
    #[pyo3(signature = (configuration, progress = None))]
    fn apply_fleet(
        &self,
        py: Python<'_>,
        configuration: &Bound<'_, PyAny>,
        progress: Option<PyObject>,
    ) -> PyResult<PyObject> {
        let configuration = configuration_of(py, configuration)?;
        let report = move |instance: &dstack_core::model::Instance, step: &str| {
            if let Some(callback) = &progress {
                Python::with_gil(|py| {
                    if let Err(e) = callback.call1(py, (instance.name.clone(), step.to_string())) {
                        e.write_unraisable(py, None);
                    }
                });
            }
        };
        let client = self.client.clone();
        let applied = block_on(py, async move {
            client.fleets().apply(&configuration, &report).await
        })?;
        let (fleet, instances) = raise(py, applied.map_err(Failure::from))?;
        let item = PyDict::new(py);
        item.set_item("fleet", record_to_py(py, &fleet)?)?;
        item.set_item("instances", record_to_py(py, &instances)?)?;
        Ok(item.into_any().unbind())
    }

    /// Deletes a fleet (stops its hosts' agents, removes what was installed); returns
    /// `[(instance_name, error or None)]`.
    #[pyo3(signature = (name, force = false))]
    fn delete_fleet(
        &self,
        py: Python<'_>,
        name: String,
        force: bool,
    ) -> PyResult<Vec<(String, Option<String>)>> {
        let client = self.client.clone();
        let deleted = block_on(
            py,
            async move { client.fleets().delete(&name, force).await },
        )?;
        let (_, instances) = raise(py, deleted.map_err(Failure::from))?;
        Ok(instances.into_iter().map(|(i, e)| (i.name, e)).collect())
    }

    /// The backends of this home's server: `local`, then the type of each cloud backend its
    /// configuration (`server/config.yml`) lists, in file order.
    fn backends(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        use dstack_backends::config::BackendConfig;
        let config = dstack_backends::config::load(&self.home)
            .map_err(|e| Failure::new("ConfigurationError", e.to_string()));
        let config = raise(py, config)?;
        let mut names = vec!["local".to_string()];
        names.extend(config.backends.iter().map(|b| {
            match b {
                BackendConfig::Aws(_) => "aws",
                BackendConfig::Gcp(_) => "gcp",
            }
            .to_string()
        }));
        Ok(names)
    }

    /// Network volumes (not deleted), as records.
    fn volumes(&self, py: Python<'_>) -> PyResult<PyObject> {
        let client = self.client.clone();
        let volumes = block_on(py, async move { client.volumes().list().await })?;
        let volumes = raise(py, volumes.map_err(Failure::from))?;
        record_to_py(py, &volumes)
    }

    /// Applies a volume configuration (creates the disk or registers `volume_id`); returns
    /// the volume record, `active` or `failed` with its reason.
    fn apply_volume(&self, py: Python<'_>, configuration: &Bound<'_, PyAny>) -> PyResult<PyObject> {
        let configuration = configuration_of(py, configuration)?;
        let client = self.client.clone();
        let applied = block_on(
            py,
            async move { client.volumes().apply(&configuration).await },
        )?;
        let volume = raise(py, applied.map_err(Failure::from))?;
        record_to_py(py, &volume)
    }

    /// Deletes a volume attached nowhere; returns its record.
    fn delete_volume(&self, py: Python<'_>, name: String) -> PyResult<PyObject> {
        let client = self.client.clone();
        let deleted = block_on(py, async move { client.volumes().delete(&name).await })?;
        let volume = raise(py, deleted.map_err(Failure::from))?;
        record_to_py(py, &volume)
    }
}

async fn apply(client: Client, configuration: Configuration, options: Apply) -> Outcome<RawRun> {
    let options = ApplyOptions {
        name: options.name,
        env: options.env,
        configuration_path: options.configuration_path,
        client_dir: options.client_dir,
        ..ApplyOptions::default()
    };
    // As dstack's `apply_configuration`: a service whose name runs is updated in place.
    let runs = client.runs();
    let running = runs
        .running_service(&configuration, options.name.as_deref())
        .await?;
    let run = match running {
        Some(_) => runs.update(configuration, options).await?,
        None => runs.apply(configuration, options).await?,
    };
    Ok(RawRun::new(run))
}

/// A configuration from Python: YAML text is parsed (errors name `file`, or `<string>`, with
/// line and column); plain data (a dict built by the configuration classes, or one returned by
/// `load_configuration`) is validated (errors name `file`, or the configuration type, and the
/// field).
fn parse_any(
    py: Python<'_>,
    configuration: &Bound<'_, PyAny>,
    file: Option<&str>,
) -> PyResult<Configuration> {
    let parsed = if let Ok(text) = configuration.extract::<String>() {
        let file = file.unwrap_or("<string>");
        py.allow_threads(|| dstack_core::config::parse(&text, file))
    } else {
        let value = from_py(configuration, file.unwrap_or("configuration"))?;
        let source = match (file, value.get("type").and_then(|t| t.as_str())) {
            (Some(file), _) => file.to_string(),
            (None, Some(kind)) => format!("{kind} configuration"),
            (None, None) => "configuration".to_string(),
        };
        dstack_core::config::parse_value(&value, &source)
    };
    raise(py, parsed.map_err(Failure::from))
}

fn configuration_of(py: Python<'_>, configuration: &Bound<'_, PyAny>) -> PyResult<Configuration> {
    parse_any(py, configuration, None)
}

fn plan_to_py(py: Python<'_>, plan: RunPlan) -> PyResult<PyObject> {
    let dict = PyDict::new(py);
    dict.set_item("configuration", to_py(py, &plan.configuration.to_json())?)?;
    dict.set_item("offers", record_to_py(py, &plan.offers)?)?;
    dict.set_item("no_offers_reason", plan.no_offers_reason)?;
    Ok(dict.into_any().unbind())
}

/// `configuration` (plain data, or YAML text, normalized first) with the parameters of
/// dstack's `Profile` `profile` (plain data) that it leaves unset, as plain data. An unknown
/// profile field is a `ConfigurationError`.
#[pyfunction]
pub fn with_profile(
    py: Python<'_>,
    configuration: &Bound<'_, PyAny>,
    profile: &Bound<'_, PyAny>,
) -> PyResult<PyObject> {
    let mut value = if configuration.extract::<String>().is_ok() {
        parse_any(py, configuration, None)?.to_json()
    } else {
        from_py(configuration, "configuration")?
    };
    let profile = from_py(profile, "profile")?;
    let merged = dstack_core::api::merge_profile(&mut value, &profile, "").map_err(|e| match e {
        RequestError::Invalid(message) => Failure::new("ConfigurationError", message),
        RequestError::Configuration(errors) => Failure::from(errors),
        RequestError::Unsupported(_) => Failure::new("NotSupportedError", e.to_string()),
    });
    raise(py, merged)?;
    to_py(py, &value)
}

/// Validates a configuration and returns it normalized (dstack's JSON shape). `configuration`
/// is YAML text (errors name `file`, line and column) or plain data (errors name the field).
#[pyfunction]
#[pyo3(signature = (configuration, file = None))]
pub fn validate(
    py: Python<'_>,
    configuration: &Bound<'_, PyAny>,
    file: Option<&str>,
) -> PyResult<PyObject> {
    let configuration = parse_any(py, configuration, file)?;
    to_py(py, &configuration.to_json())
}
