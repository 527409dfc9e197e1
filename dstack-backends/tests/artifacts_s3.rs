//! The artifact store in an S3-compatible bucket (`artifacts: {type: s3, …}` of the server's
//! `config.yml`), against a moto server: content streamed in and out, a run's manifest frozen
//! once it has ended, tags made once; the same store a local directory gives.

#![cfg(feature = "aws")]

mod common;

use std::io::{Read, Write};

use common::moto::Moto;
use dstack_core::artifacts::{
    ArtifactError, ArtifactStore, FileEntry, Manifest, StorageConfig, Tag, TagRef,
};

/// Creates `bucket` in moto (a plain `PUT /bucket`: moto takes unsigned requests).
fn create_bucket(moto: &Moto, bucket: &str) {
    let addr = moto.url.trim_start_matches("http://");
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    write!(
        conn,
        "PUT /{bucket} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn artifacts_are_kept_in_an_s3_bucket() {
    let moto = Moto::start();
    create_bucket(&moto, "artifacts");
    // Credentials come from the usual environment (moto takes any).
    std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    let config = dstack_backends::config::parse(
        &format!(
            "artifacts:\n  type: s3\n  bucket: artifacts\n  region: us-east-1\n  endpoint_url: {}\n  prefix: team/a\nprojects: []\n",
            moto.url
        ),
        "config.yml",
    )
    .unwrap();
    let storage = config.artifacts.expect("artifacts: is read");
    assert!(matches!(&storage, StorageConfig::S3 { bucket, .. } if bucket == "artifacts"));
    let store = ArtifactStore::open(&storage).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.bin");
    // Larger than one part of a multipart upload.
    let content: Vec<u8> = (0..12 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &content).unwrap();
    let hash = dstack_core::archive::hash_of(&content[..]).unwrap();
    assert!(!store.has(&hash).await.unwrap());
    store.put_file(&hash, &file).await.unwrap();
    assert!(store.has(&hash).await.unwrap());
    let copy = dir.path().join("copy.bin");
    store.read_into(&hash, &copy).await.unwrap();
    assert!(std::fs::read(&copy).unwrap() == content);

    let manifest = |frozen: bool, hash: &str| Manifest {
        run_id: Some("run-1".into()),
        run_name: Some("train-1".into()),
        workflow: Some("train".into()),
        saved_at_ms: 1,
        frozen,
        files: vec![FileEntry {
            path: "checkpoint/model.bin".into(),
            hash: hash.into(),
            size: content.len() as u64,
            mode: 0o644,
        }],
    };
    store.save_manifest(&manifest(false, &hash)).await.unwrap();
    store.save_manifest(&manifest(true, &hash)).await.unwrap();
    let refused = store
        .save_manifest(&manifest(true, &"0".repeat(64)))
        .await
        .unwrap_err();
    assert!(matches!(refused, ArtifactError::Frozen(_)), "{refused}");
    assert_eq!(
        store.manifest("run-1").await.unwrap(),
        Some(manifest(true, &hash))
    );

    let tag = Tag {
        tag: TagRef::parse("train:latest").unwrap(),
        created_at_ms: 2,
        manifest: manifest(true, &hash),
    };
    store.add_tag(&tag).await.unwrap();
    let again = store.add_tag(&tag).await.unwrap_err();
    assert!(matches!(again, ArtifactError::Exists(_)), "{again}");
    assert_eq!(store.tags().await.unwrap(), std::slice::from_ref(&tag));
    assert!(store.delete_tag(&tag.tag).await.unwrap());
    assert!(store.tags().await.unwrap().is_empty());
}
