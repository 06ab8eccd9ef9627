//! Rollout rate controls end to end, with real agents: waves of `max_concurrency` after the
//! gray batch, the `max_errors` halt, the power limits (controller-wide and per pool) over
//! machines that really reboot, retry and resume. Concurrency is measured from what the
//! machines recorded (start/end times, reboot times) and asserted as counts.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{
    machine, machine_ids, machine_of, now_ns, peak_overlap, Agent, Env, Machine, Reboot,
};

const T: Duration = Duration::from_secs(120);

fn agents(env: &Env, ctl: &crate::support::Controller, pool: &str, n: usize) -> Vec<Agent> {
    (1..=n)
        .map(|i| env.agent(ctl, &format!("m{i}"), pool))
        .collect()
}

fn ids(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("m{i}")).collect()
}

/// `(machine, start ns, end ns)` from lines `<id> start|end <ns>` appended by the scripts.
fn intervals(log: &std::path::Path) -> HashMap<String, (u128, u128)> {
    let mut out: HashMap<String, (u128, u128)> = HashMap::new();
    for line in std::fs::read_to_string(log).unwrap().lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (id, what, ns) = (f[0].to_string(), f[1], f[2].parse::<u128>().unwrap());
        let e = out.entry(id).or_insert((0, 0));
        match what {
            "start" => e.0 = ns,
            _ => e.1 = ns,
        }
    }
    out
}

fn timed_script(log: &std::path::Path, body: &str) -> String {
    format!(
        "echo \"$FIELDHAND_MACHINE_ID start $(date +%s%N)\" >> {log}\n{body}\necho \"$FIELDHAND_MACHINE_ID end $(date +%s%N)\" >> {log}\n",
        log = log.display()
    )
}

#[test]
fn waves_after_the_gray_batch_run_at_most_max_concurrency_at_once() {
    let env = Env::new();
    let ctl = env.controller();
    let _a = agents(&env, &ctl, "pool-w", 6);
    let op = env.operator(&ctl);
    let all = ids(6);
    op.wait_online(&all.iter().map(String::as_str).collect::<Vec<_>>(), T);
    let log = env.path().join("runs.log");
    let task = op.execute(
        "pool-w",
        json!({"command_content": timed_script(&log, "sleep 1"), "command_type": "sh",
               "gray_count": 1, "max_concurrency": 2}),
    );
    let t = op.wait_task(&task, T);
    assert_eq!(t["state"], "SUCCEEDED", "{t:#}");
    for id in &all {
        assert_eq!(machine_of(&t, id)["state"], "SUCCEEDED", "{t:#}");
    }
    // The request's rate controls are shown as given.
    assert_eq!(
        (&t["gray_count"], &t["max_concurrency"]),
        (&json!(1), &json!(2))
    );
    assert_eq!(t["max_errors"], Value::Null);
    assert_eq!(t["batches"][0]["machine_ids"], json!(["m1"]));
    let runs = intervals(&log);
    assert_eq!(runs.len(), 6, "{runs:?}");
    let gray_end = runs["m1"].1;
    let rest: Vec<(u128, u128)> = all[1..].iter().map(|id| runs[id]).collect();
    assert!(rest.iter().all(|(s, _)| *s >= gray_end), "{runs:?}");
    let peak = peak_overlap(&rest);
    eprintln!("max_concurrency 2 over 5 machines after the gray batch: peak {peak} at once");
    assert!(peak <= 2, "peak {peak} > max_concurrency 2: {runs:?}");
}

#[test]
fn more_failures_than_max_errors_halt_the_task_and_skip_the_rest() {
    let env = Env::new();
    let ctl = env.controller();
    let _a = agents(&env, &ctl, "pool-e", 6);
    let op = env.operator(&ctl);
    let all = ids(6);
    op.wait_online(&all.iter().map(String::as_str).collect::<Vec<_>>(), T);
    // m1 and m2 (the first wave) fail at once; the others take a while.
    let script = "case $FIELDHAND_MACHINE_ID in m1|m2) echo no >&2; exit 1;; esac\nsleep 2\n";
    let task = op.execute(
        "pool-e",
        json!({"command_content": script, "command_type": "sh",
               "max_concurrency": 2, "max_errors": 1}),
    );
    let t = op.wait_task(&task, T);
    assert_eq!(t["state"], "HALTED", "{t:#}");
    assert_eq!(t["max_errors"], 1);
    for id in ["m1", "m2"] {
        assert_eq!(machine_of(&t, id)["state"], "FAILED", "{t:#}");
    }
    // m3 started when m1's failure was the only one; it ran to its end.
    assert_eq!(machine_of(&t, "m3")["state"], "SUCCEEDED", "{t:#}");
    for id in ["m4", "m5", "m6"] {
        let m = machine_of(&t, id);
        assert_eq!(m["state"], "SKIPPED", "{t:#}");
        assert_eq!(m["error_code"], "MAX_ERRORS_REACHED", "{t:#}");
        assert!(
            m["error_msg"].as_str().unwrap().contains("max_errors"),
            "{m:#}"
        );
        assert!(m["started_at"].is_null(), "{m:#}");
    }
}

/// Runs a `post_finish: reboot` task over `machines` and plays each machine's boot: a
/// machine whose agent went down (the reboot command cut its power) stays down for
/// `boot_time`, then its agent starts again. Returns the task and each machine's reboot
/// interval: from its reboot command to its agent running again.
fn reboot_all(
    op: &crate::support::Client,
    pool: &str,
    machines: &mut [Machine],
    boot_time: Duration,
) -> (Value, Vec<(u128, u128)>) {
    let task = op.execute(
        pool,
        json!({"command_content": "echo ran", "command_type": "sh", "post_finish": "reboot"}),
    );
    let mut down_since: Vec<Option<Instant>> = vec![None; machines.len()];
    let mut back: Vec<Vec<u128>> = vec![Vec::new(); machines.len()];
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < T, "the reboots did not end within {T:?}");
        for (i, m) in machines.iter_mut().enumerate() {
            match down_since[i] {
                None if m.agent.exited() => down_since[i] = Some(Instant::now()),
                Some(t) if t.elapsed() >= boot_time => {
                    back[i].push(now_ns());
                    m.agent.start_again();
                    down_since[i] = None;
                }
                None | Some(_) => {}
            }
        }
        let t = op.task(&task);
        if !t["finished_at"].is_null() {
            let spans = machines
                .iter()
                .zip(&back)
                .flat_map(|(m, b)| m.reboot_times().into_iter().zip(b.clone()))
                .collect();
            return (t, spans);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_controller_wide_power_limit_caps_the_machines_rebooting_at_once() {
    let env = Env::new();
    let ctl = env.controller_with("max_concurrent_power_operations = 2");
    let mut ms: Vec<Machine> = ids(10)
        .iter()
        .map(|id| machine(&env, &ctl, id, "pool-r", Reboot::Real))
        .collect();
    let op = env.operator(&ctl);
    op.wait_online(&ids(10).iter().map(String::as_str).collect::<Vec<_>>(), T);
    let (t, spans) = reboot_all(&op, "pool-r", &mut ms, Duration::from_millis(1000));
    assert_eq!(t["state"], "SUCCEEDED", "{t:#}");
    for (id, m) in ids(10).iter().zip(&ms) {
        let mm = machine_of(&t, id);
        assert_eq!(mm["state"], "SUCCEEDED", "{mm:#}");
        assert_eq!(mm["power_state"], "REBOOTED", "{mm:#}");
        assert_eq!(m.power_log(), vec!["reboot"], "{id}");
    }
    assert_eq!(spans.len(), 10, "{spans:?}");
    let peak = peak_overlap(&spans);
    eprintln!(
        "max_concurrent_power_operations = 2 over 10 machines with post_finish reboot: \
         peak {peak} rebooting at once"
    );
    assert!(peak <= 2, "peak {peak} > 2: {spans:?}");
    // The limit holds the rest back, it does not stop them: every machine ran once.
    let (s, v) = op.get("/v1/pools/pool-r/power-limit");
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["controller_max_concurrent_power_operations"], 2, "{v}");
    assert_eq!(v["max_concurrent_power_operations"], Value::Null, "{v}");
}

#[test]
fn a_pool_power_limit_set_by_the_operator_caps_reboots_in_that_pool() {
    let env = Env::new();
    let ctl = env.controller();
    let op = env.operator(&ctl);
    for (body, field) in [
        (json!({"max_concurrent_power_operations": 0}), "0"),
        (json!({"max_concurrent_power_operations": -3}), "-3"),
        (json!({"max_concurrent_power_operations": "two"}), "two"),
        (
            json!({"max_concurrent_power_operationz": 1}),
            "max_concurrent_power_operationz",
        ),
    ] {
        let (s, v) = op.put("/v1/pools/pool-l/power-limit", body);
        assert_eq!(s, 400, "{v}");
        let msg = v["error_msg"].as_str().unwrap();
        assert!(
            msg.contains("max_concurrent_power_operation") && msg.contains(field),
            "{msg}"
        );
    }
    let (s, v) = op.put(
        "/v1/pools/pool-l/power-limit",
        json!({"max_concurrent_power_operations": 1}),
    );
    assert_eq!(
        (s, &v["max_concurrent_power_operations"]),
        (200, &json!(1)),
        "{v}"
    );
    let mut ms: Vec<Machine> = ids(3)
        .iter()
        .map(|id| machine(&env, &ctl, id, "pool-l", Reboot::Real))
        .collect();
    op.wait_online(&["m1", "m2", "m3"], T);
    let (t, spans) = reboot_all(&op, "pool-l", &mut ms, Duration::from_millis(700));
    assert_eq!(t["state"], "SUCCEEDED", "{t:#}");
    assert_eq!(spans.len(), 3, "{spans:?}");
    let peak = peak_overlap(&spans);
    eprintln!("pool power limit 1 over 3 machines with post_finish reboot: peak {peak}");
    assert_eq!(peak, 1, "{spans:?}");
    // null clears it.
    let (s, v) = op.put(
        "/v1/pools/pool-l/power-limit",
        json!({"max_concurrent_power_operations": null}),
    );
    assert_eq!(
        (s, &v["max_concurrent_power_operations"]),
        (200, &Value::Null),
        "{v}"
    );
}

#[test]
fn retry_runs_a_new_task_over_exactly_the_failed_machines() {
    let env = Env::new();
    let ctl = env.controller();
    let _a = agents(&env, &ctl, "pool-t", 4);
    let op = env.operator(&ctl);
    op.wait_online(&["m1", "m2", "m3", "m4"], T);
    // m2 and m4 fail the first time only.
    let marks = env.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let script = format!(
        "M={}/$FIELDHAND_MACHINE_ID\ncase $FIELDHAND_MACHINE_ID in m2|m4) if [ ! -f $M ]; then touch $M; exit 7; fi;; esac\necho ok\n",
        marks.display()
    );
    let first = op.execute(
        "pool-t",
        json!({"command_content": script, "command_type": "sh", "max_concurrency": "50%"}),
    );
    let t = op.wait_task(&first, T);
    assert_eq!(t["state"], "FAILED", "{t:#}");
    let (s, v) = op.post(&format!("/v1/tasks/{first}/retry"), json!({}));
    assert_eq!(s, 200, "{v}");
    let again = v["task_id"].as_str().unwrap().to_string();
    assert_ne!(again, first);
    let r = op.wait_task(&again, T);
    assert_eq!(r["retry_of"], first.as_str(), "{r:#}");
    assert_eq!(machine_ids(&r), vec!["m2", "m4"], "{r:#}");
    assert_eq!(r["state"], "SUCCEEDED", "{r:#}");
    assert_eq!(r["max_concurrency"], "50%", "same settings: {r:#}");
    assert_eq!(r["kind"], "script_execution");
    // Nothing failed in the retry: nothing to retry.
    let (s, v) = op.post(&format!("/v1/tasks/{again}/retry"), json!({}));
    assert_eq!(
        (s, &v["error_code"]),
        (409, &json!("NOT_ALLOWED_IN_CURRENT_STATE")),
        "{v}"
    );
    assert!(
        v["error_msg"]
            .as_str()
            .unwrap()
            .contains("nothing to retry"),
        "{v}"
    );
    // A task still at work cannot be retried yet.
    let long = op.execute(
        "pool-t",
        json!({"command_content": "sleep 30", "command_type": "sh"}),
    );
    let (s, v) = op.post(&format!("/v1/tasks/{long}/retry"), json!({}));
    assert_eq!(s, 409, "{v}");
    assert!(
        v["error_msg"]
            .as_str()
            .unwrap()
            .contains("once it has finished"),
        "{v}"
    );
    let (s, _) = op.post(&format!("/v1/tasks/{long}/cancel"), json!({}));
    assert_eq!(s, 200);
    let (s, v) = op.post("/v1/tasks/no-such-task/retry", json!({}));
    assert_eq!(s, 404, "{v}");
}

#[test]
fn resume_after_a_gray_halt_runs_the_rest() {
    let env = Env::new();
    let ctl = env.controller();
    let _a = agents(&env, &ctl, "pool-g", 3);
    let op = env.operator(&ctl);
    op.wait_online(&["m1", "m2", "m3"], T);
    let script = "if [ \"$FIELDHAND_MACHINE_ID\" = m1 ]; then exit 3; fi\necho ok\n";
    let task = op.execute(
        "pool-g",
        json!({"command_content": script, "command_type": "sh", "gray_count": "30%"}),
    );
    let t = op.wait_task(&task, T);
    assert_eq!(t["state"], "HALTED", "{t:#}");
    assert_eq!(t["gray_count"], "30%");
    assert_eq!(t["batches"][0]["machine_ids"], json!(["m1"]));
    for id in ["m2", "m3"] {
        assert_eq!(machine_of(&t, id)["error_code"], "GRAY_THRESHOLD_REACHED");
    }
    let (s, v) = op.post(&format!("/v1/tasks/{task}/resume"), json!({}));
    assert_eq!(s, 200, "{v}");
    assert!(v["finished_at"].is_null(), "{v:#}");
    assert_ne!(v["state"], "HALTED", "{v:#}");
    let t = op.wait_task(&task, T);
    // The gray machine's failure stands: the task ends FAILED, the rest ran.
    assert_eq!(t["state"], "FAILED", "{t:#}");
    assert_eq!(machine_of(&t, "m1")["state"], "FAILED");
    for id in ["m2", "m3"] {
        let m = machine_of(&t, id);
        assert_eq!(m["state"], "SUCCEEDED", "{t:#}");
        assert!(m["error_code"].is_null(), "{m:#}");
    }
    // Only a HALTED task resumes.
    let (s, v) = op.post(&format!("/v1/tasks/{task}/resume"), json!({}));
    assert_eq!(
        (s, &v["error_code"]),
        (409, &json!("NOT_ALLOWED_IN_CURRENT_STATE")),
        "{v}"
    );
}
