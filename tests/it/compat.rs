//! Mixed versions: an agent of the previous release against this controller, and an agent
//! upgraded in place (the previous release's state file, queued and running work) to this
//! one. The previous release's binary is built by `.ci/run` from the commit named in
//! `tests/compat/previous-release`; set `FIELDHAND_PREVIOUS_AGENT` to run this locally.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use crate::support::{machine_of, Agent, Certs, Env};

const T: Duration = Duration::from_secs(60);

fn previous_agent() -> Option<PathBuf> {
    let p = PathBuf::from(std::env::var_os("FIELDHAND_PREVIOUS_AGENT")?);
    assert!(
        p.exists(),
        "FIELDHAND_PREVIOUS_AGENT={} does not exist",
        p.display()
    );
    Some(p)
}

#[test]
fn the_previous_release_agent_works_here_and_its_queued_work_survives_the_upgrade() {
    let Some(old) = previous_agent() else {
        eprintln!("skipped: FIELDHAND_PREVIOUS_AGENT is not set (.ci/run sets it)");
        return;
    };
    let env = Env::new();
    let ctl = env.controller();
    let op = env.operator(&ctl);
    // The previous release needs `pool_id` in its config and sends it: never applied.
    env.issue_agent_in("old1", Some("fleet"));
    let dir = env.path().join("agents/old1");
    let mut agent = Agent::configured_in(
        &env,
        &ctl.url(),
        "old1",
        &dir,
        Certs::Issued,
        "pool_id = \"claimed\"\n",
        &old,
    )
    .started();
    op.wait_online(&["old1"], T);
    let (_, m) = op.get("/v1/machines/old1");
    assert_eq!(m["pool_id"], "fleet", "{m}");
    let task = op.execute(
        "fleet",
        json!({"command_content": "echo from the old agent", "command_type": "sh"}),
    );
    let t = op.wait_task(&task, T);
    assert_eq!(t["state"], "SUCCEEDED", "{t:#}");
    assert!(machine_of(&t, "old1")["stdout"]
        .as_str()
        .unwrap()
        .contains("from the old agent"));

    // Upgrade in place: one script running, one queued behind it, when the old binary stops.
    let marker = env.path().join("second.ran");
    let first = op.execute(
        "fleet",
        json!({"command_content": "sleep 3; echo first", "command_type": "sh"}),
    );
    op.wait_machine_state(&first, "old1", "RUNNING", T);
    let second = op.execute(
        "fleet",
        json!({"command_content": format!("echo second; touch {}", marker.display()), "command_type": "sh"}),
    );
    std::thread::sleep(Duration::from_millis(500));
    agent.kill();
    agent.bin = PathBuf::from(crate::support::AGENT);
    agent.start_again();
    let t = op.wait_task(&first, T);
    // The interrupted run is reported once, never re-run silently.
    assert_eq!(
        machine_of(&t, "old1")["error_code"],
        "AGENT_RESTARTED",
        "{t:#}"
    );
    let t = op.wait_task(&second, T);
    assert_eq!(t["state"], "SUCCEEDED", "{t:#}");
    assert!(marker.exists());
    assert!(
        agent.log().contains("`pool_id`"),
        "the old key is named in a warning"
    );
}
