//! The project's OpenAI-compatible model endpoint, `<server>/proxy/models/<project>/`, as
//! dstack's: `GET …/models` lists the models of running services (`model:`), and
//! `POST …/chat/completions` (or `…/completions`) goes to a ready replica of the service
//! whose model the request's `model` field names, at the service's own prefix; answers,
//! streamed ones included, pass through unchanged.

use dstack_core::config::service::ModelSpec;
use dstack_core::http::serve::{json, Body};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};

use super::{forward, refuse, Proxy};
use crate::routes::PROJECT;

/// The largest request body read to find its model.
const MAX_BODY: usize = 64 * 1024 * 1024;

/// Answers `route` (what follows `/proxy/models/<project>/`).
pub(crate) async fn handle(proxy: &Proxy, route: &str, req: Request<Incoming>) -> Response<Body> {
    match (req.method(), route) {
        (&Method::GET, "models") => list(proxy),
        (&Method::POST, route @ ("chat/completions" | "completions")) => {
            let route = route.to_string();
            complete(proxy, &route, req).await
        }
        (method, route) => refuse(
            StatusCode::NOT_FOUND,
            format!("no such model route: {method} {route}"),
        ),
    }
}

fn list(proxy: &Proxy) -> Response<Body> {
    let services = proxy.registry.snapshot();
    let mut data: Vec<serde_json::Value> = services
        .values()
        .filter_map(|s| match &s.config.model {
            Some(ModelSpec::OpenAi { name, .. }) => Some(serde_json::json!({
                "id": name,
                "object": "model",
                "created": s.created_s,
                "owned_by": PROJECT,
            })),
            _ => None,
        })
        .collect();
    data.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    json(&serde_json::json!({ "object": "list", "data": data }))
}

async fn complete(proxy: &Proxy, route: &str, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {e}"),
            )
        }
    };
    let model = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v.get("model").and_then(|m| m.as_str()).map(str::to_string));
    let Some(model) = model else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "the request body must be JSON with a `model` field",
        );
    };
    let services = proxy.registry.snapshot();
    let found = services.iter().find_map(|(run, s)| match &s.config.model {
        Some(ModelSpec::OpenAi { name, prefix, .. }) if *name == model => {
            Some((run.clone(), s.clone(), prefix.clone()))
        }
        _ => None,
    });
    let Some((run, service, prefix)) = found else {
        return refuse(
            StatusCode::NOT_FOUND,
            format!("model {model} is not served in project {PROJECT}"),
        );
    };
    let target = format!("{}/{route}", prefix.trim_end_matches('/'));
    let body = Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync();
    forward(
        proxy,
        &run,
        &service,
        Request::from_parts(parts, body),
        &target,
    )
    .await
}
