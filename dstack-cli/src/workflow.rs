//! `dstack run WORKFLOW [--VAR VALUE…] [ARGS…]` and `dstack run PROVIDER …`: the workflows of
//! dstack's earlier documents (`.dstack/workflows.yaml`, see `dstack_core::config::workflows`),
//! each an ordinary run once submitted.

use std::collections::BTreeMap;
use std::path::Path;

use dstack_core::artifacts::TagRef;
use dstack_core::config::limits;
use dstack_core::config::run_args;
use dstack_core::config::workflows::{
    self, Dependency, Workflows, PROVIDERS, VARIABLES_FILE, WORKFLOWS_FILE,
};
use dstack_core::config::Configuration;
use dstack_core::engine::ApplyOptions;

use crate::apply::SubmitArgs;
use crate::Failure;

/// Arguments of `dstack run`.
#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    submit: SubmitArgs,
    /// A workflow of `.dstack/workflows.yaml` with its variables (`--NAME VALUE`, declared in
    /// `.dstack/variables.yaml`) and arguments, or a provider with its own: `python FILE
    /// ARGS…`, `bash COMMAND`, `docker IMAGE COMMAND…`, `streamlit|gradio|fastapi TARGET`,
    /// `lab`, `notebook`, `code` (`--gpu N` sets the GPU count).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "WORKFLOW|PROVIDER"
    )]
    words: Vec<String>,
}

/// `dstack run`: submits the run the words ask for, as `dstack apply` does (the words are
/// checked before the server is asked for).
pub async fn run(args: &RunArgs) -> Result<std::process::ExitCode, Failure> {
    let workflows = load(Path::new(""))?;
    let planned = plan(&args.words, workflows.as_ref())?;
    let (client, _) = crate::connect(true).await?;
    check_tags(&client, &planned.depends_on).await?;
    let base = ApplyOptions {
        workflow: planned.workflow,
        artifacts: planned.artifacts,
        depends_on: planned.depends_on.into_iter().map(|d| d.tag).collect(),
        ..ApplyOptions::default()
    };
    crate::apply::submit(
        &client,
        planned.configuration,
        &planned.source,
        &args.submit,
        base,
    )
    .await
}

/// Refuses dependencies on tags that do not exist, each at its place.
async fn check_tags(
    client: &dstack_core::Client,
    depends_on: &[Dependency],
) -> Result<(), Failure> {
    if depends_on.is_empty() {
        return Ok(());
    }
    let known: Vec<TagRef> = client
        .tags()
        .list()
        .await?
        .into_iter()
        .map(|t| t.tag)
        .collect();
    let missing: Vec<String> = depends_on
        .iter()
        .filter(|d| !known.contains(&d.tag))
        .map(|d| {
            format!(
                "{}: there is no tag {} (dstack tags list shows the tags; dstack tags add \
                 TAG RUN makes one) [invalid_value]",
                d.at, d.tag
            )
        })
        .collect();
    match missing.is_empty() {
        true => Ok(()),
        false => Err(Failure::new(missing.join("\n"))),
    }
}

/// What `dstack run` submits: the configuration, and the arguments already in its commands.
#[derive(Debug)]
pub struct Planned {
    /// The configuration.
    pub configuration: Configuration,
    /// What names it in messages (`.dstack/workflows.yaml`, or `dstack run python`).
    pub source: String,
    /// The workflow it runs (`None` for a provider run directly).
    pub workflow: Option<String>,
    /// The paths saved as its artifacts.
    pub artifacts: Vec<String>,
    /// The tags whose artifacts it starts with.
    pub depends_on: Vec<Dependency>,
}

/// Reads the project's workflows from `dir` (`None` when it has no workflows file).
pub fn load(dir: &Path) -> Result<Option<Workflows>, Failure> {
    let path = dir.join(WORKFLOWS_FILE);
    let Some(text) = read_optional(&path)? else {
        return Ok(None);
    };
    parse_file(&path, &text).map(Some)
}

/// Whether `path` names a workflows file (`.dstack/workflows.yaml`), which `dstack validate`
/// checks as one.
pub fn is_workflows_file(path: &Path) -> bool {
    let in_dstack = path
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|d| d == ".dstack");
    in_dstack && path.file_name().is_some_and(|f| f == "workflows.yaml")
}

/// Parses the workflows file at `path` (its `text`) with the variables file beside it.
pub fn parse_file(path: &Path, text: &str) -> Result<Workflows, Failure> {
    let variables_path =
        path.with_file_name(Path::new(VARIABLES_FILE).file_name().unwrap_or_default());
    let variables = read_optional(&variables_path)?;
    let variables_name = variables_path.display().to_string();
    let variables = variables.as_deref().map(|v| (v, variables_name.as_str()));
    Workflows::parse(text, &path.display().to_string(), variables)
        .map_err(|e| Failure::new(e.to_string()))
}

/// A file's text, `None` when there is no such file.
fn read_optional(path: &Path) -> Result<Option<String>, Failure> {
    let name = path.display();
    match std::fs::File::open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Failure::new(format!(
            "{name}:1:1: (file): cannot read the file: {e}"
        ))),
        Ok(file) => limits::read_text(file).map(Some).map_err(|e| {
            Failure::new(format!(
                "{name}:1:1: (file): cannot read the file: {e} [{}]",
                e.code()
            ))
        }),
    }
}

/// The run `words` (what follows `dstack run`) ask for: a workflow of `workflows` with its
/// variables (`--NAME VALUE` or `--NAME=VALUE` for a declared one) and arguments (the rest,
/// for `${{ run.args }}`), or a provider run directly (`python FILE ARGS…`, `streamlit
/// TARGET`, `bash COMMAND`, `docker IMAGE [COMMAND]`, `lab`, …, with `--gpu N`).
pub fn plan(words: &[String], workflows: Option<&Workflows>) -> Result<Planned, Failure> {
    let Some((name, rest)) = words.split_first() else {
        return Err(Failure::new(usage(workflows)));
    };
    if let Some(workflows) = workflows.filter(|w| w.names().any(|n| n == name)) {
        let (values, args) = variables(rest, &workflows.variables(name));
        let mut run = workflows
            .run(name, &values)
            .map_err(|e| Failure::new(e.to_string()))?;
        put_args(&mut run.configuration, &args, WORKFLOWS_FILE)?;
        return Ok(Planned {
            configuration: run.configuration,
            source: WORKFLOWS_FILE.to_string(),
            workflow: Some(name.clone()),
            artifacts: run.artifacts,
            depends_on: run.depends_on,
        });
    }
    if !PROVIDERS.contains(&name.as_str()) {
        return Err(Failure::new(format!(
            "`{name}` is neither a workflow nor a provider. {}",
            usage(workflows)
        )));
    }
    let source = format!("dstack run {name}");
    let provider = provider_fields(name, rest)?;
    let mut configuration = workflows::provider_configuration(&provider.fields, &source)
        .map_err(|e| Failure::new(e.to_string()))?;
    put_args(&mut configuration, &provider.args, &source)?;
    Ok(Planned {
        configuration,
        source,
        workflow: None,
        artifacts: provider.artifacts,
        depends_on: provider.depends_on,
    })
}

fn usage(workflows: Option<&Workflows>) -> String {
    let names: Vec<&str> = workflows.map(|w| w.names().collect()).unwrap_or_default();
    let listed = if names.is_empty() {
        format!("There is no {WORKFLOWS_FILE} here")
    } else {
        format!("Workflows: {}", names.join(", "))
    };
    format!(
        "Usage: dstack run WORKFLOW [--VAR VALUE]… [ARGS]… or dstack run PROVIDER [ARGS]…. \
         {listed}; providers: {}",
        PROVIDERS.join(", ")
    )
}

/// Splits a workflow's words into its declared variables' values and the other arguments.
fn variables(words: &[String], declared: &[&str]) -> (BTreeMap<String, String>, Vec<String>) {
    let mut values = BTreeMap::new();
    let mut args = Vec::new();
    let mut words = words.iter();
    while let Some(word) = words.next() {
        let flag = word.strip_prefix("--").filter(|_| word.len() > 2);
        let (name, inline) = match flag.map(|f| f.split_once('=')) {
            Some(Some((name, value))) => (Some(name), Some(value.to_string())),
            Some(None) => (flag, None),
            None => (None, None),
        };
        match name.filter(|n| declared.contains(n)) {
            Some(name) => {
                let value = inline.or_else(|| words.next().cloned()).unwrap_or_default();
                values.insert(name.to_string(), value);
            }
            None => args.push(word.clone()),
        }
    }
    (values, args)
}

/// A provider run from the command line.
struct ProviderRun {
    /// Its fields.
    fields: serde_json::Value,
    /// The arguments for its command.
    args: Vec<String>,
    /// `--artifact PATH`, each.
    artifacts: Vec<String>,
    /// `--dep WORKFLOW:TAG` (or `:TAG`), each.
    depends_on: Vec<Dependency>,
}

/// The fields of a provider run from the command line, and the arguments for its command.
fn provider_fields(provider: &str, words: &[String]) -> Result<ProviderRun, Failure> {
    let mut fields = serde_json::json!({ "provider": provider });
    let mut rest = Vec::new();
    let (mut artifacts, mut depends_on) = (Vec::new(), Vec::new());
    let mut words = words.iter();
    while let Some(word) = words.next() {
        match word.as_str() {
            "--gpu" | "--dep" | "--artifact" => {
                let value = words
                    .next()
                    .ok_or_else(|| Failure::new(format!("{word} needs a value")))?;
                match word.as_str() {
                    "--gpu" => fields["resources"] = serde_json::json!({ "gpu": value }),
                    "--artifact" => artifacts.push(value.clone()),
                    _ if !value.contains(':') => {
                        return Err(Failure::new(format!(
                            "--dep {value}: a workflow without a tag (a pipeline) is not \
                             supported yet; depend on a tag: --dep {value}:latest"
                        )))
                    }
                    _ => depends_on.push(Dependency {
                        tag: TagRef::parse(value)
                            .map_err(|e| Failure::new(format!("--dep {value}: {e}")))?,
                        at: format!("--dep {value}"),
                    }),
                }
            }
            _ => rest.push(word.clone()),
        }
    }
    let mut rest = rest.into_iter();
    let mut first = |field: &str, what: &str| -> Result<String, Failure> {
        rest.next()
            .ok_or_else(|| Failure::new(format!("dstack run {provider} needs {what} (`{field}`)")))
    };
    match provider {
        "python" => fields["file"] = first("file", "the script to run")?.into(),
        "streamlit" | "gradio" | "fastapi" => {
            fields["target"] = first("target", "the application to serve")?.into()
        }
        "bash" => {
            let commands: Vec<String> = rest.by_ref().collect();
            if commands.is_empty() {
                return Err(Failure::new("dstack run bash needs the commands to run"));
            }
            fields["commands"] = commands.into();
        }
        "docker" => {
            fields["image"] = first("image", "the image to run")?.into();
            let command: Vec<String> = rest.by_ref().collect();
            if command.is_empty() {
                return Err(Failure::new(
                    "dstack run docker IMAGE needs the command to run",
                ));
            }
            fields["commands"] = vec![run_args::shell_join(&command)].into();
        }
        _ => {}
    }
    Ok(ProviderRun {
        fields,
        args: rest.collect(),
        artifacts,
        depends_on,
    })
}

/// Puts `args` where the configuration's commands say `${{ run.args }}`, after refusing the
/// fields it sets that would be ignored (as `dstack apply` does).
fn put_args(
    configuration: &mut Configuration,
    args: &[String],
    source: &str,
) -> Result<(), Failure> {
    let refused = dstack_core::config::support::unsupported(configuration);
    if !refused.is_empty() {
        let lines: Vec<String> = refused
            .iter()
            .map(|u| format!("{source}: {u} [unsupported]"))
            .collect();
        return Err(Failure::new(lines.join("\n")));
    }
    run_args::apply(configuration, args).map_err(|errors| {
        let lines: Vec<String> = errors
            .iter()
            .map(|(path, code, message)| format!("{source}: {path}: {message} [{}]", code.as_str()))
            .collect();
        Failure::new(lines.join("\n"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_string).collect()
    }

    fn commands(planned: &Planned) -> Vec<String> {
        match &planned.configuration {
            Configuration::Task(t) => t.commands.clone(),
            Configuration::Service(s) => s.commands.clone(),
            other => panic!("no commands: {other:?}"),
        }
    }

    const WORKFLOWS: &str = "workflows:\n  - name: train\n    provider: python\n    file: train.py\n    resources:\n      gpu: ${{ tgpu }}\n";

    #[test]
    fn declared_variables_are_taken_and_the_other_words_become_the_scripts_arguments() {
        let variables = "variables:\n  train:\n    tgpu: 1\n";
        let workflows = Workflows::parse(WORKFLOWS, "w", Some((variables, "v"))).unwrap();
        let planned = plan(
            &words("train --epoch 2 --tgpu 0 --seed=2 --batch-size 128"),
            Some(&workflows),
        )
        .unwrap();
        assert_eq!(
            commands(&planned),
            ["python train.py --epoch 2 --seed=2 --batch-size 128"]
        );
        let Configuration::Task(task) = &planned.configuration else {
            unreachable!()
        };
        assert_eq!(
            task.common.resources.gpu.as_ref().unwrap().count.max,
            Some(0)
        );
        let planned = plan(&words("train --tgpu=0 a"), Some(&workflows)).unwrap();
        assert_eq!(commands(&planned), ["python train.py a"]);
    }

    #[test]
    fn providers_run_directly_and_refuse_what_they_cannot_do() {
        let planned = plan(&words("python train.py --epoch 100 --gpu 0"), None).unwrap();
        assert_eq!(commands(&planned), ["python train.py --epoch 100"]);
        let planned = plan(&words("streamlit app.py"), None).unwrap();
        assert!(commands(&planned)[1].starts_with("streamlit run app.py"));
        let planned = plan(&["bash".to_string(), "echo a && echo b".to_string()], None).unwrap();
        assert_eq!(commands(&planned), ["echo a && echo b"]);
        let planned = plan(&words("docker busybox echo hi"), None).unwrap();
        assert_eq!(commands(&planned), ["echo hi"]);
        let planned = plan(
            &words("python train.py --epoch 1 --dep prepare:latest --artifact checkpoint"),
            None,
        )
        .unwrap();
        assert_eq!(commands(&planned), ["python train.py --epoch 1"]);
        assert_eq!(planned.artifacts, ["checkpoint"]);
        assert_eq!(planned.depends_on[0].tag.to_string(), "prepare:latest");
        for (line, expected) in [
            (
                "python train.py --dep prepare",
                "--dep prepare: a workflow without a tag (a pipeline) is not supported yet",
            ),
            ("python train.py --artifact", "--artifact needs a value"),
            (
                "python",
                "dstack run python needs the script to run (`file`)",
            ),
            ("perl x.pl", "`perl` is neither a workflow nor a provider"),
            ("lab extra", "a dev-environment takes no arguments"),
        ] {
            let err = plan(&words(line), None).unwrap_err();
            assert!(format!("{err:?}").contains(expected), "{line}: {err:?}");
        }
    }
}
