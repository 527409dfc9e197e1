//! `RawGroupWatch`: the native side of a sweep's waiting and progress — its runs' status
//! changes, pushed by the engine (one stream for the group, not a poll of every trial).

use std::sync::Arc;
use std::time::Duration;

use dstack_core::client::GroupChanges;
use futures_util::{FutureExt, StreamExt};
use pyo3::prelude::*;
use tokio::sync::Mutex;

use crate::errors::{raise, Failure, Outcome};
use crate::runtime::block_on;

/// The status changes of a run group: `next(timeout)` gives those that came, each
/// `(run id, status)`.
#[pyclass(module = "dstack._native", frozen)]
pub struct RawGroupWatch {
    stream: Arc<Mutex<GroupChanges>>,
}

impl RawGroupWatch {
    pub fn new(stream: GroupChanges) -> Self {
        RawGroupWatch {
            stream: Arc::new(Mutex::new(stream)),
        }
    }
}

/// The changes ready after waiting up to `timeout` for the first (none if it passed); `None`
/// once the stream has ended.
async fn next_changes(
    stream: Arc<Mutex<GroupChanges>>,
    timeout: Option<Duration>,
) -> Outcome<Option<Vec<(String, &'static str)>>> {
    let mut stream = stream.lock().await;
    let first = match timeout {
        None => stream.next().await,
        Some(limit) => match tokio::time::timeout(limit, stream.next()).await {
            Ok(first) => first,
            Err(_) => return Ok(Some(Vec::new())),
        },
    };
    let Some(first) = first else { return Ok(None) };
    let mut changes = vec![first.map_err(Failure::from)?];
    // Whatever else has come meanwhile, without waiting: one call per burst of changes.
    while let Some(Some(next)) = stream.next().now_or_never() {
        changes.push(next.map_err(Failure::from)?);
    }
    Ok(Some(
        changes
            .into_iter()
            .map(|c| (c.run_id, c.status.as_str()))
            .collect(),
    ))
}

#[pymethods]
impl RawGroupWatch {
    /// `[(run id, status)]`: the changes that came, waiting up to `timeout` seconds for the
    /// first (`[]` if none came); `None` once every run of the group has finished.
    #[pyo3(signature = (timeout = None))]
    fn next(
        &self,
        py: Python<'_>,
        timeout: Option<f64>,
    ) -> PyResult<Option<Vec<(String, &'static str)>>> {
        let limit =
            timeout.map(|s| Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX));
        let changes = block_on(py, next_changes(self.stream.clone(), limit))?;
        raise(py, changes)
    }
}
