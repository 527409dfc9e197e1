//! AWS for tests: a moto server (EC2 through the real SDK) on a free loopback port, and a
//! fault proxy in front of it that answers chosen `RunInstances` calls with a capacity error,
//! holds their answer back (as a client killed mid-call would never see it) or loses it (the
//! connection closes once moto has acted), and records what each `RunInstances` asked. moto comes from
//! `pip install "moto[server]"` (`.ci/run` installs it in `~/.cache/dstack-rs/venv`).

use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::http::read_request;
use tokio::net::{TcpListener, TcpStream};

/// A moto server; killed on drop.
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

fn moto_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("MOTO_SERVER") {
        return path.into();
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let venv = PathBuf::from(home).join(".cache/dstack-rs/venv/bin/moto_server");
    if venv.exists() {
        return venv;
    }
    "moto_server".into()
}

impl Moto {
    /// Starts moto and waits until it answers.
    pub fn start() -> Moto {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new(moto_binary())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "AWS tests need moto: pip install \"moto[server]\" (as .ci/run does) or set \
                     MOTO_SERVER: {e}"
                )
            });
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Moto {
                    child,
                    url: format!("http://127.0.0.1:{port}"),
                };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("moto did not start on port {port}");
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the proxy does with a matching call.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// Answer `InsufficientInstanceCapacity` without doing anything.
    NoCapacity,
    /// Do it, then never answer.
    Hang,
    /// Do it, then close the connection without answering.
    LoseAnswer,
}

/// The calls a fault applies to: those whose form body holds every one of these parameters
/// (e.g. `["Action=RunInstances", "InstanceType=t3.medium"]`; a bare name matches any value).
pub type Matcher = Vec<&'static str>;

/// A proxy in front of moto injecting [`Fault`]s; it records the instance types
/// `RunInstances` asked for, and the parameters of each call.
pub struct FaultProxy {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// `RunInstances` instance types, in call order.
    pub asked: Arc<Mutex<Vec<String>>>,
    /// The `Name=value` parameters of each `RunInstances` call, in call order.
    pub run_requests: Arc<Mutex<Vec<Vec<String>>>>,
    faults: Arc<Mutex<Vec<(Matcher, Fault)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` with these faults.
    pub async fn start(upstream: &str, faults: Vec<(Matcher, Fault)>) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let upstream = upstream.trim_start_matches("http://").to_string();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let run_requests = Arc::new(Mutex::new(Vec::new()));
        let seen = Seen {
            types: asked.clone(),
            requests: run_requests.clone(),
        };
        let faults = Arc::new(Mutex::new(faults));
        let shared = faults.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let (upstream, seen, faults) = (upstream.clone(), seen.clone(), faults.clone());
                tokio::spawn(async move {
                    let _ = serve(client, &upstream, &seen, &faults).await;
                });
            }
        });
        FaultProxy {
            url,
            asked,
            run_requests,
            faults: shared,
            task,
        }
    }

    /// Replaces the faults (calls from then on meet the new ones).
    pub fn set_faults(&self, faults: Vec<(Matcher, Fault)>) {
        *self.faults.lock().unwrap() = faults;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the proxy records of `RunInstances` calls.
#[derive(Clone)]
struct Seen {
    types: Arc<Mutex<Vec<String>>>,
    requests: Arc<Mutex<Vec<Vec<String>>>>,
}

/// One connection: requests in turn, each forwarded on a fresh upstream connection.
async fn serve(
    mut client: TcpStream,
    upstream: &str,
    seen: &Seen,
    faults: &Mutex<Vec<(Matcher, Fault)>>,
) -> std::io::Result<()> {
    loop {
        let Some((head, body)) = read_request(&mut client).await? else {
            return Ok(());
        };
        let text = String::from_utf8_lossy(&body).into_owned();
        let params: Vec<String> = text
            .split('&')
            .map(|p| p.replace("%2E", ".").replace("%2e", "."))
            .collect();
        if text.contains("Action=RunInstances") {
            let kind = param(&text, "InstanceType").unwrap_or_default();
            seen.types.lock().unwrap().push(kind);
            seen.requests.lock().unwrap().push(params.clone());
        }
        let fault = faults
            .lock()
            .unwrap()
            .iter()
            .find(|(all, _)| {
                // `Name=value` must appear as is; a bare `Name` matches any value.
                all.iter().all(|want| {
                    params
                        .iter()
                        .any(|p| p == want || p.split('=').next() == Some(want))
                })
            })
            .map(|(_, f)| f.clone());
        if fault == Some(Fault::NoCapacity) {
            let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error>\
                <Code>InsufficientInstanceCapacity</Code><Message>We currently do not have \
                sufficient capacity in the Availability Zone you requested.</Message></Error>\
                </Errors><RequestID>injected</RequestID></Response>";
            let answer = format!(
                "HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n{xml}",
                xml.len()
            );
            client.write_all(answer.as_bytes()).await?;
            continue;
        }
        let mut up = TcpStream::connect(upstream).await?;
        let head = head
            .lines()
            .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
            .collect::<Vec<_>>()
            .join("\r\n");
        up.write_all(format!("{head}\r\nConnection: close\r\n\r\n").as_bytes())
            .await?;
        up.write_all(&body).await?;
        let mut answer = Vec::new();
        up.read_to_end(&mut answer).await?;
        match fault {
            // Done upstream; the caller never hears of it.
            Some(Fault::Hang) => std::future::pending::<()>().await,
            Some(Fault::LoseAnswer) => return Ok(()),
            _ => {}
        }
        client.write_all(&answer).await?;
    }
}

/// A form parameter of a query-protocol body.
fn param(body: &str, name: &str) -> Option<String> {
    body.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| v.replace("%2E", ".").replace("%2e", "."))
    })
}
