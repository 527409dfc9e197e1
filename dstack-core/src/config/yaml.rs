//! A located YAML document tree with PyYAML's (YAML 1.1) scalar resolution.
//!
//! dstack reads configurations with PyYAML's `safe_load`, which follows YAML 1.1: `on`/`off`/
//! `yes`/`no` are booleans, `0755` is octal, `1:30` is sexagesimal, and `1e3` (no dot) is a
//! string. To accept and reject exactly what dstack does, plain scalars are resolved here with
//! the same rules instead of YAML 1.2's. Every node remembers where it starts in the file so
//! that errors can point at it.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use super::error::ErrorCode;
use super::limits;

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

/// The longest [`Node::preview`], in characters.
const PREVIEW_CHARS: usize = 60;

/// The longest prefix of `s` of at most `bytes` bytes that ends on a character boundary.
fn prefix_within(s: &str, bytes: usize) -> &str {
    let mut end = bytes.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
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

    /// The node's value as JSON (what [`Node::from_json`] reads back); a mapping key that is
    /// not a string is written as its scalar's text.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match &self.kind {
            NodeKind::Null => Value::Null,
            NodeKind::Bool(b) => Value::Bool(*b),
            NodeKind::Int(i) => Value::from(*i),
            NodeKind::Float(f) => Value::from(*f),
            NodeKind::Str(s) => Value::String(s.clone()),
            NodeKind::Seq(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            NodeKind::Map(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| {
                        let key = match k.to_json() {
                            Value::String(s) => s,
                            other => other.to_string(),
                        };
                        (key, v.to_json())
                    })
                    .collect(),
            ),
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
        if out.chars().count() > PREVIEW_CHARS {
            let cut: String = out.chars().take(PREVIEW_CHARS - 3).collect();
            return cut + "...";
        }
        out
    }

    /// Writes the node, stopping soon after [`PREVIEW_CHARS`] characters (a preview of a
    /// large document costs no more than a small one).
    fn write_preview(&self, out: &mut String) {
        if out.len() > PREVIEW_CHARS * 4 {
            return;
        }
        match &self.kind {
            NodeKind::Null => out.push_str("null"),
            NodeKind::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            NodeKind::Int(i) => out.push_str(&i.to_string()),
            NodeKind::Float(f) => out.push_str(&py_float_repr(*f)),
            NodeKind::Str(s) => {
                out.push('\'');
                let room = PREVIEW_CHARS * 4 + 4 - out.len().min(PREVIEW_CHARS * 4);
                out.push_str(prefix_within(s, room));
                out.push('\'');
            }
            NodeKind::Seq(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if out.len() > PREVIEW_CHARS * 4 {
                        break;
                    }
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
                    if out.len() > PREVIEW_CHARS * 4 {
                        break;
                    }
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

/// Why a document could not be read at all: a YAML syntax error, or a limit of
/// [`super::limits`] (size, depth, values, alias expansion) exceeded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadError {
    /// Where the scanner stopped, or where the limit was crossed.
    pub mark: Mark,
    /// [`ErrorCode::Syntax`] or [`ErrorCode::Limit`].
    pub code: ErrorCode,
    /// What it found wrong.
    pub message: String,
}

/// Parses the first document of `text`. An empty document is `null`.
///
/// Reading is bounded: a text over [`limits::MAX_TEXT_BYTES`], nesting deeper than
/// [`limits::MAX_DEPTH`], or more than [`limits::MAX_NODES`] values or
/// [`limits::MAX_SCALAR_BYTES`] of scalar text once aliases are expanded is refused where the
/// limit is crossed, before anything beyond it is built. Events are pulled one at a time (no
/// recursion), and duplicate keys are found through a hash index, so time and memory stay
/// linear in the size of what is kept.
pub fn load(text: &str) -> Result<Node, LoadError> {
    if text.len() > limits::MAX_TEXT_BYTES {
        return Err(LoadError {
            mark: Mark { line: 1, col: 1 },
            code: ErrorCode::Limit,
            message: format!(
                "the configuration is {} bytes, more than the limit of {} bytes",
                text.len(),
                limits::MAX_TEXT_BYTES
            ),
        });
    }
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    loop {
        let (event, marker) = parser.next_token().map_err(|e| {
            let mark = Mark::from_marker(*e.marker());
            // The scanner looks ahead for keys and stops at 255 flow levels, which it may
            // reach before the parser passes the depth limit.
            match e.info() {
                "recursion limit exceeded" => LoadError {
                    mark,
                    code: ErrorCode::Limit,
                    message: too_deep_message(),
                },
                info => LoadError {
                    mark,
                    code: ErrorCode::Syntax,
                    message: info.to_string(),
                },
            }
        })?;
        // Only the first document is read.
        if matches!(event, Event::StreamEnd | Event::DocumentEnd) {
            break;
        }
        builder.on_event(event, marker);
        if let Some(error) = builder.error.take() {
            return Err(error);
        }
    }
    Ok(builder.root.unwrap_or(Node {
        kind: NodeKind::Null,
        mark: Mark { line: 1, col: 1 },
    }))
}

fn too_deep_message() -> String {
    format!(
        "lists and mappings nested more than {} levels deep (the limit)",
        limits::MAX_DEPTH
    )
}

/// What a subtree costs once built: its values and the bytes of its scalars.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Cost {
    nodes: usize,
    bytes: usize,
}

/// A mapping key as a hash key, equal exactly when the keys' [`NodeKind`]s are equal. Lists,
/// mappings and NaN as keys have none: they never equal another key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum KeyId {
    Null,
    Bool(bool),
    Int(i64),
    Float(u64),
    Str(String),
}

impl KeyId {
    fn of(kind: &NodeKind) -> Option<KeyId> {
        Some(match kind {
            NodeKind::Null => KeyId::Null,
            NodeKind::Bool(b) => KeyId::Bool(*b),
            NodeKind::Int(i) => KeyId::Int(*i),
            NodeKind::Float(f) if f.is_nan() => return None,
            // -0.0 == 0.0
            NodeKind::Float(f) => KeyId::Float((f + 0.0).to_bits()),
            NodeKind::Str(s) => KeyId::Str(s.clone()),
            NodeKind::Seq(_) | NodeKind::Map(_) => return None,
        })
    }
}

/// A mapping being built: its entries and where each key is among them.
#[derive(Default)]
struct MapEntries {
    entries: Vec<(Node, Node)>,
    index: HashMap<KeyId, usize>,
}

impl MapEntries {
    /// Adds an entry, resolving `<<` merge keys and replacing duplicate keys.
    fn insert(&mut self, key: Node, value: Node) {
        if key.as_key() == Some("<<") {
            let sources: Vec<Node> = match value.kind {
                NodeKind::Map(_) => vec![value],
                NodeKind::Seq(items) => items,
                _ => vec![],
            };
            for source in sources {
                if let NodeKind::Map(merged) = source.kind {
                    for (k, v) in merged {
                        if self.position(&k.kind).is_none() {
                            self.push(k, v);
                        }
                    }
                }
            }
            return;
        }
        match self.position(&key.kind) {
            Some(i) => self.entries[i] = (key, value),
            None => self.push(key, value),
        }
    }

    fn position(&self, key: &NodeKind) -> Option<usize> {
        self.index.get(&KeyId::of(key)?).copied()
    }

    fn push(&mut self, key: Node, value: Node) {
        if let Some(id) = KeyId::of(&key.kind) {
            self.index.insert(id, self.entries.len());
        }
        self.entries.push((key, value));
    }
}

/// A list or mapping being built.
enum Container {
    Seq(Vec<Node>),
    /// The entries, and a key waiting for its value.
    Map(MapEntries, Option<Node>),
}

/// A container being built, with its anchor and the document's cost where it started.
struct Open {
    container: Container,
    mark: Mark,
    anchor: usize,
    start: Cost,
}

#[derive(Default)]
struct Builder {
    /// Containers being built, innermost last.
    stack: Vec<Open>,
    /// Anchored values and what each costs.
    anchors: HashMap<usize, (Node, Cost)>,
    root: Option<Node>,
    /// The cost of everything built so far, aliases expanded.
    cost: Cost,
    error: Option<LoadError>,
}

impl Builder {
    fn push_value(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => {
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
            Some(Open {
                container: Container::Seq(items),
                ..
            }) => items.push(node),
            Some(Open {
                container: Container::Map(map, pending),
                mark,
                ..
            }) => match pending.take() {
                None => {
                    // A block mapping's start event is marked after its first key: the mapping
                    // starts where that key does.
                    if map.entries.is_empty()
                        && (node.mark.line, node.mark.col) < (mark.line, mark.col)
                    {
                        *mark = node.mark;
                    }
                    *pending = Some(node)
                }
                Some(key) => map.insert(key, node),
            },
        }
    }

    /// Adds `cost` to the document's, or records the limit it crosses at `mark`.
    fn spend(&mut self, cost: Cost, mark: Mark) -> bool {
        let nodes = self.cost.nodes.saturating_add(cost.nodes);
        let bytes = self.cost.bytes.saturating_add(cost.bytes);
        let message = if nodes > limits::MAX_NODES {
            format!(
                "the document holds more than {} values (the limit; an alias counts as a copy of its anchor)",
                limits::MAX_NODES
            )
        } else if bytes > limits::MAX_SCALAR_BYTES {
            format!(
                "the document holds more than {} bytes of text (the limit; an alias counts as a copy of its anchor)",
                limits::MAX_SCALAR_BYTES
            )
        } else {
            self.cost = Cost { nodes, bytes };
            return true;
        };
        self.fail(mark, message);
        false
    }

    fn open(&mut self, container: Container, anchor: usize, mark: Mark) {
        if self.stack.len() >= limits::MAX_DEPTH {
            self.fail(mark, too_deep_message());
            return;
        }
        let start = self.cost;
        if self.spend(Cost { nodes: 1, bytes: 0 }, mark) {
            self.stack.push(Open {
                container,
                mark,
                anchor,
                start,
            });
        }
    }

    fn close(&mut self) {
        let Some(open) = self.stack.pop() else {
            return;
        };
        let kind = match open.container {
            Container::Seq(items) => NodeKind::Seq(items),
            Container::Map(map, _) => NodeKind::Map(map.entries),
        };
        let node = Node {
            kind,
            mark: open.mark,
        };
        if open.anchor > 0 {
            let cost = Cost {
                nodes: self.cost.nodes - open.start.nodes,
                bytes: self.cost.bytes - open.start.bytes,
            };
            // The anchor keeps a copy: it is paid for too (nested anchors would otherwise
            // keep up to [`limits::MAX_DEPTH`] copies of one subtree for free).
            if !self.spend(cost, open.mark) {
                return;
            }
            self.anchors.insert(open.anchor, (node.clone(), cost));
        }
        self.push_value(node);
    }

    fn fail(&mut self, mark: Mark, message: impl Into<String>) {
        if self.error.is_none() {
            self.error = Some(LoadError {
                mark,
                code: ErrorCode::Limit,
                message: message.into(),
            });
        }
    }

    fn on_event(&mut self, ev: Event, marker: Marker) {
        let mark = Mark::from_marker(marker);
        match ev {
            Event::Scalar(value, style, anchor, tag) => {
                // An empty value (`key:` and nothing) is marked on the next token; point it at
                // its key instead.
                let mark = match self.stack.last() {
                    Some(Open {
                        container: Container::Map(_, Some(key)),
                        ..
                    }) if value.is_empty() && style == TScalarStyle::Plain => key.mark,
                    _ => mark,
                };
                let cost = Cost {
                    nodes: 1,
                    bytes: value.len(),
                };
                if !self.spend(cost, mark) {
                    return;
                }
                let kind = resolve_scalar(value, style, tag.as_ref());
                let node = Node { kind, mark };
                if anchor > 0 {
                    if !self.spend(cost, mark) {
                        return;
                    }
                    self.anchors.insert(anchor, (node.clone(), cost));
                }
                self.push_value(node);
            }
            Event::SequenceStart(anchor, _) => {
                self.open(Container::Seq(Vec::new()), anchor, mark);
            }
            Event::MappingStart(anchor, _) => {
                self.open(Container::Map(MapEntries::default(), None), anchor, mark);
            }
            Event::SequenceEnd | Event::MappingEnd => self.close(),
            Event::Alias(id) => {
                let Some(cost) = self.anchors.get(&id).map(|(_, cost)| *cost) else {
                    self.error = Some(LoadError {
                        mark,
                        code: ErrorCode::Syntax,
                        message: "found undefined alias".to_string(),
                    });
                    return;
                };
                // The copy is paid for before it is made.
                if self.spend(cost, mark) {
                    let kind = self.anchors[&id].0.kind.clone();
                    self.push_value(Node { kind, mark });
                }
            }
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
