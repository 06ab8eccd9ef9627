//! The domain's closed vocabularies as enums: task kinds, the states of tasks, batches and
//! machines, power and logoff steps, seed 001's image states and pool operations, and every
//! error code the API and the agents use. Each keeps its wire text exactly (`as_str` is the
//! text in JSON and in the database), and a match over one has no catch-all, so adding a
//! variant makes the compiler point at every place that must decide what it means.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One enum whose variants are written as `Variant = "WIRE_TEXT"`: serde, `as_str`, `parse`
/// (the inverse of `as_str`), `ALL` and `Display` all come from that one list, so the text
/// cannot differ between the JSON, the database and the messages.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $var:ident = $text:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum $name {
            $( $(#[$vmeta])* #[serde(rename = $text)] $var ),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$var),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$var => $text ),+
                }
            }

            /// The variant whose wire text is `text`.
            pub fn parse(text: &str) -> Option<$name> {
                match text {
                    $( $text => Some($name::$var), )+
                    _ => None,
                }
            }

            /// Every wire text, for messages that list the accepted values.
            pub fn texts() -> String {
                Self::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", ")
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        /// In the OpenAPI document: a string, one of the wire texts (from the same list).
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::RefOr::T(utoipa::openapi::schema::Schema::Object(
                    utoipa::openapi::schema::ObjectBuilder::new()
                        .schema_type(utoipa::openapi::schema::Type::String)
                        .enum_values(Some(Self::ALL.iter().map(|v| v.as_str())))
                        .build(),
                ))
            }
        }

        impl utoipa::ToSchema for $name {}
    };
}

wire_enum! {
    /// What a task does (`kind` in `GET /v1/tasks/{id}` and in the store).
    pub enum TaskKind {
        ScriptExecution = "script_execution",
        SoftwareStage = "software_stage",
        /// Stage a pushed image on the pool's machines (pending image).
        ImageStage = "image_stage",
        /// Switch the pool's machines to the staged image.
        ImageApply = "image_apply",
        /// Drop a pending image, or every image.
        ImageRemove = "image_remove",
        /// A rebuild (seed 003): an image apply that stages a fresh slot first.
        ImageRebuild = "image_rebuild",
    }
}

wire_enum! {
    /// A task's state.
    pub enum TaskState {
        Pending = "PENDING",
        Running = "RUNNING",
        Succeeded = "SUCCEEDED",
        Failed = "FAILED",
        /// The gray batch reached its failure threshold, or more machines failed than
        /// `max_errors`; the rest never ran (`POST /v1/tasks/{id}/resume` continues it).
        Halted = "HALTED",
        /// Cancelled, but machines are still ending their runs (not terminal).
        Cancelling = "CANCELLING",
        Cancelled = "CANCELLED",
    }
}

impl TaskState {
    /// Whether the task still moves on its own (a cancelled task may still have machines
    /// finishing, but nothing new is dispatched).
    pub fn is_active(self) -> bool {
        match self {
            TaskState::Pending | TaskState::Running => true,
            TaskState::Succeeded
            | TaskState::Failed
            | TaskState::Halted
            | TaskState::Cancelling
            | TaskState::Cancelled => false,
        }
    }

    /// Whether the task has ended for good (`finished_at` is set).
    pub fn is_terminal(self) -> bool {
        match self {
            TaskState::Pending | TaskState::Running | TaskState::Cancelling => false,
            TaskState::Succeeded | TaskState::Failed | TaskState::Halted | TaskState::Cancelled => {
                true
            }
        }
    }
}

wire_enum! {
    /// A machine's state within one task.
    pub enum MachineState {
        Pending = "PENDING",
        Dispatched = "DISPATCHED",
        Running = "RUNNING",
        Succeeded = "SUCCEEDED",
        Failed = "FAILED",
        TimedOut = "TIMED_OUT",
        Skipped = "SKIPPED",
        Cancelled = "CANCELLED",
    }
}

impl MachineState {
    pub fn is_final(self) -> bool {
        match self {
            MachineState::Pending | MachineState::Dispatched | MachineState::Running => false,
            MachineState::Succeeded
            | MachineState::Failed
            | MachineState::TimedOut
            | MachineState::Skipped
            | MachineState::Cancelled => true,
        }
    }

    /// What counts against `gray_fail_threshold` and makes a task `FAILED`.
    pub fn is_failure(self) -> bool {
        match self {
            MachineState::Failed | MachineState::TimedOut => true,
            MachineState::Pending
            | MachineState::Dispatched
            | MachineState::Running
            | MachineState::Succeeded
            | MachineState::Skipped
            | MachineState::Cancelled => false,
        }
    }
}

wire_enum! {
    /// A batch's state, derived from its machines' (`controller::rollout::batch_state`).
    pub enum BatchState {
        /// No machine has started.
        Pending = "PENDING",
        /// Some machine has not ended.
        Running = "RUNNING",
        Succeeded = "SUCCEEDED",
        /// Some machine failed or timed out.
        Failed = "FAILED",
        /// Every machine was skipped (a halt, or stop_on_first_error).
        Skipped = "SKIPPED",
        Cancelled = "CANCELLED",
    }
}

wire_enum! {
    /// How one machine's run ended, as the agent reports it.
    pub enum RunState {
        Succeeded = "SUCCEEDED",
        Failed = "FAILED",
        TimedOut = "TIMED_OUT",
        Cancelled = "CANCELLED",
    }
}

impl From<RunState> for MachineState {
    fn from(s: RunState) -> MachineState {
        match s {
            RunState::Succeeded => MachineState::Succeeded,
            RunState::Failed => MachineState::Failed,
            RunState::TimedOut => MachineState::TimedOut,
            RunState::Cancelled => MachineState::Cancelled,
        }
    }
}

wire_enum! {
    /// Seed 002's `pre_start`: a step before the scripts.
    pub enum PreStart {
        Reboot = "reboot",
        /// End the users' sessions under the logoff policy.
        Logoff = "logoff",
    }
}

wire_enum! {
    /// Seed 002's `post_finish`: a power step after the scripts.
    pub enum PostFinish {
        Reboot = "reboot",
        /// Shut down.
        Stop = "stop",
    }
}

wire_enum! {
    /// Seed 000's logoff policy.
    pub enum LogoffPolicy {
        /// Wait (up to the timeout) for the users to log off.
        WaitForLogoff = "WAIT_FOR_LOGOFF",
        /// Warn, wait the global grace, then end the sessions.
        ForceLogoff = "FORCE_LOGOFF",
    }
}

wire_enum! {
    /// A power step the agent announces or observed.
    pub enum PowerPhase {
        Rebooting = "REBOOTING",
        Rebooted = "REBOOTED",
        ShuttingDown = "SHUTTING_DOWN",
    }
}

wire_enum! {
    /// Seed 001's `pending_image_state`.
    pub enum PendingImageState {
        /// Scheduled, not started.
        PendingPublish = "PENDING_PUBLISH",
        Publishing = "PUBLISHING",
        Ready = "READY",
        Failed = "FAILED",
    }
}

wire_enum! {
    /// Seed 001's `current_image_state`.
    pub enum CurrentImageState {
        Ready = "READY",
        Failed = "FAILED",
        PendingUnpublish = "PENDING_UNPUBLISH",
        Unpublishing = "UNPUBLISHING",
    }
}

wire_enum! {
    /// Seed 001's `operation` (`INFRASTRUCTURE_CHANGE` is never produced: fieldhand does not
    /// change a pool's infrastructure).
    #[derive(Default)]
    pub enum PoolOperation {
        #[default]
        None = "NONE",
        InitialPublish = "INITIAL_PUBLISH",
        SchedulePushImage = "SCHEDULE_PUSH_IMAGE",
        CancelScheduledPushImage = "CANCEL_SCHEDULED_PUSH_IMAGE",
        FinalUnpublish = "FINAL_UNPUBLISH",
    }
}

wire_enum! {
    /// Staging progress of one component.
    pub enum ComponentPhase {
        Pending = "PENDING",
        Downloading = "DOWNLOADING",
        Verifying = "VERIFYING",
        Extracting = "EXTRACTING",
        Staged = "STAGED",
    }
}

wire_enum! {
    /// Seed 003's per-desktop `code` of a rebuild.
    pub enum RebuildCode {
        Success = "Success",
        /// The desktop is not in a state a rebuild may start from (offline, busy, unknown).
        IncorrectDesktopStatus = "IncorrectDesktopStatus",
        /// The image does not suit the desktop (os_type or GPU).
        IncompatibleImage = "IncompatibleImage",
    }
}

wire_enum! {
    /// What an operator did, as the audit trail records it (`action` of `GET /v1/audit`,
    /// the `audit` table and `FIELDHAND_ACTION` in the journal).
    pub enum AuditAction {
        ScriptCreate = "script_create",
        /// A script execution (`POST /v1/pools/{pool_id}/script-executions`).
        TaskCreate = "task_create",
        TaskCancel = "task_cancel",
        TaskRetry = "task_retry",
        TaskResume = "task_resume",
        PushImage = "push_image",
        /// A push-image request for a pool whose scheduled push had not started: a new
        /// start time for the same push.
        PushReschedule = "push_reschedule",
        PushCancel = "push_cancel",
        UnpublishImage = "unpublish_image",
        ImageCreate = "image_create",
        Rebuild = "rebuild",
        SoftwareStage = "software_stage",
        SoftwareDesiredSet = "software_desired_set",
        MachineMove = "machine_move",
        MachineDecommission = "machine_decommission",
        Revocation = "revocation",
        EnrollmentTokenCreate = "enrollment_token_create",
        EnrollmentTokenDelete = "enrollment_token_delete",
        BlobUpload = "blob_upload",
        BlobDelete = "blob_delete",
        SettingsChange = "settings_change",
    }
}

wire_enum! {
    /// Every error code: the operator API's (`{error_code, error_msg}`), the agent protocol's,
    /// and those results carry for a machine (`error_code` of a task's machine).
    pub enum ErrorCode {
        // Requests.
        InvalidParameter = "INVALID_PARAMETER",
        NotFound = "NOT_FOUND",
        PoolNotFound = "POOL_NOT_FOUND",
        TaskNotFound = "TASK_NOT_FOUND",
        ScriptNotFound = "SCRIPT_NOT_FOUND",
        AssignmentNotFound = "ASSIGNMENT_NOT_FOUND",
        TokenNotFound = "TOKEN_NOT_FOUND",
        NotAllowedInCurrentState = "NOT_ALLOWED_IN_CURRENT_STATE",
        MethodNotAllowed = "METHOD_NOT_ALLOWED",
        RequestTooLarge = "REQUEST_TOO_LARGE",
        PayloadTooLarge = "PAYLOAD_TOO_LARGE",
        RequestTimeout = "REQUEST_TIMEOUT",
        RangeNotSatisfiable = "RANGE_NOT_SATISFIABLE",
        RateLimited = "RATE_LIMITED",
        /// The controller sheds agent requests while its database queue is deep (503 with
        /// `Retry-After`); the agent waits that long and asks again.
        ControllerBusy = "CONTROLLER_BUSY",
        InternalError = "INTERNAL_ERROR",
        // Identity.
        CertificateRequired = "CERTIFICATE_REQUIRED",
        Forbidden = "FORBIDDEN",
        CertRevoked = "CERT_REVOKED",
        MachineDecommissioned = "MACHINE_DECOMMISSIONED",
        IdentityConflict = "IDENTITY_CONFLICT",
        MachineIdTaken = "MACHINE_ID_TAKEN",
        EnrollmentDisabled = "ENROLLMENT_DISABLED",
        InvalidToken = "INVALID_TOKEN",
        TokenExpired = "TOKEN_EXPIRED",
        TokenUsedUp = "TOKEN_USED_UP",
        // Rollouts (skipped and lost machines).
        GrayThresholdReached = "GRAY_THRESHOLD_REACHED",
        StoppedOnFirstError = "STOPPED_ON_FIRST_ERROR",
        /// More machines failed than the task's `max_errors`.
        MaxErrorsReached = "MAX_ERRORS_REACHED",
        TaskCancelled = "TASK_CANCELLED",
        MachineUnreachable = "MACHINE_UNREACHABLE",
        // Script runs.
        ExecutionTimeout = "EXECUTION_TIMEOUT",
        NonZeroExit = "NON_ZERO_EXIT",
        KilledBySignal = "KILLED_BY_SIGNAL",
        SpawnFailed = "SPAWN_FAILED",
        MemoryLimitExceeded = "MEMORY_LIMIT_EXCEEDED",
        // The agent's state machine.
        AgentRestarted = "AGENT_RESTARTED",
        InvalidAssignment = "INVALID_ASSIGNMENT",
        RebootNotObserved = "REBOOT_NOT_OBSERVED",
        RebootLoop = "REBOOT_LOOP",
        PowerCommandFailed = "POWER_COMMAND_FAILED",
        WaitForLogoffTimeout = "WAIT_FOR_LOGOFF_TIMEOUT",
        ForceLogoffFailed = "FORCE_LOGOFF_FAILED",
        // Staging.
        DownloadFailed = "DOWNLOAD_FAILED",
        SizeMismatch = "SIZE_MISMATCH",
        HashMismatch = "HASH_MISMATCH",
        SignatureRequired = "SIGNATURE_REQUIRED",
        SignatureInvalid = "SIGNATURE_INVALID",
        SignatureExpired = "SIGNATURE_EXPIRED",
        StagingIoError = "STAGING_IO_ERROR",
        StagingFailed = "STAGING_FAILED",
        UnsafeArchive = "UNSAFE_ARCHIVE",
        ArchiveLimitExceeded = "ARCHIVE_LIMIT_EXCEEDED",
        CorruptArchive = "CORRUPT_ARCHIVE",
        ExtractIoError = "EXTRACT_IO_ERROR",
        InsufficientDiskSpace = "INSUFFICIENT_DISK_SPACE",
        /// Staging ran past the assignment's timeout.
        TimedOut = "TIMED_OUT",
        /// Staging was cancelled.
        Cancelled = "CANCELLED",
        // Images.
        ImageNotStaged = "IMAGE_NOT_STAGED",
        ImageActivateFailed = "IMAGE_ACTIVATE_FAILED",
        ImageHealthCheckFailed = "IMAGE_HEALTH_CHECK_FAILED",
        ImageIoError = "IMAGE_IO_ERROR",
        /// A code this build does not know, from a newer agent or controller. The message that
        /// came with it is kept; only the code is lost.
        #[serde(other)]
        Unknown = "UNKNOWN",
    }
}

impl ErrorCode {
    /// The code for stored text; text no longer known reads as [`ErrorCode::Unknown`].
    pub fn from_stored(text: &str) -> ErrorCode {
        ErrorCode::parse(text).unwrap_or(ErrorCode::Unknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T>(all: &[T])
    where
        T: Copy + fmt::Display + PartialEq + fmt::Debug + Serialize + for<'de> Deserialize<'de>,
    {
        for v in all {
            let json = serde_json::to_string(v).unwrap();
            assert_eq!(json, format!("\"{v}\""), "wire text of {v:?}");
            assert_eq!(serde_json::from_str::<T>(&json).unwrap(), *v);
        }
    }

    #[test]
    fn every_variant_keeps_its_text_on_the_wire() {
        round_trip(TaskKind::ALL);
        round_trip(TaskState::ALL);
        round_trip(MachineState::ALL);
        round_trip(BatchState::ALL);
        round_trip(RunState::ALL);
        round_trip(PreStart::ALL);
        round_trip(PostFinish::ALL);
        round_trip(LogoffPolicy::ALL);
        round_trip(PowerPhase::ALL);
        round_trip(PendingImageState::ALL);
        round_trip(CurrentImageState::ALL);
        round_trip(PoolOperation::ALL);
        round_trip(ComponentPhase::ALL);
        round_trip(RebuildCode::ALL);
        round_trip(AuditAction::ALL);
        round_trip(ErrorCode::ALL);
        for k in TaskKind::ALL {
            assert_eq!(TaskKind::parse(k.as_str()), Some(*k));
        }
        assert_eq!(TaskKind::parse("image"), None);
    }

    #[test]
    fn a_code_from_a_newer_peer_reads_as_unknown_and_the_rest_is_kept() {
        let c: ErrorCode = serde_json::from_str("\"SOMETHING_NEW\"").unwrap();
        assert_eq!(c, ErrorCode::Unknown);
        assert_eq!(
            ErrorCode::from_stored("NON_ZERO_EXIT"),
            ErrorCode::NonZeroExit
        );
        // A closed vocabulary elsewhere: an unknown state is an error, not a guess.
        assert!(serde_json::from_str::<TaskState>("\"DONE\"").is_err());
    }

    #[test]
    fn terminal_and_active_states_are_disjoint() {
        for s in TaskState::ALL {
            assert!(!(s.is_active() && s.is_terminal()), "{s}");
        }
        assert!(!TaskState::Cancelling.is_terminal());
    }
}
