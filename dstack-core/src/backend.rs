//! The [`Compute`] trait every backend implements.
//!
//! Contract:
//! - a backend *provisions*; it never runs jobs (the agent on the instance does);
//! - every method is cancel-safe: dropping the future leaves no half-created resource that the
//!   engine does not know about (creation is recorded before it is attempted);
//! - `terminate_instance` is idempotent: terminating a terminated or unknown instance is `Ok`;
//! - errors say which kind they are ([`ComputeError`]), so the engine can move on to the next
//!   offer on `NoCapacity`, give up on `Unauthenticated`, and look for what a creation whose
//!   outcome is `Unknown` may have made ([`Compute::find_attempt`]) before trying another offer.

use std::future::Future;
use std::pin::Pin;

use std::collections::BTreeMap;

use crate::agent::AgentClient;
use crate::config::range::{Memory, Range};
use crate::config::volume::VolumeConfiguration;
use crate::model::{Instance, Volume};
use crate::offers::query::QueryFilter;
use crate::offers::Offer;

/// A boxed, sendable future (the trait is object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What went wrong in a backend.
#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    /// The offer cannot be provisioned now (capacity, quota); try the next one. Nothing was
    /// created.
    #[error("no capacity: {0}")]
    NoCapacity(String),
    /// The request may or may not have taken effect (its answer was lost, the connection
    /// broke, the service failed internally): what it may have created must be looked for.
    #[error("outcome unknown: {0}")]
    Unknown(String),
    /// The resource does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// Credentials are missing or rejected.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The backend cannot do this.
    #[error("not supported: {0}")]
    NotSupported(String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// What a job or fleet asks of backends that provision new capacity.
#[derive(Clone, Debug, Default)]
pub struct OfferRequest {
    /// Resources, spot choice and price limit, as a catalog filter.
    pub filter: QueryFilter,
    /// The requested disk (`None`: dstack's default `100GB..`).
    pub disk: Option<Range<Memory>>,
}

/// What a backend needs to create an instance besides its offer.
#[derive(Clone, Debug)]
pub struct InstanceConfig {
    /// The engine's id of the instance (tagged on the cloud resource, so that a resource
    /// whose creation was not recorded can be found again).
    pub instance_id: String,
    /// This creation attempt's id, recorded in the store before the backend is asked
    /// (tagged on the resource, and used as the request's idempotency token where the cloud
    /// has one): what an attempt whose outcome is unknown made can be found again.
    pub attempt_id: String,
    /// The identity of the state that creates it (see `Store::state_id`; tagged on the
    /// resource, so that only this state reaps it).
    pub state_id: String,
    /// The instance's name (`<fleet>-<n>`).
    pub name: String,
    /// The fleet's name.
    pub fleet: String,
    /// Tags from the configuration, besides the backend's own.
    pub tags: BTreeMap<String, String>,
}

/// A cloud resource carrying this state's owner tag (see [`Compute::owned_instances`]).
#[derive(Clone, Debug, PartialEq)]
pub struct OwnedInstance {
    /// The provider's id of the instance.
    pub cloud_id: String,
    /// The engine's instance id it was tagged with, if any.
    pub instance_id: Option<String>,
    /// The creation attempt it was tagged with, if any.
    pub attempt_id: Option<String>,
    /// The identity of the state that created it, if tagged.
    pub state_id: Option<String>,
    /// Where it is.
    pub region: String,
}

/// What a backend reports about a volume it created or registered.
#[derive(Clone, Debug, PartialEq)]
pub struct VolumeProvisioning {
    /// The cloud's id of the disk.
    pub volume_id: String,
    /// Its size in GB.
    pub size_gb: u64,
    /// Its availability zone.
    pub availability_zone: Option<String>,
}

/// What a backend records about an instance it created.
#[derive(Clone, Debug)]
pub struct CreatedInstance {
    /// The offer it was created from (resources, price, region).
    pub offer: Offer,
    /// The provider's id of the resource (`None`: nothing was created in a cloud).
    pub cloud_id: Option<String>,
    /// Backend-specific data needed to reach or terminate it later.
    pub backend_data: serde_json::Value,
}

/// What deploying a user-supplied instance found (see [`Compute::deploy`]).
#[derive(Clone, Debug)]
pub struct Deployed {
    /// The host's resources, as its agent reports them.
    pub host: crate::agent::HostInfo,
    /// The instance's backend data, updated (e.g. where the agent was installed).
    pub backend_data: serde_json::Value,
    /// The login session jobs get on the host.
    pub session: crate::model::HostSession,
    /// Whether the host's agent has a container engine (runs `image:` jobs).
    pub containers: bool,
    /// What the user should know about the host (e.g. that another agent shares it), kept as
    /// the instance's status message.
    pub note: Option<String>,
}

/// A provider of instances.
pub trait Compute: Send + Sync {
    /// The backend type (`local`, `ssh`, `aws`, …).
    fn backend(&self) -> &'static str;

    /// Whether jobs with `image:` can run on this backend's instances.
    fn supports_containers(&self) -> bool;

    /// Offers this backend can provision now.
    fn offers(&self) -> BoxFuture<'_, Result<Vec<Offer>, ComputeError>>;

    /// Whether the backend provisions new capacity (a cloud) for fleets with `nodes:`.
    fn creates_instances(&self) -> bool {
        false
    }

    /// Offers of new capacity matching `request`, cheapest first (clouds: their catalog in
    /// their regions). Backends with fixed capacity have none.
    fn offers_for<'a>(
        &'a self,
        request: &'a OfferRequest,
    ) -> BoxFuture<'a, Result<Vec<Offer>, ComputeError>> {
        let _ = request;
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Creates an instance from one of its offers. The engine has recorded the instance
    /// (`config.instance_id`) before calling.
    fn create_instance<'a>(
        &'a self,
        offer: &'a Offer,
        config: &'a InstanceConfig,
    ) -> BoxFuture<'a, Result<CreatedInstance, ComputeError>>;

    /// What the creation attempt `config.attempt_id` made, if anything: asked after
    /// [`Compute::create_instance`] failed with [`ComputeError::Unknown`]. Should the attempt
    /// have made several resources (a request retried after its answer was lost), the
    /// others are terminated. Backends that create nothing in a cloud find nothing.
    fn find_attempt<'a>(
        &'a self,
        offer: &'a Offer,
        config: &'a InstanceConfig,
    ) -> BoxFuture<'a, Result<Option<CreatedInstance>, ComputeError>> {
        let _ = (offer, config);
        Box::pin(async { Ok(None) })
    }

    /// Checks on an instance being provisioned: its backend data once it can be deployed
    /// (e.g. its address is known), `None` while it is still starting. An error means it
    /// will never be ready. By default instances are ready at once.
    fn update_provisioning<'a>(
        &'a self,
        instance: &'a Instance,
    ) -> BoxFuture<'a, Result<Option<serde_json::Value>, ComputeError>> {
        Box::pin(async move { Ok(Some(instance.backend_data.clone())) })
    }

    /// The instances this state's owner tag is on (to find strays: created but never
    /// recorded, or recorded as terminated). Backends that create nothing have none.
    fn owned_instances(&self) -> BoxFuture<'_, Result<Vec<OwnedInstance>, ComputeError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Creates the network volume `config` describes (`name` is the volume's name).
    fn create_volume<'a>(
        &'a self,
        name: &'a str,
        config: &'a VolumeConfiguration,
    ) -> BoxFuture<'a, Result<VolumeProvisioning, ComputeError>> {
        let _ = (name, config);
        Box::pin(async move { Err(self.no_volumes()) })
    }

    /// Looks up the existing volume `config.volume_id` names.
    fn register_volume<'a>(
        &'a self,
        config: &'a VolumeConfiguration,
    ) -> BoxFuture<'a, Result<VolumeProvisioning, ComputeError>> {
        let _ = config;
        Box::pin(async move { Err(self.no_volumes()) })
    }

    /// Deletes a volume it created (idempotent).
    fn delete_volume<'a>(&'a self, volume: &'a Volume) -> BoxFuture<'a, Result<(), ComputeError>> {
        let _ = volume;
        Box::pin(async move { Err(self.no_volumes()) })
    }

    /// Attaches a volume to an instance; returns the device name it got there.
    fn attach_volume<'a>(
        &'a self,
        volume: &'a Volume,
        instance: &'a Instance,
    ) -> BoxFuture<'a, Result<String, ComputeError>> {
        let _ = (volume, instance);
        Box::pin(async move { Err(self.no_volumes()) })
    }

    /// Detaches a volume from an instance (`force`: even if it is in use there).
    fn detach_volume<'a>(
        &'a self,
        volume: &'a Volume,
        instance: &'a Instance,
        force: bool,
    ) -> BoxFuture<'a, Result<(), ComputeError>> {
        let _ = (volume, instance, force);
        Box::pin(async move { Err(self.no_volumes()) })
    }

    /// Whether the volume is no longer attached to the instance.
    fn is_volume_detached<'a>(
        &'a self,
        volume: &'a Volume,
        instance: &'a Instance,
    ) -> BoxFuture<'a, Result<bool, ComputeError>> {
        let _ = (volume, instance);
        Box::pin(async { Ok(true) })
    }

    /// The error of volume calls on a backend without network volumes.
    fn no_volumes(&self) -> ComputeError {
        ComputeError::NotSupported(format!(
            "the {} backend has no network volumes",
            self.backend()
        ))
    }

    /// Terminates a resource found by [`Compute::owned_instances`] (idempotent).
    fn terminate_owned<'a>(
        &'a self,
        owned: &'a OwnedInstance,
    ) -> BoxFuture<'a, Result<(), ComputeError>> {
        let message = format!("{} cannot terminate {}", self.backend(), owned.cloud_id);
        Box::pin(async move { Err(ComputeError::NotSupported(message)) })
    }

    /// Prepares an instance the user supplied (an SSH host): installs and starts its agent
    /// and reports what the host has. Backends that create their own instances do not
    /// support it.
    fn deploy<'a>(
        &'a self,
        instance: &'a Instance,
    ) -> BoxFuture<'a, Result<Deployed, ComputeError>> {
        let message = format!(
            "the {} backend creates its own instances; {} cannot be deployed",
            self.backend(),
            instance.name
        );
        Box::pin(async move { Err(ComputeError::NotSupported(message)) })
    }

    /// Opens a TCP connection to `port` on the instance's host (to forward a job's ports to
    /// this machine). By default the instance is this machine.
    fn dial_port<'a>(
        &'a self,
        instance: &'a Instance,
        port: u16,
    ) -> BoxFuture<'a, std::io::Result<Box<dyn crate::agent::AgentStream>>> {
        let _ = instance;
        Box::pin(async move {
            let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            Ok(Box::new(stream) as Box<dyn crate::agent::AgentStream>)
        })
    }

    /// The build stamp ([`crate::agent::build_stamp`]) of the agent [`Compute::deploy`]
    /// installs, for backends that deploy one: an agent of another build (an upgrade of
    /// dstack-rs) is deployed again once it runs no job. `None`: the backend keeps its agents'
    /// builds itself (or installs none).
    fn agent_build(&self) -> Option<String> {
        None
    }

    /// Returns a client of the instance's agent, (re)starting the agent if the backend can.
    fn connect<'a>(
        &'a self,
        instance: &'a Instance,
    ) -> BoxFuture<'a, Result<AgentClient, ComputeError>>;

    /// Terminates an instance (idempotent).
    fn terminate_instance<'a>(
        &'a self,
        instance: &'a Instance,
    ) -> BoxFuture<'a, Result<(), ComputeError>>;
}
