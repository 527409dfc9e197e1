//! Property tests: arbitrary text and arbitrary YAML structures never make the parser panic or
//! hang, and whatever it accepts serializes to JSON and parses again to the same configuration.

use dstack_core::config::{parse, CONFIGURATION_TYPES};
use proptest::prelude::*;

/// YAML scalars that exercise the resolvers and the field grammars.
fn scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("null".to_string()),
        Just("~".to_string()),
        Just("on".to_string()),
        Just("off".to_string()),
        Just("3.10".to_string()),
        Just("0755".to_string()),
        Just("1:30".to_string()),
        Just("'A100:80GB:2'".to_string()),
        Just("24GB..".to_string()),
        Just("..".to_string()),
        Just("x86:2..".to_string()),
        Just("'*:8080'".to_string()),
        Just("5m".to_string()),
        Just("-1".to_string()),
        any::<i64>().prop_map(|i| i.to_string()),
        any::<f64>().prop_map(|f| f.to_string()),
        "[a-zA-Z0-9:._/*=-]{0,12}",
    ]
}

/// Keys dstack configurations use, plus noise.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("type".to_string()),
        Just("resources".to_string()),
        Just("gpu".to_string()),
        Just("cpu".to_string()),
        Just("memory".to_string()),
        Just("commands".to_string()),
        Just("env".to_string()),
        Just("ports".to_string()),
        Just("port".to_string()),
        Just("replicas".to_string()),
        Just("nodes".to_string()),
        Just("groups".to_string()),
        Just("volumes".to_string()),
        Just("retry".to_string()),
        Just("ssh_config".to_string()),
        Just("hosts".to_string()),
        "[a-z_]{1,8}",
    ]
}

/// Arbitrary nested YAML in flow style.
fn value() -> impl Strategy<Value = String> {
    scalar().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5)
                .prop_map(|items| format!("[{}]", items.join(", "))),
            prop::collection::vec((key(), inner), 0..6).prop_map(|entries| {
                let body: Vec<String> = entries.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                format!("{{{}}}", body.join(", "))
            }),
        ]
    })
}

fn document() -> impl Strategy<Value = String> {
    (
        prop::sample::select(CONFIGURATION_TYPES),
        prop::collection::vec((key(), value()), 0..8),
    )
        .prop_map(|(kind, fields)| {
            let mut text = format!("type: {kind}\n");
            for (k, v) in fields {
                text.push_str(&format!("{k}: {v}\n"));
            }
            text
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(text in "(?s).{0,200}") {
        let _ = parse(&text, "fuzz.yml");
    }

    #[test]
    fn arbitrary_structures_never_panic_and_round_trip(text in document()) {
        if let Ok(config) = parse(&text, "fuzz.yml") {
            let json = serde_json::to_string(&config.to_json()).unwrap();
            let again = parse(&json, "again.json").unwrap_or_else(|e| panic!("{text}\n{json}\n{e}"));
            prop_assert_eq!(again.to_json(), config.to_json());
        }
    }
}

#[test]
fn deeply_nested_input_does_not_overflow() {
    let text = format!(
        "type: task\ncommands: {}x{}\n",
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let _ = parse(&text, "deep.yml");
}
