//! A located YAML document tree with PyYAML's (YAML 1.1) scalar resolution.
//!
//! dstack reads configurations with PyYAML's `safe_load`, which follows YAML 1.1: `on`/`off`/
//! `yes`/`no` are booleans, `0755` is octal, `1:30` is sexagesimal, and `1e3` (no dot) is a
//! string. To accept and reject exactly what dstack does, plain scalars are resolved here with
//! the same rules instead of YAML 1.2's. Every node remembers where it starts in the file so
//! that errors can point at it.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A position in the source text: 1-based line and column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Mark {
    /// Line number, starting at 1.
    pub line: usize,
    /// Column number, starting at 1.
    pub col: usize,
}

impl Mark {
    fn from_marker(m: Marker) -> Self {
        Mark {
            line: m.line(),
            col: m.col() + 1,
        }
    }
}

/// A YAML value with its source position.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// The value.
    pub kind: NodeKind,
    /// Where the value starts.
    pub mark: Mark,
}

/// The value of a [`Node`], resolved as PyYAML's `SafeLoader` resolves it.
#[derive(Clone, Debug, PartialEq)]
pub enum NodeKind {
    /// `null`, `~` or an empty value.
    Null,
    /// A YAML 1.1 boolean (`true`, `yes`, `on`, …).
    Bool(bool),
    /// An integer (decimal, `0b`, octal `0…`, `0x`, or sexagesimal `1:30`).
    Int(i64),
    /// A float (requires a dot, as in YAML 1.1), or an integer too large for `i64`.
    Float(f64),
    /// Any other scalar, including every quoted or block scalar.
    Str(String),
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in document order. Later duplicates of a key replace earlier ones.
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// A node tree for a JSON value built in code (not read from a file): every mark is
    /// [`Mark::default`] (line 0), which error messages render as a field path only.
    pub fn from_json(value: &serde_json::Value) -> Node {
        use serde_json::Value;
        let kind = match value {
            Value::Null => NodeKind::Null,
            Value::Bool(b) => NodeKind::Bool(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => NodeKind::Int(i),
                None => NodeKind::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => NodeKind::Str(s.clone()),
            Value::Array(items) => NodeKind::Seq(items.iter().map(Node::from_json).collect()),
            Value::Object(entries) => NodeKind::Map(
                entries
                    .iter()
                    .map(|(k, v)| {
                        (
                            Node::from_json(&Value::String(k.clone())),
                            Node::from_json(v),
                        )
                    })
                    .collect(),
            ),
        };
        Node {
            kind,
            mark: Mark::default(),
        }
    }

    /// A short human name of the node's type, used in error messages.
    pub fn type_name(&self) -> &'static str {
        match self.kind {
            NodeKind::Null => "null",
            NodeKind::Bool(_) => "a boolean",
            NodeKind::Int(_) => "an integer",
            NodeKind::Float(_) => "a number",
            NodeKind::Str(_) => "a string",
            NodeKind::Seq(_) => "a list",
            NodeKind::Map(_) => "a mapping",
        }
    }

    /// The string value of a scalar key (keys are strings in every dstack model).
    pub fn as_key(&self) -> Option<&str> {
        match &self.kind {
            NodeKind::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Whether this node is `null`.
    pub fn is_null(&self) -> bool {
        matches!(self.kind, NodeKind::Null)
    }

    /// The entries of a mapping node.
    pub fn as_map(&self) -> Option<&[(Node, Node)]> {
        match &self.kind {
            NodeKind::Map(m) => Some(m),
            _ => None,
        }
    }

    /// Looks a key up in a mapping node.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.as_map()?
            .iter()
            .rev()
            .find(|(k, _)| k.as_key() == Some(key))
            .map(|(_, v)| v)
    }

    /// Renders the node back as a compact, flow-style string for messages.
    pub fn preview(&self) -> String {
        let mut out = String::new();
        self.write_preview(&mut out);
        if out.chars().count() > 60 {
            let cut: String = out.chars().take(57).collect();
            return cut + "...";
        }
        out
    }

    fn write_preview(&self, out: &mut String) {
        match &self.kind {
            NodeKind::Null => out.push_str("null"),
            NodeKind::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            NodeKind::Int(i) => out.push_str(&i.to_string()),
            NodeKind::Float(f) => out.push_str(&py_float_repr(*f)),
            NodeKind::Str(s) => {
                out.push('\'');
                out.push_str(s);
                out.push('\'');
            }
            NodeKind::Seq(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    item.write_preview(out);
                }
                out.push(']');
            }
            NodeKind::Map(entries) => {
                out.push('{');
                for (i, (k, v)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    k.write_preview(out);
                    out.push_str(": ");
                    v.write_preview(out);
                }
                out.push('}');
            }
        }
    }
}

/// A YAML syntax error (the document could not be read at all).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntaxError {
    /// Where the scanner stopped.
    pub mark: Mark,
    /// What it found wrong.
    pub message: String,
}

/// Parses the first document of `text`. An empty document is `null`.
pub fn load(text: &str) -> Result<Node, SyntaxError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    parser.load(&mut builder, false).map_err(|e| SyntaxError {
        mark: Mark::from_marker(*e.marker()),
        message: e.info().to_string(),
    })?;
    if let Some(message) = builder.error {
        return Err(SyntaxError {
            mark: builder.error_mark,
            message,
        });
    }
    Ok(builder.root.unwrap_or(Node {
        kind: NodeKind::Null,
        mark: Mark { line: 1, col: 1 },
    }))
}

/// Containers being built, innermost last.
enum Open {
    Seq(Node, usize),
    Map(Node, usize, Option<Node>),
}

#[derive(Default)]
struct Builder {
    stack: Vec<Open>,
    anchors: HashMap<usize, Node>,
    root: Option<Node>,
    error: Option<String>,
    error_mark: Mark,
}

impl Builder {
    fn push_value(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => {
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
            Some(Open::Seq(seq, _)) => {
                if let NodeKind::Seq(items) = &mut seq.kind {
                    items.push(node);
                }
            }
            Some(Open::Map(map, _, pending)) => match pending.take() {
                None => {
                    // A block mapping's start event is marked after its first key: the mapping
                    // starts where that key does.
                    let empty = matches!(&map.kind, NodeKind::Map(entries) if entries.is_empty());
                    if empty && (node.mark.line, node.mark.col) < (map.mark.line, map.mark.col) {
                        map.mark = node.mark;
                    }
                    *pending = Some(node)
                }
                Some(key) => {
                    if let NodeKind::Map(entries) = &mut map.kind {
                        insert_entry(entries, key, node);
                    }
                }
            },
        }
    }

    fn fail(&mut self, mark: Mark, message: &str) {
        if self.error.is_none() {
            self.error = Some(message.to_string());
            self.error_mark = mark;
        }
    }
}

/// Inserts a mapping entry, resolving `<<` merge keys and replacing duplicate keys.
fn insert_entry(entries: &mut Vec<(Node, Node)>, key: Node, value: Node) {
    if key.as_key() == Some("<<") {
        let sources: Vec<Node> = match value.kind {
            NodeKind::Map(_) => vec![value],
            NodeKind::Seq(items) => items,
            _ => vec![],
        };
        for source in sources {
            if let NodeKind::Map(merged) = source.kind {
                for (k, v) in merged {
                    if !entries.iter().any(|(existing, _)| existing.kind == k.kind) {
                        entries.push((k, v));
                    }
                }
            }
        }
        return;
    }
    if let Some(slot) = entries.iter_mut().find(|(k, _)| k.kind == key.kind) {
        *slot = (key, value);
    } else {
        entries.push((key, value));
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, marker: Marker) {
        let mark = Mark::from_marker(marker);
        match ev {
            Event::Scalar(value, style, anchor, tag) => {
                // An empty value (`key:` and nothing) is marked on the next token; point it at
                // its key instead.
                let mark = match self.stack.last() {
                    Some(Open::Map(_, _, Some(key)))
                        if value.is_empty() && style == TScalarStyle::Plain =>
                    {
                        key.mark
                    }
                    _ => mark,
                };
                let kind = resolve_scalar(value, style, tag.as_ref());
                let node = Node { kind, mark };
                if anchor > 0 {
                    self.anchors.insert(anchor, node.clone());
                }
                self.push_value(node);
            }
            Event::SequenceStart(anchor, _) => {
                self.stack.push(Open::Seq(
                    Node {
                        kind: NodeKind::Seq(Vec::new()),
                        mark,
                    },
                    anchor,
                ));
            }
            Event::MappingStart(anchor, _) => {
                let node = Node {
                    kind: NodeKind::Map(Vec::new()),
                    mark,
                };
                self.stack.push(Open::Map(node, anchor, None));
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor) = match self.stack.pop() {
                    Some(Open::Seq(node, anchor)) | Some(Open::Map(node, anchor, _)) => {
                        (node, anchor)
                    }
                    None => return,
                };
                if anchor > 0 {
                    self.anchors.insert(anchor, node.clone());
                }
                self.push_value(node);
            }
            Event::Alias(id) => match self.anchors.get(&id) {
                Some(node) => {
                    let node = Node {
                        kind: node.kind.clone(),
                        mark,
                    };
                    self.push_value(node);
                }
                None => self.fail(mark, "found undefined alias"),
            },
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
    }
}

fn resolve_scalar(value: String, style: TScalarStyle, tag: Option<&Tag>) -> NodeKind {
    if let Some(tag) = tag {
        if tag.handle == "!!" || tag.handle == "tag:yaml.org,2002:" {
            let resolved = resolve_plain(&value);
            return match tag.suffix.as_str() {
                "str" => NodeKind::Str(value),
                "null" => NodeKind::Null,
                "bool" | "int" | "float" => resolved,
                _ => NodeKind::Str(value),
            };
        }
        return NodeKind::Str(value);
    }
    if style != TScalarStyle::Plain {
        return NodeKind::Str(value);
    }
    resolve_plain(&value)
}

/// Resolves a plain scalar with PyYAML's implicit resolvers.
fn resolve_plain(s: &str) -> NodeKind {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return NodeKind::Null,
        "yes" | "Yes" | "YES" | "true" | "True" | "TRUE" | "on" | "On" | "ON" => {
            return NodeKind::Bool(true)
        }
        "no" | "No" | "NO" | "false" | "False" | "FALSE" | "off" | "Off" | "OFF" => {
            return NodeKind::Bool(false)
        }
        _ => {}
    }
    if let Some(kind) = resolve_int(s) {
        return kind;
    }
    if let Some(f) = resolve_float(s) {
        return NodeKind::Float(f);
    }
    NodeKind::Str(s.to_string())
}

fn split_sign(s: &str) -> (f64, &str) {
    match s.as_bytes().first() {
        Some(b'-') => (-1.0, &s[1..]),
        Some(b'+') => (1.0, &s[1..]),
        _ => (1.0, s),
    }
}

fn all(s: &str, pred: impl Fn(u8) -> bool) -> bool {
    !s.is_empty() && s.bytes().all(pred)
}

/// Parses digits (underscores ignored) in `radix`; `None` when not all are digits.
fn digits_value(s: &str, radix: u32) -> Option<f64> {
    if radix == 10 {
        return s.replace('_', "").parse().ok();
    }
    let mut v = 0f64;
    let mut any = false;
    for c in s.chars() {
        if c == '_' {
            continue;
        }
        v = v * f64::from(radix) + f64::from(c.to_digit(radix)?);
        any = true;
    }
    any.then_some(v)
}

fn int_kind(sign: f64, magnitude: f64, exact: Option<i64>) -> NodeKind {
    match exact {
        Some(i) if sign < 0.0 => NodeKind::Int(-i),
        Some(i) => NodeKind::Int(i),
        None => NodeKind::Float(sign * magnitude),
    }
}

/// Exact integer value of digits in `radix`, when it fits in `i64`.
fn digits_exact(s: &str, radix: u32) -> Option<i64> {
    let cleaned: String = s.chars().filter(|c| *c != '_').collect();
    i64::from_str_radix(&cleaned, radix).ok()
}

fn resolve_int(s: &str) -> Option<NodeKind> {
    let (sign, body) = split_sign(s);
    if body.is_empty() {
        return None;
    }
    if let Some(bin) = body.strip_prefix("0b") {
        if all(bin, |b| b == b'0' || b == b'1' || b == b'_') {
            return Some(int_kind(sign, digits_value(bin, 2)?, digits_exact(bin, 2)));
        }
        return None;
    }
    if let Some(hex) = body.strip_prefix("0x") {
        if all(hex, |b| b.is_ascii_hexdigit() || b == b'_') {
            return Some(int_kind(
                sign,
                digits_value(hex, 16)?,
                digits_exact(hex, 16),
            ));
        }
        return None;
    }
    if body == "0" {
        return Some(NodeKind::Int(0));
    }
    if body.len() > 1 && body.starts_with('0') {
        let oct = &body[1..];
        if all(oct, |b| (b'0'..=b'7').contains(&b) || b == b'_') {
            return Some(int_kind(sign, digits_value(oct, 8)?, digits_exact(oct, 8)));
        }
        return None;
    }
    if !body.as_bytes()[0].is_ascii_digit() || body.starts_with('0') {
        return None;
    }
    if all(body, |b| b.is_ascii_digit() || b == b'_') {
        return Some(int_kind(
            sign,
            digits_value(body, 10)?,
            digits_exact(body, 10),
        ));
    }
    // Sexagesimal: 1:30 == 90.
    let mut parts = body.split(':');
    let head = parts.next()?;
    if !all(head, |b| b.is_ascii_digit() || b == b'_') {
        return None;
    }
    let mut value = digits_value(head, 10)?;
    let mut count = 0;
    for part in parts {
        if !is_sexagesimal_part(part) {
            return None;
        }
        value = value * 60.0 + digits_value(part, 10)?;
        count += 1;
    }
    if count == 0 {
        return None;
    }
    let exact = (value <= i64::MAX as f64).then_some(value as i64);
    Some(int_kind(sign, value, exact))
}

fn is_sexagesimal_part(part: &str) -> bool {
    let b = part.as_bytes();
    match b.len() {
        1 => b[0].is_ascii_digit(),
        2 => (b'0'..=b'5').contains(&b[0]) && b[1].is_ascii_digit(),
        _ => false,
    }
}

fn resolve_float(s: &str) -> Option<f64> {
    match s {
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => return Some(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => return Some(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Some(f64::NAN),
        _ => {}
    }
    // `.5` (no sign allowed by PyYAML's pattern) or `[-+]?D[D_]*.[D_]*([eE][-+]D+)?`
    // or sexagesimal `[-+]?D[D_]*(:[0-5]?D)+.[D_]*`.
    if let Some(rest) = s.strip_prefix('.') {
        let (frac, exp) = split_exponent(rest)?;
        if !all(frac, |b| b.is_ascii_digit() || b == b'_') {
            return None;
        }
        return parse_cleaned(&format!("0.{frac}{exp}"));
    }
    let (sign, body) = split_sign(s);
    if !body.as_bytes().first()?.is_ascii_digit() {
        return None;
    }
    let dot = body.find('.')?;
    let (int_part, rest) = (&body[..dot], &body[dot + 1..]);
    if int_part.contains(':') {
        let mut parts = int_part.split(':');
        let head = parts.next()?;
        if !all(head, |b| b.is_ascii_digit() || b == b'_') {
            return None;
        }
        let mut value = digits_value(head, 10)?;
        for part in parts {
            if !is_sexagesimal_part(part) {
                return None;
            }
            value = value * 60.0 + digits_value(part, 10)?;
        }
        if !rest.bytes().all(|b| b.is_ascii_digit() || b == b'_') {
            return None;
        }
        let frac = parse_cleaned(&format!("0.{rest}0"))?;
        return Some(sign * (value + frac));
    }
    if !all(int_part, |b| b.is_ascii_digit() || b == b'_') {
        return None;
    }
    let (frac, exp) = split_exponent(rest)?;
    if !frac.bytes().all(|b| b.is_ascii_digit() || b == b'_') {
        return None;
    }
    parse_cleaned(&format!("{int_part}.{frac}0{exp}")).map(|v| sign * v)
}

/// Splits `frac[eE][-+]digits`; the exponent needs an explicit sign in YAML 1.1.
fn split_exponent(s: &str) -> Option<(&str, &str)> {
    match s.find(['e', 'E']) {
        None => Some((s, "")),
        Some(i) => {
            let exp = &s[i + 1..];
            let valid = exp.len() >= 2
                && (exp.starts_with('-') || exp.starts_with('+'))
                && exp[1..].bytes().all(|b| b.is_ascii_digit());
            valid.then(|| (&s[..i], &s[i..]))
        }
    }
}

fn parse_cleaned(s: &str) -> Option<f64> {
    s.replace('_', "").parse().ok()
}

/// Formats a float as Python's `repr(float)` does (`3.0`, `0.1`, `1e+16`, `inf`).
pub fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if f == 0.0 {
        return if f.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    // Shortest round-trip digits and the decimal exponent.
    let sci = format!("{:e}", f);
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let negative = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if negative { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        let body = if exp >= 0 {
            let int_len = exp + 1;
            if n <= int_len {
                format!("{}{}.0", digits, "0".repeat((int_len - n) as usize))
            } else {
                format!(
                    "{}.{}",
                    &digits[..int_len as usize],
                    &digits[int_len as usize..]
                )
            }
        } else {
            format!("0.{}{}", "0".repeat((-exp - 1) as usize), digits)
        };
        format!("{sign}{body}")
    } else {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{first}{frac}e{esign}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar(s: &str) -> NodeKind {
        load(&format!("v: {s}"))
            .unwrap()
            .get("v")
            .unwrap()
            .kind
            .clone()
    }

    #[test]
    fn resolves_yaml_1_1_scalars() {
        assert_eq!(scalar("on"), NodeKind::Bool(true));
        assert_eq!(scalar("off"), NodeKind::Bool(false));
        assert_eq!(scalar("No"), NodeKind::Bool(false));
        assert_eq!(scalar("0755"), NodeKind::Int(493));
        assert_eq!(scalar("0x1F"), NodeKind::Int(31));
        assert_eq!(scalar("1_000"), NodeKind::Int(1000));
        assert_eq!(scalar("1:30"), NodeKind::Int(90));
        assert_eq!(scalar("-2"), NodeKind::Int(-2));
        assert_eq!(scalar("3.10"), NodeKind::Float(3.1));
        assert_eq!(scalar("1e3"), NodeKind::Str("1e3".into()));
        assert_eq!(scalar("1.0e+3"), NodeKind::Float(1000.0));
        assert_eq!(scalar(".5"), NodeKind::Float(0.5));
        assert_eq!(scalar("'on'"), NodeKind::Str("on".into()));
        assert_eq!(scalar("8000:80"), NodeKind::Str("8000:80".into()));
        assert_eq!(scalar("~"), NodeKind::Null);
        assert_eq!(scalar("!!str 12"), NodeKind::Str("12".into()));
        assert_eq!(scalar("99999999999999999999"), NodeKind::Float(1e20));
    }

    #[test]
    fn formats_floats_like_python() {
        assert_eq!(py_float_repr(3.0), "3.0");
        assert_eq!(py_float_repr(3.1), "3.1");
        assert_eq!(py_float_repr(0.0001), "0.0001");
        assert_eq!(py_float_repr(0.00001), "1e-05");
        assert_eq!(py_float_repr(1e16), "1e+16");
        assert_eq!(py_float_repr(123456.5), "123456.5");
        assert_eq!(py_float_repr(-2.5), "-2.5");
    }

    #[test]
    fn records_positions_and_merges() {
        let doc = load("a: 1\nb:\n  - x\n  - &y {k: v}\nc: *y\nd:\n  <<: *y\n  z: 2\n").unwrap();
        assert_eq!(doc.get("b").unwrap().mark, Mark { line: 3, col: 3 });
        assert_eq!(doc.get("a").unwrap().mark, Mark { line: 1, col: 4 });
        assert_eq!(
            doc.get("c").unwrap().get("k").unwrap().kind,
            NodeKind::Str("v".into())
        );
        assert_eq!(
            doc.get("d").unwrap().get("k").unwrap().kind,
            NodeKind::Str("v".into())
        );
    }

    #[test]
    fn reports_syntax_errors_with_position() {
        let err = load("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.mark.line >= 1, "{err:?}");
        assert!(load("a: *nope\n").is_err());
    }
}
