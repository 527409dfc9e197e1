//! Small value types shared by several configurations: entity references, Unix users,
//! Python versions, backend types and tags.

use indexmap::IndexMap;
use serde::Serialize;

use super::de::{one_of_message, string_enum, Cx, Decode, Fields, Path};
use super::yaml::{py_float_repr, Node, NodeKind};

/// A reference to a fleet or gateway, optionally in another project (`project/name`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EntityReference {
    /// The entity name.
    pub name: String,
    /// The project, when not the current one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
}

impl EntityReference {
    /// Parses `name` or `project/name`.
    pub fn parse_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid reference '{s}'; expected NAME or PROJECT/NAME");
        match s.split('/').collect::<Vec<_>>().as_slice() {
            [name] if !name.is_empty() => Ok(EntityReference {
                name: name.to_string(),
                project: None,
            }),
            [project, name] if !project.is_empty() && !name.is_empty() => Ok(EntityReference {
                name: name.to_string(),
                project: Some(project.to_string()),
            }),
            _ => Err(bad()),
        }
    }
}

impl Decode for EntityReference {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        if let NodeKind::Map(_) = node.kind {
            let mut f = Fields::new(node, cx, path, "reference")?;
            let name = f.req(cx, path, "name");
            let project = f.opt(cx, path, "project");
            f.finish(cx, path);
            return Some(EntityReference {
                name: name?,
                project,
            });
        }
        let text = String::decode(node, cx, path)?;
        match EntityReference::parse_str(&text) {
            Ok(r) => Some(r),
            Err(message) => {
                cx.invalid(node, path, message);
                None
            }
        }
    }
}

/// Checks a Docker-style `user[:group]` (names or non-negative numeric ids).
pub fn check_unix_user(s: &str) -> Result<(), String> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() > 2 {
        return Err("invalid user format: too many parts".to_string());
    }
    if parts[0].is_empty() {
        return Err("invalid user format: empty user name or id".to_string());
    }
    if parts[0].starts_with('-') && parts[0][1..].bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("invalid user format: negative uid {}", parts[0]));
    }
    if let Some(group) = parts.get(1) {
        if group.is_empty() {
            return Err("invalid user format: empty group name or id".to_string());
        }
        if group.starts_with('-') && group[1..].bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("invalid user format: negative gid {group}"));
        }
    }
    Ok(())
}

/// Decodes `user:`.
pub fn decode_user(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<String> {
    let text = String::decode(node, cx, path)?;
    match check_unix_user(&text) {
        Ok(()) => Some(text),
        Err(message) => {
            cx.invalid(node, path, message);
            None
        }
    }
}

string_enum! {
    /// A Python version of the default image.
    PythonVersion {
        Py39 = "3.9", Py310 = "3.10", Py311 = "3.11", Py312 = "3.12", Py313 = "3.13",
        Py314 = "3.14", Py315 = "3.15",
    }
}

/// Decodes `python:`, undoing YAML's float trap (`3.10` is read as the float 3.1).
pub fn decode_python(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<PythonVersion> {
    let text = match &node.kind {
        NodeKind::Float(f) => {
            let repr = py_float_repr(*f);
            if repr == "3.1" {
                "3.10".to_string()
            } else {
                repr
            }
        }
        _ => String::decode(node, cx, path)?,
    };
    let parsed = PythonVersion::parse(&text);
    if parsed.is_none() {
        cx.invalid(node, path, one_of_message(&text, PythonVersion::ALL));
    }
    parsed
}

string_enum! {
    /// A backend (cloud or on-prem provider).
    BackendType {
        AmdDevCloud = "amddevcloud", Aws = "aws", Azure = "azure", CloudRift = "cloudrift",
        Crusoe = "crusoe", Cudo = "cudo", DataCrunch = "datacrunch", Daytona = "daytona",
        DigitalOcean = "digitalocean", Dstack = "dstack", Gcp = "gcp", HotAisle = "hotaisle",
        JarvisLabs = "jarvislabs", Kubernetes = "kubernetes", Lambda = "lambda", Lium = "lium",
        Remote = "remote", Nebius = "nebius", Oci = "oci", Runpod = "runpod", Seeweb = "seeweb",
        TensorDock = "tensordock", VastAi = "vastai", Verda = "verda", Vultr = "vultr",
        Slurm = "slurm", Local = "local",
    }
}

/// Resource tags: keys `[_-a-zA-Z0-9]{1,60}`, values `[a-zA-Z0-9 .:/=_-+@]{0,256}`.
pub type Tags = IndexMap<String, String>;

/// Decodes and checks `tags:`.
pub fn decode_tags(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Tags> {
    let tags = Tags::decode(node, cx, path)?;
    let mut ok = true;
    for (k, v) in &tags {
        let key_ok = (1..=60).contains(&k.len())
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        let value_ok = v.len() <= 256
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b" .:/=_-+@".contains(&b));
        if !key_ok {
            let message =
                format!("invalid tag key '{k}'; keys are 1-60 characters of a-z A-Z 0-9 _ -");
            cx.invalid(node, &path.key(k), message);
            ok = false;
        } else if !value_ok {
            let message = format!(
                "invalid tag value '{v}'; values are at most 256 characters of a-z A-Z 0-9 space . : / = _ - + @"
            );
            cx.invalid(node, &path.key(k), message);
            ok = false;
        }
    }
    ok.then_some(tags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_user_vectors() {
        for ok in [
            "0",
            "1000",
            "debian",
            "1000:2000",
            "1000:wheel",
            "root:0",
            "admin:wheel",
        ] {
            assert_eq!(check_unix_user(ok), Ok(()), "{ok}");
        }
        let err = |s| check_unix_user(s).unwrap_err();
        assert_eq!(err("1000:1000:"), "invalid user format: too many parts");
        assert_eq!(
            err("user:group:foo:bar"),
            "invalid user format: too many parts"
        );
        assert_eq!(err(""), "invalid user format: empty user name or id");
        assert_eq!(err(":group"), "invalid user format: empty user name or id");
        assert_eq!(err("-1"), "invalid user format: negative uid -1");
        assert_eq!(err("-1:group"), "invalid user format: negative uid -1");
        assert_eq!(err("user:"), "invalid user format: empty group name or id");
        assert_eq!(err("1000:-1000"), "invalid user format: negative gid -1000");
    }

    #[test]
    fn entity_reference_vectors() {
        let r = EntityReference::parse_str("fleet").unwrap();
        assert_eq!((r.project, r.name.as_str()), (None, "fleet"));
        let r = EntityReference::parse_str("project/fleet").unwrap();
        assert_eq!(
            (r.project.as_deref(), r.name.as_str()),
            (Some("project"), "fleet")
        );
        for bad in ["", "/name", "name/", "/", "a/b/c"] {
            assert!(EntityReference::parse_str(bad).is_err(), "{bad}");
        }
    }
}
