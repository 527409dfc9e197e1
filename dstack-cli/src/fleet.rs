//! `dstack fleet`: fleets and their instances; `dstack apply -f fleet.yml` (SSH fleets and
//! backend fleets with `nodes:`) and `dstack fleet delete`.

use std::io::Write;
use std::process::ExitCode;

use dstack_core::config::Configuration;
use dstack_core::model::{Instance, InstanceStatus};
use dstack_core::Client;

use crate::table::{ago, resources, Table};
use crate::Failure;

/// How `dstack fleet` and `dstack volume` list: `-w/--watch`, `-v/--verbose`.
#[derive(clap::Args, Clone, Copy, Default)]
pub struct ListArgs {
    /// Update the listing in place every 2 seconds until Ctrl-C.
    #[arg(short, long)]
    pub watch: bool,
    /// Show more information (fleets: each instance's address and blocks; volumes: the
    /// instances they are attached to).
    #[arg(short, long)]
    pub verbose: bool,
}

/// `dstack fleet` (list).
pub async fn list(client: &Client, args: ListArgs) -> Result<ExitCode, Failure> {
    let draw = || async move { Ok(table(client, |_| true, args.verbose).await?.render()) };
    if args.watch {
        return crate::table::watch(draw).await;
    }
    print!("{}", draw().await?);
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `dstack fleet get`.
#[derive(clap::Args)]
pub struct GetArgs {
    /// The fleet.
    name: String,
}

/// `dstack fleet get NAME`: one fleet and its instances, as `dstack fleet` shows them.
pub async fn get(client: &Client, args: &GetArgs) -> Result<ExitCode, Failure> {
    let is_it = |f: &dstack_core::model::Fleet| f.name == args.name;
    let fleets = client.fleets().list().await?;
    if !fleets.iter().any(|(f, _)| is_it(f)) {
        return Err(Failure::new(format!(
            "fleet {} not found; see `dstack fleet`",
            args.name
        )));
    }
    print!("{}", table(client, is_it, false).await?.render());
    Ok(ExitCode::SUCCESS)
}

/// The table of `dstack fleet`: each unterminated fleet that is `wanted`, a row per instance
/// (`verbose`: with its address and blocks).
async fn table(
    client: &Client,
    wanted: impl Fn(&dstack_core::model::Fleet) -> bool,
    verbose: bool,
) -> Result<Table, Failure> {
    let mut header = vec![
        "FLEET",
        "INSTANCE",
        "BACKEND",
        "RESOURCES",
        "PRICE",
        "STATUS",
        "CREATED",
    ];
    if verbose {
        header.extend(["ADDRESS", "BLOCKS"]);
    }
    let mut table = Table::new(&header);
    let busy = client.fleets().busy_instances().await?;
    let fleets = client.fleets().list().await?;
    let shown = fleets
        .iter()
        .filter(|(f, _)| f.status != dstack_core::model::FleetStatus::Terminated && wanted(f));
    for (fleet, instances) in shown {
        for (i, instance) in instances.iter().enumerate() {
            let mut row = vec![
                if i == 0 {
                    fleet.name.clone()
                } else {
                    String::new()
                },
                instance.name.clone(),
                match &instance.offer {
                    Some(o) => format!(
                        "{} ({}, {}{})",
                        o.backend,
                        o.region,
                        o.instance_type,
                        if o.spot { ", spot" } else { "" }
                    ),
                    None => instance.backend.clone(),
                },
                resources(&instance.host),
                format!("${}", instance.price),
                match (&instance.status_message, busy.contains(&instance.id)) {
                    (_, true) => "busy".to_string(),
                    (Some(why), false) => format!("{} ({why})", instance.status),
                    (None, false) => instance.status.to_string(),
                },
                ago(instance.created_at_ms),
            ];
            if verbose {
                row.push(instance.address.clone().unwrap_or_else(|| "-".into()));
                row.push(instance.blocks.unwrap_or(1).to_string());
            }
            table.row(row);
        }
    }
    Ok(table)
}

/// `dstack apply -f FLEET`: deploys every host at once, printing each host's progress; exits 1
/// if any host failed to join (the others joined all the same).
pub async fn apply(
    client: &Client,
    configuration: &Configuration,
    yes: bool,
) -> Result<ExitCode, Failure> {
    let Configuration::Fleet(fleet) = configuration else {
        return Err(Failure::new("not a fleet configuration"));
    };
    let (hosts, what) = match (&fleet.ssh_config, fleet.nodes) {
        (Some(ssh), _) => (ssh.hosts.len(), "SSH host(s)"),
        (None, Some(nodes)) => (
            usize::try_from(nodes.target).unwrap_or(0),
            "cloud instance(s) to provision",
        ),
        (None, None) => (0, "instance(s)"),
    };
    let name = fleet.name.clone().unwrap_or_default();
    eprintln!("Fleet {name}: {hosts} {what}");
    if !yes && !crate::confirm("Apply the fleet?") {
        return Ok(ExitCode::from(1));
    }
    let progress = |instance: &Instance, step: &str| {
        let host = instance
            .backend_data
            .get("hostname")
            .and_then(|h| h.as_str())
            .or(instance.offer.as_ref().map(|o| o.region.as_str()))
            .unwrap_or("?");
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "  {} ({host}): {step}", instance.name);
    };
    let (fleet, instances) = client.fleets().apply(configuration, &progress).await?;
    let joined = instances
        .iter()
        .filter(|i| matches!(i.status, InstanceStatus::Idle | InstanceStatus::Busy))
        .count();
    eprintln!(
        "Fleet {}: {joined} of {hosts} host(s) ready ({})",
        fleet.name, fleet.status
    );
    if let Some(why) = &fleet.status_message {
        eprintln!("  {why}");
    }
    if fleet.consolidation.is_some() {
        eprintln!("  The server keeps provisioning up to the fleet's nodes.min in the background.");
    }
    Ok(if joined == hosts {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Arguments of `dstack fleet delete`.
#[derive(clap::Args)]
pub struct DeleteArgs {
    /// The fleet.
    pub(crate) name: String,
    /// Do not ask for confirmation.
    #[arg(short, long)]
    pub(crate) yes: bool,
    /// Delete even while jobs run on it (they are stopped with their hosts' agents).
    #[arg(long)]
    pub(crate) force: bool,
    /// Delete only this instance of the fleet (its number, as `dstack fleet` lists it
    /// `<fleet>-<num>`); repeatable.
    #[arg(short = 'i', long = "instance", value_name = "INSTANCE_NUM")]
    pub(crate) instances: Vec<u64>,
}

/// `dstack fleet delete NAME [-i NUM…]`: stops the agents and removes what was installed,
/// of the whole fleet or of the instances given.
pub async fn delete(client: &Client, args: &DeleteArgs) -> Result<ExitCode, Failure> {
    let question = match args.instances.as_slice() {
        [] => format!("Delete fleet {}?", args.name),
        nums => format!(
            "Delete instance(s) {} of fleet {}?",
            nums.iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            args.name
        ),
    };
    if !args.yes && !crate::confirm(&question) {
        return Ok(ExitCode::from(1));
    }
    let fleets = client.fleets();
    let (fleet, instances) = match args.instances.as_slice() {
        [] => fleets.delete(&args.name, args.force).await?,
        nums => {
            fleets
                .delete_instances(&args.name, nums, args.force)
                .await?
        }
    };
    let mut code = ExitCode::SUCCESS;
    for (instance, error) in &instances {
        match error {
            None => eprintln!("  {}: agent stopped and removed", instance.name),
            Some(e) => {
                eprintln!("  {}: could not clean up: {e}", instance.name);
                code = ExitCode::from(1);
            }
        }
    }
    if args.instances.is_empty() {
        eprintln!("Fleet {} deleted", fleet.name);
    }
    Ok(code)
}
