//! The services proxy, on the server's own listener as dstack's in-server proxy:
//! `<server>/proxy/services/<project>/<run>/<path>` reaches the service's ready replicas
//! (round robin; a replica that cannot be reached is skipped and checked again), and
//! `<server>/proxy/models/<project>/` is the project's OpenAI-compatible model endpoint.
//!
//! Every HTTP method, streamed bodies both ways (server-sent events), and WebSockets (which
//! dstack's in-server proxy refuses). `auth: true` (dstack's default) needs
//! `Authorization: Bearer <token>` with the server's token: missing → 401, wrong → 403; the
//! header is passed on to the replica, as dstack does. `strip_prefix` (default on) removes
//! `/proxy/services/<project>/<run>`. Unknown or finished service → 404; a service with no
//! ready replica → 503; a replica that cannot be reached → 502; no answer within the
//! proxy's timeout → 504; over a `rate_limits` rule → 429. A service that scales to zero
//! (`replicas: 0..N` with `scaling`) holds a request that finds no replica (at most
//! [`MAX_HELD`] at once, for up to the proxy's timeout), starts one, and answers once it is
//! ready; so does a service whose rolling deployment replaces its only replica on a host.

mod limits;
mod models;
mod probes;
mod registry;
mod rollout;
mod scaler;
mod upstream;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dstack_core::client::protocol::ReplicaState;
use dstack_core::engine::Engine;
use dstack_core::http::serve::{bearer, respond, same_secret, Body};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONNECTION, HOST, LOCATION, RETRY_AFTER, UPGRADE};
use hyper::{Method, Request, Response, StatusCode};
use tokio::time::Instant;

use crate::routes::PROJECT;
use crate::Shared;
use registry::{Registry, Replica, Service};
use upstream::{Upstream, UpstreamError};

/// How long a replica may take to send an answer's head, by default
/// (`DSTACK_SERVER_PROXY_TIMEOUT`, seconds).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// How often due probes and port checks are sent.
const TICK: Duration = Duration::from_millis(50);

/// How often the service table is read again from the store (at once on a run's change).
const REFRESH: Duration = Duration::from_millis(250);

/// Requests held at once, server-wide, for services waking from zero replicas.
pub(crate) const MAX_HELD: usize = 1024;

/// How long a replica taken out of rotation may take to answer what was sent to it before
/// it is stopped anyway.
pub(crate) const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// How often a held request looks for a ready replica.
const HOLD_POLL: Duration = Duration::from_millis(50);

/// The client's address of a request, set by the server's listener.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ClientAddr(pub SocketAddr);

/// The proxy's state.
pub(crate) struct Proxy {
    engine: Engine,
    registry: Registry,
    upstream: Upstream,
    limiters: Mutex<HashMap<String, limits::Limiter>>,
    scaler: scaler::Scaler,
    rollouts: rollout::Rollouts,
    held: tokio::sync::Semaphore,
    timeout: Duration,
    clock: Instant,
}

impl Proxy {
    /// A proxy to the replicas of `engine`'s services, waiting at most `timeout` for an
    /// answer's head.
    pub fn new(engine: Engine, timeout: Duration) -> Self {
        Proxy {
            registry: Registry::default(),
            upstream: Upstream::new(engine.clone()),
            engine,
            limiters: Mutex::default(),
            scaler: scaler::Scaler::default(),
            rollouts: rollout::Rollouts::default(),
            held: tokio::sync::Semaphore::new(MAX_HELD),
            timeout,
            clock: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }
}

/// The running replicas of service run `run_id` (named `name`) as the proxy sees them.
pub(crate) fn replicas(proxy: &Proxy, name: &str, run_id: &str) -> Vec<ReplicaState> {
    let Some(service) = proxy.registry.get(name).filter(|s| s.run_id == run_id) else {
        return Vec::new();
    };
    service
        .replicas
        .iter()
        .map(|r| {
            let state = r.probing.lock().unwrap_or_else(|e| e.into_inner());
            ReplicaState {
                job_id: r.job_id.clone(),
                replica_num: r.replica_num,
                ready: r.is_ready(),
                probes: service
                    .probes
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let streak = state.streaks.get(i).copied().unwrap_or(0);
                        (p.url.clone(), streak, p.ready_after)
                    })
                    .collect(),
                error: state.last_error.clone(),
            }
        })
        .collect()
}

/// Keeps the service table current and probes replicas, until the server stops.
pub(crate) async fn supervise(proxy: Arc<Proxy>, engine: Engine) {
    let mut changes = engine.subscribe();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut scaled_at, mut refreshed_at) = (0, 0);
    loop {
        let changed = tokio::select! {
            _ = tick.tick() => false,
            change = changes.recv() => {
                if matches!(change, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                    return;
                }
                true
            }
        };
        let now = proxy.now_ms();
        if changed || now >= refreshed_at + REFRESH.as_millis() as u64 {
            refreshed_at = now;
            if let Err(e) = proxy.registry.refresh(&engine) {
                eprintln!("dstack server: cannot read the services: {e}");
                continue;
            }
        }
        let live = proxy.registry.snapshot();
        let is_live = |run_id: &str| live.values().any(|s| s.run_id == run_id);
        proxy
            .limiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|run_id, _| is_live(run_id));
        proxy.scaler.retain(is_live);
        for service in live.values() {
            for replica in &service.replicas {
                check(&proxy, service, replica);
            }
        }
        let now = proxy.now_ms();
        if now >= scaled_at + scaler::PERIOD.as_millis() as u64 {
            scaled_at = now;
            for service in live.values() {
                // An autoscaled service does not scale while it rolls out a deployment.
                if !proxy.rollouts.drive(&engine, service).await {
                    proxy.scaler.decide(&engine, service, now).await;
                }
            }
        }
    }
}

/// Sends a replica's due probes (or its port check) on a task of its own.
fn check(proxy: &Arc<Proxy>, service: &Service, replica: &Arc<Replica>) {
    let now = proxy.now_ms();
    let due = {
        let mut state = replica.probing.lock().unwrap_or_else(|e| e.into_inner());
        if state.checking {
            return;
        }
        let due = state.due(&service.probes, now);
        state.checking = !due.is_empty();
        due
    };
    if due.is_empty() {
        return;
    }
    let (proxy, replica, specs) = (proxy.clone(), replica.clone(), service.probes.clone());
    tokio::spawn(async move {
        let mut results = Vec::with_capacity(due.len());
        for index in due {
            let result = match specs.get(index) {
                None => {
                    proxy
                        .upstream
                        .port_open(&replica.instance_id, replica.port)
                        .await
                }
                Some(spec) => probe(&proxy, &replica, spec).await,
            };
            results.push((index, result));
        }
        let now = proxy.now_ms();
        let mut state = replica.probing.lock().unwrap_or_else(|e| e.into_inner());
        for (index, result) in results {
            state.record(&specs, index, result, now);
        }
        state.checking = false;
        replica.set_ready(state.ready(&specs));
    });
}

/// Stops replica `job_id` of `service` (`scaled_down`) once the proxy has taken it out of
/// rotation and the requests sent to it have their answers.
pub(crate) async fn retire(
    engine: &Engine,
    service: &Service,
    job_id: &str,
) -> Result<(), dstack_core::engine::EngineError> {
    if let Some(replica) = service.replicas.iter().find(|r| r.job_id == job_id) {
        replica.drain(DRAIN_LIMIT).await;
    }
    engine.retire_replica(&service.run_id, job_id).await
}

/// Sends one probe; `Ok` for a 2xx answer within its timeout.
async fn probe(proxy: &Proxy, replica: &Replica, spec: &probes::ProbeSpec) -> Result<(), String> {
    let mut req = Request::builder()
        .method(spec.method.clone())
        .uri(spec.url.as_str())
        .header(HOST, "localhost");
    for (name, value) in &spec.headers {
        req = req.header(name.as_str(), value.as_str());
    }
    let body = Full::new(bytes::Bytes::from(spec.body.clone().unwrap_or_default()))
        .map_err(|never| match never {})
        .boxed_unsync();
    let req = req.body(body).map_err(|e| e.to_string())?;
    let connection = proxy
        .upstream
        .connect(&replica.instance_id, replica.port)
        .await
        .map_err(|e| e.to_string())?;
    let answer = connection
        .send(req, spec.timeout)
        .await
        .map_err(|e| e.to_string())?;
    let status = answer.status();
    // The body is read so that the connection can serve the next request.
    let _ = tokio::time::timeout(spec.timeout, answer.into_body().collect()).await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("{} answered {status}", spec.url))
    }
}

/// Answers a request under `/proxy/`.
pub(crate) async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    match segments.as_slice() {
        ["proxy", "services", project, run, ..] if *project == PROJECT => {
            let rest = segments.get(4).copied();
            service(shared, run, rest, req).await
        }
        ["proxy", "models", project, ..] if *project == PROJECT => {
            let route = path.splitn(5, '/').nth(4).unwrap_or("").to_string();
            match unauthorized(shared, &req) {
                None => models::handle(&shared.proxy, &route, req).await,
                Some(refusal) => refusal,
            }
        }
        ["proxy", "services" | "models", project, ..] => refuse(
            StatusCode::NOT_FOUND,
            format!("project {project} does not exist (this server has project {PROJECT})"),
        ),
        _ => refuse(StatusCode::NOT_FOUND, format!("no such route {path}")),
    }
}

/// Proxies a request to service `run`; `rest` is what follows `/<run>/` in the path.
async fn service(
    shared: &Shared,
    run: &str,
    rest: Option<&str>,
    req: Request<Incoming>,
) -> Response<Body> {
    let proxy = &shared.proxy;
    let Some(service) = proxy.registry.get(run) else {
        return refuse(
            StatusCode::NOT_FOUND,
            format!("service {run} is not running in project {PROJECT}"),
        );
    };
    if service.config.auth {
        if let Some(refusal) = unauthorized(shared, &req) {
            return refusal;
        }
    }
    let Some(rest) = rest else {
        // `/proxy/services/main/run` → `/proxy/services/main/run/`: relative links resolve.
        let mut location = format!("{}/", req.uri().path());
        if let Some(query) = req.uri().query() {
            location = format!("{location}?{query}");
        }
        let mut resp = respond(StatusCode::PERMANENT_REDIRECT, "text/plain", "");
        if let Ok(value) = HeaderValue::from_str(&location) {
            resp.headers_mut().insert(LOCATION, value);
        }
        return resp;
    };
    let service_path = format!("/{rest}");
    if let Err(retry_after) = rate_limit(proxy, &service, &service_path, &req) {
        let mut resp = refuse(
            StatusCode::TOO_MANY_REQUESTS,
            format!("service {run}: too many requests"),
        );
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(retry_after));
        return resp;
    }
    let target = if service.config.strip_prefix {
        match req.uri().query() {
            Some(query) => format!("{service_path}?{query}"),
            None => service_path,
        }
    } else {
        req.uri()
            .path_and_query()
            .map_or_else(|| req.uri().path().to_string(), |p| p.to_string())
    };
    let req = req.map(upstream::incoming_body);
    forward(proxy, run, &service, req, &target).await
}

/// Sends `req` to the first ready replica of `service` that can be reached, as `target`.
pub(crate) async fn forward(
    proxy: &Proxy,
    run: &str,
    service: &Service,
    mut req: Request<Body>,
    target: &str,
) -> Response<Body> {
    proxy.scaler.record(&service.run_id, proxy.now_ms());
    let mut replicas = service.ready_in_turn();
    let may_hold = (service.config.scaling.is_some() && service.config.scales_to_zero())
        || proxy.rollouts.in_progress(&service.run_id);
    if replicas.is_empty() && may_hold {
        replicas = match hold(proxy, run, service).await {
            Ok(replicas) => replicas,
            Err(refusal) => return *refusal,
        };
    }
    if replicas.is_empty() {
        let mut resp = refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("service {run} has no ready replica yet"),
        );
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        return resp;
    }
    let client_upgrade = wants_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
    let client_ip = req.extensions().get::<ClientAddr>().map(|a| a.0.ip());
    let (mut parts, body) = req.into_parts();
    parts.uri = match target.parse() {
        Ok(uri) => uri,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("invalid path {target}: {e}"),
            )
        }
    };
    strip_hop_headers(&mut parts.headers, client_upgrade.is_some());
    // HTTP/1.1 to the replica whatever the client spoke: its connection is kept for the
    // next request (an HTTP/1.0 request would close it).
    parts.version = hyper::Version::HTTP_11;
    if let Some(ip) = client_ip {
        let forwarded = match parts
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
        {
            Some(earlier) => format!("{earlier}, {ip}"),
            None => ip.to_string(),
        };
        if let Ok(value) = HeaderValue::from_str(&forwarded) {
            parts.headers.insert("x-forwarded-for", value);
        }
    }
    parts
        .headers
        .insert("x-forwarded-proto", HeaderValue::from_static("http"));
    let mut req = Request::from_parts(parts, body);
    // A request without a body whose method may be repeated goes to the next replica when
    // the connection fails under it (as nginx's `proxy_next_upstream error`).
    let replay = replayable(&req);
    let mut errors = Vec::new();
    let mut answered = None;
    for replica in &replicas {
        let connection = match proxy
            .upstream
            .connect(&replica.instance_id, replica.port)
            .await
        {
            Ok(connection) => connection,
            Err(e) => {
                // Nothing was sent: take the replica out until its checks pass again.
                take_out(proxy, replica);
                errors.push(format!("replica {}: {e}", replica.replica_num));
                continue;
            }
        };
        replica.in_flight.fetch_add(1, Ordering::AcqRel);
        let sent = connection.send(req, proxy.timeout).await;
        replica.in_flight.fetch_sub(1, Ordering::AcqRel);
        match sent {
            Ok(answer) => {
                answered = Some(answer);
                break;
            }
            // A kept connection that had closed: the request goes to the next replica.
            Err(UpstreamError::NotSent(unsent)) => {
                errors.push(format!(
                    "replica {}: its connection closed",
                    replica.replica_num
                ));
                req = *unsent;
            }
            Err(e @ UpstreamError::Timeout(_)) => {
                return refuse(StatusCode::GATEWAY_TIMEOUT, format!("service {run}: {e}"))
            }
            Err(e) => match &replay {
                Some(head) => {
                    take_out(proxy, replica);
                    errors.push(format!("replica {}: {e}", replica.replica_num));
                    req = again(head);
                }
                None => return refuse(StatusCode::BAD_GATEWAY, format!("service {run}: {e}")),
            },
        }
    }
    let Some(mut answer) = answered else {
        return refuse(StatusCode::BAD_GATEWAY, errors.join("; "));
    };
    if let (Some(client), StatusCode::SWITCHING_PROTOCOLS) = (client_upgrade, answer.status()) {
        let replica = hyper::upgrade::on(&mut answer);
        tokio::spawn(async move {
            if let (Ok(client), Ok(replica)) = (client.await, replica.await) {
                let mut client = hyper_util::rt::TokioIo::new(client);
                let mut replica = hyper_util::rt::TokioIo::new(replica);
                let _: io::Result<_> =
                    tokio::io::copy_bidirectional(&mut client, &mut replica).await;
            }
        });
        let (parts, _) = answer.into_parts();
        return Response::from_parts(parts, empty());
    }
    let (mut parts, body) = answer.into_parts();
    strip_hop_headers(&mut parts.headers, false);
    Response::from_parts(parts, upstream::incoming_body(body))
}

/// Holds a request to a service without a ready replica that scales to zero: wakes it and
/// waits for a ready replica (up to the proxy's timeout); the ready replicas, or the refusal.
async fn hold(
    proxy: &Proxy,
    run: &str,
    service: &Service,
) -> Result<Vec<Arc<Replica>>, Box<Response<Body>>> {
    let Ok(_permit) = proxy.held.try_acquire() else {
        return Err(Box::new(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("service {run} is starting and too many requests wait for it"),
        )));
    };
    proxy
        .scaler
        .wake(&proxy.engine, service, proxy.now_ms())
        .await;
    let deadline = Instant::now() + proxy.timeout;
    loop {
        let ready = proxy
            .registry
            .get(run)
            .filter(|s| s.run_id == service.run_id)
            .map(|s| s.ready_in_turn());
        match ready {
            None => {
                return Err(Box::new(refuse(
                    StatusCode::NOT_FOUND,
                    format!("service {run} is not running in project {PROJECT}"),
                )))
            }
            Some(ready) if !ready.is_empty() => return Ok(ready),
            Some(_) if Instant::now() >= deadline => {
                return Err(Box::new(refuse(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "service {run}: no replica was ready within {} s of the request",
                        proxy.timeout.as_secs()
                    ),
                )))
            }
            Some(_) => tokio::time::sleep(HOLD_POLL).await,
        }
    }
}

/// Takes a replica that could not be reached out of rotation until its checks pass again.
fn take_out(proxy: &Proxy, replica: &Replica) {
    replica.set_ready(false);
    replica
        .probing
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .reset(proxy.now_ms());
}

/// What is needed to send `req` again: its head, when it has no body and its method may be
/// repeated (RFC 9110 §9.2.2).
fn replayable(req: &Request<Body>) -> Option<Request<()>> {
    use hyper::body::Body as _;
    let idempotent = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    );
    if !idempotent || !req.body().is_end_stream() {
        return None;
    }
    let mut head = Request::new(());
    *head.method_mut() = req.method().clone();
    *head.uri_mut() = req.uri().clone();
    *head.version_mut() = req.version();
    *head.headers_mut() = req.headers().clone();
    Some(head)
}

/// The request of `head` again, without a body.
fn again(head: &Request<()>) -> Request<Body> {
    let mut req = Request::new(empty());
    *req.method_mut() = head.method().clone();
    *req.uri_mut() = head.uri().clone();
    *req.version_mut() = head.version();
    *req.headers_mut() = head.headers().clone();
    req
}

/// Checks the request's token against the server's: the refusal, if it fails.
fn unauthorized<B>(shared: &Shared, req: &Request<B>) -> Option<Response<Body>> {
    match bearer(req) {
        None => Some(refuse(
            StatusCode::UNAUTHORIZED,
            "a token is required (Authorization: Bearer <token>; see $DSTACK_HOME/config.yml)",
        )),
        Some(token) if !same_secret(token, &shared.token) => Some(refuse(
            StatusCode::FORBIDDEN,
            "the token is not valid for this server",
        )),
        Some(_) => None,
    }
}

fn rate_limit<B>(
    proxy: &Proxy,
    service: &Service,
    path: &str,
    req: &Request<B>,
) -> Result<(), u64> {
    let Some((index, rule)) = limits::rule_for(&service.config.rate_limits, path) else {
        return Ok(());
    };
    let ip = req
        .extensions()
        .get::<ClientAddr>()
        .map(|a| a.0.ip().to_string())
        .unwrap_or_default();
    let key = limits::key_of(rule, &ip, |name| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    });
    let now = proxy.now_ms();
    proxy
        .limiters
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(service.run_id.clone())
        .or_default()
        .take(index, rule, key, now)
}

fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(UPGRADE)
        && req
            .headers()
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Removes the headers that concern one connection only (RFC 9110 §7.6.1), and those the
/// `Connection` header names; an upgrade keeps `Connection: upgrade` and `Upgrade`.
fn strip_hop_headers(headers: &mut hyper::HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|name| !(upgrade && name == UPGRADE))
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
    ] {
        headers.remove(name);
    }
    if upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(CONNECTION);
        headers.remove(UPGRADE);
    }
}

fn empty() -> Body {
    Full::new(bytes::Bytes::new())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A JSON error answer, `{"detail": message}`.
fn refuse(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    let body = serde_json::json!({ "detail": message.into() }).to_string();
    respond(status, "application/json", body)
}
