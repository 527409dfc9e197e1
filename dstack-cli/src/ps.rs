//! `dstack ps`: the runs as a table (`-v`: a row per job), as JSON (`--format json`), or
//! redrawn in place until Ctrl-C (`-w/--watch`).

use std::collections::HashMap;
use std::process::ExitCode;

use dstack_core::client::protocol::Snapshot;
use dstack_core::config::cron::utc_text;
use dstack_core::model::{Instance, Job, Run};
use dstack_core::Client;

use crate::table::{ago, Table};
use crate::Failure;

/// Arguments of `dstack ps`.
#[derive(clap::Args)]
pub struct PsArgs {
    /// Show finished runs too.
    #[arg(short, long)]
    all: bool,
    /// Show each job of a run (every replica of a service with its readiness and probes,
    /// every node of a multi-node task).
    #[arg(short, long)]
    verbose: bool,
    /// Watch the runs: redraw the table in place every 2 seconds until Ctrl-C.
    #[arg(short, long)]
    watch: bool,
    /// Show only the last N runs (implies --all).
    #[arg(short = 'n', long = "last", value_name = "N")]
    last: Option<usize>,
    /// The output format.
    #[arg(long, value_enum, default_value_t = Format::Plain)]
    format: Format,
    /// Print JSON (the same as --format json).
    #[arg(long)]
    json: bool,
}

/// The output formats of `dstack ps`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A table.
    Plain,
    /// Each run's record with its jobs.
    Json,
}

impl PsArgs {
    /// The format asked for (`--json` is `--format json`).
    fn format(&self) -> Format {
        if self.json {
            Format::Json
        } else {
            self.format
        }
    }
}

/// `dstack ps`.
pub async fn ps(client: &Client, args: &PsArgs) -> Result<ExitCode, Failure> {
    match (args.watch, args.format()) {
        (true, Format::Json) => Err(Failure::new(
            "JSON output is not supported together with --watch",
        )),
        (true, Format::Plain) => crate::table::watch(|| table(client, args)).await,
        (false, Format::Json) => {
            println!("{}", json(client, args).await?);
            Ok(ExitCode::SUCCESS)
        }
        (false, Format::Plain) => {
            print!("{}", table(client, args).await?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The runs `dstack ps` lists (newest first), with their jobs and instances.
async fn listed(client: &Client, args: &PsArgs) -> Result<Vec<Listed>, Failure> {
    let all = args.all || args.last.is_some();
    let listing = client.runs().listing_limited(all, args.last).await?;
    for (id, why) in &listing.unreadable {
        eprintln!("warning: the record of run {id} cannot be read ({why}); it is left out");
    }
    // Every listed run's jobs and instances, in one request.
    let ids: Vec<String> = listing.runs.iter().map(|r| r.id.clone()).collect();
    let mut snapshots: HashMap<String, Snapshot> = client
        .runs()
        .snapshots(&ids)
        .await?
        .into_iter()
        .map(|s| (s.run.id.clone(), s))
        .collect();
    Ok(listing
        .runs
        .into_iter()
        .map(|run| {
            let (jobs, instances) = snapshots
                .remove(&run.id)
                .map(|s| (s.jobs, s.instances))
                .unwrap_or_default();
            Listed {
                run,
                jobs,
                instances,
            }
        })
        .collect())
}

/// A run as `dstack ps` lists it.
struct Listed {
    run: Run,
    jobs: Vec<Job>,
    instances: Vec<Instance>,
}

/// `dstack ps --format json`: each run's record (secrets redacted) with its jobs.
async fn json(client: &Client, args: &PsArgs) -> Result<String, Failure> {
    let mut out = Vec::new();
    for listed in listed(client, args).await? {
        let mut run = serde_json::to_value(&listed.run).unwrap_or_default();
        dstack_core::secrets::redact_run(&mut run);
        out.push(serde_json::json!({ "run": run, "jobs": listed.jobs }));
    }
    Ok(serde_json::to_string_pretty(&out).unwrap_or_default())
}

/// The table of `dstack ps`, and the URLs of unfinished services below it.
async fn table(client: &Client, args: &PsArgs) -> Result<String, Failure> {
    let runs = listed(client, args).await?;
    let mut table = Table::new(&[
        "NAME",
        "BACKEND",
        "RESOURCES",
        "PRICE",
        "STATUS",
        "SUBMITTED",
        "ERROR",
    ]);
    for Listed {
        run,
        jobs,
        instances,
    } in &runs
    {
        let job = latest_job(jobs);
        let (backend, resources, price) = placement(run, job, instances);
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
            job_rows(client, &mut table, run, jobs, instances).await?;
        }
    }
    let mut text = table.render();
    for run in runs
        .iter()
        .map(|l| &l.run)
        .filter(|r| !r.status.is_finished())
    {
        if let Some(service) = client.service(run) {
            text.push_str(&format!("{}: {}\n", run.name, service.url));
        }
    }
    Ok(text)
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
