//! `${{ run.args }}`: the positional arguments of `dstack apply -f x.yml -- a "b c"`, joined
//! as a shell command line (each quoted as Python's `shlex.join` quotes it), put into the
//! `commands` of a task or service (and of their groups), as dstack's CLI does. In commands,
//! `${{ secrets.X }}` stays for the server and `${{ groups[…]… }}` for placement; any other
//! reference (`${{ env.X }}` included) is an error, and `$${{` is a literal `${{`.
//!
//! ```
//! use dstack_core::config::{parse, run_args, Configuration};
//!
//! let text = "type: task\ncommands:\n  - python train.py ${{ run.args }}\n";
//! let mut config = parse(text, "t.yml").unwrap();
//! run_args::apply(&mut config, &["--lr".into(), "1e-4".into(), "a b".into()]).unwrap();
//! let Configuration::Task(task) = config else { unreachable!() };
//! assert_eq!(task.commands, ["python train.py --lr 1e-4 'a b'"]);
//! ```

use super::error::ErrorCode;
use super::interpolate::{interpolate, Lookup};
use super::Configuration;

/// One argument quoted for a POSIX shell, as `shlex.quote`: as is when it holds only
/// `[A-Za-z0-9_@%+=:,./-]`, else in single quotes (a `'` written `'"'"'`); `''` when empty.
pub fn quote(arg: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
    if !arg.is_empty() && arg.chars().all(safe) {
        return arg.to_string();
    }
    format!("'{}'", arg.replace('\'', "'\"'\"'"))
}

/// The arguments as one shell command line (`shlex.join`).
pub fn shell_join(args: &[String]) -> String {
    args.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" ")
}

/// The commands of `config` that take `${{ run.args }}`, with their field paths.
fn commands_mut(config: &mut Configuration) -> Vec<(String, &mut Vec<String>)> {
    match config {
        Configuration::Task(t) => {
            let mut all = vec![("commands".to_string(), &mut t.commands)];
            for (i, g) in t.groups.iter_mut().flatten().enumerate() {
                all.push((format!("groups[{i}].commands"), &mut g.commands));
            }
            all
        }
        Configuration::Service(s) => {
            let mut all = vec![("commands".to_string(), &mut s.commands)];
            for (i, g) in s.groups.iter_mut().flatten().enumerate() {
                all.push((format!("groups[{i}].commands"), &mut g.commands));
            }
            all
        }
        _ => Vec::new(),
    }
}

/// Puts `args` into the commands of a task or service (see the module docs). Errors are
/// `(field path, code, message)`, to be located in the file ([`super::locate::errors`]);
/// arguments given to another type of configuration are an error too.
pub fn apply(
    config: &mut Configuration,
    args: &[String],
) -> Result<(), Vec<(String, ErrorCode, String)>> {
    let joined = shell_join(args);
    let type_name = config.type_name();
    let commands = commands_mut(config);
    if commands.is_empty() && !args.is_empty() {
        let message = format!(
            "a {type_name} takes no arguments (`${{{{ run.args }}}}` is for the commands of \
             tasks and services)"
        );
        return Err(vec![(String::new(), ErrorCode::InvalidValue, message)]);
    }
    let mut errors = Vec::new();
    for (path, list) in commands {
        for (i, command) in list.iter_mut().enumerate() {
            let lookup = |namespace: &str, name: &str| match (namespace, name) {
                ("run", "args") => Lookup::Value(joined.clone()),
                ("secrets", _) => Lookup::Keep,
                _ => Lookup::Missing,
            };
            match interpolate(command, lookup) {
                Ok(text) => *command = text,
                Err(e) => errors.push((
                    format!("{path}[{i}]"),
                    ErrorCode::InvalidValue,
                    format!("{e} (commands take `${{{{ run.args }}}}` and `${{{{ secrets.X }}}}`)"),
                )),
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn commands(yaml: &str, given: &[&str]) -> Result<Vec<String>, String> {
        let mut config = parse(yaml, "t.yml").unwrap();
        apply(&mut config, &args(given)).map_err(|e| {
            e.iter()
                .map(|(p, _, m)| format!("{p}: {m}"))
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        match config {
            Configuration::Task(t) => Ok(t.commands),
            Configuration::Service(s) => Ok(s.commands),
            _ => unreachable!(),
        }
    }

    #[test]
    fn arguments_are_quoted_as_shlex_joins_them() {
        assert_eq!(
            shell_join(&args(&["a", "b c", "", "it's", "$HOME", "x=1,y/z"])),
            "a 'b c' '' 'it'\"'\"'s' '$HOME' x=1,y/z"
        );
        assert_eq!(shell_join(&[]), "");
    }

    #[test]
    fn run_args_fill_the_commands_and_other_references_are_errors() {
        let task = "type: task\ncommands:\n  - echo ${{ run.args }}\n  - echo $${{ env.FOO }} ${{ secrets.token }}\n";
        assert_eq!(
            commands(task, &["a", "b c"]).unwrap(),
            ["echo a 'b c'", "echo ${{ env.FOO }} ${{ secrets.token }}"]
        );
        assert_eq!(commands(task, &[]).unwrap()[0], "echo ");
        let service = "type: service\nport: 80\ncommands:\n  - serve ${{run.args}}\n";
        assert_eq!(commands(service, &["--x"]).unwrap(), ["serve --x"]);
        let bad = "type: task\ncommands:\n  - echo ok\n  - echo ${{ env.FOO }}\n  - echo ${{ run.args }\n";
        let err = commands(bad, &[]).unwrap_err();
        assert!(err.contains("commands[1]: missing env.FOO"), "{err}");
        assert!(err.contains("commands[2]: unclosed reference"), "{err}");
        let illegal = "type: task\ncommands:\n  - echo ${{ run.args.x }}\n";
        let err = commands(illegal, &[]).unwrap_err();
        assert!(err.contains("illegal reference name `run.args.x`"), "{err}");
    }

    #[test]
    fn only_tasks_and_services_take_arguments() {
        let mut dev = parse("type: dev-environment\nide: vscode\n", "d.yml").unwrap();
        assert!(apply(&mut dev, &[]).is_ok());
        let err = apply(&mut dev, &args(&["x"])).unwrap_err();
        assert!(
            err[0].2.contains("a dev-environment takes no arguments"),
            "{err:?}"
        );
    }
}
