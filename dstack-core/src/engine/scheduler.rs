//! Placement: puts `submitted` jobs on instances with room for them.
//!
//! A task that fits nowhere now may be queued behind a running task whose reservation covers
//! it (a *follower*: [`crate::model::Job::after_job`]): the agent starts it the moment that
//! task ends, without waiting for this process to notice. Tasks queue one behind the other,
//! as deep as `queues` decides from how short the instance's tasks are, so that this process
//! has that many tasks' time to queue the next; a queue is refilled several tasks at once.
//! A follower's reservation lies within its leader's and counts only once the leader has
//! ended, so nothing is over-committed. The last follower of a queue is taken back and placed
//! elsewhere when room frees up there first (then the one before it, and so on).
//!
//! A pass woken by an event (a run submitted, a job started or ended) looks at the
//! [`EVENT_WINDOW`] oldest waiting jobs: such a pass mostly places one job, and the jobs
//! further back are mostly more of the same demand (a sweep's trials), found no room for
//! again. The periodic pass (every sweep period) looks at [`BACKFILL_WINDOW`] of them, so
//! that jobs further back that fit where those ahead of them do not are placed, and those
//! that can never fit fail, within a period. (Slurm splits its scheduling the same way: a
//! quick pass on every event, a deep backfill pass every so often.) An event pass that placed
//! jobs with its whole window and found room for every demand in it runs again at once, so
//! that freed capacity is filled however far it reaches.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::provision::ForJob;
use super::{jobs, queues, Inner};
use crate::config::Configuration;
use crate::model::{Fleet, Instance, InstanceStatus, JobStatus, JobTerminationReason, Reservation};
use crate::offers::{mismatch, reserve, reserve_blocks};
use crate::store::{Holding, Placement, Placing, WaitingJob};

/// How many waiting jobs a pass woken by an event looks at (the oldest first).
const EVENT_WINDOW: usize = 16;

/// How many waiting jobs the periodic pass looks at (the oldest first).
const BACKFILL_WINDOW: usize = 1024;

/// The configurations of the single-node jobs the last placement pass found no room for,
/// valid while the capacity epoch it started at is current: a new run with the same demand
/// (see [`same_demand`]) cannot be placed either, so it waits without waking the scheduler
/// (what frees capacity wakes it).
#[derive(Default)]
pub(crate) struct Blocked {
    epoch: u64,
    demands: Vec<Arc<Configuration>>,
    /// How many queued tasks may start before a queue runs short (see `queues::refill_below`).
    starts_to_refill: usize,
}

impl Inner {
    /// Wakes the scheduler after a change that may free or add capacity (or submit a job).
    pub(crate) fn wake_scheduler(&self) {
        self.capacity_epoch.fetch_add(1, Ordering::SeqCst);
        self.schedule.notify_one();
    }

    /// Wakes the scheduler for a newly submitted run, unless the last pass found no room for
    /// the same demand and the capacity has not changed since.
    pub(crate) fn wake_for_new_run(&self, config: &Configuration) {
        let blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        let waits = blocked.epoch == self.capacity_epoch.load(Ordering::SeqCst)
            && blocked.demands.iter().any(|d| same_demand(d, config));
        drop(blocked);
        if !waits {
            self.schedule.notify_one();
        }
    }

    /// Wakes the scheduler if the last pass left jobs waiting: a job that has just started
    /// can be followed. A queued job (`queued`) that starts shortens its queue: the scheduler
    /// is woken once a queue may have run short.
    pub(crate) fn wake_if_blocked(&self, queued: bool) {
        let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        if blocked.demands.is_empty() {
            return;
        }
        if queued && blocked.starts_to_refill > 0 {
            blocked.starts_to_refill -= 1;
            return;
        }
        drop(blocked);
        self.wake_scheduler();
    }

    fn set_blocked(&self, blocked: Blocked) {
        *self.blocked.lock().unwrap_or_else(|e| e.into_inner()) = blocked;
    }
}

/// Runs a placement pass whenever woken.
pub(crate) async fn run(inner: Arc<Inner>) {
    loop {
        let notified = inner.schedule.notified();
        pass(&inner).await;
        notified.await;
    }
}

async fn pass(inner: &Arc<Inner>) {
    let epoch = inner.capacity_epoch.load(Ordering::SeqCst);
    inner.set_blocked(Blocked::default());
    let backfill = inner.backfill.swap(false, Ordering::SeqCst);
    let window = if backfill {
        BACKFILL_WINDOW
    } else {
        EVENT_WINDOW
    };
    // Configurations of the single-node jobs this pass found no room for.
    let mut unplaced: Vec<Arc<Configuration>> = Vec::new();
    let Ok(Placing {
        mut holdings,
        mut waiting,
        instances,
        fleets,
    }) = inner.store.placing(window)
    else {
        return;
    };
    let queued = holdings.iter().any(|h| !h.counts(&holdings));
    if waiting.is_empty() && !queued {
        return;
    }
    let mut instances: Vec<Instance> = instances
        .into_iter()
        .filter(|i| {
            matches!(i.status, InstanceStatus::Idle | InstanceStatus::Busy) && !i.unreachable
        })
        .collect();
    // What each instance holds now, kept up to date through the pass: placement is only
    // attempted (in a store transaction that checks again) where the job fits.
    let mut held = held_by_instance(&holdings);
    if queued && take_back(inner, &holdings, &held, &instances, &fleets).await {
        // Taken-back followers wait again (before the jobs submitted after them).
        let (Ok(now_holding), Ok(now_waiting)) =
            (inner.store.holdings(), inner.store.waiting_jobs(window))
        else {
            return;
        };
        holdings = now_holding;
        waiting = now_waiting;
        held = held_by_instance(&holdings);
    }
    // The tasks a task may be queued behind now.
    let mut leaders = leaders(inner, &holdings);
    // Idle instances first, then the cheapest (as dstack orders its pool offers); an instance
    // that gets a job in this pass is busy from then on.
    order(&mut instances, &held);
    // Requirements that did not fit in this pass (per fleet selection): anything at least as
    // large will not either.
    let mut blocked: Vec<(Option<Vec<String>>, Reservation)> = Vec::new();
    // Multi-node runs already handled in this pass (all their jobs at once).
    let mut gangs: Vec<String> = Vec::new();
    // The placements decided in this pass, made in one transaction at its end.
    let mut placements: Vec<Pending> = Vec::new();
    // Where the replicas of each service run are (or go in this pass): one per host.
    let mut replicas: HashSet<(String, String)> = holdings
        .iter()
        .map(|h| (h.run_id.clone(), h.instance_id.clone()))
        .collect();
    let mut placed = 0;
    let whole_window = waiting.len() == window;
    for WaitingJob {
        job_id,
        run_id,
        grouped,
    } in waiting
    {
        // Submitted jobs of a terminating run are finished by the run's termination; the
        // configuration is cached, so most jobs cost no store read here.
        let Ok(definition) = inner.definition_of(&run_id) else {
            continue;
        };
        let config = definition.config.clone();
        // A job whose demand already found no room in this pass finds none either (most of
        // a sweep's waiting jobs end here, at the cost of a comparison).
        if unplaced.iter().any(|c| same_demand(c, &config)) {
            continue;
        }
        if super::command::nodes(&config) > 1 {
            if !gangs.contains(&run_id) {
                if super::gang::place(inner, &run_id, &config, &instances, &fleets).await {
                    placed += 1;
                }
                gangs.push(run_id);
            }
            continue;
        }
        let common = super::command::common(&config);
        let spec = &common.resources;
        let selection = fleet_selection(common);
        let mut candidates = eligible(&instances, &fleets, common);
        // A service's replicas all listen on its port: each needs a host of its own.
        let port = match config.as_ref() {
            Configuration::Service(s) => Some(s.port.container_port),
            _ => None,
        };
        let taken =
            |i: &Instance| port.is_some() && replicas.contains(&(run_id.clone(), i.id.clone()));
        let reasons: Vec<String> = candidates
            .iter()
            .filter_map(|i| match (taken(i), port) {
                (true, Some(port)) => Some(format!(
                    "{}: runs another replica of this service (port {port})",
                    i.name
                )),
                _ => mismatch(spec, &i.host).map(|r| format!("{}: {r}", i.name)),
            })
            .collect();
        let eligible_count = candidates.len();
        candidates.retain(|i| !taken(i));
        if reasons.len() == eligible_count
            && candidates.len() < eligible_count
            && replica_waits(&config, definition.deployment_num)
        {
            // Only replicas of its own service stand in the way, and one may go: a rolling
            // deployment retires an old one, the autoscaler scales down.
            continue;
        }
        if reasons.len() == eligible_count {
            let provisioning = inner.provision_for_job(&job_id, &config).await;
            let why = match provisioning {
                Ok(ForJob::Provisioning) => continue,
                Ok(ForJob::Impossible(why)) => why,
                Err(e) => e.to_string(),
            };
            let message = match (&selection, eligible_count == 0) {
                (Some(names), true) => {
                    format!(
                        "no offers: fleets {} have no ready instances",
                        names.join(", ")
                    )
                }
                (None, true) => {
                    let excluded: Vec<String> = instances
                        .iter()
                        .filter_map(|i| {
                            let fleet = super::pool::fleet_name(&fleets, i);
                            let why = super::pool::mismatch(&common.profile, i, fleet)?;
                            Some(format!("{}: {why}", i.name))
                        })
                        .collect();
                    if excluded.is_empty() {
                        "no offers: no fleet has instances".to_string()
                    } else {
                        format!("no offers: {}", excluded.join("; "))
                    }
                }
                _ => format!("no offers: {}", reasons.join("; ")),
            };
            let message = if why.is_empty() {
                message
            } else {
                format!("{message}; {why}")
            };
            if let Ok(Some(job)) = inner.store.job(&job_id) {
                let reason = JobTerminationReason::FailedToStartDueToNoCapacity;
                jobs::fail(inner, job, reason, message).await;
            }
            continue;
        }
        let Some(want) = candidates.iter().find_map(|i| fit(spec, i, &[], false)) else {
            continue;
        };
        // A requirement at least as large as one that found no room finds none either.
        let no_room = blocked
            .iter()
            .any(|(s, b)| *s == selection && covers(&want, b));
        if no_room && leaders.is_empty() {
            // Waits for room, or for a task to queue behind (a job that starts wakes the
            // scheduler only while demands wait).
            unplaced.push(config.clone());
            continue;
        }
        // A full group is not a lack of room: the job must not block others. (The store
        // counts only placements made: those decided so far are made first.)
        if grouped {
            place(inner, std::mem::take(&mut placements));
            if !inner.store.group_has_room(&run_id).unwrap_or(false) {
                continue;
            }
        }
        if !no_room {
            let room = candidates.iter().find_map(|instance| {
                let holding = held.get(&instance.id).map_or(&[][..], Vec::as_slice);
                fit(spec, instance, holding, false).map(|reservation| (instance, reservation))
            });
            if let Some((instance, reservation)) = room {
                held.entry(instance.id.clone())
                    .or_default()
                    .push(reservation);
                replicas.insert((run_id.clone(), instance.id.clone()));
                placements.push(Pending {
                    job_id,
                    instance: (*instance).clone(),
                    config,
                    leader: None,
                });
                placed += 1;
                order(&mut instances, &held);
                continue;
            }
            // No room now: a backend fleet may provision an instance for it.
            let provisioning = inner.provision_for_job(&job_id, &config).await;
            if let Ok(ForJob::Provisioning) = provisioning {
                continue;
            }
            blocked.push((selection, want));
        }
        // No room anywhere now: queued behind a task that will free room for it, if any.
        match follow(
            inner,
            &config,
            &candidates,
            backfill,
            &mut leaders,
            (&job_id, &run_id),
        ) {
            Some((instance, leader)) => {
                placements.push(Pending {
                    job_id,
                    instance,
                    config,
                    leader: Some(leader),
                });
                placed += 1;
            }
            None => unplaced.push(config.clone()),
        }
    }
    place(inner, placements);
    if whole_window && placed > 0 && unplaced.is_empty() {
        // Room for all it saw: the jobs beyond the window may find room too.
        inner.schedule.notify_one();
    }
    // Each start of a queued task shortens one queue by one: the queue nearest to running
    // short (below its refill mark) decides how many may start before the next pass.
    let starts_to_refill = leaders
        .iter()
        .map(|l| l.depth.saturating_sub(queues::refill_below(l.limit)))
        .min()
        .unwrap_or(0);
    // What the pass left queued on each instance: the depth of each queue's last task.
    let mut queued: HashMap<String, usize> = HashMap::new();
    for leader in &leaders {
        *queued
            .entry(leader.holding.instance_id.clone())
            .or_default() += leader.depth;
    }
    inner.queues.set_queued(&queued);
    inner.set_blocked(Blocked {
        epoch,
        demands: unplaced,
        starts_to_refill,
    });
}

/// Whether a service replica that finds every host taken by replicas of its own service
/// waits for one to go (a rolling deployment, or an autoscaled service) rather than failing.
fn replica_waits(config: &Configuration, deployment_num: u32) -> bool {
    matches!(config, Configuration::Service(s) if deployment_num > 0 || s.scaling.is_some())
}

/// The reservations that count on each instance (see [`Holding::counts`]).
fn held_by_instance(holdings: &[Holding]) -> HashMap<String, Vec<Reservation>> {
    let mut held: HashMap<String, Vec<Reservation>> = HashMap::new();
    for h in holdings.iter().filter(|h| h.counts(holdings)) {
        held.entry(h.instance_id.clone())
            .or_default()
            .push(h.reservation.clone());
    }
    held
}

/// Whether jobs of `config` may follow, and be followed by, other jobs: single-node tasks
/// (services and dev environments do not end by themselves).
fn may_follow(config: &Configuration) -> bool {
    matches!(config, Configuration::Task(_)) && super::command::nodes(config) == 1
}

/// The last task of a queue (a running task or one queued behind it): a task may be queued
/// behind it while its queue is not full.
struct Leader {
    holding: Holding,
    /// How many tasks it is queued behind.
    depth: usize,
    /// What its instance holds besides its queue.
    others: Vec<Reservation>,
    /// How deep its instance's queues are filled (see `queues`).
    limit: usize,
    /// Whether this pass queued it: its queue is filled whatever its depth.
    filling: bool,
}

/// The last tasks of the queues of running tasks that may be followed.
fn leaders(inner: &Inner, holdings: &[Holding]) -> Vec<Leader> {
    holdings
        .iter()
        .filter(|h| {
            // Not one being stopped: the agent may have ended it already, and a job queued
            // behind an ended one starts at once.
            let queued = h.status == JobStatus::Provisioning && !h.counts(holdings);
            h.status == JobStatus::Running || queued
        })
        .filter(|h| !followed(h, holdings))
        .filter(|h| {
            inner
                .configuration_of(&h.run_id)
                .is_ok_and(|c| may_follow(&c))
        })
        .map(|h| Leader {
            holding: h.clone(),
            depth: h.queue(holdings).len() - 1,
            others: besides_queue(h, holdings),
            limit: inner
                .queues
                .depth(&h.instance_id, &h.reservation, inner.options.queue_cover),
            filling: false,
        })
        .collect()
}

/// Whether a job is queued behind `holding`.
fn followed(holding: &Holding, holdings: &[Holding]) -> bool {
    holdings
        .iter()
        .any(|f| f.after_job.as_deref() == Some(holding.job_id.as_str()))
}

/// The leader among `leaders` (on the `candidates`) whose reservation covers job `job_id` of
/// a run of `config`, which fits nowhere now: the job is to be queued behind it (the agent
/// holds it until the leader ends). A queue is extended while it is short (see
/// `queues::refill_below`), or being filled by this pass, or by the periodic (`backfill`)
/// pass, up to the depth of its instance for tasks of the leader's size and of the job's (see
/// `queues`). The job takes the leader's place in `leaders` (its queue, one deeper, is filled
/// first); `None` if no leader can take it.
fn follow(
    inner: &Inner,
    config: &Configuration,
    candidates: &[&Instance],
    backfill: bool,
    leaders: &mut [Leader],
    (job_id, run_id): (&str, &str),
) -> Option<(Instance, Holding)> {
    if !may_follow(config) {
        return None;
    }
    let spec = &super::command::common(config).resources;
    let (leader, instance, reservation) = leaders.iter_mut().find_map(|leader| {
        let extended =
            leader.filling || backfill || leader.depth < queues::refill_below(leader.limit);
        if !extended || leader.depth >= leader.limit {
            return None;
        }
        let instance = candidates
            .iter()
            .find(|i| i.id == leader.holding.instance_id)?;
        let reservation = follower_fit(spec, instance, &leader.holding, &leader.others)?;
        let cover = inner.options.queue_cover;
        let own = inner.queues.depth(&instance.id, &reservation, cover);
        (leader.depth < own).then_some((leader, instance, reservation))
    })?;
    let follower = Holding {
        job_id: job_id.to_string(),
        run_id: run_id.to_string(),
        status: JobStatus::Provisioning,
        after_job: Some(leader.holding.job_id.clone()),
        reservation,
        ..leader.holding.clone()
    };
    let taken = std::mem::replace(&mut leader.holding, follower);
    leader.depth += 1;
    leader.filling = true;
    Some(((*instance).clone(), taken))
}

/// What the instance of `leader` holds besides the leader's queue.
fn besides_queue(leader: &Holding, holdings: &[Holding]) -> Vec<Reservation> {
    let queue = leader.queue(holdings);
    holdings
        .iter()
        .filter(|h| h.instance_id == leader.instance_id && h.counts(holdings))
        .filter(|h| !queue.contains(&h.job_id.as_str()))
        .map(|h| h.reservation.clone())
        .collect()
}

/// Where a job of `spec` fits on `instance` behind `leader`, given what the instance holds
/// besides the leader's queue: within the leader's reservation.
fn follower_fit(
    spec: &crate::config::resources::ResourcesSpec,
    instance: &Instance,
    leader: &Holding,
    held: &[Reservation],
) -> Option<Reservation> {
    fit(spec, instance, held, false).filter(|r| within(r, &leader.reservation))
}

/// A placement a pass has decided on.
struct Pending {
    job_id: String,
    instance: Instance,
    config: Arc<Configuration>,
    /// The job to queue it behind.
    leader: Option<Holding>,
}

/// Makes the placements of a pass in one store transaction (which checks each again) and
/// starts the jobs placed, in order (a follower is submitted after its leader). A placement
/// the store refuses (its run is ending, another process took the room) is left waiting.
fn place(inner: &Arc<Inner>, pending: Vec<Pending>) {
    if pending.is_empty() {
        return;
    }
    let fits: Vec<_> = pending
        .iter()
        .map(|p| {
            let spec = &super::command::common(&p.config).resources;
            move |held: &[Reservation]| match &p.leader {
                Some(leader) => follower_fit(spec, &p.instance, leader, held),
                None => fit(spec, &p.instance, held, false),
            }
        })
        .collect();
    let placements: Vec<Placement<'_>> = pending
        .iter()
        .zip(&fits)
        .map(|(p, fit)| Placement {
            job_id: &p.job_id,
            instance_id: &p.instance.id,
            after: p.leader.as_ref().map(|l| l.job_id.as_str()),
            fit,
        })
        .collect();
    let Ok(assigned) = inner.store.assign_jobs(&placements) else {
        return;
    };
    // The jobs queued one behind the other in this pass are submitted together, in order (the
    // agent refuses a job behind one it does not know).
    let placed = assigned
        .into_iter()
        .zip(&pending)
        .filter_map(|(job, p)| Some((job?, Some(p.instance.clone()))))
        .collect();
    for queue in jobs::in_queues(placed) {
        inner.runtime.spawn(jobs::start_queue(inner.clone(), queue));
    }
}

/// Whether reservation `inner` lies within `outer`.
fn within(inner: &Reservation, outer: &Reservation) -> bool {
    inner.cpus <= outer.cpus
        && inner.memory_mib <= outer.memory_mib
        && inner.gpus.iter().all(|g| outer.gpus.contains(g))
}

/// Takes back the last followers of queues that would fit somewhere now, so that they are
/// placed there instead of waiting; `true` if it took any back.
async fn take_back(
    inner: &Arc<Inner>,
    holdings: &[Holding],
    held: &HashMap<String, Vec<Reservation>>,
    instances: &[Instance],
    fleets: &[Fleet],
) -> bool {
    let mut took = false;
    // Only the last of a queue: the one behind it could otherwise start too early.
    let last = holdings
        .iter()
        .filter(|h| !h.counts(holdings) && !followed(h, holdings));
    for follower in last {
        let Ok(config) = inner.configuration_of(&follower.run_id) else {
            continue;
        };
        let common = super::command::common(&config);
        let room = eligible(instances, fleets, common).into_iter().any(|i| {
            let holding = held.get(&i.id).map_or(&[][..], Vec::as_slice);
            fit(&common.resources, i, holding, false).is_some()
        });
        if room && jobs::take_back(inner, &follower.job_id).await {
            took = true;
        }
    }
    took
}

/// Whether two runs are single-node runs that demand the same: the same resources, profile
/// (fleet selection, and what a backend fleet may provision for them) and need of a
/// container engine. Where one does not fit, neither does the other.
fn same_demand(a: &Configuration, b: &Configuration) -> bool {
    let (x, y) = (super::command::common(a), super::command::common(b));
    super::command::nodes(a) == 1
        && super::command::nodes(b) == 1
        && x.resources == y.resources
        && x.profile == y.profile
        && super::command::needs_containers(x) == super::command::needs_containers(y)
}

/// Idle instances (holding nothing) first, then by price.
fn order(instances: &mut [Instance], held: &HashMap<String, Vec<Reservation>>) {
    if instances.len() < 2 {
        return;
    }
    instances.sort_by(|a, b| {
        let key = |i: &Instance| (held.get(&i.id).is_some_and(|h| !h.is_empty()), i.price);
        key(a)
            .partial_cmp(&key(b))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
}

/// The reservation a job needs on `instance` given what `held` holds there: whole blocks on a
/// block-split host (all of them with `whole`), range minimums otherwise.
pub(crate) fn fit(
    spec: &crate::config::resources::ResourcesSpec,
    instance: &Instance,
    held: &[Reservation],
    whole: bool,
) -> Option<Reservation> {
    match instance.blocks {
        Some(blocks) => reserve_blocks(spec, &instance.host, held, blocks, whole),
        None => reserve(spec, &instance.host, held),
    }
}

/// The fleet names a run is limited to (`fleets:`), if any.
pub(crate) fn fleet_selection(common: &crate::config::run::RunCommon) -> Option<Vec<String>> {
    common
        .profile
        .fleets
        .as_ref()
        .map(|refs| refs.iter().map(|r| r.name.clone()).collect())
}

/// The instances a run may use: all of them, or those of the selected fleets, that its
/// profile allows (see [`super::pool`]); only those with a container engine for `image:`
/// runs.
pub(crate) fn eligible<'a>(
    instances: &'a [Instance],
    fleets: &[Fleet],
    common: &crate::config::run::RunCommon,
) -> Vec<&'a Instance> {
    let selection = fleet_selection(common);
    let containers = super::command::needs_containers(common);
    instances
        .iter()
        .filter(|i| !containers || i.containers)
        .filter(|i| {
            let fleet = super::pool::fleet_name(fleets, i);
            super::pool::mismatch(&common.profile, i, fleet).is_none()
        })
        .filter(|i| {
            selection.as_ref().is_none_or(|names| {
                fleets
                    .iter()
                    .any(|f| f.id == i.fleet_id && names.contains(&f.name))
            })
        })
        .collect()
}

/// The region of an instance as plans show it: its cloud offer's, else `local` for this
/// machine and `remote` for the hosts of SSH fleets (as dstack names theirs).
pub(crate) fn instance_region(instance: &Instance) -> &str {
    match (&instance.offer, instance.backend.as_str()) {
        (Some(offer), _) => &offer.region,
        (None, "local") => "local",
        (None, _) => "remote",
    }
}

/// The instance type of an instance as plans show it: its cloud offer's, else its name.
pub(crate) fn instance_type(instance: &Instance) -> &str {
    instance
        .offer
        .as_ref()
        .map_or(&instance.name, |offer| &offer.instance_type)
}

/// Whether requirement `a` is at least as large as `b` in every dimension.
fn covers(a: &Reservation, b: &Reservation) -> bool {
    a.cpus >= b.cpus && a.memory_mib >= b.memory_mib && a.gpus.len() >= b.gpus.len()
}
