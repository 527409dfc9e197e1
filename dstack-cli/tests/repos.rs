//! `repos:` and `files:` reach every job: on this machine, on a namespace SSH host and in a
//! podman container, each job sees the repo as it is on disk (an uncommitted change and an
//! untracked file included, an ignored file left out) and the mapped files; an archive is
//! kept once per content; what cannot be uploaded is refused at its place.

mod common;
#[path = "../../dstack-backends/tests/common/netns.rs"]
#[allow(dead_code)]
mod netns;
#[path = "../../dstack-backends/tests/common/podman.rs"]
#[allow(dead_code)]
mod podman;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{text, Env};

/// Runs git in `repo` (committing as a test user); its output.
fn git(repo: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    text(&out.stdout).trim().to_string()
}

/// A repository with `hello.txt` committed twice on `main` and once more on `other`; the
/// first commit's hash.
fn origin(dir: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    git(dir, &["init", "-q", "--initial-branch=main"]);
    std::fs::write(dir.join("hello.txt"), "first\n").unwrap();
    git(dir, &["add", "hello.txt"]);
    git(dir, &["commit", "-qm", "first"]);
    let first = git(dir, &["rev-parse", "HEAD"]);
    git(dir, &["checkout", "-q", "-b", "other"]);
    std::fs::write(dir.join("hello.txt"), "other\n").unwrap();
    git(dir, &["commit", "-qam", "other"]);
    git(dir, &["checkout", "-q", "main"]);
    std::fs::write(dir.join("hello.txt"), "second\n").unwrap();
    git(dir, &["commit", "-qam", "second"]);
    first
}

/// A git repo in `dir/repo` with a committed file changed since, an untracked file, an
/// ignored one, and `dir/data/` beside it (a directory and a file to map with `files:`).
fn repo(dir: &Path) -> String {
    let repo = dir.join("repo");
    std::fs::create_dir_all(repo.join("src")).unwrap();
    git(&repo, &["init", "-q"]);
    std::fs::write(repo.join(".gitignore"), "*.secret\n").unwrap();
    std::fs::write(repo.join("src/train.py"), "committed\n").unwrap();
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-qm", "first"]);
    std::fs::write(repo.join("src/train.py"), "uncommitted change\n").unwrap();
    std::fs::write(repo.join("notes.txt"), "untracked\n").unwrap();
    std::fs::write(repo.join("key.secret"), "ignored\n").unwrap();
    std::fs::create_dir_all(dir.join("data/sub")).unwrap();
    std::fs::write(dir.join("data/sub/rows.csv"), "a,b\n").unwrap();
    std::fs::write(dir.join("config.yaml"), "lr: 0.1\n").unwrap();
    repo.display().to_string()
}

/// A task in the repo (relative paths are taken from the configuration's directory) with
/// `extra` lines, that lists what it was given; a file goes to an absolute path below `out`
/// (made by the unpacking).
fn task(repo: &str, name: &str, out: &Path, extra: &str) -> String {
    let file = format!("{repo}/{name}.dstack.yml");
    let conf = out
        .join(format!("{name}-conf/c.yaml"))
        .display()
        .to_string();
    let yaml = format!(
        "type: task\nname: {name}\nrepos: [.]\n\
         files:\n  - ../data:inputs\n  - ../config.yaml:{conf}\n\
         resources: {{cpu: 1.., memory: 0.1GB..}}\n{extra}\
         commands:\n\
         \x20 - test \"$PWD\" = \"$DSTACK_REPO_DIR\" && echo in-repo\n\
         \x20 - cat src/train.py notes.txt inputs/sub/rows.csv {conf}\n\
         \x20 - test -e key.secret || echo no-secret\n"
    );
    std::fs::write(&file, yaml).unwrap();
    file
}

const SEEN: &str = "in-repo\nuncommitted change\nuntracked\na,b\nlr: 0.1\nno-secret\n";

fn applied(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let start = stdout.find("in-repo").unwrap_or(0);
    let end = stdout.find("\nRun ").map_or(stdout.len(), |i| i + 1);
    stdout[start..end].to_string()
}

/// The archives the home's server keeps.
fn kept(env: &Env) -> usize {
    std::fs::read_dir(env.home.path().join("server/archives")).map_or(0, |d| {
        d.filter(|e| {
            !e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with('.')
        })
        .count()
    })
}

#[test]
fn the_repo_and_files_reach_a_job_on_this_machine_in_a_fresh_directory_of_its_own() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path());
    let file = task(&repo, "here", dir.path(), "");
    let out = env.run(&["apply", "-f", &file, "-y"]);
    assert_eq!(applied(&out), SEEN);
    // The repo (with the task file in it) and two `files:` entries.
    assert_eq!(kept(&env), 3);
    // The job ran in a copy: the repo on disk is as it was.
    assert!(!Path::new(&repo).join("inputs").exists());

    // Applying the same content again packs to the same archives.
    let out = env.run(&["apply", "-f", &file, "-y", "-n", "here-again"]);
    assert_eq!(applied(&out), SEEN);
    assert_eq!(kept(&env), 3);

    // A configured working directory takes the repo at `path` below it, and `if_exists: skip`
    // leaves an occupied one alone.
    let work = dir.path().join("work");
    std::fs::create_dir_all(work.join("code")).unwrap();
    std::fs::write(work.join("code/mine.txt"), "mine\n").unwrap();
    let placed = format!("{repo}/placed.dstack.yml");
    let placed_yaml = |if_exists: &str| {
        format!(
            "type: task\nworking_dir: {}\nrepos:\n  - local_path: .\n    path: code\n{if_exists}\
             resources: {{cpu: 1.., memory: 0.1GB..}}\ncommands: [ls code, 'echo $DSTACK_REPO_DIR']\n",
            work.display()
        )
    };
    std::fs::write(&placed, placed_yaml("    if_exists: skip\n")).unwrap();
    let out = env.run(&["apply", "-f", &placed, "-y", "-n", "placed"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!("mine.txt\n{}/code\n", work.display())),
        "{}",
        text(&out.stdout)
    );
    // With the default `if_exists: error` the job fails, saying why.
    std::fs::write(&placed, placed_yaml("")).unwrap();
    let out = env.run(&["apply", "-f", &placed, "-y", "-n", "placed-again"]);
    assert_ne!(out.status.code(), Some(0));
    let logs = text(&env.run(&["logs", "placed-again", "-d"]).stdout);
    assert!(logs.contains("exists and is not empty"), "{logs}");

    // A relative working directory is taken from the repo's copy (dstack's legacy rule).
    let sub = format!("{repo}/sub.dstack.yml");
    std::fs::write(
        &sub,
        "type: task\nworking_dir: src\nrepos: [.]\nresources: {cpu: 1.., memory: 0.1GB..}\n\
         commands: ['cat train.py', 'test \"$PWD\" = \"$DSTACK_REPO_DIR/src\" && echo below-the-repo']\n",
    )
    .unwrap();
    let out = env.run(&["apply", "-f", &sub, "-y", "-n", "sub"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&env.run(&["logs", "sub"]).stdout),
        "uncommitted change\nbelow-the-repo\n"
    );
}

#[test]
fn what_cannot_be_uploaded_is_refused_at_its_place() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    std::fs::write(plain.join("big.bin"), vec![7u8; 3 * 1024 * 1024]).unwrap();
    let file = plain.join("t.dstack.yml");
    std::fs::write(&file, "type: task\nrepos: [.]\ncommands: [ls]\n").unwrap();
    let out = env.run(&["apply", "-f", &file.display().to_string(), "-y"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("repos[0]: ")
            && text(&out.stderr).contains("is not a git repository"),
        "{}",
        text(&out.stderr)
    );
    // dstack's 2 MiB limit on a `files:` entry, and the variable that lifts it.
    std::fs::write(
        &file,
        "type: task\nfiles: [big.bin]\ncommands: [ls -l big.bin]\n",
    )
    .unwrap();
    let out = env.run(&["apply", "-f", &file.display().to_string(), "-y"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("files[0]: ") && err.contains("DSTACK_SERVER_CODE_UPLOAD_LIMIT"),
        "{err}"
    );
    let out = env
        .cmd(&["apply", "-f", &file.display().to_string(), "-y"])
        .env("DSTACK_SERVER_CODE_UPLOAD_LIMIT", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(" 3145728 "),
        "{}",
        text(&out.stdout)
    );
    // `hash` of a local repo (it is uploaded as it is): refused with its line.
    std::fs::write(
        &file,
        "type: task\nrepos:\n  - local_path: .\n    hash: abc\ncommands: [ls]\n",
    )
    .unwrap();
    let out = env.run(&["apply", "-f", &file.display().to_string(), "-y"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains(
            "t.dstack.yml:3:5: repos[0]: `branch` and `hash` apply to repos given by URL"
        ),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn the_repo_and_files_reach_a_job_on_a_namespace_ssh_host_once_for_all_its_jobs() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path());
    let hosts = netns::TestHosts::start(1);
    let fleet_name = format!("repohosts-{}", std::process::id());
    let fleet = env.write("hosts.dstack.yml", &hosts.fleet_yaml(&fleet_name));
    let out = env.run(&["apply", "-f", &fleet, "-y"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let file = task(
        &repo,
        "remote",
        dir.path(),
        &format!("fleets: [{fleet_name}]\n"),
    );
    let out = env.run(&["apply", "-f", &file, "-y"]);
    assert_eq!(applied(&out), SEEN);

    // Three more runs started together upload nothing again: the host keeps each archive.
    for i in 0..3 {
        let name = format!("remote-{i}");
        let out = env.run(&["apply", "-f", &file, "-y", "-d", "-n", &name]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let listing = text(&env.run(&["ps", "-a"]).stdout);
        if listing.matches(" done ").count() == 4 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{listing}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    for i in 0..3 {
        let out = env.run(&["logs", &format!("remote-{i}")]);
        assert_eq!(text(&out.stdout), SEEN);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let logs = std::fs::read_dir(format!("{home}/.dstack-rs"))
        .unwrap()
        .filter_map(|e| {
            let path = e.unwrap().path();
            let ours = path
                .file_name()?
                .to_str()?
                .starts_with(&format!("{fleet_name}-"));
            ours.then(|| std::fs::read_to_string(path.join("agent/agent.log")).unwrap_or_default())
        })
        .collect::<String>();
    assert_eq!(
        logs.matches("received archive").count(),
        3,
        "the repo and two files, once each: {logs}"
    );
    let out = env.run(&["fleet", "delete", &fleet_name, "-y"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn the_repo_and_files_reach_a_job_in_a_podman_container() {
    let podman = podman::Podman::start();
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path());
    let file = task(
        &repo,
        "boxed",
        dir.path(),
        &format!("image: {}\n", podman::IMAGE),
    );
    let out = env
        .cmd(&["apply", "-f", &file, "-y"])
        .env("DOCKER_HOST", format!("unix://{}", podman.socket.display()))
        .output()
        .unwrap();
    assert_eq!(applied(&out), SEEN);
    // dstack's working directory of a container with a repo.
    let out = env.run(&["logs", "boxed"]);
    assert!(
        text(&out.stdout).starts_with("in-repo"),
        "{}",
        text(&out.stdout)
    );
    let yaml = std::fs::read_to_string(&file).unwrap().replace(
        "  - test -e key.secret || echo no-secret\n",
        "  - test -e key.secret || echo no-secret\n  - pwd\n",
    );
    std::fs::write(&file, yaml).unwrap();
    let out = env
        .cmd(&["apply", "-f", &file, "-y", "-n", "boxed-pwd"])
        .env("DOCKER_HOST", format!("unix://{}", podman.socket.display()))
        .output()
        .unwrap();
    assert_eq!(applied(&out), format!("{SEEN}/workflow\n"));
    // A relative working directory is below /workflow (dstack's legacy rule).
    let yaml = std::fs::read_to_string(&file)
        .unwrap()
        .replace("repos: [.]\n", "repos: [.]\nworking_dir: src\n")
        .replace(
            "cat src/train.py notes.txt inputs/sub/rows.csv",
            "cat train.py ../notes.txt ../inputs/sub/rows.csv",
        )
        .replace(
            "test \"$PWD\" = \"$DSTACK_REPO_DIR\"",
            "test \"$PWD\" = \"$DSTACK_REPO_DIR/src\"",
        )
        .replace("test -e key.secret", "test -e ../key.secret");
    std::fs::write(&file, yaml).unwrap();
    let out = env
        .cmd(&["apply", "-f", &file, "-y", "-n", "boxed-sub"])
        .env("DOCKER_HOST", format!("unix://{}", podman.socket.display()))
        .output()
        .unwrap();
    assert_eq!(applied(&out), format!("{SEEN}/workflow/src\n"));
}

/// Applies a task named `name` with `repos:` lines `repo` (and `extra` lines) that prints
/// `hello.txt` and whether it is in a clone; its output lines.
fn cloned(env: &Env, name: &str, repo: &str, extra: &str, docker: Option<&str>) -> Vec<String> {
    let file = env.write(
        &format!("{name}.dstack.yml"),
        &format!(
            "type: task\nname: {name}\nrepos:\n{repo}{extra}\
             resources: {{cpu: 1.., memory: 0.1GB..}}\n\
             commands: ['cat hello.txt', 'test -d .git && echo a-clone']\n"
        ),
    );
    let mut cmd = env.cmd(&["apply", "-f", &file, "-y"]);
    if let Some(socket) = docker {
        cmd.env("DOCKER_HOST", socket);
    }
    let out = cmd.output().unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    let logs = text(&env.run(&["logs", name]).stdout);
    logs.lines().map(str::to_string).collect()
}

#[test]
fn a_repo_given_by_url_is_cloned_at_its_branch_or_commit_on_the_host_and_into_a_container() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let first = origin(&dir.path().join("origin"));
    let url = format!("file://{}", dir.path().join("origin").display());
    let main = format!("  - {url}\n");
    assert_eq!(cloned(&env, "main", &main, "", None), ["second", "a-clone"]);
    let branch = format!("  - url: {url}\n    branch: other\n");
    let single = "single_branch: true\n";
    assert_eq!(
        cloned(&env, "branch", &branch, single, None),
        ["other", "a-clone"]
    );
    let commit = format!("  - url: {url}\n    hash: {first}\n");
    assert_eq!(
        cloned(&env, "commit", &commit, "", None),
        ["first", "a-clone"]
    );

    // Cloned on the host and put into the container (at dstack's /workflow); the home's
    // agent finds the container engine when it starts.
    let podman = podman::Podman::start();
    let socket = format!("unix://{}", podman.socket.display());
    let boxed = format!("image: {}\n", podman::IMAGE);
    let in_containers = Env::new();
    assert_eq!(
        cloned(&in_containers, "boxed", &branch, &boxed, Some(&socket)),
        ["other", "a-clone"]
    );
}

/// A private git server over HTTP (`tests/apps/git_http_server.py`) serving `root`, taking
/// `token`; killed when dropped.
struct PrivateGit {
    child: std::process::Child,
    port: u16,
}

impl PrivateGit {
    fn start(root: &Path, token: &str) -> PrivateGit {
        let port_file = root.join("port");
        let child = Command::new("python3")
            .arg(common::workspace().join("dstack-cli/tests/apps/git_http_server.py"))
            .arg(root)
            .arg(token)
            .arg(&port_file)
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let port = loop {
            if let Some(port) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|p| p.trim().parse().ok())
            {
                break port;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the git server did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        PrivateGit { child, port }
    }
}

impl Drop for PrivateGit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every file below `dir` whose content holds `needle`, but for `except`.
fn files_holding(dir: &Path, needle: &str, except: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path == except {
            continue;
        }
        if path.is_dir() && !path.is_symlink() {
            found.extend(files_holding(&path, needle, except));
        } else if std::fs::read(&path)
            .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle.as_bytes()))
        {
            found.push(path);
        }
    }
    found
}

#[test]
fn dstack_init_registers_a_private_repos_token_for_the_runs_that_clone_it() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    origin(&dir.path().join("work"));
    let bare = dir.path().join("private.git");
    git(
        dir.path(),
        &["clone", "-q", "--bare", "work", bare.to_str().unwrap()],
    );
    let token = "tok-3f9a1c77e2";
    let server = PrivateGit::start(dir.path(), token);
    // (the long form: `http://host:PORT/…` alone reads as URL `http://host` and path
    // `PORT/…`, as dstack reads it)
    let url = format!("http://127.0.0.1:{}/private.git", server.port);

    // Neither this machine's credentials nor a wrong token open it.
    let out = env.run(&["init", "-P", &url]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("No valid default Git credentials"),
        "{}",
        text(&out.stderr)
    );
    let out = env.run(&["init", "-P", &url, "-t", "wrong"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("do not open the repo"),
        "{}",
        text(&out.stderr)
    );
    // Without init, a run cannot clone it.
    let file = env.write(
        "private.dstack.yml",
        &format!(
            "type: task\nname: private\nrepos:\n  - url: {url}\n\
             resources: {{cpu: 1.., memory: 0.1GB..}}\ncommands: ['cat hello.txt']\n"
        ),
    );
    let out = env.run(&["apply", "-f", &file, "-y"]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out.stdout));

    let out = env.run(&["init", "-P", &url, "-t", token]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        cloned(&env, "private", &format!("  - url: {url}\n"), "", None),
        ["second", "a-clone"]
    );

    // The token is kept with the secrets (0600), and nowhere else in the home: not in the
    // state database, the agent's journal, logs or listings.
    let secrets = env.home.path().join("secrets.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&secrets).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        files_holding(env.home.path(), token, &secrets),
        Vec::<PathBuf>::new()
    );
    for listing in [&["ps", "-a", "--json"][..], &["secret", "list"][..]] {
        let out = env.run(listing);
        assert!(!text(&out.stdout).contains(token));
        assert!(
            !text(&out.stdout).contains("__dstack"),
            "{}",
            text(&out.stdout)
        );
    }
}
