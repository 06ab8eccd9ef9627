//! Property tests of the agent's pure state machine (`agent::machine::step`): random
//! sequences of offers, cancels, script ends, logoff and power outcomes, agent crashes (at any
//! point between two effects) and reboots. A small model of the core performs the effects in
//! order (persist, outbox, start). Whatever the sequence:
//! - a script assignment is never started before its state is persisted, and never started
//!   twice (a restart reports it, it does not re-run it);
//! - every result of one assignment carries its one idempotency key, and the first one in
//!   the outbox is the outcome (later ones are duplicates the controller ignores);
//! - no assignment the agent acknowledged is left without a result once the world lets
//!   every step finish.

use std::collections::{BTreeMap, BTreeSet};

use fieldhand::agent::codes::Failure;
use fieldhand::agent::machine::{step, AgentState, Effect, Event};
use fieldhand::proto::agent::{
    Assignment, AssignmentKind, EventBody, PayloadRef, PowerSpec, RunResult, ScriptPayload,
    StagePayload, Work,
};
use fieldhand::proto::domain::{ErrorCode, LogoffPolicy, PostFinish, PreStart, RunState};
use fieldhand::proto::state::StateFile;
use proptest::prelude::*;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

fn assignment(n: u8, kind: u8, power: u8) -> Assignment {
    let id = format!("a{n}");
    let content = "echo hi".to_string();
    let script = ScriptPayload {
        name: "s".into(),
        command_type: "sh".into(),
        sha256: hex::encode(Sha256::digest(content.as_bytes())),
        content,
    };
    let stage = StagePayload {
        commit: format!("{n}"),
        components: vec![PayloadRef {
            name: "p".into(),
            version: "1".into(),
            sha256: "ab".repeat(32),
            size: 10,
            format: "tar.gz".into(),
            unpacked_size: None,
            signature: None,
        }],
    };
    let spec = |pre: Option<&str>, post: Option<&str>| {
        Some(PowerSpec {
            pre_start: pre.map(|p| PreStart::parse(p).expect("a pre_start")),
            post_finish: post.map(|p| PostFinish::parse(p).expect("a post_finish")),
            logoff_policy: LogoffPolicy::ForceLogoff,
            logoff_timeout_seconds: 60,
            force_logoff_grace_seconds: 5,
        })
    };
    let is_stage = kind % 4 == 0;
    Assignment {
        assignment_id: id,
        task_id: "t".into(),
        work: if is_stage {
            Work::SoftwareStage(stage)
        } else {
            Work::Scripts(vec![script.clone(), script])
        },
        timeout_seconds: 60,
        power: match (is_stage, power % 5) {
            (true, _) | (_, 0) | (_, 1) => None,
            (_, 2) => spec(Some("reboot"), None),
            (_, 3) => spec(Some("logoff"), Some("reboot")),
            _ => spec(None, Some("stop")),
        },
    }
}

fn run_result(state: &str) -> RunResult {
    RunResult {
        state: RunState::parse(state).expect("a run state"),
        exit_code: Some(if state == "SUCCEEDED" { 0 } else { 1 }),
        stdout: String::new(),
        stderr: String::new(),
        output_truncated: false,
        started_at: None,
        finished_at: "2027-01-15T08:00:00Z".into(),
        error_code: None,
        error_msg: None,
        staged_commit: None,
        image: None,
    }
}

#[derive(Debug, Clone)]
enum Op {
    Offer(u8, u8, u8),
    Cancel(u8),
    Spawned,
    Finish(u8, bool),
    Logoff(bool),
    PowerIssued,
    PowerFailed,
    RebootTimeout,
    /// The agent dies after this many effects of the next step (then restarts).
    CrashMidStep(u8),
    Reboot,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..6, any::<u8>(), any::<u8>()).prop_map(|(n, k, p)| Op::Offer(n, k, p)),
        1 => (0u8..6).prop_map(Op::Cancel),
        2 => Just(Op::Spawned),
        3 => (any::<u8>(), any::<bool>()).prop_map(|(s, r)| Op::Finish(s, r)),
        2 => any::<bool>().prop_map(Op::Logoff),
        2 => Just(Op::PowerIssued),
        1 => Just(Op::PowerFailed),
        1 => Just(Op::RebootTimeout),
        1 => (0u8..8).prop_map(Op::CrashMidStep),
        1 => Just(Op::Reboot),
    ]
}

/// A model of the core: the state in memory, what is on disk, the outbox, the world.
struct World {
    state: AgentState,
    disk: StateFile,
    outbox: Vec<(String, String, RunState)>, // (assignment, key, result state)
    starts: BTreeMap<String, u32>,
    acked: BTreeSet<String>,
    kinds: BTreeMap<String, AssignmentKind>,
    boot: u32,
    crash_after: Option<usize>,
    now: OffsetDateTime,
}

impl World {
    fn new() -> World {
        let mut w = World {
            state: AgentState {
                reboot_timeout: std::time::Duration::from_secs(600),
                ..AgentState::default()
            },
            disk: StateFile::from(&AgentState::default()),
            outbox: Vec::new(),
            starts: BTreeMap::new(),
            acked: BTreeSet::new(),
            kinds: BTreeMap::new(),
            boot: 0,
            crash_after: None,
            now: OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap(),
        };
        w.feed(Event::Boot {
            boot_id: "b0".into(),
        });
        w
    }

    fn running_id(&self) -> Option<String> {
        self.state
            .running
            .as_ref()
            .map(|r| r.assignment.assignment_id.clone())
    }

    /// Restart from what is on disk (the same boot, or a new one).
    fn restart(&mut self, new_boot: bool) {
        if new_boot {
            self.boot += 1;
        }
        let mut s = AgentState::from(self.disk.clone());
        s.reboot_timeout = std::time::Duration::from_secs(600);
        self.state = s;
        self.feed(Event::Boot {
            boot_id: format!("b{}", self.boot),
        });
    }

    /// One step, its effects performed in order, as the core does (unless it crashes).
    fn feed(&mut self, ev: Event) {
        self.now += time::Duration::seconds(1);
        let (next, fx) = step(std::mem::take(&mut self.state), ev, self.now);
        self.state = next;
        let crash = self.crash_after.take();
        for (i, e) in fx.into_iter().enumerate() {
            if crash == Some(i) {
                self.restart(false);
                return;
            }
            match e {
                Effect::Persist => self.disk = StateFile::from(&self.state),
                Effect::Emit(ev) => {
                    if let EventBody::Result(r) = &ev.body {
                        assert_eq!(
                            ev.idempotency_key,
                            format!("{}:result", ev.assignment_id),
                            "a result under another key"
                        );
                        self.outbox.push((
                            ev.assignment_id.clone(),
                            ev.idempotency_key.clone(),
                            r.state,
                        ));
                    }
                }
                Effect::Start(a) => {
                    let on_disk = self
                        .disk
                        .running
                        .as_ref()
                        .map(|r| r.assignment.assignment_id.clone());
                    assert_eq!(
                        on_disk.as_deref(),
                        Some(a.assignment_id.as_str()),
                        "started {} before its state was persisted",
                        a.assignment_id
                    );
                    *self.starts.entry(a.assignment_id.clone()).or_default() += 1;
                    if a.work.kind() == AssignmentKind::ScriptExecution {
                        assert!(
                            self.starts[&a.assignment_id] <= 1,
                            "script assignment {} started twice",
                            a.assignment_id
                        );
                    }
                }
                Effect::Resume { assignment, .. } => {
                    let on_disk = self
                        .disk
                        .running
                        .as_ref()
                        .map(|r| r.assignment.assignment_id.clone());
                    assert_eq!(on_disk.as_deref(), Some(assignment.assignment_id.as_str()));
                }
                Effect::Ack { assignments, .. } => {
                    for a in assignments {
                        let on_disk = self.disk.queue.iter().any(|q| q.assignment_id == a)
                            || self
                                .disk
                                .running
                                .as_ref()
                                .is_some_and(|r| r.assignment.assignment_id == a)
                            || self.outbox.iter().any(|(id, _, _)| *id == a);
                        assert!(on_disk, "acknowledged {a} without a durable record");
                        self.acked.insert(a);
                    }
                }
                Effect::Logoff { .. }
                | Effect::Power { .. }
                | Effect::WaitReboot { .. }
                | Effect::Cancel(_)
                | Effect::KillGroup(_) => {}
            }
        }
    }

    fn apply(&mut self, op: &Op) {
        let running = self.running_id();
        match op.clone() {
            Op::Offer(n, k, p) => {
                let a = assignment(n, k, p);
                // An id always names the same work (the controller never reuses one).
                let kind = *self
                    .kinds
                    .entry(a.assignment_id.clone())
                    .or_insert(a.work.kind());
                if kind == a.work.kind() {
                    self.feed(Event::Offered(vec![a]));
                }
            }
            Op::Cancel(n) => self.feed(Event::CancelRequested(vec![format!("a{n}")])),
            Op::Spawned => {
                if let Some(id) = running {
                    self.feed(Event::Spawned {
                        assignment_id: id,
                        pgid: 4242,
                    })
                }
            }
            Op::Finish(s, reboot) => {
                if let Some(id) = running {
                    let state = ["SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELLED"][s as usize % 4];
                    self.feed(Event::Finished {
                        assignment_id: id,
                        result: run_result(state),
                        reboot_after: (reboot && state == "SUCCEEDED").then_some(0),
                    })
                }
            }
            Op::Logoff(ok) => {
                if let Some(id) = running {
                    self.feed(Event::LogoffDone {
                        assignment_id: id,
                        outcome: if ok {
                            Ok(())
                        } else {
                            Err(Failure::new(
                                ErrorCode::WaitForLogoffTimeout,
                                "users stayed",
                            ))
                        },
                    })
                }
            }
            Op::PowerIssued => {
                if let Some(id) = running {
                    self.feed(Event::PowerIssued { assignment_id: id })
                }
            }
            Op::PowerFailed => {
                if let Some(id) = running {
                    self.feed(Event::PowerFailed {
                        assignment_id: id,
                        msg: "no".into(),
                    })
                }
            }
            Op::RebootTimeout => {
                if let Some(id) = running {
                    self.feed(Event::RebootTimeout { assignment_id: id })
                }
            }
            Op::CrashMidStep(k) => self.crash_after = Some(k as usize),
            Op::Reboot => self.restart(true),
        }
    }

    /// Lets every pending step finish, as a well-behaved world would.
    fn settle(&mut self) {
        self.crash_after = None;
        for _ in 0..200 {
            let Some(r) = self.state.running.clone() else {
                if self.state.queue.is_empty() {
                    return;
                }
                // Nothing runs but work waits: a restart picks it up.
                self.restart(false);
                continue;
            };
            let id = r.assignment.assignment_id.clone();
            use fieldhand::proto::state::PhaseRecord;
            match &r.phase {
                Some(PhaseRecord::Logoff { .. }) => self.feed(Event::LogoffDone {
                    assignment_id: id,
                    outcome: Ok(()),
                }),
                Some(PhaseRecord::Power { .. }) => {
                    self.feed(Event::PowerIssued {
                        assignment_id: id.clone(),
                    });
                    if self.running_id().as_deref() == Some(id.as_str()) {
                        self.restart(true);
                    }
                }
                _ => self.feed(Event::Finished {
                    assignment_id: id,
                    result: run_result("SUCCEEDED"),
                    reboot_after: None,
                }),
            }
        }
        panic!("the machine never settled: {:?}", self.state.running);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("FIELDHAND_PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(512),
        .. ProptestConfig::default()
    })]

    #[test]
    fn random_event_sequences_keep_the_agents_promises(ops in proptest::collection::vec(op(), 1..60)) {
        let mut w = World::new();
        for o in &ops {
            w.apply(o);
        }
        w.settle();
        // Every acknowledged assignment has an outcome, and its first result is the one.
        for a in &w.acked {
            let results: Vec<_> = w.outbox.iter().filter(|(id, _, _)| id == a).collect();
            prop_assert!(!results.is_empty(), "{} was acknowledged but never got a result ({:?})", a, ops);
        }
        let keys: BTreeSet<_> = w.outbox.iter().map(|(_, k, _)| k.clone()).collect();
        for k in keys {
            let ids: BTreeSet<_> = w.outbox.iter().filter(|(_, kk, _)| *kk == k).map(|(id, _, _)| id.clone()).collect();
            prop_assert_eq!(ids.len(), 1);
        }
    }
}
