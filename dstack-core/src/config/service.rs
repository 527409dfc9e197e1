//! `type: service` — a long-running HTTP endpoint with replicas, autoscaling, probes and an
//! optional OpenAI-compatible model mapping.

use serde::Serialize;

use super::de::{int_between, string_enum, Cx, Decode, Fields, Path};
use super::duration::Duration;
use super::error::ErrorCode;
use super::limits;
use super::ports::{decode_port, PortMapping};
use super::profile::SpotPolicy;
use super::range::{decode_range, Range};
use super::refs::{decode_python, EntityReference, PythonVersion};
use super::resources::ResourcesSpec;
use super::run::{decode_group_name, mark_of, name_groups, read_commands, RunCommon};
use super::yaml::{Node, NodeKind};

/// `scaling:` — RPS-based autoscaling.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScalingSpec {
    /// Always `rps`.
    pub metric: &'static str,
    /// Target requests per second per replica.
    pub target: f64,
    /// Averaging window (30s, 60s or 300s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<Duration>,
    /// Delay before scaling up.
    pub scale_up_delay: Duration,
    /// Delay before scaling down.
    pub scale_down_delay: Duration,
}

impl Decode for ScalingSpec {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let mut f = Fields::new(node, cx, path, "scaling")?;
        let metric = f.req_with(cx, path, "metric", |n, cx, p| {
            let s = String::decode(n, cx, p)?;
            if s != "rps" {
                cx.invalid(n, p, format!("invalid metric '{s}'; expected rps"));
                return None;
            }
            Some("rps")
        });
        let target = f.req_with(cx, path, "target", |n, cx, p| {
            let v = f64::decode(n, cx, p)?;
            if v <= 0.0 {
                cx.error(
                    n.mark,
                    p,
                    ErrorCode::OutOfRange,
                    format!("must be greater than 0, got {v}"),
                );
                return None;
            }
            Some(v)
        });
        let window = f.opt_with(cx, path, "window", |n, cx, p| {
            let d = Duration::decode(n, cx, p)?;
            if ![30, 60, 300].contains(&d.0) {
                cx.invalid(
                    n,
                    p,
                    format!("invalid window {}s; expected 30s, 1m or 5m", d.0),
                );
                return None;
            }
            Some(d)
        });
        let up = f.or(cx, path, "scale_up_delay", || Duration(300));
        let down = f.or(cx, path, "scale_down_delay", || Duration(600));
        f.finish(cx, path);
        Some(ScalingSpec {
            metric: metric?,
            target: target?,
            window,
            scale_up_delay: up?,
            scale_down_delay: down?,
        })
    }
}

/// `model:` — the chat model a service serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "format", rename_all = "lowercase")]
pub enum ModelSpec {
    /// An OpenAI-compatible API under `prefix`.
    #[serde(rename = "openai")]
    OpenAi {
        /// Always `chat`.
        #[serde(rename = "type")]
        kind: &'static str,
        /// The model name.
        name: String,
        /// The API prefix (default `/v1`).
        prefix: String,
    },
    /// A TGI endpoint mapped to the OpenAI API.
    Tgi {
        /// Always `chat`.
        #[serde(rename = "type")]
        kind: &'static str,
        /// The model name.
        name: String,
        /// A chat template override.
        #[serde(skip_serializing_if = "Option::is_none")]
        chat_template: Option<String>,
        /// An EOS token override.
        #[serde(skip_serializing_if = "Option::is_none")]
        eos_token: Option<String>,
    },
}

impl Decode for ModelSpec {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        if !matches!(node.kind, NodeKind::Map(_)) {
            let name = String::decode(node, cx, path)?;
            return Some(ModelSpec::OpenAi {
                kind: "chat",
                name,
                prefix: "/v1".into(),
            });
        }
        let mut f = Fields::new(node, cx, path, "model")?;
        let kind = f.or_with(
            cx,
            path,
            "type",
            || "chat",
            |n, cx, p| {
                let s = String::decode(n, cx, p)?;
                if s != "chat" {
                    cx.invalid(n, p, format!("invalid model type '{s}'; expected chat"));
                    return None;
                }
                Some("chat")
            },
        );
        let format = f.req::<String>(cx, path, "format");
        let name = f.req::<String>(cx, path, "name");
        let model = match format.as_deref() {
            Some("openai") => {
                let prefix = f.or(cx, path, "prefix", || "/v1".to_string());
                Some(ModelSpec::OpenAi {
                    kind: kind?,
                    name: name?,
                    prefix: prefix?,
                })
            }
            Some("tgi") => {
                let chat_template = f.opt(cx, path, "chat_template");
                let eos_token = f.opt(cx, path, "eos_token");
                Some(ModelSpec::Tgi {
                    kind: kind?,
                    name: name?,
                    chat_template,
                    eos_token,
                })
            }
            Some(other) => {
                let message = format!("invalid model format '{other}'; expected openai or tgi");
                cx.invalid(
                    node.get("format").unwrap_or(node),
                    &path.key("format"),
                    message,
                );
                None
            }
            None => None,
        };
        f.finish(cx, path);
        model
    }
}

string_enum! {
    /// The HTTP method of a probe.
    ProbeMethod { Get = "get", Post = "post", Put = "put", Delete = "delete", Patch = "patch", Head = "head" }
}

/// An HTTP header of a probe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HttpHeader {
    /// Header name.
    pub name: String,
    /// Header value (may use `${{ env.X }}`).
    pub value: String,
}

fn bounded_string(node: &Node, cx: &mut Cx, path: &Path<'_>, max: usize) -> Option<String> {
    let s = String::decode(node, cx, path)?;
    if s.is_empty() || s.chars().count() > max {
        let message = format!("must be 1 to {max} characters long");
        cx.error(node.mark, path, ErrorCode::OutOfRange, message);
        return None;
    }
    Some(s)
}

impl Decode for HttpHeader {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let mut f = Fields::new(node, cx, path, "header")?;
        let name = f.req_with(cx, path, "name", |n, cx, p| bounded_string(n, cx, p, 256));
        let value = f.req_with(cx, path, "value", |n, cx, p| bounded_string(n, cx, p, 2048));
        f.finish(cx, path);
        Some(HttpHeader {
            name: name?,
            value: value?,
        })
    }
}

/// A readiness probe of a service replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProbeConfig {
    /// Always `http`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The URL path (default `/`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The method (default get).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<ProbeMethod>,
    /// Request headers.
    pub headers: Vec<HttpHeader>,
    /// Request body (not with get or head).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Request timeout (default 10s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Interval between probes (default 15s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    /// Successes needed to be ready (default 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready_after: Option<i64>,
    /// Stop probing once ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until_ready: Option<bool>,
}

fn duration_between(
    node: &Node,
    cx: &mut Cx,
    path: &Path<'_>,
    min: i64,
    max: i64,
) -> Option<Duration> {
    let d = Duration::decode(node, cx, path)?;
    if d.0 < min || d.0 > max {
        let message = format!("must be between {min}s and {max}s, got {}s", d.0);
        cx.error(node.mark, path, ErrorCode::OutOfRange, message);
        return None;
    }
    Some(d)
}

impl Decode for ProbeConfig {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let mut f = Fields::new(node, cx, path, "probe")?;
        let kind = f.req_with(cx, path, "type", |n, cx, p| {
            let s = String::decode(n, cx, p)?;
            if s != "http" {
                cx.invalid(n, p, format!("invalid probe type '{s}'; expected http"));
                return None;
            }
            Some("http")
        });
        let url = f.opt_with(cx, path, "url", |n, cx, p| {
            let s = String::decode(n, cx, p)?;
            if !s.starts_with('/') || s.len() > 2048 || s.chars().any(|c| c.is_control()) {
                cx.invalid(
                    n,
                    p,
                    format!("invalid probe url '{s}'; expected a path starting with /"),
                );
                return None;
            }
            Some(s)
        });
        let method: Option<ProbeMethod> = f.opt(cx, path, "method");
        let headers = f.or_with(cx, path, "headers", Vec::new, |n, cx, p| {
            let list = Vec::<HttpHeader>::decode(n, cx, p)?;
            if list.len() > 16 {
                cx.error(
                    n.mark,
                    p,
                    ErrorCode::OutOfRange,
                    "at most 16 headers are allowed",
                );
                return None;
            }
            Some(list)
        });
        let body = f.opt_with(cx, path, "body", |n, cx, p| bounded_string(n, cx, p, 2048));
        let timeout = f.opt_with(cx, path, "timeout", |n, cx, p| {
            duration_between(n, cx, p, 1, 300)
        });
        let interval = f.opt_with(cx, path, "interval", |n, cx, p| {
            duration_between(n, cx, p, 1, i64::MAX)
        });
        let ready_after = f.opt_with(cx, path, "ready_after", |n, cx, p| {
            int_between(n, cx, p, 1, i64::MAX)
        });
        let until_ready = f.opt(cx, path, "until_ready");
        f.finish(cx, path);
        if body.is_some() && matches!(method, None | Some(ProbeMethod::Get | ProbeMethod::Head)) {
            let message =
                "a probe `body` needs a method that sends one (post, put, delete or patch)";
            cx.error(
                mark_of(node, "body"),
                &path.key("body"),
                ErrorCode::Conflict,
                message,
            );
        }
        Some(ProbeConfig {
            kind: kind?,
            url,
            method,
            headers: headers?,
            body,
            timeout,
            interval,
            ready_after,
            until_ready,
        })
    }
}

/// How requests are grouped for rate limiting.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RateLimitKey {
    /// By client IP address.
    IpAddress,
    /// By the value of a request header.
    Header {
        /// The header name.
        header: String,
    },
}

impl Decode for RateLimitKey {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let mut f = Fields::new(node, cx, path, "rate limit key")?;
        let kind = f.req::<String>(cx, path, "type");
        let key = match kind.as_deref() {
            Some("ip_address") => Some(RateLimitKey::IpAddress),
            Some("header") => f
                .req_with(cx, path, "header", |n, cx, p| {
                    let h = String::decode(n, cx, p)?;
                    let ok = !h.is_empty()
                        && h.len() <= 500
                        && h.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                    if !ok {
                        cx.invalid(n, p, format!("invalid header name '{h}'"));
                        return None;
                    }
                    Some(h)
                })
                .map(|header| RateLimitKey::Header { header }),
            Some(other) => {
                let message = format!("invalid key type '{other}'; expected ip_address or header");
                cx.invalid(node.get("type").unwrap_or(node), &path.key("type"), message);
                None
            }
            None => None,
        };
        f.finish(cx, path);
        key
    }
}

/// A gateway rate limit.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RateLimit {
    /// The URL prefix it applies to (longest prefix wins).
    pub prefix: String,
    /// How requests are grouped.
    pub key: RateLimitKey,
    /// Requests per second (at least 1/60).
    pub rps: f64,
    /// Burst size.
    pub burst: i64,
}

impl Decode for RateLimit {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let mut f = Fields::new(node, cx, path, "rate limit")?;
        let prefix = f.or_with(
            cx,
            path,
            "prefix",
            || "/".to_string(),
            |n, cx, p| {
                let s = String::decode(n, cx, p)?;
                let ok = s.starts_with('/')
                    && s.len() <= 4094
                    && !s
                        .chars()
                        .any(|c| c.is_whitespace() || c == '\\' || c == '{' || c == '}');
                if !ok {
                    cx.invalid(
                        n,
                        p,
                        format!("invalid prefix '{s}'; expected a URL path starting with /"),
                    );
                    return None;
                }
                Some(s)
            },
        );
        let key = f.or(cx, path, "key", || RateLimitKey::IpAddress);
        let rps = f.req_with(cx, path, "rps", |n, cx, p| {
            let v = f64::decode(n, cx, p)?;
            if v < 1.0 / 60.0 {
                cx.error(
                    n.mark,
                    p,
                    ErrorCode::OutOfRange,
                    format!("must be at least 1/60, got {v}"),
                );
                return None;
            }
            Some(v)
        });
        let burst = f.or_with(
            cx,
            path,
            "burst",
            || 0,
            |n, cx, p| int_between(n, cx, p, 0, i64::MAX),
        );
        f.finish(cx, path);
        Some(RateLimit {
            prefix: prefix?,
            key: key?,
            rps: rps?,
            burst: burst?,
        })
    }
}

string_enum! {
    /// A router in front of a replica group.
    RouterType { Smg = "smg", Sglang = "sglang", Dynamo = "dynamo" }
}

/// A router configuration of a replica group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouterConfig {
    /// The router kind.
    #[serde(rename = "type")]
    pub kind: RouterType,
}

impl Decode for RouterConfig {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let mut f = Fields::new(node, cx, path, "router")?;
        let kind = f.or(cx, path, "type", || RouterType::Smg);
        f.finish(cx, path);
        Some(RouterConfig { kind: kind? })
    }
}

/// A group of identical replicas of a service.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReplicaGroup {
    /// The group name (`"0"`, `"1"`, … by position when omitted).
    pub name: String,
    /// How many replicas.
    pub replicas: Range<i64>,
    /// Autoscaling of this group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scaling: Option<ScalingSpec>,
    /// Per-replica resources.
    pub resources: ResourcesSpec,
    /// Spot policy of this group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spot_policy: Option<SpotPolicy>,
    /// Reservation of this group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reservation: Option<String>,
    /// Commands of this group.
    pub commands: Vec<String>,
    /// Image of this group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Python version of this group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub python: Option<PythonVersion>,
    /// CUDA devel image for this group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nvcc: Option<bool>,
    /// Docker-in-Docker for this group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker: Option<bool>,
    /// Privileged containers for this group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub privileged: Option<bool>,
    /// A router in front of this group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router: Option<RouterConfig>,
}

impl Decode for ReplicaGroup {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let mut f = Fields::new(node, cx, path, "replica group")?;
        let name = f.opt_with(cx, path, "name", decode_group_name);
        let key = if f.has("count") && !f.has("replicas") {
            "count"
        } else {
            "replicas"
        };
        let replicas = f.req_with(cx, path, key, decode_replicas);
        let scaling: Option<ScalingSpec> = f.opt(cx, path, "scaling");
        let resources = f.or(cx, path, "resources", ResourcesSpec::default);
        let spot_policy = f.opt(cx, path, "spot_policy");
        let reservation = f.opt(cx, path, "reservation");
        let commands = read_commands(&mut f, cx, path);
        let image = f.opt(cx, path, "image");
        let python = f.opt_with(cx, path, "python", decode_python);
        let nvcc = f.opt(cx, path, "nvcc");
        let docker = f.opt(cx, path, "docker");
        let privileged = f.opt(cx, path, "privileged");
        let router: Option<RouterConfig> = f.opt(cx, path, "router");
        f.finish(cx, path);
        let replicas = replicas?;
        check_replicas_scaling(node, &replicas, scaling.is_some(), cx, path, key);
        Some(ReplicaGroup {
            name: name.unwrap_or_default(),
            replicas,
            scaling,
            resources: resources?,
            spot_policy,
            reservation,
            commands: commands?,
            image,
            python,
            nvcc,
            docker,
            privileged,
            router,
        })
    }
}

/// Decodes a replica count: a range whose omitted minimum is 0 and whose maximum is required.
fn decode_replicas(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Range<i64>> {
    let mut r = decode_range::<i64>(node, cx, path)?;
    if r.max.is_none() {
        cx.invalid(
            node,
            path,
            format!("the maximum number of replicas must be set, got '{r}'"),
        );
        return None;
    }
    r.min = Some(r.min.unwrap_or(0));
    if let Err((code, message)) = r.check_limit(limits::MAX_NODE_COUNT) {
        cx.error(node.mark, path, code, message);
        return None;
    }
    Some(r)
}

fn check_replicas_scaling(
    node: &Node,
    replicas: &Range<i64>,
    has_scaling: bool,
    cx: &mut Cx,
    path: &Path<'_>,
    key: &'static str,
) {
    if replicas.min != replicas.max && !has_scaling {
        let message = "when `replicas` is a range, `scaling` must be set";
        cx.error(
            mark_of(node, key),
            &path.key(key),
            ErrorCode::MissingField,
            message,
        );
    }
}

/// `gateway:` of a service — `false` for the in-server proxy, `true` for the default gateway,
/// or a named gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum GatewayRef {
    /// Use (or not) the default gateway.
    Default(bool),
    /// A named gateway.
    Named(EntityReference),
}

impl Decode for GatewayRef {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        match node.kind {
            NodeKind::Bool(b) => Some(GatewayRef::Default(b)),
            _ => EntityReference::decode(node, cx, path).map(GatewayRef::Named),
        }
    }
}

/// `https:` of a service: a boolean or `auto`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Https {
    /// On or off.
    Enabled(bool),
    /// Let the gateway decide (`auto`).
    Auto(&'static str),
}

impl Decode for Https {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        match &node.kind {
            NodeKind::Str(s) if s == "auto" => Some(Https::Auto("auto")),
            _ => bool::decode(node, cx, path).map(Https::Enabled),
        }
    }
}

/// `type: service`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServiceConfiguration {
    /// Common run fields.
    #[serde(flatten)]
    pub common: RunCommon,
    /// Commands to run.
    pub commands: Vec<String>,
    /// The port the service listens on.
    pub port: PortMapping,
    /// Which gateway to publish through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayRef>,
    /// Strip the proxy prefix (in-server proxy only).
    pub strip_prefix: bool,
    /// The model served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelSpec>,
    /// HTTPS on the gateway.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub https: Option<Https>,
    /// Require a dstack token.
    pub auth: bool,
    /// Number of replicas.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<Range<i64>>,
    /// Autoscaling.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scaling: Option<ScalingSpec>,
    /// Gateway rate limits.
    pub rate_limits: Vec<RateLimit>,
    /// Readiness probes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probes: Option<Vec<ProbeConfig>>,
    /// Heterogeneous replica groups.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<ReplicaGroup>>,
}

impl ServiceConfiguration {
    /// Whether the service may scale down to no replica at all (`replicas: 0..N`, or replica
    /// groups whose minimums add up to zero).
    pub fn scales_to_zero(&self) -> bool {
        let min = |r: &Range<i64>| r.min.unwrap_or(0);
        match (&self.replicas, &self.groups) {
            (_, Some(groups)) => groups.iter().map(|g| min(&g.replicas)).sum::<i64>() == 0,
            (Some(replicas), None) => min(replicas) == 0,
            (None, None) => false,
        }
    }

    /// Decodes a service from the document's fields.
    pub fn read(node: &Node, f: &mut Fields<'_>, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let common = RunCommon::read(node, f, cx, path);
        let commands = read_commands(f, cx, path);
        let port = f.req_with(cx, path, "port", |n, cx, p| {
            decode_port(n, cx, p, false, Some(80))
        });
        let gateway = f.opt(cx, path, "gateway");
        let strip_prefix = f.or(cx, path, "strip_prefix", || true);
        let model = f.opt(cx, path, "model");
        let https = f.opt(cx, path, "https");
        let auth = f.or(cx, path, "auth", || true);
        let legacy_groups = node
            .get("replicas")
            .is_some_and(|n| matches!(n.kind, NodeKind::Seq(_)));
        let (replicas, legacy): (Option<Range<i64>>, Option<Vec<ReplicaGroup>>) = if legacy_groups {
            (None, f.opt(cx, path, "replicas"))
        } else {
            (f.opt_with(cx, path, "replicas", decode_replicas), None)
        };
        let scaling: Option<ScalingSpec> = f.opt(cx, path, "scaling");
        let rate_limits = f.or_with(cx, path, "rate_limits", Vec::new, decode_rate_limits);
        let probes = f.opt_with(cx, path, "probes", |n, cx, p| {
            let list = Vec::<ProbeConfig>::decode(n, cx, p)?;
            if list.len() > 10 {
                cx.error(
                    n.mark,
                    p,
                    ErrorCode::OutOfRange,
                    "at most 10 probes are allowed",
                );
                return None;
            }
            Some(list)
        });
        let explicit_groups: Option<Vec<ReplicaGroup>> = f.opt(cx, path, "groups");
        let (common, commands, port) = (common?, commands?, port?);
        if legacy.is_some() && f.has("groups") {
            let message = "`replicas` as a list and `groups` are mutually exclusive";
            cx.error(
                mark_of(node, "groups"),
                &path.key("groups"),
                ErrorCode::Conflict,
                message,
            );
        }
        let groups_key = if legacy.is_some() {
            "replicas"
        } else {
            "groups"
        };
        let mut groups = legacy.or(explicit_groups);
        if let Some(groups) = &mut groups {
            let ctx = ServiceGroupsCheck {
                node,
                common: &common,
                commands: &commands,
                groups_key,
            };
            ctx.check(groups, replicas.is_some(), scaling.is_some(), cx, path);
        } else {
            if commands.is_empty() && common.image.is_none() {
                let message = "either `commands` or `image` must be set";
                cx.error(node.mark, path, ErrorCode::MissingField, message);
            }
            if let Some(r) = &replicas {
                check_replicas_scaling(node, r, scaling.is_some(), cx, path, "replicas");
            }
        }
        Some(ServiceConfiguration {
            common,
            commands,
            port,
            gateway,
            strip_prefix: strip_prefix?,
            model,
            https,
            auth: auth?,
            replicas,
            scaling,
            rate_limits: rate_limits?,
            probes,
            groups,
        })
    }
}

fn decode_rate_limits(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Vec<RateLimit>> {
    let list = Vec::<RateLimit>::decode(node, cx, path)?;
    for (i, limit) in list.iter().enumerate() {
        if list[..i].iter().any(|l| l.prefix == limit.prefix) {
            let message = format!("duplicate rate limit prefix '{}'", limit.prefix);
            cx.error(
                node.mark,
                &path.index(i).key("prefix"),
                ErrorCode::Conflict,
                message,
            );
            return None;
        }
    }
    Some(list)
}

/// Cross-level rules of replica groups.
struct ServiceGroupsCheck<'a> {
    node: &'a Node,
    common: &'a RunCommon,
    commands: &'a [String],
    groups_key: &'static str,
}

impl ServiceGroupsCheck<'_> {
    fn check(
        &self,
        groups: &mut [ReplicaGroup],
        has_replicas: bool,
        has_scaling: bool,
        cx: &mut Cx,
        path: &Path<'_>,
    ) {
        let (node, common) = (self.node, self.common);
        let gpath = path.key(self.groups_key);
        let gnode = node.get(self.groups_key).unwrap_or(node);
        if groups.is_empty() {
            cx.invalid(gnode, &gpath, "must list at least one replica group");
            return;
        }
        for (key, set) in [
            ("replicas", has_replicas),
            ("scaling", has_scaling),
            ("commands", !self.commands.is_empty()),
        ] {
            if set {
                let message =
                    format!("`{key}` cannot be set at the top level together with replica groups");
                cx.error(
                    mark_of(node, key),
                    &path.key(key),
                    ErrorCode::Conflict,
                    message,
                );
            }
        }
        let items: Vec<&Node> = match &gnode.kind {
            NodeKind::Seq(items) => items.iter().collect(),
            _ => return,
        };
        let mut routers = 0;
        for (i, g) in groups.iter().enumerate() {
            let here = items[i];
            let gp = gpath.index(i);
            let service_level = [
                ("image", common.image.is_some(), g.image.is_some()),
                ("docker", common.docker.is_some(), g.docker.is_some()),
                (
                    "privileged",
                    node.get("privileged").is_some(),
                    g.privileged.is_some(),
                ),
                ("python", common.python.is_some(), g.python.is_some()),
                ("nvcc", common.nvcc.is_some(), g.nvcc.is_some()),
                (
                    "spot_policy",
                    common.profile.spot_policy.is_some(),
                    g.spot_policy.is_some(),
                ),
                (
                    "reservation",
                    common.profile.reservation.is_some(),
                    g.reservation.is_some(),
                ),
            ];
            for (key, at_service, in_group) in service_level {
                if at_service && in_group {
                    let message = format!("`{key}` is set both on the service and in the group");
                    cx.error(
                        mark_of(here, key),
                        &gp.key(key),
                        ErrorCode::Conflict,
                        message,
                    );
                }
            }
            let group_sources = [
                ("image", g.image.is_some()),
                ("python", g.python.is_some()),
                ("docker", g.docker.is_some()),
            ];
            let set: Vec<&str> = group_sources
                .iter()
                .filter(|(_, s)| *s)
                .map(|(k, _)| *k)
                .collect();
            if set.len() > 1 || (g.nvcc.is_some() && (g.image.is_some() || g.docker.is_some())) {
                let message = "`image`, `python`, `nvcc` and `docker` are mutually exclusive";
                cx.error(here.mark, &gp, ErrorCode::Conflict, message);
            }
            if g.commands.is_empty() && g.image.is_none() && common.image.is_none() {
                let message =
                    "the group needs `commands` or an `image` (on the group or the service)";
                cx.error(here.mark, &gp, ErrorCode::MissingField, message);
            }
            if g.router.is_some() {
                routers += 1;
                if g.replicas != Range::exact(1) {
                    let message = "a router group must have exactly 1 replica";
                    cx.error(
                        here.mark,
                        &gp.key("replicas"),
                        ErrorCode::InvalidValue,
                        message,
                    );
                }
            }
            let dynamo = g
                .router
                .as_ref()
                .is_some_and(|r| r.kind == RouterType::Dynamo);
            if dynamo && common.profile.retry.is_some() {
                let message = "services with a dynamo router cannot use `retry`";
                cx.error(
                    mark_of(node, "retry"),
                    &path.key("retry"),
                    ErrorCode::Conflict,
                    message,
                );
            }
        }
        if routers > 1 {
            cx.error(
                gnode.mark,
                &gpath,
                ErrorCode::Conflict,
                "at most one replica group may have a router",
            );
        }
        name_groups(
            groups.iter_mut().map(|g| &mut g.name).zip(items),
            cx,
            &gpath,
        );
    }
}
