//! `dstack ps`, `dstack logs`, `dstack stop`.

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;

use futures_util::StreamExt;

use dstack_core::client::protocol::Snapshot;
use dstack_core::config::cron::utc_text;
use dstack_core::model::{Job, Run};
use dstack_core::Client;

use crate::table::{ago, Table};
use crate::Failure;

/// Arguments of `dstack ps`.
#[derive(clap::Args)]
pub struct PsArgs {
    /// Show finished runs too.
    #[arg(short, long)]
    all: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Show each job of a run (every replica of a service with its readiness and probes,
    /// every node of a multi-node task).
    #[arg(short, long)]
    verbose: bool,
}

/// Arguments of `dstack logs`.
#[derive(clap::Args)]
pub struct LogsArgs {
    /// The run name.
    run: String,
    /// Keep streaming until the run finishes.
    #[arg(short, long)]
    follow: bool,
}

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
    /// A private key `ssh <run>` also accepts (its public half, `PATH.pub`, is added).
    #[arg(long, value_name = "PATH")]
    ssh_identity: Option<std::path::PathBuf>,
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
        match run
            .forward_job_ports(how.job, how.replica, &how.ports)
            .await
        {
            Ok(forward) => {
                for (here, there) in &forward.ports {
                    eprintln!("Port {there} of the job is reachable at localhost:{here}");
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
        stream_logs(run, true).await?;
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
    /// The run name.
    run: String,
    /// Kill at once instead of stopping gracefully.
    #[arg(short = 'x', long)]
    abort: bool,
    /// Do not ask for confirmation.
    #[arg(short, long)]
    yes: bool,
}

fn latest_job(jobs: &[Job]) -> Option<&Job> {
    jobs.iter()
        .filter(|j| j.slot() == (0, 0))
        .max_by_key(|j| j.submission_num)
}

/// The status column: the status, with the reason when it is not obvious, or the next start
/// of a scheduled run that waits for it.
fn status_text(run: &Run, job: Option<&Job>) -> String {
    let mut s = run.status.to_string();
    if let Some(at) = run.scheduled_start_ms() {
        s.push_str(&format!(" (next {})", utc_text(at)));
    }
    if let Some(job) = job.filter(|_| run.status.is_finished()) {
        match (job.exit_status, job.termination_reason.as_deref()) {
            (Some(code), _) if code != 0 => s.push_str(&format!(" (exit {code})")),
            (_, Some(reason)) if reason != "done_by_runner" => s.push_str(&format!(" ({reason})")),
            _ => {}
        }
    }
    s
}

/// `dstack ps`.
pub async fn ps(client: &Client, args: &PsArgs) -> Result<ExitCode, Failure> {
    let listing = client.runs().listing(args.all).await?;
    for (id, why) in &listing.unreadable {
        eprintln!("warning: the record of run {id} cannot be read ({why}); it is left out");
    }
    let runs = listing.runs;
    // Every listed run's jobs and instances, in one request.
    let ids: Vec<String> = runs.iter().map(|r| r.id.clone()).collect();
    let mut snapshots: HashMap<String, Snapshot> = client
        .runs()
        .snapshots(&ids)
        .await?
        .into_iter()
        .map(|s| (s.run.id.clone(), s))
        .collect();
    if args.json {
        let mut out = Vec::new();
        for run in &runs {
            let jobs = snapshots
                .remove(&run.id)
                .map(|s| s.jobs)
                .unwrap_or_default();
            let mut run = serde_json::to_value(run).unwrap_or_default();
            dstack_core::secrets::redact_run(&mut run);
            out.push(serde_json::json!({ "run": run, "jobs": jobs }));
        }
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = Table::new(&[
        "NAME",
        "BACKEND",
        "RESOURCES",
        "PRICE",
        "STATUS",
        "SUBMITTED",
        "ERROR",
    ]);
    for run in &runs {
        let (jobs, instances) = snapshots
            .remove(&run.id)
            .map(|s| (s.jobs, s.instances))
            .unwrap_or_default();
        let job = latest_job(&jobs);
        let (backend, resources, price) = placement(run, job, &instances);
        let error = job
            .and_then(|j| j.termination_message.clone())
            .filter(|_| run.status == dstack_core::model::RunStatus::Failed)
            .unwrap_or_default();
        table.row(vec![
            run.name.clone(),
            backend,
            resources,
            price,
            status_text(run, job),
            ago(run.submitted_at_ms),
            error,
        ]);
        if args.verbose {
            job_rows(client, &mut table, run, &jobs, &instances).await?;
        }
    }
    print!("{}", table.render());
    for run in runs.iter().filter(|r| !r.status.is_finished()) {
        if let Some(service) = client.service(run) {
            println!("{}: {}", run.name, service.url);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Where a job runs, for a row of `dstack ps`: the backend (and whether it is a container
/// or a process of the host), its resources and its price.
fn placement(
    run: &Run,
    job: Option<&Job>,
    instances: &[dstack_core::model::Instance],
) -> (String, String, String) {
    let resources = job
        .and_then(|j| j.reservation.as_ref())
        .map(|r| {
            let gb = format!("{:.1}", r.memory_mib as f64 / 1024.0);
            let gb = gb.strip_suffix(".0").unwrap_or(&gb);
            let mut s = format!("cpu={} mem={gb}GB", r.cpus);
            if !r.gpus.is_empty() {
                s.push_str(&format!(" gpu={}", r.gpus.len()));
            }
            s
        })
        .unwrap_or_else(|| "-".to_string());
    let instance = job
        .and_then(|j| j.instance_id.as_deref())
        .and_then(|id| instances.iter().find(|i| i.id == id));
    // Which runtime the job uses: a container (`image:`) or a process of the host.
    let runtime = if run
        .spec
        .configuration
        .value()
        .get("image")
        .is_some_and(|i| !i.is_null())
    {
        "container"
    } else {
        "process"
    };
    match instance {
        Some(i) => (format!("{} ({runtime})", i.backend), resources, "$0".into()),
        None => ("-".into(), resources, "-".into()),
    }
}

/// `dstack ps -v`: a row per job of a run with several (a service's replicas with their
/// readiness and probes, a multi-node task's nodes).
async fn job_rows(
    client: &Client,
    table: &mut Table,
    run: &Run,
    jobs: &[Job],
    instances: &[dstack_core::model::Instance],
) -> Result<(), Failure> {
    let mut latest: Vec<&Job> = Vec::new();
    for job in jobs {
        match latest.iter_mut().find(|j| j.slot() == job.slot()) {
            Some(slot) if slot.submission_num < job.submission_num => *slot = job,
            Some(_) => {}
            None => latest.push(job),
        }
    }
    let service = client.service(run).is_some();
    if latest.len() < 2 && !service {
        return Ok(());
    }
    let replicas = match (service, run.status.is_finished()) {
        (true, false) => match client.runs().by_id(&run.id).await? {
            Some(handle) => handle.replicas().await?,
            None => Vec::new(),
        },
        _ => Vec::new(),
    };
    for job in latest {
        let (backend, resources, price) = placement(run, Some(job), instances);
        let mut status = job.status.to_string();
        if let Some(reason) = job.termination_reason.as_deref() {
            status.push_str(&format!(" ({reason})"));
        }
        if let Some(replica) = replicas.iter().find(|r| r.job_id == job.id) {
            status.push_str(if replica.ready {
                ", ready"
            } else {
                ", not ready"
            });
            for (url, streak, needed) in &replica.probes {
                status.push_str(&format!(" [probe {url} {streak}/{needed}]"));
            }
            if let (false, Some(error)) = (replica.ready, &replica.error) {
                status.push_str(&format!(" ({error})"));
            }
        }
        table.row(vec![
            format!("  replica={} job={}", job.replica_num, job.job_num),
            backend,
            resources,
            price,
            status,
            ago(job.submitted_at_ms),
            job.termination_message.clone().unwrap_or_default(),
        ]);
    }
    Ok(())
}

/// Streams a run's logs to stdout.
pub async fn stream_logs(run: &dstack_core::RunHandle, follow: bool) -> Result<(), Failure> {
    let mut logs = run.logs(follow);
    let stdout = std::io::stdout();
    while let Some(chunk) = logs.next().await {
        let chunk = chunk?;
        let mut out = stdout.lock();
        out.write_all(&chunk)
            .map_err(|e| Failure::new(format!("cannot write logs: {e}")))?;
        out.flush().ok();
    }
    Ok(())
}

/// `dstack logs`.
pub async fn logs(client: &Client, args: &LogsArgs) -> Result<ExitCode, Failure> {
    let run = find(client, &args.run).await?;
    stream_logs(&run, args.follow).await?;
    Ok(ExitCode::SUCCESS)
}

/// `dstack stop`.
pub async fn stop(client: &Client, args: &StopArgs) -> Result<ExitCode, Failure> {
    let run = find(client, &args.run).await?;
    if !args.yes && !crate::confirm(&format!("Stop the run {}?", args.run)) {
        return Ok(ExitCode::from(1));
    }
    let stopped = run.stop(args.abort).await?;
    let final_run = if stopped.status.is_finished() {
        stopped
    } else {
        run.wait().await?
    };
    println!("{} {}", final_run.name, final_run.status);
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
