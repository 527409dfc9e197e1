//! The pooled connection to one host: at most one live SSH session, opened on first use and
//! again after it dropped.

use std::sync::Arc;

use tokio::sync::Mutex;

use super::known_hosts::KnownHosts;
use super::session::{Keepalive, SshError, SshSession, SshTarget};

/// One host's connection.
pub struct HostLink {
    target: SshTarget,
    known_hosts: KnownHosts,
    keepalive: Keepalive,
    current: Mutex<Option<Arc<SshSession>>>,
}

impl HostLink {
    /// A link to `target` (nothing is connected yet).
    pub fn new(target: SshTarget, known_hosts: KnownHosts, keepalive: Keepalive) -> Self {
        HostLink {
            target,
            known_hosts,
            keepalive,
            current: Mutex::new(None),
        }
    }

    /// The host.
    pub fn target(&self) -> &SshTarget {
        &self.target
    }

    /// The live session, connecting if there is none or it has closed.
    pub async fn session(&self) -> Result<Arc<SshSession>, SshError> {
        let mut current = self.current.lock().await;
        if let Some(session) = current.as_ref().filter(|s| !s.is_closed()) {
            return Ok(session.clone());
        }
        *current = None;
        let session =
            Arc::new(SshSession::connect(&self.target, &self.known_hosts, self.keepalive).await?);
        *current = Some(session.clone());
        Ok(session)
    }

    /// Drops the current session (the next use reconnects).
    pub async fn reset(&self) {
        *self.current.lock().await = None;
    }
}
