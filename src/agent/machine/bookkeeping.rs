//! The state's bookkeeping that several events share: dedup of offered ids, the image record,
//! recent results, and starting, moving on and ending the running assignment. Each method
//! appends the effects it needs, in the order the core must perform them.

use time::OffsetDateTime;

use super::{
    default_power, failed, result_event, AgentState, Effect, Running, MAX_REBOOTS, RECENT_LIMIT,
    SEEN_LIMIT,
};
use crate::proto::agent::{AgentEvent, Assignment, EventBody, PowerEvent, RunResult, Work};
use crate::proto::domain::{ErrorCode, PendingImageState, PowerPhase, PreStart, RunState};
use crate::proto::state::{Next, PhaseRecord, PowerKind};
use crate::proto::status::RecentResult;
use crate::sys::clock;

impl AgentState {
    /// The running assignment, if it is `id` (events about another one are stale).
    pub(super) fn running_for(&self, id: &str) -> Option<&Running> {
        self.running
            .as_ref()
            .filter(|r| r.assignment.assignment_id == id)
    }

    pub(super) fn running_mut(&mut self, id: &str) -> Option<&mut Running> {
        self.running
            .as_mut()
            .filter(|r| r.assignment.assignment_id == id)
    }

    pub(super) fn remember(&mut self, id: &str) {
        self.seen.push_back(id.to_string());
        while self.seen.len() > SEEN_LIMIT {
            self.seen.pop_front();
        }
    }

    pub(super) fn knows(&self, id: &str) -> bool {
        self.seen.iter().any(|s| s == id)
    }

    /// Keeps the image record in step with a finished image assignment, and attaches it to
    /// the result: the controller copies it rather than applying these rules again.
    pub(super) fn record_image(&mut self, a: &Assignment, r: &mut RunResult) {
        let Some(img) = a.work.image() else {
            return;
        };
        let ok = r.state == RunState::Succeeded;
        let pending_is_this = self.image.pending_image_id.as_deref() == Some(&img.image_id);
        match &a.work {
            Work::ImageStage { .. } if pending_is_this => {
                self.image.pending_image_state = Some(if ok {
                    PendingImageState::Ready
                } else {
                    PendingImageState::Failed
                });
            }
            Work::ImageApply(_) if pending_is_this && ok => {
                self.image.pending_image_id = None;
                self.image.pending_image_state = None;
            }
            Work::ImageApply(_) if pending_is_this && r.image.is_some() => {
                self.image.pending_image_state = Some(PendingImageState::Failed);
            }
            Work::ImageRemove(img) if ok && (img.remove_all || pending_is_this) => {
                self.image.pending_image_id = None;
                self.image.pending_image_state = None;
            }
            // Not this machine's pending image, or no image kind: nothing to note.
            Work::ImageStage { .. }
            | Work::ImageApply(_)
            | Work::ImageRemove(_)
            | Work::Scripts(_)
            | Work::SoftwareStage(_)
            | Work::Invalid { .. } => {}
        }
        if let Some(rep) = &r.image {
            self.image.current_image_id = rep.current_image_id.clone();
            self.image.current_image_state = rep.current_image_state;
        }
        r.image = Some(Box::new(self.image.clone()));
    }

    pub(super) fn record(&mut self, a: &Assignment, r: &mut RunResult) {
        self.record_image(a, r);
        self.recent.push_front(RecentResult {
            assignment_id: a.assignment_id.clone(),
            task_id: a.task_id.clone(),
            state: r.state,
            exit_code: r.exit_code,
            error_code: r.error_code,
            finished_at: r.finished_at.clone(),
        });
        self.recent.truncate(RECENT_LIMIT);
    }

    /// Starts the next queued assignment if nothing runs. Appends the effects.
    pub(super) fn start_next(&mut self, now: OffsetDateTime, fx: &mut Vec<Effect>) {
        if self.running.is_some() {
            return;
        }
        let Some(a) = self.queue.pop_front() else {
            return;
        };
        let pre_start = a.power.as_ref().and_then(|p| p.pre_start);
        let phase = match (&a.work, pre_start) {
            // Staging and removal touch no session and need no power step.
            (
                Work::SoftwareStage(_)
                | Work::ImageStage { .. }
                | Work::ImageRemove(_)
                | Work::Invalid { .. },
                _,
            ) => None,
            // Users leave (under the push's logoff policy) before the image is switched in.
            (Work::ImageApply(_), _) => Some(PhaseRecord::Logoff {
                next: Next::Scripts(0),
            }),
            (Work::Scripts(_), Some(PreStart::Reboot)) => Some(PhaseRecord::Logoff {
                next: Next::power(PowerKind::Reboot, Next::Scripts(0)),
            }),
            (Work::Scripts(_), Some(PreStart::Logoff)) => Some(PhaseRecord::Logoff {
                next: Next::Scripts(0),
            }),
            (Work::Scripts(_), None) => Some(PhaseRecord::Scripts { from: 0 }),
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
        if let Work::ImageStage { image, .. } = &a.work {
            self.image.pending_image_id = Some(image.image_id.clone());
            self.image.pending_image_state = Some(PendingImageState::Publishing);
        }
        match phase {
            Some(PhaseRecord::Logoff { .. }) => fx.push(Effect::Logoff {
                assignment_id: a.assignment_id.clone(),
                spec: a.power.clone().unwrap_or_else(default_power),
            }),
            Some(PhaseRecord::Scripts { .. } | PhaseRecord::Power { .. }) | None => {
                fx.push(Effect::Start(a))
            }
        }
    }

    /// Ends the running assignment with `result` and starts the next one.
    pub(super) fn finish_running(
        &mut self,
        mut result: RunResult,
        now: OffsetDateTime,
        fx: &mut Vec<Effect>,
    ) {
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

    /// A shutdown's run ends. Its result normally went out when the command was issued; if
    /// it is still carried, it goes out now (after the `SHUTTING_DOWN` announcement, when
    /// `announce`); otherwise the run is just forgotten. Then the next one starts.
    pub(super) fn end_shutdown(
        &mut self,
        announce: bool,
        now: OffsetDateTime,
        fx: &mut Vec<Effect>,
    ) {
        match self.running.as_mut().and_then(|r| r.carry.take()) {
            Some(result) => {
                if announce {
                    if let Some(ev) = self.power_event(PowerPhase::ShuttingDown, now) {
                        fx.push(Effect::Emit(ev));
                    }
                }
                self.finish_running(result, now, fx);
            }
            None => {
                self.running = None;
                fx.push(Effect::Persist);
                self.start_next(now, fx);
            }
        }
    }

    /// The failure of a power or logoff step, keeping the scripts' output so far.
    pub(super) fn fail_running(
        &mut self,
        code: ErrorCode,
        msg: String,
        now: OffsetDateTime,
        fx: &mut Vec<Effect>,
    ) {
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

    pub(super) fn power_event(&self, phase: PowerPhase, now: OffsetDateTime) -> Option<AgentEvent> {
        let r = self.running.as_ref()?;
        let id = &r.assignment.assignment_id;
        Some(AgentEvent {
            idempotency_key: format!("{id}:power:{}:{phase}", r.reboots),
            assignment_id: id.clone(),
            at: clock::rfc3339(now),
            body: EventBody::Power(PowerEvent {
                phase,
                boot_id: self.boot_id.clone(),
                count: r.reboots,
            }),
        })
    }

    /// Moves to the step `next`.
    pub(super) fn go(&mut self, next: &Next, now: OffsetDateTime, fx: &mut Vec<Effect>) {
        let Some(r) = self.running.as_mut() else {
            return;
        };
        let id = r.assignment.assignment_id.clone();
        match next {
            Next::Finish => {
                let result = r.carry.take().unwrap_or_else(|| {
                    failed(
                        ErrorCode::InternalError,
                        "no result to report".into(),
                        None,
                        now,
                    )
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
                    self.fail_running(ErrorCode::RebootLoop, msg, now, fx);
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
                    if let Some(ev) = self.power_event(PowerPhase::Rebooting, now) {
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
