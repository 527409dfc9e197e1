//! Artifacts: the files a run lists in `artifacts` (paths relative to its working
//! directory), saved while it runs and once more when it ends, content-addressed and
//! immutable once the run has ended; and tags, which name a finished run's artifacts or
//! files uploaded from a client, for `depends-on` to put into a later run.
//!
//! The engine takes the snapshots (`engine::artifacts`: the agent lists the files with their
//! hashes, the engine fetches only the content the store lacks); the store is a directory or
//! an S3-compatible bucket ([`StorageConfig`]), never seen by agents.

mod manifest;
mod store;
mod tags;
mod tar;

pub use manifest::{missing, normalize, FileEntry, Manifest};
pub use store::{ArtifactStore, ObjectStream, StorageConfig};
pub use tags::{check_name, resolve, Tag, TagRef};
pub use tar::{pack, Header, END};

/// Why an artifact operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArtifactError {
    /// The object store failed.
    #[error("artifact store: {0}")]
    Store(#[from] object_store::Error),
    /// Reading or writing a local file failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A stored record is not what was written.
    #[error("artifact store: a record cannot be read: {0}")]
    Json(#[from] serde_json::Error),
    /// The run has ended and its artifacts are frozen.
    #[error("the artifacts of run {0} are frozen: it has ended")]
    Frozen(String),
    /// The tag exists already.
    #[error("tag {0} exists (delete it first: dstack tags delete)")]
    Exists(String),
    /// Nothing by that name.
    #[error("{0}")]
    NotFound(String),
    /// A bad request (a path, a name, a hash).
    #[error("{0}")]
    Invalid(String),
    /// This build or configuration cannot do it.
    #[error("{0}")]
    Unsupported(String),
}
