//! HTTP/1.1 plumbing shared by the project's APIs (the host agent's on a unix socket, the
//! `dstack server`'s on TCP): a keep-alive JSON [`client`], and the pieces every [`serve`]
//! side needs (bounded bodies, bearer tokens, JSON and streamed answers).

pub mod client;
pub mod serve;
