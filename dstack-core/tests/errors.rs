//! Error messages are part of the interface: their wording, line, column, field path and code
//! are locked here.

use dstack_core::config::{parse, ErrorCode};

/// Parses `text` and returns its error lines.
fn errors(text: &str) -> Vec<String> {
    parse(text, "f.dstack.yml")
        .unwrap_err()
        .to_string()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn unknown_field_points_at_the_key_and_suggests_a_fix() {
    assert_eq!(
        errors("type: task\ncommands: [x]\nresources:\n  gpus: 1\n"),
        ["f.dstack.yml:4:3: resources.gpus: unknown field `gpus`; did you mean `gpu`? [unknown_field]"]
    );
}

#[test]
fn unknown_type_lists_the_known_ones() {
    assert_eq!(
        errors("type: dev-environments\n"),
        ["f.dstack.yml:1:7: type: unknown configuration type 'dev-environments'; expected one of: \
          dev-environment, task, service, fleet, gateway, volume, preset [unknown_type]"]
    );
    assert_eq!(
        errors("name: x\n"),
        [
            "f.dstack.yml:1:1: type: field required; set `type` to one of: dev-environment, task, \
          service, fleet, gateway, volume, preset [missing_field]"
        ]
    );
}

#[test]
fn every_problem_of_a_file_is_reported_in_order() {
    let text =
        "type: task\nname: t\ncommands: echo hi\nresources:\n  cpu: 4..2\n  gpu: 'A100:2:3'\n\
                spot_policy: sometimes\nmax_duration: 2y\nports: [70000]\n";
    assert_eq!(
        errors(text),
        [
            "f.dstack.yml:3:11: commands: expected a list, found a string 'echo hi' [invalid_type]",
            "f.dstack.yml:5:8: resources.cpu: invalid range order: 4..2 (the minimum is above the maximum) [out_of_range]",
            "f.dstack.yml:6:8: resources.gpu: GPU count conflict in 'A100:2:3': two counts given [invalid_value]",
            "f.dstack.yml:7:14: spot_policy: invalid value 'sometimes'; expected one of: spot, on-demand, auto [invalid_value]",
            "f.dstack.yml:8:15: max_duration: invalid duration '2y'; expected a duration such as 90, \"30s\", \"5m\", \"2h\", \"1d\" or \"1w\" [invalid_value]",
            "f.dstack.yml:9:9: ports[0]: must be between 1 and 65535, got 70000 [out_of_range]",
        ]
    );
}

#[test]
fn missing_required_fields_point_at_the_mapping() {
    assert_eq!(
        errors("type: service\nimage: nginx\n"),
        ["f.dstack.yml:1:1: port: field required [missing_field]"]
    );
    assert_eq!(
        errors("type: task\nvolumes:\n  - /a:/b\n"),
        ["f.dstack.yml:1:1: (root): either `commands` or `image` must be set [missing_field]"]
    );
    assert_eq!(
        errors("type: task\ncommands: [x]\nresources:\n"),
        ["f.dstack.yml:3:1: resources: must not be null [invalid_type]"]
    );
}

#[test]
fn nested_list_items_have_indexed_paths() {
    assert_eq!(
        errors("type: task\ncommands: [x]\nvolumes:\n  - data:/x\n  - name: v\n    path: rel\n"),
        ["f.dstack.yml:6:11: volumes[1].path: path must be absolute: rel [invalid_value]"]
    );
    assert_eq!(
        errors("type: task\ncommands: [x]\nenv:\n  - A=1\n  - 1B=2\n"),
        ["f.dstack.yml:5:5: env[1]: invalid environment variable '1B=2'; expected NAME=VALUE or \
          NAME, where NAME matches [a-zA-Z_][a-zA-Z0-9_]* [invalid_value]"]
    );
}

#[test]
fn conflicting_fields_are_named() {
    assert_eq!(
        errors("type: task\ncommands: [x]\nimage: ubuntu\npython: 3.11\n"),
        ["f.dstack.yml:4:9: python: `python` and `image` are mutually exclusive [conflict]"]
    );
    assert_eq!(
        errors("type: service\nport: 80\ncommands: [x]\nreplicas: 0..4\n"),
        ["f.dstack.yml:4:11: replicas: when `replicas` is a range, `scaling` must be set [missing_field]"]
    );
    assert_eq!(
        errors("type: fleet\nnodes: 2\nssh_config:\n  hosts: [h1]\n"),
        ["f.dstack.yml:2:8: nodes: `nodes` cannot be used in an SSH fleet (one with `ssh_config`) [conflict]"]
    );
}

#[test]
fn yaml_syntax_errors_are_located() {
    let e = parse("type: task\ncommands: [x\n", "f.yml").unwrap_err();
    assert_eq!(e.errors.len(), 1);
    assert_eq!(e.errors[0].code, ErrorCode::Syntax);
    assert!(
        e.errors[0].message.starts_with("invalid YAML: "),
        "{}",
        e.errors[0].message
    );
    assert!(e.errors[0].mark.line >= 2, "{:?}", e.errors[0].mark);
}

#[test]
fn a_document_that_is_not_a_mapping_is_rejected() {
    assert_eq!(
        errors("- type: task\n"),
        ["f.dstack.yml:1:1: (root): expected a mapping (a dstack configuration), found a list [invalid_type]"]
    );
    assert_eq!(
        errors(""),
        ["f.dstack.yml:1:1: (root): expected a mapping (a dstack configuration), found null [invalid_type]"]
    );
}

#[test]
fn configurations_given_as_data_name_the_source_and_field_but_no_line() {
    let value = serde_json::json!({
        "type": "task",
        "commands": ["x"],
        "resources": {"gpu": {"count": "many"}},
        "nodes": 0,
    });
    let text = dstack_core::config::parse_value(&value, "Task(...)")
        .unwrap_err()
        .to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines
        .iter()
        .any(|l| l.starts_with("Task(...): resources.gpu.count: ")));
    assert!(lines.iter().all(|l| l.starts_with("Task(...): ")));
}

#[test]
fn data_and_yaml_normalize_alike() {
    let yaml = parse(
        "type: task\ncommands: [x]\nenv: [A=1]\nresources: {gpu: 0}\n",
        "f",
    )
    .unwrap();
    let value = serde_json::json!({
        "type": "task", "commands": ["x"], "env": ["A=1"], "resources": {"gpu": 0},
    });
    let data = dstack_core::config::parse_value(&value, "data").unwrap();
    assert_eq!(yaml.to_json(), data.to_json());
}

#[test]
fn a_bad_cron_expression_is_located_in_its_list() {
    let text = "type: task\ncommands: [x]\nschedule:\n  cron:\n    - '0 8 * * mon-fri'\n    - '0 25 * * *'\n    - '0 0 30 2 *'\n";
    assert_eq!(
        errors(text),
        [
            "f.dstack.yml:6:7: schedule.cron[1]: invalid cron expression '0 25 * * *': hour field: 25 is out of range 0-23 [out_of_range]",
            "f.dstack.yml:7:7: schedule.cron[2]: invalid cron expression '0 0 30 2 *': never fires: none of its days of the month exists in its months [invalid_value]",
        ]
    );
    assert_eq!(
        errors("type: task\ncommands: [x]\nschedule: {cron: '0 8 * *'}\n"),
        ["f.dstack.yml:3:18: schedule.cron: invalid cron expression '0 8 * *': expected five fields (minute hour day-of-month month day-of-week), found 4 [invalid_value]"]
    );
}

#[test]
fn a_fleets_retry_that_cannot_be_honoured_is_read_as_dstack_reads_it_and_refused_at_apply() {
    use dstack_core::config::Configuration;
    let fleet = |text: &str| match parse(text, "f.dstack.yml").unwrap() {
        Configuration::Fleet(fleet) => fleet,
        other => panic!("not a fleet: {}", other.type_name()),
    };
    let odd = fleet(
        "type: fleet\nnodes: 1\nretry:\n  on_events:\n    - no-capacity\n    - interruption\n",
    );
    assert_eq!(
        odd.unsupported_retry().as_deref(),
        Some(
            "retry.on_events: a fleet retries only provisioning that found no capacity: its \
             `on_events` can list only no-capacity, not interruption"
        )
    );
    let negative = fleet("type: fleet\nnodes: 1\nretry:\n  duration: -1\n");
    assert!(negative
        .unsupported_retry()
        .is_some_and(|why| why.contains("cannot be negative")));
    for fine in [
        "retry: true",
        "retry: false",
        "retry: {duration: 2h}",
        "retry: {on_events: [no-capacity], duration: 10m}",
    ] {
        let fleet = fleet(&format!("type: fleet\nnodes: 1\n{fine}\n"));
        assert_eq!(fleet.unsupported_retry(), None, "{fine}");
    }
}
