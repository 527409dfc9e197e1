//! Connections to service replicas: HTTP/1.1 over the transport the engine already has to
//! the replica's host ([`Engine::dial_port`]: a local TCP connection, a channel of the SSH
//! connection to a fleet host, a container's port published on its host's loopback), never
//! a port opened on the network. Idle connections are kept per replica for the next request.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dstack_core::engine::Engine;
use dstack_core::http::serve::Body;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// Idle connections kept per replica.
const IDLE_PER_REPLICA: usize = 64;

/// Why a replica did not answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    /// No connection could be opened (nothing was sent: another replica may be tried).
    #[error("cannot connect to the replica: {0}")]
    Connect(String),
    /// The replica did not answer within the proxy's timeout.
    #[error("the replica did not answer within {} s", .0.as_secs())]
    Timeout(Duration),
    /// The connection failed while the request was under way.
    #[error("the replica's connection failed: {0}")]
    Failed(String),
    /// The connection closed before the request was sent: it can go to another replica.
    #[error("the replica's connection closed before the request was sent")]
    NotSent(Box<Request<Body>>),
}

type Key = (String, u16);

/// Pooled connections to replicas.
pub(crate) struct Upstream {
    engine: Engine,
    idle: Arc<Mutex<HashMap<Key, Vec<SendRequest<Body>>>>>,
}

impl Upstream {
    /// Connections through `engine`'s transports.
    pub fn new(engine: Engine) -> Self {
        Upstream {
            engine,
            idle: Arc::default(),
        }
    }

    /// A connection to `port` on the host of `instance_id`: an idle one, or a new one.
    pub async fn connect(&self, instance_id: &str, port: u16) -> Result<Connection, UpstreamError> {
        let key = (instance_id.to_string(), port);
        loop {
            let pooled = {
                let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                idle.get_mut(&key).and_then(Vec::pop)
            };
            match pooled {
                Some(sender) if sender.is_ready() => {
                    return Ok(Connection {
                        sender,
                        key,
                        idle: self.idle.clone(),
                    })
                }
                Some(_) => continue, // closed meanwhile
                None => break,
            }
        }
        let stream = self
            .engine
            .dial_port(instance_id, port)
            .await
            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        tokio::spawn(async move {
            // Ends when the connection closes; its requests see the error.
            let _ = connection.with_upgrades().await;
        });
        Ok(Connection {
            sender,
            key,
            idle: self.idle.clone(),
        })
    }

    /// Whether a TCP connection to `port` on the host of `instance_id` can be opened.
    pub async fn port_open(&self, instance_id: &str, port: u16) -> Result<(), String> {
        self.engine
            .dial_port(instance_id, port)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

/// A connection to one replica, ready for a request.
pub(crate) struct Connection {
    sender: SendRequest<Body>,
    key: Key,
    idle: Arc<Mutex<HashMap<Key, Vec<SendRequest<Body>>>>>,
}

impl Connection {
    /// Sends `req` and waits up to `timeout` for the answer's head; the connection goes
    /// back to the pool once the answer's body has been read.
    pub async fn send(
        mut self,
        req: Request<Body>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let answer = tokio::time::timeout(timeout, self.sender.try_send_request(req))
            .await
            .map_err(|_| UpstreamError::Timeout(timeout))?
            .map_err(|mut e| match e.take_message() {
                Some(req) => UpstreamError::NotSent(Box::new(req)),
                None => UpstreamError::Failed(e.into_error().to_string()),
            })?;
        let Connection {
            mut sender,
            key,
            idle,
        } = self;
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                let mut idle = idle.lock().unwrap_or_else(|e| e.into_inner());
                let senders = idle.entry(key).or_default();
                if senders.len() < IDLE_PER_REPLICA {
                    senders.push(sender);
                }
            }
        });
        Ok(answer)
    }
}

/// A replica's answer body (or a client's request body) as a body this server sends.
pub(crate) fn incoming_body(body: Incoming) -> Body {
    use http_body_util::BodyExt;
    body.map_err(io::Error::other).boxed_unsync()
}
