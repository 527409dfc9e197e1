//! `dstack project`: the projects of the client configuration (`$DSTACK_HOME/config.yml`),
//! each a server URL and a token; commands use the default one, or `--project NAME`
//! (`$DSTACK_PROJECT`).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use dstack_core::client::home::{ClientConfig, Project};
use dstack_core::client::{Remote, ServerError};

use crate::table::Table;
use crate::Failure;

/// How long `project add` and `project list -v` wait for a server.
const ASK_TIMEOUT: Duration = Duration::from_secs(10);

/// `dstack project` subcommands.
#[derive(clap::Subcommand)]
pub enum ProjectAction {
    /// Add or update a project: a server and a token (checked with the server first).
    Add(AddArgs),
    /// Delete a project from the configuration (nothing on its server changes).
    Delete(DeleteArgs),
    /// List the configured projects (the default).
    List(ListArgs),
    /// Set the default project.
    SetDefault(SetDefaultArgs),
}

/// Arguments of `dstack project add`.
#[derive(clap::Args)]
pub struct AddArgs {
    /// The name of the project on its server.
    #[arg(long)]
    name: String,
    /// The server's URL.
    #[arg(long)]
    url: String,
    /// The user's token on that server.
    #[arg(long)]
    token: String,
    /// Make it the default project without asking.
    #[arg(short, long, conflicts_with = "no")]
    yes: bool,
    /// Do not make it the default project (and do not ask).
    #[arg(short, long)]
    no: bool,
}

/// Arguments of `dstack project delete`.
#[derive(clap::Args)]
pub struct DeleteArgs {
    /// The name of the project to delete.
    #[arg(long)]
    name: String,
    /// Do not ask for confirmation.
    #[arg(short, long)]
    yes: bool,
}

/// Arguments of `dstack project list` (and of `dstack project` alone).
#[derive(clap::Args, Default)]
pub struct ListArgs {
    /// Also ask each server which user the token is.
    #[arg(short, long)]
    verbose: bool,
}

/// Arguments of `dstack project set-default`.
#[derive(clap::Args)]
pub struct SetDefaultArgs {
    /// The name of the project to set as default.
    name: String,
}

/// `dstack project …`.
pub async fn run(
    home: &Path,
    action: Option<ProjectAction>,
    list: &ListArgs,
) -> Result<ExitCode, Failure> {
    let mut config = ClientConfig::load(home).map_err(|e| Failure::new(e.to_string()))?;
    match action {
        None => self::list(&config, list).await,
        Some(ProjectAction::List(args)) => self::list(&config, &args).await,
        Some(ProjectAction::Add(args)) => {
            check(&args).await?;
            let default = if args.no {
                false
            } else {
                args.yes
                    || config.project(None).is_none()
                    || crate::confirm(&format!("Set '{}' as your default project?", args.name))
            };
            config.configure(Project {
                name: args.name,
                url: args.url.trim_end_matches('/').to_string(),
                token: args.token,
                default,
            });
            save(home, &config)
        }
        Some(ProjectAction::Delete(args)) => {
            if config.project(Some(&args.name)).is_none() {
                return Err(Failure::new(format!("Project '{}' not found", args.name)));
            }
            let question = format!("Are you sure you want to delete project '{}'?", args.name);
            if !args.yes && !crate::confirm(&question) {
                return Ok(ExitCode::from(1));
            }
            config.remove(&args.name);
            save(home, &config)
        }
        Some(ProjectAction::SetDefault(args)) => {
            if !config.set_default(&args.name) {
                return Err(Failure::new(format!("Project '{}' not found", args.name)));
            }
            save(home, &config)
        }
    }
}

/// Asks the server whether it has the project and takes the token, as dstack's `project
/// add` does (`projects/{name}/get`).
async fn check(args: &AddArgs) -> Result<(), Failure> {
    let remote = Remote::new(&args.url, &args.name, &args.token)
        .map_err(|e| Failure::new(format!("--url {}: {e}", args.url)))?;
    let path = format!("/api/projects/{}/get", args.name);
    match remote
        .post::<serde_json::Value>(&path, &serde_json::json!({}), ASK_TIMEOUT)
        .await
    {
        Ok(_) => Ok(()),
        Err(ServerError::Refused {
            status: 401 | 403, ..
        }) => Err(Failure::new("Forbidden. Ensure the token is valid.")),
        Err(e @ ServerError::Refused { .. })
            if matches!(&e, ServerError::Refused { status: 404, .. })
                || e.code() == Some("resource_not_exists") =>
        {
            Err(Failure::new(format!("Project '{}' not found.", args.name)))
        }
        Err(e) => Err(Failure::new(format!("{}: {e}", args.url))),
    }
}

/// Writes the configuration and says where.
fn save(home: &Path, config: &ClientConfig) -> Result<ExitCode, Failure> {
    config
        .save(home)
        .map_err(|e| Failure::new(format!("cannot write the configuration: {e}")))?;
    println!(
        "Configuration updated at {}",
        dstack_core::client::home::client_config_file(home).display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The projects as dstack lists them: PROJECT, URL, (USER,) DEFAULT.
async fn list(config: &ClientConfig, args: &ListArgs) -> Result<ExitCode, Failure> {
    let default = config.project(None).map(|p| p.name.clone());
    let mut header = vec!["PROJECT", "URL"];
    if args.verbose {
        header.push("USER");
    }
    header.push("DEFAULT");
    let mut table = Table::new(&header);
    for project in &config.projects {
        let mut row = vec![project.name.clone(), project.url.clone()];
        if args.verbose {
            row.push(user_of(project).await);
        }
        let is_default = default.as_deref() == Some(project.name.as_str());
        row.push(if is_default { "✓" } else { "" }.to_string());
        table.row(row);
    }
    print!("{}", table.render());
    Ok(ExitCode::SUCCESS)
}

/// The user a project's token is, as its server says (`users/get_my_user`).
async fn user_of(project: &Project) -> String {
    let Ok(remote) = Remote::new(&project.url, &project.name, &project.token) else {
        return "(invalid URL)".to_string();
    };
    match remote
        .post::<serde_json::Value>(
            "/api/users/get_my_user",
            &serde_json::json!({}),
            ASK_TIMEOUT,
        )
        .await
    {
        Ok(user) => user["username"].as_str().unwrap_or("?").to_string(),
        Err(ServerError::Refused {
            status: 401 | 403, ..
        }) => "(invalid token)".to_string(),
        Err(_) => "(unreachable)".to_string(),
    }
}
