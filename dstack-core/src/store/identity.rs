//! The identity of a state file ([`Store::state_id`](super::Store::state_id)): a random id
//! kept in the file beside the device and inode numbers of the file it was made for.
//!
//! Cloud resources are tagged with it, and the orphan sweep reaps only resources carrying
//! its own state's identity. A copy of `$DSTACK_HOME` (`cp`, `rsync`, a restored backup) is a
//! new file: the first open finds other device and inode numbers and makes a new identity,
//! so neither copy reaps what the other creates. A state moved within its file system keeps
//! its identity. Should a file system report other numbers for the same file (a remount
//! that renumbers devices), the state gets a new identity and merely stops reaping the
//! strays of the old one: nothing is ever reaped wrongly.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension};

use super::StoreError;

/// The identity of the state file at `path` (made now if it has none yet, or if it was
/// made for another file), within one write transaction so that processes opening the file
/// at once agree.
pub(super) fn of_file(conn: &Connection, path: &Path) -> Result<String, StoreError> {
    let meta = std::fs::metadata(path)?;
    // SQLite keeps integers signed: the numbers are stored as their bit patterns.
    let (dev, ino) = (meta.dev() as i64, meta.ino() as i64);
    super::sqlite::in_transaction(conn, true, |conn| {
        let kept: Option<(String, i64, i64)> = conn
            .query_row("SELECT id, dev, ino FROM state_identity", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        if let Some((id, kept_dev, kept_ino)) = kept {
            if (kept_dev, kept_ino) == (dev, ino) {
                return Ok(id);
            }
        }
        let id = new_id();
        conn.execute("DELETE FROM state_identity", [])?;
        conn.execute(
            "INSERT INTO state_identity (id, dev, ino) VALUES (?1, ?2, ?3)",
            rusqlite::params![id, dev, ino],
        )?;
        Ok(id)
    })
}

/// A new identity (for an in-memory store: one per store).
pub(super) fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}
