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

use crate::proto::agent::{AgentEvent, Assignment, AssignmentKind, EventBody, RunResult};
use crate::proto::state::{RunningRecord, StateFile};
use crate::proto::status::RecentResult;
use crate::sys::clock;

/// How many accepted assignment ids are remembered for dedup.
const SEEN_LIMIT: usize = 1000;
/// How many results `fieldhand status` shows.
pub const RECENT_LIMIT: usize = 5;

pub const AGENT_RESTARTED: &str = "AGENT_RESTARTED";
pub const INVALID_ASSIGNMENT: &str = "INVALID_ASSIGNMENT";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    pub assignment: Assignment,
    pub started_at: String,
    pub pgid: Option<i32>,
    pub boot_id: String,
    pub cancel_requested: bool,
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
    /// The running assignment ended.
    Finished {
        assignment_id: String,
        result: RunResult,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Write the state file now.
    Persist,
    /// Append to the durable outbox.
    Emit(AgentEvent),
    /// Start executing this assignment (it is `running` in the persisted state).
    Start(Assignment),
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
    if a.kind == AssignmentKind::SoftwareStage {
        return validate_stage(a);
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
        if super::executor::interpreter(&s.command_type).is_none() {
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

    fn record(&mut self, a: &Assignment, r: &RunResult) {
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
        self.running = Some(Running {
            assignment: a.clone(),
            started_at: clock::rfc3339(now),
            pgid: None,
            boot_id: self.boot_id.clone(),
            cancel_requested: false,
        });
        fx.push(Effect::Persist);
        fx.push(Effect::Emit(AgentEvent {
            idempotency_key: format!("{}:started", a.assignment_id),
            assignment_id: a.assignment_id.clone(),
            at: clock::rfc3339(now),
            body: EventBody::Started,
        }));
        fx.push(Effect::Start(a));
    }
}

/// The transition function.
pub fn step(mut s: AgentState, ev: Event, now: OffsetDateTime) -> (AgentState, Vec<Effect>) {
    let mut fx = Vec::new();
    match ev {
        Event::Boot { boot_id } => {
            s.boot_id = boot_id;
            let resumable = s.running.as_ref().is_some_and(|r| {
                r.assignment.kind == AssignmentKind::SoftwareStage && !r.cancel_requested
            });
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
                let result = failed(
                    AGENT_RESTARTED,
                    "the agent restarted while this assignment was running; its scripts were \
                     stopped and not re-run"
                        .into(),
                    Some(r.started_at.clone()),
                    now,
                );
                s.record(&r.assignment, &result);
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
                        let r = failed(INVALID_ASSIGNMENT, why, None, now);
                        s.record(&a, &r);
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
                    }
                } else if let Some(pos) = s.queue.iter().position(|a| &a.assignment_id == id) {
                    let a = s.queue.remove(pos).expect("position came from this queue");
                    let r = cancelled("cancelled before it started", now);
                    s.record(&a, &r);
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
        } => {
            match s.running.take() {
                Some(r) if r.assignment.assignment_id == assignment_id => {
                    s.record(&r.assignment, &result);
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
            }),
            recent: f.recent.into(),
            seen: f.seen.into(),
            boot_id: String::new(),
            staged_commit: f.staged_commit,
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
            }),
            recent: s.recent.iter().cloned().collect(),
            seen: s.seen.iter().cloned().collect(),
            staged_commit: s.staged_commit.clone(),
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
        }
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

    fn booted() -> AgentState {
        step(
            AgentState::default(),
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
}
