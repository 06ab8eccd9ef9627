//! The rows the store hands out (tasks, their machines, scripts, what is in flight), and
//! how a task's and a task machine's columns are read back, with the texts that must parse
//! as domain enums checked ([`StoreError::Corrupt`] otherwise).

use super::sql::{Row, SqlResult};
use super::StoreError;
use crate::proto::api::Amount;
use crate::proto::domain::{ErrorCode, MachineState, PowerPhase, TaskKind, TaskState};

#[derive(Debug, Clone, PartialEq)]
pub struct MachineRow {
    pub machine_id: String,
    /// `None`: in no pool (a hand-issued certificate without `--pool`, until an operator
    /// moves it).
    pub pool_id: Option<String>,
    pub agent_version: String,
    pub last_seen_ms: i64,
    pub facts_json: Option<String>,
    /// The certificate the machine last presented (or was enrolled with).
    pub cert_serial: Option<String>,
    pub cert_not_after_ms: Option<i64>,
    /// Set while two live sessions present this identity.
    pub conflict_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptRow {
    pub script_id: String,
    pub name: String,
    pub command_type: String,
    pub content: String,
    pub sha256: String,
    pub created_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRow {
    pub task_id: String,
    pub kind: TaskKind,
    pub pool_id: String,
    pub state: TaskState,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
    pub gray_fail_threshold: Option<u32>,
    pub timeout_seconds: u64,
    /// `Vec<proto::agent::ScriptPayload>` as JSON: the scripts as they were when the task was
    /// created, so later edits never change a running task.
    pub scripts_json: String,
    /// `proto::agent::PowerSpec` as JSON, for script executions.
    pub power_json: Option<String>,
    /// The operator whose request made it (`None`: before version 4, or the controller's
    /// own doing).
    pub created_by: Option<String>,
    /// The operator who cancelled it.
    pub cancelled_by: Option<String>,
    /// Rate controls, retry and resume (schema version 5).
    pub rollout: RolloutRow,
}

/// A task's rate controls and what resumes accepted (schema version 5); all unset for the
/// kinds that have none.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RolloutRow {
    /// As the request gave them, for the view and for a retry (which resolves them again).
    pub gray_count: Option<Amount>,
    pub max_concurrency: Option<Amount>,
    pub max_errors: Option<Amount>,
    /// `max_concurrency` and `max_errors` resolved against this task's machines.
    pub wave_limit: Option<u32>,
    pub error_limit: Option<u32>,
    /// An operator resumed the task after its gray batch halted it: the gate is passed.
    pub gray_accepted: bool,
    /// Failures counted when the task was last resumed; `max_errors` counts the ones after.
    pub errors_accepted: u32,
    pub retry_of: Option<String>,
    /// The batch that has machines waiting only for a power slot.
    pub power_waiting: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outcome {
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub output_truncated: bool,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub error_code: Option<ErrorCode>,
    pub error_msg: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskMachineRow {
    pub task_id: String,
    pub machine_id: String,
    pub assignment_id: String,
    pub batch: u32,
    pub state: MachineState,
    pub delivered: bool,
    pub cancel_requested: bool,
    pub dispatched_ms: Option<i64>,
    pub started_received_ms: Option<i64>,
    pub outcome: Outcome,
    /// Latest `proto::agent::Progress` components as JSON, if any arrived.
    pub progress_json: Option<String>,
    /// The last power step the agent announced, and when it arrived.
    pub power_state: Option<PowerPhase>,
    pub power_ms: Option<i64>,
    /// The pool this machine counts against while at work, when its assignment carries a
    /// reboot or shutdown (the power limits); `None` without a power step.
    pub power_pool: Option<String>,
}

/// A machine an agent holds (dispatched or running), with what its deadline depends on.
#[derive(Debug, Clone)]
pub struct InFlight {
    pub row: TaskMachineRow,
    pub timeout_seconds: u64,
    pub power_json: Option<String>,
    /// The task's kind.
    pub kind: TaskKind,
}

/// Dispatched assignments (with their task) and cancellations an agent has not acknowledged.
pub type Undelivered = (Vec<(TaskMachineRow, TaskRow)>, Vec<String>);

pub(super) fn machine_state(s: String) -> Result<MachineState, StoreError> {
    MachineState::parse(&s).ok_or(StoreError::Corrupt {
        what: "machine state",
        value: s,
    })
}

/// A task row and the texts [`finish_task`] checks: its state and its three amounts.
pub(super) type RawTask = (TaskRow, String, [Option<String>; 3]);

pub(super) fn task_row(r: &Row) -> SqlResult<RawTask> {
    let state: String = r.get(3)?;
    let amounts = [r.get(12)?, r.get(13)?, r.get(14)?];
    Ok((
        TaskRow {
            task_id: r.get(0)?,
            kind: r.get(1)?,
            pool_id: r.get(2)?,
            state: TaskState::Pending,
            created_ms: r.get(4)?,
            finished_ms: r.get(5)?,
            gray_fail_threshold: r.get::<_, Option<i64>>(6)?.map(|v| v as u32),
            timeout_seconds: r.get::<_, i64>(7)? as u64,
            scripts_json: r.get(8)?,
            power_json: r.get(9)?,
            created_by: r.get(10)?,
            cancelled_by: r.get(11)?,
            rollout: RolloutRow {
                gray_count: None,
                max_concurrency: None,
                max_errors: None,
                wave_limit: r.get::<_, Option<i64>>(15)?.map(|v| v as u32),
                error_limit: r.get::<_, Option<i64>>(16)?.map(|v| v as u32),
                gray_accepted: r.get::<_, i64>(17)? != 0,
                errors_accepted: r.get::<_, i64>(18)? as u32,
                retry_of: r.get(19)?,
                power_waiting: r.get::<_, Option<i64>>(20)?.map(|v| v as u32),
            },
        },
        state,
        amounts,
    ))
}

pub(super) const TASK_COLS: &str = "task_id, kind, pool_id, state, created_ms, finished_ms, \
                         gray_fail_threshold, timeout_seconds, scripts_json, power_json, \
                         created_by, cancelled_by, \
                         gray_count, max_concurrency, max_errors, wave_limit, error_limit, \
                         gray_accepted, errors_accepted, retry_of, power_waiting";
pub(super) const TM_COLS: &str = "task_id, machine_id, assignment_id, batch, state, delivered, \
    cancel_requested, dispatched_ms, started_received_ms, exit_code, stdout, stderr, \
    output_truncated, started_at, finished_at, error_code, error_msg, progress_json, \
    power_state, power_ms, power_pool";

pub(super) fn tm_row(r: &Row) -> SqlResult<(TaskMachineRow, String)> {
    let state: String = r.get(4)?;
    Ok((
        TaskMachineRow {
            task_id: r.get(0)?,
            machine_id: r.get(1)?,
            assignment_id: r.get(2)?,
            batch: r.get::<_, i64>(3)? as u32,
            state: MachineState::Pending,
            delivered: r.get::<_, i64>(5)? != 0,
            cancel_requested: r.get::<_, i64>(6)? != 0,
            dispatched_ms: r.get(7)?,
            started_received_ms: r.get(8)?,
            outcome: Outcome {
                exit_code: r.get::<_, Option<i64>>(9)?.map(|v| v as i32),
                stdout: r.get(10)?,
                stderr: r.get(11)?,
                output_truncated: r.get::<_, i64>(12)? != 0,
                started_at: r.get(13)?,
                finished_at: r.get(14)?,
                error_code: r.get(15)?,
                error_msg: r.get(16)?,
            },
            progress_json: r.get(17)?,
            power_state: r.get(18)?,
            power_ms: r.get(19)?,
            power_pool: r.get(20)?,
        },
        state,
    ))
}

pub(super) fn finish_task(raw: RawTask) -> Result<TaskRow, StoreError> {
    let (mut t, s, [gray, wave, errors]) = raw;
    t.state = TaskState::parse(&s).ok_or(StoreError::Corrupt {
        what: "task state",
        value: s,
    })?;
    let amount = |text: Option<String>| match text {
        None => Ok(None),
        Some(v) => Amount::parse(&v).map(Some).ok_or(StoreError::Corrupt {
            what: "task amount",
            value: v,
        }),
    };
    t.rollout.gray_count = amount(gray)?;
    t.rollout.max_concurrency = amount(wave)?;
    t.rollout.max_errors = amount(errors)?;
    Ok(t)
}

pub(super) fn finish_tm(pair: (TaskMachineRow, String)) -> Result<TaskMachineRow, StoreError> {
    let (mut t, s) = pair;
    t.state = machine_state(s)?;
    Ok(t)
}
