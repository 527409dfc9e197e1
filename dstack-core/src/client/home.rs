//! A state directory's files, laid out as dstack lays them out, and finding (or starting)
//! its server:
//!
//! - `config.yml`: the client configuration, `projects: [{name, url, token, default}]`
//!   (0600), written by the server on its first start with a random admin token;
//! - `server/config.yml`: the server configuration (backends);
//! - `server/state.db`: the state; `server/server.json`: where the running server listens
//!   (`{pid, url}`), under the lock `server/server.lock` it holds while it runs;
//!   `server/server.log`: what auto-started servers print.
//!
//! A client of a local project (no configuration yet, or a loopback URL) that finds no
//! server answering starts one detached (`dstack server --auto`) and waits until it answers;
//! of several clients starting at once, one server wins the lock and the others exit.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::remote::{Remote, ServerError};
use crate::config::yaml::{self, Node, NodeKind};

/// The server's directory inside a state directory.
pub fn server_dir(home: &Path) -> PathBuf {
    home.join("server")
}

/// The client configuration file.
pub fn client_config_file(home: &Path) -> PathBuf {
    home.join("config.yml")
}

/// The server configuration file (backends).
pub fn server_config_file(home: &Path) -> PathBuf {
    server_dir(home).join("config.yml")
}

/// `ssh/config`: the SSH entries of running jobs (`ssh <run>`), written by the server while
/// they run; `~/.ssh/config` includes it.
pub fn ssh_config_file(home: &Path) -> PathBuf {
    home.join("ssh").join("config")
}

/// `ssh/known_hosts_runs`: the host keys of the agents serving the entries of
/// [`ssh_config_file`] (pinned: `StrictHostKeyChecking yes`).
pub fn ssh_known_hosts_file(home: &Path) -> PathBuf {
    home.join("ssh").join("known_hosts_runs")
}

/// `ssh/authorized_keys`: the users' own public keys (`~/.ssh/id_*.pub`, added by
/// `dstack apply` and `attach`) that `ssh <run>` sessions accept besides the project key.
pub fn ssh_user_keys_file(home: &Path) -> PathBuf {
    home.join("ssh").join("authorized_keys")
}

/// `ssh/project_key`: the project's SSH key (instances and jobs accept it).
pub fn project_key_file(home: &Path) -> PathBuf {
    home.join("ssh").join("project_key")
}

/// The lock a running server holds.
pub fn lock_file(home: &Path) -> PathBuf {
    server_dir(home).join("server.lock")
}

/// Where the running server says it listens.
pub fn info_file(home: &Path) -> PathBuf {
    server_dir(home).join("server.json")
}

/// What auto-started servers print.
pub fn log_file(home: &Path) -> PathBuf {
    server_dir(home).join("server.log")
}

/// Moves what an earlier version kept at the top of `home` to `home/server/`: the state
/// database (`state.db` with its `-wal` and `-shm`) and a server configuration left in
/// `config.yml` (one whose projects list backends rather than a URL). Files already in
/// `server/` win; nothing is overwritten.
pub fn move_legacy_state(home: &Path) -> std::io::Result<()> {
    let dir = server_dir(home);
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&dir)?;
    if !dir.join("state.db").exists() {
        for name in ["state.db", "state.db-wal", "state.db-shm"] {
            let old = home.join(name);
            if old.exists() {
                std::fs::rename(&old, dir.join(name))?;
            }
        }
    }
    let old_config = client_config_file(home);
    let new_config = server_config_file(home);
    if !new_config.exists() {
        if let Ok(text) = std::fs::read_to_string(&old_config) {
            if is_server_config(&text) {
                std::fs::rename(&old_config, &new_config)?;
            }
        }
    }
    Ok(())
}

/// Whether a `config.yml` is a server configuration (projects with backends, no URL).
fn is_server_config(text: &str) -> bool {
    let Ok(root) = yaml::load(text) else {
        return false;
    };
    let projects = field(&root, "projects").map(|p| match &p.kind {
        NodeKind::Seq(items) => items.clone(),
        _ => Vec::new(),
    });
    projects.is_some_and(|projects| {
        projects
            .iter()
            .any(|p| field(p, "backends").is_some() && field(p, "url").is_none())
    })
}

fn field<'a>(node: &'a Node, name: &str) -> Option<&'a Node> {
    match &node.kind {
        NodeKind::Map(entries) => entries
            .iter()
            .find(|(k, _)| matches!(&k.kind, NodeKind::Str(s) if s == name))
            .map(|(_, v)| v),
        _ => None,
    }
}

fn scalar(node: Option<&Node>) -> Option<String> {
    match node.map(|n| &n.kind) {
        Some(NodeKind::Str(s)) => Some(s.clone()),
        Some(NodeKind::Int(i)) => Some(i.to_string()),
        _ => None,
    }
}

/// One project of the client configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Project {
    /// The project name.
    pub name: String,
    /// The server URL (`http://127.0.0.1:3000`).
    pub url: String,
    /// The user's token.
    pub token: String,
    /// Whether it is the default project.
    pub default: bool,
}

/// The client configuration (`config.yml`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientConfig {
    /// The projects, in file order.
    pub projects: Vec<Project>,
}

impl ClientConfig {
    /// Reads `home/config.yml`; an absent file (or a server configuration left there by an
    /// earlier version) has no projects.
    pub fn load(home: &Path) -> Result<ClientConfig, ServerError> {
        let path = client_config_file(home);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(ServerError::Start(format!("{}: {e}", path.display()))),
        };
        let root = yaml::load(&text).map_err(|e| {
            ServerError::Start(format!(
                "{}:{}:{}: {}",
                path.display(),
                e.mark.line,
                e.mark.col,
                e.message
            ))
        })?;
        let mut config = ClientConfig::default();
        if let Some(NodeKind::Seq(items)) = field(&root, "projects").map(|p| &p.kind) {
            for item in items {
                let (Some(name), Some(url), Some(token)) = (
                    scalar(field(item, "name")),
                    scalar(field(item, "url")),
                    scalar(field(item, "token")),
                ) else {
                    continue;
                };
                let default = matches!(
                    field(item, "default").map(|d| &d.kind),
                    Some(NodeKind::Bool(true))
                );
                config.projects.push(Project {
                    name,
                    url,
                    token,
                    default,
                });
            }
        }
        Ok(config)
    }

    /// The project to use: `name` (or `$DSTACK_PROJECT`), else the default one, else the
    /// first.
    pub fn project(&self, name: Option<&str>) -> Option<&Project> {
        let wanted = name
            .map(str::to_string)
            .or_else(|| std::env::var("DSTACK_PROJECT").ok());
        match wanted {
            Some(name) => self.projects.iter().find(|p| p.name == name),
            None => self
                .projects
                .iter()
                .find(|p| p.default)
                .or_else(|| self.projects.first()),
        }
    }

    /// Records the local server's project (`main`, the default unless another project is),
    /// keeping the others.
    pub fn set_local(&mut self, url: &str, token: &str) {
        let others_default = self.projects.iter().any(|p| p.default && p.name != "main");
        let main = Project {
            name: "main".to_string(),
            url: url.to_string(),
            token: token.to_string(),
            default: !others_default,
        };
        match self.projects.iter_mut().find(|p| p.name == "main") {
            Some(existing) => *existing = main,
            None => self.projects.insert(0, main),
        }
    }

    /// Adds `project`, or replaces the one of its name in place; when it is the default, no
    /// other project is any more (dstack's `project add`).
    pub fn configure(&mut self, project: Project) {
        if project.default {
            for p in &mut self.projects {
                p.default = false;
            }
        }
        match self.projects.iter_mut().find(|p| p.name == project.name) {
            Some(existing) => *existing = project,
            None => self.projects.push(project),
        }
    }

    /// Makes project `name` the default one; false when there is no such project.
    pub fn set_default(&mut self, name: &str) -> bool {
        if !self.projects.iter().any(|p| p.name == name) {
            return false;
        }
        for p in &mut self.projects {
            p.default = p.name == name;
        }
        true
    }

    /// Removes project `name`; false when there is no such project.
    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.projects.len();
        self.projects.retain(|p| p.name != name);
        self.projects.len() != before
    }

    /// Writes `home/config.yml` (0600, whole).
    pub fn save(&self, home: &Path) -> std::io::Result<()> {
        let quote = |s: &str| serde_json::Value::String(s.to_string()).to_string();
        let mut out = String::from("projects:\n");
        for p in &self.projects {
            out.push_str(&format!(
                "- name: {}\n  url: {}\n  token: {}\n  default: {}\n",
                quote(&p.name),
                quote(&p.url),
                quote(&p.token),
                p.default
            ));
        }
        crate::files::replace_private(&client_config_file(home), out.as_bytes())
    }
}

/// Where a running server listens (`server/server.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// Its process id.
    pub pid: u32,
    /// Its URL.
    pub url: String,
}

impl ServerInfo {
    /// The file `home`'s server wrote, if any (it may be stale: check that it answers).
    pub fn read(home: &Path) -> Option<ServerInfo> {
        let bytes = std::fs::read(info_file(home)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// Whether `url` points at this machine (a server the client may start).
pub fn is_loopback(url: &str) -> bool {
    let authority = url
        .strip_prefix("http://")
        .unwrap_or(url)
        .split('/')
        .next()
        .unwrap_or("");
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => authority,
    };
    matches!(host, "127.0.0.1" | "localhost" | "[::1]")
}

/// How long a client waits for a server it started to answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a probe of a local server may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to the server of `home`'s project (`$DSTACK_PROJECT`, or the default one):
/// a remote server is used as configured; a local one is started, detached
/// (`server_bin server --auto`, or the binary [`find_server_binary`] finds), when none
/// answers.
pub fn connect<'a>(
    home: &'a Path,
    server_bin: Option<&'a Path>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Remote, ServerError>> + Send + 'a>> {
    Box::pin(connect_now(home, server_bin))
}

async fn connect_now(home: &Path, server_bin: Option<&Path>) -> Result<Remote, ServerError> {
    let config = ClientConfig::load(home)?;
    if let Some(project) = config.project(None) {
        if !is_loopback(&project.url) {
            return Remote::new(&project.url, &project.name, &project.token);
        }
    } else if let Ok(name) = std::env::var("DSTACK_PROJECT") {
        if !config.projects.is_empty() {
            return Err(ServerError::Start(format!(
                "project {name} (DSTACK_PROJECT) is not in {}",
                client_config_file(home).display()
            )));
        }
    }
    let origin = || super::remote::Origin {
        home: home.to_path_buf(),
        server_bin: server_bin.map(Path::to_path_buf),
    };
    if let Some(remote) = local_server(home).await {
        return Ok(remote.with_origin(origin()));
    }
    Ok(start(home, server_bin).await?.with_origin(origin()))
}

/// A client of `home`'s local server if it runs and answers with the token of the config.
async fn local_server(home: &Path) -> Option<Remote> {
    let info = ServerInfo::read(home)?;
    let config = ClientConfig::load(home).ok()?;
    let project = config.project(None)?;
    let remote = Remote::new(&info.url, &project.name, &project.token).ok()?;
    remote.info(PROBE_TIMEOUT).await.ok().map(|_| remote)
}

/// Starts `home`'s server detached and waits until it answers.
async fn start(home: &Path, server_bin: Option<&Path>) -> Result<Remote, ServerError> {
    let bin = match server_bin {
        Some(bin) => bin.to_path_buf(),
        None => find_server_binary().ok_or_else(|| {
            ServerError::Start(
                "no dstack server answers for this state directory, and the `dstack` binary that would start one was not found next to this program or on PATH (set DSTACK_SERVER_BIN)".to_string(),
            )
        })?,
    };
    super::prepare_home(home)
        .map_err(|e| ServerError::Start(format!("{}: {e}", home.display())))?;
    move_legacy_state(home)
        .map_err(|e| ServerError::Start(format!("{}: {e}", server_dir(home).display())))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_file(home))
        .map_err(|e| ServerError::Start(format!("{}: {e}", log_file(home).display())))?;
    let mut child = std::process::Command::new(&bin);
    child
        .arg("server")
        .arg("--auto")
        .env("DSTACK_HOME", home)
        .stdin(Stdio::null())
        .stdout(
            log.try_clone()
                .map_err(|e| ServerError::Start(e.to_string()))?,
        )
        .stderr(log);
    std::os::unix::process::CommandExt::process_group(&mut child, 0);
    let mut child = child
        .spawn()
        .map_err(|e| ServerError::Start(format!("cannot start {} server: {e}", bin.display())))?;
    let started = Instant::now();
    let mut exited = None;
    loop {
        if let Some(remote) = local_server(home).await {
            // Reap it later if it was the one that lost the lock; never leave a zombie.
            std::thread::spawn(move || child.wait());
            return Ok(remote);
        }
        if exited.is_none() {
            exited = child.try_wait().ok().flatten();
        }
        if started.elapsed() > START_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ServerError::Start(format!(
                "the dstack server for {} did not answer within {} s{}; see {}",
                home.display(),
                START_TIMEOUT.as_secs(),
                exited.map(|s| format!(" ({s})")).unwrap_or_default(),
                log_file(home).display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Finds `dstack` (which runs `dstack server`): see [`find_executable`] (`DSTACK_SERVER_BIN`).
pub fn find_server_binary() -> Option<PathBuf> {
    find_executable("dstack", "DSTACK_SERVER_BIN")
}

/// Finds one of this project's programs: `$env_var`, else `name` next to the current
/// executable (or one level up, as for test binaries), else on `PATH`.
pub fn find_executable(name: &str, env_var: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env_var) {
        return Some(PathBuf::from(path));
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_configuration_round_trips_and_keeps_other_projects() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ClientConfig {
            projects: vec![Project {
                name: "team".into(),
                url: "https://dstack.example.com".into(),
                token: "t-1".into(),
                default: false,
            }],
        };
        config.set_local("http://127.0.0.1:3000", "secret \"quoted\"");
        config.save(dir.path()).unwrap();
        let read = ClientConfig::load(dir.path()).unwrap();
        assert_eq!(read, config);
        assert_eq!(read.project(Some("team")).unwrap().token, "t-1");
        assert_eq!(read.project(None).unwrap().name, "main");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(client_config_file(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn projects_are_added_replaced_made_default_and_removed() {
        let project = |name: &str, default| Project {
            name: name.into(),
            url: format!("https://{name}.example.com"),
            token: format!("t-{name}"),
            default,
        };
        let mut config = ClientConfig::default();
        config.set_local("http://127.0.0.1:3000", "local");
        config.configure(project("team", false));
        assert_eq!(config.project(None).unwrap().name, "main");
        config.configure(project("team", true));
        assert_eq!(config.projects.len(), 2, "replaced, not added twice");
        assert_eq!(config.project(None).unwrap().name, "team");
        assert!(!config.projects[0].default, "one default at a time");
        assert!(config.set_default("main"));
        assert!(!config.set_default("nope"));
        assert_eq!(config.project(None).unwrap().name, "main");
        assert!(config.remove("team"));
        assert!(!config.remove("team"));
        assert_eq!(config.projects.len(), 1);
    }

    #[test]
    fn a_server_configuration_left_at_the_top_moves_to_the_server_directory() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path();
        std::fs::write(
            home.join("config.yml"),
            "projects:\n- name: main\n  backends:\n  - type: aws\n",
        )
        .unwrap();
        std::fs::write(home.join("state.db"), "db").unwrap();
        move_legacy_state(home).unwrap();
        assert!(!home.join("config.yml").exists());
        assert!(server_config_file(home).exists());
        assert_eq!(
            std::fs::read(server_dir(home).join("state.db")).unwrap(),
            b"db"
        );
        // A client configuration stays where it is.
        let config = "projects:\n- name: main\n  url: http://127.0.0.1:3000\n  token: x\n";
        std::fs::write(home.join("config.yml"), config).unwrap();
        std::fs::remove_file(server_config_file(home)).unwrap();
        move_legacy_state(home).unwrap();
        assert!(home.join("config.yml").exists());
    }

    #[test]
    fn loopback_urls_are_told_apart() {
        assert!(is_loopback("http://127.0.0.1:3000"));
        assert!(is_loopback("http://localhost:41234/"));
        assert!(!is_loopback("http://10.0.0.5:3000"));
        assert!(!is_loopback("https://dstack.example.com"));
    }
}
