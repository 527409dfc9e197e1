//! Host keys: recorded in `$DSTACK_HOME/ssh/known_hosts` (OpenSSH format, file 0600 in a
//! 0700 directory), pinned up front ([`KnownHosts::pin`]) or on first use.
//!
//! A host with *any* key on record must present one of the recorded keys: a key of another
//! algorithm than the recorded one is refused like a changed key (OpenSSH does the same),
//! never learned beside it. Only a host with nothing on record is trusted on first use.
//! Lines may name hosts plainly, as `[host]:port`, hashed (`|1|salt|hash`, as
//! `ssh-keygen -H` writes them) or by `*`/`?` patterns with `!` negation; `@revoked` lines
//! count as records that never match, `@cert-authority` lines are not host keys.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use data_encoding::BASE64;
use hmac::{Hmac, KeyInit, Mac};
use russh::keys::{Algorithm, HashAlg, PublicKey};
use sha1::Sha1;

/// The largest known-hosts file read (a larger one is refused, not read whole).
const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// What was decided about a server's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyCheck {
    /// The key matches a recorded one.
    Known,
    /// The host was unknown; its key is now recorded.
    Learned,
    /// The host presented a key that matches none of those on record for it (another key of
    /// the same algorithm, or a key of an algorithm with no record).
    Changed {
        /// The fingerprint the server presented.
        presented: String,
        /// The line of the known-hosts file holding the (first) recorded key.
        line: usize,
    },
}

/// The known-hosts file of a state directory.
#[derive(Debug, Clone)]
pub struct KnownHosts {
    path: PathBuf,
}

/// A key recorded for a host, and where.
struct Record {
    line: usize,
    /// `None` for a revoked key: a record that matches nothing.
    key: Option<PublicKey>,
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

    /// Checks `key` of `host:port`, recording it if nothing is on record for the host.
    pub fn check(&self, host: &str, port: u16, key: &PublicKey) -> io::Result<HostKeyCheck> {
        let records = self.records(host, port)?;
        let Some(first) = records.first() else {
            self.append(host, port, key)?;
            return Ok(HostKeyCheck::Learned);
        };
        if records
            .iter()
            .filter_map(|r| r.key.as_ref())
            .any(|recorded| recorded.key_data() == key.key_data())
        {
            return Ok(HostKeyCheck::Known);
        }
        Ok(HostKeyCheck::Changed {
            presented: key.fingerprint(HashAlg::Sha256).to_string(),
            line: first.line,
        })
    }

    /// The algorithms of the keys on record for `host:port`, in file order (a client offers
    /// these first, so that a host with several keys presents the one that is pinned).
    pub fn recorded_algorithms(&self, host: &str, port: u16) -> io::Result<Vec<Algorithm>> {
        let mut algorithms: Vec<Algorithm> = Vec::new();
        for key in self.records(host, port)?.into_iter().filter_map(|r| r.key) {
            if !algorithms.contains(&key.algorithm()) {
                algorithms.push(key.algorithm());
            }
        }
        Ok(algorithms)
    }

    /// Pins `key` as the only key of `host:port` (a key obtained out of band, before the
    /// first connection): any other record of the host is removed.
    pub fn pin(&self, host: &str, port: u16, key: &PublicKey) -> io::Result<()> {
        self.rewrite(host, port, Some(key))
    }

    /// Forgets every key of `host:port` (a terminated cloud instance whose address may be
    /// given to another machine). Returns whether anything was on record.
    pub fn forget(&self, host: &str, port: u16) -> io::Result<bool> {
        let known = !self.records(host, port)?.is_empty();
        if known {
            self.rewrite(host, port, None)?;
        }
        Ok(known)
    }

    /// The file's text; empty when there is no file.
    fn text(&self) -> io::Result<String> {
        match fs::metadata(&self.path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(String::new()),
            Err(e) => return Err(e),
            Ok(meta) if meta.len() > MAX_FILE_BYTES => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("larger than {MAX_FILE_BYTES} bytes"),
                ))
            }
            Ok(_) => {}
        }
        fs::read_to_string(&self.path)
    }

    /// The records of `host:port`, in file order. A malformed key recorded for the host is an
    /// error (refusing is safer than ignoring what the user wrote).
    fn records(&self, host: &str, port: u16) -> io::Result<Vec<Record>> {
        let name = host_port(host, port);
        let mut records = Vec::new();
        for (index, line) in self.text()?.lines().enumerate() {
            let Some(entry) = Entry::parse(line) else {
                continue;
            };
            if entry.marker == Some("@cert-authority") || !matches_hosts(&name, entry.hosts) {
                continue;
            }
            let key = match entry.marker {
                Some(_) => None,
                None => Some(PublicKey::from_openssh(entry.key).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("line {}: {e}", index + 1),
                    )
                })?),
            };
            records.push(Record {
                line: index + 1,
                key,
            });
        }
        Ok(records)
    }

    /// Appends the record of a new host.
    fn append(&self, host: &str, port: u16, key: &PublicKey) -> io::Result<()> {
        self.prepare_dir()?;
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)?;
        // One write, so that records appended by other processes never interleave.
        file.write_all(record_line(host, port, key)?.as_bytes())
    }

    /// Rewrites the file without the records of `host:port` (and with `key` for it, if
    /// given), whole.
    fn rewrite(&self, host: &str, port: u16, key: Option<&PublicKey>) -> io::Result<()> {
        let name = host_port(host, port);
        let mut kept = String::new();
        for line in self.text()?.lines() {
            let theirs = Entry::parse(line).is_some_and(|entry| {
                entry.marker != Some("@cert-authority") && matches_hosts(&name, entry.hosts)
            });
            if !theirs {
                kept.push_str(line);
                kept.push('\n');
            }
        }
        if let Some(key) = key {
            kept.push_str(&record_line(host, port, key)?);
        }
        self.prepare_dir()?;
        dstack_core::files::replace_private(&self.path, kept.as_bytes())
    }

    /// Creates the directory (0700) before anything is written.
    fn prepare_dir(&self) -> io::Result<()> {
        match self.path.parent() {
            Some(dir) => fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir),
            None => Ok(()),
        }
    }
}

/// One line of a known-hosts file: `[marker] hosts key`.
struct Entry<'a> {
    marker: Option<&'a str>,
    hosts: &'a str,
    /// `keytype base64 [comment]`.
    key: &'a str,
}

impl<'a> Entry<'a> {
    /// `None` for blank lines, comments and lines without a key.
    fn parse(line: &'a str) -> Option<Entry<'a>> {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let (marker, rest) = match line.strip_prefix('@') {
            Some(_) => {
                let (marker, rest) = line.split_once(char::is_whitespace)?;
                (Some(marker), rest.trim_start())
            }
            None => (None, line),
        };
        let (hosts, key) = rest.split_once(char::is_whitespace)?;
        let key = key.trim();
        (!key.is_empty()).then_some(Entry { marker, hosts, key })
    }
}

/// How OpenSSH names a host in the file: `host`, or `[host]:port` off port 22.
fn host_port(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

/// A record line for `key` (without its comment).
fn record_line(host: &str, port: u16, key: &PublicKey) -> io::Result<String> {
    let mut key = key.clone();
    key.set_comment("");
    let text = key.to_openssh().map_err(io::Error::other)?;
    Ok(format!("{} {}\n", host_port(host, port), text.trim()))
}

/// Whether `name` matches a comma-separated host list: some pattern matches it and no
/// negated (`!`) pattern does.
fn matches_hosts(name: &str, patterns: &str) -> bool {
    let mut matched = false;
    for pattern in patterns.split(',') {
        if let Some(negated) = pattern.strip_prefix('!') {
            if matches_pattern(name, negated) {
                return false;
            }
        } else if matches_pattern(name, pattern) {
            matched = true;
        }
    }
    matched
}

fn matches_pattern(name: &str, pattern: &str) -> bool {
    match pattern.strip_prefix("|1|") {
        Some(hashed) => matches_hashed(name, hashed),
        None => glob(name.as_bytes(), pattern.as_bytes()),
    }
}

/// `salt|hash`, both base64: HMAC-SHA1 of the name keyed with the salt.
fn matches_hashed(name: &str, hashed: &str) -> bool {
    let Some((salt, hash)) = hashed.split_once('|') else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (
        BASE64.decode(salt.as_bytes()),
        BASE64.decode(hash.as_bytes()),
    ) else {
        return false;
    };
    let Ok(mac) = <Hmac<Sha1> as KeyInit>::new_from_slice(&salt) else {
        return false;
    };
    mac.chain_update(name.as_bytes())
        .verify_slice(&hash)
        .is_ok()
}

/// `*` (any run) and `?` (any one character) patterns, case-insensitive as host names are.
fn glob(name: &[u8], pattern: &[u8]) -> bool {
    // Iterative matching with backtracking to the last `*`: linear in practice, never
    // exponential.
    let (mut n, mut p) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == b'?' || c.eq_ignore_ascii_case(&name[n]) => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const KEYS: [&str; 2] = [
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPXkH59v6PT5kcJY8MGqLSvFRqblw1PvcA/cW8UWq/c6",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKvLwABtdX3e982fFmhSs7BwZOWLWfqfopjb7Af4cDMe",
    ];
    const ECDSA: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBJxs06K7xRa0cgcwEo5SWdhrnGboZxnCUjWblGJ37Y0oZG+WmqBtRYyWZCamMGi0YQdp2naHrhFgaAhAWHUQwWY=";

    fn key(text: &str) -> PublicKey {
        PublicKey::from_openssh(text).unwrap()
    }

    #[test]
    fn first_use_is_recorded_privately_and_a_changed_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = KnownHosts::in_home(dir.path());
        let (a, b) = (key(KEYS[0]), key(KEYS[1]));
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
            HostKeyCheck::Changed { line: 1, .. }
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

    #[test]
    fn a_key_of_another_algorithm_than_the_pinned_one_is_refused_and_not_learned() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = KnownHosts::in_home(dir.path());
        hosts.check("10.0.0.2", 22, &key(KEYS[0])).unwrap();
        let before = fs::read_to_string(hosts.path()).unwrap();
        assert!(matches!(
            hosts.check("10.0.0.2", 22, &key(ECDSA)).unwrap(),
            HostKeyCheck::Changed { line: 1, .. }
        ));
        assert_eq!(fs::read_to_string(hosts.path()).unwrap(), before);
        assert_eq!(
            hosts.recorded_algorithms("10.0.0.2", 22).unwrap(),
            vec![Algorithm::Ed25519]
        );
    }

    #[test]
    fn pinned_keys_replace_records_and_forgotten_hosts_are_learned_anew() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = KnownHosts::in_home(dir.path());
        hosts.check("10.0.0.3", 22, &key(KEYS[0])).unwrap();
        hosts.check("10.0.0.4", 22, &key(KEYS[0])).unwrap();
        hosts.pin("10.0.0.3", 22, &key(ECDSA)).unwrap();
        assert_eq!(
            hosts.check("10.0.0.3", 22, &key(ECDSA)).unwrap(),
            HostKeyCheck::Known
        );
        assert!(matches!(
            hosts.check("10.0.0.3", 22, &key(KEYS[0])).unwrap(),
            HostKeyCheck::Changed { .. }
        ));
        assert!(hosts.forget("10.0.0.3", 22).unwrap());
        assert!(!hosts.forget("10.0.0.3", 22).unwrap());
        assert_eq!(
            hosts.check("10.0.0.3", 22, &key(KEYS[1])).unwrap(),
            HostKeyCheck::Learned
        );
        // The other host's record is untouched.
        assert_eq!(
            hosts.check("10.0.0.4", 22, &key(KEYS[0])).unwrap(),
            HostKeyCheck::Known
        );
        let mode = fs::metadata(hosts.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn hashed_wildcard_negated_and_revoked_lines_are_understood() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = KnownHosts::in_home(dir.path());
        fs::create_dir_all(hosts.path().parent().unwrap()).unwrap();
        // `ssh-keygen -H` of "[10.0.0.5]:2222" with salt "salt-bytes-0001"; comments, blank
        // lines and a certificate authority in between.
        let salt = BASE64.encode(b"salt-bytes-0001");
        let mac = <Hmac<Sha1> as KeyInit>::new_from_slice(b"salt-bytes-0001")
            .unwrap()
            .chain_update(b"[10.0.0.5]:2222")
            .finalize()
            .into_bytes();
        let hash = BASE64.encode(&mac);
        let text = format!(
            "# comment\n\n@cert-authority * {ECDSA}\n|1|{salt}|{hash} {}\n\
             *.lab,!bad.lab {}\n@revoked 10.0.0.6 {}\n",
            KEYS[0], KEYS[1], KEYS[0]
        );
        fs::write(hosts.path(), text).unwrap();
        assert_eq!(
            hosts.check("10.0.0.5", 2222, &key(KEYS[0])).unwrap(),
            HostKeyCheck::Known
        );
        assert!(matches!(
            hosts.check("10.0.0.5", 2222, &key(ECDSA)).unwrap(),
            HostKeyCheck::Changed { line: 4, .. }
        ));
        assert_eq!(
            hosts.check("gpu1.LAB", 22, &key(KEYS[1])).unwrap(),
            HostKeyCheck::Known
        );
        // Negated: nothing on record, learned.
        assert_eq!(
            hosts.check("bad.lab", 22, &key(KEYS[1])).unwrap(),
            HostKeyCheck::Learned
        );
        // Revoked: a record that matches nothing, so the revoked key is refused.
        assert!(matches!(
            hosts.check("10.0.0.6", 22, &key(KEYS[0])).unwrap(),
            HostKeyCheck::Changed { line: 6, .. }
        ));
    }

    #[test]
    fn glob_patterns() {
        assert!(glob(b"10.0.0.1", b"10.0.0.*"));
        assert!(glob(b"a.b.c", b"*.c"));
        assert!(glob(b"abc", b"a?c"));
        assert!(!glob(b"abd", b"a?c"));
        assert!(!glob(b"10.0.0.1", b"10.0.0.1?"));
        assert!(glob(b"aaaaaaaaaaaaaaaaaaaab", b"*a*a*a*a*a*b"));
    }
}
