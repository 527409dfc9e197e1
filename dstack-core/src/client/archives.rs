//! A configuration's `repos:` and `files:` on the client's side: packed from this machine's
//! files (see [`crate::archive`]) and handed to the engine, or uploaded to the server, before
//! the run is applied with them ([`ApplyOptions::archives`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Via;
use crate::archive::{self, Archive, IfExists, Packed};
use crate::config::Configuration;
use crate::engine::{command, ApplyOptions, EngineError};

/// `files/has_archive`: whether the server keeps an archive.
#[derive(Debug, Serialize, Deserialize)]
pub struct HasArchive {
    /// Its SHA-256.
    pub hash: String,
}

/// The answer to `files/has_archive` and `files/upload_archive?hash=…`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ArchiveKept {
    /// Whether the server keeps it (after the upload: always).
    pub kept: bool,
}

/// How long an upload to the server may take.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// What one source packs to, by (source, target): a batch of runs (a sweep's trials) packs
/// each once.
type Packs = HashMap<(PathBuf, String), (String, u64, String)>;

/// Packs and hands over the archives of every item that needs them and has none yet.
pub(crate) async fn prepare(
    via: &Via,
    items: &mut [(Configuration, ApplyOptions)],
) -> Result<(), EngineError> {
    let mut packs = Packs::new();
    for (configuration, options) in items.iter_mut() {
        let common = command::common(configuration);
        if !options.archives.is_empty() || (common.repos.is_empty() && common.files.is_empty()) {
            continue;
        }
        let base = base_dir(options)?;
        let place = options
            .configuration_path
            .clone()
            .unwrap_or_else(|| "the configuration".to_string());
        // (field, source, target, if_exists, repo?); a repo given by URL is cloned by the
        // agent instead.
        let local_repos = common.repos.iter().enumerate().filter_map(|(i, repo)| {
            let local = repo.local_path.as_deref()?;
            Some((
                format!("repos[{i}]"),
                local,
                &repo.path,
                repo.if_exists.into(),
                true,
            ))
        });
        let files = common.files.iter().enumerate().map(|(i, file)| {
            let field = format!("files[{i}]");
            (
                field,
                file.local_path.as_str(),
                &file.path,
                IfExists::Merge,
                false,
            )
        });
        let mut archives = Vec::new();
        for (field, local, target, if_exists, repo) in local_repos.chain(files) {
            let source = local_path(&base, local);
            let (hash, bytes, path) = pack(via, &mut packs, &source, target, repo)
                .await
                .map_err(|e| EngineError::Invalid(format!("{place}: {field}: {e}")))?;
            archives.push(Archive {
                hash,
                bytes,
                path,
                if_exists,
                repo,
            });
        }
        options.archives = archives;
    }
    Ok(())
}

/// The directory relative local paths start from: the configuration file's, else the one
/// applied from.
fn base_dir(options: &ApplyOptions) -> Result<PathBuf, EngineError> {
    let applied_from = match &options.client_dir {
        Some(dir) => PathBuf::from(dir),
        None => std::env::current_dir()
            .map_err(|e| EngineError::Invalid(format!("cannot read the current directory: {e}")))?,
    };
    Ok(match &options.configuration_path {
        Some(file) => applied_from
            .join(file)
            .parent()
            .map_or(applied_from.clone(), Path::to_path_buf),
        None => applied_from,
    })
}

/// `local` on this machine: `~` from `HOME`, relative paths from `base`.
fn local_path(base: &Path, local: &str) -> PathBuf {
    let home = || std::env::var("HOME").unwrap_or_else(|_| "/".to_string());
    if local == "~" {
        PathBuf::from(home())
    } else if let Some(rest) = local.strip_prefix("~/") {
        PathBuf::from(home()).join(rest)
    } else {
        base.join(local)
    }
}

/// Packs `source` (a repo, or a `files:` path going to `target`) once per batch and hands
/// it over: its hash, size and the directory it unpacks into.
async fn pack(
    via: &Via,
    packs: &mut Packs,
    source: &Path,
    target: &str,
    repo: bool,
) -> Result<(String, u64, String), String> {
    let key = (source.to_path_buf(), format!("{repo}:{target}"));
    if let Some(done) = packs.get(&key) {
        return Ok(done.clone());
    }
    let (source_owned, target_owned) = (source.to_path_buf(), target.to_string());
    let packed = tokio::task::spawn_blocking(move || {
        let temp = std::env::temp_dir();
        if repo {
            let limit = archive::limit_from_env(archive::REPO_LIMIT);
            archive::pack_repo(&source_owned, &temp, limit).map(|p| (p, target_owned))
        } else {
            let limit = archive::limit_from_env(archive::FILES_LIMIT);
            archive::pack_path(&source_owned, &target_owned, &temp, limit)
        }
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    let (packed, path) = packed;
    let kept = hand_over(via, &packed).await;
    let _ = std::fs::remove_file(&packed.file);
    kept?;
    let done = (packed.hash, packed.bytes, path);
    packs.insert(key, done.clone());
    Ok(done)
}

/// Keeps `packed` where the engine reads it: its store (in this process), or the server's.
async fn hand_over(via: &Via, packed: &Packed) -> Result<(), String> {
    match via {
        Via::Engine(engine) => {
            let store = engine
                .archives()
                .ok_or("this engine keeps no archives (EngineOptions::archives)")?;
            store
                .keep_packed(packed)
                .map_err(|e| format!("cannot keep the archive: {e}"))
        }
        Via::Server(remote) => {
            let has = HasArchive {
                hash: packed.hash.clone(),
            };
            let known: ArchiveKept = remote
                .call("files/has_archive", &has)
                .await
                .map_err(|e| e.to_string())?;
            if known.kept {
                return Ok(());
            }
            let bytes = tokio::fs::read(&packed.file)
                .await
                .map_err(|e| format!("cannot read the archive: {e}"))?;
            let route = format!("files/upload_archive?hash={}", packed.hash);
            remote
                .upload::<ArchiveKept>(&route, bytes, UPLOAD_TIMEOUT)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    }
}
