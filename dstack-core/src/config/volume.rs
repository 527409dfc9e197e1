//! `type: volume` — network volumes, discriminated by `backend`.

use serde::Serialize;

use super::de::{Cx, Decode, Fields, Path};
use super::duration::{decode_idle, Duration};
use super::error::ErrorCode;
use super::range::Memory;
use super::refs::{decode_tags, Tags};
use super::resources::decode_memory;

/// The backends that provide network volumes.
const VOLUME_BACKENDS: &[&str] = &["aws", "gcp", "runpod", "kubernetes", "daytona", "lium"];

/// `type: volume`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VolumeConfiguration {
    /// The backend that holds the volume.
    pub backend: String,
    /// The volume name (generated when omitted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The region (required for aws, gcp and runpod; `""` for kubernetes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The availability zone (aws, gcp).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub availability_zone: Option<String>,
    /// Size in GB (required when creating).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<Memory>,
    /// An existing volume to register instead of creating one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume_id: Option<String>,
    /// Delete the volume after it has been unused this long (`-1`: never).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_cleanup_duration: Option<Duration>,
    /// Tags for the cloud resource.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Tags>,
    /// An existing PVC to register (kubernetes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claim_name: Option<String>,
    /// The storage class (kubernetes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// PVC access modes (kubernetes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_modes: Option<Vec<String>>,
    /// Mount read-only (kubernetes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
}

impl VolumeConfiguration {
    /// Decodes a volume from the document's fields.
    pub fn read(f: &mut Fields<'_>, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let backend = f.req_with(cx, path, "backend", |n, cx, p| {
            let b = String::decode(n, cx, p)?;
            if !VOLUME_BACKENDS.contains(&b.as_str()) {
                let message = super::de::one_of_message(&b, VOLUME_BACKENDS);
                cx.error(n.mark, p, ErrorCode::UnknownType, message);
                return None;
            }
            Some(b)
        });
        let Some(backend) = backend else {
            f.skip_rest();
            return None;
        };
        let b = backend.as_str();
        let name = f.opt(cx, path, "name");
        let auto_cleanup_duration = f.opt_with(cx, path, "auto_cleanup_duration", decode_idle);
        let tags = f.opt_with(cx, path, "tags", decode_tags);
        let mut v = VolumeConfiguration {
            backend: backend.clone(),
            name,
            region: None,
            availability_zone: None,
            size: None,
            volume_id: None,
            auto_cleanup_duration,
            tags,
            claim_name: None,
            storage_class_name: None,
            access_modes: None,
            read_only: None,
        };
        if matches!(b, "aws" | "gcp" | "runpod") {
            v.region = f.req(cx, path, "region");
        }
        if b == "kubernetes" {
            v.region = f.or(cx, path, "region", String::new);
        }
        if matches!(b, "aws" | "gcp") {
            v.availability_zone = f.opt(cx, path, "availability_zone");
        }
        if matches!(b, "aws" | "gcp" | "runpod" | "kubernetes") {
            v.size = f.opt_with(cx, path, "size", decode_memory);
        }
        if b != "kubernetes" {
            v.volume_id = f.opt(cx, path, "volume_id");
        } else {
            v.claim_name = f.opt(cx, path, "claim_name");
            v.storage_class_name = f.opt(cx, path, "storage_class_name");
            v.access_modes = f.or(cx, path, "access_modes", || {
                vec!["ReadWriteOnce".to_string()]
            });
            v.read_only = f.or(cx, path, "read_only", || false);
        }
        Some(v)
    }
}
