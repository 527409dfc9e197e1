//! Runs, jobs and plans as dstack's `Run`, `Job`, `JobSpec`, `JobSubmission` and `RunPlan`.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use super::{backend_type, dstack_id, iso_time, Owner};
use crate::agent::HostInfo;
use crate::engine::{ApplyOptions, RunPlan};
use crate::model::{
    Instance, Job, JobStatus, JobTerminationReason, Reservation, Run, RunStatus,
    RunTerminationReason,
};
use crate::offers::{Availability, Offer};

/// The id dstack's clients know a job submission by (`JobSubmission.id`, the
/// `job_submission_id` of `logs/poll`): [`dstack_id`] of the job's id.
pub fn job_submission_id(job: &Job) -> String {
    dstack_id(&job.id)
}

/// dstack's `RunSpec` of a recorded run.
pub fn run_spec(run: &Run) -> Value {
    spec(
        Some(&run.name),
        run.spec.configuration_path.as_deref(),
        run.spec.configuration.value(),
    )
}

fn spec(run_name: Option<&str>, configuration_path: Option<&str>, configuration: Value) -> Value {
    json!({
        "run_name": run_name,
        "repo_data": {"repo_type": "virtual"},
        "configuration_path": configuration_path,
        "configuration": configuration,
    })
}

/// dstack's `Run` of a run with its jobs (every submission of every job, in any order) and the
/// instances they ran on (others are ignored; a job whose instance is missing has no
/// `job_provisioning_data`).
///
/// Statuses and termination reasons are dstack's own values; status messages and errors are
/// derived as dstack's server derives them (`exited (1)`, `no capacity`, `retrying`, …). `cost`
/// is the instances' hourly price times the time the jobs ran. dstack's `next_triggered_at`
/// (scheduled runs) is not written: runs record no next trigger yet.
pub fn run(owner: &Owner<'_>, run: &Run, jobs: &[Job], instances: &[Instance]) -> Value {
    let configuration = run.spec.configuration.value();
    let mut by_job: BTreeMap<(u32, u32), Vec<&Job>> = BTreeMap::new();
    for job in jobs {
        by_job
            .entry((job.replica_num, job.job_num))
            .or_default()
            .push(job);
    }
    let last_processed = jobs
        .iter()
        .map(last_processed_ms)
        .fold(run.submitted_at_ms, u64::max);
    let mut cost = 0.0;
    let mut latest = Value::Null;
    let mut dstack_jobs = Vec::with_capacity(by_job.len());
    let jobs_per_replica = jobs_per_replica(&configuration);
    for ((replica_num, job_num), mut submissions) in by_job {
        submissions.sort_by_key(|j| j.submission_num);
        let rendered: Vec<Value> = submissions
            .iter()
            .map(|job| {
                let instance = job
                    .instance_id
                    .as_deref()
                    .and_then(|id| instances.iter().find(|i| i.id == id));
                cost += instance.map_or(0.0, |i| i.price * hours_run(job, last_processed));
                submission(job, instance, username(instance, &run.spec.client_env))
            })
            .collect();
        if latest.is_null() {
            latest = rendered.last().cloned().unwrap_or(Value::Null);
        }
        dstack_jobs.push(json!({
            "job_spec": job_spec(
                &configuration,
                &run.name,
                job_num,
                replica_num,
                jobs_per_replica,
                &run.spec.client_env,
            ),
            "job_submissions": rendered,
        }));
    }
    let reason = run
        .termination_reason
        .as_deref()
        .and_then(RunTerminationReason::parse);
    json!({
        "id": dstack_id(&run.id),
        "project_name": owner.project_name,
        "user": owner.user,
        "submitted_at": iso_time(run.submitted_at_ms),
        "last_processed_at": iso_time(last_processed),
        "status": run.status.as_str(),
        "status_message": run_status_message(run, &configuration, jobs),
        "termination_reason": run.termination_reason,
        "run_spec": spec(
            Some(&run.name),
            run.spec.configuration_path.as_deref(),
            configuration,
        ),
        "jobs": dstack_jobs,
        "latest_job_submission": latest,
        "cost": cost,
        "error": reason.and_then(RunTerminationReason::error),
        "next_triggered_at": run.scheduled_start_ms().map(iso_time),
    })
}

/// dstack's `RunPlan` of a plan, for a run applied with `options` (its name and configuration
/// path). `current_resource` is dstack's `Run` of the active run of that name, if any; the
/// action is always `create` (this project updates no run in place). Every job of the run
/// gets the same offers, as every node must fit one.
pub fn run_plan(
    owner: &Owner<'_>,
    plan: &RunPlan,
    options: &ApplyOptions,
    current_resource: Option<Value>,
) -> Value {
    let configuration = plan.configuration.to_json();
    let run_name = options
        .name
        .as_deref()
        .or_else(|| plan.configuration.name());
    let run_spec = spec(
        run_name,
        options.configuration_path.as_deref(),
        configuration.clone(),
    );
    let offers: Vec<Value> = plan.offers.iter().map(offer).collect();
    let max_price = plan.offers.iter().map(|o| o.price).reduce(f64::max);
    let jobs_per_replica = jobs_per_replica(&configuration);
    let job_plans: Vec<Value> = (0..jobs_per_replica)
        .map(|job_num| {
            json!({
                "job_spec": job_spec(
                    &configuration,
                    // dstack names the jobs of a plan without a run name so.
                    run_name.unwrap_or("dry-run"),
                    job_num,
                    0,
                    jobs_per_replica,
                    &BTreeMap::new(),
                ),
                "offers": offers,
                "total_offers": plan.total_offers,
                "max_price": max_price,
            })
        })
        .collect();
    json!({
        "project_name": owner.project_name,
        "user": owner.user,
        "run_spec": run_spec,
        "effective_run_spec": run_spec,
        "job_plans": job_plans,
        "current_resource": current_resource,
        "action": "create",
    })
}

/// dstack's `InstanceOfferWithAvailability` of an offer.
fn offer(offer: &Offer) -> Value {
    let availability = match offer.availability {
        Availability::Idle => "idle",
        Availability::Busy => "busy",
        Availability::Available => "available",
        Availability::NotAvailable => "not_available",
    };
    let backend_data = match &offer.backend_data {
        Value::Object(data) => Value::Object(data.clone()),
        _ => Value::Object(Map::new()),
    };
    json!({
        "backend": backend_type(&offer.backend),
        "instance": {
            "name": offer.instance_type,
            "resources": resources(&offer.resources, offer.spot),
        },
        "region": offer.region,
        "price": offer.price,
        "backend_data": backend_data,
        "availability": availability,
        "availability_zones": offer.availability_zones,
    })
}

/// dstack's `Resources` of a host.
pub(super) fn resources(host: &HostInfo, spot: bool) -> Value {
    const MIB: u64 = 1024 * 1024;
    let gpus: Vec<Value> = host
        .gpus
        .iter()
        .map(|g| {
            let mut gpu = json!({"name": g.name, "memory_mib": g.memory_mib});
            // gpuhunt's vendors; another name would fail dstack's parse (it means NVIDIA).
            let vendor = g.vendor.to_ascii_lowercase();
            if ["nvidia", "amd", "google", "intel", "tenstorrent"].contains(&vendor.as_str()) {
                gpu["vendor"] = Value::String(vendor);
            }
            gpu
        })
        .collect();
    let cpu_arch = matches!(host.cpu_arch.as_str(), "x86" | "arm").then_some(&host.cpu_arch);
    json!({
        "cpus": host.cpus,
        "memory_mib": host.memory_bytes / MIB,
        "gpus": gpus,
        "spot": spot,
        "disk": {"size_mib": host.disk_bytes / MIB},
        "cpu_arch": cpu_arch,
    })
}

/// The region an instance is in: its offer's, or `local`/`remote` for hosts (as plans say).
pub(super) fn region(instance: &Instance) -> &str {
    match &instance.offer {
        Some(offer) => &offer.region,
        None if instance.backend == "local" => "local",
        None => "remote",
    }
}

/// dstack's `InstanceType` of an instance: its offer's type, or the backend's name for hosts
/// (dstack names SSH hosts' type `ssh`).
pub(super) fn instance_type(instance: &Instance) -> Value {
    let (name, spot) = match &instance.offer {
        Some(offer) => (offer.instance_type.as_str(), offer.spot),
        None => (instance.backend.as_str(), false),
    };
    json!({"name": name, "resources": resources(&instance.host, spot)})
}

/// The user jobs run as on an instance: its login session's, or (this machine) the client's.
fn username<'a>(
    instance: Option<&'a Instance>,
    client_env: &'a BTreeMap<String, String>,
) -> &'a str {
    instance
        .and_then(|i| i.session.as_ref())
        .map_or(client_env, |s| &s.env)
        .get("USER")
        .map_or("root", String::as_str)
}

/// The last time a job's record changed.
fn last_processed_ms(job: &Job) -> u64 {
    [job.started_at_ms, job.finished_at_ms]
        .into_iter()
        .flatten()
        .fold(job.submitted_at_ms, u64::max)
}

/// How long a job ran, in hours (until `now_ms` if it still runs).
fn hours_run(job: &Job, now_ms: u64) -> f64 {
    let Some(started) = job.started_at_ms else {
        return 0.0;
    };
    let end = job.finished_at_ms.unwrap_or(now_ms);
    end.saturating_sub(started) as f64 / 3_600_000.0
}

/// dstack's `JobSubmission` of a job.
fn submission(job: &Job, instance: Option<&Instance>, username: &str) -> Value {
    let reason = job
        .termination_reason
        .as_deref()
        .and_then(JobTerminationReason::parse);
    json!({
        "id": job_submission_id(job),
        "submission_num": job.submission_num,
        "submitted_at": iso_time(job.submitted_at_ms),
        "last_processed_at": iso_time(last_processed_ms(job)),
        "finished_at": job.finished_at_ms.map(iso_time),
        "status": job.status.as_str(),
        "status_message": job_status_message(job, reason),
        "termination_reason": job.termination_reason,
        "termination_reason_message": job.termination_message,
        "exit_status": job.exit_status,
        "job_provisioning_data": instance.map(|i| provisioning_data(i, username)),
        "job_runtime_data": job.reservation.as_ref().map(runtime_data),
        "error": reason.and_then(job_error),
    })
}

/// dstack's `JobProvisioningData` of the instance a job was placed on.
fn provisioning_data(instance: &Instance, username: &str) -> Value {
    let address = instance.address.as_deref();
    let zone = instance
        .offer
        .as_ref()
        .and_then(|o| o.availability_zones.as_ref())
        .and_then(|zones| zones.first());
    json!({
        "backend": backend_type(&instance.backend),
        "instance_type": instance_type(instance),
        "instance_id": instance.cloud_id.as_deref().unwrap_or(&instance.name),
        "hostname": address.unwrap_or("127.0.0.1"),
        "internal_ip": address,
        "region": region(instance),
        "availability_zone": zone,
        "price": instance.price,
        "username": username,
        // Jobs run as host processes (or containers the agent starts), not in a dockerized shim.
        "dockerized": false,
    })
}

/// dstack's `JobRuntimeData` of a job's reservation (`null` CPU or memory: no minimum).
fn runtime_data(reservation: &Reservation) -> Value {
    json!({
        "network_mode": "host",
        "gpu": reservation.gpus.len(),
        "cpu": (reservation.cpus > 0).then_some(reservation.cpus),
        "memory": (reservation.memory_mib > 0).then(|| reservation.memory_mib as f64 / 1024.0),
    })
}

/// A job's status message, as dstack's server words it.
fn job_status_message(job: &Job, reason: Option<JobTerminationReason>) -> String {
    use JobTerminationReason as R;
    match (job.status, reason) {
        (JobStatus::Done, _) => "exited (0)".to_string(),
        (JobStatus::Failed, Some(R::ContainerExitedWithError)) => match job.exit_status {
            Some(code) => format!("exited ({code})"),
            None => "exited (None)".to_string(),
        },
        (JobStatus::Failed, Some(R::FailedToStartDueToNoCapacity)) => "no capacity".to_string(),
        (JobStatus::Failed, Some(R::InterruptedByNoCapacity)) => "interrupted".to_string(),
        (JobStatus::Failed, _) => "error".to_string(),
        (JobStatus::Terminated, Some(R::TerminatedByUser)) => "stopped".to_string(),
        (JobStatus::Terminated, Some(R::AbortedByUser)) => "aborted".to_string(),
        (status, _) => status.as_str().to_string(),
    }
}

/// A job's error, as dstack words it (`None` for reasons its status message already tells).
fn job_error(reason: JobTerminationReason) -> Option<&'static str> {
    use JobTerminationReason as R;
    Some(match reason {
        R::InstanceUnreachable => "instance unreachable",
        R::InstanceAccessRevoked => "instance access revoked",
        R::WaitingInstanceLimitExceeded => "waiting instance limit exceeded",
        R::WaitingRunnerLimitExceeded => "waiting runner limit exceeded",
        R::VolumeError => "volume error",
        R::GatewayError => "gateway error",
        R::ScaledDown => "scaled down",
        R::InactivityDurationExceeded => "inactivity duration exceeded",
        R::TerminatedDueToUtilizationPolicy => "utilization policy",
        R::PortsBindingFailed => "ports binding failed",
        R::CreatingContainerError => "runner error",
        R::ExecutorError => "executor error",
        R::MaxDurationExceeded => "max duration exceeded",
        R::LogQuotaExceeded => "log quota exceeded",
        R::FailedToStartDueToNoCapacity
        | R::InterruptedByNoCapacity
        | R::TerminatedByUser
        | R::DoneByRunner
        | R::AbortedByUser
        | R::TerminatedByServer
        | R::ContainerExitedWithError => return None,
    })
}

/// A run's status message: the recorded one, else as dstack's server words it (`pulling` when
/// every job pulls, `retrying` while a run that retries on `no-capacity` waits after a job
/// found none).
fn run_status_message(run: &Run, configuration: &Value, jobs: &[Job]) -> String {
    if let Some(message) = &run.status_message {
        return message.clone();
    }
    let mut latest: BTreeMap<(u32, u32), &Job> = BTreeMap::new();
    for job in jobs {
        let slot = latest.entry((job.replica_num, job.job_num)).or_insert(job);
        if job.submission_num > slot.submission_num {
            *slot = job;
        }
    }
    if !latest.is_empty() && latest.values().all(|j| j.status == JobStatus::Pulling) {
        return "pulling".to_string();
    }
    if matches!(run.status, RunStatus::Pending | RunStatus::Submitted) {
        let retries_no_capacity = retry(configuration).is_some_and(|r| {
            r["on_events"]
                .as_array()
                .is_some_and(|events| events.iter().any(|e| e == "no-capacity"))
        });
        let found_none = jobs
            .iter()
            .filter(|j| j.termination_reason.is_some())
            .max_by_key(|j| (j.submission_num, j.finished_at_ms))
            .and_then(|j| j.termination_reason.as_deref())
            == Some(JobTerminationReason::FailedToStartDueToNoCapacity.as_str());
        if retries_no_capacity && found_none {
            return "retrying".to_string();
        }
    }
    run.status.as_str().to_string()
}

/// How many jobs (nodes) a replica of the run has: a task's `nodes`, the sum of its `groups`'
/// nodes, or 1.
fn jobs_per_replica(configuration: &Value) -> u32 {
    let count = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
    match configuration["groups"].as_array() {
        Some(groups) => groups
            .iter()
            .map(|g| count(&g["nodes"]).unwrap_or(1))
            .fold(0u32, u32::saturating_add)
            .max(1),
        None => count(&configuration["nodes"]).unwrap_or(1).max(1),
    }
}

/// The node group job `job_num` belongs to: (group index, group, index within the group).
fn node_group(configuration: &Value, job_num: u32) -> Option<(usize, &Value, u32)> {
    let mut first = 0u32;
    for (index, group) in configuration["groups"].as_array()?.iter().enumerate() {
        let nodes = group["nodes"]
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(1);
        if job_num < first.saturating_add(nodes) {
            return Some((index, group, job_num - first));
        }
        first = first.saturating_add(nodes);
    }
    None
}

/// The strings of a JSON list (none when it is not one).
fn strings(value: &Value) -> impl Iterator<Item = String> + '_ {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_string))
}

/// dstack's `Retry` (`{on_events, duration}`) of a configuration's `retry`, if it retries.
fn retry(configuration: &Value) -> Option<Value> {
    const ALL_EVENTS: [&str; 3] = ["no-capacity", "interruption", "error"];
    const DEFAULT_DURATION: i64 = 3600;
    match &configuration["retry"] {
        Value::Bool(true) => Some(json!({"on_events": ALL_EVENTS, "duration": DEFAULT_DURATION})),
        Value::Object(policy) => Some(json!({
            "on_events": policy.get("on_events").cloned().unwrap_or_else(|| json!(ALL_EVENTS)),
            "duration": policy
                .get("duration")
                .and_then(Value::as_i64)
                .unwrap_or(DEFAULT_DURATION),
        })),
        _ => None,
    }
}

/// dstack's `JobSpec` of job `job_num` of replica `replica_num`, from the run's configuration
/// (normalized JSON). Bare `env` names take the client's value captured at apply.
fn job_spec(
    configuration: &Value,
    run_name: &str,
    job_num: u32,
    replica_num: u32,
    jobs_per_replica: u32,
    client_env: &BTreeMap<String, String>,
) -> Value {
    let c = configuration;
    let group = node_group(c, job_num);
    let own = match c["type"].as_str() {
        Some("dev-environment") => &c["init"],
        _ => group.map_or(&c["commands"], |(_, g, _)| &g["commands"]),
    };
    let commands: Vec<String> = strings(&c["setup"]).chain(strings(own)).collect();
    let env: Map<String, Value> = c["env"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(name, value)| match value {
            Value::String(_) => Some((name.clone(), value.clone())),
            _ => client_env
                .get(name)
                .map(|v| (name.clone(), Value::String(v.clone()))),
        })
        .collect();
    let resources = group.map_or(&c["resources"], |(_, g, _)| &g["resources"]);
    let spot = match c["spot_policy"].as_str() {
        Some("spot") => Some(true),
        Some("auto") => None,
        _ => Some(false),
    };
    let mut spec = json!({
        "replica_num": replica_num,
        "job_num": job_num,
        "job_name": format!("{run_name}-{job_num}-{replica_num}"),
        "jobs_per_replica": jobs_per_replica,
        "commands": commands,
        "env": env,
        "home_dir": c["home_dir"],
        "image_name": c["image"].as_str().unwrap_or_default(),
        "privileged": c["privileged"].as_bool().unwrap_or(false),
        "max_duration": c["max_duration"].as_i64(),
        "stop_duration": c["stop_duration"].as_i64(),
        "requirements": {
            "resources": if resources.is_object() { resources.clone() } else { json!({}) },
            "max_price": c["max_price"],
            "spot": spot,
        },
        "retry": retry(c),
        "working_dir": c["working_dir"],
        "repo_data": {"repo_type": "virtual"},
    });
    if c["utilization_policy"].is_object() {
        spec["utilization_policy"] = c["utilization_policy"].clone();
    }
    if let Some((index, g, within)) = group {
        spec["node_group_index"] = json!(index);
        spec["node_group_name"] = g["name"].clone();
        spec["node_group_job_index"] = json!(within);
    }
    spec
}
