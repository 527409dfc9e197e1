//! Sessions of jobs that run in containers: the session's program is `docker exec`ed in the
//! job's container (its environment, working directory and user are the container's), with
//! a terminal of the engine's when the client asked for one.

use bollard::container::LogOutput;
use bollard::exec::{StartExecOptions, StartExecResults};
use bollard::models::ExecConfig;
use bollard::query_parameters::ResizeExecOptions;
use bollard::Docker;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc::UnboundedReceiver;

use super::pty::WindowSize;
use super::session::{refuse, Input, Output, Program, Terminal};
use super::world::World;

/// Starts the best shell the image has (`bash`, else `sh`) in place of `sh` itself.
const SHELL: &str =
    "if command -v bash >/dev/null 2>&1; then exec bash \"$@\"; else exec sh \"$@\"; fi";

/// Runs OpenSSH's SFTP server if the image has one.
const SFTP: &str = "for s in /usr/lib/openssh/sftp-server /usr/libexec/openssh/sftp-server \
    /usr/lib/ssh/sftp-server /usr/libexec/sftp-server; do [ -x \"$s\" ] && exec \"$s\"; done; \
    echo 'dstack: the image has no SFTP server (install openssh-sftp-server)' >&2; exit 127";

/// How long a session waits for its job's container to run (its image pulled, the repo put
/// in): after that the exec is tried all the same and its error told.
const START_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Waits (at most [`START_WAIT`]) while container `name` is not made yet or made but not
/// started; a running or ended one is answered at once.
async fn started(docker: &Docker, name: &str) {
    use bollard::models::ContainerStateStatusEnum as Status;
    let deadline = tokio::time::Instant::now() + START_WAIT;
    while tokio::time::Instant::now() < deadline {
        let waiting = match docker.inspect_container(name, None).await {
            Ok(inspected) => inspected
                .state
                .and_then(|state| state.status)
                .is_some_and(|status| status == Status::CREATED),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => true,
            Err(_) => false,
        };
        if !waiting {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Runs `program` in container `name` of the engine at `socket` until it ends; returns its
/// exit status.
pub(crate) async fn run(
    socket: &str,
    name: &str,
    world: &World,
    program: Program,
    terminal: Option<Terminal>,
    mut input: UnboundedReceiver<Input>,
    mut output: Output,
) -> u32 {
    let docker = match Docker::connect_with_unix(socket, 600, bollard::API_DEFAULT_VERSION) {
        Ok(docker) => docker,
        Err(e) => {
            return refuse(
                &mut output,
                &format!("cannot reach the container engine: {e}"),
            )
            .await
        }
    };
    // A container job is `running` from the moment its image is being made ready: a session
    // opened that early waits for the container to run.
    started(&docker, name).await;
    let cmd: Vec<String> = match program {
        Program::Command(command) => vec!["/bin/sh".into(), "-c".into(), command],
        Program::Shell => vec!["/bin/sh".into(), "-c".into(), SHELL.into(), "sh".into()],
        Program::Sftp => vec!["/bin/sh".into(), "-c".into(), SFTP.into()],
    };
    let tty = terminal.is_some();
    let config = ExecConfig {
        attach_stdin: Some(true),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        tty: Some(tty),
        env: terminal.as_ref().map(|t| vec![format!("TERM={}", t.term)]),
        cmd: Some(cmd),
        working_dir: Some(world.working_dir.clone()).filter(|d| !d.is_empty()),
        ..Default::default()
    };
    let exec = match docker.create_exec(name, config).await {
        Ok(exec) => exec.id,
        Err(e) => {
            let message = format!("cannot start a process in the container: {e}");
            return refuse(&mut output, &message).await;
        }
    };
    let options = StartExecOptions {
        detach: false,
        tty,
        output_capacity: None,
    };
    let (mut stream, mut stdin) = match docker.start_exec(&exec, Some(options)).await {
        Ok(StartExecResults::Attached { output, input }) => (output, Some(input)),
        Ok(StartExecResults::Detached) => {
            return refuse(&mut output, "the process was detached").await
        }
        Err(e) => {
            let message = format!("cannot start a process in the container: {e}");
            return refuse(&mut output, &message).await;
        }
    };
    if let Some(terminal) = &terminal {
        resize(&docker, &exec, terminal.size).await;
    }
    loop {
        tokio::select! {
            chunk = stream.next() => match chunk {
                Some(Ok(LogOutput::StdErr { message })) => {
                    let _ = output.stderr.write_all(&message).await;
                }
                Some(Ok(LogOutput::StdOut { message } | LogOutput::Console { message })) => {
                    let _ = output.stdout.write_all(&message).await;
                }
                Some(Ok(LogOutput::StdIn { .. })) => {}
                Some(Err(_)) | None => break,
            },
            Some(event) = input.recv() => match event {
                Input::Data(data) => {
                    if let Some(pipe) = stdin.as_mut() {
                        if pipe.write_all(&data).await.is_err() {
                            stdin = None;
                        }
                    }
                }
                Input::Eof => {
                    if let Some(mut pipe) = stdin.take() {
                        let _ = pipe.shutdown().await;
                    }
                }
                Input::Resize(size) => resize(&docker, &exec, size).await,
                // The engine's exec API sends no signals; a terminal's ^C reaches it as input.
                Input::Signal(_) => {}
                // Dropping the connection ends a terminal's processes (SIGHUP).
                Input::Hangup => break,
            },
        }
    }
    let _ = output.stdout.flush().await;
    let _ = output.stderr.flush().await;
    match docker.inspect_exec(&exec).await {
        Ok(inspected) => inspected.exit_code.map_or(255, |c| (c & 0xff) as u32),
        Err(_) => 255,
    }
}

async fn resize(docker: &Docker, exec: &str, size: WindowSize) {
    let clamp = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
    let options = ResizeExecOptions {
        h: clamp(size.rows),
        w: clamp(size.cols),
    };
    let _ = docker.resize_exec(exec, options).await;
}
