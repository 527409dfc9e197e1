//! Compute backends of dstack-rs, one module per backend behind a cargo feature.
//!
//! - `local` (default): this machine, through a detached `dstack-agent`.
//! - `ssh` (default): hosts listed in SSH fleets, reached with russh.
//! - `aws`: AWS EC2 (aws-sdk-ec2), configured in `$DSTACK_HOME/server/config.yml` ([`config`]).
//! - `gcp`: GCP Compute Engine (google-cloud-compute-v1), likewise.
//! - [`memory`] (always built): an in-memory cloud for tests and simulations; runs no jobs.

#[cfg(feature = "local")]
pub mod local;

#[cfg(feature = "ssh")]
pub mod ssh;

pub mod cloud;
pub mod config;
pub mod memory;

#[cfg(feature = "ssh")]
pub mod project;

#[cfg(feature = "ssh")]
pub mod provider;

#[cfg(feature = "aws")]
pub mod aws;

#[cfg(feature = "gcp")]
pub mod gcp;
