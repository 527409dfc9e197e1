//! Cloud backend configuration in dstack's server config format, read from
//! `$DSTACK_HOME/server/config.yml`:
//!
//! ```yaml
//! projects:
//!   - name: main
//!     backends:
//!       - type: aws
//!         creds: {type: access_key, access_key: AKIA…, secret_key: …}   # or {type: default}
//!         regions: [us-east-1, us-west-2]
//! ```
//!
//! The first project is used. Besides dstack's fields, a backend accepts `ssh_ingress_cidrs`
//! (where SSH may reach instances from; see [`SshIngress`]), `endpoint_url` (send API calls
//! there, e.g. to a local stand-in) and `instance_addresses` (reach instances at these
//! addresses instead of their own: each new instance takes the first one no live instance has —
//! a test option, so that fake clouds never make the engine contact the addresses they hand
//! out). dstack fields that dstack-rs does not implement are refused, each by name; so are
//! contradictory network settings.

use std::collections::BTreeMap;
use std::path::Path;

use dstack_core::config::yaml::{self, Node, NodeKind};
use serde::Deserialize;

/// AWS credentials.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AwsCreds {
    /// An access key pair.
    AccessKey {
        /// The key id.
        access_key: String,
        /// The secret.
        secret_key: String,
    },
    /// The SDK's default chain (environment, profile files, instance metadata).
    Default,
}

/// An OS image to boot instances from.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OsImage {
    /// Image name (AWS: wildcards allowed, the newest match is used; GCP: an image or image
    /// family URL such as `projects/ubuntu-os-cloud/global/images/family/ubuntu-2204-lts`).
    pub name: String,
    /// The image owner's account id or alias (AWS).
    #[serde(default)]
    pub owner: String,
    /// The user to log in as.
    #[serde(default = "default_user")]
    pub user: String,
}

fn default_user() -> String {
    "ubuntu".to_string()
}

/// Images for CPU and NVIDIA instances.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OsImages {
    /// For instances without GPUs.
    pub cpu: Option<OsImage>,
    /// For NVIDIA GPU instances.
    pub nvidia: Option<OsImage>,
}

impl OsImages {
    /// The image for an instance with GPUs (`gpu`) or without: the configured one, else the
    /// backend's default.
    pub fn pick(
        &self,
        gpu: bool,
        default_cpu: fn() -> OsImage,
        default_nvidia: fn() -> OsImage,
    ) -> OsImage {
        let (configured, default) = if gpu {
            (&self.nvidia, default_nvidia)
        } else {
            (&self.cpu, default_cpu)
        };
        configured.clone().unwrap_or_else(default)
    }
}

/// `type: aws`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// Credentials (default: the SDK's default chain).
    pub creds: Option<AwsCreds>,
    /// Regions to use (default: every region of the catalog).
    pub regions: Option<Vec<String>>,
    /// Tags for every resource.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Images to boot (default: dstack's).
    #[serde(default)]
    pub os_images: OsImages,
    /// Give instances public IPs (default true): instances go in subnets routed to an
    /// internet gateway; without, in subnets whose outbound traffic goes through a NAT or
    /// transit gateway or a peering connection, and are reached at their private address.
    pub public_ips: Option<bool>,
    /// The VPC to use by its `Name` tag, in every region (default: the default VPC).
    pub vpc_name: Option<String>,
    /// The VPC to use per region (regions not listed use the default VPC unless
    /// `default_vpcs` is false, in which case they are not used).
    pub vpc_ids: Option<BTreeMap<String, String>>,
    /// Whether default VPCs may be used where no VPC is configured (default true).
    pub default_vpcs: Option<bool>,
    /// dstack-rs: where SSH may reach instances from (see [`SshIngress`]).
    pub ssh_ingress_cidrs: Option<Vec<String>>,
    /// An IAM instance profile for instances.
    pub iam_instance_profile: Option<String>,
    /// Instance types beyond the families dstack supports.
    pub experimental_instance_types: Option<Vec<String>>,
    /// dstack-rs: send EC2 API calls here (e.g. a moto server).
    pub endpoint_url: Option<String>,
    /// dstack-rs test option: reach instances at these addresses (see the module docs).
    #[serde(default)]
    pub instance_addresses: Vec<String>,
}

/// GCP credentials.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum GcpCreds {
    /// A service account key (a file, or its JSON inline).
    ServiceAccount {
        /// The key file.
        filename: Option<String>,
        /// The key JSON.
        data: Option<String>,
    },
    /// Application default credentials (`GOOGLE_APPLICATION_CREDENTIALS` or gcloud's ADC file).
    Default,
    /// dstack-rs test option: send no credentials (for an `endpoint_url` stand-in only).
    Anonymous,
}

/// `type: gcp`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GcpConfig {
    /// The project to create resources in.
    pub project_id: String,
    /// Credentials.
    pub creds: Option<GcpCreds>,
    /// Regions to use (default: every region of the catalog).
    pub regions: Option<Vec<String>>,
    /// Labels for every resource.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// The VPC network (default `default`).
    pub vpc_name: Option<String>,
    /// Give instances public IPs (default true); without, they are reached at their internal
    /// address.
    pub public_ips: Option<bool>,
    /// dstack-rs: where SSH may reach instances from (see [`SshIngress`]).
    pub ssh_ingress_cidrs: Option<Vec<String>>,
    /// A service account for instances.
    pub vm_service_account: Option<String>,
    /// dstack-rs: images to boot (default: Ubuntu 22.04 for CPU, Google's Deep Learning VM
    /// with CUDA for NVIDIA instances; the user defaults to `ubuntu`).
    #[serde(default)]
    pub os_images: OsImages,
    /// dstack-rs: send Compute API calls here (e.g. a local stand-in).
    pub endpoint_url: Option<String>,
    /// dstack-rs test option: reach instances at these addresses (see the module docs).
    #[serde(default)]
    pub instance_addresses: Vec<String>,
}

/// Where SSH may reach a backend's instances from: `ssh_ingress_cidrs` (CIDR blocks, IPv4 or
/// IPv6), else dstack's `0.0.0.0/0`. dstack has no such setting: its security group (AWS) and
/// firewall rule (GCP) let SSH in from anywhere, and other dstack servers of the same project
/// (AWS) or network (GCP) share them. So a configured list gets a security group or firewall
/// rule of its own, named with a hash of the list ([`SshIngress::suffix`]): nothing another
/// server adds to the shared one opens these instances up.
#[derive(Clone, Debug, PartialEq)]
pub struct SshIngress {
    /// The CIDR blocks, sorted.
    pub cidrs: Vec<String>,
    /// `None` for dstack's default (the shared resource), else 8 hex digits naming the list.
    pub suffix: Option<String>,
}

impl SshIngress {
    /// The ingress of a backend's `ssh_ingress_cidrs`.
    pub fn of(configured: Option<&[String]>) -> SshIngress {
        let Some(list) = configured else {
            return SshIngress {
                cidrs: vec!["0.0.0.0/0".to_string()],
                suffix: None,
            };
        };
        let mut cidrs = list.to_vec();
        cidrs.sort();
        cidrs.dedup();
        // FNV-1a: stable across builds and platforms.
        let hash = cidrs
            .join(",")
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
        SshIngress {
            cidrs,
            suffix: Some(format!("{:08x}", hash as u32)),
        }
    }
}

/// Why a CIDR block is not one (`None`: it is).
fn cidr_error(cidr: &str) -> Option<String> {
    let Some((addr, prefix)) = cidr.split_once('/') else {
        return Some(format!("`{cidr}` is not a CIDR block (address/prefix)"));
    };
    let max = match addr.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => 32,
        Ok(std::net::IpAddr::V6(_)) => 128,
        Err(_) => return Some(format!("`{addr}` in `{cidr}` is not an IP address")),
    };
    match prefix.parse::<u8>() {
        Ok(p) if p <= max => None,
        _ => Some(format!("`{cidr}`: the prefix must be 0..={max}")),
    }
}

/// The backend's settings that cannot work together, as `(field, why)`.
fn refused(backend: &BackendConfig) -> Option<(&'static str, String)> {
    let cidrs = match backend {
        BackendConfig::Aws(aws) => {
            if aws.vpc_name.is_some() && aws.vpc_ids.is_some() {
                return Some((
                    "vpc_ids",
                    "only one of vpc_name and vpc_ids may be set".to_string(),
                ));
            }
            if aws.default_vpcs == Some(false) && aws.vpc_name.is_none() && aws.vpc_ids.is_none() {
                return Some((
                    "default_vpcs",
                    "false needs vpc_name or vpc_ids: no VPC could be used".to_string(),
                ));
            }
            &aws.ssh_ingress_cidrs
        }
        BackendConfig::Gcp(gcp) => &gcp.ssh_ingress_cidrs,
    };
    match cidrs.as_deref() {
        Some([]) => Some((
            "ssh_ingress_cidrs",
            "empty: instances could not be reached; leave it out for 0.0.0.0/0".to_string(),
        )),
        Some(list) => list
            .iter()
            .find_map(|c| cidr_error(c))
            .map(|why| ("ssh_ingress_cidrs", why)),
        None => None,
    }
}

/// dstack's backend settings that dstack-rs does not implement (refused by name, rather
/// than as unknown fields).
fn unsupported_fields(kind: &str) -> &'static [&'static str] {
    match kind {
        "gcp" => &[
            "extra_vpcs",
            "roce_vpcs",
            "vpc_project_id",
            "nat_check",
            "preview_features",
        ],
        _ => &[],
    }
}

/// One configured backend.
#[derive(Clone, Debug, PartialEq)]
pub enum BackendConfig {
    /// AWS EC2.
    Aws(AwsConfig),
    /// GCP Compute Engine.
    Gcp(GcpConfig),
}

/// The backends of the first project of a server config.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServerConfig {
    /// The project's name.
    pub project: String,
    /// Its backends, in file order.
    pub backends: Vec<BackendConfig>,
    /// Where artifacts are kept (`artifacts:`; default: `server/artifacts/` of the home).
    pub artifacts: Option<dstack_core::artifacts::StorageConfig>,
}

/// A config file that cannot be used: `file:line:col: path: what is wrong`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Reads the server configuration of `home` (`server/config.yml`, where one left in
/// `config.yml` by an earlier version is moved first); an absent file is an empty config.
pub fn load(home: &Path) -> Result<ServerConfig, ConfigError> {
    dstack_core::client::home::move_legacy_state(home)
        .map_err(|e| ConfigError(format!("{}: {e}", home.display())))?;
    let path = dstack_core::client::home::server_config_file(home);
    match std::fs::read_to_string(&path) {
        Ok(text) => parse(&text, &path.display().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ServerConfig::default()),
        Err(e) => Err(ConfigError(format!("{}: {e}", path.display()))),
    }
}

/// Parses a server config; `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<ServerConfig, ConfigError> {
    let root = yaml::load(text).map_err(|e| {
        ConfigError(format!(
            "{file}:{}:{}: {}",
            e.mark.line, e.mark.col, e.message
        ))
    })?;
    let at = |node: &Node, path: &str, message: &str| {
        ConfigError(format!(
            "{file}:{}:{}: {path}: {message}",
            node.mark.line, node.mark.col
        ))
    };
    if root.is_null() {
        return Ok(ServerConfig::default());
    }
    let artifacts = match root.get("artifacts") {
        None => None,
        Some(node) => Some(serde_json::from_value(to_json(node)).map_err(|e| {
            at(
                node,
                "artifacts",
                &format!("{e} (expected `type: local` with `path`, or `type: s3` with `bucket`, `region`, `endpoint_url`, `prefix`)"),
            )
        })?),
    };
    let Some(projects) = root.get("projects") else {
        return Err(at(
            &root,
            "projects",
            "missing; expected a list of projects",
        ));
    };
    let NodeKind::Seq(projects) = &projects.kind else {
        return Err(at(projects, "projects", "expected a list of projects"));
    };
    let Some(project) = projects.first() else {
        return Ok(ServerConfig {
            artifacts,
            ..ServerConfig::default()
        });
    };
    let name = match project.get("name").map(|n| &n.kind) {
        Some(NodeKind::Str(s)) => s.clone(),
        _ => {
            return Err(at(
                project,
                "projects[0].name",
                "expected the project's name",
            ))
        }
    };
    let mut config = ServerConfig {
        project: name,
        backends: Vec::new(),
        artifacts,
    };
    let backends = match project.get("backends") {
        None => return Ok(config),
        Some(Node {
            kind: NodeKind::Seq(items),
            ..
        }) => items,
        Some(other) => return Err(at(other, "projects[0].backends", "expected a list")),
    };
    for (i, node) in backends.iter().enumerate() {
        let path = format!("projects[0].backends[{i}]");
        let json = to_json(node);
        let kind = json.get("type").and_then(|t| t.as_str()).unwrap_or("");
        let mut body = json.clone();
        if let Some(map) = body.as_object_mut() {
            map.remove("type");
            if let Some(field) = unsupported_fields(kind)
                .iter()
                .find(|f| map.contains_key(**f))
            {
                return Err(at(
                    node.get(field).unwrap_or(node),
                    &format!("{path}.{field}"),
                    &format!("not supported by dstack-rs yet (the {kind} backend)"),
                ));
            }
        }
        let backend = match kind {
            "aws" => serde_json::from_value(body).map(BackendConfig::Aws),
            "gcp" => serde_json::from_value(body).map(BackendConfig::Gcp),
            "" => return Err(at(node, &path, "missing `type` (aws or gcp)")),
            other => {
                return Err(at(
                    node,
                    &format!("{path}.type"),
                    &format!(
                    "backend type `{other}` is not supported by dstack-rs yet; expected aws or gcp"
                ),
                ))
            }
        };
        let backend = backend.map_err(|e| at(node, &path, &e.to_string()))?;
        if let Some((field, why)) = refused(&backend) {
            return Err(at(
                node.get(field).unwrap_or(node),
                &format!("{path}.{field}"),
                &why,
            ));
        }
        config.backends.push(backend);
    }
    Ok(config)
}

fn to_json(node: &Node) -> serde_json::Value {
    use serde_json::Value;
    match &node.kind {
        NodeKind::Null => Value::Null,
        NodeKind::Bool(b) => Value::Bool(*b),
        NodeKind::Int(i) => Value::from(*i),
        NodeKind::Float(f) => Value::from(*f),
        NodeKind::Str(s) => Value::String(s.clone()),
        NodeKind::Seq(items) => Value::Array(items.iter().map(to_json).collect()),
        NodeKind::Map(entries) => Value::Object(
            entries
                .iter()
                .map(|(k, v)| (k.as_key().unwrap_or_default().to_string(), to_json(v)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_dstack_server_configs() {
        let text = "projects:\n- name: main\n  backends:\n  - type: aws\n    creds:\n      type: access_key\n      access_key: AK\n      secret_key: SK\n    regions: [us-east-1]\n  - type: gcp\n    project_id: p\n    creds: {type: default}\n";
        let config = parse(text, "config.yml").unwrap();
        assert_eq!(config.project, "main");
        let BackendConfig::Aws(aws) = &config.backends[0] else {
            panic!()
        };
        assert_eq!(aws.regions.as_deref(), Some(&["us-east-1".to_string()][..]));
        assert_eq!(
            aws.creds,
            Some(AwsCreds::AccessKey {
                access_key: "AK".into(),
                secret_key: "SK".into()
            })
        );
        assert!(matches!(&config.backends[1], BackendConfig::Gcp(g) if g.project_id == "p"));
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../../examples/config.example.yml");
        let config = parse(text, "config.example.yml").unwrap();
        assert_eq!(config.backends.len(), 2);
    }

    #[test]
    fn errors_name_the_line_and_field() {
        let err = parse(
            "projects:\n- name: main\n  backends:\n  - type: aws\n    regoins: [x]\n",
            "config.yml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("config.yml:4:5: projects[0].backends[0]: unknown field `regoins`"),
            "{err}"
        );
        let err = parse(
            "projects:\n- name: main\n  backends:\n  - type: azure\n",
            "c.yml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("backends[0].type: backend type `azure` is not supported"),
            "{err}"
        );
    }

    #[test]
    fn network_settings_that_cannot_work_are_refused_by_name() {
        let refused = |body: &str| {
            parse(
                &format!("projects:\n- name: main\n  backends:\n  - {body}\n"),
                "config.yml",
            )
            .unwrap_err()
            .to_string()
        };
        let err = refused("type: aws\n    vpc_name: a\n    vpc_ids: {us-east-1: vpc-1}");
        assert!(
            err.contains("backends[0].vpc_ids: only one of vpc_name and vpc_ids"),
            "{err}"
        );
        let err = refused("type: aws\n    default_vpcs: false");
        assert!(
            err.contains("backends[0].default_vpcs: false needs"),
            "{err}"
        );
        let err = refused("type: aws\n    ssh_ingress_cidrs: [10.0.0.0/33]");
        assert!(
            err.contains("backends[0].ssh_ingress_cidrs: `10.0.0.0/33`"),
            "{err}"
        );
        let err = refused("type: gcp\n    project_id: p\n    ssh_ingress_cidrs: []");
        assert!(err.contains("ssh_ingress_cidrs: empty"), "{err}");
        let err = refused("type: gcp\n    project_id: p\n    extra_vpcs: [a]");
        assert!(
            err.contains("config.yml:6:17: projects[0].backends[0].extra_vpcs: not supported by dstack-rs yet"),
            "{err}"
        );
        let ok = parse(
            "projects:\n- name: main\n  backends:\n  - type: aws\n    default_vpcs: false\n    vpc_ids: {us-east-1: vpc-1}\n    public_ips: false\n    ssh_ingress_cidrs: [10.0.0.0/8, 'fd00::/8']\n",
            "config.yml",
        )
        .unwrap();
        let BackendConfig::Aws(aws) = &ok.backends[0] else {
            panic!()
        };
        let ingress = SshIngress::of(aws.ssh_ingress_cidrs.as_deref());
        assert_eq!(ingress.cidrs, ["10.0.0.0/8", "fd00::/8"]);
        assert_eq!(ingress.suffix.as_ref().map(String::len), Some(8));
        assert_eq!(SshIngress::of(None).suffix, None);
    }
}
