//! `dstack event` on real runs: a task's transitions within its run, `--since`, the target
//! and type filters, and `-w` printing an event as it happens.

mod common;

use std::io::BufRead;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{quick, text, Env};

/// The lines `dstack event ARGS` prints, each without its time (`[run x] message`).
fn events(env: &Env, args: &[&str]) -> Vec<String> {
    let out = env.run(&[&["event"], args].concat());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .map(|line| {
            let (time, rest) = line.split_once("] ").expect("[time] first");
            assert_eq!(time.len(), "[2026-12-07 10:11:12".len(), "{line}");
            rest.to_string()
        })
        .collect()
}

/// `YYYY-MM-DDTHH:MM:SSZ` of now.
fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{secs}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .unwrap();
    text(&out.stdout).trim().to_string()
}

#[test]
fn a_tasks_transitions_are_listed_within_its_run_and_since_a_time() {
    let env = Env::new();
    quick(&env, "first");
    assert_eq!(
        events(&env, &["--within-run", "first"]),
        [
            "[run first] Run submitted. Status: SUBMITTED",
            "[job first-0-0] Job created on run submission. Status: SUBMITTED",
            "[job first-0-0] Job status changed SUBMITTED -> PROVISIONING",
            "[job first-0-0] Job status changed PROVISIONING -> RUNNING",
            "[run first] Run status changed SUBMITTED -> RUNNING",
            "[job first-0-0] Job status changed RUNNING -> DONE. Termination reason: DONE_BY_RUNNER",
            "[run first] Run status changed RUNNING -> DONE. Termination reason: ALL_JOBS_DONE",
        ]
    );
    // `list` is the same; the run alone; its jobs alone.
    assert_eq!(
        events(&env, &["list", "--within-run", "first"]).len(),
        7,
        "`event list`"
    );
    let run_only = events(&env, &["--target-run", "first"]);
    assert_eq!(run_only.len(), 3, "{run_only:?}");
    assert!(run_only.iter().all(|l| l.starts_with("[run first]")));
    let jobs_only = events(
        &env,
        &["--within-run", "first", "--include-target-type", "job"],
    );
    assert_eq!(jobs_only.len(), 4, "{jobs_only:?}");
    // The local host's fleet and instance were created with the first run.
    let local = events(&env, &["--within-fleet", "local"]);
    assert!(
        local.contains(&"[instance local-0] Instance created. Status: IDLE".to_string()),
        "{local:?}"
    );

    // `--since`: a time after the first run leaves it out; a duration back before it not.
    std::thread::sleep(Duration::from_millis(1100));
    let after_first = rfc3339_now();
    std::thread::sleep(Duration::from_millis(1100));
    quick(&env, "second");
    let since = events(&env, &["--since", &after_first]);
    assert!(!since.is_empty());
    assert!(
        since.iter().all(|l| l.contains("second")),
        "only the second run's: {since:?}"
    );
    assert_eq!(since[0], "[run second] Run submitted. Status: SUBMITTED");
    let hour = events(&env, &["--since", "1h"]);
    assert!(hour.iter().any(|l| l.contains("[run first]")), "{hour:?}");
    assert!(hour.iter().any(|l| l.contains("[run second]")), "{hour:?}");

    // Names that name nothing are errors, as in dstack.
    let out = env.run(&["event", "--within-run", "nosuch"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("run nosuch not found"));
    let out = env.run(&["event", "--target-run", "a", "--target-fleet", "b"]);
    assert_eq!(out.status.code(), Some(2), "one kind of target at a time");
}

#[test]
fn watching_prints_an_event_as_it_happens() {
    let env = Env::new();
    quick(&env, "before");
    let mut watcher = env
        .cmd(&["event", "-w", "--include-target-type", "run"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = watcher.stdout.take().unwrap();
    let (lines, seen) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let mut wait_for = |what: &str| -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match seen.recv_timeout(left) {
                Ok(line) if line.contains(what) => return line,
                Ok(_) => {}
                Err(_) => {
                    let _ = watcher.kill();
                    let _ = watcher.wait();
                    panic!("`dstack event -w` printed no line with {what:?}");
                }
            }
        }
    };
    // The recent events first, then the new ones as they are recorded.
    wait_for("[run before] Run status changed RUNNING -> DONE");
    quick(&env, "later");
    wait_for("[run later] Run submitted. Status: SUBMITTED");
    wait_for("[run later] Run status changed RUNNING -> DONE");
    watcher.kill().unwrap();
    watcher.wait().unwrap();
}
