//! The GCP backend through the real client library (google-cloud-compute-v1) against a local
//! stand-in that checks request shapes (`common/gcp.rs`; no GCP emulator exists, so this is
//! verification at the API-shape level only). As with AWS, the stand-in's instances are mapped
//! (`instance_addresses`) to namespace hosts running sshd, so provisioning, the agent and a
//! job run for real; nothing but loopback and the test's own hosts is contacted.

#![cfg(feature = "gcp")]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::gcp::GcpStandIn;
use common::harness;
use common::netns::TestHosts;
use dstack_backends::config::{GcpConfig, GcpCreds};
use dstack_backends::gcp::GcpCompute;
use dstack_backends::local::find_agent_binary;
use dstack_backends::project::Project;
use dstack_core::config::parse;
use dstack_core::engine::EngineOptions;
use dstack_core::model::{Instance, InstanceStatus, RunStatus, VolumeStatus};
use dstack_core::Client;

fn gcp_config(endpoint: &str, hosts: &TestHosts) -> GcpConfig {
    let addresses = hosts.hosts.iter().map(|h| h.addr.clone()).collect();
    common::gcp::config(endpoint, addresses)
}

/// A client with the GCP backend only, whose project key the namespace hosts accept.
async fn client(
    home: &Path,
    config: GcpConfig,
    hosts: &TestHosts,
    engine: EngineOptions,
) -> Client {
    harness::authorize_project(home, hosts);
    let agent = find_agent_binary().expect("dstack-agent is built");
    let gcp = GcpCompute::new(config, home, "main", agent).await.unwrap();
    harness::client(home, Arc::new(gcp), engine).await
}

/// [`client`] with the stand-in's default configuration and engine options.
async fn default_client(home: &Path, gcp: &GcpStandIn, hosts: &TestHosts) -> Client {
    client(
        home,
        gcp_config(&gcp.url, hosts),
        hosts,
        EngineOptions::default(),
    )
    .await
}

/// Applies a fleet that must apply.
async fn apply_fleet(client: &Client, yaml: &str) -> Vec<Instance> {
    harness::apply_fleet(client, yaml)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_provisions_through_the_compute_api_and_runs_a_task() {
    let gcp = GcpStandIn::start().await;
    let hosts = TestHosts::start_booting(1);
    gcp.boot(&hosts);
    let home = tempfile::tempdir().unwrap();
    let client = default_client(home.path(), &gcp, &hosts).await;
    hosts.track("gce");
    let instances = apply_fleet(&client, "type: fleet\nname: gce\nnodes: 1\n").await;
    assert_eq!(instances.len(), 1);
    let instance = &instances[0];
    assert_eq!(instance.status, InstanceStatus::Idle, "{instance:?}");
    let offer = instance.offer.clone().unwrap();
    // The cheapest on-demand offer of the built-in catalog in us-central1.
    assert_eq!(
        (offer.instance_type.as_str(), offer.region.as_str()),
        ("e2-standard-2", "us-central1")
    );
    assert!(gcp.violations().is_empty(), "{:?}", gcp.violations());
    {
        let state = gcp.state.lock().unwrap();
        assert!(state.firewalls.contains_key("dstack-ssh-in-default"));
        let (key, created) = state.instances.iter().next().unwrap();
        assert!(key.starts_with("us-central1-a/dstack-main-gce-0-"), "{key}");
        let owner = Project::load_or_create(home.path()).unwrap().owner_id;
        assert_eq!(created["labels"]["dstack_owner"], owner.as_str());
        assert_eq!(
            created["labels"]["dstack_instance_id"],
            instance.id.as_str()
        );
        assert_eq!(
            created["machineType"],
            "zones/us-central1-a/machineTypes/e2-standard-2"
        );
        assert_eq!(created["disks"][0]["initializeParams"]["diskSizeGb"], "100");
    }
    let task = "type: task\nresources: {cpu: 1.., memory: 0.1GB..}\ncommands: [echo on-gcp]\n";
    let (run, done, out) = harness::run_task(&client, task, 60).await;
    assert_eq!(done.status, RunStatus::Done, "{:?}", run.jobs().await);
    assert_eq!(out, "on-gcp\n");
    client.fleets().delete("gce", false).await.unwrap();
    assert!(gcp.state.lock().unwrap().instances.is_empty(), "deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_ssh_sources_get_a_firewall_rule_of_their_own_in_the_named_network() {
    let gcp = GcpStandIn::start().await;
    let hosts = TestHosts::start_booting(1);
    gcp.boot(&hosts);
    let home = tempfile::tempdir().unwrap();
    let config = GcpConfig {
        vpc_name: Some("dstack-net".into()),
        public_ips: Some(false),
        ssh_ingress_cidrs: Some(vec!["10.0.0.0/8".into()]),
        ..gcp_config(&gcp.url, &hosts)
    };
    let client = client(home.path(), config, &hosts, EngineOptions::default()).await;
    hosts.track("private");
    let instances = apply_fleet(&client, "type: fleet\nname: private\nnodes: 1\n").await;
    assert_eq!(
        instances[0].status,
        InstanceStatus::Idle,
        "{:?}",
        instances[0]
    );
    assert!(gcp.violations().is_empty(), "{:?}", gcp.violations());
    {
        let state = gcp.state.lock().unwrap();
        assert_eq!(state.firewalls.len(), 1, "not dstack's shared rule");
        let (name, rule) = state.firewalls.iter().next().unwrap();
        let hash = name.strip_prefix("dstack-ssh-in-dstack-net-").unwrap();
        assert_eq!(rule["sourceRanges"], serde_json::json!(["10.0.0.0/8"]));
        assert_eq!(rule["network"], "global/networks/dstack-net");
        let target = format!("dstack-ssh-{hash}");
        assert_eq!(rule["targetTags"], serde_json::json!([target]));
        let (key, created) = state.instances.iter().next().unwrap();
        assert!(
            key.ends_with(&instances[0].cloud_id.clone().unwrap()),
            "{key}"
        );
        assert_eq!(created["tags"]["items"], serde_json::json!([target]));
        let nic = &created["networkInterfaces"][0];
        assert_eq!(nic["network"], "global/networks/dstack-net");
        assert!(nic["accessConfigs"].is_null(), "no external address: {nic}");
        assert_eq!(
            created["labels"]["dstack_attempt"],
            instances[0].attempts[0].as_str()
        );
        assert!(created["labels"]["dstack_state"].is_string());
    }
    client.fleets().delete("private", false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_zones_fall_through_and_spot_is_requested_as_spot() {
    let gcp = GcpStandIn::start().await;
    gcp.exhaust("us-central1-a", "e2-standard-2");
    let hosts = TestHosts::start_booting(1);
    gcp.boot(&hosts);
    let home = tempfile::tempdir().unwrap();
    let client = default_client(home.path(), &gcp, &hosts).await;
    hosts.track("cheap");
    let instances = apply_fleet(
        &client,
        "type: fleet\nname: cheap\nnodes: 1\nspot_policy: spot\n",
    )
    .await;
    assert_eq!(instances[0].status, InstanceStatus::Idle);
    assert!(gcp.violations().is_empty(), "{:?}", gcp.violations());
    let state = gcp.state.lock().unwrap();
    let inserts: Vec<&String> = state
        .calls
        .iter()
        .filter(|c| c.starts_with("POST") && c.ends_with("/instances"))
        .collect();
    assert_eq!(inserts.len(), 2, "{inserts:?}");
    assert!(inserts[0].contains("/zones/us-central1-a/"));
    assert!(
        inserts[1].contains("/zones/us-central1-b/"),
        "the next zone of the offer"
    );
    let (key, created) = state.instances.iter().next().unwrap();
    assert!(key.starts_with("us-central1-b/"));
    assert_eq!(created["scheduling"]["provisioningModel"], "SPOT");
    assert_eq!(created["scheduling"]["instanceTerminationAction"], "STOP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strays_are_reaped_and_disks_go_through_their_life_cycle() {
    let gcp = GcpStandIn::start().await;
    let hosts = TestHosts::start_booting(1);
    gcp.boot(&hosts);
    let home = tempfile::tempdir().unwrap();
    let owner = Project::load_or_create(home.path()).unwrap().owner_id;
    // An instance whose record this state ended while it kept running, one whose record this
    // state does not know (a copy of the state made it), and one of someone else.
    let state_id = {
        use dstack_core::store::Store;
        let store =
            dstack_core::store::SqliteStore::open(&dstack_core::client::state_file(home.path()))
                .unwrap();
        let ended: Instance = serde_json::from_value(serde_json::json!({
            "id": "ended", "name": "stray-1", "fleet_id": "f", "backend": "gcp",
            "status": "terminated", "host": dstack_core::agent::HostInfo::default(),
            "price": 0.0, "backend_data": {}, "created_at_ms": 0, "attempts": ["a1"],
        }))
        .unwrap();
        store.put_instance(&ended).unwrap();
        store.state_id().to_string()
    };
    {
        let mut state = gcp.state.lock().unwrap();
        for (name, who, record) in [
            ("dstack-main-stray-1", owner.as_str(), "ended"),
            ("dstack-main-copied-1", owner.as_str(), "unknown"),
            ("theirs", "someone-else", "unknown"),
        ] {
            let instance = serde_json::json!({
                "name": name, "status": "RUNNING",
                "zone": "https://compute.googleapis.com/compute/v1/projects/p/zones/us-central1-a",
                "labels": {
                    "owner": "dstack", "dstack_owner": who, "dstack_instance_id": record,
                    "dstack_state": state_id, "dstack_attempt": "a1",
                },
            });
            state
                .instances
                .insert(format!("us-central1-a/{name}"), instance);
        }
    }
    let options = EngineOptions {
        orphan_grace: Duration::ZERO,
        ..EngineOptions::default()
    };
    let client = client(home.path(), gcp_config(&gcp.url, &hosts), &hosts, options).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while gcp
        .state
        .lock()
        .unwrap()
        .instances
        .contains_key("us-central1-a/dstack-main-stray-1")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stray is deleted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for kept in ["us-central1-a/theirs", "us-central1-a/dstack-main-copied-1"] {
        assert!(
            gcp.state.lock().unwrap().instances.contains_key(kept),
            "{kept}"
        );
    }
    let sweep = client.engine().unwrap().reap_orphans().await.unwrap();
    assert_eq!(sweep.left_alone.len(), 1, "{sweep:?}");
    assert_eq!(sweep.left_alone[0].cloud_id, "dstack-main-copied-1");

    let volume = parse(
        "type: volume\nname: cache\nbackend: gcp\nregion: us-central1\nsize: 50GB\n",
        "volume.dstack.yml",
    )
    .unwrap();
    let cache = client.volumes().apply(&volume).await.unwrap();
    assert_eq!(cache.status, VolumeStatus::Active, "{cache:?}");
    assert_eq!(cache.size_gb, Some(50));
    assert_eq!(cache.availability_zone.as_deref(), Some("us-central1-a"));
    hosts.track("withdisk");
    let instances = apply_fleet(&client, "type: fleet\nname: withdisk\nnodes: 1\n").await;
    let attached = client
        .engine()
        .unwrap()
        .attach_volume("cache", &instances[0].id)
        .await
        .unwrap();
    assert_eq!(attached.attachments[0].device_name, "pd-dstack-main-cache");
    assert!(
        client.volumes().delete("cache").await.is_err(),
        "attached: kept"
    );
    client
        .engine()
        .unwrap()
        .detach_volume("cache", &instances[0].id, false)
        .await
        .unwrap();
    client.volumes().delete("cache").await.unwrap();
    assert!(gcp.state.lock().unwrap().disks.is_empty());
    assert!(gcp.violations().is_empty(), "{:?}", gcp.violations());
    client.fleets().delete("withdisk", false).await.unwrap();
}

/// Runs `script` with `sh -c` the way an agent would on a GCE instance whose metadata server
/// is the stand-in, with `shutdown` and `systemctl` replaced by commands that append to
/// `<fakes>/powered-off` (nothing here may power this machine off).
fn run_shutdown_action(script: &str, gcp: &GcpStandIn, fakes: &Path) -> std::process::Output {
    use std::os::unix::fs::PermissionsExt;
    for tool in ["shutdown", "systemctl"] {
        let path = fakes.join(tool);
        let marker = fakes.join("powered-off");
        std::fs::write(
            &path,
            format!("#!/bin/sh\necho {tool} >> '{}'\n", marker.display()),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .env_clear()
        .env("PATH", format!("{}:/usr/bin:/bin", fakes.display()))
        .env("GCE_METADATA_HOST", gcp.url.trim_start_matches("http://"))
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_lease_lapses_deletes_its_instance_or_else_powers_it_off() {
    let gcp = GcpStandIn::start().await;
    let hosts = TestHosts::start_booting(1);
    gcp.boot(&hosts);
    let home = tempfile::tempdir().unwrap();
    let client = default_client(home.path(), &gcp, &hosts).await;
    hosts.track("leased");
    let yaml = "type: fleet\nname: leased\nnodes: 1\nidle_duration: 1h\n";
    let instances = apply_fleet(&client, yaml).await;
    let agent = harness::leased_agent(&client, &instances[0], 3600).await;
    // The agent's shutdown action, as deployed (the namespace hosts share this machine's
    // process table).
    let pid = agent.healthcheck().await.unwrap().pid;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let at = args.iter().position(|a| a == "--shutdown-command").unwrap();
    let script = args[at + 1].clone();
    let fakes = tempfile::tempdir().unwrap();
    let powered_off = fakes.path().join("powered-off");

    // Without a service account the instance cannot delete itself: it powers off (stopped).
    let out = run_shutdown_action(&script, &gcp, fakes.path());
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read_to_string(&powered_off).unwrap(), "shutdown\n");
    assert_eq!(gcp.state.lock().unwrap().instances.len(), 1);

    // With one, it deletes itself through the Compute API with its token.
    gcp.state.lock().unwrap().service_account_token = Some("sa-token".into());
    let out = run_shutdown_action(&script, &gcp, fakes.path());
    assert!(out.status.success(), "{out:?}");
    {
        let state = gcp.state.lock().unwrap();
        assert!(state.instances.is_empty(), "deleted");
        assert!(
            state.authorizations.iter().any(|a| a == "Bearer sa-token"),
            "{:?} {:?} {out:?}",
            state.authorizations,
            state.calls
        );
    }
    assert_eq!(
        std::fs::read_to_string(&powered_off).unwrap(),
        "shutdown\n",
        "not powered off"
    );
    assert!(gcp.violations().is_empty(), "{:?}", gcp.violations());
    client.fleets().delete("leased", false).await.unwrap();
}

#[tokio::test]
async fn without_credentials_the_backend_says_why() {
    let home = tempfile::tempdir().unwrap();
    let config = GcpConfig {
        project_id: "p".into(),
        creds: Some(GcpCreds::ServiceAccount {
            filename: Some(home.path().join("missing.json").display().to_string()),
            data: None,
        }),
        ..GcpConfig::default()
    };
    let agent = find_agent_binary().expect("dstack-agent is built");
    let err = GcpCompute::new(config, home.path(), "main", agent)
        .await
        .err()
        .expect("no credentials");
    let text = err.to_string();
    assert!(
        text.starts_with("unauthenticated: no GCP credentials"),
        "{text}"
    );
    assert!(text.contains("missing.json"), "{text}");
}
