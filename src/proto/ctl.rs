//! The operator CLI's side of the operator API: the requests it sends that `api` has no type
//! for yet (a script execution with `max_concurrency`, `max_errors` and a percentage
//! `gray_count`), and its views of the listing routes (`GET /v1/tasks`, `/v1/pools`,
//! `/v1/scripts`). The views ignore fields they do not know (no `deny_unknown_fields`), so
//! a newer controller's additions never break an older CLI.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::domain::{
    CurrentImageState, LogoffPolicy, MachineState, PendingImageState, PoolOperation, PostFinish,
    PreStart, TaskKind, TaskState,
};

/// The header that carries the next page's cursor of a listing.
pub const NEXT_CURSOR_HEADER: &str = "fieldhand-next-cursor";

/// A count of machines, or a percentage of the pool: `3` or `"10%"` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Amount {
    Count(u64),
    /// 1..=100.
    Percent(u8),
}

impl FromStr for Amount {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is neither a count (3) nor a percentage (10%)");
        match s.strip_suffix('%') {
            Some(p) => match p.parse::<u8>() {
                Ok(n) if (1..=100).contains(&n) => Ok(Amount::Percent(n)),
                Ok(_) | Err(_) => Err(format!("{s:?}: a percentage must be 1% to 100%")),
            },
            None => match s.parse::<u64>() {
                Ok(n) if n >= 1 => Ok(Amount::Count(n)),
                Ok(_) => Err(format!("{s:?}: a count must be at least 1")),
                Err(_) => Err(bad()),
            },
        }
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Amount::Count(n) => write!(f, "{n}"),
            Amount::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serialize for Amount {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Amount::Count(n) => s.serialize_u64(*n),
            Amount::Percent(_) => s.serialize_str(&self.to_string()),
        }
    }
}

/// `POST /v1/pools/{pool_id}/script-executions` as the CLI sends it: seed 002's fields, plus
/// `max_concurrency` and `max_errors`, and `gray_count` as a count or a percentage.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ScriptExecutionRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub script_ids: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command_content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gray_count: Option<Amount>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gray_desktop_ids: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gray_fail_threshold: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<Amount>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_errors: Option<Amount>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pre_start: Option<PreStart>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub post_finish: Option<PostFinish>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub execution_timeout_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logoff_policy: Option<LogoffPolicy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logoff_timeout_seconds: Option<u64>,
}

/// One row of `GET /v1/tasks`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskSummary {
    pub task_id: String,
    pub kind: TaskKind,
    #[serde(default)]
    pub pool_id: Option<String>,
    pub state: TaskState,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub finished_at: Option<String>,
    #[serde(default)]
    pub created_by: Option<String>,
    #[serde(default)]
    pub cancelled_by: Option<String>,
    /// Machines by state, e.g. `{"SUCCEEDED": 3, "FAILED": 1}`.
    #[serde(default)]
    pub machine_states: BTreeMap<MachineState, u64>,
}

/// A pool's provisioning status as the pool views carry it (seed 001 names); every field
/// optional, so a pool that never had an image reads as empty.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PoolProvisioning {
    #[serde(default)]
    pub operation: Option<PoolOperation>,
    #[serde(default)]
    pub current_image_id: Option<String>,
    #[serde(default)]
    pub current_image_state: Option<CurrentImageState>,
    #[serde(default)]
    pub pending_image_id: Option<String>,
    #[serde(default)]
    pub pending_image_state: Option<PendingImageState>,
    #[serde(default)]
    pub pending_image_progress: Option<u32>,
    #[serde(default)]
    pub start_time: Option<i64>,
    #[serde(default)]
    pub task_id: Option<String>,
}

/// One row of `GET /v1/pools`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolSummary {
    pub pool_id: String,
    /// How many machines are in it.
    pub machines: u64,
    pub online: u64,
    #[serde(default)]
    pub provisioning: Option<PoolProvisioning>,
}

/// `GET /v1/pools/{pool_id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolDetail {
    pub pool_id: String,
    /// The member machine ids.
    pub machines: Vec<String>,
    pub online: u64,
    #[serde(default)]
    pub provisioning: Option<PoolProvisioning>,
}

/// One row of `GET /v1/scripts`, and `GET /v1/scripts/{id}` (with `content`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScriptView {
    pub script_id: String,
    pub name: String,
    pub command_type: String,
    pub sha256: String,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub content: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_go_out_as_number_or_percent_string() {
        let r = ScriptExecutionRequest {
            gray_count: Some("10%".parse().unwrap()),
            max_concurrency: Some("3".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({"gray_count": "10%", "max_concurrency": 3})
        );
        for bad in ["0", "0%", "101%", "x", "-1", "5 %"] {
            assert!(bad.parse::<Amount>().is_err(), "{bad}");
        }
    }

    #[test]
    fn views_ignore_unknown_fields() {
        let t: TaskSummary = serde_json::from_value(serde_json::json!({
            "task_id": "t", "kind": "script_execution", "pool_id": "p", "state": "RUNNING",
            "created_at": "2026-01-01T00:00:00Z", "machine_states": {"SUCCEEDED": 2},
            "something_new": [1, 2]
        }))
        .unwrap();
        assert_eq!(t.machine_states.get(&MachineState::Succeeded), Some(&2));
    }
}
