//! Process groups of jobs: signalling them, recognising them across agent restarts, and
//! describing how a process ended.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// The process group a job runs in (its leader's pid is the group id), plus what tells it
/// apart from an unrelated group that later reuses the id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct ProcessGroup {
    /// The process group id (= the leader's pid).
    pub pgid: i32,
    /// `/proc/sys/kernel/random/boot_id` when the job started.
    boot_id: Option<String>,
    /// The leader's start time in clock ticks since boot (`/proc/<pid>/stat`, field 22), as
    /// read from the boot clock when it was spawned (within [`START_TOLERANCE`]).
    leader_start: Option<u64>,
}

/// How many clock ticks the start time taken at spawn may differ from the kernel's: the
/// process starts just before the spawn returns (a tick is 10 ms at the usual 100 Hz; a
/// process id is not reused within that time).
const START_TOLERANCE: u64 = 2;

impl ProcessGroup {
    /// The group led by the just-spawned process `pid` (its start time is now: no need to
    /// read it from `/proc`).
    pub fn led_by(pid: u32) -> Self {
        ProcessGroup {
            pgid: pid as i32,
            boot_id: boot_id(),
            leader_start: ticks_since_boot(),
        }
    }

    /// Sends `signal` to every process of the group; a group that is already gone is fine.
    pub fn signal(&self, signal: Signal) {
        match killpg(Pid::from_raw(self.pgid), signal) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => eprintln!(
                "dstack-agent: cannot send {signal} to group {}: {e}",
                self.pgid
            ),
        }
    }

    /// Kills what is left of the group of a job recorded by an earlier agent, unless the id
    /// now belongs to someone else (the host rebooted, or a new process leads the group).
    pub fn kill_leftovers(&self) {
        let rebooted =
            matches!((&self.boot_id, boot_id()), (Some(then), Some(now)) if *then != now);
        let replaced = matches!(
            (self.leader_start, start_time(self.pgid)),
            (Some(then), Some(now)) if then.abs_diff(now) > START_TOLERANCE
        );
        if !rebooted && !replaced {
            self.signal(Signal::SIGKILL);
        }
    }
}

/// This boot's id (read once: it does not change while the agent runs).
fn boot_id() -> Option<String> {
    static BOOT_ID: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    BOOT_ID
        .get_or_init(|| {
            let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
            Some(id.trim().to_string())
        })
        .clone()
}

/// Clock ticks since boot now, on the clock the kernel dates processes by.
fn ticks_since_boot() -> Option<u64> {
    static HZ: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let hz = (*HZ.get_or_init(|| {
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
        u64::try_from(hz).ok()
    }))?;
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).ok()?;
    let secs = u64::try_from(now.tv_sec()).ok()?;
    let nanos = u64::try_from(now.tv_nsec()).ok()?;
    Some(secs * hz + nanos * hz / 1_000_000_000)
}

/// The start time of process `pid` (clock ticks since boot), if it exists.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: count from the last ')'.
    let after_name = &stat[stat.rfind(')')? + 1..];
    // `after_name` starts with field 3 (state); the start time is field 22.
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// How a process ended: its exit status as the protocol reports it (negative: the signal that
/// killed it) and a human description.
pub(crate) fn describe_exit(status: ExitStatus) -> (i32, String) {
    match (status.code(), status.signal()) {
        (Some(code), _) => (code, format!("the process exited with status {code}")),
        (None, Some(sig)) => {
            let name = Signal::try_from(sig).map_or_else(|_| sig.to_string(), |s| s.to_string());
            (
                -sig,
                format!("the process was killed by signal {sig} ({name})"),
            )
        }
        (None, None) => (-1, format!("the process ended with {status}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_are_described() {
        assert_eq!(
            describe_exit(ExitStatus::from_raw(3 << 8)),
            (3, "the process exited with status 3".to_string())
        );
        assert_eq!(
            describe_exit(ExitStatus::from_raw(9)),
            (
                -9,
                "the process was killed by signal 9 (SIGKILL)".to_string()
            )
        );
    }

    #[test]
    fn leftovers_are_killed_only_if_their_leader_is_the_one_recorded() {
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .process_group(0)
            .spawn()
            .unwrap();
        let group = ProcessGroup::led_by(child.id());
        let kernel = start_time(group.pgid).unwrap();
        let spawned = group.leader_start.unwrap();
        assert!(
            spawned.abs_diff(kernel) <= START_TOLERANCE,
            "{spawned} vs {kernel}"
        );
        // A record of an earlier process that had the same id: the group is left alone.
        let earlier = ProcessGroup {
            leader_start: Some(spawned.saturating_sub(100)),
            ..group.clone()
        };
        earlier.kill_leftovers();
        assert!(child.try_wait().unwrap().is_none(), "killed a stranger");
        group.kill_leftovers();
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(Signal::SIGKILL as i32));
    }
}
