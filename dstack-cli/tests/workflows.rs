//! `dstack run` with the workflows of dstack's earlier documents (`examples/workflows`): a
//! workflow's script runs in the project directory with the arguments given, a variable from
//! the command line changes the run's configuration, a provider runs directly, and what is not
//! supported is refused before anything is submitted.

mod common;

use common::{project, run_in, text, Env};

#[test]
fn workflows_run_their_scripts_with_the_arguments_and_variables_given() {
    let env = Env::new();
    let dir = project(&env);
    // `prepare` writes data/ where it runs: the project directory.
    let (code, out, err) = run_in(&env, &dir, &["run", "-y", "-n", "prep", "prepare"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(dir.join("data/numbers.csv").exists(), "{out}");
    // `train` depends on `prepare:latest`.
    let (code, out, err) = run_in(&env, &dir, &["tags", "add", "latest", "prep"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let (code, out, err) = run_in(
        &env,
        &dir,
        &["run", "-y", "train", "--epoch", "2", "--seed", "2"],
    );
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("training: epoch=2 seed=2 batch_size=32"),
        "{out}"
    );
    // `--pgpu 1` (a variable of `prepare`) asks for a GPU, which this machine lacks.
    let (code, out, err) = run_in(&env, &dir, &["run", "-y", "-d", "prepare", "--pgpu", "1"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("gpu=1"), "{out}");
    assert!(
        out.contains("requires 1 GPU(s), the host has none"),
        "{out}"
    );
    // The runs are ordinary runs.
    let ps = text(&env.run(&["ps", "-a"]).stdout);
    assert!(ps.lines().count() >= 3, "{ps}");
}

#[test]
fn providers_run_directly_and_what_is_not_supported_is_refused() {
    let env = Env::new();
    let dir = project(&env);
    std::fs::write(
        dir.join("argv.py"),
        "import sys\nprint('argv', sys.argv[1:])\n",
    )
    .unwrap();
    let (code, out, err) = run_in(
        &env,
        &dir,
        &["run", "-y", "python", "argv.py", "a", "b c", "$HOME"],
    );
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("argv ['a', 'b c', '$HOME']"), "{out}");
    for (args, expected) in [
        (
            &["run", "-y", "python", "argv.py", "--dep", "prepare"][..],
            "--dep prepare: a workflow without a tag (a pipeline) is not supported yet",
        ),
        (
            &["run", "-y", "python", "argv.py", "--dep", "prepare:latest"][..],
            "--dep prepare:latest: there is no tag prepare:latest",
        ),
        (
            &["run", "-y", "perl", "x.pl"][..],
            "`perl` is neither a workflow nor a provider",
        ),
    ] {
        let (code, out, err) = run_in(&env, &dir, args);
        assert_eq!(code, Some(1), "{args:?}: {out}\n{err}");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    // A workflow depending on another without a tag (a pipeline) is refused at its line.
    let text = "workflows:\n  - name: keep\n    provider: bash\n    commands: [echo never]\n    depends-on: [prepare]\n";
    std::fs::write(dir.join(".dstack/workflows.yaml"), text).unwrap();
    let (code, _, err) = run_in(&env, &dir, &["run", "-y", "keep"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(
            ".dstack/workflows.yaml:5:18: workflows[0].depends-on[0]: `prepare` names a workflow without a tag"
        ),
        "{err}"
    );
    let (code, _, err) = run_in(&env, &dir, &["validate", ".dstack/workflows.yaml"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(!text_contains_never(&env), "nothing was submitted");
}

/// Whether any run printed or ran `never`.
fn text_contains_never(env: &Env) -> bool {
    text(&env.run(&["ps", "-a"]).stdout).contains("keep")
}
