//! Sessions of jobs that run as processes of the host: the session's program runs as the
//! agent's user (the job's), in the job's working directory with the job's environment, in
//! a process group of its own (with a pseudo-terminal: a session of its own, the terminal
//! its controlling one).

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;

use super::pty::{self, PtyMaster};
use super::session::{exit_code, refuse, Input, Output, Program, Terminal, OUTPUT_DRAIN};
use super::world::World;

/// How long a session's processes have after SIGHUP (the client went away) before they are
/// killed.
const HANGUP_GRACE: Duration = Duration::from_secs(5);

/// Where OpenSSH's SFTP server is installed, by distribution.
const SFTP_SERVERS: &[&str] = &[
    "/usr/lib/openssh/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/lib/ssh/sftp-server",
    "/usr/libexec/sftp-server",
];

/// `setsid` (util-linux), which starts a terminal session's shell as the leader of a new
/// session with the terminal as its controlling one (`--ctty`): job control works.
const SETSID: &[&str] = &["/usr/bin/setsid", "/bin/setsid"];

/// Runs `program` until it ends (or the client hangs up); returns its exit status.
pub(crate) async fn run(
    world: &World,
    program: Program,
    terminal: Option<Terminal>,
    input: UnboundedReceiver<Input>,
    mut output: Output,
) -> u32 {
    let argv = match argv(world, &program) {
        Ok(argv) => argv,
        Err(message) => return refuse(&mut output, &message).await,
    };
    let started = match terminal {
        Some(terminal) => with_terminal(world, &argv, &terminal, input, output).await,
        None => with_pipes(world, &argv, input, output).await,
    };
    match started {
        Ok(code) => code,
        Err((mut output, e)) => {
            let message = format!("cannot start {}: {e}", argv[0]);
            refuse(&mut output, &message).await
        }
    }
}

/// The program and arguments of a session.
fn argv(world: &World, program: &Program) -> Result<Vec<String>, String> {
    Ok(match program {
        Program::Command(command) => vec![world.shell.clone(), "-c".into(), command.clone()],
        Program::Shell => vec![world.shell.clone()],
        Program::Sftp => vec![first_existing(SFTP_SERVERS)
            .ok_or("no SFTP server (OpenSSH's sftp-server) is installed on this host")?
            .to_string()],
    })
}

fn first_existing(paths: &[&'static str]) -> Option<&'static str> {
    paths.iter().copied().find(|p| Path::new(p).is_file())
}

/// A command of `argv` in the job's world (nothing of the agent's environment).
fn command(world: &World, argv: &[String]) -> Command {
    let mut command = Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .env_clear()
        .envs(world.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&world.working_dir);
    command
}

type Failed = (Output, io::Error);

/// Runs `argv` with its standard input, output and error on pipes.
async fn with_pipes(
    world: &World,
    argv: &[String],
    mut input: UnboundedReceiver<Input>,
    output: Output,
) -> Result<u32, Failed> {
    let mut command = command(world, argv);
    command
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => return Err((output, e)),
    };
    drop(command);
    let group = child.id();
    let stdin = child.stdin.take();
    let copies = [
        child.stdout.take().map(|out| copy(out, output.stdout)),
        child.stderr.take().map(|err| copy(err, output.stderr)),
    ];
    let status = watch(&mut child, group, &mut input, &mut Sink::Pipe(stdin)).await;
    drain(copies.into_iter().flatten()).await;
    Ok(status)
}

/// Runs `argv` on a new pseudo-terminal, as the leader of a session whose controlling
/// terminal it is.
async fn with_terminal(
    world: &World,
    argv: &[String],
    terminal: &Terminal,
    mut input: UnboundedReceiver<Input>,
    output: Output,
) -> Result<u32, Failed> {
    let (master, tty) = match pty::open(terminal.size) {
        Ok(opened) => opened,
        Err(e) => return Err((output, e)),
    };
    let mut argv = argv.to_vec();
    if let Some(setsid) = first_existing(SETSID) {
        argv.splice(0..0, [setsid.to_string(), "--ctty".to_string()]);
    }
    let mut command = command(world, &argv);
    command.env("TERM", &terminal.term);
    let stdio = |fd: &OwnedFd| fd.try_clone().map(Stdio::from);
    let spawned = (|| {
        command
            .stdin(stdio(&tty)?)
            .stdout(stdio(&tty)?)
            .stderr(stdio(&tty)?);
        command.spawn()
    })();
    // Only the session's processes hold the terminal: its end is the end of the output.
    drop(command);
    drop(tty);
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => return Err((output, e)),
    };
    let group = child.id();
    let master = Arc::new(master);
    let reader = master.clone();
    let mut stdout = output.stdout;
    let copy = tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = reader.read(&mut buf).await {
            if stdout.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = stdout.flush().await;
    });
    let status = watch(&mut child, group, &mut input, &mut Sink::Terminal(master)).await;
    drain([copy]).await;
    Ok(status)
}

/// Where the client's input goes.
enum Sink {
    /// The standard input pipe (closed at the end of the input).
    Pipe(Option<tokio::process::ChildStdin>),
    /// The pseudo-terminal.
    Terminal(Arc<PtyMaster>),
}

impl Sink {
    async fn take(&mut self, event: Input) {
        match (self, event) {
            (Sink::Pipe(stdin), Input::Data(data)) => {
                if let Some(pipe) = stdin.as_mut() {
                    if pipe.write_all(&data).await.is_err() {
                        *stdin = None;
                    }
                }
            }
            (Sink::Pipe(stdin), Input::Eof) => *stdin = None,
            (Sink::Terminal(master), Input::Data(data)) => {
                let _ = master.write_all(&data).await;
            }
            (Sink::Terminal(master), Input::Resize(size)) => {
                let _ = master.resize(size);
            }
            _ => {}
        }
    }
}

/// Waits for `child` while passing the client's input to `sink`; signals go to the process
/// group `group`, and a hangup sends it SIGHUP (SIGKILL after [`HANGUP_GRACE`]). Returns the
/// exit status.
async fn watch(
    child: &mut Child,
    group: Option<u32>,
    input: &mut UnboundedReceiver<Input>,
    sink: &mut Sink,
) -> u32 {
    let signal = |signal: Signal| {
        if let Some(pgid) = group {
            let _ = killpg(Pid::from_raw(pgid as i32), signal);
        }
    };
    let mut kill_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            status = child.wait() => {
                return status.map_or(255, exit_code);
            }
            Some(event) = input.recv() => match event {
                Input::Hangup => {
                    signal(Signal::SIGHUP);
                    kill_at.get_or_insert(tokio::time::Instant::now() + HANGUP_GRACE);
                }
                Input::Signal(sent) => signal(sent),
                event => sink.take(event).await,
            },
            () = crate::supervisor::sleep_until(kill_at) => {
                signal(Signal::SIGKILL);
                kill_at = None;
            }
        }
    }
}

/// Copies a process's output to the channel.
fn copy(
    mut from: impl AsyncRead + Unpin + Send + 'static,
    mut to: Box<dyn AsyncWrite + Send + Unpin>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut from, &mut to).await;
        let _ = to.flush().await;
    })
}

/// Waits for the output copies, [`OUTPUT_DRAIN`] at most (then drops what is left).
async fn drain(copies: impl IntoIterator<Item = JoinHandle<()>>) {
    let copies: Vec<JoinHandle<()>> = copies.into_iter().collect();
    let aborts: Vec<_> = copies.iter().map(|c| c.abort_handle()).collect();
    let all = async {
        for copy in copies {
            let _ = copy.await;
        }
    };
    if tokio::time::timeout(OUTPUT_DRAIN, all).await.is_err() {
        aborts.iter().for_each(|a| a.abort());
    }
}
