//! dstack's JSON shapes (`dstack_core::api`) of representative records.
//!
//! The tests here check what the conversions say in Rust. The shapes themselves are checked by
//! dstack's own models: `scripts/check-dstack-shapes.sh` runs `writes_dstack_shapes` with
//! `DSTACK_SHAPES_OUT=DIR` (every answer is written there as `<Model>.<case>.json`), parses
//! them with dstack 0.22.5 (`scripts/check_dstack_shapes.py`), which writes the requests
//! dstack's client would send next into `DIR/requests`, and then runs
//! `reads_what_dstack_clients_send` with `DSTACK_SHAPES_REQUESTS=DIR/requests`.

use std::collections::BTreeMap;
use std::path::Path;

use dstack_core::agent::{GpuInfo, HostInfo};
use dstack_core::api::{self, LogEvent, LogSource, Owner, RequestError};
use dstack_core::config::{self, Configuration};
use dstack_core::engine::{ApplyOptions, RunPlan};
use dstack_core::events::{Event, Target, TargetType};
use dstack_core::model::{
    Fleet, FleetStatus, HostSession, Instance, InstanceStatus, Job, JobStatus, RawJson,
    Reservation, Run, RunSpec, RunStatus, Volume, VolumeAttachment, VolumeStatus,
};
use dstack_core::offers::{Availability, Offer};
use serde_json::{json, Value};

const OWNER: Owner<'static> = Owner {
    project_name: "main",
    user: "admin",
};

/// 2026-12-07T10:11:12.345Z.
const T0: u64 = 1_796_638_272_345;

fn configuration(yaml: &str) -> Configuration {
    config::parse(yaml, "test.dstack.yml").unwrap()
}

fn host(gpus: usize) -> HostInfo {
    HostInfo {
        cpus: 16,
        memory_bytes: 64 << 30,
        disk_bytes: 500 << 30,
        cpu_arch: "x86".to_string(),
        gpus: (0..gpus)
            .map(|i| GpuInfo {
                index: i as u32,
                name: "A100".to_string(),
                memory_mib: 81_920,
                vendor: "nvidia".to_string(),
                uuid: None,
            })
            .collect(),
    }
}

/// A run record (read from its stored JSON, so that fields added to the record with a
/// default need no change here).
fn run(name: &str, yaml: &str, status: RunStatus) -> Run {
    let configuration = configuration(yaml);
    serde_json::from_value(json!({
        "id": "3f0c2b7a-9d4e-4c1b-8a2f-6e5d4c3b2a19",
        "name": name,
        "status": status,
        "termination_reason": null,
        "status_message": null,
        "spec": RunSpec {
            configuration: RawJson::from_value(&configuration.to_json()),
            configuration_path: Some(".dstack.yml".to_string()),
            client_dir: "/home/me/project".to_string(),
            client_env: BTreeMap::from([
                ("USER".to_string(), "me".to_string()),
                ("HF_TOKEN".to_string(), "hf_x".to_string()),
            ]),
            group: None,
            archives: Vec::new(),
            artifacts: Default::default(),
        },
        "submitted_at_ms": T0,
        "resubmission_attempt": 0,
        "next_attempt_at_ms": null,
    }))
    .unwrap()
}

fn job(run: &Run, job_num: u32, submission_num: u32, status: JobStatus) -> Job {
    let mut job = Job::submission(run, job_num, submission_num);
    // Fixed ids (the answers are built twice, see `reads_what_dstack_clients_send`), time
    // ordered as the engine's (UUID v7).
    let run_tag = run
        .name
        .bytes()
        .fold(0u16, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
    job.id = format!("01938a3e-7b2c-7d4e-8f1a-{run_tag:04x}{job_num:04x}{submission_num:04x}");
    job.status = status;
    job.submitted_at_ms = T0 + 1000 * u64::from(submission_num);
    job
}

/// Places `job` on `instance`, started a second after its submission.
fn on(mut job: Job, instance: &Instance) -> Job {
    job.instance_id = Some(instance.id.clone());
    job.reservation = Some(Reservation {
        cpus: 2,
        memory_mib: 8192,
        gpus: vec![0],
    });
    job.started_at_ms = Some(job.submitted_at_ms + 1000);
    job
}

/// Ends `job` an hour after it started.
fn ended(mut job: Job, status: JobStatus, reason: &str, exit_status: Option<i32>) -> Job {
    job.status = status;
    job.termination_reason = Some(reason.to_string());
    job.exit_status = exit_status;
    job.finished_at_ms = Some(job.started_at_ms.unwrap_or(job.submitted_at_ms) + 3_600_000);
    job
}

/// An instance record with what every instance has (read from JSON, so that fields added to
/// the record with a default need no change here).
fn instance(
    id: &str,
    name: &str,
    fleet_id: &str,
    backend: &str,
    status: InstanceStatus,
) -> Instance {
    serde_json::from_value(json!({
        "id": id,
        "name": name,
        "fleet_id": fleet_id,
        "backend": backend,
        "status": status,
        "host": host(8),
        "price": 0.0,
        "backend_data": null,
        "created_at_ms": T0,
    }))
    .unwrap()
}

fn local_instance() -> Instance {
    let mut local = instance(
        "instance-local-0",
        "local-0",
        "fleet-local",
        "local",
        InstanceStatus::Busy,
    );
    local.host = host(1);
    local.backend_data = json!({"socket": "/tmp/agent.sock"});
    local.created_at_ms = T0 - 60_000;
    local
}

fn ssh_instance(num: u32, status: InstanceStatus) -> Instance {
    let mut ssh = instance(
        &format!("6a1e0c1d-2b3c-4d5e-8f60-71829304a5b{num}"),
        &format!("on-prem-{num}"),
        "9e8d7c6b-5a4f-4e3d-9c2b-1a0f9e8d7c6b",
        "ssh",
        status,
    );
    ssh.created_at_ms = T0 - 120_000;
    ssh.address = Some(format!("10.0.0.{}", 10 + num));
    ssh.session = Some(HostSession {
        home: "/home/ubuntu".to_string(),
        env: BTreeMap::from([("USER".to_string(), "ubuntu".to_string())]),
    });
    ssh.status_message =
        (status == InstanceStatus::Terminated).then(|| "the host did not answer".to_string());
    ssh.blocks = Some(4);
    ssh.containers = true;
    ssh
}

fn aws_offer(availability: Availability) -> Offer {
    Offer {
        backend: "aws".to_string(),
        instance_type: "p4d.24xlarge".to_string(),
        region: "us-east-1".to_string(),
        price: 32.77,
        spot: false,
        resources: host(8),
        availability,
        availability_zones: Some(vec!["us-east-1a".to_string()]),
        backend_data: json!({"ami": "ami-0123"}),
    }
}

fn aws_instance() -> Instance {
    let mut aws = instance(
        "b1c2d3e4-f5a6-4b7c-8d9e-0f1a2b3c4d5e",
        "cloud-0",
        "c2d3e4f5-a6b7-4c8d-9e0f-1a2b3c4d5e6f",
        "aws",
        InstanceStatus::Busy,
    );
    aws.price = 32.77;
    aws.backend_data = json!({});
    aws.address = Some("3.80.1.2".to_string());
    aws.containers = true;
    aws.offer = Some(aws_offer(Availability::Available));
    aws.idle_timeout_secs = Some(300);
    aws.cloud_id = Some("i-0abc".to_string());
    aws
}

const TASK: &str = "type: task\nname: train\ncommands:\n  - pip install -r requirements.txt\n  - python train.py\nenv:\n  - HF_TOKEN\n  - MODE=full\nresources:\n  gpu: A100:1\n";

/// Every answer of the cases, by file name (`<Model>.<case>.json`).
fn shapes() -> Vec<(String, Value)> {
    let local = local_instance();
    let instances = vec![local.clone(), aws_instance()];
    let mut out = Vec::new();
    let mut add = |name: &str, value: Value| out.push((format!("{name}.json"), value));

    // Submitted: waiting for capacity.
    let waiting = run("train", TASK, RunStatus::Submitted);
    let waiting_jobs = vec![job(&waiting, 0, 0, JobStatus::Submitted)];
    add(
        "Run.submitted",
        api::run(&OWNER, &waiting, &waiting_jobs, &instances),
    );

    // Running on this machine.
    let mut running = run("train", TASK, RunStatus::Running);
    running.id = "4a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d".to_string();
    let running_jobs = vec![on(job(&running, 0, 0, JobStatus::Running), &local)];
    let running_json = api::run(&OWNER, &running, &running_jobs, &instances);
    add("Run.running", running_json.clone());

    // Done.
    let mut done = run("train", TASK, RunStatus::Done);
    done.termination_reason = Some("all_jobs_done".to_string());
    let done_jobs = vec![ended(
        on(job(&done, 0, 0, JobStatus::Running), &local),
        JobStatus::Done,
        "done_by_runner",
        Some(0),
    )];
    add("Run.done", api::run(&OWNER, &done, &done_jobs, &instances));

    // Failed: the commands exited with 3, on a cloud instance (with a cost).
    let mut failed = run("train", TASK, RunStatus::Failed);
    failed.termination_reason = Some("job_failed".to_string());
    let failed_jobs = vec![ended(
        on(job(&failed, 0, 0, JobStatus::Running), &aws_instance()),
        JobStatus::Failed,
        "container_exited_with_error",
        Some(3),
    )];
    add(
        "Run.failed",
        api::run(&OWNER, &failed, &failed_jobs, &instances),
    );

    // Retried: no capacity first, then running.
    let retrying_yaml =
        format!("{TASK}retry:\n  on_events: [no-capacity, error]\n  duration: 2h\n");
    let mut retried = run("train", &retrying_yaml, RunStatus::Running);
    retried.resubmission_attempt = 1;
    let mut first = job(&retried, 0, 0, JobStatus::Failed);
    first.termination_reason = Some("failed_to_start_due_to_no_capacity".to_string());
    first.termination_message = Some("no offers".to_string());
    first.finished_at_ms = Some(T0 + 500);
    let retried_jobs = vec![
        on(job(&retried, 0, 1, JobStatus::Running), &local),
        first.clone(),
    ];
    add(
        "Run.retried",
        api::run(&OWNER, &retried, &retried_jobs, &instances),
    );

    // Pending after the first attempt found no capacity: `retrying`.
    let mut pending = run("train", &retrying_yaml, RunStatus::Pending);
    pending.resubmission_attempt = 1;
    pending.next_attempt_at_ms = Some(T0 + 15_000);
    add(
        "Run.pending",
        api::run(&OWNER, &pending, std::slice::from_ref(&first), &instances),
    );

    // Two nodes on SSH hosts, stopped by the user.
    let fleet_hosts = vec![
        ssh_instance(0, InstanceStatus::Busy),
        ssh_instance(1, InstanceStatus::Busy),
    ];
    let mut multi = run(
        "dist",
        "type: task\nnodes: 2\nimage: pytorch/pytorch\ncommands: [torchrun train.py]\nmax_duration: 1d\nresources:\n  gpu: 8\n  shm_size: 16GB\n",
        RunStatus::Terminated,
    );
    multi.termination_reason = Some("stopped_by_user".to_string());
    let multi_jobs: Vec<Job> = fleet_hosts
        .iter()
        .enumerate()
        .map(|(n, h)| {
            ended(
                on(job(&multi, n as u32, 0, JobStatus::Running), h),
                JobStatus::Terminated,
                "terminated_by_user",
                None,
            )
        })
        .collect();
    add(
        "Run.multinode",
        api::run(&OWNER, &multi, &multi_jobs, &fleet_hosts),
    );

    // A service and a dev environment, just submitted.
    let service = run(
        "llm",
        "type: service\nname: llm\nimage: vllm/vllm-openai\ncommands: [vllm serve Qwen/Qwen2.5-7B]\nport: 8000\nmodel: Qwen/Qwen2.5-7B\nreplicas: 1..2\nscaling:\n  metric: rps\n  target: 10\nresources:\n  gpu: 24GB\n",
        RunStatus::Submitted,
    );
    let service_jobs = vec![job(&service, 0, 0, JobStatus::Submitted)];
    add(
        "Run.service",
        api::run(&OWNER, &service, &service_jobs, &instances),
    );
    let ide = run(
        "ide",
        "type: dev-environment\nide: vscode\npython: \"3.12\"\ninit: [pip install -e .]\ninactivity_duration: 2h\n",
        RunStatus::Provisioning,
    );
    let ide_jobs = vec![{
        let mut j = on(job(&ide, 0, 0, JobStatus::Provisioning), &local);
        j.started_at_ms = None;
        j
    }];
    add("Run.ide", api::run(&OWNER, &ide, &ide_jobs, &instances));

    // `runs/list`.
    add(
        "RunList.all",
        Value::Array(vec![
            api::run(&OWNER, &waiting, &waiting_jobs, &instances),
            running_json.clone(),
            api::run(&OWNER, &done, &done_jobs, &instances),
        ]),
    );

    // Plans: this machine and a cloud offer; one with nothing; one replacing a running run.
    let local_offer = Offer {
        backend: "local".to_string(),
        instance_type: "local-0".to_string(),
        region: "local".to_string(),
        price: 0.0,
        spot: false,
        resources: host(1),
        availability: Availability::Idle,
        availability_zones: None,
        backend_data: Value::Null,
    };
    let plan = RunPlan {
        configuration: configuration(TASK),
        offers: vec![
            local_offer,
            aws_offer(Availability::Available),
            aws_offer(Availability::NotAvailable),
        ],
        no_offers_reason: None,
        total_offers: 7,
    };
    let named = ApplyOptions {
        configuration_path: Some("train.dstack.yml".to_string()),
        ..ApplyOptions::default()
    };
    add("RunPlan.offers", api::run_plan(&OWNER, &plan, &named, None));
    let unnamed_yaml = "type: task\ncommands: [nvidia-smi]\nresources:\n  gpu: H100:8\n";
    let nothing = RunPlan {
        configuration: configuration(unnamed_yaml),
        offers: Vec::new(),
        no_offers_reason: Some("no fleet can run it".to_string()),
        total_offers: 0,
    };
    add(
        "RunPlan.none",
        api::run_plan(&OWNER, &nothing, &ApplyOptions::default(), None),
    );
    add(
        "RunPlan.replacing",
        api::run_plan(&OWNER, &plan, &named, Some(running_json)),
    );
    let groups = RunPlan {
        configuration: configuration(
            "type: task\nname: hetero\ngroups:\n  - name: head\n    commands: [python head.py]\n    resources: {gpu: 0}\n  - name: workers\n    nodes: 2\n    commands: [python worker.py]\n    resources: {gpu: 1}\n",
        ),
        offers: vec![aws_offer(Availability::Available)],
        no_offers_reason: None,
        total_offers: 1,
    };
    add(
        "RunPlan.groups",
        api::run_plan(&OWNER, &groups, &ApplyOptions::default(), None),
    );

    // Fleets: this machine's (applied from no configuration) and an SSH fleet.
    let local_fleet = Fleet {
        id: "fleet-local".to_string(),
        name: "local".to_string(),
        status: FleetStatus::Active,
        configuration: None,
        created_at_ms: T0 - 60_000,
        status_message: None,
        consolidation: None,
    };
    add(
        "Fleet.local",
        api::fleet(&OWNER, &local_fleet, std::slice::from_ref(&local)),
    );
    let ssh_configuration = configuration(
        "type: fleet\nname: on-prem\nplacement: cluster\nblocks: 4\nssh_config:\n  user: ubuntu\n  identity_file: ~/.ssh/id_rsa\n  hosts:\n    - 10.0.0.10\n    - hostname: 10.0.0.11\n      port: 2222\n",
    );
    let ssh_fleet = Fleet {
        id: "9e8d7c6b-5a4f-4e3d-9c2b-1a0f9e8d7c6b".to_string(),
        name: "on-prem".to_string(),
        status: FleetStatus::Active,
        configuration: Some(ssh_configuration.to_json()),
        created_at_ms: T0 - 120_000,
        status_message: None,
        consolidation: None,
    };
    let ssh_hosts = vec![
        ssh_instance(0, InstanceStatus::Idle),
        ssh_instance(1, InstanceStatus::Terminated),
        local.clone(),
    ];
    add("Fleet.ssh", api::fleet(&OWNER, &ssh_fleet, &ssh_hosts));
    add(
        "Instance.cloud",
        api::instance(&OWNER, &aws_instance(), Some("cloud")),
    );
    add(
        "FleetList.all",
        Value::Array(vec![
            api::fleet(&OWNER, &local_fleet, std::slice::from_ref(&local)),
            api::fleet(&OWNER, &ssh_fleet, &ssh_hosts),
        ]),
    );

    // Volumes: an AWS volume attached to a cloud instance, and a deleted one.
    let volume_configuration =
        configuration("type: volume\nname: data\nbackend: aws\nregion: us-east-1\nsize: 100GB\n");
    let attached = Volume {
        id: "d4e5f6a7-b8c9-4d0e-8f1a-2b3c4d5e6f7a".to_string(),
        name: "data".to_string(),
        status: VolumeStatus::Active,
        status_message: None,
        configuration: volume_configuration.to_json(),
        backend: "aws".to_string(),
        region: "us-east-1".to_string(),
        volume_id: Some("vol-0123".to_string()),
        availability_zone: Some("us-east-1a".to_string()),
        size_gb: Some(100),
        external: false,
        attachments: vec![VolumeAttachment {
            instance_id: aws_instance().id,
            device_name: "/dev/sdf".to_string(),
        }],
        created_at_ms: T0,
        last_used_at_ms: None,
    };
    add(
        "Volume.attached",
        api::volume(&OWNER, &attached, &instances),
    );
    let mut deleted = attached.clone();
    deleted.status = VolumeStatus::Deleted;
    deleted.attachments.clear();
    deleted.last_used_at_ms = Some(T0 + 60_000);
    add("Volume.deleted", api::volume(&OWNER, &deleted, &instances));

    // Events: a job's creation and the change that ends it, with its reason.
    let target = Target {
        kind: TargetType::Job,
        id: "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b".to_string(),
        name: "train-0-0".to_string(),
    };
    let created = Event {
        id: 1,
        recorded_at_ms: T0,
        within: Target {
            kind: TargetType::Run,
            id: "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d".to_string(),
            name: "train".to_string(),
        },
        target,
        replica_num: Some(0),
        job_num: Some(0),
        submission_num: Some(0),
        from: None,
        to: "submitted".to_string(),
        reason: None,
        reason_message: None,
    };
    let ended = Event {
        id: 2,
        from: Some("running".to_string()),
        to: "failed".to_string(),
        reason: Some("container_exited_with_error".to_string()),
        reason_message: Some("exit status 1".to_string()),
        ..created.clone()
    };
    add(
        "EventList.job",
        Value::Array(vec![
            api::event(&created, &OWNER),
            api::event(&ended, &OWNER),
        ]),
    );
    let registered_configuration = configuration(
        "type: volume\nname: old\nbackend: gcp\nregion: europe-west4\nvolume_id: disk-1\n",
    );
    let mut registered = attached.clone();
    registered.id = "e5f6a7b8-c9d0-4e1f-9a2b-3c4d5e6f7a8b".to_string();
    registered.name = "old".to_string();
    registered.status = VolumeStatus::Submitted;
    registered.configuration = registered_configuration.to_json();
    registered.backend = "gcp".to_string();
    registered.volume_id = None;
    registered.external = true;
    registered.attachments.clear();
    add(
        "VolumeList.all",
        Value::Array(vec![
            api::volume(&OWNER, &attached, &instances),
            api::volume(&OWNER, &registered, &instances),
        ]),
    );

    // A page of logs, and the last one.
    add(
        "JobSubmissionLogs.page",
        api::log_page(
            &[
                LogEvent {
                    timestamp_ms: T0,
                    source: LogSource::Stdout,
                    message: b"epoch 1: loss 0.31\n",
                },
                LogEvent {
                    timestamp_ms: T0 + 1,
                    source: LogSource::Stderr,
                    message: b"warning: \xff not UTF-8\n",
                },
            ],
            Some("4096"),
        ),
    );
    add("JobSubmissionLogs.end", api::log_page(&[], None));

    // Errors.
    add(
        "Error.not_found",
        api::error_body(api::ErrorCode::ResourceNotExists, "run train not found"),
    );
    let refused = api::plan_request(&json!({
        "run_spec": {"configuration": {"type": "task", "commands": ["x"]}, "file_archives": [{}]},
    }))
    .unwrap_err();
    add("Error.unsupported", refused.body());
    out.extend(corpus_shapes());
    out
}

/// With `DSTACK_SHAPES_CORPUS=DIR` (the corpus' `valid/` folder of `.dstack.yml` files): a
/// plan (without offers) of every run configuration there, a fleet of every fleet
/// configuration and a volume of every volume configuration.
fn corpus_shapes() -> Vec<(String, Value)> {
    let Ok(dir) = std::env::var("DSTACK_SHAPES_CORPUS") else {
        return Vec::new();
    };
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".dstack.yml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let stem = path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .replace(".dstack.yml", "");
        let text = std::fs::read_to_string(&path).unwrap();
        let Ok(configuration) = config::parse(&text, &stem) else {
            continue; // e.g. presets, which this project does not read
        };
        let value = match &configuration {
            Configuration::Task(_)
            | Configuration::Service(_)
            | Configuration::DevEnvironment(_) => {
                let plan = RunPlan {
                    configuration: configuration.clone(),
                    offers: Vec::new(),
                    no_offers_reason: None,
                    total_offers: 0,
                };
                let options = ApplyOptions {
                    configuration_path: Some(format!("{stem}.dstack.yml")),
                    ..ApplyOptions::default()
                };
                ("RunPlan", api::run_plan(&OWNER, &plan, &options, None))
            }
            Configuration::Fleet(_) => {
                let fleet = Fleet {
                    id: "9e8d7c6b-5a4f-4e3d-9c2b-1a0f9e8d7c6b".to_string(),
                    name: configuration.name().unwrap_or("fleet").to_string(),
                    status: FleetStatus::Active,
                    configuration: Some(configuration.to_json()),
                    created_at_ms: T0,
                    status_message: None,
                    consolidation: None,
                };
                ("Fleet", api::fleet(&OWNER, &fleet, &[]))
            }
            Configuration::Volume(v) => {
                let volume = Volume {
                    id: "d4e5f6a7-b8c9-4d0e-8f1a-2b3c4d5e6f7a".to_string(),
                    name: configuration.name().unwrap_or("volume").to_string(),
                    status: VolumeStatus::Submitted,
                    status_message: None,
                    configuration: configuration.to_json(),
                    backend: v.backend.clone(),
                    region: v.region.clone().unwrap_or_default(),
                    volume_id: None,
                    availability_zone: None,
                    size_gb: None,
                    external: v.volume_id.is_some(),
                    attachments: Vec::new(),
                    created_at_ms: T0,
                    last_used_at_ms: None,
                };
                ("Volume", api::volume(&OWNER, &volume, &[]))
            }
            Configuration::Gateway(_) => continue,
        };
        out.push((format!("{}.corpus-{stem}.json", value.0), value.1));
    }
    out
}

#[test]
fn writes_dstack_shapes() {
    let shapes = shapes();
    if let Ok(dir) = std::env::var("DSTACK_SHAPES_OUT") {
        let dir = Path::new(&dir);
        std::fs::create_dir_all(dir).unwrap();
        for (name, value) in &shapes {
            let text = serde_json::to_string_pretty(value).unwrap();
            std::fs::write(dir.join(name), text).unwrap();
        }
    }
    let get = |name: &str| &shapes.iter().find(|(n, _)| n == name).unwrap().1;

    // Ids are UUIDs v4, times ISO 8601 with an offset.
    let running = get("Run.running.json");
    let submission = &running["jobs"][0]["job_submissions"][0];
    let id = uuid::Uuid::parse_str(submission["id"].as_str().unwrap()).unwrap();
    assert_eq!(id.get_version_num(), 4);
    assert_eq!(running["submitted_at"], "2026-12-07T10:11:12.345000+00:00");
    assert_eq!(running["status"], "running");
    assert_eq!(running["latest_job_submission"], *submission);
    assert_eq!(submission["job_provisioning_data"]["backend"], "remote");
    assert_eq!(submission["job_provisioning_data"]["username"], "me");
    assert_eq!(submission["job_runtime_data"]["memory"], 8.0);
    let spec = &running["jobs"][0]["job_spec"];
    assert_eq!(spec["job_name"], "train-0-0");
    assert_eq!(
        spec["commands"],
        json!(["pip install -r requirements.txt", "python train.py"])
    );
    // A bare env name takes the client's value.
    assert_eq!(spec["env"], json!({"HF_TOKEN": "hf_x", "MODE": "full"}));
    assert_eq!(running["run_spec"]["configuration"]["type"], "task");

    // Messages and errors as dstack's server words them.
    let failed = get("Run.failed.json");
    let submission = &failed["latest_job_submission"];
    assert_eq!(submission["status"], "failed");
    assert_eq!(submission["status_message"], "exited (3)");
    assert_eq!(submission["exit_status"], 3);
    assert_eq!(failed["termination_reason"], "job_failed");
    assert!((failed["cost"].as_f64().unwrap() - 32.77).abs() < 1e-9);
    assert_eq!(
        get("Run.done.json")["latest_job_submission"]["status_message"],
        "exited (0)"
    );
    assert_eq!(get("Run.pending.json")["status_message"], "retrying");
    let multinode = get("Run.multinode.json");
    assert_eq!(multinode["jobs"].as_array().unwrap().len(), 2);
    assert_eq!(multinode["jobs"][1]["job_spec"]["jobs_per_replica"], 2);
    assert_eq!(multinode["jobs"][1]["job_spec"]["max_duration"], 86_400);
    assert_eq!(
        multinode["jobs"][1]["job_submissions"][0]["status_message"],
        "stopped"
    );

    // Submissions in order, whatever the order of the records.
    let retried = get("Run.retried.json");
    let submissions = retried["jobs"][0]["job_submissions"].as_array().unwrap();
    assert_eq!(submissions.len(), 2);
    assert_eq!(submissions[0]["status_message"], "no capacity");
    assert_eq!(submissions[1]["submission_num"], 1);
    assert_eq!(retried["latest_job_submission"], submissions[1]);
    assert_eq!(
        retried["jobs"][0]["job_spec"]["retry"],
        json!({"on_events": ["no-capacity", "error"], "duration": 7200})
    );

    // Plans.
    let plan = get("RunPlan.offers.json");
    let offers = plan["job_plans"][0]["offers"].as_array().unwrap();
    assert_eq!(offers[0]["availability"], "idle");
    assert_eq!(offers[0]["backend"], "remote");
    assert_eq!(offers[1]["backend_data"], json!({"ami": "ami-0123"}));
    assert_eq!(plan["job_plans"][0]["total_offers"], 7);
    assert_eq!(plan["job_plans"][0]["max_price"], 32.77);
    assert_eq!(plan["run_spec"]["run_name"], "train");
    assert_eq!(plan["action"], "create");
    let none = get("RunPlan.none.json");
    assert_eq!(none["job_plans"][0]["offers"], json!([]));
    assert_eq!(none["job_plans"][0]["job_spec"]["job_name"], "dry-run-0-0");
    let groups = get("RunPlan.groups.json");
    let plans = groups["job_plans"].as_array().unwrap();
    assert_eq!(plans.len(), 3);
    assert_eq!(plans[2]["job_spec"]["node_group_name"], "workers");
    assert_eq!(plans[2]["job_spec"]["node_group_job_index"], 1);
    assert_eq!(
        plans[2]["job_spec"]["commands"],
        json!(["python worker.py"])
    );

    // Fleets and volumes.
    let fleet = get("Fleet.ssh.json");
    let hosts = fleet["instances"].as_array().unwrap();
    assert_eq!(hosts.len(), 2, "instances of other fleets are left out");
    assert_eq!(hosts[1]["instance_num"], 1);
    assert_eq!(hosts[1]["status"], "terminated");
    assert_eq!(hosts[0]["total_blocks"], 4);
    assert_eq!(
        get("Fleet.local.json")["spec"]["configuration"]["name"],
        "local"
    );
    let deleted = get("Volume.deleted.json");
    assert_eq!(
        (&deleted["status"], &deleted["deleted"]),
        (&json!("active"), &json!(true))
    );
    let attached = get("Volume.attached.json");
    assert_eq!(attached["attachments"][0]["instance"]["name"], "cloud-0");

    // Logs are base64.
    let page = get("JobSubmissionLogs.page.json");
    assert_eq!(page["logs"][1]["message"], "d2FybmluZzog/yBub3QgVVRGLTgK");
    assert_eq!(page["logs"][1]["log_source"], "stderr");
    assert_eq!(page["next_token"], "4096");
}

/// What dstack's client sends after the answers above (written by the Python check), read
/// back: the configuration and name of every run and plan, the submission ids of the runs.
#[test]
fn reads_what_dstack_clients_send() {
    let Ok(dir) = std::env::var("DSTACK_SHAPES_REQUESTS") else {
        return;
    };
    let shapes = shapes();
    let answer = |name: &str| -> &Value {
        &shapes
            .iter()
            .find(|(n, _)| n == &format!("{name}.json"))
            .unwrap_or_else(|| panic!("no answer {name}"))
            .1
    };
    let mut read = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_str().unwrap().to_string();
        let body: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let (kind, case) = file.trim_end_matches(".json").split_once('.').unwrap();
        match kind {
            "get_plan" | "apply" => {
                let (run, original) = if kind == "apply" {
                    let request =
                        api::apply_request(&body).unwrap_or_else(|e| panic!("{file}: {e}"));
                    let original = answer(&format!("RunPlan.{case}"));
                    let current = &original["current_resource"];
                    assert_eq!(
                        request.current_resource_id.as_deref(),
                        current["id"].as_str(),
                        "{file}"
                    );
                    assert!(!request.force);
                    (request.run, original)
                } else {
                    let request =
                        api::plan_request(&body).unwrap_or_else(|e| panic!("{file}: {e}"));
                    let original = match case.strip_prefix("run-") {
                        Some(run) => answer(&format!("Run.{run}")),
                        None => answer(&format!("RunPlan.{case}")),
                    };
                    (request.run, original)
                };
                let spec = &original["run_spec"];
                assert_eq!(
                    run.configuration.to_json(),
                    spec["configuration"],
                    "{file}: the configuration comes back as it was sent"
                );
                assert_eq!(
                    run.options.name.as_deref(),
                    spec["run_name"].as_str(),
                    "{file}"
                );
                assert_eq!(
                    run.options.configuration_path.as_deref(),
                    spec["configuration_path"].as_str(),
                    "{file}"
                );
            }
            "poll_logs" => {
                let request =
                    api::poll_logs_request(&body).unwrap_or_else(|e| panic!("{file}: {e}"));
                let (run, n) = case.split_once('.').unwrap();
                let original = answer(&format!("Run.{run}"));
                let ids: Vec<&Value> = original["jobs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .flat_map(|j| j["job_submissions"].as_array().unwrap())
                    .map(|s| &s["id"])
                    .collect();
                let n: usize = n.parse().unwrap();
                assert_eq!(
                    request.job_submission_id,
                    ids[n].as_str().unwrap(),
                    "{file}"
                );
                assert_eq!(request.run_name, original["run_spec"]["run_name"]);
                assert_eq!(request.limit, 1000);
            }
            other => panic!("unexpected request file {other}"),
        }
        read += 1;
    }
    assert!(read > 0, "no requests in {dir}");
}

#[test]
fn a_dstack_run_spec_is_read_with_its_profile_merged() {
    let body = json!({
        "run_spec": {
            "run_name": "train",
            "repo_id": "none",
            "repo_data": {"repo_type": "virtual"},
            "repo_code_hash": null,
            "file_archives": [],
            "configuration_path": "train.dstack.yml",
            "configuration": {
                "type": "task", "commands": ["python train.py"], "image": null,
                "max_price": 2.5, "env": {"A": "1"}
            },
            "profile": {"name": "default", "default": false, "max_price": 9.0, "spot_policy": "auto", "retry": null},
            "ssh_key_pub": "ssh-ed25519 AAAA me@host"
        },
        "max_offers": 10,
        "for_offers_only": false
    });
    let request = api::plan_request(&body).unwrap();
    let Configuration::Task(task) = &request.run.configuration else {
        panic!("a task");
    };
    // The configuration's own value wins; the profile fills what it leaves unset.
    assert_eq!(task.common.profile.max_price, Some(2.5));
    assert_eq!(
        task.common.profile.spot_policy,
        Some(config::profile::SpotPolicy::Auto)
    );
    assert_eq!(request.run.options.name.as_deref(), Some("train"));
    assert_eq!(request.max_offers, Some(10));
    assert_eq!(
        request.run.ssh_key_pub.as_deref(),
        Some("ssh-ed25519 AAAA me@host")
    );
}

#[test]
fn what_is_not_honoured_is_refused_by_name() {
    let spec = |extra: Value| {
        let mut spec = json!({"configuration": {"type": "task", "commands": ["x"]}});
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        spec
    };
    let refused = |body: Value| match api::plan_request(&body) {
        Err(RequestError::Unsupported(fields)) => fields.join("; "),
        other => panic!("not refused: {other:?}"),
    };
    let message = refused(json!({
        "run_spec": spec(json!({
            "repo_data": {"repo_type": "remote", "repo_name": "x"},
            "repo_code_hash": "abc",
            "file_archives": [{"id": "0b9a6f9e-3c1d-4e2f-9a8b-7c6d5e4f3a2b", "path": "/x"}]
        })),
        "full_offers": true,
    }));
    for field in [
        "full_offers",
        "run_spec.repo_data",
        "run_spec.repo_code_hash",
        "run_spec.file_archives",
    ] {
        assert!(message.contains(field), "{field} in {message}");
    }
    // Unknown fields and other configuration types are invalid, as dstack's models say.
    let err = api::plan_request(&json!({"run_spec": spec(json!({"priority": 3}))})).unwrap_err();
    assert!(err.to_string().contains("run_spec.priority"), "{err}");
    let err = api::apply_request(&json!({
        "plan": {"run_spec": {"configuration": {"type": "fleet", "name": "f", "nodes": 1}}},
        "force": false
    }))
    .unwrap_err();
    assert!(err.to_string().contains("not `fleet`"), "{err}");
    // A configuration error names the field under the run spec.
    let err = api::plan_request(&json!({
        "run_spec": {"configuration": {"type": "task", "commands": ["x"], "nodes": 0}}
    }))
    .unwrap_err();
    assert!(matches!(err, RequestError::Configuration(_)));
    assert!(err.to_string().contains("nodes"), "{err}");
    let body = err.body();
    assert_eq!(body["detail"][0]["code"], "error");
    // Runner logs do not exist here.
    let err = api::poll_logs_request(&json!({
        "run_name": "train",
        "job_submission_id": "0b9a6f9e-3c1d-4e2f-9a8b-7c6d5e4f3a2b",
        "diagnose": true
    }))
    .unwrap_err();
    assert!(err.to_string().contains("diagnose"), "{err}");
}

#[test]
fn a_logs_poll_is_read_with_dstacks_defaults() {
    let request = api::poll_logs_request(&json!({
        "run_name": "train",
        "job_submission_id": "0B9A6F9E-3C1D-4E2F-9A8B-7C6D5E4F3A2B",
        "start_time": "2026-12-07T10:11:12.345000+00:00",
        "descending": true
    }))
    .unwrap();
    assert_eq!(
        request.job_submission_id,
        "0b9a6f9e-3c1d-4e2f-9a8b-7c6d5e4f3a2b"
    );
    assert_eq!(request.start_time_ms, Some(T0));
    assert_eq!(request.end_time_ms, None);
    assert!(request.descending);
    assert_eq!(request.limit, 100);
    let err = api::poll_logs_request(&json!({
        "run_name": "train", "job_submission_id": "x", "limit": 5000
    }))
    .unwrap_err();
    assert!(err.to_string().contains("job_submission_id"), "{err}");
}
