//! `dstack event [list]`: the recorded status changes of runs, jobs, instances, fleets and
//! volumes, one line each as dstack prints them (`[time] [run NAME] message`); `-w` follows
//! new ones until Ctrl-C.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Args, Subcommand};
use dstack_core::events::{Event, EventQuery, RecordRef, TargetType, DEFAULT_LIMIT};
use dstack_core::Client;

use crate::logs::{since, Since};
use crate::Failure;

/// How often `-w` asks for new events.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// `dstack event`.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct EventArgs {
    #[command(subcommand)]
    action: Option<EventAction>,
    #[command(flatten)]
    list: ListArgs,
}

/// `dstack event` subcommands.
#[derive(Subcommand)]
enum EventAction {
    /// List events within the selected project (the default).
    List(ListArgs),
}

/// Which events to print, and whether to follow new ones.
#[derive(Args, Clone, Default)]
#[command(group(ArgGroup::new("target").multiple(false)))]
#[command(group(ArgGroup::new("within").multiple(false)))]
pub struct ListArgs {
    /// Watch events in realtime.
    #[arg(short, long)]
    watch: bool,
    /// Only show events newer than the specified date. Can be a duration (e.g. 10s, 5m, 1d)
    /// or an RFC 3339 string (e.g. 2023-09-24T15:30:00Z). If not specified, show the last
    /// 100 events.
    #[arg(long, value_name = "SINCE", value_parser = since)]
    since: Option<Since>,
    /// Only show events that target the specified fleets.
    #[arg(long = "target-fleet", value_name = "NAME", group = "target")]
    target_fleets: Vec<String>,
    /// Only show events that target the specified runs.
    #[arg(long = "target-run", value_name = "NAME", group = "target")]
    target_runs: Vec<String>,
    /// Only show events that target the specified volumes.
    #[arg(long = "target-volume", value_name = "NAME", group = "target")]
    target_volumes: Vec<String>,
    /// Only show events that target the specified gateways (there are none here).
    #[arg(long = "target-gateway", value_name = "NAME", group = "target")]
    target_gateways: Vec<String>,
    /// Only show events that target the specified secrets (their changes are not recorded
    /// yet: none).
    #[arg(long = "target-secret", value_name = "NAME", group = "target")]
    target_secrets: Vec<String>,
    /// Only show events that target the specified fleets or instances within those fleets.
    #[arg(long = "within-fleet", value_name = "NAME", group = "within")]
    within_fleets: Vec<String>,
    /// Only show events that target the specified runs or jobs within those runs.
    #[arg(long = "within-run", value_name = "NAME", group = "within")]
    within_runs: Vec<String>,
    /// Only show events that target the specified gateways or replicas within those gateways
    /// (there are none here).
    #[arg(long = "within-gateway", value_name = "NAME", group = "within")]
    within_gateways: Vec<String>,
    /// Only show events that target entities of the specified types (run, job, instance,
    /// fleet, volume, …).
    #[arg(long = "include-target-type", value_name = "TYPE", value_parser = target_type)]
    include_target_types: Vec<TargetType>,
}

/// The clap parser of `--include-target-type`.
fn target_type(text: &str) -> Result<TargetType, String> {
    TargetType::parse(text).ok_or_else(|| {
        let names: Vec<&str> = TargetType::ALL.iter().map(|t| t.as_str()).collect();
        format!("{text:?} is not one of {}", names.join(", "))
    })
}

/// `dstack event [list]`.
pub async fn run(client: &Client, args: &EventArgs) -> Result<ExitCode, Failure> {
    let list = match &args.action {
        Some(EventAction::List(list)) => list,
        None => &args.list,
    };
    let filters = filters(client, list).await?;
    let mut last = None;
    match list.since {
        Some(Since(since_ms)) => {
            let mut query = EventQuery {
                since_ms: Some(since_ms),
                ascending: true,
                ..filters.clone()
            };
            loop {
                let page = client.events().list(&query).await?;
                print(&page)?;
                last = page.last().map(|e| e.id).or(last);
                match query.next_page(&page) {
                    Some(next) => query = next,
                    None => break,
                }
            }
        }
        None => {
            let mut latest = client.events().list(&filters).await?;
            latest.reverse();
            print(&latest)?;
            last = latest.last().map(|e| e.id);
        }
    }
    if list.watch {
        watch(client, &filters, last).await?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints the events after `last` (all of them if none) as they are recorded, until Ctrl-C.
async fn watch(
    client: &Client,
    filters: &EventQuery,
    mut last: Option<i64>,
) -> Result<(), Failure> {
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let events = client.events();
    loop {
        let query = EventQuery {
            after: last,
            ascending: true,
            ..filters.clone()
        };
        let page = tokio::select! {
            page = events.list(&query) => page?,
            _ = &mut ctrl_c => return Ok(()),
        };
        print(&page)?;
        last = page.last().map(|e| e.id).or(last);
        if query.next_page(&page).is_some() {
            continue; // more are waiting
        }
        tokio::select! {
            _ = tokio::time::sleep(WATCH_INTERVAL) => {}
            _ = &mut ctrl_c => return Ok(()),
        }
    }
}

/// The query of `args`' filters, names resolved to records (as dstack's CLI does: a name
/// that names nothing is an error).
async fn filters(client: &Client, args: &ListArgs) -> Result<EventQuery, Failure> {
    let mut targets = Vec::new();
    for name in &args.target_runs {
        targets.push(crate::runs::find(client, name).await?.id().to_string());
    }
    for name in &args.target_fleets {
        targets.push(fleet_id(client, name).await?);
    }
    for name in &args.target_volumes {
        let volume = client.volumes().get(name).await?;
        let volume = volume.ok_or_else(|| Failure::new(format!("volume {name} not found")))?;
        targets.push(volume.id);
    }
    if let Some(name) = args
        .target_gateways
        .iter()
        .chain(&args.within_gateways)
        .next()
    {
        return Err(Failure::new(format!(
            "gateway {name} not found: gateways are not supported (services are published by the server's proxy)"
        )));
    }
    for name in &args.target_secrets {
        if client.secrets().get(name).await?.is_none() {
            return Err(Failure::new(format!("secret {name} not found")));
        }
        // Secrets' changes are not recorded: no event targets one.
        targets.push(format!("secret:{name}"));
    }
    let mut within = Vec::new();
    for name in &args.within_runs {
        let id = crate::runs::find(client, name).await?.id().to_string();
        within.push(RecordRef {
            kind: TargetType::Run,
            id,
        });
    }
    for name in &args.within_fleets {
        within.push(RecordRef {
            kind: TargetType::Fleet,
            id: fleet_id(client, name).await?,
        });
    }
    Ok(EventQuery {
        targets,
        within,
        types: args.include_target_types.clone(),
        limit: DEFAULT_LIMIT,
        ..EventQuery::default()
    })
}

/// The id of fleet `name` (dstack's `PROJECT/NAME` form is taken too: a server has one
/// project).
async fn fleet_id(client: &Client, name: &str) -> Result<String, Failure> {
    let bare = name.split_once('/').map_or(name, |(_, bare)| bare);
    match client.fleets().get(bare).await? {
        Some((fleet, _)) => Ok(fleet.id),
        None => Err(Failure::new(format!("fleet {name} not found"))),
    }
}

/// Prints `events`, one line each.
fn print(events: &[Event]) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    for event in events {
        writeln!(out, "{}", line(event))
            .map_err(|e| Failure::new(format!("cannot write the events: {e}")))?;
    }
    out.flush()
        .map_err(|e| Failure::new(format!("cannot write the events: {e}")))
}

/// One event as dstack prints it: `[2026-12-07 10:11:12] [run NAME] message` (times in UTC).
fn line(event: &Event) -> String {
    let iso = dstack_core::api::iso_time(event.recorded_at_ms);
    let time = iso.get(..19).unwrap_or(&iso).replacen('T', " ", 1);
    format!(
        "[{time}] [{} {}] {}",
        event.target.kind,
        event.target.name,
        event.message()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use dstack_core::events::Target;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        event: EventArgs,
    }

    #[test]
    fn an_event_is_one_line_as_dstack_prints_it() {
        let target = Target {
            kind: TargetType::Job,
            id: "j".into(),
            name: "train-0-0".into(),
        };
        let event = Event {
            id: 3,
            recorded_at_ms: 1_765_102_272_000,
            within: target.clone(),
            target,
            replica_num: Some(0),
            job_num: Some(0),
            submission_num: Some(0),
            from: Some("submitted".into()),
            to: "provisioning".into(),
            reason: None,
            reason_message: None,
        };
        assert_eq!(
            line(&event),
            "[2025-12-07 10:11:12] [job train-0-0] Job status changed SUBMITTED -> PROVISIONING"
        );
    }

    #[test]
    fn filters_of_one_kind_exclude_each_other_as_in_dstack() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["event"], args].concat());
        let cli = parse(&["list", "--within-run", "a", "--within-run", "b", "-w"]).unwrap();
        let Some(EventAction::List(list)) = cli.event.action else {
            panic!("not `list`")
        };
        assert_eq!(list.within_runs, ["a", "b"]);
        assert!(list.watch);
        assert!(parse(&["--target-run", "a", "--target-fleet", "f"]).is_err());
        assert!(parse(&["--within-run", "a", "--within-fleet", "f"]).is_err());
        assert!(parse(&["--target-run", "a", "--within-fleet", "f"]).is_ok());
        assert!(parse(&["--include-target-type", "runs"]).is_err());
        let cli = parse(&["--include-target-type", "job", "--since", "5m"]).unwrap();
        assert_eq!(cli.event.list.include_target_types, [TargetType::Job]);
        assert!(parse(&["--since", "yesterday"]).is_err());
    }
}
