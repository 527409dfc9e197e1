//! The `dstack` command-line interface.

mod apply;
mod artifacts;
mod delete;
mod event;
mod fleet;
mod gpu_groups;
mod init;
mod logs;
mod offer;
mod overrides;
mod profiles;
mod project;
mod ps;
mod runs;
mod secret;
mod server;
mod ssh;
mod table;
mod tags;
mod validate;
mod volume;
mod workflow;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// dstack-rs: run AI workloads on this machine, your own servers, or the cloud.
#[derive(Parser)]
#[command(name = "dstack", version, about, long_about = None)]
struct Cli {
    /// The project of `$DSTACK_HOME/config.yml` to use (`dstack project list`); defaults to
    /// $DSTACK_PROJECT, else the default project.
    #[arg(long, global = true, value_name = "NAME")]
    project: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply a configuration: plan it, submit the run and stream its logs.
    ///
    /// Exits with the job's exit code. Ctrl-C detaches and leaves the run running.
    Apply(apply::ApplyArgs),
    /// Run a workflow of `.dstack/workflows.yaml` (`dstack run train --epoch 2`), or a
    /// provider directly (`dstack run python train.py --epoch 2`).
    ///
    /// The run is an ordinary one afterwards (`ps`, `logs`, `stop`, `attach`, `ssh`); the
    /// flags before the name are `dstack apply`'s.
    Run(workflow::RunArgs),
    /// List runs (unfinished ones unless --all).
    Ps(ps::PsArgs),
    /// Print the output of a run.
    Logs(logs::LogsArgs),
    /// Attach to a run: forward its ports to localhost (and stream its output with --logs)
    /// until it ends; `ssh <run>` works meanwhile (and whenever the run runs).
    ///
    /// Ctrl-C detaches and leaves the run running.
    Attach(runs::AttachArgs),
    /// Stop runs (gracefully, or at once with -x).
    Stop(runs::StopArgs),
    /// Delete the fleet or volume a configuration file names.
    #[command(visible_alias = "destroy")]
    Delete(delete::DeleteArgs),
    /// Show where a run with these resources could run.
    Offer(offer::OfferArgs),
    /// List fleets and their instances (`dstack fleet delete NAME` deletes one).
    Fleet {
        #[command(subcommand)]
        action: Option<FleetAction>,
        #[command(flatten)]
        list: fleet::ListArgs,
    },
    /// List network volumes (`dstack volume delete NAME` deletes one).
    Volume {
        #[command(subcommand)]
        action: Option<VolumeAction>,
        #[command(flatten)]
        list: fleet::ListArgs,
    },
    /// Manage secrets: `${{ secrets.NAME }}` in `env` values and `registry_auth`.
    ///
    /// Kept by the project's server (locally: 0600 in $DSTACK_HOME/secrets.json, apart from
    /// the state database), resolved only when a job is handed to its agent, and printed only
    /// by `get`.
    Secret {
        #[command(subcommand)]
        action: Option<secret::SecretAction>,
    },
    /// List or download a run's artifacts (the `artifacts` paths of a workflow, saved while
    /// it runs and frozen when it ends).
    Artifacts {
        #[command(subcommand)]
        action: artifacts::ArtifactsAction,
    },
    /// Name a finished run's artifacts (or files uploaded from here) for `depends-on`.
    Tags {
        #[command(subcommand)]
        action: Option<tags::TagsAction>,
    },
    /// View events: the status changes of runs, jobs, instances, fleets and volumes, with
    /// their reasons (`-w` follows new ones).
    Event(event::EventArgs),
    /// Check configuration files and show them normalized, as dstack would read them.
    ///
    /// Exits 0 when every file is valid and 1 when any is not; each problem is printed on
    /// stderr as FILE:LINE:COL: FIELD: MESSAGE [CODE].
    Validate(validate::Args),
    /// Run the server of this state directory ($DSTACK_HOME) in the foreground.
    ///
    /// The server hosts the engine (placement, retries, schedules, idle instances) and serves
    /// dstack's REST API. Every other command starts one in the background when none
    /// answers, so this is only needed to watch it or to serve other machines (--host).
    Server(server::ServerArgs),
    /// Initialize a repo: check that it can be cloned (with the token or key given, else
    /// this machine's git credentials) and register those credentials for the runs that
    /// clone it (`repos:` with a `url`).
    Init(init::InitArgs),
    /// Manage projects: the servers (URL and token) this client talks to.
    Project {
        #[command(subcommand)]
        action: Option<project::ProjectAction>,
        #[command(flatten)]
        list: project::ListArgs,
    },
    /// Print the shell completion script: `source <(dstack completion bash)`, or for zsh
    /// `dstack completion zsh > "${fpath[1]}/_dstack"`.
    Completion {
        /// The shell.
        shell: CompletionShell,
    },
    /// Carry an SSH connection to a running job over standard input and output (the
    /// `ProxyCommand` of the `ssh <run>` entries).
    #[command(hide = true)]
    SshProxy(ssh::ProxyArgs),
}

/// `dstack fleet` subcommands.
#[derive(Subcommand)]
enum FleetAction {
    /// List fleets and their instances (the default).
    List(fleet::ListArgs),
    /// Show one fleet and its instances.
    Get(fleet::GetArgs),
    /// Delete a fleet: stop its hosts' agents and remove what was installed on them.
    Delete(fleet::DeleteArgs),
}

/// The shells `dstack completion` writes for.
#[derive(Clone, Copy, clap::ValueEnum)]
enum CompletionShell {
    /// bash.
    Bash,
    /// zsh.
    Zsh,
}

/// `dstack volume` subcommands.
#[derive(Subcommand)]
enum VolumeAction {
    /// List volumes (the default).
    List(fleet::ListArgs),
    /// Show one volume (`--json`: dstack's `Volume`).
    Get(volume::GetArgs),
    /// Delete a volume attached nowhere (a registered one is only forgotten).
    Delete(volume::DeleteArgs),
}

/// A command failure: printed on stderr, exit status 1.
#[derive(Debug)]
pub struct Failure(String);

impl Failure {
    /// A failure with this message.
    pub fn new(message: impl Into<String>) -> Self {
        Failure(message.into())
    }
}

impl From<overrides::OverrideError> for Failure {
    fn from(e: overrides::OverrideError) -> Self {
        Failure(e.to_string())
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<dstack_core::engine::EngineError> for Failure {
    fn from(e: dstack_core::engine::EngineError) -> Self {
        Failure(e.to_string())
    }
}

/// Asks a yes/no question on the terminal; without a terminal the answer is no (scripts
/// pass `-y`), and says so.
pub fn confirm(question: &str) -> bool {
    if !std::io::stdin().is_terminal() {
        eprintln!("{question} No terminal to answer on: pass -y/--yes to confirm.");
        return false;
    }
    eprint!("{question} [y/n]: ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer).is_ok() && answer.trim().eq_ignore_ascii_case("y")
}

/// A client of the server of `$DSTACK_HOME` (started when none answers), and the home; for
/// commands that start or attach to runs (`runs`), `ssh <run>` is made to work first.
pub async fn connect(runs: bool) -> Result<(dstack_core::Client, std::path::PathBuf), Failure> {
    let exe = std::env::current_exe().ok();
    let home = dstack_core::client::default_home();
    let client = dstack_core::Client::connect(&home, exe.as_deref()).await?;
    if runs {
        ssh::ensure_include(&home);
        ssh::remember_user_key(&home);
    }
    Ok((client, home))
}

async fn dispatch(command: Command) -> Result<ExitCode, Failure> {
    match command {
        Command::Validate(args) => return Ok(validate::run(&args)),
        Command::Server(args) => return server::run(args).await,
        Command::SshProxy(args) => return ssh::proxy(&args).await,
        Command::Project { action, list } => {
            return project::run(&dstack_core::client::default_home(), action, &list).await
        }
        Command::Completion { shell } => {
            let shell = match shell {
                CompletionShell::Bash => clap_complete::Shell::Bash,
                CompletionShell::Zsh => clap_complete::Shell::Zsh,
            };
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "dstack", &mut script);
            return match std::io::Write::write_all(&mut std::io::stdout(), &script) {
                // A closed pipe (`| head`) is no failure.
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    Err(Failure::new(format!("cannot write the script: {e}")))
                }
                _ => Ok(ExitCode::SUCCESS),
            };
        }
        // Its words are checked before the server is asked for.
        Command::Run(args) => return workflow::run(&args).await,
        _ => {}
    }
    let runs = matches!(command, Command::Apply(_) | Command::Attach(_));
    let (client, home) = connect(runs).await?;
    match command {
        Command::Apply(args) => apply::apply(&client, &args).await,
        Command::Secret { action } => secret::run(&client, action).await,
        Command::Init(args) => init::init(&client, &args).await,
        Command::Artifacts { action } => artifacts::run(&client, action).await,
        Command::Tags { action } => tags::run(&client, action).await,
        Command::Ps(args) => ps::ps(&client, &args).await,
        Command::Logs(args) => logs::logs(&client, &args).await,
        Command::Attach(args) => runs::attach_cmd(&client, &home, &args).await,
        Command::Stop(args) => runs::stop(&client, &args).await,
        Command::Delete(args) => delete::delete(&client, &args).await,
        Command::Offer(args) => offer::offer(&client, &args).await,
        Command::Event(args) => event::run(&client, &args).await,
        Command::Fleet { action, list } => match action {
            None => fleet::list(&client, list).await,
            Some(FleetAction::List(args)) => fleet::list(&client, args).await,
            Some(FleetAction::Get(args)) => fleet::get(&client, &args).await,
            Some(FleetAction::Delete(args)) => fleet::delete(&client, &args).await,
        },
        Command::Volume { action, list } => match action {
            None => volume::list(&client, list).await,
            Some(VolumeAction::List(args)) => volume::list(&client, args).await,
            Some(VolumeAction::Get(args)) => volume::get(&client, &args).await,
            Some(VolumeAction::Delete(args)) => volume::delete(&client, &args).await,
        },
        Command::Validate(_)
        | Command::Server(_)
        | Command::SshProxy(_)
        | Command::Run(_)
        | Command::Project { .. }
        | Command::Completion { .. } => unreachable!("handled above"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(project) = &cli.project {
        // Before any thread starts: every client (and `ssh <run>`'s proxy) reads it.
        std::env::set_var("DSTACK_PROJECT", project);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(Failure(message)) => {
            eprintln!("{message}");
            ExitCode::from(1)
        }
    }
}
