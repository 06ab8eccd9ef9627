//! Two controller replicas on one PostgreSQL database, with agents that list both: a
//! replica killed with SIGKILL mid-rollout loses nothing and doubles nothing, a scheduled
//! push fires on the replica that is up, and a poll on one replica hears of work created
//! through the other at once. These run on the PostgreSQL half of the suite
//! (`FIELDHAND_TEST_POSTGRES`); on SQLite alone there is nothing to share.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::images::{current_link, pump, push, Fleet};
use crate::support::{
    machine_of, machine_with, postgres_url_for_new_database, Controller, Env, Reboot,
};

const T: Duration = Duration::from_secs(90);

/// Two replicas of one fleet, or `None` off PostgreSQL.
fn replicas(env: &Env) -> Option<(Controller, Controller)> {
    let Some(db) = postgres_url_for_new_database() else {
        eprintln!("skipped: set FIELDHAND_TEST_POSTGRES (tests/pg/cluster.sh) to run it");
        return None;
    };
    let blobs = env.path().join("shared-blobs");
    let extra = format!(
        "database_url = \"{db}\"\nblob_dir = \"{}\"\n",
        blobs.display()
    );
    let a = Controller::start_in(env, "replica-a", "127.0.0.1:0", &extra);
    let b = Controller::start_in(env, "replica-b", "127.0.0.1:0", &extra);
    Some((a, b))
}

fn urls(first: &Controller, second: &Controller) -> String {
    format!(
        "controller_urls = [\"{}\", \"{}\"]\n",
        first.url(),
        second.url()
    )
}

/// `machine assignment` lines the scripts appended, one per run.
fn runs(log: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (m, a) = l.split_once(' ')?;
            Some((m.to_string(), a.to_string()))
        })
        .collect()
}

#[test]
fn a_rollout_survives_a_replica_killed_mid_way_and_runs_every_script_once() {
    let env = Env::new();
    let Some((mut a, b)) = replicas(&env) else {
        return;
    };
    let ids = ["r1", "r2", "r3", "r4", "r5", "r6"];
    // Half the agents start on each replica.
    let _agents: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let list = if i % 2 == 0 {
                urls(&a, &b)
            } else {
                urls(&b, &a)
            };
            env.agent_with(&a, id, "pool-r", &list)
        })
        .collect();
    let op_b = env.operator(&b);
    op_b.wait_online(&ids, T);
    let log = env.path().join("runs.log");
    let script = format!(
        "echo \"$FIELDHAND_MACHINE_ID $FIELDHAND_ASSIGNMENT_ID\" >> {}\nsleep 2\necho done",
        log.display()
    );
    let task = {
        let op_a = env.operator(&a);
        op_a.execute(
            "pool-r",
            json!({"command_content": script, "command_type": "sh", "gray_count": 1,
                   "gray_fail_threshold": 1, "execution_timeout_seconds": 60}),
        )
    };
    // Mid-rollout: the gray machine is running. Replica A dies as a crash would.
    crate::support::wait_until("the gray batch to run", T, || {
        let t = op_b.task(&task);
        t["machines"]
            .as_array()?
            .iter()
            .any(|m| m["state"] == "RUNNING")
            .then_some(())
    });
    a.kill();
    // The rest of the rollout happens on B (agents fail over); A comes back during it.
    crate::support::wait_until("the second batch to start", T, || {
        let t = op_b.task(&task);
        (t["machines"]
            .as_array()?
            .iter()
            .filter(|m| m["batch"] == 1)
            .any(|m| m["state"] == "RUNNING" || m["state"] == "SUCCEEDED"))
        .then_some(())
    });
    a.restart();
    let t = op_b.wait_task(&task, T);
    assert_eq!(t["state"], "SUCCEEDED", "{t:#}");
    for id in ids {
        let m = machine_of(&t, id);
        assert_eq!(m["state"], "SUCCEEDED", "{m:#}");
        assert!(m["stdout"].as_str().unwrap().contains("done"), "{m:#}");
    }
    // Every script ran exactly once: one line per machine, each its own assignment.
    let r = runs(&log);
    let mut per_machine: BTreeMap<&str, usize> = BTreeMap::new();
    for (m, _) in &r {
        *per_machine.entry(m.as_str()).or_default() += 1;
    }
    assert_eq!(
        per_machine,
        ids.iter().map(|id| (*id, 1)).collect::<BTreeMap<_, _>>(),
        "runs: {r:?}"
    );
    // Both replicas show the same task, results included.
    let op_a = env.operator(&a);
    let from_a = op_a.task(&task);
    assert_eq!(from_a["state"], "SUCCEEDED");
    assert_eq!(from_a["machines"], t["machines"]);
}

fn provisioning(op: &crate::support::Client, pool: &str) -> Value {
    let (s, v) = op.get(&format!("/v1/pools/{pool}/provisioning-status"));
    assert_eq!(s, 200, "{v}");
    v
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[test]
fn a_scheduled_push_fires_on_the_replica_that_is_up() {
    let env = Env::new();
    let Some((mut a, b)) = replicas(&env) else {
        return;
    };
    let mut m = machine_with(&env, &a, "m1", "p", Reboot::Real, &urls(&a, &b));
    let op_b = env.operator(&b);
    op_b.wait_online(&["m1"], T);
    let fleet = Fleet::new(&env);
    // The image is uploaded through A and served (with ranges) by whichever replica the
    // agent reaches: the blob directory is shared.
    let image = {
        let op_a = env.operator(&a);
        fleet.image(&op_a, "beta", true, 300_000)
    };
    let start = unix_ms() + 8_000;
    let task = {
        let op_a = env.operator(&a);
        push(&op_a, "p", json!({"image_id": image, "start_time": start}))
    };
    // The replica that took the push (and the agent's first URL) is down when the start
    // time comes.
    a.kill();
    let end = pump(&mut [&mut m], "the push to end on replica B", || {
        let s = provisioning(&op_b, "p");
        (s["operation"] == "NONE").then_some(s)
    });
    assert_eq!(end["current_image_id"], image.as_str(), "{end:#}");
    assert_eq!(current_link(&m).as_deref(), Some(image.as_str()));
    let t = op_b.task(&task);
    let mm = machine_of(&t, "m1");
    assert_eq!(mm["state"], "SUCCEEDED", "{mm:#}");
    let applied = time::OffsetDateTime::parse(
        mm["started_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
    .unix_timestamp_nanos()
        / 1_000_000;
    assert!(applied as i64 >= start, "applied before start_time: {mm:#}");
    // Activated once: the schedule fired once, on B.
    assert_eq!(
        fleet.hooks_of("m1"),
        vec!["m1 activate beta", "m1 health beta"]
    );
    // A, back, agrees.
    a.restart();
    let op_a = env.operator(&a);
    assert_eq!(provisioning(&op_a, "p")["current_image_id"], image.as_str());
}

#[test]
fn a_poll_on_one_replica_hears_of_work_created_through_the_other_at_once() {
    let env = Env::new();
    let Some((a, b)) = replicas(&env) else {
        return;
    };
    // The agent knows only A; its long polls last 25 s.
    let one = format!("controller_urls = [\"{}\"]\n", a.url());
    let _agent = env.agent_with(&a, "w1", "pool-w", &one);
    let op_b = env.operator(&b);
    op_b.wait_online(&["w1"], T);
    // Let the agent settle into a long poll on A.
    std::thread::sleep(Duration::from_secs(2));
    let created = Instant::now();
    let task = op_b.execute(
        "pool-w",
        json!({"command_content": "echo woken", "command_type": "sh"}),
    );
    let t = op_b.wait_task(&task, T);
    let took = created.elapsed();
    assert_eq!(t["state"], "SUCCEEDED", "{t:#}");
    // Without the wake-up between replicas the poll on A would only look again when it
    // ends, 25 s later (or at the next heartbeat, 60 s).
    assert!(
        took < Duration::from_secs(10),
        "the assignment reached the agent after {took:?}: A's poll was not woken"
    );
}
