//! `artifacts/*` and `tags/*`: runs' artifacts and tags (see `dstack_core::artifacts`),
//! answered from the engine's artifact store. Content goes both ways streamed (an upload
//! through a temporary file, its SHA-256 checked before it is kept).

use std::io::Write;

use dstack_core::artifacts::{ArtifactStore, TagRef};
use dstack_core::client::{ArtifactsOf, ObjectRef, TagAdd};
use dstack_core::http::serve::{json, stream, Body};
use futures_util::StreamExt;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use sha2::Digest;

use crate::errors::ApiError;
use crate::routes::{body, engine};
use crate::Shared;

/// The largest file a client may upload with a tag.
const MAX_UPLOAD_BYTES: u64 = 64 * 1024 * 1024 * 1024;

/// Answers `artifacts/{action}` and `tags/{action}`.
pub(crate) async fn route(
    shared: &Shared,
    route: &[&str],
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let engine = engine(shared)?;
    match route {
        ["artifacts", "list"] => {
            let asked: ArtifactsOf = body(req).await?;
            Ok(json(&engine.artifacts(&asked.run_name).await?))
        }
        ["artifacts", "object"] => {
            let asked: ObjectRef = body(req).await?;
            let content = store(shared)?.read(&asked.hash).await?;
            Ok(stream(
                "application/octet-stream",
                content.map(|chunk| chunk.map_err(std::io::Error::other)),
            ))
        }
        ["artifacts", "has_object"] => {
            let asked: ObjectRef = body(req).await?;
            Ok(json(&store(shared)?.has(&asked.hash).await?))
        }
        ["artifacts", "upload_object"] => {
            let hash = crate::routes::query_hash(&req);
            upload(store(shared)?, &hash, req.into_body()).await?;
            Ok(json(&true))
        }
        ["tags", "add"] => {
            let request: TagAdd = body(req).await?;
            let tag = match request.run_name {
                Some(run) => engine.tag_run(&request.name, &run).await?,
                None => engine.tag_files(&request.name, request.files).await?,
            };
            Ok(json(&tag))
        }
        ["tags", "list"] => Ok(json(&store(shared)?.tags().await?)),
        ["tags", "delete"] => {
            let tag: TagRef = body(req).await?;
            Ok(json(&store(shared)?.delete_tag(&tag).await?))
        }
        _ => Err(ApiError::not_found(format!(
            "no such route {}",
            route.join("/")
        ))),
    }
}

/// The engine's artifact store.
fn store(shared: &Shared) -> Result<&ArtifactStore, ApiError> {
    engine(shared)?
        .artifact_store()
        .ok_or_else(|| ApiError::bad_request("this server keeps no artifacts"))
}

/// Keeps the content in `body` as `hash`: written to a temporary file, hashed on its way,
/// refused unless its SHA-256 is `hash`.
async fn upload(store: &ArtifactStore, hash: &str, mut body: Incoming) -> Result<(), ApiError> {
    if !dstack_core::archive::is_hash(hash) {
        return Err(ApiError::bad_request(format!(
            "`{hash}` is not a SHA-256 in lowercase hex"
        )));
    }
    let temp =
        std::env::temp_dir().join(format!("dstack-upload-{}", uuid::Uuid::new_v4().simple()));
    let written = async {
        let mut file = std::io::BufWriter::new(
            std::fs::File::create(&temp).map_err(|e| ApiError::bad_request(e.to_string()))?,
        );
        let mut hasher = sha2::Sha256::new();
        let mut bytes = 0u64;
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|e| ApiError::bad_request(format!("the upload broke off: {e}")))?;
            if let Ok(data) = frame.into_data() {
                bytes += data.len() as u64;
                if bytes > MAX_UPLOAD_BYTES {
                    return Err(ApiError::bad_request("the file is too large"));
                }
                hasher.update(&data);
                file.write_all(&data)
                    .map_err(|e| ApiError::bad_request(e.to_string()))?;
            }
        }
        file.flush()
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let got: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if got != hash {
            return Err(ApiError::bad_request(format!(
                "the upload's SHA-256 is {got}, not {hash}"
            )));
        }
        store.put_file(hash, &temp).await?;
        Ok(())
    }
    .await;
    let _ = std::fs::remove_file(&temp);
    written
}
