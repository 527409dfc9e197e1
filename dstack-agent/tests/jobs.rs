//! Running jobs through the API: outcomes, environment, idempotence, max_duration, removal
//! and bad requests.

mod common;

use std::collections::BTreeMap;

use common::{group_alive, read_logs, shell_job, wait_finished, within, TestAgent};
use dstack_core::agent::{AgentClient, AgentError, AgentJobStatus, StopRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn a_successful_job_is_done_with_its_output() {
    let agent = TestAgent::start().await;
    let started = agent
        .client
        .submit(&shell_job("ok", "echo hi"))
        .await
        .unwrap();
    assert_eq!(started.id, "ok");

    let info = wait_finished(&agent.client, "ok").await;
    assert_eq!(info.status, AgentJobStatus::Done);
    assert_eq!(info.exit_status, Some(0));
    assert_eq!(info.termination_reason.as_deref(), Some("done_by_runner"));
    assert_eq!(info.log_bytes, 3);
    assert!(info.finished_at_ms.unwrap() >= info.started_at_ms);
    assert_eq!(read_logs(&agent.client, "ok", 0).await, "hi\n");
    assert_eq!(agent.client.jobs().await.unwrap(), vec![info]);
}

#[tokio::test]
async fn stdout_and_stderr_share_one_log_in_order() {
    let agent = TestAgent::start().await;
    let script = "echo 1; echo 2 >&2; echo 3; echo 4 >&2";
    agent
        .client
        .submit(&shell_job("both", script))
        .await
        .unwrap();
    wait_finished(&agent.client, "both").await;
    assert_eq!(read_logs(&agent.client, "both", 0).await, "1\n2\n3\n4\n");
}

#[tokio::test]
async fn a_non_zero_exit_fails_the_job() {
    let agent = TestAgent::start().await;
    agent
        .client
        .submit(&shell_job("bad", "exit 3"))
        .await
        .unwrap();
    let info = wait_finished(&agent.client, "bad").await;
    assert_eq!(info.status, AgentJobStatus::Failed);
    assert_eq!(info.exit_status, Some(3));
    assert_eq!(
        info.termination_reason.as_deref(),
        Some("container_exited_with_error")
    );
}

#[tokio::test]
async fn an_unknown_command_fails_with_127() {
    let agent = TestAgent::start().await;
    agent
        .client
        .submit(&shell_job("nf", "nosuchcmd"))
        .await
        .unwrap();
    let info = wait_finished(&agent.client, "nf").await;
    assert_eq!(info.status, AgentJobStatus::Failed);
    assert_eq!(info.exit_status, Some(127));
    assert!(read_logs(&agent.client, "nf", 0)
        .await
        .contains("nosuchcmd"));
}

#[tokio::test]
async fn a_missing_program_is_an_executor_error() {
    let agent = TestAgent::start().await;
    let mut job = shell_job("noprog", "");
    job.argv = vec!["/no/such/program".into()];
    let info = agent.client.submit(&job).await.unwrap();
    assert_eq!(info.status, AgentJobStatus::Failed);
    assert_eq!(info.termination_reason.as_deref(), Some("executor_error"));
    let message = "cannot start /no/such/program: No such file or directory";
    assert_eq!(info.termination_message.as_deref(), Some(message));
    assert_eq!(info.exit_status, None);
    assert_eq!(
        read_logs(&agent.client, "noprog", 0).await,
        format!("{message}\n")
    );
}

#[tokio::test]
async fn a_bare_program_name_is_found_on_the_jobs_own_path() {
    let agent = TestAgent::start().await;
    let scratch = agent.scratch();
    let tool = |dir: &str, mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch.join(dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("dstack-test-tool");
        std::fs::write(&file, format!("#!/bin/sh\necho {}\n", dir.display())).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    // Not executable, then a relative entry (from the working directory), then the rest.
    tool("first", 0o644);
    tool("second", 0o755);
    tool("third", 0o755);
    let mut job = shell_job("onpath", "");
    job.argv = vec!["dstack-test-tool".into()];
    job.working_dir = scratch.display().to_string();
    let path = format!(
        "{}:second:{}",
        scratch.join("first").display(),
        scratch.join("third").display()
    );
    job.env.insert("PATH".into(), path);
    agent.client.submit(&job).await.unwrap();
    let info = wait_finished(&agent.client, "onpath").await;
    assert_eq!(info.status, AgentJobStatus::Done);
    let second = scratch.join("second");
    assert_eq!(
        read_logs(&agent.client, "onpath", 0).await,
        format!("{}\n", second.display())
    );

    // A name the job's PATH does not hold is not looked up anywhere else.
    let mut job = shell_job("offpath", "");
    job.argv = vec!["sh".into()];
    job.env
        .insert("PATH".into(), scratch.join("third").display().to_string());
    let info = agent.client.submit(&job).await.unwrap();
    assert_eq!(info.status, AgentJobStatus::Failed);
    assert_eq!(info.termination_reason.as_deref(), Some("executor_error"));
    let message = "cannot start sh: No such file or directory";
    assert_eq!(info.termination_message.as_deref(), Some(message));
}

#[tokio::test]
async fn a_missing_working_dir_is_an_executor_error() {
    let agent = TestAgent::start().await;
    let mut job = shell_job("nodir", "echo never");
    job.working_dir = "/no/such/dir".into();
    let info = agent.client.submit(&job).await.unwrap();
    assert_eq!(info.status, AgentJobStatus::Failed);
    assert_eq!(info.termination_reason.as_deref(), Some("executor_error"));
    let message = "working directory /no/such/dir does not exist";
    assert_eq!(info.termination_message.as_deref(), Some(message));
    assert_eq!(
        read_logs(&agent.client, "nodir", 0).await,
        format!("{message}\n")
    );
    // It is a finished job like any other.
    assert_eq!(wait_finished(&agent.client, "nodir").await, info);
}

#[tokio::test]
async fn submitting_the_same_id_again_returns_the_existing_job() {
    let agent = TestAgent::start().await;
    let first = agent
        .client
        .submit(&shell_job("same", "echo first"))
        .await
        .unwrap();
    let again = agent
        .client
        .submit(&shell_job("same", "echo second"))
        .await
        .unwrap();
    assert_eq!(again.started_at_ms, first.started_at_ms);
    wait_finished(&agent.client, "same").await;
    let after = agent
        .client
        .submit(&shell_job("same", "echo third"))
        .await
        .unwrap();
    assert_eq!(after.status, AgentJobStatus::Done);
    assert_eq!(agent.client.jobs().await.unwrap().len(), 1);
    assert_eq!(read_logs(&agent.client, "same", 0).await, "first\n");
}

#[tokio::test]
async fn the_environment_and_working_dir_are_exactly_what_was_given_plus_the_metrics_file() {
    let agent = TestAgent::start().await;
    let scratch = agent.scratch().canonicalize().unwrap();
    let mut job = shell_job("env", "");
    job.argv = vec!["/usr/bin/env".into()];
    job.env = BTreeMap::from([
        ("FOO".to_string(), "bar baz".to_string()),
        ("EMPTY".to_string(), String::new()),
    ]);
    job.working_dir = scratch.display().to_string();
    agent.client.submit(&job).await.unwrap();
    wait_finished(&agent.client, "env").await;
    let mut lines: Vec<String> = read_logs(&agent.client, "env", 0)
        .await
        .lines()
        .map(String::from)
        .collect();
    lines.sort();
    let metrics = lines.remove(0);
    assert!(
        metrics.starts_with("DSTACK_METRICS_FILE=/") && metrics.ends_with("/metrics.jsonl"),
        "{metrics}"
    );
    assert_eq!(lines, ["EMPTY=", "FOO=bar baz"]);

    let mut job = shell_job("pwd", "pwd");
    job.working_dir = scratch.display().to_string();
    agent.client.submit(&job).await.unwrap();
    wait_finished(&agent.client, "pwd").await;
    let pwd = read_logs(&agent.client, "pwd", 0).await;
    assert_eq!(pwd.trim(), scratch.display().to_string());
}

#[tokio::test]
async fn max_duration_terminates_the_job() {
    let agent = TestAgent::start().await;
    let mut job = shell_job("slow", "echo $$; exec sleep 1000");
    job.max_duration_secs = Some(1);
    agent.client.submit(&job).await.unwrap();
    let pgid = common::leader_pid(&agent.client, "slow").await;
    let info = wait_finished(&agent.client, "slow").await;
    assert_eq!(info.status, AgentJobStatus::Terminated);
    assert_eq!(
        info.termination_reason.as_deref(),
        Some("max_duration_exceeded")
    );
    assert_eq!(info.exit_status, Some(-15));
    assert!(
        info.finished_at_ms.unwrap() - info.started_at_ms >= 1000,
        "{info:?}"
    );
    common::eventually("the process group to die", || !group_alive(pgid)).await;
}

#[tokio::test]
async fn background_processes_end_with_the_job() {
    let agent = TestAgent::start().await;
    let job = shell_job("bg", "sleep 1000 & echo $!");
    agent.client.submit(&job).await.unwrap();
    let info = wait_finished(&agent.client, "bg").await;
    assert_eq!(info.status, AgentJobStatus::Done);
    let pid: i32 = read_logs(&agent.client, "bg", 0)
        .await
        .trim()
        .parse()
        .unwrap();
    common::eventually("the background sleep to die", || !common::alive(pid)).await;
}

#[tokio::test]
async fn a_process_leaving_the_group_does_not_keep_the_job_running() {
    let agent = TestAgent::start().await;
    let scratch = agent.scratch();
    // The escaped process keeps the job's output open, but the job ends with its leader.
    let script = "setsid sh -c 'echo $$ > escaped.pid; exec sleep 1000' & \
                  while [ ! -s escaped.pid ]; do sleep 0.05; done; echo leader done";
    let mut job = shell_job("escape", script);
    job.working_dir = scratch.display().to_string();
    agent.client.submit(&job).await.unwrap();
    let info = wait_finished(&agent.client, "escape").await;
    let escaped: i32 = std::fs::read_to_string(scratch.join("escaped.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(common::alive(escaped));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(escaped),
        nix::sys::signal::SIGKILL,
    )
    .unwrap();
    assert_eq!(info.status, AgentJobStatus::Done);
    assert_eq!(read_logs(&agent.client, "escape", 0).await, "leader done\n");
}

#[tokio::test]
async fn jobs_are_removed_only_once_finished() {
    let agent = TestAgent::start().await;
    agent
        .client
        .submit(&shell_job("rm", "exec sleep 1000"))
        .await
        .unwrap();
    let err = agent.client.remove("rm").await.unwrap_err();
    assert!(
        matches!(err, AgentError::Status { status: 409, .. }),
        "{err}"
    );

    let abort = StopRequest {
        abort: true,
        grace_secs: 0,
        reason: "aborted_by_user".into(),
    };
    agent.client.stop("rm", &abort).await.unwrap();
    wait_finished(&agent.client, "rm").await;
    agent.client.remove("rm").await.unwrap();
    assert_eq!(agent.client.job("rm").await.unwrap(), None);
    assert!(!agent.state_dir().join("jobs/rm").exists());
    let err = agent.client.remove("rm").await.unwrap_err();
    assert!(
        matches!(err, AgentError::Status { status: 404, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn bad_requests_get_plain_text_errors() {
    let agent = TestAgent::start().await;
    let status = |e: AgentError| match e {
        AgentError::Status {
            status, message, ..
        } => {
            assert!(!message.is_empty());
            status
        }
        other => panic!("{other}"),
    };
    assert_eq!(agent.client.job("nope").await.unwrap(), None);
    let stop = StopRequest {
        abort: false,
        grace_secs: 1,
        reason: "terminated_by_user".into(),
    };
    assert_eq!(
        status(agent.client.stop("nope", &stop).await.unwrap_err()),
        404
    );
    assert_eq!(
        status(agent.client.logs("nope", 0, false).await.err().unwrap()),
        404
    );
    assert_eq!(
        status(
            agent
                .client
                .submit(&shell_job("../x", "true"))
                .await
                .unwrap_err()
        ),
        400
    );
    let mut no_argv = shell_job("empty", "");
    no_argv.argv.clear();
    assert_eq!(
        status(agent.client.submit(&no_argv).await.unwrap_err()),
        400
    );

    let token = agent.token();
    let raw = |request: &'static str| {
        let socket = agent.client.socket().unwrap().to_path_buf();
        let authorized = format!("\r\nauthorization: Bearer {token}\r\n");
        let request = request.replacen("\r\n", &authorized, 1);
        async move {
            let mut stream = tokio::net::UnixStream::connect(socket).await.unwrap();
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            answer
        }
    };
    let answer = within(
        "an answer to bad JSON",
        raw("POST /api/jobs HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\nconnection: close\r\n\r\n{x}"),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("invalid request body"), "{answer}");
    let answer = within(
        "an answer to an unknown path",
        raw("GET /api/nothing HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n"),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    let answer = within(
        "an answer to a bad log offset",
        raw("GET /api/jobs/x/logs?offset=z HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n"),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // The agent is still fine, and cleans up its socket when shut down.
    agent.client.healthcheck().await.unwrap();
    let socket = agent.client.socket().unwrap().to_path_buf();
    agent.shut_down().await;
    assert!(!socket.exists());
}

#[tokio::test]
async fn metrics_written_by_a_job_are_served_until_it_is_removed() {
    let agent = TestAgent::start().await;
    let script = r#"echo '{"loss": 1}' >> "$DSTACK_METRICS_FILE"; echo '{"loss": 0.5}' >> "$DSTACK_METRICS_FILE""#;
    agent
        .client
        .submit(&shell_job("metered", script))
        .await
        .unwrap();
    wait_finished(&agent.client, "metered").await;
    let metrics = agent.client.metrics("metered").await.unwrap();
    assert_eq!(&metrics[..], b"{\"loss\": 1}\n{\"loss\": 0.5}\n");

    agent
        .client
        .submit(&shell_job("quiet", "true"))
        .await
        .unwrap();
    wait_finished(&agent.client, "quiet").await;
    assert!(agent.client.metrics("quiet").await.unwrap().is_empty());

    agent.client.remove("metered").await.unwrap();
    assert!(agent.client.metrics("metered").await.is_err());
}

#[tokio::test]
async fn requests_without_the_agent_token_are_refused() {
    let agent = TestAgent::start().await;
    let token = agent.token();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(agent.state_dir().join("agent.token"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(token.len(), 64);
    let status = |e: AgentError| match e {
        AgentError::Status { status, .. } => status,
        other => panic!("{other}"),
    };
    for client in [
        AgentClient::unix(agent.socket()),
        AgentClient::unix(agent.socket()).with_token("not-the-token"),
        AgentClient::unix(agent.socket()).with_token(&token[..63]),
    ] {
        assert_eq!(status(client.jobs().await.unwrap_err()), 401);
        let job = shell_job("intruder", "echo hi");
        assert_eq!(status(client.submit(&job).await.unwrap_err()), 401);
        assert_eq!(status(client.remove("x").await.unwrap_err()), 401);
        // Who it is can be asked without the token (a starter checks the agent's build).
        assert!(client.healthcheck().await.is_ok());
    }
    assert!(agent.client.jobs().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_job_is_given_nothing_that_points_into_the_agent_state_or_its_token() {
    let agent = TestAgent::start().await;
    let mut job = shell_job("look", "env; cat \"$DSTACK_MPI_HOSTFILE\"");
    job.mpi_hostfile = Some("10.0.0.1\n10.0.0.2\n".to_string());
    agent.client.submit(&job).await.unwrap();
    assert_eq!(
        wait_finished(&agent.client, "look").await.exit_status,
        Some(0)
    );
    let seen = read_logs(&agent.client, "look", 0).await;
    assert!(seen.contains("10.0.0.2"), "{seen}");
    assert!(seen.contains("DSTACK_METRICS_FILE="), "{seen}");
    let state = agent.state_dir();
    let dir = agent.dir.path().display().to_string();
    assert!(!seen.contains(&state.display().to_string()), "{seen}");
    assert!(!seen.contains(&dir), "{seen}");
    assert!(!seen.contains(agent.token().trim()), "{seen}");
    // Its private directory is the user's own and goes with the job.
    let metrics = seen
        .lines()
        .find_map(|l| l.strip_prefix("DSTACK_METRICS_FILE="))
        .map(std::path::PathBuf::from)
        .unwrap();
    let private = metrics.parent().unwrap().to_path_buf();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&private).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o700);
    agent.client.remove("look").await.unwrap();
    assert!(!private.exists());
}

#[tokio::test]
async fn finished_jobs_beyond_the_retention_are_removed_with_their_output() {
    let limits = dstack_agent::Limits {
        finished_jobs: 3,
        ..Default::default()
    };
    let agent = TestAgent::start_with(tempfile::tempdir().unwrap(), limits).await;
    agent
        .client
        .submit(&shell_job("running", "sleep 30"))
        .await
        .unwrap();
    for i in 0..6 {
        let id = format!("job{i}");
        agent
            .client
            .submit(&shell_job(&id, &format!("echo {i}")))
            .await
            .unwrap();
        wait_finished(&agent.client, &id).await;
    }
    let ids = job_ids(&agent.client).await;
    assert_eq!(ids, ["job3", "job4", "job5", "running"]);
    assert!(!agent.state_dir().join("jobs/job0").exists());
    assert!(agent.state_dir().join("jobs/job5").exists());
    // A restart keeps the same ones.
    agent
        .client
        .stop(
            "running",
            &StopRequest {
                abort: true,
                grace_secs: 0,
                reason: "test".into(),
            },
        )
        .await
        .unwrap();
    wait_finished(&agent.client, "running").await;
    let ids = job_ids(&agent.client).await;
    assert_eq!(ids, ["job4", "job5", "running"]);
}

#[tokio::test]
async fn no_container_may_mount_the_agent_state_or_socket() {
    let agent = TestAgent::start().await;
    let state = agent.state_dir().display().to_string();
    let socket_dir = agent.dir.path().display().to_string();
    let beside = tempfile::tempdir().unwrap();
    let scratch = beside.path().display().to_string();
    for host in [
        state.clone(),
        format!("{state}/jobs"),
        socket_dir,
        "/".to_string(),
    ] {
        let mut job = shell_job("boxed", "true");
        job.container = Some(dstack_core::agent::ContainerSpec {
            image: "alpine".to_string(),
            mounts: vec![(host.clone(), "/mnt".to_string())],
            ..Default::default()
        });
        let refused = agent.client.submit(&job).await.unwrap_err();
        assert!(
            matches!(&refused, AgentError::Status { status: 400, message, .. } if message.contains("agent's own files")),
            "{host}: {refused}"
        );
    }
    // A directory beside them is fine (the job then fails for want of a container engine,
    // or runs where there is one).
    let mut job = shell_job("boxed", "true");
    job.container = Some(dstack_core::agent::ContainerSpec {
        image: "alpine".to_string(),
        mounts: vec![(scratch, "/mnt".to_string())],
        ..Default::default()
    });
    agent.client.submit(&job).await.unwrap();
}

/// The ids of the jobs an agent keeps, sorted.
async fn job_ids(client: &dstack_core::agent::AgentClient) -> Vec<String> {
    let mut ids: Vec<String> = client
        .jobs()
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect();
    ids.sort();
    ids
}
