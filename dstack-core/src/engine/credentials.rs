//! Credentials in run configurations. At apply, `${{ env.NAME }}` in `registry_auth` is
//! resolved from the client's environment (as dstack's CLI does) and a registry password then
//! in clear is moved to the secrets (the stored configuration keeps a reference to it). When
//! a job is handed to its agent, `${{ secrets.NAME }}` in `env` values and `registry_auth`
//! is resolved (`command::job_submit`); nothing else ever holds the values.

use std::collections::BTreeMap;

use super::command::{self, CommandError};
use super::EngineError;
use crate::config::interpolate::only_references;
use crate::config::Configuration;
use crate::secrets::{substitute, Secrets};

/// Resolves the client's `${{ env.NAME }}` in `registry_auth` and moves a password in clear
/// to `secrets` (under a name of run `run_id`'s).
pub(crate) fn seal_registry_auth(
    config: &mut Configuration,
    run_id: &str,
    client_env: &BTreeMap<String, String>,
    secrets: Option<&Secrets>,
) -> Result<(), EngineError> {
    let Some(auth) = command::common_mut(config).and_then(|c| c.registry_auth.as_mut()) else {
        return Ok(());
    };
    for (field, value) in [
        ("username", &mut auth.username),
        ("password", &mut auth.password),
    ] {
        *value = substitute(value, None, Some(client_env))
            .map_err(|e| EngineError::Invalid(format!("registry_auth.{field}: {e}")))?;
    }
    if let Some(secrets) = secrets.filter(|_| !only_references(&auth.password)) {
        auth.password = secrets
            .keep_for_run(run_id, "registry_password", &auth.password)
            .map_err(|e| EngineError::Invalid(format!("registry_auth.password: {e}")))?;
    }
    Ok(())
}

/// Whether handing a job of `config` to its agent needs the secrets (some `env` value or
/// `registry_auth` field holds a reference, or a repo given by URL may have credentials
/// registered by `dstack init`).
pub(crate) fn needs_secrets(config: &Configuration) -> bool {
    use crate::config::env::EnvValue;
    if !matches!(
        config,
        Configuration::Task(_) | Configuration::Service(_) | Configuration::DevEnvironment(_)
    ) {
        return false;
    }
    let common = command::common(config);
    let referenced = |text: &str| text.contains("${{");
    common.env.0.values().any(|v| match v {
        EnvValue::Value(v) => referenced(v),
        EnvValue::FromClient => false,
    }) || common
        .registry_auth
        .as_ref()
        .is_some_and(|a| referenced(&a.username) || referenced(&a.password))
        || common.repos.iter().any(|r| r.url.is_some())
}

/// `text` with its `${{ secrets.NAME }}` references resolved from `secrets`; `what` names the
/// field in the error of a missing secret (the job then fails with it, as dstack's
/// "Secrets interpolation error").
pub(crate) fn resolve(
    text: &str,
    secrets: &BTreeMap<String, String>,
    what: &str,
) -> Result<String, CommandError> {
    substitute(text, Some(secrets), None)
        .map_err(|e| CommandError(format!("secrets interpolation error in {what}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    #[test]
    fn a_password_in_clear_is_kept_apart_and_the_client_variables_resolved() {
        let home = tempfile::tempdir().unwrap();
        let secrets = Secrets::in_home(home.path());
        let yaml = "type: task\nimage: private/image\nregistry_auth:\n  username: ${{ env.REG_USER }}\n  password: hunter2\ncommands: [\"true\"]\n";
        let mut config = parse(yaml, "t.dstack.yml").unwrap();
        let env = BTreeMap::from([("REG_USER".to_string(), "me".to_string())]);
        seal_registry_auth(&mut config, "run-1", &env, Some(&secrets)).unwrap();
        let stored = config.to_json().to_string();
        assert!(!stored.contains("hunter2"), "{stored}");
        let auth = command::common(&config).registry_auth.clone().unwrap();
        assert_eq!(auth.username, "me");
        assert!(needs_secrets(&config));
        let values = secrets.values().unwrap();
        assert_eq!(
            resolve(&auth.password, &values, "registry_auth.password").unwrap(),
            "hunter2"
        );

        // A reference to a secret stays a reference; a missing client variable is an error.
        let yaml = "type: task\nimage: i\nregistry_auth:\n  username: u\n  password: ${{ secrets.ngc }}\ncommands: [\"true\"]\n";
        let mut config = parse(yaml, "t.dstack.yml").unwrap();
        seal_registry_auth(&mut config, "run-2", &env, Some(&secrets)).unwrap();
        let auth = command::common(&config).registry_auth.clone().unwrap();
        assert_eq!(auth.password, "${{ secrets.ngc }}");
        let yaml = "type: task\nimage: i\nregistry_auth:\n  username: ${{ env.NOPE }}\n  password: p\ncommands: [\"true\"]\n";
        let mut config = parse(yaml, "t.dstack.yml").unwrap();
        let err = seal_registry_auth(&mut config, "run-3", &env, Some(&secrets)).unwrap_err();
        assert!(err
            .to_string()
            .contains("registry_auth.username: missing env.NOPE"));
    }
}
