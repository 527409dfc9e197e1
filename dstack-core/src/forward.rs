//! Forwarding a run's ports to this machine while a client is attached, as dstack does: each
//! configured port (`ports:`, a service's `port:`) listens on `127.0.0.1` here (at its
//! `local_port`, or the same number) and every connection is carried to the job's host (over
//! SSH for fleet hosts). Jobs on this machine already listen here, so only their ports moved
//! to another number (`dstack attach -p LOCAL:REMOTE`) are forwarded.

use std::io;
use std::net::IpAddr;

use tokio::net::TcpListener;
use tokio::task::AbortHandle;

use crate::client::protocol::ConnectRequest;
use crate::client::Remote;
use crate::engine::{Engine, EngineError};
use crate::http::client::Duplex;

/// How a forwarded connection reaches the job's host.
#[derive(Clone)]
pub enum Dial {
    /// Through an engine hosted in this process (its SSH links, the container's port).
    Engine(Engine),
    /// Through a `dstack server` (a `runs/connect` tunnel, then the server's engine).
    Server(Remote),
}

impl Dial {
    async fn open(&self, instance_id: &str, port: u16) -> io::Result<Box<dyn Duplex>> {
        match self {
            Dial::Engine(engine) => engine.dial_port(instance_id, port).await,
            Dial::Server(remote) => {
                let request = ConnectRequest {
                    instance_id: instance_id.to_string(),
                    port,
                };
                remote
                    .tunnel("runs/connect", &request)
                    .await
                    .map_err(io::Error::other)
            }
        }
    }
}

/// Forwarded ports; forwarding stops when this is dropped.
pub struct PortForward {
    /// `(local port, port on the job's host)`, as configured.
    pub ports: Vec<(u16, u16)>,
    tasks: Vec<AbortHandle>,
}

impl PortForward {
    /// Nothing forwarded.
    pub(crate) fn none() -> PortForward {
        PortForward {
            ports: Vec::new(),
            tasks: Vec::new(),
        }
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Forwards `ports` (`(local, remote)`) to the host of `instance_id`, listening on `bind`;
/// on this machine (`local`), only those moved to another port (the job already listens on
/// the others here).
pub(crate) async fn forward(
    dial: Dial,
    instance_id: &str,
    ports: Vec<(u16, u16)>,
    local: bool,
    bind: IpAddr,
) -> Result<PortForward, EngineError> {
    let mut tasks = Vec::new();
    for &(here, there) in ports.iter().filter(|(here, there)| !local || here != there) {
        let listener = TcpListener::bind((bind, here)).await.map_err(|e| {
            EngineError::PortUsed(format!(
                "cannot forward port {here}: it is in use here ({e})"
            ))
        })?;
        let task = tokio::spawn(serve(
            dial.clone(),
            instance_id.to_string(),
            listener,
            there,
        ));
        tasks.push(task.abort_handle());
    }
    Ok(PortForward { ports, tasks })
}

async fn serve(dial: Dial, instance_id: String, listener: TcpListener, port: u16) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            continue;
        };
        let dial = dial.clone();
        let instance_id = instance_id.clone();
        tokio::spawn(async move {
            let Ok(mut outbound) = dial.open(&instance_id, port).await else {
                return; // the connection closes: the client sees the refusal
            };
            let _: io::Result<_> = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        });
    }
}
