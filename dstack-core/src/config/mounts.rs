//! `volumes:` entries — network volumes (`name:/path`) and instance paths (`/host:/path`).

use serde::Serialize;

use super::de::{Cx, Decode, Fields, Path};
use super::yaml::{Node, NodeKind};

/// One or several volume names (any one of them is attached).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum VolumeNames {
    /// A single volume.
    One(String),
    /// Alternatives, e.g. one volume per region.
    Any(Vec<String>),
}

/// A mount point of a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum MountPoint {
    /// A network volume (`type: volume`) mounted at `path`.
    Volume {
        /// The volume name(s); may contain `${{ dstack.node_rank }}`.
        name: VolumeNames,
        /// The absolute path inside the job.
        path: String,
    },
    /// A directory of the instance mounted at `path`.
    Instance {
        /// The absolute path on the instance.
        instance_path: String,
        /// The absolute path inside the job.
        path: String,
        /// When true, backends without instance volumes skip the mount instead of failing.
        optional: bool,
    },
}

/// Normalizes an absolute path: `/path/./to///dir/` → `/path/to/dir`.
pub fn normalize_abs_path(path: &str) -> Result<String, String> {
    if path.is_empty() {
        return Err("empty path".to_string());
    }
    if !path.starts_with('/') {
        return Err(format!("path must be absolute: {path}"));
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(format!(".. are not allowed: {path}")),
            p => parts.push(p),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

fn checked_path(node: &Node, text: &str, cx: &mut Cx, path: &Path<'_>) -> Option<String> {
    match normalize_abs_path(text) {
        Ok(p) => Some(p),
        Err(message) => {
            cx.invalid(node, path, message);
            None
        }
    }
}

fn abs_path(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<String> {
    let text = String::decode(node, cx, path)?;
    checked_path(node, &text, cx, path)
}

impl Decode for MountPoint {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        match &node.kind {
            NodeKind::Str(s) => {
                let parts: Vec<&str> = s.split(':').collect();
                if parts.len() != 2 {
                    let message = format!(
                        "invalid mount point format: {s}; expected VOLUME_NAME:/path or /instance/path:/path"
                    );
                    cx.invalid(node, path, message);
                    return None;
                }
                let target = checked_path(node, parts[1], cx, &path.key("path"));
                if parts[0].contains('/') || parts[0].starts_with('.') {
                    let source = checked_path(node, parts[0], cx, &path.key("instance_path"));
                    Some(MountPoint::Instance {
                        instance_path: source?,
                        path: target?,
                        optional: false,
                    })
                } else {
                    Some(MountPoint::Volume {
                        name: VolumeNames::One(parts[0].to_string()),
                        path: target?,
                    })
                }
            }
            NodeKind::Map(_) if node.get("instance_path").is_some() => {
                let mut f = Fields::new(node, cx, path, "instance mount")?;
                let instance_path = f.req_with(cx, path, "instance_path", abs_path);
                let target = f.req_with(cx, path, "path", abs_path);
                let optional = f.or(cx, path, "optional", || false);
                f.finish(cx, path);
                Some(MountPoint::Instance {
                    instance_path: instance_path?,
                    path: target?,
                    optional: optional?,
                })
            }
            NodeKind::Map(_) => {
                let mut f = Fields::new(node, cx, path, "volume mount")?;
                let name = f.req_with(cx, path, "name", |n, cx, p| match &n.kind {
                    NodeKind::Seq(_) => Vec::<String>::decode(n, cx, p).map(VolumeNames::Any),
                    _ => String::decode(n, cx, p).map(VolumeNames::One),
                });
                let target = f.req_with(cx, path, "path", abs_path);
                f.finish(cx, path);
                Some(MountPoint::Volume {
                    name: name?,
                    path: target?,
                })
            }
            _ => {
                cx.expected(
                    node,
                    path,
                    "a mount point (name:/path, /host/path:/path or a mapping)",
                );
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::yaml::load;

    fn mount(text: &str) -> Result<String, String> {
        let doc = load(&format!("v: {text}")).unwrap();
        let mut cx = Cx::default();
        match MountPoint::decode(doc.get("v").unwrap(), &mut cx, &Path::ROOT) {
            Some(m) if !cx.has_errors() => Ok(serde_json::to_string(&m).unwrap()),
            _ => Err(cx.into_errors()[0].message.clone()),
        }
    }

    #[test]
    fn mount_point_vectors() {
        assert_eq!(
            mount("my-vol:/path/./to///dir/").unwrap(),
            r#"{"name":"my-vol","path":"/path/to/dir"}"#
        );
        assert_eq!(
            mount("/host/.//path/:/run//./path").unwrap(),
            r#"{"instance_path":"/host/path","path":"/run/path","optional":false}"#
        );
        assert_eq!(
            mount("/host:/run/").unwrap(),
            r#"{"instance_path":"/host","path":"/run","optional":false}"#
        );
        assert_eq!(
            mount("{name: [a, b], path: /data}").unwrap(),
            r#"{"name":["a","b"],"path":"/data"}"#
        );
        for bad in [
            "my-vol",
            "my-vol:/run:ro",
            "/path",
            "/host/path:/run/path:ro",
        ] {
            assert!(
                mount(bad)
                    .unwrap_err()
                    .starts_with("invalid mount point format"),
                "{bad}"
            );
        }
        assert_eq!(mount("'vol:'").unwrap_err(), "empty path");
        for bad in ["vol:rel/path", "path/to:/run", "./path:/run", "path/:/run"] {
            assert!(
                mount(bad).unwrap_err().starts_with("path must be absolute"),
                "{bad}"
            );
        }
        assert!(mount("vol:/path/../to")
            .unwrap_err()
            .starts_with(".. are not allowed"));
    }
}
