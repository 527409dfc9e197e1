//! Profile parameters: where and how a run (or fleet) may be provisioned — `backends`,
//! `spot_policy`, `retry`, `max_duration`, `idle_duration`, `utilization_policy`, … — allowed at
//! the top level of every run configuration.

use serde::Serialize;

use super::cron::{next_of, Cron};
use super::de::{int_between, string_enum, Cx, Decode, Fields, Path};
use super::duration::{decode_idle, decode_offable, Duration, OffableDuration};
use super::error::ErrorCode;
use super::refs::{decode_tags, BackendType, EntityReference, Tags};
use super::yaml::{Node, NodeKind};

string_enum! {
    /// Spot or on-demand capacity.
    SpotPolicy { Spot = "spot", OnDemand = "on-demand", Auto = "auto" }
}

string_enum! {
    /// Whether a run may provision new instances.
    CreationPolicy { Reuse = "reuse", ReuseOrCreate = "reuse-or-create" }
}

string_enum! {
    /// The order in which the nodes of a multi-node task start.
    StartupOrder { Any = "any", MasterFirst = "master-first", WorkersFirst = "workers-first" }
}

string_enum! {
    /// When a multi-node task is done.
    StopCriteria { AllDone = "all-done", MasterDone = "master-done" }
}

string_enum! {
    /// An event that can trigger a retry.
    RetryEvent { NoCapacity = "no-capacity", Interruption = "interruption", Error = "error" }
}

/// `retry:` — `true`/`false` or `{on_events, duration}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Retry {
    /// `true` retries on every event for the default duration; `false` never retries.
    Enabled(bool),
    /// Explicit events and duration.
    Policy {
        /// Which events to retry on (all when omitted).
        #[serde(skip_serializing_if = "Option::is_none")]
        on_events: Option<Vec<RetryEvent>>,
        /// For how long to keep retrying (default 1h).
        #[serde(skip_serializing_if = "Option::is_none")]
        duration: Option<Duration>,
    },
}

impl Decode for Retry {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        if let NodeKind::Map(_) = node.kind {
            let mut f = Fields::new(node, cx, path, "retry policy")?;
            let on_events: Option<Vec<RetryEvent>> = f.opt(cx, path, "on_events");
            let duration = f.opt(cx, path, "duration");
            f.finish(cx, path);
            if on_events.as_ref().is_some_and(Vec::is_empty) {
                let message =
                    "`on_events` cannot be empty; list no-capacity, interruption or error";
                cx.invalid(node, &path.key("on_events"), message);
                return None;
            }
            return Some(Retry::Policy {
                on_events,
                duration,
            });
        }
        match node.kind {
            NodeKind::Bool(b) => Some(Retry::Enabled(b)),
            _ => {
                cx.expected(
                    node,
                    path,
                    "true, false or a mapping with on_events and duration",
                );
                None
            }
        }
    }
}

/// `utilization_policy:` — terminate when GPUs stay under-used for a whole window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UtilizationPolicy {
    /// Minimum GPU utilization, percent.
    pub min_gpu_utilization: i64,
    /// The window (at least 5 minutes).
    pub time_window: Duration,
}

impl Decode for UtilizationPolicy {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let mut f = Fields::new(node, cx, path, "utilization policy")?;
        let min = f.req_with(cx, path, "min_gpu_utilization", |n, cx, p| {
            int_between(n, cx, p, 0, 100)
        });
        let window: Option<Duration> = f.req(cx, path, "time_window");
        f.finish(cx, path);
        if let Some(w) = window {
            if w.0 < 300 {
                let message = format!("time_window must be at least 5m (300s), got {}s", w.0);
                cx.error(
                    node.mark,
                    &path.key("time_window"),
                    ErrorCode::OutOfRange,
                    message,
                );
                return None;
            }
        }
        Some(UtilizationPolicy {
            min_gpu_utilization: min?,
            time_window: window?,
        })
    }
}

/// `schedule:` — UTC cron expressions that (re)start the run (see [`super::cron`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Schedule {
    /// Cron expressions, five fields each; the run starts at the earliest of their times.
    pub cron: Vec<Cron>,
}

impl Schedule {
    /// The first time strictly after `after_ms` (Unix ms) at which the run is due to start.
    pub fn next_after(&self, after_ms: u64) -> Option<u64> {
        next_of(&self.cron, after_ms)
    }
}

impl Decode for Schedule {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let mut f = Fields::new(node, cx, path, "schedule")?;
        let cron = f.req_with(cx, path, "cron", |n, cx, p| match &n.kind {
            NodeKind::Seq(items) if items.is_empty() => {
                cx.invalid(n, p, "must list at least one cron expression");
                None
            }
            NodeKind::Seq(_) => Vec::<Cron>::decode(n, cx, p),
            _ => Some(vec![Cron::decode(n, cx, p)?]),
        });
        f.finish(cx, path);
        Some(Schedule { cron: cron? })
    }
}

/// An entry of `instances:`: which fleet instances a run may use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum InstanceSelector {
    /// By instance name (`my-fleet-1`).
    Name {
        /// The instance name.
        name: String,
    },
    /// By host name (SSH fleets).
    Hostname {
        /// The host name.
        hostname: String,
    },
    /// By fleet and instance number.
    FleetInstance {
        /// The fleet.
        fleet: EntityReference,
        /// The instance number within the fleet.
        instance: i64,
    },
}

fn non_empty(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<String> {
    let s = String::decode(node, cx, path)?;
    if s.is_empty() {
        cx.invalid(node, path, "must not be empty");
        return None;
    }
    Some(s)
}

impl Decode for InstanceSelector {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        if !matches!(node.kind, NodeKind::Map(_)) {
            return non_empty(node, cx, path).map(|name| InstanceSelector::Name { name });
        }
        let mut f = Fields::new(node, cx, path, "instance selector")?;
        let selector = if f.has("name") {
            f.req_with(cx, path, "name", non_empty)
                .map(|name| InstanceSelector::Name { name })
        } else if f.has("hostname") {
            f.req_with(cx, path, "hostname", non_empty)
                .map(|hostname| InstanceSelector::Hostname { hostname })
        } else {
            let fleet = f.req_with(cx, path, "fleet", |n, cx, p| {
                if matches!(&n.kind, NodeKind::Str(s) if s.is_empty()) {
                    cx.invalid(n, p, "must not be empty");
                    return None;
                }
                EntityReference::decode(n, cx, p)
            });
            let instance = f.req_with(cx, path, "instance", |n, cx, p| {
                int_between(n, cx, p, 0, i64::MAX)
            });
            match (fleet, instance) {
                (Some(fleet), Some(instance)) => {
                    Some(InstanceSelector::FleetInstance { fleet, instance })
                }
                _ => None,
            }
        };
        f.finish(cx, path);
        selector
    }
}

string_enum! {
    /// How vast.ai offers are ordered.
    VastAiOfferOrder { Score = "score", Price = "price" }
}

/// An entry of `backend_options:` (only vast.ai has options).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendOptions {
    /// Always `vastai`.
    #[serde(rename = "type")]
    pub backend: &'static str,
    /// Order offers by score or price.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offer_order: Option<VastAiOfferOrder>,
    /// Minimum host reliability, 0..1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_reliability: Option<f64>,
    /// Minimum host score.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_score: Option<i64>,
}

impl Decode for BackendOptions {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let mut f = Fields::new(node, cx, path, "backend options")?;
        let backend = f.or_with(
            cx,
            path,
            "type",
            || "vastai",
            |n, cx, p| {
                let s = String::decode(n, cx, p)?;
                if s != "vastai" {
                    cx.invalid(
                        n,
                        p,
                        format!("invalid value '{s}'; only vastai has backend options"),
                    );
                    return None;
                }
                Some("vastai")
            },
        );
        let offer_order = f.opt(cx, path, "offer_order");
        let min_reliability = f.opt_with(cx, path, "min_reliability", |n, cx, p| {
            let v = f64::decode(n, cx, p)?;
            if !(0.0..=1.0).contains(&v) {
                cx.error(
                    n.mark,
                    p,
                    ErrorCode::OutOfRange,
                    format!("must be between 0 and 1, got {v}"),
                );
                return None;
            }
            Some(v)
        });
        let min_score = f.opt_with(cx, path, "min_score", |n, cx, p| {
            int_between(n, cx, p, 0, i64::MAX)
        });
        f.finish(cx, path);
        Some(BackendOptions {
            backend: backend?,
            offer_order,
            min_reliability,
            min_score,
        })
    }
}

/// Profile parameters as they appear at the top level of a configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ProfileParams {
    /// Allowed backends (all when omitted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backends: Option<Vec<BackendType>>,
    /// Allowed regions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regions: Option<Vec<String>>,
    /// Allowed availability zones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub availability_zones: Option<Vec<String>>,
    /// Allowed instance types.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_types: Option<Vec<String>>,
    /// A capacity reservation id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reservation: Option<String>,
    /// Spot, on-demand or auto (default on-demand).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spot_policy: Option<SpotPolicy>,
    /// The retry policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    /// Maximum time in the running state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_duration: Option<OffableDuration>,
    /// Graceful stop budget (default 5m).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_duration: Option<OffableDuration>,
    /// Maximum price per hour.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_price: Option<f64>,
    /// Whether new instances may be provisioned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creation_policy: Option<CreationPolicy>,
    /// How long an idle instance is kept; `-1` is off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_duration: Option<Duration>,
    /// Terminate on sustained low GPU utilization.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub utilization_policy: Option<UtilizationPolicy>,
    /// Multi-node start order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub startup_order: Option<StartupOrder>,
    /// Multi-node completion rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_criteria: Option<StopCriteria>,
    /// Cron schedule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    /// Fleets a run may use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleets: Option<Vec<EntityReference>>,
    /// Instances a run may use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instances: Option<Vec<InstanceSelector>>,
    /// Tags for cloud resources.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Tags>,
    /// Per-backend options.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_options: Option<Vec<BackendOptions>>,
}

/// Which profile parameters a configuration type accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProfileScope {
    /// Every parameter (runs).
    Run,
    /// The subset allowed in fleet configurations.
    Fleet,
}

fn positive_price(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<f64> {
    let v = f64::decode(node, cx, path)?;
    if v <= 0.0 {
        cx.error(
            node.mark,
            path,
            ErrorCode::OutOfRange,
            format!("must be greater than 0, got {v}"),
        );
        return None;
    }
    Some(v)
}

impl ProfileParams {
    /// Reads the profile parameters allowed in `scope` from a configuration's fields.
    pub fn read(f: &mut Fields<'_>, cx: &mut Cx, path: &Path<'_>, scope: ProfileScope) -> Self {
        let mut p = ProfileParams {
            backends: f.opt(cx, path, "backends"),
            regions: f.opt(cx, path, "regions"),
            availability_zones: f.opt(cx, path, "availability_zones"),
            instance_types: f.opt(cx, path, "instance_types"),
            reservation: f.opt(cx, path, "reservation"),
            spot_policy: f.opt(cx, path, "spot_policy"),
            retry: f.opt(cx, path, "retry"),
            max_price: f.opt_with(cx, path, "max_price", positive_price),
            idle_duration: f.opt_with(cx, path, "idle_duration", decode_idle),
            tags: f.opt_with(cx, path, "tags", decode_tags),
            backend_options: f.opt_with(cx, path, "backend_options", decode_backend_options),
            ..ProfileParams::default()
        };
        if scope == ProfileScope::Run {
            p.max_duration = f.opt_with(cx, path, "max_duration", decode_offable);
            p.stop_duration = f.opt_with(cx, path, "stop_duration", decode_offable);
            p.creation_policy = f.opt(cx, path, "creation_policy");
            p.utilization_policy = f.opt(cx, path, "utilization_policy");
            p.startup_order = f.opt(cx, path, "startup_order");
            p.stop_criteria = f.opt(cx, path, "stop_criteria");
            p.schedule = f.opt(cx, path, "schedule");
            p.fleets = f.opt(cx, path, "fleets");
            p.instances = f.opt_with(cx, path, "instances", |n, cx, p| {
                let list = Vec::<InstanceSelector>::decode(n, cx, p)?;
                if list.is_empty() {
                    cx.invalid(n, p, "must list at least one instance selector");
                    return None;
                }
                Some(list)
            });
        }
        p
    }
}

fn decode_backend_options(
    node: &Node,
    cx: &mut Cx,
    path: &Path<'_>,
) -> Option<Vec<BackendOptions>> {
    let list = Vec::<BackendOptions>::decode(node, cx, path)?;
    if list.len() > 1 {
        cx.error(
            node.mark,
            path,
            ErrorCode::Conflict,
            "duplicate backend options for vastai",
        );
        return None;
    }
    Some(list)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::yaml::load;

    fn decode<T: Decode + Serialize>(text: &str) -> Result<String, String> {
        let doc = load(&format!("v: {text}")).unwrap();
        let mut cx = Cx::default();
        match T::decode(doc.get("v").unwrap(), &mut cx, &Path::ROOT) {
            Some(v) if !cx.has_errors() => Ok(serde_json::to_string(&v).unwrap()),
            _ => Err(cx.into_errors()[0].message.clone()),
        }
    }

    #[test]
    fn retry_vectors() {
        assert_eq!(decode::<Retry>("true").unwrap(), "true");
        assert_eq!(decode::<Retry>("false").unwrap(), "false");
        assert_eq!(
            decode::<Retry>("{on_events: [no-capacity]}").unwrap(),
            r#"{"on_events":["no-capacity"]}"#
        );
        assert_eq!(
            decode::<Retry>("{duration: 2h}").unwrap(),
            r#"{"duration":7200}"#
        );
        assert_eq!(
            decode::<Retry>("{on_events: []}").unwrap_err(),
            "`on_events` cannot be empty; list no-capacity, interruption or error"
        );
        assert_eq!(
            decode::<Retry>("{on_events: [meteor]}").unwrap_err(),
            "invalid value 'meteor'; expected one of: no-capacity, interruption, error"
        );
    }

    #[test]
    fn instance_selector_vectors() {
        assert_eq!(
            decode::<InstanceSelector>("my-fleet-1").unwrap(),
            r#"{"name":"my-fleet-1"}"#
        );
        assert_eq!(
            decode::<InstanceSelector>("{hostname: worker-1}").unwrap(),
            r#"{"hostname":"worker-1"}"#
        );
        assert_eq!(
            decode::<InstanceSelector>("{fleet: other/my-fleet, instance: 3}").unwrap(),
            r#"{"fleet":{"name":"my-fleet","project":"other"},"instance":3}"#
        );
        for bad in [
            "''",
            "{name: a, hostname: b}",
            "{name: ''}",
            "{hostname: ''}",
            "{fleet: '', instance: 0}",
            "{fleet: a/b/c, instance: 0}",
            "{fleet: a}",
            "{fleet: a, instance: -1}",
            "{fleet: a, instance: 1, x: 2}",
        ] {
            assert!(decode::<InstanceSelector>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn utilization_and_schedule() {
        assert_eq!(
            decode::<UtilizationPolicy>("{min_gpu_utilization: 10, time_window: 1h}").unwrap(),
            r#"{"min_gpu_utilization":10,"time_window":3600}"#
        );
        assert!(
            decode::<UtilizationPolicy>("{min_gpu_utilization: 101, time_window: 1h}").is_err()
        );
        assert!(decode::<UtilizationPolicy>("{min_gpu_utilization: 10, time_window: 1m}").is_err());
        assert_eq!(
            decode::<Schedule>("{cron: '15 23 * * *'}").unwrap(),
            r#"{"cron":["15 23 * * *"]}"#
        );
        assert_eq!(
            decode::<Schedule>("{cron: ['0 8 * * mon-fri', '*/30 * * * *']}").unwrap(),
            r#"{"cron":["0 8 * * mon-fri","*/30 * * * *"]}"#
        );
        for bad in [
            "{cron: 'every day'}",
            "{cron: []}",
            "{cron: ['0 8 * * *', '0 25 * * *']}",
            "{cron: '0 0 30 2 *'}",
            "{}",
        ] {
            assert!(decode::<Schedule>(bad).is_err(), "{bad}");
        }
    }
}
