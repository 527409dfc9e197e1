//! What the CLI's end-to-end tests share: a private `$DSTACK_HOME` per test, the CLI and
//! agent built by this package, and the home's server.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A private `$DSTACK_HOME` with the CLI built by this package.
pub struct Env {
    /// The state directory.
    pub home: tempfile::TempDir,
}

impl Env {
    /// A fresh state directory.
    pub fn new() -> Self {
        Env {
            home: tempfile::tempdir().unwrap(),
        }
    }

    /// `dstack ARGS` in this home.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dstack"));
        cmd.args(args)
            .env("DSTACK_HOME", self.home.path())
            .env("DSTACK_AGENT_BIN", agent_binary())
            .current_dir(workspace())
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `dstack ARGS` to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Writes a file into the home; returns its path.
    pub fn write(&self, name: &str, text: &str) -> String {
        let path = self.home.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }
}

impl Env {
    /// Aborts the runs the test left unfinished (their jobs would outlive the agent killed
    /// below: they are process groups of their own), waiting a few seconds at most.
    fn abort_unfinished(&self) {
        let alive = self
            .server_pid()
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            return;
        }
        let unfinished = || -> Vec<String> {
            let out = self.run(&["ps", "--json"]);
            let runs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            runs.as_array()
                .map(|runs| {
                    runs.iter()
                        .filter_map(|r| r["run"]["name"].as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let names = unfinished();
        for name in &names {
            let _ = self.run(&["stop", "-y", "--abort", name]);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !names.is_empty() && !unfinished().is_empty() && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.abort_unfinished();
        if let Ok(pid) = std::fs::read_to_string(self.home.path().join("agent/agent.pid")) {
            let _ = Command::new("kill").arg("-9").arg(pid.trim()).status();
        }
        if let Some(pid) = self.server_pid() {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
    }
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The agent built beside the CLI.
pub fn agent_binary() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_dstack"));
    let agent = exe.with_file_name("dstack-agent");
    assert!(
        agent.is_file(),
        "build the agent first: cargo build -p dstack-agent"
    );
    agent
}

/// Bytes as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl Env {
    /// What the home's server wrote about itself (`{pid, url}`), if it runs.
    pub fn server_info(&self) -> Option<serde_json::Value> {
        let bytes = std::fs::read(self.home.path().join("server/server.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// The running server's process id.
    pub fn server_pid(&self) -> Option<u32> {
        self.server_info()?.get("pid")?.as_u64().map(|p| p as u32)
    }

    /// The admin token of the home's client configuration.
    pub fn token(&self) -> String {
        let config = std::fs::read_to_string(self.home.path().join("config.yml")).unwrap();
        let line = config
            .lines()
            .find(|l| l.trim_start().starts_with("token:"))
            .unwrap();
        line.split_once(':')
            .unwrap()
            .1
            .trim()
            .trim_matches('"')
            .to_string()
    }
}

/// A TCP port nobody listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The body of `GET /name` on `127.0.0.1:port`, if anything answers.
pub fn http_get(port: u16, name: &str) -> Option<String> {
    http_get_at("127.0.0.1", port, name)
}

/// The body of `GET /name` on `ip:port`, if anything answers (within 5 s).
pub fn http_get_at(ip: &str, port: u16, name: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect((ip, port)).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(stream, "GET /{name} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    Some(answer.split_once("\r\n\r\n")?.1.to_string())
}

/// A copy of `examples/workflows` in the test's home (its workflows write into it).
pub fn project(env: &Env) -> PathBuf {
    let dir = env.home.path().join("project");
    copy_dir(&workspace().join("examples/workflows"), &dir);
    dir
}

/// Copies the directory `from` to `to`, recursively.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// `dstack ARGS` run from `dir`: (exit code, stdout, stderr).
pub fn run_in(env: &Env, dir: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = env.cmd(args).current_dir(dir).output().unwrap();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

/// Runs a quick task named `name` to completion.
pub fn quick(env: &Env, name: &str) {
    let file = env.write(
        &format!("{name}.dstack.yml"),
        &format!(
            "type: task\nname: {name}\ncommands: [echo {name}]\nresources: {{cpu: 1.., memory: 0.1GB..}}\n"
        ),
    );
    let out = env.run(&["apply", "-f", &file, "-y"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}
