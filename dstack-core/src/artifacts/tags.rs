//! Tags: names for a finished run's artifacts (`dstack tags add latest RUN`, kept per
//! workflow: `prepare:latest` and `train:latest` are two tags) or for files uploaded from
//! the client (`dstack tags add dataset --artifact data/`, named `:dataset`).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::Manifest;

/// A tag as `depends-on` and the CLI name it: `WORKFLOW:TAG`, `:TAG` (files uploaded with
/// the tag), or `TAG` alone where the workflow is known or does not matter.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TagRef {
    /// The workflow whose run it names; `None` for uploaded files.
    pub workflow: Option<String>,
    /// The tag's name.
    pub name: String,
}

impl TagRef {
    /// Reads `WORKFLOW:TAG` or `:TAG`; an error says what is wrong. `TAG` alone (no colon)
    /// is not a tag reference (in `depends-on` it names a workflow).
    pub fn parse(text: &str) -> Result<TagRef, String> {
        let Some((workflow, name)) = text.split_once(':') else {
            return Err(format!(
                "`{text}` names no tag (write WORKFLOW:TAG, or :TAG)"
            ));
        };
        check_name(name)?;
        let workflow = match workflow {
            "" => None,
            w if is_name(w) => Some(w.to_string()),
            w => return Err(format!("invalid workflow name `{w}`")),
        };
        Ok(TagRef {
            workflow,
            name: name.to_string(),
        })
    }
}

impl fmt::Display for TagRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}",
            self.workflow.as_deref().unwrap_or_default(),
            self.name
        )
    }
}

/// A tag and the artifacts it names (a copy of the run's last manifest, or the uploaded
/// files').
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tag {
    /// Which tag it is.
    #[serde(flatten)]
    pub tag: TagRef,
    /// When it was made (Unix ms).
    pub created_at_ms: u64,
    /// The artifacts.
    pub manifest: Manifest,
}

/// The tag `text` names among `known`: `WORKFLOW:TAG` and `:TAG` as written, `TAG` alone
/// when exactly one workflow (or the uploads) has a tag of that name.
pub fn resolve(text: &str, known: &[TagRef]) -> Result<TagRef, String> {
    let wanted = match text.contains(':') {
        true => vec![TagRef::parse(text)?],
        false => {
            check_name(text)?;
            known.iter().filter(|t| t.name == text).cloned().collect()
        }
    };
    match wanted.as_slice() {
        [one] if known.contains(one) => Ok(one.clone()),
        [] | [_] => Err(format!(
            "there is no tag {text} (dstack tags list shows the tags)"
        )),
        many => Err(format!(
            "tag {text} is ambiguous: {} (name one of them)",
            many.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Whether `name` may name a tag or a workflow in a tag: 1–64 characters of letters, digits,
/// `-`, `_` and `.`, starting with a letter or digit.
fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.len() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// `Ok` when `name` may name a tag, else why not.
pub fn check_name(name: &str) -> Result<(), String> {
    if is_name(name) {
        Ok(())
    } else {
        Err(format!(
            "invalid tag name `{name}`: use 1-64 letters, digits, `-`, `_` or `.`, starting \
             with a letter or digit"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_name_a_workflow_and_a_tag_or_a_tag_alone() {
        let r = TagRef::parse("prepare:latest").unwrap();
        assert_eq!(
            (r.workflow.as_deref(), r.name.as_str()),
            (Some("prepare"), "latest")
        );
        assert_eq!(r.to_string(), "prepare:latest");
        let r = TagRef::parse(":dataset").unwrap();
        assert_eq!(
            (r.workflow.clone(), r.to_string()),
            (None, ":dataset".to_string())
        );
        for bad in [
            "prepare", "prepare:", "a:b:c", "../x:y", "x:../y", ":-a", ":a b",
        ] {
            assert!(TagRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bare_name_finds_its_one_tag_and_refuses_an_ambiguous_or_missing_one() {
        let known = [
            TagRef::parse("prepare:latest").unwrap(),
            TagRef::parse("train:latest").unwrap(),
            TagRef::parse(":dataset").unwrap(),
        ];
        assert_eq!(resolve("dataset", &known).unwrap(), known[2]);
        assert_eq!(resolve("train:latest", &known).unwrap(), known[1]);
        let ambiguous = resolve("latest", &known).unwrap_err();
        assert!(
            ambiguous.contains("prepare:latest, train:latest"),
            "{ambiguous}"
        );
        assert!(resolve("nope", &known).unwrap_err().contains("no tag nope"));
        assert!(resolve("app:latest", &known).is_err());
    }

    #[test]
    fn tag_names_are_short_and_plain() {
        assert!(check_name("v1.0_rc-2").is_ok());
        assert!(check_name(&"a".repeat(64)).is_ok());
        assert!(check_name(&"a".repeat(65)).is_err());
        for bad in ["", ".hidden", "a/b", "a:b", "ä"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
