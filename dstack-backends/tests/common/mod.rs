//! Helpers shared by the integration tests.

// Each test crate uses some of the helpers.
#![allow(dead_code)]

pub mod gcp;
pub mod harness;
pub mod http;
pub mod moto;
pub mod netns;
pub mod podman;

/// Polls `check` every 100 ms until it holds; fails the test, naming `what`, after `secs`
/// seconds.
pub async fn eventually(secs: u64, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
