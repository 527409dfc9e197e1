//! Job output on disk and streaming it to clients, optionally following it while the job runs.
//!
//! A job's output is split into files of at most [`Rotation::file_bytes`]: `output.log` holds
//! bytes from offset 0, `output.<N>.log` bytes from offset `N` on; each has its timestamp
//! index (`output.idx`, `output.<N>.idx`: `<byte offset> <unix ms>` per chunk). Only the last
//! [`Rotation::files`] files are kept: offsets stay those of the whole output, and a reader
//! asking for bytes that were deleted gets the oldest kept ones.
//!
//! The directory and its files are created only when the first output arrives: a job that
//! prints nothing has none, which reads as empty output.

use std::fs::{self, DirBuilder, File, OpenOptions};
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

/// How a job's output is split into files (see the module's documentation).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rotation {
    /// The most bytes one file holds.
    pub file_bytes: u64,
    /// How many files are kept, the one being written included (at least one).
    pub files: usize,
}

/// The file of the job whose directory is `dir` that holds its output from offset `base`
/// (`ext`: `log` for the output, `idx` for its index).
fn segment_path(dir: &Path, base: u64, ext: &str) -> PathBuf {
    match base {
        0 => dir.join(format!("output.{ext}")),
        _ => dir.join(format!("output.{base}.{ext}")),
    }
}

/// The offsets the output files in `dir` start at, in order; none if there is no directory.
fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut bases = Vec::new();
    for entry in entries {
        let name = entry?.file_name();
        let Some(name) = name.to_str().and_then(|n| n.strip_prefix("output.")) else {
            continue;
        };
        match name.strip_suffix(".log") {
            Some("") => {}
            Some(base) => {
                if let Ok(base) = base.parse() {
                    bases.push(base);
                }
            }
            None if name == "log" => bases.push(0),
            None => {}
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

/// Appends output to a job's log, indexing every chunk. Writes go straight to the files:
/// nothing is buffered in the process.
pub(crate) struct LogWriter {
    dir: PathBuf,
    rotation: Rotation,
    /// The current file and its index, once the first chunk has been written to them.
    files: Option<(File, File)>,
    /// The offset the current file starts at.
    base: u64,
    len: u64,
}

impl LogWriter {
    /// The log of the job whose directory is `dir`, continuing what is already there. No file
    /// is created until something is appended.
    pub fn open(dir: &Path, rotation: Rotation) -> io::Result<Self> {
        let base = segments(dir)?.last().copied().unwrap_or(0);
        let len = match segment_path(dir, base, "log").metadata() {
            Ok(meta) => base + meta.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => base,
            Err(e) => return Err(e),
        };
        Ok(LogWriter {
            dir: dir.to_path_buf(),
            rotation,
            files: None,
            base,
            len,
        })
    }

    /// The log of a job that has no output yet (its directory does not exist).
    pub fn empty(dir: &Path, rotation: Rotation) -> Self {
        LogWriter {
            dir: dir.to_path_buf(),
            rotation,
            files: None,
            base: 0,
            len: 0,
        }
    }

    /// Appends a chunk of output (starting a new file whenever the current one is full);
    /// returns the new length of the log.
    pub fn append(&mut self, mut chunk: &[u8]) -> io::Result<u64> {
        let file_bytes = self.rotation.file_bytes.max(1);
        while !chunk.is_empty() {
            if self.len - self.base >= file_bytes {
                self.rotate()?;
            }
            let room = file_bytes - (self.len - self.base);
            let (now, rest) = chunk.split_at(chunk.len().min(room as usize));
            let offset = self.len;
            let (log, idx) = match &mut self.files {
                Some(files) => files,
                files => files.insert(create_files(&self.dir, self.base)?),
            };
            log.write_all(now)?;
            self.len += now.len() as u64;
            idx.write_all(format!("{offset} {}\n", unix_ms()).as_bytes())?;
            chunk = rest;
        }
        Ok(self.len)
    }

    /// Starts a new file at the current end, deleting the files beyond the kept number.
    fn rotate(&mut self) -> io::Result<()> {
        self.files = None;
        self.base = self.len;
        let bases = segments(&self.dir)?;
        let keep = self.rotation.files.max(1) - 1; // besides the new one
        for base in &bases[..bases.len().saturating_sub(keep)] {
            for ext in ["log", "idx"] {
                match fs::remove_file(segment_path(&self.dir, *base, ext)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Appends an agent message (e.g. why the job failed) as a line of output.
    pub fn append_message(&mut self, message: &str) -> io::Result<u64> {
        self.append(format!("{message}\n").as_bytes())
    }

    /// The length of the log in bytes (of the whole output, deleted files included).
    pub fn len(&self) -> u64 {
        self.len
    }
}

/// Creates (if needed) the job directory `dir` (0700) and opens its output file starting at
/// `base` and that file's index (0600) for appending.
fn create_files(dir: &Path, base: u64) -> io::Result<(File, File)> {
    match DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let append = |ext: &str| {
        OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(segment_path(dir, base, ext))
    };
    Ok((append("log")?, append("idx")?))
}

/// The offset of the first chunk of output in `dir` written at `since_ms` (Unix ms) or later,
/// by the timestamp index; the end of the output when every kept chunk is older (a reader
/// starting there gets only what comes next). Only kept files are looked at.
pub(crate) fn offset_since(dir: &Path, since_ms: u64) -> io::Result<u64> {
    let bases = segments(dir)?;
    // The end is taken before the index is read: a chunk written meanwhile lies beyond it.
    let end = match bases.last() {
        Some(base) => match segment_path(dir, *base, "log").metadata() {
            Ok(meta) => base + meta.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => *base,
            Err(e) => return Err(e),
        },
        None => return Ok(0),
    };
    for base in bases {
        let index = match fs::read_to_string(segment_path(dir, base, "idx")) {
            Ok(index) => index,
            // Deleted by a rotation since it was listed: its chunks are gone anyway.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let first = index.lines().find_map(|line| {
            let (offset, at) = line.split_once(' ')?;
            let at: u64 = at.parse().ok()?;
            (at >= since_ms)
                .then(|| offset.parse::<u64>().ok())
                .flatten()
        });
        if let Some(offset) = first {
            return Ok(offset);
        }
    }
    Ok(end)
}

/// The output of the job whose directory is `dir` from byte `offset` (or from the oldest byte
/// kept, when later), as a stream of chunks of at most [`CHUNK`] bytes. Without `follow` it
/// ends at the current end of the output; with `follow` it waits for more output (woken
/// through `job`) and ends once the job has finished and every byte was sent. A log that does
/// not exist (yet) is empty output.
pub(crate) async fn stream(
    dir: &Path,
    offset: u64,
    follow: bool,
    job: watch::Receiver<JobInfo>,
) -> io::Result<impl Stream<Item = io::Result<Bytes>> + Send> {
    let reader = Reader {
        file: None,
        dir: dir.to_path_buf(),
        pos: offset,
        follow,
        job,
    };
    Ok(futures_util::stream::try_unfold(reader, Reader::next))
}

/// The output file holding offset `pos` of the output in `dir`, positioned there; `pos`
/// moves to the oldest byte kept if it was deleted. `None` if there is no output yet.
async fn open_at(dir: &Path, pos: &mut u64) -> io::Result<Option<tokio::fs::File>> {
    loop {
        let bases = segments(dir)?;
        let Some(first) = bases.first() else {
            return Ok(None);
        };
        *pos = (*pos).max(*first);
        let base = bases
            .iter()
            .rev()
            .find(|b| **b <= *pos)
            .copied()
            .unwrap_or(*first);
        let mut file = match tokio::fs::File::open(segment_path(dir, base, "log")).await {
            Ok(file) => file,
            // Deleted by a rotation since it was listed: look again.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        file.seek(io::SeekFrom::Start(*pos - base)).await?;
        return Ok(Some(file));
    }
}

struct Reader {
    /// The open output file; `None` until one is opened.
    file: Option<tokio::fs::File>,
    dir: PathBuf,
    pos: u64,
    follow: bool,
    job: watch::Receiver<JobInfo>,
}

impl Reader {
    async fn next(mut self) -> io::Result<Option<(Bytes, Reader)>> {
        loop {
            let opened = self.file.is_none();
            if opened {
                self.file = open_at(&self.dir, &mut self.pos).await?;
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
            if self.pos < written && !opened {
                // The output went on in a newer file.
                self.file = None;
                continue;
            }
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

    const ROTATION: Rotation = Rotation {
        file_bytes: 1 << 20,
        files: 2,
    };

    #[test]
    fn full_files_rotate_and_only_the_last_ones_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let rotation = Rotation {
            file_bytes: 10,
            files: 2,
        };
        let mut log = LogWriter::open(dir.path(), rotation).unwrap();
        assert_eq!(log.append(b"0123456789abcdefghij_").unwrap(), 21);
        assert_eq!(segments(dir.path()).unwrap(), [10, 20]);
        let read = |base| std::fs::read_to_string(segment_path(dir.path(), base, "log")).unwrap();
        assert_eq!((read(10).as_str(), read(20).as_str()), ("abcdefghij", "_"));
        // Reopened (an agent restart), it goes on where it was.
        let mut log = LogWriter::open(dir.path(), rotation).unwrap();
        assert_eq!(log.len(), 21);
        log.append(b"klmnopqrstu").unwrap();
        assert_eq!(segments(dir.path()).unwrap(), [20, 30]);
        assert_eq!((read(20).as_str(), read(30).as_str()), ("_klmnopqrs", "tu"));
        let idx = std::fs::read_to_string(segment_path(dir.path(), 30, "idx")).unwrap();
        assert!(idx.starts_with("30 "), "{idx}");
    }

    #[test]
    fn chunks_are_indexed_by_offset() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = LogWriter::open(dir.path(), ROTATION).unwrap();
        assert_eq!(log.append(b"hello ").unwrap(), 6);
        assert_eq!(log.append_message("world").unwrap(), 12);
        let mut log = LogWriter::open(dir.path(), ROTATION).unwrap();
        assert_eq!(log.len(), 12);
        log.append(b"!").unwrap();

        let text = std::fs::read_to_string(dir.path().join("output.log")).unwrap();
        assert_eq!(text, "hello world\n!");
        let idx = std::fs::read_to_string(dir.path().join("output.idx")).unwrap();
        let offsets: Vec<&str> = idx.lines().map(|l| l.split(' ').next().unwrap()).collect();
        assert_eq!(offsets, ["0", "6", "12"]);
    }

    #[test]
    fn the_offset_since_a_time_is_that_of_the_first_chunk_written_then_or_later() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(offset_since(dir.path(), 0).unwrap(), 0, "no output yet");
        let rotation = Rotation {
            file_bytes: 8,
            files: 3,
        };
        let mut log = LogWriter::open(dir.path(), rotation).unwrap();
        log.append(b"old\n").unwrap();
        // Chunks carry the time they were written: a later time starts a later chunk.
        let written = |log: &LogWriter| {
            let at = unix_ms();
            while unix_ms() == at {
                std::thread::yield_now();
            }
            (log.len(), unix_ms())
        };
        let (offset, at) = written(&log);
        log.append(b"new line\n").unwrap();
        log.append(b"newer\n").unwrap();
        assert_eq!(offset_since(dir.path(), at).unwrap(), offset);
        assert_eq!(offset_since(dir.path(), 0).unwrap(), 0);
        let (end, after) = written(&log);
        assert_eq!(
            offset_since(dir.path(), after).unwrap(),
            end,
            "nothing that new"
        );
    }

    #[test]
    fn files_are_created_with_the_first_output() {
        use std::os::unix::fs::PermissionsExt;

        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("job");
        let mut log = LogWriter::open(&dir, ROTATION).unwrap();
        assert_eq!(log.len(), 0);
        assert!(!dir.exists());
        log.append(b"x").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("output.log")), 0o600);
        assert_eq!(mode(&dir.join("output.idx")), 0o600);
    }
}
