//! Durable state: the [`Store`] trait and its SQLite implementation (the embedded default).
//!
//! Every transition is a compare-and-set on the record's status, so several engine processes
//! sharing one state file never apply the same transition twice, and job placement is one
//! atomic transaction, so they never over-commit an instance.

mod busy;
mod checkpoint;
mod events;
mod identity;
mod sqlite;

pub use sqlite::SqliteStore;

use crate::events::{Event, EventQuery};
use crate::model::{Fleet, Instance, Job, JobStatus, Reservation, Run, RunStatus, Volume};

/// A failure of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite reported an error.
    #[error("state database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored record could not be decoded.
    #[error("corrupt record in the state database: {0}")]
    Corrupt(#[from] serde_json::Error),
    /// The state directory could not be prepared.
    #[error("cannot prepare the state directory: {0}")]
    Io(#[from] std::io::Error),
    /// An active run already has this name.
    #[error("a run named `{0}` is still active; stop it first or choose another name")]
    NameTaken(String),
    /// The database was written by a newer version.
    #[error("the state database has schema version {found}; this build knows up to {known}")]
    TooNew {
        /// The database's version.
        found: i64,
        /// The newest version this build knows.
        known: i64,
    },
}

/// Which runs to list.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunFilter {
    /// Only runs that have not finished.
    pub active_only: bool,
    /// At most this many, newest first.
    pub limit: Option<usize>,
}

/// Runs as listed: those read, and those whose records could not be.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct RunListing {
    /// The runs read, newest first.
    pub runs: Vec<Run>,
    /// Each record that could not be read: its run id and why.
    pub unreadable: Vec<(String, String)>,
}

/// A `submitted` job as the scheduler sees it first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaitingJob {
    /// The job id.
    pub job_id: String,
    /// Its run's id.
    pub run_id: String,
    /// Whether its run belongs to a group with a limit (see [`Store::group_has_room`]).
    pub grouped: bool,
}

/// The state a placement pass starts from (see [`Store::placing`]).
#[derive(Clone, Debug)]
pub struct Placing {
    /// Every job that holds resources on an instance (see [`Store::holdings`]).
    pub holdings: Vec<Holding>,
    /// The oldest waiting jobs (see [`Store::waiting_jobs`]).
    pub waiting: Vec<WaitingJob>,
    /// Every instance.
    pub instances: Vec<Instance>,
    /// Every fleet.
    pub fleets: Vec<Fleet>,
}

/// A job that holds resources on an instance.
#[derive(Clone, Debug, PartialEq)]
pub struct Holding {
    /// The instance.
    pub instance_id: String,
    /// The job.
    pub job_id: String,
    /// The job's run.
    pub run_id: String,
    /// Its status (one that holds resources).
    pub status: JobStatus,
    /// The job it is queued behind, if any.
    pub after_job: Option<String>,
    /// What it holds.
    pub reservation: Reservation,
}

impl Holding {
    /// Whether its reservation counts, `all` being every holding of its instance (or more):
    /// a follower's does not while the job it follows holds its own (the follower takes it
    /// over when that job ends).
    pub fn counts(&self, all: &[Holding]) -> bool {
        self.after_job
            .as_deref()
            .is_none_or(|leader| !all.iter().any(|h| h.job_id == leader))
    }

    /// The ids of this job and of the jobs of `all` it is queued behind, nearest first: the
    /// last one is the one whose reservation counts for them all.
    pub fn queue<'a>(&'a self, all: &'a [Holding]) -> Vec<&'a str> {
        let mut queue = vec![self.job_id.as_str()];
        let mut at = self;
        while let Some(leader) = at
            .after_job
            .as_deref()
            .and_then(|id| all.iter().find(|h| h.job_id == id))
        {
            if queue.contains(&leader.job_id.as_str()) {
                break; // a cycle cannot be recorded, but never loop on one
            }
            queue.push(&leader.job_id);
            at = leader;
        }
        queue
    }
}

/// Decides where a job fits on an instance, given what its active jobs already hold.
pub type FitFn<'a> = &'a dyn Fn(&[Reservation]) -> Option<Reservation>;

/// A job to place (see [`Store::assign_job`]).
pub struct Placement<'a> {
    /// The `submitted` job.
    pub job_id: &'a str,
    /// The instance to place it on.
    pub instance_id: &'a str,
    /// The job of the instance to queue it behind, if any.
    pub after: Option<&'a str>,
    /// Where it fits, given the reservations held on the instance.
    pub fit: FitFn<'a>,
}

/// Decides a run's new state from the run and its jobs (`None`: leave it as it is).
pub type DeriveFn<'a> = &'a mut dyn FnMut(&Run, &[Job]) -> Option<Run>;

/// Decides a job's new state from the job as stored (`None`: leave it as it is).
pub type ChangeFn<'a> = &'a mut dyn FnMut(&Job) -> Option<Job>;

/// A job [`Store::change_jobs_and_runs`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct Changed {
    /// The job as written.
    pub job: Job,
    /// Its status before.
    pub from: JobStatus,
    /// Its run as written, when the derive function changed it.
    pub run: Option<Box<Run>>,
    /// The job has finished and the job queued behind it holds the same reservation: the
    /// resources it held passed on, none freed up.
    pub passed_on: bool,
}

/// What [`Store::update_job_and_run`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub enum JobAndRun {
    /// The job's stored status was not one of those expected: nothing was written.
    JobChanged,
    /// The job was written, and its run too when the derive function returned one (the run
    /// as written).
    Written(Option<Box<Run>>),
}

/// Durable storage of runs, jobs, instances and fleets.
pub trait Store: Send + Sync {
    /// The identity of this state: kept in the state file, new for a copy of it (see
    /// `identity`). Cloud resources are tagged with it, and the orphan sweep reaps only
    /// resources carrying it.
    fn state_id(&self) -> &str;

    /// Inserts a new run with its first jobs. A finished run of the same name is replaced;
    /// an active one is [`StoreError::NameTaken`].
    fn insert_run(&self, run: &Run, jobs: &[Job]) -> Result<(), StoreError> {
        self.insert_runs(&[(run, jobs)])
    }
    /// Inserts new runs with their first jobs, in one transaction: all of them, or none if
    /// one fails (as [`Store::insert_run`] would).
    fn insert_runs(&self, runs: &[(&Run, &[Job])]) -> Result<(), StoreError>;
    /// A run by id.
    fn run(&self, id: &str) -> Result<Option<Run>, StoreError>;
    /// The current run with this name.
    fn run_by_name(&self, name: &str) -> Result<Option<Run>, StoreError>;
    /// Runs, newest first; a record that cannot be read is listed apart instead of failing
    /// the whole listing.
    fn runs(&self, filter: RunFilter) -> Result<RunListing, StoreError>;
    /// Runs in any of these statuses, oldest first.
    fn runs_with_status(&self, statuses: &[RunStatus]) -> Result<Vec<Run>, StoreError>;
    /// The unfinished runs whose configuration is of type `kind` (e.g. `service`), oldest
    /// first (read from an index of their own: the cost does not grow with other runs).
    fn active_runs_of_kind(&self, kind: &str) -> Result<Vec<Run>, StoreError>;
    /// The runs with a job in status `running`, oldest first (found from the jobs that hold
    /// resources: the cost does not grow with waiting or finished runs).
    fn running_runs(&self) -> Result<Vec<Run>, StoreError>;
    /// `(run id, status)` of every run of group `group_id` (read from the group's index,
    /// without decoding the runs): what a watcher of a sweep starts from.
    fn group_statuses(&self, group_id: &str) -> Result<Vec<(String, RunStatus)>, StoreError>;
    /// Names starting with `prefix` in use by runs that have not been replaced.
    fn run_names(&self, prefix: &str) -> Result<Vec<String>, StoreError>;
    /// Writes `run` if its stored status is one of `expected`; `false` if it was not.
    fn update_run(&self, run: &Run, expected: &[RunStatus]) -> Result<bool, StoreError>;

    /// Atomically writes `run` (if its stored status is one of `expected`) together with new
    /// job submissions; `false` (and nothing written) if the status did not match.
    fn update_run_with_jobs(
        &self,
        run: &Run,
        expected: &[RunStatus],
        jobs: &[Job],
    ) -> Result<bool, StoreError>;
    /// A job submission by id.
    fn job(&self, id: &str) -> Result<Option<Job>, StoreError>;
    /// Every submission of a run's jobs, by job number then submission number.
    fn jobs_of_run(&self, run_id: &str) -> Result<Vec<Job>, StoreError>;
    /// A run and every submission of its jobs, read together.
    fn run_with_jobs(&self, run_id: &str) -> Result<Option<(Run, Vec<Job>)>, StoreError> {
        let Some(run) = self.run(run_id)? else {
            return Ok(None);
        };
        Ok(Some((run, self.jobs_of_run(run_id)?)))
    }
    /// Ids of `submitted` runs with a job that is already placed (their status is behind:
    /// a reconcile after the job's start was lost).
    fn submitted_runs_with_placed_jobs(&self) -> Result<Vec<String>, StoreError>;
    /// Job submissions in any of these statuses, oldest first.
    fn jobs_with_status(&self, statuses: &[JobStatus]) -> Result<Vec<Job>, StoreError>;
    /// At most `limit` `submitted` jobs, those of the highest `priority` first, then the
    /// oldest (cheap: no decoding), leaving out jobs of run groups that are at their limit.
    fn waiting_jobs(&self, limit: usize) -> Result<Vec<WaitingJob>, StoreError>;
    /// What a placement pass starts from, read at one point in time: the holdings, at most
    /// `limit` waiting jobs (see [`Store::waiting_jobs`]), the instances and the fleets.
    fn placing(&self, limit: usize) -> Result<Placing, StoreError>;
    /// Writes `job` if its stored status is one of `expected`; `false` if it was not.
    fn update_job(&self, job: &Job, expected: &[JobStatus]) -> Result<bool, StoreError>;
    /// Writes `job` if its stored status is one of `expected` and, in the same transaction,
    /// its run as `derive` decides from the run and its jobs as stored after the job's write.
    /// `derive` runs inside the transaction: it must not call the store.
    fn update_job_and_run(
        &self,
        job: &Job,
        expected: &[JobStatus],
        derive: DeriveFn<'_>,
    ) -> Result<JobAndRun, StoreError>;
    /// Applies `change` to each of the jobs `ids` as stored now, and writes every job it
    /// changes together with its run as `derive` decides (see
    /// [`Store::update_job_and_run`]), all in one transaction. Returns what was written.
    fn change_jobs_and_runs(
        &self,
        ids: &[&str],
        change: ChangeFn<'_>,
        derive: DeriveFn<'_>,
    ) -> Result<Vec<Changed>, StoreError>;
    /// Whether run `run_id` may be placed as far as its group's limit goes (`true` for runs
    /// without a group).
    fn group_has_room(&self, run_id: &str) -> Result<bool, StoreError>;
    /// Every job that holds resources on an instance (followers included: see
    /// [`Holding::counts`]).
    fn holdings(&self) -> Result<Vec<Holding>, StoreError>;
    /// `(instance id, reservation)` of every job whose resources count as held on an
    /// instance.
    fn reservations(&self) -> Result<Vec<(String, Reservation)>, StoreError> {
        let holdings = self.holdings()?;
        Ok(holdings
            .iter()
            .filter(|h| h.counts(&holdings))
            .map(|h| (h.instance_id.clone(), h.reservation.clone()))
            .collect())
    }
    /// Atomically places a `submitted` job on an instance: `fit` sees the reservations held
    /// on the instance and returns the job's reservation, or `None` if it does not fit now.
    /// With `after`, the job is queued behind that job of the instance instead (see
    /// [`Job::after_job`]), which must be `running` or queued itself, with no follower yet;
    /// `fit` then sees what the instance holds besides that job. Returns the job, now
    /// `provisioning`, or `None`.
    fn assign_job(
        &self,
        job_id: &str,
        instance_id: &str,
        after: Option<&str>,
        fit: FitFn<'_>,
    ) -> Result<Option<Job>, StoreError> {
        let placement = Placement {
            job_id,
            instance_id,
            after,
            fit,
        };
        Ok(self.assign_jobs(&[placement])?.pop().flatten())
    }
    /// Places several jobs in one transaction, in order, each as [`Store::assign_job`] would
    /// (each sees the placements before it): one result per placement.
    fn assign_jobs(&self, placements: &[Placement<'_>]) -> Result<Vec<Option<Job>>, StoreError>;

    /// Inserts or replaces a fleet.
    fn put_fleet(&self, fleet: &Fleet) -> Result<(), StoreError>;
    /// Every fleet.
    fn fleets(&self) -> Result<Vec<Fleet>, StoreError>;
    /// When the last job placed on an instance ended (Unix ms), if any did.
    fn last_job_end(&self, instance_id: &str) -> Result<Option<u64>, StoreError>;
    /// Inserts or replaces an instance.
    fn put_instance(&self, instance: &Instance) -> Result<(), StoreError>;
    /// An instance by id.
    fn instance(&self, id: &str) -> Result<Option<Instance>, StoreError>;
    /// Every instance.
    fn instances(&self) -> Result<Vec<Instance>, StoreError>;
    /// Inserts or replaces a volume.
    fn put_volume(&self, volume: &Volume) -> Result<(), StoreError>;
    /// Every volume, deleted ones included, by name.
    fn volumes(&self) -> Result<Vec<Volume>, StoreError>;

    /// The recorded status changes `query` selects (see [`crate::events`]), in its order.
    fn events(&self, query: &EventQuery) -> Result<Vec<Event>, StoreError>;
    /// Deletes the events recorded before `before_ms` (but the newest: events are numbered
    /// after it) and all but the newest `keep`; returns how many were deleted.
    fn prune_events(&self, before_ms: u64, keep: u64) -> Result<usize, StoreError>;
}
