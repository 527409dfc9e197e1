//! The AWS backend through the real SDK against a moto server (`common/moto.rs`). moto's
//! instances never boot, so each is mapped (`instance_addresses`) to a namespace host running
//! sshd (`common/netns.rs`): provisioning, reaching the instance, installing the agent,
//! running a job and reaping all happen for real, and nothing but loopback and the test's own
//! namespace hosts is ever contacted.

#![cfg(feature = "aws")]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_ec2::types::InstanceStateName;
use common::moto::{Fault, FaultProxy, Moto};
use common::netns::TestHosts;
use common::{eventually, harness};
use dstack_backends::aws::AwsCompute;
use dstack_backends::config::{AwsConfig, AwsCreds, OsImage, OsImages};
use dstack_backends::local::find_agent_binary;
use dstack_backends::project::Project;
use dstack_core::config::parse;
use dstack_core::engine::EngineOptions;
use dstack_core::model::{InstanceStatus, RunStatus};
use dstack_core::Client;

/// The proxy matcher of `RunInstances` calls for t3.medium.
const RUN_T3_MEDIUM: [&str; 2] = ["Action=RunInstances", "InstanceType=t3.medium"];

/// A moto image the fake instances "boot", logged into as root (the namespace hosts' user).
fn image() -> OsImages {
    OsImages {
        cpu: Some(OsImage {
            name: "ubuntu/images/hvm-ssd/ubuntu-xenial-16.04-amd64-server-*".into(),
            owner: "099720109477".into(),
            user: "root".into(),
        }),
        nvidia: None,
    }
}

fn aws_config(endpoint: &str, regions: &[&str], hosts: &TestHosts) -> AwsConfig {
    AwsConfig {
        creds: Some(AwsCreds::AccessKey {
            access_key: "testing".into(),
            secret_key: "testing".into(),
        }),
        regions: Some(regions.iter().map(|r| r.to_string()).collect()),
        os_images: image(),
        endpoint_url: Some(endpoint.to_string()),
        instance_addresses: hosts.hosts.iter().map(|h| h.addr.clone()).collect(),
        ..AwsConfig::default()
    }
}

/// A client with the AWS backend only, whose project key the namespace hosts accept.
async fn client(
    home: &Path,
    config: AwsConfig,
    hosts: &TestHosts,
    engine: EngineOptions,
) -> Client {
    harness::authorize_project(home, hosts);
    let agent = find_agent_binary().expect("dstack-agent is built");
    let aws = AwsCompute::new(config, home, "main", agent).await.unwrap();
    harness::client(home, Arc::new(aws), engine).await
}

/// The SDK pointed at moto directly, to look at what the backend did.
async fn ec2(moto: &Moto, region: &str) -> aws_sdk_ec2::Client {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(region.to_string()))
        .endpoint_url(&moto.url)
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .load()
        .await;
    aws_sdk_ec2::Client::new(&config)
}

/// Every instance moto holds in `region`.
async fn cloud_instances(moto: &Moto, region: &str) -> Vec<aws_sdk_ec2::types::Instance> {
    ec2(moto, region)
        .await
        .describe_instances()
        .send()
        .await
        .unwrap()
        .reservations()
        .iter()
        .flat_map(|r| r.instances().iter().cloned())
        .collect()
}

fn state(i: &aws_sdk_ec2::types::Instance) -> InstanceStateName {
    i.state().and_then(|s| s.name()).cloned().unwrap()
}

/// Whether every instance in us-east-1 and every record of `fleet` is terminated.
async fn all_terminated(moto: &Moto, client: &Client, fleet: &str) -> bool {
    let cloud = cloud_instances(moto, "us-east-1").await;
    let (_, instances) = client.fleets().get(fleet).unwrap().unwrap();
    cloud
        .iter()
        .all(|i| state(i) == InstanceStateName::Terminated)
        && instances
            .iter()
            .all(|i| i.status == InstanceStatus::Terminated)
}

fn tag<'a>(i: &'a aws_sdk_ec2::types::Instance, key: &str) -> Option<&'a str> {
    i.tags()
        .iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_provisions_tagged_instances_in_the_cheapest_region_and_runs_tasks() {
    let moto = Moto::start();
    let hosts = TestHosts::start(2);
    let home = tempfile::tempdir().unwrap();
    let config = aws_config(&moto.url, &["eu-west-1", "us-east-1"], &hosts);
    let client = client(home.path(), config, &hosts, EngineOptions::default()).await;
    hosts.track("cloud");
    let yaml = "type: fleet\nname: cloud\nnodes: 2\nresources: {cpu: 2.., memory: 4GB..}\n";
    let instances = harness::apply_fleet(&client, yaml).await.unwrap();
    assert_eq!(instances.len(), 2, "{instances:?}");
    for instance in &instances {
        assert_eq!(instance.status, InstanceStatus::Idle, "{instance:?}");
        assert_eq!(instance.backend, "aws");
        let offer = instance.offer.as_ref().unwrap();
        // t3.medium in us-east-1 is the cheapest on-demand offer with 2 CPUs and 4 GB.
        assert_eq!(
            (offer.instance_type.as_str(), offer.region.as_str()),
            ("t3.medium", "us-east-1")
        );
        assert!(!offer.spot);
    }
    let cloud = cloud_instances(&moto, "us-east-1").await;
    assert_eq!(cloud.len(), 2);
    let owner = Project::load_or_create(home.path()).unwrap().owner_id;
    for i in &cloud {
        assert_eq!(tag(i, "owner"), Some("dstack"));
        assert_eq!(tag(i, "dstack_owner"), Some(owner.as_str()));
        assert_eq!(tag(i, "dstack_fleet"), Some("cloud"));
        let id = tag(i, "dstack_instance_id").unwrap();
        assert!(
            instances.iter().any(|r| r.id == id),
            "tagged with its record"
        );
        assert_eq!(i.instance_type().map(|t| t.as_str()), Some("t3.medium"));
    }
    assert!(cloud_instances(&moto, "eu-west-1").await.is_empty());

    // A task runs on one of them, on the namespace host the instance is mapped to.
    let task = "type: task\nfleets: [cloud]\nresources: {cpu: 1.., memory: 0.1GB..}\n\
                commands: [cat /proc/sys/kernel/hostname, echo on-aws]\n";
    let (run, done, out) = harness::run_task(&client, task, 60).await;
    assert_eq!(done.status, RunStatus::Done, "{:?}", run.jobs());
    assert!(out.ends_with("on-aws\n"));
    let job = run.jobs().unwrap().pop().unwrap();
    assert!(instances
        .iter()
        .any(|i| Some(&i.id) == job.instance_id.as_ref()));

    // Deleting the fleet terminates its instances.
    client.engine().delete_fleet("cloud", false).await.unwrap();
    let cloud = cloud_instances(&moto, "us-east-1").await;
    assert!(
        cloud
            .iter()
            .all(|i| state(i) == InstanceStateName::Terminated),
        "{cloud:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spot_fleets_get_spot_instances_and_capacity_errors_fall_through() {
    let moto = Moto::start();
    let proxy =
        FaultProxy::start(&moto.url, vec![(RUN_T3_MEDIUM.to_vec(), Fault::NoCapacity)]).await;
    let hosts = TestHosts::start(1);
    let home = tempfile::tempdir().unwrap();
    let config = aws_config(&proxy.url, &["us-east-1"], &hosts);
    let client = client(home.path(), config, &hosts, EngineOptions::default()).await;
    hosts.track("spotty");
    let yaml = "type: fleet\nname: spotty\nnodes: 1\nspot_policy: spot\nresources: {cpu: 2.., memory: 4GB..}\n";
    let instances = harness::apply_fleet(&client, yaml).await.unwrap();
    assert_eq!(instances.len(), 1);
    let offer = instances[0].offer.clone().unwrap();
    // t3.medium had no capacity: the next cheapest spot offer was taken.
    assert_eq!(proxy.asked.lock().unwrap()[0], "t3.medium");
    assert_ne!(offer.instance_type, "t3.medium");
    assert!(offer.spot);
    let cloud = cloud_instances(&moto, "us-east-1").await;
    assert_eq!(cloud.len(), 1, "nothing was created for the refused offer");
    assert_eq!(
        cloud[0].instance_lifecycle().map(|l| l.as_str()),
        Some("spot"),
        "a spot offer runs a spot instance"
    );
    assert_eq!(
        cloud[0].instance_type().map(|t| t.as_str()),
        Some(offer.instance_type.as_str())
    );
    client.engine().delete_fleet("spotty", false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_provision_in_elastic_fleets_and_idle_instances_are_reaped() {
    let moto = Moto::start();
    let hosts = TestHosts::start(1);
    let home = tempfile::tempdir().unwrap();
    let config = aws_config(&moto.url, &["us-east-1"], &hosts);
    let client = client(home.path(), config, &hosts, EngineOptions::default()).await;
    hosts.track("elastic");
    let yaml = "type: fleet\nname: elastic\nnodes: 0..1\nidle_duration: 2s\n";
    let instances = harness::apply_fleet(&client, yaml).await.unwrap();
    assert!(
        instances.is_empty(),
        "nodes.min 0: nothing provisioned up front"
    );
    let task =
        "type: task\nresources: {cpu: 1.., memory: 0.1GB..}\ncommands: [echo provisioned-for-me]\n";
    let (run, done, out) = harness::run_task(&client, task, 90).await;
    assert_eq!(done.status, RunStatus::Done, "{:?}", run.jobs());
    assert_eq!(out, "provisioned-for-me\n");
    assert_eq!(cloud_instances(&moto, "us-east-1").await.len(), 1);
    // Idle for longer than idle_duration: terminated, in the store and in the cloud.
    // (The record is marked terminated once the cloud call returns.)
    eventually(
        30,
        "the idle instance and its record are terminated",
        async || all_terminated(&moto, &client, "elastic").await,
    )
    .await;
    let (_, instances) = client.fleets().get("elastic").unwrap().unwrap();
    assert!(instances[0]
        .status_message
        .as_deref()
        .unwrap_or_default()
        .starts_with("idle_timeout"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stopped_mid_provisioning_leaks_no_instance() {
    let moto = Moto::start();
    // RunInstances creates the instance, but its answer never reaches the client.
    let proxy = FaultProxy::start(&moto.url, vec![(RUN_T3_MEDIUM.to_vec(), Fault::Hang)]).await;
    let hosts = TestHosts::start(1);
    let home = tempfile::tempdir().unwrap();
    let options = EngineOptions {
        orphan_grace: Duration::from_millis(500),
        ..EngineOptions::default()
    };
    {
        let config = aws_config(&proxy.url, &["us-east-1"], &hosts);
        let client = client(home.path(), config, &hosts, options.clone()).await;
        let yaml = "type: fleet\nname: lost\nnodes: 1\nresources: {cpu: 2.., memory: 4GB..}\n";
        let applied =
            tokio::time::timeout(Duration::from_secs(5), harness::apply_fleet(&client, yaml)).await;
        assert!(
            applied.is_err(),
            "the apply is cut off while RunInstances hangs"
        );
        let cloud = cloud_instances(&moto, "us-east-1").await;
        assert_eq!(cloud.len(), 1, "the instance was created");
        assert_eq!(state(&cloud[0]), InstanceStateName::Running);
    }
    // A new client on the same state finds the instance by its owner tag and terminates it.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let config = aws_config(&moto.url, &["us-east-1"], &hosts);
    let client = client(home.path(), config, &hosts, options).await;
    eventually(
        20,
        "the stray instance and its record are terminated",
        async || all_terminated(&moto, &client, "lost").await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_of_other_owners_are_left_alone() {
    let moto = Moto::start();
    let hosts = TestHosts::start(1);
    let home = tempfile::tempdir().unwrap();
    // Someone else's instance in the same account and region.
    let ec2 = ec2(&moto, "us-east-1").await;
    let image = ec2
        .describe_images()
        .owners("099720109477")
        .send()
        .await
        .unwrap()
        .images()[0]
        .image_id()
        .unwrap()
        .to_string();
    ec2.run_instances()
        .image_id(image)
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .unwrap();
    let options = EngineOptions {
        orphan_grace: Duration::ZERO,
        ..EngineOptions::default()
    };
    let config = aws_config(&moto.url, &["us-east-1"], &hosts);
    let client = client(home.path(), config, &hosts, options).await;
    // The client looks for strays as it starts; give it time to (wrongly) act.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cloud = cloud_instances(&moto, "us-east-1").await;
    assert_eq!(cloud.len(), 1);
    assert_eq!(
        state(&cloud[0]),
        InstanceStateName::Running,
        "not ours: untouched"
    );
    drop(client);
}

#[test]
fn without_credentials_the_backend_is_skipped_with_a_reason_at_once() {
    // A clean environment (no AWS variables, an empty home, the metadata service off) in a
    // child process: the SDK's default chain finds nothing and nothing is contacted.
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join("config.yml"),
        "projects:\n- name: main\n  backends:\n  - type: aws\n    creds: {type: default}\n    regions: [us-east-1]\n",
    )
    .unwrap();
    let exe = std::env::current_exe().unwrap();
    let examples = exe.parent().unwrap().parent().unwrap().join("examples");
    let example = examples.join("cloud_backends");
    assert!(
        example.exists(),
        "{} is missing: run `cargo test -p dstack-backends --features aws` without a --test \
         filter (it builds the examples)",
        example.display()
    );
    let out = std::process::Command::new(example)
        .arg(home.path())
        .env_clear()
        .env("HOME", home.path())
        .env("PATH", "/usr/bin:/bin")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("backend aws"), "{text}");
    assert!(
        text.contains("skipped the aws backend is skipped: unauthenticated: no AWS credentials"),
        "{text}"
    );
    let took: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("took ")?.strip_suffix(" ms")?.parse().ok())
        .unwrap();
    assert!(took < 10_000, "nothing hangs: {took} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_go_through_their_life_cycle() {
    use dstack_core::model::VolumeStatus;
    let moto = Moto::start();
    let hosts = TestHosts::start(1);
    let home = tempfile::tempdir().unwrap();
    let config = aws_config(&moto.url, &["us-east-1"], &hosts);
    let client = client(home.path(), config, &hosts, EngineOptions::default()).await;
    let ec2 = ec2(&moto, "us-east-1").await;

    // Created: an EBS volume of the size asked, tagged with its owner.
    let created = parse(
        "type: volume\nname: data\nbackend: aws\nregion: us-east-1\nsize: 10GB\n",
        "volume.dstack.yml",
    )
    .unwrap();
    let data = client.volumes().apply(&created).await.unwrap();
    assert_eq!(data.status, VolumeStatus::Active, "{data:?}");
    assert!(!data.external);
    let id = data.volume_id.clone().unwrap();
    let described = ec2.describe_volumes().volume_ids(&id).send().await.unwrap();
    let ebs = &described.volumes()[0];
    assert_eq!(ebs.size(), Some(10));
    assert_eq!(ebs.volume_type().map(|t| t.as_str()), Some("gp3"));
    assert_eq!(data.availability_zone.as_deref(), ebs.availability_zone());
    assert!(ebs
        .tags()
        .iter()
        .any(|t| t.key() == Some("dstack_name") && t.value() == Some("data")));

    // Registered: an existing volume by id, only forgotten when deleted.
    let existing = ec2
        .create_volume()
        .availability_zone("us-east-1a")
        .size(7)
        .send()
        .await
        .unwrap();
    let existing_id = existing.volume_id().unwrap().to_string();
    let registered = parse(
        &format!(
            "type: volume\nname: old\nbackend: aws\nregion: us-east-1\nvolume_id: {existing_id}\n"
        ),
        "volume.dstack.yml",
    )
    .unwrap();
    let old = client.volumes().apply(&registered).await.unwrap();
    assert_eq!(
        (old.status, old.external, old.size_gb),
        (VolumeStatus::Active, true, Some(7))
    );
    let missing = parse(
        "type: volume\nname: ghost\nbackend: aws\nregion: us-east-1\nvolume_id: vol-00000000000000000\n",
        "volume.dstack.yml",
    )
    .unwrap();
    let ghost = client.volumes().apply(&missing).await.unwrap();
    assert_eq!(ghost.status, VolumeStatus::Failed);
    assert!(ghost
        .status_message
        .unwrap()
        .contains("vol-00000000000000000"));

    // Attached to an instance of the same region; deleting is refused meanwhile.
    hosts.track("disks");
    let instances = harness::apply_fleet(&client, "type: fleet\nname: disks\nnodes: 1\n")
        .await
        .unwrap();
    let instance = &instances[0];
    let attached = client
        .engine()
        .attach_volume("data", &instance.id)
        .await
        .unwrap();
    assert_eq!(attached.attachments[0].device_name, "/dev/sdf");
    let cloud_id = instance.backend_data["aws"]["instance_id"]
        .as_str()
        .unwrap();
    let described = ec2.describe_volumes().volume_ids(&id).send().await.unwrap();
    let attachment = &described.volumes()[0].attachments()[0];
    assert_eq!(attachment.instance_id(), Some(cloud_id));
    assert_eq!(attachment.device(), Some("/dev/sdf"));
    let refused = client
        .volumes()
        .delete("data")
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("is attached to disks-0"), "{refused}");

    // Detached, then deleted from the cloud; the registered one is only forgotten.
    let detached = client
        .engine()
        .detach_volume("data", &instance.id, false)
        .await
        .unwrap();
    assert!(detached.attachments.is_empty());
    let described = ec2.describe_volumes().volume_ids(&id).send().await.unwrap();
    assert!(described.volumes()[0].attachments().is_empty());
    let deleted = client.volumes().delete("data").await.unwrap();
    assert_eq!(deleted.status, VolumeStatus::Deleted);
    assert!(
        ec2.describe_volumes().volume_ids(&id).send().await.is_err(),
        "deleted in EC2"
    );
    client.volumes().delete("old").await.unwrap();
    let still = ec2
        .describe_volumes()
        .volume_ids(&existing_id)
        .send()
        .await
        .unwrap();
    assert_eq!(
        still.volumes().len(),
        1,
        "a registered volume is not deleted"
    );
    assert!(client.volumes().get("data").unwrap().is_none());
    client.engine().delete_fleet("disks", false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleets_keep_their_minimum_when_idle() {
    let moto = Moto::start();
    let hosts = TestHosts::start(1);
    let home = tempfile::tempdir().unwrap();
    let config = aws_config(&moto.url, &["us-east-1"], &hosts);
    let client = client(home.path(), config, &hosts, EngineOptions::default()).await;
    hosts.track("steady");
    let yaml = "type: fleet\nname: steady\nnodes: 1..2\nidle_duration: 1s\n";
    let instances = harness::apply_fleet(&client, yaml).await.unwrap();
    assert_eq!(instances.len(), 1, "nodes.min = target = 1");
    // Several reaping sweeps (every 3 s) pass with the instance idle past its idle_duration.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (_, instances) = client.fleets().get("steady").unwrap().unwrap();
    assert_eq!(instances.len(), 1);
    assert_eq!(
        instances[0].status,
        InstanceStatus::Idle,
        "{:?}",
        instances[0]
    );
    let cloud = cloud_instances(&moto, "us-east-1").await;
    assert_eq!(state(&cloud[0]), InstanceStateName::Running);
    client.engine().delete_fleet("steady", false).await.unwrap();
}

#[tokio::test]
async fn plans_list_cloud_offers_cheapest_first() {
    let home = tempfile::tempdir().unwrap();
    let config = AwsConfig {
        creds: Some(AwsCreds::AccessKey {
            access_key: "testing".into(),
            secret_key: "testing".into(),
        }),
        regions: Some(vec!["us-east-1".into(), "eu-west-1".into()]),
        ..AwsConfig::default()
    };
    let agent = find_agent_binary().expect("dstack-agent is built");
    let aws = AwsCompute::new(config, home.path(), "main", agent)
        .await
        .unwrap();
    let client = harness::client(home.path(), Arc::new(aws), EngineOptions::default()).await;
    let task = dstack_core::config::parse(
        "type: task\ncommands: [nvidia-smi]\nresources: {gpu: 24GB..}\nspot_policy: auto\n",
        "task.dstack.yml",
    )
    .unwrap();
    let plan = client.runs().plan(&task).await.unwrap();
    assert!(!plan.offers.is_empty());
    assert!(plan.offers.iter().all(|o| o.backend == "aws"));
    assert!(plan.offers.windows(2).all(|w| w[0].price <= w[1].price));
    assert!(plan.offers.iter().all(|o| {
        !o.resources.gpus.is_empty()
            && o.resources.gpus.iter().all(|g| g.memory_mib >= 24 * 1024)
            && ["us-east-1", "eu-west-1"].contains(&o.region.as_str())
    }));
    assert!(plan.offers.iter().any(|o| o.spot) && plan.offers.iter().any(|o| !o.spot));
    assert_eq!(plan.total_offers, plan.offers.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_created_by_a_stopped_client_is_brought_up_by_the_next() {
    let moto = Moto::start();
    // The instance is created and recorded, but checking on it never returns.
    let describe_by_id = vec!["Action=DescribeInstances", "InstanceId.1"];
    let proxy = FaultProxy::start(&moto.url, vec![(describe_by_id, Fault::Hang)]).await;
    let hosts = TestHosts::start(1);
    let home = tempfile::tempdir().unwrap();
    let options = EngineOptions {
        orphan_grace: Duration::from_millis(500),
        ..EngineOptions::default()
    };
    hosts.track("resumed");
    {
        let config = aws_config(&proxy.url, &["us-east-1"], &hosts);
        let client = client(home.path(), config, &hosts, options.clone()).await;
        let yaml = "type: fleet\nname: resumed\nnodes: 1\n";
        let cut = tokio::time::timeout(Duration::from_secs(5), harness::apply_fleet(&client, yaml));
        assert!(
            cut.await.is_err(),
            "the apply is cut off while the instance starts"
        );
        let (_, instances) = client.fleets().get("resumed").unwrap().unwrap();
        assert_eq!(instances[0].status, InstanceStatus::Provisioning);
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let config = aws_config(&moto.url, &["us-east-1"], &hosts);
    let client = client(home.path(), config, &hosts, options).await;
    eventually(60, "the instance joins its fleet", async || {
        let (_, instances) = client.fleets().get("resumed").unwrap().unwrap();
        assert_ne!(
            instances[0].status,
            InstanceStatus::Terminated,
            "{:?}",
            instances[0]
        );
        instances[0].status == InstanceStatus::Idle
    })
    .await;
    let cloud = cloud_instances(&moto, "us-east-1").await;
    assert_eq!(cloud.len(), 1, "the same instance, not a second one");
    client
        .engine()
        .delete_fleet("resumed", false)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_volumes_are_deleted_after_their_auto_cleanup_duration() {
    use dstack_core::model::VolumeStatus;
    let moto = Moto::start();
    let hosts = TestHosts::start(1);
    let home = tempfile::tempdir().unwrap();
    let config = aws_config(&moto.url, &["us-east-1"], &hosts);
    let client = client(home.path(), config, &hosts, EngineOptions::default()).await;
    let apply = |yaml: &str| dstack_core::config::parse(yaml, "volume.dstack.yml").unwrap();
    let temporary = apply(
        "type: volume\nname: scratch\nbackend: aws\nregion: us-east-1\nsize: 5GB\nauto_cleanup_duration: 1s\n",
    );
    let kept = apply("type: volume\nname: keep\nbackend: aws\nregion: us-east-1\nsize: 5GB\n");
    let scratch = client.volumes().apply(&temporary).await.unwrap();
    client.volumes().apply(&kept).await.unwrap();
    let id = scratch.volume_id.clone().unwrap();
    let ec2 = ec2(&moto, "us-east-1").await;
    // The sweep (every 3 s) deletes it once unused for longer than 1 s.
    eventually(15, "the unused volume is deleted", async || {
        ec2.describe_volumes().volume_ids(&id).send().await.is_err()
    })
    .await;
    assert!(client.volumes().get("scratch").unwrap().is_none());
    let keep = client.volumes().get("keep").unwrap().unwrap();
    assert_eq!(
        keep.status,
        VolumeStatus::Active,
        "no auto_cleanup_duration: kept"
    );
}
