//! Metrics in the Prometheus text format: the agent's (`fieldhand status --metrics` and the
//! node_exporter textfile), checked with `promtool check metrics` when it is installed
//! (`.ci/run` installs it and sets `FIELDHAND_REQUIRE_PROMTOOL=1`, so there it must run), and
//! counters that move when work happens.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::support::{run, wait_until, Env, AGENT};

const T: Duration = Duration::from_secs(60);

/// `promtool check metrics` on `text`; `false` when promtool is absent (and not required).
pub fn promtool_check(text: &str) -> bool {
    let required = std::env::var_os("FIELDHAND_REQUIRE_PROMTOOL").is_some();
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            assert!(!required, "promtool is required here but cannot run: {e}");
            eprintln!("skipped promtool (not installed): {e}");
            return false;
        }
    };
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

fn agent_metrics(socket: &Path) -> String {
    let out = run(
        AGENT,
        &["status", "--metrics", "--socket", socket.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "status --metrics: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The value of the sample named exactly `series` (name and labels), if present.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[test]
fn the_agents_counters_move_with_its_work_and_pass_promtool() {
    let env = Env::new();
    let ctl = env.controller();
    let prom = env.path().join("textfile/fieldhand.prom");
    std::fs::create_dir_all(prom.parent().unwrap()).unwrap();
    let a = env.agent_with(
        &ctl,
        "m1",
        "pool-m",
        &format!(
            "[metrics]\ntextfile = \"{}\"\ntextfile_every_seconds = 1\n",
            prom.display()
        ),
    );
    let op = env.operator(&ctl);
    op.wait_online(&["m1"], T);
    let ok = "fieldhand_agent_results_total{work=\"scripts\",outcome=\"SUCCEEDED\"}";
    let failed = "fieldhand_agent_results_total{work=\"scripts\",outcome=\"FAILED\"}";
    let before = agent_metrics(&a.socket);
    assert_eq!(sample(&before, ok), None, "{before}");
    assert_eq!(
        sample(&before, "fieldhand_agent_connected"),
        Some(1.0),
        "{before}"
    );
    promtool_check(&before);

    for (cmd, want) in [
        ("true", "SUCCEEDED"),
        ("true", "SUCCEEDED"),
        ("exit 3", "FAILED"),
    ] {
        let task = op.execute(
            "pool-m",
            json!({"command_content": cmd, "command_type": "sh"}),
        );
        let t = op.wait_task(&task, T);
        assert_eq!(t["machines"][0]["state"], want, "{t:#}");
    }
    let after = agent_metrics(&a.socket);
    assert_eq!(sample(&after, ok), Some(2.0), "{after}");
    assert_eq!(sample(&after, failed), Some(1.0), "{after}");
    assert_eq!(
        sample(&after, "fieldhand_agent_outbox_events"),
        Some(0.0),
        "{after}"
    );
    let age = sample(&after, "fieldhand_agent_last_contact_age_seconds").unwrap();
    assert!((0.0..30.0).contains(&age), "{after}");
    assert!(
        sample(
            &after,
            "fieldhand_agent_certificate_expiry_timestamp_seconds"
        )
        .unwrap()
            > 1.7e9,
        "{after}"
    );
    promtool_check(&after);

    // The textfile catches up within its period, whole (written atomically).
    let text = wait_until("the textfile to show the results", T, || {
        let t = std::fs::read_to_string(&prom).ok()?;
        (sample(&t, ok) == Some(2.0)).then_some(t)
    });
    assert!(
        text.ends_with('\n') && text.contains("fieldhand_agent_connected 1"),
        "{text}"
    );
    promtool_check(&text);
}

#[test]
fn the_controllers_metrics_count_the_fleet_and_its_work_for_operators_and_scrapers_only() {
    let env = Env::new();
    let ctl = env.controller();
    let _a = env.agent(&ctl, "c1", "pool-c");
    let _b = env.agent(&ctl, "c2", "pool-c");
    let op = env.operator(&ctl);
    op.wait_online(&["c1", "c2"], T);
    let text = |c: &crate::support::Client| -> String {
        let (s, v) = c.get("/metrics");
        assert_eq!(s, 200, "{v}");
        v.as_str().expect("text, not JSON").to_string()
    };
    let before = text(&op);
    assert_eq!(
        sample(
            &before,
            "fieldhand_machines{pool=\"pool-c\",online=\"true\"}"
        ),
        Some(2.0),
        "{before}"
    );
    let applied = "fieldhand_agent_events_total{outcome=\"applied\"}";
    assert_eq!(sample(&before, applied), None, "{before}");
    promtool_check(&before);
    let (_, headers, _) = op.get_with("/metrics", &[]);
    assert!(
        headers[http::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"),
        "{headers:?}"
    );

    let task = op.execute(
        "pool-c",
        json!({"command_content": "true", "command_type": "sh"}),
    );
    let t = op.wait_task(&task, T);
    assert_eq!(t["state"], "SUCCEEDED", "{t:#}");
    let after = text(&op);
    // STARTED and RESULT from each of the two machines.
    assert_eq!(sample(&after, applied), Some(4.0), "{after}");
    assert_eq!(
        sample(
            &after,
            "fieldhand_tasks{kind=\"script_execution\",state=\"SUCCEEDED\"}"
        ),
        Some(1.0),
        "{after}"
    );
    assert_eq!(
        sample(&after, "fieldhand_dispatch_latency_seconds_count"),
        Some(2.0),
        "{after}"
    );
    assert_eq!(
        sample(&after, "fieldhand_result_latency_seconds_count"),
        Some(2.0),
        "{after}"
    );
    assert!(
        sample(
            &after,
            "fieldhand_http_requests_total{route=\"v1/tasks/*\",method=\"GET\",status=\"200\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{after}"
    );
    assert!(
        sample(&after, "fieldhand_db_transaction_duration_seconds_count").unwrap() > 0.0,
        "{after}"
    );
    assert_eq!(
        sample(&after, "fieldhand_agent_certificates_expiring_14d"),
        Some(0.0),
        "{after}"
    );
    promtool_check(&after);

    // A scraper's certificate reads /metrics and nothing else; an agent's may not read it.
    let out = run(
        crate::support::CONTROLLER,
        &[
            "pki",
            "issue",
            "--dir",
            env.pki.to_str().unwrap(),
            "--metrics",
            "prom",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let scraper = env.client(&ctl, Some(("metrics/prom.pem", "metrics/prom-key.pem")));
    assert!(text(&scraper).contains("fieldhand_machines"));
    let (s, v) = scraper.get("/v1/machines");
    assert_eq!(
        (s, v["error_code"].as_str()),
        (403, Some("FORBIDDEN")),
        "{v}"
    );
    let agent = env.agent_client(&ctl, "c1");
    let (s, v) = agent.get("/metrics");
    assert_eq!(
        (s, v["error_code"].as_str()),
        (403, Some("FORBIDDEN")),
        "{v}"
    );
}
