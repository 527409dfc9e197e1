//! `image:` jobs on the local backend through a real container engine: podman's Docker API
//! service, started by the test on its own socket, with a busybox image built locally (no
//! registry is reachable). Needs podman, runc and busybox-static (`.ci/run` installs them).

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::podman::{Podman, DIND_IMAGE, IMAGE};

use dstack_backends::local::{find_agent_binary, LocalBackend};
use dstack_core::config::parse;
use dstack_core::engine::{ApplyOptions, EngineOptions};
use dstack_core::model::{JobStatus, RunStatus};
use dstack_core::{Client, ClientOptions, RunHandle};
use futures_util::StreamExt;

async fn client(home: &Path, podman: &Podman) -> Client {
    let backend = LocalBackend::new(home, find_agent_binary().expect("dstack-agent is built"))
        .with_container_engine(format!("unix://{}", podman.socket.display()));
    let options = EngineOptions {
        stop_grace: Duration::from_secs(2),
        ..EngineOptions::default()
    };
    Client::open(ClientOptions {
        home: home.to_path_buf(),
        backends: vec![Arc::new(backend)],
        engine: options,
    })
    .await
    .unwrap()
}

async fn submit(client: &Client, yaml: &str) -> RunHandle {
    let config = parse(yaml, "task.dstack.yml").unwrap();
    client
        .runs()
        .apply(config, ApplyOptions::default())
        .await
        .unwrap()
}

async fn output(run: &RunHandle) -> String {
    let mut logs = run.logs(false);
    let mut out = Vec::new();
    while let Some(chunk) = logs.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Waits up to 30 s until the run's output holds `needle` (the container started).
async fn wait_output(run: &RunHandle, needle: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !output(run).await.contains(needle) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the container started"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn finished(run: &RunHandle) -> dstack_core::model::Run {
    tokio::time::timeout(Duration::from_secs(60), run.wait())
        .await
        .expect("the run finishes")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_jobs_run_in_containers_with_their_env_dir_mounts_and_exit_code() {
    let podman = Podman::start();
    let home = tempfile::tempdir().unwrap();
    let client = client(home.path(), &podman).await;
    let shared = tempfile::tempdir().unwrap();
    std::fs::write(shared.path().join("from-host"), "shared\n").unwrap();
    let yaml = format!(
        "type: task\nimage: {IMAGE}\nenv: [GREETING=hi]\nworking_dir: /work\n\
         volumes: [{}:/data]\nresources: {{cpu: 1.., memory: 0.1GB..}}\ncommands:\n  \
         - echo \"$GREETING in $(pwd) as $(id -u) run=$DSTACK_RUN_NAME\"\n  - cat /data/from-host\n  \
         - echo back > /data/from-container\n  - exit 3\n",
        shared.path().display()
    );
    let run = submit(&client, &yaml).await;
    let run_record = finished(&run).await;
    assert_eq!(run_record.status, RunStatus::Failed);
    let job = run.jobs().await.unwrap().pop().unwrap();
    assert_eq!(job.exit_status, Some(3));
    assert_eq!(
        job.termination_reason.as_deref(),
        Some("container_exited_with_error")
    );
    assert_eq!(
        output(&run).await,
        format!("hi in /work as 0 run={}\nshared\n", run.name())
    );
    let back = std::fs::read_to_string(shared.path().join("from-container")).unwrap();
    assert_eq!(back, "back\n", "an instance volume is shared both ways");
    let left = Command::new("podman")
        .args([
            "ps",
            "-a",
            "--filter",
            &format!("name=dstack-{}", job.id),
            "-q",
        ])
        .env(
            "CONTAINER_HOST",
            format!("unix://{}", podman.socket.display()),
        )
        .output()
        .unwrap();
    assert!(
        left.stdout.is_empty(),
        "the container is removed at the end"
    );

    // Stop: SIGTERM, then SIGKILL after the grace period.
    let sleeper = format!(
        "type: task\nimage: {IMAGE}\nresources: {{cpu: 1.., memory: 0.1GB..}}\ncommands: [echo up, sleep 300]\n"
    );
    let run = submit(&client, &sleeper).await;
    wait_output(&run, "up").await;
    // The job's reservation (1 CPU, 0.1 GB → 103 MiB) limits the container.
    let job = run.jobs().await.unwrap().pop().unwrap();
    let limits = Command::new("podman")
        .args([
            "inspect",
            "--format",
            "{{.HostConfig.NanoCpus}} {{.HostConfig.Memory}}",
        ])
        .arg(format!("dstack-{}", job.id))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&limits.stdout).trim(),
        format!("1000000000 {}", 103u64 << 20)
    );
    run.stop(false).await.unwrap();
    let stopped = finished(&run).await;
    assert_eq!(stopped.status, RunStatus::Terminated);
    assert_eq!(run.jobs().await.unwrap()[0].status, JobStatus::Terminated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_and_malformed_images_fail_with_a_clear_reason() {
    let podman = Podman::start();
    let home = tempfile::tempdir().unwrap();
    let client = client(home.path(), &podman).await;
    for image in ["localhost/no-such-image:1", "Not//A::Valid@Name"] {
        let yaml = format!(
            "type: task\nimage: '{image}'\nresources: {{cpu: 1.., memory: 0.1GB..}}\ncommands: ['true']\n"
        );
        let run = submit(&client, &yaml).await;
        let record = finished(&run).await;
        assert_eq!(record.status, RunStatus::Failed);
        let job = run.jobs().await.unwrap().pop().unwrap();
        assert_eq!(
            job.termination_reason.as_deref(),
            Some("creating_container_error")
        );
        let message = job.termination_message.unwrap_or_default();
        assert!(message.contains(image), "{message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_duration_stops_a_container() {
    let podman = Podman::start();
    let home = tempfile::tempdir().unwrap();
    let client = client(home.path(), &podman).await;
    let yaml = format!(
        "type: task\nimage: {IMAGE}\nmax_duration: 2s\nresources: {{cpu: 1.., memory: 0.1GB..}}\n\
         commands: [sleep 300]\n"
    );
    let run = submit(&client, &yaml).await;
    let record = finished(&run).await;
    assert_eq!(record.status, RunStatus::Failed, "as for processes");
    let job = run.jobs().await.unwrap().pop().unwrap();
    assert_eq!(job.status, JobStatus::Terminated);
    assert_eq!(
        job.termination_reason.as_deref(),
        Some("max_duration_exceeded")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_container_job_ends_on_sigterm_without_waiting_out_its_grace() {
    // dstack's default `stop_duration` is 5 minutes: the job's shell must get the SIGTERM (a
    // shell that is the container's PID 1 ignores it; the container's init hands it on).
    let podman = Podman::start();
    let home = tempfile::tempdir().unwrap();
    let client = client(home.path(), &podman).await;
    let yaml = format!(
        "type: task\nimage: {IMAGE}\nstop_duration: 5m\nresources: {{cpu: 1.., memory: 0.1GB..}}\n\
         commands: [sleep 300, echo never]\n"
    );
    let run = submit(&client, &yaml).await;
    while run.status().await.unwrap() != RunStatus::Running {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    run.stop(false).await.unwrap();
    let record = finished(&run).await;
    assert_eq!(record.status, RunStatus::Terminated, "{record:?}");
    let job = run.jobs().await.unwrap().pop().unwrap();
    assert_eq!(
        job.termination_reason.as_deref(),
        Some("terminated_by_user")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_of_a_container_job_is_reachable_from_the_client_side() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let podman = Podman::start();
    let home = tempfile::tempdir().unwrap();
    let client = client(home.path(), &podman).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let yaml = format!(
        "type: task\nimage: {IMAGE}\nports: [{port}]\nresources: {{cpu: 1.., memory: 0.1GB..}}\n\
         commands:\n  - echo served > /tmp/index.html\n  \
         - exec /bin/busybox httpd -f -p {port} -h /tmp\n"
    );
    let run = submit(&client, &yaml).await;
    let forward = loop {
        if run.status().await.unwrap() == RunStatus::Running {
            break run.forward_ports().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(forward.ports, vec![(port, port)]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut body = String::new();
    while !body.contains("served") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no answer on port {port}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Ok(mut conn) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
            continue;
        };
        let request = "GET /index.html HTTP/1.0\r\n\r\n";
        if conn.write_all(request.as_bytes()).await.is_ok() {
            body.clear();
            let _ = conn.read_to_string(&mut body).await;
        }
    }
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    run.stop(true).await.unwrap();
    assert_eq!(finished(&run).await.status, RunStatus::Terminated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_that_exit_at_once_finish_their_jobs() {
    let podman = Podman::start();
    let home = tempfile::tempdir().unwrap();
    let client = client(home.path(), &podman).await;
    let yaml = format!(
        "type: task\nimage: {IMAGE}\nresources: {{cpu: 1.., memory: 0.1GB..}}\ncommands: ['true']\n"
    );
    for _ in 0..8 {
        let run = submit(&client, &yaml).await;
        let record = tokio::time::timeout(Duration::from_secs(30), run.wait())
            .await
            .expect("a container that exits before its logs are followed still ends its job")
            .unwrap();
        assert_eq!(record.status, RunStatus::Done, "{:?}", run.jobs().await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_true_runs_the_dind_image_privileged_after_start_dockerd() {
    let podman = Podman::start();
    let home = tempfile::tempdir().unwrap();
    let client = client(home.path(), &podman).await;
    let yaml = "type: task\ndocker: true\nresources: {cpu: 1.., memory: 0.1GB..}\n\
                commands:\n  - test -f /tmp/dockerd.started\n  - cat /proc/self/status\n";
    let run = submit(&client, yaml).await;
    assert_eq!(
        finished(&run).await.status,
        RunStatus::Done,
        "{:?}",
        run.jobs().await
    );
    let out = output(&run).await;
    assert!(out.starts_with("dockerd started\n"), "{out}");
    // Privileged: every capability is effective (a default container has about a dozen).
    let effective = out
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
        .unwrap();
    assert!(effective.count_ones() >= 38, "CapEff {effective:x}");
    // The stand-in is what ran: its start-dockerd wrote the first line.
    assert!(Command::new("podman")
        .args(["image", "exists", DIND_IMAGE])
        .status()
        .unwrap()
        .success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_removes_the_containers_of_jobs_it_lost() {
    let podman = Podman::start();
    let home = tempfile::tempdir().unwrap();
    let client = client(home.path(), &podman).await;
    let yaml = format!(
        "type: task\nimage: {IMAGE}\nresources: {{cpu: 1.., memory: 0.1GB..}}\ncommands: [echo up, sleep 300]\n"
    );
    let run = submit(&client, &yaml).await;
    wait_output(&run, "up").await;
    let job = run.jobs().await.unwrap().pop().unwrap();
    let container = format!("dstack-{}", job.id);
    let pid = std::fs::read_to_string(home.path().join("agent/agent.pid")).unwrap();
    let killed = Command::new("kill")
        .args(["-9", pid.trim()])
        .status()
        .unwrap();
    assert!(killed.success());
    // The engine restarts the agent; the new agent reports the job lost and removes its
    // container.
    let record = finished(&run).await;
    assert_eq!(record.status, RunStatus::Failed);
    let job = run.jobs().await.unwrap().pop().unwrap();
    assert_eq!(job.termination_reason.as_deref(), Some("executor_error"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let exists = Command::new("podman")
            .args(["container", "exists", &container])
            .status()
            .unwrap();
        if !exists.success() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lost job's container {container} is still there"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
