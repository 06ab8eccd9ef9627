//! One handler per event of the state machine. Each takes the state and appends the effects
//! in the order the core performs them; `step` in the parent only dispatches.

use time::OffsetDateTime;

use super::validate::validate;
use super::{cancelled, failed, result_event, AgentState, Effect, Running};
use crate::agent::codes::{Failure, ACTIVATE_STEP, UNDO_STEP};
use crate::proto::agent::{Assignment, PowerSpec, RunResult, Work};
use crate::proto::domain::{ErrorCode, LogoffPolicy, PowerPhase, RunState};
use crate::proto::state::{Next, PhaseRecord, PowerKind};
use crate::sys::clock;

/// The first event after start-up: resume, or report, whatever a previous process left.
pub(super) fn boot(s: &mut AgentState, boot_id: String, now: OffsetDateTime, fx: &mut Vec<Effect>) {
    s.boot_id = boot_id;
    let phase = s.running.as_ref().and_then(|r| r.phase.clone());
    match phase {
        Some(PhaseRecord::Power {
            kind,
            then,
            boot_id: before,
            deadline: requested_at,
        }) => {
            power_step_after_start(s, kind, &then, &before, &requested_at, now, fx);
            return;
        }
        Some(PhaseRecord::Logoff { .. }) => {
            // Ending sessions is idempotent: start it again.
            let r = s.running.as_ref().expect("phase implies running");
            fx.push(Effect::Logoff {
                assignment_id: r.assignment.assignment_id.clone(),
                spec: r.assignment.power.clone().unwrap_or_else(default_power),
            });
            return;
        }
        Some(PhaseRecord::Scripts { .. }) | None => {}
    }
    let resumable = s.running.as_ref().is_some_and(|r| {
        let idempotent = match r.assignment.work {
            Work::SoftwareStage(_) | Work::ImageStage { .. } | Work::ImageRemove(_) => true,
            Work::Scripts(_) | Work::ImageApply(_) | Work::Invalid { .. } => false,
        };
        idempotent && !r.cancel_requested
    });
    let image_step = s
        .running
        .as_ref()
        .and_then(|r| match (&r.assignment.work, &r.phase) {
            (Work::ImageApply(_), Some(PhaseRecord::Scripts { from })) => Some(*from),
            _ => None,
        });
    if let Some(from) = image_step {
        // An image step was interrupted. Health checks are checks, so they run again;
        // an interrupted activation is undone (switched back) and reported.
        let r = s.running.as_mut().expect("checked above");
        if let Some(pgid) = r.pgid.take().filter(|_| r.boot_id == s.boot_id) {
            fx.push(Effect::KillGroup(pgid));
        }
        r.boot_id = s.boot_id.clone();
        let from = if from == ACTIVATE_STEP {
            UNDO_STEP
        } else {
            from
        };
        r.phase = Some(PhaseRecord::Scripts { from });
        let a = r.assignment.clone();
        fx.push(Effect::Persist);
        fx.push(Effect::Resume {
            assignment: a,
            from,
        });
        return;
    }
    if resumable {
        // Staging installs nothing and every step is idempotent (resumed downloads,
        // extraction into a fresh directory), so it continues instead of failing.
        let r = s.running.take().expect("checked above");
        s.queue.push_front(r.assignment);
        fx.push(Effect::Persist);
    } else if let Some(r) = s.running.as_ref() {
        // The previous process died mid-run. Its script is not re-run: kill what is left
        // (only if we are still in the boot that owns that process group) and report.
        if let Some(pgid) = r.pgid.filter(|_| r.boot_id == s.boot_id) {
            fx.push(Effect::KillGroup(pgid));
        }
        let result = failed(
            ErrorCode::AgentRestarted,
            "the agent restarted while this assignment was running; its scripts were \
             stopped and not re-run"
                .into(),
            Some(r.started_at.clone()),
            now,
        );
        // Reports it and starts the next one.
        s.finish_running(result, now, fx);
        return;
    }
    s.start_next(now, fx);
}

/// A start during a power step: the boot id says whether the reboot (or shutdown) happened.
fn power_step_after_start(
    s: &mut AgentState,
    kind: PowerKind,
    then: &Next,
    before: &str,
    requested_at: &str,
    now: OffsetDateTime,
    fx: &mut Vec<Effect>,
) {
    if before != s.boot_id {
        // The boot id changed: the reboot (or shutdown) really happened.
        if let Some(r) = s.running.as_mut() {
            r.boot_id = s.boot_id.clone();
        }
        if kind == PowerKind::Reboot {
            if let Some(ev) = s.power_event(PowerPhase::Rebooted, now) {
                fx.push(Effect::Emit(ev));
            }
            s.go(then, now, fx);
        } else {
            // Shut down as asked (if the power went before the result, it goes now).
            s.end_shutdown(true, now, fx);
        }
    } else {
        // Only the agent restarted: keep waiting for the reboot, up to the deadline.
        let deadline = clock::parse_rfc3339(requested_at).unwrap_or(now);
        if now >= deadline {
            let msg = format!(
                "the {kind} requested by this assignment did not happen before {requested_at} (boot id unchanged)"
            );
            s.fail_running(ErrorCode::RebootNotObserved, msg, now, fx);
        } else {
            let id = s
                .running
                .as_ref()
                .map(|r| r.assignment.assignment_id.clone());
            fx.push(Effect::WaitReboot {
                assignment_id: id.unwrap_or_default(),
                deadline,
            });
        }
    }
}

/// Assignments the controller offered: each is acked, queued once, or refused on its own.
pub(super) fn offered(
    s: &mut AgentState,
    list: Vec<Assignment>,
    now: OffsetDateTime,
    fx: &mut Vec<Effect>,
) {
    let mut acks = Vec::new();
    let mut changed = false;
    for a in list {
        acks.push(a.assignment_id.clone());
        if s.knows(&a.assignment_id) {
            continue;
        }
        s.remember(&a.assignment_id);
        changed = true;
        match validate(&a) {
            Ok(()) => s.queue.push_back(a),
            Err(why) => {
                let mut r = failed(why.code, why.msg, None, now);
                s.record(&a, &mut r);
                fx.push(Effect::Emit(result_event(&a.assignment_id, r, now)));
            }
        }
    }
    if changed {
        fx.push(Effect::Persist);
    }
    fx.push(Effect::Ack {
        assignments: acks,
        cancels: Vec::new(),
    });
    s.start_next(now, fx);
}

/// Cancellations: of the running assignment, a queued one, or one not yet received.
pub(super) fn cancel_requested(
    s: &mut AgentState,
    ids: Vec<String>,
    now: OffsetDateTime,
    fx: &mut Vec<Effect>,
) {
    let mut changed = false;
    for id in &ids {
        if let Some(r) = s.running_mut(id) {
            if !r.cancel_requested {
                r.cancel_requested = true;
                changed = true;
                fx.push(Effect::Cancel(id.clone()));
                if matches!(r.phase, Some(PhaseRecord::Logoff { .. })) {
                    // Nothing irreversible has started: stop waiting and report.
                    let mut res =
                        cancelled("cancelled by the operator during the logoff step", now);
                    res.started_at = Some(r.started_at.clone());
                    s.finish_running(res, now, fx);
                }
            }
        } else if let Some(pos) = s.queue.iter().position(|a| &a.assignment_id == id) {
            let a = s.queue.remove(pos).expect("position came from this queue");
            let mut r = cancelled("cancelled before it started", now);
            s.record(&a, &mut r);
            fx.push(Effect::Emit(result_event(id, r, now)));
            changed = true;
        } else if !s.knows(id) {
            // Cancelled between the controller's offer and our receipt: never run it.
            s.remember(id);
            fx.push(Effect::Emit(result_event(
                id,
                cancelled("cancelled before it reached the machine", now),
                now,
            )));
            changed = true;
        }
        // Otherwise it already finished and its result is on its way.
    }
    if changed {
        // Cancel effects were pushed before Persist; that is fine: cancelling is not
        // irreversible in a way the state must precede (the result still goes out).
        fx.push(Effect::Persist);
    }
    fx.push(Effect::Ack {
        assignments: Vec::new(),
        cancels: ids,
    });
}

/// A script of the running assignment started in process group `pgid`.
pub(super) fn spawned(s: &mut AgentState, assignment_id: String, pgid: i32, fx: &mut Vec<Effect>) {
    if let Some(r) = s.running_mut(&assignment_id) {
        r.pgid = Some(pgid);
        fx.push(Effect::Persist);
    }
}

/// The running assignment's scripts ended: a power step follows, or the result goes out.
pub(super) fn finished(
    s: &mut AgentState,
    assignment_id: String,
    result: RunResult,
    reboot_after: Option<usize>,
    now: OffsetDateTime,
    fx: &mut Vec<Effect>,
) {
    let power_next = s
        .running_for(&assignment_id)
        .and_then(|r| after_scripts(r, &result, reboot_after));
    if let Some(next) = power_next {
        let r = s.running.as_mut().expect("filtered above");
        r.carry = Some(merge(r.carry.take(), result));
        r.phase = Some(PhaseRecord::Logoff { next });
        r.pgid = None;
        let spec = r.assignment.power.clone().unwrap_or_else(default_power);
        fx.push(Effect::Persist);
        fx.push(Effect::Logoff {
            assignment_id,
            spec,
        });
        return;
    }
    let mut result = match s.running.as_mut() {
        Some(r) if r.assignment.assignment_id == assignment_id => merge(r.carry.take(), result),
        _ => result,
    };
    match s.running.take() {
        Some(r) if r.assignment.assignment_id == assignment_id => {
            s.record(&r.assignment, &mut result);
            if result.state == RunState::Succeeded && result.staged_commit.is_some() {
                s.staged_commit = result.staged_commit.clone();
            }
            fx.push(Effect::Emit(result_event(&assignment_id, result, now)));
            fx.push(Effect::Persist);
        }
        other => s.running = other,
    }
    s.start_next(now, fx);
}

/// The logoff step ended: on to its next step, or fail the run with its reason.
pub(super) fn logoff_done(
    s: &mut AgentState,
    assignment_id: String,
    outcome: Result<(), Failure>,
    now: OffsetDateTime,
    fx: &mut Vec<Effect>,
) {
    let next = match s.running_for(&assignment_id) {
        Some(r) => match &r.phase {
            Some(PhaseRecord::Logoff { next, .. }) => next.clone(),
            _ => return,
        },
        _ => return,
    };
    match outcome {
        Ok(()) => s.go(&next, now, fx),
        Err(f) => s.fail_running(f.code, f.msg, now, fx),
    }
}

/// The power command ran; for a shutdown, the result goes out now.
pub(super) fn power_issued(
    s: &mut AgentState,
    assignment_id: String,
    now: OffsetDateTime,
    fx: &mut Vec<Effect>,
) {
    let stop = matches!(
        s.running_for(&assignment_id).and_then(|r| r.phase.as_ref()),
        Some(PhaseRecord::Power {
            kind: PowerKind::Stop,
            ..
        })
    );
    if stop {
        // The machine may never come back: report the result now, then announce.
        let r = s.running.as_mut().expect("checked above");
        if let Some(mut result) = r.carry.take() {
            let a = r.assignment.clone();
            s.record(&a, &mut result);
            fx.push(Effect::Emit(result_event(&assignment_id, result, now)));
        }
        if let Some(ev) = s.power_event(PowerPhase::ShuttingDown, now) {
            fx.push(Effect::Emit(ev));
        }
        fx.push(Effect::Persist);
    }
}

/// The power command could not be run.
pub(super) fn power_failed(
    s: &mut AgentState,
    assignment_id: String,
    msg: String,
    now: OffsetDateTime,
    fx: &mut Vec<Effect>,
) {
    let ours = s.running_for(&assignment_id).is_some();
    if ours {
        s.fail_running(ErrorCode::PowerCommandFailed, msg, now, fx);
    }
}

/// The deadline of a requested reboot (or shutdown) passed in the same boot.
pub(super) fn reboot_timeout(
    s: &mut AgentState,
    assignment_id: String,
    now: OffsetDateTime,
    fx: &mut Vec<Effect>,
) {
    let pending = s.running_for(&assignment_id).and_then(|r| r.phase.clone());
    if let Some(PhaseRecord::Power {
        kind,
        boot_id,
        deadline: requested_at,
        ..
    }) = pending
    {
        if boot_id == s.boot_id {
            let msg = format!(
                "the {kind} requested by this assignment did not happen before {requested_at} (boot id unchanged)"
            );
            if kind == PowerKind::Stop {
                // If the agent restarted before the command ran, the result is still
                // carried: it goes out now, or it would be lost.
                s.end_shutdown(false, now, fx);
            } else {
                s.fail_running(ErrorCode::RebootNotObserved, msg, now, fx);
            }
        }
    }
}

pub(super) fn default_power() -> PowerSpec {
    PowerSpec {
        pre_start: None,
        post_finish: None,
        logoff_policy: LogoffPolicy::WaitForLogoff,
        logoff_timeout_seconds: 3600,
        force_logoff_grace_seconds: 300,
    }
}

/// The step after a script run: a reboot asked for by exit code 194, or the post-finish
/// power step. `None`: report the result now. A cancelled run does no power steps.
fn after_scripts(r: &Running, result: &RunResult, reboot_after: Option<usize>) -> Option<Next> {
    let reboot_then = |n: Next| Next::power(PowerKind::Reboot, n);
    let scripts = match &r.assignment.work {
        // Image steps ask for the reboot that follows them (after activation, after a
        // rollback); the next step runs in the new boot.
        Work::ImageApply(_) => return reboot_after.map(|i| reboot_then(Next::Scripts(i + 1))),
        Work::Scripts(scripts) => scripts,
        Work::SoftwareStage(_)
        | Work::ImageStage { .. }
        | Work::ImageRemove(_)
        | Work::Invalid { .. } => return None,
    };
    if result.state == RunState::Cancelled {
        return None;
    }
    let post = r
        .assignment
        .power
        .as_ref()
        .and_then(|p| p.post_finish)
        .map(PowerKind::from);
    match reboot_after {
        Some(i) if i + 1 < scripts.len() => Some(reboot_then(Next::Scripts(i + 1))),
        Some(_) if post == Some(PowerKind::Stop) => {
            Some(Next::power(PowerKind::Stop, Next::Finish))
        }
        Some(_) => Some(reboot_then(Next::Finish)),
        None => post.map(|k| Next::power(k, Next::Finish)),
    }
}

/// Joins the output of earlier script segments (before a reboot) with this one.
fn merge(carry: Option<RunResult>, mut now: RunResult) -> RunResult {
    if let Some(c) = carry {
        now.stdout = c.stdout + &now.stdout;
        now.stderr = c.stderr + &now.stderr;
        now.output_truncated |= c.output_truncated;
        if now.started_at.is_none() {
            now.started_at = c.started_at;
        }
    }
    now
}
