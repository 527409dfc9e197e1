//! Helpers shared by the integration tests.

// Each test crate uses some of the helpers.
#![allow(dead_code)]

pub mod gcp;
pub mod harness;
pub mod http;
pub mod moto;
pub mod netns;
pub mod podman;
