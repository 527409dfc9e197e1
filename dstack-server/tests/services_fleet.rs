//! A service with two replicas on an SSH fleet of two namespace hosts, behind an in-process
//! `dstack server`'s proxy: the replicas go to different hosts (they share a port), requests
//! are spread over both, and when one replica's app dies the other takes every request, with
//! none failing.

#[path = "../../dstack-backends/tests/common/mod.rs"]
mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::netns::TestHosts;
use common::{eventually, harness};
use dstack_core::client::home::ClientConfig;
use dstack_core::client::Remote;
use dstack_core::config::parse;
use dstack_core::engine::ApplyOptions;
use dstack_core::model::JobStatus;
use dstack_core::Client;
use dstack_server::ServerOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A client of the server of `home`, with the URL and token the server wrote to `config.yml`.
fn client(home: &Path) -> (Client, String, String) {
    let config = ClientConfig::load(home).unwrap();
    let project = config
        .project(Some("main"))
        .expect("the server wrote config.yml");
    let remote = Remote::new(&project.url, &project.name, &project.token).unwrap();
    (
        Client::remote(remote),
        project.url.clone(),
        project.token.clone(),
    )
}

/// Starts an in-process `dstack server` for `home` on a free port (the proxy's timeout 30 s)
/// and waits until it listens.
async fn start_server(
    home: &Path,
) -> tokio::task::JoinHandle<Result<(), dstack_server::ServeError>> {
    let options = ServerOptions {
        home: home.to_path_buf(),
        host: "127.0.0.1".into(),
        port: Some(0),
        token: None,
        idle_exit: None,
        agent_bin: None,
        proxy_timeout: Duration::from_secs(30),
        cli_bin: None,
    };
    let (ready, listening) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(dstack_server::serve(options, move |url: &str| {
        let _ = ready.send(url.to_string());
    }));
    if listening.await.is_err() {
        panic!("the server did not start: {:?}", server.await);
    }
    server
}

/// The test app the replicas run (`dstack-cli/tests/apps/service_app.py`).
fn app() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../dstack-cli/tests/apps/service_app.py")
        .canonicalize()
        .unwrap()
}

/// Kills, on drop, the local agent the server's local backend may have started for `home`.
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

/// `GET url` with the token on a connection of its own: the status and the body.
async fn get(url: &str, token: &str) -> (u16, String) {
    let rest = url.strip_prefix("http://").unwrap();
    let (authority, path) = rest.split_once('/').unwrap();
    let mut stream = tokio::net::TcpStream::connect(authority).await.unwrap();
    let head = format!(
        "GET /{path} HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Kills the app's Python process in namespace `ns` (not the job's shell, which starts it
/// again).
fn kill_app(ns: &str) {
    let pids = std::process::Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .unwrap();
    let mut killed = 0;
    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a| a.ends_with("python3"))
            && args.iter().any(|a| a.ends_with("service_app.py"))
        {
            let _ = std::process::Command::new("kill")
                .args(["-9", pid])
                .status();
            killed += 1;
        }
    }
    assert_eq!(killed, 1, "the app runs once in {ns}");
}

/// The pid of the replica that answered.
fn pid(body: &str) -> u64 {
    let about: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    about["pid"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_two_hosts_share_the_requests_and_one_takes_over_when_the_other_dies() {
    let hosts = TestHosts::start(2);
    let home = tempfile::tempdir().unwrap();
    let _agent = LocalAgent(home.path().to_path_buf());
    harness::authorize_project(home.path(), &hosts);
    let server = start_server(home.path()).await;
    let (client, url, token) = client(home.path());
    let fleet = hosts.fleet_yaml("pair");
    let instances = harness::apply_fleet(&client, &fleet).await.unwrap();
    assert_eq!(instances.len(), 2);

    let app = app();
    // The app is started again 2 s after it dies, while its job goes on.
    let yaml = format!(
        "type: service\nname: pair-web\nport: 8123\nreplicas: 2\nfleets: [pair]\n\
         resources: {{cpu: 1.., memory: 0.1GB..}}\n\
         commands:\n  - while true; do python3 {} 8123; sleep 2; done\n",
        app.display()
    );
    let config = parse(&yaml, "service.dstack.yml").unwrap();
    let run = client
        .runs()
        .apply(config, ApplyOptions::default())
        .await
        .unwrap();
    let service = client.service(&run.run().await.unwrap()).unwrap();
    assert_eq!(service.url, format!("{url}/proxy/services/main/pair-web/"));

    eventually(60, "both replicas to run, on different hosts", async || {
        let jobs = run.jobs().await.unwrap();
        let running: BTreeSet<_> = jobs
            .iter()
            .filter(|j| j.status == JobStatus::Running)
            .map(|j| (j.replica_num, j.instance_id.clone()))
            .collect();
        running.len() == 2
            && running
                .iter()
                .map(|(_, i)| i)
                .collect::<BTreeSet<_>>()
                .len()
                == 2
            && running.iter().map(|(r, _)| *r).collect::<Vec<_>>() == [0, 1]
    })
    .await;
    let mut seen = BTreeSet::new();
    eventually(60, "requests to reach both replicas", async || {
        let (status, body) = get(&service.url, &token).await;
        if status == 200 {
            seen.insert(pid(&body));
        }
        seen.len() == 2
    })
    .await;

    // One replica's app dies: every request goes to the other, none fails.
    kill_app(&hosts.hosts[0].ns);
    let mut answered_by = BTreeSet::new();
    for _ in 0..20 {
        let (status, body) = get(&service.url, &token).await;
        assert_eq!(status, 200, "{body}");
        answered_by.insert(pid(&body));
    }
    assert_eq!(answered_by.len(), 1, "{answered_by:?}");

    run.stop(false).await.unwrap();
    eventually(30, "the URL to be gone", async || {
        get(&service.url, &token).await.0 == 404
    })
    .await;
    client.fleets().delete("pair", true).await.unwrap();
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_above_the_target_scales_a_service_up_to_three_hosts_and_back_down_after_it() {
    let hosts = TestHosts::start(3);
    let home = tempfile::tempdir().unwrap();
    let _agent = LocalAgent(home.path().to_path_buf());
    harness::authorize_project(home.path(), &hosts);
    let server = start_server(home.path()).await;
    let (client, _, token) = client(home.path());
    let fleet = hosts.fleet_yaml("trio");
    assert_eq!(
        harness::apply_fleet(&client, &fleet).await.unwrap().len(),
        3
    );
    let app = app();
    let yaml = format!(
        "type: service\nname: scaled\nport: 8124\nfleets: [trio]\nreplicas: 1..3\n\
         scaling:\n  metric: rps\n  target: 2\n  window: 30s\n  scale_up_delay: 1s\n  scale_down_delay: 2s\n\
         resources: {{cpu: 1.., memory: 0.1GB..}}\n\
         commands:\n  - python3 {} 8124\n",
        app.display()
    );
    let run = client
        .runs()
        .apply(
            parse(&yaml, "s.dstack.yml").unwrap(),
            ApplyOptions::default(),
        )
        .await
        .unwrap();
    let url = client.service(&run.run().await.unwrap()).unwrap().url;
    eventually(60, "the first replica to answer", async || {
        get(&url, &token).await.0 == 200
    })
    .await;
    let running = async || {
        run.jobs()
            .await
            .unwrap()
            .iter()
            .filter(|j| j.status == JobStatus::Running)
            .map(|j| j.instance_id.clone())
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(running().await.len(), 1, "replicas: 1..3 starts with one");

    // 140 requests within the 30 s window: 4.7 requests/s for a target of 2 → 3 replicas.
    for _ in 0..140 {
        assert_eq!(get(&url, &token).await.0, 200);
    }
    eventually(60, "three replicas on three hosts", async || {
        running().await.len() == 3
    })
    .await;
    let mut seen = BTreeSet::new();
    eventually(30, "requests to reach the three replicas", async || {
        let (status, body) = get(&url, &token).await;
        if status == 200 {
            seen.insert(pid(&body));
        }
        seen.len() == 3
    })
    .await;

    // No more load: once the requests leave the window, back to one replica.
    eventually(60, "one replica again", async || running().await.len() == 1).await;
    let jobs = run.jobs().await.unwrap();
    let scaled_down = jobs
        .iter()
        .filter(|j| j.termination_reason.as_deref() == Some("scaled_down"))
        .count();
    assert_eq!(scaled_down, 2, "{jobs:?}");
    assert_eq!(
        run.run().await.unwrap().status,
        dstack_core::model::RunStatus::Running
    );
    assert_eq!(get(&url, &token).await.0, 200);

    run.stop(false).await.unwrap();
    client.fleets().delete("trio", true).await.unwrap();
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_updated_service_rolls_over_to_new_replicas_without_a_failed_request() {
    let hosts = TestHosts::start(2);
    let home = tempfile::tempdir().unwrap();
    let _agent = LocalAgent(home.path().to_path_buf());
    harness::authorize_project(home.path(), &hosts);
    let server = start_server(home.path()).await;
    let (client, _, token) = client(home.path());
    let fleet = hosts.fleet_yaml("roll");
    assert_eq!(
        harness::apply_fleet(&client, &fleet).await.unwrap().len(),
        2
    );
    let app = app();
    let yaml = |version: u32| {
        format!(
            "type: service\nname: rolling\nport: 8125\nfleets: [roll]\n\
             resources: {{cpu: 1.., memory: 0.1GB..}}\nenv:\n  - VERSION={version}\n\
             probes:\n  - type: http\n    url: /health\n    interval: 1s\n\
             commands:\n  - sleep 1\n  - python3 {} 8125\n",
            app.display()
        )
    };
    let run = client
        .runs()
        .apply(
            parse(&yaml(1), "s.dstack.yml").unwrap(),
            ApplyOptions::default(),
        )
        .await
        .unwrap();
    let url = client.service(&run.run().await.unwrap()).unwrap().url;
    let version = async |url: &str| {
        let (status, body) = get(url, &token).await;
        let about: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        (status, about["version"].as_str().map(str::to_string))
    };
    eventually(60, "version 1 to answer", async || {
        version(&url).await == (200, Some("1".into()))
    })
    .await;

    // A bounded request loop runs through the update.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let looping = {
        let (url, token, stop) = (url.clone(), token.clone(), stop.clone());
        tokio::spawn(async move {
            let mut answers = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && answers.len() < 20_000 {
                answers.push(get(&url, &token).await.0);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            answers
        })
    };
    let updated = client
        .runs()
        .update(
            parse(&yaml(2), "s.dstack.yml").unwrap(),
            ApplyOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(updated.run().await.unwrap().deployment_num, 1);
    eventually(
        90,
        "version 2 alone to answer, the old replica gone",
        async || {
            let jobs = run.jobs().await.unwrap();
            let old_gone = jobs
                .iter()
                .filter(|j| j.deployment_num == 0)
                .all(|j| j.status.is_finished());
            old_gone && version(&url).await == (200, Some("2".into()))
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answers = looping.await.unwrap();
    let failed: Vec<&u16> = answers.iter().filter(|s| **s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        answers.len()
    );
    assert!(answers.len() > 20, "the loop ran through the update");
    let jobs = run.jobs().await.unwrap();
    let old = jobs.iter().find(|j| j.deployment_num == 0).unwrap();
    assert_eq!(old.termination_reason.as_deref(), Some("scaled_down"));
    assert_eq!(
        run.run().await.unwrap().status,
        dstack_core::model::RunStatus::Running
    );

    run.stop(false).await.unwrap();
    client.fleets().delete("roll", true).await.unwrap();
    server.abort();
}
