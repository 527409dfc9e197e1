//! SSH fleets: your own hosts, reached with a Rust SSH client (russh). Host keys are trusted
//! on first use and pinned in `$DSTACK_HOME/ssh/known_hosts`; the agent is uploaded to each
//! host and started detached; the engine talks to it only through SSH channels to its unix
//! socket (no agent port is ever opened on the network).

mod compute;
mod deploy;
mod known_hosts;
mod link;
mod session;

pub use compute::{SshCompute, SshInstanceData};
pub use deploy::AgentLease;
pub use known_hosts::{HostKeyCheck, KnownHosts};
pub use session::{quote, Keepalive, Output, SshError, SshSession, SshTarget, CONNECT_TIMEOUT};
