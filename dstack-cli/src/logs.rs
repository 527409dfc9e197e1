//! `dstack logs`: the output of one job of a run (`--replica`, `--job`), from a time on
//! (`--since`), or the engine's own record of that job (`-d/--diagnose`).

use std::io::Write;
use std::process::ExitCode;

use futures_util::StreamExt;

use dstack_core::api::{iso_time, parse_iso_time};
use dstack_core::client::protocol::LogQuery;
use dstack_core::config::duration::Duration;
use dstack_core::model::{Instance, Job};
use dstack_core::{Client, RunHandle};

use crate::Failure;

/// Arguments of `dstack logs`.
#[derive(clap::Args)]
pub struct LogsArgs {
    /// The run name.
    run: String,
    /// Keep streaming until the run finishes.
    #[arg(short, long)]
    follow: bool,
    /// Show the engine's record of the job instead of its output: each submission's status,
    /// times, instance, exit status and termination reason and message.
    #[arg(short, long)]
    diagnose: bool,
    /// The replica number.
    #[arg(long, default_value_t = 0)]
    replica: u32,
    /// The job number inside the replica (the node of a multi-node task).
    #[arg(long, default_value_t = 0)]
    job: u32,
    /// Show only output newer than this: a duration (e.g. 10s, 5m, 1h, 1d) or an RFC 3339
    /// time (e.g. 2023-09-24T15:30:00Z).
    #[arg(long, value_name = "SINCE", value_parser = since)]
    since: Option<Since>,
}

/// A `--since` time, in Unix milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Since(pub u64);

/// Why a `--since` value was refused.
#[derive(Debug, thiserror::Error)]
pub enum SinceError {
    /// Neither a duration nor a time with an offset.
    #[error(
        "{0:?} is neither a duration (10s, 5m, 1h, 2d) nor an RFC 3339 time with a UTC offset \
         (2023-09-24T15:30:00Z)"
    )]
    Invalid(String),
}

/// Parses `--since` as dstack does: a duration back from `now_ms`, else an RFC 3339 time
/// that names its offset.
pub fn parse_since(text: &str, now_ms: u64) -> Result<Since, SinceError> {
    if let Some(back) = Duration::parse_str(text).filter(|d| d.seconds() >= 0) {
        let back_ms = u64::try_from(back.seconds())
            .unwrap_or(u64::MAX)
            .saturating_mul(1000);
        return Ok(Since(now_ms.saturating_sub(back_ms)));
    }
    parse_iso_time(text.trim())
        .map(Since)
        .ok_or_else(|| SinceError::Invalid(text.to_string()))
}

/// The clap parser of `--since` (durations count back from now).
pub fn since(text: &str) -> Result<Since, SinceError> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    parse_since(text, now_ms)
}

/// `dstack logs`.
pub async fn logs(client: &Client, args: &LogsArgs) -> Result<ExitCode, Failure> {
    let run = crate::runs::find(client, &args.run).await?;
    let snapshot = run.snapshot().await?;
    let slot = (args.replica, args.job);
    let mut submissions: Vec<&Job> = snapshot.jobs.iter().filter(|j| j.slot() == slot).collect();
    if submissions.is_empty() {
        return Err(Failure::new(format!(
            "run {} has no job {} in replica {} (see `dstack ps -v`)",
            args.run, args.job, args.replica
        )));
    }
    if args.diagnose {
        submissions.sort_by_key(|j| j.submission_num);
        print!("{}", diagnosis(&submissions, &snapshot.instances));
        return Ok(ExitCode::SUCCESS);
    }
    let query = LogQuery {
        follow: args.follow,
        replica_num: args.replica,
        job_num: args.job,
        since_ms: args.since.map(|s| s.0),
    };
    write_stream(&run, query).await?;
    Ok(ExitCode::SUCCESS)
}

/// Streams one job's output (see [`LogQuery`]) to stdout.
pub async fn write_stream(run: &RunHandle, query: LogQuery) -> Result<(), Failure> {
    let mut logs = run.job_logs(query);
    let stdout = std::io::stdout();
    while let Some(chunk) = logs.next().await {
        let chunk = chunk?;
        let mut out = stdout.lock();
        out.write_all(&chunk)
            .map_err(|e| Failure::new(format!("cannot write logs: {e}")))?;
        out.flush().ok();
    }
    Ok(())
}

/// The engine's record of a job's submissions (oldest first), as `dstack logs -d` prints it.
fn diagnosis(submissions: &[&Job], instances: &[Instance]) -> String {
    let mut out = String::new();
    for job in submissions {
        out.push_str(&format!(
            "replica {} job {} submission {}: {}\n",
            job.replica_num, job.job_num, job.submission_num, job.status
        ));
        out.push_str(&format!("  submitted: {}\n", iso_time(job.submitted_at_ms)));
        if let Some(at) = job.started_at_ms {
            out.push_str(&format!("  started: {}\n", iso_time(at)));
        }
        if let Some(at) = job.finished_at_ms {
            out.push_str(&format!("  finished: {}\n", iso_time(at)));
        }
        match job.instance_id.as_deref() {
            Some(id) => {
                let instance = instances.iter().find(|i| i.id == id);
                let (name, backend) =
                    instance.map_or(("(gone)", "-"), |i| (i.name.as_str(), i.backend.as_str()));
                out.push_str(&format!("  instance: {name} ({backend}, {id})\n"));
            }
            None => out.push_str("  instance: none assigned\n"),
        }
        if let Some(code) = job.exit_status {
            out.push_str(&format!("  exit status: {code}\n"));
        }
        if let Some(reason) = &job.termination_reason {
            out.push_str(&format!("  termination reason: {reason}\n"));
        }
        if let Some(message) = &job.termination_message {
            out.push_str(&format!("  message: {message}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000_000;

    #[test]
    fn since_takes_durations_back_from_now_and_times_with_an_offset() {
        assert_eq!(parse_since("10s", NOW).unwrap(), Since(NOW - 10_000));
        assert_eq!(parse_since("5m", NOW).unwrap(), Since(NOW - 300_000));
        assert_eq!(parse_since("1h", NOW).unwrap(), Since(NOW - 3_600_000));
        assert_eq!(parse_since("2d", NOW).unwrap(), Since(NOW - 172_800_000));
        assert_eq!(parse_since("30", NOW).unwrap(), Since(NOW - 30_000));
        assert_eq!(
            parse_since("2023-09-24T15:30:00Z", NOW).unwrap(),
            Since(1_695_569_400_000)
        );
        assert_eq!(
            parse_since("2023-09-24T17:30:00+02:00", NOW).unwrap(),
            Since(1_695_569_400_000)
        );
    }

    #[test]
    fn since_refuses_times_without_an_offset_and_other_text() {
        for bad in ["2023-09-24T15:30:00", "yesterday", "5x", "-5m", ""] {
            let e = parse_since(bad, NOW).unwrap_err();
            assert!(e.to_string().contains("RFC 3339"), "{bad}: {e}");
        }
    }
}
