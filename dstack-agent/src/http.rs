//! The HTTP API (see `dstack_core::agent`): routing requests to the jobs, and the bodies of
//! answers (JSON, plain-text errors, streams).

use std::convert::Infallible;
use std::io;
use std::sync::Arc;

use dstack_core::agent::{Healthcheck, SshEndpoint, SshRequest, SSH_UPGRADE};
use dstack_core::http::serve::{self, bearer, json, respond, same_secret, stream, Body, Refusal};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::de::DeserializeOwned;

use crate::jobs::{JobError, Jobs};
use crate::lease::{self, Lease};
use crate::ssh::world::World;
use crate::ssh::{self as ssh_server, SshServer};

/// The largest request body accepted.
const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// What the API serves.
pub(crate) struct App {
    /// The jobs.
    pub jobs: Arc<Jobs>,
    /// The answer to `GET /api/healthcheck`.
    pub health: Healthcheck,
    /// The secret every request but the healthcheck must carry (`Authorization: Bearer`).
    pub token: String,
    /// How much of a job's metrics file is served (its last lines).
    pub metrics_bytes: u64,
    /// The owner lease, on cloud instances.
    pub lease: Option<Arc<Lease>>,
    /// The SSH server of jobs.
    pub ssh: SshServer,
    /// The hashes of artifact files read so far.
    pub hashes: Arc<crate::artifacts::Hashes>,
}

impl App {
    /// Whether `req` carries the agent's token (compared in constant time).
    fn authorized(&self, req: &Request<Incoming>) -> bool {
        same_secret(bearer(req).unwrap_or(""), &self.token)
    }
}

/// A failed request: a status and a plain-text message.
struct HttpError(StatusCode, String);

impl From<Refusal> for HttpError {
    fn from(Refusal(status, message): Refusal) -> Self {
        HttpError(status, message)
    }
}

impl From<JobError> for HttpError {
    fn from(e: JobError) -> Self {
        let status = match e {
            JobError::BadRequest(_) => StatusCode::BAD_REQUEST,
            JobError::NotFound(_) => StatusCode::NOT_FOUND,
            JobError::Conflict(_) => StatusCode::CONFLICT,
            JobError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        HttpError(status, e.to_string())
    }
}

impl From<io::Error> for HttpError {
    fn from(e: io::Error) -> Self {
        JobError::Io(e).into()
    }
}

/// Answers one request.
pub(crate) async fn handle(
    app: Arc<App>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    Ok(route(&app, req)
        .await
        .unwrap_or_else(|HttpError(status, message)| {
            respond(status, "text/plain; charset=utf-8", format!("{message}\n"))
        }))
}

async fn route(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, HttpError> {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    if segments != ["api", "healthcheck"] && !app.authorized(&req) {
        return Err(HttpError(
            StatusCode::UNAUTHORIZED,
            "the agent's token is missing or wrong".to_string(),
        ));
    }
    match (req.method().clone(), segments.as_slice()) {
        (Method::GET, ["api", "healthcheck"]) => Ok(json(&app.health)),
        (Method::GET, ["api", "jobs"]) => Ok(json(&app.jobs.list())),
        (Method::POST, ["api", "jobs"]) => {
            // One job, or a list of jobs taken in order (a queue: each behind the one before).
            let body = read_body(req).await?;
            let list = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
            if list {
                Ok(json(&app.jobs.submit_all(parse(&body)?)?))
            } else {
                Ok(json(&app.jobs.submit(parse(&body)?)?))
            }
        }
        (Method::GET, ["api", "jobs", id]) => Ok(json(&app.jobs.get(id)?.info())),
        (Method::DELETE, ["api", "jobs", id]) => {
            app.jobs.remove(id)?;
            Ok(respond(StatusCode::NO_CONTENT, "text/plain", ""))
        }
        (Method::POST, ["api", "jobs", id, "stop"]) => {
            Ok(json(&app.jobs.stop(id, read_json(req).await?)?))
        }
        (Method::GET, ["api", "jobs", id, "logs"]) => {
            let query = log_query(req.uri().query().unwrap_or(""))?;
            let logs = app
                .jobs
                .get(id)?
                .logs(query.offset, query.since_ms, query.follow)
                .await?;
            Ok(stream("application/octet-stream", logs))
        }
        (Method::GET, ["api", "jobs", id, "metrics"]) => Ok(respond(
            StatusCode::OK,
            "application/x-ndjson",
            app.jobs.metrics(id, app.metrics_bytes)?,
        )),
        (Method::GET, ["api", "jobs", id, "artifacts"]) => {
            let job = app.jobs.get(id)?;
            let engine = app.jobs.container_engine();
            Ok(json(
                &crate::artifacts::list(&job, engine, app.hashes.clone()).await?,
            ))
        }
        (Method::POST, ["api", "jobs", id, "artifacts"]) => {
            let job = app.jobs.get(id)?;
            let wanted: Vec<String> = read_json(req).await?;
            Ok(stream(
                "application/x-tar",
                crate::artifacts::archive(&job, wanted),
            ))
        }
        (Method::GET, ["api", "jobs", id, "ssh"]) => {
            let job = app.jobs.get(id)?;
            let world = World::of(&job, app.jobs.container_engine())?;
            let activity = &app.ssh.activity;
            activity.retain(|id| {
                app.jobs
                    .get(id)
                    .is_ok_and(|j| !j.info().status.is_finished())
            });
            Ok(json(&SshEndpoint {
                host_key: app.ssh.host_key().to_string(),
                user: world.user,
                working_dir: world.working_dir,
                no_connections_secs: activity.idle_secs(id, job.info().started_at_ms),
            }))
        }
        (Method::POST, ["api", "jobs", id, "ssh"]) => {
            let id = id.to_string();
            ssh(app, &id, req).await
        }
        (Method::GET, ["api", "lease"]) => Ok(json(
            &app.lease
                .as_ref()
                .map_or_else(lease::no_lease, |l| l.status()),
        )),
        (Method::POST, ["api", "lease"]) => Ok(json(
            &app.lease
                .as_ref()
                .map_or_else(lease::no_lease, |l| l.renew()),
        )),
        (Method::GET, ["api", "archives", hash]) => match app.jobs.archives().find(hash) {
            Some(_) => Ok(respond(StatusCode::NO_CONTENT, "text/plain", "")),
            None => Err(HttpError(
                StatusCode::NOT_FOUND,
                format!("no archive {hash}"),
            )),
        },
        (Method::PUT, ["api", "archives", hash]) => {
            let hash = hash.to_string();
            app.jobs
                .archives()
                .put(&hash, req.into_body())
                .await
                .map_err(|e| HttpError(StatusCode::BAD_REQUEST, e))?;
            Ok(respond(StatusCode::NO_CONTENT, "text/plain", ""))
        }
        (Method::GET, ["api", "events"]) => Ok(stream("application/x-ndjson", app.jobs.events())),
        (
            _,
            ["api", "healthcheck" | "jobs" | "events" | "lease"]
            | ["api", "jobs" | "archives", _]
            | ["api", "jobs", _, "stop" | "logs" | "metrics" | "ssh" | "artifacts"],
        ) => Err(HttpError(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} is not allowed on {path}", req.method()),
        )),
        _ => Err(HttpError(
            StatusCode::NOT_FOUND,
            format!("no such path {path}"),
        )),
    }
}

/// `POST /api/jobs/{id}/ssh`: answers `101 Switching Protocols` and serves one SSH
/// connection into the job's world on the upgraded connection.
async fn ssh(
    app: &Arc<App>,
    id: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, HttpError> {
    let wants_ssh = req
        .headers()
        .get(hyper::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(SSH_UPGRADE));
    if !wants_ssh {
        return Err(HttpError(
            StatusCode::BAD_REQUEST,
            format!(
                "POST /api/jobs/{id}/ssh needs `Connection: upgrade` and `Upgrade: {SSH_UPGRADE}`"
            ),
        ));
    }
    let (parts, incoming) = req.into_parts();
    let request: SshRequest = read_json(Request::new(incoming)).await?;
    let keys = ssh_server::parse_keys(&request.authorized_keys);
    if keys.is_empty() {
        return Err(HttpError(
            StatusCode::BAD_REQUEST,
            "no valid authorized key: nobody could log in".to_string(),
        ));
    }
    let world = World::of(&*app.jobs.get(id)?, app.jobs.container_engine())?;
    let upgrade = hyper::upgrade::on(Request::from_parts(parts, ()));
    let app = app.clone();
    let connection = app.ssh.activity.open(id);
    tokio::spawn(async move {
        let _connection = connection;
        if let Ok(upgraded) = upgrade.await {
            let stream = hyper_util::rt::TokioIo::new(upgraded);
            app.ssh.serve(stream, world, keys).await;
        }
    });
    let mut resp = respond(
        StatusCode::SWITCHING_PROTOCOLS,
        "application/octet-stream",
        "",
    );
    let headers = resp.headers_mut();
    headers.insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("upgrade"),
    );
    headers.insert(
        hyper::header::UPGRADE,
        hyper::header::HeaderValue::from_static(SSH_UPGRADE),
    );
    Ok(resp)
}

/// `offset=N&follow=B` (both optional: 0 and false).
/// The query of `GET /api/jobs/{id}/logs`.
#[derive(Default)]
struct LogQuery {
    /// `offset`: the first byte (0).
    offset: u64,
    /// `since`: only chunks written at this time (Unix ms) or later.
    since_ms: Option<u64>,
    /// `follow`: keep streaming while the job runs.
    follow: bool,
}

fn log_query(query: &str) -> Result<LogQuery, HttpError> {
    let bad = |what: &str| {
        HttpError(
            StatusCode::BAD_REQUEST,
            format!("invalid {what} in {query:?}"),
        )
    };
    let mut parsed = LogQuery::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=').unwrap_or((pair, "")) {
            ("offset", n) => parsed.offset = n.parse().map_err(|_| bad("offset"))?,
            ("since", ms) => parsed.since_ms = Some(ms.parse().map_err(|_| bad("since"))?),
            ("follow", "true" | "1") => parsed.follow = true,
            ("follow", "false" | "0") => parsed.follow = false,
            ("follow", _) => return Err(bad("follow")),
            _ => {}
        }
    }
    Ok(parsed)
}

async fn read_json<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, HttpError> {
    parse(&read_body(req).await?)
}

/// The whole request body (at most [`MAX_REQUEST_BYTES`]).
async fn read_body(req: Request<Incoming>) -> Result<bytes::Bytes, HttpError> {
    Ok(serve::read_body(req, MAX_REQUEST_BYTES).await?)
}

/// The JSON value a request body holds.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, HttpError> {
    Ok(serve::parse(body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_queries_are_parsed() {
        let parsed = |q: &str| {
            let q = log_query(q).map_err(|e| e.1).unwrap();
            (q.offset, q.since_ms, q.follow)
        };
        assert_eq!(parsed(""), (0, None, false));
        assert_eq!(parsed("offset=12&follow=true"), (12, None, true));
        assert_eq!(parsed("follow=false&x=y&offset=3"), (3, None, false));
        assert_eq!(
            parsed("since=1700000000000&follow=1"),
            (0, Some(1_700_000_000_000), true)
        );
        assert!(log_query("since=yesterday").is_err());
        assert!(log_query("offset=-1").is_err());
        assert!(log_query("follow=maybe").is_err());
    }
}
