//! Rolling deployments, driven from the proxy that knows when a replica is ready: once a
//! second, a service whose replicas run an older deployment than the run's takes the next
//! step of [`dstack_core::engine::rollout::step`] — one new replica at a time, an old one
//! retired (`scaled_down`) each time a new one is ready — keeping its replica count ready
//! throughout (the count when the rollout began; for autoscaled services, which do not scale
//! meanwhile, within their range).

use std::collections::HashMap;
use std::sync::Mutex;

use dstack_core::engine::rollout::{active_replicas, step, RolloutReplica, Step};
use dstack_core::engine::scaling::initial_replicas;
use dstack_core::engine::Engine;

use super::registry::Service;

/// The replica count each rollout keeps ready, by `(run id, deployment)`.
#[derive(Default)]
pub(crate) struct Rollouts {
    targets: Mutex<HashMap<(String, u32), u32>>,
}

impl Rollouts {
    /// Whether service run `run_id` is rolling out a deployment.
    pub fn in_progress(&self, run_id: &str) -> bool {
        self.targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .any(|(id, _)| id == run_id)
    }

    /// Takes the next step of `service`'s rollout; `false` when none is under way.
    pub async fn drive(&self, engine: &Engine, service: &Service) -> bool {
        let Ok(jobs) = engine.store().jobs_of_run(&service.run_id) else {
            return false;
        };
        let replicas: Vec<RolloutReplica> = active_replicas(&jobs)
            .into_iter()
            .map(|job| RolloutReplica {
                job_id: job.id.clone(),
                replica_num: job.replica_num,
                deployment_num: job.deployment_num,
                ready: service
                    .replicas
                    .iter()
                    .any(|r| r.job_id == job.id && r.is_ready()),
                placed: job.instance_id.is_some(),
            })
            .collect();
        let deployment = service.deployment_num;
        let key = (service.run_id.clone(), deployment);
        let Some(target) = self.target(service, key, &replicas) else {
            return false;
        };
        let result = match step(deployment, &replicas, target) {
            Step::Start => engine
                .scale(&service.run_id, replicas.len() as u32 + 1)
                .await
                .map(drop),
            Step::Retire(job_id) => super::retire(engine, service, &job_id).await,
            Step::Wait | Step::Done => Ok(()),
        };
        if let Err(e) = result {
            eprintln!(
                "dstack server: rolling deployment of {}: {e}",
                service.run_id
            );
        }
        true
    }

    /// The replica count a rollout keeps ready; `None` (and forgotten) when none is under way.
    fn target(
        &self,
        service: &Service,
        key: (String, u32),
        replicas: &[RolloutReplica],
    ) -> Option<u32> {
        let mut targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        if replicas.iter().all(|r| r.deployment_num >= key.1) {
            targets.retain(|(run_id, _), _| *run_id != service.run_id);
            return None;
        }
        let target = *targets.entry(key).or_insert_with(|| {
            let config = &service.config;
            match (&config.scaling, &config.replicas) {
                (Some(_), Some(range)) => {
                    let ready = replicas.iter().filter(|r| r.ready).count() as u32;
                    let min = u32::try_from(range.min.unwrap_or(0).max(1)).unwrap_or(1);
                    let max = u32::try_from(range.max.unwrap_or(1).max(1)).unwrap_or(1);
                    ready.clamp(min, max.max(min))
                }
                _ => initial_replicas(config),
            }
        });
        Some(target)
    }
}
