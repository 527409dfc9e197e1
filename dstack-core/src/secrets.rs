//! Secrets (`dstack secret set|list|get|delete`): values kept apart from the state database,
//! in `$DSTACK_HOME/secrets.json` (0600, rewritten whole through a private temporary file
//! under an exclusive lock), and referenced from configurations as `${{ secrets.NAME }}` in
//! `env` values and `registry_auth`. References are resolved only when a job is handed to its
//! agent ([`substitute`]); the run's stored configuration keeps the reference, never
//! the value.
//!
//! A registry password written in clear in a configuration is moved here at apply, under a
//! name of the run's ([`Secrets::keep_for_run`]), so that neither the state database nor any
//! output holds it.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::config::interpolate::{interpolate, InterpolationError, Lookup};
use crate::repos::RepoCreds;

/// What a redacted value is printed as.
pub const REDACTED: &str = "********";

/// The longest secret name accepted.
pub const MAX_NAME_LEN: usize = 200;
/// The largest secret value accepted.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// The largest secrets file read.
const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// Names of values the project keeps for itself start so; users cannot set such names, and
/// `list` does not show them.
const RESERVED_PREFIX: &str = "__dstack_";
/// Names of values kept for runs start so ([`Secrets::keep_for_run`]).
const RUN_PREFIX: &str = "__dstack_run_";
/// Names of repo credentials start so ([`Secrets::keep_repo_creds`]).
const REPO_PREFIX: &str = "__dstack_repo_";

/// A secret operation that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// A name that is not `[A-Za-z_][A-Za-z0-9_]*` (at most [`MAX_NAME_LEN`]), or a reserved
    /// one.
    #[error("invalid secret name '{0}': use letters, digits and underscores, starting with a letter or underscore (at most {MAX_NAME_LEN} characters)")]
    InvalidName(String),
    /// A value over [`MAX_VALUE_BYTES`].
    #[error("the value of secret {0} is larger than {MAX_VALUE_BYTES} bytes")]
    TooLarge(String),
    /// References that cannot be resolved (missing secrets, bad syntax).
    #[error("secrets interpolation error: {0}")]
    Interpolation(#[from] InterpolationError),
    /// The secrets file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        #[source]
        source: io::Error,
    },
}

/// The secrets of a state directory.
#[derive(Debug, Clone)]
pub struct Secrets {
    path: PathBuf,
}

impl Secrets {
    /// `<home>/secrets.json`.
    pub fn in_home(home: &Path) -> Self {
        Secrets {
            path: home.join("secrets.json"),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets (creates or replaces) a secret.
    pub fn set(&self, name: &str, value: &str) -> Result<(), SecretError> {
        check_name(name)?;
        if value.len() > MAX_VALUE_BYTES {
            return Err(SecretError::TooLarge(name.to_string()));
        }
        self.change(|all| {
            all.insert(name.to_string(), value.to_string());
        })
    }

    /// A secret's value.
    pub fn get(&self, name: &str) -> Result<Option<String>, SecretError> {
        Ok(self.read()?.remove(name))
    }

    /// The names of the user's secrets, sorted (values kept for runs are not listed).
    pub fn names(&self) -> Result<Vec<String>, SecretError> {
        Ok(self
            .read()?
            .into_keys()
            .filter(|n| !n.starts_with(RESERVED_PREFIX))
            .collect())
    }

    /// Deletes a secret; returns whether it existed.
    pub fn delete(&self, name: &str) -> Result<bool, SecretError> {
        let mut existed = false;
        self.change(|all| existed = all.remove(name).is_some())?;
        Ok(existed)
    }

    /// Keeps `value` (a credential written in clear in run `run_id`'s configuration) and
    /// returns the reference that replaces it in the stored configuration.
    pub fn keep_for_run(
        &self,
        run_id: &str,
        field: &str,
        value: &str,
    ) -> Result<String, SecretError> {
        let id: String = run_id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        let name = format!("{RUN_PREFIX}{id}_{field}");
        self.change(|all| {
            all.insert(name.clone(), value.to_string());
        })?;
        Ok(format!("${{{{ secrets.{name} }}}}"))
    }

    /// Keeps the credentials of the repo at `url` (`dstack init`), replacing any it had;
    /// empty credentials forget them.
    pub fn keep_repo_creds(&self, url: &str, creds: &RepoCreds) -> Result<(), SecretError> {
        let name = repo_creds_name(url);
        let value = serde_json::to_string(creds).unwrap_or_default();
        self.change(|all| {
            all.remove(&name);
            if !creds.is_empty() {
                all.insert(name, value);
            }
        })
    }

    /// Every secret, by name (what [`substitute`] resolves references from).
    pub fn values(&self) -> Result<BTreeMap<String, String>, SecretError> {
        self.read()
    }

    fn io(&self, source: io::Error) -> SecretError {
        SecretError::Io {
            path: self.path.display().to_string(),
            source,
        }
    }

    fn read(&self) -> Result<BTreeMap<String, String>, SecretError> {
        let file = match File::open(&self.path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            other => other.map_err(|e| self.io(e))?,
        };
        let len = file.metadata().map_err(|e| self.io(e))?.len();
        if len > MAX_FILE_BYTES {
            return Err(self.io(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("larger than {MAX_FILE_BYTES} bytes"),
            )));
        }
        serde_json::from_reader(io::BufReader::new(file))
            .map_err(|e| self.io(io::Error::new(io::ErrorKind::InvalidData, e)))
    }

    /// Reads, changes and rewrites the file under an exclusive lock (a sibling lock file:
    /// the file itself is replaced by a rename).
    fn change(&self, edit: impl FnOnce(&mut BTreeMap<String, String>)) -> Result<(), SecretError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| self.io(e))?;
        let lock = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .mode(0o600)
            .open(self.path.with_extension("lock"))
            .map_err(|e| self.io(e))?;
        lock.lock().map_err(|e| self.io(e))?;
        let mut all = self.read()?;
        edit(&mut all);
        let text = serde_json::to_vec_pretty(&all).map_err(|e| self.io(io::Error::other(e)))?;
        crate::files::replace_private(&self.path, &text).map_err(|e| self.io(e))
    }
}

/// `text` with its `${{ secrets.NAME }}` references replaced by the values in `secrets` and
/// its `${{ env.NAME }}` references by the variables in `env`, where given; other references
/// (and a namespace not given) stay as written. A missing name is an error naming it (never a
/// value).
pub fn substitute(
    text: &str,
    secrets: Option<&BTreeMap<String, String>>,
    env: Option<&BTreeMap<String, String>>,
) -> Result<String, InterpolationError> {
    if !text.contains("${{") {
        return Ok(text.to_string());
    }
    let find = |values: &BTreeMap<String, String>, name: &str| {
        values
            .get(name)
            .map_or(Lookup::Missing, |v| Lookup::Value(v.clone()))
    };
    interpolate(text, |namespace, name| match (namespace, secrets, env) {
        ("secrets", Some(values), _) | ("env", _, Some(values)) => find(values, name),
        _ => Lookup::Keep,
    })
}

/// Redacts a run configuration as printed (`validate --json`, `ps --json`): a registry
/// password that is more than references to secrets or variables.
pub fn redact_configuration(config: &mut serde_json::Value) {
    if let Some(password) = config.pointer_mut("/registry_auth/password") {
        if password
            .as_str()
            .is_some_and(|p| !crate::config::interpolate::only_references(p))
        {
            *password = serde_json::Value::from(REDACTED);
        }
    }
}

/// Redacts a run record as printed (`ps --json`): its configuration (see
/// [`redact_configuration`]) and the values of the client's variables it captured (variables
/// listed bare in `env` are often tokens).
pub fn redact_run(run: &mut serde_json::Value) {
    if let Some(config) = run.pointer_mut("/spec/configuration") {
        redact_configuration(config);
    }
    if let Some(serde_json::Value::Object(env)) = run.pointer_mut("/spec/client_env") {
        for value in env.values_mut() {
            *value = serde_json::Value::from(REDACTED);
        }
    }
}

/// The name the credentials of the repo at `url` are kept under.
fn repo_creds_name(url: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(crate::repos::repo_id(url).as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{REPO_PREFIX}{hex}")
}

/// The credentials `dstack init` registered for the repo at `url`, from every secret
/// (`values`, as [`Secrets::values`] gives them).
pub fn repo_creds(values: &BTreeMap<String, String>, url: &str) -> Option<RepoCreds> {
    let value = values.get(&repo_creds_name(url))?;
    serde_json::from_str(value).ok()
}

fn check_name(name: &str) -> Result<(), SecretError> {
    let valid = name.len() <= MAX_NAME_LEN
        && !name.starts_with(RESERVED_PREFIX)
        && crate::config::interpolate::is_identifier(name);
    if valid {
        Ok(())
    } else {
        Err(SecretError::InvalidName(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn set_get_list_delete_privately() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = Secrets::in_home(dir.path());
        assert_eq!(secrets.get("token").unwrap(), None);
        secrets.set("token", "s3cr3t").unwrap();
        secrets.set("other", "x").unwrap();
        assert_eq!(secrets.get("token").unwrap().as_deref(), Some("s3cr3t"));
        assert_eq!(secrets.names().unwrap(), vec!["other", "token"]);
        let mode = fs::metadata(secrets.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(secrets.delete("token").unwrap());
        assert!(!secrets.delete("token").unwrap());
        assert_eq!(secrets.names().unwrap(), vec!["other"]);
        for bad in ["", "a-b", "1a", "a.b", "__dstack_run_x"] {
            assert!(
                matches!(secrets.set(bad, "v"), Err(SecretError::InvalidName(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn references_resolve_to_values_and_missing_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = Secrets::in_home(dir.path());
        secrets.set("token", "s3cr3t").unwrap();
        let values = secrets.values().unwrap();
        let env = BTreeMap::from([("USER_NAME".to_string(), "me".to_string())]);
        let text = "Bearer ${{ secrets.token }} ${{ env.USER_NAME }}";
        assert_eq!(
            substitute(text, Some(&values), Some(&env)).unwrap(),
            "Bearer s3cr3t me"
        );
        assert_eq!(
            substitute(text, Some(&values), None).unwrap(),
            "Bearer s3cr3t ${{ env.USER_NAME }}"
        );
        assert_eq!(
            substitute(text, None, Some(&env)).unwrap(),
            "Bearer ${{ secrets.token }} me"
        );
        let err = substitute("${{ secrets.nope }}", Some(&values), None).unwrap_err();
        assert_eq!(err.to_string(), "missing secrets.nope");
    }

    #[test]
    fn printed_runs_hold_no_password_or_client_variable() {
        let mut run = serde_json::json!({"spec": {
            "configuration": {"registry_auth": {"username": "u", "password": "hunter2"}},
            "client_env": {"HF_TOKEN": "hf_abc"}
        }});
        redact_run(&mut run);
        let text = run.to_string();
        assert!(
            !text.contains("hunter2") && !text.contains("hf_abc"),
            "{text}"
        );
        assert!(text.contains("HF_TOKEN"));
        let mut referenced =
            serde_json::json!({"registry_auth": {"password": "${{ secrets.ngc }}"}});
        redact_configuration(&mut referenced);
        assert_eq!(
            referenced["registry_auth"]["password"],
            "${{ secrets.ngc }}"
        );
    }

    #[test]
    fn values_kept_for_runs_are_resolved_and_not_listed() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = Secrets::in_home(dir.path());
        let reference = secrets
            .keep_for_run("0190-ab-cd", "registry_password", "hunter2")
            .unwrap();
        let resolve = || substitute(&reference, Some(&secrets.values().unwrap()), None);
        assert_eq!(resolve().unwrap(), "hunter2");
        assert!(secrets.names().unwrap().is_empty());
    }
}
