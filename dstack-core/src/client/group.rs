//! A run group's status changes, pushed: what a sweep waits on and shows progress from.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures_core::Stream;
use futures_util::StreamExt;
use tokio::sync::broadcast::error::RecvError;

use super::remote::{Remote, ServerError};
use crate::engine::{Engine, EngineError, RunChange};
use crate::model::RunStatus;

/// The statuses of a group's runs: first each run's current status, then each change as it is
/// made, until every run of the group has finished (a status may come again: the latest is
/// the run's current one).
pub type GroupChanges = Pin<Box<dyn Stream<Item = Result<RunChange, EngineError>> + Send>>;

/// How long a watcher hears nothing before it reads the group's statuses again (for changes
/// made by another process, which this one's broadcast does not carry).
const REREAD: Duration = Duration::from_secs(2);

/// The changes of group `group_id`, followed in the engine hosted in this process.
pub(crate) fn watch(engine: Engine, group_id: String) -> GroupChanges {
    // Subscribed before the first read: no change made in between is missed.
    let changes = engine.subscribe();
    let state = Watch {
        engine,
        group_id,
        changes,
        known: HashMap::new(),
        unfinished: 0,
        pending: VecDeque::new(),
        read: false,
    };
    Box::pin(futures_util::stream::unfold(
        state,
        |mut state| async move {
            match state.next().await {
                Ok(Some(change)) => Some((Ok(change), state)),
                Ok(None) => None,
                Err(e) => {
                    // The stream ends after an error: nothing is left to wait for.
                    state.pending.clear();
                    state.read = true;
                    state.unfinished = 0;
                    Some((Err(e), state))
                }
            }
        },
    ))
}

struct Watch {
    engine: Engine,
    group_id: String,
    changes: tokio::sync::broadcast::Receiver<RunChange>,
    /// The last status sent of each run of the group.
    known: HashMap<String, RunStatus>,
    /// How many of `known` are unfinished.
    unfinished: usize,
    /// Changes to send.
    pending: VecDeque<RunChange>,
    /// Whether the group has been read once.
    read: bool,
}

impl Watch {
    async fn next(&mut self) -> Result<Option<RunChange>, EngineError> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                return Ok(Some(change));
            }
            if !self.read {
                self.read = true;
                self.reread()?;
                continue;
            }
            if self.unfinished == 0 {
                return Ok(None);
            }
            match tokio::time::timeout(REREAD, self.changes.recv()).await {
                Ok(Ok(change)) => self.note(change, false),
                Ok(Err(RecvError::Lagged(_))) | Err(_) => self.reread()?,
                Ok(Err(RecvError::Closed)) => return Ok(None),
            }
        }
    }

    /// Reads the group's statuses and queues those that differ from what was sent.
    fn reread(&mut self) -> Result<(), EngineError> {
        for (run_id, status) in self.engine.store().group_statuses(&self.group_id)? {
            self.note(RunChange { run_id, status }, true);
        }
        Ok(())
    }

    /// Queues `change` if it is news: a run of the group (`member`: known to be one, as read
    /// from the store; otherwise a broadcast change of any run) in a status not sent yet.
    fn note(&mut self, change: RunChange, member: bool) {
        let before = match self.known.get(&change.run_id) {
            Some(status) => Some(*status),
            None if member => None,
            None => return, // not one of the group's runs
        };
        if before == Some(change.status) {
            return;
        }
        let was_unfinished = before.is_some_and(|s| !s.is_finished());
        match (was_unfinished, !change.status.is_finished()) {
            (false, true) => self.unfinished += 1,
            (true, false) => self.unfinished -= 1,
            _ => {}
        }
        self.known.insert(change.run_id.clone(), change.status);
        self.pending.push_back(change);
    }
}

/// The changes of group `group_id` as a server streams them (`runs/watch_group`: one JSON
/// [`RunChange`] a line).
pub(crate) fn remote_watch(remote: Remote, group_id: String) -> GroupChanges {
    let request = super::protocol::GroupRef { group_id };
    let opened = async move { remote.stream("runs/watch_group", &request).await };
    Box::pin(
        futures_util::stream::once(opened).flat_map(|opened| match opened {
            Ok(bytes) => lines(bytes.map(|chunk| chunk.map_err(ServerError::from))).boxed(),
            Err(e) => futures_util::stream::once(async move { Err(e.into()) }).boxed(),
        }),
    )
}

/// The JSON values of an NDJSON byte stream.
fn lines(
    bytes: impl Stream<Item = Result<bytes::Bytes, ServerError>> + Send + 'static,
) -> impl Stream<Item = Result<RunChange, EngineError>> + Send {
    let bytes = Box::pin(bytes);
    futures_util::stream::unfold(
        (bytes, BytesMut::new(), false),
        |(mut bytes, mut buffer, mut ended)| async move {
            loop {
                if let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                    let line = buffer.split_to(end + 1);
                    let parsed = serde_json::from_slice::<RunChange>(&line[..end]).map_err(|e| {
                        EngineError::Invalid(format!("runs/watch_group: a bad line: {e}"))
                    });
                    return Some((parsed, (bytes, buffer, ended)));
                }
                if ended {
                    return None;
                }
                match bytes.next().await {
                    Some(Ok(chunk)) => buffer.extend_from_slice(chunk.chunk()),
                    Some(Err(e)) => {
                        ended = true;
                        buffer.clear();
                        return Some((Err(e.into()), (bytes, buffer, ended)));
                    }
                    None => ended = true,
                }
            }
        },
    )
}
