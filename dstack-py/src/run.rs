//! `RawRun` and `RawLogs`: the native side of `dstack.Run` — a run's record, waiting,
//! stopping, metrics and logs, each blocking (GIL released, Ctrl-C honoured) or for asyncio.

use std::sync::Arc;
use std::time::Duration;

use dstack_core::client::protocol::{LogQuery, Snapshot};
use dstack_core::client::LogStream;
use dstack_core::model::RunStatus;
use dstack_core::RunHandle;
use futures_util::StreamExt;
use pyo3::exceptions::PyStopAsyncIteration;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use tokio::sync::Mutex;

use crate::convert::{record_to_py, to_py};
use crate::errors::{raise, Failure, Outcome};
use crate::runtime::{block_on, spawn, RawTask};

/// One run.
#[pyclass(module = "dstack._native", frozen)]
pub struct RawRun {
    handle: RunHandle,
}

impl RawRun {
    pub fn new(handle: RunHandle) -> Self {
        RawRun { handle }
    }
}

async fn snapshot(handle: &RunHandle) -> Outcome<Snapshot> {
    Ok(handle.snapshot().await?)
}

pub(crate) fn snapshot_to_py(py: Python<'_>, s: Snapshot) -> PyResult<PyObject> {
    let dict = PyDict::new(py);
    dict.set_item("run", record_to_py(py, &s.run)?)?;
    dict.set_item("jobs", record_to_py(py, &s.jobs)?)?;
    dict.set_item("instances", record_to_py(py, &s.instances)?)?;
    dict.set_item("service", record_to_py(py, &s.service)?)?;
    Ok(dict.into_any().unbind())
}

/// Waits for the run to finish (or, with `running`, to be running or finished), at most
/// `timeout` seconds; `None` when the time ran out.
async fn wait(handle: RunHandle, timeout: Option<f64>, running: bool) -> Outcome<Option<Snapshot>> {
    let until = handle.wait_until(|s| running && s == RunStatus::Running);
    let finished = match timeout {
        None => Some(until.await?),
        Some(secs) => {
            let limit = Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(Duration::MAX);
            match tokio::time::timeout(limit, until).await {
                Ok(run) => Some(run?),
                Err(_) => None,
            }
        }
    };
    match finished {
        Some(_) => Ok(Some(snapshot(&handle).await?)),
        None => Ok(None),
    }
}

fn waited_to_py(py: Python<'_>, waited: Option<Snapshot>) -> PyResult<PyObject> {
    match waited {
        Some(s) => snapshot_to_py(py, s),
        None => Ok(py.None()),
    }
}

async fn metrics(handle: RunHandle) -> Outcome<Vec<serde_json::Value>> {
    Ok(handle.metrics().await?)
}

fn metrics_to_py(py: Python<'_>, values: Vec<serde_json::Value>) -> PyResult<PyObject> {
    to_py(py, &serde_json::Value::Array(values))
}

async fn stop(handle: RunHandle, abort: bool) -> Outcome<Snapshot> {
    handle.stop(abort).await?;
    snapshot(&handle).await
}

#[pymethods]
impl RawRun {
    /// The run id.
    #[getter]
    fn id(&self) -> &str {
        self.handle.id()
    }

    /// The run name.
    #[getter]
    fn name(&self) -> &str {
        self.handle.name()
    }

    /// `{"run": …, "jobs": […], "instances": […]}`, read now.
    fn snapshot(&self, py: Python<'_>) -> PyResult<PyObject> {
        let handle = self.handle.clone();
        let s = block_on(py, async move { snapshot(&handle).await })?;
        snapshot_to_py(py, raise(py, s)?)
    }

    /// Waits until the run finished (with `running`: is running or finished), at most
    /// `timeout` seconds, and returns its snapshot, or `None` if the time ran out.
    #[pyo3(signature = (timeout = None, running = false))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>, running: bool) -> PyResult<PyObject> {
        let waited = block_on(py, wait(self.handle.clone(), timeout, running))?;
        waited_to_py(py, raise(py, waited)?)
    }

    /// `wait`, for asyncio.
    #[pyo3(signature = (timeout = None, running = false))]
    fn wait_async(&self, timeout: Option<f64>, running: bool) -> PyResult<RawTask> {
        spawn(wait(self.handle.clone(), timeout, running), waited_to_py)
    }

    /// Stops the run (gracefully, or at once with `abort`) and returns its snapshot.
    #[pyo3(signature = (abort = false))]
    fn stop(&self, py: Python<'_>, abort: bool) -> PyResult<PyObject> {
        let stopped = block_on(py, stop(self.handle.clone(), abort))?;
        snapshot_to_py(py, raise(py, stopped)?)
    }

    /// `stop`, for asyncio.
    #[pyo3(signature = (abort = false))]
    fn stop_async(&self, abort: bool) -> PyResult<RawTask> {
        spawn(stop(self.handle.clone(), abort), snapshot_to_py)
    }

    /// The metrics the job reported (a list of dicts).
    fn metrics(&self, py: Python<'_>) -> PyResult<PyObject> {
        let values = block_on(py, metrics(self.handle.clone()))?;
        metrics_to_py(py, raise(py, values)?)
    }

    /// `metrics`, for asyncio.
    fn metrics_async(&self) -> PyResult<RawTask> {
        spawn(metrics(self.handle.clone()), metrics_to_py)
    }

    /// The run's artifacts: `{"run_name", "frozen", "files": [{"path", "hash", "size",
    /// "mode"}], …}` (saved now while it runs, final once it has ended).
    fn artifacts(&self, py: Python<'_>) -> PyResult<PyObject> {
        let handle = self.handle.clone();
        let manifest = block_on(py, async move {
            handle.client().artifacts().list(handle.name()).await
        })?;
        let manifest = raise(py, manifest.map_err(Failure::from))?;
        let value = serde_json::to_value(&manifest).unwrap_or_default();
        crate::convert::to_py(py, &value)
    }

    /// Downloads the run's artifacts (those at or below `path`, or all) into `dir`; the
    /// paths written, relative to `dir`.
    #[pyo3(signature = (dir, path = None))]
    fn download_artifacts(
        &self,
        py: Python<'_>,
        dir: std::path::PathBuf,
        path: Option<String>,
    ) -> PyResult<Vec<String>> {
        let handle = self.handle.clone();
        let files = block_on(py, async move {
            let client = handle.client();
            client
                .artifacts()
                .download(handle.name(), path.as_deref(), &dir)
                .await
        })?;
        let files = raise(py, files.map_err(Failure::from))?;
        Ok(files.into_iter().map(|f| f.path).collect())
    }

    /// The link that opens a running dev environment in its IDE (`ide:`), or `None`.
    fn ide_link(&self, py: Python<'_>) -> PyResult<Option<String>> {
        let handle = self.handle.clone();
        let link = block_on(py, async move { handle.ide_link().await })?;
        raise(py, link.map_err(Failure::from))
    }

    /// Forwards the ports of job `job_num` of replica `replica_num` to `bind_address` of this
    /// machine (jobs on other hosts, and ports moved by `overrides`: `(local, remote)`) until
    /// the returned object is closed or dropped.
    #[pyo3(signature = (job_num = 0, replica_num = 0, overrides = Vec::new(), bind_address = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)))]
    fn forward_ports(
        &self,
        py: Python<'_>,
        job_num: u32,
        replica_num: u32,
        overrides: Vec<(u16, u16)>,
        bind_address: std::net::IpAddr,
    ) -> PyResult<RawForward> {
        let handle = self.handle.clone();
        let forward = block_on(py, async move {
            handle
                .forward_job_ports_on(bind_address, job_num, replica_num, &overrides)
                .await
        })?;
        let forward = raise(py, forward.map_err(Failure::from))?;
        Ok(RawForward {
            ports: forward.ports.clone(),
            guard: std::sync::Mutex::new(Some(forward)),
        })
    }

    /// The output of job `job_num` of replica `replica_num` (written at `since_ms`, Unix ms,
    /// or later): what it wrote so far, and with `follow` everything until the run ends.
    #[pyo3(signature = (follow = false, replica_num = 0, job_num = 0, since_ms = None))]
    fn logs(&self, follow: bool, replica_num: u32, job_num: u32, since_ms: Option<u64>) -> RawLogs {
        let query = LogQuery {
            follow,
            replica_num,
            job_num,
            since_ms,
        };
        RawLogs {
            stream: Arc::new(Mutex::new(self.handle.job_logs(query))),
        }
    }
}

/// Forwarded ports; `close()` (or garbage collection) stops forwarding.
#[pyclass(module = "dstack._native", frozen)]
pub struct RawForward {
    ports: Vec<(u16, u16)>,
    guard: std::sync::Mutex<Option<dstack_core::forward::PortForward>>,
}

#[pymethods]
impl RawForward {
    /// `[(local port, port on the job's host)]`.
    #[getter]
    fn ports(&self) -> Vec<(u16, u16)> {
        self.ports.clone()
    }

    /// Stops forwarding.
    fn close(&self) {
        let guard = self
            .guard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        drop(guard);
    }
}

/// An iterator of output chunks (`bytes`).
#[pyclass(module = "dstack._native", frozen)]
pub struct RawLogs {
    stream: Arc<Mutex<LogStream>>,
}

async fn next_chunk(stream: Arc<Mutex<LogStream>>) -> Outcome<Option<Vec<u8>>> {
    match stream.lock().await.next().await {
        Some(Ok(chunk)) => Ok(Some(chunk.to_vec())),
        Some(Err(e)) => Err(Failure::from(e)),
        None => Ok(None),
    }
}

#[pymethods]
impl RawLogs {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Py<PyBytes>>> {
        let chunk = block_on(py, next_chunk(self.stream.clone()))?;
        Ok(raise(py, chunk)?.map(|c| PyBytes::new(py, &c).unbind()))
    }

    /// The next chunk, for asyncio: `bytes`, or `StopAsyncIteration` raised at the end.
    fn next_async(&self) -> PyResult<RawTask> {
        let convert = |py: Python<'_>, chunk: Option<Vec<u8>>| match chunk {
            Some(c) => Ok(PyBytes::new(py, &c).into_any().unbind()),
            None => Err(PyStopAsyncIteration::new_err(())),
        };
        spawn(next_chunk(self.stream.clone()), convert)
    }
}
