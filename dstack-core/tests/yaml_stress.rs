//! Property test over generated deep, aliased, wide and long YAML (issue 22): whatever the
//! shape, the parser returns (no abort, no hang) with a located error when a limit is crossed,
//! and the process's peak resident memory while parsing stays under [`MEMORY_BOUND`] more than
//! before. One test alone in its binary, so nothing else runs meanwhile.

use dstack_core::config::limits::{MAX_DEPTH, MAX_NODES, MAX_TEXT_BYTES};
use dstack_core::config::{parse, ErrorCode};
use proptest::prelude::*;

/// The documented bound on the memory parsing one text may take, beyond the text itself.
const MEMORY_BOUND_KB: u64 = 64 << 10;

/// The process's peak resident memory (Linux's `VmHWM`), in KiB.
fn peak_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Parses `text` and returns whether it crossed a limit, checking that every error is located
/// and that the peak memory meanwhile stayed under the bound.
fn parse_bounded(text: &str) -> bool {
    // Resets the peak to the memory resident now (Linux's `clear_refs`, value 5).
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = peak_kb();
    let limited = match parse(text, "stress.yml") {
        Ok(_) => false,
        Err(e) => {
            assert!(e.errors.iter().all(|e| e.mark.line >= 1), "{e}");
            e.errors.iter().any(|e| e.code == ErrorCode::Limit)
        }
    };
    let taken = peak_kb().saturating_sub(before);
    assert!(taken <= MEMORY_BOUND_KB, "took {taken} KiB");
    limited
}

/// How one level of nesting is written.
#[derive(Clone, Copy, Debug)]
enum Level {
    BlockSeq,
    BlockMap,
    FlowSeq,
    FlowMap,
}

fn level() -> impl Strategy<Value = Level> {
    prop_oneof![
        Just(Level::BlockSeq),
        Just(Level::BlockMap),
        Just(Level::FlowSeq),
        Just(Level::FlowMap),
    ]
}

/// A value nested `levels.len()` deep under the key `x` of a task (one container per level;
/// flow levels stay flow below, as YAML requires).
fn nested(levels: &[Level]) -> String {
    let mut open = String::new();
    let mut close = String::new();
    let mut indent = 0;
    let mut flow = false;
    for level in levels {
        match (level, flow) {
            (Level::BlockSeq, false) => {
                indent += 2;
                open.push_str(&format!("\n{}- ", " ".repeat(indent)));
            }
            (Level::BlockMap, false) => {
                indent += 2;
                open.push_str(&format!("\n{}k:", " ".repeat(indent)));
            }
            (Level::FlowSeq | Level::BlockSeq, true) | (Level::FlowSeq, false) => {
                flow = true;
                open.push_str(" [");
                close.insert(0, ']');
            }
            (Level::FlowMap | Level::BlockMap, true) | (Level::FlowMap, false) => {
                flow = true;
                open.push_str(" {k:");
                close.insert(0, '}');
            }
        }
    }
    format!("type: task\ncommands: [x]\nx:{open} 1{close}\n")
}

/// An alias tree: `levels` anchors, each a list of `fan_out` aliases of the one before.
fn aliased(levels: usize, fan_out: usize) -> (String, u128) {
    let mut text = String::from("type: task\ncommands: [x]\na0: &a0 lol\n");
    let mut size: u128 = 1;
    for i in 1..=levels {
        let refs = vec![format!("*a{}", i - 1); fan_out].join(", ");
        text.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        size = size * fan_out as u128 + 1;
    }
    (text, size)
}

/// A mapping of `keys` keys, `distinct` of them different.
fn wide(keys: usize, distinct: usize) -> String {
    let mut text = String::from("type: task\ncommands: [x]\nenv:\n");
    for i in 0..keys {
        text.push_str(&format!("  K{}: v\n", i % distinct.max(1)));
    }
    text
}

/// A generated input, kept small to print when a case fails.
#[derive(Clone, Debug)]
enum Shape {
    /// Nested levels under `x`.
    Deep(Vec<Level>),
    /// Anchor levels and how many aliases each level holds.
    Aliased(usize, usize),
    /// Keys of one mapping and how many of them differ.
    Wide(usize, usize),
    /// Bytes short of the size limit, or over it.
    Long(usize, bool),
}

impl Shape {
    /// The text, and whether it crosses a limit (`None`: either way).
    fn text(&self) -> (String, Option<bool>) {
        match *self {
            // The document's mapping and `x`'s value hold the levels.
            Shape::Deep(ref levels) => (nested(levels), Some(levels.len() + 1 > MAX_DEPTH)),
            // Expanded, the last anchor alone holds `size` values; with every anchor's copy
            // and the other fields, within a factor of 4.
            Shape::Aliased(levels, fan_out) => {
                let (text, size) = aliased(levels, fan_out);
                let expected = if size * 4 < MAX_NODES as u128 {
                    Some(false)
                } else if size > MAX_NODES as u128 {
                    Some(true)
                } else {
                    None
                };
                (text, expected)
            }
            // Each key and its value are 2 values, the rest of the task 6.
            Shape::Wide(keys, distinct) => (wide(keys, distinct), Some(6 + 2 * keys > MAX_NODES)),
            Shape::Long(extra, over) => {
                let head = "type: task\ncommands: [x]\n#";
                let len = if over {
                    MAX_TEXT_BYTES + 1 + extra
                } else {
                    MAX_TEXT_BYTES - extra
                };
                (
                    format!("{head}{}", "x".repeat(len - head.len())),
                    Some(over),
                )
            }
        }
    }
}

fn shape() -> impl Strategy<Value = Shape> {
    prop_oneof![
        prop::collection::vec(level(), 0..400).prop_map(Shape::Deep),
        (1usize..14, 1usize..12).prop_map(|(l, f)| Shape::Aliased(l, f)),
        (0usize..120_000, 1usize..120_000).prop_map(|(k, d)| Shape::Wide(k, d)),
        (0usize..64, any::<bool>()).prop_map(|(e, o)| Shape::Long(e, o)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn stressed_yaml_is_read_or_refused_at_the_limit_in_bounded_memory(shape in shape()) {
        let (text, expected) = shape.text();
        let limited = parse_bounded(&text);
        if let Some(expected) = expected {
            prop_assert_eq!(limited, expected);
        }
    }
}
