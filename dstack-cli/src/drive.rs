//! Keeping queued runs moving after the client that submitted them exits.
//!
//! The engine lives in client processes. A run that is still waiting for resources (or for a
//! retry) when its client exits needs another process to place it: `dstack apply -d` and a
//! detaching `dstack apply` start one detached `dstack _drive`, which runs the engine until no
//! run is waiting and exits. A lock file makes sure only one driver runs per state directory.

use std::os::unix::process::CommandExt;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use dstack_core::model::RunStatus;
use dstack_core::Client;

use crate::Failure;

/// Statuses that need an engine process to make progress.
const WAITING: &[RunStatus] = &[
    RunStatus::Pending,
    RunStatus::Submitted,
    RunStatus::Provisioning,
    RunStatus::Terminating,
];

fn waiting(client: &Client) -> Result<usize, Failure> {
    let runs = client
        .engine()
        .store()
        .runs_with_status(WAITING)
        .map_err(dstack_core::engine::EngineError::from)?;
    Ok(runs.len())
}

/// Starts a detached driver if some run still waits for the engine.
pub fn ensure_driver(client: &Client) -> Result<(), Failure> {
    if waiting(client)? == 0 {
        return Ok(());
    }
    let exe =
        std::env::current_exe().map_err(|e| Failure::new(format!("cannot locate dstack: {e}")))?;
    std::process::Command::new(exe)
        .arg("_drive")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| Failure::new(format!("cannot start the background engine: {e}")))?;
    Ok(())
}

/// `dstack _drive`: runs the engine until no run waits for it.
pub async fn drive(client: &Client) -> Result<ExitCode, Failure> {
    let home = dstack_core::client::default_home();
    let lock = std::fs::File::create(home.join("driver.lock"))
        .map_err(|e| Failure::new(format!("cannot create the driver lock: {e}")))?;
    if lock.try_lock().is_err() {
        return Ok(ExitCode::SUCCESS); // another driver is at work
    }
    let mut changes = client.engine().subscribe();
    while waiting(client)? > 0 {
        let _ = tokio::time::timeout(Duration::from_secs(1), changes.recv()).await;
    }
    Ok(ExitCode::SUCCESS)
}
