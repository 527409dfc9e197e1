//! AWS EC2 (`type: aws`), through aws-sdk-ec2.
//!
//! Offers come from the catalog's `aws` items in the configured regions (with `vpc_ids` and
//! `default_vpcs: false`, only the regions `vpc_ids` lists), limited to the instance families
//! dstack supports. `create_instance` finds the image (`os_images`, else Canonical's Ubuntu
//! 22.04 for CPU and AWS's NVIDIA Deep Learning Base AMI for GPU instances), the VPC and
//! subnets (see `network`), makes sure the project's security group exists there (SSH in from
//! `ssh_ingress_cidrs`, and everything between its members), and runs the instance in the
//! first subnet (one per availability zone) with capacity: a network interface with a public
//! IP only if `public_ips`, instance metadata through IMDSv2 only (session tokens required,
//! hop limit 1, so containers behind a bridge cannot reach it), cloud-init user data that
//! authorizes the project's SSH key and gives the instance its host key (see `provider`), tags (`owner=dstack`, `dstack_owner=<this home>`,
//! `dstack_state=<this state>`, `dstack_instance_id=<the engine's id>`,
//! `dstack_attempt=<this attempt>`, …), the attempt as its idempotency token, spot market
//! options for spot offers, a root disk of the offer's size deleted with the instance, and
//! `InstanceInitiatedShutdownBehavior=terminate`: an instance powered off from inside (by its
//! agent, once its owner lease lapsed: see `provider`) is terminated, not stopped. Capacity,
//! quota and other per-offer errors are [`ComputeError::NoCapacity`] (the engine moves on to
//! the next offer);
//! `InvalidParameterValue` and credential errors stop it; a `RunInstances` whose answer was
//! lost (transport errors, timeouts, internal errors) is [`ComputeError::Unknown`], and the
//! engine asks [`Provider::find_attempt`] what it made. Once the instance runs, the engine
//! reaches it over SSH (at its public address, or its private one without `public_ips`) as
//! the image's user with the project key, installs the agent and talks to it through SSH
//! channels, exactly as on an SSH fleet host.
//!
//! Network volumes are EBS volumes (gp3, in the configured or first zone of the region, tagged
//! like instances): created or registered by id, attached at the first free device name of
//! `/dev/sdf` … `/dev/sdn`, detached, deleted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, HttpTokensState, InstanceAttributeName,
    InstanceInterruptionBehavior, InstanceMarketOptionsRequest, InstanceMetadataEndpointState,
    InstanceMetadataOptionsRequest, InstanceNetworkInterfaceSpecification, InstanceStateName,
    InstanceType, MarketType, ResourceType, ShutdownBehavior, SpotInstanceType, SpotMarketOptions,
    Tag, TagSpecification, VolumeAttachmentState, VolumeType,
};
use dstack_core::backend::{
    ComputeError, CreatedInstance, InstanceConfig, OwnedInstance, VolumeProvisioning,
};
use dstack_core::config::volume::VolumeConfiguration;
use dstack_core::model::{Instance, Volume};
use dstack_core::offers::Offer;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::cloud::{same_region, shared_catalog, CatalogOffers};
use crate::config::{AwsConfig, AwsCreds, OsImage};
use crate::project::{HostKey, Project};
use crate::provider::{CloudCompute, Provider};

mod network;

/// The SDK crates this backend is built on, for tools and tests that look at what it made (an
/// EC2 client of their own, e.g. pointed at moto) without depending on them separately.
pub use {aws_config, aws_sdk_ec2};

/// Instance-type prefixes dstack provisions on AWS.
const FAMILIES: &[&str] = &[
    "m7i.", "c7i.", "r7i.", "t3.", "t2.small", "c5.", "m5.", "p6-b300.", "p6-b200.", "p5.", "p5e.",
    "p5en.", "p4d.", "p4de.", "g7.", "g7e.", "g6.", "g6e.", "gr6.", "g5.", "g4dn.",
];

/// Root disk sizes AWS can configure, in GB.
const DISK_RANGE: (f64, f64) = (100.0, 16384.0);

/// How long a credentials check may take before the backend is skipped.
const CREDENTIALS_TIMEOUT: Duration = Duration::from_secs(5);

/// The image CPU instances boot by default: Canonical's Ubuntu 22.04.
fn default_cpu_image() -> OsImage {
    OsImage {
        name: "ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-amd64-server-*".to_string(),
        owner: "099720109477".to_string(),
        user: "ubuntu".to_string(),
    }
}

/// The image GPU instances boot by default: AWS's NVIDIA Deep Learning Base AMI (as dstack's).
fn default_nvidia_image() -> OsImage {
    OsImage {
        name: "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) *".to_string(),
        owner: "898082745236".to_string(),
        user: "ubuntu".to_string(),
    }
}

/// What an AWS instance records under `backend_data.aws` (the rest of its backend data, once
/// it runs, is how to reach it over SSH).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct AwsInstanceData {
    instance_id: String,
    region: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    availability_zone: Option<String>,
    spot: bool,
    user: String,
    /// The address mapped from `instance_addresses`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    address: Option<String>,
}

/// The AWS EC2 API calls of the `aws` backend.
pub struct Aws {
    config: AwsConfig,
    project: Project,
    project_name: String,
    sdk: aws_config::SdkConfig,
    /// Where this state's instances may be.
    regions: Vec<String>,
    clients: Mutex<HashMap<String, aws_sdk_ec2::Client>>,
    creating: Mutex<()>,
}

/// AWS EC2 as a backend.
pub type AwsCompute = CloudCompute<Aws>;

impl AwsCompute {
    /// The backend of `config` for the state in `home` (its owner id and project key),
    /// installing `agent_bin` on instances. Fails, saying why, without usable credentials.
    pub async fn new(
        config: AwsConfig,
        home: &Path,
        project_name: &str,
        agent_bin: PathBuf,
    ) -> Result<AwsCompute, ComputeError> {
        let project = Project::load_or_create(home)
            .map_err(|e| ComputeError::Other(format!("project identity: {e}")))?;
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"));
        if let Some(AwsCreds::AccessKey {
            access_key,
            secret_key,
        }) = &config.creds
        {
            loader = loader.credentials_provider(aws_sdk_ec2::config::Credentials::new(
                access_key,
                secret_key,
                None,
                None,
                "config.yml",
            ));
        }
        if let Some(url) = &config.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let sdk = loader.load().await;
        check_credentials(&sdk).await?;
        let mut families: Vec<String> = FAMILIES.iter().map(|f| f.to_string()).collect();
        families.extend(config.experimental_instance_types.iter().flatten().cloned());
        // Without default VPCs, only the regions with a configured VPC can be used.
        let regions = match (&config.vpc_ids, config.default_vpcs) {
            (Some(ids), Some(false)) => Some(
                config
                    .regions
                    .clone()
                    .unwrap_or_else(|| ids.keys().cloned().collect())
                    .into_iter()
                    .filter(|r| ids.contains_key(r))
                    .collect(),
            ),
            _ => config.regions.clone(),
        };
        let offers = CatalogOffers {
            backend: "aws",
            provider: "aws",
            regions,
            families: Some(families),
            disk_range: DISK_RANGE,
            region_of: same_region,
        };
        let catalog = shared_catalog()?;
        let regions = offers.locations(&catalog);
        let aws = Aws {
            config,
            project,
            project_name: project_name.to_string(),
            sdk,
            regions,
            clients: Mutex::new(HashMap::new()),
            creating: Mutex::new(()),
        };
        CloudCompute::from_provider(aws, offers, home, agent_bin)
    }
}

impl Aws {
    /// The EC2 client of a region.
    async fn client(&self, region: &str) -> aws_sdk_ec2::Client {
        let mut clients = self.clients.lock().await;
        clients
            .entry(region.to_string())
            .or_insert_with(|| {
                let config = aws_sdk_ec2::config::Builder::from(&self.sdk)
                    .region(aws_config::Region::new(region.to_string()))
                    .build();
                aws_sdk_ec2::Client::from_conf(config)
            })
            .clone()
    }

    /// The newest image matching the configured (or default) image for the offer.
    async fn image(
        &self,
        client: &aws_sdk_ec2::Client,
        offer: &Offer,
    ) -> Result<(String, String), ComputeError> {
        let wanted = self.wanted_image(offer);
        let found = client
            .describe_images()
            .owners(&wanted.owner)
            .filters(Filter::builder().name("name").values(&wanted.name).build())
            .filters(Filter::builder().name("state").values("available").build())
            .send()
            .await
            .map_err(|e| classify(e, "DescribeImages"))?;
        let newest = found
            .images()
            .iter()
            .filter(|i| i.image_id().is_some())
            .max_by(|a, b| a.creation_date().cmp(&b.creation_date()))
            .and_then(|i| i.image_id())
            .ok_or_else(|| {
                ComputeError::NoCapacity(format!(
                    "no image named {} owned by {} in {}",
                    wanted.name, wanted.owner, offer.region
                ))
            })?;
        Ok((newest.to_string(), wanted.user))
    }

    /// This state's instances in a region that are not terminated.
    async fn owned_in(
        &self,
        region: &str,
    ) -> Result<Vec<aws_sdk_ec2::types::Instance>, ComputeError> {
        let client = self.client(region).await;
        let found = client
            .describe_instances()
            .filters(
                Filter::builder()
                    .name("tag:dstack_owner")
                    .values(&self.project.owner_id)
                    .build(),
            )
            .filters(
                Filter::builder()
                    .name("instance-state-name")
                    .values("pending")
                    .values("running")
                    .values("stopping")
                    .values("stopped")
                    .build(),
            )
            .send()
            .await
            .map_err(|e| classify(e, "DescribeInstances"))?;
        Ok(found
            .reservations()
            .iter()
            .flat_map(|r| r.instances().iter().cloned())
            .collect())
    }

    /// The first `instance_addresses` entry no live instance of this state uses (`None` when
    /// the option is not set).
    async fn free_address(&self) -> Result<Option<String>, ComputeError> {
        if self.config.instance_addresses.is_empty() {
            return Ok(None);
        }
        let mut used = Vec::new();
        for region in &self.regions {
            for instance in self.owned_in(region).await? {
                used.extend(tag_value(instance.tags(), "dstack_address"));
            }
        }
        self.config
            .instance_addresses
            .iter()
            .find(|a| !used.contains(a))
            .cloned()
            .map(Some)
            .ok_or_else(|| {
                ComputeError::NoCapacity("every address in instance_addresses is in use".into())
            })
    }

    /// The configured (or default) image for the offer.
    fn wanted_image(&self, offer: &Offer) -> OsImage {
        self.config.os_images.pick(
            !offer.resources.gpus.is_empty(),
            default_cpu_image,
            default_nvidia_image,
        )
    }

    /// What the engine records about an instance made for `offer`.
    fn created(
        &self,
        offer: &Offer,
        instance: &aws_sdk_ec2::types::Instance,
        user: String,
        address: Option<String>,
    ) -> CreatedInstance {
        let instance_id = instance.instance_id().unwrap_or_default().to_string();
        let data = AwsInstanceData {
            instance_id: instance_id.clone(),
            region: offer.region.clone(),
            availability_zone: instance
                .placement()
                .and_then(|p| p.availability_zone())
                .map(str::to_string),
            spot: offer.spot,
            user,
            address,
        };
        CreatedInstance {
            offer: offer.clone(),
            cloud_id: Some(instance_id),
            backend_data: serde_json::json!({ "aws": data }),
        }
    }

    /// The tags of a new instance: the project's (see [`Project::instance_tags`]) and `Name`.
    fn tags(&self, config: &InstanceConfig, address: Option<&str>) -> Vec<Tag> {
        let mut tags =
            self.project
                .instance_tags(&self.project_name, config, address, &self.config.tags);
        tags.insert("Name".to_string(), config.name.clone());
        tags.iter().map(|(k, v)| tag(k, v)).collect()
    }

    fn data(instance: &Instance) -> Result<AwsInstanceData, ComputeError> {
        serde_json::from_value(
            instance
                .backend_data
                .get("aws")
                .cloned()
                .unwrap_or_default(),
        )
        .map_err(|e| {
            ComputeError::Other(format!(
                "instance {}: bad AWS instance data: {e}",
                instance.name
            ))
        })
    }

    /// The volume as EC2 describes it (`None`: it does not exist).
    async fn describe_volume(
        &self,
        region: &str,
        volume_id: &str,
    ) -> Result<Option<aws_sdk_ec2::types::Volume>, ComputeError> {
        let client = self.client(region).await;
        match client.describe_volumes().volume_ids(volume_id).send().await {
            Ok(found) => Ok(found.volumes().first().cloned()),
            Err(e) if e.code() == Some("InvalidVolume.NotFound") => Ok(None),
            Err(e) => Err(classify(e, "DescribeVolumes")),
        }
    }

    /// Terminates an instance unless it is gone or going already (idempotent: some EC2
    /// implementations refuse to terminate a terminated instance again).
    async fn terminate_by_id(&self, region: &str, instance_id: &str) -> Result<(), ComputeError> {
        let client = self.client(region).await;
        let described = client
            .describe_instances()
            .instance_ids(instance_id)
            .send()
            .await;
        let state = match described {
            Ok(found) => found
                .reservations()
                .iter()
                .flat_map(|r| r.instances())
                .find_map(|i| i.state().and_then(|s| s.name()).cloned()),
            Err(e) if e.code() == Some("InvalidInstanceID.NotFound") => return Ok(()),
            Err(e) => return Err(classify_call(e, "DescribeInstances")),
        };
        match state {
            None | Some(InstanceStateName::Terminated | InstanceStateName::ShuttingDown) => {
                return Ok(())
            }
            Some(_) => {}
        }
        match client
            .terminate_instances()
            .instance_ids(instance_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("InvalidInstanceID.NotFound") => Ok(()),
            Err(e) => Err(classify_call(e, "TerminateInstances")),
        }
    }
}

impl Provider for Aws {
    const NAME: &'static str = "aws";

    async fn create(
        &self,
        offer: &Offer,
        config: &InstanceConfig,
        host_key: &HostKey,
    ) -> Result<CreatedInstance, ComputeError> {
        // One creation at a time: the security group is made once and each instance takes
        // its own `instance_addresses` entry.
        let _creating = self.creating.lock().await;
        let client = self.client(&offer.region).await;
        let (image, user) = self.image(&client, offer).await?;
        let network = self
            .network(&client, &offer.region, offer.availability_zones.as_deref())
            .await?;
        let group = self.security_group(&client, &network.vpc_id).await?;
        let address = self.free_address().await?;
        let user_data = self.project.user_data(host_key);
        let disk_gb = (offer.resources.disk_bytes >> 30).max(1) as i32;
        let mut failures = Vec::new();
        for (n, subnet) in network.subnets.iter().enumerate() {
            let mut request = client
                .run_instances()
                .image_id(&image)
                .instance_type(InstanceType::from(offer.instance_type.as_str()))
                .min_count(1)
                .max_count(1)
                // The same request sent again (the SDK retries lost answers) makes no second
                // instance; each subnet's request is another.
                .client_token(format!("{}-{n}", config.attempt_id))
                // Powered off from inside (the agent's owner lease lapsed), it is terminated,
                // not stopped: nothing of it is billed any more.
                .instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate)
                .user_data(aws_smithy_types::base64::encode(user_data.as_bytes()))
                .network_interfaces(
                    InstanceNetworkInterfaceSpecification::builder()
                        .device_index(0)
                        .subnet_id(subnet)
                        .groups(&group)
                        .associate_public_ip_address(self.public_ips())
                        .delete_on_termination(true)
                        .build(),
                )
                .metadata_options(
                    InstanceMetadataOptionsRequest::builder()
                        .http_endpoint(InstanceMetadataEndpointState::Enabled)
                        .http_tokens(HttpTokensState::Required)
                        .http_put_response_hop_limit(1)
                        .build(),
                )
                .block_device_mappings(
                    BlockDeviceMapping::builder()
                        .device_name("/dev/sda1")
                        .ebs(
                            EbsBlockDevice::builder()
                                .volume_size(disk_gb)
                                .volume_type(VolumeType::Gp2)
                                .delete_on_termination(true)
                                .build(),
                        )
                        .build(),
                )
                .tag_specifications(
                    TagSpecification::builder()
                        .resource_type(ResourceType::Instance)
                        .set_tags(Some(self.tags(config, address.as_deref())))
                        .build(),
                );
            if let Some(profile) = &self.config.iam_instance_profile {
                request = request.iam_instance_profile(
                    aws_sdk_ec2::types::IamInstanceProfileSpecification::builder()
                        .name(profile)
                        .build(),
                );
            }
            if offer.spot {
                request = request.instance_market_options(
                    InstanceMarketOptionsRequest::builder()
                        .market_type(MarketType::Spot)
                        .spot_options(
                            SpotMarketOptions::builder()
                                .spot_instance_type(SpotInstanceType::OneTime)
                                .instance_interruption_behavior(
                                    InstanceInterruptionBehavior::Terminate,
                                )
                                .build(),
                        )
                        .build(),
                );
            }
            match request.send().await {
                Ok(response) => {
                    let instance = response.instances().first().ok_or_else(|| {
                        ComputeError::Unknown("RunInstances returned no instance".into())
                    })?;
                    return Ok(self.created(offer, instance, user, address));
                }
                Err(e) => match classify_run(e) {
                    ComputeError::NoCapacity(why) => failures.push(format!("{subnet}: {why}")),
                    other => return Err(other),
                },
            }
        }
        Err(ComputeError::NoCapacity(failures.join("; ")))
    }

    async fn find_attempt(
        &self,
        offer: &Offer,
        config: &InstanceConfig,
    ) -> Result<Option<CreatedInstance>, ComputeError> {
        let client = self.client(&offer.region).await;
        let found = client
            .describe_instances()
            .filters(
                Filter::builder()
                    .name("tag:dstack_attempt")
                    .values(&config.attempt_id)
                    .build(),
            )
            .filters(
                Filter::builder()
                    .name("tag:dstack_owner")
                    .values(&self.project.owner_id)
                    .build(),
            )
            .filters(
                Filter::builder()
                    .name("instance-state-name")
                    .values("pending")
                    .values("running")
                    .build(),
            )
            .send()
            .await
            .map_err(|e| classify(e, "DescribeInstances"))?;
        let mut made: Vec<&aws_sdk_ec2::types::Instance> = found
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter(|i| i.instance_id().is_some())
            .collect();
        made.sort_by_key(|i| (i.launch_time().map(|t| t.as_nanos()), i.instance_id()));
        let Some((first, duplicates)) = made.split_first() else {
            return Ok(None);
        };
        for duplicate in duplicates {
            let id = duplicate.instance_id().unwrap_or_default();
            self.terminate_by_id(&offer.region, id).await?;
        }
        let user = self.wanted_image(offer).user;
        let address = tag_value(first.tags(), "dstack_address");
        Ok(Some(self.created(offer, first, user, address)))
    }

    async fn check(&self, instance: &Instance) -> Result<Option<serde_json::Value>, ComputeError> {
        let data = Self::data(instance)?;
        let client = self.client(&data.region).await;
        let found = client
            .describe_instances()
            .instance_ids(&data.instance_id)
            .send()
            .await
            .map_err(|e| classify(e, "DescribeInstances"))?;
        let described = found
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .next()
            .ok_or_else(|| ComputeError::NotFound(format!("instance {}", data.instance_id)))?;
        let state = described
            .state()
            .and_then(|s| s.name())
            .cloned()
            .unwrap_or(InstanceStateName::Pending);
        match state {
            InstanceStateName::Pending => Ok(None),
            InstanceStateName::Running => {
                let public = described
                    .public_ip_address()
                    .filter(|_| self.public_ips())
                    .map(str::to_string);
                let address = data
                    .address
                    .clone()
                    .or(public)
                    .or_else(|| described.private_ip_address().map(str::to_string))
                    .ok_or_else(|| {
                        ComputeError::Other(format!("{} has no address", data.instance_id))
                    })?;
                Ok(Some(serde_json::json!({
                    "aws": data,
                    "hostname": address,
                    "port": 22,
                    "user": data.user,
                    "identity_file": self.project.ssh_key,
                })))
            }
            other => Err(ComputeError::Other(format!(
                "instance {} is {}",
                data.instance_id,
                other.as_str()
            ))),
        }
    }

    async fn terminate(&self, instance: &Instance) -> Result<(), ComputeError> {
        let data = Self::data(instance)?;
        self.terminate_by_id(&data.region, &data.instance_id).await
    }

    async fn owned(&self) -> Result<Vec<OwnedInstance>, ComputeError> {
        let mut owned = Vec::new();
        for region in &self.regions {
            for instance in self.owned_in(region).await? {
                owned.push(OwnedInstance {
                    cloud_id: instance.instance_id().unwrap_or_default().to_string(),
                    instance_id: tag_value(instance.tags(), "dstack_instance_id"),
                    attempt_id: tag_value(instance.tags(), "dstack_attempt"),
                    state_id: tag_value(instance.tags(), "dstack_state"),
                    region: region.clone(),
                });
            }
        }
        Ok(owned)
    }

    async fn terminate_owned(&self, owned: &OwnedInstance) -> Result<(), ComputeError> {
        self.terminate_by_id(&owned.region, &owned.cloud_id).await
    }

    async fn create_volume(
        &self,
        name: &str,
        config: &VolumeConfiguration,
    ) -> Result<VolumeProvisioning, ComputeError> {
        let region = config.region.clone().unwrap_or_default();
        let client = self.client(&region).await;
        let zone = match &config.availability_zone {
            Some(zone) => zone.clone(),
            None => client
                .describe_availability_zones()
                .send()
                .await
                .map_err(|e| classify(e, "DescribeAvailabilityZones"))?
                .availability_zones()
                .iter()
                .filter_map(|z| z.zone_name())
                .min()
                .map(str::to_string)
                .ok_or_else(|| ComputeError::Other(format!("{region} has no zones")))?,
        };
        let size = config.size.map_or(100, |s| s.0.ceil().max(1.0) as i32);
        let mut tags = vec![
            tag("Name", name),
            tag("owner", "dstack"),
            tag("dstack_project", &self.project_name),
            tag("dstack_name", name),
            tag("dstack_owner", &self.project.owner_id),
        ];
        for (k, v) in self.config.tags.iter().chain(config.tags.iter().flatten()) {
            if !tags.iter().any(|t| t.key() == Some(k.as_str())) {
                tags.push(tag(k, v));
            }
        }
        let created = client
            .create_volume()
            .availability_zone(&zone)
            .size(size)
            .volume_type(VolumeType::Gp3)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Volume)
                    .set_tags(Some(tags))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| classify(e, "CreateVolume"))?;
        Ok(VolumeProvisioning {
            volume_id: created.volume_id().unwrap_or_default().to_string(),
            size_gb: created.size().map_or(size as u64, |s| s as u64),
            availability_zone: created
                .availability_zone()
                .map(str::to_string)
                .or(Some(zone)),
        })
    }

    async fn register_volume(
        &self,
        config: &VolumeConfiguration,
    ) -> Result<VolumeProvisioning, ComputeError> {
        let region = config.region.clone().unwrap_or_default();
        let id = config.volume_id.clone().unwrap_or_default();
        let volume = self
            .describe_volume(&region, &id)
            .await?
            .ok_or_else(|| ComputeError::NotFound(format!("volume {id} in {region}")))?;
        Ok(VolumeProvisioning {
            volume_id: id,
            size_gb: volume.size().unwrap_or_default() as u64,
            availability_zone: volume.availability_zone().map(str::to_string),
        })
    }

    async fn delete_volume(&self, volume: &Volume) -> Result<(), ComputeError> {
        let client = self.client(&volume.region).await;
        let id = volume.volume_id.clone().unwrap_or_default();
        match client.delete_volume().volume_id(&id).send().await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("InvalidVolume.NotFound") => Ok(()),
            Err(e) => Err(classify(e, "DeleteVolume")),
        }
    }

    async fn attach_volume(
        &self,
        volume: &Volume,
        instance: &Instance,
    ) -> Result<String, ComputeError> {
        let data = Self::data(instance)?;
        let client = self.client(&data.region).await;
        let volume_id = volume.volume_id.clone().unwrap_or_default();
        let used = client
            .describe_instance_attribute()
            .instance_id(&data.instance_id)
            .attribute(InstanceAttributeName::BlockDeviceMapping)
            .send()
            .await
            .map_err(|e| classify(e, "DescribeInstanceAttribute"))?;
        let used: Vec<&str> = used
            .block_device_mappings()
            .iter()
            .filter_map(|m| m.device_name())
            .collect();
        for letter in 'f'..='n' {
            let device = format!("/dev/sd{letter}");
            if used.contains(&device.as_str()) {
                continue;
            }
            let attached = client
                .attach_volume()
                .volume_id(&volume_id)
                .instance_id(&data.instance_id)
                .device(&device)
                .send()
                .await;
            match attached {
                Ok(_) => return Ok(device),
                Err(e) if e.message().is_some_and(|m| m.contains("unixDevice")) => continue,
                Err(e) => return Err(ComputeError::Other(classify(e, "AttachVolume").to_string())),
            }
        }
        Err(ComputeError::Other(format!(
            "no free device name on {} for {volume_id}",
            data.instance_id
        )))
    }

    async fn detach_volume(
        &self,
        volume: &Volume,
        instance: &Instance,
        force: bool,
    ) -> Result<(), ComputeError> {
        let data = Self::data(instance)?;
        let client = self.client(&data.region).await;
        let device = volume
            .attachments
            .iter()
            .find(|a| a.instance_id == instance.id)
            .map(|a| a.device_name.clone());
        let detached = client
            .detach_volume()
            .volume_id(volume.volume_id.clone().unwrap_or_default())
            .instance_id(&data.instance_id)
            .set_device(device)
            .force(force)
            .send()
            .await;
        match detached {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("IncorrectState") => Ok(()),
            Err(e) => Err(classify(e, "DetachVolume")),
        }
    }

    async fn is_volume_detached(
        &self,
        volume: &Volume,
        instance: &Instance,
    ) -> Result<bool, ComputeError> {
        let data = Self::data(instance)?;
        let id = volume.volume_id.clone().unwrap_or_default();
        let Some(described) = self.describe_volume(&volume.region, &id).await? else {
            return Ok(true);
        };
        Ok(!described.attachments().iter().any(|a| {
            a.instance_id() == Some(data.instance_id.as_str())
                && a.state() != Some(&VolumeAttachmentState::Detached)
        }))
    }
}

/// Fails unless the SDK finds credentials in time (never hangs on a missing metadata service).
async fn check_credentials(sdk: &aws_config::SdkConfig) -> Result<(), ComputeError> {
    use aws_credential_types::provider::ProvideCredentials;
    let missing = |why: String| {
        ComputeError::Unauthenticated(format!(
            "no AWS credentials ({why}): set `creds` in config.yml, AWS_ACCESS_KEY_ID and \
             AWS_SECRET_ACCESS_KEY, or a profile in ~/.aws/credentials"
        ))
    };
    let provider = sdk
        .credentials_provider()
        .ok_or_else(|| missing("no provider".to_string()))?;
    match tokio::time::timeout(CREDENTIALS_TIMEOUT, provider.provide_credentials()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(missing(e.to_string())),
        Err(_) => Err(missing(format!(
            "none found within {CREDENTIALS_TIMEOUT:?}"
        ))),
    }
}

/// An SDK error as the engine needs it: credentials, a hard parameter error, or (anything
/// else about this offer) no capacity, so the next offer is tried.
fn classify<E, R>(e: aws_sdk_ec2::error::SdkError<E, R>, call: &str) -> ComputeError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let (code, text) = described(&e, call);
    match code.as_str() {
        "AuthFailure"
        | "UnauthorizedOperation"
        | "InvalidClientTokenId"
        | "SignatureDoesNotMatch" => ComputeError::Unauthenticated(text),
        "InvalidParameterValue" => ComputeError::Other(text),
        _ => ComputeError::NoCapacity(text),
    }
}

/// The error of a call that creates nothing: credentials, a missing resource, or anything
/// else ([`classify`] is for creation calls, whose other errors move on to the next offer).
fn classify_call<E, R>(e: aws_sdk_ec2::error::SdkError<E, R>, call: &str) -> ComputeError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match classify(e, call) {
        ComputeError::NoCapacity(text) if text.contains(".NotFound") => {
            ComputeError::NotFound(text)
        }
        ComputeError::NoCapacity(text) => ComputeError::Other(text),
        other => other,
    }
}

/// An SDK error's code (empty when it has none) and `call: code: message`.
fn described<E, R>(e: &aws_sdk_ec2::error::SdkError<E, R>, call: &str) -> (String, String)
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let code = e.code().unwrap_or_default().to_string();
    let message = e.message().map_or_else(
        || aws_sdk_ec2::error::DisplayErrorContext(e).to_string(),
        str::to_string,
    );
    let text = if code.is_empty() {
        format!("{call}: {message}")
    } else {
        format!("{call}: {code}: {message}")
    };
    (code, text)
}

/// A `RunInstances` error: as [`classify`], except that a call whose answer never came or
/// could not be read, or that failed inside AWS, is [`ComputeError::Unknown`] (it may have
/// started an instance).
fn classify_run<R>(
    e: aws_sdk_ec2::error::SdkError<aws_sdk_ec2::operation::run_instances::RunInstancesError, R>,
) -> ComputeError
where
    R: std::fmt::Debug,
{
    use aws_sdk_ec2::error::SdkError;
    let uncertain = match &e {
        SdkError::ConstructionFailure(_) => false,
        SdkError::ServiceError(_) => matches!(
            e.code(),
            None | Some("InternalError" | "InternalFailure" | "ServiceUnavailable" | "Unavailable")
        ),
        _ => true,
    };
    if uncertain {
        ComputeError::Unknown(described(&e, "RunInstances").1)
    } else {
        classify(e, "RunInstances")
    }
}

fn tag(key: &str, value: &str) -> Tag {
    Tag::builder().key(key).value(value).build()
}

fn tag_value(tags: &[Tag], key: &str) -> Option<String> {
    tags.iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
        .map(str::to_string)
}
