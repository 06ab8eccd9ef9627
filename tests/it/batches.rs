//! Script executions end to end: gray batches, thresholds, timeouts, output capture, cancel.

use std::time::Duration;

use serde_json::json;

use crate::support::{alive, machine_of, read_pid, Env};

const T: Duration = Duration::from_secs(60);

#[test]
fn happy_path_gray_batch_then_rest() {
    let env = Env::new();
    let ctl = env.controller();
    let _a: Vec<_> = ["m1", "m2", "m3"]
        .iter()
        .map(|id| env.agent(&ctl, id, "pool-a"))
        .collect();
    let op = env.operator(&ctl);
    op.wait_online(&["m1", "m2", "m3"], T);
    let first = op.script(
        "whoami",
        "bash",
        "echo \"id=$FIELDHAND_MACHINE_ID task=$FIELDHAND_TASK_ID\"\n",
    );
    let second = op.script("env", "sh", "env | sort\n");
    let task = op.execute(
        "pool-a",
        json!({"script_ids": [first, second], "gray_count": 1, "gray_fail_threshold": 1, "execution_timeout_seconds": 30}),
    );
    let t = op.wait_task(&task, T);
    assert_eq!(t["state"], "SUCCEEDED", "{t:#}");
    assert_eq!(t["kind"], "script_execution");
    let batches = t["batches"].as_array().unwrap();
    assert_eq!(batches.len(), 2);
    assert_eq!(batches[0]["machine_ids"], json!(["m1"]));
    assert_eq!(batches[1]["machine_ids"], json!(["m2", "m3"]));
    for id in ["m1", "m2", "m3"] {
        let m = machine_of(&t, id);
        assert_eq!(m["state"], "SUCCEEDED", "{m:#}");
        assert_eq!(m["exit_code"], 0);
        let out = m["stdout"].as_str().unwrap();
        assert!(out.contains(&format!("id={id} task={task}")), "{out}");
        // Clean environment: only what the agent sets (plus what the shell adds).
        assert!(
            out.contains("LANG=C.UTF-8") && out.contains("PATH=/usr/local/sbin"),
            "{out}"
        );
        assert!(
            !out.contains("FIELDHAND_TEST_LEAK"),
            "agent env leaked: {out}"
        );
        assert!(m["started_at"].as_str().unwrap() <= m["finished_at"].as_str().unwrap());
        assert_eq!(m["output_truncated"], false);
    }
    // The gray machine finished before the others started.
    let gray_done = machine_of(&t, "m1")["finished_at"]
        .as_str()
        .unwrap()
        .to_string();
    for id in ["m2", "m3"] {
        assert!(machine_of(&t, id)["started_at"].as_str().unwrap() >= gray_done.as_str());
    }
}

#[test]
fn gray_batch_halts_at_threshold_and_failures_below_it_continue() {
    let env = Env::new();
    let ctl = env.controller();
    let _a: Vec<_> = ["m1", "m2", "m3"]
        .iter()
        .map(|id| env.agent(&ctl, id, "pool-h"))
        .collect();
    let op = env.operator(&ctl);
    op.wait_online(&["m1", "m2", "m3"], T);
    let fail_on_m2 =
        "if [ \"$FIELDHAND_MACHINE_ID\" = m2 ]; then echo boom >&2; exit 3; fi; echo ok\n";

    let halted = op.execute(
        "pool-h",
        json!({"command_content": fail_on_m2, "command_type": "sh", "gray_desktop_ids": ["m2"], "gray_fail_threshold": 1}),
    );
    let t = op.wait_task(&halted, T);
    assert_eq!(t["state"], "HALTED", "{t:#}");
    let m2 = machine_of(&t, "m2");
    assert_eq!(
        (m2["state"].as_str(), m2["exit_code"].as_i64()),
        (Some("FAILED"), Some(3))
    );
    assert_eq!(m2["stderr"].as_str().unwrap().trim(), "boom");
    for id in ["m1", "m3"] {
        let m = machine_of(&t, id);
        assert_eq!(m["state"], "SKIPPED", "{t:#}");
        // A machine that never ran says why.
        assert_eq!(m["error_code"], "GRAY_THRESHOLD_REACHED", "{t:#}");
        assert!(m["error_msg"]
            .as_str()
            .unwrap()
            .contains("gray_fail_threshold"));
    }
    assert_eq!(t["batches"][1]["state"], "SKIPPED");

    // Same failure in a gray batch of two with threshold 2: one failure is below it, so
    // the rest runs and the task ends FAILED.
    let failed = op.execute(
        "pool-h",
        json!({"command_content": fail_on_m2, "command_type": "sh", "gray_desktop_ids": ["m1", "m2"], "gray_fail_threshold": 2}),
    );
    let t = op.wait_task(&failed, T);
    assert_eq!(t["state"], "FAILED", "{t:#}");
    for id in ["m1", "m3"] {
        assert_eq!(machine_of(&t, id)["state"], "SUCCEEDED");
    }

    // Without a threshold, a gray batch is a gate: one failure halts (seed 002 gives the
    // threshold no default; "never halt" would let a failing gray batch take the pool).
    let gated = op.execute(
        "pool-h",
        json!({"command_content": fail_on_m2, "command_type": "sh", "gray_desktop_ids": ["m2"]}),
    );
    let t = op.wait_task(&gated, T);
    assert_eq!(t["state"], "HALTED", "{t:#}");
    // A threshold the gray batch can never reach is refused, naming both.
    let (s, v) = op.post(
        "/v1/pools/pool-h/script-executions",
        json!({"command_content": "true", "command_type": "sh", "gray_count": 1, "gray_fail_threshold": 2}),
    );
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error_msg"]
            .as_str()
            .unwrap()
            .contains("gray_fail_threshold 2"),
        "{v}"
    );
}

#[test]
fn timeout_kills_the_whole_group_including_term_ignoring_children() {
    let env = Env::new();
    let ctl = env.controller();
    let _a = env.agent(&ctl, "m1", "pool-t");
    let op = env.operator(&ctl);
    op.wait_online(&["m1"], T);
    let pidfile = env.path().join("child.pid");
    let script = format!(
        "trap '' TERM\n(trap '' TERM; exec sleep 300) &\necho $! > {}\necho started\nsleep 300\n",
        pidfile.display()
    );
    let task = op.execute(
        "pool-t",
        json!({"command_content": script, "command_type": "bash", "execution_timeout_seconds": 2}),
    );
    let child = read_pid(&pidfile, T);
    assert!(alive(child), "the child should run until the timeout");
    let t = op.wait_task(&task, T);
    let m = machine_of(&t, "m1");
    assert_eq!(m["state"], "TIMED_OUT", "{m:#}");
    assert_eq!(m["error_code"], "EXECUTION_TIMEOUT");
    assert!(m["stdout"].as_str().unwrap().contains("started"));
    assert_eq!(t["state"], "FAILED");
    assert!(
        !alive(child),
        "child {child} ignored SIGTERM and outlived the timeout"
    );
}

#[test]
fn output_keeps_head_and_tail_when_truncated() {
    let env = Env::new();
    let ctl = env.controller();
    let _a = env.agent(&ctl, "m1", "pool-o");
    let op = env.operator(&ctl);
    op.wait_online(&["m1"], T);
    let task = op.execute(
        "pool-o",
        json!({"command_content": "seq 1 200000\necho small >&2\n", "command_type": "sh"}),
    );
    let t = op.wait_task(&task, T);
    let m = machine_of(&t, "m1");
    assert_eq!(m["state"], "SUCCEEDED");
    assert_eq!(m["output_truncated"], true);
    let out = m["stdout"].as_str().unwrap();
    assert!(out.starts_with("1\n2\n3\n"), "head lost: {:?}", &out[..40]);
    assert!(out.trim_end().ends_with("199999\n200000"), "tail lost");
    assert!(out.len() < 70 * 1024, "kept {} bytes", out.len());
    assert!(!out.contains("\n100000\n"), "the middle should be omitted");
    assert_eq!(m["stderr"].as_str().unwrap().trim(), "small");
}

#[test]
fn cancel_stops_running_scripts_and_pending_machines() {
    let env = Env::new();
    let ctl = env.controller();
    let _a: Vec<_> = ["m1", "m2"]
        .iter()
        .map(|id| env.agent(&ctl, id, "pool-c"))
        .collect();
    let op = env.operator(&ctl);
    op.wait_online(&["m1", "m2"], T);
    let pidfile = env.path().join("sleep.pid");
    let script = format!("sleep 300 &\necho $! > {}\nwait\n", pidfile.display());
    let task = op.execute(
        "pool-c",
        json!({"command_content": script, "command_type": "sh", "gray_count": 1, "execution_timeout": 10}),
    );
    op.wait_machine_state(&task, "m1", "RUNNING", T);
    let sleeper = read_pid(&pidfile, T);
    let (status, v) = op.post(&format!("/v1/tasks/{task}/cancel"), json!({}));
    assert_eq!(status, 200, "{v}");
    // Not terminal while m1 is still ending its run.
    assert_eq!(v["state"], "CANCELLING", "{v:#}");
    assert!(v["finished_at"].is_null(), "{v:#}");
    let m2 = machine_of(&v, "m2");
    assert_eq!(
        m2["state"], "CANCELLED",
        "never-started machine cancelled at once"
    );
    assert_eq!(m2["error_code"], "TASK_CANCELLED", "{v:#}");
    let t = op.wait_task(&task, T);
    assert_eq!(t["state"], "CANCELLED");
    assert_eq!(machine_of(&t, "m1")["state"], "CANCELLED", "{t:#}");
    assert!(!alive(sleeper), "cancelled script's child still running");
    // A finished task cannot be cancelled again.
    let (status, v) = op.post(&format!("/v1/tasks/{task}/cancel"), json!({}));
    assert_eq!(
        (status, v["error_code"].as_str()),
        (409, Some("NOT_ALLOWED_IN_CURRENT_STATE"))
    );
}

#[test]
fn assignments_wait_their_turn_on_a_machine() {
    let env = Env::new();
    let ctl = env.controller();
    let a = env.agent(&ctl, "m1", "pool-q");
    let op = env.operator(&ctl);
    op.wait_online(&["m1"], T);
    let log = env.path().join("order.log");
    let body = |n: u32| json!({"command_content": format!("echo start{n} >> {p}; sleep 1; echo end{n} >> {p}\n", p = log.display()), "command_type": "sh"});
    let t1 = op.execute("pool-q", body(1));
    let t2 = op.execute("pool-q", body(2));
    let s = crate::support::wait_until("the second assignment to be queued", T, || {
        let s = a.status();
        (s["queued"] == 1).then_some(s)
    });
    assert_eq!(
        s["running"]["task_id"],
        t1.as_str(),
        "one operation at a time: {s:#}"
    );
    op.wait_task(&t1, T);
    op.wait_task(&t2, T);
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "start1\nend1\nstart2\nend2\n"
    );
}

#[test]
fn a_cancelled_script_keeps_its_exit_code_and_status_shows_the_cancel() {
    let env = Env::new();
    let ctl = env.controller();
    let a = env.agent(&ctl, "m1", "pool-x");
    let op = env.operator(&ctl);
    op.wait_online(&["m1"], T);
    // Exits 7 on SIGTERM, after a moment: the cancel is visible while it stops.
    let task = op.execute(
        "pool-x",
        json!({"command_content": "trap 'sleep 0.5; exit 7' TERM\necho up\nwhile true; do sleep 0.1; done\n", "command_type": "bash"}),
    );
    op.wait_machine_state(&task, "m1", "RUNNING", T);
    let (s, v) = op.post(&format!("/v1/tasks/{task}/cancel"), json!({}));
    assert_eq!(s, 200, "{v}");
    crate::support::wait_until("the cancel to show in fieldhand status", T, || {
        let st = a.status();
        (st["running"]["cancelling"] == true).then_some(())
    });
    let t = op.wait_task(&task, T);
    let m = machine_of(&t, "m1");
    assert_eq!(m["state"], "CANCELLED", "{t:#}");
    assert_eq!(m["exit_code"], 7, "{t:#}");
}
