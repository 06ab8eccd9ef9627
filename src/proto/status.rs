//! The local status socket: the client sends one [`StatusRequest`] line, the agent answers with
//! one [`StatusReport`] (or [`MetricsReply`]) line and closes.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum StatusRequest {
    Status,
    /// The agent's counters in the Prometheus text format ([`MetricsReply`]).
    Metrics,
}

/// The answer to [`StatusRequest::Metrics`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetricsReply {
    pub metrics: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub machine_id: String,
    /// The controller in use now (one of `controller_urls`).
    pub controller_url: String,
    /// Every configured controller replica, in the order they are tried (empty from an
    /// agent older than failover).
    #[serde(default)]
    pub controller_urls: Vec<String>,
    pub connected: bool,
    /// `connecting` until the first answer (or error), then `connected` or `unreachable`.
    pub link: LinkPhase,
    /// Last successful exchange with the controller (RFC 3339).
    pub last_contact: Option<String>,
    /// The last failed exchange, while it is the newest word from the link.
    #[serde(default)]
    pub last_error: Option<String>,
    /// The machine's certificate and what stands in its way, if anything.
    pub identity: IdentityStatus,
    /// How script runs are contained (cgroup v2, or the subreaper fallback and why).
    #[serde(default)]
    pub containment: String,
    pub running: Option<RunningStatus>,
    pub queued: u32,
    pub undelivered_events: u32,
    pub undelivered_results: u32,
    /// Newest first, at most 5.
    pub recent_results: Vec<RecentResult>,
    /// The desired-software commit staged under `state_dir/software/`.
    #[serde(default)]
    pub staged_commit: Option<String>,
    /// The current and pending image, with their seed 001 states.
    #[serde(default)]
    pub image: super::agent::ImageRecord,
    /// Staging progress of the pending image, while it is `PUBLISHING`.
    #[serde(default)]
    pub pending_image_progress: Option<super::agent::ComponentProgress>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkPhase {
    Connecting,
    Connected,
    Unreachable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityPhase {
    /// A valid certificate is in place.
    Enrolled,
    /// No certificate yet: enrolling with the token (see `problem` for why it has not
    /// worked yet).
    Enrolling,
    /// The certificate is expired or not yet valid; renewal or re-enrollment may fix it.
    CertificateInvalid,
    /// Another live agent presents this certificate; no work is taken.
    Conflict,
    /// The certificate was revoked or the machine decommissioned; no work is taken.
    Revoked,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityStatus {
    pub phase: IdentityPhase,
    pub certificate_serial: Option<String>,
    pub certificate_not_after: Option<String>,
    /// Why the phase is not `enrolled`, or why the last renewal failed.
    pub problem: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunningStatus {
    pub assignment_id: String,
    pub task_id: String,
    /// The operator cancelled it; the run is being stopped.
    #[serde(default)]
    pub cancelling: bool,
    pub started_at: String,
    pub elapsed_seconds: u64,
    /// Staging progress per component (software stage assignments).
    #[serde(default)]
    pub components: Vec<super::agent::ComponentProgress>,
    /// What the run is waiting for (sessions to end, a reboot), if anything.
    #[serde(default)]
    pub waiting: Option<WaitingStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitingStatus {
    /// e.g. `users to log off (2 sessions)`, `the machine to reboot`.
    pub what: String,
    pub since: String,
    pub until: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentResult {
    pub assignment_id: String,
    pub task_id: String,
    pub state: super::domain::RunState,
    pub exit_code: Option<i32>,
    pub error_code: Option<super::domain::ErrorCode>,
    pub finished_at: String,
}
