//! `dstack attach`, `dstack stop`.

use std::net::{IpAddr, Ipv4Addr, ToSocketAddrs};
use std::process::ExitCode;

use dstack_core::client::protocol::LogQuery;
use dstack_core::Client;

use crate::Failure;

/// Arguments of `dstack attach`.
#[derive(clap::Args)]
pub struct AttachArgs {
    /// The run name.
    run: String,
    /// Stream the job's output until the run ends.
    #[arg(long)]
    logs: bool,
    /// Forward port REMOTE of the job to LOCAL here (`LOCAL:REMOTE`, or one number for both),
    /// whether it is among the run's `ports` or not; repeatable.
    #[arg(short = 'p', long = "port", value_name = "[LOCAL:]REMOTE", value_parser = port_mapping)]
    ports: Vec<(u16, u16)>,
    /// The job (node rank) to attach to.
    #[arg(long, default_value_t = 0)]
    job: u32,
    /// The replica to attach to.
    #[arg(long, default_value_t = 0)]
    replica: u32,
    /// With --logs: only output newer than this, a duration (e.g. 10s, 5m, 1d) or an RFC 3339
    /// time (e.g. 2023-09-24T15:30:00Z).
    #[arg(long, value_name = "SINCE", value_parser = crate::logs::since)]
    since: Option<crate::logs::Since>,
    /// A private key `ssh <run>` also accepts (its public half, `PATH.pub`, is added).
    #[arg(long, value_name = "PATH")]
    ssh_identity: Option<std::path::PathBuf>,
    /// The local address forwarded ports listen on (`localhost` by default).
    #[arg(long = "host", value_name = "HOST", value_parser = bind_address)]
    host: Option<IpAddr>,
}

/// `--host`: an IP address, or a name this machine resolves (`localhost`).
pub fn bind_address(text: &str) -> Result<IpAddr, String> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(ip);
    }
    (text, 0)
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .map(|a| a.ip())
        .ok_or_else(|| format!("{text:?} is not an address of this machine's"))
}

/// `[LOCAL:]REMOTE`.
fn port_mapping(text: &str) -> Result<(u16, u16), String> {
    let port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{p:?} is not a port number"))
    };
    match text.split_once(':') {
        Some((here, there)) => Ok((port(here)?, port(there)?)),
        None => port(text).map(|p| (p, p)),
    }
}

/// What to attach to, and how.
#[derive(Default)]
pub struct Attach {
    /// The job (node rank).
    pub job: u32,
    /// The replica.
    pub replica: u32,
    /// Port overrides (`(local, remote)`).
    pub ports: Vec<(u16, u16)>,
    /// Stream the job's output.
    pub logs: bool,
    /// Only output written at this time (Unix ms) or later.
    pub since_ms: Option<u64>,
    /// Where forwarded ports listen (`127.0.0.1` when `None`).
    pub bind: Option<IpAddr>,
}

/// Waits until the run is running, forwards the job's ports to this machine (for jobs on
/// other hosts, or moved ones) and says how to connect, streams the output (`logs`) and
/// waits until the run finishes; returns the finished run and its exit status.
pub async fn attach(
    run: &dstack_core::RunHandle,
    how: &Attach,
) -> Result<(dstack_core::model::Run, Option<i32>), Failure> {
    let current = run
        .wait_until(|s| s == dstack_core::model::RunStatus::Running)
        .await?;
    if let Some(service) = run.service(&current) {
        if !current.status.is_finished() {
            eprintln!("Service is published at {}", service.url);
            if let (Some(model), Some(base)) = (&service.model, &service.model_base_url) {
                eprintln!("Model {model} is published at {base}");
            }
        }
    }
    let _forwarding = if current.status.is_finished() {
        None
    } else {
        let host = match (how.job, how.replica) {
            (0, 0) => run.name().to_string(),
            (job, replica) => format!("{}-{job}-{replica}", run.name()),
        };
        eprintln!("Connect with: ssh {host}");
        print_ide_link(run).await;
        let bind = how.bind.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        match run
            .forward_job_ports_on(bind, how.job, how.replica, &how.ports)
            .await
        {
            Ok(forward) => {
                let at = match bind {
                    IpAddr::V4(Ipv4Addr::LOCALHOST) => "localhost".to_string(),
                    IpAddr::V6(ip) => format!("[{ip}]"),
                    ip => ip.to_string(),
                };
                for (here, there) in &forward.ports {
                    eprintln!("Port {there} of the job is reachable at {at}:{here}");
                }
                Some(forward)
            }
            Err(e) => {
                eprintln!("warning: ports are not forwarded: {e}");
                None
            }
        }
    };
    if how.logs {
        let query = LogQuery {
            follow: true,
            replica_num: how.replica,
            job_num: how.job,
            since_ms: how.since_ms,
        };
        crate::logs::write_stream(run, query).await?;
    }
    let finished = run.wait().await?;
    Ok((finished, run.exit_status().await?))
}

/// Prints the link that opens a dev environment in its IDE (`ide:`), if it has one.
async fn print_ide_link(run: &dstack_core::RunHandle) {
    match run.ide_link().await {
        Ok(Some(link)) => println!("Open in the IDE: {link}"),
        Ok(None) => {}
        Err(e) => eprintln!("warning: no IDE link: {e}"),
    }
}

/// `dstack attach NAME`: forward ports (and stream logs with `--logs`) until the run ends
/// (Ctrl-C detaches).
pub async fn attach_cmd(
    client: &Client,
    home: &std::path::Path,
    args: &AttachArgs,
) -> Result<ExitCode, Failure> {
    let run = client
        .runs()
        .get(&args.run)
        .await?
        .ok_or_else(|| Failure::new(format!("no run named {}", args.run)))?;
    if let Some(identity) = &args.ssh_identity {
        crate::ssh::accept_identity(home, identity)?;
    }
    let how = Attach {
        job: args.job,
        replica: args.replica,
        ports: args.ports.clone(),
        logs: args.logs,
        since_ms: args.since.map(|s| s.0),
        bind: args.host,
    };
    tokio::select! {
        result = attach(&run, &how) => {
            let (finished, code) = result?;
            eprintln!("\nRun {} {}", finished.name, finished.status);
            Ok(crate::apply::exit_code(&finished, code))
        }
        _ = tokio::signal::ctrl_c() => {
            eprintln!("\nDetached from {}; it keeps running", run.name());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Arguments of `dstack stop`.
#[derive(clap::Args)]
pub struct StopArgs {
    /// The runs, by name.
    #[arg(value_name = "RUN", required = true)]
    runs: Vec<String>,
    /// Kill at once instead of stopping gracefully.
    #[arg(short = 'x', long)]
    abort: bool,
    /// Do not ask for confirmation.
    #[arg(short, long)]
    yes: bool,
}

/// `dstack stop RUN…`: every run is found before any is stopped, all are stopped in one
/// request, then each is waited for.
pub async fn stop(client: &Client, args: &StopArgs) -> Result<ExitCode, Failure> {
    let mut runs = Vec::with_capacity(args.runs.len());
    for name in &args.runs {
        runs.push(find(client, name).await?);
    }
    let question = match args.runs.as_slice() {
        [one] => format!("Stop the run {one}?"),
        many => format!("Stop the runs {}?", many.join(", ")),
    };
    if !args.yes && !crate::confirm(&question) {
        return Ok(ExitCode::from(1));
    }
    let ids: Vec<String> = runs.iter().map(|r| r.id().to_string()).collect();
    client.runs().stop_many(&ids, args.abort).await?;
    for run in &runs {
        let stopped = run.run().await?;
        let final_run = if stopped.status.is_finished() {
            stopped
        } else {
            run.wait().await?
        };
        println!("{} {}", final_run.name, final_run.status);
    }
    Ok(ExitCode::SUCCESS)
}

/// A run by name, or a clear error.
pub async fn find(client: &Client, name: &str) -> Result<dstack_core::RunHandle, Failure> {
    client
        .runs()
        .get(name)
        .await?
        .ok_or_else(|| Failure::new(format!("run {name} not found; see `dstack ps -a`")))
}
