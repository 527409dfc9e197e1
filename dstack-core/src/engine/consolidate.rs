//! Backend fleets kept at their `nodes.min`, as dstack's fleet pipeline "consolidates" them
//! (`background/pipeline_tasks/fleets.py`: `_maintain_fleet_nodes_in_min_max_range`,
//! `_CONSOLIDATION_RETRY_DELAYS`, `_MAX_CONSOLIDATION_ATTEMPTS`): on every sweep an active
//! backend fleet with fewer live (not terminated) instances than `nodes.min` gets the missing
//! ones through the provisioning path runs use. Attempts in a row are spaced by
//! `EngineOptions::fleet_retry_delays` (dstack's 1, 2, 5, 10, 30 minutes, the last
//! repeating) and counted in the fleet's record ([`crate::model::Consolidation`]), so a
//! restarted server goes on where it was; the count is forgotten once the fleet has its
//! `nodes.min` running, or when it is applied again.
//!
//! How long a fleet keeps trying is its `retry` (dstack ≥ 0.19.27 accepts a fleet's `retry`
//! and no longer reads it; before, `retry` with `no-capacity` kept a fleet's instances waiting
//! for capacity until `retry.duration`, and without it an instance that found no capacity was
//! terminated). Here: without `retry` (or `retry: false`), at most dstack's 15 attempts, and
//! a fleet whose apply got none of its instances fails there and then; with `retry` (`true`,
//! or `{duration}`, whose `on_events` may list only `no-capacity`: the parser refuses the
//! rest), the fleet applied without capacity stays active and waits, and attempts go on until
//! `retry.duration` (default 1 h) has passed since it fell short, however many that takes.
//!
//! Instances are lost when the engine terminates them: idle reaping never goes below
//! `nodes.min`; a cloud instance whose agent stays unreachable past
//! `EngineOptions::termination_deadline` (dstack's 20 minutes; the cloud terminated it, a spot
//! interruption, a dead host) is terminated by [`Inner::terminate_lost`]; failed provisioning
//! ends terminated.

use std::sync::Arc;
use std::time::Duration;

use super::{fleets::Progress, EngineError, Inner};
use crate::config::profile::Retry;
use crate::model::{now_ms, Consolidation, Fleet, FleetStatus, Instance, InstanceStatus};

/// How many attempts in a row a fleet without `retry` makes (dstack's
/// `_MAX_CONSOLIDATION_ATTEMPTS`).
pub const MAX_ATTEMPTS: u32 = 15;

/// For how long a fleet with `retry` and no `retry.duration` keeps trying (dstack's default
/// retry duration).
const DEFAULT_RETRY_SECS: u64 = 3600;

/// How long a fleet keeps trying to get back to its `nodes.min`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Bound {
    /// At most this many attempts in a row (no `retry`).
    Attempts(u32),
    /// Until this many seconds have passed since it fell short (`retry`).
    For(u64),
}

impl Bound {
    /// Whether the fleet waits for capacity rather than failing when its apply gets none of
    /// its instances.
    pub(crate) fn waits(self) -> bool {
        matches!(self, Bound::For(_))
    }
}

/// The bound a fleet's `retry` sets (the parser has refused negative durations and events
/// other than `no-capacity`).
pub(crate) fn bound(retry: Option<&Retry>) -> Bound {
    match retry {
        None | Some(Retry::Enabled(false)) => Bound::Attempts(MAX_ATTEMPTS),
        Some(Retry::Enabled(true)) => Bound::For(DEFAULT_RETRY_SECS),
        Some(Retry::Policy { duration, .. }) => {
            Bound::For(duration.map_or(DEFAULT_RETRY_SECS, |d| u64::try_from(d.0).unwrap_or(0)))
        }
    }
}

/// What the sweep does for a backend fleet now.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// It has its `nodes.min` running: earlier attempts are forgotten.
    Consolidated,
    /// Enough instances are live, some still being provisioned: wait for them.
    Starting,
    /// Provision this many instances now.
    Provision(usize),
    /// The next attempt is due then (Unix ms).
    WaitUntil(u64),
    /// No more attempts, and why.
    GiveUp(String),
}

/// The step for a fleet of `min` nodes whose instances are in `statuses`, after the
/// attempts in `state`, at `now` (Unix ms). A first attempt is made at once; attempt `n + 1`
/// waits `delays[n - 1]` (the last delay repeating) after attempt `n` started.
pub(crate) fn decide(
    min: u64,
    statuses: &[InstanceStatus],
    state: Option<&Consolidation>,
    bound: Bound,
    delays: &[Duration],
    now: u64,
) -> Step {
    let running = statuses
        .iter()
        .filter(|s| matches!(s, InstanceStatus::Idle | InstanceStatus::Busy))
        .count() as u64;
    let live = statuses
        .iter()
        .filter(|s| **s != InstanceStatus::Terminated)
        .count() as u64;
    if running >= min {
        return Step::Consolidated;
    }
    if live >= min {
        return Step::Starting;
    }
    let missing = usize::try_from(min - live).unwrap_or(usize::MAX);
    let Some(state) = state else {
        return Step::Provision(missing);
    };
    let short = format!("{live} of its {min} instances live");
    match bound {
        Bound::Attempts(max) if state.attempts >= max => {
            return Step::GiveUp(format!(
                "restoring nodes.min stopped after {} attempts ({short}); apply the fleet \
                 again to resume, or set `retry` to keep trying for a while",
                state.attempts
            ));
        }
        Bound::For(secs) if now.saturating_sub(state.short_since_ms) >= secs * 1000 => {
            return Step::GiveUp(format!(
                "restoring nodes.min stopped: retry.duration ({secs}s) passed since the fleet \
                 fell short ({short}, {} attempts); apply the fleet again to resume",
                state.attempts
            ));
        }
        _ => {}
    }
    let index = usize::try_from(state.attempts.saturating_sub(1)).unwrap_or(usize::MAX);
    let delay = delays
        .get(index)
        .or(delays.last())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let due = state.last_attempt_at_ms.saturating_add(delay);
    if now < due {
        Step::WaitUntil(due)
    } else {
        Step::Provision(missing)
    }
}

/// The attempts after one more started at `now`.
pub(crate) fn attempted(state: Option<&Consolidation>, now: u64) -> Consolidation {
    Consolidation {
        attempts: state.map_or(0, |s| s.attempts).saturating_add(1),
        last_attempt_at_ms: now,
        short_since_ms: state.map_or(now, |s| s.short_since_ms),
        stopped: false,
    }
}

/// Whether a cloud instance is lost: live, and its agent unreachable for `deadline` or more.
pub(crate) fn lost(instance: &Instance, now: u64, deadline: Duration) -> bool {
    let deadline = u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX);
    matches!(instance.status, InstanceStatus::Idle | InstanceStatus::Busy)
        && instance.unreachable
        && instance
            .unreachable_since_ms
            .is_some_and(|since| now.saturating_sub(since) >= deadline)
}

impl Inner {
    /// Terminates cloud instances whose agents have been unreachable for
    /// `EngineOptions::termination_deadline` (their jobs were failed when the agent was given
    /// up on). SSH hosts and this machine are never terminated for it.
    pub(crate) async fn terminate_lost(self: &Arc<Self>) -> Result<(), EngineError> {
        let deadline = self.options.termination_deadline;
        let now = now_ms();
        for instance in self.store.instances()? {
            let cloud = self
                .backend(&instance.backend)
                .is_some_and(|b| b.creates_instances());
            if cloud && lost(&instance, now, deadline) {
                let why = format!(
                    "unreachable: its agent could not be reached for {}s (the termination \
                     deadline): the instance is taken as lost",
                    deadline.as_secs()
                );
                self.terminate(instance, &why).await?;
            }
        }
        Ok(())
    }

    /// Brings every active backend fleet back to its `nodes.min` (see the module docs):
    /// records each attempt in the fleet before its instances are provisioned in the
    /// background, forgets the attempts once the fleet has its minimum running, and says in
    /// the fleet's status message why it stopped trying.
    pub(crate) async fn consolidate_fleets(self: &Arc<Self>) -> Result<(), EngineError> {
        let instances = self.store.instances()?;
        let now = now_ms();
        for mut fleet in self.store.fleets()? {
            if fleet.status != FleetStatus::Active {
                continue;
            }
            let Some(config) = super::provision::backend_fleet(&fleet) else {
                continue;
            };
            let min = u64::try_from(config.nodes.map_or(0, |n| n.min)).unwrap_or(0);
            let own: Vec<&Instance> = instances
                .iter()
                .filter(|i| i.fleet_id == fleet.id)
                .collect();
            let statuses: Vec<InstanceStatus> = own.iter().map(|i| i.status).collect();
            let step = decide(
                min,
                &statuses,
                fleet.consolidation.as_ref(),
                bound(config.profile.retry.as_ref()),
                &self.options.fleet_retry_delays,
                now,
            );
            match step {
                Step::Starting | Step::WaitUntil(_) => {}
                Step::Consolidated => {
                    if fleet.consolidation.is_some() || fleet.status_message.is_some() {
                        fleet.consolidation = None;
                        fleet.status_message = None;
                        self.store.put_fleet(&fleet)?;
                    }
                }
                Step::GiveUp(why) => {
                    let why = match last_failure(&own) {
                        Some(last) => format!("{why}; last: {last}"),
                        None => why,
                    };
                    let stopped = fleet.consolidation.as_ref().is_some_and(|c| c.stopped);
                    if !stopped || fleet.status_message.as_deref() != Some(why.as_str()) {
                        if let Some(state) = &mut fleet.consolidation {
                            state.stopped = true;
                        }
                        fleet.status_message = Some(why);
                        self.store.put_fleet(&fleet)?;
                    }
                }
                Step::Provision(missing) => {
                    fleet.consolidation = Some(attempted(fleet.consolidation.as_ref(), now));
                    fleet.status_message = None;
                    self.store.put_fleet(&fleet)?;
                    self.restore(&fleet, &config, missing).await?;
                }
            }
        }
        Ok(())
    }

    /// Provisions `missing` instances of `fleet` in the background (their records written
    /// first, so the next sweep counts them), or says in the fleet why there is nothing to
    /// provision from.
    async fn restore(
        self: &Arc<Self>,
        fleet: &Fleet,
        config: &crate::config::fleet::FleetConfiguration,
        missing: usize,
    ) -> Result<(), EngineError> {
        let (offers, errors) = self.fleet_offers(config).await;
        if offers.is_empty() {
            let mut fleet = fleet.clone();
            fleet.status_message = Some(super::provision::no_offers(&errors));
            self.store.put_fleet(&fleet)?;
            return Ok(());
        }
        for _ in 0..missing {
            let instance = self.fleet_placeholder(fleet, config)?;
            let (inner, offers, config) = (self.clone(), offers.clone(), config.clone());
            self.runtime.spawn(async move {
                let quiet: Progress<'_> = &|_, _| {};
                inner.provision(instance, offers, &config, quiet).await;
            });
        }
        Ok(())
    }
}

/// Why the fleet's most recently created terminated instance ended, if one did.
fn last_failure(instances: &[&Instance]) -> Option<String> {
    instances
        .iter()
        .filter(|i| i.status == InstanceStatus::Terminated)
        .max_by_key(|i| i.created_at_ms)
        .and_then(|i| i.status_message.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::duration::Duration as ConfigDuration;
    use crate::config::profile::RetryEvent;
    use InstanceStatus::{Busy, Idle, Pending, Provisioning, Terminated};

    const DELAYS: [Duration; 2] = [Duration::from_secs(60), Duration::from_secs(120)];

    fn state(attempts: u32, last: u64, since: u64) -> Consolidation {
        Consolidation {
            attempts,
            last_attempt_at_ms: last,
            short_since_ms: since,
            stopped: false,
        }
    }

    fn step(statuses: &[InstanceStatus], s: Option<&Consolidation>, b: Bound, now: u64) -> Step {
        decide(2, statuses, s, b, &DELAYS, now)
    }

    #[test]
    fn a_fleet_with_its_minimum_running_is_consolidated_and_one_starting_waits() {
        let fifteen = Bound::Attempts(MAX_ATTEMPTS);
        let tried = state(3, 0, 0);
        assert_eq!(
            step(&[Idle, Busy, Terminated], Some(&tried), fifteen, 0),
            Step::Consolidated
        );
        assert_eq!(
            step(&[Idle, Provisioning, Terminated], Some(&tried), fifteen, 0),
            Step::Starting
        );
        assert_eq!(step(&[Pending, Pending], None, fifteen, 0), Step::Starting);
        assert_eq!(
            decide(0, &[], None, fifteen, &DELAYS, 0),
            Step::Consolidated
        );
    }

    #[test]
    fn a_lost_instance_is_replaced_at_once_and_later_attempts_back_off() {
        let fifteen = Bound::Attempts(MAX_ATTEMPTS);
        // Terminated instances do not count: the first attempt is made at once.
        assert_eq!(
            step(&[Idle, Terminated], None, fifteen, 5_000),
            Step::Provision(1)
        );
        assert_eq!(step(&[], None, fifteen, 5_000), Step::Provision(2));
        // After attempt 1 (at t=1000), the first delay; after attempt 2 the second, which
        // repeats from then on.
        let one = state(1, 1_000, 1_000);
        assert_eq!(
            step(&[Idle], Some(&one), fifteen, 60_999),
            Step::WaitUntil(61_000)
        );
        assert_eq!(
            step(&[Idle], Some(&one), fifteen, 61_000),
            Step::Provision(1)
        );
        let two = attempted(Some(&one), 61_000);
        assert_eq!(two, state(2, 61_000, 1_000));
        assert_eq!(
            step(&[Idle], Some(&two), fifteen, 61_001),
            Step::WaitUntil(181_000)
        );
        let five = state(5, 0, 0);
        assert_eq!(
            step(&[Idle], Some(&five), fifteen, 1),
            Step::WaitUntil(120_000)
        );
    }

    #[test]
    fn without_retry_attempts_stop_after_fifteen_and_with_it_after_its_duration() {
        let fifteen = Bound::Attempts(MAX_ATTEMPTS);
        let last = state(MAX_ATTEMPTS - 1, 0, 0);
        assert_eq!(
            step(&[], Some(&last), fifteen, 10_000_000),
            Step::Provision(2)
        );
        let Step::GiveUp(why) = step(&[], Some(&state(MAX_ATTEMPTS, 0, 0)), fifteen, 10_000_000)
        else {
            panic!("fifteen attempts are the most");
        };
        assert!(
            why.contains("after 15 attempts (0 of its 2 instances live)"),
            "{why}"
        );
        // With `retry`, the attempt count does not matter; the time since it fell short does.
        let hour = Bound::For(3600);
        let many = state(40, 3_000_000, 1_000);
        assert_eq!(
            step(&[Idle], Some(&many), hour, 3_600_999),
            Step::Provision(1)
        );
        let Step::GiveUp(why) = step(&[Idle], Some(&many), hour, 3_601_000) else {
            panic!("retry.duration passed");
        };
        assert!(why.contains("retry.duration (3600s)"), "{why}");
    }

    #[test]
    fn a_fleets_retry_sets_how_long_it_keeps_trying() {
        assert_eq!(bound(None), Bound::Attempts(MAX_ATTEMPTS));
        assert_eq!(
            bound(Some(&Retry::Enabled(false))),
            Bound::Attempts(MAX_ATTEMPTS)
        );
        assert_eq!(bound(Some(&Retry::Enabled(true))), Bound::For(3600));
        let policy = |d: Option<i64>| Retry::Policy {
            on_events: Some(vec![RetryEvent::NoCapacity]),
            duration: d.map(ConfigDuration),
        };
        assert_eq!(bound(Some(&policy(Some(120)))), Bound::For(120));
        assert_eq!(bound(Some(&policy(None))), Bound::For(3600));
        assert!(bound(Some(&policy(None))).waits());
        assert!(!bound(None).waits());
    }

    #[test]
    fn a_cloud_instance_is_lost_once_unreachable_past_the_deadline() {
        let mut instance: Instance = serde_json::from_value(serde_json::json!({
            "id": "i", "name": "f-0", "fleet_id": "f", "backend": "aws", "status": "idle",
            "host": {"cpus": 1, "memory_bytes": 0, "disk_bytes": 0, "cpu_arch": "x86_64", "gpus": []},
            "price": 0.0, "backend_data": {}, "created_at_ms": 0
        }))
        .unwrap();
        let deadline = Duration::from_secs(60);
        assert!(!lost(&instance, 1_000_000, deadline), "reachable");
        instance.unreachable = true;
        instance.unreachable_since_ms = Some(100_000);
        assert!(!lost(&instance, 159_999, deadline));
        assert!(lost(&instance, 160_000, deadline));
        instance.status = Terminated;
        assert!(!lost(&instance, 160_000, deadline), "already terminated");
    }
}
