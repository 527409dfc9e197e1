//! Helpers shared by the integration tests.

// Each test crate uses some of the helpers.
#![allow(dead_code)]

pub mod netns;
pub mod podman;
