//! The 211 field-level vectors of dstack 0.22.5 (`tests/data/vectors.json`, copied from the
//! shared corpus): each input is placed in a minimal configuration and the normalized value (or
//! the rejection) must match what dstack produced. The one deliberate divergence — negative
//! memory sizes are rejected here — is asserted explicitly.

use dstack_core::config::parse;
use serde_json::{json, Value};

/// Builds a minimal configuration holding `input` at `field`, written as YAML flow (JSON).
fn minimal_config(field: &str, input: &Value) -> (String, Vec<String>) {
    let (mut doc, rest) = if let Some(f) = field.strip_prefix("service.") {
        (
            json!({"type": "service", "commands": ["x"], "port": 8000}),
            f,
        )
    } else if let Some(f) = field.strip_prefix("fleet.") {
        (json!({"type": "fleet", "nodes": 1}), f)
    } else {
        (json!({"type": "task", "commands": ["x"]}), field)
    };
    let parts: Vec<String> = rest.split('.').map(str::to_string).collect();
    let mut cur = &mut doc;
    for p in &parts[..parts.len() - 1] {
        cur = cur
            .as_object_mut()
            .unwrap()
            .entry(p.clone())
            .or_insert(json!({}));
    }
    cur.as_object_mut()
        .unwrap()
        .insert(parts.last().unwrap().clone(), input.clone());
    (serde_json::to_string(&doc).unwrap(), parts)
}

/// Compares JSON with numbers as floats, as the corpus checker does.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            (x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 1e-9
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(v, w)| same(v, w))
        }
        _ => a == b,
    }
}

#[test]
fn every_field_vector_matches_dstack() {
    let vectors: Vec<Value> = serde_json::from_str(include_str!("data/vectors.json")).unwrap();
    assert_eq!(vectors.len(), 211);
    let mut failures = Vec::new();
    for v in &vectors {
        let field = v["field"].as_str().unwrap();
        let input = &v["input"];
        let (text, parts) = minimal_config(field, input);
        let result = parse(&text, "vector.yml");
        let negative_memory =
            field == "resources.memory" && input.as_str().is_some_and(|s| s.starts_with('-'));
        if v.get("error").is_some() || negative_memory {
            if result.is_ok() {
                failures.push(format!(
                    "{field} {input}: accepted, dstack rejects: {}",
                    v["error"]
                ));
            }
            continue;
        }
        match result {
            Err(e) => failures.push(format!("{field} {input}: rejected: {e}")),
            Ok(config) => {
                let mut got = config.to_json();
                for p in &parts {
                    got = got.get(p).cloned().unwrap_or(Value::Null);
                }
                if !same(&got, &v["output"]) {
                    failures.push(format!("{field} {input}: got {got}, want {}", v["output"]));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} vector(s) differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
