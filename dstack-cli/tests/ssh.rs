//! `ssh <run>` with the real OpenSSH client: entries written by the server while a run runs,
//! `~/.ssh/config` including them (`HOME` is a temporary directory; `ssh` reads the user
//! configuration of the passwd entry, so it is given the temporary one with `-F`), sessions
//! in the job's world, `scp`, `ssh -L`, and refusals.

mod common;
#[path = "../../dstack-backends/tests/common/netns.rs"]
#[allow(dead_code)]
mod netns;
#[path = "../../dstack-backends/tests/common/podman.rs"]
#[allow(dead_code)]
mod podman;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, http_get, text, Env};

/// A home with a temporary `HOME` beside it.
struct SshEnv {
    env: Env,
    user_home: tempfile::TempDir,
    /// `DOCKER_HOST` for the home's server and agent.
    docker_host: Option<String>,
}

impl SshEnv {
    fn new() -> Self {
        SshEnv {
            env: Env::new(),
            user_home: tempfile::tempdir().unwrap(),
            docker_host: None,
        }
    }

    /// `dstack ARGS`, with the temporary `HOME` (and the container engine, if any).
    fn dstack(&self, args: &[&str]) -> Output {
        let mut cmd = self.env.cmd(args);
        cmd.env("HOME", self.user_home.path());
        if let Some(socket) = &self.docker_host {
            cmd.env("DOCKER_HOST", socket);
        }
        cmd.output().unwrap()
    }

    /// `ssh` (or `scp`) with the temporary user configuration, never asking anything.
    fn ssh_command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.arg("-F")
            .arg(self.user_home.path().join(".ssh/config"))
            .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=20"])
            .env("HOME", self.user_home.path())
            .stdin(Stdio::null());
        cmd
    }

    fn ssh(&self, args: &[&str]) -> Output {
        self.ssh_command("ssh").args(args).output().unwrap()
    }

    fn ssh_config(&self) -> String {
        std::fs::read_to_string(self.env.home.path().join("ssh/config")).unwrap_or_default()
    }

    /// Applies `config` detached and waits until `ssh/config` has an entry for `host`.
    fn start(&self, name: &str, config: &str, host: &str) {
        let file = self.env.write(&format!("{name}.dstack.yml"), config);
        let out = self.dstack(&["apply", "-f", &file, "-y", "-d"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let has_entry = || {
            self.ssh_config().lines().any(|line| {
                let mut words = line.split_whitespace();
                words.next() == Some("Host") && words.any(|w| w == host)
            })
        };
        wait_for(has_entry, "the run's SSH entry", || {
            let runs = text(&self.dstack(&["ps", "-a", "--json"]).stdout);
            let log = std::fs::read_to_string(self.env.home.path().join("server/server.log"))
                .unwrap_or_default();
            format!(
                "runs: {runs}\nserver log: {log}\nssh/config: {}",
                self.ssh_config()
            )
        });
    }
}

/// Polls `f` for up to 30 s; on timeout panics with `context()`.
fn wait_for(mut f: impl FnMut() -> bool, what: &str, context: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap()
}

#[test]
fn ssh_into_a_local_dev_environment() {
    let it = SshEnv::new();
    let served = tempfile::tempdir().unwrap();
    std::fs::write(served.path().join("hello.txt"), "served by init\n").unwrap();
    let port = free_port();
    let config = format!(
        "type: dev-environment\nname: devbox\nide: vscode\ninit:\n  - cd {} && python3 -m http.server {port} --bind 127.0.0.1 >/dev/null 2>&1 &\n  - echo init-done\nresources: {{cpu: 1.., memory: 0.1GB..}}\n",
        served.path().display()
    );
    it.start("devbox", &config, "devbox");
    let user_config = std::fs::read_to_string(it.user_home.path().join(".ssh/config")).unwrap();
    let include = format!(
        "Include \"{}\"",
        it.env.home.path().join("ssh/config").display()
    );
    assert!(user_config.starts_with(&include), "{user_config}");

    // The job's world: its environment and its working directory (the apply's).
    let out = it.ssh(&["devbox", "echo $DSTACK_RUN_NAME; pwd -P"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let working_dir = canonical(&common::workspace());
    assert_eq!(
        text(&out.stdout),
        format!("devbox\n{}\n", working_dir.display())
    );
    // The job's name is a host too.
    let out = it.ssh(&["devbox-0-0", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    let out = it.ssh(&["devbox", "echo to-stderr >&2; false"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stderr).trim(), "to-stderr");

    // An interactive session on a pseudo-terminal.
    let mut session = it
        .ssh_command("ssh")
        .args(["-tt", "devbox"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    session
        .stdin
        .take()
        .unwrap()
        .write_all(b"test -t 0 && echo tty-$((6*7))\nexit\n")
        .unwrap();
    let out = session.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("tty-42"),
        "{}",
        text(&out.stdout)
    );

    // scp, in and out (OpenSSH's scp speaks SFTP).
    let local = tempfile::tempdir().unwrap();
    let inbound = local.path().join("in.txt");
    std::fs::write(&inbound, "a file\n").unwrap();
    let remote = served.path().join("copied.txt");
    let out = it
        .ssh_command("scp")
        .arg(&inbound)
        .arg(format!("devbox:{}", remote.display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(&remote).unwrap(), "a file\n");
    let back = local.path().join("back.txt");
    let out = it
        .ssh_command("scp")
        .arg(format!(
            "devbox:{}",
            served.path().join("hello.txt").display()
        ))
        .arg(&back)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(&back).unwrap(), "served by init\n");

    // ssh -L reaches the server init started.
    let here = free_port();
    let mut forward = it
        .ssh_command("ssh")
        .args(["-N", "-o", "ExitOnForwardFailure=yes", "-L"])
        .arg(format!("{here}:localhost:{port}"))
        .arg("devbox")
        .spawn()
        .unwrap();
    let mut body = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while body.is_none() && Instant::now() < deadline {
        body = http_get(here, "hello.txt").filter(|b| !b.is_empty());
        std::thread::sleep(Duration::from_millis(100));
    }
    forward.kill().unwrap();
    forward.wait().unwrap();
    assert_eq!(body.as_deref(), Some("served by init\n"));

    // `dstack attach` prints the IDE link (the run's entry, the job's working directory),
    // forwards a port moved with -p, streams the output with --logs, and --ssh-identity adds
    // a key sessions accept.
    let identity = local.path().join("identity");
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&identity)
        .status()
        .unwrap();
    assert!(status.success());
    let moved = free_port();
    let mut attach = it.env.cmd(&["attach", "devbox", "--logs", "-p"]);
    attach
        .arg(format!("{moved}:{port}"))
        .arg("--ssh-identity")
        .arg(&identity)
        .env("HOME", it.user_home.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut attach = attach.spawn().unwrap();
    let mut stdout = std::io::BufReader::new(attach.stdout.take().unwrap());
    let mut line = String::new();
    let (mut link, mut logged) = (None, false);
    while !logged && std::io::BufRead::read_line(&mut stdout, &mut line).unwrap() > 0 {
        if let Some(found) = line.trim().strip_prefix("Open in the IDE: ") {
            link = Some(found.to_string());
        }
        logged = line.trim() == "init-done";
        line.clear();
    }
    assert!(logged, "the output was not streamed");
    assert_eq!(
        link,
        Some(format!(
            "vscode://vscode-remote/ssh-remote+devbox{}",
            canonical(&common::workspace()).display()
        ))
    );
    assert_eq!(
        http_get(moved, "hello.txt").as_deref(),
        Some("served by init\n")
    );
    // (the project key moved away: only the identity can log in)
    let project_key = it.env.home.path().join("ssh/project_key");
    let aside = it.env.home.path().join("ssh/project_key.aside");
    std::fs::rename(&project_key, &aside).unwrap();
    let out = it
        .ssh_command("ssh")
        .arg("-i")
        .arg(&identity)
        .args(["devbox", "echo identity"])
        .output()
        .unwrap();
    std::fs::rename(&aside, &project_key).unwrap();
    assert_eq!(text(&out.stdout), "identity\n", "{}", text(&out.stderr));
    attach.kill().unwrap();
    attach.wait().unwrap();

    // Once the run ends, its entry is gone.
    let out = it.dstack(&["stop", "devbox", "-y"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    wait_for(
        || !it.ssh_config().contains("Host devbox"),
        "the entry's removal",
        || it.ssh_config(),
    );
}

#[test]
fn ssh_refuses_other_keys_and_changed_host_keys() {
    let it = SshEnv::new();
    // The user's own key, which `dstack apply` adds.
    let user_ssh = it.user_home.path().join(".ssh");
    std::fs::create_dir_all(&user_ssh).unwrap();
    let user_key = user_ssh.join("id_ed25519");
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&user_key)
        .status()
        .unwrap();
    assert!(status.success());
    it.start(
        "guarded",
        "type: dev-environment\nname: guarded\nresources: {cpu: 1.., memory: 0.1GB..}\n",
        "guarded",
    );
    let out = it.ssh(&["guarded", "true"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    // Another key in the project key's place: refused.
    let key = it.env.home.path().join("ssh/project_key");
    let saved = std::fs::read(&key).unwrap();
    std::fs::remove_file(&key).unwrap();
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(status.success());
    let out = it.ssh(&["guarded", "echo in"]);
    assert_eq!(out.status.code(), Some(255), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("Permission denied"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), "");
    // ... but the user's own key is accepted.
    let out = it
        .ssh_command("ssh")
        .arg("-i")
        .arg(&user_key)
        .args(["guarded", "echo user-key"])
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), "user-key\n", "{}", text(&out.stderr));
    std::fs::write(&key, &saved).unwrap();
    // (ssh offers the key of a `.pub` file beside the private one first)
    std::fs::remove_file(key.with_extension("pub")).unwrap();

    // Another host key pinned for the job: refused.
    let known = it.env.home.path().join("ssh/known_hosts_runs");
    let pinned = std::fs::read_to_string(&known).unwrap();
    let other = tempfile::tempdir().unwrap();
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(other.path().join("k"))
        .status()
        .unwrap();
    assert!(status.success());
    let other_key = std::fs::read_to_string(other.path().join("k.pub")).unwrap();
    let alias = pinned.split_whitespace().next().unwrap();
    std::fs::write(&known, format!("{alias} {other_key}")).unwrap();
    let out = it.ssh(&["guarded", "echo in"]);
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("REMOTE HOST IDENTIFICATION HAS CHANGED"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), "");
    std::fs::write(&known, &pinned).unwrap();
    let out = it.ssh(&["guarded", "echo in"]);
    assert_eq!(text(&out.stdout), "in\n", "{}", text(&out.stderr));
}

#[test]
fn ssh_into_jobs_on_namespace_ssh_hosts() {
    let it = SshEnv::new();
    let hosts = netns::TestHosts::start(2);
    let fleet = format!("{}placement: cluster\n", hosts.fleet_yaml("nshosts"));
    let fleet = it.env.write("hosts.dstack.yml", &fleet);
    let out = it.dstack(&["apply", "-f", &fleet, "-y"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    // A dev environment on one of the hosts: the session is there, in the job's world.
    it.start(
        "remote",
        "type: dev-environment\nname: remote\nfleets: [nshosts]\nresources: {cpu: 1.., memory: 0.1GB..}\n",
        "remote",
    );
    let out = it.ssh(&["remote", "echo $DSTACK_RUN_NAME; pwd; ip -o -4 addr show"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    let mut lines = shown.lines();
    assert_eq!(lines.next(), Some("remote"), "{shown}");
    assert_eq!(lines.next(), Some("/root"), "{shown}");
    assert!(
        hosts
            .hosts
            .iter()
            .any(|h| shown.contains(&format!(" {}/", h.addr))),
        "not on a namespace host: {shown}"
    );
    let out = it.dstack(&["stop", "remote", "-y"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    // Each node of a 2-node task, by its job's name.
    it.start(
        "pair",
        "type: task\nname: pair\nnodes: 2\nfleets: [nshosts]\ncommands: [sleep 1000]\nresources: {cpu: 1.., memory: 0.1GB..}\n",
        "pair-1-0",
    );
    let mut seen = Vec::new();
    for job in 0..2 {
        let out = it.ssh(&[
            &format!("pair-{job}-0"),
            "echo $DSTACK_NODE_RANK; ip -o -4 addr show",
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let shown = text(&out.stdout);
        assert_eq!(
            shown.lines().next(),
            Some(job.to_string().as_str()),
            "{shown}"
        );
        let host = hosts
            .hosts
            .iter()
            .position(|h| shown.contains(&format!(" {}/", h.addr)))
            .unwrap_or_else(|| panic!("node {job} is not on a namespace host: {shown}"));
        seen.push(host);
    }
    assert_ne!(seen[0], seen[1], "both nodes answered from the same host");
    let out = it.dstack(&["stop", "pair", "-y"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = it.dstack(&["fleet", "delete", "nshosts", "-y"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn ssh_into_a_container_dev_environment() {
    let podman = podman::Podman::start();
    let mut it = SshEnv::new();
    it.docker_host = Some(format!("unix://{}", podman.socket.display()));
    let config = format!(
        "type: dev-environment\nname: boxed\nimage: {}\nworking_dir: /work\nenv: [GREETING=hi]\n\
         init:\n  - echo $$ > /tmp/job-pid\nresources: {{cpu: 1.., memory: 0.1GB..}}\n",
        podman::IMAGE
    );
    it.start("boxed", &config, "boxed");
    // In the container (its file system: the job's pid file is there), in the job's world.
    let out = it.ssh(&[
        "boxed",
        "echo $DSTACK_RUN_NAME $GREETING; pwd; test -s /tmp/job-pid && echo in-container",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "boxed hi\n/work\nin-container\n");
    let out = it.ssh(&["boxed", "exit 4"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    let mut session = it
        .ssh_command("ssh")
        .args(["-tt", "boxed"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    session
        .stdin
        .take()
        .unwrap()
        .write_all(b"test -t 0 && echo tty-$((6*7))\nexit\n")
        .unwrap();
    let out = session.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("tty-42"),
        "{}",
        text(&out.stdout)
    );
    let out = it.dstack(&["stop", "boxed", "-y"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn an_inactive_dev_environment_is_stopped_while_no_session_is_open() {
    let it = SshEnv::new();
    it.start(
        "idle",
        "type: dev-environment\nname: idle\ninactivity_duration: 15s\nresources: {cpu: 1.., memory: 0.1GB..}\n",
        "idle",
    );
    // A session longer than 10 s counts as activity: the run outlives its limit while open.
    let mut session = it
        .ssh_command("ssh")
        .args(["idle", "sleep 25"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(22));
    let ps = text(&it.dstack(&["ps"]).stdout);
    assert!(ps.contains("idle") && ps.contains("running"), "{ps}");
    assert_eq!(session.wait().unwrap().code(), Some(0));
    // Then, with no session, it is stopped with dstack's reason.
    let stopped = || {
        let runs = text(&it.dstack(&["ps", "-a", "--json"]).stdout);
        runs.contains("inactivity_duration_exceeded")
    };
    wait_for(stopped, "the inactivity stop", || {
        text(&it.dstack(&["ps", "-a"]).stdout)
    });
    let ps = text(&it.dstack(&["ps", "-a"]).stdout);
    assert!(!ps.contains("running"), "{ps}");
}

#[test]
fn ssh_into_a_dev_environment_with_a_repo_starts_in_its_copy() {
    let it = SshEnv::new();
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("hello.txt"), "from the repo\n").unwrap();
    for args in [
        &["init", "-q"][..],
        &["add", "."],
        &["commit", "-qm", "one"],
    ] {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let config = format!(
        "type: dev-environment\nname: coded\nrepos: [{}]\nresources: {{cpu: 1.., memory: 0.1GB..}}\n",
        repo.display()
    );
    it.start("coded", &config, "coded");
    let out = it.ssh(&[
        "coded",
        "cat hello.txt; test \"$PWD\" = \"$DSTACK_REPO_DIR\" && test \"$PWD\" != \"$HOME\" && echo in-the-copy",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "from the repo\nin-the-copy\n");
    let out = it.dstack(&["stop", "coded", "-y"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}
