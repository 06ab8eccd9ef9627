//! Crashes and restarts: an agent killed mid-run, a controller killed while a script runs, and
//! the local status socket while the controller is down.

use std::time::Duration;

use serde_json::json;

use crate::support::{alive, machine_of, read_pid, wait_until, Env};

const T: Duration = Duration::from_secs(60);

#[test]
fn agent_killed_mid_run_reports_agent_restarted_once_and_kills_the_orphan() {
    let env = Env::new();
    let ctl = env.controller();
    let mut a = env.agent(&ctl, "m1", "pool-r");
    let op = env.operator(&ctl);
    op.wait_online(&["m1"], T);
    let pidfile = env.path().join("orphan.pid");
    let marker = env.path().join("runs.log");
    let script = format!(
        "echo run >> {}\nsleep 300 &\necho $! > {}\nwait\n",
        marker.display(),
        pidfile.display()
    );
    let task = op.execute(
        "pool-r",
        json!({"command_content": script, "command_type": "sh", "execution_timeout": 5}),
    );
    op.wait_machine_state(&task, "m1", "RUNNING", T);
    let orphan = read_pid(&pidfile, T);
    a.kill();
    assert!(
        alive(orphan),
        "SIGKILL of the agent leaves the script running"
    );
    a.restart();
    let t = op.wait_task(&task, T);
    let m = machine_of(&t, "m1");
    assert_eq!(m["state"], "FAILED", "{m:#}");
    assert_eq!(m["error_code"], "AGENT_RESTARTED");
    assert!(
        !alive(orphan),
        "the interrupted script's process survived the restart"
    );
    // Never silently re-run.
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "run\n");
    // Reported once: the outbox drains, and another restart reports nothing new.
    wait_until("the outbox to drain", T, || {
        (a.status()["undelivered_events"] == 0).then_some(())
    });
    a.restart();
    let s = a.status();
    let mentions = s["recent_results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["task_id"] == task.as_str())
        .count();
    assert_eq!(mentions, 1, "{s:#}");
    assert_eq!(s["undelivered_events"], 0, "{s:#}");
    assert_eq!(
        machine_of(&op.task(&task), "m1")["error_code"],
        "AGENT_RESTARTED"
    );
    // The machine keeps working afterwards.
    let next = op.execute(
        "pool-r",
        json!({"command_content": "echo again", "command_type": "sh"}),
    );
    assert_eq!(op.wait_task(&next, T)["state"], "SUCCEEDED");
}

#[test]
fn controller_killed_while_script_runs_still_gets_the_result_once() {
    let env = Env::new();
    let mut ctl = env.controller();
    let a = env.agent(&ctl, "m1", "pool-k");
    let op = env.operator(&ctl);
    op.wait_online(&["m1"], T);
    let gate = env.path().join("gate");
    let script = format!(
        "while [ ! -e {} ]; do sleep 0.1; done\necho finished\n",
        gate.display()
    );
    let task = op.execute(
        "pool-k",
        json!({"command_content": script, "command_type": "sh", "execution_timeout": 2}),
    );
    op.wait_machine_state(&task, "m1", "RUNNING", T);
    ctl.kill();
    std::fs::write(&gate, "").unwrap();
    // The script ends while the controller is down: the result waits in the outbox, and the
    // status socket still answers.
    let s = wait_until("the result to be queued locally", T, || {
        let s = a.status();
        (s["undelivered_results"] == 1 && s["running"].is_null()).then_some(s)
    });
    assert_eq!(s["connected"], false, "{s:#}");
    assert_eq!(s["machine_id"], "m1");
    assert_eq!(s["recent_results"][0]["state"], "SUCCEEDED");
    let text = crate::support::run(
        crate::support::AGENT,
        &["status", "--config", a.config.to_str().unwrap()],
    );
    assert!(text.status.success());
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("m1") && text.contains("NOT connected") && text.contains("1 results"),
        "{text}"
    );

    ctl.restart();
    let op = env.operator(&ctl);
    let t = op.wait_task(&task, T);
    let m = machine_of(&t, "m1");
    assert_eq!(m["state"], "SUCCEEDED", "{m:#}");
    assert_eq!(m["stdout"].as_str().unwrap().trim(), "finished");
    wait_until("the outbox to drain", T, || {
        (a.status()["undelivered_events"] == 0).then_some(())
    });
    // A second controller restart keeps the same single result.
    ctl.restart();
    let op = env.operator(&ctl);
    let t2 = op.task(&task);
    assert_eq!(t2["machines"], t["machines"]);
    assert_eq!(t2["state"], "SUCCEEDED");
}
