//! The client side of `dstack server`'s API (see [`super::protocol`]): typed calls over one
//! keep-alive [`HttpClient`], answers in this project's own records.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::protocol::{ErrorBody, NATIVE};
use crate::http::client::{ByteStream, Duplex, HttpClient, HttpError, Transport};

/// A failure to reach `dstack server` or a request it refused.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The server could not be reached, or its answer not read.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// The server refused the request (dstack's error body).
    #[error("{message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// dstack's error code (`resource_not_exists`, `no_capacity`, …).
        code: String,
        /// Why.
        message: String,
    },
    /// No server could be found or started for a state directory.
    #[error("{0}")]
    Start(String),
}

impl ServerError {
    /// dstack's error code of a refusal.
    pub fn code(&self) -> Option<&str> {
        match self {
            ServerError::Refused { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// How long the server may take to answer a request (placement and cloud calls included;
/// waits and streams have their own limits).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// A connection to one project of a `dstack server`.
#[derive(Clone, Debug)]
pub struct Remote {
    http: Arc<Mutex<HttpClient>>,
    project: String,
    url: Arc<Mutex<String>>,
    /// For the server of a local state directory: how to find (or start) it again when it
    /// stops answering (killed, exited idle, restarted on another port).
    origin: Option<Arc<Origin>>,
}

/// The local state directory a [`Remote`] was found for.
#[derive(Debug)]
pub(crate) struct Origin {
    pub home: PathBuf,
    pub server_bin: Option<PathBuf>,
}

/// Routes that only read: sent again after a connection that broke midway.
const READS: &[&str] = &[
    "runs/get",
    "runs/get_many",
    "runs/get_plan",
    "runs/wait",
    "runs/metrics",
    "runs/replicas",
    "fleets/list",
    "fleets/busy",
    "volumes/list",
];

impl Remote {
    /// A client of the server at `url` (`http://host:port`) for `project`, with `token`.
    pub fn new(url: &str, project: &str, token: &str) -> Result<Remote, ServerError> {
        let authority = url
            .strip_prefix("http://")
            .ok_or_else(|| {
                ServerError::Start(format!(
                    "server URL {url}: only http:// URLs are supported (put a TLS proxy in front of a shared server)"
                ))
            })?
            .trim_end_matches('/');
        if authority.contains('/') {
            return Err(ServerError::Start(format!(
                "server URL {url}: a path prefix is not supported"
            )));
        }
        let http = HttpClient::new(
            Transport::Tcp(authority.to_string()),
            "the server",
            authority,
        )
        .with_token(token)
        .with_accept(NATIVE);
        Ok(Remote {
            http: Arc::new(Mutex::new(http)),
            project: project.to_string(),
            url: Arc::new(Mutex::new(url.trim_end_matches('/').to_string())),
            origin: None,
        })
    }

    /// The same client, finding the server of `origin` again when it stops answering.
    pub(crate) fn with_origin(mut self, origin: Origin) -> Remote {
        self.origin = Some(Arc::new(origin));
        self
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        self.url.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn http(&self) -> HttpClient {
        self.http.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// After `error` on `path`: whether to send the request again, once the local server was
    /// found (or started) again. A request is sent again when it never reached a server (the
    /// connection was refused: the server is gone) or only reads.
    async fn recover(&self, path: &str, error: &HttpError) -> Result<bool, ServerError> {
        let Some(origin) = &self.origin else {
            return Ok(false);
        };
        let refused = matches!(error, HttpError::Unreachable { source, .. }
            if matches!(source.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound));
        let read = READS.iter().any(|r| path.ends_with(r))
            || path == "/api/runs/list"
            || path == super::protocol::EVENTS_LIST;
        if !(refused || (read && error.is_unreachable())) {
            return Ok(false);
        }
        let found = super::home::connect(&origin.home, origin.server_bin.as_deref()).await?;
        *self.http.lock().unwrap_or_else(|e| e.into_inner()) = found.http();
        *self.url.lock().unwrap_or_else(|e| e.into_inner()) = found.url();
        Ok(true)
    }

    /// The project.
    pub fn project(&self) -> &str {
        &self.project
    }

    /// `/api/project/{project}/{route}`.
    fn path(&self, route: &str) -> String {
        format!("/api/project/{}/{route}", self.project)
    }

    /// POSTs `body` to a project route and reads the JSON answer.
    pub async fn call<T: DeserializeOwned>(
        &self,
        route: &str,
        body: &impl Serialize,
    ) -> Result<T, ServerError> {
        self.post(&self.path(route), body, REQUEST_TIMEOUT).await
    }

    /// POSTs `body` to an absolute path (`/api/runs/list`) within `timeout`.
    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
        timeout: Duration,
    ) -> Result<T, ServerError> {
        let body = serde_json::to_vec(body).map_err(HttpError::from)?;
        self.post_bytes(path, body, timeout).await
    }

    /// POSTs `bytes` as they are (not JSON) to a project route with a query (`route?…`)
    /// and reads the JSON answer, the whole request given `timeout`.
    pub async fn upload<T: DeserializeOwned>(
        &self,
        route: &str,
        bytes: Vec<u8>,
        timeout: Duration,
    ) -> Result<T, ServerError> {
        self.post_bytes(&self.path(route), bytes, timeout).await
    }

    /// POSTs `body` to `path` within `timeout` and reads the JSON answer (sent again once
    /// when [`Self::recover`] says so).
    async fn post_bytes<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<T, ServerError> {
        let sent = self
            .http()
            .json(timeout, Method::POST, path, Some(body.clone()))
            .await;
        match sent {
            Err(e) if self.recover(path, &e).await? => self
                .http()
                .json(timeout, Method::POST, path, Some(body))
                .await
                .map_err(refusal),
            other => other.map_err(refusal),
        }
    }

    /// POSTs `body` to a project route and streams the answer.
    pub async fn stream(
        &self,
        route: &str,
        body: &impl Serialize,
    ) -> Result<ByteStream, ServerError> {
        let body = serde_json::to_vec(body).map_err(HttpError::from)?;
        let path = self.path(route);
        let sent = self
            .http()
            .stream(REQUEST_TIMEOUT, Method::POST, &path, Some(body.clone()))
            .await;
        match sent {
            Err(e) if self.recover(&path, &e).await? => self
                .http()
                .stream(REQUEST_TIMEOUT, Method::POST, &path, Some(body))
                .await
                .map_err(refusal),
            other => other.map_err(refusal),
        }
    }

    /// POSTs `body` to a project route that upgrades the connection to a byte stream.
    pub async fn tunnel(
        &self,
        route: &str,
        body: &impl Serialize,
    ) -> Result<Box<dyn Duplex>, ServerError> {
        let body = serde_json::to_vec(body).map_err(HttpError::from)?;
        let path = self.path(route);
        let tunnel = super::protocol::TUNNEL;
        let sent = self
            .http()
            .upgrade(REQUEST_TIMEOUT, &path, body.clone(), tunnel)
            .await;
        match sent {
            Err(e) if self.recover(&path, &e).await? => self
                .http()
                .upgrade(REQUEST_TIMEOUT, &path, body, tunnel)
                .await
                .map_err(refusal),
            other => other.map_err(refusal),
        }
    }

    /// Whether the server answers (`/api/server/get_info`), within `timeout`.
    pub async fn info(&self, timeout: Duration) -> Result<serde_json::Value, ServerError> {
        self.post("/api/server/get_info", &serde_json::json!({}), timeout)
            .await
    }
}

/// An error status with dstack's error body as a refusal.
fn refusal(e: HttpError) -> ServerError {
    match e {
        HttpError::Status {
            status, message, ..
        } => match serde_json::from_str::<ErrorBody>(&message) {
            Ok(body) if !body.detail.is_empty() => ServerError::Refused {
                status,
                code: body.detail[0].code.clone(),
                message: body.detail[0].msg.clone(),
            },
            _ => ServerError::Refused {
                status,
                code: "error".to_string(),
                message: format!("the server answered {status}: {message}"),
            },
        },
        other => ServerError::Http(other),
    }
}
