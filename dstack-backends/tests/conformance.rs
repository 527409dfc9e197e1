//! One conformance suite for every backend: the contract written on `Compute`, checked the
//! same way against the in-memory cloud, this machine, SSH hosts (namespace hosts running
//! sshd), AWS (moto, with the `aws` feature) and GCP (the stand-in, with `gcp`); a new backend
//! adds one test here.
//!
//! What every backend must do: terminating is idempotent (twice, and a record of something
//! never created); backends that create nothing offer nothing and own nothing. What creating
//! backends must do besides: offers satisfy the request, cheapest first, and an impossible
//! request gets none; a created instance is listed as owned with its record's id, its attempt
//! and its state, and found again by its attempt (not by another); "no capacity" is
//! [`ComputeError::NoCapacity`]; terminated, it is no longer listed, and terminating it (or
//! its owned listing) again is fine.

mod common;

use common::netns::TestHosts;
use dstack_backends::local::{find_agent_binary, LocalBackend};
use dstack_backends::memory::MemoryCompute;
use dstack_backends::ssh::{KnownHosts, SshCompute};
use dstack_core::backend::{Compute, ComputeError, InstanceConfig, OfferRequest};
use dstack_core::model::Instance;
use dstack_core::offers::query::QueryFilter;
use dstack_core::offers::Offer;

/// An instance record of `backend` with this backend data.
fn record(backend: &str, data: serde_json::Value) -> Instance {
    serde_json::from_value(serde_json::json!({
        "id": "record-1", "name": "conformance-0", "fleet_id": "fleet", "backend": backend,
        "status": "provisioning", "host": dstack_core::agent::HostInfo::default(),
        "price": 0.0, "backend_data": data, "created_at_ms": 0,
    }))
    .unwrap()
}

/// What a creation attempt sends besides its offer.
fn attempt(id: &str) -> InstanceConfig {
    InstanceConfig {
        instance_id: "record-1".into(),
        attempt_id: id.into(),
        state_id: "state-1".into(),
        name: "conformance-0".into(),
        fleet: "conformance".into(),
        tags: Default::default(),
    }
}

/// 2 or more CPUs and 4 GB or more of memory, on demand, without GPUs.
fn small() -> OfferRequest {
    OfferRequest {
        filter: QueryFilter {
            min_cpu: Some(2.0),
            min_memory: Some(4.0),
            max_gpu_count: Some(0.0),
            spot: Some(false),
            ..QueryFilter::default()
        },
        disk: None,
    }
}

/// More CPUs than any machine has.
fn impossible() -> OfferRequest {
    OfferRequest {
        filter: QueryFilter {
            min_cpu: Some(1_000_000.0),
            ..QueryFilter::default()
        },
        disk: None,
    }
}

/// Checks what every backend must do; `made` is a record of an instance it holds (deployed or
/// created), terminated twice here.
async fn every_backend_conforms(backend: &dyn Compute, made: Instance) {
    let name = backend.backend();
    let never = record(name, serde_json::json!({}));
    let error = |e: ComputeError| format!("{name}: {e}");
    backend
        .terminate_instance(&never)
        .await
        .map_err(error)
        .expect("terminating a record of nothing created");
    backend
        .terminate_instance(&made)
        .await
        .map_err(error)
        .expect("terminating an instance");
    backend
        .terminate_instance(&made)
        .await
        .map_err(error)
        .expect("terminating it again");
}

/// Checks what a backend that creates nothing must do.
async fn a_backend_of_fixed_capacity_conforms(backend: &dyn Compute, made: Instance) {
    let name = backend.backend();
    assert!(!backend.creates_instances(), "{name}");
    assert!(
        backend.offers_for(&small()).await.unwrap().is_empty(),
        "{name}"
    );
    assert!(
        backend.owned_instances().await.unwrap().is_empty(),
        "{name}"
    );
    every_backend_conforms(backend, made).await;
}

/// Checks what a creating backend must do; `exhaust` leaves an offer without capacity.
async fn a_creating_backend_conforms(backend: &dyn Compute, exhaust: impl Fn(&Offer)) {
    let name = backend.backend();
    assert!(backend.creates_instances(), "{name}");
    let offers = backend.offers_for(&small()).await.unwrap();
    assert!(!offers.is_empty(), "{name}: no offers for 2 CPUs and 4 GB");
    for offer in &offers {
        let r = &offer.resources;
        assert!(
            r.cpus >= 2 && r.memory_bytes >= 4 << 30 && r.gpus.is_empty() && !offer.spot,
            "{name}: {offer:?} does not satisfy the request"
        );
        assert_eq!(offer.backend, name);
    }
    assert!(
        offers.windows(2).all(|w| w[0].price <= w[1].price),
        "{name}: offers are not cheapest first"
    );
    assert!(
        backend.offers_for(&impossible()).await.unwrap().is_empty(),
        "{name}: offers for an impossible request"
    );

    // Created: owned with its record, attempt and state; found again by its attempt only.
    let offer = &offers[0];
    let config = attempt("attempt-1");
    let created = backend.create_instance(offer, &config).await.unwrap();
    let cloud_id = created.cloud_id.clone().expect("a cloud id");
    let owned = backend.owned_instances().await.unwrap();
    let mine = owned.iter().find(|o| o.cloud_id == cloud_id);
    let mine = mine.unwrap_or_else(|| panic!("{name}: {cloud_id} is not listed in {owned:?}"));
    assert_eq!(mine.instance_id.as_deref(), Some("record-1"), "{name}");
    assert_eq!(mine.attempt_id.as_deref(), Some("attempt-1"), "{name}");
    assert_eq!(mine.state_id.as_deref(), Some("state-1"), "{name}");
    let found = backend.find_attempt(offer, &config).await.unwrap();
    assert_eq!(
        found.and_then(|f| f.cloud_id),
        Some(cloud_id.clone()),
        "{name}"
    );
    let other = backend.find_attempt(offer, &attempt("attempt-2")).await;
    assert!(other.unwrap().is_none(), "{name}: another attempt found it");

    // No capacity is NoCapacity, and nothing is made.
    exhaust(offer);
    match backend.create_instance(offer, &attempt("attempt-3")).await {
        Err(ComputeError::NoCapacity(_)) => {}
        other => panic!("{name}: an exhausted offer gave {other:?}"),
    }
    let owned = backend.owned_instances().await.unwrap();
    assert!(
        owned
            .iter()
            .all(|o| o.attempt_id.as_deref() != Some("attempt-3")),
        "{name}: the attempt without capacity made {owned:?}"
    );

    // Terminated (twice), it is listed no more; its owned listing terminates again fine.
    let mut made = record(name, created.backend_data.clone());
    made.cloud_id = Some(cloud_id.clone());
    every_backend_conforms(backend, made).await;
    common::eventually(
        60,
        &format!("{name}: {cloud_id} is no longer owned"),
        async || {
            let owned = backend.owned_instances().await.unwrap();
            owned.iter().all(|o| o.cloud_id != cloud_id)
        },
    )
    .await;
    backend.terminate_owned(mine).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_memory_cloud_conforms() {
    let memory = MemoryCompute::simulating("aws").unwrap();
    a_creating_backend_conforms(&memory, |offer| {
        memory.set_capacity(&offer.instance_type, 0)
    })
    .await;
    assert!(memory.live().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn this_machine_conforms() {
    let home = tempfile::tempdir().unwrap();
    let agent = find_agent_binary().expect("dstack-agent is built");
    let local = LocalBackend::new(home.path(), agent);
    let machine = local.offers().await.unwrap().remove(0);
    let made = local
        .create_instance(&machine, &attempt("local"))
        .await
        .unwrap();
    let made = record("local", made.backend_data);
    a_backend_of_fixed_capacity_conforms(&local, made).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_hosts_conform() {
    let hosts = TestHosts::start(1);
    let home = tempfile::tempdir().unwrap();
    let agent = find_agent_binary().expect("dstack-agent is built");
    let ssh = SshCompute::new(KnownHosts::in_home(home.path()), agent);
    let host = record(
        "ssh",
        serde_json::json!({
            "hostname": hosts.hosts[0].addr, "port": 22, "user": "root",
            "identity_file": hosts.key,
        }),
    );
    let mut deployed = host.clone();
    deployed.backend_data = ssh.deploy(&host).await.unwrap().backend_data;
    a_backend_of_fixed_capacity_conforms(&ssh, deployed).await;
    let left =
        hosts.hosts[0].run_inside("ls -d $HOME/.dstack-rs/conformance-0-* 2>/dev/null; true");
    assert!(left.trim().is_empty(), "the host keeps {left}");
}

#[cfg(feature = "aws")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_conforms() {
    use common::ec2::{image, start_moto};
    use common::moto::{Fault, FaultProxy};
    use dstack_backends::aws::AwsCompute;
    use dstack_backends::config::{AwsConfig, AwsCreds};
    let moto = start_moto().await;
    let proxy = FaultProxy::start(&moto.url, vec![]).await;
    let home = tempfile::tempdir().unwrap();
    let config = AwsConfig {
        creds: Some(AwsCreds::AccessKey {
            access_key: "testing".into(),
            secret_key: "testing".into(),
        }),
        regions: Some(vec!["us-east-1".into()]),
        os_images: image(),
        endpoint_url: Some(proxy.url.clone()),
        ..AwsConfig::default()
    };
    let agent = find_agent_binary().expect("dstack-agent is built");
    let aws = AwsCompute::new(config, home.path(), "main", agent)
        .await
        .unwrap();
    a_creating_backend_conforms(&aws, |_| {
        proxy.set_faults(vec![(vec!["Action=RunInstances"], Fault::NoCapacity)]);
    })
    .await;
}

#[cfg(feature = "gcp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcp_conforms() {
    use common::gcp::GcpStandIn;
    use dstack_backends::gcp::GcpCompute;
    let gcp = GcpStandIn::start().await;
    let home = tempfile::tempdir().unwrap();
    let config = common::gcp::config(&gcp.url, Vec::new());
    let agent = find_agent_binary().expect("dstack-agent is built");
    let compute = GcpCompute::new(config, home.path(), "main", agent)
        .await
        .unwrap();
    a_creating_backend_conforms(&compute, |offer| {
        for zone in offer.availability_zones.iter().flatten() {
            gcp.exhaust(zone, &offer.instance_type);
        }
    })
    .await;
    assert!(gcp.violations().is_empty(), "{:?}", gcp.violations());
}
