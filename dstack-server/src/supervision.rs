//! When an auto-started server may exit: nothing needs supervision (no unfinished run, no
//! live cloud instance, no backend fleet being brought back to its `nodes.min`, no volume
//! waiting for its auto-cleanup) and no client has called for a while.

use std::sync::atomic::Ordering;
use std::time::Duration;

use dstack_core::model::{InstanceStatus, RunStatus, VolumeStatus};

use crate::Shared;

/// Backends whose instances are not billed by the hour: this machine and the user's own
/// hosts (SSH fleets).
const UNBILLED_BACKENDS: &[&str] = &["local", "ssh"];

/// Whether the server has nothing to do and heard no client for `limit`.
pub(crate) fn may_exit(shared: &Shared, limit: Duration) -> bool {
    let now = shared.started.elapsed().as_millis() as u64;
    let quiet = now.saturating_sub(shared.last_request_ms.load(Ordering::Relaxed));
    quiet >= limit.as_millis() as u64 && !needs_supervision(shared).unwrap_or(true)
}

/// Whether anything the engine keeps an eye on is alive (errors count as yes).
fn needs_supervision(shared: &Shared) -> Result<bool, dstack_core::store::StoreError> {
    let Some(engine) = shared.client.engine() else {
        return Ok(true);
    };
    let store = engine.store();
    let unfinished: Vec<RunStatus> = RunStatus::ALL
        .iter()
        .copied()
        .filter(|s| !s.is_finished())
        .collect();
    if !store.runs_with_status(&unfinished)?.is_empty() {
        return Ok(true);
    }
    let billed = store.instances()?.into_iter().any(|i| {
        i.status != InstanceStatus::Terminated && !UNBILLED_BACKENDS.contains(&i.backend.as_str())
    });
    if billed || store.fleets()?.iter().any(|f| f.restoring()) {
        return Ok(true);
    }
    Ok(store
        .volumes()?
        .iter()
        .any(|v| v.status != VolumeStatus::Deleted && !v.external))
}
