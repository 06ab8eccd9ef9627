//! Nothing a script starts outlives its run: `setsid`, `set -m` job control and `setsid`
//! plus a double fork, under a normal exit, a timeout, a cancel and an agent `kill -9` and
//! restart; with cgroup v2 groups (a test-made `[exec] cgroup_root`) and with the subreaper
//! fallback (`[exec] cgroups = false`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use crate::support::{alive, wait_until, Env};

const T: Duration = Duration::from_secs(60);

/// A cgroup2 directory for one test, removed (with anything left in it) at the end.
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn new() -> Option<TestCgroup> {
        let mi = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let mount = fieldhand::sys::cgroup::cgroup2_mount(&mi)?;
        let dir = mount.join(format!(
            "fieldhand-test-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir(&dir).ok()?;
        Some(TestCgroup(dir))
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        fn clear(d: &Path) {
            if let Ok(rd) = std::fs::read_dir(d) {
                for e in rd.flatten() {
                    if e.path().is_dir() {
                        clear(&e.path());
                    }
                }
            }
            let _ = std::fs::write(d.join("cgroup.kill"), "1");
            std::thread::sleep(Duration::from_millis(20));
            let _ = std::fs::remove_dir(d);
        }
        clear(&self.0);
    }
}

/// Starts three escapees (their pids go to `pids`), then runs `then`.
fn escaping_script(pids: &Path, then: &str) -> String {
    let p = pids.display();
    format!(
        "setsid sh -c 'echo $$ >> {p}; exec sleep 300' &\n\
         set -m\nsh -c 'echo $$ >> {p}; exec sleep 300' &\nset +m\n\
         setsid sh -c 'sh -c \"echo \\$\\$ >> {p}; exec sleep 300\" & exit' &\n\
         while [ \"$(wc -l < {p} 2>/dev/null || echo 0)\" -lt 3 ]; do sleep 0.05; done\n\
         {then}\n"
    )
}

fn survivors(pids: &Path) -> Vec<i32> {
    std::fs::read_to_string(pids)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(|p| alive(*p))
        .collect()
}

#[derive(Debug, Clone, Copy)]
enum End {
    Exit,
    Timeout,
    Cancel,
    AgentRestart,
}

/// Runs the escaping script once per way of ending; returns the survivors of each.
fn trial(extra: &str) -> Vec<(End, Vec<i32>)> {
    let env = Env::new();
    let ctl = env.controller();
    let op = env.operator(&ctl);
    let mut agent = env.agent_with(&ctl, "c1", "p", extra);
    op.wait_online(&["c1"], T);
    let mut out = Vec::new();
    for end in [End::Exit, End::Timeout, End::Cancel, End::AgentRestart] {
        let pids = env.path().join(format!("pids-{end:?}"));
        let then = match end {
            End::Exit => "exit 0",
            End::Timeout | End::Cancel | End::AgentRestart => "sleep 60",
        };
        let task = op.execute(
            "p",
            json!({"command_content": escaping_script(&pids, then), "command_type": "bash",
                   "execution_timeout_seconds": if matches!(end, End::Timeout) { 3 } else { 120 }}),
        );
        wait_until("the escapees to start", T, || {
            (std::fs::read_to_string(&pids)
                .unwrap_or_default()
                .lines()
                .count()
                >= 3)
                .then_some(())
        });
        match end {
            End::Exit | End::Timeout => {}
            End::Cancel => {
                let (s, v) = op.post(&format!("/v1/tasks/{task}/cancel"), json!({}));
                assert_eq!(s, 200, "{v}");
            }
            End::AgentRestart => {
                agent.kill();
                agent.start_again();
            }
        }
        let t = op.wait_task(&task, T);
        let m = &t["machines"][0];
        let expected = match end {
            End::Exit => "SUCCEEDED",
            End::Timeout => "TIMED_OUT",
            End::Cancel => "CANCELLED",
            End::AgentRestart => "FAILED",
        };
        assert_eq!(m["state"], expected, "{end:?}: {t:#}");
        // The next assignment may start now: nothing of this one may still run.
        std::thread::sleep(Duration::from_millis(200));
        out.push((end, survivors(&pids)));
    }
    let status = agent.status();
    eprintln!("containment: {}", status["containment"]);
    out
}

fn assert_none_survive(label: &str, results: &[(End, Vec<i32>)]) {
    for (end, left) in results {
        eprintln!("{label}: {end:?}: {} survivors", left.len());
    }
    let bad: Vec<_> = results.iter().filter(|(_, l)| !l.is_empty()).collect();
    assert!(
        bad.is_empty(),
        "{label}: processes outlived their run: {bad:?}"
    );
}

#[test]
fn no_process_outlives_its_run_in_a_cgroup() {
    let Some(cg) = TestCgroup::new() else {
        panic!("this test needs a writable cgroup2 mount (see /proc/self/mountinfo)");
    };
    let extra = format!(
        "[exec]\nkill_grace_seconds = 1\ncgroup_root = \"{}\"\n",
        cg.0.display()
    );
    // The support config has an [exec] table already: replace it.
    let results = trial(&extra);
    assert_none_survive("cgroup", &results);
}

#[test]
fn no_process_outlives_its_run_with_the_subreaper_fallback() {
    let results = trial("[exec]\nkill_grace_seconds = 1\ncgroups = false\n");
    assert_none_survive("subreaper", &results);
}
