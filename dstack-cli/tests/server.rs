//! `dstack server` as clients meet it: started on demand (once, however many clients start
//! it), refusing a second server and requests without the admin token, and supervising runs
//! after the CLI exited.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

mod common;

use common::{text, Env};

/// POSTs `body` to the server at `url` (`http://host:port`) with `token`; returns the status
/// and the answer.
fn post(url: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let authority = url.strip_prefix("http://").unwrap();
    let mut stream = TcpStream::connect(authority).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer.split(' ').nth(1).unwrap().parse().unwrap();
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The processes serving `dstack server` for `env`'s home.
fn servers_of(env: &Env) -> Vec<u32> {
    let home = format!("DSTACK_HOME={}", env.home.path().display());
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let serves = args.get(1) == Some(&&b"server"[..]);
        let ours = environ.split(|b| *b == 0).any(|v| v == home.as_bytes());
        if serves && ours {
            found.push(pid);
        }
    }
    found
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn clients_starting_at_once_leave_one_server_and_a_second_server_refuses() {
    let env = Env::new();
    let clients: Vec<_> = (0..3).map(|_| env.cmd(&["ps"]).spawn().unwrap()).collect();
    for mut client in clients {
        assert!(client.wait().unwrap().success());
    }
    // The servers that lost the lock exit at once; one stays.
    wait_for("one server", Duration::from_secs(10), || {
        servers_of(&env).len() == 1
    });
    let pid = env.server_pid().expect("the server says where it listens");
    assert_eq!(servers_of(&env), vec![pid]);
    let out = env.run(&["server", "--port", "0"]);
    assert_eq!(out.status.code(), Some(1));
    let message = text(&out.stderr);
    assert!(message.contains("already running"), "{message}");
    assert!(message.contains(&format!("pid {pid}")), "{message}");
    assert_eq!(servers_of(&env), vec![pid]);
}

#[test]
fn requests_without_the_token_or_with_a_wrong_one_change_nothing() {
    let env = Env::new();
    assert!(env.run(&["ps"]).status.success());
    let url = env.server_info().unwrap()["url"]
        .as_str()
        .unwrap()
        .to_string();
    let apply = r#"{"configuration": {"type": "task", "commands": ["touch /tmp/never"]}, "options": {"name": "sneaky"}}"#;
    let route = "/api/project/main/runs/apply";
    let (status, body) = post(&url, route, None, apply);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("a token is required"), "{body}");
    let (status, body) = post(&url, route, Some("wrong"), apply);
    assert_eq!(status, 403, "{body}");
    let (status, _) = post(&url, "/api/runs/list", Some("wrong"), "{}");
    assert_eq!(status, 403);
    let out = env.run(&["ps", "-a"]);
    assert!(
        !text(&out.stdout).contains("sneaky"),
        "{}",
        text(&out.stdout)
    );
    // With the token the same request is taken.
    let (status, body) = post(&url, "/api/server/get_info", Some(&env.token()), "{}");
    assert_eq!(status, 200, "{body}");
}

/// dstack's clients (`dstack event`, `client.api.events.list`) read `/api/events/list` in
/// dstack's shapes, page by page.
#[test]
fn events_are_listed_in_dstacks_shape() {
    let env = Env::new();
    let task = env.write(
        "told.dstack.yml",
        "type: task\nname: told\ncommands: [echo hi]\nresources: {cpu: 1.., memory: 0.1GB..}\n",
    );
    let out = env.run(&["apply", "-f", &task, "-y"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let url = env.server_info().unwrap()["url"]
        .as_str()
        .unwrap()
        .to_string();
    let list = |body: &str| -> Vec<serde_json::Value> {
        let (status, answer) = post(&url, "/api/events/list", Some(&env.token()), body);
        assert_eq!(status, 200, "{answer}");
        serde_json::from_str(&answer).unwrap()
    };
    let runs = list(r#"{"include_target_types": ["run"], "ascending": true, "limit": 2}"#);
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0]["message"], "Run submitted. Status: SUBMITTED");
    let target = &runs[0]["targets"][0];
    assert_eq!(target["type"], "run");
    assert_eq!(target["name"], "told");
    assert_eq!(target["project_name"], "main");
    assert!(runs[0]["recorded_at"].as_str().unwrap().ends_with("+00:00"));
    assert!(runs[0]["actor_user"].is_null());
    // The next page starts after the last event of the one before.
    let next = list(&format!(
        r#"{{"include_target_types": ["run"], "ascending": true, "prev_id": {}}}"#,
        runs[1]["id"]
    ));
    assert_eq!(
        next[0]["message"],
        "Run status changed RUNNING -> DONE. Termination reason: ALL_JOBS_DONE"
    );
    // Users cause no events here.
    let users = list(r#"{"actors": ["00000000-0000-4000-8000-000000000001"]}"#);
    assert!(users.is_empty());
}

#[test]
fn a_task_failing_once_is_retried_by_the_server_after_the_cli_exited() {
    let env = Env::new();
    let marker = env.home.path().join("attempted");
    let file = env.write(
        "retry.dstack.yml",
        &format!(
            "type: task\nname: flaky\ncommands:\n  - test -e {m} || {{ touch {m}; exit 1; }}\n\
             retry:\n  on_events: [error]\n  duration: 1h\n",
            m = marker.display()
        ),
    );
    let out = env.run(&["apply", "-d", "-y", "-f", &file]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // No client runs from here on: the state file is read directly.
    let db = env.home.path().join("server/state.db");
    let query = |sql: &str| -> String {
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg("import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); print(c.execute(sys.argv[2]).fetchone()[0])")
            .arg(&db)
            .arg(sql)
            .output()
            .unwrap();
        text(&out.stdout).trim().to_string()
    };
    wait_for("the retried run to end", Duration::from_secs(90), || {
        query("SELECT status FROM runs WHERE name = 'flaky'") == "done"
    });
    let submissions = query(
        "SELECT COUNT(*) FROM jobs WHERE run_id = (SELECT id FROM runs WHERE name = 'flaky')",
    );
    assert_eq!(submissions, "2");
}

#[test]
fn an_idle_auto_started_server_exits_and_the_next_client_starts_another() {
    let env = Env::new();
    let out = env
        .cmd(&["apply", "-y", "-f", "examples/hello.dstack.yml"])
        .env("DSTACK_SERVER_IDLE_EXIT", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let first = env.server_pid().unwrap();
    wait_for("the idle server to exit", Duration::from_secs(20), || {
        servers_of(&env).is_empty()
    });
    let out = env.run(&["ps", "-a"]);
    assert!(text(&out.stdout).contains("hello"), "{}", text(&out.stdout));
    let second = env.server_pid().unwrap();
    assert_ne!(first, second);
}
