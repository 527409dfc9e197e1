//! Spec §10 vectors for fleet `nodes`, service replicas and replica/node groups.

use dstack_core::config::{parse, Configuration};
use serde_json::{json, Value};

fn ok(text: &str) -> Value {
    parse(text, "t.yml")
        .unwrap_or_else(|e| panic!("{e}"))
        .to_json()
}

fn err(text: &str) -> String {
    parse(text, "t.yml").unwrap_err().to_string()
}

#[test]
fn fleet_nodes_vectors() {
    let nodes = |n: &str| ok(&format!("type: fleet\nnodes: {n}\n"))["nodes"].clone();
    assert_eq!(nodes("1"), json!({"min": 1, "max": 1}));
    assert_eq!(nodes("1..2"), json!({"min": 1, "max": 2}));
    assert_eq!(nodes("..2"), json!({"min": 0, "max": 2}));
    assert_eq!(nodes("1.."), json!({"min": 1}));
    assert_eq!(nodes("{min: 1, max: 2}"), json!({"min": 1, "max": 2}));
    assert_eq!(
        nodes("{min: 1, target: 2, max: 3}"),
        json!({"min": 1, "target": 2, "max": 3})
    );
    assert_eq!(
        nodes("{target: 2, max: 3}"),
        json!({"min": 0, "target": 2, "max": 3})
    );
    assert_eq!(nodes("{}"), json!({"min": 0}));
    for bad in [
        "2..1",
        "{min: -1}",
        "{target: -1}",
        "{target: 2, max: 1}",
        "{min: 2, max: 1}",
        "{min: 2, target: 1}",
    ] {
        assert!(
            parse(&format!("type: fleet\nnodes: {bad}\n"), "t.yml").is_err(),
            "{bad}"
        );
    }
    let Configuration::Fleet(fleet) = parse("type: fleet\nnodes: 1..3\n", "t.yml").unwrap() else {
        panic!("not a fleet")
    };
    let n = fleet.nodes.unwrap();
    assert_eq!((n.min, n.target, n.max), (1, 1, Some(3)));
}

#[test]
fn service_replicas_vectors() {
    let svc = |r: &str| format!("type: service\nport: 80\ncommands: [x]\nreplicas: {r}\n");
    assert_eq!(ok(&svc("1"))["replicas"], json!({"min": 1, "max": 1}));
    assert_eq!(ok(&svc("'2'"))["replicas"], json!({"min": 2, "max": 2}));
    assert_eq!(ok(&svc("3..3"))["replicas"], json!({"min": 3, "max": 3}));
    assert!(err(&svc("0..10")).contains("when `replicas` is a range, `scaling` must be set"));
    let scaled = ok(&(svc("0..10") + "scaling: {metric: rps, target: 10}\n"));
    assert_eq!(scaled["replicas"], json!({"min": 0, "max": 10}));
    assert!(
        err(&(svc("0..10") + "scaling: {metric: rpc, target: 10}\n")).contains("scaling.metric")
    );
    assert!(err(&svc("1..")).contains("the maximum number of replicas must be set"));
}

#[test]
fn legacy_replica_list_is_read_as_groups() {
    let legacy = ok("type: service\nport: 80\nreplicas:\n  - count: 1\n    commands: [x]\n");
    let groups = ok("type: service\nport: 80\ngroups:\n  - replicas: 1\n    commands: [x]\n");
    assert_eq!(legacy, groups);
    assert_eq!(legacy["groups"][0]["name"], "0");
    assert_eq!(legacy["groups"][0]["replicas"], json!({"min": 1, "max": 1}));
    assert!(legacy.get("replicas").is_none());
}

#[test]
fn replica_group_rules() {
    let base = "type: service\nport: 80\n";
    let python = ok(&format!(
        "{base}groups:\n  - replicas: 1\n    python: 3.10\n    commands: [x]\n"
    ));
    assert_eq!(python["groups"][0]["python"], "3.10");
    assert!(err(&format!(
        "{base}image: a\ngroups:\n  - replicas: 1\n    image: b\n"
    ))
    .contains("groups[0].image: `image` is set both on the service and in the group"));
    assert!(err(&format!("{base}groups:\n  - replicas: 1\n"))
        .contains("needs `commands` or an `image`"));
    assert!(err(&format!(
        "{base}commands: [x]\ngroups:\n  - replicas: 1\n    commands: [y]\n"
    ))
    .contains("`commands` cannot be set at the top level together with replica groups"));
    let two_routers = format!(
        "{base}image: i\ngroups:\n  - replicas: 1\n    router: {{type: smg}}\n  - replicas: 1\n    router: {{type: dynamo}}\n"
    );
    assert!(err(&two_routers).contains("at most one replica group may have a router"));
}

#[test]
fn node_group_vectors() {
    let task = "type: task\ngroups:\n  - nodes: 2\n    commands: [x]\n  - name: workers\n    commands: [y]\n";
    let json = ok(task);
    assert_eq!(json["groups"][0]["name"], "0");
    assert_eq!(json["groups"][1]["name"], "workers");
    assert_eq!(json["groups"][1]["nodes"], 1);
    let collide = "type: task\ngroups:\n  - name: '1'\n    commands: [x]\n  - commands: [y]\n";
    assert!(err(collide).contains("duplicate group name '1'"));
    let dup =
        "type: task\ngroups:\n  - name: a\n    commands: [x]\n  - name: a\n    commands: [y]\n";
    assert!(err(dup).contains("duplicate group name 'a'"));
    assert!(
        err("type: task\ngroups:\n  - name: Bad_Name\n    commands: [x]\n")
            .contains("invalid group name")
    );
    assert!(err("type: task\ncommands: [x]\ngroups: []\n").contains("at least one group"));
    assert!(
        err("type: task\nnodes: 2\ngroups:\n  - commands: [x]\n").contains("`nodes` cannot be set")
    );
    assert!(
        err("type: task\nentrypoint: x\ngroups:\n  - commands: [x]\n")
            .contains("`entrypoint` cannot be set")
    );
    assert!(ok("type: task\ncommands: [x]\n").get("groups").is_none());
}

#[test]
fn python_float_trap_and_number_coercion() {
    let json = ok("type: task\npython: 3.10\nname: 123\ncommands: [1, 2.5]\nenv: {PORT: 8080}\n");
    assert_eq!(json["python"], "3.10");
    assert_eq!(json["name"], "123");
    assert_eq!(json["commands"], json!(["1", "2.5"]));
    assert_eq!(json["env"]["PORT"], "8080");
    assert!(err("type: task\npython: 2.7\ncommands: [x]\n").contains("invalid value '2.7'"));
}

#[test]
fn volumes_discriminate_by_backend() {
    let aws = ok("type: volume\nbackend: aws\nregion: eu-central-1\nsize: 100GB\n");
    assert_eq!(aws["size"], 100.0);
    assert!(aws.get("access_modes").is_none());
    let k8s = ok("type: volume\nbackend: kubernetes\nname: v\n");
    assert_eq!(k8s["access_modes"], json!(["ReadWriteOnce"]));
    assert_eq!(k8s["region"], "");
    assert!(err("type: volume\nbackend: aws\nsize: 1\n").contains("region: field required"));
    assert!(err("type: volume\nbackend: kubernetes\nvolume_id: x\n")
        .contains("unknown field `volume_id`"));
    assert!(err("type: volume\nbackend: azure\n").contains("backend: invalid value 'azure'"));
}

#[test]
fn gateway_certificate_defaults_and_null() {
    let g = "type: gateway\nbackend: aws\nregion: r\n";
    assert_eq!(ok(g)["certificate"], json!({"type": "lets-encrypt"}));
    assert!(ok(&format!("{g}certificate: null\n"))
        .get("certificate")
        .is_none());
    assert_eq!(
        ok(&format!("{g}certificate: {{type: acm, arn: a}}\n"))["certificate"],
        json!({"type": "acm", "arn": "a"})
    );
    assert!(err(&format!("{g}certificate: {{type: acm}}\n"))
        .contains("certificate.arn: field required"));
}
