//! The engine ↔ host-agent protocol and its client side.
//!
//! Every host (this machine, an SSH host, a cloud VM) runs the same `dstack-agent`, which
//! supervises jobs and serves a small HTTP/1.1 API. The engine never reaches it over a network
//! port: locally it speaks over a unix socket, remotely over an SSH channel.
//!
//! | Method & path | Body | Response |
//! |---|---|---|
//! | `GET /api/healthcheck` | — | [`Healthcheck`] |
//! | `POST /api/jobs` | [`JobSubmit`] | [`JobInfo`] (idempotent: the same id returns the existing job) |
//! | `POST /api/jobs` | `[JobSubmit]` (a queue: each usually `after` the one before) | `[JobInfo]`, the jobs taken in order; the first refused ends the request with its error, those before it are taken |
//! | `GET /api/jobs` | — | `[JobInfo]` |
//! | `GET /api/jobs/{id}` | — | [`JobInfo`]; 404 |
//! | `POST /api/jobs/{id}/stop` | [`StopRequest`] | [`JobInfo`]; 404 |
//! | `DELETE /api/jobs/{id}` | — | 204; 409 while running (removes the job and its logs) |
//! | `GET /api/jobs/{id}/logs?offset=N&follow=B` | — | the raw output from byte `offset`; with `follow=true` the body stays open until the job has finished and every byte was sent |
//! | `GET /api/jobs/{id}/ssh` | — | [`SshEndpoint`]; 404; 409 unless running |
//! | `POST /api/jobs/{id}/ssh` (`Upgrade:` [`SSH_UPGRADE`]) | [`SshRequest`] | `101 Switching Protocols`, then one SSH connection into the job's world (its working directory, environment, user; inside its container) authenticated by the keys of the request; 409 unless running |
//! | `GET /api/jobs/{id}/artifacts` | — | [`ArtifactListing`]: the files under the job's `artifacts` paths with their SHA-256 (as the job left them, once it has ended); 404 |
//! | `POST /api/jobs/{id}/artifacts` | `[path]` (files of the listing) | a tar archive of those files as they are now (or were at the end), streamed |
//! | `GET /api/lease` | — | [`LeaseStatus`] |
//! | `POST /api/lease` | — | [`LeaseStatus`], after renewing the owner lease (a no-op for an agent without one) |
//! | `GET /api/events` | — | newline-delimited [`JobInfo`] JSON: one line per job at connection time, then one per change (but to `queued`: the submission's reply says so), forever; an empty line after [`EVENTS_HEARTBEAT`] without a change |
//!
//! Errors are plain text with a status code.
//!
//! A client that hears nothing on `/api/events` for [`EVENTS_SILENCE`] (no change, no
//! heartbeat), or gets no answer to the request in that time, takes the agent as hung.

mod client;
mod protocol;

pub use client::{AgentClient, AgentDialer, AgentError, AgentStream, ByteStream, EventStream};
pub use protocol::*;
