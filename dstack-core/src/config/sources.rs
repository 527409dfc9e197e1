//! Where a run's code comes from: `repos:` (git repositories) and `files:` (uploaded paths).

use serde::Serialize;

use super::de::{string_enum, Cx, Decode, Fields, Path};
use super::error::ErrorCode;
use super::yaml::{Node, NodeKind};

string_enum! {
    /// What to do when the repo's target directory already exists.
    RepoExistsAction { Error = "error", Skip = "skip" }
}

/// A repository to check out in the job (`repos:` holds at most one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RepoSpec {
    /// A local git checkout to mirror.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_path: Option<String>,
    /// A remote repository URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The branch to check out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// The commit to check out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// Where to put it in the job; relative paths are relative to the working dir.
    pub path: String,
    /// What to do if `path` exists.
    pub if_exists: RepoExistsAction,
}

/// Whether `s` begins with a Windows drive (`C:\` or `C:/`).
fn has_drive_letter(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 3 && b[0].is_ascii_alphabetic() && b[1] == b':' && (b[2] == b'\\' || b[2] == b'/')
}

/// Splits `SOURCE[:TARGET…]` on `:`, keeping Windows drives (`C:\\dir`) in one part.
fn split_source_target(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut rest = s;
    loop {
        let skip = if has_drive_letter(rest) { 2 } else { 0 };
        match rest[skip..].find(':') {
            Some(i) => {
                parts.push(&rest[..skip + i]);
                rest = &rest[skip + i + 1..];
            }
            None => {
                parts.push(rest);
                return parts;
            }
        }
    }
}

impl RepoSpec {
    /// Parses the shorthand `"<local path or url>[:<path>]"`.
    pub fn parse_str(s: &str) -> Result<Self, String> {
        let parts = split_source_target(s);
        let is_url = parts.len() >= 2 && (parts[0].contains('@') || parts[1].starts_with("//"));
        let (source, target) = if is_url {
            match parts.len() {
                2 => (format!("{}:{}", parts[0], parts[1]), None),
                3 => (format!("{}:{}", parts[0], parts[1]), Some(parts[2])),
                _ => return Err(format!("invalid repo: {s}")),
            }
        } else {
            match parts.len() {
                1 => (parts[0].to_string(), None),
                2 => (parts[0].to_string(), Some(parts[1])),
                _ => return Err(format!("invalid repo: {s}")),
            }
        };
        let path = target.unwrap_or(".").to_string();
        check_repo_path(&path)?;
        let (local_path, url) = if is_url {
            (None, Some(source))
        } else {
            (Some(source), None)
        };
        Ok(RepoSpec {
            local_path,
            url,
            branch: None,
            hash: None,
            path,
            if_exists: RepoExistsAction::Error,
        })
    }
}

fn check_repo_path(path: &str) -> Result<(), String> {
    if path.starts_with('~') && !(path == "~" || path.starts_with("~/")) {
        return Err(format!(
            "the ~user syntax is not supported in repo path: {path}"
        ));
    }
    Ok(())
}

impl Decode for RepoSpec {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        if let NodeKind::Str(s) = &node.kind {
            return match RepoSpec::parse_str(s) {
                Ok(spec) => Some(spec),
                Err(message) => {
                    cx.invalid(node, path, message);
                    None
                }
            };
        }
        let mut f = Fields::new(node, cx, path, "repo spec")?;
        let local_path: Option<String> = f.opt(cx, path, "local_path");
        let url: Option<String> = f.opt(cx, path, "url");
        let branch = f.opt(cx, path, "branch");
        let hash = f.opt(cx, path, "hash");
        let target = f.or(cx, path, "path", || ".".to_string());
        let if_exists = f.or(cx, path, "if_exists", || RepoExistsAction::Error);
        f.finish(cx, path);
        match (&local_path, &url) {
            (Some(_), Some(_)) => {
                let message = "`local_path` and `url` are mutually exclusive";
                cx.error(node.mark, path, ErrorCode::Conflict, message);
                return None;
            }
            (None, None) => {
                let message = "either `local_path` or `url` must be specified";
                cx.error(node.mark, path, ErrorCode::MissingField, message);
                return None;
            }
            _ => {}
        }
        let target = target?;
        if let Err(message) = check_repo_path(&target) {
            cx.invalid(node, &path.key("path"), message);
            return None;
        }
        Some(RepoSpec {
            local_path,
            url,
            branch,
            hash,
            path: target,
            if_exists: if_exists?,
        })
    }
}

/// A local file or directory uploaded into the job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FilePathMapping {
    /// The path on the client.
    pub local_path: String,
    /// The path in the job (relative paths are relative to the working dir).
    pub path: String,
}

impl FilePathMapping {
    /// Parses `"local"` (same path in the job) or `"local:path"`.
    pub fn parse_str(s: &str) -> Result<Self, String> {
        let parts = split_source_target(s);
        let (local, target) = match parts.as_slice() {
            [local] => (*local, *local),
            [local, target] => (*local, *target),
            _ => {
                return Err(format!(
                    "invalid file path mapping: {s}; expected LOCAL or LOCAL:PATH"
                ))
            }
        };
        check_unix_path(target)?;
        Ok(FilePathMapping {
            local_path: local.to_string(),
            path: target.to_string(),
        })
    }
}

fn check_unix_path(path: &str) -> Result<(), String> {
    let b = path.as_bytes();
    if path.contains('\\') || (b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':') {
        return Err(format!("`path` must be a Unix file path: {path}"));
    }
    Ok(())
}

impl Decode for FilePathMapping {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let parsed = if let NodeKind::Str(s) = &node.kind {
            FilePathMapping::parse_str(s)
        } else {
            let mut f = Fields::new(node, cx, path, "file path mapping")?;
            let local_path: Option<String> = f.req(cx, path, "local_path");
            let target: Option<String> = f.req(cx, path, "path");
            f.finish(cx, path);
            let (local_path, target) = (local_path?, target?);
            check_unix_path(&target).map(|()| FilePathMapping {
                local_path,
                path: target,
            })
        };
        match parsed {
            Ok(m) => Some(m),
            Err(message) => {
                cx.invalid(node, path, message);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(s: &str) -> (Option<String>, Option<String>, String) {
        let r = RepoSpec::parse_str(s).unwrap();
        (r.local_path, r.url, r.path)
    }

    #[test]
    fn repo_vectors() {
        let local = |l: &str, p: &str| (Some(l.to_string()), None, p.to_string());
        let url = |u: &str, p: &str| (None, Some(u.to_string()), p.to_string());
        assert_eq!(repo("."), local(".", "."));
        assert_eq!(repo("rel/path"), local("rel/path", "."));
        assert_eq!(repo("/abs/path/"), local("/abs/path/", "."));
        assert_eq!(repo(".:/repo"), local(".", "/repo"));
        assert_eq!(repo("C:\\repo"), local("C:\\repo", "."));
        assert_eq!(repo("C:\\repo:/repo"), local("C:\\repo", "/repo"));
        assert_eq!(
            repo("https://example.com/repo.git"),
            url("https://example.com/repo.git", ".")
        );
        assert_eq!(
            repo("https://example.com/repo.git:/repo"),
            url("https://example.com/repo.git", "/repo")
        );
        assert_eq!(
            repo("git@example.com:repo.git"),
            url("git@example.com:repo.git", ".")
        );
        assert_eq!(
            repo("git@example.com:repo.git:/repo"),
            url("git@example.com:repo.git", "/repo")
        );
        assert_eq!(
            RepoSpec::parse_str("./foo:bar:baz").unwrap_err(),
            "invalid repo: ./foo:bar:baz"
        );
        assert!(RepoSpec::parse_str(".:~alice/repo")
            .unwrap_err()
            .contains("not supported"));
        assert_eq!(repo(".:~/repo"), local(".", "~/repo"));
    }

    #[test]
    fn file_mapping_vectors() {
        for s in ["./file", "file", "~/file", "/file"] {
            let m = FilePathMapping::parse_str(s).unwrap();
            assert_eq!((m.local_path.as_str(), m.path.as_str()), (s, s));
        }
        let m = FilePathMapping::parse_str("./foo:./bar").unwrap();
        assert_eq!((m.local_path.as_str(), m.path.as_str()), ("./foo", "./bar"));
        let m = FilePathMapping::parse_str("C:\\dir:dir").unwrap();
        assert_eq!((m.local_path.as_str(), m.path.as_str()), ("C:\\dir", "dir"));
        assert!(FilePathMapping::parse_str("./foo:bar:baz").is_err());
        assert!(FilePathMapping::parse_str("C:\\dir:C:\\")
            .unwrap_err()
            .contains("Unix file path"));
        assert!(FilePathMapping::parse_str("a:d:/path/to")
            .unwrap_err()
            .contains("Unix file path"));
    }
}
