//! An in-memory cloud (`memory`): offers read from the catalog as a cloud's (another
//! provider's items, under this backend's name), instances that exist only in this process.
//! It creates, finds, lists and terminates instances as a cloud backend must (the contract of
//! [`Compute`], checked for every backend by `tests/conformance.rs`), with capacity set per
//! instance type to make "no capacity" happen at will. No agent runs on its instances
//! (`connect` and `dial_port` are not supported): it serves tests of provisioning and
//! reaping, and simulations of placement at scale, not jobs.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use dstack_core::agent::{AgentClient, AgentStream};
use dstack_core::backend::{
    BoxFuture, Compute, ComputeError, CreatedInstance, InstanceConfig, OfferRequest, OwnedInstance,
};
use dstack_core::model::Instance;
use dstack_core::offers::catalog::Catalog;
use dstack_core::offers::Offer;

use crate::cloud::{shared_catalog, CatalogOffers};

/// The backend's name, in offers and instance records.
pub const NAME: &str = "memory";

/// An in-memory cloud.
pub struct MemoryCompute {
    catalog: Arc<Catalog>,
    offers: CatalogOffers,
    state: Mutex<State>,
}

/// What the in-memory cloud holds.
#[derive(Default)]
struct State {
    /// Instances by cloud id, terminated ones included (as a cloud lists them a while).
    instances: BTreeMap<String, Made>,
    /// How many more instances of a type can be created (absent: unlimited).
    capacity: HashMap<String, usize>,
    /// The number of the next instance (`mem-<n>`).
    next: u64,
}

/// One instance the in-memory cloud made.
struct Made {
    config: InstanceConfig,
    region: String,
    live: bool,
}

impl MemoryCompute {
    /// A cloud offering what the shared catalog lists for `provider` (`aws`, `gcp`, …).
    pub fn simulating(provider: &'static str) -> Result<MemoryCompute, ComputeError> {
        Ok(MemoryCompute {
            catalog: shared_catalog()?,
            offers: CatalogOffers {
                backend: NAME,
                provider,
                regions: None,
                families: None,
                disk_range: (1.0, 65_536.0),
                region_of: str::to_string,
            },
            state: Mutex::new(State::default()),
        })
    }

    /// Lets `count` more instances of `instance_type` be created; creating one more is
    /// [`ComputeError::NoCapacity`].
    pub fn set_capacity(&self, instance_type: &str, count: usize) {
        self.state()
            .capacity
            .insert(instance_type.to_string(), count);
    }

    /// The cloud ids of the instances not terminated.
    pub fn live(&self) -> Vec<String> {
        let state = self.state();
        let live = state.instances.iter().filter(|(_, m)| m.live);
        live.map(|(id, _)| id.clone()).collect()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The record the engine keeps of instance `id` made from `offer`.
    fn created(offer: &Offer, id: &str) -> CreatedInstance {
        CreatedInstance {
            offer: offer.clone(),
            cloud_id: Some(id.to_string()),
            backend_data: serde_json::json!({ NAME: { "id": id } }),
        }
    }

    /// The cloud id an instance record names, if any.
    fn id_of(instance: &Instance) -> Option<String> {
        let id = instance.backend_data.get(NAME)?.get("id")?.as_str()?;
        Some(id.to_string())
    }

    /// Terminates instance `id` (nothing happens if it is unknown or already terminated).
    fn terminate(&self, id: &str) {
        if let Some(made) = self.state().instances.get_mut(id) {
            made.live = false;
        }
    }
}

impl Compute for MemoryCompute {
    fn backend(&self) -> &'static str {
        NAME
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
            let mut state = self.state();
            if let Some(left) = state.capacity.get_mut(&offer.instance_type) {
                if *left == 0 {
                    return Err(ComputeError::NoCapacity(format!(
                        "{} in {}: none left",
                        offer.instance_type, offer.region
                    )));
                }
                *left -= 1;
            }
            state.next += 1;
            let id = format!("mem-{}", state.next);
            let made = Made {
                config: config.clone(),
                region: offer.region.clone(),
                live: true,
            };
            state.instances.insert(id.clone(), made);
            Ok(Self::created(offer, &id))
        })
    }

    fn find_attempt<'a>(
        &'a self,
        offer: &'a Offer,
        config: &'a InstanceConfig,
    ) -> BoxFuture<'a, Result<Option<CreatedInstance>, ComputeError>> {
        Box::pin(async move {
            let state = self.state();
            let found = state
                .instances
                .iter()
                .find(|(_, m)| m.live && m.config.attempt_id == config.attempt_id);
            Ok(found.map(|(id, _)| Self::created(offer, id)))
        })
    }

    fn owned_instances(&self) -> BoxFuture<'_, Result<Vec<OwnedInstance>, ComputeError>> {
        Box::pin(async move {
            let state = self.state();
            let live = state.instances.iter().filter(|(_, m)| m.live);
            Ok(live
                .map(|(id, m)| OwnedInstance {
                    cloud_id: id.clone(),
                    instance_id: Some(m.config.instance_id.clone()),
                    attempt_id: Some(m.config.attempt_id.clone()),
                    state_id: Some(m.config.state_id.clone()),
                    region: m.region.clone(),
                })
                .collect())
        })
    }

    fn terminate_owned<'a>(
        &'a self,
        owned: &'a OwnedInstance,
    ) -> BoxFuture<'a, Result<(), ComputeError>> {
        Box::pin(async move {
            self.terminate(&owned.cloud_id);
            Ok(())
        })
    }

    fn dial_port<'a>(
        &'a self,
        instance: &'a Instance,
        _port: u16,
    ) -> BoxFuture<'a, std::io::Result<Box<dyn AgentStream>>> {
        Box::pin(async move {
            Err(std::io::Error::other(format!(
                "{}: instances of the in-memory backend have no ports",
                instance.name
            )))
        })
    }

    fn connect<'a>(
        &'a self,
        instance: &'a Instance,
    ) -> BoxFuture<'a, Result<AgentClient, ComputeError>> {
        Box::pin(async move {
            Err(ComputeError::NotSupported(format!(
                "{}: instances of the in-memory backend run no agent",
                instance.name
            )))
        })
    }

    fn terminate_instance<'a>(
        &'a self,
        instance: &'a Instance,
    ) -> BoxFuture<'a, Result<(), ComputeError>> {
        Box::pin(async move {
            if let Some(id) = Self::id_of(instance) {
                self.terminate(&id);
            }
            Ok(())
        })
    }
}
