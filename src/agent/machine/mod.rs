//! The agent's state machine as a pure function: `step(state, event, now) -> (state, effects)`.
//! The core loop (`agent::core`) performs the effects in order; nothing here does I/O, so every
//! rule about ordering, dedup and recovery is unit-tested on plain values.
//!
//! Ordering rules the effects encode:
//! - `Persist` comes before `Start` (a script never runs without a durable record of it);
//! - a result is `Emit`ted (durable outbox) before the state that forgets the run is persisted,
//!   so a crash in between re-reports the run under the same idempotency key, never loses it;
//! - `Ack` comes after `Persist`, so the controller stops offering only what is on disk.
//!
//! Inside: [`validate`] (what is refused before it is queued), `handlers` (one function per
//! event; `step` only dispatches) and `bookkeeping` (what several handlers share: dedup, the
//! image record, starting and ending runs, moving between steps).

use std::collections::VecDeque;

use time::OffsetDateTime;

use crate::agent::codes::Failure;
use crate::proto::agent::{AgentEvent, Assignment, EventBody, ImageRecord, PowerSpec, RunResult};
use crate::proto::domain::{ErrorCode, RunState};
use crate::proto::state::{PhaseRecord, PowerKind, RunningRecord, StateFile};
use crate::proto::status::RecentResult;
use crate::sys::clock;

mod bookkeeping;
mod handlers;
mod validate;

use handlers::default_power;
pub use validate::validate;

/// How many accepted assignment ids are remembered for dedup.
pub(super) const SEEN_LIMIT: usize = 1000;
/// How many results `fieldhand status` shows.
pub const RECENT_LIMIT: usize = 5;

pub use crate::agent::codes::{EXIT_REBOOT, MAX_REBOOTS};

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
    /// The logoff step ended: `Ok`, or why it failed.
    LogoffDone {
        assignment_id: String,
        outcome: Result<(), Failure>,
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

pub(super) fn result_event(
    assignment_id: &str,
    result: RunResult,
    now: OffsetDateTime,
) -> AgentEvent {
    AgentEvent {
        idempotency_key: format!("{assignment_id}:result"),
        assignment_id: assignment_id.to_string(),
        at: clock::rfc3339(now),
        body: EventBody::Result(result),
    }
}

pub(super) fn failed(
    code: ErrorCode,
    msg: String,
    started_at: Option<String>,
    now: OffsetDateTime,
) -> RunResult {
    RunResult {
        state: RunState::Failed,
        exit_code: None,
        stdout: String::new(),
        stderr: String::new(),
        output_truncated: false,
        started_at,
        finished_at: clock::rfc3339(now),
        error_code: Some(code),
        error_msg: Some(msg),
        staged_commit: None,
        image: None,
    }
}

pub(super) fn cancelled(msg: &str, now: OffsetDateTime) -> RunResult {
    RunResult {
        state: RunState::Cancelled,
        error_msg: Some(msg.into()),
        error_code: None,
        ..failed(ErrorCode::Cancelled, String::new(), None, now)
    }
}

/// The transition function: the state after `ev`, and the effects to perform in order.
pub fn step(mut s: AgentState, ev: Event, now: OffsetDateTime) -> (AgentState, Vec<Effect>) {
    let mut fx = Vec::new();
    match ev {
        Event::Boot { boot_id } => handlers::boot(&mut s, boot_id, now, &mut fx),
        Event::Offered(list) => handlers::offered(&mut s, list, now, &mut fx),
        Event::CancelRequested(ids) => handlers::cancel_requested(&mut s, ids, now, &mut fx),
        Event::Spawned {
            assignment_id,
            pgid,
        } => handlers::spawned(&mut s, assignment_id, pgid, &mut fx),
        Event::Finished {
            assignment_id,
            result,
            reboot_after,
        } => handlers::finished(&mut s, assignment_id, result, reboot_after, now, &mut fx),
        Event::LogoffDone {
            assignment_id,
            outcome,
        } => handlers::logoff_done(&mut s, assignment_id, outcome, now, &mut fx),
        Event::PowerIssued { assignment_id } => {
            handlers::power_issued(&mut s, assignment_id, now, &mut fx)
        }
        Event::PowerFailed { assignment_id, msg } => {
            handlers::power_failed(&mut s, assignment_id, msg, now, &mut fx)
        }
        Event::RebootTimeout { assignment_id } => {
            handlers::reboot_timeout(&mut s, assignment_id, now, &mut fx)
        }
    }
    (s, fx)
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
mod tests;
