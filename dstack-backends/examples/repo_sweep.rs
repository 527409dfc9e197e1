//! A sweep of N one-CPU tasks on an SSH fleet, with and without a repo: the wall time of each
//! and how many times the hosts received the repo. `bench/repo_sweep.sh` sets up the hosts
//! in network namespaces and a repo, then runs: `repo_sweep FLEET_FILE REPO_DIR [N]`
//! (default 200 trials).

mod common;

use std::time::{Duration, Instant};

use dstack_core::config::parse;
use dstack_core::engine::ApplyOptions;
use dstack_core::model::{RunGroup, RunStatus};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let file = args
        .next()
        .expect("usage: repo_sweep FLEET_FILE REPO_DIR [N]");
    let repo = args
        .next()
        .expect("usage: repo_sweep FLEET_FILE REPO_DIR [N]");
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    let (client, name, instances, _home) = common::ssh_fleet(&file).await;
    println!(
        "{} hosts, {n} trials of `test -d src` (1 CPU each)",
        instances.len()
    );
    for with_repo in [false, true] {
        let repos = if with_repo {
            format!("repos: [{repo}]\n")
        } else {
            String::new()
        };
        let task = format!(
            "type: task\nfleets: [{name}]\nresources: {{cpu: 1, memory: 0.1GB..}}\n{repos}\
             commands: ['test -d src || test -z \"$DSTACK_REPO_DIR\"']\n"
        );
        let config = parse(&task, "trial.dstack.yml").expect("valid task");
        let group = RunGroup {
            id: format!("sweep-{}-{with_repo}", std::process::id()),
            max_parallel: None,
        };
        let items = (0..n)
            .map(|_| {
                let options = ApplyOptions {
                    group: Some(group.clone()),
                    client_dir: Some(repo.clone()),
                    ..Default::default()
                };
                (config.clone(), options)
            })
            .collect();
        let t = Instant::now();
        let runs = client.runs().apply_all(items).await.expect("applied");
        let submitted = t.elapsed();
        let mut failed = 0;
        for run in &runs {
            let done = tokio::time::timeout(Duration::from_secs(1800), run.wait())
                .await
                .expect("in time")
                .expect("finished");
            failed += usize::from(done.status != RunStatus::Done);
        }
        println!(
            "{:<10} submit {:>7.2} s, all done {:>7.2} s, failed {failed}",
            if with_repo { "with repo" } else { "no repo" },
            submitted.as_secs_f64(),
            t.elapsed().as_secs_f64()
        );
    }
    let home_dir = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let received: usize = std::fs::read_dir(format!("{home_dir}/.dstack-rs"))
        .expect("agents' directories")
        .filter_map(|e| {
            let path = e.ok()?.path();
            let ours = path.file_name()?.to_str()?.starts_with(&format!("{name}-"));
            ours.then(|| std::fs::read_to_string(path.join("agent/agent.log")).unwrap_or_default())
        })
        .map(|log| log.matches("received archive").count())
        .sum();
    println!("archives received by the hosts: {received}");
    client
        .fleets()
        .delete(&name, true)
        .await
        .expect("fleet deleted");
}
