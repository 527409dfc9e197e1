//! Host keys: trust on first use, recorded in `$DSTACK_HOME/ssh/known_hosts` (OpenSSH format,
//! file 0600 in a 0700 directory); a key that changed is refused.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use russh::keys::known_hosts::learn_known_hosts_path;
use russh::keys::{check_known_hosts_path, HashAlg, PublicKey};

/// What was decided about a server's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyCheck {
    /// The key matches the recorded one.
    Known,
    /// The host was unknown; its key is now recorded.
    Learned,
    /// The host presented a different key than the recorded one.
    Changed {
        /// The fingerprint the server presented.
        presented: String,
        /// The line of the known-hosts file holding the recorded key.
        line: usize,
    },
}

/// The known-hosts file of a state directory.
#[derive(Debug, Clone)]
pub struct KnownHosts {
    path: PathBuf,
}

impl KnownHosts {
    /// `<home>/ssh/known_hosts`.
    pub fn in_home(home: &Path) -> Self {
        KnownHosts {
            path: home.join("ssh").join("known_hosts"),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks `key` of `host:port`, recording it if the host is new.
    pub fn check(&self, host: &str, port: u16, key: &PublicKey) -> io::Result<HostKeyCheck> {
        match check_known_hosts_path(host, port, key, &self.path) {
            Ok(true) => Ok(HostKeyCheck::Known),
            Ok(false) => {
                self.prepare()?;
                learn_known_hosts_path(host, port, key, &self.path).map_err(io::Error::other)?;
                Ok(HostKeyCheck::Learned)
            }
            Err(russh::keys::Error::KeyChanged { line }) => Ok(HostKeyCheck::Changed {
                presented: key.fingerprint(HashAlg::Sha256).to_string(),
                line,
            }),
            Err(e) => Err(io::Error::other(e)),
        }
    }

    /// Creates the directory (0700) and the file (0600) before anything is written.
    fn prepare(&self) -> io::Result<()> {
        if let Some(dir) = self.path.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const KEYS: [&str; 2] = [
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPXkH59v6PT5kcJY8MGqLSvFRqblw1PvcA/cW8UWq/c6",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKvLwABtdX3e982fFmhSs7BwZOWLWfqfopjb7Af4cDMe",
    ];

    #[test]
    fn first_use_is_recorded_privately_and_a_changed_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = KnownHosts::in_home(dir.path());
        let a = PublicKey::from_openssh(KEYS[0]).unwrap();
        let b = PublicKey::from_openssh(KEYS[1]).unwrap();
        assert_eq!(
            hosts.check("10.0.0.1", 22, &a).unwrap(),
            HostKeyCheck::Learned
        );
        assert_eq!(
            hosts.check("10.0.0.1", 22, &a).unwrap(),
            HostKeyCheck::Known
        );
        assert!(matches!(
            hosts.check("10.0.0.1", 22, &b).unwrap(),
            HostKeyCheck::Changed { .. }
        ));
        assert_eq!(
            hosts.check("10.0.0.1", 2222, &b).unwrap(),
            HostKeyCheck::Learned
        );
        let mode = fs::metadata(hosts.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = fs::metadata(hosts.path().parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
    }
}
