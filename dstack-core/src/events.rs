//! The history of status changes (`dstack event`): what was recorded, how it is asked for,
//! and the message dstack prints for it.
//!
//! Events are written by the store itself, in the transaction of the write that changes a
//! status (SQLite triggers of migration 16: every process sharing a state file records them,
//! and no code path can change a status without its event). A record keeps the facts (who,
//! from which status to which, why); [`Event::message`] words them as dstack's server does.

use serde::{Deserialize, Serialize};

/// How many events a listing returns at most when no limit is given (dstack's default).
pub const DEFAULT_LIMIT: usize = 100;

/// Events older than this are pruned (by the engine's sweep).
pub const RETENTION_MS: u64 = 30 * 24 * 3600 * 1000;

/// At most this many of the newest events are kept.
pub const MAX_KEPT: u64 = 200_000;

/// What kind of record an event is about (dstack's `EventTargetType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetType {
    /// A project (never recorded here).
    Project,
    /// A user (never recorded here).
    User,
    /// A fleet.
    Fleet,
    /// An instance of a fleet.
    Instance,
    /// A run.
    Run,
    /// A job of a run.
    Job,
    /// A network volume.
    Volume,
    /// A gateway (none here).
    Gateway,
    /// A gateway replica (none here).
    GatewayReplica,
    /// A secret (not recorded yet).
    Secret,
    /// A preset (none here).
    Preset,
}

impl TargetType {
    /// Every type, in dstack's order.
    pub const ALL: &'static [TargetType] = &[
        TargetType::Project,
        TargetType::User,
        TargetType::Fleet,
        TargetType::Instance,
        TargetType::Run,
        TargetType::Job,
        TargetType::Volume,
        TargetType::Gateway,
        TargetType::GatewayReplica,
        TargetType::Secret,
        TargetType::Preset,
    ];

    /// The name as dstack writes it (`gateway-replica`).
    pub fn as_str(self) -> &'static str {
        match self {
            TargetType::Project => "project",
            TargetType::User => "user",
            TargetType::Fleet => "fleet",
            TargetType::Instance => "instance",
            TargetType::Run => "run",
            TargetType::Job => "job",
            TargetType::Volume => "volume",
            TargetType::Gateway => "gateway",
            TargetType::GatewayReplica => "gateway-replica",
            TargetType::Secret => "secret",
            TargetType::Preset => "preset",
        }
    }

    /// Parses dstack's spelling.
    pub fn parse(text: &str) -> Option<TargetType> {
        TargetType::ALL.iter().copied().find(|t| t.as_str() == text)
    }

    /// dstack's word for the record in its messages (`Run`, `Job`, `Instance`, …).
    fn noun(self) -> &'static str {
        match self {
            TargetType::Project => "Project",
            TargetType::User => "User",
            TargetType::Fleet => "Fleet",
            TargetType::Instance => "Instance",
            TargetType::Run => "Run",
            TargetType::Job => "Job",
            TargetType::Volume => "Volume",
            TargetType::Gateway => "Gateway",
            TargetType::GatewayReplica => "Gateway replica",
            TargetType::Secret => "Secret",
            TargetType::Preset => "Preset",
        }
    }
}

impl std::fmt::Display for TargetType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A record an event is about, or the one it lies within.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// Its kind.
    #[serde(rename = "type")]
    pub kind: TargetType,
    /// Its id.
    pub id: String,
    /// Its name (a job's is `<run>-<job_num>-<replica_num>`, as dstack names jobs).
    pub name: String,
}

/// One recorded status change (or creation) of a record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Increasing in the order events were committed: the cursor of listings.
    pub id: i64,
    /// When it was recorded (Unix ms).
    pub recorded_at_ms: u64,
    /// The record whose status changed.
    pub target: Target,
    /// The run a job belongs to, or the fleet an instance belongs to (the record itself for
    /// others).
    pub within: Target,
    /// A job's replica number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_num: Option<u32>,
    /// A job's job number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_num: Option<u32>,
    /// A job's submission number (0: the first; more: retries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submission_num: Option<u32>,
    /// The status before; none when the record was created.
    pub from: Option<String>,
    /// The status after.
    pub to: String,
    /// The termination reason recorded with the change, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The message that goes with it (a job's termination message, an instance's or fleet's
    /// status message), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_message: Option<String>,
}

impl Event {
    /// The message as dstack's server words it: `Run submitted. Status: SUBMITTED`, `Job
    /// status changed RUNNING -> TERMINATING. Termination reason: TERMINATED_BY_USER`, …
    pub fn message(&self) -> String {
        let noun = self.target.kind.noun();
        let to = self.to.to_uppercase();
        let Some(from) = &self.from else {
            return match self.target.kind {
                TargetType::Run => format!("Run submitted. Status: {to}"),
                TargetType::Job if self.submission_num.unwrap_or(0) > 0 => {
                    format!("Job created on retry. Status: {to}")
                }
                TargetType::Job => format!("Job created on run submission. Status: {to}"),
                _ => format!("{noun} created. Status: {to}"),
            };
        };
        let mut message = format!("{noun} status changed {} -> {to}", from.to_uppercase());
        if ends(&self.to) && (self.to == "terminating" || from != "terminating") {
            if let Some(reason) = &self.reason {
                message.push_str(&format!(". Termination reason: {}", reason.to_uppercase()));
            }
            if let Some(text) = self.reason_message.as_deref().filter(|t| !t.is_empty()) {
                message.push_str(&format!(" ({text})"));
            }
        }
        message
    }
}

/// Whether `status` (of any record type) is one a termination reason goes with: being
/// terminated or finished.
fn ends(status: &str) -> bool {
    matches!(
        status,
        "terminating" | "terminated" | "aborted" | "failed" | "done" | "deleted"
    )
}

/// A record named by its type and id (what a `within` filter names).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordRef {
    /// Its kind: a run, a fleet, a volume.
    #[serde(rename = "type")]
    pub kind: TargetType,
    /// Its id.
    pub id: String,
}

/// Where a listing starts: after (or, newest first, before) this event.
pub type Cursor = i64;

/// Which events to list (`/api/events/list` in this project's dialect).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EventQuery {
    /// Only events about these records (ids); none: any.
    pub targets: Vec<String>,
    /// Only events about these records or the records within them (a run's jobs, a fleet's
    /// instances); none: any.
    pub within: Vec<RecordRef>,
    /// Only events about records of these types; none: any.
    pub types: Vec<TargetType>,
    /// Only events recorded at or after this time (Unix ms).
    pub since_ms: Option<u64>,
    /// Only events after this one (oldest first) or before it (newest first).
    pub after: Option<Cursor>,
    /// At most this many ([`DEFAULT_LIMIT`] when 0).
    pub limit: usize,
    /// Oldest first (else newest first).
    pub ascending: bool,
}

impl EventQuery {
    /// The limit that applies.
    pub fn limit(&self) -> usize {
        if self.limit == 0 {
            DEFAULT_LIMIT
        } else {
            self.limit
        }
    }

    /// The same query, continued after the last of `page` (in the query's order).
    pub fn next_page(&self, page: &[Event]) -> Option<EventQuery> {
        let last = page.last()?;
        (page.len() >= self.limit()).then(|| EventQuery {
            after: Some(last.id),
            ..self.clone()
        })
    }
}

/// The UUID dstack's clients see for event `id` (events are numbered here).
pub fn dstack_event_id(id: Cursor) -> String {
    format!("00000000-0000-4000-8000-{:012x}", id & 0xffff_ffff_ffff)
}

/// The event number of a UUID made by [`dstack_event_id`].
pub fn parse_dstack_event_id(text: &str) -> Option<Cursor> {
    let tail = text.strip_prefix("00000000-0000-4000-8000-")?;
    if tail.len() != 12 {
        return None;
    }
    i64::from_str_radix(tail, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: TargetType, from: Option<&str>, to: &str) -> Event {
        let target = Target {
            kind,
            id: "id".into(),
            name: "name".into(),
        };
        Event {
            id: 1,
            recorded_at_ms: 0,
            within: target.clone(),
            target,
            replica_num: None,
            job_num: None,
            submission_num: None,
            from: from.map(str::to_string),
            to: to.to_string(),
            reason: None,
            reason_message: None,
        }
    }

    #[test]
    fn messages_are_worded_as_dstacks_server_words_them() {
        let run = event(TargetType::Run, None, "submitted");
        assert_eq!(run.message(), "Run submitted. Status: SUBMITTED");
        let job = event(TargetType::Job, None, "submitted");
        assert_eq!(
            job.message(),
            "Job created on run submission. Status: SUBMITTED"
        );
        let retry = Event {
            submission_num: Some(1),
            ..job.clone()
        };
        assert_eq!(retry.message(), "Job created on retry. Status: SUBMITTED");
        assert_eq!(
            event(TargetType::Fleet, None, "active").message(),
            "Fleet created. Status: ACTIVE"
        );
        let change = event(TargetType::Run, Some("submitted"), "provisioning");
        assert_eq!(
            change.message(),
            "Run status changed SUBMITTED -> PROVISIONING"
        );
    }

    #[test]
    fn a_termination_reason_goes_with_the_change_that_ends_a_record() {
        let stopping = Event {
            reason: Some("terminated_by_user".into()),
            reason_message: Some("stopped".into()),
            ..event(TargetType::Job, Some("running"), "terminating")
        };
        assert_eq!(
            stopping.message(),
            "Job status changed RUNNING -> TERMINATING. Termination reason: TERMINATED_BY_USER (stopped)"
        );
        // Said once: not again when the record leaves `terminating`.
        let stopped = Event {
            from: Some("terminating".into()),
            to: "terminated".into(),
            ..stopping.clone()
        };
        assert_eq!(
            stopped.message(),
            "Job status changed TERMINATING -> TERMINATED"
        );
        // Ending without `terminating` in between, the reason is told there.
        let done = Event {
            reason: Some("all_jobs_done".into()),
            ..event(TargetType::Run, Some("running"), "done")
        };
        assert_eq!(
            done.message(),
            "Run status changed RUNNING -> DONE. Termination reason: ALL_JOBS_DONE"
        );
        // A reason left over from before is not told for a change that ends nothing.
        let resubmitted = Event {
            reason: Some("job_failed".into()),
            ..event(TargetType::Run, Some("pending"), "submitted")
        };
        assert_eq!(
            resubmitted.message(),
            "Run status changed PENDING -> SUBMITTED"
        );
    }

    #[test]
    fn target_types_read_and_write_dstacks_names() {
        for kind in TargetType::ALL {
            assert_eq!(TargetType::parse(kind.as_str()), Some(*kind));
            let json = serde_json::to_string(kind).unwrap();
            assert_eq!(json, format!("\"{kind}\""));
        }
        assert_eq!(TargetType::parse("runs"), None);
    }

    #[test]
    fn event_ids_survive_dstacks_uuids_and_pages_continue_after_the_last() {
        let uuid = dstack_event_id(0x1234);
        assert!(uuid::Uuid::parse_str(&uuid).is_ok());
        assert_eq!(parse_dstack_event_id(&uuid), Some(0x1234));
        assert_eq!(parse_dstack_event_id("not-an-event"), None);

        let query = EventQuery {
            limit: 2,
            ..EventQuery::default()
        };
        let page = vec![
            event(TargetType::Run, None, "submitted"),
            Event {
                id: 7,
                ..event(TargetType::Run, Some("submitted"), "running")
            },
        ];
        assert_eq!(query.next_page(&page).unwrap().after, Some(7));
        assert_eq!(
            query.next_page(&page[..1]),
            None,
            "a short page is the last"
        );
        assert_eq!(EventQuery::default().limit(), DEFAULT_LIMIT);
    }
}
