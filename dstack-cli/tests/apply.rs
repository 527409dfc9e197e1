//! `dstack apply / ps / logs / stop` end to end, as a terminal user runs them, with a private
//! `$DSTACK_HOME` per test and the real agent.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{text, Env};

#[test]
fn apply_runs_the_hello_example_and_exits_with_its_code() {
    let env = Env::new();
    let out = env.run(&["apply", "-f", "examples/hello.dstack.yml", "-y"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    assert!(stdout.contains("Hello from dstack-rs"), "{stdout}");
    assert!(stdout.contains("BACKEND"), "the plan is printed: {stdout}");
    let failing = env.write(
        "fail.dstack.yml",
        "type: task\ncommands: [echo oops, exit 7]\nresources: {cpu: 1.., memory: 0.1GB..}\n",
    );
    let out = env.run(&["apply", "-f", &failing, "-y"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("oops"));
    let ps = text(&env.run(&["ps", "-a"]).stdout);
    assert!(
        ps.contains("failed (exit 7)") && ps.contains("done"),
        "{ps}"
    );
}

#[test]
fn invalid_configurations_and_images_fail_clearly() {
    let env = Env::new();
    let bad = env.write(
        "bad.dstack.yml",
        "type: task\ncommands: [x]\nresources: {gpus: 1}\n",
    );
    let out = env.run(&["apply", "-f", &bad, "-y"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("bad.dstack.yml:3:13: resources.gpus: unknown field"),
        "{}",
        text(&out.stderr)
    );
    let image = env.write(
        "image.dstack.yml",
        "type: task\nimage: ubuntu\ncommands: [x]\n",
    );
    let out = env.run(&["apply", "-f", &image, "-y"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("container runtime not available on this backend yet"),
        "{}",
        text(&out.stderr)
    );
}

/// Polls `f` for up to 30 s; on timeout shows the runs and the agent's log.
fn wait_for(env: &Env, mut f: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        if Instant::now() >= deadline {
            let runs = text(&env.run(&["ps", "-a", "--json"]).stdout);
            let read =
                |p: &str| std::fs::read_to_string(env.home.path().join(p)).unwrap_or_default();
            let (log, client) = (read("agent/agent.log"), read("client.err"));
            panic!(
                "timed out waiting for {what}\nruns: {runs}\nagent log: {log}\nclient stderr: {client}"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn runs_survive_a_killed_client() {
    let env = Env::new();
    let file = env.write(
        "slow.dstack.yml",
        "type: task\nname: slow\ncommands:\n  - for i in 1 2 3 4 5 6; do echo line $i; sleep 0.5; done\nresources: {cpu: 1.., memory: 0.1GB..}\n",
    );
    let mut client: Child = env
        .cmd(&["apply", "-f", &file, "-y"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(env.home.path().join("client.err")).unwrap())
        .spawn()
        .unwrap();
    wait_for(
        &env,
        || text(&env.run(&["ps"]).stdout).contains("running"),
        "the run to start",
    );
    client.kill().unwrap();
    client.wait().unwrap();
    let ps = text(&env.run(&["ps"]).stdout);
    assert!(ps.contains("slow") && ps.contains("running"), "{ps}");
    let logs = env.run(&["logs", "-f", "slow"]);
    let expected: String = (1..=6).map(|i| format!("line {i}\n")).collect();
    assert_eq!(text(&logs.stdout), expected);
    wait_for(
        &env,
        || text(&env.run(&["ps", "-a"]).stdout).contains("done"),
        "the run to be done",
    );
}

#[test]
fn stop_from_another_process() {
    let env = Env::new();
    let file = env.write("sleep.dstack.yml", "type: task\nname: sleeper\ncommands: [sleep 1000]\nresources: {cpu: 1.., memory: 0.1GB..}\n");
    let out = env.run(&["apply", "-f", &file, "-y", "-d"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    wait_for(
        &env,
        || text(&env.run(&["ps"]).stdout).contains("running"),
        "the run to start",
    );
    let out = env.run(&["stop", "sleeper", "-y"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("sleeper terminated"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn ctrl_c_detaches_and_the_run_goes_on() {
    let env = Env::new();
    let file = env.write(
        "tick.dstack.yml",
        "type: task\nname: ticker\ncommands:\n  - for i in 1 2 3 4; do echo tick $i; sleep 0.3; done\nresources: {cpu: 1.., memory: 0.1GB..}\n",
    );
    let client = env
        .cmd(&["apply", "-f", &file, "-y"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(
        &env,
        || text(&env.run(&["ps"]).stdout).contains("running"),
        "the run to start",
    );
    Command::new("kill")
        .arg("-INT")
        .arg(client.id().to_string())
        .status()
        .unwrap();
    let out = client.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("Detached from ticker") && stderr.contains("dstack logs -f ticker"),
        "{stderr}"
    );
    wait_for(
        &env,
        || text(&env.run(&["ps", "-a"]).stdout).contains("done"),
        "the run to finish after detaching",
    );
    let logs = text(&env.run(&["logs", "ticker"]).stdout);
    assert_eq!(logs, "tick 1\ntick 2\ntick 3\ntick 4\n");
}

/// Every file under `dir` (recursively) whose bytes contain `needle`, except `allowed`.
fn files_containing(dir: &Path, needle: &str, allowed: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_containing(&path, needle, allowed));
        } else if path != allowed
            && std::fs::read(&path)
                .is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
        {
            found.push(path);
        }
    }
    found
}

fn sha256(text: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg("printf %s \"$1\" | sha256sum | cut -d' ' -f1")
        .arg("sh")
        .arg(text)
        .output()
        .unwrap();
    text_of(&out.stdout)
}

fn text_of(bytes: &[u8]) -> String {
    text(bytes).trim().to_string()
}

#[test]
fn a_secret_reaches_its_job_and_nothing_else() {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let value = "s3cr3t-Value-91";
    let mut set = env
        .cmd(&["secret", "set", "api_token"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    set.stdin
        .take()
        .unwrap()
        .write_all(b"s3cr3t-Value-91\n")
        .unwrap();
    let out = set.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let file = env.home.path().join("secrets.json");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let out = env.run(&["secret", "list"]);
    assert_eq!(text(&out.stdout), "api_token\n");
    let out = env.run(&["secret", "get", "api_token"]);
    assert_eq!(text(&out.stdout), format!("{value}\n"));

    // The job gets the value (it prints only its hash); the run's record, `ps --json`, the
    // agent's files and every other file of the state hold only the reference.
    let task = env.write(
        "secretive.dstack.yml",
        "type: task\nname: secretive\nenv:\n  - TOKEN=${{ secrets.api_token }}\n\
         commands:\n  - printf %s \"$TOKEN\" | sha256sum\n",
    );
    let out = env.run(&["apply", "-f", &task, "-y"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&sha256(value)),
        "{}",
        text(&out.stdout)
    );
    let out = env.run(&["ps", "-a", "--json"]);
    let ps = text(&out.stdout);
    assert!(
        ps.contains("${{ secrets.api_token }}") && !ps.contains(value),
        "{ps}"
    );
    let leaks = files_containing(env.home.path(), value, &file);
    assert!(leaks.is_empty(), "the value is in {leaks:?}");

    // A missing secret fails the job, naming the reference and not any value.
    let missing = env.write(
        "missing.dstack.yml",
        "type: task\nname: missing\nenv:\n  TOKEN: ${{ secrets.nope }}\ncommands: [\"true\"]\n",
    );
    let out = env.run(&["apply", "-f", &missing, "-y"]);
    assert_ne!(out.status.code(), Some(0));
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        said.contains("secrets interpolation error") && said.contains("secrets.nope"),
        "{said}"
    );

    // Deleting asks, and without a terminal only -y confirms.
    let out = env.run(&["secret", "delete", "api_token"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("-y"), "{}", text(&out.stderr));
    assert_eq!(text(&env.run(&["secret", "list"]).stdout), "api_token\n");
    let out = env.run(&["secret", "delete", "api_token", "-y"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&env.run(&["secret", "list"]).stdout), "");
}

#[test]
fn registry_passwords_are_never_printed() {
    let env = Env::new();
    let file = env.write(
        "private.dstack.yml",
        "type: task\nimage: registry.example/private:1\nregistry_auth:\n  username: me\n  \
         password: hunter2-Pass\ncommands: [\"true\"]\n",
    );
    let out = env.run(&["validate", "--json", &file]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    assert!(!printed.contains("hunter2-Pass"), "{printed}");
    assert!(printed.contains("\"username\": \"me\""), "{printed}");
}

#[test]
fn one_unreadable_run_record_hides_no_other_run() {
    let env = Env::new();
    for name in ["good-one", "bad-one"] {
        let file = env.write(
            &format!("{name}.dstack.yml"),
            &format!("type: task\nname: {name}\ncommands: [\"true\"]\n"),
        );
        let out = env.run(&["apply", "-f", &file, "-y"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    }
    let db = env.home.path().join("server/state.db");
    let out = Command::new("python3")
        .arg("-c")
        .arg(
            "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); \
             c.execute(\"UPDATE runs SET data = '{not json' WHERE name = 'bad-one'\"); c.commit()",
        )
        .arg(&db)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = env.run(&["ps", "-a"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("good-one"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains("cannot be read"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_scheduled_run_is_listed_with_its_next_start_until_stopped() {
    use dstack_core::config::cron::{utc_text, Cron};
    let env = Env::new();
    let file = env.write(
        "nightly.dstack.yml",
        "type: task\nname: nightly\ncommands: [echo hi]\nresources: {cpu: 1.., memory: 0.1GB..}\nschedule:\n  cron: ['0 0 1 1 *', '30 4 1 1 *']\n",
    );
    let cron = Cron::parse("0 0 1 1 *").unwrap();
    let next = || utc_text(cron.next_after(dstack_core::model::now_ms()).unwrap());
    let before = next();
    let out = env.run(&["apply", "-f", &file, "-y"]);
    let after = next();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!("Scheduled: it starts at {before}"))
            || stdout.contains(&format!("Scheduled: it starts at {after}")),
        "{stdout}"
    );
    let ps = text(&env.run(&["ps"]).stdout);
    let line = ps.lines().find(|l| l.contains("nightly")).unwrap_or("");
    assert!(
        line.contains(&format!("pending (next {before})"))
            || line.contains(&format!("pending (next {after})")),
        "{ps}"
    );
    let out = env.run(&["stop", "nightly", "-y"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let ps = text(&env.run(&["ps", "-a"]).stdout);
    let line = ps.lines().find(|l| l.contains("nightly")).unwrap_or("");
    assert!(
        line.contains("terminated") && !line.contains("next"),
        "{ps}"
    );
}

/// A field that would be ignored is refused by `dstack apply`, before anything is submitted,
/// with the file, line and field (or, for what the engine refuses, the field's name).
#[test]
fn ignored_fields_are_refused_by_dstack_apply_at_their_place() {
    let env = Env::new();
    let task = "type: task\ncommands: [echo never]\nresources: {cpu: 1.., memory: 0.1GB..}\n";
    for (extra, expected) in [
        (
            "dstack: true\n",
            "x.dstack.yml:4:1: dstack: `dstack: true` (the dstack CLI and credentials inside the run) is not supported yet",
        ),
        (
            "repos:\n  - local_path: .\n    hash: abc\n",
            "x.dstack.yml:5:5: repos[0]: `branch` and `hash` apply to repos given by URL",
        ),
        (
            "privileged: true\n",
            "x.dstack.yml:4:1: privileged: `privileged` applies to containers (`image:`) only",
        ),
    ] {
        let file = env.write("x.dstack.yml", &format!("{task}{extra}"));
        let out = env.run(&["apply", "-f", &file, "-y", "-d"]);
        assert_eq!(out.status.code(), Some(1), "{extra}");
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(expected) && stderr.contains("[unsupported]"),
            "{extra}: {stderr}"
        );
    }
    for (yaml, expected) in [
        (
            "type: task\ngroups:\n  - nodes: 1\n    commands: [echo never]\n",
            "node groups (`groups:`) are not supported yet; use `nodes: N`",
        ),
        (
            "type: service\nport: 8000\ngroups:\n  - replicas: 1\n    commands: [echo never]\n",
            "replica groups (`replicas` as a list, or `groups`) are not supported yet",
        ),
    ] {
        let file = env.write("g.dstack.yml", yaml);
        let out = env.run(&["apply", "-f", &file, "-y", "-d"]);
        assert_eq!(out.status.code(), Some(1), "{yaml}");
        assert!(
            text(&out.stderr).contains(expected),
            "{yaml}: {}",
            text(&out.stderr)
        );
    }
    // Nothing was submitted.
    assert!(!text(&env.run(&["ps", "-a"]).stdout).contains("never"));
}

/// `backends: [aws]` never runs on this machine, even with room: the run finds no offers and
/// says which host its profile left out and why.
#[test]
fn a_run_for_another_backend_never_lands_on_this_machine() {
    let env = Env::new();
    let file = env.write(
        "aws.dstack.yml",
        "type: task\ncommands: [echo ran here]\nbackends: [aws]\nresources: {cpu: 1.., memory: 0.1GB..}\n",
    );
    let out = env.run(&["apply", "-f", &file, "-y"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(!stdout.contains("ran here"), "{stdout}");
    assert!(
        stdout.contains("backend local is not one of `backends` (aws)"),
        "the plan says why: {stdout}"
    );
    assert!(
        stderr.contains("backend local is not one of `backends` (aws)"),
        "the failure says why: {stderr}"
    );
    // Without the profile it runs here.
    let local = env.write(
        "local.dstack.yml",
        "type: task\ncommands: [echo ran here]\nbackends: [local]\nresources: {cpu: 1.., memory: 0.1GB..}\n",
    );
    let out = env.run(&["apply", "-f", &local, "-y"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("ran here"));
}

/// `dstack apply -f x.yml -- a "b c"` puts the arguments into `${{ run.args }}` quoted for the
/// shell; `$${{` is a literal `${{`; other references in commands are located errors.
#[test]
fn run_args_reach_the_commands_quoted_and_bad_references_are_located() {
    let env = Env::new();
    let file = env.write(
        "args.dstack.yml",
        "type: task\ncommands:\n  - printf '<%s>\\n' ${{ run.args }}\n  - echo '$${{ env.KEPT }}'\nresources: {cpu: 1.., memory: 0.1GB..}\n",
    );
    let out = env.run(&["apply", "-f", &file, "-y", "--", "a", "b c", "it's $HOME"]);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    assert!(
        stdout.contains("<a>\n<b c>\n<it's $HOME>\n${{ env.KEPT }}\n"),
        "{stdout}"
    );
    let bad = env.write(
        "bad.dstack.yml",
        "type: task\ncommands:\n  - echo ok\n  - echo ${{ env.HOME }}\n  - echo ${{ run.args }\n",
    );
    let out = env.run(&["apply", "-f", &bad, "-y", "--", "x"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("bad.dstack.yml:4:5: commands[1]: missing env.HOME"),
        "{stderr}"
    );
    assert!(
        stderr.contains("bad.dstack.yml:5:5: commands[2]: unclosed reference"),
        "{stderr}"
    );
}

/// Applies a small task whose fields are `fields` and waits for it: its exit code and what
/// `dstack apply` printed (the job's output included).
fn run_task(env: &Env, fields: &str, commands: &str) -> (Option<i32>, String) {
    let yaml = format!(
        "type: task\n{fields}commands: [{commands}]\nresources: {{cpu: 1.., memory: 0.1GB..}}\n"
    );
    let file = env.write("task.dstack.yml", &yaml);
    let out = env.run(&["apply", "-f", &file, "-y"]);
    let printed = format!("{}\n{}", text(&out.stdout), text(&out.stderr));
    (out.status.code(), printed)
}

/// `python: "X.Y"` runs the host's interpreter of that version as `python`, or fails the job
/// saying that the host has none; never another version.
#[test]
fn python_runs_the_version_asked_for_or_fails_saying_so() {
    let env = Env::new();
    let host = Command::new("python3")
        .args(["-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
        .output()
        .unwrap();
    let have = text(&host.stdout).trim().to_string();
    let python = |version: &str| format!("python: \"{version}\"\n");
    let (code, printed) = run_task(&env, &python(&have), "python --version");
    assert_eq!(code, Some(0), "{printed}");
    assert!(printed.contains(&format!("Python {have}.")), "{printed}");
    let (code, printed) = run_task(&env, &python("3.15"), "python --version");
    assert_eq!(code, Some(1), "{printed}");
    assert!(
        printed.contains(
            "python 3.15 was asked for (`python: '3.15'`), and this host has no python3.15 on PATH"
        ),
        "{printed}"
    );
}

/// `user:` of a job run as a host process: it runs when the host's user is the one asked for,
/// and fails at once saying who it would run as otherwise.
#[test]
fn a_host_job_runs_as_its_user_or_fails_saying_who_it_would_run_as() {
    let env = Env::new();
    let me = text(&Command::new("id").arg("-un").output().unwrap().stdout)
        .trim()
        .to_string();
    let (code, printed) = run_task(&env, &format!("user: {me}\n"), "id -un");
    assert_eq!(code, Some(0), "{printed}");
    assert!(printed.contains(&format!("\n{me}\n")), "{printed}");
    let (code, printed) = run_task(&env, "user: no-such-user\n", "id -un");
    assert_eq!(code, Some(1), "{printed}");
    assert!(
        printed.contains(&format!(
            "the job asks for user no-such-user (`user:`), and jobs run as host processes on \
             this host run as {me}:"
        )),
        "{printed}"
    );
}

/// `dstack apply ARGS` without a terminal: the plan is printed, then nothing is submitted.
fn plan_of(env: &Env, args: &[&str]) -> String {
    let mut all = vec!["apply"];
    all.extend_from_slice(args);
    let out = env.run(&all);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("No terminal to answer on"),
        "{}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// The value of a row of the plan's summary.
fn summary<'a>(plan: &'a str, key: &str) -> &'a str {
    plan.lines()
        .find_map(|l| l.trim_start().strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {plan}"))
        .trim()
}

#[test]
fn override_flags_change_the_plan_as_dstacks_do() {
    let env = Env::new();
    let file = env.write(
        "flags.dstack.yml",
        "type: task\ncommands: [echo hi]\nresources: {cpu: 1.., memory: 0.1GB..}\n",
    );
    let base = plan_of(&env, &["-f", &file]);
    assert!(base.contains("local"), "the local offer: {base}");
    assert_eq!(summary(&base, "Spot policy"), "on-demand");

    let local = plan_of(
        &env,
        &["-f", &file, "--gpu", "0", "--cpu", "1..", "-b", "local"],
    );
    assert!(local.contains("local"), "{local}");
    assert!(!local.contains("No offers"), "{local}");
    let elsewhere = plan_of(&env, &["-f", &file, "-b", "aws"]);
    assert!(elsewhere.contains("No offers"), "{elsewhere}");
    let huge = plan_of(&env, &["-f", &file, "--cpu", "1000.."]);
    assert!(huge.contains("No offers"), "{huge}");
    assert!(summary(&huge, "Resources").contains("cpu=1000.."), "{huge}");
    let memory = plan_of(&env, &["-f", &file, "--memory", "100000GB.."]);
    assert!(memory.contains("No offers"), "{memory}");
    let disk = plan_of(&env, &["-f", &file, "--disk", "1000000GB.."]);
    assert!(
        summary(&disk, "Resources").contains("disk=1000000GB.."),
        "{disk}"
    );

    let profile = plan_of(
        &env,
        &["-f", &file, "--spot-auto", "--max-price", "0.5", "--retry"],
    );
    assert_eq!(summary(&profile, "Spot policy"), "auto");
    assert_eq!(summary(&profile, "Max price"), "$0.5");
    assert_eq!(summary(&profile, "Retry policy"), "yes");
    let spot = plan_of(&env, &["-f", &file, "--spot"]);
    assert_eq!(summary(&spot, "Spot policy"), "spot");
    let policy = plan_of(&env, &["-f", &file, "--spot-policy", "on-demand"]);
    assert_eq!(summary(&policy, "Spot policy"), "on-demand");
    let region = plan_of(&env, &["-f", &file, "-r", "nowhere-1"]);
    assert!(region.contains("No offers"), "{region}");
    let kind = plan_of(&env, &["-f", &file, "--instance-type", "p5.48xlarge"]);
    assert!(kind.contains("No offers"), "{kind}");

    // `dstack offer` takes the same flags.
    let offers = |args: &[&str]| {
        let mut all = vec!["offer", "--format", "json"];
        all.extend_from_slice(args);
        let out = env.run(&all);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        plan["offers"].as_array().unwrap().len()
    };
    assert!(offers(&["--gpu", "0", "--cpu", "1..", "-b", "local"]) > 0);
    assert_eq!(offers(&["-b", "aws"]), 0);
    assert_eq!(offers(&["--cpu", "1000.."]), 0);
    let out = env.run(&["offer", "--max-offers", "0", "--format", "json"]);
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["offers"].as_array().unwrap().len(), 0, "{plan}");
    assert_eq!(plan["total_offers"], 1, "{plan}");
    let capped = plan_of(&env, &["-f", &file, "--max-offers", "0"]);
    assert!(capped.contains("Shown 0 of 1 offers"), "{capped}");
    let out = env.run(&["offer", "-b", "aws"]);
    assert!(
        text(&out.stdout).contains("No offers"),
        "{}",
        text(&out.stdout)
    );

    // Exclusive choices and bad values are refused as dstack refuses them.
    let out = env.run(&["apply", "-f", &file, "--spot", "--on-demand"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = env.run(&["apply", "-f", &file, "--retry", "--no-retry"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = env.run(&["apply", "-f", &file, "-R", "--dont-destroy"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = env.run(&["apply", "-f", &file, "--cpu", "lots", "-y"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("resources.cpu"),
        "{}",
        text(&out.stderr)
    );
    let fleet = env.write("f.dstack.yml", "type: fleet\nname: f\nnodes: 1\n");
    let out = env.run(&["apply", "-f", &fleet, "--spot", "-y"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("apply to runs only, not to a fleet"),
        "{}",
        text(&out.stderr)
    );
}

/// The submitted run's configuration as `ps --json` shows it.
fn configuration_of(env: &Env, name: &str) -> serde_json::Value {
    let out = env.run(&["ps", "-a", "--json"]);
    let runs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    runs.as_array()
        .unwrap()
        .iter()
        .find(|r| r["run"]["name"] == name)
        .unwrap_or_else(|| panic!("no run {name}: {runs}"))["run"]["spec"]["configuration"]
        .clone()
}

#[test]
fn profile_flags_reach_the_run_and_are_honoured() {
    let env = Env::new();
    let file = env.write(
        "long.dstack.yml",
        "type: task\nname: long\ncommands: [sleep 1000]\nresources: {cpu: 1.., memory: 0.1GB..}\n",
    );
    // --max-duration stops the job when it is up.
    let out = env.run(&[
        "apply",
        "-f",
        &file,
        "-y",
        "--max-duration",
        "1s",
        "--idle-duration",
        "5m",
        "--retry-duration",
        "10m",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("max_duration"), "{stderr}");
    let configuration = configuration_of(&env, "long");
    assert_eq!(configuration["max_duration"], 1);
    assert_eq!(configuration["idle_duration"], 300);
    assert_eq!(configuration["retry"]["duration"], 600);

    // --fleet: only that fleet's instances are considered (there is none of that name).
    let out = env.run(&[
        "apply",
        "-f",
        &file,
        "-y",
        "--fleet",
        "nosuch",
        "--no-retry",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("nosuch"),
        "{}",
        text(&out.stderr)
    );
    let configuration = configuration_of(&env, "long");
    assert_eq!(configuration["fleets"][0]["name"], "nosuch");
    assert_eq!(configuration["retry"], false);
}

#[test]
fn force_resubmits_an_active_run_and_reuse_takes_an_existing_instance() {
    let env = Env::new();
    let file = env.write(
        "again.dstack.yml",
        "type: task\nname: again\ncommands: [sleep 1000]\nresources: {cpu: 1.., memory: 0.1GB..}\n",
    );
    let run_id = |env: &Env| {
        let out = env.run(&["ps", "--json"]);
        let runs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        runs[0]["run"]["id"].as_str().unwrap().to_string()
    };
    let out = env.run(&["apply", "-f", &file, "-y", "-d"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let first = run_id(&env);

    // Unchanged and -y without --force: nothing happens.
    let out = env.run(&["apply", "-f", &file, "-y", "-d"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("Detected no changes"), "{stdout}");
    assert!(stdout.contains("Use --force to apply anyway."), "{stdout}");
    assert_eq!(run_id(&env), first);

    // --force stops it and submits it again under its name.
    let out = env.run(&["apply", "-f", &file, "-y", "-d", "--force"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("Stopped run again (terminated)"),
        "{}",
        text(&out.stdout)
    );
    let second = run_id(&env);
    assert_ne!(second, first);

    // A changed configuration overrides it with -y alone.
    let out = env.run(&["apply", "-f", &file, "-y", "-d", "-e", "X=1"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("with another configuration"),
        "{}",
        text(&out.stdout)
    );
    assert_ne!(run_id(&env), second);
    let out = env.run(&["stop", "-y", "-x", "again"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    // -R runs on an instance that exists: the one the runs above used.
    let instance = |name: &str| {
        let out = env.run(&["logs", name, "-d"]);
        text(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("  instance: "))
            .unwrap_or_default()
            .to_string()
    };
    let used = instance("again");
    let quick = env.write(
        "quick.dstack.yml",
        "type: task\nname: quick\ncommands: [echo reused]\nresources: {cpu: 1.., memory: 0.1GB..}\n",
    );
    let out = env.run(&["apply", "-f", &quick, "-y", "-R"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("reused"));
    assert_eq!(instance("quick"), used);
    assert_eq!(configuration_of(&env, "quick")["creation_policy"], "reuse");
}

/// `profiles.yml` (here `.dstack/profiles.yml` of the directory applied from): the default
/// profile, `--profile NAME`, `--no-profile`; the configuration's own values and the flags win.
#[test]
fn profiles_fill_what_the_configuration_leaves_unset() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join(".dstack")).unwrap();
    std::fs::write(
        dir.path().join(".dstack/profiles.yml"),
        "profiles:\n  - name: cheap\n    max_price: 0.5\n  - name: usual\n    default: true\n    spot_policy: auto\n",
    )
    .unwrap();
    let task = env.write(
        "p.dstack.yml",
        "type: task\ncommands: [echo]\nresources: {cpu: 1.., memory: 0.1GB..}\n",
    );
    let plan = |flags: &[&str]| {
        let out = env
            .cmd(&[&["apply", "-f", task.as_str()][..], flags].concat())
            .current_dir(dir.path())
            .output()
            .unwrap();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    let row = |shown: &str, key: &str| {
        shown
            .lines()
            .find(|l| l.trim_start().starts_with(key))
            .map(|l| l.trim_start()[key.len()..].trim().to_string())
            .unwrap_or_default()
    };
    let (_, shown, _) = plan(&[]);
    assert_eq!(row(&shown, "Spot policy"), "auto", "{shown}");
    let (_, shown, _) = plan(&["--profile", "cheap"]);
    assert_eq!(row(&shown, "Max price"), "$0.5", "{shown}");
    assert_eq!(row(&shown, "Spot policy"), "on-demand", "{shown}");
    let (_, shown, _) = plan(&["--profile", "cheap", "--max-price", "2"]);
    assert_eq!(row(&shown, "Max price"), "$2", "{shown}");
    let (_, shown, _) = plan(&["--no-profile"]);
    assert_eq!(row(&shown, "Spot policy"), "on-demand", "{shown}");
    let (code, _, err) = plan(&["--profile", "nope"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no profile nope in"), "{err}");
}
