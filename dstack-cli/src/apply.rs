//! `dstack apply -f FILE`: plan, submit, attach and stream logs; exit with the job's code.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use dstack_core::config::limits::{self, ReadError};
use dstack_core::config::{self, Configuration};
use dstack_core::engine::{ApplyOptions, RunPlan};
use dstack_core::model::{Run, RunStatus};
use dstack_core::Client;

use crate::table::{resources, Table};
use crate::Failure;

/// Arguments of `dstack apply`.
#[derive(clap::Args)]
pub struct ApplyArgs {
    /// The configuration file (`-` reads standard input).
    #[arg(short, long, default_value = ".dstack.yml", value_name = "FILE")]
    file: PathBuf,
    #[command(flatten)]
    submit: SubmitArgs,
    /// dstack's override flags (resources and profile settings).
    #[command(flatten)]
    overrides: crate::overrides::Overrides,
    /// `--profile NAME` / `--no-profile`.
    #[command(flatten)]
    profile: crate::profiles::ProfileArgs,
    /// Arguments for `${{ run.args }}` in the commands of a task or service (after `--`).
    #[arg(last = true, value_name = "ARGS")]
    run_args: Vec<String>,
}

/// How a run configuration is submitted: the flags `dstack apply` and `dstack run` share.
#[derive(clap::Args)]
pub struct SubmitArgs {
    /// Do not ask for confirmation.
    #[arg(short, long)]
    yes: bool,
    /// Submit and return at once instead of streaming the logs.
    #[arg(short, long)]
    detach: bool,
    /// Set an environment variable: KEY=VALUE, or KEY to pass this shell's value.
    #[arg(short, long = "env", value_name = "KEY[=VALUE]")]
    env: Vec<String>,
    /// The run name (overrides `name:`).
    #[arg(short, long)]
    name: Option<String>,
    /// Show at most this many offers in the plan (all by default).
    #[arg(long, value_name = "N")]
    max_offers: Option<usize>,
    /// Stop an active run of the same name and submit this one even when nothing changed.
    #[arg(long)]
    force: bool,
    /// Show more of the plan (the creation policy and the reservation, even at their
    /// defaults).
    #[arg(short, long)]
    verbose: bool,
    /// The local address the run's forwarded ports listen on (`localhost` by default).
    #[arg(long = "host", value_name = "HOST", value_parser = crate::runs::bind_address)]
    host: Option<std::net::IpAddr>,
    /// A private key `ssh <run>` also accepts (its public half, `PATH.pub`, is added).
    #[arg(long, value_name = "PATH")]
    ssh_identity: Option<PathBuf>,
    /// Credentials of a private repo given by URL, registered as `dstack init` does.
    #[command(flatten)]
    repo_creds: crate::init::CredsArgs,
}

/// Reads and validates the configuration file, refuses the fields it sets that would be
/// ignored (`config::support`), and puts `run_args` into its commands (`config::run_args`);
/// every error at its place in the file.
pub fn load(file: &PathBuf, run_args: &[String]) -> Result<Configuration, Failure> {
    let name = file.display().to_string();
    let text = if name == "-" {
        limits::read_text(std::io::stdin().lock())
            .map_err(|e| Failure::new(format!("cannot read stdin: {e}")))?
    } else {
        std::fs::File::open(file)
            .map_err(ReadError::from)
            .and_then(limits::read_text)
            .map_err(|e| {
                Failure::new(format!(
                    "{name}:1:1: (file): cannot read the file: {e} [{}]",
                    e.code()
                ))
            })?
    };
    let mut configuration = config::parse(&text, &name).map_err(|e| Failure::new(e.to_string()))?;
    config::support::check_located(&text, &name, &configuration)
        .map_err(|e| Failure::new(e.to_string()))?;
    config::run_args::apply(&mut configuration, run_args).map_err(|problems| {
        Failure::new(config::locate::errors(&text, &name, problems).to_string())
    })?;
    Ok(configuration)
}

fn parse_env(items: &[String]) -> Result<BTreeMap<String, String>, Failure> {
    let mut env = BTreeMap::new();
    for item in items {
        let (k, v) = match item.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => {
                let v = std::env::var(item).map_err(|_| {
                    Failure::new(format!("-e {item}: {item} is not set in this shell"))
                })?;
                (item.clone(), v)
            }
        };
        if !config::env::is_env_name(&k) {
            return Err(Failure::new(format!(
                "-e {item}: invalid variable name `{k}`"
            )));
        }
        env.insert(k, v);
    }
    Ok(env)
}

/// Prints the plan as dstack does: the configuration summary (`verbose`: with the creation
/// policy and the reservation even at their defaults), then the offers (the first
/// `max_offers` of them, when given).
pub fn print_plan(plan: &RunPlan, file: &str, max_offers: Option<usize>, verbose: bool) {
    let Some(common) = plan.configuration.run_common() else {
        return;
    };
    let r = &common.resources;
    let mut res = format!("cpu={} mem={}", r.cpu.count, r.memory);
    if let Some(d) = &r.disk {
        res.push_str(&format!(" disk={}", d.size));
    }
    if let Some(g) = r.gpu.as_ref().filter(|g| g.count.min.unwrap_or(0) > 0) {
        res.push_str(&format!(" gpu={}", g.count));
    }
    let p = &common.profile;
    let mut summary = Table::new(&["Configuration", file]);
    let kind = match &plan.configuration {
        Configuration::Task(t) => format!("task (nodes={})", t.nodes.unwrap_or(1)),
        other => other.type_name().to_string(),
    };
    summary.row(vec!["Type".into(), kind]);
    summary.row(vec!["Resources".into(), res]);
    summary.row(vec![
        "Spot policy".into(),
        p.spot_policy.map_or("on-demand", |s| s.as_str()).into(),
    ]);
    summary.row(vec![
        "Max price".into(),
        p.max_price.map_or("-".into(), |m| format!("${m}")),
    ]);
    summary.row(vec![
        "Retry policy".into(),
        if p.retry.is_some() { "yes" } else { "no" }.into(),
    ]);
    for (key, value) in profile_rows(&plan.configuration, p, verbose) {
        summary.row(vec![key.into(), value]);
    }
    println!("{}", summary.render());
    if plan.offers.is_empty() {
        println!(
            " No offers: {}\n",
            plan.no_offers_reason.as_deref().unwrap_or("no capacity")
        );
        return;
    }
    let mut offers = Table::new(&["#", "BACKEND", "RESOURCES", "INSTANCE TYPE", "PRICE", ""]);
    let shown = max_offers.unwrap_or(usize::MAX).min(plan.offers.len());
    for (i, o) in plan.offers.iter().take(shown).enumerate() {
        offers.row(vec![
            (i + 1).to_string(),
            format!("{} ({})", o.backend, o.region),
            resources(&o.resources),
            o.instance_type.clone(),
            format!("${}", o.price),
            format!("{:?}", o.availability).to_lowercase(),
        ]);
    }
    println!("{}", offers.render());
    if shown < plan.offers.len() {
        println!(" Shown {shown} of {} offers\n", plan.offers.len());
    }
}

/// The plan's rows after the retry policy, as dstack's: the creation policy (`verbose`, or
/// when not the default), idle and maximum durations, a dev environment's inactivity
/// duration, the reservation (`verbose`, or when set).
fn profile_rows(
    configuration: &Configuration,
    p: &config::profile::ProfileParams,
    verbose: bool,
) -> Vec<(&'static str, String)> {
    use config::duration::OffableDuration;
    let mut rows = Vec::new();
    let creation = p.creation_policy.map(|c| c.as_str());
    if verbose || creation.is_some_and(|c| c != "reuse-or-create") {
        rows.push((
            "Creation policy",
            creation.unwrap_or("reuse-or-create").to_string(),
        ));
    }
    let idle = match p.idle_duration {
        Some(d) if d.seconds() < 0 => "-".to_string(),
        Some(d) => pretty_seconds(d.seconds()),
        None => pretty_seconds(300),
    };
    rows.push(("Idle duration", idle));
    let max = match p.max_duration {
        Some(OffableDuration::Seconds(d)) if d.seconds() > 0 => pretty_seconds(d.seconds()),
        _ => "off".to_string(),
    };
    rows.push(("Max duration", max));
    if let Configuration::DevEnvironment(d) = configuration {
        let inactivity = match d.inactivity_duration {
            Some(i) if i.seconds() > 0 => pretty_seconds(i.seconds()),
            _ => "off".to_string(),
        };
        rows.push(("Inactivity duration", inactivity));
    }
    if verbose || p.reservation.is_some() {
        rows.push((
            "Reservation",
            p.reservation.clone().unwrap_or_else(|| "no".to_string()),
        ));
    }
    rows
}

/// `90s`, `5m`, `2h`, `3d` as dstack prints durations (the largest whole unit).
fn pretty_seconds(secs: i64) -> String {
    match secs {
        s if s > 0 && s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s > 0 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s > 0 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// The process exit code for a finished run: the job's exit status when it has one.
pub fn exit_code(run: &Run, exit_status: Option<i32>) -> ExitCode {
    match (run.status, exit_status) {
        (RunStatus::Done, _) => ExitCode::SUCCESS,
        (_, Some(code)) if (1..=255).contains(&code) => ExitCode::from(code as u8),
        _ => ExitCode::from(1),
    }
}

/// `dstack apply`.
pub async fn apply(client: &Client, args: &ApplyArgs) -> Result<ExitCode, Failure> {
    let configuration = args.profile.apply(load(&args.file, &args.run_args)?)?;
    // Flags win over the profile, as dstack's.
    let configuration = args.overrides.apply(configuration)?;
    if let Configuration::Fleet(_) = configuration {
        return crate::fleet::apply(client, &configuration, args.submit.yes).await;
    }
    if let Configuration::Volume(_) = configuration {
        return crate::volume::apply(client, &configuration).await;
    }
    if matches!(configuration, Configuration::Gateway(_)) {
        return Err(Failure::new(
            "gateways are not supported: every service is published through the server's \
             built-in proxy at <server>/proxy/services/<project>/<run>/ (token auth, replicas, \
             probes, rate limits, the model endpoint at <server>/proxy/models/<project>/); a \
             gateway would add a domain of your own and TLS"
                .to_string(),
        ));
    }
    submit(
        client,
        configuration,
        &args.file.display().to_string(),
        &args.submit,
        ApplyOptions::default(),
    )
    .await
}

/// Plans and submits a run configuration (`file` names where it comes from), or updates the
/// running service of its name in place; then follows it as `args` say. `base` carries
/// what the command adds (a workflow's artifacts and dependencies).
pub async fn submit(
    client: &Client,
    configuration: Configuration,
    file: &str,
    args: &SubmitArgs,
    base: ApplyOptions,
) -> Result<ExitCode, Failure> {
    let file = file.to_string();
    if let Some(identity) = &args.ssh_identity {
        crate::ssh::accept_identity(&dstack_core::client::default_home(), identity)?;
    }
    if args.repo_creds.given() {
        let url = repo_url(&configuration).ok_or_else(|| {
            Failure::new("-t/--token and --git-identity are for a repo given by URL (`repos:` with a `url`, or -P URL)")
        })?;
        crate::init::register(client, &url, &args.repo_creds.creds()?).await?;
    }
    let options = ApplyOptions {
        name: args.name.clone(),
        env: parse_env(&args.env)?,
        configuration_path: Some(file.clone()),
        ..base
    };
    let running = client
        .runs()
        .running_service(&configuration, args.name.as_deref())
        .await?;
    let run = match running {
        Some(name) => {
            println!(
                "Service {name} is running: the configuration is applied to it in place (a \
                 rolling deployment when what its replicas run changed: new replicas replace \
                 the old ones one at a time, once ready)"
            );
            if !args.yes && !crate::confirm("Update the run?") {
                return Ok(ExitCode::from(1));
            }
            let run = client.runs().update(configuration, options).await?;
            println!(
                "Updated run {} (deployment {})",
                run.name(),
                run.run().await?.deployment_num
            );
            run
        }
        None => {
            let plan = client.runs().plan(&configuration).await?;
            print_plan(&plan, &file, args.max_offers, args.verbose);
            let active = active_run(client, &configuration, args).await?;
            let question = match &active {
                Some(active) if active.unchanged => {
                    println!(
                        "Active run {} already exists. Detected no changes.",
                        active.handle.name()
                    );
                    if args.yes && !args.force {
                        println!("Use --force to apply anyway.");
                        return Ok(ExitCode::SUCCESS);
                    }
                    "Stop and override the run?"
                }
                Some(active) => {
                    println!(
                        "Active run {} already exists, with another configuration.",
                        active.handle.name()
                    );
                    "Stop and override the run?"
                }
                None => "Submit the run?",
            };
            if !args.yes && !crate::confirm(question) {
                return Ok(ExitCode::from(1));
            }
            if let Some(active) = active {
                active.handle.stop(false).await?;
                let stopped = active.handle.wait().await?;
                println!("Stopped run {} ({})", stopped.name, stopped.status);
            }
            let run = client.runs().apply(configuration, options).await?;
            println!("Submitted run {}", run.name());
            run
        }
    };
    if let Some(at) = run.run().await?.scheduled_start_ms() {
        // It runs at each of its times until stopped (the server starts it): there is
        // nothing to attach to now.
        println!(
            "Scheduled: it starts at {} (then again at each time of its schedule, until \
             `dstack stop {}`). Follow it with: dstack ps",
            dstack_core::config::cron::utc_text(at),
            run.name()
        );
        return Ok(ExitCode::SUCCESS);
    }
    if args.detach {
        if let Some(service) = run.service(&run.run().await?) {
            println!("Service is published at {}", service.url);
        }
        println!("Detached. Follow it with: dstack logs -f {}", run.name());
        return Ok(ExitCode::SUCCESS);
    }
    let how = crate::runs::Attach {
        logs: true,
        bind: args.host,
        ..Default::default()
    };
    let attached = crate::runs::attach(&run, &how);
    tokio::select! {
        result = attached => {
            let (finished, code) = result?;
            let reason = finished.termination_reason.as_deref().unwrap_or("-");
            eprintln!("\nRun {} {} ({reason})", finished.name, finished.status);
            if let Some(message) = run.jobs().await?.iter().rev().find_map(|j| j.termination_message.clone()) {
                if finished.status != RunStatus::Done {
                    eprintln!("{message}");
                }
            }
            Ok(exit_code(&finished, code))
        }
        _ = tokio::signal::ctrl_c() => {
            eprintln!("\nDetached from {}; it keeps running. Reattach with: dstack logs -f {}", run.name(), run.name());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The URL of the repo a run configuration clones, if any.
fn repo_url(configuration: &Configuration) -> Option<String> {
    configuration.run_common()?.repos.first()?.url.clone()
}

/// An unfinished run with the name a run configuration is applied under.
struct ActiveRun {
    handle: dstack_core::RunHandle,
    /// Whether it runs this very configuration (besides its name) with no `-e` added.
    unchanged: bool,
}

/// The unfinished run that applying `configuration` (under `-n` or its `name:`) would
/// override, as dstack's apply finds it: it is stopped first (after asking).
async fn active_run(
    client: &Client,
    configuration: &Configuration,
    args: &SubmitArgs,
) -> Result<Option<ActiveRun>, Failure> {
    let Some(name) = args.name.as_deref().or(configuration.name()) else {
        return Ok(None);
    };
    let Some(handle) = client.runs().get(name).await? else {
        return Ok(None);
    };
    let run = handle.run().await?;
    if run.status.is_finished() {
        return Ok(None);
    }
    let without_name = |c: &Configuration| {
        let mut value = c.to_json();
        if let Some(map) = value.as_object_mut() {
            map.remove("name");
        }
        value
    };
    let unchanged = args.env.is_empty()
        && run
            .spec
            .configuration()
            .is_ok_and(|stored| without_name(&stored) == without_name(configuration));
    Ok(Some(ActiveRun { handle, unchanged }))
}
