//! A run's output read from its jobs' agents, by an engine hosted in this process.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;

use super::protocol::LogQuery;
use super::LogStream;
use crate::agent::ByteStream;
use crate::engine::{Engine, EngineError, RunChange};

/// The output of run `id`'s job of `query`'s slot: what was written (since `query.since_ms`)
/// so far, and with `query.follow` everything it writes until the run finishes (across
/// retries).
pub(crate) fn stream(engine: Engine, id: String, query: LogQuery) -> LogStream {
    let changes = engine.subscribe();
    let state = LogState {
        engine,
        id,
        follow: query.follow,
        slot: (query.replica_num, query.job_num),
        since_ms: query.since_ms,
        streamed: Vec::new(),
        current: None,
        changes,
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

struct LogState {
    engine: Engine,
    id: String,
    follow: bool,
    /// The job's (replica, node).
    slot: (u32, u32),
    /// Only output written at this time (Unix ms) or later.
    since_ms: Option<u64>,
    /// Job submissions already streamed.
    streamed: Vec<String>,
    current: Option<ByteStream>,
    changes: tokio::sync::broadcast::Receiver<RunChange>,
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
            let store = self.engine.store();
            let run = store
                .run(&self.id)?
                .ok_or_else(|| EngineError::Invalid(format!("run {} no longer exists", self.id)))?;
            let jobs = store.jobs_of_run(&self.id)?;
            let next = jobs
                .iter()
                .filter(|j| {
                    j.slot() == self.slot
                        && j.instance_id.is_some()
                        && !self.streamed.contains(&j.id)
                })
                .filter(|j| j.started_at_ms.is_some() || j.status.is_finished())
                .max_by_key(|j| j.submission_num);
            if let Some(job) = next {
                self.streamed.push(job.id.clone());
                let instance = job.instance_id.clone().unwrap_or_default();
                let agent = self.engine.agent(&instance).await?;
                let follow = self.follow && !job.status.is_finished();
                let opened = match self.since_ms {
                    Some(since) => agent.logs_since(&job.id, since, follow).await,
                    None => agent.logs(&job.id, 0, follow).await,
                };
                match opened {
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
