//! The agent protocol handlers (`/agent/v1/...`). The machine id always comes from the verified
//! certificate, so an agent can only ever see and report its own assignments.

use std::time::Duration;

use super::api::{parse_json, ApiError};
use super::engine::{self, Applied};
use super::store::{StoreError, TaskMachineRow, TaskRow};
use super::Controller;
use crate::proto::agent::{
    Assignment, AssignmentKind, EventBatch, EventsApplied, Heartbeat, PollRequest, PollResponse,
    ScriptPayload, StagePayload,
};
use crate::sys::clock;

/// Upper bound on how long a poll may be held, whatever the agent asks for.
const MAX_WAIT: Duration = Duration::from_secs(60);

fn now_ms() -> i64 {
    clock::unix_ms(clock::now())
}

fn check_pool(pool_id: &str) -> Result<(), ApiError> {
    crate::pki::validate_name("pool_id", pool_id).map_err(|e| ApiError::invalid(e.to_string()))
}

/// Builds the wire assignment from its rows. `scripts_json` holds the task's frozen payload:
/// the scripts of a script execution, the (signed) `StagePayload` of a software stage, or
/// the `ImageAssignment` of an image task; `own` is a payload of this assignment alone
/// (a rebuild's machines each get their own image and data rule).
pub fn assignment_of(
    row: &TaskMachineRow,
    task: &TaskRow,
    own: Option<&str>,
) -> Result<Assignment, StoreError> {
    let corrupt = |e: serde_json::Error| StoreError::Corrupt {
        what: "task payload",
        value: format!("{}: {e}", task.task_id),
    };
    let mut image = None;
    let (kind, scripts, stage) = if task.kind == crate::controller::software::TASK_KIND {
        let stage: StagePayload = serde_json::from_str(&task.scripts_json).map_err(corrupt)?;
        (AssignmentKind::SoftwareStage, Vec::new(), Some(stage))
    } else if let Some(kind) = crate::controller::images::assignment_kind(&task.kind) {
        let json = own.unwrap_or(&task.scripts_json);
        image = Some(serde_json::from_str(json).map_err(corrupt)?);
        (kind, Vec::new(), None)
    } else {
        let scripts: Vec<ScriptPayload> =
            serde_json::from_str(&task.scripts_json).map_err(corrupt)?;
        (AssignmentKind::ScriptExecution, scripts, None)
    };
    Ok(Assignment {
        assignment_id: row.assignment_id.clone(),
        task_id: task.task_id.clone(),
        kind,
        scripts,
        timeout_seconds: task.timeout_seconds,
        stage,
        power: match &task.power_json {
            Some(j) => Some(serde_json::from_str(j).map_err(corrupt)?),
            None => None,
        },
        image,
    })
}

pub async fn heartbeat(ctl: &Controller, machine_id: String, body: &[u8]) -> Result<(), ApiError> {
    let hb: Heartbeat = parse_json(body)?;
    check_pool(&hb.pool_id)?;
    let facts = serde_json::to_string(&hb.facts).ok();
    let now = now_ms();
    ctl.store
        .tx(move |tx| {
            tx.upsert_machine(
                &machine_id,
                &hb.pool_id,
                &hb.agent_version,
                now,
                facts.as_deref(),
            )
            .map_err(ApiError::from)
        })
        .await
}

/// Long-poll: answers at once when something is waiting for this machine, otherwise as soon as
/// something is dispatched or cancelled for it, or after `wait_ms`.
pub async fn poll(
    ctl: &Controller,
    machine_id: String,
    body: &[u8],
) -> Result<PollResponse, ApiError> {
    let req: PollRequest = parse_json(body)?;
    check_pool(&req.pool_id)?;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(req.wait_ms).min(MAX_WAIT);
    let notify = ctl.waiter(&machine_id);
    let mut shutdown = ctl.shutdown.clone();
    let mut first = true;
    loop {
        // Armed before the query, so a dispatch that lands between query and wait still wakes us.
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let (m, r) = (machine_id.clone(), req.clone());
        let ack = first;
        first = false;
        let now = now_ms();
        let (rows, cancels) = ctl
            .store
            .tx(move |tx| {
                tx.upsert_machine(&m, &r.pool_id, &r.agent_version, now, None)?;
                if ack {
                    tx.ack(&m, &r.ack_assignments, &r.ack_cancels)?;
                }
                let (rows, cancels) = tx.undelivered_for(&m)?;
                let mut out = Vec::with_capacity(rows.len());
                for (row, task) in &rows {
                    let own = tx.assignment_payload(&row.assignment_id)?;
                    out.push(assignment_of(row, task, own.as_deref())?);
                }
                Ok::<_, ApiError>((out, cancels))
            })
            .await?;
        if !rows.is_empty() || !cancels.is_empty() {
            return Ok(PollResponse {
                assignments: rows,
                cancels,
            });
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(deadline) => return Ok(PollResponse::default()),
            _ = shutdown.changed() => return Ok(PollResponse::default()),
        }
    }
}

pub async fn events(
    ctl: &Controller,
    machine_id: String,
    body: &[u8],
) -> Result<EventsApplied, ApiError> {
    let batch: EventBatch = parse_json(body)?;
    let now = now_ms();
    let (out, wake) = ctl
        .store
        .tx(move |tx| {
            let mut out = EventsApplied::default();
            let mut wake = Vec::new();
            for ev in &batch.events {
                match engine::apply_event(tx, &machine_id, ev, now, &mut wake)? {
                    Applied::Applied => out.applied += 1,
                    Applied::Duplicate => out.duplicates += 1,
                }
            }
            Ok::<_, ApiError>((out, wake))
        })
        .await?;
    ctl.wake(&wake);
    Ok(out)
}

pub async fn get_assignment(
    ctl: &Controller,
    machine_id: String,
    assignment_id: String,
) -> Result<Assignment, ApiError> {
    ctl.store
        .tx(move |tx| {
            let row = tx.assignment(&assignment_id)?.ok_or_else(|| {
                ApiError::not_found(
                    "ASSIGNMENT_NOT_FOUND",
                    format!("assignment_id {assignment_id:?} does not exist"),
                )
            })?;
            if row.machine_id != machine_id {
                return Err(ApiError::new(
                    http::StatusCode::FORBIDDEN,
                    "FORBIDDEN",
                    format!(
                        "assignment {assignment_id:?} does not belong to machine {machine_id:?}"
                    ),
                ));
            }
            let task = tx.task(&row.task_id)?.ok_or(StoreError::Corrupt {
                what: "assignment without task",
                value: assignment_id.clone(),
            })?;
            let own = tx.assignment_payload(&row.assignment_id)?;
            Ok(assignment_of(&row, &task, own.as_deref())?)
        })
        .await
}
