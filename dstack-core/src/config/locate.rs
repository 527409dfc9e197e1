//! Errors found after parsing (at apply: unsupported fields, interpolation), placed at their
//! field in the file's text as parse errors are.

use super::error::{ConfigError, ConfigErrors, ErrorCode};
use super::yaml::{self, Mark, Node, NodeKind};

/// Located errors of `file` (its `text`) from `(field path, code, message)` triples; a path
/// that cannot be found in the text (data given without one) has no line.
pub fn errors(text: &str, file: &str, problems: Vec<(String, ErrorCode, String)>) -> ConfigErrors {
    let root = yaml::load(text).ok();
    let errors = problems
        .into_iter()
        .map(|(path, code, message)| ConfigError {
            mark: root
                .as_ref()
                .and_then(|r| mark_of(r, &path))
                .unwrap_or_default(),
            path,
            code,
            message,
        })
        .collect();
    ConfigErrors {
        file: file.to_string(),
        errors,
    }
}

/// Where the field at `path` (`a.b`, `a[0].b`) is written: the mark of its key, or of the
/// list item for an indexed path.
pub fn mark_of(root: &Node, path: &str) -> Option<Mark> {
    let mut node = root;
    let mut mark = None;
    for part in path.split('.') {
        let (key, indices) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        let (k, v) = node
            .as_map()?
            .iter()
            .rev()
            .find(|(k, _)| k.as_key() == Some(key))?;
        mark = Some(k.mark);
        node = v;
        for index in indices.split(['[', ']']).filter(|s| !s.is_empty()) {
            let i: usize = index.parse().ok()?;
            let NodeKind::Seq(items) = &node.kind else {
                return None;
            };
            node = items.get(i)?;
            mark = Some(node.mark);
        }
    }
    mark
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_found_at_their_keys_and_items() {
        let root = yaml::load("a: 1\nb:\n  c: [x, y]\n  d:\n    - e: 2\n").unwrap();
        let at = |p: &str| mark_of(&root, p).map(|m| (m.line, m.col));
        assert_eq!(at("a"), Some((1, 1)));
        assert_eq!(at("b.c"), Some((3, 3)));
        assert_eq!(at("b.c[1]"), Some((3, 10)));
        assert_eq!(at("b.d[0].e"), Some((5, 7)));
        assert_eq!(at("b.z"), None);
        assert_eq!(at("b.c[5]"), None);
    }
}
