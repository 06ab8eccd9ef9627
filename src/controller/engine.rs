//! Task progression, always inside one store transaction: moving to the next batch or
//! halting (via the pure rules in `rollout`), pacing by waves and power slots, cancelling and
//! resuming, and ending an assignment (what `reports` does with agent events and silence).
//! Functions collect the machines whose long-polls must be woken; the caller wakes them
//! after the transaction commits.

use http::StatusCode;

use super::errors::ApiError;
use super::rollout::{
    decide, next_step, power_room, Halt, MachineState, Open, Rules, Step, TaskState,
};
use super::store::{Outcome, StoreError, TaskMachineRow, TaskRow, Tx};
use crate::proto::agent::PowerSpec;
use crate::proto::domain::{ErrorCode, TaskKind};

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
    #[error("task {task_id:?} is {state}: {why}")]
    NotResumable {
        task_id: String,
        state: TaskState,
        why: &'static str,
    },
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
            EngineError::NotCancellable { .. } | EngineError::NotResumable { .. } => ApiError::new(
                StatusCode::CONFLICT,
                ErrorCode::NotAllowedInCurrentState,
                msg,
            ),
        }
    }
}

/// Machine ids whose pending long-polls should be woken after commit.
pub type Wake = Vec<String>;

/// The rollout rules of a stored task.
pub fn rules(task: &TaskRow) -> Rules {
    let r = &task.rollout;
    Rules {
        gray_fail_threshold: task.gray_fail_threshold,
        // Only a gray batch gets a threshold (seed 002's default is 1; see `api`).
        has_gray: task.gray_fail_threshold.is_some(),
        wave: r.wave_limit,
        max_errors: r.error_limit,
        gray_accepted: r.gray_accepted,
        errors_accepted: r.errors_accepted,
    }
}

/// Whether the task's assignments carry a reboot or shutdown (what the power limits count).
fn has_power_step(task: &TaskRow) -> bool {
    task.power_json
        .as_deref()
        .and_then(|j| serde_json::from_str::<PowerSpec>(j).ok())
        .is_some_and(|p| p.has_power_step())
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
        if task.rollout.power_waiting.is_some() {
            tx.set_power_waiting(task_id, None)?;
        }
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
    let step = next_step(&states, &rules(&task));
    take_step(tx, &task, step, now_ms, wake)
}

/// Does what the rollout rules decided for an active task.
fn take_step(
    tx: &mut Tx<'_>,
    task: &TaskRow,
    step: Step,
    now_ms: i64,
    wake: &mut Wake,
) -> Result<(), StoreError> {
    let task_id = task.task_id.as_str();
    let waiting = match step {
        Step::Wait => task.rollout.power_waiting,
        Step::Dispatch { batch, up_to } => {
            let (ids, short) = dispatch(tx, task, batch, up_to, now_ms)?;
            if !ids.is_empty() || task.state == TaskState::Pending {
                tx.set_task_state(task_id, TaskState::Running, None)?;
            }
            wake.extend(ids);
            short.then_some(batch)
        }
        Step::Halt(why) => {
            let why = match (why, task.kind) {
                (Halt::GrayThreshold, TaskKind::ImageApply) => (
                    ErrorCode::StoppedOnFirstError,
                    "not started: the push stops on its first error (stop_on_first_error)",
                ),
                (
                    Halt::GrayThreshold,
                    TaskKind::ScriptExecution
                    | TaskKind::SoftwareStage
                    | TaskKind::ImageStage
                    | TaskKind::ImageRemove
                    | TaskKind::ImageRebuild,
                ) => (
                    ErrorCode::GrayThresholdReached,
                    "not started: the gray batch's failures reached gray_fail_threshold",
                ),
                (Halt::MaxErrors, _) => (
                    ErrorCode::MaxErrorsReached,
                    "not started: more machines failed than max_errors allows",
                ),
            };
            tx.set_machines_where(task_id, MachineState::Pending, MachineState::Skipped, why)?;
            // HALTED once no machine is at work any more (a max_errors halt may leave some
            // finishing; the last one's ending re-plans the task, which is then final).
            let at_work = tx
                .task_machines(task_id)?
                .iter()
                .any(|m| !m.state.is_final());
            if !at_work {
                tx.set_task_state(task_id, TaskState::Halted, Some(now_ms))?;
            }
            None
        }
        Step::Finish(state) => {
            tx.set_task_state(task_id, state, Some(now_ms))?;
            None
        }
    };
    if waiting != task.rollout.power_waiting {
        tx.set_power_waiting(task_id, waiting)?;
    }
    Ok(())
}

/// Dispatches up to `up_to` pending machines of `batch` (all when `None`), within the power
/// limits when the task's assignments carry a power step. Returns the machines dispatched,
/// and whether the power limits held some back (the task then waits for a slot).
fn dispatch(
    tx: &mut Tx<'_>,
    task: &TaskRow,
    batch: u32,
    up_to: Option<usize>,
    now_ms: i64,
) -> Result<(Vec<String>, bool), StoreError> {
    let task_id = task.task_id.as_str();
    if !has_power_step(task) {
        return Ok((
            tx.dispatch_some(task_id, batch, up_to, None, now_ms)?,
            false,
        ));
    }
    // Machines count against the pool they were in when the task was made; a rebuild's may
    // be in several, each with its own limit.
    let pools = if task.pool_id.is_empty() {
        tx.pending_power_pools(task_id, batch)?
    } else {
        vec![task.pool_id.clone()]
    };
    let mut ids = Vec::new();
    let mut short = false;
    for pool in pools {
        let global = match tx.power_limit() {
            Some(l) => Some((l, tx.power_at_work(None)?)),
            None => None,
        };
        let in_pool = match tx.pool_power_limit(&pool)? {
            Some(l) => Some((l, tx.power_at_work(Some(&pool))?)),
            None => None,
        };
        let want = up_to.map(|n| n.saturating_sub(ids.len()));
        if want == Some(0) {
            break;
        }
        let room = power_room(global, in_pool);
        let n = match (want, room) {
            (None, None) => None,
            (Some(a), None) | (None, Some(a)) => Some(a),
            (Some(a), Some(b)) => Some(a.min(b)),
        };
        let only = task.pool_id.is_empty().then_some(pool.as_str());
        let got = if n == Some(0) {
            Vec::new()
        } else {
            tx.dispatch_some(task_id, batch, n, only, now_ms)?
        };
        // Held back when the room, not the wave, was the bound and it was all used.
        if let Some(r) = room {
            if got.len() >= r && want.is_none_or(|w| r < w) {
                short = true;
            }
        }
        ids.extend(got);
    }
    Ok((ids, short))
}

/// Tasks examined when a power slot frees: the oldest waiting first. More waiting tasks than
/// this (each in a pool at its own limit) are reached by the reaper's tick, which looks at
/// [`POWER_WAITERS_PER_TICK`].
pub const POWER_WAITERS_PER_EVENT: usize = 16;
pub const POWER_WAITERS_PER_TICK: usize = 1000;

/// A machine with a power step ended (or a limit was raised): tasks whose machines wait for
/// a slot dispatch what now fits, oldest first, each by its O(1) refill.
pub fn release_power(
    tx: &mut Tx<'_>,
    tasks: usize,
    now_ms: i64,
    wake: &mut Wake,
) -> Result<(), StoreError> {
    for task_id in tx.power_waiting_tasks(tasks)? {
        let Some(task) = tx.task(&task_id)? else {
            continue;
        };
        match task.rollout.power_waiting {
            Some(batch) => refill(tx, &task, batch, now_ms, wake)?,
            None => continue,
        }
        if let Some(limit) = tx.power_limit() {
            if tx.power_at_work(None)? >= limit as usize {
                // The fleet-wide limit is reached: nobody else can start now.
                break;
            }
        }
    }
    Ok(())
}

/// Moves a task on after a machine of `batch` ended, in O(1) of the task's size: the counts
/// the rules need (machines at work in the batch, failures) come from the batch index, and
/// only a batch that is over re-plans the whole task ([`advance`]).
fn refill(
    tx: &mut Tx<'_>,
    task: &TaskRow,
    batch: u32,
    now_ms: i64,
    wake: &mut Wake,
) -> Result<(), StoreError> {
    let task_id = task.task_id.as_str();
    let held = task.kind == TaskKind::ImageApply && tx.task_held(task_id)?;
    if task.finished_ms.is_some() || held || !task.state.is_active() {
        if tx.batch_in_flight(task_id, batch)? {
            return Ok(());
        }
        return advance(tx, task_id, now_ms, wake);
    }
    let in_flight = tx.count_in_batch(
        task_id,
        batch,
        &[MachineState::Dispatched, MachineState::Running],
    )?;
    let has_pending = tx.batch_pending(task_id, batch)?;
    if !has_pending && in_flight == 0 {
        return advance(tx, task_id, now_ms, wake);
    }
    let failing = [MachineState::Failed, MachineState::TimedOut];
    let gray_failures = tx.count_in_batch(task_id, 0, &failing)?;
    let mut failures = gray_failures;
    for b in 1..=batch {
        failures += tx.count_in_batch(task_id, b, &failing)?;
    }
    let open = Open {
        batch,
        has_pending,
        in_flight,
    };
    let step = decide(open, failures, gray_failures, &rules(task));
    take_step(tx, task, step, now_ms, wake)
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

/// Continues a `HALTED` script execution after an operator looked (`POST
/// /v1/tasks/{task_id}/resume`): the machines its halt skipped are `PENDING` again, the
/// failures so far are accepted (the gray gate counts as passed, `max_errors` counts only
/// failures from now on), and the next batch or wave starts.
pub fn resume(
    tx: &mut Tx<'_>,
    task_id: &str,
    now_ms: i64,
    wake: &mut Wake,
) -> Result<TaskRow, EngineError> {
    let task = tx
        .task(task_id)?
        .ok_or_else(|| EngineError::UnknownTask(task_id.to_string()))?;
    let refuse = |why| EngineError::NotResumable {
        task_id: task_id.to_string(),
        state: task.state,
        why,
    };
    if task.state != TaskState::Halted {
        return Err(refuse("only a HALTED task can be resumed"));
    }
    if task.kind != TaskKind::ScriptExecution {
        // An image push's halt ends its pool operation, which has moved on already.
        return Err(refuse("only a script execution can be resumed"));
    }
    let machines = tx.task_machines(task_id)?;
    let failures = machines.iter().filter(|m| m.state.is_failure()).count();
    let gray_failures = machines
        .iter()
        .filter(|m| m.batch == 0 && m.state.is_failure())
        .count();
    let reopened = tx.unskip(
        task_id,
        &[ErrorCode::GrayThresholdReached, ErrorCode::MaxErrorsReached],
    )?;
    if reopened == 0 {
        return Err(refuse("no machine was left out by its halt"));
    }
    let gate_closed = task
        .gray_fail_threshold
        .is_some_and(|t| gray_failures >= t as usize);
    tx.set_accepted(
        task_id,
        task.rollout.gray_accepted || gate_closed,
        u32::try_from(failures).unwrap_or(u32::MAX),
    )?;
    tx.set_task_state(task_id, TaskState::Running, None)?;
    advance(tx, task_id, now_ms, wake)?;
    Ok(tx.task(task_id)?.unwrap_or(task))
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
    settle(tx, row, now_ms, wake)
}

/// A machine (`row`, as it was before it ended) has just ended. While other machines of its
/// batch are at work, the batch's outcome cannot change, so a task without rate controls is
/// not re-planned: an ending costs one index probe, not a read of the whole task (which made
/// a rollout, or a fleet going dark under the reaper, O(N^2)). The last machine of a batch
/// re-plans it. A paced task (waves, `max_errors`, waiting for a power slot) takes its next
/// step from index counts ([`refill`]); and an ending that frees a power slot lets the tasks
/// waiting for one go on ([`release_power`]).
pub(super) fn settle(
    tx: &mut Tx<'_>,
    row: &TaskMachineRow,
    now_ms: i64,
    wake: &mut Wake,
) -> Result<(), StoreError> {
    let (task_id, batch) = (row.task_id.as_str(), row.batch);
    let Some(task) = tx.task(task_id)? else {
        return Ok(());
    };
    let r = &task.rollout;
    let paced = r.wave_limit.is_some() || r.error_limit.is_some() || r.power_waiting.is_some();
    if paced {
        refill(tx, &task, batch, now_ms, wake)?;
    } else if !tx.batch_in_flight(task_id, batch)? {
        advance(tx, task_id, now_ms, wake)?;
    }
    // Only an ending from work frees a slot (a late result for a machine declared
    // unreachable does not: it was counted free then).
    let was_at_work = matches!(row.state, MachineState::Dispatched | MachineState::Running);
    if row.power_pool.is_some() && was_at_work {
        release_power(tx, POWER_WAITERS_PER_EVENT, now_ms, wake)?;
    }
    Ok(())
}
