//! Reboot-safe runs with real agent processes. A "reboot" is the configured reboot command
//! writing a new boot id into the agent's boot-id file and SIGKILLing the agent (a power
//! cut); the test then starts the agent again, as the machine's init would.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{machine, machine_of, one_machine, wait_until, Client, Env, Reboot};

const T: Duration = Duration::from_secs(60);

fn run(op: &Client, pool: &str, body: Value) -> String {
    op.execute(pool, body)
}

fn finished(op: &Client, task: &str, id: &str) -> Value {
    let t = op.wait_task(task, T);
    machine_of(&t, id).clone()
}

#[test]
fn post_finish_reboot_reports_one_result_after_the_new_boot() {
    let env = Env::new();
    let (ctl, mut m) = one_machine(&env);
    let op = env.operator(&ctl);
    let before = m.boot_id();
    let task = run(
        &op,
        "p",
        json!({"command_content": "echo ran", "command_type": "sh", "post_finish": "reboot"}),
    );
    m.survive_reboot();
    let mm = finished(&op, &task, "m1");
    assert_eq!(mm["state"], "SUCCEEDED", "{mm:#}");
    assert_eq!(mm["stdout"], "ran\n");
    assert_eq!(mm["power_state"], "REBOOTED");
    assert_ne!(m.boot_id(), before);
    assert_eq!(m.power_log(), vec!["reboot"]);
    // Exactly one result in the agent's history, none left to deliver.
    wait_until("the outbox to drain", T, || {
        (m.agent.status()["undelivered_events"] == 0).then_some(())
    });
    let s = m.agent.status();
    let ours: Vec<_> = s["recent_results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["task_id"] == task.as_str())
        .collect();
    assert_eq!(ours.len(), 1, "{s:#}");
    // The controller recorded the REBOOTED step with the new boot id.
    assert!(ctl.log().contains(&m.boot_id()), "{}", ctl.log());
}

#[test]
fn pre_start_reboot_runs_the_script_once_after_the_reboot() {
    let env = Env::new();
    let (ctl, mut m) = one_machine(&env);
    let op = env.operator(&ctl);
    let marker = env.path().join("runs");
    let task = run(
        &op,
        "p",
        json!({"command_content": format!("cat /proc/self/stat >/dev/null; echo x >> {}", marker.display()),
               "command_type": "sh", "pre_start": "reboot"}),
    );
    m.agent.wait_exit(T);
    assert!(!marker.exists(), "the script ran before the reboot");
    m.agent.start_again();
    let mm = finished(&op, &task, "m1");
    assert_eq!(mm["state"], "SUCCEEDED", "{mm:#}");
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap(),
        "x\n",
        "ran exactly once"
    );
    assert_eq!(m.power_log(), vec!["reboot"]);
}

#[test]
fn a_restart_without_a_new_boot_id_is_not_a_reboot() {
    let env = Env::new();
    let ctl = env.controller();
    let mut m = machine(&env, &ctl, "m1", "p", Reboot::Fake);
    let op = env.operator(&ctl);
    op.wait_online(&["m1"], T);
    let task = run(
        &op,
        "p",
        json!({"command_content": "echo ran", "command_type": "sh", "post_finish": "reboot"}),
    );
    let started = Instant::now();
    m.survive_reboot();
    let mm = finished(&op, &task, "m1");
    assert_eq!(mm["state"], "FAILED", "{mm:#}");
    assert_eq!(mm["error_code"], "REBOOT_NOT_OBSERVED");
    assert_eq!(mm["stdout"], "ran\n", "the scripts' output is kept");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "it waited for the reboot"
    );
}

#[test]
fn exit_194_reboots_and_a_reboot_loop_is_refused() {
    let env = Env::new();
    let (ctl, mut m) = one_machine(&env);
    let op = env.operator(&ctl);

    let task = run(
        &op,
        "p",
        json!({"command_content": "echo before; exit 194", "command_type": "sh"}),
    );
    m.survive_reboot();
    let mm = finished(&op, &task, "m1");
    assert_eq!(mm["state"], "SUCCEEDED", "{mm:#}");
    assert_eq!(mm["exit_code"], 194);
    assert_eq!(mm["stdout"], "before\n");
    assert_eq!(mm["power_state"], "REBOOTED");

    // Five scripts that each ask for a reboot: the fourth request is a loop.
    let ids: Vec<String> = (0..5)
        .map(|i| op.script(&format!("s{i}"), "sh", &format!("echo step{i}; exit 194")))
        .collect();
    let task = run(&op, "p", json!({ "script_ids": ids }));
    for _ in 0..3 {
        m.survive_reboot();
    }
    let mm = finished(&op, &task, "m1");
    assert_eq!(mm["state"], "FAILED", "{mm:#}");
    assert_eq!(mm["error_code"], "REBOOT_LOOP");
    assert_eq!(mm["stdout"], "step0\nstep1\nstep2\nstep3\n");
    assert_eq!(
        m.power_log().len(),
        4,
        "1 + 3 reboots, none for the refused one"
    );
}

#[test]
fn post_finish_stop_reports_and_is_not_lost() {
    let env = Env::new();
    let (ctl, mut m) = one_machine(&env);
    let op = env.operator(&ctl);
    let task = run(
        &op,
        "p",
        json!({"command_content": "exit 3", "command_type": "sh", "post_finish": "stop"}),
    );
    let mm = finished(&op, &task, "m1");
    assert_eq!(mm["state"], "FAILED", "the scripts' result: {mm:#}");
    assert_eq!(mm["exit_code"], 3);
    wait_until("the shutdown announcement", T, || {
        let t = op.task(&task);
        (machine_of(&t, "m1")["power_state"] == "SHUTTING_DOWN").then_some(())
    });
    assert_eq!(m.power_log(), vec!["stop"]);
    // The machine goes down and comes back later: nothing is reported twice.
    m.agent.kill();
    std::fs::write(&m.boot_file, "boot-after-stop\n").unwrap();
    m.agent.start_again();
    std::thread::sleep(Duration::from_secs(1));
    let t = op.task(&task);
    assert_eq!(machine_of(&t, "m1")["exit_code"], 3);
    let s = m.agent.status();
    assert_eq!(s["running"], Value::Null, "{s:#}");
    let ours = s["recent_results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["task_id"] == task.as_str())
        .count();
    assert_eq!(
        ours, 1,
        "the result was recorded once, not again after the boot: {s:#}"
    );
}

#[test]
fn results_cross_a_reboot_while_the_controller_is_down() {
    let env = Env::new();
    let mut ctl = env.controller();
    let mut m = machine(&env, &ctl, "m1", "p", Reboot::Real);
    let op = env.operator(&ctl);
    op.wait_online(&["m1"], T);
    let task = run(
        &op,
        "p",
        json!({"command_content": "sleep 1; echo done", "command_type": "sh", "post_finish": "reboot"}),
    );
    op.wait_machine_state(&task, "m1", "RUNNING", T);
    ctl.kill();
    m.survive_reboot();
    wait_until("REBOOTED and the result to be queued", T, || {
        (m.agent.status()["undelivered_results"] == 1).then_some(())
    });
    ctl.restart();
    let op = env.operator(&ctl);
    let mm = finished(&op, &task, "m1");
    assert_eq!(mm["state"], "SUCCEEDED", "{mm:#}");
    assert_eq!(mm["stdout"], "done\n");
    assert_eq!(mm["power_state"], "REBOOTED");
    wait_until("the outbox to drain", T, || {
        (m.agent.status()["undelivered_events"] == 0).then_some(())
    });
}

#[test]
fn wait_for_logoff_proceeds_when_users_leave_and_times_out_when_they_stay() {
    let env = Env::new();
    let ctl = env.controller();
    let m = machine(&env, &ctl, "m1", "p", Reboot::Real);
    let op = env.operator(&ctl);
    op.wait_online(&["m1"], T);
    let mut alice = m.login("alice", 1);
    let marker = env.path().join("ran");
    let task = run(
        &op,
        "p",
        json!({"command_content": format!("touch {}", marker.display()), "command_type": "sh",
               "pre_start": "logoff", "logoff_policy": "WAIT_FOR_LOGOFF", "logoff_timeout_seconds": 60}),
    );
    let w = wait_until("status to show the wait", T, || {
        let s = m.agent.status();
        let w = s["running"]["waiting"].clone();
        w.is_object().then_some(w)
    });
    assert!(w["what"].as_str().unwrap().contains("alice"), "{w}");
    assert!(w["until"].is_string() && w["since"].is_string(), "{w}");
    assert!(!marker.exists());
    alice.kill().unwrap();
    alice.wait().unwrap();
    let mm = finished(&op, &task, "m1");
    assert_eq!(mm["state"], "SUCCEEDED", "{mm:#}");
    assert!(marker.exists());

    let mut bob = m.login("bob", 2);
    std::fs::remove_file(&marker).unwrap();
    let task = run(
        &op,
        "p",
        json!({"command_content": format!("touch {}", marker.display()), "command_type": "sh",
               "post_finish": "reboot", "logoff_timeout_seconds": 2}),
    );
    let mm = finished(&op, &task, "m1");
    assert_eq!(mm["state"], "FAILED", "{mm:#}");
    assert_eq!(mm["error_code"], "WAIT_FOR_LOGOFF_TIMEOUT");
    assert!(mm["error_msg"].as_str().unwrap().contains("bob"), "{mm:#}");
    assert!(
        marker.exists(),
        "the scripts ran; only the reboot was skipped"
    );
    assert!(m.power_log().is_empty(), "no power step after the timeout");
    bob.kill().unwrap();
    bob.wait().unwrap();
}

#[test]
fn force_logoff_warns_then_ends_sessions_after_the_grace_period() {
    let env = Env::new();
    let ctl = env.controller();
    let m = machine(&env, &ctl, "m1", "p", Reboot::Real);
    let op = env.operator(&ctl);
    op.wait_online(&["m1"], T);
    let (s, v) = op.call(
        http::Method::PUT,
        "/v1/settings",
        Some(json!({"force_logoff_grace_seconds": 3})),
    );
    assert_eq!(
        (s, v["force_logoff_grace_seconds"].as_i64()),
        (200, Some(3))
    );
    assert_eq!(op.get("/v1/settings").1["force_logoff_grace_seconds"], 3);
    let mut carol = m.login("carol", 5);
    let pid = carol.id() as i32;
    let started = Instant::now();
    let task = run(
        &op,
        "p",
        json!({"command_content": "echo after", "command_type": "sh",
               "pre_start": "logoff", "logoff_policy": "FORCE_LOGOFF"}),
    );
    wait_until("the warning", T, || {
        m.tty(5).contains("logged off in 3 seconds").then_some(())
    });
    assert!(
        fieldhand::sys::process::alive(pid),
        "not before the grace period"
    );
    let mm = finished(&op, &task, "m1");
    assert_eq!(mm["state"], "SUCCEEDED", "{mm:#}");
    assert!(started.elapsed() >= Duration::from_secs(3));
    let status = carol.wait().unwrap();
    assert!(
        !status.success(),
        "the session leader was terminated: {status:?}"
    );
}

#[test]
fn a_machine_that_never_returns_counts_toward_the_gray_threshold() {
    let env = Env::new();
    let ctl = env.controller_with("reboot_grace_seconds = 2");
    let mut m1 = machine(&env, &ctl, "m1", "p", Reboot::Real);
    let _m2 = machine(&env, &ctl, "m2", "p", Reboot::Real);
    let op = env.operator(&ctl);
    op.wait_online(&["m1", "m2"], T);
    let task = run(
        &op,
        "p",
        json!({"command_content": "true", "command_type": "sh", "post_finish": "reboot",
               "gray_desktop_ids": ["m1"], "gray_fail_threshold": 1,
               "execution_timeout_seconds": 2, "logoff_timeout_seconds": 1}),
    );
    m1.agent.wait_exit(T); // powered off for good
    let t = op.wait_task(&task, T);
    assert_eq!(t["state"], "HALTED", "{t:#}");
    let mm = machine_of(&t, "m1");
    assert_eq!(mm["state"], "FAILED");
    assert_eq!(mm["error_code"], "MACHINE_UNREACHABLE");
    assert_eq!(mm["power_state"], "REBOOTING");
    assert_eq!(machine_of(&t, "m2")["state"], "SKIPPED");
}
