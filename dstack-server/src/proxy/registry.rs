//! The services the proxy serves: every unfinished service run of the state, its settings,
//! and its replicas (the running jobs) with their readiness. Rebuilt from the store by
//! [`Registry::refresh`]; a replica's readiness carries over from one table to the next.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use dstack_core::config::service::ServiceConfiguration;
use dstack_core::config::Configuration;
use dstack_core::engine::Engine;
use dstack_core::model::JobStatus;

use super::probes::{self, ProbeSpec, ProbeState};

/// One service run.
pub(crate) struct Service {
    /// The run's id.
    pub run_id: String,
    /// When it was submitted (Unix seconds).
    pub created_s: u64,
    /// Its current deployment (a rolling deployment replaces replicas of older ones).
    pub deployment_num: u32,
    /// Its configuration.
    pub config: Arc<ServiceConfiguration>,
    /// Its probes (the configured ones, or the defaults).
    pub probes: Arc<[ProbeSpec]>,
    /// Its running replicas, by replica number.
    pub replicas: Vec<Arc<Replica>>,
    /// Round-robin position over the ready replicas.
    next: AtomicUsize,
}

impl Service {
    /// The ready replicas, starting with the next in turn (each request takes the first; the
    /// others are for a retry when it cannot be reached).
    pub fn ready_in_turn(&self) -> Vec<Arc<Replica>> {
        let ready: Vec<Arc<Replica>> = self
            .replicas
            .iter()
            .filter(|r| r.is_ready())
            .cloned()
            .collect();
        if ready.is_empty() {
            return ready;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % ready.len();
        ready[start..]
            .iter()
            .chain(&ready[..start])
            .cloned()
            .collect()
    }
}

/// A running job of a service and what the proxy knows of it.
pub(crate) struct Replica {
    /// The job's id.
    pub job_id: String,
    /// Its replica number.
    pub replica_num: u32,
    /// The instance it runs on.
    pub instance_id: String,
    /// The service's port on that instance's host.
    pub port: u16,
    /// Whether it receives requests.
    ready: AtomicBool,
    /// Taken out of rotation for good: it is being stopped.
    retiring: AtomicBool,
    /// Requests sent to it that have not had their answer's head yet.
    pub in_flight: AtomicUsize,
    /// Its probes' state (also: whether a check is under way).
    pub probing: Mutex<ProbeState>,
}

impl Replica {
    /// Whether it receives requests.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Marks it ready or not (a retiring replica is never ready again).
    pub fn set_ready(&self, ready: bool) {
        let ready = ready && !self.retiring.load(Ordering::Acquire);
        self.ready.store(ready, Ordering::Release);
    }

    /// Takes it out of rotation for good and waits (up to `limit`) until the requests sent
    /// to it have their answers: it can then be stopped without failing one.
    pub async fn drain(&self, limit: std::time::Duration) {
        self.retiring.store(true, Ordering::Release);
        self.ready.store(false, Ordering::Release);
        let deadline = tokio::time::Instant::now() + limit;
        while self.in_flight.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

/// The table of services, by run name.
#[derive(Default)]
pub(crate) struct Registry {
    table: RwLock<Arc<HashMap<String, Arc<Service>>>>,
    /// Parsed configurations by run id, with the text they were parsed from (an update in
    /// place changes it).
    configs: Mutex<HashMap<String, (String, Arc<ServiceConfiguration>)>>,
}

impl Registry {
    /// The service run named `name`, if it is unfinished.
    pub fn get(&self, name: &str) -> Option<Arc<Service>> {
        self.snapshot().get(name).cloned()
    }

    /// Every unfinished service.
    pub fn snapshot(&self) -> Arc<HashMap<String, Arc<Service>>> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the unfinished service runs and their running jobs from the store; replicas
    /// already known keep their state.
    pub fn refresh(&self, engine: &Engine) -> Result<(), dstack_core::store::StoreError> {
        let store = engine.store();
        let runs = store.active_runs_of_kind("service")?;
        let jobs = store.jobs_with_status(&[JobStatus::Running])?;
        let old = self.snapshot();
        let mut configs = self.configs.lock().unwrap_or_else(|e| e.into_inner());
        let mut table = HashMap::new();
        let mut live = Vec::new();
        for run in runs {
            let text = run.spec.configuration.get();
            let (config, changed) = match configs.get(&run.id) {
                Some((parsed, config)) if parsed == text => (config.clone(), false),
                _ => match run.spec.configuration() {
                    Ok(Configuration::Service(service)) => {
                        let config = Arc::new(*service);
                        configs.insert(run.id.clone(), (text.to_string(), config.clone()));
                        (config, true)
                    }
                    _ => continue,
                },
            };
            live.push(run.id.clone());
            let previous = old.get(&run.name).filter(|s| s.run_id == run.id);
            let mut replicas: Vec<Arc<Replica>> = jobs
                .iter()
                .filter(|j| j.run_id == run.id)
                .filter_map(|job| {
                    let instance_id = job.instance_id.clone()?;
                    let known = previous
                        .and_then(|s| s.replicas.iter().find(|r| r.job_id == job.id))
                        .cloned();
                    Some(known.unwrap_or_else(|| {
                        Arc::new(Replica {
                            job_id: job.id.clone(),
                            replica_num: job.replica_num,
                            instance_id,
                            port: config.port.container_port,
                            ready: AtomicBool::new(false),
                            retiring: AtomicBool::new(false),
                            in_flight: AtomicUsize::new(0),
                            probing: Mutex::new(ProbeState::default()),
                        })
                    }))
                })
                .collect();
            replicas.sort_by_key(|r| r.replica_num);
            let service = Service {
                run_id: run.id.clone(),
                created_s: run.submitted_at_ms / 1000,
                deployment_num: run.deployment_num,
                probes: match previous {
                    Some(s) if !changed => s.probes.clone(),
                    _ => probes::specs(&config, &run.spec.client_env).into(),
                },
                config,
                replicas,
                next: AtomicUsize::new(previous.map_or(0, |s| s.next.load(Ordering::Relaxed))),
            };
            table.insert(run.name.clone(), Arc::new(service));
        }
        configs.retain(|id, _| live.contains(id));
        drop(configs);
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
        Ok(())
    }
}
