//! Autoscaling without a gateway (dstack needs one): the proxy counts each service's
//! requests per second over the last five minutes, and once a second every service with
//! `scaling` gets the replica count dstack's RPS autoscaler wants
//! ([`dstack_core::engine::scaling::desired_replicas`]) over its `window`. A service scaled to
//! zero is woken by its next request, which the proxy holds until a replica is ready.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use dstack_core::engine::scaling::{
    desired_replicas, replica_count, to_retire, ScaleInput, DEFAULT_WINDOW_SECS,
};
use dstack_core::engine::Engine;

use super::registry::Service;

/// Seconds of request counts kept (dstack's longest window).
const HISTORY_SECS: usize = 300;

/// How often the autoscaler decides.
pub(crate) const PERIOD: Duration = Duration::from_secs(1);

/// Requests per second of one service over the last [`HISTORY_SECS`].
struct Counts {
    /// Requests in each second, by second modulo the history.
    per_second: Vec<u64>,
    /// The last second counted into `per_second`.
    last: u64,
}

impl Counts {
    fn new(now_s: u64) -> Self {
        Counts {
            per_second: vec![0; HISTORY_SECS],
            last: now_s,
        }
    }

    /// Moves to `now_s`, forgetting the seconds that fell out of the history.
    fn advance(&mut self, now_s: u64) {
        let gap = now_s.saturating_sub(self.last).min(HISTORY_SECS as u64);
        for s in 1..=gap {
            self.per_second[((self.last + s) % HISTORY_SECS as u64) as usize] = 0;
        }
        self.last = self.last.max(now_s);
    }

    fn add(&mut self, now_s: u64) {
        self.advance(now_s);
        self.per_second[(now_s % HISTORY_SECS as u64) as usize] += 1;
    }

    /// Requests per second over the last `window` seconds (the current one included).
    fn rate(&mut self, now_s: u64, window: u64) -> f64 {
        self.advance(now_s);
        let window = window.clamp(1, HISTORY_SECS as u64);
        let total: u64 = (0..window)
            .map(|back| {
                self.per_second
                    [((now_s + HISTORY_SECS as u64 - back) % HISTORY_SECS as u64) as usize]
            })
            .sum();
        total as f64 / window as f64
    }
}

/// The autoscaler's state: request counts and each service's last scaling event.
#[derive(Default)]
pub(crate) struct Scaler {
    counts: Mutex<HashMap<String, Counts>>,
    last_scaled_ms: Mutex<HashMap<String, u64>>,
}

impl Scaler {
    /// Counts a request to service run `run_id` at `now_ms`.
    pub fn record(&self, run_id: &str, now_ms: u64) {
        let now_s = now_ms / 1000;
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        match counts.get_mut(run_id) {
            Some(c) => c.add(now_s),
            None => counts
                .entry(run_id.to_string())
                .or_insert_with(|| Counts::new(now_s))
                .add(now_s),
        }
    }

    /// Records a scaling event of `run_id` at `now_ms`.
    pub fn scaled(&self, run_id: &str, now_ms: u64) {
        self.last_scaled_ms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(run_id.to_string(), now_ms);
    }

    /// Forgets the services that are gone.
    pub fn retain(&self, live: impl Fn(&str) -> bool) {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, _| live(id));
        self.last_scaled_ms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, _| live(id));
    }

    /// Scales `service` as its `scaling` wants at `now_ms` (nothing for services without it).
    pub async fn decide(&self, engine: &Engine, service: &Service, now_ms: u64) {
        let (Some(spec), Some(range)) = (&service.config.scaling, &service.config.replicas) else {
            return;
        };
        let Ok(jobs) = engine.store().jobs_of_run(&service.run_id) else {
            return;
        };
        let window = spec.window.map_or(DEFAULT_WINDOW_SECS, |w| {
            u64::try_from(w.0).unwrap_or(DEFAULT_WINDOW_SECS)
        });
        let rps = self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(service.run_id.clone())
            .or_insert_with(|| Counts::new(now_ms / 1000))
            .rate(now_ms / 1000, window);
        let since = self
            .last_scaled_ms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&service.run_id)
            .map(|at| now_ms.saturating_sub(*at));
        let count = |n: Option<i64>| u32::try_from(n.unwrap_or(0).max(0)).unwrap_or(0);
        let input = ScaleInput {
            min: count(range.min),
            max: count(range.max),
            current: replica_count(&jobs),
            rps: Some(rps),
            since_last_scaling_ms: since,
        };
        let desired = desired_replicas(spec, input);
        let result = if desired > input.current {
            engine.scale(&service.run_id, desired).await.map(drop)
        } else if desired < input.current {
            // Out of rotation first, then stopped: no request fails.
            let mut result = Ok(());
            for job in to_retire(&jobs, desired) {
                result = result.and(super::retire(engine, service, &job.id).await);
            }
            result
        } else {
            return;
        };
        match result {
            Ok(()) => self.scaled(&service.run_id, now_ms),
            Err(e) => eprintln!("dstack server: cannot scale {}: {e}", service.run_id),
        }
    }

    /// Wakes a service scaled to zero for a request: one replica, at once.
    pub async fn wake(&self, engine: &Engine, service: &Service, now_ms: u64) {
        let Ok(jobs) = engine.store().jobs_of_run(&service.run_id) else {
            return;
        };
        if replica_count(&jobs) == 0 && engine.scale(&service.run_id, 1).await.is_ok() {
            self.scaled(&service.run_id, now_ms);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_count_the_window_and_forget_old_seconds() {
        let mut counts = Counts::new(1000);
        for _ in 0..30 {
            counts.add(1000);
        }
        counts.add(1009);
        assert_eq!(counts.rate(1009, 10), 3.1);
        assert_eq!(counts.rate(1010, 10), 0.1, "second 1000 left the window");
        assert_eq!(counts.rate(1009 + 300, 300), 0.0);
        counts.add(2000);
        assert_eq!(counts.rate(2000, 1), 1.0);
    }
}
