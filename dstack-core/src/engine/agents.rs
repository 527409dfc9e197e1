//! One watcher per instance: keeps a connection to its agent's event stream, applies job
//! updates as they happen, and reconnects (restarting the agent where the backend can).
//!
//! An agent that cannot be reached, or is hung (its event stream silent, heartbeats included,
//! for `agent::EVENTS_SILENCE`), is unreachable. One that stays unreachable for
//! `EngineOptions::unreachable_after` (even while an attempt to reach it still waits) fails
//! the jobs on its instance with `instance_unreachable` (their runs retry elsewhere if their
//! policy says so) and marks the instance unreachable, so nothing new is placed there. The
//! watcher keeps trying; from twice that time on it also redeploys the agent where the
//! backend can (an SSH host whose agent died), after the failed jobs' retries had the time to
//! go elsewhere. When the agent answers again the instance is usable again. The watcher never
//! terminates an instance; the sweep terminates a cloud instance unreachable for
//! `EngineOptions::termination_deadline` as lost (`engine::consolidate`), never an SSH host.
//!
//! The watcher of a cloud instance also renews its agent's owner lease (`POST /api/lease`)
//! every `EngineOptions::lease_renewal`: an explicit request rather than the open event
//! stream, because a stream whose client vanished (a laptop closed mid-connection) can look
//! open on the host for as long as TCP takes to give up on it, and the lease must lapse
//! within its window of the owner going away.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};

use super::{jobs, queues, Inner};
use crate::agent::AgentError;
use crate::model::{now_ms, Instance};

/// How long after the store failed to record an agent's reports the agent is followed anew
/// (its state read again and recorded): a store that fails (a full disk, a lock held for
/// too long) is tried again at this pace.
const AFTER_STORE_ERROR: Duration = Duration::from_secs(1);

/// Watches one instance's agent forever (and renews its owner lease, on cloud instances).
pub(crate) async fn watch(inner: Arc<Inner>, instance: Instance) {
    tokio::select! {
        () = follow_forever(&inner, &instance) => {}
        () = keep_lease(&inner, &instance) => {}
    }
}

/// Renews the owner lease of a cloud instance's agent now and every
/// `EngineOptions::lease_renewal`, forever; never returns for other instances (their agents
/// hold no lease). A renewal that fails is simply tried again at the next period: following
/// the agent is what notices an unreachable one.
async fn keep_lease(inner: &Inner, instance: &Instance) {
    if !inner
        .backend(&instance.backend)
        .is_some_and(|b| b.creates_instances())
    {
        return std::future::pending().await;
    }
    loop {
        if let Ok(client) = inner.agent(&instance.id).await {
            let _ = client.renew_lease().await;
        }
        tokio::time::sleep(inner.options.lease_renewal).await;
    }
}

/// Follows one instance's agent forever.
async fn follow_forever(inner: &Arc<Inner>, instance: &Instance) {
    let deadline = inner.options.unreachable_after;
    // Since when the agent could not be followed, and why (the last failure).
    let mut unreachable: Option<(tokio::time::Instant, AgentError)> = None;
    let mut given_up = false;
    let mut backoff = Duration::from_millis(50);
    loop {
        let connected = AtomicBool::new(false);
        let result = {
            let attempt = follow(inner, instance, &connected);
            tokio::pin!(attempt);
            match unreachable.as_ref().filter(|_| !given_up) {
                // Given up on at the deadline even while an attempt to reach it still waits
                // for an answer (a hung agent, a host that drops packets).
                Some((since, why)) => tokio::select! {
                    result = &mut attempt => result,
                    () = tokio::time::sleep_until(*since + deadline) => {
                        if !connected.load(Ordering::SeqCst) {
                            given_up = true;
                            give_up(inner, &instance.id, *since, why).await;
                        }
                        attempt.await
                    }
                },
                None => attempt.await,
            }
        };
        if connected.load(Ordering::SeqCst) {
            unreachable = None;
            given_up = false;
            backoff = Duration::from_millis(50);
        }
        match result {
            // The stream ended (the agent restarted): reconnect soon, but never in a hot loop.
            Ok(Ended::Closed) => tokio::time::sleep(backoff).await,
            Ok(Ended::Unrecorded) => tokio::time::sleep(AFTER_STORE_ERROR).await,
            Err(e) => {
                let since = unreachable
                    .as_ref()
                    .map_or_else(tokio::time::Instant::now, |u| u.0);
                if since.elapsed() >= deadline && !given_up {
                    given_up = true;
                    give_up(inner, &instance.id, since, &e).await;
                }
                unreachable = Some((since, e));
                // Revive only a while later, so that retries of the failed jobs go elsewhere.
                if given_up && since.elapsed() >= deadline * 2 {
                    let _ = revive(inner, &instance.id).await;
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

/// Marks the instance unreachable since `since` and fails its jobs (`why`: the last failure
/// to reach it).
async fn give_up(
    inner: &Arc<Inner>,
    instance_id: &str,
    since: tokio::time::Instant,
    why: &AgentError,
) {
    let elapsed = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX);
    set_unreachable(inner, instance_id, Some(now_ms().saturating_sub(elapsed)));
    jobs::fail_unreachable(inner, instance_id, why).await;
}

/// Records whether the instance's agent can be reached: since when it cannot (`Some`, Unix
/// ms), or that it can (`None`).
fn set_unreachable(inner: &Inner, instance_id: &str, since_ms: Option<u64>) {
    let unreachable = since_ms.is_some();
    if let Ok(Some(mut instance)) = inner.store.instance(instance_id) {
        if instance.unreachable != unreachable {
            instance.unreachable = unreachable;
            instance.unreachable_since_ms = since_ms;
            let _ = inner.store.put_instance(&instance);
            if !unreachable {
                inner.wake_scheduler();
            }
        }
    }
}

/// Redeploys the agent of an instance whose jobs were given up, or of another build
/// (backends that cannot deploy restart their agents in `connect`); returns whether it was
/// deployed and recorded.
async fn revive(inner: &Inner, instance_id: &str) -> bool {
    let Ok(Some(instance)) = inner.store.instance(instance_id) else {
        return false;
    };
    let Some(backend) = inner.backend(&instance.backend) else {
        return false;
    };
    let Ok(deployed) = backend.deploy(&instance).await else {
        return false;
    };
    // Read again: the instance may have been terminated meanwhile (as lost).
    let Ok(Some(mut revived)) = inner.store.instance(instance_id) else {
        return false;
    };
    if revived.status == crate::model::InstanceStatus::Terminated {
        return false;
    }
    revived.host = deployed.host;
    revived.backend_data = deployed.backend_data;
    inner.store.put_instance(&revived).is_ok()
}

/// Deploys the agent again when the one answering is of another build than its backend
/// installs (dstack-rs was upgraded) and runs no job (its jobs would be lost); returns whether
/// it did. A busy agent is kept until a later connection finds it idle.
async fn upgrade(
    inner: &Inner,
    instance: &Instance,
    client: &crate::agent::AgentClient,
) -> Result<bool, AgentError> {
    let Some(wanted) = inner
        .backend(&instance.backend)
        .and_then(|b| b.agent_build())
    else {
        return Ok(false);
    };
    if client.healthcheck().await?.build == wanted {
        return Ok(false);
    }
    if client.jobs().await?.iter().any(|j| !j.status.is_finished()) {
        return Ok(false);
    }
    // Not deployed (the old agent took a job meanwhile, the host failed): follow it as it is.
    Ok(revive(inner, &instance.id).await)
}

/// Why following an agent stopped, the agent not being at fault.
enum Ended {
    /// The agent closed its event stream (it restarted).
    Closed,
    /// The store failed to record what the agent reported: follow it anew, from its state.
    Unrecorded,
}

/// Connects (setting `connected` once the agent answers), reconciles with the agent's view,
/// and applies events until the stream ends or the store fails to record them; an error when
/// the agent could not be followed (it is unreachable, or hung).
async fn follow(
    inner: &Arc<Inner>,
    instance: &Instance,
    connected: &AtomicBool,
) -> Result<Ended, AgentError> {
    let client = inner
        .agent(&instance.id)
        .await
        .map_err(|e| AgentError::Unreachable {
            target: instance.name.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
    if upgrade(inner, instance, &client).await? {
        return Ok(Ended::Closed); // follow the new agent
    }
    let mut events = client.events().await?;
    connected.store(true, Ordering::SeqCst);
    set_unreachable(inner, &instance.id, None);
    let candidates = jobs::started_on(inner, &instance.id);
    let snapshot = client.jobs().await?;
    jobs::fail_unknown(inner, candidates, &snapshot).await;
    if jobs::on_agent_jobs(inner, snapshot).await.is_err() {
        return Ok(Ended::Unrecorded);
    }
    let mut ended = false;
    let mut hung = None;
    while !ended {
        let Some(first) = events.next().await else {
            break;
        };
        // While many tasks are queued there, the reports of a while are recorded together.
        let gather_until = inner
            .queues
            .gathers(&instance.id)
            .then(|| tokio::time::Instant::now() + queues::GATHER);
        // Everything the agent has reported meanwhile is recorded together (one store
        // transaction): the busier the engine, the more each transaction carries.
        let mut batch = Vec::new();
        let mut event = Some(first);
        while let Some(next) = event {
            match next {
                Ok(info) => batch.push(info),
                Err(AgentError::Decode(_)) => {} // a line from a newer agent: skip it
                Err(e) => {
                    // A stream that closed is an agent that restarted; a silent one is hung.
                    hung = silent(&e).then_some(e);
                    ended = true;
                    break;
                }
            }
            event = match gather_until {
                // The stream keeps what it has read of a line when the wait is cut short.
                Some(until) => tokio::time::timeout_at(until, events.next())
                    .await
                    .ok()
                    .flatten(),
                None => events.next().now_or_never().flatten(),
            };
        }
        if jobs::on_agent_jobs(inner, batch).await.is_err() {
            return Ok(Ended::Unrecorded);
        }
    }
    hung.map_or(Ok(Ended::Closed), Err)
}

/// Whether the agent's event stream ended because the agent stayed silent (no change, no
/// heartbeat) for `agent::EVENTS_SILENCE`.
fn silent(e: &AgentError) -> bool {
    matches!(e, AgentError::Unreachable { source, .. } if source.kind() == std::io::ErrorKind::TimedOut)
}
