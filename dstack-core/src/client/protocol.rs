//! What clients and `dstack server` exchange: dstack's REST routes (POST with JSON bodies,
//! `Authorization: Bearer <token>`), answered in dstack's shapes, or in this project's own
//! records when the request says `Accept:` [`NATIVE`] (what our clients do: they need every
//! field of a record, dstack's shapes leave some out). Routes dstack has no equivalent for
//! (waiting for a status change, following logs, sweeps in one request, a tunnel to a job's
//! port) are extra, under the same prefixes.
//!
//! | Route (`/api/project/{project}/…` unless absolute) | Body | Native answer |
//! |---|---|---|
//! | `/api/server/get_info` | — | `{server_version}` |
//! | `runs/get_plan` | [`PlanRequest`] | [`PlanAnswer`] |
//! | `runs/apply` | [`ApplyRequest`] | [`Run`] |
//! | `runs/apply_group` (extra) | `[ApplyRequest]` | `[Run]` (all or none) |
//! | `runs/update` (extra) | [`ApplyRequest`] | [`Run`]: an active service updated in place |
//! | `runs/get` | [`RunRef`] | [`Snapshot`]; 400 `resource_not_exists` |
//! | `runs/get_many` (extra) | [`RunIds`] | `[`[`Snapshot`]`]`, those that exist, in order |
//! | `/api/runs/list` | [`ListRequest`] | [`crate::store::RunListing`] |
//! | `/api/events/list` | [`crate::events::EventQuery`] | `[`[`crate::events::Event`]`]` |
//! | `runs/stop` | [`StopRequest`] | `[Run]` |
//! | `runs/watch_group` (extra) | [`GroupRef`] | one `crate::engine::RunChange` a line (NDJSON): each run's status, then each change, until all have finished |
//! | `runs/wait` (extra) | [`WaitRequest`] | [`Run`], once its status is not `status` (or after `timeout_ms`) |
//! | `runs/metrics` (extra) | [`RunRef`] | `[{…}]`, the JSON lines the job wrote |
//! | `runs/replicas` (extra) | [`RunRef`] | `[`[`ReplicaState`]`]`: a service's running replicas as its proxy sees them |
//! | `runs/metrics_many` (extra) | [`RunIds`] | `[[{…}]]`, each run's metrics in order (none for a run gone or unreachable) |
//! | `logs/follow` (extra) | [`LogsRequest`] | the job's raw output, streamed |
//! | `runs/connect` (extra) | [`ConnectRequest`] | `101 Switching Protocols`, then a byte stream to the port |
//! | `runs/ssh` (extra) | [`SshTunnelRequest`] | `101 Switching Protocols`, then one SSH connection to the job's agent (see `dstack_core::agent`) |
//! | `runs/ssh_endpoint` (extra) | [`SshTunnelRequest`] | the job's `crate::agent::SshEndpoint` (host key, user, working directory) |
//! | `fleets/list` | — | `[`[`FleetEntry`]`]` |
//! | `fleets/busy` (extra) | — | `[instance id]`, those whose jobs hold resources now |
//! | `fleets/apply` | [`ConfigurationRequest`] | newline-delimited [`FleetEvent`]s |
//! | `fleets/delete` | [`DeleteRequest`] | [`FleetDeleted`] |
//! | `secrets/list`, `secrets/get`, `secrets/create_or_update`, `secrets/delete` | dstack's bodies | dstack's `Secret` (both dialects) |
//! | `volumes/list` | — | `[Volume]` |
//! | `volumes/create` | [`ConfigurationRequest`] | `Volume` |
//! | `volumes/delete` | [`DeleteRequest`] | `Volume` |
//!
//! Errors are dstack's: a status and `{"detail": [{"code", "msg"}]}` ([`ErrorBody`]).

use serde::{Deserialize, Serialize};

use crate::engine::ApplyOptions;
use crate::model::{Fleet, Instance, Job, Run, RunStatus};
use crate::offers::Offer;

/// The `Accept` value that asks for this project's own records.
pub const NATIVE: &str = "application/x-dstack-rs+json";

/// dstack's route listing events (not under a project).
pub const EVENTS_LIST: &str = "/api/events/list";

/// The header that upgrades `runs/connect` to a byte stream.
pub const TUNNEL: &str = "dstack-rs-tunnel";

/// `runs/get_plan`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlanRequest {
    /// The configuration, normalized (as [`crate::config::Configuration::to_json`]).
    pub configuration: serde_json::Value,
}

/// The answer to `runs/get_plan`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlanAnswer {
    /// The configuration as it will run, normalized.
    pub configuration: serde_json::Value,
    /// Where it can run.
    pub offers: Vec<Offer>,
    /// Why there are no offers.
    pub no_offers_reason: Option<String>,
    /// How many offers there are in all.
    pub total_offers: usize,
}

/// `runs/apply` (and each item of `runs/apply_group`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApplyRequest {
    /// The configuration, normalized.
    pub configuration: serde_json::Value,
    /// How to apply it.
    pub options: ApplyOptions,
}

/// A run by name (the current one) or id.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunRef {
    /// The run name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_name: Option<String>,
    /// The run id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// A run group (`runs/watch_group`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GroupRef {
    /// The group's id (`RunGroup::id`).
    pub group_id: String,
}

/// Runs by id (`runs/get_many`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunIds {
    /// The run ids.
    pub ids: Vec<String>,
}

/// A run with every submission of its jobs and the instances they were placed on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshot {
    /// The run.
    pub run: Run,
    /// Its job submissions.
    pub jobs: Vec<Job>,
    /// Their instances.
    pub instances: Vec<Instance>,
    /// Where the run is published, for a service read through a server (filled in by the
    /// client, which knows the server's URL as it reaches it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<super::ServiceEndpoint>,
}

/// A running replica of a service as the server's proxy sees it (`runs/replicas`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaState {
    /// The replica's job.
    pub job_id: String,
    /// Its replica number.
    pub replica_num: u32,
    /// Whether it receives requests.
    pub ready: bool,
    /// Its probes: `(url, successes in a row, successes needed)`; none when readiness is
    /// the port accepting connections.
    pub probes: Vec<(String, u32, u32)>,
    /// The last failed check, if the last check failed.
    pub error: Option<String>,
}

/// `/api/runs/list`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ListRequest {
    /// Finished runs too (dstack: `only_active: false`).
    #[serde(default)]
    pub all: bool,
    /// dstack's name for the opposite of `all`.
    #[serde(default)]
    pub only_active: Option<bool>,
    /// At most this many runs.
    #[serde(default)]
    pub limit: Option<usize>,
}

/// `runs/stop` (dstack's body).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StopRequest {
    /// The runs, by name.
    #[serde(default)]
    pub runs_names: Vec<String>,
    /// The runs, by id (an extra of this project: a name may be reused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<String>,
    /// Kill at once instead of stopping gracefully.
    #[serde(default)]
    pub abort: bool,
}

/// `runs/wait`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WaitRequest {
    /// The run id.
    pub id: String,
    /// The status the client knows; the answer comes once the run's differs.
    pub status: RunStatus,
    /// Answer with the run as it is after this long at most.
    pub timeout_ms: u64,
}

/// `logs/follow`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogsRequest {
    /// The run id.
    pub id: String,
    /// Which job's output, from when, and whether to follow it.
    #[serde(flatten)]
    pub query: LogQuery,
}

/// Which output of a run to read: the job of a replica and node, from a time on, and
/// whether to keep streaming until the run finishes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LogQuery {
    /// Keep streaming until the run has finished.
    pub follow: bool,
    /// The replica (0 unless a service has several).
    pub replica_num: u32,
    /// The job (node) in the replica (0 unless a task has several nodes).
    pub job_num: u32,
    /// Only output written at this time (Unix ms) or later; all of it when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<u64>,
}

/// `runs/connect`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConnectRequest {
    /// The instance the job runs on.
    pub instance_id: String,
    /// The port on the job's host.
    pub port: u16,
}

/// `runs/ssh`: the job of a running run to open an SSH connection to (what `ssh <run>`'s
/// `ProxyCommand` asks for).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SshTunnelRequest {
    /// The run's name.
    pub run_name: String,
    /// The job (node rank within the replica).
    #[serde(default)]
    pub job_num: u32,
    /// The replica.
    #[serde(default)]
    pub replica_num: u32,
}

/// A configuration (`fleets/apply`, `volumes/create`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConfigurationRequest {
    /// The configuration, normalized.
    pub configuration: serde_json::Value,
}

/// `fleets/delete`, `volumes/delete` (dstack's body, plus `force`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeleteRequest {
    /// What to delete, by name.
    pub names: Vec<String>,
    /// Delete a fleet even while its hosts cannot be reached.
    #[serde(default)]
    pub force: bool,
    /// Of a fleet, delete only these instances (by number).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instance_nums: Vec<u64>,
}

/// A fleet with its instances.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FleetEntry {
    /// The fleet.
    pub fleet: Fleet,
    /// Its instances.
    pub instances: Vec<Instance>,
}

/// One line of the `fleets/apply` answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FleetEvent {
    /// A step of one host's deployment.
    Progress {
        /// The instance.
        instance: Box<Instance>,
        /// What happens now.
        step: String,
    },
    /// The fleet as applied (the last line).
    Applied(FleetEntry),
    /// Why it was not (the last line).
    Failed(ErrorDetail),
}

/// The answer to `fleets/delete`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FleetDeleted {
    /// The fleet.
    pub fleet: Fleet,
    /// Each instance, with why its cleanup failed, if it did.
    pub instances: Vec<(Instance, Option<String>)>,
}

/// dstack's error body.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The errors (one, from this server).
    pub detail: Vec<ErrorDetail>,
}

/// One error of an [`ErrorBody`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// dstack's error code (`resource_not_exists`, `no_capacity`, …).
    pub code: String,
    /// The message.
    pub msg: String,
}
