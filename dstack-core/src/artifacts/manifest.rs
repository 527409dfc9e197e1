//! What a run's artifacts are at one moment: each file's path, content hash, size and mode
//! (the content itself is kept once per hash, see [`super::ArtifactStore`]).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// One file of a set of artifacts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Its path, relative to the job's working directory (`/`-separated, no `..`).
    pub path: String,
    /// The SHA-256 of its content (lowercase hex).
    pub hash: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its permission bits (`0o644`, `0o755`, …).
    pub mode: u32,
}

/// The artifacts of a run (or of a tag made from local files) at one moment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The run (its id), or `None` for files uploaded with a tag.
    pub run_id: Option<String>,
    /// The run's name.
    pub run_name: Option<String>,
    /// The workflow the run ran, if it ran one.
    #[serde(default)]
    pub workflow: Option<String>,
    /// When it was taken (Unix ms).
    pub saved_at_ms: u64,
    /// Whether it is the run's last: taken after the run ended, never changed again.
    #[serde(default)]
    pub frozen: bool,
    /// The files, by path.
    pub files: Vec<FileEntry>,
}

impl Manifest {
    /// The files whose path is `prefix` or lies below it (every file for `None`).
    pub fn select<'a>(&'a self, prefix: Option<&'a str>) -> impl Iterator<Item = &'a FileEntry> {
        let prefix = prefix
            .map(|p| p.trim_matches('/'))
            .filter(|p| !p.is_empty());
        self.files.iter().filter(move |f| match prefix {
            None => true,
            Some(p) => {
                f.path == p
                    || (f.path.starts_with(p) && f.path.as_bytes().get(p.len()) == Some(&b'/'))
            }
        })
    }

    /// The total size of its files in bytes.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// The hashes among `listed` that are not in `known`, each once, in path order: the
/// content a snapshot has to fetch.
pub fn missing<'a>(listed: &'a [FileEntry], known: &BTreeSet<String>) -> Vec<&'a FileEntry> {
    let mut seen = BTreeSet::new();
    let mut wanted: Vec<&FileEntry> = listed
        .iter()
        .filter(|f| !known.contains(&f.hash) && seen.insert(f.hash.clone()))
        .collect();
    wanted.sort_by(|a, b| a.path.cmp(&b.path));
    wanted
}

/// `path` as an artifact path: relative, `/`-separated, without `.`, `..` or empty parts;
/// `None` when it would leave the directory it is taken from.
pub fn normalize(path: &str) -> Option<String> {
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return None,
            part => parts.push(part),
        }
    }
    (!parts.is_empty() && !path.starts_with('/')).then(|| parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, hash: &str) -> FileEntry {
        FileEntry {
            path: path.into(),
            hash: hash.into(),
            size: 1,
            mode: 0o644,
        }
    }

    #[test]
    fn only_content_not_kept_yet_is_fetched_once_per_hash() {
        let listed = [
            entry("data/b", "h2"),
            entry("data/a", "h1"),
            entry("copy", "h2"),
            entry("old", "h0"),
        ];
        let known = BTreeSet::from(["h0".to_string()]);
        let wanted: Vec<&str> = missing(&listed, &known)
            .iter()
            .map(|f| f.path.as_str())
            .collect();
        assert_eq!(wanted, ["data/a", "data/b"]);
    }

    #[test]
    fn paths_stay_within_their_directory() {
        assert_eq!(normalize("./data//x/").as_deref(), Some("data/x"));
        assert_eq!(normalize("data"), Some("data".to_string()));
        assert_eq!(normalize("../x"), None);
        assert_eq!(normalize("a/../../x"), None);
        assert_eq!(normalize("/etc"), None);
        assert_eq!(normalize("."), None);
    }

    #[test]
    fn a_prefix_selects_a_file_or_a_directory_not_a_name_sharing_its_start() {
        let manifest = Manifest {
            run_id: None,
            run_name: None,
            workflow: None,
            saved_at_ms: 0,
            frozen: false,
            files: vec![entry("data/a", "1"), entry("data2/b", "2"), entry("x", "3")],
        };
        let paths = |p: Option<&str>| -> Vec<String> {
            manifest.select(p).map(|f| f.path.clone()).collect()
        };
        assert_eq!(paths(Some("data/")), ["data/a"]);
        assert_eq!(paths(Some("x")), ["x"]);
        assert_eq!(paths(None).len(), 3);
        assert_eq!(manifest.bytes(), 3);
    }
}
