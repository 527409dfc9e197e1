//! Routing requests: authentication, dstack's routes and this project's extras (see
//! [`dstack_core::client::protocol`]), each answered in this project's records (`Accept:`
//! [`NATIVE`]) or dstack's shapes.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dstack_core::client::protocol::{
    ApplyRequest, ConfigurationRequest, ConnectRequest, DeleteRequest, FleetDeleted, FleetEntry,
    FleetEvent, GroupRef, ListRequest, LogsRequest, PlanAnswer, PlanRequest, RunIds, RunRef,
    StopRequest, WaitRequest, NATIVE, TUNNEL,
};
use dstack_core::config::Configuration;
use dstack_core::engine::EngineError;
use dstack_core::events::EventQuery;
use dstack_core::http::serve::{
    bearer, json, parse, read_body, respond, same_secret, stream, Body,
};
use dstack_core::model::Run;
use dstack_core::RunHandle;
use futures_util::StreamExt;
use hyper::body::Incoming;
use hyper::header::{ACCEPT, CONNECTION, UPGRADE};
use hyper::{Method, Request, Response, StatusCode};
use serde::de::DeserializeOwned;

use crate::errors::ApiError;
use crate::Shared;

/// The only project of a local server.
pub(crate) const PROJECT: &str = "main";

/// The largest request body read (configurations, sweeps of many trials).
const MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;

/// The longest `runs/wait` a client may ask for.
const MAX_WAIT: Duration = Duration::from_secs(120);

/// Answers one request.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    shared.touch();
    if req.uri().path().starts_with("/proxy/") {
        return Ok(crate::proxy::handle(&shared, req).await);
    }
    let native = req
        .headers()
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(NATIVE));
    Ok(route(&shared, native, req)
        .await
        .unwrap_or_else(|e| e.into_response(native)))
}

async fn route(
    shared: &Shared,
    native: bool,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    match bearer(&req) {
        None => {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "not_authenticated",
                "a token is required (Authorization: Bearer <token>; see $DSTACK_HOME/config.yml)",
            ))
        }
        Some(token) if !same_secret(token, &shared.token) => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "the token is not valid for this server",
            ))
        }
        Some(_) => {}
    }
    if req.method() != Method::POST {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "server_client_error",
            format!("{} is not allowed: every route takes POST", req.method()),
        ));
    }
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["api", "server", "get_info"] => Ok(json(&serde_json::json!({
            "server_version": env!("CARGO_PKG_VERSION"),
        }))),
        ["api", "projects", project, "get"] => {
            if *project != PROJECT {
                return Err(no_project(project));
            }
            Ok(json(&dstack_core::api::project(&crate::dialect::OWNER)))
        }
        ["api", "users", "get_my_user"] => Ok(json(&dstack_core::api::user_with_creds(
            &crate::dialect::OWNER,
            &shared.token,
        ))),
        ["api", "runs", "list"] if !native => crate::dialect::list_runs(shared, req).await,
        ["api", "runs", "list"] => {
            let request: ListRequest = body(req).await?;
            let all = request.all || request.only_active == Some(false);
            let listing = shared
                .client
                .runs()
                .listing_limited(all, request.limit)
                .await?;
            Ok(json(&listing))
        }
        ["api", "events", "list"] if !native => crate::dialect::list_events(shared, req).await,
        ["api", "events", "list"] => {
            let query: EventQuery = body(req).await?;
            Ok(json(&shared.client.events().list(&query).await?))
        }
        ["api", "project", project, route @ ..] => {
            if *project != PROJECT {
                return Err(no_project(project));
            }
            match route {
                ["secrets", action] => crate::secrets::route(shared, action, req).await,
                ["repos", "init"] => crate::secrets::init_repo(shared, req).await,
                ["artifacts" | "tags", _] => crate::artifacts::route(shared, route, req).await,
                _ if native => project_route(shared, route, req).await,
                _ => crate::dialect::project_route(shared, route, req).await,
            }
        }
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "resource_not_exists",
            format!("no such route {path}"),
        )),
    }
}

/// The `hash=` of an upload's query (empty when there is none: the store refuses it).
pub(crate) fn query_hash<B>(req: &Request<B>) -> String {
    req.uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("hash=")))
        .unwrap_or_default()
        .to_string()
}

/// The refusal of a project this server does not have.
fn no_project(project: &str) -> ApiError {
    ApiError::not_found(format!(
        "project {project} does not exist (this server has project {PROJECT})"
    ))
}

/// A project route answered with this project's records.
async fn project_route(
    shared: &Shared,
    route: &[&str],
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let client = &shared.client;
    match route {
        ["runs", "connect"] => connect(shared, req).await,
        ["runs", "ssh"] => crate::ssh::tunnel(shared, req).await,
        ["runs", "ssh_endpoint"] => Ok(json(
            &crate::ssh::endpoint(shared, &body(req).await?).await?,
        )),
        ["runs", "get_plan"] => {
            let request: PlanRequest = body(req).await?;
            let plan = client
                .runs()
                .plan(&configuration(&request.configuration)?)
                .await?;
            Ok(json(&PlanAnswer {
                configuration: plan.configuration.to_json(),
                offers: plan.offers,
                no_offers_reason: plan.no_offers_reason,
                total_offers: plan.total_offers,
            }))
        }
        ["files", "has_archive"] => {
            let request: dstack_core::client::HasArchive = body(req).await?;
            // Asked for: kept a while longer (the run applied next needs it).
            let kept = archives(shared)?.touch(&request.hash);
            Ok(json(&dstack_core::client::ArchiveKept { kept }))
        }
        ["files", "upload_archive"] => {
            let hash = query_hash(&req);
            let limit = dstack_core::archive::limit_from_env(dstack_core::archive::REPO_LIMIT);
            let bytes = read_body(req, usize::try_from(limit).unwrap_or(usize::MAX)).await?;
            let store = archives(shared)?;
            store
                .keep(&hash, &bytes)
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            store.prune(&archives_needed(shared)?, ARCHIVE_TTL);
            Ok(json(&dstack_core::client::ArchiveKept { kept: true }))
        }
        ["runs", "apply"] => {
            let request: ApplyRequest = body(req).await?;
            let config = configuration(&request.configuration)?;
            let mut runs = engine(shared)?
                .apply_all(vec![(config, request.options)])
                .await?;
            let run = runs
                .pop()
                .ok_or_else(|| ApiError::bad_request("no run was recorded"))?;
            Ok(json(&run))
        }
        ["runs", "replicas"] => {
            let request: RunRef = body(req).await?;
            let run = run_handle(shared, &request).await?.run().await?;
            Ok(json(&crate::proxy::replicas(
                &shared.proxy,
                &run.name,
                &run.id,
            )))
        }
        ["runs", "update"] => {
            let request: ApplyRequest = body(req).await?;
            let config = configuration(&request.configuration)?;
            let run = engine(shared)?
                .update_service(config, request.options)
                .await?;
            Ok(json(&run))
        }
        ["runs", "apply_group"] => {
            let requests: Vec<ApplyRequest> = body(req).await?;
            let items = requests
                .into_iter()
                .map(|r| Ok((configuration(&r.configuration)?, r.options)))
                .collect::<Result<Vec<_>, ApiError>>()?;
            // The records as applied, not read again one by one (a sweep of many trials).
            Ok(json(&engine(shared)?.apply_all(items).await?))
        }
        ["runs", "get"] => {
            let which: RunRef = body(req).await?;
            let handle = run_handle(shared, &which).await?;
            Ok(json(&handle.snapshot().await?))
        }
        ["runs", "get_many"] => {
            let request: RunIds = body(req).await?;
            Ok(json(&client.runs().snapshots(&request.ids).await?))
        }
        ["runs", "watch_group"] => {
            let request: GroupRef = body(req).await?;
            let lines = client.runs().watch_group(&request.group_id).map(|change| {
                let change = change.map_err(std::io::Error::other)?;
                let mut line = serde_json::to_vec(&change).map_err(std::io::Error::other)?;
                line.push(b'\n');
                Ok::<_, std::io::Error>(Bytes::from(line))
            });
            Ok(stream("application/x-ndjson", lines))
        }
        ["runs", "stop"] => {
            let request: StopRequest = body(req).await?;
            let mut handles = Vec::new();
            for id in &request.ids {
                handles.push(run_handle(shared, &by_id(id)).await?);
            }
            for name in &request.runs_names {
                let by_name = RunRef {
                    run_name: Some(name.clone()),
                    id: None,
                };
                handles.push(run_handle(shared, &by_name).await?);
            }
            let mut stopped: Vec<Run> = Vec::with_capacity(handles.len());
            for handle in handles {
                stopped.push(handle.stop(request.abort).await?);
            }
            Ok(json(&stopped))
        }
        ["runs", "wait"] => {
            let request: WaitRequest = body(req).await?;
            let handle = run_handle(shared, &by_id(&request.id)).await?;
            let limit = Duration::from_millis(request.timeout_ms).min(MAX_WAIT);
            let known = request.status;
            let run = match tokio::time::timeout(limit, handle.wait_until(|s| s != known)).await {
                Ok(run) => run?,
                Err(_) => handle.run().await?,
            };
            Ok(json(&run))
        }
        ["runs", "metrics_many"] => {
            let request: RunIds = body(req).await?;
            Ok(json(&client.runs().metrics_many(&request.ids).await?))
        }
        ["runs", "metrics"] => {
            let which: RunRef = body(req).await?;
            let handle = run_handle(shared, &which).await?;
            Ok(json(&handle.metrics().await?))
        }
        ["logs", "follow"] => {
            let request: LogsRequest = body(req).await?;
            let handle = run_handle(shared, &by_id(&request.id)).await?;
            let chunks = handle
                .job_logs(request.query)
                .map(|chunk| chunk.map_err(std::io::Error::other));
            Ok(stream("application/octet-stream", chunks))
        }
        ["fleets", "list"] => {
            let fleets = client.fleets().list().await?;
            let entries: Vec<FleetEntry> = fleets
                .into_iter()
                .map(|(fleet, instances)| FleetEntry { fleet, instances })
                .collect();
            Ok(json(&entries))
        }
        ["fleets", "busy"] => Ok(json(&client.fleets().busy_instances().await?)),
        ["fleets", "apply"] => {
            let request: ConfigurationRequest = body(req).await?;
            Ok(apply_fleet(shared, configuration(&request.configuration)?))
        }
        ["fleets", "delete"] => {
            let request: DeleteRequest = body(req).await?;
            let name = only_name(&request)?;
            let fleets = client.fleets();
            let (fleet, instances) = match request.instance_nums.as_slice() {
                [] => fleets.delete(name, request.force).await?,
                nums => fleets.delete_instances(name, nums, request.force).await?,
            };
            Ok(json(&FleetDeleted { fleet, instances }))
        }
        ["volumes", "list"] => Ok(json(&client.volumes().list().await?)),
        ["volumes", "create"] => {
            let request: ConfigurationRequest = body(req).await?;
            let config = configuration(&request.configuration)?;
            Ok(json(&client.volumes().apply(&config).await?))
        }
        ["volumes", "delete"] => {
            let request: DeleteRequest = body(req).await?;
            Ok(json(&client.volumes().delete(only_name(&request)?).await?))
        }
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "resource_not_exists",
            format!("no such route {}", route.join("/")),
        )),
    }
}

/// The engine the server hosts.
pub(crate) fn engine(shared: &Shared) -> Result<&dstack_core::engine::Engine, ApiError> {
    shared
        .client
        .engine()
        .ok_or_else(|| ApiError::bad_request("this server hosts no engine"))
}

fn by_id(id: &str) -> RunRef {
    RunRef {
        run_name: None,
        id: Some(id.to_string()),
    }
}

/// The run a request names (by id, else the current run of that name).
pub(crate) async fn run_handle(shared: &Shared, which: &RunRef) -> Result<RunHandle, ApiError> {
    let runs = shared.client.runs();
    let found = match (&which.id, &which.run_name) {
        (Some(id), _) => runs.by_id(id).await?,
        (None, Some(name)) => runs.get(name).await?,
        (None, None) => return Err(ApiError::bad_request("name the run: run_name or id")),
    };
    let shown = which
        .id
        .as_deref()
        .or(which.run_name.as_deref())
        .unwrap_or("");
    found.ok_or_else(|| ApiError::not_found(format!("run {shown} does not exist")))
}

/// The one name a delete request may carry here.
fn only_name(request: &DeleteRequest) -> Result<&str, ApiError> {
    match request.names.as_slice() {
        [name] => Ok(name),
        _ => Err(ApiError::bad_request("name exactly one resource to delete")),
    }
}

/// The JSON body of a request.
/// How long the server keeps an archive no unfinished run needs (since it was uploaded or
/// last asked for).
const ARCHIVE_TTL: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// The archives of the unfinished runs.
fn archives_needed(shared: &Shared) -> Result<std::collections::HashSet<String>, ApiError> {
    let store = engine(shared)?.store();
    let mut needed = std::collections::HashSet::new();
    for kind in ["task", "service", "dev-environment"] {
        let runs = store
            .active_runs_of_kind(kind)
            .map_err(dstack_core::engine::EngineError::from)?;
        for run in runs {
            let dependencies = run.spec.artifacts.dependencies.into_iter();
            needed.extend(
                run.spec
                    .archives
                    .into_iter()
                    .chain(dependencies)
                    .map(|a| a.hash),
            );
        }
    }
    Ok(needed)
}

/// Where the server's engine keeps the archives runs start from.
fn archives(shared: &Shared) -> Result<&dstack_core::archive::ArchiveStore, ApiError> {
    engine(shared)?
        .archives()
        .ok_or_else(|| ApiError::bad_request("this server keeps no archives"))
}

pub(crate) async fn body<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    let bytes = read_body(req, MAX_REQUEST_BYTES).await?;
    let bytes = if bytes.is_empty() {
        Bytes::from_static(b"{}")
    } else {
        bytes
    };
    Ok(parse(&bytes)?)
}

/// A configuration sent by a client, validated again here.
fn configuration(value: &serde_json::Value) -> Result<Configuration, ApiError> {
    dstack_core::config::parse_value(value, "configuration").map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "configuration_error",
            e.to_string(),
        )
    })
}

/// `fleets/apply`: each host's progress as it deploys, then the fleet, as JSON lines.
fn apply_fleet(shared: &Shared, config: Configuration) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<FleetEvent>();
    let client = shared.client.clone();
    tokio::spawn(async move {
        let progress_tx = tx.clone();
        let progress = move |instance: &dstack_core::model::Instance, step: &str| {
            let _ = progress_tx.send(FleetEvent::Progress {
                instance: Box::new(instance.clone()),
                step: step.to_string(),
            });
        };
        let last = match client.fleets().apply(&config, &progress).await {
            Ok((fleet, instances)) => FleetEvent::Applied(FleetEntry { fleet, instances }),
            Err(e) => FleetEvent::Failed(ApiError::from(e).detail()),
        };
        let _ = tx.send(last);
    });
    let lines = futures_util::stream::unfold(rx, |mut rx| async move {
        let event = rx.recv().await?;
        let mut line = serde_json::to_vec(&event).unwrap_or_default();
        line.push(b'\n');
        Some((Ok::<_, std::io::Error>(Bytes::from(line)), rx))
    });
    stream("application/x-ndjson", lines)
}

/// `runs/connect`: upgrades the connection to a byte stream to a port on an instance's host
/// (port forwarding for clients of this server).
async fn connect(shared: &Shared, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let (parts, request) = upgrade_request::<ConnectRequest>(req).await?;
    let outbound = engine(shared)?
        .dial_port(&request.instance_id, request.port)
        .await
        .map_err(|e| {
            ApiError::from(EngineError::Invalid(format!(
                "cannot reach port {} of instance {}: {e}",
                request.port, request.instance_id
            )))
        })?;
    Ok(splice(parts, outbound))
}

/// The head and body of a request that upgrades its connection to a tunnel ([`TUNNEL`]).
pub(crate) async fn upgrade_request<T: DeserializeOwned>(
    req: Request<Incoming>,
) -> Result<(hyper::http::request::Parts, T), ApiError> {
    let wants_tunnel = req
        .headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(TUNNEL));
    if !wants_tunnel {
        return Err(ApiError::bad_request(format!(
            "{} needs `Connection: upgrade` and `Upgrade: {TUNNEL}`",
            req.uri().path()
        )));
    }
    let (parts, incoming) = req.into_parts();
    let bytes = read_body(Request::new(incoming), MAX_REQUEST_BYTES).await?;
    Ok((parts, parse(&bytes)?))
}

/// Answers `101 Switching Protocols` and carries the upgraded connection's bytes to and from
/// `outbound`.
pub(crate) fn splice(
    parts: hyper::http::request::Parts,
    mut outbound: Box<dyn dstack_core::agent::AgentStream>,
) -> Response<Body> {
    let upgrade = hyper::upgrade::on(Request::from_parts(parts, ()));
    tokio::spawn(async move {
        if let Ok(upgraded) = upgrade.await {
            let mut inbound = hyper_util::rt::TokioIo::new(upgraded);
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        }
    });
    let mut resp = respond(
        StatusCode::SWITCHING_PROTOCOLS,
        "application/octet-stream",
        "",
    );
    resp.headers_mut().insert(
        CONNECTION,
        hyper::header::HeaderValue::from_static("upgrade"),
    );
    resp.headers_mut()
        .insert(UPGRADE, hyper::header::HeaderValue::from_static(TUNNEL));
    resp
}
