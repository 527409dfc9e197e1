//! The engine's side of the agent API: HTTP/1.1 over a transport (a unix socket for the
//! local agent, whose connections are kept alive and reused; an [`AgentDialer`] such as SSH
//! channels to the agent's socket on a remote host, one connection per request).

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_core::Stream;
use futures_util::{StreamExt, TryStreamExt};
use http_body_util::{BodyExt, BodyStream, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use super::protocol::{Healthcheck, JobInfo, JobSubmit, LeaseStatus, StopRequest, EVENTS_SILENCE};

/// A failure talking to an agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent could not be reached (not running, socket missing, connection dropped).
    #[error("cannot reach the agent at {target}: {source}")]
    Unreachable {
        /// Where the agent was expected.
        target: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The HTTP exchange failed midway.
    #[error("agent connection failed: {0}")]
    Http(#[from] hyper::Error),
    /// The agent answered with an error status.
    #[error("agent answered {status}: {message}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The agent's message.
        message: String,
    },
    /// The agent's answer was not the expected JSON.
    #[error("unexpected answer from the agent: {0}")]
    Decode(#[from] serde_json::Error),
    /// The agent's answer was larger than a client reads ([`MAX_ANSWER_BYTES`]).
    #[error("the agent's answer is larger than {} bytes", MAX_ANSWER_BYTES)]
    TooLarge,
}

impl AgentError {
    /// Whether the agent was not found at all (as opposed to answering with an error).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, AgentError::Unreachable { .. } | AgentError::Http(_))
    }
}

/// A bidirectional byte stream to an agent.
pub trait AgentStream:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static
{
}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> AgentStream for T {}

/// Opens connections to an agent that is not behind a local unix socket (e.g. an SSH channel
/// to the agent's socket on a remote host). Each request opens one connection.
pub trait AgentDialer: Send + Sync + 'static {
    /// Opens one connection to the agent.
    fn dial(&self) -> crate::backend::BoxFuture<'_, std::io::Result<Box<dyn AgentStream>>>;
    /// Where the agent is, for messages (`user@host:port:/path/agent.sock`).
    fn target(&self) -> String;
}

#[derive(Clone)]
enum Transport {
    Unix(PathBuf),
    Dialer(Arc<dyn AgentDialer>),
}

type Io = TokioIo<Box<dyn AgentStream>>;

/// How long an agent may take to answer a request (the response head; streamed bodies may
/// last as long as they need).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A byte stream from the agent (logs).
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, AgentError>> + Send>>;
/// A stream of job updates from the agent.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<JobInfo, AgentError>> + Send>>;

/// A request sender on one HTTP/1.1 connection to an agent.
type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// How many idle keep-alive connections a local agent's client keeps.
const IDLE_CONNECTIONS: usize = 4;

/// How long an idle keep-alive connection is reused: well within the agent's
/// header-read timeout, which closes connections that stay idle longer (a request sent as
/// the agent closes its connection would fail).
const IDLE_REUSE: Duration = Duration::from_secs(3);

/// The largest answer (JSON, metrics, error text) a client reads whole; logs and events are
/// streamed and not bounded.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

/// A client of one agent.
#[derive(Clone)]
pub struct AgentClient {
    transport: Transport,
    /// The secret the agent's API requires (its state directory's [`super::TOKEN_FILE`]).
    token: Option<Arc<str>>,
    /// Idle keep-alive connections to a local agent, reused by the next request (a request
    /// body is read whole, so its connection is free again once the answer is read), each
    /// with when it became idle.
    idle: Arc<std::sync::Mutex<Vec<(Sender, tokio::time::Instant)>>>,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AgentClient({})", self.target())
    }
}

impl AgentClient {
    /// A client of the agent listening on the unix socket `socket`.
    pub fn unix(socket: impl Into<PathBuf>) -> Self {
        AgentClient {
            transport: Transport::Unix(socket.into()),
            token: None,
            idle: Default::default(),
        }
    }

    /// A client of an agent reached through `dialer`.
    pub fn dial(dialer: Arc<dyn AgentDialer>) -> Self {
        AgentClient {
            transport: Transport::Dialer(dialer),
            token: None,
            idle: Default::default(),
        }
    }

    /// The same client, sending `token` (what the agent wrote to its state directory's
    /// [`super::TOKEN_FILE`]) with every request.
    pub fn with_token(mut self, token: &str) -> Self {
        self.token = Some(Arc::from(token.trim()));
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
        match &self.transport {
            Transport::Unix(path) => Some(path),
            Transport::Dialer(_) => None,
        }
    }

    /// Where the agent is, for messages.
    pub fn target(&self) -> String {
        match &self.transport {
            Transport::Unix(path) => path.display().to_string(),
            Transport::Dialer(dialer) => dialer.target(),
        }
    }

    async fn connect(&self) -> Result<Io, AgentError> {
        let stream: std::io::Result<Box<dyn AgentStream>> = match &self.transport {
            Transport::Unix(path) => tokio::net::UnixStream::connect(path)
                .await
                .map(|s| Box::new(s) as Box<dyn AgentStream>),
            Transport::Dialer(dialer) => dialer.dial().await,
        };
        let stream = stream.map_err(|source| AgentError::Unreachable {
            target: self.target(),
            source,
        })?;
        Ok(TokioIo::new(stream))
    }

    /// Sends a request and waits for the response head, at most [`REQUEST_TIMEOUT`].
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response<Incoming>, AgentError> {
        self.send_within(REQUEST_TIMEOUT, method, path, body)
            .await
            .map(|(resp, _)| resp)
    }

    /// Sends a request and waits for the response head at most `timeout`; returns it with the
    /// connection's sender (for [`Self::release`] once the response body has been read).
    async fn send_within(
        &self,
        timeout: Duration,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(Response<Incoming>, Sender), AgentError> {
        let body = Bytes::from(body.unwrap_or_default());
        match tokio::time::timeout(timeout, self.exchange(method, path, body)).await {
            Ok(result) => result,
            Err(_) => Err(AgentError::Unreachable {
                target: self.target(),
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the agent did not answer in time",
                ),
            }),
        }
    }

    /// An idle connection that is still open, if any.
    fn reuse(&self) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((sender, since)) = idle.pop() {
            if !sender.is_closed() && since.elapsed() < IDLE_REUSE {
                return Some(sender);
            }
        }
        None
    }

    /// Keeps a connection whose response was read whole for the next request (local agents).
    fn release(&self, sender: Sender) {
        if matches!(self.transport, Transport::Unix(_)) && !sender.is_closed() {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < IDLE_CONNECTIONS {
                idle.push((sender, tokio::time::Instant::now()));
            }
        }
    }

    async fn open(&self) -> Result<Sender, AgentError> {
        let io = self.connect().await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        Ok(sender)
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<(Response<Incoming>, Sender), AgentError> {
        let request = || {
            let mut req = Request::builder()
                .method(method.clone())
                .uri(path)
                .header("host", "dstack-agent");
            if !body.is_empty() {
                req = req.header("content-type", "application/json");
            }
            if let Some(token) = &self.token {
                req = req.header("authorization", format!("Bearer {token}"));
            }
            req.body(Full::new(body.clone()))
                .map_err(|e| AgentError::Status {
                    status: 0,
                    message: e.to_string(),
                })
        };
        // A kept connection is used once it has finished its previous exchange; one that
        // closed meanwhile (the agent restarted) is dropped, and a request it did not take
        // goes on a new connection. A request that was sent is never sent twice.
        let mut reused = None;
        if let Some(mut sender) = self.reuse() {
            if sender.ready().await.is_ok() {
                match sender.try_send_request(request()?).await {
                    Ok(resp) => reused = Some((resp, sender)),
                    Err(e) if e.message().is_some() => {}
                    Err(e) => return Err(e.into_error().into()),
                }
            }
        }
        let (resp, sender) = match reused {
            Some(done) => done,
            None => {
                let mut sender = self.open().await?;
                let resp = sender.send_request(request()?).await?;
                (resp, sender)
            }
        };
        if resp.status().is_success() {
            return Ok((resp, sender));
        }
        let status = resp.status().as_u16();
        let bytes = read_whole(resp).await?;
        self.release(sender);
        Err(AgentError::Status {
            status,
            message: String::from_utf8_lossy(&bytes).trim().to_string(),
        })
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, AgentError> {
        self.json_within(REQUEST_TIMEOUT, method, path, body).await
    }

    /// [`Self::json`], waiting for the response head at most `timeout`.
    async fn json_within<T: DeserializeOwned>(
        &self,
        timeout: Duration,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, AgentError> {
        let (resp, sender) = self.send_within(timeout, method, path, body).await?;
        let bytes = read_whole(resp).await?;
        self.release(sender);
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// `GET /api/healthcheck`, answered at once by a live agent: one that has not answered
    /// within [`EVENTS_SILENCE`] is taken as hung.
    pub async fn healthcheck(&self) -> Result<Healthcheck, AgentError> {
        self.json_within(EVENTS_SILENCE, Method::GET, "/api/healthcheck", None)
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

    /// `GET /api/jobs/{id}/metrics`: the JSON lines the job wrote to `$DSTACK_METRICS_FILE`.
    pub async fn metrics(&self, id: &str) -> Result<Bytes, AgentError> {
        let resp = self
            .send(Method::GET, &format!("/api/jobs/{id}/metrics"), None)
            .await?;
        read_whole(resp).await
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
        let (resp, _) = self.send_within(timeout, Method::GET, path, None).await?;
        let stream = TryStreamExt::map_err(BodyStream::new(resp.into_body()), AgentError::Http)
            .try_filter_map(|frame| async move { Ok(frame.into_data().ok()) });
        Ok(Box::pin(stream))
    }
}

/// The whole body of an answer, at most [`MAX_ANSWER_BYTES`].
async fn read_whole(resp: Response<Incoming>) -> Result<Bytes, AgentError> {
    match Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => match e.downcast::<hyper::Error>() {
            Ok(e) => Err(AgentError::Http(*e)),
            Err(_) => Err(AgentError::TooLarge),
        },
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
