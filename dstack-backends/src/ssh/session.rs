//! One SSH connection to a host (through an optional jump host): host-key checking, public-key
//! authentication, commands, uploads, and channels to unix sockets on the host.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use russh::client::{self, Handle};
use russh::keys::{load_secret_key, Algorithm, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::ChannelMsg;
use russh::Preferred;
use serde::{Deserialize, Serialize};

use super::known_hosts::{HostKeyCheck, KnownHosts};
use dstack_core::agent::AgentStream;

/// How long to wait for a TCP connection and the SSH handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How a dead connection is noticed: a keepalive every `interval`; after `max` unanswered
/// ones the connection is dropped. The default (5 s, 3) notices a cut link within ~20 s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// Time between keepalives.
    pub interval: Duration,
    /// Unanswered keepalives before the connection is dropped.
    pub max: usize,
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive {
            interval: Duration::from_secs(5),
            max: 3,
        }
    }
}

/// Where and as whom to connect.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshTarget {
    /// Host name or address.
    pub hostname: String,
    /// SSH port.
    pub port: u16,
    /// User to log in as.
    pub user: String,
    /// Private key file.
    pub identity_file: PathBuf,
    /// A host to connect through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_jump: Option<Box<SshTarget>>,
}

impl std::fmt::Display for SshTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}:{}", self.user, self.hostname, self.port)
    }
}

/// Why an SSH operation failed; each names the host.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// No TCP connection (address unreachable, refused, timed out).
    #[error("{target}: cannot connect: {message}")]
    Connect {
        /// The host.
        target: String,
        /// What happened.
        message: String,
    },
    /// The host presented another key than the one recorded for it.
    #[error(
        "{target}: the host key has changed (it presented {presented}); refusing to connect. \
         If the host was reinstalled, remove line {line} of {file} and apply again"
    )]
    HostKeyChanged {
        /// The host.
        target: String,
        /// The presented key's fingerprint.
        presented: String,
        /// The known-hosts line with the recorded key.
        line: usize,
        /// The known-hosts file.
        file: String,
    },
    /// The private key could not be read.
    #[error("{target}: cannot use identity file {path}: {message}")]
    Key {
        /// The host.
        target: String,
        /// The key file.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// The host refused the key for this user.
    #[error("{target}: authentication failed: the host refused the key {path} for user {user}")]
    Auth {
        /// The host.
        target: String,
        /// The user.
        user: String,
        /// The key file.
        path: String,
    },
    /// The SSH session failed.
    #[error("{target}: {message}")]
    Session {
        /// The host.
        target: String,
        /// What happened.
        message: String,
    },
    /// A command on the host failed.
    #[error("{target}: `{command}` failed (exit status {status}): {stderr}")]
    Command {
        /// The host.
        target: String,
        /// The command (without uploaded data).
        command: String,
        /// Its exit status.
        status: u32,
        /// What it wrote to stderr.
        stderr: String,
    },
}

impl SshError {
    /// Whether the host could not be reached at all (as opposed to refusing us).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, SshError::Connect { .. } | SshError::Session { .. })
    }
}

struct Verifier {
    host: String,
    port: u16,
    known_hosts: KnownHosts,
    verdict: Arc<Mutex<Option<Result<HostKeyCheck, String>>>>,
}

impl client::Handler for Verifier {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = server_public_key else {
            *self.verdict.lock().unwrap_or_else(PoisonError::into_inner) =
                Some(Err("host certificates are not supported".to_string()));
            return Ok(false);
        };
        let check = self
            .known_hosts
            .check(&self.host, self.port, key)
            .map_err(|e| {
                format!(
                    "cannot read or write {}: {e}",
                    self.known_hosts.path().display()
                )
            });
        let accept = matches!(check, Ok(HostKeyCheck::Known | HostKeyCheck::Learned));
        *self.verdict.lock().unwrap_or_else(PoisonError::into_inner) = Some(check);
        Ok(accept)
    }
}

/// A logged-in SSH connection.
pub struct SshSession {
    handle: Handle<Verifier>,
    target: SshTarget,
    /// The jump host's session, kept alive while this one lives.
    _via: Option<Box<SshSession>>,
}

/// The most of a command's standard output (and, apart, of its standard error) kept: the
/// rest is read and dropped, so that a host cannot make this process's memory grow without
/// bound.
pub const MAX_OUTPUT_BYTES: usize = 16 * 1024 * 1024;

/// Appends `data` to `buffer` up to [`MAX_OUTPUT_BYTES`].
fn keep(buffer: &mut Vec<u8>, data: &[u8]) {
    let room = MAX_OUTPUT_BYTES.saturating_sub(buffer.len());
    buffer.extend_from_slice(&data[..data.len().min(room)]);
}

/// What a command did.
#[derive(Debug, Default)]
pub struct Output {
    /// Its exit status (255 when the host reported none).
    pub status: u32,
    /// Its standard output.
    pub stdout: Vec<u8>,
    /// Its standard error.
    pub stderr: Vec<u8>,
}

impl Output {
    /// Standard output as trimmed text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).trim().to_string()
    }
}

fn config(keepalive: Keepalive, host_keys: Vec<Algorithm>) -> Arc<client::Config> {
    Arc::new(client::Config {
        preferred: Preferred {
            key: host_keys.into(),
            ..Preferred::DEFAULT
        },
        inactivity_timeout: None,
        keepalive_interval: Some(keepalive.interval),
        keepalive_max: keepalive.max,
        nodelay: true,
        ..Default::default()
    })
}

/// The host-key algorithms to offer, those of the keys on record for the host first: a host
/// with several keys then presents the pinned one (OpenSSH orders them the same way).
fn host_key_order(recorded: &[Algorithm]) -> Vec<Algorithm> {
    let same_type = |a: &Algorithm, b: &Algorithm| {
        matches!((a, b), (Algorithm::Rsa { .. }, Algorithm::Rsa { .. })) || a == b
    };
    let is_recorded = |a: &&Algorithm| recorded.iter().any(|r| same_type(r, a));
    let all = Preferred::DEFAULT.key;
    let (first, rest): (Vec<&Algorithm>, Vec<&Algorithm>) = all.iter().partition(is_recorded);
    first.into_iter().chain(rest).cloned().collect()
}

impl SshSession {
    /// Connects and logs in, checking the host key against `known_hosts` (recording it on
    /// first use).
    pub async fn connect(
        target: &SshTarget,
        known_hosts: &KnownHosts,
        keepalive: Keepalive,
    ) -> Result<SshSession, SshError> {
        let name = target.to_string();
        let key = load_secret_key(&target.identity_file, None).map_err(|e| SshError::Key {
            target: name.clone(),
            path: target.identity_file.display().to_string(),
            message: e.to_string(),
        })?;
        // Unreadable records leave the default order; the check then reports the error.
        let recorded = known_hosts
            .recorded_algorithms(&target.hostname, target.port)
            .unwrap_or_default();
        let config = || config(keepalive, host_key_order(&recorded));
        let verdict = Arc::new(Mutex::new(None));
        let verifier = Verifier {
            host: target.hostname.clone(),
            port: target.port,
            known_hosts: known_hosts.clone(),
            verdict: verdict.clone(),
        };
        let (connected, via) = match &target.proxy_jump {
            None => {
                let addr = (target.hostname.as_str(), target.port);
                let connecting = client::connect(config(), addr, verifier);
                (
                    tokio::time::timeout(CONNECT_TIMEOUT, connecting).await,
                    None,
                )
            }
            Some(proxy) => {
                let jump = Box::pin(SshSession::connect(proxy, known_hosts, keepalive)).await?;
                let channel = jump
                    .handle
                    .channel_open_direct_tcpip(
                        target.hostname.clone(),
                        u32::from(target.port),
                        "127.0.0.1",
                        0,
                    )
                    .await
                    .map_err(|e| SshError::Connect {
                        target: name.clone(),
                        message: format!("through {proxy}: {e}"),
                    })?;
                let connecting = client::connect_stream(config(), channel.into_stream(), verifier);
                (
                    tokio::time::timeout(CONNECT_TIMEOUT, connecting).await,
                    Some(Box::new(jump)),
                )
            }
        };
        let rejected = |message: String| match verdict
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            Some(Ok(HostKeyCheck::Changed { presented, line })) => SshError::HostKeyChanged {
                target: name.clone(),
                presented,
                line,
                file: known_hosts.path().display().to_string(),
            },
            Some(Err(why)) => SshError::Session {
                target: name.clone(),
                message: why,
            },
            _ => SshError::Connect {
                target: name.clone(),
                message,
            },
        };
        let mut handle = match connected {
            Err(_) => {
                return Err(rejected(format!(
                    "timed out after {}s",
                    CONNECT_TIMEOUT.as_secs()
                )))
            }
            Ok(Err(e)) => return Err(rejected(e.to_string())),
            Ok(Ok(handle)) => handle,
        };
        let session_error = |e: russh::Error| SshError::Session {
            target: name.clone(),
            message: e.to_string(),
        };
        let hash = handle
            .best_supported_rsa_hash()
            .await
            .map_err(session_error)?
            .flatten();
        let auth = handle
            .authenticate_publickey(
                target.user.clone(),
                PrivateKeyWithHashAlg::new(Arc::new(key), hash),
            )
            .await
            .map_err(session_error)?;
        if !auth.success() {
            return Err(SshError::Auth {
                target: name,
                user: target.user.clone(),
                path: target.identity_file.display().to_string(),
            });
        }
        Ok(SshSession {
            handle,
            target: target.clone(),
            _via: via,
        })
    }

    /// The host.
    pub fn target(&self) -> &SshTarget {
        &self.target
    }

    /// Whether the connection has ended (dropped, or no keepalive answered).
    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    fn session_error(&self, e: russh::Error) -> SshError {
        SshError::Session {
            target: self.target.to_string(),
            message: e.to_string(),
        }
    }

    /// Runs `command` (by the user's login shell), feeding it `input`, and returns what it did.
    /// Input stops as soon as the command ends (e.g. it failed on a full disk): a command that
    /// stops reading never makes this hang.
    pub async fn exec(&self, command: &str, input: Option<&[u8]>) -> Result<Output, SshError> {
        let channel = self
            .handle
            .channel_open_session()
            .await
            .map_err(|e| self.session_error(e))?;
        channel
            .exec(true, command)
            .await
            .map_err(|e| self.session_error(e))?;
        let (mut read, write) = channel.split();
        let send = async {
            if let Some(input) = input {
                write.data(input).await?;
            }
            write.eof().await
        };
        let mut send = std::pin::pin!(send);
        let mut sending = true;
        let mut output = Output {
            status: 255,
            ..Output::default()
        };
        loop {
            let message = tokio::select! {
                sent = &mut send, if sending => {
                    sending = false;
                    sent.map_err(|e| self.session_error(e))?;
                    continue;
                }
                message = read.wait() => message,
            };
            match message {
                Some(ChannelMsg::Data { data }) => keep(&mut output.stdout, &data),
                Some(ChannelMsg::ExtendedData { data, ext: 1 }) => keep(&mut output.stderr, &data),
                Some(ChannelMsg::ExitStatus { exit_status }) => output.status = exit_status,
                Some(_) => {}
                None => break,
            }
        }
        Ok(output)
    }

    /// Runs `command` and fails unless it exits 0.
    pub async fn run(&self, command: &str, input: Option<&[u8]>) -> Result<Output, SshError> {
        let output = self.exec(command, input).await?;
        if output.status != 0 {
            return Err(SshError::Command {
                target: self.target.to_string(),
                command: command.to_string(),
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        Ok(output)
    }

    /// A TCP connection to `port` on the host's loopback (a `direct-tcpip` channel).
    pub async fn dial_tcp(&self, port: u16) -> std::io::Result<Box<dyn AgentStream>> {
        let channel = self
            .handle
            .channel_open_direct_tcpip("127.0.0.1", u32::from(port), "127.0.0.1", 0)
            .await
            .map_err(std::io::Error::other)?;
        Ok(Box::new(channel.into_stream()))
    }

    /// A byte stream to the unix socket `path` on the host (a `direct-streamlocal` channel).
    pub async fn dial(&self, path: &str) -> std::io::Result<Box<dyn AgentStream>> {
        let channel = self
            .handle
            .channel_open_direct_streamlocal(path)
            .await
            .map_err(std::io::Error::other)?;
        Ok(Box::new(channel.into_stream()))
    }
}

/// `s` as one shell word (single-quoted).
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::quote;

    #[test]
    fn kept_output_is_bounded() {
        let mut buffer = vec![0; super::MAX_OUTPUT_BYTES - 2];
        super::keep(&mut buffer, b"abcdef");
        assert_eq!(buffer.len(), super::MAX_OUTPUT_BYTES);
        assert_eq!(&buffer[buffer.len() - 2..], b"ab");
        super::keep(&mut buffer, b"more");
        assert_eq!(buffer.len(), super::MAX_OUTPUT_BYTES);
    }

    #[test]
    fn quoting_keeps_every_character() {
        assert_eq!(quote("plain"), "'plain'");
        assert_eq!(quote("it's $HOME; rm -rf /"), r"'it'\''s $HOME; rm -rf /'");
    }
}
