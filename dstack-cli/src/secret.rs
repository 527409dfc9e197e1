//! `dstack secret list|get|set|delete`: the secrets of the project's server (for a local one,
//! `$DSTACK_HOME/secrets.json`, see `dstack_core::secrets`), used in configurations as
//! `${{ secrets.NAME }}` in `env` values and `registry_auth`. Only `get` prints a value.

use std::io::{IsTerminal, Read};
use std::process::ExitCode;

use dstack_core::secrets::MAX_VALUE_BYTES;
use dstack_core::Client;

use crate::Failure;

/// `dstack secret` subcommands.
#[derive(clap::Subcommand)]
pub enum SecretAction {
    /// List the secrets' names (the default; values are never listed).
    List,
    /// Print a secret's value.
    Get {
        /// The secret.
        name: String,
    },
    /// Create or replace a secret.
    ///
    /// Without VALUE, the value is read from standard input (so that it stays out of the shell
    /// history and the process list), up to the end of input less one trailing newline.
    Set {
        /// The secret (letters, digits and underscores, starting with a letter or `_`).
        name: String,
        /// The value (read from standard input when omitted).
        value: Option<String>,
    },
    /// Delete secrets.
    Delete {
        /// The secrets to delete.
        #[arg(required = true)]
        names: Vec<String>,
        /// Do not ask for confirmation.
        #[arg(short, long)]
        yes: bool,
    },
}

/// Runs a `dstack secret` subcommand on the secrets of the project's server.
pub async fn run(client: &Client, action: Option<SecretAction>) -> Result<ExitCode, Failure> {
    let secrets = client.secrets();
    match action.unwrap_or(SecretAction::List) {
        SecretAction::List => {
            let names = secrets.names().await?;
            if names.is_empty() {
                eprintln!("No secrets. Set one with `dstack secret set NAME`.");
            }
            for name in names {
                println!("{name}");
            }
        }
        SecretAction::Get { name } => match secrets.get(&name).await? {
            Some(value) => println!("{value}"),
            None => return Err(Failure::new(format!("secret {name} does not exist"))),
        },
        SecretAction::Set { name, value } => {
            let value = match value {
                Some(value) => value,
                None => read_value(&name)?,
            };
            secrets.set(&name, &value).await?;
            eprintln!("Secret {name} set");
        }
        SecretAction::Delete { names, yes } => {
            let question = format!("Delete secret(s) {}?", names.join(", "));
            if !yes && !crate::confirm(&question) {
                return Ok(ExitCode::FAILURE);
            }
            let mut missing = Vec::new();
            for name in names {
                if secrets.delete(&name).await? {
                    eprintln!("Secret {name} deleted");
                } else {
                    missing.push(name);
                }
            }
            if !missing.is_empty() {
                return Err(Failure::new(format!(
                    "no such secret: {}",
                    missing.join(", ")
                )));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A value from standard input (a prompt first on a terminal), bounded in size.
fn read_value(name: &str) -> Result<String, Failure> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("Value of {name} (end with Ctrl-D): ");
    }
    let mut value = String::new();
    stdin
        .lock()
        .take(MAX_VALUE_BYTES as u64 + 2)
        .read_to_string(&mut value)
        .map_err(|e| Failure::new(format!("cannot read the value from standard input: {e}")))?;
    if value.ends_with('\n') {
        value.pop();
        if value.ends_with('\r') {
            value.pop();
        }
    }
    Ok(value)
}
