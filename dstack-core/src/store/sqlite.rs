//! The SQLite store: one file under `$DSTACK_HOME`, WAL mode, versioned migrations.
//!
//! Records are stored as JSON next to the columns that are queried (status, names, times).

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::busy::retry_soon;
use super::checkpoint::Checkpointer;
use super::{
    ChangeFn, Changed, DeriveFn, Holding, JobAndRun, Placement, Placing, RunFilter, RunListing,
    Store, StoreError, WaitingJob,
};
use crate::events::{Event, EventQuery};
use crate::model::{Fleet, Instance, Job, JobStatus, Reservation, Run, RunStatus, Volume};

/// SQL: a job waits to be placed (the condition of the `jobs_waiting` index, which SQLite uses
/// only for queries that state it).
macro_rules! job_waiting {
    () => {
        "status = 'submitted'"
    };
}

/// SQL: a job holds resources on its instance (the condition of the `jobs_holding` index).
///
/// Written as comparisons joined by `OR`, not as `status IN (...)`: SQLite evaluates the
/// condition of a partial index on every write of a row (for the row before and after), and
/// an `IN` list of more than two values makes it build a temporary b-tree each time.
/// `job_holding!("h.")` names the status column of table `h`.
macro_rules! job_holding {
    () => {
        job_holding!("")
    };
    ($table:literal) => {
        concat!(
            "(",
            $table,
            "status = 'provisioning' OR ",
            $table,
            "status = 'pulling' OR ",
            $table,
            "status = 'running' OR ",
            $table,
            "status = 'terminating')"
        )
    };
}

/// SQL: now, in Unix milliseconds.
macro_rules! now_ms {
    () => {
        "CAST(unixepoch('subsec') * 1000 AS INTEGER)"
    };
}

/// SQL: the two triggers that record the events of records of `$table`: its creation
/// (`AFTER INSERT`), and each change of its status (`AFTER $update WHEN $changed`, `$old`
/// being the status before). `$columns` of `events` (besides `recorded_at` and `old_status`)
/// take `$values` selected `$from` (`FROM …` or nothing), written in terms of `new`.
macro_rules! record_events {
    ($table:literal, $update:literal, $changed:literal, $old:literal, $columns:literal, $values:expr, $from:literal) => {
        concat!(
            "CREATE TRIGGER ",
            $table,
            "_created AFTER INSERT ON ",
            $table,
            " BEGIN
                INSERT INTO events (recorded_at, old_status, ",
            $columns,
            ")
                SELECT ",
            now_ms!(),
            ", NULL, ",
            $values,
            " ",
            $from,
            ";
            END;
            CREATE TRIGGER ",
            $table,
            "_status_changed AFTER ",
            $update,
            " ON ",
            $table,
            " WHEN ",
            $changed,
            " BEGIN
                INSERT INTO events (recorded_at, old_status, ",
            $columns,
            ")
                SELECT ",
            now_ms!(),
            ", ",
            $old,
            ", ",
            $values,
            " ",
            $from,
            ";
            END;"
        )
    };
}

/// SQL: whether the status of row `$row` (`new.`) is one a termination reason goes with
/// (comparisons, not an `IN` list: see `job_holding!`).
macro_rules! ending {
    ($row:literal) => {
        concat!(
            "(",
            $row,
            "status = 'terminating' OR ",
            $row,
            "status = 'terminated' OR ",
            $row,
            "status = 'aborted' OR ",
            $row,
            "status = 'failed' OR ",
            $row,
            "status = 'done')"
        )
    };
}

/// SQL: `$value` when the status of `new` is [`ending!`], else NULL (what is not told is not
/// read from the record's JSON).
macro_rules! when_ending {
    ($value:literal) => {
        concat!("CASE WHEN ", ending!("new."), " THEN ", $value, " END")
    };
}

/// SQL: [`record_events!`] for a table whose records keep their status in their JSON
/// (instances, fleets, volumes).
macro_rules! record_events_of_data {
    ($table:literal, $columns:literal, $values:literal) => {
        record_events!(
            $table,
            "UPDATE OF data",
            "json_extract(old.data, '$.status') IS NOT json_extract(new.data, '$.status')",
            "json_extract(old.data, '$.status')",
            $columns,
            $values,
            ""
        )
    };
}

/// The schema, one entry per version; applied in order, each in a transaction.
const MIGRATIONS: &[&str] = &[
    // 1: runs, jobs, fleets, instances.
    "CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        status TEXT NOT NULL,
        active INTEGER NOT NULL,
        replaced INTEGER NOT NULL DEFAULT 0,
        submitted_at INTEGER NOT NULL,
        data TEXT NOT NULL
    );
    CREATE UNIQUE INDEX runs_active_name ON runs(name) WHERE active = 1;
    CREATE INDEX runs_status ON runs(status);
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        job_num INTEGER NOT NULL,
        submission_num INTEGER NOT NULL,
        status TEXT NOT NULL,
        instance_id TEXT,
        submitted_at INTEGER NOT NULL,
        data TEXT NOT NULL
    );
    CREATE INDEX jobs_run ON jobs(run_id);
    CREATE INDEX jobs_status ON jobs(status);
    CREATE INDEX jobs_instance ON jobs(instance_id);
    CREATE TABLE fleets (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, data TEXT NOT NULL);
    CREATE TABLE instances (id TEXT PRIMARY KEY, fleet_id TEXT NOT NULL, data TEXT NOT NULL);",
    // 2: indexes for the hot queries (placement, the waiting queue, names).
    "CREATE INDEX jobs_instance_status ON jobs(instance_id, status);
    CREATE INDEX jobs_status_submitted ON jobs(status, submitted_at);
    CREATE INDEX runs_name ON runs(name, submitted_at);",
    // 3: a job's reservation beside its record, so placement sums it without decoding jobs.
    "ALTER TABLE jobs ADD COLUMN reservation TEXT;",
    // 4: run groups (sweeps) with a limit on how many of their runs are placed at once.
    "ALTER TABLE runs ADD COLUMN group_id TEXT;
    ALTER TABLE runs ADD COLUMN group_max INTEGER;
    CREATE INDEX runs_group ON runs(group_id) WHERE group_id IS NOT NULL;",
    // 5: network volumes.
    "CREATE TABLE volumes (id TEXT PRIMARY KEY, name TEXT NOT NULL, data TEXT NOT NULL);",
    // 6: fewer index pages to write per job change: these two are prefixes of
    // jobs_status_submitted and jobs_instance_status.
    "DROP INDEX jobs_status;
    DROP INDEX jobs_instance;
    CREATE INDEX runs_active_group ON runs(group_id) WHERE group_id IS NOT NULL AND active = 1;",
    // 7: status indexes hold unfinished records only, so a transition writes fewer, shallower
    // index pages however long the history grows (and the waiting queue is read from its index
    // alone).
    "DROP INDEX jobs_status_submitted;
    DROP INDEX jobs_instance_status;
    DROP INDEX runs_status;
    CREATE INDEX jobs_unfinished ON jobs(status, submitted_at, id, run_id)
        WHERE status IN ('submitted', 'provisioning', 'pulling', 'running', 'terminating');
    CREATE INDEX jobs_holding ON jobs(instance_id)
        WHERE status IN ('provisioning', 'pulling', 'running', 'terminating');
    CREATE INDEX runs_unfinished ON runs(status, submitted_at) WHERE active = 1;",
    // 8: the job a job is queued behind, for placement.
    "ALTER TABLE jobs ADD COLUMN after_job TEXT;",
    // 9: no index keyed by status any more, so a transition writes fewer index pages (a
    // status-first key moved the entry of the job and of its run to another page at every
    // step): the waiting queue has an index of its own, entered once and left once;
    // unfinished runs are found through the index of active runs, which a run enters and
    // leaves once.
    "DROP INDEX jobs_unfinished;
    DROP INDEX runs_unfinished;
    CREATE INDEX jobs_waiting ON jobs(submitted_at, id, run_id) WHERE status = 'submitted';
    CREATE INDEX runs_active ON runs(submitted_at) WHERE active = 1;",
    // 10: the condition of `jobs_holding` without an `IN` list (see `job_holding!`).
    concat!(
        "DROP INDEX jobs_holding;
        CREATE INDEX jobs_holding ON jobs(instance_id) WHERE ",
        job_holding!(),
        ";"
    ),
    // 11: a run's jobs come out of the index in the order they are read in (job number, then
    // submission), without a sort on every change of a job.
    "DROP INDEX jobs_run;
    CREATE INDEX jobs_run ON jobs(run_id, job_num, submission_num);",
    // 12: the state's identity, and the file it was made for (see `identity`).
    "CREATE TABLE state_identity (id TEXT NOT NULL, dev INTEGER NOT NULL, ino INTEGER NOT NULL);",
    // 13: a job carries its run's group when that group has a limit, and the waiting queue is
    // keyed by it: placement reads the first few waiting jobs of each group with room (and
    // of no group) instead of stepping over every waiting job of a full group, and a group's
    // count of runs holding resources comes from `jobs_holding` alone (session 16).
    "ALTER TABLE jobs ADD COLUMN group_id TEXT;
    UPDATE jobs SET group_id = (SELECT r.group_id FROM runs r WHERE r.id = jobs.run_id)
        WHERE run_id IN (SELECT id FROM runs WHERE group_max IS NOT NULL);
    DROP INDEX jobs_waiting;
    CREATE INDEX jobs_waiting ON jobs(group_id, submitted_at, id, run_id) WHERE status = 'submitted';",
    // 14: a run's configuration type beside its record, so that the unfinished runs of one
    // type (services, for the proxy) are found without decoding every unfinished run.
    "ALTER TABLE runs ADD COLUMN kind TEXT;
    UPDATE runs SET kind = json_extract(data, '$.spec.configuration.type');
    CREATE INDEX runs_active_kind ON runs(kind) WHERE active = 1;",
    // 15: `priority` orders the waiting queue (the highest first, then the oldest): a run's
    // priority beside its record, and each job's beside it, in the key of the waiting index.
    "ALTER TABLE runs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
    UPDATE runs SET priority = COALESCE(json_extract(data, '$.spec.configuration.priority'), 0);
    ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
    UPDATE jobs SET priority = (SELECT r.priority FROM runs r WHERE r.id = jobs.run_id)
        WHERE status = 'submitted';
    DROP INDEX jobs_waiting;
    CREATE INDEX jobs_waiting ON jobs(group_id, priority DESC, submitted_at, id, run_id)
        WHERE status = 'submitted';",
    // 16: the history of status changes (`dstack event`), written by triggers in the
    // transaction of each write that creates a record or changes its status (see
    // `crate::events`). `scope_id` is the run of a job, the fleet of an instance, the record
    // itself otherwise: "within run X" reads one range of `events_scope`. Its key starts
    // with the run's submission time (0 for others), so that a batch of new runs appends
    // to the index instead of writing a page at a random place for each of them. A job's
    // replica number gets a column, so that its event reads its record's JSON only for a
    // termination reason.
    concat!(
        "CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            recorded_at INTEGER NOT NULL,
            target_type TEXT NOT NULL,
            target_id TEXT NOT NULL,
            target_name TEXT NOT NULL,
            scope_type TEXT NOT NULL,
            scope_time INTEGER NOT NULL,
            scope_id TEXT NOT NULL,
            scope_name TEXT NOT NULL,
            replica_num INTEGER,
            job_num INTEGER,
            submission_num INTEGER,
            old_status TEXT,
            new_status TEXT NOT NULL,
            reason TEXT,
            reason_message TEXT
        );
        CREATE INDEX events_scope ON events(scope_type, scope_time, scope_id, id);
        ALTER TABLE jobs ADD COLUMN replica_num INTEGER NOT NULL DEFAULT 0;
        UPDATE jobs SET replica_num = json_extract(data, '$.replica_num');",
        record_events!(
            "runs",
            "UPDATE OF status",
            "old.status IS NOT new.status",
            "old.status",
            "target_type, target_id, target_name, scope_type, scope_time, scope_id, scope_name,
             new_status, reason",
            concat!(
                "'run', new.id, new.name, 'run', new.submitted_at, new.id, new.name, new.status, ",
                when_ending!("json_extract(new.data, '$.termination_reason')")
            ),
            ""
        ),
        record_events!(
            "jobs",
            "UPDATE OF status",
            "old.status IS NOT new.status",
            "old.status",
            "target_type, target_id, target_name, scope_type, scope_time, scope_id, scope_name,
             replica_num, job_num, submission_num, new_status, reason, reason_message",
            concat!(
                "'job', new.id, r.name || '-' || new.job_num || '-' || new.replica_num, 'run',
                 r.submitted_at, new.run_id, r.name, new.replica_num, new.job_num,
                 new.submission_num, new.status, ",
                when_ending!("json_extract(new.data, '$.termination_reason')"),
                ", ",
                when_ending!("json_extract(new.data, '$.termination_message')")
            ),
            "FROM runs r WHERE r.id = new.run_id"
        ),
        record_events_of_data!(
            "instances",
            "target_type, target_id, target_name, scope_type, scope_time, scope_id, scope_name,
             new_status, reason_message",
            "'instance', new.id, json_extract(new.data, '$.name'), 'fleet', 0, new.fleet_id,
             COALESCE((SELECT name FROM fleets WHERE id = new.fleet_id), new.fleet_id),
             json_extract(new.data, '$.status'), json_extract(new.data, '$.status_message')"
        ),
        record_events_of_data!(
            "fleets",
            "target_type, target_id, target_name, scope_type, scope_time, scope_id, scope_name,
             new_status, reason_message",
            "'fleet', new.id, new.name, 'fleet', 0, new.id, new.name,
             json_extract(new.data, '$.status'), json_extract(new.data, '$.status_message')"
        ),
        record_events_of_data!(
            "volumes",
            "target_type, target_id, target_name, scope_type, scope_time, scope_id, scope_name,
             new_status, reason_message",
            "'volume', new.id, new.name, 'volume', 0, new.id, new.name,
             json_extract(new.data, '$.status'), json_extract(new.data, '$.status_message')"
        ),
    ),
];

const JOB_WAITING: &str = job_waiting!();
const JOB_HOLDING: &str = job_holding!();

/// SQL: how many runs of group `$group` (an SQL expression) have a job that holds resources;
/// read from the `jobs_holding` index (jobs that hold resources are few: at most what the
/// instances run and queue), whatever the size of the group.
macro_rules! group_holding_sql {
    ($group:literal) => {
        concat!(
            "SELECT COUNT(DISTINCT h.run_id) FROM jobs h INDEXED BY jobs_holding WHERE h.group_id = ",
            $group,
            " AND ",
            job_holding!("h.")
        )
    };
}

/// SQL: whether the group of run `r` (if it has one with a limit) may place one more run,
/// counting the group's runs with a job that holds resources.
macro_rules! group_room_sql {
    () => {
        concat!(
            "(r.group_max IS NULL OR r.group_max > (",
            group_holding_sql!("r.group_id"),
            "))"
        )
    };
}

/// Whether run `?` may be placed as far as its group's limit goes.
const GROUP_HAS_ROOM: &str = concat!("SELECT ", group_room_sql!(), " FROM runs r WHERE r.id = ?");

/// The status of run `?`, and whether it may be placed as far as its group's limit goes.
const RUN_STATUS_AND_GROUP_ROOM: &str = concat!(
    "SELECT r.status, ",
    group_room_sql!(),
    " FROM runs r WHERE r.id = ?"
);

/// The runs with a running job (see [`Store::running_runs`]).
const RUNNING_RUNS: &str = concat!(
    "SELECT data FROM runs WHERE id IN (SELECT run_id FROM jobs INDEXED BY jobs_holding \
     WHERE status = 'running' AND ",
    job_holding!(),
    ") ORDER BY submitted_at"
);

/// Every fleet, by name.
const FLEETS_SQL: &str = "SELECT data FROM fleets ORDER BY name";

/// Every instance.
const INSTANCES_SQL: &str = "SELECT data FROM instances";

/// The embedded store.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    /// Checkpoints the log of a store on disk (none for an in-memory one).
    checkpointer: Option<Checkpointer>,
    /// See [`Store::state_id`].
    state_id: String,
}

fn json<T: Serialize>(v: &T) -> Result<String, StoreError> {
    Ok(serde_json::to_string(v)?)
}

fn from_json<T: DeserializeOwned>(s: &str) -> Result<T, StoreError> {
    Ok(serde_json::from_str(s)?)
}

fn placeholders(n: usize) -> String {
    vec!["?"; n].join(",")
}

/// Runs `f` in a transaction that takes the write lock at once (`BEGIN IMMEDIATE`) or, for
/// reads, a deferred one: committed when `f` succeeds, rolled back when it fails. Unlike
/// rusqlite's `Transaction`, its `BEGIN` and `COMMIT` stay prepared.
pub(super) fn in_transaction<R>(
    c: &Connection,
    write: bool,
    f: impl FnOnce(&Connection) -> Result<R, StoreError>,
) -> Result<R, StoreError> {
    let begin = if write { "BEGIN IMMEDIATE" } else { "BEGIN" };
    c.prepare_cached(begin)?.execute([])?;
    let result = f(c).and_then(|r| {
        c.prepare_cached("COMMIT")?.execute([])?;
        Ok(r)
    });
    if result.is_err() && !c.is_autocommit() {
        let _ = c.prepare_cached("ROLLBACK").and_then(|mut s| s.execute([]));
    }
    result
}

impl SqliteStore {
    /// Opens (creating if needed) the state file at `path`, in a directory readable only by
    /// the owner, and migrates it to the current schema.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        if let Some(dir) = path.parent() {
            if !dir.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)?;
            }
        }
        let conn = Connection::open(path)?;
        // Runs carry environment values captured from the client: owner only.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let mut store = Self::init(conn)?;
        store.state_id = store.with(|c| super::identity::of_file(c, path))?;
        store.with(|c| Ok(c.pragma_update(None, "wal_autocheckpoint", 0)?))?;
        store.checkpointer = Some(Checkpointer::start(path)?);
        Ok(store)
    }

    /// An in-memory store (tests, throw-away engines).
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Self, StoreError> {
        conn.busy_handler(Some(retry_soon))?;
        // Every statement the store runs stays prepared (the default keeps only 16).
        conn.set_prepared_statement_cache_capacity(128);
        use_wal(&conn)?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Up to 32 MiB of pages in memory (SQLite's default is 2 MiB): a state file with a few
        // thousand runs outgrows the default, and every miss is a read from the file. The cache
        // holds only pages read, so a small state file costs no more.
        conn.pragma_update(None, "cache_size", -32 * 1024)?;
        migrate(&mut conn)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            checkpointer: None,
            state_id: super::identity::new_id(),
        })
    }

    /// Runs `f` on the writer connection.
    fn with<R>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let result = f(&mut conn);
        if let Some(checkpointer) = &self.checkpointer {
            checkpointer.after_writes(conn.total_changes());
        }
        result
    }

    /// Inserts or replaces record `id` of `table` (a table of `id`, one queried column
    /// `column` holding `key`, and the record's JSON `data`).
    fn upsert(
        &self,
        table: &str,
        column: &str,
        id: &str,
        key: &str,
        data: String,
    ) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT INTO {table} (id, {column}, data) VALUES (?1, ?2, ?3) \
             ON CONFLICT(id) DO UPDATE SET {column} = ?2, data = ?3"
        );
        self.with(|c| {
            c.prepare_cached(&sql)?.execute(params![id, key, data])?;
            Ok(())
        })
    }

    /// The JSON records `sql` selects (in its first column), decoded once the connection is
    /// free again.
    fn query<T: DeserializeOwned>(
        &self,
        sql: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<T>, StoreError> {
        self.with(|c| query(c, sql, args))
    }
}

/// The records (JSON in the first column) that `sql` selects.
fn query<T: DeserializeOwned>(
    c: &Connection,
    sql: &str,
    args: &[&dyn rusqlite::ToSql],
) -> Result<Vec<T>, StoreError> {
    let mut stmt = c.prepare_cached(sql)?;
    let mut rows = stmt.query(args)?;
    let mut records = Vec::new();
    while let Some(row) = rows.next()? {
        records.push(from_json(&row.get::<_, String>(0)?)?);
    }
    Ok(records)
}

/// Switches the database to WAL mode. Switching needs an exclusive lock, and SQLite reports
/// "database is locked" at once (without the busy timeout) while another process opening
/// the new file holds one: try again for as long as the busy timeout would wait.
fn use_wal(conn: &Connection) -> Result<(), StoreError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return Ok(other?),
        }
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::TooNew {
            found: version,
            known,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if current > i as i64 {
            continue; // another process migrated meanwhile
        }
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

fn status_strs<S: Copy>(statuses: &[S], f: impl Fn(S) -> &'static str) -> Vec<&'static str> {
    statuses.iter().map(|s| f(*s)).collect()
}

impl Store for SqliteStore {
    fn state_id(&self) -> &str {
        &self.state_id
    }

    fn insert_runs(&self, runs: &[(&Run, &[Job])]) -> Result<(), StoreError> {
        self.with(|c| {
            in_transaction(c, true, |c| {
                runs.iter()
                    .try_for_each(|(run, jobs)| insert_run(c, run, jobs))
            })
        })
    }

    fn run(&self, id: &str) -> Result<Option<Run>, StoreError> {
        Ok(self
            .query("SELECT data FROM runs WHERE id = ?", &[&id])?
            .pop())
    }

    fn run_by_name(&self, name: &str) -> Result<Option<Run>, StoreError> {
        let sql = "SELECT data FROM runs WHERE name = ? AND replaced = 0 ORDER BY submitted_at DESC LIMIT 1";
        Ok(self.query(sql, &[&name])?.pop())
    }

    fn runs(&self, filter: RunFilter) -> Result<RunListing, StoreError> {
        let limit = filter.limit.map_or(-1, |l| l as i64);
        let sql = if filter.active_only {
            "SELECT id, data FROM runs WHERE active = 1 ORDER BY submitted_at DESC LIMIT ?"
        } else {
            "SELECT id, data FROM runs WHERE replaced = 0 ORDER BY submitted_at DESC LIMIT ?"
        };
        self.with(|c| {
            let mut stmt = c.prepare_cached(sql)?;
            let mut rows = stmt.query([&limit])?;
            let mut listing = RunListing::default();
            while let Some(row) = rows.next()? {
                let id: String = row.get(0)?;
                match row
                    .get::<_, String>(1)
                    .map_err(StoreError::from)
                    .and_then(|d| from_json(&d))
                {
                    Ok(run) => listing.runs.push(run),
                    Err(e) => listing.unreadable.push((id, e.to_string())),
                }
            }
            Ok(listing)
        })
    }

    fn runs_with_status(&self, statuses: &[RunStatus]) -> Result<Vec<Run>, StoreError> {
        let names = status_strs(statuses, RunStatus::as_str);
        // Unfinished statuses are found through the index of active runs.
        let active = if statuses.iter().all(|s| !s.is_finished()) {
            "active = 1 AND "
        } else {
            ""
        };
        let sql = format!(
            "SELECT data FROM runs WHERE {active}status IN ({}) ORDER BY submitted_at",
            placeholders(names.len())
        );
        let args: Vec<&dyn rusqlite::ToSql> =
            names.iter().map(|s| s as &dyn rusqlite::ToSql).collect();
        self.query(&sql, &args)
    }

    fn active_runs_of_kind(&self, kind: &str) -> Result<Vec<Run>, StoreError> {
        self.query(
            "SELECT data FROM runs WHERE active = 1 AND kind = ? ORDER BY submitted_at",
            &[&kind],
        )
    }

    fn running_runs(&self) -> Result<Vec<Run>, StoreError> {
        self.query(RUNNING_RUNS, &[])
    }

    fn group_statuses(&self, group_id: &str) -> Result<Vec<(String, RunStatus)>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached("SELECT id, status FROM runs WHERE group_id = ?")?;
            let rows = stmt.query_map([group_id], |r| {
                let status: String = r.get(1)?;
                let status = RunStatus::parse(&status).ok_or_else(|| {
                    rusqlite::Error::FromSqlConversionFailure(
                        1,
                        rusqlite::types::Type::Text,
                        format!("unknown run status {status:?}").into(),
                    )
                })?;
                Ok((r.get(0)?, status))
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn run_names(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.with(|c| {
            // Names are ASCII: every name starting with `prefix` sorts below `prefix` + DEL.
            let sql = "SELECT name FROM runs WHERE name >= ?1 AND name < ?2 AND replaced = 0";
            let mut stmt = c.prepare_cached(sql)?;
            let upper = format!("{prefix}\u{7f}");
            let names = stmt
                .query_map(params![prefix, upper], |r| r.get(0))?
                .collect::<Result<Vec<String>, _>>()?;
            Ok(names)
        })
    }

    fn update_run(&self, run: &Run, expected: &[RunStatus]) -> Result<bool, StoreError> {
        self.with(|c| update_run(c, run, expected))
    }

    fn update_run_with_jobs(
        &self,
        run: &Run,
        expected: &[RunStatus],
        jobs: &[Job],
    ) -> Result<bool, StoreError> {
        self.with(|c| {
            in_transaction(c, true, |c| {
                if !update_run(c, run, expected)? {
                    return Ok(false);
                }
                for job in jobs {
                    insert_job(c, job)?;
                }
                Ok(true)
            })
        })
    }

    fn run_with_jobs(&self, run_id: &str) -> Result<Option<(Run, Vec<Job>)>, StoreError> {
        // One read transaction: the run and its jobs as of the same moment.
        let (run, jobs) =
            self.with(|c| in_transaction(c, false, |c| run_with_jobs_data(c, run_id)))?;
        let Some(run) = run else { return Ok(None) };
        let jobs = jobs
            .iter()
            .map(|(_, data)| from_json(data))
            .collect::<Result<_, _>>()?;
        Ok(Some((from_json(&run)?, jobs)))
    }

    fn submitted_runs_with_placed_jobs(&self) -> Result<Vec<String>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT DISTINCT r.id FROM runs r JOIN jobs j ON j.run_id = r.id \
                 WHERE r.active = 1 AND r.status = 'submitted' \
                   AND j.status IN ('provisioning', 'pulling', 'running')",
            )?;
            let ids = stmt.query_map([], |r| r.get(0))?;
            Ok(ids.collect::<Result<_, _>>()?)
        })
    }

    fn job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        Ok(self
            .query("SELECT data FROM jobs WHERE id = ?", &[&id])?
            .pop())
    }

    fn jobs_of_run(&self, run_id: &str) -> Result<Vec<Job>, StoreError> {
        self.query(
            "SELECT data FROM jobs WHERE run_id = ? ORDER BY job_num, submission_num",
            &[&run_id],
        )
    }

    fn jobs_with_status(&self, statuses: &[JobStatus]) -> Result<Vec<Job>, StoreError> {
        let names = status_strs(statuses, JobStatus::as_str);
        // Statuses that hold resources are found through the index of holding jobs, and the
        // waiting one through the waiting queue's index (SQLite uses a partial index only for
        // a query that states its condition); others take a scan of all jobs.
        let through = if statuses.iter().all(|s| JobStatus::HOLDING.contains(s)) {
            concat!(job_holding!(), " AND ")
        } else if statuses == [JobStatus::Submitted] {
            concat!(job_waiting!(), " AND ")
        } else {
            ""
        };
        let sql = format!(
            "SELECT data FROM jobs WHERE {through}status IN ({}) ORDER BY submitted_at",
            placeholders(names.len())
        );
        let args: Vec<&dyn rusqlite::ToSql> =
            names.iter().map(|s| s as &dyn rusqlite::ToSql).collect();
        self.query(&sql, &args)
    }

    fn waiting_jobs(&self, limit: usize) -> Result<Vec<WaitingJob>, StoreError> {
        self.with(|c| waiting_jobs(c, limit))
    }

    fn placing(&self, limit: usize) -> Result<Placing, StoreError> {
        // One read transaction: one consistent state, and the log's read lock taken once.
        self.with(|c| {
            in_transaction(c, false, |c| {
                Ok(Placing {
                    holdings: holdings(c, None)?,
                    waiting: waiting_jobs(c, limit)?,
                    instances: query(c, INSTANCES_SQL, &[])?,
                    fleets: query(c, FLEETS_SQL, &[])?,
                })
            })
        })
    }

    fn update_job(&self, job: &Job, expected: &[JobStatus]) -> Result<bool, StoreError> {
        self.with(|c| update_job(c, job, expected))
    }

    fn update_job_and_run(
        &self,
        job: &Job,
        expected: &[JobStatus],
        derive: DeriveFn<'_>,
    ) -> Result<JobAndRun, StoreError> {
        self.with(|c| {
            in_transaction(c, true, |c| {
                if !update_job(c, job, expected)? {
                    return Ok(JobAndRun::JobChanged);
                }
                Ok(JobAndRun::Written(derive_run(c, job, derive)?))
            })
        })
    }

    fn change_jobs_and_runs(
        &self,
        ids: &[&str],
        change: ChangeFn<'_>,
        derive: DeriveFn<'_>,
    ) -> Result<Vec<Changed>, StoreError> {
        self.with(|c| {
            in_transaction(c, true, |c| {
                let mut changed = Vec::new();
                for id in ids {
                    let stored: Option<String> = c
                        .prepare_cached("SELECT data FROM jobs WHERE id = ?")?
                        .query_row([id], |r| r.get(0))
                        .optional()?;
                    let Some(stored) = stored else { continue };
                    let stored: Job = from_json(&stored)?;
                    let Some(job) = change(&stored) else {
                        continue;
                    };
                    // The transaction holds the write lock: the job is as just read.
                    update_job(c, &job, &[stored.status])?;
                    let run = derive_run(c, &job, derive)?;
                    let passed_on = job.status.is_finished() && passed_on(c, &stored)?;
                    changed.push(Changed {
                        job,
                        from: stored.status,
                        run,
                        passed_on,
                    });
                }
                Ok(changed)
            })
        })
    }

    fn group_has_room(&self, run_id: &str) -> Result<bool, StoreError> {
        self.with(|c| group_has_room(c, run_id))
    }

    fn assign_jobs(&self, placements: &[Placement<'_>]) -> Result<Vec<Option<Job>>, StoreError> {
        self.with(|c| {
            in_transaction(c, true, |c| {
                placements.iter().map(|p| assign(c, p)).collect()
            })
        })
    }

    fn holdings(&self) -> Result<Vec<Holding>, StoreError> {
        self.with(|c| holdings(c, None))
    }

    fn put_fleet(&self, fleet: &Fleet) -> Result<(), StoreError> {
        self.upsert("fleets", "name", &fleet.id, &fleet.name, json(fleet)?)
    }

    fn fleets(&self) -> Result<Vec<Fleet>, StoreError> {
        self.query(FLEETS_SQL, &[])
    }

    fn put_instance(&self, instance: &Instance) -> Result<(), StoreError> {
        self.upsert(
            "instances",
            "fleet_id",
            &instance.id,
            &instance.fleet_id,
            json(instance)?,
        )
    }

    fn last_job_end(&self, instance_id: &str) -> Result<Option<u64>, StoreError> {
        self.with(|c| {
            let end: Option<i64> = c
                .prepare_cached(
                    "SELECT MAX(json_extract(data, '$.finished_at_ms')) FROM jobs \
                     WHERE instance_id = ?",
                )?
                .query_row([instance_id], |row| row.get(0))?;
            Ok(end.and_then(|ms| u64::try_from(ms).ok()))
        })
    }

    fn instance(&self, id: &str) -> Result<Option<Instance>, StoreError> {
        Ok(self
            .query("SELECT data FROM instances WHERE id = ?", &[&id])?
            .pop())
    }

    fn instances(&self) -> Result<Vec<Instance>, StoreError> {
        self.query(INSTANCES_SQL, &[])
    }

    fn put_volume(&self, volume: &Volume) -> Result<(), StoreError> {
        self.upsert("volumes", "name", &volume.id, &volume.name, json(volume)?)
    }

    fn volumes(&self) -> Result<Vec<Volume>, StoreError> {
        self.query("SELECT data FROM volumes ORDER BY name", &[])
    }

    fn events(&self, query: &EventQuery) -> Result<Vec<Event>, StoreError> {
        self.with(|c| super::events::list(c, query))
    }

    fn prune_events(&self, before_ms: u64, keep: u64) -> Result<usize, StoreError> {
        self.with(|c| in_transaction(c, true, |c| super::events::prune(c, before_ms, keep)))
    }
}

impl rusqlite::ToSql for RunStatus {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(self.as_str().into())
    }
}

impl rusqlite::types::FromSql for JobStatus {
    fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        let text = value.as_str()?;
        JobStatus::parse(text).ok_or_else(|| {
            rusqlite::types::FromSqlError::Other(format!("unknown job status {text:?}").into())
        })
    }
}

/// SQL: the first `limit` waiting jobs (id, run id, submitted at, priority) of no limited
/// group: the highest priority first, then the oldest.
fn ungrouped_waiting_sql(limit: i64) -> String {
    format!(
        "SELECT id, run_id, submitted_at, priority FROM jobs WHERE {JOB_WAITING} \
         AND group_id IS NULL ORDER BY priority DESC, submitted_at, id LIMIT {limit}"
    )
}

/// SQL: the waiting jobs (id, run id, submitted at, priority) of group `?`, the highest
/// priority first, then the oldest (read lazily:
/// the caller takes as many as the group has room for).
const GROUP_WAITING: &str = concat!(
    "SELECT id, run_id, submitted_at, priority FROM jobs WHERE ",
    job_waiting!(),
    " AND group_id = ? ORDER BY priority DESC, submitted_at, id"
);

/// SQL: each limited group with waiting jobs, and how many more of its runs may hold
/// resources (may be zero or less). The groups are found by skipping through the
/// `jobs_waiting` index one group at a time, so the cost grows with the number of groups, not
/// with their waiting jobs.
const GROUPS_WAITING_ROOM: &str = concat!(
    "WITH RECURSIVE waiting(g) AS (
        SELECT MIN(group_id) FROM jobs WHERE ",
    job_waiting!(),
    " AND group_id IS NOT NULL
        UNION ALL
        SELECT (SELECT MIN(group_id) FROM jobs WHERE ",
    job_waiting!(),
    " AND group_id > waiting.g) FROM waiting WHERE waiting.g IS NOT NULL
    )
    SELECT w.g, (SELECT group_max FROM runs WHERE group_id = w.g AND group_max IS NOT NULL LIMIT 1) - (",
    group_holding_sql!("w.g"),
    ") FROM waiting w WHERE w.g IS NOT NULL"
);

/// At most `limit` waiting jobs (see [`Store::waiting_jobs`]), the highest priority first,
/// then the oldest: the first of those of no limited group merged with, for each limited
/// group with room, its first as many as it has room for. Jobs of a group at its limit are left out: they cannot be placed now, and they
/// must not fill the window that other runs wait behind.
fn waiting_jobs(c: &Connection, limit: usize) -> Result<Vec<WaitingJob>, StoreError> {
    // The limit is written into the SQL: SQLite plans with a bound LIMIT's value, so a
    // statement with `LIMIT ?` is compiled again on every call.
    let sql_limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let row = |grouped: bool| {
        move |r: &rusqlite::Row<'_>| -> rusqlite::Result<((i64, i64), WaitingJob)> {
            Ok((
                (-r.get::<_, i64>(3)?, r.get(2)?),
                WaitingJob {
                    job_id: r.get(0)?,
                    run_id: r.get(1)?,
                    grouped,
                },
            ))
        }
    };
    let mut found = c
        .prepare_cached(&ungrouped_waiting_sql(sql_limit))?
        .query_map([], row(false))?
        .collect::<Result<Vec<_>, _>>()?;
    let groups = c
        .prepare_cached(GROUPS_WAITING_ROOM)?
        .query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Option<i64>>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut of_group = c.prepare_cached(GROUP_WAITING)?;
    for (group, room) in groups {
        let room = usize::try_from(room.unwrap_or(0)).unwrap_or(0).min(limit);
        for job in of_group.query_map([&group], row(true))?.take(room) {
            found.push(job?);
        }
    }
    found.sort_by(|(a, x), (b, y)| (a, &x.job_id).cmp(&(b, &y.job_id)));
    found.truncate(limit);
    Ok(found.into_iter().map(|(_, job)| job).collect())
}

fn update_run(c: &Connection, run: &Run, expected: &[RunStatus]) -> Result<bool, StoreError> {
    let names = status_strs(expected, RunStatus::as_str);
    let active = !run.status.is_finished();
    // `active` left out when it cannot change spares SQLite the indexes on it.
    let set = if active && expected.iter().all(|s| !s.is_finished()) {
        "status = ?1, data = ?3"
    } else {
        "status = ?1, active = ?2, data = ?3"
    };
    let sql = format!(
        "UPDATE runs SET {set} WHERE id = ?4 AND status IN ({})",
        placeholders(names.len())
    );
    let data = json(run)?;
    let mut args: Vec<&dyn rusqlite::ToSql> = vec![&run.status, &active, &data, &run.id];
    args.extend(names.iter().map(|s| s as &dyn rusqlite::ToSql));
    Ok(c.prepare_cached(&sql)?.execute(args.as_slice())? == 1)
}

/// Writes the run of job `written` (just written, in this write transaction) as `derive`
/// decides from it and its jobs as stored now; the run as written, if `derive` changed it.
fn derive_run(
    c: &Connection,
    written: &Job,
    derive: DeriveFn<'_>,
) -> Result<Option<Box<Run>>, StoreError> {
    let (Some(run), jobs) = run_with_jobs_data(c, &written.run_id)? else {
        return Ok(None);
    };
    let run: Run = from_json(&run)?;
    // The job just written is as given: only the others are decoded.
    let jobs: Vec<Job> = jobs
        .iter()
        .map(|(id, data)| {
            if *id == written.id {
                Ok(written.clone())
            } else {
                from_json(data)
            }
        })
        .collect::<Result<_, _>>()?;
    let Some(next) = derive(&run, &jobs) else {
        return Ok(None);
    };
    update_run(c, &next, &[run.status])?;
    Ok(Some(Box::new(next)))
}

/// Whether the job queued behind `leader` holds the same reservation as `leader` did.
fn passed_on(c: &Connection, leader: &Job) -> Result<bool, StoreError> {
    let (Some(instance), Some(held)) = (&leader.instance_id, &leader.reservation) else {
        return Ok(false);
    };
    let sql = format!(
        "SELECT reservation FROM jobs WHERE instance_id = ? AND {JOB_HOLDING} AND after_job = ?"
    );
    let follower: Option<Option<String>> = c
        .prepare_cached(&sql)?
        .query_row([instance, &leader.id], |r| r.get(0))
        .optional()?;
    match follower.flatten() {
        Some(reservation) => Ok(from_json::<Reservation>(&reservation)? == *held),
        None => Ok(false),
    }
}

/// The JSON of a run (if stored) and the ids and JSON of its jobs.
type RunAndJobsData = (Option<String>, Vec<(String, String)>);

/// The JSON of run `run_id` and the ids and JSON of its jobs (by job number, then submission
/// number).
fn run_with_jobs_data(c: &Connection, run_id: &str) -> Result<RunAndJobsData, StoreError> {
    let run = c
        .prepare_cached("SELECT data FROM runs WHERE id = ?")?
        .query_row([run_id], |r| r.get(0))
        .optional()?;
    let jobs = c
        .prepare_cached(
            "SELECT id, data FROM jobs WHERE run_id = ? ORDER BY job_num, submission_num",
        )?
        .query_map([run_id], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    Ok((run, jobs))
}

fn insert_run(c: &Connection, run: &Run, jobs: &[Job]) -> Result<(), StoreError> {
    let active: Option<String> = c
        .prepare_cached("SELECT id FROM runs WHERE name = ? AND active = 1")?
        .query_row([&run.name], |r| r.get(0))
        .optional()?;
    if active.is_some() {
        return Err(StoreError::NameTaken(run.name.clone()));
    }
    c.prepare_cached("UPDATE runs SET replaced = 1 WHERE name = ?")?
        .execute([&run.name])?;
    c.prepare_cached(
        "INSERT INTO runs (id, name, status, active, submitted_at, data, group_id, group_max, kind, priority) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, json_extract(?6, '$.spec.configuration.type'), \
                 COALESCE(json_extract(?6, '$.spec.configuration.priority'), 0))",
    )?
    .execute(params![
        run.id,
        run.name,
        run.status.as_str(),
        !run.status.is_finished(),
        run.submitted_at_ms as i64,
        json(run)?,
        run.spec.group.as_ref().map(|g| &g.id),
        run.spec.group.as_ref().and_then(|g| g.max_parallel),
    ])?;
    for job in jobs {
        insert_job(c, job)?;
    }
    Ok(())
}

fn insert_job(c: &Connection, job: &Job) -> Result<(), StoreError> {
    c.prepare_cached(
        "INSERT INTO jobs (id, run_id, job_num, submission_num, status, instance_id, submitted_at, data, reservation, after_job, group_id, priority, replica_num)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?,
                 (SELECT group_id FROM runs WHERE id = ?2 AND group_max IS NOT NULL),
                 COALESCE((SELECT priority FROM runs WHERE id = ?2), 0), ?11)",
    )?
    .execute(params![
        job.id,
        job.run_id,
        job.job_num,
        job.submission_num,
        job.status.as_str(),
        job.instance_id,
        job.submitted_at_ms as i64,
        json(job)?,
        job.reservation.as_ref().map(json).transpose()?,
        job.after_job,
        job.replica_num,
    ])?;
    Ok(())
}

fn update_job(c: &Connection, job: &Job, expected: &[JobStatus]) -> Result<bool, StoreError> {
    let names = status_strs(expected, JobStatus::as_str);
    let sql = format!(
        "UPDATE jobs SET status = ?, instance_id = ?, data = ?, reservation = ?, after_job = ? \
         WHERE id = ? AND status IN ({})",
        placeholders(names.len())
    );
    let data = json(job)?;
    let reservation = job.reservation.as_ref().map(json).transpose()?;
    let status = job.status.as_str();
    let mut args: Vec<&dyn rusqlite::ToSql> = vec![
        &status,
        &job.instance_id,
        &data,
        &reservation,
        &job.after_job,
        &job.id,
    ];
    args.extend(names.iter().map(|s| s as &dyn rusqlite::ToSql));
    Ok(c.prepare_cached(&sql)?.execute(args.as_slice())? == 1)
}

/// Places one job inside a write transaction (see [`Store::assign_job`]).
fn assign(c: &Connection, placement: &Placement<'_>) -> Result<Option<Job>, StoreError> {
    let Placement {
        job_id,
        instance_id,
        after,
        fit,
    } = *placement;
    let job: Option<String> = c
        .prepare_cached("SELECT data FROM jobs WHERE id = ? AND status = 'submitted'")?
        .query_row([job_id], |r| r.get(0))
        .optional()?;
    let Some(job) = job else { return Ok(None) };
    let mut job: Job = from_json(&job)?;
    let run: Option<(String, bool)> = c
        .prepare_cached(RUN_STATUS_AND_GROUP_ROOM)?
        .query_row([&job.run_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((run_status, group_has_room)) = run else {
        return Ok(None);
    };
    let ending = ["terminating", "terminated", "failed", "done"];
    if ending.contains(&run_status.as_str()) {
        return Ok(None); // the run is ending: its termination finishes this job
    }
    if !group_has_room {
        return Ok(None);
    }
    // An instance being terminated (idle reaping, a fleet delete) since the placement was
    // decided takes no job.
    let instance_status: Option<Option<String>> = c
        .prepare_cached("SELECT json_extract(data, '$.status') FROM instances WHERE id = ?")?
        .query_row([instance_id], |r| r.get(0))
        .optional()?;
    if matches!(
        instance_status.flatten().as_deref(),
        Some("terminating" | "terminated")
    ) {
        return Ok(None);
    }
    let holdings = holdings(c, Some(instance_id))?;
    if let Some(leader) = after {
        // Running, or queued behind a job that holds resources (not being
        // stopped); followed by none.
        let followable = holdings.iter().any(|h| {
            h.job_id == leader
                && (h.status == JobStatus::Running
                    || (h.status == JobStatus::Provisioning && !h.counts(&holdings)))
        }) && !holdings
            .iter()
            .any(|h| h.after_job.as_deref() == Some(leader));
        if !followable {
            return Ok(None);
        }
    }
    // Behind a job, the job sees what the instance holds besides that job's queue.
    let queue = after
        .and_then(|id| holdings.iter().find(|h| h.job_id == id))
        .map(|h| h.queue(&holdings))
        .unwrap_or_default();
    let held: Vec<Reservation> = holdings
        .iter()
        .filter(|h| h.counts(&holdings) && !queue.contains(&h.job_id.as_str()))
        .map(|h| h.reservation.clone())
        .collect();
    let Some(reservation) = fit(&held) else {
        return Ok(None);
    };
    job.status = JobStatus::Provisioning;
    job.instance_id = Some(instance_id.to_string());
    job.reservation = Some(reservation);
    job.after_job = after.map(str::to_string);
    update_job(c, &job, &[JobStatus::Submitted])?;
    Ok(Some(job))
}

/// The jobs holding resources (on `instance_id` only, if given).
fn holdings(c: &Connection, instance_id: Option<&str>) -> Result<Vec<Holding>, StoreError> {
    let on = if instance_id.is_some() {
        "instance_id = ?"
    } else {
        "instance_id IS NOT NULL"
    };
    let sql = format!(
        "SELECT instance_id, id, run_id, status, after_job, reservation, \
         CASE WHEN reservation IS NULL THEN data END \
         FROM jobs WHERE {on} AND {JOB_HOLDING}"
    );
    let args: Vec<&dyn rusqlite::ToSql> = instance_id
        .iter()
        .map(|id| id as &dyn rusqlite::ToSql)
        .collect();
    let mut stmt = c.prepare_cached(&sql)?;
    let rows = stmt.query_map(args.as_slice(), |r| {
        Ok((
            Holding {
                instance_id: r.get(0)?,
                job_id: r.get(1)?,
                run_id: r.get(2)?,
                status: r.get(3)?,
                after_job: r.get(4)?,
                reservation: Reservation::default(),
            },
            r.get::<_, Option<String>>(5)?,
            r.get::<_, Option<String>>(6)?,
        ))
    })?;
    let mut held = Vec::new();
    for row in rows {
        let (holding, reservation, data) = row?;
        let reservation = match reservation {
            Some(r) => from_json(&r)?,
            // Written before the column existed.
            None => {
                let job: Job = from_json(data.as_deref().unwrap_or("null"))?;
                match job.reservation {
                    Some(r) => r,
                    None => continue,
                }
            }
        };
        held.push(Holding {
            reservation,
            ..holding
        });
    }
    Ok(held)
}

fn group_has_room(c: &Connection, run_id: &str) -> Result<bool, StoreError> {
    let room: Option<bool> = c
        .prepare_cached(GROUP_HAS_ROOM)?
        .query_row([run_id], |r| r.get(0))
        .optional()?;
    Ok(room.unwrap_or(false))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::{RawJson, Reservation, RunSpec};

    #[test]
    fn connections_opening_a_new_state_file_at_once_all_succeed() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("state.db");
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(6));
            let openers: Vec<_> = (0..6)
                .map(|_| {
                    let (path, barrier) = (path.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        SqliteStore::open(&path).map(drop)
                    })
                })
                .collect();
            for opener in openers {
                if let Err(e) = opener.join().unwrap() {
                    panic!("{e}");
                }
            }
        }
    }

    /// `(job id, run id)` of the waiting jobs.
    fn waiting(store: &SqliteStore) -> Vec<(String, String)> {
        let waiting = store.waiting_jobs(10).unwrap();
        waiting.into_iter().map(|w| (w.job_id, w.run_id)).collect()
    }

    fn run(name: &str, status: RunStatus) -> Run {
        Run {
            id: uuid::Uuid::new_v4().to_string(),
            name: name.to_string(),
            status,
            termination_reason: None,
            status_message: None,
            spec: RunSpec {
                configuration: RawJson::from_value(
                    &serde_json::json!({"type": "task", "commands": ["x"]}),
                ),
                configuration_path: None,
                client_dir: "/".to_string(),
                client_env: Default::default(),
                group: None,
                archives: Vec::new(),
                artifacts: Default::default(),
            },
            submitted_at_ms: crate::model::now_ms(),
            resubmission_attempt: 0,
            next_attempt_at_ms: None,
            next_triggered_at_ms: None,
            deployment_num: 0,
        }
    }

    fn job(run: &Run) -> Job {
        Job::submission(run, 0, 0)
    }

    /// The waiting queue gives the jobs of the highest `priority` first, then the oldest,
    /// and a later submission of a job (a retry) keeps its run's priority.
    #[test]
    fn waiting_jobs_come_highest_priority_first() {
        let store = SqliteStore::in_memory().unwrap();
        let of_priority = |name: &str, priority: Option<i64>| {
            let mut r = run(name, RunStatus::Submitted);
            let mut configuration = serde_json::json!({"type": "task", "commands": ["x"]});
            if let Some(p) = priority {
                configuration["priority"] = p.into();
            }
            r.spec.configuration = RawJson::from_value(&configuration);
            r
        };
        let runs = [
            of_priority("plain", None),
            of_priority("low", Some(10)),
            of_priority("urgent", Some(100)),
            of_priority("also-plain", Some(0)),
            of_priority("low-later", Some(10)),
        ];
        let mut ids = BTreeMap::new();
        for r in &runs {
            let j = job(r);
            ids.insert(j.id.clone(), r.name.clone());
            store.insert_run(r, &[j]).unwrap();
        }
        let names = |store: &SqliteStore, ids: &BTreeMap<String, String>| -> Vec<String> {
            waiting(store)
                .into_iter()
                .map(|(j, _)| ids[&j].clone())
                .collect()
        };
        assert_eq!(
            names(&store, &ids),
            ["urgent", "low", "low-later", "plain", "also-plain"]
        );
        // A retry of the urgent run (a new submission) is still first.
        let urgent = &runs[2];
        let first = ids.iter().find(|(_, n)| *n == "urgent").unwrap().0.clone();
        let mut ended = store.job(&first).unwrap().unwrap();
        ended.status = JobStatus::Failed;
        assert!(store.update_job(&ended, &[JobStatus::Submitted]).unwrap());
        let retry = Job::submission(urgent, 0, 1);
        ids.insert(retry.id.clone(), "urgent retry".to_string());
        assert!(store
            .update_run_with_jobs(urgent, &[RunStatus::Submitted], &[retry])
            .unwrap());
        assert_eq!(names(&store, &ids)[0], "urgent retry");
    }

    #[test]
    fn the_last_job_end_on_an_instance_counts_every_job_placed_there() {
        let store = SqliteStore::in_memory().unwrap();
        assert_eq!(store.last_job_end("i-1").unwrap(), None);
        let r = run("idle-clock", RunStatus::Running);
        let mut first = job(&r);
        let mut second = Job::submission(&r, 0, 1);
        let mut elsewhere = Job::submission(&r, 1, 0);
        store
            .insert_run(&r, &[first.clone(), second.clone(), elsewhere.clone()])
            .unwrap();
        for (job, instance, end) in [
            (&mut first, "i-1", Some(1_000)),
            (&mut second, "i-1", Some(5_000)),
            (&mut elsewhere, "i-2", Some(9_000)),
        ] {
            job.instance_id = Some(instance.to_string());
            job.status = JobStatus::Done;
            job.finished_at_ms = end;
            assert!(store.update_job(job, &[JobStatus::Submitted]).unwrap());
        }
        assert_eq!(store.last_job_end("i-1").unwrap(), Some(5_000));
        assert_eq!(store.last_job_end("i-2").unwrap(), Some(9_000));
    }

    #[test]
    fn migrations_are_idempotent_and_versioned() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("home/state.db");
        let first = SqliteStore::open(&path).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        first
            .insert_run(&run("a-run", RunStatus::Submitted), &[])
            .unwrap();
        drop(first);
        let again = SqliteStore::open(&path).unwrap();
        assert_eq!(again.run_by_name("a-run").unwrap().unwrap().name, "a-run");
        let version: i64 = again
            .with(|c| Ok(c.pragma_query_value(None, "user_version", |r| r.get(0))?))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        again
            .with(|c| Ok(c.pragma_update(None, "user_version", 999)?))
            .unwrap();
        drop(again);
        assert!(matches!(
            SqliteStore::open(&path),
            Err(StoreError::TooNew { found: 999, .. })
        ));
    }

    #[test]
    fn a_state_keeps_its_identity_when_moved_and_a_copy_gets_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("home/state.db");
        let first = SqliteStore::open(&path).unwrap().state_id().to_string();
        assert_eq!(SqliteStore::open(&path).unwrap().state_id(), first);
        let moved = dir.path().join("moved");
        std::fs::rename(dir.path().join("home"), &moved).unwrap();
        let path = moved.join("state.db");
        assert_eq!(
            SqliteStore::open(&path).unwrap().state_id(),
            first,
            "moved: the same file"
        );
        let copy = dir.path().join("copy");
        std::fs::create_dir(&copy).unwrap();
        for entry in std::fs::read_dir(&moved).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
        }
        let copied = SqliteStore::open(&copy.join("state.db"))
            .unwrap()
            .state_id()
            .to_string();
        assert_ne!(copied, first, "a copy is another state");
        assert_eq!(
            SqliteStore::open(&copy.join("state.db"))
                .unwrap()
                .state_id(),
            copied
        );
        assert_eq!(SqliteStore::open(&path).unwrap().state_id(), first);
        assert_ne!(
            SqliteStore::in_memory().unwrap().state_id(),
            SqliteStore::in_memory().unwrap().state_id()
        );
    }

    #[test]
    fn active_names_are_unique_and_finished_runs_are_replaced() {
        let store = SqliteStore::in_memory().unwrap();
        let mut first = run("train", RunStatus::Running);
        store.insert_run(&first, &[]).unwrap();
        assert!(matches!(
            store.insert_run(&run("train", RunStatus::Submitted), &[]),
            Err(StoreError::NameTaken(_))
        ));
        first.status = RunStatus::Done;
        assert!(store.update_run(&first, &[RunStatus::Running]).unwrap());
        let second = run("train", RunStatus::Submitted);
        store.insert_run(&second, &[]).unwrap();
        assert_eq!(store.run_by_name("train").unwrap().unwrap().id, second.id);
        assert_eq!(
            store.runs(RunFilter::default()).unwrap().runs.len(),
            1,
            "the replaced run is hidden"
        );
        assert_eq!(store.run_names("tra").unwrap(), vec!["train".to_string()]);
        assert!(store.run_names("trb").unwrap().is_empty());
    }

    #[test]
    fn transitions_are_compare_and_set() {
        let store = SqliteStore::in_memory().unwrap();
        let mut r = run("cas", RunStatus::Submitted);
        let j = job(&r);
        store.insert_run(&r, std::slice::from_ref(&j)).unwrap();
        r.status = RunStatus::Running;
        assert!(store.update_run(&r, &[RunStatus::Submitted]).unwrap());
        assert!(
            !store.update_run(&r, &[RunStatus::Submitted]).unwrap(),
            "the second writer loses"
        );
        let mut done = j.clone();
        done.status = JobStatus::Done;
        assert!(!store.update_job(&done, &[JobStatus::Running]).unwrap());
        assert!(store.update_job(&done, &[JobStatus::Submitted]).unwrap());
        assert_eq!(store.job(&j.id).unwrap().unwrap().status, JobStatus::Done);
    }

    /// `(target type, target name, within name, message)` of events, oldest first.
    fn events_of(store: &SqliteStore, query: EventQuery) -> Vec<(String, String, String, String)> {
        let query = EventQuery {
            ascending: true,
            ..query
        };
        let events = store.events(&query).unwrap();
        events
            .into_iter()
            .map(|e| {
                let message = e.message();
                (
                    e.target.kind.to_string(),
                    e.target.name,
                    e.within.name,
                    message,
                )
            })
            .collect()
    }

    /// Every write that creates a record or changes its status records an event in its
    /// transaction; other writes record none.
    #[test]
    fn status_changes_are_recorded_as_events() {
        use crate::events::{RecordRef, TargetType};
        let store = SqliteStore::in_memory().unwrap();
        let mut r = run("hist", RunStatus::Submitted);
        let mut j = job(&r);
        store.insert_run(&r, std::slice::from_ref(&j)).unwrap();
        j.status = JobStatus::Running;
        assert!(store.update_job(&j, &[JobStatus::Submitted]).unwrap());
        assert!(
            store.update_job(&j, &[JobStatus::Running]).unwrap(),
            "same status"
        );
        r.status = RunStatus::Running;
        assert!(store.update_run(&r, &[RunStatus::Submitted]).unwrap());
        assert!(
            !store.update_run(&r, &[RunStatus::Submitted]).unwrap(),
            "lost: no event"
        );
        j.status = JobStatus::Terminating;
        j.termination_reason = Some("terminated_by_user".into());
        assert!(store.update_job(&j, &[JobStatus::Running]).unwrap());
        r.status = RunStatus::Terminated;
        r.termination_reason = Some("stopped_by_user".into());
        assert!(store.update_run(&r, &[RunStatus::Running]).unwrap());
        let fleet = Fleet {
            id: "f-1".into(),
            name: "hosts".into(),
            status: crate::model::FleetStatus::Active,
            configuration: None,
            created_at_ms: 0,
            status_message: None,
            consolidation: None,
        };
        store.put_fleet(&fleet).unwrap();
        let instance = |status: &str| -> Instance {
            serde_json::from_value(serde_json::json!({
                "id": "i-1", "name": "hosts-0", "fleet_id": "f-1", "backend": "ssh",
                "status": status, "price": 0.0, "backend_data": null, "created_at_ms": 0,
                "host": {"cpus": 2, "memory_bytes": 1, "disk_bytes": 1, "cpu_arch": "x86", "gpus": []},
            }))
            .unwrap()
        };
        store.put_instance(&instance("idle")).unwrap();
        store.put_instance(&instance("idle")).unwrap();
        store.put_instance(&instance("busy")).unwrap();

        let run_name = |s: &str| s.to_string();
        let within_run = events_of(
            &store,
            EventQuery {
                within: vec![RecordRef {
                    kind: TargetType::Run,
                    id: r.id.clone(),
                }],
                ..EventQuery::default()
            },
        );
        let expected = [
            ("run", "hist", "Run submitted. Status: SUBMITTED"),
            (
                "job",
                "hist-0-0",
                "Job created on run submission. Status: SUBMITTED",
            ),
            ("job", "hist-0-0", "Job status changed SUBMITTED -> RUNNING"),
            ("run", "hist", "Run status changed SUBMITTED -> RUNNING"),
            (
                "job",
                "hist-0-0",
                "Job status changed RUNNING -> TERMINATING. Termination reason: TERMINATED_BY_USER",
            ),
            (
                "run",
                "hist",
                "Run status changed RUNNING -> TERMINATED. Termination reason: STOPPED_BY_USER",
            ),
        ]
        .map(|(t, n, m)| {
            (
                t.to_string(),
                n.to_string(),
                run_name("hist"),
                m.to_string(),
            )
        });
        assert_eq!(within_run, expected);

        let within_fleet = events_of(
            &store,
            EventQuery {
                within: vec![RecordRef {
                    kind: TargetType::Fleet,
                    id: "f-1".into(),
                }],
                ..EventQuery::default()
            },
        );
        let messages: Vec<_> = within_fleet.iter().map(|e| e.3.as_str()).collect();
        assert_eq!(
            messages,
            [
                "Fleet created. Status: ACTIVE",
                "Instance created. Status: IDLE",
                "Instance status changed IDLE -> BUSY",
            ]
        );
        assert!(within_fleet.iter().all(|e| e.2 == "hosts"));

        let jobs_only = events_of(
            &store,
            EventQuery {
                types: vec![TargetType::Job],
                ..EventQuery::default()
            },
        );
        assert_eq!(jobs_only.len(), 3);
        let targeted = events_of(
            &store,
            EventQuery {
                targets: vec![r.id.clone()],
                ..EventQuery::default()
            },
        );
        assert_eq!(targeted.len(), 3, "the run's own events, not its job's");

        // Newest first by default, in pages.
        let page = store
            .events(&EventQuery {
                limit: 2,
                ..EventQuery::default()
            })
            .unwrap();
        assert_eq!(page[0].message(), "Instance status changed IDLE -> BUSY");
        let next = EventQuery {
            limit: 2,
            ..EventQuery::default()
        }
        .next_page(&page)
        .unwrap();
        let older = store.events(&next).unwrap();
        assert!(older[0].id < page[1].id);

        // `since` keeps what was recorded from then on.
        let all = store.events(&EventQuery::default()).unwrap();
        let future = EventQuery {
            since_ms: Some(all[0].recorded_at_ms + 60_000),
            ..EventQuery::default()
        };
        assert!(store.events(&future).unwrap().is_empty());
    }

    #[test]
    fn events_are_pruned_by_age_and_by_count() {
        let store = SqliteStore::in_memory().unwrap();
        for i in 0..5 {
            let r = run(&format!("p{i}"), RunStatus::Submitted);
            store.insert_run(&r, &[job(&r)]).unwrap();
        }
        let count = |s: &SqliteStore| {
            s.events(&EventQuery {
                limit: 1000,
                ..Default::default()
            })
            .unwrap()
            .len()
        };
        assert_eq!(count(&store), 10);
        assert_eq!(store.prune_events(0, 1000).unwrap(), 0, "nothing is old");
        assert_eq!(
            store.prune_events(0, 4).unwrap(),
            6,
            "only the newest four kept"
        );
        let newest = store.events(&EventQuery::default()).unwrap();
        assert_eq!(newest.len(), 4);
        assert_eq!(newest[0].target.name, "p4-0-0");
        let later = crate::model::now_ms() + 1_000;
        assert_eq!(
            store.prune_events(later, 1000).unwrap(),
            3,
            "all older than `later` but the newest"
        );
        assert_eq!(count(&store), 1);
        let r = run("after", RunStatus::Submitted);
        store.insert_run(&r, &[]).unwrap();
        let after = store.events(&EventQuery::default()).unwrap();
        assert!(after[0].id > newest[0].id, "numbered after those pruned");
    }

    #[test]
    fn hot_queries_use_the_indexes_of_unfinished_records() {
        // The SQL conditions name exactly the statuses of the model.
        let quoted = |statuses: &[JobStatus]| {
            let tests: Vec<String> = statuses
                .iter()
                .map(|s| format!("status = '{}'", s.as_str()))
                .collect();
            format!("({})", tests.join(" OR "))
        };
        assert_eq!(JOB_HOLDING, quoted(JobStatus::HOLDING));
        assert_eq!(
            JOB_WAITING,
            format!("status = '{}'", JobStatus::Submitted.as_str())
        );
        let store = SqliteStore::in_memory().unwrap();
        let plan = |sql: &str| -> String {
            store
                .with(|c| {
                    let mut stmt = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
                    let rows = stmt.query_map([], |r| r.get::<_, String>(3))?;
                    Ok(rows.collect::<Result<Vec<_>, _>>()?.join("; "))
                })
                .unwrap()
        };
        for sql in [ungrouped_waiting_sql(64), GROUP_WAITING.replace('?', "'g'")] {
            let queue = plan(&sql);
            assert!(queue.contains("COVERING INDEX jobs_waiting"), "{queue}");
            assert!(!queue.contains("TEMP B-TREE"), "sorted again: {queue}");
        }
        let groups = plan(GROUPS_WAITING_ROOM);
        assert!(!groups.contains("SCAN jobs"), "every job read: {groups}");
        assert!(!groups.contains("SCAN runs"), "every run read: {groups}");
        assert!(groups.contains("INDEX jobs_holding"), "{groups}");
        let room = plan(&GROUP_HAS_ROOM.replace('?', "'r'"));
        assert!(room.contains("INDEX jobs_holding"), "{room}");
        let provisioning =
            format!("SELECT data FROM jobs WHERE {JOB_HOLDING} AND status IN ('provisioning')");
        assert!(plan(&provisioning).contains("INDEX jobs_holding"));
        let holding =
            format!("SELECT reservation FROM jobs WHERE instance_id = 'i' AND {JOB_HOLDING}");
        assert!(plan(&holding).contains("INDEX jobs_holding"));
        let of_run = plan(
            "SELECT id, data FROM jobs WHERE run_id = 'r' \
                           ORDER BY job_num, submission_num",
        );
        assert!(of_run.contains("INDEX jobs_run"), "{of_run}");
        assert!(!of_run.contains("TEMP B-TREE"), "sorted again: {of_run}");
        let pending = "SELECT data FROM runs WHERE active = 1 AND status IN ('pending') \
                       ORDER BY submitted_at";
        assert!(plan(pending).contains("INDEX runs_active"));
        assert!(!plan(pending).contains("TEMP B-TREE"), "sorted again");
        // Events within a run or a fleet: one range of the scope index each.
        let within = crate::events::EventQuery {
            within: ["run", "fleet"]
                .map(|kind| crate::events::RecordRef {
                    kind: crate::events::TargetType::parse(kind).unwrap(),
                    id: "x".into(),
                })
                .to_vec(),
            ..Default::default()
        };
        let (sql, args) = super::super::events::select(&within);
        let within = store
            .with(|c| {
                let mut stmt = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
                let rows =
                    stmt.query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(3))?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?.join("; "))
            })
            .unwrap();
        assert!(within.contains("INDEX events_scope"), "{within}");
        assert!(
            !within.contains("SCAN events"),
            "every event read: {within}"
        );
    }

    #[test]
    fn writing_a_job_or_a_run_builds_no_temporary_table() {
        // Every write evaluates the conditions of the partial indexes of the row before and
        // after: an `IN` list there would build a temporary b-tree twice per write.
        let store = SqliteStore::in_memory().unwrap();
        let opcodes = |sql: &str| -> Vec<String> {
            store
                .with(|c| {
                    // Parameters left unbound (NULL): the program is the same.
                    let mut stmt = c.prepare(&format!("EXPLAIN {sql}"))?;
                    let mut rows = stmt.raw_query();
                    let mut ops = Vec::new();
                    while let Some(row) = rows.next()? {
                        ops.push(row.get::<_, String>(1)?);
                    }
                    Ok(ops)
                })
                .unwrap()
        };
        for sql in [
            "UPDATE jobs SET status = ?, instance_id = ?, data = ? WHERE id = ? AND status = ?",
            "INSERT INTO jobs (id, run_id, job_num, submission_num, status, submitted_at, data) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
            "UPDATE runs SET status = ?, active = ?, data = ? WHERE id = ?",
            "DELETE FROM jobs WHERE id = ?",
        ] {
            let ops = opcodes(sql);
            let writes_an_index = |op: &String| op == "IdxInsert" || op == "IdxDelete";
            assert!(ops.iter().any(writes_an_index), "{sql}: {ops:?}");
            assert!(
                !ops.iter().any(|op| op == "OpenEphemeral"),
                "{sql}: {ops:?}"
            );
        }
    }

    #[test]
    fn jobs_applied_together_wait_in_the_order_they_were_applied() {
        let store = SqliteStore::in_memory().unwrap();
        let runs: Vec<Run> = (0..20)
            .map(|i| run(&format!("trial-{i}"), RunStatus::Submitted))
            .collect();
        let jobs: Vec<Vec<Job>> = runs.iter().map(|r| vec![job(r)]).collect();
        let batch: Vec<(&Run, &[Job])> = runs.iter().zip(&jobs).map(|(r, j)| (r, &j[..])).collect();
        store.insert_runs(&batch).unwrap();
        let order: Vec<String> = waiting(&store).into_iter().map(|(_, run)| run).collect();
        let applied: Vec<String> = runs.iter().take(10).map(|r| r.id.clone()).collect();
        assert_eq!(order, applied);
    }

    #[test]
    fn the_waiting_queue_query_stays_compiled() {
        let store = SqliteStore::in_memory().unwrap();
        let r = run("queued", RunStatus::Submitted);
        store.insert_run(&r, &[job(&r)]).unwrap();
        for _ in 0..3 {
            assert_eq!(store.waiting_jobs(64).unwrap().len(), 1);
        }
        // Every statement the store ran is cached: none was compiled again by SQLite (as a
        // bound LIMIT makes it do on every call).
        let reprepared = store
            .with(|c| {
                let stmt = c.prepare_cached(&ungrouped_waiting_sql(64))?;
                use rusqlite::StatementStatus::{RePrepare, Run};
                Ok((stmt.get_status(Run), stmt.get_status(RePrepare)))
            })
            .unwrap();
        assert_eq!(
            reprepared,
            (3, 0),
            "(runs, recompilations) of the store's statement"
        );
    }

    #[test]
    fn a_job_and_its_run_are_written_together_or_not_at_all() {
        let store = SqliteStore::in_memory().unwrap();
        let r = run("together", RunStatus::Submitted);
        let j = job(&r);
        store.insert_run(&r, std::slice::from_ref(&j)).unwrap();
        let mut running = j.clone();
        running.status = JobStatus::Running;
        // The derive function sees the job as just written, and its run is written with it.
        let mut seen = Vec::new();
        let mut derive = |run: &Run, jobs: &[Job]| {
            seen.extend(jobs.iter().map(|j| j.status));
            let mut next = run.clone();
            next.status = RunStatus::Running;
            Some(next)
        };
        let written = store
            .update_job_and_run(&running, &[JobStatus::Submitted], &mut derive)
            .unwrap();
        assert!(
            matches!(&written, JobAndRun::Written(Some(run)) if run.status == RunStatus::Running)
        );
        assert_eq!(seen, vec![JobStatus::Running]);
        assert_eq!(
            store.run(&r.id).unwrap().unwrap().status,
            RunStatus::Running
        );
        // A job that changed meanwhile: neither the job nor the run is written, and the
        // derive function is not asked.
        let mut done = j.clone();
        done.status = JobStatus::Done;
        let mut asked = false;
        let mut derive = |_: &Run, _: &[Job]| {
            asked = true;
            None
        };
        let written = store
            .update_job_and_run(&done, &[JobStatus::Provisioning], &mut derive)
            .unwrap();
        assert_eq!(written, JobAndRun::JobChanged);
        assert!(!asked);
        assert_eq!(
            store.job(&j.id).unwrap().unwrap().status,
            JobStatus::Running
        );
    }

    /// A state file in a new directory, open, after `runs` runs of two jobs were inserted into
    /// it one transaction each (as an engine under load writes them). (Closing it would
    /// checkpoint the whole log.)
    fn state_file_with(runs: usize) -> (tempfile::TempDir, std::path::PathBuf, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let store = SqliteStore::open(&path).unwrap();
        for i in 0..runs {
            let r = run(&format!("logged-{i}"), RunStatus::Submitted);
            store.insert_run(&r, &[job(&r), job(&r)]).unwrap();
        }
        (dir, path, store)
    }

    #[test]
    fn the_log_is_checkpointed_into_the_database_file() {
        // Enough row changes to wake the checkpointer twice.
        let (dir, path, _store) = state_file_with(200);
        // The database file alone (a copy, without the log) holds them once checkpointed.
        let copy = dir.path().join("copy.db");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            std::fs::copy(&path, &copy).unwrap();
            let runs: i64 = Connection::open(&copy)
                .and_then(|c| c.query_row("SELECT COUNT(*) FROM runs", [], |r| r.get(0)))
                .unwrap_or(0);
            if runs >= 100 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "not checkpointed: {runs} runs in the database file"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[test]
    fn the_log_starts_over_under_steady_writes() {
        // Pages for the log many times over the size at which it should start over.
        let (dir, _, _store) = state_file_with(2000);
        // The file keeps the largest size the log ever had; without starting over it would
        // be over 100 MB by now. (Bounded loosely: the checkpoint thread may be kept off the
        // processors for a while when the machine is busy.)
        let log = std::fs::metadata(dir.path().join("state.db-wal"))
            .unwrap()
            .len();
        let bound = 8 * 4096 * super::super::checkpoint::RESTART_PAGES as u64;
        assert!(log < bound, "the log grew to {log} bytes");
    }

    #[test]
    fn a_reader_holding_the_log_never_holds_up_writes_for_long() {
        let (_dir, path, store) = state_file_with(10);
        // Another process's reader in the middle of a long read transaction.
        let reader = Connection::open(&path).unwrap();
        reader
            .execute_batch("BEGIN; SELECT COUNT(*) FROM runs;")
            .unwrap();
        let mut slowest = std::time::Duration::ZERO;
        for i in 0..1500 {
            let r = run(&format!("while-reading-{i}"), RunStatus::Submitted);
            let t = std::time::Instant::now();
            store.insert_run(&r, &[job(&r), job(&r)]).unwrap();
            slowest = slowest.max(t.elapsed());
        }
        // Busy for as long as the reader reads, a checkpoint waiting for it would make the
        // writes wait behind it (SQLite's checkpoints hold the writer's lock meanwhile).
        assert!(
            slowest < std::time::Duration::from_secs(2),
            "a write waited {slowest:?}"
        );
        reader.execute_batch("COMMIT").unwrap();
    }

    /// A store holding one submitted run named `name` with three jobs.
    fn run_of_three_jobs(name: &str) -> (SqliteStore, Run, Vec<Job>) {
        let store = SqliteStore::in_memory().unwrap();
        let r = run(name, RunStatus::Submitted);
        let jobs: Vec<Job> = (0..3).map(|_| job(&r)).collect();
        store.insert_run(&r, &jobs).unwrap();
        (store, r, jobs)
    }

    /// Placement of a job that takes one CPU on an instance of `cpus` CPUs.
    fn one_cpu_of(cpus: u32) -> impl Fn(&[Reservation]) -> Option<Reservation> {
        move |held| {
            (held.iter().map(|h| h.cpus).sum::<u32>() < cpus).then(|| Reservation {
                cpus: 1,
                memory_mib: 1,
                gpus: vec![],
            })
        }
    }

    #[test]
    fn placement_never_over_commits_and_skips_ending_runs() {
        let (store, r, jobs) = run_of_three_jobs("place");
        let fit = one_cpu_of(2);
        let placed: Vec<bool> = jobs
            .iter()
            .map(|j| {
                store
                    .assign_job(&j.id, "i-1", None, &fit)
                    .unwrap()
                    .is_some()
            })
            .collect();
        assert_eq!(placed, [true, true, false]);
        assert!(
            store
                .assign_job(&jobs[0].id, "i-1", None, &fit)
                .unwrap()
                .is_none(),
            "only submitted jobs are placed"
        );
        assert_eq!(waiting(&store), vec![(jobs[2].id.clone(), r.id.clone())]);
        let mut ending = store.run(&r.id).unwrap().unwrap();
        ending.status = RunStatus::Terminating;
        assert!(store.update_run(&ending, &[RunStatus::Submitted]).unwrap());
        let mut finished = store.job(&jobs[0].id).unwrap().unwrap();
        finished.status = JobStatus::Done;
        assert!(store
            .update_job(&finished, &[JobStatus::Provisioning])
            .unwrap());
        assert!(
            store
                .assign_job(&jobs[2].id, "i-1", None, &fit)
                .unwrap()
                .is_none(),
            "an ending run gets no placement"
        );
    }

    #[test]
    fn placements_in_one_transaction_each_see_those_before_them() {
        let (store, r, jobs) = run_of_three_jobs("batch");
        let fit = one_cpu_of(2);
        let placement = |job_id| Placement {
            job_id,
            instance_id: "i-1",
            after: None,
            fit: &fit,
        };
        // The unknown job and the third job (no room left) are refused; the rest is placed.
        let placed: Vec<bool> = store
            .assign_jobs(&[
                placement(jobs[0].id.as_str()),
                placement("no-such-job"),
                placement(jobs[1].id.as_str()),
                placement(jobs[2].id.as_str()),
            ])
            .unwrap()
            .iter()
            .map(Option::is_some)
            .collect();
        assert_eq!(placed, [true, false, true, false]);
        assert_eq!(waiting(&store), vec![(jobs[2].id.clone(), r.id.clone())]);
        assert_eq!(store.reservations().unwrap().len(), 2);
    }

    #[test]
    fn an_instance_being_terminated_takes_no_job() {
        let (store, _, jobs) = run_of_three_jobs("reaped");
        let fit = one_cpu_of(2);
        let instance = |status: &str| -> Instance {
            serde_json::from_value(serde_json::json!({
                "id": "i-1", "name": "i-1", "fleet_id": "f-1", "backend": "aws",
                "status": status, "price": 0.1, "backend_data": null, "created_at_ms": 0,
                "host": {"cpus": 2, "memory_bytes": 1, "disk_bytes": 1, "cpu_arch": "x86", "gpus": []},
            }))
            .unwrap()
        };
        store.put_instance(&instance("terminating")).unwrap();
        assert!(store
            .assign_job(&jobs[0].id, "i-1", None, &fit)
            .unwrap()
            .is_none());
        store.put_instance(&instance("idle")).unwrap();
        assert!(store
            .assign_job(&jobs[0].id, "i-1", None, &fit)
            .unwrap()
            .is_some());
    }

    #[test]
    fn a_pass_reads_what_the_separate_reads_return() {
        let (store, _, jobs) = run_of_three_jobs("snapshot");
        let fit = one_cpu_of(2);
        store.assign_job(&jobs[0].id, "i-1", None, &fit).unwrap();
        let placing = store.placing(2).unwrap();
        assert_eq!(placing.holdings, store.holdings().unwrap());
        assert_eq!(placing.holdings.len(), 1);
        assert_eq!(placing.waiting, store.waiting_jobs(2).unwrap());
        let mut waiting: Vec<&str> = placing.waiting.iter().map(|w| w.job_id.as_str()).collect();
        let mut expected = [jobs[1].id.as_str(), jobs[2].id.as_str()];
        waiting.sort_unstable();
        expected.sort_unstable();
        assert_eq!(waiting, expected);
        assert_eq!(placing.instances, store.instances().unwrap());
        assert_eq!(placing.fleets, store.fleets().unwrap());
    }

    #[test]
    fn a_follower_counts_only_once_its_leader_has_ended() {
        let store = SqliteStore::in_memory().unwrap();
        let r = run("follow", RunStatus::Submitted);
        let jobs: Vec<Job> = (0..4).map(|_| job(&r)).collect();
        store.insert_run(&r, &jobs).unwrap();
        let fit = one_cpu_of(1);
        let held_cpus = |store: &SqliteStore| -> u32 {
            store
                .reservations()
                .unwrap()
                .iter()
                .map(|(_, r)| r.cpus)
                .sum()
        };
        let [leader, follower, second, third] = &jobs[..] else {
            unreachable!()
        };
        let mut leader = store
            .assign_job(&leader.id, "i-1", None, &fit)
            .unwrap()
            .unwrap();
        assert!(store
            .assign_job(&follower.id, "i-1", None, &fit)
            .unwrap()
            .is_none());
        let after = Some(leader.id.as_str());
        assert!(
            store
                .assign_job(&follower.id, "i-1", after, &fit)
                .unwrap()
                .is_none(),
            "only a running job is followed"
        );
        leader.status = JobStatus::Running;
        assert!(store
            .update_job(&leader, &[JobStatus::Provisioning])
            .unwrap());
        let queued = store
            .assign_job(&follower.id, "i-1", after, &fit)
            .unwrap()
            .unwrap();
        assert_eq!(queued.status, JobStatus::Provisioning);
        assert_eq!(queued.after_job.as_deref(), after);
        assert_eq!(held_cpus(&store), 1, "the follower does not count yet");
        assert!(
            store
                .assign_job(&second.id, "i-1", after, &fit)
                .unwrap()
                .is_none(),
            "a job takes one follower"
        );
        // Queued behind the queued follower: one behind the other.
        let behind = store
            .assign_job(&second.id, "i-1", Some(&queued.id), &fit)
            .unwrap()
            .unwrap();
        assert_eq!(held_cpus(&store), 1, "neither follower counts yet");
        assert!(store
            .assign_job(&third.id, "i-1", None, &fit)
            .unwrap()
            .is_none());

        leader.status = JobStatus::Done;
        assert!(store.update_job(&leader, &[JobStatus::Running]).unwrap());
        assert_eq!(held_cpus(&store), 1, "the follower took the leader's place");
        assert!(store
            .assign_job(&third.id, "i-1", None, &fit)
            .unwrap()
            .is_none());
        let holdings = store.holdings().unwrap();
        let counted: Vec<&str> = holdings
            .iter()
            .filter(|h| h.counts(&holdings))
            .map(|h| h.job_id.as_str())
            .collect();
        assert_eq!(counted, [queued.id.as_str()]);
        assert_eq!(holdings.len(), 2);
        assert!(holdings
            .iter()
            .any(|h| h.job_id == behind.id && h.after_job.as_deref() == Some(&queued.id)));
        // A queued job being stopped may have ended on its agent: nothing queues behind it.
        let mut stopping = behind.clone();
        stopping.status = JobStatus::Terminating;
        assert!(store
            .update_job(&stopping, &[JobStatus::Provisioning])
            .unwrap());
        assert!(store
            .assign_job(&third.id, "i-1", Some(&behind.id), &fit)
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_group_at_its_limit_is_neither_placed_nor_queued_until_a_run_finishes() {
        let store = SqliteStore::in_memory().unwrap();
        let group = crate::model::RunGroup {
            id: "sweep-1".to_string(),
            max_parallel: Some(2),
        };
        let trials: Vec<(Run, Job)> = (0..3)
            .map(|i| {
                let mut r = run(&format!("trial-{i}"), RunStatus::Submitted);
                r.spec.group = Some(group.clone());
                let j = job(&r);
                store.insert_run(&r, std::slice::from_ref(&j)).unwrap();
                (r, j)
            })
            .collect();
        let other = run("other", RunStatus::Submitted);
        let other_job = job(&other);
        store
            .insert_run(&other, std::slice::from_ref(&other_job))
            .unwrap();
        let fit = |_: &[Reservation]| {
            Some(Reservation {
                cpus: 1,
                memory_mib: 1,
                gpus: vec![],
            })
        };
        for (_, j) in &trials[..2] {
            assert!(store
                .assign_job(&j.id, "i-1", None, &fit)
                .unwrap()
                .is_some());
        }
        let (third_run, third_job) = &trials[2];
        assert!(!store.group_has_room(&third_run.id).unwrap());
        assert!(store
            .assign_job(&third_job.id, "i-1", None, &fit)
            .unwrap()
            .is_none());
        assert_eq!(
            waiting(&store),
            vec![(other_job.id.clone(), other.id.clone())],
            "a full group does not fill the queue others wait in"
        );
        assert!(
            store.group_has_room(&other.id).unwrap(),
            "no group: no limit"
        );
        let mut done = store.job(&trials[0].1.id).unwrap().unwrap();
        done.status = JobStatus::Done;
        assert!(store.update_job(&done, &[JobStatus::Provisioning]).unwrap());
        assert!(store.group_has_room(&third_run.id).unwrap());
        assert!(store
            .assign_job(&third_job.id, "i-1", None, &fit)
            .unwrap()
            .is_some());
    }
}
