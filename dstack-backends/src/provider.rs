//! Cloud backends in two parts: a [`Provider`] holds what differs per cloud (its API calls),
//! and [`CloudCompute`] makes any provider a [`Compute`] backend — offers from the catalog,
//! instances reached over SSH with the project key and running the same agent as SSH fleet
//! hosts (see `ssh`).
//!
//! Unlike an SSH host's, a cloud instance's agent holds an owner lease ([`AgentLease`]): the
//! engine renews it while it follows the agent, and once the instance has run no job for its
//! idle time (`idle_duration`) and heard no renewal for [`LEASE_WINDOW`], the agent shuts the
//! instance down ([`Provider::shutdown_command`]), so that an instance whose owner is gone
//! stops costing money. An instance whose `idle_duration` is `off` gets no lease.
//!
//! Host keys are not trusted on first use: each new instance is given a host key of ours in
//! its user data ([`HostKey`]), recorded in its backend data (`host_key`), and pinned in
//! `known_hosts` once its address is known; until its SSH port answers with that key's
//! login, the instance counts as starting. A host answering with another key is refused.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dstack_core::agent::{AgentClient, AgentStream, LeaseTerms};
use dstack_core::backend::{
    BoxFuture, Compute, ComputeError, CreatedInstance, Deployed, InstanceConfig, OfferRequest,
    OwnedInstance, VolumeProvisioning,
};
use dstack_core::config::volume::VolumeConfiguration;
use dstack_core::model::{Instance, Volume};
use dstack_core::offers::catalog::Catalog;
use dstack_core::offers::Offer;

use crate::cloud::{shared_catalog, CatalogOffers};
use crate::project::HostKey;
use crate::ssh::{AgentLease, KnownHosts, SshCompute, SshTarget};

/// How long the owner lease of a cloud instance's agent lasts without a renewal.
pub const LEASE_WINDOW: Duration = Duration::from_secs(600);

/// The API calls of one cloud. An instance's data lives under `backend_data[NAME]`; once the
/// instance runs, [`Provider::check`] adds how to reach it over SSH beside it.
pub trait Provider: Send + Sync + 'static {
    /// The backend type (`aws`, `gcp`).
    const NAME: &'static str;

    /// Creates an instance from an offer (the engine has recorded it, `config.instance_id`),
    /// giving it `host_key` (see [`crate::project::Project::user_data`]).
    fn create(
        &self,
        offer: &Offer,
        config: &InstanceConfig,
        host_key: &HostKey,
    ) -> impl Future<Output = Result<CreatedInstance, ComputeError>> + Send;

    /// What the creation attempt `config.attempt_id` made (see [`Compute::find_attempt`]).
    fn find_attempt(
        &self,
        offer: &Offer,
        config: &InstanceConfig,
    ) -> impl Future<Output = Result<Option<CreatedInstance>, ComputeError>> + Send;

    /// The instance's backend data once it runs (with `hostname`, `port`, `user`,
    /// `identity_file`), `None` while it starts; an error if it never will.
    fn check(
        &self,
        instance: &Instance,
    ) -> impl Future<Output = Result<Option<serde_json::Value>, ComputeError>> + Send;

    /// The shutdown action of the owner lease of this cloud's agents (run with `sh -c` when the
    /// lease lapses); `None`, the default: power the instance off, which terminates it where
    /// [`Provider::create`] makes instances so.
    fn shutdown_command(&self) -> Option<String> {
        None
    }

    /// Terminates a created instance (idempotent).
    fn terminate(
        &self,
        instance: &Instance,
    ) -> impl Future<Output = Result<(), ComputeError>> + Send;

    /// The instances carrying this state's owner tag.
    fn owned(&self) -> impl Future<Output = Result<Vec<OwnedInstance>, ComputeError>> + Send;

    /// Terminates one of [`Provider::owned`] (idempotent).
    fn terminate_owned(
        &self,
        owned: &OwnedInstance,
    ) -> impl Future<Output = Result<(), ComputeError>> + Send;

    /// Creates a network volume.
    fn create_volume(
        &self,
        name: &str,
        config: &VolumeConfiguration,
    ) -> impl Future<Output = Result<VolumeProvisioning, ComputeError>> + Send;

    /// Looks up the existing volume `config.volume_id`.
    fn register_volume(
        &self,
        config: &VolumeConfiguration,
    ) -> impl Future<Output = Result<VolumeProvisioning, ComputeError>> + Send;

    /// Deletes a volume (idempotent).
    fn delete_volume(
        &self,
        volume: &Volume,
    ) -> impl Future<Output = Result<(), ComputeError>> + Send;

    /// Attaches a volume; returns its device name on the instance.
    fn attach_volume(
        &self,
        volume: &Volume,
        instance: &Instance,
    ) -> impl Future<Output = Result<String, ComputeError>> + Send;

    /// Detaches a volume (`force`: even while in use).
    fn detach_volume(
        &self,
        volume: &Volume,
        instance: &Instance,
        force: bool,
    ) -> impl Future<Output = Result<(), ComputeError>> + Send;

    /// Whether the volume is no longer attached to the instance.
    fn is_volume_detached(
        &self,
        volume: &Volume,
        instance: &Instance,
    ) -> impl Future<Output = Result<bool, ComputeError>> + Send;
}

/// A cloud provider as a backend.
pub struct CloudCompute<P> {
    provider: P,
    catalog: Arc<Catalog>,
    offers: CatalogOffers,
    ssh: SshCompute,
    /// Where the SSH backend records host keys (a new instance's is pinned, a terminated
    /// instance's forgotten).
    known_hosts: KnownHosts,
    /// The public host keys given to creation attempts whose outcome is not known yet (by
    /// attempt id), for [`Compute::find_attempt`].
    given_keys: Mutex<HashMap<String, String>>,
}

/// Where a created instance's backend data holds the public host key it was given.
const HOST_KEY: &str = "host_key";

impl<P: Provider> CloudCompute<P> {
    /// `provider`, offering what `offers` reads from the shared catalog, recording host keys
    /// under `home` and installing `agent_bin` on its instances.
    pub fn from_provider(
        provider: P,
        offers: CatalogOffers,
        home: &Path,
        agent_bin: PathBuf,
    ) -> Result<Self, ComputeError> {
        Ok(CloudCompute {
            provider,
            catalog: shared_catalog()?,
            offers,
            ssh: SshCompute::new(KnownHosts::in_home(home), agent_bin),
            known_hosts: KnownHosts::in_home(home),
            given_keys: Mutex::new(HashMap::new()),
        })
    }

    /// The provider.
    pub fn provider(&self) -> &P {
        &self.provider
    }
}

impl<P: Provider> CloudCompute<P> {
    /// Pins the host key `key` (OpenSSH public key text) given to the instance at `target`.
    fn pin(&self, target: &SshTarget, key: &str) -> Result<(), ComputeError> {
        let public = russh::keys::PublicKey::from_openssh(key)
            .map_err(|e| ComputeError::Other(format!("{target}: bad host key on record: {e}")))?;
        self.known_hosts
            .pin(&target.hostname, target.port, &public)
            .map_err(|e| ComputeError::Other(format!("{target}: cannot pin its host key: {e}")))
    }
}

/// `done` with the public host key it was given recorded in its backend data.
fn with_host_key(mut done: CreatedInstance, key: &str) -> CreatedInstance {
    if let Some(data) = done.backend_data.as_object_mut() {
        data.insert(HOST_KEY.to_string(), key.into());
    }
    done
}

impl<P: Provider> Compute for CloudCompute<P> {
    fn backend(&self) -> &'static str {
        P::NAME
    }

    fn supports_containers(&self) -> bool {
        false
    }

    fn offers(&self) -> BoxFuture<'_, Result<Vec<Offer>, ComputeError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn creates_instances(&self) -> bool {
        true
    }

    fn offers_for<'a>(
        &'a self,
        request: &'a OfferRequest,
    ) -> BoxFuture<'a, Result<Vec<Offer>, ComputeError>> {
        Box::pin(async move { Ok(self.offers.offers(&self.catalog, request)) })
    }

    fn create_instance<'a>(
        &'a self,
        offer: &'a Offer,
        config: &'a InstanceConfig,
    ) -> BoxFuture<'a, Result<CreatedInstance, ComputeError>> {
        Box::pin(async move {
            let host_key = HostKey::generate()
                .map_err(|e| ComputeError::Other(format!("cannot make a host key: {e}")))?;
            let created = self.provider.create(offer, config, &host_key).await;
            let mut given = self
                .given_keys
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match created {
                Ok(done) => Ok(with_host_key(done, host_key.public())),
                Err(ComputeError::Unknown(why)) => {
                    given.insert(config.attempt_id.clone(), host_key.public().to_string());
                    Err(ComputeError::Unknown(why))
                }
                Err(e) => Err(e),
            }
        })
    }

    fn find_attempt<'a>(
        &'a self,
        offer: &'a Offer,
        config: &'a InstanceConfig,
    ) -> BoxFuture<'a, Result<Option<CreatedInstance>, ComputeError>> {
        Box::pin(async move {
            let found = self.provider.find_attempt(offer, config).await?;
            let given = self
                .given_keys
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&config.attempt_id);
            Ok(found.map(|done| match given {
                Some(key) => with_host_key(done, &key),
                None => done,
            }))
        })
    }

    fn update_provisioning<'a>(
        &'a self,
        instance: &'a Instance,
    ) -> BoxFuture<'a, Result<Option<serde_json::Value>, ComputeError>> {
        Box::pin(async move {
            let Some(mut data) = self.provider.check(instance).await? else {
                return Ok(None);
            };
            let target: SshTarget = serde_json::from_value(data.clone()).map_err(|e| {
                ComputeError::Other(format!("{}: bad SSH data: {e}", instance.name))
            })?;
            if let Some(key) = instance.backend_data.get(HOST_KEY).and_then(|k| k.as_str()) {
                self.pin(&target, key)?;
                data[HOST_KEY] = key.into();
            }
            // Running is not reachable: sshd starts late in a boot.
            Ok(self.ssh.answers(&target).await?.then_some(data))
        })
    }

    fn deploy<'a>(
        &'a self,
        instance: &'a Instance,
    ) -> BoxFuture<'a, Result<Deployed, ComputeError>> {
        Box::pin(async move {
            let lease = instance.idle_timeout_secs.map(|idle_secs| AgentLease {
                terms: LeaseTerms {
                    idle_secs,
                    window_secs: LEASE_WINDOW.as_secs(),
                },
                shutdown_command: self.provider.shutdown_command(),
            });
            // The SSH backend records how it reached the host; the cloud's data stays beside.
            let mut deployed = self.ssh.deploy_with(instance, lease.as_ref()).await?;
            if let (Some(map), Some(own)) = (
                deployed.backend_data.as_object_mut(),
                instance.backend_data.get(P::NAME),
            ) {
                map.insert(P::NAME.to_string(), own.clone());
            }
            Ok(deployed)
        })
    }

    fn agent_build(&self) -> Option<String> {
        self.ssh.agent_build()
    }

    fn dial_port<'a>(
        &'a self,
        instance: &'a Instance,
        port: u16,
    ) -> BoxFuture<'a, std::io::Result<Box<dyn AgentStream>>> {
        self.ssh.dial_port(instance, port)
    }

    fn connect<'a>(
        &'a self,
        instance: &'a Instance,
    ) -> BoxFuture<'a, Result<AgentClient, ComputeError>> {
        self.ssh.connect(instance)
    }

    fn terminate_instance<'a>(
        &'a self,
        instance: &'a Instance,
    ) -> BoxFuture<'a, Result<(), ComputeError>> {
        Box::pin(async move {
            if instance.backend_data.get(P::NAME).is_none() {
                return Ok(()); // never created
            }
            self.provider.terminate(instance).await?;
            // Its address may go to another machine: the key learned there is no longer
            // this instance's (none was learned if it never ran).
            let Ok(target) = serde_json::from_value::<SshTarget>(instance.backend_data.clone())
            else {
                return Ok(());
            };
            self.known_hosts
                .forget(&target.hostname, target.port)
                .map(drop)
                .map_err(|e| {
                    ComputeError::Other(format!(
                        "{} is terminated, but its host key could not be forgotten: {e}",
                        target.hostname
                    ))
                })
        })
    }

    fn owned_instances(&self) -> BoxFuture<'_, Result<Vec<OwnedInstance>, ComputeError>> {
        Box::pin(self.provider.owned())
    }

    fn terminate_owned<'a>(
        &'a self,
        owned: &'a OwnedInstance,
    ) -> BoxFuture<'a, Result<(), ComputeError>> {
        Box::pin(self.provider.terminate_owned(owned))
    }

    fn create_volume<'a>(
        &'a self,
        name: &'a str,
        config: &'a VolumeConfiguration,
    ) -> BoxFuture<'a, Result<VolumeProvisioning, ComputeError>> {
        Box::pin(self.provider.create_volume(name, config))
    }

    fn register_volume<'a>(
        &'a self,
        config: &'a VolumeConfiguration,
    ) -> BoxFuture<'a, Result<VolumeProvisioning, ComputeError>> {
        Box::pin(self.provider.register_volume(config))
    }

    fn delete_volume<'a>(&'a self, volume: &'a Volume) -> BoxFuture<'a, Result<(), ComputeError>> {
        Box::pin(self.provider.delete_volume(volume))
    }

    fn attach_volume<'a>(
        &'a self,
        volume: &'a Volume,
        instance: &'a Instance,
    ) -> BoxFuture<'a, Result<String, ComputeError>> {
        Box::pin(self.provider.attach_volume(volume, instance))
    }

    fn detach_volume<'a>(
        &'a self,
        volume: &'a Volume,
        instance: &'a Instance,
        force: bool,
    ) -> BoxFuture<'a, Result<(), ComputeError>> {
        Box::pin(self.provider.detach_volume(volume, instance, force))
    }

    fn is_volume_detached<'a>(
        &'a self,
        volume: &'a Volume,
        instance: &'a Instance,
    ) -> BoxFuture<'a, Result<bool, ComputeError>> {
        Box::pin(self.provider.is_volume_detached(volume, instance))
    }
}
