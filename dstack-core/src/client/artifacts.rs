//! Artifacts and tags on the client's side: listing and downloading a run's artifacts,
//! tagging a run or local files (their content uploaded first, only what the store lacks).

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::{Client, Via};
use crate::artifacts::{self, FileEntry, Manifest, Tag, TagRef};
use crate::engine::EngineError;

/// `artifacts/list`: a run's artifacts.
#[derive(Debug, Serialize, Deserialize)]
pub struct ArtifactsOf {
    /// The run's name.
    pub run_name: String,
}

/// `artifacts/object`, `artifacts/has_object`: content by hash.
#[derive(Debug, Serialize, Deserialize)]
pub struct ObjectRef {
    /// Its SHA-256.
    pub hash: String,
}

/// `tags/add`: tag a finished run (`run_name`) or files already uploaded (`files`).
#[derive(Debug, Serialize, Deserialize)]
pub struct TagAdd {
    /// The tag's name.
    pub name: String,
    /// The run whose artifacts it names.
    #[serde(default)]
    pub run_name: Option<String>,
    /// Or the files it names.
    #[serde(default)]
    pub files: Vec<FileEntry>,
}

/// How long an upload to the server may take.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// A client's artifacts (see [`Client::artifacts`]).
pub struct Artifacts<'a> {
    pub(super) client: &'a Client,
}

impl Artifacts<'_> {
    /// The artifacts of run `run` (the latest of that name): saved now while it runs, frozen
    /// once it has ended.
    pub async fn list(&self, run: &str) -> Result<Manifest, EngineError> {
        match &self.client.via {
            Via::Engine(engine) => engine.artifacts(run).await,
            Via::Server(remote) => {
                let asked = ArtifactsOf {
                    run_name: run.to_string(),
                };
                Ok(remote.call("artifacts/list", &asked).await?)
            }
        }
    }

    /// Downloads the artifacts of `run` (those at or below `path`, or all) into `dir`, at
    /// their paths; the files written. Each streams into a file of its own.
    pub async fn download(
        &self,
        run: &str,
        path: Option<&str>,
        dir: &Path,
    ) -> Result<Vec<FileEntry>, EngineError> {
        let manifest = self.list(run).await?;
        let files: Vec<FileEntry> = manifest.select(path).cloned().collect();
        if files.is_empty() {
            return Err(EngineError::Invalid(match path {
                Some(path) => format!("run {run} has no artifact at {path}"),
                None => format!("run {run} has no artifacts (yet)"),
            }));
        }
        for file in &files {
            let target = dir.join(&file.path);
            let written = self.write(&file.hash, &target).await;
            written.map_err(|e| {
                EngineError::Invalid(format!("cannot write {}: {e}", target.display()))
            })?;
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::Permissions::from_mode(file.mode);
            let _ = std::fs::set_permissions(&target, mode);
        }
        Ok(files)
    }

    /// Writes the content with `hash` to `target` (through a temporary file beside it).
    async fn write(&self, hash: &str, target: &Path) -> Result<(), String> {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        let part = target.with_extension(format!("part-{}", uuid::Uuid::new_v4().simple()));
        let result = async {
            let mut out = tokio::fs::File::create(&part)
                .await
                .map_err(|e| e.to_string())?;
            let mut stream = self.read(hash).await.map_err(|e| e.to_string())?;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| e.to_string())?;
                tokio::io::AsyncWriteExt::write_all(&mut out, &chunk)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            tokio::io::AsyncWriteExt::flush(&mut out)
                .await
                .map_err(|e| e.to_string())?;
            std::fs::rename(&part, target).map_err(|e| e.to_string())
        }
        .await;
        if result.is_err() {
            let _ = std::fs::remove_file(&part);
        }
        result
    }

    /// The content with `hash`, streamed.
    async fn read(&self, hash: &str) -> Result<artifacts::ObjectStream, EngineError> {
        match &self.client.via {
            Via::Engine(engine) => Ok(store(engine)?.read(hash).await?),
            Via::Server(remote) => {
                let asked = ObjectRef {
                    hash: hash.to_string(),
                };
                let stream = remote.stream("artifacts/object", &asked).await?;
                Ok(stream
                    .map(|chunk| {
                        chunk.map_err(|e| artifacts::ArtifactError::Io(std::io::Error::other(e)))
                    })
                    .boxed())
            }
        }
    }

    /// Keeps the content of local `file` (SHA-256 `hash`) unless the store has it.
    async fn upload(&self, hash: &str, file: &Path) -> Result<(), EngineError> {
        match &self.client.via {
            Via::Engine(engine) => Ok(store(engine)?.put_file(hash, file).await?),
            Via::Server(remote) => {
                let asked = ObjectRef {
                    hash: hash.to_string(),
                };
                if remote.call::<bool>("artifacts/has_object", &asked).await? {
                    return Ok(());
                }
                let bytes = tokio::fs::read(file).await.map_err(|e| {
                    EngineError::Invalid(format!("cannot read {}: {e}", file.display()))
                })?;
                let route = format!("artifacts/upload_object?hash={hash}");
                remote.upload::<bool>(&route, bytes, UPLOAD_TIMEOUT).await?;
                Ok(())
            }
        }
    }
}

/// The engine's artifact store.
fn store(engine: &crate::engine::Engine) -> Result<&artifacts::ArtifactStore, EngineError> {
    engine.artifact_store().ok_or_else(|| {
        EngineError::Unsupported("this engine keeps no artifacts (EngineOptions::artifacts)".into())
    })
}

/// A client's tags (see [`Client::tags`]).
pub struct Tags<'a> {
    pub(super) client: &'a Client,
}

impl Tags<'_> {
    /// Tags the artifacts of finished run `run` as `name` (a tag of the run's workflow).
    pub async fn add(&self, name: &str, run: &str) -> Result<Tag, EngineError> {
        match &self.client.via {
            Via::Engine(engine) => engine.tag_run(name, run).await,
            Via::Server(remote) => {
                let request = TagAdd {
                    name: name.to_string(),
                    run_name: Some(run.to_string()),
                    files: Vec::new(),
                };
                Ok(remote.call("tags/add", &request).await?)
            }
        }
    }

    /// Uploads local `paths` (files, or directories with everything below) and tags them as
    /// `:name`. A relative path keeps its place (`data/x.csv`); an absolute one is named by
    /// its last part.
    pub async fn add_files(&self, name: &str, paths: &[PathBuf]) -> Result<Tag, EngineError> {
        artifacts::check_name(name).map_err(EngineError::Invalid)?;
        let owned = paths.to_vec();
        let local = tokio::task::spawn_blocking(move || local_files(&owned))
            .await
            .map_err(|e| EngineError::Invalid(e.to_string()))?
            .map_err(EngineError::Invalid)?;
        let artifacts = Artifacts {
            client: self.client,
        };
        let mut files = Vec::with_capacity(local.len());
        for (entry, source) in local {
            artifacts.upload(&entry.hash, &source).await?;
            files.push(entry);
        }
        match &self.client.via {
            Via::Engine(engine) => engine.tag_files(name, files).await,
            Via::Server(remote) => {
                let request = TagAdd {
                    name: name.to_string(),
                    run_name: None,
                    files,
                };
                Ok(remote.call("tags/add", &request).await?)
            }
        }
    }

    /// Every tag.
    pub async fn list(&self) -> Result<Vec<Tag>, EngineError> {
        match &self.client.via {
            Via::Engine(engine) => Ok(store(engine)?.tags().await?),
            Via::Server(remote) => Ok(remote.call("tags/list", &serde_json::json!({})).await?),
        }
    }

    /// Deletes tag `text` (`TAG`, `WORKFLOW:TAG` or `:TAG`); the run's artifacts stay.
    pub async fn delete(&self, text: &str) -> Result<TagRef, EngineError> {
        let known: Vec<TagRef> = self.list().await?.into_iter().map(|t| t.tag).collect();
        let tag = artifacts::resolve(text, &known).map_err(EngineError::Invalid)?;
        match &self.client.via {
            Via::Engine(engine) => {
                store(engine)?.delete_tag(&tag).await?;
            }
            Via::Server(remote) => {
                remote.call::<bool>("tags/delete", &tag).await?;
            }
        }
        Ok(tag)
    }
}

/// The files under `paths` with their hashes, and where each is read from.
fn local_files(paths: &[PathBuf]) -> Result<Vec<(FileEntry, PathBuf)>, String> {
    use std::os::unix::fs::PermissionsExt;
    let mut found = Vec::new();
    for path in paths {
        let name = if path.is_absolute() {
            path.file_name().map(|n| n.to_string_lossy().into_owned())
        } else {
            artifacts::normalize(&path.to_string_lossy())
        };
        let name = name.ok_or_else(|| format!("{}: not a path to upload", path.display()))?;
        let mut pending = vec![(path.clone(), name)];
        while let Some((source, name)) = pending.pop() {
            let meta = std::fs::metadata(&source)
                .map_err(|e| format!("cannot read {}: {e}", source.display()))?;
            if meta.is_dir() {
                let entries = std::fs::read_dir(&source)
                    .map_err(|e| format!("cannot read {}: {e}", source.display()))?;
                for entry in entries {
                    let entry = entry.map_err(|e| e.to_string())?;
                    let child = format!("{name}/{}", entry.file_name().to_string_lossy());
                    pending.push((entry.path(), child));
                }
            } else if meta.is_file() {
                let file = std::fs::File::open(&source)
                    .map_err(|e| format!("cannot read {}: {e}", source.display()))?;
                let hash = crate::archive::hash_of(file)
                    .map_err(|e| format!("cannot read {}: {e}", source.display()))?;
                let entry = FileEntry {
                    path: name,
                    hash,
                    size: meta.len(),
                    mode: meta.permissions().mode() & 0o777,
                };
                found.push((entry, source));
            }
        }
    }
    found.sort_by(|a, b| a.0.path.cmp(&b.0.path));
    found.dedup_by(|a, b| a.0.path == b.0.path);
    Ok(found)
}
