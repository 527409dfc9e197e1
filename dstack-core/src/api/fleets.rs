//! Fleets, instances and volumes as dstack's `Fleet`, `Instance` and `Volume`.

use serde_json::{json, Value};

use super::runs::{instance_type, region};
use super::{backend_type, dstack_id, iso_time, Owner};
use crate::model::{Fleet, Instance, InstanceStatus, Volume, VolumeStatus};

/// dstack's `Instance` of an instance of the fleet named `fleet_name`.
///
/// dstack's `instance_num` is the number at the end of the instance's name (`<fleet>-<num>`);
/// `busy_blocks` is not counted (0); a terminated instance's `finished_at` is not recorded.
pub fn instance(owner: &Owner<'_>, instance: &Instance, fleet_name: Option<&str>) -> Value {
    let zone = instance
        .offer
        .as_ref()
        .and_then(|o| o.availability_zones.as_ref())
        .and_then(|zones| zones.first());
    // Why a terminated instance ended is only kept as text (its status message).
    let termination_message = (instance.status == InstanceStatus::Terminated)
        .then_some(instance.status_message.as_deref())
        .flatten();
    json!({
        "id": dstack_id(&instance.id),
        "project_name": owner.project_name,
        "backend": backend_type(&instance.backend),
        "instance_type": instance_type(instance),
        "name": instance.name,
        "fleet_id": dstack_id(&instance.fleet_id),
        "fleet_name": fleet_name,
        "instance_num": instance.num(),
        "hostname": instance.address.as_deref().unwrap_or("127.0.0.1"),
        "status": instance.status.as_str(),
        "unreachable": instance.unreachable,
        "termination_reason_message": termination_message,
        "created": iso_time(instance.created_at_ms),
        "region": region(instance),
        "availability_zone": zone,
        "price": instance.price,
        "total_blocks": instance.blocks.unwrap_or(1),
    })
}

/// dstack's `Fleet` of a fleet and its instances (instances of other fleets are ignored).
///
/// The fleet's configuration is dstack's fleet configuration as applied; the implicit fleet of
/// this machine (applied from no configuration) gets `{"type": "fleet", "name": …}`. Its
/// profile is dstack's default one.
pub fn fleet(owner: &Owner<'_>, fleet: &Fleet, instances: &[Instance]) -> Value {
    let configuration = fleet
        .configuration
        .clone()
        .unwrap_or_else(|| json!({"type": "fleet", "name": fleet.name}));
    let instances: Vec<Value> = instances
        .iter()
        .filter(|i| i.fleet_id == fleet.id)
        .map(|i| instance(owner, i, Some(&fleet.name)))
        .collect();
    json!({
        "id": dstack_id(&fleet.id),
        "name": fleet.name,
        "project_name": owner.project_name,
        "spec": {
            "configuration": configuration,
            "configuration_path": Value::Null,
            "profile": {"name": "default"},
        },
        "created_at": iso_time(fleet.created_at_ms),
        "status": fleet.status.as_str(),
        "status_message": fleet.status_message,
        "instances": instances,
    })
}

/// dstack's `Volume` of a volume; `instances` name the instances it is attached to (an
/// attachment to an instance not among them shows the instance id as its name).
///
/// dstack has no `deleted` status: a deleted volume is `active` with `deleted: true` (its
/// deletion time is not recorded). Its `last_processed_at` is the last time it was detached,
/// or its creation.
pub fn volume(owner: &Owner<'_>, volume: &Volume, instances: &[Instance]) -> Value {
    let (status, deleted) = match volume.status {
        VolumeStatus::Submitted => ("submitted", false),
        VolumeStatus::Active => ("active", false),
        VolumeStatus::Failed => ("failed", false),
        VolumeStatus::Deleted => ("active", true),
    };
    let attachments: Vec<Value> = volume
        .attachments
        .iter()
        .map(|a| {
            let found = instances.iter().find(|i| i.id == a.instance_id);
            let name = found.map_or(a.instance_id.as_str(), |i| i.name.as_str());
            json!({
                "instance": {
                    "name": name,
                    "instance_num": crate::model::instance_num(name),
                    "instance_id": a.instance_id,
                },
                "attachment_data": {"device_name": a.device_name},
            })
        })
        .collect();
    let provisioning_data = volume.volume_id.as_ref().map(|id| {
        json!({
            "backend": backend_type(&volume.backend),
            "volume_id": id,
            "size_gb": volume.size_gb,
            "availability_zone": volume.availability_zone,
        })
    });
    json!({
        "id": dstack_id(&volume.id),
        "name": volume.name,
        "user": owner.user,
        "project_name": owner.project_name,
        "configuration": volume.configuration,
        "external": volume.external,
        "created_at": iso_time(volume.created_at_ms),
        "last_processed_at": iso_time(volume.last_used_at_ms.unwrap_or(volume.created_at_ms)),
        "status": status,
        "status_message": volume.status_message,
        "deleted": deleted,
        "volume_id": volume.volume_id,
        "provisioning_data": provisioning_data,
        "attachments": attachments,
    })
}
