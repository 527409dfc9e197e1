//! The archives jobs start from (`repos:` and `files:`): kept once per host by their SHA-256
//! (`<state>/archives/<hash>`), whatever number of jobs start from them, and unpacked before
//! a job starts — into the host's filesystem for a process, into the container for an
//! `image:` job.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use bollard::query_parameters::{DownloadFromContainerOptions, UploadToContainerOptions};
use bollard::Docker;
use bytes::Bytes;
use dstack_core::archive::{self, Archive, IfExists};
use futures_util::StreamExt;
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// The largest archive the agent takes (its clients apply the run's own, smaller limit).
pub const MAX_ARCHIVE_BYTES: u64 = 4 * 1024 * 1024 * 1024;

/// The archives of a host.
pub(crate) struct Archives {
    dir: PathBuf,
}

impl Archives {
    /// The archives kept in `dir` (created when the first arrives).
    pub fn new(dir: PathBuf) -> Self {
        Archives { dir }
    }

    /// The file of the archive with `hash`, if the agent holds it.
    pub fn find(&self, hash: &str) -> Option<PathBuf> {
        let path = self.dir.join(hash);
        (archive::is_hash(hash) && path.is_file()).then_some(path)
    }

    /// Stores the archive sent as `body`, refused unless its SHA-256 is `hash`.
    pub async fn put(&self, hash: &str, mut body: Incoming) -> Result<(), String> {
        if !archive::is_hash(hash) {
            return Err(format!("{hash} is not a SHA-256 in lowercase hex"));
        }
        fs::create_dir_all(&self.dir).map_err(|e| format!("cannot keep archives: {e}"))?;
        let temp = self.dir.join(format!(".{hash}.{}", std::process::id()));
        let written = async {
            let mut file = io::BufWriter::new(
                fs::File::create(&temp).map_err(|e| format!("cannot keep archives: {e}"))?,
            );
            let mut bytes = 0u64;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| format!("the upload broke off: {e}"))?;
                if let Ok(data) = frame.into_data() {
                    bytes += data.len() as u64;
                    if bytes > MAX_ARCHIVE_BYTES {
                        return Err(format!(
                            "the archive is larger than {MAX_ARCHIVE_BYTES} bytes"
                        ));
                    }
                    file.write_all(&data)
                        .map_err(|e| format!("cannot keep the archive: {e}"))?;
                }
            }
            file.flush()
                .map_err(|e| format!("cannot keep the archive: {e}"))?;
            let got = archive::hash_of(fs::File::open(&temp).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
            if got != hash {
                return Err(format!("the archive's SHA-256 is {got}, not {hash}"));
            }
            fs::rename(&temp, self.dir.join(hash)).map_err(|e| e.to_string())?;
            eprintln!("dstack-agent: received archive {hash} ({bytes} bytes)");
            Ok(())
        }
        .await;
        if written.is_err() {
            let _ = fs::remove_file(&temp);
        }
        written
    }

    /// The files of `archives`, in order; an error names the first the agent lacks.
    fn files<'a>(&self, archives: &'a [Archive]) -> Result<Vec<(&'a Archive, PathBuf)>, String> {
        archives
            .iter()
            .map(|a| {
                self.find(&a.hash)
                    .map(|file| (a, file))
                    .ok_or_else(|| format!("archive {} was not uploaded to this host", a.hash))
            })
            .collect()
    }

    /// Unpacks a host process's archives (blocking) with relative targets from
    /// `working_dir`, `~` from the job's `HOME`. Sets `DSTACK_WORKING_DIR` (and
    /// `DSTACK_REPO_DIR` for a repo) in `env`; returns the working directory.
    pub fn unpack_for_host(
        &self,
        archives: &[Archive],
        working_dir: String,
        env: &mut BTreeMap<String, String>,
    ) -> Result<String, String> {
        let home = env.get("HOME").cloned().unwrap_or_else(|| "/".to_string());
        for (archive, file) in self.files(archives)? {
            let dir = archive::target_dir(&archive.path, &working_dir, &home);
            archive::unpack(&file, Path::new(&dir), archive.if_exists)
                .map_err(|e| format!("cannot unpack {} into {dir}: {e}", what(archive)))?;
            if archive.repo {
                env.insert("DSTACK_REPO_DIR".to_string(), dir);
            }
        }
        env.insert("DSTACK_WORKING_DIR".to_string(), working_dir.clone());
        Ok(working_dir)
    }

    /// Puts a container's archives (created, not started) into it, relative targets from
    /// `working_dir` (absolute), `~` from `/root`.
    pub async fn unpack_into_container(
        &self,
        docker: &Docker,
        container: &str,
        archives: &[Archive],
        working_dir: &str,
    ) -> Result<(), String> {
        for (archive, file) in self.files(archives)? {
            let dir = archive::target_dir(&archive.path, working_dir, "/root");
            if archive.if_exists != IfExists::Merge && occupied(docker, container, &dir).await {
                if archive.if_exists == IfExists::Skip {
                    continue;
                }
                return Err(format!(
                    "cannot unpack {} into {dir}: it exists and is not empty (the repo's \
                     `if_exists: skip` leaves it as it is)",
                    what(archive)
                ));
            }
            let prefix = dir.clone();
            let tar = tokio::task::spawn_blocking(move || archive::prefixed(&file, &prefix))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("cannot read {}: {e}", what(archive)))?;
            let options = UploadToContainerOptions {
                path: "/".to_string(),
                ..Default::default()
            };
            docker
                .upload_to_container(
                    container,
                    Some(options),
                    bollard::body_full(Bytes::from(tar)),
                )
                .await
                .map_err(|e| format!("cannot put {} into {dir}: {e}", what(archive)))?;
        }
        Ok(())
    }
}

/// Whether `dir` exists in the container and holds something: its archive (the engine's
/// `GET …/archive`) has an entry after the directory's own.
async fn occupied(docker: &Docker, container: &str, dir: &str) -> bool {
    let options = DownloadFromContainerOptions {
        path: dir.to_string(),
    };
    let mut stream = std::pin::pin!(docker.download_from_container(container, Some(options)));
    let mut head = Vec::new();
    while head.len() < 1024 {
        match stream.next().await {
            Some(Ok(chunk)) => head.extend_from_slice(&chunk),
            // Missing (404) or unreadable: nothing is in the way.
            Some(Err(_)) | None => break,
        }
    }
    // The second 512-byte header is zeros in an archive holding the directory alone.
    head.len() >= 1024 && head[512..1024].iter().any(|b| *b != 0)
}

/// Makes `dir`, a job's fresh working directory; its path.
pub fn fresh_dir(dir: &Path) -> Result<String, String> {
    fs::create_dir_all(dir).map_err(|e| format!("cannot create the job's directory: {e}"))?;
    Ok(dir.display().to_string())
}

/// How an archive is named in messages.
fn what(archive: &Archive) -> &'static str {
    if archive.repo {
        "the repo"
    } else {
        "files"
    }
}
