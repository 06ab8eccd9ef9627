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

/// Events go several to a request; when the controller refuses a batch for good, the agent
/// sends its events one by one, so only the refused one is moved aside and the good one
/// (here first in the batch) is delivered, not dropped in its place.
#[test]
fn a_refused_batch_moves_aside_only_the_event_the_controller_refuses() {
    let env = Env::new();
    let ctl = env.controller();
    let mut a = env.agent(&ctl, "b1", "pool-b");
    let op = env.operator(&ctl);
    op.wait_online(&["b1"], T);
    let task = op.execute(
        "pool-b",
        json!({"command_content": "true", "command_type": "sh"}),
    );
    let t = op.wait_task(&task, T);
    assert_eq!(machine_of(&t, "b1")["state"], "SUCCEEDED", "{t:#}");
    wait_until("the outbox to drain", T, || {
        (a.status()["undelivered_events"] == 0).then_some(())
    });
    let assignment = a.status()["recent_results"][0]["assignment_id"]
        .as_str()
        .unwrap()
        .to_string();
    a.kill();
    // Two records written as the agent writes them: first a result the controller has
    // (a duplicate: accepted), then one for an assignment it never made (404, for good).
    let outbox = a.dir.join("state").join("outbox");
    std::fs::create_dir_all(&outbox).unwrap();
    let result = |id: &str| {
        json!({"idempotency_key": format!("{id}:result"), "assignment_id": id,
               "at": "2026-12-01T00:00:00Z", "body": {"type": "RESULT", "state": "SUCCEEDED",
               "exit_code": 0, "stdout": "", "stderr": "", "output_truncated": false,
               "started_at": null, "finished_at": "2026-12-01T00:00:00Z",
               "error_code": null, "error_msg": null}})
    };
    for (seq, ev) in [
        (900_000u64, result(&assignment)),
        (900_001, result("no-such-assignment")),
    ] {
        std::fs::write(
            outbox.join(format!("{seq:020}.json")),
            serde_json::to_vec(&json!({"seq": seq, "event": ev})).unwrap(),
        )
        .unwrap();
    }
    a.start_again();
    wait_until("the outbox to drain", T, || {
        (a.status()["undelivered_events"] == 0).then_some(())
    });
    let rejected: Vec<String> = std::fs::read_dir(a.dir.join("state").join("outbox-rejected"))
        .map(|rd| {
            rd.flatten()
                .map(|e| std::fs::read_to_string(e.path()).unwrap())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        rejected.len(),
        1,
        "exactly one event moved aside: {rejected:?}"
    );
    assert!(
        rejected[0].contains("no-such-assignment"),
        "the refused one, not the good one before it: {rejected:?}"
    );
}
