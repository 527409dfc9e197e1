//! Fleets the user applies. Backend fleets (`nodes:`) are provisioned by `provision`; here are
//! SSH fleets, whose hosts are listed in `ssh_config`. Applying one
//! records the fleet and one instance per host (write before act), then deploys every host at
//! once; each host ends `idle` (its agent answers) or `terminated` with the reason, so one bad
//! host never holds back the others. Re-applying keeps the hosts that joined, retries the ones
//! that did not, and removes hosts no longer listed.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::{refuse_unsupported, EngineError, Inner};
use crate::config::fleet::{Blocks, FleetConfiguration, SshConfig, SshHostEntry, SshProxy};
use crate::config::Configuration;
use crate::model::{now_ms, Fleet, FleetStatus, Instance, InstanceStatus, JobStatus};

/// The backend of SSH fleet instances.
pub const SSH_BACKEND: &str = "ssh";

/// A step of a fleet apply, per host, for progress output.
pub type Progress<'a> = &'a (dyn Fn(&Instance, &str) + Send + Sync);

/// How to reach one host, as recorded in its instance's `backend_data`.
fn host_data(
    config: &SshConfig,
    entry: &SshHostEntry,
    fleet_blocks: Blocks,
    home: &Path,
) -> Result<(String, serde_json::Value), String> {
    let (hostname, host) = match entry {
        SshHostEntry::Name(name) => (name.clone(), None),
        SshHostEntry::Host(h) => (h.hostname.clone(), Some(h)),
    };
    let port = host.and_then(|h| h.port).or(config.port).unwrap_or(22);
    let user = host
        .and_then(|h| h.user.clone())
        .or_else(|| config.user.clone())
        .ok_or_else(|| format!("{hostname}: no `user` (set ssh_config.user or the host's user)"))?;
    // An inline `ssh_key` was refused when the fleet was applied (`config::support`).
    let identity = host
        .and_then(|h| h.identity_file.clone())
        .or_else(|| config.identity_file.clone())
        .ok_or_else(|| {
            format!("{hostname}: no `identity_file` (set ssh_config.identity_file or the host's)")
        })?;
    let proxy = host
        .and_then(|h| h.proxy_jump.as_ref())
        .or(config.proxy_jump.as_ref())
        .map(|p| proxy_data(p, home));
    let mut data = serde_json::json!({
        "hostname": hostname,
        "port": port,
        "user": user,
        "identity_file": expand_home(&identity, home),
    });
    if let Some(proxy) = proxy {
        data["proxy_jump"] = proxy;
    }
    if let Some(ip) = host.and_then(|h| h.internal_ip.clone()) {
        data["internal_ip"] = serde_json::Value::String(ip);
    }
    let blocks = host.and_then(|h| h.blocks).unwrap_or(fleet_blocks);
    data["blocks"] = serde_json::to_value(blocks).unwrap_or_default();
    Ok((format!("{hostname}:{port}"), data))
}

fn proxy_data(proxy: &SshProxy, home: &Path) -> serde_json::Value {
    serde_json::json!({
        "hostname": proxy.hostname,
        "port": proxy.port.unwrap_or(22),
        "user": proxy.user,
        "identity_file": expand_home(&proxy.identity_file, home),
    })
}

/// `~/…` against the user's home (`$HOME`), as the CLI does for identity files.
fn expand_home(path: &str, home: &Path) -> String {
    match path.strip_prefix("~/") {
        Some(rest) => home.join(rest).display().to_string(),
        None if path == "~" => home.display().to_string(),
        None => path.to_string(),
    }
}

fn host_key(instance: &Instance) -> Option<String> {
    let data = &instance.backend_data;
    Some(format!(
        "{}:{}",
        data.get("hostname")?.as_str()?,
        data.get("port")?.as_u64()?
    ))
}

/// The fleet's `env`, which every job on its hosts gets (bare names take this process's
/// values, as when the fleet is applied).
fn fleet_env(config: &FleetConfiguration) -> Result<BTreeMap<String, String>, EngineError> {
    use crate::config::env::EnvValue;
    let mut env = BTreeMap::new();
    for (name, value) in &config.env.0 {
        let value = match value {
            EnvValue::Value(v) => v.clone(),
            EnvValue::FromClient => std::env::var(name).map_err(|_| {
                EngineError::Invalid(format!(
                    "environment variable {name} is listed in the fleet's `env` without a value, \
                     and it is not set here"
                ))
            })?,
        };
        env.insert(name.clone(), value);
    }
    Ok(env)
}

/// The `blocks:` recorded for a host (a number, or `auto`; 1 when absent).
fn blocks_of(instance: &Instance) -> Blocks {
    match instance.backend_data.get("blocks") {
        Some(serde_json::Value::String(s)) if s == "auto" => Blocks::Auto,
        Some(v) => v.as_i64().map_or(Blocks::Count(1), Blocks::Count),
        None => Blocks::Count(1),
    }
}

/// The record of a fleet being applied: `submitted`, keeping the id and creation time of an
/// earlier fleet of the same name (names are unique in the store).
pub(super) fn submitted_fleet(
    existing: Option<&Fleet>,
    name: &str,
    configuration: &Configuration,
) -> Fleet {
    Fleet {
        id: existing.map_or_else(|| uuid::Uuid::new_v4().to_string(), |f| f.id.clone()),
        name: name.to_string(),
        status: FleetStatus::Submitted,
        configuration: Some(configuration.to_json()),
        created_at_ms: existing.map_or_else(now_ms, |f| f.created_at_ms),
        status_message: None,
        consolidation: None,
    }
}

fn user_home() -> std::path::PathBuf {
    std::env::var_os("HOME").map_or_else(|| "/".into(), Into::into)
}

impl Inner {
    /// Applies a fleet configuration (see the module docs); returns the fleet and its live
    /// instances. `progress` hears every step of every host.
    pub(crate) async fn apply_fleet(
        self: &Arc<Self>,
        configuration: &Configuration,
        progress: Progress<'_>,
    ) -> Result<(Fleet, Vec<Instance>), EngineError> {
        let Configuration::Fleet(config) = configuration else {
            return Err(EngineError::Invalid(format!(
                "a {} configuration is not a fleet",
                configuration.type_name()
            )));
        };
        refuse_unsupported(configuration)?;
        if config.ssh_config.is_none() && config.nodes.is_some() {
            return self
                .apply_backend_fleet(config, configuration, progress)
                .await;
        }
        let env = fleet_env(config)?;
        let (fleet, wanted) = self.record_fleet(config, configuration, &env)?;
        let mut deployments = Vec::new();
        for instance in wanted {
            deployments.push(self.deploy(instance, &env, progress));
        }
        let deployed = futures_util::future::join_all(deployments).await;
        let joined: Vec<Instance> = deployed
            .into_iter()
            .filter(|i| i.status == InstanceStatus::Idle)
            .collect();
        let mut fleet = fleet;
        fleet.status = if joined.is_empty() {
            FleetStatus::Failed
        } else {
            FleetStatus::Active
        };
        self.store.put_fleet(&fleet)?;
        let live = self.fleet_instances(&fleet.id)?;
        self.watch_instances();
        self.wake_scheduler();
        Ok((fleet, live))
    }

    /// Records the fleet and the instances to deploy (hosts that have not joined yet), and
    /// terminates instances of hosts no longer listed.
    fn record_fleet(
        &self,
        config: &FleetConfiguration,
        configuration: &Configuration,
        env: &BTreeMap<String, String>,
    ) -> Result<(Fleet, Vec<Instance>), EngineError> {
        let ssh = config.ssh_config.as_ref().ok_or_else(|| {
            EngineError::Invalid(
                "a fleet needs `ssh_config` (your hosts) or `nodes` (cloud instances)".to_string(),
            )
        })?;
        if self.backend(SSH_BACKEND).is_none() {
            return Err(EngineError::Unsupported(
                "this build has no SSH backend (cargo feature `ssh` of dstack-backends)"
                    .to_string(),
            ));
        }
        let name = self.fleet_name(config)?;
        let home = user_home();
        let mut hosts = BTreeMap::new();
        for entry in &ssh.hosts {
            let (key, mut data) =
                host_data(ssh, entry, config.blocks, &home).map_err(EngineError::Invalid)?;
            if !env.is_empty() {
                data["env"] = serde_json::to_value(env).unwrap_or_default();
            }
            if hosts.insert(key.clone(), data).is_some() {
                return Err(EngineError::Invalid(format!("host {key} is listed twice")));
            }
        }
        let fleets = self.store.fleets()?;
        let existing = fleets.iter().find(|f| f.name == name).cloned();
        let instances = self.store.instances()?;
        let live = |i: &&Instance| i.status != InstanceStatus::Terminated;
        for other in instances.iter().filter(live) {
            let Some(key) = host_key(other) else { continue };
            let own = existing.as_ref().is_some_and(|f| f.id == other.fleet_id);
            if hosts.contains_key(&key) && !own {
                let owner = fleets.iter().find(|f| f.id == other.fleet_id);
                let owner = owner.map_or("another fleet", |f| f.name.as_str());
                return Err(EngineError::Invalid(format!(
                    "host {key} already belongs to fleet {owner}"
                )));
            }
        }
        let fleet = submitted_fleet(existing.as_ref(), &name, configuration);
        self.store.put_fleet(&fleet)?;
        let own: Vec<&Instance> = instances
            .iter()
            .filter(|i| i.fleet_id == fleet.id)
            .filter(live)
            .collect();
        for gone in own
            .iter()
            .filter(|i| host_key(i).is_none_or(|k| !hosts.contains_key(&k)))
        {
            let mut gone = (*gone).clone();
            gone.status = InstanceStatus::Terminating;
            self.store.put_instance(&gone)?;
        }
        let mut taken: Vec<String> = instances
            .iter()
            .filter(|i| i.fleet_id == fleet.id)
            .map(|i| i.name.clone())
            .collect();
        let mut wanted = Vec::new();
        for (key, data) in hosts {
            let current = own
                .iter()
                .find(|i| host_key(i).as_deref() == Some(key.as_str()));
            if let Some(current) =
                current.filter(|i| matches!(i.status, InstanceStatus::Idle | InstanceStatus::Busy))
            {
                let _ = current; // joined already: kept as it is
                continue;
            }
            let num = (0..)
                .find(|n| !taken.contains(&format!("{name}-{n}")))
                .unwrap_or(0);
            let instance_name = format!("{name}-{num}");
            taken.push(instance_name.clone());
            let internal_ip = data
                .get("internal_ip")
                .and_then(|v| v.as_str())
                .map(str::to_string);
            let hostname = data
                .get("hostname")
                .and_then(|v| v.as_str())
                .map(str::to_string);
            let instance = Instance {
                id: current.map_or_else(|| uuid::Uuid::new_v4().to_string(), |i| i.id.clone()),
                name: current.map_or(instance_name, |i| i.name.clone()),
                fleet_id: fleet.id.clone(),
                backend: SSH_BACKEND.to_string(),
                status: InstanceStatus::Pending,
                host: Default::default(),
                price: 0.0,
                backend_data: data,
                created_at_ms: now_ms(),
                address: internal_ip.or(hostname),
                session: None,
                status_message: None,
                unreachable: false,
                unreachable_since_ms: None,
                offer: None,
                idle_timeout_secs: None,
                last_job_at_ms: None,
                cloud_id: None,
                attempts: Vec::new(),
                blocks: None,
                containers: false,
            };
            self.store.put_instance(&instance)?;
            wanted.push(instance);
        }
        Ok((fleet, wanted))
    }

    /// The fleet's name, checked.
    pub(super) fn fleet_name(&self, config: &FleetConfiguration) -> Result<String, EngineError> {
        let name = config
            .name
            .clone()
            .ok_or_else(|| EngineError::Invalid("a fleet needs a `name`".to_string()))?;
        if !super::names::is_valid(&name) || name == "local" {
            return Err(EngineError::Invalid(format!(
                "invalid fleet name `{name}`: use 2-41 characters of a-z, 0-9 and -, starting \
                 with a letter (`local` is the implicit fleet of this machine)"
            )));
        }
        Ok(name)
    }

    /// Deploys one host; returns its instance as recorded afterwards.
    pub(super) async fn deploy(
        &self,
        mut instance: Instance,
        env: &BTreeMap<String, String>,
        progress: Progress<'_>,
    ) -> Instance {
        instance.status = InstanceStatus::Provisioning;
        let _ = self.store.put_instance(&instance);
        progress(&instance, "connecting and installing the agent");
        let result = match self.backend(&instance.backend) {
            Some(backend) => backend.deploy(&instance).await,
            None => Err(crate::backend::ComputeError::NotSupported(format!(
                "backend {} is not configured",
                instance.backend
            ))),
        };
        let result = result.and_then(|deployed| {
            let blocks = blocks_of(&instance);
            let count = crate::offers::block_count(blocks, &deployed.host)
                .map_err(crate::backend::ComputeError::NotSupported)?;
            Ok((deployed, count))
        });
        match result {
            Ok((deployed, blocks)) => {
                instance.blocks = Some(blocks);
                instance.containers = deployed.containers;
                instance.host = deployed.host;
                instance.backend_data = deployed.backend_data;
                let mut session = deployed.session;
                session.env.extend(env.clone());
                instance.session = Some(session);
                instance.status = InstanceStatus::Idle;
                instance.status_message = deployed.note;
                progress(&instance, "ready");
            }
            Err(e) => {
                instance.status = InstanceStatus::Terminated;
                instance.status_message = Some(e.to_string());
                progress(&instance, &format!("failed: {e}"));
            }
        }
        self.agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&instance.id);
        if let Err(e) = self.store.put_instance(&instance) {
            progress(&instance, &format!("cannot record the host: {e}"));
        }
        instance
    }

    pub(super) fn fleet_instances(&self, fleet_id: &str) -> Result<Vec<Instance>, EngineError> {
        Ok(self
            .store
            .instances()?
            .into_iter()
            .filter(|i| i.fleet_id == fleet_id && i.status != InstanceStatus::Terminated)
            .collect())
    }

    /// Deletes a fleet (`instance_nums` empty), or only those instances of it: refuses
    /// while runs use what is deleted (unless `force`), then stops each host's agent and
    /// removes what was installed (terminates cloud instances). A host that cannot be reached
    /// is still marked terminated; its error is returned in the list. A fleet is terminated
    /// with its last instance only when deleted whole.
    pub(crate) async fn delete_fleet(
        self: &Arc<Self>,
        name: &str,
        instance_nums: &[u64],
        force: bool,
    ) -> Result<(Fleet, Vec<(Instance, Option<String>)>), EngineError> {
        if name == "local" {
            return Err(EngineError::Invalid(
                "the `local` fleet is this machine; it cannot be deleted".to_string(),
            ));
        }
        let mut fleet = self
            .store
            .fleets()?
            .into_iter()
            .find(|f| f.name == name && f.status != FleetStatus::Terminated)
            .ok_or_else(|| EngineError::Invalid(format!("no fleet named {name}")))?;
        let live: Vec<Instance> = self
            .store
            .instances()?
            .into_iter()
            .filter(|i| i.fleet_id == fleet.id && i.status != InstanceStatus::Terminated)
            .collect();
        let instances = deleted_instances(name, live, instance_nums)?;
        let busy = self
            .store
            .jobs_with_status(JobStatus::HOLDING)?
            .into_iter()
            .filter(|j| {
                instances
                    .iter()
                    .any(|i| j.instance_id.as_deref() == Some(i.id.as_str()))
            })
            .count();
        if busy > 0 && !force {
            return Err(EngineError::Invalid(format!(
                "fleet {name} has {busy} job(s) running on what would be deleted; stop them \
                 first or delete with force"
            )));
        }
        let whole = instance_nums.is_empty();
        if whole {
            fleet.status = FleetStatus::Terminating;
            self.store.put_fleet(&fleet)?;
        }
        let mut results = Vec::new();
        for mut instance in instances {
            instance.status = InstanceStatus::Terminating;
            self.store.put_instance(&instance)?;
            let error = match self.backend(&instance.backend) {
                Some(backend) => backend
                    .terminate_instance(&instance)
                    .await
                    .err()
                    .map(|e| e.to_string()),
                None => Some(format!("backend {} is not configured", instance.backend)),
            };
            instance.status = InstanceStatus::Terminated;
            instance.status_message = error.clone();
            self.store.put_instance(&instance)?;
            self.agents
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&instance.id);
            results.push((instance, error));
        }
        if whole {
            fleet.status = FleetStatus::Terminated;
            self.store.put_fleet(&fleet)?;
        }
        self.watch_instances();
        Ok((fleet, results))
    }
}

/// The instances of fleet `name` (its `live` ones) that deleting `nums` deletes: all of them
/// when `nums` is empty; an error names a number the fleet has no live instance of.
fn deleted_instances(
    name: &str,
    live: Vec<Instance>,
    nums: &[u64],
) -> Result<Vec<Instance>, EngineError> {
    if let Some(missing) = nums.iter().find(|n| !live.iter().any(|i| i.num() == **n)) {
        return Err(EngineError::Invalid(format!(
            "fleet {name} has no instance {missing}; see `dstack fleet get {name}`"
        )));
    }
    Ok(live
        .into_iter()
        .filter(|i| nums.is_empty() || nums.contains(&i.num()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_are_deleted_by_number_or_all() {
        let instance = |n: u64| Instance::for_tests(&format!("f-{n}"), "ssh");
        let live = || vec![instance(0), instance(1), instance(2)];
        let names = |v: Vec<Instance>| v.into_iter().map(|i| i.name).collect::<Vec<_>>();
        assert_eq!(names(deleted_instances("f", live(), &[]).unwrap()).len(), 3);
        assert_eq!(
            names(deleted_instances("f", live(), &[2, 0]).unwrap()),
            ["f-0", "f-2"]
        );
        let e = deleted_instances("f", live(), &[1, 7])
            .unwrap_err()
            .to_string();
        assert!(e.contains("no instance 7"), "{e}");
    }

    /// A host's port, user, key, jump host and internal address reach the data the engine
    /// connects with; the host's own settings win over the fleet's.
    #[test]
    fn ssh_settings_of_the_fleet_and_its_hosts_reach_the_connection_data() {
        let text = "type: fleet\nname: f\nssh_config:\n  user: ubuntu\n  port: 2222\n  \
                    identity_file: ~/.ssh/id\n  proxy_jump:\n    hostname: bastion\n    \
                    user: jump\n    port: 2022\n    identity_file: ~/.ssh/jump\n  hosts:\n    \
                    - hostname: 10.0.0.1\n      user: root\n      port: 22\n      \
                    identity_file: /k\n      internal_ip: 192.168.0.1\n      blocks: 2\n    \
                    - 10.0.0.2\n";
        let Configuration::Fleet(fleet) = crate::config::parse(text, "f.yml").unwrap() else {
            unreachable!()
        };
        let ssh = fleet.ssh_config.as_ref().unwrap();
        let home = Path::new("/home/me");
        let (key, first) = host_data(ssh, &ssh.hosts[0], Blocks::Count(1), home).unwrap();
        assert_eq!(key, "10.0.0.1:22");
        assert_eq!(first["user"], "root");
        assert_eq!(first["identity_file"], "/k");
        assert_eq!(first["internal_ip"], "192.168.0.1");
        assert_eq!(first["blocks"], 2);
        assert_eq!(first["proxy_jump"]["hostname"], "bastion");
        assert_eq!(first["proxy_jump"]["port"], 2022);
        assert_eq!(first["proxy_jump"]["user"], "jump");
        assert_eq!(first["proxy_jump"]["identity_file"], "/home/me/.ssh/jump");
        let (key, second) = host_data(ssh, &ssh.hosts[1], Blocks::Count(1), home).unwrap();
        assert_eq!(key, "10.0.0.2:2222");
        assert_eq!(second["user"], "ubuntu");
        assert_eq!(second["identity_file"], "/home/me/.ssh/id");
        assert_eq!(second["blocks"], 1);
    }
}
