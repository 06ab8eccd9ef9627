//! Fault injection: a seeded harness kills the agent or the controller with SIGKILL at random
//! points of script runs, staging, power steps and result delivery, restarts it, and checks
//! the invariants: every machine of every task ends once, no script runs twice, and no
//! staged tree is half there.
//!
//! `.ci/run` runs a few trials (the default); run hundreds with
//! `FIELDHAND_FAULT_TRIALS=300 FIELDHAND_FAULT_SEED=1 cargo test --release --test it faults -- --nocapture`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{machine, Env, Reboot};

const T: Duration = Duration::from_secs(90);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Scenario {
    Script,
    Stage,
    Power,
    Delivery,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Victim {
    Agent,
    Controller,
}

fn env_u64(k: &str, default: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn targz(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(enc);
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_path(path).unwrap();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data.as_slice()).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

/// Every staged commit is whole: both files, with their contents. No partial tree is left
/// once the task has ended.
fn staged_trees_are_whole(software: &Path, files: &[(&str, Vec<u8>)]) -> Result<(), String> {
    let Ok(rd) = std::fs::read_dir(software) else {
        return Ok(());
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            return Err(format!("a partial tree was left: {name}"));
        }
        for (path, data) in files {
            let p = e.path().join("tools").join(path);
            match std::fs::read(&p) {
                Ok(d) if d == *data => {}
                Ok(d) => {
                    return Err(format!(
                        "{} has {} bytes, not {}",
                        p.display(),
                        d.len(),
                        data.len()
                    ))
                }
                Err(err) => return Err(format!("{} is missing: {err}", p.display())),
            }
        }
    }
    Ok(())
}

#[test]
fn seeded_kills_keep_every_invariant() {
    let trials = env_u64("FIELDHAND_FAULT_TRIALS", 6);
    let seed = env_u64("FIELDHAND_FAULT_SEED", 20261201);
    let env = Env::new();
    let mut ctl = env.controller_with("reboot_grace_seconds = 10");
    let mut machines: Vec<_> = ["f1", "f2"]
        .iter()
        .map(|id| machine(&env, &ctl, id, "faults", Reboot::Real))
        .collect();
    let op = env.operator(&ctl);
    op.wait_online(&["f1", "f2"], T);
    let tally = env.path().join("tally");
    let files: Vec<(&str, Vec<u8>)> = vec![
        (
            "bin/a",
            (0..3_000_000u32).map(|i| (i % 251) as u8).collect(),
        ),
        ("bin/b", vec![7u8; 1_000_000]),
    ];
    let archive = targz(&files);
    let sum = op.upload(&archive);
    let mut outcomes: BTreeMap<(Scenario, Victim, String), u32> = BTreeMap::new();
    let started = Instant::now();
    for trial in 0..trials {
        let mut rng = fastrand::Rng::with_seed(seed.wrapping_add(trial));
        let scenario = [
            Scenario::Script,
            Scenario::Stage,
            Scenario::Power,
            Scenario::Delivery,
        ][rng.usize(..4)];
        let victim = if rng.bool() {
            Victim::Agent
        } else {
            Victim::Controller
        };
        let target = rng.usize(..2);
        let delay = Duration::from_millis(rng.u64(0..1200));
        let mut tasks = Vec::new();
        match scenario {
            Scenario::Script | Scenario::Power | Scenario::Delivery => {
                let n = if scenario == Scenario::Delivery { 3 } else { 1 };
                for _ in 0..n {
                    let mut body = json!({
                        "command_content": format!(
                            "echo \"$FIELDHAND_TASK_ID $FIELDHAND_MACHINE_ID\" >> {}; sleep 0.{}",
                            tally.display(),
                            rng.u32(1..9)
                        ),
                        "command_type": "sh",
                        "execution_timeout_seconds": 30,
                    });
                    if scenario == Scenario::Power {
                        body["post_finish"] = json!("reboot");
                    }
                    tasks.push(op.execute("faults", body));
                }
            }
            Scenario::Stage => {
                for id in ["f1", "f2"] {
                    let (s, v) = op.put(
                        &format!("/v1/hosts/{id}/software/desired"),
                        json!({"components": [{"name": "tools", "version": format!("{trial}"), "sha256": sum, "format": "tar.gz"}]}),
                    );
                    assert_eq!(s, 200, "{v}");
                    let (s, v) = op.post(&format!("/v1/hosts/{id}/software/stage"), json!({}));
                    assert_eq!(s, 200, "{v}");
                    tasks.push(v["task_id"].as_str().unwrap().to_string());
                }
            }
        }
        std::thread::sleep(delay);
        match victim {
            Victim::Agent => {
                let m = &mut machines[target];
                m.agent.kill();
                m.agent.start_again();
            }
            Victim::Controller => ctl.restart(),
        }
        let op = env.operator(&ctl);
        // Wait for every task, restarting agents that a (fake) reboot powered off.
        let deadline = Instant::now() + T;
        let mut done: Vec<Value> = Vec::new();
        while done.len() < tasks.len() {
            for m in machines.iter_mut() {
                if m.agent.exited() {
                    m.agent.start_again();
                }
            }
            done = tasks
                .iter()
                .filter_map(|t| {
                    let (s, v) = op.get(&format!("/v1/tasks/{t}"));
                    (s == 200 && !v["finished_at"].is_null()).then_some(v)
                })
                .collect();
            assert!(
                Instant::now() < deadline,
                "trial {trial} ({scenario:?}, {victim:?}): tasks did not all end: {tasks:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(&tally).unwrap_or_default();
        for t in &done {
            let task = t["task_id"].as_str().unwrap();
            for m in t["machines"].as_array().unwrap() {
                let id = m["machine_id"].as_str().unwrap();
                let state = m["state"].as_str().unwrap().to_string();
                assert!(
                    ["SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELLED", "SKIPPED"]
                        .contains(&state.as_str()),
                    "trial {trial}: {id} ended {state}"
                );
                let runs = log.lines().filter(|l| *l == format!("{task} {id}")).count();
                assert!(
                    runs <= 1,
                    "trial {trial} ({scenario:?}, {victim:?}): {id} ran task {task} {runs} times"
                );
                let code = m["error_code"].as_str().unwrap_or("-").to_string();
                *outcomes
                    .entry((scenario, victim, format!("{state}/{code}")))
                    .or_default() += 1;
            }
        }
        if scenario == Scenario::Stage {
            for m in &machines {
                if let Err(e) = staged_trees_are_whole(&m.agent.dir.join("state/software"), &files)
                {
                    panic!("trial {trial} ({victim:?}): {e}");
                }
            }
        }
    }
    eprintln!(
        "{trials} fault trials (seed {seed}) in {:.0} s; outcomes per machine:",
        started.elapsed().as_secs_f64()
    );
    for ((s, v, o), n) in &outcomes {
        eprintln!("  {s:?} / kill {v:?}: {o}: {n}");
    }
}
