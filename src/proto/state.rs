//! The agent's on-disk records under `state_dir`. They are a contract with the agent version
//! that wrote them (an upgrade restarts the agent on the old files), so they live with the wire
//! types and only grow fields with `#[serde(default)]`.

use serde::{Deserialize, Serialize};

use super::agent::{AgentEvent, Assignment, ImageRecord};
use super::status::RecentResult;

/// `state_dir/state.json`, rewritten atomically before every irreversible step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StateFile {
    pub version: u32,
    /// Accepted assignments waiting their turn, oldest first.
    #[serde(default)]
    pub queue: Vec<Assignment>,
    #[serde(default)]
    pub running: Option<RunningRecord>,
    /// Newest first.
    #[serde(default)]
    pub recent: Vec<RecentResult>,
    /// Ids of assignments this agent has accepted (bounded), so a re-delivered assignment is
    /// never run twice.
    #[serde(default)]
    pub seen: Vec<String>,
    /// The desired-software commit last staged completely.
    #[serde(default)]
    pub staged_commit: Option<String>,
    /// The images on this machine, as image assignments left them.
    #[serde(default)]
    pub image: ImageRecord,
}

/// `state_dir/payloads/partial/<sha256>.json`: how far a download got, so it can resume
/// after a restart. `offset` bytes of the `.part` file were fsynced before this was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialDownload {
    pub sha256: String,
    pub size: u64,
    /// The server's validator (`ETag`), sent back as `If-Range`.
    pub etag: String,
    pub offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningRecord {
    pub assignment: Assignment,
    pub started_at: String,
    /// Process group of the running script, once it has been spawned.
    #[serde(default)]
    pub pgid: Option<i32>,
    /// Boot the process group belongs to: after a reboot the number means nothing.
    pub boot_id: String,
    #[serde(default)]
    pub cancel_requested: bool,
    /// Where a run with power steps is; absent for plain runs.
    #[serde(default)]
    pub phase: Option<PhaseRecord>,
    /// Reboots requested for this assignment so far (loop guard).
    #[serde(default)]
    pub reboots: u32,
    /// Output of the scripts so far, and the final result while a post-finish power step
    /// is pending.
    #[serde(default)]
    pub carry: Option<super::agent::RunResult>,
}

/// The durable phase of a run with power steps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum PhaseRecord {
    /// Ending user sessions before `next`.
    Logoff { next: String },
    /// Running scripts from index `from`.
    Scripts { from: usize },
    /// A power command ran in boot `boot_id`; `then` says what follows it.
    Power {
        /// `reboot` or `stop`.
        kind: String,
        /// `scripts:<n>` (run scripts from n) or `finish`.
        then: String,
        boot_id: String,
        /// When to give up waiting for the boot id to change (RFC 3339).
        deadline: String,
    },
}

/// `state_dir/outbox/<seq>.json`: one event waiting for delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxRecord {
    pub seq: u64,
    pub event: AgentEvent,
}
