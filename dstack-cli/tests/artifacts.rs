//! Artifacts, tags and tagged dependencies end to end (issue 26 points 4–6): the 001
//! document's `prepare` → `train` (`depends-on: prepare:latest`), artifacts downloadable while
//! a run runs and the same once it has ended, a finished run's artifacts unchanged by a later
//! run, files uploaded as a tag (`:dataset`), and missing tags refused at their place.

mod common;
#[path = "../../dstack-backends/tests/common/netns.rs"]
#[allow(dead_code)]
mod netns;
#[path = "../../dstack-backends/tests/common/podman.rs"]
#[allow(dead_code)]
mod podman;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{project, run_in, text, Env};

/// Runs `dstack ARGS` from `dir` and expects it to succeed; its stdout and stderr.
fn ok(env: &Env, dir: &Path, args: &[&str]) -> (String, String) {
    let (code, out, err) = run_in(env, dir, args);
    assert_eq!(code, Some(0), "{args:?}: {out}\n{err}");
    (out, err)
}

/// Waits (at most a minute) until `done` holds for `dstack artifacts list RUN`'s (stdout,
/// stderr).
fn wait_listing(env: &Env, dir: &Path, run: &str, done: impl Fn(&str, &str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, out, err) = run_in(env, dir, &["artifacts", "list", run]);
        if code == Some(0) && done(&out, &err) {
            return out;
        }
        assert!(Instant::now() < deadline, "gave up waiting: {out}\n{err}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn prepare_is_tagged_and_train_starts_with_its_data_and_saves_a_checkpoint() {
    let env = Env::new();
    let dir = project(&env);
    // `train` depends on a tag nobody made yet: refused at its line, nothing submitted.
    let (code, _, err) = run_in(&env, &dir, &["run", "-y", "train"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(".dstack/workflows.yaml:20:9: workflows[1].depends-on[0]: there is no tag prepare:latest"),
        "{err}"
    );

    ok(&env, &dir, &["run", "-y", "-n", "prep-1", "prepare"]);
    let listed = wait_listing(&env, &dir, "prep-1", |_, err| err.contains("(final)"));
    assert!(listed.starts_with("data/numbers.csv\t22\t"), "{listed}");
    // The job's own directory is the project here: the data must come from the tag.
    std::fs::remove_dir_all(dir.join("data")).unwrap();
    let (_, err) = ok(&env, &dir, &["tags", "add", "latest", "prep-1"]);
    assert!(err.contains("as prepare:latest (1 file(s))"), "{err}");
    let (tags, _) = ok(&env, &dir, &["tags", "list"]);
    assert!(tags.contains("prepare:latest\tprep-1\t1 file(s)"), "{tags}");

    let (out, err) = ok(
        &env,
        &dir,
        &[
            "run", "-y", "-n", "train-1", "train", "--epoch", "2", "--seed", "2",
        ],
    );
    assert!(
        out.contains("training: epoch=2 seed=2 batch_size=32 rows=10"),
        "{out}\n{err}"
    );
    wait_listing(&env, &dir, "train-1", |_, err| err.contains("(final)"));
    let got = env.home.path().join("got");
    let got_arg = got.display().to_string();
    ok(
        &env,
        &dir,
        &["artifacts", "download", "train-1", "-o", &got_arg],
    );
    assert_eq!(
        std::fs::read_to_string(got.join("checkpoint/model.txt")).unwrap(),
        "epoch=2 seed=2 rows=10\n"
    );

    // A later run writing other data changes nothing of prep-1's.
    std::fs::write(
        dir.join("prepare.py"),
        "import pathlib\npathlib.Path('data').mkdir(exist_ok=True)\npathlib.Path('data/numbers.csv').write_text('changed')\n",
    )
    .unwrap();
    ok(&env, &dir, &["run", "-y", "-n", "prep-2", "prepare"]);
    wait_listing(&env, &dir, "prep-2", |_, err| err.contains("(final)"));
    let again = wait_listing(&env, &dir, "prep-1", |_, _| true);
    assert_eq!(again, listed, "a finished run's artifacts never change");
    ok(
        &env,
        &dir,
        &["artifacts", "download", "prep-1", "data", "-o", &got_arg],
    );
    assert!(std::fs::read_to_string(got.join("data/numbers.csv"))
        .unwrap()
        .starts_with("x\n0\n"),);
    // A tag is made once; deleting it leaves the run's artifacts.
    let (code, _, err) = run_in(&env, &dir, &["tags", "add", "latest", "prep-2"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("tag prepare:latest exists"), "{err}");
    ok(&env, &dir, &["tags", "delete", "latest"]);
    let (tags, _) = ok(&env, &dir, &["tags", "list"]);
    assert!(!tags.contains("prepare:latest"), "{tags}");
    wait_listing(&env, &dir, "prep-1", |out, _| out == listed);
}

#[test]
fn artifacts_are_downloadable_while_the_run_runs_and_the_same_after_it_ends() {
    let env = Env::new();
    let dir = env.home.path().join("slow");
    std::fs::create_dir_all(dir.join(".dstack")).unwrap();
    std::fs::write(dir.join("input.txt"), "in").unwrap();
    let go = env.home.path().join("go");
    // `files:` gives the job a fresh directory of its own, removed when it ends: its
    // artifacts are kept before.
    let workflows = format!(
        "workflows:\n  - name: slow\n    provider: bash\n    files: ['{input}:input.txt']\n    \
         artifacts: [out]\n    commands:\n      - mkdir -p out && cp input.txt out/a.txt\n      \
         - for i in $(seq 600); do [ -e {go} ] && break; sleep 0.1; done\n      \
         - echo b > out/b.txt\n",
        go = go.display(),
        input = dir.join("input.txt").display()
    );
    std::fs::write(dir.join(".dstack/workflows.yaml"), workflows).unwrap();
    ok(&env, &dir, &["run", "-y", "-d", "-n", "slow-1", "slow"]);
    let running = wait_listing(&env, &dir, "slow-1", |out, _| out.contains("out/a.txt"));
    assert!(!running.contains("out/b.txt"), "{running}");
    let early = env.home.path().join("early");
    let early_arg = early.display().to_string();
    ok(
        &env,
        &dir,
        &["artifacts", "download", "slow-1", "-o", &early_arg],
    );
    assert_eq!(
        std::fs::read_to_string(early.join("out/a.txt")).unwrap(),
        "in"
    );

    std::fs::write(&go, "").unwrap();
    // The engine saves the last snapshot when the run ends, unasked (the only run of this
    // home: one manifest).
    let runs = env.home.path().join("server/artifacts/runs");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !frozen_manifest(&runs) {
        assert!(
            Instant::now() < deadline,
            "no frozen manifest in {}",
            runs.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let done = wait_listing(&env, &dir, "slow-1", |_, err| err.contains("(final)"));
    assert!(done.contains("out/b.txt"), "{done}");
    let a_line = |listing: &str| {
        listing
            .lines()
            .find(|l| l.starts_with("out/a.txt"))
            .map(str::to_string)
    };
    assert_eq!(a_line(&done), a_line(&running));
    let late = env.home.path().join("late");
    let late_arg = late.display().to_string();
    ok(
        &env,
        &dir,
        &["artifacts", "download", "slow-1", "-o", &late_arg],
    );
    assert_eq!(
        std::fs::read_to_string(late.join("out/a.txt")).unwrap(),
        "in"
    );
    assert_eq!(
        std::fs::read_to_string(late.join("out/b.txt")).unwrap(),
        "b\n"
    );
}

/// Whether a manifest in `dir` is frozen.
fn frozen_manifest(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(e.path()).unwrap_or_default())
                .unwrap_or_default();
        manifest["frozen"] == true
    })
}

#[test]
fn uploaded_files_are_a_tag_that_a_workflow_depends_on() {
    let env = Env::new();
    let dir = env.home.path().join("push");
    std::fs::create_dir_all(dir.join(".dstack")).unwrap();
    std::fs::create_dir_all(dir.join("dataset/sub")).unwrap();
    std::fs::write(dir.join("dataset/sub/rows.csv"), "a,b\n1,2\n").unwrap();
    let workflows = "workflows:\n  - name: use\n    provider: bash\n    depends-on: [':dataset']\n    \
                     working_dir: work\n    commands: [cat dataset/sub/rows.csv]\n  \
                     - name: missing\n    provider: bash\n    depends-on: [':nope']\n    commands: [x]\n";
    std::fs::write(dir.join(".dstack/workflows.yaml"), workflows).unwrap();
    let (_, err) = ok(
        &env,
        &dir,
        &["tags", "add", "dataset", "--artifact", "dataset"],
    );
    assert!(err.contains("Uploaded 1 file(s) as :dataset"), "{err}");
    // The job runs in a directory of its own (`work`, made here): the data comes from the tag.
    std::fs::create_dir_all(dir.join("work")).unwrap();
    let (out, _) = ok(&env, &dir, &["run", "-y", "use"]);
    assert!(out.contains("a,b\n1,2"), "{out}");
    let (code, _, err) = run_in(&env, &dir, &["run", "-y", "missing"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("workflows[1].depends-on[0]: there is no tag :nope"),
        "{err}"
    );
    let (code, _, err) = run_in(
        &env,
        &dir,
        &["tags", "add", "bad/name", "--artifact", "dataset"],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("invalid tag name"), "{err}");
}

#[test]
fn a_containers_artifacts_are_saved_while_it_runs_and_kept_when_it_is_removed() {
    let podman = podman::Podman::start();
    let docker_host = format!("unix://{}", podman.socket.display());
    let env = Env::new();
    let dir = env.home.path().join("boxed");
    std::fs::create_dir_all(dir.join(".dstack")).unwrap();
    let workflows = format!(
        "workflows:\n  - name: boxed\n    provider: docker\n    image: {}\n    \
         working_dir: /work\n    artifacts: [out]\n    \
         commands: ['mkdir -p out', 'echo c > out/c.txt', 'sleep 600']\n",
        podman::IMAGE
    );
    std::fs::write(dir.join(".dstack/workflows.yaml"), workflows).unwrap();
    let run = |args: &[&str]| {
        let out = env
            .cmd(args)
            .current_dir(&dir)
            .env("DOCKER_HOST", &docker_host)
            .output()
            .unwrap();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    let (code, out, err) = run(&["run", "-y", "-d", "-n", "boxed-1", "boxed"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    // Copied out of the running container through its engine's archive API.
    let running = wait_listing(&env, &dir, "boxed-1", |out, _| out.contains("out/c.txt"));
    let (code, out, err) = run(&["stop", "boxed-1", "-y", "-x"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    // The container is gone; what it left was kept before.
    let done = wait_listing(&env, &dir, "boxed-1", |_, err| err.contains("(final)"));
    assert_eq!(done, running);
    let got = env.home.path().join("got");
    let got_arg = got.display().to_string();
    ok(
        &env,
        &dir,
        &[
            "artifacts",
            "download",
            "boxed-1",
            "out/c.txt",
            "-o",
            &got_arg,
        ],
    );
    assert_eq!(
        std::fs::read_to_string(got.join("out/c.txt")).unwrap(),
        "c\n"
    );
}

#[test]
fn a_job_on_an_ssh_host_starts_with_a_tag_and_its_artifacts_come_back() {
    let env = Env::new();
    let hosts = netns::TestHosts::start(1);
    let fleet_name = format!("arthosts-{}", std::process::id());
    let fleet = env.write("hosts.dstack.yml", &hosts.fleet_yaml(&fleet_name));
    let out = env.run(&["apply", "-f", &fleet, "-y"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let dir = env.home.path().join("remote");
    std::fs::create_dir_all(dir.join(".dstack")).unwrap();
    std::fs::create_dir_all(dir.join("dataset")).unwrap();
    std::fs::write(dir.join("dataset/rows.csv"), "1,2\n").unwrap();
    std::fs::write(dir.join("input.txt"), "input\n").unwrap();
    // `files:` gives the job a fresh directory on the host (removed when it ends).
    let workflows = format!(
        "workflows:\n  - name: remote\n    provider: bash\n    fleets: [{fleet_name}]\n    \
         files: ['{input}:input.txt']\n    depends-on: [':dataset']\n    artifacts: [out]\n    \
         commands: ['mkdir -p out', 'cat dataset/rows.csv input.txt > out/r.txt']\n",
        input = dir.join("input.txt").display()
    );
    std::fs::write(dir.join(".dstack/workflows.yaml"), workflows).unwrap();
    ok(
        &env,
        &dir,
        &["tags", "add", "dataset", "--artifact", "dataset"],
    );
    ok(&env, &dir, &["run", "-y", "-n", "remote-1", "remote"]);
    let done = wait_listing(&env, &dir, "remote-1", |_, err| err.contains("(final)"));
    assert!(done.starts_with("out/r.txt\t10\t"), "{done}");
    let got = env.home.path().join("got");
    let got_arg = got.display().to_string();
    ok(
        &env,
        &dir,
        &["artifacts", "download", "remote-1", "-o", &got_arg],
    );
    assert_eq!(
        std::fs::read_to_string(got.join("out/r.txt")).unwrap(),
        "1,2\ninput\n"
    );
    let out = env.run(&["fleet", "delete", &fleet_name, "-y"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}
