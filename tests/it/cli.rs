//! The command line: usage and config errors map to sysexits codes, and the PKI never overwrites.

use std::os::unix::fs::PermissionsExt;

use crate::support::{run, Env, AGENT, CONTROLLER};

#[test]
fn usage_and_config_errors_have_distinct_exit_codes() {
    for (bin, args) in [
        (AGENT, vec!["--bogus"]),
        (AGENT, vec!["status", "--config", "a", "--socket", "b"]),
        (CONTROLLER, vec!["pki", "issue", "--dir", "x"]),
        (CONTROLLER, vec!["nonsense"]),
    ] {
        let out = run(bin, &args);
        assert_eq!(
            out.status.code(),
            Some(64),
            "{bin} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for bin in [AGENT, CONTROLLER] {
        let out = run(bin, &["--help"]);
        assert_eq!(out.status.code(), Some(0));
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage"));
    }
    let env = Env::new();
    let bad = env.path().join("bad.toml");
    std::fs::write(
        &bad,
        "controller_url = \"http://x\"\npool_id = \"p\"\n[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n",
    )
    .unwrap();
    let out = run(AGENT, &["agent", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("controller_url"));
    std::fs::write(
        &bad,
        "listen = \"nowhere\"\ndata_dir = \"d\"\n[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n",
    )
    .unwrap();
    let out = run(CONTROLLER, &["serve", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen"));
    let out = run(
        AGENT,
        &[
            "agent",
            "--config",
            env.path().join("missing.toml").to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(78));
    // Status with no agent behind the socket: unavailable, with a hint.
    let out = run(
        AGENT,
        &[
            "status",
            "--socket",
            env.path().join("none.sock").to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(69));
    assert!(String::from_utf8_lossy(&out.stderr).contains("none.sock"));
}

#[test]
fn pki_refuses_to_overwrite_and_keeps_keys_private() {
    let env = Env::new();
    let pki = env.pki.to_str().unwrap();
    let key = env.pki.join("ca-key.pem");
    let before = std::fs::read(&key).unwrap();
    let out = run(CONTROLLER, &["pki", "init", "--dir", pki]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exists"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&key).unwrap(), before);
    let out = run(
        CONTROLLER,
        &["pki", "issue", "--dir", pki, "--operator", "op"],
    );
    assert_ne!(out.status.code(), Some(0));
    for k in ["ca-key.pem", "controller-key.pem", "operators/op-key.pem"] {
        let mode = std::fs::metadata(env.pki.join(k))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{k}");
    }
    let out = run(
        CONTROLLER,
        &["pki", "issue", "--dir", pki, "--agent", "../evil"],
    );
    assert_ne!(out.status.code(), Some(0));
    assert!(!env.path().join("evil.pem").exists());
}

#[test]
fn serve_defaults_to_the_packaged_config_and_says_each_error_once() {
    let out = run(CONTROLLER, &["serve", "--help"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("/etc/fieldhand-controller/controller.toml"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // A TLS file that is not there: the error names its config key, and is printed once.
    let env = Env::new();
    let cfg = env.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            env.path().join("data").display(),
            env.pki.join("ca.pem").display(),
            env.path().join("no-such-cert.pem").display(),
            env.pki.join("controller-key.pem").display()
        ),
    )
    .unwrap();
    let out = run(CONTROLLER, &["serve", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("config key `tls.cert`"), "{err}");
    assert_eq!(
        err.matches("no-such-cert.pem").count(),
        1,
        "printed more than once: {err}"
    );
}

#[test]
fn the_quickstart_prints_a_working_operator_helper_and_guards_its_directory() {
    use std::io::{BufRead, BufReader};
    let env = Env::new();
    let dir = env.path().join("qs");
    let mut first = std::process::Command::new(CONTROLLER)
        .args([
            "quickstart",
            "--agents",
            "1",
            "--dir",
            dir.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(first.stdout.take().unwrap());
    let mut text = String::new();
    let mut line = String::new();
    while out.read_line(&mut line).unwrap() > 0 {
        text.push_str(&line);
        line.clear();
        if text.contains("status --socket") {
            break;
        }
    }
    // A second quickstart on the same directory is refused, naming it.
    let second = run(
        CONTROLLER,
        &["quickstart", "--exit", "--dir", dir.to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(75), "{err}");
    assert!(err.contains("in use by another quickstart"), "{err}");
    // The printed helper works as pasted, from anywhere.
    let helper: String = text
        .lines()
        .skip_while(|l| !l.contains("URL=https://"))
        .take(2)
        .map(|l| format!("{}\n", l.trim()))
        .collect();
    assert!(
        helper.contains(&dir.join("pki/ca.pem").display().to_string()),
        "{text}"
    );
    let sh = std::process::Command::new("bash")
        .args(["-c", &format!("cd /; {helper}op $URL/v1/machines")])
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&sh.stdout);
    assert!(
        body.contains("\"machine_id\":\"qs-agent-1\""),
        "{body} {}",
        String::from_utf8_lossy(&sh.stderr)
    );
    // So do the operator CLI's lines: its settings are in the quickstart's ctl.toml.
    let ctl: String = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("export FIELDHAND_CTL_CONFIG=") || l.ends_with("machines ls"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(ctl.lines().count(), 2, "{text}");
    let sh = std::process::Command::new("bash")
        .args(["-c", &format!("cd /; {ctl}")])
        .env_remove("HOME")
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&sh.stdout);
    assert!(
        sh.status.success() && table.contains("qs-agent-1"),
        "{table} {}",
        String::from_utf8_lossy(&sh.stderr)
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let _ = first.wait();
}
