//! Job output on disk (`output.log` plus the `output.idx` timestamp index) and streaming it to
//! clients, optionally following it while the job runs.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use dstack_core::agent::JobInfo;
use futures_util::Stream;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::watch;

use crate::state::unix_ms;

/// How much output is read (from the job or from the file) at a time.
pub(crate) const CHUNK: usize = 64 * 1024;

/// The output file of the job whose directory is `dir`.
pub(crate) fn log_path(dir: &Path) -> PathBuf {
    dir.join("output.log")
}

/// Appends output to a job's log, indexing every chunk as `<byte offset> <unix ms>` in
/// `output.idx`. Writes go straight to the files: nothing is buffered in the process.
pub(crate) struct LogWriter {
    log: File,
    idx: File,
    len: u64,
}

impl LogWriter {
    /// Opens (creating them if needed) the log files of the job whose directory is `dir`.
    pub fn open(dir: &Path) -> io::Result<Self> {
        let append = |name: &str| {
            OpenOptions::new()
                .append(true)
                .create(true)
                .open(dir.join(name))
        };
        let log = append("output.log")?;
        let len = log.metadata()?.len();
        let idx = append("output.idx")?;
        Ok(LogWriter { log, idx, len })
    }

    /// Appends a chunk of output; returns the new length of the log.
    pub fn append(&mut self, chunk: &[u8]) -> io::Result<u64> {
        let offset = self.len;
        self.log.write_all(chunk)?;
        self.len += chunk.len() as u64;
        self.idx
            .write_all(format!("{offset} {}\n", unix_ms()).as_bytes())?;
        Ok(self.len)
    }

    /// Appends an agent message (e.g. why the job failed) as a line of output.
    pub fn append_message(&mut self, message: &str) -> io::Result<u64> {
        self.append(format!("{message}\n").as_bytes())
    }

    /// The length of the log in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }
}

/// The output of a job from byte `offset`, as a stream of chunks of at most [`CHUNK`] bytes.
/// Without `follow` it ends at the current end of the file; with `follow` it waits for more
/// output (woken through `job`) and ends once the job has finished and every byte was sent.
pub(crate) async fn stream(
    path: &Path,
    offset: u64,
    follow: bool,
    job: watch::Receiver<JobInfo>,
) -> io::Result<impl Stream<Item = io::Result<Bytes>> + Send> {
    let mut file = tokio::fs::File::open(path).await?;
    file.seek(io::SeekFrom::Start(offset)).await?;
    let reader = Reader {
        file,
        pos: offset,
        follow,
        job,
    };
    Ok(futures_util::stream::try_unfold(reader, Reader::next))
}

struct Reader {
    file: tokio::fs::File,
    pos: u64,
    follow: bool,
    job: watch::Receiver<JobInfo>,
}

impl Reader {
    async fn next(mut self) -> io::Result<Option<(Bytes, Reader)>> {
        loop {
            let mut buf = BytesMut::with_capacity(CHUNK);
            let n = self.file.read_buf(&mut buf).await?;
            if n > 0 {
                self.pos += n as u64;
                return Ok(Some((buf.freeze(), self)));
            }
            // At the end of the file: the job's state tells whether more is coming. Marking the
            // state seen before waiting means no update between the two can be missed.
            let (finished, written) = {
                let info = self.job.borrow_and_update();
                (info.status.is_finished(), info.log_bytes)
            };
            if !self.follow || (finished && self.pos >= written) {
                return Ok(None);
            }
            if finished {
                // Everything is on disk: read to the end of the file, then stop.
                self.follow = false;
            } else if written <= self.pos && self.job.changed().await.is_err() {
                // The job was removed.
                return Ok(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_indexed_by_offset() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = LogWriter::open(dir.path()).unwrap();
        assert_eq!(log.append(b"hello ").unwrap(), 6);
        assert_eq!(log.append_message("world").unwrap(), 12);
        let mut log = LogWriter::open(dir.path()).unwrap();
        assert_eq!(log.len(), 12);
        log.append(b"!").unwrap();

        let text = std::fs::read_to_string(log_path(dir.path())).unwrap();
        assert_eq!(text, "hello world\n!");
        let idx = std::fs::read_to_string(dir.path().join("output.idx")).unwrap();
        let offsets: Vec<&str> = idx.lines().map(|l| l.split(' ').next().unwrap()).collect();
        assert_eq!(offsets, ["0", "6", "12"]);
    }
}
