//! `user: name[:group]` for jobs run as host processes: a host process runs as the host's
//! login user (the agent's), so the job runs when that is the user (and group) asked for, by
//! name or number, and fails at once saying who it would run as otherwise.

/// Shell words, run before a job's commands, that fail the job (exit 1) unless it runs as
/// `user` (`name`, `uid`, `name:group`, `uid:gid`).
pub fn check(user: &str) -> String {
    let (name, group) = match user.split_once(':') {
        Some((name, group)) => (name, Some(group)),
        None => (user, None),
    };
    let quoted = |s: &str| format!("'{}'", s.replace('\'', "'\"'\"'"));
    let mut test = format!(
        "{{ [ \"$(id -un)\" = {n} ] || [ \"$(id -u)\" = {n} ]; }}",
        n = quoted(name)
    );
    if let Some(group) = group {
        test.push_str(&format!(
            " && {{ [ \"$(id -gn)\" = {g} ] || [ \"$(id -g)\" = {g} ]; }}",
            g = quoted(group)
        ));
    }
    format!(
        "{{ {test} || {{ printf 'the job asks for user %s (`user:`), and jobs run as host \
         processes on this host run as %s:%s; use that user, or an `image`\\n' {u} \
         \"$(id -un)\" \"$(id -gn)\" >&2; exit 1; }}; }}",
        u = quoted(user)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Runs `script` with `/bin/sh`: its exit code and its output, both streams.
    fn run(script: &str) -> (i32, String) {
        let (code, out, err) = crate::engine::python::tests::run(script);
        (code, out + &err)
    }

    fn id(flag: &str) -> String {
        let out = Command::new("id").arg(flag).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    #[test]
    fn a_host_job_runs_as_the_user_asked_for_or_fails_saying_who_it_would_run_as() {
        let (me, uid, group, gid) = (id("-un"), id("-u"), id("-gn"), id("-g"));
        for user in [
            me.clone(),
            uid.clone(),
            format!("{me}:{group}"),
            format!("{uid}:{gid}"),
        ] {
            let (code, out) = run(&format!("{} && echo ran", check(&user)));
            assert_eq!((code, out.as_str()), (0, "ran\n"), "{user}");
        }
        for user in ["no-such-user", &format!("{me}:no-such-group"), "it's"] {
            let (code, out) = run(&format!("{} && echo ran", check(user)));
            assert_eq!(code, 1, "{user}: {out}");
            assert!(
                out.contains(&format!(
                    "the job asks for user {user} (`user:`), and jobs run as host processes on \
                     this host run as {me}:{group}; use that user, or an `image`\n"
                )),
                "{out}"
            );
            assert!(!out.contains("ran"), "{out}");
        }
    }
}
