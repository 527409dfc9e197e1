//! `dstack volume`: network volumes; `dstack apply -f volume.yml` and `dstack volume delete`.

use std::process::ExitCode;

use dstack_core::config::Configuration;
use dstack_core::model::VolumeStatus;
use dstack_core::Client;

use crate::table::{ago, Table};
use crate::Failure;

/// `dstack apply -f VOLUME`: creates (or registers) it; exits 1 if that failed.
pub async fn apply(client: &Client, configuration: &Configuration) -> Result<ExitCode, Failure> {
    let volume = client.volumes().apply(configuration).await?;
    match volume.status {
        VolumeStatus::Active => {
            eprintln!(
                "Volume {} is active: {} in {} ({} GB)",
                volume.name,
                volume.volume_id.as_deref().unwrap_or("?"),
                volume
                    .availability_zone
                    .as_deref()
                    .unwrap_or(&volume.region),
                volume.size_gb.unwrap_or_default()
            );
            Ok(ExitCode::SUCCESS)
        }
        status => Err(Failure::new(format!(
            "volume {} is {status}: {}",
            volume.name,
            volume
                .status_message
                .as_deref()
                .unwrap_or("no reason given")
        ))),
    }
}

/// `dstack volume` (list).
pub async fn list(client: &Client, args: crate::fleet::ListArgs) -> Result<ExitCode, Failure> {
    let draw = || async move { table(client, args.verbose).await };
    if args.watch {
        return crate::table::watch(draw).await;
    }
    print!("{}", draw().await?);
    Ok(ExitCode::SUCCESS)
}

/// The table of `dstack volume` (`verbose`: with the instances each is attached to).
async fn table(client: &Client, verbose: bool) -> Result<String, Failure> {
    let mut header = vec![
        "NAME", "BACKEND", "REGION", "VOLUME", "SIZE", "STATUS", "CREATED",
    ];
    if verbose {
        header.push("ATTACHED TO");
    }
    let mut table = Table::new(&header);
    let instances: Vec<_> = if verbose {
        client
            .fleets()
            .list()
            .await?
            .into_iter()
            .flat_map(|(_, instances)| instances)
            .collect()
    } else {
        Vec::new()
    };
    for volume in client.volumes().list().await? {
        let status = match &volume.status_message {
            Some(why) => format!("{} ({why})", volume.status),
            None if !volume.attachments.is_empty() => "attached".to_string(),
            None => volume.status.to_string(),
        };
        let mut row = vec![
            volume.name.clone(),
            volume.backend.clone(),
            volume
                .availability_zone
                .clone()
                .unwrap_or_else(|| volume.region.clone()),
            volume.volume_id.clone().unwrap_or_else(|| "-".into()),
            volume
                .size_gb
                .map_or_else(|| "-".into(), |s| format!("{s}GB")),
            status,
            ago(volume.created_at_ms),
        ];
        if verbose {
            let attached: Vec<&str> = volume
                .attachments
                .iter()
                .map(|a| {
                    instances
                        .iter()
                        .find(|i| i.id == a.instance_id)
                        .map_or(a.instance_id.as_str(), |i| i.name.as_str())
                })
                .collect();
            row.push(if attached.is_empty() {
                "-".to_string()
            } else {
                attached.join(", ")
            });
        }
        table.row(row);
    }
    Ok(table.render())
}

/// Arguments of `dstack volume get`.
#[derive(clap::Args)]
pub struct GetArgs {
    /// The name of the volume.
    name: String,
    /// Output in JSON format (dstack's `Volume`; the only format, as dstack's).
    #[arg(long, required = true)]
    json: bool,
}

/// `dstack volume get NAME --json`: the volume as dstack's API shapes it.
pub async fn get(client: &Client, args: &GetArgs) -> Result<ExitCode, Failure> {
    let volume = client.volumes().get(&args.name).await?.ok_or_else(|| {
        Failure::new(format!(
            "volume {} not found; see `dstack volume`",
            args.name
        ))
    })?;
    let owner = dstack_core::api::Owner {
        project_name: client.server().map_or("main", |r| r.project()),
        user: "admin",
    };
    let instances: Vec<_> = client
        .fleets()
        .list()
        .await?
        .into_iter()
        .flat_map(|(_, instances)| instances)
        .collect();
    let shaped = dstack_core::api::volume(&owner, &volume, &instances);
    println!(
        "{}",
        serde_json::to_string_pretty(&shaped).unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `dstack volume delete`.
#[derive(clap::Args)]
pub struct DeleteArgs {
    /// The volume.
    pub(crate) name: String,
    /// Do not ask for confirmation.
    #[arg(short, long)]
    pub(crate) yes: bool,
}

/// `dstack volume delete NAME`.
pub async fn delete(client: &Client, args: &DeleteArgs) -> Result<ExitCode, Failure> {
    if !args.yes && !crate::confirm(&format!("Delete volume {}?", args.name)) {
        return Ok(ExitCode::from(1));
    }
    let volume = client.volumes().delete(&args.name).await?;
    if volume.external {
        eprintln!(
            "Volume {} forgotten (it was registered; the disk is kept)",
            volume.name
        );
    } else {
        eprintln!("Volume {} deleted", volume.name);
    }
    Ok(ExitCode::SUCCESS)
}
