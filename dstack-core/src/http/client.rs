//! HTTP/1.1 client of the JSON APIs this project speaks: a host agent's (over its unix socket
//! or an SSH channel) and a `dstack server`'s (over TCP). One [`HttpClient`] per peer; on a
//! local transport its connections are kept alive and reused.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_core::Stream;
use futures_util::TryStreamExt;
use http_body_util::{BodyExt, BodyStream, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

/// A failure talking to a peer (an agent or a server).
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The peer could not be reached (not running, socket missing, connection dropped).
    #[error("cannot reach {target}: {source}")]
    Unreachable {
        /// Who and where the peer was expected (`the agent at /path/agent.sock`).
        target: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The HTTP exchange failed midway.
    #[error("connection failed: {0}")]
    Http(#[from] hyper::Error),
    /// The peer answered with an error status.
    #[error("{peer} answered {status}: {message}")]
    Status {
        /// Who answered (`the agent`, `the server`).
        peer: &'static str,
        /// The HTTP status.
        status: u16,
        /// The peer's message.
        message: String,
    },
    /// The answer was not the expected JSON.
    #[error("unexpected answer: {0}")]
    Decode(#[from] serde_json::Error),
    /// The answer was larger than a client reads ([`MAX_ANSWER_BYTES`]).
    #[error("the answer is larger than {} bytes", MAX_ANSWER_BYTES)]
    TooLarge,
}

impl HttpError {
    /// Whether the peer was not found at all (as opposed to answering with an error).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, HttpError::Unreachable { .. } | HttpError::Http(_))
    }

    /// The HTTP status of an error answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            HttpError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A bidirectional byte stream to a peer.
pub trait Duplex: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Duplex for T {}

/// Opens connections to a peer that is not behind a local socket (e.g. an SSH channel to an
/// agent's socket on a remote host). Each request opens one connection.
pub trait Dialer: Send + Sync + 'static {
    /// Opens one connection.
    fn dial(&self) -> crate::backend::BoxFuture<'_, std::io::Result<Box<dyn Duplex>>>;
    /// Where the peer is, for messages (`user@host:port:/path/agent.sock`).
    fn target(&self) -> String;
}

/// How a client reaches its peer.
#[derive(Clone)]
pub enum Transport {
    /// A unix socket on this machine.
    Unix(PathBuf),
    /// A TCP address (`host:port`).
    Tcp(String),
    /// Connections opened by a [`Dialer`], one per request.
    Dialer(Arc<dyn Dialer>),
}

type Io = TokioIo<Box<dyn Duplex>>;

/// How long a peer may take to answer a request (the response head; streamed bodies may last
/// as long as they need).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A byte stream from a peer (logs).
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, HttpError>> + Send>>;

/// A request sender on one HTTP/1.1 connection.
type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// How many idle keep-alive connections a client keeps.
const IDLE_CONNECTIONS: usize = 4;

/// How long an idle keep-alive connection is reused: well within the peers' header-read
/// timeout, which closes connections that stay idle longer (a request sent as the peer
/// closes its connection would fail).
const IDLE_REUSE: Duration = Duration::from_secs(3);

/// The largest answer (JSON, metrics, error text) a client reads whole; logs and events are
/// streamed and not bounded.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

/// A client of one peer.
#[derive(Clone)]
pub struct HttpClient {
    transport: Transport,
    /// Who the peer is, for messages (`the agent`, `the server`).
    peer: &'static str,
    /// The `Host` header.
    host: Arc<str>,
    /// Sent as `Authorization: Bearer` with every request.
    token: Option<Arc<str>>,
    /// Sent as `Accept` with every request.
    accept: Option<Arc<str>>,
    /// Idle keep-alive connections, reused by the next request (a request body is read
    /// whole, so its connection is free again once the answer is read), each with when it
    /// became idle.
    idle: Arc<std::sync::Mutex<Vec<(Sender, tokio::time::Instant)>>>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HttpClient({})", self.target())
    }
}

impl HttpClient {
    /// A client of `peer` (`the agent`) reached through `transport`, sending `host` as the
    /// `Host` header.
    pub fn new(transport: Transport, peer: &'static str, host: &str) -> Self {
        HttpClient {
            transport,
            peer,
            host: Arc::from(host),
            token: None,
            accept: None,
            idle: Default::default(),
        }
    }

    /// The same client, sending `token` with every request.
    pub fn with_token(mut self, token: &str) -> Self {
        self.token = Some(Arc::from(token.trim()));
        self
    }

    /// The same client, sending `accept` as the `Accept` header with every request.
    pub fn with_accept(mut self, accept: &str) -> Self {
        self.accept = Some(Arc::from(accept));
        self
    }

    /// How the peer is reached.
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// Who and where the peer is, for messages.
    pub fn target(&self) -> String {
        let place = match &self.transport {
            Transport::Unix(path) => path.display().to_string(),
            Transport::Tcp(addr) => addr.clone(),
            Transport::Dialer(dialer) => dialer.target(),
        };
        format!("{} at {place}", self.peer)
    }

    /// Opens one connection to the peer.
    pub async fn connect(&self) -> Result<Box<dyn Duplex>, HttpError> {
        let stream: std::io::Result<Box<dyn Duplex>> = match &self.transport {
            Transport::Unix(path) => tokio::net::UnixStream::connect(path)
                .await
                .map(|s| Box::new(s) as Box<dyn Duplex>),
            Transport::Tcp(addr) => tokio::net::TcpStream::connect(addr.as_str())
                .await
                .and_then(|s| s.set_nodelay(true).map(|()| s))
                .map(|s| Box::new(s) as Box<dyn Duplex>),
            Transport::Dialer(dialer) => dialer.dial().await,
        };
        stream.map_err(|source| HttpError::Unreachable {
            target: self.target(),
            source,
        })
    }

    /// Sends a request and waits for the response head at most `timeout`; an error status is
    /// returned as [`HttpError::Status`] with the answer's text.
    pub async fn send(
        &self,
        timeout: Duration,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response<Incoming>, HttpError> {
        self.send_within(timeout, method, path, body)
            .await
            .map(|(resp, _)| resp)
    }

    /// [`Self::send`], returning the connection's sender too (for [`Self::release`] once the
    /// response body has been read).
    async fn send_within(
        &self,
        timeout: Duration,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(Response<Incoming>, Sender), HttpError> {
        let body = Bytes::from(body.unwrap_or_default());
        match tokio::time::timeout(timeout, self.exchange(method, path, body)).await {
            Ok(result) => result,
            Err(_) => Err(self.timed_out()),
        }
    }

    /// The error of a request the peer did not answer in time.
    fn timed_out(&self) -> HttpError {
        HttpError::Unreachable {
            target: self.target(),
            source: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{} did not answer in time", self.peer),
            ),
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

    /// Keeps a connection whose response was read whole for the next request (not over a
    /// dialer, whose connections are one per request).
    fn release(&self, sender: Sender) {
        if !matches!(self.transport, Transport::Dialer(_)) && !sender.is_closed() {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < IDLE_CONNECTIONS {
                idle.push((sender, tokio::time::Instant::now()));
            }
        }
    }

    /// Adds the token and `Accept` headers.
    fn headers(&self, mut req: hyper::http::request::Builder) -> hyper::http::request::Builder {
        if let Some(token) = &self.token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        if let Some(accept) = &self.accept {
            req = req.header("accept", &**accept);
        }
        req
    }

    /// POSTs `body` to `path` asking to upgrade the connection to `protocol`, and returns the
    /// upgraded connection: a byte stream both ways (a tunnel).
    pub async fn upgrade(
        &self,
        timeout: Duration,
        path: &str,
        body: Vec<u8>,
        protocol: &str,
    ) -> Result<Box<dyn Duplex>, HttpError> {
        let exchange = async {
            let io: Io = TokioIo::new(self.connect().await?);
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn.with_upgrades());
            let req = self
                .headers(Request::builder().method(Method::POST).uri(path))
                .header("host", &*self.host)
                .header("content-type", "application/json")
                .header("connection", "upgrade")
                .header("upgrade", protocol)
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| HttpError::Status {
                    peer: self.peer,
                    status: 0,
                    message: e.to_string(),
                })?;
            let resp = sender.send_request(req).await?;
            if resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
                let status = resp.status().as_u16();
                let bytes = read_whole(resp).await?;
                return Err(HttpError::Status {
                    peer: self.peer,
                    status,
                    message: String::from_utf8_lossy(&bytes).trim().to_string(),
                });
            }
            let upgraded = hyper::upgrade::on(resp).await?;
            Ok(Box::new(TokioIo::new(upgraded)) as Box<dyn Duplex>)
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(self.timed_out()),
        }
    }

    async fn open(&self) -> Result<Sender, HttpError> {
        let io: Io = TokioIo::new(self.connect().await?);
        let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        Ok(sender)
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<(Response<Incoming>, Sender), HttpError> {
        let request = || {
            let mut req = Request::builder()
                .method(method.clone())
                .uri(path)
                .header("host", &*self.host);
            if !body.is_empty() {
                req = req.header("content-type", "application/json");
            }
            req = self.headers(req);
            req.body(Full::new(body.clone()))
                .map_err(|e| HttpError::Status {
                    peer: self.peer,
                    status: 0,
                    message: e.to_string(),
                })
        };
        // A kept connection is used once it has finished its previous exchange; one that
        // closed meanwhile (the peer restarted) is dropped, and a request it did not take
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
        Err(HttpError::Status {
            peer: self.peer,
            status,
            message: String::from_utf8_lossy(&bytes).trim().to_string(),
        })
    }

    /// The whole answer to a request (at most [`MAX_ANSWER_BYTES`]), its head awaited at most
    /// `timeout`.
    pub async fn bytes(
        &self,
        timeout: Duration,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, HttpError> {
        let (resp, sender) = self.send_within(timeout, method, path, body).await?;
        let bytes = read_whole(resp).await?;
        self.release(sender);
        Ok(bytes)
    }

    /// The JSON answer to a request, its head awaited at most `timeout`.
    pub async fn json<T: DeserializeOwned>(
        &self,
        timeout: Duration,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, HttpError> {
        let bytes = self.bytes(timeout, method, path, body).await?;
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// A request whose answer is consumed as a stream of chunks; the response head is awaited
    /// at most `timeout`.
    pub async fn stream(
        &self,
        timeout: Duration,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<ByteStream, HttpError> {
        let (resp, _) = self.send_within(timeout, method, path, body).await?;
        let stream = TryStreamExt::map_err(BodyStream::new(resp.into_body()), HttpError::Http)
            .try_filter_map(|frame| async move { Ok(frame.into_data().ok()) });
        Ok(Box::pin(stream))
    }
}

/// The whole body of an answer, at most [`MAX_ANSWER_BYTES`].
async fn read_whole(resp: Response<Incoming>) -> Result<Bytes, HttpError> {
    match Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => match e.downcast::<hyper::Error>() {
            Ok(e) => Err(HttpError::Http(*e)),
            Err(_) => Err(HttpError::TooLarge),
        },
    }
}
