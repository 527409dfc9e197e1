//! What cloud-init does on the namespace hosts that stand in for cloud instances: once the
//! cloud holds a new instance mapped to a host (`instance_addresses`), the host "boots": its
//! sshd starts again with the host key the instance's user data gives it, and with that key
//! only. Hosts of cloud tests start without sshd (`TestHosts::start_booting`), so the engine
//! meets them as a real instance: refusing connections until booted, then presenting the key
//! it was given.

use std::collections::HashSet;
use std::future::Future;

use super::netns::{TestHost, TestHosts};

/// A new instance as the cloud holds it.
pub struct Booting {
    /// The cloud's id of the instance (each boots once).
    pub id: String,
    /// The address of the host it is mapped to (as the cloud's tag or label spells it).
    pub address: String,
    /// Its user data.
    pub user_data: String,
}

/// Boots the hosts of new instances until dropped.
pub struct CloudInit(tokio::task::JoinHandle<()>);

impl CloudInit {
    /// Every 20 ms, boots the hosts of the instances `list` returns that have not booted yet.
    pub fn start<F, Fut>(hosts: &TestHosts, list: F) -> CloudInit
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = Vec<Booting>> + Send,
    {
        let hosts: Vec<TestHost> = hosts.hosts.clone();
        CloudInit(tokio::spawn(async move {
            let mut booted = HashSet::new();
            loop {
                for instance in list().await {
                    let host = hosts
                        .iter()
                        .find(|h| spelled(&h.addr) == spelled(&instance.address));
                    let Some(host) = host.filter(|_| !booted.contains(&instance.id)) else {
                        continue;
                    };
                    let (host, user_data) = (host.clone(), instance.user_data);
                    tokio::task::spawn_blocking(move || boot(&host, &user_data))
                        .await
                        .unwrap();
                    booted.insert(instance.id);
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }))
    }
}

impl TestHosts {
    /// From now on (until dropped), boots the host of every instance `list` returns (the
    /// cloud's instances mapped to these hosts) with its user data; a second call keeps the
    /// first's watcher.
    pub fn boot_instances<F, Fut>(&self, list: F)
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = Vec<Booting>> + Send,
    {
        if !self.holds::<CloudInit>() {
            self.hold(CloudInit::start(self, list));
        }
    }
}

impl Drop for CloudInit {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An address as a GCP label spells it (`10-231-0-2`); tags keep it as it is.
fn spelled(address: &str) -> String {
    address.replace('.', "-")
}

/// Applies `user_data` (a `#cloud-config` document) to `host`: its `ssh_keys` host key.
pub fn boot(host: &TestHost, user_data: &str) {
    host.install_host_key(&given_host_key(user_data, "ed25519_private"));
}

/// The `ssh_keys` entry `field` (`ed25519_private`, `ed25519_public`) of `user_data`.
pub fn given_host_key(user_data: &str, field: &str) -> String {
    let docs = yaml_rust2::YamlLoader::load_from_str(user_data).expect("user data is YAML");
    docs[0]["ssh_keys"][field]
        .as_str()
        .expect("the user data gives the instance a host key")
        .to_string()
}

/// Boots `hosts` as the instances of `regions` at `endpoint` (moto, or a proxy in front of
/// it) mapped to them come.
#[cfg(feature = "aws")]
pub fn boot_aws(hosts: &TestHosts, endpoint: &str, regions: &[String]) {
    let (endpoint, regions) = (endpoint.to_string(), regions.to_vec());
    hosts.boot_instances(move || {
        let (endpoint, regions) = (endpoint.clone(), regions.clone());
        async move { aws_instances(&endpoint, &regions).await }
    });
}

/// The instances of `regions` at `endpoint` that are mapped to a host, with their user data.
#[cfg(feature = "aws")]
pub async fn aws_instances(endpoint: &str, regions: &[String]) -> Vec<Booting> {
    use dstack_backends::aws::aws_sdk_ec2::types::{Filter, InstanceAttributeName};
    let mut found = Vec::new();
    for region in regions {
        let ec2 = super::ec2::ec2_at(endpoint, region).await;
        let mapped = Filter::builder().name("tag-key").values("dstack_address");
        let live = ["pending", "running"]
            .iter()
            .fold(Filter::builder().name("instance-state-name"), |f, s| {
                f.values(*s)
            });
        let Ok(described) = ec2
            .describe_instances()
            .set_filters(Some(vec![mapped.build(), live.build()]))
            .send()
            .await
        else {
            continue;
        };
        for instance in described.reservations().iter().flat_map(|r| r.instances()) {
            let id = instance.instance_id().unwrap_or_default().to_string();
            let address = instance
                .tags()
                .iter()
                .find(|t| t.key() == Some("dstack_address"))
                .and_then(|t| t.value())
                .unwrap_or_default()
                .to_string();
            let Ok(attribute) = ec2
                .describe_instance_attribute()
                .instance_id(&id)
                .attribute(InstanceAttributeName::UserData)
                .send()
                .await
            else {
                continue;
            };
            let Some(encoded) = attribute.user_data().and_then(|u| u.value()) else {
                continue;
            };
            let user_data = data_encoding::BASE64.decode(encoded.as_bytes()).unwrap();
            found.push(Booting {
                id,
                address,
                user_data: String::from_utf8(user_data).unwrap(),
            });
        }
    }
    found
}
