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
pub async fn list(client: &Client) -> Result<ExitCode, Failure> {
    let mut table = Table::new(&[
        "NAME", "BACKEND", "REGION", "VOLUME", "SIZE", "STATUS", "CREATED",
    ]);
    for volume in client.volumes().list().await? {
        let status = match &volume.status_message {
            Some(why) => format!("{} ({why})", volume.status),
            None if !volume.attachments.is_empty() => "attached".to_string(),
            None => volume.status.to_string(),
        };
        table.row(vec![
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
        ]);
    }
    print!("{}", table.render());
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
