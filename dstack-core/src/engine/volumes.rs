//! Network volumes (`type: volume`), as dstack manages them: applying one records it
//! (`submitted`, write before act), then creates the disk — or registers the existing one
//! `volume_id` names — and ends `active` or `failed` with the backend's reason. Attaching and
//! detaching are recorded per instance; a volume is deleted only when attached nowhere (by
//! hand, or by the sweep once unused for its `auto_cleanup_duration`), and a registered volume
//! is only forgotten, never deleted from the cloud.

use std::sync::Arc;

use super::{EngineError, Inner};
use crate::backend::Compute;
use crate::config::Configuration;
use crate::model::{longer_than, now_ms, Instance, Volume, VolumeAttachment, VolumeStatus};

impl Inner {
    /// Applies a volume configuration; returns the volume as it ended (`active` or `failed`).
    /// Re-applying the name of an active volume returns it unchanged.
    pub(crate) async fn apply_volume(
        self: &Arc<Self>,
        configuration: &Configuration,
    ) -> Result<Volume, EngineError> {
        let Configuration::Volume(config) = configuration else {
            return Err(EngineError::Invalid(format!(
                "a {} configuration is not a volume",
                configuration.type_name()
            )));
        };
        super::refuse_unsupported(configuration)?;
        let name = config
            .name
            .clone()
            .ok_or_else(|| EngineError::Invalid("a volume needs a `name`".to_string()))?;
        if !super::names::is_valid(&name) {
            return Err(EngineError::Invalid(format!(
                "invalid volume name `{name}`: use 2-41 characters of a-z, 0-9 and -, starting \
                 with a letter"
            )));
        }
        if let Some(existing) = self.live_volume(&name)? {
            if existing.status == VolumeStatus::Active {
                return Ok(existing);
            }
        }
        let backend = self.volume_backend(&config.backend)?;
        let region = config
            .region
            .clone()
            .ok_or_else(|| EngineError::Invalid(format!("volume {name}: `region` is required")))?;
        if config.volume_id.is_none() && config.size.is_none() {
            return Err(EngineError::Invalid(format!(
                "volume {name}: `size` is required to create a volume (or give `volume_id` to \
                 register an existing one)"
            )));
        }
        let mut volume = Volume {
            id: uuid::Uuid::new_v4().to_string(),
            name: name.clone(),
            status: VolumeStatus::Submitted,
            status_message: None,
            configuration: configuration.to_json(),
            backend: config.backend.clone(),
            region,
            volume_id: None,
            availability_zone: config.availability_zone.clone(),
            size_gb: None,
            external: config.volume_id.is_some(),
            attachments: Vec::new(),
            created_at_ms: now_ms(),
            last_used_at_ms: None,
        };
        self.store.put_volume(&volume)?;
        let provisioned = match &config.volume_id {
            Some(_) => backend.register_volume(config).await,
            None => backend.create_volume(&name, config).await,
        };
        match provisioned {
            Ok(p) => {
                volume.volume_id = Some(p.volume_id);
                volume.size_gb = Some(p.size_gb);
                volume.availability_zone = p.availability_zone.or(volume.availability_zone);
                volume.status = VolumeStatus::Active;
            }
            Err(e) => {
                volume.status = VolumeStatus::Failed;
                volume.status_message = Some(e.to_string());
            }
        }
        self.store.put_volume(&volume)?;
        Ok(volume)
    }

    /// Deletes a volume attached nowhere: the disk is deleted (a registered one only forgotten).
    pub(crate) async fn delete_volume(self: &Arc<Self>, name: &str) -> Result<Volume, EngineError> {
        let mut volume = self
            .live_volume(name)?
            .ok_or_else(|| EngineError::Invalid(format!("no volume named {name}")))?;
        if let Some(a) = volume.attachments.first() {
            let instance = self.store.instance(&a.instance_id)?;
            let shown = instance.map_or_else(|| a.instance_id.clone(), |i| i.name);
            return Err(EngineError::Invalid(format!(
                "volume {name} is attached to {shown}; detach it first"
            )));
        }
        if !volume.external && volume.volume_id.is_some() {
            self.volume_backend(&volume.backend)?
                .delete_volume(&volume)
                .await?;
        }
        volume.status = VolumeStatus::Deleted;
        self.store.put_volume(&volume)?;
        Ok(volume)
    }

    /// Attaches an active volume to an instance of the same backend and region.
    pub(crate) async fn attach_volume(
        self: &Arc<Self>,
        name: &str,
        instance_id: &str,
    ) -> Result<Volume, EngineError> {
        let (mut volume, instance) = self.volume_and_instance(name, instance_id)?;
        if volume.status != VolumeStatus::Active {
            return Err(EngineError::Invalid(format!(
                "volume {name} is {}",
                volume.status.as_str()
            )));
        }
        if volume
            .attachments
            .iter()
            .any(|a| a.instance_id == instance.id)
        {
            return Ok(volume);
        }
        let region = instance.offer.as_ref().map(|o| o.region.as_str());
        if instance.backend != volume.backend || region != Some(volume.region.as_str()) {
            return Err(EngineError::Invalid(format!(
                "volume {name} is in {} {}; instance {} is not",
                volume.backend, volume.region, instance.name
            )));
        }
        let device = self
            .volume_backend(&volume.backend)?
            .attach_volume(&volume, &instance)
            .await?;
        volume.attachments.push(VolumeAttachment {
            instance_id: instance.id.clone(),
            device_name: device,
        });
        self.store.put_volume(&volume)?;
        Ok(volume)
    }

    /// Detaches a volume from an instance (`force`: even while in use there).
    pub(crate) async fn detach_volume(
        self: &Arc<Self>,
        name: &str,
        instance_id: &str,
        force: bool,
    ) -> Result<Volume, EngineError> {
        let (mut volume, instance) = self.volume_and_instance(name, instance_id)?;
        let backend = self.volume_backend(&volume.backend)?;
        backend.detach_volume(&volume, &instance, force).await?;
        if !backend.is_volume_detached(&volume, &instance).await? {
            return Err(EngineError::Invalid(format!(
                "volume {name} is still detaching from {}; try again",
                instance.name
            )));
        }
        volume.attachments.retain(|a| a.instance_id != instance.id);
        volume.last_used_at_ms = Some(now_ms());
        self.store.put_volume(&volume)?;
        Ok(volume)
    }

    /// Deletes active volumes attached nowhere that have been unused for longer than their
    /// `auto_cleanup_duration` (positive durations only; `off`/`-1` keep them).
    pub(crate) async fn clean_up_volumes(self: &Arc<Self>) -> Result<(), EngineError> {
        let now = now_ms();
        for volume in self.store.volumes()? {
            if volume.status != VolumeStatus::Active || !volume.attachments.is_empty() {
                continue;
            }
            let Ok(Configuration::Volume(config)) =
                crate::config::parse_value(&volume.configuration, "<stored volume>")
            else {
                continue;
            };
            // Off (`-1`) and other negatives keep the volume.
            let Some(limit) = config
                .auto_cleanup_duration
                .and_then(|d| u64::try_from(d.seconds()).ok())
            else {
                continue;
            };
            let since = volume.last_used_at_ms.unwrap_or(volume.created_at_ms);
            if limit > 0 && longer_than(now, since, limit) {
                self.delete_volume(&volume.name).await?;
            }
        }
        Ok(())
    }

    /// The volume called `name` that is not deleted.
    pub(crate) fn live_volume(&self, name: &str) -> Result<Option<Volume>, EngineError> {
        Ok(self
            .store
            .volumes()?
            .into_iter()
            .find(|v| v.name == name && v.status != VolumeStatus::Deleted))
    }

    fn volume_and_instance(
        &self,
        name: &str,
        instance_id: &str,
    ) -> Result<(Volume, Instance), EngineError> {
        let volume = self
            .live_volume(name)?
            .ok_or_else(|| EngineError::Invalid(format!("no volume named {name}")))?;
        let instance = self
            .store
            .instance(instance_id)?
            .ok_or_else(|| EngineError::Invalid(format!("unknown instance {instance_id}")))?;
        Ok((volume, instance))
    }

    fn volume_backend(&self, name: &str) -> Result<&Arc<dyn Compute>, EngineError> {
        self.backend(name).ok_or_else(|| {
            EngineError::Unsupported(format!(
                "backend {name} is not configured (add it to $DSTACK_HOME/config.yml)"
            ))
        })
    }
}
