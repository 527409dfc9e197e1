//! Helpers shared by the integration tests.

// Each test crate uses some of the helpers.
#![allow(dead_code)]

pub mod cloud_init;
#[cfg(feature = "aws")]
pub mod ec2;
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

/// The output of a read of a client that hosts its engine in this process: such reads
/// (`RunHandle::jobs`, `Runs::get`, …) only read the store and complete at once, so sync
/// helpers of the tests take them without a runtime's help.
pub fn now<T>(read: impl std::future::Future<Output = T>) -> T {
    use futures_util::FutureExt;
    Box::pin(read)
        .now_or_never()
        .expect("an in-process read completes at once")
}
