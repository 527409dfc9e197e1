//! Session channels: `exec`, `shell` (with or without a pseudo-terminal) and the `sftp`
//! subsystem, each run as processes of the job's world, with what the client sends as their
//! input and their output, window changes and exit status sent back.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use russh::server::Msg;
use russh::{Channel, ChannelMsg, ChannelWriteHalf};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::pty::WindowSize;
use super::world::{Place, World};

/// How long a session's output may stay open after its process ended (a background process
/// can hold it forever); later output is dropped.
pub(crate) const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

/// What a session channel runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Program {
    /// A command line, run by the job's shell (`exec`).
    Command(String),
    /// The job's shell (`shell`).
    Shell,
    /// The SFTP server (`subsystem sftp`: `scp`, `sftp`, IDEs copying files).
    Sftp,
}

/// The pseudo-terminal a client asked for.
#[derive(Clone, Debug)]
pub(crate) struct Terminal {
    /// `TERM`.
    pub term: String,
    /// Its initial size.
    pub size: WindowSize,
}

/// What the client sends to a running session.
#[derive(Debug)]
pub(crate) enum Input {
    /// Bytes for the program's standard input (or terminal).
    Data(Bytes),
    /// The end of the input.
    Eof,
    /// The terminal's new size.
    Resize(WindowSize),
    /// A signal for the session's processes (`ssh`'s `signal` request).
    Signal(nix::sys::signal::Signal),
    /// The client went away: end the session's processes.
    Hangup,
}

/// Where a session's output goes: the channel's data and extended (stderr) data.
pub(crate) struct Output {
    /// Standard output (or the terminal).
    pub stdout: Box<dyn AsyncWrite + Send + Unpin>,
    /// Standard error.
    pub stderr: Box<dyn AsyncWrite + Send + Unpin>,
}

/// Serves one session channel until its program ends (or the client closes it).
pub(crate) async fn serve(channel: Channel<Msg>, world: Arc<World>) {
    let (mut read, write) = channel.split();
    let mut terminal: Option<Terminal> = None;
    let program = loop {
        match read.wait().await {
            None | Some(ChannelMsg::Close) => return,
            Some(ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                pix_width,
                pix_height,
                ..
            }) => {
                let size = WindowSize {
                    cols: col_width,
                    rows: row_height,
                    width: pix_width,
                    height: pix_height,
                };
                terminal = Some(Terminal { term, size });
            }
            Some(ChannelMsg::Exec { command, .. }) => {
                break Program::Command(String::from_utf8_lossy(&command).into_owned())
            }
            Some(ChannelMsg::RequestShell { .. }) => break Program::Shell,
            Some(ChannelMsg::RequestSubsystem { name, .. }) if name == "sftp" => {
                break Program::Sftp
            }
            Some(_) => {}
        }
    };
    let (inputs, input) = mpsc::unbounded_channel();
    let output = Output {
        stdout: Box::new(write.make_writer()),
        stderr: Box::new(write.make_writer_ext(Some(1))),
    };
    let world_run = world.clone();
    let mut done = tokio::spawn(async move {
        match &world_run.place {
            Place::Host => super::host::run(&world_run, program, terminal, input, output).await,
            Place::Container { socket, name } => {
                super::container::run(socket, name, &world_run, program, terminal, input, output)
                    .await
            }
        }
    });
    loop {
        tokio::select! {
            ended = &mut done => {
                let code = ended.unwrap_or(255);
                finish(&write, code).await;
                return;
            }
            msg = read.wait() => {
                let input = match msg {
                    Some(ChannelMsg::Data { data }) => Input::Data(data),
                    Some(ChannelMsg::Eof) => Input::Eof,
                    Some(ChannelMsg::WindowChange { col_width, row_height, pix_width, pix_height }) => {
                        Input::Resize(WindowSize {
                            cols: col_width,
                            rows: row_height,
                            width: pix_width,
                            height: pix_height,
                        })
                    }
                    Some(ChannelMsg::Signal { signal }) => match unix_signal(&signal) {
                        Some(signal) => Input::Signal(signal),
                        None => continue,
                    },
                    None | Some(ChannelMsg::Close) => {
                        let _ = inputs.send(Input::Hangup);
                        // The client is gone: nothing more is sent; the program is ended.
                        let _ = done.await;
                        return;
                    }
                    Some(_) => continue,
                };
                let _ = inputs.send(input);
            }
        }
    }
}

/// The signal an SSH `signal` request names (RFC 4254 names, without `SIG`).
fn unix_signal(signal: &russh::Sig) -> Option<nix::sys::signal::Signal> {
    use nix::sys::signal::Signal;
    use russh::Sig;
    Some(match signal {
        Sig::ABRT => Signal::SIGABRT,
        Sig::ALRM => Signal::SIGALRM,
        Sig::FPE => Signal::SIGFPE,
        Sig::HUP => Signal::SIGHUP,
        Sig::ILL => Signal::SIGILL,
        Sig::INT => Signal::SIGINT,
        Sig::KILL => Signal::SIGKILL,
        Sig::PIPE => Signal::SIGPIPE,
        Sig::QUIT => Signal::SIGQUIT,
        Sig::SEGV => Signal::SIGSEGV,
        Sig::TERM => Signal::SIGTERM,
        Sig::USR1 => Signal::SIGUSR1,
        Sig::Custom(name) => format!("SIG{name}").parse().ok()?,
    })
}

/// Sends the exit status, then ends and closes the channel.
async fn finish(write: &ChannelWriteHalf<Msg>, code: u32) {
    let _ = write.exit_status(code).await;
    let _ = write.eof().await;
    let _ = write.close().await;
}

/// The exit status an SSH client reports for a process that ended with `status`: its code,
/// or 128 + the signal that killed it (as shells report it).
pub(crate) fn exit_code(status: std::process::ExitStatus) -> u32 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u32 & 0xff,
        (None, Some(signal)) => 128 + signal as u32,
        (None, None) => 255,
    }
}

/// Tells the client why nothing runs; the exit status is 127 (as a shell's "not found").
pub(crate) async fn refuse(output: &mut Output, message: &str) -> u32 {
    let _ = output
        .stderr
        .write_all(format!("dstack: {message}\r\n").as_bytes())
        .await;
    let _ = output.stderr.flush().await;
    127
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    #[test]
    fn signal_requests_name_unix_signals() {
        assert_eq!(unix_signal(&russh::Sig::INT), Some(Signal::SIGINT));
        assert_eq!(
            unix_signal(&russh::Sig::Custom("USR2".into())),
            Some(Signal::SIGUSR2)
        );
        assert_eq!(unix_signal(&russh::Sig::Custom("NOPE".into())), None);
    }
}
