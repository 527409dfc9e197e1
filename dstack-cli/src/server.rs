//! `dstack server`: the state directory's server in the foreground (or, with `--auto`, as a
//! client starts it: exiting once idle).

use std::process::ExitCode;

use dstack_server::{ServerOptions, DEFAULT_PORT};

use crate::Failure;

/// Arguments of `dstack server`.
#[derive(clap::Args)]
pub struct ServerArgs {
    /// The address to listen on (`DSTACK_SERVER_HOST`, default 127.0.0.1). Another address
    /// serves other machines: they need the admin token of $DSTACK_HOME/config.yml.
    #[arg(long)]
    host: Option<String>,
    /// The port (`DSTACK_SERVER_PORT`, default 3000; a started-on-demand server takes any
    /// free port when 3000 is taken).
    #[arg(short, long)]
    port: Option<u16>,
    /// The admin token clients must send (default: the one generated on first start, kept
    /// in $DSTACK_HOME/server/token and written to $DSTACK_HOME/config.yml). A command line
    /// is visible to every user of this machine: prefer writing the token to that file.
    #[arg(long)]
    token: Option<String>,
    /// Started on demand by a client: exit once nothing needs supervision and no client has
    /// called for `DSTACK_SERVER_IDLE_EXIT` seconds (default 600).
    #[arg(long, hide = true)]
    auto: bool,
}

/// `dstack server`.
pub async fn run(args: ServerArgs) -> Result<ExitCode, Failure> {
    let home = dstack_core::client::default_home();
    let mut options = ServerOptions::from_env(home.clone(), args.auto)
        .map_err(|e| Failure::new(e.to_string()))?;
    if let Some(host) = args.host {
        options.host = host;
    }
    if let Some(port) = args.port {
        options.port = Some(port);
    } else if !args.auto && options.port.is_none() {
        options.port = Some(DEFAULT_PORT);
    }
    options.token = args.token;
    let auto = args.auto;
    let ready = |url: &str| {
        if !auto {
            println!(
                "The dstack server for {} is running at {url}",
                home.display()
            );
            println!(
                "Clients of this machine find it through {}",
                dstack_core::client::home::client_config_file(&home).display()
            );
        } else {
            eprintln!("dstack server: listening at {url}");
        }
    };
    dstack_server::serve(options, ready)
        .await
        .map_err(|e| Failure::new(format!("dstack server: {e}")))?;
    Ok(ExitCode::SUCCESS)
}
