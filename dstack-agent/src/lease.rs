//! The owner lease of an agent on a cloud instance: the instance stops costing money once
//! nobody owns it any more.
//!
//! The engine that deployed the agent renews the lease (`POST /api/lease`) while it follows
//! the agent. When the agent has run no job for the instance's idle time *and* heard no
//! renewal for the lease window, it runs its shutdown action once (by default it powers the
//! host off; cloud instances are created so that powering off terminates them). A running or
//! queued job always keeps the host. [`decide`] is the rule, a pure function of the times;
//! [`Lease::keep`] carries it out.

use std::io;
use std::process::Stdio;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use dstack_core::agent::{LeaseStatus, LeaseTerms};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;

use crate::jobs::Jobs;

/// How long an owner lease lasts without a renewal unless configured otherwise.
pub const DEFAULT_LEASE_WINDOW: Duration = Duration::from_secs(600);

/// The default shutdown action (run with `sh -c`, through `sudo -n` unless the agent runs as
/// root): power the host off.
pub const POWER_OFF: &str = "shutdown -h now || systemctl poweroff";

/// How long the shutdown action may take before it is killed (and tried again a lease
/// window later).
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(120);

/// An agent's owner lease (see the module).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    /// How long the host may run no job before it is shut down, once the lease has lapsed
    /// (the instance's `idle_duration`).
    pub idle: Duration,
    /// How long the lease lasts without a renewal ([`DEFAULT_LEASE_WINDOW`] by default).
    pub window: Duration,
    /// The shutdown action, a command run with `sh -c` as the agent's user; `None`:
    /// [`POWER_OFF`].
    pub shutdown_command: Option<String>,
}

impl LeaseConfig {
    /// A lease for a host that may idle for `idle`, lasting [`DEFAULT_LEASE_WINDOW`] and
    /// powering the host off when it lapses.
    pub fn new(idle: Duration) -> Self {
        LeaseConfig {
            idle,
            window: DEFAULT_LEASE_WINDOW,
            shutdown_command: None,
        }
    }

    /// The program and arguments of the shutdown action.
    fn shutdown_argv(&self) -> Vec<String> {
        let shell = |command: &str| vec!["/bin/sh".to_string(), "-c".into(), command.into()];
        match &self.shutdown_command {
            Some(command) => shell(command),
            None if nix::unistd::geteuid().is_root() => shell(POWER_OFF),
            None => ["sudo".to_string(), "-n".to_string()]
                .into_iter()
                .chain(shell(POWER_OFF))
                .collect(),
        }
    }

    fn terms(&self) -> LeaseTerms {
        LeaseTerms {
            idle_secs: self.idle.as_secs(),
            window_secs: self.window.as_secs(),
        }
    }
}

/// What the lease rule decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Keep the host, and look again at `recheck`: nothing but the passing of time can make
    /// the verdict `Shut` before (jobs and renewals only put it off).
    Keep {
        /// When to decide again.
        recheck: Instant,
    },
    /// Shut the host down.
    Shut {
        /// How long the host has run no job.
        idle_for: Duration,
        /// How long the lease has gone without a renewal.
        unrenewed_for: Duration,
    },
}

/// The lease rule at `now`: shut the host down when no job is running or queued (`busy`),
/// none has run since `idle_since` for at least `idle`, and no renewal has come since
/// `renewed_at` for at least `window`. A busy host is looked at again a window later: the
/// end of its jobs moves `idle_since`, so the host is never shut down earlier than the rule
/// says, nor later than a window after.
pub(crate) fn decide(
    busy: bool,
    idle_since: Instant,
    renewed_at: Instant,
    now: Instant,
    idle: Duration,
    window: Duration,
) -> Verdict {
    if busy {
        return Verdict::Keep {
            recheck: now + window,
        };
    }
    let deadline = (idle_since + idle).max(renewed_at + window);
    if now < deadline {
        return Verdict::Keep { recheck: deadline };
    }
    Verdict::Shut {
        idle_for: now.saturating_duration_since(idle_since),
        unrenewed_for: now.saturating_duration_since(renewed_at),
    }
}

/// When things last happened, as the rule needs them.
struct Clock {
    /// The last change of a job (or the agent's start).
    idle_since: Instant,
    /// The last renewal (or the agent's start: its owner just started it).
    renewed_at: Instant,
    renewals: u64,
    shut_down: bool,
}

/// An agent's lease: its settings and what happened (see the module).
pub(crate) struct Lease {
    config: LeaseConfig,
    clock: Mutex<Clock>,
}

impl Lease {
    /// A lease taken now.
    pub fn new(config: LeaseConfig) -> Self {
        let now = Instant::now();
        Lease {
            config,
            clock: Mutex::new(Clock {
                idle_since: now,
                renewed_at: now,
                renewals: 0,
                shut_down: false,
            }),
        }
    }

    fn clock(&self) -> MutexGuard<'_, Clock> {
        self.clock.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Renews the lease; returns its status.
    pub fn renew(&self) -> LeaseStatus {
        let mut clock = self.clock();
        clock.renewed_at = Instant::now();
        clock.renewals += 1;
        drop(clock);
        self.status()
    }

    /// The lease's status.
    pub fn status(&self) -> LeaseStatus {
        let clock = self.clock();
        LeaseStatus {
            terms: Some(self.config.terms()),
            renewals: clock.renewals,
            shut_down: clock.shut_down,
        }
    }

    /// Carries out the rule for as long as the agent serves: follows the jobs' changes, and
    /// runs the shutdown action once [`decide`] says so. A shutdown action that fails is tried
    /// again a lease window later; once one has succeeded, this returns.
    pub async fn keep(&self, jobs: &Jobs) {
        let mut changes = jobs.subscribe();
        let mut recheck = Instant::now();
        loop {
            tokio::select! {
                change = changes.recv() => match change {
                    // A job started, ended or changed (or so many did that some were missed).
                    Ok(_) | Err(RecvError::Lagged(_)) => self.clock().idle_since = Instant::now(),
                    Err(RecvError::Closed) => return std::future::pending().await,
                },
                () = tokio::time::sleep_until(recheck) => {
                    let now = Instant::now();
                    let verdict = {
                        let clock = self.clock();
                        decide(
                            jobs.busy(),
                            clock.idle_since,
                            clock.renewed_at,
                            now,
                            self.config.idle,
                            self.config.window,
                        )
                    };
                    match verdict {
                        Verdict::Keep { recheck: next } => recheck = next,
                        Verdict::Shut { idle_for, unrenewed_for } => {
                            eprintln!(
                                "dstack-agent: no job for {}s and no lease renewal for {}s \
                                 (idle time {}s, lease window {}s): nobody owns this host any \
                                 more; running the shutdown action",
                                idle_for.as_secs(),
                                unrenewed_for.as_secs(),
                                self.config.idle.as_secs(),
                                self.config.window.as_secs(),
                            );
                            match self.shut_down().await {
                                Ok(()) => {
                                    self.clock().shut_down = true;
                                    eprintln!("dstack-agent: the shutdown action succeeded");
                                    return;
                                }
                                Err(e) => {
                                    eprintln!(
                                        "dstack-agent: the shutdown action failed: {e}; trying \
                                         again in {}s",
                                        self.config.window.as_secs()
                                    );
                                    recheck = now + self.config.window;
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Runs the shutdown action, its output going to the agent's log.
    async fn shut_down(&self) -> io::Result<()> {
        let argv = self.config.shutdown_argv();
        let child = tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(SHUTDOWN_TIMEOUT, child)
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{argv:?} took longer than {}s", SHUTDOWN_TIMEOUT.as_secs()),
                )
            })??;
        let said =
            String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
        if !said.trim().is_empty() {
            eprintln!("dstack-agent: {argv:?} said: {}", said.trim());
        }
        if output.status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "{argv:?} exited with {}",
                output.status
            )))
        }
    }
}

/// The status of an agent without a lease.
pub(crate) fn no_lease() -> LeaseStatus {
    LeaseStatus {
        terms: None,
        renewals: 0,
        shut_down: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(300);
    const WINDOW: Duration = Duration::from_secs(600);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn an_idle_host_whose_lease_lapsed_is_shut_down() {
        let t0 = Instant::now();
        let now = t0 + secs(900);
        assert_eq!(
            decide(false, t0, t0, now, IDLE, WINDOW),
            Verdict::Shut {
                idle_for: secs(900),
                unrenewed_for: secs(900)
            }
        );
        // Exactly at the deadline counts.
        assert!(matches!(
            decide(false, t0, t0, t0 + WINDOW, IDLE, WINDOW),
            Verdict::Shut { .. }
        ));
    }

    #[test]
    fn a_renewed_lease_keeps_an_idle_host_until_a_window_after_the_renewal() {
        let t0 = Instant::now();
        let renewed = t0 + secs(1000);
        let now = t0 + secs(1200);
        assert_eq!(
            decide(false, t0, renewed, now, IDLE, WINDOW),
            Verdict::Keep {
                recheck: renewed + WINDOW
            }
        );
    }

    #[test]
    fn a_lapsed_lease_keeps_a_host_until_its_idle_time_has_passed() {
        let t0 = Instant::now();
        let job_end = t0 + secs(700);
        let now = t0 + secs(800);
        assert_eq!(
            decide(false, job_end, t0, now, IDLE, WINDOW),
            Verdict::Keep {
                recheck: job_end + IDLE
            }
        );
        assert!(matches!(
            decide(false, job_end, t0, job_end + IDLE, IDLE, WINDOW),
            Verdict::Shut { .. }
        ));
    }

    #[test]
    fn a_running_or_queued_job_always_keeps_the_host() {
        let t0 = Instant::now();
        let now = t0 + secs(100_000);
        assert_eq!(
            decide(true, t0, t0, now, IDLE, WINDOW),
            Verdict::Keep {
                recheck: now + WINDOW
            }
        );
    }

    #[test]
    fn with_no_idle_time_the_lease_alone_decides() {
        let t0 = Instant::now();
        assert_eq!(
            decide(false, t0, t0, t0 + secs(599), Duration::ZERO, WINDOW),
            Verdict::Keep {
                recheck: t0 + WINDOW
            }
        );
        assert!(matches!(
            decide(false, t0, t0, t0 + WINDOW, Duration::ZERO, WINDOW),
            Verdict::Shut { .. }
        ));
    }

    #[test]
    fn the_shutdown_action_is_the_configured_command_or_a_power_off() {
        let mut config = LeaseConfig::new(IDLE);
        assert_eq!(config.window, DEFAULT_LEASE_WINDOW);
        let argv = config.shutdown_argv();
        assert_eq!(argv[argv.len() - 3..], ["/bin/sh", "-c", POWER_OFF]);
        let root = nix::unistd::geteuid().is_root();
        assert_eq!(argv[0] == "sudo", !root, "{argv:?}");
        config.shutdown_command = Some("touch /tmp/x".into());
        assert_eq!(config.shutdown_argv(), ["/bin/sh", "-c", "touch /tmp/x"]);
    }
}
