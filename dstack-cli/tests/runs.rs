//! `dstack ps` (`-n/--last`, `--format`, `-w/--watch` through a pseudo-terminal), `dstack stop`
//! of several runs and `dstack delete -f` on real runs.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{quick, text, Env};

/// Waits for a child process at most 30 s; kills it and fails the test past that, so that a
/// test never hangs the whole suite.
fn wait_child(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `f` for up to 30 s.
fn wait_for(env: &Env, mut f: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        if Instant::now() >= deadline {
            let runs = text(&env.run(&["ps", "-a"]).stdout);
            panic!("timed out waiting for {what}\nruns: {runs}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Submits a task named `name` that sleeps, and waits until it runs.
fn sleeper(env: &Env, name: &str) {
    let file = env.write(
        &format!("{name}.dstack.yml"),
        &format!(
            "type: task\nname: {name}\ncommands: [sleep 1000]\nresources: {{cpu: 1.., memory: 0.1GB..}}\n"
        ),
    );
    let out = env.run(&["apply", "-f", &file, "-y", "-d"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    wait_for(
        env,
        || {
            text(&env.run(&["ps"]).stdout)
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name) && l.contains("running"))
        },
        "the run to start",
    );
}

/// The run names `ps --format json` (or `--json`) lists.
fn json_names(env: &Env, args: &[&str]) -> Vec<String> {
    let out = env.run(args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let runs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    runs.as_array()
        .unwrap()
        .iter()
        .map(|r| r["run"]["name"].as_str().unwrap().to_string())
        .collect()
}

/// The first column of each row of `ps` (the run names).
fn table_names(stdout: &[u8]) -> Vec<String> {
    text(stdout)
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

#[test]
fn ps_shows_the_last_n_runs_as_a_table_or_json() {
    let env = Env::new();
    for name in ["first", "second", "third"] {
        quick(&env, name);
    }
    // Finished runs are listed with -n (it implies --all), newest first.
    assert!(table_names(&env.run(&["ps"]).stdout).is_empty());
    let out = env.run(&["ps", "-n", "2"]);
    assert_eq!(table_names(&out.stdout), ["third", "second"]);
    assert_eq!(
        table_names(&env.run(&["ps", "--last", "1"]).stdout),
        ["third"]
    );
    assert_eq!(
        json_names(&env, &["ps", "-n", "2", "--format", "json"]),
        ["third", "second"]
    );
    assert_eq!(
        json_names(&env, &["ps", "-a", "--json"]),
        ["third", "second", "first"]
    );
    let plain = env.run(&["ps", "-a", "--format", "plain"]);
    assert_eq!(table_names(&plain.stdout), ["third", "second", "first"]);

    let out = env.run(&["ps", "-w", "--format", "json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("JSON output is not supported together with --watch"),
        "{}",
        text(&out.stderr)
    );
    let out = env.run(&["ps", "--format", "yaml"]);
    assert_eq!(out.status.code(), Some(2), "clap refuses other formats");
}

#[test]
fn ps_watch_redraws_the_table_in_place_until_ctrl_c() {
    let env = Env::new();
    sleeper(&env, "watched");
    // `script` gives `dstack ps -w` a pseudo-terminal and copies what it draws to its stdout.
    let dstack = env!("CARGO_BIN_EXE_dstack");
    let mut script = Command::new("script");
    script
        .args([
            "-q",
            "-e",
            "-f",
            "-c",
            // `exec`: the status is `dstack`'s, not that of a shell (dash, for one, does not
            // exec a lone command itself and ends with 130 after the terminal's SIGINT).
            &format!("exec '{dstack}' ps -w -a"),
            "/dev/null",
        ])
        .env("DSTACK_HOME", env.home.path())
        .env("DSTACK_AGENT_BIN", common::agent_binary())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut script = script.spawn().unwrap();
    let drawn = Arc::new(Mutex::new(Vec::new()));
    let mut stdout = script.stdout.take().unwrap();
    // Detached: it ends with `script`'s output.
    let _reader = {
        let drawn = drawn.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                drawn.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let screen = || text(&drawn.lock().unwrap());
    wait_for(&env, || screen().contains("running"), "the first table");
    assert!(!screen().contains("\x1b[J"), "nothing to draw over yet");

    let out = env.run(&["stop", "-y", "-x", "watched"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // A later table replaces the first one: the cursor goes back up over its lines (a
    // header, a row) and clears them before the new status is drawn.
    wait_for(
        &env,
        || {
            let shown = screen();
            shown
                .split_once("\x1b[2F\x1b[J")
                .is_some_and(|(_, after)| after.contains("terminated"))
        },
        "the table redrawn in place",
    );

    // Ctrl-C typed into the terminal ends it with status 0 (the terminal sends SIGINT to its
    // foreground process group: a signal sent to `script`'s child alone reached only dash when
    // the command ran under it, and the test hung).
    let mut keyboard = script.stdin.take().unwrap();
    keyboard.write_all(b"\x03").unwrap();
    keyboard.flush().unwrap();
    let status = wait_child(&mut script, "dstack ps -w to end on Ctrl-C");
    assert_eq!(status.code(), Some(0), "{}", screen());
    drop(keyboard);
}

#[test]
fn stop_takes_several_runs_and_stops_none_if_one_is_missing() {
    let env = Env::new();
    sleeper(&env, "one");
    sleeper(&env, "two");
    let out = env.run(&["stop", "-y", "one", "nosuch"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("run nosuch not found"),
        "{}",
        text(&out.stderr)
    );
    let ps = text(&env.run(&["ps"]).stdout);
    assert_eq!(ps.matches("running").count(), 2, "none was stopped: {ps}");

    let out = env.run(&["stop", "-y", "one", "two"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "one terminated\ntwo terminated\n");
    assert!(table_names(&env.run(&["ps"]).stdout).is_empty());

    let out = env.run(&["stop", "-y"]);
    assert_eq!(out.status.code(), Some(2), "a run name is required");
}

#[test]
fn delete_refuses_run_files_and_files_without_a_name() {
    let env = Env::new();
    quick(&env, "kept");
    let task = env
        .home
        .path()
        .join("kept.dstack.yml")
        .display()
        .to_string();
    let out = env.run(&["delete", "-f", &task, "-y"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("deleting runs is not supported yet"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(table_names(&env.run(&["ps", "-a"]).stdout), ["kept"]);

    let nameless = env.write("fleet.dstack.yml", "type: fleet\nnodes: 1\n");
    let out = env.run(&["delete", "-f", &nameless, "-y"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("names no fleet to delete"),
        "{}",
        text(&out.stderr)
    );
    let out = env.run(&["delete", "-f", "/nonexistent.dstack.yml", "-y"]);
    assert_eq!(out.status.code(), Some(1));
}
