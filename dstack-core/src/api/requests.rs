//! The request bodies dstack's clients send, read into this project's terms: `runs/get_plan`,
//! `runs/apply` and `logs/poll`.
//!
//! What dstack's clients send that this project does not honour is refused by name, never
//! ignored; fields that carry nothing (a `null`, an empty list, dstack's virtual repo) pass.

use serde_json::{Map, Value};

use super::logs::{error_body, ErrorCode};
use super::parse_iso_time;
use crate::config::{parse_value, ConfigErrors, Configuration};
use crate::engine::ApplyOptions;

/// A request dstack's clients may send that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The body is not one dstack's clients send: a field missing, of the wrong type or
    /// unknown.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Fields this project does not honour, each with why.
    #[error("not supported by dstack-rs: {}", .0.join("; "))]
    Unsupported(Vec<String>),
    /// The run configuration is invalid.
    #[error(transparent)]
    Configuration(#[from] ConfigErrors),
}

impl RequestError {
    /// dstack's error body for it (`code: error`, the message as `msg`), sent with HTTP 400.
    pub fn body(&self) -> Value {
        error_body(ErrorCode::Error, &self.to_string())
    }
}

/// A run as dstack's clients describe it (`RunSpec`), in this project's terms.
#[derive(Clone, Debug)]
pub struct RunRequest {
    /// The run configuration, validated, with the profile's parameters merged in (the
    /// configuration's own win, as in dstack).
    pub configuration: Configuration,
    /// The run name (`run_spec.run_name`) and configuration path; nothing else is set.
    pub options: ApplyOptions,
    /// The client's SSH public key (`run_spec.ssh_key_pub`), which dstack's CLI always sends.
    /// It is not used: jobs here are not reached over SSH.
    pub ssh_key_pub: Option<String>,
}

/// A `runs/get_plan` request.
#[derive(Clone, Debug)]
pub struct PlanRequest {
    /// The run to plan.
    pub run: RunRequest,
    /// List at most this many offers (`max_offers`).
    pub max_offers: Option<usize>,
}

/// A `runs/apply` request.
#[derive(Clone, Debug)]
pub struct ApplyRequest {
    /// The run to apply.
    pub run: RunRequest,
    /// The dstack id (see [`super::dstack_id`]) of the run the client saw in its plan
    /// (`plan.current_resource.id`): if another run of that name is active now, the apply
    /// must fail unless `force`.
    pub current_resource_id: Option<String>,
    /// Apply even if the current resource changed (`force`).
    pub force: bool,
}

/// A `logs/poll` request.
#[derive(Clone, Debug, PartialEq)]
pub struct PollLogsRequest {
    /// The run.
    pub run_name: String,
    /// The dstack id of the job submission (see [`super::job_submission_id`]).
    pub job_submission_id: String,
    /// Only events from this time on (Unix ms).
    pub start_time_ms: Option<u64>,
    /// Only events before this time (Unix ms).
    pub end_time_ms: Option<u64>,
    /// Newest first.
    pub descending: bool,
    /// Where the previous page ended.
    pub next_token: Option<String>,
    /// At most this many events (dstack: 0 to 1000, 100 by default).
    pub limit: u32,
}

/// The profile parameters of dstack's `Profile` (as the configuration's top-level fields).
const PROFILE_PARAMS: &[&str] = &[
    "backends",
    "regions",
    "availability_zones",
    "instance_types",
    "reservation",
    "spot_policy",
    "retry",
    "max_duration",
    "stop_duration",
    "max_price",
    "creation_policy",
    "idle_duration",
    "utilization_policy",
    "startup_order",
    "stop_criteria",
    "schedule",
    "fleets",
    "instances",
    "tags",
    "backend_options",
];

/// Reads a `runs/get_plan` body (`{run_spec, max_offers, …}`).
pub fn plan_request(body: &Value) -> Result<PlanRequest, RequestError> {
    let map = object(body, "the body")?;
    known(
        map,
        "",
        &[
            "run_spec",
            "max_offers",
            "reverse_offers",
            "full_offers",
            "unallocated_resources",
            "for_offers_only",
        ],
    )?;
    let mut unsupported = Vec::new();
    for (flag, why) in [
        ("reverse_offers", "offers are listed cheapest first"),
        ("full_offers", "offers are listed as they fit the run"),
        ("unallocated_resources", "offers list whole hosts"),
    ] {
        if flag_set(map, flag)? {
            unsupported.push(format!("{flag}: {why}"));
        }
    }
    // `for_offers_only` only says no run follows; planning has no side effects here anyway.
    flag_set(map, "for_offers_only")?;
    let max_offers = match map.get("max_offers") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n @ 1..=10_000) => Some(n as usize),
            _ => return Err(invalid("max_offers", "an integer from 1 to 10000")),
        },
    };
    let run = run_request(required(map, "run_spec", "")?, "run_spec", unsupported)?;
    Ok(PlanRequest { run, max_offers })
}

/// Reads a `runs/apply` body (`{plan: {run_spec, current_resource}, force}`).
pub fn apply_request(body: &Value) -> Result<ApplyRequest, RequestError> {
    let map = object(body, "the body")?;
    known(map, "", &["plan", "force"])?;
    let force = flag_set(map, "force")?;
    let plan = object(required(map, "plan", "")?, "plan")?;
    known(plan, "plan.", &["run_spec", "current_resource"])?;
    let current_resource_id = match plan.get("current_resource") {
        None | Some(Value::Null) => None,
        Some(current) => {
            let current = object(current, "plan.current_resource")?;
            let id = current.get("id").and_then(Value::as_str);
            Some(
                id.ok_or_else(|| invalid("plan.current_resource.id", "a run id"))?
                    .to_string(),
            )
        }
    };
    let run = run_request(
        required(plan, "run_spec", "plan.")?,
        "plan.run_spec",
        Vec::new(),
    )?;
    Ok(ApplyRequest {
        run,
        current_resource_id,
        force,
    })
}

/// Reads a `logs/poll` body. Runner logs (`diagnose: true`) are refused: jobs here have no
/// runner.
pub fn poll_logs_request(body: &Value) -> Result<PollLogsRequest, RequestError> {
    let map = object(body, "the body")?;
    known(
        map,
        "",
        &[
            "run_name",
            "job_submission_id",
            "start_time",
            "end_time",
            "descending",
            "next_token",
            "limit",
            "diagnose",
        ],
    )?;
    if flag_set(map, "diagnose")? {
        return Err(RequestError::Unsupported(vec![
            "diagnose: jobs here have no runner logs; poll the job's own output".to_string(),
        ]));
    }
    let text = |key: &str| -> Result<Option<String>, RequestError> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(invalid(key, "a string")),
        }
    };
    let time = |key: &str| -> Result<Option<u64>, RequestError> {
        text(key)?
            .map(|t| parse_iso_time(&t).ok_or_else(|| invalid(key, "an ISO 8601 time")))
            .transpose()
    };
    let run_name = text("run_name")?.ok_or_else(|| invalid("run_name", "a run name"))?;
    let job_submission_id = text("job_submission_id")?
        .and_then(|id| uuid::Uuid::parse_str(&id).ok())
        .ok_or_else(|| invalid("job_submission_id", "a UUID"))?
        .hyphenated()
        .to_string();
    let limit = match map.get("limit") {
        None => 100,
        Some(v) => {
            v.as_u64()
                .filter(|n| *n <= 1000)
                .ok_or_else(|| invalid("limit", "an integer from 0 to 1000"))? as u32
        }
    };
    Ok(PollLogsRequest {
        run_name,
        job_submission_id,
        start_time_ms: time("start_time")?,
        end_time_ms: time("end_time")?,
        descending: flag_set(map, "descending")?,
        next_token: text("next_token")?,
        limit,
    })
}

/// Reads dstack's `RunSpec` at `path`; `unsupported` holds what the request around it asked
/// for and cannot have (reported together with the spec's own).
fn run_request(
    spec: &Value,
    path: &str,
    mut unsupported: Vec<String>,
) -> Result<RunRequest, RequestError> {
    let map = object(spec, path)?;
    let at = format!("{path}.");
    known(
        map,
        &at,
        &[
            "run_name",
            "repo_id",
            "repo_data",
            "repo_code_hash",
            "repo_dir",
            "file_archives",
            "working_dir",
            "configuration_path",
            "configuration",
            "profile",
            "ssh_key_pub",
        ],
    )?;
    let text = |key: &str| -> Result<Option<String>, RequestError> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(invalid(&format!("{at}{key}"), "a string")),
        }
    };
    // `repo_id` names the repo `repo_data` describes; with dstack's virtual repo (or none)
    // there is nothing to fetch whatever its id. `working_dir` is ignored by dstack's own
    // server since 0.19.27 (`configuration.working_dir` counts).
    text("repo_id")?;
    text("working_dir")?;
    match map.get("repo_data") {
        None | Some(Value::Null) => {}
        Some(data) if data.get("repo_type") == Some(&Value::from("virtual")) => {}
        Some(_) => unsupported.push(format!(
            "{at}repo_data: runs here have no repo (apply without one)"
        )),
    }
    if text("repo_code_hash")?.is_some() {
        unsupported.push(format!(
            "{at}repo_code_hash: code is not uploaded to this server"
        ));
    }
    if text("repo_dir")?.is_some() {
        unsupported.push(format!("{at}repo_dir: runs here have no repo"));
    }
    match map.get("file_archives") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) if a.is_empty() => {}
        Some(_) => unsupported.push(format!(
            "{at}file_archives: files are not uploaded to this server (`files:`)"
        )),
    }
    if !unsupported.is_empty() {
        return Err(RequestError::Unsupported(unsupported));
    }
    let mut configuration = without_nulls(required(map, "configuration", &at)?);
    if let Some(profile) = map.get("profile") {
        merge_profile(&mut configuration, profile, &at)?;
    }
    let configuration = parse_value(&configuration, &format!("{at}configuration"))?;
    if !matches!(
        configuration,
        Configuration::Task(_) | Configuration::Service(_) | Configuration::DevEnvironment(_)
    ) {
        return Err(invalid(
            &format!("{at}configuration"),
            &format!(
                "a run configuration (task, service or dev-environment), not `{}`",
                configuration.type_name()
            ),
        ));
    }
    Ok(RunRequest {
        configuration,
        options: ApplyOptions {
            name: text("run_name")?,
            configuration_path: text("configuration_path")?,
            ..ApplyOptions::default()
        },
        ssh_key_pub: text("ssh_key_pub")?,
    })
}

/// Sets the parameters of dstack's `Profile` `profile` (`null` for none) that the run
/// configuration `configuration` leaves unset: the configuration's own win, as in dstack.
/// `at` prefixes the field paths of errors (an unknown field of the profile, a value that is
/// not a mapping).
pub fn merge_profile(
    configuration: &mut Value,
    profile: &Value,
    at: &str,
) -> Result<(), RequestError> {
    let Value::Object(fields) = configuration else {
        return Err(invalid(&format!("{at}configuration"), "a mapping"));
    };
    if profile.is_null() {
        return Ok(());
    }
    let profile = object(profile, &format!("{at}profile"))?;
    let labels = ["name", "default"];
    let allowed: Vec<&str> = PROFILE_PARAMS.iter().chain(&labels).copied().collect();
    let set: Map<String, Value> = profile
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    known(&set, &format!("{at}profile."), &allowed)?;
    for key in PROFILE_PARAMS {
        if let Some(value) = set.get(*key) {
            if fields.get(*key).is_none_or(Value::is_null) {
                fields.insert(key.to_string(), without_nulls(value));
            }
        }
    }
    Ok(())
}

/// `value` without the `null` fields of its mappings, at every depth: dstack's clients send
/// every unset field as `null`, which its models read as unset (as configurations written by
/// hand leave them out).
fn without_nulls(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

fn invalid(field: &str, expected: &str) -> RequestError {
    RequestError::Invalid(format!("{field}: expected {expected}"))
}

fn object<'a>(value: &'a Value, what: &str) -> Result<&'a Map<String, Value>, RequestError> {
    value.as_object().ok_or_else(|| invalid(what, "a mapping"))
}

fn required<'a>(
    map: &'a Map<String, Value>,
    key: &str,
    at: &str,
) -> Result<&'a Value, RequestError> {
    map.get(key)
        .filter(|v| !v.is_null())
        .ok_or_else(|| RequestError::Invalid(format!("{at}{key}: field required")))
}

/// Refuses the keys of `map` not in `known` (dstack's models refuse unknown fields too).
fn known(map: &Map<String, Value>, at: &str, known: &[&str]) -> Result<(), RequestError> {
    let unknown: Vec<String> = map
        .keys()
        .filter(|k| !known.contains(&k.as_str()))
        .map(|k| format!("{at}{k}"))
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(RequestError::Invalid(format!(
            "unknown field(s): {}",
            unknown.join(", ")
        )))
    }
}

/// A boolean field, false when absent or null.
fn flag_set(map: &Map<String, Value>, key: &str) -> Result<bool, RequestError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(invalid(key, "true or false")),
    }
}
