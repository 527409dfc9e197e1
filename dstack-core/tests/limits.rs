//! The limits of `config::limits` (issue 22, points 5 and 6): inputs that crashed, hung or
//! exhausted the process get a located `[limit]` error instead, and values within the limits
//! still read as before.

use dstack_core::config::limits::{
    MAX_CPU_COUNT, MAX_DEPTH, MAX_DURATION_SECS, MAX_ERRORS, MAX_GPU_COUNT, MAX_NODES,
    MAX_NODE_COUNT, MAX_TEXT_BYTES,
};
use dstack_core::config::{parse, parse_value, ConfigError, Configuration, ErrorCode};

const TASK: &str = "type: task\ncommands: [x]\n";

/// The errors of a configuration that must be refused.
fn errors(text: &str) -> Vec<ConfigError> {
    match parse(text, "t.yml") {
        Ok(config) => panic!("accepted: {config:?}"),
        Err(e) => e.errors,
    }
}

/// The single `[limit]` error of a refused configuration.
fn limit_error(text: &str) -> ConfigError {
    let errors = errors(text);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].code, ErrorCode::Limit, "{errors:?}");
    errors[0].clone()
}

fn alias_bomb(levels: usize) -> String {
    let mut text = format!("{TASK}a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..levels {
        let refs = vec![format!("*a{}", i - 1); 9].join(", ");
        text.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
    }
    text
}

#[test]
fn deep_block_nesting_is_refused_where_it_crosses_the_limit() {
    // 30,000 levels overflowed the stack and aborted the process.
    let text = format!("{TASK}x:\n{}1\n", "- ".repeat(30_000));
    let error = limit_error(&text);
    assert_eq!(error.mark.line, 4);
    assert_eq!(
        error.mark.col,
        2 * MAX_DEPTH - 1,
        "the level past the limit"
    );
    assert!(error.message.contains("64 levels"), "{}", error.message);
}

#[test]
fn nesting_up_to_the_limit_is_read() {
    // The document's mapping and 63 lists in it: 64 containers, one in another.
    let depth = MAX_DEPTH - 1;
    let text = format!("{TASK}x: {}1{}\n", "[".repeat(depth), "]".repeat(depth));
    let errors = errors(&text);
    assert_eq!(errors[0].code, ErrorCode::UnknownField, "{errors:?}");
    let deeper = format!(
        "{TASK}x: {}1{}\n",
        "[".repeat(depth + 1),
        "]".repeat(depth + 1)
    );
    limit_error(&deeper);
}

#[test]
fn an_alias_bomb_is_refused_at_the_alias_that_crosses_the_limit() {
    // 9 levels (a 9^9 expansion) took 1.9 GB and 6 s; one more aborted out of memory.
    for levels in [9, 10] {
        let error = limit_error(&alias_bomb(levels));
        assert!(error.message.contains("100000 values"), "{}", error.message);
        assert!(error.mark.line > 3, "{error:?}");
    }
}

#[test]
fn anchors_and_aliases_within_the_limits_still_expand() {
    let text = format!(
        "{TASK}env: &e {{A: '1'}}\nresources: &r {{cpu: 2}}\n\
         groups_: [*e, *r]\nx: {{<<: *e, B: '2'}}\n"
    );
    let errors = errors(&text);
    assert!(
        errors.iter().all(|e| e.code == ErrorCode::UnknownField),
        "{errors:?}"
    );
    let ok = "type: task\ncommands: &c [a, b]\nenv: &e {A: '1'}\nresources: {cpu: 2}\n";
    let Configuration::Task(task) = parse(ok, "t.yml").unwrap() else {
        panic!()
    };
    assert_eq!(task.commands, ["a", "b"]);
}

#[test]
fn a_long_scalar_copied_by_aliases_is_refused() {
    let text = format!("{TASK}x: &a '{}'\ny: [*a, *a, *a]\n", "a".repeat(3 << 20));
    let error = limit_error(&text);
    assert!(error.message.contains("bytes of text"), "{}", error.message);
    assert_eq!(error.mark.line, 4);
}

#[test]
fn a_mapping_with_too_many_keys_is_refused() {
    // 200,000 keys took 113 s (a quadratic duplicate check).
    let mut text = String::from(TASK);
    for i in 0..200_000 {
        text.push_str(&format!("k{i}: 1\n"));
    }
    let error = limit_error(&text);
    // The document, `type`, `task`, `commands`, its list and `x` are 6 values; each key and
    // its value 2 more.
    assert_eq!(
        error.mark.line,
        3 + (MAX_NODES - 6) / 2,
        "the key past the limit"
    );
}

#[test]
fn many_keys_within_the_limit_are_read_and_duplicates_replaced() {
    let mut text = String::from("type: task\ncommands: [x]\nenv:\n");
    for i in 0..40_000 {
        text.push_str(&format!("  K{}: '{i}'\n", i % 20_000));
    }
    let Configuration::Task(task) = parse(&text, "t.yml").unwrap() else {
        panic!()
    };
    let env = serde_json::to_value(&task.common.env).unwrap();
    let env = env.as_object().unwrap();
    assert_eq!(env.len(), 20_000);
    assert_eq!(env["K0"], "20000", "the later duplicate wins");
    assert_eq!(env.keys().next().unwrap(), "K0", "in first-seen order");
}

#[test]
fn many_unknown_fields_report_a_bounded_number_of_errors() {
    let mut text = String::from(TASK);
    for i in 0..40_000 {
        text.push_str(&format!("namee{i}: 1\n"));
    }
    let errors = errors(&text);
    assert_eq!(errors.len(), MAX_ERRORS + 1);
    let last = errors.last().unwrap();
    assert_eq!(last.code, ErrorCode::Limit);
    assert!(
        last.message.starts_with("39900 more errors"),
        "{}",
        last.message
    );
}

#[test]
fn a_text_over_the_size_limit_is_refused_at_its_start() {
    let text = format!("{TASK}#{}\n", "x".repeat(MAX_TEXT_BYTES));
    let error = limit_error(&text);
    assert_eq!((error.mark.line, error.mark.col), (1, 1));
    assert!(error.message.contains("4194304 bytes"), "{}", error.message);
}

#[test]
fn data_that_contains_itself_or_nests_too_deep_is_refused() {
    let mut value = serde_json::json!(["x"]);
    for _ in 0..1000 {
        value = serde_json::json!([value]);
    }
    let mut task = serde_json::json!({"type": "task", "commands": ["x"]});
    task["env"] = value;
    let errors = parse_value(&task, "Task(...)").unwrap_err().errors;
    assert_eq!(errors[0].code, ErrorCode::Limit);
    assert_eq!(
        errors[0].path,
        format!("env{}", "[0]".repeat(MAX_DEPTH - 1))
    );
}

/// The error of `field: value` in a task, which must be a `[limit]` error at that field.
fn field_limit(field: &str, value: &str) -> ConfigError {
    let text = format!("{TASK}{field}: {value}\n");
    let error = limit_error(&text);
    assert_eq!(error.mark.line, 3, "{error:?}");
    error
}

#[test]
fn node_counts_beyond_the_limit_are_refused_at_the_field() {
    // 2^63-1 aborted `apply` (a terabyte allocation), 2^32 truncated to no job at all, and
    // 1,000,000 wrote a 1.4 GB state file.
    for n in ["9223372036854775807", "4294967296", "1000000", "1001"] {
        let error = field_limit("nodes", n);
        assert_eq!(error.path, "nodes");
        assert_eq!(
            error.message,
            format!("must be at most {MAX_NODE_COUNT} (the limit), got {n}")
        );
    }
    let text = format!("{TASK}nodes: {MAX_NODE_COUNT}\n");
    let Configuration::Task(task) = parse(&text, "t.yml").unwrap() else {
        panic!()
    };
    assert_eq!(task.nodes, Some(MAX_NODE_COUNT));
    // dstack's own rule keeps its own code.
    assert_eq!(
        errors(&format!("{TASK}nodes: 0\n"))[0].code,
        ErrorCode::OutOfRange
    );
}

#[test]
fn node_groups_are_limited_in_all() {
    let text =
        "type: task\ngroups:\n  - {nodes: 600, commands: [x]}\n  - {nodes: 600, commands: [y]}\n";
    let error = limit_error(text);
    assert_eq!(error.path, "groups");
    let one = errors("type: task\ngroups:\n  - {nodes: 1001, commands: [x]}\n");
    assert!(
        one.iter()
            .any(|e| e.code == ErrorCode::Limit && e.path == "groups[0].nodes"),
        "{one:?}"
    );
}

#[test]
fn replica_fleet_gpu_and_cpu_counts_are_limited() {
    let service = "type: service\nport: 80\ncommands: [x]\nreplicas: 0..5000\nscaling: {metric: rps, target: 1}\n";
    assert_eq!(limit_error(service).path, "replicas");
    let fleet = "type: fleet\nnodes: 0..1001\n";
    assert_eq!(limit_error(fleet).path, "nodes");
    let fleet = "type: fleet\nnodes: {min: 0, target: 5000}\n";
    assert_eq!(limit_error(fleet).path, "nodes");
    let gpus = format!("resources:\n  gpu: A100:{}", MAX_GPU_COUNT + 1);
    assert_eq!(
        limit_error(&format!("{TASK}{gpus}\n")).path,
        "resources.gpu"
    );
    let cpus = format!("resources:\n  cpu: {}..", MAX_CPU_COUNT + 1);
    assert_eq!(
        limit_error(&format!("{TASK}{cpus}\n")).path,
        "resources.cpu"
    );
    let within = format!("{TASK}resources:\n  cpu: {MAX_CPU_COUNT}\n  gpu: {MAX_GPU_COUNT}\n");
    assert!(parse(&within, "t.yml").is_ok());
}

#[test]
fn durations_beyond_a_century_are_refused_at_the_field() {
    // A huge `max_duration` panicked a container job's supervisor; a huge `idle_duration` or
    // `auto_cleanup_duration` wrapped `* 1000` into "at once".
    for field in ["max_duration", "idle_duration", "stop_duration"] {
        for value in [
            "9223372036854775807",
            "3155760001",
            "1000000000000w",
            "1.0e+300",
        ] {
            let error = field_limit(field, value);
            assert_eq!(error.path, field);
            assert!(error.message.contains("100 years"), "{}", error.message);
        }
    }
    let volume = "type: volume\nbackend: aws\nregion: us-east-1\nsize: 10GB\n\
                  auto_cleanup_duration: 18446744073709552\n";
    assert_eq!(limit_error(volume).path, "auto_cleanup_duration");
    let century =
        format!("{TASK}max_duration: {MAX_DURATION_SECS}\nidle_duration: -{MAX_DURATION_SECS}\n");
    assert!(parse(&century, "t.yml").is_ok());
}
