//! The engine and the local backend end to end: real agent, real processes, real SQLite.
//! The agent binary comes from the workspace build (`cargo build` builds it; `cargo test
//! --workspace` too).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

mod common;

use common::{eventually, now};
use dstack_backends::local::LocalBackend;
use dstack_core::config::{parse, Configuration};
use dstack_core::engine::{ApplyOptions, EngineOptions};
use dstack_core::model::{JobStatus, RunStatus};
use dstack_core::{Client, ClientOptions, RunHandle};
use futures_util::StreamExt;

/// A temporary `$DSTACK_HOME` whose agent is stopped when the test ends.
struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    fn new() -> Self {
        Home {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn agent_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.path().join("agent/agent.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Kills (SIGKILL) the home's agent.
    fn kill_agent(&self) {
        let pid = self.agent_pid().expect("agent pid");
        std::process::Command::new("kill")
            .arg("-9")
            .arg(pid.to_string())
            .status()
            .unwrap();
    }

    async fn client(&self) -> Client {
        self.client_with(LocalBackend::new(self.path(), agent_binary()))
            .await
    }

    /// The engine options of the tests: short retry delays and stop grace.
    fn options() -> EngineOptions {
        EngineOptions {
            retry_delays: vec![Duration::from_millis(200)],
            stop_grace: Duration::from_secs(2),
            ..EngineOptions::default()
        }
    }

    async fn client_with(&self, backend: LocalBackend) -> Client {
        self.client_with_backend_and_options(backend, Home::options())
            .await
    }

    /// A client whose engine runs its periodic pass every `period` (an hour: in effect, only
    /// events place jobs).
    async fn client_with_sweep_period(&self, period: Duration) -> Client {
        let backend = LocalBackend::new(self.path(), agent_binary());
        let options = EngineOptions {
            sweep_period: period,
            ..Home::options()
        };
        self.client_with_backend_and_options(backend, options).await
    }

    async fn client_with_backend_and_options(
        &self,
        backend: LocalBackend,
        options: EngineOptions,
    ) -> Client {
        Client::open(ClientOptions {
            home: self.path().to_path_buf(),
            backends: vec![Arc::new(backend)],
            engine: options,
        })
        .await
        .unwrap()
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        if let Some(pid) = self.agent_pid() {
            let _ = std::process::Command::new("kill")
                .arg("-9")
                .arg(pid.to_string())
                .status();
        }
    }
}

fn agent_binary() -> PathBuf {
    let bin = dstack_backends::local::find_agent_binary().expect("dstack-agent is built");
    assert!(
        bin.is_file(),
        "build the agent first: cargo build -p dstack-agent"
    );
    bin
}

fn opts(dir: &Path) -> ApplyOptions {
    let mut env = BTreeMap::new();
    env.insert(
        "PATH".to_string(),
        std::env::var("PATH").unwrap_or_default(),
    );
    ApplyOptions {
        client_dir: Some(dir.display().to_string()),
        client_env: Some(env),
        ..ApplyOptions::default()
    }
}

async fn apply(client: &Client, yaml: &str, dir: &Path) -> RunHandle {
    let config = parse(yaml, "test.dstack.yml").unwrap_or_else(|e| panic!("{e}"));
    client.runs().apply(config, opts(dir)).await.unwrap()
}

async fn finish(run: &RunHandle) -> dstack_core::model::Run {
    tokio::time::timeout(Duration::from_secs(60), run.wait())
        .await
        .expect("run finishes")
        .unwrap()
}

/// Waits (up to 30 s) until the run is running.
async fn wait_running(run: &RunHandle) {
    tokio::time::timeout(
        Duration::from_secs(30),
        run.wait_until(|s| s == RunStatus::Running),
    )
    .await
    .expect("the run starts")
    .unwrap();
}

/// Waits (up to 30 s) until the run's output satisfies `done`.
async fn wait_logs(run: &RunHandle, done: impl Fn(&str) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let logs = all_logs(run).await;
        if done(&logs) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "output never arrived: {logs:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for the run and asserts it is done, showing its jobs when it is not.
async fn assert_done(run: &RunHandle) {
    let r = finish(run).await;
    assert_eq!(
        r.status,
        RunStatus::Done,
        "{r:?}\n{:?}",
        run.jobs().await.unwrap()
    );
}

async fn all_logs(run: &RunHandle) -> String {
    let mut out = Vec::new();
    let mut logs = run.logs(false);
    while let Some(chunk) = logs.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    String::from_utf8_lossy(&out).into_owned()
}

const SMALL: &str = "resources: {cpu: 1.., memory: 0.1GB.., disk: 1GB..}\n";

/// How many CPUs this host (the local backend's one instance) has.
fn host_cpus(client: &Client) -> u32 {
    now(client.fleets().list()).unwrap()[0].1[0].host.cpus
}

fn task(commands: &str) -> String {
    format!("type: task\ncommands:\n{commands}{SMALL}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_streams_logs_and_records_exit_status() {
    let home = Home::new();
    let client = home.client().await;
    let run = apply(
        &client,
        &task("  - echo hello\n  - echo world >&2\n"),
        home.path(),
    )
    .await;
    let done = finish(&run).await;
    assert_eq!(done.status, RunStatus::Done);
    assert_eq!(done.termination_reason.as_deref(), Some("all_jobs_done"));
    assert_eq!(run.exit_status().await.unwrap(), Some(0));
    assert_eq!(all_logs(&run).await, "hello\nworld\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_end_with_the_right_reason() {
    let home = Home::new();
    let client = home.client().await;
    let dir = home.path();
    let failing = apply(&client, &task("  - echo about to fail\n  - exit 3\n"), dir).await;
    let missing = apply(&client, &task("  - no-such-command-xyz\n"), dir).await;
    let bad_dir = apply(
        &client,
        &format!("{}working_dir: /no/such/dir\n", task("  - echo x\n")),
        dir,
    )
    .await;
    let r = finish(&failing).await;
    assert_eq!(
        (r.status, r.termination_reason.as_deref()),
        (RunStatus::Failed, Some("job_failed"))
    );
    let job = &failing.jobs().await.unwrap()[0];
    assert_eq!(
        job.termination_reason.as_deref(),
        Some("container_exited_with_error")
    );
    assert_eq!(job.exit_status, Some(3));
    assert_eq!(all_logs(&failing).await, "about to fail\n");
    assert_eq!(finish(&missing).await.status, RunStatus::Failed);
    assert_eq!(missing.exit_status().await.unwrap(), Some(127));
    assert!(all_logs(&missing).await.contains("no-such-command-xyz"));
    assert_eq!(finish(&bad_dir).await.status, RunStatus::Failed);
    let job = &bad_dir.jobs().await.unwrap()[0];
    assert_eq!(job.termination_reason.as_deref(), Some("executor_error"));
    assert!(
        job.termination_message
            .as_deref()
            .unwrap_or_default()
            .contains("/no/such/dir"),
        "{job:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_abort_and_max_duration() {
    let home = Home::new();
    let client = home.client().await;
    let dir = home.path();
    let graceful =
        apply(
            &client,
            // A generous grace period: under a loaded CI machine the trap must get to run.
            &format!(
            "{}stop_duration: 60s\n",
            task("  - trap 'echo got TERM; exit 0' TERM\n  - echo started\n  - while true; do sleep 0.1; done\n")
        ),
            dir,
        )
        .await;
    let aborted = apply(&client, &task("  - sleep 1000\n"), dir).await;
    let limited = apply(
        &client,
        &format!("{}max_duration: 1s\n", task("  - sleep 1000\n")),
        dir,
    )
    .await;
    for run in [&graceful, &aborted] {
        wait_running(run).await;
    }
    // Stop only once the job's shell has installed its trap.
    wait_logs(&graceful, |l| l.contains("started")).await;
    graceful.stop(false).await.unwrap();
    aborted.stop(true).await.unwrap();
    let g = finish(&graceful).await;
    assert_eq!(
        (g.status, g.termination_reason.as_deref()),
        (RunStatus::Terminated, Some("stopped_by_user"))
    );
    assert_eq!(
        graceful.jobs().await.unwrap()[0].status,
        JobStatus::Terminated
    );
    assert_eq!(
        graceful.jobs().await.unwrap()[0]
            .termination_reason
            .as_deref(),
        Some("terminated_by_user")
    );
    let logs = all_logs(&graceful).await;
    assert!(
        logs.contains("got TERM"),
        "logs: {logs:?}, job: {:?}",
        graceful.jobs().await.unwrap()[0]
    );
    let a = finish(&aborted).await;
    assert_eq!(
        (a.status, a.termination_reason.as_deref()),
        (RunStatus::Terminated, Some("aborted_by_user"))
    );
    assert_eq!(aborted.jobs().await.unwrap()[0].status, JobStatus::Aborted);
    let m = finish(&limited).await;
    assert_eq!(m.status, RunStatus::Failed);
    assert_eq!(
        limited.jobs().await.unwrap()[0]
            .termination_reason
            .as_deref(),
        Some("max_duration_exceeded")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_on_error_and_gives_up_on_no_capacity() {
    let home = Home::new();
    let client = home.client().await;
    let dir = home.path();
    let marker = dir.join("tried-once");
    let flaky = format!(
        "{}retry:\n  on_events: [error]\n  duration: 1h\n",
        task(&format!(
            "  - if [ -e {m} ]; then echo second; else touch {m}; echo first; exit 1; fi\n",
            m = marker.display()
        ))
    );
    let run = apply(&client, &flaky, dir).await;
    let r = finish(&run).await;
    assert_eq!(r.status, RunStatus::Done);
    let jobs = run.jobs().await.unwrap();
    assert_eq!(jobs.len(), 2);
    assert_eq!(jobs[0].status, JobStatus::Failed);
    assert_eq!(jobs[1].submission_num, 1);
    assert_eq!(all_logs(&run).await, "second\n");

    let never = "type: task\ncommands: [echo x]\nresources: {gpu: 8}\nretry:\n  on_events: [no-capacity]\n  duration: 1s\n";
    let run = apply(&client, never, dir).await;
    let r = finish(&run).await;
    assert_eq!(
        (r.status, r.termination_reason.as_deref()),
        (RunStatus::Failed, Some("retry_limit_exceeded"))
    );
    assert!(
        run.jobs().await.unwrap().len() >= 2,
        "it was retried before giving up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_can_never_fit_fails_at_once_and_says_why() {
    let home = Home::new();
    let client = home.client().await;
    let run = apply(
        &client,
        "type: task\ncommands: [echo x]\nresources: {gpu: 1}\n",
        home.path(),
    )
    .await;
    let r = finish(&run).await;
    assert_eq!(r.status, RunStatus::Failed);
    let job = &run.jobs().await.unwrap()[0];
    assert_eq!(
        job.termination_reason.as_deref(),
        Some("failed_to_start_due_to_no_capacity")
    );
    let message = job.termination_message.clone().unwrap_or_default();
    assert!(
        message.starts_with("no offers:") && message.contains("GPU"),
        "{message}"
    );
    let plan = client
        .runs()
        .plan(&parse("type: task\ncommands: [x]\nresources: {gpu: 1}\n", "p").unwrap())
        .await
        .unwrap();
    assert!(plan.offers.is_empty() && plan.no_offers_reason.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_refused_until_a_container_runtime_exists() {
    let home = Home::new();
    let client = home.client().await;
    let config = parse("type: task\nimage: ubuntu\ncommands: [echo x]\n", "t").unwrap();
    let err = client
        .runs()
        .apply(config, opts(home.path()))
        .await
        .err()
        .expect("refused");
    assert!(
        err.to_string().contains("container runtime not available")
            || err.to_string().contains("needs a container runtime"),
        "{err}"
    );
    assert!(
        client.runs().list(true).await.unwrap().is_empty(),
        "nothing was submitted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounts_a_process_job_cannot_have_are_refused_not_dropped() {
    let home = Home::new();
    let client = home.client().await;
    let refused = |yaml: String| {
        let client = client.clone();
        let dir = home.path().to_path_buf();
        async move {
            let config = parse(&yaml, "t").unwrap();
            let err = client.runs().apply(config, opts(&dir)).await.err();
            err.expect("refused").to_string()
        }
    };
    let network = refused(format!(
        "volumes: [{{name: my-data, path: /data}}]\n{}",
        task("  - ls\n")
    ))
    .await;
    assert!(
        network.contains("volumes[0]") && network.contains("my-data"),
        "{network}"
    );
    let elsewhere = refused(format!("volumes: [/tmp:/data]\n{}", task("  - ls\n"))).await;
    assert!(
        elsewhere.contains("volumes[0]") && elsewhere.contains("needs a container"),
        "{elsewhere}"
    );
    assert!(
        client.runs().list(true).await.unwrap().is_empty(),
        "nothing was submitted"
    );

    // The same path on both sides, and optional mounts, run as they are.
    let dir = home.path().display();
    let same = format!(
        "volumes: ['{dir}:{dir}', {{instance_path: /srv/x, path: /x, optional: true}}]\n{}",
        task(&format!("  - test -d {dir}\n"))
    );
    let run = apply(&client, &same, home.path()).await;
    assert_eq!(finish(&run).await.status, RunStatus::Done);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_left_submitted_behind_its_running_job_is_repaired() {
    let home = Home::new();
    let client = home.client().await;
    let run = apply(&client, &task("  - sleep 30\n"), home.path()).await;
    wait_running(&run).await;
    // As if the reconcile after the job's start had been lost (a crash, a store error).
    let mut behind = run.run().await.unwrap();
    behind.status = RunStatus::Submitted;
    let store = client.engine().unwrap().store();
    assert!(store.update_run(&behind, &[RunStatus::Running]).unwrap());
    assert_eq!(run.run().await.unwrap().status, RunStatus::Submitted);
    let repaired = tokio::time::timeout(
        Duration::from_secs(15),
        run.wait_until(|s| s == RunStatus::Running),
    )
    .await
    .expect("the sweep repairs the run");
    assert_eq!(repaired.unwrap().status, RunStatus::Running);
    run.stop(true).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_get_dstacks_environment() {
    let home = Home::new();
    let client = home.client().await;
    let yaml = format!(
        "name: env-check\nenv:\n  - GREETING=hi there\n{}",
        task("  - env | grep -E '^(DSTACK_|GREETING|CUDA_VISIBLE)' | sort\n  - pwd\n")
    );
    let run = apply(&client, &yaml, home.path()).await;
    assert_done(&run).await;
    let logs = all_logs(&run).await;
    let job = &run.jobs().await.unwrap()[0];
    for expected in [
        "DSTACK_RUN_NAME=env-check".to_string(),
        format!("DSTACK_RUN_ID={}", run.id()),
        format!("DSTACK_JOB_ID={}", job.id),
        "DSTACK_NODE_RANK=0".to_string(),
        "DSTACK_NODES_NUM=1".to_string(),
        "DSTACK_MASTER_NODE_IP=127.0.0.1".to_string(),
        "DSTACK_NODES_IPS=127.0.0.1".to_string(),
        "DSTACK_GPUS_NUM=0".to_string(),
        "DSTACK_GPUS_PER_NODE=0".to_string(),
        format!("DSTACK_WORKING_DIR={}", home.path().display()),
        "GREETING=hi there".to_string(),
        "CUDA_VISIBLE_DEVICES=".to_string(),
    ] {
        assert!(
            logs.lines().any(|l| l == expected),
            "missing {expected} in:\n{logs}"
        );
    }
    assert!(
        logs.lines().any(|l| l == home.path().display().to_string()),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_runs_at_once_finish_without_over_committing() {
    let home = Home::new();
    let client = home.client().await;
    let cpus = host_cpus(&client);
    let mut runs = Vec::new();
    for i in 0..50 {
        runs.push(
            apply(
                &client,
                &task(&format!("  - echo run {i}\n  - sleep 0.05\n")),
                home.path(),
            )
            .await,
        );
    }
    for (i, run) in runs.iter().enumerate() {
        assert_eq!(finish(run).await.status, RunStatus::Done, "run {i}");
        assert_eq!(all_logs(run).await, format!("run {i}\n"));
    }
    // Sweep the recorded intervals: at no moment did the held CPUs exceed the host's.
    let mut events: Vec<(u64, i64)> = Vec::new();
    for run in &runs {
        let job = &run.jobs().await.unwrap()[0];
        let held = job.reservation.as_ref().unwrap().cpus as i64;
        events.push((job.started_at_ms.unwrap(), held));
        events.push((job.finished_at_ms.unwrap(), -held));
    }
    events.sort_by_key(|(t, d)| (*t, *d));
    let mut held = 0;
    for (_, delta) in events {
        held += delta;
        assert!(held <= cpus as i64, "{held} CPUs held on a {cpus}-CPU host");
    }
    assert_eq!(client.runs().list(true).await.unwrap().len(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_fails_its_job_within_seconds() {
    let home = Home::new();
    let client = home.client().await;
    let run = apply(
        &client,
        &task("  - echo before\n  - sleep 1000\n"),
        home.path(),
    )
    .await;
    wait_running(&run).await;
    // Kill only once the output is on disk (output still in the pipe dies with the agent).
    wait_logs(&run, |l| l.starts_with("before\n")).await;
    home.kill_agent();
    let started = std::time::Instant::now();
    let r = finish(&run).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(r.status, RunStatus::Failed);
    let job = &run.jobs().await.unwrap()[0];
    assert_eq!(job.termination_reason.as_deref(), Some("executor_error"));
    assert!(
        job.termination_message
            .as_deref()
            .unwrap_or_default()
            .contains("agent"),
        "{job:?}"
    );
    let logs = all_logs(&run).await;
    assert!(
        logs.starts_with("before\n"),
        "{logs:?} {:?}",
        run.jobs().await.unwrap()
    );
}

/// Sends `signal` (`STOP`, `CONT`, ...) to process `pid`.
fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_agent_is_given_up_on_and_used_again_once_it_answers() {
    let home = Home::new();
    let backend = LocalBackend::new(home.path(), agent_binary());
    let options = EngineOptions {
        unreachable_after: Duration::from_secs(2),
        ..Home::options()
    };
    let client = home.client_with_backend_and_options(backend, options).await;
    let run = apply(&client, &task("  - sleep 1000\n"), home.path()).await;
    wait_running(&run).await;
    let pid = home.agent_pid().expect("agent pid");
    // Alive, but answering nothing: its event stream falls silent (no heartbeat either).
    signal(pid, "STOP");
    let given_up = tokio::time::timeout(Duration::from_secs(120), run.wait())
        .await
        .expect("the job is given up on")
        .unwrap();
    signal(pid, "CONT");
    assert_eq!(given_up.status, RunStatus::Failed);
    let job = run.jobs().await.unwrap().pop().unwrap();
    assert_eq!(
        job.termination_reason.as_deref(),
        Some("instance_unreachable"),
        "{job:?}"
    );
    let instance = || {
        client
            .engine()
            .unwrap()
            .store()
            .instances()
            .unwrap()
            .pop()
            .unwrap()
    };
    assert!(instance().unreachable);

    // Answering again: the machine takes work again, and the job given up on is stopped.
    eventually(60, "the agent is reachable again", async || {
        !instance().unreachable
    })
    .await;
    let agent = dstack_core::agent::AgentClient::local(
        home.path().join("agent/agent.sock"),
        &home.path().join("agent"),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !agent
        .job(&job.id)
        .await
        .unwrap()
        .is_some_and(|j| j.status.is_finished())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the given-up job is stopped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = apply(&client, &task("  - echo back\n"), home.path()).await;
    assert_done(&again).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_the_store_failed_to_record_is_recorded_once_it_can() {
    let home = Home::new();
    let client = home.client().await;
    let go = home.path().join("go");
    let wait_for_go = format!(
        "  - while [ ! -e '{}' ]; do sleep 0.05; done\n",
        go.display()
    );
    let run = apply(&client, &task(&wait_for_go), home.path()).await;
    wait_running(&run).await;
    // From another connection, the state file is made to refuse every job's end: a real
    // SQLite error in the engine's transaction.
    let db = rusqlite::Connection::open(dstack_core::client::state_file(home.path())).unwrap();
    db.execute_batch(
        "CREATE TRIGGER refuse_ends BEFORE UPDATE OF status ON jobs WHEN NEW.status = 'done' \
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
    )
    .unwrap();
    std::fs::write(&go, "").unwrap();
    let job = run.jobs().await.unwrap().pop().unwrap();
    let agent = dstack_core::agent::AgentClient::local(
        home.path().join("agent/agent.sock"),
        &home.path().join("agent"),
    )
    .unwrap();
    eventually(30, "the agent sees the job end", async || {
        agent
            .job(&job.id)
            .await
            .unwrap()
            .is_some_and(|j| j.status.is_finished())
    })
    .await;
    // The engine has heard of the end and could not record it (more than once).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(run.status().await.unwrap(), RunStatus::Running);
    // Once the store records again, the end is recorded without anything else happening.
    db.execute_batch("DROP TRIGGER refuse_ends").unwrap();
    let done = tokio::time::timeout(Duration::from_secs(20), run.wait())
        .await
        .expect("the end is recorded once the store can")
        .unwrap();
    assert_eq!(done.status, RunStatus::Done);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gigabyte_of_output_streams_with_bounded_memory() {
    let home = Home::new();
    let client = home.client().await;
    let run = apply(
        &client,
        &task("  - head -c 1073741824 /dev/zero\n"),
        home.path(),
    )
    .await;
    let mut total = 0usize;
    let mut logs = run.logs(true);
    while let Some(chunk) = logs.next().await {
        total += chunk.unwrap().len();
    }
    // The agent keeps the newest 32-64 MiB of a job's output (two rotated files): a follower
    // that falls further behind than that goes on from the oldest byte kept, so it reads at
    // least the last file and never more than was written.
    assert!((32 << 20..=1 << 30).contains(&total), "{total}");
    assert_done(&run).await;
    for pid in ["self".to_string(), home.agent_pid().unwrap().to_string()] {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let hwm_kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        assert!(hwm_kb < 256 * 1024, "{pid}: peak RSS {hwm_kb} kB");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_job_gets_its_own_gpus() {
    let home = Home::new();
    // A fake `nvidia-smi` (no GPU exists here) printing what a 2×A100 host prints.
    let tools = home.path().join("tools");
    std::fs::create_dir_all(&tools).unwrap();
    let smi = tools.join("nvidia-smi");
    std::fs::write(
        &smi,
        "#!/bin/sh\nprintf '0, NVIDIA A100-SXM4-80GB, 81920, GPU-aaa\\n1, NVIDIA A100-SXM4-80GB, 81920, GPU-bbb\\n'\n",
    )
    .unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&smi)
        .status()
        .unwrap();
    let path = format!(
        "{}:{}",
        tools.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let client = home
        .client_with(LocalBackend::new(home.path(), agent_binary()).with_agent_path(path))
        .await;
    let host = client.fleets().list().await.unwrap()[0].1[0].host.clone();
    assert_eq!(host.gpus.len(), 2);
    assert_eq!(host.gpus[0].name, "A100");
    let gpu_task = "type: task\ncommands: ['echo gpus=$CUDA_VISIBLE_DEVICES n=$DSTACK_GPUS_NUM', 'sleep 0.5']\n\
                    resources: {cpu: 0.., memory: 0.1GB.., disk: 1GB.., gpu: A100:1}\n";
    let runs = [
        apply(&client, gpu_task, home.path()).await,
        apply(&client, gpu_task, home.path()).await,
        apply(&client, gpu_task, home.path()).await,
    ];
    // (start, end, output) of each run, in the order they started (runs submitted within the
    // same millisecond may be placed in any order).
    let mut seen = Vec::new();
    for run in &runs {
        assert_eq!(finish(run).await.status, RunStatus::Done);
        let job = run.jobs().await.unwrap().pop().unwrap();
        let (start, end) = (job.started_at_ms.unwrap(), job.finished_at_ms.unwrap());
        seen.push((start, end, all_logs(run).await));
    }
    seen.sort();
    assert!(
        seen.iter().all(|(_, _, l)| l.ends_with("n=1\n")),
        "{seen:?}"
    );
    assert_ne!(
        seen[0].2, seen[1].2,
        "the first two run side by side on different GPUs: {seen:?}"
    );
    assert!(seen[1].0 < seen[0].1, "the first two overlap: {seen:?}");
    // The third waited for a free GPU: it started after one of the first two finished.
    assert!(seen[2].0 >= seen[0].1.min(seen[1].1), "{seen:?}");
    let two = parse("type: task\ncommands: [x]\nresources: {gpu: A100:2}\n", "p").unwrap();
    assert_eq!(client.runs().plan(&two).await.unwrap().offers.len(), 1);
    let three = parse("type: task\ncommands: [x]\nresources: {gpu: 3}\n", "p").unwrap();
    assert!(client.runs().plan(&three).await.unwrap().offers.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_instant_runs_all_finish() {
    // Jobs that exit at once race their own start bookkeeping; none may be left behind.
    let home = Home::new();
    let client = home.client().await;
    let yaml = "type: task\nshell: sh\ncommands: ['true']\nresources: {cpu: 0.., memory: 0.01GB.., disk: 1GB..}\n";
    let mut runs = Vec::new();
    for _ in 0..150 {
        runs.push(apply(&client, yaml, home.path()).await);
    }
    for run in &runs {
        let r = finish(run).await;
        assert_eq!(
            r.status,
            RunStatus::Done,
            "{r:?}\n{:?}",
            run.jobs().await.unwrap()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_applied_together_are_recorded_all_or_none() {
    let home = Home::new();
    let client = home.client().await;
    let yaml = "type: task\nshell: sh\ncommands: ['true']\nresources: {cpu: 0.., memory: 0.01GB.., disk: 1GB..}\n";
    let config = parse(yaml, "test.dstack.yml").unwrap();
    let named = |name: Option<&str>| {
        let mut o = opts(home.path());
        o.name = name.map(str::to_string);
        (config.clone(), o)
    };
    // Two runs of one name in a batch: nothing is recorded.
    let clash = vec![named(Some("twin")), named(None), named(Some("twin"))];
    let err = client.runs().apply_all(clash).await.err().expect("refused");
    assert!(err.to_string().contains("twin"), "{err}");
    assert!(client.runs().list(true).await.unwrap().is_empty());
    // A batch with generated names: every name differs, every run finishes.
    let runs = client
        .runs()
        .apply_all((0..40).map(|_| named(None)).collect())
        .await
        .unwrap();
    let names: std::collections::BTreeSet<&str> = runs.iter().map(|r| r.name()).collect();
    assert_eq!(names.len(), 40);
    for run in &runs {
        assert_eq!(finish(run).await.status, RunStatus::Done);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_right_after_applying_leaves_nothing_running() {
    // Stop races placement and start; every run must end terminated and no process survive.
    let home = Home::new();
    let client = home.client().await;
    let yaml = "type: task\nshell: sh\ncommands: ['sleep 30']\nresources: {cpu: 0.., memory: 0.01GB.., disk: 1GB..}\n";
    let mut runs = Vec::new();
    for i in 0..30 {
        let run = apply(&client, yaml, home.path()).await;
        match i % 3 {
            0 => tokio::task::yield_now().await,
            1 => tokio::time::sleep(Duration::from_millis(2 * (i % 7))).await,
            _ => {}
        }
        run.stop(i % 2 == 0).await.unwrap();
        runs.push(run);
    }
    for run in &runs {
        let r = finish(run).await;
        assert_eq!(r.status, RunStatus::Terminated, "{}", run.name());
    }
    let agent = client
        .engine()
        .unwrap()
        .agent("instance-local-0")
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let running: Vec<_> = agent
            .jobs()
            .await
            .unwrap()
            .into_iter()
            .filter(|j| !j.status.is_finished())
            .collect();
        if running.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running on the agent: {running:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A task needing `cpus` CPUs and `memory` GB of memory (both minimums).
fn sized_task(commands: &str, cpus: u32, memory: &str) -> String {
    format!(
        "type: task\ncommands:\n{commands}resources: {{cpu: {cpus}.., memory: {memory}GB.., disk: 1GB..}}\n"
    )
}

/// Waits (up to 30 s) until the run's job is queued behind a running job; returns that job's
/// id.
async fn wait_queued(run: &RunHandle) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let job = run.jobs().await.unwrap().pop().unwrap();
        if let Some(leader) = job.after_job.clone() {
            assert_eq!(job.status, JobStatus::Provisioning, "{job:?}");
            return leader;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never queued: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Two running tasks fill the host: `(bigger, smaller)`, each on about half its CPUs; the
/// smaller one holds less memory than a task of [`sized_task`]`(.., cpus / 2, "0.2")` needs,
/// so such a task can only be queued behind the bigger one.
async fn fill_the_host(client: &Client, dir: &Path, smaller: &str) -> (RunHandle, RunHandle) {
    let cpus = host_cpus(client);
    assert!(cpus >= 2, "this test needs two CPUs");
    let bigger = apply(
        client,
        &sized_task("  - sleep 1000\n", cpus - cpus / 2, "0.2"),
        dir,
    )
    .await;
    let smaller = apply(client, &sized_task(smaller, cpus / 2, "0.1"), dir).await;
    wait_running(&bigger).await;
    wait_running(&smaller).await;
    (bigger, smaller)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_queued_behind_a_long_one_moves_to_a_slot_that_frees_first() {
    let home = Home::new();
    let client = home.client().await;
    let (long, short) = fill_the_host(&client, home.path(), "  - sleep 2\n").await;
    let (moved, leader) = apply_queued(&client, home.path(), "  - echo moved\n").await;
    assert_eq!(leader, long.jobs().await.unwrap()[0].id);

    // The short task ends first: the queued task is taken back and runs in its place.
    assert_done(&moved).await;
    assert_eq!(all_logs(&moved).await, "moved\n");
    let job = moved.jobs().await.unwrap().pop().unwrap();
    assert_eq!(job.after_job, None);
    let short_job = short.jobs().await.unwrap().pop().unwrap();
    assert!(job.started_at_ms.unwrap() >= short_job.finished_at_ms.unwrap());
    assert_eq!(long.status().await.unwrap(), RunStatus::Running);
    long.stop(true).await.unwrap();
    finish(&long).await;
}

/// Applies a task of `commands` that fits only behind the bigger task of [`fill_the_host`]
/// and waits until it is queued there: the run and the job it follows.
async fn apply_queued(client: &Client, dir: &Path, commands: &str) -> (RunHandle, String) {
    let cpus = host_cpus(client);
    let queued = apply(client, &sized_task(commands, cpus / 2, "0.2"), dir).await;
    let leader = wait_queued(&queued).await;
    (queued, leader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_left_waiting_by_a_pass_queues_behind_the_next_task_to_start() {
    let home = Home::new();
    // No safety-net sweep during the test: only events may place the tasks.
    let client = home
        .client_with_sweep_period(Duration::from_secs(3600))
        .await;
    let cpus = host_cpus(&client);
    // Every task needs the whole host: one runs at a time, up to two queue behind it.
    let whole = |commands: &str| {
        let yaml = sized_task(commands, cpus, "0.1");
        (parse(&yaml, "test.dstack.yml").unwrap(), opts(home.path()))
    };
    let apply_whole = |commands: &'static str| {
        let (config, opts) = whole(commands);
        let runs = client.runs();
        async move { runs.apply(config, opts).await.unwrap() }
    };
    let first = apply_whole("  - sleep 1\n").await;
    wait_running(&first).await;
    let second = apply_whole("  - sleep 1\n").await;
    assert_eq!(wait_queued(&second).await, job_of(&first));
    let third = apply_whole("  - sleep 1000\n").await;
    assert_eq!(wait_queued(&third).await, job_of(&second));
    // Two more wait: no task to queue behind (the queue is two deep).
    let waiting = client
        .runs()
        .apply_all(vec![whole("  - sleep 1000\n"), whole("  - sleep 1000\n")])
        .await
        .unwrap();
    // The first ends, the second starts: one pass queues one of them behind the third and
    // leaves the other waiting. The second ends, the third starts: the one left waiting
    // queues behind the one queued last time, without any other event to wake the scheduler.
    finish(&second).await;
    let leaders = [
        wait_queued(&waiting[0]).await,
        wait_queued(&waiting[1]).await,
    ];
    let queued_behind_third = if leaders[0] == job_of(&third) { 0 } else { 1 };
    assert_eq!(leaders[queued_behind_third], job_of(&third));
    assert_eq!(
        leaders[1 - queued_behind_third],
        job_of(&waiting[queued_behind_third])
    );
    for run in [&third, &waiting[0], &waiting[1]] {
        run.stop(true).await.unwrap();
        finish(run).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweeps_trials_start_in_the_order_they_were_applied() {
    let home = Home::new();
    let client = home.client().await;
    let cpus = host_cpus(&client);
    // Each trial needs the whole host: they run one after the other.
    let whole = sized_task("  - 'true'\n", cpus, "0.1");
    let items = copies(&whole, 8, home.path());
    let trials = client.runs().apply_all(items).await.unwrap();
    let mut started = Vec::new();
    for trial in &trials {
        assert_eq!(finish(trial).await.status, RunStatus::Done);
        started.push(trial.jobs().await.unwrap()[0].started_at_ms.unwrap());
    }
    let mut sorted = started.clone();
    sorted.sort_unstable();
    assert_eq!(started, sorted, "start times in the order of the trials");
}

/// On a host whose tasks have lately been short, a sweep's trials of the same demand queue
/// more than two deep behind a running task (as deep as `engine::queues` decides), each
/// behind the one before, and run in order; those of another demand queue two deep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_of_short_tasks_queues_a_sweep_deeper_than_two() {
    let home = Home::new();
    let backend = LocalBackend::new(home.path(), agent_binary());
    let options = EngineOptions {
        sweep_period: Duration::from_secs(3600),
        // Short: whatever a `true` takes on a busy test machine (tests run side by side).
        queue_cover: Duration::from_secs(10),
        ..Home::options()
    };
    let client = home.client_with_backend_and_options(backend, options).await;
    let cpus = host_cpus(&client);
    // Each task needs the whole host: one runs at a time.
    let whole = |commands: &str| sized_task(commands, cpus, "0.1");
    let short = whole("  - 'true'\n");
    let runs = client.runs();
    for trial in runs
        .apply_all(copies(&short, 6, home.path()))
        .await
        .unwrap()
    {
        assert_done(&trial).await;
    }
    let leader = apply(&client, &whole("  - sleep 3\n"), home.path()).await;
    wait_running(&leader).await;
    let trials = runs
        .apply_all(copies(&short, 40, home.path()))
        .await
        .unwrap();
    let queued = |trial: &RunHandle| {
        let job = now(trial.jobs()).unwrap().remove(0);
        (job.status == JobStatus::Provisioning)
            .then_some(job.after_job)
            .flatten()
    };
    eventually(10, "more than two trials are queued", async || {
        trials.iter().filter(|t| queued(t).is_some()).count() > 2
    })
    .await;
    assert_eq!(leader.status().await.unwrap(), RunStatus::Running);
    let mut ahead = job_of(&leader);
    for trial in trials.iter().take_while(|t| queued(t).is_some()) {
        assert_eq!(
            queued(trial),
            Some(ahead),
            "queued behind the trial before it"
        );
        ahead = job_of(trial);
    }
    assert_done(&leader).await;
    let mut started = Vec::new();
    for trial in &trials {
        assert_done(trial).await;
        started.push(trial.jobs().await.unwrap()[0].started_at_ms.unwrap());
    }
    assert!(started.is_sorted(), "trials started in order: {started:?}");

    // Tasks of another demand (more memory) have no run time on the host yet: two deep.
    let other = |commands: &str| sized_task(commands, cpus, "0.2");
    let leader = apply(&client, &other("  - sleep 3\n"), home.path()).await;
    wait_running(&leader).await;
    let trials = runs
        .apply_all(copies(&other("  - 'true'\n"), 6, home.path()))
        .await
        .unwrap();
    let count = || trials.iter().filter(|t| queued(t).is_some()).count();
    eventually(10, "two trials are queued", async || count() == 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count(), 2, "no deeper");
    for run in std::iter::once(&leader).chain(&trials) {
        run.stop(true).await.unwrap();
        finish(run).await;
    }
}

/// `n` runs of the task `yaml` applied from `dir`, for `apply_all`.
fn copies(yaml: &str, n: usize, dir: &Path) -> Vec<(Configuration, ApplyOptions)> {
    (0..n)
        .map(|_| (parse(yaml, "test.dstack.yml").unwrap(), opts(dir)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freed_capacity_is_filled_beyond_what_one_pass_looks_at() {
    let home = Home::new();
    let client = home
        .client_with_sweep_period(Duration::from_secs(3600))
        .await;
    // More tasks than an event pass looks at, all of which fit at once (no CPU to hold).
    let tiny = sized_task("  - sleep 1000\n", 0, "0.05");
    let items = copies(&tiny, 40, home.path());
    let runs = client.runs().apply_all(items).await.unwrap();
    for run in &runs {
        wait_running(run).await;
    }
    for run in &runs {
        run.stop(true).await.unwrap();
        finish(run).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_fits_behind_many_that_do_not_is_placed_by_the_periodic_pass() {
    let home = Home::new();
    let client = home
        .client_with_sweep_period(Duration::from_millis(300))
        .await;
    let cpus = host_cpus(&client);
    let long = apply(
        &client,
        &sized_task("  - sleep 1000\n", cpus - 1, "0.1"),
        home.path(),
    )
    .await;
    wait_running(&long).await;
    // More tasks than an event pass looks at need the whole host (and cannot queue behind a
    // task that holds less): they wait.
    let whole = sized_task("  - sleep 1000\n", cpus, "0.1");
    let items = copies(&whole, 40, home.path());
    let waiting = client.runs().apply_all(items).await.unwrap();
    // A task behind them all fits in the CPU left free.
    let small = apply(
        &client,
        &sized_task("  - echo small\n", 1, "0.1"),
        home.path(),
    )
    .await;
    assert_done(&small).await;
    assert_eq!(all_logs(&small).await, "small\n");
    for run in waiting.iter().take(3) {
        assert_eq!(run.status().await.unwrap(), RunStatus::Submitted);
    }
    for run in waiting.iter().chain([&long]) {
        run.stop(true).await.unwrap();
        finish(run).await;
    }
}

/// The id of the run's (single) job.
fn job_of(run: &RunHandle) -> String {
    now(run.jobs()).unwrap()[0].id.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_task_stops_without_ever_running() {
    let home = Home::new();
    let client = home.client().await;
    let (first, second) = fill_the_host(&client, home.path(), "  - sleep 1000\n").await;
    let marker = home.path().join("ran");
    let touch = format!("  - touch {}\n", marker.display());
    let (queued, _) = apply_queued(&client, home.path(), &touch).await;
    queued.stop(false).await.unwrap();
    let run = finish(&queued).await;
    assert_eq!(
        (run.status, run.termination_reason.as_deref()),
        (RunStatus::Terminated, Some("stopped_by_user"))
    );
    let job = queued.jobs().await.unwrap().pop().unwrap();
    assert_eq!(job.status, JobStatus::Terminated);
    assert_eq!(job.exit_status, None);
    assert!(!marker.exists(), "the stopped task ran");
    for run in [&first, &second] {
        assert_eq!(run.status().await.unwrap(), RunStatus::Running);
        run.stop(true).await.unwrap();
        finish(run).await;
    }
    assert!(!marker.exists(), "the stopped task ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_task_runs_after_the_engine_that_queued_it_is_gone() {
    let home = Home::new();
    let names: Vec<String> = {
        let client = home.client().await;
        let (leader, other) = fill_the_host(&client, home.path(), "  - sleep 1000\n").await;
        let (queued, followed) = apply_queued(&client, home.path(), "  - echo after\n").await;
        assert_eq!(followed, leader.jobs().await.unwrap()[0].id);
        [leader, other, queued]
            .iter()
            .map(|r| r.name().to_string())
            .collect()
    }; // the engine stops with its client; the agent keeps the queue
    let client = home.client().await;
    let get = |name: &str| now(client.runs().get(name)).unwrap().unwrap();
    let (leader, other, queued) = (get(&names[0]), get(&names[1]), get(&names[2]));
    assert_eq!(
        queued.jobs().await.unwrap()[0].status,
        JobStatus::Provisioning
    );
    leader.stop(true).await.unwrap();
    assert_done(&queued).await;
    assert_eq!(all_logs(&queued).await, "after\n");
    assert_eq!(other.status().await.unwrap(), RunStatus::Running);
    other.stop(true).await.unwrap();
    finish(&other).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_task_runs_after_its_agent_was_killed_and_came_back() {
    let home = Home::new();
    let client = home.client().await;
    let (leader, other) = fill_the_host(&client, home.path(), "  - sleep 1000\n").await;
    // Queued behind the leader on the agent, with an environment (kept only in memory there).
    let (queued, followed) =
        apply_queued(&client, home.path(), "  - echo after $DSTACK_RUN_NAME\n").await;
    assert_eq!(followed, leader.jobs().await.unwrap()[0].id);
    home.kill_agent();
    // The running tasks are lost with the agent; the queued one is forgotten by the agent
    // that comes back, sent again by the engine, and runs.
    assert_eq!(finish(&leader).await.status, RunStatus::Failed);
    assert_eq!(finish(&other).await.status, RunStatus::Failed);
    assert_done(&queued).await;
    assert_eq!(
        all_logs(&queued).await,
        format!("after {}\n", queued.name())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_for_the_end_of_a_run_is_not_woken_by_its_steps() {
    let home = Home::new();
    let client = home.client().await;
    let run = apply(&client, &task("  - sleep 30\n"), home.path()).await;
    let mut ended =
        client
            .engine()
            .unwrap()
            .watch_run(run.id(), RunStatus::Submitted, RunStatus::is_finished);
    ended.mark_unchanged();
    // Look at the channel's value until the run runs (a waiter for that would wake every
    // waiter on it). The value follows the run's steps (it is published just after each is
    // stored), without waking the waiter for the end.
    tokio::time::timeout(Duration::from_secs(30), async {
        while *ended.borrow() != RunStatus::Running {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the value is kept current: the run starts");
    assert_eq!(run.status().await.unwrap(), RunStatus::Running);
    assert!(!ended.has_changed().unwrap(), "woken by a step of the run");
    run.stop(false).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), ended.changed())
        .await
        .expect("the run's end wakes its waiter")
        .unwrap();
    assert!(ended.borrow_and_update().is_finished());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_on_a_run_is_woken_by_that_runs_changes_only() {
    let home = Home::new();
    let client = home.client().await;
    let long = apply(&client, &task("  - sleep 30\n"), home.path()).await;
    wait_running(&long).await;
    let mut watched = client
        .engine()
        .unwrap()
        .watch_run(long.id(), RunStatus::Running, |_| true);
    watched.mark_unchanged();
    let quick = apply(&client, &task("  - 'true'\n"), home.path()).await;
    assert_eq!(finish(&quick).await.status, RunStatus::Done);
    assert!(
        !watched.has_changed().unwrap(),
        "woken by another run's changes"
    );
    long.stop(false).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while !watched.borrow_and_update().is_finished() {
            watched.changed().await.unwrap();
        }
    })
    .await
    .expect("the run's own end reaches its waiter");
    assert!(finish(&long).await.status.is_finished());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_of_another_build_is_replaced_once_it_runs_no_job() {
    let home = Home::new();
    // Another build: the same program with a byte more (still runs, another stamp).
    let old_bin = home.path().join("old-dstack-agent");
    let mut bytes = std::fs::read(agent_binary()).unwrap();
    bytes.push(0);
    std::fs::write(&old_bin, bytes).unwrap();
    std::fs::set_permissions(
        &old_bin,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let old = LocalBackend::new(home.path(), old_bin)
        .ensure_agent()
        .await
        .unwrap();
    let old_health = old.healthcheck().await.unwrap();
    let job = dstack_core::agent::JobSubmit {
        id: "busy".to_string(),
        name: "busy-0-0".to_string(),
        argv: vec!["/bin/sleep".to_string(), "30".to_string()],
        env: BTreeMap::new(),
        working_dir: "/".to_string(),
        max_duration_secs: None,
        mpi_hostfile: None,
        after: None,
        archives: Vec::new(),
        clone: None,
        artifacts: Vec::new(),
        container: None,
    };
    old.submit(&job).await.unwrap();

    // While it runs a job, it is kept, and the new build says why it cannot start.
    let new = LocalBackend::new(home.path(), agent_binary());
    let refused = new.ensure_agent().await.unwrap_err().to_string();
    assert!(refused.contains("still runs 1 job"), "{refused}");
    assert_eq!(old.healthcheck().await.unwrap().pid, old_health.pid);

    // Once it runs none, it is replaced.
    let stop = dstack_core::agent::StopRequest {
        abort: true,
        grace_secs: 0,
        reason: "test".to_string(),
    };
    old.stop("busy", &stop).await.unwrap();
    eventually(20, "the job to end", async || {
        old.job("busy")
            .await
            .unwrap()
            .is_some_and(|j| j.status.is_finished())
    })
    .await;
    let client = new.ensure_agent().await.unwrap();
    let health = client.healthcheck().await.unwrap();
    assert_ne!(health.pid, old_health.pid);
    assert_ne!(health.build, old_health.build);
    // The new agent has the old one's jobs (and the same token).
    assert!(client.job("busy").await.unwrap().is_some());
}

/// Moves a scheduled run's clock: writes its next start as now into its record, as time
/// passing would make it due (the engine's sweep wakes the timer that sees it).
fn make_due(client: &Client, run: &RunHandle) {
    let mut due = now(run.run()).unwrap();
    assert_eq!(due.status, RunStatus::Pending);
    due.next_triggered_at_ms = Some(dstack_core::model::now_ms());
    assert!(client
        .engine()
        .unwrap()
        .store()
        .update_run(&due, &[RunStatus::Pending])
        .unwrap());
}

/// A scheduled run waits `pending` without jobs until its start, runs then, goes back to
/// `pending` for the next start when its job ends, starts again, and a stop ends it for good
/// (running or pending). Its cron (every January 1st) never comes due while the test runs:
/// the test moves the clock by making the start due in the record (`make_due`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_run_starts_at_its_times_and_a_stop_ends_it() {
    let home = Home::new();
    let client = home
        .client_with_sweep_period(Duration::from_millis(200))
        .await;
    let dir = home.path();
    let yearly = "schedule: {cron: '0 0 1 1 *'}\n";
    let config = format!(
        "{}{yearly}",
        task("  - echo started\n  - if [ -e hang ]; then sleep 600; fi\n")
    );
    let Configuration::Task(parsed) = parse(&config, "t.yml").unwrap() else {
        panic!("a task")
    };
    let schedule = parsed.common.profile.schedule.clone().unwrap();
    let run = apply(&client, &config, dir).await;
    let applied = run.run().await.unwrap();
    assert_eq!(applied.status, RunStatus::Pending);
    let first = schedule.next_after(applied.submitted_at_ms);
    assert_eq!(applied.scheduled_start_ms(), first);
    assert!(first.unwrap() > applied.submitted_at_ms);
    // Several sweeps later, it still waits, with nothing submitted.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(run.status().await.unwrap(), RunStatus::Pending);
    assert!(run.jobs().await.unwrap().is_empty());

    // Its start: the job runs, and the run waits for the next start.
    make_due(&client, &run);
    eventually(
        30,
        "the first start ran and the run waits again",
        async || {
            let jobs = run.jobs().await.unwrap();
            run.status().await.unwrap() == RunStatus::Pending
                && jobs.len() == 1
                && jobs[0].status == JobStatus::Done
        },
    )
    .await;
    let waiting = run.run().await.unwrap();
    assert_eq!(
        waiting.scheduled_start_ms(),
        schedule.next_after(run.jobs().await.unwrap()[0].finished_at_ms.unwrap())
    );
    assert_eq!(waiting.termination_reason, None);
    assert_eq!(
        waiting.status_message.as_deref(),
        Some("the last start ended done (all_jobs_done)")
    );
    assert_eq!(all_logs(&run).await, "started\n");

    // The next start runs the job anew (as a new submission); stopping it ends the run.
    std::fs::write(dir.join("hang"), "").unwrap();
    make_due(&client, &run);
    wait_running(&run).await;
    let jobs = run.jobs().await.unwrap();
    assert_eq!(jobs.len(), 2);
    assert_eq!((jobs[1].job_num, jobs[1].submission_num), (0, 1));
    run.stop(false).await.unwrap();
    let stopped = finish(&run).await;
    assert_eq!(
        (stopped.status, stopped.termination_reason.as_deref()),
        (RunStatus::Terminated, Some("stopped_by_user"))
    );
    assert_eq!(stopped.scheduled_start_ms(), None);

    // A stop while it waits for its start ends it too, without a job.
    let config = format!("{}{yearly}name: waiting-one\n", task("  - echo never\n"));
    let waiting = apply(&client, &config, dir).await;
    waiting.stop(false).await.unwrap();
    let stopped = finish(&waiting).await;
    assert_eq!(
        (stopped.status, stopped.termination_reason.as_deref()),
        (RunStatus::Terminated, Some("stopped_by_user"))
    );
    assert!(waiting.jobs().await.unwrap().is_empty());
}

/// `priority` orders the waiting queue: a task of priority 100, applied after tasks of lower
/// priority that wait for the host, starts before every one of them still waiting then (those
/// already queued on the agent behind the running task keep their place).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_of_higher_priority_jumps_the_waiting_queue() {
    let home = Home::new();
    let client = home
        .client_with_sweep_period(Duration::from_secs(3600))
        .await;
    let cpus = host_cpus(&client);
    // Each task needs the whole host: one runs at a time.
    let whole = |commands: &str, priority: u32| {
        format!(
            "{}priority: {priority}\n",
            sized_task(commands, cpus, "0.1")
        )
    };
    let leader = apply(&client, &whole("  - sleep 3\n", 0), home.path()).await;
    wait_running(&leader).await;
    let low = client
        .runs()
        .apply_all(copies(&whole("  - sleep 0.2\n", 10), 6, home.path()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Which of them still wait in the queue (not handed to the agent).
    let mut waiting = Vec::new();
    for run in &low {
        if run.jobs().await.unwrap()[0].status == JobStatus::Submitted {
            waiting.push(run);
        }
    }
    assert!(!waiting.is_empty(), "some tasks wait in the queue");
    let urgent = apply(&client, &whole("  - 'true'\n", 100), home.path()).await;
    assert_done(&urgent).await;
    async fn started(run: &RunHandle) -> u64 {
        run.jobs().await.unwrap()[0].started_at_ms.unwrap()
    }
    let urgent_start = started(&urgent).await;
    for run in &low {
        assert_done(run).await;
    }
    for run in waiting {
        let start = started(run).await;
        assert!(
            urgent_start < start,
            "priority 100 started at {urgent_start}, a waiting one of priority 10 at {start}"
        );
    }
}

/// `stop_duration` is the grace a job that traps SIGTERM gets: one whose cleanup fits in it
/// finishes the cleanup; one whose cleanup does not is killed when it has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_duration_gives_a_trapping_job_its_grace_and_no_more() {
    let home = Home::new();
    let client = home.client().await;
    let dir = home.path();
    let trapping = |cleanup_secs: u32, stop_duration: &str| {
        format!(
            "{}stop_duration: {stop_duration}\n",
            task(&format!(
                "  - trap 'echo got TERM; sleep {cleanup_secs}; echo cleaned up; exit 0' TERM\n  \
                 - echo started\n  - while true; do sleep 0.1; done\n"
            ))
        )
    };
    let patient = apply(&client, &trapping(2, "60s"), dir).await;
    let hasty = apply(&client, &trapping(60, "1s"), dir).await;
    for run in [&patient, &hasty] {
        wait_running(run).await;
        wait_logs(run, |l| l.contains("started")).await;
    }
    let stopped = std::time::Instant::now();
    patient.stop(false).await.unwrap();
    hasty.stop(false).await.unwrap();
    finish(&hasty).await;
    assert!(
        stopped.elapsed() < Duration::from_secs(30),
        "killed after its 1 s grace, not after its 60 s cleanup: {:?}",
        stopped.elapsed()
    );
    let logs = all_logs(&hasty).await;
    assert!(
        logs.contains("got TERM") && !logs.contains("cleaned up"),
        "{logs}"
    );
    finish(&patient).await;
    let logs = all_logs(&patient).await;
    assert!(
        logs.contains("got TERM\n") && logs.contains("cleaned up\n"),
        "{logs}"
    );
}
