//! The `.dstack.yml` configuration model: parsing, validation and normalization.
//!
//! ```
//! use dstack_core::config::{parse, Configuration};
//!
//! let text = "type: task\ncommands: [python train.py]\nresources:\n  gpu: A100:80GB:2\n";
//! let Configuration::Task(task) = parse(text, "train.dstack.yml").unwrap() else { panic!() };
//! assert_eq!(task.common.resources.gpu.unwrap().count.min, Some(2));
//! ```
//!
//! Every problem in a file is reported at once, each with its place:
//!
//! ```
//! let err = dstack_core::config::parse("type: task\ncommands: [x]\nnamee: y\n", "a.yml").unwrap_err();
//! assert_eq!(err.to_string(), "a.yml:3:1: namee: unknown field `namee`; did you mean `name`? [unknown_field]");
//! ```

pub mod cron;
pub mod de;
pub mod duration;
pub mod env;
pub mod error;
pub mod fleet;
pub mod gateway;
pub mod interpolate;
pub mod limits;
pub mod locate;
pub mod mounts;
pub mod ports;
pub mod profile;
pub mod range;
pub mod refs;
pub mod resources;
pub mod run;
pub mod run_args;
pub mod service;
pub mod sources;
pub mod support;
pub mod volume;
pub mod workflows;
pub mod yaml;

use serde::Serialize;

use de::{Cx, Fields, Path};
pub use error::{ConfigError, ConfigErrors, ErrorCode};
pub use fleet::FleetConfiguration;
pub use gateway::GatewayConfiguration;
pub use run::{DevEnvironmentConfiguration, TaskConfiguration};
pub use service::ServiceConfiguration;
pub use volume::VolumeConfiguration;

/// A validated, normalized configuration of any type.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type")]
pub enum Configuration {
    /// `type: dev-environment`.
    #[serde(rename = "dev-environment")]
    DevEnvironment(Box<DevEnvironmentConfiguration>),
    /// `type: task`.
    #[serde(rename = "task")]
    Task(Box<TaskConfiguration>),
    /// `type: service`.
    #[serde(rename = "service")]
    Service(Box<ServiceConfiguration>),
    /// `type: fleet`.
    #[serde(rename = "fleet")]
    Fleet(Box<FleetConfiguration>),
    /// `type: volume`.
    #[serde(rename = "volume")]
    Volume(Box<VolumeConfiguration>),
    /// `type: gateway`.
    #[serde(rename = "gateway")]
    Gateway(Box<GatewayConfiguration>),
}

/// The configuration types this parser knows, as written in `type:`.
pub const CONFIGURATION_TYPES: &[&str] = &[
    "dev-environment",
    "task",
    "service",
    "fleet",
    "gateway",
    "volume",
    "preset",
];

impl Configuration {
    /// The fields every run configuration has (`None` for fleets, volumes and gateways).
    pub fn run_common(&self) -> Option<&run::RunCommon> {
        match self {
            Configuration::Task(t) => Some(&t.common),
            Configuration::Service(s) => Some(&s.common),
            Configuration::DevEnvironment(d) => Some(&d.common),
            _ => None,
        }
    }

    /// The `type:` of the configuration.
    pub fn type_name(&self) -> &'static str {
        match self {
            Configuration::DevEnvironment(_) => "dev-environment",
            Configuration::Task(_) => "task",
            Configuration::Service(_) => "service",
            Configuration::Fleet(_) => "fleet",
            Configuration::Volume(_) => "volume",
            Configuration::Gateway(_) => "gateway",
        }
    }

    /// The `name:` of the configuration, if set.
    pub fn name(&self) -> Option<&str> {
        match self {
            Configuration::DevEnvironment(c) => c.common.name.as_deref(),
            Configuration::Task(c) => c.common.name.as_deref(),
            Configuration::Service(c) => c.common.name.as_deref(),
            Configuration::Fleet(c) => c.name.as_deref(),
            Configuration::Volume(c) => c.name.as_deref(),
            Configuration::Gateway(c) => c.name.as_deref(),
        }
    }

    /// The normalized configuration as JSON, in the shape of dstack's own models.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// Parses and validates a configuration. `file` prefixes every error line.
pub fn parse(text: &str, file: &str) -> Result<Configuration, ConfigErrors> {
    let fail = |errors| ConfigErrors {
        file: file.to_string(),
        errors,
    };
    let root = match yaml::load(text) {
        Ok(root) => root,
        Err(e) => {
            let message = match e.code {
                ErrorCode::Syntax => format!("invalid YAML: {}", e.message),
                _ => e.message,
            };
            let error = ConfigError {
                mark: e.mark,
                path: String::new(),
                code: e.code,
                message,
            };
            return Err(fail(vec![error]));
        }
    };
    parse_root(&root, file)
}

/// Validates a configuration given as data (e.g. built by the Python classes) rather than
/// text. Errors name `source` and the field path (there are no lines to point at).
/// Data beyond [`limits`] (depth, values, text) is refused before it is read.
pub fn parse_value(value: &serde_json::Value, source: &str) -> Result<Configuration, ConfigErrors> {
    if let Err(error) = limits::check_value(value) {
        return Err(ConfigErrors {
            file: source.to_string(),
            errors: vec![error],
        });
    }
    parse_root(&yaml::Node::from_json(value), source)
}

fn parse_root(root: &yaml::Node, file: &str) -> Result<Configuration, ConfigErrors> {
    let mut cx = Cx::default();
    match parse_node(root, &mut cx) {
        Some(config) if !cx.has_errors() => Ok(config),
        _ => Err(ConfigErrors {
            file: file.to_string(),
            errors: cx.into_errors(),
        }),
    }
}

/// Parses a configuration from an already loaded document.
pub fn parse_node(root: &yaml::Node, cx: &mut Cx) -> Option<Configuration> {
    let path = Path::ROOT;
    let mut f = Fields::new(root, cx, &path, "a dstack configuration")?;
    let type_node = f.take("type");
    let Some(type_node) = type_node.filter(|n| !n.is_null()) else {
        let message = format!(
            "field required; set `type` to one of: {}",
            CONFIGURATION_TYPES.join(", ")
        );
        cx.error(
            root.mark,
            &path.key("type"),
            ErrorCode::MissingField,
            message,
        );
        return None;
    };
    let kind = type_node.as_key().unwrap_or_default();
    let config = match kind {
        "dev-environment" => DevEnvironmentConfiguration::read(root, &mut f, cx, &path)
            .map(|c| Configuration::DevEnvironment(Box::new(c))),
        "task" => TaskConfiguration::read(root, &mut f, cx, &path)
            .map(|c| Configuration::Task(Box::new(c))),
        "service" => ServiceConfiguration::read(root, &mut f, cx, &path)
            .map(|c| Configuration::Service(Box::new(c))),
        "fleet" => FleetConfiguration::read(root, &mut f, cx, &path)
            .map(|c| Configuration::Fleet(Box::new(c))),
        "volume" => {
            VolumeConfiguration::read(&mut f, cx, &path).map(|c| Configuration::Volume(Box::new(c)))
        }
        "gateway" => GatewayConfiguration::read(&mut f, cx, &path)
            .map(|c| Configuration::Gateway(Box::new(c))),
        "preset" => {
            let message = "`preset` configurations are not supported yet";
            cx.error(
                type_node.mark,
                &path.key("type"),
                ErrorCode::UnknownType,
                message,
            );
            return None;
        }
        _ => {
            let message = format!(
                "unknown configuration type {}; expected one of: {}",
                type_node.preview(),
                CONFIGURATION_TYPES.join(", ")
            );
            cx.error(
                type_node.mark,
                &path.key("type"),
                ErrorCode::UnknownType,
                message,
            );
            return None;
        }
    };
    f.finish(cx, &path);
    config
}
