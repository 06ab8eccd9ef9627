//! The agent protocol (`/agent/v1/...`), spoken by agents with agent certificates.
//!
//! - `POST /agent/v1/heartbeat` [`Heartbeat`] -> 204: registers the machine in its pool, with facts.
//! - `POST /agent/v1/poll` [`PollRequest`] -> [`PollResponse`]: long-poll. The controller answers
//!   as soon as there is an unacknowledged assignment or cancellation for this machine, or after
//!   `wait_ms`. Acks in the request are applied first, so one round trip both confirms what the
//!   agent has persisted and asks for more.
//! - `POST /agent/v1/events` [`EventBatch`] -> [`EventsApplied`]: progress and results. Each event
//!   has an idempotency key; the controller applies a key at most once, however often it is sent.
//!
//! - `POST /agent/v1/enroll` [`EnrollRequest`] -> [`Enrolled`]: the one route reachable without
//!   a client certificate. A token and a CSR buy the machine its certificate; its pool comes
//!   from the token.
//! - `POST /agent/v1/renew` [`RenewRequest`] -> [`Enrolled`]: a fresh certificate over a new
//!   key, asked for with the current certificate.
//!
//! The machine id is never in a body: the controller takes it from the client certificate
//! (enrollment aside, where the machine proposes the id it will be known by). Nor is the pool:
//! the controller alone decides it. Every request of a version-2 agent carries
//! [`SESSION_HEADER`], which tells two live agents behind one certificate apart.

/// Protocol version of this agent, sent as [`PROTOCOL_HEADER`]. 1 (no header): agents
/// before enrollment, which still send `pool_id` (ignored).
pub const PROTOCOL_VERSION: u32 = 2;
pub const PROTOCOL_HEADER: &str = "fieldhand-protocol";
/// `<instance_id>.<boot_id>`: the instance id is made once per state directory, the boot id
/// once per boot. A restart keeps both; a reboot changes only the boot id; a clone (a copied
/// certificate in another state directory or on another machine) differs in one of them.
pub const SESSION_HEADER: &str = "fieldhand-session";

use serde::{Deserialize, Serialize};

use super::domain::{
    ComponentPhase, CurrentImageState, ErrorCode, LogoffPolicy, PendingImageState, PostFinish,
    PowerPhase, PreStart, RunState,
};

/// Host facts, gathered with sysinfo.
#[derive(utoipa::ToSchema, Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostFacts {
    pub hostname: String,
    pub os: String,
    pub kernel: String,
    pub cpu_count: u32,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    /// Free bytes on the filesystem that holds the agent's `state_dir`.
    pub disk_free_bytes: u64,
    pub uptime_seconds: u64,
    pub agent_version: String,
    /// Whether the machine has a GPU (declared in `agent.toml`, or detected on the PCI bus).
    #[serde(default)]
    pub gpu: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Heartbeat {
    pub agent_version: String,
    pub facts: HostFacts,
    /// Undelivered events in the agent's outbox.
    #[serde(default)]
    pub outbox: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PollRequest {
    pub agent_version: String,
    /// How long the controller may hold the request open.
    pub wait_ms: u64,
    /// Assignments the agent has durably accepted.
    #[serde(default)]
    pub ack_assignments: Vec<String>,
    /// Cancellations the agent has durably recorded.
    #[serde(default)]
    pub ack_cancels: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PollResponse {
    pub assignments: Vec<Assignment>,
    /// Assignment ids the operator cancelled.
    pub cancels: Vec<String>,
}

/// One machine's share of a task: what to do ([`Work`]), the limit, and the power and logoff
/// steps around it. On the wire it is today's flat object (`kind`, `scripts`, `stage`,
/// `image`; see [`AssignmentWire`]), so agents and controllers of 0.1.0 read it unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "AssignmentWire", into = "AssignmentWire")]
pub struct Assignment {
    pub assignment_id: String,
    pub task_id: String,
    pub work: Work,
    /// Limit for the whole run on this machine (the scripts, the staging, each hook).
    pub timeout_seconds: u64,
    /// Power and logoff steps around the work (seed 002 pre_start/post_finish, seed 000
    /// logoff policy).
    pub power: Option<PowerSpec>,
}

/// What an assignment does: exactly one kind of work, with exactly what that kind needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// Run these scripts in order; the first failure ends the run.
    Scripts(Vec<ScriptPayload>),
    /// Stage one desired-software commit.
    SoftwareStage(StagePayload),
    /// Download and unpack an image into `image_root/<image_id>` (pending image).
    ImageStage {
        image: ImageAssignment,
        payload: PayloadRef,
    },
    /// Switch to a staged image (or, for a rebuild, one staged into a fresh slot first), run
    /// its hooks around a reboot, commit or roll back.
    ImageApply(ImageAssignment),
    /// Drop a pending image, or every image.
    ImageRemove(ImageAssignment),
    /// Work this agent cannot do: a kind from a newer controller, or a kind without the part
    /// it needs. Refused with `INVALID_ASSIGNMENT` on its own, instead of failing the poll.
    Invalid { kind: AssignmentKind, why: String },
}

impl Work {
    pub fn kind(&self) -> AssignmentKind {
        match self {
            Work::Scripts(_) => AssignmentKind::ScriptExecution,
            Work::SoftwareStage(_) => AssignmentKind::SoftwareStage,
            Work::ImageStage { .. } => AssignmentKind::ImageStage,
            Work::ImageApply(_) => AssignmentKind::ImageApply,
            Work::ImageRemove(_) => AssignmentKind::ImageRemove,
            Work::Invalid { kind, .. } => *kind,
        }
    }

    /// The image worked on, for the image kinds.
    pub fn image(&self) -> Option<&ImageAssignment> {
        match self {
            Work::ImageStage { image, .. } | Work::ImageApply(image) | Work::ImageRemove(image) => {
                Some(image)
            }
            Work::Scripts(_) | Work::SoftwareStage(_) | Work::Invalid { .. } => None,
        }
    }

    /// The payloads this work downloads.
    pub fn payloads(&self) -> Vec<&PayloadRef> {
        match self {
            Work::SoftwareStage(stage) => stage.components.iter().collect(),
            Work::ImageStage { payload, .. } => vec![payload],
            Work::ImageApply(image) => image.payload.iter().collect(),
            Work::Scripts(_) | Work::ImageRemove(_) | Work::Invalid { .. } => Vec::new(),
        }
    }

    /// The scripts, for a script execution (none for the other kinds).
    pub fn scripts(&self) -> &[ScriptPayload] {
        match self {
            Work::Scripts(scripts) => scripts,
            Work::SoftwareStage(_)
            | Work::ImageStage { .. }
            | Work::ImageApply(_)
            | Work::ImageRemove(_)
            | Work::Invalid { .. } => &[],
        }
    }
}

/// An [`Assignment`] as it travels and as the agent's state file keeps it: a kind and the
/// optional parts. Only the conversions below read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignmentWire {
    pub assignment_id: String,
    pub task_id: String,
    pub kind: AssignmentKind,
    #[serde(default)]
    pub scripts: Vec<ScriptPayload>,
    pub timeout_seconds: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<StagePayload>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power: Option<PowerSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageAssignment>,
}

impl From<AssignmentWire> for Assignment {
    fn from(w: AssignmentWire) -> Assignment {
        let invalid = |kind, why: &str| Work::Invalid {
            kind,
            why: why.to_string(),
        };
        let work = match (w.kind, w.stage, w.image) {
            (AssignmentKind::ScriptExecution, _, _) => Work::Scripts(w.scripts),
            (AssignmentKind::SoftwareStage, Some(stage), _) => Work::SoftwareStage(stage),
            (k @ AssignmentKind::SoftwareStage, None, _) => {
                invalid(k, "a software_stage assignment without its stage payload")
            }
            (k @ AssignmentKind::ImageStage, _, Some(mut image)) => match image.payload.take() {
                Some(payload) => Work::ImageStage { image, payload },
                None => invalid(k, "an image_stage assignment without the image's payload"),
            },
            (AssignmentKind::ImageApply, _, Some(image)) => Work::ImageApply(image),
            (AssignmentKind::ImageRemove, _, Some(image)) => Work::ImageRemove(image),
            (
                k @ (AssignmentKind::ImageStage
                | AssignmentKind::ImageApply
                | AssignmentKind::ImageRemove),
                _,
                None,
            ) => invalid(k, "an image assignment without an image"),
            (k @ AssignmentKind::Unknown, _, _) => {
                invalid(k, "an assignment kind this agent does not know")
            }
        };
        Assignment {
            assignment_id: w.assignment_id,
            task_id: w.task_id,
            work,
            timeout_seconds: w.timeout_seconds,
            power: w.power,
        }
    }
}

impl From<Assignment> for AssignmentWire {
    fn from(a: Assignment) -> AssignmentWire {
        let kind = a.work.kind();
        let (scripts, stage, image) = match a.work {
            Work::Scripts(scripts) => (scripts, None, None),
            Work::SoftwareStage(stage) => (Vec::new(), Some(stage), None),
            Work::ImageStage { mut image, payload } => {
                image.payload = Some(payload);
                (Vec::new(), None, Some(image))
            }
            Work::ImageApply(image) | Work::ImageRemove(image) => (Vec::new(), None, Some(image)),
            Work::Invalid { .. } => (Vec::new(), None, None),
        };
        AssignmentWire {
            assignment_id: a.assignment_id,
            task_id: a.task_id,
            kind,
            scripts,
            timeout_seconds: a.timeout_seconds,
            stage,
            power: a.power,
            image,
        }
    }
}

/// The image part of an image assignment (seeds 000, 001 and 003).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageAssignment {
    pub image_id: String,
    /// The image's tar.gz, for `ImageStage`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<PayloadRef>,
    /// Passed to the `fieldhand/activate` hook as environment variables, for `ImageApply`
    /// (the push's compute profile, `add_virtual_tpm`, the image ids).
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// For `ImageRemove`: remove every image (`FINAL_UNPUBLISH`), not just `image_id`
    /// while it is pending (`CANCEL_SCHEDULED_PUSH_IMAGE`).
    #[serde(default)]
    pub remove_all: bool,
    /// For a rebuild (seed 003): the fresh directory under `image_root` the image is
    /// extracted into (`<image_id>.<tag>`, never used before); `payload` is staged there
    /// as the first step of the `ImageApply`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    /// For a rebuild: empty the data area (kept aside until the commit).
    #[serde(default)]
    pub empty_data: bool,
    /// For a rebuild: the hooks' `LANG` (`en-US`, `zh-HK`, `zh-CN`, `ja-JP`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
}

/// A machine's images with their seed 001 states. The agent keeps it (state file, `fieldhand
/// status`) and attaches it to every image result, so the controller copies it instead of
/// re-deriving it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub current_image_id: Option<String>,
    /// `READY` or `FAILED` (its health check failed after a rollback).
    pub current_image_state: Option<CurrentImageState>,
    pub pending_image_id: Option<String>,
    /// `PUBLISHING`, `READY` or `FAILED`.
    pub pending_image_state: Option<PendingImageState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_start: Option<PreStart>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_finish: Option<PostFinish>,
    pub logoff_policy: LogoffPolicy,
    pub logoff_timeout_seconds: u64,
    pub force_logoff_grace_seconds: u64,
}

impl PowerSpec {
    /// Whether the plan reboots or shuts the machine down (a logoff alone is no power step):
    /// what the power limits count. A script that asks for a reboot by exiting with 194
    /// cannot be known beforehand and is not counted.
    pub fn has_power_step(&self) -> bool {
        let pre = match self.pre_start {
            Some(PreStart::Reboot) => true,
            Some(PreStart::Logoff) | None => false,
        };
        pre || self.post_finish.is_some()
    }
}

/// A power step the agent announces (`REBOOTING`, `SHUTTING_DOWN`) or observed
/// (`REBOOTED`). Key: `<assignment_id>:power:<n>:<phase>`, n = the assignment's reboot count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerEvent {
    pub phase: PowerPhase,
    pub boot_id: String,
    pub count: u32,
}

/// What a `SoftwareStage` assignment stages: one desired-software commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagePayload {
    pub commit: String,
    pub components: Vec<PayloadRef>,
}

/// A blob the agent downloads from `GET /agent/v1/blobs/{sha256}` and verifies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadRef {
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub size: u64,
    /// `file` (stored as is) or `tar.gz` (extracted).
    pub format: String,
    /// Declared unpacked size, for the disk-space check (tar.gz only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unpacked_size: Option<u64>,
    /// Present when the controller signs payloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<PayloadSignature>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadSignature {
    pub expires_at: String,
    /// Hex ed25519 signature over the JSON bytes of [`PayloadManifest`].
    pub ed25519: String,
}

/// The signed statement about a payload. Field order is the byte contract: both sides
/// serialize this struct with serde_json and sign or verify exactly those bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadManifest {
    pub sha256: String,
    pub size: u64,
    pub name: String,
    pub expires_at: String,
}

/// Staging progress of one component.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentProgress {
    pub name: String,
    pub phase: ComponentPhase,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// Progress of a running assignment; the newest `seq` wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub seq: u64,
    pub components: Vec<ComponentProgress>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AssignmentKind {
    ScriptExecution,
    SoftwareStage,
    /// Download and unpack an image into `image_root/<image_id>` (pending image).
    ImageStage,
    /// Switch to a staged image, run its hooks around a reboot, commit or roll back.
    ImageApply,
    /// Drop a pending image, or every image.
    ImageRemove,
    /// A kind this agent does not know (sent by a newer controller): refused with
    /// `INVALID_ASSIGNMENT` instead of failing the whole poll. Never sent.
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScriptPayload {
    pub name: String,
    /// `sh`, `bash` or `python3`.
    pub command_type: String,
    pub content: String,
    /// Hex sha256 of `content`; the agent refuses a script whose content does not match.
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventBatch {
    pub events: Vec<AgentEvent>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentEvent {
    /// Unique per logical event, e.g. `<assignment_id>:started`, `<assignment_id>:result`.
    pub idempotency_key: String,
    pub assignment_id: String,
    /// RFC 3339, agent clock.
    pub at: String,
    pub body: EventBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventBody {
    /// The first script of the assignment was started.
    Started,
    /// The machine's final result for the assignment.
    Result(RunResult),
    /// Progress (best effort, latest wins; key `<assignment_id>:progress:<seq>`).
    Progress(Progress),
    /// A power step (durable, exactly once per key).
    Power(PowerEvent),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunResult {
    pub state: RunState,
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub output_truncated: bool,
    pub started_at: Option<String>,
    pub finished_at: String,
    pub error_code: Option<ErrorCode>,
    pub error_msg: Option<String>,
    /// The commit now staged, for a successful `SoftwareStage`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged_commit: Option<String>,
    /// The machine's images after an image assignment. The executor fills in the current
    /// image it left on disk; the state machine adds the pending one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<Box<ImageRecord>>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EventsApplied {
    /// Events applied by this request.
    pub applied: u32,
    /// Events whose key had been applied before (ignored).
    pub duplicates: u32,
}

/// `POST /agent/v1/enroll`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// `<token_id>.<secret>` from `POST /v1/enrollment-tokens`.
    pub token: String,
    /// The id this machine asks to be known by (default: its host name).
    pub machine_id: String,
    /// PKCS#10 request (PEM) over the key the agent made; only its public key is used.
    pub csr_pem: String,
}

/// `POST /agent/v1/renew`: the identity is the presenting certificate's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RenewRequest {
    pub csr_pem: String,
}

/// A signed certificate, for enrollment and renewal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Enrolled {
    pub machine_id: String,
    pub pool_id: Option<String>,
    /// The leaf, then the issuing CA.
    pub certificate_pem: String,
    pub serial: String,
    pub not_after: String,
}
