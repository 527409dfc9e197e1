//! Pseudo-terminals of interactive SSH sessions: the master side, read and written without
//! blocking a thread, and resized when the client's window changes.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use rustix::pty::OpenptFlags;
use rustix::termios::Winsize;
use tokio::io::unix::AsyncFd;

/// The size of a terminal window, as the client reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct WindowSize {
    /// Columns.
    pub cols: u32,
    /// Rows.
    pub rows: u32,
    /// Width in pixels (0: unknown).
    pub width: u32,
    /// Height in pixels (0: unknown).
    pub height: u32,
}

impl WindowSize {
    fn winsize(self) -> Winsize {
        let clamp = |n: u32| u16::try_from(n).unwrap_or(u16::MAX);
        Winsize {
            ws_row: clamp(self.rows),
            ws_col: clamp(self.cols),
            ws_xpixel: clamp(self.width),
            ws_ypixel: clamp(self.height),
        }
    }
}

/// The master side of a pseudo-terminal.
pub(crate) struct PtyMaster {
    fd: AsyncFd<OwnedFd>,
}

/// Opens a pseudo-terminal of `size`: its master, and its terminal (the side a session's
/// processes get as standard input, output and error). Both are close-on-exec, so no other
/// process the agent starts inherits them.
pub(crate) fn open(size: WindowSize) -> io::Result<(PtyMaster, OwnedFd)> {
    let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
    let master = rustix::pty::openpt(flags)?;
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    let terminal = rustix::pty::ioctl_tiocgptpeer(&master, flags)?;
    rustix::termios::tcsetwinsize(&master, size.winsize())?;
    rustix::io::ioctl_fionbio(&master, true)?;
    // `AsyncFd::new` is deprecated for inner values whose descriptor may change or close
    // while registered; an `OwnedFd` owned by the `AsyncFd` cannot (the replacement is
    // `unsafe`, which this workspace forbids).
    #[allow(deprecated)]
    let fd = AsyncFd::new(master)?;
    Ok((PtyMaster { fd }, terminal))
}

impl PtyMaster {
    /// Reads what the session's processes wrote; `Ok(0)` once none of them holds the
    /// terminal any more.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| Ok(rustix::io::read(fd.get_ref(), &mut *buf)?)) {
                Ok(Ok(n)) => return Ok(n),
                // Linux answers EIO once the last process holding the terminal closed it.
                Ok(Err(e)) if e.raw_os_error() == Some(rustix::io::Errno::IO.raw_os_error()) => {
                    return Ok(0)
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes all of `data` (what the client typed).
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| Ok(rustix::io::write(fd.get_ref(), data)?)) {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    /// Resizes the terminal (its processes get SIGWINCH).
    pub fn resize(&self, size: WindowSize) -> io::Result<()> {
        Ok(rustix::termios::tcsetwinsize(
            self.fd.get_ref().as_fd(),
            size.winsize(),
        )?)
    }
}
