//! GCP Compute Engine (`type: gcp`), through google-cloud-compute-v1.
//!
//! Offers come from the catalog's `gcp` items (zones grouped by region). `create_instance`
//! makes sure the firewall rule `dstack-ssh-in-<network>` lets SSH in to instances tagged
//! `dstack-runner-instance` (as dstack; with `ssh_ingress_cidrs`, a rule of the list's own,
//! `dstack-ssh-in-<network>-<hash>`, for instances tagged `dstack-ssh-<hash>` instead: see
//! [`crate::config::SshIngress`]), then inserts the instance, named after the creation
//! attempt, in the first of the offer's zones that has capacity: boot disk of the offer's size from the image (`os_images`, else Ubuntu 22.04 for
//! CPU and Google's Deep Learning VM for NVIDIA instances), guest accelerators for N1 GPU
//! types, `SPOT` provisioning for spot offers, `TERMINATE` on host maintenance for GPUs,
//! cloud-init user data (the project key and the instance's own host key, see `provider`) and
//! `ssh-keys` metadata with the project key, an external address only
//! with `public_ips`, and labels (`owner=dstack`, `dstack_owner=<this home>`,
//! `dstack_state=<this state>`, `dstack_instance_id=<the engine's id>`,
//! `dstack_attempt=<this attempt>`, …). An insert whose answer was lost, or whose operation
//! could not be followed, is [`ComputeError::Unknown`]; the instance the attempt made is then
//! found by its name.
//! Once the instance runs, the engine reaches it over SSH exactly as on an SSH fleet host.
//! Network volumes are persistent disks (`pd-balanced`).
//!
//! Verified here at the API-shape level only: no GCP emulator exists, so the tests run the
//! real client library against a local stand-in that checks each request's shape.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dstack_core::backend::{
    ComputeError, CreatedInstance, InstanceConfig, OwnedInstance, VolumeProvisioning,
};
use dstack_core::config::volume::VolumeConfiguration;
use dstack_core::model::{Instance, Volume};
use dstack_core::offers::Offer;
use google_cloud_compute_v1::client::{Disks, Firewalls, Instances, ZoneOperations};
use google_cloud_compute_v1::model;
use serde::{Deserialize, Serialize};

use crate::cloud::{shared_catalog, zone_region, CatalogOffers};
use crate::config::{GcpConfig, GcpCreds, OsImage, SshIngress};
use crate::project::{HostKey, Project};
use crate::provider::{CloudCompute, Provider};

/// Boot disk sizes GCP can configure, in GB.
const DISK_RANGE: (f64, f64) = (20.0, 32768.0);

/// The network tag the SSH firewall rule targets.
const INSTANCE_TAG: &str = "dstack-runner-instance";

/// How long an insert operation is awaited for a capacity error before it counts as started.
const OPERATION_WAIT: Duration = Duration::from_secs(30);

/// Operation error codes that mean "no capacity or quota here": try the next zone or offer.
const CAPACITY_CODES: [&str; 5] = [
    "ZONE_RESOURCE_POOL_EXHAUSTED",
    "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
    "QUOTA_EXCEEDED",
    "UNSUPPORTED_OPERATION",
    "RESOURCE_NOT_FOUND",
];

fn default_cpu_image() -> OsImage {
    OsImage {
        name: "projects/ubuntu-os-cloud/global/images/family/ubuntu-2204-lts".to_string(),
        owner: String::new(),
        user: "ubuntu".to_string(),
    }
}

fn default_nvidia_image() -> OsImage {
    OsImage {
        name:
            "projects/deeplearning-platform-release/global/images/family/common-cu124-ubuntu-2204"
                .to_string(),
        owner: String::new(),
        user: "ubuntu".to_string(),
    }
}

/// What a GCP instance records under `backend_data.gcp`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct GcpInstanceData {
    name: String,
    zone: String,
    spot: bool,
    user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    address: Option<String>,
}

/// The Compute Engine API calls of the `gcp` backend.
pub struct Gcp {
    config: GcpConfig,
    project: Project,
    project_name: String,
    /// The zones of the configured regions: where this state's instances may be.
    zones: Vec<String>,
    /// Every zone of the catalog (volumes may be in any region).
    all_zones: Vec<String>,
    instances: Instances,
    firewalls: Firewalls,
    disks: Disks,
    operations: ZoneOperations,
    creating: tokio::sync::Mutex<()>,
}

/// GCP Compute Engine as a backend.
pub type GcpCompute = CloudCompute<Gcp>;

type Error = google_cloud_compute_v1::Error;

fn other(call: &str, e: Error) -> ComputeError {
    match e.http_status_code() {
        Some(401 | 403) => ComputeError::Unauthenticated(format!("{call}: {e}")),
        Some(404) => ComputeError::NotFound(format!("{call}: {e}")),
        _ => ComputeError::Other(format!("{call}: {e}")),
    }
}

/// An error of a call that may have taken effect: unknown when no answer came or Google
/// failed internally.
fn uncertain(call: &str, e: Error) -> ComputeError {
    match e.http_status_code() {
        None | Some(500..) => ComputeError::Unknown(format!("{call}: {e}")),
        _ => other(call, e),
    }
}

fn not_found(e: &Error) -> bool {
    e.http_status_code() == Some(404)
}

impl GcpCompute {
    /// The backend of `config` for the state in `home`, installing `agent_bin` on instances.
    /// Fails, saying why, without credentials.
    pub async fn new(
        config: GcpConfig,
        home: &Path,
        project_name: &str,
        agent_bin: PathBuf,
    ) -> Result<GcpCompute, ComputeError> {
        let project = Project::load_or_create(home)
            .map_err(|e| ComputeError::Other(format!("project identity: {e}")))?;
        let credentials = credentials(&config)?;
        let endpoint = config.endpoint_url.clone();
        macro_rules! client {
            ($kind:ty) => {{
                let mut builder = <$kind>::builder().with_credentials(credentials.clone());
                if let Some(url) = &endpoint {
                    builder = builder.with_endpoint(url.clone());
                }
                builder
                    .build()
                    .await
                    .map_err(|e| ComputeError::Other(format!("GCP client: {e}")))?
            }};
        }
        let offers = CatalogOffers {
            backend: "gcp",
            provider: "gcp",
            regions: config.regions.clone(),
            families: None,
            disk_range: DISK_RANGE,
            region_of: zone_region,
        };
        let catalog = shared_catalog()?;
        let all_zones = CatalogOffers {
            regions: None,
            ..offers.clone()
        }
        .locations(&catalog);
        let gcp = Gcp {
            zones: offers.locations(&catalog),
            all_zones,
            instances: client!(Instances),
            firewalls: client!(Firewalls),
            disks: client!(Disks),
            operations: client!(ZoneOperations),
            creating: tokio::sync::Mutex::new(()),
            config,
            project,
            project_name: project_name.to_string(),
        };
        CloudCompute::from_provider(gcp, offers, home, agent_bin)
    }
}

impl Gcp {
    fn network(&self) -> String {
        self.config
            .vpc_name
            .clone()
            .unwrap_or_else(|| "default".to_string())
    }

    /// The firewall rule letting SSH in, and the network tag it targets.
    fn ssh_rule(&self) -> (SshIngress, String, String) {
        let ingress = SshIngress::of(self.config.ssh_ingress_cidrs.as_deref());
        let network = self.network();
        let (name, target) = match &ingress.suffix {
            None => (format!("dstack-ssh-in-{network}"), INSTANCE_TAG.to_string()),
            Some(suffix) => (
                format!("dstack-ssh-in-{network}-{suffix}"),
                format!("dstack-ssh-{suffix}"),
            ),
        };
        (ingress, name, target)
    }

    /// Makes sure SSH may reach the project's instances from `ssh_ingress_cidrs`.
    async fn ensure_firewall(&self) -> Result<(), ComputeError> {
        let network = self.network();
        let (ingress, name, target) = self.ssh_rule();
        match self
            .firewalls
            .get()
            .set_project(&self.config.project_id)
            .set_firewall(&name)
            .send()
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(other("firewalls.get", e)),
        }
        let mut allowed = model::firewall::Allowed::default();
        allowed.ip_protocol = Some("tcp".to_string());
        allowed.ports = vec!["22".to_string()];
        let mut rule = model::Firewall::default();
        rule.name = Some(name);
        rule.network = Some(format!("global/networks/{network}"));
        rule.direction = Some(model::firewall::Direction::Ingress);
        rule.source_ranges = ingress.cidrs;
        rule.allowed = vec![allowed];
        rule.target_tags = vec![target];
        match self
            .firewalls
            .insert()
            .set_project(&self.config.project_id)
            .set_body(rule)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.http_status_code() == Some(409) => Ok(()),
            Err(e) => Err(other("firewalls.insert", e)),
        }
    }

    /// This state's instances (not terminated) in every zone.
    async fn owned_list(&self) -> Result<Vec<model::Instance>, ComputeError> {
        let mut found = Vec::new();
        for zone in &self.zones {
            let listed = self
                .instances
                .list()
                .set_project(&self.config.project_id)
                .set_zone(zone)
                .set_filter(format!(
                    "labels.dstack_owner = \"{}\"",
                    self.project.owner_id
                ))
                .send()
                .await
                .map_err(|e| other("instances.list", e))?;
            found.extend(
                listed
                    .items
                    .into_iter()
                    .filter(|i| !matches!(i.status, Some(model::instance::Status::Terminated))),
            );
        }
        Ok(found)
    }

    /// The first `instance_addresses` entry no live instance of this state uses.
    async fn free_address(&self) -> Result<Option<String>, ComputeError> {
        if self.config.instance_addresses.is_empty() {
            return Ok(None);
        }
        let used: Vec<String> = self
            .owned_list()
            .await?
            .iter()
            .filter_map(|i| i.labels.get("dstack_address").cloned())
            .collect();
        self.config
            .instance_addresses
            .iter()
            .find(|a| !used.contains(&label_value(a)))
            .cloned()
            .map(Some)
            .ok_or_else(|| {
                ComputeError::NoCapacity("every address in instance_addresses is in use".into())
            })
    }

    /// Waits for an operation to finish (up to [`OPERATION_WAIT`]) and reports its error.
    async fn finish(&self, zone: &str, mut op: model::Operation) -> Result<(), ComputeError> {
        let deadline = tokio::time::Instant::now() + OPERATION_WAIT;
        loop {
            if let Some(error) = &op.error {
                let codes: Vec<String> =
                    error.errors.iter().filter_map(|e| e.code.clone()).collect();
                let messages: Vec<String> = error
                    .errors
                    .iter()
                    .filter_map(|e| e.message.clone())
                    .collect();
                let text = format!("{}: {}", codes.join(", "), messages.join("; "));
                return Err(
                    if codes.iter().any(|c| CAPACITY_CODES.contains(&c.as_str())) {
                        ComputeError::NoCapacity(text)
                    } else {
                        ComputeError::Other(text)
                    },
                );
            }
            if matches!(op.status, Some(model::operation::Status::Done))
                || tokio::time::Instant::now() > deadline
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let name = op.name.clone().unwrap_or_default();
            op = self
                .operations
                .get()
                .set_project(&self.config.project_id)
                .set_zone(zone)
                .set_operation(name)
                .send()
                .await
                .map_err(|e| uncertain("zoneOperations.get", e))?;
        }
    }

    /// The name of the instance a creation attempt makes: each attempt its own, so that the
    /// one whose outcome is unknown is found by its name.
    fn attempt_name(&self, config: &InstanceConfig) -> String {
        let suffix: String = config
            .attempt_id
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(8)
            .collect();
        instance_name(&self.project_name, &config.name, &suffix)
    }

    /// A new instance's metadata: cloud-init user data (the project key and `host_key`, see
    /// [`Project::user_data`]) and the project key in `ssh-keys` for the image's user.
    fn metadata(&self, image: &OsImage, host_key: &HostKey) -> model::Metadata {
        let item = |key: &str, value: String| {
            let mut i = model::metadata::Items::default();
            i.key = Some(key.to_string());
            i.value = Some(value);
            i
        };
        let mut metadata = model::Metadata::default();
        metadata.items = vec![
            item("user-data", self.project.user_data(host_key)),
            item(
                "ssh-keys",
                format!("{}:{}", image.user, self.project.ssh_public_key),
            ),
        ];
        metadata
    }

    /// A new instance without its metadata (see [`Gcp::metadata`]).
    fn body(
        &self,
        offer: &Offer,
        config: &InstanceConfig,
        zone: &str,
        name: &str,
        image: &OsImage,
        address: Option<&str>,
    ) -> model::Instance {
        let mut init = model::AttachedDiskInitializeParams::default();
        init.source_image = Some(image.name.clone());
        init.disk_size_gb = Some((offer.resources.disk_bytes >> 30).max(1) as i64);
        init.disk_type = Some(format!("zones/{zone}/diskTypes/pd-balanced"));
        let mut boot = model::AttachedDisk::default();
        boot.boot = Some(true);
        boot.auto_delete = Some(true);
        boot.initialize_params = Some(init);
        let mut nat = model::AccessConfig::default();
        nat.name = Some("External NAT".to_string());
        nat.r#type = Some(model::access_config::Type::OneToOneNat);
        let mut nic = model::NetworkInterface::default();
        nic.network = Some(format!("global/networks/{}", self.network()));
        if self.config.public_ips.unwrap_or(true) {
            nic.access_configs = vec![nat];
        }
        let mut tags = model::Tags::default();
        tags.items = vec![self.ssh_rule().2];
        let gpus = offer.resources.gpus.len();
        let mut scheduling = model::Scheduling::default();
        if gpus > 0 {
            scheduling.on_host_maintenance = Some(model::scheduling::OnHostMaintenance::Terminate);
        }
        if offer.spot {
            scheduling.provisioning_model = Some(model::scheduling::ProvisioningModel::Spot);
            scheduling.instance_termination_action =
                Some(model::scheduling::InstanceTerminationAction::Stop);
        }
        let mut instance = model::Instance::default();
        instance.name = Some(name.to_string());
        instance.machine_type = Some(format!("zones/{zone}/machineTypes/{}", offer.instance_type));
        instance.disks = vec![boot];
        instance.network_interfaces = vec![nic];
        instance.tags = Some(tags);
        instance.scheduling = Some(scheduling);
        instance.labels = self.labels(config, address);
        if gpus > 0 && offer.instance_type.starts_with("n1-") {
            let gpu = offer.resources.gpus[0].name.to_lowercase();
            let mut accelerator = model::AcceleratorConfig::default();
            accelerator.accelerator_type =
                Some(format!("zones/{zone}/acceleratorTypes/nvidia-tesla-{gpu}"));
            accelerator.accelerator_count = Some(gpus as i32);
            instance.guest_accelerators = vec![accelerator];
        }
        if let Some(account) = &self.config.vm_service_account {
            let mut sa = model::ServiceAccount::default();
            sa.email = Some(account.clone());
            sa.scopes = vec!["https://www.googleapis.com/auth/cloud-platform".to_string()];
            instance.service_accounts = vec![sa];
        }
        instance
    }

    /// Labels: the project's tags (see [`Project::instance_tags`]) as GCP allows them
    /// (lower case, `[a-z0-9_-]`).
    fn labels(&self, config: &InstanceConfig, address: Option<&str>) -> HashMap<String, String> {
        self.project
            .instance_tags(&self.project_name, config, address, &self.config.tags)
            .iter()
            .map(|(k, v)| (label_value(k), label_value(v)))
            .collect()
    }

    fn data(instance: &Instance) -> Result<GcpInstanceData, ComputeError> {
        serde_json::from_value(
            instance
                .backend_data
                .get("gcp")
                .cloned()
                .unwrap_or_default(),
        )
        .map_err(|e| {
            ComputeError::Other(format!(
                "instance {}: bad GCP instance data: {e}",
                instance.name
            ))
        })
    }

    async fn delete_instance(&self, zone: &str, name: &str) -> Result<(), ComputeError> {
        match self
            .instances
            .delete()
            .set_project(&self.config.project_id)
            .set_zone(zone)
            .set_instance(name)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(other("instances.delete", e)),
        }
    }

    fn volume_zone(&self, config: &VolumeConfiguration) -> Result<String, ComputeError> {
        if let Some(zone) = &config.availability_zone {
            return Ok(zone.clone());
        }
        let region = config.region.clone().unwrap_or_default();
        self.all_zones
            .iter()
            .find(|z| zone_region(z) == region)
            .cloned()
            .ok_or_else(|| ComputeError::Other(format!("no known zone in {region}")))
    }

    async fn detach(&self, volume: &Volume, instance: &Instance) -> Result<(), ComputeError> {
        let data = Self::data(instance)?;
        let device = format!("pd-{}", volume.volume_id.clone().unwrap_or_default());
        match self
            .instances
            .detach_disk()
            .set_project(&self.config.project_id)
            .set_zone(&data.zone)
            .set_instance(&data.name)
            .set_device_name(device)
            .send()
            .await
        {
            Ok(op) => self.finish(&data.zone, op).await,
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(other("instances.detachDisk", e)),
        }
    }
}

/// Credentials for the configured `creds`.
fn credentials(
    config: &GcpConfig,
) -> Result<google_cloud_auth::credentials::Credentials, ComputeError> {
    use google_cloud_auth::credentials;
    let missing = |why: String| {
        ComputeError::Unauthenticated(format!(
            "no GCP credentials ({why}): set `creds` in config.yml (a service account key), \
             GOOGLE_APPLICATION_CREDENTIALS, or run `gcloud auth application-default login`"
        ))
    };
    match &config.creds {
        Some(GcpCreds::Anonymous) => Ok(credentials::anonymous::Builder::new().build()),
        Some(GcpCreds::ServiceAccount { filename, data }) => {
            let text = match (data, filename) {
                (Some(data), _) => data.clone(),
                (None, Some(file)) => {
                    let path = match file.strip_prefix("~/") {
                        Some(rest) => {
                            Path::new(&std::env::var("HOME").unwrap_or_default()).join(rest)
                        }
                        None => PathBuf::from(file),
                    };
                    std::fs::read_to_string(&path)
                        .map_err(|e| missing(format!("{}: {e}", path.display())))?
                }
                (None, None) => {
                    return Err(missing("service_account needs filename or data".into()))
                }
            };
            let key: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| missing(format!("the service account key is not JSON: {e}")))?;
            credentials::service_account::Builder::new(key)
                .build()
                .map_err(|e| missing(e.to_string()))
        }
        Some(GcpCreds::Default) | None => {
            // Only file-based application default credentials: probing the metadata server
            // would reach out of this machine.
            let home = std::env::var("HOME").unwrap_or_default();
            let adc = Path::new(&home).join(".config/gcloud/application_default_credentials.json");
            if std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS").is_none() && !adc.exists() {
                return Err(missing(
                    "no GOOGLE_APPLICATION_CREDENTIALS and no gcloud application default credentials"
                        .into(),
                ));
            }
            credentials::Builder::default()
                .build()
                .map_err(|e| missing(e.to_string()))
        }
    }
}

/// What the engine records about instance `name` made in `zone` for `offer`.
fn created(
    offer: &Offer,
    name: String,
    zone: String,
    user: String,
    address: Option<String>,
) -> CreatedInstance {
    let data = GcpInstanceData {
        name: name.clone(),
        zone,
        spot: offer.spot,
        user,
        address,
    };
    CreatedInstance {
        offer: offer.clone(),
        cloud_id: Some(name),
        backend_data: serde_json::json!({ "gcp": data }),
    }
}

/// `dstack-<project>-<name>-<suffix>`, lower case, at most 63 characters (the suffix kept).
fn instance_name(project: &str, name: &str, suffix: &str) -> String {
    let clean = |s: &str| -> String {
        s.to_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect()
    };
    let head = format!("dstack-{}-{}", clean(project), clean(name));
    let room = 63 - suffix.len() - 1;
    let head: String = head.chars().take(room).collect();
    format!("{}-{suffix}", head.trim_end_matches('-'))
}

/// A label value GCP accepts: lower case letters, digits, `_` and `-`, at most 63 characters.
fn label_value(value: &str) -> String {
    value
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect()
}

/// The shutdown action of a GCE instance's agent when its owner lease lapses (see
/// `provider`). A guest that powers itself off leaves a GCE instance `TERMINATED` (stopped):
/// its vCPUs, memory and GPUs are no longer billed, but its disks and any static address
/// are, and no scheduling setting deletes an instance the guest powered off. So the instance
/// deletes itself through the Compute API at `api` (`…/compute/v1`) in `project`, with the
/// token of its service account from the metadata server (`$GCE_METADATA_HOST`, as Google's
/// client libraries, else `metadata.google.internal`); where it cannot (no service account,
/// see `vm_service_account`, or one not allowed to delete it; no `curl`), it powers off.
fn self_delete_script(api: &str, project: &str) -> String {
    format!(
        r#"base={base}
md="http://${{GCE_METADATA_HOST:-metadata.google.internal}}/computeMetadata/v1"
get() {{ curl -sf -m 10 -H 'Metadata-Flavor: Google' "$md/$1"; }}
token=$(get instance/service-accounts/default/token | sed -n 's/.*"access_token" *: *"\([^"]*\)".*/\1/p')
zone=$(get instance/zone); zone=${{zone##*/}}
name=$(get instance/name)
if [ -n "$token" ] && [ -n "$zone" ] && [ -n "$name" ] &&
   curl -sf -m 30 -o /dev/null -X DELETE -H "Authorization: Bearer $token"      "$base/zones/$zone/instances/$name"; then
  echo "deleting instance $name in $zone"
  exit 0
fi
echo "cannot delete this instance through the Compute API; powering it off (stopped, its disks stay billed)" >&2
if [ "$(id -u)" = 0 ]; then sh -c '{POWER_OFF}'; else sudo -n sh -c '{POWER_OFF}'; fi
"#,
        base = crate::ssh::quote(&format!("{api}/projects/{project}"))
    )
}

/// How a host is powered off (as the agent does by default).
const POWER_OFF: &str = "shutdown -h now || systemctl poweroff";

impl Provider for Gcp {
    const NAME: &'static str = "gcp";

    fn shutdown_command(&self) -> Option<String> {
        let base = self
            .config
            .endpoint_url
            .as_deref()
            .unwrap_or("https://compute.googleapis.com")
            .trim_end_matches('/');
        Some(self_delete_script(
            &format!("{base}/compute/v1"),
            &self.config.project_id,
        ))
    }

    async fn create(
        &self,
        offer: &Offer,
        config: &InstanceConfig,
        host_key: &HostKey,
    ) -> Result<CreatedInstance, ComputeError> {
        let mut zones = offer.availability_zones.clone().unwrap_or_default();
        zones.sort();
        if zones.is_empty() {
            return Err(ComputeError::NoCapacity(format!(
                "{} in {} has no zones",
                offer.instance_type, offer.region
            )));
        }
        // One creation at a time: the firewall rule is made once and each instance takes its
        // own `instance_addresses` entry.
        let _creating = self.creating.lock().await;
        self.ensure_firewall().await?;
        let image = self.config.os_images.pick(
            !offer.resources.gpus.is_empty(),
            default_cpu_image,
            default_nvidia_image,
        );
        let address = self.free_address().await?;
        let name = self.attempt_name(config);
        let mut failures = Vec::new();
        for zone in zones {
            let mut body = self.body(offer, config, &zone, &name, &image, address.as_deref());
            body.metadata = Some(self.metadata(&image, host_key));
            let inserted = self
                .instances
                .insert()
                .set_project(&self.config.project_id)
                .set_zone(&zone)
                .set_body(body)
                .send()
                .await;
            let result = match inserted {
                Ok(op) => self.finish(&zone, op).await,
                Err(e) if matches!(e.http_status_code(), Some(429 | 503)) => {
                    Err(ComputeError::NoCapacity(format!("instances.insert: {e}")))
                }
                Err(e) => Err(uncertain("instances.insert", e)),
            };
            match result {
                Ok(()) => return Ok(created(offer, name, zone, image.user.clone(), address)),
                Err(ComputeError::NoCapacity(why)) => failures.push(format!("{zone}: {why}")),
                Err(e) => return Err(e),
            }
        }
        Err(ComputeError::NoCapacity(failures.join("; ")))
    }

    async fn find_attempt(
        &self,
        offer: &Offer,
        config: &InstanceConfig,
    ) -> Result<Option<CreatedInstance>, ComputeError> {
        let name = self.attempt_name(config);
        let image = self.config.os_images.pick(
            !offer.resources.gpus.is_empty(),
            default_cpu_image,
            default_nvidia_image,
        );
        let mut zones = offer.availability_zones.clone().unwrap_or_default();
        zones.sort();
        for zone in zones {
            let got = self
                .instances
                .get()
                .set_project(&self.config.project_id)
                .set_zone(&zone)
                .set_instance(&name)
                .send()
                .await;
            let found = match got {
                Ok(found) => found,
                Err(e) if not_found(&e) => continue,
                Err(e) => return Err(other("instances.get", e)),
            };
            if found.labels.get("dstack_attempt") != Some(&label_value(&config.attempt_id)) {
                continue;
            }
            let address = found.labels.get("dstack_address").and_then(|a| {
                self.config
                    .instance_addresses
                    .iter()
                    .find(|x| label_value(x) == *a)
                    .cloned()
            });
            return Ok(Some(created(offer, name, zone, image.user, address)));
        }
        Ok(None)
    }

    async fn check(&self, instance: &Instance) -> Result<Option<serde_json::Value>, ComputeError> {
        let data = Self::data(instance)?;
        let got = self
            .instances
            .get()
            .set_project(&self.config.project_id)
            .set_zone(&data.zone)
            .set_instance(&data.name)
            .send()
            .await
            .map_err(|e| other("instances.get", e))?;
        use model::instance::Status;
        match got.status {
            Some(Status::Provisioning | Status::Staging | Status::Pending) | None => Ok(None),
            Some(Status::Running) => {
                let nic = got.network_interfaces.first();
                let address = data
                    .address
                    .clone()
                    .or_else(|| {
                        nic.and_then(|n| n.access_configs.first())
                            .and_then(|a| a.nat_ip.clone())
                    })
                    .or_else(|| nic.and_then(|n| n.network_ip.clone()))
                    .ok_or_else(|| ComputeError::Other(format!("{} has no address", data.name)))?;
                Ok(Some(serde_json::json!({
                    "gcp": data,
                    "hostname": address,
                    "port": 22,
                    "user": data.user,
                    "identity_file": self.project.ssh_key,
                })))
            }
            Some(other) => Err(ComputeError::Other(format!(
                "instance {} is {other:?}",
                data.name
            ))),
        }
    }

    async fn terminate(&self, instance: &Instance) -> Result<(), ComputeError> {
        let data = Self::data(instance)?;
        self.delete_instance(&data.zone, &data.name).await
    }

    async fn owned(&self) -> Result<Vec<OwnedInstance>, ComputeError> {
        Ok(self
            .owned_list()
            .await?
            .into_iter()
            .map(|i| OwnedInstance {
                cloud_id: i.name.clone().unwrap_or_default(),
                instance_id: i.labels.get("dstack_instance_id").cloned(),
                attempt_id: i.labels.get("dstack_attempt").cloned(),
                state_id: i.labels.get("dstack_state").cloned(),
                region: i
                    .zone
                    .as_deref()
                    .and_then(|z| z.rsplit('/').next())
                    .unwrap_or_default()
                    .to_string(),
            })
            .collect())
    }

    async fn terminate_owned(&self, owned: &OwnedInstance) -> Result<(), ComputeError> {
        self.delete_instance(&owned.region, &owned.cloud_id).await
    }

    async fn create_volume(
        &self,
        name: &str,
        config: &VolumeConfiguration,
    ) -> Result<VolumeProvisioning, ComputeError> {
        let zone = self.volume_zone(config)?;
        let size = config.size.map_or(100, |s| s.0.ceil().max(1.0) as i64);
        let disk_name = format!("dstack-{}-{name}", self.project_name);
        let mut disk = model::Disk::default();
        disk.name = Some(disk_name.clone());
        disk.size_gb = Some(size);
        disk.r#type = Some(format!("zones/{zone}/diskTypes/pd-balanced"));
        let mut labels = HashMap::new();
        labels.insert("owner".to_string(), "dstack".to_string());
        labels.insert("dstack_name".to_string(), label_value(name));
        labels.insert(
            "dstack_owner".to_string(),
            label_value(&self.project.owner_id),
        );
        disk.labels = labels;
        let op = self
            .disks
            .insert()
            .set_project(&self.config.project_id)
            .set_zone(&zone)
            .set_body(disk)
            .send()
            .await
            .map_err(|e| other("disks.insert", e))?;
        self.finish(&zone, op).await?;
        Ok(VolumeProvisioning {
            volume_id: disk_name,
            size_gb: size as u64,
            availability_zone: Some(zone),
        })
    }

    async fn register_volume(
        &self,
        config: &VolumeConfiguration,
    ) -> Result<VolumeProvisioning, ComputeError> {
        let id = config.volume_id.clone().unwrap_or_default();
        let region = config.region.clone().unwrap_or_default();
        for zone in self.all_zones.iter().filter(|z| zone_region(z) == region) {
            match self
                .disks
                .get()
                .set_project(&self.config.project_id)
                .set_zone(zone)
                .set_disk(&id)
                .send()
                .await
            {
                Ok(disk) => {
                    return Ok(VolumeProvisioning {
                        volume_id: id,
                        size_gb: disk.size_gb.unwrap_or_default() as u64,
                        availability_zone: Some(zone.clone()),
                    })
                }
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(other("disks.get", e)),
            }
        }
        Err(ComputeError::NotFound(format!("disk {id} in {region}")))
    }

    async fn delete_volume(&self, volume: &Volume) -> Result<(), ComputeError> {
        let zone = volume.availability_zone.clone().unwrap_or_default();
        match self
            .disks
            .delete()
            .set_project(&self.config.project_id)
            .set_zone(&zone)
            .set_disk(volume.volume_id.clone().unwrap_or_default())
            .send()
            .await
        {
            Ok(op) => self.finish(&zone, op).await,
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(other("disks.delete", e)),
        }
    }

    async fn attach_volume(
        &self,
        volume: &Volume,
        instance: &Instance,
    ) -> Result<String, ComputeError> {
        let data = Self::data(instance)?;
        let id = volume.volume_id.clone().unwrap_or_default();
        let zone = volume.availability_zone.clone().unwrap_or_default();
        let device = format!("pd-{id}");
        let mut disk = model::AttachedDisk::default();
        disk.source = Some(format!(
            "projects/{}/zones/{zone}/disks/{id}",
            self.config.project_id
        ));
        disk.device_name = Some(device.clone());
        disk.auto_delete = Some(false);
        let op = self
            .instances
            .attach_disk()
            .set_project(&self.config.project_id)
            .set_zone(&data.zone)
            .set_instance(&data.name)
            .set_body(disk)
            .send()
            .await
            .map_err(|e| other("instances.attachDisk", e))?;
        self.finish(&data.zone, op).await?;
        Ok(device)
    }

    async fn detach_volume(
        &self,
        volume: &Volume,
        instance: &Instance,
        _force: bool,
    ) -> Result<(), ComputeError> {
        self.detach(volume, instance).await
    }

    async fn is_volume_detached(
        &self,
        volume: &Volume,
        instance: &Instance,
    ) -> Result<bool, ComputeError> {
        let data = Self::data(instance)?;
        let zone = volume.availability_zone.clone().unwrap_or_default();
        match self
            .disks
            .get()
            .set_project(&self.config.project_id)
            .set_zone(&zone)
            .set_disk(volume.volume_id.clone().unwrap_or_default())
            .send()
            .await
        {
            Ok(disk) => Ok(!disk
                .users
                .iter()
                .any(|u| u.ends_with(&format!("/instances/{}", data.name)))),
            Err(e) if not_found(&e) => Ok(true),
            Err(e) => Err(other("disks.get", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels_follow_gcp_rules() {
        let long = "a".repeat(80);
        let name = instance_name("Main", &long, "1234abcd");
        assert_eq!(name.len(), 63);
        assert!(name.starts_with("dstack-main-aaa") && name.ends_with("-1234abcd"));
        assert_eq!(label_value("10.231.0.2"), "10-231-0-2");
        assert_eq!(label_value("Fleet_A"), "fleet_a");
    }
}
