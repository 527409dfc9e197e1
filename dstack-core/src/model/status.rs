//! Status enums and termination reasons, with dstack's reason→status and reason→retry-event
//! maps and the run termination table.

use serde::{Deserialize, Serialize};

use crate::config::profile::RetryEvent;

macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// Every value, in the order of declaration.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The name as dstack writes it.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// Parses dstack's spelling.
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($text => Some($name::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

text_enum! {
    /// The status of a run.
    RunStatus {
        /// Waiting to be (re)submitted: retry backoff or schedule.
        Pending = "pending",
        /// Jobs are waiting for capacity.
        Submitted = "submitted",
        /// Jobs are being started.
        Provisioning = "provisioning",
        /// At least one job runs.
        Running = "running",
        /// Being stopped.
        Terminating = "terminating",
        /// Stopped or aborted.
        Terminated = "terminated",
        /// Failed.
        Failed = "failed",
        /// Finished successfully.
        Done = "done",
    }
}

impl RunStatus {
    /// Whether the run has finished.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            RunStatus::Terminated | RunStatus::Failed | RunStatus::Done
        )
    }
}

text_enum! {
    /// The status of a job submission.
    JobStatus {
        /// Waiting for capacity.
        Submitted = "submitted",
        /// Assigned to an instance; being started.
        Provisioning = "provisioning",
        /// Pulling an image.
        Pulling = "pulling",
        /// Running.
        Running = "running",
        /// Being stopped.
        Terminating = "terminating",
        /// Stopped.
        Terminated = "terminated",
        /// Aborted.
        Aborted = "aborted",
        /// Failed.
        Failed = "failed",
        /// Finished successfully.
        Done = "done",
    }
}

impl JobStatus {
    /// The statuses in which a job holds resources on its instance.
    pub const HOLDING: &'static [JobStatus] = &[
        JobStatus::Provisioning,
        JobStatus::Pulling,
        JobStatus::Running,
        JobStatus::Terminating,
    ];

    /// Whether the job has finished.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobStatus::Terminated | JobStatus::Aborted | JobStatus::Failed | JobStatus::Done
        )
    }
}

text_enum! {
    /// Why a job ended.
    JobTerminationReason {
        /// No offer could be provisioned.
        FailedToStartDueToNoCapacity = "failed_to_start_due_to_no_capacity",
        /// A spot instance was reclaimed.
        InterruptedByNoCapacity = "interrupted_by_no_capacity",
        /// The instance stopped answering.
        InstanceUnreachable = "instance_unreachable",
        /// Access to the instance was revoked.
        InstanceAccessRevoked = "instance_access_revoked",
        /// The instance did not come up in time.
        WaitingInstanceLimitExceeded = "waiting_instance_limit_exceeded",
        /// The agent did not come up in time.
        WaitingRunnerLimitExceeded = "waiting_runner_limit_exceeded",
        /// Stopped by the user.
        TerminatedByUser = "terminated_by_user",
        /// A volume could not be attached.
        VolumeError = "volume_error",
        /// The gateway failed.
        GatewayError = "gateway_error",
        /// A service replica was scaled down.
        ScaledDown = "scaled_down",
        /// The job's commands finished with exit status 0.
        DoneByRunner = "done_by_runner",
        /// Aborted by the user.
        AbortedByUser = "aborted_by_user",
        /// Stopped by the engine (another job failed, the run finished, …).
        TerminatedByServer = "terminated_by_server",
        /// A dev environment was inactive too long.
        InactivityDurationExceeded = "inactivity_duration_exceeded",
        /// GPUs were under-used too long.
        TerminatedDueToUtilizationPolicy = "terminated_due_to_utilization_policy",
        /// The job's commands exited with a non-zero status.
        ContainerExitedWithError = "container_exited_with_error",
        /// Ports could not be bound.
        PortsBindingFailed = "ports_binding_failed",
        /// The container could not be created.
        CreatingContainerError = "creating_container_error",
        /// The agent could not run the job.
        ExecutorError = "executor_error",
        /// The job ran longer than `max_duration`.
        MaxDurationExceeded = "max_duration_exceeded",
        /// The job wrote more output than its quota.
        LogQuotaExceeded = "log_quota_exceeded",
    }
}

impl JobTerminationReason {
    /// The final job status for this reason.
    pub fn job_status(self) -> JobStatus {
        use JobTerminationReason::*;
        match self {
            TerminatedByUser
            | ScaledDown
            | TerminatedByServer
            | InactivityDurationExceeded
            | TerminatedDueToUtilizationPolicy
            | MaxDurationExceeded => JobStatus::Terminated,
            DoneByRunner => JobStatus::Done,
            AbortedByUser => JobStatus::Aborted,
            FailedToStartDueToNoCapacity
            | InterruptedByNoCapacity
            | InstanceUnreachable
            | InstanceAccessRevoked
            | WaitingInstanceLimitExceeded
            | WaitingRunnerLimitExceeded
            | VolumeError
            | GatewayError
            | ContainerExitedWithError
            | PortsBindingFailed
            | CreatingContainerError
            | ExecutorError
            | LogQuotaExceeded => JobStatus::Failed,
        }
    }

    /// The retry event this reason counts as, if it is retryable.
    pub fn retry_event(self) -> Option<RetryEvent> {
        match self {
            JobTerminationReason::FailedToStartDueToNoCapacity => Some(RetryEvent::NoCapacity),
            JobTerminationReason::InterruptedByNoCapacity => Some(RetryEvent::Interruption),
            r if r.job_status() == JobStatus::Failed => Some(RetryEvent::Error),
            _ => None,
        }
    }
}

text_enum! {
    /// Why a run ended.
    RunTerminationReason {
        /// Every job finished successfully.
        AllJobsDone = "all_jobs_done",
        /// A job failed and is not retried.
        JobFailed = "job_failed",
        /// A job kept failing past `retry.duration`.
        RetryLimitExceeded = "retry_limit_exceeded",
        /// Stopped by the user.
        StoppedByUser = "stopped_by_user",
        /// Aborted by the user.
        AbortedByUser = "aborted_by_user",
        /// An internal error.
        ServerError = "server_error",
        /// The gateway failed.
        GatewayError = "gateway_error",
    }
}

impl RunTerminationReason {
    /// The final run status.
    pub fn run_status(self) -> RunStatus {
        match self {
            RunTerminationReason::AllJobsDone => RunStatus::Done,
            RunTerminationReason::StoppedByUser | RunTerminationReason::AbortedByUser => {
                RunStatus::Terminated
            }
            _ => RunStatus::Failed,
        }
    }

    /// The reason given to jobs that are still active when the run terminates.
    pub fn job_reason(self) -> JobTerminationReason {
        match self {
            RunTerminationReason::AllJobsDone => JobTerminationReason::DoneByRunner,
            RunTerminationReason::StoppedByUser => JobTerminationReason::TerminatedByUser,
            RunTerminationReason::AbortedByUser => JobTerminationReason::AbortedByUser,
            _ => JobTerminationReason::TerminatedByServer,
        }
    }

    /// The run's error text, if the reason is an error.
    pub fn error(self) -> Option<&'static str> {
        match self {
            RunTerminationReason::RetryLimitExceeded => Some("retry limit exceeded"),
            RunTerminationReason::ServerError => Some("server error"),
            RunTerminationReason::GatewayError => Some("gateway error"),
            _ => None,
        }
    }
}

text_enum! {
    /// The status of an instance.
    InstanceStatus {
        /// Created, not provisioned.
        Pending = "pending",
        /// Being provisioned.
        Provisioning = "provisioning",
        /// Ready, no jobs.
        Idle = "idle",
        /// Running jobs.
        Busy = "busy",
        /// Being terminated.
        Terminating = "terminating",
        /// Gone.
        Terminated = "terminated",
    }
}

text_enum! {
    /// The status of a fleet.
    FleetStatus {
        /// Being created.
        Submitted = "submitted",
        /// Usable.
        Active = "active",
        /// Being deleted.
        Terminating = "terminating",
        /// Deleted.
        Terminated = "terminated",
        /// Could not be created.
        Failed = "failed",
    }
}

text_enum! {
    /// The status of a network volume.
    VolumeStatus {
        /// Recorded; being created or registered.
        Submitted = "submitted",
        /// Usable.
        Active = "active",
        /// Could not be created or registered.
        Failed = "failed",
        /// Deleted (or, for a registered volume, forgotten).
        Deleted = "deleted",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_maps_follow_dstack() {
        use JobTerminationReason as R;
        assert_eq!(
            R::FailedToStartDueToNoCapacity.retry_event(),
            Some(RetryEvent::NoCapacity)
        );
        assert_eq!(
            R::InterruptedByNoCapacity.retry_event(),
            Some(RetryEvent::Interruption)
        );
        assert_eq!(
            R::ContainerExitedWithError.retry_event(),
            Some(RetryEvent::Error)
        );
        assert_eq!(
            R::InstanceUnreachable.retry_event(),
            Some(RetryEvent::Error)
        );
        assert_eq!(R::MaxDurationExceeded.retry_event(), None);
        assert_eq!(R::TerminatedByUser.retry_event(), None);
        assert_eq!(R::DoneByRunner.job_status(), JobStatus::Done);
        assert_eq!(R::AbortedByUser.job_status(), JobStatus::Aborted);
        assert_eq!(R::MaxDurationExceeded.job_status(), JobStatus::Terminated);
        assert_eq!(R::ExecutorError.job_status(), JobStatus::Failed);
        assert_eq!(
            RunTerminationReason::AbortedByUser.run_status(),
            RunStatus::Terminated
        );
        assert_eq!(
            RunTerminationReason::JobFailed.job_reason(),
            R::TerminatedByServer
        );
        assert_eq!(
            RunTerminationReason::RetryLimitExceeded.error(),
            Some("retry limit exceeded")
        );
        assert_eq!(
            JobTerminationReason::parse("done_by_runner"),
            Some(R::DoneByRunner)
        );
        assert_eq!(RunStatus::parse("done"), Some(RunStatus::Done));
    }
}
