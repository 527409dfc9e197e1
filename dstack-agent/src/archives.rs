//! The archives jobs start from (`repos:` and `files:`): kept once per host by their SHA-256
//! (`<state>/archives/<hash>`), whatever number of jobs start from them, and unpacked before
//! a job starts — into the host's filesystem for a process, into the container for an
//! `image:` job.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bollard::query_parameters::{DownloadFromContainerOptions, UploadToContainerOptions};
use bollard::Docker;
use bytes::Bytes;
use dstack_core::archive::{self, Archive, IfExists, RepoClone};
use futures_util::StreamExt;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::state::random_hex;

/// How long an archive no job was submitted with is kept.
const ARCHIVE_TTL: Duration = Duration::from_secs(24 * 3600);

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
        // A name of its own: two uploads of one archive at once must not write one file.
        let suffix = random_hex(8).map_err(|e| e.to_string())?;
        let temp = self.dir.join(format!(".{hash}.{suffix}"));
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
            self.prune(ARCHIVE_TTL);
            Ok(())
        }
        .await;
        if written.is_err() {
            let _ = fs::remove_file(&temp);
        }
        written
    }

    /// Marks `archives` as needed now (a job was submitted with them); an error names the
    /// first the agent lacks (its client uploads archives before the jobs that need them).
    pub fn hold(&self, archives: &[Archive]) -> Result<(), String> {
        let now = SystemTime::now();
        for (_, file) in self.files(archives)? {
            // Best effort: an archive that cannot be marked is kept a day from its arrival.
            let _ = fs::File::options()
                .append(true)
                .open(&file)
                .and_then(|f| f.set_modified(now));
        }
        Ok(())
    }

    /// Removes the archives no job was submitted with for `ttl` (the engine uploads an
    /// archive again when a later job needs it), and uploads left half-written as long.
    fn prune(&self, ttl: Duration) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|at| at.elapsed().is_ok_and(|age| age > ttl));
            if stale {
                let _ = fs::remove_file(entry.path());
            }
        }
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

    /// Puts a host process's repo and files in place (blocking): the repo given by URL
    /// cloned, then the archives unpacked, relative targets from `base`, `~` from the job's
    /// `HOME`. Sets `DSTACK_WORKING_DIR` (and `DSTACK_REPO_DIR` for a repo) in `env`; returns
    /// the working directory.
    pub fn unpack_for_host(
        &self,
        sources: (&[Archive], Option<&RepoClone>),
        base: &str,
        working_dir: String,
        env: &mut BTreeMap<String, String>,
    ) -> Result<String, String> {
        let (archives, clone) = sources;
        let home = env.get("HOME").cloned().unwrap_or_else(|| "/".to_string());
        if let Some(clone) = clone {
            let dir = archive::target_dir(&clone.path, base, &home);
            clone_repo(clone, Path::new(&dir), env)?;
            env.insert("DSTACK_REPO_DIR".to_string(), dir);
        }
        for (archive, file) in self.files(archives)? {
            let dir = archive::target_dir(&archive.path, base, &home);
            archive::unpack(&file, Path::new(&dir), archive.if_exists)
                .map_err(|e| format!("cannot unpack {} into {dir}: {e}", what(archive)))?;
            if archive.repo {
                env.insert("DSTACK_REPO_DIR".to_string(), dir);
            }
        }
        env.insert("DSTACK_WORKING_DIR".to_string(), working_dir.clone());
        Ok(working_dir)
    }

    /// Puts a container's repo and files (created, not started) into it: a repo given by
    /// URL cloned on the host in `scratch` first; relative targets from `working_dir`
    /// (absolute), `~` from `/root`.
    pub async fn unpack_into_container(
        &self,
        docker: &Docker,
        container: &str,
        spec: (&[Archive], Option<&RepoClone>),
        working_dir: &str,
        scratch: &Path,
    ) -> Result<(), String> {
        let (archives, clone) = spec;
        if let Some(clone) = clone {
            let dir = archive::target_dir(&clone.path, working_dir, "/root");
            if !in_the_way(docker, container, &dir, clone.if_exists, "the repo").await? {
                let (clone, checkout) = (clone.clone(), scratch.join("clone"));
                let tar = tokio::task::spawn_blocking(move || {
                    let _ = fs::remove_dir_all(&checkout);
                    clone_repo(&clone, &checkout, &BTreeMap::new())?;
                    let packed =
                        archive::pack_tree(&checkout, &checkout.with_extension("tar"), u64::MAX)
                            .map_err(|e| format!("cannot pack the clone: {e}"))?;
                    let _ = fs::remove_dir_all(&checkout);
                    let tar = archive::prefixed(&packed.file, &dir).map_err(|e| e.to_string());
                    let _ = fs::remove_dir_all(checkout.with_extension("tar"));
                    tar.map(|t| (t, dir))
                })
                .await
                .map_err(|e| e.to_string())??;
                upload(docker, container, tar.0, &tar.1, "the repo").await?;
            }
        }
        for (archive, file) in self.files(archives)? {
            let dir = archive::target_dir(&archive.path, working_dir, "/root");
            if in_the_way(docker, container, &dir, archive.if_exists, what(archive)).await? {
                continue;
            }
            let prefix = dir.clone();
            let tar = tokio::task::spawn_blocking(move || archive::prefixed(&file, &prefix))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("cannot read {}: {e}", what(archive)))?;
            upload(docker, container, tar, &dir, what(archive)).await?;
        }
        Ok(())
    }
}

/// Whether `dir` of the container is to be left alone (`if_exists: skip` and it holds
/// something); an error when it holds something and `if_exists` is `error`.
async fn in_the_way(
    docker: &Docker,
    container: &str,
    dir: &str,
    if_exists: IfExists,
    what: &str,
) -> Result<bool, String> {
    if if_exists == IfExists::Merge || !occupied(docker, container, dir).await {
        return Ok(false);
    }
    match if_exists {
        IfExists::Skip => Ok(true),
        _ => Err(format!(
            "cannot put {what} into {dir}: it exists and is not empty (the repo's \
             `if_exists: skip` leaves it as it is)"
        )),
    }
}

/// Unpacks `tar` (entries named from `/`) into the container.
async fn upload(
    docker: &Docker,
    container: &str,
    tar: Vec<u8>,
    dir: &str,
    what: &str,
) -> Result<(), String> {
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
        .map_err(|e| format!("cannot put {what} into {dir}: {e}"))
}

/// How long a clone may take.
const CLONE_TIMEOUT: Duration = Duration::from_secs(600);

/// Clones `clone` into `dir` with the host's git (blocking), as its `if_exists` says, with
/// the repo's credentials when `dstack init` registered some; `env` is the job's (its
/// `HOME` finds the user's own git credentials). Nothing is asked on a terminal.
fn clone_repo(clone: &RepoClone, dir: &Path, env: &BTreeMap<String, String>) -> Result<(), String> {
    if clone.if_exists != IfExists::Merge && archive::occupied(dir).map_err(|e| e.to_string())? {
        return match clone.if_exists {
            IfExists::Skip => Ok(()),
            _ => Err(format!(
                "cannot clone the repo into {}: it exists and is not empty (the repo's \
                 `if_exists: skip` leaves it as it is)",
                dir.display()
            )),
        };
    }
    // Never read as options of git.
    for (what, value) in [("branch", &clone.branch), ("hash", &clone.hash)] {
        if let Some(value) = value.as_deref().filter(|v| v.starts_with('-')) {
            return Err(format!("invalid repo {what} {value}"));
        }
    }
    let mut args: Vec<std::ffi::OsString> = vec!["clone".into(), "--quiet".into()];
    if let Some(branch) = &clone.branch {
        args.extend(["--branch".into(), branch.into()]);
    }
    if clone.single_branch {
        args.push("--single-branch".into());
    }
    args.extend(["--".into(), clone.url.clone().into(), dir.into()]);
    let creds = match &clone.creds {
        Some(creds) => dstack_core::repos::git_env(creds)
            .map_err(|e| format!("cannot prepare the repo's credentials: {e}"))?,
        None => Default::default(),
    };
    let mut env = env.clone();
    env.extend(creds.vars.clone());
    let env = &env;
    dstack_core::repos::run_git(&args, env, CLONE_TIMEOUT)?;
    if let Some(hash) = &clone.hash {
        let checkout: Vec<std::ffi::OsString> = vec![
            "-C".into(),
            dir.into(),
            "-c".into(),
            "advice.detachedHead=false".into(),
            "checkout".into(),
            "--quiet".into(),
            hash.into(),
            "--".into(),
        ];
        dstack_core::repos::run_git(&checkout, env, CLONE_TIMEOUT)?;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archives_no_job_was_submitted_with_for_a_day_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let archives = Archives::new(dir.path().to_path_buf());
        let (old, held) = ("a".repeat(64), "b".repeat(64));
        let day_ago = SystemTime::now() - Duration::from_secs(25 * 3600);
        for hash in [&old, &held] {
            let file = fs::File::create(dir.path().join(hash)).unwrap();
            file.set_modified(day_ago).unwrap();
        }
        let archive = |hash: &str| Archive {
            hash: hash.to_string(),
            bytes: 0,
            path: ".".to_string(),
            if_exists: IfExists::Merge,
            repo: false,
        };
        archives.hold(&[archive(&held)]).unwrap();
        archives.prune(ARCHIVE_TTL);
        assert!(archives.find(&old).is_none());
        assert!(archives.find(&held).is_some());
        let missing = archives.hold(&[archive(&old)]).unwrap_err();
        assert!(missing.contains("was not uploaded"), "{missing}");
    }
}
