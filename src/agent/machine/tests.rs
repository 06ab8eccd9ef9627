//! The state machine, tested on plain values: ordering, dedup, recovery after a restart or
//! a reboot, power and image steps.
// Each test picks out the one effect or event it looks at.
#![allow(clippy::wildcard_enum_match_arm)]

use sha2::{Digest, Sha256};

use super::*;
use crate::proto::agent::{AssignmentKind, ScriptPayload, Work};
use crate::proto::domain::{CurrentImageState, LogoffPolicy, PostFinish, PreStart};

fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
}

fn assignment(id: &str) -> Assignment {
    let content = "echo hi".to_string();
    Assignment {
        assignment_id: id.into(),
        task_id: "t".into(),
        work: Work::Scripts(vec![ScriptPayload {
            name: "s".into(),
            command_type: "sh".into(),
            sha256: hex::encode(Sha256::digest(content.as_bytes())),
            content,
        }]),
        timeout_seconds: 60,
        power: None,
    }
}

fn stage_assignment(id: &str) -> Assignment {
    Assignment {
        assignment_id: id.into(),
        task_id: "t".into(),
        timeout_seconds: 60,
        work: Work::SoftwareStage(crate::proto::agent::StagePayload {
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
    }
}

fn scripts_mut(a: &mut Assignment) -> &mut Vec<ScriptPayload> {
    match &mut a.work {
        Work::Scripts(s) => s,
        other => panic!("not a script execution: {other:?}"),
    }
}

/// The assignments of the 0.1.0 fixture (a script run with power steps, one queued) are
/// written back exactly as 0.1.0 wrote them: the typed `Work` loses nothing on the way, so
/// an agent rolled back to 0.1.0 reads this version's state file too.
#[test]
fn assignments_are_written_back_as_0_1_0_wrote_them() {
    let text = include_str!("../../../tests/fixtures/agent-state-0.1.0-mid-reboot-with-queue.json");
    let raw: serde_json::Value = serde_json::from_str(text).unwrap();
    let file: StateFile = serde_json::from_str(text).unwrap();
    assert!(matches!(
        file.running.as_ref().unwrap().assignment.work,
        Work::Scripts(_)
    ));
    let again = serde_json::to_value(&file).unwrap();
    assert_eq!(again["queue"], raw["queue"]);
    assert_eq!(again["running"]["assignment"], raw["running"]["assignment"]);
    assert_eq!(again["running"]["phase"], raw["running"]["phase"]);
}

/// A state file written by 0.1.0 (committed as a fixture): its agent died in a
/// post-finish reboot with a second assignment queued. This version reads it and, in the
/// new boot, reports the reboot and the result once, then runs the queued one.
#[test]
fn a_state_file_from_0_1_0_mid_reboot_with_a_queue_carries_on() {
    let text = include_str!("../../../tests/fixtures/agent-state-0.1.0-mid-reboot-with-queue.json");
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
    if let Work::SoftwareStage(stage) = &mut bad.work {
        stage.components[0].format = "zip".into();
    }
    let why = validate(&bad).unwrap_err();
    assert_eq!(why.code, ErrorCode::InvalidAssignment);
    assert!(why.msg.contains("zip"), "{why}");
    // A stage kind without its payload, as a newer or broken controller might send it.
    let mut wire = serde_json::to_value(stage_assignment("s")).unwrap();
    wire.as_object_mut().unwrap().remove("stage");
    let bad: Assignment = serde_json::from_value(wire).unwrap();
    assert!(matches!(
        bad.work,
        Work::Invalid {
            kind: AssignmentKind::SoftwareStage,
            ..
        }
    ));
    assert!(validate(&bad).is_err());
}

fn powered(id: &str, pre: Option<&str>, post: Option<&str>, scripts: usize) -> Assignment {
    let mut a = assignment(id);
    let one = scripts_mut(&mut a)[0].clone();
    *scripts_mut(&mut a) = vec![one; scripts];
    a.power = Some(PowerSpec {
        pre_start: pre.map(|p| PreStart::parse(p).expect("a pre_start")),
        post_finish: post.map(|p| PostFinish::parse(p).expect("a post_finish")),
        logoff_policy: LogoffPolicy::WaitForLogoff,
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
                EventBody::Result(r) => r.error_code,
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(failed, vec![ErrorCode::RebootNotObserved]);
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
                EventBody::Result(r) => r.error_code,
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(codes, vec![ErrorCode::RebootLoop]);
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
        state: RunState::parse(state).expect("a run state"),
        exit_code: Some(0),
        error_code: None,
        ..failed(ErrorCode::Unknown, String::new(), None, now())
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
                EventBody::Result(r) => Some((ev.idempotency_key.clone(), r.error_code)),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(
        results,
        vec![("a1:result".to_string(), Some(ErrorCode::AgentRestarted))]
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
    scripts_mut(&mut a)[0].content.push_str("; rm -rf /");
    let (s, fx) = step(booted(), Event::Offered(vec![a]), now());
    assert!(s.running.is_none());
    assert!(fx.iter().any(|e| matches!(e, Effect::Emit(ev)
        if matches!(&ev.body, EventBody::Result(r) if r.error_code == Some(ErrorCode::InvalidAssignment)))));
}

fn image_apply(id: &str) -> Assignment {
    Assignment {
        power: Some(default_power()),
        work: Work::ImageApply(crate::proto::agent::ImageAssignment {
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
        current_image_state: Some(CurrentImageState::parse(state).expect("an image state")),
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
        Some(crate::agent::codes::ACTIVATE_STEP),
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
        fx.iter().any(|e| matches!(e, Effect::Resume { from, .. } if *from == crate::agent::codes::HEALTH_STEP)),
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
    assert_eq!(s.image.current_image_state, Some(CurrentImageState::Ready));
}

#[test]
fn failed_health_check_reboots_into_the_rollback_and_verifies() {
    let (s, _) = step(booted(), Event::Offered(vec![image_apply("i1")]), now());
    let (s, _) = logoff_ok(s, "i1");
    let (s, _) = done(s, Some(0), result("SUCCEEDED"));
    let (s, _) = logoff_ok(s, "i1");
    let (s, _) = reboot_into(s, "b2");
    let mut bad = result("FAILED");
    bad.error_code = Some(ErrorCode::ImageHealthCheckFailed);
    bad.stdout = "bad\n".into();
    let (s, _) = done(s, Some(crate::agent::codes::HEALTH_STEP), bad);
    let (s, fx) = logoff_ok(s, "i1");
    assert!(fx.iter().any(|e| matches!(
        e,
        Effect::Power {
            kind: PowerKind::Reboot,
            ..
        }
    )));
    let (s, fx) = reboot_into(s, "b3");
    assert!(fx.iter().any(
        |e| matches!(e, Effect::Resume { from, .. } if *from == crate::agent::codes::VERIFY_STEP)
    ));
    let mut verified = result("FAILED");
    verified.error_code = Some(ErrorCode::ImageHealthCheckFailed);
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
    assert_eq!(out.error_code, Some(ErrorCode::ImageHealthCheckFailed));
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
        |e| matches!(e, Effect::Resume { from, .. } if *from == crate::agent::codes::UNDO_STEP)
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
    assert!(matches!(
        a.work,
        Work::Invalid {
            kind: AssignmentKind::Unknown,
            ..
        }
    ));
    let (s, fx) = step(booted(), Event::Offered(vec![a]), now());
    assert!(s.running.is_none() && s.queue.is_empty());
    let code = fx.iter().find_map(|e| match e {
        Effect::Emit(ev) => match &ev.body {
            EventBody::Result(r) => r.error_code,
            _ => None,
        },
        _ => None,
    });
    assert_eq!(code, Some(ErrorCode::InvalidAssignment));
    assert!(
        fx.iter().any(|e| matches!(e, Effect::Ack { .. })),
        "acknowledged"
    );
}
