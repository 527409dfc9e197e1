//! Fields shared by every run configuration (`dev-environment`, `task`, `service`), and the
//! `dev-environment` and `task` types themselves.

use serde::Serialize;

use super::de::{int_between, int_within, string_enum, Cx, Decode, Fields, Path};
use super::duration::{decode_inactivity, Duration};
use super::env::Env;
use super::error::ErrorCode;
use super::limits;
use super::mounts::MountPoint;
use super::ports::{decode_ports, PortMapping};
use super::profile::{ProfileParams, ProfileScope};
use super::refs::{decode_python, decode_user, PythonVersion};
use super::resources::ResourcesSpec;
use super::sources::{FilePathMapping, RepoSpec};
use super::yaml::{Mark, Node};

/// Credentials for a private image registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RegistryAuth {
    /// The user name (may use `${{ env.X }}` / `${{ secrets.X }}`).
    pub username: String,
    /// The password or token.
    pub password: String,
}

impl Decode for RegistryAuth {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let mut f = Fields::new(node, cx, path, "registry auth")?;
        let username = f.req(cx, path, "username");
        let password = f.req(cx, path, "password");
        f.finish(cx, path);
        Some(RegistryAuth {
            username: username?,
            password: password?,
        })
    }
}

/// The fields every run configuration has, plus its profile parameters.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunCommon {
    /// The run name (generated when omitted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The container image (the dstack base image when omitted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// `user[:group]` to run as.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Run the container privileged.
    pub privileged: bool,
    /// Overrides the image entrypoint (shell-split).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<String>,
    /// The working directory (absolute).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Deprecated; kept for compatibility.
    pub home_dir: String,
    /// Private registry credentials.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry_auth: Option<RegistryAuth>,
    /// Python version of the default image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub python: Option<PythonVersion>,
    /// Use the default image's CUDA devel variant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nvcc: Option<bool>,
    /// Clone only the current branch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub single_branch: Option<bool>,
    /// Environment variables.
    pub env: Env,
    /// The shell that runs `commands`: `sh`, `bash` or an absolute path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    /// Resource requirements.
    pub resources: ResourcesSpec,
    /// Provisioning priority, 0..100.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    /// Volume mounts.
    pub volumes: Vec<MountPoint>,
    /// Docker-in-Docker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker: Option<bool>,
    /// Repositories to check out (at most one).
    pub repos: Vec<RepoSpec>,
    /// Files to upload.
    pub files: Vec<FilePathMapping>,
    /// Expose the dstack API inside the run.
    pub dstack: bool,
    /// Deprecated setup commands.
    pub setup: Vec<String>,
    /// Profile parameters.
    #[serde(flatten)]
    pub profile: ProfileParams,
}

/// The mark of `key`'s value in a mapping, or of the mapping itself.
pub fn mark_of(node: &Node, key: &str) -> Mark {
    node.get(key).map_or(node.mark, |n| n.mark)
}

fn decode_shell(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<String> {
    let s = String::decode(node, cx, path)?;
    match s.as_str() {
        "sh" | "bash" => Some(s),
        p if p.starts_with('/') => Some(s),
        _ => {
            cx.invalid(
                node,
                path,
                format!("invalid shell '{s}'; expected sh, bash or an absolute path"),
            );
            None
        }
    }
}

impl RunCommon {
    /// Whether the run's jobs run in a container (`image:`, or `docker: true`) rather than
    /// as host processes.
    pub fn in_container(&self) -> bool {
        self.image.is_some() || self.docker == Some(true)
    }

    /// Reads the common fields; `None` only when a required value could not be decoded.
    pub fn read(node: &Node, f: &mut Fields<'_>, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let name = f.opt(cx, path, "name");
        let image = f.opt(cx, path, "image");
        let user = f.opt_with(cx, path, "user", decode_user);
        let privileged = f.or(cx, path, "privileged", || false);
        let entrypoint = f.opt(cx, path, "entrypoint");
        let working_dir = f.opt(cx, path, "working_dir");
        let home_dir = f.or(cx, path, "home_dir", || "/root".to_string());
        let registry_auth = f.opt(cx, path, "registry_auth");
        let python = f.opt_with(cx, path, "python", decode_python);
        let nvcc = f.opt(cx, path, "nvcc");
        let single_branch = f.opt(cx, path, "single_branch");
        let env = f.or(cx, path, "env", Env::default);
        let shell = f.opt_with(cx, path, "shell", decode_shell);
        let resources = f.or(cx, path, "resources", ResourcesSpec::default);
        let priority = f.opt_with(cx, path, "priority", |n, cx, p| {
            int_between(n, cx, p, 0, 100)
        });
        let volumes = f.or(cx, path, "volumes", Vec::new);
        let docker = f.opt(cx, path, "docker");
        let repos = f.or(cx, path, "repos", Vec::new);
        let files = f.or(cx, path, "files", Vec::new);
        let dstack = f.or(cx, path, "dstack", || false);
        let setup = f.or(cx, path, "setup", Vec::new);
        let profile = ProfileParams::read(f, cx, path, ProfileScope::Run);
        let common = RunCommon {
            name,
            image,
            user,
            privileged: privileged?,
            entrypoint,
            working_dir,
            home_dir: home_dir?,
            registry_auth,
            python,
            nvcc,
            single_branch,
            env: env?,
            shell,
            resources: resources?,
            priority,
            volumes: volumes?,
            docker,
            repos: repos?,
            files: files?,
            dstack: dstack?,
            setup: setup?,
            profile,
        };
        common.check(node, cx, path);
        Some(common)
    }

    /// Cross-field rules of the image source and repos.
    fn check(&self, node: &Node, cx: &mut Cx, path: &Path<'_>) {
        let conflicts = [
            (
                "python",
                self.python.is_some(),
                "image",
                self.image.is_some(),
            ),
            ("nvcc", self.nvcc.is_some(), "image", self.image.is_some()),
            (
                "docker",
                self.docker.is_some(),
                "image",
                self.image.is_some(),
            ),
            (
                "docker",
                self.docker.is_some(),
                "python",
                self.python.is_some(),
            ),
            ("docker", self.docker.is_some(), "nvcc", self.nvcc.is_some()),
        ];
        for (a, has_a, b, has_b) in conflicts {
            if has_a && has_b {
                let message = format!("`{a}` and `{b}` are mutually exclusive");
                cx.error(mark_of(node, a), &path.key(a), ErrorCode::Conflict, message);
            }
        }
        if self.repos.len() > 1 {
            let message = format!("at most one repo is supported, got {}", self.repos.len());
            cx.invalid(
                node.get("repos").unwrap_or(node),
                &path.key("repos"),
                message,
            );
        }
    }
}

/// Reads `commands:` (a list of strings).
pub fn read_commands(f: &mut Fields<'_>, cx: &mut Cx, path: &Path<'_>) -> Option<Vec<String>> {
    f.or(cx, path, "commands", Vec::new)
}

/// Reads `ports:`.
pub fn read_ports(f: &mut Fields<'_>, cx: &mut Cx, path: &Path<'_>) -> Option<Vec<PortMapping>> {
    f.or_with(cx, path, "ports", Vec::new, decode_ports)
}

string_enum! {
    /// The IDE of a dev environment.
    Ide { VsCode = "vscode", Cursor = "cursor", Windsurf = "windsurf", Zed = "zed" }
}

/// `type: dev-environment` — an interactive machine with an IDE attached.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DevEnvironmentConfiguration {
    /// Common run fields.
    #[serde(flatten)]
    pub common: RunCommon,
    /// Ports to forward.
    pub ports: Vec<PortMapping>,
    /// The IDE (SSH only when omitted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ide: Option<Ide>,
    /// The IDE version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Commands run at start.
    pub init: Vec<String>,
    /// Stop after this long without an attached client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inactivity_duration: Option<Duration>,
}

impl DevEnvironmentConfiguration {
    /// Decodes a dev environment from the document's fields.
    pub fn read(node: &Node, f: &mut Fields<'_>, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let common = RunCommon::read(node, f, cx, path);
        let ports = read_ports(f, cx, path);
        let ide: Option<Ide> = f.opt(cx, path, "ide");
        let version: Option<String> = f.opt(cx, path, "version");
        let init = f.or(cx, path, "init", Vec::new);
        let inactivity_duration = f.opt_with(cx, path, "inactivity_duration", decode_inactivity);
        let common = common?;
        if common.entrypoint.is_some() {
            let message = "`entrypoint` is not supported for dev environments";
            cx.error(
                mark_of(node, "entrypoint"),
                &path.key("entrypoint"),
                ErrorCode::Conflict,
                message,
            );
        }
        if let Some(v) = &version {
            match ide {
                None => {
                    let message = "`version` requires `ide`";
                    cx.error(
                        mark_of(node, "version"),
                        &path.key("version"),
                        ErrorCode::Conflict,
                        message,
                    );
                }
                Some(Ide::Windsurf) if !is_windsurf_version(v) => {
                    let message =
                        format!("invalid windsurf version '{v}'; expected VERSION@COMMIT_HASH");
                    cx.invalid(
                        node.get("version").unwrap_or(node),
                        &path.key("version"),
                        message,
                    );
                }
                _ => {}
            }
        }
        if common.dstack && inactivity_duration.is_some() {
            let message = "`dstack: true` cannot be combined with `inactivity_duration`";
            cx.error(
                mark_of(node, "dstack"),
                &path.key("dstack"),
                ErrorCode::Conflict,
                message,
            );
        }
        Some(DevEnvironmentConfiguration {
            common,
            ports: ports?,
            ide,
            version,
            init: init?,
            inactivity_duration,
        })
    }
}

fn is_windsurf_version(v: &str) -> bool {
    v.split_once('@').is_some_and(|(ver, hash)| {
        !ver.is_empty() && !hash.is_empty() && hash.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

/// A group of identical nodes in a heterogeneous multi-node task.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeGroup {
    /// The group name (`"0"`, `"1"`, … by position when omitted).
    pub name: String,
    /// How many nodes.
    pub nodes: i64,
    /// Per-node resources (not inherited from the task).
    pub resources: ResourcesSpec,
    /// Commands of this group.
    pub commands: Vec<String>,
    /// Ports of this group.
    pub ports: Vec<PortMapping>,
}

impl Decode for NodeGroup {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let mut f = Fields::new(node, cx, path, "node group")?;
        let name = f.opt_with(cx, path, "name", decode_group_name);
        let nodes = f.or_with(
            cx,
            path,
            "nodes",
            || 1,
            |n, cx, p| int_within(n, cx, p, 1, limits::MAX_NODE_COUNT),
        );
        let resources = f.or(cx, path, "resources", ResourcesSpec::default);
        let commands = read_commands(&mut f, cx, path);
        let ports = read_ports(&mut f, cx, path);
        f.finish(cx, path);
        Some(NodeGroup {
            name: name.unwrap_or_default(),
            nodes: nodes?,
            resources: resources?,
            commands: commands?,
            ports: ports?,
        })
    }
}

/// Decodes a node/replica group name: `[a-z0-9][a-z0-9-]{0,39}`.
pub fn decode_group_name(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<String> {
    let name = String::decode(node, cx, path)?;
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 40
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
    if !ok {
        let message = format!(
            "invalid group name '{name}'; use 1-40 characters of a-z, 0-9 and -, starting with a letter or digit"
        );
        cx.invalid(node, path, message);
        return None;
    }
    Some(name)
}

/// Names unnamed groups by position and checks that names are unique.
pub fn name_groups<'a>(
    names: impl Iterator<Item = (&'a mut String, &'a Node)>,
    cx: &mut Cx,
    path: &Path<'_>,
) {
    let mut seen: Vec<String> = Vec::new();
    for (i, (name, node)) in names.enumerate() {
        if name.is_empty() {
            *name = i.to_string();
        }
        if seen.contains(name) {
            let message = format!("duplicate group name '{name}'");
            let p = path.index(i);
            cx.error(node.mark, &p.key("name"), ErrorCode::Conflict, message);
        }
        seen.push(name.clone());
    }
}

/// `type: task` — a batch job, single- or multi-node.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TaskConfiguration {
    /// Common run fields.
    #[serde(flatten)]
    pub common: RunCommon,
    /// Commands to run.
    pub commands: Vec<String>,
    /// Ports to forward.
    pub ports: Vec<PortMapping>,
    /// Number of nodes (1 when omitted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes: Option<i64>,
    /// Heterogeneous node groups.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<NodeGroup>>,
}

impl TaskConfiguration {
    /// Decodes a task from the document's fields.
    pub fn read(node: &Node, f: &mut Fields<'_>, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let common = RunCommon::read(node, f, cx, path);
        let commands = read_commands(f, cx, path);
        let ports = read_ports(f, cx, path);
        let nodes = f.opt_with(cx, path, "nodes", |n, cx, p| {
            int_within(n, cx, p, 1, limits::MAX_NODE_COUNT)
        });
        let mut groups: Option<Vec<NodeGroup>> = f.opt(cx, path, "groups");
        let (common, commands, ports) = (common?, commands?, ports?);
        if let (Some(groups), Some(group_nodes)) = (&mut groups, node.get("groups")) {
            check_task_groups(
                node,
                groups,
                group_nodes,
                &common,
                &commands,
                &ports,
                nodes,
                cx,
                path,
            );
        } else if commands.is_empty() && common.image.is_none() {
            let message = "either `commands` or `image` must be set";
            cx.error(node.mark, path, ErrorCode::MissingField, message);
        }
        Some(TaskConfiguration {
            common,
            commands,
            ports,
            nodes,
            groups,
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn check_task_groups(
    node: &Node,
    groups: &mut [NodeGroup],
    group_nodes: &Node,
    common: &RunCommon,
    commands: &[String],
    ports: &[PortMapping],
    nodes: Option<i64>,
    cx: &mut Cx,
    path: &Path<'_>,
) {
    let gpath = path.key("groups");
    if groups.is_empty() {
        cx.invalid(group_nodes, &gpath, "`groups` must list at least one group");
        return;
    }
    for (key, set) in [
        ("nodes", nodes.is_some()),
        ("commands", !commands.is_empty()),
        ("ports", !ports.is_empty()),
        ("entrypoint", common.entrypoint.is_some()),
    ] {
        if set {
            let message = format!("`{key}` cannot be set at the top level together with `groups`");
            cx.error(
                mark_of(node, key),
                &path.key(key),
                ErrorCode::Conflict,
                message,
            );
        }
    }
    let total = groups
        .iter()
        .try_fold(0i64, |sum, g| sum.checked_add(g.nodes));
    if total.is_none_or(|t| t > limits::MAX_NODE_COUNT) {
        let message = format!(
            "the groups hold more than {} nodes in all (the limit)",
            limits::MAX_NODE_COUNT
        );
        cx.error(group_nodes.mark, &gpath, ErrorCode::Limit, message);
    }
    let items: Vec<&Node> = match &group_nodes.kind {
        super::yaml::NodeKind::Seq(items) => items.iter().collect(),
        _ => return,
    };
    for (i, g) in groups.iter().enumerate() {
        if g.commands.is_empty() && common.image.is_none() {
            let message = "the group needs `commands` (or an `image` on the task)";
            cx.error(
                items[i].mark,
                &gpath.index(i),
                ErrorCode::MissingField,
                message,
            );
        }
    }
    name_groups(
        groups.iter_mut().map(|g| &mut g.name).zip(items),
        cx,
        &gpath,
    );
}
