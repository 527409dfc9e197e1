//! The persisted records of the engine.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::status::{FleetStatus, InstanceStatus, JobStatus, RunStatus, VolumeStatus};
use crate::agent::HostInfo;
use crate::config::Configuration;

/// What the client sent with a configuration: everything the engine needs to (re)start the
/// run later, from any process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    /// The validated configuration.
    pub configuration: RawJson,
    /// Where the configuration came from, for humans.
    pub configuration_path: Option<String>,
    /// The directory the run was applied from (the default working directory of local jobs).
    pub client_dir: String,
    /// Environment variables captured from the client when the run was applied: the
    /// configuration's bare `env` names and the basics of a local session (`PATH`, `HOME`, …).
    pub client_env: BTreeMap<String, String>,
    /// The group the run belongs to (the trials of a sweep), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<RunGroup>,
    /// The archives its jobs start from (its `repos:` and `files:`, packed by the client and
    /// kept by the engine: see [`crate::archive`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub archives: Vec<crate::archive::Archive>,
    /// What it saves and what it starts from of other runs' (`artifacts`, `depends-on`).
    #[serde(default, skip_serializing_if = "RunArtifacts::is_empty")]
    pub artifacts: RunArtifacts,
}

/// A run's part in artifacts: the workflow it runs (tags of its runs are that workflow's),
/// the paths it saves, and the archives of the tagged artifacts it depends on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunArtifacts {
    /// The workflow of `.dstack/workflows.yaml` it runs, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// The paths saved as its artifacts (relative to the working directory).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Archives of the tags it depends on, unpacked into its working directory before it
    /// starts (after its repo and files).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dependencies: Vec<crate::archive::Archive>,
}

impl RunArtifacts {
    /// Whether the run has no part in artifacts.
    pub fn is_empty(&self) -> bool {
        *self == RunArtifacts::default()
    }
}

/// Runs submitted together (the trials of a sweep) that share a limit on how many of them
/// hold resources at once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunGroup {
    /// The group id (shared by every run of the group).
    pub id: String,
    /// At most this many runs of the group are placed at once; `None`: no limit.
    pub max_parallel: Option<u32>,
}

impl RunSpec {
    /// The configuration, parsed back from its stored JSON.
    pub fn configuration(&self) -> Result<Configuration, crate::config::ConfigErrors> {
        crate::config::parse_value(&self.configuration.value(), "<stored run spec>")
    }
}

/// A JSON document kept as its text: a run's record is read and written on every status
/// change, and its configuration is only parsed when it is needed (once per run and process).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RawJson(Box<serde_json::value::RawValue>);

impl RawJson {
    /// The document of `value`.
    pub fn from_value(value: &serde_json::Value) -> RawJson {
        // A `Value` always serializes into valid JSON.
        let text = serde_json::to_string(value).unwrap_or_else(|_| "null".to_string());
        RawJson(
            serde_json::value::RawValue::from_string(text)
                .unwrap_or_else(|_| serde_json::value::RawValue::NULL.to_owned()),
        )
    }

    /// The document, parsed.
    pub fn value(&self) -> serde_json::Value {
        // Valid JSON by construction.
        serde_json::from_str(self.0.get()).unwrap_or(serde_json::Value::Null)
    }

    /// The document's text.
    pub fn get(&self) -> &str {
        self.0.get()
    }
}

/// Documents are equal when their texts are (as written by [`RawJson::from_value`]).
impl PartialEq for RawJson {
    fn eq(&self, other: &RawJson) -> bool {
        self.get() == other.get()
    }
}

/// A run: one applied task, service or dev environment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// UUID.
    pub id: String,
    /// Unique among active runs.
    pub name: String,
    /// Status.
    pub status: RunStatus,
    /// Why it ended (a `RunTerminationReason` string).
    pub termination_reason: Option<String>,
    /// A human explanation of the status.
    pub status_message: Option<String>,
    /// What to run.
    pub spec: RunSpec,
    /// When it was applied (Unix ms).
    pub submitted_at_ms: u64,
    /// How many times it went back to `pending` for a retry.
    pub resubmission_attempt: u32,
    /// When a `pending` run is resubmitted (Unix ms).
    pub next_attempt_at_ms: Option<u64>,
    /// A scheduled run (`schedule:`): when it is next due to start (Unix ms); once started,
    /// when that start was due (the window of its no-capacity retries runs from there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_triggered_at_ms: Option<u64>,
    /// How many times its configuration was updated in place (a service's rolling
    /// deployment): replicas of an older deployment are replaced by new ones.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub deployment_num: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Run {
    /// A run named `r` in `status` with nothing applied (no configuration, no times): what
    /// unit tests build jobs of.
    #[cfg(test)]
    pub(crate) fn for_tests(status: RunStatus) -> Run {
        Run {
            id: "r".into(),
            name: "r".into(),
            status,
            termination_reason: None,
            status_message: None,
            spec: RunSpec {
                configuration: RawJson::from_value(&serde_json::Value::Null),
                configuration_path: None,
                client_dir: "/".into(),
                client_env: Default::default(),
                group: None,
                archives: Vec::new(),
                artifacts: Default::default(),
            },
            submitted_at_ms: 0,
            resubmission_attempt: 0,
            next_attempt_at_ms: None,
            next_triggered_at_ms: None,
            deployment_num: 0,
        }
    }

    /// When a scheduled run that waits `pending` for its next start is due to start (Unix
    /// ms); `None` for any other run, a scheduled run waiting for a retry included.
    pub fn scheduled_start_ms(&self) -> Option<u64> {
        if self.status == RunStatus::Pending && self.next_attempt_at_ms.is_none() {
            self.next_triggered_at_ms
        } else {
            None
        }
    }
}

/// Resources set aside for a job on its instance.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Reservation {
    /// vCPUs.
    pub cpus: u32,
    /// RAM in MiB.
    pub memory_mib: u64,
    /// GPU indices on the instance.
    pub gpus: Vec<u32>,
}

/// One submission of one job of a run (a retry is a new submission).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Submission UUID (what the agent knows the job by).
    pub id: String,
    /// The run.
    pub run_id: String,
    /// The run name.
    pub run_name: String,
    /// Node rank within the replica.
    pub job_num: u32,
    /// Replica number (services).
    pub replica_num: u32,
    /// 0 for the first submission, +1 per retry.
    pub submission_num: u32,
    /// Status.
    pub status: JobStatus,
    /// A `JobTerminationReason` string.
    pub termination_reason: Option<String>,
    /// A human explanation of the reason.
    pub termination_message: Option<String>,
    /// The exit status of the job's commands.
    pub exit_status: Option<i32>,
    /// The instance it was assigned to.
    pub instance_id: Option<String>,
    /// Resources set aside on that instance.
    pub reservation: Option<Reservation>,
    /// The running job of the same instance this one is queued behind: it starts when that
    /// one ends and takes over (part of) its reservation, which until then counts only once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_job: Option<String>,
    /// When it was submitted (Unix ms).
    pub submitted_at_ms: u64,
    /// When it started running (Unix ms).
    pub started_at_ms: Option<u64>,
    /// When it finished (Unix ms).
    pub finished_at_ms: Option<u64>,
    /// The run's deployment it was submitted for (see [`Run::deployment_num`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub deployment_num: u32,
}

impl Job {
    /// A new `submitted` submission (`submission_num`) of job `job_num` of a run's first
    /// replica (see [`Job::of_slot`] for others).
    pub fn submission(run: &Run, job_num: u32, submission_num: u32) -> Job {
        Job::of_slot(run, (0, job_num), submission_num)
    }

    /// A new `submitted` submission (`submission_num`) of the job in `slot`
    /// (`(replica_num, job_num)`) of a run.
    pub fn of_slot(run: &Run, slot: (u32, u32), submission_num: u32) -> Job {
        let (replica_num, job_num) = slot;
        Job {
            // Time-ordered (UUID v7, ordered by creation within a process): jobs submitted in
            // the same millisecond (a sweep's trials) wait in the order they were applied.
            id: uuid::Uuid::now_v7().to_string(),
            run_id: run.id.clone(),
            run_name: run.name.clone(),
            job_num,
            replica_num,
            submission_num,
            status: JobStatus::Submitted,
            termination_reason: None,
            termination_message: None,
            exit_status: None,
            instance_id: None,
            reservation: None,
            after_job: None,
            submitted_at_ms: super::now_ms(),
            started_at_ms: None,
            finished_at_ms: None,
            deployment_num: run.deployment_num,
        }
    }

    /// Which job of the run this is a submission of: `(replica_num, job_num)` (a retry is a
    /// new submission of the same slot).
    pub fn slot(&self) -> (u32, u32) {
        (self.replica_num, self.job_num)
    }

    /// `<run>-<job_num>-<replica_num>`, as dstack names jobs.
    pub fn name(&self) -> String {
        format!("{}-{}-{}", self.run_name, self.job_num, self.replica_num)
    }
}

/// A host that can run jobs: this machine, an SSH host or a cloud VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// UUID.
    pub id: String,
    /// `<fleet>-<num>`.
    pub name: String,
    /// The fleet it belongs to.
    pub fleet_id: String,
    /// The backend that provides it (`local`, `ssh`, `aws`, …).
    pub backend: String,
    /// Status.
    pub status: InstanceStatus,
    /// Its resources, as its agent reports them.
    pub host: HostInfo,
    /// Price per hour.
    pub price: f64,
    /// Backend-specific data (e.g. the agent socket of the local backend).
    pub backend_data: serde_json::Value,
    /// When it was created (Unix ms).
    pub created_at_ms: u64,
    /// The address other nodes reach it at; `None`: this machine (`127.0.0.1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The login session jobs get on a remote host; `None`: this machine, where jobs get the
    /// client's session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<HostSession>,
    /// Why it is in its status (e.g. why a host failed to join its fleet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_message: Option<String>,
    /// The equal blocks jobs take whole (SSH fleet hosts; `blocks:`); `None`: jobs share the
    /// host by their resource minimums (this machine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks: Option<u32>,
    /// Its agent has a container engine: `image:` jobs may run there.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub containers: bool,
    /// Its agent cannot be reached now: no new jobs go there until it answers again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unreachable: bool,
    /// Since when its agent could not be reached (Unix ms), while `unreachable`: a cloud
    /// instance unreachable for `EngineOptions::termination_deadline` is terminated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreachable_since_ms: Option<u64>,
    /// The offer a cloud instance was created from (instance type, region, spot, price).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offer: Option<crate::offers::Offer>,
    /// Terminate it after this long idle (`idle_duration`); `None`: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_secs: Option<u64>,
    /// When a job last held it (Unix ms), for idle reaping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_job_at_ms: Option<u64>,
    /// The cloud's id of the resource a backend created for it, recorded as soon as known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_id: Option<String>,
    /// The ids of the creation attempts sent for it, each recorded before it was sent (and
    /// tagged on what it made): the orphan sweep terminates only what these attempts made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<String>,
}

impl Instance {
    /// Its number in its fleet: the number its name ends with (`gpu-fleet-3` → 3; 0 when
    /// there is none), dstack's `instance_num`.
    pub fn num(&self) -> u64 {
        instance_num(&self.name)
    }

    /// An idle instance `name` of `backend` in fleet `f` (2 CPUs, 1 GiB of memory and disk,
    /// free): what unit tests build on.
    #[cfg(test)]
    pub(crate) fn for_tests(name: &str, backend: &str) -> Instance {
        serde_json::from_value(serde_json::json!({
            "id": format!("id-{name}"), "name": name, "fleet_id": "f", "backend": backend,
            "status": "idle",
            "host": {"cpus": 2, "memory_bytes": 1_u64 << 30, "disk_bytes": 1_u64 << 30,
                     "gpus": [], "cpu_arch": "x86"},
            "price": 0.0, "backend_data": null, "created_at_ms": 0
        }))
        .expect("a valid instance")
    }
}

/// The number at the end of an instance name (`gpu-fleet-3` → 3; 0 when there is none).
pub fn instance_num(name: &str) -> u64 {
    name.rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The session of the user the agent runs as on a remote host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSession {
    /// The user's home directory: where jobs start unless they set `working_dir`.
    pub home: String,
    /// Session variables jobs get there (`HOME`, `PATH`, `USER`, `LANG`, …).
    pub env: BTreeMap<String, String>,
}

/// A network volume (`type: volume`): a cloud disk that runs mount.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Volume {
    /// UUID.
    pub id: String,
    /// Unique name among volumes not deleted.
    pub name: String,
    /// Status.
    pub status: VolumeStatus,
    /// Why it is in its status (e.g. why creating it failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_message: Option<String>,
    /// The volume configuration it was applied from.
    pub configuration: serde_json::Value,
    /// The backend that holds it.
    pub backend: String,
    /// Its region.
    pub region: String,
    /// The cloud's id of the disk, once created or registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_id: Option<String>,
    /// Its availability zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub availability_zone: Option<String>,
    /// Its size in GB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_gb: Option<u64>,
    /// Registered (`volume_id:`) rather than created: deleting it only forgets it.
    #[serde(default)]
    pub external: bool,
    /// The instances it is attached to, with the device name it got there.
    #[serde(default)]
    pub attachments: Vec<VolumeAttachment>,
    /// When it was recorded (Unix ms).
    pub created_at_ms: u64,
    /// When it was last detached (Unix ms): with `created_at_ms`, the start of its idle time
    /// for `auto_cleanup_duration`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at_ms: Option<u64>,
}

/// One attachment of a volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeAttachment {
    /// The instance.
    pub instance_id: String,
    /// The device the volume appears as there (`/dev/sdf`).
    pub device_name: String,
}

/// A fleet: a named group of instances.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fleet {
    /// UUID.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Status.
    pub status: FleetStatus,
    /// The fleet configuration, when it was applied from one (the implicit local fleet has none).
    pub configuration: Option<serde_json::Value>,
    /// When it was created (Unix ms).
    pub created_at_ms: u64,
    /// Why it is in its status (e.g. why restoring its `nodes.min` stopped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_message: Option<String>,
    /// The attempts so far to bring a backend fleet back to its `nodes.min` (none while it
    /// has them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consolidation: Option<Consolidation>,
}

/// The attempts in a row to bring a backend fleet back to its `nodes.min` (dstack's
/// `consolidation_attempt` and `last_consolidated_at`), kept in the fleet's record so that a
/// restarted server goes on with the same count and delays.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consolidation {
    /// How many provisioning rounds were made since the fleet fell short.
    pub attempts: u32,
    /// When the last one started (Unix ms).
    pub last_attempt_at_ms: u64,
    /// When the first one started: since when the fleet is short (Unix ms).
    pub short_since_ms: u64,
    /// No more attempts are made (their count or `retry.duration` ran out) until the fleet
    /// is applied again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopped: bool,
}

impl Fleet {
    /// Whether the engine is still trying to bring the fleet back to its `nodes.min`.
    pub fn restoring(&self) -> bool {
        self.status == FleetStatus::Active
            && self.consolidation.as_ref().is_some_and(|c| !c.stopped)
    }
}
