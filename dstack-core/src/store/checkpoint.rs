//! Checkpoints of the state file's write-ahead log on a thread of their own: copying the
//! log's pages back into the database file (and the fsyncs that go with it) never holds up a
//! transaction of the engine. (Left to SQLite, a checkpoint runs inside whichever commit
//! crosses its threshold: that commit then waits for the disk, milliseconds on a busy one.)

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;

use super::StoreError;

/// Row changes between two checkpoints: a few log pages each, so about SQLite's own
/// threshold of 1000 pages.
const CHANGES_PER_CHECKPOINT: u64 = 256;

/// Log pages beyond which a checkpoint waits for the writer, so that the log starts over
/// (under steady writes, checkpoints that never wait may never catch up with it).
const RESTART_PAGES: i64 = 10_000;

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
        conn.busy_timeout(Duration::from_secs(30))?;
        let (wake, woken) = mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("dstack-checkpoint".to_string())
            .spawn(move || {
                while woken.recv().is_ok() {
                    checkpoint(&conn);
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

/// Copies what the log holds into the database file without waiting for anyone; when the log
/// has grown long, waits for the writer so that it starts over. Failures are left to the
/// next checkpoint (the log stays valid whatever happens here).
fn checkpoint(conn: &Connection) {
    let passive = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
    });
    if let Ok((log, copied)) = passive {
        if log > RESTART_PAGES && copied < log {
            let _ = conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()));
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
