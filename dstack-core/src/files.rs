//! Private files written whole: a file readers never see half-written, readable by its owner
//! only (keys, tokens, secrets, identities).

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Writes `bytes` (mode 0600, synced) to a new uniquely named file beside `path`.
fn write_beside(path: &Path, bytes: &[u8]) -> io::Result<PathBuf> {
    let temp = path.with_extension(format!("tmp.{}", uuid::Uuid::new_v4().simple()));
    let written = OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&temp)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        });
    match written {
        Ok(()) => Ok(temp),
        Err(e) => {
            let _ = fs::remove_file(&temp);
            Err(e)
        }
    }
}

/// Replaces (or creates) `path` with `bytes`, mode 0600: written beside it, then renamed
/// into place.
pub fn replace_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let temp = write_beside(path, bytes)?;
    fs::rename(&temp, path).inspect_err(|_| {
        let _ = fs::remove_file(&temp);
    })
}

/// Creates `path` with `bytes`, mode 0600, unless it exists: written beside it, then linked
/// into place, so that of several processes creating it at once exactly one wins. Returns
/// whether this call created it.
pub fn create_private(path: &Path, bytes: &[u8]) -> io::Result<bool> {
    let temp = write_beside(path, bytes)?;
    let linked = fs::hard_link(&temp, path);
    let _ = fs::remove_file(&temp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn private_files_are_replaced_or_created_once_and_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        assert!(create_private(&path, b"first").unwrap());
        assert!(!create_private(&path, b"second").unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"first");
        replace_private(&path, b"third").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"third");
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
