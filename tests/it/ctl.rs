//! `fieldhandctl`, the real binary, against a real controller with real agents: exit codes
//! by the task's end state, JSON that parses, plain progress lines on a pipe, the settings'
//! precedence (flag over environment over file), and the routes other controllers lack.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::support::{Controller, Env};

pub const CTL: &str = env!("CARGO_BIN_EXE_fieldhandctl");

/// The CLI with no settings but the ones given: no FIELDHAND_* variables, and a HOME with
/// no config file.
fn bare(env: &Env) -> Command {
    let mut c = Command::new(CTL);
    for v in [
        "FIELDHAND_URL",
        "FIELDHAND_CA",
        "FIELDHAND_CERT",
        "FIELDHAND_KEY",
        "FIELDHAND_CTL_CONFIG",
        "XDG_CONFIG_HOME",
    ] {
        c.env_remove(v);
    }
    let home = env.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    c.env("HOME", home);
    c
}

/// The CLI with every setting as a flag (the test PKI's operator `op`).
fn ctl(env: &Env, ctl: &Controller, args: &[&str]) -> Output {
    let pki = &env.pki;
    let mut c = bare(env);
    c.arg("--url")
        .arg(ctl.url())
        .arg("--ca")
        .arg(pki.join("ca.pem"))
        .arg("--cert")
        .arg(pki.join("operators/op.pem"))
        .arg("--key")
        .arg(pki.join("operators/op-key.pem"))
        .args(args);
    c.output().expect("run fieldhandctl")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn explain(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        stdout(o),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The command's stdout as JSON (panics with the whole output if it is not).
fn json_of(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", explain(o)))
}

/// The task id a command without `--wait` printed (`task <id>`).
fn task_id(o: &Output) -> String {
    stdout(o)
        .lines()
        .find_map(|l| l.strip_prefix("task "))
        .unwrap_or_else(|| panic!("no task id: {}", explain(o)))
        .trim()
        .to_string()
}

#[test]
fn run_and_watch_exit_by_how_the_task_ended() {
    let env = Env::new();
    let c = env.controller();
    let _a = env.agent(&c, "m1", "p");
    let _b = env.agent(&c, "m2", "p");
    env.operator(&c)
        .wait_online(&["m1", "m2"], Duration::from_secs(60));

    let ls = ctl(&env, &c, &["machines", "ls"]);
    assert_eq!(ls.status.code(), Some(0), "{}", explain(&ls));
    let text = stdout(&ls);
    assert!(text.starts_with("MACHINE "), "{text}");
    assert!(text.contains("m1") && text.contains("m2"), "{text}");
    assert!(text.lines().all(|l| l.chars().count() <= 80), "{text}");
    let json = ctl(
        &env,
        &c,
        &["machines", "ls", "--pool", "p", "--output", "json"],
    );
    let v: Value = json_of(&json);
    assert_eq!(v.as_array().map(Vec::len), Some(2), "{v}");
    let none = ctl(
        &env,
        &c,
        &["machines", "ls", "--pool", "other", "--output", "json"],
    );
    let v: Value = json_of(&none);
    assert_eq!(v, Value::Array(vec![]));

    // Succeeded: 0, the progress as plain lines (stdout is a pipe), the final state last.
    let ok = ctl(
        &env,
        &c,
        &[
            "run",
            "--pool",
            "p",
            "--command",
            "echo hello-$FIELDHAND_MACHINE_ID",
            "--wait",
        ],
    );
    assert_eq!(ok.status.code(), Some(0), "{}", explain(&ok));
    let text = stdout(&ok);
    let id = task_id(&ok);
    assert_eq!(
        text.lines().last(),
        Some(format!("task {id} SUCCEEDED").as_str()),
        "{text}"
    );
    assert!(
        text.contains("hello-m1") && text.contains("hello-m2"),
        "{text}"
    );
    assert!(
        !text.contains('\u{1b}'),
        "no terminal escapes on a pipe: {text}"
    );

    // Failed: 1. Halted (the gray batch of one fails): 2.
    let failed = ctl(
        &env,
        &c,
        &[
            "run",
            "--pool",
            "p",
            "--command",
            "exit 3",
            "--command-type",
            "bash",
            "--wait",
        ],
    );
    assert_eq!(failed.status.code(), Some(1), "{}", explain(&failed));
    assert!(
        stdout(&failed).trim_end().ends_with("FAILED"),
        "{}",
        explain(&failed)
    );
    let script = env.path().join("fail.py");
    std::fs::write(&script, "import sys\nsys.exit(4)\n").unwrap();
    let added = ctl(
        &env,
        &c,
        &[
            "scripts",
            "add",
            "--name",
            "fail",
            "--type",
            "python3",
            "--file",
            script.to_str().unwrap(),
            "--output",
            "json",
        ],
    );
    let added: Value = json_of(&added);
    let script_id = added["script_id"].as_str().unwrap();
    let halted = ctl(
        &env,
        &c,
        &[
            "run",
            "--pool",
            "p",
            "--script-id",
            script_id,
            "--gray-count",
            "1",
            "--wait",
        ],
    );
    assert_eq!(halted.status.code(), Some(2), "{}", explain(&halted));
    assert!(stdout(&halted).contains("SKIPPED"), "{}", explain(&halted));

    // --output json: the final task, as JSON on stdout; the progress went to stderr.
    let j = ctl(
        &env,
        &c,
        &[
            "run",
            "--pool",
            "p",
            "--command",
            "true",
            "--wait",
            "--output",
            "json",
        ],
    );
    assert_eq!(j.status.code(), Some(0), "{}", explain(&j));
    let v: Value = json_of(&j);
    assert_eq!(v["state"], "SUCCEEDED", "{v}");
    assert!(
        String::from_utf8_lossy(&j.stderr).contains("SUCCEEDED"),
        "{}",
        explain(&j)
    );

    // tasks watch on a running task: one line per change, ending with the final state.
    // The script sleeps 5 s while the watch polls every second, so a watch that printed a
    // line per poll would print "RUNNING 2" several times in a row. Machines only move
    // forward (PENDING, DISPATCHED, RUNNING, SUCCEEDED), so no summary can come back:
    // every line differs from every other, and two machines making three moves each give
    // at most 7 of them. How many there are depends on the timing of the polls, so the
    // test does not ask for a particular count.
    let started = ctl(
        &env,
        &c,
        &["run", "--pool", "p", "--command", "sleep 5; echo slept"],
    );
    assert_eq!(started.status.code(), Some(0), "{}", explain(&started));
    let id = task_id(&started);
    let w = ctl(&env, &c, &["tasks", "watch", &id]);
    assert_eq!(w.status.code(), Some(0), "{}", explain(&w));
    let text = stdout(&w);
    let progress: Vec<&str> = text.lines().filter(|l| l.contains("batch 0:")).collect();
    assert!(!progress.is_empty(), "{text}");
    let distinct: std::collections::BTreeSet<&&str> = progress.iter().collect();
    assert_eq!(
        distinct.len(),
        progress.len(),
        "a line per poll, not per change: {text}"
    );
    assert!(progress.len() <= 7, "{text}");
    assert!(progress.last().unwrap().starts_with("SUCCEEDED"), "{text}");
    assert_eq!(
        text.lines().last(),
        Some(format!("task {id} SUCCEEDED").as_str())
    );

    // Cancelled: 3.
    let long = ctl(&env, &c, &["run", "--pool", "p", "--command", "sleep 60"]);
    let id = task_id(&long);
    env.operator(&c)
        .wait_machine_state(&id, "m1", "RUNNING", Duration::from_secs(30));
    let cancel = ctl(&env, &c, &["tasks", "cancel", &id]);
    assert_eq!(cancel.status.code(), Some(0), "{}", explain(&cancel));
    let w = ctl(&env, &c, &["tasks", "watch", &id]);
    assert_eq!(w.status.code(), Some(3), "{}", explain(&w));
    assert_eq!(
        stdout(&w).lines().last(),
        Some(format!("task {id} CANCELLED").as_str())
    );

    // show: the task with one row per machine; JSON is the controller's view.
    let show = ctl(&env, &c, &["tasks", "show", &id, "--output", "json"]);
    let v: Value = json_of(&show);
    assert_eq!(v["task_id"], id.as_str());
    let m = ctl(&env, &c, &["machines", "show", "m1"]);
    assert!(stdout(&m).starts_with("machine:"), "{}", explain(&m));
    // A refusal (4xx) names the field and exits 65.
    let bad = ctl(
        &env,
        &c,
        &[
            "run",
            "--pool",
            "p",
            "--command",
            "true",
            "--timeout",
            "999999",
        ],
    );
    assert_eq!(bad.status.code(), Some(65), "{}", explain(&bad));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("execution_timeout_seconds"),
        "{}",
        explain(&bad)
    );
}

#[test]
fn settings_come_from_flags_then_environment_then_the_file() {
    let env = Env::new();
    let c = env.controller();
    let pki = &env.pki;
    let file = env.path().join("ctl.toml");
    // Relative paths in the file are relative to the file.
    std::fs::write(
        &file,
        format!(
            "url = \"{}\"\nca = \"pki/ca.pem\"\ncert = \"pki/operators/op.pem\"\nkey = \"pki/operators/op-key.pem\"\n",
            c.url()
        ),
    )
    .unwrap();
    let run = |cmd: &mut Command| cmd.output().unwrap();
    let from_file =
        run(bare(&env).args(["--config", file.to_str().unwrap(), "enroll-token", "ls"]));
    assert_eq!(from_file.status.code(), Some(0), "{}", explain(&from_file));
    // FIELDHAND_CTL_CONFIG names the file too (what the quickstart prints).
    let from_var = run(bare(&env)
        .env("FIELDHAND_CTL_CONFIG", &file)
        .args(["enroll-token", "ls"]));
    assert_eq!(from_var.status.code(), Some(0), "{}", explain(&from_var));
    // The environment beats the file: a URL nobody listens on is unreachable (69).
    let dead = "https://127.0.0.1:9";
    let env_wins = run(bare(&env).env("FIELDHAND_URL", dead).args([
        "--config",
        file.to_str().unwrap(),
        "enroll-token",
        "ls",
    ]));
    assert_eq!(env_wins.status.code(), Some(69), "{}", explain(&env_wins));
    assert!(String::from_utf8_lossy(&env_wins.stderr).contains("127.0.0.1:9"));
    // A flag beats the environment.
    let flag_wins = run(bare(&env).env("FIELDHAND_URL", dead).args([
        "--config",
        file.to_str().unwrap(),
        "--url",
        &c.url(),
        "enroll-token",
        "ls",
    ]));
    assert_eq!(flag_wins.status.code(), Some(0), "{}", explain(&flag_wins));
    // The default file: ~/.config/fieldhand/ctl.toml.
    let home_cfg = env.path().join("home/.config/fieldhand");
    std::fs::create_dir_all(&home_cfg).unwrap();
    std::fs::write(
        home_cfg.join("ctl.toml"),
        format!(
            "url = \"{}\"\nca = \"{}\"\n",
            c.url(),
            pki.join("ca.pem").display()
        ),
    )
    .unwrap();
    let partial = run(bare(&env)
        .env("FIELDHAND_KEY", pki.join("operators/op-key.pem"))
        .args(["enroll-token", "ls"]));
    // A missing setting is a config error naming its flag, variable and key.
    assert_eq!(partial.status.code(), Some(78), "{}", explain(&partial));
    let err = String::from_utf8_lossy(&partial.stderr);
    for word in [
        "--cert",
        "FIELDHAND_CERT",
        "`cert`",
        "home/.config/fieldhand/ctl.toml",
    ] {
        assert!(err.contains(word), "{word} not in {err}");
    }
    let complete = run(bare(&env)
        .env("FIELDHAND_KEY", pki.join("operators/op-key.pem"))
        .env("FIELDHAND_CERT", pki.join("operators/op.pem"))
        .args([
            "enroll-token",
            "create",
            "--pool",
            "p",
            "--uses",
            "2",
            "--expires-in",
            "2h",
        ]));
    assert_eq!(complete.status.code(), Some(0), "{}", explain(&complete));
    let token = stdout(&complete).lines().last().unwrap().to_string();
    assert!(
        token.contains('.'),
        "the secret alone on the last line: {token}"
    );
    let token_id = token.split('.').next().unwrap();
    let rm = ctl(&env, &c, &["enroll-token", "rm", token_id]);
    assert_eq!(rm.status.code(), Some(0), "{}", explain(&rm));
    // An unknown key in the file is refused, naming it.
    std::fs::write(&file, "url = \"x\"\nport = 1\n").unwrap();
    let bad = run(bare(&env).args(["--config", file.to_str().unwrap(), "tasks", "ls"]));
    assert_eq!(bad.status.code(), Some(78), "{}", explain(&bad));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("port"),
        "{}",
        explain(&bad)
    );
}

/// Routes other developers are adding: a controller without them says so (exit 76), and
/// never "not found".
#[test]
fn a_controller_without_a_route_is_told_to_upgrade() {
    let env = Env::new();
    let c = env.controller();
    let has = |route: &str| {
        // A controller that has the route answers it: then there is nothing to check here.
        let probe = env.operator(&c).get(route);
        !(probe.0 == 404
            && probe.1["error_msg"]
                .as_str()
                .unwrap_or("")
                .starts_with("no route")
            || probe.0 == 405)
    };
    for (args, route) in [
        (&["tasks", "ls"][..], "GET /v1/tasks"),
        (&["pools", "ls"][..], "GET /v1/pools"),
        (&["scripts", "ls"][..], "GET /v1/scripts"),
    ] {
        let path = route.trim_start_matches("GET ");
        if has(path) {
            continue;
        }
        let o = ctl(&env, &c, args);
        assert_eq!(o.status.code(), Some(76), "{args:?}: {}", explain(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(&format!("this controller has no {route}: upgrade it")),
            "{err}"
        );
    }
    // A task that does not exist is the controller's 404, not a missing route (65).
    let o = ctl(&env, &c, &["tasks", "show", "no-such-task"]);
    assert_eq!(o.status.code(), Some(65), "{}", explain(&o));
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("upgrade"),
        "{}",
        explain(&o)
    );
}

#[test]
fn generate_writes_man_pages_and_completions() {
    let env = Env::new();
    let dir = env.path().join("gen");
    for bin in [CTL, crate::support::AGENT, crate::support::CONTROLLER] {
        let o = Command::new(bin)
            .args(["generate", "--dir", dir.to_str().unwrap()])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "{bin}: {}", explain(&o));
    }
    for f in [
        "man/fieldhandctl/fieldhandctl.1.gz",
        "man/fieldhandctl/fieldhandctl-tasks-watch.1.gz",
        "man/fieldhand/fieldhand.1.gz",
        "man/fieldhand-controller/fieldhand-controller.1.gz",
        "completions/fieldhandctl.bash",
        "completions/_fieldhandctl",
        "completions/fieldhandctl.fish",
    ] {
        assert!(Path::new(&dir.join(f)).exists(), "{f} missing");
    }
    let bash = std::fs::read_to_string(dir.join("completions/fieldhandctl.bash")).unwrap();
    assert!(
        bash.contains("push-image") && bash.contains("--gray-count"),
        "{bash}"
    );
}
