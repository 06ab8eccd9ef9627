//! The agent's state machine as a pure function: `step(state, event, now) -> (state, effects)`.
//! The core loop (`agent::core`) performs the effects in order; nothing here does I/O, so every
//! rule about ordering, dedup and recovery is unit-tested on plain values.
//!
//! Ordering rules the effects encode:
//! - `Persist` comes before `Start` (a script never runs without a durable record of it);
//! - a result is `Emit`ted (durable outbox) before the state that forgets the run is persisted,
//!   so a crash in between re-reports the run under the same idempotency key, never loses it;
//! - `Ack` comes after `Persist`, so the controller stops offering only what is on disk.

use std::collections::VecDeque;

use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::proto::agent::ImageRecord;
use crate::proto::agent::{
    AgentEvent, Assignment, AssignmentKind, EventBody, PowerEvent, PowerSpec, RunResult,
};
use crate::proto::state::{Next, PhaseRecord, PowerKind, RunningRecord, StateFile};
use crate::proto::status::RecentResult;
use crate::sys::clock;

/// How many accepted assignment ids are remembered for dedup.
const SEEN_LIMIT: usize = 1000;
/// How many results `fieldhand status` shows.
pub const RECENT_LIMIT: usize = 5;

pub use super::codes::{
    AGENT_RESTARTED, EXIT_REBOOT, INVALID_ASSIGNMENT, MAX_REBOOTS, POWER_COMMAND_FAILED,
    REBOOT_LOOP, REBOOT_NOT_OBSERVED,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    pub assignment: Assignment,
    pub started_at: String,
    pub pgid: Option<i32>,
    pub boot_id: String,
    pub cancel_requested: bool,
    /// Where a script run is among its logoff, script and power steps.
    pub phase: Option<PhaseRecord>,
    /// Reboots requested for this assignment (loop guard).
    pub reboots: u32,
    /// Output so far; the final result while a post-finish power step is pending.
    pub carry: Option<RunResult>,
}

/// Everything the agent must remember across restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentState {
    pub queue: VecDeque<Assignment>,
    pub running: Option<Running>,
    /// Newest first.
    pub recent: VecDeque<RecentResult>,
    pub seen: VecDeque<String>,
    /// The boot this process runs in; set by `Event::Boot`.
    pub boot_id: String,
    pub staged_commit: Option<String>,
    /// The machine's images and their seed 001 states.
    pub image: ImageRecord,
    /// How long to wait for a requested reboot (config; not persisted).
    pub reboot_timeout: std::time::Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
// One event is built and moved per step, so boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Event {
    /// First event after start-up, with the current boot id.
    Boot { boot_id: String },
    /// Assignments the controller offered.
    Offered(Vec<Assignment>),
    /// Assignment ids the operator cancelled.
    CancelRequested(Vec<String>),
    /// A script of the running assignment was started in process group `pgid`.
    Spawned { assignment_id: String, pgid: i32 },
    /// The running assignment's scripts ended. `reboot_after`: script index that exited
    /// with 194 ("succeeded, please reboot").
    Finished {
        assignment_id: String,
        result: RunResult,
        reboot_after: Option<usize>,
    },
    /// The logoff step ended: `Ok`, or `Err((error_code, message))`.
    LogoffDone {
        assignment_id: String,
        outcome: Result<(), (String, String)>,
    },
    /// The power command ran (for a shutdown, the result may now be reported).
    PowerIssued { assignment_id: String },
    /// The power command could not be run or failed.
    PowerFailed { assignment_id: String, msg: String },
    /// The deadline for a requested reboot passed.
    RebootTimeout { assignment_id: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Write the state file now.
    Persist,
    /// Append to the durable outbox.
    Emit(AgentEvent),
    /// Start executing this assignment (it is `running` in the persisted state).
    Start(Assignment),
    /// Run this assignment's scripts from index `from` (after a reboot or a logoff step).
    Resume { assignment: Assignment, from: usize },
    /// End or wait out user sessions under the assignment's logoff policy.
    Logoff {
        assignment_id: String,
        spec: PowerSpec,
    },
    /// Run the power command; report RebootTimeout at `deadline`.
    Power {
        assignment_id: String,
        kind: PowerKind,
        deadline: OffsetDateTime,
    },
    /// The agent restarted while a reboot was pending: report RebootTimeout at `deadline`.
    WaitReboot {
        assignment_id: String,
        deadline: OffsetDateTime,
    },
    /// Stop the running assignment; it will finish as `CANCELLED`.
    Cancel(String),
    /// Kill what is left of an interrupted run's process group.
    KillGroup(i32),
    /// Tell the controller these are durably recorded.
    Ack {
        assignments: Vec<String>,
        cancels: Vec<String>,
    },
}

fn result_event(assignment_id: &str, result: RunResult, now: OffsetDateTime) -> AgentEvent {
    AgentEvent {
        idempotency_key: format!("{assignment_id}:result"),
        assignment_id: assignment_id.to_string(),
        at: clock::rfc3339(now),
        body: EventBody::Result(result),
    }
}

fn failed(code: &str, msg: String, started_at: Option<String>, now: OffsetDateTime) -> RunResult {
    RunResult {
        state: "FAILED".into(),
        exit_code: None,
        stdout: String::new(),
        stderr: String::new(),
        output_truncated: false,
        started_at,
        finished_at: clock::rfc3339(now),
        error_code: Some(code.into()),
        error_msg: Some(msg),
        staged_commit: None,
        image: None,
    }
}

fn cancelled(msg: &str, now: OffsetDateTime) -> RunResult {
    RunResult {
        state: "CANCELLED".into(),
        error_msg: Some(msg.into()),
        error_code: None,
        ..failed("", String::new(), None, now)
    }
}

/// Checks what the agent can check before accepting: every script's content matches its digest
/// and names a known interpreter.
pub fn validate(a: &Assignment) -> Result<(), String> {
    match a.kind {
        AssignmentKind::SoftwareStage => return validate_stage(a),
        AssignmentKind::ImageStage | AssignmentKind::ImageApply | AssignmentKind::ImageRemove => {
            return validate_image(a)
        }
        AssignmentKind::ScriptExecution => {}
        AssignmentKind::Unknown => {
            return Err(
                "unknown assignment kind: this agent is older than the controller; upgrade it"
                    .into(),
            )
        }
    }
    if a.scripts.is_empty() {
        return Err("assignment has no scripts".into());
    }
    for s in &a.scripts {
        let digest = hex::encode(Sha256::digest(s.content.as_bytes()));
        if digest != s.sha256 {
            return Err(format!(
                "script {:?}: sha256 {digest} does not match {}",
                s.name, s.sha256
            ));
        }
        if super::runner::interpreter(&s.command_type).is_none() {
            return Err(format!(
                "script {:?}: unknown command_type {:?}",
                s.name, s.command_type
            ));
        }
    }
    if a.timeout_seconds == 0 {
        return Err("timeout_seconds is 0".into());
    }
    Ok(())
}

fn validate_image(a: &Assignment) -> Result<(), String> {
    let Some(img) = &a.image else {
        return Err(format!("{:?} assignment without an image", a.kind));
    };
    crate::pki::validate_name("image_id", &img.image_id).map_err(|e| e.to_string())?;
    if a.kind == AssignmentKind::ImageStage && img.payload.is_none() {
        return Err("image stage assignment without a payload".into());
    }
    if let Some(slot) = &img.slot {
        crate::pki::validate_name("slot", slot).map_err(|e| e.to_string())?;
        if !slot.starts_with(&format!("{}.", img.image_id)) {
            return Err(format!(
                "slot {slot:?} is not a slot of image {}",
                img.image_id
            ));
        }
    } else if a.kind == AssignmentKind::ImageApply && img.payload.is_some() {
        return Err("a rebuild (image apply with a payload) needs a fresh slot".into());
    }
    if let Some(p) = &img.payload {
        let hex_ok = p.sha256.len() == 64 && p.sha256.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex_ok || p.format != "tar.gz" {
            return Err(format!(
                "image payload must be a tar.gz with a sha256, not {:?} {:?}",
                p.format, p.sha256
            ));
        }
    }
    if let Some(k) = img.env.keys().find(|k| {
        !k.starts_with("FIELDHAND_")
            || !k
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    }) {
        return Err(format!(
            "image env {k:?} must be FIELDHAND_ followed by A-Z, 0-9 or _"
        ));
    }
    if a.timeout_seconds == 0 {
        return Err("timeout_seconds is 0".into());
    }
    Ok(())
}

fn validate_stage(a: &Assignment) -> Result<(), String> {
    let Some(stage) = &a.stage else {
        return Err("software stage assignment without a stage payload".into());
    };
    if stage.commit.is_empty() || !stage.commit.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "commit {:?} is not a commit identifier",
            stage.commit
        ));
    }
    if stage.components.is_empty() {
        return Err("stage payload has no components".into());
    }
    for c in &stage.components {
        crate::pki::validate_name("component name", &c.name).map_err(|e| e.to_string())?;
        let hex_ok = c.sha256.len() == 64 && c.sha256.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex_ok {
            return Err(format!("component {:?}: bad sha256 {:?}", c.name, c.sha256));
        }
        if c.format != "file" && c.format != "tar.gz" {
            return Err(format!(
                "component {:?}: unknown format {:?}",
                c.name, c.format
            ));
        }
    }
    if a.timeout_seconds == 0 {
        return Err("timeout_seconds is 0".into());
    }
    Ok(())
}

impl AgentState {
    fn remember(&mut self, id: &str) {
        self.seen.push_back(id.to_string());
        while self.seen.len() > SEEN_LIMIT {
            self.seen.pop_front();
        }
    }

    fn knows(&self, id: &str) -> bool {
        self.seen.iter().any(|s| s == id)
    }

    /// Keeps the image record in step with a finished image assignment, and attaches it to
    /// the result: the controller copies it rather than applying these rules again.
    fn record_image(&mut self, a: &Assignment, r: &mut RunResult) {
        let Some(img) = &a.image else {
            return;
        };
        let ok = r.state == "SUCCEEDED";
        let pending_is_this = self.image.pending_image_id.as_deref() == Some(&img.image_id);
        match a.kind {
            AssignmentKind::ImageStage if pending_is_this => {
                self.image.pending_image_state = Some(if ok { "READY" } else { "FAILED" }.into());
            }
            AssignmentKind::ImageApply if pending_is_this && ok => {
                self.image.pending_image_id = None;
                self.image.pending_image_state = None;
            }
            AssignmentKind::ImageApply if pending_is_this && r.image.is_some() => {
                self.image.pending_image_state = Some("FAILED".into());
            }
            AssignmentKind::ImageRemove if ok && (img.remove_all || pending_is_this) => {
                self.image.pending_image_id = None;
                self.image.pending_image_state = None;
            }
            _ => {}
        }
        if let Some(rep) = &r.image {
            self.image.current_image_id = rep.current_image_id.clone();
            self.image.current_image_state = rep.current_image_state.clone();
        }
        r.image = Some(Box::new(self.image.clone()));
    }

    fn record(&mut self, a: &Assignment, r: &mut RunResult) {
        self.record_image(a, r);
        self.recent.push_front(RecentResult {
            assignment_id: a.assignment_id.clone(),
            task_id: a.task_id.clone(),
            state: r.state.clone(),
            exit_code: r.exit_code,
            error_code: r.error_code.clone(),
            finished_at: r.finished_at.clone(),
        });
        self.recent.truncate(RECENT_LIMIT);
    }

    /// Starts the next queued assignment if nothing runs. Appends the effects.
    fn start_next(&mut self, now: OffsetDateTime, fx: &mut Vec<Effect>) {
        if self.running.is_some() {
            return;
        }
        let Some(a) = self.queue.pop_front() else {
            return;
        };
        let pre_start = a.power.as_ref().and_then(|p| p.pre_start.clone());
        let phase = match (&a.kind, pre_start.as_deref()) {
            (
                AssignmentKind::SoftwareStage
                | AssignmentKind::ImageStage
                | AssignmentKind::ImageRemove,
                _,
            ) => None,
            // Users leave (under the push's logoff policy) before the image is switched in.
            (AssignmentKind::ImageApply, _) => Some(PhaseRecord::Logoff {
                next: Next::Scripts(0),
            }),
            (_, Some("reboot")) => Some(PhaseRecord::Logoff {
                next: Next::power(PowerKind::Reboot, Next::Scripts(0)),
            }),
            (_, Some(_)) => Some(PhaseRecord::Logoff {
                next: Next::Scripts(0),
            }),
            (_, None) => Some(PhaseRecord::Scripts { from: 0 }),
        };
        self.running = Some(Running {
            assignment: a.clone(),
            started_at: clock::rfc3339(now),
            pgid: None,
            boot_id: self.boot_id.clone(),
            cancel_requested: false,
            phase: phase.clone(),
            reboots: 0,
            carry: None,
        });
        fx.push(Effect::Persist);
        fx.push(Effect::Emit(AgentEvent {
            idempotency_key: format!("{}:started", a.assignment_id),
            assignment_id: a.assignment_id.clone(),
            at: clock::rfc3339(now),
            body: EventBody::Started,
        }));
        if a.kind == AssignmentKind::ImageStage {
            if let Some(img) = &a.image {
                self.image.pending_image_id = Some(img.image_id.clone());
                self.image.pending_image_state = Some("PUBLISHING".into());
            }
        }
        match phase {
            Some(PhaseRecord::Logoff { .. }) => fx.push(Effect::Logoff {
                assignment_id: a.assignment_id.clone(),
                spec: a.power.clone().unwrap_or_else(default_power),
            }),
            _ => fx.push(Effect::Start(a)),
        }
    }

    /// Ends the running assignment with `result` and starts the next one.
    fn finish_running(&mut self, mut result: RunResult, now: OffsetDateTime, fx: &mut Vec<Effect>) {
        if let Some(r) = self.running.take() {
            self.record(&r.assignment, &mut result);
            fx.push(Effect::Emit(result_event(
                &r.assignment.assignment_id,
                result,
                now,
            )));
            fx.push(Effect::Persist);
        }
        self.start_next(now, fx);
    }

    /// The failure of a power or logoff step, keeping the scripts' output so far.
    fn fail_running(&mut self, code: &str, msg: String, now: OffsetDateTime, fx: &mut Vec<Effect>) {
        let Some(r) = self.running.as_ref() else {
            return;
        };
        let mut result = failed(code, msg, Some(r.started_at.clone()), now);
        if let Some(c) = &r.carry {
            result.stdout = c.stdout.clone();
            result.stderr = c.stderr.clone();
            result.output_truncated = c.output_truncated;
            result.exit_code = c.exit_code;
        }
        self.finish_running(result, now, fx);
    }

    fn power_event(&self, phase: &str, now: OffsetDateTime) -> Option<AgentEvent> {
        let r = self.running.as_ref()?;
        let id = &r.assignment.assignment_id;
        Some(AgentEvent {
            idempotency_key: format!("{id}:power:{}:{phase}", r.reboots),
            assignment_id: id.clone(),
            at: clock::rfc3339(now),
            body: EventBody::Power(PowerEvent {
                phase: phase.into(),
                boot_id: self.boot_id.clone(),
                count: r.reboots,
            }),
        })
    }

    /// Moves to the step `next`.
    fn go(&mut self, next: &Next, now: OffsetDateTime, fx: &mut Vec<Effect>) {
        let Some(r) = self.running.as_mut() else {
            return;
        };
        let id = r.assignment.assignment_id.clone();
        match next {
            Next::Finish => {
                let result = r.carry.take().unwrap_or_else(|| {
                    failed("INTERNAL_ERROR", "no result to report".into(), None, now)
                });
                self.finish_running(result, now, fx);
            }
            Next::Scripts(from) => {
                let from = *from;
                r.phase = Some(PhaseRecord::Scripts { from });
                r.pgid = None;
                let a = r.assignment.clone();
                fx.push(Effect::Persist);
                fx.push(if from == 0 {
                    Effect::Start(a)
                } else {
                    Effect::Resume {
                        assignment: a,
                        from,
                    }
                });
            }
            Next::Power { kind, then } => {
                let kind = *kind;
                if kind == PowerKind::Reboot && r.reboots >= MAX_REBOOTS {
                    let msg = format!(
                        "assignment {id} asked for more than {MAX_REBOOTS} reboots; refusing a reboot loop"
                    );
                    self.fail_running(REBOOT_LOOP, msg, now, fx);
                    return;
                }
                if kind == PowerKind::Reboot {
                    r.reboots += 1;
                }
                let deadline = now + self.reboot_timeout;
                r.phase = Some(PhaseRecord::Power {
                    kind,
                    then: (**then).clone(),
                    boot_id: self.boot_id.clone(),
                    deadline: clock::rfc3339(deadline),
                });
                if kind == PowerKind::Reboot {
                    if let Some(ev) = self.power_event("REBOOTING", now) {
                        fx.push(Effect::Emit(ev));
                    }
                }
                // Persist before the irreversible step.
                fx.push(Effect::Persist);
                fx.push(Effect::Power {
                    assignment_id: id,
                    kind,
                    deadline,
                });
            }
        }
    }
}

/// The transition function.
pub fn step(mut s: AgentState, ev: Event, now: OffsetDateTime) -> (AgentState, Vec<Effect>) {
    let mut fx = Vec::new();
    match ev {
        Event::Boot { boot_id } => {
            s.boot_id = boot_id;
            let phase = s.running.as_ref().and_then(|r| r.phase.clone());
            match phase {
                Some(PhaseRecord::Power {
                    kind,
                    then,
                    boot_id: before,
                    deadline: requested_at,
                }) => {
                    if before != s.boot_id {
                        // The boot id changed: the reboot (or shutdown) really happened.
                        if let Some(r) = s.running.as_mut() {
                            r.boot_id = s.boot_id.clone();
                        }
                        if kind == PowerKind::Reboot {
                            if let Some(ev) = s.power_event("REBOOTED", now) {
                                fx.push(Effect::Emit(ev));
                            }
                            s.go(&then, now, &mut fx);
                        } else {
                            // Shut down as asked. The result normally went out when the
                            // command was issued; if the power went first, it goes now.
                            let carry = s.running.as_mut().and_then(|r| r.carry.take());
                            if let Some(result) = carry {
                                if let Some(ev) = s.power_event("SHUTTING_DOWN", now) {
                                    fx.push(Effect::Emit(ev));
                                }
                                s.finish_running(result, now, &mut fx);
                            } else {
                                s.running = None;
                                fx.push(Effect::Persist);
                                s.start_next(now, &mut fx);
                            }
                        }
                    } else {
                        // Only the agent restarted: keep waiting for the reboot, up to the deadline.
                        let deadline = clock::parse_rfc3339(&requested_at).unwrap_or(now);
                        if now >= deadline {
                            let msg = format!(
                                "the {kind} requested by this assignment did not happen before {requested_at} (boot id unchanged)"
                            );
                            s.fail_running(REBOOT_NOT_OBSERVED, msg, now, &mut fx);
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
                    return (s, fx);
                }
                Some(PhaseRecord::Logoff { .. }) => {
                    // Ending sessions is idempotent: start it again.
                    let r = s.running.as_ref().expect("phase implies running");
                    fx.push(Effect::Logoff {
                        assignment_id: r.assignment.assignment_id.clone(),
                        spec: r.assignment.power.clone().unwrap_or_else(default_power),
                    });
                    return (s, fx);
                }
                _ => {}
            }
            let resumable = s.running.as_ref().is_some_and(|r| {
                matches!(
                    r.assignment.kind,
                    AssignmentKind::SoftwareStage
                        | AssignmentKind::ImageStage
                        | AssignmentKind::ImageRemove
                ) && !r.cancel_requested
            });
            let image_step = s.running.as_ref().and_then(|r| match r.phase {
                Some(PhaseRecord::Scripts { from })
                    if r.assignment.kind == AssignmentKind::ImageApply =>
                {
                    Some(from)
                }
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
                let from = if from == super::codes::ACTIVATE_STEP {
                    super::codes::UNDO_STEP
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
                return (s, fx);
            }
            if resumable {
                // Staging installs nothing and every step is idempotent (resumed downloads,
                // extraction into a fresh directory), so it continues instead of failing.
                let r = s.running.take().expect("checked above");
                s.queue.push_front(r.assignment);
                fx.push(Effect::Persist);
            } else if let Some(r) = s.running.take() {
                // The previous process died mid-run. Its script is not re-run: kill what is left
                // (only if we are still in the boot that owns that process group) and report.
                if let Some(pgid) = r.pgid.filter(|_| r.boot_id == s.boot_id) {
                    fx.push(Effect::KillGroup(pgid));
                }
                let mut result = failed(
                    AGENT_RESTARTED,
                    "the agent restarted while this assignment was running; its scripts were \
                     stopped and not re-run"
                        .into(),
                    Some(r.started_at.clone()),
                    now,
                );
                s.record(&r.assignment, &mut result);
                fx.push(Effect::Emit(result_event(
                    &r.assignment.assignment_id,
                    result,
                    now,
                )));
                fx.push(Effect::Persist);
            }
            s.start_next(now, &mut fx);
        }
        Event::Offered(list) => {
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
                        let mut r = failed(INVALID_ASSIGNMENT, why, None, now);
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
            s.start_next(now, &mut fx);
        }
        Event::CancelRequested(ids) => {
            let mut changed = false;
            for id in &ids {
                if let Some(r) = s
                    .running
                    .as_mut()
                    .filter(|r| &r.assignment.assignment_id == id)
                {
                    if !r.cancel_requested {
                        r.cancel_requested = true;
                        changed = true;
                        fx.push(Effect::Cancel(id.clone()));
                        if matches!(r.phase, Some(PhaseRecord::Logoff { .. })) {
                            // Nothing irreversible has started: stop waiting and report.
                            let mut res =
                                cancelled("cancelled by the operator during the logoff step", now);
                            res.started_at = Some(r.started_at.clone());
                            s.finish_running(res, now, &mut fx);
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
        Event::Spawned {
            assignment_id,
            pgid,
        } => {
            if let Some(r) = s
                .running
                .as_mut()
                .filter(|r| r.assignment.assignment_id == assignment_id)
            {
                r.pgid = Some(pgid);
                fx.push(Effect::Persist);
            }
        }
        Event::Finished {
            assignment_id,
            result,
            reboot_after,
        } => {
            let power_next = s
                .running
                .as_ref()
                .filter(|r| r.assignment.assignment_id == assignment_id)
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
                return (s, fx);
            }
            let mut result = match s.running.as_mut() {
                Some(r) if r.assignment.assignment_id == assignment_id => {
                    merge(r.carry.take(), result)
                }
                _ => result,
            };
            match s.running.take() {
                Some(r) if r.assignment.assignment_id == assignment_id => {
                    s.record(&r.assignment, &mut result);
                    if result.state == "SUCCEEDED" && result.staged_commit.is_some() {
                        s.staged_commit = result.staged_commit.clone();
                    }
                    fx.push(Effect::Emit(result_event(&assignment_id, result, now)));
                    fx.push(Effect::Persist);
                }
                other => s.running = other,
            }
            s.start_next(now, &mut fx);
        }
        Event::LogoffDone {
            assignment_id,
            outcome,
        } => {
            let next = match s.running.as_ref() {
                Some(r) if r.assignment.assignment_id == assignment_id => match &r.phase {
                    Some(PhaseRecord::Logoff { next, .. }) => next.clone(),
                    _ => return (s, fx),
                },
                _ => return (s, fx),
            };
            match outcome {
                Ok(()) => s.go(&next, now, &mut fx),
                Err((code, msg)) => s.fail_running(&code, msg, now, &mut fx),
            }
        }
        Event::PowerIssued { assignment_id } => {
            let stop = matches!(
                s.running
                    .as_ref()
                    .filter(|r| r.assignment.assignment_id == assignment_id)
                    .and_then(|r| r.phase.as_ref()),
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
                if let Some(ev) = s.power_event("SHUTTING_DOWN", now) {
                    fx.push(Effect::Emit(ev));
                }
                fx.push(Effect::Persist);
            }
        }
        Event::PowerFailed { assignment_id, msg } => {
            let ours = s
                .running
                .as_ref()
                .is_some_and(|r| r.assignment.assignment_id == assignment_id);
            if ours {
                s.fail_running(POWER_COMMAND_FAILED, msg, now, &mut fx);
            }
        }
        Event::RebootTimeout { assignment_id } => {
            let pending = s.running.as_ref().and_then(|r| {
                (r.assignment.assignment_id == assignment_id).then_some(r.phase.clone())?
            });
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
                        // The result normally went out when the shutdown was issued; if it
                        // is still carried (the agent restarted before the command ran), it
                        // goes out now, or it would be lost.
                        match s.running.as_mut().and_then(|r| r.carry.take()) {
                            Some(result) => s.finish_running(result, now, &mut fx),
                            None => {
                                s.running = None;
                                fx.push(Effect::Persist);
                                s.start_next(now, &mut fx);
                            }
                        }
                    } else {
                        s.fail_running(REBOOT_NOT_OBSERVED, msg, now, &mut fx);
                    }
                }
            }
        }
    }
    (s, fx)
}

fn default_power() -> PowerSpec {
    PowerSpec {
        pre_start: None,
        post_finish: None,
        logoff_policy: "WAIT_FOR_LOGOFF".into(),
        logoff_timeout_seconds: 3600,
        force_logoff_grace_seconds: 300,
    }
}

/// The step after a script run: a reboot asked for by exit code 194, or the post-finish
/// power step. `None`: report the result now. A cancelled run does no power steps.
fn after_scripts(r: &Running, result: &RunResult, reboot_after: Option<usize>) -> Option<Next> {
    let reboot_then = |n: Next| Next::power(PowerKind::Reboot, n);
    if r.assignment.kind == AssignmentKind::ImageApply {
        // Image steps ask for the reboot that follows them (after activation, after a
        // rollback); the next step runs in the new boot.
        return reboot_after.map(|i| reboot_then(Next::Scripts(i + 1)));
    }
    if result.state == "CANCELLED" || r.assignment.kind != AssignmentKind::ScriptExecution {
        return None;
    }
    let post = r
        .assignment
        .power
        .as_ref()
        .and_then(|p| p.post_finish.clone());
    let post = post.and_then(|p| match p.as_str() {
        "reboot" => Some(PowerKind::Reboot),
        "stop" => Some(PowerKind::Stop),
        // Validated when accepted: no other value reaches here.
        _ => None,
    });
    match reboot_after {
        Some(i) if i + 1 < r.assignment.scripts.len() => Some(reboot_then(Next::Scripts(i + 1))),
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

impl From<StateFile> for AgentState {
    fn from(f: StateFile) -> Self {
        AgentState {
            queue: f.queue.into(),
            running: f.running.map(|r| Running {
                assignment: r.assignment,
                started_at: r.started_at,
                pgid: r.pgid,
                boot_id: r.boot_id,
                cancel_requested: r.cancel_requested,
                phase: r.phase,
                reboots: r.reboots,
                carry: r.carry,
            }),
            recent: f.recent.into(),
            seen: f.seen.into(),
            boot_id: String::new(),
            staged_commit: f.staged_commit,
            image: f.image,
            reboot_timeout: std::time::Duration::from_secs(600),
        }
    }
}

impl From<&AgentState> for StateFile {
    fn from(s: &AgentState) -> Self {
        StateFile {
            version: 1,
            queue: s.queue.iter().cloned().collect(),
            running: s.running.as_ref().map(|r| RunningRecord {
                assignment: r.assignment.clone(),
                started_at: r.started_at.clone(),
                pgid: r.pgid,
                boot_id: r.boot_id.clone(),
                cancel_requested: r.cancel_requested,
                phase: r.phase.clone(),
                reboots: r.reboots,
                carry: r.carry.clone(),
            }),
            recent: s.recent.iter().cloned().collect(),
            seen: s.seen.iter().cloned().collect(),
            staged_commit: s.staged_commit.clone(),
            image: s.image.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::agent::ScriptPayload;

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
    }

    fn assignment(id: &str) -> Assignment {
        let content = "echo hi".to_string();
        Assignment {
            assignment_id: id.into(),
            task_id: "t".into(),
            kind: AssignmentKind::ScriptExecution,
            scripts: vec![ScriptPayload {
                name: "s".into(),
                command_type: "sh".into(),
                sha256: hex::encode(Sha256::digest(content.as_bytes())),
                content,
            }],
            timeout_seconds: 60,
            stage: None,
            power: None,
            image: None,
        }
    }

    fn stage_assignment(id: &str) -> Assignment {
        Assignment {
            assignment_id: id.into(),
            task_id: "t".into(),
            kind: AssignmentKind::SoftwareStage,
            scripts: Vec::new(),
            timeout_seconds: 60,
            stage: Some(crate::proto::agent::StagePayload {
                commit: "3".into(),
                components: vec![crate::proto::agent::PayloadRef {
                    name: "tools".into(),
                    version: "1".into(),
                    sha256: "ab".repeat(32),
                    size: 10,
                    format: "tar.gz".into(),
                    unpacked_size: None,
                    signature: None,
                }],
            }),
            power: None,
            image: None,
        }
    }

    /// A state file written by 0.1.0 (committed as a fixture): its agent died in a
    /// post-finish reboot with a second assignment queued. This version reads it and, in the
    /// new boot, reports the reboot and the result once, then runs the queued one.
    #[test]
    fn a_state_file_from_0_1_0_mid_reboot_with_a_queue_carries_on() {
        let text =
            include_str!("../../tests/fixtures/agent-state-0.1.0-mid-reboot-with-queue.json");
        let file: StateFile = serde_json::from_str(text).expect("the 0.1.0 state file parses");
        let running = file
            .running
            .as_ref()
            .unwrap()
            .assignment
            .assignment_id
            .clone();
        let queued = file.queue[0].assignment_id.clone();
        let mut s = AgentState::from(file);
        s.reboot_timeout = std::time::Duration::from_secs(600);
        let (s, fx) = step(
            s,
            Event::Boot {
                boot_id: "boot-after-the-reboot".into(),
            },
            now(),
        );
        let keys: Vec<String> = fx
            .iter()
            .filter_map(|e| match e {
                Effect::Emit(ev) => Some(ev.idempotency_key.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(
            keys,
            vec![
                format!("{running}:power:1:REBOOTED"),
                format!("{running}:result"),
                format!("{queued}:started"),
            ]
        );
        assert!(fx
            .iter()
            .any(|e| matches!(e, Effect::Start(a) if a.assignment_id == queued)));
        assert_eq!(s.running.as_ref().unwrap().assignment.assignment_id, queued);
    }

    #[test]
    fn an_interrupted_stage_resumes_instead_of_failing() {
        let (s, _) = step(
            booted(),
            Event::Offered(vec![stage_assignment("s1")]),
            now(),
        );
        assert!(s.running.is_some());
        let (s, fx) = step(
            s,
            Event::Boot {
                boot_id: "b1".into(),
            },
            now(),
        );
        assert_eq!(s.running.as_ref().unwrap().assignment.assignment_id, "s1");
        assert!(fx
            .iter()
            .any(|e| matches!(e, Effect::Start(a) if a.assignment_id == "s1")));
        assert!(!fx.iter().any(|e| matches!(e, Effect::Emit(ev)
            if matches!(&ev.body, EventBody::Result(_)))));
        let mut done = result("SUCCEEDED");
        done.staged_commit = Some("3".into());
        let (s, _) = step(
            s,
            Event::Finished {
                assignment_id: "s1".into(),
                result: done,
                reboot_after: None,
            },
            now(),
        );
        assert_eq!(s.staged_commit.as_deref(), Some("3"));
        assert_eq!(StateFile::from(&s).staged_commit.as_deref(), Some("3"));
    }

    #[test]
    fn stage_assignments_are_validated() {
        assert!(validate(&stage_assignment("s")).is_ok());
        let mut bad = stage_assignment("s");
        bad.stage.as_mut().unwrap().components[0].format = "zip".into();
        assert!(validate(&bad).unwrap_err().contains("zip"));
        let mut bad = stage_assignment("s");
        bad.stage = None;
        assert!(validate(&bad).is_err());
    }

    fn powered(id: &str, pre: Option<&str>, post: Option<&str>, scripts: usize) -> Assignment {
        let mut a = assignment(id);
        let one = a.scripts[0].clone();
        a.scripts = vec![one; scripts];
        a.power = Some(PowerSpec {
            pre_start: pre.map(str::to_string),
            post_finish: post.map(str::to_string),
            logoff_policy: "WAIT_FOR_LOGOFF".into(),
            logoff_timeout_seconds: 5,
            force_logoff_grace_seconds: 0,
        });
        a
    }

    fn keys(fx: &[Effect]) -> Vec<String> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Emit(ev) => Some(ev.idempotency_key.clone()),
                _ => None,
            })
            .collect()
    }

    fn logoff_ok(s: AgentState, id: &str) -> (AgentState, Vec<Effect>) {
        step(
            s,
            Event::LogoffDone {
                assignment_id: id.into(),
                outcome: Ok(()),
            },
            now(),
        )
    }

    #[test]
    fn post_finish_reboot_reports_once_after_the_new_boot() {
        let (s, _) = step(
            booted(),
            Event::Offered(vec![powered("p", None, Some("reboot"), 1)]),
            now(),
        );
        let (s, fx) = step(
            s,
            Event::Finished {
                assignment_id: "p".into(),
                result: result("SUCCEEDED"),
                reboot_after: None,
            },
            now(),
        );
        assert!(keys(&fx).is_empty(), "no result before the reboot: {fx:?}");
        assert!(fx.iter().any(|e| matches!(e, Effect::Logoff { .. })));
        let (s, fx) = logoff_ok(s, "p");
        let persist = pos(&fx, |e| *e == Effect::Persist);
        let power = pos(&fx, |e| {
            matches!(
                e,
                Effect::Power {
                    kind: PowerKind::Reboot,
                    ..
                }
            )
        });
        assert!(persist < power, "persist before the power command");
        assert_eq!(keys(&fx), vec!["p:power:1:REBOOTING"]);
        // A restart in the same boot is not a reboot.
        let (s2, fx) = step(
            s.clone(),
            Event::Boot {
                boot_id: "b1".into(),
            },
            now(),
        );
        assert!(fx.iter().any(|e| matches!(e, Effect::WaitReboot { .. })));
        assert!(keys(&fx).is_empty());
        let (_, fx) = step(
            s2,
            Event::RebootTimeout {
                assignment_id: "p".into(),
            },
            now(),
        );
        let failed: Vec<_> = fx
            .iter()
            .filter_map(|e| match e {
                Effect::Emit(ev) => match &ev.body {
                    EventBody::Result(r) => r.error_code.clone(),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        assert_eq!(failed, vec![REBOOT_NOT_OBSERVED.to_string()]);
        // A new boot id proves the reboot: one REBOOTED, one result.
        let (s3, fx) = step(
            s,
            Event::Boot {
                boot_id: "b2".into(),
            },
            now(),
        );
        assert_eq!(keys(&fx), vec!["p:power:1:REBOOTED", "p:result"]);
        assert!(s3.running.is_none());
    }

    #[test]
    fn a_restart_during_the_logoff_step_resumes_it() {
        let (s, _) = step(
            booted(),
            Event::Offered(vec![powered("q", Some("logoff"), None, 1)]),
            now(),
        );
        let (s, fx) = step(
            s,
            Event::Boot {
                boot_id: "b1".into(),
            },
            now(),
        );
        assert!(
            fx.iter()
                .any(|e| matches!(e, Effect::Logoff { assignment_id, .. } if assignment_id == "q")),
            "{fx:?}"
        );
        assert!(keys(&fx).is_empty(), "nothing reported: {fx:?}");
        assert!(s.running.is_some());
    }

    #[test]
    fn pre_start_reboot_runs_the_scripts_after_the_boot() {
        let (s, fx) = step(
            booted(),
            Event::Offered(vec![powered("p", Some("reboot"), None, 1)]),
            now(),
        );
        assert!(
            !fx.iter().any(|e| matches!(e, Effect::Start(_))),
            "scripts wait: {fx:?}"
        );
        let (s, _) = logoff_ok(s, "p");
        let (s, fx) = step(
            s,
            Event::Boot {
                boot_id: "b9".into(),
            },
            now(),
        );
        assert!(fx
            .iter()
            .any(|e| matches!(e, Effect::Start(a) if a.assignment_id == "p")));
        let (_, fx) = step(
            s,
            Event::Finished {
                assignment_id: "p".into(),
                result: result("SUCCEEDED"),
                reboot_after: None,
            },
            now(),
        );
        assert_eq!(keys(&fx), vec!["p:result"]);
    }

    #[test]
    fn exit_194_continues_after_the_reboot_and_loops_are_refused() {
        let (mut s, _) = step(
            booted(),
            Event::Offered(vec![powered("p", None, None, 6)]),
            now(),
        );
        let mut boot = 1;
        for i in 0..3 {
            let (s1, fx) = step(
                s,
                Event::Finished {
                    assignment_id: "p".into(),
                    result: result("SUCCEEDED"),
                    reboot_after: Some(i),
                },
                now(),
            );
            assert!(keys(&fx).is_empty());
            let (s1, _) = logoff_ok(s1, "p");
            boot += 1;
            let (s1, fx) = step(
                s1,
                Event::Boot {
                    boot_id: format!("b{boot}"),
                },
                now(),
            );
            assert!(
                fx.iter()
                    .any(|e| matches!(e, Effect::Resume { from, .. } if *from == i + 1)),
                "{fx:?}"
            );
            s = s1;
        }
        let (s, _) = step(
            s,
            Event::Finished {
                assignment_id: "p".into(),
                result: result("SUCCEEDED"),
                reboot_after: Some(3),
            },
            now(),
        );
        let (_, fx) = logoff_ok(s, "p");
        assert!(!fx.iter().any(|e| matches!(e, Effect::Power { .. })));
        let codes: Vec<_> = fx
            .iter()
            .filter_map(|e| match e {
                Effect::Emit(ev) => match &ev.body {
                    EventBody::Result(r) => r.error_code.clone(),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        assert_eq!(codes, vec![REBOOT_LOOP.to_string()]);
    }

    fn booted() -> AgentState {
        step(
            AgentState {
                reboot_timeout: std::time::Duration::from_secs(600),
                ..AgentState::default()
            },
            Event::Boot {
                boot_id: "b1".into(),
            },
            now(),
        )
        .0
    }

    fn result(state: &str) -> RunResult {
        RunResult {
            state: state.into(),
            exit_code: Some(0),
            ..failed("", String::new(), None, now())
        }
    }

    fn pos(fx: &[Effect], f: impl Fn(&Effect) -> bool) -> usize {
        fx.iter().position(f).expect("effect present")
    }

    #[test]
    fn persists_before_start_and_acks_after_persist() {
        let (s, fx) = step(
            booted(),
            Event::Offered(vec![assignment("a1"), assignment("a2")]),
            now(),
        );
        let persist = pos(&fx, |e| *e == Effect::Persist);
        let start = pos(
            &fx,
            |e| matches!(e, Effect::Start(a) if a.assignment_id == "a1"),
        );
        let ack = pos(&fx, |e| matches!(e, Effect::Ack { .. }));
        assert!(persist < start && persist < ack);
        assert_eq!(s.queue.len(), 1, "one operation at a time: a2 waits");
        assert_eq!(s.running.as_ref().unwrap().assignment.assignment_id, "a1");
    }

    #[test]
    fn redelivered_assignment_is_acked_but_never_queued_twice() {
        let (s, _) = step(booted(), Event::Offered(vec![assignment("a1")]), now());
        let (s, fx) = step(s, Event::Offered(vec![assignment("a1")]), now());
        assert!(s.queue.is_empty());
        assert!(!fx
            .iter()
            .any(|e| matches!(e, Effect::Start(_) | Effect::Persist)));
        assert!(fx.contains(&Effect::Ack {
            assignments: vec!["a1".into()],
            cancels: vec![]
        }));
    }

    #[test]
    fn result_is_emitted_before_the_run_is_forgotten_then_next_starts() {
        let (s, _) = step(
            booted(),
            Event::Offered(vec![assignment("a1"), assignment("a2")]),
            now(),
        );
        let (s, fx) = step(
            s,
            Event::Finished {
                assignment_id: "a1".into(),
                result: result("SUCCEEDED"),
                reboot_after: None,
            },
            now(),
        );
        let emit = pos(
            &fx,
            |e| matches!(e, Effect::Emit(ev) if ev.idempotency_key == "a1:result"),
        );
        let persist = pos(&fx, |e| *e == Effect::Persist);
        assert!(emit < persist);
        assert!(fx
            .iter()
            .any(|e| matches!(e, Effect::Start(a) if a.assignment_id == "a2")));
        assert_eq!(s.recent[0].assignment_id, "a1");
    }

    #[test]
    fn restart_mid_run_kills_the_group_and_reports_once() {
        let (s, _) = step(booted(), Event::Offered(vec![assignment("a1")]), now());
        let (s, _) = step(
            s,
            Event::Spawned {
                assignment_id: "a1".into(),
                pgid: 4242,
            },
            now(),
        );
        // Simulate a restart: reload from the persisted form.
        let reloaded = AgentState::from(StateFile::from(&s));
        let (s2, fx) = step(
            reloaded,
            Event::Boot {
                boot_id: "b1".into(),
            },
            now(),
        );
        assert_eq!(fx[0], Effect::KillGroup(4242));
        let results: Vec<_> = fx
            .iter()
            .filter_map(|e| match e {
                Effect::Emit(ev) => match &ev.body {
                    EventBody::Result(r) => {
                        Some((ev.idempotency_key.clone(), r.error_code.clone()))
                    }
                    _ => None,
                },
                _ => None,
            })
            .collect();
        assert_eq!(
            results,
            vec![("a1:result".to_string(), Some(AGENT_RESTARTED.to_string()))]
        );
        assert!(s2.running.is_none());
        // A second restart reports nothing more.
        let (_, fx) = step(
            s2,
            Event::Boot {
                boot_id: "b1".into(),
            },
            now(),
        );
        assert!(fx.is_empty());
    }

    #[test]
    fn after_a_reboot_the_old_pgid_is_not_killed() {
        let (s, _) = step(booted(), Event::Offered(vec![assignment("a1")]), now());
        let (s, _) = step(
            s,
            Event::Spawned {
                assignment_id: "a1".into(),
                pgid: 7,
            },
            now(),
        );
        let (_, fx) = step(
            s,
            Event::Boot {
                boot_id: "b2".into(),
            },
            now(),
        );
        assert!(!fx.iter().any(|e| matches!(e, Effect::KillGroup(_))));
    }

    #[test]
    fn cancel_running_queued_and_unknown() {
        let (s, _) = step(
            booted(),
            Event::Offered(vec![assignment("a1"), assignment("a2")]),
            now(),
        );
        let (s, fx) = step(
            s,
            Event::CancelRequested(vec!["a1".into(), "a2".into(), "a3".into()]),
            now(),
        );
        assert!(fx.contains(&Effect::Cancel("a1".into())));
        let emitted: Vec<_> = fx
            .iter()
            .filter_map(|e| match e {
                Effect::Emit(ev) => Some(ev.assignment_id.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(emitted, vec!["a2", "a3"]);
        assert!(s.queue.is_empty());
        // a3 arriving later is never run.
        let (_, fx) = step(s, Event::Offered(vec![assignment("a3")]), now());
        assert!(!fx.iter().any(|e| matches!(e, Effect::Start(_))));
    }

    #[test]
    fn tampered_script_is_refused() {
        let mut a = assignment("a1");
        a.scripts[0].content.push_str("; rm -rf /");
        let (s, fx) = step(booted(), Event::Offered(vec![a]), now());
        assert!(s.running.is_none());
        assert!(fx.iter().any(|e| matches!(e, Effect::Emit(ev)
            if matches!(&ev.body, EventBody::Result(r) if r.error_code.as_deref() == Some(INVALID_ASSIGNMENT)))));
    }

    fn image_apply(id: &str) -> Assignment {
        Assignment {
            kind: AssignmentKind::ImageApply,
            scripts: Vec::new(),
            power: Some(default_power()),
            image: Some(crate::proto::agent::ImageAssignment {
                image_id: "img-2".into(),
                ..Default::default()
            }),
            ..assignment(id)
        }
    }

    fn done(s: AgentState, reboot_after: Option<usize>, r: RunResult) -> (AgentState, Vec<Effect>) {
        step(
            s,
            Event::Finished {
                assignment_id: "i1".into(),
                result: r,
                reboot_after,
            },
            now(),
        )
    }

    fn reboot_into(s: AgentState, boot: &str) -> (AgentState, Vec<Effect>) {
        step(
            s,
            Event::Boot {
                boot_id: boot.into(),
            },
            now(),
        )
    }

    fn report(id: &str, state: &str) -> Option<Box<ImageRecord>> {
        Some(Box::new(ImageRecord {
            current_image_id: Some(id.into()),
            current_image_state: Some(state.into()),
            ..ImageRecord::default()
        }))
    }

    #[test]
    fn image_apply_logs_off_activates_reboots_then_checks_health() {
        let (s, fx) = step(booted(), Event::Offered(vec![image_apply("i1")]), now());
        assert!(
            fx.iter().any(|e| matches!(e, Effect::Logoff { .. })),
            "users leave before the switch: {fx:?}"
        );
        assert!(!fx.iter().any(|e| matches!(e, Effect::Start(_))));
        let (s, fx) = logoff_ok(s, "i1");
        assert!(fx
            .iter()
            .any(|e| matches!(e, Effect::Start(a) if a.assignment_id == "i1")));
        // Activation succeeded and asks for the reboot (after another logoff check).
        let (s, fx) = done(
            s,
            Some(super::super::codes::ACTIVATE_STEP),
            result("SUCCEEDED"),
        );
        assert!(
            fx.iter().any(|e| matches!(e, Effect::Logoff { .. })),
            "{fx:?}"
        );
        let (s, fx) = logoff_ok(s, "i1");
        let persist = pos(&fx, |e| *e == Effect::Persist);
        let power = pos(&fx, |e| {
            matches!(
                e,
                Effect::Power {
                    kind: PowerKind::Reboot,
                    ..
                }
            )
        });
        assert!(persist < power, "the step is on disk before the reboot");
        // Only a new boot id runs the health check, as step 1.
        let (s, fx) = reboot_into(s, "b2");
        assert!(
            fx.iter().any(|e| matches!(e, Effect::Resume { from, .. } if *from == super::super::codes::HEALTH_STEP)),
            "{fx:?}"
        );
        let mut ok = result("SUCCEEDED");
        ok.image = report("img-2", "READY");
        let (s, fx) = done(s, None, ok);
        let sent = fx.iter().find_map(|e| match e {
            Effect::Emit(ev) if ev.idempotency_key == "i1:result" => match &ev.body {
                EventBody::Result(r) => r.image.clone(),
                _ => None,
            },
            _ => None,
        });
        assert_eq!(
            sent.as_deref(),
            Some(&s.image),
            "the agent's record goes with the result"
        );
        assert!(s.running.is_none());
        assert_eq!(s.image.current_image_id.as_deref(), Some("img-2"));
        assert_eq!(s.image.current_image_state.as_deref(), Some("READY"));
    }

    #[test]
    fn failed_health_check_reboots_into_the_rollback_and_verifies() {
        let (s, _) = step(booted(), Event::Offered(vec![image_apply("i1")]), now());
        let (s, _) = logoff_ok(s, "i1");
        let (s, _) = done(s, Some(0), result("SUCCEEDED"));
        let (s, _) = logoff_ok(s, "i1");
        let (s, _) = reboot_into(s, "b2");
        let mut bad = result("FAILED");
        bad.error_code = Some("IMAGE_HEALTH_CHECK_FAILED".into());
        bad.stdout = "bad\n".into();
        let (s, _) = done(s, Some(super::super::codes::HEALTH_STEP), bad);
        let (s, fx) = logoff_ok(s, "i1");
        assert!(fx.iter().any(|e| matches!(
            e,
            Effect::Power {
                kind: PowerKind::Reboot,
                ..
            }
        )));
        let (s, fx) = reboot_into(s, "b3");
        assert!(fx.iter().any(|e| matches!(e, Effect::Resume { from, .. } if *from == super::super::codes::VERIFY_STEP)));
        let mut verified = result("FAILED");
        verified.error_code = Some("IMAGE_HEALTH_CHECK_FAILED".into());
        verified.stdout = "good\n".into();
        verified.image = report("img-1", "READY");
        let (s, fx) = done(s, None, verified);
        let out = fx.iter().find_map(|e| match e {
            Effect::Emit(ev) if ev.idempotency_key == "i1:result" => match &ev.body {
                EventBody::Result(r) => Some(r.clone()),
                _ => None,
            },
            _ => None,
        });
        let out = out.expect("one result");
        assert_eq!(out.error_code.as_deref(), Some("IMAGE_HEALTH_CHECK_FAILED"));
        assert_eq!(out.stdout, "bad\ngood\n", "output of every step");
        assert_eq!(s.image.current_image_id.as_deref(), Some("img-1"));
    }

    #[test]
    fn a_restart_during_activation_undoes_it_and_health_checks_run_again() {
        let (s, _) = step(booted(), Event::Offered(vec![image_apply("i1")]), now());
        let (s, _) = logoff_ok(s, "i1");
        let (s, _) = step(
            s,
            Event::Spawned {
                assignment_id: "i1".into(),
                pgid: 4242,
            },
            now(),
        );
        // Same boot: the agent process died during the activate hook.
        let (s2, fx) = reboot_into(s.clone(), "b1");
        assert!(fx.contains(&Effect::KillGroup(4242)));
        assert!(fx.iter().any(
            |e| matches!(e, Effect::Resume { from, .. } if *from == super::super::codes::UNDO_STEP)
        ));
        assert!(s2.running.is_some(), "not reported as a plain restart");
        // During a health check (step 1): the check runs again.
        let mut s3 = s;
        s3.running.as_mut().unwrap().phase = Some(PhaseRecord::Scripts { from: 1 });
        let (_, fx) = reboot_into(s3, "b1");
        assert!(fx
            .iter()
            .any(|e| matches!(e, Effect::Resume { from: 1, .. })));
    }

    #[test]
    fn an_unknown_kind_from_a_newer_controller_is_refused_not_fatal() {
        let mut wire = serde_json::to_value(assignment("u1")).unwrap();
        wire["kind"] = "quantum_teleport".into();
        wire["some_new_field"] = 1.into();
        let a: Assignment = serde_json::from_value(wire).expect("still parses");
        assert_eq!(a.kind, AssignmentKind::Unknown);
        let (s, fx) = step(booted(), Event::Offered(vec![a]), now());
        assert!(s.running.is_none() && s.queue.is_empty());
        let code = fx.iter().find_map(|e| match e {
            Effect::Emit(ev) => match &ev.body {
                EventBody::Result(r) => r.error_code.clone(),
                _ => None,
            },
            _ => None,
        });
        assert_eq!(code.as_deref(), Some(INVALID_ASSIGNMENT));
        assert!(
            fx.iter().any(|e| matches!(e, Effect::Ack { .. })),
            "acknowledged"
        );
    }
}
