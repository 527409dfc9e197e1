//! dstack-rs core: the configuration model of `.dstack.yml` files (and, as the engine grows,
//! runs, jobs, fleets, offers and the scheduler).
//!
//! This crate creates no async runtime and pulls in no cloud SDK or Python; backends live in
//! `dstack-backends`, the host agent in `dstack-agent`.

pub mod agent;
pub mod api;
pub mod archive;
pub mod artifacts;
pub mod backend;
pub mod client;
pub mod config;
pub mod engine;
pub mod events;
pub mod files;
pub mod forward;
pub mod http;
pub mod ide;
pub mod model;
pub mod offers;
pub mod repos;
pub mod secrets;
pub mod store;

pub use client::{Client, ClientOptions, RunHandle};
