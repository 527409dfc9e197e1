//! The AWS backend through the real SDK against a moto server (`common/moto.rs`, looked at
//! through `common/ec2.rs`). moto's
//! instances never boot, so each is mapped (`instance_addresses`) to a namespace host running
//! sshd (`common/netns.rs`): provisioning, reaching the instance, installing the agent,
//! running a job and reaping all happen for real, and nothing but loopback and the test's own
//! namespace hosts is ever contacted.

#![cfg(feature = "aws")]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_ec2::types::{Filter, InstanceStateName};
use common::ec2::{cloud_instances, ec2, image, route_table, route_to_internet, start_moto, state};
use common::moto::{Fault, FaultProxy, Moto};
use common::netns::TestHosts;
use common::{cloud_init, eventually, harness};
use dstack_backends::aws::AwsCompute;
use dstack_backends::config::{AwsConfig, AwsCreds};
use dstack_backends::local::find_agent_binary;
use dstack_backends::project::Project;
use dstack_core::config::parse;
use dstack_core::engine::EngineOptions;
use dstack_core::model::{InstanceStatus, RunStatus};
use dstack_core::Client;

/// The proxy matcher of `RunInstances` calls for t3.medium.
const RUN_T3_MEDIUM: [&str; 2] = ["Action=RunInstances", "InstanceType=t3.medium"];

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
    let endpoint = config
        .endpoint_url
        .clone()
        .expect("tests name moto's endpoint");
    cloud_init::boot_aws(
        hosts,
        &endpoint,
        config.regions.as_deref().unwrap_or_default(),
    );
    let agent = find_agent_binary().expect("dstack-agent is built");
    let aws = AwsCompute::new(config, home, "main", agent).await.unwrap();
    harness::client(home, Arc::new(aws), engine).await
}

/// Whether every instance in us-east-1 and every record of `fleet` is terminated.
async fn all_terminated(moto: &Moto, client: &Client, fleet: &str) -> bool {
    let cloud = cloud_instances(moto, "us-east-1").await;
    let (_, instances) = client.fleets().get(fleet).await.unwrap().unwrap();
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
    let moto = start_moto().await;
    let hosts = TestHosts::start_booting(2);
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
    assert_eq!(done.status, RunStatus::Done, "{:?}", run.jobs().await);
    assert!(out.ends_with("on-aws\n"));
    let job = run.jobs().await.unwrap().pop().unwrap();
    assert!(instances
        .iter()
        .any(|i| Some(&i.id) == job.instance_id.as_ref()));

    // Deleting the fleet terminates its instances, and forgets the host keys learned there
    // (their addresses may go to other machines).
    let known_hosts = home.path().join("ssh/known_hosts");
    let recorded = |text: &str, addr: &str| text.lines().any(|l| l.split(' ').next() == Some(addr));
    let learned = std::fs::read_to_string(&known_hosts).unwrap();
    assert!(
        hosts.hosts.iter().all(|h| recorded(&learned, &h.addr)),
        "{learned}"
    );
    // What is on record for each instance is the host key it was given at creation, alone.
    let given = cloud_init::aws_instances(&moto.url, &["us-east-1".to_string()]).await;
    assert_eq!(given.len(), 2);
    for instance in &given {
        let key = cloud_init::given_host_key(&instance.user_data, "ed25519_public");
        let lines: Vec<&str> = learned
            .lines()
            .filter(|l| l.split(' ').next() == Some(instance.address.as_str()))
            .collect();
        assert_eq!(lines, [format!("{} {key}", instance.address)], "{learned}");
    }
    client.fleets().delete("cloud", false).await.unwrap();
    let left = std::fs::read_to_string(&known_hosts).unwrap();
    assert!(
        hosts.hosts.iter().all(|h| !recorded(&left, &h.addr)),
        "{left}"
    );
    let cloud = cloud_instances(&moto, "us-east-1").await;
    assert!(
        cloud
            .iter()
            .all(|i| state(i) == InstanceStateName::Terminated),
        "{cloud:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_answering_with_another_host_key_than_it_was_given_is_refused() {
    // An impostor at the new instance's address (its sshd up at once, with a key of its
    // own): trust on first use would take its key; the key given at creation refuses it.
    let moto = start_moto().await;
    let hosts = TestHosts::start(1);
    let home = tempfile::tempdir().unwrap();
    harness::authorize_project(home.path(), &hosts);
    let config = aws_config(&moto.url, &["us-east-1"], &hosts);
    let agent = find_agent_binary().expect("dstack-agent is built");
    let aws = AwsCompute::new(config, home.path(), "main", agent)
        .await
        .unwrap();
    let client = harness::client(home.path(), Arc::new(aws), EngineOptions::default()).await;
    hosts.track("pinned");
    let yaml = "type: fleet\nname: pinned\nnodes: 1\nresources: {cpu: 2.., memory: 4GB..}\n";
    let (live, lines) = harness::apply_fleet_with_progress(&client, yaml).await;
    assert!(live.unwrap().is_empty());
    let progress = lines.join("\n");
    assert!(
        progress.contains("not the one it was given at creation: refusing it"),
        "{progress}"
    );
    let impostor = hosts.hosts[0].host_public_key("ed25519");
    let impostor = impostor.split(' ').nth(1).unwrap();
    let known = std::fs::read_to_string(home.path().join("ssh/known_hosts")).unwrap_or_default();
    assert!(!known.contains(impostor), "{known}");
    // Nothing was installed there, and the instance is terminated.
    let installed = hosts.hosts[0].run_inside("ls -d $HOME/.dstack-rs/pinned-* 2>/dev/null; true");
    assert!(installed.trim().is_empty(), "{installed}");
    eventually(30, "the instance is terminated", async || {
        all_terminated(&moto, &client, "pinned").await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spot_fleets_get_spot_instances_and_capacity_errors_fall_through() {
    let moto = start_moto().await;
    let proxy =
        FaultProxy::start(&moto.url, vec![(RUN_T3_MEDIUM.to_vec(), Fault::NoCapacity)]).await;
    let hosts = TestHosts::start_booting(1);
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
    client.fleets().delete("spotty", false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_provision_in_elastic_fleets_and_idle_instances_are_reaped() {
    let moto = start_moto().await;
    let hosts = TestHosts::start_booting(1);
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
    assert_eq!(done.status, RunStatus::Done, "{:?}", run.jobs().await);
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
    let (_, instances) = client.fleets().get("elastic").await.unwrap().unwrap();
    assert!(instances[0]
        .status_message
        .as_deref()
        .unwrap_or_default()
        .starts_with("idle_timeout"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stopped_mid_provisioning_leaks_no_instance() {
    let moto = start_moto().await;
    // RunInstances creates the instance, but its answer never reaches the client.
    let proxy = FaultProxy::start(&moto.url, vec![(RUN_T3_MEDIUM.to_vec(), Fault::Hang)]).await;
    let hosts = TestHosts::start_booting(1);
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
    let moto = start_moto().await;
    let hosts = TestHosts::start_booting(1);
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
    let moto = start_moto().await;
    let hosts = TestHosts::start_booting(1);
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
        .unwrap()
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
        .unwrap()
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
    assert!(client.volumes().get("data").await.unwrap().is_none());
    client.fleets().delete("disks", false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleets_keep_their_minimum_when_idle() {
    let moto = start_moto().await;
    let hosts = TestHosts::start_booting(1);
    let home = tempfile::tempdir().unwrap();
    let config = aws_config(&moto.url, &["us-east-1"], &hosts);
    let client = client(home.path(), config, &hosts, EngineOptions::default()).await;
    hosts.track("steady");
    let yaml = "type: fleet\nname: steady\nnodes: 1..2\nidle_duration: 1s\n";
    let instances = harness::apply_fleet(&client, yaml).await.unwrap();
    assert_eq!(instances.len(), 1, "nodes.min = target = 1");
    // Several reaping sweeps (every 3 s) pass with the instance idle past its idle_duration.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (_, instances) = client.fleets().get("steady").await.unwrap().unwrap();
    assert_eq!(instances.len(), 1);
    assert_eq!(
        instances[0].status,
        InstanceStatus::Idle,
        "{:?}",
        instances[0]
    );
    let cloud = cloud_instances(&moto, "us-east-1").await;
    assert_eq!(state(&cloud[0]), InstanceStateName::Running);
    client.fleets().delete("steady", false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_terminate_when_shut_down_and_their_agents_hold_a_renewed_lease() {
    let moto = start_moto().await;
    let proxy = FaultProxy::start(&moto.url, vec![]).await;
    let hosts = TestHosts::start_booting(1);
    let home = tempfile::tempdir().unwrap();
    let config = aws_config(&proxy.url, &["us-east-1"], &hosts);
    let engine = EngineOptions {
        lease_renewal: Duration::from_millis(100),
        ..EngineOptions::default()
    };
    let client = client(home.path(), config, &hosts, engine).await;
    hosts.track("leased");
    let yaml = "type: fleet\nname: leased\nnodes: 1\nidle_duration: 1h\n";
    let instances = harness::apply_fleet(&client, yaml).await.unwrap();
    assert_eq!(instances[0].status, InstanceStatus::Idle, "{instances:?}");

    // Shut down from inside, the instance is terminated rather than stopped.
    assert!(asked_with(
        &proxy,
        0,
        "InstanceInitiatedShutdownBehavior=terminate"
    ));
    let id = instances[0].cloud_id.clone().unwrap();
    let attribute = ec2(&moto, "us-east-1")
        .await
        .describe_instance_attribute()
        .instance_id(&id)
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::InstanceInitiatedShutdownBehavior)
        .send()
        .await
        .unwrap();
    let behavior = attribute.instance_initiated_shutdown_behavior().unwrap();
    assert_eq!(behavior.value(), Some("terminate"));

    // Its agent holds an owner lease of the instance's idle time, which the engine renews.
    let agent = harness::leased_agent(&client, &instances[0], 3600).await;
    eventually(20, "the engine renews the lease", async || {
        agent.lease().await.unwrap().renewals >= 3
    })
    .await;
    assert!(!agent.lease().await.unwrap().shut_down);
    client.fleets().delete("leased", false).await.unwrap();
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
    let moto = start_moto().await;
    // The instance is created and recorded, but checking on it never returns.
    let describe_by_id = vec!["Action=DescribeInstances", "InstanceId.1"];
    let proxy = FaultProxy::start(&moto.url, vec![(describe_by_id, Fault::Hang)]).await;
    let hosts = TestHosts::start_booting(1);
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
        let (_, instances) = client.fleets().get("resumed").await.unwrap().unwrap();
        assert_eq!(instances[0].status, InstanceStatus::Provisioning);
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let config = aws_config(&moto.url, &["us-east-1"], &hosts);
    let client = client(home.path(), config, &hosts, options).await;
    eventually(60, "the instance joins its fleet", async || {
        let (_, instances) = client.fleets().get("resumed").await.unwrap().unwrap();
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
    client.fleets().delete("resumed", false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_volumes_are_deleted_after_their_auto_cleanup_duration() {
    use dstack_core::model::VolumeStatus;
    let moto = start_moto().await;
    let hosts = TestHosts::start_booting(1);
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
    assert!(client.volumes().get("scratch").await.unwrap().is_none());
    let keep = client.volumes().get("keep").await.unwrap().unwrap();
    assert_eq!(
        keep.status,
        VolumeStatus::Active,
        "no auto_cleanup_duration: kept"
    );
}

/// A VPC named `name` with one subnet in each of `zones` (`10.<net>.<i>.0/24`).
async fn vpc_with_subnets(
    ec2: &aws_sdk_ec2::Client,
    name: &str,
    net: u8,
    zones: &[&str],
) -> (String, Vec<String>) {
    let vpc = ec2
        .create_vpc()
        .cidr_block(format!("10.{net}.0.0/16"))
        .send()
        .await
        .unwrap();
    let vpc = vpc.vpc().unwrap().vpc_id().unwrap().to_string();
    ec2.create_tags()
        .resources(&vpc)
        .tags(
            aws_sdk_ec2::types::Tag::builder()
                .key("Name")
                .value(name)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let mut subnets = Vec::new();
    for (i, zone) in zones.iter().enumerate() {
        let subnet = ec2
            .create_subnet()
            .vpc_id(&vpc)
            .cidr_block(format!("10.{net}.{i}.0/24"))
            .availability_zone(*zone)
            .send()
            .await
            .unwrap();
        subnets.push(subnet.subnet().unwrap().subnet_id().unwrap().to_string());
    }
    (vpc, subnets)
}

/// Whether `RunInstances` call `n` the proxy saw had parameter `Name=value`.
fn asked_with(proxy: &FaultProxy, n: usize, param: &str) -> bool {
    proxy.run_requests.lock().unwrap()[n]
        .iter()
        .any(|p| p == param)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_get_imdsv2_a_public_subnet_of_the_named_vpc_and_their_own_ssh_sources() {
    let moto = start_moto().await;
    let proxy = FaultProxy::start(&moto.url, vec![]).await;
    let hosts = TestHosts::start_booting(1);
    let home = tempfile::tempdir().unwrap();
    let ec2 = ec2(&moto, "us-east-1").await;
    // us-east-1a's subnet has no way out; us-east-1b's is routed to an internet gateway.
    let (vpc, subnets) =
        vpc_with_subnets(&ec2, "dstack-net", 20, &["us-east-1a", "us-east-1b"]).await;
    route_to_internet(&ec2, &vpc, Some(&subnets[1])).await;
    let config = AwsConfig {
        vpc_name: Some("dstack-net".into()),
        ssh_ingress_cidrs: Some(vec!["192.168.0.0/16".into(), "10.0.0.0/8".into()]),
        ..aws_config(&proxy.url, &["us-east-1"], &hosts)
    };
    let client = client(home.path(), config, &hosts, EngineOptions::default()).await;
    hosts.track("netted");
    let yaml = "type: fleet\nname: netted\nnodes: 1\nresources: {cpu: 2.., memory: 4GB..}\n";
    let instances = harness::apply_fleet(&client, yaml).await.unwrap();
    assert_eq!(
        instances[0].status,
        InstanceStatus::Idle,
        "{:?}",
        instances[0]
    );

    let cloud = cloud_instances(&moto, "us-east-1").await;
    assert_eq!(cloud.len(), 1);
    assert_eq!(cloud[0].vpc_id(), Some(vpc.as_str()));
    assert_eq!(
        cloud[0].subnet_id(),
        Some(subnets[1].as_str()),
        "the public subnet"
    );
    assert_eq!(instances[0].cloud_id.as_deref(), cloud[0].instance_id());
    let metadata = cloud[0].metadata_options().unwrap();
    assert_eq!(metadata.http_tokens().map(|t| t.as_str()), Some("required"));
    assert_eq!(metadata.http_put_response_hop_limit(), Some(1));
    for param in [
        format!("NetworkInterface.1.SubnetId={}", subnets[1]),
        "NetworkInterface.1.AssociatePublicIpAddress=true".to_string(),
        "MetadataOptions.HttpTokens=required".to_string(),
        "MetadataOptions.HttpPutResponseHopLimit=1".to_string(),
    ] {
        assert!(asked_with(&proxy, 0, &param), "{param}");
    }

    // SSH comes in from the configured sources only, through a group of their own.
    let groups = ec2
        .describe_security_groups()
        .filters(Filter::builder().name("vpc-id").values(&vpc).build())
        .send()
        .await
        .unwrap();
    let ours: Vec<_> = groups
        .security_groups()
        .iter()
        .filter(|g| g.group_name().unwrap_or_default().starts_with("dstack_"))
        .collect();
    assert_eq!(ours.len(), 1);
    assert!(ours[0]
        .group_name()
        .unwrap()
        .starts_with("dstack_security_group_main_ssh_"));
    let ssh = ours[0]
        .ip_permissions()
        .iter()
        .find(|p| p.from_port() == Some(22))
        .unwrap();
    let mut sources: Vec<&str> = ssh.ip_ranges().iter().filter_map(|r| r.cidr_ip()).collect();
    sources.sort();
    assert_eq!(sources, ["10.0.0.0/8", "192.168.0.0/16"]);
    assert!(ours[0]
        .ip_permissions()
        .iter()
        .flat_map(|p| p.ip_ranges())
        .all(|r| r.cidr_ip() != Some("0.0.0.0/0")));
    client.fleets().delete("netted", false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_public_ips_instances_go_in_private_subnets_and_are_reached_privately() {
    use dstack_backends::provider::Provider;
    use dstack_core::backend::{Compute, InstanceConfig, OfferRequest};
    let moto = start_moto().await;
    let proxy = FaultProxy::start(&moto.url, vec![]).await;
    let home = tempfile::tempdir().unwrap();
    let ec2 = ec2(&moto, "us-east-1").await;
    // A public subnet with a NAT gateway, and a private one whose way out is that gateway.
    let (vpc, subnets) =
        vpc_with_subnets(&ec2, "private-net", 30, &["us-east-1a", "us-east-1b"]).await;
    route_to_internet(&ec2, &vpc, Some(&subnets[0])).await;
    let eip = ec2
        .allocate_address()
        .domain(aws_sdk_ec2::types::DomainType::Vpc)
        .send()
        .await
        .unwrap();
    let nat = ec2
        .create_nat_gateway()
        .subnet_id(&subnets[0])
        .allocation_id(eip.allocation_id().unwrap())
        .send()
        .await
        .unwrap();
    let nat = nat
        .nat_gateway()
        .unwrap()
        .nat_gateway_id()
        .unwrap()
        .to_string();
    let table = route_table(&ec2, &vpc, Some(&subnets[1])).await;
    ec2.create_route()
        .route_table_id(&table)
        .destination_cidr_block("0.0.0.0/0")
        .nat_gateway_id(&nat)
        .send()
        .await
        .unwrap();
    let config = AwsConfig {
        creds: Some(AwsCreds::AccessKey {
            access_key: "testing".into(),
            secret_key: "testing".into(),
        }),
        regions: Some(vec!["us-east-1".into(), "eu-west-1".into()]),
        os_images: image(),
        endpoint_url: Some(proxy.url.clone()),
        vpc_ids: Some([("us-east-1".to_string(), vpc.clone())].into()),
        default_vpcs: Some(false),
        public_ips: Some(false),
        ..AwsConfig::default()
    };
    let agent = find_agent_binary().expect("dstack-agent is built");
    let aws = AwsCompute::new(config, home.path(), "main", agent)
        .await
        .unwrap();
    let offers = aws.offers_for(&OfferRequest::default()).await.unwrap();
    assert!(!offers.is_empty());
    assert!(
        offers.iter().all(|o| o.region == "us-east-1"),
        "eu-west-1 has no VPC in vpc_ids and default VPCs are off"
    );
    let offer = offers
        .iter()
        .find(|o| o.instance_type == "t3.medium")
        .unwrap();
    let config = InstanceConfig {
        instance_id: "record".into(),
        attempt_id: "attempt".into(),
        state_id: "state".into(),
        name: "private-0".into(),
        fleet: "private".into(),
        tags: Default::default(),
    };
    let created = aws.create_instance(offer, &config).await.unwrap();
    assert!(asked_with(
        &proxy,
        0,
        "NetworkInterface.1.AssociatePublicIpAddress=false"
    ));
    assert!(asked_with(
        &proxy,
        0,
        &format!("NetworkInterface.1.SubnetId={}", subnets[1])
    ));
    let cloud = cloud_instances(&moto, "us-east-1").await;
    assert_eq!(
        cloud[0].subnet_id(),
        Some(subnets[1].as_str()),
        "the private subnet"
    );
    assert_eq!(created.cloud_id.as_deref(), cloud[0].instance_id());
    let instance: dstack_core::model::Instance = serde_json::from_value(serde_json::json!({
        "id": "record", "name": "private-0", "fleet_id": "f", "backend": "aws",
        "status": "provisioning", "host": dstack_core::agent::HostInfo::default(), "price": 0.0,
        "backend_data": created.backend_data, "created_at_ms": 0,
    }))
    .unwrap();
    // What the cloud says (the engine then waits for SSH to answer at that address).
    let ready = aws.provider().check(&instance).await.unwrap().unwrap();
    assert_eq!(
        ready["hostname"].as_str(),
        cloud[0].private_ip_address(),
        "reached at its private address"
    );
    aws.terminate_instance(&instance).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_run_instances_answer_is_looked_for_before_another_offer_and_nothing_leaks() {
    let moto = start_moto().await;
    // RunInstances for t3.medium starts an instance each time, but its answer is lost.
    let proxy =
        FaultProxy::start(&moto.url, vec![(RUN_T3_MEDIUM.to_vec(), Fault::LoseAnswer)]).await;
    let hosts = TestHosts::start_booting(1);
    let home = tempfile::tempdir().unwrap();
    let config = aws_config(&proxy.url, &["us-east-1"], &hosts);
    let client = client(home.path(), config, &hosts, EngineOptions::default()).await;
    hosts.track("unanswered");
    let yaml = "type: fleet\nname: unanswered\nnodes: 1\nresources: {cpu: 2.., memory: 4GB..}\n";
    let instances = harness::apply_fleet(&client, yaml).await.unwrap();
    assert_eq!(
        instances[0].status,
        InstanceStatus::Idle,
        "{:?}",
        instances[0]
    );
    let offer = instances[0].offer.clone().unwrap();
    assert_eq!(
        offer.instance_type, "t3.medium",
        "the instance it made was found"
    );
    let asked = proxy.asked.lock().unwrap().clone();
    assert!(
        asked.iter().all(|t| t == "t3.medium"),
        "no other offer was tried: {asked:?}"
    );
    // The SDK resent the request whose answer it lost: one instance is kept, the rest ended.
    let cloud = cloud_instances(&moto, "us-east-1").await;
    assert_eq!(cloud.len(), asked.len(), "one instance per request sent");
    let running: Vec<_> = cloud
        .iter()
        .filter(|i| state(i) != InstanceStateName::Terminated)
        .collect();
    assert_eq!(running.len(), 1, "{cloud:?}");
    assert_eq!(running[0].instance_id(), instances[0].cloud_id.as_deref());
    let attempt = tag(running[0], "dstack_attempt").unwrap();
    assert_eq!(instances[0].attempts, [attempt]);
    client.fleets().delete("unanswered", false).await.unwrap();
}

/// Copies a state directory (its SQLite shared-memory file aside: SQLite makes it anew).
fn copy_state(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        let target = to.join(&name);
        if entry.file_type().unwrap().is_dir() {
            copy_state(&entry.path(), &target);
        } else if !name.to_string_lossy().ends_with("-shm") {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_state_reaps_none_of_the_instances_of_the_other_copy() {
    let moto = start_moto().await;
    let hosts = TestHosts::start_booting(2);
    let original = tempfile::tempdir().unwrap();
    let copy = tempfile::tempdir().unwrap();
    let options = EngineOptions {
        orphan_grace: Duration::ZERO,
        ..EngineOptions::default()
    };
    let config = aws_config(&moto.url, &["us-east-1"], &hosts);
    let yaml = |name: &str| {
        hosts.track(name);
        format!("type: fleet\nname: {name}\nnodes: 1\nresources: {{cpu: 2.., memory: 4GB..}}\n")
    };
    {
        let client = client(original.path(), config.clone(), &hosts, options.clone()).await;
        harness::apply_fleet(&client, &yaml("before"))
            .await
            .unwrap();
    }
    copy_state(original.path(), copy.path());
    // The original goes on: an instance the copy has no record of.
    let after = {
        let client = client(original.path(), config.clone(), &hosts, options.clone()).await;
        harness::apply_fleet(&client, &yaml("after")).await.unwrap()
    };
    let copied = client(copy.path(), config.clone(), &hosts, options.clone()).await;
    let sweep = copied.engine().unwrap().reap_orphans().await.unwrap();
    assert!(sweep.terminated.is_empty(), "{sweep:?}");
    let cloud = cloud_instances(&moto, "us-east-1").await;
    assert_eq!(cloud.len(), 2);
    assert!(cloud.iter().all(|i| state(i) == InstanceStateName::Running));
    let mut left: Vec<&str> = sweep
        .left_alone
        .iter()
        .map(|l| l.cloud_id.as_str())
        .collect();
    left.sort();
    let mut all: Vec<&str> = cloud.iter().filter_map(|i| i.instance_id()).collect();
    all.sort();
    assert_eq!(left, all, "both reported: {sweep:?}");
    drop(copied);
    // The original still reaps its own: a record it ended, with the instance left running.
    {
        use dstack_core::store::Store;
        let store = dstack_core::store::SqliteStore::open(&dstack_core::client::state_file(
            original.path(),
        ))
        .unwrap();
        let mut ended = store.instance(&after[0].id).unwrap().unwrap();
        ended.status = InstanceStatus::Terminated;
        store.put_instance(&ended).unwrap();
    }
    let original_client = client(original.path(), config, &hosts, options).await;
    let ended = after[0].cloud_id.clone().unwrap();
    eventually(20, "the original reaps the instance it ended", async || {
        let cloud = cloud_instances(&moto, "us-east-1").await;
        cloud.iter().all(|i| {
            let terminated = state(i) == InstanceStateName::Terminated;
            terminated == (i.instance_id() == Some(ended.as_str()))
        })
    })
    .await;
    original_client
        .fleets()
        .delete("before", false)
        .await
        .unwrap();
}

/// Engine options for fleets that are restored within seconds: agents given up on after 1 s,
/// lost instances terminated 2 s later, attempts 1 s apart.
fn quick_restore() -> EngineOptions {
    EngineOptions {
        unreachable_after: Duration::from_secs(1),
        termination_deadline: Duration::from_secs(2),
        fleet_retry_delays: vec![Duration::from_secs(1)],
        ..EngineOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_whose_instance_the_cloud_terminated_gets_a_new_one() {
    let moto = start_moto().await;
    let hosts = TestHosts::start_booting(1);
    let home = tempfile::tempdir().unwrap();
    let config = aws_config(&moto.url, &["us-east-1"], &hosts);
    let client = client(home.path(), config, &hosts, quick_restore()).await;
    hosts.track("kept");
    let yaml = "type: fleet\nname: kept\nnodes: 1\n";
    let first = harness::apply_fleet(&client, yaml).await.unwrap();
    assert_eq!(first[0].status, InstanceStatus::Idle, "{first:?}");
    let lost_id = first[0].cloud_id.clone().unwrap();

    // Terminated behind the engine's back (as a spot interruption would): the cloud no longer
    // runs it and its host answers nothing.
    ec2(&moto, "us-east-1")
        .await
        .terminate_instances()
        .instance_ids(&lost_id)
        .send()
        .await
        .unwrap();
    let host = &hosts.hosts[0];
    host.kill("dstack-agent");
    host.kill("sshd");
    eventually(30, "the lost instance is recorded terminated", async || {
        let (_, all) = client.fleets().get("kept").await.unwrap().unwrap();
        all.iter()
            .any(|i| i.id == first[0].id && i.status == InstanceStatus::Terminated)
    })
    .await;
    let (_, all) = client.fleets().get("kept").await.unwrap().unwrap();
    let lost = all.iter().find(|i| i.id == first[0].id).unwrap();
    let why = lost.status_message.clone().unwrap_or_default();
    assert!(why.starts_with("unreachable"), "{why}");

    // The fleet is brought back to nodes.min: a new cloud instance (on the same test host,
    // whose address the terminated one freed), deployed and idle.
    host.start_sshd();
    eventually(45, "a new instance joins the fleet", async || {
        let (_, all) = client.fleets().get("kept").await.unwrap().unwrap();
        all.iter()
            .any(|i| i.id != first[0].id && i.status == InstanceStatus::Idle)
    })
    .await;
    let cloud = cloud_instances(&moto, "us-east-1").await;
    let running: Vec<_> = cloud
        .iter()
        .filter(|i| state(i) == InstanceStateName::Running)
        .collect();
    assert_eq!(running.len(), 1, "one instance replaces the lost one");
    assert_ne!(running[0].instance_id(), Some(lost_id.as_str()));
    let (fleet, _) = client.fleets().get("kept").await.unwrap().unwrap();
    eventually(10, "the restored fleet forgets its attempts", async || {
        let (fleet, _) = client.fleets().get("kept").await.unwrap().unwrap();
        fleet.consolidation.is_none()
    })
    .await;
    assert_eq!(fleet.status, dstack_core::model::FleetStatus::Active);
    client.fleets().delete("kept", false).await.unwrap();
}

/// AWS on moto behind a proxy that answers every `RunInstances` with no capacity (until its
/// faults are changed), one namespace host, and a client that restores fleets quickly.
async fn without_capacity() -> (Moto, FaultProxy, TestHosts, tempfile::TempDir, Client) {
    let moto = start_moto().await;
    let no_capacity = vec![(vec!["Action=RunInstances"], Fault::NoCapacity)];
    let proxy = FaultProxy::start(&moto.url, no_capacity).await;
    let hosts = TestHosts::start_booting(1);
    let home = tempfile::tempdir().unwrap();
    let config = aws_config(&proxy.url, &["us-east-1"], &hosts);
    let client = client(home.path(), config, &hosts, quick_restore()).await;
    (moto, proxy, hosts, home, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_without_capacity_fails_unless_its_retry_lets_it_wait_for_capacity() {
    // Each round of attempts asks for one instance type only (moto answers slowly).
    let (_moto, proxy, hosts, _home, client) = without_capacity().await;
    hosts.track("eager");
    hosts.track("patient");

    // Without `retry`: the fleet fails there and then, and is not retried.
    let yaml = "type: fleet\nname: eager\nnodes: 1\ninstance_types: [t3.medium]\n";
    assert!(harness::apply_fleet(&client, yaml)
        .await
        .unwrap()
        .is_empty());
    let (eager, _) = client.fleets().get("eager").await.unwrap().unwrap();
    assert_eq!(eager.status, dstack_core::model::FleetStatus::Failed);

    // With `retry`, it waits: active, tried again with backoff, and joined once capacity
    // returns.
    let asked_before = proxy.asked.lock().unwrap().len();
    let yaml = "type: fleet\nname: patient\nnodes: 1\ninstance_types: [t3.medium]\nretry: {duration: 1h}\n";
    assert!(harness::apply_fleet(&client, yaml)
        .await
        .unwrap()
        .is_empty());
    let (patient, all) = client.fleets().get("patient").await.unwrap().unwrap();
    assert_eq!(patient.status, dstack_core::model::FleetStatus::Active);
    assert_eq!(patient.consolidation.as_ref().map(|c| c.attempts), Some(1));
    assert!(
        patient.restoring(),
        "an auto-started server stays up meanwhile"
    );
    assert!(all[0]
        .status_message
        .as_deref()
        .unwrap_or_default()
        .starts_with("no capacity"));
    let round = proxy.asked.lock().unwrap().len() - asked_before;
    eventually(40, "a second attempt is made and fails", async || {
        let (fleet, all) = client.fleets().get("patient").await.unwrap().unwrap();
        proxy.asked.lock().unwrap().len() - asked_before >= 2 * round
            && fleet.consolidation.is_some_and(|c| c.attempts >= 2)
            && all.iter().all(|i| i.status == InstanceStatus::Terminated)
    })
    .await;
    proxy.set_faults(vec![]);
    eventually(
        30,
        "the fleet gets its instance once capacity returns",
        async || {
            let (fleet, all) = client.fleets().get("patient").await.unwrap().unwrap();
            fleet.consolidation.is_none() && all.iter().any(|i| i.status == InstanceStatus::Idle)
        },
    )
    .await;
    client.fleets().delete("patient", false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_waiting_for_capacity_stops_trying_after_its_retry_duration() {
    let (_moto, proxy, hosts, _home, client) = without_capacity().await;
    hosts.track("brief");
    // Past `retry.duration` it stops trying, says why, and stays active (applying it again
    // resumes).
    let yaml =
        "type: fleet\nname: brief\nnodes: 1\ninstance_types: [t3.medium]\nretry: {duration: 2s}\n";
    assert!(harness::apply_fleet(&client, yaml)
        .await
        .unwrap()
        .is_empty());
    eventually(
        20,
        "the fleet stops trying after retry.duration",
        async || {
            let (fleet, _) = client.fleets().get("brief").await.unwrap().unwrap();
            fleet
                .status_message
                .is_some_and(|m| m.contains("retry.duration (2s) passed"))
        },
    )
    .await;
    let asked = proxy.asked.lock().unwrap().len();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        proxy.asked.lock().unwrap().len(),
        asked,
        "no attempt after giving up"
    );
    let (brief, _) = client.fleets().get("brief").await.unwrap().unwrap();
    assert_eq!(brief.status, dstack_core::model::FleetStatus::Active);
    assert!(!brief.restoring(), "an auto-started server may exit");
}
