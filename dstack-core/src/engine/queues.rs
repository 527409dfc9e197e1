//! How deep the agents' queues are kept (see `scheduler`: tasks queued on an instance's agent
//! behind a running task, which the agent starts one after the other).
//!
//! A queue should hold about `EngineOptions::queue_cover` of work, judged by how long tasks
//! of the same size (the resources set aside for them: a sweep's trials) have lately run on
//! its instance: long tasks, or tasks of a size not seen there yet, are queued [`MIN_DEPTH`] deep (placing the
//! next one is in no hurry, and a task queued on one host is a task that cannot go to
//! another), a sweep of short ones up to [`MAX_DEPTH`] deep, refilled once half of it has
//! started, several tasks in one placement pass and one request to the agent. While many tasks are queued on an
//! instance, its agent's reports are gathered for [`GATHER`] and recorded together: the
//! queues cover that time many times over, and one store transaction then records several
//! tasks' ends and starts instead of one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::model::Reservation;

/// The fewest tasks a queue is filled up to.
pub(crate) const MIN_DEPTH: usize = 2;

/// The most tasks queued behind one running task.
pub(crate) const MAX_DEPTH: usize = 32;

/// The weight of the latest task's run time in a moving average.
const WEIGHT: f64 = 0.2;

/// How many sizes' run times each instance keeps (the most recent ones).
const SIZES: usize = 8;

/// How many tasks queued on an instance make its agent's reports worth gathering.
const GATHER_FROM: usize = 8;

/// How long reports are gathered before they are recorded (see the module's documentation).
pub(crate) const GATHER: Duration = Duration::from_millis(2);

/// What the engine knows of each instance's queues.
#[derive(Default)]
pub(crate) struct Queues {
    instances: Mutex<HashMap<String, InstanceQueues>>,
}

/// The size of a task: the CPUs, memory and number of GPUs set aside for it.
type Size = (u32, u64, usize);

fn size(reservation: &Reservation) -> Size {
    (
        reservation.cpus,
        reservation.memory_mib,
        reservation.gpus.len(),
    )
}

/// What the engine knows of one instance's queues.
#[derive(Default)]
struct InstanceQueues {
    /// The moving average of the run time (ms) of the tasks of each size that ended there,
    /// the size seen last at the end.
    task_ms: Vec<(Size, f64)>,
    /// The tasks queued there: as the last placement pass left them, less those started since.
    queued: usize,
}

impl Queues {
    fn with<T>(&self, instance_id: &str, f: impl FnOnce(&mut InstanceQueues) -> T) -> T {
        let mut instances = self.instances.lock().unwrap_or_else(|e| e.into_inner());
        // A known instance without allocating its id again (this runs for every report).
        if let Some(queues) = instances.get_mut(instance_id) {
            return f(queues);
        }
        f(instances.entry(instance_id.to_string()).or_default())
    }

    /// Records that a task that had `reservation` and ran `ms` milliseconds ended on the
    /// instance.
    pub fn task_ended(&self, instance_id: &str, reservation: &Reservation, ms: u64) {
        let size = size(reservation);
        self.with(instance_id, |q| {
            let ms = ms as f64;
            let avg = match q.task_ms.iter().position(|(s, _)| *s == size) {
                Some(i) => {
                    let (_, avg) = q.task_ms.remove(i);
                    avg + WEIGHT * (ms - avg)
                }
                None => ms,
            };
            q.task_ms.push((size, avg));
            if q.task_ms.len() > SIZES {
                q.task_ms.remove(0);
            }
        });
    }

    /// How deep queues of tasks that have `reservation` are filled on the instance for them
    /// to hold `cover` of work.
    pub fn depth(&self, instance_id: &str, reservation: &Reservation, cover: Duration) -> usize {
        let size = size(reservation);
        self.with(instance_id, |q| {
            let ms = q.task_ms.iter().find(|(s, _)| *s == size);
            depth_for(ms.map(|(_, ms)| *ms), cover)
        })
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

    fn task(cpus: u32) -> Reservation {
        Reservation {
            cpus,
            memory_mib: 1024,
            gpus: Vec::new(),
        }
    }

    #[test]
    fn queues_are_as_deep_as_the_tasks_of_their_size_are_short() {
        let queues = Queues::default();
        let cover = Duration::from_millis(16);
        let (small, large) = (task(1), task(2));
        let depth = |id, size: &Reservation| queues.depth(id, size, cover);
        assert_eq!(depth("i-1", &small), MIN_DEPTH, "nothing known yet");
        queues.task_ended("i-1", &small, 0);
        assert_eq!(depth("i-1", &small), MAX_DEPTH);
        assert_eq!(depth("i-1", &large), MIN_DEPTH, "another size");
        assert_eq!(depth("i-2", &small), MIN_DEPTH, "another instance");
        for _ in 0..50 {
            queues.task_ended("i-1", &small, 4);
        }
        assert_eq!(depth("i-1", &small), 4);
        assert_eq!(queues.depth("i-1", &small, cover * 2), 8);
        for _ in 0..50 {
            queues.task_ended("i-1", &small, 60_000);
        }
        assert_eq!(depth("i-1", &small), MIN_DEPTH);
        // Only the most recent sizes are kept.
        for cpus in 2..(2 + SIZES as u32) {
            queues.task_ended("i-1", &task(cpus), 0);
        }
        assert_eq!(depth("i-1", &small), MIN_DEPTH, "forgotten");
        assert_eq!(depth("i-1", &large), MAX_DEPTH);
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
