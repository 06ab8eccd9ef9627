//! Scripts, script executions (with their rollout amounts) and tasks: what starts one and
//! every view of it (whole, as counts, a page of its machines).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::proto::domain::{BatchState, ErrorCode, MachineState, PowerPhase, TaskKind, TaskState};

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
