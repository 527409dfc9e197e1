//! How deep the agents' queues are kept (see `scheduler`: tasks queued on an instance's agent
//! behind a running task, which the agent starts one after the other).
//!
//! A queue should hold about `EngineOptions::queue_cover` of work, judged by how long tasks
//! have lately run on its instance: long tasks are queued [`MIN_DEPTH`] deep (placing the
//! next one is in no hurry, and a task queued on one host is a task that cannot go to
//! another), a sweep of short ones up to [`MAX_DEPTH`] deep, refilled once half of it has
//! started, several tasks in one placement pass and one request to the agent. While many tasks are queued on an
//! instance, its agent's reports are gathered for [`GATHER`] and recorded together: the
//! queues cover that time many times over, and one store transaction then records several
//! tasks' ends and starts instead of one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// The fewest tasks a queue is filled up to.
pub(crate) const MIN_DEPTH: usize = 2;

/// The most tasks queued behind one running task.
pub(crate) const MAX_DEPTH: usize = 32;

/// The weight of the latest task's run time in an instance's moving average.
const WEIGHT: f64 = 0.2;

/// How many tasks queued on an instance make its agent's reports worth gathering.
const GATHER_FROM: usize = 8;

/// How long reports are gathered before they are recorded (see the module's documentation).
pub(crate) const GATHER: Duration = Duration::from_millis(2);

/// What the engine knows of each instance's queues.
#[derive(Default)]
pub(crate) struct Queues {
    instances: Mutex<HashMap<String, InstanceQueues>>,
}

/// What the engine knows of one instance's queues.
#[derive(Default)]
struct InstanceQueues {
    /// The moving average of the run time of tasks that ended there (ms), once one has.
    task_ms: Option<f64>,
    /// The tasks queued there: as the last placement pass left them, less those started since.
    queued: usize,
}

impl Queues {
    fn with<T>(&self, instance_id: &str, f: impl FnOnce(&mut InstanceQueues) -> T) -> T {
        let mut instances = self.instances.lock().unwrap_or_else(|e| e.into_inner());
        f(instances.entry(instance_id.to_string()).or_default())
    }

    /// Records that a task that ran `ms` milliseconds ended on the instance.
    pub fn task_ended(&self, instance_id: &str, ms: u64) {
        self.with(instance_id, |q| {
            let ms = ms as f64;
            q.task_ms = Some(q.task_ms.map_or(ms, |avg| avg + WEIGHT * (ms - avg)));
        });
    }

    /// How deep the instance's queues are filled for them to hold `cover` of work.
    pub fn depth(&self, instance_id: &str, cover: Duration) -> usize {
        self.with(instance_id, |q| depth_for(q.task_ms, cover))
    }

    /// Records how many tasks a placement pass left queued on each instance (those not named
    /// have none).
    pub fn set_queued(&self, queued: &HashMap<String, usize>) {
        let mut instances = self.instances.lock().unwrap_or_else(|e| e.into_inner());
        for (id, q) in instances.iter_mut() {
            q.queued = queued.get(id).copied().unwrap_or(0);
        }
        for (id, n) in queued {
            instances.entry(id.clone()).or_default().queued = *n;
        }
    }

    /// Records that a task queued on the instance has started.
    pub fn queued_started(&self, instance_id: &str) {
        self.with(instance_id, |q| q.queued = q.queued.saturating_sub(1));
    }

    /// Whether the reports of the instance's agent are gathered before they are recorded.
    pub fn gathers(&self, instance_id: &str) -> bool {
        self.with(instance_id, |q| q.queued >= GATHER_FROM)
    }
}

/// The depth a queue is filled up to for it to hold `cover` of work, given the recent task
/// run time (ms), if known.
fn depth_for(task_ms: Option<f64>, cover: Duration) -> usize {
    match task_ms {
        None => MIN_DEPTH,
        // At least 0.5 ms: a run time recorded in whole milliseconds is often 0.
        Some(ms) => {
            let tasks = (cover.as_secs_f64() * 1e3 / ms.max(0.5)).round();
            (tasks as usize).clamp(MIN_DEPTH, MAX_DEPTH)
        }
    }
}

/// A queue filled up to `depth` is refilled once fewer than this many tasks wait in it.
pub(crate) fn refill_below(depth: usize) -> usize {
    (depth / 2).max(MIN_DEPTH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_are_as_deep_as_the_tasks_are_short() {
        let queues = Queues::default();
        let cover = Duration::from_millis(16);
        let depth = |id| queues.depth(id, cover);
        assert_eq!(depth("i-1"), MIN_DEPTH, "nothing known yet");
        queues.task_ended("i-1", 0);
        assert_eq!(depth("i-1"), MAX_DEPTH);
        for _ in 0..50 {
            queues.task_ended("i-1", 4);
        }
        assert_eq!(depth("i-1"), 4);
        assert_eq!(queues.depth("i-1", cover * 2), 8);
        for _ in 0..50 {
            queues.task_ended("i-1", 60_000);
        }
        assert_eq!(depth("i-1"), MIN_DEPTH);
        assert_eq!(depth("i-2"), MIN_DEPTH, "per instance");
    }

    #[test]
    fn two_deep_queues_are_refilled_as_each_task_starts() {
        assert_eq!(refill_below(MIN_DEPTH), MIN_DEPTH);
        assert_eq!(refill_below(MAX_DEPTH), MAX_DEPTH / 2);
    }

    #[test]
    fn reports_are_gathered_only_while_many_tasks_are_queued() {
        let queues = Queues::default();
        assert!(!queues.gathers("i-1"));
        queues.set_queued(&HashMap::from([("i-1".to_string(), GATHER_FROM)]));
        assert!(queues.gathers("i-1"));
        queues.queued_started("i-1");
        assert!(!queues.gathers("i-1"), "one started since");
        queues.set_queued(&HashMap::from([("i-1".to_string(), GATHER_FROM + 1)]));
        queues.set_queued(&HashMap::new());
        assert!(
            !queues.gathers("i-1"),
            "a pass that found none queued there"
        );
    }
}
