//! `type: fleet` — backend fleets (`nodes: 0..N`) and SSH fleets (`ssh_config`).

use serde::{Serialize, Serializer};

use super::de::{int_between, string_enum, Cx, Decode, Fields, Path};
use super::env::Env;
use super::error::ErrorCode;
use super::limits;
use super::profile::{ProfileParams, ProfileScope, Retry, RetryEvent};
use super::range::{above_limit, decode_range, Range};
use super::resources::ResourcesSpec;
use super::run::mark_of;
use super::yaml::{Node, NodeKind};

string_enum! {
    /// Whether instances must be interconnected.
    Placement { Any = "any", Cluster = "cluster" }
}

/// `blocks:` — split each instance into this many equal blocks, or `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blocks {
    /// As many blocks as GPUs (or CPUs when there are none).
    Auto,
    /// A fixed number of blocks.
    Count(i64),
}

impl Serialize for Blocks {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Blocks::Auto => s.serialize_str("auto"),
            Blocks::Count(n) => s.serialize_i64(*n),
        }
    }
}

impl Decode for Blocks {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        match &node.kind {
            NodeKind::Str(s) if s == "auto" => Some(Blocks::Auto),
            NodeKind::Int(_) => int_between(node, cx, path, 1, i64::MAX).map(Blocks::Count),
            _ => {
                cx.expected(node, path, "a positive integer or \"auto\"");
                None
            }
        }
    }
}

/// `nodes:` of a backend fleet: `min`, `target` (defaults to `min`) and `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FleetNodes {
    /// Instances kept at all times.
    pub min: i64,
    /// Instances provisioned when the fleet is applied.
    pub target: i64,
    /// Hard limit (unbounded when `None`).
    pub max: Option<i64>,
}

impl Serialize for FleetNodes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("min", &self.min)?;
        if self.target != self.min {
            map.serialize_entry("target", &self.target)?;
        }
        if let Some(max) = self.max {
            map.serialize_entry("max", &max)?;
        }
        map.end()
    }
}

impl Decode for FleetNodes {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let (min, target, max) = match &node.kind {
            NodeKind::Map(_) => {
                let mut f = Fields::new(node, cx, path, "fleet nodes")?;
                let min: Option<i64> = f.opt(cx, path, "min");
                let target: Option<i64> = f.opt(cx, path, "target");
                let max: Option<i64> = f.opt(cx, path, "max");
                f.finish(cx, path);
                if cx.has_errors() {
                    return None;
                }
                let min = min.unwrap_or(0);
                (min, target.unwrap_or(min), max)
            }
            NodeKind::Str(_) | NodeKind::Int(_) => {
                let r: Range<i64> = decode_range(node, cx, path)?;
                let min = r.min.unwrap_or(0);
                (min, min, r.max)
            }
            _ => {
                cx.expected(
                    node,
                    path,
                    "a number of nodes (2), a range (0..4) or {min, target, max}",
                );
                return None;
            }
        };
        let problem = if min < 0 {
            Some(format!("min cannot be negative, got {min}"))
        } else if target < 0 {
            Some(format!("target cannot be negative, got {target}"))
        } else if let Some(v) = [Some(min), Some(target), max]
            .into_iter()
            .flatten()
            .find(|v| *v > limits::MAX_NODE_COUNT)
        {
            let message = above_limit(v, limits::MAX_NODE_COUNT);
            cx.error(node.mark, path, ErrorCode::Limit, message);
            return None;
        } else if max.is_some_and(|m| m < min) {
            Some(format!(
                "max must not be less than min ({min}..{})",
                max.unwrap_or_default()
            ))
        } else if target < min {
            Some(format!(
                "target must not be less than min ({target} < {min})"
            ))
        } else if max.is_some_and(|m| target > m) {
            Some(format!(
                "target must not be greater than max ({target} > {})",
                max.unwrap_or_default()
            ))
        } else {
            None
        };
        if let Some(message) = problem {
            cx.error(node.mark, path, ErrorCode::OutOfRange, message);
            return None;
        }
        Some(FleetNodes { min, target, max })
    }
}

/// An SSH public key (and optionally the private one) given inline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SshKey {
    /// The public key.
    pub public: String,
    /// The private key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private: Option<String>,
}

impl Decode for SshKey {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let mut f = Fields::new(node, cx, path, "SSH key")?;
        let public = f.req(cx, path, "public");
        let private = f.opt(cx, path, "private");
        f.finish(cx, path);
        Some(SshKey {
            public: public?,
            private,
        })
    }
}

/// A jump host in front of the fleet hosts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SshProxy {
    /// Host name or address.
    pub hostname: String,
    /// SSH port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
    /// Login user.
    pub user: String,
    /// Private key file.
    pub identity_file: String,
    /// Inline key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ssh_key: Option<SshKey>,
}

fn ssh_port(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<i64> {
    int_between(node, cx, path, 1, 65535)
}

impl Decode for SshProxy {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let mut f = Fields::new(node, cx, path, "proxy jump")?;
        let hostname = f.req(cx, path, "hostname");
        let port = f.opt_with(cx, path, "port", ssh_port);
        let user = f.req(cx, path, "user");
        let identity_file = f.req(cx, path, "identity_file");
        let ssh_key = f.opt(cx, path, "ssh_key");
        f.finish(cx, path);
        Some(SshProxy {
            hostname: hostname?,
            port,
            user: user?,
            identity_file: identity_file?,
            ssh_key,
        })
    }
}

/// One host of an SSH fleet, with per-host overrides.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SshHost {
    /// Host name or address.
    pub hostname: String,
    /// SSH port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
    /// Login user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Private key file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_file: Option<String>,
    /// Inline key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ssh_key: Option<SshKey>,
    /// Jump host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_jump: Option<SshProxy>,
    /// The address other hosts reach this one at.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub internal_ip: Option<String>,
    /// Blocks of this host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocks: Option<Blocks>,
}

/// A host entry: a bare host name or a mapping with overrides.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum SshHostEntry {
    /// Just the host name.
    Name(String),
    /// A host with overrides.
    Host(Box<SshHost>),
}

impl Decode for SshHostEntry {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        if !matches!(node.kind, NodeKind::Map(_)) {
            return String::decode(node, cx, path).map(SshHostEntry::Name);
        }
        let mut f = Fields::new(node, cx, path, "SSH host")?;
        let hostname = f.req(cx, path, "hostname");
        let port = f.opt_with(cx, path, "port", ssh_port);
        let user = f.opt(cx, path, "user");
        let identity_file = f.opt(cx, path, "identity_file");
        let ssh_key = f.opt(cx, path, "ssh_key");
        let proxy_jump = f.opt(cx, path, "proxy_jump");
        let internal_ip = f.opt(cx, path, "internal_ip");
        let blocks = f.opt(cx, path, "blocks");
        f.finish(cx, path);
        Some(SshHostEntry::Host(Box::new(SshHost {
            hostname: hostname?,
            port,
            user,
            identity_file,
            ssh_key,
            proxy_jump,
            internal_ip,
            blocks,
        })))
    }
}

/// `ssh_config:` of an SSH fleet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SshConfig {
    /// Default login user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Default SSH port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
    /// Default private key file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_file: Option<String>,
    /// Default inline key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ssh_key: Option<SshKey>,
    /// Default jump host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_jump: Option<SshProxy>,
    /// The hosts.
    pub hosts: Vec<SshHostEntry>,
    /// The CIDR of the hosts' internal network.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

impl Decode for SshConfig {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let mut f = Fields::new(node, cx, path, "ssh_config")?;
        let user = f.opt(cx, path, "user");
        let port = f.opt_with(cx, path, "port", ssh_port);
        let identity_file = f.opt(cx, path, "identity_file");
        let ssh_key = f.opt(cx, path, "ssh_key");
        let proxy_jump = f.opt(cx, path, "proxy_jump");
        let hosts = f.req(cx, path, "hosts");
        let network = f.opt(cx, path, "network");
        f.finish(cx, path);
        Some(SshConfig {
            user,
            port,
            identity_file,
            ssh_key,
            proxy_jump,
            hosts: hosts?,
            network,
        })
    }
}

/// `type: fleet`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FleetConfiguration {
    /// The fleet name (generated when omitted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Cluster placement for multi-node tasks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    /// Blocks per instance.
    pub blocks: Blocks,
    /// Instance counts of a backend fleet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes: Option<FleetNodes>,
    /// Resources of the instances of a backend fleet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourcesSpec>,
    /// Hosts of an SSH fleet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ssh_config: Option<SshConfig>,
    /// Environment of every job on an SSH fleet.
    pub env: Env,
    /// Profile parameters of a backend fleet.
    #[serde(flatten)]
    pub profile: ProfileParams,
}

/// Fields only a backend fleet may set.
const BACKEND_FLEET_FIELDS: &[&str] = &[
    "nodes",
    "reservation",
    "resources",
    "backends",
    "regions",
    "availability_zones",
    "instance_types",
    "spot_policy",
    "retry",
    "max_price",
    "idle_duration",
    "tags",
    "backend_options",
];

impl FleetConfiguration {
    /// What of the fleet's `retry` this project cannot honour, if anything: a fleet retries
    /// provisioning that found no capacity (see `engine::consolidate`), so `on_events` may list
    /// only `no-capacity` (a job's `interruption` and `error` do not apply to instances), and
    /// `duration` cannot be negative. dstack's parser accepts these (and dstack ignores a
    /// fleet's `retry`), so they are refused when the fleet is applied, not when it is read.
    pub fn unsupported_retry(&self) -> Option<String> {
        let Some(Retry::Policy {
            on_events,
            duration,
        }) = &self.profile.retry
        else {
            return None;
        };
        let others: Vec<&str> = on_events
            .as_deref()
            .unwrap_or_default()
            .iter()
            .filter(|e| **e != RetryEvent::NoCapacity)
            .map(|e| e.as_str())
            .collect();
        if !others.is_empty() {
            return Some(format!(
                "retry.on_events: a fleet retries only provisioning that found no capacity: its \
                 `on_events` can list only no-capacity, not {}",
                others.join(", ")
            ));
        }
        duration
            .filter(|d| d.0 < 0)
            .map(|_| "retry.duration: a fleet's retry duration cannot be negative".to_string())
    }

    /// Decodes a fleet from the document's fields.
    pub fn read(node: &Node, f: &mut Fields<'_>, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let name = f.opt(cx, path, "name");
        let placement = f.opt(cx, path, "placement");
        let blocks = f.or(cx, path, "blocks", || Blocks::Count(1));
        let nodes = f.opt(cx, path, "nodes");
        let resources = f.opt(cx, path, "resources");
        let ssh_config = f.opt(cx, path, "ssh_config");
        let env = f.or(cx, path, "env", Env::default);
        let profile = ProfileParams::read(f, cx, path, ProfileScope::Fleet);
        let fleet = FleetConfiguration {
            name,
            placement,
            blocks: blocks?,
            nodes,
            resources,
            ssh_config,
            env: env?,
            profile,
        };
        let has = |k: &str| node.get(k).is_some_and(|n| !n.is_null());
        if has("ssh_config") {
            for key in BACKEND_FLEET_FIELDS.iter().filter(|k| has(k)) {
                let message =
                    format!("`{key}` cannot be used in an SSH fleet (one with `ssh_config`)");
                cx.error(
                    mark_of(node, key),
                    &path.key(key),
                    ErrorCode::Conflict,
                    message,
                );
            }
        } else if !has("nodes") {
            let message =
                "either `nodes` (a backend fleet) or `ssh_config` (an SSH fleet) must be set";
            cx.error(node.mark, path, ErrorCode::MissingField, message);
        } else if !fleet.env.0.is_empty() {
            let message = "`env` can only be used in an SSH fleet";
            cx.error(
                mark_of(node, "env"),
                &path.key("env"),
                ErrorCode::Conflict,
                message,
            );
        }
        Some(fleet)
    }
}
