//! `dstack delete -f FILE`: deletes the resource a configuration file names.

use std::path::PathBuf;
use std::process::ExitCode;

use dstack_core::config::Configuration;
use dstack_core::Client;

use crate::Failure;

/// Arguments of `dstack delete`.
#[derive(clap::Args)]
pub struct DeleteArgs {
    /// The configuration file (`-` reads standard input).
    #[arg(short, long, default_value = ".dstack.yml", value_name = "FILE")]
    file: PathBuf,
    /// Do not ask for confirmation.
    #[arg(short, long)]
    yes: bool,
}

/// `dstack delete -f FILE`: the fleet or volume the file names is deleted as by `dstack fleet
/// delete` / `dstack volume delete`. Runs and gateways are refused with the reason.
pub async fn delete(client: &Client, args: &DeleteArgs) -> Result<ExitCode, Failure> {
    let configuration = crate::apply::load(&args.file, &[])?;
    let file = args.file.display();
    let Some(name) = configuration.name().map(str::to_string) else {
        return Err(Failure::new(format!(
            "{file} names no {} to delete (it has no `name:`)",
            configuration.type_name()
        )));
    };
    match configuration {
        Configuration::Fleet(_) => {
            let args = crate::fleet::DeleteArgs {
                name,
                yes: args.yes,
                force: false,
                instances: Vec::new(),
            };
            crate::fleet::delete(client, &args).await
        }
        Configuration::Volume(_) => {
            let args = crate::volume::DeleteArgs {
                name,
                yes: args.yes,
            };
            crate::volume::delete(client, &args).await
        }
        Configuration::Gateway(_) => Err(Failure::new(format!(
            "{file}: gateways are not supported, so there is no gateway {name} to delete"
        ))),
        Configuration::Task(_) | Configuration::Service(_) | Configuration::DevEnvironment(_) => {
            Err(Failure::new(format!(
                "{file}: deleting runs is not supported yet: every run's record is kept (see \
                 `dstack ps -a`); stop an active run with `dstack stop {name}`"
            )))
        }
    }
}
