//! `dstack server` supervises cloud instances on its own: an AWS fleet (moto, its instance
//! mapped to a namespace host running sshd, as in `dstack-backends/tests/aws.rs`, whose
//! helpers this test shares) gets an instance for a run of a client; once every client is
//! gone, the server alone terminates the instance after its fleet's `idle_duration`. The test
//! sees that in moto only, with no call to the server in between.

#![cfg(feature = "aws")]

#[path = "../../dstack-backends/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::ec2::{cloud_instances, image, start_moto, state};
use common::moto::Moto;
use common::netns::TestHosts;
use common::{cloud_init, harness};
use dstack_backends::aws::aws_sdk_ec2::types::InstanceStateName;
use dstack_core::client::home::{self, ClientConfig};
use dstack_core::client::Remote;
use dstack_core::model::{InstanceStatus, RunStatus};
use dstack_core::Client;
use dstack_server::ServerOptions;

/// The fleet's `idle_duration`. The engine's sweep (every 3 s) counts an instance's idle time
/// from the last sweep that saw a job on it, so the task runs longer than a sweep period and
/// the instance is sure to outlive the client by several seconds.
const IDLE: &str = "10s";

/// How long after the last client left the idle instance must be terminated: its idle time
/// plus a few sweeps, with room for a slow machine.
const REAPED_WITHIN: Duration = Duration::from_secs(60);

/// Writes the server configuration of `home`: the AWS backend pointed at `moto`, its
/// instances reached at the addresses of `hosts` and "booting" the image of the AWS tests.
fn write_server_config(home: &Path, moto: &Moto, hosts: &TestHosts) {
    let image = image().cpu.unwrap();
    let addresses: Vec<String> = hosts
        .hosts
        .iter()
        .map(|h| format!("{:?}", h.addr))
        .collect();
    let yaml = format!(
        "projects:\n\
         - name: main\n  \
           backends:\n  \
           - type: aws\n    \
             creds: {{type: access_key, access_key: testing, secret_key: testing}}\n    \
             regions: [us-east-1]\n    \
             endpoint_url: {url:?}\n    \
             instance_addresses: [{addresses}]\n    \
             os_images:\n      \
               cpu: {{name: {name:?}, owner: {owner:?}, user: {user:?}}}\n",
        url = moto.url,
        addresses = addresses.join(", "),
        name = image.name,
        owner = image.owner,
        user = image.user,
    );
    let path = home::server_config_file(home);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, yaml).unwrap();
}

/// A client of the server of `home`, with the URL and token the server wrote to `config.yml`.
fn client(home: &Path) -> Client {
    let config = ClientConfig::load(home).unwrap();
    let project = config
        .project(Some("main"))
        .expect("the server wrote config.yml");
    Client::remote(Remote::new(&project.url, &project.name, &project.token).unwrap())
}

/// Kills, on drop, the local agent the server's local backend may have started for `home`
/// (a detached process that would outlive the test).
struct LocalAgent(PathBuf);

impl Drop for LocalAgent {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.0.join("agent/agent.pid")) {
            let _ = std::process::Command::new("kill")
                .args(["-9", pid.trim()])
                .status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_alone_terminates_an_idle_cloud_instance_once_its_clients_are_gone() {
    let moto = start_moto().await;
    let hosts = TestHosts::start_booting(1);
    cloud_init::boot_aws(&hosts, &moto.url, &["us-east-1".to_string()]);
    let home = tempfile::tempdir().unwrap();
    let _agent = LocalAgent(home.path().to_path_buf());
    write_server_config(home.path(), &moto, &hosts);
    harness::authorize_project(home.path(), &hosts);
    hosts.track("elastic");

    let options = ServerOptions {
        home: home.path().to_path_buf(),
        host: "127.0.0.1".into(),
        port: Some(0),
        token: None,
        idle_exit: None,
        agent_bin: None,
        proxy_timeout: std::time::Duration::from_secs(300),
        cli_bin: None,
    };
    let (ready, listening) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(dstack_server::serve(options, move |url: &str| {
        let _ = ready.send(url.to_string());
    }));
    if listening.await.is_err() {
        panic!("the server did not start: {:?}", server.await);
    }

    {
        let client = client(home.path());
        let fleet = format!("type: fleet\nname: elastic\nnodes: 0..1\nidle_duration: {IDLE}\n");
        let instances = harness::apply_fleet(&client, &fleet).await.unwrap();
        assert!(instances.is_empty(), "nodes.min 0: nothing up front");
        // The run finds no room and gets an instance of the fleet, which it leaves idle.
        let task = "type: task\nfleets: [elastic]\nresources: {cpu: 1.., memory: 0.1GB..}\n\
                    commands: [sleep 5, echo provisioned-for-me]\n";
        let (run, done, out) = harness::run_task(&client, task, 90).await;
        assert_eq!(done.status, RunStatus::Done, "{:?}", run.jobs().await);
        assert_eq!(out, "provisioned-for-me\n");
    }
    // No client is left; from here on only moto is looked at.
    let gone = Instant::now();
    let cloud = cloud_instances(&moto, "us-east-1").await;
    assert_eq!(cloud.len(), 1, "{cloud:?}");
    assert_eq!(state(&cloud[0]), InstanceStateName::Running, "{cloud:?}");
    loop {
        let cloud = cloud_instances(&moto, "us-east-1").await;
        if cloud
            .iter()
            .all(|i| state(i) == InstanceStateName::Terminated)
        {
            break;
        }
        assert!(
            gone.elapsed() < REAPED_WITHIN,
            "the idle instance still runs {:?} after its clients left: {cloud:?}",
            gone.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("terminated {:?} after the last client left", gone.elapsed());

    // The server says why: its idle reaping, not the agent's owner lease.
    let client = client(home.path());
    let (_, instances) = client.fleets().get("elastic").await.unwrap().unwrap();
    assert_eq!(instances.len(), 1);
    assert_eq!(instances[0].status, InstanceStatus::Terminated);
    let why = instances[0].status_message.as_deref().unwrap_or_default();
    assert!(why.starts_with("idle_timeout"), "{why}");
    server.abort();
}
