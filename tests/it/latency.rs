//! A measurement, not a check: how long a new assignment takes to reach an idle, connected agent
//! on loopback. Run with `cargo test --test it latency -- --ignored --nocapture`.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::Env;

#[test]
#[ignore = "benchmark: prints figures"]
fn assignment_reaches_an_idle_agent() {
    let env = Env::new();
    let ctl = env.controller();
    let a = env.agent(&ctl, "m1", "pool-l");
    let op = env.operator(&ctl);
    op.wait_online(&["m1"], Duration::from_secs(60));
    let mut samples = Vec::new();
    for i in 0..20 {
        // Let the agent settle into its long-poll between tries.
        std::thread::sleep(Duration::from_millis(300));
        let marker = env.path().join(format!("reached-{i}"));
        let sent = Instant::now();
        let task = op.execute(
            "pool-l",
            json!({"command_content": format!("touch {}", marker.display()), "command_type": "sh"}),
        );
        // The script's first act is the marker: submission -> delivery -> start -> first syscall.
        // Poll tightly: the shared 50 ms helper would dominate the figure.
        while !marker.exists() {
            assert!(
                sent.elapsed() < Duration::from_secs(30),
                "assignment {i} never arrived"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        samples.push(sent.elapsed());
        op.wait_task(&task, Duration::from_secs(30));
        let _ = &a;
    }
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "assignment latency over {} tries: median {:.1} ms, worst {:.1} ms, best {:.1} ms",
        samples.len(),
        ms(samples[samples.len() / 2]),
        ms(*samples.last().unwrap()),
        ms(samples[0])
    );
}

/// From an agent's first start with only a token (no key, no certificate) to its first
/// completed assignment. Run with `cargo test --test it latency -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark: prints figures"]
fn first_start_with_a_token_to_the_first_completed_assignment() {
    let env = Env::new();
    let ctl = env.controller();
    let op = env.operator(&ctl);
    let mut samples = Vec::new();
    for i in 0..10 {
        let pool = format!("enroll-{i}");
        let id = format!("e{i}");
        let token = env.token(&ctl, json!({"pool_id": pool}));
        let started = Instant::now();
        let agent = env.enrolling_agent(&ctl, &id, &token, "");
        // Submit as soon as the pool has its machine; poll tightly.
        let task = loop {
            let (s, v) = op.post(
                &format!("/v1/pools/{pool}/script-executions"),
                json!({"command_content": "true", "command_type": "sh"}),
            );
            if s == 200 {
                break v["task_id"].as_str().unwrap().to_string();
            }
            assert!(started.elapsed() < Duration::from_secs(30), "{v}");
            std::thread::sleep(Duration::from_millis(2));
        };
        loop {
            let t = op.task(&task);
            if !t["finished_at"].is_null() {
                assert_eq!(t["state"], "SUCCEEDED", "{t:#}");
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        samples.push(started.elapsed());
        drop(agent);
    }
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "first start with a token -> first completed assignment over {} tries: median {:.1} ms, worst {:.1} ms, best {:.1} ms",
        samples.len(),
        ms(samples[samples.len() / 2]),
        ms(*samples.last().unwrap()),
        ms(samples[0])
    );
}
