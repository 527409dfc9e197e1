//! Workflows, as dstack's earlier documents define them: `.dstack/workflows.yaml` holds a
//! `workflows:` list, each with a `name`, a `provider` and that provider's fields beside the
//! run fields a configuration has (`resources`, `env`, `image`, `retry`, `schedule`, …), and
//! `.dstack/variables.yaml` declares each workflow's variables with their defaults
//! (`variables: {train: {epochs: 10}}`), used as `${{ epochs }}` in the workflow's values.
//!
//! A workflow becomes an ordinary configuration, parsed with the same rules and located errors
//! as any `.dstack.yml` (positions point into the workflows file, paths start at
//! `workflows[i]`):
//!
//! | provider | becomes | its fields |
//! | --- | --- | --- |
//! | `python` | a task running `python FILE ARGS` | `file` (or `python_script`), `args`, `requirements`, `version` |
//! | `bash` | a task | `commands` |
//! | `docker` | a task in the image | `image`, `commands` |
//! | `streamlit`, `gradio`, `fastapi` | a service (port 8501, 7860, 8000) behind the server's proxy | `target`, `args`, `requirements`, `version` |
//! | `lab`, `notebook` | a dev environment running JupyterLab (or Notebook) on port 8888 of its host, bound to 127.0.0.1 | `requirements`, `version` |
//! | `code` | a dev environment with its VS Code link | `requirements`, `version` |
//!
//! `version` is the run's `python`; `requirements` is installed with pip first; `environment`
//! is taken as `env`. The arguments of `dstack run WORKFLOW ARGS…` reach the command through
//! `${{ run.args }}` ([`super::run_args`]), which `python`, `streamlit`, `gradio` and
//! `fastapi` workflows end with. `artifacts` lists the paths saved as the run's artifacts;
//! `depends-on` names tags (`prepare:latest`, `:dataset`) whose artifacts are put into the run's
//! working directory ([`WorkflowRun`]); a workflow named without a tag (a pipeline) is refused
//! (not supported yet).
//!
//! ```
//! use dstack_core::config::workflows::Workflows;
//! use dstack_core::config::Configuration;
//!
//! let text = "workflows:\n  - name: train\n    provider: python\n    file: train.py\n    resources:\n      gpu: ${{ tgpu }}\n";
//! let variables = "variables:\n  train:\n    tgpu: 1\n";
//! let workflows = Workflows::parse(text, "workflows.yaml", Some((variables, "variables.yaml"))).unwrap();
//! let values = [("tgpu".to_string(), "0".to_string())].into();
//! let Configuration::Task(task) = workflows.configuration("train", &values).unwrap() else { panic!() };
//! assert_eq!(task.commands, ["python train.py ${{ run.args }}"]);
//! assert_eq!(task.common.resources.gpu.unwrap().count.max, Some(0));
//! ```

use std::collections::BTreeMap;

use super::de::{one_of_message, Cx, Path};
use super::error::{ConfigErrors, ErrorCode};
use super::run_args::quote;
use super::yaml::{self, Mark, Node, NodeKind};
use super::{parse_node, Configuration};

/// Where a project keeps its workflows.
pub const WORKFLOWS_FILE: &str = ".dstack/workflows.yaml";

/// Where a project declares its workflows' variables.
pub const VARIABLES_FILE: &str = ".dstack/variables.yaml";

/// The built-in providers.
pub const PROVIDERS: &[&str] = &[
    "python",
    "bash",
    "docker",
    "streamlit",
    "gradio",
    "fastapi",
    "lab",
    "notebook",
    "code",
];

/// A workflow as it runs: its configuration, the paths it saves and the tags it depends on.
#[derive(Clone, Debug)]
pub struct WorkflowRun {
    /// The configuration.
    pub configuration: Configuration,
    /// The paths saved as its artifacts (`artifacts`).
    pub artifacts: Vec<String>,
    /// The tags whose artifacts it starts with (`depends-on`).
    pub depends_on: Vec<Dependency>,
}

/// A tag a workflow depends on, and where it is named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dependency {
    /// The tag.
    pub tag: crate::artifacts::TagRef,
    /// `file:line:col: workflows[i].depends-on[j]`, for messages about it.
    pub at: String,
}

/// The workflows of a project, with their declared variables.
#[derive(Clone, Debug)]
pub struct Workflows {
    file: String,
    /// Each workflow by name, in file order, with its index in the list.
    workflows: Vec<(String, usize, Node)>,
    /// Each workflow's declared variables and their defaults.
    variables: BTreeMap<String, Vec<(String, Node)>>,
}

impl Workflows {
    /// Reads a workflows file (`file` names it in errors) and, when the project has one, its
    /// variables file `(text, file)`. Every workflow is checked as it would run with its
    /// defaults, so errors anywhere in either file are found at once.
    pub fn parse(
        text: &str,
        file: &str,
        variables: Option<(&str, &str)>,
    ) -> Result<Workflows, ConfigErrors> {
        let variables = match variables {
            Some((text, file)) => read_variables(text, file)?,
            None => BTreeMap::new(),
        };
        let root = load(text, file)?;
        let mut cx = Cx::default();
        let mut workflows = Vec::new();
        let path = Path::ROOT;
        let list = root
            .get("workflows")
            .filter(|_| root.as_map().is_some_and(|m| m.len() == 1));
        match list.map(|l| &l.kind) {
            Some(NodeKind::Seq(items)) => {
                let list_path = path.key("workflows");
                for (i, item) in items.iter().enumerate() {
                    let item_path = list_path.index(i);
                    let Some(name) = item.get("name") else {
                        let message = "field required: every workflow has a `name`";
                        cx.error(
                            item.mark,
                            &item_path.key("name"),
                            ErrorCode::MissingField,
                            message,
                        );
                        continue;
                    };
                    let Some(name_text) = name.as_key().filter(|n| !n.is_empty()) else {
                        cx.expected(name, &item_path.key("name"), "a name");
                        continue;
                    };
                    if workflows.iter().any(|(n, _, _)| n == name_text) {
                        let message = format!("another workflow is named `{name_text}`");
                        cx.error(
                            name.mark,
                            &item_path.key("name"),
                            ErrorCode::Conflict,
                            message,
                        );
                        continue;
                    }
                    workflows.push((name_text.to_string(), i, item.clone()));
                }
            }
            _ => {
                let message = "expected a mapping with one key, `workflows`: a list of workflows";
                cx.error(root.mark, &path, ErrorCode::InvalidType, message);
            }
        }
        let workflows = Workflows {
            file: file.to_string(),
            workflows,
            variables,
        };
        for (name, _, _) in &workflows.workflows {
            workflows.build(name, &BTreeMap::new(), &mut cx);
        }
        if cx.has_errors() {
            return Err(ConfigErrors {
                file: file.to_string(),
                errors: cx.into_errors(),
            });
        }
        Ok(workflows)
    }

    /// The workflows' names, in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.workflows.iter().map(|(n, _, _)| n.as_str())
    }

    /// The variables declared for `workflow`, in file order.
    pub fn variables(&self, workflow: &str) -> Vec<&str> {
        self.variables
            .get(workflow)
            .map(|v| v.iter().map(|(n, _)| n.as_str()).collect())
            .unwrap_or_default()
    }

    /// The configuration workflow `name` runs with `values` of its variables (as given on the
    /// command line; the rest keep their defaults).
    pub fn configuration(
        &self,
        name: &str,
        values: &BTreeMap<String, String>,
    ) -> Result<Configuration, ConfigErrors> {
        self.run(name, values).map(|run| run.configuration)
    }

    /// Workflow `name` as it runs with `values` of its variables: its configuration (see
    /// [`Workflows::configuration`]), artifacts and dependencies.
    pub fn run(
        &self,
        name: &str,
        values: &BTreeMap<String, String>,
    ) -> Result<WorkflowRun, ConfigErrors> {
        let mut cx = Cx::default();
        let built = self.build(name, values, &mut cx);
        match built {
            Some(run) if !cx.has_errors() => Ok(run),
            _ => Err(ConfigErrors {
                file: self.file.clone(),
                errors: cx.into_errors(),
            }),
        }
    }

    fn build(
        &self,
        name: &str,
        values: &BTreeMap<String, String>,
        cx: &mut Cx,
    ) -> Option<WorkflowRun> {
        let Some((_, index, node)) = self.workflows.iter().find(|(n, _, _)| n == name) else {
            let known: Vec<&str> = self.names().collect();
            let message = format!(
                "no workflow named `{name}` in {}; its workflows: {}",
                self.file,
                known.join(", ")
            );
            cx.error(
                Mark::default(),
                &Path::ROOT,
                ErrorCode::InvalidValue,
                message,
            );
            return None;
        };
        let declared = self.variables.get(name).map(Vec::as_slice).unwrap_or(&[]);
        for given in values.keys() {
            if !declared.iter().any(|(n, _)| n == given) {
                let names: Vec<&str> = declared.iter().map(|(n, _)| n.as_str()).collect();
                let message =
                    format!(
                    "`--{given}`: workflow `{name}` declares no such variable in {VARIABLES_FILE} \
                     (it declares: {})",
                    if names.is_empty() { "none".to_string() } else { names.join(", ") }
                );
                cx.error(node.mark, &Path::ROOT, ErrorCode::InvalidValue, message);
            }
        }
        let root = Path::ROOT;
        let list = root.key("workflows");
        let path = list.index(*index);
        let filled = substitute(node, &|var| lookup(var, declared, values), cx, &path)?;
        let artifacts = artifact_paths(filled.get("artifacts"), cx, &path);
        let depends_on = dependencies(filled.get("depends-on"), cx, &path, &self.file);
        let config = to_configuration(&filled, cx, &path)?;
        let before = cx.kept();
        let parsed = parse_node(&config, cx);
        prefix_paths(cx, before, &path);
        Some(WorkflowRun {
            configuration: parsed?,
            artifacts,
            depends_on,
        })
    }
}

/// A configuration for a provider run directly (`dstack run python train.py …`), from the
/// fields the command line gave (`provider`, its fields and run fields, as in a workflow).
pub fn provider_configuration(
    fields: &serde_json::Value,
    source: &str,
) -> Result<Configuration, ConfigErrors> {
    let mut cx = Cx::default();
    let node = Node::from_json(fields);
    let path = Path::ROOT;
    let parsed = to_configuration(&node, &mut cx, &path).and_then(|c| parse_node(&c, &mut cx));
    match parsed {
        Some(config) if !cx.has_errors() => Ok(config),
        _ => Err(ConfigErrors {
            file: source.to_string(),
            errors: cx.into_errors(),
        }),
    }
}

/// A workflow's `artifacts`: a list of paths (strings, or `{path: …}`) within its working
/// directory.
fn artifact_paths(node: Option<&Node>, cx: &mut Cx, path: &Path<'_>) -> Vec<String> {
    let Some(node) = node else {
        return Vec::new();
    };
    let list_path = path.key("artifacts");
    let NodeKind::Seq(items) = &node.kind else {
        cx.expected(node, &list_path, "a list of paths");
        return Vec::new();
    };
    let mut paths = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let item_path = list_path.index(i);
        let text = match (&item.kind, item.get("path")) {
            (NodeKind::Str(s), _) => s.clone(),
            (NodeKind::Map(_), Some(p)) => p.as_key().unwrap_or_default().to_string(),
            _ => {
                cx.expected(item, &item_path, "a path (or `path: …`)");
                continue;
            }
        };
        match crate::artifacts::normalize(&text) {
            Some(_) => paths.push(text),
            None => cx.invalid(
                item,
                &item_path,
                format!("`{text}` is not a path within the working directory"),
            ),
        }
    }
    paths
}

/// A workflow's `depends-on`: tags (`WORKFLOW:TAG`, `:TAG`); a workflow without a tag (a
/// pipeline step) is refused.
fn dependencies(node: Option<&Node>, cx: &mut Cx, path: &Path<'_>, file: &str) -> Vec<Dependency> {
    let Some(node) = node else {
        return Vec::new();
    };
    let list_path = path.key("depends-on");
    let NodeKind::Seq(items) = &node.kind else {
        cx.expected(node, &list_path, "a list of tags (WORKFLOW:TAG or :TAG)");
        return Vec::new();
    };
    let mut found = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let item_path = list_path.index(i);
        let text = match &item.kind {
            NodeKind::Str(s) => s.clone(),
            _ => {
                cx.expected(item, &item_path, "a tag (WORKFLOW:TAG or :TAG)");
                continue;
            }
        };
        if !text.contains(':') {
            let message = format!(
                "`{text}` names a workflow without a tag: pipelines (running `{text}` first) are \
                 not supported yet; tag a finished run of it (dstack tags add latest RUN) and \
                 depend on `{text}:latest`"
            );
            cx.error(item.mark, &item_path, ErrorCode::Unsupported, message);
            continue;
        }
        match crate::artifacts::TagRef::parse(&text) {
            Ok(tag) => found.push(Dependency {
                tag,
                at: format!(
                    "{file}:{}:{}: {}",
                    item.mark.line,
                    item.mark.col,
                    item_path.render()
                ),
            }),
            Err(message) => cx.invalid(item, &item_path, message),
        }
    }
    found
}

/// Loads a YAML document, its syntax errors located in `file`.
fn load(text: &str, file: &str) -> Result<Node, ConfigErrors> {
    yaml::load(text).map_err(|e| {
        let mut cx = Cx::default();
        let message = format!("invalid YAML: {}", e.message);
        cx.error(e.mark, &Path::ROOT, e.code, message);
        ConfigErrors {
            file: file.to_string(),
            errors: cx.into_errors(),
        }
    })
}

/// `variables: {WORKFLOW: {NAME: DEFAULT}}`.
fn read_variables(
    text: &str,
    file: &str,
) -> Result<BTreeMap<String, Vec<(String, Node)>>, ConfigErrors> {
    let root = load(text, file)?;
    let mut cx = Cx::default();
    let mut all = BTreeMap::new();
    let path = Path::ROOT.key("variables");
    match root.get("variables").and_then(Node::as_map) {
        Some(workflows) => {
            for (key, vars) in workflows {
                let workflow = key.as_key().unwrap_or_default().to_string();
                let vars_path = path.key(&workflow);
                let Some(vars) = vars.as_map() else {
                    cx.expected(key, &vars_path, "a mapping of variable names to defaults");
                    continue;
                };
                let mut declared = Vec::new();
                for (name, default) in vars {
                    match name.as_key().filter(|n| is_variable_name(n)) {
                        Some(n) => declared.push((n.to_string(), default.clone())),
                        None => cx.invalid(
                            name,
                            &vars_path,
                            "a variable name is letters, digits, `_` and `-`",
                        ),
                    }
                }
                all.insert(workflow, declared);
            }
        }
        None if root.is_null() => {}
        None => {
            let message = "expected `variables:`, a mapping of workflow names to their variables";
            cx.error(root.mark, &path, ErrorCode::InvalidType, message);
        }
    }
    if cx.has_errors() {
        return Err(ConfigErrors {
            file: file.to_string(),
            errors: cx.into_errors(),
        });
    }
    Ok(all)
}

fn is_variable_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The value of variable `name`: given on the command line (read as a YAML scalar, so `4`
/// is a number), else its default; `None` when it is not declared.
fn lookup(
    name: &str,
    declared: &[(String, Node)],
    values: &BTreeMap<String, String>,
) -> Option<NodeKind> {
    let (_, default) = declared.iter().find(|(n, _)| n == name)?;
    match values.get(name) {
        Some(text) => {
            Some(yaml::load(text).map_or_else(|_| NodeKind::Str(text.clone()), |n| n.kind))
        }
        None => Some(default.kind.clone()),
    }
}

/// `node` with `${{ NAME }}` references to variables filled in: a value that is one whole
/// reference takes the variable's value as it is (a number stays a number), a reference
/// inside a longer string its text. References with a dot (`${{ env.X }}`, `${{ run.args }}`,
/// `${{ secrets.X }}`) are left for later; an undeclared name is an error.
fn substitute(
    node: &Node,
    value: &dyn Fn(&str) -> Option<NodeKind>,
    cx: &mut Cx,
    path: &Path<'_>,
) -> Option<Node> {
    let kind = match &node.kind {
        NodeKind::Str(text) => {
            let refs = references(text);
            if refs.is_empty() {
                return Some(node.clone());
            }
            if let [(0, end, name)] = refs.as_slice() {
                if *end == text.len() {
                    let Some(kind) = value(name) else {
                        undeclared(node, name, cx, path);
                        return None;
                    };
                    return Some(Node {
                        kind,
                        mark: node.mark,
                    });
                }
            }
            let mut out = String::new();
            let mut at = 0;
            for (start, end, name) in &refs {
                let Some(kind) = value(name) else {
                    undeclared(node, name, cx, path);
                    return None;
                };
                out.push_str(&text[at..*start]);
                out.push_str(&scalar_text(&kind));
                at = *end;
            }
            out.push_str(&text[at..]);
            NodeKind::Str(out)
        }
        NodeKind::Seq(items) => {
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                out.push(substitute(item, value, cx, &path.index(i))?);
            }
            NodeKind::Seq(out)
        }
        NodeKind::Map(entries) => {
            let mut out = Vec::new();
            for (key, item) in entries {
                let name = key.as_key().unwrap_or_default();
                out.push((key.clone(), substitute(item, value, cx, &path.key(name))?));
            }
            NodeKind::Map(out)
        }
        other => other.clone(),
    };
    Some(Node {
        kind,
        mark: node.mark,
    })
}

fn undeclared(node: &Node, name: &str, cx: &mut Cx, path: &Path<'_>) {
    let message = format!(
        "`${{{{ {name} }}}}`: no variable `{name}` is declared for this workflow in \
         {VARIABLES_FILE}"
    );
    cx.error(node.mark, path, ErrorCode::InvalidValue, message);
}

/// The `${{ NAME }}` references of `text` with a bare name: (start, end, name).
fn references(text: &str) -> Vec<(usize, usize, String)> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(start) = text[from..].find("${{").map(|i| i + from) {
        let Some(close) = text[start..].find("}}").map(|i| i + start) else {
            break;
        };
        let name = text[start + 3..close].trim();
        let escaped = start > 0 && text[..start].ends_with('$');
        if !escaped && is_variable_name(name) {
            found.push((start, close + 2, name.to_string()));
        }
        from = close + 2;
    }
    found
}

/// A scalar's text inside a longer string.
fn scalar_text(kind: &NodeKind) -> String {
    match kind {
        NodeKind::Null => String::new(),
        NodeKind::Bool(b) => b.to_string(),
        NodeKind::Int(i) => i.to_string(),
        NodeKind::Float(f) => yaml::py_float_repr(*f),
        NodeKind::Str(s) => s.clone(),
        NodeKind::Seq(_) | NodeKind::Map(_) => String::new(),
    }
}

/// Renders the errors recorded since `before` with their paths under `path` (the workflow's
/// place in the file).
fn prefix_paths(cx: &mut Cx, before: usize, path: &Path<'_>) {
    let prefix = path.render();
    cx.rewrite_since(before, |e| {
        e.path = if e.path.is_empty() {
            prefix.clone()
        } else if e.path.starts_with('[') {
            format!("{prefix}{}", e.path)
        } else {
            format!("{prefix}.{}", e.path)
        };
    });
}

/// A string node at `mark`.
fn text(mark: Mark, value: impl Into<String>) -> Node {
    Node {
        kind: NodeKind::Str(value.into()),
        mark,
    }
}

/// The run configuration a workflow (or provider fields) describes.
fn to_configuration(workflow: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Node> {
    let Some(entries) = workflow.as_map() else {
        cx.expected(workflow, path, "a workflow (a mapping)");
        return None;
    };
    let Some(provider_node) = workflow.get("provider") else {
        let message = format!("field required: one of {}", PROVIDERS.join(", "));
        cx.error(
            workflow.mark,
            &path.key("provider"),
            ErrorCode::MissingField,
            message,
        );
        return None;
    };
    let provider = provider_node.as_key().unwrap_or_default();
    if !PROVIDERS.contains(&provider) {
        cx.invalid(
            provider_node,
            &path.key("provider"),
            one_of_message(provider, PROVIDERS),
        );
        return None;
    }
    let own: &[&str] = match provider {
        "python" => &["file", "python_script", "args", "requirements", "version"],
        "streamlit" | "gradio" | "fastapi" => &["target", "args", "requirements", "version"],
        "lab" | "notebook" | "code" => &["requirements", "version"],
        _ => &[],
    };
    let mut fields = Fields {
        own: BTreeMap::new(),
        rest: Vec::new(),
        mark: workflow.mark,
    };
    for (key, value) in entries {
        let name = key.as_key().unwrap_or_default();
        match name {
            // Read by `Workflows::build` (a provider run directly has its own flags).
            "name" | "provider" | "help" | "artifacts" | "depends-on" => {}
            _ if own.contains(&name) => {
                fields.own.insert(name.to_string(), value.clone());
            }
            "environment" => fields.rest.push((text(key.mark, "env"), value.clone())),
            _ => fields.rest.push((key.clone(), value.clone())),
        }
    }
    if let Some(version) = fields.own.get("version").cloned() {
        fields.set("python", version);
    }
    let kind = match provider {
        "python" => python(&mut fields, cx, path)?,
        "bash" | "docker" => "task",
        "streamlit" | "gradio" | "fastapi" => app(provider, &mut fields, cx, path)?,
        _ => dev_environment(provider, &mut fields),
    };
    fields
        .rest
        .insert(0, (text(workflow.mark, "type"), text(workflow.mark, kind)));
    Some(Node {
        kind: NodeKind::Map(fields.rest),
        mark: workflow.mark,
    })
}

/// A workflow's fields while it is turned into a configuration.
struct Fields {
    /// The provider's own fields.
    own: BTreeMap<String, Node>,
    /// The configuration's fields.
    rest: Vec<(Node, Node)>,
    /// Where the workflow starts.
    mark: Mark,
}

impl Fields {
    fn set(&mut self, key: &str, value: Node) {
        self.rest.retain(|(k, _)| k.as_key() != Some(key));
        self.rest.push((text(value.mark, key), value));
    }

    /// A string field of the provider (a number is taken as its text).
    fn string(&self, key: &str, cx: &mut Cx, path: &Path<'_>) -> Option<String> {
        let node = self.own.get(key)?;
        match &node.kind {
            NodeKind::Str(s) => Some(s.clone()),
            NodeKind::Int(_) | NodeKind::Float(_) => Some(scalar_text(&node.kind)),
            _ => {
                cx.expected(node, &path.key(key), "a string");
                None
            }
        }
    }

    /// The provider's `args` as shell text: a string as written, a list quoted item by item.
    fn args(&self, cx: &mut Cx, path: &Path<'_>) -> String {
        let Some(node) = self.own.get("args") else {
            return String::new();
        };
        match &node.kind {
            NodeKind::Str(s) => format!(" {s}"),
            NodeKind::Seq(items) => items
                .iter()
                .map(|i| format!(" {}", quote(&scalar_text(&i.kind))))
                .collect(),
            _ => {
                cx.expected(node, &path.key("args"), "a string or a list of arguments");
                String::new()
            }
        }
    }

    /// Commands to install `requirements` (a file, relative to the working directory) and
    /// `packages` missing from the interpreter, before `run`.
    fn commands(
        &self,
        packages: &[(&str, &str)],
        run: String,
        cx: &mut Cx,
        path: &Path<'_>,
    ) -> Node {
        let mut commands = Vec::new();
        if let Some(requirements) = self.string("requirements", cx, path) {
            commands.push(format!("pip install -q -r {}", quote(&requirements)));
        }
        for (module, package) in packages {
            commands.push(format!(
                "python -c 'import {module}' 2>/dev/null || pip install -q {package}"
            ));
        }
        commands.push(run);
        let mark = self.mark;
        Node {
            kind: NodeKind::Seq(commands.into_iter().map(|c| text(mark, c)).collect()),
            mark,
        }
    }
}

/// `python FILE ARGS ${{ run.args }}`, after the requirements.
fn python(fields: &mut Fields, cx: &mut Cx, path: &Path<'_>) -> Option<&'static str> {
    let file = fields
        .string("file", cx, path)
        .or_else(|| fields.string("python_script", cx, path));
    let Some(file) = file else {
        let message = "field required: the script to run (`file`)";
        cx.error(
            fields.mark,
            &path.key("file"),
            ErrorCode::MissingField,
            message,
        );
        return None;
    };
    let run = format!(
        "python {}{} ${{{{ run.args }}}}",
        quote(&file),
        fields.args(cx, path)
    );
    let commands = fields.commands(&[], run, cx, path);
    fields.set("commands", commands);
    Some("task")
}

/// A service serving `target` with the provider's server on its port.
fn app(provider: &str, fields: &mut Fields, cx: &mut Cx, path: &Path<'_>) -> Option<&'static str> {
    let Some(target) = fields.string("target", cx, path) else {
        let message = "field required: the application to serve (`target`)";
        cx.error(
            fields.mark,
            &path.key("target"),
            ErrorCode::MissingField,
            message,
        );
        return None;
    };
    let args = fields.args(cx, path);
    let target = quote(&target);
    let (port, packages, run): (u16, &[(&str, &str)], String) = match provider {
        "streamlit" => (
            8501,
            &[("streamlit", "streamlit")],
            format!(
                "streamlit run {target} --server.port 8501 --server.address 0.0.0.0 \
                 --server.headless true{args} ${{{{ run.args }}}}"
            ),
        ),
        "gradio" => (
            7860,
            &[("gradio", "gradio")],
            format!(
                "GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=7860 python {target}{args} \
                 ${{{{ run.args }}}}"
            ),
        ),
        _ => (
            8000,
            &[("fastapi", "fastapi"), ("uvicorn", "uvicorn")],
            format!("uvicorn {target} --host 0.0.0.0 --port 8000{args} ${{{{ run.args }}}}"),
        ),
    };
    let commands = fields.commands(packages, run, cx, path);
    fields.set("commands", commands);
    if !fields.rest.iter().any(|(k, _)| k.as_key() == Some("port")) {
        let mark = fields.mark;
        fields.set(
            "port",
            Node {
                kind: NodeKind::Int(i64::from(port)),
                mark,
            },
        );
    }
    Some("service")
}

/// A dev environment with VS Code's link, and JupyterLab or Notebook on port 8888 (bound to
/// 127.0.0.1 of its host, with the token Jupyter prints in the run's log).
fn dev_environment(provider: &str, fields: &mut Fields) -> &'static str {
    let mark = fields.mark;
    if !fields.rest.iter().any(|(k, _)| k.as_key() == Some("ide")) {
        fields.set("ide", text(mark, "vscode"));
    }
    let mut init = Vec::new();
    if let Some(requirements) = fields.own.get("requirements") {
        init.push(format!(
            "pip install -q -r {}",
            quote(&scalar_text(&requirements.kind))
        ));
    }
    let server = match provider {
        "lab" => Some(("jupyterlab", "lab")),
        "notebook" => Some(("notebook", "notebook")),
        _ => None,
    };
    if let Some((package, command)) = server {
        init.push(format!(
            "command -v jupyter >/dev/null || pip install -q {package}"
        ));
        init.push(format!(
            "jupyter {command} --no-browser --ip=127.0.0.1 --port=8888 \
             --ServerApp.port_retries=0 &"
        ));
        fields.set(
            "ports",
            Node {
                kind: NodeKind::Seq(vec![Node {
                    kind: NodeKind::Int(8888),
                    mark,
                }]),
                mark,
            },
        );
    }
    if !init.is_empty() {
        fields.set(
            "init",
            Node {
                kind: NodeKind::Seq(init.into_iter().map(|c| text(mark, c)).collect()),
                mark,
            },
        );
    }
    "dev-environment"
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The three-workflow example of dstack's first document, without what is refused.
    const EXAMPLE: &str = "\
workflows:
  - name: prepare
    provider: python
    file: prepare.py
    requirements: requirements.txt
    resources:
      gpu: ${{ pgpu }}

  - name: train
    provider: python
    python_script: train.py
    args: [--out, my dir]
    version: '3.11'
    environment:
      SEED: '1'

  - name: app
    provider: streamlit
    target: app.py

  - name: api
    provider: fastapi
    target: main:app
    port: 9000

  - name: shell
    provider: bash
    commands:
      - echo ${{ greeting }}, world

  - name: lab
    provider: lab
";

    const VARIABLES: &str = "variables:\n  prepare:\n    pgpu: 1\n  shell:\n    greeting: hello\n";

    fn example() -> Workflows {
        Workflows::parse(
            EXAMPLE,
            "workflows.yaml",
            Some((VARIABLES, "variables.yaml")),
        )
        .unwrap()
    }

    fn task(config: Configuration) -> Box<super::super::run::TaskConfiguration> {
        match config {
            Configuration::Task(t) => t,
            other => panic!("not a task: {other:?}"),
        }
    }

    #[test]
    fn python_workflows_run_their_script_with_requirements_args_version_and_env() {
        let workflows = example();
        assert_eq!(
            workflows.names().collect::<Vec<_>>(),
            ["prepare", "train", "app", "api", "shell", "lab"]
        );
        let prepare = task(
            workflows
                .configuration("prepare", &BTreeMap::new())
                .unwrap(),
        );
        assert_eq!(
            prepare.commands,
            [
                "pip install -q -r requirements.txt",
                "python prepare.py ${{ run.args }}"
            ]
        );
        let train = task(workflows.configuration("train", &BTreeMap::new()).unwrap());
        assert_eq!(
            train.commands,
            ["python train.py --out 'my dir' ${{ run.args }}"]
        );
        assert_eq!(train.common.python.map(|p| p.as_str()), Some("3.11"));
        let env = serde_json::to_value(&train.common.env).unwrap();
        assert_eq!(env["SEED"], "1", "{env}");
    }

    #[test]
    fn variables_take_their_defaults_or_the_command_line_value_with_its_yaml_type() {
        let workflows = example();
        assert_eq!(workflows.variables("prepare"), ["pgpu"]);
        let gpu = |values: &[(&str, &str)]| {
            let values = values
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let prepare = task(workflows.configuration("prepare", &values).unwrap());
            prepare.common.resources.gpu.unwrap().count
        };
        assert_eq!((gpu(&[]).min, gpu(&[]).max), (Some(1), Some(1)));
        assert_eq!(gpu(&[("pgpu", "0")]).max, Some(0));
        let shell = task(workflows.configuration("shell", &BTreeMap::new()).unwrap());
        assert_eq!(shell.commands, ["echo hello, world"]);
        let values = [("greeting".to_string(), "bye".to_string())].into();
        let shell = task(workflows.configuration("shell", &values).unwrap());
        assert_eq!(shell.commands, ["echo bye, world"]);
        // A variable the workflow does not declare is an error naming what it declares.
        let values = [("pgpus".to_string(), "2".to_string())].into();
        let err = workflows.configuration("prepare", &values).unwrap_err();
        assert!(
            err.to_string()
                .contains("`--pgpus`: workflow `prepare` declares no such variable"),
            "{err}"
        );
        assert!(err.to_string().contains("(it declares: pgpu)"), "{err}");
        let err = workflows
            .configuration("nope", &BTreeMap::new())
            .unwrap_err();
        assert!(
            err.to_string().contains("no workflow named `nope`"),
            "{err}"
        );
    }

    #[test]
    fn apps_are_services_on_their_port_and_lab_is_a_dev_environment() {
        let workflows = example();
        let Configuration::Service(app) = workflows.configuration("app", &BTreeMap::new()).unwrap()
        else {
            panic!("not a service")
        };
        assert_eq!(app.port.container_port, 8501);
        assert!(
            app.commands[0].contains("import streamlit"),
            "{:?}",
            app.commands
        );
        assert!(app.commands[1].starts_with("streamlit run app.py --server.port 8501"));
        let Configuration::Service(api) = workflows.configuration("api", &BTreeMap::new()).unwrap()
        else {
            panic!("not a service")
        };
        assert_eq!(api.port.container_port, 9000);
        let Configuration::DevEnvironment(lab) =
            workflows.configuration("lab", &BTreeMap::new()).unwrap()
        else {
            panic!("not a dev environment")
        };
        assert!(lab
            .init
            .iter()
            .any(|c| c.starts_with("jupyter lab --no-browser --ip=127.0.0.1")));
    }

    #[test]
    fn errors_point_into_the_workflows_file_under_the_workflow() {
        let text = "workflows:\n  - name: a\n    provider: python\n    file: a.py\n    \
                    resources:\n      cpu: lots\n  - name: b\n    provider: perl\n  - name: c\n    \
                    provider: bash\n    commands: [x]\n    artifacts: [../out]\n    \
                    depends-on: [a]\n  - name: d\n    provider: python\n";
        let err = Workflows::parse(text, "wf.yaml", None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("wf.yaml:6:12: workflows[0].resources.cpu: "),
            "{err}"
        );
        assert!(
            err.contains("wf.yaml:8:15: workflows[1].provider: invalid value 'perl'"),
            "{err}"
        );
        assert!(
            err.contains("wf.yaml:12:17: workflows[2].artifacts[0]: `../out` is not a path"),
            "{err}"
        );
        assert!(
            err.contains(
                "wf.yaml:13:18: workflows[2].depends-on[0]: `a` names a workflow without a tag"
            ),
            "{err}"
        );
        assert!(err.contains("workflows[3].file: field required"), "{err}");
        // An undeclared variable, and a reference for later (`${{ env.X }}`) left alone.
        let text = "workflows:\n  - name: a\n    provider: bash\n    commands: ['echo ${{ x }}']\n";
        let err = Workflows::parse(text, "wf.yaml", None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no variable `x` is declared for this workflow"),
            "{err}"
        );
        let text = "workflows:\n  - name: a\n    provider: bash\n    commands: ['echo ${{ env.X }} $${{ y }}']\n";
        let workflows = Workflows::parse(text, "wf.yaml", None).unwrap();
        let a = task(workflows.configuration("a", &BTreeMap::new()).unwrap());
        assert_eq!(a.commands, ["echo ${{ env.X }} $${{ y }}"]);
    }

    #[test]
    fn artifacts_and_tagged_dependencies_are_read_with_their_places() {
        let text = "workflows:\n  - name: prepare\n    provider: python\n    file: p.py\n    \
                    artifacts: [data]\n  - name: train\n    depends-on:\n      - prepare:latest\n      \
                    - ':dataset'\n    provider: python\n    file: t.py\n    artifacts:\n      \
                    - path: checkpoint\n";
        let workflows = Workflows::parse(text, "wf.yaml", None).unwrap();
        let prepare = workflows.run("prepare", &BTreeMap::new()).unwrap();
        assert_eq!(prepare.artifacts, ["data"]);
        assert!(prepare.depends_on.is_empty());
        let train = workflows.run("train", &BTreeMap::new()).unwrap();
        assert_eq!(train.artifacts, ["checkpoint"]);
        let tags: Vec<String> = train.depends_on.iter().map(|d| d.tag.to_string()).collect();
        assert_eq!(tags, ["prepare:latest", ":dataset"]);
        assert_eq!(
            train.depends_on[0].at,
            "wf.yaml:8:9: workflows[1].depends-on[0]"
        );
    }

    #[test]
    fn a_provider_runs_directly_from_command_line_fields() {
        let fields = serde_json::json!({
            "provider": "python", "file": "train.py", "args": ["--epoch", "1"],
            "resources": {"gpu": 0},
        });
        let train = task(provider_configuration(&fields, "dstack run").unwrap());
        assert_eq!(
            train.commands,
            ["python train.py --epoch 1 ${{ run.args }}"]
        );
        let fields = serde_json::json!({"provider": "python"});
        let err = provider_configuration(&fields, "dstack run").unwrap_err();
        assert!(err.to_string().contains("file: field required"), "{err}");
    }
}
