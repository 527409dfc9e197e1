//! How long each job has gone without an SSH connection (a dev environment's
//! `inactivity_duration` is enforced from it by the server). As dstack's connection tracker
//! does, a connection counts only once it has lasted [`COUNTS_AFTER`]: short ones (probes,
//! `ssh <run> true`) are not activity.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::state::unix_ms;

/// How long a connection must last to count as activity.
pub(crate) const COUNTS_AFTER: Duration = Duration::from_secs(10);

/// The SSH connections of every job.
#[derive(Default)]
pub(crate) struct Activity {
    jobs: Mutex<HashMap<String, Connections>>,
}

/// One job's connections.
#[derive(Default)]
struct Connections {
    /// When each open connection opened, by a number of its own.
    open: HashMap<u64, Instant>,
    /// The next connection's number.
    next: u64,
    /// When the last connection that counted closed (Unix ms).
    last_end_ms: Option<u64>,
}

/// An open connection; closed when dropped.
pub(crate) struct Open {
    activity: Arc<Activity>,
    job: String,
    number: u64,
}

impl Drop for Open {
    fn drop(&mut self) {
        let mut jobs = self.activity.lock();
        if let Some(job) = jobs.get_mut(&self.job) {
            if let Some(opened) = job.open.remove(&self.number) {
                if opened.elapsed() >= COUNTS_AFTER {
                    job.last_end_ms = Some(unix_ms());
                }
            }
        }
    }
}

impl Activity {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Connections>> {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a connection to job `job` opening; it closes when the result is dropped.
    pub fn open(self: &Arc<Self>, job: &str) -> Open {
        let mut jobs = self.lock();
        let connections = jobs.entry(job.to_string()).or_default();
        let number = connections.next;
        connections.next += 1;
        connections.open.insert(number, Instant::now());
        Open {
            activity: self.clone(),
            job: job.to_string(),
            number,
        }
    }

    /// Seconds job `job` (running since `started_at_ms`) has gone without a connection that
    /// counts: 0 while one is open.
    pub fn idle_secs(&self, job: &str, started_at_ms: u64) -> u64 {
        let jobs = self.lock();
        let connections = jobs.get(job);
        let counting = connections.is_some_and(|c| {
            c.open
                .values()
                .any(|opened| opened.elapsed() >= COUNTS_AFTER)
        });
        if counting {
            return 0;
        }
        let since = connections
            .and_then(|c| c.last_end_ms)
            .unwrap_or(started_at_ms)
            .max(started_at_ms);
        unix_ms().saturating_sub(since) / 1000
    }

    /// Forgets the connections of jobs that are not `live`.
    pub fn retain(&self, live: impl Fn(&str) -> bool) {
        self.lock()
            .retain(|job, c| live(job) && !(c.open.is_empty() && c.last_end_ms.is_none()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_connections_are_no_activity() {
        let activity = Arc::new(Activity::default());
        let started = unix_ms() - 30_000;
        assert_eq!(activity.idle_secs("j", started), 30);
        let open = activity.open("j");
        // Just opened: it does not count yet, and closing it changes nothing.
        assert_eq!(activity.idle_secs("j", started), 30);
        drop(open);
        assert_eq!(activity.idle_secs("j", started), 30);
        assert_eq!(activity.idle_secs("other", unix_ms()), 0);
    }
}
