//! Operator API bodies (`/v1/...`): snake_case JSON, field names taken from the seed pages.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::agent::HostFacts;
use super::domain::{
    AuditAction, BatchState, CurrentImageState, ErrorCode, MachineState, PendingImageState,
    PoolOperation, PowerPhase, RebuildCode, TaskKind, TaskState,
};

/// The response header of a list with more rows: the `cursor` of the next page (absent on
/// the last page).
pub const NEXT_CURSOR_HEADER: &str = "fieldhand-next-cursor";

/// Every error response: `{error_code, error_msg}` with the matching HTTP status.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error_code: ErrorCode,
    pub error_msg: String,
}

/// `POST /v1/scripts`.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateScript {
    pub name: String,
    pub command_type: String,
    pub content: String,
}

#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct ScriptCreated {
    pub script_id: String,
    pub sha256: String,
}

/// `POST /v1/pools/{pool_id}/script-executions` (seed 002). Integers are signed on the wire so
/// that a negative value gets our own error naming the field rather than a serde message.
#[derive(utoipa::ToSchema, Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateScriptExecution {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script_ids: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_type: Option<String>,
    /// A machine count, or a percentage of the pool (`"10%"`, rounded up, at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gray_count: Option<Amount>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gray_desktop_ids: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gray_fail_threshold: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_start: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_finish: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_timeout: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_timeout_seconds: Option<i64>,
    /// Seed 000: `WAIT_FOR_LOGOFF` (default) or `FORCE_LOGOFF`.
    #[serde(default)]
    pub logoff_policy: Option<String>,
    /// Under WAIT_FOR_LOGOFF: how long to wait for sessions to end (default 3600).
    #[serde(default)]
    pub logoff_timeout_seconds: Option<i64>,
    /// The machines after the gray batch run at most this many at once (a count, or a
    /// percentage of the targeted machines); a new one starts as soon as one ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<Amount>,
    /// Once more machines than this failed (failed, timed out, unreachable), nothing new
    /// starts and the task ends `HALTED`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_errors: Option<Amount>,
}

/// A number of machines as the operator gives it: a JSON number (`5`, a count of at least 1)
/// or a string with a percentage (`"10%"`, 1 to 100) of the machines it applies to. Anything
/// else is refused while the body is decoded, so the error names the field and the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Amount {
    Count(u32),
    Percent(u8),
}

/// In the OpenAPI document: a count of at least 1, or a percentage string.
impl utoipa::PartialSchema for Amount {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, Type};
        let count = ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(1))
            .maximum(Some(u32::MAX));
        let percent = ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some("^([1-9][0-9]?|100)%$"));
        utoipa::openapi::RefOr::T(Schema::OneOf(
            OneOfBuilder::new().item(count).item(percent).build(),
        ))
    }
}

impl utoipa::ToSchema for Amount {}

impl Amount {
    /// How many machines of `total` this is: a percentage is rounded up and is at least 1
    /// (a count stands as given; callers compare it with `total` where that matters).
    pub fn of(self, total: usize) -> usize {
        match self {
            Amount::Count(n) => n as usize,
            Amount::Percent(p) => (total * usize::from(p)).div_ceil(100).max(1),
        }
    }

    /// The text form (`5`, `10%`), as stored; [`Amount::parse`] is its inverse.
    pub fn text(self) -> String {
        match self {
            Amount::Count(n) => n.to_string(),
            Amount::Percent(p) => format!("{p}%"),
        }
    }

    /// Reads `5` or `10%`; `None` for anything else (0, `0%`, `101%`, signs, words).
    pub fn parse(text: &str) -> Option<Amount> {
        let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        match text.strip_suffix('%') {
            Some(p) if digits(p) => match p.parse::<u8>() {
                Ok(p @ 1..=100) => Some(Amount::Percent(p)),
                Ok(_) | Err(_) => None,
            },
            Some(_) => None,
            None if digits(text) => match text.parse::<u32>() {
                Ok(n @ 1..) => Some(Amount::Count(n)),
                Ok(0) | Err(_) => None,
            },
            None => None,
        }
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

impl Serialize for Amount {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Amount::Count(n) => s.serialize_u32(*n),
            Amount::Percent(_) => s.serialize_str(&self.text()),
        }
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        const WANT: &str =
            "must be a count of machines (1 or more) or a percentage (\"1%\" to \"100%\")";
        fn refuse<E: serde::de::Error>(shown: impl fmt::Display) -> E {
            E::custom(format!("{shown} {WANT}"))
        }
        impl serde::de::Visitor<'_> for V {
            type Value = Amount;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a count of machines or a percentage string such as \"10%\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Amount, E> {
                match u32::try_from(v) {
                    Ok(n @ 1..) => Ok(Amount::Count(n)),
                    Ok(0) | Err(_) => Err(refuse(v)),
                }
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Amount, E> {
                match u64::try_from(v) {
                    Ok(u) => self.visit_u64(u),
                    Err(_) => Err(refuse(v)),
                }
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Amount, E> {
                Err(refuse(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Amount, E> {
                Amount::parse(v).ok_or_else(|| refuse(format!("{v:?}")))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct TaskCreated {
    pub task_id: String,
}

/// `GET /v1/tasks/{task_id}`.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct Task {
    pub task_id: String,
    pub kind: TaskKind,
    pub pool_id: String,
    pub state: TaskState,
    pub created_at: String,
    pub finished_at: Option<String>,
    /// The operator whose request made the task (absent for tasks made before 0.2, and
    /// for tasks the controller made on its own).
    #[serde(default)]
    pub created_by: Option<String>,
    /// The operator who cancelled it, once one did.
    #[serde(default)]
    pub cancelled_by: Option<String>,
    /// The rollout's rate controls as the request gave them (script executions).
    #[serde(default)]
    pub gray_count: Option<Amount>,
    #[serde(default)]
    pub max_concurrency: Option<Amount>,
    #[serde(default)]
    pub max_errors: Option<Amount>,
    /// The task this one retries (`POST /v1/tasks/{task_id}/retry`).
    #[serde(default)]
    pub retry_of: Option<String>,
    pub batches: Vec<Batch>,
    pub machines: Vec<TaskMachine>,
}

/// One row of `GET /v1/tasks`: a task without its machines' outputs.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct TaskSummary {
    pub task_id: String,
    pub kind: TaskKind,
    pub pool_id: String,
    pub state: TaskState,
    pub created_at: String,
    pub finished_at: Option<String>,
    #[serde(default)]
    pub created_by: Option<String>,
    #[serde(default)]
    pub cancelled_by: Option<String>,
    /// How many of its machines are in each state (states with none are left out).
    pub machine_states: std::collections::BTreeMap<MachineState, u32>,
}

/// One row of `GET /v1/scripts`.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct ScriptSummary {
    pub script_id: String,
    pub name: String,
    pub command_type: String,
    pub sha256: String,
    pub created_at: String,
}

/// `GET /v1/scripts/{script_id}`.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct Script {
    pub script_id: String,
    pub name: String,
    pub command_type: String,
    pub sha256: String,
    pub created_at: String,
    pub content: String,
}

/// One row of `GET /v1/pools`.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct PoolSummary {
    pub pool_id: String,
    /// Machines in service in the pool.
    pub machines: u32,
    pub online: u32,
    /// What `GET /v1/pools/{pool_id}/provisioning-status` answers.
    pub provisioning: ProvisioningStatus,
}

/// `GET /v1/pools/{pool_id}`.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct Pool {
    pub pool_id: String,
    /// Its machines' ids, sorted.
    pub machines: Vec<String>,
    pub online: u32,
    pub provisioning: ProvisioningStatus,
}

/// One row of `GET /v1/audit`: an operator's action.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct AuditRecord {
    pub audit_id: String,
    pub at: String,
    /// The operator's name, from the verified client certificate.
    pub operator: String,
    pub action: AuditAction,
    /// What it acted on: the id in the request's path, or the id it created.
    pub target: String,
    /// The request body (secrets removed), `{}` for a request without one.
    pub request: serde_json::Value,
}

/// `PUT /v1/pools/{pool_id}/power-limit`: how many of the pool's machines may be at work on
/// an assignment with a reboot or shutdown at once; `null` clears the limit.
#[derive(utoipa::ToSchema, Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerLimit {
    /// Signed on the wire, so that 0 or a negative value gets our own error.
    pub max_concurrent_power_operations: Option<i64>,
}

/// The answer to `GET`/`PUT /v1/pools/{pool_id}/power-limit`.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct PoolPowerLimit {
    pub pool_id: String,
    /// `null`: no limit for the pool (the controller-wide one still holds).
    pub max_concurrent_power_operations: Option<u32>,
    /// The controller's `max_concurrent_power_operations` (config), `null` when unset.
    pub controller_max_concurrent_power_operations: Option<u32>,
}

#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct Batch {
    pub index: u32,
    pub machine_ids: Vec<String>,
    pub state: BatchState,
}

#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct TaskMachine {
    pub machine_id: String,
    pub batch: u32,
    pub state: MachineState,
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub output_truncated: bool,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub error_code: Option<ErrorCode>,
    pub error_msg: Option<String>,
    /// The last power step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_state: Option<PowerPhase>,
    /// Per-component staging progress (software staging tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub components: Option<Vec<crate::proto::agent::ComponentProgress>>,
}

/// `GET /v1/tasks/{task_id}/summary`: the task without its per-machine rows, so a page
/// that polls a task of 10,000 machines every second moves a few hundred bytes.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct TaskProgress {
    pub task_id: String,
    pub kind: TaskKind,
    pub pool_id: String,
    pub state: TaskState,
    pub created_at: String,
    pub finished_at: Option<String>,
    /// Machines of the whole task by state (only states some machine is in).
    pub machine_states: BTreeMap<MachineState, u32>,
    pub machines: u32,
    pub batches: Vec<BatchSummary>,
}

/// One batch of a [`TaskProgress`]: its state and its machines counted by state.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct BatchSummary {
    pub index: u32,
    pub state: BatchState,
    pub machines: u32,
    pub machine_states: BTreeMap<MachineState, u32>,
}

/// `GET /v1/tasks/{task_id}/machines?state=&limit=&offset=`: one page of a task's machines
/// (ordered by batch, then machine id), with the counts a pager needs.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct TaskMachinePage {
    pub task_id: String,
    pub state: TaskState,
    /// The filter applied, if any.
    pub filter_state: Option<MachineState>,
    /// Machines matching the filter (all of the task's without one).
    pub total: u32,
    pub offset: u32,
    pub limit: u32,
    /// Machines of the whole task by state, whatever the filter.
    pub machine_states: BTreeMap<MachineState, u32>,
    pub machines: Vec<TaskMachine>,
}

/// `POST /v1/images`: register a tar.gz blob as an image (seed 000/001).
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateImage {
    pub name: String,
    pub version: String,
    /// Free text, e.g. `linux`.
    pub os_type: String,
    pub gpu: bool,
    pub sha256: String,
}

#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct ImageCreated {
    pub image_id: String,
}

/// One entry of `GET /v1/images`.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct Image {
    pub image_id: String,
    pub name: String,
    pub version: String,
    pub os_type: String,
    pub gpu: bool,
    pub sha256: String,
    pub size: u64,
    pub created_at: String,
}

/// `POST /v1/pools/{pool_id}/push-image`, with the field names of seed 000.
#[derive(utoipa::ToSchema, Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushImage {
    pub image_id: Option<String>,
    /// Epoch milliseconds; absent or in the past means now.
    pub start_time: Option<i64>,
    pub logoff_policy: Option<String>,
    pub stop_on_first_error: Option<bool>,
    pub selective_push_image: Option<bool>,
    pub machine_ids: Option<Vec<String>>,
    pub compute_profile_num_cpus: Option<i64>,
    pub compute_profile_num_cores_per_socket: Option<i64>,
    pub compute_profile_ram_mb: Option<i64>,
    pub add_virtual_tpm: Option<bool>,
    /// fieldhand extension: the limit for staging the image and for each hook run on a
    /// machine, in seconds (default 3600).
    pub timeout_seconds: Option<i64>,
}

/// `POST /v1/desktops/rebuild` (seed 003 "RebuildDesktops").
#[derive(utoipa::ToSchema, Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebuildDesktops {
    /// 1 to 20 machine ids.
    #[serde(default)]
    pub desktop_ids: Vec<String>,
    /// Default: each machine's current image (a fresh copy of it).
    pub image_id: Option<String>,
    /// `replace` (empty the data area), or absent.
    pub operate_type: Option<String>,
    /// `en-US`, `zh-HK`, `zh-CN` or `ja-JP`.
    pub language: Option<String>,
}

#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct RebuildResponse {
    /// The task that follows the started rebuilds (`GET /v1/tasks/{request_id}`).
    pub request_id: String,
    pub rebuild_results: Vec<RebuildResult>,
}

#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildResult {
    pub desktop_id: String,
    pub code: RebuildCode,
    /// Why, when `code` is not `Success`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `GET /v1/pools/{pool_id}/provisioning-status` (seed 001 names and values).
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvisioningStatus {
    pub operation: PoolOperation,
    /// Null without a pending image.
    pub pending_image_state: Option<PendingImageState>,
    /// Null without an image.
    pub current_image_state: Option<CurrentImageState>,
    pub pending_image_id: Option<String>,
    pub current_image_id: Option<String>,
    /// Percent of the pending image's bytes staged across the targeted machines.
    pub pending_image_progress: Option<u32>,
    /// When the scheduled push applies (epoch ms).
    pub start_time: Option<i64>,
    /// The task of the current (or last) operation.
    pub task_id: Option<String>,
    pub machines: MachineCounts,
    /// Why the last operation failed (its first machine's error), when it did.
    #[serde(default)]
    pub error_code: Option<ErrorCode>,
    #[serde(default)]
    pub error_msg: Option<String>,
}

/// Machines of the current (or last) operation, by outcome.
#[derive(utoipa::ToSchema, Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineCounts {
    pub total: u32,
    pub pending: u32,
    pub succeeded: u32,
    pub failed: u32,
    /// Skipped (stop_on_first_error) or cancelled.
    pub skipped: u32,
}

/// A machine's images (seed 001 states), in `GET /v1/machines[/{machine_id}]`.
#[derive(utoipa::ToSchema, Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineImage {
    pub current_image_id: Option<String>,
    pub current_image_state: Option<CurrentImageState>,
    pub pending_image_id: Option<String>,
    pub pending_image_state: Option<PendingImageState>,
    /// Percent of the pending image staged on this machine, while it is `PUBLISHING`.
    pub pending_image_progress: Option<u32>,
    /// The language of the last rebuild that set one (seed 003).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
}

/// `GET/PUT /v1/settings`: global settings (seed 000 "Global Settings").
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub force_logoff_grace_seconds: i64,
}

/// `POST /v1/blobs` answer, and `GET /v1/blobs/{sha256}` (with `bytes_served`).
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct Blob {
    pub sha256: String,
    pub size: u64,
    /// Bytes sent to agents since the controller started (resumed downloads send less).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_served: Option<u64>,
}

/// `PUT /v1/hosts/{machine_id}/software/desired`.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredSoftware {
    pub components: Vec<DesiredComponent>,
}

#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredComponent {
    pub name: String,
    pub version: String,
    pub sha256: String,
    /// `file` (default) or `tar.gz`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Declared unpacked size in bytes (tar.gz), used for the disk-space check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unpacked_size: Option<u64>,
    /// Blob size in bytes; optional on input (checked if given), pinned by the commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct CommitCreated {
    pub commit: String,
}

/// `POST /v1/hosts/{machine_id}/software/stage`.
#[derive(utoipa::ToSchema, Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSoftware {
    /// The minimum commit to stage; the newest commit is staged if it is newer.
    #[serde(default)]
    pub commit: Option<String>,
    #[serde(default)]
    pub timeout_seconds: Option<i64>,
}

/// `GET /v1/hosts/{machine_id}/software`.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct HostSoftware {
    pub desired_commit: Option<String>,
    pub staged_commit: Option<String>,
    pub components: Vec<HostComponent>,
}

#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct HostComponent {
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub staged: bool,
}

/// One row of `GET /v1/machines`.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub machine_id: String,
    /// Decided by the controller only: at enrollment (the token's pool), by the pool bound in
    /// a hand-issued certificate, or by an operator (`PUT /v1/machines/{id}/pool`). `null`:
    /// in no pool until an operator moves it.
    pub pool_id: Option<String>,
    pub online: bool,
    pub last_seen: String,
    pub agent_version: String,
    /// As reported by the agent (hostname, OS, GPU): shown, never trusted for identity.
    pub facts: Option<HostFacts>,
    /// Serial (hex) and expiry of the certificate the machine last presented.
    #[serde(default)]
    pub certificate_serial: Option<String>,
    #[serde(default)]
    pub certificate_not_after: Option<String>,
    /// Two live agents present this identity (a cloned certificate): nothing new is
    /// dispatched to it until only one is left.
    #[serde(default)]
    pub identity_conflict: bool,
    /// The machine's images, once it has had any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<MachineImage>,
}

/// `POST /v1/enrollment-tokens`.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateEnrollmentToken {
    pub pool_id: String,
    /// How many machines may enroll with it; absent: any number until it expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses: Option<i64>,
    /// Default 86400 (one day); at most one year.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_seconds: Option<i64>,
}

/// One enrollment token, as listed (`GET /v1/enrollment-tokens`): never the secret.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct EnrollmentToken {
    pub token_id: String,
    pub pool_id: String,
    /// `null`: unlimited.
    pub uses_left: Option<u32>,
    pub expires_at: String,
    pub created_at: String,
    pub created_by: String,
}

/// The answer to `POST /v1/enrollment-tokens`: the only time the secret is shown.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct EnrollmentTokenCreated {
    pub token_id: String,
    /// `<token_id>.<secret>`, for the agents' `enrollment_token_file`.
    pub token: String,
    pub pool_id: String,
    pub uses_left: Option<u32>,
    pub expires_at: String,
}

/// `PUT /v1/machines/{machine_id}/pool`.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveMachine {
    pub pool_id: String,
}

/// The answer to `DELETE /v1/machines/{machine_id}`.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct Decommissioned {
    pub machine_id: String,
    /// The certificate serial revoked with it, if the machine ever presented one.
    pub revoked_serial: Option<String>,
    /// Assignments of this machine that ended `CANCELLED`.
    pub cancelled_assignments: u32,
}

/// `POST /v1/revocations`.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revoke {
    /// Hex serial, as `certificate_serial` shows it (colons and case are ignored).
    pub serial: String,
}

/// One revoked certificate (`GET /v1/revocations`).
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct Revocation {
    pub serial: String,
    pub revoked_at: String,
    pub revoked_by: String,
    /// The machine whose certificate it was, when the controller knows.
    pub machine_id: Option<String>,
}
