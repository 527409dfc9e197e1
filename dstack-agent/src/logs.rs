//! Job output on disk (`output.log` plus the `output.idx` timestamp index, in the job's
//! directory) and streaming it to clients, optionally following it while the job runs.
//!
//! The directory and its files are created only when the first output arrives: a job that
//! prints nothing has none, which reads as empty output.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
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
    dir: PathBuf,
    /// The log and the index, once the first chunk has been written.
    files: Option<(File, File)>,
    len: u64,
}

impl LogWriter {
    /// The log of the job whose directory is `dir`, continuing what is already there. No file
    /// is created until something is appended.
    pub fn open(dir: &Path) -> io::Result<Self> {
        let len = match log_path(dir).metadata() {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        Ok(LogWriter {
            dir: dir.to_path_buf(),
            files: None,
            len,
        })
    }

    /// The log of a job that has no output yet (its directory does not exist).
    pub fn empty(dir: &Path) -> Self {
        LogWriter {
            dir: dir.to_path_buf(),
            files: None,
            len: 0,
        }
    }

    /// Appends a chunk of output; returns the new length of the log.
    pub fn append(&mut self, chunk: &[u8]) -> io::Result<u64> {
        let offset = self.len;
        let (log, idx) = match &mut self.files {
            Some(files) => files,
            files => files.insert(create_files(&self.dir)?),
        };
        log.write_all(chunk)?;
        self.len += chunk.len() as u64;
        idx.write_all(format!("{offset} {}\n", unix_ms()).as_bytes())?;
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

/// Creates (if needed) the job directory `dir` (0700) and opens its log and index (0600) for
/// appending.
fn create_files(dir: &Path) -> io::Result<(File, File)> {
    match DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let append = |name: &str| {
        OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(dir.join(name))
    };
    Ok((append("output.log")?, append("output.idx")?))
}

/// The output of a job from byte `offset`, as a stream of chunks of at most [`CHUNK`] bytes.
/// Without `follow` it ends at the current end of the file; with `follow` it waits for more
/// output (woken through `job`) and ends once the job has finished and every byte was sent.
/// A log file that does not exist (yet) is empty output.
pub(crate) async fn stream(
    path: &Path,
    offset: u64,
    follow: bool,
    job: watch::Receiver<JobInfo>,
) -> io::Result<impl Stream<Item = io::Result<Bytes>> + Send> {
    let reader = Reader {
        file: open_at(path, offset).await?,
        path: path.to_path_buf(),
        pos: offset,
        follow,
        job,
    };
    Ok(futures_util::stream::try_unfold(reader, Reader::next))
}

/// The file at `path` positioned at `offset`; `None` if it does not exist.
async fn open_at(path: &Path, offset: u64) -> io::Result<Option<tokio::fs::File>> {
    let mut file = match tokio::fs::File::open(path).await {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    file.seek(io::SeekFrom::Start(offset)).await?;
    Ok(Some(file))
}

struct Reader {
    /// The open log; `None` until it exists.
    file: Option<tokio::fs::File>,
    path: PathBuf,
    pos: u64,
    follow: bool,
    job: watch::Receiver<JobInfo>,
}

impl Reader {
    async fn next(mut self) -> io::Result<Option<(Bytes, Reader)>> {
        loop {
            if self.file.is_none() {
                self.file = open_at(&self.path, self.pos).await?;
            }
            if let Some(file) = &mut self.file {
                let mut buf = BytesMut::with_capacity(CHUNK);
                let n = file.read_buf(&mut buf).await?;
                if n > 0 {
                    self.pos += n as u64;
                    return Ok(Some((buf.freeze(), self)));
                }
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

    #[test]
    fn files_are_created_with_the_first_output() {
        use std::os::unix::fs::PermissionsExt;

        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("job");
        let mut log = LogWriter::open(&dir).unwrap();
        assert_eq!(log.len(), 0);
        assert!(!dir.exists());
        log.append(b"x").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&log_path(&dir)), 0o600);
        assert_eq!(mode(&dir.join("output.idx")), 0o600);
    }
}
