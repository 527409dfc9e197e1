//! dstack's override flags of `dstack apply` for run configurations: resources (`--cpu`,
//! `--gpu`, `--memory`, `--disk`) and profile settings (`-b`, `-r`, `--instance-type`,
//! `--fleet`, `-R`, `--dont-destroy`, `--idle-duration`, the spot and retry policies,
//! `--max-price`, `--max-duration`). Each replaces the field of the configuration before it
//! is planned, as dstack's `apply_resources_args` / `apply_profile_args` do; the result is
//! validated like the file itself, so a value the file could not hold is refused by name.

use dstack_core::config::{self, Configuration};
use serde_json::{json, Map, Value};

/// The override flags.
#[derive(clap::Args, Debug, Default)]
pub struct Overrides {
    /// Request CPU for the run: ARCH:COUNT (all parts optional), e.g. `4..` or `x86:2`.
    #[arg(long, value_name = "SPEC", help_heading = "Resources")]
    cpu: Option<String>,
    /// Request GPU for the run: NAME:COUNT:MEMORY (all parts optional), e.g. `A100:2` or `0`.
    #[arg(long, value_name = "SPEC", help_heading = "Resources")]
    gpu: Option<String>,
    /// Request the size range of RAM for the run, e.g. `128GB..256GB`.
    #[arg(long, value_name = "RANGE", help_heading = "Resources")]
    memory: Option<String>,
    /// Request the size range of disk for the run, e.g. `100GB..`.
    #[arg(long, value_name = "RANGE", help_heading = "Resources")]
    disk: Option<String>,
    /// The maximum price per hour, in dollars.
    #[arg(long, value_name = "PRICE", help_heading = "Profile")]
    max_price: Option<f64>,
    /// The maximum duration of the run (e.g. `2h`, or `off`).
    #[arg(long, value_name = "DURATION", help_heading = "Profile")]
    max_duration: Option<String>,
    /// The backends that will be tried for provisioning (repeatable).
    #[arg(
        short = 'b',
        long = "backend",
        value_name = "NAME",
        help_heading = "Profile"
    )]
    backends: Vec<String>,
    /// The regions that will be tried for provisioning (repeatable).
    #[arg(
        short = 'r',
        long = "region",
        value_name = "NAME",
        help_heading = "Profile"
    )]
    regions: Vec<String>,
    /// The cloud-specific instance types that will be tried for provisioning (repeatable).
    #[arg(long = "instance-type", value_name = "NAME", help_heading = "Profile")]
    instance_types: Vec<String>,
    /// Consider only these fleets (repeatable).
    #[arg(long = "fleet", value_name = "NAME", help_heading = "Fleets")]
    fleets: Vec<String>,
    /// Reuse an existing instance of a fleet (do not provision a new one).
    #[arg(short = 'R', long, help_heading = "Fleets", conflicts_with_all = ["dont_destroy", "idle_duration"])]
    reuse: bool,
    /// Do not destroy the instance after the run is finished (if the run provisions one).
    #[arg(long, help_heading = "Fleets", conflicts_with = "idle_duration")]
    dont_destroy: bool,
    /// Time to wait before destroying the idle instance (if the run provisions one).
    #[arg(long, value_name = "DURATION", help_heading = "Fleets")]
    idle_duration: Option<String>,
    /// Consider only spot instances.
    #[arg(long, help_heading = "Spot policy", group = "spot_choice")]
    spot: bool,
    /// Consider only on-demand instances.
    #[arg(long, help_heading = "Spot policy", group = "spot_choice")]
    on_demand: bool,
    /// Consider both spot and on-demand instances.
    #[arg(long, help_heading = "Spot policy", group = "spot_choice")]
    spot_auto: bool,
    /// One of `spot`, `on-demand`, `auto`.
    #[arg(
        long,
        value_name = "POLICY",
        help_heading = "Spot policy",
        group = "spot_choice",
        value_parser = ["spot", "on-demand", "auto"]
    )]
    spot_policy: Option<String>,
    /// Retry the run on failures (for dstack's default duration).
    #[arg(long, help_heading = "Retry policy", group = "retry_choice")]
    retry: bool,
    /// Never retry the run.
    #[arg(long, help_heading = "Retry policy", group = "retry_choice")]
    no_retry: bool,
    /// Retry the run on failures for this long.
    #[arg(
        long,
        value_name = "DURATION",
        help_heading = "Retry policy",
        group = "retry_choice"
    )]
    retry_duration: Option<String>,
    /// The repo to upload for the run: a local git repo (its files, uncommitted changes
    /// included); replaces the configuration's `repos`.
    #[arg(
        short = 'P',
        long = "repo",
        value_name = "PATH",
        help_heading = "Repo",
        conflicts_with = "no_repo"
    )]
    repo: Option<String>,
    /// Upload no repo (drops the configuration's `repos`).
    #[arg(long, help_heading = "Repo")]
    no_repo: bool,
    /// The branch to check out of the repo `-P URL` names.
    #[arg(long, value_name = "BRANCH", help_heading = "Repo", requires = "repo")]
    repo_branch: Option<String>,
    /// The commit to check out of the repo `-P URL` names.
    #[arg(long, value_name = "HASH", help_heading = "Repo", requires = "repo")]
    repo_hash: Option<String>,
    /// Expose a port of a task or dev environment: `PORT`, `LOCAL:PORT` or `*:PORT`
    /// (repeatable); replaces the configuration's mapping of the same port.
    #[arg(
        short = 'p',
        long = "port",
        value_name = "MAPPING",
        help_heading = "Ports"
    )]
    ports: Vec<String>,
}

/// Why overrides could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum OverrideError {
    /// `--repo-branch`/`--repo-hash` given with a local `-P` path.
    #[error("--repo-branch and --repo-hash apply to a repo given by URL (-P URL); a local repo is uploaded as it is on disk")]
    NotAUrl,
    /// `-p` given for a service (published through the proxy) or a non-run configuration.
    #[error("-p/--port applies to tasks and dev environments, not to a {0} configuration")]
    PortsNotAllowed(&'static str),
    /// The configuration is not a run (fleet, volume, gateway files take none of these).
    #[error("{flags} apply to runs only, not to a {kind} configuration")]
    NotARun {
        /// The flags given.
        flags: String,
        /// The configuration's type.
        kind: &'static str,
    },
    /// The overridden configuration is not valid (e.g. `--cpu lots`).
    #[error("{0}")]
    Invalid(config::ConfigErrors),
}

impl Overrides {
    /// The fields the flags set, as the configuration's JSON has them (dstack's names).
    fn fields(&self) -> Vec<(&'static str, Value)> {
        let mut fields = Vec::new();
        let list = |names: &[String]| Value::from(names.to_vec());
        for (key, value) in [
            ("cpu", &self.cpu),
            ("gpu", &self.gpu),
            ("memory", &self.memory),
            ("disk", &self.disk),
        ] {
            if let Some(value) = value {
                fields.push((key, json!(value)));
            }
        }
        if let Some(price) = self.max_price {
            fields.push(("max_price", json!(price)));
        }
        if let Some(duration) = &self.max_duration {
            fields.push(("max_duration", json!(duration)));
        }
        for (key, names) in [
            ("backends", &self.backends),
            ("regions", &self.regions),
            ("instance_types", &self.instance_types),
            ("fleets", &self.fleets),
        ] {
            if !names.is_empty() {
                fields.push((key, list(names)));
            }
        }
        match (&self.idle_duration, self.dont_destroy) {
            (Some(duration), _) => fields.push(("idle_duration", json!(duration))),
            // dstack's `--dont-destroy`: never reaped.
            (None, true) => fields.push(("idle_duration", json!(-1))),
            (None, false) => {}
        }
        if self.reuse {
            fields.push(("creation_policy", json!("reuse")));
        }
        let spot = match (self.spot, self.on_demand, self.spot_auto) {
            (true, _, _) => Some("spot"),
            (_, true, _) => Some("on-demand"),
            (_, _, true) => Some("auto"),
            _ => self.spot_policy.as_deref(),
        };
        if let Some(policy) = spot {
            fields.push(("spot_policy", json!(policy)));
        }
        match (self.retry, self.no_retry, &self.retry_duration) {
            (true, _, _) => fields.push(("retry", json!(true))),
            (_, true, _) => fields.push(("retry", json!(false))),
            (_, _, Some(duration)) => fields.push(("retry", json!({ "duration": duration }))),
            _ => {}
        }
        if let Some(repo) = &self.repo {
            // A path is taken from the directory the command runs in (paths in the file are
            // taken from the file's); a URL stays as it is, with the branch or commit asked
            // for.
            let entry = if crate::init::is_url(repo) {
                let mut entry = json!({ "url": repo });
                for (key, value) in [("branch", &self.repo_branch), ("hash", &self.repo_hash)] {
                    if let Some(value) = value {
                        entry[key] = json!(value);
                    }
                }
                entry
            } else {
                match std::env::current_dir() {
                    Ok(dir) => json!(dir.join(repo).display().to_string()),
                    Err(_) => json!(repo),
                }
            };
            fields.push(("repos", json!([entry])));
        } else if self.no_repo {
            fields.push(("repos", json!([])));
        }
        fields
    }

    /// `configuration` with the flags' fields replaced and `-p` mappings merged into its
    /// ports (unchanged without flags).
    pub fn apply(&self, configuration: Configuration) -> Result<Configuration, OverrideError> {
        let branch_or_hash = self.repo_branch.is_some() || self.repo_hash.is_some();
        if branch_or_hash && !self.repo.as_deref().is_some_and(crate::init::is_url) {
            return Err(OverrideError::NotAUrl);
        }
        let mut fields = self.fields();
        if !self.ports.is_empty() {
            if !matches!(
                configuration,
                Configuration::Task(_) | Configuration::DevEnvironment(_)
            ) {
                return Err(OverrideError::PortsNotAllowed(configuration.type_name()));
            }
            let current = configuration.to_json()["ports"].clone();
            fields.push(("ports", merge_ports(&current, &self.ports)));
        }
        if fields.is_empty() {
            return Ok(configuration);
        }
        if !matches!(
            configuration,
            Configuration::Task(_) | Configuration::Service(_) | Configuration::DevEnvironment(_)
        ) {
            let flags: Vec<&str> = fields.iter().map(|(key, _)| *key).collect();
            return Err(OverrideError::NotARun {
                flags: format!("the flags setting {}", flags.join(", ")),
                kind: configuration.type_name(),
            });
        }
        let mut value = configuration.to_json();
        let Some(root) = value.as_object_mut() else {
            return Ok(configuration);
        };
        for (key, field) in fields {
            if matches!(key, "cpu" | "gpu" | "memory" | "disk") {
                let resources = root
                    .entry("resources")
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Some(resources) = resources.as_object_mut() {
                    resources.insert(key.to_string(), field);
                }
            } else {
                root.insert(key.to_string(), field);
            }
        }
        config::parse_value(&value, "the command-line flags").map_err(OverrideError::Invalid)
    }
}

/// The configuration's `ports` (as its JSON has them) with the `-p` mappings merged in, as
/// dstack's: a mapping replaces the one of the same container port, others are appended. A
/// mapping that is not one is kept as text, for the parser to refuse at its place.
fn merge_ports(current: &Value, flags: &[String]) -> Value {
    let container_port = |v: &Value| match v {
        Value::Object(m) => m.get("container_port").and_then(Value::as_u64),
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.rsplit(':').next().and_then(|p| p.trim().parse().ok()),
        _ => None,
    };
    let mut merged: Vec<Value> = current.as_array().cloned().unwrap_or_default();
    for flag in flags {
        let value = Value::String(flag.clone());
        let port = container_port(&value);
        match merged
            .iter_mut()
            .find(|m| port.is_some() && container_port(m) == port)
        {
            Some(existing) => *existing = value,
            None => merged.push(value),
        }
    }
    Value::Array(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> Configuration {
        config::parse(
            "type: task\ncommands: [x]\nresources: {cpu: 2, gpu: 1}\nbackends: [aws]\n",
            "t.yml",
        )
        .unwrap()
    }

    fn profile_json(c: &Configuration) -> Value {
        c.to_json()
    }

    #[test]
    fn repo_flags_replace_or_drop_the_repos() {
        let with_repo = config::parse("type: task\ncommands: [x]\nrepos: [.]\n", "t.yml").unwrap();
        let overrides = Overrides {
            repo: Some("code".into()),
            ..Overrides::default()
        };
        let Configuration::Task(t) = overrides.apply(with_repo.clone()).unwrap() else {
            panic!("a task")
        };
        let here = std::env::current_dir().unwrap().join("code");
        assert_eq!(
            t.common.repos[0].local_path.as_deref(),
            Some(here.to_str().unwrap())
        );
        let none = Overrides {
            no_repo: true,
            ..Overrides::default()
        };
        let Configuration::Task(t) = none.apply(with_repo).unwrap() else {
            panic!("a task")
        };
        assert!(t.common.repos.is_empty());
        let url = Overrides {
            repo: Some("https://github.com/org/repo.git".into()),
            repo_branch: Some("dev".into()),
            repo_hash: Some("abc123".into()),
            ..Overrides::default()
        };
        let Configuration::Task(t) = url.apply(task()).unwrap() else {
            panic!("a task")
        };
        let repo = &t.common.repos[0];
        assert_eq!(repo.url.as_deref(), Some("https://github.com/org/repo.git"));
        assert_eq!(
            (repo.branch.as_deref(), repo.hash.as_deref()),
            (Some("dev"), Some("abc123"))
        );
        let local = Overrides {
            repo: Some("code".into()),
            repo_branch: Some("dev".into()),
            ..Overrides::default()
        };
        assert!(local
            .apply(task())
            .unwrap_err()
            .to_string()
            .contains("-P URL"));
    }

    #[test]
    fn port_flags_replace_the_same_port_and_add_others() {
        let with_ports = config::parse(
            "type: task\ncommands: [x]\nports: [8000, \"9000:90\"]\n",
            "t.yml",
        )
        .unwrap();
        let overrides = Overrides {
            ports: vec!["8100:8000".into(), "*:7000".into()],
            ..Overrides::default()
        };
        let Configuration::Task(t) = overrides.apply(with_ports).unwrap() else {
            panic!("a task")
        };
        let ports: Vec<(Option<u16>, u16)> = t
            .ports
            .iter()
            .map(|p| (p.local_port, p.container_port))
            .collect();
        assert_eq!(
            ports,
            vec![(Some(8100), 8000), (Some(9000), 90), (None, 7000)]
        );
        let bad = Overrides {
            ports: vec!["x:80:1".into()],
            ..Overrides::default()
        };
        let e = bad.apply(task()).unwrap_err().to_string();
        assert!(e.contains("ports[0]"), "{e}");
        let service = config::parse("type: service\ncommands: [x]\nport: 80\n", "s.yml").unwrap();
        let e = overrides.apply(service).unwrap_err().to_string();
        assert!(e.contains("-p/--port") && e.contains("service"), "{e}");
    }

    #[test]
    fn no_flags_leave_the_configuration_as_it_is() {
        assert_eq!(Overrides::default().apply(task()).unwrap(), task());
    }

    #[test]
    fn flags_replace_resources_and_profile_fields() {
        let overrides = Overrides {
            cpu: Some("1..".into()),
            gpu: Some("0".into()),
            backends: vec!["local".into(), "remote".into()],
            spot: true,
            max_price: Some(0.5),
            retry_duration: Some("1h".into()),
            reuse: true,
            ..Overrides::default()
        };
        let Configuration::Task(t) = overrides.apply(task()).unwrap() else {
            panic!("a task")
        };
        let r = &t.common.resources;
        assert_eq!((r.cpu.count.min, r.cpu.count.max), (Some(1), None));
        assert!(r.gpu.as_ref().is_none_or(|g| g.count.max == Some(0)));
        let v = profile_json(&Configuration::Task(t));
        assert_eq!(v["backends"], json!(["local", "remote"]));
        assert_eq!(v["spot_policy"], json!("spot"));
        assert_eq!(v["max_price"], json!(0.5));
        assert_eq!(v["retry"]["duration"], json!(3600));
        assert_eq!(v["creation_policy"], json!("reuse"));
    }

    #[test]
    fn dont_destroy_never_reaps_and_no_retry_turns_retries_off() {
        let overrides = Overrides {
            dont_destroy: true,
            no_retry: true,
            ..Overrides::default()
        };
        let v = profile_json(&overrides.apply(task()).unwrap());
        assert_eq!(v["idle_duration"], json!(-1));
        assert_eq!(v["retry"], json!(false));
    }

    #[test]
    fn invalid_values_are_refused_by_field() {
        let overrides = Overrides {
            cpu: Some("lots".into()),
            ..Overrides::default()
        };
        let e = overrides.apply(task()).unwrap_err().to_string();
        assert!(e.contains("resources.cpu"), "{e}");
    }

    #[test]
    fn flags_are_refused_for_fleets() {
        let fleet = config::parse("type: fleet\nname: f\nnodes: 1\n", "f.yml").unwrap();
        let overrides = Overrides {
            spot: true,
            ..Overrides::default()
        };
        let e = overrides.apply(fleet).unwrap_err().to_string();
        assert!(e.contains("spot_policy") && e.contains("fleet"), "{e}");
    }
}
