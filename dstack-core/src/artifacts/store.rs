//! Where artifacts are kept, through `object_store`: a directory (`$DSTACK_HOME/server/
//! artifacts/` by default) or an S3-compatible bucket. Layout under the store's root:
//!
//! - `objects/<h[0..2]>/<h>`: file contents, by the SHA-256 `h` of their bytes (written once,
//!   never changed);
//! - `runs/<run id>.json`: each run's [`Manifest`], rewritten at each snapshot until it is
//!   frozen (the run ended), refused after;
//! - `tags/<workflow or _>/<tag>.json`: each [`Tag`].

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutPayload};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{ArtifactError, Manifest, Tag, TagRef};

/// A stream of an object's bytes.
pub type ObjectStream = futures_util::stream::BoxStream<'static, Result<Bytes, ArtifactError>>;

/// Where artifacts are kept, as the server's `config.yml` says (`artifacts:`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StorageConfig {
    /// A directory of this machine.
    Local {
        /// The directory.
        path: PathBuf,
    },
    /// An S3-compatible bucket; credentials come from the usual AWS environment variables
    /// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`).
    S3 {
        /// The bucket.
        bucket: String,
        /// Its region (default: `AWS_REGION`, else `us-east-1`).
        #[serde(default)]
        region: Option<String>,
        /// An S3-compatible endpoint instead of AWS's (`http://…` allowed).
        #[serde(default)]
        endpoint_url: Option<String>,
        /// A key prefix within the bucket.
        #[serde(default)]
        prefix: Option<String>,
    },
}

/// The artifacts, tags and manifests of a server.
#[derive(Clone, Debug)]
pub struct ArtifactStore {
    store: Arc<dyn ObjectStore>,
    root: Path,
}

impl ArtifactStore {
    /// The store `config` describes.
    pub fn open(config: &StorageConfig) -> Result<ArtifactStore, ArtifactError> {
        match config {
            StorageConfig::Local { path } => {
                std::fs::create_dir_all(path)?;
                let store = LocalFileSystem::new_with_prefix(path)?;
                Ok(ArtifactStore {
                    store: Arc::new(store),
                    root: Path::default(),
                })
            }
            StorageConfig::S3 {
                bucket,
                region,
                endpoint_url,
                prefix,
            } => s3(bucket, region.as_deref(), endpoint_url.as_deref(), prefix),
        }
    }

    fn key(&self, parts: &[&str]) -> Path {
        parts
            .iter()
            .fold(self.root.clone(), |path, part| path.clone().join(*part))
    }

    fn object(&self, hash: &str) -> Path {
        self.key(&["objects", &hash[..2], hash])
    }

    /// Whether the content with `hash` is kept.
    pub async fn has(&self, hash: &str) -> Result<bool, ArtifactError> {
        check_hash(hash)?;
        match self.store.head(&self.object(hash)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Keeps the content of `file`, whose SHA-256 is `hash` (checked by the caller, who
    /// hashed it on its way in); streamed, never whole in memory.
    pub async fn put_file(&self, hash: &str, file: &FsPath) -> Result<(), ArtifactError> {
        check_hash(hash)?;
        if self.has(hash).await? {
            return Ok(());
        }
        let mut reader = tokio::fs::File::open(file).await?;
        let mut writer =
            object_store::buffered::BufWriter::new(self.store.clone(), self.object(hash));
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = reader.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            writer.write_all(&buf[..n]).await?;
        }
        writer.shutdown().await?;
        Ok(())
    }

    /// The content with `hash`, streamed.
    pub async fn read(&self, hash: &str) -> Result<ObjectStream, ArtifactError> {
        check_hash(hash)?;
        match self.store.get(&self.object(hash)).await {
            Ok(got) => Ok(got.into_stream().map_err(ArtifactError::from).boxed()),
            Err(object_store::Error::NotFound { .. }) => {
                Err(ArtifactError::NotFound(format!("no content {hash}")))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Writes the content with `hash` into `file` (created or replaced).
    pub async fn read_into(&self, hash: &str, file: &FsPath) -> Result<(), ArtifactError> {
        let mut stream = self.read(hash).await?;
        let mut out = tokio::fs::File::create(file).await?;
        while let Some(chunk) = stream.next().await {
            out.write_all(&chunk?).await?;
        }
        out.flush().await?;
        Ok(())
    }

    async fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        key: &Path,
    ) -> Result<Option<T>, ArtifactError> {
        match self.store.get(key).await {
            Ok(got) => Ok(Some(serde_json::from_slice(&got.bytes().await?)?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn write_json(
        &self,
        key: &Path,
        value: &impl serde::Serialize,
        mode: PutMode,
    ) -> Result<(), ArtifactError> {
        let bytes = serde_json::to_vec_pretty(value)?;
        self.store
            .put_opts(key, PutPayload::from(bytes), mode.into())
            .await?;
        Ok(())
    }

    fn manifest_key(&self, run_id: &str) -> Path {
        self.key(&["runs", &format!("{run_id}.json")])
    }

    /// The last manifest of run `run_id`, if a snapshot was taken.
    pub async fn manifest(&self, run_id: &str) -> Result<Option<Manifest>, ArtifactError> {
        self.read_json(&self.manifest_key(run_id)).await
    }

    /// Records `manifest` as its run's (every file's content must be kept already); refused
    /// once the run's manifest is frozen: a finished run's artifacts never change.
    pub async fn save_manifest(&self, manifest: &Manifest) -> Result<(), ArtifactError> {
        let run_id = manifest
            .run_id
            .as_deref()
            .ok_or_else(|| ArtifactError::Invalid("a run's manifest names its run".into()))?;
        if let Some(kept) = self.manifest(run_id).await? {
            if kept.frozen {
                return Err(ArtifactError::Frozen(
                    kept.run_name.unwrap_or_else(|| run_id.to_string()),
                ));
            }
        }
        self.write_json(&self.manifest_key(run_id), manifest, PutMode::Overwrite)
            .await
    }

    fn tag_key(&self, tag: &TagRef) -> Path {
        let dir = tag.workflow.as_deref().unwrap_or("_");
        self.key(&["tags", dir, &format!("{}.json", tag.name)])
    }

    /// The tag `tag`, if it exists.
    pub async fn tag(&self, tag: &TagRef) -> Result<Option<Tag>, ArtifactError> {
        self.read_json(&self.tag_key(tag)).await
    }

    /// Makes a tag; refused when it exists (delete it first).
    pub async fn add_tag(&self, tag: &Tag) -> Result<(), ArtifactError> {
        let key = self.tag_key(&tag.tag);
        match self.write_json(&key, tag, PutMode::Create).await {
            Err(ArtifactError::Store(object_store::Error::AlreadyExists { .. })) => {
                Err(ArtifactError::Exists(tag.tag.to_string()))
            }
            other => other,
        }
    }

    /// Deletes a tag (the artifacts it named stay with their run); whether it existed.
    pub async fn delete_tag(&self, tag: &TagRef) -> Result<bool, ArtifactError> {
        let key = self.tag_key(tag);
        if self.tag(tag).await?.is_none() {
            return Ok(false);
        }
        self.store.delete(&key).await?;
        Ok(true)
    }

    /// Every tag, by workflow then name.
    pub async fn tags(&self) -> Result<Vec<Tag>, ArtifactError> {
        let prefix = self.key(&["tags"]);
        let keys: Vec<Path> = self
            .store
            .list(Some(&prefix))
            .map_ok(|meta| meta.location)
            .try_collect()
            .await?;
        let mut tags = Vec::new();
        for key in keys {
            if let Some(tag) = self.read_json::<Tag>(&key).await? {
                tags.push(tag);
            }
        }
        tags.sort_by(|a, b| a.tag.cmp(&b.tag));
        Ok(tags)
    }
}

/// Refuses what is not a SHA-256 in lowercase hex (it becomes a key).
fn check_hash(hash: &str) -> Result<(), ArtifactError> {
    if crate::archive::is_hash(hash) {
        Ok(())
    } else {
        Err(ArtifactError::Invalid(format!(
            "`{hash}` is not a SHA-256 in lowercase hex"
        )))
    }
}

#[cfg(feature = "s3")]
fn s3(
    bucket: &str,
    region: Option<&str>,
    endpoint: Option<&str>,
    prefix: &Option<String>,
) -> Result<ArtifactStore, ArtifactError> {
    let mut builder = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
    let region = region
        .map(str::to_string)
        .or_else(|| std::env::var("AWS_REGION").ok())
        .unwrap_or_else(|| "us-east-1".to_string());
    builder = builder.with_region(region);
    if let Some(endpoint) = endpoint {
        builder = builder
            .with_endpoint(endpoint)
            .with_allow_http(endpoint.starts_with("http://"));
    }
    let root = prefix
        .as_deref()
        .map(|p| Path::from(p.trim_matches('/')))
        .unwrap_or_default();
    Ok(ArtifactStore {
        store: Arc::new(builder.build()?),
        root,
    })
}

#[cfg(not(feature = "s3"))]
fn s3(
    bucket: &str,
    _: Option<&str>,
    _: Option<&str>,
    _: &Option<String>,
) -> Result<ArtifactStore, ArtifactError> {
    Err(ArtifactError::Unsupported(format!(
        "artifacts in bucket {bucket}: this build has no S3 support (build with the `aws` \
         feature)"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifacts::FileEntry;

    fn manifest(frozen: bool, hash: &str) -> Manifest {
        Manifest {
            run_id: Some("r1".into()),
            run_name: Some("quick-fox-1".into()),
            workflow: Some("prepare".into()),
            saved_at_ms: 1,
            frozen,
            files: vec![FileEntry {
                path: "data/a".into(),
                hash: hash.into(),
                size: 3,
                mode: 0o644,
            }],
        }
    }

    #[tokio::test]
    async fn content_manifests_and_tags_are_kept_and_a_frozen_manifest_never_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(&StorageConfig::Local {
            path: dir.path().join("artifacts"),
        })
        .unwrap();
        let file = dir.path().join("a");
        std::fs::write(&file, "abc").unwrap();
        let hash = crate::archive::hash_of(&b"abc"[..]).unwrap();
        assert!(!store.has(&hash).await.unwrap());
        store.put_file(&hash, &file).await.unwrap();
        assert!(store.has(&hash).await.unwrap());
        let copy = dir.path().join("copy");
        store.read_into(&hash, &copy).await.unwrap();
        assert_eq!(std::fs::read(&copy).unwrap(), b"abc");
        assert!(store.has("../x").await.is_err());

        store.save_manifest(&manifest(false, &hash)).await.unwrap();
        store.save_manifest(&manifest(true, &hash)).await.unwrap();
        let err = store
            .save_manifest(&manifest(true, &"0".repeat(64)))
            .await
            .unwrap_err();
        assert!(matches!(err, ArtifactError::Frozen(_)), "{err}");
        assert_eq!(
            store.manifest("r1").await.unwrap().unwrap().files[0].hash,
            hash
        );

        let tag = Tag {
            tag: TagRef::parse("prepare:latest").unwrap(),
            created_at_ms: 2,
            manifest: manifest(true, &hash),
        };
        store.add_tag(&tag).await.unwrap();
        let again = store.add_tag(&tag).await.unwrap_err();
        assert!(matches!(again, ArtifactError::Exists(_)), "{again}");
        assert_eq!(store.tags().await.unwrap(), std::slice::from_ref(&tag));
        assert_eq!(store.tag(&tag.tag).await.unwrap(), Some(tag.clone()));
        assert!(store
            .tag(&TagRef::parse("train:latest").unwrap())
            .await
            .unwrap()
            .is_none());
        assert!(store.delete_tag(&tag.tag).await.unwrap());
        assert!(!store.delete_tag(&tag.tag).await.unwrap());
        assert!(store.tags().await.unwrap().is_empty());
    }
}
