//! The engine's side of the agent API, over an [`HttpClient`]: a unix socket for the local
//! agent, whose connections are kept alive and reused; an [`AgentDialer`] such as SSH
//! channels to the agent's socket on a remote host, one connection per request.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_core::Stream;
use futures_util::StreamExt;
use hyper::Method;

use super::protocol::{
    Healthcheck, JobInfo, JobSubmit, LeaseStatus, SshEndpoint, SshRequest, StopRequest,
    EVENTS_SILENCE, SSH_UPGRADE,
};
pub use crate::http::client::{
    ByteStream, Dialer as AgentDialer, Duplex as AgentStream, HttpError as AgentError,
    REQUEST_TIMEOUT,
};
use crate::http::client::{HttpClient, Transport};

/// A stream of job updates from the agent.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<JobInfo, AgentError>> + Send>>;

/// Who an agent client talks to, for messages.
const PEER: &str = "the agent";

/// How long an archive's upload may take (100 MiB over a slow link).
const UPLOAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// A client of one agent.
#[derive(Clone, Debug)]
pub struct AgentClient {
    http: HttpClient,
}

impl AgentClient {
    /// A client of the agent listening on the unix socket `socket`.
    pub fn unix(socket: impl Into<PathBuf>) -> Self {
        AgentClient {
            http: HttpClient::new(Transport::Unix(socket.into()), PEER, "dstack-agent"),
        }
    }

    /// A client of an agent reached through `dialer`.
    pub fn dial(dialer: Arc<dyn AgentDialer>) -> Self {
        AgentClient {
            http: HttpClient::new(Transport::Dialer(dialer), PEER, "dstack-agent"),
        }
    }

    /// The same client, sending `token` (what the agent wrote to its state directory's
    /// [`super::TOKEN_FILE`]) with every request.
    pub fn with_token(mut self, token: &str) -> Self {
        self.http = self.http.with_token(token);
        self
    }

    /// A client of the agent on this machine listening on `socket` whose state directory is
    /// `state_dir` (where it reads the agent's token).
    pub fn local(socket: impl Into<PathBuf>, state_dir: &Path) -> std::io::Result<Self> {
        let token = std::fs::read_to_string(state_dir.join(super::TOKEN_FILE))?;
        Ok(AgentClient::unix(socket).with_token(&token))
    }

    /// The local socket path, for an agent on this machine.
    pub fn socket(&self) -> Option<&Path> {
        match self.http.transport() {
            Transport::Unix(path) => Some(path),
            _ => None,
        }
    }

    /// Where the agent is, for messages.
    pub fn target(&self) -> String {
        self.http.target()
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, AgentError> {
        self.http.send(REQUEST_TIMEOUT, method, path, body).await
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, AgentError> {
        self.http.json(REQUEST_TIMEOUT, method, path, body).await
    }

    /// `GET /api/healthcheck`, answered at once by a live agent: one that has not answered
    /// within [`EVENTS_SILENCE`] is taken as hung.
    pub async fn healthcheck(&self) -> Result<Healthcheck, AgentError> {
        self.http
            .json(EVENTS_SILENCE, Method::GET, "/api/healthcheck", None)
            .await
    }

    /// `POST /api/jobs`: starts a job (idempotent by id).
    pub async fn submit(&self, job: &JobSubmit) -> Result<JobInfo, AgentError> {
        self.json(Method::POST, "/api/jobs", Some(serde_json::to_vec(job)?))
            .await
    }

    /// `POST /api/jobs` with a list: starts (or queues) the jobs in order, each as
    /// [`AgentClient::submit`] would. An error is the first job refused; the jobs before it
    /// were taken.
    pub async fn submit_all(&self, jobs: &[JobSubmit]) -> Result<Vec<JobInfo>, AgentError> {
        self.json(Method::POST, "/api/jobs", Some(serde_json::to_vec(jobs)?))
            .await
    }

    /// `GET /api/archives/{hash}`: whether the agent holds the archive with this hash.
    pub async fn has_archive(&self, hash: &str) -> Result<bool, AgentError> {
        match self
            .send(Method::GET, &format!("/api/archives/{hash}"), None)
            .await
        {
            Ok(_) => Ok(true),
            Err(AgentError::Status { status: 404, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `PUT /api/archives/{hash}`: gives the agent an archive (`bytes`, whose SHA-256 is
    /// `hash`), which it keeps for the jobs that start from it.
    pub async fn put_archive(&self, hash: &str, bytes: Vec<u8>) -> Result<(), AgentError> {
        self.http
            .send(
                UPLOAD_TIMEOUT,
                Method::PUT,
                &format!("/api/archives/{hash}"),
                Some(bytes),
            )
            .await
            .map(|_| ())
    }

    /// `GET /api/jobs/{id}/artifacts`: the job's artifact files with their hashes.
    pub async fn artifacts(&self, id: &str) -> Result<super::ArtifactListing, AgentError> {
        self.json(Method::GET, &format!("/api/jobs/{id}/artifacts"), None)
            .await
    }

    /// `POST /api/jobs/{id}/artifacts`: a tar of the job's artifact files `paths`, streamed.
    pub async fn artifact_files(
        &self,
        id: &str,
        paths: &[String],
    ) -> Result<ByteStream, AgentError> {
        let path = format!("/api/jobs/{id}/artifacts");
        let body = serde_json::to_vec(paths)?;
        self.http
            .stream(UPLOAD_TIMEOUT, Method::POST, &path, Some(body))
            .await
    }

    /// `GET /api/lease`: the agent's owner lease.
    pub async fn lease(&self) -> Result<LeaseStatus, AgentError> {
        self.json(Method::GET, "/api/lease", None).await
    }

    /// `POST /api/lease`: renews the agent's owner lease (see [`LeaseStatus`]).
    pub async fn renew_lease(&self) -> Result<LeaseStatus, AgentError> {
        self.json(Method::POST, "/api/lease", None).await
    }

    /// `GET /api/jobs/{id}`; `None` when the agent does not know the job.
    pub async fn job(&self, id: &str) -> Result<Option<JobInfo>, AgentError> {
        match self
            .json(Method::GET, &format!("/api/jobs/{id}"), None)
            .await
        {
            Err(AgentError::Status { status: 404, .. }) => Ok(None),
            other => other.map(Some),
        }
    }

    /// `GET /api/jobs`.
    pub async fn jobs(&self) -> Result<Vec<JobInfo>, AgentError> {
        self.json(Method::GET, "/api/jobs", None).await
    }

    /// `POST /api/jobs/{id}/stop`.
    pub async fn stop(&self, id: &str, req: &StopRequest) -> Result<JobInfo, AgentError> {
        let path = format!("/api/jobs/{id}/stop");
        self.json(Method::POST, &path, Some(serde_json::to_vec(req)?))
            .await
    }

    /// `DELETE /api/jobs/{id}`.
    pub async fn remove(&self, id: &str) -> Result<(), AgentError> {
        self.send(Method::DELETE, &format!("/api/jobs/{id}"), None)
            .await
            .map(|_| ())
    }

    /// `GET /api/jobs/{id}/logs`: the output from byte `offset`, following while `follow`.
    pub async fn logs(
        &self,
        id: &str,
        offset: u64,
        follow: bool,
    ) -> Result<ByteStream, AgentError> {
        self.body_stream(
            &format!("/api/jobs/{id}/logs?offset={offset}&follow={follow}"),
            REQUEST_TIMEOUT,
        )
        .await
    }

    /// `GET /api/jobs/{id}/logs?since=`: the output from the first chunk written at `since_ms`
    /// (Unix ms) or later, following while `follow`.
    pub async fn logs_since(
        &self,
        id: &str,
        since_ms: u64,
        follow: bool,
    ) -> Result<ByteStream, AgentError> {
        self.body_stream(
            &format!("/api/jobs/{id}/logs?since={since_ms}&follow={follow}"),
            REQUEST_TIMEOUT,
        )
        .await
    }

    /// `GET /api/jobs/{id}/metrics`: the JSON lines the job wrote to `$DSTACK_METRICS_FILE`.
    pub async fn metrics(&self, id: &str) -> Result<Bytes, AgentError> {
        let path = format!("/api/jobs/{id}/metrics");
        self.http
            .bytes(REQUEST_TIMEOUT, Method::GET, &path, None)
            .await
    }

    /// `GET /api/jobs/{id}/ssh`: the SSH endpoint of a running job (the host key to pin, the
    /// user and directory sessions get).
    pub async fn ssh_endpoint(&self, id: &str) -> Result<SshEndpoint, AgentError> {
        self.json(Method::GET, &format!("/api/jobs/{id}/ssh"), None)
            .await
    }

    /// `POST /api/jobs/{id}/ssh`: one SSH connection into a running job, for clients holding
    /// one of `request`'s keys (the agent is the SSH server on the returned stream).
    pub async fn ssh(
        &self,
        id: &str,
        request: &SshRequest,
    ) -> Result<Box<dyn AgentStream>, AgentError> {
        let path = format!("/api/jobs/{id}/ssh");
        let body = serde_json::to_vec(request)?;
        self.http
            .upgrade(REQUEST_TIMEOUT, &path, body, SSH_UPGRADE)
            .await
    }

    /// `GET /api/events`: the state of every job, then every change. The stream ends with an
    /// `Unreachable` error (of kind `TimedOut`) when the agent stays silent for
    /// [`EVENTS_SILENCE`]: it sends a heartbeat more often than that.
    pub async fn events(&self) -> Result<EventStream, AgentError> {
        let bytes = self.body_stream("/api/events", EVENTS_SILENCE).await?;
        Ok(Box::pin(json_lines(bytes, self.target())))
    }

    /// A GET whose body is consumed as a stream of chunks; the response head is awaited at
    /// most `timeout`.
    async fn body_stream(&self, path: &str, timeout: Duration) -> Result<ByteStream, AgentError> {
        self.http.stream(timeout, Method::GET, path, None).await
    }
}

/// Splits the event stream of the agent at `target` into JSON lines, skipping heartbeats
/// (empty lines); ends with an error when nothing came for [`EVENTS_SILENCE`].
fn json_lines(
    bytes: ByteStream,
    target: String,
) -> impl Stream<Item = Result<JobInfo, AgentError>> + Send {
    // Why the stream ended, when it was not the agent's HTTP connection failing.
    let ended = |target: &str, kind, message: String| AgentError::Unreachable {
        target: target.to_string(),
        source: std::io::Error::new(kind, message),
    };
    futures_util::stream::unfold(
        (bytes, BytesMut::new(), false, target),
        move |(mut bytes, mut buf, done, target)| async move {
            loop {
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line = buf.split_to(pos + 1);
                    if pos == 0 {
                        continue; // a heartbeat
                    }
                    let item =
                        serde_json::from_slice::<JobInfo>(&line[..pos]).map_err(AgentError::from);
                    return Some((item, (bytes, buf, done, target)));
                }
                if done {
                    return None;
                }
                let Ok(next) = tokio::time::timeout(EVENTS_SILENCE, bytes.next()).await else {
                    let silent = format!(
                        "its event stream was silent for {} s",
                        EVENTS_SILENCE.as_secs()
                    );
                    let e = ended(&target, std::io::ErrorKind::TimedOut, silent);
                    return Some((Err(e), (bytes, buf, true, target)));
                };
                match next {
                    Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                    Some(Err(e)) => return Some((Err(e), (bytes, buf, true, target))),
                    None => {
                        let closed = "its event stream closed".to_string();
                        let e = ended(&target, std::io::ErrorKind::UnexpectedEof, closed);
                        return Some((Err(e), (bytes, buf, true, target)));
                    }
                }
            }
        },
    )
}
