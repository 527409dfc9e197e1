//! dstack's verbs and flags added for parity, through the built binary: `dstack project`
//! and `--project`, `dstack completion`, `dstack apply -p/--host/-v`, `dstack offer
//! --group-by`, `dstack fleet delete -i`.

mod common;
#[path = "../../dstack-backends/tests/common/netns.rs"]
#[allow(dead_code)]
mod netns;

use std::io::BufRead;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{free_port, http_get_at, text, Env};

/// The URL of the home's running server.
fn server_url(env: &Env) -> String {
    env.server_info().unwrap()["url"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn projects_are_added_listed_chosen_and_deleted() {
    let env = Env::new();
    // The first command starts the local server and records its project, `main`.
    let out = env.run(&["ps"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (url, token) = (server_url(&env), env.token());
    let out = env.run(&["project", "list"]);
    let listed = text(&out.stdout);
    assert!(
        listed.contains("PROJECT") && listed.contains(&url),
        "{listed}"
    );
    assert!(
        listed
            .lines()
            .any(|l| l.contains("main") && l.contains('✓')),
        "{listed}"
    );

    // `add` asks the server first: a wrong token or an unknown project is refused.
    let out = env.run(&[
        "project", "add", "--name", "main", "--url", &url, "--token", "bad",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("Forbidden"),
        "{}",
        text(&out.stderr)
    );
    let out = env.run(&[
        "project", "add", "--name", "team", "--url", &url, "--token", &token,
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("Project 'team' not found"),
        "{}",
        text(&out.stderr)
    );
    let out = env.run(&[
        "project", "add", "--name", "main", "--url", &url, "--token", &token, "-y",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // A second project on a server that does not answer: `--project` and the default
    // choose it, `project delete` forgets it.
    let config = env.home.path().join("config.yml");
    let mut text_of_config = std::fs::read_to_string(&config).unwrap();
    text_of_config.push_str(
        "- name: \"elsewhere\"\n  url: \"http://127.0.0.2:1\"\n  token: \"t\"\n  default: false\n",
    );
    std::fs::write(&config, text_of_config).unwrap();
    let out = env.run(&["--project", "elsewhere", "ps"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("127.0.0.2:1"),
        "{}",
        text(&out.stderr)
    );
    assert!(env.run(&["--project", "main", "ps"]).status.success());
    let out = env.run(&["project", "set-default", "elsewhere"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !env.run(&["ps"]).status.success(),
        "the default is elsewhere now"
    );
    let out = env.run(&["project", "list", "-v"]);
    let listed = text(&out.stdout);
    assert!(listed.contains("USER"), "{listed}");
    assert!(
        listed
            .lines()
            .any(|l| l.contains("main") && l.contains("admin")),
        "{listed}"
    );
    assert!(
        listed
            .lines()
            .any(|l| l.contains("elsewhere") && l.contains('✓')),
        "{listed}"
    );
    assert!(!env
        .run(&["project", "set-default", "nope"])
        .status
        .success());
    let out = env.run(&["project", "delete", "--name", "elsewhere", "-y"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(env.run(&["ps"]).status.success(), "back on main");
    assert!(!std::fs::read_to_string(&config)
        .unwrap()
        .contains("elsewhere"));
}

#[test]
fn completion_scripts_are_printed_for_bash_and_zsh() {
    let env = Env::new();
    let bash = env.run(&["completion", "bash"]);
    assert!(bash.status.success());
    let script = env.write("dstack.bash", &text(&bash.stdout));
    // bash loads it and completes `dstack` with it.
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {script} && complete -p dstack >/dev/null && COMP_WORDS=(dstack ap) && \
             COMP_CWORD=1 && _dstack dstack ap dstack && printf '%s\\n' \"${{COMPREPLY[@]}}\""
        ))
        .output()
        .unwrap();
    let answer = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(answer.lines().any(|l| l == "apply"), "{answer}");
    let zsh = env.run(&["completion", "zsh"]);
    assert!(text(&zsh.stdout).starts_with("#compdef dstack"));
    assert!(!env.run(&["completion", "fish"]).status.success());
}

#[test]
fn apply_merges_port_flags_forwards_on_the_host_and_shows_the_verbose_plan() {
    let env = Env::new();
    let served = tempfile::tempdir().unwrap();
    std::fs::write(served.path().join("hello.txt"), "hello\n").unwrap();
    let (job_port, moved) = (free_port(), free_port());
    let file = env.write(
        "web.dstack.yml",
        &format!(
            "type: task\nname: web\nports: [{job_port}]\ncommands:\n  - cd {} && exec python3 -m http.server {job_port} --bind 127.0.0.1\n",
            served.path().display()
        ),
    );
    let mapping = format!("{moved}:{job_port}");
    // (`dstack apply` adds an `Include` to the user's ~/.ssh/config: a home of the test's.)
    let user_home = tempfile::tempdir().unwrap();
    let mut apply = env.cmd(&[
        "apply",
        "-f",
        &file,
        "-y",
        "-v",
        "-p",
        &mapping,
        "--host",
        "127.0.0.2",
    ]);
    apply
        .env("HOME", user_home.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut apply = apply.spawn().unwrap();
    let stdout = apply.stdout.take().unwrap();
    let plan = std::thread::spawn(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .take_while(|l| !l.starts_with("Submitted"))
            .collect::<Vec<_>>()
            .join("\n")
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = apply.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let wanted = format!("Port {job_port} of the job is reachable at 127.0.0.2:{moved}");
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains(&wanted)) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => panic!("no forwarding announced:\n{}", seen.join("\n")),
        }
    }
    let mut body = None;
    while body.is_none() && Instant::now() < deadline {
        body = http_get_at("127.0.0.2", moved, "hello.txt").filter(|b| !b.is_empty());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        body.as_deref(),
        Some("hello\n"),
        "runs: {}\nlogs: {}",
        text(&env.run(&["ps", "-a", "-v"]).stdout),
        text(&env.run(&["logs", "web"]).stdout)
    );
    let plan = plan.join().unwrap();
    for row in [
        "task (nodes=1)",
        "Creation policy",
        "reuse-or-create",
        "Reservation",
        "Idle duration",
        "Max duration",
    ] {
        assert!(plan.contains(row), "{row} missing from the plan:\n{plan}");
    }
    // The mapping replaced the configuration's one of the same port, in the run's record.
    let out = env.run(&["ps", "--json"]);
    let runs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let stored = runs.to_string();
    assert!(
        stored.contains(&format!("\"local_port\":{moved}")),
        "{stored}"
    );
    apply.kill().unwrap();
    apply.wait().unwrap();
    assert!(env.run(&["stop", "-y", "-x", "web"]).status.success());
}

#[test]
fn apply_refuses_port_flags_for_a_service() {
    let env = Env::new();
    let file = env.write(
        "svc.dstack.yml",
        "type: service\nname: svc\nport: 8000\ncommands: [sleep 1]\n",
    );
    let out = env.run(&["apply", "-f", &file, "-y", "-d", "-p", "8000"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("-p/--port applies to tasks and dev environments"));
}

#[test]
fn offers_group_by_gpu_with_the_count_range() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    // This machine's agent finds two A100s (a fake `nvidia-smi`: there is no GPU here).
    let bin = env.home.path().join("fake-bin");
    std::fs::create_dir(&bin).unwrap();
    let fake = bin.join("nvidia-smi");
    std::fs::write(
        &fake,
        "#!/bin/sh\nprintf '0, NVIDIA A100-SXM4-80GB, 81920, GPU-a\\n1, NVIDIA A100-SXM4-80GB, 81920, GPU-b\\n'\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let offer = |args: &[&str]| env.cmd(args).env("PATH", &path).output().unwrap();
    let out = offer(&["offer", "--gpu", "1..", "--group-by", "gpu"]);
    let table = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        table.contains("$/GPU") && table.contains("BACKENDS"),
        "{table}"
    );
    assert!(table.contains("A100:80GB:2"), "{table}");
    let out = offer(&[
        "offer",
        "--gpu",
        "1..",
        "--group-by",
        "gpu,backend",
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["group_by"], serde_json::json!(["gpu", "backend"]));
    assert_eq!(json["gpus"][0]["name"], "A100");
    assert!(json["gpus"][0]["backend"].is_string(), "{json}");
    let out = offer(&["offer", "--group-by", "backend"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("without also grouping by 'gpu'"));
}

#[test]
fn fleet_delete_i_deletes_one_instance_and_keeps_the_fleet() {
    let env = Env::new();
    let hosts = netns::TestHosts::start(2);
    let name = format!("pair-{}", std::process::id());
    let fleet = env.write("pair.dstack.yml", &hosts.fleet_yaml(&name));
    let out = env.run(&["apply", "-f", &fleet, "-y"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = env.run(&["fleet", "delete", &name, "-i", "7", "-y"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no instance 7"),
        "{}",
        text(&out.stderr)
    );
    let out = env.run(&["fleet", "delete", &name, "-i", "1", "-y"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(&format!("{name}-1: agent stopped and removed")));
    let listing = text(&env.run(&["fleet", "get", &name]).stdout);
    let row = |n: u32| {
        listing
            .lines()
            .find(|l| l.contains(&format!("{name}-{n} ")))
            .unwrap_or_default()
            .to_string()
    };
    assert!(row(0).contains(" idle"), "{listing}");
    assert!(row(1).contains(" terminated"), "{listing}");
    // `-v` adds each instance's address; `-w` draws the table again in place until Ctrl-C.
    let verbose = text(&env.run(&["fleet", "-v"]).stdout);
    assert!(verbose.contains("ADDRESS"), "{verbose}");
    assert!(verbose.contains(hosts.hosts[0].addr.as_str()), "{verbose}");
    let mut watch = env.cmd(&["fleet", "list", "-w"]);
    let mut watch = watch.stdout(Stdio::piped()).spawn().unwrap();
    let mut stdout = watch.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = std::io::Read::read(&mut stdout, &mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut drawn = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !text(&drawn).contains("\x1b[J") {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(bytes) => drawn.extend(bytes),
            Err(_) => panic!("the table was not drawn again: {}", text(&drawn)),
        }
    }
    assert!(text(&drawn).contains(&format!("{name}-0")));
    let pid = watch.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = watch.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "fleet -w did not end on Ctrl-C");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());

    // The remaining host still runs jobs.
    let task = env.write(
        "on-pair.dstack.yml",
        &format!("type: task\nname: on-pair\nfleets: [{name}]\ncommands: [echo still-here]\n"),
    );
    let out = env.run(&["apply", "-f", &task, "-y"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("still-here"));
    let out = env.run(&["fleet", "delete", &name, "-y"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn offer_takes_the_profile_of_profiles_yml() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join(".dstack")).unwrap();
    std::fs::write(
        dir.path().join(".dstack/profiles.yml"),
        "profiles:\n  - name: cloud\n    backends: [aws]\n  - name: here\n    default: true\n    max_price: 0.5\n",
    )
    .unwrap();
    let offer = |flags: &[&str]| {
        let out = env
            .cmd(&[&["offer"][..], flags].concat())
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let default = offer(&[]);
    assert!(
        default.contains("$0.5") && default.contains("local"),
        "{default}"
    );
    let cloud = offer(&["--profile", "cloud"]);
    assert!(
        cloud.contains("No offers") && !cloud.contains("local ("),
        "{cloud}"
    );
    let none = offer(&["--no-profile"]);
    assert!(none.contains("local") && !none.contains("$0.5"), "{none}");
}
