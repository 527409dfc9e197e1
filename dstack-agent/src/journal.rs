//! The job journal: one append-only file (`<state>/jobs.journal`) recording every job's state.
//!
//! Each line is one JSON object: a [`JobRecord`] (a job's full state, written when the job is
//! submitted; what it runs, `argv`, only if it is queued: a job is never started again from
//! the journal unless it was queued; never its `env`, its registry credentials nor its
//! repo's credentials, which may hold secrets: [`JobRecord::withheld`] says they were left out), an update `{"update":"<id>","info":…,"process":…}` (its later states: the
//! submission is not written again; the last state of an id wins), or a tombstone
//! `{"removed":"<id>"}` (the job was deleted). Lines are
//! appended whole, with one write, by a single writer, and not synced (a crash of the host
//! loses at most the last changes, which recovery treats like any other job of a lost agent).
//!
//! On start the journal is read (lines that do not decode, such as one torn by a crash, are
//! skipped), then compacted: rewritten, and synced, with only the live records. Records of
//! older agents (`jobs/<id>/job.json`) are read too, carried into the compacted journal, and
//! deleted.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use dstack_core::agent::{JobInfo, JobSubmit};
use serde::{Deserialize, Serialize};

use crate::jobs::{HOSTFILE_ENV, METRICS_ENV};
use crate::process::ProcessGroup;

/// What the journal records about a job: everything needed to report, and after a restart
/// recover, it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct JobRecord {
    /// The job as the API reports it.
    pub info: JobInfo,
    /// What was submitted (`argv` and `env` only while the job may still start).
    pub spec: JobSubmit,
    /// The process group, when the process was started.
    pub process: Option<ProcessGroup>,
    /// The job's private directory (metrics file, MPI hostfile); absent in records of older
    /// agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scratch: Option<PathBuf>,
    /// Whether the submission had an `env` or registry credentials, which the journal does
    /// not hold: a queued job recorded so cannot be started by the next agent.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub withheld: bool,
}

impl JobRecord {
    /// The record as the journal holds it: without the job's `env` (but for the variables
    /// the agent itself sets, which name the job's private files) or registry credentials.
    fn redacted(&self) -> JobRecord {
        let mut record = self.clone();
        let auth = record
            .spec
            .container
            .as_mut()
            .and_then(|c| c.registry_auth.take());
        let creds = record.spec.clone.as_mut().and_then(|c| c.creds.take());
        let submitted = record.spec.env.len();
        record
            .spec
            .env
            .retain(|name, _| name == METRICS_ENV || name == HOSTFILE_ENV);
        record.withheld |= auth.is_some() || creds.is_some() || record.spec.env.len() < submitted;
        record
    }

    /// The record as compaction keeps it: a finished job's command (`argv`, `env`) is of no
    /// more use and is dropped; its state, its id and its log are what is left to serve.
    fn compacted(mut self) -> Self {
        if self.info.status.is_finished() {
            self.spec.argv = Vec::new();
            self.spec.env = BTreeMap::new();
        }
        self
    }
}

/// One line of the journal.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Line {
    /// The job was deleted: its earlier records no longer count.
    Removed { removed: String },
    /// A later state of a job recorded whole before.
    Update {
        update: String,
        info: JobInfo,
        process: Option<ProcessGroup>,
    },
    /// The state of a job.
    Record(Box<JobRecord>),
}

/// The open journal, appended to by every job.
pub(crate) struct Journal {
    file: Mutex<File>,
}

impl Journal {
    /// Reads the journal at `path` and the records of older agents under `legacy_jobs`,
    /// compacts the journal, and returns it open for appending with the live records.
    pub fn open(path: &Path, legacy_jobs: &Path) -> io::Result<(Journal, Vec<JobRecord>)> {
        let mut live = BTreeMap::new();
        let legacy_files = read_legacy(legacy_jobs, &mut live)?;
        match File::open(path) {
            Ok(file) => replay(BufReader::new(file), path, &mut live)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let records: Vec<JobRecord> = live.into_values().map(JobRecord::compacted).collect();
        compact(path, &records)?;
        for legacy_file in legacy_files {
            if let Err(e) = fs::remove_file(&legacy_file) {
                eprintln!("dstack-agent: cannot remove {}: {e}", legacy_file.display());
            }
        }
        let file = OpenOptions::new().append(true).open(path)?;
        let journal = Journal {
            file: Mutex::new(file),
        };
        Ok((journal, records))
    }

    /// Appends the current state of a job (without its `env` or registry credentials).
    pub fn record(&self, record: JobRecord) -> io::Result<()> {
        self.append(&Line::Record(Box::new(record.redacted())))
    }

    /// Appends a later state of a job whose record is in the journal.
    pub fn update(&self, info: &JobInfo, process: Option<&ProcessGroup>) -> io::Result<()> {
        self.append(&Line::Update {
            update: info.id.clone(),
            info: info.clone(),
            process: process.cloned(),
        })
    }

    /// Appends the tombstone of the deleted job `id`.
    pub fn remove(&self, id: &str) -> io::Result<()> {
        self.append(&Line::Removed {
            removed: id.to_string(),
        })
    }

    fn append(&self, line: &Line) -> io::Result<()> {
        let mut bytes = serde_json::to_vec(line)?;
        bytes.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        file.write_all(&bytes)
    }
}

/// Applies the lines of a journal to `live`, skipping (and reporting) those that do not decode.
fn replay(
    journal: impl BufRead,
    path: &Path,
    live: &mut BTreeMap<String, JobRecord>,
) -> io::Result<()> {
    let mut lines = journal.split(b'\n').enumerate().peekable();
    while let Some((index, line)) = lines.next() {
        let line = line?;
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice::<Line>(&line) {
            Ok(Line::Record(record)) => {
                live.insert(record.spec.id.clone(), *record);
            }
            Ok(Line::Removed { removed }) => {
                live.remove(&removed);
            }
            Ok(Line::Update {
                update,
                info,
                process,
            }) => match live.get_mut(&update) {
                Some(record) => {
                    record.info = info;
                    record.process = process;
                }
                None => eprintln!(
                    "dstack-agent: skipping line {} of {}: no record of job {update}",
                    index + 1,
                    path.display()
                ),
            },
            // The write of the last line was cut short (by a crash, or a full disk).
            Err(_) if lines.peek().is_none() => {
                eprintln!(
                    "dstack-agent: ignoring the torn last line of {}",
                    path.display()
                );
            }
            Err(e) => eprintln!(
                "dstack-agent: skipping line {} of {}: {e}",
                index + 1,
                path.display()
            ),
        }
    }
    Ok(())
}

/// Replaces the journal at `path` by one holding only `records` (a temporary file, synced,
/// then a rename: a crash leaves either journal whole).
fn compact(path: &Path, records: &[JobRecord]) -> io::Result<()> {
    let tmp = path.with_extension("journal.tmp");
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.set_permissions(fs::Permissions::from_mode(0o600))?;
    let mut out = BufWriter::new(file);
    for record in records {
        serde_json::to_writer(&mut out, &record.redacted())?;
        out.write_all(b"\n")?;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    fs::rename(tmp, path)
}

/// Adds the `<jobs>/<id>/job.json` records written by older agents to `live`; returns the
/// files read. Unreadable records are reported and skipped.
fn read_legacy(jobs: &Path, live: &mut BTreeMap<String, JobRecord>) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(jobs)? {
        let path = entry?.path().join("job.json");
        let record = fs::read(&path)
            .and_then(|bytes| serde_json::from_slice::<JobRecord>(&bytes).map_err(io::Error::from));
        match record {
            Ok(record) => {
                live.insert(record.spec.id.clone(), record);
                files.push(path);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("dstack-agent: skipping {}: {e}", path.display()),
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use dstack_core::agent::AgentJobStatus;

    use super::*;

    fn record(id: &str, status: AgentJobStatus) -> JobRecord {
        JobRecord {
            info: JobInfo {
                id: id.to_string(),
                status,
                exit_status: None,
                termination_reason: None,
                termination_message: None,
                started_at_ms: 1,
                finished_at_ms: None,
                log_bytes: 0,
            },
            spec: crate::jobs::tests::true_job(id, "/"),
            process: None,
            scratch: None,
            withheld: false,
        }
    }

    struct State {
        dir: tempfile::TempDir,
    }

    impl State {
        fn new() -> State {
            let dir = tempfile::tempdir().unwrap();
            fs::create_dir(dir.path().join("jobs")).unwrap();
            State { dir }
        }

        fn journal(&self) -> PathBuf {
            self.dir.path().join("jobs.journal")
        }

        fn jobs(&self) -> PathBuf {
            self.dir.path().join("jobs")
        }

        /// Opens the journal; returns it and the (id, status) of its live records.
        fn open(&self) -> (Journal, Vec<(String, AgentJobStatus)>) {
            let (journal, records) = Journal::open(&self.journal(), &self.jobs()).unwrap();
            let live = records
                .into_iter()
                .map(|r| (r.spec.id, r.info.status))
                .collect();
            (journal, live)
        }

        fn lines(&self) -> usize {
            fs::read_to_string(self.journal()).unwrap().lines().count()
        }
    }

    #[test]
    fn the_journal_holds_no_env_and_compaction_drops_what_finished_jobs_ran() {
        let state = State::new();
        let (journal, _) = state.open();
        let with_env = |id: &str, status| {
            let mut r = record(id, status);
            r.spec.env.insert("SECRET_TOKEN".into(), "s3cr3t".into());
            r
        };
        journal
            .record(with_env("queued", AgentJobStatus::Queued))
            .unwrap();
        journal
            .record(with_env("done", AgentJobStatus::Running))
            .unwrap();
        let mut done = record("done", AgentJobStatus::Done).info;
        done.exit_status = Some(0);
        journal.update(&done, None).unwrap();
        drop(journal);
        let (_, records) = Journal::open(&state.journal(), &state.jobs()).unwrap();
        let [done, queued] = records.as_slice() else {
            panic!("{records:?}")
        };
        assert_eq!(
            (done.spec.id.as_str(), done.info.exit_status),
            ("done", Some(0))
        );
        assert!(done.spec.argv.is_empty() && done.spec.env.is_empty());
        assert_eq!(queued.spec.argv, ["/bin/true"]);
        assert!(queued.spec.env.is_empty() && queued.withheld);
        let text = fs::read_to_string(state.journal()).unwrap();
        assert_eq!(text.matches("s3cr3t").count(), 0, "{text}");
    }

    #[test]
    fn the_last_record_wins_and_tombstones_remove() {
        let state = State::new();
        let (journal, live) = state.open();
        assert!(live.is_empty());
        journal
            .record(record("a", AgentJobStatus::Running))
            .unwrap();
        journal
            .record(record("b", AgentJobStatus::Running))
            .unwrap();
        journal.record(record("a", AgentJobStatus::Done)).unwrap();
        journal.record(record("b", AgentJobStatus::Failed)).unwrap();
        journal.remove("b").unwrap();
        drop(journal);
        assert_eq!(state.lines(), 5);

        let (_journal, live) = state.open();
        assert_eq!(live, [("a".to_string(), AgentJobStatus::Done)]);
        assert_eq!(state.lines(), 1, "compacted");
        let mode = fs::metadata(state.journal()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn updates_carry_later_states_without_the_submission() {
        let state = State::new();
        let (journal, _) = state.open();
        let running = record("a", AgentJobStatus::Running);
        journal.record(running.clone()).unwrap();
        let done = JobInfo {
            status: AgentJobStatus::Done,
            exit_status: Some(0),
            ..running.info.clone()
        };
        journal.update(&done, None).unwrap();
        let orphan = record("b", AgentJobStatus::Done).info;
        journal.update(&orphan, None).unwrap();
        let text = fs::read_to_string(state.journal()).unwrap();
        assert_eq!(text.matches("/bin/true").count(), 1, "{text}");
        drop(journal);

        let (_, live) = state.open();
        assert_eq!(live, [("a".to_string(), AgentJobStatus::Done)]);
        // Compacted into whole records (a finished job's without what it ran).
        let (_, records) = Journal::open(&state.journal(), &state.jobs()).unwrap();
        let ran_nothing = JobSubmit {
            argv: Vec::new(),
            ..running.spec.clone()
        };
        assert_eq!(records[0].spec, ran_nothing);
        assert_eq!(records[0].info, done);
        assert_eq!(state.lines(), 1);
    }

    #[test]
    fn undecodable_lines_are_skipped() {
        let state = State::new();
        let (journal, _) = state.open();
        journal.record(record("a", AgentJobStatus::Done)).unwrap();
        drop(journal);
        let mut file = OpenOptions::new()
            .append(true)
            .open(state.journal())
            .unwrap();
        file.write_all(b"not json\n\xff\xfe\n").unwrap();
        let mut good = serde_json::to_vec(&record("b", AgentJobStatus::Done)).unwrap();
        good.push(b'\n');
        file.write_all(&good).unwrap();
        // A crash in the middle of a write.
        let torn = serde_json::to_vec(&record("c", AgentJobStatus::Done)).unwrap();
        file.write_all(&torn[..torn.len() / 2]).unwrap();
        drop(file);

        let (journal, live) = state.open();
        let ids: Vec<&str> = live.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        // Appending after a torn line starts a line of its own.
        journal.record(record("d", AgentJobStatus::Done)).unwrap();
        drop(journal);
        assert_eq!(state.open().1.len(), 3);
    }

    #[test]
    fn records_of_older_agents_are_carried_into_the_journal() {
        let state = State::new();
        let dir = state.jobs().join("old");
        fs::create_dir(&dir).unwrap();
        let old = record("old", AgentJobStatus::Done);
        fs::write(
            dir.join("job.json"),
            serde_json::to_vec_pretty(&old).unwrap(),
        )
        .unwrap();
        fs::write(dir.join("output.log"), "kept\n").unwrap();
        let broken = state.jobs().join("broken");
        fs::create_dir(&broken).unwrap();
        fs::write(broken.join("job.json"), "{").unwrap();
        fs::create_dir(state.jobs().join("new-style")).unwrap();

        let (_journal, live) = state.open();
        assert_eq!(live, [("old".to_string(), AgentJobStatus::Done)]);
        assert!(!dir.join("job.json").exists());
        assert!(dir.join("output.log").exists());
        assert_eq!(state.lines(), 1);
        let (_journal, live) = state.open();
        assert_eq!(live, [("old".to_string(), AgentJobStatus::Done)]);
    }
}
