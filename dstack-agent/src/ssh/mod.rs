//! SSH into running jobs, served by the agent itself — never on a network port: each
//! upgraded `POST /api/jobs/{id}/ssh` request carries one SSH connection (the engine reaches
//! the agent's socket locally or over its SSH link to the host), whose sessions land in the
//! job's world ([`world`]): commands with their exit status, interactive shells on a
//! pseudo-terminal, `sftp` (so `scp` works), and `direct-tcpip` (`ssh -L`) to ports of the
//! job's host. Clients authenticate with one of the public keys the request names (the
//! project's key, the user's); the agent's host key (`ssh_host_ed25519_key` in its state
//! directory, 0600) is what clients pin.

pub(crate) mod activity;
mod container;
mod host;
mod pty;
mod session;
mod tcp;
pub(crate) mod world;

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::LineEnding;
use russh::keys::{PrivateKey, PublicKey};
use russh::server::{Auth, Config, Handler, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, MethodKind, MethodSet};
use tokio::io::{AsyncRead, AsyncWrite};

use world::World;

/// The agent's host key, in its state directory.
const HOST_KEY_FILE: &str = "ssh_host_ed25519_key";

/// The agent's SSH server: its host key and settings, and the connections of each job.
pub(crate) struct SshServer {
    config: Arc<Config>,
    /// The host key's public half, in OpenSSH form (`ssh-ed25519 AAAA…`).
    host_key: String,
    /// The open connections of each job.
    pub activity: Arc<activity::Activity>,
}

impl SshServer {
    /// The server of the agent whose state directory is `state_dir`: its host key is read
    /// from there, or created (once, mode 0600).
    pub fn load(state_dir: &Path) -> io::Result<SshServer> {
        let path = state_dir.join(HOST_KEY_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut seed = [0u8; 32];
                io::Read::read_exact(&mut fs::File::open("/dev/urandom")?, &mut seed)?;
                let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
                let text = key
                    .to_openssh(LineEnding::LF)
                    .map_err(|e| io::Error::other(e.to_string()))?;
                dstack_core::files::create_private(&path, text.as_bytes())?;
                text.to_string()
            }
            Err(e) => return Err(e),
        };
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        let key = PrivateKey::from_openssh(&text).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })?;
        let host_key = key
            .public_key()
            .to_openssh()
            .map_err(|e| io::Error::other(e.to_string()))?;
        let config = Config {
            server_id: russh::SshId::Standard(
                format!("SSH-2.0-dstack-agent_{}", env!("CARGO_PKG_VERSION")).into(),
            ),
            methods: MethodSet::from(&[MethodKind::PublicKey][..]),
            // OpenSSH first asks with method "none" to learn the methods: answer at once.
            auth_rejection_time_initial: Some(Duration::ZERO),
            keys: vec![key],
            // Idle interactive sessions stay; dead clients are found by keepalives.
            inactivity_timeout: None,
            keepalive_interval: Some(Duration::from_secs(30)),
            nodelay: true,
            ..Default::default()
        };
        Ok(SshServer {
            config: Arc::new(config),
            host_key,
            activity: Arc::default(),
        })
    }

    /// The host key clients pin (`ssh-ed25519 AAAA…`).
    pub fn host_key(&self) -> &str {
        &self.host_key
    }

    /// Serves one SSH connection on `stream` into `world`, for clients holding one of
    /// `authorized` keys; returns when the connection ends.
    pub async fn serve(
        &self,
        stream: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
        world: World,
        authorized: Vec<PublicKey>,
    ) {
        let handler = Connection {
            world: Arc::new(world),
            authorized,
        };
        if let Ok(running) = russh::server::run_stream(self.config.clone(), stream, handler).await {
            let _ = running.await;
        }
    }
}

/// The keys a request authorizes (OpenSSH public key lines); lines that are not keys are
/// left out (nobody can log in with them).
pub(crate) fn parse_keys(lines: &[String]) -> Vec<PublicKey> {
    lines
        .iter()
        .filter_map(|line| PublicKey::from_openssh(line.trim()).ok())
        .collect()
}

/// One SSH connection.
struct Connection {
    world: Arc<World>,
    authorized: Vec<PublicKey>,
}

impl Connection {
    fn admits(&self, key: &PublicKey) -> Auth {
        if self
            .authorized
            .iter()
            .any(|k| k.key_data() == key.key_data())
        {
            Auth::Accept
        } else {
            Auth::reject()
        }
    }
}

impl Handler for Connection {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(self.admits(offer.public_key))
    }

    async fn auth_publickey(
        &mut self,
        _user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(self.admits(key.public_key))
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        tokio::spawn(session::serve(channel, self.world.clone()));
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        tcp::forward(
            &self.world,
            channel,
            host_to_connect,
            port_to_connect,
            reply,
        )
        .await;
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name == "sftp" {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        _value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Sessions get the job's environment, not the client's.
        session.channel_failure(channel)
    }
}
