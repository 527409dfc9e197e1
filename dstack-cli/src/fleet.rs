//! `dstack fleet`: fleets and their instances.

use std::process::ExitCode;

use dstack_core::model::JobStatus;
use dstack_core::Client;

use crate::table::{ago, resources, Table};
use crate::Failure;

/// `dstack fleet` (list).
pub async fn list(client: &Client) -> Result<ExitCode, Failure> {
    let mut table = Table::new(&[
        "FLEET",
        "INSTANCE",
        "BACKEND",
        "RESOURCES",
        "PRICE",
        "STATUS",
        "CREATED",
    ]);
    let holding = [
        JobStatus::Provisioning,
        JobStatus::Running,
        JobStatus::Terminating,
    ];
    let busy: Vec<String> = client
        .engine()
        .store()
        .jobs_with_status(&holding)
        .map_err(dstack_core::engine::EngineError::from)?
        .into_iter()
        .filter_map(|j| j.instance_id)
        .collect();
    for (fleet, instances) in client.fleets().list()? {
        for (i, instance) in instances.iter().enumerate() {
            table.row(vec![
                if i == 0 {
                    fleet.name.clone()
                } else {
                    String::new()
                },
                instance.name.clone(),
                instance.backend.clone(),
                resources(&instance.host),
                format!("${}", instance.price),
                if busy.contains(&instance.id) {
                    "busy".to_string()
                } else {
                    instance.status.to_string()
                },
                ago(instance.created_at_ms),
            ]);
        }
    }
    print!("{}", table.render());
    Ok(ExitCode::SUCCESS)
}
