//! Checkpoints of the state file's write-ahead log on a thread of their own: copying the
//! log's pages back into the database file (and the fsyncs that go with it) never holds up a
//! transaction of the engine. (Left to SQLite, a checkpoint runs inside whichever commit
//! crosses its threshold: that commit then waits for the disk, milliseconds on a busy one.)

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::thread::JoinHandle;

use rusqlite::Connection;

use super::busy::retry_briefly;
use super::StoreError;

/// Row changes between two checkpoints: a few log pages each, so about SQLite's own
/// threshold of 1000 pages.
const CHANGES_PER_CHECKPOINT: u64 = 256;

/// Log pages (4 KiB each) beyond which a checkpoint waits for the writer, so that the log
/// starts over from its beginning.
pub(super) const RESTART_PAGES: i64 = 1_000;

/// The checkpointing thread of one state file.
pub(super) struct Checkpointer {
    wake: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
    /// The writer's total row changes when the thread was last woken.
    woken_at: AtomicU64,
}

impl Checkpointer {
    /// Starts checkpointing the database at `path`, whose writer no longer checkpoints.
    pub fn start(path: &Path) -> Result<Checkpointer, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_handler(Some(retry_briefly))?;
        let (wake, woken) = mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("dstack-checkpoint".to_string())
            .spawn(move || {
                let mut log = LogProgress::default();
                while woken.recv().is_ok() {
                    log.checkpoint(&conn);
                }
            })?;
        Ok(Checkpointer {
            wake: Some(wake),
            thread: Some(thread),
            woken_at: AtomicU64::new(0),
        })
    }

    /// Told the writer's total row changes after its work: wakes the thread once every
    /// [`CHANGES_PER_CHECKPOINT`] changes.
    pub fn after_writes(&self, total_changes: u64) {
        let last = self.woken_at.load(Ordering::Relaxed);
        if total_changes.saturating_sub(last) < CHANGES_PER_CHECKPOINT {
            return;
        }
        self.woken_at.store(total_changes, Ordering::Relaxed);
        if let Some(wake) = &self.wake {
            // Full: a checkpoint is due anyway.
            let _ = wake.try_send(());
        }
    }
}

/// What the checkpoint thread knows of the log from its last checkpoint.
#[derive(Default)]
struct LogProgress {
    /// Log pages the last passive checkpoint had copied (0 once the log started over).
    copied: i64,
}

impl LogProgress {
    /// Copies what the log holds into the database file without waiting for anyone; once the
    /// log has grown past [`RESTART_PAGES`], waits for the writer (briefly: [`retry_briefly`])
    /// so that the log starts over. (SQLite starts the log over only when a write begins with
    /// nothing in it left to copy. A passive checkpoint copies all it sees, but under steady
    /// writes the writer has added more by the time it is done: without the wait, the log
    /// grows for as long as the writes go on — 140 MB after two sweeps of 1000 tasks.)
    ///
    /// Not while a reader keeps part of the log from being copied — the wait would hold up
    /// the writer until that reader is done. Such a reader shows as a passive checkpoint that
    /// copies no more than the one before it while pages are left over. (Pages left over alone
    /// say nothing: the writer adds pages while the checkpoint copies.)
    /// Failures are left to the next checkpoint (the log stays valid whatever happens here).
    fn checkpoint(&mut self, conn: &Connection) {
        let Ok((log, copied)) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        }) else {
            return;
        };
        let held_by_a_reader = copied < log && copied <= self.copied;
        self.copied = copied;
        if log > RESTART_PAGES && !held_by_a_reader {
            let started_over = conn
                .query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| r.get::<_, i64>(0))
                .is_ok_and(|busy| busy == 0);
            if started_over {
                self.copied = 0;
            }
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        // Closing the channel ends the thread once its checkpoint, if any, is done.
        self.wake.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
