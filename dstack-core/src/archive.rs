//! Archives of the code and files a job starts with (`repos:` and `files:`).
//!
//! The client packs each source into a tar archive named by the SHA-256 of its bytes: a
//! repo's files as git lists them (tracked and untracked-but-not-ignored, with their content
//! on disk now, so uncommitted changes are in), a `files:` path whole (as git lists it when it
//! lies in a work tree, so `.gitignore` and `.dstackignore` apply). Entries are written in a fixed order with
//! fixed times and owners, so the same content always packs to the same archive: a host
//! receives each archive once, however many jobs start from it (the agent keeps them by
//! hash). The agent unpacks an archive into the job's directory ([`unpack`]) or hands it to
//! the container engine under its target path ([`prefixed`]).

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The environment variable that sets the largest archive a run may upload, in bytes (`0`:
/// no limit); dstack's name for its limit on uploaded code.
pub const LIMIT_ENV: &str = "DSTACK_SERVER_CODE_UPLOAD_LIMIT";

/// The largest `files:` entry by default: dstack's 2 MiB.
pub const FILES_LIMIT: u64 = 2 * 1024 * 1024;

/// The largest repo archive by default: 100 MiB. dstack's 2 MiB limit applies to the diff it
/// uploads beside a clone of the repo's remote; this archive holds every file of the repo (a
/// host needs no access to the remote), so its limit is larger.
pub const REPO_LIMIT: u64 = 100 * 1024 * 1024;

/// One archive a job starts with, and where it goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Archive {
    /// The SHA-256 of the archive's bytes (lowercase hex): its name everywhere it is kept.
    pub hash: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// The directory it is unpacked into: absolute, `~` or `~/…` (the job user's home), or
    /// relative to the job's working directory.
    pub path: String,
    /// What to do when that directory already holds something.
    pub if_exists: IfExists,
    /// Whether this is the run's repo (its directory is `DSTACK_REPO_DIR`).
    #[serde(default)]
    pub repo: bool,
}

/// A repo given by URL, cloned with git on the host before the job starts, with the
/// credentials registered by `dstack init`, else the host's own (its credential helpers,
/// `~/.ssh`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoClone {
    /// What `git clone` is given.
    pub url: String,
    /// The branch to check out (default: the remote's default branch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// The commit to check out (default: the branch's latest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// Clone only the branch (`git clone --single-branch`).
    #[serde(default)]
    pub single_branch: bool,
    /// The directory it is cloned into, as [`Archive::path`].
    pub path: String,
    /// What to do when that directory already holds something.
    pub if_exists: IfExists,
    /// The credentials `dstack init` registered for the repo (the host's own git
    /// credentials otherwise); never journaled by the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creds: Option<crate::repos::RepoCreds>,
}

/// What unpacking does with a target directory that is not empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IfExists {
    /// Fail the job (a repo's default, as dstack's `if_exists: error`).
    Error,
    /// Leave the directory as it is and unpack nothing (`if_exists: skip`).
    Skip,
    /// Unpack over what is there (`files:`).
    Merge,
}

impl From<crate::config::sources::RepoExistsAction> for IfExists {
    fn from(action: crate::config::sources::RepoExistsAction) -> Self {
        match action {
            crate::config::sources::RepoExistsAction::Error => IfExists::Error,
            crate::config::sources::RepoExistsAction::Skip => IfExists::Skip,
        }
    }
}

/// Why an archive could not be packed or unpacked.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The source directory is not in a git work tree (repos must be).
    #[error("{0} is not a git repository (a directory that is not one goes in `files`)")]
    NotGit(PathBuf),
    /// The source does not exist.
    #[error("{0} does not exist")]
    Missing(PathBuf),
    /// The archive would be larger than the limit.
    #[error(
        "{what} packs to more than {limit} bytes, the upload limit (set {LIMIT_ENV} to raise \
         it, 0 for none; leave files out with .gitignore)",
        what = what.display(),
        limit = limit
    )]
    TooLarge {
        /// The source packed.
        what: PathBuf,
        /// The limit in bytes.
        limit: u64,
    },
    /// The target directory holds something and `if_exists` is `error`.
    #[error("{0} exists and is not empty (the repo's `if_exists: skip` leaves it as it is)")]
    NotEmpty(PathBuf),
    /// git failed.
    #[error("git ls-files in {dir} failed: {message}", dir = dir.display())]
    Git {
        /// Where it ran.
        dir: PathBuf,
        /// What it said.
        message: String,
    },
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// An archive packed into a file of its own.
#[derive(Debug)]
pub struct Packed {
    /// The SHA-256 of its bytes (lowercase hex).
    pub hash: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// The file holding it (the caller moves or removes it).
    pub file: PathBuf,
}

/// The upload limit: [`LIMIT_ENV`] when set to a number (`0`: none), else `default`.
pub fn limit_from_env(default: u64) -> u64 {
    match std::env::var(LIMIT_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        Some(0) => u64::MAX,
        Some(limit) => limit,
        None => default,
    }
}

/// Packs the repo whose work tree holds `dir` (the files of `dir` and below, as git lists
/// them: tracked and untracked-but-not-ignored, with their current content) into a new file
/// in `temp_dir`.
pub fn pack_repo(dir: &Path, temp_dir: &Path, limit: u64) -> Result<Packed, ArchiveError> {
    if !dir.is_dir() {
        return Err(ArchiveError::Missing(dir.to_path_buf()));
    }
    let files = git_files(dir)?.ok_or_else(|| ArchiveError::NotGit(dir.to_path_buf()))?;
    let entries = files.into_iter().map(|rel| (dir.join(&rel), rel)).collect();
    pack(dir, entries, temp_dir, limit)
}

/// Packs the file or directory `source` into a new file in `temp_dir`, to be unpacked into
/// the directory that holds `target` (a file is named `target`'s last component there; a
/// directory's contents go into `target` itself). Returns the archive and the directory it
/// unpacks into.
pub fn pack_path(
    source: &Path,
    target: &str,
    temp_dir: &Path,
    limit: u64,
) -> Result<(Packed, String), ArchiveError> {
    let meta = fs::metadata(source).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => ArchiveError::Missing(source.to_path_buf()),
        _ => ArchiveError::Io(e),
    })?;
    if meta.is_dir() {
        let files = match git_files(source)? {
            Some(files) => files,
            None => walk(source)?,
        };
        let entries = files
            .into_iter()
            .map(|rel| (source.join(&rel), rel))
            .collect();
        return Ok((pack(source, entries, temp_dir, limit)?, target.to_string()));
    }
    let trimmed = target.trim_end_matches('/');
    let (parent, name) = match trimmed.rsplit_once('/') {
        Some(("", name)) => ("/", name),
        Some((parent, name)) => (parent, name),
        None if trimmed == "~" => ("~", ""),
        None => (".", trimmed),
    };
    let name = if name.is_empty() {
        source.file_name().map(PathBuf::from).unwrap_or_default()
    } else {
        PathBuf::from(name)
    };
    let packed = pack(source, vec![(source.to_path_buf(), name)], temp_dir, limit)?;
    Ok((packed, parent.to_string()))
}

/// Packs every file under `dir` (`.git` included: a clone goes into a container whole) into
/// a new file in `temp_dir`.
pub fn pack_tree(dir: &Path, temp_dir: &Path, limit: u64) -> Result<Packed, ArchiveError> {
    let entries = walk(dir)?
        .into_iter()
        .map(|rel| (dir.join(&rel), rel))
        .collect();
    pack(dir, entries, temp_dir, limit)
}

/// The files git lists in `dir` (relative to it, sorted), or `None` when `dir` is not in a
/// work tree.
fn git_files(dir: &Path) -> Result<Option<Vec<PathBuf>>, ArchiveError> {
    let inside = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "--is-inside-work-tree"])
        .output();
    match inside {
        Ok(out) if out.status.success() && out.stdout.starts_with(b"true") => {}
        // No git, or not a work tree.
        _ => return Ok(None),
    }
    let listed = ls_files(dir, &["--cached", "--others", "--exclude-standard"])?;
    // What `.dstackignore` files name is left out too, tracked or not (as dstack does).
    let ignored = ls_files(
        dir,
        &[
            "--cached",
            "--others",
            "--ignored",
            "--exclude-per-directory=.dstackignore",
        ],
    )?;
    Ok(Some(listed.difference(&ignored).cloned().collect()))
}

/// `git ls-files -z ARGS` in `dir`.
fn ls_files(dir: &Path, args: &[&str]) -> Result<BTreeSet<PathBuf>, ArchiveError> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["ls-files", "-z"])
        .args(args)
        .output()?;
    if !out.status.success() {
        return Err(ArchiveError::Git {
            dir: dir.to_path_buf(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out
        .stdout
        .split(|b| *b == 0)
        .filter(|name| !name.is_empty())
        .map(|name| PathBuf::from(String::from_utf8_lossy(name).into_owned()))
        .collect())
}

/// Every file and symlink under `dir` (relative to it, sorted); symlinks are not followed.
fn walk(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(rel) = pending.pop() {
        for entry in fs::read_dir(dir.join(&rel))? {
            let entry = entry?;
            let path = rel.join(entry.file_name());
            if entry.file_type()?.is_dir() {
                pending.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Writes `entries` (source file, name in the archive), in order, into a new file in
/// `temp_dir`: files and symlinks only (a listed path that is gone — a deleted tracked file
/// — or is a directory — a submodule — is left out), with fixed owners and times.
fn pack(
    source: &Path,
    entries: Vec<(PathBuf, PathBuf)>,
    temp_dir: &Path,
    limit: u64,
) -> Result<Packed, ArchiveError> {
    fs::create_dir_all(temp_dir)?;
    let file = temp_dir.join(format!(".pack-{}", uuid::Uuid::new_v4().simple()));
    let written = write_tar(&file, entries, limit);
    match written {
        Ok((hash, bytes)) => Ok(Packed { hash, bytes, file }),
        Err(e) => {
            let _ = fs::remove_file(&file);
            Err(match e.kind() {
                io::ErrorKind::FileTooLarge => ArchiveError::TooLarge {
                    what: source.to_path_buf(),
                    limit,
                },
                _ => ArchiveError::Io(e),
            })
        }
    }
}

/// [`pack`]'s writing: the hash and size of what was written.
fn write_tar(
    file: &Path,
    entries: Vec<(PathBuf, PathBuf)>,
    limit: u64,
) -> io::Result<(String, u64)> {
    let out = Hashing {
        inner: BufWriter::new(File::create(file)?),
        hasher: Sha256::new(),
        bytes: 0,
        limit,
    };
    let mut tar = tar::Builder::new(out);
    tar.mode(tar::HeaderMode::Deterministic);
    tar.follow_symlinks(false);
    for (path, name) in entries {
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => continue,
            Ok(_) => tar.append_path_with_name(&path, &name)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        }
    }
    let mut out = tar.into_inner()?;
    out.flush()?;
    out.inner.get_ref().sync_all()?;
    Ok((hex(&out.hasher.finalize()), out.bytes))
}

/// A writer that hashes and counts what goes through it, and fails past a limit.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
    limit: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.bytes.saturating_add(buf.len() as u64) > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                "over the limit",
            ));
        }
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Lowercase hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 (lowercase hex) of everything `reader` yields.
pub fn hash_of(mut reader: impl Read) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return Ok(hex(&hasher.finalize())),
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Whether `hash` is a SHA-256 in lowercase hex (an archive's name; safe as a file name).
pub fn is_hash(hash: &str) -> bool {
    hash.len() == 64 && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Whether unpacking into `dir` finds it in the way: it exists and holds something (a lone
/// `lost+found`, as a fresh filesystem has, does not count).
pub fn occupied(dir: &Path) -> io::Result<bool> {
    match fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                if entry?.file_name() != "lost+found" {
                    return Ok(true);
                }
            }
            Ok(false)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Unpacks the archive in file `blob` into `dir` (created if missing) as `if_exists` says;
/// whether anything was unpacked. Entries that would land outside `dir` are refused.
pub fn unpack(blob: &Path, dir: &Path, if_exists: IfExists) -> Result<bool, ArchiveError> {
    if if_exists != IfExists::Merge && occupied(dir)? {
        return match if_exists {
            IfExists::Skip => Ok(false),
            _ => Err(ArchiveError::NotEmpty(dir.to_path_buf())),
        };
    }
    fs::create_dir_all(dir)?;
    let mut archive = tar::Archive::new(io::BufReader::new(File::open(blob)?));
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    archive.unpack(dir)?;
    Ok(true)
}

/// The archive in file `blob` with every entry moved under `prefix` (an absolute
/// directory): what a container engine unpacks at `/` to put the archive's files in
/// `prefix` (it makes the missing directories on the way; those that exist keep their
/// modes).
pub fn prefixed(blob: &Path, prefix: &str) -> io::Result<Vec<u8>> {
    let base = PathBuf::from(prefix.trim_start_matches('/'));
    let mut out = tar::Builder::new(Vec::new());
    out.mode(tar::HeaderMode::Deterministic);
    let mut archive = tar::Archive::new(io::BufReader::new(File::open(blob)?));
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        // Only names within the prefix (as `unpack` keeps entries within its directory).
        let within = path.components().all(|c| {
            matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        });
        if !within {
            continue;
        }
        let name = base.join(path);
        let mut header = entry.header().clone();
        match entry.header().entry_type() {
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let target = entry.link_name()?.unwrap_or_default().into_owned();
                out.append_link(&mut header, &name, target)?;
            }
            _ => out.append_data(&mut header, &name, &mut entry)?,
        }
    }
    out.into_inner()
}

/// Archives kept by their hash in a directory (the engine's `server/archives/`): what runs
/// uploaded, read again when their jobs start on a host that lacks them.
#[derive(Clone, Debug)]
pub struct ArchiveStore {
    dir: PathBuf,
}

impl ArchiveStore {
    /// The archives in `dir` (created when the first is kept).
    pub fn new(dir: PathBuf) -> Self {
        ArchiveStore { dir }
    }

    /// The file of the archive with `hash`, if it is kept.
    pub fn find(&self, hash: &str) -> Option<PathBuf> {
        let path = self.dir.join(hash);
        (is_hash(hash) && path.is_file()).then_some(path)
    }

    /// Keeps `packed` (moving its file here, or copying it when it is on another filesystem).
    pub fn keep_packed(&self, packed: &Packed) -> io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        let path = self.dir.join(&packed.hash);
        if fs::rename(&packed.file, &path).is_err() {
            self.keep(&packed.hash, &fs::read(&packed.file)?)?;
            let _ = fs::remove_file(&packed.file);
        }
        Ok(())
    }

    /// Keeps `bytes` as the archive with `hash`: refused (`InvalidData`) unless that is their
    /// SHA-256.
    pub fn keep(&self, hash: &str, bytes: &[u8]) -> io::Result<()> {
        if !is_hash(hash) || hash_of(bytes)? != hash {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the archive's SHA-256 is not {hash}"),
            ));
        }
        fs::create_dir_all(&self.dir)?;
        let temp = self
            .dir
            .join(format!(".{hash}.{}", uuid::Uuid::new_v4().simple()));
        fs::write(&temp, bytes)?;
        fs::rename(&temp, self.dir.join(hash)).inspect_err(|_| {
            let _ = fs::remove_file(&temp);
        })
    }
}

impl ArchiveStore {
    /// Removes the archives older than `ttl` (since they were kept or last asked for) that
    /// are not in `needed` (those of unfinished runs), and uploads left half-written as long.
    pub fn prune(&self, needed: &std::collections::HashSet<String>, ttl: std::time::Duration) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|at| at.elapsed().is_ok_and(|age| age > ttl));
            if stale && !needed.contains(&name) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// Marks the archive with `hash` as asked for now (it is kept `ttl` from now); whether it
    /// is kept.
    pub fn touch(&self, hash: &str) -> bool {
        let Some(path) = self.find(hash) else {
            return false;
        };
        let _ = File::options()
            .append(true)
            .open(&path)
            .and_then(|f| f.set_modified(std::time::SystemTime::now()));
        true
    }
}

/// Where an archive's `path` lands: absolute as it is, `~`/`~/…` from `home`, anything else
/// from `working_dir`.
pub fn target_dir(path: &str, working_dir: &str, home: &str) -> String {
    let joined = if path == "~" {
        home.to_string()
    } else if let Some(rest) = path.strip_prefix("~/") {
        format!("{}/{rest}", home.trim_end_matches('/'))
    } else if path.starts_with('/') {
        path.to_string()
    } else if path == "." || path.is_empty() {
        working_dir.to_string()
    } else {
        format!(
            "{}/{}",
            working_dir.trim_end_matches('/'),
            path.trim_start_matches("./")
        )
    };
    match joined.trim_end_matches('/') {
        "" => "/".to_string(),
        trimmed => trimmed.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git(dir: &Path, args: &[&str]) {
        let done = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
            .args(args)
            .output()
            .unwrap();
        assert!(done.status.success(), "{done:?}");
    }

    fn listing(blob: &Path) -> Vec<(String, String)> {
        let mut archive = tar::Archive::new(File::open(blob).unwrap());
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let name = e.path().unwrap().display().to_string();
                let mut text = String::new();
                let _ = e.read_to_string(&mut text);
                (name, text)
            })
            .collect()
    }

    #[test]
    fn a_repo_packs_what_git_lists_with_uncommitted_changes_and_the_same_content_packs_alike() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        fs::create_dir_all(repo.join("src")).unwrap();
        git(&repo, &["init", "-q"]);
        fs::write(repo.join(".gitignore"), "*.log\n").unwrap();
        fs::write(repo.join("src/a.py"), "committed").unwrap();
        fs::write(repo.join("src/skip.py"), "tracked, left out").unwrap();
        fs::write(repo.join("gone.txt"), "x").unwrap();
        fs::write(repo.join(".dstackignore"), "data/\nskip.py\n").unwrap();
        git(&repo, &["add", "."]);
        git(&repo, &["commit", "-qm", "one"]);
        fs::write(repo.join("src/a.py"), "changed").unwrap();
        fs::write(repo.join("new.txt"), "untracked").unwrap();
        fs::write(repo.join("debug.log"), "ignored").unwrap();
        fs::remove_file(repo.join("gone.txt")).unwrap();
        // `.dstackignore` leaves out tracked and untracked files alike.
        fs::create_dir_all(repo.join("data")).unwrap();
        fs::write(repo.join("data/big.bin"), "untracked, left out").unwrap();
        let temp = dir.path().join("tmp");

        let packed = pack_repo(&repo, &temp, REPO_LIMIT).unwrap();
        assert_eq!(
            listing(&packed.file),
            [
                (".dstackignore".to_string(), "data/\nskip.py\n".to_string()),
                (".gitignore".to_string(), "*.log\n".to_string()),
                ("new.txt".to_string(), "untracked".to_string()),
                ("src/a.py".to_string(), "changed".to_string()),
            ]
        );
        assert_eq!(
            packed.hash,
            hash_of(File::open(&packed.file).unwrap()).unwrap()
        );
        assert_eq!(packed.bytes, fs::metadata(&packed.file).unwrap().len());

        // Touching a file changes no byte of the archive; changing one does.
        fs::write(repo.join("new.txt"), "untracked").unwrap();
        assert_eq!(
            pack_repo(&repo, &temp, REPO_LIMIT).unwrap().hash,
            packed.hash
        );
        fs::write(repo.join("new.txt"), "edited").unwrap();
        assert_ne!(
            pack_repo(&repo, &temp, REPO_LIMIT).unwrap().hash,
            packed.hash
        );
    }

    #[test]
    fn packing_refuses_what_is_not_a_repo_or_too_large_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        fs::create_dir_all(&plain).unwrap();
        fs::write(plain.join("big"), vec![b'x'; 10_000]).unwrap();
        let temp = dir.path().join("tmp");
        assert!(matches!(
            pack_repo(&plain, &temp, REPO_LIMIT),
            Err(ArchiveError::NotGit(_))
        ));
        let err = pack_path(&plain, "/data", &temp, 4096).unwrap_err();
        assert!(
            matches!(err, ArchiveError::TooLarge { limit: 4096, .. }),
            "{err}"
        );
        assert!(err.to_string().contains(LIMIT_ENV), "{err}");
        assert!(matches!(
            pack_path(&plain.join("nope"), "x", &temp, 4096),
            Err(ArchiveError::Missing(_))
        ));
        assert_eq!(
            fs::read_dir(&temp).unwrap().count(),
            0,
            "no packed file left"
        );
    }

    #[test]
    fn a_file_unpacks_under_its_target_name_and_a_directory_into_its_target() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::write(src.join("sub/b.txt"), "b").unwrap();
        fs::write(dir.path().join("a.txt"), "a").unwrap();
        let temp = dir.path().join("tmp");

        let (file, parent) =
            pack_path(&dir.path().join("a.txt"), "conf/x.txt", &temp, 4096).unwrap();
        assert_eq!(parent, "conf");
        let (tree, target) = pack_path(&src, "/data/in", &temp, 4096).unwrap();
        assert_eq!(target, "/data/in");
        assert_eq!(
            pack_path(&dir.path().join("a.txt"), "/y", &temp, 4096)
                .unwrap()
                .1,
            "/"
        );

        let job = dir.path().join("job");
        assert!(unpack(&file.file, &job.join(&parent), IfExists::Merge).unwrap());
        assert!(unpack(&tree.file, &job.join("in"), IfExists::Merge).unwrap());
        assert_eq!(fs::read_to_string(job.join("conf/x.txt")).unwrap(), "a");
        assert_eq!(fs::read_to_string(job.join("in/sub/b.txt")).unwrap(), "b");

        // A repo goes only into an empty directory, unless told to skip.
        assert!(matches!(
            unpack(&tree.file, &job, IfExists::Error),
            Err(ArchiveError::NotEmpty(_))
        ));
        assert!(!unpack(&tree.file, &job, IfExists::Skip).unwrap());
        fs::create_dir_all(job.join("fresh/lost+found")).unwrap();
        assert!(unpack(&tree.file, &job.join("fresh"), IfExists::Error).unwrap());
    }

    #[test]
    fn a_prefixed_archive_holds_the_entries_under_the_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("a.txt"), "a").unwrap();
        let (tree, _) = pack_path(&src, "x", &dir.path().join("tmp"), 4096).unwrap();
        let bytes = prefixed(&tree.file, "/workflow/code").unwrap();
        let names: Vec<String> = tar::Archive::new(&bytes[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["workflow/code/a.txt"]);
    }

    #[test]
    fn targets_resolve_from_the_working_dir_or_home() {
        assert_eq!(target_dir(".", "/w", "/h"), "/w");
        assert_eq!(target_dir("./code/", "/w", "/h"), "/w/code");
        assert_eq!(target_dir("~", "/w", "/h"), "/h");
        assert_eq!(target_dir("~/x", "/w", "/h/"), "/h/x");
        assert_eq!(target_dir("/abs/", "/w", "/h"), "/abs");
        assert_eq!(target_dir("/", "/w", "/h"), "/");
    }

    #[test]
    fn a_store_keeps_archives_only_under_their_hash() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArchiveStore::new(dir.path().join("archives"));
        let hash = hash_of(&b"abc"[..]).unwrap();
        assert!(store.find(&hash).is_none());
        assert!(store.keep(&"0".repeat(64), b"abc").is_err());
        store.keep(&hash, b"abc").unwrap();
        assert_eq!(fs::read(store.find(&hash).unwrap()).unwrap(), b"abc");
        assert!(store.find("../x").is_none());

        // Old archives go unless a run still needs them; one asked for again stays.
        let (old, needed) = (
            hash_of(&b"old"[..]).unwrap(),
            hash_of(&b"needed"[..]).unwrap(),
        );
        store.keep(&old, b"old").unwrap();
        store.keep(&needed, b"needed").unwrap();
        let week_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(8 * 86400);
        for h in [&old, &needed, &hash] {
            let file = File::options()
                .append(true)
                .open(store.find(h).unwrap())
                .unwrap();
            file.set_modified(week_ago).unwrap();
        }
        assert!(store.touch(&hash));
        let keep = std::collections::HashSet::from([needed.clone()]);
        store.prune(&keep, std::time::Duration::from_secs(7 * 86400));
        assert!(store.find(&old).is_none());
        assert!(store.find(&needed).is_some() && store.find(&hash).is_some());
        assert!(!store.touch(&old));
    }

    #[test]
    fn hashes_are_checked_for_shape() {
        assert!(is_hash(&"a".repeat(64)));
        assert!(!is_hash(&"A".repeat(64)));
        assert!(!is_hash("../etc/passwd"));
    }
}
