//! `dstack validate [--json] FILE...`

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use dstack_core::config::limits::{self, ReadError};
use dstack_core::config::{self, Configuration};

/// Arguments of `dstack validate`.
#[derive(clap::Args)]
pub struct Args {
    /// Print the normalized configuration as JSON (one file: an object; several, or a
    /// workflows file: a list).
    #[arg(long)]
    json: bool,
    /// Configuration files (`-` reads standard input); a `.dstack/workflows.yaml` is checked
    /// with the `variables.yaml` beside it, every workflow with its defaults.
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
}

fn read(path: &PathBuf) -> Result<String, ReadError> {
    if path.as_os_str() == "-" {
        return limits::read_text(std::io::stdin().lock());
    }
    limits::read_text(std::fs::File::open(path)?)
}

/// Validates every file; prints located errors on stderr and, with `--json`, the models.
pub fn run(args: &Args) -> ExitCode {
    let mut valid: Vec<Configuration> = Vec::new();
    let mut failed = false;
    let stderr = std::io::stderr();
    let mut err = stderr.lock();
    for path in &args.files {
        let name = path.display().to_string();
        let text = match read(path) {
            Ok(text) => text,
            Err(e) => {
                let _ = writeln!(
                    err,
                    "{name}:1:1: (file): cannot read the file: {e} [{}]",
                    e.code()
                );
                failed = true;
                continue;
            }
        };
        if crate::workflow::is_workflows_file(path) {
            match crate::workflow::parse_file(path, &text) {
                Ok(workflows) => {
                    let names: Vec<&str> = workflows.names().collect();
                    if !args.json {
                        let _ = writeln!(err, "{name}: valid workflows {}", names.join(", "));
                    }
                    for name in names {
                        let defaults = Default::default();
                        valid.extend(workflows.configuration(name, &defaults).ok());
                    }
                }
                Err(e) => {
                    let _ = writeln!(err, "{e}");
                    failed = true;
                }
            }
            continue;
        }
        match config::parse(&text, &name) {
            Ok(c) => {
                if !args.json {
                    let label = c.name().map(|n| format!(" {n}")).unwrap_or_default();
                    let _ = writeln!(err, "{name}: valid {}{label}", c.type_name());
                }
                valid.push(c);
            }
            Err(e) => {
                let _ = writeln!(err, "{e}");
                failed = true;
            }
        }
    }
    if args.json {
        // A registry password in clear is never printed.
        let redacted = |c: &Configuration| {
            let mut value = c.to_json();
            dstack_core::secrets::redact_configuration(&mut value);
            value
        };
        let single = args.files.len() == 1 && !crate::workflow::is_workflows_file(&args.files[0]);
        let value = if single {
            valid.first().map(redacted)
        } else {
            Some(serde_json::Value::Array(
                valid.iter().map(redacted).collect(),
            ))
        };
        if let Some(value) = value {
            let text = serde_json::to_string_pretty(&value).unwrap_or_default();
            let _ = writeln!(std::io::stdout().lock(), "{text}");
        }
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
