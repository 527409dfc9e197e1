//! `python: "3.11"` for jobs run as host processes: the job's `python` and `python3` are an
//! interpreter of that version found on the host's `PATH` (`python3.11`, or `python3` /
//! `python` when they are that version); when the host has none, the job fails at once with a
//! message saying so — never another version. (dstack picks its base image of that version;
//! here there is no base image, so the host's interpreters are what there is.)

/// The shell words that run before a job's commands and put an interpreter of `version`
/// (`3.11`) first on `PATH` as `python` and `python3`, or fail the job (exit 1) naming what
/// was asked for and what the host has. Each candidate is asked for its version and its real
/// executable (a pyenv shim answers only for the versions it may run).
pub fn prologue(version: &str) -> String {
    let (major, minor) = version.split_once('.').unwrap_or((version, "0"));
    let check = format!(
        "import sys; print(sys.executable) if sys.version_info[:2] == ({major}, {minor}) \
         else sys.exit(1)"
    );
    format!(
        "{{ __dstack_py=; for __c in python{version} python3 python; do \
         __dstack_py=$(\"$__c\" -c '{check}' 2>/dev/null) && break; __dstack_py=; done; \
         if [ -z \"$__dstack_py\" ]; then \
         echo \"python {version} was asked for (\\`python: '{version}'\\`), and this host has no \
         python{version} on PATH (python3 is $(python3 --version 2>&1 || echo missing))\" >&2; \
         exit 1; fi; \
         __dstack_dir=$(mktemp -d) && ln -s \"$__dstack_py\" \"$__dstack_dir/python\" && \
         ln -s \"$__dstack_py\" \"$__dstack_dir/python3\" && \
         ln -s \"$__dstack_py\" \"$__dstack_dir/python{version}\" && \
         export PATH=\"$__dstack_dir:$PATH\"; }}"
    )
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::process::Command;

    /// Runs `script` with `/bin/sh`: its exit code, standard output and standard error.
    pub(in crate::engine) fn run(script: &str) -> (i32, String, String) {
        let out = Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The interpreter of the version asked for becomes `python` (whatever the host's default
    /// `python3` is); a version the host lacks fails with a message naming it.
    #[test]
    fn the_asked_python_version_is_found_or_the_job_fails_saying_so() {
        // The host's own python3 is some version: ask for exactly that one.
        let (code, have, _) =
            run("python3 -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'");
        assert_eq!(code, 0, "python3 is needed on the test host");
        let have = have.trim();
        let script = format!(
            "{} && python -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])' && \
             python3 --version",
            prologue(have)
        );
        let (code, out, err) = run(&script);
        assert_eq!(code, 0, "{err}");
        assert!(out.starts_with(&format!("{have}\nPython {have}.")), "{out}");
        // A version no host here has (the schema allows it).
        let (code, out, err) = run(&format!("{} && echo ran", prologue("3.15")));
        assert_eq!(code, 1);
        assert!(!out.contains("ran"), "{out}");
        assert!(
            err.contains("python 3.15 was asked for (`python: '3.15'`), and this host has no python3.15 on PATH"),
            "{err}"
        );
    }
}
