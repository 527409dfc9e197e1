//! New cloud capacity, as dstack provisions it: backend fleets (`nodes:`) get their `target`
//! instances when applied, and runs that find no room get an instance in a backend fleet with
//! room below `nodes.max` (runs never create fleets). Offers come from every allowed backend,
//! cheapest first; capacity errors move on to the next offer (at most
//! [`MAX_OFFERS_TRIED`]). An instance is recorded `pending` with its offer *before* the backend
//! is asked (write before act), and so is each creation attempt's id; the backend tags the
//! resource with the instance's id, the attempt's and this state's identity
//! ([`crate::store::Store::state_id`]). When a creation's outcome is unknown (its answer was
//! lost), what the attempt made is looked for before another offer is tried; the cloud's id of
//! the instance is recorded as soon as it is known. The orphan sweep
//! ([`Inner::reap_orphans`]) terminates what this state's attempts made and the store does not
//! hold as live (created but never recorded, recorded as terminated, or a duplicate of the
//! recorded one), never what another state (a copy of this one) made, and brings up
//! instances a stopped process had created but not yet deployed. Idle instances are
//! terminated after their `idle_duration` unless their fleet would drop below `nodes.min`.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use super::fleets::Progress;
use super::{consolidate, jobs, EngineError, Inner};
use crate::backend::{
    Compute, ComputeError, CreatedInstance, InstanceConfig, OfferRequest, OwnedInstance,
};
use crate::config::fleet::FleetConfiguration;
use crate::config::profile::{CreationPolicy, ProfileParams, SpotPolicy};
use crate::config::range::{Memory, Range};
use crate::config::resources::ResourcesSpec;
use crate::config::Configuration;
use crate::model::{
    longer_than, now_ms, Fleet, FleetStatus, Instance, InstanceStatus, JobStatus,
    JobTerminationReason,
};
use crate::offers::query::QueryFilter;
use crate::offers::{Availability, Offer};

/// How many offers one provisioning tries before giving up (dstack's
/// `DSTACK_SERVER_MAX_OFFERS_TRIED`).
pub const MAX_OFFERS_TRIED: usize = 25;

/// Idle time of instances a fleet provisions, unless its `idle_duration` says otherwise (3 days).
const FLEET_IDLE_SECS: u64 = 3 * 24 * 3600;

/// Idle time of instances a run provisions, unless the run or fleet says otherwise (5 minutes).
const RUN_IDLE_SECS: u64 = 300;

/// What became of a request for new capacity for a job.
pub(crate) enum ForJob {
    /// An instance is being provisioned for it.
    Provisioning,
    /// No backend fleet can provision it, and why.
    Impossible(String),
}

/// The resources of a backend fleet's instances: its `resources`, or anything (`cpu: 1..`,
/// `memory: 0..`, optional GPUs, no disk constraint) as dstack's `unconstrained()`.
fn fleet_resources(config: &FleetConfiguration) -> ResourcesSpec {
    config.resources.clone().unwrap_or_else(|| ResourcesSpec {
        cpu: crate::config::resources::CpuSpec {
            arch: None,
            count: Range::at_least(1),
        },
        memory: Range::at_least(Memory(0.0)),
        disk: None,
        ..ResourcesSpec::default()
    })
}

/// `spot_policy` as a catalog choice: spot, on-demand (the default), or both.
fn spot_choice(policy: Option<SpotPolicy>) -> Option<bool> {
    match policy.unwrap_or(SpotPolicy::OnDemand) {
        SpotPolicy::Spot => Some(true),
        SpotPolicy::OnDemand => Some(false),
        SpotPolicy::Auto => None,
    }
}

/// Why a backend fleet has nothing to provision from.
pub(super) fn no_offers(errors: &[String]) -> String {
    let why = "no backend offers match the fleet";
    if errors.is_empty() {
        why.to_string()
    } else {
        format!("{why} ({})", errors.join("; "))
    }
}

/// The fleet configuration of a backend fleet (one with `nodes:`).
pub(crate) fn backend_fleet(fleet: &Fleet) -> Option<FleetConfiguration> {
    let config =
        crate::config::parse_value(fleet.configuration.as_ref()?, "<stored fleet>").ok()?;
    match config {
        Configuration::Fleet(f) if f.nodes.is_some() && f.ssh_config.is_none() => Some(*f),
        _ => None,
    }
}

/// Both bounds: the larger minimum and the smaller maximum.
fn tighter(a: Option<f64>, b: Option<f64>, larger: bool) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if larger { x.max(y) } else { x.min(y) }),
        (x, y) => x.or(y),
    }
}

/// What both a run and a fleet allow, or why they cannot agree (a spot/on-demand conflict).
fn combine(run: &QueryFilter, fleet: &QueryFilter) -> Result<QueryFilter, String> {
    let spot = match (run.spot, fleet.spot) {
        (Some(a), Some(b)) if a != b => {
            return Err("the run's spot_policy conflicts with the fleet's".to_string())
        }
        (a, b) => a.or(b),
    };
    Ok(QueryFilter {
        cpu_arch: run.cpu_arch.clone().or_else(|| fleet.cpu_arch.clone()),
        min_cpu: tighter(run.min_cpu, fleet.min_cpu, true),
        max_cpu: tighter(run.max_cpu, fleet.max_cpu, false),
        min_memory: tighter(run.min_memory, fleet.min_memory, true),
        max_memory: tighter(run.max_memory, fleet.max_memory, false),
        min_gpu_count: tighter(run.min_gpu_count, fleet.min_gpu_count, true),
        max_gpu_count: tighter(run.max_gpu_count, fleet.max_gpu_count, false),
        gpu_vendor: run.gpu_vendor.clone().or_else(|| fleet.gpu_vendor.clone()),
        gpu_name: run.gpu_name.clone().or_else(|| fleet.gpu_name.clone()),
        min_gpu_memory: tighter(run.min_gpu_memory, fleet.min_gpu_memory, true),
        max_gpu_memory: tighter(run.max_gpu_memory, fleet.max_gpu_memory, false),
        min_total_gpu_memory: tighter(run.min_total_gpu_memory, fleet.min_total_gpu_memory, true),
        max_total_gpu_memory: tighter(run.max_total_gpu_memory, fleet.max_total_gpu_memory, false),
        min_disk_size: tighter(run.min_disk_size, fleet.min_disk_size, true),
        max_disk_size: tighter(run.max_disk_size, fleet.max_disk_size, false),
        min_price: tighter(run.min_price, fleet.min_price, true),
        max_price: tighter(run.max_price, fleet.max_price, false),
        min_compute_capability: run.min_compute_capability.or(fleet.min_compute_capability),
        spot,
        allowed_flags: run.allowed_flags.clone(),
    })
}

/// The request of a backend fleet for its own instances.
fn fleet_request(config: &FleetConfiguration) -> OfferRequest {
    let resources = fleet_resources(config);
    OfferRequest {
        filter: QueryFilter::from_requirements(
            &resources,
            spot_choice(config.profile.spot_policy),
            config.profile.max_price,
        ),
        disk: resources.disk.map(|d| d.size),
    }
}

/// Whether a profile's `backends`, `regions`, `instance_types` and `availability_zones` allow
/// an offer (names compared case-insensitively; with zones requested, an offer without zone
/// information is dropped, and one with zones keeps those requested).
fn allowed(profile: &ProfileParams, offer: &mut Offer) -> bool {
    let listed = |list: &Option<Vec<String>>, value: &str| {
        list.as_ref()
            .is_none_or(|l| l.iter().any(|v| v.eq_ignore_ascii_case(value)))
    };
    if let Some(backends) = &profile.backends {
        if !backends.iter().any(|b| b.as_str() == offer.backend) {
            return false;
        }
    }
    if !listed(&profile.regions, &offer.region)
        || !listed(&profile.instance_types, &offer.instance_type)
    {
        return false;
    }
    if let Some(wanted) = &profile.availability_zones {
        let Some(zones) = &mut offer.availability_zones else {
            return false;
        };
        zones.retain(|z| wanted.iter().any(|w| w.eq_ignore_ascii_case(z)));
        if zones.is_empty() {
            return false;
        }
    }
    true
}

/// The tags of a new cloud instance: its fleet's, and those of the run it is provisioned for
/// (a run's tag wins over the fleet's of the same key).
fn instance_tags(fleet: &ProfileParams, run: Option<&ProfileParams>) -> BTreeMap<String, String> {
    [Some(fleet), run]
        .into_iter()
        .flatten()
        .filter_map(|p| p.tags.as_ref())
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// How long an instance may stay idle: the smaller of the profiles' `idle_duration`s (a finite
/// one wins over "off"), else `default`; `None`: never reaped.
fn idle_timeout(profiles: &[&ProfileParams], default: u64) -> Option<u64> {
    let set: Vec<i64> = profiles
        .iter()
        .filter_map(|p| p.idle_duration.map(|d| d.seconds()))
        .collect();
    if set.is_empty() {
        return Some(default);
    }
    set.iter().filter_map(|s| u64::try_from(*s).ok()).min()
}

impl Inner {
    /// Offers of new capacity for `request` from the backends `profiles` allow, filtered by
    /// every profile, cheapest first, unavailable last; with the errors of backends that
    /// could not answer.
    pub(crate) async fn cloud_offers(
        &self,
        request: &OfferRequest,
        profiles: &[&ProfileParams],
    ) -> (Vec<Offer>, Vec<String>) {
        let mut offers = Vec::new();
        let mut errors = Vec::new();
        for backend in self.backends.iter().filter(|b| b.creates_instances()) {
            match backend.offers_for(request).await {
                Ok(found) => offers.extend(found),
                Err(e) => errors.push(format!("{}: {e}", backend.backend())),
            }
        }
        offers.retain_mut(|o| profiles.iter().all(|p| allowed(p, o)));
        offers.sort_by(|a, b| a.price.total_cmp(&b.price));
        offers.sort_by_key(|o| o.availability == Availability::NotAvailable);
        (offers, errors)
    }

    /// Offers for a backend fleet's own instances, with the errors of backends that could
    /// not answer.
    pub(super) async fn fleet_offers(
        &self,
        config: &FleetConfiguration,
    ) -> (Vec<Offer>, Vec<String>) {
        self.cloud_offers(&fleet_request(config), &[&config.profile])
            .await
    }

    /// Applies a backend fleet: records it, then provisions instances up to `nodes.target`
    /// (each from the cheapest offer that has capacity), all at once. A fleet that gets none
    /// of them fails, unless its `retry` lets it wait for capacity: it is then active and
    /// brought to its `nodes.min` in the background (`engine::consolidate`), as it is when it
    /// got fewer than `nodes.min` anyway. Applying a fleet again forgets earlier attempts.
    pub(crate) async fn apply_backend_fleet(
        self: &Arc<Self>,
        config: &FleetConfiguration,
        configuration: &Configuration,
        progress: Progress<'_>,
    ) -> Result<(Fleet, Vec<Instance>), EngineError> {
        if let Some(why) = config.unsupported_retry() {
            return Err(EngineError::Unsupported(why));
        }
        let name = self.fleet_name(config)?;
        let target = config.nodes.map_or(0, |n| n.target);
        let min = config.nodes.map_or(0, |n| n.min);
        let waits = consolidate::bound(config.profile.retry.as_ref()).waits();
        let existing = self.store.fleets()?.into_iter().find(|f| f.name == name);
        let mut fleet = super::fleets::submitted_fleet(existing.as_ref(), &name, configuration);
        self.store.put_fleet(&fleet)?;
        let started = now_ms();
        let live = self.fleet_instances(&fleet.id)?;
        let missing = usize::try_from(target)
            .unwrap_or(0)
            .saturating_sub(live.len());
        let (offers, errors) = self.fleet_offers(config).await;
        if missing > 0 && offers.is_empty() {
            let why = no_offers(&errors);
            if !waits {
                fleet.status = FleetStatus::Failed;
                self.store.put_fleet(&fleet)?;
                return Err(EngineError::Invalid(format!("fleet {name}: {why}")));
            }
            fleet.status_message = Some(why);
        }
        let mut provisioning = Vec::new();
        if !offers.is_empty() {
            for _ in 0..missing {
                let instance = self.fleet_placeholder(&fleet, config)?;
                provisioning.push(self.provision(instance, offers.clone(), config, progress));
            }
        }
        let done = futures_util::future::join_all(provisioning).await;
        let joined = done
            .iter()
            .filter(|i| i.status == InstanceStatus::Idle)
            .count();
        fleet.status = if missing > 0 && joined == 0 && live.is_empty() && !waits {
            FleetStatus::Failed
        } else {
            FleetStatus::Active
        };
        let running = self
            .fleet_instances(&fleet.id)?
            .iter()
            .filter(|i| matches!(i.status, InstanceStatus::Idle | InstanceStatus::Busy))
            .count();
        if fleet.status == FleetStatus::Active && (running as i64) < min {
            // This apply was the first attempt: the next one waits the first delay.
            fleet.consolidation = Some(consolidate::attempted(None, started));
        }
        self.store.put_fleet(&fleet)?;
        self.watch_instances();
        self.wake_scheduler();
        Ok((fleet.clone(), self.fleet_instances(&fleet.id)?))
    }

    /// Records a new instance of a backend fleet's own (not provisioned for a job).
    pub(super) fn fleet_placeholder(
        &self,
        fleet: &Fleet,
        config: &FleetConfiguration,
    ) -> Result<Instance, EngineError> {
        let timeout = idle_timeout(&[&config.profile], FLEET_IDLE_SECS);
        self.placeholder(fleet, None, timeout)
    }

    /// Records a new instance of `fleet` as `pending` (it reserves a slot below `nodes.max`).
    fn placeholder(
        &self,
        fleet: &Fleet,
        job_id: Option<&str>,
        idle_timeout_secs: Option<u64>,
    ) -> Result<Instance, EngineError> {
        let taken: HashSet<String> = self
            .store
            .instances()?
            .into_iter()
            .filter(|i| i.fleet_id == fleet.id)
            .map(|i| i.name)
            .collect();
        let num = (0..)
            .find(|n| !taken.contains(&format!("{}-{n}", fleet.name)))
            .unwrap_or(0);
        let mut backend_data = serde_json::json!({});
        if let Some(job) = job_id {
            backend_data["provisioned_for"] = job.into();
        }
        let instance = Instance {
            id: uuid::Uuid::new_v4().to_string(),
            name: format!("{}-{num}", fleet.name),
            fleet_id: fleet.id.clone(),
            backend: String::new(),
            status: InstanceStatus::Pending,
            host: Default::default(),
            price: 0.0,
            backend_data,
            created_at_ms: now_ms(),
            address: None,
            session: None,
            status_message: None,
            unreachable: false,
            unreachable_since_ms: None,
            blocks: None,
            containers: false,
            offer: None,
            idle_timeout_secs,
            last_job_at_ms: None,
            cloud_id: None,
            attempts: Vec::new(),
        };
        self.store.put_instance(&instance)?;
        Ok(instance)
    }

    /// Provisions `instance` from the first of `offers` that has capacity, waits until it can
    /// be reached and deploys its agent; returns it as recorded afterwards (`idle`, or
    /// `terminated` with the reason, its cloud resource terminated).
    pub(super) async fn provision(
        self: &Arc<Self>,
        mut instance: Instance,
        offers: Vec<Offer>,
        fleet: &FleetConfiguration,
        progress: Progress<'_>,
    ) -> Instance {
        self.in_flight(&instance.id, true);
        let mut config = InstanceConfig {
            instance_id: instance.id.clone(),
            attempt_id: String::new(),
            state_id: self.store.state_id().to_string(),
            name: instance.name.clone(),
            fleet: fleet.name.clone().unwrap_or_default(),
            tags: instance_tags(&fleet.profile, None),
        };
        let mut failures = Vec::new();
        let mut created = false;
        let usable = offers
            .into_iter()
            .filter(|o| o.availability != Availability::NotAvailable)
            .take(MAX_OFFERS_TRIED);
        for offer in usable {
            let Some(backend) = self.backend(&offer.backend) else {
                continue;
            };
            instance.backend = offer.backend.clone();
            instance.price = offer.price;
            instance.host = offer.resources.clone();
            instance.offer = Some(offer.clone());
            // Each attempt is recorded before it is sent: the orphan sweep reaps only what
            // this state's attempts made.
            config.attempt_id = uuid::Uuid::new_v4().to_string();
            instance.attempts.push(config.attempt_id.clone());
            if let Err(e) = self.store.put_instance(&instance) {
                failures.push(format!("cannot record the instance: {e}"));
                break;
            }
            let what = format!(
                "{} {} in {} (${}/h{})",
                offer.backend,
                offer.instance_type,
                offer.region,
                offer.price,
                if offer.spot { ", spot" } else { "" }
            );
            progress(&instance, &format!("creating {what}"));
            match self
                .attempt(&**backend, &offer, &config, &instance, progress)
                .await
            {
                Attempt::Created(done) => {
                    let done = *done;
                    let mut data = done.backend_data;
                    if let Some(job) = instance.backend_data.get("provisioned_for").cloned() {
                        data["provisioned_for"] = job;
                    }
                    instance.backend_data = data;
                    instance.cloud_id = done.cloud_id;
                    instance.status = InstanceStatus::Provisioning;
                    created = true;
                    break;
                }
                Attempt::Failed(e) => {
                    progress(&instance, &format!("{what}: {e}"));
                    failures.push(format!("{what}: {e}"));
                }
                Attempt::Unknown(e) => {
                    // Another offer could leave two instances: stop here; the orphan sweep
                    // terminates whatever this attempt made once the record is ended.
                    let message = format!(
                        "{what}: {e}; no other offer is tried, and whatever the attempt made \
                         is terminated by the orphan sweep"
                    );
                    return self
                        .end_provisioning(instance, message, false, progress)
                        .await;
                }
            }
        }
        if !created {
            let shown: Vec<&str> = failures.iter().take(3).map(String::as_str).collect();
            let message = if shown.is_empty() {
                "no offers to provision from".to_string()
            } else {
                format!("no capacity: {}", shown.join("; "))
            };
            return self
                .end_provisioning(instance, message, false, progress)
                .await;
        }
        if let Err(e) = self.store.put_instance(&instance) {
            let message = format!("cannot record the instance: {e}");
            return self
                .end_provisioning(instance, message, true, progress)
                .await;
        }
        self.bring_up(instance, progress).await
    }

    /// One creation attempt: the instance, or why not. When the backend cannot tell whether
    /// its request took effect, what the attempt made is looked for before the caller moves
    /// on to another offer (and duplicates of it are terminated by the backend).
    async fn attempt(
        &self,
        backend: &dyn Compute,
        offer: &Offer,
        config: &InstanceConfig,
        instance: &Instance,
        progress: Progress<'_>,
    ) -> Attempt {
        let why = match backend.create_instance(offer, config).await {
            Ok(done) => return Attempt::Created(Box::new(done)),
            Err(ComputeError::Unknown(why)) => why,
            Err(e) => return Attempt::Failed(e.to_string()),
        };
        progress(
            instance,
            &format!("outcome unknown ({why}): looking for what it created"),
        );
        match backend.find_attempt(offer, config).await {
            Ok(Some(done)) => Attempt::Created(Box::new(done)),
            Ok(None) => Attempt::Failed(format!("outcome unknown ({why}); nothing was created")),
            Err(e) => Attempt::Unknown(format!(
                "outcome unknown ({why}), and looking for what it created failed: {e}"
            )),
        }
    }

    /// Waits until a created instance can be reached, then deploys its agent; returns it as
    /// recorded afterwards (`idle`, or `terminated` with its cloud resource terminated).
    async fn bring_up(
        self: &Arc<Self>,
        mut instance: Instance,
        progress: Progress<'_>,
    ) -> Instance {
        self.in_flight(&instance.id, true);
        progress(&instance, "waiting for the instance to start");
        match self.wait_ready(&instance).await {
            Ok(data) => instance.backend_data = data,
            Err(message) => {
                return self
                    .end_provisioning(instance, message, true, progress)
                    .await
            }
        }
        let deployed = self.deploy(instance, &BTreeMap::new(), progress).await;
        self.in_flight(&deployed.id, false);
        if deployed.status != InstanceStatus::Idle {
            let message = deployed.status_message.clone().unwrap_or_default();
            return self
                .end_provisioning(deployed, message, true, progress)
                .await;
        }
        self.wake_scheduler();
        deployed
    }

    /// Polls the backend until the instance can be deployed, up to the provisioning timeout.
    async fn wait_ready(&self, instance: &Instance) -> Result<serde_json::Value, String> {
        let backend = self
            .backend(&instance.backend)
            .ok_or_else(|| format!("backend {} is not configured", instance.backend))?;
        let deadline = tokio::time::Instant::now() + self.options.provisioning_timeout;
        let mut pause = Duration::from_millis(200);
        loop {
            match backend.update_provisioning(instance).await {
                Ok(Some(data)) => return Ok(data),
                Ok(None) => {}
                Err(e) => return Err(format!("provisioning failed: {e}")),
            }
            if tokio::time::Instant::now() + pause > deadline {
                return Err(format!(
                    "provisioning timeout: not ready after {:?}",
                    self.options.provisioning_timeout
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    /// Records a failed provisioning: terminates the cloud resource when one was created
    /// (never leaving it behind), marks the instance terminated and fails the job it was for.
    async fn end_provisioning(
        self: &Arc<Self>,
        mut instance: Instance,
        message: String,
        created: bool,
        progress: Progress<'_>,
    ) -> Instance {
        if created {
            if let Some(backend) = self.backend(&instance.backend) {
                if let Err(e) = backend.terminate_instance(&instance).await {
                    progress(&instance, &format!("cannot terminate it: {e}"));
                }
            }
        }
        progress(&instance, &format!("failed: {message}"));
        instance.status = InstanceStatus::Terminated;
        instance.status_message = Some(message.clone());
        let _ = self.store.put_instance(&instance);
        self.in_flight(&instance.id, false);
        if let Some(job_id) = instance
            .backend_data
            .get("provisioned_for")
            .and_then(|j| j.as_str())
        {
            if let Ok(Some(job)) = self.store.job(job_id) {
                if job.status == JobStatus::Submitted {
                    let reason = JobTerminationReason::FailedToStartDueToNoCapacity;
                    jobs::fail(self, job, reason, message).await;
                }
            }
        }
        self.wake_scheduler();
        instance
    }

    /// Whether a `pending` record is older than the orphan grace period.
    fn past_orphan_grace(&self, instance: &Instance) -> bool {
        let grace = self.options.orphan_grace.as_millis() as u64;
        now_ms().saturating_sub(instance.created_at_ms) >= grace
    }

    /// Marks an instance as being provisioned by this process (or no longer).
    fn in_flight(&self, instance_id: &str, on: bool) {
        let mut set = self.provisioning.lock().unwrap_or_else(|e| e.into_inner());
        if on {
            set.insert(instance_id.to_string());
        } else {
            set.remove(instance_id);
        }
    }

    /// Asks a backend fleet with room for an instance for `job_id` of a run that found no
    /// room on existing instances, unless one is already being provisioned for it.
    pub(crate) async fn provision_for_job(
        self: &Arc<Self>,
        job_id: &str,
        configuration: &Configuration,
    ) -> Result<ForJob, EngineError> {
        if !self.backends.iter().any(|b| b.creates_instances()) {
            return Ok(ForJob::Impossible(String::new()));
        }
        let common = super::command::common(configuration);
        if common.profile.creation_policy == Some(CreationPolicy::Reuse) {
            return Ok(ForJob::Impossible(
                "creation_policy is reuse: no new instances".to_string(),
            ));
        }
        if common.profile.instances.is_some() {
            return Ok(ForJob::Impossible(
                "`instances` names existing instances: no new ones".to_string(),
            ));
        }
        let instances = self.store.instances()?;
        let live = |i: &&Instance| i.status != InstanceStatus::Terminated;
        let pending_for_job = instances.iter().filter(live).any(|i| {
            matches!(
                i.status,
                InstanceStatus::Pending | InstanceStatus::Provisioning
            ) && i
                .backend_data
                .get("provisioned_for")
                .and_then(|v| v.as_str())
                == Some(job_id)
        });
        if pending_for_job {
            return Ok(ForJob::Provisioning);
        }
        let selection = super::scheduler::fleet_selection(common);
        let run_filter = QueryFilter::for_run(common);
        let mut best: Option<(Fleet, FleetConfiguration, Vec<Offer>)> = None;
        let mut reasons = Vec::new();
        for fleet in self.store.fleets()? {
            if fleet.status != FleetStatus::Active
                || selection.as_ref().is_some_and(|s| !s.contains(&fleet.name))
            {
                continue;
            }
            let Some(config) = backend_fleet(&fleet) else {
                continue;
            };
            let count = instances
                .iter()
                .filter(live)
                .filter(|i| i.fleet_id == fleet.id)
                .count();
            let max = config.nodes.as_ref().and_then(|n| n.max);
            if max.is_some_and(|m| count as i64 >= m) {
                // Instances still starting may take the job once they are up.
                let starting = instances.iter().any(|i| {
                    i.fleet_id == fleet.id
                        && matches!(
                            i.status,
                            InstanceStatus::Pending | InstanceStatus::Provisioning
                        )
                });
                if starting {
                    return Ok(ForJob::Provisioning);
                }
                reasons.push(format!("fleet {} is at capacity", fleet.name));
                continue;
            }
            let fleet_filter = fleet_request(&config).filter;
            let filter = match combine(&run_filter, &fleet_filter) {
                Ok(f) => f,
                Err(why) => {
                    reasons.push(format!("fleet {}: {why}", fleet.name));
                    continue;
                }
            };
            let request = OfferRequest {
                filter,
                disk: common
                    .resources
                    .disk
                    .as_ref()
                    .map(|d| d.size)
                    .or_else(|| fleet_resources(&config).disk.map(|d| d.size)),
            };
            let (offers, errors) = self
                .cloud_offers(&request, &[&common.profile, &config.profile])
                .await;
            reasons.extend(errors);
            let Some(cheapest) = offers.first() else {
                reasons.push(format!("fleet {}: no backend offers match", fleet.name));
                continue;
            };
            if best
                .as_ref()
                .is_none_or(|(_, _, b)| cheapest.price < b[0].price)
            {
                best = Some((fleet, config, offers));
            }
        }
        let Some((fleet, config, offers)) = best else {
            return Ok(ForJob::Impossible(reasons.join("; ")));
        };
        let timeout = idle_timeout(&[&common.profile, &config.profile], RUN_IDLE_SECS);
        let instance = self.placeholder(&fleet, Some(job_id), timeout)?;
        // The instance carries the run's tags as well as its fleet's.
        let mut config = config;
        config.profile.tags = Some(
            instance_tags(&config.profile, Some(&common.profile))
                .into_iter()
                .collect(),
        );
        let inner = self.clone();
        self.runtime.spawn(async move {
            let quiet: Progress<'_> = &|_, _| {};
            inner.provision(instance, offers, &config, quiet).await;
        });
        Ok(ForJob::Provisioning)
    }

    /// Terminates idle cloud instances past their idle time, keeping each fleet's `nodes.min`.
    pub(crate) async fn reap_idle(self: &Arc<Self>) -> Result<(), EngineError> {
        let instances = self.store.instances()?;
        let holding = self.store.jobs_with_status(JobStatus::HOLDING)?;
        let fleets = self.store.fleets()?;
        let now = now_ms();
        for mut instance in instances.iter().cloned() {
            let Some(timeout) = instance.idle_timeout_secs else {
                continue;
            };
            if !matches!(instance.status, InstanceStatus::Idle | InstanceStatus::Busy) {
                continue;
            }
            if holding
                .iter()
                .any(|j| j.instance_id.as_deref() == Some(instance.id.as_str()))
            {
                if instance
                    .last_job_at_ms
                    .is_none_or(|t| now.saturating_sub(t) > 1000)
                {
                    instance.last_job_at_ms = Some(now);
                    self.store.put_instance(&instance)?;
                }
                continue;
            }
            let since = instance.last_job_at_ms.unwrap_or(instance.created_at_ms);
            if !longer_than(now, since, timeout) {
                continue;
            }
            // A job that started and ended between two sweeps was never seen holding the
            // instance: its end counts too.
            let ended = self.store.last_job_end(&instance.id)?.unwrap_or(0);
            if !longer_than(now, since.max(ended), timeout) {
                continue;
            }
            let min = fleets
                .iter()
                .find(|f| f.id == instance.fleet_id)
                .and_then(backend_fleet)
                .and_then(|c| c.nodes)
                .map_or(0, |n| n.min);
            let active = instances
                .iter()
                .filter(|i| i.fleet_id == instance.fleet_id)
                .filter(|i| matches!(i.status, InstanceStatus::Idle | InstanceStatus::Busy))
                .count() as i64;
            if active <= min {
                continue;
            }
            self.terminate(
                instance,
                "idle_timeout: idle for longer than its idle_duration",
            )
            .await?;
        }
        Ok(())
    }

    /// Terminates one instance: recorded `terminating` first, then the backend call, then
    /// `terminated` (the backend error, if any, kept as its message).
    pub(crate) async fn terminate(
        &self,
        mut instance: Instance,
        why: &str,
    ) -> Result<Instance, EngineError> {
        instance.status = InstanceStatus::Terminating;
        self.store.put_instance(&instance)?;
        let error = match self.backend(&instance.backend) {
            Some(backend) => backend.terminate_instance(&instance).await.err(),
            None => Some(ComputeError::NotSupported(format!(
                "backend {} is not configured",
                instance.backend
            ))),
        };
        instance.status = InstanceStatus::Terminated;
        instance.status_message = Some(match error {
            Some(e) => format!("{why} (terminating it failed: {e})"),
            None => why.to_string(),
        });
        self.store.put_instance(&instance)?;
        self.agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&instance.id);
        Ok(instance)
    }

    /// Brings up instances recorded as created (`provisioning`) by a process that stopped
    /// before they joined (none is left running unused): each is deployed, or terminated.
    fn resume_provisioning(self: &Arc<Self>, instances: &[Instance], in_flight: &HashSet<String>) {
        for instance in instances {
            if instance.status != InstanceStatus::Provisioning
                || instance.backend == super::fleets::SSH_BACKEND
                || in_flight.contains(&instance.id)
                || !self.past_orphan_grace(instance)
                || !self
                    .backend(&instance.backend)
                    .is_some_and(|b| b.creates_instances())
            {
                continue;
            }
            self.in_flight(&instance.id, true);
            let (inner, instance) = (self.clone(), instance.clone());
            self.runtime.spawn(async move {
                let quiet: Progress<'_> = &|_, _| {};
                inner.bring_up(instance, quiet).await;
            });
        }
    }

    /// Terminates cloud resources that this state's creation attempts made and that the
    /// store does not hold as live (see [`orphan_verdict`]), reports the resources carrying
    /// this state's owner tag that it leaves alone, and ends records left `pending` by a
    /// process that stopped mid-way.
    pub(crate) async fn reap_orphans(self: &Arc<Self>) -> Result<OrphanSweep, EngineError> {
        let mut sweep = OrphanSweep::default();
        let in_flight = self
            .provisioning
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for backend in self.backends.iter().filter(|b| b.creates_instances()) {
            let owned = match backend.owned_instances().await {
                Ok(owned) => owned,
                Err(e) => {
                    sweep.errors.push(format!("{}: {e}", backend.backend()));
                    continue;
                }
            };
            for resource in owned {
                let record = match &resource.instance_id {
                    Some(id) => self.store.instance(id)?,
                    None => None,
                };
                let verdict = orphan_verdict(
                    &resource,
                    record.as_ref(),
                    self.store.state_id(),
                    |r| in_flight.contains(&r.id),
                    |r| self.past_orphan_grace(r),
                );
                match verdict {
                    Verdict::Keep => {}
                    Verdict::LeaveAlone(why) => sweep.left_alone.push(LeftAlone {
                        backend: backend.backend().to_string(),
                        cloud_id: resource.cloud_id.clone(),
                        why: why.to_string(),
                    }),
                    Verdict::Reap => match backend.terminate_owned(&resource).await {
                        Ok(()) => sweep.terminated.push(resource.cloud_id.clone()),
                        Err(e) => sweep
                            .errors
                            .push(format!("terminating {}: {e}", resource.cloud_id)),
                    },
                }
            }
        }
        let instances = self.store.instances()?;
        self.resume_provisioning(&instances, &in_flight);
        for instance in instances {
            if instance.status == InstanceStatus::Pending
                && !instance.backend.is_empty()
                && !in_flight.contains(&instance.id)
                && self.past_orphan_grace(&instance)
            {
                let mut instance = instance;
                instance.status = InstanceStatus::Terminated;
                instance.status_message =
                    Some("the process provisioning it stopped before it was created".to_string());
                self.store.put_instance(&instance)?;
            }
        }
        Ok(sweep)
    }
}

/// What one creation attempt came to.
enum Attempt {
    /// The instance was created (or found after an unknown outcome).
    Created(Box<CreatedInstance>),
    /// Nothing was created; the next offer may be tried.
    Failed(String),
    /// Something may have been created, and it could not be found out.
    Unknown(String),
}

/// What one pass of the orphan sweep did ([`crate::engine::Engine::reap_orphans`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OrphanSweep {
    /// The cloud ids of the resources it terminated.
    pub terminated: Vec<String>,
    /// Resources carrying this state's owner tag that it did not make, or cannot tell it
    /// made: never terminated, only reported.
    pub left_alone: Vec<LeftAlone>,
    /// Backends that could not list their resources, resources that could not be terminated.
    pub errors: Vec<String>,
}

/// A cloud resource the orphan sweep leaves alone, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct LeftAlone {
    /// The backend it is in.
    pub backend: String,
    /// The cloud's id of it.
    pub cloud_id: String,
    /// Why it is not this state's to terminate.
    pub why: String,
}

/// What the orphan sweep does with one resource carrying this state's owner tag.
#[derive(Debug, PartialEq)]
enum Verdict {
    /// It is live, or being provisioned.
    Keep,
    /// It is not this state's to judge (a copy of the state made it, or no attempt this state
    /// recorded did).
    LeaveAlone(&'static str),
    /// This state made it and no longer holds it as live.
    Reap,
}

/// The orphan sweep's judgement of `resource`, whose record in this store is `record`. Only
/// what this state's own recorded attempts made is ever terminated (so a copy of the state
/// directory never reaps the instances of the other copy): a resource whose record is
/// terminated, still `pending` after the grace period (its creation was never recorded), or
/// live with another resource recorded as its own (an attempt whose answer was lost).
fn orphan_verdict(
    resource: &OwnedInstance,
    record: Option<&Instance>,
    state_id: &str,
    in_flight: impl Fn(&Instance) -> bool,
    past_grace: impl Fn(&Instance) -> bool,
) -> Verdict {
    if resource.state_id.as_deref() != Some(state_id) {
        return Verdict::LeaveAlone("another state (a copy of this one) created it");
    }
    let Some(record) = record else {
        return Verdict::LeaveAlone("its instance is unknown to this state");
    };
    let ours = resource
        .attempt_id
        .as_ref()
        .is_some_and(|a| record.attempts.contains(a));
    if !ours {
        return Verdict::LeaveAlone("no creation attempt this state recorded made it");
    }
    if in_flight(record) {
        return Verdict::Keep;
    }
    let reap = match record.status {
        InstanceStatus::Terminated => true,
        InstanceStatus::Pending => past_grace(record),
        _ => record
            .cloud_id
            .as_ref()
            .is_some_and(|id| *id != resource.cloud_id),
    };
    if reap {
        Verdict::Reap
    } else {
        Verdict::Keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_fleets_agree_or_say_why() {
        let run = QueryFilter {
            min_cpu: Some(2.0),
            max_price: Some(3.0),
            spot: None,
            ..QueryFilter::default()
        };
        let fleet = QueryFilter {
            min_cpu: Some(4.0),
            max_cpu: Some(8.0),
            max_price: Some(1.0),
            spot: Some(true),
            ..QueryFilter::default()
        };
        let both = combine(&run, &fleet).unwrap();
        assert_eq!((both.min_cpu, both.max_cpu), (Some(4.0), Some(8.0)));
        assert_eq!((both.max_price, both.spot), (Some(1.0), Some(true)));
        let on_demand = QueryFilter {
            spot: Some(false),
            ..QueryFilter::default()
        };
        assert!(combine(&on_demand, &fleet).is_err());
    }

    fn record(status: InstanceStatus, attempts: &[&str], cloud_id: Option<&str>) -> Instance {
        Instance {
            id: "rec".to_string(),
            name: "f-0".to_string(),
            fleet_id: "f".to_string(),
            backend: "aws".to_string(),
            status,
            host: Default::default(),
            price: 0.0,
            backend_data: serde_json::json!({}),
            created_at_ms: 0,
            address: None,
            session: None,
            status_message: None,
            unreachable: false,
            unreachable_since_ms: None,
            blocks: None,
            containers: false,
            offer: None,
            idle_timeout_secs: None,
            last_job_at_ms: None,
            cloud_id: cloud_id.map(str::to_string),
            attempts: attempts.iter().map(|a| a.to_string()).collect(),
        }
    }

    #[test]
    fn the_orphan_sweep_reaps_only_what_this_states_attempts_made() {
        let resource = |state: &str, attempt: &str, cloud: &str| OwnedInstance {
            cloud_id: cloud.to_string(),
            instance_id: Some("rec".to_string()),
            attempt_id: Some(attempt.to_string()),
            state_id: Some(state.to_string()),
            region: "r".to_string(),
        };
        let judge = |r: &OwnedInstance, rec: Option<&Instance>, flying: bool, old: bool| {
            orphan_verdict(r, rec, "me", |_| flying, |_| old)
        };
        let mine = resource("me", "a1", "i-1");
        let idle = record(InstanceStatus::Idle, &["a1"], Some("i-1"));
        assert_eq!(judge(&mine, Some(&idle), false, true), Verdict::Keep);
        // A copy of the state: its resources, and those of records unknown here, are left.
        let copy = resource("copy", "a1", "i-1");
        let dead = record(InstanceStatus::Terminated, &["a1"], Some("i-1"));
        assert!(matches!(
            judge(&copy, Some(&dead), false, true),
            Verdict::LeaveAlone(_)
        ));
        assert!(matches!(
            judge(&mine, None, false, true),
            Verdict::LeaveAlone(_)
        ));
        let other_attempt = resource("me", "a9", "i-1");
        assert!(matches!(
            judge(&other_attempt, Some(&dead), false, true),
            Verdict::LeaveAlone(_)
        ));
        assert_eq!(judge(&mine, Some(&dead), false, true), Verdict::Reap);
        assert_eq!(judge(&mine, Some(&dead), true, true), Verdict::Keep);
        // Created but never recorded: reaped once the grace period is over.
        let pending = record(InstanceStatus::Pending, &["a1"], None);
        assert_eq!(judge(&mine, Some(&pending), false, false), Verdict::Keep);
        assert_eq!(judge(&mine, Some(&pending), false, true), Verdict::Reap);
        // A lost answer's instance beside the one recorded (an earlier attempt's).
        let lost = resource("me", "a1", "i-0");
        let two = record(InstanceStatus::Idle, &["a1", "a2"], Some("i-1"));
        assert_eq!(judge(&lost, Some(&two), false, true), Verdict::Reap);
    }

    /// A run's tags reach the instance provisioned for it, beside its fleet's.
    #[test]
    fn instances_carry_their_fleets_and_their_runs_tags() {
        let profile = |yaml: &str| {
            let text = format!("type: task\ncommands: [x]\n{yaml}");
            crate::engine::command::common(&crate::config::parse(&text, "t.yml").unwrap())
                .profile
                .clone()
        };
        let fleet = profile("tags: {team: ml, cost: shared}\n");
        let run = profile("tags: {cost: exp-7, owner: me}\n");
        let tags =
            |map: BTreeMap<String, String>| -> Vec<(String, String)> { map.into_iter().collect() };
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(
            tags(instance_tags(&fleet, None)),
            [pair("cost", "shared"), pair("team", "ml")]
        );
        assert_eq!(
            tags(instance_tags(&fleet, Some(&run))),
            [
                pair("cost", "exp-7"),
                pair("owner", "me"),
                pair("team", "ml")
            ]
        );
        assert_eq!(tags(instance_tags(&profile(""), Some(&profile("")))), []);
    }

    #[test]
    fn idle_time_takes_the_smaller_finite_setting() {
        use crate::config::duration::Duration;
        let with = |secs: Option<i64>| ProfileParams {
            idle_duration: secs.map(Duration),
            ..ProfileParams::default()
        };
        assert_eq!(idle_timeout(&[&with(None)], 300), Some(300));
        assert_eq!(
            idle_timeout(&[&with(Some(60)), &with(Some(600))], 300),
            Some(60)
        );
        assert_eq!(
            idle_timeout(&[&with(Some(-1)), &with(Some(600))], 300),
            Some(600)
        );
        assert_eq!(idle_timeout(&[&with(Some(-1))], 300), None);
    }
}
