//! Task progression, always inside one store transaction: applying agent events exactly once,
//! moving to the next batch or halting (via the pure rules in `rollout`), cancelling, and
//! declaring silent machines unreachable. Functions collect the machines whose long-polls must be
//! woken; the caller wakes them after the transaction commits.

use http::StatusCode;

use super::errors::ApiError;
use super::rollout::{next_step, MachineState, Step, TaskState};
use super::store::{Outcome, StoreError, TaskMachineRow, TaskRow, Tx};
use crate::proto::agent::{AgentEvent, EventBody, PowerSpec};
use crate::proto::domain::{ErrorCode, LogoffPolicy, TaskKind};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("unknown assignment_id {0:?}")]
    UnknownAssignment(String),
    #[error("assignment {assignment_id:?} does not belong to machine {machine_id:?}")]
    NotYours {
        assignment_id: String,
        machine_id: String,
    },
    #[error("event {key:?}: {reason}")]
    BadEvent { key: String, reason: String },
    #[error("unknown task_id {0:?}")]
    UnknownTask(String),
    #[error("task {task_id:?} is {state} and can no longer be cancelled")]
    NotCancellable { task_id: String, state: TaskState },
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let msg = e.to_string();
        match e {
            EngineError::Store(s) => s.into(),
            EngineError::UnknownAssignment(_) => {
                ApiError::not_found(ErrorCode::AssignmentNotFound, msg)
            }
            EngineError::NotYours { .. } => {
                ApiError::new(StatusCode::FORBIDDEN, ErrorCode::Forbidden, msg)
            }
            EngineError::BadEvent { .. } => ApiError::invalid(msg),
            EngineError::UnknownTask(_) => ApiError::not_found(ErrorCode::TaskNotFound, msg),
            EngineError::NotCancellable { .. } => ApiError::new(
                StatusCode::CONFLICT,
                ErrorCode::NotAllowedInCurrentState,
                msg,
            ),
        }
    }
}

/// Machine ids whose pending long-polls should be woken after commit.
pub type Wake = Vec<String>;

/// What happened to one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Applied,
    Duplicate,
}

/// Brings an unfinished task forward as far as its machines allow.
pub fn advance(
    tx: &mut Tx<'_>,
    task_id: &str,
    now_ms: i64,
    wake: &mut Wake,
) -> Result<(), StoreError> {
    let Some(task) = tx.task(task_id)? else {
        return Ok(());
    };
    let held = task.kind == TaskKind::ImageApply && tx.task_held(task_id)?;
    if task.finished_ms.is_some() || held {
        // A held task is a push waiting for its start time (`images::reconcile` releases it).
        return Ok(());
    }
    let machines = tx.task_machines(task_id)?;
    let states: Vec<(u32, MachineState)> = machines.iter().map(|m| (m.batch, m.state)).collect();
    if !task.state.is_active() {
        // Cancelling: nothing new starts; the task is CANCELLED when the last agent has
        // answered.
        if states.iter().all(|(_, s)| s.is_final()) {
            let end = match task.state {
                TaskState::Cancelling => TaskState::Cancelled,
                other @ (TaskState::Pending
                | TaskState::Running
                | TaskState::Succeeded
                | TaskState::Failed
                | TaskState::Halted
                | TaskState::Cancelled) => other,
            };
            tx.set_task_state(task_id, end, Some(now_ms))?;
        }
        return Ok(());
    }
    match next_step(&states, task.gray_fail_threshold) {
        Step::Wait => {}
        Step::Dispatch(batch) => {
            let ids = tx.dispatch_batch(task_id, batch, now_ms)?;
            tx.set_task_state(task_id, TaskState::Running, None)?;
            wake.extend(ids);
        }
        Step::Halt => {
            let why = if task.kind == TaskKind::ImageApply {
                (
                    ErrorCode::StoppedOnFirstError,
                    "not started: the push stops on its first error (stop_on_first_error)",
                )
            } else {
                (
                    ErrorCode::GrayThresholdReached,
                    "not started: the gray batch's failures reached gray_fail_threshold",
                )
            };
            tx.set_machines_where(task_id, MachineState::Pending, MachineState::Skipped, why)?;
            tx.set_task_state(task_id, TaskState::Halted, Some(now_ms))?;
        }
        Step::Finish(state) => tx.set_task_state(task_id, state, Some(now_ms))?,
    }
    Ok(())
}

/// Applies one agent event from `machine_id` (the identity in its certificate).
pub fn apply_event(
    tx: &mut Tx<'_>,
    machine_id: &str,
    ev: &AgentEvent,
    now_ms: i64,
    wake: &mut Wake,
) -> Result<Applied, EngineError> {
    let row = tx
        .assignment(&ev.assignment_id)?
        .ok_or_else(|| EngineError::UnknownAssignment(ev.assignment_id.clone()))?;
    if row.machine_id != machine_id {
        return Err(EngineError::NotYours {
            assignment_id: ev.assignment_id.clone(),
            machine_id: machine_id.to_string(),
        });
    }
    let expected = |suffix: &str| format!("{}:{suffix}", ev.assignment_id);
    if let EventBody::Power(p) = &ev.body {
        let phases = ["REBOOTING", "REBOOTED", "SHUTTING_DOWN"];
        if !phases.contains(&p.phase.as_str())
            || ev.idempotency_key != expected(&format!("power:{}:{}", p.count, p.phase))
        {
            return Err(EngineError::BadEvent {
                key: ev.idempotency_key.clone(),
                reason: "a power event needs phase REBOOTING, REBOOTED or SHUTTING_DOWN and key \
                         <assignment_id>:power:<count>:<phase>"
                    .into(),
            });
        }
        if !tx.claim_event(machine_id, &ev.idempotency_key, now_ms)? {
            return Ok(Applied::Duplicate);
        }
        tx.set_power_state(&ev.assignment_id, p.phase, now_ms)?;
        tracing::info!(assignment_id = %ev.assignment_id, machine_id, phase = %p.phase, count = p.count, boot_id = %p.boot_id, "power step");
        return Ok(Applied::Applied);
    }
    if let EventBody::Progress(p) = &ev.body {
        // Progress is best effort and the newest wins, so it is not claimed as an event key.
        if ev.idempotency_key != expected(&format!("progress:{}", p.seq)) {
            return Err(EngineError::BadEvent {
                key: ev.idempotency_key.clone(),
                reason: "idempotency_key must be <assignment_id>:progress:<seq>".into(),
            });
        }
        if !row.state.is_final() {
            let json = serde_json::to_string(&p.components).unwrap_or_default();
            tx.set_progress(&ev.assignment_id, p.seq, &json)?;
        }
        return Ok(Applied::Applied);
    }
    let bad = |reason: String| EngineError::BadEvent {
        key: ev.idempotency_key.clone(),
        reason,
    };
    // Validate before claiming the key, so a rejected event can be fixed and resent.
    let result_state = match &ev.body {
        EventBody::Started | EventBody::Progress(_) | EventBody::Power(_) => None,
        // The wire type admits only final states (`RunState`).
        EventBody::Result(r) => Some(MachineState::from(r.state)),
    };
    let key_ok = match &ev.body {
        EventBody::Started => ev.idempotency_key == expected("started"),
        EventBody::Result(_) => ev.idempotency_key == expected("result"),
        EventBody::Progress(_) | EventBody::Power(_) => false,
    };
    if !key_ok {
        return Err(bad(
            "idempotency_key must be <assignment_id>:started or :result".into(),
        ));
    }
    if !tx.claim_event(machine_id, &ev.idempotency_key, now_ms)? {
        return Ok(Applied::Duplicate);
    }
    match (&ev.body, result_state) {
        (EventBody::Progress(_) | EventBody::Power(_), _) => {}
        (EventBody::Started, _) => {
            if !row.state.is_final() {
                tx.mark_running(&ev.assignment_id, &ev.at, now_ms)?;
            }
            // Dispatched and running are both "at work": nothing the task does next depends
            // on the difference.
            return Ok(Applied::Applied);
        }
        (EventBody::Result(r), Some(state)) => {
            // A machine already declared unreachable may still deliver its real result later;
            // the truth replaces the guess (the task's outcome, once decided, stands).
            let late_truth = row.state == MachineState::Failed
                && row.outcome.error_code == Some(ErrorCode::MachineUnreachable);
            if !row.state.is_final() || late_truth {
                let outcome = Outcome {
                    exit_code: r.exit_code,
                    stdout: r.stdout.clone(),
                    stderr: r.stderr.clone(),
                    output_truncated: r.output_truncated,
                    started_at: r.started_at.clone(),
                    finished_at: Some(r.finished_at.clone()),
                    error_code: r.error_code,
                    error_msg: r.error_msg.clone(),
                };
                tx.set_final(&ev.assignment_id, state, &outcome)?;
                if let (MachineState::Succeeded, Some(c)) = (state, &r.staged_commit) {
                    if let Ok(n) = c.parse::<i64>() {
                        tx.set_staged_commit(machine_id, n)?;
                    }
                }
            } else {
                tracing::warn!(
                    assignment_id = %ev.assignment_id,
                    machine_id,
                    state = %row.state,
                    "ignoring a result for a machine that is already final"
                );
            }
        }
        (EventBody::Result(_), None) => unreachable!("result_state is Some for every Result"),
    }
    settle(tx, &row.task_id, row.batch, now_ms, wake)?;
    Ok(Applied::Applied)
}

/// Cancels a task: machines not yet offered to an agent are cancelled now; the ones an agent
/// may hold are flagged, and their agents answer with a `CANCELLED` (or their real) result.
pub fn cancel(
    tx: &mut Tx<'_>,
    task_id: &str,
    now_ms: i64,
    wake: &mut Wake,
) -> Result<TaskRow, EngineError> {
    let task = tx
        .task(task_id)?
        .ok_or_else(|| EngineError::UnknownTask(task_id.to_string()))?;
    if !task.state.is_active() {
        return Err(EngineError::NotCancellable {
            task_id: task_id.to_string(),
            state: task.state,
        });
    }
    tx.set_machines_where(
        task_id,
        MachineState::Pending,
        MachineState::Cancelled,
        (
            ErrorCode::TaskCancelled,
            "not started: the task was cancelled",
        ),
    )?;
    wake.extend(tx.request_cancel(task_id)?);
    // CANCELLING until the last machine has ended; `advance` then makes it CANCELLED.
    tx.set_task_state(task_id, TaskState::Cancelling, None)?;
    advance(tx, task_id, now_ms, wake)?;
    Ok(tx.task(task_id)?.unwrap_or(task))
}

/// Declares machines that stayed silent past their deadline: a running machine after its
/// timeout plus `grace_ms`; a dispatched one when its agent has also been offline that long.
/// Time a machine may take beyond its script timeout for the power and logoff steps it
/// was asked for: each step may wait for sessions and then for a reboot.
pub fn power_allowance_ms(power_json: Option<&str>, reboot_grace_ms: i64) -> i64 {
    let Some(spec) = power_json.and_then(|j| serde_json::from_str::<PowerSpec>(j).ok()) else {
        return 0;
    };
    let steps = i64::from(spec.pre_start.is_some()) + i64::from(spec.post_finish.is_some());
    let logoff_s = if spec.logoff_policy == LogoffPolicy::ForceLogoff {
        spec.force_logoff_grace_seconds + 30
    } else {
        spec.logoff_timeout_seconds
    };
    steps * (logoff_s as i64 * 1000 + reboot_grace_ms)
}

pub fn reap(
    tx: &mut Tx<'_>,
    now_ms: i64,
    grace_ms: i64,
    offline_ms: i64,
    reboot_grace_ms: i64,
    wake: &mut Wake,
) -> Result<Vec<TaskMachineRow>, StoreError> {
    let mut reaped = Vec::new();
    for f in tx.in_flight()? {
        let (row, timeout_s) = (f.row, f.timeout_seconds);
        // An image apply runs up to three hooks (activate, health check, verify), a rebuild
        // also stages; each may take the whole timeout.
        let runs = match f.kind {
            TaskKind::ImageApply => 3,
            TaskKind::ImageRebuild => 4,
            TaskKind::ScriptExecution
            | TaskKind::SoftwareStage
            | TaskKind::ImageStage
            | TaskKind::ImageRemove => 1,
        };
        let mut budget = runs * timeout_s as i64 * 1000
            + grace_ms
            + power_allowance_ms(f.power_json.as_deref(), reboot_grace_ms);
        // A power step announced late in the run (e.g. exit code 194) extends the deadline
        // by one reboot from the announcement.
        if let (Some(p), Some(start)) = (row.power_ms, row.started_received_ms) {
            budget = budget.max(p - start + reboot_grace_ms + grace_ms);
        }
        let overdue = match row.state {
            MachineState::Running => row.started_received_ms.is_some_and(|t| now_ms > t + budget),
            MachineState::Dispatched => {
                let last_seen = tx.machine_last_seen(&row.machine_id)?.unwrap_or(0);
                now_ms - last_seen > offline_ms
                    && row.dispatched_ms.is_some_and(|t| now_ms > t + budget)
            }
            MachineState::Pending
            | MachineState::Succeeded
            | MachineState::Failed
            | MachineState::TimedOut
            | MachineState::Skipped
            | MachineState::Cancelled => false,
        };
        if !overdue {
            continue;
        }
        let (state, code, msg) = if row.cancel_requested {
            (
                MachineState::Cancelled,
                None,
                "cancelled; the agent did not confirm before its deadline".to_string(),
            )
        } else {
            (
                MachineState::Failed,
                Some(ErrorCode::MachineUnreachable),
                format!(
                    "machine {} sent no result within its timeout ({timeout_s} s) plus {} s grace",
                    row.machine_id,
                    grace_ms / 1000
                ),
            )
        };
        let outcome = Outcome {
            started_at: row.outcome.started_at.clone(),
            error_code: code,
            error_msg: Some(msg),
            ..Outcome::default()
        };
        end_assignment(tx, &row, state, &outcome, now_ms, wake)?;
        reaped.push(row);
    }
    Ok(reaped)
}

/// Ends one machine's assignment without word from its agent (the reaper, a decommission)
/// and moves its task on.
pub fn end_assignment(
    tx: &mut Tx<'_>,
    row: &TaskMachineRow,
    state: MachineState,
    outcome: &Outcome,
    now_ms: i64,
    wake: &mut Wake,
) -> Result<(), StoreError> {
    tx.set_final(&row.assignment_id, state, outcome)?;
    settle(tx, &row.task_id, row.batch, now_ms, wake)
}

/// A machine of `batch` has just ended. While other machines of its batch are at work, the
/// batch's outcome cannot change, so the task is not re-planned: an ending costs one index
/// probe, not a read of the whole task (which made a rollout, or a fleet going dark under
/// the reaper, O(N^2)). The last machine of a batch re-plans it.
fn settle(
    tx: &mut Tx<'_>,
    task_id: &str,
    batch: u32,
    now_ms: i64,
    wake: &mut Wake,
) -> Result<(), StoreError> {
    if tx.batch_in_flight(task_id, batch)? {
        return Ok(());
    }
    advance(tx, task_id, now_ms, wake)
}
