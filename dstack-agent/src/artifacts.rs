//! A job's artifacts as the engine reads them (`GET`/`POST /api/jobs/{id}/artifacts`): the
//! files under the job's `artifacts` paths, relative to its working directory, listed with
//! their SHA-256 and served as a tar of the files the engine lacks.
//!
//! While a host process runs they are read where it writes them; a running container's are
//! copied out through the container engine's archive API first (`<scratch>/snapshot`). When
//! the job ends, before its fresh directory or its container is removed, the agent keeps them
//! as they are in `<scratch>/artifacts` (moved out of a fresh directory, copied out of any
//! other), and serves them from there from then on: what the engine saves last is what the
//! job left, whatever runs in that directory afterwards.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use bollard::query_parameters::DownloadFromContainerOptions;
use bollard::Docker;
use bytes::Bytes;
use dstack_core::agent::ArtifactListing;
use dstack_core::artifacts::{self, FileEntry, Header, END};
use futures_util::{Stream, StreamExt};

use crate::jobs::{Job, JobError};

/// Where the files a job left are kept, in its private directory.
const KEPT: &str = "artifacts";

/// Where a running container's files are copied to be listed and served.
const SNAPSHOT: &str = "snapshot";

/// At most this many hashes are remembered (then forgotten all at once).
const MAX_REMEMBERED: usize = 100_000;

/// The hashes of files already read, by path, size and modification time: a snapshot hashes
/// only what changed since the last.
#[derive(Default)]
pub(crate) struct Hashes {
    known: Mutex<HashMap<PathBuf, (u64, SystemTime, String)>>,
}

impl Hashes {
    fn hash(&self, path: &Path, meta: &fs::Metadata) -> io::Result<String> {
        let modified = meta.modified()?;
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((size, at, hash)) = known.get(path) {
            if *size == meta.len() && *at == modified {
                return Ok(hash.clone());
            }
        }
        drop(known);
        let hash = dstack_core::archive::hash_of(fs::File::open(path)?)?;
        known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if known.len() >= MAX_REMEMBERED {
            known.clear();
        }
        known.insert(path.to_path_buf(), (meta.len(), modified, hash.clone()));
        Ok(hash)
    }
}

/// The job's artifact paths, normalized (those that would leave its directory are left out).
fn paths(job: &Job) -> Vec<String> {
    job.spec()
        .artifacts
        .iter()
        .filter_map(|p| artifacts::normalize(p))
        .collect()
}

/// The directory the job's artifacts are read from now, and whether the job has ended; a
/// running container's files are copied out first.
async fn source(job: &Job, containers: Option<&str>) -> Result<(PathBuf, bool), JobError> {
    if job.info().status.is_finished() {
        return Ok((job.scratch().join(KEPT), true));
    }
    if job.spec().container.is_none() {
        return Ok((job.host_working_dir(), false));
    }
    let snapshot = job.scratch().join(SNAPSHOT);
    let _ = fs::remove_dir_all(&snapshot);
    let docker = connect(containers)?;
    let name = crate::container::name(&job.spec().id);
    let working_dir = container_working_dir(&docker, &name, job).await;
    copy_out(&docker, &name, &working_dir, &paths(job), &snapshot).await?;
    Ok((snapshot, false))
}

/// `GET /api/jobs/{id}/artifacts`.
pub(crate) async fn list(
    job: &Job,
    containers: Option<&str>,
    hashes: std::sync::Arc<Hashes>,
) -> Result<ArtifactListing, JobError> {
    let (root, ended) = source(job, containers).await?;
    let paths = paths(job);
    let files = tokio::task::spawn_blocking(move || walk(&root, &paths, &hashes))
        .await
        .map_err(|e| JobError::Io(io::Error::other(e)))??;
    Ok(ArtifactListing { ended, files })
}

/// The files under `paths` of `root` (regular files only: symlinks are not followed), with
/// their hashes, in path order.
fn walk(root: &Path, paths: &[String], hashes: &Hashes) -> io::Result<Vec<FileEntry>> {
    let mut found = Vec::new();
    let mut pending: Vec<String> = paths.to_vec();
    while let Some(rel) = pending.pop() {
        let path = root.join(&rel);
        let meta = match fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if meta.is_dir() {
            for entry in fs::read_dir(&path)? {
                let name = entry?.file_name();
                pending.push(format!("{rel}/{}", name.to_string_lossy()));
            }
        } else if meta.is_file() {
            found.push(FileEntry {
                hash: hashes.hash(&path, &meta)?,
                size: meta.len(),
                mode: meta.permissions().mode() & 0o777,
                path: rel,
            });
        }
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    found.dedup_by(|a, b| a.path == b.path);
    Ok(found)
}

/// `POST /api/jobs/{id}/artifacts`: a tar of the files `wanted` (paths of the listing; others
/// are left out) as they are now, streamed; a running container's as its last listing copied
/// them out.
pub(crate) fn archive(
    job: &Job,
    wanted: Vec<String>,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let root = if job.info().status.is_finished() {
        job.scratch().join(KEPT)
    } else if job.spec().container.is_some() {
        job.scratch().join(SNAPSHOT)
    } else {
        job.host_working_dir()
    };
    let allowed = paths(job);
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(8);
    tokio::task::spawn_blocking(move || {
        let within = |p: &String| {
            allowed
                .iter()
                .any(|a| p == a || p.starts_with(&format!("{a}/")))
        };
        for rel in wanted.iter().filter_map(|p| artifacts::normalize(p)) {
            if !within(&rel) {
                continue;
            }
            if let Err(e) = send_file(&tx, &root.join(&rel), &rel) {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        }
        let _ = tx.blocking_send(Ok(Bytes::from_static(&END)));
    });
    tokio_stream(rx)
}

/// Sends one file's entry (a file gone meanwhile is left out).
fn send_file(
    tx: &tokio::sync::mpsc::Sender<io::Result<Bytes>>,
    path: &Path,
    rel: &str,
) -> io::Result<()> {
    // Never through a symlink put there since the listing.
    let nofollow = nix::fcntl::OFlag::O_NOFOLLOW.bits();
    let opened = fs::OpenOptions::new()
        .read(true)
        .custom_flags(nofollow)
        .open(path);
    let mut file = match opened {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Ok(());
    }
    let entry = FileEntry {
        path: rel.to_string(),
        hash: String::new(),
        size: meta.len(),
        mode: meta.permissions().mode() & 0o777,
    };
    let header = Header::of(&entry)?;
    let send = |bytes: Bytes| {
        tx.blocking_send(Ok(bytes))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the reader went away"))
    };
    send(Bytes::from(header.bytes))?;
    // Exactly the size the header says, whatever the file does meanwhile.
    let mut left = entry.size;
    let mut buf = vec![0u8; 64 * 1024];
    while left > 0 {
        let want = buf.len().min(left as usize);
        let n = file.read(&mut buf[..want])?;
        if n == 0 {
            send(Bytes::from(vec![0u8; left as usize]))?;
            break;
        }
        send(Bytes::copy_from_slice(&buf[..n]))?;
        left -= n as u64;
    }
    send(Bytes::from(vec![0u8; header.padding]))
}

/// The receiver as a stream.
fn tokio_stream(
    rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

/// Keeps a host process's artifacts as it left them, before its fresh directory (if it has
/// one) is removed: moved out of a fresh directory, copied out of any other.
pub(crate) fn keep_host(job: &Job, fresh: bool) {
    let (from, to) = (job.host_working_dir(), job.scratch().join(KEPT));
    for rel in paths(job) {
        let (source, target) = (from.join(&rel), to.join(&rel));
        let kept = target
            .parent()
            .map_or(Ok(()), fs::create_dir_all)
            .and_then(|()| match fs::symlink_metadata(&source) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
                Ok(_) if fresh => fs::rename(&source, &target),
                Ok(_) => copy_tree(&source, &target),
            });
        if let Err(e) = kept {
            eprintln!(
                "dstack-agent: cannot keep artifact {rel} of job {}: {e}",
                job.spec().id
            );
        }
    }
}

/// Copies the regular files and directories under `from` to `to` (symlinks are left out).
fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(from)?;
    if meta.is_dir() {
        fs::create_dir_all(to)?;
        for entry in fs::read_dir(from)? {
            let entry = entry?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
    } else if meta.is_file() {
        fs::copy(from, to)?;
    }
    Ok(())
}

/// Keeps a container's artifacts as it left them (before it is removed).
pub(crate) async fn keep_container(docker: &Docker, name: &str, working_dir: &str, job: &Job) {
    let to = job.scratch().join(KEPT);
    if let Err(e) = copy_out(docker, name, working_dir, &paths(job), &to).await {
        eprintln!(
            "dstack-agent: cannot keep the artifacts of job {}: {e}",
            job.spec().id
        );
    }
}

/// The working directory of the job's container (its own, else its image's).
async fn container_working_dir(docker: &Docker, name: &str, job: &Job) -> String {
    match job.spec().working_dir.as_str() {
        "" => crate::container::image_working_dir(docker, name).await,
        dir => dir.to_string(),
    }
}

fn connect(containers: Option<&str>) -> Result<Docker, JobError> {
    let socket =
        containers.ok_or_else(|| JobError::Conflict("the agent has no container engine".into()))?;
    Docker::connect_with_unix(socket, 600, bollard::API_DEFAULT_VERSION)
        .map_err(|e| JobError::Io(io::Error::other(e)))
}

/// Copies `paths` (relative to `working_dir`) out of container `name` into `to` (a path
/// missing in the container is left out), streaming each through a file.
async fn copy_out(
    docker: &Docker,
    name: &str,
    working_dir: &str,
    paths: &[String],
    to: &Path,
) -> io::Result<()> {
    fs::create_dir_all(to)?;
    for rel in paths {
        let options = DownloadFromContainerOptions {
            path: dstack_core::archive::target_dir(rel, working_dir, "/root"),
        };
        let mut stream = std::pin::pin!(docker.download_from_container(name, Some(options)));
        let tar = to.join(format!(".{}.tar", uuid_like()));
        let mut file = io::BufWriter::new(fs::File::create(&tar)?);
        let mut missing = false;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) => io::Write::write_all(&mut file, &chunk)?,
                Err(_) => {
                    missing = true;
                    break;
                }
            }
        }
        drop(file);
        // The archive's entries start with the path's last part: unpack beside it.
        let parent = match rel.rsplit_once('/') {
            Some((parent, _)) => to.join(parent),
            None => to.to_path_buf(),
        };
        let unpacked = if missing {
            Ok(())
        } else {
            fs::create_dir_all(&parent).and_then(|()| {
                let mut archive = tar::Archive::new(io::BufReader::new(fs::File::open(&tar)?));
                archive.set_preserve_mtime(true);
                archive.unpack(&parent)
            })
        };
        let _ = fs::remove_file(&tar);
        unpacked?;
    }
    Ok(())
}

/// A name no other copy uses at once.
fn uuid_like() -> String {
    crate::state::random_hex(8).unwrap_or_else(|_| "copy".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_walk_lists_files_under_the_paths_with_their_hashes_and_rehashes_only_changes() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("data/sub")).unwrap();
        fs::write(dir.path().join("data/sub/a"), "a").unwrap();
        fs::write(dir.path().join("data/b"), "bb").unwrap();
        fs::write(dir.path().join("model.bin"), "m").unwrap();
        fs::write(dir.path().join("other"), "not listed").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("data/link")).unwrap();
        let hashes = Hashes::default();
        let paths = ["data".to_string(), "model.bin".into(), "gone".into()];
        let files = walk(dir.path(), &paths, &hashes).unwrap();
        let listed: Vec<(&str, u64)> = files.iter().map(|f| (f.path.as_str(), f.size)).collect();
        assert_eq!(listed, [("data/b", 2), ("data/sub/a", 1), ("model.bin", 1)]);
        assert_eq!(
            files[1].hash,
            dstack_core::archive::hash_of(&b"a"[..]).unwrap()
        );
        fs::write(dir.path().join("data/b"), "changed").unwrap();
        let again = walk(dir.path(), &paths, &hashes).unwrap();
        assert_eq!(
            again[0].hash,
            dstack_core::archive::hash_of(&b"changed"[..]).unwrap()
        );
    }
}
