//! Which existing instances (dstack's *pool*) a run's profile allows, as dstack filters pool
//! instances before placing a job on one: `backends`, `regions`, `availability_zones`,
//! `instance_types`, `spot_policy` and `max_price` hold for instances already there as they do
//! for new cloud capacity (`provision`), so `backends: [aws]` never lands on this machine; and
//! `instances` names the instances a run may use (by name, host name, or fleet and number).
//!
//! An instance without a cloud offer (this machine, an SSH fleet host) has backend `local` or
//! `remote` (dstack's name for SSH fleet hosts), no region, zone or instance type (a run that
//! lists any of these is not placed there), is on-demand and costs what its fleet says
//! (nothing by default).

use crate::config::profile::{InstanceSelector, ProfileParams, SpotPolicy};
use crate::model::{Fleet, Instance};

/// The backend name a profile's `backends` uses for an instance (SSH fleet hosts are
/// `remote`, as in dstack).
fn backend_name(instance: &Instance) -> &str {
    match instance.backend.as_str() {
        "ssh" => "remote",
        other => other,
    }
}

/// The name of the fleet `instance` belongs to, among `fleets`.
pub fn fleet_name<'a>(fleets: &'a [Fleet], instance: &Instance) -> Option<&'a str> {
    fleets
        .iter()
        .find(|f| f.id == instance.fleet_id)
        .map(|f| f.name.as_str())
}

/// Whether `instance`, of fleet `fleet`, is one that `selector` names: by instance name, by
/// host name (an SSH host's `hostname`, else its address), or by fleet and instance number
/// (`<fleet>-<number>`).
fn selects(selector: &InstanceSelector, instance: &Instance, fleet: Option<&str>) -> bool {
    match selector {
        InstanceSelector::Name { name } => instance.name == *name,
        InstanceSelector::Hostname { hostname } => {
            let host = instance
                .backend_data
                .get("hostname")
                .and_then(|h| h.as_str());
            host.or(instance.address.as_deref()) == Some(hostname.as_str())
        }
        InstanceSelector::FleetInstance {
            fleet: wanted,
            instance: number,
        } => {
            // The project is not compared, as `fleets` does not: there is one project.
            let Some(fleet) = fleet.filter(|f| *f == wanted.name) else {
                return false;
            };
            instance
                .name
                .strip_prefix(fleet)
                .and_then(|rest| rest.strip_prefix('-'))
                .and_then(|n| n.parse::<i64>().ok())
                == Some(*number)
        }
    }
}

/// Why `profile` does not allow `instance` (of fleet `fleet`), or `None` when it does.
pub fn mismatch(
    profile: &ProfileParams,
    instance: &Instance,
    fleet: Option<&str>,
) -> Option<String> {
    if let Some(selectors) = &profile.instances {
        if !selectors.iter().any(|s| selects(s, instance, fleet)) {
            return Some("not one of `instances`".to_string());
        }
    }
    let backend = backend_name(instance);
    if let Some(backends) = &profile.backends {
        if !backends.iter().any(|b| b.as_str() == backend) {
            let listed: Vec<&str> = backends.iter().map(|b| b.as_str()).collect();
            return Some(format!(
                "backend {backend} is not one of `backends` ({})",
                listed.join(", ")
            ));
        }
    }
    let offer = instance.offer.as_ref();
    let checks = [
        (
            "regions",
            offer.map(|o| o.region.as_str()),
            &profile.regions,
        ),
        (
            "instance_types",
            offer.map(|o| o.instance_type.as_str()),
            &profile.instance_types,
        ),
    ];
    for (field, value, wanted) in checks {
        let Some(wanted) = wanted else { continue };
        match value {
            Some(v) if wanted.iter().any(|w| w.eq_ignore_ascii_case(v)) => {}
            Some(v) => {
                return Some(format!(
                    "{} is not one of `{field}` ({})",
                    v,
                    wanted.join(", ")
                ))
            }
            None => return Some(format!("a {backend} host has no `{field}` to match")),
        }
    }
    if let Some(wanted) = &profile.availability_zones {
        let zones = offer.and_then(|o| o.availability_zones.as_deref());
        let Some(zones) = zones else {
            return Some(format!(
                "a {backend} host has no `availability_zones` to match"
            ));
        };
        if !zones
            .iter()
            .any(|z| wanted.iter().any(|w| w.eq_ignore_ascii_case(z)))
        {
            return Some(format!(
                "its zone is not one of `availability_zones` ({})",
                wanted.join(", ")
            ));
        }
    }
    let spot = offer.is_some_and(|o| o.spot);
    match (profile.spot_policy, spot) {
        (Some(SpotPolicy::Spot), false) => {
            return Some("on-demand, and `spot_policy` is spot".to_string())
        }
        (Some(SpotPolicy::OnDemand), true) => {
            return Some("spot, and `spot_policy` is on-demand".to_string())
        }
        _ => {}
    }
    if let Some(max) = profile.max_price {
        if instance.price > max {
            return Some(format!(
                "costs ${}/h, above `max_price` ${max}/h",
                instance.price
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Configuration;

    fn profile(yaml: &str) -> ProfileParams {
        let text = format!("type: task\ncommands: [\"true\"]\n{yaml}");
        let config = crate::config::parse(&text, "t.yml").unwrap();
        let Configuration::Task(task) = config else {
            unreachable!()
        };
        task.common.profile
    }

    fn instance(backend: &str, offer: Option<serde_json::Value>, price: f64) -> Instance {
        Instance {
            price,
            offer: offer.map(|o| serde_json::from_value(o).unwrap()),
            ..Instance::for_tests("i-0", backend)
        }
    }

    fn aws(spot: bool) -> Instance {
        let offer = serde_json::json!({
            "backend": "aws", "region": "eu-west-1", "instance_type": "t3.large",
            "price": 0.08, "spot": spot,
            "resources": {"cpus": 2, "memory_bytes": 1_u64 << 30, "disk_bytes": 1_u64 << 30,
                          "gpus": [], "cpu_arch": "x86"},
            "availability": "available", "availability_zones": ["eu-west-1a"],
            "backend_data": null
        });
        instance("aws", Some(offer), 0.08)
    }

    #[test]
    fn backends_keep_runs_off_hosts_of_other_backends() {
        let local = instance("local", None, 0.0);
        let ssh = instance("ssh", None, 0.0);
        let to_aws = profile("backends: [aws]\n");
        assert_eq!(
            mismatch(&to_aws, &local, None).as_deref(),
            Some("backend local is not one of `backends` (aws)")
        );
        assert!(mismatch(&to_aws, &ssh, None).is_some());
        assert_eq!(mismatch(&to_aws, &aws(false), None), None);
        assert_eq!(mismatch(&profile("backends: [remote]\n"), &ssh, None), None);
        assert_eq!(mismatch(&profile(""), &local, None), None);
    }

    #[test]
    fn regions_zones_and_types_need_an_instance_that_has_them() {
        let local = instance("local", None, 0.0);
        for yaml in [
            "regions: [eu-west-1]\n",
            "instance_types: [t3.large]\n",
            "availability_zones: [eu-west-1a]\n",
        ] {
            let p = profile(yaml);
            assert!(mismatch(&p, &local, None).is_some(), "{yaml}");
            assert_eq!(mismatch(&p, &aws(false), None), None, "{yaml}");
        }
        assert!(mismatch(&profile("regions: [us-east-1]\n"), &aws(false), None).is_some());
        assert!(mismatch(
            &profile("instance_types: [p4d.24xlarge]\n"),
            &aws(false),
            None
        )
        .is_some());
        assert!(mismatch(
            &profile("availability_zones: [eu-west-1b]\n"),
            &aws(false),
            None
        )
        .is_some());
    }

    #[test]
    fn instances_select_by_name_host_name_or_fleet_and_number() {
        let mut host = instance("ssh", None, 0.0);
        host.name = "gpus-1".to_string();
        host.backend_data = serde_json::json!({"hostname": "10.0.0.7", "port": 22});
        let fleet = Some("gpus");
        for yaml in [
            "instances: [gpus-1]\n",
            "instances: [{hostname: 10.0.0.7}]\n",
            "instances: [{fleet: gpus, instance: 1}]\n",
            "instances: [other-0, {fleet: gpus, instance: 1}]\n",
        ] {
            assert_eq!(mismatch(&profile(yaml), &host, fleet), None, "{yaml}");
        }
        for yaml in [
            "instances: [gpus-2]\n",
            "instances: [{hostname: 10.0.0.8}]\n",
            "instances: [{fleet: gpus, instance: 0}]\n",
            "instances: [{fleet: other, instance: 1}]\n",
        ] {
            assert_eq!(
                mismatch(&profile(yaml), &host, fleet).as_deref(),
                Some("not one of `instances`"),
                "{yaml}"
            );
        }
    }

    #[test]
    fn spot_policy_and_max_price_hold_on_existing_instances() {
        let local = instance("local", None, 0.0);
        let spot = profile("spot_policy: spot\n");
        assert_eq!(
            mismatch(&spot, &local, None).as_deref(),
            Some("on-demand, and `spot_policy` is spot")
        );
        assert!(mismatch(&spot, &aws(false), None).is_some());
        assert_eq!(mismatch(&spot, &aws(true), None), None);
        assert!(mismatch(&profile("spot_policy: on-demand\n"), &aws(true), None).is_some());
        assert_eq!(
            mismatch(&profile("spot_policy: auto\n"), &aws(true), None),
            None
        );
        assert_eq!(mismatch(&profile(""), &aws(true), None), None);
        let cheap = profile("max_price: 0.05\n");
        assert_eq!(
            mismatch(&cheap, &aws(false), None).as_deref(),
            Some("costs $0.08/h, above `max_price` $0.05/h")
        );
        assert_eq!(mismatch(&cheap, &local, None), None);
    }
}
