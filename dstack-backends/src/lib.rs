//! Compute backends of dstack-rs, one module per backend behind a cargo feature.
//!
//! - `local` (default): this machine, through a detached `dstack-agent`.
//! - `ssh` (default): hosts listed in SSH fleets, reached with russh.

#[cfg(feature = "local")]
pub mod local;

#[cfg(feature = "local")]
pub use local::embedded_client;

#[cfg(feature = "ssh")]
pub mod ssh;
