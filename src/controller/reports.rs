//! What agents report and what their silence means, inside one store transaction: each
//! event applied exactly once (by its idempotency key), and machines silent past their
//! allowance declared unreachable (the reaper). Both end assignments through `engine`,
//! which moves the task on.

use super::engine::{end_assignment, settle, EngineError, Wake};
use super::rollout::MachineState;
use super::store::{Outcome, StoreError, TaskMachineRow, Tx};
use crate::proto::agent::{AgentEvent, EventBody, PowerSpec};
use crate::proto::domain::{ErrorCode, LogoffPolicy, TaskKind};

/// What happened to one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Applied,
    Duplicate,
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
    settle(tx, &row, now_ms, wake)?;
    Ok(Applied::Applied)
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
