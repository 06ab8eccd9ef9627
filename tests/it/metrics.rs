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
