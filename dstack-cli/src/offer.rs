//! `dstack offer`: where a configuration with these resources could run.

use std::process::ExitCode;

use dstack_core::config;
use dstack_core::Client;

use crate::Failure;

/// Arguments of `dstack offer`.
#[derive(clap::Args)]
pub struct OfferArgs {
    /// CPU spec, e.g. `4..` or `x86:2`.
    #[arg(long)]
    cpu: Option<String>,
    /// Memory range, e.g. `16GB..`.
    #[arg(long)]
    memory: Option<String>,
    /// GPU spec, e.g. `A100:80GB:2` or `24GB..`.
    #[arg(long)]
    gpu: Option<String>,
    /// Disk range, e.g. `100GB..`.
    #[arg(long)]
    disk: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `dstack offer`.
pub async fn offer(client: &Client, args: &OfferArgs) -> Result<ExitCode, Failure> {
    let mut resources = Vec::new();
    for (key, value) in [
        ("cpu", &args.cpu),
        ("memory", &args.memory),
        ("gpu", &args.gpu),
        ("disk", &args.disk),
    ] {
        if let Some(v) = value {
            resources.push(format!("{key}: {}", serde_json::Value::String(v.clone())));
        }
    }
    let text = format!(
        "type: task\ncommands: [offer]\nresources: {{{}}}\n",
        resources.join(", ")
    );
    let configuration =
        config::parse(&text, "--resource flags").map_err(|e| Failure::new(e.to_string()))?;
    let plan = client.runs().plan(&configuration).await?;
    if args.json {
        let out =
            serde_json::json!({ "offers": plan.offers, "no_offers_reason": plan.no_offers_reason });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        crate::apply::print_plan(&plan, "(flags)");
    }
    Ok(ExitCode::SUCCESS)
}
