//! Operator API bodies (`/v1/...`): snake_case JSON, field names taken from the seed pages.

use serde::{Deserialize, Serialize};

use super::agent::HostFacts;

/// Every error response: `{error_code, error_msg}` with the matching HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error_code: String,
    pub error_msg: String,
}

/// `POST /v1/scripts`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateScript {
    pub name: String,
    pub command_type: String,
    pub content: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScriptCreated {
    pub script_id: String,
    pub sha256: String,
}

/// `POST /v1/pools/{pool_id}/script-executions` (seed 002). Integers are signed on the wire so
/// that a negative value gets our own error naming the field rather than a serde message.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateScriptExecution {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script_ids: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gray_count: Option<i64>,
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskCreated {
    pub task_id: String,
}

/// `GET /v1/tasks/{task_id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Task {
    pub task_id: String,
    pub kind: String,
    pub pool_id: String,
    pub state: String,
    pub created_at: String,
    pub finished_at: Option<String>,
    pub batches: Vec<Batch>,
    pub machines: Vec<TaskMachine>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Batch {
    pub index: u32,
    pub machine_ids: Vec<String>,
    pub state: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskMachine {
    pub machine_id: String,
    pub batch: u32,
    pub state: String,
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub output_truncated: bool,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub error_code: Option<String>,
    pub error_msg: Option<String>,
}

/// One row of `GET /v1/machines`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub machine_id: String,
    pub pool_id: String,
    pub online: bool,
    pub last_seen: String,
    pub agent_version: String,
    pub facts: Option<HostFacts>,
}
