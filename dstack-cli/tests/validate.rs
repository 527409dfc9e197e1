//! `dstack validate`: exit codes, JSON output, located errors on stderr, standard input.

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn dstack(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dstack"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn valid_file_prints_normalized_json() {
    let out = dstack(
        &["validate", "--json", "-"],
        "type: task\ncommands: [echo hi]\nresources: {gpu: 24GB..}\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["type"], "task");
    assert_eq!(json["resources"]["gpu"]["memory"]["min"], 24.0);
    assert_eq!(json["resources"]["gpu"]["count"]["min"], 1);
    assert_eq!(json["resources"]["cpu"]["count"]["min"], 2);
}

#[test]
fn invalid_files_exit_1_with_every_error_located() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let good = write(&dir, "good.dstack.yml", "type: fleet\nnodes: 0..2\n");
    let bad = write(
        &dir,
        "bad.dstack.yml",
        "type: task\ncommands: [x]\nnodes: 0\ncpu: 2\n",
    );
    let out = dstack(&["validate", &good, &bad], "");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("{good}: valid fleet")), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{bad}:3:8: nodes: must be at least 1, got 0 [out_of_range]"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{bad}:4:1: cpu: unknown field `cpu`")),
        "{stderr}"
    );
}

#[test]
fn unreadable_and_binary_input_fail_cleanly() {
    let out = dstack(&["validate", "/nonexistent/x.dstack.yml"], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .starts_with("/nonexistent/x.dstack.yml:1:1: (file): cannot read"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bin.yml");
    std::fs::write(&path, [0xff, 0xfe, 0x00, 0x01]).unwrap();
    let out = dstack(&["validate", path.to_str().unwrap()], "");
    assert_eq!(out.status.code(), Some(1));
}
