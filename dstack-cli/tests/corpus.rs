//! Parity with dstack 0.22.5's own parser over the shared corpus (`../shared/corpus`, or
//! `$DSTACK_CORPUS_DIR`): every valid configuration normalizes to dstack's JSON and every
//! rejected one fails with a located error, as measured by the corpus's `check.py`.

use std::path::PathBuf;
use std::process::Command;

fn corpus_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("DSTACK_CORPUS_DIR") {
        return PathBuf::from(dir);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus")
}

#[test]
fn corpus_parity_with_dstack() {
    let dir = corpus_dir();
    let check = dir.join("check.py");
    assert!(
        check.is_file(),
        "the configuration corpus is missing: expected {} (set DSTACK_CORPUS_DIR)",
        check.display()
    );
    let exe = env!("CARGO_BIN_EXE_dstack");
    let out = Command::new("python3")
        .arg(&check)
        .arg("--cmd")
        .arg(format!("{exe} validate --json"))
        .arg(&dir)
        .output()
        .expect("python3 runs check.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout.lines().last().unwrap_or_default();
    println!("{summary}");
    assert!(
        out.status.success(),
        "corpus parity failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        summary.starts_with("parity ") && summary.ends_with("crashes 0"),
        "{summary}"
    );
}
