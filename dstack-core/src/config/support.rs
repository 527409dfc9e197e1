//! Fields that dstack-rs parses as dstack does but cannot honour (yet): each is refused when
//! the configuration is applied, at its place in the file, rather than accepted and ignored.
//! `docs/fields.md` lists every field of dstack's schema with what this project does with it.
//!
//! ```
//! use dstack_core::config::{parse, support};
//!
//! let text = "type: task\ncommands: [python train.py]\nutilization_policy: {min_gpu_utilization: 10, time_window: 1h}\n";
//! let config = parse(text, "t.yml").unwrap();
//! let err = support::check_located(text, "t.yml", &config).unwrap_err();
//! assert!(err.to_string().starts_with("t.yml:3:1: utilization_policy: "), "{err}");
//! ```

use super::error::{ConfigErrors, ErrorCode};
use super::locate;
use super::profile::StartupOrder;
use super::run::RunCommon;
use super::Configuration;

/// A field set in a configuration that this project would not honour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsupported {
    /// The field path, as in configuration errors (`resources.shm_size`, `repos`).
    pub path: String,
    /// Why it is refused and what to do instead.
    pub message: String,
}

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

fn refuse(found: &mut Vec<Unsupported>, path: &str, message: impl Into<String>) {
    found.push(Unsupported {
        path: path.to_string(),
        message: message.into(),
    });
}

/// Every field of `config` that would be ignored, in the order they are checked (empty when
/// it can run as written).
pub fn unsupported(config: &Configuration) -> Vec<Unsupported> {
    let mut found = Vec::new();
    match config {
        Configuration::Task(t) => {
            run_common(&t.common, &mut found);
            multi_node(&t.common, t.nodes.unwrap_or(1), &mut found);
        }
        Configuration::Service(s) => run_common(&s.common, &mut found),
        Configuration::DevEnvironment(d) => run_common(&d.common, &mut found),
        Configuration::Fleet(f) => {
            if f.profile.reservation.is_some() {
                refuse(&mut found, "reservation", RESERVATION);
            }
            if f.profile.backend_options.is_some() {
                refuse(&mut found, "backend_options", BACKEND_OPTIONS);
            }
            if let Some(ssh) = &f.ssh_config {
                inline_keys(ssh, &mut found);
            }
            if f.ssh_config.as_ref().is_some_and(|s| s.network.is_some()) {
                refuse(
                    &mut found,
                    "ssh_config.network",
                    "choosing the network of a fleet's hosts is not supported yet: nodes reach \
                     each other at the addresses they are listed with (or `internal_ip`); \
                     remove `network`",
                );
            }
        }
        Configuration::Volume(v) if !matches!(v.backend.as_str(), "aws" | "gcp") => refuse(
            &mut found,
            "backend",
            format!(
                "volumes of the {} backend are not supported: dstack-rs has aws and gcp volumes",
                v.backend
            ),
        ),
        Configuration::Volume(_) | Configuration::Gateway(_) => {}
    }
    found
}

/// Inline `ssh_key`s of a fleet, its hosts and jump hosts (keys are read from
/// `identity_file`).
fn inline_keys(ssh: &super::fleet::SshConfig, found: &mut Vec<Unsupported>) {
    use super::fleet::SshHostEntry;
    const MESSAGE: &str = "an inline `ssh_key` is not supported; use `identity_file`";
    if ssh.ssh_key.is_some() {
        refuse(found, "ssh_config.ssh_key", MESSAGE);
    }
    if ssh.proxy_jump.as_ref().is_some_and(|p| p.ssh_key.is_some()) {
        refuse(found, "ssh_config.proxy_jump.ssh_key", MESSAGE);
    }
    for (i, entry) in ssh.hosts.iter().enumerate() {
        let SshHostEntry::Host(host) = entry else {
            continue;
        };
        if host.ssh_key.is_some() {
            refuse(found, &format!("ssh_config.hosts[{i}].ssh_key"), MESSAGE);
        }
        if host
            .proxy_jump
            .as_ref()
            .is_some_and(|p| p.ssh_key.is_some())
        {
            let path = format!("ssh_config.hosts[{i}].proxy_jump.ssh_key");
            refuse(found, &path, MESSAGE);
        }
    }
}

const RESERVATION: &str = "capacity reservations are not supported yet: instances are created \
                           (or hosts used) without one; remove `reservation`";

const BACKEND_OPTIONS: &str = "backend options apply to vast.ai, which is not a backend of \
                               dstack-rs; remove `backend_options`";

/// The fields every run configuration shares.
fn run_common(common: &RunCommon, found: &mut Vec<Unsupported>) {
    let container = common.in_container();
    if common.user.is_some() && !container && common.entrypoint.is_some() {
        refuse(
            found,
            "user",
            "`user` cannot be checked with `entrypoint` for a job run as a host process (the \
             entrypoint is run as is, as the host's login user); remove one of them, or set \
             `image`",
        );
    }
    if common.privileged && !container {
        refuse(
            found,
            "privileged",
            "`privileged` applies to containers (`image:`) only: a job run as a host process \
             has the login user's own rights; remove `privileged` or set `image`",
        );
    }
    if common.python.is_some() && common.entrypoint.is_some() {
        refuse(
            found,
            "python",
            "`python` cannot be honoured with `entrypoint`: the entrypoint is run as is, with \
             the host's own `python`; remove one of them",
        );
    }
    if common.nvcc == Some(true) {
        refuse(
            found,
            "nvcc",
            "`nvcc: true` is not supported yet: there is no CUDA devel base image here; use an \
             `image` that has the CUDA compiler",
        );
    }
    for (i, repo) in common.repos.iter().enumerate() {
        if repo.local_path.is_some() && (repo.branch.is_some() || repo.hash.is_some()) {
            refuse(
                found,
                &format!("repos[{i}]"),
                "`branch` and `hash` apply to repos given by URL: a local repo is uploaded as \
                 it is on disk; remove them",
            );
        }
    }
    if common.dstack {
        refuse(
            found,
            "dstack",
            "`dstack: true` (the dstack CLI and credentials inside the run) is not supported yet; \
             remove it",
        );
    }
    if common.resources.shm_size.is_some() && !container {
        refuse(
            found,
            "resources.shm_size",
            "`shm_size` sizes a container's /dev/shm (`image:`); a job run as a host process \
             shares the host's /dev/shm; remove `shm_size` or set `image`",
        );
    }
    let profile = &common.profile;
    if profile.reservation.is_some() {
        refuse(found, "reservation", RESERVATION);
    }
    if profile.utilization_policy.is_some() {
        refuse(
            found,
            "utilization_policy",
            "`utilization_policy` is not supported yet: GPU utilization is not sampled; remove \
             it",
        );
    }
    if profile.backend_options.is_some() {
        refuse(found, "backend_options", BACKEND_OPTIONS);
    }
}

/// A `startup_order` other than the default of a multi-node task (every node starts at once).
fn multi_node(common: &RunCommon, nodes: i64, found: &mut Vec<Unsupported>) {
    if nodes < 2 {
        return;
    }
    let profile = &common.profile;
    if matches!(
        profile.startup_order,
        Some(StartupOrder::MasterFirst | StartupOrder::WorkersFirst)
    ) {
        refuse(
            found,
            "startup_order",
            "only `startup_order: any` is supported yet: the nodes of a multi-node task start \
             together",
        );
    }
}

/// [`unsupported`] as located configuration errors (`FILE:LINE:COL: field: message
/// [unsupported]`), the places found in `text`, the file `config` was parsed from.
pub fn check_located(text: &str, file: &str, config: &Configuration) -> Result<(), ConfigErrors> {
    let found = unsupported(config);
    if found.is_empty() {
        return Ok(());
    }
    let problems = found
        .into_iter()
        .map(|u| (u.path, ErrorCode::Unsupported, u.message))
        .collect();
    Err(locate::errors(text, file, problems))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    /// The refusals of a configuration `text` read from `file`, as the user sees them.
    fn refusals(text: &str, file: &str) -> String {
        let config = parse(text, file).unwrap();
        match check_located(text, file, &config) {
            Err(e) => e.to_string(),
            Ok(()) => String::new(),
        }
    }

    fn refused(yaml: &str) -> String {
        refusals(
            &format!("type: task\ncommands: [\"true\"]\n{yaml}"),
            "t.yml",
        )
    }

    /// Every refused field of a run, with the place and message the user sees at apply.
    #[test]
    fn ignored_run_fields_are_refused_at_their_place() {
        for (yaml, expected) in [
            (
                "user: me\nentrypoint: /bin/sh\n",
                "t.yml:3:1: user: `user` cannot be checked with `entrypoint`",
            ),
            (
                "privileged: true\n",
                "t.yml:3:1: privileged: `privileged` applies to containers",
            ),
            (
                "python: \"3.11\"\nentrypoint: /bin/sh\n",
                "t.yml:3:1: python: `python` cannot be honoured with `entrypoint`",
            ),
            (
                "nvcc: true\n",
                "t.yml:3:1: nvcc: `nvcc: true` is not supported yet",
            ),
            (
                "repos:\n  - local_path: .\n    branch: main\n",
                "t.yml:4:5: repos[0]: `branch` and `hash` apply to repos given by URL",
            ),
            (
                "dstack: true\n",
                "t.yml:3:1: dstack: `dstack: true` (the dstack CLI",
            ),
            (
                "resources:\n  shm_size: 1GB\n",
                "t.yml:4:3: resources.shm_size: `shm_size` sizes a container's",
            ),
            (
                "reservation: r-1\n",
                "t.yml:3:1: reservation: capacity reservations are not supported yet",
            ),
            (
                "utilization_policy: {min_gpu_utilization: 10, time_window: 10m}\n",
                "t.yml:3:1: utilization_policy: `utilization_policy` is not supported yet",
            ),
            (
                "backend_options: [{type: vastai}]\n",
                "t.yml:3:1: backend_options: backend options apply to vast.ai",
            ),
            (
                "nodes: 2\nstartup_order: master-first\n",
                "t.yml:4:1: startup_order: only `startup_order: any`",
            ),
        ] {
            let message = refused(yaml);
            assert!(message.contains(expected), "{yaml}: {message}");
            assert!(message.ends_with("[unsupported]"), "{message}");
        }
    }

    /// What a run honours is not refused: container-only fields in a container, the
    /// defaults of multi-node fields, and `false` where `true` is what is missing.
    #[test]
    fn honoured_values_of_the_same_fields_pass() {
        for yaml in [
            "image: ubuntu\nuser: me\nprivileged: true\nresources:\n  shm_size: 1GB\n",
            "nvcc: false\n",
            "dstack: false\n",
            "startup_order: master-first\nstop_criteria: master-done\n",
            "nodes: 2\nstartup_order: any\nstop_criteria: master-done\n",
            "home_dir: /root\nsetup: [echo hi]\n",
            "python: \"3.11\"\npriority: 100\ninstances: [a-0]\ntags: {team: ml}\nuser: me\n",
        ] {
            assert_eq!(refused(yaml), "", "{yaml}");
        }
    }

    #[test]
    fn volumes_of_other_backends_and_presets_are_refused() {
        let err = refusals(
            "type: volume\nname: v\nbackend: runpod\nregion: eu\nsize: 10GB\n",
            "v.yml",
        );
        assert!(
            err.contains("v.yml:3:1: backend: volumes of the runpod backend are not supported"),
            "{err}"
        );
        let aws = "type: volume\nname: v\nbackend: aws\nregion: eu-west-1\nsize: 10GB\n";
        assert_eq!(refusals(aws, "v.yml"), "");
        let err = parse("type: preset\nname: p\n", "p.yml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("p.yml:1:7: type: `preset` configurations are not supported yet"),
            "{err}"
        );
    }

    #[test]
    fn ignored_fleet_fields_are_refused() {
        for (text, expected) in [
            (
                "type: fleet\nname: f\nnodes: 1\nreservation: r-1\n",
                "f.yml:4:1: reservation: capacity reservations",
            ),
            (
                "type: fleet\nname: f\nnodes: 1\nbackend_options: [{type: vastai}]\n",
                "f.yml:4:1: backend_options: backend options apply to vast.ai",
            ),
            (
                "type: fleet\nname: f\nssh_config:\n  user: u\n  hosts:\n    - hostname: h\n      \
                 ssh_key:\n        private: KEY\n        public: PUB\n",
                "f.yml:7:7: ssh_config.hosts[0].ssh_key: an inline `ssh_key` is not supported",
            ),
            (
                "type: fleet\nname: f\nssh_config:\n  hosts: [h1]\n  network: 10.0.0.0/24\n",
                "f.yml:5:3: ssh_config.network: choosing the network",
            ),
        ] {
            let err = refusals(text, "f.yml");
            assert!(err.contains(expected), "{text}: {err}");
        }
    }
}
