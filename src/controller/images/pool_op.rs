//! A pool's image operation, moved on from its tasks' states ([`reconcile`]): in the same
//! transaction as every event that could change them ([`observe`]), and on a timer for a
//! push's start time ([`tick`]).

use super::*;
use crate::controller::engine;
use crate::controller::store::{StoreError, TaskRow, Tx};
use crate::proto::agent::{EventBody, ImageAssignment};
use crate::proto::domain::{
    CurrentImageState, ErrorCode, MachineState, PendingImageState, PoolOperation, RunState,
    TaskKind, TaskState,
};

/// A push whose staging failed ends here: each machine of the apply task that never started
/// fails with the staging error (its own, or the first one), so the operator's task says why.
fn fail_unstarted(
    tx: &mut Tx<'_>,
    stage_id: &str,
    apply_id: &str,
    now_ms: i64,
    wake: &mut engine::Wake,
) -> Result<(), StoreError> {
    let failures: Vec<(String, Option<ErrorCode>, Option<String>)> = tx
        .task_machines(stage_id)?
        .into_iter()
        .filter(|m| m.state != MachineState::Succeeded)
        .map(|m| (m.machine_id, m.outcome.error_code, m.outcome.error_msg))
        .collect();
    for m in tx.task_machines(apply_id)? {
        if m.state.is_final() {
            continue;
        }
        let why = failures
            .iter()
            .find(|f| f.0 == m.machine_id)
            .or(failures.first());
        let (code, msg) = match why {
            Some((id, code, msg)) => (
                code.unwrap_or(ErrorCode::StagingFailed),
                format!(
                    "staging the image failed on {id}: {}",
                    msg.as_deref().unwrap_or("no message")
                ),
            ),
            None => (ErrorCode::StagingFailed, "staging the image failed".into()),
        };
        let outcome = crate::controller::store::Outcome {
            error_code: Some(code),
            error_msg: Some(msg),
            ..Default::default()
        };
        tx.set_final(&m.assignment_id, MachineState::Failed, &outcome)?;
    }
    engine::advance(tx, apply_id, now_ms, wake)
}

fn any_started(tx: &mut Tx<'_>, task_id: &str) -> Result<bool, StoreError> {
    Ok(tx
        .task_machines(task_id)?
        .iter()
        .any(|m| m.state == MachineState::Running || m.state.is_final()))
}

fn finished(tx: &mut Tx<'_>, task_id: Option<&str>) -> Result<Option<TaskState>, StoreError> {
    let Some(id) = task_id else {
        return Ok(Some(TaskState::Succeeded));
    };
    Ok(tx
        .task(id)?
        .filter(|t| t.finished_ms.is_some())
        .map(|t| t.state))
}

/// Moves a pool's image operation forward from its tasks' states. Idempotent; called in
/// the transaction of every event of an image task, and on a timer (start times).
pub fn reconcile(
    tx: &mut Tx<'_>,
    pool_id: &str,
    now_ms: i64,
    wake: &mut engine::Wake,
) -> Result<(), StoreError> {
    let Some(mut op) = tx.pool_image(pool_id)? else {
        return Ok(());
    };
    let before = op.clone();
    if is_push(op.operation) {
        let stage_id = op.stage_task_id.clone().unwrap_or_default();
        if op.pending_state == Some(PendingImageState::PendingPublish)
            && any_started(tx, &stage_id)?
        {
            op.pending_state = Some(PendingImageState::Publishing);
        }
        match finished(tx, Some(&stage_id))? {
            Some(TaskState::Succeeded) if !op.released => {
                op.pending_state = Some(PendingImageState::Ready)
            }
            Some(_) if !op.released => {
                // Staging failed somewhere: the push ends here and nothing is applied.
                op.pending_state = Some(PendingImageState::Failed);
                op.released = true;
                op.operation = PoolOperation::None;
                tx.put_pool_image(&op)?;
                if let Some(apply) = &op.apply_task_id {
                    fail_unstarted(tx, &stage_id, apply, now_ms, wake)?;
                }
                tracing::warn!(pool_id, image_id = ?op.pending_image_id, "staging failed; push ended");
                return Ok(());
            }
            _ => {}
        }
        let due = op.start_ms.is_some_and(|t| now_ms >= t);
        if !op.released && op.pending_state == Some(PendingImageState::Ready) && due {
            op.released = true;
            // Saved first: `advance` refuses a held task.
            tx.put_pool_image(&op)?;
            if let Some(apply) = &op.apply_task_id {
                engine::advance(tx, apply, now_ms, wake)?;
            }
            tracing::info!(pool_id, task_id = ?op.apply_task_id, "push started");
        }
        if op.released {
            if let Some(state) = finished(tx, op.apply_task_id.as_deref())? {
                if state == TaskState::Succeeded && !op.selective {
                    op.current_image_id = op.pending_image_id.take();
                    op.current_state = Some(CurrentImageState::Ready);
                    op.pending_state = None;
                } else if state != TaskState::Succeeded {
                    op.pending_state = Some(PendingImageState::Failed);
                }
                // A selective push keeps the image pending (seed 000: "held as a pending
                // image"); the machines it reached run it.
                op.operation = PoolOperation::None;
                tracing::info!(pool_id, task_id = ?op.apply_task_id, %state, "push ended");
            }
        }
    } else if op.operation == PoolOperation::CancelScheduledPushImage {
        let stage_done = finished(tx, op.stage_task_id.as_deref())?.is_some();
        if stage_done && finished(tx, op.remove_task_id.as_deref())?.is_some() {
            op.operation = PoolOperation::None;
            op.pending_image_id = None;
            op.pending_state = None;
        }
    } else if op.operation == PoolOperation::FinalUnpublish {
        let remove = op.remove_task_id.clone().unwrap_or_default();
        if op.current_state == Some(CurrentImageState::PendingUnpublish)
            && any_started(tx, &remove)?
        {
            op.current_state = Some(CurrentImageState::Unpublishing);
        }
        match finished(tx, Some(&remove))? {
            Some(TaskState::Succeeded) => {
                op.operation = PoolOperation::None;
                op.current_image_id = None;
                op.current_state = None;
                op.pending_image_id = None;
                op.pending_state = None;
            }
            Some(_) => {
                op.operation = PoolOperation::None;
                op.current_state = Some(CurrentImageState::Failed);
            }
            None => {}
        }
    }
    if op != before {
        tx.put_pool_image(&op)?;
    }
    Ok(())
}

/// Keeps a machine's image states in step with an event of an image task, then moves the
/// pool's operation on. The agent's own record, attached to each image result, is the truth;
/// only the start of staging is known here first.
pub fn observe(
    tx: &mut Tx<'_>,
    task: &TaskRow,
    assignment_id: &str,
    machine_id: &str,
    body: Option<&EventBody>,
    now_ms: i64,
    wake: &mut engine::Wake,
) -> Result<(), StoreError> {
    match task.kind {
        TaskKind::ImageStage
        | TaskKind::ImageApply
        | TaskKind::ImageRemove
        | TaskKind::ImageRebuild => {}
        TaskKind::ScriptExecution | TaskKind::SoftwareStage => return Ok(()),
    }
    if let Some(body) = body {
        let mut m = tx.machine_image(machine_id)?;
        let before = m.clone();
        match body {
            EventBody::Started if task.kind == TaskKind::ImageStage => {
                m.pending_state = Some(PendingImageState::Publishing);
            }
            EventBody::Result(r) => {
                if let Some(rec) = &r.image {
                    m.current_image_id = rec.current_image_id.clone();
                    m.current_state = rec.current_image_state;
                    m.pending_image_id = rec.pending_image_id.clone();
                    m.pending_state = rec.pending_image_state;
                }
                let own = tx.assignment_payload(assignment_id)?;
                let img: Option<ImageAssignment> =
                    serde_json::from_str(own.as_deref().unwrap_or(&task.scripts_json)).ok();
                if let Some(lang) = img
                    .and_then(|i| i.language)
                    .filter(|_| r.state == RunState::Succeeded)
                {
                    m.language = Some(lang);
                }
            }
            EventBody::Started | EventBody::Progress(_) | EventBody::Power(_) => {}
        }
        if m != before {
            tx.put_machine_image(&m)?;
        }
    }
    reconcile(tx, &task.pool_id, now_ms, wake)
}

/// Every pool with an operation in progress, for the timer.
pub fn tick(tx: &mut Tx<'_>, now_ms: i64, wake: &mut engine::Wake) -> Result<(), StoreError> {
    for op in tx.busy_pool_images()? {
        reconcile(tx, &op.pool_id, now_ms, wake)?;
    }
    Ok(())
}
