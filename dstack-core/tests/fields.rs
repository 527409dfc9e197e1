//! The field table (`docs/fields.md`) against dstack's configuration schema: every field of
//! every object type a configuration can hold has a row, every row is a field of its section's
//! types, says what happens on each kind of host, and names tests that exist in this tree.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

/// The repository root (the parent of this crate).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn schema() -> Value {
    let path = root().join("../shared/reference/dstack-configuration.schema.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap()
}

/// The definitions reachable from the schema's root (every configuration type and what its
/// fields hold), by name.
fn reachable(schema: &Value) -> BTreeSet<String> {
    fn refs(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("$ref", Value::String(r)) => {
                            out.push(r.trim_start_matches("#/$defs/").to_string())
                        }
                        _ => refs(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let defs = &schema["$defs"];
    let mut seen = BTreeSet::new();
    let mut todo = Vec::new();
    refs(&schema["oneOf"], &mut todo);
    while let Some(name) = todo.pop() {
        if seen.insert(name.clone()) {
            refs(&defs[&name], &mut todo);
        }
    }
    seen
}

/// One row of the table.
struct Row {
    line: usize,
    field: String,
    statuses: [String; 3],
    tests: Vec<String>,
}

/// The table's sections: the schema types of each heading and its rows.
fn table() -> Vec<(Vec<String>, Vec<Row>)> {
    let text = std::fs::read_to_string(root().join("docs/fields.md")).unwrap();
    let ticked = |s: &str| -> Vec<String> {
        s.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    };
    let mut sections: Vec<(Vec<String>, Vec<Row>)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if let Some(heading) = line.strip_prefix("## ") {
            let types = heading.split_once(':').map_or(vec![], |(_, t)| ticked(t));
            sections.push((types, Vec::new()));
            continue;
        }
        if !line.starts_with("| `") {
            continue;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        assert_eq!(cells.len(), 8, "docs/fields.md:{}: 6 cells: {line}", i + 1);
        let (_, rows) = sections
            .last_mut()
            .unwrap_or_else(|| panic!("docs/fields.md:{}: a row before any section", i + 1));
        rows.push(Row {
            line: i + 1,
            field: ticked(cells[1]).concat(),
            statuses: [cells[2], cells[3], cells[4]].map(str::to_string),
            tests: ticked(cells[5]),
        });
    }
    sections
}

/// The names of every test function (`fn` in Rust, `def` in Python) in the repository.
fn functions() -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut BTreeSet<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            if path.is_dir() {
                if !name.starts_with('.') && !["target", "node_modules", "bin"].contains(&&*name) {
                    walk(&path, out);
                }
                continue;
            }
            let keyword = match path.extension().and_then(|e| e.to_str()) {
                Some("rs") => "fn ",
                Some("py") => "def ",
                _ => continue,
            };
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            for piece in text.split(keyword).skip(1) {
                let name: String = piece
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                out.insert(name);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(&root(), &mut out);
    out
}

const STATUSES: &[&str] = &[
    "yes",
    "refused",
    "containers",
    "no match",
    "n/a",
    "instance dirs",
    "`any`",
    "`all-done`",
];

#[test]
fn every_field_of_dstacks_schema_has_a_row_and_every_row_a_test() {
    let schema = schema();
    let defs = &schema["$defs"];
    let sections = table();
    let functions = functions();
    let mut problems = Vec::new();
    // Where each (type, field) is described.
    let mut rows_of: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (types, rows) in &sections {
        for ty in types {
            if defs.get(ty).is_none() {
                problems.push(format!("section type `{ty}` is not in the schema"));
            }
        }
        for row in rows {
            let mut found = false;
            for ty in types {
                if defs[ty]["properties"].get(&row.field).is_some() {
                    found = true;
                    rows_of.insert((ty.clone(), row.field.clone()), row.line);
                }
            }
            if !found {
                problems.push(format!(
                    "docs/fields.md:{}: `{}` is a field of none of {}",
                    row.line,
                    row.field,
                    types.join(", ")
                ));
            }
            for status in &row.statuses {
                if !STATUSES.contains(&status.as_str()) {
                    problems.push(format!(
                        "docs/fields.md:{}: unknown status `{status}`",
                        row.line
                    ));
                }
            }
            if row.tests.is_empty() {
                problems.push(format!("docs/fields.md:{}: no test named", row.line));
            }
            for test in &row.tests {
                if !functions.contains(test) {
                    problems.push(format!(
                        "docs/fields.md:{}: `{}` names test `{test}`, which does not exist",
                        row.line, row.field
                    ));
                }
            }
        }
    }
    let mut fields = 0;
    for ty in reachable(&schema) {
        let Some(properties) = defs[&ty]["properties"].as_object() else {
            continue;
        };
        for field in properties.keys() {
            fields += 1;
            if !rows_of.contains_key(&(ty.clone(), field.clone())) {
                problems.push(format!("`{ty}.{field}` has no row"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // Every configuration type and its parts: the schema holds about 400 fields.
    assert!(fields > 350, "{fields}");
}
