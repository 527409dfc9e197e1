//! `env:` — a list (`A=1`, `B=`, bare `C`) or a mapping; bare names pass the client's value.

use indexmap::IndexMap;
use serde::{Serialize, Serializer};

use super::de::{scalar_key, Cx, Decode, Fields, Path};
use super::error::ErrorCode;
use super::yaml::{Node, NodeKind};

/// The value of one environment variable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnvValue {
    /// A literal value.
    Value(String),
    /// A bare name: filled from the client's environment when the run is submitted.
    FromClient,
}

/// Environment variables in declaration order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Env(pub IndexMap<String, EnvValue>);

impl Serialize for Env {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            match v {
                EnvValue::Value(value) => map.serialize_entry(k, value)?,
                EnvValue::FromClient => {
                    let mut sentinel = IndexMap::new();
                    sentinel.insert("key", k.as_str());
                    map.serialize_entry(k, &sentinel)?;
                }
            }
        }
        map.end()
    }
}

/// Whether `name` is a valid variable name: `[a-zA-Z_][a-zA-Z0-9_]*`.
pub fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl Decode for Env {
    fn decode(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<Self> {
        match &node.kind {
            NodeKind::Seq(items) => {
                let mut env = IndexMap::with_capacity(items.len());
                let mut ok = true;
                for (i, item) in items.iter().enumerate() {
                    let p = path.index(i);
                    let Some(text) = String::decode(item, cx, &p) else {
                        ok = false;
                        continue;
                    };
                    let (name, value) = match text.split_once('=') {
                        Some((n, v)) => (n, EnvValue::Value(v.to_string())),
                        None => (text.as_str(), EnvValue::FromClient),
                    };
                    if !is_env_name(name) {
                        let message = format!(
                            "invalid environment variable '{text}'; expected NAME=VALUE or NAME, \
                             where NAME matches [a-zA-Z_][a-zA-Z0-9_]*"
                        );
                        cx.invalid(item, &p, message);
                        ok = false;
                    } else if env.contains_key(name) {
                        let message = format!("duplicate environment variable: {text}");
                        cx.error(item.mark, &p, ErrorCode::Conflict, message);
                        ok = false;
                    } else {
                        env.insert(name.to_string(), value);
                    }
                }
                ok.then_some(Env(env))
            }
            NodeKind::Map(entries) => {
                let mut env = IndexMap::with_capacity(entries.len());
                let mut ok = true;
                for (k, v) in entries {
                    let name = scalar_key(k);
                    let p = path.key(&name);
                    let value = match &v.kind {
                        NodeKind::Map(_) => decode_sentinel(v, cx, &p),
                        _ => String::decode(v, cx, &p).map(EnvValue::Value),
                    };
                    match value {
                        Some(value) => {
                            env.insert(name, value);
                        }
                        None => ok = false,
                    }
                }
                ok.then_some(Env(env))
            }
            _ => {
                cx.expected(node, path, "a list of NAME=VALUE strings or a mapping");
                None
            }
        }
    }
}

/// `{key: NAME}`: the serialized form of a bare name.
fn decode_sentinel(node: &Node, cx: &mut Cx, path: &Path<'_>) -> Option<EnvValue> {
    let mut f = Fields::new(node, cx, path, "environment placeholder")?;
    let key: Option<String> = f.req(cx, path, "key");
    f.finish(cx, path);
    key.map(|_| EnvValue::FromClient)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::yaml::load;

    fn env(text: &str) -> Result<String, Vec<String>> {
        let doc = load(&format!("v: {text}")).unwrap();
        let mut cx = Cx::default();
        match Env::decode(doc.get("v").unwrap(), &mut cx, &Path::ROOT) {
            Some(e) if !cx.has_errors() => Ok(serde_json::to_string(&e).unwrap()),
            _ => Err(cx
                .into_errors()
                .into_iter()
                .map(|e| e.to_string())
                .collect()),
        }
    }

    #[test]
    fn env_vectors() {
        assert_eq!(
            env("[A=1, B=, C]").unwrap(),
            r#"{"A":"1","B":"","C":{"key":"C"}}"#
        );
        assert_eq!(env("{A: 1, B: x}").unwrap(), r#"{"A":"1","B":"x"}"#);
        assert_eq!(env("[A=b=c]").unwrap(), r#"{"A":"b=c"}"#);
        assert_eq!(env("[]").unwrap(), "{}");
        assert_eq!(env("{PORT: 8080}").unwrap(), r#"{"PORT":"8080"}"#);
        assert_eq!(
            env("[A=1, A=2]").unwrap_err(),
            ["1:10: [1]: duplicate environment variable: A=2 [conflict]"]
        );
        assert_eq!(
            env("[1A=x]").unwrap_err(),
            ["1:5: [0]: invalid environment variable '1A=x'; expected NAME=VALUE or NAME, where \
              NAME matches [a-zA-Z_][a-zA-Z0-9_]* [invalid_value]"]
        );
        assert_eq!(
            env("5").unwrap_err(),
            ["1:4: (root): expected a list of NAME=VALUE strings or a mapping, found an integer 5 \
              [invalid_type]"]
        );
    }
}
