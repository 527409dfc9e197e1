//! dstack's `profiles.yml`: named profile parameters (`profiles: [{name, default, …}]`) that a
//! run configuration takes for the parameters it leaves unset — the profile `dstack apply
//! --profile NAME` names, else the one marked `default: true` (none with `--no-profile`).
//! Looked up in `.dstack/profiles.yml` of the directory applied from, then in
//! `~/.dstack/profiles.yml`, as dstack does.

use std::path::{Path, PathBuf};

use dstack_core::config::{self, yaml, Configuration};
use serde_json::Value;

/// One profile and the file it comes from.
#[derive(Debug)]
pub struct Profile {
    /// The file (for messages).
    file: String,
    /// Its fields as written (`name`, `default` and profile parameters).
    fields: Value,
}

/// dstack's profile flags (`dstack apply`, `dstack offer`).
#[derive(clap::Args, Default)]
pub struct ProfileArgs {
    /// The profile of `profiles.yml` (`.dstack/profiles.yml` here, then in the home
    /// directory) whose parameters fill those the configuration leaves unset; by default the
    /// one marked `default: true`.
    #[arg(
        long,
        value_name = "NAME",
        help_heading = "Profile",
        conflicts_with = "no_profile"
    )]
    profile: Option<String>,
    /// Use no profile, not even the default one.
    #[arg(long, help_heading = "Profile")]
    no_profile: bool,
}

impl ProfileArgs {
    /// `configuration` with the chosen profile's parameters where it has none (unchanged
    /// with `--no-profile` or when there is no profile).
    pub fn apply(&self, configuration: Configuration) -> Result<Configuration, crate::Failure> {
        if self.no_profile {
            return Ok(configuration);
        }
        let here = std::env::current_dir().map_err(|e| crate::Failure::new(e.to_string()))?;
        match choose(&files(&here), self.profile.as_deref()).map_err(crate::Failure::new)? {
            Some(profile) => apply(configuration, &profile).map_err(crate::Failure::new),
            None => Ok(configuration),
        }
    }
}

/// The profile files, most specific first: the directory applied from, then the home's.
pub fn files(applied_from: &Path) -> Vec<PathBuf> {
    let mut files = vec![applied_from.join(".dstack/profiles.yml")];
    if let Some(home) = std::env::var_os("HOME") {
        files.push(PathBuf::from(home).join(".dstack/profiles.yml"));
    }
    files
}

/// The profile that applies: `name`'s (an error when no file has it), else the first marked
/// `default: true`, else none.
pub fn choose(files: &[PathBuf], name: Option<&str>) -> Result<Option<Profile>, String> {
    let mut all = Vec::new();
    for file in files {
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("{}: {e}", file.display())),
        };
        all.extend(read(&text, &file.display().to_string())?);
    }
    let found = match name {
        Some(name) => all
            .into_iter()
            .find(|p| p.fields.get("name").and_then(Value::as_str) == Some(name))
            .map(Some)
            .ok_or_else(|| {
                let looked: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
                format!("no profile {name} in {}", looked.join(" or "))
            })?,
        None => all
            .into_iter()
            .find(|p| p.fields.get("default") == Some(&Value::Bool(true))),
    };
    Ok(found)
}

/// The profiles of a `profiles.yml` text.
fn read(text: &str, file: &str) -> Result<Vec<Profile>, String> {
    let root = yaml::load(text).map_err(|e| format!("{file}: {}", e.message))?;
    let listed = root.to_json();
    let Some(profiles) = listed.get("profiles").and_then(Value::as_array) else {
        return Err(format!("{file}: expected `profiles:`, a list of profiles"));
    };
    profiles
        .iter()
        .enumerate()
        .map(|(i, fields)| {
            if fields.get("name").and_then(Value::as_str).is_none() {
                return Err(format!("{file}: profiles[{i}]: a profile needs a `name`"));
            }
            Ok(Profile {
                file: file.to_string(),
                fields: fields.clone(),
            })
        })
        .collect()
}

/// `configuration` with `profile`'s parameters where it leaves them unset (its own win);
/// refused for configurations that are not runs, and located in the profile's file when a
/// value is not valid.
pub fn apply(configuration: Configuration, profile: &Profile) -> Result<Configuration, String> {
    if !matches!(
        configuration,
        Configuration::Task(_) | Configuration::Service(_) | Configuration::DevEnvironment(_)
    ) {
        return Ok(configuration);
    }
    let mut value = configuration.to_json();
    dstack_core::api::merge_profile(&mut value, &profile.fields, "")
        .map_err(|e| format!("{}: {e}", profile.file))?;
    config::parse_value(&value, &profile.file).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(extra: &str) -> Configuration {
        config::parse(&format!("type: task\ncommands: [x]\n{extra}"), "t.yml").unwrap()
    }

    #[test]
    fn a_named_or_default_profile_fills_what_the_configuration_leaves_unset() {
        let dir = tempfile::tempdir().unwrap();
        let (near, far) = (dir.path().join("near.yml"), dir.path().join("far.yml"));
        std::fs::write(
            &near,
            "profiles:\n  - name: cheap\n    max_price: 0.5\n    spot_policy: spot\n",
        )
        .unwrap();
        std::fs::write(
            &far,
            "profiles:\n  - name: cheap\n    max_price: 9\n  - name: usual\n    default: true\n    max_duration: 1h\n",
        )
        .unwrap();
        let files = [near, far, dir.path().join("missing.yml")];

        let cheap = choose(&files, Some("cheap")).unwrap().unwrap();
        let Configuration::Task(t) = apply(task("spot_policy: on-demand\n"), &cheap).unwrap()
        else {
            panic!("a task")
        };
        assert_eq!(
            t.common.profile.max_price,
            Some(0.5),
            "the nearer file wins"
        );
        assert_eq!(
            t.common.profile.spot_policy.map(|p| p.as_str()),
            Some("on-demand"),
            "the configuration's own value wins"
        );
        let usual = choose(&files, None).unwrap().unwrap();
        let Configuration::Task(t) = apply(task(""), &usual).unwrap() else {
            panic!("a task")
        };
        assert!(t.common.profile.max_duration.is_some());

        let missing = choose(&files, Some("nope")).unwrap_err();
        assert!(missing.contains("no profile nope in"), "{missing}");
        assert!(choose(&files[2..], None).unwrap().is_none());
    }

    #[test]
    fn bad_profiles_are_refused_naming_their_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("profiles.yml");
        std::fs::write(&file, "profiles:\n  - name: odd\n    max_prize: 1\n").unwrap();
        let odd = choose(std::slice::from_ref(&file), Some("odd"))
            .unwrap()
            .unwrap();
        let err = apply(task(""), &odd).unwrap_err();
        assert!(
            err.contains("profiles.yml") && err.contains("max_prize"),
            "{err}"
        );
        std::fs::write(&file, "profiles:\n  - max_price: 1\n").unwrap();
        let err = choose(&[file], None).unwrap_err();
        assert!(
            err.contains("profiles[0]: a profile needs a `name`"),
            "{err}"
        );
    }
}
