//! The agent protocol handlers (`/agent/v1/...`). The machine id always comes from the verified
//! certificate, so an agent can only ever see and report its own assignments; every request
//! first passes [`identity::gate`].

use std::time::Duration;

use super::errors::{parse_json, ApiError};
use super::identity::{self, AgentCall};
use super::reports::Applied;
use super::store::{StoreError, TaskMachineRow, TaskRow};
use super::Controller;
use crate::proto::agent::{
    Assignment, EventBatch, EventBody, EventsApplied, Heartbeat, ImageAssignment, PollRequest,
    PollResponse, Work,
};
use crate::proto::domain::ErrorCode;
use crate::proto::domain::TaskKind;
use crate::sys::clock;

/// Upper bound on how long a poll may be held, whatever the agent asks for.
const MAX_WAIT: Duration = Duration::from_secs(60);

fn now_ms() -> i64 {
    clock::unix_ms(clock::now())
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
    let image = || -> Result<ImageAssignment, StoreError> {
        serde_json::from_str(own.unwrap_or(&task.scripts_json)).map_err(corrupt)
    };
    let work = match task.kind {
        TaskKind::SoftwareStage => {
            Work::SoftwareStage(serde_json::from_str(&task.scripts_json).map_err(corrupt)?)
        }
        TaskKind::ScriptExecution => {
            Work::Scripts(serde_json::from_str(&task.scripts_json).map_err(corrupt)?)
        }
        TaskKind::ImageStage => {
            let mut image = image()?;
            let payload = image.payload.take().ok_or_else(|| StoreError::Corrupt {
                what: "task payload",
                value: format!("{}: an image stage without its payload", task.task_id),
            })?;
            Work::ImageStage { image, payload }
        }
        TaskKind::ImageApply | TaskKind::ImageRebuild => Work::ImageApply(image()?),
        TaskKind::ImageRemove => Work::ImageRemove(image()?),
    };
    Ok(Assignment {
        assignment_id: row.assignment_id.clone(),
        task_id: task.task_id.clone(),
        work,
        timeout_seconds: task.timeout_seconds,
        power: match &task.power_json {
            Some(j) => Some(serde_json::from_str(j).map_err(corrupt)?),
            None => None,
        },
    })
}

pub async fn heartbeat(ctl: &Controller, call: AgentCall, body: &[u8]) -> Result<(), ApiError> {
    let hb: Heartbeat = parse_json(body)?;
    let facts = serde_json::to_string(&hb.facts).ok();
    let now = now_ms();
    let quiet = ctl.cfg.identity_conflict_quiet;
    let gate = ctl
        .store
        .tx(move |tx| {
            let g = identity::gate(
                tx,
                &call,
                Some((&hb.agent_version, facts.as_deref())),
                now,
                quiet,
            )?;
            tx.set_outbox(&call.machine_id, hb.outbox)?;
            Ok::<_, ApiError>((g, call.machine_id))
        })
        .await?;
    match gate {
        (g, m) if g.conflict => {
            // The other side's open poll learns it now, not when its wait runs out.
            ctl.wake(std::slice::from_ref(&m));
            Err(identity::conflict_error(&m))
        }
        _ => Ok(()),
    }
}

/// What one look at a poller's machine found.
enum Answer {
    Decommissioned,
    /// Two live agents present this identity (noticed by another request while this poll
    /// waited).
    Conflict,
    /// A newer session of the identity holds it.
    Superseded,
    Work(Vec<Assignment>, Vec<String>),
}

/// Long-poll: answers at once when something is waiting for this machine, otherwise as soon as
/// something is dispatched or cancelled for it, or after `wait_ms`. Only the newest session of
/// an identity is handed work, and none while two are live.
///
/// At fleet size this is the controller's most frequent request, so it costs one transaction
/// when nothing is waiting (the gate, the acks and the first look together) and one more per
/// wake-up that finds work (the look, and the end of the session's hold).
pub async fn poll(
    ctl: &Controller,
    call: AgentCall,
    body: &[u8],
) -> Result<PollResponse, ApiError> {
    let req: PollRequest = parse_json(body)?;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(req.wait_ms).min(MAX_WAIT);
    let machine_id = call.machine_id.clone();
    let quiet = ctl.cfg.identity_conflict_quiet;
    let notify = ctl.waiter(&machine_id);
    let mut shutdown = ctl.shutdown.clone();
    let now = now_ms();
    let hold = now + Duration::from_millis(req.wait_ms).min(MAX_WAIT).as_millis() as i64;
    // Armed before the first look, so a dispatch that lands between look and wait wakes us.
    let notified = notify.notified();
    tokio::pin!(notified);
    notified.as_mut().enable();
    let first = {
        let (c, r) = (call.clone(), req.clone());
        ctl.store
            .tx(move |tx| {
                let g = identity::gate_holding(
                    tx,
                    &c,
                    Some((&r.agent_version, None)),
                    now,
                    quiet,
                    Some(hold),
                )?;
                // Acks are the agent's record of what it holds: applied even in a conflict.
                let acked = tx.ack(&c.machine_id, &r.ack_assignments, &r.ack_cancels)?;
                if g.conflict {
                    return Ok((acked, None));
                }
                Ok::<_, ApiError>((acked, Some(look(tx, &c, now, quiet)?)))
            })
            .await?
    };
    let (acked, first) = first;
    ctl.metrics.acknowledged(&acked, now_ms());
    let Some(first) = first else {
        ctl.wake(std::slice::from_ref(&machine_id));
        return Err(identity::conflict_error(&machine_id));
    };
    if let Some(answer) = finished(&machine_id, first)? {
        return Ok(answer);
    }
    loop {
        tokio::select! {
            _ = &mut notified => {}
            // The hold ends with the wait: nothing to record.
            _ = tokio::time::sleep_until(deadline) => return Ok(PollResponse::default()),
            _ = shutdown.changed() => {
                if call.session.is_some() {
                    let (m, s, now) = (machine_id.clone(), call.session().key, now_ms());
                    ctl.store.tx(move |tx| tx.release_hold(&m, &s, now)).await?;
                }
                return Ok(PollResponse::default());
            }
        }
        notified.set(notify.notified());
        notified.as_mut().enable();
        if ctl.revoked.contains(&call.cert.serial) {
            return Err(super::revoked_error());
        }
        let c = call.clone();
        let answer = ctl
            .store
            .tx(move |tx| look(tx, &c, now_ms(), quiet))
            .await?;
        if let Some(answer) = finished(&machine_id, answer)? {
            return Ok(answer);
        }
    }
}

/// The poll's answer, or `None` to keep waiting.
fn finished(machine_id: &str, answer: Answer) -> Result<Option<PollResponse>, ApiError> {
    match answer {
        Answer::Conflict => Err(identity::conflict_error(machine_id)),
        Answer::Decommissioned => Err(ApiError::new(
            http::StatusCode::FORBIDDEN,
            ErrorCode::MachineDecommissioned,
            format!("machine {machine_id:?} was decommissioned"),
        )),
        // Answered at once: if that agent is alive, its next poll shows it.
        Answer::Superseded => Ok(Some(PollResponse::default())),
        Answer::Work(rows, cancels) if !rows.is_empty() || !cancels.is_empty() => {
            Ok(Some(PollResponse {
                assignments: rows,
                cancels,
            }))
        }
        Answer::Work(..) => Ok(None),
    }
}

/// One look at what waits for the poller's machine. When the poll ends with it (work, or
/// nothing more for this session), the session's hold ends in the same transaction: its
/// long poll is over, so a clone that went away stops counting `quiet` after its last word.
fn look(
    tx: &mut super::store::Tx<'_>,
    call: &AgentCall,
    now: i64,
    quiet: Duration,
) -> Result<Answer, ApiError> {
    let m = &call.machine_id;
    let s = call.session();
    let tracked = call.session.is_some();
    let silent_since = now - quiet.as_millis() as i64;
    let end_hold = |tx: &mut super::store::Tx<'_>| -> Result<(), ApiError> {
        if tracked {
            tx.release_hold(m, &s.key, now)?;
        }
        Ok(())
    };
    match tx.machine(m)? {
        Some((_, Some(_))) => {
            end_hold(tx)?;
            return Ok(Answer::Decommissioned);
        }
        // Noticed by another request of this identity while this poll waited.
        Some((row, None)) if row.conflict_ms.is_some() && tracked => {
            end_hold(tx)?;
            return Ok(Answer::Conflict);
        }
        _ => {}
    }
    // A newer session of this identity took over while this poll waited (a restart, a
    // reboot, or a clone): this one gets nothing more.
    if tracked && tx.newest_session(m)?.as_deref() != Some(s.key.as_str()) {
        end_hold(tx)?;
        return Ok(Answer::Superseded);
    }
    let (rows, cancels) = tx.undelivered_for(m, &s.key, &s.instance, silent_since)?;
    let mut out = Vec::with_capacity(rows.len());
    for (row, task) in &rows {
        let own = tx.assignment_payload(&row.assignment_id)?;
        out.push(assignment_of(row, task, own.as_deref())?);
    }
    if !out.is_empty() || !cancels.is_empty() {
        end_hold(tx)?;
    }
    Ok(Answer::Work(out, cancels))
}

/// Results are accepted even while the identity is in conflict: work already running when
/// the conflict was noticed finishes and reports once.
pub async fn events(
    ctl: &Controller,
    call: AgentCall,
    body: &[u8],
) -> Result<EventsApplied, ApiError> {
    let batch: EventBatch = parse_json(body)?;
    let now = now_ms();
    let quiet = ctl.cfg.identity_conflict_quiet;
    let out = ctl
        .store
        .tx(move |tx| {
            identity::gate(tx, &call, None, now, quiet)?;
            let machine_id = call.machine_id;
            let mut out = EventsApplied::default();
            let mut wake = Vec::new();
            let mut ended = Vec::new();
            let mut delivered = Vec::new();
            for ev in &batch.events {
                // A STARTED or RESULT before the next poll's acknowledgement is the first word
                // that the agent has the assignment (the dispatch latency ends there).
                if matches!(ev.body, EventBody::Started | EventBody::Result(_)) {
                    if let Some(row) = tx.assignment(&ev.assignment_id)? {
                        if row.machine_id == machine_id && !row.delivered {
                            delivered.extend(row.dispatched_ms);
                        }
                    }
                }
                match super::progress::apply_event(tx, &machine_id, ev, now, &mut wake)? {
                    Applied::Applied => {
                        out.applied += 1;
                        if let EventBody::Result(r) = &ev.body {
                            ended.extend(clock::parse_rfc3339(&r.finished_at).map(clock::unix_ms));
                        }
                    }
                    Applied::Duplicate => out.duplicates += 1,
                }
            }
            Ok::<_, ApiError>((out, wake, ended, delivered))
        })
        .await?;
    let (out, wake, ended, delivered) = out;
    ctl.metrics.acknowledged(&delivered, now_ms());
    ctl.metrics.events(out.applied, out.duplicates);
    ctl.metrics.results(&ended, now_ms());
    ctl.wake(&wake);
    Ok(out)
}

pub async fn get_assignment(
    ctl: &Controller,
    call: AgentCall,
    assignment_id: String,
) -> Result<Assignment, ApiError> {
    let quiet = ctl.cfg.identity_conflict_quiet;
    let now = now_ms();
    ctl.store
        .tx(move |tx| {
            identity::gate(tx, &call, None, now, quiet)?;
            let machine_id = call.machine_id;
            let row = tx.assignment(&assignment_id)?.ok_or_else(|| {
                ApiError::not_found(
                    ErrorCode::AssignmentNotFound,
                    format!("assignment_id {assignment_id:?} does not exist"),
                )
            })?;
            if row.machine_id != machine_id {
                return Err(ApiError::new(
                    http::StatusCode::FORBIDDEN,
                    ErrorCode::Forbidden,
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
