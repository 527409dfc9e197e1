//! dstack's dialect: the answers (and request bodies) of dstack's own routes in dstack's
//! shapes ([`dstack_core::api`]), for clients that do not ask for this project's records —
//! dstack's CLI and Python API among them.

use dstack_core::api::{self, LogEvent, LogSource, Owner};
use dstack_core::client::protocol::{ListRequest, RunRef, StopRequest};
use dstack_core::model::{Instance, Job};
use dstack_core::RunHandle;
use futures_util::StreamExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::Value;

use crate::errors::ApiError;
use crate::routes::{body, run_handle, PROJECT};
use crate::Shared;
use dstack_core::http::serve::{json, Body};

/// The one user of a local server.
pub(crate) const OWNER: Owner<'static> = Owner {
    project_name: PROJECT,
    user: "admin",
};

/// dstack's `DeleteFleetInstancesRequest`.
#[derive(serde::Deserialize)]
struct DeleteInstances {
    name: String,
    instance_nums: Vec<u64>,
}

/// Answers `route` of the project in dstack's shapes.
pub(crate) async fn project_route(
    shared: &Shared,
    route: &[&str],
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let client = &shared.client;
    match route {
        ["runs", "get_plan"] => {
            let request = api::plan_request(&body::<Value>(req).await?).map_err(refused)?;
            let plan = client.runs().plan(&request.run.configuration).await?;
            let current = match &request.run.options.name {
                Some(name) => match client.runs().get(name).await? {
                    Some(handle) => Some(dstack_run(&handle).await?),
                    None => None,
                },
                None => None,
            };
            Ok(json(&api::run_plan(
                &OWNER,
                &plan,
                &request.run.options,
                current,
            )))
        }
        ["runs", "apply"] => {
            let request = api::apply_request(&body::<Value>(req).await?).map_err(refused)?;
            if let (Some(name), Some(seen)) =
                (&request.run.options.name, &request.current_resource_id)
            {
                let current = client.runs().get(name).await?;
                let changed = current.is_some_and(|h| api::dstack_id(h.id()) != *seen);
                if changed && !request.force {
                    return Err(ApiError::bad_request(format!(
                        "run {name} changed since the plan was made; plan again or apply with force"
                    )));
                }
            }
            let run = request.run;
            let handle = client.runs().apply(run.configuration, run.options).await?;
            Ok(json(&dstack_run(&handle).await?))
        }
        ["runs", "get"] => {
            let which: RunRef = body(req).await?;
            let handle = find(shared, &which).await?;
            Ok(json(&dstack_run(&handle).await?))
        }
        ["runs", "stop"] => {
            let request: StopRequest = body(req).await?;
            for name in &request.runs_names {
                let by_name = RunRef {
                    run_name: Some(name.clone()),
                    id: None,
                };
                run_handle(shared, &by_name)
                    .await?
                    .stop(request.abort)
                    .await?;
            }
            Ok(json(&Value::Null))
        }
        ["logs", "poll"] => {
            let request = api::poll_logs_request(&body::<Value>(req).await?).map_err(refused)?;
            poll_logs(shared, request).await
        }
        ["fleets", "list"] => {
            let fleets = client.fleets().list().await?;
            let shaped: Vec<Value> = fleets
                .iter()
                .map(|(fleet, instances)| api::fleet(&OWNER, fleet, instances))
                .collect();
            Ok(json(&shaped))
        }
        ["fleets", "get"] => {
            let Named { name } = body(req).await?;
            match client.fleets().get(&name).await? {
                Some((fleet, instances)) => Ok(json(&api::fleet(&OWNER, &fleet, &instances))),
                None => Err(ApiError::not_found(format!("fleet {name} does not exist"))),
            }
        }
        ["fleets", "delete"] => {
            let Names { names } = body(req).await?;
            for name in &names {
                client.fleets().delete(name, false).await?;
            }
            Ok(json(&Value::Null))
        }
        ["fleets", "delete_instances"] => {
            let request: DeleteInstances = body(req).await?;
            client
                .fleets()
                .delete_instances(&request.name, &request.instance_nums, false)
                .await?;
            Ok(json(&Value::Null))
        }
        ["volumes", "get"] => {
            let Named { name } = body(req).await?;
            let volume = client.volumes().get(&name).await?;
            let volume = volume
                .ok_or_else(|| ApiError::not_found(format!("volume {name} does not exist")))?;
            Ok(json(&api::volume(
                &OWNER,
                &volume,
                &all_instances(shared).await?,
            )))
        }
        ["volumes", "delete"] => {
            let Names { names } = body(req).await?;
            for name in &names {
                client.volumes().delete(name).await?;
            }
            Ok(json(&Value::Null))
        }
        ["volumes", "list"] => {
            let instances = all_instances(shared).await?;
            let shaped: Vec<Value> = client
                .volumes()
                .list()
                .await?
                .iter()
                .map(|v| api::volume(&OWNER, v, &instances))
                .collect();
            Ok(json(&shaped))
        }
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "not_supported",
            format!(
                "{}: not served in dstack's shapes yet (this project's clients send Accept: {})",
                route.join("/"),
                dstack_core::client::protocol::NATIVE
            ),
        )),
    }
}

/// A resource by name (dstack's `get` bodies).
#[derive(serde::Deserialize)]
struct Named {
    name: String,
}

/// Resources by name (dstack's `delete` bodies).
#[derive(serde::Deserialize)]
struct Names {
    names: Vec<String>,
}

/// Every instance of every fleet (volumes name those they are attached to).
async fn all_instances(shared: &Shared) -> Result<Vec<Instance>, ApiError> {
    Ok(shared
        .client
        .fleets()
        .list()
        .await?
        .into_iter()
        .flat_map(|(_, instances)| instances)
        .collect())
}

/// `/api/runs/list` in dstack's shapes.
pub(crate) async fn list_runs(
    shared: &Shared,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let request: ListRequest = body(req).await?;
    let all = request.all || request.only_active == Some(false);
    let listing = shared.client.runs().listing(all).await?;
    let limit = request.limit.unwrap_or(100).min(100);
    let mut shaped = Vec::new();
    for run in listing.runs.iter().take(limit) {
        if let Some(handle) = shared.client.runs().by_id(&run.id).await? {
            shaped.push(dstack_run(&handle).await?);
        }
    }
    Ok(json(&shaped))
}

/// `/api/events/list`: dstack's `ListEventsRequest`, answered with dstack's `Event`s.
pub(crate) async fn list_events(
    shared: &Shared,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let request: api::ListEventsRequest = body(req).await?;
    // The records a dstack UUID can name: runs, fleets, instances, volumes.
    let mut ids: Vec<String> = shared
        .client
        .runs()
        .listing(true)
        .await?
        .runs
        .into_iter()
        .map(|r| r.id)
        .collect();
    for (fleet, instances) in shared.client.fleets().list().await? {
        ids.push(fleet.id);
        ids.extend(instances.into_iter().map(|i| i.id));
    }
    ids.extend(
        shared
            .client
            .volumes()
            .list()
            .await?
            .into_iter()
            .map(|v| v.id),
    );
    let ours = |uuid: &str| ids.iter().find(|id| api::dstack_id(id) == uuid).cloned();
    let asked = api::events_query(&request, &api::dstack_id(PROJECT), ours).map_err(refused)?;
    let events = match asked {
        api::EventsAsked::Query(query) => shared.client.events().list(&query).await?,
        api::EventsAsked::Nothing => Vec::new(),
    };
    let shaped: Vec<Value> = events.iter().map(|e| api::event(e, &OWNER)).collect();
    Ok(json(&shaped))
}

/// A run by dstack id or name.
async fn find(shared: &Shared, which: &RunRef) -> Result<RunHandle, ApiError> {
    let Some(id) = &which.id else {
        return run_handle(shared, which).await;
    };
    // dstack's ids of our runs are their own (UUID v4); asked by another form, look it up.
    if let Some(handle) = shared.client.runs().by_id(id).await? {
        return Ok(handle);
    }
    let listing = shared.client.runs().listing(true).await?;
    let found = listing.runs.iter().find(|r| api::dstack_id(&r.id) == *id);
    match found {
        Some(run) => {
            run_handle(
                shared,
                &RunRef {
                    run_name: None,
                    id: Some(run.id.clone()),
                },
            )
            .await
        }
        None => Err(ApiError::not_found(format!("run {id} does not exist"))),
    }
}

/// dstack's `Run` of a run, its registry password redacted.
async fn dstack_run(handle: &RunHandle) -> Result<Value, ApiError> {
    let snapshot = handle.snapshot().await?;
    let mut shaped = api::run(&OWNER, &snapshot.run, &snapshot.jobs, &snapshot.instances);
    if let Some(config) = shaped.pointer_mut("/run_spec/configuration") {
        dstack_core::secrets::redact_configuration(config);
    }
    Ok(shaped)
}

/// `logs/poll`: the output of one job submission, a page of lines at a time (`next_token` is
/// the index of the next line). Lines carry the job's start time: the agent keeps output, not
/// when each line was written.
async fn poll_logs(
    shared: &Shared,
    request: api::PollLogsRequest,
) -> Result<Response<Body>, ApiError> {
    let by_name = RunRef {
        run_name: Some(request.run_name.clone()),
        id: None,
    };
    let handle = run_handle(shared, &by_name).await?;
    let snapshot = handle.snapshot().await?;
    let job: &Job = snapshot
        .jobs
        .iter()
        .find(|j| api::job_submission_id(j) == request.job_submission_id)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "job submission {} does not exist",
                request.job_submission_id
            ))
        })?;
    let engine = crate::routes::engine(shared)?;
    let mut output = Vec::new();
    if let Some(instance) = &job.instance_id {
        let agent = engine.agent(instance).await?;
        match agent.logs(&job.id, 0, false).await {
            Ok(mut chunks) => {
                while let Some(chunk) = chunks.next().await {
                    output
                        .extend_from_slice(&chunk.map_err(dstack_core::engine::EngineError::from)?);
                }
            }
            Err(e) if e.status() == Some(404) => {}
            Err(e) => return Err(dstack_core::engine::EngineError::from(e).into()),
        }
    }
    let at = job.started_at_ms.unwrap_or(job.submitted_at_ms);
    let mut lines: Vec<&[u8]> = output.split_inclusive(|b| *b == b'\n').collect();
    if request.descending {
        lines.reverse();
    }
    let start: usize = match &request.next_token {
        Some(token) => token
            .parse()
            .map_err(|_| ApiError::bad_request(format!("invalid next_token {token:?}")))?,
        None => 0,
    };
    let limit = request.limit.max(1) as usize;
    let page: Vec<LogEvent<'_>> = lines
        .iter()
        .skip(start)
        .take(limit)
        .map(|line| LogEvent {
            timestamp_ms: at,
            source: LogSource::Stdout,
            message: line,
        })
        .collect();
    let end = start + page.len();
    let next = (end < lines.len()).then(|| end.to_string());
    Ok(json(&api::log_page(&page, next.as_deref())))
}

/// A request dstack's client sent that this server does not take.
fn refused(e: api::RequestError) -> ApiError {
    ApiError::bad_request(e.to_string())
}
