//! Updating a service in place, as dstack does for `dstack apply` of a changed configuration
//! with the name of a running service. A change of what replicas run (dstack's updatable
//! fields: `port`, `probes`, `resources`, `commands`, `env`, `image`, …) starts a new
//! deployment (`Run::deployment_num`); `replicas`, `scaling` and `priority` change in place
//! without one; any other change is refused, naming the fields. The rollout itself is driven
//! by `dstack server`, which knows when a replica is ready: [`step`] is its decision (one new
//! replica at a time, an old one retired each time a new one is ready, so that the ready
//! count never drops below the target).

use std::sync::Arc;

use super::{scaling, ApplyOptions, EngineError, Inner};
use crate::config::Configuration;
use crate::model::{Job, Run, RunStatus};

/// Fields whose change starts a new deployment (dstack's updatable fields of a service).
const REDEPLOYED: &[&str] = &[
    "port",
    "probes",
    "resources",
    "volumes",
    "docker",
    "files",
    "image",
    "user",
    "privileged",
    "entrypoint",
    "working_dir",
    "python",
    "nvcc",
    "single_branch",
    "env",
    "shell",
    "commands",
    "repos",
];

/// Fields that change in place without a new deployment.
const IN_PLACE: &[&str] = &["replicas", "scaling", "priority"];

/// What an update changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Nothing.
    Nothing,
    /// Only the replica count or scaling (and `priority`).
    InPlace,
    /// What the replicas run: a new deployment.
    Redeploy,
}

/// What changing configuration `old` to `new` (both as JSON objects) means; the names of
/// the fields that cannot change in place, if any do.
pub fn change(old: &serde_json::Value, new: &serde_json::Value) -> Result<Change, Vec<String>> {
    let empty = serde_json::Map::new();
    let (old, new) = (
        old.as_object().unwrap_or(&empty),
        new.as_object().unwrap_or(&empty),
    );
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    let changed: Vec<&str> = keys
        .into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .map(String::as_str)
        .collect();
    let refused: Vec<String> = changed
        .iter()
        .filter(|k| !REDEPLOYED.contains(k) && !IN_PLACE.contains(k))
        .map(|k| k.to_string())
        .collect();
    if !refused.is_empty() {
        return Err(refused);
    }
    Ok(if changed.iter().any(|k| REDEPLOYED.contains(k)) {
        Change::Redeploy
    } else if changed.is_empty() {
        Change::Nothing
    } else {
        Change::InPlace
    })
}

/// Applies `configuration` to the active service it names (see [`change`]).
pub(crate) async fn update(
    inner: &Arc<Inner>,
    configuration: Configuration,
    opts: ApplyOptions,
) -> Result<Run, EngineError> {
    let Configuration::Service(service) = &configuration else {
        return Err(EngineError::Invalid(
            "only services are updated in place; stop the run first".to_string(),
        ));
    };
    let name = opts
        .name
        .clone()
        .or_else(|| service.common.name.clone())
        .ok_or_else(|| EngineError::Invalid("name the service to update".to_string()))?;
    let replicas = super::scaling::initial_replicas(service);
    let fixed = service.scaling.is_none();
    for _ in 0..16 {
        let run = inner
            .store
            .run_by_name(&name)?
            .filter(|r| !r.status.is_finished())
            .ok_or_else(|| EngineError::Invalid(format!("no active run named {name}")))?;
        if run.status == RunStatus::Terminating {
            return Err(EngineError::Invalid(format!("run {name} is stopping")));
        }
        let old = run.spec.configuration().map_err(|e| {
            EngineError::Invalid(format!("stored configuration of run {name}: {e}"))
        })?;
        if !matches!(old, Configuration::Service(_)) {
            return Err(EngineError::Invalid(format!(
                "a run named `{name}` is still active and is not a service: only services are \
                 updated in place; stop it first or choose another name"
            )));
        }
        let (fresh, _, parsed) = inner.prepare_run(
            configuration.clone(),
            opts.clone(),
            &mut Vec::new(),
            Some(run.id.clone()),
        )?;
        let what = change(&old.to_json(), &parsed.to_json()).map_err(|fields| {
            EngineError::Invalid(format!(
                "run {name} cannot be updated in place: {} changed (a service may change {} \
                 in place); stop it first",
                fields.join(", "),
                [REDEPLOYED, IN_PLACE].concat().join(", ")
            ))
        })?;
        if what == Change::Nothing {
            return Ok(run);
        }
        let mut updated = run.clone();
        updated.spec = fresh.spec;
        if what == Change::Redeploy {
            updated.deployment_num += 1;
        }
        if !inner.store.update_run(&updated, &[run.status])? {
            continue; // the run changed meanwhile
        }
        inner
            .definitions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&run.id);
        inner.emit(&updated);
        if what == Change::InPlace && fixed {
            scaling::scale(inner, &run.id, replicas).await?;
        }
        return Ok(updated);
    }
    Err(EngineError::Invalid(format!(
        "run {name} keeps changing; try the update again"
    )))
}

/// One replica of a service in a rollout, as the proxy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RolloutReplica {
    /// Its job.
    pub job_id: String,
    /// Its replica number.
    pub replica_num: u32,
    /// The deployment it runs.
    pub deployment_num: u32,
    /// Whether it receives requests.
    pub ready: bool,
    /// Whether it has a host (a new replica without one waits for an old one's).
    pub placed: bool,
}

/// The next step of a rollout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Every replica runs the current deployment.
    Done,
    /// A new replica is starting: wait until it is ready.
    Wait,
    /// Start one more replica of the current deployment.
    Start,
    /// Retire this old replica (a new one is ready in its place).
    Retire(String),
}

/// The next step of rolling `replicas` (the active ones) over to `deployment`, keeping at
/// least `target` replicas ready: one new replica at a time; an old one retired each time
/// the ready new ones and the old ones are more than `target`, or when a new one finds no
/// host (on a host of their own, old and new replicas of a port cannot run side by side:
/// the old one goes first, and the proxy holds requests meanwhile). Called once a second, so
/// a new replica still without a host was started at least a second before.
pub fn step(deployment: u32, replicas: &[RolloutReplica], target: u32) -> Step {
    let old: Vec<&RolloutReplica> = replicas
        .iter()
        .filter(|r| r.deployment_num < deployment)
        .collect();
    if old.is_empty() {
        return Step::Done;
    }
    let new = replicas.len() - old.len();
    let new_ready = replicas
        .iter()
        .filter(|r| r.deployment_num >= deployment && r.ready)
        .count();
    let waiting_for_host = replicas
        .iter()
        .any(|r| r.deployment_num >= deployment && !r.placed);
    if new_ready + old.len() > target as usize || waiting_for_host {
        // Not ready ones first, then the highest replica number.
        let retired = old
            .iter()
            .min_by_key(|r| (r.ready, std::cmp::Reverse(r.replica_num)))
            .map(|r| r.job_id.clone())
            .unwrap_or_default();
        return Step::Retire(retired);
    }
    if new > new_ready {
        return Step::Wait;
    }
    Step::Start
}

/// The replicas of a service that take part in a rollout: the active ones (see
/// [`scaling::replica_count`]).
pub fn active_replicas(jobs: &[Job]) -> Vec<&Job> {
    scaling::active(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn changes_are_classified_as_dstack_updates_them() {
        let old = json!({"type": "service", "port": 80, "commands": ["a"], "replicas": {"min": 1, "max": 1}, "auth": true});
        let same = old.clone();
        assert_eq!(change(&old, &same), Ok(Change::Nothing));
        let mut cmd = old.clone();
        cmd["commands"] = json!(["b"]);
        assert_eq!(change(&old, &cmd), Ok(Change::Redeploy));
        let mut more = old.clone();
        more["replicas"] = json!({"min": 3, "max": 3});
        assert_eq!(change(&old, &more), Ok(Change::InPlace));
        let mut auth = cmd.clone();
        auth["auth"] = json!(false);
        auth["gateway"] = json!(false);
        assert_eq!(
            change(&old, &auth),
            Err(vec!["auth".to_string(), "gateway".to_string()])
        );
    }

    fn replica(job: &str, num: u32, deployment: u32, ready: bool) -> RolloutReplica {
        RolloutReplica {
            job_id: job.into(),
            replica_num: num,
            deployment_num: deployment,
            ready,
            placed: true,
        }
    }

    #[test]
    fn a_rollout_starts_one_replica_at_a_time_and_retires_one_old_per_ready_new_one() {
        let mut replicas = vec![replica("a", 0, 0, true), replica("b", 1, 0, true)];
        assert_eq!(step(1, &replicas, 2), Step::Start);
        replicas.push(replica("c", 2, 1, false));
        assert_eq!(step(1, &replicas, 2), Step::Wait);
        replicas[2].ready = true;
        assert_eq!(step(1, &replicas, 2), Step::Retire("b".into()));
        replicas.remove(1);
        assert_eq!(step(1, &replicas, 2), Step::Start);
        replicas.push(replica("d", 3, 1, true));
        assert_eq!(step(1, &replicas, 2), Step::Retire("a".into()));
        replicas.remove(0);
        assert_eq!(step(1, &replicas, 2), Step::Done);
    }

    #[test]
    fn an_old_replica_that_is_not_ready_goes_first() {
        let replicas = vec![
            replica("a", 0, 0, true),
            replica("b", 1, 0, false),
            replica("c", 2, 1, true),
        ];
        assert_eq!(step(1, &replicas, 2), Step::Retire("b".into()));
    }

    #[test]
    fn a_new_replica_without_a_host_makes_an_old_one_go_first() {
        let mut replicas = vec![replica("a", 0, 0, true)];
        assert_eq!(step(1, &replicas, 1), Step::Start);
        replicas.push(RolloutReplica {
            placed: false,
            ..replica("b", 1, 1, false)
        });
        assert_eq!(step(1, &replicas, 1), Step::Retire("a".into()));
        replicas.remove(0);
        replicas[0].placed = true;
        assert_eq!(step(1, &replicas, 1), Step::Done);
    }
}
