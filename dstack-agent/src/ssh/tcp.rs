//! `direct-tcpip` channels (`ssh -L`): connections to ports of the job's host (for container
//! jobs, `localhost` is the container's address).

use russh::server::{ChannelOpenHandle, Msg};
use russh::{Channel, ChannelOpenFailure};
use tokio::net::TcpStream;

use super::world::{Place, World};

/// Connects to `host:port` as the job sees it and carries the channel's bytes both ways;
/// refuses the channel when the connection fails.
pub(crate) async fn forward(
    world: &World,
    channel: Channel<Msg>,
    host: &str,
    port: u32,
    reply: ChannelOpenHandle,
) {
    let Ok(port) = u16::try_from(port) else {
        reply.reject(ChannelOpenFailure::ConnectFailed).await;
        return;
    };
    let host = target_host(world, host).await;
    match TcpStream::connect((host.as_str(), port)).await {
        Ok(mut stream) => {
            let _ = stream.set_nodelay(true);
            reply.accept().await;
            tokio::spawn(async move {
                let mut channel = channel.into_stream();
                let _ = tokio::io::copy_bidirectional(&mut channel, &mut stream).await;
            });
        }
        Err(_) => reply.reject(ChannelOpenFailure::ConnectFailed).await,
    }
}

/// The host to connect to: `host`, except that a container job's `localhost` is the
/// container's own address.
async fn target_host(world: &World, host: &str) -> String {
    let local = matches!(host, "localhost" | "127.0.0.1" | "::1" | "ip6-localhost");
    match &world.place {
        Place::Container { socket, name } if local => container_address(socket, name)
            .await
            .unwrap_or_else(|| host.to_string()),
        _ => host.to_string(),
    }
}

/// The IP address of container `name` on its network, if it has one.
async fn container_address(socket: &str, name: &str) -> Option<String> {
    let docker =
        bollard::Docker::connect_with_unix(socket, 60, bollard::API_DEFAULT_VERSION).ok()?;
    let inspected = docker.inspect_container(name, None).await.ok()?;
    let networks = inspected.network_settings?.networks?;
    networks
        .into_values()
        .filter_map(|n| n.ip_address)
        .find(|ip| !ip.is_empty())
}
