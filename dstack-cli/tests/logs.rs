//! `dstack logs` on real runs: `--job`/`--replica` (the node of a 2-node task on namespace SSH
//! hosts, whose fleet `dstack delete -f` deletes), `--since` (by the agent's timestamp index),
//! `-d/--diagnose` (the engine's record).

mod common;
#[path = "../../dstack-backends/tests/common/netns.rs"]
#[allow(dead_code)]
mod netns;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{text, Env};

/// Polls `f` for up to 30 s.
fn wait_for(env: &Env, mut f: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        if Instant::now() >= deadline {
            let runs = text(&env.run(&["ps", "-a", "--json"]).stdout);
            panic!("timed out waiting for {what}\nruns: {runs}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` of a time in Unix ms.
fn rfc3339(ms: u64) -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{}", ms / 1000), "+%Y-%m-%dT%H:%M:%S"])
        .output()
        .unwrap();
    format!("{}.{:03}Z", text(&out.stdout).trim(), ms % 1000)
}

#[test]
fn logs_of_the_second_node_of_a_two_node_task_on_namespace_hosts() {
    let env = Env::new();
    let hosts = netns::TestHosts::start(2);
    let fleet = format!("{}placement: cluster\n", hosts.fleet_yaml("loghosts"));
    let fleet = env.write("hosts.dstack.yml", &fleet);
    let out = env.run(&["apply", "-f", &fleet, "-y"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    let task = env.write(
        "pair.dstack.yml",
        "type: task\nname: pair\nnodes: 2\nfleets: [loghosts]\n\
         commands: [echo node $DSTACK_NODE_RANK of $DSTACK_NODES_NUM]\n\
         resources: {cpu: 1.., memory: 0.1GB..}\n",
    );
    // `-b remote` keeps the fleet's hosts (dstack's backend of SSH fleets), `-b aws` not.
    let plan = text(&env.run(&["apply", "-f", &task, "-b", "remote"]).stdout);
    assert_eq!(plan.matches("ssh (remote)").count(), 2, "{plan}");
    let plan = text(&env.run(&["apply", "-f", &task, "-b", "aws"]).stdout);
    assert!(plan.contains("No offers"), "{plan}");
    let out = env.run(&["apply", "-f", &task, "-y"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    let out = env.run(&["logs", "pair", "--job", "1"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "node 1 of 2\n");
    let out = env.run(&["logs", "pair"]);
    assert_eq!(text(&out.stdout), "node 0 of 2\n");
    let out = env.run(&["logs", "pair", "--job", "0", "--replica", "0"]);
    assert_eq!(text(&out.stdout), "node 0 of 2\n");

    // A job the run does not have is named in the error.
    let out = env.run(&["logs", "pair", "--job", "2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("run pair has no job 2 in replica 0"),
        "{}",
        text(&out.stderr)
    );
    let out = env.run(&["logs", "pair", "--replica", "1"]);
    assert_eq!(out.status.code(), Some(1));

    // The engine's record of the second node: on another host than the first.
    let diagnose = |job: &str| {
        let out = env.run(&["logs", "pair", "-d", "--job", job]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let (first, second) = (diagnose("0"), diagnose("1"));
    assert!(
        second.starts_with("replica 0 job 1 submission 0: done\n"),
        "{second}"
    );
    assert!(second.contains("  exit status: 0\n"), "{second}");
    let instance = |record: &str| {
        record
            .lines()
            .find_map(|l| l.strip_prefix("  instance: "))
            .unwrap()
            .to_string()
    };
    assert!(instance(&second).contains("(ssh, "), "{second}");
    assert_ne!(instance(&first), instance(&second));

    // `dstack fleet get` shows that fleet's hosts alone.
    let out = env.run(&["fleet", "get", "loghosts"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert_eq!(shown.lines().count(), 3, "a header and two hosts: {shown}");
    assert!(shown.contains("loghosts"), "{shown}");
    let out = env.run(&["fleet", "get", "nosuch"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("fleet nosuch not found"));

    // `dstack delete -f` deletes the fleet its file names.
    let out = env.run(&["delete", "-f", &fleet, "-y"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("Fleet loghosts deleted"),
        "{}",
        text(&out.stderr)
    );
    let fleets = text(&env.run(&["fleet"]).stdout);
    assert!(!fleets.contains("loghosts"), "{fleets}");
}

#[test]
fn logs_since_prints_only_what_was_written_after_that_time() {
    let env = Env::new();
    let flag = env.home.path().join("go-on");
    let task = env.write(
        "tail.dstack.yml",
        &format!(
            "type: task\nname: tail\ncommands:\n  - echo early\n  - while [ ! -e {} ]; do sleep 0.05; done\n  - echo late\nresources: {{cpu: 1.., memory: 0.1GB..}}\n",
            flag.display()
        ),
    );
    let out = env.run(&["apply", "-f", &task, "-y", "-d"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    wait_for(
        &env,
        || text(&env.run(&["logs", "tail"]).stdout) == "early\n",
        "the first line",
    );
    // A time after the first line was written and before the second is.
    let between = now_ms() + 1;
    while now_ms() <= between {
        std::thread::yield_now();
    }
    std::fs::write(&flag, "").unwrap();
    let out = env.run(&["logs", "-f", "tail"]);
    assert_eq!(text(&out.stdout), "early\nlate\n");

    let out = env.run(&["logs", "tail", "--since", &rfc3339(between)]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "late\n");
    // Durations count back from now: an hour holds both lines, none is newer than now.
    assert_eq!(
        text(&env.run(&["logs", "tail", "--since", "1h"]).stdout),
        "early\nlate\n"
    );
    assert_eq!(
        text(&env.run(&["logs", "tail", "--since", "0s"]).stdout),
        ""
    );
    // `attach --logs --since` streams from the same time.
    let out = env.run(&["attach", "tail", "--logs", "--since", &rfc3339(between)]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "late\n");

    let out = env.run(&["logs", "tail", "--since", "2023-09-24T15:30:00"]);
    assert_eq!(out.status.code(), Some(2), "clap refuses the value");
    assert!(
        text(&out.stderr).contains("RFC 3339 time with a UTC offset"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn logs_diagnose_shows_why_a_job_failed() {
    let env = Env::new();
    let task = env.write(
        "fail.dstack.yml",
        "type: task\nname: failing\ncommands: [echo oops, exit 3]\nresources: {cpu: 1.., memory: 0.1GB..}\n",
    );
    let out = env.run(&["apply", "-f", &task, "-y"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let out = env.run(&["logs", "failing", "--diagnose"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let record = text(&out.stdout);
    assert!(
        record.starts_with("replica 0 job 0 submission 0: failed\n"),
        "{record}"
    );
    for line in [
        "  exit status: 3\n",
        "  termination reason: ",
        "  submitted: ",
        "  started: ",
        "  finished: ",
        "  instance: ",
    ] {
        assert!(record.contains(line), "{line:?} missing from {record}");
    }
    assert!(!record.contains("oops"), "not the job's output: {record}");
}
