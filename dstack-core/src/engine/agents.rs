//! One watcher per instance: keeps a connection to its agent's event stream, applies job
//! updates as they happen, and reconnects (restarting the agent where the backend can).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use super::{jobs, Inner};
use crate::agent::AgentError;
use crate::model::Instance;

/// How long an instance may stay unreachable before its jobs fail.
const UNREACHABLE_DEADLINE: Duration = Duration::from_secs(20);

/// Watches one instance's agent forever.
pub(crate) async fn watch(inner: Arc<Inner>, instance: Instance) {
    let mut unreachable_since: Option<tokio::time::Instant> = None;
    let mut backoff = Duration::from_millis(50);
    loop {
        match follow(&inner, &instance).await {
            Ok(()) => {
                // The stream ended (the agent restarted): reconnect soon, but never in a hot loop.
                unreachable_since = None;
                backoff = Duration::from_millis(50);
                tokio::time::sleep(backoff).await;
            }
            Err(e) => {
                let since = *unreachable_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= UNREACHABLE_DEADLINE {
                    jobs::fail_unreachable(&inner, &instance.id, &e).await;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
        inner
            .agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&instance.id);
    }
}

/// Connects, reconciles with the agent's view, and applies events until the stream ends.
async fn follow(inner: &Arc<Inner>, instance: &Instance) -> Result<(), AgentError> {
    let client = inner
        .agent(&instance.id)
        .await
        .map_err(|e| AgentError::Unreachable {
            target: instance.name.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
    let mut events = client.events().await?;
    let candidates = jobs::started_on(inner, &instance.id);
    let snapshot = client.jobs().await?;
    jobs::fail_unknown(inner, candidates, &snapshot).await;
    for info in snapshot {
        jobs::on_agent_job(inner, info).await;
    }
    while let Some(event) = events.next().await {
        match event {
            Ok(info) => jobs::on_agent_job(inner, info).await,
            Err(AgentError::Decode(_)) => continue, // a line from a newer agent: skip it
            Err(_) => break,
        }
    }
    Ok(())
}
