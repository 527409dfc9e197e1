//! The answering side: reading bounded request bodies, checking bearer tokens in constant
//! time, and building JSON, text and streamed answers.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, TryStreamExt};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::OwnedSemaphorePermit;

use super::client::Duplex;

/// The body of every answer.
pub type Body = UnsyncBoxBody<Bytes, io::Error>;

/// A failed request: a status and a message.
#[derive(Debug)]
pub struct Refusal(pub StatusCode, pub String);

impl Refusal {
    /// 400 with `message`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Refusal(StatusCode::BAD_REQUEST, message.into())
    }

    /// 404 with `message`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Refusal(StatusCode::NOT_FOUND, message.into())
    }
}

/// The bearer token a request carries (`Authorization: Bearer <token>`), if any.
pub fn bearer<B>(req: &Request<B>) -> Option<&str> {
    req.headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Whether `given` is `expected`, compared in constant time.
pub fn same_secret(given: &str, expected: &str) -> bool {
    let (given, expected) = (given.as_bytes(), expected.as_bytes());
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

/// The whole request body, at most `limit` bytes.
pub async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, Refusal> {
    Ok(Limited::new(req.into_body(), limit)
        .collect()
        .await
        .map_err(|e| Refusal::bad_request(format!("cannot read the request body: {e}")))?
        .to_bytes())
}

/// The JSON value a request body holds.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(body)
        .map_err(|e| Refusal::bad_request(format!("invalid request body: {e}")))
}

/// A 200 answer with `value` as JSON.
pub fn json(value: &impl Serialize) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(body) => respond(StatusCode::OK, "application/json", body),
        Err(e) => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain; charset=utf-8",
            e.to_string(),
        ),
    }
}

/// An answer with a whole body.
pub fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let body = Full::new(body.into()).map_err(|never| match never {});
    with_type(status, content_type, body.boxed_unsync())
}

/// A chunked 200 answer whose body is `chunks`.
pub fn stream(
    content_type: &'static str,
    chunks: impl Stream<Item = io::Result<Bytes>> + Send + 'static,
) -> Response<Body> {
    let body = StreamBody::new(chunks.map_ok(Frame::data));
    with_type(StatusCode::OK, content_type, body.boxed_unsync())
}

fn with_type(status: StatusCode, content_type: &'static str, body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// Serves one connection with `handler` on a task of its own, closing it when a request's
/// head takes longer than `header_timeout` (idle keep-alive time included); the
/// connection's `slot` is freed when it closes. Upgrades (tunnels) are allowed.
pub fn spawn_connection<H, F>(
    stream: impl Duplex,
    slot: Option<OwnedSemaphorePermit>,
    header_timeout: Duration,
    handler: H,
) where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    tokio::spawn(async move {
        let service = hyper::service::service_fn(handler);
        // A failed connection concerns only its client (e.g. it went away mid-stream).
        let _ = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
            .with_upgrades()
            .await;
        drop(slot);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_match_only_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abd", "abc"));
        assert!(!same_secret("ab", "abc"));
        assert!(!same_secret("", "abc"));
    }
}
