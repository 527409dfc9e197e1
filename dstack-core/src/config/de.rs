//! Decoding located YAML nodes into typed models, collecting every error on the way.
//!
//! The rules follow pydantic's "lax" mode as dstack uses it: numbers are accepted for string
//! fields (and written as Python would print them), numeric strings for numbers, the usual
//! spellings for booleans, and unknown keys are errors. A decoder never stops at the first
//! problem: it records the error in [`Cx`] and returns `None`, so the caller can go on with the
//! sibling fields and report everything at once.

use indexmap::IndexMap;

use super::error::{ConfigError, ErrorCode};
use super::limits;
use super::range::above_limit;
use super::yaml::{py_float_repr, Mark, Node, NodeKind};

/// The error sink shared by every decoder of one file.
#[derive(Debug, Default)]
pub struct Cx {
    errors: Vec<ConfigError>,
    /// Errors past [`limits::MAX_ERRORS`], counted and not kept.
    dropped: usize,
}

impl Cx {
    /// Records an error at `mark`.
    pub fn error(
        &mut self,
        mark: Mark,
        path: &Path<'_>,
        code: ErrorCode,
        message: impl Into<String>,
    ) {
        if self.is_full() {
            self.dropped += 1;
            return;
        }
        self.errors.push(ConfigError {
            mark,
            path: path.render(),
            code,
            message: message.into(),
        });
    }

    /// Records an "invalid value" error at `node`.
    pub fn invalid(&mut self, node: &Node, path: &Path<'_>, message: impl Into<String>) {
        self.error(node.mark, path, ErrorCode::InvalidValue, message);
    }

    /// Records a wrong-type error at `node`: "expected X, found Y".
    pub fn expected(&mut self, node: &Node, path: &Path<'_>, what: &str) {
        let message = format!("expected {what}, found {}", found(node));
        self.error(node.mark, path, ErrorCode::InvalidType, message);
    }

    /// Whether any error has been recorded.
    pub fn has_errors(&self) -> bool {
        !self.errors.is_empty()
    }

    /// The number of errors kept so far (see [`Cx::rewrite_since`]).
    pub fn kept(&self) -> usize {
        self.errors.len()
    }

    /// Rewrites the errors kept after the first `from` (e.g. to put their paths under the
    /// place a document was taken from).
    pub fn rewrite_since(&mut self, from: usize, f: impl FnMut(&mut ConfigError)) {
        self.errors.iter_mut().skip(from).for_each(f);
    }

    /// The number of errors recorded so far.
    pub fn error_count(&self) -> usize {
        self.errors.len() + self.dropped
    }

    /// Whether [`limits::MAX_ERRORS`] errors are kept already: later ones are only counted,
    /// so a decoder may skip the work of describing them.
    pub fn is_full(&self) -> bool {
        self.errors.len() >= limits::MAX_ERRORS
    }

    /// Takes the errors, sorted by position, duplicates removed; when more were found than
    /// are kept, a last error says how many more.
    pub fn into_errors(self) -> Vec<ConfigError> {
        let mut errors = self.errors;
        errors.sort_by_key(|e| (e.mark.line, e.mark.col));
        errors.dedup();
        if self.dropped > 0 {
            let message = format!(
                "{} more errors not shown (at most {} are reported)",
                self.dropped,
                limits::MAX_ERRORS
            );
            errors.push(ConfigError {
                mark: errors.last().map_or_else(Mark::default, |e| e.mark),
                path: String::new(),
                code: ErrorCode::Limit,
                message,
            });
        }
        errors
    }
}

/// Describes a node for "found …" messages, quoting short scalars.
fn found(node: &Node) -> String {
    match &node.kind {
        NodeKind::Seq(_) | NodeKind::Map(_) | NodeKind::Null => node.type_name().to_string(),
        _ => format!("{} {}", node.type_name(), node.preview()),
    }
}

/// One step of a field path.
#[derive(Clone, Copy, Debug)]
pub enum Seg<'a> {
    /// A mapping key.
    Key(&'a str),
    /// A list index.
    Index(usize),
}

/// A field path built on the stack while decoding and rendered only when an error needs it.
#[derive(Clone, Copy, Debug)]
pub struct Path<'a> {
    parent: Option<&'a Path<'a>>,
    seg: Option<Seg<'a>>,
}

impl<'a> Path<'a> {
    /// The path of the document itself.
    pub const ROOT: Path<'static> = Path {
        parent: None,
        seg: None,
    };

    /// The path of a field of this mapping.
    pub fn key(&'a self, key: &'a str) -> Path<'a> {
        Path {
            parent: Some(self),
            seg: Some(Seg::Key(key)),
        }
    }

    /// The path of an item of this list.
    pub fn index(&'a self, index: usize) -> Path<'a> {
        Path {
            parent: Some(self),
            seg: Some(Seg::Index(index)),
        }
    }

    /// Renders as `a.b[0].c`.
    pub fn render(&self) -> String {
        let mut segs = Vec::new();
        let mut cur = Some(self);
        while let Some(p) = cur {
            if let Some(seg) = p.seg {
                segs.push(seg);
            }
            cur = p.parent;
        }
        let mut out = String::new();
        for seg in segs.iter().rev() {
            match seg {
                Seg::Key(k) => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(k);
                }
                Seg::Index(i) => {
                    out.push('[');
                    out.push_str(&i.to_string());
                    out.push(']');
                }
            }
        }
        out
    }
}

/// A type that can be decoded from a YAML node.
pub trait Decode: Sized {
    /// Decodes `node`, recording problems in `cx`; `None` when it could not.
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self>;
}

impl Decode for String {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        match &node.kind {
            NodeKind::Str(s) => Some(s.clone()),
            NodeKind::Int(i) => Some(i.to_string()),
            NodeKind::Float(f) => Some(py_float_repr(*f)),
            _ => {
                cx.expected(node, path, "a string");
                None
            }
        }
    }
}

impl Decode for bool {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let parsed = match &node.kind {
            NodeKind::Bool(b) => Some(*b),
            NodeKind::Int(0) => Some(false),
            NodeKind::Int(1) => Some(true),
            NodeKind::Str(s) => match s.to_ascii_lowercase().as_str() {
                "0" | "off" | "f" | "false" | "n" | "no" => Some(false),
                "1" | "on" | "t" | "true" | "y" | "yes" => Some(true),
                _ => None,
            },
            _ => None,
        };
        if parsed.is_none() {
            cx.expected(node, path, "a boolean (true or false)");
        }
        parsed
    }
}

impl Decode for i64 {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let parsed = match &node.kind {
            NodeKind::Int(i) => Some(*i),
            NodeKind::Bool(b) => Some(i64::from(*b)),
            NodeKind::Float(f) if f.fract() == 0.0 && f.abs() < 9.2e18 => Some(*f as i64),
            NodeKind::Str(s) => s.trim().replace('_', "").parse().ok(),
            _ => None,
        };
        if parsed.is_none() {
            cx.expected(node, path, "an integer");
        }
        parsed
    }
}

impl Decode for f64 {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let parsed = match &node.kind {
            NodeKind::Int(i) => Some(*i as f64),
            NodeKind::Float(f) => Some(*f),
            NodeKind::Bool(b) => Some(f64::from(u8::from(*b))),
            NodeKind::Str(s) => s.trim().parse::<f64>().ok(),
            _ => None,
        };
        match parsed {
            Some(v) if v.is_finite() => Some(v),
            _ => {
                cx.expected(node, path, "a number");
                None
            }
        }
    }
}

impl<T: Decode> Decode for Vec<T> {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let NodeKind::Seq(items) = &node.kind else {
            cx.expected(node, path, "a list");
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match T::decode(item, cx, &path.index(i)) {
                Some(v) => out.push(v),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }
}

impl Decode for IndexMap<String, String> {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        let Some(entries) = node.as_map() else {
            cx.expected(node, path, "a mapping");
            return None;
        };
        let mut out = IndexMap::with_capacity(entries.len());
        let mut ok = true;
        for (k, v) in entries {
            let key = scalar_key(k);
            match String::decode(v, cx, &path.key(&key)) {
                Some(value) => {
                    out.insert(key, value);
                }
                None => ok = false,
            }
        }
        ok.then_some(out)
    }
}

/// The text of a mapping key (numbers and booleans as YAML wrote them).
pub fn scalar_key(node: &Node) -> String {
    match &node.kind {
        NodeKind::Str(s) => s.clone(),
        NodeKind::Int(i) => i.to_string(),
        NodeKind::Float(f) => py_float_repr(*f),
        NodeKind::Bool(b) => if *b { "True" } else { "False" }.to_string(),
        NodeKind::Null => "None".to_string(),
        _ => node.preview(),
    }
}

/// Decodes an integer and checks `min <= value <= max`.
pub fn int_between(node: &Node, cx: &mut Cx, path: &Path<'_>, min: i64, max: i64) -> Option<i64> {
    let v = i64::decode(node, cx, path)?;
    if v < min || v > max {
        let message = if max == i64::MAX {
            format!("must be at least {min}, got {v}")
        } else {
            format!("must be between {min} and {max}, got {v}")
        };
        cx.error(node.mark, path, ErrorCode::OutOfRange, message);
        return None;
    }
    Some(v)
}

/// Decodes an integer of at least `min` (a rule of dstack's, [`ErrorCode::OutOfRange`]) and at
/// most `limit` (a limit of this parser's, [`ErrorCode::Limit`]).
pub fn int_within(node: &Node, cx: &mut Cx, path: &Path<'_>, min: i64, limit: i64) -> Option<i64> {
    let v = int_between(node, cx, path, min, i64::MAX)?;
    if v > limit {
        cx.error(node.mark, path, ErrorCode::Limit, above_limit(v, limit));
        return None;
    }
    Some(v)
}

/// Reads the fields of one mapping and reports the keys nobody asked for.
pub struct Fields<'n> {
    node: &'n Node,
    entries: &'n [(Node, Node)],
    used: Vec<bool>,
    known: Vec<&'static str>,
}

impl<'n> Fields<'n> {
    /// Starts reading `node`, which must be a mapping (`what` names it in the error).
    pub fn new(node: &'n Node, cx: &mut Cx, path: &Path<'_>, what: &str) -> Option<Self> {
        let Some(entries) = node.as_map() else {
            cx.expected(node, path, &format!("a mapping ({what})"));
            return None;
        };
        Some(Fields {
            node,
            entries,
            used: vec![false; entries.len()],
            known: Vec::new(),
        })
    }

    /// The position of the mapping itself.
    pub fn mark(&self) -> Mark {
        self.node.mark
    }

    /// Whether the mapping has `key` (even with a null value).
    pub fn has(&self, key: &str) -> bool {
        self.entries.iter().any(|(k, _)| k.as_key() == Some(key))
    }

    /// Takes the raw node of `key`, if present.
    pub fn take(&mut self, key: &'static str) -> Option<&'n Node> {
        self.known.push(key);
        let i = self
            .entries
            .iter()
            .position(|(k, _)| k.as_key() == Some(key))?;
        self.used[i] = true;
        Some(&self.entries[i].1)
    }

    /// An optional field: absent or null gives `None`.
    pub fn opt<T: Decode>(&mut self, cx: &mut Cx, path: &Path<'_>, key: &'static str) -> Option<T> {
        let node = self.take(key)?;
        if node.is_null() {
            return None;
        }
        T::decode(node, cx, &path.key(key))
    }

    /// An optional field decoded by `f`: absent or null gives `None`.
    pub fn opt_with<T>(
        &mut self,
        cx: &mut Cx,
        path: &Path<'_>,
        key: &'static str,
        f: impl FnOnce(&Node, &mut Cx, &Path<'_>) -> Option<T>,
    ) -> Option<T> {
        let node = self.take(key)?;
        if node.is_null() {
            return None;
        }
        f(node, cx, &path.key(key))
    }

    /// A field with a default: absent gives `default()`, null is an error.
    pub fn or<T: Decode>(
        &mut self,
        cx: &mut Cx,
        path: &Path<'_>,
        key: &'static str,
        default: impl FnOnce() -> T,
    ) -> Option<T> {
        self.or_with(cx, path, key, default, T::decode)
    }

    /// A field with a default decoded by `f`: absent gives `default()`, null is an error.
    pub fn or_with<T>(
        &mut self,
        cx: &mut Cx,
        path: &Path<'_>,
        key: &'static str,
        default: impl FnOnce() -> T,
        f: impl FnOnce(&Node, &mut Cx, &Path<'_>) -> Option<T>,
    ) -> Option<T> {
        match self.take(key) {
            None => Some(default()),
            Some(node) if node.is_null() => {
                cx.error(
                    node.mark,
                    &path.key(key),
                    ErrorCode::InvalidType,
                    "must not be null",
                );
                None
            }
            Some(node) => f(node, cx, &path.key(key)),
        }
    }

    /// A required field: absent or null is an error.
    pub fn req<T: Decode>(&mut self, cx: &mut Cx, path: &Path<'_>, key: &'static str) -> Option<T> {
        self.req_with(cx, path, key, T::decode)
    }

    /// A required field decoded by `f`.
    pub fn req_with<T>(
        &mut self,
        cx: &mut Cx,
        path: &Path<'_>,
        key: &'static str,
        f: impl FnOnce(&Node, &mut Cx, &Path<'_>) -> Option<T>,
    ) -> Option<T> {
        let mark = self.node.mark;
        match self.take(key) {
            None => {
                cx.error(
                    mark,
                    &path.key(key),
                    ErrorCode::MissingField,
                    "field required",
                );
                None
            }
            Some(node) if node.is_null() => {
                cx.error(
                    node.mark,
                    &path.key(key),
                    ErrorCode::InvalidType,
                    "must not be null",
                );
                None
            }
            Some(node) => f(node, cx, &path.key(key)),
        }
    }

    /// Marks every key as read, when the rest of the mapping cannot be judged (e.g. a volume
    /// whose `backend` is unknown).
    pub fn skip_rest(&mut self) {
        self.used.fill(true);
    }

    /// Reports every key that was not taken as an unknown field, suggesting the closest one.
    pub fn finish(self, cx: &mut Cx, path: &Path<'_>) {
        for (i, (k, _)) in self.entries.iter().enumerate() {
            if self.used[i] {
                continue;
            }
            if cx.is_full() {
                cx.error(k.mark, path, ErrorCode::UnknownField, String::new());
                continue;
            }
            let key = scalar_key(k);
            let message = match closest(&key, &self.known) {
                Some(best) => format!("unknown field `{key}`; did you mean `{best}`?"),
                None => format!(
                    "unknown field `{key}`; expected one of: {}",
                    self.known.join(", ")
                ),
            };
            cx.error(k.mark, &path.key(&key), ErrorCode::UnknownField, message);
        }
    }
}

/// The known name closest to `key` by edit distance, if it is close enough to be a typo.
fn closest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    let threshold = 2.max(key.len() / 4);
    // The distance is at least the difference in length: a key much longer than every known
    // name costs nothing (and a huge key no quadratic time).
    let (best, distance) = known
        .iter()
        .filter(|k| key.len().abs_diff(k.len()) <= threshold)
        .map(|k| (*k, edit_distance(key, k)))
        .min_by_key(|(_, d)| *d)?;
    (distance <= threshold && distance < key.len()).then_some(best)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Defines a string enum with its exact spellings, decoding and serialization.
macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* #[doc = concat!("`", $text, "`")] $variant),+
        }

        impl $name {
            /// Every accepted spelling, in declaration order.
            pub const ALL: &'static [&'static str] = &[$($text),+];

            /// The canonical spelling.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// Parses an exact spelling.
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($text => Some($name::$variant),)+ _ => None }
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl $crate::config::de::Decode for $name {
            fn decode(
                node: &$crate::config::yaml::Node,
                cx: &mut $crate::config::de::Cx,
                path: &$crate::config::de::Path<'_>,
            ) -> Option<Self> {
                let text = String::decode(node, cx, path)?;
                let parsed = $name::parse(&text);
                if parsed.is_none() {
                    cx.invalid(node, path, $crate::config::de::one_of_message(&text, Self::ALL));
                }
                parsed
            }
        }
    };
}
pub(crate) use string_enum;

/// "invalid value 'x'; expected one of: a, b, c".
pub fn one_of_message(text: &str, allowed: &[&str]) -> String {
    format!(
        "invalid value '{text}'; expected one of: {}",
        allowed.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::yaml::load;

    #[test]
    fn paths_render_with_dots_and_indices() {
        let root = Path::ROOT;
        let a = root.key("ports");
        let b = a.index(2);
        let c = b.key("local_port");
        assert_eq!(c.render(), "ports[2].local_port");
        assert_eq!(Path::ROOT.render(), "");
    }

    #[test]
    fn unknown_fields_suggest_the_closest_key() {
        let doc = load("namee: x\n").unwrap();
        let mut cx = Cx::default();
        let mut f = Fields::new(&doc, &mut cx, &Path::ROOT, "test").unwrap();
        let _ = f.opt::<String>(&mut cx, &Path::ROOT, "name");
        f.finish(&mut cx, &Path::ROOT);
        let errors = cx.into_errors();
        assert_eq!(
            errors[0].message,
            "unknown field `namee`; did you mean `name`?"
        );
        assert_eq!((errors[0].mark.line, errors[0].mark.col), (1, 1));
    }

    #[test]
    fn scalars_coerce_like_pydantic_lax_mode() {
        let doc = load("a: 8080\nb: 3.5\nc: 'yes'\nd: '42'\ne: true\n").unwrap();
        let mut cx = Cx::default();
        let p = Path::ROOT;
        assert_eq!(
            String::decode(doc.get("a").unwrap(), &mut cx, &p).as_deref(),
            Some("8080")
        );
        assert_eq!(
            String::decode(doc.get("b").unwrap(), &mut cx, &p).as_deref(),
            Some("3.5")
        );
        assert_eq!(bool::decode(doc.get("c").unwrap(), &mut cx, &p), Some(true));
        assert_eq!(i64::decode(doc.get("d").unwrap(), &mut cx, &p), Some(42));
        assert!(!cx.has_errors());
        assert_eq!(String::decode(doc.get("e").unwrap(), &mut cx, &p), None);
        assert_eq!(
            cx.into_errors()[0].message,
            "expected a string, found a boolean true"
        );
    }
}
