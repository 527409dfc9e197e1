//! Saving runs' artifacts (see [`crate::artifacts`]): every
//! [`EngineOptions::artifacts_period`](super::EngineOptions) for each running run that lists
//! `artifacts`, and once more when it ends (then frozen). A snapshot asks the run's first
//! job's agent for the list of its files with their hashes, fetches only the content the store
//! lacks (a tar streamed through a temporary file, hashed here: an agent's word on a hash is
//! never taken), and writes the run's manifest. Agents never see the store.
//!
//! Tags and `depends-on` go through here too: a tag copies a finished run's frozen manifest;
//! a dependency becomes an archive of the tagged files, unpacked like `files:`.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::StreamExt;
use tokio::sync::broadcast::error::RecvError;

use super::{EngineError, Inner};
use crate::archive::{Archive, IfExists};
use crate::artifacts::{self, ArtifactStore, FileEntry, Manifest, Tag, TagRef};
use crate::model::{now_ms, Job, Run};

/// Saves the artifacts of running runs periodically, and each run's last when it ends.
pub(crate) async fn keep(inner: Arc<Inner>) {
    let mut changes = inner.changes.subscribe();
    let mut tick = tokio::time::interval(inner.options.artifacts_period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let Ok(runs) = inner.store.running_runs() else { continue };
                for run in runs.into_iter().filter(saves) {
                    spawn_save(&inner, run, Busy::Skip);
                }
            }
            change = changes.recv() => match change {
                Ok(change) if change.status.is_finished() => {
                    if let Some(run) = ended_saving(&inner, &change.run_id) {
                        spawn_save(&inner, run, Busy::Wait);
                    }
                }
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return,
            },
        }
    }
}

/// The run `run_id` that just ended, if it saves artifacts. Its definition is in memory (a
/// sweep's trials end by the thousand): the store is read only for runs that save some.
fn ended_saving(inner: &Inner, run_id: &str) -> Option<Run> {
    let saving = inner
        .definition_of(run_id)
        .is_ok_and(|d| !d.spec.artifacts.paths.is_empty());
    if !saving {
        return None;
    }
    inner.store.run(run_id).ok().flatten()
}

/// Takes a snapshot of `run`'s artifacts in a task of its own.
fn spawn_save(inner: &Arc<Inner>, run: Run, busy: Busy) {
    let task = inner.clone();
    inner.runtime.spawn(async move {
        if let Err(e) = save(&task, &run, busy).await {
            eprintln!("dstack: cannot save the artifacts of run {}: {e}", run.name);
        }
    });
}

/// Whether `run` saves artifacts.
fn saves(run: &Run) -> bool {
    !run.spec.artifacts.paths.is_empty()
}

/// The engine's artifact store.
fn store(inner: &Inner) -> Result<&ArtifactStore, EngineError> {
    inner.options.artifacts.as_ref().ok_or_else(|| {
        EngineError::Unsupported(
            "this engine keeps no artifacts (EngineOptions::artifacts)".to_string(),
        )
    })
}

/// What a snapshot does when another of the same run is under way.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Busy {
    /// Waits for it, then takes its own (a run's end, a client's request).
    Wait,
    /// Takes none (a periodic snapshot: the next comes soon).
    Skip,
}

/// Takes a snapshot of `run`'s artifacts now (its last, frozen, when it has ended) and
/// returns its manifest; a frozen manifest is returned as it is, and the last one saved when
/// another snapshot is under way and `busy` says to skip.
pub(crate) async fn save(inner: &Inner, run: &Run, busy: Busy) -> Result<Manifest, EngineError> {
    let store = store(inner)?;
    let lock = {
        let mut saving = inner.saving.lock().unwrap_or_else(|e| e.into_inner());
        saving.entry(run.id.clone()).or_default().clone()
    };
    let _held = match (busy, lock.try_lock()) {
        (_, Ok(held)) => held,
        (Busy::Wait, Err(_)) => lock.lock().await,
        (Busy::Skip, Err(_)) => {
            return Ok(store.manifest(&run.id).await?.unwrap_or_else(|| empty(run)));
        }
    };
    let kept = store.manifest(&run.id).await?;
    if let Some(kept) = kept.as_ref().filter(|m| m.frozen) {
        return Ok(kept.clone());
    }
    // The run as it is now: a snapshot asked for while it ran may end after it ended.
    let run = inner.store.run(&run.id)?.unwrap_or_else(|| run.clone());
    let ended = run.status.is_finished();
    let files = match first_job(inner, &run)? {
        Some((job, instance)) => match fetch(inner, store, &job, &instance, kept.as_ref()).await {
            Ok(files) => files,
            // An agent gone with the job's files: the run keeps what was saved last.
            Err(_) if ended => kept.as_ref().map(|m| m.files.clone()).unwrap_or_default(),
            Err(e) => return Err(e),
        },
        None => kept.as_ref().map(|m| m.files.clone()).unwrap_or_default(),
    };
    let manifest = Manifest {
        run_id: Some(run.id.clone()),
        run_name: Some(run.name.clone()),
        workflow: run.spec.artifacts.workflow.clone(),
        saved_at_ms: now_ms(),
        frozen: ended,
        files,
    };
    store.save_manifest(&manifest).await?;
    if ended {
        inner
            .saving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&run.id);
    }
    Ok(manifest)
}

/// A manifest of `run` with no files (nothing saved yet).
fn empty(run: &Run) -> Manifest {
    Manifest {
        run_id: Some(run.id.clone()),
        run_name: Some(run.name.clone()),
        workflow: run.spec.artifacts.workflow.clone(),
        saved_at_ms: 0,
        frozen: false,
        files: Vec::new(),
    }
}

/// The run's first job (node 0 of replica 0: the one whose files are saved) in its latest
/// submission that reached a host, and that host.
fn first_job(inner: &Inner, run: &Run) -> Result<Option<(Job, String)>, EngineError> {
    let job = inner
        .store
        .jobs_of_run(&run.id)?
        .into_iter()
        .filter(|j| j.job_num == 0 && j.replica_num == 0 && j.instance_id.is_some())
        .max_by_key(|j| j.submission_num);
    Ok(job.and_then(|j| j.instance_id.clone().map(|i| (j, i))))
}

/// The job's files now, their content kept in the store.
async fn fetch(
    inner: &Inner,
    store: &ArtifactStore,
    job: &Job,
    instance: &str,
    kept: Option<&Manifest>,
) -> Result<Vec<FileEntry>, EngineError> {
    let agent = inner.agent(instance).await?;
    let listing = agent.artifacts(&job.id).await?;
    let mut known: BTreeSet<String> = kept
        .map(|m| m.files.iter().map(|f| f.hash.clone()).collect())
        .unwrap_or_default();
    for file in &listing.files {
        if !known.contains(&file.hash) && store.has(&file.hash).await? {
            known.insert(file.hash.clone());
        }
    }
    let wanted: Vec<String> = artifacts::missing(&listing.files, &known)
        .into_iter()
        .map(|f| f.path.clone())
        .collect();
    let mut files: Vec<FileEntry> = listing
        .files
        .into_iter()
        .filter(|f| known.contains(&f.hash))
        .collect();
    if !wanted.is_empty() {
        let temp = std::env::temp_dir().join(format!(
            "dstack-artifacts-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let received = receive(store, &agent, &job.id, &wanted, &temp).await;
        let _ = std::fs::remove_dir_all(&temp);
        files.extend(received?);
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    files.dedup_by(|a, b| a.path == b.path);
    Ok(files)
}

/// Fetches the files `wanted` from the job's agent into `temp`, hashes them, keeps their
/// content in the store; their entries.
async fn receive(
    store: &ArtifactStore,
    agent: &crate::agent::AgentClient,
    job_id: &str,
    wanted: &[String],
    temp: &Path,
) -> Result<Vec<FileEntry>, EngineError> {
    std::fs::create_dir_all(temp).map_err(artifacts::ArtifactError::from)?;
    let tar = temp.join("files.tar");
    let mut stream = agent.artifact_files(job_id, wanted).await?;
    {
        let mut out = tokio::fs::File::create(&tar)
            .await
            .map_err(artifacts::ArtifactError::from)?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            tokio::io::AsyncWriteExt::write_all(&mut out, &chunk)
                .await
                .map_err(artifacts::ArtifactError::from)?;
        }
    }
    let dir = temp.to_path_buf();
    let unpacked = tokio::task::spawn_blocking(move || split(&tar, &dir))
        .await
        .map_err(|e| artifacts::ArtifactError::Io(io::Error::other(e)))?
        .map_err(artifacts::ArtifactError::from)?;
    let mut entries = Vec::with_capacity(unpacked.len());
    for (entry, file) in unpacked {
        store.put_file(&entry.hash, &file).await?;
        let _ = std::fs::remove_file(&file);
        entries.push(entry);
    }
    Ok(entries)
}

/// Writes each regular file of the tar `archive` to a file of its own in `dir`, hashing it;
/// the entries (paths that would leave the job's directory are left out) and their files.
fn split(archive: &Path, dir: &Path) -> io::Result<Vec<(FileEntry, PathBuf)>> {
    let mut found = Vec::new();
    let mut tar = tar::Archive::new(io::BufReader::new(std::fs::File::open(archive)?));
    for (n, entry) in tar.entries()?.enumerate() {
        let mut entry = entry?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let name = entry.path()?.to_string_lossy().into_owned();
        let Some(path) = artifacts::normalize(&name) else {
            continue;
        };
        let mode = entry.header().mode()? & 0o777;
        let file = dir.join(format!("{n}"));
        let mut out = Hashing::new(io::BufWriter::new(std::fs::File::create(&file)?));
        let size = io::copy(&mut entry, &mut out)?;
        let hash = out.finish()?;
        found.push((
            FileEntry {
                path,
                hash,
                size,
                mode,
            },
            file,
        ));
    }
    Ok(found)
}

/// A writer that hashes what goes through it.
struct Hashing<W> {
    inner: W,
    hasher: sha2::Sha256,
}

impl<W: io::Write> Hashing<W> {
    fn new(inner: W) -> Self {
        Hashing {
            inner,
            hasher: sha2::Digest::new(),
        }
    }

    /// Flushes and returns the SHA-256 (lowercase hex).
    fn finish(mut self) -> io::Result<String> {
        self.inner.flush()?;
        let digest = sha2::Digest::finalize(self.hasher);
        Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
    }
}

impl<W: io::Write> io::Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        sha2::Digest::update(&mut self.hasher, &buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The artifacts of `run`: saved now while it runs (the last saved when its agent cannot
/// be asked), frozen once it has ended; none for a run that saves none.
pub(crate) async fn of_run(inner: &Inner, run: &Run) -> Result<Manifest, EngineError> {
    if !saves(run) {
        return Ok(store(inner)?
            .manifest(&run.id)
            .await?
            .unwrap_or_else(|| empty(run)));
    }
    match save(inner, run, Busy::Wait).await {
        Ok(manifest) => Ok(manifest),
        Err(e) => match store(inner)?.manifest(&run.id).await? {
            Some(kept) => Ok(kept),
            None => Err(e),
        },
    }
}

/// Tags the artifacts of finished run `run` as `name` (of the run's workflow).
pub(crate) async fn tag_run(inner: &Inner, name: &str, run: &Run) -> Result<Tag, EngineError> {
    artifacts::check_name(name).map_err(EngineError::Invalid)?;
    if !run.status.is_finished() {
        return Err(EngineError::Invalid(format!(
            "run {} has not ended: only a finished run's artifacts can be tagged",
            run.name
        )));
    }
    let manifest = save(inner, run, Busy::Wait).await?;
    let tag = Tag {
        tag: TagRef {
            workflow: run.spec.artifacts.workflow.clone(),
            name: name.to_string(),
        },
        created_at_ms: now_ms(),
        manifest,
    };
    store(inner)?.add_tag(&tag).await?;
    Ok(tag)
}

/// Tags `files` (whose content the client has put into the store) as `:name`.
pub(crate) async fn tag_files(
    inner: &Inner,
    name: &str,
    files: Vec<FileEntry>,
) -> Result<Tag, EngineError> {
    artifacts::check_name(name).map_err(EngineError::Invalid)?;
    let store = store(inner)?;
    for file in &files {
        if artifacts::normalize(&file.path).as_deref() != Some(file.path.as_str()) {
            return Err(EngineError::Invalid(format!(
                "invalid artifact path `{}`",
                file.path
            )));
        }
        if !store.has(&file.hash).await? {
            return Err(EngineError::Invalid(format!(
                "the content of {} ({}) was not uploaded",
                file.path, file.hash
            )));
        }
    }
    let tag = Tag {
        tag: TagRef {
            workflow: None,
            name: name.to_string(),
        },
        created_at_ms: now_ms(),
        manifest: Manifest {
            run_id: None,
            run_name: None,
            workflow: None,
            saved_at_ms: now_ms(),
            frozen: true,
            files,
        },
    };
    store.add_tag(&tag).await?;
    Ok(tag)
}

/// The archives `depends_on` puts into a run: one per tag, of its files, unpacked into the
/// run's working directory; a missing tag is refused.
pub(crate) async fn dependencies(
    inner: &Inner,
    depends_on: &[TagRef],
) -> Result<Vec<Archive>, EngineError> {
    if depends_on.is_empty() {
        return Ok(Vec::new());
    }
    let store = store(inner)?;
    let archives = inner.options.archives.as_ref().ok_or_else(|| {
        EngineError::Unsupported(
            "this engine keeps no archives: runs with `depends-on` are refused".to_string(),
        )
    })?;
    let mut found = Vec::with_capacity(depends_on.len());
    for wanted in depends_on {
        let tag = store.tag(wanted).await?.ok_or_else(|| {
            EngineError::Invalid(format!(
                "depends-on: there is no tag {wanted} (dstack tags list shows the tags)"
            ))
        })?;
        let packed = artifacts::pack(store, &tag.manifest.files, &std::env::temp_dir()).await?;
        archives
            .keep_packed(&packed)
            .map_err(artifacts::ArtifactError::from)?;
        found.push(Archive {
            hash: packed.hash,
            bytes: packed.bytes,
            path: ".".to_string(),
            if_exists: IfExists::Merge,
            repo: false,
        });
    }
    Ok(found)
}

/// The paths a run saves, checked (each relative and within its working directory).
pub(crate) fn checked_paths(inner: &Inner, paths: &[String]) -> Result<Vec<String>, EngineError> {
    if !paths.is_empty() {
        store(inner)?;
    }
    paths
        .iter()
        .map(|p| {
            artifacts::normalize(p).ok_or_else(|| {
                EngineError::Invalid(format!(
                    "artifacts: `{p}` is not a path within the working directory"
                ))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fetched_archive_is_split_into_hashed_files_within_the_jobs_directory() {
        let dir = tempfile::tempdir().unwrap();
        let tar_path = dir.path().join("files.tar");
        let mut builder = tar::Builder::new(std::fs::File::create(&tar_path).unwrap());
        for (name, content, mode) in [
            ("out/a.txt", &b"abc"[..], 0o755),
            ("../escape", &b"x"[..], 0o644),
        ] {
            let mut header = tar::Header::new_gnu();
            header.set_size(content.len() as u64);
            header.set_mode(mode);
            header.set_cksum();
            // `append_data` refuses `..`: the name goes into the header as it is.
            header.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
            header.set_cksum();
            builder.append(&header, content).unwrap();
        }
        builder.finish().unwrap();
        drop(builder);
        let split = split(&tar_path, dir.path()).unwrap();
        assert_eq!(split.len(), 1, "{split:?}");
        let (entry, file) = &split[0];
        assert_eq!(entry.path, "out/a.txt");
        assert_eq!(entry.hash, crate::archive::hash_of(&b"abc"[..]).unwrap());
        assert_eq!((entry.size, entry.mode), (3, 0o755));
        assert_eq!(std::fs::read(file).unwrap(), b"abc");
    }
}
