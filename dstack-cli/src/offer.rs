//! `dstack offer`: where a run with these resources and profile settings could run.

use std::process::ExitCode;

use dstack_core::config;
use dstack_core::Client;

use crate::gpu_groups::{self, GroupBy};
use crate::overrides::Overrides;
use crate::ps::Format;
use crate::Failure;

/// Arguments of `dstack offer`.
#[derive(clap::Args)]
pub struct OfferArgs {
    /// The resources and profile settings to look for (dstack's flags of `dstack apply`).
    #[command(flatten)]
    overrides: Overrides,
    /// Show at most this many offers (all by default).
    #[arg(long, value_name = "N")]
    max_offers: Option<usize>,
    /// The output format.
    #[arg(long, value_enum, default_value_t = Format::Plain)]
    format: Format,
    /// Print JSON (the same as --format json).
    #[arg(long)]
    json: bool,
    /// `--profile NAME` / `--no-profile`.
    #[command(flatten)]
    profile: crate::profiles::ProfileArgs,
    /// Group GPU offers into rows by `gpu`, and also `backend`, `region` (with `backend`),
    /// `count`: repeatable or comma-separated (`--group-by gpu,backend`).
    #[arg(long, value_name = "FIELDS")]
    group_by: Vec<String>,
}

/// `dstack offer`: the plan of a task with the flags' resources and profile.
pub async fn offer(client: &Client, args: &OfferArgs) -> Result<ExitCode, Failure> {
    let task = config::parse("type: task\ncommands: [offer]\n", "dstack offer")
        .map_err(|e| Failure::new(e.to_string()))?;
    // The profile fills what the flags leave unset, as for `dstack apply`.
    let configuration = args.overrides.apply(args.profile.apply(task)?)?;
    let group_by = if args.group_by.is_empty() {
        None
    } else {
        Some(GroupBy::parse(&args.group_by).map_err(Failure::new)?)
    };
    let plan = client.runs().plan(&configuration).await?;
    let json = args.json || args.format == Format::Json;
    if let Some(by) = group_by {
        let rows = gpu_groups::group(&plan.offers, by);
        if json {
            let out = serde_json::json!({
                "project": client.server().map_or("main", |r| r.project()),
                "group_by": by.names(),
                "gpus": rows,
            });
            println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        } else if rows.is_empty() {
            println!(
                " No GPU offers: {}",
                plan.no_offers_reason
                    .as_deref()
                    .unwrap_or("none of the offers has a GPU")
            );
        } else {
            println!(" Group by  {}\n", by.names().join(", "));
            print!("{}", gpu_groups::table(&rows, by).render());
        }
        return Ok(ExitCode::SUCCESS);
    }
    if json || args.format == Format::Json {
        let shown = args.max_offers.unwrap_or(usize::MAX).min(plan.offers.len());
        let out = serde_json::json!({
            "offers": plan.offers[..shown],
            "total_offers": plan.offers.len(),
            "no_offers_reason": plan.no_offers_reason,
        });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        crate::apply::print_plan(&plan, "(flags)", args.max_offers, false);
    }
    Ok(ExitCode::SUCCESS)
}
