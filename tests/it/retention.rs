//! Finished tasks past `task_retention_seconds` are removed, on the real controller: a task
//! that has ended goes (its view, its place in the list), one still running stays however
//! old it is, and each removal is counted on `/metrics`.

use std::time::Duration;

use serde_json::json;

use crate::metrics::sample;
use crate::support::{wait_until, Env};

const T: Duration = Duration::from_secs(60);

#[test]
fn finished_tasks_past_their_retention_go_and_running_ones_stay() {
    let env = Env::new();
    let ctl = env.controller_with("task_retention_seconds = 2");
    let _a = env.agent(&ctl, "r1", "p");
    let _b = env.agent(&ctl, "r2", "q");
    let op = env.operator(&ctl);
    op.wait_online(&["r1", "r2"], T);
    let done = op.execute(
        "p",
        json!({"command_content": "echo done", "command_type": "sh"}),
    );
    assert_eq!(op.wait_task(&done, T)["state"], "SUCCEEDED");
    // Runs for longer than the retention: never removed while it runs.
    let long = op.execute(
        "q",
        json!({"command_content": "sleep 5", "command_type": "sh"}),
    );
    op.wait_machine_state(&long, "r2", "RUNNING", T);

    let (s, v) = wait_until("the finished task to be removed", T, || {
        let (s, v) = op.get(&format!("/v1/tasks/{done}"));
        (s != 200).then_some((s, v))
    });
    assert_eq!(
        (s, v["error_code"].as_str()),
        (404, Some("TASK_NOT_FOUND")),
        "{v}"
    );
    let (s, list) = op.get("/v1/tasks");
    assert_eq!(s, 200, "{list}");
    let ids: Vec<&str> = list
        .as_array()
        .expect("a list of tasks")
        .iter()
        .filter_map(|t| t["task_id"].as_str())
        .collect();
    assert!(!ids.contains(&done.as_str()), "{list}");
    assert!(ids.contains(&long.as_str()), "{list}");
    // Older than the retention by now, but still running.
    let (s, v) = op.get(&format!("/v1/tasks/{long}"));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["finished_at"], serde_json::Value::Null, "{v}");

    // Once it has ended, it goes too.
    assert_eq!(op.wait_task(&long, T)["state"], "SUCCEEDED");
    wait_until("the second task to be removed", T, || {
        (op.get(&format!("/v1/tasks/{long}")).0 == 404).then_some(())
    });
    let (s, m) = op.get("/metrics");
    assert_eq!(s, 200, "{m}");
    let text = m.as_str().expect("text");
    assert_eq!(
        sample(text, "fieldhand_tasks_pruned_total"),
        Some(2.0),
        "{text}"
    );
}
