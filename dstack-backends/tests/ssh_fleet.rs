//! SSH fleets against real sshd hosts in network namespaces (see `common/netns.rs`): apply,
//! list, run tasks spread over the hosts, delete; one bad host failing alone; a changed host
//! key refused. Jobs run for real on the namespace hosts through the uploaded agent.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::netns::TestHosts;
use common::{eventually, now};
use dstack_backends::local::{find_agent_binary, LocalBackend};
use dstack_backends::ssh::{Keepalive, KnownHosts, SshCompute};
use dstack_core::config::parse;
use dstack_core::engine::{ApplyOptions, EngineOptions};
use dstack_core::model::{Instance, InstanceStatus, JobStatus, RunStatus};
use dstack_core::{Client, ClientOptions};
use futures_util::StreamExt;

async fn client(home: &Path) -> Client {
    client_with(home, EngineOptions::default(), Keepalive::default()).await
}

/// A client that deploys `agent` to fleet hosts (and runs it locally).
async fn client_deploying(home: &Path, agent: std::path::PathBuf) -> Client {
    client_of(home, EngineOptions::default(), Keepalive::default(), agent).await
}

/// A client that gives up on unreachable hosts quickly (for the failure tests).
async fn impatient_client(home: &Path) -> Client {
    let options = EngineOptions {
        retry_delays: vec![Duration::from_millis(200)],
        unreachable_after: Duration::from_secs(2),
        ..EngineOptions::default()
    };
    let keepalive = Keepalive {
        interval: Duration::from_secs(1),
        max: 2,
    };
    client_with(home, options, keepalive).await
}

async fn client_with(home: &Path, engine: EngineOptions, keepalive: Keepalive) -> Client {
    let agent = find_agent_binary().expect("dstack-agent is built");
    client_of(home, engine, keepalive, agent).await
}

async fn client_of(
    home: &Path,
    engine: EngineOptions,
    keepalive: Keepalive,
    agent: std::path::PathBuf,
) -> Client {
    let ssh = SshCompute::new(KnownHosts::in_home(home), agent.clone()).with_keepalive(keepalive);
    let backends: Vec<Arc<dyn dstack_core::backend::Compute>> =
        vec![Arc::new(LocalBackend::new(home, agent)), Arc::new(ssh)];
    Client::open(ClientOptions {
        home: home.to_path_buf(),
        backends,
        engine,
    })
    .await
    .unwrap()
}

async fn submit(client: &Client, yaml: &str) -> dstack_core::RunHandle {
    let config = parse(yaml, "task.dstack.yml").unwrap();
    client
        .runs()
        .apply(config, ApplyOptions::default())
        .await
        .unwrap()
}

/// The address of the host a run's latest job was placed on.
fn host_of(run: &dstack_core::RunHandle, instances: &[Instance]) -> Option<String> {
    let job = now(run.jobs())
        .ok()?
        .into_iter()
        .max_by_key(|j| j.submission_num)?;
    let id = job.instance_id?;
    instances.iter().find(|i| i.id == id)?.address.clone()
}

/// Applies `yaml` and returns the live instances and every progress line.
async fn apply_fleet(client: &Client, yaml: &str) -> (Vec<Instance>, Vec<String>) {
    let (instances, lines) = common::harness::apply_fleet_with_progress(client, yaml).await;
    (instances.unwrap(), lines)
}

/// Applies `yaml`, which must bring no host up, and returns why (the first instance's
/// status message).
async fn refused(client: &Client, yaml: &str, fleet: &str) -> String {
    let (live, progress) = apply_fleet(client, yaml).await;
    assert!(live.is_empty(), "{progress:?}");
    all_instances(client, fleet)
        .into_iter()
        .find_map(|i| i.status_message)
        .unwrap_or_default()
}

fn all_instances(client: &Client, fleet: &str) -> Vec<Instance> {
    now(client.fleets().get(fleet))
        .unwrap()
        .map(|(_, i)| i)
        .unwrap_or_default()
}

async fn output(run: &dstack_core::RunHandle) -> String {
    let mut logs = run.logs(false);
    let mut out = Vec::new();
    while let Some(chunk) = logs.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_three_hosts_runs_six_tasks_spread_over_them_and_is_deleted() {
    let hosts = TestHosts::start(3);
    let home = tempfile::tempdir().unwrap();
    let client = client(home.path()).await;
    let fleet = format!("spread-{}", std::process::id());
    // Two blocks per host (each host has this machine's CPUs): two 1-block tasks per host.
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    assert!(
        cpus.is_multiple_of(2),
        "the spread test needs an even CPU count"
    );
    let yaml = format!(
        "{}blocks: 2\nenv: [FLEET_GREETING=hi from the fleet]\n",
        hosts.fleet_yaml(&fleet)
    );
    let (instances, progress) = apply_fleet(&client, &yaml).await;
    assert_eq!(instances.len(), 3, "{progress:?}");
    for host in &hosts.hosts {
        let instance = instances
            .iter()
            .find(|i| i.address.as_deref() == Some(host.addr.as_str()))
            .unwrap_or_else(|| panic!("no instance for {}: {progress:?}", host.addr));
        assert_eq!(instance.status, InstanceStatus::Idle);
        assert!(instance.host.cpus > 0 && instance.host.memory_bytes > 0);
        assert_eq!(instance.blocks, Some(2));
        assert!(progress.contains(&format!("{}: ready", instance.name)));
    }
    let dirs: Vec<String> = instances
        .iter()
        .map(|i| i.backend_data["dir"].as_str().unwrap().to_string())
        .collect();
    for dir in &dirs {
        assert!(Path::new(dir).join("dstack-agent").is_file(), "{dir}");
    }
    // Host keys were recorded on first use, privately.
    let known = std::fs::read_to_string(home.path().join("ssh/known_hosts")).unwrap();
    assert_eq!(known.lines().filter(|l| !l.is_empty()).count(), 3);

    let task = format!(
        "type: task\nfleets: [{fleet}]\nresources: {{cpu: 1.., memory: 0.1GB..}}\ncommands:\n  \
         - sleep 2\n  - ip -brief addr | awk '/^v/ {{print $3}}' | cut -d/ -f1\n  - pwd\n  \
         - echo $FLEET_GREETING\n"
    );
    let mut runs = Vec::new();
    for _ in 0..6 {
        let config = parse(&task, "task.dstack.yml").unwrap();
        runs.push(
            client
                .runs()
                .apply(config, ApplyOptions::default())
                .await
                .unwrap(),
        );
    }
    let mut per_host: BTreeMap<String, usize> = BTreeMap::new();
    for run in &runs {
        let Ok(finished) = tokio::time::timeout(Duration::from_secs(60), run.wait()).await else {
            panic!(
                "run {} unfinished: {:?}; jobs {:?}",
                run.name(),
                run.run().await.unwrap(),
                run.jobs().await.unwrap()
            );
        };
        let finished = finished.unwrap();
        assert_eq!(finished.status, RunStatus::Done, "{}", output(run).await);
        let out = output(run).await;
        let mut lines = out.lines();
        let addr = lines.next().unwrap_or_default().to_string();
        assert_eq!(
            lines.next(),
            Some("/root"),
            "jobs start in the login user's home"
        );
        let job = run.jobs().await.unwrap().pop().unwrap();
        let instance = instances
            .iter()
            .find(|i| Some(&i.id) == job.instance_id.as_ref())
            .unwrap();
        assert_eq!(
            instance.address.as_deref(),
            Some(addr.as_str()),
            "ran where recorded"
        );
        *per_host.entry(addr).or_default() += 1;
    }
    assert_eq!(per_host.len(), 3, "spread over every host: {per_host:?}");
    assert!(per_host.values().all(|n| *n == 2), "{per_host:?}");

    let (deleted, results) = client.fleets().delete(&fleet, false).await.unwrap();
    assert_eq!(deleted.name, fleet);
    assert!(results.iter().all(|(_, e)| e.is_none()), "{results:?}");
    for dir in &dirs {
        assert!(!Path::new(dir).exists(), "{dir} removed");
    }
    assert!(all_instances(&client, &fleet)
        .iter()
        .all(|i| i.status == InstanceStatus::Terminated));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_host_fails_alone_with_a_clear_reason() {
    let hosts = TestHosts::start(4);
    hosts.hosts[1].stop_sshd();
    let home = tempfile::tempdir().unwrap();
    let client = client(home.path()).await;
    let fleet = format!("mixed-{}", std::process::id());
    hosts.track(&fleet);
    // An address in the test range that no host has: there is no route to it.
    let nowhere = "10.231.255.254";
    let yaml = format!(
        "type: fleet\nname: {fleet}\nssh_config:\n  user: root\n  identity_file: {key}\n  hosts:\n    \
         - {good}\n    - {down}\n    - hostname: {wrong}\n      identity_file: {wrong_key}\n    \
         - hostname: {stranger}\n      user: nobody-here\n    - {nowhere}\n",
        key = hosts.key.display(),
        good = hosts.hosts[0].addr,
        down = hosts.hosts[1].addr,
        wrong = hosts.hosts[2].addr,
        wrong_key = hosts.wrong_key.display(),
        stranger = hosts.hosts[3].addr,
    );
    let started = std::time::Instant::now();
    let (live, progress) = apply_fleet(&client, &yaml).await;
    assert!(started.elapsed() < Duration::from_secs(15), "never a hang");
    assert_eq!(live.len(), 1, "{progress:?}");
    assert_eq!(
        live[0].address.as_deref(),
        Some(hosts.hosts[0].addr.as_str())
    );
    let all = all_instances(&client, &fleet);
    let reason = |addr: &str| {
        all.iter()
            .find(|i| i.address.as_deref() == Some(addr))
            .and_then(|i| i.status_message.clone())
            .unwrap_or_default()
    };
    let down = reason(&hosts.hosts[1].addr);
    assert!(down.contains("cannot connect"), "{down}");
    let by_host = |host: &str| {
        all.iter()
            .filter(|i| i.backend_data["hostname"] == host)
            .filter_map(|i| i.status_message.clone())
            .collect::<Vec<_>>()
            .join(" | ")
    };
    let wrong = by_host(&hosts.hosts[2].addr);
    assert!(
        wrong.contains("authentication failed") && wrong.contains("wrong_key"),
        "{wrong}"
    );
    let stranger = by_host(&hosts.hosts[3].addr);
    assert!(stranger.contains("for user nobody-here"), "{stranger}");
    let nowhere = reason(nowhere);
    assert!(nowhere.contains("cannot connect"), "{nowhere}");
    client.fleets().delete(&fleet, false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_host_key_is_refused() {
    let hosts = TestHosts::start(1);
    let home = tempfile::tempdir().unwrap();
    let client = client(home.path()).await;
    let fleet = format!("rekeyed-{}", std::process::id());
    let yaml = hosts.fleet_yaml(&fleet);
    let (live, progress) = apply_fleet(&client, &yaml).await;
    assert_eq!(live.len(), 1, "{progress:?}");
    client.fleets().delete(&fleet, false).await.unwrap();

    hosts.hosts[0].change_host_key();
    let message = refused(&client, &yaml, &fleet).await;
    assert!(message.contains("host key has changed"), "{message}");
    assert!(
        message.contains("known_hosts"),
        "says which file to fix: {message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_hosts_agent_of_another_build_is_replaced_when_an_upgraded_engine_connects() {
    let hosts = TestHosts::start(1);
    let home = tempfile::tempdir().unwrap();
    let fleet = format!("rebuilt-{}", std::process::id());
    let build_on = async |client: &Client, instance: &Instance| {
        let agent = client.engine().unwrap().agent(&instance.id).await.unwrap();
        agent.healthcheck().await.unwrap().build
    };
    let first = {
        let client = client(home.path()).await;
        let (live, progress) = apply_fleet(&client, &hosts.fleet_yaml(&fleet)).await;
        assert_eq!(live.len(), 1, "{progress:?}");
        build_on(&client, &live[0]).await
    }; // that engine stops with its client; the host's agent keeps running
       // An upgrade: the same program with bytes appended, so its build stamp differs.
    let mut bytes = std::fs::read(find_agent_binary().unwrap()).unwrap();
    bytes.extend_from_slice(b"\0another build of dstack-agent\0");
    let newer = home.path().join("dstack-agent-newer");
    std::fs::write(&newer, &bytes).unwrap();
    std::fs::set_permissions(&newer, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let stamp = dstack_core::agent::build_stamp(&bytes[..]).unwrap();
    assert_ne!(first, stamp);

    let client = client_deploying(home.path(), newer).await;
    let instance = all_instances(&client, &fleet).pop().unwrap();
    eventually(60, "the host runs the new build", async || {
        // Unanswered while the agent is being replaced.
        let Ok(agent) = client.engine().unwrap().agent(&instance.id).await else {
            return false;
        };
        agent.healthcheck().await.is_ok_and(|h| h.build == stamp)
    })
    .await;
    let run = submit(
        &client,
        &format!("type: task\nfleets: [{fleet}]\ncommands: [echo on-the-new-build]\n"),
    )
    .await;
    assert_eq!(run.wait().await.unwrap().status, RunStatus::Done);
    assert_eq!(output(&run).await, "on-the-new-build\n");
    client.fleets().delete(&fleet, false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_key_of_another_algorithm_than_the_pinned_one_is_refused() {
    let hosts = TestHosts::start(1);
    let home = tempfile::tempdir().unwrap();
    let client = client(home.path()).await;
    let fleet = format!("realgo-{}", std::process::id());
    let yaml = hosts.fleet_yaml(&fleet);
    let (live, progress) = apply_fleet(&client, &yaml).await;
    assert_eq!(live.len(), 1, "{progress:?}");
    client.fleets().delete(&fleet, false).await.unwrap();
    let known_hosts = KnownHosts::in_home(home.path());
    let pinned = std::fs::read_to_string(known_hosts.path()).unwrap();

    // The host now presents only an RSA key: nothing of that algorithm is on record, yet the
    // host is known, so the key is refused and not recorded beside the pinned one.
    hosts.hosts[0].set_host_keys(&["rsa"]);
    let message = refused(&client, &yaml, &fleet).await;
    assert!(message.contains("host key has changed"), "{message}");
    assert_eq!(std::fs::read_to_string(known_hosts.path()).unwrap(), pinned);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_pinned_up_front_is_the_one_a_host_with_several_keys_presents() {
    let hosts = TestHosts::start(1);
    let host = &hosts.hosts[0];
    host.set_host_keys(&["ed25519", "rsa"]);
    let home = tempfile::tempdir().unwrap();
    let known_hosts = KnownHosts::in_home(home.path());
    // Pinned out of band: the RSA key, though a client prefers ed25519 when it knows nothing.
    let rsa = russh::keys::PublicKey::from_openssh(&host.host_public_key("rsa")).unwrap();
    known_hosts.pin(&host.addr, 22, &rsa).unwrap();
    let pinned = std::fs::read_to_string(known_hosts.path()).unwrap();
    assert_eq!(pinned.lines().count(), 1);

    let client = client(home.path()).await;
    let fleet = format!("pinned-{}", std::process::id());
    let (live, progress) = apply_fleet(&client, &hosts.fleet_yaml(&fleet)).await;
    assert_eq!(live.len(), 1, "{progress:?}");
    assert_eq!(
        std::fs::read_to_string(known_hosts.path()).unwrap(),
        pinned,
        "nothing learned beside the pinned key"
    );
    client.fleets().delete(&fleet, false).await.unwrap();
}

/// Whether a process whose command line contains `pattern` runs on this machine (the
/// namespace hosts share its process table).
fn running(pattern: &str) -> bool {
    std::process::Command::new("pgrep")
        .args(["-f", pattern])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_fleet_stops_its_jobs_first_and_kills_no_other_process() {
    let hosts = TestHosts::start(1);
    let home = tempfile::tempdir().unwrap();
    let client = client(home.path()).await;
    let fleet = format!("cleanup-{}", std::process::id());
    let (instances, progress) = apply_fleet(&client, &hosts.fleet_yaml(&fleet)).await;
    assert_eq!(instances.len(), 1, "{progress:?}");
    let job = format!("sleep {}.7", 4000 + std::process::id() % 1000);
    let _run = submit(
        &client,
        &format!("type: task\nfleets: [{fleet}]\ncommands: [\"{job}\"]\n"),
    )
    .await;
    eventually(30, "the job runs", async || running(&job)).await;

    // A stale pid file: it names an unrelated process, which must survive the delete.
    let mut bystander = std::process::Command::new("sleep")
        .arg("4999.3")
        .spawn()
        .unwrap();
    let dir = instances[0].backend_data["dir"]
        .as_str()
        .unwrap()
        .to_string();
    let pid_file = Path::new(&dir).join("agent/agent.pid");
    let agent_pid = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_string();
    std::fs::write(&pid_file, bystander.id().to_string()).unwrap();

    client.fleets().delete(&fleet, true).await.unwrap();
    assert!(!running(&job), "the job was stopped before its agent went");
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "the process named by the stale pid file was killed"
    );
    assert!(!Path::new(&dir).exists());
    let agent_alive = || {
        std::fs::read_to_string(format!("/proc/{agent_pid}/stat"))
            .is_ok_and(|stat| !stat.contains(") Z "))
    };
    eventually(10, "the agent exits", async || !agent_alive()).await;
    bystander.kill().unwrap();
    bystander.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_state_directories_deploying_the_same_fleet_name_to_one_host_stay_apart() {
    let hosts = TestHosts::start(1);
    let (home_a, home_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (client(home_a.path()).await, client(home_b.path()).await);
    let fleet = format!("shared-{}", std::process::id());
    let yaml = hosts.fleet_yaml(&fleet);
    let (ours, progress) = apply_fleet(&a, &yaml).await;
    assert_eq!(ours.len(), 1, "{progress:?}");
    let (theirs, progress) = apply_fleet(&b, &yaml).await;
    assert_eq!(theirs.len(), 1, "{progress:?}");
    assert_ne!(ours[0].backend_data["dir"], theirs[0].backend_data["dir"]);
    // A fleet host is the user's own machine: its agent holds no owner lease (it never
    // shuts the host down).
    let agent = a.engine().unwrap().agent(&ours[0].id).await.unwrap();
    assert_eq!(agent.lease().await.unwrap().terms, None);
    // A host without GPUs is shared, and said so.
    let ours_socket = format!(
        "{}/agent.sock",
        ours[0].backend_data["dir"].as_str().unwrap()
    );
    let note = theirs[0].status_message.clone().unwrap_or_default();
    assert!(
        note.contains("another dstack-agent") && note.contains(&ours_socket),
        "{note}"
    );

    let job = format!("sleep {}.9", 5000 + std::process::id() % 1000);
    let _run = submit(
        &b,
        &format!("type: task\nfleets: [{fleet}]\ncommands: [\"{job}\"]\n"),
    )
    .await;
    eventually(30, "their job runs", async || running(&job)).await;
    // Deleting our fleet leaves theirs, and its job, alone.
    a.fleets().delete(&fleet, true).await.unwrap();
    assert!(running(&job), "the other state's job was stopped");
    let dir = theirs[0].backend_data["dir"].as_str().unwrap();
    assert!(Path::new(dir).join("dstack-agent").is_file());
    b.fleets().delete(&fleet, true).await.unwrap();
    assert!(!running(&job));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_agent_fails_its_job_which_retries_on_another_host_and_the_host_comes_back() {
    let hosts = TestHosts::start(3);
    let home = tempfile::tempdir().unwrap();
    let client = impatient_client(home.path()).await;
    let fleet = format!("lossy-{}", std::process::id());
    let (instances, progress) = apply_fleet(&client, &hosts.fleet_yaml(&fleet)).await;
    assert_eq!(instances.len(), 3, "{progress:?}");
    let small = "resources: {cpu: 1.., memory: 0.1GB..}";
    // A whole host (every host has the CPUs of this machine), so the steady run goes elsewhere.
    let whole = format!(
        "resources: {{cpu: {}.., memory: 0.1GB..}}",
        instances[0].host.cpus
    );
    let marker = home.path().join("first-try");
    let addr = "ip -brief addr | awk '/^v/ {print $3}' | cut -d/ -f1";
    // The first submission waits; a retry prints where it ran and ends.
    let flaky = format!(
        "type: task\nfleets: [{fleet}]\n{whole}\nretry: {{on_events: [error], duration: 1m}}\n\
         commands:\n  - if [ -e {m} ]; then echo retried on $({addr}); else touch {m}; sleep 60; fi\n",
        m = marker.display()
    );
    let steady = format!("type: task\nfleets: [{fleet}]\n{small}\ncommands: [sleep 4]\n");

    let flaky = submit(&client, &flaky).await;
    eventually(20, "the flaky run is running", async || marker.exists()).await;
    let lost_addr = host_of(&flaky, &instances).unwrap();
    let steady = submit(&client, &steady).await;
    eventually(20, "the steady run is running", async || {
        steady.status().await.unwrap() == RunStatus::Running
    })
    .await;
    let steady_addr = host_of(&steady, &instances).unwrap();

    let lost = hosts.hosts.iter().find(|h| h.addr == lost_addr).unwrap();
    lost.kill("dstack-agent serve");
    let finished = tokio::time::timeout(Duration::from_secs(60), flaky.wait())
        .await
        .expect("the retry finishes")
        .unwrap();
    assert_eq!(
        finished.status,
        RunStatus::Done,
        "{:?}",
        flaky.jobs().await.unwrap()
    );
    let jobs = flaky.jobs().await.unwrap();
    let first = jobs.iter().find(|j| j.submission_num == 0).unwrap();
    assert_eq!(first.status, JobStatus::Failed);
    assert_eq!(
        first.termination_reason.as_deref(),
        Some("instance_unreachable")
    );
    let out = output(&flaky).await;
    let retried_on = out
        .trim()
        .strip_prefix("retried on ")
        .unwrap_or_default()
        .to_string();
    assert!(!retried_on.is_empty() && retried_on != lost_addr, "{out}");

    let steady_done = tokio::time::timeout(Duration::from_secs(30), steady.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        steady_done.status,
        RunStatus::Done,
        "undisturbed on {steady_addr}"
    );

    // The host is redeployed and usable again; it was never terminated.
    let lost_id = instances
        .iter()
        .find(|i| i.address.as_deref() == Some(lost_addr.as_str()))
        .unwrap()
        .id
        .clone();
    eventually(30, "the host is reachable again", async || {
        client
            .engine()
            .unwrap()
            .store()
            .instance(&lost_id)
            .unwrap()
            .is_some_and(|i| !i.unreachable && i.status == InstanceStatus::Idle)
    })
    .await;
    client.fleets().delete(&fleet, true).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_fails_the_job_and_the_host_returns_when_the_link_does() {
    let hosts = TestHosts::start(1);
    let home = tempfile::tempdir().unwrap();
    let client = impatient_client(home.path()).await;
    let fleet = format!("cut-{}", std::process::id());
    let (instances, progress) = apply_fleet(&client, &hosts.fleet_yaml(&fleet)).await;
    assert_eq!(instances.len(), 1, "{progress:?}");
    let task = format!(
        "type: task\nfleets: [{fleet}]\nresources: {{cpu: 1.., memory: 0.1GB..}}\ncommands: [sleep 120]\n"
    );
    let run = client
        .runs()
        .apply(parse(&task, "t.yml").unwrap(), ApplyOptions::default())
        .await
        .unwrap();
    eventually(20, "the run is running", async || {
        run.status().await.unwrap() == RunStatus::Running
    })
    .await;
    hosts.hosts[0].set_link(false);
    let failed = tokio::time::timeout(Duration::from_secs(60), run.wait())
        .await
        .expect("the job is given up within the documented bound")
        .unwrap();
    assert_eq!(failed.status, RunStatus::Failed);
    let job = run.jobs().await.unwrap().pop().unwrap();
    assert_eq!(
        job.termination_reason.as_deref(),
        Some("instance_unreachable")
    );
    let id = instances[0].id.clone();
    assert!(
        client
            .engine()
            .unwrap()
            .store()
            .instance(&id)
            .unwrap()
            .unwrap()
            .unreachable
    );

    hosts.hosts[0].set_link(true);
    eventually(60, "the host is reachable again", async || {
        client
            .engine()
            .unwrap()
            .store()
            .instance(&id)
            .unwrap()
            .is_some_and(|i| !i.unreachable && i.status == InstanceStatus::Idle)
    })
    .await;
    // The job given up on was stopped on the host, and the host takes new work.
    let quick = format!(
        "type: task\nfleets: [{fleet}]\nresources: {{cpu: 1.., memory: 0.1GB..}}\ncommands: [echo back]\n"
    );
    let again = client
        .runs()
        .apply(parse(&quick, "t.yml").unwrap(), ApplyOptions::default())
        .await
        .unwrap();
    let done = tokio::time::timeout(Duration::from_secs(30), again.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.status, RunStatus::Done);
    assert_eq!(output(&again).await, "back\n");
    client.fleets().delete(&fleet, true).await.unwrap();
}

/// The output of one job, read from its agent.
async fn job_output(client: &Client, job: &dstack_core::model::Job) -> String {
    let agent = client
        .engine()
        .unwrap()
        .agent(job.instance_id.as_deref().unwrap())
        .await
        .unwrap();
    let mut logs = agent.logs(&job.id, 0, false).await.unwrap();
    let mut out = Vec::new();
    while let Some(chunk) = logs.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_order_starts_the_master_or_the_workers_first() {
    let hosts = TestHosts::start(2);
    let home = tempfile::tempdir().unwrap();
    let client = client(home.path()).await;
    let fleet = format!("ordered-{}", std::process::id());
    let yaml = format!("{}placement: cluster\n", hosts.fleet_yaml(&fleet));
    let (instances, progress) = apply_fleet(&client, &yaml).await;
    assert_eq!(instances.len(), 2, "{progress:?}");
    // The agents' spawn times of the two nodes (one clock: the hosts share this machine's).
    let starts = |order: &'static str| {
        let client = &client;
        let fleet = &fleet;
        async move {
            let task = format!(
                "type: task\nnodes: 2\nfleets: [{fleet}]\nstartup_order: {order}\n\
                 resources: {{cpu: 1.., memory: 0.1GB..}}\ncommands: [sleep 1]\n"
            );
            let run = submit(client, &task).await;
            let done = tokio::time::timeout(Duration::from_secs(60), run.wait())
                .await
                .unwrap()
                .unwrap();
            let mut jobs = run.jobs().await.unwrap();
            assert_eq!(done.status, RunStatus::Done, "{jobs:?}");
            jobs.sort_by_key(|j| j.job_num);
            (
                jobs[0].started_at_ms.unwrap(),
                jobs[1].started_at_ms.unwrap(),
            )
        }
    };
    // Each order holds, so the one that is not the natural order of the starts too.
    let (master, worker) = starts("master-first").await;
    assert!(
        worker > master,
        "the worker started at {worker}, the master at {master}"
    );
    let (master, worker) = starts("workers-first").await;
    assert!(
        master > worker,
        "the master started at {master}, the worker at {worker}"
    );
    client.fleets().delete(&fleet, true).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_task_sees_consistent_ranks_and_a_failing_node_stops_the_rest() {
    let hosts = TestHosts::start(3);
    let home = tempfile::tempdir().unwrap();
    let client = client(home.path()).await;
    let fleet = format!("cluster-{}", std::process::id());
    let yaml = format!("{}placement: cluster\n", hosts.fleet_yaml(&fleet));
    let (instances, progress) = apply_fleet(&client, &yaml).await;
    assert_eq!(instances.len(), 3, "{progress:?}");
    let head = format!(
        "type: task\nnodes: 3\nfleets: [{fleet}]\nresources: {{cpu: 1.., memory: 0.1GB..}}\n"
    );
    let report = "echo \"rank=$DSTACK_NODE_RANK nodes=$DSTACK_NODES_NUM \
                  master=$DSTACK_MASTER_NODE_IP ips=$(echo \"$DSTACK_NODES_IPS\" | paste -sd, -) \
                  me=$(ip -brief addr | awk '/^v/ {print $3}' | cut -d/ -f1) \
                  hosts=$(tr ' ' _ < \"$DSTACK_MPI_HOSTFILE\" | paste -sd, -)\"";
    let run = submit(&client, &format!("{head}commands:\n  - {report}\n")).await;
    let done = tokio::time::timeout(Duration::from_secs(60), run.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        done.status,
        RunStatus::Done,
        "{:?}",
        run.jobs().await.unwrap()
    );
    let mut jobs = run.jobs().await.unwrap();
    jobs.sort_by_key(|j| j.job_num);
    assert_eq!(jobs.len(), 3);
    let mut reports = Vec::new();
    for job in &jobs {
        let out = job_output(&client, job).await;
        let fields: BTreeMap<String, String> = out
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(fields["rank"], job.job_num.to_string(), "{out}");
        assert_eq!(fields["nodes"], "3");
        reports.push(fields);
    }
    let ips: Vec<String> = reports.iter().map(|r| r["me"].clone()).collect();
    let distinct: std::collections::BTreeSet<&String> = ips.iter().collect();
    assert_eq!(distinct.len(), 3, "one node per host: {ips:?}");
    for r in &reports {
        assert_eq!(r["master"], ips[0], "rank 0 is the master");
        assert_eq!(
            r["ips"],
            ips.join(","),
            "every node sees the same list, in rank order"
        );
        let hostfile: Vec<String> = ips.iter().map(|ip| format!("{ip}_slots=1")).collect();
        assert_eq!(
            r["hosts"],
            hostfile.join(","),
            "the MPI hostfile lists every node"
        );
    }

    // One node fails: the others are stopped and the run fails.
    let failing = format!(
        "{head}commands:\n  - if [ \"$DSTACK_NODE_RANK\" = 1 ]; then sleep 1; exit 3; fi; sleep 60\n"
    );
    let run = submit(&client, &failing).await;
    let failed = tokio::time::timeout(Duration::from_secs(30), run.wait())
        .await
        .expect("the other nodes are stopped at once")
        .unwrap();
    assert_eq!(failed.status, RunStatus::Failed);
    let jobs = run.jobs().await.unwrap();
    assert!(jobs.iter().all(|j| j.status.is_finished()), "{jobs:?}");
    let rank1 = jobs.iter().find(|j| j.job_num == 1).unwrap();
    assert_eq!(rank1.exit_status, Some(3));
    for other in jobs.iter().filter(|j| j.job_num != 1) {
        assert_ne!(other.status, JobStatus::Done, "{other:?}");
    }

    // More nodes than hosts: fails at once, saying why.
    let too_many = format!(
        "type: task\nnodes: 4\nfleets: [{fleet}]\nresources: {{cpu: 1.., memory: 0.1GB..}}\ncommands: ['true']\n"
    );
    let run = submit(&client, &too_many).await;
    let failed = tokio::time::timeout(Duration::from_secs(10), run.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(failed.status, RunStatus::Failed);
    let message = run.jobs().await.unwrap()[0]
        .termination_message
        .clone()
        .unwrap_or_default();
    assert!(message.contains("placement: cluster"), "{message}");
    client.fleets().delete(&fleet, true).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_of_a_job_on_a_fleet_host_are_forwarded_to_localhost_while_attached() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hosts = TestHosts::start(1);
    let home = tempfile::tempdir().unwrap();
    let client = client(home.path()).await;
    let fleet = format!("ports-{}", std::process::id());
    let (instances, progress) = apply_fleet(&client, &hosts.fleet_yaml(&fleet)).await;
    assert_eq!(instances.len(), 1, "{progress:?}");
    // A free port here; the job listens on it on the host's loopback only.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let task = format!(
        "type: task\nfleets: [{fleet}]\nports: [{port}]\nresources: {{cpu: 1.., memory: 0.1GB..}}\n\
         commands:\n  - echo forwarded > index.html\n  \
         - exec python3 -m http.server {port} --bind 127.0.0.1\nworking_dir: {}\n",
        home.path().display()
    );
    let run = submit(&client, &task).await;
    eventually(20, "the run is running", async || {
        run.status().await.unwrap() == RunStatus::Running
    })
    .await;
    let forward = run.forward_ports().await.unwrap();
    assert_eq!(forward.ports, vec![(port, port)]);
    let mut body = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        // The server may still be starting: retry until it answers.
        if let Ok(mut conn) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            let request = "GET /index.html HTTP/1.0\r\nHost: localhost\r\n\r\n";
            conn.write_all(request.as_bytes()).await.unwrap();
            body.clear();
            let _ = conn.read_to_string(&mut body).await;
            if body.contains("forwarded") {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no answer through the forward: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(body.starts_with("HTTP/1.0 200"), "{body}");
    drop(forward);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "forwarding stops with its guard"
    );
    run.stop(true).await.unwrap();
    client.fleets().delete(&fleet, true).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_disk_space_for_the_agent_is_a_clear_per_host_error() {
    let hosts = TestHosts::start(1);
    let home = tempfile::tempdir().unwrap();
    let client = client(home.path()).await;
    let fleet = format!("nodisk-{}", std::process::id());
    // The agent directories on the host are on a 1 MB file system (mounted in the host's own
    // mount namespace only): the upload fails.
    let home_dir = std::env::var("HOME").unwrap();
    let dir = format!("{home_dir}/.dstack-rs");
    let host = &hosts.hosts[0];
    host.run_inside(&format!(
        "mkdir -p {dir} && mount -t tmpfs -o size=1m tmpfs {dir}"
    ));
    let message = refused(&client, &hosts.fleet_yaml(&fleet), &fleet).await;
    assert!(message.contains("No space left on device"), "{message}");
    let left = host.run_inside(&format!("find {dir} -type f"));
    host.run_inside(&format!("umount {dir}"));
    assert_eq!(left.trim(), "", "no half-written agent is left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_jobs_run_in_containers_on_a_fleet_host_whose_agent_has_an_engine() {
    let podman = common::podman::Podman::start();
    let hosts = TestHosts::start(1);
    let home = tempfile::tempdir().unwrap();
    let client = client(home.path()).await;
    let fleet = format!("boxes-{}", std::process::id());
    // The fleet's env reaches the host's agent: it finds its container engine there.
    let yaml = format!(
        "{}env: [DOCKER_HOST=unix://{}]\n",
        hosts.fleet_yaml(&fleet),
        podman.socket.display()
    );
    let (instances, progress) = apply_fleet(&client, &yaml).await;
    assert_eq!(instances.len(), 1, "{progress:?}");
    assert!(
        instances[0].containers,
        "the host's agent reports its engine"
    );
    let task = format!(
        "type: task\nfleets: [{fleet}]\nimage: {}\nresources: {{cpu: 1.., memory: 0.1GB..}}\n\
         commands: ['echo in a container on $DSTACK_NODES_IPS']\n",
        common::podman::IMAGE
    );
    let run = submit(&client, &task).await;
    let done = tokio::time::timeout(Duration::from_secs(60), run.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        done.status,
        RunStatus::Done,
        "{:?}",
        run.jobs().await.unwrap()
    );
    assert_eq!(
        output(&run).await,
        format!("in a container on {}\n", hosts.hosts[0].addr)
    );
    let job = run.jobs().await.unwrap().pop().unwrap();
    assert_eq!(job.instance_id.as_deref(), Some(instances[0].id.as_str()));
    client.fleets().delete(&fleet, true).await.unwrap();
}
